"""Polls through a version column (``version_columns=``) on DuckDB, SQLite and PostgreSQL.

Writes come from a foreign client. Polls between full diffs read only rows whose version
moved, so a delete, or an update that leaves the version alone, is found by the next full
diff: the tests ask for one (``request_full_diff``) or move the clock the snapshots read,
never sleep.
"""

from __future__ import annotations

import datetime as _dt
import time
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import Recorder, SQLClient, outputs_by_source

import reactive
from reactive.backends.base import TableInfo, VersionColumn
from reactive.backends.ibis import snapshots as snapshots_module
from reactive.backends.ibis.listener import ChangedRows, IbisPollingListener
from reactive.backends.ibis.snapshots import MARK_PREFIX, VersionMark, read_changes, snapshot_table
from reactive.components import Listener, Model
from reactive.events import DBEvent
from reactive.queue import CDCQueue

KINDS = ["integer", "timestamp", "timestamptz"]


def version(kind: str, n: int) -> Any:
    """The n-th version of a column of ``kind``, as the foreign client writes it."""
    if kind == "integer":
        return n
    moment = f"2024-05-01 12:{n // 60:02d}:{n % 60:02d}"
    return moment + "+00:00" if kind == "timestamptz" else moment


def make_docs(sql: SQLClient, kind: str, rows: list[tuple[int, str, int | None]]) -> None:
    column = {"integer": "BIGINT", "timestamp": "TIMESTAMP", "timestamptz": "TIMESTAMP WITH TIME ZONE"}[kind]
    sql.execute(f"CREATE TABLE docs (id INTEGER PRIMARY KEY, text VARCHAR(200), version {column})")
    sql.execute("CREATE INDEX docs_version ON docs (version)")
    if rows:
        write(sql, kind, rows)


def write(sql: SQLClient, kind: str, rows: list[tuple[int, str, int | None]]) -> None:
    """Insert or replace rows ``(id, text, version number or None)``."""
    for row_id, text, n in rows:
        sql.execute("DELETE FROM docs WHERE id = ?", (row_id,))
        sql.execute("INSERT INTO docs VALUES (?, ?, ?)", (row_id, text, None if n is None else version(kind, n)))


def connect(sql: SQLClient, spec: str | VersionColumn = "version", **options: Any) -> reactive.Datalayer:
    return reactive.connect(sql.uri, poll_interval=options.pop("poll_interval", 0.05), version_columns={"docs": spec})


def versions(db: reactive.Datalayer) -> dict[str, Any]:
    return db.cdc.info()["source"]["versions"]["docs"]


def saved_mark(db: reactive.Datalayer) -> VersionMark:
    saved = db.backend.checkpoints.load_checkpoint(MARK_PREFIX + "docs")
    assert saved is not None
    return VersionMark.decoded(saved)


def as_number(kind: str, value: Any) -> int:
    """A saved version back to the n of :func:`version`."""
    if kind == "integer":
        return int(value)
    moment = value if isinstance(value, _dt.datetime) else _dt.datetime.fromisoformat(value)
    if moment.tzinfo is not None:
        moment = moment.astimezone(_dt.UTC)
    return moment.minute * 60 + moment.second


HOUR = VersionColumn("version", full_diff_every=3600)


@pytest.mark.parametrize("kind", KINDS)
def test_inserts_and_updates_are_read_through_the_version_column(sql: SQLClient, kind: str) -> None:
    make_docs(sql, kind, [(1, "alpha", 1), (2, "beta", 2)])
    recorder = Recorder()
    with connect(sql, HOUR) as db:
        db.add(Listener(Model("tag", predict=recorder), "text", "docs"))
        assert as_number(kind, saved_mark(db).version) == 2  # taken with the snapshot
        db.cdc.start()
        write(sql, kind, [(3, "gamma", 3), (2, "BETA", 4)])
        assert db.cdc.wait_idle(timeout=30)
        assert outputs_by_source(db, "tag__text") == {1: "<alpha>", 2: "<BETA>", 3: "<gamma>"}
        assert sorted(recorder.inputs) == ["BETA", "alpha", "beta", "gamma"]
        info = versions(db)
        assert info["column"] == "version" and info["full_diffs"] == 0 and info["version_polls"] >= 1
        # The highest version seen is saved once its changes are processed.
        assert as_number(kind, saved_mark(db).version) == 4
        # Polls that find nothing new report nothing again (rows in the overlap are compared).
        before = db.cdc.info()["source"]
        assert db.cdc.wait_idle(timeout=30) and db.cdc.wait_idle(timeout=30)
        after = db.cdc.info()["source"]
        assert (after["inserts"], after["updates"]) == (before["inserts"], before["updates"])


def test_a_delete_is_found_by_the_next_full_diff(sql: SQLClient) -> None:
    make_docs(sql, "integer", [(1, "alpha", 1), (2, "beta", 2)])
    with connect(sql, HOUR) as db:
        db.add(Listener(Model("tag", predict=Recorder()), "text", "docs"))
        db.cdc.start()
        sql.execute("DELETE FROM docs WHERE id = 1")
        assert db.cdc.wait_idle(timeout=30)
        # Polls between full diffs read recent versions only: a delete moves none.
        assert outputs_by_source(db, "tag__text") == {1: "<alpha>", 2: "<beta>"}
        assert versions(db)["full_diffs"] == 0
        db.cdc.listener.request_full_diff("docs")
        assert db.cdc.wait_idle(timeout=30)
        assert outputs_by_source(db, "tag__text") == {2: "<beta>"}
        info = versions(db)
        assert info["full_diffs"] == 1 and not info["full_diff_requested"]


def test_a_requested_full_diff_that_fails_while_its_rows_are_read_is_made_again(
    duck: SQLClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A poll's changed rows are read as the poller goes through them: a full diff asked for
    counts as done only once all were read, so one that fails midway runs at the next poll."""
    make_docs(duck, "integer", [(1, "alpha", 1), (2, "beta", 2)])
    with connect(duck, HOUR) as db:
        db.add(Listener(Model("tag", predict=Recorder()), "text", "docs"))
        snapshots, table = db.backend.snapshots, db.table_info("docs")
        snapshots.request_full_diff("docs")

        def failing(*args: Any) -> Iterator[Any]:
            raise RuntimeError("the connection dropped mid-read")
            yield

        monkeypatch.setattr(snapshots, "changed", failing)
        changed, _ = snapshots.poll(table, 100)
        with pytest.raises(RuntimeError, match="mid-read"):
            list(changed)
        assert snapshots.version_info("docs")["full_diff_requested"]
        monkeypatch.undo()
        changed, _ = snapshots.poll(table, 100)
        assert list(changed) == []
        info = snapshots.version_info("docs")
        assert info["full_diffs"] == 1 and not info["full_diff_requested"]


def test_an_update_that_did_not_move_the_version_is_found_by_the_full_diff(sql: SQLClient) -> None:
    make_docs(sql, "integer", [(1, "alpha", 1), (2, "beta", 2)])
    with connect(sql, HOUR) as db:
        db.add(Listener(Model("tag", predict=Recorder()), "text", "docs"))
        db.cdc.start()
        sql.execute("UPDATE docs SET text = 'ALPHA' WHERE id = 1")  # version left at 1
        assert db.cdc.wait_idle(timeout=30)
        assert outputs_by_source(db, "tag__text")[1] == "<alpha>"
        db.cdc.listener.request_full_diff()  # every watched table
        assert db.cdc.wait_idle(timeout=30)
        assert outputs_by_source(db, "tag__text") == {1: "<ALPHA>", 2: "<beta>"}


def test_full_diffs_run_every_full_diff_every_seconds(duck: SQLClient, monkeypatch: pytest.MonkeyPatch) -> None:
    class Clock:
        offset = 0.0

        def time(self) -> float:
            return time.time() + self.offset

    clock = Clock()
    monkeypatch.setattr(snapshots_module, "time", clock)
    make_docs(duck, "integer", [(1, "alpha", 1), (2, "beta", 2)])
    with connect(duck, VersionColumn("version", full_diff_every=60)) as db:
        db.add(Listener(Model("tag", predict=Recorder()), "text", "docs"))
        db.cdc.start()
        duck.execute("DELETE FROM docs WHERE id = 1")
        assert db.cdc.wait_idle(timeout=30)
        assert set(outputs_by_source(db, "tag__text")) == {1, 2}
        clock.offset = 61.0  # a minute later
        assert db.cdc.wait_idle(timeout=30)
        assert set(outputs_by_source(db, "tag__text")) == {2}
        assert versions(db)["full_diffs"] == 1
        # The time of that full diff is saved: the next one is a minute after it.
        duck.execute("DELETE FROM docs WHERE id = 2")
        assert db.cdc.wait_idle(timeout=30)
        assert set(outputs_by_source(db, "tag__text")) == {2}


def test_full_diff_every_zero_makes_every_poll_a_full_diff(duck: SQLClient) -> None:
    make_docs(duck, "integer", [(1, "alpha", 1)])
    with connect(duck, VersionColumn("version", full_diff_every=0)) as db:
        db.add(Listener(Model("tag", predict=Recorder()), "text", "docs"))
        db.cdc.start()
        duck.execute("DELETE FROM docs WHERE id = 1")
        assert db.cdc.wait_idle(timeout=30)
        assert outputs_by_source(db, "tag__text") == {}
        assert versions(db)["version_polls"] == 0


def test_a_row_written_later_with_the_highest_version_seen_is_not_missed(sql: SQLClient) -> None:
    # ">=": a second writer that commits after a poll with the same version (one clock tick,
    # a counter value taken twice) is read by the next poll. Overlap 0: nothing below is read.
    make_docs(sql, "integer", [(1, "alpha", 10)])
    with connect(sql, VersionColumn("version", overlap=0, full_diff_every=3600)) as db:
        db.add(Listener(Model("tag", predict=Recorder()), "text", "docs"))
        db.cdc.start()
        assert db.cdc.wait_idle(timeout=30)
        write(sql, "integer", [(2, "same version", 10), (3, "older version", 9)])
        assert db.cdc.wait_idle(timeout=30)
        assert outputs_by_source(db, "tag__text") == {1: "<alpha>", 2: "<same version>"}
        db.cdc.listener.request_full_diff("docs")  # what the overlap did not cover, the full diff finds
        assert db.cdc.wait_idle(timeout=30)
        assert set(outputs_by_source(db, "tag__text")) == {1, 2, 3}


def test_the_overlap_reads_rows_committed_late_with_an_older_version(sql: SQLClient) -> None:
    make_docs(sql, "integer", [(1, "alpha", 100)])
    with connect(sql, VersionColumn("version", overlap=5, full_diff_every=3600)) as db:
        db.add(Listener(Model("tag", predict=Recorder()), "text", "docs"))
        db.cdc.start()
        write(sql, "integer", [(2, "within", 95), (3, "outside", 94)])
        assert db.cdc.wait_idle(timeout=30)
        assert set(outputs_by_source(db, "tag__text")) == {1, 2}


@pytest.mark.parametrize("kind", KINDS)
def test_an_overlap_past_the_earliest_version_reads_from_there(sql: SQLClient, kind: str) -> None:
    # Subtracting it from the highest version seen overflowed (timedelta: "date value out of
    # range"; an integer past 64 bits on SQLite): every poll of the table failed.
    overlap = 2**64 if kind == "integer" else _dt.timedelta(days=999_999_999)
    make_docs(sql, kind, [(1, "alpha", 100)])
    with connect(sql, VersionColumn("version", overlap=overlap, full_diff_every=3600)) as db:
        db.add(Listener(Model("tag", predict=Recorder()), "text", "docs"))
        db.cdc.start()
        write(sql, kind, [(2, "late", 1), (1, "ALPHA", 100)])
        assert db.cdc.wait_idle(timeout=30)
        assert outputs_by_source(db, "tag__text") == {1: "<ALPHA>", 2: "<late>"}
        assert db.cdc.info()["source"]["failing_tables"] == {}


@pytest.mark.parametrize("kind", KINDS)
def test_a_restart_goes_on_from_the_saved_version(sql: SQLClient, kind: str) -> None:
    make_docs(sql, kind, [(1, "alpha", 1), (2, "beta", 2)])
    with connect(sql, HOUR) as db:
        db.add(Listener(Model("tag", predict=Recorder()), "text", "docs"))
        db.cdc.start()
        write(sql, kind, [(3, "gamma", 5)])
        assert db.cdc.wait_idle(timeout=30)
    write(sql, kind, [(4, "delta", 6), (1, "ALPHA", 7)])

    second = Recorder()
    with connect(sql, HOUR) as db:
        db.add(Listener(Model("tag", predict=second), "text", "docs"))
        assert as_number(kind, saved_mark(db).version) == 5
        assert as_number(kind, versions(db)["version"]) == 5  # read back, not taken again
        db.cdc.start()
        assert db.cdc.wait_idle(timeout=30)
        assert sorted(second.inputs) == ["ALPHA", "delta"]  # computed once (by the resumed backfill)
        info = versions(db)
        assert info["full_diffs"] == 0 and info["version_polls"] >= 1  # no full diff at the restart
        assert as_number(kind, saved_mark(db).version) == 7
        assert outputs_by_source(db, "tag__text") == {1: "<ALPHA>", 2: "<beta>", 3: "<gamma>", 4: "<delta>"}
        # The snapshot caught up too: a full diff now finds nothing left to do.
        counters = db.cdc.info()["source"]
        db.cdc.listener.request_full_diff("docs")
        assert db.cdc.wait_idle(timeout=30)
        assert db.cdc.info()["source"]["updates"] == counters["updates"]


def test_a_table_with_a_saved_snapshot_but_no_version_starts_with_a_full_diff(duck: SQLClient) -> None:
    # Upgrading: the table was followed without a version column; its snapshot is kept and
    # the first poll with one is a full diff (nothing says which versions were processed).
    make_docs(duck, "integer", [(1, "alpha", 1)])
    with reactive.connect(duck.uri, poll_interval=0.05) as db:
        db.add(Listener(Model("tag", predict=Recorder()), "text", "docs"))
    duck.execute("DELETE FROM docs WHERE id = 1")
    with connect(duck, HOUR) as db:
        db.add(Listener(Model("tag", predict=Recorder()), "text", "docs"))
        db.cdc.start()
        assert db.cdc.wait_idle(timeout=30)
        assert versions(db)["full_diffs"] == 1
        assert outputs_by_source(db, "tag__text") == {}


def test_null_versions_are_read_by_every_poll(sql: SQLClient) -> None:
    make_docs(sql, "integer", [(1, "alpha", 1)])
    with connect(sql, HOUR) as db:
        db.add(Listener(Model("tag", predict=Recorder()), "text", "docs"))
        db.cdc.start()
        write(sql, "integer", [(2, "no version", None)])
        assert db.cdc.wait_idle(timeout=30)
        assert outputs_by_source(db, "tag__text")[2] == "<no version>"
        sql.execute("UPDATE docs SET text = 'still none' WHERE id = 2")
        assert db.cdc.wait_idle(timeout=30)
        assert outputs_by_source(db, "tag__text")[2] == "<still none>"
        # Read by every poll, reported only when they change.
        counters = db.cdc.info()["source"]
        assert db.cdc.wait_idle(timeout=30) and db.cdc.wait_idle(timeout=30)
        assert db.cdc.info()["source"]["updates"] == counters["updates"]
        assert versions(db)["full_diffs"] == 0


def test_an_empty_table_is_followed_from_its_first_row(sql: SQLClient) -> None:
    make_docs(sql, "timestamp", [])
    with connect(sql, HOUR) as db:
        db.add(Listener(Model("tag", predict=Recorder()), "text", "docs"))
        assert saved_mark(db).version is None
        db.cdc.start()
        write(sql, "timestamp", [(1, "first", 1)])
        assert db.cdc.wait_idle(timeout=30)
        write(sql, "timestamp", [(2, "second", 2)])
        assert db.cdc.wait_idle(timeout=30)
        assert outputs_by_source(db, "tag__text") == {1: "<first>", 2: "<second>"}
        assert versions(db)["full_diffs"] == 0
        assert as_number("timestamp", saved_mark(db).version) == 2


# -- bad input ----------------------------------------------------------------------------
def test_a_version_column_that_does_not_exist_is_refused_by_add(sql: SQLClient) -> None:
    make_docs(sql, "integer", [(1, "alpha", 1)])
    with connect(sql, "updated_at") as db:
        with pytest.raises(reactive.ConfigurationError, match="version column 'updated_at' is not a column of 'docs'"):
            db.add(Listener(Model("tag", predict=Recorder()), "text", "docs"))
        assert db.show() == []
        assert not db.backend.source.table_exists(snapshot_table("docs"))


def test_a_version_column_of_another_type_is_refused_by_add(sql: SQLClient) -> None:
    make_docs(sql, "integer", [(1, "alpha", 1)])
    with connect(sql, "text") as db:
        with pytest.raises(reactive.ConfigurationError, match="must be a timestamp or an integer"):
            db.add(Listener(Model("tag", predict=Recorder()), "text", "docs"))
        assert db.show() == []


def test_a_timedelta_overlap_on_an_integer_column_is_refused(duck: SQLClient) -> None:
    make_docs(duck, "integer", [])
    with (
        connect(duck, VersionColumn("version", overlap=_dt.timedelta(seconds=1))) as db,
        pytest.raises(reactive.ConfigurationError, match="its overlap is a number"),
    ):
        db.add(Listener(Model("tag", predict=Recorder()), "text", "docs"))


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ({"docs": 3}, "must be a column name or a VersionColumn"),
        (["docs"], "maps table names to version columns"),
        ({"docs": ""}, "is a column name"),
    ],
)
def test_a_malformed_option_is_refused_by_connect(duck: SQLClient, option: Any, message: str) -> None:
    with pytest.raises(reactive.ConfigurationError, match=message):
        reactive.connect(duck.uri, version_columns=option)


def test_bad_settings_are_refused() -> None:
    with pytest.raises(reactive.ConfigurationError, match="full_diff_every"):
        VersionColumn("version", full_diff_every=-1)
    with pytest.raises(reactive.ConfigurationError, match="overlap"):
        VersionColumn("version", overlap="1s")  # type: ignore[arg-type]
    # An infinite overlap failed every poll (OverflowError); NaN seconds between full diffs
    # compared false with every elapsed time: deletes were never found.
    for overlap in (float("inf"), float("nan")):
        with pytest.raises(reactive.ConfigurationError, match="overlap must be a number >= 0"):
            VersionColumn("version", overlap=overlap)
    for every in (float("nan"), float("inf"), -1):
        with pytest.raises(reactive.ConfigurationError, match="full_diff_every must be seconds >= 0, or None"):
            VersionColumn("version", full_diff_every=every)


# -- the listener's bookkeeping, without a database ----------------------------------------
class FakeSnapshots:
    def __init__(self, changes: dict[str, list[Any]], rows: dict[Any, str]) -> None:
        self.changes, self.rows = changes, rows
        self.saved: list[tuple[str, Any]] = []

    def poll(self, table: TableInfo, rows_per_read: int) -> tuple[Iterator[ChangedRows], Any]:
        return read_changes(self.changes, self.rows_with_fingerprints, "id", rows_per_read), "mark"

    def rows_with_fingerprints(self, ids: Any) -> tuple[list[dict[str, Any]], list[int]]:
        found = [i for i in ids if i in self.rows]
        return [{"id": i, "text": self.rows[i]} for i in found], [7] * len(found)

    def save_mark(self, table: str, mark: Any) -> None:
        self.saved.append((table, mark))

    def version_info(self, table: str) -> None:
        return None


def test_a_mark_is_not_saved_when_a_packet_of_its_poll_was_released() -> None:
    docs = TableInfo("docs", "id", ("id", "text"))
    snapshots = FakeSnapshots({"insert": [1]}, {1: "one"})
    listener = IbisPollingListener(snapshots, CDCQueue(max_rows=100))  # type: ignore[arg-type]
    listener._tables["docs"] = docs
    listener._poll(docs)
    [packet] = listener.queue.get_batch(max_rows=100, timeout=0)
    listener.release([packet.position])
    listener._save_marks(drained=True)
    assert snapshots.saved == []
    listener._poll(docs)  # polled again: this time committed
    [packet] = listener.queue.get_batch(max_rows=100, timeout=0)
    listener.commit([packet.position])
    listener._save_marks(drained=True)
    assert snapshots.saved == [("docs", "mark")]


def test_an_updated_row_gone_before_it_is_read_is_a_delete() -> None:
    docs = TableInfo("docs", "id", ("id", "text"))
    snapshots = FakeSnapshots({"update": [1, 2]}, {2: "two"})
    listener = IbisPollingListener(snapshots, CDCQueue(max_rows=100))  # type: ignore[arg-type]
    listener._tables["docs"] = docs
    listener._poll(docs)
    packets = listener.queue.get_batch(max_rows=100, timeout=0)
    assert [(p.event, p.ids) for p in packets] == [(DBEvent.update, (2,)), (DBEvent.delete, (1,))]

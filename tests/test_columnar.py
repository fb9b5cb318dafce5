"""Rows kept as one Arrow table (DuckDB's polls and backfills) give exactly the row-by-row results.

On DuckDB a poll reads changed rows, and a backfill the rows it computes, as one Arrow table
(:class:`reactive.rows.TableRows`), and a listener takes its input column from it in one call.
Each test runs the same scenario on DuckDB and on SQLite (whose rows come one dict each) and
compares outputs and recorded errors: the columnar path must change no result, and must hand
every odd row (no value, too large, a model failure, an output that does not fit) to the
row-by-row checks.
"""

from __future__ import annotations

import datetime as dt
import decimal
import gc
import logging
import random
import sqlite3
import threading
import types
import weakref
from collections.abc import Iterator
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pytest
from conftest import Recorder, SQLClient, outputs_by_source, within

import reactive
from reactive import TableMonitor
from reactive.backends.ibis.dialects import Dialect
from reactive.components import Listener, Model
from reactive.components import listener as listener_module
from reactive.components.listener import arrow_equal
from reactive.events import ChangePacket, DBEvent, coalesce, collate, window_batches
from reactive.handler import CDCHandler
from reactive.rows import TableRows

ROWS = [(1, "alpha"), (2, None), (3, "x" * 40), (4, "boom"), (5, "text"), (6, "delta"), (7, "é✓")]


def predict(texts: list[str]) -> list[Any]:
    """A float per text; a failure for "boom"; a value that does not fit for "text"."""
    out: list[Any] = []
    for t in texts:
        if t == "boom":
            raise ValueError("boom is not a word")
        out.append("not a number" if t == "text" else float(len(t)))
    return out


def model() -> Model:
    return Model("len", predict=predict, version="2", output_type="float64", max_retries=0)


def run(client: SQLClient) -> tuple[dict[Any, Any], dict[Any, str]]:
    client.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text VARCHAR(100))")
    client.executemany("INSERT INTO docs VALUES (?, ?)", ROWS[:4])
    with reactive.connect(client.uri, poll_interval=0.05) as db:
        db.add(Listener(model(), "text", "docs", max_input_bytes=20), progress=False)  # backfill: 1-4
        db.cdc.start()
        client.executemany("INSERT INTO docs VALUES (?, ?)", ROWS[4:])  # live: 5-7
        client.execute("UPDATE docs SET text = 'alphabet' WHERE id = 1")
        assert db.cdc.wait_idle(timeout=30)
        outputs = outputs_by_source(db, "len__text")
        errors = {e["source"]: e["error"] for e in db.errors("len__text")}
    return outputs, errors


@pytest.fixture
def lite(tmp_path) -> Iterator[SQLClient]:
    path = tmp_path / "lite.db"
    client = SQLClient("sqlite", f"sqlite:///{path}", sqlite3.connect(str(path), check_same_thread=False))
    yield client
    client.close()


@pytest.fixture(autouse=True)
def column_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    """The batches of these tests are small, which a listener checks one row at a time
    (``FEW_ROWS``): here it checks them from the key's Arrow column, as it does larger ones."""
    monkeypatch.setattr(listener_module, "FEW_ROWS", 0)


def test_duckdb_arrow_rows_give_the_row_by_row_results(duck: SQLClient, lite: SQLClient) -> None:
    outputs, errors = run(duck)
    assert (outputs, errors) == run(lite)
    assert outputs == {1: 8.0, 6: 5.0, 7: 2.0}
    assert set(errors) == {2, 3, 4, 5}
    assert "no value for key" in errors[2] and "larger than max_input_bytes" in errors[3]
    assert "boom is not a word" in errors[4] and "float64" in errors[5]


def test_a_few_duckdb_rows_are_checked_one_by_one_with_the_same_results(
    duck: SQLClient, lite: SQLClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(listener_module, "FEW_ROWS", 32)
    from_column: list[int] = []
    column_candidates = Listener._column_candidates

    def spy(self: Listener, ids: Any, rows: TableRows, remove: list[Any]) -> Any:
        from_column.append(len(ids))
        return column_candidates(self, ids, rows, remove)

    monkeypatch.setattr(Listener, "_column_candidates", spy)
    outputs, errors = run(duck)
    assert (outputs, errors) == run(lite)
    assert from_column == []  # every batch of this scenario has at most 4 rows


def test_a_listeners_check_of_a_page_as_one_table_equals_its_row_by_row_check() -> None:
    """A reconciliation asks ``current`` of a page at a time: rows read as one Arrow table are
    fingerprinted from the key's column in one call, every other page row by row; same answers,
    whatever the model's version, a missing value or a filter."""
    rng = random.Random(5)
    for version in (None, "2"):
        for listener in (
            Listener(Model("m", predict=list, version=version), "text", "docs"),
            Listener(Model("m", predict=list, version=version), "text", "docs", filter={"lang": "en"}),
        ):
            model_ = listener.model
            for _ in range(30):
                texts = [rng.choice(["a", "bb", "é✓", "", None, "a"]) for _ in range(rng.randint(0, 8))]
                rows = [{"id": i, "text": t, "lang": rng.choice(["en", "fr"])} for i, t in enumerate(texts)]
                stored = [
                    rng.choice([None, 7, model_.fingerprint(t) if t is not None else None, model_.fingerprint("a")])
                    for t in texts
                ]
                expected = [listener.is_current(row, s) for row, s in zip(rows, stored, strict=True)]
                assert listener.current(TableRows.of_rows(rows), stored) == expected
                assert listener.current(rows, stored) == expected


#: Filters the Arrow path compares (text, integers, an int past int32, booleans, float64, NULL,
#: two fields) and filters it leaves to Python (an int against floats, a float against ints).
FILTERS: list[dict[str, Any]] = [
    {"lang": "en"},
    {"n": 2},
    {"n": 2**40},
    {"flag": True},
    {"x": 0.5},
    {"lang": None},
    {"lang": "en", "flag": False},
    {"lang": "\udc80"},  # a lone surrogate: Arrow's text cannot hold it
    {"x": 1},
    {"n": 2.0},
]


def random_rows(rng: random.Random, count: int) -> list[dict[str, Any]]:
    return [
        {
            "id": i,
            "text": rng.choice(["a", "bb", "é✓", "a", None]),
            "lang": rng.choice(["en", "fr", "EN", None]),
            "n": rng.choice([1, 2, None]),
            "flag": rng.choice([True, False, None]),
            "x": rng.choice([0.5, 1.0, float("nan"), None]),
        }
        for i in range(count)
    ]


def arrow_rows(rows: list[dict[str, Any]]) -> TableRows:
    schema = pa.schema(
        [("id", pa.int64()), ("text", pa.string()), ("lang", pa.string()), ("n", pa.int32()),
         ("flag", pa.bool_()), ("x", pa.float64())]
    )  # fmt: skip
    return TableRows(pa.Table.from_pylist(rows, schema))


def test_a_filter_compared_by_arrow_keeps_and_leaves_out_the_rows_python_does() -> None:
    """Rows read as one Arrow table are filtered by Arrow (a backfill with a filter took 2-3x
    as long as one without: every row went through Python's ==); for every filter and table,
    ``current`` and the window's candidates must equal the row-by-row answers."""
    rng = random.Random(7)
    for k, conditions in enumerate(FILTERS):
        listener = Listener(Model("m", predict=list), "text", "docs", filter=conditions)
        model_ = listener.model
        for _ in range(40):
            rows = random_rows(rng, rng.randint(0, 12))
            table = arrow_rows(rows)
            stored = [rng.choice([None, 7, model_.fingerprint(row["text"] or "a")]) for row in rows]
            for prints in (stored, [None] * len(rows)):  # the second: nothing stored, a first backfill
                expected = [listener.is_current(row, p) for row, p in zip(rows, prints, strict=True)]
                assert listener.current(table, prints) == expected, conditions
            ids = [row["id"] for row in rows]
            remove: list[Any] = []
            found = listener._column_candidates(ids, table, remove)
            matching = [row for row in rows if listener.matches(row)]
            by_arrow = all(arrow_equal(table.table.column(f), v) is not None for f, v in conditions.items())
            assert by_arrow == (k < len(FILTERS) - 2), conditions  # {"n": 2.0} == {"n": 2}: by position
            if found is None:  # rows one by one: a NULL key among the rows kept, or Python's filter
                assert remove == []
                assert not by_arrow or any(row["text"] is None for row in matching), conditions
                continue
            assert found.ids == [row["id"] for row in matching]
            assert found.values == [row["text"] for row in matching]
            assert remove == [row["id"] for row in rows if not listener.matches(row)]


def test_a_filter_holding_a_lone_surrogate_matches_no_duckdb_row_and_fails_nothing(duck: SQLClient) -> None:
    """Arrow cannot make text of a lone surrogate: comparing the column with one raised
    UnicodeEncodeError and the backfill did not finish. No row's text holds one."""
    duck.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text VARCHAR, lang VARCHAR)")
    duck.executemany("INSERT INTO docs VALUES (?, ?, ?)", [(i, "t", "en") for i in range(50)])
    with reactive.connect(duck.uri) as db:
        db.add(Listener(model(), "text", "docs", filter={"lang": "\udc80"}), progress=False)
        db.add(Listener(Model("all", predict=lambda xs: xs), "text", "docs", filter={"lang": "en"}), progress=False)
        assert outputs_by_source(db, "len__text") == {}
        assert len(outputs_by_source(db, "all__text")) == 50
        assert db.errors() == []


def test_a_filtered_listener_gives_on_duckdb_what_it_gives_row_by_row(duck: SQLClient, lite: SQLClient) -> None:
    """Rows moving into and out of the filter (an update of the filtered column), rows of
    another language, NULLs: the same outputs from Arrow windows as from dict rows."""

    def filtered(client: SQLClient) -> dict[Any, Any]:
        client.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text VARCHAR(100), lang VARCHAR(5))")
        client.executemany(
            "INSERT INTO docs VALUES (?, ?, ?)", [(i, f"t{i}", ["en", "fr", None][i % 3]) for i in range(1, 40)]
        )
        with reactive.connect(client.uri, poll_interval=0.05) as db:
            db.add(Listener(model(), "text", "docs", filter={"lang": "en"}), progress=False)
            db.cdc.start()
            client.execute("UPDATE docs SET lang = 'en' WHERE id IN (1, 2)")  # into the filter
            client.execute("UPDATE docs SET lang = 'fr' WHERE id IN (3, 6)")  # out of it
            client.executemany("INSERT INTO docs VALUES (?, ?, ?)", [(i, "new", "en") for i in range(40, 45)])
            assert db.cdc.wait_idle(timeout=30)
            return outputs_by_source(db, "len__text")

    outputs = filtered(duck)
    assert outputs == filtered(lite)
    expected = {i for i in range(1, 40) if i % 3 == 0} - {3, 6} | {1, 2} | set(range(40, 45))
    assert set(outputs) == expected


def test_a_restart_reconciles_duckdb_pages_as_sqlite_rows(duck: SQLClient, lite: SQLClient) -> None:
    """Changes made while no process ran (an update, a value set to NULL, a delete, an insert, a
    change to another column) are found the same way from Arrow pages and from dict rows."""

    def restart(client: SQLClient) -> tuple[dict[Any, Any], int]:
        client.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text VARCHAR(100), n INTEGER)")
        client.executemany("INSERT INTO docs VALUES (?, ?, ?)", [(i, f"t{i}", i) for i in range(1, 9)])
        with reactive.connect(client.uri) as db:
            db.add(Listener(model(), "text", "docs"), progress=False)
        client.execute("UPDATE docs SET text = 'changed' WHERE id = 1")
        client.execute("UPDATE docs SET text = NULL WHERE id = 2")
        client.execute("UPDATE docs SET n = 99 WHERE id = 3")
        client.execute("DELETE FROM docs WHERE id = 5")
        client.execute("INSERT INTO docs VALUES (9, 'new one', 9)")
        with reactive.connect(client.uri) as db:
            db.add(Listener(model(), "text", "docs"), progress=False)
            computed = db.cdc.info()["listeners"]["len__text"]["computed"]
            return outputs_by_source(db, "len__text"), computed

    outputs, computed = restart(duck)
    assert (outputs, computed) == restart(lite)
    assert computed == 2  # rows 1 and 9; row 3's input did not change
    assert outputs == {1: 7.0, 3: 2.0, 4: 2.0, 6: 2.0, 7: 2.0, 8: 2.0, 9: 7.0}


def test_a_backfill_reads_its_rows_as_one_table_and_deletes_outputs_of_rows_gone(duck: SQLClient) -> None:
    duck.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text VARCHAR)")
    duck.executemany("INSERT INTO docs VALUES (?, ?)", [(i, f"t{i}") for i in range(1, 6)])
    with reactive.connect(duck.uri) as db:
        db.add(Listener(model(), "text", "docs"), progress=False)
        source, table = db.source_for("docs"), db.table_info("docs")
        rows = source.read_table(table, [5, 1, 99])
        assert isinstance(rows, TableRows) and sorted(rows.column("id")) == [1, 5]
        batch = window_batches([ChangePacket("docs", DBEvent.insert, (5, 1, 99))], 100)[0]
        kept, gone = CDCHandler._split_gone(batch, rows, "id")
        assert sorted(kept.ids) == [1, 5] and kept.rows is rows
        assert gone.event is DBEvent.delete and gone.ids == (99,)


def test_window_batches_equal_coalesce_then_collate() -> None:
    """The fast path (no id twice) and the general one cut the same batches, on random windows."""
    rng = random.Random(11)
    events = list(DBEvent)
    for _ in range(300):
        packets = []
        for _ in range(rng.randint(1, 4)):
            ids = tuple(rng.sample(range(40 if rng.random() < 0.5 else 400), rng.randint(0, 6)))
            event = rng.choice(events)
            rows = None if event is DBEvent.delete or rng.random() < 0.3 else tuple({"v": i} for i in ids)
            if rows is not None and rng.random() < 0.5:
                rows = TableRows.of_rows(list(rows)) if ids else rows
            table, targets = rng.choice(["a", "b"]), rng.choice([None, frozenset({"x"})])
            packets.append(ChangePacket(table, event, ids, rows, targets=targets))
        got = [(b.table, b.event, b.ids, tuple(b.rows), b.targets) for b in window_batches(packets, 3)]
        want = [(b.table, b.event, b.ids, tuple(b.rows), b.targets) for b in collate(coalesce(packets), 3)]
        assert got == want


#: DuckDB id types and two ids of each, as SQL literals (a statement reads its ids from an
#: Arrow view: ids Arrow cannot type alone, past 64 bits, are typed by DuckDB; UUIDs come to
#: Python as text, and the statements of a UUID column cast them back).
ODD_IDS = {
    "UUID": ("'12345678-1234-5678-1234-567812345678'", "'00000000-0000-0000-0000-000000000001'"),
    "UBIGINT": ("18446744073709551615", "1"),
    "HUGEINT": ("-170141183460469231731687303715884105", "2"),
    "BLOB": ("'\\xAA\\x00'::BLOB", "'b'::BLOB"),
    "VARCHAR": ("'a ✓ \"q\"'", "''"),
    "DATE": ("DATE '2020-01-01'", "DATE '1970-01-02'"),
    "TIMESTAMP": ("TIMESTAMP '2020-01-01 10:00:00.123456'", "TIMESTAMP '1999-12-31 23:59:59'"),
    "DECIMAL(10,2)": ("12.34", "-0.01"),
    "DOUBLE": ("1.5", "-2.25"),
}


@pytest.fixture(params=["values", "arrow"])
def upsert_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """DuckDB upserts of a few rows bind them as values; with "arrow", every upsert registers
    its rows as an Arrow table, as larger ones do."""
    if request.param == "arrow":
        monkeypatch.setattr(Dialect, "values_rows", 0)
    return str(request.param)


@pytest.mark.parametrize("id_type", list(ODD_IDS))
def test_duckdb_ids_of_every_type_reach_outputs_updates_and_deletes(
    duck: SQLClient, id_type: str, upsert_path: str
) -> None:
    first, second = ODD_IDS[id_type]
    duck.execute(f"CREATE TABLE docs (id {id_type} PRIMARY KEY, text VARCHAR)")
    duck.execute(f"INSERT INTO docs VALUES ({first}, 'alpha')")
    with reactive.connect(duck.uri, poll_interval=0.05) as db:
        db.add(Listener(Model("len", predict=lambda ts: [len(t) for t in ts], output_type="int64"), "text", "docs"))
        db.cdc.start()
        duck.execute(f"INSERT INTO docs VALUES ({second}, 'be')")
        assert db.cdc.wait_idle(timeout=30)
        assert sorted(outputs_by_source(db, "len__text").values()) == [2, 5]
        duck.execute(f"UPDATE docs SET text = 'gamma!' WHERE id = {first}")
        duck.execute(f"DELETE FROM docs WHERE id = {second}")
        assert db.cdc.wait_idle(timeout=30)
        assert list(outputs_by_source(db, "len__text").values()) == [6]
        assert db.errors("len__text") == []


def test_duckdb_hugeint_ids_past_38_digits_are_left_out_and_the_rest_followed(
    duck: SQLClient, caplog: pytest.LogCaptureFixture
) -> None:
    # ibis reads HUGEINT as decimal(38, 0), and ids come back through Arrow's decimal128: one
    # id of 39 digits failed db.add ("Could not cast value ... to DECIMAL(38,0)") or, inserted
    # later, every poll of the table. Such rows are left out, as rows without an id are.
    big, edge = 2**127 - 1, 10**38 - 1
    duck.execute("CREATE TABLE docs (id HUGEINT PRIMARY KEY, text VARCHAR)")
    duck.execute(f"INSERT INTO docs VALUES (1, 'a'), ({big}, 'big'), ({edge}, 'edge')")
    with caplog.at_level(logging.WARNING, logger="reactive"), reactive.connect(duck.uri, poll_interval=0.05) as db:
        db.add(Listener(Model("len", predict=lambda ts: [len(t) for t in ts]), "text", "docs"), progress=False)
        assert "1 rows of table 'docs' have an id ('id') of more than 38 digits" in caplog.text
        assert outputs_by_source(db, "len__text") == {1: 1, edge: 4}
        db.cdc.start()
        duck.execute(f"INSERT INTO docs VALUES (2, 'bb'), ({10**38}, 'bigger')")
        duck.execute("UPDATE docs SET text = 'aaa' WHERE id = 1")
        assert db.cdc.wait_idle(timeout=30)
        assert outputs_by_source(db, "len__text") == {1: 3, 2: 2, edge: 4}
        assert db.errors() == [] and db.cdc.info()["source"]["failing_tables"] == {}


#: DuckDB id types reactive cannot key outputs by, and what each did before it was refused.
UNSUPPORTED_DUCKDB_IDS = {
    "UHUGEINT": "ibis cannot name it: the backfill failed after the snapshot was made",
    "TIMETZ": "ibis names it time: reads by id failed (TIME WITH TIME ZONE against TIME)",
    "TIMESTAMP_NS": "Python holds microseconds: ids a nanosecond apart were one, outputs deleted",
    "INTERVAL": "no index key of that type: DuckDB's own error at db.add",
    "VARCHAR[]": "the same",
    "STRUCT(a INTEGER)": "the same",
}


@pytest.mark.parametrize("id_type", list(UNSUPPORTED_DUCKDB_IDS))
def test_an_id_column_of_a_type_reactive_cannot_store_is_refused_at_add(duck: SQLClient, id_type: str) -> None:
    duck.execute(f"CREATE TABLE docs (id {id_type}, text VARCHAR)")  # id_column: no key needed
    with reactive.connect(duck.uri) as db:
        with pytest.raises(reactive.ConfigurationError, match="is of a type reactive cannot store ids of"):
            db.add(Listener(Model("len", predict=lambda ts: [len(t) for t in ts]), "text", "docs", id_column="id"))
        assert db.show() == []
    assert duck.execute("SELECT count(*) FROM duckdb_tables() WHERE table_name LIKE '_reactive_snapshot%'") == [(0,)]


@pytest.mark.parametrize("rows", [1, 32, 33])
def test_a_duckdb_upsert_from_values_stores_what_one_from_arrow_does(rows: int) -> None:
    # Up to Dialect.values_rows rows are bound as values, more are registered as Arrow: both
    # store the same odd values, and replace rows whose key exists.
    schema = "(id UBIGINT PRIMARY KEY, u UUID, t VARCHAR, ts TIMESTAMPTZ, d DECIMAL(10,2), v FLOAT[3], n DOUBLE)"
    rng = np.random.default_rng(3)
    data = pa.table(
        {
            "id": pa.array([2**64 - 1 - i for i in range(rows)], pa.uint64()),
            "u": pa.array([f"00000000-0000-0000-0000-{i:012d}" for i in range(rows)]),
            "t": pa.array(['é ✓ "q" \x00' if i % 2 else None for i in range(rows)]),
            "ts": pa.array([1_700_000_000_123_456 + i for i in range(rows)], pa.timestamp("us", tz="UTC")),
            "d": pa.array([None if i == 0 else decimal.Decimal("-0.01") * i for i in range(rows)]),
            "v": pa.FixedSizeListArray.from_arrays(pa.array(rng.standard_normal(3 * rows).astype(np.float32)), 3),
            "n": pa.array([float("inf") if i == 1 else 1e-300 * i for i in range(rows)]),
        }
    )
    stored = []
    for values_rows in (Dialect.values_rows, 0):  # values (up to the limit), then Arrow
        con = types.SimpleNamespace(con=duckdb.connect())
        con.con.execute(f"CREATE TABLE t {schema}")
        con.con.execute("INSERT INTO t (id, t) VALUES (18446744073709551615, 'old')")  # replaced
        dialect = Dialect()
        dialect.values_rows = values_rows
        dialect.upsert(con, "t", "id", data)
        stored.append(con.con.execute("SELECT * FROM t ORDER BY id").to_arrow_table().to_pylist())
        con.con.close()
    assert stored[0] == stored[1]
    assert len(stored[0]) == rows
    assert stored[0][-1]["t"] is None  # the key 2**64-1 replaced: its text is the new row's, None


def test_a_duckdb_fetch_of_plain_columns_gives_what_a_fetch_through_arrow_does() -> None:
    # The checkpoints' reads (the lease's, before every window) take DuckDB's own rows.
    con = types.SimpleNamespace(con=duckdb.connect())
    con.con.execute("CREATE TABLE s (k VARCHAR, data BLOB, is_text BOOLEAN, written DOUBLE, n BIGINT)")
    con.con.execute(
        "INSERT INTO s VALUES ('lease ✓', '\\xFF\\x00'::BLOB, false, 1.5e9, -1), (NULL, NULL, NULL, NULL, NULL)"
    )
    dialect = Dialect()
    sql = "SELECT * FROM s WHERE k = ? OR k IS NULL ORDER BY k"
    assert dialect.fetch_plain(con, sql, ["lease ✓"]) == dialect.fetch(con, sql, ["lease ✓"])
    assert dialect.fetch_plain(con, sql, ["lease ✓"])[0]["data"] == b"\xff\x00"
    con.con.close()


def test_a_first_backfill_looks_no_stored_output_up_and_a_resumed_one_does(duck: SQLClient) -> None:
    duck.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text VARCHAR)")
    duck.executemany("INSERT INTO docs VALUES (?, ?)", [(i, f"t{i}") for i in range(1, 6)])
    looked_up: list[list[Any]] = []
    with reactive.connect(duck.uri) as db:
        lookup = db.backend.outputs.output_fingerprints

        def recorded(identifier: str, ids: Any) -> Any:
            looked_up.append(list(ids))
            return lookup(identifier, ids)

        db.backend.outputs.output_fingerprints = recorded  # type: ignore[method-assign]
        db.add(Listener(model(), "text", "docs"), progress=False)
        assert looked_up == [] and len(db.outputs("len__text")) == 5
        db.remove("len__text")
        duck.execute("UPDATE docs SET text = 'changed' WHERE id = 3")
        db.add(Listener(model(), "text", "docs"), progress=False)  # outputs exist: only row 3 is stale
        assert looked_up == [[3]] and outputs_by_source(db, "len__text")[3] == 7.0


def test_live_inserts_look_up_only_the_rows_a_reconciliation_computed(duck: SQLClient) -> None:
    """A live insert of a row the backfill already computed is looked up (its output may be
    current); the other inserted rows certainly have none, and a batch of only those (a bulk
    insert) looks nothing up."""
    duck.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text VARCHAR)")
    duck.executemany("INSERT INTO docs VALUES (?, ?)", [(i, f"t{i}") for i in range(1, 4)])
    looked_up: list[list[Any]] = []

    def inserted(*ids: int) -> ChangePacket:
        return ChangePacket("docs", DBEvent.insert, ids, tuple({"id": i, "text": f"t{i}"} for i in ids))

    with reactive.connect(duck.uri, batch_rows=100) as db:
        lookup = db.backend.outputs.output_fingerprints

        def recorded(identifier: str, ids: Any) -> Any:
            looked_up.append(sorted(ids))
            return lookup(identifier, ids)

        db.backend.outputs.output_fingerprints = recorded  # type: ignore[method-assign]
        db.add(Listener(model(), "text", "docs"), progress=False)  # computes rows 1-3
        db.cdc.ensure_handler()
        # After a start every live insert is looked up until a batch finds none stored (a replay).
        for packet in (inserted(20), inserted(2, 10, 11), inserted(12, 13, 14), inserted(15, 3)):
            db.cdc.queue.put(packet)
            assert db.cdc.wait_idle(timeout=30)
        assert looked_up == [[20], [2], [3]]
        computed = (1, 2, 3, 10, 11, 12, 13, 14, 15, 20)
        assert outputs_by_source(db, "len__text") == {i: float(len(f"t{i}")) for i in computed}


def test_duckdb_reads_of_a_poll_do_not_wait_for_the_shared_connection(duck: SQLClient) -> None:
    """A poll's reads go through the polling thread's own DuckDB connection: a write holding
    the shared connection (the handler's window transaction) does not hold them up."""
    duck.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text VARCHAR)")
    duck.executemany("INSERT INTO docs VALUES (?, ?)", [(1, "a"), (2, "bb")])
    with reactive.connect(duck.uri) as db:
        db.add(Listener(model(), "text", "docs"), progress=False)
        table, found = db.table_info("docs"), []
        warm, held = threading.Event(), threading.Event()

        def poll() -> None:
            db.backend.snapshots.rows_with_fingerprints(table, [1])  # its statements and connection
            warm.set()
            held.wait(timeout=30)
            found.append(db.backend.snapshots.rows_with_fingerprints(table, [2, 1, 9]))

        reader = threading.Thread(target=poll, name="test-reader")
        reader.start()
        assert warm.wait(timeout=30)
        with db.backend.conn.lock:  # a write in progress on the shared connection
            held.set()
            reader.join(timeout=30)
            assert not reader.is_alive()
        rows, fingerprints = found[0]
        assert sorted(rows.column("id")) == [1, 2] and len(fingerprints) == 2


def test_a_threads_duckdb_reader_closes_when_the_thread_ends_and_all_close_with_the_datalayer(duck: SQLClient) -> None:
    duck.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text VARCHAR)")
    duck.execute("INSERT INTO docs VALUES (1, 'a')")
    with reactive.connect(duck.uri) as db:
        db.add(Listener(model(), "text", "docs"), progress=False)
        conn, table = db.backend.conn, db.table_info("docs")
        before = len(conn._readers)
        reader = threading.Thread(target=lambda: db.backend.source.read_table(table, [1]), name="test-reader")
        reader.start()
        reader.join(timeout=30)
        gc.collect()
        assert len(conn._readers) == before  # the thread's reader went with it
        db.backend.source.read_table(table, [1])
        kept = list(conn._readers)
        assert kept  # this thread's
    with pytest.raises(duckdb.ConnectionException):
        kept[0].con.execute("SELECT 1")


def test_a_duckdb_scan_streams_one_statement_through_a_connection_of_its_own(duck: SQLClient) -> None:
    """A scan (a backfill, a reconciliation) reads the table in one statement, page by page,
    through a connection of its own: the thread reads on meanwhile (a statement on the
    connection that streams would end the stream), and the scan's connection closes when the
    scan ends or is abandoned."""
    duck.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text VARCHAR)")
    duck.execute("INSERT INTO docs SELECT range, 't' || range FROM range(2500)")
    with reactive.connect(duck.uri) as db:
        source, table, conn = db.backend.source, db.table_info("docs"), db.backend.conn
        assert source.read_table(table, [7]) is not None  # this thread's reader exists
        known = set(conn._readers)
        pages = source.scan(table, columns=None, page_size=1000)
        first = next(pages)
        (scan,) = set(conn._readers) - known
        read = source.read_table(table, [2499, 3])  # between two pages, on this thread
        assert read is not None and sorted(read.column("text")) == ["t2499", "t3"]
        rest = list(pages)
        sizes = [len(page) for page in [first, *rest]]
        assert max(sizes) <= 1000 and sum(sizes) == 2500
        ids = [i for page in [first, *rest] for i in page.column("id")]
        assert sorted(ids) == list(range(2500))
        assert [row["text"] for row in first[:2]] == [f"t{first[0]['id']}", f"t{first[1]['id']}"]
        with pytest.raises(duckdb.ConnectionException):
            scan.con.execute("SELECT 1")  # closed at the end of the scan

        known.add(scan)
        abandoned = source.scan(table, columns=["text"], page_size=100)
        assert len(next(abandoned)) == 100
        (scan,) = set(conn._readers) - known
        abandoned.close()
        with pytest.raises(duckdb.ConnectionException):
            scan.con.execute("SELECT 1")


@pytest.mark.parametrize("name", ["__reactive_ids", "__reactive_upsert"])
def test_a_duckdb_table_named_like_reactives_own_views_is_followed(duck: SQLClient, name: str) -> None:
    """Statements read their ids and upserts from registered views; a user's table of such a
    name must not be hidden by them."""
    duck.execute(f'CREATE TABLE "{name}" (id INTEGER PRIMARY KEY, text VARCHAR)')
    duck.execute(f"INSERT INTO \"{name}\" VALUES (1, 'a'), (2, 'bb')")
    with reactive.connect(duck.uri, poll_interval=0.05) as db:
        db.add(Listener(Model("len", predict=lambda ts: [len(t) for t in ts], output_type="int64"), "text", name))
        db.cdc.start()
        duck.execute(f"UPDATE \"{name}\" SET text = 'ccc' WHERE id = 1")
        assert db.cdc.wait_idle(timeout=30)
        assert outputs_by_source(db, "len__text") == {1: 3, 2: 2}


def test_a_duckdb_poll_streams_changed_rows_with_its_diff_while_windows_are_written(
    duck: SQLClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On DuckDB a poll's changed rows come with its diff, one statement streamed batch by batch
    (no read by id after it). With a queue of 10 rows and batches of 5, the stream waits on a
    full queue while the handler writes and commits windows, snapshot included: every insert,
    update and delete still lands, each changed row computed once."""
    from reactive.backends.ibis import listener as polling

    monkeypatch.setattr(polling, "READ_ROWS", 1)  # batches of page_size rows
    duck.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text VARCHAR)")
    duck.execute("INSERT INTO docs SELECT range, 't' || range FROM range(200)")
    seen = Recorder(len)
    with reactive.connect(duck.uri, poll_interval=0.05, queue_rows=10, batch_rows=5, page_size=5) as db:
        db.add(Listener(Model("len", predict=seen, output_type="int64"), "text", "docs"), progress=False)
        monkeypatch.setattr(db.backend.snapshots, "rows_with_fingerprints", lambda *a: pytest.fail(f"read by id {a}"))
        seen.inputs.clear()
        duck.execute("INSERT INTO docs SELECT range, 'new ' || range FROM range(200, 300)")
        duck.execute("UPDATE docs SET text = 'changed ' || id WHERE id < 60")
        duck.execute("DELETE FROM docs WHERE id >= 150 AND id < 200")
        db.cdc.start()
        assert db.cdc.wait_idle(timeout=60)
        rows = dict(duck.execute("SELECT id, text FROM docs"))
        assert outputs_by_source(db, "len__text") == {i: len(t) for i, t in rows.items()}
        assert sorted(seen.inputs) == sorted(t for i, t in rows.items() if i < 60 or i >= 200)
        assert db.cdc.info()["queue"]["producer_blocked_seconds"] > 0  # the stream waited on the queue


def test_a_duckdb_poll_streams_rows_of_a_table_whose_columns_are_named_like_the_diffs_own(duck: SQLClient) -> None:
    """The streamed diff names its subquery ``c`` and the snapshot ``s`` and joins on ``row_id``
    and ``fingerprint``: a table with columns (and an id) of those names is followed as any other."""
    duck.execute('CREATE TABLE "s" ("row_id" INTEGER PRIMARY KEY, "c" VARCHAR, "fingerprint" BIGINT, "kind" VARCHAR)')
    duck.execute("INSERT INTO \"s\" VALUES (1, 'alpha', 7, 'x'), (2, 'be', 8, 'y')")
    with reactive.connect(duck.uri, poll_interval=0.05) as db:
        db.add(Listener(Model("len", predict=lambda ts: [len(t) for t in ts], output_type="int64"), "c", "s"))
        db.cdc.start()
        duck.execute("INSERT INTO \"s\" VALUES (3, 'gamma', 9, 'z')")
        duck.execute('UPDATE "s" SET "c" = \'alphabet\', "fingerprint" = 0 WHERE "row_id" = 1')
        duck.execute('DELETE FROM "s" WHERE "row_id" = 2')
        assert db.cdc.wait_idle(timeout=30)
        assert outputs_by_source(db, "len__c") == {1: 8, 3: 5}
        assert db.errors("len__c") == []


def test_stopping_while_a_duckdb_poll_streams_into_a_full_queue_returns_and_closes_the_stream(
    duck: SQLClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``db.cdc.stop()`` while the poll's stream waits on a full queue: the poller gives up its
    packets (the rows come again at the next start), the stream's connection is closed, and no
    thread is left (the suite checks that after every test)."""
    from reactive.backends.ibis import listener as polling

    monkeypatch.setattr(polling, "READ_ROWS", 1)
    duck.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text VARCHAR)")
    entered, release = threading.Event(), threading.Event()

    def slow(texts: list[str]) -> list[int]:
        entered.set()
        release.wait(timeout=30)
        return [len(t) for t in texts]

    with reactive.connect(duck.uri, poll_interval=0.05, queue_rows=10, batch_rows=5, page_size=5) as db:
        db.add(Listener(Model("len", predict=slow, output_type="int64"), "text", "docs"), progress=False)
        readers = set(db.backend.conn._readers)
        duck.execute("INSERT INTO docs SELECT range, 't' || range FROM range(500)")
        db.cdc.start()
        assert entered.wait(timeout=30)  # the handler computes; the stream fills the queue behind it
        opened = [weakref.ref(reader) for reader in set(db.backend.conn._readers) - readers]
        release.set()
        db.cdc.stop()
        gc.collect()
        # The stream's connection and the stopped threads' own: closed, or gone with their thread.
        for reader in filter(None, (ref() for ref in opened)):
            with pytest.raises(duckdb.ConnectionException):
                reader.con.execute("SELECT 1")
    with reactive.connect(duck.uri, poll_interval=0.05) as db:
        db.add(Listener(Model("len", predict=lambda ts: [len(t) for t in ts], output_type="int64"), "text", "docs"))
        db.cdc.start()
        assert db.cdc.wait_idle(timeout=60)
        assert outputs_by_source(db, "len__text") == {i: len(f"t{i}") for i in range(500)}


def test_a_duckdb_map_reaches_the_model_as_a_dict(duck: SQLClient) -> None:
    # Arrow reads a MAP as a list of key-value pairs, which is what models got; every other
    # backend hands them a document or a JSON object as a dict (and DuckDB's own client does).
    duck.execute(
        "CREATE TABLE docs (id INTEGER PRIMARY KEY, m MAP(VARCHAR, INTEGER), s STRUCT(n MAP(VARCHAR, INTEGER)))"
    )
    duck.execute("INSERT INTO docs VALUES (1, MAP {'x': 1, 'y': 2}, {'n': MAP {'k': 3}})")
    seen: dict[str, list[Any]] = {"m": [], "s": []}

    def model(field: str) -> Model:
        return Model(f"keys_{field}", predict=lambda values: [seen[field].append(v) or repr(v) for v in values])

    with reactive.connect(duck.uri, poll_interval=0.05) as db:
        for field in seen:
            db.add(Listener(model(field), field, "docs"), progress=False)
        db.cdc.start()
        duck.execute("INSERT INTO docs VALUES (3, MAP {'z': 4}, {'n': MAP {}})")
        duck.execute("UPDATE docs SET m = MAP {'x': 1, 'y': 5} WHERE id = 1")
        assert db.cdc.wait_idle(timeout=30)
        assert seen["m"] == [{"x": 1, "y": 2}, {"z": 4}, {"x": 1, "y": 5}]
        assert seen["s"] == [{"n": {"k": 3}}, {"n": {}}]
        assert outputs_by_source(db, "keys_m__m") == {1: "{'x': 1, 'y': 5}", 3: "{'z': 4}"}
        assert db.errors() == []


def test_a_duckdb_interval_reaches_the_model_and_table_monitors_as_a_timedelta(duck: SQLClient) -> None:
    """Arrow reads an INTERVAL as pyarrow's MonthDayNano, which is what models and monitors got;
    PostgreSQL's driver and DuckDB's own client give a timedelta (a month as 30 days)."""
    duck.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, span INTERVAL)")
    duck.execute("INSERT INTO docs VALUES (1, INTERVAL '1 day 2 hours 3.5 seconds'), (2, NULL)")
    seen: list[Any] = []
    monitored: list[Any] = []
    with reactive.connect(duck.uri, poll_interval=0.05) as db:
        model = Model("secs", predict=lambda spans: [seen.append(s) or s.total_seconds() for s in spans])
        db.add(Listener(model, "span", "docs"), progress=False)
        db.cdc.start()
        inserted = TableMonitor.Callback(TableMonitor.Callback.Type.INSERT_DECODED, lambda row: monitored.append(row))
        with TableMonitor.Client(db, "docs", [inserted]):
            duck.execute("INSERT INTO docs VALUES (3, INTERVAL '1 month 1 microsecond')")
            assert db.cdc.wait_idle(timeout=30)
            assert within(10, lambda: len(monitored) == 1)
        month = dt.timedelta(days=30, microseconds=1)
        assert seen == [dt.timedelta(days=1, seconds=7203, microseconds=500000), month]
        assert monitored == [{"id": 3, "span": month}]
        assert outputs_by_source(db, "secs__span") == {1: 93603.5, 3: month.total_seconds()}
        assert [e["source"] for e in db.errors()] == [2]  # NULL: no value for the key, as any NULL


def test_duckdb_intervals_inside_lists_and_structs_reach_the_model_as_timedeltas(duck: SQLClient) -> None:
    """Only a top-level INTERVAL was a timedelta: inside a list or a struct models got
    pyarrow's MonthDayNano, which has no total_seconds() (every row refused: AttributeError)."""
    duck.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, laps INTERVAL[], stage STRUCT(took INTERVAL, n INT))")
    duck.execute("INSERT INTO docs VALUES (1, [INTERVAL 1 SECOND, NULL], {'took': INTERVAL '1 month', 'n': 2})")
    with reactive.connect(duck.uri) as db:
        laps = Model("laps", predict=lambda xs: [[t.total_seconds() for t in x if t] for x in xs])
        db.add(Listener(laps, "laps", "docs"), progress=False)
        took = Model("took", predict=lambda xs: [x["took"].total_seconds() * x["n"] for x in xs])
        db.add(Listener(took, "stage", "docs"), progress=False)
        assert outputs_by_source(db, "laps__laps") == {1: [1.0]}
        assert outputs_by_source(db, "took__stage") == {1: 2 * 30 * 86400.0}
        assert db.errors() == []


def test_a_map_output_is_written_and_read_back_as_a_dict_on_duckdb(duck: SQLClient) -> None:
    # A window of up to 32 rows is written as bound Python values, where a map is a list of
    # pairs that DuckDB cannot cast to MAP ("Unimplemented type for cast"): every such window
    # failed, every time it came again. Maps now go through Arrow, and come back as dicts.
    duck.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text VARCHAR)")
    duck.execute("INSERT INTO docs VALUES (1, 'a'), (2, 'bb')")
    counts = Model("counts", predict=lambda xs: [{x: len(x)} for x in xs], output_type="map<string, int64>")
    with reactive.connect(duck.uri, poll_interval=0.05) as db:
        db.add(Listener(counts, "text", "docs"), progress=False)
        db.cdc.start()
        duck.execute("UPDATE docs SET text = 'ccc' WHERE id = 1")
        assert db.cdc.wait_idle(timeout=30)
        assert outputs_by_source(db, "counts__text") == {1: {"ccc": 3}, 2: {"bb": 2}}
        assert db.errors() == []


def test_duckdb_values_arrow_cannot_carry_reach_the_model_as_their_text(duck: SQLClient) -> None:
    # Through Arrow a model got BIT and BIGNUM values as DuckDB's internal bytes (b'\x04\xf5'
    # for '0101'), a UHUGEINT of 2**127 or more as a negative number (Decimal('-1') for the
    # largest) and a TIME WITH TIME ZONE without its offset. Each is read as its text now, in a
    # backfill and in a poll, and a change of the offset alone is a change.
    duck.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, b BIT, v BIGNUM, u UHUGEINT, tz TIMETZ, n INTEGER)")
    largest = 2**128 - 1
    duck.execute(f"INSERT INTO docs VALUES (1, '0101'::BIT, 12345678901234567890, {largest}, '12:00:00+02', 7)")
    seen: dict[str, list[Any]] = {"b": [], "v": [], "u": [], "tz": [], "n": []}

    def model(field: str) -> Model:
        return Model(f"m_{field}", predict=lambda values: [seen[field].append(v) or repr(v) for v in values])

    with reactive.connect(duck.uri, poll_interval=0.05) as db:
        for field in seen:
            db.add(Listener(model(field), field, "docs"), progress=False)
        assert {field: values[0] for field, values in seen.items()} == {
            "b": "0101",
            "v": "12345678901234567890",
            "u": str(largest),
            "tz": "12:00:00+02",
            "n": 7,  # other columns as they were
        }
        db.cdc.start()
        duck.execute(f"INSERT INTO docs VALUES (2, '1'::BIT, -5, {2**127}, '08:30:00-05', 8)")
        duck.execute("UPDATE docs SET tz = '12:00:00+03' WHERE id = 1")
        assert db.cdc.wait_idle(timeout=30)
        assert seen["u"][1:] == [str(2**127)] and seen["b"][1:] == ["1"] and seen["v"][1:] == ["-5"]
        assert sorted(seen["tz"][1:]) == ["08:30:00-05", "12:00:00+03"]
        assert outputs_by_source(db, "m_tz__tz") == {1: "'12:00:00+03'", 2: "'08:30:00-05'"}
        assert db.errors() == []


def test_duckdb_values_arrow_cannot_carry_inside_structs_lists_and_maps_reach_the_model_as_text(
    duck: SQLClient,
) -> None:
    # The same values inside a struct, list, array, map or union reached models as Arrow gave
    # them: DuckDB's internal bytes, and the largest UHUGEINT as Decimal('-1') (silently wrong).
    # Quoted field names and enum labels that spell those types are left alone.
    duck.execute("CREATE TYPE mood AS ENUM ('BIT', 'ok')")
    duck.execute(
        'CREATE TABLE docs (id INTEGER PRIMARY KEY, s STRUCT(b BIT, "BIT" INTEGER, m mood, l UHUGEINT[]),'
        " a BIT[2], mp MAP(VARCHAR, TIMETZ), u UNION(n INTEGER, v BIGNUM))"
    )
    largest = 2**128 - 1
    duck.execute(
        f"INSERT INTO docs VALUES (1, {{'b': '0101'::BIT, 'BIT': 3, 'm': 'BIT', 'l': [{largest}::UHUGEINT]}},"
        " ['01'::BIT, '1'::BIT], MAP {'k': '12:00:00+02'::TIMETZ},"
        " 12345678901234567890::BIGNUM::UNION(n INTEGER, v BIGNUM))"
    )
    seen: dict[str, list[Any]] = {"s": [], "a": [], "mp": [], "u": []}

    def model(field: str) -> Model:
        return Model(f"m_{field}", predict=lambda values: [seen[field].append(v) or 1 for v in values])

    with reactive.connect(duck.uri, poll_interval=0.05) as db:
        for field in seen:
            db.add(Listener(model(field), field, "docs"), progress=False)
        first = {field: values[0] for field, values in seen.items()}
        assert first == {
            "s": {"b": "0101", "BIT": 3, "m": "BIT", "l": [str(largest)]},
            "a": ["01", "1"],
            "mp": {"k": "12:00:00+02"},
            "u": "12345678901234567890",
        }
        db.cdc.start()
        duck.execute("UPDATE docs SET mp = MAP {'k': '12:00:00+03'::TIMETZ} WHERE id = 1")  # the offset alone
        assert db.cdc.wait_idle(timeout=30)
        assert seen["mp"][1:] == [{"k": "12:00:00+03"}]
        assert db.errors() == []

"""The engine end to end on DuckDB, SQLite and PostgreSQL, with writes by a foreign client."""

from __future__ import annotations

import datetime
import functools
import logging
import os
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any

import pytest
from conftest import Recorder, SQLClient, add_filtered_lengths, outputs_by_source, scanned_pages, within

import reactive
from reactive.components import Listener, Model
from reactive.reconcile import reconcile
from reactive.threads import reactive_threads


def make_docs(sql: SQLClient, rows: list[tuple[int, str | None, str]]) -> None:
    sql.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text VARCHAR(200), lang VARCHAR(10))")
    if rows:
        sql.executemany("INSERT INTO docs VALUES (?, ?, ?)", rows)


def connect(sql: SQLClient, **options) -> reactive.Datalayer:
    return reactive.connect(sql.uri, poll_interval=options.pop("poll_interval", 0.05), **options)


def test_backfill_then_inserts_updates_deletes_by_a_foreign_client(sql: SQLClient, recorder: Recorder) -> None:
    make_docs(sql, [(1, "alpha", "en"), (2, "beta", "en")])
    with connect(sql) as db:
        db.add(Listener(model=Model("tag", predict=recorder), key="text", select="docs"))
        assert outputs_by_source(db, "tag__text") == {1: "<alpha>", 2: "<beta>"}

        db.cdc.start()
        sql.execute("INSERT INTO docs VALUES (3, 'gamma', 'en')")
        sql.execute("UPDATE docs SET text = 'BETA' WHERE id = 2")
        sql.execute("DELETE FROM docs WHERE id = 1")
        assert db.cdc.wait_idle(timeout=30)
        assert outputs_by_source(db, "tag__text") == {2: "<BETA>", 3: "<gamma>"}

        info = db.cdc.info()
        stats = info["listeners"]["tag__text"]
        assert (stats["inserts"], stats["deletes"], stats["errors"]) == (3, 1, 0)
        assert info["source"]["tables"] == ["docs"]
        assert sorted(recorder.inputs) == ["BETA", "alpha", "beta", "gamma"]
        db.cdc.stop()
    assert not reactive_threads()


#: The generated columns each engine has.
GENERATED = {"duckdb": ["VIRTUAL"], "sqlite": ["VIRTUAL", "STORED"], "postgres": ["STORED"]}


def test_generated_columns_are_keys_like_any_other(sql: SQLClient, recorder: Recorder) -> None:
    # SQLite: ibis describes a table by pragma_table_info, which leaves generated columns out:
    # key= one said "table 'docs' has no column 'size'".
    for storage in GENERATED[sql.kind]:
        table = f"docs_{storage.lower()}"
        size = f"size INTEGER GENERATED ALWAYS AS (length(text)) {storage}"
        sql.execute(f"CREATE TABLE {table} (id INTEGER PRIMARY KEY, text TEXT, {size})")
        sql.execute(f"INSERT INTO {table} (id, text) VALUES (1, 'ab')")
        with connect(sql) as db:
            db.add(Listener(Model("tag", predict=recorder), "size", table, identifier=table))
            assert outputs_by_source(db, table) == {1: "<2>"}
            db.cdc.start()
            sql.execute(f"UPDATE {table} SET text = 'abcd' WHERE id = 1")
            sql.execute(f"INSERT INTO {table} (id, text) VALUES (2, 'abc')")
            assert db.cdc.wait_idle(timeout=30)
            assert outputs_by_source(db, table) == {1: "<4>", 2: "<3>"}


def test_update_of_another_column_does_not_recompute(sql: SQLClient, recorder: Recorder) -> None:
    make_docs(sql, [(1, "alpha", "en")])
    with connect(sql) as db:
        db.add(Listener(model=Model("tag", predict=recorder), key="text", select="docs"))
        db.cdc.start()
        sql.execute("UPDATE docs SET lang = 'de' WHERE id = 1")
        assert db.cdc.wait_idle(timeout=30)
        assert recorder.inputs == ["alpha"]
        assert db.cdc.info()["listeners"]["tag__text"]["skipped"] == 1


def test_filter_moves_rows_in_and_out(sql: SQLClient, recorder: Recorder) -> None:
    make_docs(sql, [(1, "one", "en"), (2, "two", "de")])
    with connect(sql) as db:
        db.add(Listener(Model("tag", predict=recorder), "text", "docs", filter={"lang": "en"}))
        assert outputs_by_source(db, "tag__text") == {1: "<one>"}
        db.cdc.start()
        sql.execute("UPDATE docs SET lang = 'en' WHERE id = 2")
        sql.execute("UPDATE docs SET lang = 'fr' WHERE id = 1")
        assert db.cdc.wait_idle(timeout=30)
        assert outputs_by_source(db, "tag__text") == {2: "<two>"}


@pytest.mark.parametrize("limit", [None, 1], ids=["outputs-in-memory", "outputs-past-memory"])
def test_a_filter_narrows_a_reconciliations_scan_and_rows_that_left_it_lose_their_outputs(
    sql: SQLClient, monkeypatch: pytest.MonkeyPatch, limit: int | None
) -> None:
    """A filtered listener's reconciliation read every row to compare each with the filter in
    Python: a tenant's 20 rows of 1,000 cost the whole table at each db.add. Its scan's SQL now
    leaves out rows that cannot match (text, whole numbers, NULL; a quote in the text). Rows
    that left or entered the filter while no process ran are found at the restart, as before;
    past the outputs held in memory (limit) every row is scanned, as an output is then kept
    when its row exists."""
    from reactive.backends.ibis.source import IbisSource
    from reactive.components import listener as listener_module

    if limit is not None:
        monkeypatch.setattr(listener_module, "reconcile", functools.partial(reconcile, memory_limit=limit))
    scanned = scanned_pages(monkeypatch, IbisSource)
    sql.execute(
        "CREATE TABLE docs (id INTEGER PRIMARY KEY, text VARCHAR(20), tenant INTEGER, lang VARCHAR(5), odd BOOLEAN)"
    )
    langs = ["en", "fr", "o'k", None]
    rows = [(i, f"t{i}", i % 50, langs[i % 4], i % 2 == 1) for i in range(1000)]
    sql.executemany("INSERT INTO docs VALUES (?, ?, ?, ?, ?)", rows)
    filters = {
        "tenant": {"tenant": 7, "odd": True},
        "quoted": {"lang": "o'k", "tenant": 2},
        "nulls": {"lang": None, "tenant": 3},
    }

    with connect(sql) as db:
        first = add_filtered_lengths(db, filters)
    assert set(first["tenant"]) == {i for i in range(1000) if i % 50 == 7}
    assert set(first["quoted"]) == {i for i in range(1000) if i % 50 == 2 and i % 4 == 2}
    assert set(first["nulls"]) == {i for i in range(1000) if i % 50 == 3 and i % 4 == 3}
    assert sum(scanned) == 20 + 10 + 10  # nothing stored yet: held in memory either way
    sql.execute("UPDATE docs SET tenant = 8 WHERE id = 7")  # leaves the filter while nothing runs
    sql.execute("UPDATE docs SET tenant = 7, odd = TRUE WHERE id = 8")  # enters it
    sql.execute("UPDATE docs SET lang = 'en' WHERE id = 2")
    scanned.clear()
    with connect(sql) as db:
        again = add_filtered_lengths(db, filters)
    assert again["tenant"] == {i: len(f"t{i}") for i in [*first["tenant"], 8] if i != 7}
    assert set(again["quoted"]) == set(first["quoted"]) - {2}
    assert again["nulls"] == first["nulls"]
    # The rows matching now (the outputs of 7 and 2 found as no row's); past memory, every row.
    assert sum(scanned) == (3 * 1000 if limit else 20 + 9 + 10)


def test_a_chained_listener_filtering_a_json_output_by_text_finds_its_rows(sql: SQLClient) -> None:
    """An outputs table's _output is read decoded: a JSON output holding the text "spam" is
    stored as '"spam"'. Narrowing the chained listener's scan by the stored text (SQLite keeps
    JSON outputs as TEXT) would have left that row out; _output is compared in Python only."""
    make_docs(sql, [(1, "a", "en"), (2, "b", "en")])
    labels = {"a": {"label": "ham", "score": 0.5}, "b": "spam"}  # the first batch's dict fixes json
    with connect(sql) as db:
        db.add(Listener(Model("tag", predict=lambda xs: [labels[x] for x in xs]), "text", "docs"))
        assert db.backend.output_types.get("tag__text") == "json"
        flag = Model("flag", predict=lambda xs: ["!" for _ in xs])
        db.add(Listener(flag, "_output", "_outputs__tag__text", filter={"_output": "spam"}))
        assert outputs_by_source(db, "flag___output") == {2: "!"}


def test_a_row_inserted_and_deleted_between_polls_computes_nothing(duck: SQLClient, recorder: Recorder) -> None:
    make_docs(duck, [])
    # An hour between polls: only wait_idle triggers one, after both writes.
    with connect(duck, poll_interval=3600) as db:
        db.add(Listener(Model("tag", predict=recorder), "text", "docs"))
        db.cdc.start()
        assert db.cdc.wait_idle(timeout=30)
        duck.execute("INSERT INTO docs VALUES (1, 'short-lived', 'en'), (2, 'kept', 'en')")
        duck.execute("DELETE FROM docs WHERE id = 1")
        assert db.cdc.wait_idle(timeout=30)
        assert outputs_by_source(db, "tag__text") == {2: "<kept>"}
        assert "short-lived" not in recorder.inputs


def test_chained_listeners(sql: SQLClient) -> None:
    make_docs(sql, [(1, "a b c", "en")])
    with connect(sql) as db:
        words = Model("words", predict=lambda texts: [t.split() for t in texts])
        count = Model("count", predict=lambda lists: [len(x) for x in lists])
        db.add(Listener(words, "text", "docs"))
        db.add(Listener(count, "_output", "_outputs__words__text"))
        assert outputs_by_source(db, "count___output") == {1: 3}

        db.cdc.start()
        sql.execute("INSERT INTO docs VALUES (2, 'd e', 'en')")
        sql.execute("UPDATE docs SET text = 'x' WHERE id = 1")
        assert db.cdc.wait_idle(timeout=30)
        assert outputs_by_source(db, "words__text") == {1: ["x"], 2: ["d", "e"]}
        assert outputs_by_source(db, "count___output") == {1: 1, 2: 2}

        sql.execute("DELETE FROM docs WHERE id = 2")
        assert db.cdc.wait_idle(timeout=30)
        assert outputs_by_source(db, "count___output") == {1: 1}


def test_failing_rows_are_recorded_and_the_rest_proceed(sql: SQLClient) -> None:
    def fragile(texts: list[str]) -> list[str]:
        if any("bad" in t for t in texts):
            raise ValueError("cannot handle bad input")
        return [t.upper() for t in texts]

    make_docs(sql, [(i, "bad" if i in (3, 7) else f"ok{i}", "en") for i in range(1, 11)])
    with connect(sql) as db:
        model = Model("up", predict=fragile, batch_size=8, max_retries=1, retry_backoff=0.001)
        db.add(Listener(model, "text", "docs"))
        assert set(outputs_by_source(db, "up__text")) == {1, 2, 4, 5, 6, 8, 9, 10}
        errors = db.errors("up__text")
        assert sorted(e["source"] for e in errors) == [3, 7]
        assert all("cannot handle bad input" in e["error"] for e in errors)
        # An aware time in UTC on every backend (SQLite gave its ISO text).
        now = datetime.datetime.now(datetime.UTC)
        assert all(e["at"].tzinfo is datetime.UTC and abs(now - e["at"]).total_seconds() < 600 for e in errors)

        db.cdc.start()
        sql.execute("INSERT INTO docs VALUES (11, 'fine', 'en')")
        assert db.cdc.wait_idle(timeout=30)
        assert outputs_by_source(db, "up__text")[11] == "FINE"
        assert db.cdc.info()["handler"]["running"]


def test_clean_restart_processes_only_what_changed_while_down(sql: SQLClient) -> None:
    make_docs(sql, [(i, f"doc {i}", "en") for i in range(1, 6)])
    first = Recorder()
    with connect(sql) as db:
        db.add(Listener(Model("tag", predict=first), "text", "docs"))
        db.cdc.start()
        sql.execute("INSERT INTO docs VALUES (6, 'doc 6', 'en')")
        assert db.cdc.wait_idle(timeout=30)
    assert len(first.inputs) == 6

    sql.execute("INSERT INTO docs VALUES (7, 'doc 7', 'en')")
    sql.execute("UPDATE docs SET text = 'doc two' WHERE id = 2")
    sql.execute("UPDATE docs SET lang = 'de' WHERE id = 3")
    sql.execute("DELETE FROM docs WHERE id = 4")

    second = Recorder()
    with connect(sql) as db:
        db.add(Listener(Model("tag", predict=second), "text", "docs"))
        db.cdc.start()
        assert db.cdc.wait_idle(timeout=30)
        assert sorted(second.inputs) == ["doc 7", "doc two"]
        assert outputs_by_source(db, "tag__text") == {
            1: "<doc 1>",
            2: "<doc two>",
            3: "<doc 3>",
            5: "<doc 5>",
            6: "<doc 6>",
            7: "<doc 7>",
        }


def test_stop_drains_the_queue_and_leaves_no_thread(duck: SQLClient, recorder: Recorder) -> None:
    make_docs(duck, [])
    db = connect(duck)
    db.add(Listener(Model("tag", predict=recorder), "text", "docs"))
    db.cdc.start()
    duck.executemany("INSERT INTO docs VALUES (?, ?, 'en')", [(i, f"t{i}") for i in range(200)])
    assert db.cdc.wait_idle(timeout=30)
    assert reactive_threads()
    db.cdc.stop()
    assert not db.cdc.running
    assert not reactive_threads()
    assert len(db.outputs("tag__text")) == 200
    db.close()


def test_add_twice_is_a_no_op_and_remove_drops_outputs(duck: SQLClient, recorder: Recorder) -> None:
    make_docs(duck, [(1, "x", "en")])
    with connect(duck) as db:
        listener = Listener(Model("tag", predict=recorder), "text", "docs")
        assert db.add(listener) is listener
        assert db.add(Listener(Model("tag", predict=recorder), "text", "docs")) is listener
        assert recorder.inputs == ["x"]
        assert db.show() == [listener.describe()]
        with pytest.raises(reactive.ConfigurationError, match="another declaration"):
            db.add(Listener(Model("tag", predict=recorder), "text", "docs", filter={"lang": "de"}))
        db.remove("tag__text", drop_outputs=True)
        assert db.show() == []
        with pytest.raises(reactive.ConfigurationError, match="no listener"):
            db.outputs("tag__text")


def test_vectors_are_stored_as_native_arrays(sql: SQLClient) -> None:
    make_docs(sql, [(1, "ab", "en")])
    with connect(sql) as db:
        embed = Model("emb", predict=lambda texts: [[float(len(t)), 0.5] for t in texts])
        db.add(Listener(embed, "text", "docs"))
        assert outputs_by_source(db, "emb__text") == {1: [2.0, 0.5]}
    if sql.kind == "duckdb":
        [(column_type,)] = sql.execute(
            "SELECT data_type FROM information_schema.columns WHERE table_name = '_outputs__emb__text' "
            "AND column_name = '_output'"
        )
        assert column_type == "DOUBLE[]"
    elif sql.kind == "postgres":
        [(column_type,)] = sql.execute(
            "SELECT data_type FROM information_schema.columns WHERE table_name = '_outputs__emb__text' "
            "AND column_name = '_output'"
        )
        assert column_type == "ARRAY"
        [(values,)] = sql.execute('SELECT "_output" FROM "_outputs__emb__text"')
        assert values == [2.0, 0.5]
    else:
        # SQLite has no array type: JSON text, decoded by db.outputs.
        [(text,)] = sql.execute('SELECT "_output" FROM "_outputs__emb__text"')
        assert text == "[2.0, 0.5]"


def test_stop_wakes_a_poller_with_a_long_interval(duck: SQLClient, recorder: Recorder) -> None:
    make_docs(duck, [(1, "a", "en")])
    db = connect(duck, poll_interval=3600)
    db.add(Listener(Model("tag", predict=recorder), "text", "docs"))
    db.cdc.start()
    assert db.cdc.wait_idle(timeout=30)  # wakes the poller for one poll, then it waits an hour
    db.cdc.stop(timeout=30)
    assert not reactive_threads()
    db.close()


def test_in_memory_duckdb() -> None:
    with reactive.connect("duckdb://") as db:
        assert db.backend.uri == "duckdb://"
        assert db.cdc.wait_idle(timeout=1)


@pytest.mark.parametrize("kind", ["VIEW", "MATERIALIZED VIEW"])
def test_a_postgres_view_is_followed_by_its_id_column(pg_database: str, recorder: Recorder, kind: str) -> None:
    # A materialized view was said not to exist (information_schema, which ibis lists tables
    # from, leaves them out); its changes are those of each REFRESH.
    import psycopg

    with psycopg.connect(pg_database, autocommit=True) as client:
        client.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text TEXT)")
        client.execute("INSERT INTO docs VALUES (1, 'a'), (2, 'b')")
        client.execute(f"CREATE {kind} shown AS SELECT id, text FROM docs")
        refresh = (lambda: client.execute("REFRESH MATERIALIZED VIEW shown")) if "MATERIALIZED" in kind else None
        with reactive.connect(pg_database, poll_interval=0.05) as db:
            with pytest.raises(reactive.MissingIdColumnError, match="'shown' has no primary key"):
                db.add(Listener(Model("tag", predict=recorder), "text", "shown"))
            db.add(Listener(Model("tag", predict=recorder), "text", "shown", id_column="id"))
            assert outputs_by_source(db, "tag__text") == {1: "<a>", 2: "<b>"}
            db.cdc.start()
            client.execute("INSERT INTO docs VALUES (3, 'c')")
            client.execute("UPDATE docs SET text = 'B' WHERE id = 2")
            client.execute("DELETE FROM docs WHERE id = 1")
            if refresh is not None:
                refresh()
            assert db.cdc.wait_idle(timeout=30)
            assert outputs_by_source(db, "tag__text") == {2: "<B>", 3: "<c>"}


def test_a_postgres_materialized_view_s_id_column_type_is_checked(pg_database: str, recorder: Recorder) -> None:
    # information_schema.columns leaves materialized views out: any id type was taken.
    import psycopg

    with psycopg.connect(pg_database, autocommit=True) as client:
        client.execute("CREATE TYPE mood AS ENUM ('calm', 'cross')")
        client.execute("CREATE MATERIALIZED VIEW shown AS SELECT 'calm'::mood AS m, 'a' AS text")
        refused = pytest.raises(reactive.ConfigurationError, match=r"of a type reactive cannot store ids of \(mood\)")
        with reactive.connect(pg_database) as db, refused:
            db.add(Listener(Model("tag", predict=recorder), "text", "shown", id_column="m"))


def test_a_dropped_postgres_connection_is_reopened_and_nothing_is_lost(pg_database: str, recorder: Recorder) -> None:
    import psycopg

    with psycopg.connect(pg_database, autocommit=True) as client:
        client.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text TEXT)")
        client.execute("INSERT INTO docs VALUES (1, 'before')")
        with reactive.connect(pg_database, poll_interval=0.05) as db:
            db.add(Listener(Model("tag", predict=recorder), "text", "docs"))
            db.cdc.start()
            assert db.cdc.wait_idle(timeout=30)
            # The server drops reactive's connection (as a restart or an administrator would).
            [(dropped,)] = client.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            ).fetchall()
            assert dropped == 1
            client.execute("INSERT INTO docs VALUES (2, 'after')")
            client.execute("UPDATE docs SET text = 'BEFORE' WHERE id = 1")
            assert db.cdc.wait_idle(timeout=60)
            assert outputs_by_source(db, "tag__text") == {1: "<BEFORE>", 2: "<after>"}


class _Seen(logging.Handler):
    """Sets ``event`` at the first log record whose message holds ``text``."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text
        self.event = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.event.set()


def test_a_foreign_lock_on_a_postgres_table_holds_neither_stop_nor_info(pg_database: str, recorder: Recorder) -> None:
    # Another client holds ACCESS EXCLUSIVE on the watched table (ALTER TABLE, VACUUM FULL,
    # LOCK TABLE). The poll waited for it without end on the connection the lease and info()
    # use too: info() hung, stop() did not return, the lease lapsed. Now reactive's session has
    # a lock_timeout where the server set none: the poll fails, is retried, and nothing waits.
    import psycopg

    seen = _Seen("LockNotAvailable")
    logging.getLogger("reactive").addHandler(seen)
    try:
        with psycopg.connect(pg_database, autocommit=True) as client:
            client.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text TEXT)")
            client.execute("INSERT INTO docs VALUES (1, 'one')")
            with reactive.connect(pg_database, poll_interval=0.05) as db:
                db.add(Listener(Model("tag", predict=recorder), "text", "docs"))
                db.cdc.start()
                assert db.cdc.wait_idle(timeout=30)
                client.execute("INSERT INTO docs VALUES (2, 'two')")
                with psycopg.connect(pg_database) as holder:
                    holder.execute("LOCK TABLE docs IN ACCESS EXCLUSIVE MODE")
                    assert seen.event.wait(timeout=30), "the poll waited on the lock"
                    assert "lock timeout" in db.cdc.info()["source"]["last_error"]
                    db.cdc.stop()
                    holder.rollback()
                db.cdc.start()
                assert db.cdc.wait_idle(timeout=30)
                assert outputs_by_source(db, "tag__text") == {1: "<one>", 2: "<two>"}
    finally:
        logging.getLogger("reactive").removeHandler(seen)


def _answered(call: Callable[[], Any], guard: float = 20.0) -> Any:
    """What ``call()`` returns (or raises), run on a thread of its own; fails if it has not returned
    within ``guard`` seconds (a hang guard: the waits it guards against took 30 s each)."""
    outcome: list[tuple[bool, Any]] = []

    def run() -> None:
        try:
            outcome.append((True, call()))
        except BaseException as exc:
            outcome.append((False, exc))

    thread = threading.Thread(target=run, name="test-call", daemon=True)
    thread.start()
    thread.join(guard)
    assert not thread.is_alive(), f"{call} did not return within {guard} s"
    returned, value = outcome[0]
    if not returned:
        raise value
    return value


def test_a_foreign_exclusive_lock_on_a_sqlite_file_holds_neither_stop_nor_info(tmp_path) -> None:
    # Another client holds BEGIN EXCLUSIVE on the file. Each statement of reactive waited out
    # the driver's busy timeout (30 s), one after another, on the connection that info() and
    # stop() use too: info() took 60 s, stop() 60 s. Waits are now cut into slices: info()
    # answers with what it knows, and a stop waits for the lock about a second in all, releases
    # the window it cannot write, and leaves the lease to expire.
    path = tmp_path / "app.sqlite"
    client = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    client.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text TEXT)")
    client.execute("INSERT INTO docs VALUES (1, 'one')")
    computing, go = threading.Event(), threading.Event()

    def tag(texts: list[str]) -> list[str]:
        if "two" in texts:
            computing.set()
            go.wait(30)
        return [f"<{t}>" for t in texts]

    with reactive.connect(f"sqlite:///{path}", poll_interval=0.05) as db:
        db.add(Listener(Model("tag", predict=tag), "text", "docs"))
        db.cdc.start()
        assert db.cdc.wait_idle(timeout=30)
        client.execute("INSERT INTO docs VALUES (2, 'two')")
        assert computing.wait(30)  # its window computes; its write will find the file locked
        client.execute("BEGIN EXCLUSIVE")
        try:
            client.execute("INSERT INTO docs VALUES (3, 'three')")
            lease = _answered(db.cdc.info)["lease"]
            assert "database is locked" in lease["error"] and lease["holder"]["pid"] == os.getpid()
            go.set()
            _answered(db.cdc.stop)
            written = {row[0] for row in client.execute('SELECT "_source" FROM "_outputs__tag__text"')}
            positions = {row[0] for row in client.execute('SELECT "row_id" FROM "_reactive_snapshot__docs"')}
        finally:
            client.execute("COMMIT")
        assert positions <= written  # no position past an output not written
        db.cdc.start()
        assert db.cdc.wait_idle(timeout=30)
        assert outputs_by_source(db, "tag__text") == {1: "<one>", 2: "<two>", 3: "<three>"}
        client.execute("BEGIN EXCLUSIVE")
        try:
            db.cdc.publish()  # its thread reads each table for subscribers, and waits for the lock
            _answered(db.close)  # the stop, the feed, the connection
        finally:
            client.execute("COMMIT")
    client.close()


def test_sqlite_timeout_is_how_long_a_statement_waits_for_another_clients_lock(tmp_path) -> None:
    # sqlite3.connect's own option: it was dropped without a word (every wait was 30 s).
    path = tmp_path / "app.sqlite"
    client = sqlite3.connect(path, isolation_level=None)
    client.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text TEXT)")
    with pytest.raises(reactive.errors.ConfigurationError, match="timeout must be a number of seconds above 0"):
        reactive.connect(f"sqlite:///{path}", timeout="5")
    client.execute("INSERT INTO docs VALUES (1, 'one')")
    with reactive.connect(f"sqlite:///{path}", timeout=0.5) as db:
        client.execute("BEGIN IMMEDIATE")  # another client's write transaction
        try:
            # The lease cannot be taken while the lock is held: after 0.5 s, not 30, the process
            # waits as a standby (the guard is 10 s).
            _answered(lambda: db.add(Listener(Model("tag", predict=Recorder()), "text", "docs")), guard=10)
            assert not db.cdc.active
        finally:
            client.execute("ROLLBACK")
        db.cdc.start()
        assert within(30, lambda: db.cdc.active)  # the lease taken once the lock ended
        assert db.cdc.wait_idle(timeout=30)
        assert outputs_by_source(db, "tag__text") == {1: "<one>"}
    client.close()


def test_a_sqlite_file_replaced_under_the_process_is_said_not_followed(tmp_path, recorder: Recorder) -> None:
    # A restore moves the file away and puts another in its place. The process went on with the
    # file it had open: polls found nothing new and wait_idle said True, while the rows of the
    # file now at the path were never computed. Now each poll fails saying so, until the file
    # the process opened is back.
    path = tmp_path / "app.sqlite"
    client = sqlite3.connect(path, isolation_level=None)
    client.execute("PRAGMA journal_mode=WAL")
    client.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text TEXT)")
    client.execute("INSERT INTO docs VALUES (1, 'one')")
    client.close()
    seen = _Seen("was replaced under this process")
    logging.getLogger("reactive").addHandler(seen)
    try:
        with reactive.connect(f"sqlite:///{path}", poll_interval=0.05) as db:
            db.add(Listener(Model("tag", predict=recorder), "text", "docs"))
            db.cdc.start()
            assert db.cdc.wait_idle(timeout=30)
            path.rename(tmp_path / "moved.sqlite")
            restored = sqlite3.connect(path, isolation_level=None)
            restored.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text TEXT)")
            restored.execute("INSERT INTO docs VALUES (2, 'two')")
            restored.close()
            assert seen.event.wait(timeout=30), "the replaced file went unnoticed"
            assert "was replaced under this process" in db.cdc.info()["source"]["last_error"]
            path.unlink()
            (tmp_path / "moved.sqlite").rename(path)
            assert db.cdc.wait_idle(timeout=30)
            assert outputs_by_source(db, "tag__text") == {1: "<one>"}
    finally:
        logging.getLogger("reactive").removeHandler(seen)


def test_a_window_whose_transaction_is_lost_is_retried_and_settled_once(pg_database: str, recorder: Recorder) -> None:
    # The connection dies while a window's positions are saved, inside its transaction: the
    # window is rolled back and retried. Its packets are settled once, when it commits (they
    # were settled on each try, and the poller then waited forever for a negative count).
    import psycopg

    with psycopg.connect(pg_database, autocommit=True) as client:
        client.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text TEXT)")
        with reactive.connect(pg_database, poll_interval=0.05) as db:
            db.add(Listener(Model("tag", predict=recorder), "text", "docs"))
            db.cdc.start()
            listener = db.cdc.listener
            save = listener.save_positions
            tries = []

            def save_on_a_dropped_connection(positions):
                tries.append(list(positions))
                if len(tries) == 1:
                    client.execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                    )
                save(positions)

            listener.save_positions = save_on_a_dropped_connection
            client.execute("INSERT INTO docs VALUES (1, 'one'), (2, 'two')")
            assert db.cdc.wait_idle(timeout=60)
            assert len(tries) >= 2 and tries[0] == tries[1]  # the same window, tried again
            assert db.cdc.info()["source"]["in_flight"] == 0
            client.execute("INSERT INTO docs VALUES (3, 'three')")
            assert db.cdc.wait_idle(timeout=60)  # the poller goes on
            assert db.cdc.info()["source"]["in_flight"] == 0
            assert outputs_by_source(db, "tag__text") == {1: "<one>", 2: "<two>", 3: "<three>"}


def test_a_dropped_table_stops_alone_and_is_reported(sql: SQLClient, recorder: Recorder) -> None:
    """Each watched table fails alone: dropping one leaves the others followed."""
    for name in ("a", "b"):
        sql.execute(f"CREATE TABLE {name} (id INTEGER PRIMARY KEY, text VARCHAR(100))")
        sql.execute(f"INSERT INTO {name} VALUES (1, '{name} one')")
    with connect(sql) as db:
        for name in ("a", "b"):
            db.add(Listener(Model(name, predict=recorder), "text", name))
        db.cdc.start()
        assert db.cdc.wait_idle(timeout=30)
        sql.execute("DROP TABLE a")
        sql.execute("INSERT INTO b VALUES (2, 'b two')")
        assert db.cdc.wait_idle(timeout=30)
        assert outputs_by_source(db, "b__text") == {1: "<b one>", 2: "<b two>"}
        info = db.cdc.info()
        assert info["stopped_tables"] == {"a": "dropped"}
        assert info["source"]["tables"] == ["b"]
        # The outputs of the dropped table are kept, as on MongoDB.
        assert outputs_by_source(db, "a__text") == {1: "<a one>"}
        sql.execute("INSERT INTO b VALUES (3, 'b three')")
        assert db.cdc.wait_idle(timeout=30)
        assert outputs_by_source(db, "b__text")[3] == "<b three>"


def test_a_chain_on_the_outputs_of_a_long_identifier(duck: SQLClient) -> None:
    """A long identifier's outputs table is named with a hash: the chain still finds its listener."""
    make_docs(duck, [(1, "a b c", "en")])
    words = Recorder(lambda text: text.split())
    counts = Recorder(len)
    with connect(duck) as db:
        first = db.add(Listener(Model("words", predict=words), "text", "docs", identifier="w" * 70))
        assert first.outputs_table != f"_outputs__{'w' * 70}"  # shortened
        db.add(Listener(Model("count", predict=counts), "_output", first.outputs_table))
        db.cdc.start()
        duck.execute("INSERT INTO docs VALUES (2, 'd e', 'en')")
        assert db.cdc.wait_idle(timeout=30)
        assert outputs_by_source(db, "count___output") == {1: 3, 2: 2}
        assert counts.inputs == [["a", "b", "c"], ["d", "e"]]  # each computed once: the chain is not polled
        assert db.cdc.info()["source"]["tables"] == ["docs"]


@pytest.mark.parametrize("ids", ["int", "text"])
def test_a_sqlite_poll_in_id_ranges_sees_every_change_at_the_edges(tmp_path, monkeypatch, ids: str) -> None:
    # SQLite blocks writers while a statement reads: its polls diff a range of ids at a time.
    # Three rows per range here, so inserts, updates and deletes fall on every edge, below
    # the first id and past the last.
    import sqlite3

    from reactive.backends.ibis.dialects import SQLiteDialect

    monkeypatch.setattr(SQLiteDialect, "diff_range_rows", 3)
    path = tmp_path / "r.sqlite"
    client = sqlite3.connect(str(path), isolation_level=None)
    kind = "INTEGER" if ids == "int" else "TEXT"
    key = (lambda i: i) if ids == "int" else (lambda i: f"k{i:03d}")
    client.execute(f"CREATE TABLE docs (id {kind} PRIMARY KEY, text TEXT)")
    client.executemany("INSERT INTO docs VALUES (?, ?)", [(key(i), f"t{i}") for i in range(10, 30)])
    recorder = Recorder()
    with reactive.connect(f"sqlite:///{path}", poll_interval=0.05) as db:
        db.add(Listener(model=Model("tag", predict=recorder), key="text", select="docs"))
        db.cdc.start()
        client.executemany("INSERT INTO docs VALUES (?, ?)", [(key(i), f"new{i}") for i in (1, 2, 35, 40)])
        client.executemany("UPDATE docs SET text = ? WHERE id = ?", [(f"u{i}", key(i)) for i in (10, 12, 13, 29)])
        client.executemany("DELETE FROM docs WHERE id = ?", [(key(i),) for i in (11, 15, 16, 28)])
        assert db.cdc.wait_idle(timeout=30)
        expected = {row_id: f"<{text}>" for row_id, text in client.execute("SELECT id, text FROM docs")}
        assert outputs_by_source(db, "tag__text") == expected
        client.execute("DELETE FROM docs WHERE id = ?", (key(40),))  # the last id, in the open range
        client.execute("DELETE FROM docs WHERE id = ?", (key(1),))  # the first
        assert db.cdc.wait_idle(timeout=30)
        assert key(40) not in outputs_by_source(db, "tag__text") and len(db.outputs("tag__text")) == 18
    client.close()


def test_float32_vectors_read_back_as_written_on_every_sql_backend(sql: SQLClient) -> None:
    """Vectors are native arrays on DuckDB and PostgreSQL and JSON text on SQLite (written from
    the whole block at once): every backend gives back the same floats, tiny, huge and -0.0."""
    import numpy as np

    make_docs(sql, [(i, f"t{i}", "en") for i in range(1, 4)])
    rng = np.random.default_rng(7)
    vectors = {
        f"t{i}": (rng.standard_normal(16) * 10.0 ** rng.integers(-30, 30, 16)).astype(np.float32) for i in range(1, 5)
    }
    vectors["t1"][:3] = [-0.0, 3.4e38, 1e-38]
    model = Model("vec", predict=lambda texts: [vectors[t] for t in texts], output_type="array<float32>")
    with connect(sql) as db:
        db.add(Listener(model, "text", "docs"), progress=False)
        db.cdc.start()
        sql.execute("INSERT INTO docs VALUES (4, 't4', 'en')")
        assert db.cdc.wait_idle(timeout=30)
        stored = outputs_by_source(db, "vec__text")
    assert stored == {i: vectors[f"t{i}"].tolist() for i in range(1, 5)}
    if sql.kind == "sqlite":
        [(text,)] = sql.execute('SELECT "_output" FROM "_outputs__vec__text" WHERE "_source" = 1')
        assert text.startswith("[-0.0,3.3999999521443642e+38,")


def test_an_idle_sqlite_database_is_not_diffed_and_every_writer_is_seen(tmp_path, recorder: Recorder) -> None:
    # SQLite counts commits by other connections (PRAGMA data_version): while it stands still,
    # a poll does not diff the table; reactive's own writes (outputs, snapshot, lease) leave it.
    path = tmp_path / "app.sqlite"
    sql = SQLClient("sqlite", f"sqlite:///{path}", sqlite3.connect(str(path), check_same_thread=False))
    make_docs(sql, [(1, "alpha", "en"), (2, "beta", "en"), (3, "gamma", "en")])
    try:
        with connect(sql) as db:
            db.add(Listener(model=Model("tag", predict=recorder), key="text", select="docs"))
            db.cdc.start()
            assert db.cdc.wait_idle(timeout=30)
            poller = db.cdc.listener
            diffs, skipped = poller.polls, poller.polls_skipped
            for _ in range(3):
                assert db.cdc.wait_idle(timeout=30)  # each waits for a poll that starts after it
            assert poller.polls == diffs and poller.polls_skipped >= skipped + 3
            assert db.cdc.info()["source"]["polls_skipped"] == poller.polls_skipped

            # A writer in another process, then another connection of this one.
            update = "import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); c.execute(sys.argv[2]); c.commit()"
            command = "UPDATE docs SET text = 'BETA' WHERE id = 2"
            subprocess.run([sys.executable, "-c", update, str(path), command], check=True, timeout=60)
            assert db.cdc.wait_idle(timeout=30)
            sql.execute("DELETE FROM docs WHERE id = 3")
            assert db.cdc.wait_idle(timeout=30)
            assert outputs_by_source(db, "tag__text") == {1: "<alpha>", 2: "<BETA>"}
            assert poller.polls >= diffs + 2

            # A full diff asked for runs though nobody wrote (and finds nothing).
            diffs = poller.polls
            poller.request_full_diff("docs")
            assert db.cdc.wait_idle(timeout=30)
            assert poller.polls == diffs + 1
            assert sorted(recorder.inputs) == ["BETA", "alpha", "beta", "gamma"]
    finally:
        sql.close()


def _snapshot_rows(sql: SQLClient) -> tuple[int, int]:
    """Rows and distinct ids of the snapshot of ``docs``."""
    ((rows, ids),) = sql.execute('SELECT count(*), count(DISTINCT row_id) FROM "_reactive_snapshot__docs"')
    return rows, ids


def _output_rows(sql: SQLClient, table: str = "_outputs__tag__text") -> tuple[int, int]:
    """Rows and distinct sources of an outputs table."""
    ((rows, ids),) = sql.execute(f'SELECT count(*), count(DISTINCT "_source") FROM "{table}"')
    return rows, ids


@pytest.mark.parametrize(("id_type", "keyed"), [("INTEGER", False), ("VARCHAR", True)])
def test_duckdb_snapshots_and_outputs_have_a_key_only_where_ids_are_text(
    duck: SQLClient, id_type: str, keyed: bool
) -> None:
    # Without a key a window moves the snapshot, and writes its outputs, by a delete of its ids
    # and an insert: every row stays there once, through updates in window after window,
    # deletes and inserts.
    duck.execute(f"CREATE TABLE docs (id {id_type} PRIMARY KEY, text VARCHAR)")
    duck.executemany("INSERT INTO docs VALUES (?, ?)", [(i, f"v{i}") for i in range(1, 101)])
    with connect(duck) as db:
        db.add(Listener(Model("tag", predict=lambda xs: [f"<{x}>" for x in xs]), "text", "docs"))
        assert db.backend.conn.keyed("_reactive_snapshot__docs") is keyed
        assert db.backend.conn.keyed("_outputs__tag__text") is keyed
        db.cdc.start()
        for _ in range(3):
            duck.execute("UPDATE docs SET text = text || '!' WHERE id IN (2, 3, 50)")
            assert db.cdc.wait_idle(timeout=30)
        duck.execute("DELETE FROM docs WHERE id IN (3, 4)")
        duck.executemany("INSERT INTO docs VALUES (?, ?)", [(i, f"v{i}") for i in range(101, 141)])
        assert db.cdc.wait_idle(timeout=30)
        expected = {r[0]: f"<{r[1]}>" for r in duck.execute("SELECT id, text FROM docs")}
        assert outputs_by_source(db, "tag__text") == expected
        assert expected["2" if keyed else 2] == "<v2!!!>" and 3 not in expected and "3" not in expected
        assert _snapshot_rows(duck) == (138, 138)
        assert _output_rows(duck) == (138, 138)
        # A listener chained on the outputs finds their rows by _source, key or not.
        db.add(Listener(Model("size", predict=lambda xs: [len(x) for x in xs]), "_output", "_outputs__tag__text"))
        duck.execute("UPDATE docs SET text = 'longer text' WHERE id = 2")
        assert db.cdc.wait_idle(timeout=30)
        sizes = outputs_by_source(db, "size___output")
        assert len(sizes) == 138 and sizes["2" if keyed else 2] == len("<longer text>")
        assert _output_rows(duck, "_outputs__size___output") == (138, 138)


def test_a_duckdb_snapshot_and_outputs_made_with_their_key_before_keep_it(duck: SQLClient) -> None:
    # Tables an earlier version made (integer ids, keyed): written by upserts as before.
    duck.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text VARCHAR)")
    duck.executemany("INSERT INTO docs VALUES (?, ?)", [(1, "a"), (2, "b"), (3, "c")])
    duck.execute('CREATE TABLE "_reactive_snapshot__docs" (row_id INTEGER PRIMARY KEY, fingerprint UBIGINT)')
    duck.execute(
        'CREATE TABLE "_outputs__tag__text" ("_source" INTEGER PRIMARY KEY, "_output" VARCHAR, "_fingerprint" BIGINT)'
    )
    with connect(duck) as db:
        db.add(Listener(Model("tag", predict=lambda xs: [f"<{x}>" for x in xs]), "text", "docs"))
        db.cdc.start()
        assert db.cdc.wait_idle(timeout=30)  # its first poll: every row is new to the empty snapshot
        duck.execute("UPDATE docs SET text = 'B' WHERE id = 2")
        assert db.cdc.wait_idle(timeout=30)
        assert outputs_by_source(db, "tag__text") == {1: "<a>", 2: "<B>", 3: "<c>"}
        assert db.backend.conn.keyed("_reactive_snapshot__docs")
        assert db.backend.conn.keyed("_outputs__tag__text")
        assert _snapshot_rows(duck) == (3, 3)
        assert _output_rows(duck) == (3, 3)

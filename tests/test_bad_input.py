"""Bad input: a clear error, and nothing lost."""

from __future__ import annotations

import dataclasses as dc
import datetime as dt
import enum
import logging
import queue
import re
import sqlite3
from decimal import Decimal
from pathlib import Path
from typing import Any
from uuid import UUID

import numpy as np
import pandas as pd
import psycopg
import pyarrow as pa
import pydantic
import pytest
from conftest import Recorder, SQLClient, add_constant_listeners, outputs_by_source, types_of

import reactive
from reactive import TableMonitor
from reactive.components import Listener, Model
from reactive.status import database_status
from reactive.threads import reactive_threads

Type = TableMonitor.Callback.Type


def test_select_of_a_missing_table_fails_at_add(sql: SQLClient, recorder: Recorder) -> None:
    with reactive.connect(sql.uri) as db:
        with pytest.raises(reactive.TableNotFoundError, match="'nope' does not exist"):
            db.add(Listener(Model("m", predict=recorder), "text", "nope"))
        assert db.show() == []


def test_a_name_that_differs_only_in_case_is_named_in_the_error(pg_database: str, recorder: Recorder) -> None:
    # PostgreSQL folds unquoted names: CREATE TABLE Docs (..., Text ...) makes docs and text, and
    # select="Docs" said only that the table does not exist.
    with psycopg.connect(pg_database, autocommit=True) as client:
        client.execute("CREATE TABLE Docs (id INTEGER PRIMARY KEY, Text TEXT)")
    with reactive.connect(pg_database) as db:
        with pytest.raises(reactive.TableNotFoundError, match="did you mean 'docs'"):
            db.add(Listener(Model("m", predict=recorder), "text", "Docs"))
        with pytest.raises(
            reactive.ConfigurationError, match=r"no column 'Text' \(columns: id, text\); did you mean 'text'"
        ):
            db.add(Listener(Model("m", predict=recorder), "Text", "docs"))
        assert db.show() == []


def test_a_postgres_table_of_another_schema_is_followed_through_the_search_path(pg_database: str) -> None:
    # A table name is taken whole: 'app.docs' is not schema app's table docs, and the error says
    # how to follow that one (reactive's own tables then go to that schema too).
    import psycopg

    with psycopg.connect(pg_database, autocommit=True) as client:
        client.execute("CREATE SCHEMA app")
        client.execute("CREATE TABLE app.docs (id INTEGER PRIMARY KEY, text TEXT)")
        client.execute("INSERT INTO app.docs VALUES (1, 'a')")
        hint = r"select 'docs' and put the schema first in the search path"
        with reactive.connect(pg_database) as db, pytest.raises(reactive.TableNotFoundError, match=hint):
            db.add(Listener(Model("m", predict=Recorder()), "text", "app.docs"))
        with reactive.connect(f"{pg_database}?options=-csearch_path%3Dapp", poll_interval=0.05) as db:
            db.add(Listener(Model("m", predict=Recorder()), "text", "docs"))
            db.cdc.start()
            client.execute("INSERT INTO app.docs VALUES (2, 'b')")
            assert db.cdc.wait_idle(timeout=30)
            assert outputs_by_source(db, "m__text") == {1: "<a>", 2: "<b>"}
        [(schema,)] = client.execute(
            "SELECT table_schema FROM information_schema.tables WHERE table_name = '_outputs__m__text'"
        ).fetchall()
        assert schema == "app"
        # A search path whose first schema lacks the table: "does not exist", although a plain
        # SELECT finds it in the next schema; the error now names where it is.
        hint = r"a table 'docs' is in schema 'app': reactive follows the tables of the first schema"
        with (
            reactive.connect(f"{pg_database}?options=-csearch_path%3Dpublic,app") as db,
            pytest.raises(reactive.TableNotFoundError, match=hint),
        ):
            db.add(Listener(Model("m", predict=Recorder()), "text", "docs"))


def test_reactives_own_tables_cannot_be_followed(sql: SQLClient, recorder: Recorder) -> None:
    # Each was taken: a listener on the checkpoints computed every save of a position (it never
    # settled), one on the errors could feed itself a failing row's record.
    sql.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text TEXT)")
    sql.execute("INSERT INTO docs VALUES (1, 'a')")
    with reactive.connect(sql.uri, poll_interval=0.05) as db:
        db.add(Listener(Model("m", predict=recorder), "text", "docs"))
        db.cdc.start()
        assert db.cdc.wait_idle(timeout=30)
        for table, id_column in [
            ("_reactive_checkpoints", "section"),
            ("_reactive_errors", "source"),
            ("_reactive_snapshot__docs", "row_id"),
        ]:
            own = rf"'{table}' cannot be followed: it is reactive's own"
            with pytest.raises(reactive.ConfigurationError, match=own):
                db.add(Listener(Model("own", predict=recorder), "text", table, id_column=id_column))
            with pytest.raises(reactive.ConfigurationError, match=rf"'{table}' cannot be followed"):
                TableMonitor.Client(db, table, [TableMonitor.Callback(Type.UPDATED, print)])
        assert [c["identifier"] for c in db.show()] == ["m__text"]


def test_table_without_primary_key_says_what_to_pass(sql: SQLClient, recorder: Recorder) -> None:
    sql.execute("CREATE TABLE notes (note_id INTEGER, body VARCHAR(100))")
    sql.execute("INSERT INTO notes VALUES (1, 'hi')")
    with reactive.connect(sql.uri) as db:
        with pytest.raises(reactive.MissingIdColumnError, match=r"no primary key: pass .*id_column="):
            db.add(Listener(Model("m", predict=recorder), "body", "notes"))
        db.add(Listener(Model("m", predict=recorder), "body", "notes", id_column="note_id"))
        assert outputs_by_source(db, "m__body") == {1: "<hi>"}


def test_a_composite_primary_key_is_named_and_an_odd_named_table_keeps_its_key(
    sql: SQLClient, recorder: Recorder
) -> None:
    # The primary key is read from each engine's catalog, in key order, whatever the names.
    sql.execute('CREATE TABLE "it\'s ""odd""" (b INTEGER, a VARCHAR(10), body VARCHAR(100), PRIMARY KEY (a, b))')
    sql.execute('CREATE TABLE "odd ""too""" (doc_id INTEGER PRIMARY KEY, body VARCHAR(100))')
    sql.execute('INSERT INTO "odd ""too""" VALUES (7, \'hi\')')
    with reactive.connect(sql.uri) as db:
        with pytest.raises(reactive.MissingIdColumnError, match=r"has a composite primary key \(a, b\): pass "):
            db.add(Listener(Model("m", predict=recorder), "body", 'it\'s "odd"'))
        db.add(Listener(Model("m", predict=recorder), "body", 'odd "too"'))
        assert outputs_by_source(db, "m__body") == {7: "<hi>"}


def test_an_id_column_that_is_not_unique_is_refused_at_add_and_leaves_no_snapshot(
    sql: SQLClient, recorder: Recorder
) -> None:
    sql.execute("CREATE TABLE notes (note_id INTEGER, body VARCHAR(100))")
    sql.executemany("INSERT INTO notes VALUES (?, ?)", [(1, "a"), (2, "b"), (2, "c")])
    with reactive.connect(sql.uri) as db:
        listener = Listener(Model("m", predict=recorder), "body", "notes", id_column="note_id")
        with pytest.raises(reactive.ConfigurationError, match=r"'note_id' of table 'notes' is not unique \(id 2 "):
            db.add(listener)
        assert not any(name.startswith("_reactive_snapshot") for name in db.backend.conn.con.list_tables())
        sql.execute("DELETE FROM notes WHERE body = 'c'")
        db.add(listener)  # the table made good: added, its snapshot made whole
        assert outputs_by_source(db, "m__body") == {1: "<a>", 2: "<b>"}


def test_an_id_column_beside_another_primary_key_is_still_checked_for_repeats(
    sql: SQLClient, recorder: Recorder
) -> None:
    """Only a table whose primary key is the id column itself skips the check for repeated ids."""
    sql.execute("CREATE TABLE notes (k INTEGER PRIMARY KEY, note_id INTEGER, body VARCHAR(100))")
    sql.executemany("INSERT INTO notes VALUES (?, ?, ?)", [(1, 1, "a"), (2, 2, "b"), (3, 2, "c")])
    with reactive.connect(sql.uri) as db:
        listener = Listener(Model("m", predict=recorder), "body", "notes", id_column="note_id")
        with pytest.raises(reactive.ConfigurationError, match=r"'note_id' of table 'notes' is not unique \(id 2 "):
            db.add(listener)


def test_a_table_is_followed_by_one_id_column_and_dropping_outputs_lets_it_change(
    sql: SQLClient, recorder: Recorder
) -> None:
    # Two listeners identifying a table's rows by two columns made every poll see the table
    # altered: both stopped, and wait_idle still said idle. Now the second is refused. A
    # listener removed with its outputs takes the table's snapshot with it (when nothing else
    # reads the table), so it can come back with an id column of another type.
    sql.execute("CREATE TABLE notes (a INTEGER, b VARCHAR(10), body VARCHAR(100))")
    sql.executemany("INSERT INTO notes VALUES (?, ?, ?)", [(1, "x", "one"), (2, "y", "two")])
    with reactive.connect(sql.uri, poll_interval=0.05) as db:
        db.add(Listener(Model("m", predict=recorder), "body", "notes", id_column="a"))
        with pytest.raises(reactive.ConfigurationError, match=r"followed by its id column 'a' \(for m__body\)"):
            db.add(Listener(Model("n", predict=recorder), "body", "notes", id_column="b"))
        db.add(Listener(Model("n", predict=recorder), "body", "notes", id_column="a"))  # the same column: fine
        db.cdc.start()
        sql.execute("INSERT INTO notes VALUES (3, 'z', 'three')")
        assert db.cdc.wait_idle(timeout=30)
        assert (
            outputs_by_source(db, "m__body")
            == outputs_by_source(db, "n__body")
            == {1: "<one>", 2: "<two>", 3: "<three>"}
        )
        db.remove("n__body")
        db.remove("m__body", drop_outputs=True)
        db.add(Listener(Model("m", predict=recorder), "body", "notes", id_column="b"))
        sql.execute("UPDATE notes SET body = 'ONE' WHERE a = 1")
        assert db.cdc.wait_idle(timeout=30)
        assert outputs_by_source(db, "m__body") == {"x": "<ONE>", "y": "<two>", "z": "<three>"}
        assert db.errors() == [] and db.cdc.info()["stopped_tables"] == {}


def test_an_id_column_of_another_type_at_a_restart_is_explained_and_followed_afresh(
    sql: SQLClient, recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    # The outputs name rows by the old ids: db.add says so (it failed the backfill with the
    # engine's type error), and once they are dropped the table's snapshot is made again.
    sql.execute("CREATE TABLE notes (a INTEGER, b VARCHAR(10), body VARCHAR(100))")
    sql.executemany("INSERT INTO notes VALUES (?, ?, ?)", [(1, "x", "one"), (2, "y", "two")])
    with reactive.connect(sql.uri) as db:
        db.add(Listener(Model("m", predict=recorder), "body", "notes", id_column="a"))
    with reactive.connect(sql.uri, poll_interval=0.05) as db:
        listener = Listener(Model("m", predict=recorder), "body", "notes", id_column="b")
        with pytest.raises(reactive.ConfigurationError, match=r"'_outputs__m__body'\) are keyed by ids of type !?int"):
            db.add(listener)
        sql.execute("DROP TABLE _outputs__m__body")
        with caplog.at_level(logging.WARNING, logger="reactive"):
            db.add(listener)
        assert "the snapshot of 'notes' holds ids of type" in caplog.text and "it is made again" in caplog.text
        db.cdc.start()
        sql.execute("UPDATE notes SET body = 'ONE' WHERE a = 1")
        assert db.cdc.wait_idle(timeout=30)
        assert outputs_by_source(db, "m__body") == {"x": "<ONE>", "y": "<two>"}
        assert db.errors() == [] and db.cdc.info()["stopped_tables"] == {}


def test_rows_whose_id_is_null_are_left_out_until_their_id_is_set(
    sql: SQLClient, recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    # An id column that is not a primary key may hold NULL, and no output or error can name such
    # a row: it is left out, and db.add says how many. (Two of them failed db.add on every
    # engine; on DuckDB one was seen inserted at every poll, its model called 20 times a second.)
    sql.execute("CREATE TABLE notes (note_id INTEGER, body VARCHAR(100))")
    sql.executemany("INSERT INTO notes VALUES (?, ?)", [(1, "a"), (None, "nobody"), (None, "nobody either")])
    with caplog.at_level(logging.WARNING, logger="reactive"), reactive.connect(sql.uri, poll_interval=0.05) as db:
        db.add(Listener(Model("m", predict=recorder), "body", "notes", id_column="note_id"))
        assert "2 rows of table 'notes' have no id ('note_id' is NULL): they are not followed" in caplog.text
        assert outputs_by_source(db, "m__body") == {1: "<a>"}
        # `reactive status` counts the rows followed: nothing is behind (it said a lag of 2).
        (listed,) = database_status(sql.uri)["listeners"]
        assert (listed["rows"], listed["outputs"], listed["lag"]) == (1, 1, 0)
        db.cdc.start()
        sql.execute("INSERT INTO notes VALUES (NULL, 'later'), (3, 'c')")
        assert db.cdc.wait_idle(timeout=30)
        sql.execute("INSERT INTO notes VALUES (4, 'd')")  # polls after the NULL row's
        assert db.cdc.wait_idle(timeout=30)
        assert outputs_by_source(db, "m__body") == {1: "<a>", 3: "<c>", 4: "<d>"}
        assert sorted(recorder.inputs) == ["a", "c", "d"] and db.errors() == []
        # Once its id is set, a row is followed; a row whose id becomes NULL loses its output.
        sql.execute("UPDATE notes SET note_id = 2 WHERE body = 'nobody'")
        sql.execute("UPDATE notes SET note_id = NULL WHERE note_id = 1")
        assert db.cdc.wait_idle(timeout=30)
        assert outputs_by_source(db, "m__body") == {2: "<nobody>", 3: "<c>", 4: "<d>"}
        assert sorted(recorder.inputs) == ["a", "c", "d", "nobody"] and db.errors() == []


def test_row_without_the_key_is_recorded_and_the_rest_proceed(sql: SQLClient, recorder: Recorder) -> None:
    sql.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text VARCHAR(100))")
    sql.executemany("INSERT INTO docs VALUES (?, ?)", [(1, "a"), (2, None), (3, "c")])
    with reactive.connect(sql.uri, poll_interval=0.05) as db:
        db.add(Listener(Model("m", predict=recorder), "text", "docs"))
        assert outputs_by_source(db, "m__text") == {1: "<a>", 3: "<c>"}
        [error] = db.errors("m__text")
        assert error["source"] == 2 and "no value for key 'text'" in error["error"]
        assert error["listener"] == "m__text" and error["table"] == "docs"

        db.cdc.start()
        sql.execute("UPDATE docs SET text = 'b' WHERE id = 2")
        assert db.cdc.wait_idle(timeout=30)
        assert outputs_by_source(db, "m__text") == {1: "<a>", 2: "<b>", 3: "<c>"}


def test_key_column_that_does_not_exist_fails_at_add(duck: SQLClient, recorder: Recorder) -> None:
    duck.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text VARCHAR)")
    with reactive.connect(duck.uri) as db, pytest.raises(reactive.ConfigurationError, match="no column 'body'"):
        db.add(Listener(Model("m", predict=recorder), "body", "docs"))


def test_a_filter_on_a_column_the_table_lacks_fails_at_add(sql: SQLClient, recorder: Recorder) -> None:
    """It matched no row, silently: a misspelt filter field looked like an empty table."""
    make_table(sql, "docs", [(1, "a")])
    with reactive.connect(sql.uri) as db:
        with pytest.raises(reactive.ConfigurationError, match="has no column 'lnag' to filter on"):
            db.add(Listener(Model("m", predict=recorder), "text", "docs", filter={"lnag": "en"}))
        assert db.show() == []


def test_a_filter_value_no_row_value_can_equal_is_said_once(sql: SQLClient, caplog: pytest.LogCaptureFixture) -> None:
    """Python's == says False across types, without a word: a filter on a DATE column written
    as text, or on a DECIMAL written as a float (0.1 is not 0.10), matched no row and said
    nothing, an empty table to the user. SQLite keeps dates as text: there a date object is
    the mismatch."""
    sql.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text VARCHAR(10), day DATE, price DECIMAL(10, 2))")
    for i in (1, 2, 3):
        sql.execute(f"INSERT INTO docs VALUES ({i}, 'a', '2024-01-02', 0.10)")
    day, text = dt.date(2024, 1, 2), "2024-01-02"
    right, wrong = (text, day) if sql.kind == "sqlite" else (day, text)
    with reactive.connect(sql.uri) as db, caplog.at_level(logging.WARNING, "reactive.components.listener"):
        db.add(Listener(Model("wrong", predict=lambda xs: xs), "text", "docs", filter={"day": wrong}))
        db.add(Listener(Model("right", predict=lambda xs: xs), "text", "docs", filter={"day": right}))
        db.add(Listener(Model("price", predict=lambda xs: xs), "text", "docs", filter={"price": 0.1}))
        told = [r.getMessage() for r in caplog.records]
        assert outputs_by_source(db, "wrong__text") == {}
        assert outputs_by_source(db, "right__text") == dict.fromkeys([1, 2, 3], "a")
        if sql.kind == "sqlite":  # NUMERIC affinity: 0.10 is stored as the float 0.1
            assert told == [
                f"listener 'wrong__text': filter {{'day': {day!r}}} matches no row whose 'day' holds a str: "
                "a str never equals a datetime.date: filter on a str, as the rows hold (such as '2024-01-02')"
            ]
            assert outputs_by_source(db, "price__text") == dict.fromkeys([1, 2, 3], "a")
            return
        assert told == [
            "listener 'wrong__text': filter {'day': '2024-01-02'} matches no row whose 'day' holds a "
            "datetime.date: a datetime.date never equals a str: filter on datetime.date(2024, 1, 2)",
            "listener 'price__text': filter {'price': 0.1} matches no row whose 'price' holds a decimal.Decimal: "
            "a float is not the decimal it was written as (0.1 is 0.10000000000000000555...): "
            "filter on Decimal('0.1')",
        ]
        assert outputs_by_source(db, "price__text") == {}


@pytest.mark.parametrize(
    "make",
    [
        lambda: Model("a\x00b", predict=list),
        lambda: Listener(Model("m", predict=list), "text", "docs", identifier="x\x00y"),
        lambda: Listener(Model("m", predict=list), "te\x00xt", "docs"),
        lambda: Listener(Model("m", predict=list), "text", "do\x00cs"),
    ],
    ids=["model", "identifier", "key", "select"],
)
def test_a_name_with_nul_is_refused_when_declared(make) -> None:
    """DuckDB's C code stops a table name at NUL: outputs went to another table and read back
    as none."""
    with pytest.raises(reactive.ConfigurationError, match="NUL"):
        make()


def test_a_component_is_named_by_its_identifier_or_itself_and_a_timeout_is_a_number(
    duck: SQLClient, recorder: Recorder
) -> None:
    # db.remove(listener) said "no component Listener('m__text', ...); added: m__text".
    duck.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text VARCHAR)")
    duck.execute("INSERT INTO docs VALUES (1, 'a')")
    with reactive.connect(duck.uri) as db:
        listener = db.add(Listener(Model("m", predict=recorder), "text", "docs"))
        assert db.outputs(listener) == db.outputs("m__text") == [{"_source": 1, "_output": "<a>"}]
        assert db.errors(listener) == [] and db.retry_errors(listener) == 0
        with pytest.raises(reactive.ConfigurationError, match=r"db.remove takes a component's identifier \(a str\)"):
            db.remove(3)  # type: ignore[arg-type]
        db.remove(listener, drop_outputs=True)
        assert db.show() == []
        with pytest.raises(reactive.ConfigurationError, match="no listener 'm__text'"):
            db.outputs(listener)
        # A misspelt name read as "no errors" (db.outputs said what was wrong).
        with pytest.raises(reactive.ConfigurationError, match="no listener 'm_text'; added: none"):
            db.errors("m_text")
        # A timeout that is not a number failed inside with "unsupported operand type(s)".
        for timeout in ("10", float("nan"), True):
            with pytest.raises(TypeError, match="wait_idle takes a timeout in seconds"):
                db.cdc.wait_idle(timeout=timeout)  # type: ignore[arg-type]
        assert db.cdc.wait_idle(timeout=0)


def test_a_closed_datalayer_says_so(duck: SQLClient, recorder: Recorder) -> None:
    """Used after close(), it failed in the driver ("Connection Error: Connection already
    closed!") or, for remove(), did nothing without a word."""
    make_table(duck, "docs", [(1, "a")])
    db = reactive.connect(duck.uri)
    db.add(Listener(Model("m", predict=recorder), "text", "docs"))
    db.close()
    db.close()  # again: nothing to do
    calls = [
        lambda: db.add(Listener(Model("n", predict=recorder), "text", "docs")),
        lambda: db.remove("m__text"),
        lambda: db.outputs("m__text"),
        lambda: db.errors("m__text"),
        lambda: db.retry_errors(),
        lambda: db.search("idx", [1.0]),
        lambda: db.cdc.start(),
        # These said nothing: listen did nothing for a table described before and failed in the
        # driver for another, wait_idle said True, publish and follow started threads.
        lambda: db.cdc.listen("docs"),
        lambda: db.cdc.listen("other"),
        lambda: db.cdc.wait_idle(1),
        lambda: db.cdc.publish(),
        lambda: db.cdc.follow("tcp://127.0.0.1:1", "docs"),
    ]
    for call in calls:
        with pytest.raises(reactive.ConfigurationError, match=r"is closed; reactive.connect\(\) makes a new one"):
            call()
    assert not reactive_threads()


@pytest.mark.parametrize(
    ("options", "says"),
    [
        ({"poll_interval": "1"}, "poll_interval must be a number of seconds above 0, not '1'"),
        ({"poll_interval": 0}, "poll_interval must be a number of seconds above 0"),
        ({"poll_interval": float("nan")}, "poll_interval must be a number of seconds above 0"),
        ({"queue_rows": 1.5}, "queue_rows must be a whole number of at least 1"),
        ({"page_size": 0}, "page_size must be a whole number of at least 1"),
        ({"pipeline": "2"}, "pipeline must be a whole number of at least 1"),
        ({"lease_ms": 10}, "lease_ms must be a number of milliseconds of at least 100"),
        ({"lease_ms": 1e30}, "at least 100 and at most 86,400,000 (a day), not 1e+30"),
        ({"lease": "yes"}, "lease must be True or False"),
    ],
    ids=[
        "poll str",
        "poll 0",
        "poll nan",
        "queue 1.5",
        "page 0",
        "pipeline str",
        "lease_ms 10",
        "lease_ms 1e30",
        "lease str",
    ],
)
def test_datalayer_settings_out_of_range_are_refused_at_connect(options: dict, says: str) -> None:
    # Each was accepted: a string poll_interval or pipeline then failed inside a thread,
    # poll_interval=0 polled back to back, lease_ms=10 lapsed between any two writes, and
    # lease_ms=1e30 ended the lease keeper's thread at its first wait (OverflowError).
    with pytest.raises(reactive.ConfigurationError, match=re.escape(says)):
        reactive.connect("duckdb://", **options)


@pytest.mark.parametrize(
    ("options", "says"),
    [
        ({"inactivity_timeout": "60"}, "inactivity_timeout must be a number of seconds above 0, not '60'"),
        ({"inactivity_timeout": -1}, "inactivity_timeout must be a number of seconds above 0, not -1"),
        ({"inactivity_timeout": float("nan")}, "inactivity_timeout must be a number of seconds above 0"),
        ({"reconcile_interval": "5"}, "reconcile_interval must be a number of seconds above 0, not '5'"),
        ({"connect_timeout": "10"}, "connect_timeout must be a number of seconds above 0, not '10'"),
        ({"connect_timeout": float("inf")}, "connect_timeout must be a finite number of seconds above 0"),
    ],
    ids=["inactivity str", "inactivity -1", "inactivity nan", "reconcile str", "connect str", "connect inf"],
)
def test_kinetica_settings_out_of_range_are_refused_at_connect(options: dict, says: str) -> None:
    # Accepted: a text or NaN ended the listener's maintenance thread without a word (a dropped
    # table never noticed, periodic reconciliations never run), a text connect_timeout failed
    # db.cdc.start() with a TypeError. Refused before anything connects (nothing listens there).
    with pytest.raises(reactive.ConfigurationError, match=re.escape(says)):
        reactive.connect("kinetica://127.0.0.1:1", **options)


def _kept(value: Any) -> tuple[type, Any]:
    return type(value), value


def test_settings_computed_with_numpy_are_taken_as_python_numbers(tmp_path: Path) -> None:
    """A whole number of numpy's (``np.int64``, what ``len`` of an array times something gives)
    was refused for every whole-number setting (``batch_size must be a whole number of at least
    1, not np.int64(64)``); it is taken, and kept as an ``int``, for every kind of setting."""
    from reactive.backends.base import VersionColumn
    from reactive.compute import RayCompute
    from reactive.feed.node import Node
    from reactive.handler import WindowRows

    model = Model(
        "m",
        predict=list,
        batch_size=np.int64(64),
        max_retries=np.int32(1),
        transient_retries=np.uint8(3),
        retry_backoff=np.float32(0.5),
        timeout=np.int64(5),
    )
    assert [_kept(getattr(model, name)) for name in ("batch_size", "max_retries", "transient_retries")] == [
        (int, 64),
        (int, 1),
        (int, 3),
    ]
    assert (_kept(model.retry_backoff), _kept(model.timeout)) == ((float, 0.5), (int, 5))
    assert _kept(Listener(model, "text", "docs", max_input_bytes=np.int64(1024)).max_input_bytes) == (int, 1024)
    settings = {"queue_rows": np.int64(100), "page_size": np.int32(10), "pipeline": np.int64(1)}
    with reactive.connect(
        f"duckdb:///{tmp_path / 'np.duckdb'}",
        poll_interval=np.int64(1),
        lease_ms=np.int64(5000),
        batch_rows=np.int64(100),
        **settings,
    ) as db:
        assert _kept(db.page_size) == (int, 10) and _kept(db.cdc.pipeline) == (int, 1)
        assert _kept(db.cdc.queue.max_rows) == (int, 100) and _kept(db.cdc.window_rows.floor) == (int, 100)
        assert _kept(db.cdc.lease.lease_ms) == (int, 5000)
        assert db.cdc.wait_idle(np.int64(5))
    assert _kept(WindowRows(np.int64(10), np.int64(20)).cap) == (int, 20)
    version = VersionColumn("rev", overlap=np.int64(5), full_diff_every=np.int64(0))
    assert (_kept(version.overlap), _kept(version.full_diff_every)) == ((int, 5), (int, 0))
    ray = RayCompute(actors=np.int64(2), num_gpus=np.float32(0.5), max_in_flight=np.int64(3))
    assert (_kept(ray.actors), _kept(ray.num_gpus), _kept(ray.max_in_flight)) == ((int, 2), (float, 0.5), (int, 3))
    node = Node(max_message_bytes=np.int64(4096), hwm=np.int64(0))
    assert _kept(node.max_message_bytes) == (int, 4096)


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (lambda: Model("m", predict=list, batch_size=np.float64(64.0)), "batch_size must be a whole number"),
        (lambda: Model("m", predict=list, batch_size=np.bool_(True)), "batch_size must be a whole number"),
        (
            lambda: Model("m", predict=list, max_retries=np.int64(-1)),
            "max_retries must be a whole number of at least 0",
        ),
        (lambda: Model("m", predict=list, timeout=np.float64("nan")), "timeout must be a number of seconds above 0"),
        (
            lambda: reactive.connect("duckdb://", page_size=np.int64(0)),
            "page_size must be a whole number of at least 1",
        ),
        (lambda: Listener(Model("m", predict=list), "t", "d", max_input_bytes=np.float32(1)), "max_input_bytes"),
    ],
    ids=["batch float", "batch bool", "retries -1", "timeout NaN", "page 0", "bytes float"],
)
def test_numpy_numbers_out_of_range_are_still_refused(make, says: str) -> None:
    with pytest.raises(reactive.ConfigurationError, match=says):
        make()


async def _async_predict(texts: list[str]) -> list[int]:
    return [len(t) for t in texts]


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (lambda: Model("m", predict=list, batch_size=1.5), "batch_size must be a whole number"),
        (lambda: Model("m", predict=list, batch_size=True), "batch_size must be a whole number"),
        (lambda: Model("m", predict=list, max_retries=-1), "max_retries must be a whole number of at least 0"),
        (lambda: Model("m", predict=list, transient_retries=0.5), "transient_retries must be a whole number"),
        (lambda: Model("m", predict=list, retry_backoff=-1), "retry_backoff must be a number of seconds"),
        (
            lambda: Model("m", predict=list, retry_backoff=1e12),
            "retry_backoff must be under 1e9 seconds, not 1000000000000.0",
        ),
        # A text failed with a TypeError comparing it; True was a timeout of one second.
        (lambda: Model("m", predict=list, timeout="5"), "timeout must be a number of seconds above 0, not '5'"),
        (lambda: Model("m", predict=list, timeout=True), "timeout must be a number of seconds above 0, not True"),
        (lambda: Model("m", predict=list, timeout=float("nan")), "timeout must be a number of seconds above 0"),
        (lambda: Model("m", predict=list, output_type=5), "output_type must be a type name"),
        (lambda: Listener(Model("m", predict=list), "text", "docs", max_input_bytes=0), "max_input_bytes must be"),
        (lambda: Listener(Model("m", predict=list), "text", "docs", max_input_bytes="10"), "max_input_bytes must be"),
        # Called on a thread, it returned a coroutine never awaited, and every row failed.
        (lambda: Model("m", predict=_async_predict), "predict is a coroutine function"),
    ],
    ids=[
        "batch 1.5",
        "batch True",
        "retries -1",
        "transient 0.5",
        "backoff -1",
        "backoff 1e12",
        "timeout text",
        "timeout True",
        "timeout NaN",
        "type 5",
        "bytes 0",
        "bytes str",
        "async",
    ],
)
def test_settings_out_of_range_are_refused_when_declared(make, says: str) -> None:
    """Each used to be accepted, and failed later on every row (a float batch size, a text
    byte limit) or behaved oddly (a negative backoff or retry count)."""
    with pytest.raises(reactive.ConfigurationError, match=says):
        make()


def test_an_output_type_that_is_not_a_type_fails_at_add(duck: SQLClient) -> None:
    make_table(duck, "docs", [(1, "a")])
    with (
        reactive.connect(duck.uri) as db,
        pytest.raises(reactive.ConfigurationError, match="output type 'bogus' is not a type"),
    ):
        db.add(Listener(Model("m", predict=list, output_type="array<bogus>"), "text", "docs"))


def test_wrong_output_count_is_a_clear_error_per_batch(sql: SQLClient) -> None:
    sql.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text VARCHAR(100))")
    sql.executemany("INSERT INTO docs VALUES (?, ?)", [(i, f"t{i}") for i in range(1, 6)])
    with reactive.connect(sql.uri) as db:
        db.add(Listener(Model("short", predict=lambda xs: xs[:-1], batch_size=5), "text", "docs"))
        assert db.outputs("short__text") == []
        errors = db.errors("short__text")
        assert sorted(e["source"] for e in errors) == [1, 2, 3, 4, 5]
        assert {e["error"] for e in errors} == {"model 'short' returned 4 outputs for 5 inputs"}
        assert db.cdc.info()["listeners"]["short__text"]["errors"] == 5


class _Frame:
    """What a data frame looks like to the check: it iterates over its column names."""

    columns = ("score",)

    def __iter__(self):
        return iter(self.columns)


@pytest.mark.parametrize(
    ("returned", "name"),
    [
        (lambda texts: "x" * len(texts), "str"),
        (lambda texts: b"x" * len(texts), "bytes"),
        (lambda texts: {t: 1 for t in texts}, "dict"),
        (lambda texts: set(range(len(texts))), "set"),
        (lambda texts: _Frame(), "_Frame"),
    ],
    ids=["text", "bytes", "a mapping", "a set", "a data frame"],
)
def test_a_model_returning_something_that_only_iterates_is_refused(duck: SQLClient, returned, name: str) -> None:
    """Each of these iterates, and with the right count (one input: one character, one key,
    one column name) would have been stored as the outputs."""
    duck.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text VARCHAR)")
    duck.execute("INSERT INTO docs VALUES (1, 'a')")
    with reactive.connect(duck.uri) as db:
        db.add(Listener(Model("m", predict=returned, max_retries=0), "text", "docs"))
        assert db.outputs("m__text") == []
        [error] = db.errors("m__text")
        assert error["error"] == f"model 'm' returned {name}, not a list of outputs"


@pytest.mark.parametrize("rows", [3, 40], ids=["few rows", "a column of rows"])
def test_a_value_python_cannot_hold_fails_its_row_alone(duck: SQLClient, rows: int) -> None:
    """DuckDB's date 'infinity' is past any datetime.date: converting the batch's rows to
    Python failed them all (and a large window's column, the whole window)."""
    duck.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, day DATE)")
    duck.execute(f"INSERT INTO docs SELECT i, DATE '2026-01-01' + CAST(i AS INTEGER) FROM range({rows}) t(i)")
    duck.execute("UPDATE docs SET day = 'infinity' WHERE id = 1")
    with reactive.connect(duck.uri, poll_interval=0.05) as db:
        db.add(Listener(Model("m", predict=lambda days: [d.day for d in days], max_retries=0), "day", "docs"))
        assert sorted(outputs_by_source(db, "m__day")) == [i for i in range(rows) if i != 1]
        [error] = db.errors("m__day")
        assert error["source"] == 1
        assert error["error"].startswith("the value of 'day' cannot be read in Python: OverflowError")
        db.cdc.start()
        duck.execute(f"INSERT INTO docs VALUES ({rows}, 'infinity'), ({rows + 1}, DATE '2026-02-03')")
        duck.execute("UPDATE docs SET day = DATE '2026-03-04' WHERE id = 1")
        assert db.cdc.wait_idle(timeout=30)
        outputs = outputs_by_source(db, "m__day")
        assert outputs[1] == 4 and outputs[rows + 1] == 3 and rows not in outputs
        assert [e["source"] for e in db.errors("m__day")] == [rows]


@pytest.mark.parametrize("sql", ["duckdb", "postgres"], indirect=True)  # SQLite has no infinite dates
def test_a_time_python_cannot_hold_in_any_column_fails_no_other_row(sql: SQLClient) -> None:
    """PostgreSQL: psycopg raised DataError for the whole read of a row holding 'infinity' (or a
    date before year 1) in any date or timestamp column, so one such row stopped every change
    of its table, the key's or not, until someone fixed the value. Now as on DuckDB: a value
    Python cannot hold fails only a row whose key it is."""
    sql.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text VARCHAR(20), seen DATE, stamp TIMESTAMP)")
    sql.execute(
        "INSERT INTO docs VALUES (1, 'one', '2026-01-01', '2026-01-01 00:00:00'),"
        " (2, 'two', 'infinity', '2026-01-01 00:00:00'), (3, 'three', '2026-01-01', '-infinity')"
    )
    with reactive.connect(sql.uri, poll_interval=0.05) as db:
        db.add(Listener(Model("len", predict=lambda texts: [len(t) for t in texts]), "text", "docs"))
        db.add(Listener(Model("year", predict=lambda days: [d.year for d in days], max_retries=0), "seen", "docs"))
        assert outputs_by_source(db, "len__text") == {1: 3, 2: 3, 3: 5}
        assert outputs_by_source(db, "year__seen") == {1: 2026, 3: 2026}
        [error] = db.errors("year__seen")
        assert error["source"] == 2 and error["error"].startswith("the value of 'seen' cannot be read in Python")
        db.cdc.start()
        sql.execute("UPDATE docs SET seen = 'infinity' WHERE id = 1")
        sql.execute("DELETE FROM docs WHERE id = 3")
        sql.execute("UPDATE docs SET text = 'deux' WHERE id = 2")
        sql.execute("INSERT INTO docs VALUES (4, 'four', '2027-01-01', 'infinity')")
        assert db.cdc.wait_idle(timeout=30)
        assert outputs_by_source(db, "len__text") == {1: 3, 2: 4, 4: 4}
        assert outputs_by_source(db, "year__seen") == {4: 2027}
        assert sorted(e["source"] for e in db.errors("year__seen")) == [1, 2]
        assert db.cdc.info()["source"]["failing_tables"] == {}


def test_none_outputs_are_stored_once_the_type_is_known_and_say_why_before(duck: SQLClient) -> None:
    # None is a stored output (a null) once the outputs' type is known; before any output fixes
    # it, there is nothing to store it as: the rows are recorded with why, and stored by a retry.
    duck.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text VARCHAR)")
    duck.execute("INSERT INTO docs VALUES (1, 'a'), (2, 'bb')")

    def label(texts: list[str]) -> list[int | None]:
        return [None if len(t) < 3 else len(t) for t in texts]

    with reactive.connect(duck.uri, poll_interval=0.05) as db:
        db.add(Listener(Model("m", predict=label), "text", "docs"))
        assert db.outputs("m__text") == []
        errors = db.errors("m__text")
        assert sorted(e["source"] for e in errors) == [1, 2]
        assert all("declare Model(output_type=...) to store None" in e["error"] for e in errors)
        db.cdc.start()
        duck.execute("INSERT INTO docs VALUES (3, 'ccc')")
        assert db.cdc.wait_idle(timeout=30)
        assert db.retry_errors("m__text") == 2
        assert outputs_by_source(db, "m__text") == {1: None, 2: None, 3: 3} and db.errors() == []
        db.add(Listener(Model("n", predict=lambda texts: [None] * len(texts), output_type="int64"), "text", "docs"))
        assert outputs_by_source(db, "n__text") == {1: None, 2: None, 3: None} and db.errors() == []


def test_tensors_are_stored_as_their_numbers_and_other_objects_refused(duck: SQLClient) -> None:
    # A model returning torch tensors (a batch, one per row, a scalar each, one with a graph)
    # had each stored as the text of its repr: {"__Tensor__": "tensor([1., 1., 1.])"}.
    import torch

    duck.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text VARCHAR)")
    duck.execute("INSERT INTO docs VALUES (1, 'a'), (2, 'bb')")

    class Label:
        pass

    models = {
        "batch": lambda xs: torch.ones((len(xs), 3)) * torch.tensor([len(x) for x in xs]).unsqueeze(1),
        "rows": lambda xs: [torch.full((2,), float(len(x))) for x in xs],
        "scalars": lambda xs: [torch.tensor(len(x)) for x in xs],
        "graph": lambda xs: torch.ones((len(xs), 2), requires_grad=True) * 2,
        "nested": lambda xs: [{"v": torch.ones(2), "n": len(x)} for x in xs],
        # A model run in half precision (common on a GPU): numpy has no bfloat16.
        "bf16": lambda xs: torch.tensor([[len(x), 0.5] for x in xs], dtype=torch.bfloat16),
        "half": lambda xs: [torch.tensor([len(x), 0.5], dtype=torch.float16) for x in xs],
        "arrow": lambda xs: pa.array([len(x) for x in xs]),
        "object": lambda xs: [{"label": Label()} for _ in xs],
    }
    with reactive.connect(duck.uri) as db:
        for name, predict in models.items():
            db.add(Listener(Model(name, predict=predict), "text", "docs"), progress=False)
        assert outputs_by_source(db, "batch__text") == {1: [1.0] * 3, 2: [2.0] * 3}
        assert outputs_by_source(db, "rows__text") == {1: [1.0, 1.0], 2: [2.0, 2.0]}
        assert outputs_by_source(db, "scalars__text") == {1: 1, 2: 2}
        assert outputs_by_source(db, "graph__text") == {1: [2.0, 2.0], 2: [2.0, 2.0]}
        assert outputs_by_source(db, "nested__text") == {1: {"v": [1.0, 1.0], "n": 1}, 2: {"v": [1.0, 1.0], "n": 2}}
        assert outputs_by_source(db, "arrow__text") == {1: 1, 2: 2}
        assert outputs_by_source(db, "bf16__text") == {1: [1.0, 0.5], 2: [2.0, 0.5]}
        assert outputs_by_source(db, "half__text") == {1: [1.0, 0.5], 2: [2.0, 0.5]}
        assert db.outputs("object__text") == []
        errors = db.errors("object__text")
        assert len(errors) == 2 and all(
            "holds a " in e["error"] and ".Label, which reactive cannot store" in e["error"] for e in errors
        )
        assert [e for e in db.errors() if e["listener"] != "object__text"] == []


def test_a_predict_that_returns_a_coroutine_says_it_is_async(duck: SQLClient) -> None:
    # An object whose __call__ is async is not seen as a coroutine function when declared.
    class Remote:
        async def __call__(self, texts: list[str]) -> list[int]:
            return [len(t) for t in texts]

    duck.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text VARCHAR)")
    duck.execute("INSERT INTO docs VALUES (1, 'a')")
    with reactive.connect(duck.uri) as db:
        db.add(Listener(Model("remote", predict=Remote(), max_retries=0), "text", "docs"), progress=False)
        (error,) = db.errors("remote__text")
        assert "returned a coroutine, not a list of outputs: predict is async" in error["error"]


def test_json_is_json_in_any_case_and_other_declared_types_refuse_values_per_row(duck: SQLClient) -> None:
    duck.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text VARCHAR)")
    duck.executemany("INSERT INTO docs VALUES (?, ?)", [(1, "a"), (2, "bb")])
    with reactive.connect(duck.uri) as db:
        # 'JSON' was parsed by ibis as its own JSON type, to which no store writes a dict:
        # the whole backfill failed ("Expected bytes, got a 'dict' object").
        db.add(
            Listener(Model("doc", predict=lambda xs: [{"n": len(x)} for x in xs], output_type="JSON"), "text", "docs")
        )
        assert outputs_by_source(db, "doc__text") == {1: {"n": 1}, 2: {"n": 2}}
        # Types reactive has no Python type for reached the database unchecked, which refused
        # the whole window every time (db.add: "backfill ... failed for some rows").
        good = {
            "uuid": UUID(int=5),
            "decimal(10, 2)": Decimal("2.25"),
            "timestamp": dt.datetime(2024, 5, 1),
            "timestamp('UTC')": dt.datetime(2024, 5, 1, tzinfo=dt.UTC),
            "date": dt.date(2024, 5, 1),
        }
        # A number was taken as a count of units since 1970 (1714521600 as that many us), a
        # datetime as a date by dropping its time: values changed to fit.
        bad = {
            "uuid": "not a uuid",
            "decimal(10, 2)": 2.25,
            "timestamp": "2024-05-01",
            "timestamp('UTC')": 1714521600,
            "date": dt.datetime(2024, 5, 1, 12, 30),
        }
        for n, kind in enumerate(good):
            model = Model(
                f"t{n}", predict=lambda xs, k=kind: [good[k] if x == "a" else bad[k] for x in xs], output_type=kind
            )
            db.add(Listener(model, "text", "docs"))
            assert list(outputs_by_source(db, f"t{n}__text")) == [1]
            [error] = db.errors(f"t{n}__text")
            assert error["source"] == 2 and ("does not fit" in error["error"] or "is not a UUID" in error["error"])


@pytest.mark.parametrize("sql", ["duckdb", "postgres"], indirect=True)  # SQLite refuses decimals at add
def test_a_decimal_of_no_declared_precision_holds_38_digits_9_after_the_point(sql: SQLClient) -> None:
    """DuckDB made such a column DECIMAL(18, 3) while outputs were checked against Arrow's
    decimal(38, 9): 1.2345 and a 21-digit value failed their window's write, db.add raised
    ("backfill ... failed for some rows"), and each row was set apart with Arrow's error
    ("Rescaling Decimal value would cause data loss"), never stored."""
    make_table(sql, "docs", [(1, "a"), (2, "wide"), (3, "fine")])
    values = {"a": Decimal("1.2345"), "wide": Decimal("12345678901234567890.5"), "fine": Decimal("0.0000000001")}
    with reactive.connect(sql.uri) as db:
        model = Model("price", predict=lambda xs: [values[x] for x in xs], output_type="decimal")
        db.add(Listener(model, "text", "docs"))
        assert outputs_by_source(db, "price__text") == {1: values["a"], 2: values["wide"]}
        [error] = db.errors("price__text")
        assert error["source"] == 3 and "does not fit decimal" in error["error"]


@pytest.mark.parametrize("sql", ["sqlite", "postgres"], indirect=True)  # DuckDB stores them all
@pytest.mark.parametrize(
    "output_type", ["uint8", "uint64", "uuid", "struct<a: int64>", "map<string, int64>", "array<array<float32>>"]
)
def test_an_output_type_postgres_or_sqlite_cannot_store_is_refused_at_add(sql: SQLClient, output_type: str) -> None:
    # Each failed there: the DDL (no unsigned types, no structs on PostgreSQL), the binary copy
    # of a uuid, or every window's write (maps; unsigned 8- and 64-bit on SQLite), once for
    # every time the window came again.
    if output_type == "array<array<float32>>" and sql.kind == "sqlite":
        output_type = "array<date>"  # SQLite keeps arrays as JSON text: nested numbers fit, dates do not
    sql.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text VARCHAR(10))")
    sql.execute("INSERT INTO docs VALUES (1, 'a')")
    with reactive.connect(sql.uri) as db:
        model = Model("m", predict=lambda xs: [None for _ in xs], output_type=output_type)
        with pytest.raises(reactive.ConfigurationError, match=f"output type '.*' cannot be stored on {sql.kind}"):
            db.add(Listener(model, "text", "docs"))
        assert db.show() == []
        db.add(Listener(Model("m", predict=lambda xs: [{"n": 1} for _ in xs], output_type="json"), "text", "docs"))
        assert outputs_by_source(db, "m__text") == {1: {"n": 1}}


def test_a_struct_output_with_a_key_its_type_does_not_declare_is_refused_not_cut(duck: SQLClient) -> None:
    # Arrow, through which the outputs are written, drops a key its struct lacks without a
    # word: the row was stored without it ({"n": 2} for {"n": 2, "extra": 1}).
    duck.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text VARCHAR)")
    duck.executemany("INSERT INTO docs VALUES (?, ?)", [(1, "a"), (2, "bb"), (3, "ccc")])
    given = {
        "a": {"n": 1, "tags": [{"t": "x"}]},
        "bb": {"n": 2, "extra": 1, "tags": []},
        "ccc": {"n": 3, "tags": [{"t": "y"}, {"t": "z", "w": 0}]},
    }
    with reactive.connect(duck.uri) as db:
        model = Model(
            "s",
            predict=lambda xs: [given[x] for x in xs],
            output_type="struct<n: int64, tags: array<struct<t: string>>>",
        )
        db.add(Listener(model, "text", "docs"))
        assert outputs_by_source(db, "s__text") == {1: {"n": 1, "tags": [{"t": "x"}]}}
        errors = {e["source"]: e["error"] for e in db.errors("s__text")}
        assert "output has the key 'extra', which struct<" in errors[2] and "(it would be lost)" in errors[2]
        assert "output has the key 'tags'[1].'w'" in errors[3]


def test_a_time_finer_than_its_declared_precision_is_refused_not_cut(sql: SQLClient) -> None:
    """``output_type="timestamp(3)"`` holds milliseconds: Arrow (DuckDB) and PostgreSQL's
    copy cut 03:04:05.123456 to 03:04:05.123 without a word, a value changed to fit."""
    sql.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text VARCHAR)")
    sql.executemany("INSERT INTO docs VALUES (?, ?)", [(1, "ms"), (2, "us")])
    given = {"ms": dt.datetime(2024, 1, 2, 3, 4, 5, 123000), "us": dt.datetime(2024, 1, 2, 3, 4, 5, 123456)}
    with reactive.connect(sql.uri) as db:
        db.add(
            Listener(Model("t", predict=lambda xs: [given[x] for x in xs], output_type="timestamp(3)"), "text", "docs")
        )
        assert outputs_by_source(db, "t__text") == {1: given["ms"]}
        [error] = db.errors("t__text")
        assert error["source"] == 2
        assert error["error"].startswith("output 2024-01-02 03:04:05.123456 is finer than timestamp(3) holds (it would")


def test_a_time_inside_a_struct_finer_than_declared_is_refused_with_where(duck: SQLClient) -> None:
    duck.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text VARCHAR)")
    duck.executemany("INSERT INTO docs VALUES (?, ?)", [(1, "s"), (2, "us")])
    given = {
        "s": {"at": [dt.datetime(2024, 1, 2, 3, 4, 5)]},
        "us": {"at": [dt.datetime(2024, 1, 2, 3, 4, 5), dt.datetime(2024, 1, 2, 3, 4, 5, 1)]},
    }
    with reactive.connect(duck.uri) as db:
        model = Model("t", predict=lambda xs: [given[x] for x in xs], output_type="struct<at: array<timestamp(0)>>")
        db.add(Listener(model, "text", "docs"))
        assert outputs_by_source(db, "t__text") == {1: given["s"]}
        [error] = db.errors("t__text")
        assert error["source"] == 2
        assert error["error"].startswith("output 2024-01-02 03:04:05.000001 at 'at'[1], is finer than struct<")


def test_a_row_duckdb_refuses_is_recorded_with_the_database_s_own_error(duck: SQLClient) -> None:
    # After a failed output write, reactive looked at the catalog (was the table dropped?) in
    # the transaction DuckDB had aborted: the row was recorded with "TransactionContext Error:
    # Current transaction is aborted", not with why the database refused it.
    duck.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text VARCHAR)")
    duck.execute("INSERT INTO docs VALUES (1, 'a')")
    with reactive.connect(duck.uri, poll_interval=0.05) as db:
        db.add(Listener(Model("m", predict=lambda xs: [len(x) for x in xs], output_type="int64"), "text", "docs"))
        duck.execute('CREATE UNIQUE INDEX one_each ON "_outputs__m__text" ("_output")')
        db.cdc.start()
        duck.execute("INSERT INTO docs VALUES (2, 'b'), (3, 'ccc')")
        assert db.cdc.wait_idle(timeout=30)
        assert outputs_by_source(db, "m__text") == {1: 1, 3: 3}
        [error] = db.errors("m__text")
        assert error["source"] == 2 and 'Duplicate key "_output: 1" violates unique constraint' in error["error"]


def test_output_of_the_wrong_type_is_recorded(duck: SQLClient) -> None:
    duck.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text VARCHAR)")
    duck.executemany("INSERT INTO docs VALUES (?, ?)", [(1, "vec"), (2, "oops")])
    with reactive.connect(duck.uri) as db:
        model = Model("emb", predict=lambda xs: [[1.0, 2.0] if x == "vec" else "not a vector" for x in xs])
        db.add(Listener(model, "text", "docs"))
        assert outputs_by_source(db, "emb__text") == {1: [1.0, 2.0]}
        [error] = db.errors("emb__text")
        assert error["source"] == 2 and "does not fit array<float64>" in error["error"]


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("mysql://root:hunter2@db/app", "invalid database URI 'mysql://root:***@db/app'; supported schemes: duckdb://"),
        ("nonsense", "invalid database URI 'nonsense'"),
        ("postgres://bob:hunter2@127.0.0.1:1/x", "could not connect to 'postgres://bob:***@127.0.0.1:1/x'"),
        ("postgres://nobody:hunter2@127.0.0.1:5432/test", 'role "nobody" does not exist'),
        ("postgres://bob:hunter2@127.0.0.1:notaport/x", "invalid URI 'postgres://bob:***@127.0.0.1:notaport/x'"),
    ],
)
def test_invalid_uri_is_clear_and_redacted(uri: str, message: str) -> None:
    with pytest.raises(reactive.ReactiveError) as excinfo:
        reactive.connect(uri)
    assert message in str(excinfo.value)
    assert "hunter2" not in str(excinfo.value)
    assert isinstance(excinfo.value, ValueError | reactive.BackendError)


def test_a_file_uri_with_a_query_is_refused_and_opens_no_file(tmp_path: Path) -> None:
    # The query was dropped, and a file named up to the '?' opened (created): 'q?x=1.duckdb'
    # made a database file 'q', and the table was then "not found" in it.
    for scheme in ("duckdb", "sqlite"):
        with pytest.raises(reactive.ConfigurationError, match=f"a {scheme} URI takes no query"):
            reactive.connect(f"{scheme}:///{tmp_path}/q?x=1.db")
    assert list(tmp_path.iterdir()) == []
    # The path is percent-decoded (as every URI's is): a table not found says which file that was.
    with (
        reactive.connect(f"duckdb:///{tmp_path}/p%41.duckdb") as db,
        pytest.raises(reactive.TableNotFoundError, match=r"the file opened is .*pA\.duckdb"),
    ):
        db.add(Listener(Model("m", predict=list), "text", "docs"))


def test_filter_with_operators_is_refused() -> None:
    with pytest.raises(reactive.ConfigurationError, match="only equality"):
        Listener(Model("m", predict=list), "text", "docs", filter={"n": {"$gt": 3}})


# -- schema changes of a watched SQL table -----------------------------------------------------
def make_table(sql: SQLClient, name: str, rows: list[tuple[int, str]]) -> None:
    sql.execute(f"CREATE TABLE {name} (id INTEGER PRIMARY KEY, text VARCHAR(100))")
    sql.executemany(f"INSERT INTO {name} VALUES (?, ?)", rows)


@pytest.mark.parametrize("column", ["id", "text"])
def test_a_renamed_column_stops_its_table_and_deletes_no_output(
    sql: SQLClient, recorder: Recorder, column: str
) -> None:
    """The id column or the listener's key renamed: the table stops with why, the others go on.

    SQLite reads a double-quoted name that is not a column as a string literal: a poll that
    named the old column would see every row change to that literal (every output deleted,
    or the literal computed), so every statement qualifies its columns.
    """
    make_table(sql, "docs", [(1, "a"), (2, "b")])
    make_table(sql, "other", [(1, "x")])
    with reactive.connect(sql.uri, poll_interval=0.05) as db:
        db.add(Listener(Model("m", predict=recorder), "text", "docs"))
        db.add(Listener(Model("o", predict=recorder), "text", "other"))
        db.cdc.start()
        assert db.cdc.wait_idle(timeout=30)
        sql.execute(f"ALTER TABLE docs RENAME COLUMN {column} TO renamed")
        sql.execute("INSERT INTO docs VALUES (3, 'c')")
        sql.execute("INSERT INTO other VALUES (2, 'y')")
        assert db.cdc.wait_idle(timeout=30)
        info = db.cdc.info()
        assert info["stopped_tables"] == {"docs": f"altered: column {column!r} no longer exists (renamed or dropped)"}
        assert info["source"]["tables"] == ["other"] and info["source"]["failing_tables"] == {}
        assert outputs_by_source(db, "m__text") == {1: "<a>", 2: "<b>"}
        assert outputs_by_source(db, "o__text") == {1: "<x>", 2: "<y>"}
        assert sorted(recorder.inputs) == ["a", "b", "x", "y"] and db.errors() == []


@pytest.mark.parametrize("sql", ["duckdb", "postgres"], indirect=True)  # SQLite cannot change a column's type
def test_an_id_column_of_another_type_stops_its_table(sql: SQLClient, recorder: Recorder) -> None:
    """The snapshot is keyed by the old type: the table stops instead of failing every poll."""
    sql.execute("CREATE TABLE notes (note_id INTEGER, body VARCHAR(100))")
    sql.executemany("INSERT INTO notes VALUES (?, ?)", [(1, "a"), (2, "b")])
    with reactive.connect(sql.uri, poll_interval=0.05) as db:
        db.add(Listener(Model("m", predict=recorder), "body", "notes", id_column="note_id"))
        db.cdc.start()
        assert db.cdc.wait_idle(timeout=30)
        sql.execute("ALTER TABLE notes ALTER COLUMN note_id TYPE VARCHAR(10)")
        sql.execute("INSERT INTO notes VALUES ('x3', 'c')")
        assert db.cdc.wait_idle(timeout=30)
        why = db.cdc.info()["stopped_tables"]["notes"]
        assert why.startswith("altered: its id column 'note_id' is now string") and why.endswith("was int32")
        assert outputs_by_source(db, "m__body") == {1: "<a>", 2: "<b>"}


def test_a_key_column_of_another_type_is_computed_again(sql: SQLClient) -> None:
    """Every row's input changed (its type did): each is computed again, nothing stops."""
    make_table(sql, "docs", [(1, "a"), (2, "bb")])
    with reactive.connect(sql.uri, poll_interval=0.05) as db:
        db.add(Listener(Model("m", predict=lambda xs: [repr(x) for x in xs]), "text", "docs"))
        db.cdc.start()
        assert db.cdc.wait_idle(timeout=30)
        if sql.kind == "sqlite":
            # SQLite changes a type by rebuilding the table under the same name.
            sql.execute("CREATE TABLE docs_new (id INTEGER PRIMARY KEY, text INTEGER)")
            sql.execute("INSERT INTO docs_new SELECT id, length(text) FROM docs")
            sql.execute("DROP TABLE docs")
            sql.execute("ALTER TABLE docs_new RENAME TO docs")
        else:
            sql.execute("ALTER TABLE docs ALTER COLUMN text TYPE INTEGER USING length(text)")
        assert db.cdc.wait_idle(timeout=30)
        assert outputs_by_source(db, "m__text") == {1: "1", 2: "2"}
        assert db.cdc.info()["stopped_tables"] == {}


def test_blob_ids_work_end_to_end(sql: SQLClient, recorder: Recorder) -> None:
    blob = "BYTEA" if sql.kind == "postgres" else "BLOB"
    sql.execute(f"CREATE TABLE docs (id {blob} PRIMARY KEY, text VARCHAR(100))")
    sql.executemany("INSERT INTO docs VALUES (?, ?)", [(b"\x00\x01", "a"), (b"\xff", None)])
    with reactive.connect(sql.uri, poll_interval=0.05) as db:
        db.add(Listener(Model("m", predict=recorder), "text", "docs"))
        assert outputs_by_source(db, "m__text") == {b"\x00\x01": "<a>"}
        [error] = db.errors("m__text")
        assert error["source"] == b"\xff" and "no value for key 'text'" in error["error"]
        db.cdc.start()
        sql.execute("INSERT INTO docs VALUES (?, ?)", (b"\x02", "c"))
        sql.execute("UPDATE docs SET text = 'b' WHERE id = ?", (b"\xff",))
        sql.execute("DELETE FROM docs WHERE id = ?", (b"\x00\x01",))
        assert db.cdc.wait_idle(timeout=30)
        assert outputs_by_source(db, "m__text") == {b"\x02": "<c>", b"\xff": "<b>"}


def test_uuid_ids_work_end_to_end(sql: SQLClient, recorder: Recorder) -> None:
    """PostgreSQL's driver returns uuid.UUID ids, which Arrow would not take as the outputs'
    and the snapshot's id column (every window failed, and db.outputs() too); DuckDB hands
    them over as text."""
    u = [f"00000000-0000-0000-0000-00000000000{i}" for i in range(4)]
    sql.execute("CREATE TABLE docs (id UUID PRIMARY KEY, text VARCHAR(100))")
    sql.executemany("INSERT INTO docs VALUES (?, ?)", [(u[0], "a"), (u[1], None)])

    def by_text(rows: dict) -> dict:
        return {str(k): v for k, v in rows.items()}

    with reactive.connect(sql.uri, poll_interval=0.05) as db:
        db.add(Listener(Model("m", predict=recorder), "text", "docs"))
        assert by_text(outputs_by_source(db, "m__text")) == {u[0]: "<a>"}
        [error] = db.errors("m__text")
        assert str(error["source"]) == u[1] and "no value for key 'text'" in error["error"]
        db.cdc.start()
        sql.execute("INSERT INTO docs VALUES (?, ?)", (u[2], "c"))
        sql.execute("UPDATE docs SET text = 'b' WHERE id = ?", (u[1],))
        sql.execute("DELETE FROM docs WHERE id = ?", (u[0],))
        assert db.cdc.wait_idle(timeout=30)
        assert by_text(outputs_by_source(db, "m__text")) == {u[2]: "<c>", u[1]: "<b>"}
        assert db.errors("m__text") == [] and db.cdc.info()["source"]["failing_tables"] == {}
        # The ids as the driver hands the rows over: PostgreSQL's are uuid.UUID, the others' text.
        assert {type(i) for i in outputs_by_source(db, "m__text")} == {UUID if sql.kind == "postgres" else str}


@pytest.mark.parametrize(("base", "ids"), [("bigint CHECK (VALUE > 0)", [1, 2, 3]), ("text", ["a-1", "b-2", "c-3"])])
def test_postgres_domain_ids_and_inputs_work_end_to_end(pg_database: str, base: str, ids: list[Any]) -> None:
    """A primary key of a domain type (``CREATE DOMAIN order_id AS bigint``) was refused at
    ``db.add`` ("cannot store ids of (order_id)"): ibis names a domain's type by its own name.
    Domains are resolved to their base type (``pg_type.typbasetype``), also for model inputs: a
    domain over a domain, and an array of a domain, which the driver handed over as its text
    (``'{1,2}'``)."""
    with psycopg.connect(pg_database, autocommit=True) as client:
        client.execute(f"CREATE DOMAIN order_id AS {base}")
        client.execute("CREATE DOMAIN label AS varchar(20) CHECK (VALUE <> '')")
        client.execute("CREATE DOMAIN title AS label")
        client.execute("CREATE DOMAIN qty AS integer CHECK (VALUE >= 0)")
        client.execute("CREATE TABLE orders (id order_id PRIMARY KEY, note title, sizes qty[])")
        client.execute("INSERT INTO orders VALUES (%s, 'ab', '{1,2}'), (%s, 'cde', '{3}')", ids[:2])
        with reactive.connect(pg_database, poll_interval=0.05) as db:
            db.add(Listener(Model("len", predict=lambda xs: [len(x) for x in xs]), "note", "orders"))
            db.add(Listener(Model("sum", predict=lambda xs: [sum(x) for x in xs]), "sizes", "orders"))
            assert outputs_by_source(db, "len__note") == {ids[0]: 2, ids[1]: 3}
            assert outputs_by_source(db, "sum__sizes") == {ids[0]: 3, ids[1]: 3}
            db.cdc.start()
            client.execute("INSERT INTO orders VALUES (%s, 'fghi', '{4,5,6}')", [ids[2]])
            client.execute("UPDATE orders SET note = 'j', sizes = '{7}' WHERE id = %s", [ids[0]])
            client.execute("DELETE FROM orders WHERE id = %s", [ids[1]])
            assert db.cdc.wait_idle(timeout=30)
            assert outputs_by_source(db, "len__note") == {ids[0]: 1, ids[2]: 4}
            assert outputs_by_source(db, "sum__sizes") == {ids[0]: 7, ids[2]: 15}
            assert db.errors() == [] and db.cdc.info()["source"]["failing_tables"] == {}
        with reactive.connect(pg_database, poll_interval=0.05) as db:  # a restart resumes: nothing stale
            client.execute("UPDATE orders SET note = 'kl' WHERE id = %s", [ids[2]])
            db.add(Listener(Model("len", predict=lambda xs: [len(x) for x in xs]), "note", "orders"))
            assert outputs_by_source(db, "len__note") == {ids[0]: 1, ids[2]: 2}


def test_postgres_domain_columns_reach_the_model_as_their_base_type(pg_database: str, recorder: Recorder) -> None:
    """Domain-typed columns of a table keyed by a plain integer, as a key and as a filter: an
    array of a domain reached the model as the array's text (``'{1,2}'``)."""
    with psycopg.connect(pg_database, autocommit=True) as client:
        client.execute("CREATE DOMAIN qty AS integer CHECK (VALUE >= 0)")
        client.execute("CREATE DOMAIN lang AS varchar(2)")
        client.execute("CREATE TABLE docs (id integer PRIMARY KEY, sizes qty[], lang lang)")
        client.execute("INSERT INTO docs VALUES (1, '{1,2}', 'en'), (2, '{3}', 'it')")
        with reactive.connect(pg_database, poll_interval=0.05) as db:
            db.add(Listener(Model("m", predict=recorder), "sizes", "docs", filter={"lang": "en"}))
            db.cdc.start()
            client.execute("INSERT INTO docs VALUES (3, '{4,5}', 'en'), (4, '{6}', 'it')")
            client.execute("UPDATE docs SET lang = 'en' WHERE id = 2")
            assert db.cdc.wait_idle(timeout=30)
            assert outputs_by_source(db, "m__sizes") == {1: "<[1, 2]>", 2: "<[3]>", 3: "<[4, 5]>"}
            assert sorted(recorder.inputs) == [[1, 2], [3], [4, 5]]


#: PostgreSQL id types reactive cannot key outputs by, and what each did before it was refused.
UNSUPPORTED_PG_IDS = {
    "mood": "an enum: compared with text, every poll of its table failed",
    "time with time zone": "read as time: two zones were one id, and an output was deleted",
    "inet": "the backfill failed (Arrow cannot take an IPv4Address)",
    "jsonb": "the backfill failed (the driver cannot bind a dict)",
    "text[]": "the backfill failed (no array type for = ANY)",
    "money": "the backfill failed (text for a decimal)",
}


@pytest.mark.parametrize("id_type", list(UNSUPPORTED_PG_IDS))
def test_a_postgres_id_column_of_a_type_reactive_cannot_key_by_is_refused_at_add(
    pg_database: str, recorder: Recorder, id_type: str
) -> None:
    with psycopg.connect(pg_database, autocommit=True) as client:
        client.execute("CREATE TYPE mood AS ENUM ('sad', 'ok')")
        client.execute(f"CREATE TABLE docs (id {id_type} PRIMARY KEY, text TEXT)")
        with reactive.connect(pg_database) as db:
            with pytest.raises(
                reactive.ConfigurationError, match="is of a type reactive cannot store ids of"
            ) as refused:
                db.add(Listener(Model("m", predict=recorder), "text", "docs"))
            assert f"({id_type})" in str(refused.value) and db.show() == []
        tables = client.execute("SELECT tablename FROM pg_tables WHERE tablename LIKE '\\_reactive%'").fetchall()
        assert ("_reactive_snapshot__docs",) not in tables


@pytest.mark.parametrize("sql", ["duckdb", "postgres"], indirect=True)  # SQLite has no infinite dates
def test_an_infinite_date_id_is_left_out_and_the_rest_followed(
    sql: SQLClient, recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    # Python's dates cannot hold 'infinity': such a row failed every window it was in, and
    # wait_idle did not return True until it was gone.
    sql.execute("CREATE TABLE docs (day DATE PRIMARY KEY, text VARCHAR(10))")
    sql.execute("INSERT INTO docs VALUES ('2020-01-01', 'a'), ('infinity', 'inf')")
    with caplog.at_level(logging.WARNING, logger="reactive"), reactive.connect(sql.uri, poll_interval=0.05) as db:
        db.add(Listener(Model("m", predict=recorder), "text", "docs"), progress=False)
        assert "1 rows of table 'docs' have an id ('day') that is infinite" in caplog.text
        db.cdc.start()
        sql.execute("INSERT INTO docs VALUES ('-infinity', 'minus'), ('2020-01-02', 'b')")
        assert db.cdc.wait_idle(timeout=30)
        assert outputs_by_source(db, "m__text") == {dt.date(2020, 1, 1): "<a>", dt.date(2020, 1, 2): "<b>"}
        assert sorted(recorder.inputs) == ["a", "b"] and db.errors() == []


@pytest.mark.parametrize("sql", ["duckdb", "postgres"], indirect=True)  # SQLite stores NaN as NULL
def test_a_nan_id_is_one_row(sql: SQLClient, recorder: Recorder) -> None:
    """NaN equals nothing in Python, itself included: a float key column's NaN row read back
    by id was not found, so the backfill took it for deleted and computed nothing."""
    sql.execute("CREATE TABLE docs (id DOUBLE PRECISION PRIMARY KEY, text VARCHAR(100))")
    sql.execute("INSERT INTO docs VALUES (1.5, 'a'), ('NaN', 'b')")
    with reactive.connect(sql.uri, poll_interval=0.05) as db:
        db.add(Listener(Model("m", predict=recorder), "text", "docs"))
        outputs = {str(k): v for k, v in outputs_by_source(db, "m__text").items()}
        assert outputs == {"1.5": "<a>", "nan": "<b>"}
        db.cdc.start()
        sql.execute("UPDATE docs SET text = 'c' WHERE text = 'b'")
        assert db.cdc.wait_idle(timeout=30)
        assert {str(k): v for k, v in outputs_by_source(db, "m__text").items()} == {"1.5": "<a>", "nan": "<c>"}


@pytest.mark.parametrize("sql", ["postgres"], indirect=True)
def test_a_numeric_id_past_decimal_38_9_is_left_out(
    sql: SQLClient, recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    """A NUMERIC of no declared precision is read (by ibis, so by reactive) as decimal(38, 9):
    a row whose id held more failed its window again and again, holding its table back
    (wait_idle never returned), and recorded an error it could never clear."""
    sql.execute("CREATE TABLE docs (id NUMERIC PRIMARY KEY, text VARCHAR(100))")
    odd = f"({10**40}, 'big'), (0.1234567891234, 'fine'), ('NaN', 'n')"  # past 29 + 9 digits, NaN
    sql.execute(f"INSERT INTO docs VALUES (1, 'a'), {odd}, (1.5, 'b')")
    with caplog.at_level(logging.WARNING, logger="reactive"), reactive.connect(sql.uri, poll_interval=0.05) as db:
        db.add(Listener(Model("m", predict=recorder), "text", "docs"))
        assert "3 rows of table 'docs' have an id ('id') past what ids are held as, decimal(38, 9)" in caplog.text
        assert outputs_by_source(db, "m__text") == {1: "<a>", Decimal("1.5"): "<b>"}
        db.cdc.start()
        sql.execute(f"INSERT INTO docs VALUES (2, 'bb'), ({10**41 + 1}, 'bigger')")
        sql.execute("UPDATE docs SET id = 3 WHERE text = 'n'")  # followed from now on
        sql.execute(f"UPDATE docs SET id = {10**40 + 1} WHERE id = 1")  # no longer: its output goes
        assert db.cdc.wait_idle(timeout=30)
        assert outputs_by_source(db, "m__text") == {Decimal("1.5"): "<b>", 2: "<bb>", 3: "<n>"}
        assert db.errors() == []


# -- outputs are never changed to fit their type -------------------------------------------------
VECTORS = {"whole": [1, 2, 3], "frac": [0.9, 1.5, 2.7], "gap": [1.0, None, 3.0], "short": [4, 5]}


def test_a_fractional_vector_is_refused_by_an_integer_type_never_truncated(sql: SQLClient) -> None:
    make_table(sql, "docs", [(1, "whole"), (2, "short")])
    with reactive.connect(sql.uri, poll_interval=0.05) as db:
        vectors = Model("v", predict=lambda keys: [VECTORS[k] for k in keys])
        db.add(Listener(vectors, "text", "docs"))  # whole numbers only: array<int64>
        db.cdc.start()
        sql.executemany("INSERT INTO docs VALUES (?, ?)", [(3, "frac"), (4, "gap")])
        assert db.cdc.wait_idle(timeout=30)
        # Vectors may change length: arrays are variable-length lists on every backend.
        assert outputs_by_source(db, "v__text") == {1: [1, 2, 3], 2: [4, 5]}
        errors = {e["source"]: e["error"] for e in db.errors("v__text")}
        fixed = "(outputs of 'v__text' are array<int64>, fixed by the first outputs or Model(output_type=...))"
        assert errors == {
            3: f"output has 0.9 at position 0, which array<int64> cannot hold {fixed}",
            4: f"output has None at position 1, which array<int64> cannot hold {fixed}",
        }


def test_a_bool_among_a_vector_s_numbers_is_refused_not_stored_as_one(sql: SQLClient) -> None:
    """numpy takes ``True`` among numbers as 1: ``[True, 2.5]`` was stored as ``[1.0, 2.5]``
    where a bool alone (and an array of bools) was refused. As a first output, such a list is
    not numbers (JSON keeps it as it is)."""
    make_table(sql, "docs", [(1, "frac"), (2, "flag")])
    given = {"frac": [0.5, 2.5], "flag": [True, 2.5], "mixed": [True, 2]}
    with reactive.connect(sql.uri, poll_interval=0.05) as db:
        db.add(Listener(Model("v", predict=lambda keys: [given[k] for k in keys]), "text", "docs"))
        assert outputs_by_source(db, "v__text") == {1: [0.5, 2.5]}
        [error] = db.errors("v__text")
        assert error["source"] == 2 and error["error"].startswith(
            "output has True at position 0, a bool, which array<float64> cannot hold"
        )
    make_table(sql, "more", [(1, "mixed")])
    with reactive.connect(sql.uri) as db:
        db.add(Listener(Model("w", predict=lambda keys: [given[k] for k in keys]), "text", "more"))
        assert db.backend.output_types.get("w__text") == "json"
        assert outputs_by_source(db, "w__text") == {1: [True, 2]}


def test_empty_vectors_are_stored_as_empty(sql: SQLClient) -> None:
    """A window of empty float vectors became a block of no columns, which Arrow cannot make
    into a fixed-size list: the whole window failed, every time it came again."""
    make_table(sql, "docs", [(1, "a"), (2, "b")])
    with reactive.connect(sql.uri, poll_interval=0.05) as db:
        empty = Model("e", predict=lambda xs: [np.zeros(0, np.float32) for _ in xs], output_type="array<float32>")
        db.add(Listener(empty, "text", "docs"))
        assert outputs_by_source(db, "e__text") == {1: [], 2: []}
        db.cdc.start()
        sql.execute("INSERT INTO docs VALUES (3, 'c')")
        assert db.cdc.wait_idle(timeout=30)
        assert outputs_by_source(db, "e__text") == {1: [], 2: [], 3: []}
        assert db.errors("e__text") == []


def test_whole_and_fractional_vectors_of_the_first_batch_are_floats(sql: SQLClient) -> None:
    make_table(sql, "docs", [(1, "whole"), (2, "frac")])
    with reactive.connect(sql.uri) as db:
        db.add(Listener(Model("v", predict=lambda keys: [VECTORS[k] for k in keys]), "text", "docs"))
        assert outputs_by_source(db, "v__text") == {1: [1.0, 2.0, 3.0], 2: [0.9, 1.5, 2.7]}
        assert db.backend.output_types.get("v__text") == "array<float64>"


def test_one_odd_output_of_the_first_batch_does_not_fix_the_type(sql: SQLClient) -> None:
    """The first output decided the type: a scorer whose first row got ``"N/A"`` fixed
    ``string``, and every score after it was refused, for good. Now the kind most of the first
    batch's outputs have decides (numbers together, at their widest), and the odd one is refused."""
    scores = {"na": "N/A", "half": 0.5, "one": 1}
    make_table(sql, "docs", [(1, "na"), (2, "half"), (3, "one")])
    with reactive.connect(sql.uri, poll_interval=0.05) as db:
        db.add(Listener(Model("s", predict=lambda keys: [scores[k] for k in keys]), "text", "docs"))
        assert db.backend.output_types.get("s__text") == "float64"
        assert outputs_by_source(db, "s__text") == {2: 0.5, 3: 1.0}
        fixed = "(outputs of 's__text' are float64, fixed by the first outputs or Model(output_type=...))"
        assert {e["source"]: e["error"] for e in db.errors("s__text")} == {
            1: f"output of type str does not fit float64 {fixed}"
        }


def test_an_empty_vector_of_the_first_batch_does_not_fix_the_type(sql: SQLClient) -> None:
    """An empty list, of no item type, was JSON: first in a batch of vectors, it made every
    listener's outputs JSON text. It fits any vector type and is stored as an empty one."""
    make_table(sql, "docs", [(1, "none"), (2, "frac")])
    vectors = {"none": [], "frac": [0.9, 1.5, 2.7]}
    with reactive.connect(sql.uri) as db:
        db.add(Listener(Model("v", predict=lambda keys: [vectors[k] for k in keys]), "text", "docs"))
        assert db.backend.output_types.get("v__text") == "array<float64>"
        assert outputs_by_source(db, "v__text") == {1: [], 2: [0.9, 1.5, 2.7]}
        assert db.errors("v__text") == []


def test_json_outputs_hold_arrays_as_lists_and_refuse_nan(sql: SQLClient) -> None:
    make_table(sql, "docs", [(1, "matrix"), (2, "nan")])
    outputs = {"matrix": np.arange(4.0).reshape(2, 2), "nan": {"m": float("nan")}}
    with reactive.connect(sql.uri) as db:
        db.add(Listener(Model("j", predict=lambda keys: [outputs[k] for k in keys]), "text", "docs"))
        assert outputs_by_source(db, "j__text") == {1: [[0.0, 1.0], [2.0, 3.0]]}
        [error] = db.errors("j__text")
        assert error["source"] == 2 and error["error"].startswith("output contains NaN or infinity, which JSON")


#: A model's date and time outputs, keyed by the text of the row that gets them.
MOMENTS = {
    "naive": dt.datetime(2024, 1, 2, 3, 4, 5, 123456),
    "aware": dt.datetime(2024, 1, 2, 3, 4, 5, 123456, tzinfo=dt.timezone(dt.timedelta(hours=2))),
    "day": dt.date(2024, 1, 2),
    "clock": dt.time(3, 4, 5, 123456),
}


def test_dates_and_times_without_a_declared_type_are_stored_as_dates_and_times(sql: SQLClient) -> None:
    """They were stored as reactive's tagged JSON and came back as it ({'__dt__': '2024-01-02T03:04:05'})
    from db.outputs and to any other client. SQLite has no time type: a time is JSON's ISO 8601
    text there (it was the tagged object)."""
    make_table(sql, "docs", [(1, "naive"), (2, "day")])
    with reactive.connect(sql.uri, poll_interval=0.05) as db:
        add_constant_listeners(db, MOMENTS)
        db.cdc.start()
        sql.execute("INSERT INTO docs VALUES (3, 'c')")
        assert db.cdc.wait_idle(timeout=30)
        clock = "03:04:05.123456" if sql.kind == "sqlite" else MOMENTS["clock"]
        for kind, moment in {**MOMENTS, "clock": clock}.items():
            assert outputs_by_source(db, f"{kind}__text") == dict.fromkeys([1, 2, 3], moment), kind
        assert outputs_by_source(db, "aware__text")[1].utcoffset() == dt.timedelta(0)  # the same instant, in UTC
        assert types_of(db, MOMENTS) == {
            "naive": "timestamp",
            "aware": "timestamp('UTC')",
            "day": "date",
            "clock": "json" if sql.kind == "sqlite" else "time",
        }
        assert db.errors() == []


def test_intervals_are_stored_to_the_microsecond_declared_or_not(sql: SQLClient) -> None:
    """A declared interval lost what was finer than a second on PostgreSQL (ibis names its
    interval one of seconds, and Arrow dropped the rest: 5.5 s stored as 5 s), and on DuckDB
    db.outputs failed (Arrow cannot cast DuckDB's interval to a duration). Undeclared, a
    timedelta was refused as JSON; it is an interval now where the database has one, and
    JSON's ISO 8601 duration where not (SQLite: it was refused for its row there)."""
    make_table(sql, "docs", [(1, "a")])
    span = dt.timedelta(days=1, seconds=5, microseconds=500007)
    with reactive.connect(sql.uri, poll_interval=0.05) as db:
        if sql.kind != "sqlite":  # SQLite's refusal of a declared interval: test_an_output_type_...
            declared = Model("declared", predict=lambda xs: [span for _ in xs], output_type="interval")
            db.add(Listener(declared, "text", "docs"))
        db.add(Listener(Model("inferred", predict=lambda xs: [span for _ in xs]), "text", "docs"))
        db.cdc.start()
        sql.execute("INSERT INTO docs VALUES (2, 'b')")
        assert db.cdc.wait_idle(timeout=30)
        if sql.kind == "sqlite":
            assert outputs_by_source(db, "inferred__text") == {1: "P1DT5.500007S", 2: "P1DT5.500007S"}
            assert db.backend.output_types.get("inferred__text") == "json"
            assert db.errors() == []
            return
        for identifier in ("declared__text", "inferred__text"):
            assert outputs_by_source(db, identifier) == {1: span, 2: span}
        assert db.backend.output_types.get("inferred__text") == "interval"
        assert db.errors() == []


def test_numpy_values_are_stored_as_the_values_they_hold(duck: SQLClient) -> None:
    """A numpy number inside a JSON output (a classifier's np.float32 score) refused the row
    ("output holds a numpy.float32, which reactive cannot store: return numbers..."), and a
    numpy datetime of nanoseconds was stored as an int64 count of them (1704164645123456789).
    Now: the number, the datetime (one finer than a microsecond refused for its row: Python's
    datetime cannot hold it), NaT as None."""
    duck.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text VARCHAR)")
    duck.executemany(
        "INSERT INTO docs VALUES (?, ?)", [(1, "a"), (2, "fine"), (3, "nat"), (4, "pandas"), (5, "pandas fine")]
    )
    scored = {"label": "spam", "score": np.float32(0.5), "n": np.int64(3), "flags": [np.bool_(True)]}
    moments = {
        "a": np.datetime64("2024-01-02T03:04:05.123456000", "ns"),
        "fine": np.datetime64("2024-01-02T03:04:05.123456789", "ns"),
        "nat": np.datetime64("NaT", "ns"),
        "pandas": pd.Timestamp("2024-01-02T03:04:05.123456"),
        "pandas fine": pd.Timestamp("2024-01-02T03:04:05.123456789"),  # was stored without its 789 ns
    }
    with reactive.connect(duck.uri) as db:
        db.add(Listener(Model("label", predict=lambda xs: [scored for _ in xs]), "text", "docs"))
        db.add(Listener(Model("at", predict=lambda xs: [moments[x] for x in xs]), "text", "docs"))
        plain = {"label": "spam", "score": 0.5, "n": 3, "flags": [True]}
        assert outputs_by_source(db, "label__text") == dict.fromkeys([1, 2, 3, 4, 5], plain)
        assert db.backend.output_types.get("at__text") == "timestamp"
        moment = dt.datetime(2024, 1, 2, 3, 4, 5, 123456)
        assert outputs_by_source(db, "at__text") == {1: moment, 3: None, 4: moment}
        errors = {e["source"]: e["error"] for e in db.errors("at__text")}
        assert set(errors) == {2, 5} and all("finer than a microsecond" in e for e in errors.values())
        assert db.errors("label__text") == []


class Label(enum.Enum):
    SPAM = "spam"


class Mood(enum.StrEnum):
    GLAD = "glad"


class Stars(enum.IntEnum):
    FIVE = 5


def test_enum_members_and_byte_buffers_are_stored_as_their_values(duck: SQLClient) -> None:
    """A classifier's Label.SPAM was refused for its row ("output holds a test_bad_input.Label,
    which reactive cannot store"), a StrEnum's or IntEnum's was JSON text, and one declared as
    string refused ("output of type Mood does not fit string"): each is its value now, in a
    column of the value's type, inside JSON too. A bytearray was JSON's tagged hex
    ({'__bytes__': '6162'}): it is binary."""
    duck.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text VARCHAR)")
    duck.executemany("INSERT INTO docs VALUES (?, ?)", [(1, "a"), (2, "b")])
    members: dict[str, Any] = {"label": Label.SPAM, "mood": Mood.GLAD, "stars": Stars.FIVE}
    db_bytes = Model("raw", predict=lambda xs: [bytearray(x.encode()) for x in xs])
    with reactive.connect(duck.uri) as db:
        add_constant_listeners(db, members)
        declared = Model("typed", predict=lambda xs: [Mood.GLAD for _ in xs], output_type="string")
        db.add(Listener(declared, "text", "docs"))
        db.add(Listener(Model("doc", predict=lambda xs: [{"label": Label.SPAM} for _ in xs]), "text", "docs"))
        for name, member in members.items():
            assert outputs_by_source(db, f"{name}__text") == {1: member.value, 2: member.value}
            assert all(type(row["_output"]) is type(member.value) for row in db.outputs(f"{name}__text"))
        assert types_of(db, [*members, "typed", "doc"]) == {
            "label": "string",
            "mood": "string",
            "stars": "int64",
            "typed": "string",
            "doc": "json",
        }
        assert outputs_by_source(db, "typed__text") == {1: "glad", 2: "glad"}
        assert outputs_by_source(db, "doc__text") == {1: {"label": "spam"}, 2: {"label": "spam"}}
        db.add(Listener(db_bytes, "text", "docs"))
        assert outputs_by_source(db, "raw__text") == {1: b"a", 2: b"b"}
        assert db.backend.output_types.get("raw__text") == "binary"
        assert db.errors() == []


@dc.dataclass
class Invoice:
    """What an extraction model returns: fields, one of them a date, one nested."""

    total: Decimal
    due: dt.date
    lines: list[str]
    vendor: Vendor


class Vendor(pydantic.BaseModel):
    name: str
    score: float


def test_dataclass_and_pydantic_outputs_are_stored_as_the_dicts_of_their_fields(sql: SQLClient) -> None:
    """An extraction model's output, a dataclass or a pydantic model, was refused for its row
    ("output holds a test_bad_input.Invoice, which reactive cannot store"): it is the dict of
    its fields now, nested ones too, in JSON as any dict. Its date and decimal are JSON's text
    for them, as pydantic's JSON mode writes them; they were reactive's tagged objects
    ({'__dt__': '2024-01-02'}), which db.outputs and any other client got back."""
    make_table(sql, "docs", [(1, "acme")])
    with reactive.connect(sql.uri, poll_interval=0.05) as db:

        def extract(texts: list[str]) -> list[Invoice]:
            return [Invoice(Decimal("12.50"), dt.date(2024, 1, 2), [t], Vendor(name=t, score=0.5)) for t in texts]

        db.add(Listener(Model("invoice", predict=extract), "text", "docs"))
        db.add(Listener(Model("vendor", predict=lambda xs: [Vendor(name=x, score=1.5) for x in xs]), "text", "docs"))
        db.cdc.start()
        sql.execute("INSERT INTO docs VALUES (2, 'initech')")
        assert db.cdc.wait_idle(timeout=30)
        assert outputs_by_source(db, "invoice__text") == {
            i: {
                "total": "12.50",
                "due": "2024-01-02",
                "lines": [name],
                "vendor": {"name": name, "score": 0.5},
            }
            for i, name in ((1, "acme"), (2, "initech"))
        }
        assert outputs_by_source(db, "vendor__text") == {
            1: {"name": "acme", "score": 1.5},
            2: {"name": "initech", "score": 1.5},
        }
        if sql.kind == "duckdb":  # a struct of the database's own types (PostgreSQL and SQLite have none)
            vendor = "struct<name: string, score: float64>"
            kind = f"struct<total: decimal(10, 2), due: date, lines: array<string>, vendor: {vendor}>"
            db.add(Listener(Model("typed", predict=extract, output_type=kind), "text", "docs"))
            assert outputs_by_source(db, "typed__text")[1] == {
                "total": Decimal("12.50"),
                "due": dt.date(2024, 1, 2),
                "lines": ["acme"],
                "vendor": {"name": "acme", "score": 0.5},
            }
        assert db.errors() == []


def test_json_outputs_hold_what_json_lacks_in_json_encoders_forms(sql: SQLClient) -> None:
    """Inside a JSON output a datetime, bytes, a decimal, a UUID were reactive's tagged objects
    ({'__dt__': ...}, {'__bytes__': hex}, {'__str__': ...}), which db.outputs and every other
    client got back, and a timedelta refused the row. Now the forms pydantic's JSON mode
    writes: ISO 8601 text and durations, base64, the text of a decimal or a UUID."""
    make_table(sql, "docs", [(1, "a")])
    aware = dt.datetime(2024, 1, 2, 3, 4, 5, 123456, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    value = {
        "at": aware,
        "took": dt.timedelta(minutes=1, seconds=2, microseconds=500000),
        "raw": b"\x00\xff",
        "price": Decimal("-0.10"),
        "key": UUID(int=7),
        "tags": {"b", "a"},
    }
    with reactive.connect(sql.uri) as db:
        db.add(Listener(Model("doc", predict=lambda xs: [value for _ in xs]), "text", "docs"))
        [stored] = outputs_by_source(db, "doc__text").values()
        assert stored == {
            "at": "2024-01-02T03:04:05.123456+02:00",
            "took": "PT1M2.5S",
            "raw": "AP8=",
            "price": "-0.10",
            "key": "00000000-0000-0000-0000-000000000007",
            "tags": ["a", "b"],
        }
        assert pydantic.TypeAdapter(dt.timedelta).validate_python(stored["took"]) == value["took"]
        assert db.errors() == []


def nested(texts: list[str]) -> list[Any]:
    """Each text in three lists, "deep" in 100,001 (deeper than ``json.dumps`` can write)."""
    outputs: list[Any] = []
    for text in texts:
        value: Any = [text]
        for _ in range(100_000 if text == "deep" else 2):
            value = [value]
        outputs.append(value)
    return outputs


def test_a_json_output_nested_deeper_than_json_can_be_written_is_refused_alone(sql: SQLClient) -> None:
    # json.dumps raises RecursionError: it used to fail every row of the batch.
    make_table(sql, "docs", [(1, "a"), (2, "deep"), (3, "c")])

    with reactive.connect(sql.uri) as db:
        db.add(Listener(Model("j", predict=nested, output_type="json"), "text", "docs"))
        assert outputs_by_source(db, "j__text") == {1: [[["a"]]], 3: [[["c"]]]}
        [error] = db.errors("j__text")
        assert error["source"] == 2 and error["error"].startswith("output is nested too deeply to be written as JSON")


@pytest.mark.parametrize("rows", [3, 100], ids=["few rows", "many rows"])
@pytest.mark.parametrize(
    ("output_type", "bad"),
    [
        ("float64", float("nan")),
        ("float64", float("inf")),
        ("float64", 2**53 + 1),
        ("int64", 2**63),
        ("int64", -(2**63) - 1),
    ],
    ids=["nan", "infinity", "an int float64 would round", "int64 max + 1", "int64 min - 1"],
)
def test_a_scalar_that_does_not_fit_its_type_is_refused_alone(
    sql: SQLClient, rows: int, output_type: str, bad: float | int
) -> None:
    """A window of a few outputs is checked value by value, a larger one with numpy: both
    store every output that fits and refuse only the one that does not, with why."""
    make_table(sql, "docs", [(i, "bad" if i == 2 else f"t{i}") for i in range(1, rows + 1)])

    def predict(texts: list[str]) -> list[float | int]:
        return [bad if t == "bad" else (1.5 if output_type == "float64" else 7) for t in texts]

    with reactive.connect(sql.uri) as db:
        db.add(Listener(Model("s", predict=predict, output_type=output_type), "text", "docs"))
        stored = outputs_by_source(db, "s__text")
        assert sorted(stored) == [i for i in range(1, rows + 1) if i != 2]
        assert set(stored.values()) == {1.5 if output_type == "float64" else 7}
        [error] = db.errors("s__text")
        assert error["source"] == 2 and output_type in error["error"]


@pytest.mark.parametrize("output_type", ["string", "array<string>"])
def test_a_text_the_database_cannot_hold_is_refused_alone(sql: SQLClient, output_type: str) -> None:
    """A lone surrogate (what decoding bytes with errors="surrogateescape" leaves) is no
    database's text, and PostgreSQL's text cannot hold NUL: those outputs are refused with
    why, the window's others are stored (either used to fail the whole window, every time
    it came again). JSON writes both as escapes, so a JSON output keeps them."""
    texts = {"fine": "ok", "nul": "a\x00b", "surrogate": "x\udc80y", "emoji": "\U0001f600"}
    make_table(sql, "docs", [(i, name) for i, name in enumerate(texts, start=1)])

    def predict(names: list[str]) -> list[object]:
        return [texts[n] if output_type == "string" else [texts[n], None] for n in names]

    with reactive.connect(sql.uri) as db:
        db.add(Listener(Model("s", predict=predict, output_type=output_type), "text", "docs"))
        db.add(Listener(Model("j", predict=lambda names: [{"t": texts[n]} for n in names]), "text", "docs"))
        stored = outputs_by_source(db, "s__text")
        errors = {e["source"]: e["error"] for e in db.errors("s__text")}
        nul_stored = sql.kind != "postgres"
        assert sorted(stored) == ([1, 2, 4] if nul_stored else [1, 4])
        assert stored[4] == (texts["emoji"] if output_type == "string" else [texts["emoji"], None])
        assert sorted(errors) == ([3] if nul_stored else [2, 3])
        assert "a lone surrogate" in errors[3]
        if not nul_stored:
            assert "NUL character" in errors[2]
        assert outputs_by_source(db, "j__text") == {i: {"t": t} for i, t in enumerate(texts.values(), start=1)}
        assert db.errors("j__text") == []


def test_an_error_message_quoting_odd_text_is_recorded_with_escapes(sql: SQLClient) -> None:
    """A model's error that quotes its input as it is (NUL, a lone surrogate) used to make
    recording the window's errors fail: the rows were neither computed nor recorded."""
    make_table(sql, "docs", [(1, "ok"), (2, "nul"), (3, "surrogate")])
    quoted = {"nul": "a\x00b", "surrogate": "x\udc80y"}

    def predict(names: list[str]) -> list[float]:
        for name in names:
            if name in quoted:
                raise ValueError(f"cannot read {quoted[name]}")
        return [1.0] * len(names)

    with reactive.connect(sql.uri) as db:
        db.add(Listener(Model("m", predict=predict, max_retries=0), "text", "docs"))
        assert outputs_by_source(db, "m__text") == {1: 1.0}
        errors = {e["source"]: e["error"] for e in db.errors("m__text")}
        assert errors == {2: "ValueError: cannot read a\\x00b", 3: "ValueError: cannot read x\\udc80y"}


def test_sqlite_ids_of_another_type_than_the_column_are_left_out_and_counted(
    tmp_path, recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    """A SQLite column without a declared type (or of any type but INTEGER PRIMARY KEY) keeps
    ids of every type; ibis types it from its first row. Ids of another type failed db.add
    ("datatype mismatch" on the snapshot's key); one inserted later failed its window, and its
    setting apart, again and again (wait_idle never True). Such rows are left out, as rows
    without an id are, and db.add says how many."""
    path = tmp_path / "app.sqlite"
    client = sqlite3.connect(str(path), isolation_level=None)
    client.execute("CREATE TABLE docs (id PRIMARY KEY, text)")
    client.executemany("INSERT INTO docs VALUES (?, ?)", [(1, "a"), ("two", "b"), (3.5, "c"), (b"4", "d"), (5, "e")])
    with caplog.at_level(logging.WARNING, logger="reactive"), reactive.connect(f"sqlite:///{path}") as db:
        db.add(Listener(Model("m", predict=recorder), "text", "docs"), progress=False)
        assert "3 rows of table 'docs' have an id ('id') that is not int64 (SQLite keeps" in caplog.text
        assert outputs_by_source(db, "m__text") == {1: "<a>", 5: "<e>"}
        (listed,) = database_status(f"sqlite:///{path}")["listeners"]
        assert (listed["rows"], listed["lag"]) == (2, 0)
        db.cdc.start()
        client.execute("INSERT INTO docs VALUES ('six', 'f')")
        client.execute("INSERT INTO docs VALUES (7, 'g')")
        client.execute("UPDATE docs SET text = 'A' WHERE id = 1")
        assert db.cdc.wait_idle(timeout=30)
        assert outputs_by_source(db, "m__text") == {1: "<A>", 5: "<e>", 7: "<g>"}
        # Once stored as the column's type, a row is followed.
        client.execute("UPDATE docs SET id = 2 WHERE id = 'two'")
        assert db.cdc.wait_idle(timeout=30)
        assert outputs_by_source(db, "m__text") == {1: "<A>", 2: "<b>", 5: "<e>", 7: "<g>"}
        assert sorted(recorder.inputs) == ["A", "a", "b", "e", "g"]
        assert db.errors() == [] and db.cdc.info()["handler"]["internal_errors"] == 0
    client.close()


def test_a_table_of_the_application_named_as_a_listeners_outputs_is_refused_and_kept(sql: SQLClient) -> None:
    def lengths(texts: list[str]) -> list[int]:
        return [len(t) for t in texts]

    # It was read and written as outputs: each statement failed with the driver's error
    # ("no such column: _outputs__m__text._source") after a log line that adding the listener
    # again resumes its backfill, which could not help.
    sql.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text VARCHAR(10))")
    sql.execute("INSERT INTO docs VALUES (1, 'x')")
    sql.execute("CREATE TABLE _outputs__m__text (id INTEGER PRIMARY KEY, note VARCHAR(10) NOT NULL)")
    sql.execute("INSERT INTO _outputs__m__text VALUES (1, 'precious')")
    with reactive.connect(sql.uri) as db:
        with pytest.raises(reactive.ConfigurationError, match=r"exists with other columns \(id, note\)"):
            db.add(Listener(Model("m", predict=lengths), "text", "docs"))
        assert db.show() == []
        db.add(Listener(Model("m", predict=lengths), "text", "docs", identifier="m2"))
        assert outputs_by_source(db, "m2") == {1: 1}
    assert sql.execute("SELECT * FROM _outputs__m__text") == [(1, "precious")]


def test_a_table_of_the_application_named_as_reactives_checkpoints_is_refused_and_kept(sql: SQLClient) -> None:
    # Every checkpoint call failed with the driver's error ("table _reactive_checkpoints has no
    # column named key"): db.cdc.start() (the lease), db.add, checkpoints.Table's Write; its
    # Read said {}.
    from reactive.checkpoints import Table

    sql.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text VARCHAR(10))")
    sql.execute("CREATE TABLE _reactive_checkpoints (id INTEGER PRIMARY KEY, note VARCHAR(10) NOT NULL)")
    sql.execute("INSERT INTO _reactive_checkpoints VALUES (1, 'precious')")
    says = r"table '_reactive_checkpoints' exists with other columns \(id, note\): it is not reactive's"
    with reactive.connect(sql.uri) as db:
        with pytest.raises(reactive.ConfigurationError, match=says):
            db.cdc.start()
        assert not db.cdc.running  # a start after this one tries again
        jobs = Table("jobs", Table.WR_ALL_REPLICAS, None, 8, 64, 32, store=db)
        for call in (lambda: jobs.Write("cursor", "42"), lambda: jobs.Read(["cursor"])):
            with pytest.raises(reactive.ConfigurationError, match=says):
                call()
    assert sql.execute("SELECT * FROM _reactive_checkpoints") == [(1, "precious")]
    assert not reactive_threads()


def test_dropping_the_outputs_a_chained_listener_reads_is_refused(duck: SQLClient) -> None:
    # The outputs table was dropped under the chained listener: it kept outputs of rows gone,
    # nothing said so, and a new process could not declare it (the table it selects was missing).
    duck.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text VARCHAR)")
    duck.execute("INSERT INTO docs VALUES (1, 'a'), (2, 'bb')")
    with reactive.connect(duck.uri) as db:
        db.add(Listener(Model("words", predict=lambda texts: [len(t) for t in texts]), "text", "docs"))
        db.add(Listener(Model("twice", predict=lambda ns: [2 * n for n in ns]), "_output", "_outputs__words__text"))
        with pytest.raises(reactive.ConfigurationError, match="'twice___output' reads the outputs of 'words__text'"):
            db.remove("words__text", drop_outputs=True)
        assert [c["identifier"] for c in db.show()] == ["words__text", "twice___output"]
        assert outputs_by_source(db, "words__text") == {1: 1, 2: 2}
        db.remove("twice___output", drop_outputs=True)
        db.remove("words__text", drop_outputs=True)
        assert db.show() == []


def test_sqlite_text_holding_nul_is_followed_as_id_and_as_value(tmp_path, recorder: Recorder) -> None:
    """SQLite keeps a NUL inside a text, and its text functions stop at the first one: a row
    whose id held one was never computed (its id, sent as JSON to the read by id, came back cut
    short and matched nothing), an update of it was reported as its delete, and a change past
    a NUL in any text column left the row's fingerprint as it was: unseen, its output stale."""
    path = tmp_path / "app.sqlite"
    client = sqlite3.connect(str(path), isolation_level=None)
    client.execute("CREATE TABLE docs (id TEXT PRIMARY KEY, text TEXT)")
    client.executemany("INSERT INTO docs VALUES (?, ?)", [("a\x00b", "x\x00y"), ("plain", "world")])
    with reactive.connect(f"sqlite:///{path}", poll_interval=0.05) as db:
        db.add(Listener(Model("m", predict=recorder), "text", "docs"), progress=False)
        assert outputs_by_source(db, "m__text") == {"a\x00b": "<x\x00y>", "plain": "<world>"}
        db.cdc.start()
        client.execute("UPDATE docs SET text = ? WHERE id = ?", ("x\x00z", "a\x00b"))
        client.execute("INSERT INTO docs VALUES (?, 'new')", ("c\x00d",))
        assert db.cdc.wait_idle(timeout=30)
        assert outputs_by_source(db, "m__text") == {"a\x00b": "<x\x00z>", "c\x00d": "<new>", "plain": "<world>"}
        client.execute("DELETE FROM docs WHERE id = ?", ("a\x00b",))
        assert db.cdc.wait_idle(timeout=30)
        assert outputs_by_source(db, "m__text") == {"c\x00d": "<new>", "plain": "<world>"}
        assert db.errors() == [] and db.cdc.info()["handler"]["internal_errors"] == 0
    client.close()


@pytest.mark.parametrize(
    ("ddl", "rowid"),
    [
        ("CREATE TABLE docs (id INTEGER PRIMARY KEY, text TEXT)", True),
        ("CREATE TABLE docs (id integer, text TEXT, PRIMARY KEY (id DESC))", True),
        ("CREATE TABLE docs (id INTEGER PRIMARY KEY, text TEXT) STRICT", True),
        # Not the rowid: each keeps text in its INTEGER column.
        ("CREATE TABLE docs (id INTEGER PRIMARY KEY DESC, text TEXT)", False),
        ("CREATE TABLE docs (id INT PRIMARY KEY, text TEXT)", False),
        ("CREATE TABLE docs (id INTEGER NOT NULL PRIMARY KEY, text TEXT) WITHOUT ROWID", False),
    ],
    ids=["integer primary key", "table constraint DESC", "strict", "column DESC", "int", "without rowid"],
)
def test_a_sqlite_rowid_id_is_read_without_a_type_filter_and_other_integer_ids_with_one(
    tmp_path, recorder: Recorder, ddl: str, rowid: bool
) -> None:
    """Only a rowid (SQLite's INTEGER PRIMARY KEY) holds nothing but integers, never NULL:
    its rows need no TYPEOF filter, which cost db.add 0.1 s at 1M rows (the count of rows
    followed, and of those not). Every other INTEGER id keeps its filter, or a text id would
    reach a snapshot keyed by integers."""
    path = tmp_path / "app.sqlite"
    client = sqlite3.connect(str(path), isolation_level=None)
    client.execute(ddl)
    client.executemany("INSERT INTO docs VALUES (?, ?)", [(1, "a"), (2, "b")])
    with reactive.connect(f"sqlite:///{path}", poll_interval=0.05) as db:
        db.add(Listener(Model("m", predict=recorder), "text", "docs"), progress=False)
        statements = db.backend.conn.statements("docs", "id", ["id"])
        assert (statements.unfollowed is None) == rowid and ("TYPEOF" in statements.count) != rowid
        db.cdc.start()
        if not rowid:
            client.execute("INSERT INTO docs VALUES ('three', 'c')")
        client.execute("INSERT INTO docs VALUES (4, 'd')")
        client.execute("DELETE FROM docs WHERE id = 1")
        assert db.cdc.wait_idle(timeout=30)
        assert outputs_by_source(db, "m__text") == {2: "<b>", 4: "<d>"}
        assert db.errors() == [] and db.cdc.info()["handler"]["internal_errors"] == 0
    client.close()


def test_an_empty_sqlite_table_without_column_types_is_a_clear_error(tmp_path, recorder: Recorder) -> None:
    # ibis types such columns from the first row; with none it raised its own IbisError.
    path = tmp_path / "app.sqlite"
    with sqlite3.connect(str(path)) as client:
        client.execute("CREATE TABLE docs (id PRIMARY KEY, text)")
    with reactive.connect(f"sqlite:///{path}") as db:
        with pytest.raises(reactive.ConfigurationError, match="without a declared type and no rows") as failed:
            db.add(Listener(Model("m", predict=recorder), "text", "docs"))
        assert "declare each column's type" in str(failed.value) and failed.value.table == "docs"
        assert db.show() == []


def test_a_sqlite_text_that_is_not_utf8_is_read_with_its_odd_bytes_as_surrogates(tmp_path) -> None:
    """SQLite keeps whatever bytes a client writes as TEXT. One such row made every
    statement over its table fail ("user-defined function raised exception": the row
    fingerprint could not take the text), so db.add failed for it and for the next table
    added. The row is now read as Python reads an odd file name (surrogateescape)."""
    path = tmp_path / "app.sqlite"
    client = sqlite3.connect(str(path))
    client.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text TEXT)")
    client.execute("CREATE TABLE other (id INTEGER PRIMARY KEY, text TEXT)")
    client.execute("INSERT INTO docs VALUES (1, 'fine'), (2, CAST(X'61FF62' AS TEXT))")
    client.execute("INSERT INTO other VALUES (1, 'also fine')")
    client.commit()
    seen: list[str] = []

    def predict(texts: list[str]) -> list[int]:
        seen.extend(texts)
        return [len(t) for t in texts]

    with reactive.connect(f"sqlite:///{path}", poll_interval=0.05) as db:
        db.add(Listener(Model("m", predict=predict), "text", "docs"))
        db.add(Listener(Model("n", predict=predict), "text", "other"))
        assert outputs_by_source(db, "m__text") == {1: 4, 2: 3}
        assert outputs_by_source(db, "n__text") == {1: 9}
        assert "a\udcffb" in seen
        db.cdc.start()
        client.execute("INSERT INTO docs VALUES (3, CAST(X'FE' AS TEXT))")
        client.execute("UPDATE docs SET text = 'now fine' WHERE id = 2")
        client.commit()
        assert db.cdc.wait_idle(timeout=30)
        assert outputs_by_source(db, "m__text") == {1: 4, 2: 8, 3: 1}
        assert db.errors("m__text") == [] and db.cdc.info()["source"]["failing_tables"] == {}
    client.close()


# -- long names (PostgreSQL keeps 63 bytes) ---------------------------------------------------------
def test_long_table_and_listener_names_stay_distinct(sql: SQLClient, recorder: Recorder) -> None:
    """A 50-character table is watched (its snapshot's name would pass 63 bytes), and two
    identifiers sharing their first 60 characters write to two outputs tables."""
    table = "t" * 50
    make_table(sql, table, [(1, "a")])
    shared = "m" * 60
    with reactive.connect(sql.uri, poll_interval=0.05) as db:
        db.add(Listener(Model("one", predict=recorder), "text", table, identifier=f"{shared}_one"))
        db.add(
            Listener(Model("two", predict=lambda xs: [x * 2 for x in xs]), "text", table, identifier=f"{shared}_two")
        )
        db.cdc.start()
        sql.execute(f"INSERT INTO {table} VALUES (2, 'b')")
        sql.execute(f"UPDATE {table} SET text = 'A' WHERE id = 1")
        assert db.cdc.wait_idle(timeout=30)
        assert outputs_by_source(db, f"{shared}_one") == {1: "<A>", 2: "<b>"}
        assert outputs_by_source(db, f"{shared}_two") == {1: "AA", 2: "bb"}
        names = [row["outputs"] for row in db.show()]
        assert len(set(names)) == 2 and all(len(name.encode()) <= 63 for name in names)
        assert db.cdc.info()["source"]["failing_tables"] == {}


def test_a_postgres_name_over_63_bytes_is_refused_clearly(pg_database: str, recorder: Recorder) -> None:
    with reactive.connect(pg_database) as db, pytest.raises(reactive.ConfigurationError, match="at most 63 bytes"):
        db.add(Listener(Model("m", predict=recorder), "text", "d" * 64))


# -- an outputs table dropped by someone else -------------------------------------------------------
def test_a_dropped_outputs_table_is_created_and_filled_again(sql: SQLClient, recorder: Recorder) -> None:
    make_table(sql, "docs", [(1, "a"), (2, "b")])
    with reactive.connect(sql.uri, poll_interval=0.05) as db:
        db.add(Listener(Model("m", predict=recorder), "text", "docs"))
        db.cdc.start()
        assert db.cdc.wait_idle(timeout=30)
        sql.execute('DROP TABLE "_outputs__m__text"')
        assert db.outputs("m__text") == []
        sql.execute("INSERT INTO docs VALUES (3, 'c')")
        # The next change recreates the table; the rows nobody touched are computed again.
        assert db.cdc.wait_idle(timeout=30)
        assert outputs_by_source(db, "m__text") == {1: "<a>", 2: "<b>", 3: "<c>"}
        assert db.errors() == []
        db.cdc.stop()
        sql.execute('DROP TABLE "_outputs__m__text"')
    # Dropped while nothing ran: db.add after a restart creates and fills it again.
    with reactive.connect(sql.uri, poll_interval=0.05) as db:
        db.add(Listener(Model("m", predict=recorder), "text", "docs"))
        assert outputs_by_source(db, "m__text") == {1: "<a>", 2: "<b>", 3: "<c>"}
        assert db.errors() == []


def test_a_key_of_a_type_the_model_cannot_take_is_recorded_for_its_row(tmp_path, recorder: Recorder) -> None:
    """SQLite keeps any value in an untyped column; MongoDB's case is in test_mongodb."""
    path = tmp_path / "app.sqlite"
    with sqlite3.connect(path) as client:
        client.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text)")
        client.executemany("INSERT INTO docs VALUES (?, ?)", [(1, "a"), (2, 7), (3, "c")])
    with reactive.connect(f"sqlite:///{path}") as db:
        db.add(Listener(Model("up", predict=lambda xs: [x.upper() for x in xs], max_retries=0), "text", "docs"))
        assert outputs_by_source(db, "up__text") == {1: "A", 3: "C"}
        [error] = db.errors("up__text")
        assert error["source"] == 2 and error["error"] == "AttributeError: 'int' object has no attribute 'upper'"


# -- MongoDB ------------------------------------------------------------------------------------------
def test_a_collection_that_does_not_exist_yet_is_an_empty_one(mongo_uri: str, mongo, recorder: Recorder) -> None:
    """MongoDB creates a collection at its first insert: listeners are declared before data arrives."""
    with reactive.connect(mongo_uri) as db:
        db.add(Listener(Model("m", predict=recorder), "text", "later"))
        assert db.outputs("m__text") == []
        db.cdc.start()
        mongo.later.insert_one({"_id": 1, "text": "first"})
        assert db.cdc.wait_idle(timeout=30)
        assert outputs_by_source(db, "m__text") == {1: "<first>"}


def test_a_table_monitor_on_a_collection_that_does_not_exist_yet_sees_its_first_insert(mongo_uri: str, mongo) -> None:
    seen: queue.Queue[dict] = queue.Queue()
    with reactive.connect(mongo_uri) as db:
        monitor = TableMonitor.Client(db, "later", [TableMonitor.Callback(Type.INSERT_DECODED, seen.put)])
        monitor.start_monitor()
        mongo.later.insert_one({"_id": 1, "text": "first"})
        assert seen.get(timeout=30) == {"_id": 1, "text": "first"}
        monitor.stop_monitor()


def test_a_dropped_outputs_collection_is_filled_again(mongo_uri: str, mongo, recorder: Recorder) -> None:
    mongo.docs.insert_many([{"_id": 1, "text": "a"}, {"_id": 2, "text": "b"}])
    with reactive.connect(mongo_uri) as db:
        db.add(Listener(Model("m", predict=recorder), "text", "docs"))
    # A restart whose backfill writes nothing: the collection is known to exist all the same.
    with reactive.connect(mongo_uri) as db:
        db.add(Listener(Model("m", predict=recorder), "text", "docs"))
        db.cdc.start()
        mongo.drop_collection("_outputs__m__text")
        mongo.docs.insert_one({"_id": 3, "text": "c"})
        assert db.cdc.wait_idle(timeout=30)
        # The change that reveals the loss starts the refill; it runs beside the handler.
        for thread in reactive_threads():
            if thread.name == "reactive-outputs-refill":
                thread.join(30)
        assert db.cdc.wait_idle(timeout=30)
        assert outputs_by_source(db, "m__text") == {1: "<a>", 2: "<b>", 3: "<c>"}
        db.cdc.stop()
        mongo.drop_collection("_outputs__m__text")
    with reactive.connect(mongo_uri) as db:
        db.add(Listener(Model("m", predict=recorder), "text", "docs"))
        assert outputs_by_source(db, "m__text") == {1: "<a>", 2: "<b>", 3: "<c>"}
        assert db.errors() == []


def test_a_document_whose_fields_are_reordered_is_not_computed_again(mongo_uri: str, mongo, recorder: Recorder) -> None:
    """Field order is not part of a value: inputs are fingerprinted with sorted keys, so a
    reordered document (or key) is the same input. Ids keep their order (see id_key)."""
    mongo.docs.insert_one({"_id": 1, "meta": {"a": 1, "b": 2}, "text": "x"})
    with reactive.connect(mongo_uri) as db:
        db.add(Listener(Model("m", predict=recorder), "meta", "docs"))
        db.cdc.start()
        mongo.docs.replace_one({"_id": 1}, {"text": "x", "meta": {"b": 2, "a": 1}})
        assert db.cdc.wait_idle(timeout=30)
        assert recorder.inputs == [{"a": 1, "b": 2}]
        assert db.cdc.info()["listeners"]["m__meta"]["skipped"] == 1


def test_a_json_output_nested_too_deeply_is_refused_alone_on_mongodb(mongo_uri: str, mongo) -> None:
    mongo.docs.insert_many([{"_id": 1, "text": "a"}, {"_id": 2, "text": "deep"}, {"_id": 3, "text": "c"}])

    with reactive.connect(mongo_uri) as db:
        db.add(Listener(Model("j", predict=nested, output_type="json"), "text", "docs"))
        assert outputs_by_source(db, "j__text") == {1: [[["a"]]], 3: [[["c"]]]}
        [error] = db.errors("j__text")
        assert error["source"] == 2 and error["error"].startswith("output is nested too deeply to be written as JSON")

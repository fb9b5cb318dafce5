"""The listener flow on Kinetica, with every write made by a foreign client: the official ``gpudb``.

``reactive`` runs against tests/kinetica_server.py (REST + ZMQ table monitors); the rows are
inserted, updated and deleted with ``GPUdb`` / ``GPUdbTable`` as another application would.
Processing is awaited with ``db.cdc.wait_idle`` (a barrier through the server) or an Event,
never with a sleep.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses as dc
import datetime as dt
import io
import json
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import fastavro
import numpy as np
import pytest
from conftest import (
    Recorder,
    add_constant_listeners,
    add_filtered_lengths,
    looked,
    outputs_by_source,
    outputs_of,
    scanned_pages,
    types_of,
)
from gpudb import GPUdb, GPUdbColumnProperty, GPUdbRecordColumn, GPUdbRecordType, GPUdbTable
from kinetica_server import KineticaTestServer

import reactive
from reactive.backends.kinetica.listener import MONITORS_CHECKPOINT
from reactive.components import Listener, Model
from reactive.errors import BackendError, MissingIdColumnError, TableNotFoundError
from reactive.status import database_status
from reactive.threads import reactive_threads

WAIT = 10.0  # seconds: the upper bound for any one wait; normally well under a second


def docs_type(*, primary_key: bool = True) -> GPUdbRecordType:
    key = [GPUdbColumnProperty.PRIMARY_KEY] if primary_key else []
    return GPUdbRecordType(
        [
            GPUdbRecordColumn("id", "int", key),
            GPUdbRecordColumn("text", "string", is_nullable=True),
            GPUdbRecordColumn("lang", "string"),
        ],
        label="docs",
    )


@pytest.fixture
def foreign(kinetica_server: KineticaTestServer) -> GPUdb:
    """The official client on the test server: the application that writes the rows."""
    return GPUdb(host=kinetica_server.url, options=GPUdb.Options({"disable_failover": True}))


def create_table(db: GPUdb, name: str, rows: list[list[Any]], *, primary_key: bool = True) -> GPUdbTable:
    table = GPUdbTable(docs_type(primary_key=primary_key), name, db=db)
    if rows:
        table.insert_records(rows)
    return table


def connect(server: KineticaTestServer, **options: Any) -> reactive.Datalayer:
    options.setdefault("inactivity_timeout", 30.0)
    options.setdefault("connect_timeout", 5.0)
    return reactive.connect(server.uri(), **options)


def tag(recorder: Recorder) -> Model:
    return Model("tag", predict=recorder)


@contextlib.contextmanager
def following(server: KineticaTestServer, recorder: Recorder, **options: Any) -> Iterator[reactive.Datalayer]:
    """A datalayer whose listener ``tag__text`` follows ``docs``, started and caught up."""
    with connect(server, **options) as db:
        db.add(Listener(tag(recorder), "text", "docs"))
        db.cdc.start()
        assert db.cdc.wait_idle(timeout=WAIT)
        yield db


def topics_of(server: KineticaTestServer, table: str) -> dict[str, str]:
    """event -> topic of the server-side monitors on ``table`` (a qualified name)."""
    return {event: topic for topic, (name, event) in server.monitors().items() if name == table}


def watched_on_server(server: KineticaTestServer) -> set[str]:
    """The tables the server has monitors on."""
    return {table for table, _ in server.monitors().values()}


def source_info(db: reactive.Datalayer) -> dict[str, Any]:
    return db.cdc.info()["source"]


# -- 1. the flow ---------------------------------------------------------------------------------
def test_inserts_updates_and_deletes_by_the_official_client(
    kinetica_server: KineticaTestServer, foreign: GPUdb, recorder: Recorder
) -> None:
    docs = create_table(foreign, "docs", [[1, "alpha", "en"], [2, "beta", "en"], [3, "gamma", "en"]])
    with connect(kinetica_server) as db:
        db.add(Listener(tag(recorder), "text", "docs"))
        assert outputs_by_source(db, "tag__text") == {1: "<alpha>", 2: "<beta>", 3: "<gamma>"}
        db.cdc.start()
        assert db.cdc.wait_idle(timeout=WAIT)
        assert sorted(recorder.inputs) == ["alpha", "beta", "gamma"]  # the start reconciliation computed nothing

        docs.insert_records([[4, "delta", "en"], [5, "epsilon", "en"]])
        docs.update_records(["id = 2"], [{"text": "BETA"}])  # the listener's key
        docs.update_records(["id = 3"], [{"lang": "de"}])  # another column: nothing to compute
        docs.update_records(["id = 5"], [{"id": "50"}])  # the primary key: a row leaves, another comes
        docs.delete_records(["id = 1"])
        assert db.cdc.wait_idle(timeout=WAIT)
        expected = {2: "<BETA>", 3: "<gamma>", 4: "<delta>", 50: "<epsilon>"}
        assert outputs_by_source(db, "tag__text") == expected
        assert sorted(recorder.inputs) == ["BETA", "alpha", "beta", "delta", "epsilon", "epsilon", "gamma"]

        docs.delete_records(["lang = 'en'"])
        assert db.cdc.wait_idle(timeout=WAIT)
        assert outputs_by_source(db, "tag__text") == {3: "<gamma>"}
        assert len(recorder.inputs) == 7

        info = db.cdc.info()
        source = info["source"]
        assert (source["inserts"], source["updates"], source["deletes"]) == (2, 3, 4)
        assert source["reconciliations"] >= 2 and source["running"]
        assert (source["decode_errors"], source["unknown_frames"], source["recoveries"]) == (0, 0, 0)
        assert source["tables"] == ["docs"] and source["server_monitors"] == 4
        stats = info["listeners"]["tag__text"]
        assert stats["computed"] == 7 and stats["errors"] == 0
        assert stats["deletes"] >= 4
        assert info["handler"]["internal_errors"] == 0 and info["queue"]["rows"] == 0
        assert db.errors() == []
    assert not reactive_threads()


# -- 2. table names ------------------------------------------------------------------------------
def test_schema_qualified_and_unqualified_table_names(kinetica_server: KineticaTestServer, foreign: GPUdb) -> None:
    docs = create_table(foreign, "docs", [[1, "alpha", "en"]])  # lives in ki_home: ki_home.docs
    notes = create_table(foreign, "app.notes", [[1, "note", "en"]])
    with connect(kinetica_server) as db:
        db.add(Listener(Model("up", predict=lambda xs: [x.upper() for x in xs]), "text", "docs", identifier="plain"))
        db.add(Listener(Model("up", predict=lambda xs: [x.upper() for x in xs]), "text", "ki_home.docs"))
        db.add(Listener(Model("len", predict=lambda xs: [len(x) for x in xs]), "text", "app.notes"))
        db.cdc.start()
        docs.insert_records([[2, "beta", "en"]])
        docs.update_records(["id = 1"], [{"text": "first"}])
        notes.insert_records([[2, "longer note", "en"]])
        notes.delete_records(["id = 1"])
        assert db.cdc.wait_idle(timeout=WAIT)
        assert outputs_by_source(db, "plain") == {1: "FIRST", 2: "BETA"}
        assert outputs_by_source(db, "up__text") == {1: "FIRST", 2: "BETA"}
        assert outputs_by_source(db, "len__text") == {2: 11}
        assert sorted(source_info(db)["tables"]) == ["app.notes", "docs", "ki_home.docs"]
        assert watched_on_server(kinetica_server) == {"ki_home._reactive_marks", "ki_home.docs", "app.notes"}
    assert kinetica_server.monitors() == {}


# -- 3. chains -----------------------------------------------------------------------------------
def test_chained_listeners(kinetica_server: KineticaTestServer, foreign: GPUdb) -> None:
    docs = create_table(foreign, "docs", [[1, "a b c", "en"]])
    counted: list[list[str]] = []

    def count(lists: list[list[str]]) -> list[int]:
        counted.extend(lists)
        return [len(words) for words in lists]

    with connect(kinetica_server) as db:
        db.add(Listener(Model("words", predict=lambda texts: [t.split() for t in texts]), "text", "docs"))
        db.add(Listener(Model("count", predict=count), "_output", "_outputs__words__text"))
        assert outputs_by_source(db, "count___output") == {1: 3}
        db.cdc.start()
        docs.insert_records([[2, "d e", "en"]])
        docs.update_records(["id = 1"], [{"text": "x"}])
        docs.update_records(["id = 2"], [{"lang": "de"}])
        assert db.cdc.wait_idle(timeout=WAIT)
        assert outputs_by_source(db, "words__text") == {1: ["x"], 2: ["d", "e"]}
        assert outputs_by_source(db, "count___output") == {1: 1, 2: 2}

        docs.delete_records(["id = 2"])
        assert db.cdc.wait_idle(timeout=WAIT)
        assert outputs_by_source(db, "words__text") == {1: ["x"]}
        assert outputs_by_source(db, "count___output") == {1: 1}
        # Each computed once; inserts and updates come on different monitor topics, in either order.
        assert sorted(counted) == [["a", "b", "c"], ["d", "e"], ["x"]]


# -- 4. and 5. restarts of reactive --------------------------------------------------------------
def test_a_restart_without_changes_computes_nothing(
    kinetica_server: KineticaTestServer, foreign: GPUdb, recorder: Recorder
) -> None:
    docs = create_table(foreign, "docs", [[1, "alpha", "en"], [2, "beta", "en"]])
    with connect(kinetica_server) as db:
        db.add(Listener(tag(recorder), "text", "docs"))
        db.cdc.start()
        docs.insert_records([[3, "gamma", "en"]])
        docs.update_records(["id = 1"], [{"text": "ALPHA"}])
        assert db.cdc.wait_idle(timeout=WAIT)
        before = outputs_by_source(db, "tag__text")
    assert kinetica_server.monitors() == {}
    calls = recorder.calls

    with following(kinetica_server, recorder) as db:
        assert recorder.calls == calls
        assert outputs_by_source(db, "tag__text") == before == {1: "<ALPHA>", 2: "<beta>", 3: "<gamma>"}
        assert db.cdc.info()["listeners"].get("tag__text", {}).get("computed", 0) == 0


def test_a_filter_holding_a_lone_surrogate_matches_no_row_and_fails_nothing(
    kinetica_server: KineticaTestServer, foreign: GPUdb
) -> None:
    """No JSON request can carry a lone surrogate: put in the scan's expression, it would fail
    db.add. It is left to Python, where no row's text equals it."""
    create_table(foreign, "docs", [[i, "t", "en"] for i in range(3)])
    with connect(kinetica_server) as db:
        db.add(Listener(Model("odd", predict=lambda xs: xs), "text", "docs", filter={"lang": "\udc80"}))
        assert outputs_by_source(db, "odd__text") == {} and db.errors() == []


def test_a_chained_listener_filtering_a_json_output_by_text_finds_its_rows(
    kinetica_server: KineticaTestServer, foreign: GPUdb
) -> None:
    """An outputs table's _output is read decoded: a JSON output holding the text "spam" is
    stored as '"spam"'; narrowing the chained listener's scan by it would have left the row out."""
    create_table(foreign, "docs", [[1, "a", "en"], [2, "b", "en"]])
    labels = {"a": {"label": "ham"}, "b": "spam"}  # the first batch's dict fixes json
    with connect(kinetica_server) as db:
        db.add(Listener(Model("tag", predict=lambda xs: [labels[x] for x in xs]), "text", "docs"))
        flag = Model("flag", predict=lambda xs: ["!" for _ in xs])
        db.add(Listener(flag, "_output", "_outputs__tag__text", filter={"_output": "spam"}))
        assert outputs_by_source(db, "flag___output") == {2: "!"}


def test_a_filter_narrows_a_reconciliations_scan_and_rows_that_left_it_lose_their_outputs(
    kinetica_server: KineticaTestServer, foreign: GPUdb, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A filtered listener's reconciliation read every row to compare each with the filter in
    Python; its scan's expression now asks for the text, whole-number and null equalities the
    server tests as Python does or more loosely. Rows that left the filter while no process ran
    lose their outputs at the restart."""
    from reactive.backends.kinetica.stores import KineticaSource

    scanned = scanned_pages(monkeypatch, KineticaSource)
    docs = create_table(foreign, "docs", [[i, f"t{i}", f"l{i % 20}"] for i in range(200)])
    filters = {"lang": {"lang": "l7"}, "row": {"id": 9, "lang": "l9"}}

    with connect(kinetica_server) as db:
        first = add_filtered_lengths(db, filters)
    assert set(first["lang"]) == {i for i in range(200) if i % 20 == 7} and set(first["row"]) == {9}
    assert sum(scanned) == 10 + 1
    docs.update_records(["id = 7"], [{"lang": "l8"}])  # leaves the filter
    scanned.clear()
    with connect(kinetica_server) as db:
        again = add_filtered_lengths(db, filters)
    assert again["lang"] == {i: len(f"t{i}") for i in first["lang"] if i != 7}
    assert again["row"] == first["row"]
    assert sum(scanned) == 9 + 1


def test_changes_made_while_stopped_are_caught_at_start_and_computed_once(
    kinetica_server: KineticaTestServer, foreign: GPUdb, recorder: Recorder
) -> None:
    docs = create_table(foreign, "docs", [[1, "alpha", "en"], [2, "beta", "en"], [3, "gamma", "en"]])
    with following(kinetica_server, recorder) as db:
        db.cdc.stop()
        assert kinetica_server.monitors() == {}  # nobody listens: the server publishes nothing

        recorder.inputs.clear()
        docs.insert_records([[4, "delta", "en"]])
        docs.update_records(["id = 1"], [{"text": "ALPHA"}])
        docs.update_records(["id = 2"], [{"lang": "de"}])
        docs.delete_records(["id = 3"])
        db.cdc.start()
        assert db.cdc.wait_idle(timeout=WAIT)
        assert outputs_by_source(db, "tag__text") == {1: "<ALPHA>", 2: "<beta>", 4: "<delta>"}
        assert sorted(recorder.inputs) == ["ALPHA", "delta"]

    # and across processes: closed, changed, connected again, added, started
    recorder.inputs.clear()
    docs.insert_records([[5, "epsilon", "en"]])
    docs.update_records(["id = 4"], [{"text": "DELTA"}])
    docs.delete_records(["id = 1"])
    with following(kinetica_server, recorder) as db:
        assert outputs_by_source(db, "tag__text") == {2: "<beta>", 4: "<DELTA>", 5: "<epsilon>"}
        assert sorted(recorder.inputs) == ["DELTA", "epsilon"]


# -- 6. the server restarts ----------------------------------------------------------------------
def test_a_server_restart_mid_stream(kinetica_server: KineticaTestServer, foreign: GPUdb, recorder: Recorder) -> None:
    docs = create_table(foreign, "docs", [[1, "alpha", "en"], [2, "beta", "en"]])
    with connect(kinetica_server) as db:
        db.add(Listener(tag(recorder), "text", "docs"))
        db.cdc.start()
        docs.insert_records([[3, "gamma", "en"]])
        assert db.cdc.wait_idle(timeout=WAIT)

        kinetica_server.stop()
        kinetica_server.start()  # same ports, same tables, no table monitors
        docs.insert_records([[4, "delta", "en"]])
        docs.update_records(["id = 1"], [{"text": "ALPHA"}])
        docs.delete_records(["id = 2"])
        assert db.cdc.wait_idle(timeout=WAIT)
        assert outputs_by_source(db, "tag__text") == {1: "<ALPHA>", 3: "<gamma>", 4: "<delta>"}

        # the monitors are live again: later writes arrive as frames
        docs.insert_records([[5, "epsilon", "en"]])
        assert db.cdc.wait_idle(timeout=WAIT)
        assert outputs_by_source(db, "tag__text") == {1: "<ALPHA>", 3: "<gamma>", 4: "<delta>", 5: "<epsilon>"}
        source = source_info(db)
        assert source["recoveries"] == 1 and source["running"]
        assert len(kinetica_server.monitors()) == 4  # the old ones are not leaked
        assert sorted(recorder.inputs) == ["ALPHA", "alpha", "beta", "delta", "epsilon", "gamma"]
    assert kinetica_server.monitors() == {}


def test_a_refused_monitor_recreation_after_a_server_restart_is_retried(
    kinetica_server: KineticaTestServer, foreign: GPUdb, recorder: Recorder
) -> None:
    docs = create_table(foreign, "docs", [[1, "alpha", "en"]])
    with following(kinetica_server, recorder) as db:
        kinetica_server.stop()
        kinetica_server.fail_next("/create/tablemonitor", "the server is still starting")
        kinetica_server.start()
        docs.insert_records([[2, "beta", "en"]])
        assert db.cdc.wait_idle(timeout=WAIT)
        docs.insert_records([[3, "gamma", "en"]])
        assert db.cdc.wait_idle(timeout=WAIT)
        assert outputs_by_source(db, "tag__text") == {1: "<alpha>", 2: "<beta>", 3: "<gamma>"}
        assert len(kinetica_server.monitors()) == 4
        assert source_info(db)["recoveries"] == 1
    assert kinetica_server.monitors() == {}


def test_dates_and_datetimes_without_a_declared_type_are_kinetica_columns_and_times_stay_json(
    kinetica_server: KineticaTestServer, foreign: GPUdb
) -> None:
    """They were stored as reactive's tagged JSON text ({'__dt__': ...}); a datetime is a
    timestamp column now (to the millisecond, an aware one as its instant), a date a date
    column. Kinetica's outputs hold no time or interval: a time stays JSON, its ISO 8601 text
    (it was the tagged object), a timedelta JSON's ISO 8601 duration (it was refused)."""
    docs = create_table(foreign, "docs", [[1, "alpha", "en"]])
    moments = {
        "naive": dt.datetime(2024, 1, 2, 3, 4, 5, 123456),
        "aware": dt.datetime(2024, 1, 2, 5, 4, 5, 123456, tzinfo=dt.timezone(dt.timedelta(hours=2))),
        "day": dt.date(2024, 1, 2),
        "clock": dt.time(3, 4, 5),
        "span": dt.timedelta(days=1, seconds=5, microseconds=500000),
    }
    with connect(kinetica_server) as db:
        add_constant_listeners(db, moments)
        db.cdc.start()
        docs.insert_records([[2, "beta", "en"]])
        assert db.cdc.wait_idle(timeout=WAIT)
        stored = outputs_of(db, moments)
        kept = dt.datetime(2024, 1, 2, 3, 4, 5, 123000)
        assert stored == {
            "naive": {1: kept, 2: kept},
            "aware": {1: kept, 2: kept},
            "day": {1: dt.date(2024, 1, 2), 2: dt.date(2024, 1, 2)},
            "clock": {1: "03:04:05", 2: "03:04:05"},
            "span": {1: "P1DT5.5S", 2: "P1DT5.5S"},
        }
        assert types_of(db, moments) == {
            "naive": "timestamp",
            "aware": "timestamp",
            "day": "date",
            "clock": "json",
            "span": "json",
        }
        assert db.errors() == []


def test_a_declared_output_type_kinetica_cannot_hold_is_refused_at_add(
    kinetica_server: KineticaTestServer, foreign: GPUdb
) -> None:
    """Outputs of these types were written as JSON text, which has no form for them: every row
    failed with "TypeError: Object of type Decimal is not JSON serializable" (a map's int keys
    would have come back as text). Refused at db.add now, nothing registered or created.
    Timestamps and dates, which failed the same way, are Kinetica's own column types now."""
    docs = create_table(foreign, "docs", [[1, "alpha", "en"]])
    kinds = ["decimal(10, 2)", "time", "interval", "array<timestamp>", "array<binary>", "map<int64, string>"]
    with connect(kinetica_server) as db:
        for n, kind in enumerate(kinds):
            model = Model(f"bad{n}", predict=lambda xs: [None for _ in xs], output_type=kind)
            with pytest.raises(
                reactive.ConfigurationError, match=f"output type '{re.escape(kind)}' cannot be stored on kinetica"
            ):
                db.add(Listener(model, "text", "docs"))
        assert db.show() == []
        assert not [name for name in kinetica_server.tables if "_outputs__bad" in name]
        value = {"u": "00000000-0000-0000-0000-000000000007", "n": [2**63]}
        model = Model("ok", predict=lambda xs: [value for _ in xs], output_type="struct<u: uuid, n: array<uint64>>")
        db.add(Listener(model, "text", "docs"))
        assert outputs_by_source(db, "ok__text") == {1: value}
        # A naive time is UTC; an aware one is converted; what is finer than a millisecond is dropped.
        moments = {
            "alpha": dt.datetime(2024, 5, 1, 12, 0, 0, 250999),
            "beta": dt.datetime(2024, 5, 1, 14, 0, tzinfo=dt.timezone(dt.timedelta(hours=2))),
        }
        db.add(
            Listener(Model("at", predict=lambda xs: [moments[x] for x in xs], output_type="timestamp"), "text", "docs")
        )
        day = Model("day", predict=lambda xs: [moments[x].date() for x in xs], output_type="date")
        db.add(Listener(day, "text", "docs"))
        db.cdc.start()
        docs.insert_records([[2, "beta", "en"]])
        assert db.cdc.wait_idle(timeout=WAIT)
        assert outputs_by_source(db, "at__text") == {
            1: dt.datetime(2024, 5, 1, 12, 0, 0, 250000),
            2: dt.datetime(2024, 5, 1, 12, 0),
        }
        assert outputs_by_source(db, "day__text") == {1: dt.date(2024, 5, 1), 2: dt.date(2024, 5, 1)}
        stored = {r["_source"]: r["_output"] for r in kinetica_server.tables["ki_home._outputs__at__text"]}
        assert stored == {1: 1714564800250, 2: 1714564800000}
        assert db.errors() == []


# -- 7. vectors ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("output_type", "dtype"), [(None, "<f8"), ("array<float32>", "<f4")])
def test_vectors_are_stored_packed_and_read_back_equal(
    kinetica_server: KineticaTestServer, foreign: GPUdb, output_type: str | None, dtype: str
) -> None:
    docs = create_table(foreign, "docs", [[1, "alpha", "en"]])
    expected: dict[int, list[float]] = {}

    def model(texts: list[str]) -> list[list[float]]:
        return [[len(t) / 3, -1.25, 0.1, 1e-30] for t in texts]

    with connect(kinetica_server) as db:
        db.add(Listener(Model("vec", predict=model, output_type=output_type), "text", "docs"))
        db.cdc.start()
        docs.insert_records([[2, "beta", "en"]])
        docs.update_records(["id = 1"], [{"text": "a much longer text"}])
        assert db.cdc.wait_idle(timeout=WAIT)
        for row_id, text in ((1, "a much longer text"), (2, "beta")):
            expected[row_id] = np.asarray(model([text])[0], dtype=dtype).tolist()
        assert outputs_by_source(db, "vec__text") == expected
        stored = {r["_source"]: r["_output"] for r in kinetica_server.tables["ki_home._outputs__vec__text"]}
        assert stored == {i: np.asarray(v, dtype=dtype).tobytes() for i, v in expected.items()}


# -- 8. bad input --------------------------------------------------------------------------------
def test_a_table_without_primary_key_needs_id_column(kinetica_server: KineticaTestServer, foreign: GPUdb) -> None:
    docs = create_table(foreign, "docs", [[1, "alpha", "en"]], primary_key=False)
    with connect(kinetica_server) as db:
        with pytest.raises(MissingIdColumnError, match=r"id_column=") as raised:
            db.add(Listener(Model("up", predict=lambda xs: [x.upper() for x in xs]), "text", "docs"))
        assert "id, text, lang" in str(raised.value) and "no primary key" in str(raised.value)

        db.add(Listener(Model("up", predict=lambda xs: [x.upper() for x in xs]), "text", "docs", id_column="id"))
        db.cdc.start()
        docs.insert_records([[2, "beta", "en"]])
        docs.update_records(["id = 1"], [{"text": "first"}])
        assert db.cdc.wait_idle(timeout=WAIT)
        assert outputs_by_source(db, "up__text") == {1: "FIRST", 2: "BETA"}


def test_rows_whose_id_is_null_are_left_out_until_their_id_is_set(
    kinetica_server: KineticaTestServer, foreign: GPUdb, recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    # As on every backend (test_bad_input): no output or error can name a row without an id.
    # (Such a row failed its whole window here, recording errors against every row of it.)
    nullable = GPUdbRecordType(
        [GPUdbRecordColumn("id", "int", is_nullable=True), GPUdbRecordColumn("text", "string")], label="docs"
    )
    docs = GPUdbTable(nullable, "docs", db=foreign)
    docs.insert_records([[1, "a"], [None, "nobody"]])
    with caplog.at_level(logging.WARNING, logger="reactive"), connect(kinetica_server) as db:
        db.add(Listener(tag(recorder), "text", "docs", id_column="id"))
        assert "some rows of table 'docs' have no id ('id' is NULL): they are not followed" in caplog.text
        (listed,) = database_status(kinetica_server.uri())["listeners"]  # the rows followed: none behind
        assert (listed["rows"], listed["outputs"], listed["lag"]) == (1, 1, 0)
        db.cdc.start()
        docs.insert_records([[None, "later"], [3, "c"]])  # one frame: the row with an id goes on
        assert db.cdc.wait_idle(timeout=WAIT)
        assert "NaN or infinite" not in caplog.text  # the row with an id is not said to be odd
        assert outputs_by_source(db, "tag__text") == {1: "<a>", 3: "<c>"}
        assert sorted(recorder.inputs) == ["a", "c"] and db.errors() == []
        # Once its id is set, a row is followed; a row whose id becomes NULL loses its output.
        docs.update_records(["text = 'nobody'"], [{"id": "2"}])
        docs.update_records(["id = 1"], [{"id": None}])
        assert db.cdc.wait_idle(timeout=WAIT)
        assert outputs_by_source(db, "tag__text") == {2: "<nobody>", 3: "<c>"}
        assert db.errors() == []


def test_the_status_of_a_filtered_listener_counts_the_rows_its_filter_keeps(
    kinetica_server: KineticaTestServer, foreign: GPUdb, recorder: Recorder
) -> None:
    columns = [
        GPUdbRecordColumn("id", "int", [GPUdbColumnProperty.PRIMARY_KEY]),
        GPUdbRecordColumn("text", "string"),
        GPUdbRecordColumn("lang", "string", is_nullable=True),
    ]
    docs = GPUdbTable(GPUdbRecordType(columns, label="docs"), "docs", db=foreign)
    docs.insert_records([[1, "a", "en"], [2, "b", "de"], [3, "c", None], [4, "d", "en"]])
    with connect(kinetica_server) as db:
        db.add(Listener(tag(recorder), "text", "docs", filter={"lang": "en"}))
        (listed,) = database_status(kinetica_server.uri())["listeners"]  # the rows the filter keeps: none behind
        assert (listed["rows"], listed["outputs"], listed["lag"], listed["filter"]) == (2, 2, 0, {"lang": "en"})


def test_rows_whose_float_id_is_nan_or_infinite_are_left_out(
    kinetica_server: KineticaTestServer, foreign: GPUdb, recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    # No expression literal names NaN or an infinity, and NaN equals no id: such a row failed
    # every window it came in, recorded an error against the window's good rows, and its own
    # error records piled up (a NaN source never replaces the record before it).
    key = GPUdbRecordType(
        [GPUdbRecordColumn("id", "double", [GPUdbColumnProperty.PRIMARY_KEY]), GPUdbRecordColumn("text", "string")],
        label="docs",
    )
    docs = GPUdbTable(key, "docs", db=foreign)
    docs.insert_records([[1.5, "a"], [float("nan"), "b"], [float("inf"), "c"]])
    with caplog.at_level(logging.WARNING, logger="reactive"), connect(kinetica_server) as db:
        db.add(Listener(tag(recorder), "text", "docs"))
        assert "some rows of table 'docs' have an id ('id') that is NaN or infinite" in caplog.text
        (listed,) = database_status(kinetica_server.uri())["listeners"]  # the rows followed: none behind
        assert (listed["rows"], listed["outputs"], listed["lag"]) == (1, 1, 0)
        db.cdc.start()
        docs.insert_records([[float("-inf"), "e"], [3.5, "f"]])  # one frame: the finite id goes on
        assert db.cdc.wait_idle(timeout=WAIT)
        assert outputs_by_source(db, "tag__text") == {1.5: "<a>", 3.5: "<f>"}
        assert sorted(recorder.inputs) == ["a", "f"] and db.errors() == []
        # A row whose id becomes finite is followed; one whose id becomes infinite loses its output.
        docs.update_records(["text = 'b'"], [{"id": "2.5"}])
        docs.delete_records(["text = 'c'"])  # the row whose id is infinity: gone unseen
        docs.update_records(["id = 1.5"], [{"id": "1e400"}])
        assert db.cdc.wait_idle(timeout=WAIT)
        assert outputs_by_source(db, "tag__text") == {2.5: "<b>", 3.5: "<f>"}
        assert db.errors() == []


def test_a_bytes_id_column_is_refused_at_add(
    kinetica_server: KineticaTestServer, foreign: GPUdb, recorder: Recorder
) -> None:
    # Rows are read by id through expressions, which have no bytes literal: the backfill failed.
    key = GPUdbRecordType(
        [GPUdbRecordColumn("id", "bytes", [GPUdbColumnProperty.PRIMARY_KEY]), GPUdbRecordColumn("text", "string")],
        label="blobs",
    )
    GPUdbTable(key, "blobs", db=foreign).insert_records([[b"\x00\xff", "a"]])
    with connect(kinetica_server) as db:
        with pytest.raises(reactive.ConfigurationError, match="'id' of table 'blobs' is of type bytes"):
            db.add(Listener(tag(recorder), "text", "blobs"))
        assert db.show() == [] and recorder.calls == 0


def test_a_missing_table_fails_at_add(kinetica_server: KineticaTestServer, recorder: Recorder) -> None:
    with connect(kinetica_server) as db:
        with pytest.raises(TableNotFoundError, match="'nope' does not exist"):
            db.add(Listener(tag(recorder), "text", "nope"))
        with pytest.raises(TableNotFoundError, match=r"'app\.nope' does not exist"):
            db.add(Listener(tag(recorder), "text", "app.nope"))
        assert db.show() == [] and recorder.calls == 0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def rendered(exc: BaseException | None) -> str:
    """What a user sees of ``exc`` and every exception chained to it: messages and reprs."""
    shown = []
    while exc is not None:
        shown.append(f"{exc!s} {exc!r}")
        exc = exc.__cause__ or exc.__context__
    return "\n".join(shown)


def test_a_refused_connection_is_a_clear_error_without_the_password() -> None:
    uri = f"kinetica://u:hunter2@127.0.0.1:{free_port()}?monitor_port=1"
    with pytest.raises(BackendError, match=r"could not connect to 'kinetica://u:\*\*\*@127\.0\.0\.1") as raised:
        reactive.connect(uri, connect_timeout=1)
    assert "hunter2" not in rendered(raised.value)
    assert "refused" in str(raised.value).lower()


def test_a_wrong_password_is_a_clear_error_without_the_password(recorder: Recorder) -> None:
    with KineticaTestServer(username="alice", password="s3cret") as server:
        with pytest.raises(BackendError, match="credentials refused") as raised:
            reactive.connect(server.uri(userinfo="alice:wrong-pass@"))
        assert "wrong-pass" not in rendered(raised.value) and "alice:***@" in str(raised.value)

        with reactive.connect(server.uri(userinfo="alice:s3cret@"), connect_timeout=5) as db:
            assert "s3cret" not in repr(db) and "s3cret" not in db.backend.uri
            credentials = {"disable_failover": True, "username": "alice", "password": "s3cret"}
            foreign = GPUdb(host=server.url, options=GPUdb.Options(credentials))
            docs = create_table(foreign, "docs", [[1, "alpha", "en"]])
            db.add(Listener(tag(recorder), "text", "docs"))
            db.cdc.start()
            docs.insert_records([[2, "beta", "en"]])
            assert db.cdc.wait_idle(timeout=WAIT)
            assert outputs_by_source(db, "tag__text") == {1: "<alpha>", 2: "<beta>"}


def test_an_error_answer_to_an_output_write_records_the_rows_until_a_reconciliation(
    kinetica_server: KineticaTestServer, foreign: GPUdb
) -> None:
    """The server answers ERROR to the handler's upsert of one batch's outputs: those rows are
    recorded in ``_reactive_errors`` and have no output (an ERROR is not retried: it may be
    permanent); the next reconciliation of their table (an update or delete count, a restart,
    ``reconcile_interval``) computes them again. Nothing stops."""
    entered, release = threading.Event(), threading.Event()

    def model(texts: list[str]) -> list[str]:
        if "beta" in texts:
            entered.set()
            assert release.wait(WAIT), "the test never released the model"
        return [f"<{t}>" for t in texts]

    docs = create_table(foreign, "docs", [[1, "alpha", "en"]])
    with connect(kinetica_server) as db:
        db.add(Listener(Model("tag", predict=model), "text", "docs"))
        db.cdc.start()
        assert db.cdc.wait_idle(timeout=WAIT)
        docs.insert_records([[2, "beta", "en"]])
        assert entered.wait(WAIT)  # the handler holds beta's output: its upsert is the next insert call
        kinetica_server.fail_next("/insert/records", "boom")
        release.set()
        # not wait_idle yet: its barrier mark is an insert too, and could take the ERROR first
        assert db.cdc.queue.join(timeout=WAIT)
        assert db.cdc.wait_idle(timeout=WAIT)
        assert outputs_by_source(db, "tag__text") == {1: "<alpha>"}
        errors = db.errors("tag__text")
        assert [(e["source"], e["table"]) for e in errors] == [(2, "docs")] and "boom" in errors[0]["error"]
        info = db.cdc.info()
        assert info["listeners"]["tag__text"]["errors"] == 1 and info["handler"]["running"]
        assert info["source"]["running"]

        docs.update_records(["id = 1"], [{"lang": "de"}])  # any count reconciles the table
        docs.insert_records([[3, "gamma", "en"]])
        assert db.cdc.wait_idle(timeout=WAIT)
        assert outputs_by_source(db, "tag__text") == {1: "<alpha>", 2: "<beta>", 3: "<gamma>"}


def test_an_error_answer_during_a_reconciliation_is_retried(
    kinetica_server: KineticaTestServer, foreign: GPUdb, recorder: Recorder
) -> None:
    docs = create_table(foreign, "docs", [[1, "alpha", "en"], [2, "beta", "en"]])
    with following(kinetica_server, recorder, inactivity_timeout=0.2) as db:
        # the reconciliation's first read fails; its retry comes after the 0.5 s backoff, when the
        # inactivity check also runs: wait_idle must not mistake the overcome failure for a current one
        kinetica_server.fail_next("/get/records", "boom")
        docs.update_records(["id = 1"], [{"text": "ALPHA"}])
        docs.delete_records(["id = 2"])
        assert db.cdc.wait_idle(timeout=WAIT)
        assert outputs_by_source(db, "tag__text") == {1: "<ALPHA>"}
        source = source_info(db)
        assert "boom" in source["last_error"] and source["running"] and source["pending_reconciliation"] == []
        assert recorder.inputs.count("ALPHA") == 1


def test_corrupted_frames_are_counted_and_the_table_reconciled(
    kinetica_server: KineticaTestServer, foreign: GPUdb, recorder: Recorder
) -> None:
    docs = create_table(foreign, "docs", [[1, "alpha", "en"]])
    with following(kinetica_server, recorder) as db:
        topics = topics_of(kinetica_server, "ki_home.docs")
        reconciliations = source_info(db)["reconciliations"]

        kinetica_server.publish_raw(topics["insert"], [b"garbage"])
        kinetica_server.publish_raw(topics["update"], [b"\xff"])  # a count that does not decode
        kinetica_server.publish_raw(topics["delete"], [])  # a message without a count
        docs.insert_records([[2, "beta", "en"]])
        docs.update_records(["id = 1"], [{"text": "ALPHA"}])
        assert db.cdc.wait_idle(timeout=WAIT)
        assert outputs_by_source(db, "tag__text") == {1: "<ALPHA>", 2: "<beta>"}
        source = source_info(db)
        assert source["decode_errors"] == 3 and source["reconciliations"] > reconciliations
        assert "did not decode" in source["last_error"]
        assert source["running"] and db.cdc.listener is not None and db.cdc.listener.is_alive()

        docs.insert_records([[3, "gamma", "en"]])  # frames still flow
        assert db.cdc.wait_idle(timeout=WAIT)
        assert outputs_by_source(db, "tag__text") == {1: "<ALPHA>", 2: "<beta>", 3: "<gamma>"}
        assert sorted(recorder.inputs) == ["ALPHA", "alpha", "beta", "gamma"]


def test_frames_on_topics_the_listener_does_not_know_are_ignored_and_counted(
    kinetica_server: KineticaTestServer, foreign: GPUdb, recorder: Recorder
) -> None:
    docs = create_table(foreign, "docs", [[1, "alpha", "en"]])
    with following(kinetica_server, recorder) as db:
        insert_topic = topics_of(kinetica_server, "ki_home.docs")["insert"]
        # SUB filters by prefix: a longer topic that starts with ours reaches the listener
        ghost = avro_row(foreign, "docs", {"id": 9, "text": "ghost", "lang": "en"})
        kinetica_server.publish_raw(insert_topic + "-other", [ghost])
        kinetica_server.publish_raw(f"reactive-{uuid.uuid4().hex}", [b"x"])  # filtered out by ZMQ
        docs.insert_records([[2, "beta", "en"]])
        assert db.cdc.wait_idle(timeout=WAIT)
        assert outputs_by_source(db, "tag__text") == {1: "<alpha>", 2: "<beta>"}
        source = source_info(db)
        assert (source["unknown_frames"], source["decode_errors"], source["inserts"]) == (1, 0, 1)
        assert sorted(recorder.inputs) == ["alpha", "beta"]  # the ghost row was not computed


def avro_row(db: GPUdb, table: str, record: dict[str, Any]) -> bytes:
    """``record`` as an insert frame of ``table`` (schemaless Avro in the table's type)."""
    schema = fastavro.parse_schema(json.loads(db.show_table(table)["type_schemas"][0]))
    out = io.BytesIO()
    fastavro.schemaless_writer(out, schema, record)
    return out.getvalue()


def test_a_wrong_monitor_port_fails_start_within_connect_timeout(
    kinetica_server: KineticaTestServer, foreign: GPUdb, recorder: Recorder
) -> None:
    create_table(foreign, "docs", [[1, "alpha", "en"]])
    with reactive.connect(kinetica_server.uri(monitor_port=1), connect_timeout=0.5) as db:
        db.add(Listener(tag(recorder), "text", "docs"))
        started = time.monotonic()
        with pytest.raises(BackendError, match=r"from tcp://127\.0\.0\.1:1 within 0\.5 s") as raised:
            db.cdc.start()
        assert time.monotonic() - started < 0.5 + 2.0
        assert "monitor_port=" in str(raised.value)
        # Nothing half-started: only the lease db.add took (for its backfill) is still renewed.
        assert not db.cdc.running and [t.name for t in reactive_threads()] == ["reactive-lease-database"]
        assert kinetica_server.monitors() == {} and kinetica_server.tables["ki_home._reactive_marks"] == []
        assert outputs_by_source(db, "tag__text") == {1: "<alpha>"}  # the backfill needs no monitor


# -- 9. server-side monitors ---------------------------------------------------------------------
def test_close_clears_every_server_side_monitor_this_process_created(
    kinetica_server: KineticaTestServer, foreign: GPUdb, recorder: Recorder
) -> None:
    create_table(foreign, "docs", [[1, "alpha", "en"]])
    create_table(foreign, "notes", [[1, "note", "en"]])
    foreign_topic = foreign.create_table_monitor("docs", {"event": "insert"})["topic_id"]  # not ours
    with connect(kinetica_server) as db:
        db.add(Listener(tag(recorder), "text", "docs"))
        db.cdc.start()
        db.add(Listener(Model("len", predict=lambda xs: [len(x) for x in xs]), "text", "notes"))
        db.add(Listener(Model("twice", predict=lambda xs: [x * 2 for x in xs]), "_output", "_outputs__len__text"))
        assert db.cdc.wait_idle(timeout=WAIT)
        ours = set(kinetica_server.monitors()) - {foreign_topic}
        assert len(ours) == 1 + 3 + 3  # the marks' insert monitor, three per watched table
        owners = db.backend.checkpoints.load_checkpoint(MONITORS_CHECKPOINT)
        assert [set(entry["topics"]) for entry in owners.values()] == [ours]
        assert source_info(db)["server_monitors"] == len(ours)

        db.remove("twice___output")
        db.remove("len__text")  # nobody reads notes any more: its monitors go
        assert watched_on_server(kinetica_server) == {"ki_home._reactive_marks", "ki_home.docs"}
        assert len(kinetica_server.monitors()) == 1 + 3 + 1
    assert kinetica_server.monitors() == {foreign_topic: ("ki_home.docs", "insert")}
    assert kinetica_server.tables["ki_home._reactive_marks"] == []  # the barrier's marks go too
    stored = kinetica_server.tables["ki_home._reactive_checkpoints"]  # one record per section, data in base64
    checkpoints = {r["section"]: json.loads(base64.b64decode(r["data"])) for r in stored}
    assert checkpoints[MONITORS_CHECKPOINT] == {}


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_monitors_left_by_a_killed_process_are_cleared_at_the_next_start(
    kinetica_server: KineticaTestServer, foreign: GPUdb, recorder: Recorder
) -> None:
    docs = create_table(foreign, "docs", [[1, "alpha", "en"]])

    def leftover() -> str:
        return foreign.create_table_monitor("docs", {"event": "insert"})["topic_id"]

    host, pid = socket.gethostname(), dead_pid()
    dead, alive, elsewhere = [leftover(), leftover()], [leftover()], [leftover()]
    killed, running, remote = f"{host}/{pid}/killed", f"{host}/{os.getppid()}/running", f"far-away/{pid}/unknown"
    owners = {  # as _record_monitors writes them: a killed process, a live one, one on another host
        killed: {"host": host, "pid": pid, "topics": dead},
        running: {"host": host, "pid": os.getppid(), "topics": alive},
        remote: {"host": "far-away", "pid": pid, "topics": elsewhere},
    }
    with connect(kinetica_server) as db:
        db.backend.checkpoints.save_checkpoint(MONITORS_CHECKPOINT, owners)
        db.add(Listener(tag(recorder), "text", "docs"))
        db.cdc.start()
        assert not set(dead) & set(kinetica_server.monitors())
        assert set(alive + elsewhere) <= set(kinetica_server.monitors())
        saved = db.backend.checkpoints.load_checkpoint(MONITORS_CHECKPOINT)
        assert killed not in saved and saved[running] == owners[running] and saved[remote] == owners[remote]
        assert len(saved) == 3  # and this process's own
        docs.insert_records([[2, "beta", "en"]])
        assert db.cdc.wait_idle(timeout=WAIT)
        assert outputs_by_source(db, "tag__text") == {1: "<alpha>", 2: "<beta>"}
    assert set(kinetica_server.monitors()) == set(alive + elsewhere)


# -- 10. dropped tables --------------------------------------------------------------------------
def test_a_dropped_table_is_reported_and_another_goes_on(
    kinetica_server: KineticaTestServer, foreign: GPUdb, recorder: Recorder
) -> None:
    create_table(foreign, "docs", [[1, "alpha", "en"]])
    notes = create_table(foreign, "notes", [[1, "note", "en"]])
    with connect(kinetica_server, inactivity_timeout=0.2) as db:
        db.add(Listener(tag(recorder), "text", "docs"))
        db.add(Listener(Model("len", predict=lambda xs: [len(x) for x in xs]), "text", "notes"))
        db.cdc.start()
        assert db.cdc.wait_idle(timeout=WAIT)
        listener = db.cdc.listener
        assert listener is not None
        gone = threading.Event()
        report = listener.hooks.table_gone

        def table_gone(table: str, why: str) -> None:
            report(table, why)
            gone.set()

        listener.hooks = dc.replace(listener.hooks, table_gone=table_gone)
        foreign.clear_table("docs")
        assert gone.wait(WAIT)
        info = db.cdc.info()
        assert info["stopped_tables"] == {"docs": "dropped"}
        assert info["source"]["tables"] == ["notes"] and info["source"]["running"]
        assert watched_on_server(kinetica_server) == {"ki_home._reactive_marks", "ki_home.notes"}

        notes.insert_records([[2, "a longer note", "en"]])
        notes.delete_records(["id = 1"])
        assert db.cdc.wait_idle(timeout=WAIT)
        assert outputs_by_source(db, "len__text") == {2: 13}
        assert outputs_by_source(db, "tag__text") == {1: "<alpha>"}  # a dropped table's outputs are kept


def test_a_table_dropped_and_created_again_is_followed_again(
    kinetica_server: KineticaTestServer, foreign: GPUdb, recorder: Recorder
) -> None:
    create_table(foreign, "docs", [[1, "alpha", "en"]])
    with following(kinetica_server, recorder, inactivity_timeout=0.2) as db:
        listener = db.cdc.listener
        assert listener is not None
        reconciliations = source_info(db)["reconciliations"]
        foreign.clear_table("docs")
        docs = create_table(foreign, "docs", [[2, "beta", "en"]])
        # several inactivity checks pass within this bound
        assert listener.wait_for(lambda: listener.reconciliations > reconciliations, timeout=1.5)
        docs.insert_records([[3, "gamma", "en"]])
        assert db.cdc.wait_idle(timeout=WAIT)
        assert outputs_by_source(db, "tag__text") == {2: "<beta>", 3: "<gamma>"}


# -- 11. tables other clients alter --------------------------------------------------------------
def add_note_column(db: GPUdb, table: str) -> None:
    altered = db.alter_table(table, "add_column", "note", {"column_type": "string", "column_properties": "nullable"})
    assert altered.is_ok(), altered.get_error_msg()


def test_a_column_added_by_another_client_is_followed_and_holds_no_other_table_back(
    kinetica_server: KineticaTestServer, foreign: GPUdb, recorder: Recorder
) -> None:
    """Reads are decoded with the type the server says they have: until this release a
    reconciliation of the altered table failed for ever ("1 bytes left over (table altered?)")
    and, reconciled in one pass with it, so did every other table's."""
    create_table(foreign, "docs", [[1, "alpha", "en"], [2, "beta", "en"]])
    create_table(foreign, "notes", [[1, "note", "en"], [2, "other", "en"]])
    with connect(kinetica_server) as db:
        db.add(Listener(tag(recorder), "text", "docs"))
        db.add(Listener(Model("len", predict=lambda xs: [len(x) for x in xs]), "text", "notes"))
        db.cdc.start()
        assert db.cdc.wait_idle(timeout=WAIT)
        add_note_column(foreign, "docs")
        docs, notes = GPUdbTable(None, "docs", db=foreign), GPUdbTable(None, "notes", db=foreign)
        docs.update_records(["id = 1"], [{"text": "ALPHA"}])
        docs.delete_records(["id = 2"])
        notes.update_records(["id = 1"], [{"text": "a longer note"}])
        notes.delete_records(["id = 2"])
        assert db.cdc.wait_idle(timeout=WAIT)
        assert outputs_by_source(db, "tag__text") == {1: "<ALPHA>"}
        assert outputs_by_source(db, "len__text") == {1: 13}
        docs.insert_records([[3, "gamma", "en", "a note"]])  # an insert frame of the new type
        assert db.cdc.wait_idle(timeout=WAIT)
        assert outputs_by_source(db, "tag__text") == {1: "<ALPHA>", 3: "<gamma>"}
        source = source_info(db)
        assert source["pending_reconciliation"] == [] and source["running"]


def test_a_table_whose_reconciliation_keeps_failing_fails_alone(
    kinetica_server: KineticaTestServer, foreign: GPUdb, recorder: Recorder
) -> None:
    create_table(foreign, "docs", [[1, "alpha", "en"]])
    notes = create_table(foreign, "notes", [[1, "note", "en"], [2, "other", "en"]])
    with connect(kinetica_server) as db:
        db.add(Listener(tag(recorder), "text", "docs"))
        db.add(Listener(Model("len", predict=lambda xs: [len(x) for x in xs]), "text", "notes"))
        db.cdc.start()
        assert db.cdc.wait_idle(timeout=WAIT)
        listener = db.cdc.listener
        assert listener is not None
        reconcile, broken = listener.hooks.reconcile, threading.Event()

        def failing_on_docs(tables: list[str], abandon: threading.Event) -> None:
            if "docs" in tables:
                broken.set()
                raise BackendError("docs cannot be read", table="docs")
            reconcile(tables, abandon)

        listener.hooks = dc.replace(listener.hooks, reconcile=failing_on_docs)
        foreign_docs = GPUdbTable(None, "docs", db=foreign)
        foreign_docs.update_records(["id = 1"], [{"text": "ALPHA"}])
        assert broken.wait(WAIT)
        notes.update_records(["id = 1"], [{"text": "a longer note"}])
        notes.delete_records(["id = 2"])
        assert listener.wait_for(lambda: outputs_by_source(db, "len__text") == {1: 13}, timeout=WAIT)
        assert not db.cdc.wait_idle(timeout=1.0)  # docs is still behind, and said to be
        source = source_info(db)
        assert source["pending_reconciliation"] == ["docs"] and "docs cannot be read" in source["last_error"]

        listener.hooks = dc.replace(listener.hooks, reconcile=reconcile)  # docs can be read again
        assert db.cdc.wait_idle(timeout=WAIT)
        assert outputs_by_source(db, "tag__text") == {1: "<ALPHA>"}
        assert source_info(db)["pending_reconciliation"] == []


def test_a_vector_column_reaches_the_model_in_one_form_with_json_encoding(
    kinetica_server: KineticaTestServer, foreign: GPUdb
) -> None:
    """A server writes a vector(N) column of a JSON ``/get/records`` answer as a list of floats;
    a monitor frame carries its bytes. Until this release the model got a list from a read
    (backfill, reconciliation) and bytes from an insert, so each inserted row was computed again
    at the next reconciliation, and its output changed form."""
    vectors = GPUdbRecordType(
        [
            GPUdbRecordColumn("id", "long", [GPUdbColumnProperty.PRIMARY_KEY]),
            GPUdbRecordColumn("vec", "bytes", ["vector(2)"]),
            GPUdbRecordColumn("note", "string", is_nullable=True),
        ],
        label="vectors",
    )
    table = GPUdbTable(vectors, "vectors", db=foreign)
    table.insert_records([[1, np.array([1, 2], "<f4").tobytes(), "n"]])
    seen: list[Any] = []

    def floats(values: list[Any]) -> list[list[float]]:
        seen.extend(values)
        return [np.frombuffer(value, "<f4").tolist() for value in values]

    with connect(kinetica_server, encoding="json") as db:
        db.add(Listener(Model("floats", predict=floats), "vec", "vectors"))
        db.cdc.start()
        table.insert_records([[2, np.array([3, 4], "<f4").tobytes(), "n"]])
        assert db.cdc.wait_idle(timeout=WAIT)
        table.update_records(["id = 1"], [{"note": "another column"}])  # a count: a reconciliation reads every row
        assert db.cdc.wait_idle(timeout=WAIT)
        assert outputs_by_source(db, "floats__vec") == {1: [1.0, 2.0], 2: [3.0, 4.0]}
    assert [type(value) for value in seen] == [bytes, bytes]  # each row once, as binary encoding gives it


def test_outputs_keyed_by_another_id_type_or_not_reactives_are_refused_at_add(
    kinetica_server: KineticaTestServer, foreign: GPUdb, recorder: Recorder
) -> None:
    """As on SQL: until this release ``db.add`` took such a table, no output was ever written,
    an error row per row piled up at every reconciliation, and ``wait_idle`` said True."""
    create_table(foreign, "docs", [[1, "alpha", "en"]])
    with connect(kinetica_server) as db:
        db.add(Listener(tag(recorder), "text", "docs"))
        assert outputs_by_source(db, "tag__text") == {1: "<alpha>"}
    foreign.clear_table("docs")
    text_ids = GPUdbRecordType(
        [
            GPUdbRecordColumn("id", "string", [GPUdbColumnProperty.PRIMARY_KEY, GPUdbColumnProperty.CHAR16]),
            GPUdbRecordColumn("text", "string"),
        ],
        label="docs",
    )
    GPUdbTable(text_ids, "docs", db=foreign).insert_records([["a", "alpha"]])
    with connect(kinetica_server) as db:
        with pytest.raises(
            reactive.ConfigurationError,
            match=r"'_outputs__tag__text'\) are keyed by ids of type int, and 'docs' is now",
        ):
            db.add(Listener(tag(recorder), "text", "docs"))
        assert db.components() == []  # nothing registered

    foreign.clear_table("_outputs__tag__text")
    stranger = GPUdbRecordType([GPUdbRecordColumn("_source", "string", [GPUdbColumnProperty.PRIMARY_KEY])], label="x")
    GPUdbTable(stranger, "_outputs__tag__text", db=foreign)
    with connect(kinetica_server) as db:
        with pytest.raises(reactive.ConfigurationError, match=r"'_outputs__tag__text'\) exists but lacks reactive's"):
            db.add(Listener(tag(recorder), "text", "docs"))
        foreign.clear_table("_outputs__tag__text")
        db.add(Listener(tag(recorder), "text", "docs"))
        assert outputs_by_source(db, "tag__text") == {"a": "<alpha>"}


def test_a_missing_table_names_the_one_that_differs_only_in_case(
    kinetica_server: KineticaTestServer, foreign: GPUdb, recorder: Recorder
) -> None:
    """As for columns, and for tables on SQL; until this release only "does not exist"."""
    create_table(foreign, "MixedCase", [[1, "alpha", "en"]])
    create_table(foreign, "app.Notes", [[1, "note", "en"]])
    with connect(kinetica_server) as db:
        with pytest.raises(TableNotFoundError, match=r"'mixedcase' does not exist .*did you mean 'MixedCase'\?"):
            db.add(Listener(tag(recorder), "text", "mixedcase"))
        with pytest.raises(TableNotFoundError, match=r"did you mean 'app\.Notes'\?"):
            db.add(Listener(tag(recorder), "text", "app.notes"))
        with pytest.raises(TableNotFoundError, match=r"does not exist in \S+$"):
            db.add(Listener(tag(recorder), "text", "nothing_like_it"))
        db.add(Listener(tag(recorder), "text", "MixedCase"))
        assert outputs_by_source(db, "tag__text") == {1: "<alpha>"}


def test_the_marks_table_dropped_by_someone_is_created_again(
    kinetica_server: KineticaTestServer, foreign: GPUdb, recorder: Recorder
) -> None:
    """Until this release ``_reactive_marks`` was created once per process: after a drop every
    ``wait_idle`` returned False at once, for ever."""
    docs = create_table(foreign, "docs", [[1, "alpha", "en"]])
    with following(kinetica_server, recorder) as db:
        foreign.clear_table("_reactive_marks")  # an administrator cleaning up
        docs.insert_records([[2, "beta", "en"]])
        assert db.cdc.wait_idle(timeout=WAIT)
        assert outputs_by_source(db, "tag__text") == {1: "<alpha>", 2: "<beta>"}
        assert watched_on_server(kinetica_server) == {"ki_home._reactive_marks", "ki_home.docs"}
        assert len(kinetica_server.monitors()) == 4  # the marks' monitor once, not twice
        docs.insert_records([[3, "gamma", "en"]])
        assert db.cdc.wait_idle(timeout=WAIT)
        assert outputs_by_source(db, "tag__text") == {1: "<alpha>", 2: "<beta>", 3: "<gamma>"}
    assert kinetica_server.monitors() == {}


def test_a_server_that_lost_every_table_gets_its_monitors_again(
    kinetica_server: KineticaTestServer, foreign: GPUdb, recorder: Recorder
) -> None:
    """A server restarted empty: until this release the recovery failed every 5 s for ever,
    creating a monitor on ``_reactive_marks``, which was gone."""
    create_table(foreign, "docs", [[1, "alpha", "en"]])
    create_table(foreign, "notes", [[1, "note", "en"]])
    with connect(kinetica_server) as db:
        db.add(Listener(tag(recorder), "text", "docs"))
        db.add(Listener(Model("len", predict=lambda xs: [len(x) for x in xs]), "text", "notes"))
        db.cdc.start()
        assert db.cdc.wait_idle(timeout=WAIT)
        kinetica_server.stop()
        for table in kinetica_server.tables:
            kinetica_server.drop_table(table)
        kinetica_server.start()
        create_table(foreign, "docs", [[7, "seven", "en"]])  # notes is not made again
        listener = db.cdc.listener
        assert listener is not None
        assert listener.wait_for(lambda: listener.recoveries == 1, timeout=WAIT)
        info = db.cdc.info()
        assert info["stopped_tables"] == {"notes": "dropped"} and info["source"]["tables"] == ["docs"]
        assert watched_on_server(kinetica_server) == {"ki_home._reactive_marks", "ki_home.docs"}
        assert len(kinetica_server.monitors()) == 4 and info["source"]["running"]
        assert "_reactive_marks" not in (listener.failing or "")


def failing_on(word: str) -> Model:
    """``<text>`` for each text; a batch holding ``word`` fails (its rows are recorded as errors)."""

    def predict(texts: list[str]) -> list[str]:
        if word in texts:
            raise ValueError(f"{word} text")
        return [f"<{t}>" for t in texts]

    return Model("tag", predict=predict)


def test_a_server_that_lost_every_table_gets_reactives_own_tables_again(
    kinetica_server: KineticaTestServer, foreign: GPUdb
) -> None:
    """A server restarted empty: until this release this process still took its outputs,
    ``_reactive_errors`` and ``_reactive_checkpoints`` for existing, and every write to them
    failed (the table's reconciliation retried for ever) until it connected again."""
    create_table(foreign, "docs", [[1, "alpha", "en"], [2, "bad", "en"]])
    with connect(kinetica_server) as db:
        db.add(Listener(failing_on("bad"), "text", "docs"))
        db.cdc.start()
        assert db.cdc.wait_idle(timeout=WAIT)
        assert [e["source"] for e in db.errors("tag__text")] == [2]
        kinetica_server.stop()
        for table in kinetica_server.tables:
            kinetica_server.drop_table(table)
        kinetica_server.start()
        create_table(foreign, "docs", [[7, "seven", "en"], [8, "bad", "en"]])
        listener = db.cdc.listener
        assert listener is not None
        assert listener.wait_for(lambda: listener.recoveries == 1, timeout=WAIT)
        assert db.cdc.wait_idle(timeout=WAIT)
        assert outputs_by_source(db, "tag__text") == {7: "<seven>"}
        assert [e["source"] for e in db.errors("tag__text")] == [8]
        db.add(Listener(Model("len", predict=lambda xs: [len(x) for x in xs], output_type="int64"), "text", "docs"))
        assert outputs_by_source(db, "len__text") == {7: 5, 8: 3}
        info = db.cdc.info()["source"]
        assert info["running"] and not info["pending_reconciliation"] and listener.failing is None
    with connect(kinetica_server) as db:  # saved in _reactive_checkpoints made again (tag's went with the server)
        assert types_of(db, ["len"]) == {"len": "int64"}


def test_reactives_own_tables_dropped_by_someone_are_created_again(
    kinetica_server: KineticaTestServer, foreign: GPUdb
) -> None:
    """An administrator drops reactive's outputs, ``_reactive_errors`` and
    ``_reactive_checkpoints`` under a running process: each is created again at its next write,
    and the outputs of every row are computed again, as on SQL. Until this release every write
    to them failed until the process connected again (an output's failure recorded as an error,
    which failed too)."""
    docs = create_table(foreign, "docs", [[1, "alpha", "en"], [2, "bad", "en"]])
    with connect(kinetica_server) as db:
        db.add(Listener(failing_on("bad"), "text", "docs"))
        db.cdc.start()
        assert db.cdc.wait_idle(timeout=WAIT)
        for table in ("_outputs__tag__text", "_reactive_errors", "_reactive_checkpoints"):
            foreign.clear_table(table)
        docs.insert_records([[3, "gamma", "en"]])
        assert db.cdc.wait_idle(timeout=WAIT)
        assert outputs_by_source(db, "tag__text") == {1: "<alpha>", 3: "<gamma>"}
        assert [e["source"] for e in db.errors("tag__text")] == [2]  # computed again, and failed again
        db.add(Listener(Model("len", predict=lambda xs: [len(x) for x in xs], output_type="int64"), "text", "docs"))
        assert outputs_by_source(db, "len__text") == {1: 5, 2: 3, 3: 5}
        assert db.cdc.info()["source"]["running"]
    with connect(kinetica_server) as db:
        assert types_of(db, ["len"]) == {"len": "int64"}


def test_the_lease_holder_writes_its_record_again_when_the_server_lost_it(
    kinetica_server: KineticaTestServer, foreign: GPUdb, recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    """``_reactive_checkpoints`` went with the server's tables (here dropped by someone), and
    the lease's record with it: the holder's next renewal writes it again. Until this release it
    took the lease for lost, stopped its listeners, and took the lease again at once."""
    docs = create_table(foreign, "docs", [[1, "alpha", "en"]])
    with connect(kinetica_server, lease_ms=1500) as db:
        db.add(Listener(tag(recorder), "text", "docs"))
        db.cdc.start()
        assert db.cdc.wait_idle(timeout=WAIT)
        listener, keeper = db.cdc.listener, db.cdc._keeper
        assert listener is not None and keeper is not None
        foreign.clear_table("_reactive_checkpoints")
        looked(keeper, 3)  # a renewal after the drop, and more
        assert not [r.getMessage() for r in caplog.records if "lost the lease" in r.getMessage()]
        assert db.cdc.listener is listener and db.cdc.info()["lease"]["this_process"]
        docs.insert_records([[2, "beta", "en"]])
        assert db.cdc.wait_idle(timeout=WAIT)
        assert outputs_by_source(db, "tag__text") == {1: "<alpha>", 2: "<beta>"}


def test_a_column_dropped_and_added_again_is_never_read_from_the_wrong_place(
    kinetica_server: KineticaTestServer, foreign: GPUdb, recorder: Recorder
) -> None:
    """``text`` dropped and added again: the columns are (id, note, text), and an insert frame
    of the new type decodes "successfully" with the old one, ``note`` read as ``text``. Until
    this release the model got the wrong column; a frame carries no type id, so the type's id
    is checked with the server."""
    notes = GPUdbRecordType(
        [
            GPUdbRecordColumn("id", "int", [GPUdbColumnProperty.PRIMARY_KEY]),
            GPUdbRecordColumn("text", "string", is_nullable=True),
            GPUdbRecordColumn("note", "string", is_nullable=True),
        ],
        label="docs",
    )
    GPUdbTable(notes, "docs", db=foreign).insert_records([[1, "alpha", "n1"]])
    with following(kinetica_server, recorder) as db:
        assert foreign.alter_table("docs", "delete_column", "text", {}).is_ok()
        add = foreign.alter_table(
            "docs", "add_column", "text", {"column_type": "string", "column_properties": "nullable"}
        )
        assert add.is_ok()
        docs = GPUdbTable(None, "docs", db=foreign)
        docs.update_records(["id = 1"], [{"text": "one"}])
        docs.insert_records([{"id": 2, "note": "n2", "text": "two"}])
        assert db.cdc.wait_idle(timeout=WAIT)
        assert outputs_by_source(db, "tag__text") == {1: "<one>", 2: "<two>"}
        docs.insert_records([{"id": 3, "note": "n3", "text": "three"}])  # decoded with the new type
        assert db.cdc.wait_idle(timeout=WAIT)
        assert outputs_by_source(db, "tag__text") == {1: "<one>", 2: "<two>", 3: "<three>"}
        assert sorted(recorder.inputs) == ["alpha", "one", "three", "two"]  # never a note

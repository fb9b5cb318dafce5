"""``reactive.TableMonitor``: Kinetica's ``GPUdbTableMonitor`` API on every backend.

Every write comes from a foreign client (the database's own driver, pymongo, or the official
``gpudb`` client), never from ``reactive``. Events are awaited on a queue with timeouts; nothing
sleeps to wait for processing.
"""

from __future__ import annotations

import datetime as dt
import functools
import io
import json
import queue
import sqlite3
import threading
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import duckdb
import fastavro
import psycopg
import pytest
from conftest import BrokenOnce, HeldTags, SQLClient, Watching, outputs_by_source, within
from gpudb import GPUdb, GPUdbColumnProperty, GPUdbRecordColumn, GPUdbRecordType, GPUdbTable
from kinetica_server import KineticaTestServer

import reactive
from reactive import ConfigurationError, TableMonitor, TableNotFoundError
from reactive.components import Listener, Model
from reactive.threads import reactive_threads

Type = TableMonitor.Callback.Type
Callback = TableMonitor.Callback
Mode = TableMonitor.Callback.InsertDecodedOptions.DecodeFailureMode
WAIT = 10.0  # seconds: the upper bound for any one event; normally milliseconds
QUICK = 0.01  # minutes (0.6 s): the inactivity timeout after which Kinetica notices a dropped table
SQL = ["duckdb", "sqlite", "postgres"]
PUSH = ["mongodb", "kinetica"]


# -- sources: a table, and a foreign client that writes to it ----------------------------------
class Source:
    """One backend's database: ``reactive``'s URI for it and a foreign client writing table rows.

    Tables have an integer id and a text ``title``. ``row`` is a row as INSERT_DECODED reports it
    and ``raw_row`` turns a record decoded from INSERT_RAW bytes into the same shape.
    """

    name: str
    uri: str

    def create(self, table: str = "docs") -> None:
        raise NotImplementedError

    def insert(self, row_id: int, title: str, table: str = "docs") -> None:
        raise NotImplementedError

    def update(self, row_id: int, title: str, table: str = "docs") -> None:
        raise NotImplementedError

    def delete(self, row_id: int, table: str = "docs") -> None:
        raise NotImplementedError

    def drop(self, table: str = "docs") -> None:
        raise NotImplementedError

    def row(self, row_id: int, title: str) -> dict[str, Any]:
        return {"id": row_id, "title": title}

    def raw_row(self, record: dict[str, Any]) -> dict[str, Any]:
        return record


class SQLSource(Source):
    def __init__(self, client: SQLClient) -> None:
        self.name, self.uri, self.client = client.kind, client.uri, client

    def create(self, table: str = "docs") -> None:
        self.client.execute(f"create table {table} (id integer primary key, title varchar(100))")

    def insert(self, row_id: int, title: str, table: str = "docs") -> None:
        self.client.execute(f"insert into {table} values (?, ?)", (row_id, title))

    def update(self, row_id: int, title: str, table: str = "docs") -> None:
        self.client.execute(f"update {table} set title = ? where id = ?", (title, row_id))

    def delete(self, row_id: int, table: str = "docs") -> None:
        self.client.execute(f"delete from {table} where id = ?", (row_id,))

    def drop(self, table: str = "docs") -> None:
        self.client.execute(f"drop table {table}")


class MongoSource(Source):
    def __init__(self, uri: str, database: Any) -> None:
        self.name, self.uri, self.database = "mongodb", uri, database

    def create(self, table: str = "docs") -> None:
        self.database.create_collection(table)

    def insert(self, row_id: int, title: str, table: str = "docs") -> None:
        self.database[table].insert_one({"_id": row_id, "title": title})

    def update(self, row_id: int, title: str, table: str = "docs") -> None:
        self.database[table].update_one({"_id": row_id}, {"$set": {"title": title}})

    def delete(self, row_id: int, table: str = "docs") -> None:
        self.database[table].delete_one({"_id": row_id})

    def drop(self, table: str = "docs") -> None:
        self.database.drop_collection(table)

    def row(self, row_id: int, title: str) -> dict[str, Any]:
        return {"_id": row_id, "title": title}

    def raw_row(self, record: dict[str, Any]) -> dict[str, Any]:
        from bson import json_util

        document = json_util.loads(record["document"])
        assert json_util.loads(record["_id"]) == document["_id"]
        return document


class KineticaSource(Source):
    """Writes with the official ``gpudb`` client."""

    def __init__(self, server: KineticaTestServer) -> None:
        self.name, self.server = "kinetica", server
        self.uri = server.uri()
        self.gpudb = GPUdb(host=server.url, options=GPUdb.Options({"disable_failover": True}))
        self.tables: dict[str, GPUdbTable] = {}

    def create(self, table: str = "docs") -> None:
        columns = [
            GPUdbRecordColumn("id", "int", [GPUdbColumnProperty.PRIMARY_KEY]),
            GPUdbRecordColumn("title", "string"),
        ]
        self.tables[table] = GPUdbTable(GPUdbRecordType(columns, label=table), table, db=self.gpudb)

    def insert(self, row_id: int, title: str, table: str = "docs") -> None:
        self.tables[table].insert_records([[row_id, title]])

    def update(self, row_id: int, title: str, table: str = "docs") -> None:
        assert self.gpudb.update_records(table, [f"id = {row_id}"], [{"title": title}])["count_updated"] == 1

    def delete(self, row_id: int, table: str = "docs") -> None:
        assert self.gpudb.delete_records(table, [f"id = {row_id}"])["count_deleted"] == 1

    def drop(self, table: str = "docs") -> None:
        assert self.gpudb.clear_table(table).is_ok()

    def monitored_events(self, table: str = "docs") -> list[str]:
        """The events of the server-side monitors on ``table``, sorted (repeats kept)."""
        return sorted(event for name, event in self.server.monitors().values() if name == f"ki_home.{table}")


@pytest.fixture(params=[*SQL, *PUSH])
def source(request: pytest.FixtureRequest, tmp_path) -> Iterator[Source]:
    """Each backend with an empty table ``docs``; ``indirect`` parametrization picks some."""
    kind = request.param
    if kind == "duckdb":
        path = tmp_path / "app.duckdb"
        made: Source = SQLSource(SQLClient(kind, f"duckdb:///{path}", duckdb.connect(str(path))))
    elif kind == "sqlite":
        path = tmp_path / "app.sqlite"
        raw = sqlite3.connect(str(path), check_same_thread=False)
        made = SQLSource(SQLClient(kind, f"sqlite:///{path}", raw))
    elif kind == "postgres":
        uri = request.getfixturevalue("pg_database")
        made = SQLSource(SQLClient(kind, uri, psycopg.connect(uri, autocommit=True)))
    elif kind == "mongodb":
        made = MongoSource(request.getfixturevalue("mongo_uri"), request.getfixturevalue("mongo"))
    else:
        made = KineticaSource(request.getfixturevalue("kinetica_server"))
    made.create()
    yield made
    if isinstance(made, SQLSource):
        made.client.close()


@pytest.fixture
def db(source: Source) -> Iterator[reactive.Datalayer]:
    with reactive.connect(source.uri, poll_interval=0.05) as datalayer:
        yield datalayer


def only(*names: str) -> pytest.MarkDecorator:
    """Run a test that takes ``source`` on these backends only."""
    return pytest.mark.parametrize("source", names, indirect=True)


def quick_drop_detection() -> TableMonitor.Options:
    return TableMonitor.Options(_dict={"inactivity_timeout": QUICK})


# -- what callbacks receive ---------------------------------------------------------------------
class Events:
    """Every callback and error callback puts ``(what, argument)`` on one queue, and notes its thread.

    ``what`` is the callback type's name, with `` error`` for its error callback.
    """

    def __init__(self) -> None:
        self.queue: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.threads: set[str] = set()

    def callback(
        self,
        kind: TableMonitor.Callback.Type,
        options: TableMonitor.Callback.Options | None = None,
        *,
        then: Callable[[Any], Any] | None = None,
    ) -> TableMonitor.Callback:
        """A callback of ``kind`` that records its argument, then calls ``then`` (which may raise)."""
        record = functools.partial(self.put, kind.name)

        def on_event(argument: Any) -> None:
            record(argument)
            if then is not None:
                then(argument)

        return Callback(kind, on_event, functools.partial(self.put, f"{kind.name} error"), options)

    def callbacks(self, *kinds: TableMonitor.Callback.Type) -> list[TableMonitor.Callback]:
        return [self.callback(kind) for kind in kinds]

    def put(self, what: str, argument: Any) -> None:
        self.threads.add(threading.current_thread().name)
        self.queue.put((what, argument))

    def next(self, timeout: float = WAIT) -> tuple[str, Any]:
        try:
            return self.queue.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no callback within {timeout} s") from None

    def pending(self) -> list[tuple[str, Any]]:
        """What was called and not taken yet (without waiting)."""
        items = []
        while True:
            try:
                items.append(self.queue.get_nowait())
            except queue.Empty:
                return items


def decode_raw(client: TableMonitor.Client, raw: bytes) -> dict[str, Any]:
    """INSERT_RAW bytes read with any Avro reader and ``client.type_schema``, nothing else."""
    stream = io.BytesIO(raw)
    record = fastavro.schemaless_reader(stream, fastavro.parse_schema(json.loads(client.type_schema)), None)
    assert stream.tell() == len(raw), "bytes left over after the record"
    return record


def add_shouting_listener(db: reactive.Datalayer, table: str) -> None:
    """A Listener on ``table`` whose outputs (``shout__title``) are the titles in capitals."""
    db.add(Listener(Model("shout", predict=lambda titles: [t.upper() for t in titles]), "title", table))


def monitor_thread(client: TableMonitor.Client) -> threading.Thread:
    (thread,) = client.task_list
    assert thread.name == "reactive-monitor-docs"
    return thread


# -- every callback type on every backend -------------------------------------------------------
def test_every_callback_type_on_a_foreign_clients_writes(source: Source, db: reactive.Datalayer) -> None:
    events = Events()
    client = TableMonitor.Client(db, "docs", events.callbacks(*Type))
    source.insert(0, "before")  # present before start_monitor: never reported
    assert not db.cdc.running and not reactive_threads()

    client.start_monitor()  # no Listener, no db.cdc.start()
    assert db.cdc.running
    monitor_thread(client)
    if isinstance(source, KineticaSource):
        assert source.monitored_events() == ["delete", "insert", "update"]
    if isinstance(source, SQLSource):  # the baseline is taken before start_monitor returns
        assert source.client.execute("select count(*) from _reactive_snapshot__docs") == [(1,)]

    source.insert(1, "one")
    what, raw = events.next()
    assert what == "INSERT_RAW" and isinstance(raw, bytes)
    assert source.raw_row(decode_raw(client, raw)) == source.row(1, "one")
    assert events.next() == ("INSERT_DECODED", source.row(1, "one"))
    source.update(1, "uno")
    assert events.next() == ("UPDATED", 1)
    source.delete(1)
    assert events.next() == ("DELETED", 1)
    assert events.threads == {"reactive-monitor-docs"}  # never the change listener's thread

    client.stop_monitor()
    assert not client.task_list and events.pending() == []


def test_a_monitor_on_a_listeners_outputs_reports_each_change_as_it_is_written(
    source: Source, db: reactive.Datalayer
) -> None:
    """SQLite skipped a table's poll while ``PRAGMA data_version`` (other connections' commits)
    stood still, and reactive writes its outputs through its own connection: each output change
    was reported only after some other client's next commit, one step late."""
    source.insert(0, "zero")
    add_shouting_listener(db, "docs")  # its outputs table made by the first outputs
    events = Events()
    client = TableMonitor.Client(db, "_outputs__shout__title", events.callbacks(Type.INSERT_DECODED, Type.DELETED))
    client.start_monitor()
    source.insert(1, "one")
    what, row = events.next()
    assert what == "INSERT_DECODED" and (row["_source"], row["_output"]) == (1, "ONE")
    source.delete(1)
    assert events.next() == ("DELETED", 1)
    client.stop_monitor()


@only(*SQL, "mongodb")
def test_changed_rows_options_give_the_updated_rows_and_the_deleted_ids(source: Source, db: reactive.Datalayer) -> None:
    events = Events()
    changed = Callback.ChangedRowsOptions()
    callbacks = [events.callback(Type.UPDATED, changed), events.callback(Type.DELETED, changed)]
    with TableMonitor.Client(db, "docs", callbacks):
        source.insert(1, "a")
        source.insert(2, "b")
        assert db.cdc.wait_idle(WAIT)  # a poller must see the inserts before the updates
        source.update(1, "A")
        source.update(2, "B")
        updated: list[dict[str, Any]] = []
        while len(updated) < 2:  # one list per poll, or per event on MongoDB
            what, rows = events.next()
            assert what == "UPDATED" and isinstance(rows, list)
            updated.extend(rows)
        source.delete(1)
        source.delete(2)
        deleted: list[Any] = []
        while len(deleted) < 2:
            what, ids = events.next()
            assert what == "DELETED" and isinstance(ids, list)
            deleted.extend(ids)
    key = "_id" if source.name == "mongodb" else "id"
    assert sorted(updated, key=lambda row: row[key]) == [source.row(1, "A"), source.row(2, "B")]
    assert sorted(deleted) == [1, 2]


@only("kinetica")
def test_changed_rows_options_are_refused_on_kinetica(source: KineticaSource, db: reactive.Datalayer) -> None:
    for kind in (Type.UPDATED, Type.DELETED):
        with pytest.raises(ConfigurationError, match="counts only"):
            TableMonitor.Client(db, "docs", [Callback(kind, print, event_options=Callback.ChangedRowsOptions())])
    assert source.server.monitors() == {} and not reactive_threads()


@only("kinetica")
@pytest.mark.parametrize(
    ("kinds", "server_side"),
    [
        ([Type.INSERT_DECODED], ["insert"]),
        ([Type.INSERT_RAW, Type.INSERT_DECODED, Type.TABLE_ALTERED], ["insert"]),
        ([Type.UPDATED, Type.TABLE_DROPPED], ["update"]),
        ([Type.DELETED, Type.UPDATED], ["delete", "update"]),
    ],
    ids=["decoded", "raw-and-decoded", "updated", "deleted-and-updated"],
)
def test_kinetica_one_server_side_monitor_per_event_type_asked_for(
    source: KineticaSource, db: reactive.Datalayer, kinds: list[TableMonitor.Callback.Type], server_side: list[str]
) -> None:
    client = TableMonitor.Client(db, "docs", Events().callbacks(*kinds))
    client.start_monitor()
    assert source.monitored_events() == server_side  # subscribed before start_monitor returned
    thread = monitor_thread(client)
    client.stop_monitor()
    assert source.monitored_events() == [] and not thread.is_alive()  # cleared before it returned
    db.close()
    assert source.server.monitors() == {}


# -- INSERT_RAW on SQL tables: the column types of reactive/rowformat.py ---------------------------
def wide_columns(kind: str) -> list[tuple[str, str, Any, Any]]:
    """(column, SQL type, a value, that value as an Avro reader gives it back from INSERT_RAW bytes)."""
    stamp, day = dt.datetime(2024, 1, 2, 3, 4, 5, 123456), dt.date(2024, 1, 2)
    columns = [
        ("flag", "boolean", True, True),
        ("small", "smallint", 3, 3),
        ("big", "bigint", 9_000_000_000, 9_000_000_000),
        ("r", "real", 1.5, 1.5),
        ("d", "double precision", 2.25, 2.25),
        ("t", "text", "é 🙂", "é 🙂"),
        ("bl", "bytea", b"\xaa\x00", b"\xaa\x00"),
        ("ts", "timestamp", stamp, stamp.replace(tzinfo=dt.UTC)),  # timestamp-micros is UTC
        ("day", "date", day, day),
        ("amount", "numeric(10,2)", Decimal("12.34"), '"12.34"'),  # others: JSON text (json_value)
    ]
    if kind != "sqlite":
        return columns
    # What an application stores in SQLite: 1/0, blobs, ISO text.
    stored = {"flag": 1, "ts": stamp.isoformat(sep=" "), "day": day.isoformat()}
    return [
        (name, "blob" if name == "bl" else sql, stored.get(name, value), raw)
        for name, sql, value, raw in columns
        if name != "amount"
    ]


@pytest.mark.parametrize(
    "source",
    SQL,
    indirect=True,
)
def test_insert_raw_writes_sql_column_types_as_documented(source: SQLSource, db: reactive.Datalayer) -> None:
    columns = wide_columns(source.name)
    ddl = ", ".join(f"{name} {sql}" for name, sql, _, _ in columns)
    source.client.execute(f"create table wide (id integer primary key, {ddl})")
    events = Events()
    with TableMonitor.Client(db, "wide", events.callbacks(Type.INSERT_RAW)) as client:
        insert = f"insert into wide values ({', '.join('?' * (len(columns) + 1))})"
        source.client.execute(insert, (1, *(value for _, _, value, _ in columns)))
        source.client.execute(insert, (2, *[None] * len(columns)))
        raws = [events.next(), events.next()]
    assert [what for what, _ in raws] == ["INSERT_RAW", "INSERT_RAW"]
    fields = {field["name"]: field["type"] for field in json.loads(client.type_schema)["fields"]}
    assert all(kind[1] == "null" for kind in fields.values())  # nullable, Kinetica's way
    assert fields["ts"][0] == {"type": "long", "logicalType": "timestamp-micros"}
    assert fields["day"][0] == {"type": "int", "logicalType": "date"}
    decoded = sorted((decode_raw(client, raw) for _, raw in raws), key=lambda record: record["id"])
    assert decoded == [
        {"id": 1, **{name: raw for name, _, _, raw in columns}},
        {"id": 2, **{name: None for name, _, _, _ in columns}},
    ]


@only("duckdb", "postgres")
def test_insert_raw_writes_arrays_as_avro_arrays(source: SQLSource, db: reactive.Datalayer) -> None:
    source.client.execute("create table vecs (id integer primary key, embedding real[], tags text[])")
    events = Events()
    with TableMonitor.Client(db, "vecs", events.callbacks(Type.INSERT_RAW)) as client:
        source.client.execute("insert into vecs values (?, ?, ?)", (1, [0.5, 1.5], ["a", None]))
        _, raw = events.next()
    fields = {field["name"]: field["type"] for field in json.loads(client.type_schema)["fields"]}
    assert fields["embedding"][0] == {"type": "array", "items": ["float", "null"]}
    assert decode_raw(client, raw) == {"id": 1, "embedding": [0.5, 1.5], "tags": ["a", None]}


# -- what a monitor sees: documented per kind of source ---------------------------------------
@only(*PUSH)
def test_push_sources_report_an_insert_and_its_delete(source: Source, db: reactive.Datalayer) -> None:
    events = Events()
    with TableMonitor.Client(db, "docs", events.callbacks(Type.INSERT_DECODED, Type.DELETED)):
        source.insert(1, "short-lived")
        source.delete(1)
        assert [events.next(), events.next()] == [("INSERT_DECODED", source.row(1, "short-lived")), ("DELETED", 1)]


@only(*SQL)
def test_polling_sees_only_what_differs_between_polls(source: SQLSource) -> None:
    events = Events()
    with reactive.connect(source.uri, poll_interval=3600) as db:  # a poll only when wait_idle asks
        client = TableMonitor.Client(db, "docs", events.callbacks(Type.INSERT_DECODED, Type.DELETED, Type.UPDATED))
        with client:
            source.insert(1, "short-lived")
            source.delete(1)
            source.insert(2, "first")
            source.update(2, "kept")
            assert db.cdc.wait_idle(WAIT)  # one poll: row 1 never differed, row 2 is new
            source.insert(3, "next poll")
            assert db.cdc.wait_idle(WAIT)
            assert [events.next(), events.next()] == [
                ("INSERT_DECODED", source.row(2, "kept")),
                ("INSERT_DECODED", source.row(3, "next poll")),
            ]
        assert events.pending() == []


# -- callbacks that fail, callbacks that are slow -----------------------------------------------
def test_a_raising_callback_is_not_retried_and_monitoring_goes_on(source: Source, db: reactive.Datalayer) -> None:
    events = Events()

    def refuse_the_first(row: dict[str, Any]) -> None:
        if row == source.row(1, "refused"):
            raise ValueError("cannot take row 1")

    callbacks = [events.callback(Type.INSERT_DECODED, then=refuse_the_first), events.callback(Type.DELETED)]
    with TableMonitor.Client(db, "docs", callbacks):
        source.insert(1, "refused")
        assert events.next() == ("INSERT_DECODED", source.row(1, "refused"))
        assert events.next() == ("INSERT_DECODED error", "ValueError: cannot take row 1")
        source.insert(2, "taken")
        assert events.next() == ("INSERT_DECODED", source.row(2, "taken"))  # row 1 is not called again
        source.delete(2)
        assert events.next() == ("DELETED", 1)
    assert events.pending() == []


def test_a_slow_callback_does_not_hold_a_listener_on_another_table(source: Source, db: reactive.Datalayer) -> None:
    """The callback runs on the monitor's thread: the change listener and the handler go on.

    ``wait_idle`` is about outputs: it returns True while a monitor's callback is still busy.
    """
    source.create("notes")
    entered, release = threading.Event(), threading.Event()
    callers: list[str] = []

    def hold(row: dict[str, Any]) -> None:
        callers.append(threading.current_thread().name)
        entered.set()
        assert release.wait(WAIT), "the test never released the callback"

    client = TableMonitor.Client(db, "docs", [Callback(Type.INSERT_DECODED, hold)])
    add_shouting_listener(db, "notes")
    try:
        with client:
            source.insert(1, "held")
            assert entered.wait(WAIT)
            source.insert(7, "hello", table="notes")
            assert db.cdc.wait_idle(WAIT)
            assert outputs_by_source(db, "shout__title") == {7: "HELLO"}  # while the callback still waits
            release.set()
    finally:
        release.set()
    assert callers == ["reactive-monitor-docs"]


@only(*PUSH)
def test_a_full_monitor_queue_holds_the_change_listener_and_drops_nothing(
    source: Source, db: reactive.Datalayer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Backpressure, as documented: while a monitor's queue is full its change listener waits."""
    monkeypatch.setattr("reactive.monitor.QUEUE_SIZE", 1)
    entered, release = threading.Event(), threading.Event()
    called: queue.Queue[dict[str, Any]] = queue.Queue()

    def hold(row: dict[str, Any]) -> None:
        called.put(row)
        entered.set()
        assert release.wait(WAIT), "the test never released the callback"

    try:
        with TableMonitor.Client(db, "docs", [Callback(Type.INSERT_DECODED, hold)]):
            for row_id in range(1, 5):
                source.insert(row_id, f"row {row_id}")
            assert entered.wait(WAIT)
            assert not db.cdc.wait_idle(0.5)  # row 2 is queued, row 3 waits in the change listener
            release.set()
            assert [called.get(timeout=WAIT) for _ in range(4)] == [source.row(i, f"row {i}") for i in range(1, 5)]
            assert db.cdc.wait_idle(WAIT)
    finally:
        release.set()


@pytest.mark.parametrize("source", [*SQL, "mongodb"], indirect=True)
def test_a_change_delivered_again_after_a_released_window_is_told_once(source: Source) -> None:
    # A failure of the handler's own (after B's window is planned behind A's, A's is written)
    # releases B's window: the source delivers B again (the next poll; the stream read again
    # from before it). The monitors were told of B again at every release: on SQLite five
    # times each row while a trigger refused the outputs' writes.
    predict, window_rows, compute = HeldTags("A"), BrokenOnce(1, 1), Watching()
    events = Events()
    options: dict[str, Any] = {"poll_interval": 0.05, "page_size": 1, "compute": compute, "batch_rows": window_rows}
    with reactive.connect(source.uri, **options) as db:
        db.add(Listener(Model("tag", predict=predict), "title", "docs"))
        with TableMonitor.Client(db, "docs", events.callbacks(Type.INSERT_DECODED)):
            window_rows.armed.set()
            if isinstance(source, SQLSource):  # one poll finds both: B is planned while A computes
                source.client.execute("insert into docs values (1, 'A'), (2, 'B')")
            else:
                source.insert(1, "A")
                source.insert(2, "B")
            assert predict.computing.wait(WAIT)
            assert compute.wait_for(lambda submitted: ["B"] in submitted, timeout=WAIT)
            predict.go.set()
            assert db.cdc.wait_idle(WAIT)
            assert window_rows.broken.is_set() and db.cdc.listener is not None and db.cdc.listener.releases == 1
            assert outputs_by_source(db, "tag__title") == {1: "<A>", 2: "<B>"}
            assert [events.next(), events.next()] == [
                ("INSERT_DECODED", source.row(1, "A")),
                ("INSERT_DECODED", source.row(2, "B")),
            ]
            source.insert(3, "C")  # told after the B it was not told again
            assert events.next() == ("INSERT_DECODED", source.row(3, "C"))
    assert events.pending() == []


def test_closing_the_datalayer_while_a_slow_callback_holds_a_full_queue_returns_at_once(
    source: Source, db: reactive.Datalayer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The change listener waited for room in the monitor's full queue: its stop, and db.close()
    # with it, waited for the callback to take one more change (for ever behind a hung callback).
    monkeypatch.setattr("reactive.monitor.QUEUE_SIZE", 1)
    entered, release = threading.Event(), threading.Event()

    def hold(row: dict[str, Any]) -> None:
        entered.set()
        assert release.wait(WAIT), "the test never released the callback"

    client = TableMonitor.Client(db, "docs", [Callback(Type.INSERT_DECODED, hold)])
    client.start_monitor()
    thread = monitor_thread(client)
    closing = threading.Thread(target=db.close)
    try:
        source.insert(1, "taken")
        assert entered.wait(WAIT)
        source.insert(2, "queued")
        assert client._monitor is not None and within(WAIT, client._monitor._queue.full)
        source.insert(3, "waits in the change listener")
        assert not db.cdc.wait_idle(0.5)
        closing.start()
        closing.join(WAIT)
        assert not closing.is_alive() and thread.is_alive()  # closed while the callback still holds
    finally:
        release.set()
        closing.join(60)
    thread.join(WAIT)
    assert not thread.is_alive() and client.task_list == []


# -- dropped and altered tables -----------------------------------------------------------------
def test_table_dropped_fires_once_per_monitor_which_then_stops(source: Source, db: reactive.Datalayer) -> None:
    first, second = Events(), Events()
    clients = [
        TableMonitor.Client(
            db, "docs", first.callbacks(Type.INSERT_DECODED, Type.TABLE_DROPPED), quick_drop_detection()
        ),
        TableMonitor.Client(db, "docs", second.callbacks(Type.DELETED, Type.TABLE_DROPPED), quick_drop_detection()),
    ]
    for client in clients:
        client.start_monitor()
    threads = [monitor_thread(client) for client in clients]
    source.insert(1, "one")
    assert first.next() == ("INSERT_DECODED", source.row(1, "one"))
    source.drop()
    for events in (first, second):
        what, message = events.next()
        assert what == "TABLE_DROPPED" and "docs" in message
    for thread in threads:
        thread.join(WAIT)
        assert not thread.is_alive()
    assert first.pending() == second.pending() == []  # once, and nothing after it
    for client in clients:
        assert client.task_list == []
        client.stop_monitor()  # after the monitor stopped itself: nothing happens
    if isinstance(source, KineticaSource):
        assert source.monitored_events() == []


@only("kinetica")
def test_kinetica_table_altered_mid_stream_then_inserts_decode_with_the_new_type(
    source: KineticaSource, db: reactive.Datalayer
) -> None:
    events = Events()
    client = TableMonitor.Client(db, "docs", events.callbacks(Type.INSERT_RAW, Type.INSERT_DECODED, Type.TABLE_ALTERED))
    with client:
        source.insert(1, "old type")
        assert events.next()[0] == "INSERT_RAW"
        assert events.next() == ("INSERT_DECODED", {"id": 1, "title": "old type"})
        altered = source.gpudb.alter_table(
            "docs", "add_column", "note", options={"column_type": "string", "column_properties": "nullable"}
        )
        assert altered.is_ok()
        reopened = GPUdbTable(None, "docs", db=source.gpudb)  # the foreign client sees the new type
        reopened.insert_records([[2, "new type", "a note"]])
        what, raw = events.next()
        assert what == "INSERT_RAW"
        what, message = events.next()
        assert what == "TABLE_ALTERED" and "docs" in message
        new_row = {"id": 2, "title": "new type", "note": "a note"}
        assert events.next() == ("INSERT_DECODED", new_row)
        assert decode_raw(client, raw) == new_row  # type_schema follows the table
        reopened.insert_records([[3, "still new", None]])
        assert events.next()[0] == "INSERT_RAW"
        assert events.next() == ("INSERT_DECODED", {"id": 3, "title": "still new", "note": None})
    assert events.pending() == []


def insert_topic(source: KineticaSource) -> str:
    (topic,) = [
        t for t, (table, event) in source.server.monitors().items() if (table, event) == ("ki_home.docs", "insert")
    ]
    return topic


@only("kinetica")
def test_kinetica_skip_reports_a_corrupt_frame_and_goes_on(source: KineticaSource, db: reactive.Datalayer) -> None:
    events = Events()
    callbacks = [events.callback(Type.INSERT_DECODED, Callback.InsertDecodedOptions(Mode.SKIP))]
    with TableMonitor.Client(db, "docs", callbacks):
        source.server.publish_raw(insert_topic(source), [b"\xff\xff\xff"])
        what, message = events.next()
        assert what == "INSERT_DECODED error" and "could not be decoded" in message
        source.insert(1, "after the corrupt frame")
        assert events.next() == ("INSERT_DECODED", {"id": 1, "title": "after the corrupt frame"})
        assert source.monitored_events() == ["insert"]
    assert events.pending() == []


@only("kinetica")
def test_kinetica_abort_reports_then_alters_then_stops(source: KineticaSource, db: reactive.Datalayer) -> None:
    events = Events()
    callbacks = [
        events.callback(Type.INSERT_DECODED, Callback.InsertDecodedOptions(Mode.ABORT)),
        events.callback(Type.TABLE_ALTERED),
        events.callback(Type.DELETED),
    ]
    client = TableMonitor.Client(db, "docs", callbacks)
    client.start_monitor()
    thread = monitor_thread(client)
    assert source.monitored_events() == ["delete", "insert"]
    source.server.publish_raw(insert_topic(source), [b"\xff\xff\xff"])
    what, message = events.next()
    assert what == "INSERT_DECODED error" and "could not be decoded" in message
    what, message = events.next()
    assert what == "TABLE_ALTERED" and "docs" in message
    thread.join(WAIT)
    assert not thread.is_alive() and client.task_list == []
    assert source.monitored_events() == []  # it cleared its server-side monitors
    client.stop_monitor()
    client.stop_monitor()
    assert events.pending() == []


# -- starting and stopping ------------------------------------------------------------------
def test_stop_monitor_ends_the_thread_and_is_idempotent(source: Source, db: reactive.Datalayer) -> None:
    events = Events()
    client = TableMonitor.Client(db, "docs", events.callbacks(Type.INSERT_DECODED))
    client.stop_monitor()  # never started: nothing to do
    client.start_monitor()
    client.start_monitor()  # running: nothing to do
    thread = monitor_thread(client)
    source.insert(1, "one")
    assert events.next() == ("INSERT_DECODED", source.row(1, "one"))
    client.stop_monitor()
    assert not thread.is_alive() and client.task_list == []
    client.stop_monitor()
    db.close()
    assert not reactive_threads()


def test_stop_monitor_from_a_callback_ends_the_thread_and_no_callback_follows(
    source: Source, db: reactive.Datalayer
) -> None:
    # Called on the monitor's own thread, stop_monitor could not join it and left it waiting
    # for changes for ever, past db.close().
    seen: list[Any] = []

    def first_only(row: dict[str, Any]) -> None:
        seen.append(row)
        client.stop_monitor()

    client = TableMonitor.Client(db, "docs", [TableMonitor.Callback(Type.INSERT_DECODED, first_only)])
    client.start_monitor()
    thread = monitor_thread(client)
    source.insert(1, "one")
    source.insert(2, "two")
    thread.join(30)
    assert not thread.is_alive() and seen == [source.row(1, "one")] and client.task_list == []


def took_over(db: reactive.Datalayer) -> bool:
    """Whether the takeover that follows a stand-down has run to its end, monitors subscribed
    again (a transition holds ``_transitions`` until then)."""
    return db.cdc._activated.is_set() and not db.cdc._transitions.locked()


def test_a_monitor_pauses_at_a_stand_down_and_goes_on_at_the_takeover(source: Source, db: reactive.Datalayer) -> None:
    # A process that loses its lease stops its change listener; before, its monitors ended then
    # without a word and a takeover did not start them again.
    events = Events()
    client = TableMonitor.Client(db, "docs", events.callbacks(Type.INSERT_DECODED, Type.DELETED))
    client.start_monitor()
    source.insert(1, "one")
    assert events.next() == ("INSERT_DECODED", source.row(1, "one"))
    thread = monitor_thread(client)
    with db.cdc._transitions:  # the takeover waits until the stand-down is looked at
        db.cdc._stand_down()
        assert db.cdc.listener is None and thread.is_alive()
        if isinstance(source, KineticaSource):
            assert source.monitored_events() == []  # the stopped listener cleared its server-side monitors
        source.insert(3, "while paused")  # the holder's to report: not reported here, even later
    # The lease is still held: the keeper's next look takes over, and the monitor follows again.
    assert within(WAIT, lambda: took_over(db))
    if isinstance(source, KineticaSource):
        assert source.monitored_events() == ["delete", "insert"]
    source.insert(2, "two")
    source.delete(1)
    assert events.next() == ("INSERT_DECODED", source.row(2, "two"))
    assert events.next() == ("DELETED", 1)
    assert monitor_thread(client) is thread
    client.stop_monitor()
    assert not thread.is_alive() and events.pending() == []


@only("mongodb")
def test_a_holder_paused_past_its_lease_tells_its_monitors_nothing_the_new_holder_s_are_told(
    source: Source,
) -> None:
    # Monitors run in the process holding the lease. One paused past it (SIGSTOP; here its
    # keeper stopped) went on reading its stream as it woke, and its monitors were told of the
    # changes the process that took over told its own monitors of: each event twice.
    before, after = Events(), Events()
    paused = reactive.connect(source.uri, lease_ms=600)
    try:
        TableMonitor.Client(paused, "docs", before.callbacks(Type.INSERT_DECODED)).start_monitor()
        source.insert(1, "while it held the lease")
        assert before.next() == ("INSERT_DECODED", source.row(1, "while it held the lease"))
        keeper, listener = paused.cdc._keeper, paused.cdc.listener
        assert keeper is not None and listener is not None
        keeper.stop()  # nothing renews its lease from now on
        with reactive.connect(source.uri, lease_ms=600) as taker:
            taker.cdc.start()
            assert within(WAIT, lambda: taker.cdc.active)  # once the paused one's lease expired
            with TableMonitor.Client(taker, "docs", after.callbacks(Type.INSERT_DECODED)):
                source.insert(2, "after the takeover")
                assert after.next() == ("INSERT_DECODED", source.row(2, "after the takeover"))
                listener.sync(1.0)  # its stream reads past row 2 (or waits to be told the lease is lost)
                with pytest.raises(AssertionError, match="no callback"):
                    before.next(timeout=1.0)
            paused.close()  # first: its keeper stopped, it would take the lease the taker gives up
    finally:
        paused.close()
    assert before.pending() == [] and after.pending() == []


@pytest.mark.parametrize("source", [*SQL, "kinetica"], indirect=True)
def test_a_table_dropped_while_its_monitor_paused_is_reported_at_the_takeover(
    source: Source, db: reactive.Datalayer
) -> None:
    # Before, it waited on a table that was gone (the poll that found it gone told only the
    # monitors already following it). MongoDB follows a missing collection until it is created.
    events = Events()
    client = TableMonitor.Client(
        db, "docs", events.callbacks(Type.INSERT_DECODED, Type.TABLE_DROPPED), quick_drop_detection()
    )
    client.start_monitor()
    thread = monitor_thread(client)
    with db.cdc._transitions:
        db.cdc._stand_down()
        source.drop()
    what, message = events.next()
    assert what == "TABLE_DROPPED" and "docs" in message
    thread.join(WAIT)
    assert not thread.is_alive() and client.task_list == [] and events.pending() == []
    if isinstance(source, KineticaSource):
        assert source.monitored_events() == []


@only("mongodb")
def test_a_mongodb_collection_dropped_while_its_monitor_paused_is_followed_when_created_again(
    source: Source, db: reactive.Datalayer
) -> None:
    events = Events()
    client = TableMonitor.Client(db, "docs", events.callbacks(Type.INSERT_DECODED, Type.TABLE_DROPPED))
    client.start_monitor()
    with db.cdc._transitions:
        db.cdc._stand_down()
        source.drop()
    assert within(WAIT, lambda: took_over(db))
    source.insert(5, "in the new collection")
    assert events.next() == ("INSERT_DECODED", source.row(5, "in the new collection"))
    client.stop_monitor()
    assert events.pending() == []


def test_closing_the_datalayer_ends_a_running_monitor(source: Source, db: reactive.Datalayer) -> None:
    client = TableMonitor.Client(db, "docs", Events().callbacks(Type.INSERT_DECODED, Type.UPDATED))
    client.start_monitor()
    thread = monitor_thread(client)
    db.close()
    thread.join(WAIT)
    assert not thread.is_alive() and client.task_list == []
    client.stop_monitor()  # after the datalayer closed: nothing happens, nothing raised
    if isinstance(source, KineticaSource):
        assert source.server.monitors() == {}


def test_a_monitor_made_or_started_after_its_datalayer_closed_is_refused_clearly(
    source: Source, db: reactive.Datalayer
) -> None:
    # The driver's own error: sqlite3's "Cannot operate on a closed database", pymongo's
    # "Cannot use MongoClient after close", DuckDB's "Connection already closed".
    client = TableMonitor.Client(db, "docs", Events().callbacks(Type.INSERT_DECODED))
    db.close()
    for call in (client.start_monitor, lambda: TableMonitor.Client(db, "docs", list(client._callbacks.values()))):
        with pytest.raises(ConfigurationError, match=r"the datalayer of .* is closed; reactive\.connect"):
            call()
    assert client.task_list == [] and not reactive_threads()


@pytest.mark.parametrize("source", [*SQL, *PUSH], indirect=True)
def test_a_monitor_started_again_reports_only_rows_changed_after(source: Source, db: reactive.Datalayer) -> None:
    events = Events()
    client = TableMonitor.Client(db, "docs", events.callbacks(Type.INSERT_DECODED))
    client.start_monitor()
    source.insert(1, "one")
    assert events.next() == ("INSERT_DECODED", source.row(1, "one"))
    client.stop_monitor()
    source.insert(2, "while stopped")
    client.start_monitor()
    source.insert(3, "after the restart")
    try:
        assert events.next() == ("INSERT_DECODED", source.row(3, "after the restart"))
    finally:
        client.stop_monitor()


def test_removing_the_last_listener_on_a_table_leaves_its_monitors_following_it(
    source: Source, db: reactive.Datalayer
) -> None:
    # db.remove let the table go: its monitors stayed alive and were told nothing, ever again.
    events = Events()
    add_shouting_listener(db, "docs")
    with TableMonitor.Client(db, "docs", events.callbacks(Type.INSERT_DECODED)):
        source.insert(1, "one")
        assert events.next() == ("INSERT_DECODED", source.row(1, "one"))
        db.remove("shout__title", drop_outputs=True)
        source.insert(2, "two")
        assert events.next() == ("INSERT_DECODED", source.row(2, "two"))
    assert events.pending() == []


@only(*SQL)
def test_a_monitor_stopped_while_another_on_its_table_starts_leaves_that_one_following(
    source: Source, db: reactive.Datalayer
) -> None:
    # The table was let go when the last *armed* monitor stopped: one still waiting for its
    # baseline poll then followed nothing, for good.
    source.create("notes")
    entered, release = threading.Event(), threading.Event()

    def hold(titles: list[str]) -> list[str]:
        entered.set()
        assert release.wait(WAIT), "the test never released the model"
        return titles

    db.add(Listener(Model("hold", predict=hold), "title", "notes"))
    first, second = Events(), Events()
    stopping = TableMonitor.Client(db, "docs", first.callbacks(Type.INSERT_DECODED))
    starting = TableMonitor.Client(db, "docs", second.callbacks(Type.INSERT_DECODED))
    stopping.start_monitor()
    source.insert(1, "held", table="notes")
    assert entered.wait(WAIT)  # that poll ends once its window is written: a baseline waits until then
    start = threading.Thread(target=starting.start_monitor)
    start.start()
    try:
        listener = db.cdc.listener
        assert listener is not None and within(WAIT, lambda: bool(listener._arming))
        stopping.stop_monitor()
    finally:
        release.set()
        start.join(WAIT)
    source.insert(2, "two")
    assert second.next() == ("INSERT_DECODED", source.row(2, "two"))
    starting.stop_monitor()
    assert first.pending() == [] and second.pending() == []


@pytest.mark.parametrize("source", [*SQL, *PUSH], indirect=True)
def test_a_monitor_in_a_new_process_reports_only_rows_changed_after(source: Source) -> None:
    for process in (1, 2):
        events = Events()
        with (
            reactive.connect(source.uri, poll_interval=0.05) as db,
            TableMonitor.Client(db, "docs", events.callbacks(Type.INSERT_DECODED)),
        ):
            source.insert(process, "while monitored")
            assert events.next() == ("INSERT_DECODED", source.row(process, "while monitored"))
        source.insert(100 + process, "between the processes")


# -- porting code written for gpudb -------------------------------------------------------------
class DocsMonitor(TableMonitor.Client):
    """The seed's example: a subclass passing bound methods."""

    def __init__(self, db: reactive.Datalayer, table_name: str, options: TableMonitor.Options | None = None) -> None:
        self.seen: queue.Queue[tuple[str, Any]] = queue.Queue()
        callbacks = [
            TableMonitor.Callback(TableMonitor.Callback.Type.INSERT_RAW, self.on_insert_raw, self.on_error),
            TableMonitor.Callback(
                TableMonitor.Callback.Type.INSERT_DECODED,
                self.on_insert_decoded,
                self.on_error,
                TableMonitor.Callback.InsertDecodedOptions(
                    TableMonitor.Callback.InsertDecodedOptions.DecodeFailureMode.ABORT
                ),
            ),
        ]
        super(DocsMonitor, self).__init__(db, table_name, callbacks, options=options)  # noqa: UP008 (as the seed)

    def on_insert_raw(self, record: bytes) -> None:
        self.seen.put(("raw", record))

    def on_insert_decoded(self, record: dict[str, Any]) -> None:
        self.seen.put(("decoded", record))

    def on_error(self, message: str) -> None:
        self.seen.put(("error", message))


def test_a_subclass_passing_bound_methods_works_as_in_the_seed(source: Source, db: reactive.Datalayer) -> None:
    monitor = DocsMonitor(db, "docs", TableMonitor.Options.default())
    monitor.start_monitor()
    try:
        source.insert(1, "ported")
        what, raw = monitor.seen.get(timeout=WAIT)
        assert what == "raw" and source.raw_row(decode_raw(monitor, raw)) == source.row(1, "ported")
        assert monitor.seen.get(timeout=WAIT) == ("decoded", source.row(1, "ported"))
    finally:
        monitor.stop_monitor()


# -- refused before anything is created -------------------------------------------------------
def callback(kind: TableMonitor.Callback.Type) -> TableMonitor.Callback:
    return Callback(kind, print)


@pytest.mark.parametrize(
    ("callback_list", "match"),
    [
        ([], "no monitor to create"),
        ([callback(Type.TABLE_DROPPED), callback(Type.TABLE_ALTERED)], "at least one of INSERT_DECODED"),
        ([callback(Type.INSERT_DECODED), "INSERT_RAW"], "must hold TableMonitor.Callback objects"),
        (callback(Type.INSERT_DECODED), "must be a list"),
        ([callback(Type.DELETED), callback(Type.DELETED)], "two callbacks of type DELETED"),
    ],
    ids=["empty", "no-event-type", "not-a-callback", "not-a-list", "twice"],
)
@only("duckdb", "kinetica")
def test_bad_callback_lists_are_refused(source: Source, db: reactive.Datalayer, callback_list: Any, match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        TableMonitor.Client(db, "docs", callback_list)
    assert not db.cdc.running and not reactive_threads()
    if isinstance(source, KineticaSource):
        assert source.server.monitors() == {}


def test_bad_callbacks_are_refused() -> None:
    with pytest.raises(ConfigurationError, match="callback_type"):
        Callback("INSERT_DECODED", print)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="event_callback must be callable"):
        Callback(Type.INSERT_DECODED, None)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="error_callback must be callable"):
        Callback(Type.INSERT_DECODED, print, "log it")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="INSERT_DECODED callbacks only"):
        Callback(Type.DELETED, print, None, Callback.InsertDecodedOptions(Mode.ABORT))
    with pytest.raises(ConfigurationError, match="UPDATED and DELETED callbacks only"):
        Callback(Type.INSERT_DECODED, print, None, Callback.ChangedRowsOptions())
    with pytest.raises(ConfigurationError, match=r"Callback\.Options"):
        Callback(Type.INSERT_DECODED, print, None, {"decode_failure_mode": "SKIP"})  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="decode_failure_mode"):
        Callback.InsertDecodedOptions("ABORT")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "options",
    [
        {"timeout": 1},
        {"inactivity_timeout": 0},
        {"inactivity_timeout": -1.5},
        {"inactivity_timeout": "soon"},
        {"inactivity_timeout": None},
        {"inactivity_timeout": True},
        {"inactivity_timeout": float("nan")},
        {"inactivity_timeout": float("inf")},
        [("inactivity_timeout", 1)],
    ],
    ids=["unknown-key", "zero", "negative", "text", "none", "bool", "nan", "infinite", "not-a-dict"],
)
def test_bad_options_are_refused(options: Any) -> None:
    with pytest.raises(ConfigurationError, match=r"inactivity_timeout|unknown table monitor options|must be a dict"):
        TableMonitor.Options(_dict=options)


def test_what_is_not_a_datalayer_or_not_options_is_refused(duck: SQLClient) -> None:
    duck.execute("create table docs (id integer primary key, title varchar)")
    callbacks = [callback(Type.INSERT_DECODED)]
    with pytest.raises(ConfigurationError, match="reactive datalayer"):
        TableMonitor.Client(duck.uri, "docs", callbacks)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="reactive datalayer"):
        TableMonitor.Client(duck.raw, "docs", callbacks)  # type: ignore[arg-type]
    with reactive.connect(duck.uri) as db:
        with pytest.raises(ConfigurationError, match=r"must be a TableMonitor\.Options"):
            TableMonitor.Client(db, "docs", callbacks, {"inactivity_timeout": 1})  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError, match="table_name"):
            TableMonitor.Client(db, "", callbacks)
        assert not db.cdc.running and not reactive_threads()


def test_a_sql_table_without_primary_key_is_monitored_by_the_id_column_given(duck: SQLClient) -> None:
    # A row without an id is not reported (no backend follows one). A table is followed by one
    # id column: a listener or monitor naming another is refused, with the one to pass.
    duck.execute("create table notes (note_id integer, alt integer, title varchar)")
    events = Events()
    with reactive.connect(duck.uri, poll_interval=0.05) as db:
        with pytest.raises(reactive.MissingIdColumnError, match=r"pass TableMonitor\.Client\(\.\.\., id_column="):
            TableMonitor.Client(db, "notes", events.callbacks(Type.INSERT_DECODED))
        for bad in ("", 3):
            with pytest.raises(ConfigurationError, match="id_column must be a column name"):
                TableMonitor.Client(db, "notes", events.callbacks(Type.INSERT_DECODED), id_column=bad)  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError, match="id_column 'nope' is not a column of 'notes'"):
            TableMonitor.Client(db, "notes", events.callbacks(Type.INSERT_DECODED), id_column="nope")
        deleted = events.callback(Type.DELETED, Callback.ChangedRowsOptions())
        client = TableMonitor.Client(db, "notes", [events.callback(Type.INSERT_DECODED), deleted], id_column="note_id")
        client.start_monitor()
        duck.execute("insert into notes values (null, 7, 'no id'), (1, 8, 'one')")
        assert events.next() == ("INSERT_DECODED", {"note_id": 1, "alt": 8, "title": "one"})
        shout = Model("shout", predict=lambda titles: [t.upper() for t in titles])
        with pytest.raises(ConfigurationError, match=r"followed by its id column 'note_id' \(for its table monitors\)"):
            db.add(Listener(shout, "title", "notes", id_column="alt"))
        db.add(Listener(shout, "title", "notes", id_column="note_id"))
        with pytest.raises(ConfigurationError, match=r"followed by its id column 'note_id'.*pass id_column='note_id'"):
            TableMonitor.Client(db, "notes", events.callbacks(Type.INSERT_DECODED), id_column="alt")
        duck.execute("delete from notes where note_id = 1")
        assert events.next() == ("DELETED", [1])
        assert db.cdc.wait_idle(WAIT) and events.pending() == []
        assert outputs_by_source(db, "shout__title") == {}
        client.stop_monitor()


@only("kinetica")
def test_kinetica_a_very_long_inactivity_timeout_keeps_the_listener_working(
    source: KineticaSource, db: reactive.Datalayer
) -> None:
    """A monitor checking its table every ~1900 years (more than ``threading.TIMEOUT_MAX`` seconds):
    the listener's maintenance thread lives on, so a Listener added later still gets its updates."""
    source.create("notes")
    source.insert(7, "hello", table="notes")
    very_long = TableMonitor.Options(_dict={"inactivity_timeout": 1e9})
    with TableMonitor.Client(db, "docs", [callback(Type.INSERT_DECODED)], very_long):
        add_shouting_listener(db, "notes")
        source.update(7, "updated", table="notes")  # an update is a count: the maintenance thread reconciles it
        assert db.cdc.wait_idle(3)
        assert outputs_by_source(db, "shout__title") == {7: "UPDATED"}


@only("kinetica")
def test_kinetica_refuses_a_gpudb_connection_and_another_monitor_port(source: KineticaSource) -> None:
    callbacks = [callback(Type.INSERT_DECODED)]
    with pytest.raises(ConfigurationError, match="reactive datalayer"):
        TableMonitor.Client(source.gpudb, "docs", callbacks)  # type: ignore[arg-type]
    with reactive.connect(source.uri) as db:
        other_port = TableMonitor.Options(_dict={"monitor_port": source.server.zmq_port + 1})
        with pytest.raises(ConfigurationError, match="monitor_port"):
            TableMonitor.Client(db, "docs", callbacks, other_port)
        same_port = TableMonitor.Options(_dict={"monitor_port": source.server.zmq_port})
        TableMonitor.Client(db, "docs", callbacks, same_port)  # what the URI says is accepted
        assert source.server.monitors() == {} and not reactive_threads()


@pytest.mark.parametrize("source", [*SQL, "kinetica"], indirect=True)  # MongoDB: the next test
def test_a_missing_table_is_refused_and_nothing_is_created(source: Source, db: reactive.Datalayer) -> None:
    with pytest.raises(TableNotFoundError, match="no_such_table"):
        TableMonitor.Client(db, "no_such_table", [callback(Type.INSERT_DECODED)])
    assert not db.cdc.running and not reactive_threads()
    if isinstance(source, KineticaSource):
        assert source.server.monitors() == {}


@pytest.mark.parametrize("source", ["mongodb"], indirect=True)
def test_a_missing_mongodb_collection_is_followed_once_it_is_created(source: Source, db: reactive.Datalayer) -> None:
    """MongoDB creates a collection at its first insert: a monitor may be started before."""
    events = Events()
    with TableMonitor.Client(db, "not_yet", events.callbacks(Type.INSERT_DECODED)):
        source.insert(1, "first", table="not_yet")
        assert events.next() == ("INSERT_DECODED", source.row(1, "first"))


@pytest.mark.parametrize("source", [*SQL, "kinetica"], indirect=True)
def test_a_table_dropped_before_start_monitor_is_refused_and_nothing_starts(
    source: Source, db: reactive.Datalayer
) -> None:
    client = TableMonitor.Client(db, "docs", [callback(Type.INSERT_DECODED)])
    source.drop()
    with pytest.raises(TableNotFoundError, match="docs"):
        client.start_monitor()
    assert client.task_list == [] and not db.cdc.running and not reactive_threads()
    if isinstance(source, KineticaSource):
        assert source.server.monitors() == {}
    client.stop_monitor()


# -- options --------------------------------------------------------------------------------
def test_options_defaults_dict_json_and_milliseconds() -> None:
    default = TableMonitor.Options.default()
    assert default.inactivity_timeout == 20 * 60 * 1000  # the getter answers in milliseconds, as the seed's
    assert default.as_dict() == {"inactivity_timeout": 20.0, "max_retries": 5, "wait_interval": 1, "monitor_port": None}
    options = TableMonitor.Options(_dict={"inactivity_timeout": 0.1, "max_retries": 2})
    assert options.inactivity_timeout == pytest.approx(6000.0)
    assert options.as_dict()["inactivity_timeout"] == 0.1  # minutes, as given
    assert json.loads(options.as_json()) == options.as_dict()
    again = TableMonitor.Options(_dict=options.as_dict())
    assert again.as_dict() == options.as_dict()
    options.inactivity_timeout = 0.5
    assert options.inactivity_timeout == pytest.approx(30_000.0)
    with pytest.raises(ConfigurationError):
        options.inactivity_timeout = -1

"""Conformance: the official Kinetica client (``gpudb`` 7.2.3.13) against tests/kinetica_server.py.

Each test drives ``GPUdb``, ``GPUdbTable`` and ``GPUdbTableMonitor.Client`` as an application would
and checks what the client sees and what the server holds, so ``reactive``'s Kinetica tests can trust
the server. Monitor events are awaited on queues with timeouts, after ``wait_subscribed``; nothing
sleeps to wait for processing.
"""

from __future__ import annotations

import io
import json
import queue
import struct
import threading
from collections.abc import Callable, Iterator
from typing import Any

import fastavro
import pytest
import requests
from gpudb import (
    GPUdb,
    GPUdbColumnProperty,
    GPUdbException,
    GPUdbRecordColumn,
    GPUdbRecordType,
    GPUdbTable,
    GPUdbTableMonitor,
    GPUdbUnauthorizedAccessException,
)
from kinetica_server import COUNT_SCHEMA, KineticaError, KineticaTestServer, TableType, compile_filter

Callback = GPUdbTableMonitor.Callback
Type = Callback.Type
WAIT = 5.0  # seconds: the upper bound for any one event; normally milliseconds
PREFLIGHT_TIMEOUT = 2.0  # a healthy GPUdbTableMonitor.Client() takes ~50 ms
TABLE = "ki_home.docs"  # how the server names table "docs"


def vec(*values: float) -> bytes:
    """A vector(3) value as Kinetica stores it: little-endian float32."""
    return struct.pack("<3f", *values)


ROWS = [
    [1, "a", 10, [1.0, 0.0, 0.0]],
    [2, "it's", 20, [0.0, 1.0, 0.0]],
    [3, None, 30, [0.0, 0.0, 1.0]],
    [4, "日本語 🙂", 40, [0.5, 0.5, 0.5]],
]
STORED = [{"id": r[0], "名前": r[1], "qty": r[2], "vec": vec(*r[3])} for r in ROWS]


def docs_type() -> GPUdbRecordType:
    return GPUdbRecordType(
        [
            GPUdbRecordColumn("id", "int", [GPUdbColumnProperty.PRIMARY_KEY]),
            GPUdbRecordColumn("名前", "string", [GPUdbColumnProperty.CHAR16], is_nullable=True),
            GPUdbRecordColumn("qty", "long"),
            GPUdbRecordColumn("vec", "bytes", ["vector(3)"]),
        ],
        label="docs",
    )


def connect(server: KineticaTestServer, **options: Any) -> GPUdb:
    return GPUdb(host=server.url, options=GPUdb.Options({"disable_failover": True, **options}))


def create_docs(db: GPUdb, rows: list[list[Any]] = ROWS) -> GPUdbTable:
    table = GPUdbTable(docs_type(), "docs", db=db)
    if rows:
        table.insert_records(rows)
    return table


def avro(schema: Any, record: dict[str, Any]) -> bytes:
    out = io.BytesIO()
    fastavro.schemaless_writer(out, schema, record)
    return out.getvalue()


def ids(records: list[Any]) -> list[int]:
    return [record["id"] for record in records]


@pytest.fixture(autouse=True)
def no_thread_left_behind_here() -> Iterator[None]:
    """The server's threads and the official monitor's threads all end with the test."""
    before = set(threading.enumerate())
    yield
    left = [t.name for t in threading.enumerate() if t not in before]
    assert not left, f"threads left running: {left}"


# -- monitor clients -----------------------------------------------------------------------------
class Events:
    """Every callback puts (callback type name, its argument) on one queue."""

    def __init__(self) -> None:
        self.queue: queue.Queue[tuple[str, Any]] = queue.Queue()

    def callbacks(self, *types: Type) -> list[Callback]:
        return [Callback(t, self._sink(t.name)) for t in types]

    def _sink(self, name: str) -> Callable[[Any], None]:
        return lambda argument: self.queue.put((name, argument))

    def next(self) -> tuple[str, Any]:
        return self.queue.get(timeout=WAIT)


def _build(box: queue.Queue[Any], args: tuple[Any, ...]) -> None:
    try:
        box.put(GPUdbTableMonitor.Client(*args))
    except Exception as exc:
        box.put(exc)


def build_client(args: tuple[Any, ...], preflights: list[threading.Thread]) -> GPUdbTableMonitor.Client:
    """``GPUdbTableMonitor.Client()`` can hang forever in its ZMQ pre-flight (about 1 in 20 on localhost:
    it connects before it attaches its socket monitor and can miss the connect event), so build it in
    a thread and try again after a timeout. A hung builder is released when the server stops: its
    pre-flight socket then sees a disconnect and the constructor raises."""
    for _ in range(5):
        box: queue.Queue[Any] = queue.Queue()
        thread = threading.Thread(target=_build, args=(box, args), name="kinetica-test-preflight", daemon=True)
        thread.start()
        preflights.append(thread)
        try:
            built = box.get(timeout=PREFLIGHT_TIMEOUT)
        except queue.Empty:
            continue
        if isinstance(built, Exception):
            raise built
        return built
    raise AssertionError("GPUdbTableMonitor.Client() hung five times")


StartMonitor = Callable[..., Events]


@pytest.fixture
def monitor(kinetica_server: KineticaTestServer) -> Iterator[StartMonitor]:
    """``monitor(db, table, *callback types, inactivity_minutes=1.0)``: a started official monitor client
    whose server-side topics all have a subscriber; every client is stopped after the test."""
    clients: list[GPUdbTableMonitor.Client] = []
    preflights: list[threading.Thread] = []

    def start(db: GPUdb, table: str, *types: Type, inactivity_minutes: float = 1.0) -> Events:
        events = Events()
        options = GPUdbTableMonitor.Options(
            _dict={"monitor_port": kinetica_server.zmq_port, "inactivity_timeout": inactivity_minutes}
        )
        before = set(kinetica_server.monitors())
        client = build_client((db, table, events.callbacks(*types), options), preflights)
        clients.append(client)
        client.start_monitor()  # creates the server-side monitors before it returns
        for topic in set(kinetica_server.monitors()) - before:
            assert kinetica_server.wait_subscribed(topic, WAIT), f"nobody subscribed to {topic}"
        return events

    yield start
    for client in clients:
        for task in client.task_list:
            task.stop()  # flag every thread first: stop_monitor() alone joins them one 250 ms poll at a time
        client.stop_monitor()  # its threads clear their monitors over HTTP, so the server is still up
    kinetica_server.stop()
    for thread in preflights:
        thread.join(WAIT)


@pytest.fixture
def db(kinetica_server: KineticaTestServer) -> GPUdb:
    return connect(kinetica_server)


# -- connecting ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("options", "calls"),
    [
        ({}, {"/show/system/status": 2, "/show/system/properties": 1}),
        ({"disable_auto_discovery": True}, {"/show/system/properties": 1}),
    ],
    ids=["auto-discovery", "no-auto-discovery"],
)
def test_connect(kinetica_server: KineticaTestServer, options: dict[str, Any], calls: dict[str, int]) -> None:
    client = GPUdb(host=kinetica_server.url, options=GPUdb.Options(options))
    assert dict(kinetica_server.calls) == calls
    assert str(client.server_version).startswith("7.2.3.13")
    assert client.host == "127.0.0.1"


@pytest.fixture
def secured_server() -> Iterator[KineticaTestServer]:
    server = KineticaTestServer(username="alice", password="s3cret").start()
    yield server
    server.stop()


def test_basic_auth(secured_server: KineticaTestServer) -> None:
    client = connect(secured_server, username="alice", password="s3cret")
    assert client.has_table("docs")["table_exists"] is False
    with pytest.raises(GPUdbUnauthorizedAccessException, match="Unauthorized"):
        connect(secured_server, username="alice", password="wrong")
    assert requests.post(f"{secured_server.url}/has/table", data=b"", timeout=WAIT).status_code == 401


def test_unknown_endpoints_answer_404(kinetica_server: KineticaTestServer, db: GPUdb) -> None:
    response = requests.post(f"{kinetica_server.url}/no/such/endpoint", data=b"", timeout=WAIT)
    assert response.status_code == 404
    assert "x-request-time-secs" in response.headers
    # An endpoint the client knows but this server does not implement.
    with pytest.raises(GPUdbException, match=r"Endpoint not found.*404"):
        db.show_table_monitors()


def test_error_envelopes_reach_the_client(kinetica_server: KineticaTestServer, db: GPUdb) -> None:
    kinetica_server.fail_next("/has/table", "Kinetica says no")
    response = db.has_table("docs")
    assert (response["status_info"]["status"], response["status_info"]["message"]) == ("ERROR", "Kinetica says no")
    assert db.has_table("docs").is_ok()  # only the next call fails
    table = create_docs(db)
    kinetica_server.fail_next("/get/records", "records unavailable")
    with pytest.raises(GPUdbException, match="records unavailable"):
        table.get_records()
    json_client = connect(kinetica_server, encoding="JSON")
    assert (
        json_client.clear_table_monitor("no-such-topic").get_error_msg()
        == "Table monitor 'no-such-topic' does not exist"
    )


# -- tables and records --------------------------------------------------------------------------
def test_binary_round_trip(kinetica_server: KineticaTestServer, db: GPUdb) -> None:
    table = create_docs(db)
    assert kinetica_server.tables[TABLE] == STORED
    assert [dict(r) for r in table.get_records(offset=1, limit=2)] == STORED[1:3]
    shown = db.show_table("docs")
    assert shown["table_names"] == [TABLE]
    assert shown["sizes"] == [4]
    assert shown["properties"][0] == {
        "id": ["data", "primary_key"],
        "名前": ["data", "char16", "nullable"],
        "qty": ["data"],
        "vec": ["data", "vector(3)"],
    }
    assert ids(GPUdbTable(docs_type(), "docs", db=db).get_records()) == [1, 2, 3, 4]  # same type: reopens it
    with pytest.raises(GPUdbException, match="maximum length 16 exceeded"):  # the client checks charN itself
        table.insert_records([[9, "x" * 17, 0, [0.0, 0.0, 0.0]]])
    too_long = json.dumps({"id": 9, "名前": "x" * 17, "qty": 0, "vec": [0.0, 0.0, 0.0]})
    refused = db.insert_records("docs", [too_long], list_encoding="json")  # so does the server
    assert "longer than 16 characters" in refused.get_error_msg()


def test_json_round_trip(kinetica_server: KineticaTestServer) -> None:
    client = connect(kinetica_server, encoding="JSON")
    table = create_docs(client)
    assert kinetica_server.tables[TABLE] == STORED  # JSON list_str records, vectors included
    records = table.get_records(options={"expression": "qty >= 30"})
    assert [dict(r) for r in records] == [
        {"id": 3, "名前": None, "qty": 30, "vec": [0.0, 0.0, 1.0]},  # JSON gives vectors as lists
        {"id": 4, "名前": "日本語 🙂", "qty": 40, "vec": [0.5, 0.5, 0.5]},
    ]
    assert client.update_records("docs", ["名前 = 'a'"], [{"qty": "11"}])["count_updated"] == 1
    assert client.delete_records("docs", ["qty > 20"])["count_deleted"] == 2
    assert [(r["id"], r["qty"]) for r in kinetica_server.tables[TABLE]] == [(1, 11), (2, 20)]


def test_duplicate_primary_keys(kinetica_server: KineticaTestServer, db: GPUdb) -> None:
    table = create_docs(db)
    with pytest.raises(GPUdbException, match="duplicate primary key"):
        table.insert_records([[1, "dup", 0, [0.0, 0.0, 0.0]], [5, "new", 0, [0.0, 0.0, 0.0]]])
    assert len(kinetica_server.tables[TABLE]) == 4  # the whole batch was refused
    skipped = table.insert_records_response([[1, "dup", 0, [0.0] * 3]], options={"ignore_existing_pk": "true"})
    assert (skipped["count_inserted"], skipped["count_updated"]) == (0, 0)
    upsert = table.insert_records_response(
        [[1, "new", 1, [0.0] * 3], [5, "five", 5, [0.0] * 3]], options={"update_on_existing_pk": "true"}
    )
    assert (upsert["count_inserted"], upsert["count_updated"]) == (1, 1)
    assert [(r["id"], r["名前"]) for r in kinetica_server.tables[TABLE]] == [
        (1, "new"),  # replaced in place
        (2, "it's"),
        (3, None),
        (4, "日本語 🙂"),
        (5, "five"),
    ]


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("", [1, 2, 3, 4]),
        ("id = 2", [2]),
        ("id == 2", [2]),
        ("\"名前\" = 'it''s'", [2]),
        ("名前 = '日本語 🙂'", [4]),
        ('"名前" is null', [3]),
        ("名前 IS NOT NULL and qty >= 20", [2, 4]),
        ("id in (1, 3)", [1, 3]),
        ("id not in (1, 3)", [2, 4]),
        ("(id = 1 or id = 3) and not qty = 30", [1]),
        ("qty > -5 and qty <> 20 and qty < 40", [1, 3]),
        ("名前 != 'a'", [2, 4]),  # null is unknown, not different
        ("not 名前 = 'a'", [2, 4]),
    ],
)
def test_filter_expressions(db: GPUdb, expression: str, expected: list[int]) -> None:
    table = create_docs(db)
    assert ids(table.get_records(options={"expression": expression})) == expected


@pytest.mark.parametrize(
    "expression",
    ["id =", "id = 'x'", "nope = 1", "id like 1", "id = 1 and", "'open", "id = 1)", "vec = 'a'", "1 = id", "id = null"],
)
def test_bad_expressions_are_errors(db: GPUdb, expression: str) -> None:
    table = create_docs(db)
    with pytest.raises(GPUdbException, match="invalid expression"):
        table.get_records(options={"expression": expression})


def test_quoted_identifiers_escape_quotes() -> None:
    # The official client cannot create a column with a quote in its name (it builds JSON by hand).
    table_type = TableType.create('{"type":"record","name":"t","fields":[{"name":"a\\"b","type":"int"}]}', "", {})
    assert compile_filter('"a""b" = 1', table_type)({'a"b': 1})
    with pytest.raises(KineticaError, match="unknown column 'a'"):
        compile_filter('"a" = 1', table_type)


def test_get_records_pages_and_caps(kinetica_server: KineticaTestServer, db: GPUdb) -> None:
    create_docs(db)
    kinetica_server.max_get_records = 2
    first = db.get_records_and_decode("docs", 0, -9999, options={"sort_by": "qty", "sort_order": "descending"})
    assert (ids(first["records"]), first["total_number_of_records"], first["has_more_records"]) == ([4, 3], 4, True)
    last = db.get_records_and_decode("docs", 2, 100)
    assert (ids(last["records"]), last["has_more_records"]) == ([3, 4], False)
    filtered = db.get_records_and_decode("docs", 1, 1, options={"expression": "qty >= 20"})
    assert (ids(filtered["records"]), filtered["total_number_of_records"]) == ([3], 3)
    assert first["type_name"] == db.show_table("docs")["type_ids"][0]


def test_update_values_are_constants_unless_expressions_are_enabled(kinetica_server: KineticaTestServer) -> None:
    client = connect(kinetica_server)
    create_docs(client)
    assert client.update_records("docs", ["id = 1"], [{"名前": "qty + 10"}])["count_updated"] == 1
    refused = client.update_records("docs", ["id = 2"], [{"qty": "qty + 10"}])
    assert "not a valid value for column 'qty'" in refused.get_error_msg()
    response = client.update_records(
        "docs",
        ["id = 2", "id = 3", "id = 99"],
        [{"qty": "qty * 2 + 1", "名前": "'b'"}, {"名前": None}, {"qty": "0"}],
        options={"use_expressions_in_new_values_maps": "true"},
    )
    assert (response["count_updated"], response["counts_updated"]) == (2, [1, 1, 0])
    rows = {r["id"]: (r["名前"], r["qty"]) for r in kinetica_server.tables[TABLE]}
    assert rows == {1: ("qty + 10", 10), 2: ("b", 41), 3: (None, 30), 4: ("日本語 🙂", 40)}


def test_alter_table_add_column_changes_the_type(kinetica_server: KineticaTestServer, db: GPUdb) -> None:
    table = create_docs(db)
    old_type = db.show_table("docs")["type_ids"][0]
    altered = db.alter_table(
        "docs", "add_column", "note", options={"column_type": "string", "column_properties": "char8,nullable"}
    )
    assert altered.is_ok() and altered["type_id"] != old_type
    assert altered["properties"]["note"] == ["data", "char8", "nullable"]
    # GPUdbTable sees type_name != its cached type id, reloads the type (/show/table) and decodes again.
    assert [dict(r)["note"] for r in table.get_records()] == [None] * 4
    table.insert_records([[9, "n", 9, [0.0, 0.0, 0.0], "hello"]])
    assert kinetica_server.tables[TABLE][-1]["note"] == "hello"


def test_types_and_table_lifecycle(kinetica_server: KineticaTestServer, db: GPUdb) -> None:
    create_docs(db, rows=[])
    type_id = db.show_table("docs")["type_ids"][0]
    assert db.has_type(type_id)["type_exists"]
    assert db.show_types(type_id, "")["labels"] == ["docs"]
    assert db.create_type(docs_type().schema_string, "docs", docs_type().column_properties)["type_id"] == type_id
    assert "already exists" in db.create_table("docs", type_id).get_error_msg()
    assert db.create_table("docs", type_id, options={"no_error_if_exists": "true"}).is_ok()
    assert db.clear_table("docs").is_ok()
    assert db.has_table("docs")["table_exists"] is False
    assert db.clear_table("docs", options={"no_error_if_not_exists": "true"}).is_ok()
    assert "does not exist" in db.clear_table("docs").get_error_msg()
    assert db.has_type(type_id)["type_exists"]  # types outlive their tables
    create_docs(db, rows=[])
    assert kinetica_server.drop_table("docs") and not kinetica_server.drop_table("docs")


# -- table monitors ------------------------------------------------------------------------------
def test_monitor_reports_inserts_updates_and_deletes(db: GPUdb, monitor: StartMonitor) -> None:
    table = create_docs(db, rows=[])
    events = monitor(db, "docs", Type.INSERT_RAW, Type.INSERT_DECODED, Type.UPDATED, Type.DELETED)
    table.insert_records(ROWS[:2])
    received = [events.next() for _ in range(4)]
    assert [name for name, _ in received] == ["INSERT_RAW", "INSERT_DECODED"] * 2
    assert [argument for name, argument in received if name == "INSERT_DECODED"] == STORED[:2]
    schema = fastavro.parse_schema(json.loads(db.show_table("docs")["type_schemas"][0]))
    raw = [argument for name, argument in received if name == "INSERT_RAW"]
    assert [fastavro.schemaless_reader(io.BytesIO(r), schema, None) for r in raw] == STORED[:2]

    assert db.update_records("docs", ["id in (1, 2)"], [{"qty": "5"}]).is_ok()
    assert events.next() == ("UPDATED", 2)
    assert db.delete_records("docs", ["id = 99"])["count_deleted"] == 0  # publishes nothing...
    assert db.delete_records("docs", ["id = 1"])["count_deleted"] == 1
    assert events.next() == ("DELETED", 1)  # ...so the next delete message is this one

    # An upsert: the replaced row is an update (a count), the new row an insert.
    table.insert_records([ROWS[1], ROWS[2]], options={"update_on_existing_pk": "true"})
    upserted = sorted((events.next() for _ in range(3)), key=lambda e: e[0])
    assert upserted == [("INSERT_DECODED", STORED[2]), ("INSERT_RAW", avro(schema, STORED[2])), ("UPDATED", 1)]


def test_monitor_reports_a_dropped_table(kinetica_server: KineticaTestServer, db: GPUdb, monitor: StartMonitor) -> None:
    create_docs(db, rows=[])
    # A short inactivity timeout: the client only notices a drop when it is idle.
    events = monitor(db, "docs", Type.INSERT_DECODED, Type.DELETED, Type.TABLE_DROPPED, inactivity_minutes=0.002)
    assert sorted(event for _, event in kinetica_server.monitors().values()) == ["delete", "insert"]
    assert db.clear_table("docs").is_ok()
    assert kinetica_server.monitors() == {}  # dropped with the table
    name, message = events.next()
    assert name == "TABLE_DROPPED" and "docs" in message


def test_raw_frames_reach_insert_raw_and_other_topics_are_filtered(
    kinetica_server: KineticaTestServer, db: GPUdb, monitor: StartMonitor
) -> None:
    create_docs(db, rows=[])
    events = monitor(db, "docs", Type.INSERT_RAW)
    (topic,) = kinetica_server.monitors()
    kinetica_server.publish_raw("z" * 32, [b"for nobody"])  # ZMQ keeps order: were it delivered, it came first
    kinetica_server.publish_raw(topic, [b"\x00not avro", b"second"])
    assert events.next() == ("INSERT_RAW", b"\x00not avro")
    assert events.next() == ("INSERT_RAW", b"second")


def test_monitor_options_and_clearing(kinetica_server: KineticaTestServer, db: GPUdb) -> None:
    create_docs(db, rows=[])
    created = db.create_table_monitor("docs", options={"event": "delete", "monitor_id": "my-topic"})
    assert (created["topic_id"], json.loads(created["type_schema"])) == ("my-topic", COUNT_SCHEMA)
    assert created["info"]["delete_topic_id"] == "my-topic"
    assert json.loads(created["info"]["delete_type_schema"]) == COUNT_SCHEMA
    assert kinetica_server.monitors() == {"my-topic": (TABLE, "delete")}
    insert = db.create_table_monitor("docs", options={})
    assert len(insert["topic_id"]) == 32 and json.loads(insert["type_schema"]) == json.loads(docs_type().schema_string)
    assert "already exists" in db.create_table_monitor("docs", {"monitor_id": "my-topic"}).get_error_msg()
    assert db.clear_table_monitor("my-topic").is_ok()
    assert "does not exist" in db.clear_table_monitor("my-topic").get_error_msg()
    assert "does not exist" in db.create_table_monitor("nope", {}).get_error_msg()


def test_restart_keeps_tables_and_forgets_monitors(
    kinetica_server: KineticaTestServer, db: GPUdb, monitor: StartMonitor
) -> None:
    table = create_docs(db)
    monitor(db, "docs", Type.INSERT_DECODED)
    url, zmq_port = kinetica_server.url, kinetica_server.zmq_port
    kinetica_server.stop()
    kinetica_server.start()
    assert (kinetica_server.url, kinetica_server.zmq_port) == (url, zmq_port)
    assert kinetica_server.monitors() == {}
    assert ids(table.get_records()) == [1, 2, 3, 4]  # the same client, reconnected
    events = monitor(db, "docs", Type.INSERT_DECODED)  # clients must create their monitors again
    table.insert_records([[5, "five", 5, [0.0, 0.0, 0.0]]])
    assert events.next() == ("INSERT_DECODED", {"id": 5, "名前": "five", "qty": 5, "vec": vec(0, 0, 0)})

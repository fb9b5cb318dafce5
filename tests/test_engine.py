"""The engine's parts on their own: coalescing, collation, the bounded queue, the registry."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
import subprocess
import sys
import threading

import pytest
from conftest import Recorder, SQLClient, outputs_by_source, server_uri

import reactive
from reactive.backends import backend_names, load_backend, register_backend, unregister_backend
from reactive.backends.ibis import IbisBackend
from reactive.cdc import DatabaseListenerFactory
from reactive.components import Listener, Model
from reactive.errors import ConfigurationError, QueueClosedError
from reactive.events import ChangePacket, DBEvent, coalesce, collate
from reactive.queue import CDCQueue

INS, UPD, DEL = DBEvent.insert, DBEvent.update, DBEvent.delete


def packet(event: DBEvent, *ids: int, table: str = "t") -> ChangePacket:
    rows = None if event is DEL else tuple({"id": i, "v": f"{event.value}{i}"} for i in ids)
    return ChangePacket(table, event, ids, rows)


@pytest.mark.parametrize(
    ("events", "expected"),
    [
        ([INS, UPD], INS),
        ([INS, DEL], DEL),
        ([UPD, UPD], UPD),
        ([UPD, DEL], DEL),
        ([DEL, INS], UPD),
        ([INS, DEL, INS], INS),
        ([UPD, DEL, INS, UPD], UPD),
    ],
)
def test_coalesce_gives_the_net_event(events: list[DBEvent], expected: DBEvent) -> None:
    [change] = coalesce([packet(e, 1) for e in events])
    assert change.event is expected
    if expected is not DEL:
        assert change.row == {"id": 1, "v": f"{events[-1].value}1"}


def test_collate_keeps_arrival_order_and_never_mixes_events() -> None:
    packets = [packet(INS, 1, 2), packet(DEL, 3), packet(INS, 4, table="u"), packet(UPD, 5), packet(INS, 6)]
    batches = list(collate(coalesce(packets), max_rows=2))
    assert [(b.table, b.event, b.ids) for b in batches] == [
        ("t", INS, (1, 2)),
        ("t", INS, (6,)),
        ("t", DEL, (3,)),
        ("u", INS, (4,)),
        ("t", UPD, (5,)),
    ]


def test_an_update_without_a_row_is_read_at_processing_not_replaced_by_an_older_row() -> None:
    [change] = coalesce([packet(INS, 1), ChangePacket("t", UPD, (1,))])
    assert change.event is INS and change.row is None


def test_queue_blocks_producers_when_full_and_loses_nothing() -> None:
    queue = CDCQueue(max_rows=10)
    produced = 200

    def produce() -> None:
        for i in range(produced):
            queue.put(packet(INS, i))

    producer = threading.Thread(target=produce)
    producer.start()
    seen: list[int] = []
    peak = 0
    while len(seen) < produced:
        peak = max(peak, queue.rows)
        batch = queue.get_batch(max_rows=3, timeout=10)
        assert batch, "the producer stalled"
        assert sum(len(p) for p in batch) <= 3
        seen.extend(i for p in batch for i in p.ids)
        queue.task_done(len(batch))
    producer.join()
    assert seen == list(range(produced))
    assert peak <= 10
    assert queue.join(timeout=1)


def test_a_packet_larger_than_the_bound_passes_an_empty_queue() -> None:
    queue = CDCQueue(max_rows=2)
    queue.put(packet(INS, 1, 2, 3, 4))
    assert [len(p) for p in queue.get_batch(max_rows=100)] == [4]


def test_wait_closed_returns_when_the_queue_closes_and_not_for_a_put() -> None:
    queue = CDCQueue(max_rows=10)
    assert not queue.wait_closed(0)
    waited: list[bool] = []
    waiter = threading.Thread(target=lambda: waited.append(queue.wait_closed(3600)), name="test-waiter")
    waiter.start()
    queue.put(packet(INS, 1))  # wakes a waiting consumer: wait_closed waits on
    queue.close()
    waiter.join(timeout=60)
    assert not waiter.is_alive() and waited == [True]
    assert queue.wait_closed(0)


def test_a_blocked_producer_is_released_by_close_or_abandon() -> None:
    queue = CDCQueue(max_rows=1)
    queue.put(packet(INS, 1))
    abandon = threading.Event()
    errors: list[BaseException] = []

    def produce() -> None:
        try:
            queue.put(packet(INS, 2), abandon=abandon)
        except QueueClosedError as exc:
            errors.append(exc)

    producer = threading.Thread(target=produce)
    producer.start()
    abandon.set()
    queue.wake_producers()
    producer.join(5)
    assert not producer.is_alive() and len(errors) == 1
    assert queue.rows == 1


#: What ``threading.Thread`` keeps on itself in the Pythons reactive supports, beyond this one's:
#: 3.13's ``_handle`` (a thread handle), 3.14's ``_context`` (the thread's contextvars).
THREAD_OWN_NAMES = {"_handle", "_context", "_tstate_lock", "_is_stopped", "_started", "_os_thread_handle"}


def test_no_thread_of_reactive_shadows_what_threading_keeps_on_the_thread() -> None:
    """The MongoDB listener's method ``_handle`` was shadowed on Python 3.13 by the handle
    ``Thread.__init__`` now keeps as ``self._handle``: the first change ended the listener
    (``'_thread._ThreadHandle' object is not callable``), and every wait after it timed out."""
    # Its private names, not the dunders every class has (3.13 adds __firstlineno__ to each).
    names = (*vars(threading.Thread()), *dir(threading.Thread))
    own = THREAD_OWN_NAMES | {n for n in names if n.startswith("_") and not n.startswith("__")}
    clashes: list[str] = []
    for found in pkgutil.walk_packages(reactive.__path__, "reactive."):
        module = importlib.import_module(found.name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if not issubclass(cls, threading.Thread) or cls.__module__ != module.__name__:
                continue
            source = inspect.getsource(cls)
            names = {*vars(cls), *re.findall(r"self\.(\w+)\s*(?::[^=\n]*)?=[^=]", source)}
            clashes += [f"{cls.__qualname__}.{name}" for name in sorted(names & own)]
    assert clashes == []


def test_a_wait_on_a_change_listener_whose_loop_raised_ends(duck: SQLClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """A listener's loop that raised ended its thread without a word to its waiters: a barrier
    (a table monitor's start, wait_idle's poll) waited for ever. The base's run() now says the
    end to every waiter, however the loop ended."""
    from reactive.backends.ibis.listener import IbisPollingListener

    def broken(self: IbisPollingListener) -> None:
        self._wake.wait(30)  # until a wait began (sync sets it)
        raise RuntimeError("a defect in the loop")

    monkeypatch.setattr(IbisPollingListener, "_follow", broken)
    monkeypatch.setattr(threading, "excepthook", lambda args: None)  # the defect is the point
    duck.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text VARCHAR)")
    with reactive.connect(duck.uri) as db:
        db.add(Listener(Model("m", predict=lambda xs: xs), "text", "docs"))
        db.cdc.start()
        listener = db.cdc.listener
        answers: list[bool] = []
        waiter = threading.Thread(target=lambda: answers.append(listener.sync(None)))
        waiter.start()
        waiter.join(30)
        assert answers == [False] and not waiter.is_alive()


def test_unknown_backend_names_the_supported_ones() -> None:
    with pytest.raises(ValueError, match="unknown backend 'kafka'; supported backends: ibis, kinetica, mongodb"):
        DatabaseListenerFactory("kafka")
    assert DatabaseListenerFactory("mongodb").listener_class.__name__ == "MongoChangeStreamListener"


def test_builtin_backends_are_registered_as_entry_points() -> None:
    from importlib.metadata import entry_points

    names = {ep.name for ep in entry_points(group="reactive.backends")}
    assert {"ibis", "kinetica", "mongodb"} <= names
    assert load_backend("ibis") is IbisBackend


def test_a_third_party_backend_registers_and_connects(tmp_path) -> None:
    class MemoryDuckDB(IbisBackend):
        name = "memory-duckdb"
        schemes = ("memduck",)

        @classmethod
        def from_uri(cls, uri: str, **options):
            return super().from_uri("duckdb://", **options)

    register_backend("memory-duckdb", MemoryDuckDB)
    try:
        assert "memory-duckdb" in backend_names()
        with reactive.connect("memduck://anything") as db:
            assert isinstance(db.backend, MemoryDuckDB)
            assert db.cdc.factory.listener_class is IbisBackend.listener_class
    finally:
        unregister_backend("memory-duckdb")
    assert "memory-duckdb" not in backend_names()


def test_a_backend_whose_driver_is_missing_is_refused_with_why(tmp_path, monkeypatch) -> None:
    # Its schemes are declared apart from the class (SCHEMES): the URI routes to it, and loading
    # it names what is missing instead of an ImportError from inside connect().
    package = tmp_path / "nodriver_backend"
    package.mkdir()
    (package / "__init__.py").write_text(
        'SCHEMES = ("nodriver",)\n'
        "def __getattr__(name):\n"
        "    from nodriver_backend.backend import NoDriverBackend\n"
        "    return NoDriverBackend\n"
    )
    (package / "backend.py").write_text("import a_driver_that_is_not_installed\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    register_backend("nodriver", "nodriver_backend:NoDriverBackend")
    try:
        with pytest.raises(ConfigurationError, match=r"supported schemes: .*nodriver://"):
            reactive.connect("mysql://root:secret@db/app")
        with pytest.raises(ConfigurationError) as refused:
            reactive.connect("nodriver://root:secret@db/app")
    finally:
        unregister_backend("nodriver")
    assert str(refused.value) == (
        "the nodriver backend for 'nodriver://root:***@db/app' cannot be loaded: "
        "No module named 'a_driver_that_is_not_installed'"
    )


def test_postgresql_without_its_extra_says_which_extra_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    """A core install has no psycopg: ibis's message said to install ``ibis-framework[postgres]``,
    not reactive's extra (whose ``psycopg[binary]`` writes twice as fast)."""
    monkeypatch.setitem(sys.modules, "psycopg", None)  # import fails
    with pytest.raises(ConfigurationError) as refused:
        reactive.connect("postgresql://app:s3cret@127.0.0.1:5432/test")
    assert str(refused.value) == (
        "PostgreSQL needs the 'postgres' extra, whose driver (psycopg) is not installed: "
        "pip install 'reactive-ml[postgres]'"
    )


_CONNECTED = """
import sys, reactive
db = reactive.connect(sys.argv[1])
print(" ".join(sorted(m for m in ("ibis", "duckdb", "sqlglot", "pymongo", "reactive.backends.kinetica.backend",
                                  "reactive.backends.mongodb.backend", "reactive.backends.ibis.backend")
                   if m in sys.modules)))
db.close()
"""


@pytest.mark.parametrize("kind", ["duckdb", "mongodb", "kinetica"])
def test_connecting_loads_only_the_backend_of_the_uri(kind: str, tmp_path, request: pytest.FixtureRequest) -> None:
    # Each backend's package declares its SCHEMES without importing its driver: connecting to
    # DuckDB loaded pymongo and the Kinetica client (0.16 s, 16,000 objects), connecting to
    # MongoDB loaded ibis and DuckDB (0.19 s, 39,000 objects that every full collection walks).
    uri = f"duckdb:///{tmp_path}/a.duckdb" if kind == "duckdb" else server_uri(request, kind)
    expected = {
        "duckdb": "duckdb ibis reactive.backends.ibis.backend sqlglot",
        "mongodb": "pymongo reactive.backends.mongodb.backend",
        "kinetica": "reactive.backends.kinetica.backend",
    }[kind]
    command = [sys.executable, "-c", _CONNECTED, uri]
    run = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == expected


def test_backfill_and_live_changes_meet_without_gap_or_double_work(duck: SQLClient) -> None:
    """Writes made while the backfill runs are processed once, with their latest values."""
    duck.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text VARCHAR)")
    duck.executemany("INSERT INTO docs VALUES (?, ?)", [(i, f"old {i}") for i in range(1, 41)])
    calls: list[str] = []

    def model(texts: list[str]) -> list[str]:
        if not calls:
            # A foreign client writes in the middle of the backfill: one row already read,
            # one not yet read, one new row.
            duck.execute("UPDATE docs SET text = 'new 1' WHERE id = 1")
            duck.execute("UPDATE docs SET text = 'new 40' WHERE id = 40")
            duck.execute("INSERT INTO docs VALUES (41, 'new 41')")
        calls.extend(texts)
        return [t.upper() for t in texts]

    with reactive.connect(duck.uri, poll_interval=0.05, page_size=10, batch_rows=10) as db:
        db.cdc.start()
        db.add(Listener(Model("up", predict=model, batch_size=10), "text", "docs"))
        assert db.cdc.wait_idle(timeout=30)
        outputs = outputs_by_source(db, "up__text")
        assert outputs == {**{i: f"OLD {i}" for i in range(2, 40)}, 1: "NEW 1", 40: "NEW 40", 41: "NEW 41"}
        # Each final value computed once; "old 1" was computed before the update arrived.
        assert sorted(calls) == sorted([*(t.lower() for t in outputs.values()), "old 1"])


def test_backfill_reports_progress(duck: SQLClient, recorder: Recorder) -> None:
    duck.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text VARCHAR)")
    duck.executemany("INSERT INTO docs VALUES (?, ?)", [(i, f"t{i}") for i in range(250)])
    reports: list[tuple[int, int]] = []
    with reactive.connect(duck.uri, page_size=100) as db:
        listener = Listener(Model("m", predict=recorder), "text", "docs")
        db.add(listener, progress=lambda done, total: reports.append((done, total)))
    assert reports[-1] == (250, 250)
    assert [done for done, _ in reports] == sorted(done for done, _ in reports)
    assert len(reports) == 3


def test_a_reconciliation_finds_outputs_written_during_its_scan_for_rows_it_did_not_see(duck: SQLClient) -> None:
    """A live change may write an output while a reconciliation scans (a row inserted, then
    deleted or re-keyed before the scan reached it): the output is queued as possibly gone."""
    from reactive.backends.base import OutputBatch
    from reactive.reconcile import reconcile

    duck.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text VARCHAR)")
    duck.executemany("INSERT INTO docs VALUES (?, ?)", [(i, f"t{i}") for i in range(1, 4)])
    with reactive.connect(duck.uri) as db:
        listener = Listener(Model("len", predict=lambda ts: [len(t) for t in ts], output_type="int64"), "text", "docs")
        db.add(listener, progress=False)
        source, outputs = db.source_for("docs"), db.backend.outputs

        class LiveWriteDuringScan:  # the source, with a live change's output landing mid-scan
            def scan(self, table, *, columns, page_size):
                for page in source.scan(table, columns=columns, page_size=page_size):
                    outputs.store_outputs("len__text", "int64", OutputBatch([99], [2], [0]), [None], [0])
                    yield page

        packets = list(
            reconcile(
                LiveWriteDuringScan(),  # type: ignore[arg-type]
                outputs,
                db.table_info("docs"),
                identifier="len__text",
                columns=["text"],
                current=listener.current,
                page_size=2,
            )
        )
        assert [p.ids for p in packets] == [(99,)]  # the rows seen are current; 99 may be gone


def test_a_reconciliation_reads_the_stored_outputs_once_and_finds_those_written_during_its_scan(
    duck: SQLClient,
) -> None:
    """A listener's pass records the ids of the outputs written while it runs (through
    ``db.writer``, as the handler writes) instead of reading every stored output a second time
    after its scan, as it did since b780936: the output of a row it did not see is still queued
    as possibly gone, and one of a row it saw is not."""
    import functools

    from reactive.backends.base import OutputBatch
    from reactive.reconcile import reconcile

    duck.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text VARCHAR)")
    duck.executemany("INSERT INTO docs VALUES (?, ?)", [(i, f"t{i}") for i in range(1, 4)])
    with reactive.connect(duck.uri) as db:
        listener = Listener(Model("len", predict=lambda ts: [len(t) for t in ts], output_type="int64"), "text", "docs")
        db.add(listener, progress=False)
        source, outputs, docs = db.source_for("docs"), db.backend.outputs, db.table_info("docs")
        reads = []

        class LiveWriteDuringScan:  # the source, with live changes' outputs written mid-scan
            def scan(self, table, *, columns, page_size):
                for page in source.scan(table, columns=columns, page_size=page_size):
                    with db.writing():  # as the handler writes a window
                        db.writer.write("len__text", docs, OutputBatch([99, 1], [2, 2], [0, 0]))
                    yield page

        class CountedReads:  # the store, counting its full reads
            def scan_output_fingerprints(self, identifier, *, page_size):
                reads.append(identifier)
                return outputs.scan_output_fingerprints(identifier, page_size=page_size)

        packets = list(
            reconcile(
                LiveWriteDuringScan(),  # type: ignore[arg-type]
                CountedReads(),  # type: ignore[arg-type]
                docs,
                identifier="len__text",
                columns=["text"],
                current=listener.current,
                page_size=2,
                record_writes=functools.partial(db.writer.recording, "len__text"),
            )
        )
        assert [p.ids for p in packets] == [(99,)]  # 1 was seen by the scan; 99 may be gone
        assert reads == ["len__text"]


_FIRST_WINDOW = """
import sys, reactive
from reactive.fingerprints import fingerprints
db = reactive.connect(sys.argv[1])
before = set(sys.modules)
fingerprints([f"document {i}" for i in range(100)])  # what the handler does with a window's inputs
print(sorted(set(sys.modules) - before))
db.close()
"""


@pytest.mark.parametrize("kind", ["mongodb", "kinetica"])
def test_connect_leaves_nothing_to_import_to_the_first_window(kind: str, request: pytest.FixtureRequest) -> None:
    # pyarrow imports pandas at its first conversion of a Python list (about 0.4 s); connecting
    # to MongoDB or Kinetica imports nothing else that does, so the first window of more than a
    # few rows paid it (on MongoDB a burst's first outputs came 0.3-0.7 s late). connect() pays it.
    uri = server_uri(request, kind)
    run = subprocess.run(
        [sys.executable, "-c", _FIRST_WINDOW, uri], capture_output=True, text=True, timeout=120, check=False
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]", run.stdout[:400]

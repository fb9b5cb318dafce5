"""MongoDB benchmark: ``reactive``'s change-stream path next to a hand-written pymongo loop.

Run ``python -m benchmarks.mongo_changestream [--quick] [--rounds N] [--profile] [--uri ...]``.
It prints Markdown tables and writes every figure as JSON (``results/mongodb.json`` for a full
run, ``results/mongodb-partial.json`` with ``--quick``). Nothing here asserts a speed; the
only checks are for correctness (every document got its output).

Server
    One SecantusDB process (``tests/mongo_server.py``), started once and shared by every
    scenario, so the server and the clients do not share a GIL. ``--uri`` uses another
    server instead (a replica set: change streams need one). Every scenario runs on a fresh
    database of that server, dropped afterwards, and the systems run one after another,
    never at the same time. Every client connects with ``retryWrites=false`` (``--retry-writes``
    keeps them): SecantusDB 0.7.0b3 scans all its retryable-write records of the last 30
    minutes on every retryable write (and sorts them past 10,000), so with them each
    scenario would slow down every later one.

Model
    ``[float(len(t)) for t in texts]`` on field ``text``, in every system.

Systems
    ``reactive``: ``reactive.connect(uri)``, ``db.add(Listener(Model("len", ...), key="text",
    select="docs"))``, ``db.cdc.start()`` (one database-level change stream, a bounded queue,
    a handler thread that coalesces a window, runs the model, bulk-writes the outputs with a
    journaled acknowledgement and saves the resume token, journaled too).

    ``raw loop`` (the reference of every ratio): the loop a developer writes by hand, in one
    thread with its own ``MongoClient``: ``docs.watch(full_document="updateLookup")`` (a
    collection-level stream); when ``try_next`` returns an event, it takes every event the
    cursor has buffered too (no round trip: pymongo's ``_has_next``), computes them and
    writes them with one unordered ``bulk_write``: ``InsertOne`` for an insert (on
    SecantusDB an insert costs a quarter of an upsert; a duplicate key is written again as a
    replacement), ``ReplaceOne(upsert=True)`` for an update or replace. Default write concern
    (acknowledged, not journaled), no position saved, no fingerprints, no error isolation.

    ``raw loop, upserts`` (context): the same loop writing every output with
    ``ReplaceOne(upsert=True)``, as a loop that does not tell inserts from updates does.

When an output is "visible"
    ``reactive``: ``db.writer.write`` is wrapped *on the instance* (not the class); the
    wrapper calls the original, which returns once the server acknowledged the bulk write,
    then timestamps every source id of that call (``time.perf_counter``). The raw loops
    timestamp right after ``bulk_write`` returns. The first timestamp of an id counts.

Scenarios (each on a fresh database and a freshly started system; a few inserts before the
measured ones warm each system up and are not counted)
    * **isolated inserts**: one writer client (the main thread; with ``--writer-process``, a
      process of its own, as an application's writes usually are) inserts single documents
      ``interval`` apart (start to start), timestamping right before ``insert_one``; latency
      = output visible - insert started, so it includes the insert itself (its
      acknowledgement time is reported too), and the CPU time and voluntary context switches
      (waits: on a queue, a lock, a socket, the GIL) of the consumer's threads per insert
      (``/proc``; reactive: its listener, handler, compute and model threads).
    * **burst**: ``burst_inserts`` single ``insert_one`` calls back to back; the latency of
      each, and the burst's rate (documents / (last output - first insert started)).
    * **throughput**: ``throughput_docs`` documents inserted with ``insert_many`` in batches
      of ``batch`` (built beforehand); time from the first insert to the last output
      visible. The insert phase, the lag after it, rows per output write and the CPU time of
      every thread involved and of the server process (``/proc``) are reported too. Once per
      round the same batches are inserted with nothing following them (the **writer alone**):
      the server's own ceiling, which bounds every system that reads the inserts back and
      writes its outputs to the same server.

Rounds
    ``rounds`` interleaved rounds: in each round every scenario runs once per system, the
    systems in a rotated order (so none always runs first or after the same one). Every
    figure reported is the **median over the rounds** of that round's figure (p50, p99,
    docs/s), and each ratio is the median of the per-round ratios reactive / raw loop (the
    two ran next to each other, on the same machine load); the ratio of the medians is kept
    in the JSON too. The machine is shared with other work: single rounds move by up to 2x.

Profile (``--profile``)
    * Latency breakdown: isolated inserts again with timestamps at every stage: when the
      event was read from the stream (``reactive``: its listener's ``report``; raw loop: right
      after ``try_next``), when the handler took the window off the queue, when the model was
      called (inside ``predict``), when the outputs' write started (``store_outputs``), when
      it returned (visible), and when the position was saved (``save_positions`` returned);
      each wrapped on the instance like ``db.writer.write``.
    * Stream delivery: how many events/s a change stream delivers to a bare ``try_next``
      loop, reading a history of ``docs`` inserts written beforehand: collection-level,
      database-level bare, with ``reactive``'s ``$match`` only, with its whole pipeline, and
      without ``updateLookup``. Once on a history of inserts only, once on a history where
      every batch of inserts is followed by the upserts of its outputs in the same database
      (what the database-level stream reads past when ``reactive`` runs).
    * Backlog drain: the same history processed from the stream by each system, so the
      figure is its processing capacity, not the insert rate.
    * ``cProfile`` of the listener thread and the handler thread (each enables its own
      profiler; the class ``run`` methods are wrapped only for that run) during one
      throughput run: the functions with the most own time and the most cumulative time.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import dataclasses as dc
import datetime as _dt
import functools
import importlib.metadata
import importlib.util
import io
import itertools
import json
import os
import pstats
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

from pymongo import InsertOne, MongoClient, ReplaceOne
from pymongo.collection import Collection
from pymongo.errors import BulkWriteError

import reactive
from reactive.backends.base import ListenerHooks, TableInfo
from reactive.backends.mongodb.backend import MongoBackend
from reactive.backends.mongodb.listener import MongoChangeStreamListener
from reactive.components import Listener, Model
from reactive.handler import CDCHandler
from reactive.queue import CDCQueue

from .common import machine_info, markdown_table, scratch_dir, summarize_seconds

RESULTS = Path(__file__).parent / "results"
MONGO_SERVER = Path(__file__).resolve().parent.parent / "tests" / "mongo_server.py"
IDENTIFIER = "len__text"
OUTPUTS = f"_outputs__{IDENTIFIER}"
#: Longest wait for outputs before a run is reported as incomplete.
TIMEOUT = 300.0
#: ``maxAwaitTimeMS`` of the raw loops' streams: the same as ``reactive``'s listener.
MAX_AWAIT_MS = 200
#: The latency goal (reactive/raw loop, at most) and the throughput goal (reactive/raw loop, at least).
LATENCY_GOAL = 1.15
THROUGHPUT_GOAL = 2.0
#: The system every ratio divides by.
REFERENCE = "raw loop"
SCENARIOS = ("isolated", "burst", "throughput")


def model(texts: list[str]) -> list[float]:
    """The trivial model every system computes."""
    return [float(len(t)) for t in texts]


def document(i: int) -> dict[str, Any]:
    return {"_id": i, "text": f"document {i} about {i * 7919 % 10007}", "lang": ("en", "de", "fr")[i % 3]}


@dc.dataclass(frozen=True)
class Sizes:
    """How big each measurement is; :meth:`quick` is a smoke run."""

    isolated_inserts: int = 200
    warmup_inserts: int = 10
    interval: float = 0.020
    burst_inserts: int = 500
    throughput_docs: int = 20_000
    batch: int = 1_000
    rounds: int = 5
    stream_repeat: int = 3
    #: The single inserts (isolated, burst) come from a process of their own, not this one's
    #: main thread (see :func:`paced_inserts_elsewhere`).
    writer_process: bool = False

    @classmethod
    def quick(cls) -> Sizes:
        return cls(
            isolated_inserts=40, warmup_inserts=5, burst_inserts=100, throughput_docs=5_000, rounds=1, stream_repeat=1
        )


# -- the server -------------------------------------------------------------------------------
@dc.dataclass(frozen=True)
class Server:
    """A MongoDB-wire server: its base URI and, when this run started it, its process id.

    Unless ``retry_writes``, every client of the benchmark connects with
    ``retryWrites=false``: SecantusDB 0.7.0b3 prunes its retryable-write records (kept 30
    minutes) by scanning them all on every retryable write, and sorting them all once there
    are more than 10,000, so each retryable write makes the server slower for the following
    scenarios and the order of the scenarios would decide the figures. It is the same for
    every system.
    """

    uri: str
    pid: int | None
    description: str
    retry_writes: bool = False

    def database_uri(self, database: str) -> str:
        parts = urlsplit(self.uri)
        query = parts.query if self.retry_writes else "&".join(q for q in (parts.query, "retryWrites=false") if q)
        return urlunsplit((parts.scheme, parts.netloc, f"/{database}", query, parts.fragment))


@contextlib.contextmanager
def mongo_server(uri: str | None, *, retry_writes: bool = False) -> Iterator[Server]:
    """``uri`` as given, else a SecantusDB process on a scratch directory (stopped afterwards)."""
    if uri:
        yield Server(uri, None, "external server given by --uri", retry_writes)
        return
    spec = importlib.util.spec_from_file_location("mongo_server", MONGO_SERVER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with scratch_dir("reactive-bench-mongo-") as tmp:
        server = module.MongoServer(tmp / "data").start()
        try:
            description = f"SecantusDB {_version('SecantusDB')} (secantusd-py, separate process)"
            yield Server(server.uri, server.process.pid, description, retry_writes)
        finally:
            server.stop()


@contextlib.contextmanager
def fresh_database(server: Server, scenario: str) -> Iterator[tuple[str, Any]]:
    """A new database of ``server`` holding collection ``docs`` with one seed document.

    The collection must exist before ``db.add``; the seed is inserted before any system
    starts, so only ``reactive``'s backfill sees it. Yields the URI and a plain client's
    database (the writer), and drops the database afterwards.
    """
    name = f"bench_{scenario}_{uuid.uuid4().hex[:8]}"
    uri = server.database_uri(name)
    with MongoClient(uri) as client:
        database = client.get_default_database()
        database.docs.insert_one({"_id": "seed", "text": "seed"})
        try:
            yield uri, database
        finally:
            client.drop_database(name)


# -- when outputs became visible -------------------------------------------------------------
class OutputClock:
    """When each source id's output was first visible (``perf_counter`` seconds).

    Every system calls :meth:`record` right after a write of outputs returned.
    """

    def __init__(self) -> None:
        self._times: dict[Hashable, float] = {}
        self._waiting: set[Hashable] = set()
        self._cond = threading.Condition()
        self.writes = 0
        self.written = 0

    def record(self, ids: Iterable[Hashable]) -> None:
        now = time.perf_counter()
        with self._cond:
            self.writes += 1
            for i in ids:
                self.written += 1
                self._times.setdefault(i, now)
                self._waiting.discard(i)
            if not self._waiting:
                self._cond.notify_all()

    def wait_for(self, ids: Iterable[Hashable], timeout: float) -> bool:
        """Wait until every id in ``ids`` has an output; False if ``timeout`` passed first."""
        with self._cond:
            self._waiting = {i for i in ids if i not in self._times}
            return self._cond.wait_for(lambda: not self._waiting, timeout)

    def time(self, i: Hashable) -> float | None:
        with self._cond:
            return self._times.get(i)

    def counters(self) -> tuple[int, int]:
        """Writes so far and rows written so far."""
        with self._cond:
            return self.writes, self.written


class StageClock:
    """When each id first passed each intermediate stage, for the latency breakdown.

    ``current`` is the ids of the window being handled (for stages that see no ids).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.times: dict[str, dict[Hashable, float]] = {}
        self.current: Sequence[Hashable] = ()

    def stamp(self, stage: str, ids: Iterable[Hashable] | None = None) -> None:
        now = time.perf_counter()
        with self._lock:
            seen = self.times.setdefault(stage, {})
            for i in self.current if ids is None else ids:
                seen.setdefault(i, now)

    def segments(self, ids: Iterable[Hashable], started: dict[Any, float], clock: OutputClock) -> dict[str, Any]:
        """Latency figures of every segment between the stages an id passed, in order:
        insert started -> ... -> output visible -> (stages after it)."""
        with self._lock:
            stages = {"insert started": started, **self.times}
        spans: dict[str, list[float]] = {}
        for i in ids:
            visible = clock.time(i)
            if visible is None:
                continue
            passed = sorted([(t, name) for name, times in stages.items() if (t := times.get(i)) is not None])
            passed.append((visible, "output visible"))
            passed.sort()
            for (a, name_a), (b, name_b) in itertools.pairwise(passed):
                spans.setdefault(f"{name_a} -> {name_b}", []).append(b - a)
        return {span: summarize_seconds(values) for span, values in spans.items() if len(values) * 2 >= len(started)}


# -- the systems ------------------------------------------------------------------------------
class System(Protocol):
    label: str

    def threads(self) -> dict[str, threading.Thread]: ...

    def close(self) -> None: ...


class ReactiveSystem:
    """``reactive`` on the database, with ``db.writer.write`` wrapped on the instance.

    ``options`` go to ``reactive.connect`` (the benchmark uses the defaults).
    """

    label = "reactive"

    def __init__(self, uri: str, clock: OutputClock, **options: Any) -> None:
        self.db = reactive.connect(uri, **options)
        original = self.db.writer.write

        def write(identifier: str, source: TableInfo, batch: Any) -> list[Any]:
            stored = original(identifier, source, batch)
            clock.record(batch.sources)
            return stored

        self.db.writer.write = write  # type: ignore[method-assign]
        self.db.add(Listener(Model("len", predict=self.predict), key="text", select="docs"), progress=False)
        self.db.cdc.start()

    def predict(self, texts: list[str]) -> list[float]:
        return model(texts)

    def threads(self) -> dict[str, threading.Thread]:
        listener = self.db.cdc.listener
        handler = self.db.cdc.ensure_handler()  # the running handler (started by cdc.start)
        found = {"listener": listener, "handler": handler} if listener is not None else {"handler": handler}
        # Model work: the compute thread and the model's predict thread (while they run).
        for thread in threading.enumerate():
            if thread.name.startswith(("reactive-compute", "reactive-model")):
                found[thread.name.removeprefix("reactive-")] = thread
        return found

    def close(self) -> None:
        assert self.db.cdc.wait_idle(TIMEOUT), "reactive did not become idle"
        self.db.close()


class RawLoop:
    """The hand-written reference: one thread, a collection stream, one bulk write per batch
    of events (the event ``try_next`` returned and every one the cursor had buffered).

    The stream is opened in the constructor, so every insert made after it returns is seen
    (or every insert after ``resume_after``, a resume token).
    """

    label = "raw loop"
    #: Write an insert's output with ``InsertOne`` (else every output is an upsert).
    inserts = True

    def __init__(self, uri: str, clock: OutputClock, *, resume_after: Any = None) -> None:
        self.client: MongoClient = MongoClient(uri)
        self.database = self.client.get_default_database()
        self.clock = clock
        self.stopping = threading.Event()
        self.stream = self.database.docs.watch(
            full_document="updateLookup", max_await_time_ms=MAX_AWAIT_MS, resume_after=resume_after
        )
        self.thread = threading.Thread(target=self.run, name="raw-loop", daemon=True)
        self.thread.start()

    def batches(self) -> Iterator[list[dict[str, Any]]]:
        """Insert, update and replace events, a batch at a time, until :meth:`close`."""
        with self.stream:
            while not self.stopping.is_set():
                change = self.stream.try_next()
                if change is None:
                    continue
                batch = [change]
                while self.stream._cursor._has_next():  # buffered: no round trip
                    change = self.stream.try_next()
                    if change is not None:
                        batch.append(change)
                batch = [c for c in batch if c["operationType"] in ("insert", "update", "replace")]
                if batch:
                    yield batch

    def run(self) -> None:
        outputs = self.database[OUTPUTS]
        for batch in self.batches():
            self.write(outputs, batch)

    def write(self, outputs: Collection, batch: list[dict[str, Any]]) -> None:
        docs = [change["fullDocument"] for change in batch]
        values = model([d["text"] for d in docs])
        rows = [{"_id": d["_id"], "_source": d["_id"], "_output": v} for d, v in zip(docs, values, strict=True)]
        new = [self.inserts and change["operationType"] == "insert" for change in batch]
        operations = [
            InsertOne(row) if insert else ReplaceOne({"_id": row["_id"]}, row, upsert=True)
            for row, insert in zip(rows, new, strict=True)
        ]
        try:
            outputs.bulk_write(operations, ordered=False)
        except BulkWriteError as exc:  # an insert met an existing output: replace it
            again = [rows[e["index"]] for e in exc.details["writeErrors"] if e.get("code") == 11000]
            outputs.bulk_write([ReplaceOne({"_id": r["_id"]}, r, upsert=True) for r in again], ordered=False)
        self.clock.record(d["_id"] for d in docs)

    def threads(self) -> dict[str, threading.Thread]:
        return {"loop": self.thread}

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(TIMEOUT)
        self.client.close()


class RawUpsertLoop(RawLoop):
    """The same loop, every output written with ``ReplaceOne(upsert=True)``."""

    label = "raw loop, upserts"
    inserts = False


RAW_LOOPS: dict[str, type[RawLoop]] = {"raw loop": RawLoop, "raw loop, upserts": RawUpsertLoop}
SYSTEMS: dict[str, Callable[[str, OutputClock], System]] = {"reactive": ReactiveSystem, **RAW_LOOPS}


class TimedRawLoop(RawLoop):
    """The raw loop, stamping when each batch of events is read from the stream (profile only)."""

    def __init__(self, uri: str, clock: OutputClock, stages: StageClock) -> None:
        self.stages = stages
        super().__init__(uri, clock)

    def batches(self) -> Iterator[list[dict[str, Any]]]:
        for batch in super().batches():
            self.stages.stamp("event read", [c["documentKey"]["_id"] for c in batch])
            yield batch


class TimedReactive(ReactiveSystem):
    """``reactive``, stamping at every stage of a change (profile only).

    The listener's ``report`` and ``save_positions``, the queue's ``get_batch`` and the
    store's ``store_outputs`` are wrapped on the instances, like ``db.writer.write``; the
    model stamps the ids of the texts it is called with (the benchmark's texts name them).
    Windows overlap (the handler plans the next one while the model computes), so every
    stamp names the ids it concerns.
    """

    def __init__(self, uri: str, clock: OutputClock, stages: StageClock) -> None:
        self.stages = stages
        super().__init__(uri, clock)
        listener = self.db.cdc.listener
        assert listener is not None
        report, save = listener.report, listener.save_positions
        get_batch = self.db.cdc.queue.get_batch
        store = self.db.backend.outputs
        store_outputs = store.store_outputs
        ids_at: dict[int, Sequence[Hashable]] = {}  # id(position) -> its packet's row ids

        def stamped_report(packet: Any) -> None:
            stages.stamp("event read", packet.ids)
            ids_at[id(packet.position)] = packet.ids
            report(packet)

        def stamped_get_batch(**options: Any) -> Any:
            packets = get_batch(**options)
            stages.stamp("handler took the window", [i for p in packets for i in p.ids])
            return packets

        def stamped_store(identifier: str, output_type: str, batch: Any, stored: Any, positions: Any) -> None:
            stages.stamp("output write started", list(batch.sources))
            store_outputs(identifier, output_type, batch, stored, positions)

        def stamped_save(positions: Sequence[Any]) -> None:
            save(positions)
            stages.stamp("position saved", [i for p in positions for i in ids_at.pop(id(p), ())])

        listener.report = stamped_report  # type: ignore[method-assign]
        listener.save_positions = stamped_save  # type: ignore[method-assign]
        self.db.cdc.queue.get_batch = stamped_get_batch  # type: ignore[method-assign]
        store.store_outputs = stamped_store  # type: ignore[method-assign]

    def predict(self, texts: list[str]) -> list[float]:
        self.stages.stamp("model called", [int(t.split()[1]) for t in texts if t.startswith("document ")])
        return model(texts)


# -- CPU accounting ---------------------------------------------------------------------------
def _cpu_seconds(stat_path: str) -> float | None:
    """User + system CPU seconds from a ``/proc/.../stat`` file (None when unavailable)."""
    try:
        with open(stat_path, encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _voluntary_switches(stat_path: str) -> int | None:
    """A thread's voluntary context switches (it waited: on a lock, a queue, a socket, the
    GIL) from the ``status`` file beside ``stat_path`` (None when unavailable)."""
    try:
        with open(stat_path.removesuffix("stat") + "status", encoding="ascii") as f:
            for line in f:
                if line.startswith("voluntary_ctxt_switches:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


class CpuMeter:
    """CPU seconds used by some threads of this process, the whole process and the server, and
    the threads' voluntary context switches (a process's ``status`` counts its main thread's
    only, so none is reported for processes)."""

    def __init__(self, threads: dict[str, threading.Thread], server_pid: int | None) -> None:
        self.paths = {name: f"/proc/self/task/{t.native_id}/stat" for name, t in threads.items()}
        self.threads = set(self.paths)
        if server_pid is not None:
            self.paths["server process"] = f"/proc/{server_pid}/stat"
        self.paths["client process"] = "/proc/self/stat"
        self.started = time.perf_counter()
        self.before = {name: _cpu_seconds(path) for name, path in self.paths.items()}
        self.switches = {name: _voluntary_switches(self.paths[name]) for name in self.threads}

    def used(self) -> dict[str, dict[str, float]]:
        """Per name: CPU seconds since the meter started, that as a share of the wall time, and
        for threads the voluntary context switches since."""
        wall = time.perf_counter() - self.started
        result: dict[str, dict[str, float]] = {}
        for name, path in self.paths.items():
            now, before = _cpu_seconds(path), self.before[name]
            if now is not None and before is not None:
                result[name] = {"cpu_seconds": round(now - before, 3), "cpu_share": round((now - before) / wall, 2)}
                switched, before_switches = _voluntary_switches(path), self.switches.get(name)
                if name in self.threads and switched is not None and before_switches is not None:
                    result[name]["voluntary_switches"] = switched - before_switches
        return result


# -- the scenarios ----------------------------------------------------------------------------
def paced_inserts(docs: Collection, ids: Sequence[int], interval: float) -> tuple[dict[int, float], list[float]]:
    """Insert ``ids`` one by one, ``interval`` apart start to start (0: back to back).

    Returns when each insert started and how long each took to be acknowledged.
    """
    started: dict[int, float] = {}
    acks: list[float] = []
    next_at = time.perf_counter()
    for i in ids:
        delay = next_at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        start = time.perf_counter()
        docs.insert_one(document(i))
        acks.append(time.perf_counter() - start)
        started[i] = start
        next_at = max(next_at + interval, start)
    return started, acks


#: The writer of :func:`paced_inserts_elsewhere`: a process of its own, which inserts the ids it
#: is given ``interval`` apart and prints when each insert started (``time.perf_counter``:
#: CLOCK_MONOTONIC on Linux, one clock for every process of the machine) and its ack time.
_WRITER = """
import json, sys
from pymongo import MongoClient
from benchmarks.mongo_changestream import paced_inserts
uri, ids, interval = sys.argv[1], json.loads(sys.argv[2]), float(sys.argv[3])
with MongoClient(uri) as client:
    docs = client.get_default_database().docs
    client.admin.command("ping")
    started, acks = paced_inserts(docs, ids, interval)
print(json.dumps({"started": list(started.items()), "acks": acks}))
"""


def paced_inserts_elsewhere(uri: str, ids: Sequence[int], interval: float) -> tuple[dict[int, float], list[float]]:
    """:func:`paced_inserts` made by a process of its own (an application writing through its own
    interpreter, not competing with the consumer's threads for theirs)."""
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(
        [sys.executable, "-c", _WRITER, uri, json.dumps(list(ids)), str(interval)],
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=True,
    )
    reply = json.loads(done.stdout)
    return {int(i): t for i, t in reply["started"]}, reply["acks"]


def warm_up(system: System, database: Any, clock: OutputClock, sizes: Sizes) -> None:
    warmup = range(-sizes.warmup_inserts, 0)
    paced_inserts(database.docs, warmup, sizes.interval)
    assert clock.wait_for(warmup, TIMEOUT), f"{system.label}: the warm-up inserts got no outputs"


def bench_inserts(
    server: Server,
    factory: Callable[[str, OutputClock], System],
    sizes: Sizes,
    *,
    count: int,
    interval: float,
    stages: StageClock | None = None,
) -> dict[str, Any]:
    """Insert-to-output latency of ``count`` single inserts ``interval`` apart (0: a burst).

    With ``stages`` (filled by an instrumented system), the latency is also broken down
    into the segments between consecutive stages.
    """
    with fresh_database(server, "latency") as (uri, database):
        clock = OutputClock()
        system = factory(uri, clock)
        try:
            warm_up(system, database, clock, sizes)
            ids = range(count)
            meter = CpuMeter(system.threads(), None)
            if sizes.writer_process:
                started, acks = paced_inserts_elsewhere(uri, ids, interval)
            else:
                started, acks = paced_inserts(database.docs, ids, interval)
            clock.wait_for(ids, TIMEOUT)
            cpu = meter.used()
        finally:
            system.close()
    times = {i: t for i in ids if (t := clock.time(i)) is not None}
    latencies = [t - started[i] for i, t in times.items()]
    first, last = min(started.values()), max(times.values(), default=float("nan"))
    result = {
        **summarize_seconds(latencies),
        "missing": len(ids) - len(latencies),
        "insert_ack": summarize_seconds(acks),
        "docs_per_second": len(times) / (last - first),
        # The consumer's threads, per insert: CPU (ms) and voluntary context switches.
        "per_insert": {
            name: {
                "cpu_ms": round(1000 * used["cpu_seconds"] / count, 3),
                **({"switches": round(used["voluntary_switches"] / count, 2)} if "voluntary_switches" in used else {}),
            }
            for name, used in cpu.items()
            if name != "client process" or not sizes.writer_process  # with a writer thread, it is counted there
        },
    }
    if stages is not None:
        result["segments"] = stages.segments(ids, started, clock)
    return result


def bench_isolated(server: Server, factory: Callable[[str, OutputClock], System], sizes: Sizes) -> dict[str, Any]:
    return bench_inserts(server, factory, sizes, count=sizes.isolated_inserts, interval=sizes.interval)


def bench_burst(server: Server, factory: Callable[[str, OutputClock], System], sizes: Sizes) -> dict[str, Any]:
    return bench_inserts(server, factory, sizes, count=sizes.burst_inserts, interval=0.0)


def bench_throughput(
    server: Server, factory: Callable[[str, OutputClock], System], sizes: Sizes, *, profile: bool = False
) -> dict[str, Any]:
    """Time from the first ``insert_many`` to the last output of ``sizes.throughput_docs`` documents.

    With ``profile``, the listener and handler threads of ``reactive`` run under
    ``cProfile`` and their statistics are returned too.
    """
    batches = throughput_batches(sizes)
    ids = range(sizes.throughput_docs)
    profiling = profiled_threads() if profile else contextlib.nullcontext({})
    with fresh_database(server, "throughput") as (uri, database), profiling as profiles:
        clock = OutputClock()
        system = factory(uri, clock)
        try:
            warm_up(system, database, clock, sizes)
            writes_before, rows_before = clock.counters()
            meter = CpuMeter({"writer (main thread)": threading.main_thread(), **system.threads()}, server.pid)
            started = time.perf_counter()
            for batch in batches:
                database.docs.insert_many(batch)
            inserted = time.perf_counter()
            complete = clock.wait_for(ids, TIMEOUT)
            cpu = meter.used()
            writes, rows = clock.counters()
        finally:
            system.close()
        stored = database[OUTPUTS].count_documents({"_id": {"$gte": 0, "$lt": sizes.throughput_docs}})
        times = [t for i in ids if (t := clock.time(i)) is not None]
        finished = max(times) if complete else time.perf_counter()
        seconds = finished - started
        result: dict[str, Any] = {
            "docs": sizes.throughput_docs,
            "complete": complete,
            "outputs_stored": stored,
            "seconds": seconds,
            "docs_per_second": sizes.throughput_docs / seconds,
            "insert_seconds": inserted - started,
            "inserts_per_second": sizes.throughput_docs / (inserted - started),
            "lag_after_last_insert_seconds": finished - inserted,
            "output_writes": writes - writes_before,
            "rows_per_output_write": (rows - rows_before) / max(1, writes - writes_before),
            "cpu": cpu,
        }
    if profiles:
        result["profile"] = {label: profile_summary(p) for label, p in profiles.items()}
    return result


def throughput_batches(sizes: Sizes) -> list[list[dict[str, Any]]]:
    return [
        [document(i) for i in range(start, min(start + sizes.batch, sizes.throughput_docs))]
        for start in range(0, sizes.throughput_docs, sizes.batch)
    ]


def bench_writer_alone(server: Server, sizes: Sizes) -> dict[str, Any]:
    """The throughput scenario's inserts with nothing following them: the server's ceiling,
    which no system that reads the inserts back and writes outputs to the same server can pass."""
    batches = throughput_batches(sizes)
    with fresh_database(server, "ceiling") as (_, database):
        for i in range(sizes.warmup_inserts):
            database.docs.insert_one(document(-1 - i))
        started = time.perf_counter()
        for batch in batches:
            database.docs.insert_many(batch)
        seconds = time.perf_counter() - started
    return {"docs_per_second": sizes.throughput_docs / seconds, "seconds": seconds}


BENCHES: dict[str, Callable[[Server, Callable[[str, OutputClock], System], Sizes], dict[str, Any]]] = {
    "isolated": bench_isolated,
    "burst": bench_burst,
    "throughput": bench_throughput,
}
#: The figures of each scenario that are compared (lower is better, except docs/s).
FIGURES = {
    "isolated": ("p50_ms", "p99_ms", "mean_ms"),
    "burst": ("p50_ms", "p99_ms", "docs_per_second"),
    "throughput": ("docs_per_second",),
}


def run_rounds(
    server: Server, sizes: Sizes, progress: Callable[[str], None]
) -> tuple[dict[str, dict[str, list[Any]]], list[dict[str, Any]]]:
    """Every scenario, ``sizes.rounds`` times, the systems in a rotated order each round; and
    once per round, after the throughput runs, the writer alone (:func:`bench_writer_alone`)."""
    names = list(SYSTEMS)
    runs: dict[str, dict[str, list[Any]]] = {s: {n: [] for n in names} for s in SCENARIOS}
    ceiling: list[dict[str, Any]] = []
    for round_ in range(sizes.rounds):
        order = names[round_ % len(names) :] + names[: round_ % len(names)]
        for scenario in SCENARIOS:
            for name in order:
                progress(f"round {round_ + 1}/{sizes.rounds}: {scenario}, {name}")
                runs[scenario][name].append(BENCHES[scenario](server, SYSTEMS[name], sizes))
        progress(f"round {round_ + 1}/{sizes.rounds}: throughput, writer alone")
        ceiling.append(bench_writer_alone(server, sizes))
    return runs, ceiling


def summarize_ceiling(ceiling: list[dict[str, Any]], throughput: dict[str, Any]) -> dict[str, Any]:
    """The writer alone's median rate, and each system's throughput as a share of it."""
    rate = statistics.median(r["docs_per_second"] for r in ceiling)
    return {
        "docs_per_second": rate,
        "rounds": [r["docs_per_second"] for r in ceiling],
        "share": {name: throughput[name]["docs_per_second"] / rate for name in SYSTEMS},
    }


def summarize(runs: dict[str, dict[str, list[Any]]]) -> dict[str, Any]:
    """Per scenario and system: the median over the rounds of each figure, every round's
    figures, and per compared figure the ratio reactive / raw loop (median of the per-round
    ratios, and the ratio of the medians)."""
    report: dict[str, Any] = {}
    for scenario, by_system in runs.items():
        figures = FIGURES[scenario]
        section: dict[str, Any] = {}
        for name, rounds in by_system.items():
            median_of = {f: statistics.median(r[f] for r in rounds) for f in figures}
            section[name] = {
                **median_of,
                "rounds": [{f: r[f] for f in figures} for r in rounds],
                "complete": all(r.get("complete", r.get("missing", 0) == 0) for r in rounds),
                "median_round": median_round(rounds, figures[0]),
            }
        ours, ref = by_system["reactive"], by_system[REFERENCE]
        section["ratios"] = {
            f: {
                "median_of_round_ratios": round(
                    statistics.median(a[f] / b[f] for a, b in zip(ours, ref, strict=True)), 3
                ),
                "ratio_of_medians": _ratio(section["reactive"][f], section[REFERENCE][f]),
                "rounds": [round(a[f] / b[f], 3) for a, b in zip(ours, ref, strict=True)],
            }
            for f in figures
        }
        report[scenario] = section
    return report


def median_round(rounds: list[dict[str, Any]], figure: str) -> dict[str, Any]:
    """The round with the median ``figure`` (its details: CPU, insert acks)."""
    ordered = sorted(rounds, key=lambda r: r[figure])
    return ordered[(len(ordered) - 1) // 2]


# -- profile ----------------------------------------------------------------------------------
@contextlib.contextmanager
def profiled_threads() -> Iterator[dict[str, cProfile.Profile]]:
    """Run the listener and handler threads started meanwhile under their own ``cProfile``.

    ``run`` is wrapped on the classes for the duration only (cProfile profiles the thread
    that enables it).
    """
    profiles: dict[str, cProfile.Profile] = {}
    classes: dict[str, type[threading.Thread]] = {"listener": MongoChangeStreamListener, "handler": CDCHandler}
    originals = {label: cls.run for label, cls in classes.items()}

    def wrap(label: str, original: Callable[[Any], None]) -> Callable[[Any], None]:
        def run(self: Any) -> None:
            profile = profiles.setdefault(label, cProfile.Profile())
            profile.enable()
            try:
                original(self)
            finally:
                profile.disable()

        return run

    for label, cls in classes.items():
        cls.run = wrap(label, originals[label])  # type: ignore[method-assign]
    try:
        yield profiles
    finally:
        for label, cls in classes.items():
            cls.run = originals[label]  # type: ignore[method-assign]


def profile_summary(profile: cProfile.Profile, top: int = 15) -> dict[str, Any]:
    """The functions with the most own time and the most cumulative time."""
    stats = pstats.Stats(profile, stream=io.StringIO())
    entries = []
    for (filename, line, function), (_, calls, own, cumulative, _) in stats.stats.items():  # type: ignore[attr-defined]
        where = f"{_short_path(filename)}:{line}({function})" if line else function
        entries.append(
            {"function": where, "calls": calls, "own_s": round(own, 3), "cumulative_s": round(cumulative, 3)}
        )
    return {
        "total_s": round(stats.total_tt, 3),  # type: ignore[attr-defined]
        "by_own_time": sorted(entries, key=lambda e: -e["own_s"])[:top],
        "by_cumulative_time": sorted(entries, key=lambda e: -e["cumulative_s"])[:top],
    }


def _short_path(filename: str) -> str:
    """A file name relative to the repository or to site-packages / the standard library."""
    for root in (str(Path(__file__).resolve().parent.parent) + "/", "site-packages/", "/lib/python3.11/"):
        if root in filename:
            return filename.split(root, 1)[1]
    return filename


def reactive_pipeline(uri: str) -> list[dict[str, Any]]:
    """The pipeline ``reactive``'s listener sends for a database where it follows ``docs``.

    Taken from a listener instance (``_pipeline()``), so the measurement follows the code.
    """
    backend = MongoBackend.from_uri(uri)
    try:
        listener = backend.create_listener(CDCQueue(), ListenerHooks())
        listener.watch(TableInfo("docs", "_id", ()))
        return listener._pipeline()
    finally:
        backend.close()


def write_history(database: Any, sizes: Sizes, *, with_outputs: bool) -> None:
    """``sizes.throughput_docs`` inserts into ``docs`` in batches; with ``with_outputs``, each
    batch is followed by the upserts of its outputs into the outputs collection."""
    for start in range(0, sizes.throughput_docs, sizes.batch):
        batch = [document(i) for i in range(start, min(start + sizes.batch, sizes.throughput_docs))]
        database.docs.insert_many(batch)
        if with_outputs:
            values = model([d["text"] for d in batch])
            database[OUTPUTS].bulk_write(
                [
                    ReplaceOne({"_id": d["_id"]}, {"_id": d["_id"], "_source": d["_id"], "_output": v}, upsert=True)
                    for d, v in zip(batch, values, strict=True)
                ],
                ordered=False,
            )


def read_rate(open_stream: Callable[[], Any], docs: int) -> float:
    """Events of ``docs`` per second that a bare ``try_next`` loop reads from ``open_stream()``."""
    seen = 0
    started = time.perf_counter()
    with open_stream() as stream:
        while seen < docs:
            change = stream.try_next()
            if change is not None and change.get("ns", {}).get("coll") == "docs":
                seen += 1
    return docs / (time.perf_counter() - started)


def stream_variants(database: Any, pipeline: list[dict[str, Any]], token: Any) -> dict[str, Callable[[], Any]]:
    """Openers of the streams compared, all resuming after ``token``.

    All use ``full_document="updateLookup"`` (what both systems use) but the last, which
    shows what the lookups cost (an insert event carries its document either way).
    """
    options = {"full_document": "updateLookup", "resume_after": token, "max_await_time_ms": MAX_AWAIT_MS}
    default = {**options, "full_document": "default"}
    return {
        "collection-level": lambda: database.docs.watch(**options),
        "database-level, no pipeline": lambda: database.watch(**options),
        "database-level, reactive's pipeline": lambda: database.watch(pipeline, **options),
        "database-level, reactive's pipeline, no updateLookup": lambda: database.watch(pipeline, **default),
    }


def bench_stream_delivery(server: Server, sizes: Sizes) -> dict[str, Any]:
    """Events/s that each kind of change stream delivers, reading a history written beforehand."""
    results: dict[str, Any] = {}
    for history in ("inserts only", "inserts + output upserts"):
        with fresh_database(server, "stream") as (uri, database):
            pipeline = reactive_pipeline(uri)
            with database.docs.watch() as stream:
                token = stream.resume_token
            write_history(database, sizes, with_outputs=history != "inserts only")
            variants = stream_variants(database, pipeline, token)
            rates: dict[str, list[float]] = {label: [] for label in variants}
            for _ in range(sizes.stream_repeat):
                for label, open_stream in variants.items():
                    rates[label].append(read_rate(open_stream, sizes.throughput_docs))
            results[history] = {
                label: {"events_per_second": statistics.median(r), "rounds": r} for label, r in rates.items()
            }
    return results


def bench_backlog(server: Server, name: str, sizes: Sizes) -> dict[str, Any]:
    """Docs/s a system processes when the changes are already in the stream's history.

    ``reactive`` is started, then its change capture stopped (its position is saved), the
    documents inserted, and the change capture started again: it resumes from the saved
    position. The raw loops are started on a stream resumed from a token taken before the
    inserts. Time from the (re)start to the last output.
    """
    ids = range(sizes.throughput_docs)
    with fresh_database(server, "backlog") as (uri, database):
        clock = OutputClock()
        if name == "reactive":
            system = ReactiveSystem(uri, clock)
            assert system.db.cdc.wait_idle(TIMEOUT)
            system.db.cdc.stop()
            write_history(database, sizes, with_outputs=False)
            started = time.perf_counter()
            system.db.cdc.start()
        else:
            with database.docs.watch() as stream:
                token = stream.resume_token
            write_history(database, sizes, with_outputs=False)
            started = time.perf_counter()
            system = RAW_LOOPS[name](uri, clock, resume_after=token)
        try:
            complete = clock.wait_for(ids, TIMEOUT)
        finally:
            system.close()
        finished = max(t for i in ids if (t := clock.time(i)) is not None) if complete else time.perf_counter()
        return {"complete": complete, "seconds": finished - started, "docs_per_second": len(ids) / (finished - started)}


# -- the report -------------------------------------------------------------------------------
def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _ratio(ours: float, reference: float) -> float:
    return round(ours / reference, 3) if reference > 0 else float("nan")


def goals(report: dict[str, Any]) -> dict[str, Any]:
    """The goals (median of the per-round ratios): isolated and burst p50 latency at most
    :data:`LATENCY_GOAL` x the raw loop's, throughput at least :data:`THROUGHPUT_GOAL` x."""

    def ratio(scenario: str, figure: str) -> float:
        return report[scenario]["ratios"][figure]["median_of_round_ratios"]

    result = {
        "isolated_p50": ratio("isolated", "p50_ms"),
        "burst_p50": ratio("burst", "p50_ms"),
        "throughput": ratio("throughput", "docs_per_second"),
    }
    result["latency_goal_met"] = result["isolated_p50"] <= LATENCY_GOAL and result["burst_p50"] <= LATENCY_GOAL
    result["throughput_goal_met"] = result["throughput"] >= THROUGHPUT_GOAL
    return result


def _yes(flag: bool) -> str:
    return "yes" if flag else "**no**"


def render(report: dict[str, Any]) -> str:
    m = report["machine"]
    sizes = report["settings"]["sizes"]
    rounds = sizes["rounds"]
    out = [
        f"Machine: {m['cpu']}, {m['cores_usable']} cores, {m['ram_gb']} GB RAM, {m['os']}, "
        f"load average at start {m.get('load_average')}  ",
        f"Python {m['python']}, pymongo {m['pymongo']}, reactive {m['reactive']} ({(m['commit'] or '?')[:7]}); "
        f"server: {report['server']}",
        "",
        f"Every figure is the median over {rounds} interleaved round(s); ratios are the median of the "
        f"per-round ratios to the {REFERENCE!r}. The single inserts (isolated, burst) come from "
        + ("a process of their own." if sizes.get("writer_process") else "the main thread of the systems' process."),
        "",
    ]
    titles = {
        "isolated": f"Isolated inserts ({sizes['isolated_inserts']} single inserts "
        f"{sizes['interval'] * 1000:.0f} ms apart)",
        "burst": f"Burst ({sizes['burst_inserts']} single inserts back to back)",
        "throughput": f"Throughput ({sizes['throughput_docs']:,} docs, insert_many batches of {sizes['batch']:,})",
    }
    for scenario in SCENARIOS:
        section = report[scenario]
        out += [f"### {titles[scenario]}", ""]
        rows = []
        for name in SYSTEMS:
            r = section[name]
            detail = r["median_round"]
            if scenario == "throughput":
                extra = [
                    f"{detail['insert_seconds']:.2f} s",
                    f"{detail['lag_after_last_insert_seconds']:.2f} s",
                    f"{detail['rows_per_output_write']:.0f}",
                    ", ".join(f"{k} {v['cpu_share']:.0%}" for k, v in detail["cpu"].items()),
                ]
            else:
                threads = {k: v for k, v in detail["per_insert"].items() if "switches" in v}
                extra = [
                    f"{detail['insert_ack']['p50_ms']:.2f} ms",
                    f"{sum(v['cpu_ms'] for v in threads.values()):.2f} ms / "
                    f"{sum(v['switches'] for v in threads.values()):.1f}",
                ]
            rows.append(
                [
                    name,
                    *(f"{r[f]:,.0f} docs/s" if f == "docs_per_second" else f"{r[f]:.2f} ms" for f in FIGURES[scenario]),
                    *extra,
                    "" if r["complete"] else "INCOMPLETE",
                ]
            )
        headers = [
            "system",
            *FIGURES[scenario],
            *(
                ["insert phase", "lag after", "rows/write", "CPU (median round)"]
                if scenario == "throughput"
                else ["insert ack p50 (median round)", "consumer threads per insert: CPU / voluntary switches"]
            ),
            "",
        ]
        out += [markdown_table(headers, rows), ""]
        ratio_rows = [
            [
                f,
                f"{r['median_of_round_ratios']:.2f}x",
                f"{r['ratio_of_medians']:.2f}x",
                ", ".join(map(str, r["rounds"])),
            ]
            for f, r in section["ratios"].items()
        ]
        out += [markdown_table(["reactive / raw loop", "median of rounds", "of medians", "rounds"], ratio_rows), ""]
        if scenario == "throughput" and "ceiling" in report:
            c = report["ceiling"]
            shares = ", ".join(f"{name} {share:.0%}" for name, share in c["share"].items())
            out += [
                f"The writer alone (the same `insert_many` batches, nothing following them): "
                f"{c['docs_per_second']:,.0f} docs/s, the server's ceiling for every system here ({shares} of "
                f"it); {THROUGHPUT_GOAL:g}x the raw loop would be "
                f"{THROUGHPUT_GOAL * report['throughput'][REFERENCE]['docs_per_second']:,.0f} docs/s.",
                "",
            ]
    g = report["goals"]
    out += [
        "### Goals",
        "",
        markdown_table(
            ["figure", "ratio", "goal", "met"],
            [
                [
                    "isolated p50",
                    f"{g['isolated_p50']:.2f}x",
                    f"<= {LATENCY_GOAL}x",
                    _yes(g["isolated_p50"] <= LATENCY_GOAL),
                ],
                ["burst p50", f"{g['burst_p50']:.2f}x", f"<= {LATENCY_GOAL}x", _yes(g["burst_p50"] <= LATENCY_GOAL)],
                ["throughput", f"{g['throughput']:.2f}x", f">= {THROUGHPUT_GOAL}x", _yes(g["throughput_goal_met"])],
            ],
        ),
    ]
    if "profile" in report:
        out += ["", render_profile(report["profile"])]
    return "\n".join(out)


def render_profile(profile: dict[str, Any]) -> str:
    out = ["### Profile", "", "Latency breakdown of isolated inserts (instrumented runs; ms):", ""]
    rows = []
    for name, run in profile["latency_breakdown"].items():
        rows.append([name, "**insert started -> output visible**", f"{run['p50_ms']:.2f}", f"{run['p99_ms']:.2f}"])
        rows += [[name, span, f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}"] for span, r in run["segments"].items()]
    out += [markdown_table(["system", "segment", "p50", "p99"], rows), ""]
    out += ["Change stream delivery to a bare `try_next` loop (events/s, median):", ""]
    histories = list(profile["stream_delivery"])
    variants = list(profile["stream_delivery"][histories[0]])
    out.append(
        markdown_table(
            ["stream", *(f"history: {h}" for h in histories)],
            [
                [v, *(f"{profile['stream_delivery'][h][v]['events_per_second']:,.0f}" for h in histories)]
                for v in variants
            ],
        )
    )
    out += ["", "Backlog drain (changes already in the stream's history):", ""]
    out.append(
        markdown_table(
            ["system", "docs/s", "seconds"],
            [[n, f"{r['docs_per_second']:,.0f}", f"{r['seconds']:.2f}"] for n, r in profile["backlog"].items()],
        )
    )
    run = profile["profiled_throughput"]
    out += [
        "",
        f"cProfile of reactive's threads during one throughput run ({run['docs_per_second']:,.0f} docs/s under the "
        "profiler):",
    ]
    for label, stats in run.get("profile", {}).items():
        out += ["", f"{label} thread, by cumulative time (total own time {stats['total_s']:.2f} s):", ""]
        out.append(
            markdown_table(
                ["function", "calls", "own s", "cumulative s"],
                [[e["function"], e["calls"], e["own_s"], e["cumulative_s"]] for e in stats["by_cumulative_time"]],
            )
        )
        out += ["", f"{label} thread, by own time:", ""]
        out.append(
            markdown_table(
                ["function", "calls", "own s", "cumulative s"],
                [[e["function"], e["calls"], e["own_s"], e["cumulative_s"]] for e in stats["by_own_time"][:10]],
            )
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.mongo_changestream", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default: 5, 1 with --quick)")
    parser.add_argument("--profile", action="store_true", help="also profile reactive's path (see the docstring)")
    parser.add_argument(
        "--writer-process",
        action="store_true",
        help="make the single inserts (isolated, burst) from a process of their own, not the main thread",
    )
    parser.add_argument("--uri", help="a MongoDB server (replica set) to use instead of starting SecantusDB")
    parser.add_argument(
        "--retry-writes", action="store_true", help="keep retryable writes on (see Server; off by default)"
    )
    parser.add_argument(
        "--output",
        type=Path,
        help="JSON file to write (default: results/mongodb.json, results/mongodb-partial.json with --quick)",
    )
    args = parser.parse_args(argv)
    sizes = Sizes.quick() if args.quick else Sizes()
    if args.rounds:
        sizes = dc.replace(sizes, rounds=args.rounds)
    if args.writer_process:
        sizes = dc.replace(sizes, writer_process=True)
    output = args.output or RESULTS / ("mongodb-partial.json" if args.quick else "mongodb.json")
    machine = {
        **machine_info(),
        "pymongo": _version("pymongo"),
        "secantusdb": _version("SecantusDB"),
    }
    begun = time.perf_counter()
    report: dict[str, Any] = {
        "started_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "machine": machine,
        "settings": {
            "quick": args.quick,
            "sizes": dc.asdict(sizes),
            "max_await_ms": MAX_AWAIT_MS,
            "retry_writes": args.retry_writes,
            "reference": REFERENCE,
            "latency_goal": LATENCY_GOAL,
            "throughput_goal": THROUGHPUT_GOAL,
        },
    }

    def progress(message: str) -> None:
        print(f"<!-- {message} ({time.perf_counter() - begun:.0f} s) -->", file=sys.stderr, flush=True)

    with mongo_server(args.uri, retry_writes=args.retry_writes) as server:
        report["server"] = server.description
        runs, ceiling = run_rounds(server, sizes, progress)
        report.update(summarize(runs))
        report["ceiling"] = summarize_ceiling(ceiling, report["throughput"])
        report["goals"] = goals(report)
        if args.profile:
            profile: dict[str, Any] = {"latency_breakdown": {}, "backlog": {}}
            for name, timed in (("raw loop", TimedRawLoop), ("reactive", TimedReactive)):
                progress(f"profile: latency breakdown, {name}")
                stages = StageClock()
                factory = functools.partial(timed, stages=stages)
                profile["latency_breakdown"][name] = bench_inserts(
                    server, factory, sizes, count=sizes.isolated_inserts, interval=sizes.interval, stages=stages
                )
            progress("profile: stream delivery")
            profile["stream_delivery"] = bench_stream_delivery(server, sizes)
            for name in SYSTEMS:
                progress(f"profile: backlog drain, {name}")
                profile["backlog"][name] = bench_backlog(server, name, sizes)
            progress("profile: cProfile of a reactive throughput run")
            profile["profiled_throughput"] = bench_throughput(server, ReactiveSystem, sizes, profile=True)
            report["profile"] = profile
    report["total_seconds"] = round(time.perf_counter() - begun, 1)
    print(render(report), flush=True)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    progress(f"results written to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

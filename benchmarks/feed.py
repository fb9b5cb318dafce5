"""Change feed benchmark: ``reactive.feed`` across two processes, next to a bare pyzmq loop.

Run ``python -m benchmarks.feed [--quick] [--profile] [--only KIND] [--listener]``. It prints
Markdown tables and writes every figure as JSON (``results/feed.json``;
``results/feed-partial.json`` with ``--quick`` or ``--only``). Nothing here asserts a speed;
the only checks are for correctness (every message arrived, the subscriber's final view holds
every row with its value).

Processes
    The publisher runs in this process, the subscriber in a second one started with
    ``multiprocessing`` (spawn) and driven over a pipe; they talk over TCP on 127.0.0.1.
    Both processes are on one machine, so their wall clocks (``time.time()``) agree: the
    publisher stamps each message just before ``publish()`` (before encoding, for the bare
    loop), the subscriber stamps it when its callback gets it, and the two lists are matched
    by row id afterwards (the stamps do not travel in the payload).

Payloads (one message = one delta of one row)
    ``dict_1kb``: a dict of nine string, int and float fields, about 1 KB of JSON.
    ``vector384_list``: a Python list of 384 floats (the feed packs it as base64 float64).
    ``vector384_f32``: a numpy float32 array of 384 (the feed packs it as base64 float32; a
    subscriber gets a list of floats). 64 distinct values of each kind are generated with a
    fixed seed and reused; every message has a new row id.

reactive
    A :class:`~reactive.feed.DataService` on its own :class:`~reactive.feed.Node` calls
    ``publish(table, [("upsert", id, value)], use_snapshot=False)``; the subscriber is
    :func:`reactive.feed.subscribe` with an ``on_change`` that stamps the receipt. Sequence
    numbers, heartbeats (every 0.5 s), snapshots and resubscription on gaps are on, as they
    always are; both sides use the node's default high-water mark (100,000 messages). The
    subscriber's ``reactive.feed`` log (INFO and up: resubscriptions and why) is kept with
    each round and printed.

Reference: a bare pyzmq PUB/SUB loop on the same payloads
    PUB binds (SNDHWM 100,000), SUB connects (RCVHWM 100,000) and subscribes to everything;
    the slow-joiner handshake is a ``hello`` message sent every 10 ms until the subscriber
    reports one. A message is two frames, ``[row id as ASCII, body]``; the subscriber decodes
    the body, stores it in a dict by id (its view) and stamps the receipt. Codecs:
    ``json`` (``json.dumps(value).encode()`` / ``json.loads``; the float32 array goes as
    ``json.dumps(array.tolist())``), ``raw_f8`` (``array.array("d", list).tobytes()`` /
    ``np.frombuffer(body, "<f8").tolist()``) and ``raw_f4`` (``array.tobytes()`` /
    ``np.frombuffer(body, "<f4").tolist()``): each decodes to the value the feed hands to
    ``on_change``. There is no sequencing, no snapshot and no recovery: a message dropped at
    the high-water mark is simply lost (and counted).

Throughput (messages per second)
    The publisher sends ``messages`` (50,000 dicts, 20,000 vectors) as fast as it can. Rate
    = (messages received - 1) / (last receipt - first receipt), at the subscriber. Also
    reported: the publisher's own rate (messages / duration of its send loop); where it is
    well above the subscriber's, the subscriber is the bottleneck and a backlog built up.
    Reactive and the bare codecs alternate for ``rounds`` (5) rounds; the median round is
    reported. For reactive, every row must be in the subscriber's final view with its value
    (a message lost at the high-water mark is repaired by a resubscription; resubscriptions
    are reported); the bare loop reports what it lost.

Latency (p50/p99, publish call -> the subscriber's callback)
    Paced sends: ``latency_messages`` (1,000) messages ``interval`` (1 ms) apart, so queues
    stay empty, for ``latency_rounds`` (2) alternating rounds; every sample is counted.

A Listener's outputs through ``db.cdc.publish``
    A DuckDB file (``reactive.connect("duckdb:///...", poll_interval=0.05)``), the model
    ``len(text)`` of :mod:`benchmarks.sql_duckdb` on ``docs.text``, ``db.cdc.publish`` on
    127.0.0.1; the subscriber process follows the listener's identifier (``len__text``).
    ``listener_inserts`` (200) single-row INSERTs by a plain ``duckdb.connect(path)`` client
    in the publishing process (DuckDB opens a file in one process only), 0.5-1.5 x the poll
    interval apart. Two latencies per row: from the handler's commit (``FeedHub.committed``
    wrapped on the instance: it is called right after the window's transaction commits,
    before the feed's thread publishes) to ``on_change``, and from the INSERT returning to
    ``on_change`` (it includes the wait for the next poll). References in the same run:
    ``publish()`` -> ``on_change`` of a small int with a bare DataService, and the bare pyzmq
    loop on the same small int (``json``), paced as in the latency test.

Profile (``--profile``)
    One more reactive throughput round per payload, with cProfile on the publishing thread
    (``DataService.publish`` -> ``Node.send_delta``) and on the subscriber node's receiving
    thread (``_parse_data``, ``wire.from_wire``, sequencing, delivery); the top functions by
    own time go to the JSON and are printed. Profiled rounds are not in the figures. Garbage
    collection shows up as own time of whatever function allocated when it ran.

The ratios are reactive / bare: for the rate, higher is better (the project's goal is at least
0.5x the bare loop's rate with sequencing, snapshots and recovery on); for latency, lower is
better (2.00x: reactive takes twice as long). Figures vary with whatever else runs on the
machine, all the more on few cores, where the two processes, their ZMQ I/O threads and the
node's threads share them (the JSON records the load average): compare reactive with the
reference of the same run.
"""

from __future__ import annotations

import argparse
import array
import cProfile
import dataclasses as dc
import io
import json
import logging
import multiprocessing
import pstats
import random
import statistics
import string
import threading
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from .common import _version, machine_info, markdown_table, scratch_dir, summarize_seconds

RESULTS = Path(__file__).parent / "results"
POOL = 64
HWM = 100_000
#: How long a subscriber waits with nothing arriving before it gives up on what is missing.
IDLE = 10.0
WAIT = 120.0
KINDS = ("dict_1kb", "vector384_list", "vector384_f32")


@dc.dataclass(frozen=True)
class Sizes:
    messages: dict[str, int] = dc.field(
        default_factory=lambda: {"dict_1kb": 50_000, "vector384_list": 20_000, "vector384_f32": 20_000}
    )
    rounds: int = 5
    latency_messages: int = 1_000
    latency_rounds: int = 2
    interval: float = 0.001
    listener_inserts: int = 200

    @classmethod
    def quick(cls) -> Sizes:
        return cls(
            messages=dict.fromkeys(KINDS, 3_000), rounds=1, latency_messages=200, latency_rounds=1, listener_inserts=30
        )


# -- payloads and the bare loop's codecs -------------------------------------------------------------
def payloads(kind: str) -> list[Any]:
    """``POOL`` distinct values of ``kind``, the same in every process (a fixed seed)."""
    rng = random.Random(f"feed-{kind}")
    letters = string.ascii_letters + string.digits + "     "

    def text(n: int) -> str:
        return "".join(rng.choices(letters, k=n))

    if kind == "dict_1kb":
        return [
            {
                "title": text(120),
                "body": text(640),
                "author": text(24),
                "lang": rng.choice(["en", "fr", "de"]),
                "url": "https://example.org/" + text(60),
                "score": rng.random(),
                "views": rng.randrange(10**9),
                "rating": round(rng.uniform(0, 5), 2),
                "flags": rng.randrange(16),
            }
            for _ in range(POOL)
        ]
    if kind == "small_int":
        return [rng.randrange(1000) for _ in range(POOL)]
    vectors = [[rng.gauss(0.0, 1.0) for _ in range(384)] for _ in range(POOL)]
    if kind == "vector384_list":
        return vectors
    if kind == "vector384_f32":
        return [np.asarray(v, dtype=np.float32) for v in vectors]
    raise ValueError(kind)


def delivered(kind: str, value: Any) -> Any:
    """What a subscriber gets for ``value`` (a float32 array arrives as a list of floats)."""
    return value.tolist() if isinstance(value, np.ndarray) else value


def _json_encode(value: Any) -> bytes:
    return json.dumps(value.tolist() if isinstance(value, np.ndarray) else value).encode()


ENCODERS: dict[str, Callable[[Any], bytes]] = {
    "json": _json_encode,
    "raw_f8": lambda value: array.array("d", value).tobytes(),
    "raw_f4": lambda value: value.tobytes(),
}
DECODERS: dict[str, Callable[[bytes], Any]] = {
    "json": json.loads,
    "raw_f8": lambda body: np.frombuffer(body, "<f8").tolist(),
    "raw_f4": lambda body: np.frombuffer(body, "<f4").tolist(),
}
CODECS = {
    "dict_1kb": ("json",),
    "vector384_list": ("json", "raw_f8"),
    "vector384_f32": ("json", "raw_f4"),
    "small_int": ("json",),
}


def expected(kind: str) -> Callable[[int], Any]:
    """The value a subscriber must hold for row ``i`` at the end."""
    if kind == "listener":
        from .sql_duckdb import doc_row, trivial_predict

        return lambda i: trivial_predict([doc_row(i)[1]])[0]
    pool = [delivered(kind, v) for v in payloads(kind)]
    return lambda i: pool[i % POOL]


# -- the subscriber process ----------------------------------------------------------------------------
class Receipts:
    """First receipt time of each row id ``0..n-1`` (wall clock)."""

    def __init__(self, n: int) -> None:
        self.times: list[float | None] = [None] * n
        self.count = 0
        self.done = threading.Event()
        self.last = time.monotonic()

    def stamp(self, row_id: Any, now: float) -> None:
        times = self.times
        if type(row_id) is int and 0 <= row_id < len(times) and times[row_id] is None:
            times[row_id] = now
            self.count += 1
            self.last = time.monotonic()
            if self.count == len(times):
                self.done.set()

    def wait(self, conn: Connection) -> None:
        """Until every id arrived, or the publisher is done and nothing came for ``IDLE`` s;
        the publisher's ``("done",)`` is read either way."""
        publisher_done = False
        deadline = time.monotonic() + WAIT
        while not self.done.wait(0.01) and time.monotonic() < deadline:
            if not publisher_done and conn.poll():
                publisher_done = conn.recv() == ("done",)
            if publisher_done and time.monotonic() - self.last > IDLE:
                break
        if not publisher_done:  # every row came before the publisher said it was done
            conn.recv()

    def summary(self) -> dict[str, Any]:
        return {"times": self.times, "received": self.count}


class FeedLog(logging.Handler):
    """What ``reactive.feed`` logs at INFO and above in the subscriber process (resubscriptions
    and their reasons), returned with each result."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if len(self.messages) < 50:
            self.messages.append(f"{record.levelname} {record.getMessage()}")

    def take(self) -> list[str]:
        messages, self.messages = self.messages, []
        return messages


FEED_LOG = FeedLog()


def subscriber_main(conn: Connection) -> None:
    """The subscriber process: runs the commands the publisher sends over ``conn``."""
    feed_logger = logging.getLogger("reactive.feed")
    feed_logger.setLevel(logging.INFO)
    feed_logger.addHandler(FEED_LOG)
    while True:
        command = conn.recv()
        if command[0] == "exit":
            return
        try:
            if command[0] == "reactive":
                conn.send(("result", reactive_subscriber(conn, *command[1:])))
            elif command[0] == "bare":
                conn.send(("result", bare_subscriber(conn, *command[1:])))
            else:
                raise ValueError(f"unknown command {command[0]!r}")
        except Exception as exc:
            conn.send(("error", f"{type(exc).__name__}: {exc}"))


def reactive_subscriber(conn: Connection, address: str, table: str, kind: str, n: int, profile: bool) -> dict:
    import reactive.feed

    receipts = Receipts(n)
    now = time.time
    FEED_LOG.take()

    def on_change(change: Any) -> None:
        receipts.stamp(change.id, now())

    sub = reactive.feed.subscribe(address, table, on_change)
    try:
        if not sub.wait_synced(30):
            raise TimeoutError("the subscription did not sync")
        profiler = cProfile.Profile() if profile else None
        if profiler is not None:
            _on_receiver_thread(sub, profiler.enable)
        conn.send(("ready",))
        receipts.wait(conn)
        if profiler is not None:
            _on_receiver_thread(sub, profiler.disable)
        status = sub.status["subscriptions"][f"{sub.publisher}:{sub.table}"]
        view = sub.view
        value_of = expected(kind)
        wrong = sum(1 for i in range(n) if view.get(i) != value_of(i))
        result = receipts.summary() | {
            "view_rows": len(view),
            "view_wrong_or_missing": wrong,
            "resubscriptions": status["resubscriptions"],
            "duplicates": status["duplicates"],
            "callback_errors": sub.callback_errors,
            "node_stats": dc.asdict(sub.node.stats),
            "log": FEED_LOG.take(),
        }
        if profiler is not None:
            result["profile"] = top_functions(profiler)
        return result
    finally:
        sub.close()


def _on_receiver_thread(sub: Any, call: Callable[[], None]) -> None:
    """Run ``call`` on the node's receiving thread (cProfile profiles the thread it is enabled on)."""
    ran = threading.Event()

    def run() -> None:
        call()
        ran.set()

    sub.node._receiver.command(("call", None, run))
    if not ran.wait(10):
        raise TimeoutError("the receiving thread did not run the command")


def bare_subscriber(conn: Connection, address: str, kind: str, codec: str, n: int) -> dict:
    decode = DECODERS[codec]
    context = zmq.Context()
    sock = context.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, HWM)
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    sock.connect(address)
    try:
        while sock.poll(WAIT * 1000) and sock.recv_multipart()[0] != b"hello":
            pass
        conn.send(("ready",))
        times: list[float | None] = [None] * n
        view: dict[int, Any] = {}
        count = 0
        now = time.time
        while count < n and sock.poll(IDLE * 1000):
            key, body = sock.recv_multipart()
            if key == b"end":
                break
            if key == b"hello":
                continue
            value = decode(body)
            stamp = now()
            i = int(key)
            view[i] = value
            if times[i] is None:
                times[i] = stamp
                count += 1
        value_of = expected(kind)
        wrong = sum(1 for i, value in view.items() if value != value_of(i))
        return {"times": times, "received": count, "view_rows": len(view), "view_wrong": wrong}
    finally:
        sock.close(0)
        context.term()


def top_functions(profiler: cProfile.Profile, limit: int = 15) -> dict[str, Any]:
    """The ``limit`` functions with the most own time, and the printed table."""
    stats = pstats.Stats(profiler)
    total = stats.total_tt  # type: ignore[attr-defined]
    rows = []
    for (path, line, name), (_cc, calls, tottime, cumtime, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        where = f"{Path(path).name}:{line}({name})" if line else name
        rows.append({"function": where, "calls": calls, "tottime_s": tottime, "cumtime_s": cumtime})
    rows.sort(key=lambda r: -r["tottime_s"])
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(limit)
    return {"total_s": total, "top": rows[:limit], "text": text.getvalue()}


# -- the publisher (this process) -------------------------------------------------------------------
class Subscriber:
    """The subscriber process and the pipe to it."""

    def __init__(self) -> None:
        context = multiprocessing.get_context("spawn")
        self.conn, child = context.Pipe()
        self.process = context.Process(target=subscriber_main, args=(child,), name="feed-subscriber", daemon=True)
        self.process.start()
        child.close()

    def expect(self, what: str, timeout: float = WAIT) -> Any:
        if not self.conn.poll(timeout):
            raise TimeoutError(f"the subscriber process sent no {what!r} within {timeout} s")
        answer = self.conn.recv()
        if answer[0] == "error":
            raise RuntimeError(f"the subscriber process failed: {answer[1]}")
        if answer[0] != what:
            raise RuntimeError(f"the subscriber process sent {answer!r}, not {what!r}")
        return answer[1] if len(answer) > 1 else None

    def close(self) -> None:
        self.conn.send(("exit",))
        self.process.join(30)
        if self.process.is_alive():
            self.process.kill()


def send_all(send: Callable[[int, Any], None], pool: list[Any], n: int, interval: float | None) -> tuple[list, float]:
    """Call ``send(i, value)`` for ``i`` in ``0..n-1``, paced ``interval`` apart (None: at once)."""
    stamps = [0.0] * n
    now = time.time
    started = time.perf_counter()
    if interval is None:
        for i in range(n):
            stamps[i] = now()
            send(i, pool[i % POOL])
    else:
        for i in range(n):
            delay = started + i * interval - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            stamps[i] = now()
            send(i, pool[i % POOL])
    return stamps, time.perf_counter() - started


def run_reactive(
    sub: Subscriber, kind: str, n: int, interval: float | None, table: str, profile: bool = False
) -> dict[str, Any]:
    from reactive.feed import DataService, Node

    pool = payloads(kind)
    node = Node()
    service = DataService("bench", node)
    service.start()
    try:
        sub.conn.send(("reactive", node.address, table, kind, n, profile))
        sub.expect("ready")
        profiler = cProfile.Profile() if profile else None

        def send(i: int, value: Any) -> None:
            service.publish(table, [("upsert", i, value)], use_snapshot=False)

        if profiler is not None:
            profiler.enable()
        sent, seconds = send_all(send, pool, n, interval)
        if profiler is not None:
            profiler.disable()
        sub.conn.send(("done",))
        result = sub.expect("result")
    finally:
        service.stop()
        node.stop()
    figures = figures_of(sent, seconds, result)
    if profiler is not None:
        figures["profile"] = {"publisher": top_functions(profiler), "subscriber": result.get("profile")}
    return figures


def run_bare(sub: Subscriber, kind: str, codec: str, n: int, interval: float | None) -> dict[str, Any]:
    encode = ENCODERS[codec]
    pool = payloads(kind)
    context = zmq.Context()
    pub = context.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.setsockopt(zmq.SNDHWM, HWM)
    pub.bind("tcp://127.0.0.1:0")
    try:
        sub.conn.send(("bare", pub.getsockopt_string(zmq.LAST_ENDPOINT), kind, codec, n))
        while not sub.conn.poll(0.01):  # the slow joiner: until the SUB hears us
            pub.send_multipart([b"hello", b""])
        sub.expect("ready")
        send_multipart = pub.send_multipart

        def send(i: int, value: Any) -> None:
            send_multipart([b"%d" % i, encode(value)])

        sent, seconds = send_all(send, pool, n, interval)
        while not sub.conn.poll(0.05):
            pub.send_multipart([b"end", b""])
        result = sub.expect("result")
    finally:
        pub.close(0)
        context.term()
    return figures_of(sent, seconds, result)


def figures_of(sent: list[float], publish_seconds: float, result: dict[str, Any]) -> dict[str, Any]:
    n = len(sent)
    times = result.pop("times")
    received = [t for t in times if t is not None]
    span = max(received) - min(received) if len(received) > 1 else 0.0
    latencies = [t - s for t, s in zip(times, sent, strict=True) if t is not None]
    figures = {
        "messages": n,
        "received": len(received),
        "missing": n - len(received),
        "publish_seconds": publish_seconds,
        "publish_rate": n / publish_seconds,
        "receive_seconds": span,
        "rate": (len(received) - 1) / span if span > 0 else None,
        "end_to_end_rate": len(received) / (max(received) - sent[0]) if received else None,
        "latency": summarize_seconds(latencies) if latencies else None,
        "_latencies": latencies,
    }
    return figures | result


# -- the measurements ----------------------------------------------------------------------------------
def systems(kind: str) -> list[str]:
    return ["reactive"] + [f"bare_{codec}" for codec in CODECS[kind]]


def run_one(sub: Subscriber, kind: str, system: str, n: int, interval: float | None, table: str) -> dict[str, Any]:
    if system == "reactive":
        return run_reactive(sub, kind, n, interval, table)
    return run_bare(sub, kind, system.removeprefix("bare_"), n, interval)


def throughput(sub: Subscriber, kind: str, sizes: Sizes) -> dict[str, Any]:
    n = sizes.messages[kind]
    rounds: dict[str, list[dict[str, Any]]] = {s: [] for s in systems(kind)}
    for r in range(sizes.rounds):
        for system in rounds:
            result = run_one(sub, kind, system, n, None, f"tp_{kind}_{r}")
            result.pop("_latencies")
            rounds[system].append(result)
    out: dict[str, Any] = {"messages": n, "rounds": rounds, "median": {}}
    for system, runs in rounds.items():
        rates = [r["rate"] or 0.0 for r in runs]
        out["median"][system] = {
            "rate": statistics.median(rates),
            "publish_rate": statistics.median(r["publish_rate"] for r in runs),
            "missing": sum(r["missing"] for r in runs),
            "resubscriptions": sum(r.get("resubscriptions", 0) for r in runs),
        }
    return out


def latency(sub: Subscriber, kind: str, sizes: Sizes) -> dict[str, Any]:
    samples: dict[str, list[float]] = {s: [] for s in systems(kind)}
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in systems(kind)}
    for r in range(sizes.latency_rounds):
        for system in samples:
            result = run_one(sub, kind, system, sizes.latency_messages, sizes.interval, f"lat_{kind}_{r}")
            samples[system] += result.pop("_latencies")
            runs[system].append(result)
    return {
        "messages": sizes.latency_messages,
        "interval_s": sizes.interval,
        "rounds": runs,
        "summary": {s: summarize_seconds(v) for s, v in samples.items()},
    }


def profile(sub: Subscriber, kind: str, sizes: Sizes) -> dict[str, Any]:
    result = run_reactive(sub, kind, sizes.messages[kind], None, f"prof_{kind}", profile=True)
    return {"rate": result["rate"], "publish_rate": result["publish_rate"]} | result["profile"]


def listener_latency(sub: Subscriber, sizes: Sizes) -> dict[str, Any]:
    """A Listener's outputs through ``db.cdc.publish``: commit -> subscriber, insert -> subscriber."""
    import duckdb

    import reactive
    from reactive.components import Listener

    from .sql_duckdb import POLL_INTERVAL, SCHEMA, doc_row, insert_gaps, make_model

    n = sizes.listener_inserts
    gaps = insert_gaps(n)
    with scratch_dir() as workdir:
        path = workdir / "b.duckdb"
        client = duckdb.connect(str(path))
        client.execute(SCHEMA)
        try:
            with reactive.connect(f"duckdb:///{path}", poll_interval=POLL_INTERVAL) as db:
                listener = Listener(make_model(), "text", "docs")
                db.add(listener, progress=False)
                feed = db.cdc.publish("tcp://127.0.0.1:0")
                commits = stamp_commits(db, listener.identifier)
                db.cdc.start()
                sub.conn.send(("reactive", feed.address, listener.identifier, "listener", n, False))
                sub.expect("ready")
                inserted = [0.0] * n
                for i, gap in enumerate(gaps):
                    client.execute("INSERT INTO docs VALUES (?, ?, ?, ?, ?)", doc_row(i))
                    inserted[i] = time.time()
                    time.sleep(gap)
                sub.conn.send(("done",))
                result = sub.expect("result")
                feed.close()
                db.cdc.stop()
        finally:
            client.close()
    times = result.pop("times")
    from_commit = [t - commits[i] for i, t in enumerate(times) if t is not None and i in commits]
    from_insert = [t - inserted[i] for i, t in enumerate(times) if t is not None]
    return {
        "inserts": n,
        "poll_interval_s": POLL_INTERVAL,
        "commit_to_subscriber": summarize_seconds(from_commit) if from_commit else None,
        "insert_to_subscriber": summarize_seconds(from_insert) if from_insert else None,
        "missing": n - result["received"],
    } | result


def stamp_commits(db: Any, identifier: str) -> dict[Any, float]:
    """Wall-clock time at which each output of ``identifier`` was committed, filled as it happens:
    the handler calls ``FeedHub.committed`` right after a window's transaction commits, before
    the feed's thread publishes it (wrapped on this instance only)."""
    stamps: dict[Any, float] = {}
    hub = db.cdc.feed_hub
    original = hub.committed

    def committed(window: int, changes: list[tuple[str, str, str, Any, Any]]) -> None:
        now = time.time()
        for kind, name, _event, row_id, _value in changes:
            if kind == "outputs" and name == identifier:
                stamps.setdefault(row_id, now)
        original(window, changes)

    hub.committed = committed
    return stamps


# -- the report ------------------------------------------------------------------------------------------
def _ratio(value: float | None, reference: float | None) -> str:
    return f"{value / reference:.2f}x" if value and reference else "n/a"


def report(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [
        "## Change feed across two processes (loopback TCP): reactive.feed next to a bare pyzmq loop",
        "",
        f"Machine: {m['cpu']}, {m['cores_usable']} cores, {m['ram_gb']} GB RAM, {m['os']}  ",
        f"Python {m['python']}, pyzmq {m['pyzmq']}, libzmq {m['libzmq']}, numpy {m['numpy']}  ",
        f"Load average at start (1/5/15 min): {m['load_average']}",
        "",
        "Rate: messages/s at the subscriber (median round; publish: the publisher's send loop). "
        "Latency: publish call -> subscriber callback, paced sends. Ratios: reactive / bare.",
        "",
    ]
    rows = []
    for kind in KINDS:
        if kind not in results["payloads"]:
            continue
        res = results["payloads"][kind]
        tp, lat = res["throughput"]["median"], res["latency"]["summary"]
        ours_rate, ours_lat = tp["reactive"]["rate"], lat["reactive"]
        for system in systems(kind):
            t, s = tp[system], lat[system]
            lost = f"{t['missing']} lost" if t["missing"] else ""
            if system == "reactive":
                lost = ", ".join(x for x in (lost, f"{t['resubscriptions']} resubscriptions") if x)
            rows.append(
                [
                    kind,
                    system,
                    f"{res['value_bytes'][system]:,}",
                    f"{t['rate']:,.0f}",
                    f"{t['publish_rate']:,.0f}",
                    f"{s['p50_ms']:.2f}",
                    f"{s['p99_ms']:.2f}",
                    "" if system == "reactive" else _ratio(ours_rate, t["rate"]),
                    "" if system == "reactive" else _ratio(ours_lat["p50_ms"], s["p50_ms"]),
                    "" if system == "reactive" else _ratio(ours_lat["p99_ms"], s["p99_ms"]),
                    lost,
                ]
            )
    lines.append(
        markdown_table(
            [
                "payload",
                "system",
                "value bytes",
                "msgs/s",
                "publish msgs/s",
                "p50 ms",
                "p99 ms",
                "rate ratio",
                "p50 ratio",
                "p99 ratio",
                "notes",
            ],
            rows,
        )
    )
    logged = [
        f"- {kind}, {part}, round {i + 1}: " + "; ".join(run["log"])
        for kind, res in results["payloads"].items()
        for part in ("throughput", "latency")
        for i, run in enumerate(res[part]["rounds"]["reactive"])
        if run.get("log")
    ]
    if logged:
        lines += ["", "What the subscriber's feed logged (resubscriptions and why):", "", *logged]
    if "listener" in results:
        lst = results["listener"]
        ref = lst["reference"]["summary"]
        rows = [
            ["Listener output: handler commit -> on_change", lst["commit_to_subscriber"]],
            ["Listener output: INSERT returned -> on_change", lst["insert_to_subscriber"]],
            ["ref: DataService.publish -> on_change (small int)", ref["reactive"]],
            ["ref: bare pyzmq json send -> recv (small int)", ref["bare_json"]],
        ]
        lines += [
            "",
            f"### A Listener's outputs through db.cdc.publish (DuckDB, poll {lst['poll_interval_s'] * 1000:.0f} ms, "
            f"{lst['inserts']} single-row inserts; {lst['missing']} missing, "
            f"{lst['view_wrong_or_missing']} wrong in the final view)",
            "",
            markdown_table(
                ["path", "p50 ms", "p90 ms", "p99 ms", "samples"],
                [[name, f"{x['p50_ms']:.2f}", f"{x['p90_ms']:.2f}", f"{x['p99_ms']:.2f}", x["n"]] for name, x in rows],
            ),
        ]
    for kind, prof in results.get("profile", {}).items():
        lines += ["", f"### Profile of one reactive round, {kind} (rate {prof['rate']:,.0f} msgs/s under cProfile)"]
        for side in ("publisher", "subscriber"):
            if prof.get(side):
                lines += ["", f"{side}: total own time {prof[side]['total_s']:.2f} s", ""]
                lines.append(
                    markdown_table(
                        ["function", "calls", "own s", "cumulative s"],
                        [
                            [r["function"], r["calls"], f"{r['tottime_s']:.3f}", f"{r['cumtime_s']:.3f}"]
                            for r in prof[side]["top"][:10]
                        ],
                    )
                )
    return "\n".join(lines)


def value_bytes(kind: str) -> dict[str, int]:
    """Bytes of one value's encoding on the wire, per system (reactive: the value's wire JSON;
    its envelope adds about 150 bytes per message)."""
    from reactive.feed import wire

    value = payloads(kind)[0]
    sizes = {"reactive": len(wire.dumps(value))}
    sizes |= {f"bare_{codec}": len(ENCODERS[codec](value)) for codec in CODECS[kind]}
    return sizes


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="reactive.feed across two processes, next to bare pyzmq")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument("--profile", action="store_true", help="also one cProfiled reactive round per payload")
    parser.add_argument("--only", action="append", choices=KINDS, help="one payload kind (may be repeated)")
    parser.add_argument("--listener", action="store_true", help="with --only: the Listener measurement too")
    args = parser.parse_args(argv)
    sizes = Sizes.quick() if args.quick else Sizes()
    kinds = args.only or list(KINDS)
    info = machine_info() | {
        "pyzmq": zmq.__version__,
        "libzmq": zmq.zmq_version(),
        "numpy": np.__version__,
        "reactive": _version("reactive-ml"),
    }
    results: dict[str, Any] = {"machine": info, "sizes": dc.asdict(sizes), "payloads": {}}
    started = time.perf_counter()
    sub = Subscriber()
    try:
        for kind in kinds:
            results["payloads"][kind] = {
                "value_bytes": value_bytes(kind),
                "throughput": throughput(sub, kind, sizes),
                "latency": latency(sub, kind, sizes),
            }
        if args.only is None or args.listener:
            results["listener"] = listener_latency(sub, sizes) | {"reference": latency(sub, "small_int", sizes)}
        if args.profile:
            results["profile"] = {kind: profile(sub, kind, sizes) for kind in kinds}
    finally:
        sub.close()
    results["seconds"] = time.perf_counter() - started
    print(report(results))
    partial = args.quick or args.only is not None
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / ("feed-partial.json" if partial else "feed.json")
    path.write_text(json.dumps(results, indent=2, default=str))
    print(f"\n<!-- results written to {path} ({results['seconds']:.0f} s) -->")


if __name__ == "__main__":
    main()

"""Kinetica benchmark: ``reactive`` next to the official ``gpudb`` client on the same server.

Run ``python -m benchmarks.kinetica_monitor [--quick]``. It prints Markdown tables and writes
every figure as JSON (``results/kinetica.json``, ``results/kinetica-partial.json`` with
``--quick``). Nothing here asserts a speed; the only checks are for correctness (every record
arrived, every row got its output).

Server
    The Kinetica-protocol test server of the test suite (``tests/kinetica_server.py``) as its
    own process, so the server and the clients do not share a GIL. It is a Python program: its
    own cost per request is in every figure, for both systems alike.

Monitor throughput (decoded inserts per second)
    The same stream for both systems: ``records`` rows inserted into a fresh table by a plain
    REST client in batches of ``batch`` (the server publishes one message of ``batch`` frames
    per insert). The monitor's INSERT_DECODED callback blocks on its first record until the
    whole stream has been published (a third, raw SUB socket subscribed to every topic counts
    the messages), then it is released: the figure is how fast each client drains a backlog of
    ``records`` frames into decoded dicts, not how fast the server publishes.
    ``reactive``: ``reactive.TableMonitor.Client`` on a ``reactive.connect("kinetica://...")``
    datalayer (one SUB socket in the change listener, a bounded queue, the monitor's thread
    decodes with fastavro and calls back). ``official``: ``gpudb.GPUdbTableMonitor.Client``
    (one thread per event type, its C-extension decoder). The systems alternate for
    ``rounds`` rounds; the median round is reported.

Latency (insert -> output stored)
    ``reactive``: a ``Listener`` (model ``len(text)``) on a Kinetica table, ``db.cdc.start()``;
    the output is stored when ``db.writer.write`` returns (wrapped on the instance). Reference
    (``raw loop``): the loop a developer writes with the official client: a
    ``GPUdbTableMonitor.Client`` whose INSERT_DECODED callback computes the same model and
    inserts the output with ``GPUdbTable.insert_records``; stored when that returns. Single
    records are inserted ``interval`` apart by a REST client; latency = stored - insert
    started. Alternating rounds, every sample counted.

Reconciliation pass (an update count)
    A table of ``n`` rows with a backfilled listener. One row's key is updated: the update
    monitor delivers a count and the listener reconciles the table (reads ``(id, key)`` pages,
    compares with the stored fingerprints, recomputes the changed row). Measured from the
    update request to ``db.cdc.wait_idle()`` returning True (median of ``passes``).
    Reference: reading the whole table once, page by page by key, with a plain REST client
    (the least any scan-based detection can cost).
"""

from __future__ import annotations

import argparse
import dataclasses as dc
import json
import logging
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import zmq

import reactive
from reactive import TableMonitor
from reactive.backends.kinetica.client import KineticaClient, RecordCodec, record_type_schema
from reactive.components import Listener, Model

from .common import machine_info, markdown_table, summarize_seconds

RESULTS = Path(__file__).parent / "results"
SERVER = Path(__file__).parent.parent / "tests" / "kinetica_server.py"
WAIT = 600.0
DOCS = [("id", "long", False), ("text", "string", True), ("lang", "string", True), ("score", "double", True)]


@dc.dataclass(frozen=True)
class Sizes:
    records: int = 100_000
    batch: int = 1_000
    rounds: int = 3
    latency_samples: int = 150
    latency_rounds: int = 2
    interval: float = 0.02
    reconcile_rows: tuple[int, ...] = (10_000, 100_000, 1_000_000)
    passes: int = 3

    @classmethod
    def quick(cls) -> Sizes:
        return cls(records=10_000, rounds=1, latency_samples=30, latency_rounds=1, reconcile_rows=(10_000,), passes=1)


@dc.dataclass
class Server:
    url: str
    zmq_port: int
    process: subprocess.Popen[str]

    @property
    def uri(self) -> str:
        return f"kinetica://{self.url.removeprefix('http://')}?monitor_port={self.zmq_port}"


@contextmanager
def server_process() -> Iterator[Server]:
    process = subprocess.Popen([sys.executable, str(SERVER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        address = json.loads(process.stdout.readline())
        yield Server(address["url"], address["zmq_port"], process)
    finally:
        assert process.stdin is not None
        process.stdin.close()
        process.wait(30)


def create_docs(client: KineticaClient, table: str) -> RecordCodec:
    schema = record_type_schema(table, DOCS)
    client.clear_table(table)
    client.create_table(table, client.create_type(schema, table, {"id": ["primary_key"]}))
    return RecordCodec(schema)


def records(start: int, count: int) -> list[dict[str, Any]]:
    return [
        {"id": i, "text": f"record {i} of the benchmark stream", "lang": "en", "score": i / 7}
        for i in range(start, start + count)
    ]


def insert_all(client: KineticaClient, table: str, codec: RecordCodec, total: int, batch: int) -> None:
    for start in range(0, total, batch):
        client.insert_records(table, records(start, min(batch, total - start)), codec)


# -- monitor throughput -----------------------------------------------------------------------------
class Gate:
    """An INSERT_DECODED callback that holds the first record until released, then counts."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.count = 0
        self.release = threading.Event()
        self.done = threading.Event()
        self.first_id: int | None = None

    def __call__(self, record: Any) -> None:
        if self.count == 0:
            self.first_id = record["id"]
            self.release.wait(WAIT)
        self.count += 1
        if self.count == self.expected:
            self.done.set()


class Probe:
    """A raw SUB socket on every topic: tells when the whole stream has been published."""

    def __init__(self, server: Server, frames_per_message: int) -> None:
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.SUB)
        self.socket.setsockopt(zmq.RCVHWM, 0)
        self.socket.setsockopt(zmq.SUBSCRIBE, b"")
        self.socket.connect(f"tcp://127.0.0.1:{server.zmq_port}")
        self.frames_per_message = frames_per_message

    def wait_for(self, messages: int) -> None:
        seen = 0
        while seen < messages:
            if not self.socket.poll(WAIT * 1000):
                raise TimeoutError("the stream was not published")
            if len(self.socket.recv_multipart()) == self.frames_per_message + 1:
                seen += 1

    def close(self) -> None:
        self.socket.close(0)
        self.context.term()


def official_monitor(server: Server, table: str, callback: Callable[[Any], None]) -> Any:
    """A started ``GPUdbTableMonitor.Client``; its constructor can hang in its ZMQ pre-flight
    (see ``tests/test_kinetica_conformance.py``), so it is built in a thread and retried."""
    from gpudb import GPUdb, GPUdbTableMonitor

    db = GPUdb(host=server.url, options=GPUdb.Options({"disable_failover": True}))
    options = GPUdbTableMonitor.Options(_dict={"monitor_port": server.zmq_port})
    callbacks = [GPUdbTableMonitor.Callback(GPUdbTableMonitor.Callback.Type.INSERT_DECODED, callback)]
    for _ in range(5):
        built: list[Any] = []
        thread = threading.Thread(target=_build_official, args=(built, db, table, callbacks, options), daemon=True)
        thread.start()
        thread.join(10)
        if built and not isinstance(built[0], Exception):
            built[0].logging_level = logging.WARNING  # it logs every message at INFO by default
            built[0].start_monitor()
            return built[0]
    raise RuntimeError("GPUdbTableMonitor.Client() hung five times")


def _build_official(built: list[Any], *args: Any) -> None:
    from gpudb import GPUdbTableMonitor

    try:
        built.append(GPUdbTableMonitor.Client(*args))
    except Exception as exc:  # its pre-flight sometimes misses the connect event: try again
        built.append(exc)


def stop_official(client: Any) -> None:
    for task in client.task_list:
        task.stop()
    client.stop_monitor()


def monitor_round(server: Server, system: str, sizes: Sizes, table: str) -> dict[str, Any]:
    client = KineticaClient(server.uri)
    codec = create_docs(client, table)
    gate = Gate(sizes.records)
    probe = Probe(server, sizes.batch)
    db = None
    monitor: Any
    try:
        if system == "reactive":
            db = reactive.connect(server.uri)
            callback = TableMonitor.Callback(TableMonitor.Callback.Type.INSERT_DECODED, gate)
            monitor = TableMonitor.Client(db, table, [callback])
            monitor.start_monitor()
        else:
            monitor = official_monitor(server, table, gate)
        published = time.perf_counter()
        insert_all(client, table, codec, sizes.records, sizes.batch)
        probe.wait_for(sizes.records // sizes.batch)
        published = time.perf_counter() - published
        started = time.perf_counter()
        gate.release.set()
        if not gate.done.wait(WAIT):
            raise RuntimeError(f"{system}: {gate.count} of {sizes.records} records arrived")
        seconds = time.perf_counter() - started
    finally:
        gate.release.set()
        if system == "reactive":
            monitor.stop_monitor()
            if db is not None:
                db.close()
        else:
            stop_official(monitor)
        probe.close()
        client.clear_table(table)
        client.close()
    return {"seconds": seconds, "records_per_s": sizes.records / seconds, "publish_seconds": published}


def monitor_throughput(server: Server, sizes: Sizes) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {"official": [], "reactive": []}
    for round_ in range(sizes.rounds):
        for system in runs:
            runs[system].append(monitor_round(server, system, sizes, f"stream_{system}_{round_}"))
    median = {s: statistics.median(r["records_per_s"] for r in rounds) for s, rounds in runs.items()}
    return {"runs": runs, "median_records_per_s": median, "ratio": median["reactive"] / median["official"]}


# -- latency ------------------------------------------------------------------------------------------
def latency_reactive(server: Server, sizes: Sizes, table: str) -> list[float]:
    client = KineticaClient(server.uri)
    codec = create_docs(client, table)
    stored: dict[Any, float] = {}
    with reactive.connect(server.uri) as db:
        db.add(Listener(Model("len", predict=lambda texts: [len(t) for t in texts]), "text", table), progress=False)
        original = db.writer.write

        def write(identifier: str, source: Any, batch: Any) -> list[Any]:
            result = original(identifier, source, batch)
            now = time.perf_counter()
            for source_id in batch.sources:
                stored.setdefault(source_id, now)
            return result

        db.writer.write = write  # type: ignore[method-assign]
        db.cdc.start()
        samples = paced_inserts(client, table, codec, sizes, stored)
        db.remove("len__text", drop_outputs=True)
    client.clear_table(table)
    client.close()
    return samples


def latency_official(server: Server, sizes: Sizes, table: str) -> list[float]:
    from gpudb import GPUdb, GPUdbRecordColumn, GPUdbRecordType, GPUdbTable

    client = KineticaClient(server.uri)
    codec = create_docs(client, table)
    gpudb = GPUdb(host=server.url, options=GPUdb.Options({"disable_failover": True}))
    columns = [
        GPUdbRecordColumn("source", GPUdbRecordColumn._ColumnType.LONG, ["primary_key"]),
        GPUdbRecordColumn("output", GPUdbRecordColumn._ColumnType.LONG),
    ]
    outputs = GPUdbTable(GPUdbRecordType(columns, label=f"{table}_out"), f"{table}_out", db=gpudb)
    stored: dict[Any, float] = {}

    def on_insert(record: Any) -> None:
        outputs.insert_records([[record["id"], len(record["text"])]], options={"update_on_existing_pk": "true"})
        stored.setdefault(record["id"], time.perf_counter())

    monitor = official_monitor(server, table, on_insert)
    try:
        return paced_inserts(client, table, codec, sizes, stored)
    finally:
        stop_official(monitor)
        client.clear_table(table)
        client.clear_table(f"{table}_out")
        client.close()


def paced_inserts(
    client: KineticaClient, table: str, codec: RecordCodec, sizes: Sizes, stored: dict[Any, float]
) -> list[float]:
    """Insert single records ``interval`` apart (start to start); latency of each once stored."""
    started: dict[int, float] = {}
    warmup = 5
    for i in range(warmup + sizes.latency_samples):
        begin = time.perf_counter()
        if i >= warmup:
            started[i] = begin
        client.insert_records(table, records(i, 1), codec)
        time.sleep(max(0.0, sizes.interval - (time.perf_counter() - begin)))  # pacing the writer, not a wait
    deadline = time.monotonic() + WAIT
    while not all(i in stored for i in started):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{sum(i in stored for i in started)} of {len(started)} outputs arrived")
        time.sleep(0.01)  # the writer polls its own result dict; nothing here paces the systems
    return [stored[i] - started[i] for i in started]


def latency(server: Server, sizes: Sizes) -> dict[str, Any]:
    samples: dict[str, list[float]] = {"raw loop": [], "reactive": []}
    for round_ in range(sizes.latency_rounds):
        samples["raw loop"] += latency_official(server, sizes, f"lat_official_{round_}")
        samples["reactive"] += latency_reactive(server, sizes, f"lat_reactive_{round_}")
    return {name: summarize_seconds(values) for name, values in samples.items()}


# -- reconciliation pass ------------------------------------------------------------------------------
def reconcile_pass(server: Server, rows: int, sizes: Sizes) -> dict[str, Any]:
    table = f"recon_{rows}"
    client = KineticaClient(server.uri)
    codec = create_docs(client, table)
    loaded = time.perf_counter()
    insert_all(client, table, codec, rows, 10_000)
    loaded = time.perf_counter() - loaded
    with reactive.connect(server.uri) as db:
        backfill = time.perf_counter()
        db.add(Listener(Model("len", predict=lambda texts: [len(t) for t in texts]), "text", table), progress=False)
        backfill = time.perf_counter() - backfill
        db.cdc.start()
        if not db.cdc.wait_idle(WAIT):
            raise RuntimeError("the first reconciliation did not finish")
        passes = []
        for n in range(sizes.passes):
            row = {"id": rows // 2 + n, "text": f"updated {n}", "lang": "en", "score": 0.0}
            started = time.perf_counter()
            client.insert_records(table, [row], codec, update_on_existing_pk=True)
            if not db.cdc.wait_idle(WAIT):
                raise RuntimeError("the reconciliation did not finish")
            passes.append(time.perf_counter() - started)
        outputs = {r["_source"]: r["_output"] for r in db.outputs("len__text")}
        assert len(outputs) == rows and outputs[rows // 2] == len("updated 0"), "outputs are not exact"
        reconciliations = db.cdc.info()["source"]["reconciliations"]
        db.remove("len__text", drop_outputs=True)
    scan = time.perf_counter()
    scanned = sum(len(page) for page in _key_pages(client, table, codec, 5_000))
    scan = time.perf_counter() - scan
    assert scanned == rows
    client.clear_table(table)
    client.close()
    median = statistics.median(passes)
    return {
        "rows": rows,
        "load_seconds": loaded,
        "backfill_seconds": backfill,
        "pass_seconds": passes,
        "median_pass_seconds": median,
        "scan_seconds": scan,
        "ratio_to_scan": median / scan,
        "reconciliations": reconciliations,
    }


def _key_pages(client: KineticaClient, table: str, codec: RecordCodec, size: int) -> Iterator[list[dict[str, Any]]]:
    last = None
    while True:
        expression = "" if last is None else f'"id" > {last}'
        page = client.get_records(table, codec, expression=expression, limit=size, sort_by="id").records
        if page:
            yield page
        if len(page) < size:
            return
        last = page[-1]["id"]


# -- report -------------------------------------------------------------------------------------------
def report(results: dict[str, Any]) -> str:
    lines = ["## Kinetica (test server as a separate process)", ""]
    if "monitor" in results:
        m = results["monitor"]
        lines += [
            "### Table monitor: decoded inserts per second (backlog drain)",
            "",
            markdown_table(
                ["system", "records/s (median)", "ratio"],
                [
                    ["official GPUdbTableMonitor.Client", f"{m['median_records_per_s']['official']:,.0f}", "1.00x"],
                    ["reactive.TableMonitor", f"{m['median_records_per_s']['reactive']:,.0f}", f"{m['ratio']:.2f}x"],
                ],
            ),
            "",
        ]
    if "latency" in results:
        lat = results["latency"]
        lines += [
            "### Insert-to-output latency of a Listener",
            "",
            markdown_table(
                ["system", "p50", "p90", "p99", "samples"],
                [
                    [name, f"{s['p50_ms']:.1f} ms", f"{s['p90_ms']:.1f} ms", f"{s['p99_ms']:.1f} ms", s["n"]]
                    for name, s in lat.items()
                ],
            ),
            "",
        ]
    if "reconcile" in results:
        lines += [
            "### One reconciliation pass after an update count",
            "",
            markdown_table(
                ["rows", "update -> output (median)", "ref: one keyset scan", "ratio", "backfill"],
                [
                    [
                        f"{r['rows']:,}",
                        f"{r['median_pass_seconds'] * 1000:,.0f} ms",
                        f"{r['scan_seconds'] * 1000:,.0f} ms",
                        f"{r['ratio_to_scan']:.2f}x",
                        f"{r['rows'] / r['backfill_seconds']:,.0f} rows/s",
                    ]
                    for r in results["reconcile"]
                ],
            ),
            "",
        ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Kinetica: reactive next to the official client")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument("--only", action="append", choices=("monitor", "latency", "reconcile"))
    args = parser.parse_args(argv)
    sizes = Sizes.quick() if args.quick else Sizes()
    wanted = args.only or ["monitor", "latency", "reconcile"]
    results: dict[str, Any] = {"machine": machine_info(), "sizes": dc.asdict(sizes)}
    started = time.perf_counter()
    with server_process() as server:
        if "monitor" in wanted:
            results["monitor"] = monitor_throughput(server, sizes)
        if "latency" in wanted:
            results["latency"] = latency(server, sizes)
        if "reconcile" in wanted:
            results["reconcile"] = [reconcile_pass(server, rows, sizes) for rows in sizes.reconcile_rows]
    print(report(results))
    partial = args.quick or args.only is not None
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / ("kinetica-partial.json" if partial else "kinetica.json")
    path.write_text(json.dumps(results, indent=2, default=str))
    print(f"<!-- results written to {path} ({time.perf_counter() - started:.0f} s) -->")


if __name__ == "__main__":
    main()

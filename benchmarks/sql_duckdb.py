"""DuckDB benchmarks: insert-to-output latency, bulk throughput, and the cost of one poll.

Every figure of ``reactive`` is measured next to a hand-written reference, in the same run,
on a fresh DuckDB file holding the same generated rows. Nothing here asserts a speed; the
only checks are for correctness (every row got its output).

The writer is always a *foreign client*: a plain ``duckdb.connect(path)`` connection in the
same process (DuckDB allows several connections to one file within a process, not across
processes). ``reactive`` runs with ``poll_interval=POLL_INTERVAL``; the references poll at
the same interval.

The reference is what a developer would write by hand (:class:`ReferenceLoop`): every
``POLL_INTERVAL`` seconds, ``SELECT id, text FROM docs WHERE id > <last id seen>``, run the
model, insert the outputs with one Arrow insert. It is insert-only: it never sees an update
or a delete, which ``reactive`` does. The throughput runs also have a second reference that
does see them, :class:`SnapshotLoop` (a keyed snapshot of row hashes, diffed and moved in the
same transaction as the outputs); the poll benchmark has a full-diff reference (``EXCEPT``
against a full copy of the table).
"""

from __future__ import annotations

import dataclasses as dc
import hashlib
import random
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

import reactive
from reactive.backends.base import OutputBatch
from reactive.backends.ibis.backend import IbisBackend
from reactive.backends.ibis.listener import READ_ROWS, IbisPollingListener
from reactive.components import Listener, Model
from reactive.queue import CDCQueue

from .common import interleaved, scratch_dir, summarize_seconds, timed

POLL_INTERVAL = 0.05
IDENTIFIER = "len__text"
OUTPUTS = f"_outputs__{IDENTIFIER}"
#: Longest wait for outputs to catch up before a run is reported as incomplete.
CATCH_UP_TIMEOUT = 600.0

SCHEMA = "CREATE TABLE docs (id BIGINT PRIMARY KEY, text VARCHAR, lang VARCHAR, score DOUBLE, views INTEGER)"
_GENERATE = """
INSERT INTO docs
SELECT i, 'document ' || i || ' about ' || md5(i::VARCHAR), ['en', 'de', 'fr'][1 + i % 3],
       (i % 1000) / 10.0, (i % 97)::INTEGER
FROM range(?, ?) t(i)
"""
_LANGS = ("en", "de", "fr")


@dc.dataclass(frozen=True)
class Sizes:
    """How big each benchmark is; ``quick()`` is a smoke run."""

    latency_inserts: int = 200
    latency_table_rows: tuple[int, ...] = (0, 100_000)
    bulk_rows: int = 100_000
    backfill_rows: int = 100_000
    poll_table_rows: tuple[int, ...] = (10_000, 100_000, 1_000_000)
    poll_repeat: int = 5
    snapshot_repeat: int = 3
    #: ``batch_rows`` and ``page_size`` of reactive's throughput runs (None: the defaults).
    window_rows: int | None = None
    #: Interleaved rounds of the throughput runs (each: bulk and its reference, then backfill
    #: and its reference); the report keeps the round of the median ratio, and every round.
    throughput_rounds: int = 1
    #: Threads of the process running Python through every benchmark, reactive's runs and the
    #: references' alike (``common.busy_python``): DuckDB's Python client takes the GIL back
    #: between the tasks of every statement, so they slow each one.
    busy_threads: int = 0

    @classmethod
    def quick(cls) -> Sizes:
        return cls(
            latency_inserts=30,
            latency_table_rows=(0, 10_000),
            bulk_rows=10_000,
            backfill_rows=10_000,
            poll_table_rows=(10_000, 100_000),
            poll_repeat=3,
            snapshot_repeat=1,
        )


# -- the model and the data ----------------------------------------------------------------
def trivial_predict(texts: list[str]) -> list[float]:
    """The model, for reactive and the references alike: the length of each text."""
    return [float(len(t)) for t in texts]


def make_model() -> Model:
    return Model("len", predict=trivial_predict)


def doc_row(i: int) -> tuple[Any, ...]:
    """Row ``i`` as the SQL generator (``_GENERATE``) makes it."""
    return (
        i,
        f"document {i} about {hashlib.md5(str(i).encode()).hexdigest()}",
        _LANGS[i % 3],
        (i % 1000) / 10.0,
        i % 97,
    )


def create_docs(path: Path, rows: int) -> duckdb.DuckDBPyConnection:
    """A new DuckDB file with ``docs`` holding rows ``0 .. rows-1``; the foreign client on it."""
    client = duckdb.connect(str(path))
    client.execute(SCHEMA)
    insert_docs(client, 0, rows)
    client.execute("CHECKPOINT")
    return client


def insert_docs(client: duckdb.DuckDBPyConnection, start: int, count: int) -> None:
    """Rows ``start .. start+count-1`` in one statement (one commit)."""
    if count:
        client.execute(_GENERATE, [start, start + count])


def uri_of(path: Path) -> str:
    return f"duckdb:///{path}"


def connect(path: Path, window_rows: int | None = None) -> reactive.Datalayer:
    windows = {} if window_rows is None else {"batch_rows": window_rows, "page_size": window_rows}
    return reactive.connect(uri_of(path), poll_interval=POLL_INTERVAL, **windows)


def record_output_times(db: reactive.Datalayer) -> dict[Any, float]:
    """Time (``perf_counter``) at which each source id's output was committed, filled as it happens.

    Wraps ``db.writer.write`` on this instance only: the time is taken right after
    the upsert returned, i.e. when any other connection can read the output. It is the same
    instant the reference records after its insert. Nothing polls the outputs table, so the
    measurement adds no load of its own.
    """
    written: dict[Any, float] = {}
    original = db.writer.write

    def write(identifier: str, source: Any, batch: OutputBatch) -> list[Any]:
        stored = original(identifier, source, batch)
        now = time.perf_counter()
        for source_id in batch.sources:
            written.setdefault(source_id, now)
        return stored

    db.writer.write = write  # type: ignore[method-assign]
    return written


def count_outputs(client: duckdb.DuckDBPyConnection, table: str) -> int:
    return int(client.execute(f'SELECT count(*) FROM "{table}"').fetchone()[0])


# -- the hand-written reference ------------------------------------------------------------
REFERENCE_OUTPUTS = "ref_out"


class ReferenceLoop(threading.Thread):
    """The polling loop a developer writes by hand, on its own DuckDB connection.

    Every ``interval`` seconds: ``SELECT id, text FROM docs WHERE id > last_seen ORDER BY id``,
    compute the model on every new row, insert the outputs with one Arrow insert, move the
    watermark. Insert-only: updates and deletes are never seen. ``written`` maps each id to
    the time its output was committed.
    """

    #: The table its outputs go to.
    OUTPUTS = REFERENCE_OUTPUTS

    def __init__(self, con: duckdb.DuckDBPyConnection, *, last_seen: int, interval: float = POLL_INTERVAL) -> None:
        super().__init__(name="bench-reference-loop", daemon=True)
        self.con = con
        self.last_seen = last_seen
        self.interval = interval
        self.written: dict[int, float] = {}
        self.polls = 0
        self._stop_event = threading.Event()
        self._progress = threading.Condition()

    @staticmethod
    def create_outputs(con: duckdb.DuckDBPyConnection) -> None:
        con.execute(f"CREATE TABLE {REFERENCE_OUTPUTS} (source BIGINT PRIMARY KEY, output DOUBLE)")

    @staticmethod
    def backfill(con: duckdb.DuckDBPyConnection) -> int:
        return reference_backfill(con)

    def poll_once(self) -> int:
        rows = self.con.execute("SELECT id, text FROM docs WHERE id > ? ORDER BY id", [self.last_seen]).fetchall()
        self.polls += 1
        if not rows:
            return 0
        ids = [r[0] for r in rows]
        outputs = trivial_predict([r[1] for r in rows])
        batch = pa.table({"source": pa.array(ids, pa.int64()), "output": pa.array(outputs, pa.float64())})
        self.con.from_arrow(batch).insert_into(REFERENCE_OUTPUTS)
        now = time.perf_counter()
        with self._progress:
            for i in ids:
                self.written[i] = now
            self._progress.notify_all()
        self.last_seen = ids[-1]
        return len(ids)

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.poll_once()
            self._stop_event.wait(self.interval)

    def wait_for(self, rows: int, timeout: float) -> bool:
        """Wait until ``rows`` outputs are written in total."""
        deadline = time.monotonic() + timeout
        with self._progress:
            while len(self.written) < rows:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._progress.wait(remaining)
        return True

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def reference_backfill(con: duckdb.DuckDBPyConnection) -> int:
    """The reference backfill: read every row, compute, insert every output in one statement."""
    rows = con.execute("SELECT id, text FROM docs ORDER BY id").fetchall()
    outputs = trivial_predict([r[1] for r in rows])
    batch = pa.table({"source": pa.array([r[0] for r in rows], pa.int64()), "output": pa.array(outputs)})
    con.from_arrow(batch).insert_into(REFERENCE_OUTPUTS)
    return len(rows)


# -- the reference that keeps a snapshot ---------------------------------------------------
SNAPSHOT_OUTPUTS = "snap_out"
SNAPSHOT_TABLE = "snap_rows"
_ROW_HASH = "hash(d.id, d.text, d.lang, d.score, d.views)"
#: One full outer join of the table's row hashes with the snapshot: every row inserted,
#: updated or deleted since, with its text and hash (``gone``: deleted).
_SNAPSHOT_DIFF = f"""
SELECT coalesce(d.id, s.id) AS id, d.text, {_ROW_HASH} AS fp, d.id IS NULL AS gone
FROM docs d FULL OUTER JOIN {SNAPSHOT_TABLE} s ON d.id = s.id
WHERE s.id IS NULL OR d.id IS NULL OR s.fp <> {_ROW_HASH}
"""


class SnapshotLoop(ReferenceLoop):
    """The floor of change capture by diffing, written by hand: the reference loop, but it sees
    updates and deletes, as reactive does on a table without a version column.

    Each poll is one full outer join of the table's row hashes (DuckDB's ``hash``) with a
    snapshot keyed by id (:data:`_SNAPSHOT_DIFF`), read as Arrow; the changed rows are computed,
    then in one transaction their outputs are upserted (``INSERT OR REPLACE``), the snapshot
    moved the same way, and deleted rows' outputs and snapshot rows removed. No input
    fingerprints, no window bound, no position beyond the snapshot, no lease, no per-row error
    isolation: what any capture by diff into keyed tables must do at least.
    """

    OUTPUTS = SNAPSHOT_OUTPUTS

    @staticmethod
    def create_outputs(con: duckdb.DuckDBPyConnection) -> None:
        con.execute(f"CREATE TABLE {SNAPSHOT_OUTPUTS} (source BIGINT PRIMARY KEY, output DOUBLE)")
        con.execute(f"CREATE TABLE {SNAPSHOT_TABLE} (id BIGINT PRIMARY KEY, fp UBIGINT)")

    @staticmethod
    def backfill(con: duckdb.DuckDBPyConnection) -> int:
        return snapshot_backfill(con)

    def poll_once(self) -> int:
        changed = self.con.execute(_SNAPSHOT_DIFF).fetch_arrow_table()
        self.polls += 1
        if not changed.num_rows:
            return 0
        gone = changed["gone"]
        rows, deleted = changed.filter(pc.invert(gone)), changed.filter(gone)
        con = self.con
        con.execute("BEGIN")
        _write_outputs(con, rows, "INSERT OR REPLACE")
        _from_view(con, rows.select(["id", "fp"]), f"INSERT OR REPLACE INTO {SNAPSHOT_TABLE} SELECT * FROM {{}}")
        if deleted.num_rows:
            gone_ids = deleted.select(["id"])
            _from_view(con, gone_ids, f"DELETE FROM {SNAPSHOT_OUTPUTS} WHERE source IN (SELECT id FROM {{}})")
            _from_view(con, gone_ids, f"DELETE FROM {SNAPSHOT_TABLE} WHERE id IN (SELECT id FROM {{}})")
        con.execute("COMMIT")
        now = time.perf_counter()
        ids = rows["id"].to_pylist()
        with self._progress:
            for i in ids:
                self.written[i] = now
            self._progress.notify_all()
        return changed.num_rows


def snapshot_backfill(con: duckdb.DuckDBPyConnection) -> int:
    """:class:`SnapshotLoop`'s backfill: the snapshot taken, every row read and computed, the
    outputs inserted, all in one transaction."""
    con.execute("BEGIN")
    con.execute(f"INSERT INTO {SNAPSHOT_TABLE} SELECT d.id, {_ROW_HASH} FROM docs d")
    rows = con.execute("SELECT id, text FROM docs").fetch_arrow_table()
    _write_outputs(con, rows, "INSERT")
    con.execute("COMMIT")
    return rows.num_rows


def _write_outputs(con: duckdb.DuckDBPyConnection, rows: pa.Table, verb: str) -> None:
    """Compute the model on ``rows`` (``id``, ``text``) and write the outputs with ``verb``."""
    outputs = pa.array(trivial_predict(rows["text"].to_pylist()), pa.float64())
    data = pa.table({"source": rows["id"], "output": outputs})
    _from_view(con, data, f"{verb} INTO {SNAPSHOT_OUTPUTS} SELECT * FROM {{}}")


def _from_view(con: duckdb.DuckDBPyConnection, data: pa.Table, sql: str) -> None:
    """Run ``sql`` with ``data`` registered as the view its ``{}`` names, then unregister it."""
    con.register("snap_view", data)
    try:
        con.execute(sql.format("snap_view"))
    finally:
        con.unregister("snap_view")


# -- latency -------------------------------------------------------------------------------
def insert_gaps(count: int, seed: int = 7) -> list[float]:
    """Pauses between the timed inserts: uniform in [0.5, 1.5] x the poll interval.

    Jitter keeps inserts from locking onto the poll's phase (with a fixed gap equal to the
    poll interval, every insert would wait the same, arbitrary, part of a poll period).
    The same seed gives reactive and the reference the same schedule.
    """
    rng = random.Random(seed)
    return [POLL_INTERVAL * rng.uniform(0.5, 1.5) for _ in range(count)]


def drive_inserts(client: duckdb.DuckDBPyConnection, first_id: int, gaps: Sequence[float]) -> dict[int, float]:
    """Insert one row at a time (each its own commit); the time each INSERT returned, by id."""
    committed: dict[int, float] = {}
    for n, gap in enumerate(gaps):
        row = doc_row(first_id + n)
        client.execute("INSERT INTO docs VALUES (?, ?, ?, ?, ?)", row)
        committed[row[0]] = time.perf_counter()
        time.sleep(gap)
    return committed


def _latencies(committed: dict[int, float], visible: dict[Any, float]) -> tuple[list[float], int]:
    values = [visible[i] - t for i, t in committed.items() if i in visible]
    return values, len(committed) - len(values)


class _Polls:
    """Polls completed while the timed inserts ran, and so the mean poll cycle."""

    def __init__(self, count: Callable[[], int]) -> None:
        self.count = count
        self.started, self.first = time.perf_counter(), count()
        self.seconds, self.polls = 0.0, 0

    def stop(self) -> None:
        self.seconds, self.polls = time.perf_counter() - self.started, self.count() - self.first

    def figures(self) -> dict[str, Any]:
        cycle = self.seconds / self.polls if self.polls else None
        return {
            "insert_phase_seconds": self.seconds,
            "polls_during_inserts": self.polls,
            "mean_poll_cycle_seconds": cycle,
        }


def latency_reactive(workdir: Path, table_rows: int, gaps: Sequence[float]) -> dict[str, Any]:
    path = workdir / "latency-reactive.duckdb"
    client = create_docs(path, table_rows)
    try:
        with connect(path) as db:
            db.add(Listener(make_model(), "text", "docs"), progress=False)
            visible = record_output_times(db)
            db.cdc.start()
            db.cdc.wait_idle(timeout=CATCH_UP_TIMEOUT)
            polls = _Polls(lambda: db.cdc.info()["source"]["polls"])
            committed = drive_inserts(client, table_rows, gaps)
            polls.stop()
            caught_up = db.cdc.wait_idle(timeout=CATCH_UP_TIMEOUT)
            db.cdc.stop()
        latencies, missing = _latencies(committed, visible)
        return {**summarize_seconds(latencies), "missing": missing, "caught_up": caught_up, **polls.figures()}
    finally:
        client.close()


def latency_reference(workdir: Path, table_rows: int, gaps: Sequence[float]) -> dict[str, Any]:
    path = workdir / "latency-reference.duckdb"
    client = create_docs(path, table_rows)
    try:
        ReferenceLoop.create_outputs(client)
        reference_backfill(client)
        loop = ReferenceLoop(client.cursor(), last_seen=table_rows - 1)
        loop.start()
        try:
            polls = _Polls(lambda: loop.polls)
            committed = drive_inserts(client, table_rows, gaps)
            polls.stop()
            caught_up = loop.wait_for(len(committed), CATCH_UP_TIMEOUT)
        finally:
            loop.stop()
        latencies, missing = _latencies(committed, loop.written)
        return {**summarize_seconds(latencies), "missing": missing, "caught_up": caught_up, **polls.figures()}
    finally:
        client.close()


def bench_latency(sizes: Sizes) -> list[dict[str, Any]]:
    """Insert-to-output latency at light load: single-row inserts ~``POLL_INTERVAL`` apart.

    Latency of a row = the time its output was committed (see :func:`record_output_times`)
    minus the time its ``INSERT`` returned in the foreign client. Run on a table that holds
    ``table_rows`` rows before the timed inserts, since reactive's poll scans the whole table.
    """
    results = []
    gaps = insert_gaps(sizes.latency_inserts)
    for table_rows in sizes.latency_table_rows:
        with scratch_dir() as workdir:
            ours = latency_reactive(workdir, table_rows, gaps)
            ref = latency_reference(workdir, table_rows, gaps)
        results.append({"table_rows": table_rows, "inserts": len(gaps), "reactive": ours, "reference": ref})
    return results


# -- throughput ----------------------------------------------------------------------------
def bulk_reactive(workdir: Path, rows: int, window_rows: int | None = None) -> dict[str, Any]:
    path = workdir / "bulk-reactive.duckdb"
    client = create_docs(path, 0)
    try:
        with connect(path, window_rows) as db:
            db.add(Listener(make_model(), "text", "docs"), progress=False)
            visible = record_output_times(db)
            db.cdc.start()
            db.cdc.wait_idle(timeout=CATCH_UP_TIMEOUT)
            insert_docs(client, 0, rows)
            committed = time.perf_counter()
            caught_up = db.cdc.wait_idle(timeout=CATCH_UP_TIMEOUT)
            idle = time.perf_counter()
            info = db.cdc.info()
            db.cdc.stop()
        outputs = count_outputs(client, OUTPUTS)
        seconds = max(visible.values()) - committed if visible else float("nan")
        return {
            "rows": rows,
            "seconds": seconds,
            "rows_per_second": rows / seconds,
            "seconds_until_wait_idle_returned": idle - committed,
            "outputs": outputs,
            "caught_up": caught_up,
            "handler_batches": info["listeners"][IDENTIFIER]["batches"],
            "producer_blocked_seconds": info["queue"]["producer_blocked_seconds"],
        }
    finally:
        client.close()


def bulk_reference(workdir: Path, rows: int, kind: type[ReferenceLoop] = ReferenceLoop) -> dict[str, Any]:
    """The bulk run of a hand-written loop: :class:`ReferenceLoop`, or ``kind``."""
    path = workdir / f"bulk-{kind.__name__}.duckdb"
    client = create_docs(path, 0)
    try:
        kind.create_outputs(client)
        loop = kind(client.cursor(), last_seen=-1)
        loop.start()
        try:
            insert_docs(client, 0, rows)
            committed = time.perf_counter()
            caught_up = loop.wait_for(rows, CATCH_UP_TIMEOUT)
        finally:
            loop.stop()
        seconds = max(loop.written.values()) - committed
        return {
            "rows": rows,
            "seconds": seconds,
            "rows_per_second": rows / seconds,
            "outputs": count_outputs(client, kind.OUTPUTS),
            "caught_up": caught_up,
        }
    finally:
        client.close()


def backfill_reactive(workdir: Path, rows: int, window_rows: int | None = None) -> dict[str, Any]:
    path = workdir / "backfill-reactive.duckdb"
    client = create_docs(path, rows)
    try:
        with connect(path, window_rows) as db:
            seconds, _ = timed(lambda: db.add(Listener(make_model(), "text", "docs"), progress=False))
            db.cdc.stop()
        outputs = count_outputs(client, OUTPUTS)
        return {"rows": rows, "seconds": seconds, "rows_per_second": rows / seconds, "outputs": outputs}
    finally:
        client.close()


def backfill_reference(workdir: Path, rows: int, kind: type[ReferenceLoop] = ReferenceLoop) -> dict[str, Any]:
    """The backfill of a hand-written loop: :class:`ReferenceLoop`'s, or ``kind``'s."""
    path = workdir / f"backfill-{kind.__name__}.duckdb"
    client = create_docs(path, rows)
    try:
        kind.create_outputs(client)
        seconds, _ = timed(lambda: kind.backfill(client))
        outputs = count_outputs(client, kind.OUTPUTS)
        return {"rows": rows, "seconds": seconds, "rows_per_second": rows / seconds, "outputs": outputs}
    finally:
        client.close()


def bench_throughput(sizes: Sizes) -> dict[str, Any]:
    """Rows per second, bulk and backfill.

    *Bulk*: with change capture running and idle, the foreign client inserts ``bulk_rows``
    rows in one statement; throughput = rows / (time the last output was committed - time the
    INSERT returned). The reference loop consumes the same insert.

    *Backfill*: ``db.add`` on a table already holding ``backfill_rows`` rows (snapshot, scan,
    compute, write), against reading every row, computing, and one Arrow insert.

    Both also run :class:`SnapshotLoop` (``snapshot``): the same by hand with a keyed snapshot
    of row hashes, as any capture that sees updates and deletes by diffing must keep.

    With ``throughput_rounds`` > 1 the rounds interleave, and ``bulk`` and ``backfill`` are the
    rounds of the median ratio (reference seconds over reactive seconds); ``rounds`` has them all.
    """
    rounds: list[dict[str, dict[str, Any]]] = []
    for _ in range(sizes.throughput_rounds):
        with scratch_dir() as workdir:
            bulk = {
                "reactive": bulk_reactive(workdir, sizes.bulk_rows, sizes.window_rows),
                "reference": bulk_reference(workdir, sizes.bulk_rows),
                "snapshot": bulk_reference(workdir, sizes.bulk_rows, SnapshotLoop),
            }
            backfill = {
                "reactive": backfill_reactive(workdir, sizes.backfill_rows, sizes.window_rows),
                "reference": backfill_reference(workdir, sizes.backfill_rows),
                "snapshot": backfill_reference(workdir, sizes.backfill_rows, SnapshotLoop),
            }
        for result in (bulk, backfill):
            for side in result.values():
                if side["outputs"] != side["rows"]:
                    raise RuntimeError(f"throughput run wrote {side['outputs']} outputs for {side['rows']} rows")
        rounds.append({"bulk": bulk, "backfill": backfill})
    report: dict[str, Any] = {key: median_round([r[key] for r in rounds]) for key in ("bulk", "backfill")}
    if len(rounds) > 1:
        report["rounds"] = rounds
    return report


def throughput_ratio(result: dict[str, Any]) -> float:
    """How fast reactive ran beside the reference: reference seconds over reactive seconds."""
    return float(result["reference"]["seconds"] / result["reactive"]["seconds"])


def median_round(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The result of the median ratio (the lower middle one of an even count).

    >>> median_round([{"reactive": {"seconds": s}, "reference": {"seconds": 1.0}} for s in (2.0, 4.0, 3.0)])
    {'reactive': {'seconds': 3.0}, 'reference': {'seconds': 1.0}}
    """
    ranked = sorted(results, key=throughput_ratio)
    return ranked[(len(ranked) - 1) // 2]


# -- poll cost -----------------------------------------------------------------------------
FULL_DIFF_CHANGED = "SELECT * FROM docs EXCEPT SELECT * FROM ref_copy"
FULL_DIFF_DELETED = "SELECT c.id FROM ref_copy c WHERE NOT EXISTS (SELECT 1 FROM docs d WHERE d.id = c.id)"


class PollProbe:
    """Times one poll of ``docs`` by reactive and by the two references, without threads.

    ``reactive_poll`` is :meth:`IbisPollingListener._poll`, exactly what the listener thread
    runs per table and cycle: the diff query with the changed rows and their fingerprints,
    streamed, and queueing them in packets. The queue is drained and the packets released
    after each call, so the snapshot never moves and every repetition sees the same changes.
    ``reactive_diff`` is that statement alone, read to the end (``backend.snapshots.changed``).
    """

    def __init__(self, path: Path, client: duckdb.DuckDBPyConnection) -> None:
        self.client = client
        self.backend = IbisBackend.from_uri(uri_of(path))
        self.table = self.backend.source.describe("docs")
        self.queue = CDCQueue(max_rows=10**12)
        self.listener = IbisPollingListener(self.backend.snapshots, self.queue, poll_interval=POLL_INTERVAL)
        self.watermark = self.max_id()

    def close(self) -> None:
        self.backend.close()

    def create_snapshot(self) -> None:
        self.backend.snapshots.drop("docs")
        self.backend.snapshots.ensure(self.table)

    def max_id(self) -> int:
        """The watermark reference's only setup: where to start."""
        return int(self.client.execute("SELECT max(id) FROM docs").fetchone()[0])

    def create_reference_copy(self) -> None:
        self.client.execute("CREATE OR REPLACE TABLE ref_copy AS SELECT * FROM docs")

    def reactive_poll(self) -> int:
        self.listener._poll(self.table)
        return self.queue.rows

    def drain(self) -> None:
        packets = self.queue.get_batch(max_rows=10**12, timeout=0)
        self.queue.task_done(len(packets))
        self.listener.release([p.position for p in packets])

    def reactive_diff(self) -> int:
        return sum(len(part.ids) for part in self.backend.snapshots.changed(self.table, READ_ROWS))

    def watermark_query(self) -> int:
        query = "SELECT id, text, lang, score, views FROM docs WHERE id > ? ORDER BY id"
        return len(self.client.execute(query, [self.watermark]).fetchall())

    def full_diff(self) -> int:
        changed = self.client.execute(FULL_DIFF_CHANGED).fetchall()
        deleted = self.client.execute(FULL_DIFF_DELETED).fetchall()
        return len(changed) + len(deleted)

    def measure(self, repeat: int) -> dict[str, Any]:
        """Each way of polling timed round-robin: median seconds, every timing, rows found."""
        calls = {
            "reactive_poll": self.reactive_poll,
            "reactive_diff": self.reactive_diff,
            "watermark": self.watermark_query,
            "full_diff": self.full_diff,
        }
        return _figures(interleaved(calls, repeat=repeat, reset={"reactive_poll": self.drain}))


def _figures(timings: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {
        name: {"seconds": t["seconds"], "timings": t["timings"], "found": t["result"]} for name, t in timings.items()
    }


def poll_cost(workdir: Path, rows: int, sizes: Sizes) -> dict[str, Any]:
    path = workdir / f"poll-{rows}.duckdb"
    client = create_docs(path, rows)
    probe = PollProbe(path, client)
    try:
        setup = {
            "reactive_snapshot": probe.create_snapshot,
            "reference_copy": probe.create_reference_copy,
            "watermark_max_id": probe.max_id,
        }
        result: dict[str, Any] = {
            "rows": rows,
            "setup": _figures(interleaved(setup, repeat=sizes.snapshot_repeat, warmup=0)),
        }
        changed = max(1, rows // 100)
        result["idle"] = probe.measure(sizes.poll_repeat)
        # 1% new rows, then removed again: the table is back to its snapshotted state.
        insert_docs(client, rows, changed)
        result["inserted_1pct"] = {"changed": changed, **probe.measure(sizes.poll_repeat)}
        client.execute("DELETE FROM docs WHERE id >= ?", [rows])
        client.execute("UPDATE docs SET text = text || ' (edited)' WHERE id % 100 = 0")
        result["updated_1pct"] = {"changed": (rows + 99) // 100, **probe.measure(sizes.poll_repeat)}
        return result
    finally:
        probe.close()
        client.close()


def bench_poll(sizes: Sizes) -> list[dict[str, Any]]:
    """Cost of one poll at each table size: idle, with 1% of rows inserted, with 1% updated.

    Reactive: the listener's poll (full outer join of in-database row fingerprints against
    the snapshot table that streams the changed rows). References on the same table: the
    insert-only watermark query (``id > max seen``; sees no update or delete) and a full diff
    that sees everything (``EXCEPT`` against a full copy of the table, plus an anti-join for
    deletes). Medians of ``poll_repeat`` calls after one warm-up. Snapshot creation is the
    part of the first ``db.add`` that records every row's fingerprint; its reference is
    copying the table.
    """
    results = []
    for rows in sizes.poll_table_rows:
        with scratch_dir() as workdir:
            results.append(poll_cost(workdir, rows, sizes))
    return results

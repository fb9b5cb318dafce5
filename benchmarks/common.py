"""Helpers shared by the benchmarks: statistics, timing, the machine's description, Markdown."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation between order statistics.

    The same definition as numpy's default (``method="linear"``).

    >>> percentile([1.0, 2.0, 3.0, 4.0], 50)
    2.5
    >>> percentile([5.0], 99)
    5.0
    """
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarize_seconds(values: Sequence[float]) -> dict[str, float | int]:
    """Latency figures in milliseconds: p50, p90, p99, mean, min, max and the sample count."""
    ms = [v * 1000.0 for v in values]
    return {
        "n": len(ms),
        "p50_ms": percentile(ms, 50),
        "p90_ms": percentile(ms, 90),
        "p99_ms": percentile(ms, 99),
        "mean_ms": statistics.fmean(ms),
        "min_ms": min(ms),
        "max_ms": max(ms),
    }


def timed(fn: Callable[[], T]) -> tuple[float, T]:
    """Seconds ``fn()`` took (wall clock, ``perf_counter``), and what it returned."""
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


def interleaved(
    calls: Mapping[str, Callable[[], Any]],
    *,
    repeat: int,
    warmup: int = 1,
    reset: Mapping[str, Callable[[], Any]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Time several calls round-robin, so that they share whatever load the machine has.

    Each round runs every call once, in order (``reset[name]`` untimed after its call);
    ``warmup`` rounds are not timed. Per call: the median seconds, every timing, and the
    last result.
    """
    reset = reset or {}
    timings: dict[str, list[float]] = {name: [] for name in calls}
    results: dict[str, Any] = {}
    for round_ in range(warmup + repeat):
        for name, fn in calls.items():
            seconds, results[name] = timed(fn)
            if name in reset:
                reset[name]()
            if round_ >= warmup:
                timings[name].append(seconds)
    return {
        name: {"seconds": statistics.median(timings[name]), "timings": timings[name], "result": results[name]}
        for name in calls
    }


@contextlib.contextmanager
def busy_python(threads: int) -> Iterator[None]:
    """``threads`` threads of this process running Python the whole time (an application's own
    work beside reactive's: request handlers, parsing, a model's Python), stopped afterwards."""
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            sum(range(100))

    running = [threading.Thread(target=spin, name=f"busy-python-{i}", daemon=True) for i in range(threads)]
    for thread in running:
        thread.start()
    try:
        yield
    finally:
        stop.set()
        for thread in running:
            thread.join()


@contextlib.contextmanager
def scratch_dir(prefix: str = "reactive-bench-") -> Iterator[Path]:
    """A temporary directory, removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_bytes() -> int | None:
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    """What the figures were measured on: CPU, cores, RAM, OS and library versions."""
    ram = _ram_bytes()
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "ram_gb": round(ram / 2**30, 1) if ram else None,
        "os": platform.platform(),
        "python": platform.python_version(),
        "reactive": _version("reactive-ml"),
        "duckdb": _version("duckdb"),
        "ibis": _version("ibis-framework"),
        "pyarrow": _version("pyarrow"),
        "sqlglot": _version("sqlglot"),
        "load_average": load_average(),
        "commit": git_commit(),
    }


def git_commit() -> str | None:
    """The commit of the measured working tree (read-only ``git rev-parse``), if known."""
    try:
        found = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return found.stdout.strip() or None


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages: other work on the machine skews every figure."""
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def machine_markdown(info: dict[str, Any]) -> str:
    cores = info["cores"] if info["cores"] == info["cores_usable"] else f"{info['cores_usable']} of {info['cores']}"
    return (
        f"Machine: {info['cpu']}, {cores} cores, {info['ram_gb']} GB RAM, {info['os']}  \n"
        f"Python {info['python']}, reactive {info['reactive']}, duckdb {info['duckdb']}, ibis {info['ibis']}, "
        f"pyarrow {info['pyarrow']}, sqlglot {info['sqlglot']}  \n"
        f"Load average at start (1/5/15 min): {info['load_average']}"
    )


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table; numbers right-aligned.

    >>> print(markdown_table(["a", "b"], [["x", 1]]))
    | a | b |
    | --- | ---: |
    | x | 1 |
    """
    numeric = [all(isinstance(r[i], int | float) for r in rows) and bool(rows) for i in range(len(headers))]
    lines = [
        "| " + " | ".join(headers) + " |",
        "| " + " | ".join("---:" if n else "---" for n in numeric) + " |",
    ]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def ms(seconds: float | None) -> str:
    """Seconds as a readable millisecond figure."""
    if seconds is None:
        return "n/a"
    value = seconds * 1000.0
    return f"{value:.2f} ms" if value < 10 else f"{value:.1f} ms" if value < 100 else f"{value:,.0f} ms"


def rate(rows: int, seconds: float) -> str:
    return f"{rows / seconds:,.0f} rows/s" if seconds > 0 else "n/a"


def slower(ours: float, reference: float) -> str:
    """How many times slower reactive is than the reference, from two durations.

    >>> slower(0.3, 0.1), slower(2.0, 0.1)
    ('3.00x', '20x')
    """
    if not reference > 0:
        return "n/a"
    factor = ours / reference
    return f"{factor:.2f}x" if factor < 10 else f"{factor:.0f}x"


RESULTS = Path(__file__).parent / "results"


def write_results(name: str, figures: Mapping[str, Any]) -> Path:
    """Write ``figures`` to ``results/<name>.json``, with when and on what machine they were
    measured (``figures`` may give its own ``machine``, e.g. described before the run)."""
    import datetime as _dt
    import json

    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"when": _dt.datetime.now(_dt.UTC).isoformat(), "machine": machine_info(), **figures}
    path.write_text(json.dumps(payload, indent=2, default=str))
    return path

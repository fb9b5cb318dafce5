"""Peak memory of a large live burst (``python -m benchmarks.memory [--rows N]``).

A DuckDB file with a followed table and a trivial model (``len(text)``, batch 1,024);
another client inserts ``--rows`` rows (default 1,000,000) in one statement, and the change
is followed until ``wait_idle()``. A thread samples the process's resident memory (VmRSS)
every 20 ms; the figure is the peak over the idle process (after ``db.cdc.start()``, before
the insert). The goal of issue 9 is 300 MB or less for 1M rows.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

from .common import machine_info, machine_markdown, write_results


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    rows = 100_000 if args.quick else args.rows

    import duckdb

    import reactive
    from reactive.components import Listener, Model

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "burst.duckdb"
        client = duckdb.connect(str(path))
        client.execute("CREATE TABLE docs (id BIGINT PRIMARY KEY, text VARCHAR)")
        peak = [0.0]
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], rss_mb())
                stop.wait(0.02)

        with reactive.connect(f"duckdb:///{path}", poll_interval=0.05) as db:
            model = Model("len", predict=lambda texts: [len(t) for t in texts], batch_size=1024)
            db.add(Listener(model, "text", "docs"), progress=False)
            db.cdc.start()
            assert db.cdc.wait_idle(timeout=60)
            idle = rss_mb()
            sampler = threading.Thread(target=sample, name="rss-sampler")
            sampler.start()
            started = time.perf_counter()
            client.execute(f"INSERT INTO docs SELECT i, 'text number ' || i FROM range({rows}) t(i)")
            assert db.cdc.wait_idle(timeout=3600)
            seconds = time.perf_counter() - started
            stop.set()
            sampler.join()
            assert len(db.outputs("len__text")) == rows
        client.close()
    result = {
        "rows": rows,
        "idle_mb": round(idle, 1),
        "peak_mb": round(peak[0], 1),
        "over_idle_mb": round(peak[0] - idle, 1),
        "rows_per_second": rows / seconds,
    }
    print(machine_markdown(machine_info()))
    print(
        f"{rows:,} rows inserted in one statement, followed at {result['rows_per_second']:,.0f} rows/s: "
        f"peak RSS {result['peak_mb']:.0f} MB, {result['over_idle_mb']:.0f} MB over the idle process"
    )
    if not args.quick:
        write_results("memory", result)


if __name__ == "__main__":
    main()

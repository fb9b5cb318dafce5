"""The write path of an embedding refresh: how fast can a model's vectors land? (``python -m benchmarks.vector_writes``)

A stand-in for a model on a fast GPU: ``predict`` returns precomputed 384-float float32
vectors (a dict lookup, no compute), so what is measured is everything ``reactive`` does
around the model: reading rows, fingerprints, lookups, checking the vectors, writing them
and the positions. Interleaved rounds on a DuckDB file, ``Model(batch_size=1024)``:

- the reference: a bare bulk insert of the same vectors into a table of the same shape
  (``FLOAT[]``), 1,024 rows per statement, from one numpy block through Arrow;
- ``db.add`` of a Listener on a table holding the texts (the backfill: wall time until it
  returns);
- live: the texts inserted into the followed table in one statement, from insert to
  ``wait_idle()``.

The GPU benchmark (``benchmarks/gpu_embedding.py``) measures the same with the real model.
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
from .embedding import texts

DIM = 384
BATCH = 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    rows, rounds = (5_000, 1) if args.quick else (args.rows, args.rounds)

    import duckdb
    import numpy as np
    import pyarrow as pa

    import reactive
    from reactive.components import Listener, Model

    data = [f"{i} {t}" for i, t in enumerate(texts(rows))]  # unique texts
    block = np.random.default_rng(3).standard_normal((rows, DIM), dtype=np.float32)
    vectors = {text: block[i] for i, text in enumerate(data)}

    def lookup(batch: list[str]) -> list[Any]:
        return [vectors[t] for t in batch]

    def docs(path: Path) -> None:
        with duckdb.connect(str(path)) as client:
            client.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text VARCHAR)")
            client.register("source", pa.table({"id": list(range(rows)), "text": data}))
            client.execute("INSERT INTO docs SELECT * FROM source")

    figures: dict[str, list[float]] = {"bulk_insert": [], "backfill": [], "live": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            path = Path(tmp) / f"bulk{r}.duckdb"
            with duckdb.connect(str(path)) as client:
                client.execute("CREATE TABLE out (_source BIGINT PRIMARY KEY, _output FLOAT[], _fingerprint BIGINT)")
                started = time.perf_counter()
                for start in range(0, rows, BATCH):
                    part = block[start : start + BATCH]
                    ids = np.arange(start, start + len(part), dtype=np.int64)
                    column = pa.FixedSizeListArray.from_arrays(pa.array(part.ravel()), DIM).cast(pa.list_(pa.float32()))
                    client.register("part", pa.table({"_source": ids, "_output": column, "_fingerprint": ids}))
                    client.execute("INSERT INTO out SELECT * FROM part")
                    client.unregister("part")
                figures["bulk_insert"].append(time.perf_counter() - started)

            path = Path(tmp) / f"backfill{r}.duckdb"
            docs(path)
            with reactive.connect(f"duckdb:///{path}") as db:
                started = time.perf_counter()
                db.add(Listener(Model("vec", predict=lookup, batch_size=BATCH), "text", "docs"), progress=False)
                figures["backfill"].append(time.perf_counter() - started)
                assert len(db.outputs("vec__text")) == rows

            path = Path(tmp) / f"live{r}.duckdb"
            client = duckdb.connect(str(path))
            client.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text VARCHAR)")
            with reactive.connect(f"duckdb:///{path}", poll_interval=0.05) as db:
                db.add(Listener(Model("vec", predict=lookup, batch_size=BATCH), "text", "docs"), progress=False)
                db.cdc.start()
                client.register("source", pa.table({"id": list(range(rows)), "text": data}))
                started = time.perf_counter()
                client.execute("INSERT INTO docs SELECT * FROM source")
                assert db.cdc.wait_idle(timeout=3600)
                figures["live"].append(time.perf_counter() - started)
                assert len(db.outputs("vec__text")) == rows
            client.close()
            print(json.dumps({k: round(v[-1], 3) for k, v in figures.items()}), flush=True)

    median = {k: statistics.median(v) for k, v in figures.items()}
    rate = {k: rows / v for k, v in median.items()}
    table = markdown_table(
        ["figure", "rows/s", "vs the bare bulk insert"],
        [[k, f"{rate[k]:,.0f}", f"{rate[k] / rate['bulk_insert']:.2f}x"] for k in figures],
    )
    print(machine_markdown(machine_info()))
    print(f"{rows:,} vectors of {DIM} float32, batches of {BATCH}, median of {rounds} interleaved rounds")
    print(table)
    if not args.quick:
        write_results("vector_writes", {"rows": rows, "rounds": figures, "rows_per_second": rate})


if __name__ == "__main__":
    main()

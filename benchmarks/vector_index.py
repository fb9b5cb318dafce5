"""Search over fresh embeddings: recall, speed, build, insert-to-searchable (``python -m benchmarks.vector_index``).

``--rows`` vectors of 384 float32 (default 100,000), drawn around 1,000 random centres (as
sentence embeddings cluster by topic) and normalized; 1,000 queries drawn the same way. The
reference is exact search with numpy (one matrix product per query batch), which gives the
true 10 nearest of each query. Measured for usearch (what ``VectorIndex`` uses) and for
faiss's HNSW (``IndexHNSWFlat``, the alternative considered), with the same graph degree (16)
and search breadth (64):

- build time (all vectors added in one call, every core);
- recall@10 against the exact answer;
- one query at a time on one thread: queries per second, p50 and p99 latency;
- through ``reactive``: a row inserted into a followed DuckDB table by another client, until a
  search for its vector returns it (``poll_interval=0.05``, the embedding a lookup).

faiss is imported only here (``pip install faiss-cpu``); without it its rows are left out.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from .common import machine_info, machine_markdown, markdown_table, summarize_seconds, write_results

DIM = 384
K = 10


def clustered(n: int, rng: np.random.Generator, centres: np.ndarray) -> np.ndarray:
    picks = rng.integers(0, len(centres), n)
    vectors = centres[picks] + rng.standard_normal((n, DIM), dtype=np.float32) * 0.35
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def exact(data: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """The true ``K`` nearest by cosine distance (vectors are normalized: largest dot product)."""
    answers = []
    for start in range(0, len(queries), 100):
        scores = queries[start : start + 100] @ data.T
        top = np.argpartition(-scores, K, axis=1)[:, :K]
        order = np.take_along_axis(scores, top, axis=1).argsort(axis=1)[:, ::-1]
        answers.append(np.take_along_axis(top, order, axis=1))
    return np.concatenate(answers)


def recall(found: list[list[int]], truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t.tolist())) / K for f, t in zip(found, truth, strict=True)]))


def one_at_a_time(search: Any, queries: np.ndarray) -> tuple[list[list[int]], list[float]]:
    found, seconds = [], []
    for query in queries:
        started = time.perf_counter()
        keys = search(query)
        seconds.append(time.perf_counter() - started)
        found.append([int(k) for k in keys])
    return found, seconds


def measure_usearch(data: np.ndarray, queries: np.ndarray, truth: np.ndarray) -> dict[str, Any]:
    from usearch.index import Index

    index = Index(ndim=DIM, metric="cos", dtype="f32", connectivity=16, expansion_add=128, expansion_search=64)
    started = time.perf_counter()
    index.add(np.arange(len(data), dtype=np.uint64), data)
    build = time.perf_counter() - started
    found, seconds = one_at_a_time(lambda q: index.search(q, K, threads=1).keys, queries)
    return {"build_s": build, "recall": recall(found, truth), "latency": summarize_seconds(seconds)}


def measure_faiss(data: np.ndarray, queries: np.ndarray, truth: np.ndarray) -> dict[str, Any] | None:
    try:
        import faiss
    except ImportError:
        return None
    index = faiss.IndexHNSWFlat(DIM, 16, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = 128
    started = time.perf_counter()
    index.add(data)
    build = time.perf_counter() - started
    index.hnsw.efSearch = 64
    faiss.omp_set_num_threads(1)
    found, seconds = one_at_a_time(lambda q: index.search(q[None, :], K)[1][0], queries)
    faiss.omp_set_num_threads(0)
    return {"build_s": build, "recall": recall(found, truth), "latency": summarize_seconds(seconds)}


def measure_numpy(data: np.ndarray, queries: np.ndarray) -> dict[str, Any]:
    def search(query: np.ndarray) -> np.ndarray:
        scores = data @ query
        top = np.argpartition(-scores, K)[:K]
        return top[np.argsort(-scores[top])]

    _, seconds = one_at_a_time(search, queries[:200])
    return {"build_s": 0.0, "recall": 1.0, "latency": summarize_seconds(seconds)}


def insert_to_searchable(rounds: int) -> dict[str, Any]:
    """A row inserted by another client, until ``db.search`` returns it (DuckDB, 50 ms polls)."""
    import duckdb

    import reactive
    from reactive.components import Listener, Model, VectorIndex

    rng = np.random.default_rng(11)
    centres = rng.standard_normal((100, DIM), dtype=np.float32)
    vectors = {f"t{i}": v for i, v in enumerate(clustered(2_000 + rounds, rng, centres))}
    seconds = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "app.duckdb"
        client = duckdb.connect(str(path))
        client.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text VARCHAR)")
        client.executemany("INSERT INTO docs VALUES (?, ?)", [(i, f"t{i}") for i in range(2_000)])
        model = Model("vec", predict=lambda texts: [vectors[t] for t in texts], output_type="array<float32>")
        with reactive.connect(f"duckdb:///{path}", poll_interval=0.05) as db:
            db.add(Listener(model, "text", "docs"), progress=False)
            db.add(VectorIndex("near", listener="vec__text", directory=Path(tmp) / "indexes"), progress=False)
            db.cdc.start()
            for i in range(2_000, 2_000 + rounds):
                started = time.perf_counter()
                client.execute("INSERT INTO docs VALUES (?, ?)", (i, f"t{i}"))
                while db.search("near", vectors[f"t{i}"], k=1)[0]["_source"] != i:
                    time.sleep(0.001)  # a benchmark's probe: how soon a search sees the row
                seconds.append(time.perf_counter() - started)
        client.close()
    return summarize_seconds(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=1_000)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    rows, queries_n, inserts = (10_000, 200, 10) if args.quick else (args.rows, args.queries, 50)

    rng = np.random.default_rng(7)
    centres = rng.standard_normal((1_000, DIM), dtype=np.float32)
    data = clustered(rows, rng, centres)
    queries = clustered(queries_n, rng, centres)
    started = time.perf_counter()
    truth = exact(data, queries)
    print(f"exact answers for {queries_n} queries in {time.perf_counter() - started:.1f} s", flush=True)

    results: dict[str, Any] = {"usearch": measure_usearch(data, queries, truth)}
    print("usearch", json.dumps(results["usearch"]), flush=True)
    faiss_figures = measure_faiss(data, queries, truth)
    if faiss_figures is not None:
        results["faiss_hnsw"] = faiss_figures
        print("faiss", json.dumps(faiss_figures), flush=True)
    results["numpy_exact"] = measure_numpy(data, queries)
    searchable = insert_to_searchable(inserts)

    table = markdown_table(
        ["index", "build", "recall@10", "queries/s (1 thread)", "p50 / p99 latency"],
        [
            [
                name,
                f"{r['build_s']:.1f} s",
                f"{r['recall']:.3f}",
                f"{1000 / r['latency']['mean_ms']:,.0f}",
                f"{r['latency']['p50_ms']:.2f} / {r['latency']['p99_ms']:.2f} ms",
            ]
            for name, r in results.items()
        ],
    )
    print(machine_markdown(machine_info()))
    print(f"{rows:,} vectors of {DIM} float32 (clustered, normalized), {queries_n:,} queries, k={K}")
    print(table)
    print(
        f"insert to searchable through reactive (DuckDB, 50 ms polls): p50 {searchable['p50_ms']:.0f} ms, "
        f"p99 {searchable['p99_ms']:.0f} ms over {inserts} inserts"
    )
    if not args.quick:
        figures = {"rows": rows, "queries": queries_n, "indexes": results, "insert_to_searchable": searchable}
        write_results("vector_index", figures)


if __name__ == "__main__":
    main()

"""Does a poll block the application? A foreign writer's commit latency with and without reactive.

``python -m benchmarks.foreign_writer [--rows N] [--quick]``

For SQLite (a file, its default rollback journal) and PostgreSQL: a table of ``--rows`` rows
(1,000,000 by default), then a *separate process* inserts one row and commits, 60 times, 20 ms
apart, and reports each commit's latency. Three conditions, in the same run on the same table:
``reactive`` stopped (the reference); ``reactive`` following the table with
``poll_interval=0.05`` (a large table is then polled back to back: the worst case); and, for
SQLite, the same with the diff in one statement (``diff_range_rows=None``, how it was before
the diff in id ranges). Also the time of one idle poll in each mode. The writer is its own
process so that the GIL of the polling process cannot be what it waits for.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

from .common import machine_info, machine_markdown, markdown_table, summarize_seconds, write_results

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/test"

WRITER = textwrap.dedent(
    """
    import json, sys, time
    kind, target, n, start = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    if kind == "sqlite":
        import sqlite3
        con = sqlite3.connect(target, isolation_level=None, timeout=60)
        sql = "INSERT INTO docs VALUES (?, ?)"
    else:
        import psycopg
        con = psycopg.connect(target, autocommit=True)
        sql = "INSERT INTO docs VALUES (%s, %s)"
    latencies = []
    for i in range(n):
        began = time.perf_counter()
        con.execute(sql, (start + i, "written by another process"))
        latencies.append(time.perf_counter() - began)
        time.sleep(0.02)
    print(json.dumps(latencies))
    """
)


def writer(kind: str, target: str, n: int, start: int) -> list[float]:
    out = subprocess.run(
        [sys.executable, "-c", WRITER, kind, target, str(n), str(start)], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)


def one_poll(db: Any) -> float:
    """Seconds of one idle poll (the diff of the watched table), measured in-process."""
    from reactive.backends.ibis.listener import READ_ROWS

    info = db.table_info("docs")
    snapshots = db.backend.snapshots
    started = time.perf_counter()
    list(snapshots.changed(info, READ_ROWS))
    return time.perf_counter() - started


def measure(kind: str, uri: str, target: str, rows: int, writes: int, ranged: bool | None) -> dict[str, Any]:
    import reactive
    from reactive.backends.ibis.dialects import SQLiteDialect
    from reactive.components import Listener, Model

    saved = SQLiteDialect.diff_range_rows
    if ranged is False:
        SQLiteDialect.diff_range_rows = None
    try:
        result: dict[str, Any] = {"backend": kind, "rows": rows}
        result["without_reactive"] = summarize_seconds(writer(kind, target, writes, 10_000_000))
        with reactive.connect(uri, poll_interval=0.05, lease=False) as db:
            db.add(Listener(Model("len", predict=lambda xs: [len(x) for x in xs]), "text", "docs"), progress=False)
            result["idle_poll_seconds"] = min(one_poll(db) for _ in range(3))
            db.cdc.start()
            result["with_reactive"] = summarize_seconds(writer(kind, target, writes, 20_000_000))
            db.cdc.wait_idle(timeout=600)
        result["diff"] = "one statement" if ranged is False or kind != "sqlite" else "id ranges"
        return result
    finally:
        SQLiteDialect.diff_range_rows = saved


def sqlite_table(path: Path, rows: int, wal: bool) -> None:
    con = sqlite3.connect(str(path), isolation_level=None)
    if wal:
        con.execute("PRAGMA journal_mode=WAL")
    con.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text TEXT)")
    con.execute("BEGIN")
    con.executemany("INSERT INTO docs VALUES (?, ?)", ((i, f"row number {i}") for i in range(rows)))
    con.execute("COMMIT")
    con.close()


def pg_table(rows: int) -> str:
    import psycopg

    name = f"bench_writer_{int(time.time())}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    target = PG_ADMIN.rsplit("/", 1)[0] + f"/{name}"
    with psycopg.connect(target, autocommit=True) as con:
        con.execute("CREATE TABLE docs (id BIGINT PRIMARY KEY, text TEXT)")
        con.execute(f"INSERT INTO docs SELECT i, 'row number ' || i FROM generate_series(0, {rows - 1}) AS i")
    return target


def drop_pg(target: str) -> None:
    import psycopg

    name = target.rsplit("/", 1)[1]
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--writes", type=int, default=60)
    parser.add_argument("--quick", action="store_true", help="100,000 rows, 20 writes")
    args = parser.parse_args()
    rows, writes = (100_000, 20) if args.quick else (args.rows, args.writes)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for ranged, wal in ((True, False), (False, False), (True, True)):
            path = Path(tmp) / f"w{ranged}{wal}.sqlite"
            sqlite_table(path, rows, wal)
            results.append(measure("sqlite", f"sqlite:///{path}", str(path), rows, writes, ranged))
            results[-1]["journal"] = "WAL" if wal else "rollback (default)"
            print(json.dumps(results[-1]), flush=True)
    target = pg_table(rows)
    try:
        results.append(measure("postgres", target.replace("postgresql://", "postgres://"), target, rows, writes, None))
        results[-1]["journal"] = "MVCC"
        print(json.dumps(results[-1]), flush=True)
    finally:
        drop_pg(target)
    table = markdown_table(
        ["backend", "journal", "diff", "idle poll", "commit p50 / p99 alone", "with reactive polling", "p50 ratio"],
        [
            [
                r["backend"],
                r["journal"],
                r["diff"],
                f"{r['idle_poll_seconds'] * 1000:,.0f} ms",
                f"{r['without_reactive']['p50_ms']:.1f} / {r['without_reactive']['p99_ms']:.1f} ms",
                f"{r['with_reactive']['p50_ms']:.1f} / {r['with_reactive']['p99_ms']:.1f} ms",
                f"{r['with_reactive']['p50_ms'] / r['without_reactive']['p50_ms']:.1f}x",
            ]
            for r in results
        ],
    )
    print(machine_markdown(machine_info()))
    print(table)
    if not args.quick:
        write_results("foreign_writer", {"results": results})


if __name__ == "__main__":
    main()

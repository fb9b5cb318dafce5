"""Crash-safety torture at a bigger size than the suite: ``python -m benchmarks.torture [--quick]``.

The harness is ``tests/torture.py`` (its docstring has the design); ``tests/test_torture.py`` runs
it at CI size. This prints a Markdown table and writes every figure as JSON
(``results/torture.json``, with the commit measured; ``results/torture-partial.json`` with
``--quick`` or ``--only``). Nothing is asserted: a run that does not end exact says so in the
table (and the exit code is 1). A full run takes about six minutes on two cores.

Scenarios and parameters (full run; ``--quick`` in brackets)
    kills, on DuckDB, SQLite, PostgreSQL, MongoDB (SecantusDB) and Kinetica (the suite's
        Kinetica-protocol server as a process): the writer runs at ``rate`` = 400 [150]
        operations per second on ``ids`` = 500 [40] ids (30% inserts when an id is free, 35%
        key updates, 20% updates of another column, 15% deletes); the ``reactive`` worker is
        SIGKILLed ``kills`` = 50 [20] times, each ``uniform(0.05, 2.5)`` [``(0.05, 1.0)``]
        seconds after it was forked, or for a quarter of the kills ``uniform(0, 0.05)``
        (aimed at start-up: connect, backfill, ``start``), then a last worker reaches idle and
        the outputs are verified. DuckDB's writer is a thread of each worker (a DuckDB file has one process).
    server restarts (MongoDB): one worker runs while the SecantusDB process is SIGKILLed and
        restarted ``faults`` = 15 [4] times, ``uniform(0.3, 1.2)`` s apart, down for
        ``uniform(0.1, 0.6)`` s (every fourth time 4 s, past the URI's 3 s server selection
        timeout); the writer writes with ``j=True``. Unlike the suite's test the server is not
        flushed before a kill: reactive's output writes are not journaled (its positions are),
        so a kill may take back outputs written since the server's last journal flush; the
        listener sees the server's new process id and reconciles, and they are computed again
        (extras in process).
    server restarts, writes lost (MongoDB): the same with the writer at ``j=false``: each kill
        takes back the server's last writes, which a change stream may already have shown;
        the listener sees the server's new process id and reconciles. Not in the suite
        because whether a kill lands in the window that shows it is chance.
    connections terminated (PostgreSQL): ``pg_terminate_backend`` of every connection of
        the worker's, ``faults`` = 30 [8] times, ``uniform(0.3, 0.8)`` s apart.

Extra computations (``extras``): computations of a key value already computed before (every
value is written once, so that is the same version of the same row computed again);
``necessary`` = distinct values computed. Split into ``after restart`` (a worker recomputing
what an earlier, killed worker computed) and ``in process``.

Needs PostgreSQL at 127.0.0.1:5432 (``$REACTIVE_TEST_PG`` as for the suite); starts its own
SecantusDB and Kinetica-protocol processes.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses as dc
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .common import machine_info, machine_markdown, markdown_table, scratch_dir

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import torture
from mongo_server import MongoServer

RESULTS = Path(__file__).parent / "results"
PG_ADMIN = os.environ.get("REACTIVE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
FULL = torture.Settings(kills=50, min_delay=0.05, max_delay=2.5, ids=500, rate=400.0)
QUICK = torture.Settings()
SCENARIOS = (*torture.BACKENDS, "mongodb-restarts", "mongodb-lost-writes", "postgres-terminations")


@contextlib.contextmanager
def postgres_database() -> Iterator[str]:
    import psycopg

    name = f"reactive_torture_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{PG_ADMIN.rsplit('/', 1)[0]}/{name}"
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def mongo_server(directory: Path) -> Iterator[MongoServer]:
    server = MongoServer(directory / "secantus").start()
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def database(backend: str, directory: Path) -> Iterator[str]:
    """An empty database of ``backend``; its URI."""
    if backend == "duckdb":
        yield f"duckdb:///{directory / 'app.duckdb'}"
    elif backend == "sqlite":
        yield f"sqlite:///{directory / 'app.sqlite'}"
    elif backend == "postgres":
        with postgres_database() as uri:
            yield uri
    elif backend == "mongodb":
        with mongo_server(directory) as server:
            yield server.database_uri("app")
    else:
        with torture.kinetica_server_process() as uri:
            yield uri


def run(scenario: str, settings: torture.Settings, faults: int, directory: Path) -> torture.Report:
    workdir = directory / "run"
    workdir.mkdir()
    if scenario in torture.BACKENDS:
        with database(scenario, directory) as uri:
            return torture.kill_run(scenario, uri, workdir, settings)
    if scenario == "postgres-terminations":
        with postgres_database() as uri:
            fault = torture.terminate_postgres_connections(uri)
            return torture.fault_run(
                "postgres", uri, workdir, fault, scenario="connections terminated", faults=faults * 2,
                settings=settings, max_gap=0.8,
            )  # fmt: skip
    with mongo_server(directory) as server:
        lost = scenario == "mongodb-lost-writes"
        return torture.fault_run(
            "mongodb", server.database_uri("app"), workdir, torture.restart_mongo(server),
            scenario="server restarts, writes lost" if lost else "server restarts", faults=faults,
            settings=settings, no_journal=lost,
        )  # fmt: skip


def code_version() -> dict[str, Any]:
    """The commit the figures come from, and whether ``reactive/`` had uncommitted changes."""
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    changed = bool(git("status", "--porcelain", "reactive"))
    return {"commit": git("rev-parse", "HEAD") or None, "reactive_changed": changed}


def markdown(summaries: list[dict[str, Any]]) -> str:
    rows = [
        [
            s["backend"],
            s["scenario"],
            s["faults"],
            s["killed_starting"],
            s["rows"],
            s["key_values_written"],
            s["computations"],
            s["necessary"],
            f"{s['extras']} ({s['extras_pct']:.1f}%)",
            f"{s['extras_after_restart']} / {s['extras_in_process']}",
            "yes" if s["exact"] else f"**no**: {s['verdict']}",
            f"{s['seconds']:.0f} s",
        ]
        for s in summaries
    ]
    headers = [
        "backend",
        "scenario",
        "kills / faults",
        "kills in start-up",
        "rows at end",
        "key values written",
        "computations",
        "necessary",
        "extras",
        "extras after restart / in process",
        "exact",
        "time",
    ]
    return markdown_table(headers, rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.torture", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the suite's size")
    parser.add_argument("--only", action="append", choices=SCENARIOS, help="run only this scenario (may be repeated)")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    faults = 4 if args.quick else 15
    machine = machine_info()
    print(machine_markdown(machine), flush=True)
    summaries: list[dict[str, Any]] = []
    started = time.perf_counter()
    for scenario in args.only or SCENARIOS:
        print(f"<!-- running {scenario} ... -->", file=sys.stderr, flush=True)
        with scratch_dir("reactive-torture-") as directory:
            report = run(scenario, settings, faults, directory)
        summaries.append(report.summary())
        print(json.dumps(summaries[-1]), file=sys.stderr, flush=True)
    print("\n" + markdown(summaries), flush=True)
    partial = args.quick or args.only is not None
    output = RESULTS / ("torture-partial.json" if partial else "torture.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    result = {"machine": machine, "code": code_version(), "settings": dc.asdict(settings) | {"faults": faults}}
    result["runs"] = summaries
    result["total_seconds"] = round(time.perf_counter() - started, 1)
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nTotal {result['total_seconds']:.0f} s; results written to {output}", file=sys.stderr)
    return 0 if all(s["exact"] for s in summaries) else 1


if __name__ == "__main__":
    sys.exit(main())

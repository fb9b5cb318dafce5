"""Crash safety under fire: ``reactive`` SIGKILLed at random moments, servers killed under it.

The harness is ``tests/torture.py`` (its docstring has the design: the foreign writer, the
forked workers, DuckDB's in-process writer, how extra computations are counted);
``python -m benchmarks.torture`` runs the same at a bigger size. Here each backend takes 20
kills under a writer of about 150 operations per second on 40 ids, then the outputs must be
exact: one output per row, equal to the model of its current key, none for a deleted row.
Extra computations are reported (``-rA`` or ``-s`` shows them); only a loose bound is asserted.

Server faults: the SecantusDB process killed and restarted under a running ``reactive``, and
PostgreSQL connections terminated; ``reactive`` must reconnect and catch up by itself. What the
torture found broken on MongoDB is reduced to deterministic reproductions at the end, now fixed:
outputs are written with ``j=True`` like positions, and a server that restarted (its process id
changed) is reconciled, since it may have lost what it acknowledged and may resume a stream from
a position in that lost history without an error. A server that loses its last writes (no
journaling) is also run at random in the benchmark (``mongodb-lost-writes``); it is not here
because whether a kill shows the bug is chance.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torture
from mongo_server import MongoServer
from pymongo import MongoClient

import reactive
from reactive.components import Listener, Model

KILLS = 20
#: Loose sanity bound: a run recomputing this much more than it needs is broken, not slow.
MAX_EXTRAS_PCT = 50.0


def check(report: torture.Report, workdir: Path) -> None:
    summary = report.summary()
    print(json.dumps(summary))
    details = f"{json.dumps(summary, indent=1)}\nlogs in {workdir}"
    assert report.exact, details
    assert report.computations.partial_lines <= report.faults, details
    assert report.computations.extras_pct <= MAX_EXTRAS_PCT, details


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    path = tmp_path / "run"
    path.mkdir()
    return path


@pytest.fixture
def kinetica_uri() -> Iterator[str]:
    with torture.kinetica_server_process() as uri:
        yield uri


@pytest.fixture
def database_uri(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database of ``backend`` (the test's parameter)."""
    if backend == "duckdb":
        return f"duckdb:///{tmp_path / 'app.duckdb'}"
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'app.sqlite'}"
    if backend == "postgres":
        return request.getfixturevalue("pg_database")
    if backend == "mongodb":
        return request.getfixturevalue("mongo_uri")
    return request.getfixturevalue("kinetica_uri")


@pytest.mark.parametrize("backend", torture.BACKENDS)
def test_sigkilled_at_random_moments_under_a_foreign_writer(backend: str, database_uri: str, workdir: Path) -> None:
    """20 SIGKILLs of the reactive process (a quarter aimed at its start-up), restarted each time.

    The writer is a process with the database's own driver, except on DuckDB, whose file one
    process holds at a time: there it is a thread of each reactive process, on its own duckdb
    connection, killed with it (the module docstring of ``tests/torture.py`` says more).
    """
    report = torture.kill_run(backend, database_uri, workdir, torture.Settings(kills=KILLS))
    assert report.faults >= 20
    check(report, workdir)


@pytest.fixture
def secantus(tmp_path: Path) -> Iterator[MongoServer]:
    """A SecantusDB process of this test's own, so that it can be killed (default: no fsync per commit)."""
    server = MongoServer(tmp_path / "secantus").start()
    try:
        yield server
    finally:
        server.kill()  # its storage is thrown away: a clean shutdown takes SecantusDB 2 s


def test_mongodb_server_killed_and_restarted_mid_stream(secantus: MongoServer, workdir: Path) -> None:
    """The server is SIGKILLed and restarted 4 times (the last one stays down 4 s) under a writer.

    The writer journals (j=True) and the server is flushed (fsync) just before each kill, so
    that no write acknowledged before the crash is lost: this is about reconnecting and catching
    up. A crash that takes back reactive's own unjournaled output writes is a known bug,
    reproduced by ``test_mongodb_server_crash_between_output_and_position`` (and shown by the
    benchmark's "server restarts" run, which does not flush).
    """
    uri = secantus.database_uri("app")
    fault = torture.restart_mongo(secantus, fsync_first=True)
    report = torture.fault_run("mongodb", uri, workdir, fault, scenario="server restarts", faults=4)
    check(report, workdir)


def test_postgres_connections_terminated_mid_stream(pg_database: str, workdir: Path) -> None:
    """``pg_terminate_backend`` on every connection of reactive's, from another session, repeatedly."""
    fault = torture.terminate_postgres_connections(pg_database)
    report = torture.fault_run(
        "postgres", pg_database, workdir, fault, scenario="connections terminated", faults=8, max_gap=0.8
    )
    check(report, workdir)


# -- failing cases the torture found, reduced to deterministic reproductions ----------------------
def _follow(uri: str, predict) -> reactive.Datalayer:
    db = reactive.connect(uri)
    db.add(Listener(Model("tag", predict=predict), "text", "docs"), progress=False)
    db.cdc.start()
    assert db.cdc.wait_idle(timeout=30)
    return db


def _tag(values: list[str]) -> list[str]:
    return [torture.model_output(v) for v in values]


def test_mongodb_server_crash_between_output_and_position(secantus: MongoServer) -> None:
    """The server dies after acknowledging an output and before the position is saved. Outputs
    are not journaled, so the server may lose it, and the barrier mark of the ``wait_idle``
    running then too: the restart is seen, every collection reconciled, the mark written again
    (``wait_idle`` returns), the output is there at the end, and so is the first write after the
    restart's."""
    uri = secantus.database_uri("app")
    with MongoClient(uri, journal=True) as client:
        client.app.docs.insert_one({"_id": 0, "text": "zero"})
        db = _follow(uri, _tag)
        try:
            write = db.writer.write
            crashes = []

            def write_then_crash(*args, **kwargs):
                stored = write(*args, **kwargs)
                if not crashes:  # the outputs are acknowledged: the server dies before the position is saved
                    crashes.append(1)
                    secantus.kill()
                    secantus.start()
                    client.app.docs.insert_one({"_id": 2, "text": "two"})  # the first write after the restart
                return stored

            db.writer.write = write_then_crash
            client.app.docs.insert_one({"_id": 1, "text": "one"})
            assert db.cdc.wait_idle(timeout=60)
            # Doc 2 was written while that wait_idle ran (inside the handler): the next covers it.
            assert db.cdc.wait_idle(timeout=60)
            if not crashes:
                raise RuntimeError("the output of doc 1 was never written: nothing was reproduced")
        finally:
            db.close()
    verdict = torture.verify_database("mongodb", uri)
    assert verdict.exact, verdict.describe()


def test_mongodb_server_back_without_its_last_writes(secantus: MongoServer) -> None:
    """The server comes back without an insert reactive was computing: its output must not stay."""
    uri = secantus.database_uri("app")
    computing = threading.Event()
    release = threading.Event()

    def predict(values: list[str]) -> list[str]:
        if any(v.startswith("lost") for v in values):
            computing.set()
            release.wait(60)
        return _tag(values)

    with MongoClient(uri) as client:  # w=1, not journaled: what the server acknowledges it may still lose
        client.app.docs.insert_one({"_id": 0, "text": "zero"})
        db = _follow(uri, predict)
        try:
            for attempt in range(1, 6):
                computing.clear()
                release.clear()
                client.app.docs.insert_one({"_id": attempt, "text": f"lost-{attempt}"})
                assert computing.wait(30)  # reactive has the change; the server has not flushed it yet
                secantus.kill()
                secantus.start()
                release.set()
                if client.app.docs.find_one({"_id": attempt}) is None:
                    break  # the server lost the insert reactive is computing
            else:
                raise RuntimeError("the server kept every write: nothing was reproduced")
            client.app.docs.insert_one({"_id": 100, "text": "after"})
            client.app.docs.update_one({"_id": 0}, {"$set": {"text": "ZERO"}})
            assert db.cdc.wait_idle(timeout=60)
        finally:
            release.set()
            db.close()
    verdict = torture.verify_database("mongodb", uri)
    assert verdict.exact, verdict.describe()

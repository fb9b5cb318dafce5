"""``reactive status`` and ``reactive errors`` from a second process, backfill progress, lag, metrics.

The test process is the first process: it runs the listener (and holds a DuckDB file, as a
running listener does). The commands run as a second process (``python -m reactive ...``).
"""

from __future__ import annotations

import fcntl
import io
import json
import logging
import os
import pty
import re
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import termios
import threading
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from conftest import SQLClient, outputs_by_source, within

import reactive
import reactive.metrics
import reactive.progress
from reactive.checkpoints import Section
from reactive.cli import main
from reactive.components import Listener, Model
from reactive.errors import ConfigurationError
from reactive.status import database_status, format_status, lease_status
from reactive.threads import reactive_threads

ROOT = Path(__file__).parent.parent


def command(*args: str) -> subprocess.CompletedProcess[str]:
    """``python -m reactive ARGS`` in another process."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "reactive", *args], capture_output=True, text=True, timeout=120, env=env
    )


def status_of(uri: str) -> dict[str, Any]:
    done = command("status", "--uri", uri, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


class Switch:
    """A model that fails on inputs containing ``"bad"`` while ``broken``."""

    def __init__(self) -> None:
        self.broken = True

    def __call__(self, texts: list[str]) -> list[int]:
        if self.broken and any("bad" in t for t in texts):
            raise ValueError("cannot handle bad input")
        return [len(t) for t in texts]


def make_docs(client: SQLClient) -> None:
    client.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text VARCHAR)")
    client.executemany("INSERT INTO docs VALUES (?, ?)", [(1, "a"), (2, "bb"), (3, "ccc"), (4, None)])


# -- reactive status -------------------------------------------------------------------------------------
def test_status_from_a_second_process_while_a_listener_runs(sql: SQLClient) -> None:
    make_docs(sql)
    with reactive.connect(sql.uri, poll_interval=0.05) as db:
        db.add(Listener(Model("len", predict=Switch(), max_retries=0), "text", "docs"))
        db.cdc.start()
        sql.execute("INSERT INTO docs VALUES (5, 'eeeee')")
        assert db.cdc.wait_idle(timeout=30)
        uri = sql.uri.replace("postgres@", "postgres:s3cret@") if sql.kind == "postgres" else sql.uri
        done = command("status", "--uri", uri, "--json")
        assert done.returncode == 0, done.stderr
        assert "s3cret" not in done.stdout + done.stderr
        status = json.loads(done.stdout)

        assert status["uri"] == (uri.replace("s3cret", "***") if sql.kind == "postgres" else uri)
        lease = status["lease"]
        assert status["running"] and lease["state"] == "held"
        assert (lease["host"], lease["pid"]) == (socket.gethostname(), os.getpid())
        assert lease["renewed_seconds_ago"] < 5 and lease["expires_in_seconds"] > 0
        assert lease["process_started"] is not None
        [entry] = status["listeners"]
        assert entry["identifier"] == "len__text" and entry["source"] == "docs" and entry["kind"] == "listener"
        assert (entry["rows"], entry["outputs"], entry["errors"], entry["lag"]) == (5, 4, 1, 1)
        assert entry["output_type"] == "int64" and entry["last_error_at"] is not None
        assert entry["running_in"] == f"{socket.gethostname()}/{os.getpid()}"
        assert entry["position"]["kind"] == "snapshot" and entry["position"]["snapshot_rows"] == 5
        if sql.kind == "duckdb":  # the test process holds the file: the status read a copy of it
            assert status["read_from"]["held_by"]["pid"] == os.getpid()
        else:
            assert status["read_from"] == "the database"

        if sql.kind == "sqlite":
            text = command("status", "--uri", uri)
            assert text.returncode == 0, text.stderr
            assert re.search(
                rf"^lease +held by {re.escape(socket.gethostname())} pid {os.getpid()} ", text.stdout, re.M
            )
            row = rf"^len__text +docs +5 +4 +1 +1 +- +{re.escape(socket.gethostname())}/{os.getpid()}$"
            assert re.search(row, text.stdout, re.M), text.stdout
            assert "docs: snapshot of 5 rows (_reactive_snapshot__docs)" in text.stdout
        if sql.kind == "duckdb":
            text = format_status(status)
            assert f"read from a copy taken at {status['read_from']['copy_taken_at'][:10]}" in text
            assert f"process {os.getpid()} (" in text
    # Stopped: the lease is given up, and the counts stay (in this process, which still has the
    # DuckDB file open through the foreign client: the status shares that connection).
    after = database_status(sql.uri)
    assert after["lease"]["state"] == "free" and not after["running"]
    assert after["listeners"][0]["running_in"] is None and after["listeners"][0]["outputs"] == 4


def test_status_lists_a_listener_that_has_written_nothing_yet(sql: SQLClient) -> None:
    """Listeners are found by the record written when their outputs are created, so one whose
    filter matched no row yet (or of an empty table) was not listed: "no listeners recorded in
    this database". It is recorded at db.add now; its type is fixed by its first outputs."""
    make_docs(sql)
    later = Listener(Model("later", predict=lambda xs: [len(x) for x in xs]), "text", "docs", filter={"text": "dddd"})
    with reactive.connect(sql.uri) as db:
        db.add(later)
    [entry] = database_status(sql.uri)["listeners"]
    assert (entry["identifier"], entry["kind"], entry["source"], entry["output_type"]) == (
        "later__text",
        "listener",
        "docs",
        None,
    )
    assert (entry["rows"], entry["outputs"], entry["lag"], entry["filter"]) == (0, 0, 0, {"text": "dddd"})
    assert re.search(r"^later__text +docs +0 +0 +0 +0 +- ", format_status(database_status(sql.uri)), re.M)
    sql.execute("INSERT INTO docs VALUES (5, 'dddd')")
    with reactive.connect(sql.uri) as db:
        db.add(later)
        assert outputs_by_source(db, "later__text") == {5: 4}
    [entry] = database_status(sql.uri)["listeners"]
    assert (entry["output_type"], entry["rows"], entry["outputs"], entry["lag"]) == ("int64", 1, 1, 0)


def test_status_says_a_watched_table_dropped_or_renamed_is_missing(sql: SQLClient) -> None:
    """A table dropped while its listener ran (its snapshot dropped with it) was shown as "no
    snapshot yet", one renamed while nothing ran as a snapshot like any other: nothing said the
    table was gone, nor what to do. Both say it is missing now, and how to go on."""
    make_docs(sql)
    with reactive.connect(sql.uri, poll_interval=0.05) as db:
        db.add(Listener(Model("len", predict=lambda xs: [len(x) for x in xs]), "text", "docs"))
        db.cdc.start()
        assert db.cdc.wait_idle(timeout=30)
        sql.execute("DROP TABLE docs")
        assert within(30, lambda: "docs" in db.cdc.info()["stopped_tables"])
    status = database_status(sql.uri)
    [entry] = status["listeners"]
    assert (entry["source"], entry["source_missing"], entry["rows"], entry["outputs"]) == ("docs", True, None, 3)
    text = format_status(status)
    assert "no snapshot yet" not in text
    assert re.search(r"^  docs: table missing \(dropped or renamed\)$", text, re.M), text
    assert (
        "note: table 'docs' is missing (dropped or renamed after reactive followed it): the outputs of len__text"
        " are kept. To follow it again, create it or rename it back, then add its listeners again" in text
    )
    assert "db.remove('len__text', drop_outputs=True)" in text

    make_docs(sql)  # back, then renamed while nothing runs: its snapshot stays
    with reactive.connect(sql.uri) as db:
        db.add(Listener(Model("len", predict=lambda xs: [len(x) for x in xs]), "text", "docs"))
    sql.execute("ALTER TABLE docs RENAME TO docs_old")
    status = database_status(sql.uri)
    assert status["listeners"][0]["source_missing"]
    assert re.search(
        r"^  docs: table missing \(dropped or renamed\); its snapshot of 4 rows \(_reactive_snapshot__docs\) is kept$",
        format_status(status),
        re.M,
    )
    sql.execute("ALTER TABLE docs_old RENAME TO docs")
    [entry] = database_status(sql.uri)["listeners"]
    assert (entry["source_missing"], entry["rows"], entry["outputs"]) == (False, 4, 3)


def test_status_counts_the_rows_of_a_postgres_materialized_view(pg_database: str) -> None:
    # ibis lists tables from information_schema, which leaves materialized views out: the status
    # took a listener's view for a table not there, its rows and lag were `?`.
    import psycopg

    with psycopg.connect(pg_database, autocommit=True) as client:
        client.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text TEXT)")
        client.execute("INSERT INTO docs VALUES (1, 'a'), (2, 'bb')")
        client.execute("CREATE MATERIALIZED VIEW shown AS SELECT id AS m, text FROM docs")
    with reactive.connect(pg_database) as db:
        db.add(Listener(Model("len", predict=lambda xs: [len(x) for x in xs]), "text", "shown", id_column="m"))
    [entry] = database_status(pg_database)["listeners"]
    assert (entry["rows"], entry["outputs"], entry["lag"], entry["source_missing"]) == (2, 2, 0, False)


def test_status_of_a_postgres_table_another_client_has_locked(
    pg_database: str, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """A table another client holds ACCESS EXCLUSIVE (ALTER TABLE, VACUUM FULL) cannot be
    counted before the session's lock_timeout: `reactive status` printed psycopg's traceback
    (`LockNotAvailable`). Its rows and lag are `?` now, and a warning says why."""
    import psycopg

    with psycopg.connect(pg_database, autocommit=True) as client:
        client.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text TEXT)")
        client.execute("INSERT INTO docs VALUES (1, 'one')")
    with reactive.connect(pg_database) as db:
        db.add(Listener(Model("tag", predict=lambda xs: [len(x) for x in xs]), "text", "docs"))
    with psycopg.connect(pg_database) as holder:
        holder.execute("LOCK TABLE docs IN ACCESS EXCLUSIVE MODE")
        assert main(["status", f"{pg_database}?options=-c%20lock_timeout%3D100"]) == 0
    assert re.search(r"^tag__text +docs +\? +1 +0 +\? ", capsys.readouterr().out, re.M)
    assert "could not count the rows of 'docs': LockNotAvailable" in caplog.text


def test_status_of_a_sqlite_file_another_client_holds_exclusive(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Nothing of a SQLite file can be read while another client holds BEGIN EXCLUSIVE: the
    status waited the driver's 5 s and said only `database is locked`. It waits 2 s in all, and
    says what holds it and what to do."""
    path = tmp_path / "app.sqlite"
    client = sqlite3.connect(path, isolation_level=None)
    client.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text TEXT)")
    with reactive.connect(f"sqlite:///{path}") as db:
        db.add(Listener(Model("len", predict=lambda xs: [len(x) for x in xs]), "text", "docs"))
    client.execute("BEGIN EXCLUSIVE")
    try:
        assert main(["status", f"sqlite:///{path}"]) == 1
    finally:
        client.execute("COMMIT")
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("reactive status: error: could not open 'sqlite:///")
    assert line.endswith(
        "database is locked: another client holds a lock on the file (a write transaction, or BEGIN EXCLUSIVE)"
        " for more than 2 s; try again once it ends"
    )
    client.close()


def test_the_lag_of_a_filtered_listener_counts_the_rows_its_filter_keeps(sql: SQLClient) -> None:
    """The rows a filter leaves out counted in the lag: a listener of one tenant's rows of a
    large table was shown forever behind by all the others'. The status counts by the filter's
    conditions the database compares as Python does (text, whole numbers, None); one on another
    value (a float) is not counted by, and the rows it leaves out count, as the legend says."""
    sql.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text VARCHAR, tenant INTEGER, lang VARCHAR, score REAL)")
    rows = [(i, f"doc {i}", i % 3, "en" if i % 2 else None, 0.5 if i < 6 else 0.25) for i in range(12)]
    sql.executemany("INSERT INTO docs VALUES (?, ?, ?, ?, ?)", rows)

    def filtered(name: str, **where: object) -> Listener:
        return Listener(Model(name, predict=lambda xs: [len(x) for x in xs]), "text", "docs", filter=where)

    with reactive.connect(sql.uri, poll_interval=0.05) as db:
        for listener in (filtered("t", tenant=1), filtered("u", lang=None), filtered("s", lang="en", score=0.5)):
            db.add(listener)
        db.cdc.start()
        sql.execute("INSERT INTO docs VALUES (12, 'doc 12', 1, 'en', 0.5)")
        assert db.cdc.wait_idle(timeout=30)
        assert [len(db.outputs(f"{name}__text")) for name in "tus"] == [5, 6, 4]
        listed = {entry["identifier"]: entry for entry in status_of(sql.uri)["listeners"]}
    counted = {name: (e["rows"], e["outputs"], e["lag"], e["filter"]) for name, e in listed.items()}
    assert counted == {
        "t__text": (5, 5, 0, {"tenant": 1}),
        "u__text": (6, 6, 0, {"lang": None}),
        "s__text": (7, 4, 3, {"lang": "en", "score": 0.5}),  # not counted by the float: 3 rows of 0.25 count
    }


def test_status_of_mongodb_from_a_second_process(mongo_uri: str, mongo) -> None:
    mongo.docs.insert_many([{"_id": 1, "text": "a"}, {"_id": 2, "text": "bad"}])
    with reactive.connect(mongo_uri) as db:
        db.add(Listener(Model("len", predict=Switch(), max_retries=0), "text", "docs"))
        db.cdc.start()
        mongo.docs.insert_one({"_id": 3, "text": "ccc"})
        assert db.cdc.wait_idle(timeout=30)
        status = status_of(mongo_uri)
    assert status["backend"] == "mongodb" and status["running"]
    assert status["lease"]["pid"] == os.getpid()
    [entry] = status["listeners"]
    assert (entry["source"], entry["rows"], entry["outputs"], entry["errors"], entry["lag"]) == ("docs", 3, 2, 1, 1)
    assert entry["position"]["kind"] == "change stream" and entry["position"]["token"]
    assert entry["last_write"] == status["stream"]["saved_at"] is not None
    text = format_status(status)
    assert re.search(r"^position +change stream resume token saved \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC$", text, re.M)
    assert re.search(r"^len__text +docs +3 +2 +1 +1 +\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC +\S+/\d+$", text, re.M), text


def test_status_says_a_dropped_mongodb_collection_is_missing(mongo_uri: str, mongo) -> None:
    # As on SQL (test_status_says_a_watched_table_dropped_or_renamed_is_missing); a collection not
    # created yet is followed as an empty one, and is not said missing.
    mongo.docs.insert_many([{"_id": 1, "text": "a"}, {"_id": 2, "text": "bb"}])
    with reactive.connect(mongo_uri) as db:
        db.add(Listener(Model("len", predict=lambda xs: [len(x) for x in xs]), "text", "docs"))
        db.add(Listener(Model("later", predict=lambda xs: [len(x) for x in xs]), "text", "notes"))
        db.cdc.start()
        assert db.cdc.wait_idle(timeout=30)
        mongo.docs.drop()
        assert within(30, lambda: "docs" in db.cdc.info()["stopped_tables"])
    status = database_status(mongo_uri)
    missing = {entry["source"]: entry["source_missing"] for entry in status["listeners"]}
    assert missing == {"docs": True, "notes": False}
    assert "note: collection 'docs' is missing (dropped or renamed after reactive followed it)" in format_status(status)


def test_a_listener_added_again_with_another_filter_is_counted_by_the_new_one(duck: SQLClient) -> None:
    make_docs(duck)
    with reactive.connect(duck.uri) as db:
        db.add(Listener(Model("len", predict=lambda xs: [len(x) for x in xs]), "text", "docs", filter={"text": "a"}))
    with reactive.connect(duck.uri) as db:
        db.add(Listener(Model("len", predict=lambda xs: [len(x) for x in xs]), "text", "docs", filter={"text": "bb"}))
        assert outputs_by_source(db, "len__text") == {2: 2}
    [entry] = database_status(duck.uri)["listeners"]
    assert (entry["rows"], entry["outputs"], entry["lag"], entry["filter"]) == (1, 1, 0, {"text": "bb"})
    with reactive.connect(duck.uri) as db:  # no filter now: every row (its NULL text fails)
        db.add(Listener(Model("len", predict=lambda xs: [len(x) for x in xs]), "text", "docs"))
    [entry] = database_status(duck.uri)["listeners"]
    assert (entry["rows"], entry["outputs"], entry["errors"], entry["lag"], entry["filter"]) == (4, 3, 1, 1, None)


def test_the_lag_of_a_filtered_listener_on_mongodb(mongo_uri: str, mongo) -> None:
    mongo.docs.insert_many([{"_id": i, "text": f"doc {i}", "tenant": i % 3} for i in range(9)])
    tenant = Listener(Model("t", predict=lambda xs: [len(x) for x in xs]), "text", "docs", filter={"tenant": 1})
    with reactive.connect(mongo_uri) as db:
        db.add(tenant)
        db.cdc.start()
        mongo.docs.insert_one({"_id": 9, "text": "doc 9", "tenant": 2})
        mongo.docs.insert_one({"_id": 10, "text": "doc 10", "tenant": 1})
        assert db.cdc.wait_idle(timeout=30)
        [entry] = status_of(mongo_uri)["listeners"]
    assert (entry["rows"], entry["outputs"], entry["lag"], entry["filter"]) == (4, 4, 0, {"tenant": 1})


def test_status_of_what_cannot_be_opened(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "--uri", f"duckdb:///{tmp_path / 'missing.duckdb'}"]) == 1
    assert "no database file" in capsys.readouterr().err
    assert not (tmp_path / "missing.duckdb").exists()
    assert main(["status", "--uri", "postgresql://bob:hunter2@127.0.0.1:1/x"]) == 1
    err = capsys.readouterr().err
    assert "reactive status: error: could not connect to 'postgresql://bob:***@127.0.0.1:1/x'" in err
    assert "hunter2" not in err
    assert main(["status", "--uri", "duckdb://"]) == 1
    assert "in-memory" in capsys.readouterr().err
    assert main(["status", "--uri", "mysql://root:pw@db/app"]) == 1
    assert "supported schemes" in capsys.readouterr().err


def test_status_and_errors_of_a_directory_say_so_and_create_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # SQLite said "disk I/O error" of a directory.
    folder = tmp_path / "data"
    folder.mkdir()
    for scheme in ("sqlite", "duckdb"):
        for args in (["status"], ["errors"], ["errors", "--retry"]):
            assert main([*args, f"{scheme}:///{folder}"]) == 1
            [line] = capsys.readouterr().err.splitlines()
            assert line == f"reactive {args[0]}: error: {str(folder)!r} is a directory, not a database file"
    assert list(folder.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_reading_a_sqlite_file_in_wal_mode_leaves_no_file_beside_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # SQLite makes a WAL-mode file's -wal and -shm to read it, and a read-only connection cannot
    # remove them: `reactive status` and `reactive errors` left both behind.
    path = tmp_path / "app.sqlite"
    client = sqlite3.connect(path)
    client.execute("PRAGMA journal_mode=WAL")
    client.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text TEXT)")
    client.execute("INSERT INTO docs VALUES (1, 'a'), (2, NULL)")
    client.commit()
    client.close()
    with reactive.connect(f"sqlite:///{path}") as db:
        db.add(Listener(Model("len", predict=lambda xs: [len(x) for x in xs]), "text", "docs"))
    assert [p.name for p in tmp_path.iterdir()] == ["app.sqlite"]
    assert main(["status", f"sqlite:///{path}"]) == 0
    assert re.search(r"^len__text +docs +2 +1 +1 +1 ", capsys.readouterr().out, re.M)
    assert main(["errors", f"sqlite:///{path}"]) == 0
    assert "1 errors" in capsys.readouterr().out
    assert [p.name for p in tmp_path.iterdir()] == ["app.sqlite"]


def test_errors_retry_where_it_cannot_write_says_why_in_one_line(
    pg_database: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A role that may only read (what to grant), and a SQLite file another client is writing:
    `reactive errors --retry` printed the driver's traceback (after 30 s for the file); a line now
    says what it could not do and why, the password (with @ : / % # in it) never shown."""
    import psycopg

    with psycopg.connect(pg_database, autocommit=True) as client:
        client.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text TEXT)")
        client.execute("INSERT INTO docs VALUES (1, 'a'), (2, NULL)")
    with reactive.connect(pg_database) as db:
        db.add(Listener(Model("len", predict=lambda xs: [len(x) for x in xs]), "text", "docs"))
    role = f"reader_{os.getpid()}"
    with psycopg.connect(pg_database, autocommit=True) as client:
        client.execute(f'CREATE ROLE "{role}" LOGIN')
        client.execute(f'GRANT USAGE ON SCHEMA public TO "{role}"')
        client.execute(f'GRANT SELECT ON ALL TABLES IN SCHEMA public TO "{role}"')
    try:
        reader = pg_database.replace("postgres@", f"{role}:p%40s%3As%2Fw%25o%23rd@", 1)
        assert main(["errors", reader]) == 0
        assert "1 errors" in capsys.readouterr().out
        assert main(["errors", "--retry", reader]) == 1
        [line] = capsys.readouterr().err.splitlines()
        assert line.startswith(f'reactive errors: error: role "{role}" may not read and write reactive\'s table')
        assert "GRANT SELECT, INSERT, UPDATE, DELETE ON" in line and "p%40s" not in line and "p@s" not in line
    finally:
        with psycopg.connect(pg_database, autocommit=True) as client:
            client.execute(f'DROP OWNED BY "{role}"')
            client.execute(f'DROP ROLE "{role}"')

    path = tmp_path / "app.sqlite"
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text TEXT)")
    writer.execute("INSERT INTO docs VALUES (1, 'a'), (2, NULL)")
    with reactive.connect(f"sqlite:///{path}") as db:
        db.add(Listener(Model("len", predict=lambda xs: [len(x) for x in xs]), "text", "docs"))
    writer.execute("BEGIN IMMEDIATE")  # another client's write transaction: readers go on, writers wait
    try:
        assert main(["errors", "--retry", f"sqlite:///{path}"]) == 1
    finally:
        writer.execute("ROLLBACK")
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("reactive errors: error: could not clear the errors of sqlite:///")
    assert "database is locked: another client holds a lock on the file" in line
    assert main(["errors", "--retry", f"sqlite:///{path}"]) == 0  # the lock gone: cleared
    writer.close()


def test_the_database_may_be_given_as_the_argument_and_a_stray_password_never_shows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``reactive status URI`` is what a new user types; it used to be refused with argparse's
    "unrecognized arguments: <the URI, password and all>"."""
    path = tmp_path / "empty.sqlite"
    path.touch()
    assert main(["status", f"sqlite:///{path}"]) == 0
    assert "no listeners recorded" in capsys.readouterr().out
    assert main(["errors", f"sqlite:///{path}"]) == 0
    with pytest.raises(SystemExit):
        main(["status", "--uri", f"sqlite:///{path}", "postgresql://bob:hunter2@db/x"])
    err = capsys.readouterr().err
    assert "give the database once" in err and "hunter2" not in err
    with pytest.raises(SystemExit):
        main(["status", "postgresql://bob:hunter2@db/x", "extra"])
    err = capsys.readouterr().err
    assert "unrecognized arguments: extra" in err and "hunter2" not in err
    with pytest.raises(SystemExit):
        main(["demo", "postgresql://bob:hunter2@db/x"])
    err = capsys.readouterr().err
    assert "postgresql://bob:***@db/x" in err and "hunter2" not in err


def test_a_database_without_listeners(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "empty.sqlite"
    path.touch()
    assert main(["status", "--uri", f"sqlite:///{path}"]) == 0
    out = capsys.readouterr().out
    assert "free: no process runs the listeners" in out and "no listeners recorded" in out


def test_lease_states() -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()
    here = socket.gethostname()

    def lease(pid: int, expires: float, host: str = here) -> Section:
        record = {"epoch": 3, "expires": expires, "host": host, "owner": "o", "pid": pid}
        return Section(json.dumps(record).encode(), False, 1000.0)

    assert lease_status(lease(os.getpid(), 2000.0), now=1001.0)["state"] == "held"
    assert lease_status(lease(gone.pid, 2000.0), now=1001.0)["state"] == "gone"
    assert lease_status(lease(os.getpid(), 1000.5), now=1001.0)["state"] == "expired"
    assert lease_status(lease(gone.pid, 2000.0, host="elsewhere"), now=1001.0)["state"] == "held"
    assert lease_status(Section(b"garbage", False, 0.0))["state"] == "unreadable"


# -- reactive errors from a second process ----------------------------------------------------------------
def test_errors_listed_and_retried_from_a_second_process(tmp_path: Path) -> None:
    """The running process computes the rows `reactive errors --retry` queued, at its next poll."""
    import sqlite3

    path = tmp_path / "app.sqlite"
    client = sqlite3.connect(path, isolation_level=None)
    client.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text TEXT)")
    client.executemany("INSERT INTO docs VALUES (?, ?)", [(1, "ok"), (2, "bad"), (3, "bad too")])
    uri = f"sqlite:///{path}"
    model = Switch()
    with reactive.connect(uri, poll_interval=0.05) as db:
        db.add(Listener(Model("len", predict=model, max_retries=0), "text", "docs"))
        db.cdc.start()
        listed = command("errors", "--uri", uri, "--json")
        assert listed.returncode == 0, listed.stderr
        assert sorted(e["source"] for e in json.loads(listed.stdout)) == [2, 3]
        model.broken = False
        retried = command("errors", "--uri", uri, "--retry")
        assert retried.returncode == 0, retried.stderr
        assert "cleared 2 errors." in retried.stdout and "next poll" in retried.stdout
        assert db.cdc.wait_idle(timeout=30)  # its poll started after the retry: the rows are computed
        assert outputs_by_source(db, "len__text") == {1: 2, 2: 3, 3: 7}
        assert db.errors() == []
        # A listener without errors lists none; a name the database does not know is an error
        # (it said "no errors recorded").
        assert command("errors", "--uri", uri, "--listener", "len__text").stdout.strip() == "no errors recorded"
        misspelt = command("errors", "--uri", uri, "--listener", "len_text")
        assert misspelt.returncode == 1
        assert "no listener 'len_text' in sqlite:///" in misspelt.stderr and "(listeners: len__text)" in misspelt.stderr
    client.close()


def test_errors_of_a_duckdb_file_another_process_holds(duck: SQLClient) -> None:
    make_docs(duck)
    with reactive.connect(duck.uri) as db:
        db.add(Listener(Model("len", predict=Switch(), max_retries=0), "text", "docs"))
        db.cdc.start()
        listed = command("errors", "--uri", duck.uri, "--json")
        assert listed.returncode == 0, listed.stderr
        [error] = json.loads(listed.stdout)
        assert error["source"] == 4 and "row has no value for key 'text'" in error["error"]
        retried = command("errors", "--uri", duck.uri, "--retry")
        assert retried.returncode == 1
        assert "another process holds" in retried.stderr and "db.retry_errors()" in retried.stderr


# -- progress ----------------------------------------------------------------------------------------------
BACKFILL = """
import sqlite3, sys
import reactive
from reactive.components import Listener, Model

client = sqlite3.connect(sys.argv[1])
client.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text TEXT)")
client.executemany("INSERT INTO docs VALUES (?, ?)", [(i, "x" * (i % 7)) for i in range(300)])
client.commit()
with reactive.connect("sqlite:///" + sys.argv[1], page_size=100, batch_rows=100) as db:
    db.add(Listener(Model("len", predict=lambda texts: [len(t) for t in texts]), "text", "docs"))
print("added")
"""


def test_a_backfill_shows_a_progress_bar_on_a_terminal(tmp_path: Path) -> None:
    script = tmp_path / "backfill.py"
    script.write_text(BACKFILL)
    main_fd, child_fd = pty.openpty()
    fcntl.ioctl(child_fd, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("TQDM_DISABLE", None)
    child = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "app.sqlite")],
        stdin=child_fd,
        stdout=child_fd,
        stderr=child_fd,
        env=env,
        close_fds=True,
    )
    os.close(child_fd)
    output = b""
    while True:
        try:
            chunk = os.read(main_fd, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        output += chunk
    os.close(main_fd)
    assert child.wait(60) == 0, output.decode(errors="replace")
    text = output.decode(errors="replace")
    # tqdm's bar: description, percentage, rows done / total, [elapsed<left, rate]
    assert re.search(r"backfill len__text: +100%\|.*\| 300/300 \[\d\d:\d\d<\d\d:\d\d, +[\d.]+k?rows/s\]", text), text
    assert "added" in text


def test_without_a_terminal_a_backfill_logs_plain_lines(
    duck: SQLClient, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal, whatever runs the tests
    monkeypatch.setattr(reactive.progress, "LOG_EVERY", 0.0)
    duck.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text VARCHAR)")
    duck.executemany("INSERT INTO docs VALUES (?, ?)", [(i, f"t{i}") for i in range(250)])
    with caplog.at_level(logging.INFO, logger="reactive.progress"), reactive.connect(duck.uri, page_size=100) as db:
        db.add(Listener(Model("m", predict=lambda texts: [len(t) for t in texts]), "text", "docs"))
    lines = [r.getMessage() for r in caplog.records if r.name == "reactive.progress"]
    assert lines[0] == "backfill m__text: started (table has 250 rows)"
    assert re.fullmatch(r"backfill m__text: 100 of 250 rows \(40%\), [\d,]+ rows/s, about [\d,]+ s left", lines[1])
    assert re.fullmatch(r"backfill m__text: done, 250 rows in [\d.]+ s, [\d,]+ rows/s", lines[-1])
    assert sys.stderr.getvalue() == ""  # no bar


def test_a_resumed_backfill_measures_progress_against_the_rows_it_queued(
    duck: SQLClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    duck.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text VARCHAR)")
    duck.executemany("INSERT INTO docs VALUES (?, ?)", [(i, f"t{i}") for i in range(200)])
    with reactive.connect(duck.uri) as db:
        db.add(Listener(Model("m", predict=lambda texts: [len(t) for t in texts]), "text", "docs"), progress=False)
    duck.execute("UPDATE docs SET text = 'changed' WHERE id < 3")  # while no process ran
    terminal = io.StringIO()
    monkeypatch.setattr(sys, "stderr", terminal)
    monkeypatch.setattr(reactive.progress, "_is_terminal", lambda stream: True)
    with reactive.connect(duck.uri) as db:
        db.add(Listener(Model("m", predict=lambda texts: [len(t) for t in texts]), "text", "docs"))
    # The bar started at the table's 200 rows; once everything was queued, its total became 3.
    final = terminal.getvalue().replace("\r", "\n").splitlines()
    assert any(re.search(r"backfill m__text: 100%.*\| 3/3 \[", line) for line in final), terminal.getvalue()


def test_a_filtered_backfill_measures_progress_against_the_rows_its_filter_keeps(duck: SQLClient) -> None:
    """The total started as every row of the table: a filter keeping 20 of 200 rows showed a bar
    stuck at 10% until the comparison ended."""
    duck.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text VARCHAR, tenant INTEGER)")
    duck.executemany("INSERT INTO docs VALUES (?, ?, ?)", [(i, f"t{i}", i % 10) for i in range(200)])
    seen: list[tuple[int, int]] = []
    with reactive.connect(duck.uri) as db:
        listener = Listener(Model("m", predict=lambda xs: [len(x) for x in xs]), "text", "docs", filter={"tenant": 3})
        db.add(listener, progress=lambda done, total: seen.append((done, total)))
        assert len(db.outputs("m__text")) == 20
    assert seen and {total for _, total in seen} == {20} and seen[-1][0] == 20


# -- lag in info(), and the metrics over HTTP ----------------------------------------------------------------
class Held:
    """A model that holds its first call until released."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, texts: list[str]) -> list[int]:
        self.entered.set()
        assert self.release.wait(30), "the test never released the model"
        return [len(t) for t in texts]


def test_info_lag_and_prometheus_metrics_over_http(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "app.sqlite"
    client = sqlite3.connect(path, isolation_level=None)
    client.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text TEXT)")
    model = Held()
    with reactive.connect(f"sqlite:///{path}", poll_interval=0.05) as db:
        db.add(Listener(Model("len", predict=model), "text", "docs"))
        assert db.cdc.info()["listeners"]["len__text"]["lag"] == {"rows": 0, "seconds": None}
        db.cdc.start()
        server = reactive.metrics.serve(db, 0)
        # A thread of reactive's, named as every other (it was prometheus_client's "Thread-1
        # (serve_forever)": the checks for threads left running did not see it).
        assert server.thread.name == "reactive-metrics" and server.thread in reactive_threads()
        try:
            # One transaction: autocommitted one by one, a poll between two found the first alone.
            client.execute("BEGIN")
            client.executemany("INSERT INTO docs VALUES (?, ?)", [(1, "a"), (2, "bb"), (3, "ccc")])
            client.execute("COMMIT")
            assert model.entered.wait(30)
            lag = db.cdc.info()["listeners"]["len__text"]["lag"]
            assert lag["rows"] == 3 and lag["seconds"] >= 0
            scraped = urllib.request.urlopen(server.url, timeout=10).read().decode()
            assert 'reactive_listener_lag_rows{listener="len__text"} 3.0' in scraped
            assert "reactive_running 1.0" in scraped and "reactive_lease_held 1.0" in scraped
            model.release.set()
            assert db.cdc.wait_idle(timeout=30)
            assert db.cdc.info()["listeners"]["len__text"]["lag"] == {"rows": 0, "seconds": None}
            scraped = urllib.request.urlopen(server.url, timeout=10).read().decode()
            assert 'reactive_listener_computed_total{listener="len__text"} 3.0' in scraped
            assert 'reactive_listener_changes_total{event="insert",listener="len__text"} 3.0' in scraped
            assert 'reactive_listener_lag_rows{listener="len__text"} 0.0' in scraped
            assert "reactive_handler_rows_total 3.0" in scraped
            assert "reactive_handler_window_rows 5000.0" in scraped  # windows of 3 rows do not grow it
        finally:
            model.release.set()
            server.close()
        assert not server.thread.is_alive()
        assert db.cdc.metrics() is server.registry  # one registry per datalayer
    client.close()


def test_metrics_without_prometheus_client_say_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # import fails
    with reactive.connect("duckdb://") as db, pytest.raises(ConfigurationError, match=r"reactive-ml\[metrics\]"):
        db.cdc.metrics()


def test_the_position_of_a_table_with_a_version_column(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "app.sqlite"
    client = sqlite3.connect(path, isolation_level=None)
    client.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text TEXT, rev INTEGER)")
    client.execute("INSERT INTO docs VALUES (1, 'a', 1)")
    uri = f"sqlite:///{path}"
    with reactive.connect(uri, version_columns={"docs": "rev"}, poll_interval=0.05) as db:
        db.add(Listener(Model("len", predict=lambda texts: [len(t) for t in texts]), "text", "docs"))
        db.cdc.start()
        client.execute("INSERT INTO docs VALUES (2, 'bb', 7)")
        assert db.cdc.wait_idle(timeout=30)
        status = database_status(uri)
    [entry] = status["listeners"]
    position = entry["position"]
    assert (position["version_column"], position["version"], position["snapshot_rows"]) == ("rev", 7, 2)
    assert entry["last_write"] == position["saved_at"] is not None
    assert "docs: snapshot of 2 rows (_reactive_snapshot__docs), rev up to 7 (last full diff " in format_status(status)
    client.close()


def test_ctrl_c_ends_a_command_with_a_line_and_status_130() -> None:
    # A server that takes the connection and never answers: `reactive status` waits in the
    # driver, and Ctrl-C there printed a KeyboardInterrupt traceback.
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        uri = f"postgresql://app:secret@127.0.0.1:{port}/db?connect_timeout=60"
        # As from a terminal: a process started in the background of a shell without job
        # control (a CI runner's) inherits SIGINT ignored, and Python then keeps it ignored.
        interruptible = (
            "import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler);"
            " runpy.run_module('reactive', run_name='__main__')"
        )
        process = subprocess.Popen(
            [sys.executable, "-c", interruptible, "status", uri], stderr=subprocess.PIPE, text=True, env=env
        )
        try:
            connection, _ = server.accept()  # it connected: now it waits for an answer
            with connection:
                process.send_signal(signal.SIGINT)
                _, stderr = process.communicate(timeout=60)
        finally:
            process.kill()
    assert process.returncode == 130
    assert stderr.strip().endswith("reactive status: interrupted") and "Traceback" not in stderr
    assert "secret" not in stderr

"""Crash-safety torture: a foreign writer never stops, ``reactive`` is SIGKILLed and restarted.

``tests/test_torture.py`` runs it at a size that fits CI, ``python -m benchmarks.torture`` bigger.
Both call :func:`kill_run` and :func:`fault_run`; everything else here is what they need.

What a run does
    * A table ``docs (id, text, n)`` on one backend. The **writer** (a plain driver: duckdb,
      sqlite3, psycopg, pymongo with ``journal=True``, the official ``gpudb`` client; never
      ``reactive``) inserts, updates the key ``text``, updates the other column ``n`` and
      deletes rows of a small id range, so the same ids collide over and over; a seeded RNG,
      ``rate`` operations per second, one autocommitted operation at a time. Every key value
      it writes is new (``<prefix><operation number>``), which is what makes computations
      countable (below).
    * The **worker** is the ``reactive`` process: ``reactive.connect``, ``db.add(Listener(Model
      ("tag", f"<{text}>"), "text", "docs"))``, ``db.cdc.start()``, the same declarations every
      time. :func:`kill_run` SIGKILLs it ``kills`` times at a random moment after it was
      forked: ``uniform(min_delay, max_delay)``, or for a quarter of the kills
      ``uniform(0, startup_delay)``, aimed at connect, the backfill and ``start``; the next
      worker starts at once while the writer goes on.
    * **The end**: the writer stops; a last worker starts, and once it is told to finish it
      loops on ``db.cdc.wait_idle`` until True, then closes. :func:`verify` reads ``docs`` and
      ``_outputs__tag__text`` with the plain driver: every row must have exactly one output
      equal to ``model(current text)``, and no deleted row may have one.

Workers are forked, not spawned
    ``python tests/torture.py zygote`` imports ``reactive`` and every driver once (about a
    second on the test machine) and forks each worker from there, so a worker is up in
    milliseconds and every kill lands in ``reactive`` at work rather than in ``import``. A
    worker is still a process of its own: SIGKILL is a real crash, and nothing of a killed
    worker survives but what it wrote to the database and its files. ``python tests/torture.py
    worker ...`` runs one worker without the zygote (to reproduce a run by hand). A worker
    finishes on SIGUSR1 (blocked in the zygote before the fork and awaited with ``sigwait``,
    so a signal sent early is never lost).

DuckDB
    A DuckDB file is held by one process at a time: a foreign writer *process* cannot open it
    while a worker has it open. So on DuckDB the writer is a **thread inside each worker**, on
    its own ``duckdb.connect`` of the same file (a second connection of the same process shares
    the database instance; it is still a plain duckdb client, not ``reactive``). It is killed
    together with the worker: the write in flight is rolled back by DuckDB's WAL on the next
    open, and the next worker's writer reads the ids back from the table and goes on with its
    own prefix (``w<worker>-``). The test process opens the file only after the last worker
    exited. What this cannot test on DuckDB: writes made while no ``reactive`` process runs.

Counting computations
    The worker's model appends every input it is given to ``computed-<worker>.log`` (one
    ``os.write`` per ``predict`` call, one line per input) before it returns. A SIGKILL could
    cut a last line short: such a line is dropped and counted in ``partial_lines``. Since every
    key value is written once, a value computed twice is a computation repeated for the same
    version of the same row:

    * ``necessary`` = distinct values computed (each a version of a row that some window saw;
      versions overwritten before any window saw them are coalesced away and need nothing);
    * ``extras`` = computations - necessary: the same version computed again. The goal is that
      only the windows in flight at each kill are recomputed (their outputs were computed but
      not written, or written but the position not saved and the rows reported as inserts
      again). ``extras_after_restart`` are the values a worker computed that an earlier worker
      had computed already; ``extras_in_process`` the ones computed twice by one worker (a
      reconnect, a reconciliation racing a change).

Faults of the server (:func:`fault_run`)
    One worker keeps running while the test SIGKILLs and restarts the SecantusDB process
    (:func:`restart_mongo`; the writer journals, ``j=True``, or with ``no_journal`` does not,
    and then each kill takes back the server's last writes) or terminates the worker's
    PostgreSQL connections from another session (:func:`terminate_postgres_connections`; the
    writer's connection, ``application_name`` ``torture-writer``, is spared). The worker must
    reconnect and catch up by itself, without a restart; the end is the same as above.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses as dc
import faulthandler
import json
import os
import random
import select
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

HERE = Path(__file__).resolve()
TABLE = "docs"
KEY = "text"
IDENTIFIER = "tag__text"
OUTPUTS = f"_outputs__{IDENTIFIER}"
#: The writer's mix: an insert (when an id is free), an update of the key, of the other
#: column, a delete; cumulative thresholds of one uniform draw.
MIX = (("insert", 0.30), ("update_key", 0.65), ("update_other", 0.85), ("delete", 1.0))
#: The operations that write a new key value.
KEYED = ("insert", "update_key")
#: How long a finishing worker may take to reach idle before it gives up (exit code 3).
FINISH_TIMEOUT = 120.0
BACKENDS = ("duckdb", "sqlite", "postgres", "mongodb", "kinetica")
WRITER_APPLICATION = "torture-writer"


def model_output(text: str) -> str:
    """What the worker's model computes: a pure function of the key.

    >>> model_output("w3-17")
    '<w3-17>'
    """
    return f"<{text}>"


# -- plain clients: the database's own driver, nothing from reactive ------------------------------
class PlainClient(Protocol):
    def create(self) -> None: ...
    def ids(self) -> set[int]: ...
    def insert(self, row_id: int, text: str) -> None: ...
    def update_key(self, row_id: int, text: str) -> None: ...
    def update_other(self, row_id: int) -> None: ...
    def delete(self, row_id: int) -> None: ...
    def rows(self) -> dict[int, str]: ...
    def outputs(self) -> list[tuple[Any, Any]]:
        """Every stored ``(_source, _output)`` pair, duplicates included (empty if no table yet)."""

    def close(self) -> None: ...


class SQLClient:
    """DuckDB, SQLite or PostgreSQL through its DB-API driver, autocommitted."""

    def __init__(self, kind: str, uri: str, *, application_name: str = "torture") -> None:
        self.kind = kind
        if kind == "duckdb":
            import duckdb

            self.con = duckdb.connect(uri.removeprefix("duckdb:///"))
        elif kind == "sqlite":
            import sqlite3

            self.con = sqlite3.connect(uri.removeprefix("sqlite:///"), timeout=30, isolation_level=None)
        else:
            import psycopg

            self.con = psycopg.connect(uri, autocommit=True, application_name=application_name)

    def _run(self, sql: str, *params: Any) -> list[tuple]:
        if self.kind == "postgres":
            sql = sql.replace("?", "%s")
        cur = self.con.cursor()
        cur.execute(sql, params)
        return cur.fetchall() if cur.description else []

    def create(self) -> None:
        self._run(f"create table {TABLE} (id integer primary key, text varchar, n integer)")

    def ids(self) -> set[int]:
        return {r[0] for r in self._run(f"select id from {TABLE}")}

    def insert(self, row_id: int, text: str) -> None:
        self._run(f"insert into {TABLE} (id, text, n) values (?, ?, 0)", row_id, text)

    def update_key(self, row_id: int, text: str) -> None:
        self._run(f"update {TABLE} set text = ? where id = ?", text, row_id)

    def update_other(self, row_id: int) -> None:
        self._run(f"update {TABLE} set n = n + 1 where id = ?", row_id)

    def delete(self, row_id: int) -> None:
        self._run(f"delete from {TABLE} where id = ?", row_id)

    def rows(self) -> dict[int, str]:
        return dict(self._run(f"select id, text from {TABLE}"))

    def outputs(self) -> list[tuple[Any, Any]]:
        try:
            return self._run(f'select "_source", "_output" from "{OUTPUTS}"')
        except Exception as exc:  # no output was ever written: the table does not exist
            if "exist" not in str(exc) and "no such table" not in str(exc):
                raise
            if self.kind == "postgres":
                self.con.rollback()
            return []

    def close(self) -> None:
        self.con.close()


class MongoPlainClient:
    """pymongo; ``journal=True`` unless the run is about losing unjournaled writes."""

    def __init__(self, uri: str, *, journal: bool = True) -> None:
        from pymongo import MongoClient

        self.client = MongoClient(uri, journal=journal, serverSelectionTimeoutMS=20_000)
        self.db = self.client.get_default_database()

    def create(self) -> None:
        self.db.create_collection(TABLE)

    def ids(self) -> set[int]:
        return {d["_id"] for d in self.db[TABLE].find({}, {"_id": 1})}

    def insert(self, row_id: int, text: str) -> None:
        self.db[TABLE].insert_one({"_id": row_id, "text": text, "n": 0})

    def update_key(self, row_id: int, text: str) -> None:
        self.db[TABLE].update_one({"_id": row_id}, {"$set": {"text": text}})

    def update_other(self, row_id: int) -> None:
        self.db[TABLE].update_one({"_id": row_id}, {"$inc": {"n": 1}})

    def delete(self, row_id: int) -> None:
        self.db[TABLE].delete_one({"_id": row_id})

    def rows(self) -> dict[int, str]:
        return {d["_id"]: d["text"] for d in self.db[TABLE].find({}, {"text": 1})}

    def outputs(self) -> list[tuple[Any, Any]]:
        return [(d["_source"], d["_output"]) for d in self.db[OUTPUTS].find({}, {"_source": 1, "_output": 1})]

    def close(self) -> None:
        self.client.close()


class KineticaPlainClient:
    """The official ``gpudb`` client."""

    def __init__(self, url: str) -> None:
        from gpudb import GPUdb

        self.db = GPUdb(host=url, options=GPUdb.Options({"disable_failover": True}))
        self._docs: Any = None

    def _checked(self, response: Any) -> Any:
        if not response.is_ok():
            raise RuntimeError(response.get_error_msg())
        return response

    def create(self) -> None:
        from gpudb import GPUdbColumnProperty, GPUdbRecordColumn, GPUdbRecordType, GPUdbTable

        columns = [
            GPUdbRecordColumn("id", "int", [GPUdbColumnProperty.PRIMARY_KEY]),
            GPUdbRecordColumn("text", "string"),
            GPUdbRecordColumn("n", "int"),
        ]
        GPUdbTable(GPUdbRecordType(columns, label=TABLE), TABLE, db=self.db)

    def _records(self, table: str) -> list[dict[str, Any]]:
        from gpudb import GPUdbTable

        if not self.db.has_table(table)["table_exists"]:
            return []
        handle = GPUdbTable(None, table, db=self.db)
        records: list[dict[str, Any]] = []
        while page := handle.get_records(offset=len(records), limit=5_000):
            records.extend(dict(r) for r in page)
            if len(page) < 5_000:
                break
        return records

    def ids(self) -> set[int]:
        return {r["id"] for r in self._records(TABLE)}

    def insert(self, row_id: int, text: str) -> None:
        from gpudb import GPUdbTable

        if self._docs is None:
            self._docs = GPUdbTable(None, TABLE, db=self.db)
        self._docs.insert_records([[row_id, text, 0]])

    def update_key(self, row_id: int, text: str) -> None:
        self._checked(self.db.update_records(TABLE, [f"id = {row_id}"], [{"text": text}]))

    def update_other(self, row_id: int) -> None:
        options = {"use_expressions_in_new_values_maps": "true"}
        self._checked(self.db.update_records(TABLE, [f"id = {row_id}"], [{"n": "n + 1"}], options=options))

    def delete(self, row_id: int) -> None:
        self._checked(self.db.delete_records(TABLE, [f"id = {row_id}"]))

    def rows(self) -> dict[int, str]:
        return {r["id"]: r["text"] for r in self._records(TABLE)}

    def outputs(self) -> list[tuple[Any, Any]]:
        return [(r["_source"], r["_output"]) for r in self._records(OUTPUTS)]

    def close(self) -> None:
        """Nothing to close: every call is one HTTP request."""


def plain_client(kind: str, uri: str, **options: Any) -> PlainClient:
    """The foreign client of ``kind`` on ``uri`` (a ``reactive`` URI; Kinetica: ``kinetica://host:port?...``)."""
    if kind in ("duckdb", "sqlite", "postgres"):
        return SQLClient(kind, uri, **options)
    if kind == "mongodb":
        return MongoPlainClient(uri, **options)
    if kind == "kinetica":
        return KineticaPlainClient("http://" + uri.removeprefix("kinetica://").split("?")[0])
    raise ValueError(f"unknown backend {kind!r}")


# -- the writer -----------------------------------------------------------------------------------
def write(
    client: PlainClient,
    *,
    rng: random.Random,
    ids: int,
    rate: float,
    prefix: str,
    stop: threading.Event,
    log_fd: int | None = None,
) -> Counter[str]:
    """Insert, update and delete rows of ids ``0..ids-1`` until ``stop`` is set; the counts.

    Each key value written is ``<prefix><operation number>`` and never repeats. With
    ``log_fd`` each operation is appended there once it returned: ``<operation> <id> <key
    value>``. A failing operation (the server is down, its connection was cut) is counted in
    ``errors``, waited on with backoff, and the ids are read again: the writer's idea of which
    rows exist is only a guide, the table is the truth.
    """
    counts: Counter[str] = Counter()
    present = client.ids()
    backoff = 0.05
    number = 0
    while not stop.is_set():
        number += 1
        draw = rng.random()
        operation = next(name for name, threshold in MIX if draw < threshold)
        free = sorted(set(range(ids)) - present)
        if free and (operation == "insert" or not present):
            operation = "insert"
        elif operation == "insert" or not present:
            operation = "update_key"
        text = f"{prefix}{number}"
        try:
            if operation == "insert":
                row_id = rng.choice(free)
                client.insert(row_id, text)
                present.add(row_id)
            else:
                row_id = rng.choice(sorted(present))
                if operation == "update_key":
                    client.update_key(row_id, text)
                elif operation == "update_other":
                    client.update_other(row_id)
                else:
                    client.delete(row_id)
                    present.discard(row_id)
        except Exception:
            counts["errors"] += 1
            stop.wait(backoff)
            backoff = min(backoff * 2, 1.0)
            with contextlib.suppress(Exception):
                present = client.ids()
            continue
        backoff = 0.05
        counts[operation] += 1
        if log_fd is not None:
            os.write(log_fd, f"{operation} {row_id} {text if operation in KEYED else ''}\n".encode())
        stop.wait(1.0 / rate)
    return counts


def _set_on_sigterm(stop: threading.Event) -> None:
    signal.sigwait({signal.SIGTERM})
    stop.set()


def writer_main(args: argparse.Namespace) -> int:
    """The writer as its own process: a ready line, writes until SIGTERM, then its counts as a JSON line."""
    stop = threading.Event()
    # SIGTERM is taken by a thread of its own, not by a handler: a handler runs on the main
    # thread between two bytecodes, possibly inside stop.wait() with the Event's lock held,
    # which stop.set() would then wait for forever. Blocked before any thread starts.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    threading.Thread(target=_set_on_sigterm, args=(stop,), name="torture-sigterm", daemon=True).start()
    faulthandler.register(signal.SIGUSR2, all_threads=True)  # where a writer that does not stop is stuck
    options: dict[str, Any] = {"journal": False} if args.no_journal else {}
    if args.backend == "postgres":
        options["application_name"] = WRITER_APPLICATION  # spared by terminate_postgres_connections
    client = plain_client(args.backend, args.uri, **options)
    log_fd = os.open(args.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644) if args.log else None
    print(json.dumps({"ready": True}), flush=True)
    counts = write(client, rng=random.Random(args.seed), ids=args.ids, rate=args.rate, prefix=args.prefix, stop=stop,
                   log_fd=log_fd)  # fmt: skip
    client.close()
    print(json.dumps(dict(counts)), flush=True)
    return 0


@dc.dataclass
class WriterProcess:
    """A running writer process; :meth:`stop` ends it and returns its counts."""

    process: subprocess.Popen[str]
    err: Path

    @classmethod
    def start(cls, backend: str, uri: str, workdir: Path, *, seed: int, ids: int, rate: float,
              no_journal: bool = False) -> WriterProcess:  # fmt: skip
        command = [
            sys.executable, str(HERE), "writer", "--backend", backend, "--uri", uri, "--seed", str(seed),
            "--ids", str(ids), "--rate", str(rate), "--prefix", "p", "--log", str(workdir / "written-writer.log"),
        ]  # fmt: skip
        if no_journal:
            command.append("--no-journal")
        stderr = open(workdir / "writer.err", "ab")  # noqa: SIM115 (the child holds it)
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True)
        stderr.close()
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line:
            process.wait(10)
            raise RuntimeError(f"the writer exited with {process.returncode}: {tail(workdir / 'writer.err')}")
        return cls(process, workdir / "writer.err")

    def stop(self) -> int:
        """End the writer; how many of its operations failed."""
        self.process.terminate()
        try:
            out, _ = self.process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.send_signal(signal.SIGUSR2)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.communicate(timeout=2)
            raise RuntimeError(f"the writer did not stop within 60 s; its stacks:\n{tail(self.err, 60)}") from None
        if self.process.returncode != 0:
            raise RuntimeError(f"the writer exited with {self.process.returncode}: {tail(self.err)}")
        return json.loads(out.strip().splitlines()[-1]).get("errors", 0)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


# -- the worker: the reactive process -------------------------------------------------------------
def connect_options(backend: str) -> dict[str, Any]:
    if backend in ("duckdb", "sqlite", "postgres"):
        return {"poll_interval": 0.05}
    if backend == "kinetica":
        return {"inactivity_timeout": 30.0, "connect_timeout": 5.0}
    return {}


def worker_main(args: argparse.Namespace) -> int:
    """Connect, declare the listener, start; on SIGUSR1 reach idle, close and report.

    ``--writer-seed`` (DuckDB) also runs the writer in a thread of this process.
    """
    # Before any thread starts, so that every thread has it blocked and sigwait gets it.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    import logging

    import reactive
    from reactive.components import Listener, Model

    log_format = f"%(asctime)s worker {args.number} %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=logging.INFO, format=log_format)
    workdir = Path(args.dir)
    computed_fd = os.open(workdir / f"computed-{args.number}.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def predict(values: list[str]) -> list[str]:
        os.write(computed_fd, "".join(f"{v}\n" for v in values).encode())
        return [model_output(v) for v in values]

    started = time.monotonic()
    db = reactive.connect(args.uri, **connect_options(args.backend))
    db.add(Listener(Model("tag", predict=predict), KEY, TABLE), progress=False)
    db.cdc.start()
    (workdir / f"ready-{args.number}").touch()
    stop_writing = threading.Event()
    writer = None
    if args.writer_seed is not None:
        client = plain_client(args.backend, args.uri)
        log_fd = os.open(workdir / f"written-{args.number}.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        writer = threading.Thread(
            target=write,
            name="torture-writer",
            kwargs={"client": client, "rng": random.Random(args.writer_seed), "ids": args.ids, "rate": args.rate,
                    "prefix": f"w{args.number}-", "stop": stop_writing, "log_fd": log_fd},
        )  # fmt: skip
        writer.start()

    signal.sigwait({signal.SIGUSR1})
    if writer is not None:
        stop_writing.set()
        writer.join()
    finishing = time.monotonic()
    idle = False
    while not idle and time.monotonic() - finishing < FINISH_TIMEOUT:
        idle = db.cdc.wait_idle(timeout=10)
    if not idle:  # where each thread is stuck goes into the worker's log
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    info = db.cdc.info()
    errors = db.errors()
    db.close()
    result = {
        "idle": idle,
        "up_seconds": finishing - started,
        "idle_seconds": time.monotonic() - finishing,
        "errors": len(errors),
        "first_errors": [str(e) for e in errors[:5]],
        "info": info,
    }
    (workdir / f"result-{args.number}.json").write_text(json.dumps(result, default=str, indent=1))
    return 0 if idle else 3


# -- the zygote: forks workers that have every import done ----------------------------------------
def zygote_main() -> int:
    """Read one JSON command a line (spawn, wait), answer one JSON line each; EOF ends it.

    ``{"spawn": [worker arguments], "log": path}`` forks a worker, answers ``{"pid": n}``;
    ``{"wait": pid}`` answers ``{"rc": n}`` once it exited (minus the signal that killed it).
    """
    import duckdb  # noqa: F401
    import ibis
    import psycopg  # noqa: F401
    import pymongo  # noqa: F401

    import reactive
    import reactive.backends.ibis.backend
    import reactive.backends.kinetica.backend
    import reactive.backends.mongodb.backend  # noqa: F401
    from reactive.components import Listener, Model  # noqa: F401

    for name in ("duckdb", "sqlite", "postgres"):
        getattr(ibis, name)  # loads the ibis backend module
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    children: set[int] = set()
    parser = command_parser()
    for line in sys.stdin:
        command = json.loads(line)
        if "spawn" in command:
            log = os.open(command["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    null = os.open(os.devnull, os.O_RDONLY)
                    os.dup2(null, 0)
                    os.dup2(log, 1)
                    os.dup2(log, 2)
                    sys.stdin = open(os.devnull)  # noqa: SIM115
                    code = worker_main(parser.parse_args(["worker", *command["spawn"]]))
                except BaseException:
                    import traceback

                    traceback.print_exc()
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(code)
            os.close(log)
            children.add(pid)
            answer: dict[str, Any] = {"pid": pid}
        else:
            pid = command["wait"]
            _, status = os.waitpid(pid, 0)
            children.discard(pid)
            answer = {"rc": os.waitstatus_to_exitcode(status)}
        print(json.dumps(answer), flush=True)
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    return 0


class Zygote:
    """The test's side of :func:`zygote_main`: start, kill and finish workers."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        stderr = open(workdir / "zygote.err", "ab")  # noqa: SIM115 (the child holds it)
        self.process = subprocess.Popen(
            [sys.executable, str(HERE), "zygote"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
            text=True,
        )  # fmt: skip
        stderr.close()

    def _ask(self, command: dict[str, Any], *, timeout: float | None = None) -> dict[str, Any] | None:
        """Send ``command``; its answer, or None if ``timeout`` passed first (then call :meth:`_answer`)."""
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        if timeout is not None and not select.select([self.process.stdout], [], [], timeout)[0]:
            return None
        return self._answer()

    def _answer(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the zygote exited: {tail(self.workdir / 'zygote.err')}")
        return json.loads(line)

    def spawn(self, arguments: Sequence[str], log: Path) -> int:
        answer = self._ask({"spawn": list(arguments), "log": str(log)})
        assert answer is not None
        return answer["pid"]

    def kill(self, pid: int) -> int:
        """SIGKILL the worker; its exit code (``-9`` unless it had ended already)."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        answer = self._ask({"wait": pid})
        assert answer is not None
        return answer["rc"]

    def finish(self, pid: int, timeout: float = FINISH_TIMEOUT + 60) -> int:
        """Tell the worker to reach idle and close; its exit code (0: idle reached).

        A worker that has not exited after ``timeout`` seconds (it gives up reaching idle
        after ``FINISH_TIMEOUT`` by itself) hangs: it is killed, and this raises.
        """
        os.kill(pid, signal.SIGUSR1)
        answer = self._ask({"wait": pid}, timeout=timeout)
        if answer is None:
            os.kill(pid, signal.SIGKILL)
            self._answer()
            raise RuntimeError(f"worker {pid} did not exit within {timeout:.0f} s of being told to finish (killed)")
        return answer["rc"]

    def close(self) -> None:
        """Ends the zygote, which kills the workers still running."""
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.close()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        if self.process.stdout is not None:
            self.process.stdout.close()


# -- counting and verifying -----------------------------------------------------------------------
def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"({path} is missing)"


@dc.dataclass
class Computations:
    """What the workers' models computed; see the module docstring for the definitions."""

    total: int = 0
    necessary: int = 0
    extras_after_restart: int = 0
    extras_in_process: int = 0
    partial_lines: int = 0

    @property
    def extras(self) -> int:
        return self.total - self.necessary

    @property
    def extras_pct(self) -> float:
        return 100.0 * self.extras / self.necessary if self.necessary else 0.0


def count_computations(workdir: Path) -> Computations:
    """Read every ``computed-<worker>.log`` in worker order.

    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp())
    >>> _ = (d / "computed-0.log").write_text("a\\nb\\nb\\nc")  # c was cut short by a kill
    >>> _ = (d / "computed-1.log").write_text("a\\nd\\n")
    >>> c = count_computations(d)
    >>> (c.total, c.necessary, c.extras, c.extras_in_process, c.extras_after_restart, c.partial_lines)
    (5, 3, 2, 1, 1, 1)
    """
    counts = Computations()
    seen: set[str] = set()
    logs = sorted(workdir.glob("computed-*.log"), key=lambda p: int(p.stem.split("-")[1]))
    for log in logs:
        text = log.read_text()
        values = text.split("\n")
        if values[-1]:
            counts.partial_lines += 1
        in_process: set[str] = set()
        for value in values[:-1]:
            counts.total += 1
            if value in in_process:
                counts.extras_in_process += 1
            elif value in seen:
                counts.extras_after_restart += 1
            in_process.add(value)
            seen.add(value)
    counts.necessary = len(seen)
    return counts


@dc.dataclass
class Verdict:
    """The final state against ``model(current key)``; ``exact`` when every list is empty."""

    rows: int
    outputs: int
    missing: list[Any]
    stale: list[tuple[Any, Any, Any]]
    orphans: list[Any]
    duplicates: list[Any]

    @property
    def exact(self) -> bool:
        return not (self.missing or self.stale or self.orphans or self.duplicates)

    def describe(self) -> str:
        if self.exact:
            return f"exact: {self.rows} rows, {self.outputs} outputs"
        return (
            f"NOT exact ({self.rows} rows, {self.outputs} outputs): missing outputs for ids {self.missing[:10]}, "
            f"stale (id, text, output) {self.stale[:10]}, orphaned outputs of deleted ids {self.orphans[:10]}, "
            f"duplicated outputs {self.duplicates[:10]}"
        )


def verify(client: PlainClient) -> Verdict:
    """Compare the table with the outputs, both read with the plain driver."""
    rows = client.rows()
    pairs = client.outputs()
    outputs: dict[Any, Any] = {}
    duplicates = []
    for source, output in pairs:
        if source in outputs:
            duplicates.append(source)
        outputs[source] = output
    missing = sorted(i for i in rows if i not in outputs)
    stale = sorted((i, rows[i], outputs[i]) for i in rows if i in outputs and outputs[i] != model_output(rows[i]))
    orphans = sorted(i for i in outputs if i not in rows)
    return Verdict(len(rows), len(pairs), missing, stale, orphans, sorted(duplicates))


def verify_database(backend: str, uri: str) -> Verdict:
    """:func:`verify` with a plain client of its own, closed afterwards."""
    client = plain_client(backend, uri)
    try:
        return verify(client)
    finally:
        client.close()


@dc.dataclass
class Report:
    """One run: what was done to it and how it ended."""

    backend: str
    scenario: str
    faults: int
    seconds: float
    verdict: Verdict
    computations: Computations
    writes: dict[str, int]
    #: Operations that failed (and were not retried); None where the writer was killed too.
    writer_errors: int | None
    worker_warnings: int
    final_worker: dict[str, Any]
    early_exits: list[str] = dc.field(default_factory=list)
    #: Kills that landed before the worker's ``db.cdc.start()`` returned (connect, backfill).
    killed_starting: int = 0

    @property
    def exact(self) -> bool:
        return self.verdict.exact and not self.early_exits and self.final_worker.get("idle", False)

    def summary(self) -> dict[str, Any]:
        c = self.computations
        return {
            "backend": self.backend,
            "scenario": self.scenario,
            "faults": self.faults,
            "killed_starting": self.killed_starting,
            "seconds": round(self.seconds, 1),
            "rows": self.verdict.rows,
            "writes": self.writes,
            "writer_errors": self.writer_errors,
            "key_values_written": sum(self.writes.get(operation, 0) for operation in KEYED),
            "computations": c.total,
            "necessary": c.necessary,
            "extras": c.extras,
            "extras_pct": round(c.extras_pct, 2),
            "extras_after_restart": c.extras_after_restart,
            "extras_in_process": c.extras_in_process,
            "partial_lines": c.partial_lines,
            "exact": self.exact,
            "verdict": self.verdict.describe(),
            "worker_warnings": self.worker_warnings,
            "errors_recorded": self.final_worker.get("errors"),
            "final_idle_seconds": round(self.final_worker.get("idle_seconds", 0.0), 2),
            "early_exits": self.early_exits,
        }


# -- runs -----------------------------------------------------------------------------------------
@dc.dataclass(frozen=True)
class Settings:
    """The size of a run (the suite's defaults; the benchmark passes bigger ones)."""

    kills: int = 20
    min_delay: float = 0.05
    max_delay: float = 1.0
    #: This share of the kills is aimed at start-up (connect, ``db.add``'s backfill, ``start``):
    #: ``uniform(0, startup_delay)`` after the fork; a worker is up in a few tens of ms.
    startup_share: float = 0.25
    startup_delay: float = 0.05
    ids: int = 40
    rate: float = 150.0
    seed: int = 20261126


def _worker_arguments(backend: str, uri: str, workdir: Path, number: int) -> list[str]:
    return ["--backend", backend, "--uri", uri, "--dir", str(workdir), "--number", str(number)]


def _finish(zygote: Zygote, pid: int, workdir: Path, number: int) -> dict[str, Any]:
    rc = zygote.finish(pid)
    path = workdir / f"result-{number}.json"
    if rc != 0 or not path.exists():
        raise RuntimeError(f"the final worker {number} ended with {rc}:\n{tail(workdir / f'worker-{number}.log')}")
    return json.loads(path.read_text())


def _warnings(workdir: Path) -> int:
    """Lines the workers logged at WARNING or above: reconnections, retries, errors."""
    levels = (" WARNING ", " ERROR ", " CRITICAL ")
    return sum(
        any(level in line for level in levels)
        for p in workdir.glob("worker-*.log")
        for line in p.read_text(errors="replace").splitlines()
    )


def _writes(workdir: Path) -> Counter[str]:
    """The operations the writers logged (a kill may take back a last one that did commit)."""
    return Counter(line.split(" ", 1)[0] for p in workdir.glob("written-*.log") for line in p.read_text().splitlines())


def create_table(backend: str, uri: str) -> None:
    """Create ``docs`` with the plain client, and let go of the database (a DuckDB file above all)."""
    client = plain_client(backend, uri)
    try:
        client.create()
    finally:
        client.close()


def _report(backend: str, scenario: str, faults: int, started: float, uri: str, workdir: Path,
            writer_errors: int | None, final: dict[str, Any], early_exits: list[str]) -> Report:  # fmt: skip
    verdict = verify_database(backend, uri)  # only now: DuckDB's file is free once the last worker exited
    return Report(
        backend=backend,
        scenario=scenario,
        faults=faults,
        seconds=time.monotonic() - started,
        verdict=verdict,
        computations=count_computations(workdir),
        writes=dict(_writes(workdir)),
        writer_errors=writer_errors,
        worker_warnings=_warnings(workdir),
        final_worker=final,
        early_exits=early_exits,
    )


def kill_run(backend: str, uri: str, workdir: Path, settings: Settings = Settings()) -> Report:
    """SIGKILL the worker ``settings.kills`` times under a running writer, then verify.

    ``uri`` names an empty database (``docs`` is created here). DuckDB: the writer is a thread
    of each worker (see the module docstring).
    """
    started = time.monotonic()
    rng = random.Random(settings.seed)
    create_table(backend, uri)
    in_process_writer = backend == "duckdb"
    zygote = Zygote(workdir)
    writer = None
    early_exits: list[str] = []
    writer_errors = None
    killed_starting = 0
    try:
        if not in_process_writer:
            writer = WriterProcess.start(
                backend, uri, workdir, seed=settings.seed, ids=settings.ids, rate=settings.rate
            )
        for number in range(settings.kills):
            arguments = _worker_arguments(backend, uri, workdir, number)
            if in_process_writer:
                arguments += ["--writer-seed", str(settings.seed + number), "--ids", str(settings.ids),
                              "--rate", str(settings.rate)]  # fmt: skip
            pid = zygote.spawn(arguments, workdir / f"worker-{number}.log")
            if rng.random() < settings.startup_share:
                time.sleep(rng.uniform(0.0, settings.startup_delay))
            else:
                time.sleep(rng.uniform(settings.min_delay, settings.max_delay))
            if not (workdir / f"ready-{number}").exists():
                killed_starting += 1
            rc = zygote.kill(pid)
            if rc != -signal.SIGKILL:
                early_exits.append(f"worker {number} exited with {rc} before its kill")
        if writer is not None:
            writer_errors = writer.stop()
            writer = None
        number = settings.kills
        pid = zygote.spawn(_worker_arguments(backend, uri, workdir, number), workdir / f"worker-{number}.log")
        final = _finish(zygote, pid, workdir, number)
    finally:
        if writer is not None:
            writer.kill()
        zygote.close()
    report = _report(backend, "kills", settings.kills, started, uri, workdir, writer_errors, final, early_exits)
    report.killed_starting = killed_starting
    return report


def wait_ready(workdir: Path, number: int, timeout: float = 60.0) -> None:
    """Wait until worker ``number`` has started its change capture (it touches a file)."""
    deadline = time.monotonic() + timeout
    ready = workdir / f"ready-{number}"
    while not ready.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"worker {number} did not start:\n{tail(workdir / f'worker-{number}.log')}")
        time.sleep(0.02)


def fault_run(
    backend: str,
    uri: str,
    workdir: Path,
    fault: Callable[[random.Random], None],
    *,
    scenario: str,
    faults: int,
    settings: Settings = Settings(),
    min_gap: float = 0.3,
    max_gap: float = 1.2,
    no_journal: bool = False,
) -> Report:
    """One worker keeps running while ``fault(rng)`` hits the server ``faults`` times, then verify.

    ``fault`` is called ``uniform(min_gap, max_gap)`` seconds apart while the writer writes; it
    returns once the server is back (or, for terminated connections, at once).
    """
    started = time.monotonic()
    rng = random.Random(settings.seed)
    create_table(backend, uri)
    zygote = Zygote(workdir)
    writer = None
    try:
        pid = zygote.spawn(_worker_arguments(backend, uri, workdir, 0), workdir / "worker-0.log")
        wait_ready(workdir, 0)
        writer = WriterProcess.start(backend, uri, workdir, seed=settings.seed, ids=settings.ids, rate=settings.rate,
                                     no_journal=no_journal)  # fmt: skip
        for _ in range(faults):
            time.sleep(rng.uniform(min_gap, max_gap))
            fault(rng)
        time.sleep(rng.uniform(min_gap, max_gap))  # the writer goes on a little after the last fault
        writer_errors = writer.stop()
        writer = None
        final = _finish(zygote, pid, workdir, 0)
    finally:
        if writer is not None:
            writer.kill()
        zygote.close()
    return _report(backend, scenario, faults, started, uri, workdir, writer_errors, final, [])


# -- faults of the server -------------------------------------------------------------------------
def restart_mongo(
    server: Any,
    *,
    min_down: float = 0.1,
    max_down: float = 0.6,
    long_every: int = 4,
    long_down: float = 4.0,
    fsync_first: bool = False,
) -> Callable[[random.Random], None]:
    """SIGKILL the SecantusDB process (a ``tests/mongo_server.py`` ``MongoServer``), restart it.

    It stays down ``uniform(min_down, max_down)`` seconds, which pymongo's own retries (a
    retryable write, the change stream's automatic resume) cover; every ``long_every``-th time
    ``long_down`` seconds, longer than the URI's ``serverSelectionTimeoutMS`` (3 s), so that
    reactive's reconnection with backoff runs too. ``fsync_first`` flushes the server just
    before the kill, so that every write acknowledged until then survives it, reactive's
    unjournaled output writes included: the crash tests reconnection and catching up only.
    """
    from pymongo import MongoClient

    restarts = 0

    def fault(rng: random.Random) -> None:
        nonlocal restarts
        restarts += 1
        if fsync_first:
            with MongoClient(server.uri, serverSelectionTimeoutMS=10_000) as client:
                client.admin.command("fsync")
        server.kill()
        time.sleep(long_down if restarts % long_every == 0 else rng.uniform(min_down, max_down))
        server.start()

    return fault


def terminate_postgres_connections(uri: str, *, keep: str = WRITER_APPLICATION) -> Callable[[random.Random], None]:
    """``pg_terminate_backend`` every connection to ``uri``'s database except the writer's."""
    import psycopg

    def fault(rng: random.Random) -> None:
        with psycopg.connect(uri, autocommit=True, application_name="torture-admin") as admin:
            admin.execute(
                "select pg_terminate_backend(pid) from pg_stat_activity where datname = current_database() "
                "and pid <> pg_backend_pid() and application_name <> %s",
                (keep,),
            )

    return fault


@contextlib.contextmanager
def kinetica_server_process() -> Iterator[str]:
    """``tests/kinetica_server.py`` as its own process; its ``kinetica://`` URI."""
    process = subprocess.Popen(
        [sys.executable, str(HERE.with_name("kinetica_server.py"))], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        address = json.loads(process.stdout.readline())
        yield f"kinetica://{address['url'].removeprefix('http://')}?monitor_port={address['zmq_port']}"
    finally:
        assert process.stdin is not None
        process.stdin.close()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
        process.stdout.close()


# -- command line ---------------------------------------------------------------------------------
def command_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python tests/torture.py", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    worker = commands.add_parser("worker", help="one reactive process (finishes on SIGUSR1)")
    writer = commands.add_parser("writer", help="the foreign writer (stops on SIGTERM)")
    commands.add_parser("zygote", help="forks workers on request (JSON lines on stdin)")
    for sub in (worker, writer):
        sub.add_argument("--backend", choices=BACKENDS, required=True)
        sub.add_argument("--uri", required=True)
        sub.add_argument("--ids", type=int, default=Settings.ids)
        sub.add_argument("--rate", type=float, default=Settings.rate)
    worker.add_argument("--dir", required=True)
    worker.add_argument("--number", type=int, default=0)
    worker.add_argument("--writer-seed", type=int, help="also write, from a thread of this process (DuckDB)")
    writer.add_argument("--seed", type=int, default=Settings.seed)
    writer.add_argument("--prefix", default="p")
    writer.add_argument("--log", help="append every operation here: <operation> <id> <key value>")
    writer.add_argument("--no-journal", action="store_true", help="MongoDB: write with j=false")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = command_parser().parse_args(argv)
    if args.command == "zygote":
        return zygote_main()
    if args.command == "writer":
        return writer_main(args)
    return worker_main(args)


if __name__ == "__main__":
    sys.exit(main())

"""Fixtures: real databases for every backend the tests cover.

PostgreSQL runs at 127.0.0.1:5432 (override with REACTIVE_TEST_PG); each test gets a
fresh database, dropped afterwards. DuckDB and SQLite use files in a temporary directory.
A missing PostgreSQL is a failure, not a skip.
"""

from __future__ import annotations

import dataclasses as dc
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from typing import Any

import duckdb
import psycopg
import pytest

import reactive
from reactive.components import Listener, Model
from reactive.compute import LocalCompute
from reactive.handler import WindowRows
from reactive.threads import reactive_threads

pytest_plugins = ["kinetica_fixtures"]
PG_ADMIN = os.environ.get("REACTIVE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


class SQLClient:
    """A foreign client: the database's own driver, nothing from reactive."""

    def __init__(self, kind: str, uri: str, raw: Any) -> None:
        self.kind, self.uri, self.raw = kind, uri, raw

    def execute(self, sql: str, params: tuple | list | None = None) -> list[tuple]:
        if self.kind == "postgres":
            sql = sql.replace("?", "%s")
        cur = self.raw.cursor()
        cur.execute(sql, params or ())
        rows = cur.fetchall() if cur.description else []
        if self.kind == "sqlite":
            self.raw.commit()
        return rows

    def executemany(self, sql: str, rows: list[tuple]) -> None:
        if self.kind == "postgres":
            sql = sql.replace("?", "%s")
        cur = self.raw.cursor()
        cur.executemany(sql, rows)
        if self.kind == "sqlite":
            self.raw.commit()

    def close(self) -> None:
        self.raw.close()


@pytest.fixture
def pg_database() -> Iterator[str]:
    """A fresh PostgreSQL database; its URI."""
    name = f"reactive_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["duckdb", "sqlite", "postgres"])
def sql(request: pytest.FixtureRequest, tmp_path) -> Iterator[SQLClient]:
    """A SQL database of each tested kind, with a foreign client connected to it."""
    kind = request.param
    if kind == "duckdb":
        path = tmp_path / "app.duckdb"
        client = SQLClient(kind, f"duckdb:///{path}", duckdb.connect(str(path)))
    elif kind == "sqlite":
        path = tmp_path / "app.sqlite"
        client = SQLClient(kind, f"sqlite:///{path}", sqlite3.connect(str(path), check_same_thread=False))
    else:
        uri = request.getfixturevalue("pg_database")
        client = SQLClient(kind, uri, psycopg.connect(uri, autocommit=True))
    yield client
    client.close()


@pytest.fixture
def duck(tmp_path) -> Iterator[SQLClient]:
    path = tmp_path / "app.duckdb"
    client = SQLClient("duckdb", f"duckdb:///{path}", duckdb.connect(str(path)))
    yield client
    client.close()


class Recorder:
    """A model's predict function that records every input it sees."""

    def __init__(self, fn=None) -> None:
        self.fn = fn or (lambda x: f"<{x}>")
        self.inputs: list[Any] = []
        self.calls = 0
        self.lock = threading.Lock()

    def __call__(self, values: list[Any]) -> list[Any]:
        with self.lock:
            self.calls += 1
            self.inputs.extend(values)
        return [self.fn(v) for v in values]


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture(autouse=True)
def no_thread_left_behind() -> Iterator[None]:
    """Every test must stop what it starts."""
    yield
    alive = [t.name for t in reactive_threads()]
    assert not alive, f"threads left running: {alive}"


def within(seconds: float, condition: Callable[[], bool]) -> bool:
    """Whether ``condition`` holds within ``seconds``: for what time brings (a lease's expiry, a
    thread reaching a state), never for processing (wait on an event or ``wait_idle``)."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        threading.Event().wait(0.02)
    return True


def looked(keeper: Any, times: int, timeout: float = 30.0) -> None:
    """Wait until a ``LeaseKeeper`` has looked at its lease ``times`` more times."""
    for _ in range(times):
        with keeper._changed:
            keeper.wake()
            assert keeper._changed.wait(timeout)


def outputs_by_source(db: reactive.Datalayer, identifier: str) -> dict[Any, Any]:
    return {row["_source"]: row["_output"] for row in db.outputs(identifier)}


def add_constant_listeners(db: reactive.Datalayer, outputs: dict[str, Any]) -> None:
    """A listener on ``docs.text`` for each name, whose model returns that name's value for every row."""
    for name, value in outputs.items():
        db.add(Listener(Model(name, predict=lambda texts, v=value: [v for _ in texts]), "text", "docs"))


def outputs_of(db: reactive.Datalayer, names: Iterable[str]) -> dict[str, dict[Any, Any]]:
    """:func:`outputs_by_source` of each name's listener on ``docs.text``."""
    return {name: outputs_by_source(db, f"{name}__text") for name in names}


def add_filtered_lengths(db: reactive.Datalayer, filters: dict[str, dict[str, Any]]) -> dict[str, dict[Any, Any]]:
    """Add a ``len(text)`` listener on ``docs.text`` per name, with that name's filter (each
    backfills); each one's outputs by source."""
    for name, conditions in filters.items():
        db.add(Listener(Model(name, predict=lambda xs: [len(x) for x in xs]), "text", "docs", filter=conditions))
    return outputs_of(db, filters)


def scanned_pages(monkeypatch: pytest.MonkeyPatch, source: type) -> list[int]:
    """The sizes of the pages ``source``'s ``scan`` yields from now on (a reconciliation's reads)."""
    sizes: list[int] = []
    scan = source.scan

    def counted(self: Any, *args: Any, **options: Any) -> Iterator[Any]:
        for page in scan(self, *args, **options):
            sizes.append(len(page))
            yield page

    monkeypatch.setattr(source, "scan", counted)
    return sizes


def types_of(db: reactive.Datalayer, names: Iterable[str]) -> dict[str, str | None]:
    """The output type fixed for each name's listener on ``docs.text``."""
    return {name: db.backend.output_types.get(f"{name}__text") for name in names}


class Watching(LocalCompute):
    """Local model work that records what is submitted, and when, to whoever waits for it."""

    def __init__(self) -> None:
        super().__init__()
        self.submitted: list[list[Any]] = []
        self.changed = threading.Condition()

    def submit(self, model: Model, inputs: Sequence[Any], **options: Any) -> Future[list[Any]]:
        with self.changed:
            self.submitted.append(list(inputs))
            self.changed.notify_all()
        return super().submit(model, inputs, **options)

    def wait_for(self, predicate: Callable[[list[list[Any]]], bool], timeout: float) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: predicate(self.submitted), timeout)


class HeldTags:
    """A model's ``predict`` that tags each text (``<text>``), and holds every call given
    ``held`` until :attr:`go` is set, with :attr:`computing` set meanwhile: a window whose
    model work is under way while the test changes what comes next."""

    def __init__(self, held: str) -> None:
        self.held = held
        self.computing, self.go = threading.Event(), threading.Event()

    def __call__(self, texts: list[str]) -> list[str]:
        if self.held in texts:
            self.computing.set()
            assert self.go.wait(60)
        return [f"<{t}>" for t in texts]


@dc.dataclass(frozen=True)
class BrokenOnce(WindowRows):
    """Window bounds whose rule raises once, after ``armed`` is set: a bug in the handler's own
    bookkeeping (none of a component's, a database's or a source's), after a window is written."""

    armed: threading.Event = dc.field(default_factory=threading.Event, compare=False)
    broken: threading.Event = dc.field(default_factory=threading.Event, compare=False)

    def next(self, bound: int, taken: int, rows: int, seconds: float, fixed: float | None = 0.0) -> int:
        if self.armed.is_set() and not self.broken.is_set():
            self.broken.set()
            raise RuntimeError("a bug in the window bookkeeping")
        return super().next(bound, taken, rows, seconds, fixed)


# -- MongoDB -------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def mongo_base(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A MongoDB-wire server with change streams: $MONGO_URI if set, else a SecantusDB process."""
    from mongo_server import MongoServer

    if os.environ.get("MONGO_URI"):
        yield os.environ["MONGO_URI"]
        return
    server = MongoServer(tmp_path_factory.mktemp("secantus") / "data").start()
    try:
        yield server.uri
    finally:
        server.stop()


def with_database(base: str, database: str) -> str:
    """``base`` (a server URI) with ``database`` as its path."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(base)
    query = "&".join(q for q in [parts.query, "serverSelectionTimeoutMS=3000"] if q)
    return urlunsplit((parts.scheme, parts.netloc, f"/{database}", query, ""))


@pytest.fixture
def mongo_uri(mongo_base: str) -> Iterator[str]:
    """A fresh database on the shared server, dropped afterwards."""
    from pymongo import MongoClient

    database = f"reactive_test_{uuid.uuid4().hex[:12]}"
    yield with_database(mongo_base, database)
    with MongoClient(mongo_base) as client:
        client.drop_database(database)


def server_uri(request: pytest.FixtureRequest, kind: str) -> str:
    """The URI of a fresh database on the suite's server of ``kind`` (``mongodb``, ``kinetica``)."""
    return request.getfixturevalue({"mongodb": "mongo_uri", "kinetica": "kinetica_uri"}[kind])


@pytest.fixture
def mongo(mongo_uri: str):
    """A plain pymongo client on the test database (the foreign client)."""
    from pymongo import MongoClient

    with MongoClient(mongo_uri) as client:
        yield client.get_default_database()

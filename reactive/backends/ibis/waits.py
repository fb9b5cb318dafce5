"""How long a connection waits for a lock, and how a stop or an ``info()`` cuts a wait short.

SQLite makes a statement wait (its busy timeout) while another client holds a lock on the
database file: ``BEGIN EXCLUSIVE``, or a write being committed. That wait runs inside the
driver, where nothing can end it (``Connection.interrupt()`` does not), so with the 30 s busy
timeout a foreign ``BEGIN EXCLUSIVE`` made ``db.cdc.info()`` and ``db.cdc.stop()`` wait 30 s per
statement. :class:`SQLiteConnection` waits in slices of :data:`SLICE_SECONDS` instead, and
between slices asks its :class:`Waits` whether to go on: for :data:`PATIENCE_SECONDS` as before,
less where a stop cut every wait short or the calling thread asked for an answer soon.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from types import TracebackType
from typing import Any, TypeVar

from reactive.errors import BackendError

_T = TypeVar("_T")

#: The longest a statement waits for a lock another client holds (the busy timeout it had).
PATIENCE_SECONDS = 30.0
#: SQLite's busy timeout for one slice of a wait: how late a cut wait notices it was cut.
SLICE_SECONDS = 0.1


class ConnectionBusyError(BackendError):
    """A thread asked for an answer soon (:meth:`Waits.at_most`) and another thread of this
    process kept the connection for longer (its statement waits for a lock, or writes)."""


class Waits:
    """When a wait for a lock must end: after :attr:`patience`, or sooner where a stop cut
    every wait short (:meth:`cut`) or the waiting thread bounded its own (:meth:`at_most`).

    >>> waits = Waits(patience=30)
    >>> with waits.at_most(0.5):
    ...     round(waits.deadline() - time.monotonic(), 1)
    0.5
    >>> with waits.cut(0.0):
    ...     waits.deadline() <= time.monotonic()
    True
    >>> waits.deadline() - time.monotonic() > 29
    True
    """

    def __init__(self, patience: float = PATIENCE_SECONDS) -> None:
        self.patience = patience
        #: Every wait ends by then (monotonic), while a stop runs; None otherwise.
        self._cut_at: float | None = None
        self._cuts = 0
        self._cut_lock = threading.Lock()
        self._local = threading.local()

    def deadline(self) -> float:
        """When a wait that starts now must end (``time.monotonic()``)."""
        ends = [time.monotonic() + self.patience, getattr(self._local, "bound", None), self._cut_at]
        return min(at for at in ends if at is not None)

    def bound(self) -> float | None:
        """When this thread's waits must end, where it asked (:meth:`at_most`); None otherwise."""
        return getattr(self._local, "bound", None)

    @contextlib.contextmanager
    def at_most(self, seconds: float) -> Iterator[None]:
        """This thread's waits, for the connection and for the database's locks, end within
        ``seconds`` from now (an ``info()`` answers with what it knows rather than wait)."""
        before = getattr(self._local, "bound", None)
        ends = time.monotonic() + seconds
        self._local.bound = ends if before is None else min(before, ends)
        try:
            yield
        finally:
            self._local.bound = before

    @contextlib.contextmanager
    def cut(self, seconds: float) -> Iterator[None]:
        """Every thread's waits end within ``seconds`` from now, until the block ends (a stop:
        what it cannot write by then is released and delivered again at the next start)."""
        ends = time.monotonic() + seconds
        with self._cut_lock:
            self._cuts += 1
            self._cut_at = ends if self._cut_at is None else min(self._cut_at, ends)
        try:
            yield
        finally:
            with self._cut_lock:
                self._cuts -= 1
                if not self._cuts:
                    self._cut_at = None


class ConnectionLock:
    """The lock of one shared connection (reentrant). A thread that bounded its waits
    (:meth:`Waits.at_most`) waits for it no longer than that, then raises
    :class:`ConnectionBusyError`: another thread may hold it for as long as its statement
    waits for the database. A stop's cut (:meth:`Waits.cut`) does not bound it: the thread
    holding it waits no longer than the cut, and a writer that gave up here would take the
    busy connection for a failed write."""

    def __init__(self, waits: Waits) -> None:
        self.waits = waits
        self._lock = threading.RLock()

    def __enter__(self) -> None:
        if self._lock.acquire(blocking=False):
            return
        bound = self.waits.bound()
        if bound is None:
            self._lock.acquire()
            return
        if not self._lock.acquire(timeout=max(bound - time.monotonic(), 0.0)):
            raise ConnectionBusyError(
                "the database connection is busy (another thread of this process waits for a lock"
                " another client holds, or writes)"
            )

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._lock.release()


def busy(exc: BaseException) -> bool:
    """Whether ``exc`` is SQLite's ``SQLITE_BUSY``: another connection holds a lock this one
    needs (``database is locked``; not a table lock of a shared cache, ``SQLITE_LOCKED``)."""
    if not isinstance(exc, sqlite3.OperationalError):
        return False
    code = getattr(exc, "sqlite_errorcode", None)
    return code & 0xFF == sqlite3.SQLITE_BUSY if isinstance(code, int) else str(exc) == "database is locked"


def held_elsewhere(exc: BaseException, waited: float) -> str | None:
    """What to say of ``exc`` where it is :func:`busy` after waiting ``waited`` seconds; None otherwise.

    >>> held_elsewhere(sqlite3.OperationalError("database is locked"), 2.0)[-41:]
    'for more than 2 s; try again once it ends'
    >>> held_elsewhere(sqlite3.OperationalError("no such table: docs"), 2.0) is None
    True
    """
    if not busy(exc):
        return None
    return (
        f"another client holds a lock on the file (a write transaction, or BEGIN EXCLUSIVE) for more than"
        f" {waited:g} s; try again once it ends"
    )


class SQLiteConnection(sqlite3.Connection):
    """A ``sqlite3`` connection whose waits for another client's lock can be cut short.

    Open it with ``sqlite3.connect(path, factory=SQLiteConnection, timeout=SLICE_SECONDS)``:
    the driver waits one slice, and a statement that found the database busy is run again
    until :attr:`waits` says the wait is over. A statement is run again only where that is
    what SQLite's own wait would have done: outside a transaction (one the driver opened for
    it is rolled back first), the ``BEGIN`` of one, or its ``COMMIT``; inside a transaction the
    error is the caller's, which rolls it back.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.waits = Waits()

    def cursor(self, factory: Callable[..., sqlite3.Cursor] | None = None) -> sqlite3.Cursor:  # type: ignore[override]
        return super().cursor(factory or _Cursor)

    def execute(self, sql: str, parameters: Any = (), /) -> sqlite3.Cursor:  # type: ignore[override]
        return self.cursor().execute(sql, parameters)

    def executemany(self, sql: str, parameters: Iterable[Any], /) -> sqlite3.Cursor:  # type: ignore[override]
        return self.cursor().executemany(sql, parameters)

    def commit(self) -> None:
        # A COMMIT that found readers still on the file keeps its transaction: run it again.
        self.waiting(lambda: sqlite3.Connection.commit(self), retry_in_transaction=True)

    def waiting(self, run: Callable[[], _T], *, retry_in_transaction: bool = False) -> _T:
        """``run()``, again after each slice the database was busy, until the wait is over."""
        deadline: float | None = None
        while True:
            opened = self.in_transaction
            try:
                return run()
            except sqlite3.OperationalError as exc:
                if not busy(exc) or (opened and not retry_in_transaction):
                    raise
                # The patience counts from the wait's start; a stop's cut from when it came.
                deadline = self.waits.deadline() if deadline is None else min(deadline, self.waits.deadline())
                if time.monotonic() >= deadline:
                    raise
                if self.in_transaction and not opened:
                    sqlite3.Connection.rollback(self)  # the transaction the driver opened for it


class _Cursor(sqlite3.Cursor):
    """A cursor of :class:`SQLiteConnection`: its statements wait as the connection says."""

    connection: SQLiteConnection

    def execute(self, sql: str, parameters: Any = (), /) -> sqlite3.Cursor:  # type: ignore[override]
        return self.connection.waiting(lambda: sqlite3.Cursor.execute(self, sql, parameters))

    def executemany(self, sql: str, parameters: Iterable[Any], /) -> sqlite3.Cursor:  # type: ignore[override]
        rows: Sequence[Any] = parameters if isinstance(parameters, Sequence) else list(parameters)  # run again whole
        return self.connection.waiting(lambda: sqlite3.Cursor.executemany(self, sql, rows))

"""The Ibis backend: DuckDB (the embedded default), SQLite and PostgreSQL through ibis."""

from __future__ import annotations

import importlib
import sqlite3
from collections.abc import Mapping
from contextlib import AbstractContextManager
from typing import Any, Self
from urllib.parse import SplitResult, parse_qsl, unquote

import ibis

from reactive import checks
from reactive.backends.base import DataBackend, ListenerHooks, TableInfo, VersionColumn
from reactive.backends.base import version_columns as _version_columns
from reactive.backends.ibis import SCHEMES
from reactive.backends.ibis.checkpoints import IbisSections
from reactive.backends.ibis.connection import IbisConnection
from reactive.backends.ibis.dialects import prepare_sqlite
from reactive.backends.ibis.listener import IbisPollingListener
from reactive.backends.ibis.snapshots import SnapshotStore
from reactive.backends.ibis.source import IbisSource
from reactive.backends.ibis.stores import IbisErrors, IbisOutputs
from reactive.backends.ibis.waits import (
    PATIENCE_SECONDS,
    SLICE_SECONDS,
    ConnectionBusyError,
    SQLiteConnection,
    Waits,
    held_elsewhere,
)
from reactive.checkpoints import Positions
from reactive.errors import BackendError, ConfigurationError, ReactiveError
from reactive.outputs import OutputTypes
from reactive.queue import CDCQueue
from reactive.rowformat import RowFormat
from reactive.uri import file_path, redact, split


class IbisBackend(DataBackend):
    """SQL databases through ibis. Change detection polls (see :class:`IbisPollingListener`).

    >>> backend = IbisBackend.from_uri("duckdb://")
    >>> _ = backend.conn.con.raw_sql("create table docs (id integer primary key, text varchar)")
    >>> backend.source.describe("docs")
    TableInfo(name='docs', id_column='id', columns=('id', 'text'))

    ``version_columns`` (a connect option: table name -> column name or
    :class:`~reactive.backends.base.VersionColumn`) makes polls of those tables read only
    the rows whose version moved; a full diff every ``full_diff_every`` seconds finds deletes
    and rows written without moving it:

    >>> import duckdb, tempfile, reactive
    >>> from reactive.components import Model, Listener
    >>> path = tempfile.mkdtemp() + "/app.duckdb"
    >>> client = duckdb.connect(path)      # the application, another client
    >>> _ = client.execute("create table docs (id int primary key, text varchar, updated_at timestamp)")
    >>> _ = client.execute("create index docs_updated_at on docs (updated_at)")  # yours to create
    >>> db = reactive.connect(f"duckdb:///{path}", version_columns={"docs": "updated_at"})
    >>> _ = db.add(Listener(Model("len", predict=lambda xs: [len(x) for x in xs]), "text", "docs"))
    >>> db.cdc.start()
    >>> _ = client.execute("insert into docs values (1, 'four', now())")      # writes move updated_at
    >>> _ = client.execute("update docs set text = 'seven', updated_at = now() where id = 1")
    >>> db.cdc.wait_idle(timeout=10), db.outputs("len__text")
    (True, [{'_source': 1, '_output': 5}])
    >>> db.cdc.info()["source"]["versions"]["docs"]["full_diffs"]   # polls so far read only new versions
    0
    >>> _ = client.execute("delete from docs")    # a delete moves no version: the full diff finds it
    >>> db.cdc.listener.request_full_diff("docs")  # now, rather than within full_diff_every (60 s)
    >>> db.cdc.wait_idle(timeout=10), db.outputs("len__text")
    (True, [])
    >>> db.close()
    """

    name = "ibis"
    schemes = SCHEMES
    listener_class = IbisPollingListener

    def __init__(
        self,
        con: Any,
        *,
        uri: str,
        version_columns: Mapping[str, str | VersionColumn] | None = None,
        waits: Waits | None = None,
    ) -> None:
        self.conn = IbisConnection(con, uri=redact(uri), waits=waits)
        self.sections = IbisSections(self.conn)
        self.checkpoints = Positions(self.sections)
        self.output_types = OutputTypes(self.checkpoints)
        self.source = IbisSource(
            self.conn, output_type=self.output_types.of_table, check=lambda table: self.snapshots.check(table)
        )
        self.outputs = IbisOutputs(self.conn, decoded=self.source.decoded, outputs_lost=self._outputs_lost)
        self.errors = IbisErrors(self.conn)
        self.snapshots = SnapshotStore(
            self.conn,
            decoded=self.source.decoded,
            positions=self.checkpoints,
            versions=_version_columns(version_columns),
        )
        self._listener: IbisPollingListener | None = None

    @classmethod
    def from_uri(cls, uri: str, **options: Any) -> Self:
        """Connect; ``version_columns`` is ours (see :class:`~reactive.backends.base.VersionColumn`),
        every other option goes to ``ibis.<engine>.connect``. SQLite takes ``timeout``, as
        ``sqlite3.connect`` does: the seconds a statement waits for a lock another client holds
        (default :data:`~reactive.backends.ibis.waits.PATIENCE_SECONDS`)."""
        versions = _version_columns(options.pop("version_columns", None))
        parts = split(uri)
        scheme = parts.scheme.lower()
        path = file_path(uri) if scheme in ("duckdb", "sqlite") else ""  # refuses a query, before any file opens
        waits = None
        try:
            if scheme == "duckdb":
                con = ibis.duckdb.connect(path, **options)
            elif scheme == "sqlite":
                patience = checks.seconds("timeout", options.pop("timeout", PATIENCE_SECONDS))
                raw = sqlite3.connect(path, check_same_thread=False, timeout=SLICE_SECONDS, factory=SQLiteConnection)
                waits = raw.waits
                waits.patience = patience
                prepare_sqlite(raw)
                con = ibis.sqlite.from_connection(raw)
            elif scheme in ("postgres", "postgresql"):
                _needs_driver("psycopg", "postgres", "PostgreSQL")
                con = ibis.postgres.connect(**{**_postgres_parameters(uri, parts), **options})
            else:
                raise ConfigurationError(
                    f"the ibis backend does not handle {redact(uri)!r}; supported schemes: {', '.join(cls.schemes)}"
                )
        except ReactiveError:
            raise
        except Exception as exc:
            message = str(exc)
            for secret in _secrets(parts):
                message = message.replace(secret, "***")
            held = held_elsewhere(exc, waits.patience if waits is not None else PATIENCE_SECONDS)
            message = message if held is None else f"{message}: {held}"
            raise BackendError(f"could not connect to {redact(uri)!r}: {redact(message)}") from None
        return cls(con, uri=uri, version_columns=versions, waits=waits)

    @property
    def uri(self) -> str:
        return self.conn.uri

    #: Outputs, snapshot rows and the lease check of one window go in one transaction.
    transactional = True

    def transaction(self) -> AbstractContextManager[None]:
        return self.conn.transaction()

    def create_listener(self, queue: CDCQueue, hooks: ListenerHooks, **options: Any) -> IbisPollingListener:
        self._listener = IbisPollingListener(
            self.snapshots, queue, hooks=hooks, is_transient=self.is_transient, **options
        )
        return self._listener

    def _outputs_lost(self, table: str) -> None:
        """Outputs of ``table``'s components were dropped: the poller reconciles it (the backfill
        of ``db.add`` does when nothing follows changes yet)."""
        if self._listener is not None:
            self._listener.reconcile_soon(table)

    def row_format(self, table: TableInfo) -> RowFormat:
        return self.source.row_format(table)

    def close(self) -> None:
        self.conn.close()

    def is_transient(self, exc: BaseException) -> bool:
        return isinstance(exc, ConnectionBusyError) or self.conn.dialect.is_transient(exc)

    def stopping(self, seconds: float) -> AbstractContextManager[None]:
        return self.conn.waits.cut(seconds)

    def promptly(self, seconds: float) -> AbstractContextManager[None]:
        return self.conn.waits.at_most(seconds)


#: Query parameters of a PostgreSQL URI that hold secrets (libpq's names).
_SECRET_PARAMETERS = ("password", "sslpassword")


def _postgres_parameters(uri: str, parts: SplitResult) -> dict[str, Any]:
    """``ibis.postgres.connect``'s keywords: the URI's user, password, host, port and database,
    then its query (``?password=``, ``?sslmode=``, ...). A parameter given both ways is refused:
    which one was meant cannot be guessed."""
    given = {
        "host": parts.hostname,
        "port": parts.port,
        "user": unquote(parts.username) if parts.username else None,
        "password": unquote(parts.password) if parts.password else None,
        "database": parts.path.lstrip("/") or None,
    }
    parameters: dict[str, Any] = {key: value for key, value in given.items() if value is not None}
    for key, value in parse_qsl(parts.query):
        if key in parameters:
            raise ConfigurationError(f"the URI {redact(uri)!r} gives {key!r} twice")
        parameters[key] = value
    return {"host": "localhost", "port": 5432, **parameters}


def _secrets(parts: SplitResult) -> list[str]:
    """The secrets a URI holds, as a driver could quote them in an error."""
    found = [unquote(parts.password)] if parts.password else []
    return found + [value for key, value in parse_qsl(parts.query) if key.lower() in _SECRET_PARAMETERS and value]


def _needs_driver(module: str, extra: str, engine: str) -> None:
    """Refuse at once, with the install that brings it, an engine whose driver is missing: ibis
    said to install ``ibis-framework[postgres]``, which is not reactive's extra (it brings
    psycopg's pure-Python build, half as fast as ``psycopg[binary]``)."""
    try:
        importlib.import_module(module)
    except ImportError:
        raise ConfigurationError(
            f"{engine} needs the {extra!r} extra, whose driver ({module}) is not installed: "
            f"pip install 'reactive-ml[{extra}]'"
        ) from None

"""One ibis connection, its lock, and the caches every Ibis role shares."""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import ibis.common.exceptions as ibis_exc
import ibis.expr.datatypes as dt
import ibis.expr.types as ir
import pyarrow as pa
import sqlglot as sg
import sqlglot.expressions as sge

from reactive.backends.ibis.dialects import Dialect, TableSQL, dialect_for
from reactive.backends.ibis.waits import ConnectionLock, Waits
from reactive.errors import ConfigurationError, TableNotFoundError
from reactive.rows import TableRows, column_of


class _Reader:
    """A thread's own DuckDB connection, as the dialect's statements take one (``.con``); it
    is closed when its thread ends (its thread-local reference goes) or the connection closes.

    ``lock`` is held while a statement runs on it, and by :meth:`IbisConnection.close` to close
    it: DuckDB crashes the process, or hangs the reading thread for ever, when a connection is
    closed under a statement another thread runs on it (a ``db.search`` during ``db.close()``).
    """

    __slots__ = ("__weakref__", "con", "lock")

    def __init__(self, con: Any) -> None:
        self.con = con
        self.lock = threading.Lock()
        weakref.finalize(self, con.close)


class IbisConnection:
    """An ibis connection shared by the source reader, the stores and the snapshots.

    One connection, one lock: every statement is short (reads are paged), so the handler,
    the poller and the user's thread take turns without starving. Table handles and the
    hot-path statements of each table are built once and cached; :meth:`forget` drops them
    when a table changed under us. On DuckDB the hot-path reads (:meth:`read_rows`) go
    through a connection of each thread's own, so a poll reads while the handler writes.
    """

    def __init__(self, con: Any, *, uri: str, waits: Waits | None = None) -> None:
        self.con = con
        self.uri = uri
        self.dialect: Dialect = dialect_for(con)
        self.dialect.load_modules()
        #: How long a statement waits for a lock (SQLite's waits, given by its connection, can be
        #: cut short: see :mod:`reactive.backends.ibis.waits`), and for :attr:`lock`.
        self.waits = waits or Waits()
        self.lock = ConnectionLock(self.waits)
        self._handles: dict[str, ir.Table] = {}
        self._sql: dict[tuple[str, str, tuple[str, ...]], TableSQL] = {}
        #: Per table, whether it has its primary key (see :meth:`keyed`).
        self._keyed: dict[str, bool] = {}
        self._local = threading.local()
        self._readers: weakref.WeakSet[_Reader] = weakref.WeakSet()
        self._closed = False

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Every statement inside is written atomically (this connection's lock held throughout)."""
        with self.lock:
            self.dialect.begin(self.con)
            try:
                yield
            except BaseException:
                self.dialect.rollback(self.con)
                raise
            self.dialect.commit(self.con)

    @contextlib.contextmanager
    def refusals(self) -> Iterator[None]:
        """A call through ibis (not through the dialect's statements, which do it themselves) that
        the database refuses (``Dialect.refusal``: a privilege, a read-only session) raises the
        :class:`~reactive.errors.PermissionDeniedError` saying what to grant, not the driver's error."""
        try:
            yield
        except Exception as exc:
            refused = self.dialect.refusal(self.con, exc)
            if refused is None:
                raise
            raise refused from exc

    def close(self) -> None:
        with self.lock:
            self._closed = self.dialect.closed = True
            for reader in list(self._readers):
                with reader.lock:  # once its statement (if one runs) is over
                    reader.con.close()
            self.con.disconnect()

    def _closed_error(self) -> RuntimeError:
        return RuntimeError(f"the connection to {self.uri} is closed")

    @contextlib.contextmanager
    def _using(self, reader: _Reader) -> Iterator[_Reader]:
        """``reader``, for one statement: :meth:`close` does not close it meanwhile."""
        with reader.lock:
            if self._closed:
                raise self._closed_error()
            yield reader

    def _reader(self) -> _Reader | None:
        """This thread's own connection to the database (None where the engine has none)."""
        if not self.dialect.concurrent_reads:
            return None
        reader: _Reader | None = getattr(self._local, "reader", None)
        if reader is None:
            with self.lock:
                if self._closed:
                    raise self._closed_error()
                reader = self._local.reader = _Reader(self.con.con.cursor())
                self._readers.add(reader)
        return reader

    def read_rows(self, sql: str, *params: Any) -> Sequence[dict[str, Any]]:
        """:meth:`fetch_rows` for a read that need not see an open transaction of this shared
        connection (it sees what is committed): on DuckDB through the calling thread's own
        connection, without waiting for the shared one's lock."""
        reader = self._reader()
        if reader is None:
            return self.fetch_rows(sql, *params)
        with self._using(reader):
            return self.dialect.fetch_rows(reader, sql, params)

    def read_grouped(self, sql: str, *params: Any, value: str, by: str) -> dict[Any, list[Any]]:
        """:meth:`fetch_grouped` as :meth:`read_rows` reads."""
        reader = self._reader()
        if reader is None:
            return self.fetch_grouped(sql, *params, value=value, by=by)
        with self._using(reader):
            return self.dialect.fetch_grouped(reader, sql, params, value, by)

    def table(self, name: str) -> ir.Table:
        """An ibis handle on ``name``, cached: looking a table up costs a catalog query."""
        with self.lock:
            handle = self._handles.get(name)
            if handle is None:
                try:
                    handle = self._handles[name] = self.dialect.handle(self.con, name)
                except ibis_exc.TableNotFound:
                    raise TableNotFoundError(f"table {name!r} does not exist in {self.uri}", table=name) from None
                except ibis_exc.IbisError as exc:
                    if "infer types" not in str(exc):
                        raise
                    # SQLite: columns declared without a type, typed by ibis from the first row.
                    raise ConfigurationError(
                        f"table {name!r} has columns without a declared type and no rows to tell their types"
                        f" from ({exc}): declare each column's type (id INTEGER PRIMARY KEY, text TEXT)",
                        table=name,
                    ) from None
            return handle

    def table_exists(self, name: str) -> bool:
        with self.lock:
            return name in self._handles or self.dialect.table_exists(self.con, name)

    def forget(self, name: str) -> None:
        """Drop the cached handle and statements of ``name`` (it was altered, dropped or failed)."""
        with self.lock:
            self._handles.pop(name, None)
            self._keyed.pop(name, None)
            self._sql = {k: v for k, v in self._sql.items() if k[0] != name}

    def column_type(self, table: str, column: str) -> dt.DataType | None:
        """The type of ``table.column`` (None when the table or the column is not there)."""
        try:
            return self.table(table).schema().get(column)
        except TableNotFoundError:
            return None

    def id_type(self, table: str, column: str) -> dt.DataType | None:
        """The type of ``table``'s id column as statements take it (``Dialect.id_type``); the
        caller holds :attr:`lock`."""
        return self.dialect.id_type(self.con, table, column, self.column_type(table, column))

    def statements(
        self, table: str, id_column: str, columns: Sequence[str], *, where: Sequence[tuple[str, Any]] = ()
    ) -> TableSQL:
        """The hot-path statements reading ``columns`` of ``table`` by ``id_column``, built once;
        a scan's rows narrowed by ``where`` (see ``TableSQL``)."""
        key = (table, id_column, tuple(columns), tuple(where))
        built = self._sql.get(key)  # built: no lock (a poll reading must not wait for a write)
        if built is not None:
            return built
        with self.lock:
            built = self._sql.get(key)
            if built is None:
                built = self._sql[key] = TableSQL(
                    self.dialect,
                    table,
                    id_column,
                    columns,
                    self.id_type(table, id_column),
                    self.dialect.read_casts(self.con, table),
                    where,
                )
            return built

    def fetch(self, sql: str, *params: Any) -> list[dict[str, Any]]:
        with self.lock:
            return self.dialect.fetch(self.con, sql, params)

    def data_version(self) -> int | None:
        """See ``Dialect.data_version``: equal values mean nobody else committed in between."""
        with self.lock:
            return self.dialect.data_version(self.con)

    def fetch_plain(self, sql: str, *params: Any) -> list[dict[str, Any]]:
        """:meth:`fetch` of text, bytes, numbers and booleans only (see ``Dialect.fetch_plain``)."""
        with self.lock:
            return self.dialect.fetch_plain(self.con, sql, params)

    def fetch_rows(self, sql: str, *params: Any) -> Sequence[dict[str, Any]]:
        """Rows as the driver gives them, possibly one Arrow table (see ``Dialect.fetch_rows``)."""
        with self.lock:
            return self.dialect.fetch_rows(self.con, sql, params)

    def fetch_grouped(self, sql: str, *params: Any, value: str, by: str) -> dict[Any, list[Any]]:
        """Column ``value`` of the rows grouped by column ``by`` (see ``Dialect.fetch_grouped``)."""
        with self.lock:
            return self.dialect.fetch_grouped(self.con, sql, params, value, by)

    def execute(self, sql: str, *params: Any) -> None:
        with self.lock:
            self.dialect.execute(self.con, sql, params)

    def delete_by_ids(self, sql: str, ids: Sequence[Any]) -> None:
        """Run a ``delete_by_ids`` statement for every id, in bounded chunks."""
        chunk = self.dialect.ids_per_statement
        with self.lock:
            for start in range(0, len(ids), chunk):
                self.dialect.execute(self.con, sql, [self.dialect.bind_ids(ids[start : start + chunk])])

    def read_rows_by_ids(self, sql: str, ids: Sequence[Any]) -> Iterator[Sequence[dict[str, Any]]]:
        """The rows of a ``by_ids`` statement, one part per bounded chunk of ids (see ``read_rows``)."""
        chunk = self.dialect.ids_per_statement
        for start in range(0, len(ids), chunk):
            yield self.read_rows(sql, self.dialect.bind_ids(ids[start : start + chunk]))

    def pages(self, statements: TableSQL, key: str, page_size: int) -> Iterator[Sequence[dict[str, Any]]]:
        """Every row of ``statements``' table, ``page_size`` at a time (read as :meth:`read_rows`
        reads). Keyset pagination, each page one short statement ordered by ``key``; where the
        dialect streams scans (DuckDB), one statement in no particular order, through a
        connection of the scan's own (see ``Dialect.streamed_scans``)."""
        if self.dialect.streamed_scans:
            yield from self.streamed(statements.scan, page_size)
            return
        page = self.read_rows(statements.first_page, page_size)
        while len(page):
            yield page
            if len(page) < page_size:
                return
            page = self.read_rows(statements.next_page, column_of(page[-1:], key)[0], page_size)

    def streamed(self, sql: str, page_size: int) -> Iterator[TableRows]:
        """The rows of one statement, ``page_size`` at a time, through a connection of its own:
        the thread's reader may read again while this scan is suspended (a statement on the
        connection that streams would end the stream)."""
        with self.lock:
            if self._closed:
                raise self._closed_error()
            reader = _Reader(self.con.con.cursor())
            self._readers.add(reader)
        try:
            with self._using(reader):
                batches = iter(reader.con.execute(sql).to_arrow_reader(page_size))
            while True:
                with self._using(reader):  # each batch is read from DuckDB as it is asked for
                    batch = next(batches, None)
                if batch is None:
                    return
                if batch.num_rows:
                    yield TableRows(pa.Table.from_batches([batch]))
        finally:
            with reader.lock:
                reader.con.close()

    def upsert(self, table: str, key: str, rows: pa.Table) -> None:
        """Insert ``rows``, replacing those whose ``key`` exists: ``Dialect.upsert`` where the
        table has its primary key, ``Dialect.replace_by_key`` where it was made without one
        (``Dialect.keyed_by``; a table made with its key before keeps it)."""
        with self.lock:
            if self.keyed(table):
                self.dialect.upsert(self.con, table, key, rows)
            else:
                self.dialect.replace_by_key(self.con, table, key, rows)

    def keyed(self, table: str) -> bool:
        """Whether ``table`` has a primary key: looked up once (a catalog query), and only
        where the engine has tables without one (``Dialect.unkeyed_tables``)."""
        keyed = self._keyed.get(table)
        if keyed is None:
            with self.lock:
                keyed = bool(self.dialect.primary_key(self.con, table)) if self.dialect.unkeyed_tables else True
                self._keyed[table] = keyed
        return keyed

    def create_table(
        self,
        name: str,
        columns: Mapping[str, dt.DataType],
        *,
        key: str,
        keyed: bool = True,
        fill: str | None = None,
        unique: bool = False,
    ) -> None:
        """CREATE TABLE IF NOT EXISTS whose rows ``key`` identifies: its primary key (ibis
        cannot declare one), unless ``keyed=False`` (see ``Dialect.keyed_by``).

        With ``fill`` (a statement that inserts the first rows), the table must not exist yet;
        it is created and filled in one transaction, so a table half made is never left (a
        duplicate ``key`` fails both; without a primary key, checked after the fill, unless
        ``unique`` says the fill's keys cannot repeat: a grouping of every key, twice the fill's
        own time on DuckDB).
        """
        mapper = self.con.compiler.type_mapper
        defs = [
            sge.ColumnDef(
                this=sg.to_identifier(column, quoted=True),
                kind=mapper.from_ibis(dtype),
                constraints=[sge.ColumnConstraint(kind=sge.PrimaryKeyColumnConstraint())]
                if column == key and keyed
                else None,
            )
            for column, dtype in columns.items()
        ]
        create = sge.Create(
            kind="TABLE", exists=fill is None, this=sge.Schema(this=sg.table(name, quoted=True), expressions=defs)
        )
        if fill is None:
            with self.lock:
                existed = self.table_exists(name)
                self.execute(self.dialect.render(create))
                if existed:  # keyed or not, as it was made: looked up when needed
                    self._keyed.pop(name, None)
                else:
                    self._keyed[name] = keyed
            return
        # The key is declared up front: DuckDB builds one added later (ALTER TABLE ... ADD
        # PRIMARY KEY) in a third of the time, but a write-ahead log holding that ALTER cannot be
        # replayed by a read-only open (reactive status, any reader after a crash).
        with self.transaction():
            self.execute(self.dialect.render(create))
            self.execute(fill)
            if not keyed and not unique:
                repeated = (
                    sg.select(sg.column(key, quoted=True))
                    .from_(sg.table(name, quoted=True))
                    .group_by(sg.column(key, quoted=True))
                    .having(sge.GT(this=sge.Count(this=sge.Star()), expression=sge.convert(1)))
                    .limit(1)
                )
                if self.fetch(self.dialect.render(repeated)):
                    raise ValueError(f"{key} is not unique in {name}")
            self._keyed[name] = keyed

    def drop_table(self, name: str) -> None:
        with self.lock, self.refusals():
            self.con.drop_table(name, force=True)
            self.forget(name)

"""The Ibis backend: DuckDB (the embedded default), SQLite and PostgreSQL through ibis."""

from __future__ import annotations

import datetime as _dt
import json
import sqlite3
import threading
from collections.abc import Hashable, Iterator, Mapping, Sequence
from typing import Any, Self
from urllib.parse import parse_qsl, unquote

import ibis
import ibis.common.exceptions as ibis_exc
import ibis.expr.datatypes as dt
import ibis.expr.types as ir
import pyarrow as pa
import sqlglot as sg
import sqlglot.expressions as sge

from reactive.backends.base import (
    FINGERPRINT_FIELD,
    OUTPUT_FIELD,
    OUTPUTS_PREFIX,
    SOURCE_FIELD,
    DataBackend,
    ErrorRecord,
    OutputRecord,
    TableInfo,
    chunks,
    outputs_table,
)
from reactive.backends.ibis.dialects import (
    TableSQL,
    decode_for,
    dialect_for,
    encode_for,
    prepare_sqlite,
    timestamp_column,
)
from reactive.backends.ibis.listener import IbisPollingListener
from reactive.errors import (
    BackendError,
    ConfigurationError,
    MissingIdColumnError,
    ReactiveError,
    TableNotFoundError,
)
from reactive.events import Row, id_key
from reactive.fingerprints import plain_value
from reactive.uri import file_path, redact, split

SNAPSHOT_PREFIX = "_reactive_snapshot__"
ERRORS_TABLE = "_reactive_errors"
CHECKPOINTS_TABLE = "_reactive_checkpoints"
ROW_ID, ROW_FINGERPRINT = "row_id", "fingerprint"
_FP = "__reactive_fingerprint"
#: Largest IN list sent in one statement.
_CHUNK = 10_000


class IbisBackend(DataBackend):
    """SQL databases through ibis. Change detection polls (see :class:`IbisPollingListener`).

    >>> backend = IbisBackend.from_uri("duckdb://")
    >>> _ = backend.con.raw_sql("create table docs (id integer primary key, text varchar)")
    >>> backend.describe("docs")
    TableInfo(name='docs', id_column='id', columns=('id', 'text'))
    """

    name = "ibis"
    schemes = ("duckdb", "sqlite", "postgres", "postgresql")
    listener_class = IbisPollingListener

    def __init__(self, con: Any, *, uri: str) -> None:
        super().__init__()
        self.con = con
        self._uri = redact(uri)
        self.dialect = dialect_for(con)
        # One connection, one lock: every statement is short (reads are paged), so the
        # handler, the poller and the user's thread take turns without starving.
        self._lock = threading.RLock()
        self._handles: dict[str, ir.Table] = {}
        self._sql: dict[tuple[str, str, tuple[str, ...]], TableSQL] = {}

    @classmethod
    def from_uri(cls, uri: str, **options: Any) -> Self:
        parts = split(uri)
        scheme = parts.scheme.lower()
        try:
            if scheme == "duckdb":
                con = ibis.duckdb.connect(file_path(uri), **options)
            elif scheme == "sqlite":
                raw = sqlite3.connect(file_path(uri), check_same_thread=False, timeout=30)
                prepare_sqlite(raw)
                con = ibis.sqlite.from_connection(raw)
            elif scheme in ("postgres", "postgresql"):
                con = ibis.postgres.connect(
                    host=parts.hostname or "localhost",
                    port=parts.port or 5432,
                    user=unquote(parts.username) if parts.username else None,
                    password=unquote(parts.password) if parts.password else None,
                    database=parts.path.lstrip("/") or None,
                    **dict(parse_qsl(parts.query)),
                    **options,
                )
            else:
                raise ConfigurationError(
                    f"the ibis backend does not handle {redact(uri)!r}; supported schemes: {', '.join(cls.schemes)}"
                )
        except ReactiveError:
            raise
        except Exception as exc:
            message = str(exc)
            if parts.password:
                message = message.replace(unquote(parts.password), "***")
            raise BackendError(f"could not connect to {redact(uri)!r}: {redact(message)}") from None
        return cls(con, uri=uri)

    @property
    def uri(self) -> str:
        return self._uri

    def close(self) -> None:
        with self._lock:
            self.con.disconnect()

    def is_transient(self, exc: BaseException) -> bool:
        return self.dialect.is_transient(exc)

    # -- tables ---------------------------------------------------------------------------
    def _table(self, name: str) -> ir.Table:
        """An ibis handle on ``name``, cached: looking a table up costs a catalog query."""
        handle = self._handles.get(name)
        if handle is None:
            try:
                handle = self._handles[name] = self.con.table(name)
            except ibis_exc.TableNotFound:
                raise TableNotFoundError(f"table {name!r} does not exist in {self._uri}", table=name) from None
        return handle

    def forget(self, table: str) -> None:
        """Drop the cached handle on ``table`` (after it was altered, dropped or failed)."""
        with self._lock:
            self._handles.pop(table, None)
            self._sql = {k: v for k, v in self._sql.items() if k[0] != table}

    def table_exists(self, table: str) -> bool:
        with self._lock:
            return table in self._handles or table in self.con.list_tables()

    def describe(self, table: str, *, id_column: str | None = None) -> TableInfo:
        with self._lock:
            self._handles.pop(table, None)
            if not self.table_exists(table):
                raise TableNotFoundError(f"table {table!r} does not exist in {self._uri}", table=table)
            columns = tuple(self._table(table).columns)
            if id_column is not None:
                if id_column not in columns:
                    raise ConfigurationError(
                        f"id_column {id_column!r} is not a column of {table!r} (columns: {', '.join(columns)})",
                        table=table,
                    )
                return TableInfo(table, id_column, columns)
            key = self.dialect.primary_key(self.con, table)
            if len(key) == 1:
                return TableInfo(table, key[0], columns)
            what = "has no primary key" if not key else f"has a composite primary key ({', '.join(key)})"
            raise MissingIdColumnError(
                f"table {table!r} {what}: pass the column that identifies a row, "
                f"e.g. Listener(..., select={table!r}, id_column={columns[0]!r}); "
                f"columns: {', '.join(columns)}",
                table=table,
            )

    def count(self, table: TableInfo) -> int:
        with self._lock:
            return int(self._table(table.name).count().execute())

    def _statements(self, table: str, id_column: str, columns: Sequence[str]) -> TableSQL:
        key = (table, id_column, tuple(columns))
        statements = self._sql.get(key)
        if statements is None:
            statements = self._sql[key] = TableSQL(self.dialect, table, id_column, columns, self.snapshot_table(table))
        return statements

    def _source_sql(self, table: TableInfo) -> TableSQL:
        columns = table.columns or tuple(self._table(table.name).columns)
        return self._statements(table.name, table.id_column, columns)

    def _fetch(self, sql: str, *params: Any) -> list[dict[str, Any]]:
        return self.dialect.fetch(self.con, sql, params)

    def read_rows(self, table: TableInfo, ids: Sequence[Any]) -> dict[Hashable, Row]:
        rows: dict[Hashable, Row] = {}
        with self._lock:
            sql = self._source_sql(table).by_ids
            for chunk in chunks(list(ids), _CHUNK):
                for row in self._decoded(table.name, self._fetch(sql, self.dialect.bind_ids(chunk))):
                    rows[id_key(row[table.id_column])] = row
        return rows

    def existing_ids(self, table: TableInfo, ids: Sequence[Any]) -> set[Hashable]:
        found: set[Hashable] = set()
        with self._lock:
            sql = self._source_sql(table).ids_by_ids
            for chunk in chunks(list(ids), _CHUNK):
                found.update(id_key(row[table.id_column]) for row in self._fetch(sql, self.dialect.bind_ids(chunk)))
        return found

    def _decoded(self, table: str, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Rows as components see them: outputs stored as JSON text come back decoded."""
        if table.startswith(OUTPUTS_PREFIX) and rows and OUTPUT_FIELD in rows[0]:
            logical = self.output_type(table[len(OUTPUTS_PREFIX) :])
            if logical is not None:
                for row in rows:
                    row[OUTPUT_FIELD] = decode_for(self.dialect, logical, row[OUTPUT_FIELD])
        return rows

    def _pages(self, statements: TableSQL, key: str, page_size: int) -> Iterator[list[dict[str, Any]]]:
        """Keyset pagination: each page is one short statement, ordered by ``key``."""
        page = self._locked_fetch(statements.first_page, page_size)
        while page:
            yield page
            if len(page) < page_size:
                return
            page = self._locked_fetch(statements.next_page, page[-1][key], page_size)

    def _locked_fetch(self, sql: str, *params: Any) -> list[dict[str, Any]]:
        with self._lock:
            return self._fetch(sql, *params)

    def scan(self, table: TableInfo, *, columns: Sequence[str] | None, page_size: int) -> Iterator[list[Row]]:
        with self._lock:
            if not self.table_exists(table.name):
                return
            present = self._table(table.name).columns
            wanted = dict.fromkeys([table.id_column, *(columns or present)])
            # A column the table lacks is left out: the rows then lack that field.
            statements = self._statements(table.name, table.id_column, [c for c in wanted if c in present])
        for page in self._pages(statements, table.id_column, page_size):
            yield self._decoded(table.name, page)

    # -- snapshots: the Ibis listener's position ------------------------------------------
    @staticmethod
    def snapshot_table(table: str) -> str:
        return f"{SNAPSHOT_PREFIX}{table}"

    def ensure_snapshot(self, table: TableInfo) -> bool:
        """Record every row's fingerprint now, unless a snapshot exists. True if created."""
        with self._lock:
            name = self.snapshot_table(table.name)
            if self.table_exists(name):
                return False
            id_type = self._table(table.name).schema()[table.id_column]
            self._create_keyed_table(name, {ROW_ID: id_type, ROW_FINGERPRINT: self.dialect.fingerprint_type}, ROW_ID)
            self.dialect.execute(self.con, self._source_sql(table).fill_snapshot)
            return True

    def snapshot_diff(self, table: TableInfo) -> list[tuple[Any, str]]:
        """``(row id, "insert" | "update" | "delete")`` for every row that differs from the snapshot.

        One full outer join inside the database; only the ids of changed rows come back.
        """
        with self._lock:
            return [(row["id"], row["kind"]) for row in self._fetch(self._source_sql(table).diff)]

    def rows_with_fingerprints(self, table: TableInfo, ids: Sequence[Any]) -> list[tuple[Row, int]]:
        """The current rows with these ids, each with its fingerprint, read in one statement."""
        with self._lock:
            sql = self._source_sql(table).by_ids_with_fingerprint
            found = self._decoded(table.name, self._fetch(sql, self.dialect.bind_ids(ids)))
        return [(row, row.pop(_FP)) for row in found]

    def advance_snapshot(self, table: str, upserts: Sequence[tuple[Any, int]], deletes: Sequence[Any]) -> None:
        """Move a table's position: record processed rows' fingerprints, forget deleted rows."""
        name = self.snapshot_table(table)
        with self._lock:
            schema = self._table(name).schema()
            if deletes:
                sql = self._statements(name, ROW_ID, (ROW_ID, ROW_FINGERPRINT)).delete_by_ids
                for chunk in chunks(list(deletes), _CHUNK):
                    self.dialect.execute(self.con, sql, [self.dialect.bind_ids(chunk)])
            if upserts:
                latest = {id_key(i): (i, fp) for i, fp in upserts}
                data = pa.table(
                    {
                        ROW_ID: pa.array([i for i, _ in latest.values()], type=schema[ROW_ID].to_pyarrow()),
                        ROW_FINGERPRINT: pa.array(
                            [fp for _, fp in latest.values()], type=schema[ROW_FINGERPRINT].to_pyarrow()
                        ),
                    }
                )
                self.dialect.upsert(self.con, name, ROW_ID, data)

    # -- outputs --------------------------------------------------------------------------
    def _create_keyed_table(self, name: str, columns: Mapping[str, dt.DataType], key: str) -> None:
        """CREATE TABLE with a primary key on ``key`` (ibis cannot declare one)."""
        mapper = self.con.compiler.type_mapper
        defs = [
            sge.ColumnDef(
                this=sg.to_identifier(column, quoted=True),
                kind=mapper.from_ibis(dtype),
                constraints=[sge.ColumnConstraint(kind=sge.PrimaryKeyColumnConstraint())] if column == key else None,
            )
            for column, dtype in columns.items()
        ]
        create = sge.Create(
            kind="TABLE",
            exists=True,
            this=sge.Schema(this=sg.table(name, quoted=True), expressions=defs),
        )
        self.dialect.execute(self.con, create.sql(self.dialect.name))

    def create_outputs(self, identifier: str, source: TableInfo, output_type: str) -> None:
        if source.name == outputs_table(identifier):
            raise ConfigurationError(f"listener {identifier!r} cannot read its own outputs", listener=identifier)
        with self._lock:
            exists = self.table_exists(source.name)
            id_type = self._table(source.name).schema()[source.id_column] if exists else dt.int64
            self._create_keyed_table(
                outputs_table(identifier),
                {
                    SOURCE_FIELD: id_type,
                    OUTPUT_FIELD: self.dialect.storage_type(output_type),
                    FINGERPRINT_FIELD: dt.int64,
                },
                key=SOURCE_FIELD,
            )

    def store_outputs(
        self, identifier: str, output_type: str, kept: Sequence[tuple[int, OutputRecord, Any]], stored: list[Any]
    ) -> None:
        name = outputs_table(identifier)
        with self._lock:
            schema = self._table(name).schema()
            data = pa.table(
                {
                    SOURCE_FIELD: pa.array([r.source for _, r, _ in kept], type=schema[SOURCE_FIELD].to_pyarrow()),
                    OUTPUT_FIELD: pa.array(
                        [encode_for(self.dialect, output_type, v) for _, _, v in kept],
                        type=schema[OUTPUT_FIELD].to_pyarrow(),
                    ),
                    FINGERPRINT_FIELD: pa.array([r.fingerprint for _, r, _ in kept], type=pa.int64()),
                }
            )
            self.dialect.upsert(self.con, name, SOURCE_FIELD, data)

    def _outputs_sql(self, identifier: str) -> TableSQL:
        columns = (SOURCE_FIELD, OUTPUT_FIELD, FINGERPRINT_FIELD)
        return self._statements(outputs_table(identifier), SOURCE_FIELD, columns)

    def delete_outputs(self, identifier: str, ids: Sequence[Any]) -> None:
        with self._lock:
            if not ids or not self.table_exists(outputs_table(identifier)):
                return
            sql = self._outputs_sql(identifier).delete_by_ids
            for chunk in chunks(list(ids), _CHUNK):
                self.dialect.execute(self.con, sql, [self.dialect.bind_ids(chunk)])

    def output_fingerprints(self, identifier: str, ids: Sequence[Any]) -> dict[Hashable, int]:
        found: dict[Hashable, int] = {}
        with self._lock:
            if not ids or not self.table_exists(outputs_table(identifier)):
                return found
            sql = self._statements(outputs_table(identifier), SOURCE_FIELD, (SOURCE_FIELD, FINGERPRINT_FIELD)).by_ids
            for chunk in chunks(list(ids), _CHUNK):
                for row in self._fetch(sql, self.dialect.bind_ids(chunk)):
                    found[id_key(row[SOURCE_FIELD])] = row[FINGERPRINT_FIELD]
        return found

    def scan_output_ids(self, identifier: str, *, page_size: int) -> Iterator[list[Any]]:
        name = outputs_table(identifier)
        with self._lock:
            if not self.table_exists(name):
                return
            statements = self._statements(name, SOURCE_FIELD, (SOURCE_FIELD,))
        for page in self._pages(statements, SOURCE_FIELD, page_size):
            yield [row[SOURCE_FIELD] for row in page]

    def read_outputs(self, identifier: str) -> list[dict[str, Any]]:
        name = outputs_table(identifier)
        with self._lock:
            if not self.table_exists(name):
                return []
            o = self._table(name)
            rows = o.select(SOURCE_FIELD, OUTPUT_FIELD).order_by(SOURCE_FIELD).to_pyarrow().to_pylist()
        return self._decoded(name, rows)

    def drop_outputs(self, identifier: str) -> None:
        with self._lock:
            self.con.drop_table(outputs_table(identifier), force=True)
            self._handles.pop(outputs_table(identifier), None)
            self._sql = {k: v for k, v in self._sql.items() if k[0] != outputs_table(identifier)}
        self._forget_output_type(identifier)

    # -- errors and checkpoints -----------------------------------------------------------
    def record_errors(self, records: Sequence[ErrorRecord]) -> None:
        if not records:
            return
        schema = ibis.schema(
            {
                "listener": "string",
                "table": "string",
                "source": "string",
                "error": "string",
                "at": self.dialect.timestamp_type,
            }
        )
        data = pa.table(
            {
                "listener": [r.listener for r in records],
                "table": [r.table for r in records],
                "source": [json.dumps(r.source, default=plain_value) for r in records],
                "error": [r.error for r in records],
                "at": timestamp_column(self.dialect, [r.at for r in records]),
            }
        )
        with self._lock:
            if not self.table_exists(ERRORS_TABLE):
                self.con.create_table(ERRORS_TABLE, schema=schema)
            self.con.insert(ERRORS_TABLE, ibis.memtable(data))

    def read_errors(self, listener: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            if not self.table_exists(ERRORS_TABLE):
                return []
            t = self._table(ERRORS_TABLE)
            if listener is not None:
                t = t.filter(t.listener == listener)
            rows = t.order_by("at").to_pyarrow().to_pylist()
        for row in rows:
            row["source"] = json.loads(row["source"])
        return rows

    def load_checkpoint(self, name: str) -> dict[str, Any] | None:
        with self._lock:
            if not self.table_exists(CHECKPOINTS_TABLE):
                return None
            t = self._table(CHECKPOINTS_TABLE)
            rows = t.filter(t.name == name).select("value").to_pyarrow().to_pylist()
        return json.loads(rows[0]["value"]) if rows else None

    def delete_checkpoint(self, name: str) -> None:
        with self._lock:
            if self.table_exists(CHECKPOINTS_TABLE):
                sql = self._statements(CHECKPOINTS_TABLE, "name", ("name",)).delete_by_ids
                self.dialect.execute(self.con, sql, [self.dialect.bind_ids([name])])

    def save_checkpoint(self, name: str, value: Mapping[str, Any]) -> None:
        data = pa.table(
            {
                "name": [name],
                "value": [json.dumps(dict(value), default=plain_value)],
                "updated_at": timestamp_column(self.dialect, [_dt.datetime.now(_dt.UTC)]),
            }
        )
        with self._lock:
            if not self.table_exists(CHECKPOINTS_TABLE):
                self._create_keyed_table(
                    CHECKPOINTS_TABLE,
                    {"name": dt.string, "value": dt.string, "updated_at": self.dialect.timestamp_type},
                    key="name",
                )
            self.dialect.upsert(self.con, CHECKPOINTS_TABLE, "name", data)

"""Reading the tables listeners watch, through one :class:`IbisConnection`."""

from __future__ import annotations

import datetime as _dt
import logging
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from typing import Any

import ibis.expr.datatypes as dt

from reactive.backends.base import (
    OUTPUT_FIELD,
    TableInfo,
    case_hint,
    identify_rows,
    warn_null_ids,
    warn_unfollowed_ids,
)
from reactive.backends.ibis.connection import IbisConnection
from reactive.backends.ibis.dialects import decode_for, quoted_name
from reactive.errors import ConfigurationError, TableNotFoundError
from reactive.events import Row, id_key, is_utf8
from reactive.rowformat import RowFormat, as_json_text
from reactive.rows import TableRows, column_of
from reactive.uri import file_path

log = logging.getLogger(__name__)


class IbisSource:
    """The :class:`~reactive.backends.base.SourceReader` of SQL databases.

    ``output_type(table)`` says how the outputs in ``table`` are stored (None: it holds no
    outputs), so that rows read from an outputs table (a chained listener's source) come
    back decoded.
    """

    def __init__(
        self,
        conn: IbisConnection,
        *,
        output_type: Callable[[str], str | None],
        check: Callable[[TableInfo], None] | None = None,
    ) -> None:
        self.conn = conn
        self.output_type = output_type
        #: Checks a described table against the connection's settings (its version column).
        self.check = check

    def table_exists(self, table: str) -> bool:
        return self.conn.table_exists(table)

    def columns(self, table: str) -> tuple[str, ...]:
        return tuple(self.conn.table(table).columns)

    def describe(self, table: str, *, id_column: str | None = None) -> TableInfo:
        conn = self.conn
        for name in filter(None, (table, id_column)):
            conn.dialect.check_name(name, table=table)
        with conn.lock:
            conn.forget(table)
            if not conn.table_exists(table):
                hint = (
                    _schema_hint(table, conn.dialect.name)
                    or _usage_hint(table, conn.dialect.unusable_schemas(conn.con, table))
                    or _search_path_hint(table, conn.dialect.other_schemas(conn.con, table))
                    or case_hint(table, conn.con.list_tables())
                )
                hint += _file_hint(conn.uri)
                raise TableNotFoundError(f"table {table!r} does not exist in {conn.uri}{hint}", table=table)
            columns = self.columns(table)
            key = conn.dialect.primary_key(conn.con, table) if id_column is None else []
        info = identify_rows(table, columns, key, id_column)
        id_type = conn.column_type(table, info.id_column)
        with conn.lock:
            unsupported = conn.dialect.unsupported_id_type(conn.con, table, info.id_column)
        if unsupported is None and id_type is not None and id_type.is_unknown():
            unsupported = str(getattr(id_type, "raw_type", id_type))  # DuckDB's UHUGEINT: UINT128
        if unsupported is not None:
            # Outputs and the snapshot are keyed by a column of the id's type, named through ibis.
            raise ConfigurationError(
                f"the id column {info.id_column!r} of table {table!r} is of a type reactive cannot store ids of"
                f" ({unsupported}); name a column of another type with Listener(..., id_column=...), or change"
                " its type (text, a number, a UUID, a date or time; DuckDB: HUGEINT for UHUGEINT)",
                table=table,
            )
        if self.check is not None:
            self.check(info)
        self._warn_unfollowed(info)
        return info

    def _warn_unfollowed(self, table: TableInfo) -> None:
        """Say how many rows of ``table`` are not followed (see ``Dialect.followed``): those whose
        id is NULL, and those whose id no path can hold (on SQLite of another type than the
        column's, an infinite date, a HUGEINT past 38 digits). Nothing is counted where every row
        is followed (a primary key or NOT NULL column of another type)."""
        sql = self.conn.statements(table.name, table.id_column, [table.id_column]).unfollowed
        if sql is None:
            return
        (counts,) = self.conn.fetch_plain(sql)
        nulls, unfollowed = int(counts["nulls"] or 0), int(counts["unfollowed"] or 0)
        if nulls:
            warn_null_ids(table, nulls)
        if unfollowed > nulls:
            why = self.conn.dialect.unfollowed_ids(self.conn.column_type(table.name, table.id_column))
            warn_unfollowed_ids(table, why, unfollowed - nulls)

    def count(self, table: TableInfo, *, where: Mapping[str, Any] | None = None) -> int:
        """The rows of ``table`` that are followed (see ``Dialect.followed``); with ``where``,
        those its SQL may test narrowed as :meth:`scan` narrows them."""
        conn = self.conn
        with conn.lock:
            if conn.column_type(table.name, table.id_column) is None:  # no such column: every row
                with conn.refusals():
                    return int(conn.table(table.name).count().execute())
            narrowing = self._narrowing(table.name, where or {}, self.columns(table.name))
            statements = conn.statements(table.name, table.id_column, [table.id_column], where=narrowing)
            (counted,) = conn.fetch_plain(statements.count)
            return int(counted["rows"])

    def _statements(self, table: TableInfo) -> Any:
        return self.conn.statements(table.name, table.id_column, table.columns or self.columns(table.name))

    def read_rows(self, table: TableInfo, ids: Sequence[Any]) -> dict[Hashable, Row]:
        sql = self._statements(table).by_ids
        parts = self.conn.read_rows_by_ids(sql, list(ids))
        return {id_key(row[table.id_column]): row for part in parts for row in self.decoded(table.name, part)}

    def read_table(self, table: TableInfo, ids: Sequence[Any]) -> TableRows | None:
        """The rows with these ids as one Arrow table (:class:`~reactive.backends.base.TableReader`),
        where the engine returns Arrow (DuckDB) and the table holds no outputs to decode."""
        if not self.conn.dialect.arrow_results or self.output_type(table.name) is not None:
            return None
        parts = list(self.conn.read_rows_by_ids(self._statements(table).by_ids, list(ids)))
        return TableRows.concat(parts) if parts else None  # type: ignore[arg-type]

    def existing_ids(self, table: TableInfo, ids: Sequence[Any]) -> set[Hashable]:
        sql = self._statements(table).ids_by_ids
        parts = self.conn.read_rows_by_ids(sql, list(ids))
        return {id_key(i) for part in parts for i in column_of(part, table.id_column)}

    def scan(
        self,
        table: TableInfo,
        *,
        columns: Sequence[str] | None,
        page_size: int,
        where: Mapping[str, Any] | None = None,
    ) -> Iterator[Sequence[Row]]:
        with self.conn.lock:
            if not self.conn.table_exists(table.name):
                return
            present = self.columns(table.name)
            wanted = dict.fromkeys([table.id_column, *(columns or present)])
            # A column the table lacks is left out: the rows then lack that field.
            statements = self.conn.statements(
                table.name,
                table.id_column,
                [c for c in wanted if c in present],
                where=self._narrowing(table.name, where or {}, present),
            )
        for page in self.conn.pages(statements, table.id_column, page_size):
            yield self.decoded(table.name, page)

    def _narrowing(self, table: str, where: Mapping[str, Any], present: Sequence[str]) -> tuple[tuple[str, Any], ...]:
        """The equalities of ``where`` a scan's SQL tests without ever leaving out a row whose
        value Python's ``==`` finds equal: text against a text column, compared as text (an
        enum's or a padded ``char``'s too: SQL may keep more, never fewer), a whole number of
        int64's range against an integer column, a boolean against a boolean column (SQLite's
        1 and 0, which Python's ``==`` equates with ``True`` and ``False``, as SQL does), ``None``
        as ``IS NULL``. Others are left to
        the caller, and so is every column read through a cast, and an outputs table's
        ``_output`` (read decoded: a JSON output's text ``"spam"`` is the value ``spam``)."""
        if not where:
            return ()
        skipped = set(self.conn.dialect.read_casts(self.conn.con, table))
        if self.output_type(table) is not None:
            skipped.add(OUTPUT_FIELD)
        return tuple(
            (column, value)
            for column, value in where.items()
            if column in present and column not in skipped and _testable(self.conn.column_type(table, column), value)
        )

    def row_format(self, table: TableInfo) -> RowFormat:
        """The Avro record ``INSERT_RAW`` monitor callbacks get for a row (see :mod:`reactive.rowformat`)."""
        schema = self.conn.table(table.name).schema()
        return RowFormat.of_fields(table.name, [(column, *_avro_of(dtype)) for column, dtype in schema.items()])

    def decoded(self, table: str, rows: Sequence[Row]) -> Sequence[Row]:
        """Rows as components see them: outputs stored as JSON text come back decoded (as
        dicts; rows of any other table stay as they were read)."""
        columns = rows.columns if isinstance(rows, TableRows) else rows[0] if rows else ()
        logical = self.output_type(table) if OUTPUT_FIELD in columns else None
        if logical is None:
            return rows
        decoded = list(rows)  # dicts, decoded in place (a TableRows builds its own)
        for row in decoded:
            row[OUTPUT_FIELD] = decode_for(self.conn.dialect, logical, row[OUTPUT_FIELD])
        return decoded


def _testable(kind: dt.DataType | None, value: Any) -> bool:
    """Whether a scan's SQL may test a column of ``kind`` for equality with ``value`` (see
    ``IbisSource._narrowing``).

    >>> _testable(dt.string, "en"), _testable(dt.int16, 2**40), _testable(dt.date, None), _testable(dt.boolean, False)
    (True, True, True, True)
    >>> _testable(dt.int64, True), _testable(dt.float64, 1), _testable(dt.string, "a\\x00"), _testable(dt.int64, 2**63)
    (False, False, False, False)
    """
    if value is None:
        return True
    if kind is None:
        return False
    if type(value) is str:
        return kind.is_string() and "\x00" not in value and is_utf8(value)
    if type(value) is int:
        return kind.is_integer() and -(2**63) <= value < 2**63
    return type(value) is bool and kind.is_boolean()


def _file_hint(uri: str) -> str:
    """The file a DuckDB or SQLite URI opened, where percent-decoding made it another name than
    the URI shows (``p%41.duckdb`` is ``pA.duckdb``).

    >>> print(_file_hint("duckdb:////tmp/p%41.duckdb"))
     (the file opened is '/tmp/pA.duckdb': the URI's path is percent-decoded; write '%' as %25)
    >>> _file_hint("duckdb:////tmp/app.duckdb"), _file_hint("postgresql://h/db%41")
    ('', '')
    """
    if uri.partition("://")[0].lower() not in ("duckdb", "sqlite") or "%" not in uri:
        return ""
    return f" (the file opened is {file_path(uri)!r}: the URI's path is percent-decoded; write '%' as %25)"


def _usage_hint(table: str, schemas: list[str]) -> str:
    """Where a table of that name is, when it is in schemas reactive's role may not use.

    >>> print(_usage_hint("docs", ["public"]))
     (a table 'docs' is in schema 'public', on which reactive's role has no USAGE privilege: GRANT USAGE ON
    SCHEMA "public" TO it)
    """
    if not schemas:
        return ""
    where = ", ".join(map(repr, schemas))
    return (
        f" (a table {table!r} is in schema {where}, on which reactive's role has no USAGE privilege: GRANT USAGE ON"
        f" SCHEMA {quoted_name(schemas[0])} TO it)"
    )


def _search_path_hint(table: str, schemas: list[str]) -> str:
    """Where a table of that name is, when it is in schemas other than the current one.

    >>> print(_search_path_hint("docs", ["public"]))
     (a table 'docs' is in schema 'public': reactive follows the tables of the first schema of the
    search path; put 'public' first, e.g. '?options=-csearch_path%3Dpublic' in the URI)
    """
    if not schemas:
        return ""
    where = ", ".join(map(repr, schemas))
    return (
        f" (a table {table!r} is in schema {where}: reactive follows the tables of the first schema of the"
        f" search path; put {schemas[0]!r} first, e.g. '?options=-csearch_path%3D{schemas[0]}' in the URI)"
    )


def _schema_hint(table: str, dialect: str) -> str:
    """What to do instead where ``table`` looks schema-qualified (names are taken whole on SQL).

    >>> print(_schema_hint("app.docs", "postgres"))
     (a table name is taken whole, dots included: for table 'docs' of schema 'app', select 'docs' and put
    the schema first in the search path, e.g. '?options=-csearch_path%3Dapp' in the URI)
    >>> _schema_hint("docs", "postgres")
    ''
    """
    schema, dot, name = table.partition(".")
    if not dot:
        return ""
    whole = " (a table name is taken whole, dots included:"
    if dialect == "postgres":
        return (
            f"{whole} for table {name!r} of schema {schema!r}, select {name!r} and put the schema first in the"
            f" search path, e.g. '?options=-csearch_path%3D{schema}' in the URI)"
        )
    return f"{whole} tables of another schema or attached database are not watched)"


def _avro_of(dtype: dt.DataType) -> tuple[Any, Any]:
    """The Avro type of a column of ``dtype``, and how a value becomes one (None: as it is).

    Converters accept what the engines hand back, SQLite's included (1/0 for booleans, ISO
    text for timestamps and dates).
    """
    if dtype.is_array():
        inner, convert = _avro_of(dtype.value_type)
        if not isinstance(inner, str) or (inner == "string" and convert is as_json_text):
            return "string", as_json_text
        if convert is None:
            return {"type": "array", "items": [inner, "null"]}, None
        return {"type": "array", "items": [inner, "null"]}, lambda values: [
            None if v is None else convert(v) for v in values
        ]
    if dtype.is_boolean():
        return "boolean", bool
    if dtype.is_integer():
        if dtype.is_unsigned_integer() and dtype.nbytes >= 8:
            return "string", str
        return ("int" if dtype.nbytes < 4 or (dtype.nbytes == 4 and dtype.is_signed_integer()) else "long"), int
    if dtype.is_floating():
        return ("float" if dtype.nbytes == 4 else "double"), float
    if dtype.is_string():
        return "string", str
    if dtype.is_binary():
        return "bytes", bytes
    if dtype.is_timestamp():
        return {"type": "long", "logicalType": "timestamp-micros"}, _timestamp
    if dtype.is_date():
        return {"type": "int", "logicalType": "date"}, _date
    return "string", as_json_text


def _timestamp(value: Any) -> _dt.datetime:
    return _dt.datetime.fromisoformat(value) if isinstance(value, str) else value


def _date(value: Any) -> _dt.date:
    return _dt.date.fromisoformat(value) if isinstance(value, str) else value

"""SQL for the Ibis backend's hot paths, and what differs between the engines it is tested on.

Tables are described, created and read for users through ibis. The statements that run for
every change (reads by id, pages, the snapshot diff, upserts, deletes) are built **once per
table** as sqlglot expressions (ibis's own SQL layer) with every identifier quoted, cached as
text, and run through the DB-API driver with the row ids bound as one parameter. Building and
compiling an ibis expression costs tens of milliseconds; these statements cost a dictionary
lookup. A name is never pasted into SQL text.

Columns of a user's table are always qualified with the table (``"docs"."id"``): SQLite reads
a double-quoted name that is not a column as a string literal, so a renamed column would
silently become the same constant in every row; a qualified name that is not a column is an
error on every engine.
"""

from __future__ import annotations

import datetime as _dt
import decimal
import functools
import hashlib
import importlib
import json
import logging
import os
import re
import secrets
import sqlite3
import uuid
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar, TypeVar

import ibis
import ibis.expr.datatypes as dt
import pyarrow as pa
import pyarrow.compute as pc
import sqlglot as sg
import sqlglot.expressions as sge

from reactive.backends.base import OUTPUTS_PREFIX, own_table
from reactive.errors import BackendError, ConfigurationError, PermissionDeniedError
from reactive.events import id_key
from reactive.fingerprints import fingerprint_bytes
from reactive.outputs import ibis_type, refuse_output_type
from reactive.rows import TableRows, Unreadable, holds_map

Row = dict[str, Any]
_T = TypeVar("_T")

log = logging.getLogger(__name__)

#: Names of the views DuckDB statements read registered Arrow tables from: the ids of a
#: statement (one column, ``id``: see ``Dialect.bind_ids``) and the rows of an upsert. A
#: registered view hides a table of the same name, so the names carry a token of this process:
#: no user's table can be shadowed.
_VIEW_TOKEN = secrets.token_hex(6)
IDS_VIEW = f"__reactive_ids_{_VIEW_TOKEN}"
UPSERT_VIEW = f"__reactive_upsert_{_VIEW_TOKEN}"


def _storable(
    dtype: dt.DataType,
    *,
    scalar: Callable[[dt.DataType], bool],
    element: Callable[[dt.DataType], bool],
    nested: bool,
) -> bool:
    """Whether ``dtype`` is a scalar ``scalar`` accepts, or an array of what ``element`` accepts
    (of arrays of it too where ``nested``): what a PostgreSQL or SQLite outputs table was seen
    to store and read back (see their ``storage_type``)."""
    if not dtype.is_array():
        return scalar(dtype)
    inner = dtype.value_type
    if inner.is_array():
        return nested and _storable(inner, scalar=scalar, element=element, nested=nested)
    return element(inner)


def _plain(dtype: dt.DataType) -> bool:
    """A boolean, signed integer, float, text, binary, date or timestamp: stored by every backend."""
    return (
        dtype.is_boolean()
        or dtype.is_string()
        or dtype.is_binary()
        or _signed_or_float(dtype)
        or dtype.is_date()
        or dtype.is_timestamp()
    )


def _signed_or_float(dtype: dt.DataType) -> bool:
    return dtype.is_floating() or (dtype.is_integer() and not dtype.is_unsigned_integer())


def _pg_scalar(dtype: dt.DataType) -> bool:
    return _plain(dtype) or dtype.is_time() or dtype.is_decimal() or dtype.is_interval()


def _sqlite_element(dtype: dt.DataType) -> bool:
    """What a SQLite array (JSON text) holds: no bytes or dates, which JSON has no form for."""
    return dtype.is_boolean() or dtype.is_string() or _signed_or_float(dtype)


class BoundIds:
    """The ids of one DuckDB statement, read by it from :data:`IDS_VIEW`: binding 5,000 ids as
    one list parameter costs DuckDB about 5 ms (a conversion per value); an Arrow column
    registered as a view costs about 0.5 ms and is joined by hash."""

    __slots__ = ("ids",)

    def __init__(self, ids: Sequence[Any]) -> None:
        self.ids = list(ids)

    def table(self, con: Any) -> pa.Table:
        """The ids as an Arrow table; ids Arrow cannot type alone (integers past 64 bits) are
        typed by DuckDB itself, through a list parameter."""
        try:
            return pa.table({"id": pa.array(self.ids)})
        except (pa.ArrowException, TypeError, ValueError, OverflowError):
            return con.execute("SELECT unnest(?) AS id", [self.ids]).to_arrow_table()


def _template(sql: str, **names: str | sge.Expression) -> sge.Expression:
    """Parse a fixed template and put quoted identifiers where its ``:placeholders`` are."""
    values = {k: (sg.to_identifier(v, quoted=True) if isinstance(v, str) else v) for k, v in names.items()}
    return sge.replace_placeholders(sg.parse_one(sql, read="duckdb"), **values)


def _column(name: str, table: str | None = None) -> sge.Column:
    return sg.column(name, table=table, quoted=True)


def _row_values(rows: pa.Table) -> list[Any]:
    """Every value of ``rows``, row after row: the parameters of a statement of bound rows."""
    return [v for row in zip(*(c.to_pylist() for c in rows.columns), strict=True) for v in row]


@contextmanager
def _registered(con: Any, rows: pa.Table) -> Iterator[str]:
    """``rows`` registered on DuckDB's connection as :data:`UPSERT_VIEW` while the block runs."""
    con.con.register(UPSERT_VIEW, rows)
    try:
        yield UPSERT_VIEW
    finally:
        con.con.unregister(UPSERT_VIEW)


#: The largest integer Arrow's decimal128 holds (38 digits).
_ARROW_DECIMAL_MAX = 10**38 - 1


def _not_null(key: sge.Column, id_type: dt.DataType | None) -> sge.Expression | None:
    """``key IS NOT NULL``, or None where the column cannot hold NULL."""
    return None if id_type is not None and not id_type.nullable else sge.Not(this=key.is_(sge.null()))


def _unbounded_decimal(id_type: dt.DataType | None) -> bool:
    """Whether ``id_type`` is a NUMERIC of no declared precision (PostgreSQL's ``numeric``),
    whose ids reactive holds as ibis does, as Arrow's decimal128(38, 9)."""
    return id_type is not None and id_type.is_decimal() and id_type.precision is None


#: The largest value of Arrow's decimal128(38, 9): 29 digits before the point, 9 after.
_ARROW_DECIMAL_38_9_MAX = "99999999999999999999999999999.999999999"


def _wide_integer(id_type: dt.DataType | None) -> bool:
    """Whether ``id_type`` may be DuckDB's HUGEINT, which ibis reads as decimal(38, 0) (a
    DECIMAL(38, 0) column reads the same, and holds nothing wider: its check is always true)."""
    return id_type is not None and id_type.is_decimal() and id_type.precision == 38 and id_type.scale == 0


#: What :meth:`PostgresDialect.storage_type` and :meth:`SQLiteDialect.storage_type` take, said.
_PG_TAKES = (
    "boolean, int8-int64, float16-float64, string, binary, date, time, timestamp, decimal, interval,"
    " or an array of booleans, signed integers, floats, text, binary, dates or timestamps"
)
_SQLITE_TAKES = (
    "boolean, int8-int64, float16-float64, string, binary, date, timestamp, or an array (of arrays)"
    " of booleans, signed integers, floats or text"
)


#: DuckDB types whose values Arrow cannot carry as they are, read as their text (see
#: :meth:`Dialect.read_casts`), wherever they stand in a column's type as
#: ``information_schema.columns`` writes it; quoted names and literals (a struct's field
#: ``"BIT"``, an enum's ``'BIT'``) are skipped. DuckDB writes types in capitals and quotes a
#: field name in capitals. ``VARINT`` is ``BIGNUM`` since DuckDB 1.4.
_AS_TEXT = re.compile(r"""('(?:[^']|'')*'|"(?:[^"]|"")*")|\b(?:BIT|BIGNUM|VARINT|UHUGEINT|TIME WITH TIME ZONE)\b""")


def _read_as_text(kind: str) -> str | None:
    """DuckDB type ``kind`` with each type Arrow cannot carry made ``VARCHAR``, or None where
    it holds none.

    >>> _read_as_text("UHUGEINT"), _read_as_text("INTEGER")
    ('VARCHAR', None)
    >>> _read_as_text('STRUCT(a BIT, "BIT" INTEGER, l TIME WITH TIME ZONE[], m MAP(VARCHAR, BIGNUM))')
    'STRUCT(a VARCHAR, "BIT" INTEGER, l VARCHAR[], m MAP(VARCHAR, VARCHAR))'
    >>> _read_as_text("STRUCT(e ENUM('BIT', 'ok'))"), _read_as_text("TIMESTAMP WITH TIME ZONE")
    (None, None)
    """
    text = _AS_TEXT.sub(lambda m: m.group(1) or "VARCHAR", kind)
    return None if text == kind else text


def _sized_decimals(dtype: dt.DataType) -> dt.DataType:
    """``dtype`` with every decimal of no declared precision, at any depth, as ``decimal(38, 9)``."""
    if dtype.is_decimal() and dtype.precision is None:
        return dt.Decimal(38, 9, nullable=dtype.nullable)
    if dtype.is_array():
        return dt.Array(_sized_decimals(dtype.value_type), nullable=dtype.nullable)
    if dtype.is_struct():
        return dt.Struct({name: _sized_decimals(kind) for name, kind in dtype.items()}, nullable=dtype.nullable)
    if dtype.is_map():
        key, value = _sized_decimals(dtype.key_type), _sized_decimals(dtype.value_type)
        return dt.Map(key, value, nullable=dtype.nullable)
    return dtype


class Dialect:
    """DuckDB: information_schema, ``hash()``, native arrays, Arrow in and out."""

    name: ClassVar[str] = "duckdb"
    native_arrays: ClassVar[bool] = True
    #: Whether the driver returns result sets as Arrow tables (rows then stay one: see ``fetch_rows``).
    arrow_results: ClassVar[bool] = True
    #: Whether each thread may read through its own connection to the same database (DuckDB's
    #: ``cursor()``), beside the shared one: see ``IbisConnection.read_rows``.
    concurrent_reads: ClassVar[bool] = True
    #: Whether a scan reads the whole table in one statement, streamed in pages through a
    #: connection of its own (``IbisConnection.pages``), rather than one statement per page
    #: (keyset pagination). DuckDB: a reader holds no lock a writer waits for (MVCC), and with
    #: no index to walk each keyset page costs a pass over the table (a 500k-row scan in pages
    #: of 5,000: 0.52 s against 0.01 s streamed). SQLite (its default journal mode blocks
    #: writers while a statement reads) and PostgreSQL (pages walk the key's index) keep pages.
    streamed_scans: ClassVar[bool] = True
    timestamp_type: ClassVar[dt.DataType] = dt.Timestamp(timezone="UTC")
    #: Column type of a row fingerprint in a snapshot (DuckDB's hash is unsigned).
    fingerprint_type: ClassVar[dt.DataType] = dt.uint64
    #: Longest table or column name the engine keeps, in UTF-8 bytes (None: no limit).
    max_name_bytes: ClassVar[int | None] = None
    #: Rows per statement of a poll's diff (None: one statement for the whole table). SQLite
    #: in its default journal mode blocks every writer while a statement reads: a diff in id
    #: ranges, each its own statement, keeps that wait to one range.
    diff_range_rows: ClassVar[int | None] = None
    #: Most ids one statement takes (its ids are bound as one list, or on DuckDB one registered
    #: view). A statement costs DuckDB about 3 ms beside its rows: a growing window's ids (up to
    #: 50,000) are read in one.
    ids_per_statement: ClassVar[int] = 50_000

    #: Whether some of reactive's tables (snapshots, outputs) go without a key (see
    #: :meth:`keyed_by`). SQLite and PostgreSQL read a poll's changed rows by id, and SQLite's
    #: diff in ranges walks the key.
    unkeyed_tables: ClassVar[bool] = True
    #: Whether its text columns hold the NUL character (PostgreSQL's do not: "text fields
    #: cannot contain NUL (0x00) bytes"); an output that has one is refused alone there.
    text_holds_nul: ClassVar[bool] = True
    #: Whether the driver returns a UUID column's values as ``uuid.UUID`` (psycopg), not text.
    uuid_objects: ClassVar[bool] = False

    def keyed_by(self, id_type: dt.DataType) -> bool:
        """Whether a table reactive keys by source ids of ``id_type`` (a snapshot, an outputs
        table) gets a primary key; without one, its upserts are :meth:`replace_by_key`.

        DuckDB keeps a key as an ART index, which every write must update, and which makes
        each checkpoint cost in proportion to the whole table: 100,000 vectors of 384 floats
        keyed, a one-row upsert took 5-8 ms and every seventh or eighth one a checkpoint of
        1.5 s (DuckDB checkpoints once 16 MB of log are written); unkeyed, a delete and an
        insert took 1.2-1.4 ms with no such pause, and a backfill wrote 1.3-1.4x as fast. A
        snapshot's 300k-row bulk insert spent two thirds of the run on its key. Integer ids
        are mostly inserted in order, so without a key a delete of some ids is narrowed to the
        row groups whose id range holds them (one-row move on a 1M-row snapshot: 1.5-2.4 ms
        against 2.0-2.7 ms keyed). Ids in no order (text, UUIDs) leave it no row group to skip
        (23 ms): keyed."""
        return not (self.unkeyed_tables and id_type.is_integer())

    def load_modules(self) -> None:
        """Import now what the driver imports on first use: DuckDB imports ``pyarrow.dataset``
        (0.1 s, more on a busy process) the first time an Arrow table is registered, which would
        be the first window's output write, or a backfill's."""
        importlib.import_module("pyarrow.dataset")

    def check_name(self, name: str, *, table: str) -> None:
        """Refuse a user's name the engine cannot hold: it would have kept a shorter one."""
        size = len(name.encode("utf-8", "surrogatepass"))
        if self.max_name_bytes is not None and size > self.max_name_bytes:
            kept = name.encode("utf-8", "surrogatepass")[: self.max_name_bytes].decode("utf-8", "ignore")
            raise ConfigurationError(
                f"{name!r} is {size} bytes long: {self.name} keeps names of at most {self.max_name_bytes} bytes "
                f"(it truncates longer ones, to {kept!r})",
                table=table,
            )

    # -- catalog --------------------------------------------------------------------------
    def other_schemas(self, con: Any, table: str) -> list[str]:
        """The schemas other than the current one that hold a table (or view) named ``table``,
        for a "not found" message: none where the engine has no search path."""
        return []

    def unusable_schemas(self, con: Any, table: str) -> list[str]:
        """The schemas that hold a table (or view) named ``table`` and that the session may not
        use (no ``USAGE``), for a "not found" message: none where the engine has no schemas."""
        return []

    def table_exists(self, con: Any, name: str) -> bool:
        """Whether a table or view ``name`` is in the current schema (or a temporary one):
        what ``name in con.list_tables()`` says, in one statement (ibis's ``list_tables`` on
        DuckDB runs three: 8 ms against 1-2 ms, several times in each ``db.add``)."""
        rows = con.con.execute(
            "SELECT 1 FROM information_schema.tables WHERE table_name = ? AND table_schema = current_schema() "
            "AND table_catalog IN (current_database(), 'temp') LIMIT 1",
            [name],
        ).fetchall()
        return bool(rows)

    def handle(self, con: Any, table: str) -> Any:
        """ibis's handle on ``table`` (its columns and their types)."""
        return con.table(table)

    def primary_key(self, con: Any, table: str) -> list[str]:
        """The columns of ``table``'s primary key, in key order (none: ``[]``). DuckDB's own
        catalog function: 0.5 ms, where ibis's ``information_schema`` join took 15 ms (200 ms
        the first time)."""
        query = (
            sg.select("constraint_column_names")
            .from_(sg.func("duckdb_constraints"))
            .where(
                sg.and_(
                    sg.column("constraint_type").eq(sge.convert("PRIMARY KEY")),
                    sg.column("table_name").eq(sge.convert(table)),
                    sg.column("schema_name").eq(sg.func("current_schema")),
                    sg.column("database_name").eq(sg.func("current_database")),
                )
            )
        )
        rows = self.fetch(con, self.render(query))
        return list(rows[0]["constraint_column_names"]) if rows else []

    def id_type(self, con: Any, table: str, column: str, described: dt.DataType | None) -> dt.DataType | None:
        """The type of ``table``'s id column as the statements take it (:meth:`followed`), from
        ``described``, ibis's: ibis's own here. SQLite says more (:meth:`SQLiteDialect.id_type`)."""
        return described

    def read_casts(self, con: Any, table: str) -> dict[str, str]:
        """The columns of ``table`` read as another type than their own, and as which: on DuckDB
        those whose values Arrow cannot carry as they are, read as their text. Arrow handed a
        model ``BIT`` and ``BIGNUM`` (``VARINT``) values as DuckDB's internal bytes, a
        ``UHUGEINT`` of 2**127 or more wrapped to a negative number (Arrow's decimal128 holds
        128 signed bits) and a ``TIME WITH TIME ZONE`` without its offset, alone or inside a
        struct, list, array, map or union (read as the same type with those parts as text)."""
        rows = con.con.execute(
            "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = ? "
            "AND table_schema = current_schema() AND table_catalog IN (current_database(), 'temp')",
            [table],
        ).fetchall()
        return {column: text for column, kind in rows if (text := _read_as_text(kind)) is not None}

    def storage_type(self, logical: str) -> dt.DataType:
        """The column type for a logical output type (JSON values are stored as text); a
        decimal of no declared precision as the one its outputs are checked against and written
        as, Arrow's ``decimal128(38, 9)`` (DuckDB made its own default, ``DECIMAL(18, 3)``: a value
        of more failed its window's write, and its row was set apart with Arrow's error).

        >>> Dialect().storage_type("array<float32>"), Dialect().storage_type("json")
        (Array(value_type=Float32(nullable=True), length=None, nullable=True), String(length=None, nullable=True))
        >>> print(Dialect().storage_type("struct<price: decimal, history: array<decimal>>"))
        struct<price: decimal(38, 9), history: array<decimal(38, 9)>>
        """
        return dt.string if logical == "json" else _sized_decimals(ibis_type(logical))

    # -- statement pieces -----------------------------------------------------------------
    def row_hash(self, columns: Sequence[str], table: str | None = None) -> sge.Expression:
        """A 64-bit fingerprint of a row, computed by the engine."""
        return sge.Anonymous(this="hash", expressions=[_column(c, table) for c in columns])

    def followed(self, key: sge.Column, id_type: dt.DataType | None) -> sge.Expression | None:
        """The rows reactive follows: those whose id (``key``, a column of ``id_type``) is set
        (None where every row's is: a primary key, a NOT NULL column, whose check would cost
        DuckDB a fifth of a diff). No output or error can name a row without an id
        (``warn_null_ids``).

        Nor is a row whose id Python cannot hold: an infinite date or timestamp ('infinity',
        which such a row's every window failed on); and where ids are read through Arrow
        (DuckDB), a HUGEINT id (ibis reads the type as decimal(38, 0)) past 38 digits: Arrow's
        decimal128 holds no more, and one such row failed every statement that read the table.

        >>> print(Dialect().render(Dialect().followed(_column("id"), dt.int64)))
        NOT "id" IS NULL
        >>> Dialect().followed(_column("id"), dt.Int64(nullable=False)) is None
        True
        >>> print(Dialect().render(Dialect().followed(_column("id"), dt.Decimal(38, 0, nullable=False))))
        "id" BETWEEN -99999999999999999999999999999999999999 AND 99999999999999999999999999999999999999
        >>> print(Dialect().render(Dialect().followed(_column("id"), dt.date)))
        ISFINITE("id")

        Nor, for a NUMERIC id of no declared precision (PostgreSQL), one past what ibis reads it
        as, Arrow's decimal128(38, 9): more than 29 digits before the point or 9 after it, NaN
        or an infinity (such a row failed its window again and again, holding its table back).

        >>> print(Dialect().render(Dialect().followed(_column("id"), dt.Decimal(None, None))))
        ("id" BETWEEN -99999999999999999999999999999.999999999 AND 99999999999999999999999999999.999999999 AND "id" = ROUND("id", 9))
        """  # noqa: E501
        if id_type is not None and (id_type.is_date() or id_type.is_timestamp()):
            return sge.Anonymous(this="ISFINITE", expressions=[key])  # NULL for NULL: left out too
        if self.arrow_results and _wide_integer(id_type):
            return sge.Between(this=key, low=sge.convert(-_ARROW_DECIMAL_MAX), high=sge.convert(_ARROW_DECIMAL_MAX))
        if _unbounded_decimal(id_type):
            largest = sge.Literal.number(_ARROW_DECIMAL_38_9_MAX)
            within = sge.Between(this=key, low=sge.Neg(this=largest), high=largest)
            exact = sge.EQ(this=key, expression=sge.Round(this=key, decimals=sge.convert(9)))
            # In parentheses: the statements put it beside other conditions, and under NOT.
            return sge.paren(sge.and_(within, exact))
        return _not_null(key, id_type)

    def unfollowed_ids(self, id_type: dt.DataType | None) -> str:
        """Why a row with an id is not followed (see :meth:`followed`), for the log."""
        if id_type is not None and (id_type.is_date() or id_type.is_timestamp()):
            return "that is infinite ('infinity' or '-infinity': Python's dates cannot hold it)"
        if self.arrow_results and _wide_integer(id_type):
            return "of more than 38 digits (ids are read through Arrow's decimal128)"
        if _unbounded_decimal(id_type):
            return (
                "past what ids are held as, decimal(38, 9): more than 29 digits before the point or 9 after it,"
                " NaN or infinite (declare the column's precision, e.g. NUMERIC(38, 0), to follow every row)"
            )
        return f"that reactive cannot follow as {id_type}"

    #: DuckDB id types ibis names as another type (``information_schema.columns.data_type``):
    #: TIMETZ as ``time`` (reads by id failed: "Cannot compare values of type TIME WITH TIME
    #: ZONE and TIME"); TIMESTAMP_NS as a timestamp Python holds to the microsecond (two ids a
    #: nanosecond apart were one: outputs deleted); and types DuckDB cannot key a table by
    #: (INTERVAL, lists, arrays, structs, maps, unions: "Invalid type for index key"). Types
    #: ibis cannot name are refused too.
    UNSUPPORTED_ID_TYPES: ClassVar[frozenset[str]] = frozenset({"TIME WITH TIME ZONE", "TIMESTAMP_NS", "INTERVAL"})

    def unsupported_id_type(self, con: Any, table: str, column: str) -> str | None:
        """The database's name for the type of ``table.column`` where reactive cannot key outputs
        and snapshots by it (None where it can). ibis's type decides elsewhere: this catches
        what it names as another type."""
        rows = self.fetch(
            con,
            "SELECT data_type FROM information_schema.columns"
            " WHERE table_schema = current_schema() AND table_name = ? AND column_name = ?",
            [table, column],
        )
        found = rows[0]["data_type"] if rows else ""
        nested = found.endswith("]") or found.startswith(("STRUCT", "MAP", "UNION"))
        return found if found in self.UNSUPPORTED_ID_TYPES or nested else None

    def ids_condition(self, column: str, table: str | None = None, id_type: dt.DataType | None = None) -> sge.Condition:
        """``column`` (of ``id_type``, when known) is one of the ids bound by :meth:`bind_ids`
        (one list per statement). DuckDB hands UUIDs to Python as text and will not compare
        text with a UUID: the ids of a UUID column are cast back."""
        bound: sge.Expression = _column("id")
        if id_type is not None and id_type.is_uuid():
            bound = sge.cast(bound, "UUID")
        elif _wide_integer(id_type):
            # Bound as decimal128: compared as such, the column's own values past 38 digits
            # would fail the cast (rows the statement does not even want).
            bound = sge.cast(bound, "HUGEINT")
        return _column(column, table).isin(query=sg.select(bound).from_(sg.table(IDS_VIEW, quoted=True)))

    def bind_ids(self, ids: Sequence[Any]) -> Any:
        """The parameter that gives a statement of :meth:`ids_condition` its ids."""
        return BoundIds(ids)

    @contextmanager
    def _bound(self, con: Any, params: Sequence[Any]) -> Iterator[list[Any]]:
        """The statement's other parameters, its ids (if any) registered as :data:`IDS_VIEW`
        while it runs (one statement at a time per connection: the shared one is used under its
        lock, a thread's own reader by that thread only)."""
        bound = [p for p in params if isinstance(p, BoundIds)]
        if not bound:
            yield list(params)
            return
        if len(bound) > 1:
            raise ValueError("a DuckDB statement takes one list of ids")
        con.con.register(IDS_VIEW, bound[0].table(con.con))
        try:
            yield [p for p in params if not isinstance(p, BoundIds)]
        finally:
            con.con.unregister(IDS_VIEW)

    def _arrow(self, con: Any, sql: str, params: Sequence[Any]) -> pa.Table:
        with self._bound(con, params) as rest:
            return con.con.execute(sql, rest).to_arrow_table()

    # -- execution ------------------------------------------------------------------------
    def render(self, statement: sge.Expression) -> str:
        """The text of ``statement`` for this engine's driver, its ``sge.Placeholder`` s bound in order."""
        return statement.sql(self.name)

    def is_transient(self, exc: BaseException) -> bool:
        """Whether ``exc`` means the database is unreachable for now, not that the data is bad."""
        return False

    def refusal(self, con: Any, exc: BaseException) -> PermissionDeniedError | None:
        """``exc`` as the :class:`~reactive.errors.PermissionDeniedError` it is where the database
        refused the session a statement (a privilege it lacks, a read-only session), saying what
        to grant; None for any other error. The one place that tells them apart: every statement
        of the dialect's, and each ibis call on reactive's tables (``IbisConnection.refusals``),
        raises it in place of the driver's error."""
        return None

    #: Open transactions (``begin`` nests): statements commit on their own only outside one.
    depth: int = 0
    #: Set when the connection is closed for good (``IbisConnection.close``): nothing reopens it.
    closed: bool = False

    def begin(self, con: Any) -> None:
        """Open a transaction (or nest in the open one): every statement until :meth:`commit`
        is written atomically with the others."""
        if self.depth == 0:
            self.execute(con, self.begin_sql)
        self.depth += 1

    #: What opens a transaction.
    begin_sql: ClassVar[str] = "BEGIN TRANSACTION"

    def commit(self, con: Any) -> None:
        if self.depth > 1:
            self.depth -= 1
            return
        try:
            # Still inside the transaction while COMMIT runs: a connection lost here fails the
            # transaction (it is retried whole), never a COMMIT run again on a new connection,
            # which would commit nothing and report success.
            self.execute(con, "COMMIT")
        finally:
            self.depth = 0

    def rollback(self, con: Any) -> None:
        if self.depth:
            try:
                self.execute(con, "ROLLBACK")
            finally:
                self.depth = 0

    def fetch(self, con: Any, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        return self._arrow(con, sql, params).to_pylist()

    def fetch_plain(self, con: Any, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        """:meth:`fetch` for statements whose columns are text, bytes, numbers or booleans
        (reactive's own tables): DuckDB's own rows rather than Arrow's, whose conversion is set up
        in Python (the lease's row before each window: 0.27 ms against 0.46 ms, 17 ms against
        27 ms beside a thread running Python). Other types may come back otherwise typed."""
        if not self.arrow_results:
            return self.fetch(con, sql, params)
        with self._bound(con, params) as rest:
            cursor = con.con.execute(sql, rest)
            names = [d[0] for d in cursor.description]
            return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    def data_version(self, con: Any) -> int | None:
        """A number that stays the same while no other connection commits to the database, and
        changes when one does (this connection's own commits leave it); None where the engine
        has no such number."""
        return None

    def fetch_rows(self, con: Any, sql: str, params: Sequence[Any] = ()) -> Sequence[Row]:
        """The rows of ``sql`` in the driver's own shape: DuckDB's Arrow table, kept as one
        (:class:`~reactive.rows.TableRows`); engines whose driver gives rows give dicts."""
        if not self.arrow_results:
            return self.fetch(con, sql, params)
        return TableRows(self._arrow(con, sql, params))

    def execute(self, con: Any, sql: str, params: Sequence[Any] = ()) -> None:
        with self._bound(con, params) as rest:
            con.con.execute(sql, rest)

    def fetch_grouped(self, con: Any, sql: str, params: Sequence[Any], value: str, by: str) -> dict[Any, list[Any]]:
        """Column ``value`` of the rows, grouped by column ``by``, with no object per row (a diff
        of a million changed rows: its ids, not a million dicts). DuckDB: through Arrow."""
        table = self._arrow(con, sql, params)
        groups = table[by].unique().to_pylist()
        return {group: table[value].filter(pc.equal(table[by], group)).to_pylist() for group in groups}

    def fetch_written(self, con: Any, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        """The rows a writing statement returns (``... RETURNING``), its write committed."""
        return self.fetch(con, sql, params)

    #: Most rows an upsert writes from bound values rather than from a registered Arrow table.
    #: Registering costs DuckDB a scan set up in Python, about 1 ms, and beside threads running
    #: Python several waits for the GIL (a one-row upsert in its transaction: 1.9 ms against
    #: 0.9 ms from values, 75 ms against 32 ms beside one busy thread); values cost more per row
    #: (100 rows: 2.0 ms against 1.9 ms).
    values_rows: ClassVar[int] = 32

    def _as_values(self, rows: pa.Table) -> bool:
        """Whether ``rows`` go as bound values (few rows) rather than a registered Arrow view.
        A map never does: as Python values it is a list of pairs, which DuckDB cannot cast to a
        ``MAP`` ("Unimplemented type for cast"); through Arrow it stays one."""
        return rows.num_rows <= self.values_rows and not any(holds_map(f.type) for f in rows.schema)

    def upsert(self, con: Any, table: str, key: str, rows: pa.Table) -> None:
        """Insert ``rows``, replacing those whose ``key`` exists (needs a unique ``key``)."""
        columns = tuple(rows.column_names)
        if self._as_values(rows):
            con.con.execute(self.replace_values_sql(table, columns, rows.num_rows), _row_values(rows))
            return
        with _registered(con, rows) as view:
            con.con.execute(self.replace_sql(table, columns, view))

    def replace_by_key(self, con: Any, table: str, key: str, rows: pa.Table) -> None:
        """:meth:`upsert` for a table without a key (see :meth:`keyed_by`): the rows whose
        ``key`` is among ``rows``' are deleted, then ``rows`` inserted (``key`` unique in ``rows``)."""
        columns = tuple(rows.column_names)
        if self._as_values(rows):
            con.con.execute(self.delete_keys_sql(table, key, rows.num_rows), rows.column(key).to_pylist())
            con.con.execute(self.replace_values_sql(table, columns, rows.num_rows, replace=False), _row_values(rows))
            return
        with _registered(con, rows) as view:
            con.con.execute(self.delete_keys_sql(table, key, view))
            con.con.execute(self.replace_sql(table, columns, view, replace=False))

    @functools.lru_cache(maxsize=256)  # noqa: B019 - dialects live as long as the process
    def delete_keys_sql(self, table: str, key: str, source: int | str) -> str:
        """Delete the rows whose ``key`` is one of ``source`` bound values (a count), or one of
        the ``key`` column of the view named ``source``."""
        if isinstance(source, int):
            where = _column(key).isin(*(sge.Placeholder() for _ in range(source)))
        else:
            where = _column(key).isin(query=sg.select(_column(key)).from_(sg.table(source, quoted=True)))
        return self.render(sge.delete(sg.table(table, quoted=True), where=where))

    @functools.lru_cache(maxsize=256)  # noqa: B019 - dialects live as long as the process
    def replace_values_sql(self, table: str, columns: tuple[str, ...], count: int, *, replace: bool = True) -> str:
        """:meth:`replace_sql` from ``count`` rows of bound values, each a row's columns in order
        (``replace=False``: a plain insert)."""
        row = sge.Tuple(expressions=[sge.Placeholder() for _ in columns])
        names = [sg.to_identifier(c, quoted=True) for c in columns]
        body = sge.Values(expressions=[row.copy() for _ in range(count)])
        statement = sge.insert(body, sg.table(table, quoted=True), columns=names)
        if replace:
            statement.set("alternative", "REPLACE")
        return self.render(statement)

    @functools.lru_cache(maxsize=256)  # noqa: B019 - dialects live as long as the process
    def replace_sql(self, table: str, columns: tuple[str, ...], source: str, *, replace: bool = True) -> str:
        """DuckDB's upsert from a view: ``INSERT OR REPLACE`` (every column of a row whose key
        exists is replaced). It does what ``ON CONFLICT (key) DO UPDATE SET`` every column does,
        in 0.7x the time (5,000-row batches into a keyed table). ``replace=False``: a plain insert."""
        body = sg.select(*(_column(c) for c in columns)).from_(sg.table(source, quoted=True))
        names = [sg.to_identifier(c, quoted=True) for c in columns]
        statement = sge.insert(body, sg.table(table, quoted=True), columns=names)
        if replace:
            statement.set("alternative", "REPLACE")
        return self.render(statement)

    @functools.lru_cache(maxsize=256)  # noqa: B019 - dialects live as long as the process
    def upsert_sql(self, table: str, key: str, columns: tuple[str, ...], *, source: str | None = None) -> str:
        if source is None:
            values = sge.Values(expressions=[sge.Tuple(expressions=[sge.Placeholder() for _ in columns])])
            body: sge.Expression = values
        else:
            body = sg.select(*(_column(c) for c in columns)).from_(sg.table(source, quoted=True))
        update = [sge.EQ(this=_column(c), expression=_column(c, table="excluded")) for c in columns if c != key]
        names = [sg.to_identifier(c, quoted=True) for c in columns]
        statement = sge.insert(body, sg.table(table, quoted=True), columns=names)
        statement.set(
            "conflict",
            sge.OnConflict(
                conflict_keys=[sg.to_identifier(key, quoted=True)],
                action=sge.var("DO UPDATE") if update else sge.var("DO NOTHING"),
                expressions=update or None,
            ),
        )
        return self.render(statement)


#: The PostgreSQL connections whose lock waits :func:`_bound_lock_waits` bounded.
_BOUNDED: weakref.WeakSet[Any] = weakref.WeakSet()

#: How long a statement of reactive waits for a lock another client holds, where neither the
#: role, the database nor the URI's options set ``lock_timeout``: well within the lease's
#: renewal (every third of ``lease_ms``, 5 s by default), which waits for the same connection.
LOCK_WAIT = "1s"


def _bound_lock_waits(raw: Any) -> None:
    """Give the connection ``raw`` a ``lock_timeout`` where the server would let it wait for
    ever. One connection serves the polls, the outputs and the lease: a poll waiting on another
    client's ``ACCESS EXCLUSIVE`` lock on its table (``ALTER TABLE``, ``VACUUM FULL``, ``LOCK
    TABLE``) held it, so the lease lapsed, ``db.cdc.info()`` hung and ``db.cdc.stop()`` did not
    return until the lock was released. Now the poll fails (``LockNotAvailable``, transient) and
    is retried after a pause. A ``lock_timeout`` the operator set is kept. Done once per
    connection (a reconnect makes a new one), outside a transaction, whose rollback would undo it."""
    if raw in _BOUNDED:
        return
    from psycopg import pq

    if raw.info.transaction_status != pq.TransactionStatus.IDLE:
        return
    with raw.cursor() as cur:
        cur.execute("SELECT current_setting('lock_timeout')")
        if cur.fetchone()[0] == "0":
            cur.execute("SELECT set_config('lock_timeout', %s, false)", [LOCK_WAIT])
    _BOUNDED.add(raw)


#: The PostgreSQL connections whose time loaders :func:`_lenient_times` wrapped.
_LENIENT: weakref.WeakSet[Any] = weakref.WeakSet()

#: The types whose values psycopg refuses when Python's cannot hold them: ``'infinity'``,
#: ``'-infinity'`` and dates before year 1 (``'0044-03-15 BC'``).
_TIME_TYPES = ("date", "timestamp", "timestamptz")


def _lenient_times(raw: Any) -> None:
    """Make the connection ``raw`` read a date or timestamp Python cannot hold as an
    :class:`~reactive.rows.Unreadable` in its place, as DuckDB's rows hold it, rather than
    fail the whole read: one row holding ``'infinity'`` in any column stopped every change of
    its table (each read of changed rows raised ``DataError``). Only a key that cannot be read
    fails, and only its row (the listener records it). Done once per connection (a reconnect
    makes a new one); reactive's own connection only, never psycopg's global adapters."""
    if raw in _LENIENT:
        return
    from psycopg.adapt import Loader
    from psycopg.errors import DataError
    from psycopg.pq import Format

    for name in _TIME_TYPES:
        oid = raw.adapters.types[name].oid
        for fmt in (Format.TEXT, Format.BINARY):
            inner = raw.adapters.get_loader(oid, fmt)
            if inner is None:
                continue

            class Lenient(Loader):
                format = fmt
                _inner_class = inner

                def __init__(self, oid: int, context: Any = None) -> None:
                    super().__init__(oid, context)
                    self._inner = self._inner_class(oid, context)

                def load(self, data: Any) -> Any:
                    try:
                        return self._inner.load(data)
                    except DataError as exc:
                        return Unreadable(f"DataError: {exc}")

            raw.adapters.register_loader(oid, Lenient)
    _LENIENT.add(raw)


#: The kinds of relation a listener may follow on PostgreSQL: tables (partitioned too), views,
#: materialized views and foreign tables.
_RELKINDS = "('r', 'p', 'v', 'm', 'f')"


class PostgresDialect(Dialect):
    """PostgreSQL: ``hashtextextended`` of the row's text form, ``= ANY(array)``, executemany.

    A connection the server dropped (a restart, ``pg_terminate_backend``) is reopened once
    per statement; the statements are idempotent, so running one again is safe. One closed by
    ``db.close()`` is not (a search under way then opened a connection nothing closed).
    """

    name = "postgres"
    ids_per_statement = 10_000  # one bound list of ids
    arrow_results = False
    concurrent_reads = False
    streamed_scans = False
    fingerprint_type = dt.int64
    max_name_bytes = 63
    unkeyed_tables = False
    text_holds_nul = False
    uuid_objects = True

    def read_casts(self, con: Any, table: str) -> dict[str, str]:
        """The columns whose type is an array of a domain, read as an array of its base type: the
        server describes a domain's values as its base type's, which the driver reads, but an
        array of a domain as a type of its own, which psycopg handed over as the array's text
        (``'{1,2}'``). Every other column's values come as Python objects of their own."""
        return {column: kind for column, (kind, array) in self._domains(con, table).items() if array}

    def handle(self, con: Any, table: str) -> Any:
        """ibis's handle on ``table``, each column of a domain (``CREATE DOMAIN order_id AS bigint``)
        typed as the domain's base type: ibis names a domain's type by the domain's name, a type
        it does not know, and a domain-typed primary key was refused ("cannot store ids of
        (order_id)"); a domain is read, compared and stored as its base type."""
        handle = con.table(table)
        schema = handle.schema()
        if not any(_unknown_within(kind) for kind in schema.types):
            return handle
        domains = self._domains(con, table)
        mapper = con.compiler.type_mapper
        resolved = {
            name: mapper.from_string(domains[name][0], nullable=kind.nullable) if name in domains else kind
            for name, kind in schema.items()
        }
        return handle.op().copy(schema=ibis.schema(resolved)).to_expr()

    def _domains(self, con: Any, table: str) -> dict[str, tuple[str, bool]]:
        """The columns of ``table`` whose type is a domain or an array of one (at any depth: a
        domain over a domain), each with its base type as ``format_type`` names it, and whether
        it is an array."""
        rows = self.fetch(con, self._DOMAIN_COLUMNS, [table])
        return {row["column_name"]: (row["data_type"], row["is_array"]) for row in rows if row["data_type"]}

    #: The columns of a table (as the search path finds it) whose type is a domain, or an array
    #: of one, resolved to the base type (``pg_type.typbasetype``) one domain at a time; a typmod
    #: (``varchar(20)``) is the innermost domain's that has one. A domain cannot be declared with a
    #: typmod of its own, so none is lost on the way.
    _DOMAIN_COLUMNS = (
        "WITH RECURSIVE rel AS (SELECT to_regclass(quote_ident(%s)) AS oid),"
        " resolved(attnum, typid, typmod, depth) AS ("
        " SELECT a.attnum, a.atttypid, a.atttypmod, 0 FROM pg_catalog.pg_attribute a JOIN rel ON a.attrelid = rel.oid"
        " WHERE a.attnum > 0 AND NOT a.attisdropped"
        " UNION ALL"
        " SELECT r.attnum, CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE b.typarray END,"
        " CASE WHEN t.typtype = 'd' AND t.typtypmod <> -1 THEN t.typtypmod"
        " WHEN t.typtype <> 'd' AND e.typtypmod <> -1 THEN e.typtypmod ELSE r.typmod END, r.depth + 1"
        " FROM resolved r JOIN pg_catalog.pg_type t ON t.oid = r.typid"
        " LEFT JOIN pg_catalog.pg_type e ON t.typcategory = 'A' AND e.oid = t.typelem"
        " LEFT JOIN pg_catalog.pg_type b ON b.oid = e.typbasetype"
        " WHERE t.typtype = 'd' OR e.typtype = 'd')"
        " SELECT a.attname AS column_name, t.typcategory = 'A' AS is_array,"
        " CASE WHEN t.typtype = 'e' THEN 'enum' ELSE format_type(r.typid, r.typmod) END AS data_type"
        " FROM (SELECT DISTINCT ON (attnum) * FROM resolved ORDER BY attnum, depth DESC) r"
        " JOIN rel ON TRUE JOIN pg_catalog.pg_attribute a ON a.attrelid = rel.oid AND a.attnum = r.attnum"
        " LEFT JOIN pg_catalog.pg_type t ON t.oid = r.typid"
        " WHERE r.depth > 0"
    )

    def storage_type(self, logical: str) -> dt.DataType:
        """:meth:`Dialect.storage_type`, refusing what a PostgreSQL outputs table was not seen to
        hold (unsigned integers: no such type; ``uuid``: its binary copy fails; structs, maps,
        arrays of arrays), where it failed every window of the listener or its ``db.add``.

        >>> PostgresDialect().storage_type("uint8")
        Traceback (most recent call last):
        ...
        reactive.errors.ConfigurationError: output type 'uint8' cannot be stored on postgres: declare one of ...
        """
        dtype = super().storage_type(logical)
        if not _storable(dtype, scalar=_pg_scalar, element=_plain, nested=False):
            raise refuse_output_type(logical, self.name, _PG_TAKES)
        return dtype

    def table_exists(self, con: Any, name: str) -> bool:
        """A table, view, materialized view or foreign table of the current schema (or a temporary
        one), from ``pg_catalog``: ``information_schema``, which ibis lists, leaves out materialized
        views, and every table the role has no privilege on: a watched table the role may not read
        was said not to exist at ``db.add``, and one whose ``SELECT`` was revoked while it was
        followed was taken for dropped (its listeners stopped, its snapshot dropped, for good)."""
        return bool(self.fetch(con, self._RELATION, [name]))

    _RELATION = (
        "SELECT 1 FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace"
        f" WHERE c.relname = %s AND c.relkind IN {_RELKINDS}"
        " AND (n.nspname = current_schema() OR n.oid = pg_my_temp_schema()) LIMIT 1"
    )

    def other_schemas(self, con: Any, table: str) -> list[str]:
        """:meth:`Dialect.other_schemas`: a table of another schema of the search path is read by
        a plain ``SELECT``, but reactive follows the first schema's (it said only "does not exist")."""
        return self._schemas_holding(con, table, "n.nspname <> current_schema()")

    def unusable_schemas(self, con: Any, table: str) -> list[str]:
        """:meth:`Dialect.unusable_schemas`: a schema the role has no ``USAGE`` on is left out of
        its search path, so its tables were said not to exist, with no word of the privilege."""
        return self._schemas_holding(con, table, "NOT has_schema_privilege(n.oid, 'USAGE')")

    def _schemas_holding(self, con: Any, table: str, condition: str) -> list[str]:
        """The schemas, the system's apart, that hold a relation named ``table`` (as
        :attr:`_RELATION` counts them) and meet ``condition`` (SQL on ``n``, the namespace)."""
        rows = self.fetch(
            con,
            "SELECT n.nspname AS schema FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n"
            f" ON n.oid = c.relnamespace WHERE c.relname = %s AND c.relkind IN {_RELKINDS}"
            f" AND {condition} AND n.nspname NOT LIKE 'pg\\_%%' ORDER BY 1",
            [table],
        )
        return [row["schema"] for row in rows]

    def primary_key(self, con: Any, table: str) -> list[str]:
        """The columns of ``table``'s primary key, in key order, from ``pg_catalog``:
        ``information_schema`` shows a constraint only to a role with more than ``SELECT`` on
        its table, so a role that may only read the table was told it had no primary key."""
        sql = (
            "SELECT a.attname AS column_name FROM pg_catalog.pg_index i"
            " JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)"
            " WHERE i.indisprimary AND i.indrelid = (SELECT c.oid FROM pg_catalog.pg_class c"
            " JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace"
            " WHERE c.relname = %s AND n.nspname = current_schema())"
            " ORDER BY array_position(i.indkey::int2[], a.attnum)"
        )
        return [r["column_name"] for r in self.fetch(con, sql, [table])]

    #: The column types (``information_schema.columns.data_type``) whose ids reactive keys
    #: outputs and snapshots by: tested end to end (``test_bad_input``). Others failed or lost
    #: rows: an enum compared with text (every poll of the table failed), ``time with time
    #: zone`` read as ``time`` (two zones, one id: outputs deleted), ``inet``, ``money``,
    #: ``jsonb`` and arrays that Arrow or the driver could not take back.
    ID_TYPES: ClassVar[frozenset[str]] = frozenset(
        {
            "smallint",
            "integer",
            "bigint",
            "oid",
            "numeric",
            "real",
            "double precision",
            "text",
            "character varying",
            "character",
            "name",
            "uuid",
            "bytea",
            "boolean",
            "date",
            "timestamp without time zone",
            "timestamp with time zone",
            "time without time zone",
            "interval",
        }
    )

    def unsupported_id_type(self, con: Any, table: str, column: str) -> str | None:
        rows = self.fetch(
            con,
            "SELECT data_type, udt_name FROM information_schema.columns"
            " WHERE table_schema = current_schema() AND table_name = %s AND column_name = %s",
            [table, column],
        ) or self.fetch(con, self._MATVIEW_COLUMN, [table, column])
        if not rows or rows[0]["data_type"] in self.ID_TYPES:
            return None
        data_type, udt = rows[0]["data_type"], rows[0]["udt_name"]
        return {"ARRAY": f"{udt.lstrip('_')}[]", "USER-DEFINED": udt}.get(data_type, data_type)

    #: A materialized view's column as ``information_schema.columns`` would give it (which
    #: leaves materialized views out): its type, a domain's base type, named as ``data_type``
    #: names them; an array ``ARRAY`` and an enum ``USER-DEFINED``, with ``udt_name``.
    _MATVIEW_COLUMN = (
        "SELECT CASE WHEN t.typcategory = 'A' THEN 'ARRAY' WHEN t.typtype = 'e' THEN 'USER-DEFINED'"
        " ELSE format_type(t.oid, NULL) END AS data_type, t.typname AS udt_name"
        " FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_matviews m ON m.matviewname = %s"
        " AND m.schemaname = current_schema()"
        " JOIN pg_catalog.pg_type t ON t.oid = (SELECT COALESCE(NULLIF(d.typbasetype, 0), d.oid)"
        " FROM pg_catalog.pg_type d WHERE d.oid = a.atttypid)"
        " WHERE a.attrelid = format('%%I.%%I', m.schemaname, m.matviewname)::regclass"
        " AND a.attname = %s AND NOT a.attisdropped"
    )

    def load_modules(self) -> None:
        """Nothing: psycopg binds parameters itself."""

    def render(self, statement: sge.Expression) -> str:
        # psycopg reads every "%" of a statement run with parameters as the start of a
        # placeholder, even inside a quoted name: names and literals double theirs.
        def escape(node: sge.Expression) -> sge.Expression:
            if isinstance(node, sge.Placeholder):
                return sge.Var(this="%s")
            if isinstance(node, sge.Identifier | sge.Literal) and "%" in str(node.this):
                return type(node)(**{**node.args, "this": node.this.replace("%", "%%")})
            return node

        return statement.transform(escape).sql(self.name)

    def is_transient(self, exc: BaseException) -> bool:
        import psycopg

        return isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError)

    def refusal(self, con: Any, exc: BaseException) -> PermissionDeniedError | None:
        """:meth:`Dialect.refusal`: SQLSTATE 42501 (``InsufficientPrivilege``) or 25006
        (``ReadOnlySqlTransaction``), explained by :func:`postgres_refusal` with what the session
        reports of itself (its role, database, and whether it is read-only or a hot standby)."""
        import psycopg

        if isinstance(exc, PermissionDeniedError) or not isinstance(exc, psycopg.Error) or exc.diag is None:
            return None
        state, message = exc.diag.sqlstate, exc.diag.message_primary
        if state not in (INSUFFICIENT_PRIVILEGE, READ_ONLY_TRANSACTION) or message is None:
            return None
        info = con.con.info
        explained = postgres_refusal(
            state,
            message,
            role=info.parameter_status("session_authorization") or info.user,
            database=info.dbname,
            read_only=info.parameter_status("default_transaction_read_only"),
            hot_standby=info.parameter_status("in_hot_standby"),
        )
        return None if explained is None else PermissionDeniedError(explained)

    #: Whether the session was found read-only: it is replaced before the next statement outside
    #: a transaction, as a setting changed since (``ALTER ROLE ... SET default_transaction_read_only
    #: = off``) or a standby promoted holds for new sessions only: a retry after the change failed
    #: again, for as long as the process kept its connection.
    reopen: bool = False

    def _reconnecting(self, con: Any, run: Callable[[], _T]) -> _T:
        """``run()`` (one unit of statements); a connection lost outside a transaction is
        reopened and the unit run again; a refusal is raised as :meth:`refusal` words it."""
        try:
            if self.reopen and not self.depth:
                self.reopen = False
                con.reconnect()
            _bound_lock_waits(con.con)
            return run()
        except Exception as exc:
            refused = self.refusal(con, exc)
            if refused is not None:
                self.reopen = getattr(exc, "sqlstate", None) == READ_ONLY_TRANSACTION
                raise refused from exc
            if self.depth or self.closed or not self.is_transient(exc) or not (con.con.closed or con.con.broken):
                raise  # inside a transaction the whole unit is retried, not one statement
            log.warning("the PostgreSQL connection was lost (%s); reconnecting", exc)
            con.reconnect()
            return run()

    def row_hash(self, columns: Sequence[str], table: str | None = None) -> sge.Expression:
        row = sge.Anonymous(this="ROW", expressions=[_column(c, table) for c in columns])
        return sge.Anonymous(this="hashtextextended", expressions=[sge.cast(row, "text"), sge.convert(0)])

    def ids_condition(self, column: str, table: str | None = None, id_type: dt.DataType | None = None) -> sge.Condition:
        return sge.EQ(this=_column(column, table), expression=sge.Any(this=sge.Paren(this=sge.Placeholder())))

    def bind_ids(self, ids: Sequence[Any]) -> Any:
        return list(ids)

    def fetch(self, con: Any, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        def run() -> list[Row]:
            _lenient_times(con.con)
            with con.con.cursor() as cur:
                cur.execute(sql, list(params))
                names = [d.name for d in cur.description]
                return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

        return self._reconnecting(con, run)

    def execute(self, con: Any, sql: str, params: Sequence[Any] = ()) -> None:
        def run() -> None:
            with con.con.cursor() as cur:
                cur.execute(sql, list(params))

        self._reconnecting(con, run)

    def fetch_grouped(self, con: Any, sql: str, params: Sequence[Any], value: str, by: str) -> dict[Any, list[Any]]:
        def run() -> dict[Any, list[Any]]:
            _lenient_times(con.con)
            with con.con.cursor() as cur:
                cur.execute(sql, list(params))
                return _grouped(cur, value, by)

        return self._reconnecting(con, run)

    def upsert(self, con: Any, table: str, key: str, rows: pa.Table) -> None:
        """``COPY`` the rows into a temporary table, then one ``INSERT ... SELECT ... ON CONFLICT``:
        binary COPY where every column's type is known (vectors as ``float4[]``), text COPY
        otherwise. About 8x the rows/s of one ``INSERT`` per row for narrow rows, 10x for
        384-float vectors (measured 25k -> 193k and 1.1k -> 11.8k rows/s)."""
        from psycopg import sql

        columns = tuple(rows.column_names)
        types = [_postgres_type(field.type) for field in rows.schema]
        # The last row of an id wins, as it would with one upsert per row (one INSERT ... SELECT
        # cannot update a row twice).
        position = columns.index(key)
        latest = {id_key(row[position]): row for row in zip(*(rows[c].to_pylist() for c in columns), strict=True)}
        staging = sql.Identifier("__reactive_upsert_" + hashlib.sha1(table.encode()).hexdigest()[:16])
        names = sql.SQL(", ").join(map(sql.Identifier, columns))
        updates = [sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(c)) for c in columns if c != key]
        action = sql.SQL("DO UPDATE SET ") + sql.SQL(", ").join(updates) if updates else sql.SQL("DO NOTHING")
        statements = (
            sql.SQL("CREATE TEMPORARY TABLE {} (LIKE {}) ON COMMIT DROP").format(staging, sql.Identifier(table)),
            sql.SQL("COPY {} ({}) FROM STDIN{}").format(
                staging, names, sql.SQL(" (FORMAT BINARY)" if all(types) else "")
            ),
            sql.SQL("INSERT INTO {} ({}) SELECT {} FROM {} ON CONFLICT ({}) ").format(
                sql.Identifier(table), names, names, staging, sql.Identifier(key)
            )
            + action,
            sql.SQL("DROP TABLE {}").format(staging),
        )

        def run() -> None:
            with con.con.transaction(), con.con.cursor() as cur:
                cur.execute(statements[0])
                with cur.copy(statements[1]) as copy:
                    if all(types):
                        copy.set_types(types)
                    for row in latest.values():
                        copy.write_row(row)
                cur.execute(statements[2])
                cur.execute(statements[3])

        self._reconnecting(con, run)


#: The SQLSTATEs of PostgreSQL refusing a session a statement: a privilege its role lacks
#: (also "must be owner of"), and a read-only transaction (``default_transaction_read_only``,
#: a hot standby).
INSUFFICIENT_PRIVILEGE, READ_ONLY_TRANSACTION = "42501", "25006"

_DENIED = re.compile(r"permission denied for (schema|table|view|materialized view|relation) (.+)")
_NOT_OWNER = re.compile(r"must be owner of (?:table|relation|view|materialized view) (.+)")
_NO_TEMPORARY = re.compile(r'permission denied to create temporary tables in database "?(.+?)"?$')


def quoted_name(name: str) -> str:
    """``name`` as a quoted PostgreSQL identifier, for a statement a message gives to run.

    >>> print(quoted_name('a"b'))
    "a""b"
    """
    return sg.to_identifier(name, quoted=True).sql("postgres")


def postgres_refusal(
    state: str,
    message: str,
    *,
    role: str,
    database: str,
    read_only: str | None = None,
    hot_standby: str | None = None,
) -> str | None:
    """What PostgreSQL refusing reactive's session a statement (SQLSTATE ``state``, its primary
    ``message``) means and what mends it: the privilege, its object and the ``GRANT`` (reactive
    reads the tables it watches; it creates tables of its own in the same schema and reads and
    writes them), or the read-only setting. None where ``state`` is no such refusal. Names only
    the role and the database, never a URI (no credentials).

    >>> print(postgres_refusal("42501", "permission denied for schema public", role="app", database="shop"))
    role "app" may not create reactive's tables in schema "public" of database "shop" (permission denied for
    schema public): reactive keeps its outputs, snapshots, checkpoints and errors in tables of its own beside the
    tables it follows; GRANT USAGE, CREATE ON SCHEMA "public" TO "app"
    >>> own = "permission denied for table _reactive_checkpoints"
    >>> print(postgres_refusal("42501", own, role="app", database="shop"))
    role "app" may not read and write reactive's table "_reactive_checkpoints" of database "shop" (permission
    denied for table _reactive_checkpoints; made by another role?): GRANT SELECT, INSERT, UPDATE, DELETE ON
    "_reactive_checkpoints" TO "app" (and so on each of reactive's tables that role made: _reactive_checkpoints,
    _reactive_errors, _reactive_snapshot__*, _outputs__*)
    >>> print(postgres_refusal("42501", "permission denied for table docs", role="app", database="shop"))
    role "app" may not read table "docs" of database "shop" (permission denied for table docs): GRANT SELECT ON
    "docs" TO "app"
    >>> print(postgres_refusal("25006", "cannot execute CREATE TABLE in a read-only transaction", role="app",
    ...                        database="shop", read_only="on", hot_standby="off"))
    database "shop" is read-only for role "app" (cannot execute CREATE TABLE in a read-only transaction):
    default_transaction_read_only is on (set for the database, the role or in the URI's options), and reactive writes
    its outputs, snapshots and checkpoints there; turn it off for reactive's role: ALTER ROLE "app" SET
    default_transaction_read_only = off (a role's setting overrides the database's), or in the URI:
    ?options=-cdefault_transaction_read_only%3Doff
    >>> postgres_refusal("23505", "duplicate key value violates unique constraint", role="app", database="shop")
    """
    grantee, db = quoted_name(role), quoted_name(database)
    who = f"role {grantee}"
    if state == READ_ONLY_TRANSACTION:
        if hot_standby == "on" or "during recovery" in message:
            return (
                f"database {db} is a hot standby, read-only ({message}): reactive writes its outputs, snapshots and"
                " checkpoints to the database it follows; connect it to the primary"
            )
        why = (
            "default_transaction_read_only is on (set for the database, the role or in the URI's options)"
            if read_only == "on"
            else "the session's transactions are read-only (transaction_read_only)"
        )
        return (
            f"database {db} is read-only for {who} ({message}): {why}, and reactive writes its outputs, snapshots"
            f" and checkpoints there; turn it off for reactive's role: ALTER ROLE {grantee} SET"
            " default_transaction_read_only = off (a role's setting overrides the database's), or in the URI:"
            " ?options=-cdefault_transaction_read_only%3Doff"
        )
    if state != INSUFFICIENT_PRIVILEGE:
        return None
    where = f"of database {db} ({message}"
    if denied := _DENIED.fullmatch(message):
        kind, name = denied.groups()
        target = quoted_name(name)
        if kind == "schema":
            return (
                f"{who} may not create reactive's tables in schema {target} {where}): reactive keeps its outputs,"
                " snapshots, checkpoints and errors in tables of its own beside the tables it follows;"
                f" GRANT USAGE, CREATE ON SCHEMA {target} TO {grantee}"
            )
        if own_table(name) or name.startswith(OUTPUTS_PREFIX):
            return (
                f"{who} may not read and write reactive's table {target} {where}; made by another role?): GRANT"
                f" SELECT, INSERT, UPDATE, DELETE ON {target} TO {grantee} (and so on each of reactive's tables that"
                f" role made: _reactive_checkpoints, _reactive_errors, _reactive_snapshot__*, {OUTPUTS_PREFIX}*)"
            )
        return f"{who} may not read {kind} {target} {where}): GRANT SELECT ON {target} TO {grantee}"
    if owner := _NOT_OWNER.fullmatch(message):
        target = quoted_name(owner.group(1))
        return (
            f"{who} may not drop or alter table {target} {where}): only its owner may; run reactive as the role"
            f" that owns it, or make it the owner: ALTER TABLE {target} OWNER TO {grantee}"
        )
    if _NO_TEMPORARY.fullmatch(message):
        return (
            f"{who} may not create temporary tables in database {db} ({message}): reactive stages the rows it"
            f" writes in one; GRANT TEMPORARY ON DATABASE {db} TO {grantee}"
        )
    return (
        f"{who} was refused a statement in database {db} ({message}): reactive reads the tables it follows, and"
        " creates, reads and writes tables of its own in their schema; grant the role what it lacks"
    )


def _unknown_within(dtype: dt.DataType) -> bool:
    """Whether ibis could not name ``dtype``, or a type inside it (an array's elements)."""
    return dtype.is_unknown() or (dtype.is_array() and _unknown_within(dtype.value_type))


def _grouped(cursor: Any, value: str, by: str) -> dict[Any, list[Any]]:
    """A DB-API cursor's rows, column ``value`` grouped by column ``by``, read in chunks."""
    names = [d[0] for d in cursor.description]
    at, key = names.index(value), names.index(by)
    groups: dict[Any, list[Any]] = {}
    while rows := cursor.fetchmany(10_000):
        for row in rows:
            groups.setdefault(row[key], []).append(row[at])
    return groups


_POSTGRES_TYPES = {
    pa.bool_(): "bool",
    pa.int16(): "int2",
    pa.int32(): "int4",
    pa.int64(): "int8",
    pa.float32(): "float4",
    pa.float64(): "float8",
    pa.string(): "text",
    pa.large_string(): "text",
    pa.binary(): "bytea",
    pa.large_binary(): "bytea",
    pa.uuid(): "uuid",
}


def _postgres_type(arrow_type: pa.DataType) -> str | None:
    """The PostgreSQL type binary COPY sends a column of ``arrow_type`` as (None: not known here)."""
    if pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type) or pa.types.is_fixed_size_list(arrow_type):
        # A binary array carries its element type's OID, which must be the column's exactly:
        # numbers only (text arrays may be varchar[] columns; they go as text COPY).
        inner = arrow_type.value_type
        numeric = pa.types.is_integer(inner) or pa.types.is_floating(inner) or pa.types.is_boolean(inner)
        return _POSTGRES_TYPES[inner] + "[]" if numeric and inner in _POSTGRES_TYPES else None
    return _POSTGRES_TYPES.get(arrow_type)


def sqlite_moment(value: Any) -> Any:
    """A date or datetime as the text sqlite3's default adapters wrote (ISO 8601, a space
    before the time), anything else as it is. Those adapters are deprecated since Python 3.12
    (a warning at every write of one) and are to go; registering our own would change how
    every sqlite3 connection of the application writes them.

    >>> sqlite_moment(_dt.date(2024, 1, 2)), sqlite_moment(_dt.datetime(2024, 1, 2, 3, 4, 5, 6)), sqlite_moment(7)
    ('2024-01-02', '2024-01-02 03:04:05.000006', 7)
    """
    if isinstance(value, _dt.datetime):
        return value.isoformat(" ")
    if isinstance(value, _dt.date):
        return value.isoformat()
    return value


class SQLiteDialect(Dialect):
    """SQLite: pragma_table_info, a Python hash function, JSON text for arrays and id lists."""

    arrow_results = False
    concurrent_reads = False
    streamed_scans = False
    name = "sqlite"
    ids_per_statement = 10_000  # one bound list of ids
    diff_range_rows = 5_000
    native_arrays = False
    # Python's sqlite3 cannot bind timestamps; ISO-8601 text sorts the same way.
    timestamp_type = dt.string
    fingerprint_type = dt.int64
    unkeyed_tables = False

    def load_modules(self) -> None:
        """Nothing: sqlite3 binds parameters itself."""

    #: The main database file as first polled: its path and the (device, inode) it named.
    opened_file: tuple[str, tuple[int, int]] | None = None

    def data_version(self, con: Any) -> int | None:
        """``PRAGMA data_version``: SQLite's count of commits by other connections, any process.

        Each poll first checks that the file's path still names the file this connection has
        open. A file replaced under the process (a restore: moved away, another put in place)
        or deleted was still read and written through the open handle: polls found nothing new,
        ``wait_idle`` said True, and the outputs went to a file nobody would open again. Now each
        poll fails saying so (``info()["source"]["last_error"]``) until the file is back or the
        process is restarted on the file now there."""
        self._check_opened_file(con)
        return int(con.con.execute("PRAGMA data_version").fetchone()[0])

    def _check_opened_file(self, con: Any) -> None:
        if self.opened_file is None:
            path = next((row[2] for row in con.con.execute("PRAGMA database_list") if row[1] == "main"), "")
            if path:  # "" for a database in memory
                found = os.stat(path)
                self.opened_file = (path, (found.st_dev, found.st_ino))
            return
        path, identity = self.opened_file
        try:
            found = os.stat(path)
        except FileNotFoundError:
            raise BackendError(
                f"the database file {path!r} was deleted under this process: it still reads and writes the file"
                " it opened, which nobody else sees; put the file back, or restart the process"
            ) from None
        if (found.st_dev, found.st_ino) != identity:
            raise BackendError(
                f"the database file {path!r} was replaced under this process (a restore?): it still reads and"
                " writes the file it opened; restart the process to follow the file now there"
            )

    def read_casts(self, con: Any, table: str) -> dict[str, str]:
        """None: the driver hands every column's values over as Python objects of their own."""
        return {}

    def table_exists(self, con: Any, name: str) -> bool:
        return name in con.list_tables()

    def handle(self, con: Any, table: str) -> Any:
        """ibis's handle on ``table``, with its generated columns: ibis reads ``pragma_table_info``,
        which leaves them out, so ``key=`` one said the table had no such column. Their types
        are parsed as ibis parses the others'."""
        import ibis.expr.operations as ops

        handle = con.table(table)
        rows = con.con.execute('SELECT name, type, "notnull", hidden FROM pragma_table_xinfo(?)', [table]).fetchall()
        if not any(hidden in (2, 3) for *_, hidden in rows):
            return handle
        parse = getattr(con, "_parse_type", None) or con.compiler.type_mapper.from_string
        known = handle.schema()
        columns = {
            name: known[name] if name in known else parse(declared, nullable=not notnull)
            for name, declared, notnull, hidden in rows
            if hidden in (0, 2, 3)  # 1: a virtual table's hidden column
        }
        op = handle.op()
        return ops.DatabaseTable(op.name, ibis.schema(columns), op.source, namespace=op.namespace).to_expr()

    def primary_key(self, con: Any, table: str) -> list[str]:
        query = (
            sg.select("name", "pk")
            .from_(sg.func("pragma_table_info", sge.convert(table)))
            .where(sg.column("pk").neq(0))
            .order_by("pk")
        )
        return [row["name"] for row in self.fetch(con, self.render(query))]

    def id_type(self, con: Any, table: str, column: str, described: dt.DataType | None) -> dt.DataType | None:
        """An integer id that is the table's rowid (an ``INTEGER PRIMARY KEY``) as not nullable,
        any other as nullable: only a rowid holds nothing but integers, never NULL, so only its
        rows need no ``TYPEOF`` filter (:meth:`followed`): ``db.add`` then counts a 1M-row
        table in 6 ms instead of 53, and need not count unfollowed rows (50 ms); a full
        diff (1.6 s) is 1-2% faster. ibis's nullability is not relied on: SQLite keeps text in
        an ``INTEGER NOT NULL`` column.

        SQLite's rule: the one primary-key column, declared ``INTEGER`` exactly, of a table
        with rowids, and not ``INTEGER PRIMARY KEY DESC`` in the column's own definition; all
        but the rowid alias have an index of origin ``pk`` in ``PRAGMA index_list``, a
        ``WITHOUT ROWID`` table included.
        """
        if described is None or not described.is_integer():
            return described
        key = self.fetch(con, "SELECT name, type FROM pragma_table_info(?) WHERE pk > 0", [table])
        alias = (
            len(key) == 1
            and key[0]["name"] == column
            and str(key[0]["type"]).upper() == "INTEGER"
            and not self.fetch(con, "SELECT 1 FROM pragma_index_list(?) WHERE origin = 'pk'", [table])
        )
        return described.copy(nullable=not alias)

    def storage_type(self, logical: str) -> dt.DataType:
        """Arrays as JSON text; refusing what a SQLite outputs table was not seen to hold (8- and
        64-bit unsigned integers, times, decimals, intervals, UUIDs, structs, maps, arrays of
        anything but numbers, booleans and text), where it failed every window or its ``db.add``.

        >>> SQLiteDialect().storage_type("array<float32>"), SQLiteDialect().storage_type("json")
        (String(length=None, nullable=True), String(length=None, nullable=True))
        """
        dtype = super().storage_type(logical)
        if not _storable(dtype, scalar=_plain, element=_sqlite_element, nested=True):
            raise refuse_output_type(logical, self.name, _SQLITE_TAKES)
        return dt.string if dtype.is_array() else dtype

    def row_hash(self, columns: Sequence[str], table: str | None = None) -> sge.Expression:
        # quote() renders each value as an SQL literal: NULL, numbers, 'text' and X'blob'
        # never collide, so the joined text identifies the row. It ends a text at its first NUL,
        # so a text holding one is T<hex> instead (a change after the NUL went unseen); every
        # other value keeps the fingerprint it had (about 12% more time for three columns).
        def part(name: str) -> sge.Expression:
            value = _column(name, table)
            nul_at = sge.Anonymous(this="instr", expressions=[sge.cast(value, "BLOB"), _NUL])
            holds_nul = sge.and_(
                sge.GT(this=nul_at, expression=sge.convert(0)),
                sge.Anonymous(this="typeof", expressions=[value]).eq(sge.convert("text")),
            )
            spelled = sge.DPipe(this=sge.convert("T"), expression=sge.Anonymous(this="hex", expressions=[value]))
            quoted = sge.Anonymous(this="quote", expressions=[value])
            return sge.Case(ifs=[sge.If(this=holds_nul, true=spelled)], default=quoted)

        parts: list[sge.Expression] = [part(c) for c in columns]
        joined = sge.DPipe(this=parts[0], expression=sge.convert("")) if len(parts) == 1 else parts[0]
        for part in parts[1:]:
            joined = sge.DPipe(this=sge.DPipe(this=joined, expression=sge.convert(",")), expression=part)
        # As bytes: SQLite keeps whatever bytes a client wrote as TEXT, and a text argument that
        # is not UTF-8 fails the function (and the whole statement) before it runs.
        as_bytes = sge.Cast(this=joined, to=sge.DataType.build("BLOB"))
        return sge.Anonymous(this="reactive_fingerprint", expressions=[as_bytes])

    def followed(self, key: sge.Column, id_type: dt.DataType | None) -> sge.Expression | None:
        """Rows whose id is stored as the column's type says: SQLite keeps any value in any
        column but an ``INTEGER PRIMARY KEY`` (``id PRIMARY KEY`` holding 1 and 'two'), and an
        id of another type cannot be stored in the snapshot or the outputs, keyed by that type.
        ``typeof`` is never 'null' for such a type: NULL ids are left out too. A rowid (an
        integer id :meth:`id_type` says is not nullable) holds nothing else: every row.

        >>> d = SQLiteDialect()
        >>> for id_type in (dt.int64, dt.float64, dt.date):
        ...     print(d.render(d.followed(_column("id"), id_type)))
        TYPEOF("id") IN ('integer')
        TYPEOF("id") IN ('integer', 'real')
        NOT "id" IS NULL
        >>> d.followed(_column("id"), dt.Int64(nullable=False)) is None
        True
        """
        if id_type is not None and id_type.is_integer() and not id_type.nullable:
            return None
        stored = self.stored_types(id_type)
        if not stored:  # dates and times are text here: no infinity to leave out
            return _not_null(key, id_type)
        return sge.Anonymous(this="TYPEOF", expressions=[key]).isin(*map(sge.convert, stored))

    def unfollowed_ids(self, id_type: dt.DataType | None) -> str:
        return f"that is not {id_type} (SQLite keeps a value of any type in any column)"

    def unsupported_id_type(self, con: Any, table: str, column: str) -> str | None:
        """None: SQLite's values are integers, reals, text or blobs, each an id reactive keeps."""
        return None

    @staticmethod
    def stored_types(id_type: dt.DataType | None) -> tuple[str, ...]:
        """What ``typeof`` says of the values a column of ``id_type`` reads back as that type (none
        where it is not known: dates and timestamps are text, numbers or nothing)."""
        if id_type is None:
            return ()
        if id_type.is_integer() or id_type.is_boolean():
            return ("integer",)
        if id_type.is_floating() or id_type.is_decimal():
            return ("integer", "real")
        if id_type.is_string():
            return ("text",)
        if id_type.is_binary():
            return ("blob",)
        return ()

    def ids_condition(self, column: str, table: str | None = None, id_type: dt.DataType | None = None) -> sge.Condition:
        # The ids come as one JSON array; JSON has no bytes, so a BLOB id travels as
        # {"blob": hex} and becomes bytes again here (see bind_ids). So does a text id holding
        # NUL, as {"text": hex}: SQLite's JSON functions end a text at its first NUL.
        def field(name: str) -> sge.Expression:
            return sge.Anonymous(this="json_extract", expressions=[sg.column("value"), sge.convert(f"$.{name}")])

        def from_hex(name: str) -> sge.Expression:
            return sge.Anonymous(this="reactive_blob", expressions=[field(name)])

        value = sge.Case(
            ifs=[
                sge.If(
                    this=sge.and_(
                        sg.column("type").eq(sge.convert("object")), sge.Not(this=field("text").is_(sge.null()))
                    ),
                    true=sge.cast(from_hex("text"), "TEXT"),
                ),
                sge.If(this=sg.column("type").eq(sge.convert("object")), true=from_hex("blob")),
            ],
            default=sg.column("value"),
        )
        each = sg.select(value).from_(sge.Anonymous(this="json_each", expressions=[sge.Placeholder()]))
        return _column(column, table).isin(query=each)

    def bind_ids(self, ids: Sequence[Any]) -> Any:
        """The ids as one JSON array (see :meth:`ids_condition`).

        >>> SQLiteDialect().bind_ids([1, "a", b"\\x01", "a\\x00b"])
        '[1, "a", {"blob": "01"}, {"text": "610062"}]'
        """
        return json.dumps([_id_json(i) for i in ids])

    # Take the write lock at once: the lease's check inside the transaction then holds.
    begin_sql = "BEGIN IMMEDIATE"

    def begin(self, con: Any) -> None:
        # Not through execute(), which commits a statement run outside a transaction: it
        # committed the BEGIN itself, so the write lock was let go at once and a transaction's
        # DDL (a snapshot's CREATE TABLE) was committed on its own.
        if self.depth == 0:
            con.con.execute(self.begin_sql)
        self.depth += 1

    def is_transient(self, exc: BaseException) -> bool:
        # Another connection holds the write lock for longer than the busy timeout.
        return isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc)

    def commit(self, con: Any) -> None:
        self.depth -= 1
        if self.depth == 0:
            con.con.commit()

    def rollback(self, con: Any) -> None:
        # Also where a COMMIT failed (the database busy past the wait): the transaction is
        # still open, and left open it kept the write lock and failed every later BEGIN.
        self.depth = 0
        if con.con.in_transaction:
            con.con.rollback()

    def fetch(self, con: Any, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        def read() -> list[Row]:
            cur = con.con.execute(sql, list(params))
            names = [d[0] for d in cur.description]
            return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

        return _decoding(con.con, read)

    def execute(self, con: Any, sql: str, params: Sequence[Any] = ()) -> None:
        con.con.execute(sql, list(params))
        if not self.depth:
            con.con.commit()

    def fetch_grouped(self, con: Any, sql: str, params: Sequence[Any], value: str, by: str) -> dict[Any, list[Any]]:
        return _decoding(con.con, lambda: _grouped(con.con.execute(sql, list(params)), value, by))

    def fetch_written(self, con: Any, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        try:
            rows = self.fetch(con, sql, params)
        except BaseException:
            if not self.depth:
                con.con.rollback()
            raise
        if not self.depth:
            con.con.commit()
        return rows

    def upsert(self, con: Any, table: str, key: str, rows: pa.Table) -> None:
        raw = con.con
        values = [tuple(r.values()) for r in rows.to_pylist()]
        if any(pa.types.is_date(f.type) or pa.types.is_timestamp(f.type) for f in rows.schema):
            values = [tuple(map(sqlite_moment, row)) for row in values]
        try:
            raw.executemany(self.upsert_sql(table, key, tuple(rows.column_names)), values)
        except BaseException:
            if not self.depth:
                raw.rollback()
            raise
        if not self.depth:
            raw.commit()


#: The one byte a SQLite text cannot show past in its text functions.
_NUL = sge.HexString(this="00")


def _id_json(row_id: Any) -> Any:
    """A SQLite id as :meth:`SQLiteDialect.bind_ids` sends it in JSON."""
    if isinstance(row_id, bytes | bytearray):
        return {"blob": bytes(row_id).hex()}
    if isinstance(row_id, str) and "\x00" in row_id:
        return {"text": row_id.encode("utf-8", "surrogateescape").hex()}
    return row_id


def prepare_sqlite(raw: sqlite3.Connection) -> None:
    """Register the functions SQLite lacks: a row fingerprint (of the row's bytes: a TEXT
    that is not UTF-8 fails a function that takes text), and hex text to a BLOB id."""
    raw.create_function("reactive_fingerprint", 1, fingerprint_bytes, deterministic=True)
    raw.create_function("reactive_blob", 1, bytes.fromhex, deterministic=True)


def _decoding(raw: sqlite3.Connection, read: Callable[[], _T]) -> _T:
    """``read()``; where a TEXT value is not UTF-8 (SQLite keeps whatever a client wrote), again
    with its odd bytes read as lone surrogates, as Python reads file names: the row is read, its
    model gets it, and nothing else in the table stops. Only then: a text factory in Python
    costs every read (300,000 rows of two texts: 0.19 -> 0.24 s)."""
    try:
        return read()
    except sqlite3.OperationalError as exc:
        if not str(exc).startswith("Could not decode to UTF-8"):
            raise
    raw.text_factory = _surrogate_text
    try:
        return read()
    finally:
        raw.text_factory = str


def _surrogate_text(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


def _select(table: str, columns: Sequence[str], casts: Mapping[str, str] | None = None) -> sge.Select:
    """``SELECT "t"."c" AS "c", ... FROM "t"``: qualified, so a missing column is an error
    everywhere; a column in ``casts`` is read as that type (:meth:`Dialect.read_casts`).

    >>> _select("t", ["id", "b"], {"b": "VARCHAR"}).sql("duckdb")
    'SELECT "t"."id" AS "id", CAST("t"."b" AS TEXT) AS "b" FROM "t"'
    """
    casts = casts or {}

    def read(c: str) -> sge.Expression:
        # udt: a type sqlglot cannot parse is written as it is given (DuckDB's own spelling).
        return sge.cast(_column(c, table), sge.DataType.build(casts[c], udt=True)) if c in casts else _column(c, table)

    return sg.select(*(sge.alias_(read(c), c, quoted=True) for c in columns)).from_(sg.table(table, quoted=True))


class TableSQL:
    """The statements that read and delete rows of one table by id, built once. A scan leaves
    out rows reactive does not follow (whose id is NULL, or on SQLite of another type than the
    column's: see :meth:`Dialect.followed`), and those that fail ``where``'s equalities (text
    compared as text, a number, ``None`` as ``IS NULL``: see ``IbisSource._narrowing``).

    >>> print(TableSQL(PostgresDialect(), "t", "id", ["id", "x"], where=[("lang", "it's"), ("n", 2), ("m", None)]).scan)
    SELECT "t"."id" AS "id", "t"."x" AS "x" FROM "t"
    WHERE ((NOT "t"."id" IS NULL AND CAST("t"."lang" AS TEXT) = 'it''s') AND "t"."n" = 2) AND "t"."m" IS NULL
    """

    def __init__(
        self,
        dialect: Dialect,
        table: str,
        id_column: str,
        columns: Sequence[str],
        id_type: dt.DataType | None = None,
        casts: Mapping[str, str] | None = None,
        where: Sequence[tuple[str, Any]] = (),
    ) -> None:
        key = _column(id_column, table)
        followed = dialect.followed(key, id_type)
        casts = {c: kind for c, kind in (casts or {}).items() if c != id_column}  # ids are read as they are
        conditions = [] if followed is None else [followed]
        for column, value in where:
            if value is None:
                conditions.append(_column(column, table).is_(sge.null()))
            elif isinstance(value, str):
                conditions.append(sge.cast(_column(column, table), sge.DataType.build("text")).eq(value))
            else:
                conditions.append(_column(column, table).eq(value))
        select = _select(table, columns, casts)
        for condition in conditions:
            select = select.where(condition)
        by_ids = dialect.ids_condition(id_column, table, id_type)
        ordered = select.order_by(key).limit(sge.Placeholder())
        self.scan = dialect.render(select)
        self.by_ids = dialect.render(_select(table, columns, casts).where(by_ids))
        self.ids_by_ids = dialect.render(_select(table, [id_column]).where(by_ids))
        self.first_page = dialect.render(ordered)
        self.next_page = dialect.render(ordered.where(key > sge.Placeholder()))
        self.delete_by_ids = dialect.render(sge.delete(sg.table(table, quoted=True), where=by_ids))
        #: How many rows are followed and pass ``where`` (``rows``).
        counted = sg.select(sge.alias_(sge.Count(this=sge.Star()), "rows", quoted=True)).from_(
            sg.table(table, quoted=True)
        )
        for condition in conditions:
            counted = counted.where(condition)
        self.count = dialect.render(counted)
        #: The rows not followed: how many have a NULL id (``nulls``), how many in all
        #: (``unfollowed``); None where every row is followed.
        self.unfollowed: str | None = None
        if followed is not None:
            nulls = sge.Case(ifs=[sge.If(this=key.is_(sge.null()), true=sge.convert(1))], default=sge.convert(0))
            counts = sg.select(
                sge.alias_(sge.Sum(this=nulls), "nulls", quoted=True),
                sge.alias_(sge.Count(this=sge.Star()), "unfollowed", quoted=True),
            )
            self.unfollowed = dialect.render(counts.from_(sg.table(table, quoted=True)).where(sge.not_(followed)))


#: The column a row's fingerprint comes back in from :attr:`SnapshotSQL.by_ids_with_fingerprint`.
FINGERPRINT_ALIAS = "__reactive_fingerprint"
#: The columns :attr:`SnapshotSQL.diff_rows` adds before a changed row: how it changed
#: (``insert``, ``update``, ``delete``) and its id (a deleted row has no other column).
KIND_ALIAS, ID_ALIAS = "__reactive_kind", "__reactive_id"


class SnapshotSQL:
    """The statements of the polling listener for one table and its snapshot, each built at its
    first use and kept: a statement parsed from a template costs sqlglot about 14 ms, and a
    dialect uses only some of them (the diff in id ranges is SQLite's, the diff that streams its
    rows DuckDB's, the version statements need a version column).

    Rows reactive does not follow are left out of each (:meth:`Dialect.followed`): a row whose id
    is NULL has no id to match its snapshot row by (a diff would see it inserted at every poll),
    and on SQLite one whose id is of another type than the column's could not be stored in the
    snapshot or the outputs (keyed by the column's type).
    """

    def __init__(
        self,
        dialect: Dialect,
        table: str,
        id_column: str,
        columns: Sequence[str],
        snapshot: str,
        version: str | None = None,
        id_type: dt.DataType | None = None,
        casts: Mapping[str, str] | None = None,
    ) -> None:
        self.dialect = dialect
        self.table = table
        self.id_column = id_column
        self.columns = tuple(columns)
        self.snapshot = snapshot
        self.version = version
        self.id_type = id_type
        #: Columns read as another type (:meth:`Dialect.read_casts`); never the id.
        self.casts = {c: kind for c, kind in (casts or {}).items() if c != id_column}

    @property
    def _names(self) -> dict[str, sge.Expression]:
        return {
            "snap": sg.table(self.snapshot, quoted=True),
            "t": sg.table(self.table, quoted=True),
            "id": _column(self.id_column, self.table),
            "fp": self.dialect.row_hash(self.columns, self.table),
            "has_id": self._has_id or sge.true(),
        }

    @property
    def _has_id(self) -> sge.Expression | None:
        return self.dialect.followed(_column(self.id_column, self.table), self.id_type)

    def _fingerprint(self) -> sge.Expression:
        return sge.alias_(self.dialect.row_hash(self.columns, self.table), FINGERPRINT_ALIAS, quoted=True)

    @functools.cached_property
    def by_ids_with_fingerprint(self) -> str:
        """The rows with the bound ids, and their fingerprints (:data:`FINGERPRINT_ALIAS`)."""
        dialect, table = self.dialect, self.table
        condition = dialect.ids_condition(self.id_column, table, self.id_type)
        return dialect.render(_select(table, self.columns, self.casts).select(self._fingerprint()).where(condition))

    @functools.cached_property
    def diff_rows(self) -> str | None:
        """Where the dialect streams (DuckDB): the diff with the changed rows themselves, in one
        statement (:data:`KIND_ALIAS`, :data:`ID_ALIAS`, the columns, :data:`FINGERPRINT_ALIAS`).
        Reading a burst's rows by id afterwards joins every chunk of ids with the whole table:
        300k inserted rows cost 0.26 s that way, 0.05 s streamed from the diff (1M: 0.97 s, 0.14 s)."""
        dialect = self.dialect
        if not dialect.streamed_scans:
            return None
        inner = _select(self.table, self.columns, self.casts).select(self._fingerprint()).where(self._has_id)
        current, known = _column(self.id_column, "c"), _column("row_id", "s")
        kind = sge.Case(
            ifs=[
                sge.If(this=known.is_(sge.null()), true=sge.convert("insert")),
                sge.If(this=current.is_(sge.null()), true=sge.convert("delete")),
            ],
            default=sge.convert("update"),
        )
        changed = sg.or_(
            known.is_(sge.null()),
            current.is_(sge.null()),
            sge.NEQ(this=_column(FINGERPRINT_ALIAS, "c"), expression=_column("fingerprint", "s")),
        )
        diff_rows = (
            sg.select(
                sge.alias_(kind, KIND_ALIAS, quoted=True),
                sge.alias_(sge.Coalesce(this=current, expressions=[known]), ID_ALIAS, quoted=True),
                sge.Column(this=sge.Star(), table=sg.to_identifier("c", quoted=True)),
            )
            .from_(inner.subquery("c", copy=False))
            .join(
                sg.table(self.snapshot, quoted=True, alias="s"),
                on=sge.EQ(this=current, expression=known),
                join_type="FULL OUTER",
            )
            .where(changed)
        )
        return dialect.render(diff_rows)

    @functools.cached_property
    def fill(self) -> str:
        """Every row's fingerprint into the new snapshot."""
        template = "INSERT INTO :snap (row_id, fingerprint) SELECT :id, :fp FROM :t WHERE :has_id"
        return self.dialect.render(_template(template, **self._names))

    @functools.cached_property
    def diff(self) -> str:
        """The ids of the rows that differ from the snapshot, and how (``id``, ``kind``)."""
        diff = _template(
            """
            SELECT COALESCE(c.cur_id, s.row_id) AS id,
                   CASE WHEN s.row_id IS NULL THEN 'insert' WHEN c.cur_id IS NULL THEN 'delete' ELSE 'update' END
                   AS kind
            FROM (SELECT :id AS cur_id, :fp AS cur_fp FROM :t WHERE :has_id) AS c
            FULL OUTER JOIN :snap AS s ON c.cur_id = s.row_id
            WHERE s.row_id IS NULL OR c.cur_id IS NULL OR c.cur_fp <> s.fingerprint
            """,
            **self._names,
        )
        return self.dialect.render(diff)

    @functools.cached_property
    def ranged_diff(self) -> dict[tuple[bool, bool], tuple[str, str]]:
        """The same diff over the ids in (lower, upper] (a bound None: open), as two statements
        that each walk an index: rows of the table in the range against the snapshot (inserts,
        updates), and snapshot rows in the range without a row (deletes). Keyed by which bounds
        there are, so that no "? IS NULL OR" keeps SQLite from using the index."""
        names, ranged = self._names, {}
        for lower in (False, True):
            for upper in (False, True):
                bounds = (["{0} > :lo"] if lower else []) + (["{0} <= :hi"] if upper else [])
                table_range = " AND ".join([*bounds, ":has_id"]).format(":id")
                snap_range = " AND ".join(bounds).format("s.row_id") or "TRUE"
                changed = _template(
                    f"""
                    SELECT c.cur_id AS id, CASE WHEN s.row_id IS NULL THEN 'insert' ELSE 'update' END AS kind
                    FROM (SELECT :id AS cur_id, :fp AS cur_fp FROM :t WHERE {table_range}) AS c
                    LEFT JOIN :snap AS s ON c.cur_id = s.row_id
                    WHERE s.row_id IS NULL OR c.cur_fp <> s.fingerprint
                    """,
                    **names,
                    lo=sge.Placeholder(),
                    hi=sge.Placeholder(),
                )
                gone = _template(
                    f"""
                    SELECT s.row_id AS id, 'delete' AS kind FROM :snap AS s
                    WHERE {snap_range} AND NOT EXISTS (SELECT 1 FROM :t WHERE :id = s.row_id)
                    """,
                    **names,
                    lo=sge.Placeholder(),
                    hi=sge.Placeholder(),
                )
                ranged[(lower, upper)] = (self.dialect.render(changed), self.dialect.render(gone))
        return ranged

    @functools.cached_property
    def _bound(self) -> sge.Select:
        key = _column(self.id_column, self.table)
        first = _select(self.table, [self.id_column]).where(self._has_id).order_by(key)
        return first.limit(1).offset(sge.Placeholder())

    @functools.cached_property
    def first_bound(self) -> str:
        """The id ``?`` rows past the first (the upper bound of the first range)."""
        return self.dialect.render(self._bound)

    @functools.cached_property
    def next_bound(self) -> str:
        """The id ``?`` rows past the one after ``?`` (the upper bound of the next range)."""
        key = _column(self.id_column, self.table)
        return self.dialect.render(self._bound.where(key > sge.Placeholder()))

    @functools.cached_property
    def top(self) -> str | None:
        """With a version column: its highest value (``top``). None without one."""
        if self.version is None:
            return None
        names = {**self._names, "v": _column(self.version, self.table)}
        return self.dialect.render(_template("SELECT MAX(:v) AS top FROM :t", **names))

    @functools.cached_property
    def since(self) -> str | None:
        """With a version column: the rows from a version on (those whose version is NULL too)
        against the snapshot. ``kind`` is NULL for a row that has not changed; ``top`` is the
        highest version among the rows read. It walks an index on the version column where there
        is one (PostgreSQL, SQLite)."""
        return self._since("(:v >= :lo OR :v IS NULL) AND :has_id")

    @functools.cached_property
    def since_all(self) -> str | None:
        """:attr:`since` over every row (no version was known: the table had none)."""
        return self._since(":has_id")

    def _since(self, condition: str) -> str | None:
        if self.version is None:
            return None
        since = _template(
            f"""
            SELECT c.cur_id AS id,
                   CASE WHEN s.row_id IS NULL THEN 'insert' WHEN c.cur_fp <> s.fingerprint THEN 'update' END
                   AS kind,
                   c.cur_v AS version, MAX(c.cur_v) OVER () AS top
            FROM (SELECT :id AS cur_id, :fp AS cur_fp, :v AS cur_v FROM :t WHERE {condition}) AS c
            LEFT JOIN :snap AS s ON c.cur_id = s.row_id
            """,
            **self._names,
            v=_column(self.version, self.table),
            lo=sge.Placeholder(),
        )
        return self.dialect.render(since)


def id_kind(dtype: dt.DataType) -> str:
    """What kind of value an id column holds, as far as comparing two of them goes: ids stored
    by reactive (outputs, snapshots) compare with the source's when the kinds are the same
    (widths and nullability do not matter).

    >>> id_kind(dt.int32), id_kind(dt.Int64(nullable=False)), id_kind(dt.string), id_kind(dt.uuid)
    ('integer', 'integer', 'text', 'UUID')
    """
    if dtype.is_integer():
        return "integer"
    if dtype.is_floating() or dtype.is_decimal():
        return "number"
    if dtype.is_string():
        return "text"
    return type(dtype).__name__


def ids_type(ids: Sequence[Any]) -> dt.DataType:
    """The column type that holds ``ids`` (of a source that is not a table of this database:
    one followed from a change feed), taken from their Python type, that of the first id that
    is not None; a :class:`ConfigurationError` for a type no id column is made of.

    >>> [str(ids_type(ids)) for ids in ([1, 2], ["a"], [b"x"], [_dt.date(2026, 1, 1)], [uuid.UUID(int=1)])]
    ['int64', 'string', 'binary', 'date', 'uuid']
    >>> ids_type([(1, "a")])
    Traceback (most recent call last):
    ...
    reactive.errors.ConfigurationError: ids of type tuple cannot key outputs (as the first id, (1, 'a')): ...
    """
    first = next((i for i in ids if i is not None), None)
    kinds: list[tuple[type | tuple[type, ...], dt.DataType]] = [
        (bool, dt.boolean),
        (int, dt.int64),
        (str, dt.string),
        (bytes | bytearray, dt.binary),
        (float, dt.float64),
        (decimal.Decimal, dt.Decimal(38, 9)),
        (_dt.datetime, dt.timestamp),  # before date: a datetime is a date
        (_dt.date, dt.date),
        (uuid.UUID, dt.uuid),
    ]
    for kind, dtype in kinds:
        if isinstance(first, kind):
            if isinstance(first, _dt.datetime) and first.tzinfo is not None:
                return dt.Timestamp(timezone="UTC")
            return dtype
    raise ConfigurationError(
        f"ids of type {type(first).__name__} cannot key outputs (as the first id, {first!r}): "
        "a table followed from a feed is keyed by ids that are whole numbers, text, bytes, numbers, dates, times"
        " or UUIDs"
    )


def timestamp_column(dialect: Dialect, values: list[_dt.datetime]) -> pa.Array:
    """Timestamps as the dialect stores them."""
    if dialect.timestamp_type.is_string():
        return pa.array([v.isoformat() for v in values], type=pa.string())
    return pa.array(values, type=pa.timestamp("us", tz="UTC"))


def stored_as_text(dialect: Dialect, logical: str) -> bool:
    """Whether ``dialect`` stores outputs of type ``logical`` as JSON text (see :func:`encode_for`)."""
    return logical == "json" or (logical.startswith("array<") and not dialect.native_arrays)


def id_array(ids: Sequence[Any], id_type: dt.DataType) -> pa.Array:
    """Ids as an Arrow column for a table whose id column has ``id_type``. UUIDs as the
    PostgreSQL driver returns them (``uuid.UUID``) go as Arrow's UUID type, which binary COPY
    sends as ``uuid``; elsewhere (DuckDB hands them over as text) as the type's own column.

    >>> id_array([uuid.UUID(int=1)], dt.uuid).type, id_array(["00000000-0000-0000-0000-000000000001"], dt.uuid).type
    (UuidType(extension<arrow.uuid>), DataType(string))
    """
    if id_type.is_uuid() and any(isinstance(i, uuid.UUID) for i in ids):
        return pa.array([i if isinstance(i, uuid.UUID) else uuid.UUID(str(i)) for i in ids], type=pa.uuid())
    return pa.array(ids, type=id_type.to_pyarrow())


def encode_for(dialect: Dialect, logical: str, value: Any) -> Any:
    """The value as the column stores it (JSON text where the engine has no native type)."""
    if value is not None and stored_as_text(dialect, logical):
        return json.dumps(value)
    return value


def decode_for(dialect: Dialect, logical: str, value: Any) -> Any:
    """The inverse of :func:`encode_for`."""
    if isinstance(value, str) and stored_as_text(dialect, logical):
        return json.loads(value)
    return value


def dialect_for(con: Any) -> Dialect:
    return {"sqlite": SQLiteDialect, "postgres": PostgresDialect}.get(con.name, Dialect)()

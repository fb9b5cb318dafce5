"""Reading Kinetica tables, and what ``reactive`` writes into Kinetica: outputs, errors, checkpoints.

Outputs live in a table ``_outputs__<identifier>`` with ``_source`` (the source row id, the
primary key, of the source id's type), ``_output`` and ``_fingerprint`` (long). How an output
type is stored in ``_output``:

=====================================  ================================================
output type                            column
=====================================  ================================================
``string``, ``binary``                 ``string``, ``bytes``
``int64``, ``int32``, ``int16``, ...   ``long`` or ``int`` (with ``int16``/``int8``)
``float64``, ``float32``               ``double``, ``float``
``boolean``                            ``int`` with the ``boolean`` property (0 or 1)
``array<float32>``, other numeric      ``bytes``: the values packed little-endian in the
arrays                                 array's own width (float32: 4 bytes each), as
                                       Kinetica's vector columns store them
``json``, ``array<string>``, others    ``string`` holding JSON text
=====================================  ================================================

Every value is decoded back when read, so chained listeners and ``db.outputs`` see the
same values on every backend.
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
import math
import sys
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from reactive.backends.base import (
    FINGERPRINT_FIELD,
    OUTPUT_FIELD,
    SOURCE_FIELD,
    ErrorRecord,
    OutputBatch,
    TableInfo,
    identify_rows,
    outputs_keyed_otherwise,
    outputs_table,
    warn_null_ids,
    warn_unfollowed_ids,
)
from reactive.backends.kinetica.client import equals_expression, in_expression, quote_identifier
from reactive.backends.kinetica.tables import ID_CHUNK, TableCatalog, epoch_ms, from_epoch_ms, id_type
from reactive.errors import ConfigurationError
from reactive.events import Row, id_key, is_utf8
from reactive.fingerprints import plain_value
from reactive.outputs import holds_leaves, refuse_output_type

ERRORS_TABLE = "_reactive_errors"


def _id_is(id_column: str, null: str) -> str:
    """The expression of rows whose id is ``null`` (``"null"`` or ``"not null"``)."""
    return f"{quote_identifier(id_column)} is {null}"


#: Why a row with a float id may not be followed (see :func:`followed_id`).
NON_FINITE_IDS = "that is NaN or infinite (no Kinetica literal names it, and NaN equals nothing)"
#: The id types whose values may be NaN or infinite.
_FLOAT_IDS = ("float", "double")


def _finite(id_column: str) -> str:
    """The expression of rows whose float id is finite: NaN compares false with everything."""
    column, largest = quote_identifier(id_column), repr(sys.float_info.max)
    return f"{column} >= -{largest} and {column} <= {largest}"


def followed(id_column: str, avro_type: str, nullable: bool = True) -> str:
    """The expression of the rows reactive follows (scans, counts): those whose id is set, and
    for a float id finite (rows are read, updated and deleted by id through expressions, which
    have no NaN or infinity literal, and a NaN id equals no id, itself included); ``""`` where
    that is every row (an id column that cannot hold NULL, a primary key's, of whole numbers or
    text). A condition that always holds is left out: ``"id" is not null and "id" > 7`` is not a
    keyset condition a server serves from its primary-key index (the suite's server filtered
    every row for each page: a 1M-row reconciliation pass took 82 s, a scan of the table 8 s).

    >>> print(followed("id", "long"))
    "id" is not null
    >>> followed("id", "long", nullable=False)
    ''
    >>> print(followed("id", "double"))
    "id" is not null and "id" >= -1.7976931348623157e+308 and "id" <= 1.7976931348623157e+308
    """
    conditions = [_id_is(id_column, "not null")] if nullable else []
    if avro_type in _FLOAT_IDS:
        conditions.append(_finite(id_column))
    return " and ".join(conditions)


def _testable(avro_type: str, value: Any) -> bool:
    """Whether a scan's expression may test a column of ``avro_type`` for equality with a
    listener's filter ``value`` without leaving out a row Python's ``==`` keeps: text against a
    string column (one with a date or decimal property compares more loosely: more rows, never
    fewer), a whole number against an int or long column, None as ``is null``.

    >>> _testable("string", "en"), _testable("long", 7), _testable("double", 7), _testable("int", True)
    (True, True, False, False)
    """
    if value is None:
        return True
    if type(value) is str:
        return avro_type == "string" and "\x00" not in value and is_utf8(value)
    return type(value) is int and avro_type in ("int", "long") and -(2**63) <= value < 2**63


def followed_id(value: Any) -> bool:
    """Whether a row with this id is followed: the same rule as :func:`followed`, for rows the
    change listener decodes itself (insert monitors).

    >>> followed_id(1), followed_id(None), followed_id(float("nan")), followed_id(float("-inf"))
    (True, False, False, False)
    """
    return value is not None and (not isinstance(value, float) or math.isfinite(value))


_SCALAR_COLUMNS = {
    "string": "string",
    "binary": "bytes",
    "int64": "long",
    "int32": "int",
    "int16": "int",
    "int8": "int",
    "float64": "double",
    "float32": "float",
    "boolean": "int",
}
_PACKED = {"float32": "<f4", "float64": "<f8", "int64": "<i8", "int32": "<i4", "int16": "<i2", "int8": "<i1"}


def _naive_from_epoch_ms(ms: int) -> _dt.datetime:
    """Read back naive, in UTC, as the SQL stores give a ``timestamp``."""
    return from_epoch_ms(ms).replace(tzinfo=None)


def _iso_date(day: _dt.date) -> str:
    return (day.date() if isinstance(day, _dt.datetime) else day).isoformat()


#: Output types with a Kinetica column type of their own: Avro type, encode, decode (the
#: type's name is also the column's property).
_TEMPORAL_COLUMNS: dict[str, tuple[str, Callable[[Any], Any], Callable[[Any], Any]]] = {
    "timestamp": ("long", epoch_ms, _naive_from_epoch_ms),
    "date": ("string", _iso_date, _dt.date.fromisoformat),
}

#: Output types stored as JSON text that are not parsed to be checked (see ``_kinetica_holds``).
_JSON_PLAIN = frozenset({"uuid", "uint8", "uint16", "uint32", "uint64", "float16", "boolean", "string"})
_KINETICA_TAKES = (
    "boolean, int8-int64, float32, float64, string, binary, timestamp (to the millisecond), date, or arrays of"
    " numbers; as JSON text uuid, unsigned integers, float16, and arrays, structs and maps with text keys of"
    " numbers, booleans, text or UUIDs"
)


def _kinetica_holds(output_type: str) -> bool:
    """Whether :class:`OutputColumn` stores and reads back ``output_type``'s values: a column of
    its own, packed numbers, or JSON text of numbers, booleans and text (no bytes, decimals,
    dates, times or intervals, which JSON has no form for; no map keys but text, which JSON
    would turn into text).

    >>> _kinetica_holds("array<float32>"), _kinetica_holds("struct<a: array<uuid>>"), _kinetica_holds("time")
    (True, True, False)
    """
    inner = output_type[6:-1] if output_type.startswith("array<") else None
    if output_type in _SCALAR_COLUMNS or output_type in _TEMPORAL_COLUMNS or output_type == "json" or inner in _PACKED:
        return True
    return holds_leaves(output_type, _JSON_PLAIN, _json_leaf)


def _json_leaf(dtype: Any) -> bool:
    return (
        dtype.is_boolean()
        or dtype.is_string()
        or dtype.is_integer()
        or dtype.is_floating()
        or dtype.is_uuid()
        or dtype.is_json()
    )


class OutputColumn:
    """How one output type is stored in the ``_output`` column, and read back.

    >>> column = OutputColumn("array<float32>")
    >>> column.avro_type, column.decode(column.encode([0.5, 1.0]))
    ('bytes', [0.5, 1.0])
    >>> OutputColumn("json").encode({"label": "spam"})
    '{"label": "spam"}'

    A ``timestamp`` is Kinetica's own: a ``long`` of milliseconds since the epoch (a naive
    time is UTC, as in the SQL stores; read back naive, in UTC; what is finer than a
    millisecond is dropped, as MongoDB drops it), a ``date`` a ``string`` with its property:

    >>> stamp = OutputColumn("timestamp")
    >>> stamp.encode(_dt.datetime(2024, 5, 1, 12, 0, 0, 250999)), stamp.decode(1714564800250), stamp.properties
    (1714564800250, datetime.datetime(2024, 5, 1, 12, 0, 0, 250000), ['timestamp'])
    >>> OutputColumn("date").encode(_dt.date(2024, 5, 1)), OutputColumn("date").decode("2024-05-01")
    ('2024-05-01', datetime.date(2024, 5, 1))
    """

    def __init__(self, output_type: str) -> None:
        self.output_type = output_type
        self.properties: list[str] = []
        self._encode: Callable[[Any], Any] = lambda value: value
        self._decode: Callable[[Any], Any] = lambda value: value
        inner = output_type[6:-1] if output_type.startswith("array<") else None
        if output_type in _TEMPORAL_COLUMNS:
            self.avro_type, encode, decode = _TEMPORAL_COLUMNS[output_type]
            self.properties.append(output_type)
            self._encode, self._decode = encode, decode
        elif output_type in _SCALAR_COLUMNS:
            self.avro_type = _SCALAR_COLUMNS[output_type]
            if output_type in ("int16", "int8", "boolean"):
                self.properties.append(output_type)
            if output_type == "boolean":
                self._encode, self._decode = int, bool
        elif inner in _PACKED:
            dtype = np.dtype(_PACKED[inner])
            self.avro_type = "bytes"
            self._encode = lambda value: np.asarray(value, dtype=dtype).tobytes()
            self._decode = lambda value: np.frombuffer(value, dtype=dtype).tolist()
        else:
            self.avro_type = "string"
            self._encode = json.dumps
            self._decode = json.loads

    def encode(self, value: Any) -> Any:
        return None if value is None else self._encode(value)

    def decode(self, value: Any) -> Any:
        return None if value is None else self._decode(value)


class KineticaSource:
    """The :class:`~reactive.backends.base.SourceReader` of Kinetica tables.

    A row's id is the table's primary key (from ``/show/table``'s column properties).
    ``output_type(table)`` says how a listener's outputs are stored in ``table``, so that rows read
    from an outputs table (a chained listener's source) come back decoded.
    """

    def __init__(self, catalog: TableCatalog, *, output_type: Callable[[str], str | None]) -> None:
        self.catalog = catalog
        self.output_type = output_type

    def table_exists(self, table: str) -> bool:
        return self.catalog.exists(table)

    def describe(self, table: str, *, id_column: str | None = None) -> TableInfo:
        self.catalog.forget(table)
        description = self.catalog.describe(table)
        info = identify_rows(table, description.columns, description.primary_key, id_column)
        if id_type(description, info.id_column) == "bytes":
            # Rows are read, updated and deleted by id through expressions, which have no bytes
            # literal: the backfill failed ("no Kinetica literal for a bytes").
            raise ConfigurationError(
                f"the id column {info.id_column!r} of table {table!r} is of type bytes, which Kinetica's"
                " expressions cannot name; name a column of another type with Listener(..., id_column=...)",
                table=table,
            )
        if id_column is not None and id_column not in description.primary_key:  # it may hold NULL
            nulls = self.catalog.pages(table, id_column, 1, expression=_id_is(id_column, "null"))
            if next(nulls, None):
                warn_null_ids(info)
        if id_type(description, info.id_column) in _FLOAT_IDS:
            column = info.id_column
            odd = f"{_id_is(column, 'not null')} and not ({_finite(column)})"
            if next(self.catalog.pages(table, column, 1, expression=odd), None):
                warn_unfollowed_ids(info, NON_FINITE_IDS)
        return info

    def count(self, table: TableInfo, *, where: Mapping[str, Any] | None = None) -> int:
        """The rows of ``table`` that are followed (see :func:`followed`); with ``where``, those
        its expression may test narrowed as :meth:`scan` narrows them."""
        self.catalog.forget(table.name)
        description = self.catalog.describe(table.name)
        if table.id_column not in description.columns:  # no listener's id: every row
            return description.size
        expression = self._expression(table, description, where or {})
        if not expression:  # every row is followed: the table's size
            return description.size
        return self.catalog.count(table.name, expression=expression)

    def read_rows(self, table: TableInfo, ids: Sequence[Any]) -> dict[Hashable, Row]:
        rows = self.decoded(table.name, list(self.catalog.records_by_ids(table.name, table.id_column, list(ids))))
        return {id_key(row[table.id_column]): row for row in rows}

    def existing_ids(self, table: TableInfo, ids: Sequence[Any]) -> set[Hashable]:
        return {id_key(r[table.id_column]) for r in self.catalog.records_by_ids(table.name, table.id_column, list(ids))}

    def scan(
        self,
        table: TableInfo,
        *,
        columns: Sequence[str] | None,
        page_size: int,
        where: Mapping[str, Any] | None = None,
    ) -> Iterator[list[Row]]:
        if not self.catalog.exists(table.name):
            return
        description = self.catalog.describe(table.name)
        expression = self._expression(table, description, where or {})
        for page in self.catalog.pages(table.name, table.id_column, page_size, expression=expression):
            yield self.decoded(table.name, page)

    def _expression(self, table: TableInfo, description: Any, where: Mapping[str, Any]) -> str:
        """The expression of the rows :meth:`scan` reads and :meth:`count` counts: those followed
        (:func:`followed`: a row whose id is NULL, NaN or infinite is left out), narrowed by the
        equalities of ``where`` an expression may test; ``""`` for every row."""
        nullable = "nullable" in description.properties.get(table.id_column, ())
        conditions = [followed(table.id_column, id_type(description, table.id_column), nullable)]
        conditions += self._narrowing(table.name, description, where)
        return " and ".join(c for c in conditions if c)

    def _narrowing(self, table: str, description: Any, where: Mapping[str, Any]) -> list[str]:
        """The equalities of ``where`` an expression may test (see :func:`_testable`). An outputs
        table's ``_output`` is read decoded (a JSON output's text ``"spam"`` is the value
        ``spam``): not narrowed."""
        columns = set(description.columns)
        if self.output_type(table) is not None:
            columns.discard(OUTPUT_FIELD)
        return [
            equals_expression(column, value)
            for column, value in where.items()
            if column in columns and _testable(id_type(description, column), value)
        ]

    def decoded(self, table: str, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Rows as components see them: stored outputs come back as the values they were."""
        if rows and OUTPUT_FIELD in rows[0]:
            logical = self.output_type(table)
            if logical is not None:
                column = OutputColumn(logical)
                for row in rows:
                    row[OUTPUT_FIELD] = column.decode(row[OUTPUT_FIELD])
        return rows


class KineticaOutputs:
    """The :class:`~reactive.backends.base.OutputStore`: one table per listener, keyed by ``_source``.

    A write the server answers with ERROR raises (it may be permanent, so it is not retried):
    the handler records that batch's rows in ``_reactive_errors``, and they stay without an
    output until the next reconciliation of their table (an update or delete count, a restart,
    ``reconcile_interval``) computes them again. An unreachable server is retried instead.

    An outputs table dropped by someone else (or lost with the server's tables) reads as empty
    and is created again at the next write; ``outputs_lost(source table)`` is then told, so the
    outputs of every other row are computed again.
    """

    def __init__(
        self,
        catalog: TableCatalog,
        *,
        decoded: Callable[[str, list[Row]], list[Row]],
        outputs_lost: Callable[[str], None] = lambda table: None,
    ) -> None:
        self.catalog = catalog
        self.decoded = decoded
        self.outputs_lost = outputs_lost
        #: Each listener's outputs table as :meth:`create_outputs` made it: (source, columns,
        #: properties), to make it again without its source (a server that lost its tables).
        self._made: dict[str, tuple[str, list[tuple[str, str, bool]], dict[str, list[str]]]] = {}

    def create_outputs(self, identifier: str, source: TableInfo, output_type: str) -> None:
        if not _kinetica_holds(output_type):  # every output failed (TypeError: not JSON serializable)
            raise refuse_output_type(output_type, "kinetica", _KINETICA_TAKES)
        name = outputs_table(identifier)
        if source.name == name:
            raise ConfigurationError(f"listener {identifier!r} cannot read its own outputs", listener=identifier)
        source_type = id_type(self.catalog.describe(source.name), source.id_column)
        self.catalog.forget(name)  # as it is now: the application may have dropped or made it since
        if self.catalog.exists(name):
            self._check_outputs_table(identifier, source, source_type)
        column = OutputColumn(output_type)
        columns = [
            (SOURCE_FIELD, source_type, False),
            (OUTPUT_FIELD, column.avro_type, True),
            (FINGERPRINT_FIELD, "long", False),
        ]
        properties = {SOURCE_FIELD: ["primary_key"], OUTPUT_FIELD: [*column.properties, "nullable"]}
        self.catalog.create(name, columns, properties)
        self._made[identifier] = (source.name, columns, properties)

    def _check_outputs_table(self, identifier: str, source: TableInfo, source_type: str) -> None:
        """Refuse an existing outputs table no output of ``source`` can be written to: one
        without reactive's columns, or keyed by ids of another type (the source was made again
        with another id type). Every write to it failed, recorded as errors again and again."""
        description = self.catalog.describe(outputs_table(identifier))
        missing = [c for c in (SOURCE_FIELD, OUTPUT_FIELD, FINGERPRINT_FIELD) if c not in description.columns]
        if missing:
            raise ConfigurationError(
                f"the outputs table of {identifier!r} ({outputs_table(identifier)!r}) exists but lacks reactive's"
                f" columns {', '.join(map(repr, missing))}: it is not one reactive made; drop or rename it",
                listener=identifier,
                table=source.name,
            )
        stored = id_type(description, SOURCE_FIELD)
        if stored != source_type:
            raise outputs_keyed_otherwise(identifier, source, stored, source_type)

    def store_outputs(
        self, identifier: str, output_type: str, batch: OutputBatch, stored: list[Any], positions: Sequence[int]
    ) -> None:
        column = OutputColumn(output_type)
        records = [
            {SOURCE_FIELD: source, OUTPUT_FIELD: column.encode(value), FINGERPRINT_FIELD: fingerprint}
            for source, value, fingerprint in zip(batch.sources, batch.outputs, batch.fingerprints, strict=True)
        ]
        name = outputs_table(identifier)

        def upsert() -> None:
            codec = self.catalog.codec(name)
            self.catalog.client.insert_records(name, records, codec, update_on_existing_pk=True)

        self.catalog.recreating(name, functools.partial(self._create_again, identifier), upsert)

    def _create_again(self, identifier: str) -> None:
        """Make ``identifier``'s outputs table again as :meth:`create_outputs` made it: the
        outputs of the rows not being written now were lost with it."""
        source, columns, properties = self._made[identifier]
        self.catalog.create(outputs_table(identifier), columns, properties)
        self.outputs_lost(source)

    def delete_outputs(self, identifier: str, ids: Sequence[Any]) -> None:
        name = outputs_table(identifier)
        if ids and self.catalog.exists(name):
            with self.catalog.unless_missing(name):
                self.catalog.delete_by_ids(name, SOURCE_FIELD, list(ids))

    def output_fingerprints(self, identifier: str, ids: Sequence[Any]) -> dict[Hashable, int]:
        name = outputs_table(identifier)
        found: dict[Hashable, int] = {}
        if ids and self.catalog.exists(name):
            with self.catalog.unless_missing(name):
                records = self.catalog.records_by_ids(name, SOURCE_FIELD, list(ids))
                found = {id_key(r[SOURCE_FIELD]): r[FINGERPRINT_FIELD] for r in records}
        return found

    def scan_output_fingerprints(self, identifier: str, *, page_size: int) -> Iterator[list[tuple[Any, int]]]:
        name = outputs_table(identifier)
        if not self.catalog.exists(name):
            return
        with self.catalog.unless_missing(name):
            for page in self.catalog.pages(name, SOURCE_FIELD, page_size):
                yield [(r[SOURCE_FIELD], r[FINGERPRINT_FIELD]) for r in page]

    def read_outputs(self, identifier: str) -> list[dict[str, Any]]:
        name = outputs_table(identifier)
        rows: list[dict[str, Any]] = []
        if self.catalog.exists(name):
            with self.catalog.unless_missing(name):
                rows = [row for page in self.catalog.pages(name, SOURCE_FIELD, 10_000) for row in page]
        return [{SOURCE_FIELD: r[SOURCE_FIELD], OUTPUT_FIELD: r[OUTPUT_FIELD]} for r in self.decoded(name, rows)]

    def drop_outputs(self, identifier: str) -> None:
        self.catalog.drop(outputs_table(identifier))
        self._made.pop(identifier, None)


class KineticaErrors:
    """The :class:`~reactive.backends.base.ErrorStore`: ``_reactive_errors`` (``at`` in epoch ms)."""

    COLUMNS = (("listener", "string", False), ("table", "string", False), ("source", "string", False))

    def __init__(self, catalog: TableCatalog) -> None:
        self.catalog = catalog

    def _table(self) -> Any:
        columns = [*self.COLUMNS, ("error", "string", False), ("at", "long", False)]
        return self.catalog.create(ERRORS_TABLE, columns, {"at": ["timestamp"]})

    def record_errors(self, records: Sequence[ErrorRecord]) -> None:
        if not records:
            return
        self._table()
        rows = [
            {
                "listener": r.listener,
                "table": r.table,
                "source": json.dumps(r.source, default=plain_value),
                "error": r.error,
                "at": epoch_ms(r.at),
            }
            for r in records
        ]
        self.catalog.recreating(
            ERRORS_TABLE,
            self._table,
            lambda: self.catalog.client.insert_records(ERRORS_TABLE, rows, self.catalog.codec(ERRORS_TABLE)),
        )

    def clear_errors(self, listener: str, sources: Sequence[Any] | None = None) -> None:
        if not self.catalog.exists(ERRORS_TABLE):
            return
        condition = equals_expression("listener", listener)
        if sources is None:
            conditions = [condition]
        else:
            texts = [json.dumps(s, default=plain_value) for s in sources]
            chunks = (in_expression("source", texts[i : i + ID_CHUNK]) for i in range(0, len(texts), ID_CHUNK))
            conditions = [f"{condition} and {chunk}" for chunk in chunks]
        with self.catalog.unless_missing(ERRORS_TABLE):
            for expression in conditions:
                self.catalog.client.delete_records(ERRORS_TABLE, [expression])

    def read_errors(self, listener: str | None = None) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        if not self.catalog.exists(ERRORS_TABLE):
            return rows
        expression = "" if listener is None else equals_expression("listener", listener)
        with self.catalog.unless_missing(ERRORS_TABLE):
            rows = list(self.catalog.all_records(ERRORS_TABLE, expression=expression, sort_by="at"))
        for row in rows:
            row["source"] = json.loads(row["source"])
            row["at"] = from_epoch_ms(row["at"])
        return rows

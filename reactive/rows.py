"""Rows kept as an Arrow table from the read to the model: no dict per row unless asked for.

A poll or a backfill reads thousands of rows at once. :class:`TableRows` carries them through
packets and batches as the Arrow table the database returned; a component that knows it
takes a column as one list (:meth:`TableRows.column`), anything else indexes or iterates it
and gets the same dicts a row-by-row read gives (built once, on first use).
"""

from __future__ import annotations

import contextlib
import dataclasses as dc
import datetime as _dt
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, overload

import pyarrow as pa

Row = Mapping[str, Any]


def warm_arrow() -> None:
    """Have pyarrow convert a Python list once. Its first conversion in a process imports pandas
    where pandas is installed (pyarrow checks every input for pandas objects): about 0.4 s,
    which ``reactive.connect`` pays here rather than the first window of more than a few rows
    (on MongoDB, a burst's first outputs came 0.3-0.7 s late).

    >>> warm_arrow()
    """
    pa.array([""], pa.large_string())


@dc.dataclass(frozen=True, slots=True)
class Unreadable:
    """A value Arrow holds that Python cannot (DuckDB's date ``'infinity'`` is past any
    ``datetime.date``), in place of the value: why it cannot be read."""

    error: str


#: What converting an Arrow value Python cannot hold raises.
NOT_PYTHON = (OverflowError, ValueError, pa.ArrowException)


def holds_map(kind: pa.DataType) -> bool:
    """Whether values of ``kind`` hold a map anywhere (a DuckDB ``MAP``, alone or nested).

    >>> a_map = pa.map_(pa.string(), pa.int64())
    >>> holds_map(a_map), holds_map(pa.list_(pa.struct({"m": a_map})))
    (True, True)
    >>> holds_map(pa.list_(pa.int64()))
    False
    """
    return _holds(kind, pa.types.is_map)


def holds_interval(kind: pa.DataType) -> bool:
    """Whether values of ``kind`` hold an interval anywhere (a DuckDB ``INTERVAL``, alone or
    nested).

    >>> holds_interval(pa.list_(pa.struct({"took": pa.month_day_nano_interval()}))), holds_interval(pa.int64())
    (True, False)
    """
    return _holds(kind, pa.types.is_interval)


def _holds(kind: pa.DataType, test: Callable[[pa.DataType], bool]) -> bool:
    if test(kind):
        return True
    if pa.types.is_map(kind):
        return _holds(kind.key_type, test) or _holds(kind.item_type, test)
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        return _holds(kind.value_type, test)
    if pa.types.is_struct(kind):
        return any(_holds(kind.field(i).type, test) for i in range(kind.num_fields))
    return False


def as_timedelta(interval: pa.MonthDayNano) -> _dt.timedelta:
    """An Arrow interval (DuckDB's ``INTERVAL``) as the ``timedelta`` DuckDB's own Python rows
    give, a month as 30 days (PostgreSQL's driver gives one too; pyarrow gives ``MonthDayNano``).

    >>> as_timedelta(pa.MonthDayNano([1, 2, 3_500_000_000]))
    datetime.timedelta(days=32, seconds=3, microseconds=500000)
    """
    months, days, nanoseconds = interval
    return _dt.timedelta(days=30 * months + days, microseconds=nanoseconds // 1000)


def pylist(column: pa.Array | pa.ChunkedArray) -> list[Any]:
    """``column.to_pylist()``, with maps as dicts, as every other backend hands a model a
    document or a JSON object (Arrow's default is a list of key-value pairs), and intervals as
    timedeltas (:func:`as_timedelta`), at any depth. Only a column that holds maps or intervals
    pays for it (200,000 two-key maps: 1.3x the pairs at the top level, 6x nested).

    >>> pylist(pa.array([[("x", 1)], None], pa.map_(pa.string(), pa.int64())))
    [{'x': 1}, None]
    >>> pylist(pa.array([[pa.MonthDayNano([0, 1, 0])]], pa.list_(pa.month_day_nano_interval())))
    [[datetime.timedelta(days=1)]]
    """
    kind = column.type
    if holds_interval(kind):
        return [_timedeltas(v) for v in column.to_pylist(maps_as_pydicts="lossy")]
    if not holds_map(kind):
        return column.to_pylist()
    if pa.types.is_map(kind) and not holds_map(kind.key_type) and not holds_map(kind.item_type):
        return [None if pairs is None else dict(pairs) for pairs in column.to_pylist()]
    return column.to_pylist(maps_as_pydicts="lossy")  # a key twice: the last value (DuckDB has none)


def _timedeltas(value: Any) -> Any:
    """``value`` with every ``MonthDayNano`` in it, at any depth, as a timedelta."""
    if isinstance(value, pa.MonthDayNano):
        return as_timedelta(value)
    if isinstance(value, list):
        return [_timedeltas(item) for item in value]
    if isinstance(value, dict):
        return {_timedeltas(key): _timedeltas(item) for key, item in value.items()}
    return value


def python_values(column: pa.Array | pa.ChunkedArray) -> list[Any]:
    """``column`` as Python values (:func:`pylist`); one Python cannot hold becomes an
    :class:`Unreadable` instead of failing the column (and with it every row read beside it).

    >>> python_values(pa.array([1, None])), python_values(pa.array([0, 2**31 - 1], pa.date32()))[1]
    ([1, None], Unreadable(error='OverflowError: days=2147483647; must have magnitude <= 999999999'))
    """
    try:
        return pylist(column)
    except NOT_PYTHON:
        return [_value(column, i) for i in range(len(column))]


def _value(column: pa.Array | pa.ChunkedArray, index: int) -> Any:
    try:
        return pylist(column.slice(index, 1))[0]
    except NOT_PYTHON as exc:
        return Unreadable(f"{type(exc).__name__}: {exc}")


class TableRows(Sequence[Row]):
    """An immutable sequence of rows backed by a :class:`pyarrow.Table`.

    >>> rows = TableRows(pa.table({"id": [1, 2, 3], "text": ["a", "b", None]}))
    >>> len(rows), rows[1], rows.column("text")
    (3, {'id': 2, 'text': 'b'}, ['a', 'b', None])
    >>> rows[1:].column("id"), list(rows[2:])
    ([2, 3], [{'id': 3, 'text': None}])
    >>> rows.column("lang")
    Traceback (most recent call last):
    ...
    KeyError: 'lang'
    """

    __slots__ = ("_dicts", "table")

    def __init__(self, table: pa.Table) -> None:
        self.table = table
        self._dicts: list[dict[str, Any]] | None = None

    @classmethod
    def of_rows(cls, rows: Sequence[Row]) -> TableRows:
        """Rows given as dicts, as one table (their values must fit one Arrow type per field)."""
        return cls(pa.Table.from_pylist(list(rows)))

    @classmethod
    def concat(cls, parts: Sequence[TableRows]) -> TableRows:
        """One sequence of ``parts``' rows, in order (their tables must have one schema)."""
        if len(parts) == 1:
            return parts[0]
        return cls(pa.concat_tables([p.table for p in parts]))

    @property
    def columns(self) -> list[str]:
        return self.table.column_names

    def column(self, name: str) -> list[Any]:
        """Column ``name`` as Python values, in row order (KeyError if the rows lack it)."""
        if name not in self.table.column_names:
            raise KeyError(name)
        return python_values(self.table.column(name))

    def _rows(self) -> list[dict[str, Any]]:
        if self._dicts is None:
            table = self.table
            if not any(holds_map(field.type) or holds_interval(field.type) for field in table.schema):
                with contextlib.suppress(NOT_PYTHON):
                    self._dicts = table.to_pylist()
            if self._dicts is None:  # column by column: maps as dicts, an odd value as an Unreadable
                columns = [python_values(table.column(k)) for k in range(table.num_columns)]
                self._dicts = [dict(zip(table.column_names, row, strict=True)) for row in zip(*columns, strict=True)]
        return self._dicts

    def __len__(self) -> int:
        return self.table.num_rows

    @overload
    def __getitem__(self, index: int) -> Row: ...

    @overload
    def __getitem__(self, index: slice) -> TableRows: ...

    def __getitem__(self, index: int | slice) -> Row | TableRows:
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                return TableRows(self.table.take(list(range(start, stop, step))))
            return TableRows(self.table.slice(start, stop - start))
        return self._rows()[index]

    def __iter__(self) -> Iterator[Row]:
        return iter(self._rows())

    def __repr__(self) -> str:
        return f"TableRows({len(self)} rows: {', '.join(self.table.column_names)})"


def column_of(rows: Sequence[Row], name: str) -> list[Any]:
    """Field ``name`` of every row: one Arrow column of :class:`TableRows`, else row by row.

    >>> column_of([{"id": 1}, {"id": 2}], "id"), column_of(TableRows(pa.table({"id": [3]})), "id")
    ([1, 2], [3])
    """
    if isinstance(rows, TableRows):
        return rows.column(name)
    return [row[name] for row in rows]

"""Rows kept as an Arrow table from the read to the model: no dict per row unless asked for.

A poll or a backfill reads thousands of rows at once. :class:`TableRows` carries them through
packets and batches as the Arrow table the database returned; a component that knows it
takes a column as one list (:meth:`TableRows.column`), anything else indexes or iterates it
and gets the same dicts a row-by-row read gives (built once, on first use).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
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
        return self.table.column(name).to_pylist()

    def _rows(self) -> list[dict[str, Any]]:
        if self._dicts is None:
            self._dicts = self.table.to_pylist()
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

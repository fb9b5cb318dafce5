"""What the Kinetica backend knows about tables: descriptions and record codecs, cached."""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

from reactive.backends.base import case_hint
from reactive.backends.kinetica.client import (
    KineticaClient,
    KineticaError,
    RecordCodec,
    RecordPage,
    TableDescription,
    in_expression,
    quote_identifier,
    quote_literal,
    record_type_schema,
)
from reactive.errors import BackendError, TableNotFoundError

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Ids per ``in (...)`` expression.
ID_CHUNK = 1_000


_EPOCH = _dt.datetime(1970, 1, 1, tzinfo=_dt.UTC)
_MILLISECOND = _dt.timedelta(milliseconds=1)


def epoch_ms(moment: _dt.datetime) -> int:
    """Milliseconds since the epoch: how Kinetica's ``timestamp`` columns hold a time. A naive
    time is UTC (as the SQL stores take it); what is finer than a millisecond is dropped
    (floor), in exact arithmetic.

    >>> epoch_ms(_dt.datetime(2024, 5, 1, 12, 0, 0, 250999)), epoch_ms(_dt.datetime(1969, 12, 31, 23, 59, 59, 999500))
    (1714564800250, -1)
    """
    aware = moment if moment.tzinfo is not None else moment.replace(tzinfo=_dt.UTC)
    return (aware - _EPOCH) // _MILLISECOND


def from_epoch_ms(ms: int) -> _dt.datetime:
    """The time (aware, UTC) ``ms`` milliseconds after the epoch: :func:`epoch_ms` undone.

    >>> from_epoch_ms(1714564800250)
    datetime.datetime(2024, 5, 1, 12, 0, 0, 250000, tzinfo=datetime.timezone.utc)
    """
    return _EPOCH + ms * _MILLISECOND


def id_type(description: TableDescription, column: str) -> str:
    """The Avro type of ``column`` in a table's type schema (nullability dropped).

    >>> d = TableDescription("t", "1", '{"type":"record","name":"t","fields":[{"name":"id","type":["long","null"]}]}',
    ...                      ("id",), {}, (), 0)
    >>> id_type(d, "id")
    'long'
    """
    for field in json.loads(description.type_schema)["fields"]:
        if field["name"] == column:
            kind = field["type"]
            return next(t for t in kind if t != "null") if isinstance(kind, list) else kind
    raise KeyError(column)


class TableCatalog:
    """Descriptions (``/show/table``) and codecs of the tables this backend touches.

    A description is cached until :meth:`forget` (a table that changed shape, or was
    dropped); tables ``reactive`` creates are created once per process.
    """

    def __init__(self, client: KineticaClient) -> None:
        self.client = client
        self._descriptions: dict[str, TableDescription] = {}
        self._lock = threading.Lock()

    def describe(self, table: str) -> TableDescription:
        """The table's description; :class:`TableNotFoundError` when it does not exist."""
        with self._lock:
            cached = self._descriptions.get(table)
        if cached is not None:
            return cached
        if not self.client.has_table(table):
            raise self._not_found(table)
        try:
            description = self.client.show_table(table)
        except KineticaError as exc:
            if self.missing(exc, table):
                raise self._not_found(table) from exc
            raise
        with self._lock:
            self._descriptions[table] = description
        return description

    def _not_found(self, table: str) -> TableNotFoundError:
        """The error of a missing ``table``, saying which table it may mean where only case
        differs (Kinetica's names are case-sensitive; an unqualified name is matched against
        every schema's tables)."""
        try:
            names = self.client.table_names()
        except BackendError:
            names = []  # the hint is a courtesy: the error stands without it
        if "." not in table:
            names = [name.rpartition(".")[2] for name in names] + names
        hint = case_hint(table, names)
        return TableNotFoundError(f"table {table!r} does not exist in {self.client.uri.redacted}{hint}", table=table)

    def missing(self, exc: BaseException, table: str) -> bool:
        """Whether ``exc``, raised by a request on ``table``, means that the table does not exist
        (another client dropped it, or the server lost its tables); its description is then
        forgotten. The one place that decides it: the server's ERROR message is not a contract,
        so ``/has/table`` is asked.
        """
        if isinstance(exc, TableNotFoundError) and exc.table == table:
            gone = True
        elif isinstance(exc, KineticaError):
            gone = not self.client.has_table(table)
        else:
            return False
        if gone:
            self.forget(table)
        return gone

    def recreating(self, table: str, create: Callable[[], object], write: Callable[[], T]) -> T:
        """``write()`` to ``table``, one of reactive's own; where it fails because the table is
        gone (see :meth:`missing`), ``create()`` it again and write once more. A table this
        process made was taken for existing until it connected again, and every write failed.
        """
        try:
            return write()
        except (KineticaError, TableNotFoundError) as exc:
            if not self.missing(exc, table):
                raise
        log.warning("table %r no longer exists (dropped, or the server lost its tables); creating it again", table)
        create()
        return write()

    @contextlib.contextmanager
    def unless_missing(self, table: str) -> Iterator[None]:
        """Run the block, which reads or deletes in ``table``, one of reactive's own; where it
        fails because the table is gone (see :meth:`missing`), end it quietly: a table gone holds
        nothing. The caller's result is then what it held before the block."""
        try:
            yield
        except (KineticaError, TableNotFoundError) as exc:
            if not self.missing(exc, table):
                raise

    def codec(self, table: str) -> RecordCodec:
        return RecordCodec.for_schema(self.describe(table).type_schema)

    def forget(self, table: str) -> None:
        with self._lock:
            self._descriptions.pop(table, None)

    def exists(self, table: str) -> bool:
        with self._lock:
            if table in self._descriptions:
                return True
        return self.client.has_table(table)

    def create(
        self,
        table: str,
        columns: Sequence[tuple[str, str, bool]],
        properties: Mapping[str, Sequence[str]],
    ) -> TableDescription:
        """Create ``table`` with ``columns`` ``(name, avro type, nullable)`` unless it exists."""
        if not self.exists(table):
            type_id = self.client.create_type(record_type_schema(table, columns), table, properties)
            self.client.create_table(table, type_id, {"no_error_if_exists": True})
        return self.describe(table)

    def drop(self, table: str) -> None:
        self.client.clear_table(table)
        self.forget(table)

    def read(self, table: str, **options: Any) -> RecordPage:
        """One ``/get/records`` page of ``table`` (``options`` as the client takes them).

        The page is decoded with the type the server says it has; where that is not the type
        described here (another client altered the table), the description is read again
        next time it is needed, so columns and codecs follow the table.
        """
        page = self.client.get_records(table, self.codec(table), **options)
        if page.type_schema != self.describe(table).type_schema:
            log.info("the type of table %r changed; its description is read again", table)
            self.forget(table)
        return page

    def all_records(self, table: str, *, expression: str = "", sort_by: str | None = None) -> Iterator[dict[str, Any]]:
        """Every record matching ``expression``, however many pages the server answers in."""
        offset = 0
        while True:
            page = self.read(table, expression=expression, offset=offset, sort_by=sort_by)
            yield from page.records
            if not page.has_more_records or not page.records:
                return
            offset += len(page.records)

    def count(self, table: str, *, expression: str) -> int:
        """How many records of ``table`` match ``expression`` (the server's filtered total)."""
        return self.read(table, expression=expression, limit=1).total_number_of_records

    def records_by_ids(self, table: str, column: str, ids: Sequence[Any]) -> Iterator[dict[str, Any]]:
        """The records whose ``column`` is one of ``ids`` (one request per chunk of ids)."""
        for start in range(0, len(ids), ID_CHUNK):
            yield from self.all_records(table, expression=in_expression(column, ids[start : start + ID_CHUNK]))

    def pages(self, table: str, key: str, page_size: int, *, expression: str = "") -> Iterator[list[dict[str, Any]]]:
        """Every record in pages ordered by ``key``: keyset pagination (``key > last``).

        Keyset pages stay right while other clients insert and delete (an offset would skip
        or repeat rows); the key must be unique, as a primary key is.
        """
        last: Any = None
        while True:
            conditions = [f"({expression})"] if expression else []
            if last is not None:
                conditions.append(f"{quote_identifier(key)} > {quote_literal(last)}")
            page = self.read(table, expression=" and ".join(conditions), limit=page_size, sort_by=key).records
            if page:
                yield page
            if len(page) < page_size:
                return
            last = page[-1][key]

    def delete_by_ids(self, table: str, column: str, ids: Sequence[Any]) -> None:
        for start in range(0, len(ids), ID_CHUNK):
            self.client.delete_records(table, [in_expression(column, ids[start : start + ID_CHUNK])])

"""Change packets, and how a window of them becomes batches.

A change source turns what it sees into :class:`ChangePacket` objects. The handler takes
every packet that is waiting, :func:`coalesce` s them to one :class:`Change` per row, and
:func:`collate` s those into :class:`Batch` es of one table and one event each.
"""

from __future__ import annotations

import dataclasses as dc
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from enum import StrEnum
from itertools import chain
from typing import Any, Protocol

from reactive.rows import TableRows


class DBEvent(StrEnum):
    """What happened to a row."""

    insert = "insert"
    update = "update"
    delete = "delete"

    @property
    def counter(self) -> str:
        """The name counters use for this event: ``inserts``, ``updates``, ``deletes``."""
        return f"{self.value}s"


Row = Mapping[str, Any]


class ChangeSource(Protocol):
    """Where packets come from: the handler hands each packet's position back to it.

    ``save_positions`` gets the positions of processed packets, in arrival order, to persist
    with their outputs: on a database with transactions it runs in the window's transaction,
    and runs again if that transaction fails and the window is retried. Then each packet is
    settled exactly once: ``commit`` once its window is written for good, or ``release``
    when the handler gives up on it (the source delivers those changes again).
    """

    @property
    def name(self) -> str: ...

    def save_positions(self, positions: Sequence[Any]) -> None: ...

    def commit(self, positions: Sequence[Any]) -> None: ...

    def release(self, positions: Sequence[Any]) -> None: ...


@dc.dataclass(frozen=True, slots=True)
class ChangePacket:
    """Changes of one event type to some rows of one table.

    ``rows``, when the source has them, is aligned with ``ids``. A packet without rows is
    resolved by the handler, which reads the current rows when it processes the packet.
    ``position`` is opaque to the engine: after the packet is processed the handler hands it
    back to ``source.commit``. ``targets`` limits the packet to some components (a backfill
    concerns only the listener being added); ``None`` means every component on the table.
    ``on_processed(packet, error)`` is called by the handler once the packet is processed
    (``error`` is None) or given up (``error`` says why).

    >>> p = ChangePacket("docs", DBEvent.insert, (1, 2))
    >>> p.is_delete, len(p)
    (False, 2)
    """

    table: str
    event: DBEvent
    ids: tuple[Any, ...]
    rows: Sequence[Row] | None = None
    position: Any = None
    source: ChangeSource | None = None
    targets: frozenset[str] | None = None
    on_processed: Callable[[ChangePacket, BaseException | None], None] | None = None

    def __post_init__(self) -> None:
        if self.rows is not None and len(self.rows) != len(self.ids):
            raise ValueError(f"packet for {self.table!r} has {len(self.ids)} ids but {len(self.rows)} rows")

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def is_delete(self) -> bool:
        return self.event is DBEvent.delete


@dc.dataclass(frozen=True, slots=True)
class SourceChange:
    """A change as a source reported it, before any coalescing: what table monitors see.

    ``ids`` and ``rows`` are None when the source knows only a ``count`` (Kinetica's update
    and delete monitors); ``frames`` are the records exactly as published, when the source
    publishes encoded records (Kinetica's insert monitors).

    >>> SourceChange.of(ChangePacket("docs", DBEvent.delete, (1, 2))).count
    2
    """

    table: str
    event: DBEvent
    count: int
    ids: tuple[Any, ...] | None = None
    rows: tuple[Row, ...] | None = None
    frames: tuple[bytes, ...] | None = None

    @classmethod
    def of(cls, packet: ChangePacket) -> SourceChange:
        return cls(packet.table, packet.event, len(packet), packet.ids, packet.rows)

    def only(self, kept: Sequence[int]) -> SourceChange:
        """The change of the rows at the indices ``kept`` alone (of a change with ids).

        >>> SourceChange("docs", DBEvent.delete, 3, (1, 2, 3)).only([0, 2]).ids
        (1, 3)
        """
        assert self.ids is not None
        rows = None if self.rows is None else tuple(self.rows[i] for i in kept)
        return SourceChange(self.table, self.event, len(kept), tuple(self.ids[i] for i in kept), rows)


def is_utf8(text: str) -> bool:
    """Whether ``text`` encodes as UTF-8: a Python text may hold a lone surrogate (what
    ``bytes.decode(errors="surrogateescape")`` leaves), which no database's text can.

    >>> is_utf8("é😀"), is_utf8("a\\udc80")
    (True, False)
    """
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


_SCALAR_IDS = frozenset({int, str, bytes, float})
#: The key of a NaN id (a float key column allows one).
_NAN_ID = ("__nan__",)


def id_keys(values: Sequence[Any]) -> list[Hashable]:
    """:func:`id_key` of each value; ids that are all plain scalars (the common case) are their
    own keys, without a call per id.

    >>> id_keys([1, 2]), id_keys([1, [2]])
    ([1, 2], [1, ('__seq__', (2,))])
    """
    types = set(map(type, values))
    if types <= _SCALAR_IDS and not (float in types and any(v != v for v in values)):
        return list(values)
    return list(map(id_key, values))


def id_key(value: Any) -> Hashable:
    """A hashable key for a row id of any shape (MongoDB ids may be documents or lists).

    >>> id_key({"b": 1, "a": [2, 3]}) == id_key({"a": [2, 3], "b": 1})
    False
    >>> id_key(7), id_key(bytearray(b"x")), id_key(float("nan")) == id_key(float("nan"))
    (7, ('__bytearray__', "bytearray(b'x')"), True)
    >>> id_key(True) == id_key(1)
    False
    """
    if type(value) in _SCALAR_IDS:
        # NaN equals nothing, itself included: two reads of one NaN id would be two rows.
        return _NAN_ID if value != value else value
    if type(value) is bool:
        # True == 1 in Python, not in MongoDB, where {_id: true} and {_id: 1} are two documents.
        return ("__bool__", bool(value))
    # Field order is significant for MongoDB document ids, so dicts keep their order.
    if isinstance(value, Mapping):
        return ("__doc__", tuple((k, id_key(v)) for k, v in value.items()))
    if isinstance(value, list | tuple):
        return ("__seq__", tuple(id_key(v) for v in value))
    try:
        hash(value)
    except TypeError:  # BSON's Decimal128, Regex and Code are ids no dict can key
        return ("__" + type(value).__name__ + "__", repr(value))
    return value


@dc.dataclass(slots=True)
class Change:
    """The net effect of every packet in a window on one row.

    The net event compares the row before the window with the row after it: absent then
    present is an insert, present then present an update, and anything that ends in a delete
    is a delete (nothing is computed and the output ends up absent).
    """

    table: str
    id: Any
    event: DBEvent
    row: Row | None
    targets: frozenset[str] | None
    existed_before: bool = True

    def absorb(self, event: DBEvent, row: Row | None, targets: frozenset[str] | None) -> None:
        """Fold a later event for the same row into this one."""
        if event is DBEvent.delete:
            self.event, self.row = DBEvent.delete, None
        else:
            self.event = DBEvent.update if self.existed_before else DBEvent.insert
            # No row means "read it when processing": an older row must not stand in for it.
            self.row = row
        self.targets = None if self.targets is None or targets is None else self.targets | targets


def coalesce(packets: Iterable[ChangePacket]) -> list[Change]:
    """One :class:`Change` per (table, row id), in the order rows were first seen.

    >>> ins = ChangePacket("t", DBEvent.insert, (1, 2), ({"x": 1}, {"x": 2}))
    >>> upd = ChangePacket("t", DBEvent.update, (1,), ({"x": 9},))
    >>> dele = ChangePacket("t", DBEvent.delete, (2,))
    >>> [(c.id, c.event.value, c.row) for c in coalesce([ins, upd, dele])]
    [(1, 'insert', {'x': 9}), (2, 'delete', None)]
    """
    changes: dict[tuple[str, Hashable], Change] = {}
    for packet in packets:
        rows: Sequence[Row | None] = packet.rows if packet.rows is not None else [None] * len(packet)
        for row_id, row in zip(packet.ids, rows, strict=True):
            key = (packet.table, id_key(row_id))
            change = changes.get(key)
            if change is None:
                changes[key] = Change(
                    packet.table,
                    row_id,
                    packet.event,
                    None if packet.is_delete else row,
                    packet.targets,
                    existed_before=packet.event is not DBEvent.insert,
                )
            else:
                change.absorb(packet.event, row, packet.targets)
    return list(changes.values())


@dc.dataclass(frozen=True, slots=True)
class Batch:
    """Rows of one table with one event, routed to the components in ``targets``.

    ``rows`` is aligned with ``ids``; an entry is ``None`` when the source did not send the
    row (the handler reads it before calling components).
    """

    table: str
    event: DBEvent
    ids: tuple[Any, ...]
    rows: Sequence[Row | None]
    targets: frozenset[str] | None = None

    def __len__(self) -> int:
        return len(self.ids)


def window_batches(packets: Sequence[ChangePacket], max_rows: int) -> list[Batch]:
    """``collate(coalesce(packets), max_rows)``, without an object per row when no row id
    appears twice in a table of the window (a bulk insert, a backfill): each row's net change
    is then its packet's, and batches are cut from the packets' ids and rows as they are
    (rows read as one Arrow table stay one, see :class:`~reactive.rows.TableRows`).

    >>> ps = [ChangePacket("t", DBEvent.insert, (1, 2, 3), ({"x": 1}, {"x": 2}, {"x": 3})),
    ...       ChangePacket("t", DBEvent.delete, (4,)), ChangePacket("t", DBEvent.insert, (5,))]
    >>> window_batches(ps, 2) == list(collate(coalesce(ps), 2))
    True
    >>> [(b.event.value, b.ids, b.rows) for b in window_batches(ps, 2)]
    [('insert', (1, 2), ({'x': 1}, {'x': 2})), ('insert', (3, 5), ({'x': 3}, None)), ('delete', (4,), (None,))]
    """
    if not _unique_in_tables(packets):
        return list(collate(coalesce(packets), max_rows))
    groups: dict[tuple[str, DBEvent, frozenset[str] | None], list[ChangePacket]] = {}
    for packet in packets:
        if len(packet):
            groups.setdefault((packet.table, packet.event, packet.targets), []).append(packet)
    batches = []
    for (table, event, targets), members in groups.items():
        ids = members[0].ids if len(members) == 1 else tuple(chain.from_iterable(p.ids for p in members))
        rows = _joined_rows(members, event)
        for start in range(0, len(ids), max_rows):
            end = start + max_rows
            batches.append(Batch(table, event, ids[start:end], rows[start:end], targets))
    return batches


def unique_ids(ids: Sequence[Any]) -> bool:
    """Whether no id appears twice; False too for ids that are not hashable as they are
    (documents, lists: those are compared by :func:`id_key`, so their check is left to it).

    >>> unique_ids([1, 2, 3]), unique_ids([1, 2, 1]), unique_ids([{"a": 1}, {"a": 2}])
    (True, False, False)
    """
    try:
        return len(set(ids)) == len(ids)
    except TypeError:
        return False


def _unique_in_tables(packets: Sequence[ChangePacket]) -> bool:
    """Whether no row id appears twice in a table of the window (see :func:`unique_ids`)."""
    by_table: dict[str, list[ChangePacket]] = {}
    for packet in packets:
        by_table.setdefault(packet.table, []).append(packet)
    return all(
        unique_ids(members[0].ids if len(members) == 1 else list(chain.from_iterable(p.ids for p in members)))
        for members in by_table.values()
    )


def _joined_rows(packets: Sequence[ChangePacket], event: DBEvent) -> Sequence[Row | None]:
    """The rows of ``packets`` (all of one event) in order; None where a packet has none."""
    parts = [p.rows for p in packets]
    if event is DBEvent.delete or all(part is None for part in parts):  # a delete, or ids to read (a backfill)
        return (None,) * sum(len(p) for p in packets)
    if all(isinstance(part, TableRows) for part in parts):
        try:
            return TableRows.concat(parts)  # type: ignore[arg-type]
        except (ValueError, TypeError):  # schemas differ (a column added between reads): as dicts
            pass
    return tuple(row for p, part in zip(packets, parts, strict=True) for row in (part or (None,) * len(p)))


def collate(changes: Iterable[Change], max_rows: int) -> Iterator[Batch]:
    """Group changes by (table, event, targets) in arrival order, at most ``max_rows`` each.

    Event types are never mixed: a batch is all inserts, all updates or all deletes.

    >>> cs = coalesce([ChangePacket("t", DBEvent.insert, (1, 2, 3)),
    ...                ChangePacket("t", DBEvent.delete, (4,))])
    >>> [(b.event.value, b.ids) for b in collate(cs, max_rows=2)]
    [('insert', (1, 2)), ('insert', (3,)), ('delete', (4,))]
    """
    groups: dict[tuple[str, DBEvent, frozenset[str] | None], list[Change]] = {}
    for change in changes:
        groups.setdefault((change.table, change.event, change.targets), []).append(change)
    for (table, event, targets), members in groups.items():
        for start in range(0, len(members), max_rows):
            chunk = members[start : start + max_rows]
            yield Batch(
                table=table,
                event=event,
                ids=tuple(c.id for c in chunk),
                rows=tuple(c.row for c in chunk),
                targets=targets,
            )

"""Reconciliation: compare a listener's outputs with its source and queue the difference.

This is the one place that builds backfill packets. ``db.add`` (the backfill, and the
resume after a restart) and every change listener that lost track of changes (MongoDB's
lost history, Kinetica's update and delete counts, a table replaced under a listener) go
through :meth:`reactive.cdc.DatabaseChangeDataCapture.reconcile`, which queues what
:func:`reconcile` yields.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from operator import itemgetter
from typing import TYPE_CHECKING, Any

from reactive.events import ChangePacket, DBEvent, Row, id_key, id_keys
from reactive.rows import column_of

if TYPE_CHECKING:
    from reactive.backends.base import OutputStore, SourceReader, TableInfo
    from reactive.outputs import WrittenIds

OnProcessed = Callable[[ChangePacket, BaseException | None], None]
#: ``current(page, stored)``: for each row of a page, whether the input fingerprint stored with
#: its output (None: no output) is right for it.
IsCurrent = Callable[[Sequence[Row], Sequence[int | None]], list[bool]]
#: ``record_writes(limit)``: a block recording the ids of the outputs written while it is open
#: (``OutputWriter.recording`` of one listener).
RecordWrites = Callable[[int], contextlib.AbstractContextManager["WrittenIds"]]
#: Stored outputs held in memory while a reconciliation compares (about 150 bytes each);
#: beyond this many, it looks fingerprints up page by page.
MEMORY_LIMIT = 1_000_000


def reconcile(
    source: SourceReader,
    outputs: OutputStore,
    table: TableInfo,
    *,
    identifier: str,
    columns: Sequence[str],
    current: IsCurrent,
    page_size: int,
    on_processed: OnProcessed | None = None,
    memory_limit: int = MEMORY_LIMIT,
    absent_is_stale: bool = False,
    on_nothing_stored: Callable[[], None] | None = None,
    where: Mapping[str, Any] | None = None,
    record_writes: RecordWrites | None = None,
) -> Iterator[ChangePacket]:
    """Packets that bring ``identifier``'s outputs of ``table`` up to date.

    The stored ``(source id, fingerprint)`` pairs are read once, then the source is scanned
    once: a row whose output is missing or stale (``current`` says so, a page at a time) is
    queued, and so is every stored output no row claimed (its row is gone), with the outputs
    live changes wrote meanwhile for rows the scan did not see (a row inserted, then deleted or
    re-keyed before the scan reached it): ``record_writes`` records their ids while the pass
    runs; without it (or past ``memory_limit`` of them) the stored ids are read again. With more
    than ``memory_limit`` outputs, the fingerprints of each page are looked up instead, and a
    second pass over the outputs asks the source which rows still exist. ``absent_is_stale``
    says that a row without an output always needs one (``current`` is False for every row
    with none stored): with no output stored at all (a first backfill), only ids are read, and
    ``on_nothing_stored()`` is called before the first packet.

    Every packet is an insert *without rows* targeting ``identifier`` only: the handler reads
    each row when it processes the packet, so a reconciliation never writes an output older
    than a live change processed before it, and an output whose row is gone by then is
    deleted, while one whose row came back (a delete, then an insert during the scan) is
    computed rather than deleted.

    ``where`` (the listener's filter) lets the source leave out rows that cannot match it
    (``SourceReader.scan``): their stored outputs are then among those no row claimed, and their
    packets have the handler read each row and remove its output. Only while the stored
    outputs are held in memory: past ``memory_limit`` an output is kept when its row exists,
    so every row must be scanned to find those that left the filter.
    """
    targets = frozenset({identifier})

    def packet(ids: Sequence[Any]) -> ChangePacket:
        return ChangePacket(table.name, DBEvent.insert, tuple(ids), targets=targets, on_processed=on_processed)

    with contextlib.ExitStack() as recording:
        # Opened before the stored outputs are read: an output written after that read is recorded.
        written = None if record_writes is None else recording.enter_context(record_writes(memory_limit))
        stored = _stored_fingerprints(outputs, identifier, page_size, memory_limit)
        if stored is None or (absent_is_stale and stored == {}):
            recording.close()  # no orphans are looked for among what was stored: nor among what is written
        if absent_is_stale and stored == {}:
            if on_nothing_stored is not None:
                on_nothing_stored()
            for page in source.scan(table, columns=[table.id_column], page_size=page_size):
                yield packet(column_of(page, table.id_column))
            return
        scanned: set[Hashable] = set()
        # Passed only when there is something to narrow: a source written before ``where`` still serves.
        narrowed = {"where": where} if where and stored is not None else {}
        for page in source.scan(table, columns=columns, page_size=page_size, **narrowed):
            ids = column_of(page, table.id_column)
            keys = id_keys(ids)
            if stored is None:
                found = outputs.output_fingerprints(identifier, ids)
                prints = [found.get(key) for key in keys]
            else:
                scanned.update(keys)
                pop = stored.pop
                prints = [None if (entry := pop(key, None)) is None else entry[1] for key in keys]
            stale = [i for i, ok in zip(ids, current(page, prints), strict=True) if not ok]
            if stale:
                yield packet(stale)
    if stored is not None:
        # Outputs of rows the scan did not see: those stored before it, and those a live change
        # wrote while it ran (a row inserted, then deleted or re-keyed before the scan reached it).
        orphans = {key: source_id for key, (source_id, _) in stored.items()}
        if written is not None and not written.overflowed:
            orphans.update((key, i) for key, i in written.ids.items() if key not in scanned)
        else:
            for page in outputs.scan_output_fingerprints(identifier, page_size=page_size):
                source_ids = list(map(itemgetter(0), page))
                keys = id_keys(source_ids)
                orphans.update((key, i) for i, key in zip(source_ids, keys, strict=True) if key not in scanned)
        gone = list(orphans.values())
        for start in range(0, len(gone), page_size):
            yield packet(gone[start : start + page_size])
        return
    for page in outputs.scan_output_fingerprints(identifier, page_size=page_size):
        present = source.existing_ids(table, [source_id for source_id, _ in page])
        gone = [source_id for source_id, _ in page if id_key(source_id) not in present]
        if gone:
            yield packet(gone)


def _stored_fingerprints(
    outputs: OutputStore, identifier: str, page_size: int, limit: int
) -> dict[Hashable, tuple[Any, int]] | None:
    """Every stored ``id key -> (source id, fingerprint)``, or None past ``limit`` outputs."""
    stored: dict[Hashable, tuple[Any, int]] = {}
    for page in outputs.scan_output_fingerprints(identifier, page_size=page_size):
        stored.update(zip(id_keys(list(map(itemgetter(0), page))), page, strict=True))
        if len(stored) > limit:
            return None
    return stored

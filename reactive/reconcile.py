"""Reconciliation: compare a listener's outputs with its source and queue the difference.

This is the one place that builds backfill packets. ``db.add`` (the backfill, and the
resume after a restart) and every change listener that lost track of changes (MongoDB's
lost history, Kinetica's update and delete counts, a table replaced under a listener) go
through :meth:`reactive.cdc.DatabaseChangeDataCapture.reconcile`, which queues what
:func:`reconcile` yields.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

from reactive.events import ChangePacket, DBEvent, Row, id_key

if TYPE_CHECKING:
    from reactive.backends.base import OutputStore, SourceReader, TableInfo

OnProcessed = Callable[[ChangePacket, BaseException | None], None]


def reconcile(
    source: SourceReader,
    outputs: OutputStore,
    table: TableInfo,
    *,
    identifier: str,
    columns: Sequence[str],
    is_current: Callable[[Row, int | None], bool],
    page_size: int,
    on_processed: OnProcessed | None = None,
) -> Iterator[ChangePacket]:
    """Packets that bring ``identifier``'s outputs of ``table`` up to date.

    Outputs whose source row is gone come back first, as delete packets (checked before any
    output is written, so a new listener pays nothing for it). Rows whose output is missing
    or stale (``is_current(row, stored_fingerprint)`` is False) come back as insert packets
    *without rows*: the handler reads each row when it processes the packet, so a
    reconciliation never writes an output older than a live change processed before it.
    Every packet targets ``identifier`` only.
    """
    targets = frozenset({identifier})
    for page in outputs.scan_output_ids(identifier, page_size=page_size):
        present = source.existing_ids(table, page)
        gone = tuple(i for i in page if id_key(i) not in present)
        if gone:
            yield ChangePacket(table.name, DBEvent.delete, gone, targets=targets, on_processed=on_processed)
    for page in source.scan(table, columns=columns, page_size=page_size):
        ids = [row[table.id_column] for row in page]
        stored = outputs.output_fingerprints(identifier, ids)
        stale = tuple(
            row[table.id_column] for row in page if not is_current(row, stored.get(id_key(row[table.id_column])))
        )
        if stale:
            yield ChangePacket(table.name, DBEvent.insert, stale, targets=targets, on_processed=on_processed)

"""The one consumer: takes packets off the queue, collates them and refreshes components."""

from __future__ import annotations

import dataclasses as dc
import logging
import traceback
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from reactive.backends.base import MAX_BACKOFF, OUTPUT_FIELD, SOURCE_FIELD, ErrorRecord, outputs_table
from reactive.errors import LeaseLostError
from reactive.events import Batch, ChangePacket, ChangeSource, DBEvent, coalesce, collate, id_key
from reactive.threads import ReactiveThread

if TYPE_CHECKING:
    from reactive.components.base import Component
    from reactive.datalayer import Datalayer
    from reactive.feed.publisher import Committed, FeedHub
    from reactive.queue import CDCQueue

log = logging.getLogger(__name__)

#: Longest wait between retries of a window while the database is unreachable.
#: Retries of a window after stop() was called, before it is released.
STOPPING_RETRIES = 3


class BackendUnavailableError(Exception):
    """Raised inside the handler when a component failed because the database is unreachable."""


@dc.dataclass(slots=True)
class ComponentStats:
    """Counters ``db.cdc.info()`` reports for one component."""

    inserts: int = 0
    updates: int = 0
    deletes: int = 0
    computed: int = 0
    skipped: int = 0
    errors: int = 0
    batches: int = 0
    last_error: str | None = None
    #: The component's model calls, live: the call running and since when, a call stuck.
    model_calls: Any = None

    def count(self, batch: Batch) -> None:
        self.batches += 1
        setattr(self, batch.event.counter, getattr(self, batch.event.counter) + len(batch))


@dc.dataclass(slots=True)
class HandlerTotals:
    """What the handler processed since the datalayer was created."""

    packets: int = 0
    rows: int = 0
    windows: int = 0
    internal_errors: int = 0


class CDCHandler(ReactiveThread):
    """Turns every waiting packet into collated batches and routes them to components.

    The handler never dies: a component that raises has its batch recorded in the errors
    table, and processing goes on. :meth:`stop` closes the queue; everything already queued
    is processed before the thread exits. ``stats`` and ``totals`` are the counters it adds
    to (``db.cdc`` hands the same ones to every handler it starts, so they outlive a stop).
    """

    def __init__(
        self,
        db: Datalayer,
        queue: CDCQueue,
        *,
        batch_rows: int = 5_000,
        stats: dict[str, ComponentStats] | None = None,
        totals: HandlerTotals | None = None,
        feed: FeedHub | None = None,
    ) -> None:
        super().__init__("cdc-handler")
        self.db = db
        self.queue = queue
        self.batch_rows = batch_rows
        self.stats = {} if stats is None else stats
        self.totals = HandlerTotals() if totals is None else totals
        #: Where committed changes go for ``db.cdc.publish`` (the change feed), if anywhere.
        self.feed = feed
        #: The current window's committed changes, while a feed is attached.
        self._committed: Committed | None = None

    def stop(self) -> None:
        # Not the stop event: retry backoffs keep their length while the queue drains.
        self.queue.close()

    def run(self) -> None:
        while True:
            packets = self.queue.get_batch(max_rows=self.batch_rows)
            if not packets:
                if self.queue.closed:
                    return
                continue
            try:
                self._handle_with_retries(packets)
            finally:
                self.queue.task_done(len(packets))

    def _handle_with_retries(self, packets: Sequence[ChangePacket]) -> None:
        """Handle a window; while the database is unreachable, retry it with backoff.

        Writes are idempotent, so a window retried after a partial write ends the same.
        A window that still fails (or fails for another reason) is released: its sources
        deliver those changes again.
        """
        attempt = 0
        while True:
            try:
                self.handle(packets)
                return
            except (BackendUnavailableError, LeaseLostError) as exc:
                # Unreachable, or this process may not write right now (its lease is not renewed:
                # the database is slow or down, or another process takes over, and then db.cdc
                # stops this handler): nothing was committed, so the same window is tried again.
                attempt += 1
                if self.queue.closed and attempt > STOPPING_RETRIES:
                    log.error("%s while stopping; releasing %d packets", exc, len(packets))
                    self._release(packets, exc)
                    return
                delay = min(0.5 * 2 ** (attempt - 1), MAX_BACKOFF)
                log.warning("%s; retrying %d packets in %.1f s", exc, len(packets), delay)
                self.wait(delay)
                if isinstance(exc, LeaseLostError):
                    self._retake_lease()
            except Exception as exc:
                self.totals.internal_errors += 1
                log.exception("the change handler failed on %d packets; they will be delivered again", len(packets))
                self._release(packets, exc)
                return

    def _retake_lease(self) -> None:
        """Before db.cdc starts (a backfill of ``db.add``), nothing else takes a lapsed lease
        back (once started, the lease keeper does, and a takeover restarts this handler): take
        it if it is free, so the window can be written. Held by another process: it is not."""
        cdc = self.db.cdc
        if cdc.running or cdc.lease is None or cdc.lease.held is not None:
            return
        try:
            if cdc.acquire():
                log.warning("took the lease of %s back after it lapsed", self.db.backend.uri)
        except Exception as exc:  # the database is down: tried again at the next retry
            log.warning("could not take the lease of %s back: %s", self.db.backend.uri, exc)

    # -- one window of packets ------------------------------------------------------------
    def handle(self, packets: Sequence[ChangePacket]) -> None:
        """Handle one window; with a feed attached, hand what it committed to the feed after.

        The feed's window lock is held meanwhile (uncontended but while a feed reads a table
        whole), so that what a feed reads is a state between two windows.
        """
        feed = self.feed
        if feed is None:
            self._handle(packets)
            return
        with feed.window():
            self._committed = [] if feed.active else None
            try:
                self._handle(packets)
                window = feed.count_window()
            finally:
                committed, self._committed = self._committed, None
        if committed:
            feed.committed(window, committed)

    def _handle(self, packets: Sequence[ChangePacket]) -> None:
        """Coalesce, collate, refresh every component concerned, then commit positions.

        Where the database has transactions (``backend.transactional``), the window's output
        writes are collected while its models compute, then written with its positions in one
        transaction that first checks the lease: outputs and positions move together, and only
        while this process holds the lease.
        """
        backend = self.db.backend
        pending = deque(collate(coalesce(packets), self.batch_rows))
        sources = len(pending)  # the batches after these are chained listeners' outputs
        committed = self._committed
        with self.db.writer.deferring(backend.transactional) as writes:
            while pending:
                batch = pending.popleft()
                sources -= 1
                components = self.db.components_for(batch.table, batch.targets)
                if not components:
                    continue
                try:
                    resolved = self._resolve_rows(batch)
                except Exception as exc:
                    if backend.is_transient(exc):
                        raise BackendUnavailableError(f"database unreachable ({exc})") from exc
                    raise
                for part in resolved:
                    if committed is not None and sources >= 0:
                        event = "delete" if part.event is DBEvent.delete else "upsert"
                        rows = zip(part.ids, part.rows, strict=True)
                        committed.extend(("table", part.table, event, i, r) for i, r in rows)
                    for component in components:
                        pending.extend(self._refresh(component, part))
        try:
            with backend.transaction():
                self.db.cdc.fence(atomic=backend.transactional)
                for write in writes:
                    write()
                self._save_positions(packets, strict=backend.transactional)
        except Exception as exc:
            if backend.is_transient(exc):
                raise BackendUnavailableError(f"database unreachable ({exc})") from exc
            raise
        for source, positions in self._by_source(packets):
            source.commit(positions)  # once, now that the window is written for good
        self.totals.packets += len(packets)
        self.totals.windows += 1
        self.totals.rows += sum(len(p) for p in packets)
        self._notify(packets, None)

    @staticmethod
    def _notify(packets: Sequence[ChangePacket], error: BaseException | None) -> None:
        for packet in packets:
            if packet.on_processed is not None:
                try:
                    packet.on_processed(packet, error)
                except Exception:
                    log.exception("a packet callback failed")

    def _resolve_rows(self, batch: Batch) -> list[Batch]:
        """Read the rows a packet did not carry (reconciliation packets carry none).

        A row that is gone by now is a delete: those ids come back as a delete batch, so a
        reconciliation that found an orphaned output, or a change whose row vanished before
        it was processed, removes the output and is counted as a delete.
        """
        if batch.event is DBEvent.delete or all(row is not None for row in batch.rows):
            return [batch]
        missing = [i for i, row in zip(batch.ids, batch.rows, strict=True) if row is None]
        found = self.db.source_for(batch.table).read_rows(self.db.table_info(batch.table), missing)
        present: list[tuple[Any, Any]] = []
        gone: list[Any] = []
        for row_id, row in zip(batch.ids, batch.rows, strict=True):
            row = row if row is not None else found.get(id_key(row_id))
            if row is None:
                gone.append(row_id)
            else:
                present.append((row_id, row))
        parts = []
        if present:
            parts.append(dc.replace(batch, ids=tuple(i for i, _ in present), rows=tuple(r for _, r in present)))
        if gone:
            parts.append(dc.replace(batch, event=DBEvent.delete, ids=tuple(gone), rows=(None,) * len(gone)))
        return parts

    def _refresh(self, component: Component, batch: Batch) -> list[Batch]:
        stats = self.stats.setdefault(component.identifier, ComponentStats())
        stats.count(batch)
        stats.model_calls = component.model_calls
        try:
            refresh = component.refresh_outputs(batch, self.db, wait=self.wait)
        except LeaseLostError:
            raise  # not the rows' fault: the window waits (see _handle_with_retries)
        except Exception as exc:
            if self.db.backend.is_transient(exc):
                raise BackendUnavailableError(f"database unreachable ({exc})") from exc
            error = f"{type(exc).__name__}: {exc}"
            log.error("listener %s failed on %d rows of %r: %s", component.identifier, len(batch), batch.table, error)
            log.debug("%s", traceback.format_exc())
            refresh = None
            errors = [ErrorRecord(component.identifier, batch.table, i, error) for i in batch.ids]
        else:
            stats.computed += refresh.computed
            stats.skipped += refresh.skipped
            errors = refresh.errors
        if errors:
            stats.errors += len(errors)
            stats.last_error = errors[-1].error
            try:
                self.db.backend.errors.record_errors(errors)
            except Exception:
                log.exception("could not record %d errors of %s", len(errors), component.identifier)
        if refresh is None:
            return []
        if self._committed is not None:
            name = component.identifier
            self._committed.extend(("outputs", name, "upsert", i, out) for i, out in refresh.written)
            self._committed.extend(("outputs", name, "delete", i, None) for i in refresh.deleted)
        return self._derived(component, refresh)

    def _derived(self, component: Component, refresh: Any) -> list[Batch]:
        """Batches for listeners chained on ``component``'s outputs table."""
        table = outputs_table(component.identifier)
        if not self.db.components_for(table, None):
            return []
        derived = []
        if refresh.written:
            ids = tuple(i for i, _ in refresh.written)
            rows = tuple({SOURCE_FIELD: i, OUTPUT_FIELD: out} for i, out in refresh.written)
            derived.append(Batch(table, DBEvent.update, ids, rows))
        if refresh.deleted:
            ids = tuple(refresh.deleted)
            derived.append(Batch(table, DBEvent.delete, ids, (None,) * len(ids)))
        return derived

    @staticmethod
    def _by_source(packets: Sequence[ChangePacket]) -> list[tuple[ChangeSource, list[Any]]]:
        by_source: dict[int, tuple[ChangeSource, list[Any]]] = {}
        for packet in packets:
            if packet.source is not None:
                by_source.setdefault(id(packet.source), (packet.source, []))[1].append(packet.position)
        return list(by_source.values())

    def _save_positions(self, packets: Sequence[ChangePacket], *, strict: bool = False) -> None:
        """Have each source persist the positions of its processed packets, in arrival order.

        Outside a transaction a position that cannot be saved is logged (the outputs are
        written; the changes come again and are found current). Inside one (``strict``) it
        fails the whole window, outputs included, and the window is tried again.
        """
        for source, positions in self._by_source(packets):
            try:
                source.save_positions(positions)
            except Exception:
                if strict:
                    raise
                self.totals.internal_errors += 1
                log.exception("could not save the position of %s", source.name)

    def _release(self, packets: Sequence[ChangePacket], error: BaseException) -> None:
        """Tell each source that its packets were not processed and must come again."""
        for source, positions in self._by_source(packets):
            try:
                source.release(positions)
            except Exception:
                log.exception("could not release packets of %s", source.name)
        self._notify(packets, error)

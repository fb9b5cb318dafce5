"""Polling that sees every insert, update and delete, made by any client."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from reactive.backends.base import BaseDatabaseListener, TableInfo
from reactive.errors import QueueClosedError
from reactive.events import ChangePacket, DBEvent

if TYPE_CHECKING:
    from reactive.backends.ibis.backend import IbisBackend

log = logging.getLogger(__name__)

#: Longest wait between attempts while the database keeps failing.
MAX_BACKOFF = 30.0


class IbisPollingListener(BaseDatabaseListener):
    """Finds changes by comparing each watched table with its snapshot of row fingerprints.

    A poll is one full outer join inside the database between the table's current
    ``(id, fingerprint)`` pairs and the snapshot (``_reactive_snapshot__<table>``). Rows
    that differ are read in pages and queued with their fingerprints as the packet's
    position. The handler hands positions back to :meth:`commit` once processed, and only
    then is the snapshot moved. The next poll starts after every packet of the previous
    one is committed, so a change is never queued twice by the same listener.
    """

    backend: IbisBackend

    def __init__(self, backend: IbisBackend, queue: Any, **options: Any) -> None:
        super().__init__(backend, queue, **options)
        self._changeds_started = 0
        self._changeds_done = 0
        self._wake = threading.Event()
        self.polls = 0
        self.last_poll_seconds: float | None = None
        self.consecutive_failures = 0

    def watch(self, table: TableInfo) -> None:
        created = self.backend.ensure_snapshot(table)
        if created:
            log.info("recorded a snapshot of %r; changes from now on are followed", table.name)
        super().watch(table)

    def on_stop(self) -> None:
        super().on_stop()
        self._wake.set()

    def run(self) -> None:
        while self.should_keep_running():
            started = time.monotonic()
            with self._changed:
                self._changeds_started += 1
            try:
                self._poll_all()
                self.consecutive_failures = 0
                self.last_error = None
            except QueueClosedError:
                break
            except Exception as exc:
                for table in self.tables:
                    self.backend.forget(table)
                self.consecutive_failures += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("polling %s failed (%s); retrying", self.backend.uri, self.last_error)
            with self._changed:
                while self._in_flight and self.should_keep_running():
                    self._changed.wait()
                self._changeds_done += 1
                self._changed.notify_all()
            # Polls start every poll_interval: the time spent polling counts toward the wait.
            delay = max(0.0, self.poll_interval - (time.monotonic() - started))
            if self.consecutive_failures:
                delay = min(self.poll_interval * 2**self.consecutive_failures, MAX_BACKOFF)
            self._wake.wait(delay)
            self._wake.clear()
        with self._changed:
            self._changed.notify_all()

    def _poll_all(self) -> None:
        for table in self.tables.values():
            if not self.should_keep_running():
                return
            started = time.perf_counter()
            self._poll(table)
            self.last_poll_seconds = time.perf_counter() - started
            self.polls += 1

    def _poll(self, table: TableInfo) -> None:
        diff = self.backend.snapshot_diff(table)
        if not diff:
            return
        by_kind: dict[str, list[Any]] = {"insert": [], "update": [], "delete": []}
        for row_id, kind in diff:
            by_kind[kind].append(row_id)
        for kind in ("insert", "update"):
            ids = by_kind[kind]
            for start in range(0, len(ids), self.page_size):
                found = self.backend.rows_with_fingerprints(table, ids[start : start + self.page_size])
                if found:
                    # A row deleted since the diff is simply absent; the next poll sees it.
                    self._emit(
                        table,
                        DBEvent(kind),
                        tuple(row[table.id_column] for row, _ in found),
                        rows=tuple(row for row, _ in found),
                        fingerprints=[fp for _, fp in found],
                    )
        deleted = by_kind["delete"]
        for start in range(0, len(deleted), self.page_size):
            self._emit(table, DBEvent.delete, tuple(deleted[start : start + self.page_size]))

    def _emit(
        self,
        table: TableInfo,
        event: DBEvent,
        ids: tuple[Any, ...],
        *,
        rows: tuple[Any, ...] | None = None,
        fingerprints: Sequence[int] | None = None,
    ) -> None:
        position = (table.name, ids, None if fingerprints is None else tuple(fingerprints))
        self.emit(ChangePacket(table.name, event, ids, rows, position=position, source=self))

    def save_positions(self, positions: Sequence[Any]) -> None:
        """Move each table's snapshot past the processed rows."""
        by_table: dict[str, tuple[list[tuple[Any, int]], list[Any]]] = {}
        for table, ids, fingerprints in positions:
            upserts, deletes = by_table.setdefault(table, ([], []))
            if fingerprints is None:
                deletes.extend(ids)
            else:
                upserts.extend(zip(ids, fingerprints, strict=True))
        for table, (upserts, deletes) in by_table.items():
            self.backend.advance_snapshot(table, upserts, deletes)

    def redeliver(self, positions: Sequence[Any]) -> None:
        """Nothing to do: the snapshot stays where it is, so the next poll finds the rows again."""

    def sync(self, timeout: float | None) -> bool:
        """Wait for a full poll that started after this call, with its packets queued."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._changed:
            target = self._changeds_started + 1
        self._wake.set()
        with self._changed:
            while self._changeds_done < target:
                if not self.is_alive():
                    return False
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._changed.wait(remaining)
        return self.last_error is None

    def info(self) -> dict[str, Any]:
        return {
            **super().info(),
            "poll_interval": self.poll_interval,
            "polls": self.polls,
            "last_poll_seconds": self.last_poll_seconds,
            "consecutive_failures": self.consecutive_failures,
        }

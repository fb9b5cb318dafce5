"""Polling that sees every insert, update and delete, made by any client."""

from __future__ import annotations

import dataclasses as dc
import logging
import threading
import time
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any, Protocol

from reactive.backends.base import MAX_BACKOFF, OUTPUTS_PREFIX, BaseDatabaseListener, TableInfo
from reactive.errors import QueueClosedError
from reactive.events import ChangePacket, DBEvent, Row, SourceChange, id_keys

log = logging.getLogger(__name__)


@dc.dataclass(frozen=True, slots=True)
class ChangedRows:
    """Rows a poll found changed, all of one ``kind`` (``"insert"``, ``"update"``, ``"delete"``):
    their ids, and for inserts and updates the rows as read and their fingerprints (aligned)."""

    kind: str
    ids: Sequence[Any]
    rows: Sequence[Row] | None = None
    fingerprints: Sequence[int] | None = None


class Snapshots(Protocol):
    """All the poller needs from a database: the snapshot of each watched table."""

    def ensure(self, table: TableInfo) -> bool:
        """Take a snapshot of ``table`` unless one exists; True if it was taken now."""

    def poll(self, table: TableInfo, rows_per_read: int) -> tuple[Iterable[ChangedRows], Any]:
        """What changed since the position (every row that differs from the snapshot, or only
        the rows past a version column's last version), read as it is iterated, at most about
        ``rows_per_read`` rows per statement; and a mark to :meth:`save_mark` once those changes
        are processed (or None)."""

    def save_mark(self, table: str, mark: Any) -> None:
        """Save a mark :meth:`poll` returned: every change it covers is processed."""

    def data_version(self) -> int | None:
        """A number that changes whenever another connection commits to the database (and only
        then); None where the database has none: then every poll diffs."""

    def request_full_diff(self, table: str) -> None:
        """Make the next poll of ``table`` a full :meth:`diff`."""

    def version_info(self, table: str) -> dict[str, Any] | None:
        """How ``table`` is polled through a version column (None: it has none)."""

    def advance(self, table: str, ids: Sequence[Any], fingerprints: Sequence[int], deletes: Sequence[Any]) -> None:
        """Record processed rows' fingerprints (``ids`` and ``fingerprints`` aligned; where an
        id repeats, its last one) and forget deleted rows: the position moves."""

    def lost(self, table: TableInfo) -> str | None:
        """Why a table whose poll failed can no longer be followed (dropped, altered), or None.

        Forgets what is cached about the table first, as :meth:`forget` does."""

    def forget(self, table: str) -> None:
        """Drop what is cached about ``table`` (after a failure)."""

    def drop(self, table: str) -> None:
        """Forget the position of a table that is gone (a table created again starts afresh)."""


#: A row no released packet told the monitors of (see ``IbisPollingListener._told``).
_UNTOLD = object()

#: Changed rows a poll reads per statement or streamed batch (at least ``page_size``), reported
#: in packets of ``page_size``. Each statement costs the polling thread turns at the GIL against
#: a busy handler: a 300k-row DuckDB burst took 2.14-2.36 s read 5,000 rows per statement,
#: 1.74-2.03 s read 20,000.
READ_ROWS = 20_000


class IbisPollingListener(BaseDatabaseListener):
    """Finds changes by comparing each watched table with its snapshot of row fingerprints.

    A poll is one full outer join inside the database between the table's current
    ``(id, fingerprint)`` pairs and the snapshot (``_reactive_snapshot__<table>``). Rows
    that differ (streamed with the diff on DuckDB, read by id after it elsewhere) are queued
    in packets of ``page_size`` with their fingerprints as the packet's position. The
    handler hands positions back to :meth:`commit` once processed, and only then is the
    snapshot moved. The next poll starts after every packet of the previous
    one is committed, so a change is never queued twice by the same listener.

    Each table fails alone: a table whose poll fails is retried at the next poll while the
    others go on; a table that no longer exists, or no longer has the columns it was
    described with, is reported gone (with why) and no longer followed.
    ``is_transient`` tells a database that is unreachable (every table waits, with backoff)
    from a table that is broken.

    A table with a version column (``reactive.connect(uri, version_columns={"docs":
    "updated_at"})``, see :class:`~reactive.backends.base.VersionColumn`) is diffed whole
    only every ``full_diff_every`` seconds; the polls between read the rows from its last
    version seen on, and compare only those with the snapshot. The version a poll reached
    is saved (``save_mark``) after every packet of that poll is committed, and not at all
    when one was released, so the next poll reads from the older version again; a version
    saved late (a crash in between) only makes a poll read rows it then finds unchanged.

    Where the database counts other connections' commits (SQLite's ``PRAGMA data_version``;
    :meth:`Snapshots.data_version`), a table is not diffed while that count is where it was
    before its last diff whose packets were all committed: nobody wrote since, so an idle
    database costs one pragma per poll whatever its size. A released packet, a requested full
    diff or a failure makes the next poll diff again. A listener's outputs table (followed by a
    table monitor) is diffed at every poll: reactive writes it through the connection whose
    commits the count leaves out.
    """

    def __init__(
        self,
        snapshots: Snapshots,
        queue: Any,
        *,
        is_transient: Callable[[BaseException], bool] = lambda exc: False,
        **options: Any,
    ) -> None:
        super().__init__(queue, name="ibis", **options)
        self.snapshots = snapshots
        self.is_transient = is_transient
        self._polls_started = 0
        self._polls_done = 0
        self._wake = threading.Event()
        self.polls = 0
        self.last_poll_seconds: float | None = None
        self.consecutive_failures = 0
        #: Watched tables whose last poll failed, and why (retried at every poll).
        self.failing_tables: dict[str, str] = {}
        #: Tables whose components lost outputs (an outputs table dropped): reconciled after a poll.
        self._to_reconcile: set[str] = set()
        #: Version marks of this poll's tables, saved once its packets are committed.
        self._marks: dict[str, Any] = {}
        #: Tables some of whose packets were released since the last poll: their marks stay.
        self._released: set[str] = set()
        #: The data version (see Snapshots.data_version) read before this poll's diff of each table.
        self._diffed: dict[str, int] = {}
        #: Per table, the data version before its last diff whose packets were all committed:
        #: while the database's is the same, nothing changed, and the table is not diffed.
        self._quiet: dict[str, int] = {}
        #: Polls of a table skipped because nobody committed since its last diff.
        self.polls_skipped = 0
        #: Per table, the rows of released packets its table monitors were told of, by id key:
        #: their fingerprint (None for a delete). The next poll finds them again, and the monitors
        #: are not told twice (they were, at every release: five times a row while a database
        #: refused the window's writes). What that poll does not find again is forgotten.
        self._told: dict[str, dict[Hashable, int | None]] = {}

    def watch(self, table: TableInfo) -> None:
        if self.snapshots.ensure(table):
            log.info("recorded a snapshot of %r; changes from now on are followed", table.name)
        super().watch(table)

    def unwatch(self, table: str) -> None:
        super().unwatch(table)
        with self._lock:
            self.failing_tables.pop(table, None)
            self._quiet.pop(table, None)
            self._told.pop(table, None)

    def forget(self, table: str) -> None:
        with self._lock:
            watched = table in self._tables or table in self._monitors
        if not watched:  # a table monitor on it still polls it against its snapshot
            self.snapshots.forget(table)  # its statements, built for the id column it had
            self.snapshots.drop(table)

    def _arm_after_barrier(self, sink: Any) -> None:
        """Arm ``sink`` when a poll that starts after now has finished (its baseline), and
        return then: that poll's differences (an old snapshot's, say) are not the monitor's."""
        with self._changed:
            self._arming[id(sink)] = self._polls_started + 1
        if self.is_alive():
            self.sync(None)
        else:
            self._arm(lambda target: True)

    def on_stop(self) -> None:
        super().on_stop()
        self._wake.set()

    def request_full_diff(self, table: str | None = None) -> None:
        """Diff ``table`` (default: every watched table) whole at the next poll, and poll soon.

        For tables with a version column: their deletes, and rows written without moving the
        version, are found then rather than at the next ``full_diff_every``. Every poll of a
        table without a version column is a full diff already. ``db.cdc.wait_idle()`` after
        this call returns once that diff's changes are processed.
        """
        for name in [table] if table is not None else list(self.tables):
            self.snapshots.request_full_diff(name)
            with self._lock:
                self._quiet.pop(name, None)
        self._wake.set()

    def reconcile_soon(self, table: str) -> None:
        """Reconcile ``table``'s components after the poll in progress (their outputs were lost).

        Called from the handler thread, which cannot queue a reconciliation itself (it would
        wait on the queue it drains). The poller queues it before the poll counts as done, so
        a ``wait_idle`` that saw the loss waits for the outputs computed again.
        """
        with self._lock:
            self._to_reconcile.add(table)
        self._wake.set()

    def _follow(self) -> None:
        while self.should_keep_running():
            started = time.monotonic()
            with self._changed:
                self._polls_started += 1
            try:
                self._poll_all()
                self.consecutive_failures = 0
                self.last_error = None
            except QueueClosedError:
                break
            except Exception as exc:
                for table in self.tables:
                    self.snapshots.forget(table)
                with self._lock:
                    self._diffed.clear()
                    self._quiet.clear()
                self.consecutive_failures += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("polling failed (%s); retrying", self.last_error)
            with self._changed:
                while self._in_flight and self.should_keep_running():
                    self._changed.wait()
                drained = not self._in_flight
            self._save_marks(drained)
            try:
                self._reconcile_requested()
            except QueueClosedError:
                break
            with self._changed:
                self._polls_done += 1
                self._changed.notify_all()
            self._arm(lambda target: target is not None and target <= self._polls_done)
            # Polls start every poll_interval: the time spent polling counts toward the wait.
            delay = max(0.0, self.poll_interval - (time.monotonic() - started))
            if self.consecutive_failures:
                delay = min(self.poll_interval * 2**self.consecutive_failures, MAX_BACKOFF)
            self._wake.wait(delay)
            self._wake.clear()
        with self._changed:
            self._changed.notify_all()

    def _save_marks(self, drained: bool) -> None:
        """Save the version marks of the tables this poll read, now that its packets are committed.

        A table with a released packet keeps its old mark (the next poll reads those rows
        again); so does every table when the listener stops with packets still in flight.
        """
        with self._lock:
            marks, self._marks = self._marks, {}
            released, self._released = self._released, set()
            diffed, self._diffed = self._diffed, {}
            for table, version in diffed.items():
                if drained and table not in released:
                    self._quiet[table] = version
                else:
                    self._quiet.pop(table, None)
        if not drained:
            return
        watched = self.tables
        for table, mark in marks.items():
            if table in released or table not in watched:
                continue
            try:
                self.snapshots.save_mark(table, mark)
            except Exception as exc:
                # Harmless: the next poll reads from the older version and finds those rows unchanged.
                log.warning("could not save the version reached in %r (%s: %s)", table, type(exc).__name__, exc)

    def _reconcile_requested(self) -> None:
        with self._lock:
            tables, self._to_reconcile = sorted(self._to_reconcile), set()
        if not tables:
            return
        log.warning("outputs of listeners on %s were dropped; computing them again", ", ".join(map(repr, tables)))
        try:
            self.hooks.reconcile(tables, self.stopped_event)
        except QueueClosedError:
            raise
        except Exception as exc:
            with self._lock:
                self._to_reconcile.update(tables)
            log.warning(
                "reconciling %s failed (%s: %s); tried again after the next poll", tables, type(exc).__name__, exc
            )

    def _poll_all(self) -> None:
        version = self.snapshots.data_version()  # before any diff: a commit after it is seen next time
        for table in self.tables.values():
            if not self.should_keep_running():
                return
            with self._lock:
                quiet = version is not None and self._quiet.get(table.name) == version
            if quiet:
                self.polls_skipped += 1
                continue
            started = time.perf_counter()
            try:
                self._poll(table)
            except QueueClosedError:
                raise
            except Exception as exc:
                if self.is_transient(exc):
                    raise
                self._table_failed(table, exc)
                continue
            self.last_poll_seconds = time.perf_counter() - started
            self.polls += 1
            with self._lock:
                self.failing_tables.pop(table.name, None)
                if version is not None and not table.name.startswith(OUTPUTS_PREFIX):
                    # An outputs table (a table monitor's) is written by this connection,
                    # whose own commits the count leaves out: it is diffed at every poll.
                    self._diffed[table.name] = version

    def _table_failed(self, table: TableInfo, exc: Exception) -> None:
        """One table's poll failed: stop it if it cannot heal (dropped, altered), else retry it next poll."""
        with self._lock:
            self._quiet.pop(table.name, None)
        why = self.snapshots.lost(table)
        if why is not None:
            # Its snapshot no longer fits: a listener added again starts from a fresh one.
            self.snapshots.drop(table.name)
            self._report_gone(table.name, why)
            return
        error = f"{type(exc).__name__}: {exc}"
        with self._lock:
            first = table.name not in self.failing_tables
            self.failing_tables[table.name] = error
        if first:
            log.warning("polling table %r failed (%s); the other tables go on, it is retried", table.name, error)

    def _poll(self, table: TableInfo) -> None:
        changed, mark = self.snapshots.poll(table, max(self.page_size, READ_ROWS))
        for part in changed:
            self._report_changed(table, part)
        with self._lock:
            self._told.pop(table.name, None)  # what this poll did not find again changed since
            if mark is not None:
                self._marks[table.name] = mark

    def _report_changed(self, table: TableInfo, part: ChangedRows) -> None:
        """Report ``part`` in packets of ``page_size`` rows."""
        event, size = DBEvent(part.kind), self.page_size
        rows, fingerprints = part.rows, part.fingerprints
        for at in range(0, len(part.ids), size):
            self._report(
                table,
                event,
                tuple(part.ids[at : at + size]),
                rows=None if rows is None else rows[at : at + size],
                fingerprints=None if fingerprints is None else tuple(fingerprints[at : at + size]),
            )

    def _report(
        self,
        table: TableInfo,
        event: DBEvent,
        ids: tuple[Any, ...],
        *,
        rows: Sequence[Row] | None = None,
        fingerprints: tuple[int, ...] | None = None,
    ) -> None:
        position = (table.name, ids, fingerprints)
        self.report(ChangePacket(table.name, event, ids, rows, position=position, source=self))

    def save_positions(self, positions: Sequence[Any]) -> None:
        """Move each table's snapshot past the processed rows."""
        by_table: dict[str, tuple[list[Any], list[int], list[Any]]] = {}
        for table, ids, fingerprints in positions:
            upserted, upserted_fingerprints, deletes = by_table.setdefault(table, ([], [], []))
            if fingerprints is None:
                deletes.extend(ids)
            else:
                upserted.extend(ids)
                upserted_fingerprints.extend(fingerprints)
        for table, (upserted, upserted_fingerprints, deletes) in by_table.items():
            if table in self.tables:
                self.snapshots.advance(table, upserted, upserted_fingerprints, deletes)

    def redeliver(self, positions: Sequence[Any]) -> None:
        """The snapshot stays where it is, so the next poll finds the rows again; a version
        column's mark stays too (the next poll reads from the older version)."""
        with self._lock:
            self._released.update(table for table, _, _ in positions)
            for table, ids, fingerprints in positions:
                if self._monitors.get(table):
                    told = self._told.setdefault(table, {})
                    told.update(zip(id_keys(ids), fingerprints or [None] * len(ids), strict=True))

    def _for_monitors(self, packet: ChangePacket) -> SourceChange | None:
        """The rows of ``packet`` its table's monitors were not told of already (see ``_told``):
        a row found again as it was when its packet was released is left out."""
        change = super()._for_monitors(packet)
        with self._lock:
            told = self._told.get(packet.table)
            if not told:
                return change
            _, ids, fingerprints = packet.position
            pairs = zip(id_keys(ids), fingerprints or [None] * len(ids), strict=True)
            kept = [at for at, (key, fingerprint) in enumerate(pairs) if told.pop(key, _UNTOLD) != fingerprint]
        if len(kept) == len(ids):
            return change
        return change.only(kept) if kept and change is not None else None

    def sync(self, timeout: float | None) -> bool:
        """Wait for a full poll that started after this call, with its packets queued.

        False when ``timeout`` passes first, when the database is failing, or when a watched
        table is failing (its changes cannot be said to be queued).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._changed:
            target = self._polls_started + 1
        self._wake.set()
        with self._changed:
            while self._polls_done < target:
                if self.ending():
                    return False
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._changed.wait(remaining)
            return self.last_error is None and not self.failing_tables

    def info(self) -> dict[str, Any]:
        with self._lock:
            failing = dict(self.failing_tables)
        versions = {}
        for table in self.tables:
            version = self.snapshots.version_info(table)
            if version is not None:
                versions[table] = version
        return {
            **super().info(),
            "poll_interval": self.poll_interval,
            "polls": self.polls,
            "polls_skipped": self.polls_skipped,
            "last_poll_seconds": self.last_poll_seconds,
            "consecutive_failures": self.consecutive_failures,
            "failing_tables": failing,
            "versions": versions,
        }

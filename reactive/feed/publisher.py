"""``db.cdc.publish(address)``: a datalayer's tables and outputs on the change feed.

The handler hands each committed window's changes to a :class:`FeedHub` (a put on a buffer
bounded in changes, after the window's transaction, outside every lock); a
``reactive-feed-publisher`` thread turns them into deltas of a :class:`~reactive.feed.DataService`.
A slow subscriber never slows this thread (ZMQ's PUB drops for it, and it resubscribes), so the
handler waits only if this thread falls ``queue_rows`` changes behind.

A table or listener is *loaded* the first time the feed needs it (at ``publish``, or when a
change for a listener added later arrives): its current rows, or stored outputs, are read
while the handler is between windows, and windows committed before that read are skipped for
it. Each published table's deltas therefore follow the committed state exactly, in commit
order, with nothing applied twice.
"""

from __future__ import annotations

import dataclasses as dc
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from reactive.backends.base import OUTPUT_FIELD, OUTPUTS_PREFIX, SOURCE_FIELD
from reactive.errors import ConfigurationError, QueueClosedError
from reactive.feed.service import DataService, check_name, retry_backoff
from reactive.feed.wire import FeedEncodeError
from reactive.queue import CDCQueue
from reactive.threads import ReactiveThread

if TYPE_CHECKING:
    from reactive.datalayer import Datalayer
    from reactive.feed.node import Node

log = logging.getLogger(__name__)

#: What a committed window changed: ``(kind, name, event, id, value)`` with kind ``"table"``
#: (a watched table's row) or ``"outputs"`` (a listener's output), event ``"upsert"`` or
#: ``"delete"``.
Committed = list[tuple[str, str, str, Any, Any]]

#: Changes (rows and outputs) of committed windows a feed holds for its publisher before the
#: handler waits for it: about two of the handler's largest windows.
QUEUE_ROWS = 100_000


@dc.dataclass(frozen=True, slots=True)
class _Window:
    """A committed window waiting for the publisher; it counts as its changes in the queue's bound."""

    number: int
    changes: Committed

    def __len__(self) -> int:
        return len(self.changes)


class FeedHub:
    """Between the handler and the feeds: the window lock, the window count, the hand-off.

    The handler holds :meth:`window` while it handles a window and calls :meth:`committed`
    after it. With no feed attached, that is one uncontended lock per window.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        #: Windows committed so far (the hand-offs carry it).
        self.windows = 0
        self._publishers: list[FeedPublisher] = []

    @property
    def active(self) -> bool:
        return bool(self._publishers)

    @contextmanager
    def window(self) -> Iterator[None]:
        with self._lock:
            yield

    def count_window(self) -> int:
        """Inside :meth:`window`, once the window is committed: its number."""
        self.windows += 1
        return self.windows

    def committed(self, window: int, changes: Committed) -> None:
        """After window ``window`` committed (outside :meth:`window`): hand its changes to each feed."""
        for publisher in list(self._publishers):
            publisher.hand_off(window, changes)

    @contextmanager
    def between_windows(self) -> Iterator[int]:
        """Hold the handler between two windows; yields the number of windows committed."""
        with self._lock:
            yield self.windows

    def attach(self, publisher: FeedPublisher) -> None:
        with self._lock:
            self._publishers.append(publisher)

    def detach(self, publisher: FeedPublisher) -> None:
        with self._lock:
            if publisher in self._publishers:
                self._publishers.remove(publisher)


def wanted(tables: set[str] | None, name: str) -> bool:
    """Whether a feed limited to ``tables`` (None: all) publishes ``name``."""
    return tables is None or name in tables


def published_names(db: Datalayer, tables: set[str] | None) -> list[tuple[str, str]]:
    """``(kind, name)`` of what a feed of ``db`` publishes now (limited to ``tables``): each
    watched table (kind ``"table"``) and each listener's outputs (``"outputs"``)."""
    names: list[tuple[str, str]] = []
    for component in db.components():
        if wanted(tables, component.table) and not component.table.startswith(OUTPUTS_PREFIX):
            names.append(("table", component.table))
        if wanted(tables, component.identifier):
            names.append(("outputs", component.identifier))
    return list(dict.fromkeys(names))


def will_publish(db: Datalayer, tables: set[str] | None, name: str) -> bool | None:
    """Whether a feed of ``db`` limited to ``tables`` will publish ``name``, which it does not
    (see :meth:`DataService.will_publish`): never one outside ``tables``; surely one the datalayer
    watches or computes (being read, or read again after a failed read); perhaps any other (a
    listener added later)."""
    if not wanted(tables, name):
        return False
    return True if any(known == name for _, known in published_names(db, tables)) else None


@dc.dataclass
class FeedStats:
    windows: int = 0
    deltas: int = 0
    skipped_windows: int = 0
    loads: int = 0
    unencodable: int = 0
    handler_waits: int = 0
    #: Tables and listeners whose name the feed cannot carry (too long...): not published.
    refused: list[str] = dc.field(default_factory=list)
    last_error: str | None = None


class FeedPublisher(ReactiveThread):
    """Publishes one datalayer on a :class:`~reactive.feed.DataService` (``db.cdc.publish``).

    ``tables``: the names to publish (watched tables and listener identifiers); None: all.
    """

    def __init__(
        self,
        db: Datalayer,
        hub: FeedHub,
        service: DataService,
        *,
        tables: set[str] | None = None,
        queue_rows: int = QUEUE_ROWS,
        owns_node: Node | None = None,
    ) -> None:
        super().__init__("feed-publisher")
        self.db = db
        self.hub = hub
        self.service = service
        self.tables = tables
        #: Committed windows waiting to be published, bounded by their changes (a window
        #: larger than the bound goes in alone, once the others are out).
        self._queue: CDCQueue[_Window] = CDCQueue(max_rows=queue_rows)
        self._loaded: dict[str, int] = {}
        #: Names whose read failed (kind by name): read again before the next window, and
        #: after a pause while none comes. Until then they are not published.
        self._unloaded: dict[str, str] = {}
        self._load_failures = 0
        self._owns_node = owns_node
        self.stats = FeedStats()

    @property
    def address(self) -> str:
        """The address subscribers connect to (``tcp://host:port``)."""
        node = self.service.node
        assert node is not None and node.address is not None
        return node.address

    def hand_off(self, window: int, changes: Committed) -> None:
        """On the handler thread: queue a committed window (waits only if this feed is far behind)."""
        try:
            if self._queue.put(_Window(window, changes)):
                self.stats.handler_waits += 1
        except QueueClosedError:
            pass  # stopped: nothing more is published (a handler waiting for room goes on)

    def wait_published(self, timeout: float | None = None) -> bool:
        """Wait until every window handed off so far is published."""
        return self._queue.join(timeout)

    def on_stop(self) -> None:
        self._queue.close()

    def run(self) -> None:
        try:
            for kind, name in self._known_names():
                self._follow(kind, name)
            while self.should_keep_running():
                # One window (waits for one, or a stop; or, while a read failed, for its next try).
                taken = self._queue.get_batch(max_rows=1, timeout=self._retry_in())
                if not taken and self._queue.closed:
                    break
                for name, kind in list(self._unloaded.items()):
                    self._follow(kind, name)
                for item in taken:
                    try:
                        self._publish(item.number, item.changes)
                    except Exception as exc:
                        self.stats.last_error = f"{type(exc).__name__}: {exc}"
                        log.exception("the feed could not publish a window")
                    finally:
                        self._queue.task_done()
        finally:
            self._queue.close()
            self.hub.detach(self)
            self.service.stop()
            if self._owns_node is not None:
                self._owns_node.stop()
            # What was not published never will be: nothing waits for it.
            while left := self._queue.get_batch(max_rows=self._queue.max_rows, timeout=0):
                self._queue.task_done(len(left))

    # -- what goes out -------------------------------------------------------------------------
    def _known_names(self) -> list[tuple[str, str]]:
        return published_names(self.db, self.tables)

    def _wanted(self, name: str) -> bool:
        return wanted(self.tables, name)

    def _publish(self, window: int, changes: Committed) -> None:
        self.stats.windows += 1
        grouped: dict[tuple[str, str], list[tuple[str, Any, Any]]] = {}
        for kind, name, event, row_id, value in changes:
            if self._wanted(name):
                grouped.setdefault((kind, name), []).append((event, row_id, value))
        for (kind, name), delta in grouped.items():
            self._follow(kind, name, window, delta)

    def _follow(self, kind: str, name: str, window: int = 0, delta: list[tuple[str, Any, Any]] | None = None) -> None:
        """Load ``name`` when it is new, then publish ``delta``, its changes in ``window``. A table
        that cannot be published fails alone: the others go on."""
        if name in self.stats.refused:
            return
        try:
            check_name("table", name)
        except ConfigurationError as exc:
            self.stats.refused.append(name)
            self.stats.last_error = str(exc)
            log.error("the feed does not publish %s: %s", name[:80] + ("..." if len(name) > 80 else ""), exc)
            return
        try:
            if name not in self._loaded and not self._load((kind, name)):
                return  # read again later: that read includes this delta
            if not delta:
                return
            if window <= self._loaded[name]:
                self.stats.skipped_windows += 1
                return  # the load already saw this window
            self._send(name, delta)
        except Exception as exc:
            self.stats.last_error = f"{type(exc).__name__}: {exc}"
            log.exception("the feed could not publish %s", name)

    def _send(self, name: str, delta: list[tuple[str, Any, Any]]) -> None:
        try:
            before = self.service.last_seqnum(name)
            if self.service.publish(name, delta, use_snapshot=False) != before:
                self.stats.deltas += 1
        except FeedEncodeError:
            # One value the wire cannot carry: publish the others, count and log the rest.
            for change in delta:
                try:
                    self.service.publish(name, [change], use_snapshot=False)
                except FeedEncodeError as exc:
                    self.stats.unencodable += 1
                    self.stats.last_error = str(exc)
                    log.error("the feed cannot publish %r of %s: %s", change[1], name, exc)

    def _load(self, item: tuple[str, str]) -> bool:
        """Publish ``name``'s current content (read between two windows) as its new state; False
        if it could not be read (it is read again later: see :meth:`_retry_in`). Until this
        read, the table is not published: had the feed followed its changes alone, a
        subscriber's next snapshot would have deleted every row they did not touch."""
        kind, name = item
        read = self._reader(kind, name)
        with self.hub.between_windows() as windows:
            try:
                data = read()
            except Exception as exc:
                self.stats.last_error = f"{type(exc).__name__}: {exc}"
                self._load_failures += 1
                if name not in self._unloaded:
                    log.exception("the feed could not read %s; it is read again before it is published", name)
                self._unloaded[name] = kind
                return False
            self._loaded[name] = windows
        self._unloaded.pop(name, None)
        if not self._unloaded:
            self._load_failures = 0
        self.stats.loads += 1
        try:
            self.service.publish(name, data, use_snapshot=True)
        except FeedEncodeError as exc:
            self.stats.last_error = str(exc)
            self._send(name, [("upsert", k, v) for k, v in data.items()])
        return True

    def _retry_in(self) -> float | None:
        """Seconds until names whose read failed are read again without a window (None: no such
        name): the feed's :func:`~reactive.feed.service.retry_backoff` of the failures in a row."""
        return retry_backoff(self._load_failures) if self._unloaded else None

    def _reader(self, kind: str, name: str) -> Callable[[], dict[Any, Any]]:
        db = self.db
        if kind == "outputs":
            return lambda: {row[SOURCE_FIELD]: row[OUTPUT_FIELD] for row in db.backend.outputs.read_outputs(name)}

        def read_table() -> dict[Any, Any]:
            info = db.table_info(name)
            rows: dict[Any, Any] = {}
            for page in db.backend.source.scan(info, columns=None, page_size=db.page_size):
                rows.update((row[info.id_column], row) for row in page)
            return rows

        return read_table

    def info(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "queued_windows": self._queue.packets,
            "queued_rows": self._queue.rows,
            **dc.asdict(self.stats),
            "service": self.service.status,
        }

    def close(self, timeout: float | None = 10.0) -> None:
        """Stop publishing; the node's threads and sockets are gone when this returns."""
        self.stop()
        if self.is_alive():
            self.join(timeout)
        elif self._owns_node is not None:
            self.service.stop()
            self._owns_node.stop()

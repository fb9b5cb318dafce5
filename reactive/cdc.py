"""``db.cdc``: the change-data-capture service, and the factory of change listeners."""

from __future__ import annotations

import dataclasses as dc
import functools
import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from reactive import checks
from reactive.backends import load_backend
from reactive.backends.base import BaseDatabaseListener, ListenerHooks, TableInfo
from reactive.checkpoints import Lease, LeaseKeeper
from reactive.errors import BackendError, ConfigurationError, LeaseLostError, TableNotFoundError
from reactive.feed.publisher import QUEUE_ROWS as FEED_QUEUE_ROWS
from reactive.feed.publisher import FeedHub, FeedPublisher, will_publish
from reactive.feed.service import UNPUBLISHED_TIMEOUT
from reactive.feed.source import FeedSource
from reactive.handler import CDCHandler, ComponentStats, HandlerTotals, WindowRows
from reactive.metrics import LagQueue, listener_lag
from reactive.queue import QUEUE_ROWS, CDCQueue

if TYPE_CHECKING:
    from collections.abc import Iterable

    from reactive.backends.base import DataBackend
    from reactive.components.base import Component
    from reactive.datalayer import Datalayer
    from reactive.monitor import MonitorSink
    from reactive.reconcile import OnProcessed

log = logging.getLogger(__name__)

#: How long, all together, a stop waits for locks another client holds (SQLite's ``BEGIN
#: EXCLUSIVE``): what the handler cannot write by then is released, its changes delivered again
#: at the next start, and a lease that cannot be given up expires by itself.
STOP_WAIT_SECONDS = 1.0
#: How long ``info()`` waits for the database (the lease's record) before it says what it knows.
INFO_WAIT_SECONDS = 1.0


class DatabaseListenerFactory:
    """Builds the change listener of a backend, found by name in the backend registry.

    >>> DatabaseListenerFactory("ibis").listener_class.__name__
    'IbisPollingListener'
    >>> DatabaseListenerFactory("oracle")
    Traceback (most recent call last):
    ...
    reactive.errors.ConfigurationError: unknown backend 'oracle'; supported backends: ibis, kinetica, mongodb
    """

    def __init__(self, db_type: str) -> None:
        self.db_type = db_type
        self.listener_class: type[BaseDatabaseListener] = load_backend(db_type).listener_class

    def create(
        self, backend: DataBackend, queue: CDCQueue, hooks: ListenerHooks, **options: Any
    ) -> BaseDatabaseListener:
        """The backend's change listener, wired to ``queue`` and to ``db.cdc`` by ``hooks``."""
        return backend.create_listener(queue, hooks, **options)


class DatabaseChangeDataCapture:
    """Owns the queue, the handler thread and the backend's change listener thread.

    >>> import reactive
    >>> with reactive.connect("duckdb://") as db:
    ...     db.cdc.start(); running = db.cdc.running; db.cdc.stop()
    >>> running, db.cdc.running
    (True, False)
    """

    def __init__(
        self,
        db: Datalayer,
        *,
        queue_rows: int = QUEUE_ROWS,
        batch_rows: int | WindowRows | None = None,
        pipeline: int = 2,
        listener_options: dict[str, Any] | None = None,
        lease: Lease | None = None,
    ) -> None:
        if pipeline < 1:
            raise ConfigurationError("pipeline must be at least 1 (windows in flight in the handler)")
        self.db = db
        #: The database's lease: only the process holding it runs the listener and writes.
        self.lease = lease
        self._keeper: LeaseKeeper | None = None
        #: One lease transition (takeover, stand-down) at a time.
        self._transitions = threading.Lock()
        #: Clear while this process waits for the lease (a standby): wait_idle waits for it.
        self._activated = threading.Event()
        self._activated.set()
        #: A CDCQueue that also knows when each unprocessed packet was queued (``info()``'s lag).
        self.queue: CDCQueue = LagQueue(max_rows=queue_rows)
        self._metrics: Any = None
        try:
            window_rows = WindowRows.of(batch_rows)
        except ValueError as exc:
            raise ConfigurationError(str(exc)) from None
        if batch_rows is None and lease is not None:
            # A window's write must end well inside the lease: with a short lease, windows stay smaller.
            window_rows = window_rows.within(lease.lease_ms / 6000)
        #: How many rows the handler takes at once (growing windows unless ``batch_rows`` is set).
        self.window_rows = window_rows
        self.pipeline = pipeline
        self.listener_options = listener_options or {}
        self.factory = DatabaseListenerFactory(db.backend.name)
        self.stats: dict[str, ComponentStats] = {}
        self.totals = HandlerTotals()
        self._last_source_info: dict[str, Any] | None = None
        self._handler: CDCHandler | None = None
        self._listener: BaseDatabaseListener | None = None
        self._watched: dict[str, TableInfo] = {}
        #: Table monitors started in this process (``monitor``): paused by a stand-down (the
        #: listener they were subscribed to stops) and subscribed again at the takeover.
        self._monitors: list[tuple[TableInfo, MonitorSink]] = []
        #: Between the handler and the change feeds (``publish``).
        self.feed_hub = FeedHub()
        self._feeds: list[FeedPublisher] = []
        #: Tables followed from other processes' feeds (``follow``), by local name.
        self._followed: dict[str, FeedSource] = {}
        #: Tables no longer followed, and why (dropped, renamed...).
        self.table_states: dict[str, str] = {}
        self._running = False
        self._lock = threading.RLock()

    @property
    def running(self) -> bool:
        """True between :meth:`start` and :meth:`stop` (a standby runs too: it waits to take over)."""
        return self._running

    # -- the lease ------------------------------------------------------------------------
    @property
    def active(self) -> bool:
        """Whether this process runs the listeners: it holds the lease (or there is none)."""
        return self.lease is None or self.lease.held is not None

    def acquire(self) -> bool:
        """Take the lease if it is free (kept, and renewed, until :meth:`stop`); False on a
        standby. ``db.add`` calls it: only the process holding the lease computes and writes."""
        if self.lease is None:
            return True
        with self._lock:
            if self.lease.held is None and not self._take_lease():
                self._activated.clear()  # a standby: something waits for the lease
                return False
            self._keep()
            return True

    def _take_lease(self) -> bool:
        """``lease.acquire()``; False where the database cannot say now (a transient error: on
        PostgreSQL the lease's row locked by a holder paused inside its window's transaction),
        and the lease keeper tries again. That error failed ``db.add`` and ``db.cdc.start()``,
        which left the process half started: a second start did nothing, ``wait_idle`` said
        True, and it never took the lease."""
        assert self.lease is not None
        try:
            return self.lease.acquire()
        except Exception as exc:
            if not self.db.backend.is_transient(exc):
                raise
            log.warning(
                "could not take the lease of %s now (%s: %s): this process waits as a standby",
                self.db.backend.uri,
                type(exc).__name__,
                exc,
            )
            return False

    def fence(self, *, atomic: bool = False) -> None:
        """Raise :class:`~reactive.errors.LeaseLostError` unless this process may write now.

        Called right before every write of an output and of a position. A holder renews its
        lease every third of ``lease_ms``; a write needs a third of it still ahead, so a
        process paused past its lease (while a standby took over) writes nothing afterwards.
        ``atomic`` (inside the transaction of a window's writes, on SQL databases) also reads
        the lease in that transaction, locking it: a takeover is then ordered before or after
        the whole window, never in the middle.
        """
        if self.lease is None:
            return
        if not self.lease.valid(self.lease.lease_ms / 3000) or (atomic and not self.lease.check(lock=True)):
            raise LeaseLostError(f"this process does not hold the lease of {self.db.backend.uri}: it writes nothing")

    def _keep(self) -> LeaseKeeper:
        """The thread that renews the lease and, while :attr:`running`, takes it when free."""
        assert self.lease is not None
        with self._lock:
            if self._keeper is None or not self._keeper.alive:
                self._keeper = LeaseKeeper(
                    self.lease, auto_activate=self._running, on_look=self._lease_looked, name="database"
                )
                self._keeper.start()
            self._keeper.auto_activate = self._running
            return self._keeper

    def _lease_looked(self, held: bool) -> None:
        """On the lease thread, after each look at the lease: where this process's state
        disagrees with it (running the listeners without the lease, or holding it and running
        nothing), start a transition; one at a time, on its own thread so that the lease keeps
        being renewed meanwhile (a stand-down may wait on a handler retrying a window), and the
        next look tries again.

        The states are compared at every look, not reported once on a change: a report can be
        overtaken by events. A takeover that waited behind a 10 s stand-down once ran when the
        lease had just lapsed and did nothing; the keeper took the lease back in one look and
        saw no change to report; the process held the lease and ran nothing until it stopped.
        """
        if not self._running or held == self._activated.is_set():
            return
        if not self._transitions.acquire(blocking=False):
            return  # one is running: the next look sees what it left
        try:
            threading.Thread(target=self._transition, name="reactive-lease-change", daemon=True).start()
        except BaseException:
            self._transitions.release()
            raise

    def _transition(self) -> None:
        """Take over or stand down, on the lease as it is now (the look that started this may
        be stale: a loss quickly followed by a takeover goes on as it was, its writes fenced
        meanwhile). Runs with ``_transitions`` held, and releases it."""
        try:
            if self.lease is None or not self._running:
                return
            active = self._activated.is_set()
            if self.lease.held is not None and not active:
                self._take_over()
            elif self.lease.held is None and active:
                self._stand_down()
        finally:
            self._transitions.release()

    def _take_over(self) -> None:
        """This process now holds the lease: follow every table, then backfill what was deferred."""
        log.warning("this process now holds the lease of %s: it runs the listeners", self.db.backend.uri)
        try:
            self.db.activate_components(start=self._start_threads)
            self._activated.set()
        except Exception:
            log.exception("taking over %s failed; another process may take over", self.db.backend.uri)
            with self.db.backend.stopping(STOP_WAIT_SECONDS):
                self._stop_threads(30.0, pause_monitors=True)
                if self.lease is not None:
                    self.lease.release()
            return
        self._resume_monitors()

    def _resume_monitors(self) -> None:
        """Subscribe the monitors a stand-down paused to the listener that runs now; one that
        cannot follow its table again (dropped meanwhile) is told and ends, the others go on."""
        listener = self._listener
        with self._lock:
            paused = list(self._monitors)
        for table, sink in paused:
            if listener is None:
                self._end_monitor(table, sink, BackendError("change data capture stopped during the takeover"))
                continue
            try:
                listener.subscribe(table, sink)
            except Exception as exc:
                self._end_monitor(table, sink, exc)

    def _end_monitor(self, table: TableInfo, sink: MonitorSink, why: Exception) -> None:
        """A paused monitor cannot follow its table again: told (dropped, or closed) and forgotten."""
        log.error("the table monitor on %r could not follow it again after the takeover: %s", table.name, why)
        self._forget_monitor(sink)
        if isinstance(why, TableNotFoundError):
            sink.table_dropped(str(why))
        else:
            sink.closed()

    def _stand_down(self) -> None:
        """The lease is lost (it expired, another process took it): stop writing at once."""
        log.error("this process lost the lease of %s: it stops and waits as a standby", self.db.backend.uri)
        self._activated.clear()
        self.db.deactivate_components()
        with self.db.backend.stopping(STOP_WAIT_SECONDS):
            self._stop_threads(30.0, pause_monitors=True)

    @property
    def listener(self) -> BaseDatabaseListener | None:
        """The backend's change listener (a thread once started)."""
        return self._listener

    def _ensure_listener(self) -> BaseDatabaseListener:
        with self._lock:
            if self._listener is None:
                hooks = ListenerHooks(
                    reconcile=self._reconcile_tables, table_gone=self._table_gone, may_report=self._may_report
                )
                listener = self.factory.create(self.db.backend, self.queue, hooks, **self.listener_options)
                for table in self._watched.values():
                    listener.watch(table)
                self._listener = listener
            return self._listener

    def reconcile(
        self,
        components: Iterable[Component],
        *,
        on_processed: OnProcessed | None = None,
        abandon: threading.Event | None = None,
    ) -> int:
        """Queue what brings ``components`` up to date with their source; the packets queued.

        The one path of every reconciliation: the backfill of ``db.add`` and a change
        listener that lost track of changes. Waits while the queue is full; gives up when
        ``abandon`` is set. The handler must be running (``db.add`` starts it).
        """
        queued = 0
        for component in components:
            log.info("reconciling %s with %r", component.identifier, component.table)
            for packet in component.reconcile(self.db, page_size=self.db.page_size, on_processed=on_processed):
                self.queue.put(packet, abandon=abandon)
                queued += 1
        return queued

    def _reconcile_tables(self, tables: list[str], abandon: threading.Event) -> None:
        self.reconcile([c for table in tables for c in self.db.components_for(table, None)], abandon=abandon)

    def _may_report(self, abandon: threading.Event) -> bool:
        """Whether the change listener may tell this process's table monitors of a change now:
        it holds the lease. One that lapsed here is waited for (taken back, the monitors here
        are told; found lost, those of the process that took over are). A holder paused past
        its lease told its monitors, as it woke, of changes the new holder's had been told of."""
        lease = self.lease
        while lease is not None and lease.held is None:
            if not lease.lapsed or abandon.wait(0.05):
                return False
        return True

    def _table_gone(self, table: str, state: str) -> None:
        with self._lock:
            self._watched.pop(table, None)
            self.table_states[table] = state

    def ensure_handler(self) -> CDCHandler:
        """Start the handler thread if it is not running (``db.add`` needs it for backfills)."""
        with self._lock:
            if self._handler is None or not self._handler.is_alive():
                self.queue.reopen()
                self._handler = CDCHandler(
                    self.db,
                    self.queue,
                    compute=self.db.compute,
                    window_rows=self.window_rows,
                    pipeline=self.pipeline,
                    stats=self.stats,
                    totals=self.totals,
                    feed=self.feed_hub,
                )
                self._handler.start()
            return self._handler

    # -- the change feed ----------------------------------------------------------------------
    def publish(
        self,
        address: str = "tcp://127.0.0.1:0",
        *,
        tables: Iterable[str] | None = None,
        service_id: str = "reactive",
        queue_rows: int = FEED_QUEUE_ROWS,
        **node_options: Any,
    ) -> FeedPublisher:
        """Publish every watched table (under its name) and every listener's outputs (under
        its identifier) on a change feed at ``address``; returns the feed (``feed.address`` is
        the bound address, ``feed.close()`` stops it).

        Changes go out after the handler commits them, in commit order, deletes included;
        other processes follow them with :func:`reactive.feed.subscribe`. ``tables`` limits
        what is published. May be called before :meth:`start`. The sequence numbers of each
        published table are kept in this database's checkpoints, so a restart numbers on.
        ``node_options`` go to the :class:`~reactive.feed.Node` (``heartbeat_interval``...).
        ``queue_rows`` bounds the changes of committed windows the feed holds for its publisher
        thread: past it the handler waits for the feed.
        """
        self.db.check_open()
        from reactive.feed import DataService, Node

        if isinstance(tables, str):
            raise ConfigurationError("tables is a list of names, not one str")
        if "queue_windows" in node_options:
            raise ConfigurationError(
                "queue_windows is gone: the feed's buffer is bounded in changes, queue_rows "
                f"(default {FEED_QUEUE_ROWS:,})"
            )
        queue_rows = checks.whole("queue_rows", queue_rows, least=1)
        wanted = None if tables is None else set(tables)
        node = Node(address, **node_options)
        node.start()
        try:
            service = DataService(
                service_id,
                node,
                checkpoints=self.db.backend.sections,
                will_publish=functools.partial(will_publish, self.db, wanted),
            )
            service.start()
            feed = FeedPublisher(self.db, self.feed_hub, service, tables=wanted, queue_rows=queue_rows, owns_node=node)
        except BaseException:
            node.stop()
            raise
        self.feed_hub.attach(feed)
        feed.start()
        with self._lock:
            self._feeds.append(feed)
        log.info("publishing %s on the change feed at %s", self.db.backend.uri, node.address)
        return feed

    def follow(
        self,
        address: str,
        table: str,
        *,
        as_table: str | None = None,
        service: str | None = None,
        unpublished_timeout: float = UNPUBLISHED_TIMEOUT,
        **node_options: Any,
    ) -> FeedSource:
        """Follow ``table`` published at ``address`` (another process's :meth:`publish`) as
        the table ``as_table`` (default: the same name) of this datalayer: listeners select it
        like any table. Rows carry their id as ``_source``; a published output ``v`` is the
        row ``{"_source": id, "_output": v}``. Starts with :meth:`start` (at once if running); a
        publisher not up yet is tried again in the background until it answers. What trying
        again cannot mend (several services at ``address`` publish ``table`` and ``service`` is
        not given, no service there is named ``service``, what answers is not a reactive feed)
        ends the follow until the next start: logged as an error, in ``info()["followed"][name]
        ["failed"]`` and ``info()["stopped_tables"]``, and :meth:`wait_idle` returns False at once.
        So does a table the publisher does not publish, after ``unpublished_timeout`` seconds
        (60; ``math.inf``: for ever) while it cannot say it will (a listener added there later
        publishes its outputs then), or at once where it says it never will (``tables=``).
        """
        self.db.check_open()
        from reactive.feed.service import check_name

        name = check_name("table", as_table or table)
        with self._lock:
            if name in self._followed:
                raise ConfigurationError(f"{name!r} is already followed from {self._followed[name].address}")
        if self.db.backend.source.table_exists(name):
            raise ConfigurationError(
                f"{name!r} is a table of {self.db.backend.uri}: follow the feed under another name (as_table=...)",
                table=name,
            )
        source = FeedSource(
            name,
            address,
            table,
            self.queue,
            lambda names: self._reconcile_tables(names, threading.Event()),
            service=service,
            node_options=node_options,
            unpublished_timeout=unpublished_timeout,
        )
        with self._lock:
            self._followed[name] = source
            running = self._running and self.active
        if running:
            self.ensure_handler()
            source.start()
        return source

    def followed(self, table: str) -> FeedSource | None:
        """The feed source of ``table``, if it is followed from a change feed."""
        return self._followed.get(table)

    @property
    def feeds(self) -> list[FeedPublisher]:
        with self._lock:
            return [f for f in self._feeds if f.is_alive()]

    def close_feeds(self) -> None:
        with self._lock:
            feeds, self._feeds = self._feeds, []
        for feed in feeds:
            feed.close()

    def listen(self, table: str | TableInfo, *, id_column: str | None = None) -> BaseDatabaseListener:
        """Follow ``table``'s changes from now on; the backend's change listener watches it.

        ``db.add`` calls this for the table a component reads. Changes of a table nobody
        reads are queued and dropped by the handler (later: table monitors).
        """
        self.db.check_open()
        if isinstance(table, str):
            table = self.db.table_info(table, id_column=id_column)
        with self._lock:
            self._watched[table.name] = table
            self.table_states.pop(table.name, None)
            listener = self._ensure_listener()
            listener.watch(table)
            return listener

    def monitor(self, table: TableInfo, sink: MonitorSink) -> None:
        """Deliver ``table``'s changes to ``sink`` (a table monitor) as the source reports them.

        Starts change data capture when it is not running; returns once the source follows
        the table for the sink (see :meth:`BaseDatabaseListener.subscribe`).
        """
        self.start()
        if not self.active:
            raise LeaseLostError(
                f"another process holds the lease of {self.db.backend.uri}: table monitors run in that process"
            )
        with self._lock:  # with the listener read: a stop that takes it from now on closes the sink
            listener = self._listener
            if listener is None:
                raise BackendError("change data capture stopped while a table monitor was starting")
            self._monitors.append((table, sink))
        try:
            listener.subscribe(table, sink)
        except BaseException:
            self._forget_monitor(sink)
            raise

    def _forget_monitor(self, sink: MonitorSink) -> None:
        with self._lock:
            self._monitors = [(table, kept) for table, kept in self._monitors if kept is not sink]

    def monitored_by(self, table: str) -> str | None:
        """The id column ``table``'s table monitors follow it by (None where none runs, or where
        the backend's monitors need no id: MongoDB, Kinetica)."""
        listener = self._listener
        if listener is None or not listener.monitored(table):
            return None
        info = listener.tables.get(table)
        return info.id_column if info is not None and info.id_column else None

    def unmonitor(self, table: TableInfo, sink: MonitorSink) -> None:
        """Stop delivering to ``sink``; a table no component or monitor needs is let go."""
        self._forget_monitor(sink)
        listener = self._listener
        if listener is None:
            return
        listener.unsubscribe(table.name, sink)
        with self._lock:
            if not self._needed(table.name, listener):
                listener.unwatch(table.name)

    def _needed(self, table: str, listener: BaseDatabaseListener) -> bool:
        """Whether ``table`` must still be followed: a component reads it, or a table monitor is
        subscribed to it, armed or still starting. Each of them unwatched a table the other
        still needed: a ``db.remove`` of its last listener, or a monitor stopped while another
        started, left the monitors on it alive and told of nothing, ever again."""
        return table in self._watched or listener.monitored(table)

    def unlisten(self, table: str, *, forget: bool = False) -> None:
        """Stop following ``table`` (unless a table monitor follows it); with ``forget``, drop
        what following it kept (see :meth:`BaseDatabaseListener.forget`)."""
        with self._lock:
            self._watched.pop(table, None)
            if self._listener is not None and not self._needed(table, self._listener):
                self._listener.unwatch(table)
                if forget:
                    self._listener.forget(table)

    def start(self) -> None:
        """Start following every watched table. Calling it twice does nothing.

        On a standby (another process holds the lease) this returns at once: the process takes
        over, follows every table and runs the backfills it deferred when the holder stops or
        dies (noticed at once on the same host, otherwise when its lease expires).
        """
        self.db.check_open()
        with self._lock:
            if self._running:
                return
            self._running = True
        try:
            active = self.acquire()
        except BaseException:
            with self._lock:
                self._running = False  # nothing started: a start after this one tries again
            raise
        if active:
            try:
                self._start_threads()
            except BaseException:
                with self._lock:
                    self._running = False
                raise
        else:
            log.info(
                "another process holds the lease of %s: this one waits as a standby and takes over when it stops",
                self.db.backend.uri,
            )
        if self.lease is not None:
            self._keep()

    def _start_threads(self) -> None:
        with self._lock:
            if self._listener is not None and self._listener.is_alive():
                return
            handler = self.ensure_handler()
            listener = self._ensure_listener()
            try:
                listener.start()
            except BaseException:
                # Nothing is left half-started: the error (e.g. no change streams) is the answer.
                self._listener = None
                self._handler = None
                self._stop_handler(handler, None)
                raise
            for source in self._followed.values():
                try:
                    source.start()
                except Exception as exc:
                    log.error("could not follow %s: %s", source, exc)
            log.info("change data capture started on %s", self.db.backend.uri)

    def stop(self, timeout: float | None = 30.0) -> None:
        """Stop the listener, process everything already queued, stop the handler; join both.
        Then give the lease up: a standby takes over at once.

        Locks another client holds on the database are waited for :data:`STOP_WAIT_SECONDS` in
        all: a window that cannot be written by then is released (its changes come again at the
        next start; no position moves past an output not written), and a lease that cannot be
        given up expires by itself."""
        with self._lock:
            self._running = False
            keeper, self._keeper = self._keeper, None
        with self.db.backend.stopping(STOP_WAIT_SECONDS):
            self._stop_threads(timeout)
            if keeper is not None:
                keeper.stop()
            if self.lease is not None:
                self._activated.set()  # nothing waits for the lease any more
                try:
                    self.lease.release()
                except Exception as exc:  # the database is gone or locked: the lease expires by itself
                    log.warning("could not give the lease of %s up: %s", self.db.backend.uri, exc)

    def _stop_threads(self, timeout: float | None, *, pause_monitors: bool = False) -> None:
        """Stop the listener and the handler. The table monitors end (told the listener
        closed), or with ``pause_monitors`` (a stand-down) wait to be subscribed again."""
        with self._lock:
            listener, self._listener = self._listener, None
            handler, self._handler = self._handler, None
            followed = list(self._followed.values())
            # Every monitor is subscribed through monitor(): the list is the listener's too.
            monitors = [sink for _, sink in self._monitors]
            if not pause_monitors:
                self._monitors = []
        for source in followed:
            source.stop()
        if listener is not None:
            if listener.is_alive():
                listener.stop()
                listener.join(timeout)
            self._last_source_info = listener.info()
        if pause_monitors:
            if monitors:
                log.warning("%d table monitors pause until this process holds the lease again", len(monitors))
        else:
            for sink in monitors:
                sink.closed()
        if handler is not None:
            self._stop_handler(handler, timeout)
        for thread in (listener, handler):
            if thread is not None and thread.is_alive():
                log.error("thread %s did not stop within %s s", thread.name, timeout)

    def _stop_handler(self, handler: CDCHandler, timeout: float | None) -> None:
        """Stop ``handler`` once it processed what is queued, then the compute it used (its
        thread, or actors, start again with the next model work)."""
        handler.stop()
        handler.join(timeout)
        self.db.compute.close(timeout)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until every change seen so far is processed and its outputs are written.

        With the listener running, "seen" includes every change committed in the database
        before the call, and changes the handler gave up on meanwhile (released: the listener
        delivers them again) are waited for once more. Returns False if ``timeout`` passes
        first (or the listener is failing).
        """
        timeout = checks.plain(timeout)  # numpy's numbers as Python's
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout != timeout
        ):
            raise TypeError(f"wait_idle takes a timeout in seconds (a number, or None to wait on), not {timeout!r}")
        self.db.check_open()  # it said True: nothing runs, nor will
        deadline = None if timeout is None else time.monotonic() + timeout

        def remaining() -> float | None:
            return None if deadline is None else max(0.0, deadline - time.monotonic())

        if not self._activated.wait(remaining()):
            return False  # a standby: another process runs the listeners
        while True:
            listener = self._listener
            releases = None if listener is None else listener.releases
            if self._running and listener is not None and not listener.sync(remaining()):
                return False
            for source in list(self._followed.values()) if self._running else []:
                if not source.sync(remaining()):
                    return False
            if not self.queue.join(remaining()):
                return False
            if listener is None or listener.releases == releases or not self._running:
                break
        return all(feed.wait_published(remaining()) for feed in self.feeds)

    def info(self) -> dict[str, Any]:
        """Counters per listener, for the queue, the handler and the change listener.

        Each listener's ``lag``: ``rows``, the row changes queued or in flight for it (a row
        changed twice counts twice), and ``seconds``, since the oldest of them was queued (None
        when none waits). Every component added is listed, counters at 0 until it processes rows.
        """
        with self.db.backend.promptly(INFO_WAIT_SECONDS):
            return self._info()

    def _info(self) -> dict[str, Any]:
        handler = self._handler
        listener = self._listener
        lag = listener_lag(self.db, self.queue)
        stats = dict(self.stats)
        return {
            "running": self._running,
            "queue": {
                "rows": self.queue.rows,
                "packets": self.queue.packets,
                "max_rows": self.queue.max_rows,
                "put_packets": self.queue.put_packets,
                "put_rows": self.queue.put_rows,
                "producer_blocked_seconds": round(self.queue.blocked_seconds, 3),
            },
            "handler": {
                "running": handler is not None and handler.is_alive(),
                # The bound of the next window (it grows while windows are quick: WindowRows).
                "window_rows": handler.bound if handler is not None else self.window_rows.floor,
                # What any window costs whatever its rows, once learnt (None before): see WindowCost.
                "window_fixed_seconds": handler.window_cost.fixed if handler is not None else None,
                **dc.asdict(self.totals),
            },
            "source": listener.info() if listener is not None else self._last_source_info,
            "stopped_tables": {**self.table_states, **self._unfollowable()},
            "listeners": {
                name: {
                    **dc.asdict(stats.get(name) or ComponentStats()),
                    "lag": lag.get(name, {"rows": 0, "seconds": None}),
                }
                for name in [*stats, *(name for name in lag if name not in stats)]
            },
            "lease": self._lease_info(),
            "feeds": [feed.info() for feed in self.feeds],
            "followed": {name: source.info() for name, source in self._followed.items()},
        }

    def _unfollowable(self) -> dict[str, str]:
        """Followed tables whose follow failed for good (a configuration error), and why."""
        with self._lock:
            followed = list(self._followed.items())
        return {name: f"not followed: {source.failure}" for name, source in followed if source.failure}

    def metrics(self) -> Any:
        """A ``prometheus_client.CollectorRegistry`` holding these counters as Prometheus metrics,
        read from :meth:`info` at each scrape (the same one at every call). Serve it with
        :func:`reactive.metrics.serve`, or ``prometheus_client.start_http_server(port, registry=...)``.
        Needs the ``metrics`` extra (``prometheus_client``).
        """
        with self._lock:
            if self._metrics is None:
                from reactive.metrics import registry

                self._metrics = registry(self.db)
            return self._metrics

    def _lease_info(self) -> dict[str, Any] | None:
        if self.lease is None:
            return None
        # lapsed: this process's lease ran out here (its database slow or down) and is taken back
        # when the database answers, unless another process took it meanwhile.
        lapsed = self.lease.lapsed
        try:
            holder = self.lease.current()
        except Exception as exc:
            # Unread (the database is down, or locked by another client): this process's own
            # record while it holds the lease, which its writes are fenced by.
            held = self.lease.held
            return {
                "this_process": self.active,
                "lapsed": lapsed,
                "holder": None if held is None else dc.asdict(held),
                "error": f"{type(exc).__name__}: {exc}",
                "lease_ms": self.lease.lease_ms,
                "last_error": None if self._keeper is None else self._keeper.last_error,
            }
        return {
            "this_process": self.active,
            "lapsed": lapsed,
            "holder": None if holder is None else dc.asdict(holder),
            "lease_ms": self.lease.lease_ms,
            "last_error": None if self._keeper is None else self._keeper.last_error,
        }

"""Kinetica table monitors: one ZMQ SUB socket for every watched table and event.

For each watched table the listener asks the server for three table monitors
(``/create/tablemonitor`` with ``event`` insert, update and delete) and subscribes one SUB
socket to every topic. Insert frames carry the records (Avro, decoded with the table's type
schema): they become insert packets **with rows**. Update and delete monitors carry only a
count: a count marks the table for a reconciliation (read ``(id, key)`` pages, compare with the
stored fingerprints, recompute what changed, delete orphaned outputs); a burst of counts costs
one pass.

ZMQ keeps nothing while nobody listens, and the protocol has no sequence numbers, so:

- ``start()`` reconciles every watched table after its monitors are subscribed: whatever
  changed while ``reactive`` was down is caught;
- when the publisher goes away and comes back (a server restart: the socket monitor sees the
  connection drop and return) or the client moved to another head of an HA ring, every
  monitor is created again on the server and every table is reconciled;
- ``reconcile_interval`` (off by default) reconciles every table periodically, a safety net
  for frames a server drops (a publisher's high-water mark).

**Barrier** (``wait_idle``): :meth:`sync` inserts a mark row into a small table
``_reactive_marks`` that the listener also monitors, and waits until the mark's insert frame
arrives; every frame published before it has then been handled, and every count seen before
it has been reconciled. This relies on the server publishing in the order it applied the
writes, which a single-head server does.

**Server-side monitors** are named ``reactive-<32 hex>`` (the ``monitor_id`` option) and
recorded in the checkpoint ``kinetica/monitors`` under this host and process. They are
cleared on stop, when a table is unwatched, after errors, and at start for monitors that a
killed process on this host left behind (its pid is gone).

Two threads, both named and stopped by :meth:`stop`: ``reactive-kinetica-listener`` owns the
ZMQ socket (sockets are not thread-safe; other threads hand it commands through a queue and
a wake-up pipe) and ``reactive-kinetica-maintenance`` makes the HTTP calls that may block:
reconciliations, inactivity checks, re-creating monitors.
"""

from __future__ import annotations

import collections
import dataclasses as dc
import functools
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from reactive.backends.base import (
    MAX_BACKOFF,
    BaseDatabaseListener,
    CheckpointStore,
    TableInfo,
    warn_null_ids,
    warn_unfollowed_ids,
)
from reactive.backends.kinetica.client import (
    KineticaClient,
    KineticaError,
    KineticaProtocolError,
    RecordCodec,
    is_transient,
    record_type_schema,
)
from reactive.backends.kinetica.stores import NON_FINITE_IDS, followed_id
from reactive.backends.kinetica.tables import TableCatalog
from reactive.checkpoints import CorruptCheckpointError, process_alive
from reactive.errors import BackendError, QueueClosedError, TableNotFoundError
from reactive.events import ChangePacket, DBEvent, SourceChange
from reactive.threads import ReactiveThread

if TYPE_CHECKING:
    from reactive.monitor import MonitorSink

log = logging.getLogger(__name__)

MARKS_TABLE = "_reactive_marks"
MARKS_COLUMNS = (("id", "string", False), ("n", "long", False))
MONITORS_CHECKPOINT = "kinetica/monitors"
_EVENTS = {"insert": DBEvent.insert, "update": DBEvent.update, "delete": DBEvent.delete}
_POLL_MS = 250
_MARKS_CODEC = RecordCodec.for_schema(record_type_schema(MARKS_TABLE, MARKS_COLUMNS))


def monitor_id() -> str:
    """A topic id for a monitor this process creates: fixed length (SUB filters by prefix).

    >>> len(monitor_id()), monitor_id().startswith("reactive-")
    (41, True)
    """
    return f"reactive-{uuid.uuid4().hex}"


@dc.dataclass(slots=True)
class Route:
    """Where the frames of one topic go: the engine's packets (``sink`` None) or a monitor."""

    table: str
    event: str
    topic: str
    type_schema: str
    sink: MonitorSink | None = None


class _Commands:
    """Work handed to the listener thread, which alone may touch the ZMQ socket."""

    def __init__(self) -> None:
        self._queue: collections.deque[tuple[Callable[[], None], threading.Event]] = collections.deque()
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)

    @property
    def fd(self) -> int:
        return self._read

    def submit(self, action: Callable[[], None]) -> threading.Event:
        """Queue ``action`` and wake the thread; OSError once the thread has shut down."""
        done = threading.Event()
        self._queue.append((action, done))
        os.write(self._write, b"\x00")
        return done

    def run_pending(self) -> None:
        try:
            while os.read(self._read, 4096):
                pass
        except BlockingIOError:
            pass
        while self._queue:
            action, done = self._queue.popleft()
            try:
                action()
            finally:
                done.set()

    def close(self) -> None:
        os.close(self._read)
        os.close(self._write)


class KineticaMonitorListener(BaseDatabaseListener):
    """Follows Kinetica tables through server-side table monitors (ZMQ + Avro)."""

    def __init__(
        self,
        client: KineticaClient,
        catalog: TableCatalog,
        checkpoints: CheckpointStore,
        queue: Any,
        *,
        inactivity_timeout: float = 60.0,
        reconcile_interval: float | None = None,
        connect_timeout: float = 10.0,
        **options: Any,
    ) -> None:
        super().__init__(queue, name="kinetica", **options)
        self.client = client
        self.catalog = catalog
        self.checkpoints = checkpoints
        self.inactivity_timeout = inactivity_timeout
        self.reconcile_interval = reconcile_interval
        self.connect_timeout = connect_timeout
        self._token = uuid.uuid4().hex
        self._owner = f"{socket.gethostname()}/{os.getpid()}/{self._token}"
        self._routes: dict[str, Route] = {}
        self._commands = _Commands()
        self._zmq: zmq.Context[Any] | None = None
        self._sub: zmq.Socket[Any] | None = None
        self._socket_events: zmq.Socket[Any] | None = None
        self._address: str | None = None
        self._maintenance: ReactiveThread | None = None
        self._maintenance_wake = threading.Event()
        self._last_activity: dict[str, float] = {}
        self._dirty: set[str] = set()
        #: Tables whose last reconciliation failed: when to try again, and the pause before it.
        self._retry_at: dict[str, tuple[float, float]] = {}
        self._failures: dict[str, str] = {}
        self._reconcile_requested = 0
        self._reconcile_done = 0
        self._marks_sent = 0
        self._marks_seen = 0
        self._marks_deleted = 0
        self._marks_lock = threading.Lock()
        #: Tables whose type changed: frames are not decoded until the mark numbered here is seen.
        self._fences: dict[str, int] = {}
        #: Why the maintenance thread's last round failed (reconciliations wait), or None.
        self.failing: str | None = None
        self._requested_at_mark = 0
        self._disconnected = False
        self._reconnected = False
        self._head_changes = client.head_changes
        self._last_reconcile_all = time.monotonic()
        self.decode_errors = 0
        #: Tables an insert of a row without an id was said of (once each: they may be many).
        self._unfollowed_seen: set[tuple[str, str]] = set()
        self.unknown_frames = 0
        self.reconciliations = 0
        self.recoveries = 0

    # -- server-side monitors -------------------------------------------------------------
    def _create_routes(self, table: str, events: Sequence[str], sink: MonitorSink | None) -> list[Route]:
        routes = []
        try:
            for event in events:
                monitor = self.client.create_table_monitor(table, event, monitor_id=monitor_id())  # type: ignore[arg-type]
                routes.append(Route(table, event, monitor.topic_id, monitor.type_schema, sink))
        except BaseException:
            self._clear_server_side([r.topic for r in routes])
            raise
        return routes

    def _clear_server_side(self, topics: Sequence[str]) -> int:
        """Clear server-side monitors; one the server no longer has is not an error. Returns
        how many were already gone."""
        gone = 0
        for topic in topics:
            try:
                self.client.clear_table_monitor(topic)
            except KineticaError as exc:
                gone += 1
                log.debug("monitor %s was already gone: %s", topic, exc)
            except BackendError as exc:
                log.warning("could not clear table monitor %s: %s", topic, exc)
        return gone

    def _record_monitors(self) -> None:
        """Keep the checkpoint of this process's monitors current (for leftover clean-up)."""
        with self._lock:
            topics = sorted(self._routes)
        try:
            try:
                saved = dict(self.checkpoints.load_checkpoint(MONITORS_CHECKPOINT) or {})
            except CorruptCheckpointError:
                saved = {}  # written again whole below
            if topics:
                saved[self._owner] = {"host": socket.gethostname(), "pid": os.getpid(), "topics": topics}
            else:
                saved.pop(self._owner, None)
            self.checkpoints.save_checkpoint(MONITORS_CHECKPOINT, saved)
        except BackendError as exc:
            log.warning("could not record this process's table monitors: %s", exc)

    def _clear_leftovers(self) -> None:
        """Clear the monitors of processes on this host that died without clearing them."""
        try:
            saved = dict(self.checkpoints.load_checkpoint(MONITORS_CHECKPOINT) or {})
        except CorruptCheckpointError as exc:
            log.error("the record of table monitors is unreadable (%s); monitors left by dead processes stay", exc)
            saved = {}
        host = socket.gethostname()
        dead = [o for o, entry in saved.items() if entry.get("host") == host and not process_alive(entry.get("pid"))]
        for owner in dead:
            log.info("clearing %d table monitors left by a process that died", len(saved[owner]["topics"]))
            self._clear_server_side(saved[owner]["topics"])
            del saved[owner]
        if dead:
            self.checkpoints.save_checkpoint(MONITORS_CHECKPOINT, saved)

    # -- commands for the ZMQ thread ------------------------------------------------------
    def _on_socket_thread(self, action: Callable[[], None], timeout: float = 30.0) -> None:
        """Run ``action`` on the listener thread (now, if not running or if this is it).

        While the listener is stopping the action is dropped: its socket goes away with it,
        and the thread may be waiting for the caller (the maintenance thread) to end.
        """
        if not self.is_alive() or threading.current_thread() is self:
            action()
            return
        try:
            done = self._commands.submit(action)
        except OSError:
            action()  # the thread has shut down: the socket is gone and the action sees that
            return
        deadline = time.monotonic() + timeout
        while not done.wait(0.05):
            if not self.should_keep_running():
                return
            if time.monotonic() > deadline:
                raise BackendError("the Kinetica listener thread did not answer")

    def _add_routes(self, routes: Sequence[Route]) -> None:
        def subscribe() -> None:
            assert self._sub is not None
            for route in routes:
                self._sub.setsockopt_string(zmq.SUBSCRIBE, route.topic)

        with self._lock:
            for route in routes:
                self._routes[route.topic] = route
                self._last_activity[route.table] = time.monotonic()
        if self._sub is not None:
            self._on_socket_thread(subscribe)
        self._maintenance_wake.set()  # a new table may need an earlier inactivity check

    def _drop_routes(self, routes: Sequence[Route]) -> int:
        """Forget ``routes`` and clear their server-side monitors; how many were already gone."""

        def unsubscribe() -> None:
            if self._sub is not None:
                for route in routes:
                    self._sub.setsockopt_string(zmq.UNSUBSCRIBE, route.topic)

        with self._lock:
            for route in routes:
                self._routes.pop(route.topic, None)
        if self._sub is not None:
            self._on_socket_thread(unsubscribe)
        return self._clear_server_side([r.topic for r in routes])

    def _routes_of(self, table: str, sink: MonitorSink | None) -> list[Route]:
        with self._lock:
            return [r for r in self._routes.values() if r.table == table and r.sink is sink]

    # -- watching -------------------------------------------------------------------------
    def watch(self, table: TableInfo) -> None:
        """Follow ``table``; when running, its monitors are subscribed before this returns."""
        super().watch(table)
        if self.is_alive() and not self._routes_of(table.name, None):
            self._add_routes(self._create_routes(table.name, ("insert", "update", "delete"), None))
            self._record_monitors()
            self._barrier(self.connect_timeout)

    def unwatch(self, table: str) -> None:
        super().unwatch(table)
        with self._changed:
            self._retry_at.pop(table, None)
            self._failures.pop(table, None)
        self._drop_routes(self._routes_of(table, None))
        if self.is_alive():
            self._record_monitors()

    def subscribe(self, table: TableInfo, sink: MonitorSink) -> None:
        """A table monitor of its own for each event ``sink`` asks for, as the official client does."""
        if not self.is_alive():
            raise BackendError("the Kinetica listener is not running: start db.cdc first")
        self.catalog.forget(table.name)  # asked afresh: it may have been dropped since it was described
        if not self.catalog.exists(table.name):
            raise TableNotFoundError(f"table {table.name!r} does not exist", table=table.name)
        with self._lock:
            self._monitors.setdefault(table.name, []).append(sink)
        try:
            events = [event.value for event in (DBEvent.insert, DBEvent.update, DBEvent.delete) if event in sink.events]
            self._add_routes(self._create_routes(table.name, events, sink))
            self._record_monitors()
            self._barrier(self.connect_timeout)
        except BaseException:
            self.unsubscribe(table.name, sink)
            raise

    def unsubscribe(self, table: str, sink: MonitorSink) -> None:
        super().unsubscribe(table, sink)
        self._drop_routes(self._routes_of(table, sink))
        if self.is_alive():
            self._record_monitors()

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        """Subscribe every watched table, start the threads, then reconcile every table.

        Raises a clear :class:`~reactive.errors.BackendError` when the server or its monitor
        port cannot be reached (nothing is left running).
        """
        try:
            self._clear_leftovers()
            self._create_marks_table()
            self._zmq = zmq.Context()
            self._open_socket(self.client.monitor_address())
            self._add_routes(self._create_routes(MARKS_TABLE, ("insert",), None))
            for table in self.tables:
                self._add_routes(self._create_routes(table, ("insert", "update", "delete"), None))
            self._record_monitors()
        except BaseException:
            self._shutdown()
            raise
        super().start()
        self._maintenance = _Maintenance(self)
        self._maintenance.start()
        if not self._barrier(self.connect_timeout):
            address = self._address
            self.stop()
            self.join(self.connect_timeout)
            raise BackendError(
                f"no table monitor message arrived from {address} within {self.connect_timeout:g} s: "
                f"is the monitor port right (?monitor_port=, default 9002) and reachable?"
            )
        self._mark_dirty(list(self.tables))

    def _open_socket(self, address: str) -> None:
        assert self._zmq is not None
        sub = self._zmq.socket(zmq.SUB)
        sub.setsockopt(zmq.RCVHWM, 0)  # never drop: under backpressure frames wait in memory
        sub.setsockopt(zmq.LINGER, 0)
        self._socket_events = sub.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        sub.connect(address)
        for topic in self._routes:
            sub.setsockopt_string(zmq.SUBSCRIBE, topic)
        self._sub, self._address = sub, address

    def _close_socket(self) -> None:
        if self._sub is not None:
            self._sub.disable_monitor()
            self._sub.close(0)
        if self._socket_events is not None:
            self._socket_events.close(0)
        self._sub = self._socket_events = None

    def stop(self) -> None:
        super().stop()
        self._maintenance_wake.set()
        if self._maintenance is not None:
            self._maintenance.stop()

    def _follow(self) -> None:
        poller = zmq.Poller()
        try:
            self._poll_loop(poller)
        except QueueClosedError:
            pass
        finally:
            self._shutdown()

    def _poll_loop(self, poller: zmq.Poller) -> None:
        registered: tuple[Any, ...] = ()
        while self.should_keep_running():
            if registered != (self._sub, self._socket_events):
                for item in registered:
                    poller.unregister(item)
                registered = (self._sub, self._socket_events)
                for item in (*registered, self._commands.fd):
                    poller.register(item, zmq.POLLIN)
            ready = dict(poller.poll(_POLL_MS))
            if self._commands.fd in ready:
                self._commands.run_pending()
            if self._socket_events is not None and self._socket_events in ready:
                self._on_socket_event(recv_monitor_message(self._socket_events))
            if self._sub is not None and self._sub in ready:
                self._drain()

    def _shutdown(self) -> None:
        maintenance = self._maintenance
        if maintenance is not None and maintenance is not threading.current_thread():
            maintenance.stop()
            maintenance.join(30)
        self._commands.run_pending()
        with self._lock:
            topics = list(self._routes)
            self._routes.clear()
        self._close_socket()
        if self._zmq is not None:
            self._zmq.term()
        self._zmq = None
        self._clear_server_side(topics)
        self._delete_marks()
        self._record_monitors()
        self._commands.close()
        with self._changed:
            self._changed.notify_all()

    def _on_socket_event(self, event: dict[str, Any]) -> None:
        if event["event"] == zmq.EVENT_DISCONNECTED:
            self._disconnected = True
            log.warning("the Kinetica table monitor publisher at %s went away; reconnecting", self._address)
        elif event["event"] == zmq.EVENT_CONNECTED and self._disconnected:
            self._disconnected = False
            self._reconnected = True
            self._maintenance_wake.set()

    # -- frames ---------------------------------------------------------------------------
    def _drain(self) -> None:
        assert self._sub is not None
        while self.should_keep_running():
            try:
                message = self._sub.recv_multipart(zmq.NOBLOCK, copy=True)
            except zmq.Again:
                return
            self._on_message(message)

    def _on_message(self, message: list[bytes]) -> None:
        topic = message[0].decode("utf-8", "replace")
        with self._lock:
            route = self._routes.get(topic)
            if route is not None:
                self._last_activity[route.table] = time.monotonic()
        if route is None:
            self.unknown_frames += 1
            log.debug("a frame on topic %r, which this listener did not subscribe to", topic)
            return
        frames = message[1:]
        if not frames:
            self.decode_errors += 1
            log.warning("an empty message on the %s monitor of %r", route.event, route.table)
            return
        if route.sink is not None:
            self._to_sink(route, frames)
        elif route.table == MARKS_TABLE:
            self._on_marks(route, frames)
        elif route.event == "insert":
            self._on_inserts(route, frames)
        else:
            self._mark_dirty([route.table])
            self.counters[f"{route.event}s"] += self._count(route, frames)

    def _count(self, route: Route, frames: list[bytes]) -> int:
        try:
            return int(RecordCodec.for_schema(route.type_schema).decode(frames[0])["count"])
        except (KineticaProtocolError, KeyError, TypeError, ValueError) as exc:
            self.decode_errors += 1
            log.warning("a %s count of %r did not decode: %s", route.event, route.table, exc)
            return 0

    def _decode(self, table: str, frames: list[bytes]) -> tuple[list[dict[str, Any]], int]:
        """Decode insert frames with the table's type; reload the type once if one fails."""
        codec = self.catalog.codec(table)
        decoded = codec.decode_all(frames)
        if decoded is not None:
            return decoded, 0
        rows: list[dict[str, Any]] = []
        failed = 0
        for frame in frames:
            try:
                rows.append(codec.decode(frame))
                continue
            except KineticaProtocolError as exc:
                error = exc
            self.catalog.forget(table)
            reloaded = self.catalog.codec(table)
            if reloaded.type_schema != codec.type_schema:
                log.info("the type of %r changed; decoding with the new type", table)
                codec = reloaded
                try:
                    rows.append(codec.decode(frame))
                    continue
                except KineticaProtocolError as exc:
                    error = exc
            failed += 1
            log.warning("an insert frame of %r did not decode (%s); the table will be reconciled", table, error)
        return rows, failed

    def _type_unchanged(self, table: str) -> bool:
        """Whether ``table``'s type is still the one its insert frames are decoded with.

        A frame carries no type id, and a column dropped and added again (another order) still
        decodes with the old type, into the wrong columns; so the type id is asked of the
        server (``/show/table``) after the frames arrived: unchanged, they were published in
        it. Changed, the frames received until a mark sent now comes back may be of either
        type: they are not decoded, and their table is reconciled once the mark is in.
        """
        if table in self._fences:
            return False
        try:
            current = self.client.show_table(table).type_id
        except BackendError as exc:  # dropped, or unreachable: decoded as before, reloaded if they fail
            log.debug("could not check the type of %r: %s", table, exc)
            return True
        if current == self.catalog.describe(table).type_id:
            return True
        log.info("the type of %r changed; its frames are not decoded until it is reconciled", table)
        self.catalog.forget(table)
        try:
            self._fences[table] = self._send_mark()
        except BackendError as exc:  # the next mark anyone sends is the fence
            log.debug("could not send a fence mark: %s", exc)
            self._fences[table] = self._marks_sent + 1
        return False

    def _on_inserts(self, route: Route, frames: list[bytes]) -> None:
        table = self.tables.get(route.table)
        if table is None:
            return
        if not self._type_unchanged(route.table):
            self._mark_dirty([route.table])  # read after these frames arrived: their rows are in it
            return
        rows, failed = self._decode(route.table, frames)
        if failed:
            self.decode_errors += failed
            self.last_error = f"{failed} insert frames of {route.table!r} did not decode"
            self._mark_dirty([route.table])
        if not all(followed_id(row[table.id_column]) for row in rows):  # as the scan leaves them out
            unfollowed = (row[table.id_column] for row in rows if not followed_id(row[table.id_column]))
            for odd in {"null" if value is None else "non-finite" for value in unfollowed}:
                if (table.name, odd) not in self._unfollowed_seen:  # said once per table
                    self._unfollowed_seen.add((table.name, odd))
                    if odd == "null":
                        warn_null_ids(table)
                    else:
                        warn_unfollowed_ids(table, NON_FINITE_IDS)
            rows = [row for row in rows if followed_id(row[table.id_column])]
        if rows:
            ids = tuple(row[table.id_column] for row in rows)
            self.emit(ChangePacket(route.table, DBEvent.insert, ids, tuple(rows), position=route.table, source=self))

    def _on_marks(self, route: Route, frames: list[bytes]) -> None:
        codec = RecordCodec.for_schema(route.type_schema)
        prefix = f"{self._token}/"
        for frame in frames:
            try:
                mark = codec.decode(frame)
            except KineticaProtocolError:
                continue
            if not str(mark.get("id", "")).startswith(prefix) or mark["n"] <= self._marks_seen:
                continue
            # Frames after a fence mark are of its table's new type; those before it, which were
            # not decoded, are reconciled, and a barrier passed with this mark waits for that.
            released = [table for table, fence in self._fences.items() if fence <= mark["n"]]
            for table in released:
                del self._fences[table]
            self._mark_dirty(released)
            with self._changed:
                self._marks_seen = mark["n"]
                self._requested_at_mark = self._reconcile_requested
                self._changed.notify_all()

    def _to_sink(self, route: Route, frames: list[bytes]) -> None:
        assert route.sink is not None
        if not self.hooks.may_report(self.stopped_event):
            return
        event = _EVENTS[route.event]
        if event is DBEvent.insert:
            change = SourceChange(route.table, event, len(frames), frames=tuple(frames))
        else:
            change = SourceChange(route.table, event, self._count(route, frames))
        route.sink.deliver(change, self.stopped_event)

    # -- reconciliation -------------------------------------------------------------------
    def _mark_dirty(self, tables: Sequence[str]) -> None:
        if not tables:
            return
        with self._changed:
            self._dirty.update(tables)
            self._reconcile_requested += 1
        self._maintenance_wake.set()

    def reconcile_dirty(self) -> None:
        """Reconcile every table marked by a count, a failed frame or a recovery (one pass each).

        Each table is reconciled alone: one whose pass fails (a table altered, a read the server
        refuses) stays marked and is tried again after a pause of its own (0.5 s, doubling up to
        ``MAX_BACKOFF``), and the other tables go on meanwhile. :attr:`failing` says which fail.
        """
        now = time.monotonic()
        with self._changed:
            due = sorted(t for t in self._dirty if self._retry_at.get(t, (0.0, 0.0))[0] <= now)
            self._dirty.difference_update(due)
            requested = self._reconcile_requested
        watched = [t for t in due if t in self.tables]
        if watched and not self.wait_settled():  # stopping: the tables stay marked
            with self._changed:
                self._dirty.update(due)
            return
        if watched:
            self.reconciliations += 1
        for number, table in enumerate(watched):
            try:
                self.hooks.reconcile([table], self.stopped_event)
            except QueueClosedError:
                with self._changed:
                    self._dirty.update(watched[number:])
                raise
            except Exception as exc:
                self._reconcile_failed(table, exc)
            else:
                with self._changed:
                    self._retry_at.pop(table, None)
                    self._failures.pop(table, None)
        with self._changed:
            if not self._dirty:
                self._reconcile_done = max(self._reconcile_done, requested)
            # now, before sync() wakes: it would take a failure just overcome for a current one
            self.failing = self.failing_tables()
            self._changed.notify_all()

    def _reconcile_failed(self, table: str, exc: Exception) -> None:
        """``table``'s pass failed: it stays marked, and waits its own pause before the next."""
        with self._changed:
            pause = min(self._retry_at.get(table, (0.0, MAX_BACKOFF / 20))[1] * 2, MAX_BACKOFF)
            self._retry_at[table] = (time.monotonic() + pause, pause)
            self._failures[table] = f"{type(exc).__name__}: {exc}"
            self._dirty.add(table)
            self.last_error = self._failures[table]
        level = logging.WARNING if is_transient(exc) else logging.ERROR
        log.log(level, "reconciling Kinetica table %r failed (%s); retrying in %.1f s", table, exc, pause)

    def failing_tables(self) -> str | None:
        """Why the tables whose last reconciliation failed failed, or None when none did."""
        with self._lock:
            failures = dict(self._failures)
        return "; ".join(f"{table!r}: {why}" for table, why in sorted(failures.items())) or None

    def check_inactivity(self) -> None:
        """A table quiet for longer than its inactivity timeout: is it still there?"""
        now = time.monotonic()
        with self._lock:
            quiet = {r.table for r in self._routes.values() if r.table != MARKS_TABLE}
            timeouts = {t: self._timeout_of(t) for t in quiet}
            quiet = {t for t in quiet if now - self._last_activity.get(t, now) > timeouts[t]}
        for table in sorted(quiet):
            if self.client.has_table(table):
                with self._lock:
                    self._last_activity[table] = now
                if table in self.tables:
                    self._renew_monitors(table)
                continue
            self.catalog.forget(table)
            log.info("table %r no longer exists (checked after %g s without messages)", table, timeouts[table])
            self._report_gone(table, "dropped")

    def _renew_monitors(self, table: str) -> None:
        """Monitors of a quiet table again: a table dropped and created again between two checks
        lost its monitors with the old table, and nothing else would say so. The old monitors
        are cleared once the new ones are subscribed; if the server no longer had them, the
        table is reconciled (the engine's writes are idempotent, so frames both monitors may
        deliver in between cost nothing)."""
        old = self._routes_of(table, None)
        self._add_routes(self._create_routes(table, ("insert", "update", "delete"), None))
        if self._drop_routes(old):
            log.warning("the table monitors of %r were gone (was it dropped and created again?); reconciling", table)
            self.catalog.forget(table)
            self._mark_dirty([table])
        self._record_monitors()

    def _timeout_of(self, table: str) -> float:
        sinks = [s.inactivity_timeout for s in self._monitors.get(table, ()) if s.inactivity_timeout is not None]
        watched = [self.inactivity_timeout] if table in self._tables else []
        return min([*sinks, *watched] or [self.inactivity_timeout])

    def next_inactivity_check(self) -> float:
        """Seconds until the next table may have been quiet for too long."""
        with self._lock:
            tables = {r.table for r in self._routes.values() if r.table != MARKS_TABLE}
            now = time.monotonic()
            waits = [self._last_activity.get(t, now) + self._timeout_of(t) - now for t in tables]
        if self.reconcile_interval:
            waits.append(self._last_reconcile_all + self.reconcile_interval - now)
        with self._changed:
            waits.extend(self._retry_at[t][0] - now for t in self._dirty if t in self._retry_at)
        return min(max(0.05, min(waits or [self.inactivity_timeout])), threading.TIMEOUT_MAX)

    def recover_if_needed(self) -> None:
        """After a reconnect or a move to another head: monitors again, then reconcile all."""
        moved = self.client.head_changes != self._head_changes
        if not (moved or self._reconnected):
            if self.reconcile_interval and time.monotonic() - self._last_reconcile_all > self.reconcile_interval:
                self._last_reconcile_all = time.monotonic()
                self._mark_dirty(list(self.tables))
            return
        self._reconnected = False
        self._head_changes = self.client.head_changes
        log.warning("re-creating Kinetica table monitors on %s and reconciling every table", self.client.current_head)
        # Requested before a mark can arrive on the new topics: a barrier passed after the
        # swap then waits for this reconciliation, which catches what no monitor published.
        self._mark_dirty(list(self.tables))
        with self._lock:
            old = list(self._routes.values())
        fresh: list[Route] = []
        gone: set[str] = set()
        try:
            self._create_marks_table()  # a server that lost its tables lost this one too
            for route in old:
                try:
                    fresh.extend(self._create_routes(route.table, (route.event,), route.sink))
                except KineticaError as exc:
                    if not self.catalog.missing(exc, route.table):
                        raise
                    gone.add(route.table)  # reported below; the other tables go on
            address = self.client.monitor_address()
        except BaseException:
            self._clear_server_side([r.topic for r in fresh])
            self._reconnected = True  # the next round tries again
            raise

        def swap() -> None:
            with self._lock:
                for route in old:
                    self._routes.pop(route.topic, None)
                for route in fresh:
                    self._routes[route.topic] = route
            if address != self._address:
                self._close_socket()
                self._open_socket(address)
            else:
                assert self._sub is not None
                for route in old:
                    self._sub.setsockopt_string(zmq.UNSUBSCRIBE, route.topic)
                for route in fresh:
                    self._sub.setsockopt_string(zmq.SUBSCRIBE, route.topic)

        self._on_socket_thread(swap)
        self._clear_server_side([r.topic for r in old])
        self._record_monitors()
        self._last_reconcile_all = time.monotonic()
        self.recoveries += 1
        for table in sorted(gone):
            self.catalog.forget(table)
            self._report_gone(table, "dropped")

    # -- the barrier ----------------------------------------------------------------------
    def _barrier(self, timeout: float | None) -> bool:
        """Insert a mark and wait until its frame arrives: everything published before is in.

        A mark published before the subscription reached the server (ZMQ's slow joiner) is
        lost; another one is sent after a growing pause, until ``timeout``.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = 0.1
        restored = False
        while True:
            try:
                mark = self._send_mark()
            except KineticaError as exc:
                if not restored and self._restore_marks():
                    restored = True
                    continue
                log.warning("could not write a barrier mark: %s", exc)
                return False
            except BackendError as exc:
                log.warning("could not write a barrier mark: %s", exc)
                return False
            wait = pause if deadline is None else min(pause, max(0.0, deadline - time.monotonic()))
            with self._changed:
                if self._changed.wait_for(functools.partial(self._passed, mark), wait):
                    return self._marks_seen >= mark
            if deadline is not None and time.monotonic() >= deadline:
                return False
            pause = min(pause * 2, 2.0)

    def _send_mark(self) -> int:
        """Insert the next barrier mark; its number."""
        with self._changed:
            self._marks_sent += 1
            mark = self._marks_sent
        self.client.insert_records(MARKS_TABLE, [{"id": f"{self._token}/{mark}", "n": mark}], _MARKS_CODEC)
        return mark

    def _create_marks_table(self) -> None:
        self.catalog.forget(MARKS_TABLE)  # asked afresh: someone may have dropped it
        self.catalog.create(MARKS_TABLE, MARKS_COLUMNS, {"id": ["primary_key"]})

    def _restore_marks(self) -> bool:
        """Create ``_reactive_marks`` and its insert monitor again if someone dropped the table
        (its monitor went with it); whether it was missing. The table used to be created once
        per process, so every barrier after a drop failed at once, for ever."""
        with self._marks_lock:
            if self.client.has_table(MARKS_TABLE):
                return False
            log.warning("%s was dropped; creating it (and its table monitor) again", MARKS_TABLE)
            self._create_marks_table()
            old = self._routes_of(MARKS_TABLE, None)
            self._add_routes(self._create_routes(MARKS_TABLE, ("insert",), None))
            self._drop_routes(old)
            self._record_monitors()
            return True

    def _passed(self, mark: int) -> bool:
        return self._marks_seen >= mark or self.ending()

    def _delete_marks(self, upto: int | None = None) -> None:
        """Delete this listener's marks up to ``upto`` (all it sent by default)."""
        with self._changed:
            first, last = self._marks_deleted + 1, self._marks_sent if upto is None else upto
            self._marks_deleted = max(self._marks_deleted, last)
        if last >= first:
            try:
                self.catalog.delete_by_ids(MARKS_TABLE, "id", [f"{self._token}/{n}" for n in range(first, last + 1)])
            except BackendError as exc:
                log.debug("could not delete barrier marks: %s", exc)

    def sync(self, timeout: float | None) -> bool:
        """Wait until every change published before this call is queued (and counts reconciled)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if self.ending() or not self._barrier(timeout):
            return False
        with self._changed:
            needed = self._requested_at_mark
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            reconciled = self._changed.wait_for(lambda: self._reconcile_done >= needed or self.ending(), remaining)
        self._delete_marks(upto=self._marks_seen)
        return reconciled and self._reconcile_done >= needed and not self.failing

    # -- what the handler calls -----------------------------------------------------------
    def save_positions(self, positions: Sequence[Any]) -> None:
        """Nothing to save: a restart reconciles (ZMQ keeps nothing for an absent subscriber)."""

    def redeliver(self, positions: Sequence[Any]) -> None:
        """The handler gave up on these inserts: reconcile their tables."""
        self._mark_dirty(sorted(set(positions)))

    def reconcile_soon(self, table: str) -> None:
        """Reconcile ``table``'s components on the maintenance thread (their outputs were lost).

        Called from the handler thread, after the :meth:`sync` of a ``wait_idle`` under way may
        have passed: counted as a release, so that it syncs again, and waits for the outputs
        computed again.
        """
        self._mark_dirty([table])
        with self._changed:
            self.releases += 1

    def info(self) -> dict[str, Any]:
        with self._lock:
            monitors = len(self._routes)
        return {
            **super().info(),
            "address": self._address,
            "head": self.client.current_head,
            "server_monitors": monitors,
            "reconciliations": self.reconciliations,
            "recoveries": self.recoveries,
            "decode_errors": self.decode_errors,
            "unknown_frames": self.unknown_frames,
            "pending_reconciliation": sorted(self._dirty),
        }


class _Maintenance(ReactiveThread):
    """The listener's second thread: the HTTP work that may block or wait for the queue."""

    def __init__(self, listener: KineticaMonitorListener) -> None:
        super().__init__("kinetica-maintenance")
        self.listener = listener

    def on_stop(self) -> None:
        self.listener._maintenance_wake.set()

    def run(self) -> None:
        listener = self.listener
        backoff = 0.5
        while self.should_keep_running():
            listener._maintenance_wake.wait(listener.next_inactivity_check())
            listener._maintenance_wake.clear()
            if not self.should_keep_running():
                return
            try:
                listener.recover_if_needed()
                listener.reconcile_dirty()
                listener.check_inactivity()
            except QueueClosedError:
                return
            except Exception as exc:
                listener.failing = listener.last_error = f"{type(exc).__name__}: {exc}"
                level = logging.WARNING if is_transient(exc) else logging.ERROR
                log.log(level, "Kinetica maintenance failed (%s); retrying in %.1f s", listener.failing, backoff)
                self.wait(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)
                listener._maintenance_wake.set()
            else:
                listener.failing = listener.failing_tables()
                backoff = 0.5

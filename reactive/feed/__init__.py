"""``reactive.feed``: the change feed other processes subscribe to.

Services publish tables and subscribe to other services' tables (OpenStack Congress's
``DataService``, the seed in ``shared/seeds``, with its names): every delivery carries a
sequence number, a new subscriber gets a snapshot and then the deltas, a subscriber that
misses a delta resubscribes. Services live on a :class:`Node`; nodes talk over ZMQ (PUB/SUB
for data, ROUTER/DEALER for RPCs), in one process or across machines.

``db.cdc.publish(address)`` publishes a datalayer's watched tables and its listeners' outputs;
:func:`subscribe` follows one of them from another process in a few lines::

    sub = reactive.feed.subscribe("tcp://127.0.0.1:5560", "embed__text", print)
    ...
    sub.close()

**The wire** (for a client in another language). All bodies are UTF-8 JSON, with the value
encoding of :mod:`reactive.feed.wire`; ``v`` is 1.

- Data: a ZMQ SUB socket connected to the node's data address (``data_address`` in the
  ``services`` answer below), subscribed to the topic ``<service>\\0<table>\\0``, receives
  two-frame messages ``[topic, body]``. A delta body is ``{"v": 1, "kind": "delta",
  "publisher", "table", "epoch", "seqnum", "sent", "changes": [[event, id, value], ...]}``
  (event ``insert``, ``update`` or ``delete``; value null for a delete); a heartbeat is
  ``{"v": 1, "kind": "heartbeat", "publisher", "table", "epoch", "seqnum"}`` with the last
  sequence number, sent every ``heartbeat_interval``.
- RPC: a ZMQ DEALER connected to the node's address sends ``[request id, body]`` with body
  ``{"v": 1, "service", "action", "kwargs"}`` and gets ``[request id, {"v": 1, "ok": true,
  "result"}]`` or ``{"v": 1, "ok": false, "message"}``. Service ``__node__`` answers
  ``services`` (``{"node_id", "data_address", "services": {id: DataServiceInfo}}``) and
  ``probe`` (``{"service", "table"}``: publish a heartbeat of that table now). Every service
  answers ``get_last_published_data_with_seqnum`` (``{"table"}`` -> ``{"epoch", "seqnum",
  "published", "data": [[id, value], ...]}``; ``published`` false: the service does not publish
  the table, or not yet, as after a restart until it has read its tables; the answer then adds
  ``"tables"``, those it publishes, and ``"will_publish"``: true, it is reading it; false, it never
  will; null, it cannot say), ``get_snapshot`` and
  ``ping``. A snapshot request may say who asks, ``"caller": <service id>`` beside ``"service"``:
  the publisher lists it (``subscriber_list``) while the connection it asked on is open, or until
  ``__node__`` hears ``unsubscribed`` (``{"service", "table", "subscriber"}``).
- To follow a table: subscribe the SUB socket, call ``probe`` until a message of the topic
  arrives (ZMQ drops what is published before a subscription reaches the publisher), fetch
  the snapshot, then apply each delta whose ``seqnum`` is one more than the last applied;
  keep later ones aside; on a gap that stays open, a heartbeat ahead of you, or a new
  ``epoch``, fetch the snapshot again. A snapshot that is not ``published`` is not the table:
  keep your view and fetch it again later (its first heartbeat says it is published); give up
  on one the publisher says it never will publish, or that it has not published, nor said it
  will, for as long as you can wait (a misspelt name, most likely).
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable, Hashable
from typing import Any

from reactive.errors import ConfigurationError
from reactive.events import id_key
from reactive.feed.node import (
    FeedConfigurationError,
    Node,
    NodeStats,
    RpcError,
    RpcTimeoutError,
    TableNotPublishedError,
    check_address,
    resumable,
)
from reactive.feed.service import (
    UNPUBLISHED_TIMEOUT,
    Change,
    DataService,
    DataServiceEndPoints,
    DataServiceInfo,
    check_name,
    published_list,
)
from reactive.feed.wire import FeedDecodeError, FeedEncodeError, same_on_the_wire

log = logging.getLogger(__name__)

__all__ = [
    "Change",
    "DataService",
    "DataServiceEndPoints",
    "DataServiceInfo",
    "FeedConfigurationError",
    "FeedDecodeError",
    "FeedEncodeError",
    "Node",
    "NodeStats",
    "RpcError",
    "RpcTimeoutError",
    "Subscription",
    "TableNotPublishedError",
    "resumable",
    "subscribe",
]


class Subscription(DataService):
    """A subscription to one table: ``on_change`` gets every :class:`Change` in order.

    The first delivery is the snapshot, one ``"snapshot"`` change per row; then every insert,
    update and delete. After a resubscription (a gap, a publisher restart) the view is brought
    to the publisher's state: rows that changed arrive as ``"update"`` (or ``"insert"``), rows
    that disappeared as ``"delete"``, rows unchanged not at all. ``on_change`` runs on the
    node's receiving thread; an exception it raises is logged and counted, and delivery goes on.

    A table the publisher does not publish yet is followed from an empty snapshot (numbered
    from the publisher's last number, so a publisher's first changes arrive as deltas): for as
    long as the publisher says it will publish it (it is reading it), and at most
    ``unpublished_timeout`` seconds (60; ``math.inf``: for ever) while it cannot say (a listener
    added later publishes its outputs then). After that, or at once where the publisher says it
    never will, the subscription ends: :attr:`error` holds a :class:`TableNotPublishedError`
    naming the tables that are published, which :meth:`wait_synced` and :meth:`wait_delivered`
    raise; it is logged as an error, and nothing more is delivered.
    """

    def __init__(
        self,
        node: Node,
        publisher: str,
        table: str,
        on_change: Callable[[Change], Any],
        *,
        service_id: str | None = None,
        gap_timeout: float = 0.5,
        own_node: bool = False,
        unpublished_timeout: float = UNPUBLISHED_TIMEOUT,
    ) -> None:
        super().__init__(
            service_id or f"subscriber-{uuid.uuid4().hex[:12]}",
            node,
            gap_timeout=gap_timeout,
            unpublished_timeout=unpublished_timeout,
        )
        if not callable(on_change):
            raise ConfigurationError(f"on_change must be callable, not {type(on_change).__name__}")
        self.publisher = check_name("service", publisher)
        self.table = check_name("table", table)
        self.on_change = on_change
        self._closes_node = own_node
        self._view: dict[Hashable, tuple[Any, Any]] = {}
        self._started_once = False
        self._view_lock = threading.Lock()
        self.callback_errors = 0

    def open(self) -> Subscription:
        self.start()
        self.subscribe(self.publisher, self.table)
        return self

    def _receive(self, sub: Any, data: Any, seqnum: int, snapshot: bool) -> None:
        if snapshot:
            changes = self._resync(data, seqnum)
        else:
            changes = data
            self._apply(changes)
        for change in changes:
            if not self._running:
                return  # closed, perhaps by on_change itself: nothing more is delivered
            try:
                self.on_change(change)
            except Exception:
                self.callback_errors += 1
                log.exception("on_change failed on %s %r of %s", change.event, change.id, self.table)

    def _apply(self, changes: list[Change]) -> None:
        with self._view_lock:
            for change in changes:
                key = id_key(change.id)
                if change.event == "delete":
                    self._view.pop(key, None)
                else:
                    self._view[key] = (change.id, change.value)

    def _resync(self, data: dict[Any, Any], seqnum: int) -> list[Change]:
        """Changes that turn the current view into the snapshot ``data``."""
        with self._view_lock:
            first, self._started_once = not self._started_once, True
            old = self._view
            self._view = {id_key(i): (i, v) for i, v in data.items()}
            if first:
                return [Change("snapshot", i, v, seqnum, self.table, self.publisher) for i, v in data.items()]
            changes = []
            for key, (row_id, value) in self._view.items():
                before = old.get(key)
                if before is None:
                    changes.append(Change("insert", row_id, value, seqnum, self.table, self.publisher))
                elif not same_on_the_wire(before[1], value):
                    changes.append(Change("update", row_id, value, seqnum, self.table, self.publisher))
            changes.extend(
                Change("delete", row_id, None, seqnum, self.table, self.publisher)
                for key, (row_id, _) in old.items()
                if key not in self._view
            )
            return changes

    @property
    def view(self) -> dict[Any, Any]:
        """The table as this subscriber sees it now: ``{row id: value}``."""
        with self._view_lock:
            return {row_id: value for row_id, value in self._view.values()}

    @property
    def seqnum(self) -> int | None:
        """The last sequence number applied (None before the snapshot)."""
        with self._lock:
            sub = self._subscriptions.get((self.publisher, self.table))
            return None if sub is None else sub.seqnum

    @property
    def error(self) -> Exception | None:
        """Why the subscription ended for good (a :class:`TableNotPublishedError`); None while it goes on."""
        with self._lock:
            sub = self._subscriptions.get((self.publisher, self.table))
            return None if sub is None else sub.failure

    def wait_synced(self, timeout: float | None = None) -> bool:
        """Wait until the snapshot arrived (and no gap is open); False on timeout. Raises
        :attr:`error` once the subscription ended (a table not published)."""
        synced = super().wait_synced(timeout)
        self._raise_error()
        return synced

    def wait_delivered(self, seqnum: int, timeout: float | None = None, **which: Any) -> bool:
        """Wait until sequence number ``seqnum`` is delivered (see :meth:`DataService.wait_delivered`);
        raises :attr:`error` once the subscription ended."""
        delivered = super().wait_delivered(seqnum, timeout, **which)
        self._raise_error()
        return delivered

    def _raise_error(self) -> None:
        error = self.error
        if error is not None:
            raise error

    def close(self) -> None:
        """Stop delivering; the private node's threads and sockets are gone when this returns
        (called from ``on_change``, its receiving thread ends as soon as ``on_change`` returns)."""
        node = self.node
        self.stop()
        if self._closes_node and node is not None:
            node.stop()

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def subscribe(
    address: str,
    table: str,
    on_change: Callable[[Change], Any],
    *,
    service: str | None = None,
    gap_timeout: float = 0.5,
    unpublished_timeout: float = UNPUBLISHED_TIMEOUT,
    **node_options: Any,
) -> Subscription:
    """Follow ``table`` published by the node at ``address``; see :class:`Subscription`.

    ``service`` names the publishing service when the node has several that publish
    ``table``. ``node_options`` go to the subscriber's private :class:`Node` (``rpc_timeout``,
    ``receive_filter``...). Raises :class:`RpcTimeoutError` when nothing answers at
    ``address`` and :class:`RpcError` when no service there publishes ``table`` (with one service
    there, a table it does not publish yet is waited for, with a warning naming those it does
    publish: a listener added later publishes its outputs then; see :class:`Subscription` for
    how long: ``unpublished_timeout``); :class:`FeedConfigurationError` (an ``RpcError`` and a
    ``ConfigurationError``) when several services publish it and ``service`` is not given, when
    no service there is named ``service``, or when what answers is not a reactive feed.
    """
    check_address(address)
    check_name("table", table)
    if service is not None:
        check_name("service", service)
    node = Node(None, peers=[address], **node_options)
    node.start()
    try:
        services = node.refresh_peer(address)
        publisher = _publisher_of(address, table, service, services)
        subscription = Subscription(
            node,
            publisher,
            table,
            on_change,
            gap_timeout=gap_timeout,
            own_node=True,
            unpublished_timeout=unpublished_timeout,
        )
        return subscription.open()
    except BaseException:
        node.stop()
        raise


def _publisher_of(address: str, table: str, service: str | None, services: dict[str, Any]) -> str:
    """The service at ``address`` to follow ``table`` of. Raises :class:`RpcError` while none can
    be chosen yet (the node runs no service yet, or none publishes the table), and
    :class:`FeedConfigurationError` when what was given cannot be followed (see :func:`resumable`)."""
    if service is not None:
        if service not in services:
            names = ", ".join(sorted(services))
            if not names:  # a node starting: its services are not on it yet
                raise RpcError(f"no service {service!r} at {address} (services: none)")
            raise FeedConfigurationError(f"no service {service!r} at {address} (services: {names})")
        return service
    publishing = [sid for sid, info in services.items() if table in (info.get("published_tables") or [])]
    if len(publishing) == 1:
        return publishing[0]
    if not publishing and len(services) == 1:
        # Not published yet (a listener added later)? The subscription waits for it, for a while.
        (only, info) = next(iter(services.items()))
        tables = info.get("published_tables")
        listed = published_list(table, [str(t) for t in tables] if isinstance(tables, list) else None)
        log.warning("%s at %s publishes no table %r yet (%s): waiting for it", only, address, table, listed)
        return only
    if not publishing:
        names = ", ".join(sorted(services)) or "none"
        raise RpcError(f"no service at {address} publishes {table!r} (services: {names})")
    raise FeedConfigurationError(
        f"several services at {address} publish {table!r} ({', '.join(sorted(publishing))}): pass service="
    )

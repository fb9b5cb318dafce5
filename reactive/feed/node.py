"""``Node``: where services live, and how they reach services of other processes (ZMQ).

A node binds two sockets: a ROUTER at :attr:`Node.address` for RPCs (snapshots, the list of
its services, probes), and a PUB at :attr:`Node.data_address` for deltas and heartbeats. A
node that subscribes connects one SUB socket to the PUB of every node it follows (its own
included: a local subscription takes the same path as a remote one) and a DEALER to the
ROUTER of every peer. Three named threads do the work: ``reactive-feed-server`` answers
RPCs, ``reactive-feed-receiver`` reads deltas, sends heartbeats and checks subscriptions,
``reactive-feed-fetcher`` fetches snapshots, so a dead publisher never stalls deliveries.
"""

from __future__ import annotations

import contextlib
import dataclasses as dc
import itertools
import json
import logging
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import zmq
from zmq.utils.monitor import parse_monitor_message

from reactive import checks
from reactive.errors import ConfigurationError, ReactiveError
from reactive.feed import wire
from reactive.feed.service import EVENTS, Change, endpoint_actions
from reactive.feed.wire import DocumentId
from reactive.threads import ReactiveThread
from reactive.uri import redact

if TYPE_CHECKING:
    from reactive.feed.service import DataService, Delta

log = logging.getLogger(__name__)

NODE_SERVICE = "__node__"
#: Flags as plain ints: pyzmq's are enum.Flag members, and each use per message costs a microsecond or two.
_NOBLOCK = int(zmq.NOBLOCK)
_MORE_NOBLOCK = int(zmq.SNDMORE | zmq.NOBLOCK)
#: A hook on the receiving side of a node, for tests of loss and reordering: it gets the
#: frames of each data message and returns the messages to process now (none: dropped).
ReceiveFilter = Callable[[list[bytes]], Sequence[list[bytes]]]
#: How long an RPC waits at a time for its answer before it looks whether the node is stopping.
_POLL_SLICE = 0.05


class RpcError(ReactiveError):
    """An RPC was refused: unknown service or action, bad arguments, or the action raised."""


class RpcTimeoutError(RpcError, TimeoutError):
    """No answer came in time: the node is not running, unreachable, or too busy."""


class FeedConfigurationError(RpcError, ConfigurationError):
    """What was asked for cannot be followed as it is given, however often it is tried: another
    program (or another version of the wire) answers at the address, several services there
    publish the table, or the node runs no service of the name given."""


class TableNotPublishedError(FeedConfigurationError):
    """A subscription's table is not published, and its publisher says it never will be (it
    publishes only the tables it was given), or it was not for ``unpublished_timeout`` seconds
    while the publisher could not say it will be: most likely a misspelt name. ``published``
    holds the tables the publisher does publish (None where it did not say)."""

    def __init__(self, message: str, *, publisher: str, table: str, published: Sequence[str] | None) -> None:
        super().__init__(message, table=table)
        self.publisher = publisher
        self.published = None if published is None else list(published)


def resumable(exc: BaseException) -> bool:
    """Whether following a publisher may work if tried again after ``exc`` (what pymongo's
    ``_resumable`` is to a change stream): the node did not answer (down, restarting,
    unreachable) or does not run the service or publish the table yet. A configuration error
    is not, nor is an error that is not the feed's own (a bug).

    >>> resumable(RpcTimeoutError("no answer")), resumable(FeedConfigurationError("pass service="))
    (True, False)
    """
    return isinstance(exc, RpcError) and not isinstance(exc, ConfigurationError)


def topic(publisher: str, table: str) -> bytes:
    """The PUB/SUB topic of a table: both names, each ended by a NUL (no prefix of another).

    >>> topic("svc", "t")
    b'svc\\x00t\\x00'
    """
    return f"{publisher}\x00{table}\x00".encode()


def check_address(address: str) -> str:
    """A ZMQ endpoint to bind or connect: ``tcp://host:port`` or ``ipc://path``.

    ZMQ takes nothing else (no user or password, path, query, or space around), so nothing
    else is let through to fail later, inside a feed thread; a password is shown as ``***``.

    >>> check_address("tcp://127.0.0.1:0")
    'tcp://127.0.0.1:0'
    >>> check_address("http://x")
    Traceback (most recent call last):
    ...
    reactive.errors.ConfigurationError: a feed address is tcp://host:port or ipc://path, not 'http://x'
    >>> check_address("tcp://me:s3cret@host:5560")
    Traceback (most recent call last):
    ...
    reactive.errors.ConfigurationError: a feed address ... not 'tcp://me:***@host:5560': ZMQ takes no user or password
    """
    problem = None
    if isinstance(address, str):
        parts = urlsplit(address)
        if address != address.strip() or not address.isprintable():
            problem = "spaces around it or control characters in it"
        elif parts.scheme == "ipc" and address[6:]:
            return address
        elif parts.scheme == "tcp":
            try:
                port = parts.port
            except ValueError:
                port = None
            if "@" in parts.netloc:
                problem = "ZMQ takes no user or password"
            elif parts.path or parts.query or parts.fragment or address.endswith(("?", "#")):
                problem = "ZMQ takes no path, query or fragment"
            elif parts.hostname and port is not None:
                return address
    shown = redact(address) if isinstance(address, str) else address
    why = f": {problem}" if problem else ""
    raise ConfigurationError(f"a feed address is tcp://host:port or ipc://path, not {shown!r}{why}")


def _data_endpoint(address: str) -> str:
    parts = urlsplit(address)
    if parts.scheme == "ipc":
        return address + ".data"
    host = parts.hostname or "127.0.0.1"
    return f"tcp://{'[' + host + ']' if ':' in host else host}:0"


def _reachable(data_address: str, via: str) -> str:
    """The data address a peer gave, with a wildcard host replaced by the one we reached it at."""
    parts = urlsplit(data_address)
    if parts.scheme == "tcp" and parts.hostname in ("0.0.0.0", "::", "*"):
        host = urlsplit(via).hostname
        return f"tcp://{host}:{parts.port}"
    return data_address


@dc.dataclass
class NodeStats:
    """What the receiving side of a node dropped, and why."""

    received: int = 0
    malformed: int = 0
    oversized: int = 0
    filtered: int = 0
    last_dropped: str | None = None


class _Peer:
    """Another node: a DEALER to its ROUTER, used by one thread at a time."""

    def __init__(self, context: zmq.Context, address: str) -> None:
        self.address = address
        self._socket = context.socket(zmq.DEALER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.IMMEDIATE, 1)
        try:
            self._socket.connect(address)
        except zmq.ZMQError as exc:  # its message holds the address as given
            self._socket.close(0)
            why = zmq.strerror(exc.errno)
            raise ConfigurationError(f"the feed cannot connect to {redact(address)}: {why}") from None
        self._lock = threading.Lock()
        #: Set by the node's stop: a request waiting for an answer gives up at once.
        self._closing = threading.Event()
        self._ids = itertools.count(1)
        self.services: dict[str, Any] = {}
        self.data_address: str | None = None
        self.node_id: str | None = None
        self.refreshed = 0.0

    def request(self, body: bytes, timeout: float, max_bytes: int) -> Any:
        """Send one request and wait for its answer; returns the decoded result."""
        deadline = time.monotonic() + timeout
        with self._lock:
            if self._socket.closed or self._closing.is_set():
                raise RpcError("the node is stopped")
            request_id = str(next(self._ids)).encode()
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise RpcTimeoutError(f"no connection to the node at {self.address} within {timeout} s")
                if self._poll(remaining, zmq.POLLOUT):
                    try:
                        self._socket.send_multipart([request_id, body], zmq.NOBLOCK)
                        break
                    except zmq.Again:
                        continue
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._poll(remaining, zmq.POLLIN):
                    raise RpcTimeoutError(f"no answer from the node at {self.address} within {timeout} s")
                frames = self._socket.recv_multipart()
                if len(frames) == 2 and frames[0] == request_id:
                    if len(frames[1]) > max_bytes:
                        raise RpcError(f"the answer of {self.address} is {len(frames[1])} bytes, over {max_bytes}")
                    return _answer(frames[1], self.address)
                # an answer to an earlier request that timed out: dropped

    def _poll(self, seconds: float, event: int) -> bool:
        """Wait up to ``seconds`` for ``event``, in short polls: a node that stops does not wait for an answer."""
        deadline = time.monotonic() + seconds
        while True:
            if self._closing.is_set():
                raise RpcError("the node is stopped")
            remaining = deadline - time.monotonic()
            if self._socket.poll(int(min(remaining, _POLL_SLICE) * 1000) + 1, event):
                return True
            if remaining <= _POLL_SLICE:
                return False

    def interrupt(self) -> None:
        """End the request in progress (from another thread): the node is stopping."""
        self._closing.set()

    def close(self) -> None:
        self._closing.set()
        with self._lock:
            self._socket.close(0)


def _answer(body: bytes, address: str | None = None) -> Any:
    try:
        reply = wire.parse(body)
    except wire.FeedDecodeError:
        reply = None
    if not isinstance(reply, dict) or reply.get("v") != wire.WIRE_VERSION:
        where = f"the node at {address}" if address else "the node"
        raise FeedConfigurationError(
            f"{where} is not a reactive feed of wire version {wire.WIRE_VERSION}: it answered {body[:80]!r}"
        )
    if reply.get("ok") is True:
        return wire.from_wire(reply.get("result"))
    raise RpcError(str(reply.get("message") or "the RPC failed"))


def _reply(result: Any) -> bytes:
    if isinstance(result, wire.RawJSON):
        text = str.__str__(result)
    else:
        text = json.dumps(wire.to_wire(result), separators=(",", ":"), allow_nan=False)
    return f'{{"v":{wire.WIRE_VERSION},"ok":true,"result":{text}}}'.encode()


def _error(message: str) -> bytes:
    return json.dumps({"v": wire.WIRE_VERSION, "ok": False, "message": message}).encode()


class Node:
    """A node services attach to: one process, or many on many machines over ZMQ.

    ``address`` is where its RPC socket binds (``tcp://127.0.0.1:0`` by default: loopback,
    any free port; :attr:`address` gives the bound one); None for a node that only
    subscribes. ``peers`` are addresses of other nodes whose services this one may use.
    ``heartbeat_interval``: how often each published table's last sequence number is sent
    (a subscriber learns from it that it missed a delta); ``quiet_after``: a subscription
    heard from for this long resubscribes; ``rpc_timeout``: the default wait for an RPC;
    ``max_message_bytes``: larger messages are dropped (and logged); ``receive_filter``: a
    hook on incoming data (see :data:`ReceiveFilter`); ``hwm``: messages queued per peer
    before ZMQ drops (a dropped delta is a gap, repaired by resubscription); ``peer_timeout``:
    a connection to this node's RPC socket that answers none of its ZMTP heartbeats (sent every
    third of it) for this long is closed, as if its process had died (its host went away).

    A publisher lists each remote subscriber (:meth:`DataService.subscriber_list`) for as long as
    the connection its requests came on is open: one killed, or whose host went away, leaves the
    list when that connection closes, whatever version of the feed it runs.
    """

    def __init__(
        self,
        address: str | None = "tcp://127.0.0.1:0",
        *,
        peers: Sequence[str] = (),
        node_id: str | None = None,
        data_address: str | None = None,
        heartbeat_interval: float = 0.5,
        quiet_after: float | None = None,
        rpc_timeout: float = 5.0,
        max_message_bytes: int = 64 * 1024 * 1024,
        receive_filter: ReceiveFilter | None = None,
        hwm: int = 100_000,
        check_interval: float = 0.05,
        peer_timeout: float = 30.0,
    ) -> None:
        if address is not None:
            check_address(address)
        if data_address is not None:
            check_address(data_address)
        for peer in peers:
            check_address(peer)
        heartbeat_interval = checks.seconds("heartbeat_interval", heartbeat_interval)
        rpc_timeout = checks.seconds("rpc_timeout", rpc_timeout)
        check_interval = checks.seconds("check_interval", check_interval)
        peer_timeout = checks.seconds("peer_timeout", peer_timeout)
        if quiet_after is not None:
            quiet_after = checks.seconds("quiet_after", quiet_after, infinite=True)
        max_message_bytes = checks.whole("max_message_bytes", max_message_bytes, least=1024)
        hwm = checks.whole("hwm", hwm, least=0)  # ZMQ: 0 is no limit
        self.node_id = node_id or f"node-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.heartbeat_interval = float(heartbeat_interval)
        self.quiet_after = float(quiet_after) if quiet_after is not None else 4 * self.heartbeat_interval + 1.0
        self.rpc_timeout = float(rpc_timeout)
        self.max_message_bytes = max_message_bytes
        self.check_interval = check_interval
        self.peer_timeout = float(peer_timeout)
        self.stats = NodeStats()
        self._bind = address
        self._bind_data = data_address or (None if address is None else _data_endpoint(address))
        self._peer_addresses = list(peers)
        self._receive_filter = receive_filter
        self._hwm = hwm
        self._context: zmq.Context | None = None
        self._pub: zmq.Socket | None = None
        self._pub_lock = threading.Lock()
        self._peers: dict[str, _Peer] = {}
        self._peers_lock = threading.Lock()
        self._services: dict[str, DataService] = {}
        self._lock = threading.RLock()
        #: topic -> local services subscribed, and whether anything was heard on it yet.
        self._topics: dict[bytes, set[str]] = {}
        self._heard: dict[bytes, threading.Event] = {}
        self._server: _Server | None = None
        self._receiver: _Receiver | None = None
        self._fetcher: _Fetcher | None = None
        self.address: str | None = None
        self.data_address: str | None = None
        self._started = False

    def __repr__(self) -> str:
        return f"Node({self.node_id!r}, address={self.address!r})"

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        """Bind the sockets and start the threads. Calling it twice does nothing; a start that
        fails leaves no thread or socket behind."""
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        with self._lock:
            if self._started:
                return
            context = zmq.Context()
            try:
                server = None
                if self._bind is not None:
                    router = self._bound(context, zmq.ROUTER, self._bind, _heartbeats(self.peer_timeout))
                    self.address = router.getsockopt_string(zmq.LAST_ENDPOINT)
                    assert self._bind_data is not None
                    self._pub = self._bound(context, zmq.PUB, self._bind_data)
                    self._pub.setsockopt(zmq.SNDHWM, self._hwm)
                    self.data_address = self._pub.getsockopt_string(zmq.LAST_ENDPOINT)
                    server = _Server(self, router)
                sub = context.socket(zmq.SUB)
                sub.setsockopt(zmq.LINGER, 0)
                sub.setsockopt(zmq.RCVHWM, self._hwm)
            except BaseException:
                context.destroy(0)
                self._pub = None
                raise
            self._context = context
            self._server = server
            self._receiver = _Receiver(self, sub)
            self._fetcher = _Fetcher(self)
            self._started = True
            if server is not None:
                server.start()
            self._receiver.start()
            self._fetcher.start()
            for peer in self._peer_addresses:
                self._peer(peer)

    @staticmethod
    def _bound(context: zmq.Context, kind: int, address: str, options: Mapping[int, int] | None = None) -> zmq.Socket:
        socket = context.socket(kind)
        socket.setsockopt(zmq.LINGER, 0)
        for option, value in (options or {}).items():  # before the bind: each connection takes them
            socket.setsockopt(option, value)
        try:
            socket.bind(address)
        except zmq.ZMQError as exc:
            socket.close(0)
            why = zmq.strerror(exc.errno)
            raise ConfigurationError(f"the feed cannot listen at {redact(address)}: {why}") from None
        return socket

    def stop(self) -> None:
        """Stop the threads, close every socket; the node can be started again."""
        with self._lock:
            if not self._started:
                return
            self._started = False
            threads = [t for t in (self._server, self._receiver, self._fetcher) if t is not None]
        with self._peers_lock:
            for peer in self._peers.values():
                peer.interrupt()  # a thread waiting for an answer stops now
        for thread in threads:
            thread.stop()
        # Stopped from one of its own threads (a subscriber's on_change, on the receiver): that
        # one ends when its callback returns; its socket goes with the context (destroy, below).
        current = threading.current_thread()
        for thread in threads:
            if thread is current:
                continue
            thread.join(10)
            if thread.is_alive():
                log.error("thread %s did not stop", thread.name)
        with self._peers_lock:
            for peer in self._peers.values():
                peer.close()
            self._peers.clear()
        with self._pub_lock:
            if self._pub is not None:
                self._pub.close(0)
                self._pub = None
        if self._context is not None:
            if any(thread.is_alive() for thread in threads):
                self._context.destroy(0)  # a thread that did not stop (or this one) would make term() hang
            else:
                self._context.term()
            self._context = None
        with self._lock:
            self._server = self._receiver = self._fetcher = None
            self._topics.clear()
            self._heard.clear()

    def wait(self, timeout: float | None = None) -> None:
        """Wait for the node's threads to end (after :meth:`stop`)."""
        for thread in (self._server, self._receiver, self._fetcher):
            if thread is not None:
                thread.join(timeout)

    def __enter__(self) -> Node:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._started

    # -- services -----------------------------------------------------------------------------
    def register_service(self, service: DataService) -> None:
        """Attach ``service``: its tables and RPC endpoints are reachable from now on."""
        self.start()
        with self._lock:
            other = self._services.get(service.service_id)
            if other is not None and other is not service:
                raise ConfigurationError(f"node {self.node_id} already has a service {service.service_id!r}")
            self._services[service.service_id] = service

    def unregister_service(self, service: DataService) -> None:
        with self._lock:
            if self._services.get(service.service_id) is service:
                del self._services[service.service_id]
        for publisher, table in service.subscription_list():
            self.unsubscribe(service, publisher, table)

    def services(self) -> dict[str, DataService]:
        with self._lock:
            return dict(self._services)

    def info(self) -> dict[str, Any]:
        """This node, its services and what its receiving side dropped."""
        return {
            "node_id": self.node_id,
            "address": self.address,
            "data_address": self.data_address,
            "services": {sid: s.info.to_dict() for sid, s in self.services().items()},
            "peers": sorted(self._peers),
            "received": dc.asdict(self.stats),
        }

    # -- publishing (any thread) ------------------------------------------------------------------
    def send_delta(self, service: DataService, table: str, seqnum: int, changes: Delta) -> None:
        """Send one delta of ``service``'s ``table`` (called under the service's lock, so deltas
        leave in sequence order)."""
        parts = [
            f'["delete",{row.id_text},null]' if event == "delete" else f'["{event}",{row.id_text},{row.value_text}]'
            for event, _, row in changes
        ]
        body = (
            f'{{"v":{wire.WIRE_VERSION},"kind":"delta","publisher":{json.dumps(service.service_id)},'
            f'"table":{json.dumps(table)},"epoch":"{service.epoch}","seqnum":{seqnum},'
            f'"sent":{time.time():.6f},"changes":[{",".join(parts)}]}}'
        )
        self._send(topic(service.service_id, table), body.encode())

    def send_heartbeat(self, service: DataService, table: str, seqnum: int) -> None:
        body = (
            f'{{"v":{wire.WIRE_VERSION},"kind":"heartbeat","publisher":{json.dumps(service.service_id)},'
            f'"table":{json.dumps(table)},"epoch":"{service.epoch}","seqnum":{seqnum}}}'
        )
        self._send(topic(service.service_id, table), body.encode())

    def _send(self, name: bytes, body: bytes) -> None:
        with self._pub_lock:
            if self._pub is None:
                return
            # PUB drops past its high-water mark; subscribers see a gap and resubscribe.
            with contextlib.suppress(zmq.Again):
                # what send_multipart does, without its per-call checks
                self._pub.send(name, _MORE_NOBLOCK)
                self._pub.send(body, _NOBLOCK)

    # -- subscribing --------------------------------------------------------------------------
    def subscribe(self, service: DataService, publisher: str, table: str) -> None:
        """Deliver ``publisher``'s ``table`` to ``service``: connect, then fetch the snapshot."""
        name = topic(publisher, table)
        data_address = self._data_address_of(publisher)
        with self._lock:
            first = name not in self._topics
            self._topics.setdefault(name, set()).add(service.service_id)
            self._heard.setdefault(name, threading.Event())
            receiver = self._require(self._receiver)
        if first:
            receiver.command(("subscribe", data_address, name))
        self.fetch_snapshot(service, publisher, table)

    def unsubscribe(self, service: DataService, publisher: str, table: str) -> None:
        name = topic(publisher, table)
        with self._lock:
            subscribers = self._topics.get(name)
            if subscribers is None:
                return
            subscribers.discard(service.service_id)
            if subscribers:
                return
            del self._topics[name]
            self._heard.pop(name, None)
            receiver = self._receiver
        if receiver is not None:
            receiver.command(("unsubscribe", None, name))
        # The publisher's list of subscribers is informative only: best effort.
        with contextlib.suppress(RpcError):
            kwargs = {"service": publisher, "table": table, "subscriber": service.service_id}
            self.rpc(NODE_SERVICE, "unsubscribed", kwargs, timeout=1.0, node_of=publisher)

    def fetch_snapshot(self, service: DataService, publisher: str, table: str) -> None:
        """Fetch the snapshot on the fetcher thread; deliver it on the receiver thread."""
        self._require(self._fetcher).put((service, publisher, table))

    def _follow_data_address(self, publisher: str, heard: threading.Event | None) -> None:
        """Before a snapshot is fetched: ask the publisher's node where it publishes now, and
        connect there. A node that restarted at the same address binds its PUB on a new port."""
        with self._lock:
            if publisher in self._services:
                return
            receiver = self._receiver
        peer = self._peer_of(publisher)
        before = peer.data_address
        self.refresh_peer(peer)
        if receiver is None or peer.data_address is None or peer.data_address in receiver.connected:
            return
        if heard is not None:
            heard.clear()  # the probes must be heard on the new connection
        if before is not None and before != peer.data_address:
            # The old port is let go: another process may bind it later.
            receiver.command(("disconnect", before, None))
        receiver.command(("connect", peer.data_address, None))

    def address_of(self, service: str) -> str | None:
        """The address of the node running ``service``, as far as this node knows (it asks no one)."""
        with self._lock:
            if service in self._services:
                return self.address
        with self._peers_lock:
            return next((p.address for p in self._peers.values() if service in p.services), None)

    def published_tables_of(self, service: str) -> list[str] | None:
        """The tables ``service`` publishes, as far as this node knows (it asks no one)."""
        local = self.services().get(service)
        if local is not None:
            return local.published_tables()
        with self._peers_lock:
            info = next((p.services[service] for p in self._peers.values() if service in p.services), None)
        tables = info.get("published_tables") if isinstance(info, dict) else None
        return [str(t) for t in tables] if isinstance(tables, list) else None

    def _data_address_of(self, publisher: str) -> str:
        with self._lock:
            if publisher in self._services:
                if self.data_address is None:
                    raise ConfigurationError(f"node {self.node_id} has no address: it cannot publish")
                return self.data_address
        peer = self._peer_of(publisher)
        assert peer.data_address is not None
        return peer.data_address

    # -- RPC ---------------------------------------------------------------------------------------
    def rpc(
        self,
        service: str,
        action: str,
        kwargs: Mapping[str, Any] | None = None,
        timeout: float | None = None,
        *,
        caller: str | None = None,
        node_of: str | None = None,
    ) -> Any:
        """Call ``action`` of ``service`` on this node or a peer; see :meth:`DataService.rpc`."""
        if kwargs is not None and not isinstance(kwargs, Mapping):
            raise RpcError(f"kwargs must be a mapping, not {type(kwargs).__name__}")
        timeout = self.rpc_timeout if timeout is None else timeout
        request = {"v": wire.WIRE_VERSION, "service": service, "action": action, "kwargs": dict(kwargs or {})}
        if caller is not None:
            request["caller"] = caller
        body = wire.dumps(request).encode()
        where = node_of or service
        with self._lock:
            local = where in self._services or (where == NODE_SERVICE and self.address is not None)
        if local:
            return _answer(self.handle_request(body))
        peer = self._peer_of(where, timeout)
        try:
            return peer.request(body, timeout, self.max_message_bytes)
        except RpcTimeoutError as exc:
            raise RpcTimeoutError(f"{action!r} of service {where!r}: {exc}") from None

    def handle_request(self, body: bytes, connection: int | None = None) -> bytes:
        """Answer one RPC request (on the server thread, or in the caller for a local service);
        ``connection`` is the one it came on (None: this process), which a subscriber is listed for."""
        try:
            request = wire.loads(body)
            if not isinstance(request, dict) or request.get("v") != wire.WIRE_VERSION:
                return _error("not a reactive feed request")
            service_id, action = request.get("service"), request.get("action")
            kwargs = request.get("kwargs") or {}
            if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
                return _error("kwargs must be an object")
            if service_id == NODE_SERVICE:
                return _reply(self._node_action(action, kwargs))
            service = self.services().get(service_id)
            if service is None:
                names = ", ".join(sorted(self.services())) or "none"
                return _error(f"no service {service_id!r} on node {self.node_id} (services: {names})")
            method = _endpoint_method(service, action)
            if method is None:
                actions = sorted({a for e in service.rpc_endpoints() for a in endpoint_actions(e)})
                return _error(f"service {service_id!r} has no action {action!r} (actions: {', '.join(actions)})")
            caller = request.get("caller")
            if caller and action in ("get_snapshot", "get_last_published_data_with_seqnum"):
                service._add_subscriber(str(caller), str(kwargs.get("table")), connection)
            return _reply(method(None, **kwargs))
        except TypeError as exc:
            return _error(f"bad arguments: {exc}")
        except Exception as exc:
            log.debug("an RPC failed", exc_info=True)
            return _error(f"{type(exc).__name__}: {exc}")

    def _node_action(self, action: Any, kwargs: dict[str, Any]) -> Any:
        if action == "services":
            return {
                "node_id": self.node_id,
                "data_address": self.data_address,
                "services": {sid: s.info.to_dict() for sid, s in self.services().items()},
            }
        if action == "probe":
            service = self.services().get(kwargs.get("service"))
            table = kwargs.get("table")
            if service is not None and isinstance(table, str):
                self.send_heartbeat(service, table, service.last_seqnum(table))
            return None
        if action == "unsubscribed":
            service = self.services().get(kwargs.get("service"))
            if service is not None:
                service._remove_subscriber(str(kwargs.get("subscriber")), str(kwargs.get("table")))
            return None
        raise RpcError(f"the node has no action {action!r} (services, probe, unsubscribed)")

    def _peer(self, address: str) -> _Peer:
        with self._peers_lock:
            peer = self._peers.get(address)
            if peer is None:
                if self._context is None:
                    raise RpcError("the node is not started")
                peer = self._peers[address] = _Peer(self._context, address)
            return peer

    def _peer_of(self, service: str, timeout: float | None = None) -> _Peer:
        """The peer whose node runs ``service`` (asking each peer when not known yet, waiting
        ``timeout`` seconds for each: the node's ``rpc_timeout`` when None)."""
        with self._peers_lock:
            peers = list(self._peers.values())
        for peer in peers:
            if service in peer.services:
                return peer
        errors = []
        for peer in peers:
            try:
                self.refresh_peer(peer, timeout)
            except RpcError as exc:
                errors.append(str(exc))
                continue
            if service in peer.services:
                return peer
        where = ", ".join(p.address for p in peers) or "no peers"
        why = f" ({'; '.join(errors)})" if errors else ""
        if errors and len(errors) == len(peers):
            raise RpcTimeoutError(f"no node answered for service {service!r}: {where}{why}")
        raise RpcError(f"no service {service!r} on node {self.node_id} or its peers ({where}){why}")

    def refresh_peer(self, peer: _Peer | str, timeout: float | None = None) -> dict[str, Any]:
        """Ask a peer which services it runs (waiting ``timeout`` seconds, the node's
        ``rpc_timeout`` when None); returns their infos."""
        if isinstance(peer, str):
            peer = self._peer(check_address(peer))
        body = wire.dumps({"v": wire.WIRE_VERSION, "service": NODE_SERVICE, "action": "services", "kwargs": {}})
        timeout = self.rpc_timeout if timeout is None else timeout
        answer = peer.request(body.encode(), timeout, self.max_message_bytes)
        if not isinstance(answer, dict) or not isinstance(answer.get("services"), dict):
            raise FeedConfigurationError(f"the node at {peer.address} gave a malformed list of services")
        peer.services = answer["services"]
        peer.node_id = answer.get("node_id")
        if answer.get("data_address"):
            peer.data_address = _reachable(str(answer["data_address"]), peer.address)
        peer.refreshed = time.monotonic()
        return dict(peer.services)

    @staticmethod
    def _require(thread: Any) -> Any:
        if thread is None:
            raise ConfigurationError("the node is not started")
        return thread

    # -- what the receiver thread does ----------------------------------------------------------
    def _on_message(self, frames: list[bytes]) -> None:
        self.stats.received += 1
        size = sum(len(f) for f in frames)
        if size > self.max_message_bytes:
            self._dropped("oversized", f"a message of {size} bytes (max_message_bytes={self.max_message_bytes})")
            return
        if len(frames) != 2:
            self._dropped("malformed", f"a message of {len(frames)} frames")
            return
        name, body = frames
        with self._lock:  # the services subscribed, looked up once per message
            services = [self._services.get(sid) for sid in self._topics.get(name, ())]
            heard = self._heard.get(name)
        if not services:
            return
        try:
            message = _parse_data(body)
        except wire.FeedDecodeError as exc:
            self._dropped("malformed", str(exc))
            return
        publisher, table, epoch, seqnum, changes = message
        if topic(publisher, table) != name:
            self._dropped("malformed", f"a message for {publisher}:{table} under another topic")
            return
        if heard is not None and not heard.is_set():  # set() takes a lock: not on every message
            heard.set()
        for service in services:
            if service is not None:
                service._heard(publisher, table, epoch, seqnum, changes)

    def _connection_closed(self, connection: int) -> None:
        """A connection to the RPC socket closed (its process died, or stopped its node): the
        subscribers whose requests came on it are listed no more."""
        for service in self.services().values():
            service._drop_subscribers(connection)

    def _dropped(self, why: str, what: str) -> None:
        setattr(self.stats, why, getattr(self.stats, why) + 1)
        self.stats.last_dropped = f"{why}: {what}"
        log.warning("the feed dropped %s", what)

    def _tick(self, now: float, last_heartbeat: float) -> float:
        """Heartbeats for every published table, and the periodic check_resub_all."""
        services = list(self.services().values())
        if self._pub is not None and now - last_heartbeat >= self.heartbeat_interval:
            for service in services:
                for table in service.published_tables():
                    self.send_heartbeat(service, table, service.last_seqnum(table))
            last_heartbeat = now
        for service in services:
            try:
                service.check_resub_all()
            except Exception:
                log.exception("check_resub_all of %s failed", service.service_id)
        return last_heartbeat


def _endpoint_method(service: DataService, action: Any) -> Callable[..., Any] | None:
    if not isinstance(action, str) or action.startswith("_"):
        return None
    for endpoint in service.rpc_endpoints():
        method = getattr(endpoint, action, None)
        if callable(method):
            return method
    return None


def _parse_data(body: bytes) -> tuple[str, str, str, int, list[Change] | None]:
    """``(publisher, table, epoch, seqnum, changes)`` of a data message (changes None: a heartbeat)."""
    message = wire.parse(body)
    if not isinstance(message, dict) or message.get("v") != wire.WIRE_VERSION:
        raise wire.FeedDecodeError("not a reactive feed message (or another version)")
    kind, publisher, table = message.get("kind"), message.get("publisher"), message.get("table")
    epoch, seqnum = message.get("epoch"), message.get("seqnum")
    if not (isinstance(publisher, str) and isinstance(table, str) and isinstance(epoch, str)):
        raise wire.FeedDecodeError("a data message without publisher, table or epoch")
    if type(seqnum) is not int or seqnum < 0:
        raise wire.FeedDecodeError(f"bad sequence number {seqnum!r}")
    if kind == "heartbeat":
        return publisher, table, epoch, seqnum, None
    raw = message.get("changes")
    if kind != "delta" or not isinstance(raw, list):
        raise wire.FeedDecodeError(f"unknown message kind {kind!r}")
    changes = []
    for item in raw:
        if not (isinstance(item, list) and len(item) == 3 and item[0] in EVENTS):
            raise wire.FeedDecodeError(f"bad change {str(item)[:80]!r}")
        event, row_id, value = item
        changes.append(Change(event, _key(wire.from_wire(row_id)), wire.from_wire(value), seqnum, table, publisher))
    return publisher, table, epoch, seqnum, changes


def _key(value: Any) -> Any:
    """A received row id in a form that can key a snapshot: lists become tuples, sets frozensets,
    documents :class:`DocumentId` (still dicts).

    >>> _key([1, {2}, {"a": [3]}])
    (1, frozenset({2}), {'a': [3]})
    """
    if isinstance(value, list):
        return tuple(_key(v) for v in value)
    if isinstance(value, set):
        return frozenset(value)
    if isinstance(value, dict):
        return DocumentId(value)
    return value


class _Receiver(ReactiveThread):
    """Reads deltas and heartbeats, runs commands from other threads, ticks the timers."""

    def __init__(self, node: Node, socket: zmq.Socket) -> None:
        super().__init__("feed-receiver")
        self.node = node
        self.socket = socket
        self.commands: queue.SimpleQueue[tuple[str, Any, Any]] = queue.SimpleQueue()
        self.connected: set[str] = set()

    def command(self, command: tuple[str, Any, Any]) -> None:
        self.commands.put(command)

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        interval_ms = int(self.node.check_interval * 1000)
        last_tick = last_heartbeat = 0.0
        try:
            while self.should_keep_running():
                self._run_commands()
                if not self.should_keep_running():
                    return  # a callback stopped the node: its socket is closed
                if poller.poll(interval_ms):
                    for _ in range(1000):  # then the timers get a turn
                        if not self.should_keep_running():
                            return
                        try:
                            frames = self.socket.recv_multipart(_NOBLOCK)
                        except zmq.Again:
                            break
                        self._receive(frames)
                now = time.monotonic()
                if now - last_tick >= self.node.check_interval:
                    last_heartbeat = self.node._tick(now, last_heartbeat)
                    last_tick = now
        finally:
            self.socket.close(0)

    def _receive(self, frames: list[bytes]) -> None:
        messages = [frames] if self.node._receive_filter is None else self.node._receive_filter(frames)
        if not messages:
            self.node.stats.filtered += 1
        for message in messages:
            try:
                self.node._on_message(message)
            except Exception:
                log.exception("a feed message could not be handled")

    def _run_commands(self) -> None:
        while self.should_keep_running():
            try:
                kind, address, arg = self.commands.get_nowait()
            except queue.Empty:
                return
            try:
                if kind == "subscribe":
                    if address not in self.connected:
                        self.socket.connect(address)
                        self.connected.add(address)
                    self.socket.setsockopt(zmq.SUBSCRIBE, arg)
                elif kind == "connect":
                    if address not in self.connected:
                        self.socket.connect(address)
                        self.connected.add(address)
                elif kind == "disconnect":
                    if address in self.connected:
                        self.socket.disconnect(address)
                        self.connected.discard(address)
                elif kind == "unsubscribe":
                    self.socket.setsockopt(zmq.UNSUBSCRIBE, arg)
                elif kind == "call":
                    arg()
            except Exception:
                log.exception("feed receiver command %s failed", kind)


class _Fetcher(ReactiveThread):
    """Fetches snapshots (after making sure the subscription hears the publisher)."""

    def __init__(self, node: Node) -> None:
        super().__init__("feed-fetcher")
        self.node = node
        self.jobs: queue.SimpleQueue[tuple[DataService, str, str] | None] = queue.SimpleQueue()

    def put(self, job: tuple[DataService, str, str]) -> None:
        self.jobs.put(job)

    def on_stop(self) -> None:
        self.jobs.put(None)

    def run(self) -> None:
        while self.should_keep_running():
            job = self.jobs.get()
            if job is None or not self.should_keep_running():
                return
            service, publisher, table = job
            try:
                self._fetch(service, publisher, table)
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
                self._post(lambda s=service, p=publisher, t=table, e=error: s._snapshot_failed(p, t, e))

    def _fetch(self, service: DataService, publisher: str, table: str) -> None:
        node = self.node
        heard = node._heard.get(topic(publisher, table))
        node._follow_data_address(publisher, heard)
        deadline = time.monotonic() + node.rpc_timeout
        # Until the SUB socket hears this topic, a delta published now could be missed (ZMQ
        # drops what is sent before a subscription arrives): ask for a heartbeat and wait.
        while heard is not None and not heard.is_set() and time.monotonic() < deadline and self.should_keep_running():
            node.rpc(NODE_SERVICE, "probe", {"service": publisher, "table": table}, node_of=publisher)
            heard.wait(0.05)
        answer = node.rpc(publisher, "get_last_published_data_with_seqnum", {"table": table}, caller=service.service_id)
        if not isinstance(answer, dict) or not isinstance(answer.get("data"), list):
            raise RpcError(f"{publisher} gave a malformed snapshot of {table}")
        epoch, seqnum = answer.get("epoch"), answer.get("seqnum")
        published = answer.get("published") is not False  # a publisher before this key: published
        data = {_key(row_id): value for row_id, value in answer["data"]}
        # Of a table not published: what is (a publisher before this key: as its node listed),
        # and whether it will be (before this key: it cannot say).
        tables = answer.get("tables") if not published else None
        if not published and not isinstance(tables, list):
            tables = node.published_tables_of(publisher)
        will = answer.get("will_publish")
        will_publish = will if isinstance(will, bool) else None
        self._post(
            lambda: service._snapshot_arrived(publisher, table, epoch, seqnum, data, published, tables, will_publish)
        )

    def _post(self, call: Callable[[], None]) -> None:
        receiver = self.node._receiver
        if receiver is not None:
            receiver.command(("call", None, call))


class _Server(ReactiveThread):
    """Answers RPCs on the node's ROUTER socket, and tells the node which connections closed."""

    def __init__(self, node: Node, socket: zmq.Socket) -> None:
        super().__init__("feed-server")
        self.node = node
        self.socket = socket

    def run(self) -> None:
        interval_ms = int(self.node.check_interval * 1000)
        monitor = None
        try:
            monitor = self.socket.get_monitor_socket(zmq.EVENT_DISCONNECTED)
            poller = zmq.Poller()
            poller.register(self.socket, zmq.POLLIN)
            poller.register(monitor, zmq.POLLIN)
            while self.should_keep_running():
                ready = dict(poller.poll(interval_ms))
                # Closed connections first: a new connection may be given a closed one's descriptor.
                self._closed_connections(monitor)
                if self.socket in ready:
                    self._answer(self.socket.recv_multipart(copy=False))
        finally:
            if monitor is not None:
                self.socket.disable_monitor()
                monitor.close(0)
            self.socket.close(0)

    def _answer(self, frames: list[zmq.Frame]) -> None:
        if len(frames) != 3:
            self.node._dropped("malformed", f"an RPC request of {len(frames) - 1} frames")
            return
        peer, request_id, body = (frame.bytes for frame in frames)
        if len(body) > self.node.max_message_bytes:
            answer = _error(f"request of {len(body)} bytes is over max_message_bytes")
        else:
            answer = self.node.handle_request(body, _connection_of(frames[2]))
        try:
            self.socket.send_multipart([peer, request_id, answer], zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            log.debug("could not answer an RPC: %s", exc)

    def _closed_connections(self, monitor: zmq.Socket) -> None:
        while True:
            try:
                event = parse_monitor_message(monitor.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return
            if event["event"] == zmq.EVENT_DISCONNECTED:
                self.node._connection_closed(int(event["value"]))


def _heartbeats(peer_timeout: float) -> dict[int, int]:
    """The ZMTP heartbeat options of the RPC socket: a ping every third of ``peer_timeout``, and a
    connection closed when nothing answers for ``peer_timeout`` (the other end's host went away,
    which closes no connection by itself).

    >>> _heartbeats(30.0) == {zmq.HEARTBEAT_IVL: 10_000, zmq.HEARTBEAT_TIMEOUT: 30_000}
    True
    """
    timeout_ms = min(max(3, round(peer_timeout * 1000)), 2**31 - 1)  # ZMQ's options are C ints
    return {zmq.HEARTBEAT_IVL: timeout_ms // 3, zmq.HEARTBEAT_TIMEOUT: timeout_ms}


def _connection_of(frame: zmq.Frame) -> int | None:
    """The connection a request came on (its socket's descriptor, as the monitor names it when
    it closes); None where ZMQ cannot say (its option ``ZMQ_SRCFD`` is deprecated, and may go):
    a subscriber is then listed until it unsubscribes, as before."""
    try:
        connection = frame.get(zmq.SRCFD)
    except zmq.ZMQError:
        return None
    return connection if isinstance(connection, int) and connection >= 0 else None

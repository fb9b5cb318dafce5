"""``DataService``: publish tables, subscribe to other services' tables (the seed's API).

A service publishes a table as a mapping ``row id -> value``. Each :meth:`DataService.publish`
that changes something is one delta with the next sequence number of that table; a new
subscriber gets the table's snapshot (tagged with the sequence number it includes) and then
every delta after it, in order. A subscriber that sees a gap holds the later deltas back for
``gap_timeout`` seconds, then resubscribes: it fetches the snapshot over RPC and goes on from
its sequence number. Each start of a publisher is an *epoch*: a subscriber that hears a new
epoch resubscribes rather than mixing two numberings.
"""

from __future__ import annotations

import dataclasses as dc
import difflib
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from reactive import checks
from reactive.backends.base import same_but_case
from reactive.errors import ConfigurationError
from reactive.events import id_key
from reactive.feed import wire

if TYPE_CHECKING:
    from reactive.checkpoints import SectionStore
    from reactive.feed.node import Node

log = logging.getLogger(__name__)

EVENTS = ("insert", "update", "delete")
#: Sequence numbers reserved in the checkpoint store at a time: a restart (even after a
#: SIGKILL) numbers on from the end of the block, so numbers only grow.
SEQNUM_BLOCK = 10_000
#: Longest wait between two tries of the feed's retries (snapshot fetches, follows, reads).
MAX_RETRY_BACKOFF = 5.0
#: How long a subscription waits for a table its publisher does not publish, and cannot say it
#: will, before it fails (a misspelt name, most likely): a table published later (a listener
#: added meanwhile) must come within it.
UNPUBLISHED_TIMEOUT = 60.0
MAX_NAME_LENGTH = 256


def retry_backoff(failures: int) -> float:
    """Seconds to wait before trying again after ``failures`` failures in a row: 0.1 s doubled
    with each, up to :data:`MAX_RETRY_BACKOFF` (a publisher that is down is not asked every
    50 ms, nor left unasked for long once it is back). Every retry of the feed waits this long.

    >>> [retry_backoff(n) for n in (0, 1, 2, 5, 6)]
    [0.1, 0.2, 0.4, 3.2, 5.0]

    Any count is a number of seconds (``0.1 * 2**1024`` overflows a float: a publisher down
    for an hour and a half made a subscription retry at every check, and a follow's thread die):

    >>> retry_backoff(10_000)
    5.0
    """
    return min(0.1 * 2.0 ** min(max(failures, 0), 64), MAX_RETRY_BACKOFF)


def check_name(what: str, name: Any) -> str:
    """A service id or table name, or a :class:`~reactive.errors.ConfigurationError`.

    >>> check_name("table", "embed__text")
    'embed__text'
    >>> check_name("table", "a\\x00b")
    Traceback (most recent call last):
    ...
    reactive.errors.ConfigurationError: a feed table name must be a non-empty str ... or lone surrogates, not 'a\\x00b'
    """
    if not isinstance(name, str) or not name or len(name) > MAX_NAME_LENGTH or "\x00" in name or not _utf8(name):
        raise ConfigurationError(
            f"a feed {what} name must be a non-empty str of at most {MAX_NAME_LENGTH} characters without NUL "
            f"or lone surrogates, not {name!r}"
        )
    return name


def _utf8(name: str) -> bool:
    """Whether ``name`` can be sent (topics and messages are UTF-8): no lone surrogate."""
    try:
        name.encode()
    except UnicodeEncodeError:
        return False
    return True


@dc.dataclass(frozen=True, slots=True)
class Change:
    """One change of a published table, as a subscriber receives it.

    ``event`` is ``"snapshot"`` (a row of the snapshot a subscription starts with),
    ``"insert"``, ``"update"`` or ``"delete"``; ``value`` is the row or output (None for a
    delete); ``seqnum`` the sequence number of the delta (or snapshot) it came in.
    """

    event: str
    id: Any
    value: Any
    seqnum: int
    table: str = ""
    publisher: str = ""


@dc.dataclass(slots=True)
class _Row:
    id: Any
    value: Any
    id_text: str
    value_text: str


@dc.dataclass(slots=True)
class _Published:
    """A table this service publishes: its rows and its last sequence number."""

    seqnum: int
    reserved: int
    rows: dict[Hashable, _Row] = dc.field(default_factory=dict)


@dc.dataclass(slots=True)
class _Subscription:
    """What a subscriber knows of one table it follows."""

    publisher: str
    table: str
    epoch: str | None = None
    #: The last sequence number applied; None until the first snapshot arrives.
    seqnum: int | None = None
    #: The last sequence number whose delivery (receive_data) finished.
    delivered: int | None = None
    #: Deltas that came early (after a gap), by sequence number: (epoch, changes, receipt time).
    pending: dict[int, tuple[str, list[Change], float]] = dc.field(default_factory=dict)
    gap_since: float | None = None
    last_heard: float = dc.field(default_factory=time.monotonic)
    resubscribing: bool = False
    #: Failed snapshot fetches in a row, and when the next may start.
    failures: int = 0
    retry_at: float = 0.0
    resubscriptions: int = 0
    duplicates: int = 0
    deltas: int = 0
    last_error: str | None = None
    #: Whether the publisher's last answer said it does not publish the table: a delta or a
    #: heartbeat of it then means it does now, and the snapshot is fetched at once.
    unpublished: bool = False
    #: Whether a snapshot or a delta of the table ever arrived: a table never published since
    #: (a misspelt name) is waited for at most the service's ``unpublished_timeout``.
    seen_published: bool = False
    #: Since when the publisher has said it does not publish the table and cannot say it will.
    unpublished_since: float | None = None
    #: The tables the publisher said it publishes, in its last answer that it does not publish this one.
    publisher_tables: list[str] | None = None
    #: Why the subscription ended for good: nothing is fetched or delivered any more.
    failure: Exception | None = None


class DataServiceEndPoints:
    """The RPC endpoints every service exposes (the seed's, minus its oslo context)."""

    def __init__(self, service: DataService) -> None:
        self.service = service

    def get_snapshot(self, context: Any, table: str) -> Any:
        """The table's current data: ``[[id, value], ...]``."""
        return wire.RawJSON(self.service._snapshot_text(table)[2] or "[]")

    def get_last_published_data_with_seqnum(self, context: Any, table: str) -> Any:
        """``{"epoch", "seqnum", "published", "data": [[id, value], ...]}``, consistent with each
        other; ``published`` is false (and ``data`` empty) for a table this service does not
        publish (yet: a publisher that restarted publishes its tables again once it read them),
        and the answer then says which tables it publishes (``"tables"``) and whether it will
        publish this one (``"will_publish"``: see :meth:`DataService.will_publish`)."""
        epoch, seqnum, text = self.service._snapshot_text(table)
        if text is not None:
            return wire.RawJSON(f'{{"epoch":{json.dumps(epoch)},"seqnum":{seqnum},"published":true,"data":{text}}}')
        tables = json.dumps(self.service.published_tables())
        will = json.dumps(self.service.will_publish(table))
        return wire.RawJSON(
            f'{{"epoch":{json.dumps(epoch)},"seqnum":{seqnum},"published":false,"data":[],'
            f'"tables":{tables},"will_publish":{will}}}'
        )

    def get_seqnum(self, context: Any, table: str) -> Any:
        """``{"epoch", "seqnum"}``: the table's last sequence number (a subscriber waits for it)."""
        return {"epoch": self.service.epoch, "seqnum": self.service.last_seqnum(table)}

    def ping(self, context: Any, **kwargs: Any) -> Any:
        """Echo the arguments."""
        return kwargs


@dc.dataclass
class DataServiceInfo:
    """What a node says of one of its services."""

    MARSHALL_ATTRS: ClassVar[frozenset[str]] = frozenset(
        {"service_id", "node_id", "published_tables", "subscribed_tables", "rpc_endpoints_info"}
    )

    service_id: str | None = None
    node_id: str | None = None
    published_tables: list[str] = dc.field(default_factory=list)
    subscribed_tables: list[list[str]] = dc.field(default_factory=list)
    rpc_endpoints_info: list[dict[str, Any]] = dc.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """>>> DataServiceInfo("s", "n").to_dict()["service_id"]
        's'
        """
        return {name: getattr(self, name) for name in sorted(self.MARSHALL_ATTRS)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, raw_dict: Mapping[str, Any]) -> DataServiceInfo:
        """>>> DataServiceInfo.from_json(DataServiceInfo("s", published_tables=["t"]).to_json()).published_tables
        ['t']
        """
        if not isinstance(raw_dict, Mapping):
            raise ConfigurationError(f"a DataServiceInfo is a mapping, not {type(raw_dict).__name__}")
        unknown = set(raw_dict) - cls.MARSHALL_ATTRS
        if unknown:
            raise ConfigurationError(f"unknown DataServiceInfo fields: {', '.join(sorted(unknown))}")
        return cls(**{k: raw_dict[k] for k in raw_dict})

    @classmethod
    def from_json(cls, json_string: str) -> DataServiceInfo:
        try:
            return cls.from_dict(json.loads(json_string))
        except ValueError as exc:
            raise ConfigurationError(f"not a DataServiceInfo: {exc}") from None


class DataService:
    """A unit of data on a node: it may publish tables, subscribe to tables and expose RPCs.

    ``node`` is the :class:`~reactive.feed.Node` it attaches to at :meth:`start` (None: a
    private node on 127.0.0.1, any port, started and stopped with the service).
    ``checkpoints`` (a :class:`~reactive.checkpoints.SectionStore`, e.g.
    ``db.backend.sections``) keeps each published table's sequence numbers across restarts.
    ``will_publish(table)`` says, for a table this service does not publish, whether it will
    (see :meth:`will_publish`). ``unpublished_timeout``: how long a subscription of this service
    waits for a table its publisher does not publish and cannot say it will (``math.inf``: for
    ever) before it fails with a :class:`~reactive.feed.TableNotPublishedError`.

    Subclasses override :meth:`receive_data` (and :meth:`get_snapshot` to publish from their
    own store). A two-service example on one node:

    >>> from reactive.feed import DataService, Node
    >>> class Printer(DataService):
    ...     def receive_data(self, publisher, table, data, is_snapshot=True):
    ...         print("snapshot" if is_snapshot else "delta", data)
    >>> node = Node(); node.start()
    >>> source, printer = DataService("source", node), Printer("printer", node)
    >>> source.start(); printer.start()
    >>> source.publish("t", {1: "one"})
    1
    >>> printer.subscribe("source", "t"); printer.wait_synced(5)
    snapshot {1: 'one'}
    True
    >>> seqnum = source.publish("t", {1: "one", 2: "two"}); printer.wait_delivered(seqnum, 5)
    delta [Change(event='insert', id=2, value='two', seqnum=2, table='t', publisher='source')]
    True
    >>> node.stop()
    """

    def __init__(
        self,
        service_id: str,
        node: Node | None = None,
        *,
        checkpoints: SectionStore | None = None,
        gap_timeout: float = 0.5,
        max_delta_rows: int = 10_000,
        unpublished_timeout: float = UNPUBLISHED_TIMEOUT,
        will_publish: Callable[[str], bool | None] | None = None,
    ) -> None:
        from reactive.feed.node import Node

        self.service_id = check_name("service", service_id)
        if node is not None and not isinstance(node, Node):
            raise ConfigurationError(
                f"node must be a reactive.feed.Node (or None: a private one), not {type(node).__name__}; "
                "for an address, use Node(address)"
            )
        gap_timeout = checks.seconds("gap_timeout", gap_timeout)
        max_delta_rows = checks.whole("max_delta_rows", max_delta_rows, least=0)
        unpublished_timeout = checks.seconds("unpublished_timeout", unpublished_timeout, infinite=True)
        if will_publish is not None and not callable(will_publish):
            raise ConfigurationError(f"will_publish must be callable, not {type(will_publish).__name__}")
        #: A publication changing more rows than this goes to subscribers as a snapshot.
        self.max_delta_rows = max_delta_rows
        self._node = node
        self._own_node = node is None
        self._checkpoints = checkpoints
        self.gap_timeout = gap_timeout
        self.unpublished_timeout = unpublished_timeout
        self._will_publish = will_publish
        #: This start of the service: subscribers resubscribe when it changes.
        self.epoch = uuid.uuid4().hex
        self._lock = threading.RLock()
        self._published: dict[str, _Published] = {}
        self._subscriptions: dict[tuple[str, str], _Subscription] = {}
        #: table -> subscriber -> the connection its requests came on (None: this process's).
        self._subscribers: dict[str, dict[str, int | None]] = {}
        self._endpoints: list[Any] = [DataServiceEndPoints(self)]
        self._changed = threading.Condition(self._lock)
        self._running = False
        self.errors = 0

    # -- the seed's lifecycle ------------------------------------------------------------
    @property
    def node(self) -> Node | None:
        return self._node

    def start(self) -> None:
        """Attach to the node (starting a private one when none was given)."""
        if self._running:
            return
        if self._node is None:
            from reactive.feed.node import Node

            self._node = Node()
        if self._own_node:
            self._node.start()
        self._node.register_service(self)
        self._running = True

    def stop(self) -> None:
        """Leave the node: subscriptions end, RPCs and publications stop."""
        if not self._running:
            return
        self._running = False
        node = self._node
        if node is not None:
            node.unregister_service(self)
            if self._own_node:
                node.stop()
        with self._changed:
            self._subscriptions.clear()  # they ended: a start() and subscribe() begin anew
            self._changed.notify_all()  # and what waited for them waits no more
        self._save_all()

    def wait(self) -> None:
        """Wait for the private node's threads to end after :meth:`stop`."""
        if self._own_node and self._node is not None:
            self._node.wait()

    @property
    def status(self) -> dict[str, Any]:
        """Counters: per subscription (seqnum, gaps, resubscriptions) and per published table."""
        with self._lock:
            return {
                "running": self._running,
                "epoch": self.epoch,
                "published": {t: {"seqnum": p.seqnum, "rows": len(p.rows)} for t, p in self._published.items()},
                "subscriptions": {
                    f"{s.publisher}:{s.table}": {
                        "seqnum": s.seqnum,
                        "epoch": s.epoch,
                        "pending": len(s.pending),
                        "deltas": s.deltas,
                        "duplicates": s.duplicates,
                        "resubscriptions": s.resubscriptions,
                        "last_error": s.last_error,
                    }
                    for s in self._subscriptions.values()
                },
                "errors": self.errors,
            }

    @property
    def info(self) -> DataServiceInfo:
        with self._lock:
            return DataServiceInfo(
                service_id=self.service_id,
                node_id=None if self._node is None else self._node.node_id,
                published_tables=sorted(self._published),
                subscribed_tables=[[s.publisher, s.table] for s in self._subscriptions.values()],
                rpc_endpoints_info=[
                    {"name": type(e).__name__, "actions": endpoint_actions(e)} for e in self._endpoints
                ],
            )

    # -- RPC -------------------------------------------------------------------------------
    def rpc_endpoints(self) -> list[Any]:
        """The objects whose public methods other services may call with :meth:`rpc`."""
        return list(self._endpoints)

    def add_rpc_endpoint(self, endpt: Any) -> None:
        self._endpoints.append(endpt)

    def rpc(self, service: str, action: str, kwargs: Mapping[str, Any] | None = None, timeout: float | None = None):
        """Call ``action`` of ``service`` (on this node or another one) and return its result.

        Raises :class:`~reactive.feed.RpcError` for an unknown service or action and for an
        action that raised, :class:`~reactive.feed.RpcTimeoutError` when no answer comes
        within ``timeout`` seconds (the node's ``rpc_timeout`` when None).
        """
        return self._require_node().rpc(service, action, kwargs, timeout)

    # -- publishing --------------------------------------------------------------------------
    def publish(self, table: str, data: Any, use_snapshot: bool = True) -> int:
        """Publish ``table``'s new state; returns its sequence number.

        With ``use_snapshot`` (the default), ``data`` is the whole table, a mapping ``row id ->
        value``: the delta against what was published last goes out. Otherwise ``data`` is the
        delta itself, an iterable of ``(event, id, value)`` (or :class:`Change`) where event is
        ``"insert"``, ``"update"``, ``"upsert"`` or ``"delete"``. Either way a subscriber gets
        ``"insert"`` for a new id, ``"update"`` for a changed value, ``"delete"`` for a removed
        one, and nothing when nothing changed (the sequence number then stays).
        """
        check_name("table", table)
        with self._lock:
            current = self._published.get(table)
            rows = {} if current is None else current.rows
            if use_snapshot:
                if not isinstance(data, Mapping):
                    raise ConfigurationError(
                        f"publish({table!r}, data): with use_snapshot=True data is a mapping of row id to value, "
                        f"not {type(data).__name__}"
                    )
                changes = _snapshot_delta(rows, data)
            else:
                if isinstance(data, str | bytes | Mapping) or not isinstance(data, Iterable):
                    raise ConfigurationError(
                        f"publish({table!r}, data, use_snapshot=False): data is an iterable of (event, id, value), "
                        f"not {type(data).__name__}"
                    )
                changes = _normalize(rows, data, table)
            state = self._table_state(table)  # only now: a refused publication leaves no table behind
            if not changes:
                return state.seqnum
            _apply(state.rows, changes)
            state.seqnum += 1
            self._reserve(table, state)
            # A delta too large for one message is not sent: subscribers see the sequence
            # number move on (the next heartbeat) and fetch the snapshot instead.
            if self._node is not None and self._running and len(changes) <= self.max_delta_rows:
                self._node.send_delta(self, table, state.seqnum, changes)
            self._changed.notify_all()
            return state.seqnum

    def _table_state(self, table: str) -> _Published:
        state = self._published.get(table)
        if state is None:
            start = self._load_seqnum(table)
            state = self._published[table] = _Published(seqnum=start, reserved=start)
        return state

    def _load_seqnum(self, table: str) -> int:
        if self._checkpoints is None:
            return 0
        from reactive.checkpoints import Positions

        saved = Positions(self._checkpoints, _checkpoint_name(self.service_id)).load_checkpoint(table)
        return int(saved["reserved"]) if saved else 0

    def _reserve(self, table: str, state: _Published) -> None:
        if self._checkpoints is None or state.seqnum <= state.reserved:
            return
        from reactive.checkpoints import Positions

        reserved = state.seqnum + SEQNUM_BLOCK
        Positions(self._checkpoints, _checkpoint_name(self.service_id)).save_checkpoint(
            table, {"reserved": reserved, "epoch": self.epoch}
        )
        state.reserved = reserved

    def _save_all(self) -> None:
        """At a clean stop the next start numbers on from the last number, not the block's end."""
        if self._checkpoints is None:
            return
        from reactive.checkpoints import Positions

        positions = Positions(self._checkpoints, _checkpoint_name(self.service_id))
        with self._lock:
            for table, state in self._published.items():
                try:
                    positions.save_checkpoint(table, {"reserved": state.seqnum, "epoch": self.epoch})
                except Exception as exc:
                    log.warning("could not save the sequence number of %s: %s", table, exc)

    def last_seqnum(self, table: str) -> int:
        """The sequence number of ``table``'s last delta (0, or the saved one, before any)."""
        with self._lock:
            state = self._published.get(table)
            return self._load_seqnum(table) if state is None else state.seqnum

    def published_tables(self) -> list[str]:
        with self._lock:
            return sorted(self._published)

    def will_publish(self, table: str) -> bool | None:
        """Of a table this service does not publish: True if it will (it is reading it), False if
        it never will, None if it cannot say (one may be published later). A subscriber waits for
        a table that will come, fails at once for one that never will, and waits at most its
        ``unpublished_timeout`` for the others. The ``will_publish`` given at construction says;
        without one, None (``db.cdc.publish``'s says from the datalayer's listeners and ``tables=``)."""
        return None if self._will_publish is None else self._will_publish(table)

    def get_snapshot(self, table: str) -> dict[Any, Any]:
        """The current data of ``table``: ``{row id: value}``."""
        with self._lock:
            state = self._published.get(table)
            return {} if state is None else {r.id: r.value for r in state.rows.values()}

    def get_last_published_data_with_seqnum(self, table: str) -> tuple[int, dict[Any, Any]]:
        """``(seqnum, data)``: the table's data and the sequence number it includes."""
        with self._lock:
            state = self._published.get(table)
            if state is None:
                return self._load_seqnum(table), {}
            return state.seqnum, {r.id: r.value for r in state.rows.values()}

    def _snapshot_text(self, table: str) -> tuple[str, int, str | None]:
        """``(epoch, seqnum, "[[id, value], ...]")``, encoded once per row when published; the
        text is None for a table not published (yet)."""
        check_name("table", table)
        with self._lock:
            state = self._published.get(table)
            if state is None:  # asking does not make a table published
                return self.epoch, self._load_seqnum(table), None
            text = "[" + ",".join(f"[{r.id_text},{r.value_text}]" for r in state.rows.values()) + "]"
            return self.epoch, state.seqnum, text

    def subscriber_list(self) -> list[tuple[str, str]]:
        """``(subscriber service, table)`` for every subscription to this service's tables: those
        that fetched a snapshot and have not unsubscribed, while the connection they asked on is
        open (a subscriber killed, or whose host went away, is listed no more)."""
        with self._lock:
            return sorted((s, t) for t, subs in self._subscribers.items() for s in subs)

    def _add_subscriber(self, subscriber: str, table: str, connection: int | None = None) -> None:
        with self._lock:
            self._subscribers.setdefault(table, {})[subscriber] = connection

    def _remove_subscriber(self, subscriber: str, table: str) -> None:
        with self._lock:
            subscribers = self._subscribers.get(table, {})
            subscribers.pop(subscriber, None)
            if not subscribers:
                self._subscribers.pop(table, None)

    def _drop_subscribers(self, connection: int) -> None:
        """The connection closed: those who asked on it are gone (or will ask again on another)."""
        with self._lock:
            self._subscribers = _without_connection(self._subscribers, connection)

    # -- subscribing --------------------------------------------------------------------------
    def subscribe(self, service: str, table: str) -> None:
        """Follow ``service``'s ``table``: a snapshot first, then every delta in order."""
        check_name("service", service)
        check_name("table", table)
        node = self._require_node()
        with self._lock:
            if (service, table) in self._subscriptions:
                return
            sub = self._subscriptions[(service, table)] = _Subscription(service, table)
        try:
            node.subscribe(self, service, table)
        except BaseException:  # refused (unknown publisher...): no subscription is left behind
            with self._lock:
                if self._subscriptions.get((service, table)) is sub:
                    del self._subscriptions[(service, table)]
            raise

    def unsubscribe(self, service: str, table: str) -> None:
        with self._lock:
            found = self._subscriptions.pop((service, table), None)
        if found is not None and self._node is not None:
            self._node.unsubscribe(self, service, table)

    def subscription_list(self) -> list[tuple[str, str]]:
        """``(service, table)`` of every subscription of this service."""
        with self._lock:
            return sorted(self._subscriptions)

    def receive_data(self, publisher: str, table: str, data: Any, is_snapshot: bool = True) -> None:
        """Override: called in order with a snapshot (``{id: value}``) or a delta (a list of
        :class:`Change`). The base class keeps nothing."""

    def receive_data_sequenced(
        self,
        publisher: str,
        table: str,
        data: Any,
        seqnum: int,
        is_snapshot: bool = False,
        receipt_time: float | None = None,
    ) -> None:
        """Put deliveries in order: a snapshot resets the sequence; a delta is applied when it
        is the next one, held back when it comes early (a gap), dropped when already applied."""
        now = time.monotonic() if receipt_time is None else receipt_time
        with self._lock:
            sub = self._subscriptions.get((publisher, table))
            if sub is None:
                return
            sub.last_heard = now
            if is_snapshot:
                sub.seqnum = seqnum
                sub.gap_since = None
                ready: list[tuple[int, Any, bool]] = [(seqnum, data, True)]
                self._drain(sub, ready)
            elif sub.seqnum is None or seqnum > sub.seqnum + 1:
                sub.pending.setdefault(seqnum, (sub.epoch or "", data, now))
                if sub.seqnum is not None and sub.gap_since is None:
                    sub.gap_since = now  # held back for gap_timeout, then check_resub_all
                return
            elif seqnum <= sub.seqnum:
                sub.duplicates += 1
                return
            else:
                sub.seqnum = seqnum
                ready = [(seqnum, data, False)]
                self._drain(sub, ready)
        for number, payload, snapshot in ready:
            self._deliver(sub, payload, number, snapshot)

    def _drain(self, sub: _Subscription, ready: list[tuple[int, Any, bool]]) -> None:
        """Move the held-back deltas that now follow on into ``ready``; forget older ones."""
        assert sub.seqnum is not None
        for number in [n for n in sub.pending if n <= sub.seqnum]:
            del sub.pending[number]
        while sub.seqnum + 1 in sub.pending:
            sub.seqnum += 1
            ready.append((sub.seqnum, sub.pending.pop(sub.seqnum)[1], False))
        sub.gap_since = None if not sub.pending else (sub.gap_since or time.monotonic())

    def _deliver(self, sub: _Subscription, data: Any, seqnum: int, snapshot: bool) -> None:
        if not snapshot:
            sub.deltas += 1
        try:
            self._receive(sub, data, seqnum, snapshot)
        except Exception as exc:
            self.errors += 1
            sub.last_error = f"{type(exc).__name__}: {exc}"
            log.exception("receive_data of %s failed on %s:%s #%d", self.service_id, sub.publisher, sub.table, seqnum)
        with self._changed:
            sub.delivered = seqnum  # after receive_data returned: what waiters wait for
            self._changed.notify_all()

    def _receive(self, sub: _Subscription, data: Any, seqnum: int, snapshot: bool) -> None:
        """Hand one in-order delivery to :meth:`receive_data` (subclasses may want the seqnum)."""
        self.receive_data(sub.publisher, sub.table, data, is_snapshot=snapshot)

    def check_resub_all(self, *, quiet_after: float | None = None) -> list[tuple[str, str]]:
        """Resubscribe every subscription with a gap open past ``gap_timeout``, or quiet for
        longer than ``quiet_after`` seconds (the node's, by default: a few heartbeats);
        returns those it resubscribed. The node also runs this periodically."""
        node = self._require_node()
        quiet = node.quiet_after if quiet_after is None else quiet_after
        now = time.monotonic()
        due: list[tuple[str, str, str]] = []
        expired: list[_Subscription] = []
        with self._lock:
            for sub in self._subscriptions.values():
                if sub.failure is not None:
                    continue
                if (
                    sub.unpublished_since is not None
                    and unpublished_verdict(
                        None, sub.seen_published, sub.unpublished_since, now, self.unpublished_timeout
                    )[1]
                ):
                    expired.append(sub)
                    continue
                if sub.resubscribing or now < sub.retry_at:
                    continue
                if sub.gap_since is not None and now - sub.gap_since > self.gap_timeout:
                    due.append((sub.publisher, sub.table, f"a gap after #{sub.seqnum} open for {self.gap_timeout} s"))
                elif now - sub.last_heard > quiet:
                    due.append((sub.publisher, sub.table, f"nothing heard for {quiet} s"))
        for sub in expired:
            self._fail(sub, self._not_published(sub, never=False))
        for publisher, table, why in due:
            self._resubscribe(publisher, table, why)
        return [(publisher, table) for publisher, table, _ in due]

    # -- what the node calls (on its receiving thread) ----------------------------------------
    def _heard(self, publisher: str, table: str, epoch: str, seqnum: int, data: list[Change] | None) -> None:
        """A delta (``data``) or a heartbeat (None) arrived for one of this service's subscriptions."""
        now = time.monotonic()
        with self._lock:
            sub = self._subscriptions.get((publisher, table))
            if sub is None or sub.failure is not None:
                return
            sub.last_heard = now
            if data is not None:  # a delta: the table is published (a heartbeat may be a probe's)
                sub.seen_published, sub.unpublished_since = True, None
            if sub.seqnum is None:  # no snapshot yet: keep deltas for after it
                if data is not None:
                    sub.pending.setdefault(seqnum, (epoch, data, now))
                if sub.unpublished and not sub.resubscribing:
                    # Its publisher said it did not publish the table; a delta or a heartbeat of
                    # it says it does now. (Those heard kept it from looking quiet: never fetched.)
                    sub.unpublished = False
                    self._resubscribe(publisher, table, "it is published now")
                return
            if epoch != sub.epoch:
                log.warning("%s:%s restarted (a new epoch): resubscribing", publisher, table)
                sub.pending.clear()
                self._resubscribe(publisher, table, "the publisher restarted")
                return
            if data is None:
                if sub.seqnum is not None and seqnum > sub.seqnum and sub.gap_since is None:
                    sub.gap_since = now  # a heartbeat says deltas were missed
                return
        self.receive_data_sequenced(publisher, table, data, seqnum, receipt_time=now)

    def _resubscribe(self, publisher: str, table: str, why: str) -> None:
        with self._lock:
            sub = self._subscriptions.get((publisher, table))
            if sub is None or sub.resubscribing:
                return
            sub.resubscribing = True
        log.info("%s resubscribes to %s:%s (%s)", self.service_id, publisher, table, why)
        self._require_node().fetch_snapshot(self, publisher, table)

    def _snapshot_arrived(
        self,
        publisher: str,
        table: str,
        epoch: str,
        seqnum: int,
        data: dict[Any, Any],
        published: bool = True,
        tables: list[str] | None = None,
        will_publish: bool | None = None,
    ) -> None:
        """The snapshot of a subscription arrived; or the publisher's answer that it does not
        publish the table (``published`` false), with the ``tables`` it does publish and whether
        it ``will_publish`` this one (see :func:`unpublished_verdict`)."""
        with self._lock:
            sub = self._subscriptions.get((publisher, table))
            if sub is None or sub.failure is not None:
                return
            first = sub.seqnum is None
            error = None
            if not published:
                sub.unpublished, sub.publisher_tables = True, tables
                sub.unpublished_since, give_up = unpublished_verdict(
                    will_publish, sub.seen_published, sub.unpublished_since, time.monotonic(), self.unpublished_timeout
                )
                if give_up:
                    error = self._not_published(sub, never=will_publish is False)
                elif not self._takes_unpublished(first):
                    kept = "" if first else "the view is kept, and "
                    self._snapshot_failed(
                        publisher, table, f"{publisher} does not publish {table!r} (yet): {kept}asked for again"
                    )
                    return
            else:
                sub.unpublished, sub.seen_published, sub.unpublished_since = False, True, None
            if error is None:
                sub.resubscribing = False
                sub.failures = 0
                if not first:
                    sub.resubscriptions += 1
                if not first and epoch == sub.epoch and seqnum < sub.seqnum:
                    # Deltas that arrived while it was fetched went past it: the view is newer.
                    self._changed.notify_all()
                    return
                if sub.epoch != epoch:
                    sub.pending = {n: p for n, p in sub.pending.items() if p[0] == epoch}
                sub.epoch = epoch
                sub.last_error = None
        if error is not None:
            self._fail(sub, error)
            return
        self.receive_data_sequenced(publisher, table, data, seqnum, is_snapshot=True)

    def _takes_unpublished(self, first: bool) -> bool:
        """Whether the snapshot of a table the publisher does not publish (an empty one) is taken.
        Only as the first: the table is followed until it is published (a listener added later),
        or for ``unpublished_timeout``. After it, that answer is a publisher that restarted and
        has not read its tables yet, or one that stopped publishing the table: taking it would
        delete every row of the view."""
        return first

    def _not_published(self, sub: _Subscription, *, never: bool) -> Exception:
        """The error that ends a subscription to a table its publisher does not publish."""
        from reactive.feed.node import TableNotPublishedError

        where = None if self._node is None else self._node.address_of(sub.publisher)
        at = f" at {where}" if where else ""
        listed = published_list(sub.table, sub.publisher_tables)
        if never:
            message = f"{sub.publisher}{at} publishes no table {sub.table!r}, and says it never will ({listed})"
        else:
            message = (
                f"{sub.publisher}{at} publishes no table {sub.table!r} ({listed}), and did not for "
                f"{self.unpublished_timeout:g} s: check the name (a table published later must come within "
                "unpublished_timeout)"
            )
        return TableNotPublishedError(message, publisher=sub.publisher, table=sub.table, published=sub.publisher_tables)

    def _fail(self, sub: _Subscription, error: Exception) -> None:
        """End ``sub`` for good: nothing more is fetched or delivered; waiters wait no more."""
        with self._changed:
            if sub.failure is not None:
                return
            sub.failure, sub.resubscribing = error, False
            sub.last_error = f"{type(error).__name__}: {error}"
            self._changed.notify_all()
        log.error("%s: %s", self.service_id, error)
        self._subscription_failed(sub.publisher, sub.table, error)

    def _subscription_failed(self, publisher: str, table: str, error: Exception) -> None:
        """Override: the subscription to ``publisher``'s ``table`` ended for good with ``error``."""

    def _snapshot_failed(self, publisher: str, table: str, error: str) -> None:
        with self._lock:
            sub = self._subscriptions.get((publisher, table))
            if sub is not None and sub.failure is None:
                sub.resubscribing = False
                sub.last_error = error
                # Tried again at the next check, backing off: a publisher that is down or a
                # snapshot over max_message_bytes is not fetched every 50 ms.
                sub.failures += 1
                sub.retry_at = time.monotonic() + retry_backoff(sub.failures)
            self._changed.notify_all()  # a waiter may be waiting for the status
        log.warning("%s could not fetch the snapshot of %s:%s: %s", self.service_id, publisher, table, error)

    # -- waiting (tests, benchmarks, applications) ----------------------------------------------
    def wait_synced(self, timeout: float | None = None) -> bool:
        """Wait until every subscription has its snapshot and no gap; False on timeout, and at once
        when one failed for good (its ``status``'s ``last_error`` says why)."""
        return self._wait_for(
            lambda: all(s.delivered is not None and not s.pending for s in self._subscriptions.values()),
            timeout,
            lambda: any(s.failure is not None for s in self._subscriptions.values()),
        )

    def wait_delivered(
        self, seqnum: int, timeout: float | None = None, *, publisher=None, table=None, epoch: str | None = None
    ) -> bool:
        """Wait until the subscription (the only one, or ``publisher``/``table``) reached ``seqnum``
        (of the publisher's ``epoch``, when given: numbers of two epochs do not compare)."""

        def chosen() -> list[_Subscription]:
            return [
                s
                for s in self._subscriptions.values()
                if (publisher is None or s.publisher == publisher) and (table is None or s.table == table)
            ]

        def reached() -> bool:
            subs = chosen()
            return bool(subs) and all(
                s.delivered is not None and s.delivered >= seqnum and (epoch is None or s.epoch == epoch) for s in subs
            )

        return self._wait_for(reached, timeout, lambda: any(s.failure is not None for s in chosen()))

    def _wait_for(
        self, predicate: Callable[[], bool], timeout: float | None, failed: Callable[[], bool] = lambda: False
    ) -> bool:
        """``predicate()`` once it holds, ``timeout`` passed, what it waits for ``failed`` for good,
        or the service stopped (its subscriptions ended: a ``wait_idle`` on a stopping datalayer
        waited out its timeout)."""
        with self._changed:
            self._changed.wait_for(lambda: predicate() or failed() or not self._running, timeout)
            return predicate()

    def _require_node(self) -> Node:
        if self._node is None or not self._running:
            raise ConfigurationError(f"service {self.service_id!r} is not started: call start() first")
        return self._node


def unpublished_verdict(
    will_publish: bool | None, seen_published: bool, since: float | None, now: float, timeout: float
) -> tuple[float | None, bool]:
    """What a subscription makes, at ``now``, of its publisher not publishing its table: ``(since,
    give up)``, since when it has waited with a limit (None: it waits without one) and whether it
    gives up. It waits without a limit for a table the publisher ``will_publish`` (reading it) or
    that it ``seen_published`` before (a publisher restarted reads its tables first); it gives up
    at once on one the publisher never will publish, and after ``timeout`` seconds on the others.

    >>> unpublished_verdict(False, True, None, 10.0, 60.0)  # never: at once, even after a view
    (None, True)
    >>> unpublished_verdict(True, False, 5.0, 10.0, 60.0), unpublished_verdict(None, True, None, 10.0, 60.0)
    ((None, False), (None, False))
    >>> unpublished_verdict(None, False, None, 10.0, 60.0), unpublished_verdict(None, False, 5.0, 65.0, 60.0)
    ((10.0, False), (5.0, True))
    """
    if will_publish is False:
        return None, True
    if will_publish or seen_published:
        return None, False
    since = now if since is None else since
    return since, now - since >= timeout


#: At most this many of a publisher's tables are named in a message.
_TABLES_NAMED = 20


def published_list(table: str, tables: Sequence[str] | None) -> str:
    """What a publisher publishes, said to a subscriber of ``table`` (which it does not publish),
    with the name most likely meant: the same but for case, or a close spelling.

    >>> published_list("len__txet", ["docs", "len__text"])
    "it publishes: docs, len__text; did you mean 'len__text'?"
    >>> published_list("Docs", ["docs"])
    "it publishes: docs; did you mean 'docs'? (names are taken as written, case included)"
    >>> published_list("t", []), published_list("t", None)
    ('it publishes: none', 'it did not say what it publishes')
    """
    if tables is None:
        return "it did not say what it publishes"
    names = sorted(tables)
    more = f" and {len(names) - _TABLES_NAMED} more" if len(names) > _TABLES_NAMED else ""
    listed = f"it publishes: {', '.join(names[:_TABLES_NAMED]) or 'none'}{more}"
    same = same_but_case(table, names)
    if same:
        return f"{listed}; did you mean {same!r}? (names are taken as written, case included)"
    close = difflib.get_close_matches(table, names, n=1, cutoff=0.8)
    return f"{listed}; did you mean {close[0]!r}?" if close else listed


def _without_connection(
    subscribers: Mapping[str, Mapping[str, int | None]], connection: int
) -> dict[str, dict[str, int | None]]:
    """``subscribers`` (table -> subscriber -> connection) less those of ``connection``.

    >>> _without_connection({"t": {"a": 7, "b": 8, "c": None}, "u": {"a": 7}}, 7)
    {'t': {'b': 8, 'c': None}}
    """
    kept = {table: {s: c for s, c in subs.items() if c != connection} for table, subs in subscribers.items()}
    return {table: subs for table, subs in kept.items() if subs}


def _checkpoint_name(service_id: str) -> str:
    return f"feed:{service_id}"


def endpoint_actions(endpoint: Any) -> list[str]:
    """The RPC actions an endpoint object offers: its public methods."""
    return sorted(n for n in dir(endpoint) if not n.startswith("_") and callable(getattr(endpoint, n, None)))


# -- pure functions: deltas ------------------------------------------------------------------
#: ``(event, id key, row)``; a delete carries the row it removes (its id is sent).
Delta = list[tuple[str, Hashable, _Row]]


def _row(row_id: Any, value: Any) -> _Row:
    return _Row(row_id, value, wire.dumps(row_id), wire.dumps(value))


def _snapshot_delta(rows: Mapping[Hashable, _Row], data: Mapping[Any, Any]) -> Delta:
    """The delta from ``rows`` (published last) to ``data`` (the whole table now)."""
    changes: Delta = []
    seen = set()
    for row_id, value in data.items():
        key = id_key(row_id)
        seen.add(key)
        new = _row(row_id, value)
        old = rows.get(key)
        if old is None:
            changes.append(("insert", key, new))
        elif old.value_text != new.value_text:
            changes.append(("update", key, new))
    changes.extend(("delete", key, row) for key, row in rows.items() if key not in seen)
    return changes


def _normalize(rows: Mapping[Hashable, _Row], data: Iterable[Any], table: str) -> Delta:
    """A delta given as changes, against ``rows``: insert or update by what is there, deletes of
    ids that are there, nothing for a value unchanged; the last change of an id wins.

    >>> old = {1: _row(1, "a")}
    >>> [(e, k) for e, k, _ in _normalize(old, [("upsert", 1, "a"), ("insert", 2, "b"), ("delete", 3, None)], "t")]
    [('insert', 2)]
    """
    last: dict[Hashable, tuple[str, Any, Any]] = {}
    for change in data:
        if isinstance(change, Change):
            event, row_id, value = change.event, change.id, change.value
        else:
            try:
                event, row_id, value = change
            except (TypeError, ValueError):
                raise ConfigurationError(
                    f"publish({table!r}, ..., use_snapshot=False): each change is (event, id, value), not {change!r}"
                ) from None
        if event not in ("insert", "update", "upsert", "delete"):
            raise ConfigurationError(f"publish({table!r}): unknown event {event!r} (insert, update, upsert, delete)")
        last[id_key(row_id)] = (event, row_id, value)
    changes: Delta = []
    for key, (event, row_id, value) in last.items():
        old = rows.get(key)
        if event == "delete":
            if old is not None:
                changes.append(("delete", key, old))
            continue
        new = _row(row_id, value)
        if old is None:
            changes.append(("insert", key, new))
        elif old.value_text != new.value_text:
            changes.append(("update", key, new))
    return changes


def _apply(rows: dict[Hashable, _Row], changes: Delta) -> None:
    for event, key, row in changes:
        if event == "delete":
            rows.pop(key, None)
        else:
            rows[key] = row

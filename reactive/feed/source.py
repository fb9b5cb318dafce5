"""A table another process publishes, as a change source of this datalayer (``db.cdc.follow``).

Process A publishes (``db.cdc.publish``); process B follows one of its tables or listeners'
outputs under a local name, and its listeners select that name like any table, so chains of
models span processes::

    db_b.cdc.follow("tcp://host-a:5560", "embed__text", as_table="a_embeddings")
    db_b.add(Listener(model=cluster, key="_output", select="a_embeddings"))

A followed row is the published value with its id under ``_source`` (a table's row keeps its
own columns; an output ``v`` becomes ``{"_source": id, "_output": v}``, as a chained listener
sees outputs in one process). The subscription's view of the table is the source a listener's
backfill and reconciliation read. Each (re)start of the subscription reconciles the listeners
with the snapshot (outputs of rows gone meanwhile are deleted, stale ones computed), then every
delta becomes a change packet on the datalayer's queue.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from reactive import checks
from reactive.backends.base import OUTPUT_FIELD, SOURCE_FIELD, TableInfo
from reactive.errors import QueueClosedError, ReactiveError
from reactive.events import ChangePacket, DBEvent, Row, id_key
from reactive.feed import Change, Node, Subscription, TableNotPublishedError, _publisher_of, resumable
from reactive.feed.node import check_address
from reactive.feed.service import UNPUBLISHED_TIMEOUT, check_name, retry_backoff
from reactive.threads import ReactiveThread

if TYPE_CHECKING:
    from reactive.queue import CDCQueue

log = logging.getLogger(__name__)

_EVENTS = {"insert": DBEvent.insert, "update": DBEvent.update, "delete": DBEvent.delete}


def feed_row(row_id: Any, value: Any) -> Row:
    """The row a listener sees for a published value.

    >>> feed_row(7, {"text": "hi"})
    {'text': 'hi', '_source': 7}
    >>> feed_row(7, [0.5, 0.25])
    {'_source': 7, '_output': [0.5, 0.25]}
    """
    if isinstance(value, dict):
        return {**value, SOURCE_FIELD: row_id}
    return {SOURCE_FIELD: row_id, OUTPUT_FIELD: value}


class FeedSource:
    """Follows one published table; a :class:`~reactive.events.ChangeSource` and a
    :class:`~reactive.backends.base.SourceReader` of the datalayer for ``name``.

    ``reconcile(names)`` is ``db.cdc``'s: it queues what brings the listeners of ``name`` up to
    date with this source's view (at each snapshot, and for packets the handler released).
    """

    def __init__(
        self,
        name: str,
        address: str,
        table: str,
        queue: CDCQueue,
        reconcile: Callable[[list[str]], None],
        *,
        service: str | None = None,
        node_options: dict[str, Any] | None = None,
        unpublished_timeout: float = UNPUBLISHED_TIMEOUT,
    ) -> None:
        self.table_name = name
        self.address = check_address(address)
        self.table = check_name("table", table)
        self.service = None if service is None else check_name("service", service)
        self._queue = queue
        self._reconcile = reconcile
        self._node_options = dict(node_options or {})
        #: How long a table the publisher does not publish, and cannot say it will, is waited for.
        self.unpublished_timeout = checks.seconds("unpublished_timeout", unpublished_timeout, infinite=True)
        # Each start makes its node; one made now refuses bad options (a TypeError, a
        # ConfigurationError) at follow(), not in a log line at every start.
        Node(None, peers=[self.address], **self._node_options)
        self._subscription: _FeedSubscription | None = None
        self._follower: _Follower | None = None
        self._releaser: _Releaser | None = None
        #: Set once there is nothing more to wait for: the subscription is open (the publisher
        #: answered), the follow failed for good (:attr:`failure`), or the source stopped.
        self._settled = threading.Event()
        self._lock = threading.Lock()
        self.packets = 0
        #: Why this table cannot be followed (a configuration error, see
        #: :func:`~reactive.feed.resumable`): tried no more until the next start. None otherwise.
        self.failure: str | None = None

    @property
    def name(self) -> str:
        return f"feed {self.address} {self.table}"

    def __repr__(self) -> str:
        return f"FeedSource({self.table_name!r} <- {self.address} {self.table!r})"

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Subscribe, on a ``reactive-feed-follow`` thread that tries again (backing off) until
        the publisher answers, as a subscription does when its publisher dies; an error that
        trying again cannot mend (an address where several services publish the table...) ends
        it, in :attr:`failure`. The first snapshot reconciles the listeners of this table."""
        with self._lock:
            if self._subscription is not None or self._follower is not None:
                return
            node = Node(None, peers=[self.address], **self._node_options)
            node.start()
            self.failure = None
            self._settled.clear()
            self._follower = _Follower(self, node)
            self._follower.start()

    def stop(self) -> None:
        """Stop following (at once, also while the publisher is being waited for)."""
        with self._lock:
            follower, self._follower = self._follower, None
            subscription, self._subscription = self._subscription, None
            releaser, self._releaser = self._releaser, None
            self._settled.set()  # a sync waiting for the publisher waits no more
        for thread in (follower, releaser):
            if thread is not None:
                thread.stop()
                thread.join(10)
        if subscription is not None:
            subscription.close()

    def _opened(self, follower: _Follower, subscription: _FeedSubscription) -> None:
        """The follower's subscription is open: it is this source's, unless the source stopped meanwhile."""
        with self._lock:
            if self._follower is follower and follower.should_keep_running():
                self._follower = None
                self._subscription = subscription
                self._settled.set()
                return
        subscription.close()

    def _failed(self, follower: _Follower, error: str) -> None:
        """The follower met an error trying again cannot mend: this table is not followed."""
        with self._lock:
            if self._follower is follower and follower.should_keep_running():
                self.failure = error
                self._settled.set()

    def _subscription_failed(self, subscription: _FeedSubscription, error: Exception) -> None:
        """The subscription ended for good (the table is not published): this table is not followed
        (its rows are gone from the source's view) until the next start."""
        with self._lock:
            if self._subscription is not subscription:
                return
            self.failure = f"{type(error).__name__}: {error}"
            self._subscription = None
        subscription.close()

    def sync(self, timeout: float | None) -> bool:
        """Wait until every change published before the call is on the queue (or handled); False
        when ``timeout`` passes first, the publisher not followed yet included, and at once when
        the follow failed for good (:attr:`failure`): nothing will arrive."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            started = self._follower is not None or self._subscription is not None
        if not started or not self._settled.wait(timeout):
            return False
        subscription = self._subscription
        if subscription is None:
            return False
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            answer = subscription.rpc(subscription.publisher, "get_seqnum", {"table": self.table}, timeout=timeout)
        except Exception as exc:
            log.warning("%s: the publisher did not answer: %s", self.name, exc)
            return False
        # Of the publisher's epoch: a publisher restarted without its checkpoints numbers from 0
        # again, below what the subscription delivered before it noticed the restart.
        try:
            return subscription.wait_delivered(int(answer["seqnum"]), timeout, epoch=answer.get("epoch"))
        except TableNotPublishedError:
            return False  # the follow ended meanwhile (:attr:`failure` says why): nothing will arrive

    # -- what the subscription delivers (on its node's receiving thread) -----------------------
    def _deliver(self, changes: list[Change], first_snapshot: bool) -> None:
        if first_snapshot:
            self._reconcile([self.table_name])
            return
        for event, ids, rows, seqnum in _packets(changes):
            self._queue.put(ChangePacket(self.table_name, _EVENTS[event], ids, rows, source=self, position=seqnum))
            self.packets += 1

    # -- ChangeSource -----------------------------------------------------------------------------
    def save_positions(self, positions: Sequence[Any]) -> None:
        """Nothing to keep: a restart resubscribes and reconciles with the snapshot."""

    def commit(self, positions: Sequence[Any]) -> None:
        """Nothing to settle."""

    def release(self, positions: Sequence[Any]) -> None:
        """The handler gave up on some changes: bring the listeners up to date with the view, on
        the ``reactive-feed-release`` thread, which tries again (backing off) until that works.
        A thread that tried once let a failed reconciliation (the database locked a moment) lose
        those changes until the next start. After :meth:`stop` nothing is owed: each start's first
        snapshot reconciles the listeners."""
        with self._lock:
            if self._subscription is None and self._follower is None:
                return
            if self._releaser is None:
                self._releaser = _Releaser(self)
                self._releaser.start()
            self._releaser.wanted.set()

    # -- SourceReader, over the subscription's view ---------------------------------------------
    def _view(self) -> dict[Any, Any]:
        subscription = self._subscription
        return {} if subscription is None else subscription.view

    def describe(self, table: str, *, id_column: str | None = None) -> TableInfo:
        return TableInfo(self.table_name, SOURCE_FIELD, (), feed=self.address)

    def table_exists(self, table: str) -> bool:
        return True

    def count(self, table: TableInfo, *, where: Mapping[str, Any] | None = None) -> int:
        return len(self._view())  # where: narrowing is optional (a count of at least those rows)

    def read_rows(self, table: TableInfo, ids: Sequence[Any]) -> dict[Hashable, Row]:
        subscription = self._subscription
        if subscription is None:
            return {}
        found = subscription.values(ids)
        return {id_key(row_id): feed_row(row_id, value) for row_id, value in found}

    def existing_ids(self, table: TableInfo, ids: Sequence[Any]) -> set[Hashable]:
        subscription = self._subscription
        return set() if subscription is None else {id_key(row_id) for row_id, _ in subscription.values(ids)}

    def scan(
        self,
        table: TableInfo,
        *,
        columns: Sequence[str] | None,
        page_size: int,
        where: Mapping[str, Any] | None = None,
    ) -> Iterator[list[Row]]:
        # ``where`` is left to the caller: the view is in memory.
        rows = [feed_row(row_id, value) for row_id, value in self._view().items()]
        for start in range(0, len(rows), page_size):
            yield rows[start : start + page_size]

    def info(self) -> dict[str, Any]:
        subscription, follower = self._subscription, self._follower
        return {
            "address": self.address,
            "table": self.table,
            "following": subscription is not None,
            "packets": self.packets,
            "subscription": None if subscription is None else subscription.status,
            # While the publisher does not answer: the attempts so far and why the last one failed.
            "attempts": 0 if follower is None else follower.failures,
            "last_error": None if follower is None else follower.last_error,
            # Set when trying again cannot help: the follow ended (until the next start).
            "failed": self.failure,
        }


class _Follower(ReactiveThread):
    """Opens the subscription of a :class:`FeedSource`, trying again until the publisher answers;
    an error :func:`~reactive.feed.resumable` says trying again cannot mend ends it."""

    def __init__(self, source: FeedSource, node: Node) -> None:
        super().__init__("feed-follow")
        self.source = source
        self.node = node
        self.failures = 0
        self.last_error: str | None = None

    def on_stop(self) -> None:
        self.node.stop()  # an RPC waiting for the publisher ends at once

    def run(self) -> None:
        source = self.source
        while self.should_keep_running():
            subscription = None
            try:
                services = self.node.refresh_peer(source.address)
                publisher = _publisher_of(source.address, source.table, source.service, services)
                subscription = _FeedSubscription(source, self.node, publisher, source.table, source.unpublished_timeout)
                subscription.open()
            except Exception as exc:
                if subscription is not None:
                    subscription.stop()  # leaves the node, which the next attempt uses
                if not self.should_keep_running():
                    return
                self.failures += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                if not resumable(exc):
                    self._give_up(exc)
                    return
                delay = retry_backoff(self.failures)
                log.warning("%s: could not follow it (%s); trying again in %.1f s", source, exc, delay)
                self.wait(delay)
                continue
            source._opened(self, subscription)
            return

    def _give_up(self, exc: Exception) -> None:
        source = self.source
        # An error that is not the feed's own is a bug: its traceback is what says where.
        traceback = not isinstance(exc, ReactiveError)
        log.error("%s: cannot follow it, and trying again will not help: %s", source, exc, exc_info=traceback)
        self.node.stop()
        assert self.last_error is not None
        source._failed(self, self.last_error)


class _Releaser(ReactiveThread):
    """Reconciles the listeners of a :class:`FeedSource` whenever the handler released some of
    its changes (``wanted``), until a reconciliation is queued; rounds wanted again soon after the
    last (the same changes failing again) back off as the feed's other retries
    (:func:`~reactive.feed.service.retry_backoff`: from 0.1 s, doubling with each such round)."""

    #: A round wanted within this many seconds of the last one's start backs off.
    SOON = 5.0

    def __init__(self, source: FeedSource) -> None:
        super().__init__("feed-release")
        self.source = source
        self.wanted = threading.Event()
        self.failures = 0

    def on_stop(self) -> None:
        self.wanted.set()

    def run(self) -> None:
        soon, last = 0, -self.SOON  # rounds in a row wanted soon after the last
        while self.should_keep_running():
            self.wanted.wait()
            soon = soon + 1 if time.monotonic() - last < self.SOON else 0
            if not self.wait(retry_backoff(soon - 1) if soon else 0.0):
                return
            self.wanted.clear()
            last = time.monotonic()
            try:
                self.source._reconcile([self.source.table_name])
            except QueueClosedError:
                return  # db.cdc stops: its next start reconciles
            except Exception as exc:
                self.failures += 1
                log.warning("%s: reconciling its listeners failed (%s); trying again", self.source, exc)
                self.wanted.set()


class _FeedSubscription(Subscription):
    """The subscription of a :class:`FeedSource`: whole deliveries, not one change at a time."""

    def __init__(self, source: FeedSource, node: Node, publisher: str, table: str, unpublished_timeout: float) -> None:
        super().__init__(
            node, publisher, table, lambda change: None, own_node=True, unpublished_timeout=unpublished_timeout
        )
        self.source = source
        self._snapshots = 0

    def _receive(self, sub: Any, data: Any, seqnum: int, snapshot: bool) -> None:
        if snapshot:
            changes = self._resync(data, seqnum)
            self._snapshots += 1
            self.source._deliver(changes, first_snapshot=self._snapshots == 1)
            return
        self._apply(data)
        self.source._deliver(data, first_snapshot=False)

    def _takes_unpublished(self, first: bool) -> bool:
        # Not even as the first: it reconciles the listeners, deleting every output (after a
        # restart of this process while the publisher's restart reads its tables).
        return False

    def _subscription_failed(self, publisher: str, table: str, error: Exception) -> None:
        self.source._subscription_failed(self, error)

    def values(self, ids: Sequence[Any]) -> list[tuple[Any, Any]]:
        with self._view_lock:
            found = (self._view.get(id_key(i)) for i in ids)
            return [row for row in found if row is not None]


def _packets(changes: list[Change]) -> Iterator[tuple[str, tuple[Any, ...], tuple[Any, ...], int]]:
    """Consecutive changes of one event as one packet: ``(event, ids, rows, seqnum)``.

    >>> [(e, ids) for e, ids, _, _ in _packets([Change("insert", 1, {}, 5), Change("insert", 2, {}, 5),
    ...                                            Change("delete", 1, None, 6)])]
    [('insert', (1, 2)), ('delete', (1,))]
    """
    run: list[Change] = []
    for change in changes:
        event = "insert" if change.event == "snapshot" else change.event
        if run and (event != ("insert" if run[0].event == "snapshot" else run[0].event)):
            yield _packet(run)
            run = []
        run.append(change)
    if run:
        yield _packet(run)


def _packet(run: list[Change]) -> tuple[str, tuple[Any, ...], tuple[Any, ...], int]:
    event = "insert" if run[0].event == "snapshot" else run[0].event
    ids = tuple(c.id for c in run)
    rows = tuple(None if event == "delete" else feed_row(c.id, c.value) for c in run)
    return event, ids, rows, run[-1].seqnum

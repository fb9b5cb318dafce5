"""``reactive.feed``: DataService, Node and subscribe(), publishers and subscribers in several processes.

Publishers run in their own process (``tests/feed_processes.py``, driven over stdin) where
the issue asks for it; a subscriber also runs in a process of its own (multiprocessing,
"spawn"). Loss and reordering go through the transport hook ``Node(receive_filter=...)``.
Nothing sleeps: every wait is on a condition, with a timeout that only matters on failure.
"""

from __future__ import annotations

import datetime as dt
import decimal
import json
import math
import multiprocessing
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq
from bson import ObjectId
from conftest import within

import reactive.feed
from reactive.errors import ConfigurationError
from reactive.events import id_key
from reactive.feed import (
    Change,
    DataService,
    DataServiceInfo,
    FeedDecodeError,
    FeedEncodeError,
    Node,
    RpcError,
    RpcTimeoutError,
    Subscription,
    subscribe,
    wire,
)
from reactive.feed.node import DocumentId, topic
from reactive.threads import reactive_threads

TESTS = Path(__file__).resolve().parent
WAIT = 10.0
#: Short timers: a publisher heartbeats every 50 ms, a gap is repaired after 100 ms.
FAST = {"heartbeat_interval": 0.05, "rpc_timeout": 5.0}


# -- helpers -------------------------------------------------------------------------------------
class PublisherProcess:
    """A publisher in another process (tests/feed_processes.py), driven over its stdin."""

    def __init__(
        self,
        service: str = "pub",
        *,
        address: str = "tcp://127.0.0.1:0",
        checkpoints: str | None = None,
        rows: dict[str, list[list[Any]]] | None = None,
        peer_timeout: float = 30.0,
    ) -> None:
        command = [sys.executable, str(TESTS / "feed_processes.py"), "--service", service, "--address", address]
        command += ["--heartbeat", "0.05", "--rows", json.dumps(rows or {}), "--peer-timeout", str(peer_timeout)]
        if checkpoints:
            command += ["--checkpoints", checkpoints]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=TESTS)
        hello = self._read()
        self.address: str = hello["address"]
        self.data_address: str = hello["data_address"]
        self.pid: int = hello["pid"]
        self.epoch: str = hello["epoch"]
        self.seqnums: dict[str, int] = hello["seqnums"]

    def _read(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise AssertionError(f"the publisher process ended (exit status {self.process.wait()})")
        return json.loads(line)

    def call(self, **command: Any) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        return self._read()

    def publish(self, table: str, rows: dict[Any, Any]) -> int:
        return self.call(op="publish", table=table, rows=[[i, v] for i, v in rows.items()])["seqnum"]

    def delta(self, table: str, changes: list[tuple[str, Any, Any]]) -> int:
        return self.call(op="delta", table=table, changes=[list(c) for c in changes])["seqnum"]

    def state(self, table: str) -> tuple[int, dict[Any, Any]]:
        answer = self.call(op="state", table=table)
        return answer["seqnum"], {i: v for i, v in answer["rows"]}

    def subscribers(self) -> list[tuple[str, str]]:
        return [tuple(s) for s in self.call(op="subscribers")["subscribers"]]

    def stop(self) -> None:
        """A clean stop: the service saves its sequence numbers, the process exits."""
        assert self.call(op="stop") == {"stopped": True}
        assert self.process.wait(WAIT) == 0

    def kill(self) -> None:
        """SIGKILL: nothing is saved, nothing is closed."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(WAIT)

    def close(self) -> None:
        if self.process.poll() is None:
            self.kill()
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                stream.close()


class Changes:
    """An ``on_change`` that records every change; waiters are woken at each one."""

    def __init__(self) -> None:
        self.items: list[Change] = []
        self._cond = threading.Condition()

    def __call__(self, change: Change) -> None:
        with self._cond:
            self.items.append(change)
            self._cond.notify_all()

    def wait_for(self, predicate: Callable[[], bool], timeout: float = WAIT) -> bool:
        with self._cond:
            return self._cond.wait_for(predicate, timeout)

    def snapshot(self) -> list[Change]:
        with self._cond:
            return list(self.items)


def replay(changes: list[Change]) -> dict[Any, Any]:
    """Apply ``changes`` to an empty dict, refusing a duplicate insert or a missing delete/update."""
    view: dict[Any, tuple[Any, Any]] = {}
    for change in changes:
        key = id_key(change.id)
        if change.event in ("snapshot", "insert"):
            assert key not in view, f"{change.event} of a row already there: {change}"
            view[key] = (change.id, change.value)
        elif change.event == "update":
            assert key in view, f"update of a row not there: {change}"
            view[key] = (change.id, change.value)
        elif change.event == "delete":
            assert key in view, f"delete of a row not there: {change}"
            del view[key]
        else:
            raise AssertionError(f"unknown event {change.event!r}")
    return {row_id: value for row_id, value in view.values()}


def assert_seqnums_never_go_back(changes: list[Change]) -> None:
    numbers = [c.seqnum for c in changes]
    assert numbers == sorted(numbers), f"sequence numbers went back: {numbers}"


def wait_until(service: DataService, predicate: Callable[[], bool], timeout: float = WAIT) -> bool:
    """Wait for ``predicate`` (checked whenever ``service`` delivers something or its status changes)."""
    return service._wait_for(predicate, timeout)


def wait_for_epoch(sub: Subscription, changes: Changes, epoch: str, view: dict[Any, Any]) -> None:
    """Wait until ``sub`` follows the publisher's ``epoch`` and its changes (all delivered) make ``view``."""
    assert wait_until(sub, lambda: sub.status["subscriptions"]["pub:t"]["epoch"] == epoch and sub.view == view)
    assert changes.wait_for(lambda: replay(changes.items) == view)


def message_of(frames: list[bytes]) -> dict[str, Any]:
    """The JSON body of a data message (``{}`` when it is not one)."""
    if len(frames) != 2:
        return {}
    try:
        message = json.loads(frames[1])
    except ValueError:
        return {}
    return message if isinstance(message, dict) else {}


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def delta_body(seqnum: Any = 99, **fields: Any) -> bytes:
    message = {
        "v": 1,
        "kind": "delta",
        "publisher": "pub",
        "table": "t",
        "epoch": "e",
        "seqnum": seqnum,
        "sent": 0.0,
        "changes": [["insert", 1, "x"]],
    }
    message.update(fields)
    return json.dumps(message).encode()


@pytest.fixture
def stack() -> Iterator[ExitStack]:
    """Everything a test starts is closed here, even when the test fails."""
    with ExitStack() as stack:
        yield stack


@pytest.fixture
def pub_node(stack: ExitStack) -> Node:
    node = Node(**FAST)
    node.start()
    stack.callback(node.stop)
    return node


@pytest.fixture
def pub(pub_node: Node) -> DataService:
    service = DataService("pub", pub_node)
    service.start()
    return service


def publisher(stack: ExitStack, **options: Any) -> PublisherProcess:
    process = PublisherProcess(**options)
    stack.callback(process.close)
    return process


def follow(stack: ExitStack, address: str, table: str = "t", **options: Any) -> tuple[Subscription, Changes]:
    changes = Changes()
    options = {**FAST, **options}
    sub = subscribe(address, table, changes, **options)
    stack.callback(sub.close)
    return sub, changes


# -- 1. processes ------------------------------------------------------------------------------------
def test_a_publisher_and_subscribers_in_separate_processes(stack: ExitStack) -> None:
    import feed_processes

    proc = publisher(stack, rows={"t": [[1, "one"], [2, "two"], [3, "three"]]})
    assert proc.pid != os.getpid() and proc.seqnums == {"t": 1}

    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    other = context.Process(target=feed_processes.subscriber_main, args=(proc.address, "t", child), daemon=True)
    other.start()
    stack.callback(lambda: (other.kill(), other.join(WAIT)) if other.is_alive() else None)
    child.close()
    assert parent.poll(WAIT * 3), "the subscriber process did not start"
    ready, other_id = parent.recv()
    assert ready == "ready"

    here, changes = follow(stack, proc.address)
    assert here.wait_synced(WAIT)
    assert here.view == {1: "one", 2: "two", 3: "three"}

    rows = {1: "one", 2: "two", 3: "three"}
    for i in range(4, 10):
        rows[i] = f"row {i}"
        if i % 3 == 0:
            rows.pop(i - 3)
        if i % 2 == 0:
            rows[1] = f"one, version {i}"
        last = proc.publish("t", rows)
    last = proc.delta("t", [("delete", 2, None), ("upsert", 4, "four"), ("insert", 10, "ten")])
    seqnum, state = proc.state("t")
    assert seqnum == last == 8

    assert here.wait_delivered(last, WAIT)
    assert here.view == state
    assert replay(changes.snapshot()) == state

    parent.send(last)
    assert parent.poll(WAIT * 2)
    kind, delivered, other_rows, other_changes, status = parent.recv()
    assert kind == "view" and delivered
    assert dict(other_rows) == state
    other_log = [Change(e, i, v, n) for e, i, v, n in other_changes]
    assert replay(other_log) == state
    assert_seqnums_never_go_back(other_log)
    assert status["subscriptions"]["pub:t"]["seqnum"] == last

    assert sorted(proc.subscribers()) == sorted([(here.service_id, "t"), (other_id, "t")])
    parent.send(None)
    other.join(WAIT)
    assert other.exitcode == 0


def test_subscribers_that_die_or_go_silent_leave_the_publishers_list(stack: ExitStack) -> None:
    # A subscriber that never unsubscribed (SIGKILLed, its host gone) stayed in the publisher's
    # subscriber_list for ever: the list grew with each one. Whatever sent the requests (this
    # version's subscriber, an older one, a client of the wire alone) leaves it once the
    # connection it asked on closes; a connection that answers no heartbeat is closed.
    import feed_processes

    proc = publisher(stack, rows={"t": [[1, "a"]]}, peer_timeout=1.0)
    context = multiprocessing.get_context("spawn")
    pipes = []  # kept open: a subscriber process ends when its pipe closes

    def start(target: Callable[..., None], *args: str) -> tuple[Any, str]:
        parent, child = context.Pipe()
        pipes.append(parent)
        process = context.Process(target=target, args=(*args, child), daemon=True)
        process.start()
        stack.callback(lambda: (process.kill(), process.join(WAIT)) if process.is_alive() else None)
        child.close()
        assert parent.poll(WAIT * 3), "the subscriber process did not start"
        ready, service_id = parent.recv()
        assert ready == "ready"
        return process, service_id

    killed, killed_id = start(feed_processes.subscriber_main, proc.address, "t")
    bare, bare_id = start(feed_processes.wire_client_main, proc.address, "t", "bare-wire-client")
    frozen, frozen_id = start(feed_processes.subscriber_main, proc.address, "t")
    here, _ = follow(stack, proc.address)
    assert here.wait_synced(WAIT)
    everyone = [(killed_id, "t"), (bare_id, "t"), (frozen_id, "t"), (here.service_id, "t")]
    assert proc.subscribers() == sorted(everyone)

    killed.kill()  # SIGKILL: nothing unsubscribes
    bare.kill()
    assert within(WAIT, lambda: proc.subscribers() == sorted([(frozen_id, "t"), (here.service_id, "t")]))
    os.kill(frozen.pid, signal.SIGSTOP)  # as a host gone: its connection stays open, and nothing answers on it
    stack.callback(os.kill, frozen.pid, signal.SIGCONT)
    assert within(WAIT, lambda: proc.subscribers() == [(here.service_id, "t")])
    last = proc.publish("t", {1: "a", 2: "b"})  # the one alive is still served, and still listed
    assert here.wait_delivered(last, WAIT) and here.view == {1: "a", 2: "b"}
    assert proc.subscribers() == [(here.service_id, "t")]


# -- 2. a late joiner ----------------------------------------------------------------------------------
def test_a_late_joiner_gets_a_snapshot_tagged_with_its_seqnum_then_consecutive_deltas(
    stack: ExitStack, pub: DataService, pub_node: Node
) -> None:
    for n in range(1, 6):
        pub.publish("t", {i: f"v{i}" for i in range(1, n + 1)})
    assert pub.get_last_published_data_with_seqnum("t")[0] == 5

    sub, changes = follow(stack, pub_node.address)
    assert sub.wait_synced(WAIT)
    first = changes.snapshot()
    assert [(c.event, c.id, c.value, c.seqnum) for c in first] == [("snapshot", i, f"v{i}", 5) for i in range(1, 6)]
    assert all(c.table == "t" and c.publisher == "pub" for c in first)
    assert sub.seqnum == 5

    pub.publish("t", {1: "v1", 2: "changed", 3: "v3", 4: "v4", 5: "v5"})  # 6: update
    pub.publish("t", {1: "v1", 2: "changed", 3: "v3", 4: "v4", 5: "v5", 6: "v6"})  # 7: insert
    pub.publish("t", [("delete", 1, None), ("delete", 99, None)], use_snapshot=False)  # 8: one delete
    assert pub.publish("t", {2: "changed", 3: "v3", 4: "v4", 5: "v5", 6: "v6"}) == 8  # nothing changed
    assert sub.wait_delivered(8, WAIT)
    deltas = changes.snapshot()[len(first) :]
    assert [(c.event, c.id, c.value, c.seqnum) for c in deltas] == [
        ("update", 2, "changed", 6),
        ("insert", 6, "v6", 7),
        ("delete", 1, None, 8),
    ]
    assert sub.view == pub.get_snapshot("t")
    status = sub.status["subscriptions"]["pub:t"]
    assert status["deltas"] == 3 and status["resubscriptions"] == 0 and status["duplicates"] == 0


class Recording(DataService):
    """The seed's way to subscribe: override receive_data."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list[tuple[str, str, Any, bool]] = []

    def receive_data(self, publisher: str, table: str, data: Any, is_snapshot: bool = True) -> None:
        self.calls.append((publisher, table, data, is_snapshot))


def subscribed_recording(stack: ExitStack, pub: DataService) -> Recording:
    """A :class:`Recording` on a node of its own, subscribed to ``pub``'s table ``t`` and synced."""
    node = Node(None, peers=[pub.node.address], **FAST)
    stack.callback(node.stop)
    recording = Recording("recording", node)
    recording.start()
    stack.callback(recording.stop)
    recording.subscribe("pub", "t")
    assert recording.wait_synced(WAIT)
    return recording


def test_receive_data_gets_the_snapshot_then_each_delta_in_order(stack: ExitStack, pub: DataService) -> None:
    pub.publish("t", {1: "a", 2: "b"})
    recording = subscribed_recording(stack, pub)
    pub.publish("t", {1: "a", 2: "B", 3: "c"})
    pub.publish("t", [("delete", 1, None)], use_snapshot=False)
    assert recording.wait_delivered(3, WAIT)
    assert recording.calls == [
        ("pub", "t", {1: "a", 2: "b"}, True),
        ("pub", "t", [Change("update", 2, "B", 2, "t", "pub"), Change("insert", 3, "c", 2, "t", "pub")], False),
        ("pub", "t", [Change("delete", 1, None, 3, "t", "pub")], False),
    ]


def test_a_wait_for_deliveries_ends_when_the_service_stops(stack: ExitStack, pub: DataService) -> None:
    # A datalayer following a feed waits here in wait_idle; stopped under it (a stand-down), the
    # wait saw no subscription left, was never woken, and slept out its whole timeout.
    pub.publish("t", {1: "a"})
    recording = subscribed_recording(stack, pub)
    outcome: list[bool] = []
    waiter = threading.Thread(target=lambda: outcome.append(recording.wait_delivered(99, None)))
    waiter.start()  # a number nothing will reach
    recording.stop()
    waiter.join(WAIT)
    assert not waiter.is_alive() and outcome == [False]


# -- 3. loss and reordering ------------------------------------------------------------------------------
class Lossy:
    """A receive filter: drops the deltas whose numbers it is given, and holds back deltas to
    release them later in reverse order (``hold``: numbers; each is released with ``release_at``)."""

    def __init__(self, drop: set[int] = frozenset(), hold: dict[int, int] | None = None) -> None:
        self.drop = set(drop)
        self.hold = dict(hold or {})
        self.held: dict[int, list[list[bytes]]] = {}
        self.dropped: list[int] = []
        self.lock = threading.Lock()

    def __call__(self, frames: list[bytes]) -> list[list[bytes]]:
        message = message_of(frames)
        if message.get("kind") != "delta":
            return [frames]
        seqnum = message["seqnum"]
        with self.lock:
            if seqnum in self.drop:
                self.drop.discard(seqnum)
                self.dropped.append(seqnum)
                return []
            if seqnum in self.hold:
                self.held.setdefault(self.hold.pop(seqnum), []).append(frames)
                return []
            return [frames, *reversed(self.held.pop(seqnum, []))]


def test_dropped_deltas_are_repaired_by_resubscription_without_duplicate_or_missing_change(
    stack: ExitStack, pub: DataService, pub_node: Node
) -> None:
    pub.publish("t", {i: i * 10 for i in range(5)})
    lossy = Lossy(drop={3, 4, 9, 14})  # 14 is the last one: only a heartbeat tells it is missing
    sub, changes = follow(stack, pub_node.address, receive_filter=lossy, gap_timeout=0.1)
    assert sub.wait_synced(WAIT)

    rows = {i: i * 10 for i in range(5)}
    for n in range(2, 15):
        if n % 3 == 0:
            rows.pop(min(rows))
        rows[n + 10] = n
        rows[max(rows)] = f"updated at {n}"
        assert pub.publish("t", rows) == n

    assert sub.wait_delivered(14, WAIT)
    assert lossy.dropped == [3, 4, 9, 14]
    assert sub.view == pub.get_snapshot("t") == rows
    log = changes.snapshot()
    assert replay(log) == rows
    assert_seqnums_never_go_back(log)
    status = sub.status["subscriptions"]["pub:t"]
    assert status["resubscriptions"] >= 1
    assert status["seqnum"] == 14 and status["pending"] == 0 and status["last_error"] is None


def test_a_resubscription_delivers_only_what_changed_even_with_nan_values(
    stack: ExitStack, pub: DataService, pub_node: Node
) -> None:
    # Compared with !=, each NaN row was delivered again as "update" at every resubscription,
    # and a Decimal sNaN raised, losing the changes the snapshot brought.
    nan = float("nan")
    rows = {1: nan, 2: {"x": nan}, 3: decimal.Decimal("sNaN"), 4: [nan] * 8, 5: decimal.Decimal("NaN"), 6: "old"}
    pub.publish("t", rows)
    lossy = Lossy(drop={2})
    sub, changes = follow(stack, pub_node.address, receive_filter=lossy, gap_timeout=0.1)
    assert sub.wait_synced(WAIT)
    assert pub.publish("t", {**rows, 6: "new"}) == 2  # lost: the subscriber resubscribes
    assert pub.publish("t", {**rows, 6: "new", 7: "seven"}) == 3
    assert sub.wait_delivered(3, WAIT)
    assert changes.wait_for(lambda: len(changes.items) >= len(rows) + 2)
    assert lossy.dropped == [2] and sub.status["subscriptions"]["pub:t"]["resubscriptions"] == 1
    after = [(c.event, c.id, c.value) for c in changes.snapshot()[len(rows) :]]
    assert after == [("update", 6, "new"), ("insert", 7, "seven")]
    assert sub.errors == 0
    sub.check_resub_all(quiet_after=0)  # and again, with nothing changed: nothing is delivered
    assert wait_until(sub, lambda: sub.status["subscriptions"]["pub:t"]["resubscriptions"] == 2)
    assert pub.publish("t", {**rows, 6: "new", 7: "seven", 8: "eight"}) == 4
    assert sub.wait_delivered(4, WAIT)
    assert [(c.event, c.id) for c in changes.snapshot()[len(rows) + 2 :]] == [("insert", 8)]


def test_reordered_deltas_repaired_within_gap_timeout_do_not_resubscribe(
    stack: ExitStack, pub: DataService, pub_node: Node
) -> None:
    pub.publish("t", {0: "zero"})
    # 2 and 3 come after 4 (as 4, 3, 2); 6 comes after 7.
    lossy = Lossy(hold={2: 4, 3: 4, 6: 7})
    sub, changes = follow(stack, pub_node.address, receive_filter=lossy, gap_timeout=WAIT)
    assert sub.wait_synced(WAIT)
    start = len(changes.snapshot())

    for n in range(2, 9):
        assert pub.publish("t", [("insert", n, f"n{n}"), ("update", 0, f"zero at {n}")], use_snapshot=False) == n

    assert sub.wait_delivered(8, WAIT)
    assert not lossy.held and not lossy.hold
    log = changes.snapshot()
    assert [(c.event, c.id, c.seqnum) for c in log[start:]] == [
        (event, i, n) for n in range(2, 9) for event, i in (("insert", n), ("update", 0))
    ]
    assert replay(log) == sub.view == pub.get_snapshot("t")
    status = sub.status["subscriptions"]["pub:t"]
    assert status["resubscriptions"] == 0
    assert status["duplicates"] == 0 and status["pending"] == 0 and status["deltas"] == 7


class SlowSnapshots(DataService):
    """A publisher whose snapshot RPC, once armed, waits after reading its data until released
    (so the test can publish more before the subscriber gets that snapshot)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.armed = False
        self.taken = threading.Event()
        self.go = threading.Event()

    def _snapshot_text(self, table: str) -> tuple[str, int, str]:
        answer = super()._snapshot_text(table)
        if self.armed:
            self.armed = False
            self.taken.set()
            self.go.wait(WAIT)
        return answer


def test_a_snapshot_older_than_the_deltas_applied_meanwhile_does_not_take_the_view_back(
    stack: ExitStack, pub_node: Node
) -> None:
    pub = SlowSnapshots("pub", pub_node)
    pub.start()
    stack.callback(pub.go.set)
    pub.publish("t", {"a": 1})
    lossy = Lossy(hold={2: 4})  # 2 comes late, with 4: a gap after 1 until then
    sub, changes = follow(stack, pub_node.address, receive_filter=lossy, gap_timeout=0.1)
    assert sub.wait_synced(WAIT)
    pub.armed = True
    pub.publish("t", {"a": 1, "b": 2})  # 2: held back
    pub.publish("t", {"a": 1, "b": 2, "c": 3})  # 3: the gap; a resubscription fetches the snapshot at 3...
    assert pub.taken.wait(WAIT)
    pub.publish("t", {"a": 1, "b": 2, "c": 3, "d": 4})  # ...and 4 arrives (with 2) before it
    assert sub.wait_delivered(4, WAIT)
    pub.go.set()  # now the snapshot at 3 arrives
    assert wait_until(sub, lambda: sub.status["subscriptions"]["pub:t"]["resubscriptions"] >= 1)
    assert pub.publish("t", {"a": 1, "b": 2, "c": 3, "d": 4, "e": 5}) == 5
    assert sub.wait_delivered(5, WAIT)
    log = changes.snapshot()
    assert_seqnums_never_go_back(log)
    assert [(c.event, c.id, c.seqnum) for c in log] == [("snapshot", "a", 1)] + [
        ("insert", key, n) for n, key in enumerate("bcde", start=2)
    ]
    assert replay(log) == sub.view == pub.get_snapshot("t")


class Chaos:
    """A seeded receive filter: drops some deltas, holds others back and lets them go later,
    out of order (with the next message, delta or heartbeat)."""

    def __init__(self, seed: int) -> None:
        self.random = random.Random(seed)
        self.held: list[list[bytes]] = []
        self.dropped = 0
        self.reordered = 0

    def __call__(self, frames: list[bytes]) -> list[list[bytes]]:
        message = message_of(frames)
        if message.get("kind") != "delta":
            released, self.held = self.held, []
            return [frames, *released]
        roll = self.random.random()
        if roll < 0.15:
            self.dropped += 1
            return []
        if roll < 0.45:
            self.held.append(frames)
            self.reordered += 1
            return []
        released, self.held = self.held, []
        self.random.shuffle(released)
        return [frames, *released] if self.random.random() < 0.5 else [*released, frames]


@pytest.mark.parametrize("seed", [1, 2])
def test_random_loss_and_reordering_end_with_the_publishers_data_exactly(
    stack: ExitStack, pub: DataService, pub_node: Node, seed: int
) -> None:
    chaos = Chaos(seed)
    pub.publish("t", {"a": 0})
    sub, changes = follow(stack, pub_node.address, receive_filter=chaos, gap_timeout=0.1)
    assert sub.wait_synced(WAIT)

    rng = random.Random(seed)
    for _ in range(80):
        key = rng.choice("abcdefghij")
        event = rng.choice(["upsert", "upsert", "delete"])
        last = pub.publish("t", [(event, key, rng.randint(0, 1000))], use_snapshot=False)
    final = pub.get_snapshot("t")

    assert sub.wait_delivered(last, WAIT)
    assert chaos.dropped > 0 and chaos.reordered > 0
    assert sub.view == final
    log = changes.snapshot()
    assert replay(log) == final
    assert_seqnums_never_go_back(log)
    assert sub.status["subscriptions"]["pub:t"]["resubscriptions"] >= 1


# -- 4. a subscriber restarts ---------------------------------------------------------------------------
def test_a_subscriber_that_restarts_gets_a_fresh_snapshot(stack: ExitStack) -> None:
    proc = publisher(stack, rows={"t": [[1, "a"], [2, "b"]]})
    first, first_changes = follow(stack, proc.address)
    assert first.wait_synced(WAIT) and first.view == {1: "a", 2: "b"}
    first.close()
    assert proc.subscribers() == []

    proc.publish("t", {2: "B", 3: "c"})
    last = proc.publish("t", {2: "B", 3: "c", 4: "d"})
    again, changes = follow(stack, proc.address)
    assert again.wait_delivered(last, WAIT)
    seqnum, state = proc.state("t")
    assert again.view == state == {2: "B", 3: "c", 4: "d"}
    assert sorted((c.event, c.id, c.value, c.seqnum) for c in changes.snapshot()) == [
        ("snapshot", i, v, seqnum) for i, v in sorted(state.items())
    ]
    assert proc.subscribers() == [(again.service_id, "t")]
    assert len(first_changes.snapshot()) == 2  # nothing reached the closed subscription


def test_a_subscription_closed_and_opened_again_catches_up(stack: ExitStack) -> None:
    proc = publisher(stack, rows={"t": [[1, "a"], [2, "b"]]})
    sub, changes = follow(stack, proc.address)
    assert sub.wait_synced(WAIT)
    sub.close()
    assert sub.subscription_list() == []

    last = proc.publish("t", {1: "A", 3: "c"})
    sub.open()
    assert sub.wait_delivered(last, WAIT)
    assert proc.state("t")[0] == last
    state = proc.state("t")[1]
    assert sub.view == state
    log = changes.snapshot()
    assert replay(log) == state
    assert {(c.event, c.id) for c in log[2:]} == {("update", 1), ("insert", 3), ("delete", 2)}
    assert proc.subscribers() == [(sub.service_id, "t")]


# -- 5. a publisher restarts ---------------------------------------------------------------------------
def test_a_publisher_restarted_on_the_same_address_is_followed_into_its_new_epoch(stack: ExitStack) -> None:
    first = publisher(stack, rows={"t": [[1, "a"], [2, "b"], [3, "c"]]})
    sub, changes = follow(stack, first.address, quiet_after=0.5, rpc_timeout=2.0, gap_timeout=0.1)
    assert sub.wait_synced(WAIT)
    assert first.publish("t", {1: "a", 2: "b", 3: "c", 5: "e"}) == 2
    assert sub.wait_delivered(2, WAIT)
    first.kill()
    before = len(changes.snapshot())

    second = publisher(stack, address=first.address, rows={"t": [[1, "A"], [3, "c"], [4, "d"]]})
    assert second.address == first.address and second.epoch != first.epoch
    wait_for_epoch(sub, changes, second.epoch, {1: "A", 3: "c", 4: "d"})
    status = sub.status["subscriptions"]["pub:t"]
    assert status["resubscriptions"] >= 1 and status["seqnum"] == 1
    restart = changes.snapshot()[before:]
    assert sorted((c.event, c.id, c.value) for c in restart) == [
        ("delete", 2, None),
        ("delete", 5, None),
        ("insert", 4, "d"),
        ("update", 1, "A"),
    ]

    # The new publisher's deltas arrive as deltas (its data socket is on another port).
    deltas = status["deltas"]
    assert second.publish("t", {1: "A", 3: "c", 4: "d", 6: "f"}) == 2
    assert sub.wait_delivered(2, WAIT)
    assert changes.snapshot()[-1] == Change("insert", 6, "f", 2, "t", "pub")
    assert sub.status["subscriptions"]["pub:t"]["deltas"] == deltas + 1
    assert replay(changes.snapshot()) == sub.view == second.state("t")[1]


def test_a_publisher_restarted_before_it_publishes_the_table_again_deletes_nothing(stack: ExitStack) -> None:
    # It answered an empty table, and every subscriber deleted every row (a follow: every output),
    # to insert them all again once the restarted publisher had read its tables.
    node = Node(**FAST)
    node.start()
    address = node.address
    pub = DataService("pub", node)
    pub.start()
    pub.publish("t", {1: "a", 2: "b"})
    sub, changes = follow(stack, address, quiet_after=0.3)
    assert sub.wait_synced(WAIT)
    pub.stop()
    node.stop()
    restarted = Node(address, **FAST)
    restarted.start()
    stack.callback(restarted.stop)
    pub = DataService("pub", restarted)
    pub.start()  # on the node, its tables not read yet
    status = lambda: sub.status["subscriptions"]["pub:t"]  # noqa: E731
    assert wait_until(sub, lambda: "pub does not publish 't' (yet)" in (status()["last_error"] or ""))
    assert sub.view == {1: "a", 2: "b"} and [c.event for c in changes.snapshot()] == ["snapshot", "snapshot"]
    pub.publish("t", {1: "a", 2: "B"})  # read: what changed meanwhile arrives, and only that
    assert wait_until(sub, lambda: status()["epoch"] == pub.epoch and status()["last_error"] is None)
    assert sub.view == {1: "a", 2: "B"}
    assert [(c.event, c.id) for c in changes.snapshot()[2:]] == [("update", 2)]


def test_with_a_checkpoint_store_sequence_numbers_continue_across_restarts_and_sigkill(
    stack: ExitStack, tmp_path: Path
) -> None:
    store = f"sqlite:///{tmp_path / 'feed.sqlite'}"
    first = publisher(stack, checkpoints=store, rows={"t": [[1, "a"]]})
    numbers = [first.seqnums["t"]]
    sub, changes = follow(stack, first.address, quiet_after=0.5, rpc_timeout=2.0, gap_timeout=0.1)
    assert sub.wait_synced(WAIT)
    numbers.append(first.publish("t", {1: "a", 2: "b"}))
    numbers.append(first.publish("t", {1: "a", 2: "b", 3: "c"}))
    assert numbers == [1, 2, 3]
    assert sub.wait_delivered(3, WAIT)
    first.stop()  # a clean stop saves the last number

    second = publisher(stack, address=first.address, checkpoints=store, rows={"t": [[1, "a"], [2, "B"]]})
    numbers.append(second.seqnums["t"])
    assert numbers[-1] == 4  # on from the last number
    wait_for_epoch(sub, changes, second.epoch, {1: "a", 2: "B"})
    assert sub.seqnum == 4
    numbers.append(second.publish("t", {1: "a", 2: "B", 4: "d"}))
    assert sub.wait_delivered(numbers[-1], WAIT)
    second.kill()  # SIGKILL: the block reserved at its first number is what the next start skips

    third = publisher(stack, address=first.address, checkpoints=store, rows={"t": [[4, "D"]]})
    numbers.append(third.seqnums["t"])
    assert numbers == sorted(set(numbers)), f"a sequence number was reused: {numbers}"
    assert numbers[-1] > 5
    wait_for_epoch(sub, changes, third.epoch, {4: "D"})
    assert sub.seqnum == numbers[-1]
    numbers.append(third.publish("t", {4: "D", 5: "e"}))
    assert sub.wait_delivered(numbers[-1], WAIT)
    assert numbers[-1] == numbers[-2] + 1
    log = changes.snapshot()
    assert replay(log) == sub.view == third.state("t")[1]
    assert_seqnums_never_go_back(log)


# -- 6. RPC errors ------------------------------------------------------------------------------------
def test_rpc_to_an_unknown_action_or_service_is_a_clear_error(stack: ExitStack) -> None:
    proc = publisher(stack, rows={"t": [[1, "a"]]})
    node = Node(None, peers=[proc.address], rpc_timeout=WAIT)
    caller = DataService("caller", node)
    caller.start()
    stack.callback(node.stop)
    stack.callback(caller.stop)

    assert caller.rpc("pub", "ping", {"x": [1, 2]}) == {"x": [1, 2]}
    assert caller.rpc("pub", "get_snapshot", {"table": "t"}) == [[1, "a"]]
    with pytest.raises(RpcError, match=r"service 'pub' has no action 'frobnicate' \(actions: .*ping") as exc:
        caller.rpc("pub", "frobnicate", timeout=2.0)
    assert not isinstance(exc.value, RpcTimeoutError)
    with pytest.raises(RpcError, match="has no action '_snapshot_text'"):
        caller.rpc("pub", "_snapshot_text", {"table": "t"})
    with pytest.raises(RpcError, match="no service 'ghost'") as exc:
        caller.rpc("ghost", "ping", timeout=2.0)
    assert not isinstance(exc.value, RpcTimeoutError)
    with pytest.raises(RpcError, match="bad arguments"):
        caller.rpc("pub", "get_snapshot", {"tabel": "t"})
    with pytest.raises(RpcError, match="ConfigurationError: a feed table name"):
        caller.rpc("pub", "get_snapshot", {"table": "a\x00b"})
    with pytest.raises(RpcError, match="kwargs must be a mapping"):
        caller.rpc("pub", "ping", ["x"])  # type: ignore[arg-type]

    # A service on the caller's own node: the same errors, without the network.
    local = DataService("local", node)
    local.start()
    stack.callback(local.stop)
    with pytest.raises(RpcError, match="service 'local' has no action 'frobnicate'"):
        caller.rpc("local", "frobnicate")
    local.stop()
    with pytest.raises(RpcError, match="no service 'local'"):
        caller.rpc("local", "ping", timeout=2.0)


def test_rpc_to_a_dead_service_times_out_naming_it(stack: ExitStack) -> None:
    proc = publisher(stack, rows={"t": [[1, "a"]]})
    node = Node(None, peers=[proc.address], rpc_timeout=60.0)
    caller = DataService("caller", node)
    caller.start()
    stack.callback(node.stop)
    stack.callback(caller.stop)
    assert caller.rpc("pub", "ping", {"n": 1}) == {"n": 1}  # the node now knows where "pub" lives
    proc.kill()

    started = time.monotonic()
    with pytest.raises(RpcTimeoutError, match="pub") as exc:
        caller.rpc("pub", "ping", {"n": 2}, timeout=0.5)
    assert proc.address in str(exc.value)
    assert time.monotonic() - started < 30, "the timeout given was not the one used (the node's is 60 s)"

    # A node that never reached the dead one: the same, within the timeout given.
    fresh = Node(None, peers=[proc.address], rpc_timeout=60.0)
    other = DataService("other", fresh)
    other.start()
    stack.callback(fresh.stop)
    stack.callback(other.stop)
    started = time.monotonic()
    with pytest.raises(RpcTimeoutError, match="pub") as exc:
        other.rpc("pub", "ping", timeout=0.5)
    assert proc.address in str(exc.value)
    assert time.monotonic() - started < 30, "the timeout given was not the one used (the node's is 60 s)"

    # subscribe() to nobody: a timeout naming the address, and nothing left running.
    with pytest.raises(RpcTimeoutError, match=proc.address.replace(".", r"\.")):
        subscribe(proc.address, "t", Changes(), rpc_timeout=0.5)


def test_a_subscription_to_a_publisher_that_died_reports_why(stack: ExitStack) -> None:
    proc = publisher(stack, rows={"t": [[1, "a"]]})
    sub, _ = follow(stack, proc.address, quiet_after=0.2, rpc_timeout=0.3)
    assert sub.wait_synced(WAIT)
    proc.kill()
    assert wait_until(sub, lambda: sub.status["subscriptions"]["pub:t"]["last_error"] is not None)
    assert "RpcTimeoutError" in sub.status["subscriptions"]["pub:t"]["last_error"]
    assert sub.view == {1: "a"}  # what it had stays


def test_a_publisher_dead_for_hours_is_still_asked_with_backoff(stack: ExitStack) -> None:
    # After 1024 failed fetches in a row (about 85 minutes at 5 s each) the backoff,
    # 0.1 * 2**failures, overflowed a float: the next try was never put off again, and the
    # dead publisher was asked at every check (50 ms), each failure logging an OverflowError.
    proc = publisher(stack, rows={"t": [[1, "a"]]})
    sub, _ = follow(stack, proc.address, quiet_after=0.2, rpc_timeout=0.3)
    assert sub.wait_synced(WAIT)
    proc.kill()
    with sub._lock:
        state = sub._subscriptions[("pub", "t")]
        state.failures = 2000  # as after hours of failures in a row
    began = time.monotonic()
    assert wait_until(sub, lambda: state.failures > 2000)
    assert began < state.retry_at <= time.monotonic() + reactive.feed.service.MAX_RETRY_BACKOFF
    assert "RpcTimeoutError" in (state.last_error or "")


# -- 7. malformed and oversized messages ------------------------------------------------------------
class Injector:
    """A receive filter that processes the messages it is given just before the next delta."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pending: list[list[bytes]] = []

    def inject(self, messages: list[list[bytes]]) -> None:
        with self.lock:
            self.pending.extend(messages)

    def __call__(self, frames: list[bytes]) -> list[list[bytes]]:
        if message_of(frames).get("kind") != "delta":
            return [frames]
        with self.lock:
            bad, self.pending = self.pending, []
        return [*bad, frames]


def test_malformed_messages_are_logged_dropped_and_the_subscriber_goes_on(
    stack: ExitStack, pub: DataService, pub_node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    pub.publish("t", {1: "a"})
    injector = Injector()
    sub, changes = follow(stack, pub_node.address, receive_filter=injector)
    assert sub.wait_synced(WAIT)
    name = topic("pub", "t")
    bad = [
        [name, b"{not json"],
        [name, b"\xff\xfe\x00"],
        [name, b"[1, 2]"],
        [name, delta_body(2, v=2)],
        [name, delta_body(-1)],
        [name, delta_body("2")],
        [name, delta_body(2.0)],
        [name, delta_body(True)],
        [name, delta_body(2, epoch=None)],
        [name, delta_body(2, kind="gossip")],
        [name, delta_body(2, changes=[["upsert", 1, "x"]])],
        [name, delta_body(2, changes=[["insert", 1]])],
        [name, delta_body(2, changes=[["insert", 1, {"$bytes": "not base64!"}]])],
        [name, delta_body(2, publisher="somebody else")],
        [name],
        [name, delta_body(2), b"a third frame"],
    ]
    injector.inject(bad)
    assert pub.publish("t", {1: "a", 2: "b"}) == 2
    assert sub.wait_delivered(2, WAIT)
    stats = sub.node.stats
    assert stats.malformed == len(bad)
    assert stats.last_dropped is not None and stats.last_dropped.startswith("malformed: a message of 3 frames")
    assert "the feed dropped" in caplog.text

    assert pub.publish("t", {2: "b"}) == 3
    assert sub.wait_delivered(3, WAIT)
    assert sub.view == pub.get_snapshot("t") == {2: "b"}
    assert replay(changes.snapshot()) == {2: "b"}
    status = sub.status["subscriptions"]["pub:t"]
    assert status["resubscriptions"] == 0 and status["deltas"] == 2 and status["duplicates"] == 0


def test_oversized_messages_are_dropped_and_the_subscriber_recovers(
    stack: ExitStack, pub: DataService, pub_node: Node
) -> None:
    pub.publish("t", {1: "a"})
    sub, changes = follow(stack, pub_node.address, max_message_bytes=4096, gap_timeout=0.1)
    assert sub.wait_synced(WAIT)

    # Raw frames on the publisher's own PUB socket: an oversized message, then a good delta.
    pub_node._send(topic("pub", "t"), delta_body(2, changes=[["insert", 9, "x" * 5000]]))
    assert pub.publish("t", {1: "a", 2: "b"}) == 2
    assert sub.wait_delivered(2, WAIT)
    assert sub.node.stats.oversized == 1
    assert sub.node.stats.last_dropped.startswith("oversized")
    assert sub.view == {1: "a", 2: "b"}

    # A real delta over the limit: lost to this subscriber, which resubscribes once it is gone.
    assert pub.publish("t", {1: "a", 2: "b", 3: "x" * 5000}) == 3
    assert pub.publish("t", {1: "a", 2: "b", 4: "d"}) == 4
    assert sub.wait_delivered(4, WAIT)
    assert sub.node.stats.oversized >= 2
    assert sub.view == pub.get_snapshot("t")
    assert replay(changes.snapshot()) == {1: "a", 2: "b", 4: "d"}
    assert sub.status["subscriptions"]["pub:t"]["resubscriptions"] >= 1


def test_malformed_rpc_requests_are_answered_or_dropped_and_the_node_goes_on(stack: ExitStack, pub_node: Node) -> None:
    pub_node.max_message_bytes = 4096
    context = zmq.Context()
    stack.callback(context.destroy, 0)
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(pub_node.address)

    def ask(*frames: bytes) -> dict[str, Any]:
        dealer.send_multipart(list(frames))
        assert dealer.poll(int(WAIT * 1000)), "no answer"
        request_id, body = dealer.recv_multipart()
        assert request_id == frames[0]
        return json.loads(body)

    assert ask(b"1", b"not json")["ok"] is False
    assert ask(b"2", json.dumps({"v": 7, "service": "__node__", "action": "services"}).encode()) == {
        "v": 1,
        "ok": False,
        "message": "not a reactive feed request",
    }
    answer = ask(b"3", json.dumps({"v": 1, "service": "__node__", "action": "x" * 5000}).encode())
    assert answer["ok"] is False and "over max_message_bytes" in answer["message"]
    dealer.send_multipart([b"only one frame"])  # dropped: nothing to answer to
    answer = ask(b"4", json.dumps({"v": 1, "service": "__node__", "action": "services", "kwargs": {}}).encode())
    assert answer["ok"] is True and answer["result"]["node_id"] == pub_node.node_id
    assert pub_node.stats.malformed == 1
    assert "RPC request of 1 frames" in pub_node.stats.last_dropped


# -- 8. stop() leaves nothing behind ---------------------------------------------------------------------
def test_stop_leaves_no_thread_and_no_socket_behind() -> None:
    def session() -> None:
        with ExitStack() as stack:
            node = Node(**FAST)
            node.start()
            stack.callback(node.stop)
            pub = DataService("pub", node)
            pub.start()
            pub.publish("t", {1: "a"})
            local = DataService("local", node)
            local.start()
            local.subscribe("pub", "t")
            sub, _ = follow(stack, node.address)
            assert sub.wait_synced(WAIT) and local.wait_synced(WAIT)
            pub.publish("t", {1: "a", 2: "b"})
            assert sub.wait_delivered(2, WAIT) and local.wait_delivered(2, WAIT)
            # The publisher's node: three threads; the subscriber's (no address): no server.
            assert len(reactive_threads()) == 5
            sub.close()
            assert sorted(t.name for t in reactive_threads()) == sorted(
                ["reactive-feed-server", "reactive-feed-receiver", "reactive-feed-fetcher"]
            )
            private = DataService("private")  # with a private node, started and stopped with it
            private.start()
            stack.callback(private.stop)
            private.publish("u", {1: 1})
            assert len(reactive_threads()) == 6
            private.stop()
            local.stop()
            pub.stop()
            node.stop()
            node.stop()  # twice: nothing more

    baseline_threads = set(threading.enumerate())
    before = open_fds()
    session()
    assert reactive_threads() == []
    assert open_fds() == before
    session()  # and again: the first one left nothing a second one trips on
    assert reactive_threads() == []
    assert open_fds() == before
    assert set(threading.enumerate()) == baseline_threads


def test_close_from_on_change_stops_the_subscription_and_leaves_nothing_behind(
    stack: ExitStack, pub: DataService, pub_node: Node
) -> None:
    pub.publish("t", {1: "a"})
    publishers = set(reactive_threads())
    before = open_fds()
    outcome: list[str] = []
    closed = threading.Event()

    def stop_at_the_first_update(change: Change) -> None:
        if change.event == "update":
            try:
                sub.close()
                outcome.append("closed")
            except BaseException as exc:  # what close() raised on its own thread
                outcome.append(repr(exc))
            closed.set()

    sub = subscribe(pub_node.address, "t", stop_at_the_first_update, **FAST)
    stack.callback(sub.close)
    assert sub.wait_synced(WAIT)
    subscriber_threads = set(reactive_threads()) - publishers
    pub.publish("t", {1: "b"})
    assert closed.wait(WAIT)
    assert outcome == ["closed"]
    for thread in subscriber_threads:  # the receiver ends once its callback returned
        thread.join(WAIT)
    assert set(reactive_threads()) == publishers
    assert open_fds() == before
    assert pub.publish("t", {1: "c"}) == 3  # the publisher goes on


def test_stop_while_fetching_from_a_dead_publisher_leaves_nothing_behind(stack: ExitStack) -> None:
    proc = publisher(stack, rows={"t": [[1, "a"]]})
    before = open_fds()
    sub = subscribe(proc.address, "t", Changes(), quiet_after=0.1, rpc_timeout=1.0, heartbeat_interval=0.05)
    assert sub.wait_synced(WAIT)
    proc.kill()
    # Resubscriptions to nobody: the fetcher is waiting on RPCs that will not be answered.
    assert wait_until(sub, lambda: sub.status["subscriptions"]["pub:t"]["last_error"] is not None)
    sub.close()
    assert reactive_threads() == []
    assert open_fds() == before


def test_a_node_can_be_stopped_and_started_again() -> None:
    node = Node(**FAST)
    node.start()
    node.start()  # twice: nothing more
    assert len(reactive_threads()) == 3
    pub = DataService("pub", node)
    pub.start()
    pub.stop()
    node.stop()
    assert not node.running and reactive_threads() == []
    with node:
        assert node.running and node.address is not None
        pub = DataService("pub", node)
        pub.start()
        pub.publish("t", {1: "a"})
        assert node.rpc("pub", "get_snapshot", {"table": "t"}) == [[1, "a"]]
        with subscribe(node.address, "t", Changes(), **FAST) as sub:
            assert sub.wait_synced(WAIT) and sub.view == {1: "a"}
        pub.stop()
    assert not node.running and reactive_threads() == []


# -- bad inputs ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "address",
    ["http://127.0.0.1:5", "tcp://127.0.0.1", "tcp://127.0.0.1:port", "tcp://:5", "ipc://", "127.0.0.1:5", "", None],
)
def test_bad_addresses_are_refused_with_the_address_in_the_message(address: Any) -> None:
    message = f"a feed address is tcp://host:port or ipc://path, not {address!r}"
    with pytest.raises(ConfigurationError, match=re.escape(message)):
        reactive.feed.node.check_address(address)
    if address is not None:
        with pytest.raises(ConfigurationError, match="a feed address"):
            Node(address)
        with pytest.raises(ConfigurationError, match="a feed address"):
            Node(peers=[address])
        with pytest.raises(ConfigurationError, match="a feed address"):
            subscribe(address, "t", Changes())
    assert reactive_threads() == []


@pytest.mark.parametrize(
    ("address", "why"),
    [
        ("tcp://user:s3cret@127.0.0.1:5999", "'tcp://user:***@127.0.0.1:5999': ZMQ takes no user or password"),
        (" tcp://127.0.0.1:5999", "spaces around it or control characters in it"),
        ("tcp://127.0.0.1:5999\n", "spaces around it or control characters in it"),
        ("tcp://127.0.0.1:5999/x", "ZMQ takes no path, query or fragment"),
        ("tcp://127.0.0.1:5999?k=v", "ZMQ takes no path, query or fragment"),
    ],
)
def test_addresses_zmq_would_refuse_are_refused_up_front_without_the_password(address: str, why: str) -> None:
    # ZMQ refused each of these inside subscribe(), with the password in its message.
    for start in (
        lambda: reactive.feed.node.check_address(address),
        lambda: subscribe(address, "t", Changes(), rpc_timeout=0.5),
        lambda: Node(address),
        lambda: Node(peers=[address]),
    ):
        with pytest.raises(ConfigurationError, match=re.escape(why)) as refused:
            start()
        assert "s3cret" not in str(refused.value)
    assert reactive_threads() == []


def test_a_node_that_fails_to_start_leaves_no_thread_and_no_socket_behind() -> None:
    too_long = "ipc:///tmp/" + "x" * 200  # a feed address, but longer than a Unix socket's path can be
    before = open_fds()
    for start in (
        Node(None, peers=[too_long]).start,
        Node(too_long).start,
        lambda: subscribe(too_long, "t", Changes()),
    ):
        with pytest.raises(ConfigurationError, match=r"the feed cannot (connect to|listen at) ipc:///tmp/x+: File"):
            start()
        assert reactive_threads() == []
    assert open_fds() == before


def test_bad_node_options_and_a_taken_address_are_refused(pub_node: Node) -> None:
    with pytest.raises(ConfigurationError, match="heartbeat_interval must be a number of seconds above 0"):
        Node(heartbeat_interval=0)
    with pytest.raises(ConfigurationError, match="rpc_timeout must be a number of seconds above 0"):
        Node(rpc_timeout=-1)
    with pytest.raises(ConfigurationError, match="max_message_bytes must be a whole number of at least 1024"):
        Node(max_message_bytes=100)
    # Each of these was taken and failed (or spun) inside a feed thread: an infinite rpc_timeout
    # or check_interval overflowed ZMQ's poll in milliseconds, a NaN compared false with every
    # time, text failed the first comparison, a bool passed as a number.
    for option, value in (
        ("rpc_timeout", math.inf),
        ("check_interval", math.inf),
        ("check_interval", "0.05"),
        ("heartbeat_interval", True),
        ("quiet_after", math.nan),
        ("peer_timeout", math.inf),
        ("peer_timeout", 0),
    ):
        with pytest.raises(ConfigurationError, match=f"{option} must be a (finite )?number of seconds above 0"):
            Node(**{option: value})
    for value in (-1, 2.5, "5", math.inf):
        with pytest.raises(ConfigurationError, match="hwm must be a whole number of at least 0"):
            Node(hwm=value)
    for options, message in (
        ({"gap_timeout": math.nan}, "gap_timeout must be a number of seconds above 0"),
        ({"gap_timeout": "1"}, "gap_timeout must be a number of seconds above 0"),
        ({"max_delta_rows": "10"}, "max_delta_rows must be a whole number of at least 0"),
        ({"max_delta_rows": -1}, "max_delta_rows must be a whole number of at least 0"),
        ({"unpublished_timeout": 0}, "unpublished_timeout must be a number of seconds above 0"),
        ({"unpublished_timeout": math.nan}, "unpublished_timeout must be a number of seconds above 0"),
        ({"will_publish": True}, "will_publish must be callable, not bool"),
    ):
        with pytest.raises(ConfigurationError, match=message):
            DataService("svc", **options)
    taken = Node(pub_node.address)
    with pytest.raises(ConfigurationError, match=f"the feed cannot listen at {pub_node.address}"):
        taken.start()
    assert not taken.running
    with pytest.raises(ConfigurationError, match="not started"):
        taken.fetch_snapshot(DataService("x"), "pub", "t")
    assert sorted(t.name for t in reactive_threads()) == sorted(
        ["reactive-feed-server", "reactive-feed-receiver", "reactive-feed-fetcher"]
    )


def test_bad_names_data_and_events_are_refused(stack: ExitStack, pub: DataService, pub_node: Node) -> None:
    for name in ["", "a\x00b", "x" * 257, 7, None]:
        with pytest.raises(ConfigurationError, match="a feed service name must be a non-empty str"):
            DataService(name, pub_node)  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError, match="a feed table name must be a non-empty str"):
            pub.publish(name, {})  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError, match="a feed table name must be a non-empty str"):
            pub.subscribe("pub", name)  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError, match="a feed table name must be a non-empty str"):
            subscribe(pub_node.address, name, Changes())  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="NUL"):
        pub.publish("t\x00", {1: 1})

    for data in ([("insert", 1, 2)], "rows", 42, None):
        with pytest.raises(ConfigurationError, match="with use_snapshot=True data is a mapping of row id to value"):
            pub.publish("t", data)
    with pytest.raises(ConfigurationError, match=r"unknown event 'merge' \(insert, update, upsert, delete\)"):
        pub.publish("t", [("merge", 1, 2)], use_snapshot=False)
    with pytest.raises(ConfigurationError, match=r"each change is \(event, id, value\), not \(1, 2\)"):
        pub.publish("t", [(1, 2)], use_snapshot=False)
    with pytest.raises(ConfigurationError, match="already has a service 'pub'"):
        DataService("pub", pub_node).start()
    with pytest.raises(ConfigurationError, match="on_change must be callable, not str"):
        subscribe(pub_node.address, "t", "print")  # type: ignore[arg-type]
    assert pub.published_tables() == []  # nothing was published by any of it

    idle = DataService("idle", pub_node)
    with pytest.raises(ConfigurationError, match="service 'idle' is not started: call start\\(\\) first"):
        idle.rpc("pub", "ping")
    with pytest.raises(ConfigurationError, match="service 'idle' is not started"):
        idle.subscribe("pub", "t")
    assert idle.subscription_list() == []  # a refused subscribe leaves nothing behind
    idle.start()
    stack.callback(idle.stop)
    with pytest.raises(RpcError, match="no service 'nobody'"):
        idle.subscribe("nobody", "t")
    assert idle.subscription_list() == []
    pub.publish("t", {1: "a"})
    idle.subscribe("pub", "t")  # and a subscribe that is allowed now works
    assert idle.wait_synced(WAIT) and idle.subscription_list() == [("pub", "t")]


def test_subscribe_names_the_service_when_it_cannot_choose(stack: ExitStack, pub: DataService, pub_node: Node) -> None:
    other = DataService("other", pub_node)
    other.start()
    stack.callback(other.stop)
    pub.publish("t", {1: "pub's"})
    other.publish("t", {1: "other's"})
    with pytest.raises(RpcError, match=r"several services at .* publish 't' \(other, pub\): pass service="):
        subscribe(pub_node.address, "t", Changes())
    with pytest.raises(RpcError, match=r"no service at .* publishes 'u' \(services: other, pub\)"):
        subscribe(pub_node.address, "u", Changes())
    with pytest.raises(RpcError, match=r"no service 'ghost' at .* \(services: other, pub\)"):
        subscribe(pub_node.address, "t", Changes(), service="ghost")
    sub, _ = follow(stack, pub_node.address, service="other")
    assert sub.wait_synced(WAIT) and sub.view == {1: "other's"}
    assert len(reactive_threads()) == 5  # the failed ones stopped their nodes: these are pub_node and sub


def test_a_table_never_published_ends_the_subscription_naming_those_that_are(stack: ExitStack) -> None:
    # A misspelt table (on a node with one service) was "not published yet" for ever: the
    # subscription took an empty snapshot (as it still does: a table published later is
    # followed from it), then asked again every few seconds, each time with a warning, and
    # never failed: a wait for its first change never ended.
    proc = publisher(stack, rows={"docs": [[1, "a"]], "len__text": [[1, 1]]})
    misspelt, changes = follow(stack, proc.address, table="len__txet", unpublished_timeout=0.5)
    began = time.monotonic()
    with pytest.raises(reactive.feed.TableNotPublishedError) as raised:
        misspelt.wait_delivered(1, WAIT)
    assert time.monotonic() - began < WAIT / 2
    error = raised.value
    assert re.fullmatch(
        r"pub at tcp://127\.0\.0\.1:\d+ publishes no table 'len__txet' \(it publishes: docs, len__text; did you "
        r"mean 'len__text'\?\), and did not for 0\.5 s: check the name \(a table published later must come "
        r"within unpublished_timeout\)",
        str(error),
    )
    assert isinstance(error, reactive.feed.FeedConfigurationError) and not reactive.feed.resumable(error)
    assert (error.publisher, error.table, error.published) == ("pub", "len__txet", ["docs", "len__text"])
    assert misspelt.error is error and misspelt.view == {} and changes.snapshot() == []
    assert misspelt.status["subscriptions"]["pub:len__txet"]["last_error"].startswith("TableNotPublishedError: ")
    with pytest.raises(reactive.feed.TableNotPublishedError):
        misspelt.wait_synced(WAIT)

    cased, _ = follow(stack, proc.address, table="Docs", unpublished_timeout=0.5)
    with pytest.raises(reactive.feed.TableNotPublishedError, match=r"did you mean 'docs'\? \(names are taken as"):
        cased.wait_delivered(1, WAIT)

    # A table published within the time is followed.
    later, later_changes = follow(stack, proc.address, table="later", unpublished_timeout=WAIT * 3)
    assert later.wait_synced(WAIT) and later.view == {}
    last = proc.publish("later", {1: "x", 2: "y"})
    assert later.wait_delivered(last, WAIT) and later.view == {1: "x", 2: "y"} and later.error is None
    assert replay(later_changes.snapshot()) == {1: "x", 2: "y"}


def test_values_that_cannot_be_encoded_are_refused_and_nothing_is_published(
    stack: ExitStack, pub: DataService, pub_node: Node
) -> None:
    pub.publish("t", {1: "a"})
    sub, changes = follow(stack, pub_node.address)
    assert sub.wait_synced(WAIT)
    for value in (object(), complex(1, 2), {1: object()}, [lambda: 1], np.array([object()])):
        with pytest.raises(FeedEncodeError, match="cannot be published"):
            pub.publish("t", {1: "a", 2: value})
        with pytest.raises(TypeError):  # FeedEncodeError is a TypeError too
            pub.publish("t", [("insert", 3, value)], use_snapshot=False)
    with pytest.raises(FeedEncodeError, match="a value of type object"):
        pub.publish("t", [("insert", object(), 1)], use_snapshot=False)
    assert pub.get_last_published_data_with_seqnum("t") == (1, {1: "a"})
    assert pub.publish("t", {1: "a", 2: "b"}) == 2
    assert sub.wait_delivered(2, WAIT)
    assert [(c.event, c.id, c.seqnum) for c in changes.snapshot()] == [("snapshot", 1, 1), ("insert", 2, 2)]


def test_what_json_or_python_cannot_carry_is_refused_at_publish_and_registers_nothing(
    pub: DataService, pub_node: Node
) -> None:
    deep: list[Any] = []
    for _ in range(10_000):
        deep = [deep]
    for value, message in (
        (10**5000, "Exceeds the limit"),
        ({"n": [10**5000]}, "Exceeds the limit"),
        (deep, "nested too deeply"),
    ):
        with pytest.raises(FeedEncodeError, match=message):
            pub.publish("t", {1: value})
        with pytest.raises(FeedEncodeError, match=message):
            pub.publish("t", [("insert", 1, value)], use_snapshot=False)
    with pytest.raises(FeedEncodeError, match="Exceeds the limit"):
        pub.publish("t", {10**5000: "a huge id"})
    with pytest.raises(ConfigurationError, match="without NUL or lone surrogates"):
        pub.publish("t\ud800", {1: "a"})
    for data in (5, None, "rows", {1: "a"}):
        with pytest.raises(
            ConfigurationError, match=r"use_snapshot=False\): data is an iterable of \(event, id, value\), not"
        ):
            pub.publish("t", data, use_snapshot=False)
    assert pub.published_tables() == []
    with pytest.raises(ConfigurationError, match=r"node must be a reactive\.feed\.Node .*, not str"):
        DataService("x", node="tcp://127.0.0.1:5560")  # type: ignore[arg-type]


def test_a_set_equal_to_the_one_published_is_no_change(stack: ExitStack, pub: DataService, pub_node: Node) -> None:
    # Equal sets iterate in different orders (the order of insertion where hashes collide, the
    # process's hash seed for text), and a set's wire text followed that order: republishing an
    # equal set was an "update" for every subscriber, and a resync saw one too.
    first, again = {1, 9}, {9, 1}
    assert first == again and list(first) != list(again)  # hash(1) and hash(9) collide in a small set
    rows = {1: first, 2: frozenset(first), 3: {"tags": first, "nested": {frozenset(first)}}}
    equal = {1: again, 2: frozenset(again), 3: {"tags": again, "nested": {frozenset(again)}}}
    seqnum = pub.publish("t", rows)
    sub, changes = follow(stack, pub_node.address)
    assert sub.wait_synced(WAIT)
    assert pub.publish("t", equal) == seqnum  # nothing changed: no delta, the number stays
    assert pub.publish("t", [("update", 1, again), ("upsert", 2, frozenset(again))], use_snapshot=False) == seqnum
    assert wire.dumps(first) == wire.dumps(again) and wire.same_on_the_wire(first, again)
    assert sub.check_resub_all(quiet_after=0) == [("pub", "t")]
    assert wait_until(sub, lambda: sub.status["subscriptions"]["pub:t"]["resubscriptions"] == 1)
    last = pub.publish("t", {**equal, 4: {2}})  # a real change goes through, alone
    assert sub.wait_delivered(last, WAIT)
    events = [(c.event, c.id) for c in changes.snapshot()]
    assert events == [("snapshot", 1), ("snapshot", 2), ("snapshot", 3), ("insert", 4)]
    assert sub.view == {**rows, 4: {2}}


def test_sets_in_sets_and_as_dict_keys_arrive_as_frozensets(stack: ExitStack, pub: DataService, pub_node: Node) -> None:
    # Published, but no subscriber could decode them (a set is unhashable): each retried forever.
    rows = {
        1: {frozenset({1, 2}), frozenset()},
        2: {frozenset({"a"}): "x", (frozenset({1}), 2): "y"},
        3: {(1, (2, frozenset({3})))},
    }
    pub.publish("t", rows)
    sub, changes = follow(stack, pub_node.address)
    assert sub.wait_synced(WAIT)
    assert sub.view == rows and sub.status["subscriptions"]["pub:t"]["last_error"] is None
    assert pub.publish("t", {**rows, 4: {frozenset({4})}}) == 2  # and in a delta
    assert sub.wait_delivered(2, WAIT)
    assert changes.snapshot()[-1].value == {frozenset({4})}
    assert wire.loads(wire.dumps({frozenset({1}): {frozenset({2})}})) == {frozenset({1}): {frozenset({2})}}


class FrozenMapping(Mapping):
    """A hashable mapping, as ``frozendict`` and ``immutabledict`` are."""

    def __init__(self, **items: Any) -> None:
        self._items = dict(items)

    def __getitem__(self, key: str) -> Any:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(frozenset(self._items.items()))


def test_hashable_mappings_in_sets_and_as_dict_keys_arrive_hashable(
    stack: ExitStack, pub: DataService, pub_node: Node
) -> None:
    # Published as JSON objects, they arrived as dicts, which no set holds and no dict is keyed by:
    # the snapshot failed for ever (the whole table), a delta was dropped as malformed.
    rows = {
        1: {FrozenMapping(a=1), FrozenMapping(b=(2, frozenset({3})))},
        2: {FrozenMapping(k="v"): "x", (FrozenMapping(n=1), 2): "y"},
        3: frozenset({DocumentId({"a": 1})}),
    }
    assert wire.dumps({FrozenMapping(a=1)}) == '{"$set":[{"a":1}]}'  # a JSON object, as any mapping
    pub.publish("t", rows)
    sub, changes = follow(stack, pub_node.address)
    assert sub.wait_synced(WAIT) and sub.status["subscriptions"]["pub:t"]["last_error"] is None
    view = sub.view
    # Each arrives as a DocumentId (a dict that hashes) of hashable values, equal to what was sent.
    assert view[1] == {DocumentId({"a": 1}), DocumentId({"b": (2, frozenset({3}))})}
    assert sorted(map(dict, view[1]), key=str) == sorted(map(dict, rows[1]), key=str)
    assert view[2] == {DocumentId({"k": "v"}): "x", (DocumentId({"n": 1}), 2): "y"}
    assert list(view[2]) == list(rows[2]) and view[3] == {DocumentId({"a": 1})}
    assert pub.publish("t", {**rows, 4: {FrozenMapping(d=4)}}) == 2  # and in a delta
    assert sub.wait_delivered(2, WAIT)
    assert changes.snapshot()[-1].value == {DocumentId({"d": 4})}
    assert sub.node.stats.malformed == 0 and sub.status["subscriptions"]["pub:t"]["resubscriptions"] == 0


def test_a_table_with_document_ids_can_be_followed(stack: ExitStack, pub: DataService, pub_node: Node) -> None:
    pub.publish("t", [("insert", {"a": 1}, "x"), ("insert", 2, "y")], use_snapshot=False)
    sub, changes = follow(stack, pub_node.address)
    status = lambda: sub.status["subscriptions"]["pub:t"]  # noqa: E731
    assert wait_until(sub, lambda: status()["seqnum"] is not None or status()["last_error"] is not None)
    assert status()["last_error"] is None
    assert sub.wait_synced(WAIT)
    assert sorted((c.event, repr(c.id)) for c in changes.snapshot()) == [("snapshot", "2"), ("snapshot", "{'a': 1}")]
    # Deltas of a document id reach the same row of the view.
    seqnum = pub.publish("t", [("update", {"a": 1}, "x2"), ("delete", 2, None)], use_snapshot=False)
    assert sub.wait_delivered(seqnum, WAIT)
    assert sub.view == {DocumentId({"a": 1}): "x2"}


def test_a_table_with_set_ids_can_be_followed(stack: ExitStack, pub: DataService, pub_node: Node) -> None:
    # A frozenset id arrived as a set, which cannot key the snapshot: it failed for ever.
    pub.publish("t", {frozenset({1, 2}): "a", (1, frozenset({"x"})): "b", 3: "c"})
    sub, _ = follow(stack, pub_node.address)
    assert sub.wait_synced(WAIT) and sub.status["subscriptions"]["pub:t"]["last_error"] is None
    assert sub.view == {frozenset({1, 2}): "a", (1, frozenset({"x"})): "b", 3: "c"}
    seqnum = pub.publish("t", [("update", frozenset({2, 1}), "a2"), ("insert", {4}, "d")], use_snapshot=False)
    assert sub.wait_delivered(seqnum, WAIT)
    assert sub.view == {frozenset({1, 2}): "a2", (1, frozenset({"x"})): "b", 3: "c", frozenset({4}): "d"}


def test_on_change_errors_are_counted_and_delivery_goes_on(stack: ExitStack, pub: DataService, pub_node: Node) -> None:
    seen: list[Any] = []

    def fragile(change: Change) -> None:
        seen.append(change.id)
        if change.id == 2:
            raise ValueError("boom")

    pub.publish("t", {1: "a"})
    sub = subscribe(pub_node.address, "t", fragile, **FAST)
    stack.callback(sub.close)
    assert sub.wait_synced(WAIT)
    pub.publish("t", {1: "a", 2: "b"})
    pub.publish("t", {1: "a", 2: "b", 3: "c"})
    assert sub.wait_delivered(3, WAIT)
    assert seen == [1, 2, 3] and sub.callback_errors == 1
    assert sub.view == {1: "a", 2: "b", 3: "c"}


# -- the wire ------------------------------------------------------------------------------------------
def same(a: Any, b: Any) -> bool:
    """Equal, with NaN equal to NaN and types compared too."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if type(a) is not type(b):
        return False
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    return a == b


UTC = dt.UTC
ROUND_TRIPS = [
    (dt.datetime(2026, 11, 26, 10, 0, tzinfo=UTC), None),
    (dt.datetime(2026, 11, 26, 10, 0, 1, 123456, tzinfo=dt.timezone(dt.timedelta(hours=-5))), None),
    (dt.datetime(2026, 1, 2, 3, 4, 5, 6), None),
    (dt.date(2026, 11, 26), None),
    (dt.time(10, 30, 1, 5), None),
    (dt.timedelta(days=-1, seconds=7203, microseconds=500001), None),
    (dt.timedelta(days=999_999_999), None),
    (decimal.Decimal("12.50"), None),
    (decimal.Decimal("-1E+3"), None),
    (decimal.Decimal("0.1000000000000000000000000001"), None),
    (b"\x00\xff\x10bytes", None),
    (bytearray(b"ab"), b"ab"),
    (uuid.UUID("12345678-1234-5678-1234-567812345678"), None),
    (ObjectId("65f0a1b2c3d4e5f607182930"), None),
    (float("nan"), None),
    (float("inf"), None),
    (float("-inf"), None),
    (np.array([0.1, 1.5, -2.25, 3e38], dtype=np.float32), [float(x) for x in np.float32([0.1, 1.5, -2.25, 3e38])]),
    (np.array([0.1, 1e-300, float("nan"), -0.0]), [0.1, 1e-300, float("nan"), -0.0]),
    ([0.1, 0.2, 0.3, 1e-300, 1e300, -0.0, 2.5, 1 / 3], None),
    ([0.1, 0.2, 0.3], None),
    ([1.0, 2, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0], None),
    ({"$ref": 1, "$id": {"$oid": "x"}}, None),
    ({"$vector": "AAAA", "dtype": "f4"}, None),
    ({"$float": "nan"}, None),
    ({1: "one", 2: "two"}, None),
    ({(1, "a"): "tuple key", None: 0, 2.5: "float key"}, None),
    ({"nested": [{"a": {1: [b"x", dt.date(2020, 1, 1)]}}], "plain": True}, None),
    ({1, 2, "three"}, None),
    (frozenset({4}), {4}),
    ((1, "a", None), [1, "a", None]),
    (np.int64(5), 5),
    (np.float32(0.5), 0.5),
    (np.bool_(True), True),
    (2**70, None),
    ("\x00 NUL and ünïcödé \U0001f600", None),
    ({"a": 1, "b": 2}, None),
]


@pytest.mark.parametrize(("value", "expected"), ROUND_TRIPS, ids=[repr(v)[:40] for v, _ in ROUND_TRIPS])
def test_wire_round_trips_tagged_values(value: Any, expected: Any) -> None:
    expected = value if expected is None else expected
    text = wire.dumps(value)
    json.loads(text)  # plain RFC 8259 JSON: no NaN, no Infinity
    assert "NaN" not in text and "Infinity" not in text
    back = wire.loads(text)
    assert same(back, expected), f"{value!r} came back as {back!r}"
    assert same(wire.loads(wire.dumps(back)), back)


def test_wire_encodings_are_the_documented_ones() -> None:
    assert wire.dumps(float("nan")) == '{"$float":"nan"}'
    assert wire.dumps(decimal.Decimal("1.10")) == '{"$decimal":"1.10"}'
    assert wire.dumps(dt.timedelta(days=1, seconds=3.5)) == '{"$timedelta":86403500000}'
    assert wire.dumps(ObjectId("65f0a1b2c3d4e5f607182930")) == '{"$oid":"65f0a1b2c3d4e5f607182930"}'
    assert wire.dumps({"$x": 1}) == '{"$dict":[["$x",1]]}'
    assert wire.dumps({1: 2}) == '{"$dict":[[1,2]]}'
    assert json.loads(wire.dumps(np.zeros(3, dtype=np.float32))) == {"$vector": "AAAAAAAAAAAAAAAA", "dtype": "f4"}
    assert json.loads(wire.dumps([0.5] * 8))["dtype"] == "f8"
    assert wire.dumps([0.5] * 7) == "[" + ",".join(["0.5"] * 7) + "]"


@pytest.mark.parametrize(
    "text",
    [
        "{",
        b"\xff",
        '{"$bytes": "not base64!"}',
        '{"$float": "1.5"}',
        '{"$oid": "zz"}',
        '{"$dict": 5}',
        '{"$vector": "AAA=", "dtype": "f4"}',
        '{"$vector": "AAAA", "dtype": "f2"}',
        '{"$date": "tomorrow"}',
        '{"$decimal": "twelve"}',
        '{"$timedelta": "1 day"}',
        '{"$timedelta": 1.5}',
    ],
)
def test_wire_refuses_malformed_text(text: str | bytes) -> None:
    with pytest.raises(FeedDecodeError):
        wire.loads(text)


def test_tagged_values_travel_through_snapshots_deltas_and_rpcs(
    stack: ExitStack, pub: DataService, pub_node: Node
) -> None:
    values = {f"v{n}": value for n, (value, _) in enumerate(ROUND_TRIPS)}
    expected = {f"v{n}": value if e is None else e for n, (value, e) in enumerate(ROUND_TRIPS)}
    ids = [1, "text", (1, "a"), uuid.UUID(int=5), dt.date(2020, 1, 1), b"raw", ObjectId("65f0a1b2c3d4e5f607182930")]
    half = dict(list(values.items())[: len(values) // 2])
    pub.publish("t", {**half, **{i: n for n, i in enumerate(ids)}})
    sub, _ = follow(stack, pub_node.address)
    assert sub.wait_synced(WAIT)  # the first half (and the odd ids) in the snapshot...
    last = pub.publish("t", {**values, **{i: n for n, i in enumerate(ids)}})
    assert sub.wait_delivered(last, WAIT)  # ...the rest in a delta
    view = sub.view
    for v_id, value in expected.items():
        assert same(view[v_id], value), f"{values[v_id]!r} arrived as {view[v_id]!r}"
    for n, i in enumerate(ids):
        assert view[i] == n
    assert (1, "a") in view

    caller_node = Node(None, peers=[pub_node.address])
    stack.callback(caller_node.stop)
    caller = DataService("caller", caller_node)
    caller.start()
    stack.callback(caller.stop)
    answer = caller.rpc("pub", "get_last_published_data_with_seqnum", {"table": "t"})
    assert answer["epoch"] == pub.epoch and answer["seqnum"] == last
    rpc_rows = dict((tuple(k) if isinstance(k, list) else k, v) for k, v in answer["data"])
    assert rpc_rows.keys() == view.keys()
    assert all(same(rpc_rows[k], view[k]) for k in view)
    assert caller.rpc("pub", "ping", {"when": dt.date(2026, 1, 1), "n": float("inf")}) == {
        "when": dt.date(2026, 1, 1),
        "n": float("inf"),
    }


# -- the seed's API ---------------------------------------------------------------------------------------
def test_data_service_info_round_trips_and_describes_the_service(
    stack: ExitStack, pub: DataService, pub_node: Node
) -> None:
    info = DataServiceInfo("svc", "node-1", ["a", "b"], [["other", "t"]], [{"name": "E", "actions": ["ping"]}])
    assert DataServiceInfo.from_json(info.to_json()) == info
    assert DataServiceInfo.from_dict(info.to_dict()) == info
    assert json.loads(info.to_json())["published_tables"] == ["a", "b"]
    assert set(info.to_dict()) == DataServiceInfo.MARSHALL_ATTRS
    assert DataServiceInfo.from_json("{}") == DataServiceInfo()
    with pytest.raises(ConfigurationError, match="unknown DataServiceInfo fields: colour"):
        DataServiceInfo.from_dict({"service_id": "s", "colour": "red"})
    with pytest.raises(ConfigurationError, match="a DataServiceInfo is a mapping, not list"):
        DataServiceInfo.from_dict([])  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="not a DataServiceInfo"):
        DataServiceInfo.from_json("{")

    pub.publish("t", {1: "a"})
    pub.publish("u", {})
    local = DataService("local", pub_node)
    local.start()
    stack.callback(local.stop)
    local.subscribe("pub", "t")
    assert local.wait_synced(WAIT)
    assert pub.info.published_tables == ["t", "u"]
    assert pub.info.node_id == pub_node.node_id and pub.info.service_id == "pub"
    assert local.info.subscribed_tables == [["pub", "t"]]
    endpoints = pub.info.rpc_endpoints_info
    assert endpoints[0]["name"] == "DataServiceEndPoints"
    assert {"get_snapshot", "get_last_published_data_with_seqnum", "ping"} <= set(endpoints[0]["actions"])
    assert DataServiceInfo.from_json(pub.info.to_json()) == pub.info

    # What the node tells other nodes is the same description.
    other = Node(None, peers=[pub_node.address])
    other.start()
    stack.callback(other.stop)
    services = other.refresh_peer(pub_node.address)
    assert DataServiceInfo.from_dict(services["pub"]) == pub.info
    assert DataServiceInfo.from_dict(services["local"]) == local.info


def test_subscriber_list_and_subscription_list(stack: ExitStack, pub: DataService, pub_node: Node) -> None:
    pub.publish("t", {1: "a"})
    pub.publish("u", {2: "b"})
    assert pub.subscriber_list() == []
    local = DataService("local", pub_node)
    local.start()
    stack.callback(local.stop)
    local.subscribe("pub", "t")
    local.subscribe("pub", "u")
    local.subscribe("pub", "u")  # twice: once
    remote, _ = follow(stack, pub_node.address, table="t")
    assert local.wait_synced(WAIT) and remote.wait_synced(WAIT)
    assert local.subscription_list() == [("pub", "t"), ("pub", "u")]
    assert remote.subscription_list() == [("pub", "t")]
    assert pub.subscriber_list() == sorted([("local", "t"), ("local", "u"), (remote.service_id, "t")])

    local.unsubscribe("pub", "u")
    assert local.subscription_list() == [("pub", "t")]
    assert pub.subscriber_list() == sorted([("local", "t"), (remote.service_id, "t")])
    remote.close()
    assert pub.subscriber_list() == [("local", "t")]
    local.stop()
    assert pub.subscriber_list() == [] and local.subscription_list() == []


def test_get_snapshot_and_get_last_published_data_with_seqnum(stack: ExitStack, pub: DataService) -> None:
    assert pub.get_snapshot("t") == {}
    assert pub.get_last_published_data_with_seqnum("t") == (0, {})
    pub.publish("t", {1: "a", (2, "x"): {"b": [1, 2]}})
    pub.publish("t", [("update", 1, "A"), ("insert", 3, None)], use_snapshot=False)
    assert pub.get_snapshot("t") == {1: "A", (2, "x"): {"b": [1, 2]}, 3: None}
    seqnum, data = pub.get_last_published_data_with_seqnum("t")
    assert seqnum == 2 and data == pub.get_snapshot("t")
    data[4] = "not theirs"
    assert 4 not in pub.get_snapshot("t")  # a copy

    node = Node(None, peers=[pub.node.address])
    stack.callback(node.stop)
    caller = DataService("caller", node)
    caller.start()
    stack.callback(caller.stop)
    assert caller.rpc("pub", "get_snapshot", {"table": "t"}) == [[1, "A"], [[2, "x"], {"b": [1, 2]}], [3, None]]
    assert caller.rpc("pub", "get_last_published_data_with_seqnum", {"table": "t"}) == {
        "epoch": pub.epoch,
        "seqnum": 2,
        "published": True,
        "data": [[1, "A"], [[2, "x"], {"b": [1, 2]}], [3, None]],
    }
    # A table not published (yet) says so: an empty one would be taken for the table. It says
    # which are, and whether this one will be (a plain DataService cannot say).
    assert caller.rpc("pub", "get_last_published_data_with_seqnum", {"table": "u"}) == {
        "epoch": pub.epoch,
        "seqnum": 0,
        "published": False,
        "data": [],
        "tables": ["t"],
        "will_publish": None,
    }
    assert caller.rpc("pub", "get_snapshot", {"table": "u"}) == []


def test_check_resub_all_on_a_quiet_subscription(stack: ExitStack, pub: DataService, pub_node: Node) -> None:
    pub.publish("t", {1: "a", 2: "b"})
    sub, changes = follow(stack, pub_node.address, quiet_after=WAIT * 6)
    assert sub.wait_synced(WAIT)
    assert sub.check_resub_all() == []  # heard from: nothing to do
    assert sub.status["subscriptions"]["pub:t"]["resubscriptions"] == 0

    assert sub.check_resub_all(quiet_after=0) == [("pub", "t")]  # everything is quiet after 0 s
    assert wait_until(sub, lambda: sub.status["subscriptions"]["pub:t"]["resubscriptions"] == 1)
    assert sub.view == {1: "a", 2: "b"} and sub.seqnum == 1
    assert [c.event for c in changes.snapshot()] == ["snapshot", "snapshot"]  # nothing changed: nothing sent

    pub.publish("t", {1: "a", 2: "B"})
    assert sub.wait_delivered(2, WAIT)
    assert changes.snapshot()[-1] == Change("update", 2, "B", 2, "t", "pub")
    assert sub.status["subscriptions"]["pub:t"]["resubscriptions"] == 1


def test_a_table_name_is_not_a_prefix_of_another(stack: ExitStack, pub: DataService, pub_node: Node) -> None:
    pub.publish("t", {1: "t's"})
    pub.publish("t2", {1: "t2's"})
    sub, changes = follow(stack, pub_node.address, table="t")
    assert sub.wait_synced(WAIT)
    pub.publish("t2", {1: "t2's", 2: "more"})
    last = pub.publish("t", {1: "t's", 3: "three"})
    assert sub.wait_delivered(last, WAIT)
    assert sub.view == {1: "t's", 3: "three"}
    assert all(c.table == "t" for c in changes.snapshot())

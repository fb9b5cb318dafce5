"""The change feed tied into reactive: ``db.cdc.publish`` and ``db.cdc.follow``, across processes."""

from __future__ import annotations

import datetime as dt
import logging
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from conftest import Recorder, outputs_by_source, within

import reactive
import reactive.feed
from reactive.components import Listener, Model
from reactive.errors import ConfigurationError
from reactive.feed import Change, RpcTimeoutError
from reactive.status import database_status, format_status

WAIT = 30.0
WORKER = Path(__file__).with_name("feed_worker.py")


def length(texts: list[str]) -> list[int]:
    return [len(t) for t in texts]


class Collector:
    """An ``on_change`` that keeps every change and replays them into a view."""

    def __init__(self) -> None:
        self.changes: list[Change] = []
        self.lock = threading.Lock()
        self.arrived = threading.Condition(self.lock)

    def __call__(self, change: Change) -> None:
        with self.arrived:
            self.changes.append(change)
            self.arrived.notify_all()

    def replayed(self) -> dict[Any, Any]:
        """The view the changes build, checking each against it: no duplicate, no missing."""
        view: dict[Any, Any] = {}
        for change in self.changes:
            if change.event in ("snapshot", "insert"):
                assert change.id not in view, f"duplicate {change}"
                view[change.id] = change.value
            elif change.event == "update":
                assert change.id in view, f"update of a row never seen: {change}"
                view[change.id] = change.value
            else:
                assert change.id in view, f"delete of a row never seen: {change}"
                del view[change.id]
        return view


@pytest.fixture
def sqlite_file(tmp_path: Path) -> Iterator[tuple[str, sqlite3.Connection]]:
    path = tmp_path / "a.sqlite"
    client = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
    client.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text TEXT)")
    client.executemany("INSERT INTO docs VALUES (?, ?)", [(i, "x" * i) for i in range(1, 6)])
    yield f"sqlite:///{path}", client
    client.close()


class Worker:
    """A publishing process (tests/feed_worker.py)."""

    def __init__(self, uri: str, address: str = "tcp://127.0.0.1:0") -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(WORKER), uri, address],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.address = self._line()

    def _line(self) -> str:
        assert self.process.stdout is not None
        line = self.process.stdout.readline().strip()
        assert line, f"the worker ended (exit {self.process.poll()})"
        return line

    def ask(self, command: str) -> str:
        assert self.process.stdin is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self._line()

    def idle(self) -> None:
        assert self.ask("idle") == "ok"

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(WAIT)

    def close(self) -> None:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.write("quit\n")
            self.process.stdin.flush()
            self.process.wait(WAIT)


def wait_for(condition: threading.Condition, predicate, timeout: float = WAIT) -> bool:
    with condition:
        return condition.wait_for(predicate, timeout)


def test_a_subscriber_in_another_process_gets_the_snapshot_then_every_change_in_commit_order(
    sqlite_file: tuple[str, sqlite3.Connection],
) -> None:
    uri, client = sqlite_file
    worker = Worker(uri)
    outputs, rows = Collector(), Collector()
    try:
        with (
            reactive.feed.subscribe(worker.address, "len__text", outputs) as out_sub,
            reactive.feed.subscribe(worker.address, "docs", rows) as row_sub,
        ):
            assert out_sub.wait_synced(WAIT) and row_sub.wait_synced(WAIT)
            assert [c.event for c in outputs.changes] == ["snapshot"] * 5  # the late joiner's snapshot
            assert {c.seqnum for c in outputs.changes} == {out_sub.seqnum}
            client.execute("INSERT INTO docs VALUES (6, 'six...')")
            client.execute("UPDATE docs SET text = 'yy' WHERE id = 1")
            client.execute("DELETE FROM docs WHERE id = 2")
            worker.idle()
            last = int(worker.ask("seqnum len__text"))
            assert out_sub.wait_delivered(last, WAIT)
            assert row_sub.wait_delivered(int(worker.ask("seqnum docs")), WAIT)

            expected = {1: 2, 3: 3, 4: 4, 5: 5, 6: 6}
            assert outputs.replayed() == out_sub.view == expected
            assert rows.replayed() == {i: {"id": i, "text": t} for i, t in client.execute("SELECT id, text FROM docs")}
            deltas = [c for c in outputs.changes if c.event != "snapshot"]
            assert {(c.event, c.id) for c in deltas} == {("insert", 6), ("update", 1), ("delete", 2)}
            numbers = sorted({c.seqnum for c in outputs.changes})
            assert numbers == list(range(numbers[0], numbers[0] + len(numbers)))  # consecutive
            assert out_sub.status["subscriptions"]["reactive:len__text"]["resubscriptions"] == 0
    finally:
        worker.close()


def test_a_publisher_restart_is_a_new_epoch_and_numbering_goes_on(
    sqlite_file: tuple[str, sqlite3.Connection],
) -> None:
    uri, client = sqlite_file
    worker = Worker(uri)
    port = worker.address.rsplit(":", 1)[1]
    collected = Collector()
    try:
        with reactive.feed.subscribe(worker.address, "len__text", collected, rpc_timeout=2.0) as sub:
            assert sub.wait_synced(WAIT)
            client.execute("INSERT INTO docs VALUES (6, 'six...')")
            worker.idle()
            before = int(worker.ask("seqnum len__text"))
            assert sub.wait_delivered(before, WAIT)
            epoch = sub.status["subscriptions"]["reactive:len__text"]["epoch"]

            worker.kill()  # SIGKILL: nothing saved at exit
            client.execute("DELETE FROM docs WHERE id = 3")
            client.execute("UPDATE docs SET text = 'z' WHERE id = 4")
            worker = Worker(uri, f"tcp://127.0.0.1:{port}")  # the same address, a new epoch
            worker.idle()
            after = int(worker.ask("seqnum len__text"))
            assert after > before  # numbers reserved in the checkpoint store: never reused

            expected = {1: 1, 2: 2, 4: 1, 5: 5, 6: 6}
            assert wait_for(collected.arrived, lambda: collected.replayed() == expected)
            status = sub.status["subscriptions"]["reactive:len__text"]
            assert status["epoch"] != epoch and status["resubscriptions"] >= 1
            assert ("delete", 3) in {(c.event, c.id) for c in collected.changes}
    finally:
        worker.close()


def test_a_listener_in_another_process_takes_a_published_table_as_its_source(
    sqlite_file: tuple[str, sqlite3.Connection], tmp_path: Path
) -> None:
    uri, client = sqlite_file
    worker = Worker(uri)
    doubled = Recorder(lambda x: 2 * x)
    try:
        with reactive.connect(f"duckdb:///{tmp_path}/b.duckdb") as b:
            b.cdc.follow(worker.address, "len__text", as_table="lengths")
            b.add(Listener(Model("double", predict=doubled), "_output", "lengths"))
            b.cdc.start()
            assert b.cdc.wait_idle(WAIT)
            assert outputs_by_source(b, "double___output") == {i: 2 * i for i in range(1, 6)}

            client.execute("INSERT INTO docs VALUES (6, 'six...')")
            client.execute("UPDATE docs SET text = 'y' WHERE id = 1")
            client.execute("DELETE FROM docs WHERE id = 2")
            worker.idle()
            assert b.cdc.wait_idle(WAIT)
            assert outputs_by_source(b, "double___output") == {1: 2, 3: 6, 4: 8, 5: 10, 6: 12}

            b.cdc.stop()  # B is away while A changes
            client.execute("DELETE FROM docs WHERE id = 3")
            client.execute("UPDATE docs SET text = 'zz' WHERE id = 4")
            worker.idle()
            calls = len(doubled.inputs)
            b.cdc.start()  # the new subscription's snapshot reconciles B's outputs
            assert b.cdc.wait_idle(WAIT)
            assert outputs_by_source(b, "double___output") == {1: 2, 4: 4, 5: 10, 6: 12}
            assert doubled.inputs[calls:] == [2]  # only the row that changed was computed again
    finally:
        worker.close()


@pytest.mark.parametrize("kind", ["duckdb", "sqlite", "postgres"])
def test_a_followed_table_keyed_by_text_ids_gets_its_outputs(
    duck, tmp_path: Path, kind: str, request: pytest.FixtureRequest
) -> None:
    # The outputs of a followed table were made keyed by int64 (the source is no table of the
    # follower's database): every text id failed its write, nothing was stored, no error was
    # recorded, and wait_idle said True.
    duck.execute("CREATE TABLE docs (id VARCHAR PRIMARY KEY, text VARCHAR)")
    duck.execute("INSERT INTO docs VALUES ('a', 'x'), ('b', 'yy')")
    follower = {
        "duckdb": f"duckdb:///{tmp_path / 'b.duckdb'}",
        "sqlite": f"sqlite:///{tmp_path / 'b.sqlite'}",
    }.get(kind) or request.getfixturevalue("pg_database")
    with reactive.connect(duck.uri, poll_interval=0.05) as a, reactive.connect(follower) as b:
        a.add(Listener(Model("len", predict=length), "text", "docs"))
        feed = a.cdc.publish()
        a.cdc.start()
        b.cdc.follow(feed.address, "len__text", as_table="lengths")
        b.add(Listener(Model("double", predict=lambda xs: [2 * x for x in xs]), "_output", "lengths"))
        b.cdc.start()
        assert b.cdc.wait_idle(WAIT)
        assert outputs_by_source(b, "double___output") == {"a": 2, "b": 4}
        duck.execute("INSERT INTO docs VALUES ('c', 'zzz')")
        duck.execute("UPDATE docs SET text = 'xxxx' WHERE id = 'a'")
        duck.execute("DELETE FROM docs WHERE id = 'b'")
        assert a.cdc.wait_idle(WAIT) and b.cdc.wait_idle(WAIT)
        assert outputs_by_source(b, "double___output") == {"a": 8, "c": 6}
        assert b.errors() == [] and b.cdc.info()["handler"]["internal_errors"] == 0


def test_status_of_a_listener_on_a_followed_table_says_where_it_is_followed_from(duck, tmp_path: Path) -> None:
    # A followed table is no table of the follower's database: once `reactive status` said a
    # source missing from the database was dropped or renamed, it said so of these too.
    duck.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text VARCHAR)")
    duck.execute("INSERT INTO docs VALUES (1, 'x')")
    follower = f"sqlite:///{tmp_path / 'b.sqlite'}"
    with reactive.connect(duck.uri, poll_interval=0.05) as a, reactive.connect(follower) as b:
        a.add(Listener(Model("len", predict=length), "text", "docs"))
        feed = a.cdc.publish()
        a.cdc.start()
        b.cdc.follow(feed.address, "len__text", as_table="lengths")
        b.add(Listener(Model("double", predict=lambda xs: [2 * x for x in xs]), "_output", "lengths"))
        b.cdc.start()
        assert b.cdc.wait_idle(WAIT)
        status = database_status(follower)
    [entry] = status["listeners"]
    assert (entry["source"], entry["source_missing"], entry["outputs"]) == ("lengths", False, 1)
    assert entry["position"] == {"kind": f"followed from the change feed at {feed.address}"}
    text = format_status(status)
    assert f"  lengths: followed from the change feed at {feed.address}" in text and "missing" not in text


def free_address() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{probe.getsockname()[1]}"


def test_a_follow_started_before_its_publisher_is_up_follows_it_once_it_answers(
    sqlite_file: tuple[str, sqlite3.Connection], tmp_path: Path
) -> None:
    # It logged "could not follow" and never tried again, and wait_idle said True meanwhile.
    uri, _ = sqlite_file
    address = free_address()
    with reactive.connect(f"duckdb:///{tmp_path}/b.duckdb") as b:
        b.cdc.follow(address, "len__text", as_table="lengths", rpc_timeout=0.5)
        b.add(Listener(Model("double", predict=lambda xs: [2 * x for x in xs]), "_output", "lengths"))
        b.cdc.start()
        assert not b.cdc.wait_idle(0.5)  # nothing answers there: not idle
        followed = b.cdc.info()["followed"]["lengths"]
        assert followed["following"] is False
        assert "reactive-feed-follow" in [t.name for t in threading.enumerate()]
        worker = Worker(uri, address)
        try:
            assert b.cdc.wait_idle(WAIT)
            assert outputs_by_source(b, "double___output") == {i: 2 * i for i in range(1, 6)}
            followed = b.cdc.info()["followed"]["lengths"]
            assert followed["following"] is True and followed["last_error"] is None
        finally:
            worker.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("reactive-")]


def test_close_stops_a_follow_waiting_for_its_publisher_at_once(tmp_path: Path) -> None:
    db = reactive.connect(f"duckdb:///{tmp_path}/b.duckdb")
    source = db.cdc.follow(free_address(), "t", as_table="elsewhere", rpc_timeout=WAIT)  # each try waits 30 s
    db.cdc.start()
    follower = next(t for t in threading.enumerate() if t.name == "reactive-feed-follow")
    assert not source.sync(0.2)
    began = time.monotonic()
    db.close()
    assert time.monotonic() - began < 5
    assert not follower.is_alive()
    assert not [t for t in threading.enumerate() if t.name.startswith("reactive-")]


def test_a_follow_whose_publisher_is_down_for_hours_keeps_trying(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # After 1024 failed tries in a row (about 85 minutes at 5 s each) the backoff, 0.1 *
    # 2**failures, overflowed a float: the follow's thread died of an OverflowError, and the
    # publisher, once back, was never followed.
    with reactive.connect(f"duckdb:///{tmp_path}/b.duckdb") as b, caplog.at_level(logging.WARNING):
        source = b.cdc.follow(free_address(), "t", as_table="elsewhere", rpc_timeout=0.1)
        b.cdc.start()
        follower = source._follower
        assert follower is not None
        follower.failures = 2000  # as after hours of failures in a row
        assert within(WAIT, lambda: "trying again in 5.0 s" in caplog.text)
        assert follower.is_alive() and follower.failures > 2000


def follow_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "reactive-feed-follow"]


def test_a_follow_that_trying_again_cannot_mend_ends_says_why_and_is_never_idle(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # It tried again every 5 s for ever, said so only in a warning each time, and wait_idle()
    # without a timeout never returned.
    node = reactive.feed.Node()
    node.start()
    try:
        for service_id in ("a", "b"):
            service = reactive.feed.DataService(service_id, node)
            service.start()
            service.publish("t", {1: service_id})
        with reactive.connect(f"duckdb:///{tmp_path}/b.duckdb") as b, caplog.at_level(logging.ERROR):
            b.cdc.follow(node.address, "t", as_table="either")  # two services publish 't'
            b.cdc.follow(node.address, "t", as_table="ghostly", service="ghost")
            b.cdc.follow(node.address, "t", as_table="bs", service="b")
            b.cdc.start()
            for follower in follow_threads():
                follower.join(WAIT)
                assert not follower.is_alive()
            assert b.cdc.wait_idle() is False  # at once: nothing will ever arrive for two of them
            info = b.cdc.info()
            either, ghostly = info["followed"]["either"], info["followed"]["ghostly"]
            assert either["following"] is False and either["attempts"] == 1
            assert re.fullmatch(
                r"FeedConfigurationError: several services at .* publish 't' \(a, b\): pass service=", either["failed"]
            )
            assert re.fullmatch(
                r"FeedConfigurationError: no service 'ghost' at .* \(services: a, b\)", ghostly["failed"]
            )
            assert info["stopped_tables"] == {
                "either": f"not followed: {either['failed']}",
                "ghostly": f"not followed: {ghostly['failed']}",
            }
            errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
            assert len(errors) == 2 and all("trying again will not help" in e for e in errors)
            # The one well given is followed.
            assert info["followed"]["bs"]["following"] is True and info["followed"]["bs"]["failed"] is None
            assert b.cdc.followed("bs").sync(WAIT)  # type: ignore[union-attr]
    finally:
        node.stop()
    assert not [t for t in threading.enumerate() if t.name.startswith("reactive-")]


@pytest.mark.parametrize(
    "answer",
    [b"HTTP/1.1 400 Bad Request\r\n\r\n", b'{"v": 2, "ok": true, "result": {"services": {}}}', b'{"v": 1, "ok": true}'],
    ids=["not JSON", "another wire version", "no list of services"],
)
def test_a_follow_of_an_address_where_no_reactive_feed_answers_ends_and_says_so(tmp_path: Path, answer: bytes) -> None:
    # Another program (or version) answering at the address was tried again for ever.
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind("tcp://127.0.0.1:*")
    address = router.getsockopt_string(zmq.LAST_ENDPOINT)
    try:
        with reactive.connect(f"duckdb:///{tmp_path}/b.duckdb") as b:
            b.cdc.follow(address, "t", as_table="elsewhere")
            b.cdc.start()
            [follower] = follow_threads()
            assert router.poll(int(WAIT * 1000)), "the follower asked nothing"
            peer, request_id, _ = router.recv_multipart()
            router.send_multipart([peer, request_id, answer])
            follower.join(WAIT)
            assert not follower.is_alive()
            assert not [t for t in threading.enumerate() if t.name.startswith("reactive-feed-")]  # its node too
            assert b.cdc.wait_idle() is False
            failed = b.cdc.info()["followed"]["elsewhere"]["failed"]
            assert failed.startswith("FeedConfigurationError: ") and address in failed
            assert "not a reactive feed of wire version 1" in failed or "malformed list of services" in failed
        assert not [t for t in threading.enumerate() if t.name.startswith("reactive-")]
    finally:
        router.close(0)
        context.term()


def _publisher(address: str | None = None) -> tuple[reactive.feed.Node, reactive.feed.DataService]:
    """A started node (at ``address``, or any free port) running a started service ``pub``."""
    node = reactive.feed.Node() if address is None else reactive.feed.Node(address)
    node.start()
    pub = reactive.feed.DataService("pub", node)
    pub.start()
    return node, pub


def test_a_follow_keeps_its_outputs_while_a_restarted_publisher_has_not_published_its_table(
    tmp_path: Path,
) -> None:
    # The restarted publisher answered an empty table: every output was deleted, then computed again.
    node, pub = _publisher()
    address = node.address
    pub.publish("t", {1: "a", 2: "bb"})
    computed: list[str] = []

    def measure(texts: list[str]) -> list[int]:
        computed.extend(texts)
        return length(texts)

    try:
        with reactive.connect(f"duckdb:///{tmp_path}/b.duckdb") as b:
            source = b.cdc.follow(address, "t", as_table="texts", heartbeat_interval=0.05, quiet_after=0.3)
            b.add(Listener(Model("len", predict=measure), "_output", "texts"))
            b.cdc.start()
            assert b.cdc.wait_idle(WAIT) and outputs_by_source(b, "len___output") == {1: 1, 2: 2}
            pub.stop()
            node.stop()
            node, pub = _publisher(address)  # its tables not read yet
            subscription = source._subscription
            assert subscription is not None
            status = lambda: subscription.status["subscriptions"]["pub:t"]  # noqa: E731
            assert subscription._wait_for(lambda: "does not publish 't' (yet)" in (status()["last_error"] or ""), WAIT)
            assert b.cdc.queue.join(WAIT) and outputs_by_source(b, "len___output") == {1: 1, 2: 2}
            assert not b.cdc.wait_idle(0.5)  # what the restarted publisher has is not known yet
            pub.publish("t", {1: "a", 2: "bb", 3: "ccc"})
            assert subscription._wait_for(lambda: status()["epoch"] == pub.epoch, WAIT)
            assert b.cdc.wait_idle(WAIT) and outputs_by_source(b, "len___output") == {1: 1, 2: 2, 3: 3}
            assert computed == ["a", "bb", "ccc"]  # nothing computed twice
    finally:
        node.stop()


def test_wait_idle_waits_for_a_restarted_publishers_new_epoch(tmp_path: Path) -> None:
    # A publisher without checkpoints numbers from 0 again after a restart: wait_idle compared its
    # numbers with those delivered of the epoch before, and said True before the change arrived.
    node, pub = _publisher()
    address = node.address
    pub.publish("t", {1: "a", 2: "bb"})
    pub.publish("t", {1: "a", 2: "bb", 3: "ccc"})
    try:
        with reactive.connect(f"duckdb:///{tmp_path}/b.duckdb") as b:
            # Never quiet: the restart is noticed only when the test says so.
            source = b.cdc.follow(address, "t", as_table="texts", quiet_after=float("inf"))
            b.add(Listener(Model("len", predict=length), "_output", "texts"))
            b.cdc.start()
            assert b.cdc.wait_idle(WAIT) and outputs_by_source(b, "len___output") == {1: 1, 2: 2, 3: 3}
            pub.stop()
            node.stop()
            node, pub = _publisher(address)
            assert pub.publish("t", {1: "a", 2: "bb", 3: "ccc", 4: "dddd"}) == 1  # below the 2 delivered
            assert not b.cdc.wait_idle(0.5)  # the new epoch's change has not arrived
            subscription = source._subscription
            assert subscription is not None
            subscription.check_resub_all(quiet_after=0)
            assert b.cdc.wait_idle(WAIT)
            assert outputs_by_source(b, "len___output") == {1: 1, 2: 2, 3: 3, 4: 4}
    finally:
        node.stop()


def test_publish_before_start_loads_existing_outputs_and_follows_a_listener_added_later(duck) -> None:
    duck.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text VARCHAR)")
    duck.execute("INSERT INTO docs VALUES (1, 'a'), (2, 'bb')")
    with reactive.connect(duck.uri, poll_interval=0.05) as db:
        db.add(Listener(Model("len", predict=length), "text", "docs"))
        feed = db.cdc.publish()  # before start
        collected, later = Collector(), Collector()
        with reactive.feed.subscribe(feed.address, "len__text", collected) as sub:
            assert sub.wait_synced(WAIT)
            assert collected.replayed() == {1: 1, 2: 2}
            db.cdc.start()
            db.add(Listener(Model("upper", predict=lambda xs: [x.upper() for x in xs]), "text", "docs"))
            assert db.cdc.wait_idle(WAIT)
            with reactive.feed.subscribe(feed.address, "upper__text", later) as sub2:
                assert sub2.wait_synced(WAIT)
                duck.execute("INSERT INTO docs VALUES (3, 'ccc')")
                assert db.cdc.wait_idle(WAIT)  # includes publishing
                assert sub2.wait_delivered(feed.service.last_seqnum("upper__text"), WAIT)
                assert sub.wait_delivered(feed.service.last_seqnum("len__text"), WAIT)
                assert later.replayed() == {1: "A", 2: "BB", 3: "CCC"}
                assert collected.replayed() == {1: 1, 2: 2, 3: 3}
        info = db.cdc.info()["feeds"][0]
        assert info["address"] == feed.address and info["last_error"] is None


def test_a_table_the_feed_could_not_read_is_read_again_before_it_is_published(pg_database: str) -> None:
    # The first read failed (the table was locked past lock_timeout): the feed took the table as
    # read and published its changes alone, so a subscriber's snapshot held only the rows
    # changed since, and one that resynced deleted all the others.
    import psycopg

    with psycopg.connect(pg_database, autocommit=True) as client, psycopg.connect(pg_database) as locker:
        client.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text TEXT)")
        client.execute("INSERT INTO docs VALUES (1, 'a'), (2, 'bb'), (3, 'ccc')")
        with reactive.connect(pg_database, poll_interval=0.05, options="-c lock_timeout=100") as db:
            db.add(Listener(Model("len", predict=length), "text", "docs"))
            db.cdc.start()
            locker.execute("LOCK TABLE docs IN ACCESS EXCLUSIVE MODE")
            feed = db.cdc.publish(tables=["docs"])
            assert within(30, lambda: feed.stats.last_error is not None)  # its read failed
            # The publisher says it will publish the table (it reads it again): a subscriber waits
            # for it past its unpublished_timeout.
            early = Collector()
            waiting = reactive.feed.subscribe(feed.address, "docs", early, unpublished_timeout=0.3, quiet_after=0.2)
            with waiting:
                state = waiting._subscriptions[("reactive", "docs")]
                assert within(WAIT, lambda: state.failures >= 3)  # three answers "not yet", 0.6 s apart at least
                assert waiting.error is None and waiting.view == {}
                locker.rollback()
                client.execute("INSERT INTO docs VALUES (4, 'dddd')")
                assert db.cdc.wait_idle(WAIT)
                collected = Collector()
                with reactive.feed.subscribe(feed.address, "docs", collected) as sub:
                    assert sub.wait_synced(WAIT)
                    assert sub.wait_delivered(feed.service.last_seqnum("docs"), WAIT)
                    assert {i: row["text"] for i, row in collected.replayed().items()} == {
                        1: "a",
                        2: "bb",
                        3: "ccc",
                        4: "dddd",
                    }
                assert waiting.wait_delivered(feed.service.last_seqnum("docs"), WAIT)
                assert early.replayed() == collected.replayed()


def test_dates_and_intervals_travel_the_feed_as_datetimes_and_timedeltas(duck) -> None:
    """An interval (a DuckDB INTERVAL, or a model's timedelta output) had no form on the wire:
    each such change was refused at publish (FeedEncodeError), counted and logged, and never
    reached a subscriber."""
    duck.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text VARCHAR, span INTERVAL)")
    duck.execute("INSERT INTO docs VALUES (1, 'a', INTERVAL '1 day 3.5 seconds')")
    when = dt.datetime(2024, 1, 2, 3, 4, 5, 123456)
    with reactive.connect(duck.uri, poll_interval=0.05) as db:
        db.add(
            Listener(Model("took", predict=lambda xs: [dt.timedelta(seconds=len(x) + 0.5) for x in xs]), "text", "docs")
        )
        db.add(Listener(Model("at", predict=lambda xs: [when for _ in xs]), "text", "docs"))
        feed = db.cdc.publish()
        db.cdc.start()
        docs, took, at = Collector(), Collector(), Collector()
        with (
            reactive.feed.subscribe(feed.address, "docs", docs) as s1,
            reactive.feed.subscribe(feed.address, "took__text", took) as s2,
            reactive.feed.subscribe(feed.address, "at__text", at) as s3,
        ):
            assert all(s.wait_synced(WAIT) for s in (s1, s2, s3))
            duck.execute("INSERT INTO docs VALUES (2, 'bb', INTERVAL '1 month')")
            assert db.cdc.wait_idle(WAIT)
            for sub, name in ((s1, "docs"), (s2, "took__text"), (s3, "at__text")):
                assert sub.wait_delivered(feed.service.last_seqnum(name), WAIT)
            spans = {i: row["span"] for i, row in docs.replayed().items()}
            assert spans == {1: dt.timedelta(days=1, seconds=3.5), 2: dt.timedelta(days=30)}
            assert took.replayed() == {1: dt.timedelta(seconds=1.5), 2: dt.timedelta(seconds=2.5)}
            assert at.replayed() == {1: when, 2: when}
        info = db.cdc.info()["feeds"][0]
        assert info["last_error"] is None


def test_a_subscription_to_a_table_not_published_yet_says_so_and_follows_it_once_it_is(
    duck, caplog: pytest.LogCaptureFixture
) -> None:
    # A misspelt table was followed in silence; a listener's outputs added later are followed.
    duck.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text VARCHAR)")
    duck.execute("INSERT INTO docs VALUES (1, 'a')")
    with reactive.connect(duck.uri, poll_interval=0.05) as db:
        feed = db.cdc.publish()
        db.cdc.start()
        early = Collector()
        with caplog.at_level(logging.WARNING, logger="reactive.feed"):
            sub = reactive.feed.subscribe(feed.address, "upper__text", early)
        with sub:
            assert "publishes no table 'upper__text' yet (it publishes: none)" in caplog.text
            db.add(Listener(Model("upper", predict=lambda xs: [x.upper() for x in xs]), "text", "docs"))
            duck.execute("INSERT INTO docs VALUES (2, 'b')")
            assert db.cdc.wait_idle(WAIT)
            assert sub.wait_delivered(feed.service.last_seqnum("upper__text"), WAIT)
            assert sub.view == {1: "A", 2: "B"}


def test_a_table_outside_the_published_ones_fails_at_once(duck) -> None:
    # publish(tables=...) will never publish another table, and a subscription to one (a
    # misspelling) waited for it for ever, with an empty view that looked followed.
    duck.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text VARCHAR)")
    duck.execute("INSERT INTO docs VALUES (1, 'a')")
    with reactive.connect(duck.uri, poll_interval=0.05) as db:
        db.add(Listener(Model("len", predict=length), "text", "docs"))
        feed = db.cdc.publish(tables=["docs", "len__text"])
        db.cdc.start()
        assert db.cdc.wait_idle(WAIT)
        began = time.monotonic()
        with (
            reactive.feed.subscribe(feed.address, "len__txet", Collector()) as sub,
            pytest.raises(reactive.feed.TableNotPublishedError) as raised,
        ):
            sub.wait_synced(WAIT)
        assert time.monotonic() - began < WAIT / 3  # at once: no unpublished_timeout to wait out
        assert re.fullmatch(
            r"reactive at tcp://\S+ publishes no table 'len__txet', and says it never will \(it publishes: docs, "
            r"len__text; did you mean 'len__text'\?\)",
            str(raised.value),
        )


def test_a_follow_of_a_table_published_later_gets_it(tmp_path: Path) -> None:
    # Until its publisher published the table, each answer was "not published"; then its
    # heartbeats kept the subscription from ever looking quiet, so its snapshot was never
    # fetched again: nothing was followed, and wait_idle was False for ever.
    node = reactive.feed.Node(heartbeat_interval=0.05)
    node.start()
    try:
        pub = reactive.feed.DataService("pub", node)
        pub.start()
        with reactive.connect(f"duckdb:///{tmp_path}/b.duckdb", poll_interval=0.05) as b:
            b.cdc.follow(node.address, "t", as_table="followed")
            b.add(Listener(Model("len", predict=length), "text", "followed"))
            b.cdc.start()
            assert not b.cdc.wait_idle(0.5)  # not published yet: nothing to be idle with
            pub.publish("t", {1: {"text": "a"}, 2: {"text": "bb"}})
            assert b.cdc.wait_idle(WAIT)
            assert outputs_by_source(b, "len__text") == {1: 1, 2: 2}
            assert b.cdc.info()["followed"]["followed"]["failed"] is None
    finally:
        node.stop()


def test_a_follow_of_a_table_never_published_ends_and_says_why(tmp_path: Path) -> None:
    node = reactive.feed.Node(heartbeat_interval=0.05)
    node.start()
    try:
        pub = reactive.feed.DataService("pub", node)
        pub.start()
        pub.publish("docs", {1: {"text": "a"}})
        with reactive.connect(f"duckdb:///{tmp_path}/b.duckdb", poll_interval=0.05) as b:
            source = b.cdc.follow(node.address, "doc", as_table="followed", unpublished_timeout=0.5)
            b.cdc.start()
            began = time.monotonic()
            assert b.cdc.wait_idle(WAIT) is False  # ends as the follow does, well before WAIT
            assert time.monotonic() - began < WAIT / 3
            assert within(WAIT, lambda: source.failure is not None)
            assert re.fullmatch(
                r"TableNotPublishedError: pub at \S+ publishes no table 'doc' \(it publishes: docs; did you mean "
                r"'docs'\?\), and did not for 0\.5 s: .*",
                source.failure or "",
            )
            began = time.monotonic()
            assert b.cdc.wait_idle() is False  # at once (without a timeout it waited for ever)
            assert time.monotonic() - began < WAIT / 3
            info = b.cdc.info()
            assert info["followed"]["followed"]["failed"] == source.failure
            assert info["stopped_tables"]["followed"] == f"not followed: {source.failure}"
    finally:
        node.stop()
    assert not [t for t in threading.enumerate() if t.name.startswith("reactive-")]


def test_a_slow_subscriber_never_stalls_the_handler(sqlite_file: tuple[str, sqlite3.Connection]) -> None:
    uri, client = sqlite_file
    release = threading.Event()
    collected = Collector()

    def slow(change: Change) -> None:
        release.wait(WAIT)
        collected(change)

    with reactive.connect(uri, poll_interval=0.05) as db:
        db.add(Listener(Model("len", predict=length), "text", "docs"))
        feed = db.cdc.publish(heartbeat_interval=0.2)
        db.cdc.start()
        with reactive.feed.subscribe(feed.address, "len__text", slow) as sub:
            for i in range(6, 206):
                client.execute("INSERT INTO docs VALUES (?, ?)", (i, "t" * (i % 17)))
            assert db.cdc.wait_idle(WAIT)  # while the subscriber is stuck in its first call
            assert not release.is_set() and len(collected.changes) == 0
            release.set()
            expected = outputs_by_source(db, "len__text")
            assert len(expected) == 205
            assert wait_for(collected.arrived, lambda: collected.replayed() == expected)
            assert sub.view == expected


def test_a_feed_that_holds_one_change_at_a_time_still_delivers_every_change(
    sqlite_file: tuple[str, sqlite3.Connection],
) -> None:
    """``queue_rows=1``: every window waits for the publisher to take the one before (its
    changes are over the bound alone); nothing is lost, nothing reordered."""
    uri, client = sqlite_file
    collected = Collector()
    with reactive.connect(uri, poll_interval=0.05) as db:
        db.add(Listener(Model("len", predict=length), "text", "docs"))
        feed = db.cdc.publish(queue_rows=1)
        db.cdc.start()
        with reactive.feed.subscribe(feed.address, "len__text", collected) as sub:
            assert sub.wait_synced(WAIT)
            for i in range(6, 106):
                client.execute("INSERT INTO docs VALUES (?, ?)", (i, "t" * (i % 17)))
                if i % 10 == 0:
                    client.execute("DELETE FROM docs WHERE id = ?", (i - 5,))
            assert db.cdc.wait_idle(WAIT)
            expected = outputs_by_source(db, "len__text")
            assert len(expected) == 105 - 10
            assert wait_for(collected.arrived, lambda: collected.replayed() == expected)
            info = db.cdc.info()["feeds"][0]
            assert info["queued_rows"] == 0 and info["queued_windows"] == 0


def test_the_handler_waits_only_while_the_feed_holds_queue_rows_changes_and_a_stop_releases_it() -> None:
    """The feed's buffer counts changes: a window that would take it past ``queue_rows`` waits
    for the publisher (``handler_waits``), one larger than the bound goes in alone, and a stop
    releases a hand-off waiting for room (its window is not published)."""
    with reactive.connect("duckdb://") as db:
        feed = db.cdc.publish(queue_rows=3)
        publishing, release = threading.Event(), threading.Event()
        published: list[int] = []

        def held(window: int, changes: list) -> None:  # the publisher thread, held up
            publishing.set()
            assert release.wait(WAIT)
            published.append(window)

        feed._publish = held  # type: ignore[method-assign]
        feed.hand_off(1, [("table", "t", "upsert", 1, {})])
        assert publishing.wait(WAIT)  # taken: the publisher is busy with it
        feed.hand_off(2, [("table", "t", "upsert", i, {}) for i in range(2)])  # 2 of 3: no wait
        waiting = threading.Thread(target=feed.hand_off, args=(3, [("table", "t", "upsert", 9, {})] * 5))
        waiting.start()
        waiting.join(0.2)
        assert waiting.is_alive() and feed.info()["queued_rows"] == 2  # 2 + 5 > 3: it waits
        release.set()
        waiting.join(WAIT)
        assert not waiting.is_alive() and feed.wait_published(WAIT)
        assert published == [1, 2, 3] and feed.info()["handler_waits"] == 1
        release.clear()
        publishing.clear()
        feed.hand_off(4, [("table", "t", "upsert", 1, {})])
        assert publishing.wait(WAIT)
        feed.hand_off(5, [("table", "t", "upsert", 1, {})] * 3)
        stuck = threading.Thread(target=feed.hand_off, args=(6, [("table", "t", "upsert", 1, {})]))
        stuck.start()
        stuck.join(0.2)
        assert stuck.is_alive()
        feed.stop()  # the hand-off waiting for room goes on; windows 5 and 6 are not published
        stuck.join(WAIT)
        assert not stuck.is_alive()
        release.set()
        feed.join(WAIT)
        assert published == [1, 2, 3, 4] and feed.wait_published(WAIT)
        assert feed.info()["queued_windows"] == 0


def test_mongodb_values_travel_with_their_types(mongo_uri: str, mongo) -> None:
    from bson import ObjectId

    when = dt.datetime(2026, 11, 26, 10, 30, tzinfo=dt.UTC)
    oid = ObjectId()
    mongo.docs.insert_one({"_id": oid, "text": "hello", "at": when, "tags": ["a", "b"]})
    with reactive.connect(mongo_uri) as db:
        db.add(Listener(Model("len", predict=length), "text", "docs"))
        feed = db.cdc.publish()
        db.cdc.start()
        rows, outputs = Collector(), Collector()
        with (
            reactive.feed.subscribe(feed.address, "docs", rows) as row_sub,
            reactive.feed.subscribe(feed.address, "len__text", outputs) as out_sub,
        ):
            assert row_sub.wait_synced(WAIT) and out_sub.wait_synced(WAIT)
            mongo.docs.update_one({"_id": oid}, {"$set": {"text": "hello world"}})
            assert db.cdc.wait_idle(WAIT)
            assert out_sub.wait_delivered(feed.service.last_seqnum("len__text"), WAIT)
            assert row_sub.wait_delivered(feed.service.last_seqnum("docs"), WAIT)
            ((row_id, row),) = rows.replayed().items()
            assert row_id == oid and isinstance(row_id, ObjectId)
            assert row["at"].replace(tzinfo=dt.UTC) == when and row["tags"] == ["a", "b"]
            assert row["text"] == "hello world"
            assert outputs.replayed() == {oid: 11}


def test_a_name_the_feed_cannot_carry_is_refused_alone_and_the_rest_is_published(
    sqlite_file: tuple[str, sqlite3.Connection], caplog: pytest.LogCaptureFixture
) -> None:
    # It killed the publisher thread at its first load: nothing at all was published.
    uri, client = sqlite_file
    long = "t" * 300  # over the feed's 256 characters
    client.execute(f'CREATE TABLE "{long}" (id INTEGER PRIMARY KEY, text TEXT)')
    client.execute(f"INSERT INTO \"{long}\" VALUES (1, 'a')")
    with reactive.connect(uri, poll_interval=0.05) as db:
        db.add(Listener(Model("len", predict=length), "text", "docs"))
        db.add(Listener(Model("len2", predict=length), "text", long))
        feed = db.cdc.publish()
        db.cdc.start()
        client.execute("INSERT INTO docs VALUES (6, 'sixsix')")
        client.execute(f"INSERT INTO \"{long}\" VALUES (2, 'bb')")
        assert db.cdc.wait_idle(WAIT)
        assert feed.is_alive()
        (info,) = db.cdc.info()["feeds"]
        assert info["refused"] == [long] and "at most 256 characters" in info["last_error"]
        assert feed.service.published_tables() == ["docs", "len2__text", "len__text"]
        refusals = [r for r in caplog.records if "the feed does not publish" in r.getMessage()]
        assert len(refusals) == 1 and refusals[0].levelno == logging.ERROR
        collected, other = Collector(), Collector()
        with reactive.feed.subscribe(feed.address, "len__text", collected) as sub:
            assert sub.wait_synced(WAIT) and collected.replayed() == {i: i for i in range(1, 7)}
        with reactive.feed.subscribe(feed.address, "len2__text", other) as sub:
            assert sub.wait_synced(WAIT) and other.replayed() == {1: 1, 2: 2}


def test_changes_the_handler_released_are_reconciled_again_until_it_works() -> None:
    # A released packet of a followed table was reconciled once, on a thread of its own: when
    # that failed too (the database locked a moment), the changes waited for the next start.
    from reactive.feed.source import FeedSource
    from reactive.queue import CDCQueue

    calls: list[list[str]] = []
    done = threading.Event()

    def reconcile(names: list[str]) -> None:
        calls.append(names)
        if len(calls) == 1:
            raise RuntimeError("database is locked")
        done.set()

    source = FeedSource("lengths", free_address(), "len__text", CDCQueue(), reconcile)
    source.start()  # its publisher is not up: the source is started, and tries again
    try:
        source.release([])
        assert done.wait(WAIT)
        assert calls == [["lengths"], ["lengths"]]
    finally:
        source.stop()
    assert not [t for t in threading.enumerate() if t.name in ("reactive-feed-release", "reactive-feed-follow")]
    source.release([])  # after stop: nothing owed (the next start reconciles), no thread
    assert len(calls) == 2 and "reactive-feed-release" not in {t.name for t in threading.enumerate()}


def test_feed_bad_input_gets_clear_errors(sqlite_file: tuple[str, sqlite3.Connection]) -> None:
    uri, _ = sqlite_file
    with reactive.connect(uri) as db:
        db.add(Listener(Model("len", predict=length), "text", "docs"))
        with pytest.raises(ConfigurationError, match="tcp://host:port"):
            db.cdc.publish("http://127.0.0.1:80")
        with pytest.raises(ConfigurationError, match="list of names"):
            db.cdc.publish(tables="docs")
        for bad in (0, -1, 2.5, "100", True):
            with pytest.raises(ConfigurationError, match="queue_rows must be a whole number of at least 1"):
                db.cdc.publish(queue_rows=bad)
        with pytest.raises(ConfigurationError, match=r"queue_windows is gone.*queue_rows"):
            db.cdc.publish(queue_windows=1000)
        taken = socket.socket()
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        try:
            with pytest.raises(ConfigurationError, match="cannot listen"):
                db.cdc.publish(f"tcp://127.0.0.1:{taken.getsockname()[1]}")
        finally:
            taken.close()
        with pytest.raises(ConfigurationError, match="is a table of"):
            db.cdc.follow("tcp://127.0.0.1:1", "docs")
        with pytest.raises(ConfigurationError, match="NUL"):
            db.cdc.follow("tcp://127.0.0.1:1", "a\x00b", as_table="elsewhere")
        # Refused at follow(), not only logged by the start (and by each start after it).
        with pytest.raises(TypeError, match="rpc_timout"):
            db.cdc.follow("tcp://127.0.0.1:1", "t", as_table="elsewhere", rpc_timout=1.0)
        with pytest.raises(ConfigurationError, match="rpc_timeout must be a number of seconds above 0"):
            db.cdc.follow("tcp://127.0.0.1:1", "t", as_table="elsewhere", rpc_timeout=-1)
        for service in (5, ""):
            with pytest.raises(ConfigurationError, match="a feed service name must be a non-empty str"):
                db.cdc.follow("tcp://127.0.0.1:1", "t", as_table="elsewhere", service=service)
            with pytest.raises(ConfigurationError, match="a feed service name must be a non-empty str"):
                reactive.feed.subscribe("tcp://127.0.0.1:1", "t", print, service=service)
        assert db.cdc.followed("elsewhere") is None and db.cdc.info()["followed"] == {}
        # Nothing listens there: a clear error within the timeout, and nothing left running.
        with pytest.raises(RpcTimeoutError, match=r"no node answered|no connection|no answer"):
            reactive.feed.subscribe("tcp://127.0.0.1:1", "docs", print, rpc_timeout=0.5)
        feed = db.cdc.publish(tables=["docs"])
        collected = Collector()
        with reactive.feed.subscribe(feed.address, "docs", collected) as sub:
            assert sub.wait_synced(WAIT) and len(collected.replayed()) == 5
        services = reactive.feed.Node(None, peers=[feed.address])
        with services:
            published = services.refresh_peer(feed.address)["reactive"]["published_tables"]
        assert published == ["docs"]  # tables= limits what is published
    # The datalayer closed its feed with it.
    assert not [t for t in threading.enumerate() if t.name.startswith("reactive-")]

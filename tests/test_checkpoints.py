"""reactive.checkpoints.Table: the seed's API on every store, its limits, flags, lease and atomicity."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import looked, outputs_by_source, server_uri

import reactive
from reactive.checkpoints import (
    ENGINE_CHECKPOINT,
    LEASE_SECTION,
    MIN_LEASE_MS,
    CheckpointLimitError,
    Lease,
    LeaseKeeper,
    NotActiveError,
    Section,
    Table,
    section_store,
)
from reactive.components import Listener, Model
from reactive.status import lease_status

LIMITS = (None, 8, 64, 32)  # retention_ms, max_sections, max_section_size_bytes, max_section_id_size_bytes


@pytest.fixture(params=["file", "duckdb", "postgres", "mongodb", "kinetica"])
def store(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Where a Table lives: the embedded SQLite file (store=None), or a datalayer of each backend."""
    kind = request.param
    if kind == "file":
        monkeypatch.setenv("REACTIVE_CHECKPOINTS", str(tmp_path / "checkpoints.sqlite"))
        yield None
        return
    if kind == "duckdb":
        uri = f"duckdb:///{tmp_path / 'app.duckdb'}"
    elif kind == "postgres":
        uri = request.getfixturevalue("pg_database")
    else:
        uri = server_uri(request, kind)
    with reactive.connect(uri) as db:
        yield db


def table(store: Any, name: str = "t", flags: int = Table.WR_ALL_REPLICAS, limits: tuple = LIMITS, **kw: Any) -> Table:
    return Table(name, flags, *limits, store=store, **kw)


def test_write_read_delete_keep_data_as_written(store: Any) -> None:
    t = table(store)
    t.Write("text", "héllo")
    t.Write("bytes", b"\x00\xff")
    assert t.Read(["text", "bytes", "missing"]) == {"text": "héllo", "bytes": b"\x00\xff"}
    t.Delete("text")
    t.Delete("never written")  # not an error
    assert t.Read(["text", "bytes"]) == {"bytes": b"\x00\xff"}
    assert table(store, "other").Read(["bytes"]) == {}  # checkpoints are separate


def test_the_single_key_form_truncates_the_container_forms_do_not(store: Any) -> None:
    t = table(store)
    t.Write("k", "abcdef")
    t.Write([("k", "XY")])
    assert t.Read(["k"]) == {"k": "XYcdef"}
    t.Write({"k": "Z"})
    assert t.Read(["k"]) == {"k": "ZYcdef"}
    t.Write("k", "Q")
    assert t.Read(["k"]) == {"k": "Q"}
    t.Write([("k", b"bytes"), ("new", "n")])  # another kind replaces
    assert t.Read(["k", "new"]) == {"k": b"bytes", "new": "n"}


@pytest.mark.parametrize(
    ("write", "message"),
    [
        (lambda t: t.Write("x" * 33, "v"), "max_section_id_size_bytes=32"),
        (lambda t: t.Write("k", "v" * 65), "max_section_size_bytes=64"),
        (lambda t: t.Write({f"k{i}": "v" for i in range(9)}), "max_sections=8"),
        (lambda t: t.Write([("ok", "v"), ("é" * 17, "v")]), "max_section_id_size_bytes"),
    ],
)
def test_limits_are_clear_errors_and_nothing_is_written(store: Any, write: Any, message: str) -> None:
    t = table(store)
    t.Write("before", "kept")
    with pytest.raises(CheckpointLimitError, match=message) as raised:
        write(t)
    assert isinstance(raised.value, ValueError)
    assert t.Read(["before", "ok", "k", "k0"]) == {"before": "kept"}


@pytest.mark.parametrize(
    ("write", "message"),
    [
        (lambda t: t.Write(5, "v"), "a section id must be a non-empty str, not 5"),
        (lambda t: t.Write(b"k", "v"), "a section id must be a non-empty str, not b'k'"),
        (lambda t: t.Write("k\udc80", "v"), "a section id must be Unicode text"),
        (lambda t: t.Write([("ok", "v"), ("\ud800", "v")]), "a section id must be Unicode text"),
        (lambda t: t.Write([1, 2]), "Write takes a key and data, a mapping, or"),
        (lambda t: t.Write(["ab"]), "Write takes a key and data, a mapping, or"),  # was ("a", "b")
        (lambda t: t.Delete("__lease__"), "not '__lease__'"),  # took the active replica's lease away
        (lambda t: t.Read(["ok", "__lease__"]), "not '__lease__'"),  # gave the lease's record
        (lambda t: t.Delete(5), "a section id must be a non-empty str"),
        (lambda t: t.Read(5), "Read takes a section id or an iterable of them"),
    ],
    ids=[
        "an int id",
        "a bytes id",
        "a lone surrogate",
        "one in a container",
        "not pairs",
        "a text for a pair",
        "delete the lease",
        "read the lease",
        "delete an int",
        "read an int",
    ],
)
def test_ids_that_are_not_text_are_clear_errors_and_nothing_is_written(store: Any, write: Any, message: str) -> None:
    """They used to raise TypeError ('int' object is not iterable), or UnicodeEncodeError
    from the store after the checks."""
    with table(store) as t:
        t.Write("before", "kept")
        assert t.Activate()
        with pytest.raises(reactive.ConfigurationError, match=message):
            write(t)
        assert t.Read(["before", "ok", "a"]) == {"before": "kept"}
        assert t.GetActiveStatus() and t.lease.check()


def test_sections_not_written_for_retention_ms_expire(store: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    t = table(store, limits=(1_000, 8, 64, 32))
    t.Write("old", "o")
    later = time.time() + 2
    monkeypatch.setattr("reactive.checkpoints.time.time", lambda: later)
    t.Write("new", "n")
    assert t.Read(["old", "new"]) == {"new": "n"}
    assert "old" not in t.store.read_sections("t", None)  # the write removed it


def test_asynchronous_writes_are_written_behind_in_order(store: Any) -> None:
    writer = table(store, flags=Table.WR_ACTIVE_REPLICA)
    assert writer.GetActiveStatus()  # not collocated: it activated itself
    for i in range(50):
        writer.Write({"counter": str(i), f"k{i % 3}": str(i)})
    assert writer.Synchronize(30)
    reader = table(store)
    assert reader.Read(["counter", "k0", "k1", "k2"]) == {"counter": "49", "k0": "48", "k1": "49", "k2": "47"}
    writer.Deactivate()


def test_a_collocated_checkpoint_has_no_active_replica_until_activate(store: Any) -> None:
    t = table(store, flags=Table.WR_ACTIVE_REPLICA_WEAK | Table.CHECKPOINT_COLLOCATED)
    assert not t.GetActiveStatus()
    with pytest.raises(NotActiveError, match="Activate"):
        t.Write("k", "v")
    assert t.Activate() and t.GetActiveStatus()
    t.Write("k", "v")
    assert t.Synchronize(30) and t.Read(["k"]) == {"k": "v"}
    t.Deactivate()


def test_one_active_replica_and_a_standby_that_takes_over(store: Any) -> None:
    first = table(store, flags=Table.WR_ALL_REPLICAS, lease_ms=60_000)
    second = table(store, flags=Table.WR_ALL_REPLICAS, lease_ms=60_000)
    assert first.Activate()
    assert not second.Activate()  # another live process holds it
    second.SetAutoActivate(True)
    assert not second.WaitActive(0.5)
    first.Deactivate()
    assert second.WaitActive(10)  # long before the 60 s lease could expire
    assert not first.GetActiveStatus() and second.GetActiveStatus()
    assert not first.Activate()
    second.Deactivate()


def test_an_expired_lease_is_taken_over(store: Any) -> None:
    holder = table(store, lease_ms=300)
    assert holder.Activate()
    holder.lease.renew = lambda: True  # type: ignore[method-assign]  # a paused holder: it renews nothing
    holder.lease._held = None  # and its keeper stops trying
    standby = table(store, lease_ms=300)
    standby.SetAutoActivate(True)
    assert standby.WaitActive(10)
    standby.Deactivate()


class Clock:
    """The time the leases of a test share, moved by the test only: a 100 ms lease lapsed on
    its own between its acquire and the next line on a loaded machine (CI, stop 40)."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def lapse(self, lease: Lease) -> None:
        """Let ``lease`` lapse: nothing renewed it (as while its store was down or slow)."""
        assert lease.held is not None
        self.now += lease.lease_ms / 1000 + 0.001
        assert lease.held is None


def test_a_lapsed_lease_nobody_took_is_taken_back_with_its_epoch(store: Any) -> None:
    # A lease that lapsed here while nobody else took it never changed hands: taking it back
    # with a new epoch made the process stand down and reconcile every table.
    clock = Clock()
    holder = Lease(section_store(store), "lapse", lease_ms=MIN_LEASE_MS, clock=clock)
    assert holder.acquire() and holder.held is not None
    epoch = holder.held.epoch
    clock.lapse(holder)
    assert holder.held is None and holder.lapsed
    assert holder.acquire(only_ours=True)
    assert holder.held is not None and holder.held.epoch == epoch and not holder.lapsed
    current = holder.current()
    assert current is not None and current.epoch == epoch
    clock.lapse(holder)
    assert holder.acquire()  # the same without only_ours
    assert holder.held is not None and holder.held.epoch == epoch
    clock.lapse(holder)
    assert holder.lapsed
    holder.release()  # a lapsed lease whose record is ours is given up too: a standby takes it at once
    assert not holder.lapsed and holder.current() is None


def test_a_lapsed_lease_another_process_took_is_not_taken_back(store: Any) -> None:
    sections, clock = section_store(store), Clock()
    holder = Lease(sections, "taken", lease_ms=MIN_LEASE_MS, clock=clock)
    other = Lease(sections, "taken", lease_ms=60_000, clock=clock)
    assert holder.acquire() and holder.held is not None
    epoch = holder.held.epoch
    assert not other.acquire()
    clock.lapse(holder)
    assert other.acquire()  # once the stored record expired
    assert holder.held is None and holder.lapsed  # not known here until the store is read
    assert not holder.acquire(only_ours=True) and not holder.lapsed
    assert not holder.acquire()
    assert other.held is not None and other.held.epoch == epoch + 1
    other.release()


def test_the_epoch_grows_across_a_lease_given_up(store: Any) -> None:
    """A release removed the lease's record, so the next holder's epoch was 1 again: after a
    clean hand-over, a fencing token and ``reactive status`` said the lease never changed hands."""
    sections, clock = section_store(store), Clock()
    first = Lease(sections, "handed", lease_ms=60_000, clock=clock)
    second = Lease(sections, "handed", lease_ms=60_000, clock=clock)
    assert first.acquire() and first.held is not None and first.held.epoch == 1
    first.release()
    assert first.current() is None  # nobody holds it
    found = sections.read_sections("handed", [LEASE_SECTION])[LEASE_SECTION]
    assert lease_status(found)["state"] == "free" and lease_status(found)["epoch"] == 1
    assert second.acquire() and second.held is not None and second.held.epoch == 2  # at once: not after 60 s
    second.release()
    assert first.acquire() and first.held is not None and first.held.epoch == 3
    first.release()


def taken(looks: queue.SimpleQueue[bool]) -> list[bool]:
    """What the keeper reported so far, in order (the queue is emptied)."""
    reports = []
    while not looks.empty():
        reports.append(looks.get())
    return reports


class Unreachable:
    """A real store that fails every call while ``down`` is set: its database went away."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.down = threading.Event()

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.store, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            if self.down.is_set():
                raise ConnectionError("the database is down")
            return method(*args, **kwargs)

        return call


def test_a_lease_that_lapses_while_its_store_is_down_is_not_reported_lost(tmp_path: Path) -> None:
    # What lapsed while the store could not be read may still be ours: reporting it lost made a
    # single process stand down and reconcile every table after each outage longer than its lease.
    store, clock = Unreachable(section_store(f"sqlite:///{tmp_path / 'checkpoints.sqlite'}")), Clock()
    lease = Lease(store, "down", lease_ms=300, clock=clock)
    looks: queue.SimpleQueue[bool] = queue.SimpleQueue()
    keeper = LeaseKeeper(lease, auto_activate=True, on_look=looks.put)
    assert lease.acquire() and lease.held is not None
    epoch = lease.held.epoch
    store.down.set()
    keeper.start()
    try:
        clock.lapse(lease)
        assert lease.lapsed
        looked(keeper, 2)  # it has looked, and failed, since the lease lapsed
        assert keeper.last_error == "ConnectionError: the database is down"
        store.down.clear()
        assert keeper.wait_held(30)
    finally:
        keeper.stop()
    reports = taken(looks)
    assert reports and False not in reports, reports
    assert lease.held is not None and lease.held.epoch == epoch


def test_a_lease_taken_and_given_up_while_its_holder_was_cut_off_is_reported_lost(tmp_path: Path) -> None:
    # Free again when its holder can reach the store, but it changed hands meanwhile: what ran
    # under the old tenure must stand down before a new one starts, not go on as if held throughout.
    sections, clock = section_store(f"sqlite:///{tmp_path / 'checkpoints.sqlite'}"), Clock()
    store = Unreachable(sections)
    lease, other = Lease(store, "cut", lease_ms=300, clock=clock), Lease(sections, "cut", lease_ms=300, clock=clock)
    looks: queue.SimpleQueue[bool] = queue.SimpleQueue()
    keeper = LeaseKeeper(lease, auto_activate=True, on_look=looks.put)
    assert lease.acquire()
    store.down.set()
    keeper.start()
    try:
        clock.lapse(lease)
        assert other.acquire()  # the other process took it once it expired...
        other.release()  # ...and gave it up
        assert lease.lapsed
        taken(looks)  # what was reported before the store answered again
        store.down.clear()
        assert keeper.wait_held(30)
    finally:
        keeper.stop()
    reports = taken(looks)
    assert reports[:2] == [False, True], reports  # lost, then a new tenure


class Paused:
    """A real store that the threads a table started itself (its lease keeper, its writer) wait
    on while ``paused`` is set: their process stopped (SIGSTOP) right after the test's last call."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.paused = threading.Event()
        self.caller = threading.current_thread()

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.store, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            while self.paused.is_set() and threading.current_thread() is not self.caller:
                self.paused.wait(0.01)
            return method(*args, **kwargs)

        return call


def test_a_replica_paused_past_its_lease_writes_nothing_behind_once_another_took_over(store: Any) -> None:
    # Its writer went on with what was queued before the pause: the stale value replaced the
    # new active replica's, and Synchronize said every write was durable.
    paused = Paused(section_store(store))
    old = table(paused, "jobs", flags=Table.WR_ACTIVE_REPLICA, lease_ms=300)
    assert old.GetActiveStatus()
    paused.paused.set()
    old.Write("cursor", "stale")  # queued; the process stops before its writer writes it
    new = table(store, "jobs", flags=Table.WR_ACTIVE_REPLICA | Table.CHECKPOINT_COLLOCATED, lease_ms=300)
    new.SetAutoActivate(True)
    assert new.WaitActive(10)  # once the old lease expired
    new.Write("cursor", "new")
    assert new.Synchronize(30)
    paused.paused.clear()  # the old process goes on
    assert not old.Synchronize(30)  # its write was given up, not written
    assert not old.GetActiveStatus()
    assert new.Read(["cursor"]) == {"cursor": "new"}
    new.Deactivate()
    old.Deactivate()


_OPENS = """
import sys, duckdb
duckdb.connect(sys.argv[1]).close()
"""


def test_a_table_closes_the_connection_it_opened_and_not_a_datalayer_s(tmp_path: Path) -> None:
    """A Table given a URI opened a connection nothing could close: a DuckDB file stayed locked
    to other processes (a MongoDB client kept its monitor threads) until it was collected."""
    path = tmp_path / "jobs.duckdb"

    def others_can_open() -> bool:
        return subprocess.run([sys.executable, "-c", _OPENS, str(path)], capture_output=True).returncode == 0

    with Table("jobs", Table.WR_ACTIVE_REPLICA, *LIMITS, store=f"duckdb:///{path}") as jobs:
        jobs.Write("cursor", "42")
        assert not others_can_open()  # DuckDB: one process at a time
    assert others_can_open()
    assert not jobs.GetActiveStatus()  # its lease given up: a standby takes over at once
    jobs.close()  # again: nothing to do
    with pytest.raises(reactive.ConfigurationError, match="checkpoint table 'jobs' is closed"):
        jobs.Read("cursor")  # DuckDB's "Connection already closed!" before
    with reactive.connect(f"duckdb:///{path}") as db:
        assert Table("jobs", Table.WR_ALL_REPLICAS, *LIMITS, store=db).Read("cursor") == {"cursor": "42"}
        Table("other", Table.WR_ALL_REPLICAS, *LIMITS, store=db).close()
        assert Table("jobs", Table.WR_ALL_REPLICAS, *LIMITS, store=db).Read("cursor") == {"cursor": "42"}  # open


def test_flags_and_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="flags"):
        Table("t", Table.WR_ALL_REPLICAS | Table.WR_ACTIVE_REPLICA, *LIMITS, store="duckdb://")
    with pytest.raises(ValueError, match="max_sections"):
        Table("t", Table.WR_ALL_REPLICAS, None, 0, 1, 1, store="duckdb://")
    with pytest.raises(ValueError, match="retention_ms"):
        Table("t", Table.WR_ALL_REPLICAS, -5, 1, 1, 1, store="duckdb://")
    with pytest.raises(ValueError, match="store must be"):
        Table("t", Table.WR_ALL_REPLICAS, *LIMITS, store=42)  # type: ignore[arg-type]
    # A Table's lease went unchecked (reactive.connect's was checked): NaN, infinity, text, 10 ms
    # and True were taken. A bool retention passed as 1 ms. One check now (check_lease_ms).
    for lease_ms in (float("nan"), float("inf"), "5000", 10, True, 1e30, 86_400_001):
        with pytest.raises(ValueError, match="lease_ms must be a number of milliseconds of at least 100"):
            Table("t", Table.WR_ALL_REPLICAS, *LIMITS, store="duckdb://", lease_ms=lease_ms)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="retention_ms"):
        Table("t", Table.WR_ALL_REPLICAS, True, 1, 1, 1, store="duckdb://")
    assert (Table.WR_ALL_REPLICAS, Table.WR_ACTIVE_REPLICA, Table.WR_ACTIVE_REPLICA_WEAK) == (1, 2, 4)
    assert Table.CHECKPOINT_COLLOCATED == 8


# -- processes: a holder killed, a writer killed -----------------------------------------------------
def _process(code: str, tmp_path: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE, text=True, env=env, cwd=tmp_path
    )


def test_a_standby_takes_over_at_once_when_the_holder_is_killed(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'checkpoints.sqlite'}"
    holder = _process(
        f"""
        import sys, time
        from reactive.checkpoints import Table
        t = Table("jobs", Table.WR_ALL_REPLICAS, None, 8, 64, 32, store={uri!r}, lease_ms=60_000)
        assert t.Activate()
        print("active", flush=True)
        sys.stdin = None
        time.sleep(600)
        """,
        tmp_path,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "active"
        standby = Table("jobs", Table.WR_ALL_REPLICAS, None, 8, 64, 32, store=uri, lease_ms=60_000)
        assert not standby.Activate()
        standby.SetAutoActivate(True)
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(10)
        killed = time.monotonic()
        assert standby.WaitActive(10)
        assert time.monotonic() - killed < 2  # its pid is gone: no need to wait for the 60 s lease
        standby.Deactivate()
    finally:
        holder.kill()
        holder.wait(10)


def test_a_write_killed_midway_leaves_old_or_new_values_never_a_mix(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'checkpoints.sqlite'}"
    writer = _process(
        f"""
        from reactive.checkpoints import Table
        t = Table("gen", Table.WR_ALL_REPLICAS, None, 8, 100_000, 32, store={uri!r})
        for i in range(10**9):
            t.Write({{"a": str(i) * 5000, "b": str(i) * 5000}})
            if i == 20:
                print("writing", flush=True)
        """,
        tmp_path,
    )
    try:
        assert writer.stdout is not None and writer.stdout.readline().strip() == "writing"
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait(10)
    finally:
        writer.kill()
        writer.wait(10)
    found = Table("gen", Table.WR_ALL_REPLICAS, None, 8, 100_000, 32, store=uri).Read(["a", "b"])
    generation = found["a"][: len(found["a"]) // 5000]
    assert found == {"a": generation * 5000, "b": generation * 5000}  # one call's values, whole


# -- the engine's own positions ----------------------------------------------------------------------
def test_the_engine_keeps_its_positions_in_the_checkpoint_table(mongo_uri: str, mongo) -> None:
    mongo.docs.insert_one({"_id": 1, "text": "a"})
    with reactive.connect(mongo_uri) as db:
        db.add(Listener(Model("up", predict=lambda xs: [x.upper() for x in xs]), "text", "docs"))
        db.cdc.start()
        assert db.cdc.wait_idle(timeout=30)
        name = db.cdc.listener.checkpoint_name
    with Table(ENGINE_CHECKPOINT, Table.WR_ALL_REPLICAS, None, 1000, 1 << 20, 1024, store=mongo_uri) as table:
        sections = table.Read([name, "outputs/up__text"])
    assert set(sections) == {name, "outputs/up__text"} and '"token"' in sections[name]


def test_an_unreadable_stream_position_is_said_and_everything_reconciled(mongo_uri: str, mongo) -> None:
    mongo.docs.insert_many([{"_id": i, "text": f"t{i}"} for i in range(3)])
    model = Model("up", predict=lambda xs: [x.upper() for x in xs])
    with reactive.connect(mongo_uri) as db:
        db.add(Listener(model, "text", "docs"))
        db.cdc.start()
        assert db.cdc.wait_idle(timeout=30)
        name = db.cdc.listener.checkpoint_name
    mongo.docs.update_one({"_id": 1}, {"$set": {"text": "changed while stopped"}})
    mongo.docs.delete_one({"_id": 2})
    with reactive.connect(mongo_uri) as db:
        section_store(db).write_sections(ENGINE_CHECKPOINT, {name: Section(b"{not json", True, time.time())})
    with reactive.connect(mongo_uri) as db:
        db.add(Listener(model, "text", "docs"))
        db.cdc.start()
        assert db.cdc.wait_idle(timeout=30)
        assert outputs_by_source(db, "up__text") == {0: "T0", 1: "CHANGED WHILE STOPPED"}
        source = db.cdc.info()["source"]
        assert "unreadable stream position" in source["last_error"] and source["history_lost"] == 1


def test_a_checkpoint_table_of_reactive_0_1_is_migrated(tmp_path: Path) -> None:
    import duckdb

    path = tmp_path / "app.duckdb"
    with duckdb.connect(str(path)) as client:
        client.execute(
            'CREATE TABLE "_reactive_checkpoints" (name VARCHAR PRIMARY KEY, value VARCHAR, updated_at TIMESTAMP)'
        )
        client.execute("""INSERT INTO "_reactive_checkpoints" VALUES ('outputs/x', '{"type": "string"}', now())""")
    with reactive.connect(f"duckdb:///{path}") as db:
        assert db.backend.checkpoints.load_checkpoint("outputs/x") == {"type": "string"}
        assert db.backend.output_types.get("x") == "string"

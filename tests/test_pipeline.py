"""Pipelining: model work of one window overlaps the reading and writing of others, and no
result changes: outputs land in row-version order, positions only after their outputs.

Packets are put on the handler's queue by a recording change source (the ``ChangeSource``
seam), so the tests choose exactly which windows are in flight; outputs go to real DuckDB
and PostgreSQL databases.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

import psycopg
import pytest

import reactive
from reactive.components import Listener, Model
from reactive.components.base import PlannedRefresh
from reactive.compute import LocalCompute
from reactive.events import Batch, ChangePacket, DBEvent
from reactive.handler import STALE_WINDOWS, CDCHandler, WindowRows
from reactive.queue import CDCQueue
from reactive.threads import reactive_threads
from tests.conftest import BrokenOnce, HeldTags, SQLClient, Watching, outputs_by_source


class RecordingSource:
    """A change source whose positions are numbers: it records what the handler does with them."""

    name = "recording"

    def __init__(self) -> None:
        self.saved: list[list[int]] = []
        self.committed: list[int] = []
        self.released: list[int] = []
        #: Called with the positions before they are saved (inside the window's transaction).
        self.before_save: Callable[[Sequence[int]], None] = lambda positions: None

    def save_positions(self, positions: Sequence[int]) -> None:
        self.before_save(positions)
        self.saved.append(list(positions))

    def commit(self, positions: Sequence[int]) -> None:
        self.committed.extend(positions)

    def release(self, positions: Sequence[int]) -> None:
        self.released.extend(positions)


def update(source: RecordingSource, position: int, row_id: int, text: str) -> ChangePacket:
    row = {"id": row_id, "text": text}
    return ChangePacket("docs", DBEvent.update, (row_id,), (row,), source=source, position=position)


class OutOfOrder(LocalCompute):
    """Model work computed in order, whose futures complete in a shuffled order (as a pool of
    remote workers would finish them): each result is handed on after a random delay."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.random = random.Random(seed)
        self.submitted = 0
        self.completed: list[int] = []
        self.lock = threading.Lock()

    def submit(self, model: Model, inputs: Sequence[Any], **options: Any) -> Future[list[Any]]:
        outer: Future[list[Any]] = Future()
        with self.lock:
            number, self.submitted = self.submitted, self.submitted + 1
            delay = self.random.uniform(0.0, 0.03)

        def hand_on(inner: Future[list[Any]]) -> None:
            def complete() -> None:
                with self.lock:
                    self.completed.append(number)
                outer.set_result(inner.result())

            threading.Timer(delay, complete).start()

        super().submit(model, inputs, **options).add_done_callback(hand_on)
        return outer


class Planning(Listener):
    """A listener that says when the handler has planned a batch (its model work submitted)."""

    def __init__(self, *args: Any, **options: Any) -> None:
        super().__init__(*args, **options)
        self.planned: list[tuple[DBEvent, tuple[Any, ...]]] = []
        self.changed = threading.Condition()

    def plan_refresh(self, batch: Batch, db: reactive.Datalayer, **options: Any) -> PlannedRefresh:
        planned = super().plan_refresh(batch, db, **options)
        with self.changed:
            self.planned.append((batch.event, tuple(row and row["text"] for row in batch.rows)))
            self.changed.notify_all()
        return planned

    def wait_planned(self, event: DBEvent, texts: tuple[Any, ...], timeout: float) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: (event, texts) in self.planned, timeout)


def docs(duck: SQLClient, rows: int) -> None:
    duck.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text VARCHAR)")
    if rows:
        duck.executemany("INSERT INTO docs VALUES (?, ?)", [(i, "v0") for i in range(rows)])


def test_windows_whose_model_work_completes_out_of_order_are_written_in_order(duck: SQLClient) -> None:
    docs(duck, 20)
    compute = OutOfOrder(seed=11)
    source = RecordingSource()
    rng = random.Random(5)
    latest = {i: "v0" for i in range(20)}
    with reactive.connect(duck.uri, compute=compute, pipeline=4, batch_rows=1) as db:
        db.add(Listener(Model("tag", predict=lambda xs: [f"<{x}>" for x in xs]), "text", "docs"))
        packets = []
        for position in range(200):
            row_id = rng.randrange(20)
            latest[row_id] = f"v{position + 1}"
            packets.append(update(source, position, row_id, latest[row_id]))
        db.cdc.ensure_handler()
        for packet in packets:
            db.cdc.queue.put(packet)
        assert db.cdc.wait_idle(timeout=60)
        assert outputs_by_source(db, "tag__text") == {i: f"<{text}>" for i, text in latest.items()}
    # Futures did complete out of order, and windows were finished in arrival order all the same.
    assert compute.completed != sorted(compute.completed)
    assert source.committed == list(range(200))
    assert [p for saved in source.saved for p in saved] == list(range(200))
    assert not source.released


def test_a_row_changed_back_while_its_older_version_computes_gets_the_newest_output(duck: SQLClient) -> None:
    # Row 1 is 'a' (output stored), changes to 'b', then back to 'a' while 'b' computes. The
    # window with 'a' is planned before 'b' is written: the stored output (of 'a') matches
    # it, yet it must be computed again, or the output of 'b' lands last and stays.
    docs(duck, 0)
    duck.execute("INSERT INTO docs VALUES (1, 'a')")
    predict = HeldTags("b")

    source = RecordingSource()
    with reactive.connect(duck.uri) as db:
        listener = db.add(Planning(Model("tag", predict=predict), "text", "docs"))
        assert outputs_by_source(db, "tag__text") == {1: "<a>"}
        db.cdc.ensure_handler()
        db.cdc.queue.put(update(source, 0, 1, "b"))
        assert predict.computing.wait(30)
        db.cdc.queue.put(update(source, 1, 1, "a"))
        planned = listener.wait_planned(DBEvent.update, ("a",), timeout=30)
        predict.go.set()
        assert planned, "the newer version was not planned while the older one computed"
        assert db.cdc.wait_idle(timeout=30)
        assert outputs_by_source(db, "tag__text") == {1: "<a>"}
    assert source.committed == [0, 1]


def test_a_deleted_row_inserted_again_while_the_delete_is_in_flight_keeps_its_output(duck: SQLClient) -> None:
    # The delete's window has not written when the insert's window is planned: the stored
    # output of the insert's value must not be taken as current (the delete removes it next).
    docs(duck, 0)
    duck.execute("INSERT INTO docs VALUES (1, 'a'), (2, 'x')")
    predict = HeldTags("y")

    source = RecordingSource()
    with reactive.connect(duck.uri) as db:
        listener = db.add(Planning(Model("tag", predict=predict), "text", "docs"))
        db.cdc.ensure_handler()
        # One window: row 2 computes (and blocks), row 1 is deleted.
        db.cdc.queue.put(update(source, 0, 2, "y"))
        db.cdc.queue.put(ChangePacket("docs", DBEvent.delete, (1,), source=source, position=1))
        assert predict.computing.wait(30)
        db.cdc.queue.put(
            ChangePacket("docs", DBEvent.insert, (1,), ({"id": 1, "text": "a"},), source=source, position=2)
        )
        planned = listener.wait_planned(DBEvent.insert, ("a",), timeout=30)
        predict.go.set()
        assert planned, "the insert was not planned while the delete was in flight"
        assert db.cdc.wait_idle(timeout=30)
        assert outputs_by_source(db, "tag__text") == {1: "<a>", 2: "<y>"}
    assert source.committed == [0, 1, 2]


def drop_other_connections(client: psycopg.Connection) -> None:
    """The server drops every connection to the database but ``client``'s (reactive's)."""
    client.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE datname = current_database() AND pid <> pg_backend_pid()"
    )


def test_a_window_that_fails_in_the_middle_of_a_pipeline_is_retried_before_the_next_is_written(
    pg_database: str,
) -> None:
    # Window 0 computes while window 1 is planned; then the server drops reactive's connection
    # inside window 0's transaction, so its commit fails. It is tried again, and window 1 is
    # written only after it: positions are saved in order, each with its outputs.
    with psycopg.connect(pg_database, autocommit=True) as client:
        client.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text TEXT)")
        client.execute("INSERT INTO docs VALUES (1, 'one'), (2, 'two')")
        predict = HeldTags("ONE")  # after go, "ONE" computes at once

        def drop_the_connection_once(positions: Sequence[int]) -> None:
            if not source.saved:
                drop_other_connections(client)

        compute = Watching()
        source = RecordingSource()
        source.before_save = drop_the_connection_once
        with reactive.connect(pg_database, compute=compute, lease=False) as db:
            db.add(Listener(Model("tag", predict=predict), "text", "docs"))
            db.cdc.ensure_handler()
            db.cdc.queue.put(update(source, 0, 1, "ONE"))
            assert predict.computing.wait(30)
            db.cdc.queue.put(update(source, 1, 2, "TWO"))
            assert compute.wait_for(lambda submitted: ["TWO"] in submitted, timeout=30)
            predict.go.set()
            assert db.cdc.wait_idle(timeout=60)
            assert outputs_by_source(db, "tag__text") == {1: "<ONE>", 2: "<TWO>"}
            assert db.cdc.info()["handler"]["internal_errors"] == 0
        # Window 0's first transaction was lost after its positions were saved in it; it was
        # tried again (its row read again, its output taken from the first try: not computed
        # again), and only then was window 1 written.
        assert source.saved == [[0], [0], [1]]
        assert compute.submitted.count(["ONE"]) == 1
        assert source.committed == [0, 1] and not source.released


def unread(source: RecordingSource, position: int, *ids: int) -> ChangePacket:
    """An update of ``ids`` that carries no rows (as a poll's or a backfill's): the handler reads them."""
    return ChangePacket("docs", DBEvent.update, ids, source=source, position=position)


def test_a_retried_window_takes_the_outputs_computed_and_computes_what_changed_meanwhile(pg_database: str) -> None:
    # A window's transaction is lost, and one of its rows changes before the retry. The retry
    # reads its rows again: the row that did not change takes the output computed at the first
    # try, the one that changed is computed in its new version.
    with psycopg.connect(pg_database, autocommit=True) as client:
        client.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text TEXT)")

        def change_and_drop_the_connection_once(positions: Sequence[int]) -> None:
            if not source.saved:
                client.execute("UPDATE docs SET text = 'TWO' WHERE id = 2")
                drop_other_connections(client)

        compute = Watching()
        source = RecordingSource()
        source.before_save = change_and_drop_the_connection_once
        with reactive.connect(pg_database, compute=compute, lease=False) as db:
            db.add(Listener(Model("tag", predict=lambda xs: [f"<{x}>" for x in xs]), "text", "docs"))
            db.cdc.ensure_handler()
            client.execute("INSERT INTO docs VALUES (1, 'one'), (2, 'two')")
            db.cdc.queue.put(unread(source, 0, 1, 2))  # as a poll delivers them: ids only
            assert db.cdc.wait_idle(timeout=60)
            assert outputs_by_source(db, "tag__text") == {1: "<one>", 2: "<TWO>"}
            assert db.errors() == []
        assert source.saved == [[0], [0]] and source.committed == [0]
        assert compute.submitted == [["one", "two"], ["TWO"]]


class ReadsBy:
    """Records which thread reads rows of ``docs`` (the reads themselves are the database's);
    a read on the reader thread first waits for ``hold`` where one is given."""

    def __init__(self, db: reactive.Datalayer, hold: threading.Event | None = None) -> None:
        self.threads: list[str] = []
        self.hold = hold
        self.reader = reader = db.source_for("docs")
        self.original = reader.read_table

        def read_table(table: Any, ids: Any) -> Any:
            name = threading.current_thread().name
            self.threads.append(name)
            if self.hold is not None and name == "reactive-cdc-reader":
                assert self.hold.wait(30)
            return self.original(table, ids)

        reader.read_table = read_table  # type: ignore[method-assign]

    def undo(self) -> None:
        del self.reader.read_table


def test_rows_a_window_must_read_are_read_ahead_on_a_thread_that_stops_with_the_handler(duck: SQLClient) -> None:
    # Six windows of ten ids each, no rows carried, all queued before the handler starts: from
    # the second on, each window is taken while another is in flight, and its rows are read
    # on the reader thread. Outputs and positions are what they are without reading ahead.
    docs(duck, 60)
    duck.execute("UPDATE docs SET text = 'w' || id")
    with reactive.connect(duck.uri) as db:
        db.add(Listener(Model("tag", predict=lambda xs: [f"<{x}>" for x in xs]), "text", "docs"))
        duck.execute("UPDATE docs SET text = 'n' || id WHERE id % 7 = 0")
        duck.execute("DELETE FROM docs WHERE id = 33")
        reads = ReadsBy(db)
        queue, source = CDCQueue(), RecordingSource()
        for position in range(6):
            queue.put(unread(source, position, *range(position * 10, position * 10 + 10)))
        handler = CDCHandler(db, queue, compute=db.compute, window_rows=WindowRows(10, 10), pipeline=2)
        handler.start()
        handler.stop()  # closes the queue: what waits is processed first
        handler.join(timeout=60)
        reads.undo()
        assert not handler.is_alive()
        assert reads.threads[0] == handler.name and reads.threads[1:] == ["reactive-cdc-reader"] * 5
        assert "reactive-cdc-reader" not in [t.name for t in reactive_threads()]
        expected = {i: f"<{'n' if i % 7 == 0 else 'w'}{i}>" for i in range(60) if i != 33}
        assert outputs_by_source(db, "tag__text") == expected
    assert source.committed == list(range(6)) and not source.released


def test_a_window_read_ahead_is_planned_while_the_one_before_computes(duck: SQLClient) -> None:
    # As test_a_row_changed_back_while_its_older_version_computes_gets_the_newest_output, with
    # packets that carry no rows: the second window's rows are read ahead while the model is
    # held on the first, and it is planned as soon as they are read, not after the first is written.
    docs(duck, 0)
    duck.execute("INSERT INTO docs VALUES (1, 'a')")
    predict = HeldTags("b")
    source = RecordingSource()
    with reactive.connect(duck.uri, batch_rows=1) as db:
        listener = db.add(Planning(Model("tag", predict=predict), "text", "docs"))
        reads = ReadsBy(db)
        db.cdc.ensure_handler()
        duck.execute("UPDATE docs SET text = 'b' WHERE id = 1")
        db.cdc.queue.put(unread(source, 0, 1))
        assert predict.computing.wait(30)
        duck.execute("UPDATE docs SET text = 'a' WHERE id = 1")
        db.cdc.queue.put(unread(source, 1, 1))
        planned = listener.wait_planned(DBEvent.update, ("a",), timeout=30)
        predict.go.set()
        assert planned, "the window read ahead was not planned while the one before computed"
        assert db.cdc.wait_idle(timeout=30)
        reads.undo()
        assert outputs_by_source(db, "tag__text") == {1: "<a>"}
        assert "reactive-cdc-reader" in reads.threads
    assert source.committed == [0, 1]


def test_a_window_whose_model_work_ends_first_is_written_while_the_next_is_read(duck: SQLClient) -> None:
    # The second window's read is held (on the reader thread) until the first window saves its
    # positions: the handler must write the first window while that read is under way, and plan
    # the second after it. Row 3 is in both windows and changes while the first is written.
    docs(duck, 6)
    duck.execute("UPDATE docs SET text = 'x' WHERE id = 3")
    saving = threading.Event()
    source = RecordingSource()

    def before_save(positions: Sequence[int]) -> None:
        if positions == [0]:
            duck.execute("UPDATE docs SET text = 'y' WHERE id = 3")
            saving.set()

    source.before_save = before_save
    planned_after: list[list[list[int]]] = []
    with reactive.connect(duck.uri) as db:
        listener = db.add(Listener(Model("tag", predict=lambda xs: [f"<{x}>" for x in xs]), "text", "docs"))
        original = listener.plan_refresh

        def plan_refresh(batch: Batch, db: reactive.Datalayer, **options: Any) -> PlannedRefresh:
            planned_after.append([list(saved) for saved in source.saved])
            return original(batch, db, **options)

        listener.plan_refresh = plan_refresh  # type: ignore[method-assign]
        reads = ReadsBy(db, hold=saving)
        queue = CDCQueue()
        queue.put(unread(source, 0, 0, 1, 2, 3))
        queue.put(unread(source, 1, 3, 4, 5))
        handler = CDCHandler(db, queue, compute=db.compute, window_rows=WindowRows(4, 4), pipeline=2)
        handler.start()
        handler.stop()
        handler.join(timeout=60)
        reads.undo()
        assert not handler.is_alive()
        assert reads.threads == [handler.name, "reactive-cdc-reader"]
        assert planned_after == [[], [[0]]]  # the second window: planned once the first was saved
        assert outputs_by_source(db, "tag__text") == {0: "<v0>", 1: "<v0>", 2: "<v0>", 3: "<y>", 4: "<v0>", 5: "<v0>"}
    assert source.committed == [0, 1] and not source.released


def test_a_read_ahead_that_fails_is_read_again_when_its_window_comes(duck: SQLClient) -> None:
    # The reader thread's read of the second window raises: planning that window fails, and it
    # is planned again (its rows read again) when its turn comes, after the first is written.
    docs(duck, 8)
    source = RecordingSource()
    with reactive.connect(duck.uri) as db:
        db.add(Listener(Model("tag", predict=lambda xs: [f"<{x}>" for x in xs]), "text", "docs"))
        duck.execute("UPDATE docs SET text = 'w' || id")
        reader = db.source_for("docs")
        original = reader.read_table
        failed: list[str] = []

        def read_table(table: Any, ids: Any) -> Any:
            name = threading.current_thread().name
            if name == "reactive-cdc-reader" and not failed:
                failed.append(name)
                raise RuntimeError("the read ahead failed")
            return original(table, ids)

        reader.read_table = read_table  # type: ignore[method-assign]
        queue = CDCQueue()
        queue.put(unread(source, 0, 0, 1, 2, 3))
        queue.put(unread(source, 1, 4, 5, 6, 7))
        handler = CDCHandler(db, queue, compute=db.compute, window_rows=WindowRows(4, 4), pipeline=2)
        handler.start()
        handler.stop()
        handler.join(timeout=60)
        del reader.read_table
        assert not handler.is_alive() and failed == ["reactive-cdc-reader"]
        assert handler.totals.internal_errors == 0
        assert outputs_by_source(db, "tag__text") == {i: f"<w{i}>" for i in range(8)}
        stats = handler.stats["tag__text"]
        assert stats.errors == 0 and stats.computed == 8
    assert source.committed == [0, 1] and not source.released


def _handler_that_breaks_once(db: reactive.Datalayer) -> tuple[CDCHandler, BrokenOnce, CDCQueue, RecordingSource]:
    """A started handler, two windows of two packets in flight, whose own window rule raises
    after the first window: six updates of ``docs`` queued."""
    window_rows = BrokenOnce(2, 2)
    window_rows.armed.set()
    db.add(Listener(Model("tag", predict=lambda xs: [f"<{x}>" for x in xs]), "text", "docs"))
    queue, source = CDCQueue(), RecordingSource()
    for position in range(6):
        queue.put(update(source, position, position, f"w{position}"))
    handler = CDCHandler(db, queue, compute=db.compute, window_rows=window_rows, pipeline=2)
    handler.start()
    return handler, window_rows, queue, source


@pytest.mark.parametrize("drop_outputs", [True, False])
def test_a_window_in_flight_never_writes_for_a_listener_removed_meanwhile(duck: SQLClient, drop_outputs: bool) -> None:
    # Its model computed the window while db.remove(..., drop_outputs=True) ran: the window was
    # written afterwards, the dropped outputs table came back with the old outputs, and the
    # listener added again took them for current (computing nothing).
    duck.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text VARCHAR)")
    computing, release = threading.Event(), threading.Event()

    def gated(texts: list[str]) -> list[int]:
        computing.set()
        assert release.wait(30)
        return [len(t) for t in texts]

    with reactive.connect(duck.uri, poll_interval=0.05) as db:
        db.add(Listener(Model("len", predict=gated), "text", "docs"))
        db.cdc.start()
        duck.execute("INSERT INTO docs SELECT i, 'abc' FROM range(100) t(i)")
        assert computing.wait(30)
        removing = threading.Thread(target=db.remove, args=("len__text",), kwargs={"drop_outputs": drop_outputs})
        removing.start()
        removing.join(0.5)  # done by now, unless it waits for the window being written (either is right)
        release.set()
        removing.join(30)
        assert not removing.is_alive() and db.cdc.wait_idle(30)
        if drop_outputs:  # it stays dropped (without: made by the window if written before the removal)
            tables = "SELECT count(*) FROM information_schema.tables WHERE table_name = '_outputs__len__text'"
            assert duck.execute(tables) == [(0,)]
        db.add(Listener(Model("len", predict=lambda texts: [10 * len(t) for t in texts]), "text", "docs"))
        outputs = outputs_by_source(db, "len__text")
        if drop_outputs:
            assert outputs == {i: 30 for i in range(100)}  # afresh: every row by the new model
        else:  # kept where written (a new predict of the same version keeps outputs), the rest computed
            assert set(outputs) == set(range(100)) and set(outputs.values()) <= {3, 30}


def test_a_removal_does_not_wait_for_a_model_still_computing_a_window(duck: SQLClient) -> None:
    # The window's model work was awaited under the datalayer's writing lock: db.remove waited
    # for a slow model, and for ever for a model hung without a timeout.
    duck.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text VARCHAR)")
    computing, release = threading.Event(), threading.Event()

    def gated(texts: list[str]) -> list[int]:
        computing.set()
        assert release.wait(60)
        return [len(t) for t in texts]

    # pipeline=1: the window is finished (its work awaited) as soon as it is planned.
    with reactive.connect(duck.uri, poll_interval=0.05, pipeline=1) as db:
        db.add(Listener(Model("len", predict=gated), "text", "docs"))
        db.cdc.start()
        duck.execute("INSERT INTO docs SELECT i, 'abc' FROM range(100) t(i)")
        assert computing.wait(30)
        removing = threading.Thread(target=db.remove, args=("len__text",), kwargs={"drop_outputs": True})
        try:
            removing.start()
            removing.join(30)
            assert not removing.is_alive()  # returned while the model computes
        finally:
            release.set()
        assert db.cdc.wait_idle(30)
        tables = "SELECT count(*) FROM information_schema.tables WHERE table_name = '_outputs__len__text'"
        assert duck.execute(tables) == [(0,)]  # and the window wrote nothing for it


def test_a_failure_of_the_handlers_own_releases_the_windows_in_flight_and_it_goes_on(duck: SQLClient) -> None:
    # Windows of two packets, two in flight: window [0, 1] is written, then the handler's own
    # rule raises while [2, 3] is planned. [2, 3] is released (its source delivers it again);
    # the handler goes on with [4, 5] and stops normally.
    docs(duck, 6)
    with reactive.connect(duck.uri) as db:
        handler, window_rows, queue, source = _handler_that_breaks_once(db)
        handler.stop()  # closes the queue: what waits is processed (or released) first
        handler.join(timeout=60)
        assert not handler.is_alive() and window_rows.broken.is_set()
        assert handler.totals.internal_errors == 1
        assert source.committed == [0, 1, 4, 5] and source.released == [2, 3]
        assert queue.join(timeout=0)  # every packet taken is settled
        assert outputs_by_source(db, "tag__text") == {0: "<w0>", 1: "<w1>", 2: "<v0>", 3: "<v0>", 4: "<w4>", 5: "<w5>"}


def test_a_stop_cuts_the_pause_after_a_failure_of_the_handlers_own_short(
    duck: SQLClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The pause after the handler's own failure is an hour here: a stop during it (the queue
    # closed) must end it, and what waits is drained as on any stop.
    monkeypatch.setattr(reactive.handler, "_backoff", lambda failures: 3600.0)
    docs(duck, 6)
    with reactive.connect(duck.uri) as db:
        handler, window_rows, _, source = _handler_that_breaks_once(db)
        assert window_rows.broken.wait(60)  # it failed: the pause begins (or is about to)
        handler.stop()
        handler.join(timeout=60)
        assert not handler.is_alive() and handler.totals.internal_errors == 1
        assert source.committed == [0, 1, 4, 5] and source.released == [2, 3]


def test_wait_idle_waits_for_what_the_handler_released_and_the_listener_delivers_again(sql: SQLClient) -> None:
    # The same failure with a real listener: the window of a row of `notes`, in flight behind
    # that of a row of `docs` (both from one poll: a poller polls again once what it queued is
    # settled), is released; the listener reads that row again (on SQLite too, where a poll
    # skips a table nobody wrote to since its last diff), and one wait_idle covers it.
    docs(sql, 0)
    sql.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, text VARCHAR)")
    predict = HeldTags("A")

    window_rows, compute = BrokenOnce(1, 1), Watching()
    with reactive.connect(sql.uri, compute=compute, batch_rows=window_rows, poll_interval=0.05) as db:
        model = Model("tag", predict=predict)
        db.add(Listener(model, "text", "docs"))
        db.add(Listener(model, "text", "notes", identifier="notes_tag"))
        sql.execute("INSERT INTO docs VALUES (1, 'A')")
        sql.execute("INSERT INTO notes VALUES (2, 'B')")
        window_rows.armed.set()
        db.cdc.start()  # its first poll queues a packet of each table
        assert predict.computing.wait(30)
        assert compute.wait_for(lambda submitted: ["B"] in submitted, timeout=30)
        predict.go.set()
        assert db.cdc.wait_idle(timeout=60)
        assert outputs_by_source(db, "tag__text") == {1: "<A>"}
        assert outputs_by_source(db, "notes_tag") == {2: "<B>"}
        assert window_rows.broken.is_set() and db.cdc.listener.releases == 1
        assert compute.submitted.count(["B"]) == 2  # computed again once delivered again
        info = db.cdc.info()["handler"]
        assert info["internal_errors"] == 1 and info["running"]


@pytest.mark.parametrize("pipeline", [1, 3])
def test_pipeline_depth_changes_no_result_and_the_compute_thread_stops(duck: SQLClient, pipeline: int) -> None:
    docs(duck, 50)
    source = RecordingSource()
    with reactive.connect(duck.uri, pipeline=pipeline, batch_rows=7) as db:
        db.add(Listener(Model("tag", predict=lambda xs: [f"<{x}>" for x in xs], batch_size=3), "text", "docs"))
        db.cdc.ensure_handler()
        for position in range(50):
            db.cdc.queue.put(update(source, position, position, f"w{position}"))
        assert db.cdc.wait_idle(timeout=60)
        assert outputs_by_source(db, "tag__text") == {i: f"<w{i}>" for i in range(50)}
        assert "reactive-compute" in [t.name for t in reactive_threads()]
        db.cdc.stop()
        assert "reactive-compute" not in [t.name for t in reactive_threads()]
    assert source.committed == list(range(50))


def test_a_pipeline_of_no_windows_is_refused() -> None:
    with pytest.raises(reactive.ConfigurationError, match="pipeline must be a whole number of at least 1"):
        reactive.connect("duckdb://", pipeline=0)


def _window_sizes(
    duck: SQLClient,
    window_rows: WindowRows,
    packets: int,
    *,
    feed: bool = False,
    packet_rows: int = 1,
    call_seconds: float = 0.0,
    row_seconds: float = 0.0,
    learnt: list[float | None] | None = None,
    batch_size: int = 1_000,
    sort_by_length: bool = True,
) -> list[int]:
    """The windows' rows when ``packets`` changes of ``packet_rows`` rows each wait before a
    handler with these window bounds (and no pipelining: each window is finished before the
    next is taken), with a change feed published, or not. Each call of the model takes at
    least ``call_seconds`` (a cost per window where a window is one call: ``batch_size``
    larger than any window) and ``row_seconds`` per row."""
    rows = packets * packet_rows
    docs(duck, rows)
    sizes: list[int] = []
    pause = threading.Event()  # never set: a wait on it is the model's cost per call

    def predict(texts: list[str]) -> list[str]:
        pause.wait(call_seconds + row_seconds * len(texts))
        return [f"<{x}>" for x in texts]

    class Windows(LocalCompute):  # each window's model work is one submit
        def submit(self, model: Model, inputs: Sequence[Any], **options: Any) -> Future[list[Any]]:
            sizes.append(len(inputs))
            return super().submit(model, inputs, **options)

    model = Model("tag", predict=predict, batch_size=batch_size, sort_by_length=sort_by_length)
    with reactive.connect(duck.uri, compute=Windows()) as db:
        db.add(Listener(model, "text", "docs"))
        sizes.clear()  # the backfill's
        if feed:
            db.cdc.publish()
        queue, source = CDCQueue(), RecordingSource()
        for position in range(packets):
            ids = range(position * packet_rows, (position + 1) * packet_rows)
            rows_of = tuple({"id": i, "text": f"w{i}"} for i in ids)
            queue.put(ChangePacket("docs", DBEvent.update, tuple(ids), rows_of, source=source, position=position))
        handler = CDCHandler(db, queue, compute=db.compute, window_rows=window_rows, pipeline=1, feed=db.cdc.feed_hub)
        handler.start()
        handler.stop()  # closes the queue: what waits is processed first
        handler.join(timeout=60)
        assert not handler.is_alive()
        if learnt is not None:  # what the handler learnt a window costs whatever its rows
            learnt.append(handler.window_cost.fixed)
        assert outputs_by_source(db, "tag__text") == {i: f"<w{i}>" for i in range(rows)}
        assert source.committed == list(range(packets))
    return sizes


def test_windows_grow_twofold_up_to_their_cap_while_they_are_quick(duck: SQLClient) -> None:
    # A target of an hour: every window is "quick", so each bound is twice the one before.
    # (The model's batches, larger than any window, are not what windows are sized by here.)
    assert _window_sizes(duck, WindowRows(2, 8, target=3600.0, model_batches=0), 30) == [2, 4, 8, 8, 8]


def test_windows_grow_with_a_change_feed_published_too(duck: SQLClient) -> None:
    # The feed's buffer is bounded in changes, not windows: larger windows hold no more.
    assert _window_sizes(duck, WindowRows(2, 8, target=3600.0, model_batches=0), 30, feed=True) == [2, 4, 8, 8, 8]


def test_windows_stay_at_their_floor_while_they_are_slow(duck: SQLClient) -> None:
    # A target of a nanosecond: no window is quick enough to grow. One window twice the floor
    # is tried, to tell a cost per window from a cost per row: per row here (20 ms a row).
    assert _window_sizes(duck, WindowRows(3, 8, target=1e-9), 12, row_seconds=0.02) == [3, 6, 3]


def test_windows_grow_where_their_time_is_mostly_a_cost_per_window(duck: SQLClient) -> None:
    # Each window costs at least 0.2 s whatever its rows (each model call does), its rows next
    # to nothing; packets of 4 rows, target 0.3 s. A window of 4 rows in about 0.2 s: the rate
    # seen fits 6 rows in the target, which whole packets never reach (one packet is 4 rows,
    # two are 8). A window of twice the rows is tried once; it takes about as long, so the
    # cost is per window, and windows may take up to four times that cost: they grow.
    learnt: list[float | None] = []
    sizes = _window_sizes(duck, WindowRows(4, 64, target=0.3), 40, packet_rows=4, call_seconds=0.2, learnt=learnt)
    assert 8 in sizes and max(sizes) >= 32, sizes
    assert learnt[0] is not None and learnt[0] >= 0.1  # about the 0.2 s each window's call takes
    assert sum(sizes) == 160


def test_windows_of_a_cost_per_row_stay_near_their_target(duck: SQLClient) -> None:
    # The same packets, and each row of a window costs 0.05 s: a window of 4 rows takes 0.2 s,
    # one of 8 rows 0.4 s (tried once): the cost is per row, and windows stay at one packet.
    # After STALE_WINDOWS windows of one size, one of 8 rows is tried again.
    # Undisturbed: ten windows of 4 rows and two of 8 (the probe, and the one after
    # STALE_WINDOWS; the first window may be slower: one-time costs). A pause of the process
    # (a busy CI machine) in a window of 4 rows reads as a cost per window: twice it, halved
    # with each later pair, so windows may reach 16 rows once before they shrink back. A cost
    # per window takes them to 32-64 (above).
    sizes = _window_sizes(duck, WindowRows(4, 64, target=0.3), 14, packet_rows=4, row_seconds=0.05)
    assert max(sizes) <= 16 and 8 in sizes and sizes.count(4) >= 5, sizes
    assert sum(sizes) == 56 and STALE_WINDOWS == 8


@pytest.mark.parametrize(
    ("window_rows", "sort_by_length", "grown"),
    [
        (WindowRows(3, 64, target=1e-9, model_batches=4), True, True),
        (WindowRows(3, 64, target=1e-9, model_batches=0), True, False),
        (WindowRows(3, 64, target=1e-9, model_batches=4), False, False),
        (WindowRows(3, 64, target=1e-9, model_batches=4, model_seconds=0.01), True, False),
    ],
    ids=["sorted", "no-model-batches", "not-sorted", "model-too-slow"],
)
def test_windows_of_a_model_sorting_by_length_hold_whole_batches_of_it(
    duck: SQLClient, window_rows: WindowRows, sort_by_length: bool, grown: bool
) -> None:
    # A slow model (10 ms a row) keeps windows at their floor of 3 rows, or 6 while a larger
    # window is tried. One that sorts its inputs by length (batches of 2) sorts each window's:
    # once its speed is known (after the first window), windows hold 4 of its batches, as it
    # computes them well within model_seconds (2 s). Not where it does not sort, where
    # model_batches is 0, or where 4 batches would take it over model_seconds.
    sizes = _window_sizes(duck, window_rows, 40, row_seconds=0.01, batch_size=2, sort_by_length=sort_by_length)
    assert sum(sizes) == 40 and sizes[0] == 3, sizes
    # Windows may grow for speed once in a while (a pause of the process reads as a cost per
    # window), then shrink back: only a raised floor keeps every window but the last at 8 or more.
    assert (min(sizes[1:-1]) >= 8) is grown, sizes


@pytest.mark.parametrize(
    ("batches", "seconds"), [(-1, 2.0), (1.5, 2.0), (True, 2.0), (4, -1.0), (4, "2"), (4, None), (4, float("nan"))]
)
def test_bad_model_batches_of_windows_are_refused(batches: Any, seconds: Any) -> None:
    with pytest.raises(ValueError, match="WindowRows needs model_"):
        WindowRows(model_batches=batches, model_seconds=seconds)


@pytest.mark.parametrize("bad", [0, -5, 2.5, "5000", True])
def test_a_bad_batch_rows_is_refused_with_what_it_takes(bad: Any) -> None:
    with pytest.raises(reactive.ConfigurationError, match="batch_rows must be a positive int, a WindowRows or None"):
        reactive.connect("duckdb://", batch_rows=bad)


@pytest.mark.parametrize(
    ("floor", "cap", "target", "longest"),
    [
        (0, 10, 1.0, None),
        (10, 5, 1.0, None),
        (5, 10, 0.0, None),
        (5, 10, -1.0, None),
        (1.5, 10, 1.0, None),
        (5, 10, "0.25", None),
        (5, 10, True, None),
        (5, 10, float("nan"), None),
        (5, 10, 1.0, 0.5),
        (5, 10, 1.0, "2"),
        (5, 10, 1.0, float("nan")),
    ],
)
def test_bad_window_bounds_are_refused(floor: Any, cap: Any, target: Any, longest: Any) -> None:
    with pytest.raises(ValueError, match="WindowRows needs"):
        WindowRows(floor, cap, target=target, longest=longest)


def test_windows_grow_only_while_they_end_well_inside_the_lease() -> None:
    with reactive.connect("duckdb://") as db:
        # The default lease (5 s): a window may take a sixth of it where its cost is per window.
        assert db.cdc.window_rows == WindowRows(5_000, 50_000, target=0.25, longest=5_000 / 6_000)
        assert db.cdc.info()["handler"]["window_rows"] == 5_000
        assert db.cdc.info()["handler"]["window_fixed_seconds"] is None  # nothing learnt yet
    with reactive.connect("duckdb://", lease_ms=600) as db:  # a window may take a sixth of the lease
        assert db.cdc.window_rows == WindowRows(5_000, 50_000, target=0.1, longest=0.1)
    with reactive.connect("duckdb://", batch_rows=300, lease_ms=600) as db:  # fixed windows stay fixed
        assert db.cdc.window_rows == WindowRows(300, 300)

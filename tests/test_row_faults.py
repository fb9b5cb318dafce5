"""A row the handler cannot write fails alone: the rest of its window is written, and the changes
after it go on.

The faults here are the database's own refusals of one row (a CHECK constraint or a trigger the
application put on an outputs table), not a model's errors (``test_model_faults``): the write of a
whole window fails, and the handler narrows it down. A database that refuses every row is not a
row's fault: nothing becomes an error, and the window is delivered again until it is written.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

import reactive
from reactive.components import Listener, Model
from reactive.events import ChangePacket, DBEvent
from reactive.handler import CDCHandler, WindowRows
from reactive.queue import CDCQueue
from tests.conftest import outputs_by_source
from tests.test_pipeline import RecordingSource


def refuse_bad(client: psycopg.Connection) -> None:
    """The application's own rule on the outputs of ``tag__text``, which reactive knows nothing of."""
    client.execute("""ALTER TABLE "_outputs__tag__text" ADD CONSTRAINT no_bad CHECK ("_output" <> '<bad>')""")


def tag(texts: list[str]) -> list[str]:
    return [f"<{t}>" for t in texts]


class Counted:
    """``tag``, recording every input it computes (until ``until`` is set, where given)."""

    def __init__(self, until: threading.Event | None = None) -> None:
        self.inputs: list[str] = []
        self.until = until

    def __call__(self, texts: list[str]) -> list[str]:
        if self.until is None or not self.until.is_set():
            self.inputs.extend(texts)
        return tag(texts)


class Failures(logging.Handler):
    """Sets ``seen`` when the handler logs that it releases a window."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if "they will be delivered again" in record.getMessage():
            self.seen.set()


@pytest.fixture
def failures() -> Iterator[Failures]:
    handler = Failures()
    logger = logging.getLogger("reactive.handler")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


def test_a_row_postgres_refuses_fails_alone_and_the_rest_of_its_window_is_written(pg_database: str) -> None:
    with psycopg.connect(pg_database, autocommit=True) as client:
        client.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text TEXT)")
        client.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT)")
        client.execute("INSERT INTO docs VALUES (1, 'a'), (2, 'b'), (3, 'c')")
        with reactive.connect(pg_database, poll_interval=0.05) as db:
            db.add(Listener(Model("tag", predict=tag), "text", "docs"))
            db.add(Listener(Model("note", predict=tag), "text", "notes"))
            refuse_bad(client)
            db.cdc.start()
            with client.transaction():  # one poll sees them all: one window
                client.execute("UPDATE docs SET text = 'bad' WHERE id = 2")
                client.execute("INSERT INTO docs VALUES (4, 'd'), (5, 'e')")
                client.execute("INSERT INTO notes VALUES (1, 'n')")
            assert db.cdc.wait_idle(60)
            # Row 2's old output is gone: it has no current one (as after a model's failure).
            assert outputs_by_source(db, "tag__text") == {1: "<a>", 3: "<c>", 4: "<d>", 5: "<e>"}
            assert outputs_by_source(db, "note__text") == {1: "<n>"}
            (error,) = db.errors("tag__text")
            assert error["source"] == 2 and error["table"] == "docs"
            assert "failed on this row alone" in error["error"] and "no_bad" in error["error"]
            assert db.errors("note__text") == []
            assert db.cdc.info()["listeners"]["tag__text"]["errors"] == 1
            # Later changes go on.
            client.execute("UPDATE docs SET text = 'A' WHERE id = 1")
            assert db.cdc.wait_idle(60)
            assert outputs_by_source(db, "tag__text")[1] == "<A>"
            # Retried while the rule still refuses it (change capture stopped: a handler of its
            # own), the row is set apart again, its error kept.
            db.cdc.stop()
            assert db.retry_errors("tag__text") == 1
            assert [e["source"] for e in db.errors("tag__text")] == [2]
            db.cdc.start()
            # Nothing is lost: once the rule allows it, the row is computed again.
            client.execute('ALTER TABLE "_outputs__tag__text" DROP CONSTRAINT no_bad')
            assert db.retry_errors("tag__text") == 1
            assert outputs_by_source(db, "tag__text")[2] == "<bad>"
            assert db.errors() == []


def test_a_row_a_sqlite_trigger_refuses_fails_alone(tmp_path: Path) -> None:
    path = tmp_path / "app.db"
    with sqlite3.connect(path) as client:
        client.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text TEXT)")
        client.executemany("INSERT INTO docs VALUES (?, ?)", [(i, f"t{i}") for i in range(40)])
    with reactive.connect(f"sqlite:///{path}", poll_interval=0.05) as db:
        db.add(Listener(Model("tag", predict=tag), "text", "docs"))
        with sqlite3.connect(path) as client:
            client.execute(
                "CREATE TRIGGER no_bad BEFORE UPDATE ON _outputs__tag__text WHEN NEW._output LIKE '%bad%' "
                "BEGIN SELECT RAISE(ABORT, 'bad outputs are not allowed'); END"
            )
            client.execute(
                "CREATE TRIGGER no_bad_insert BEFORE INSERT ON _outputs__tag__text WHEN NEW._output LIKE '%bad%' "
                "BEGIN SELECT RAISE(ABORT, 'bad outputs are not allowed'); END"
            )
        db.cdc.start()
        with sqlite3.connect(path) as client:  # one transaction: one window of 40 rows
            client.execute("UPDATE docs SET text = CASE WHEN id IN (7, 30) THEN 'bad' || id ELSE 'u' || id END")
        assert db.cdc.wait_idle(60)
        outputs = outputs_by_source(db, "tag__text")
        assert outputs == {i: f"<u{i}>" for i in range(40) if i not in (7, 30)}
        errors = sorted((e["source"], e["error"]) for e in db.errors("tag__text"))
        assert [source for source, _ in errors] == [7, 30]
        assert all("bad outputs are not allowed" in message for _, message in errors)


def test_a_database_that_refuses_every_row_turns_nothing_into_errors(pg_database: str, failures: Failures) -> None:
    rows = 256
    with psycopg.connect(pg_database, autocommit=True) as client:
        client.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text TEXT)")
        client.execute(f"INSERT INTO docs SELECT i, 't' || i FROM generate_series(1, {rows}) AS i")
        counted = Counted(until=failures.seen)  # what was computed until the window was first released
        with reactive.connect(pg_database, poll_interval=0.05) as db:
            db.add(Listener(Model("tag", predict=counted), "text", "docs"))
            before = {i: f"<t{i}>" for i in range(1, rows + 1)}
            assert outputs_by_source(db, "tag__text") == before
            # Refuses every output from now on (the rows written so far stay).
            client.execute(
                """ALTER TABLE "_outputs__tag__text" ADD CONSTRAINT none_now CHECK ("_output" IS NULL) NOT VALID"""
            )
            counted.inputs.clear()
            db.cdc.start()
            client.execute("UPDATE docs SET text = upper(text)")
            assert failures.seen.wait(60)
            assert db.errors() == []  # not the rows' fault
            assert outputs_by_source(db, "tag__text") == before
            # Narrowing gave up early (a few parts, not every row one by one), and its parts
            # computed nothing again: they took the outputs of the window's model work.
            assert 0 < len(counted.inputs) <= rows and len(set(counted.inputs)) == len(counted.inputs)
            client.execute('ALTER TABLE "_outputs__tag__text" DROP CONSTRAINT none_now')
            assert db.cdc.wait_idle(60)  # delivered again, and written this time
            assert outputs_by_source(db, "tag__text") == {i: f"<T{i}>" for i in range(1, rows + 1)}
            assert db.errors() == []
            assert db.cdc.info()["handler"]["internal_errors"] >= 1


def handled(db: reactive.Datalayer, queue: CDCQueue, **options: Any) -> CDCHandler:
    """A handler that processed everything ``queue`` holds, and stopped."""
    handler = CDCHandler(db, queue, compute=db.compute, **options)
    handler.start()
    handler.stop()
    handler.join(timeout=60)
    assert not handler.is_alive()
    return handler


def update(source: RecordingSource, position: int, *rows: tuple[int, str]) -> ChangePacket:
    ids = tuple(i for i, _ in rows)
    return ChangePacket(
        "docs", DBEvent.update, ids, tuple({"id": i, "text": t} for i, t in rows), source=source, position=position
    )


def test_narrowing_saves_positions_once_after_the_window_and_a_later_version_wins(pg_database: str) -> None:
    # One window of three packets: row 2 is refused in the first, written in its later version
    # in the third; row 5 is refused in a packet of four rows. Only row 5 fails, and the
    # positions are saved once, in order, with the window.
    with psycopg.connect(pg_database, autocommit=True) as client:
        client.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text TEXT)")
        client.execute("INSERT INTO docs VALUES (0, 'seed')")
        with reactive.connect(pg_database, lease=False) as db:
            counted = Counted()
            db.add(Listener(Model("tag", predict=counted), "text", "docs"))
            refuse_bad(client)
            counted.inputs.clear()
            source, queue = RecordingSource(), CDCQueue()
            queue.put(update(source, 0, (1, "a"), (2, "bad")))
            queue.put(update(source, 1, (3, "c"), (4, "d"), (5, "bad"), (6, "f")))
            queue.put(update(source, 2, (2, "b")))
            handler = handled(db, queue, window_rows=WindowRows(100, 100))
            # The window's model work was done once (row 2 in its last version): its parts took
            # the outputs computed (each part computing again: 26 inputs).
            assert counted.inputs == ["a", "b", "c", "d", "bad", "f"]
            outputs = {0: "<seed>", 1: "<a>", 2: "<b>", 3: "<c>", 4: "<d>", 6: "<f>"}
            assert outputs_by_source(db, "tag__text") == outputs
            assert [(e["source"], "no_bad" in e["error"]) for e in db.errors()] == [(5, True)]
            assert source.saved == [[0, 1, 2]] and source.committed == [0, 1, 2] and not source.released
            assert handler.totals.internal_errors == 1 and handler.stats["tag__text"].errors == 1


def test_narrowing_computes_nothing_again_for_a_chained_listener(pg_database: str) -> None:
    # A listener on the outputs of another: its work is planned as those outputs are written,
    # so each part of a narrowed window planned it again. It takes what it computed, as the
    # first listener does: each of its inputs is computed once.
    with psycopg.connect(pg_database, autocommit=True) as client:
        client.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text TEXT)")
        client.execute("INSERT INTO docs VALUES (0, 'seed')")
        with reactive.connect(pg_database, lease=False) as db:
            first, chained = Counted(), Counted()
            db.add(Listener(Model("tag", predict=first), "text", "docs"))
            db.add(Listener(Model("again", predict=chained), "_output", "_outputs__tag__text"))
            refuse_bad(client)
            first.inputs.clear()
            chained.inputs.clear()
            source, queue = RecordingSource(), CDCQueue()
            rows = [(i, "bad" if i == 5 else f"t{i}") for i in range(1, 9)]
            queue.put(update(source, 0, *rows))
            handled(db, queue, window_rows=WindowRows(100, 100))
            assert first.inputs == [t for _, t in rows]
            # The first try computed the chained work of the whole window (row 5's too, before
            # its output was refused); the parts took it.
            assert sorted(chained.inputs) == sorted(f"<{t}>" for _, t in rows)
            again = {0: "<<seed>>", **{i: f"<<t{i}>>" for i in range(1, 9) if i != 5}}
            assert outputs_by_source(db, "again___output") == again
            assert [e["source"] for e in db.errors()] == [5]
            assert source.committed == [0]


def test_a_row_refused_alone_in_its_window_is_set_apart_once_another_window_is_written(pg_database: str) -> None:
    # Alone, a refused row cannot be told from a database that refuses everything: it is
    # delivered again; once another window was written since a window last failed, it is set apart.
    with psycopg.connect(pg_database, autocommit=True) as client:
        client.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text TEXT)")
        client.execute("INSERT INTO docs VALUES (0, 'seed')")
        with reactive.connect(pg_database, lease=False) as db:
            db.add(Listener(Model("tag", predict=tag), "text", "docs"))
            refuse_bad(client)
            source, queue = RecordingSource(), CDCQueue()
            queue.put(update(source, 0, (1, "bad")))
            queue.put(update(source, 1, (2, "b")))
            queue.put(update(source, 0, (1, "bad")))  # what the source delivers again
            # Another lone row refused, with no window written since row 1 failed: released.
            queue.put(update(source, 2, (3, "bad")))
            handled(db, queue, window_rows=WindowRows(1, 1), pipeline=1)
            assert source.released == [0, 2] and source.saved == [[1], [0]] and source.committed == [1, 0]
            assert outputs_by_source(db, "tag__text") == {0: "<seed>", 2: "<b>"}
            assert [e["source"] for e in db.errors()] == [1]


def test_a_document_mongodb_refuses_fails_alone(mongo_uri: str, mongo) -> None:
    # The application's unique index on the outputs: the second document with the same output
    # is refused (E11000), the others of the stream are written. MongoDB names the documents of
    # a bulk write it refused, so the store refuses those itself (the handler narrows nothing).
    mongo.docs.insert_one({"_id": "seed", "text": "seed"})
    with reactive.connect(mongo_uri) as db:
        db.add(Listener(Model("tag", predict=tag), "text", "docs"))
        mongo["_outputs__tag__text"].create_index("_output", unique=True)
        db.cdc.start()
        mongo.docs.insert_many([{"_id": i, "text": "same" if i in (3, 6) else f"t{i}"} for i in range(10)])
        assert db.cdc.wait_idle(60)
        outputs = outputs_by_source(db, "tag__text")
        assert outputs == {"seed": "<seed>", **{i: "<same>" if i == 3 else f"<t{i}>" for i in range(10) if i != 6}}
        (error,) = db.errors("tag__text")
        assert error["source"] == 6 and "duplicate key" in error["error"].lower()
        mongo.docs.update_one({"_id": 1}, {"$set": {"text": "later"}})
        assert db.cdc.wait_idle(60)
        assert outputs_by_source(db, "tag__text")[1] == "<later>"


def test_a_retry_the_database_refuses_keeps_the_errors_it_cleared(pg_database: str, failures: Failures) -> None:
    with psycopg.connect(pg_database, autocommit=True) as client:
        client.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text TEXT)")
        client.execute("INSERT INTO docs VALUES (1, 'a'), (2, 'b'), (3, 'c')")
        with reactive.connect(pg_database, poll_interval=0.05) as db:
            db.add(Listener(Model("tag", predict=tag), "text", "docs"))
            refuse_bad(client)
            db.cdc.start()
            with client.transaction():
                client.execute("UPDATE docs SET text = 'bad' WHERE id = 2")
                client.execute("UPDATE docs SET text = 'C' WHERE id = 3")
            assert db.cdc.wait_idle(60)
            assert [e["source"] for e in db.errors()] == [2]
            # Now the database refuses every output: of two changes after it, the second at
            # least is released (the first lone row to fail after a write may be set apart).
            client.execute(
                """ALTER TABLE "_outputs__tag__text" ADD CONSTRAINT none_now CHECK ("_output" IS NULL) NOT VALID"""
            )
            client.execute("UPDATE docs SET text = 'A' WHERE id = 1")
            client.execute("UPDATE docs SET text = 'CC' WHERE id = 3")
            assert failures.seen.wait(60)
            db.cdc.stop()
            before = {e["source"]: e["error"] for e in db.errors()}
            assert "no_bad" in before[2]
            with pytest.raises(reactive.BackendError, match="none_now"):
                db.retry_errors()
            # The retry cleared them, failed, and recorded them again: still listed.
            assert {e["source"]: e["error"] for e in db.errors()} == before
            client.execute('ALTER TABLE "_outputs__tag__text" DROP CONSTRAINT none_now')
            client.execute('ALTER TABLE "_outputs__tag__text" DROP CONSTRAINT no_bad')
            assert db.retry_errors() == len(before)
            db.cdc.start()
            assert db.cdc.wait_idle(60)
            assert outputs_by_source(db, "tag__text") == {1: "<A>", 2: "<bad>", 3: "<CC>"}
            assert db.errors() == []

"""The MongoDB backend against a real server (SecantusDB, or $MONGO_URI)."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import enum
import logging
import re
import threading
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import numpy as np
import pytest
from bson import Code, Decimal128, ObjectId, Regex
from conftest import (
    BrokenOnce,
    HeldTags,
    Recorder,
    Watching,
    add_constant_listeners,
    add_filtered_lengths,
    outputs_by_source,
    outputs_of,
    scanned_pages,
    types_of,
    within,
)
from pymongo import InsertOne, monitoring

import reactive
from reactive.backends.mongodb import listener as mongo_listener
from reactive.backends.mongodb.checkpoints import MongoSections
from reactive.checkpoints import Lease, Positions
from reactive.components import Listener, Model
from reactive.threads import reactive_threads


def test_inserts_updates_replaces_deletes_by_a_plain_client(mongo_uri: str, mongo, recorder: Recorder) -> None:
    mongo.docs.insert_many([{"_id": 1, "text": "alpha"}, {"_id": 2, "text": "beta"}])
    with reactive.connect(mongo_uri) as db:
        db.add(Listener(Model("tag", predict=recorder), "text", "docs"))
        assert outputs_by_source(db, "tag__text") == {1: "<alpha>", 2: "<beta>"}
        db.cdc.start()
        mongo.docs.insert_one({"_id": 3, "text": "gamma"})
        mongo.docs.update_one({"_id": 1}, {"$set": {"text": "ALPHA"}})
        mongo.docs.replace_one({"_id": 2}, {"text": "bravo", "extra": True})
        mongo.docs.delete_one({"_id": 3})
        mongo.docs.insert_one({"_id": 4, "text": "delta"})
        assert db.cdc.wait_idle(timeout=30)
        assert outputs_by_source(db, "tag__text") == {1: "<ALPHA>", 2: "<bravo>", 4: "<delta>"}
        stats = db.cdc.info()["listeners"]["tag__text"]
        assert stats["errors"] == 0
        stored = mongo["_outputs__tag__text"].find_one({"_id": 4})
        assert stored["_source"] == 4 and stored["_output"] == "<delta>"
    assert not reactive_threads()


def test_a_defect_on_one_change_is_said_and_retried_not_the_end_of_the_listener(
    mongo_uri: str, mongo, recorder: Recorder, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An exception that is not the server's (on Python 3.13 every change raised a TypeError)
    ended the listener's thread: nothing was followed any more, and a table monitor's start
    waited for its barrier for ever. Now it is logged with its traceback and the stream reopens
    before that change: nothing is skipped."""
    take = mongo_listener.MongoChangeStreamListener._take_change
    failures = iter([TypeError("a defect")])

    def flaky(self: Any, change: dict[str, Any]) -> None:
        if change.get("ns", {}).get("coll") == "docs" and (failure := next(failures, None)) is not None:
            raise failure
        take(self, change)

    monkeypatch.setattr(mongo_listener.MongoChangeStreamListener, "_take_change", flaky)
    with reactive.connect(mongo_uri) as db:
        db.add(Listener(Model("m", predict=recorder), "text", "docs"))
        db.cdc.start()
        with caplog.at_level("ERROR", logger="reactive"):
            mongo.docs.insert_one({"_id": 1, "text": "first"})
            assert db.cdc.wait_idle(timeout=30)
        assert outputs_by_source(db, "m__text") == {1: "<first>"}
        assert "unexpected error; reopening it" in caplog.text and "TypeError: a defect" in caplog.text
        assert db.cdc.listener is not None and db.cdc.listener.is_alive()


def test_wait_idle_waits_for_changes_the_handler_released_and_the_stream_delivers_again(mongo_uri: str, mongo) -> None:
    # A failure of the handler's own (after B's window is planned behind A's, A's is written)
    # releases B's window; the stream reads B again from the last saved position. One
    # wait_idle returns only once B's output is written, though the queue was empty meanwhile.
    predict = HeldTags("A")

    window_rows, compute = BrokenOnce(1, 1), Watching()
    with reactive.connect(mongo_uri, compute=compute, batch_rows=window_rows) as db:
        db.add(Listener(Model("tag", predict=predict), "text", "docs"))
        db.cdc.start()
        window_rows.armed.set()
        mongo.docs.insert_one({"_id": 1, "text": "A"})
        assert predict.computing.wait(30)
        mongo.docs.insert_one({"_id": 2, "text": "B"})
        assert compute.wait_for(lambda submitted: ["B"] in submitted, timeout=30)  # planned while A computes
        predict.go.set()
        assert db.cdc.wait_idle(timeout=60)
        assert outputs_by_source(db, "tag__text") == {1: "<A>", 2: "<B>"}
        assert window_rows.broken.is_set() and db.cdc.listener.releases == 1
        assert db.cdc.info()["handler"]["internal_errors"] == 1


def test_insert_then_delete_in_one_window_computes_nothing(mongo_uri: str, mongo) -> None:
    """The handler coalesces an insert and a delete of one row that arrive in the same window."""
    entered, release = threading.Event(), threading.Event()
    seen: list[str] = []

    def model(texts: list[str]) -> list[str]:
        seen.extend(texts)
        if "blocker" in texts:
            entered.set()
            assert release.wait(30), "the test never released the model"
        return texts

    mongo.create_collection("docs")
    # pipeline=1: the handler waits for the blocker's window before it takes the next.
    with reactive.connect(mongo_uri, pipeline=1) as db:
        db.add(Listener(Model("m", predict=model), "text", "docs"))
        db.cdc.start()
        mongo.docs.insert_one({"_id": 0, "text": "blocker"})
        assert entered.wait(30)  # the handler waits for the model
        mongo.docs.insert_one({"_id": 1, "text": "short-lived"})
        mongo.docs.insert_one({"_id": 2, "text": "kept"})
        mongo.docs.delete_one({"_id": 1})
        assert db.cdc.listener.sync(timeout=30)  # every event above is queued behind the blocker
        release.set()
        assert db.cdc.wait_idle(timeout=30)
        assert outputs_by_source(db, "m__text") == {0: "blocker", 2: "kept"}
        assert "short-lived" not in seen


def test_update_of_another_field_does_not_recompute(mongo_uri: str, mongo, recorder: Recorder) -> None:
    mongo.docs.insert_one({"_id": 1, "text": "alpha", "views": 0})
    with reactive.connect(mongo_uri) as db:
        db.add(Listener(Model("tag", predict=recorder), "text", "docs"))
        db.cdc.start()
        for _ in range(3):
            mongo.docs.update_one({"_id": 1}, {"$inc": {"views": 1}})
        assert db.cdc.wait_idle(timeout=30)
        assert recorder.inputs == ["alpha"]
        assert db.cdc.info()["listeners"]["tag__text"]["skipped"] >= 1


def test_filter_moves_documents_in_and_out(mongo_uri: str, mongo, recorder: Recorder) -> None:
    mongo.docs.insert_many([{"_id": "a", "text": "one", "lang": "en"}, {"_id": "b", "text": "two", "lang": "de"}])
    with reactive.connect(mongo_uri) as db:
        db.add(Listener(Model("tag", predict=recorder), "text", "docs", filter={"lang": "en"}))
        assert outputs_by_source(db, "tag__text") == {"a": "<one>"}
        db.cdc.start()
        mongo.docs.update_one({"_id": "b"}, {"$set": {"lang": "en"}})
        mongo.docs.update_one({"_id": "a"}, {"$set": {"lang": "fr"}})
        mongo.docs.insert_one({"_id": "c", "text": "three", "lang": "de"})
        assert db.cdc.wait_idle(timeout=30)
        assert outputs_by_source(db, "tag__text") == {"b": "<two>"}


def test_a_key_and_a_filter_can_be_paths_into_nested_documents(mongo_uri: str, mongo, recorder: Recorder) -> None:
    # "meta.title" matched nothing: every document was recorded as having no value for it, and a
    # filter on "meta.lang" beside the key "meta" failed db.add (a projection "path collision").
    mongo.docs.insert_many(
        [
            {"_id": 1, "meta": {"title": "one", "lang": "en"}},
            {"_id": 2, "meta": {"title": "two", "lang": "de"}},
            {"_id": 3, "meta": "flat"},
        ]
    )
    with reactive.connect(mongo_uri) as db:
        db.add(Listener(Model("tag", predict=recorder), "meta.title", "docs"))
        db.add(
            Listener(
                Model("whole", predict=lambda ms: [sorted(m) for m in ms]), "meta", "docs", filter={"meta.lang": "en"}
            )
        )
        assert outputs_by_source(db, "tag__meta.title") == {1: "<one>", 2: "<two>"}
        assert outputs_by_source(db, "whole__meta") == {1: ["lang", "title"]}
        assert [(e["source"], e["error"]) for e in db.errors()] == [(3, "row has no value for key 'meta.title'")]
        assert db.errors()[0]["at"].tzinfo is datetime.UTC  # pymongo read BSON's UTC time without a zone
        db.cdc.start()
        mongo.docs.update_one({"_id": 2}, {"$set": {"meta.lang": "en", "meta.title": "TWO"}})
        mongo.docs.update_one({"_id": 3}, {"$set": {"meta": {"title": "three"}}})
        assert db.cdc.wait_idle(timeout=30)
        assert outputs_by_source(db, "tag__meta.title") == {1: "<one>", 2: "<TWO>", 3: "<three>"}
        assert outputs_by_source(db, "whole__meta") == {1: ["lang", "title"], 2: ["lang", "title"]}
        assert db.errors() == []


def test_a_view_is_refused_at_add_and_its_collection_named(mongo_uri: str, mongo, recorder: Recorder) -> None:
    # A view's backfill worked (find reads views), but the stream names the collection a write
    # goes to, never the view: no change reached the listener, and wait_idle said True.
    mongo.docs.insert_one({"_id": 1, "text": "a", "keep": True})
    mongo.command("create", "kept", viewOn="docs", pipeline=[{"$match": {"keep": True}}])
    with reactive.connect(mongo_uri) as db:
        with pytest.raises(reactive.ConfigurationError, match=r"'kept' is a view on 'docs'.*select 'docs'"):
            db.add(Listener(Model("tag", predict=recorder), "text", "kept"))
        assert db.show() == [] and recorder.calls == 0
        db.add(Listener(Model("tag", predict=recorder), "text", "docs", filter={"keep": True}))
        assert outputs_by_source(db, "tag__text") == {1: "<a>"}


@pytest.mark.parametrize(
    ("collection", "says"),
    [
        ("system.views", "change streams do not report system collections"),
        ("metrics", "time-series collection"),
        ("_reactive_checkpoints", "reactive's own"),
        ("_reactive_marks", "reactive's own"),
        ("a$b", "MongoDB cannot name it"),
    ],
)
def test_a_collection_no_change_stream_reports_is_refused_at_add(
    mongo_uri: str, mongo, recorder: Recorder, collection: str, says: str
) -> None:
    # Each was taken: the backfill was all a listener got (mongod streams no system or
    # time-series collection; the stream takes the marks for barriers), a listener on the
    # checkpoints computed every save of a position, and 'a$b' failed db.add with pymongo's
    # InvalidName after registering the listener.
    mongo.create_collection("metrics", timeseries={"timeField": "at"})
    mongo.metrics.insert_one({"at": datetime.datetime(2024, 1, 2), "text": "a"})
    with reactive.connect(mongo_uri) as db:
        db.add(Listener(Model("tag", predict=recorder), "text", "docs"))
        db.cdc.start()
        assert db.cdc.wait_idle(timeout=30)
        with pytest.raises(
            reactive.ConfigurationError, match=rf"'{re.escape(collection)}' cannot be followed: .*{says}"
        ):
            db.add(Listener(Model("m", predict=recorder), "text", collection))
        assert [c["identifier"] for c in db.show()] == ["tag__text"] and recorder.calls == 0


def test_a_missing_collection_named_like_one_but_for_case_is_said(mongo_uri: str, mongo, caplog) -> None:
    # Taken as an empty collection (MongoDB makes one at its first insert), without a word:
    # a listener on 'Docs' where the documents are in 'docs' computed nothing, for ever.
    mongo.docs.insert_one({"_id": 1, "text": "a"})
    with reactive.connect(mongo_uri) as db, caplog.at_level(logging.WARNING):
        db.add(Listener(Model("len", predict=lambda xs: [len(x) for x in xs]), "text", "Docs"))
        assert db.outputs("len__text") == []
    assert "collection 'Docs' does not exist: it is followed as an empty one" in caplog.text
    assert "did you mean 'docs'?" in caplog.text


def test_a_listener_on_its_own_outputs_is_refused_at_add(mongo_uri: str, mongo, recorder: Recorder) -> None:
    # It was taken: once a document was there, each output it wrote was a change that computed
    # it again, for ever (db.add's backfill never returned, nor did a stop).
    with reactive.connect(mongo_uri) as db:
        with pytest.raises(reactive.ConfigurationError, match="'self___output' would read its own outputs"):
            db.add(Listener(Model("self", predict=recorder), "_output", "_outputs__self___output"))
        assert db.show() == [] and recorder.calls == 0


def test_a_filter_narrows_a_reconciliations_query_and_documents_that_left_it_lose_their_outputs(
    mongo_uri: str, mongo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A filtered listener's reconciliation read every document to compare each with the filter
    in Python; its query now asks for the equalities MongoDB can test as Python does or more
    loosely (a dotted name is left to Python).
    Documents that left the filter while no process ran lose their outputs at the restart."""
    from reactive.backends.mongodb.backend import MongoSource

    scanned = scanned_pages(monkeypatch, MongoSource)
    owner = ObjectId("64b7f0c2a1b2c3d4e5f60718")
    mongo.docs.insert_many(
        [{"_id": i, "text": f"t{i}", "tenant": f"c{i % 50}", "owner": owner if i % 2 else None} for i in range(1000)]
    )
    filters = {"tenant": {"tenant": "c7", "owner": owner}, "dotted": {"tenant": "c8", "meta.n": 1}}

    with reactive.connect(mongo_uri) as db:
        first = add_filtered_lengths(db, filters)
    assert set(first["tenant"]) == {i for i in range(1000) if i % 50 == 7}
    assert first["dotted"] == {}  # no document has meta.n
    assert sum(scanned) == 20 + 20  # the first filter entirely, the second by its tenant
    mongo.docs.update_one({"_id": 7}, {"$set": {"tenant": "c9"}})  # leaves the filter
    mongo.docs.update_one({"_id": 9}, {"$set": {"tenant": "c7"}})  # enters it
    scanned.clear()
    with reactive.connect(mongo_uri) as db:
        again = add_filtered_lengths(db, filters)
    assert again["tenant"] == {i: len(f"t{i}") for i in [*first["tenant"], 9] if i != 7}
    assert sum(scanned) == 20 + 20


def test_a_numeric_filter_narrows_the_query_to_what_pythons_equality_keeps(
    mongo_uri: str, mongo, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    """Python's 1 == 1.0 == True: the query asks for 1 (MongoDB matches 1.0 and a long too) and
    True (which MongoDB never equates with a number), and for "1", so a document holding the
    text reaches the listener, which says the filter cannot match it. Other numbers are not read."""
    from reactive.backends.mongodb.backend import MongoSource

    scanned = scanned_pages(monkeypatch, MongoSource)
    values = [1, True, 1.0, "1", 2, False, 0, None]
    mongo.docs.insert_many([{"_id": i, "text": "t", "n": v} for i, v in enumerate(values)])
    mongo.docs.insert_many([{"_id": 100 + i, "text": "t", "n": 7} for i in range(50)])
    with reactive.connect(mongo_uri) as db, caplog.at_level("WARNING", "reactive.components.listener"):
        db.add(Listener(Model("one", predict=lambda xs: xs), "text", "docs", filter={"n": 1}))
        db.add(Listener(Model("no", predict=lambda xs: xs), "text", "docs", filter={"n": False}))
        assert set(outputs_by_source(db, "one__text")) == {0, 1, 2}  # 1, True, 1.0
        assert set(outputs_by_source(db, "no__text")) == {5, 6}  # False, 0
        assert sum(scanned) == 4 + 2
        [told] = [r.getMessage() for r in caplog.records]
        assert told.startswith("listener 'one__text': filter {'n': 1} matches no row whose 'n' holds a str")


def test_a_filter_holding_a_lone_surrogate_matches_no_document_and_fails_nothing(mongo_uri: str, mongo) -> None:
    """BSON cannot encode a lone surrogate: put in the reconciliation's query, it failed db.add
    (UnicodeEncodeError). It is left to Python, where no document's text equals it."""
    mongo.docs.insert_many([{"_id": i, "text": "t", "lang": "en"} for i in range(3)])
    with reactive.connect(mongo_uri) as db:
        db.add(Listener(Model("odd", predict=lambda xs: xs), "text", "docs", filter={"lang": "\udc80"}))
        assert outputs_by_source(db, "odd__text") == {} and db.errors() == []


def test_a_filter_on_an_object_id_written_as_its_hex_is_said_once(mongo_uri: str, mongo, caplog) -> None:
    """An ObjectId never equals its hex (Python's ==, as MongoDB's own match): a filter written
    with the text an application prints matched no document, without a word."""
    author = ObjectId("64b7f0c2a1b2c3d4e5f60718")
    mongo.docs.insert_many([{"_id": i, "text": "a", "author": author} for i in (1, 2)])
    with reactive.connect(mongo_uri) as db, caplog.at_level("WARNING", "reactive.components.listener"):
        hexed = Listener(Model("hex", predict=lambda xs: xs), "text", "docs", filter={"author": str(author)})
        db.add(hexed)
        db.add(Listener(Model("oid", predict=lambda xs: xs), "text", "docs", filter={"author": author}))
        assert outputs_by_source(db, "hex__text") == {}
        assert outputs_by_source(db, "oid__text") == {1: "a", 2: "a"}
        assert [r.getMessage() for r in caplog.records] == [
            "listener 'hex__text': filter {'author': '64b7f0c2a1b2c3d4e5f60718'} matches no row whose 'author' "
            "holds a bson.objectid.ObjectId: a bson.objectid.ObjectId never equals a str: "
            "filter on ObjectId('64b7f0c2a1b2c3d4e5f60718')"
        ]


def test_drop_and_rename_stop_that_listener_and_others_go_on(mongo_uri: str, mongo, recorder: Recorder) -> None:
    for name in ("docs", "notes", "keep"):
        mongo[name].insert_one({"_id": 1, "text": name})
    with reactive.connect(mongo_uri) as db:
        for name in ("docs", "notes", "keep"):
            db.add(Listener(Model(name, predict=recorder), "text", name))
        db.cdc.start()
        mongo.docs.drop()
        mongo.notes.rename("notes_old")
        mongo.keep.insert_one({"_id": 2, "text": "still followed"})
        assert db.cdc.wait_idle(timeout=30)
        info = db.cdc.info()
        assert info["stopped_tables"] == {"docs": "dropped", "notes": "renamed to 'notes_old'"}
        assert info["source"]["tables"] == ["keep"]
        assert outputs_by_source(db, "keep__text") == {1: "<keep>", 2: "<still followed>"}
        # A collection created again under the old name is not followed until added again.
        mongo.docs.insert_one({"_id": 9, "text": "new"})
        assert db.cdc.wait_idle(timeout=30)
        assert outputs_by_source(db, "docs__text") == {1: "<docs>"}


def test_restart_catches_up_without_recomputing(mongo_uri: str, mongo) -> None:
    mongo.docs.insert_many([{"_id": i, "text": f"doc {i}"} for i in range(5)])
    first = Recorder()
    with reactive.connect(mongo_uri) as db:
        db.add(Listener(Model("tag", predict=first), "text", "docs"))
        db.cdc.start()
        mongo.docs.insert_one({"_id": 5, "text": "doc 5"})
        assert db.cdc.wait_idle(timeout=30)
    assert sorted(first.inputs) == [f"doc {i}" for i in range(6)]

    mongo.docs.insert_one({"_id": 6, "text": "doc 6"})
    mongo.docs.update_one({"_id": 1}, {"$set": {"text": "doc one"}})
    mongo.docs.update_one({"_id": 2}, {"$set": {"other": 1}})
    mongo.docs.delete_one({"_id": 3})

    second = Recorder()
    with reactive.connect(mongo_uri) as db:
        db.add(Listener(Model("tag", predict=second), "text", "docs"))
        db.cdc.start()
        assert db.cdc.wait_idle(timeout=30)
        assert sorted(second.inputs) == ["doc 6", "doc one"]
        assert set(outputs_by_source(db, "tag__text")) == {0, 1, 2, 4, 5, 6}


def test_bad_documents_are_recorded_and_the_rest_proceed(mongo_uri: str, mongo) -> None:
    def embed(texts: list[str]) -> list[list[float]]:
        return [[float(len(t)), float(t.count(" "))] for t in texts]

    with reactive.connect(mongo_uri) as db:
        mongo.docs.insert_one({"_id": "seed", "text": "seed"})
        db.add(Listener(Model("emb", predict=embed, max_retries=0), "text", "docs"))
        db.cdc.start()
        mongo.docs.insert_many(
            [
                {"_id": 1, "text": "int id"},
                {"_id": "s", "text": "string id"},
                {"_id": {"user": 7, "n": 1}, "text": "compound id"},
                {"_id": 2, "body": "no text field"},
                {"_id": 3, "text": 12345},
                {"_id": 4, "text": "x" * (15 * 1024 * 1024)},
                {"_id": 5, "text": "after the bad ones"},
            ]
        )
        assert db.cdc.wait_idle(timeout=60)
        outputs = {str(row["_source"]): row["_output"] for row in db.outputs("emb__text")}
        assert set(outputs) == {"seed", "1", "s", "{'user': 7, 'n': 1}", "5"}
        assert outputs["{'user': 7, 'n': 1}"] == [11.0, 1.0]
        errors = {str(e["source"]): e["error"] for e in db.errors("emb__text")}
        assert set(errors) == {"2", "3", "4"}
        assert "no value for key 'text'" in errors["2"]
        assert "TypeError" in errors["3"]
        assert "larger than max_input_bytes" in errors["4"]


def test_an_output_bson_cannot_hold_is_refused_alone(mongo_uri: str, mongo) -> None:
    """pymongo refuses a whole bulk write when one document cannot be encoded: only the
    outputs BSON cannot hold are refused, with why; the window's others are stored."""
    outputs = {
        "fine": {"m": 1},
        "huge int": {"m": 2**70},
        "nul in a key": {"a\x00b": 1},
        "list": [1, 2],
        "nested huge int": {"a": {"b": [2**64]}},
    }
    mongo.docs.insert_many([{"_id": i, "text": text} for i, text in enumerate(outputs)])
    with reactive.connect(mongo_uri) as db:
        model = Model("j", predict=lambda texts: [outputs[t] for t in texts], output_type="json")
        db.add(Listener(model, "text", "docs"))
        assert outputs_by_source(db, "j__text") == {0: {"m": 1}, 3: [1, 2]}
        errors = {e["source"]: e["error"] for e in db.errors("j__text")}
        assert set(errors) == {1, 2, 4}
        assert all(error.startswith("MongoDB cannot store this output: ") for error in errors.values())
        assert "8-byte ints" in errors[1] and "NUL" in errors[2]


def test_a_declared_output_type_bson_cannot_hold_is_refused_at_add_and_the_others_work(mongo_uri: str, mongo) -> None:
    """date, time, interval and uint64 outputs failed every row ("cannot encode object", "8-byte
    ints"); they are refused at db.add now, as on PostgreSQL and SQLite, with nothing
    registered. Decimals, which failed too, are stored as BSON's Decimal128; one of more
    digits than it holds is refused for its row. Types BSON holds go on working (a UUID as
    its text, maps with text keys)."""
    mongo.docs.insert_many([{"_id": 1, "text": "a"}, {"_id": 2, "text": "bb"}])
    with reactive.connect(mongo_uri) as db:
        for n, kind in enumerate(["decimal(38, 2)", "date", "time", "interval", "uint64", "map<int64, string>"]):
            model = Model(f"bad{n}", predict=lambda xs: [None for _ in xs], output_type=kind)
            with pytest.raises(
                reactive.ConfigurationError, match=f"output type '{re.escape(kind)}' cannot be stored on mongodb"
            ):
                db.add(Listener(model, "text", "docs"))
        assert db.show() == []
        good = {
            "uuid": (uuid.UUID(int=7), "00000000-0000-0000-0000-000000000007"),
            "struct<a: int64, t: array<timestamp>>": ({"a": 1, "t": [datetime.datetime(2024, 1, 2)]},) * 2,
            "map<string, array<float32>>": ({"k": [0.5]},) * 2,
            "uint32": (2**32 - 1,) * 2,
            "struct<price: decimal(10, 2)>": ({"price": Decimal("12.50")}, {"price": Decimal128("12.50")}),
        }
        for n, (kind, (value, stored)) in enumerate(good.items()):
            db.add(
                Listener(Model(f"ok{n}", predict=lambda xs, v=value: [v for _ in xs], output_type=kind), "text", "docs")
            )
            assert outputs_by_source(db, f"ok{n}__text") == {1: stored, 2: stored}
        assert db.errors() == []
        wide = {"a": Decimal("-0.5"), "bb": Decimal("1" * 29 + "." + "1" * 9)}  # 38 digits: Arrow's, not BSON's
        db.add(Listener(Model("dec", predict=lambda xs: [wide[x] for x in xs], output_type="decimal"), "text", "docs"))
        assert outputs_by_source(db, "dec__text") == {1: Decimal128("-0.5")}
        [error] = db.errors("dec__text")
        assert error["source"] == 2 and "which MongoDB's Decimal128 cannot hold (34 digits)" in error["error"]


def test_datetimes_without_a_declared_type_are_bson_dates_and_dates_and_times_stay_json(mongo_uri: str, mongo) -> None:
    """A datetime output was stored as reactive's tagged JSON ({'__dt__': ...}); it is a BSON
    date now (kept to the millisecond, as every MongoDB client keeps it; an aware one as its
    instant in UTC). BSON has no date, time or interval: those are JSON's ISO 8601 text (a date
    and a time were the tagged objects, a timedelta was refused)."""
    mongo.docs.insert_many([{"_id": 1, "text": "a"}])
    moments = {
        "naive": datetime.datetime(2024, 1, 2, 3, 4, 5, 123456),
        "aware": datetime.datetime(2024, 1, 2, 5, 4, 5, 123456, tzinfo=datetime.timezone(datetime.timedelta(hours=2))),
        "day": datetime.date(2024, 1, 2),
        "clock": datetime.time(3, 4, 5),
        "span": datetime.timedelta(days=1, seconds=5, microseconds=500000),
    }
    with reactive.connect(mongo_uri) as db:
        add_constant_listeners(db, moments)
        db.cdc.start()
        mongo.docs.insert_one({"_id": 2, "text": "b"})
        assert db.cdc.wait_idle(timeout=30)
        stored = outputs_of(db, moments)
        kept = datetime.datetime(2024, 1, 2, 3, 4, 5, 123000)
        assert stored == {
            "naive": {1: kept, 2: kept},
            "aware": {1: kept, 2: kept},
            "day": {1: "2024-01-02", 2: "2024-01-02"},
            "clock": {1: "03:04:05", 2: "03:04:05"},
            "span": {1: "P1DT5.5S", 2: "P1DT5.5S"},
        }
        assert types_of(db, moments) == {
            "naive": "timestamp",
            "aware": "timestamp('UTC')",
            "day": "json",
            "clock": "json",
            "span": "json",
        }
        assert db.errors() == []


class Verdict(enum.Enum):
    SPAM = "spam"


@dataclasses.dataclass
class Extracted:
    verdict: Verdict
    score: Any
    tags: list[str]


def test_enums_numpy_numbers_and_dataclasses_are_stored_as_bson_values(mongo_uri: str, mongo) -> None:
    """What a classifier or an extraction model returns: an enum member was refused for its
    row, a document holding a numpy number too (BSON cannot encode np.float32), a dataclass as
    well. Each is stored as the values it holds."""
    mongo.docs.insert_many([{"_id": 1, "text": "a"}])
    outputs = {
        "verdict": Verdict.SPAM,
        "scored": {"label": "spam", "score": np.float32(0.5), "n": np.int64(2)},
        "extracted": Extracted(Verdict.SPAM, np.float64(0.25), ["x"]),
    }
    with reactive.connect(mongo_uri) as db:
        add_constant_listeners(db, outputs)
        db.cdc.start()
        mongo.docs.insert_one({"_id": 2, "text": "b"})
        assert db.cdc.wait_idle(timeout=30)
        assert outputs_of(db, outputs) == {
            "verdict": {1: "spam", 2: "spam"},
            "scored": {i: {"label": "spam", "score": 0.5, "n": 2} for i in (1, 2)},
            "extracted": {i: {"verdict": "spam", "score": 0.25, "tags": ["x"]} for i in (1, 2)},
        }
        assert db.errors() == []


def test_ids_of_every_bson_type_work_even_those_python_cannot_hash(mongo_uri: str, mongo) -> None:
    """A Decimal128, Regex or Code _id cannot key a dict: coalescing such a change raised in
    the handler, and its window came back and failed again forever, with every change in it."""
    odd = [Decimal128("3.5"), Regex("^a", "i"), Code("x = 1"), ObjectId(), datetime.datetime(2026, 1, 2)]
    mongo.docs.insert_many([{"_id": i, "text": f"doc {n}"} for n, i in enumerate(odd)])
    with reactive.connect(mongo_uri) as db:
        db.add(Listener(Model("len", predict=lambda xs: [len(x) for x in xs]), "text", "docs"))
        assert len(db.outputs("len__text")) == len(odd)
        db.cdc.start()
        mongo.docs.insert_one({"_id": Decimal128("4.5"), "text": "later"})
        mongo.docs.update_one({"_id": Regex("^a", "i")}, {"$set": {"text": "changed!"}})
        mongo.docs.delete_one({"_id": Code("x = 1")})
        assert db.cdc.wait_idle(timeout=30)
        outputs = {repr(row["_source"]): row["_output"] for row in db.outputs("len__text")}
        assert outputs[repr(Decimal128("4.5"))] == 5 and outputs[repr(Regex("^a", 2))] == 8  # flags read back as int
        assert repr(Code("x = 1")) not in outputs and len(outputs) == len(odd)
        assert db.errors("len__text") == []


def test_boolean_ids_are_not_the_numbers_python_takes_them_for(mongo_uri: str, mongo) -> None:
    # True == 1 and False == 0 in Python, not in MongoDB: the document {_id: true} was taken
    # for {_id: 1}, found current, and never had an output (no error either).
    mongo.docs.insert_many([{"_id": i, "text": t} for i, t in [(1, "one"), (True, "true"), (0, "zero"), (False, "no")]])
    with reactive.connect(mongo_uri) as db:
        db.add(Listener(Model("len", predict=lambda xs: [len(x) for x in xs]), "text", "docs"))
        expected = {(int, 1): 3, (bool, True): 4, (int, 0): 4, (bool, False): 2}
        assert {(type(r["_source"]), r["_source"]): r["_output"] for r in db.outputs("len__text")} == expected
        db.cdc.start()
        mongo.docs.update_one({"_id": True}, {"$set": {"text": "true!"}})
        mongo.docs.delete_one({"_id": 0})
        mongo.docs.insert_one({"_id": 2, "text": "two"})
        assert db.cdc.wait_idle(timeout=30)
        expected = {(int, 1): 3, (bool, True): 5, (bool, False): 2, (int, 2): 3}
        assert {(type(r["_source"]), r["_source"]): r["_output"] for r in db.outputs("len__text")} == expected


def test_a_listener_mongodb_cannot_name_outputs_for_is_a_clear_error_at_add(mongo_uri: str, mongo) -> None:
    mongo.docs.insert_one({"_id": 1, "text": "a"})
    with reactive.connect(mongo_uri) as db:
        with pytest.raises(reactive.ConfigurationError, match=r"cannot name its outputs collection: .*'\$'"):
            db.add(Listener(Model("a$b", predict=list), "text", "docs"))
        assert db.show() == []


def test_ten_thousand_documents_in_bulk(mongo_uri: str, mongo) -> None:
    with reactive.connect(mongo_uri) as db:
        mongo.create_collection("docs")
        db.add(Listener(Model("len", predict=lambda xs: [len(x) for x in xs]), "text", "docs"))
        db.cdc.start()
        mongo.docs.bulk_write([InsertOne({"_id": i, "text": "x" * (i % 97)}) for i in range(10_000)])
        assert db.cdc.wait_idle(timeout=120)
        outputs = outputs_by_source(db, "len__text")
        assert len(outputs) == 10_000
        assert all(outputs[i] == i % 97 for i in range(10_000))


def test_wait_idle_is_a_barrier_for_writes_made_before_it(mongo_uri: str, mongo) -> None:
    mongo.create_collection("docs")
    with reactive.connect(mongo_uri) as db:
        db.add(Listener(Model("len", predict=lambda xs: [len(x) for x in xs]), "text", "docs"))
        db.cdc.start()
        for i in range(50):
            mongo.docs.insert_one({"_id": i, "text": "y" * i})
            assert db.cdc.wait_idle(timeout=30)
            assert outputs_by_source(db, "len__text")[i] == i


@contextlib.contextmanager
def following_docs(mongo_uri: str, mongo) -> Iterator[tuple[reactive.Datalayer, Any]]:
    """A datalayer whose listener follows ``docs`` (outputs: each text's length), idle."""
    mongo.create_collection("docs")
    with reactive.connect(mongo_uri) as db:
        db.add(Listener(Model("len", predict=lambda xs: [len(x) for x in xs]), "text", "docs"))
        db.cdc.start()
        assert db.cdc.wait_idle(timeout=30)
        yield db, db.cdc.listener


def test_a_barrier_mark_whose_restart_check_fails_is_read_again(mongo_uri: str, mongo) -> None:
    # At a mark the listener asks the server whether it restarted (hello). When that failed
    # (a connection dropped then), the stream was opened again after the mark, which had not
    # been counted: wait_idle waited out its timeout.
    from pymongo.errors import AutoReconnect

    with following_docs(mongo_uri, mongo) as (db, listener):
        asked = listener._primary_process
        failed = []

        def fails_once(*, ask: bool) -> str | None:
            if ask and not failed:
                failed.append(1)
                raise AutoReconnect("connection closed (injected once, at a barrier mark)")
            return asked(ask=ask)

        listener._primary_process = fails_once
        mongo.docs.insert_one({"_id": 1, "text": "one"})
        assert db.cdc.wait_idle(timeout=20)
        assert failed and outputs_by_source(db, "len__text") == {1: 3}


def test_a_barrier_mark_the_recovery_could_not_write_again_is_written_later(mongo_uri: str, mongo) -> None:
    # After a restart the recovery writes the last barrier mark again (the server may have lost
    # it); a failure of that write was only logged, and the wait_idle behind it ran out.
    from pymongo.errors import AutoReconnect

    with following_docs(mongo_uri, mongo) as (db, listener):
        asked, put = listener._primary_process, listener._put_mark
        restarted, writes = threading.Event(), []

        def primary(*, ask: bool) -> str | None:
            return "a restarted server" if restarted.is_set() else asked(ask=ask)

        def put_mark(mark: int) -> None:
            writes.append(mark)
            if len(writes) == 1:  # acknowledged, then lost with the restart
                restarted.set()
            elif len(writes) == 2:  # the recovery's write again
                raise AutoReconnect("connection closed (injected once, writing the mark again)")
            else:
                put(mark)

        listener._primary_process, listener._put_mark = primary, put_mark
        mongo.docs.insert_one({"_id": 1, "text": "one"})
        assert db.cdc.wait_idle(timeout=20)
        assert listener.server_restarts == 1 and writes[:3] == [writes[0]] * 3
        assert outputs_by_source(db, "len__text") == {1: 3}


def test_a_barrier_mark_written_again_passes_even_where_the_server_kept_it(mongo_uri: str, mongo) -> None:
    # Found under load by test_mongodb_server_back_without_its_last_writes: wait_idle wrote its
    # mark to the restarted server, the listener then saw the restart and opened its stream
    # again from now, past the mark, and wrote the mark again for the wait: with the same
    # number, an update that changed nothing, so no change event, and wait_idle ran out.
    from reactive.backends.mongodb.listener import MARKS_COLLECTION

    with reactive.connect(mongo_uri) as db:
        db.add(Listener(Model("len", predict=lambda xs: [len(x) for x in xs]), "text", "docs"))
        listener = db.cdc.listener  # not started: this test reads its stream itself
        assert listener is not None and not listener.is_alive()
        listener._marks_sent = 1  # a wait_idle's mark, written...
        listener.database[MARKS_COLLECTION].update_one({"_id": listener._mark_id}, {"$set": {"n": 1}}, upsert=True)
        listener._reopen(None)  # ...before the stream was opened again from now
        listener._write_mark()  # what the recovery from a restart does for the waits
        marks = []
        for _ in range(25):  # 200 ms each: the stream's maxAwaitTimeMS
            change = listener._stream.try_next()
            if change is not None and change["ns"]["coll"] == MARKS_COLLECTION:
                marks.append(change["fullDocument"]["n"])
                break
        listener._close_stream()
        assert marks == [1]


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("mongodb://bob:hunter2@127.0.0.1:1/app?serverSelectionTimeoutMS=300", "could not connect to"),
        ("mongodb://bob:hunter2@127.0.0.1:27017", "names no database"),
        ("mongodb://bob:hunter2@[::1/app", "invalid MongoDB URI"),
    ],
)
def test_bad_uri_is_clear_and_redacted(uri: str, message: str) -> None:
    with pytest.raises(reactive.ReactiveError) as excinfo:
        reactive.connect(uri)
    assert message in str(excinfo.value)
    assert "hunter2" not in str(excinfo.value)
    assert "bob:***@" in str(excinfo.value)


# -- servers the test controls: killed, standalone, with a tiny oplog ------------------------
@pytest.fixture
def own_server(tmp_path):
    from mongo_server import MongoServer

    servers: list[MongoServer] = []

    def start(*args: str) -> MongoServer:
        server = MongoServer(tmp_path / f"data{len(servers)}", args=args).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.kill()  # its storage is thrown away: a clean shutdown takes SecantusDB 2 s


def test_server_killed_and_restarted_mid_stream_loses_nothing(own_server) -> None:
    from pymongo import MongoClient

    server = own_server()
    uri = server.database_uri("app")
    # j=True: the server acknowledges a write once it is in its journal, so a SIGKILL
    # cannot take back a write the test made (without it SecantusDB loses the last ones).
    with MongoClient(uri, journal=True) as client, reactive.connect(uri) as db:
        docs = client.app.docs
        docs.insert_one({"_id": 0, "text": "before"})
        db.add(Listener(Model("len", predict=lambda xs: [len(x) for x in xs]), "text", "docs"))
        db.cdc.start()
        listener = db.cdc.listener
        assert listener.connected.wait(30)

        docs.insert_many([{"_id": i, "text": "x" * i} for i in range(1, 200)])
        server.kill()
        assert listener.disconnected.wait(60)
        assert db.cdc.info()["source"]["disconnected_since"] is not None

        server.start()
        docs.insert_many([{"_id": i, "text": "y" * i} for i in range(200, 300)])
        assert listener.connected.wait(60)
        assert db.cdc.wait_idle(timeout=120)
        outputs = outputs_by_source(db, "len__text")
        assert outputs == {0: 6, **{i: i for i in range(1, 300)}}
        assert db.cdc.info()["source"]["disconnected_since"] is None


def test_a_stop_does_not_wait_for_a_server_that_is_down(own_server) -> None:
    """What a stop still asks of the server (the last position, the barrier mark, ending the
    client's sessions) waits for it only while the client last saw it answer: once it is known
    to be down, each is given up at once rather than waiting out server selection (measured
    with reactive's 5 s: a close 8 s into an outage took 14 s, about 4 s now, most of it the
    lease thread's renewal in flight). Nothing is lost: the position saved before stands, and
    after a restart everything goes on."""
    from pymongo import MongoClient

    from reactive.backends.mongodb.errors import STOP_TIMEOUT, known_down, stop_timeout

    server = own_server()
    uri = server.database_uri("app")
    with MongoClient(uri, journal=True) as client:
        client.app.docs.insert_one({"_id": 1, "text": "one"})
    db = reactive.connect(uri)
    try:
        db.add(Listener(Model("len", predict=lambda xs: [len(x) for x in xs]), "text", "docs"))
        db.cdc.start()
        listener = db.cdc.listener
        assert listener.connected.wait(30)
        assert stop_timeout(db.backend.client) == STOP_TIMEOUT

        server.kill()
        assert listener.disconnected.wait(60)
        assert known_down(db.backend.client)
        assert stop_timeout(db.backend.client) < STOP_TIMEOUT  # known down: not waited for

        server.start()
        assert listener.connected.wait(60)
        assert not known_down(db.backend.client)
        assert stop_timeout(db.backend.client) == STOP_TIMEOUT  # seen again
        with MongoClient(uri, journal=True) as client:
            client.app.docs.insert_one({"_id": 2, "text": "two"})
        assert db.cdc.wait_idle(timeout=60)  # and outputs are written again
        assert outputs_by_source(db, "len__text") == {1: 3, 2: 3}
        server.kill()
        assert listener.disconnected.wait(60)
        with server_selection_waits() as waits:
            db.close()  # every thread stops (the fixture checks), the server still down
        # Nothing the stop asked of the server (the stream's cursor, the last position, the
        # lease given up, the sessions) waited out the client's 3 s server selection.
        assert waits and max(waits) <= STOP_TIMEOUT * 1000
    finally:
        db.close()
    assert not db.cdc.running


@contextlib.contextmanager
def server_selection_waits() -> Iterator[list[int]]:
    """How long (ms) each of reactive's threads and the main thread, within the block, was ready
    to wait for pymongo to find a server (pymongo's server selection log, at DEBUG)."""
    waits: list[int] = []

    class Waits(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            ours = record.threadName == "MainThread" or record.threadName.startswith("reactive")
            found = re.search(r'"remainingTimeMS": (\d+)', record.getMessage())
            if ours and found:
                waits.append(int(found[1]))

    logger, handler = logging.getLogger("pymongo.serverSelection"), Waits()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield waits
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def reconciliation_fails_once(listener: Any) -> list[list[str]]:
    """Make ``listener``'s next reconciliation fail (a dropped connection); the list of the
    tables it was asked for is filled once it did."""
    import dataclasses

    from pymongo.errors import AutoReconnect

    reconcile, failed = listener.hooks.reconcile, []

    def fails_once(tables: list[str], abandon: threading.Event) -> None:
        if not failed:
            failed.append(tables)
            raise AutoReconnect("connection closed (injected once, in the reconciliation)")
        reconcile(tables, abandon)

    listener.hooks = dataclasses.replace(listener.hooks, reconcile=fails_once)
    return failed


def test_a_reconciliation_after_a_restart_that_fails_is_run_again(own_server) -> None:
    # A restart seen by the listener starts a reconciliation (the server may have lost writes it
    # acknowledged); a transient error in it (the server still waking up) sent the listener
    # back to the stream, and with the restart already noted, nothing ran it again: a lost
    # output stayed lost. Here an output disappears without an event, and the reconciliation
    # after the restart fails once.
    from pymongo import MongoClient

    server = own_server()
    uri = server.database_uri("app")
    with MongoClient(uri, journal=True) as client:
        client.app.docs.insert_one({"_id": 1, "text": "one"})
    with reactive.connect(uri) as db:
        db.add(Listener(Model("len", predict=lambda xs: [len(x) for x in xs]), "text", "docs"))
        db.cdc.start()
        listener = db.cdc.listener
        assert listener.connected.wait(30)
        failed = reconciliation_fails_once(listener)
        with MongoClient(uri, journal=True) as client:
            client.app["_outputs__len__text"].delete_one({"_id": 1})  # as a crash may lose it
        server.kill()
        server.start()
        assert within(60, lambda: listener.server_restarts == 1 and bool(failed))
        assert db.cdc.wait_idle(timeout=60)
        assert outputs_by_source(db, "len__text") == {1: 3}


def test_standalone_server_is_a_clear_error_at_add(own_server, recorder: Recorder) -> None:
    from pymongo import MongoClient

    server = own_server("--standalone")
    uri = server.database_uri("app")
    with MongoClient(uri) as client:
        client.app.docs.insert_one({"_id": 1, "text": "x"})
    with reactive.connect(uri) as db:
        with pytest.raises(reactive.ChangeStreamUnsupportedError, match="replica set"):
            db.add(Listener(Model("m", predict=recorder), "text", "docs"))
        assert db.show() == []
        assert not db.cdc.running


def test_aged_out_resume_token_falls_back_to_reconciliation(own_server, caplog) -> None:
    from pymongo import MongoClient

    server = own_server("--oplog-max-entries", "5", "--enable-test-commands")
    uri = server.database_uri("app")
    recorder = Recorder()
    with MongoClient(uri) as client, reactive.connect(uri) as db:
        docs = client.app.docs
        docs.insert_many([{"_id": i, "text": f"doc {i}"} for i in range(5)])
        db.add(Listener(Model("tag", predict=recorder), "text", "docs"))
        db.cdc.start()
        docs.insert_one({"_id": 5, "text": "doc 5"})
        assert db.cdc.wait_idle(timeout=30)
        db.cdc.stop()

        # While stopped: more writes than the oplog keeps, then the oplog is trimmed.
        docs.insert_many([{"_id": i, "text": f"doc {i}"} for i in range(6, 40)])
        docs.update_one({"_id": 1}, {"$set": {"text": "doc one"}})
        docs.delete_one({"_id": 2})
        client.admin.command({"secantusAdmin.pruneOplog": 1})

        recorder.inputs.clear()
        with caplog.at_level("WARNING", logger="reactive"):
            db.cdc.start()
            assert db.cdc.wait_idle(timeout=60)
        assert "no longer in the oplog" in caplog.text
        assert db.cdc.info()["source"]["history_lost"] == 1
        expected = {i: f"<doc {i}>" for i in range(40) if i != 2}
        expected[1] = "<doc one>"
        assert outputs_by_source(db, "tag__text") == expected
        assert sorted(recorder.inputs) == sorted(["doc one", *[f"doc {i}" for i in range(6, 40)]])

        # Changes after the fallback are followed from the new position.
        docs.insert_one({"_id": 99, "text": "later"})
        assert db.cdc.wait_idle(timeout=30)
        assert outputs_by_source(db, "tag__text")[99] == "<later>"


def test_history_lost_while_running_is_recovered_even_where_the_reconciliation_fails_once(own_server) -> None:
    # A stream that found its history gone while running recovered from inside the thread's
    # error handling: a transient error in that recovery (its reconciliation) ended the thread.
    from pymongo import MongoClient

    server = own_server("--oplog-max-entries", "5", "--enable-test-commands")
    uri = server.database_uri("app")
    with MongoClient(uri) as client, reactive.connect(uri) as db:
        db.add(Listener(Model("len", predict=lambda xs: [len(x) for x in xs]), "text", "docs"))
        db.cdc.start()
        client.app.docs.insert_one({"_id": 1, "text": "one"})
        assert db.cdc.wait_idle(timeout=30)
        listener = db.cdc.listener
        failed = reconciliation_fails_once(listener)
        client.app.other.insert_many([{"_id": i} for i in range(20)])  # more than the oplog keeps
        client.app["_outputs__len__text"].delete_one({"_id": 1})  # lost: only a reconciliation restores it
        client.admin.command({"secantusAdmin.pruneOplog": 1})
        listener.redeliver([])  # opened again from its last processed change, no longer in the oplog
        assert within(60, lambda: bool(failed))
        assert db.cdc.wait_idle(timeout=60)
        assert listener.is_alive() and listener.history_lost == 1
        assert outputs_by_source(db, "len__text") == {1: 3}
        client.app.docs.insert_one({"_id": 2, "text": "two"})
        assert db.cdc.wait_idle(timeout=30)
        assert outputs_by_source(db, "len__text") == {1: 3, 2: 3}


def test_chained_listeners(mongo_uri: str, mongo) -> None:
    mongo.docs.insert_one({"_id": 1, "text": "a b c"})
    with reactive.connect(mongo_uri) as db:
        db.add(Listener(Model("words", predict=lambda texts: [t.split() for t in texts]), "text", "docs"))
        db.add(
            Listener(Model("count", predict=lambda lists: [len(x) for x in lists]), "_output", "_outputs__words__text")
        )
        assert outputs_by_source(db, "count___output") == {1: 3}
        db.cdc.start()
        mongo.docs.insert_one({"_id": 2, "text": "d e"})
        mongo.docs.update_one({"_id": 1}, {"$set": {"text": "x"}})
        assert db.cdc.wait_idle(timeout=30)
        assert outputs_by_source(db, "count___output") == {1: 1, 2: 2}
        mongo.docs.delete_one({"_id": 2})
        assert db.cdc.wait_idle(timeout=30)
        assert outputs_by_source(db, "count___output") == {1: 1}


def test_an_idle_stream_moves_the_saved_position_forward(mongo_uri: str, mongo, recorder: Recorder) -> None:
    mongo.docs.insert_one({"_id": 1, "text": "a"})
    with reactive.connect(mongo_uri) as db:
        db.add(Listener(Model("m", predict=recorder), "text", "docs"))
        db.cdc.start()
        listener = db.cdc.listener
        assert db.cdc.wait_idle(timeout=30)
        before = listener.position
        # Writes the listener does not follow still move the stream's post-batch token.
        mongo.other.insert_many([{"n": i} for i in range(5)])
        assert listener.wait_for(lambda: listener.position != before, timeout=30)
        # What the database holds, read with the test's own client.
        saved = Positions(MongoSections(mongo)).load_checkpoint(listener.checkpoint_name)
        assert saved == listener.position
        assert recorder.inputs == ["a"]


def test_drop_database_stops_every_listener_cleanly(mongo_uri: str, mongo, recorder: Recorder, caplog) -> None:
    for name in ("docs", "notes"):
        mongo[name].insert_one({"_id": 1, "text": name})
    with reactive.connect(mongo_uri) as db:
        for name in ("docs", "notes"):
            db.add(Listener(Model(name, predict=recorder), "text", name))
        db.cdc.start()
        with caplog.at_level("WARNING", logger="reactive"):
            mongo.client.drop_database(mongo.name)
            listener = db.cdc.listener
            assert listener.wait_for(lambda: not listener.tables, timeout=30)
        assert db.cdc.info()["stopped_tables"] == {"docs": "dropped", "notes": "dropped"}
        assert "collection 'docs'" in caplog.text and "was dropped" in caplog.text
        # The stream goes on past the invalidate: a new collection can be added and followed.
        mongo.fresh.insert_one({"_id": 1, "text": "again"})
        db.add(Listener(Model("fresh", predict=recorder), "text", "fresh"))
        mongo.fresh.insert_one({"_id": 2, "text": "live"})
        assert db.cdc.wait_idle(timeout=30)
        assert outputs_by_source(db, "fresh__text") == {1: "<again>", 2: "<live>"}


def test_bad_credentials_are_a_clear_error_with_the_password_redacted(own_server) -> None:
    from pymongo import MongoClient

    server = own_server()
    with MongoClient(server.uri) as client:
        client.app.command("createUser", "alice", pwd="right-secret", roles=["readWrite"])
    server.stop()
    server.args = ("--auth",)
    server.start()
    base = f"mongodb://alice:{{}}@127.0.0.1:{server.port}/app?directConnection=true&serverSelectionTimeoutMS=2000"
    with pytest.raises(reactive.BackendError) as excinfo:
        reactive.connect(base.format("wrong-secret"))
    # The server's words, not its whole reply ($clusterTime, its signature's bytes, operationTime).
    assert str(excinfo.value).endswith(": authentication failed (AuthenticationFailed, code 18)")
    assert "wrong-secret" not in str(excinfo.value) and "alice:***@" in str(excinfo.value)
    with reactive.connect(base.format("right-secret")) as db:
        assert db.backend.uri.startswith("mongodb://alice:***@")


class Commands(monitoring.CommandListener):
    """Every command a client sent: (name, its collection, started, ended) by request id."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.sent: dict[int, list] = {}

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        collection = event.command.get(event.command_name)
        if event.command_name == "getMore":
            collection = event.command.get("collection")
        with self.lock:
            self.sent[event.request_id] = [event.command_name, collection, time.monotonic(), None]

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        with self.lock:
            if event.request_id in self.sent:
                self.sent[event.request_id][3] = time.monotonic()

    failed = succeeded

    def names(self) -> list[str]:
        with self.lock:
            return [name for name, *_ in self.sent.values()]

    def clear(self) -> None:
        with self.lock:
            self.sent.clear()


def test_a_dropped_outputs_collection_is_reported_by_the_stream_not_checked_per_write(
    mongo_uri: str, mongo, recorder: Recorder
) -> None:
    """While the stream runs, writing outputs costs no round trip to check that the outputs
    collection still exists: the stream reports its drop, and the outputs are computed again
    with no further change."""
    commands = Commands()
    mongo.docs.insert_many([{"_id": 1, "text": "a"}, {"_id": 2, "text": "b"}])
    with reactive.connect(mongo_uri, event_listeners=[commands]) as db:
        db.add(Listener(Model("m", predict=recorder), "text", "docs"))
        db.cdc.start()
        assert db.cdc.wait_idle(timeout=30)
        commands.clear()
        for i in (3, 4):
            mongo.docs.insert_one({"_id": i, "text": f"doc {i}"})
            assert db.cdc.wait_idle(timeout=30)
        assert "listCollections" not in commands.names()
        assert outputs_by_source(db, "m__text") == {1: "<a>", 2: "<b>", 3: "<doc 3>", 4: "<doc 4>"}
        mongo.drop_collection("_outputs__m__text")
        # The drop comes before wait_idle's barrier in the stream: the refill has started.
        assert db.cdc.wait_idle(timeout=30)
        for thread in reactive_threads():
            if thread.name == "reactive-outputs-refill":
                thread.join(30)
        assert db.cdc.wait_idle(timeout=30)
        assert outputs_by_source(db, "m__text") == {1: "<a>", 2: "<b>", 3: "<doc 3>", 4: "<doc 4>"}


def test_outputs_dropped_by_removing_their_listener_are_not_computed_again(mongo_uri: str, mongo, caplog) -> None:
    mongo.docs.insert_one({"_id": 1, "text": "a"})
    with reactive.connect(mongo_uri) as db:
        db.add(Listener(Model("m", predict=Recorder()), "text", "docs"))
        db.add(Listener(Model("n", predict=Recorder()), "text", "docs"))
        db.cdc.start()
        with caplog.at_level("WARNING", logger="reactive"):
            db.remove("m__text", drop_outputs=True)
            mongo.docs.insert_one({"_id": 2, "text": "b"})
            assert db.cdc.wait_idle(timeout=30)  # the stream has passed the drop
        assert "were dropped" not in caplog.text
        assert "_outputs__m__text" not in mongo.list_collection_names()
        assert outputs_by_source(db, "n__text") == {1: "<a>", 2: "<b>"}


def test_a_backlog_saves_its_position_once_not_once_per_window(mongo_uri: str, mongo, monkeypatch) -> None:
    """Each window's outputs are journaled; its position need not be: while changes keep
    coming the position is saved at most every BUSY_SAVE_SECONDS, and once the stream has
    nothing new, at once. A restart then resumes after the last window."""
    monkeypatch.setattr(mongo_listener, "BUSY_SAVE_SECONDS", 3600.0)
    entered, release = threading.Event(), threading.Event()
    seen = Recorder()

    def model(texts: list[str]) -> list[str]:
        seen(texts)
        if "blocker" in texts:
            entered.set()
            assert release.wait(30), "the test never released the model"
        return texts

    mongo.create_collection("docs")
    # One packet per window, each finished before the next is taken.
    with reactive.connect(mongo_uri, pipeline=1, batch_rows=1) as db:
        db.add(Listener(Model("m", predict=model), "text", "docs"))
        db.cdc.start()
        listener = db.cdc.listener
        mongo.docs.insert_one({"_id": 0, "text": "blocker"})
        assert entered.wait(30)
        mongo.docs.insert_many([{"_id": i, "text": f"doc {i}"} for i in range(1, 11)])
        assert listener.sync(timeout=30)  # all ten are queued behind the blocker
        saves, windows = listener.positions_saved, db.cdc.info()["handler"]["windows"]
        release.set()
        assert db.cdc.wait_idle(timeout=30)
        assert db.cdc.info()["handler"]["windows"] - windows == 11
        # Saved once the stream had nothing new; the checkpoint holds it.
        assert listener.wait_for(lambda: listener.positions_saved > saves, timeout=30)
        assert listener.positions_saved - saves <= 3  # not 11
        saved = Positions(MongoSections(mongo)).load_checkpoint(listener.checkpoint_name)
        assert saved == listener.position
    assert len(seen.inputs) == 11
    with reactive.connect(mongo_uri) as db:
        db.add(Listener(Model("m", predict=seen), "text", "docs"))
        db.cdc.start()
        assert db.cdc.wait_idle(timeout=30)
        assert outputs_by_source(db, "m__text") == {0: "blocker", **{i: f"doc {i}" for i in range(1, 11)}}
    assert len(seen.inputs) == 11  # nothing computed again


def test_the_stream_saves_no_position_of_its_own_without_the_lease(mongo_uri: str, mongo, recorder: Recorder) -> None:
    mongo.docs.insert_one({"_id": 1, "text": "a"})
    with reactive.connect(mongo_uri) as db:
        db.add(Listener(Model("m", predict=recorder), "text", "docs"))
        db.cdc.start()
        listener = db.cdc.listener
        assert db.cdc.wait_idle(timeout=30)
        refused = threading.Event()
        listener.fence = lambda: refused.set() or False  # as if the lease were lost
        # Writes the listener does not follow move the stream's post-batch token: it would save it.
        mongo.other.insert_one({"n": 0})
        assert refused.wait(30)  # the listener's thread asked, was refused, and saves nothing since
        saves = listener.positions_saved
        refused.clear()
        mongo.other.insert_many([{"n": i} for i in range(1, 5)])
        assert refused.wait(30)
        assert listener.positions_saved == saves


def test_the_store_knows_whether_this_process_holds_the_lease(mongo) -> None:
    """What the stream's fence reads: the lease records this process wrote through the store."""
    sections, others = MongoSections(mongo), MongoSections(mongo)
    assert sections.lease_held()  # no lease written by this process: nothing to fence
    lease = Lease(sections, "reactive", lease_ms=60_000)
    other = Lease(others, "reactive", lease_ms=60_000)
    assert lease.acquire() and sections.lease_held()
    assert lease.renew() and sections.lease_held()
    assert not other.acquire()  # held by the first
    lease.release()
    assert not sections.lease_held()
    assert other.acquire() and others.lease_held()
    assert not lease.acquire() and not sections.lease_held()


def test_a_lone_change_is_read_then_written_with_no_getmore_waiting_meanwhile(
    mongo_uri: str, mongo, recorder: Recorder, monkeypatch
) -> None:
    """While the outputs of a few changes are written, the listener asks the server for
    nothing: a getMore waiting on the server would be woken by that very write."""
    monkeypatch.setattr(mongo_listener, "HOLD_SECONDS", 30.0)
    commands = Commands()
    mongo.docs.insert_one({"_id": 0, "text": "first"})
    with reactive.connect(mongo_uri, event_listeners=[commands]) as db:
        db.add(Listener(Model("m", predict=recorder), "text", "docs"))
        db.cdc.start()
        assert db.cdc.wait_idle(timeout=30)
        commands.clear()
        mongo.docs.insert_one({"_id": 1, "text": "lone"})
        assert db.cdc.wait_idle(timeout=30)
        assert outputs_by_source(db, "m__text") == {0: "<first>", 1: "<lone>"}
    with commands.lock:
        sent = list(commands.sent.values())
    [(_, _, write_started, write_ended)] = [c for c in sent if c[0] == "insert" and c[1] == "_outputs__m__text"]
    getmores = [(started, ended) for name, _, started, ended in sent if name == "getMore"]
    assert getmores
    assert not [g for g in getmores if g[0] < write_ended and (g[1] is None or g[1] > write_started)]


class WriteConcerns(monitoring.CommandListener):
    """The write concern of every write command, by (command, collection)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seen: dict[tuple[str, str], list[dict]] = {}

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if event.command_name in ("insert", "update", "delete"):
            key = (event.command_name, event.command[event.command_name])
            with self.lock:
                self.seen.setdefault(key, []).append(dict(event.command.get("writeConcern", {})))

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    failed = succeeded


@pytest.mark.parametrize(
    ("options", "outputs", "positions"),
    [
        ("", {}, {"j": True}),
        ("w=0", {}, {"j": True}),  # never unacknowledged: a lost write could land after its position
        (
            "w=majority&wtimeoutMS=5000",
            {"w": "majority", "wtimeout": 5000},
            {"w": "majority", "wtimeout": 5000, "j": True},
        ),
        ("journal=true", {"j": True}, {"j": True}),
        ("journal=false", {"j": False}, {"j": True}),
    ],
)
def test_outputs_use_the_uri_write_concern_and_positions_are_journaled(
    mongo_uri: str, mongo, options: str, outputs: dict, positions: dict
) -> None:
    """Outputs and error records go with the URI's write concern (acknowledged at least); the
    position saved after them with ``j=True`` and the URI's ``w``: one journaled write makes the
    writes before it durable."""

    def predict(texts: list[str]) -> list[str]:
        if "bad" in texts:
            raise ValueError("bad input")
        return [t.upper() for t in texts]

    concerns = WriteConcerns()
    uri = f"{mongo_uri}&{options}" if options else mongo_uri
    with reactive.connect(uri, event_listeners=[concerns]) as db:
        db.add(Listener(Model("m", predict=predict, max_retries=0), "text", "docs"))
        db.cdc.start()
        mongo.docs.insert_one({"_id": 1, "text": "one"})
        assert db.cdc.wait_idle(timeout=30)
        mongo.docs.insert_one({"_id": 2, "text": "bad"})
        assert db.cdc.wait_idle(timeout=30)
        assert outputs_by_source(db, "m__text") == {1: "ONE"}
        assert [e["source"] for e in db.errors("m__text")] == [2]
        db.cdc.stop()
    with concerns.lock:
        seen = dict(concerns.seen)
    for written in (("insert", "_outputs__m__text"), ("insert", "_reactive_errors")):
        assert seen[written] and all(c == outputs for c in seen[written]), written
    saves = seen[("update", "_reactive_checkpoints")]
    assert saves and all(c == positions for c in saves)


@pytest.mark.parametrize(("w", "says"), [("5", "Not enough data-bearing nodes"), ("nosuchtag", "nosuchtag")])
def test_a_write_concern_the_server_cannot_meet_is_a_clear_error(mongo_uri: str, mongo, w: str, says: str) -> None:
    """reactive writes with the URI's w: one the server cannot meet (more members than it has,
    a tag set it lacks) is refused at the first write, ``db.add``, as a ConfigurationError."""
    mongo.docs.insert_one({"_id": 1, "text": "one"})
    refused = pytest.raises(reactive.ConfigurationError, match=f"cannot meet the URI's write concern.*{says}")
    with reactive.connect(f"{mongo_uri}&w={w}") as db, refused:
        db.add(Listener(Model("m", predict=lambda texts: texts), "text", "docs"))
    assert "_outputs__m__text" not in mongo.list_collection_names()  # nothing computed or written
    assert not reactive_threads()

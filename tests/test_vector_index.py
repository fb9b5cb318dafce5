"""VectorIndex: search over the vectors a listener keeps fresh, on real databases."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import reactive
from reactive.components import Listener, Model, VectorIndex
from reactive.errors import ConfigurationError, SearchError
from tests.conftest import SQLClient, within

LETTERS = "abcdefgh"


def letters(text: str) -> list[float]:
    """A deterministic 'embedding': how often each of a..h occurs, plus a little of everything."""
    return [text.count(c) + 0.01 for c in LETTERS]


def embed_model(**options: Any) -> Model:
    return Model("embed", predict=lambda texts: [letters(t) for t in texts], output_type="array<float32>", **options)


def nearest(db: reactive.Datalayer, query: Any, k: int = 10, **options: Any) -> list[Any]:
    return [hit["_source"] for hit in db.search("near", query, k=k, **options)]


def connect(sql: SQLClient, **options: Any) -> reactive.Datalayer:
    return reactive.connect(sql.uri, poll_interval=0.05, **options)


def make_docs(sql: SQLClient, rows: list[tuple[int, str, str]]) -> None:
    sql.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text VARCHAR(100), lang VARCHAR(10))")
    for row in rows:
        sql.execute("INSERT INTO docs VALUES (?, ?, ?)", row)


def test_the_index_follows_inserts_updates_and_deletes(sql: SQLClient, tmp_path: Path) -> None:
    make_docs(sql, [(1, "aaa", "en"), (2, "bbb", "en"), (3, "abab", "de")])
    with connect(sql) as db:
        db.add(Listener(embed_model(), "text", "docs"))
        db.add(VectorIndex("near", listener="embed__text", metric="l2sq", directory=tmp_path))
        assert nearest(db, letters("aaa"), k=1) == [1]  # works before db.cdc.start()
        db.cdc.start()
        sql.execute("INSERT INTO docs VALUES (4, 'hhhh', 'en')")
        sql.execute("UPDATE docs SET text = 'ggg' WHERE id = 2")
        sql.execute("DELETE FROM docs WHERE id = 1")
        assert db.cdc.wait_idle(timeout=30)
        assert nearest(db, letters("hhhh"), k=1) == [4]
        assert nearest(db, letters("ggg"), k=1) == [2]
        assert 1 not in nearest(db, letters("aaa"))  # a deleted row is never returned
        assert sorted(nearest(db, letters("aaa"))) == [2, 3, 4]
        hits = db.search("near", letters("abab"), k=2, rows=True)
        assert hits[0] == {"_source": 3, "_distance": pytest.approx(0.0, abs=1e-6), "row": hits[0]["row"]}
        assert hits[0]["row"]["text"] == "abab"


def test_the_index_follows_a_mongodb_collection(mongo_uri: str, mongo, tmp_path: Path) -> None:
    mongo.docs.insert_many([{"_id": 1, "text": "aaa"}, {"_id": "two", "text": "bbb"}])
    with reactive.connect(mongo_uri) as db:
        db.add(Listener(embed_model(), "text", "docs"))
        db.add(VectorIndex("near", listener="embed__text", directory=tmp_path))
        db.cdc.start()
        mongo.docs.insert_one({"_id": 3, "text": "hhh"})
        mongo.docs.update_one({"_id": "two"}, {"$set": {"text": "ggg"}})
        mongo.docs.delete_one({"_id": 1})
        assert db.cdc.wait_idle(timeout=30)
        assert nearest(db, letters("hhh"), k=1) == [3]
        assert nearest(db, letters("ggg"), k=1) == ["two"]
        assert sorted(map(str, nearest(db, letters("aaa")))) == ["3", "two"]


def test_a_restart_loads_the_saved_index_and_catches_up_what_it_missed(duck: SQLClient, tmp_path: Path) -> None:
    make_docs(duck, [(i, LETTERS[i % 8] * (1 + i % 3), "en") for i in range(40)])
    index = tmp_path / "indexes"
    with connect(duck) as db:
        db.add(Listener(embed_model(), "text", "docs"))
        db.add(VectorIndex("near", listener="embed__text", directory=index))
    saved = tmp_path / "saved"
    shutil.copytree(index, saved)  # the index as saved at the first close

    with connect(duck) as db:  # a restart: the index is loaded, nothing is indexed again
        db.add(Listener(embed_model(), "text", "docs"))
        db.add(VectorIndex("near", listener="embed__text", directory=index))
        assert db.cdc.info()["listeners"].get("near", {}).get("computed", 0) == 0
        assert len(nearest(db, letters("a"), k=100)) == 40
        db.cdc.start()
        duck.execute("UPDATE docs SET text = 'hhhhhhhh' WHERE id = 0")
        duck.execute("DELETE FROM docs WHERE id = 1")
        assert db.cdc.wait_idle(timeout=30)

    # As if the process had died before saving those changes: the older file comes back.
    shutil.rmtree(index)
    shutil.copytree(saved, index)
    with connect(duck) as db:
        db.add(Listener(embed_model(), "text", "docs"))
        near = db.add(VectorIndex("near", listener="embed__text", directory=index))
        stats = db.cdc.info()["listeners"]["near"]
        assert (stats["computed"], stats["deletes"]) == (1, 1)  # caught up: one row changed, one gone
        assert len(near) == 39
        assert nearest(db, letters("hhhhhhhh"), k=1) == [0]
        assert 1 not in nearest(db, letters("b"), k=100)


def test_a_corrupt_index_file_is_detected_and_rebuilt(duck: SQLClient, tmp_path: Path, caplog) -> None:
    make_docs(duck, [(1, "aaa", "en"), (2, "bbb", "en")])
    with connect(duck) as db:
        db.add(Listener(embed_model(), "text", "docs"))
        near = db.add(VectorIndex("near", listener="embed__text", directory=tmp_path))
        path = near.path
    assert path is not None and path.exists()
    path.write_bytes(path.read_bytes()[:50] + b"garbage")
    with caplog.at_level(logging.WARNING, logger="reactive"), connect(duck) as db:
        db.add(Listener(embed_model(), "text", "docs"))
        db.add(VectorIndex("near", listener="embed__text", directory=tmp_path))
        assert "is not usable" in caplog.text and "corrupt" in caplog.text
        assert db.cdc.info()["listeners"]["near"]["computed"] == 2
        assert nearest(db, letters("bbb"), k=1) == [2]


def test_a_filter_keeps_k_matching_rows_even_when_the_nearest_do_not_match(duck: SQLClient, tmp_path: Path) -> None:
    # The 30 rows nearest the query are German; 5 English rows are far away.
    rows = [(i, "a" * (1 + i % 5), "de") for i in range(30)] + [(100 + i, "h" * (1 + i), "en") for i in range(5)]
    make_docs(duck, rows)
    with connect(duck) as db:
        db.add(Listener(embed_model(), "text", "docs"))
        db.add(VectorIndex("near", listener="embed__text", metric="l2sq", directory=tmp_path))
        found = db.search("near", letters("a"), k=3, filter={"lang": "en"}, rows=True)
        assert [hit["_source"] for hit in found] == [100, 101, 102]
        assert all(hit["row"]["lang"] == "en" for hit in found)
        assert db.search("near", letters("a"), k=3, filter={"lang": "fr"}) == []
        with pytest.raises(ConfigurationError, match="only equality"):
            db.search("near", letters("a"), filter={"lang": {"$ne": "de"}})
        # A misspelt field matched nothing, silently.
        with pytest.raises(SearchError, match="table 'docs' has no column 'lnag' to filter on"):
            db.search("near", letters("a"), filter={"lnag": "en"})


def test_a_search_filter_no_row_value_can_equal_is_said(duck: SQLClient, tmp_path: Path, caplog) -> None:
    """Python's == says False across types: {"n": "3"} on an INTEGER column read every row
    (a filter that matches nothing costs a full scan) and returned [] without a word."""
    duck.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text VARCHAR, n INTEGER)")
    duck.executemany("INSERT INTO docs VALUES (?, ?, ?)", [(i, "a" * i, 3) for i in range(1, 6)])
    with connect(duck) as db, caplog.at_level(logging.WARNING, logger="reactive"):
        db.add(Listener(embed_model(), "text", "docs"))
        db.add(VectorIndex("near", listener="embed__text", directory=tmp_path))
        assert db.search("near", letters("a"), k=2, filter={"n": 4}) == []
        assert caplog.records == []  # an int that no row holds: nothing to say
        assert db.search("near", letters("a"), k=2, filter={"n": "3"}) == []
        [record] = caplog.records
        assert record.getMessage() == (
            "search in 'near': filter {'n': '3'} matches no row whose 'n' holds an int: an int never "
            "equals a str: filter on 3"
        )
        assert [hit["_source"] for hit in db.search("near", letters("a"), k=2, filter={"n": 3})] == [1, 2]


def test_text_queries_are_embedded_by_the_query_model(duck: SQLClient, tmp_path: Path) -> None:
    make_docs(duck, [(1, "aaa", "en"), (2, "hhh", "en")])
    with connect(duck) as db:
        db.add(Listener(embed_model(), "text", "docs"))
        db.add(VectorIndex("near", listener="embed__text", query_model=embed_model(), directory=tmp_path))
        assert nearest(db, "hh", k=1) == [2]


def test_a_text_query_is_embedded_on_a_thread_that_ends_with_it(duck: SQLClient, tmp_path: Path) -> None:
    """A thread that ran torch on the CPU keeps an OpenMP team while it lives, and beside it
    every model thread's team sleeps between operations (libgomp, more threads than cores):
    the application's thread, calling db.search, must not be left holding one."""
    make_docs(duck, [(1, "aaa", "en"), (2, "hhh", "en")])
    threads: list[threading.Thread] = []

    def embed(texts: list[str]) -> list[list[float]]:
        threads.append(threading.current_thread())
        if texts == ["boom"]:
            raise RuntimeError("the query model failed")
        if texts == ["as a dict"]:
            return {0: letters("hh")}  # one key, but not a list of outputs
        if texts == ["nothing"]:
            return None
        return [letters(t) for t in texts] * (2 if texts == ["twice"] else 1)

    with connect(duck) as db:
        db.add(Listener(embed_model(), "text", "docs"))
        query_model = Model("q", predict=embed, output_type="array<float32>")
        db.add(VectorIndex("near", listener="embed__text", query_model=query_model, directory=tmp_path))
        assert nearest(db, "hh", k=1) == [2]
        [thread] = threads
        assert thread.name == "reactive-query-near" and thread is not threading.current_thread()
        assert not thread.is_alive()
        with pytest.raises(RuntimeError, match="the query model failed"):
            db.search("near", "boom")
        # The one check of what a model returned (Model.checked_outputs), as for a listener's batch.
        with pytest.raises(SearchError, match="index 'near' cannot embed the query: model 'q' returned 2 outputs"):
            db.search("near", "twice")
        with pytest.raises(SearchError, match="model 'q' returned dict, not a list of outputs"):
            db.search("near", "as a dict")
        with pytest.raises(SearchError, match="model 'q' returned NoneType, not a list of outputs"):
            db.search("near", "nothing")


def test_k_and_index_settings_computed_with_numpy_are_taken(duck: SQLClient, tmp_path: Path) -> None:
    """``k=np.int64(2)`` (a k computed with numpy) was refused: ``k must be a whole number of at
    least 1, not np.int64(2)``; and so were the index's whole-number settings."""
    make_docs(duck, [(1, "aaa", "en"), (2, "aab", "en"), (3, "hhh", "de")])
    with connect(duck) as db:
        db.add(Listener(embed_model(), "text", "docs"))
        db.add(VectorIndex("near", listener="embed__text", metric="l2sq", directory=tmp_path))
        assert nearest(db, letters("aaa"), k=np.int64(2)) == [1, 2]
        assert nearest(db, letters("aaa"), k=np.uint8(1), filter={"lang": "en"}) == [1]
        for bad in (np.float64(2.0), np.int64(0), np.bool_(True), True, "2"):
            with pytest.raises(SearchError, match="k must be a whole number of at least 1"):
                db.search("near", letters("aaa"), k=bad)
    index = VectorIndex(
        "other",
        listener="embed__text",
        connectivity=np.int64(16),
        expansion_search=np.uint16(32),
        save_every=np.int64(0),
    )
    assert (type(index.connectivity), type(index.expansion_search), type(index.save_every)) == (int, int, int)


def test_bad_queries_and_declarations_get_clear_errors_and_write_nothing(duck: SQLClient, tmp_path: Path) -> None:
    make_docs(duck, [(1, "aaa", "en")])
    indexes = tmp_path / "indexes"
    with connect(duck) as db:
        db.add(Listener(embed_model(), "text", "docs"))
        db.add(Listener(Model("upper", predict=lambda xs: [x.upper() for x in xs]), "text", "docs"))
        with pytest.raises(ConfigurationError, match="outputs of 'upper__text' are string, not vectors"):
            db.add(VectorIndex("bad", listener="upper__text", directory=indexes))
        with pytest.raises(ConfigurationError, match="no listener 'nope'"):
            db.add(VectorIndex("bad", listener="nope", directory=indexes))
        with pytest.raises(ConfigurationError, match="metric must be one of"):
            VectorIndex("bad", listener="embed__text", metric="hamming")
        # usearch refused connectivity=1 only at the first vector, and a save_every of text
        # failed the time check at every window: each recorded an error for every row.
        for setting, value, message in (
            ("save_every", "10", "save_every must be a number of seconds of at least 0"),
            ("save_every", float("nan"), "save_every must be a number of seconds of at least 0"),
            ("save_every", -1, "save_every must be a number of seconds of at least 0"),
            ("connectivity", 1, "connectivity must be a whole number of at least 2"),
            ("connectivity", 16.0, "connectivity must be a whole number of at least 2"),
            ("expansion_search", 0, "expansion_search must be a whole number of at least 1"),
            ("expansion_search", True, "expansion_search must be a whole number of at least 1"),
        ):
            with pytest.raises(ConfigurationError, match=message):
                VectorIndex("bad", listener="embed__text", **{setting: value})
        for name in ("../escape", ".hidden", "back\\slash", "nul\x00", "x" * 201, ""):
            with pytest.raises(ConfigurationError, match="plain name"):
                VectorIndex(name, listener="embed__text")
        # Nothing written, nothing added, for a refused declaration.
        assert not indexes.exists() and [c["identifier"] for c in db.show()] == ["embed__text", "upper__text"]

        db.add(VectorIndex("near", listener="embed__text", directory=indexes))
        with pytest.raises(SearchError, match="the query has 3 numbers; index 'near' holds vectors of 8"):
            db.search("near", [1.0, 2.0, 3.0])
        for k in (0, -1, 2.5, True, "3"):
            with pytest.raises(SearchError, match="k must be a whole number"):
                db.search("near", letters("a"), k=k)
        with pytest.raises(SearchError, match="no index 'nowhere'; indexes: near"):
            db.search("nowhere", letters("a"))
        with pytest.raises(SearchError, match="no query_model"):
            db.search("near", "aaa")
        with pytest.raises(SearchError, match="NaN"):
            db.search("near", [np.nan] * 8)
        with warnings.catch_warnings():  # numpy warned of an overflow, then it was called NaN or infinity
            warnings.simplefilter("error")
            with pytest.raises(SearchError, match=r"a number past what float32 holds \(about 3.4e38\): 1e\+39"):
                db.search("near", [1e39] + [0.0] * 7)
        with pytest.raises(SearchError, match="one vector"):
            db.search("near", [letters("a"), letters("b")])
        # A zero query has no angle to any row: ranked every row at 1, zero vectors at 0.
        with pytest.raises(SearchError, match="the query is all zeros: index 'near' ranks by the cosine"):
            db.search("near", [0.0] * 8)
        assert isinstance(SearchError("x"), ValueError)


def test_a_vector_of_another_length_is_an_error_of_its_row_and_is_not_indexed(duck: SQLClient, tmp_path: Path) -> None:
    make_docs(duck, [(1, "aaa", "en"), (2, "bbb", "en")])
    # A model whose vectors change length on one input (a bug a user may well have).
    model = Model("embed", predict=lambda texts: [letters(t)[: 3 if t == "ccc" else 8] for t in texts])
    with connect(duck) as db:
        db.add(Listener(model, "text", "docs"))
        db.add(VectorIndex("near", listener="embed__text", directory=tmp_path))
        db.cdc.start()
        duck.execute("INSERT INTO docs VALUES (3, 'ccc', 'en')")
        assert db.cdc.wait_idle(timeout=30)
        assert sorted(nearest(db, letters("aaa"))) == [1, 2]
        [error] = db.errors("near")
        assert error["source"] == 3 and "a vector of 3 numbers, where the index holds vectors of 8" in error["error"]


# Run in a process of its own: before the fix, DuckDB could also crash the process (a cursor
# closed by another thread mid-statement is a segmentation fault).
CLOSE_WHILE_SEARCHING = """
import random, sys, threading, duckdb, reactive
from reactive.components import Listener, Model, VectorIndex
path = sys.argv[1]
con = duckdb.connect(path)
con.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, x INTEGER)")
con.execute("INSERT INTO docs SELECT range, range FROM range(300)")
con.close()
embed = Model("embed", predict=lambda xs: [[float(x), 1.0] for x in xs], output_type="array<float32>")
errors = set()
for trial in range(40):
    db = reactive.connect(f"duckdb:///{path}")
    db.add(Listener(embed, "x", "docs"), progress=False)
    db.add(VectorIndex("near", listener="embed__x", metric="l2sq"), progress=False)
    searching, stop = threading.Barrier(3), threading.Event()

    def search():
        searching.wait()
        while not stop.is_set():
            try:
                db.search("near", [random.random() * 300, 1.0], k=5, rows=True)
            except Exception as exc:
                errors.add(f"{type(exc).__name__}: {str(exc).split(';')[0]}")

    threads = [threading.Thread(target=search, daemon=True) for _ in range(2)]
    for thread in threads:
        thread.start()
    searching.wait()
    stop.wait(random.random() * 0.05)
    db.close()
    stop.set()
    for thread in threads:
        thread.join(20)
        if thread.is_alive():
            sys.exit(f"a search did not return after db.close() (trial {trial})")
print(sorted(errors))
"""


def test_closing_a_duckdb_datalayer_while_searches_read_rows_ends_them_with_a_clear_error(tmp_path: Path) -> None:
    """db.close() closed each thread's DuckDB reader under a search reading rows through it
    (``rows=True``, a filter): the search hung in DuckDB for ever, or the process crashed; a
    search that did return raised DuckDB's ``Connection already closed!``."""
    path = tmp_path / "app.duckdb"
    run = subprocess.run(
        [sys.executable, "-c", CLOSE_WHILE_SEARCHING, str(path)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    closed = f"ConfigurationError: the datalayer of 'duckdb:///{path}' is closed"
    assert run.stdout.strip() in (f"[{closed!r}]", "[]"), run.stdout


def test_a_search_the_datalayer_is_closed_under_says_so(sql: SQLClient, tmp_path: Path) -> None:
    """A search under way when db.close() ran raised the driver's words (DuckDB's ``Connection
    already closed!``, SQLite's ``Cannot operate on a closed database.``), not that the
    datalayer was closed; on PostgreSQL it opened a new connection (taken for one the server
    had dropped), which nothing closed."""
    make_docs(sql, [(1, "aaa", "en"), (2, "bbb", "en")])
    db = connect(sql)

    def embed_then_close(texts: list[str]) -> list[list[float]]:
        db.close()  # another thread of the application closes the datalayer meanwhile
        return [letters(t) for t in texts]

    query_model = Model("q", predict=embed_then_close, output_type="array<float32>")
    db.add(Listener(embed_model(), "text", "docs"))
    db.add(VectorIndex("near", listener="embed__text", query_model=query_model, directory=tmp_path))
    with pytest.raises(ConfigurationError, match=r"the datalayer of .* is closed; reactive\.connect"):
        db.search("near", "aaa", rows=True)
    if sql.kind == "postgres":
        others = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
        assert within(10, lambda: sql.execute(others) == [(0,)])  # the server ends a closed session soon after


def test_the_index_keeps_only_its_current_failures_in_the_errors(duck: SQLClient, tmp_path: Path) -> None:
    """db.errors("<index>") lists current failures, as a listener's do. The index never cleared
    its records: a row indexed once its vector was mended, or deleted, kept its error, and
    every restart recorded a row that still failed once more."""
    make_docs(duck, [(1, "aaa", "en"), (2, "ccc", "en"), (3, "ccc", "en")])
    model = Model("embed", predict=lambda texts: [letters(t)[: 3 if t == "ccc" else 8] for t in texts])
    for restart in range(3):
        with connect(duck) as db:
            db.add(Listener(model, "text", "docs"))
            db.add(VectorIndex("near", listener="embed__text", directory=tmp_path))
            assert sorted(error["source"] for error in db.errors("near")) == [2, 3], restart
    with connect(duck) as db:
        db.add(Listener(model, "text", "docs"))
        db.add(VectorIndex("near", listener="embed__text", directory=tmp_path))
        db.cdc.start()
        duck.execute("UPDATE docs SET text = 'hhh' WHERE id = 2")  # mended: indexed, its error gone
        duck.execute("DELETE FROM docs WHERE id = 3")  # gone: so is its error
        assert db.cdc.wait_idle(timeout=30)
        assert nearest(db, letters("hhh"), k=1) == [2]
        assert db.errors("near") == []


def test_a_new_model_version_of_another_length_rebuilds_the_index(duck: SQLClient, tmp_path: Path) -> None:
    """A listener given a new model version whose vectors have another length (a new embedding
    model): the index refused every new vector (``a vector of 4 numbers, where the index holds
    vectors of 8``), searched nothing, and a restart did not mend it (the saved index kept the old
    length). Vectors of the same model version of another length are still errors of their row."""
    make_docs(duck, [(1, "aaa", "en"), (2, "bbb", "en"), (3, "hhh", "en")])
    short = Model("embed", predict=lambda texts: [letters(t)[:4] for t in texts], version="2")
    with connect(duck) as db:
        db.add(Listener(embed_model(), "text", "docs"))
        db.add(VectorIndex("near", listener="embed__text", metric="l2sq", directory=tmp_path))
        db.add(Listener(short, "text", "docs"))  # the new model replaces the old: every row computed again
        assert nearest(db, letters("bbb")[:4], k=1) == [2]
        assert len(nearest(db, letters("bbb")[:4])) == 3 and db.errors("near") == []
    with connect(duck) as db:  # a restart with the model of the first version again
        db.add(Listener(embed_model(), "text", "docs"))
        db.add(VectorIndex("near", listener="embed__text", metric="l2sq", directory=tmp_path))
        assert nearest(db, letters("hhh"), k=1) == [3]
        assert len(nearest(db, letters("hhh"))) == 3 and db.errors("near") == []


@pytest.mark.parametrize("metric", ["cos", "ip", "l2sq"])
def test_distances_are_what_the_readme_says_each_metric_gives(duck: SQLClient, tmp_path: Path, metric: str) -> None:
    """The README's _distance per metric, checked with numpy on vectors of every length."""
    vectors = np.random.default_rng(7).normal(size=(30, 8)).astype(np.float32) * 3
    duck.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, n INTEGER)")
    duck.executemany("INSERT INTO docs VALUES (?, ?)", [(i, i) for i in range(30)])
    model = Model("v", predict=lambda ns: [vectors[n] for n in ns], output_type="array<float32>")
    query = np.random.default_rng(8).normal(size=8).astype(np.float32)
    exact = {
        "cos": 1 - vectors @ query / np.linalg.norm(vectors, axis=1) / np.linalg.norm(query),
        "ip": 1 - vectors @ query,
        "l2sq": ((vectors - query) ** 2).sum(axis=1),
    }[metric]
    with connect(duck) as db:
        db.add(Listener(model, "n", "docs"))
        db.add(VectorIndex("near", listener="v__n", metric=metric, directory=tmp_path))
        hits = db.search("near", query, k=5)
    assert [hit["_source"] for hit in hits] == np.argsort(exact)[:5].tolist()
    assert [hit["_distance"] for hit in hits] == pytest.approx(np.sort(exact)[:5].tolist(), rel=1e-4, abs=1e-4)


def test_a_text_query_keeps_to_the_query_model_s_timeout(duck: SQLClient, tmp_path: Path) -> None:
    """db.search called the query model's predict with no bound: a hung query model (a remote
    embedding service) held the search, and the request thread of an app, for ever, although its
    Model(timeout=) said how long a call may take."""
    make_docs(duck, [(1, "aaa", "en"), (2, "hhh", "en")])
    release = threading.Event()

    def embed(texts: list[str]) -> list[list[float]]:
        if texts == ["hang"]:
            release.wait(60)
        return [letters(t) for t in texts]

    query_model = Model("q", predict=embed, output_type="array<float32>", timeout=0.5)
    with connect(duck) as db:
        db.add(Listener(embed_model(), "text", "docs"))
        db.add(VectorIndex("near", listener="embed__text", query_model=query_model, directory=tmp_path))
        try:
            with pytest.raises(
                SearchError, match=r"index 'near' cannot embed the query: model 'q' did not answer within 0\.5 s"
            ):
                db.search("near", "hang")
        finally:
            release.set()
        assert nearest(db, "hh", k=1) == [2]
    assert within(10, lambda: not [t for t in threading.enumerate() if t.name == "reactive-query-near"])

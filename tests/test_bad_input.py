"""Bad input: a clear error, and nothing lost."""

from __future__ import annotations

import pytest
from conftest import Recorder, SQLClient, outputs_by_source

import reactive
from reactive.components import Listener, Model


def test_select_of_a_missing_table_fails_at_add(sql: SQLClient, recorder: Recorder) -> None:
    with reactive.connect(sql.uri) as db:
        with pytest.raises(reactive.TableNotFoundError, match="'nope' does not exist"):
            db.add(Listener(Model("m", predict=recorder), "text", "nope"))
        assert db.show() == []


def test_table_without_primary_key_says_what_to_pass(sql: SQLClient, recorder: Recorder) -> None:
    sql.execute("CREATE TABLE notes (note_id INTEGER, body VARCHAR(100))")
    sql.execute("INSERT INTO notes VALUES (1, 'hi')")
    with reactive.connect(sql.uri) as db:
        with pytest.raises(reactive.MissingIdColumnError, match=r"no primary key: pass .*id_column="):
            db.add(Listener(Model("m", predict=recorder), "body", "notes"))
        db.add(Listener(Model("m", predict=recorder), "body", "notes", id_column="note_id"))
        assert outputs_by_source(db, "m__body") == {1: "<hi>"}


def test_row_without_the_key_is_recorded_and_the_rest_proceed(sql: SQLClient, recorder: Recorder) -> None:
    sql.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text VARCHAR(100))")
    sql.executemany("INSERT INTO docs VALUES (?, ?)", [(1, "a"), (2, None), (3, "c")])
    with reactive.connect(sql.uri, poll_interval=0.05) as db:
        db.add(Listener(Model("m", predict=recorder), "text", "docs"))
        assert outputs_by_source(db, "m__text") == {1: "<a>", 3: "<c>"}
        [error] = db.errors("m__text")
        assert error["source"] == 2 and "no value for key 'text'" in error["error"]
        assert error["listener"] == "m__text" and error["table"] == "docs"

        db.cdc.start()
        sql.execute("UPDATE docs SET text = 'b' WHERE id = 2")
        assert db.cdc.wait_idle(timeout=30)
        assert outputs_by_source(db, "m__text") == {1: "<a>", 2: "<b>", 3: "<c>"}


def test_key_column_that_does_not_exist_fails_at_add(duck: SQLClient, recorder: Recorder) -> None:
    duck.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text VARCHAR)")
    with reactive.connect(duck.uri) as db, pytest.raises(reactive.ConfigurationError, match="no column 'body'"):
        db.add(Listener(Model("m", predict=recorder), "body", "docs"))


def test_wrong_output_count_is_a_clear_error_per_batch(sql: SQLClient) -> None:
    sql.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text VARCHAR(100))")
    sql.executemany("INSERT INTO docs VALUES (?, ?)", [(i, f"t{i}") for i in range(1, 6)])
    with reactive.connect(sql.uri) as db:
        db.add(Listener(Model("short", predict=lambda xs: xs[:-1], batch_size=5), "text", "docs"))
        assert db.outputs("short__text") == []
        errors = db.errors("short__text")
        assert sorted(e["source"] for e in errors) == [1, 2, 3, 4, 5]
        assert {e["error"] for e in errors} == {"model 'short' returned 4 outputs for 5 inputs"}
        assert db.cdc.info()["listeners"]["short__text"]["errors"] == 5


def test_output_of_the_wrong_type_is_recorded(duck: SQLClient) -> None:
    duck.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text VARCHAR)")
    duck.executemany("INSERT INTO docs VALUES (?, ?)", [(1, "vec"), (2, "oops")])
    with reactive.connect(duck.uri) as db:
        model = Model("emb", predict=lambda xs: [[1.0, 2.0] if x == "vec" else "not a vector" for x in xs])
        db.add(Listener(model, "text", "docs"))
        assert outputs_by_source(db, "emb__text") == {1: [1.0, 2.0]}
        [error] = db.errors("emb__text")
        assert error["source"] == 2 and "does not fit array<float64>" in error["error"]


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("mysql://root:hunter2@db/app", "invalid database URI 'mysql://root:***@db/app'; supported schemes: duckdb://"),
        ("nonsense", "invalid database URI 'nonsense'"),
        ("postgres://bob:hunter2@127.0.0.1:1/x", "could not connect to 'postgres://bob:***@127.0.0.1:1/x'"),
        ("postgres://nobody:hunter2@127.0.0.1:5432/test", 'role "nobody" does not exist'),
        ("postgres://bob:hunter2@127.0.0.1:notaport/x", "invalid URI 'postgres://bob:***@127.0.0.1:notaport/x'"),
    ],
)
def test_invalid_uri_is_clear_and_redacted(uri: str, message: str) -> None:
    with pytest.raises(reactive.ReactiveError) as excinfo:
        reactive.connect(uri)
    assert message in str(excinfo.value)
    assert "hunter2" not in str(excinfo.value)
    assert isinstance(excinfo.value, ValueError | reactive.BackendError)


def test_filter_with_operators_is_refused() -> None:
    with pytest.raises(reactive.ConfigurationError, match="only equality"):
        Listener(Model("m", predict=list), "text", "docs", filter={"n": {"$gt": 3}})

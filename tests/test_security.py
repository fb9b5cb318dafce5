"""Security: names are quoted, never pasted into SQL; credentials never leave the process."""

from __future__ import annotations

import contextlib
import logging
import traceback
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from conftest import Recorder, SQLClient, outputs_by_source, within

import reactive
from reactive.components import Listener, Model

#: Quotes, a statement separator, a comment, placeholders of every driver, spaces, unicode.
TABLE = "dö\"cs'; DROP TABLE canary; -- ?%s"
ID = 'i"d ?%'
KEY = "te\"xt'; --%(x)s ü"


def quoted(name: str, sql: SQLClient) -> str:
    """How the foreign client writes a name: SQL's own quoting, nothing from reactive (psycopg
    reads a "%" as a placeholder even inside a quoted name)."""
    text = '"' + name.replace('"', '""') + '"'
    return text.replace("%", "%%") if sql.kind == "postgres" else text


def run(sql: SQLClient, statement: str, *rows: tuple[Any, ...]) -> list[tuple[Any, ...]]:
    """``statement`` with ``{p}`` for each parameter, through the database's own driver
    (the suite's client turns every "?" into "%s" for psycopg, names included)."""
    text = statement.format(p="%s" if sql.kind == "postgres" else "?")
    cursor = sql.raw.cursor()
    if len(rows) > 1:
        cursor.executemany(text, rows)
    else:
        cursor.execute(text, rows[0] if rows else ())
    result = cursor.fetchall() if cursor.description else []
    if sql.kind == "sqlite":
        sql.raw.commit()
    return result


def test_hostile_names_go_through_the_whole_flow(sql: SQLClient, recorder: Recorder) -> None:
    t, i, k = (quoted(name, sql) for name in (TABLE, ID, KEY))
    run(sql, "CREATE TABLE canary (id INTEGER PRIMARY KEY)")
    run(sql, f"CREATE TABLE {t} ({i} INTEGER PRIMARY KEY, {k} VARCHAR(100))")
    run(sql, f"INSERT INTO {t} VALUES ({{p}}, {{p}})", (1, "a'; DROP TABLE canary; --"), (2, 'b"'))
    model = Model("m", predict=recorder)
    identifier = f"m__{KEY}"
    with reactive.connect(sql.uri, poll_interval=0.05) as db:
        db.add(Listener(model, KEY, TABLE))
        assert outputs_by_source(db, identifier) == {1: "<a'; DROP TABLE canary; -->", 2: '<b">'}
        db.cdc.start()
        run(sql, f"INSERT INTO {t} VALUES ({{p}}, {{p}})", (3, "c ü"))
        run(sql, f"UPDATE {t} SET {k} = {{p}} WHERE {i} = {{p}}", ("B", 2))
        run(sql, f"DELETE FROM {t} WHERE {i} = {{p}}", (1,))
        assert db.cdc.wait_idle(timeout=30)
        assert outputs_by_source(db, identifier) == {2: "<B>", 3: "<c ü>"}
        info = db.cdc.info()
        assert info["source"]["tables"] == [TABLE] and info["source"]["failing_tables"] == {}
        assert info["stopped_tables"] == {} and db.errors() == []
        # A row whose key is NULL is recorded under the hostile names, and read back.
        run(sql, f"INSERT INTO {t} VALUES ({{p}}, {{p}})", (4, None))
        assert db.cdc.wait_idle(timeout=30)
        [error] = db.errors(identifier)
        assert (error["listener"], error["table"], error["source"]) == (identifier, TABLE, 4)
    assert run(sql, "SELECT count(*) FROM canary") == [(0,)]


# -- credentials ---------------------------------------------------------------------------------
SECRET = "s3cr3t-Pa55"


def assert_hidden(text: str) -> None:
    assert SECRET not in text
    assert "s3cr3t" not in text


@pytest.fixture
def pg_with_password(pg_database: str) -> str:
    """``pg_database`` as a URI with a password in the query (the server's trust rules ignore it)."""
    return f"{pg_database}?password={SECRET}"


def test_a_password_given_as_a_query_parameter_connects_and_never_shows(
    pg_with_password: str, recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with psycopg.connect(pg_with_password.split("?")[0], autocommit=True) as client:
        client.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text TEXT)")
        client.execute("INSERT INTO docs VALUES (1, 'a')")
        with reactive.connect(pg_with_password, poll_interval=0.05) as db:
            db.add(Listener(Model("m", predict=recorder), "text", "docs"))
            db.cdc.start()
            client.execute("INSERT INTO docs VALUES (2, 'b')")
            assert db.cdc.wait_idle(timeout=30)
            assert outputs_by_source(db, "m__text") == {1: "<a>", 2: "<b>"}
            assert "password=***" in repr(db)
            assert_hidden(repr(db))
            assert_hidden(repr(db.cdc.info()))
            assert_hidden(db.backend.uri)
            with pytest.raises(reactive.TableNotFoundError) as missing:
                db.add(Listener(Model("m", predict=recorder), "text", "nope", identifier="other"))
            assert_hidden(str(missing.value))
    assert caplog.records and all(SECRET not in record.getMessage() for record in caplog.records)


@pytest.mark.parametrize(
    "uri",
    [
        f"postgres://bob:{SECRET}@127.0.0.1:1/app",
        f"postgres://bob:{SECRET}/x@127.0.0.1:1/app",  # a raw "/" in the password
        f"postgres://bob:{SECRET}@x@127.0.0.1:1/app",  # a raw "@" in the password
        f"postgres://bob@127.0.0.1:1/app?password={SECRET}",
        f"postgres://bob@127.0.0.1:1/app?sslmode=disable&password={SECRET}",
        f"postgres://bob:{SECRET}@127.0.0.1:1/app?password={SECRET}",  # given twice: refused
    ],
)
def test_a_failed_connection_never_shows_the_password(uri: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with pytest.raises(reactive.ReactiveError) as failure:
        reactive.connect(uri, connect_timeout=5)
    # Everything a traceback shows, chained exceptions included.
    assert_hidden("".join(traceback.format_exception(failure.value)))
    assert all(SECRET not in record.getMessage() for record in caplog.records)


@pytest.mark.parametrize("password", [f"{SECRET}@ev1l/x", f"{SECRET}/ev1l@x"])
def test_a_mongodb_password_with_a_raw_slash_is_refused_and_never_shown(password: str) -> None:
    # pymongo ends the host part at the first "/": it took "ev1l", a piece of the password
    # after a raw "@", for a host, looked it up, and its error showed it.
    uri = f"mongodb://bob:{password}@127.0.0.1:1/app?serverSelectionTimeoutMS=300"
    with pytest.raises(reactive.ConfigurationError, match="must be percent-encoded") as failure:
        reactive.connect(uri)
    shown = "".join(traceback.format_exception(failure.value))
    assert_hidden(shown)
    assert "ev1l" not in shown


def test_nothing_read_is_unpickled_or_evaluated() -> None:
    """Rows, documents, frames and checkpoints are decoded as JSON, Avro or BSON only: the
    package never imports a deserializer that runs code, nor calls eval or exec."""
    import ast
    from pathlib import Path

    forbidden_modules = {"pickle", "cPickle", "dill", "marshal", "shelve", "yaml", "jsonpickle"}
    found = []
    for path in sorted((Path(__file__).parent.parent / "reactive").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                found += [f"{path.name}: import {n}" for n in names if n.split(".")[0] in forbidden_modules]
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("eval", "exec"):
                found.append(f"{path.name}:{node.lineno}: {node.func.id}()")
    assert found == []


def test_a_role_that_may_only_read_the_table_finds_its_primary_key(pg_database: str, recorder: Recorder) -> None:
    # Least privilege: reactive's role may read the application's table and create its own
    # tables in the schema. The primary key was looked up in information_schema, which shows a
    # constraint only to a role with more than SELECT on its table: db.add said "table 'docs'
    # has no primary key".
    role = f"reactive_reader_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_database, autocommit=True) as owner:
        owner.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text TEXT)")
        owner.execute("INSERT INTO docs VALUES (1, 'a')")
        owner.execute(f'CREATE ROLE "{role}" LOGIN')
        try:
            owner.execute(f'GRANT CREATE ON SCHEMA public TO "{role}"')
            owner.execute(f'GRANT SELECT ON docs TO "{role}"')
            base, database = pg_database.rsplit("/", 1)
            as_reader = base.replace("//postgres@", f"//{role}@") + f"/{database}"
            with reactive.connect(as_reader, poll_interval=0.05) as db:
                db.add(Listener(Model("m", predict=recorder), "text", "docs"))
                db.cdc.start()
                owner.execute("INSERT INTO docs VALUES (2, 'b')")
                assert db.cdc.wait_idle(timeout=30)
                assert outputs_by_source(db, "m__text") == {1: "<a>", 2: "<b>"}
        finally:
            owner.execute(f'DROP OWNED BY "{role}"')
            owner.execute(f'DROP ROLE "{role}"')


def test_a_model_error_quoting_a_uri_with_a_password_is_recorded_and_listed_without_it(
    tmp_path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A model that calls a service with credentials in its URL fails with a message naming
    it: the password went into ``_reactive_errors`` and out of ``db.errors()`` and
    ``reactive errors`` as it was."""
    import sqlite3

    from reactive.cli import main

    path = tmp_path / "app.sqlite"
    client = sqlite3.connect(path, isolation_level=None)
    client.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text TEXT)")
    client.executemany("INSERT INTO docs VALUES (?, ?)", [(1, "a"), (2, "b")])
    uri = f"sqlite:///{path}"

    def remote(texts: list[str]) -> list[str]:
        raise ConnectionError("https://bob:hunter2@api.example.com/v1 did not answer")

    with reactive.connect(uri) as db:
        db.add(Listener(Model("remote", predict=remote, max_retries=0), "text", "docs"), progress=False)
        errors = db.errors()
        assert [e["error"] for e in errors] == [
            "ConnectionError: https://bob:***@api.example.com/v1 did not answer"
        ] * 2
    # A record written before this release keeps its text in the table; the command hides it.
    client.execute("UPDATE _reactive_errors SET error = 'see postgresql://bob:hunter2@db/app' WHERE source = '2'")
    assert main(["errors", "--uri", uri]) == 0
    assert main(["errors", "--uri", uri, "--json"]) == 0
    out = capsys.readouterr().out
    assert "hunter2" not in out and "postgresql://bob:***@db/app" in out and "bob:***@api.example.com" in out
    client.close()


# -- least privilege: what PostgreSQL refuses reactive's role is said, with what to grant --------------------------
PASSWORD = "pw-never-shown"


def as_owner(pg_database: str) -> psycopg.Connection:
    """The database's owner (a superuser), writing whatever the database's defaults say."""
    return psycopg.connect(pg_database, autocommit=True, options="-c default_transaction_read_only=off")


@pytest.fixture
def pg_role(pg_database: str) -> Iterator[tuple[str, str]]:
    """A login role of no privilege (PostgreSQL 15: not even CREATE on schema public); its name and URI."""
    role = f"reactive_role_{uuid.uuid4().hex[:8]}"
    with as_owner(pg_database) as owner:
        owner.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text TEXT)")
        owner.execute("INSERT INTO docs VALUES (1, 'a'), (2, 'bb')")
        owner.execute(f"CREATE ROLE \"{role}\" LOGIN PASSWORD '{PASSWORD}'")
    base, database = pg_database.rsplit("/", 1)
    try:
        yield role, base.replace("//postgres@", f"//{role}:{PASSWORD}@") + f"/{database}"
    finally:
        with as_owner(pg_database) as owner:
            owner.execute(f'DROP OWNED BY "{role}"')
            owner.execute(f'DROP ROLE "{role}"')


def lengths() -> Listener:
    return Listener(Model("m", predict=lambda texts: [len(t) for t in texts]), "text", "docs")


def reactive_tables(pg_database: str) -> list[str]:
    with as_owner(pg_database) as owner:
        rows = owner.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1").fetchall()
    return [name for (name,) in rows if name != "docs"]


def refused_at_add(db: reactive.Datalayer, *expected: str) -> str:
    """``db.add`` raises PermissionDeniedError saying each of ``expected``, the password nowhere."""
    with pytest.raises(reactive.PermissionDeniedError) as refused:
        db.add(lengths())
    message = str(refused.value)
    for part in expected:
        assert part in message
    assert PASSWORD not in "".join(traceback.format_exception(refused.value)) and db.show() == []
    return message


def follows_after_the_grant(db: reactive.Datalayer, owner: psycopg.Connection) -> None:
    db.add(lengths())
    db.cdc.start()
    owner.execute("INSERT INTO docs VALUES (3, 'ccc')")
    assert db.cdc.wait_idle(timeout=30)
    assert outputs_by_source(db, "m__text") == {1: 1, 2: 2, 3: 3} and db.errors("m__text") == []


def test_a_role_that_may_not_create_tables_in_the_schema_is_told_what_to_grant(
    pg_database: str, pg_role: tuple[str, str]
) -> None:
    # psycopg's "InsufficientPrivilege: permission denied for schema public" came out of db.add.
    role, uri = pg_role
    with as_owner(pg_database) as owner, reactive.connect(uri, poll_interval=0.05) as db:
        owner.execute(f'GRANT SELECT ON docs TO "{role}"')
        refused_at_add(db, 'schema "public"', f'GRANT USAGE, CREATE ON SCHEMA "public" TO "{role}"')
        assert reactive_tables(pg_database) == []  # nothing made, nothing in the way of a retry
        owner.execute(f'GRANT CREATE ON SCHEMA public TO "{role}"')
        follows_after_the_grant(db, owner)


def test_reactive_tables_made_by_another_role_are_named_with_what_to_grant(
    pg_database: str, pg_role: tuple[str, str]
) -> None:
    # Another role (a deploy's) ran reactive first: "permission denied for table _reactive_errors".
    role, uri = pg_role
    with as_owner(pg_database) as owner:
        owner.execute(f'GRANT SELECT ON docs TO "{role}"; GRANT CREATE ON SCHEMA public TO "{role}"')
        with reactive.connect(pg_database) as first:
            first.add(lengths())
            first.add(Listener(Model("fails", predict=lambda texts: 1 / 0), "text", "docs"))  # _reactive_errors
        with reactive.connect(uri, poll_interval=0.05) as db:
            message = refused_at_add(db, "GRANT SELECT, INSERT, UPDATE, DELETE ON", f'TO "{role}"')
            assert "made by another role?" in message and "_outputs__*" in message
            owner.execute(f'GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO "{role}"')
            follows_after_the_grant(db, owner)


def test_a_read_only_database_is_said_with_the_setting_and_a_retry_after_the_change_works(
    pg_database: str, pg_role: tuple[str, str]
) -> None:
    # "ReadOnlySqlTransaction: cannot execute CREATE TABLE in a read-only transaction"; and the
    # session stayed read-only after the setting was changed, so every retry failed again.
    role, uri = pg_role
    with as_owner(pg_database) as owner:
        owner.execute(f'GRANT SELECT ON docs TO "{role}"; GRANT CREATE ON SCHEMA public TO "{role}"')
        database = pg_database.rsplit("/", 1)[1]
        owner.execute(f'ALTER DATABASE "{database}" SET default_transaction_read_only = on')
        with reactive.connect(uri, poll_interval=0.05) as db:
            refused_at_add(
                db,
                "read-only",
                "default_transaction_read_only is on",
                f'ALTER ROLE "{role}" SET default_transaction_read_only = off',
            )
            assert reactive_tables(pg_database) == []
            owner.execute(f'ALTER ROLE "{role}" SET default_transaction_read_only = off')
            follows_after_the_grant(db, owner)


def test_a_role_that_may_not_read_the_table_is_told_so_not_that_it_does_not_exist(
    pg_database: str, pg_role: tuple[str, str]
) -> None:
    # information_schema hides a table from a role with no privilege on it: "table 'docs' does not exist".
    role, uri = pg_role
    with as_owner(pg_database) as owner, reactive.connect(uri, poll_interval=0.05) as db:
        owner.execute(f'GRANT CREATE ON SCHEMA public TO "{role}"')
        refused_at_add(db, 'may not read table "docs"', f'GRANT SELECT ON "docs" TO "{role}"')
        owner.execute(f'GRANT SELECT ON docs TO "{role}"')
        follows_after_the_grant(db, owner)


def test_a_schema_the_role_may_not_use_is_named_in_the_not_found_error(
    pg_database: str, pg_role: tuple[str, str]
) -> None:
    _, uri = pg_role
    with as_owner(pg_database) as owner, reactive.connect(uri, poll_interval=0.05) as db:
        owner.execute("REVOKE USAGE ON SCHEMA public FROM PUBLIC")
        with pytest.raises(reactive.TableNotFoundError, match='no USAGE privilege: GRANT USAGE ON SCHEMA "public"'):
            db.add(lengths())


@contextlib.contextmanager
def following_as(pg_database: str, role: str, uri: str) -> Iterator[tuple[psycopg.Connection, reactive.Datalayer]]:
    """The owner's connection, and a datalayer of ``role`` (granted what it needs) following docs."""
    with as_owner(pg_database) as owner, reactive.connect(uri, poll_interval=0.05) as db:
        owner.execute(f'GRANT SELECT ON docs TO "{role}"; GRANT CREATE ON SCHEMA public TO "{role}"')
        db.add(lengths())
        db.cdc.start()
        yield owner, db


def test_a_privilege_revoked_while_running_keeps_the_window_until_it_is_granted_again(
    pg_database: str, pg_role: tuple[str, str]
) -> None:
    # The window's rows were set apart as failed (their outputs never written, their changes
    # passed): after the grant row 3 still had no output, and wait_idle said True.
    role, uri = pg_role
    with following_as(pg_database, role, uri) as (owner, db):
        owner.execute(f'REVOKE INSERT, UPDATE ON "_outputs__m__text" FROM "{role}"')
        owner.execute("INSERT INTO docs VALUES (3, 'ccc')")
        assert within(30, lambda: [e["source"] for e in db.errors()] == [3])
        [error] = db.errors()
        assert "PermissionDeniedError" in error["error"] and "GRANT SELECT, INSERT, UPDATE, DELETE" in error["error"]
        assert not db.cdc.wait_idle(timeout=0.5)
        info = db.cdc.info()
        assert info["handler"]["running"] and "PermissionDeniedError" in info["listeners"]["m__text"]["last_error"]
        owner.execute(f'GRANT INSERT, UPDATE ON "_outputs__m__text" TO "{role}"')
        assert db.cdc.wait_idle(timeout=30)
        assert outputs_by_source(db, "m__text") == {1: 1, 2: 2, 3: 3} and db.errors() == []


def test_select_on_the_table_revoked_while_running_is_not_taken_for_a_drop(
    pg_database: str, pg_role: tuple[str, str]
) -> None:
    # information_schema hid the table: "table 'docs' was dropped: its listeners stop", its
    # snapshot dropped, and nothing was followed after the grant.
    role, uri = pg_role
    with following_as(pg_database, role, uri) as (owner, db):
        owner.execute(f'REVOKE SELECT ON docs FROM "{role}"')
        owner.execute("INSERT INTO docs VALUES (3, 'ccc')")
        assert within(30, lambda: "docs" in db.cdc.info()["source"]["failing_tables"])
        assert f'GRANT SELECT ON "docs" TO "{role}"' in db.cdc.info()["source"]["failing_tables"]["docs"]
        assert db.cdc.info()["stopped_tables"] == {} and not db.cdc.wait_idle(timeout=0.5)
        owner.execute(f'GRANT SELECT ON docs TO "{role}"')
        assert db.cdc.wait_idle(timeout=30)
        assert outputs_by_source(db, "m__text") == {1: 1, 2: 2, 3: 3}


def test_a_session_that_turns_read_only_while_running_waits_and_resumes_once_writable(
    pg_database: str, pg_role: tuple[str, str]
) -> None:
    # As after a failover onto a standby: reactive reconnects to a session that may not write.
    role, uri = pg_role
    with following_as(pg_database, role, uri) as (owner, db):
        owner.execute(f'ALTER ROLE "{role}" SET default_transaction_read_only = on')
        owner.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", [role])
        owner.execute("INSERT INTO docs VALUES (3, 'ccc')")
        assert within(30, lambda: "read-only" in (db.cdc.info()["listeners"]["m__text"]["last_error"] or ""))
        assert not db.cdc.wait_idle(timeout=0.5) and db.cdc.info()["handler"]["running"]
        owner.execute(f'ALTER ROLE "{role}" RESET default_transaction_read_only')
        assert db.cdc.wait_idle(timeout=30)
        assert outputs_by_source(db, "m__text") == {1: 1, 2: 2, 3: 3} and db.errors() == []


def test_a_backfill_the_database_refuses_fails_db_add_with_what_to_grant(
    pg_database: str, pg_role: tuple[str, str]
) -> None:
    # The backfill's rows were set apart one by one with psycopg's error, each recorded as failed.
    role, uri = pg_role
    with as_owner(pg_database) as owner:
        owner.execute(f'GRANT SELECT ON docs TO "{role}"; GRANT CREATE ON SCHEMA public TO "{role}"')
        with reactive.connect(pg_database) as first:
            first.add(lengths())
        owner.execute('DELETE FROM "_outputs__m__text"')
        owner.execute(
            f'GRANT SELECT, INSERT, UPDATE, DELETE ON "_reactive_checkpoints", "_reactive_snapshot__docs" TO "{role}"'
        )
        owner.execute(f'GRANT SELECT ON "_outputs__m__text" TO "{role}"')
        with reactive.connect(uri, poll_interval=0.05) as db:
            with pytest.raises(reactive.PermissionDeniedError, match='"_outputs__m__text"') as refused:
                db.add(lengths())
            assert "adding it again resumes the backfill" in str(refused.value)
            owner.execute(f'GRANT INSERT, UPDATE, DELETE ON "_outputs__m__text" TO "{role}"')
            follows_after_the_grant(db, owner)

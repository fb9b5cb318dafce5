"""Model faults: transient errors, hangs, retrying failed rows, model versions, Ctrl-C, replays."""

from __future__ import annotations

import datetime as _dt
import json
import logging
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import psycopg
import pytest
from conftest import Recorder, SQLClient, outputs_by_source

import reactive
from reactive.cli import main
from reactive.components import Failure, Listener, Model
from reactive.components import model as model_module
from reactive.compute import LocalCompute
from reactive.threads import reactive_threads


def connect(client: SQLClient, **options: Any) -> reactive.Datalayer:
    return reactive.connect(client.uri, poll_interval=0.05, **options)


def make_docs(client: SQLClient, rows: list[tuple[int, str | None]], table: str = "docs") -> None:
    client.execute(f"CREATE TABLE {table} (id INTEGER PRIMARY KEY, text VARCHAR)")
    if rows:
        client.executemany(f"INSERT INTO {table} VALUES (?, ?)", rows)


class Hang:
    """A predict function that hangs on the input ``"hang"`` until the test releases it."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, texts: list[str]) -> list[str]:
        if "hang" in texts and not self.release.is_set():
            self.entered.set()
            assert self.release.wait(30), "the test never released the model"
        return [t.upper() for t in texts]


class Flaky:
    """Fails on inputs that contain ``"bad"`` while ``broken`` is set."""

    def __init__(self) -> None:
        self.broken = True
        self.inputs: list[str] = []

    def __call__(self, texts: list[str]) -> list[str]:
        self.inputs.extend(texts)
        if self.broken and any("bad" in t for t in texts):
            raise ValueError("cannot handle bad input")
        return [t.upper() for t in texts]


# -- the model alone ----------------------------------------------------------------------
def test_a_transient_error_retries_the_batch_together() -> None:
    sizes: list[int] = []

    def remote(texts: list[str]) -> list[int]:
        sizes.append(len(texts))
        if len(sizes) < 3:
            raise TimeoutError("the server is busy")
        return [len(t) for t in texts]

    model = Model("len", predict=remote, transient=(TimeoutError,), retry_backoff=0.001)
    assert model.compute(["a", "bb", "ccc", "dddd"], wait=lambda s: True) == [1, 2, 3, 4]
    assert sizes == [4, 4, 4]
    assert model.calls.transient_retries == 2


def test_a_transient_error_that_persists_fails_the_whole_batch_without_splitting() -> None:
    sizes: list[int] = []

    def down(texts: list[str]) -> list[int]:
        sizes.append(len(texts))
        raise ConnectionError("connection refused")

    model = Model("len", predict=down, transient=lambda exc: isinstance(exc, ConnectionError), transient_retries=3)
    results = model.compute(["a", "b", "c"], wait=lambda s: True)
    assert sizes == [3, 3, 3, 3]
    assert results == [Failure("ConnectionError: connection refused (transient; gave up after 3 retries)")] * 3


def test_a_permanent_error_is_still_isolated_by_splitting() -> None:
    model = Model("up", predict=Flaky(), max_retries=0, transient=TimeoutError)
    results = model.compute(["ok", "bad", "fine"], wait=lambda s: True)
    assert results == ["OK", Failure("ValueError: cannot handle bad input"), "FINE"]


def test_a_hanging_call_times_out_and_the_model_waits_for_it_to_return() -> None:
    hang = Hang()
    model = Model("up", predict=hang, timeout=0.2)
    try:
        assert (
            model.compute(["hang", "x"], wait=lambda s: True) == [Failure("model 'up' did not answer within 0.2 s")] * 2
        )
        stuck = model.calls.stuck
        assert stuck is not None and stuck.thread == "reactive-model-up" and stuck.inputs == 2
        assert [t.name for t in reactive_threads()] == ["reactive-model-up"]
        # predict is never called twice at once: while the call hangs, batches fail at once.
        [failure] = model.compute(["y"], wait=lambda s: True)
        assert "a call given up earlier is still running" in failure.error
    finally:
        hang.release.set()
    assert model.wait_calls(timeout=10)
    assert model.calls.stuck is None and model.calls.timeouts == 1
    assert model.compute(["y"], wait=lambda s: True) == ["Y"]


def test_a_windows_batches_run_in_one_hand_off_each_with_its_own_deadline_and_call_info() -> None:
    """The batches of one compute() are handed to the predict thread at once: a cheap model
    pays no round trip between two threads per batch. Each batch's call still has its own
    timeout (five calls of 0.1 s under a timeout of 0.3 s all return) and shows as the running
    call with its own inputs."""
    seen: list[tuple[int, int | None, str]] = []
    model: Model

    def slow(texts: list[str]) -> list[str]:
        running = model.calls.running
        seen.append((len(texts), running and running.inputs, threading.current_thread().name))
        time.sleep(0.1)  # the model's own time
        return [t.upper() for t in texts]

    model = Model("up", predict=slow, batch_size=2, timeout=0.3, sort_by_length=False)
    assert model.compute(list("abcdefghi"), wait=lambda s: True) == list("ABCDEFGHI")
    assert seen == [(2, 2, "reactive-model-up")] * 4 + [(1, 1, "reactive-model-up")]
    assert model.calls.timeouts == 0 and model.calls.running is None


def test_a_batch_that_hangs_in_a_hand_off_fails_alone_and_the_batches_after_it_are_not_called() -> None:
    """A call that times out in the middle of a window: the batches before it keep their outputs,
    it fails with the timeout, the ones after it fail at once while it hangs (the model is never
    called twice at once) and are never called by the thread that hangs, even once it returns."""
    called: list[str] = []
    hang = Hang()

    def predict(texts: list[str]) -> list[str]:
        called.extend(texts)
        return hang(texts)

    model = Model("up", predict=predict, batch_size=1, timeout=0.2, sort_by_length=False)
    try:
        results = model.compute(["a", "b", "hang", "c", "d"], wait=lambda s: True)
        assert results[:2] == ["A", "B"]
        assert results[2] == Failure("model 'up' did not answer within 0.2 s")
        assert all("a call given up earlier is still running" in r.error for r in results[3:])
        stuck = model.calls.stuck
        assert stuck is not None and stuck.inputs == 1
    finally:
        hang.release.set()
    assert model.wait_calls(timeout=10)
    assert called == ["a", "b", "hang"]
    assert model.compute(["c", "d"], wait=lambda s: True) == ["C", "D"]


def test_the_predict_thread_is_kept_from_window_to_window_and_ends_with_close() -> None:
    """LocalCompute keeps each model's predict thread between windows (starting one per window
    cost a third of a one-row window's path); it ends when the compute thread does."""
    threads: list[int] = []

    def record(values: list[str]) -> list[str]:
        threads.append(threading.get_ident())
        return [v.upper() for v in values]

    first, second = Model("first", predict=record), Model("second", predict=record)
    compute = LocalCompute(idle_release=3600)  # kept however slowly the submits come
    try:
        for model in (first, second, first, second):
            assert compute.submit(model, ["a"], wait=lambda s: True).result(timeout=30) == ["A"]
        assert threads[0] == threads[2] and threads[1] == threads[3] and threads[0] != threads[1]
        names = sorted(t.name for t in reactive_threads())
        assert names == ["reactive-compute", "reactive-model-first", "reactive-model-second"]
        # A compute() of its own (keep_thread=False) on this thread leaves nothing behind.
        assert first.compute(["b"], wait=lambda s: True) == ["B"]
        assert threads[-1] not in (threads[0], threads[1])
    finally:
        compute.close(timeout=30)
    assert not reactive_threads()


def test_the_predict_thread_ends_when_no_work_came_for_idle_release_seconds() -> None:
    """What a thread keeps (torch's OpenMP team) slows the application's own model calls on
    other threads while it lives: an idle compute thread ends its models' predict threads, and
    the next window starts one again."""
    threads: list[threading.Thread] = []

    def record(values: list[str]) -> list[str]:
        threads.append(threading.current_thread())
        return [v.upper() for v in values]

    model = Model("first", predict=record)
    compute = LocalCompute(idle_release=0.05)
    try:
        assert compute.submit(model, ["a"], wait=lambda s: True).result(timeout=30) == ["A"]
        threads[0].join(timeout=30)
        assert not threads[0].is_alive()
        assert [t.name for t in reactive_threads()] == ["reactive-compute"]
        assert compute.submit(model, ["b"], wait=lambda s: True).result(timeout=30) == ["B"]
        assert threads[1] is not threads[0] and threads[1].name == "reactive-model-first"
    finally:
        compute.close(timeout=30)
    assert not reactive_threads()


@pytest.mark.parametrize("idle_release", [0, -1, float("nan"), float("inf"), True, "1"])
def test_idle_release_must_be_finite_seconds(idle_release: object) -> None:
    with pytest.raises(
        reactive.ConfigurationError, match=r"idle_release must be a (finite )?number of seconds above 0"
    ):
        LocalCompute(idle_release=idle_release)  # type: ignore[arg-type]


def test_a_hanging_call_is_given_up_when_stopping(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model_module, "STOP_GRACE", 0.2)
    hang = Hang()
    model = Model("up", predict=hang)  # no timeout: only a stop gives the call up
    try:
        [failure] = model.compute(["hang"], wait=lambda s: True, stopping=lambda: True)
        assert failure.error == "model 'up' was still running when change data capture stopped"
    finally:
        hang.release.set()
    assert model.wait_calls(timeout=10)


def test_bad_model_settings_are_refused() -> None:
    with pytest.raises(reactive.ConfigurationError, match="timeout"):
        Model("m", predict=list, timeout=0)
    with pytest.raises(reactive.ConfigurationError, match="transient"):
        Model("m", predict=list, transient=("TimeoutError",))  # type: ignore[arg-type]
    with pytest.raises(reactive.ConfigurationError, match="version"):
        Model("m", predict=list, version=1.5)  # type: ignore[arg-type]


# -- hangs in the running engine ----------------------------------------------------------
def test_a_model_that_hangs_fails_its_batch_and_the_other_tables_go_on(duck: SQLClient) -> None:
    make_docs(duck, [])
    make_docs(duck, [], table="notes")
    hang = Hang()
    stuck = Model("stuck", predict=hang, timeout=0.3)
    with connect(duck) as db:
        db.add(Listener(stuck, "text", "docs"))
        db.add(Listener(Model("fine", predict=Recorder()), "text", "notes"))
        db.cdc.start()
        try:
            duck.execute("INSERT INTO docs VALUES (1, 'hang')")
            duck.execute("INSERT INTO notes VALUES (1, 'note')")
            assert db.cdc.wait_idle(timeout=30)
            assert outputs_by_source(db, "fine__text") == {1: "<note>"}
            [error] = db.errors("stuck__text")
            assert (error["source"], error["error"]) == (1, "model 'stuck' did not answer within 0.3 s")
            calls = db.cdc.info()["listeners"]["stuck__text"]["model_calls"]
            assert calls["running"] is None and calls["timeouts"] == 1
            assert calls["stuck"]["thread"] == "reactive-model-stuck"
            assert calls["stuck"]["abandoned"] == error["error"]
            # While the call hangs the model is not called again: the next row fails at once.
            duck.execute("INSERT INTO docs VALUES (2, 'next')")
            assert db.cdc.wait_idle(timeout=30)
            assert sorted(e["source"] for e in db.errors("stuck__text")) == [1, 2]
        finally:
            hang.release.set()
        assert stuck.wait_calls(timeout=10)
        assert db.cdc.info()["listeners"]["stuck__text"]["model_calls"]["stuck"] is None
        assert db.retry_errors("stuck__text") == 2
        assert outputs_by_source(db, "stuck__text") == {1: "HANG", 2: "NEXT"}
        assert db.errors() == []


def test_info_shows_a_long_call_and_stop_gives_it_up(duck: SQLClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """A hang without a timeout: info() says which listener waits since when; stop() and
    close() return, and only the stuck call's thread stays until predict returns."""
    monkeypatch.setattr(model_module, "STOP_GRACE", 0.3)
    make_docs(duck, [])
    hang = Hang()
    model = Model("slow", predict=hang)
    db = connect(duck)
    try:
        db.add(Listener(model, "text", "docs"))
        db.cdc.start()
        before = _dt.datetime.now(_dt.UTC)
        duck.execute("INSERT INTO docs VALUES (1, 'hang')")
        assert hang.entered.wait(30)
        running = db.cdc.info()["listeners"]["slow__text"]["model_calls"]["running"]
        assert running["thread"] == "reactive-model-slow" and running["inputs"] == 1
        assert before - _dt.timedelta(seconds=1) <= running["since"] <= _dt.datetime.now(_dt.UTC)
        assert not db.cdc.wait_idle(timeout=0.2)

        started = time.monotonic()
        db.cdc.stop()
        assert time.monotonic() - started < 10
        assert [t.name for t in reactive_threads()] == ["reactive-model-slow"]
        [error] = db.errors("slow__text")
        assert error["error"] == "model 'slow' was still running when change data capture stopped"
        db.close()
    finally:
        hang.release.set()
    assert model.wait_calls(timeout=10)
    assert not reactive_threads()

    with connect(duck) as db:  # the failed row has no output: the next start computes it
        db.add(Listener(Model("slow", predict=hang), "text", "docs"))
        assert outputs_by_source(db, "slow__text") == {1: "HANG"}


def test_a_transient_error_in_the_engine_is_retried_not_recorded(duck: SQLClient) -> None:
    make_docs(duck, [(1, "a"), (2, "b")])
    failures = [TimeoutError("busy")]

    def remote(texts: list[str]) -> list[str]:
        if failures:
            raise failures.pop()
        return [t.upper() for t in texts]

    with connect(duck) as db:
        db.add(Listener(Model("up", predict=remote, transient=TimeoutError, retry_backoff=0.001), "text", "docs"))
        assert outputs_by_source(db, "up__text") == {1: "A", 2: "B"}
        assert db.errors() == []
        assert db.cdc.info()["listeners"]["up__text"]["model_calls"]["transient_retries"] == 1


# -- retrying failed rows -----------------------------------------------------------------
def test_retry_errors_computes_failed_rows_again(sql: SQLClient) -> None:
    make_docs(sql, [(1, "ok"), (2, "bad one"), (3, "bad two"), (4, None)])
    flaky = Flaky()
    with connect(sql) as db:
        db.add(Listener(Model("up", predict=flaky, max_retries=0), "text", "docs"))
        assert outputs_by_source(db, "up__text") == {1: "OK"}
        assert sorted(e["source"] for e in db.errors("up__text")) == [2, 3, 4]

        flaky.broken = False
        sql.execute("DELETE FROM docs WHERE id = 3")  # gone by the retry: its error goes away
        flaky.inputs.clear()
        assert db.retry_errors() == 3
        assert flaky.inputs == ["bad one"]
        assert outputs_by_source(db, "up__text") == {1: "OK", 2: "BAD ONE"}
        # The row without a key fails again, and is recorded again (once).
        [error] = db.errors()
        assert (error["source"], error["error"]) == (4, "row has no value for key 'text'")
        assert db.retry_errors("up__text") == 1
        assert len(db.errors()) == 1
        with pytest.raises(reactive.ConfigurationError, match="no component 'nope' to retry"):
            db.retry_errors("nope")


def test_the_errors_table_holds_the_current_failures(duck: SQLClient) -> None:
    make_docs(duck, [(1, "bad"), (2, "bad too"), (3, "ok")])
    flaky = Flaky()
    with connect(duck) as db:
        db.add(Listener(Model("up", predict=flaky, max_retries=0), "text", "docs"))
        assert sorted(e["source"] for e in db.errors()) == [1, 2]
        db.cdc.start()
        duck.execute("UPDATE docs SET text = 'fixed' WHERE id = 1")  # computed: its error goes
        duck.execute("UPDATE docs SET text = 'bad again' WHERE id = 2")  # fails again: one record
        assert db.cdc.wait_idle(timeout=30)
        [error] = db.errors()
        assert error["source"] == 2 and error["error"] == "ValueError: cannot handle bad input"
    flaky.broken = False
    with connect(duck) as db:  # a restart computes the failed row; its error goes too
        db.add(Listener(Model("up", predict=flaky), "text", "docs"))
        assert outputs_by_source(db, "up__text") == {1: "FIXED", 2: "BAD AGAIN", 3: "OK"}
        assert db.errors() == []


def test_retry_errors_on_mongodb(mongo_uri: str, mongo) -> None:
    mongo.docs.insert_many([{"_id": "a", "text": "ok"}, {"_id": "b", "text": "bad"}])
    flaky = Flaky()
    with reactive.connect(mongo_uri) as db:
        db.add(Listener(Model("up", predict=flaky, max_retries=0), "text", "docs"))
        assert [e["source"] for e in db.errors()] == ["b"]
        flaky.broken = False
        assert db.retry_errors() == 1
        assert outputs_by_source(db, "up__text") == {"a": "OK", "b": "BAD"}
        assert db.errors() == []


# -- reactive errors ----------------------------------------------------------------------
def test_the_errors_command_lists_and_clears(
    duck: SQLClient, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_docs(duck, [(1, "ok"), (2, "bad"), (3, None)])
    with connect(duck) as db:
        db.add(Listener(Model("up", predict=Flaky(), max_retries=0), "text", "docs"))
        db.add(Listener(Model("other", predict=Flaky(), max_retries=0), "text", "docs"))
    duck.close()  # DuckDB lets one process at a time open the file; the command is another client

    assert main(["errors", "--uri", duck.uri]) == 0
    out = capsys.readouterr().out
    assert "ValueError: cannot handle bad input" in out and "row has no value for key 'text'" in out
    assert out.rstrip().endswith("4 errors")

    assert main(["errors", "--uri", duck.uri, "--listener", "up__text", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert sorted((e["listener"], e["source"]) for e in listed) == [("up__text", 2), ("up__text", 3)]
    assert all(_dt.datetime.fromisoformat(e["at"]) for e in listed)

    assert main(["errors", "--uri", duck.uri, "--listener", "up__text", "--retry"]) == 0
    assert "cleared 2 errors. Nothing was computed here" in capsys.readouterr().out
    assert main(["errors", "--uri", duck.uri, "--json"]) == 0
    assert {e["listener"] for e in json.loads(capsys.readouterr().out)} == {"other__text"}

    with reactive.connect(duck.uri) as db:  # the next start computes the cleared rows again
        db.add(Listener(Model("up", predict=Recorder()), "text", "docs"))
        assert outputs_by_source(db, "up__text") == {1: "OK", 2: "<bad>"}
        assert [e["source"] for e in db.errors("up__text")] == [3]

    assert main(["errors", "--uri", f"duckdb:///{tmp_path / 'missing.duckdb'}"]) == 1
    assert "no database file" in capsys.readouterr().err
    assert not (tmp_path / "missing.duckdb").exists()


# -- what a changed model means -----------------------------------------------------------
def test_a_new_version_computes_every_output_again(duck: SQLClient) -> None:
    make_docs(duck, [(1, "a"), (2, "b")])
    first, second = Recorder(lambda t: f"v1:{t}"), Recorder(lambda t: f"v2:{t}")
    with connect(duck) as db:
        old = db.add(Listener(Model("m", predict=first, version="1"), "text", "docs"))
        assert db.add(Listener(Model("m", predict=first, version="1"), "text", "docs")) is old
        new = Listener(Model("m", predict=second, version="2"), "text", "docs")
        assert db.add(new) is new
        assert sorted(second.inputs) == ["a", "b"]
        assert outputs_by_source(db, "m__text") == {1: "v2:a", 2: "v2:b"}
        db.cdc.start()
        duck.execute("INSERT INTO docs VALUES (3, 'c')")
        assert db.cdc.wait_idle(timeout=30)
        assert outputs_by_source(db, "m__text")[3] == "v2:c"
        assert len(first.inputs) == 2

    third = Recorder(lambda t: f"v3:{t}")
    with connect(duck) as db:  # a restart with the same version keeps; another computes again
        db.add(Listener(Model("m", predict=Recorder(), version="2"), "text", "docs"))
        assert outputs_by_source(db, "m__text") == {1: "v2:a", 2: "v2:b", 3: "v2:c"}
        db.remove("m__text")
        db.add(Listener(Model("m", predict=third, version=3), "text", "docs"))
        assert sorted(third.inputs) == ["a", "b", "c"]


def test_a_new_predict_with_the_same_version_replaces_the_model_and_says_so(
    duck: SQLClient, caplog: pytest.LogCaptureFixture
) -> None:
    make_docs(duck, [(1, "a")])
    first, second = Recorder(lambda t: f"old:{t}"), Recorder(lambda t: f"new:{t}")
    with connect(duck) as db:
        db.add(Listener(Model("m", predict=first), "text", "docs"))
        replacement = Listener(Model("m", predict=second), "text", "docs")
        with caplog.at_level(logging.WARNING, logger="reactive"):
            assert db.add(replacement) is replacement
        assert "has the version of the old one" in caplog.text
        assert outputs_by_source(db, "m__text") == {1: "old:a"}  # no version change: kept
        assert db.show() == [replacement.describe()]
        db.cdc.start()
        duck.execute("INSERT INTO docs VALUES (2, 'b')")
        assert db.cdc.wait_idle(timeout=30)
        assert outputs_by_source(db, "m__text")[2] == "new:b"
        assert first.inputs == ["a"]


# -- Ctrl-C during a backfill -------------------------------------------------------------
INTERRUPTING_MODEL = """
import os, signal

calls = 0

def interrupting(texts):
    global calls
    calls += 1
    if calls == 3:
        os.kill(os.getpid(), signal.SIGINT)  # the user presses Ctrl-C during the backfill
    return [t.upper() for t in texts]
"""


def _sigint_default() -> None:
    """In a child: Ctrl-C acts, even if this run inherited SIGINT ignored (a shell's background job)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture
def sigint_handled() -> Iterator[None]:
    """Ctrl-C raises KeyboardInterrupt here, even if this run inherited SIGINT ignored."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_during_a_backfill_stops_cleanly_and_adding_again_resumes(duck: SQLClient, sigint_handled) -> None:
    duck.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text VARCHAR)")
    duck.execute("INSERT INTO docs SELECT i, 'doc ' || i FROM range(20000) t(i)")
    namespace: dict[str, Any] = {}
    exec(INTERRUPTING_MODEL, namespace)
    seen: list[str] = []
    model = Model("up", predict=lambda texts: seen.extend(texts) or namespace["interrupting"](texts), batch_size=100)
    reported: list[int] = []
    with connect(duck, page_size=500, batch_rows=500) as db:
        listener = Listener(model, "text", "docs")
        with pytest.raises(KeyboardInterrupt):
            db.add(listener, progress=lambda done, total: reported.append(done))
        assert model.wait_calls(timeout=10)
        assert not reactive_threads()  # db.cdc stopped before the interrupt went on
        assert 0 < len(db.outputs("up__text")) < 20000
        # The packets passed over while db.cdc stopped took the progress to 20,000, all "done".
        assert max(reported, default=0) <= len(db.outputs("up__text"))
        assert db.add(Listener(model, "text", "docs"), progress=False) is listener  # resumes
        assert len(db.outputs("up__text")) == 20000
        assert len(seen) == len(set(seen)) == 20000  # the rest of the interrupted backfill was skipped


CTRL_C_SCRIPT = (
    INTERRUPTING_MODEL
    + """
import sys
import reactive
from reactive.components import Listener, Model

db = reactive.connect(sys.argv[1], page_size=2000, batch_rows=2000)  # no `with`: nothing closes it
db.add(Listener(Model("up", predict=interrupting, batch_size=2000), "text", "docs"), progress=False)
print("the backfill finished", flush=True)
"""
)


def test_ctrl_c_in_a_script_without_with_exits_cleanly_and_a_restart_resumes(tmp_path: Path) -> None:
    """Without the fix DuckDB aborted the process: the interpreter exited while the handler
    thread was inside DuckDB ('terminate called without an active exception', SIGABRT)."""
    path = tmp_path / "app.duckdb"
    with duckdb.connect(str(path)) as client:
        client.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text VARCHAR)")
        client.execute("INSERT INTO docs SELECT i, 'doc ' || i FROM range(200000) t(i)")
    script = tmp_path / "backfill.py"
    script.write_text(CTRL_C_SCRIPT)
    uri = f"duckdb:///{path}"
    for _ in range(3):  # the abort depended on timing; three runs made it near certain
        done = subprocess.run(
            [sys.executable, str(script), uri], capture_output=True, text=True, timeout=120, preexec_fn=_sigint_default
        )
        assert done.returncode == -signal.SIGINT, done.stderr[-2000:]
        assert "KeyboardInterrupt" in done.stderr and "terminate called" not in done.stderr
        assert "the backfill finished" not in done.stdout
    recorder = Recorder(str.upper)
    with reactive.connect(uri) as db:
        before = len(db.outputs("up__text"))
        assert 0 < before < 200000
        db.add(Listener(Model("up", predict=recorder, batch_size=2000), "text", "docs"), progress=False)
        assert len(db.outputs("up__text")) == 200000
        assert len(recorder.inputs) == 200000 - before


CTRL_C_WHILE_FOLLOWING = """
import os, signal, sys, threading, time
import reactive
from reactive.components import Listener, Model

db = reactive.connect(sys.argv[1], poll_interval=0.01)  # no `with`: nothing closes it
db.add(Listener(Model("m", predict=lambda texts: [len(t) for t in texts]), "text", "docs"), progress=False)
db.cdc.start()
threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()  # the user presses Ctrl-C
while True:
    time.sleep(0.01)
"""


def test_ctrl_c_while_change_data_capture_runs_exits_cleanly(tmp_path: Path) -> None:
    """db.cdc is stopped at interpreter exit: no thread of reactive is inside DuckDB when it goes."""
    path = tmp_path / "app.duckdb"
    with duckdb.connect(str(path)) as client:
        client.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text VARCHAR)")
        client.execute("INSERT INTO docs SELECT i, 'doc ' || i FROM range(50000) t(i)")
    script = tmp_path / "follow.py"
    script.write_text(CTRL_C_WHILE_FOLLOWING)
    for _ in range(3):
        done = subprocess.run(
            [sys.executable, str(script), f"duckdb:///{path}"],
            capture_output=True,
            text=True,
            timeout=120,
            preexec_fn=_sigint_default,
        )
        assert done.returncode == -signal.SIGINT, done.stderr[-2000:]
        assert "KeyboardInterrupt" in done.stderr and "terminate called" not in done.stderr


# -- a crash between writing outputs and saving the position ------------------------------
CRASH_SCRIPT = """
import os, signal, sys
import reactive
from reactive.components import Listener, Model
from {listener_module} import {listener_class} as ChangeListener

def crash(self, positions):
    os.kill(os.getpid(), signal.SIGKILL)  # the outputs are written; the position is not saved

ChangeListener.save_positions = crash
db = reactive.connect(sys.argv[1], poll_interval=0.05)
db.add(Listener(Model("up", predict=lambda texts: [t.upper() for t in texts]), "text", "docs"))
db.cdc.start()
{insert}
db.cdc.wait_idle(timeout=60)
print("not killed", flush=True)
"""
SQL_INSERT = {
    "duckdb": "import duckdb; duckdb.connect(sys.argv[2]).execute("
    "\"INSERT INTO docs SELECT i, 'doc ' || i FROM range(1, 501) t(i)\")",
    "sqlite": "import sqlite3; c = sqlite3.connect(sys.argv[2]); "
    "c.executemany('INSERT INTO docs VALUES (?, ?)', [(i, f'doc {i}') for i in range(1, 501)]); c.commit()",
}


def _crash_after_writing_outputs(uri: str, listener: str, insert: str, *args: str, tmp_path: Path) -> None:
    module, cls = listener.rsplit(".", 1)
    script = tmp_path / "crash.py"
    script.write_text(textwrap.dedent(CRASH_SCRIPT.format(listener_module=module, listener_class=cls, insert=insert)))
    done = subprocess.run([sys.executable, str(script), uri, *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stdout + done.stderr[-2000:]


def _restart_recomputes_no_replay(uri: str) -> None:
    """Restart: rows the crash left without an output are computed, replayed ones are not."""
    recorder = Recorder(str.upper)
    with reactive.connect(uri, poll_interval=0.05) as db:
        written = len(db.outputs("up__text"))
        assert written > 0  # the crash came after an outputs write
        db.add(Listener(Model("up", predict=recorder), "text", "docs"))
        assert len(recorder.inputs) == 500 - written
        before = db.cdc.info()["listeners"].get("up__text", {"inserts": 0, "skipped": 0})
        db.cdc.start()
        assert db.cdc.wait_idle(timeout=60)
        after = db.cdc.info()["listeners"]["up__text"]
        replayed, skipped = (after[n] - before[n] for n in ("inserts", "skipped"))
        assert replayed == skipped == 500  # looked up, found stored, skipped
        assert len(recorder.inputs) == 500 - written
        assert len(db.outputs("up__text")) == 500


def _create_docs(kind: str, path: Path) -> None:
    if kind == "duckdb":
        with duckdb.connect(str(path)) as client:
            client.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text VARCHAR)")
    else:
        with sqlite3.connect(str(path)) as client:
            client.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text VARCHAR)")


@pytest.mark.parametrize("kind", ["duckdb", "sqlite"])
def test_a_crash_before_the_position_is_saved_leaves_no_output_on_sql(kind: str, tmp_path: Path) -> None:
    """On SQL a window's outputs and its position are one transaction: the crash leaves neither,
    and the restart computes every row once."""
    path = tmp_path / f"app.{kind}"
    _create_docs(kind, path)
    uri = f"{kind}:///{path}"
    listener = "reactive.backends.ibis.listener.IbisPollingListener"
    _crash_after_writing_outputs(uri, listener, SQL_INSERT[kind], str(path), tmp_path=tmp_path)
    recorder = Recorder(str.upper)
    with reactive.connect(uri, poll_interval=0.05) as db:
        assert db.outputs("up__text") == []  # rolled back with the position it came with
        db.add(Listener(Model("up", predict=recorder), "text", "docs"))
        db.cdc.start()
        assert db.cdc.wait_idle(timeout=60)
        assert len(db.outputs("up__text")) == 500
        assert sorted(recorder.inputs) == sorted(f"doc {i}" for i in range(1, 501))  # each once


def test_a_replay_after_a_crash_looks_stored_fingerprints_up_on_mongodb(mongo_uri: str, mongo, tmp_path: Path) -> None:
    mongo.create_collection("docs")
    insert = (
        "from pymongo import MongoClient; MongoClient(sys.argv[1]).get_default_database().docs.insert_many("
        "[{'_id': i, 'text': f'doc {i}'} for i in range(1, 501)])"
    )
    listener = "reactive.backends.mongodb.listener.MongoChangeStreamListener"
    _crash_after_writing_outputs(mongo_uri, listener, insert, mongo_uri, tmp_path=tmp_path)
    _restart_recomputes_no_replay(mongo_uri)


def test_text_inputs_are_batched_longest_first_and_outputs_keep_their_rows() -> None:
    batches: list[list[str]] = []

    def predict(texts: list[str]) -> list[str]:
        batches.append(list(texts))
        if "boom" in texts:
            raise ValueError("boom")  # the batch is split; the other rows still get outputs
        return [t.upper() for t in texts]

    inputs = ["a", "dddd", "bb", "boom", "ccc", "e", "ffffff"]
    results = Model("m", predict=predict, batch_size=3, max_retries=0).compute(inputs, wait=lambda s: True)
    assert [r if isinstance(r, str) else "failed" for r in results] == [
        "A",
        "DDDD",
        "BB",
        "failed",
        "CCC",
        "E",
        "FFFFFF",
    ]
    assert batches[0] == ["ffffff", "dddd", "boom"]  # the longest first
    assert batches[-2:] == [["ccc", "bb", "a"], ["e"]]  # ties keep their order
    unsorted: list[list[str]] = []
    Model("n", predict=lambda t: unsorted.append(t) or t, batch_size=3, sort_by_length=False).compute(
        inputs, wait=lambda s: True
    )
    assert unsorted[0] == ["a", "dddd", "bb"]
    one: list[list[str]] = []  # inputs that fit in one batch are not sorted: nothing to gain
    Model("o", predict=lambda t: one.append(t) or t, batch_size=7).compute(inputs, wait=lambda s: True)
    assert one == [inputs]


def test_a_model_too_cheap_to_gain_from_sorting_keeps_the_order_of_its_inputs() -> None:
    """Sorting costs about 0.15 us an input: a model whose calls take less than
    SORT_WORTH_SECONDS an input is sorted only until its first call is timed."""
    # 20,000 texts of 1-4 characters: a pause of the process inside the call (a garbage
    # collection, another process) is spread over enough inputs to stay under the bar.
    inputs = ["x" * n for n in (1, 3, 2, 4) * 5_000]
    cheap_batches: list[list[str]] = []
    cheap = Model("cheap", predict=lambda t: cheap_batches.append(t) or t, batch_size=500)
    assert cheap.compute(inputs, wait=lambda s: True) == inputs
    assert cheap_batches[0] == ["xxxx"] * 500  # not timed yet: sorted
    cheap_batches.clear()
    assert cheap.compute(inputs, wait=lambda s: True) == inputs  # about 20 ns an input
    assert cheap_batches == [inputs[k : k + 500] for k in range(0, 20_000, 500)]

    slow_batches: list[list[str]] = []

    def slow(texts: list[str]) -> list[str]:
        slow_batches.append(texts)
        time.sleep(0.002)  # the model's own cost: 1 ms an input, far over SORT_WORTH_SECONDS
        return texts

    model = Model("slow", predict=slow, batch_size=2)
    for _ in range(2):
        slow_batches.clear()
        assert model.compute(["a", "ccc", "bb", "dddd"], wait=lambda s: True) == ["a", "ccc", "bb", "dddd"]
        assert slow_batches == [["dddd", "ccc"], ["bb", "a"]]
    assert model_module.SORT_WORTH_SECONDS < 0.001


class CallsPerInput:
    """Counts the calls that held each input; fails on inputs that contain ``"bad"``."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self.lock = threading.Lock()

    def __call__(self, texts: list[str]) -> list[str]:
        with self.lock:
            for text in texts:
                self.calls[text] = self.calls.get(text, 0) + 1
        if any("bad" in t for t in texts):
            raise ValueError("cannot handle bad input")
        return [t.upper() for t in texts]


def seeded_database(kind: str, request: pytest.FixtureRequest, tmp_path: Path, rows: list[tuple[int, str]]) -> str:
    """A database of ``kind`` whose table (collection) ``docs`` holds ``rows``, written by its own
    client (closed: DuckDB opens a file in one process at a time); its URI."""
    if kind == "mongodb":
        request.getfixturevalue("mongo").docs.insert_many([{"_id": i, "text": t} for i, t in rows])
        return request.getfixturevalue("mongo_uri")
    if kind == "duckdb":
        client = SQLClient(kind, f"duckdb:///{tmp_path / 'app.duckdb'}", duckdb.connect(str(tmp_path / "app.duckdb")))
    elif kind == "sqlite":
        client = SQLClient(kind, f"sqlite:///{tmp_path / 'app.sqlite'}", sqlite3.connect(tmp_path / "app.sqlite"))
    else:
        uri = request.getfixturevalue("pg_database")
        client = SQLClient(kind, uri, psycopg.connect(uri, autocommit=True))
    make_docs(client, rows)
    client.close()
    return client.uri


@pytest.mark.parametrize("kind", ["duckdb", "sqlite", "postgres", "mongodb"])
def test_rows_retried_by_the_errors_command_with_no_process_running_reach_the_model_once(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`reactive errors --retry` while nothing runs the listener: the next start computes each
    cleared row once. On SQL the rows were also taken out of the poller's snapshot, so the start's
    reconciliation (no output) and its first poll (not in the snapshot) both delivered them, and a
    model that still failed was called twice per row."""
    uri = seeded_database(kind, request, tmp_path, [(1, "ok"), (2, "bad")])
    model = CallsPerInput()

    def run() -> None:
        with reactive.connect(uri, poll_interval=0.05) as db:
            db.add(Listener(Model("up", predict=model, max_retries=0, batch_size=1), "text", "docs"), progress=False)
            db.cdc.start()
            assert db.cdc.wait_idle(timeout=30)
            assert outputs_by_source(db, "up__text") == {1: "OK"}
            assert [e["source"] for e in db.errors("up__text")] == [2]

    run()
    assert model.calls == {"ok": 1, "bad": 1}
    assert main(["errors", "--uri", uri, "--retry"]) == 0
    out = capsys.readouterr().out
    assert "cleared 1 errors." in out
    model.calls.clear()
    run()
    assert model.calls == {"bad": 1}
    assert "its next start (db.add)" in out  # the note says what happens with no process running


def test_an_error_says_when_as_a_datetime_on_every_sql_backend(
    sql: SQLClient, capsys: pytest.CaptureFixture[str]
) -> None:
    """SQLite keeps the time as text: db.errors() gave it as a string there (a datetime
    elsewhere), and `reactive errors` printed it as ISO text beside the others' plain times."""
    make_docs(sql, [(1, "bad")])
    with connect(sql) as db:
        db.add(Listener(Model("up", predict=Flaky(), max_retries=0), "text", "docs"), progress=False)
        [error] = db.errors()
    assert isinstance(error["at"], _dt.datetime) and error["at"].utcoffset() == _dt.timedelta(0)
    if sql.kind == "duckdb":
        sql.close()  # DuckDB opens a file in one process at a time: the command is another client
    assert main(["errors", "--uri", sql.uri]) == 0
    assert f"  {error['at']:%Y-%m-%d %H:%M:%S}  ValueError" in capsys.readouterr().out

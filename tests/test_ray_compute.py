"""RayCompute: model work on a real local Ray instance gives exactly what LocalCompute gives.

One Ray instance (2 CPUs) is started for the module, as an application would start it;
RayCompute uses it and never shuts it down. The test of an instance RayCompute starts itself
runs in a child process.
"""

from __future__ import annotations

import functools
import os
import random
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray

import reactive
from reactive.components import Listener, Model
from reactive.compute import LocalCompute, RayCompute
from reactive.events import ChangePacket, DBEvent
from tests.conftest import SQLClient, outputs_by_source, within
from tests.test_pipeline import RecordingSource, update


@pytest.fixture(scope="module", autouse=True)
def ray_instance() -> Iterator[None]:
    started = not ray.is_initialized()
    if started:
        # Ray's workers import the models of this module: they need the repository on their path.
        root = Path(__file__).resolve().parents[1]
        path = os.pathsep.join([str(root), str(root / "tests")])
        ray.init(
            num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": path}}
        )
    yield
    if started:
        ray.shutdown()


def tag(texts: list[str]) -> list[str]:
    return [f"<{t}>" for t in texts]


def count_words(outputs: list[str]) -> list[int]:
    return [len(o.split()) for o in outputs]


def flow_sql(duck: SQLClient, compute: Any) -> dict[str, dict[Any, Any]]:
    with reactive.connect(duck.uri, poll_interval=0.05, compute=compute) as db:
        db.add(Listener(Model("tag", predict=tag, batch_size=3), "text", "docs"))
        db.add(Listener(Model("words", predict=count_words), "_output", "_outputs__tag__text"))
        db.cdc.start()
        duck.execute("INSERT INTO docs VALUES (10, 'ten new words here')")
        duck.execute("UPDATE docs SET text = 'one changed' WHERE id = 1")
        duck.execute("UPDATE docs SET id = 20 WHERE id = 2")  # a key update: a row leaves, another comes
        duck.execute("DELETE FROM docs WHERE id = 3")
        assert db.cdc.wait_idle(timeout=60)
        return {name: outputs_by_source(db, name) for name in ("tag__text", "words___output")}


def test_the_listener_flow_on_ray_gives_what_it_gives_in_process(tmp_path) -> None:
    import duckdb

    results = []
    # Two models with two actors each share the instance's 2 CPUs.
    for name, compute in (("local", LocalCompute()), ("ray", RayCompute(actors=2, num_cpus=0.5))):
        path = tmp_path / f"{name}.duckdb"
        client = SQLClient("duckdb", f"duckdb:///{path}", duckdb.connect(str(path)))
        client.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text VARCHAR)")
        client.executemany("INSERT INTO docs VALUES (?, ?)", [(i, f"doc {i} " + "w " * i) for i in range(1, 10)])
        results.append(flow_sql(client, compute))
        client.close()
    local, on_ray = results
    assert on_ray == local
    assert on_ray["tag__text"][1] == "<one changed>" and 20 in on_ray["tag__text"] and 3 not in on_ray["tag__text"]


def test_the_listener_flow_on_ray_with_mongodb(mongo_uri: str, mongo) -> None:
    mongo.docs.insert_many([{"_id": i, "text": f"doc {i}"} for i in range(1, 8)])
    with reactive.connect(mongo_uri, compute=RayCompute(actors=2)) as db:
        db.add(Listener(Model("tag", predict=tag, batch_size=2), "text", "docs"))
        db.cdc.start()
        mongo.docs.insert_one({"_id": 10, "text": "ten"})
        mongo.docs.update_one({"_id": 1}, {"$set": {"text": "one changed"}})
        mongo.docs.delete_one({"_id": 2})
        assert db.cdc.wait_idle(timeout=60)
        expected = {i: f"<doc {i}>" for i in range(3, 8)} | {1: "<one changed>", 10: "<ten>"}
        assert outputs_by_source(db, "tag__text") == expected


def slow_tag(texts: list[str]) -> list[str]:
    time.sleep(random.uniform(0.0, 0.05))  # batches finish in a random order across actors
    return [f"<{t}>" for t in texts]


def test_batches_finishing_in_random_order_leave_no_stale_output(duck: SQLClient) -> None:
    duck.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text VARCHAR)")
    duck.executemany("INSERT INTO docs VALUES (?, ?)", [(i, "v0") for i in range(15)])
    source = RecordingSource()
    rng = random.Random(3)
    latest = {i: "v0" for i in range(15)}
    with reactive.connect(duck.uri, compute=RayCompute(actors=2, max_in_flight=6), pipeline=4) as db:
        db.add(Listener(Model("tag", predict=slow_tag, batch_size=2), "text", "docs"))
        db.cdc.ensure_handler()
        for position in range(120):
            row_id = rng.randrange(15)
            latest[row_id] = f"v{position + 1}"
            db.cdc.queue.put(update(source, position, row_id, latest[row_id]))
        assert db.cdc.wait_idle(timeout=120)
        assert outputs_by_source(db, "tag__text") == {i: f"<{text}>" for i, text in latest.items()}
    assert source.committed == list(range(120))  # positions never passed an unwritten window
    assert [p for saved in source.saved for p in saved] == list(range(120))


def slow_tag_each(texts: list[str]) -> list[str]:
    time.sleep(0.3)
    return [f"<{t}>" for t in texts]


def test_a_handler_that_outlives_its_stop_is_not_left_waiting_on_ray(duck: SQLClient) -> None:
    """A stop whose timeout passed while windows computed closed the RayCompute under the
    handler: the batches waiting for an actor were dropped without settling their futures, so
    the handler waited for them for ever (a thread of reactive alive past db.close()), and a
    window it tried again started new actors after the close. It now releases what it did not
    write (delivered again at the next start) and ends."""
    duck.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text VARCHAR)")
    source = RecordingSource()
    compute = RayCompute(actors=1, max_in_flight=1)

    def packet(position: int, ids: range) -> ChangePacket:
        rows = tuple({"id": i, "text": f"t{i}"} for i in ids)
        return ChangePacket("docs", DBEvent.update, tuple(ids), rows, source=source, position=position)

    with reactive.connect(duck.uri, compute=compute) as db:
        db.add(Listener(Model("tag", predict=slow_tag_each, batch_size=2), "text", "docs"))
        db.cdc.ensure_handler()
        db.cdc.queue.put(packet(0, range(20)))
        assert within(60, lambda: compute.actors_of("tag") != [])  # the first window computes
        db.cdc.queue.put(packet(1, range(20, 40)))  # the second is planned, its batches wait for the actor
        assert within(30, lambda: db.cdc.info()["listeners"]["tag__text"]["lag"]["rows"] == 40)
        handler = db.cdc._handler
        assert handler is not None
        db.cdc.stop(timeout=0.5)
        assert within(60, lambda: not handler.is_alive())
        assert compute.actors_of("tag") == []  # none started again after the close
    assert sorted(source.released) == [0, 1] and source.committed == []


def _announce_then_compute(port: int, texts: list[str]) -> list[str]:
    """Tells the test (over TCP) that a batch with 'slow' started, then takes a while."""
    if "slow" in texts:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"started")
        time.sleep(1.0)
    return [f"<{t}>" for t in texts]


def test_an_actor_killed_mid_batch_is_restarted_and_its_batch_run_again(duck: SQLClient) -> None:
    duck.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text VARCHAR)")
    with socket.socket() as listener_socket:
        listener_socket.bind(("127.0.0.1", 0))
        listener_socket.listen()
        listener_socket.settimeout(60)
        port = listener_socket.getsockname()[1]
        compute = RayCompute(actors=1)
        with reactive.connect(duck.uri, compute=compute, poll_interval=0.05) as db:
            db.add(Listener(Model("tag", predict=functools.partial(_announce_then_compute, port)), "text", "docs"))
            db.cdc.start()
            duck.execute("INSERT INTO docs VALUES (1, 'slow'), (2, 'fast')")
            connection, _ = listener_socket.accept()  # the actor is inside the batch now
            connection.close()
            [actor] = compute.actors_of("tag")
            ray.kill(actor, no_restart=False)
            connection, _ = listener_socket.accept()  # the restarted actor runs the batch again
            connection.close()
            assert db.cdc.wait_idle(timeout=120)
            assert outputs_by_source(db, "tag__text") == {1: "<slow>", 2: "<fast>"}
            assert db.errors() == []


def _loaded_predict() -> Any:
    loads = int(os.environ.get("REACTIVE_LOADS", "0")) + 1
    os.environ["REACTIVE_LOADS"] = str(loads)
    pid = os.getpid()
    return lambda texts: [f"{t}:{pid}:{loads}" for t in texts]


def test_a_model_with_a_loader_is_built_once_per_actor(duck: SQLClient) -> None:
    duck.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text VARCHAR)")
    duck.executemany("INSERT INTO docs VALUES (?, ?)", [(i, f"t{i}") for i in range(40)])
    with reactive.connect(duck.uri, compute=RayCompute(actors=2)) as db:
        db.add(Listener(Model("load", load=_loaded_predict, batch_size=4), "text", "docs"))
        outputs = outputs_by_source(db, "load__text")
    pids = {o.split(":")[1] for o in outputs.values()}
    assert {o.split(":")[2] for o in outputs.values()} == {"1"}  # each actor loaded once
    assert len(pids) == 2 and str(os.getpid()) not in pids  # loaded where it runs, not here


def test_stop_kills_our_actors_and_leaves_the_application_s_ray_running(duck: SQLClient) -> None:
    duck.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text VARCHAR)")
    duck.execute("INSERT INTO docs VALUES (1, 'a')")
    compute = RayCompute(actors=2)
    with reactive.connect(duck.uri, compute=compute) as db:
        db.add(Listener(Model("tag", predict=tag), "text", "docs"))
        actors = compute.actors_of("tag")
        assert len(actors) == 2
    assert compute.actors_of("tag") == []
    for actor in actors:
        # ray.kill only asks (a call made right after it was once answered, on 2 busy cores):
        # close() returns once Ray has killed them.
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(actor.ready.remote(), timeout=30)
    assert ray.is_initialized()  # started by the application (the fixture): left running


def test_actors_that_cannot_be_placed_fail_clearly_instead_of_hanging(duck: SQLClient) -> None:
    duck.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text VARCHAR)")
    duck.execute("INSERT INTO docs VALUES (1, 'a')")
    with reactive.connect(duck.uri, compute=RayCompute(actors=1, num_gpus=1)) as db:
        db.add(Listener(Model("tag", predict=tag), "text", "docs"))  # returns: the row is recorded
        [error] = db.errors("tag__text")
        assert "asks for 1 actors x 1 CPU / 1 GPU for model 'tag'; the Ray cluster has 0 GPU" in error["error"]
        assert db.outputs("tag__text") == []
    with pytest.raises(reactive.ConfigurationError, match="actors must be a whole number of at least 1"):
        RayCompute(actors=0)


def test_an_instance_ray_compute_starts_is_shut_down_at_close(tmp_path) -> None:
    script = textwrap.dedent(
        f"""
        import ray, reactive
        from reactive.components import Listener, Model
        from reactive.compute import RayCompute
        import duckdb
        path = {str(tmp_path / "x.duckdb")!r}
        client = duckdb.connect(path)
        client.execute("create table docs (id int primary key, text varchar); insert into docs values (1, 'a')")
        client.close()
        with reactive.connect("duckdb:///" + path, compute=RayCompute(init_options={{"num_cpus": 1}})) as db:
            db.add(Listener(Model("tag", predict=lambda xs: [x.upper() for x in xs]), "text", "docs"))
            assert db.outputs("tag__text") == [{{"_source": 1, "_output": "A"}}]
            assert ray.is_initialized()
            handler = db.cdc._handler  # the thread whose model work first needed Ray
            handler.stop()
            handler.join(60)
            assert not handler.is_alive()
            # Ray's processes die with the thread that started them (PR_SET_PDEATHSIG): a task
            # needs the raylet, which was gone once the handler ended when it had started Ray.
            assert ray.get(ray.remote(num_cpus=0)(lambda: "up").remote(), timeout=60) == "up"
        assert not ray.is_initialized()
        print("ok")
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.stdout.strip().endswith("ok"), done.stderr[-3000:]


def test_a_ray_address_that_does_not_answer_is_retried_and_does_not_hold_a_stop(tmp_path) -> None:
    """ray.init at an address nothing answers tries for about fourteen minutes (822 s here)
    before it raises: the handler waited in it, said nothing, and neither a stop nor db.close()
    returned meanwhile. Now the wait is bounded by placement_timeout and the
    window is retried (logged), as while a database is unreachable; a stop ends it at once."""
    script = textwrap.dedent(
        f"""
        import logging, time, duckdb, reactive
        from reactive.components import Listener, Model
        from reactive.compute import RayCompute
        logging.basicConfig(level=logging.WARNING, format="%(name)s %(message)s")
        path = {str(tmp_path / "x.duckdb")!r}
        client = duckdb.connect(path)
        client.execute("create table docs (id int primary key, text varchar)")
        compute = RayCompute(address="127.0.0.1:1", placement_timeout=1)
        db = reactive.connect("duckdb:///" + path, compute=compute, poll_interval=0.05)
        db.add(Listener(Model("tag", predict=lambda xs: [x.upper() for x in xs]), "text", "docs"))
        db.cdc.start()
        client.execute("insert into docs values (1, 'a')")
        assert not db.cdc.wait_idle(timeout=5)
        started = time.monotonic()
        db.close()
        print("closed in", round(time.monotonic() - started))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert int(done.stdout.split()[-1]) < 10, done.stdout
    assert "Ray at 127.0.0.1:1 did not answer within 1 s" in done.stderr and "retrying" in done.stderr


def test_a_window_is_retried_when_ray_is_unreachable(duck: SQLClient) -> None:
    # Packets put directly: the handler's model work fails with ComputeUnavailableError while
    # the actors are gone for good (no restarts), and the window waits instead of being recorded.
    duck.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text VARCHAR)")
    source = RecordingSource()
    compute = RayCompute(actors=1)
    with reactive.connect(duck.uri, compute=compute) as db:
        db.add(Listener(Model("tag", predict=tag), "text", "docs"))
        db.cdc.ensure_handler()
        db.cdc.queue.put(update(source, 0, 1, "warm"))
        assert db.cdc.wait_idle(timeout=60)
        [actor] = compute.actors_of("tag")
        ray.kill(actor, no_restart=True)  # gone for good: its calls fail with RayActorError
        db.cdc.queue.put(
            ChangePacket("docs", DBEvent.update, (2,), ({"id": 2, "text": "x"},), source=source, position=1)
        )
        assert db.cdc.wait_idle(timeout=60)  # the retry found the dead actor replaced
        assert outputs_by_source(db, "tag__text") == {1: "<warm>", 2: "<x>"}
        assert db.errors() == []


def test_one_model_on_ray_while_the_datalayer_computes_in_process(duck: SQLClient) -> None:
    duck.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text VARCHAR)")
    duck.executemany("INSERT INTO docs VALUES (?, ?)", [(i, f"t{i}") for i in range(6)])
    executor = RayCompute(actors=1)
    with reactive.connect(duck.uri) as db:  # LocalCompute for every other model
        db.add(Listener(Model("remote", load=_loaded_predict, executor=executor), "text", "docs"))
        db.add(Listener(Model("here", load=_loaded_predict), "text", "docs"))
        remote, here = outputs_by_source(db, "remote__text"), outputs_by_source(db, "here__text")
    assert {o.split(":")[1] for o in remote.values()} != {str(os.getpid())}
    assert {o.split(":")[1] for o in here.values()} == {str(os.getpid())}
    assert executor.actors_of("remote") == []  # db.close() closed the model's executor


def fails_on_bad(texts: list[str]) -> list[str]:
    if "bad" in texts:
        raise ValueError("cannot tag 'bad'")
    return [f"<{t}>" for t in texts]


def test_a_model_error_on_ray_is_isolated_to_its_row_as_in_process(duck: SQLClient) -> None:
    duck.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text VARCHAR)")
    duck.executemany("INSERT INTO docs VALUES (?, ?)", [(1, "a"), (2, "bad"), (3, "c"), (4, "d")])
    with reactive.connect(duck.uri, compute=RayCompute(actors=2)) as db:
        db.add(Listener(Model("tag", predict=fails_on_bad, batch_size=4, retry_backoff=0.001), "text", "docs"))
        assert outputs_by_source(db, "tag__text") == {1: "<a>", 3: "<c>", 4: "<d>"}
        [error] = db.errors("tag__text")
        assert error["source"] == 2 and error["error"] == "ValueError: cannot tag 'bad'"


def test_a_model_ray_cannot_send_to_its_actors_is_said_in_one_line(duck: SQLClient) -> None:
    """Each row's error was Ray's report of its serializability check: 2 kB over 30 lines, with
    terminal colour codes, in _reactive_errors and db.errors()."""
    duck.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text VARCHAR)")
    duck.execute("INSERT INTO docs VALUES (1, 'a')")
    lock = threading.Lock()

    def tag_under_lock(texts: list[str]) -> list[str]:
        with lock:  # a closure Ray cannot pickle, as one holding a driver's connection would be
            return tag(texts)

    with reactive.connect(duck.uri, compute=RayCompute(actors=1)) as db:
        db.add(Listener(Model("locked", predict=tag_under_lock), "text", "docs"))
        [error] = db.errors("locked__text")
    assert error["error"] == (
        "ConfigurationError: model 'locked' cannot be sent to its Ray actors (cannot pickle '_thread.lock'"
        " object): build what cannot be pickled inside the actor, with Model(load=...)"
    )


def _marked(texts: list[str]) -> list[str]:
    return [f"{t}:{os.environ.get('REACTIVE_TEST_MARK')}" for t in texts]


def test_actor_options_reach_the_actors(duck: SQLClient) -> None:
    duck.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text VARCHAR)")
    duck.execute("INSERT INTO docs VALUES (1, 'a')")
    root = Path(__file__).resolve().parents[1]
    env = {"REACTIVE_TEST_MARK": "set", "PYTHONPATH": os.pathsep.join([str(root), str(root / "tests")])}
    compute = RayCompute(actors=1, actor_options={"runtime_env": {"env_vars": env}})
    with reactive.connect(duck.uri, compute=compute) as db:
        db.add(Listener(Model("mark", predict=_marked), "text", "docs"))
        assert outputs_by_source(db, "mark__text") == {1: "a:set"}


def batch_of(texts: list[str]) -> list[str]:
    """Each input's output says which batch it was computed in (its size and first text)."""
    return [f"{len(texts)}:{texts[0]}" for _ in texts]


@pytest.mark.parametrize("actors", [1, 2])
def test_calls_that_carry_several_batches_give_the_model_the_batches_it_gets_in_process(actors: int) -> None:
    # A window of 203 texts of mixed lengths, batches of 4: RayCompute sends a few calls of
    # several batches each (CALLS_PER_ACTOR per actor); the model must see the very batches
    # (same texts, same length order) LocalCompute gives it.
    texts = [("x" * random.Random(i).randint(1, 40)) + str(i) for i in range(203)]
    model = Model("batches", predict=batch_of, batch_size=4)
    local, remote = LocalCompute(), RayCompute(actors=actors)
    try:
        expected = local.submit(model, texts, wait=lambda s: True).result(timeout=60)
        got = remote.submit(model, texts, wait=lambda s: True).result(timeout=120)
    finally:
        local.close()
        remote.close()
    assert got == expected
    assert {int(o.split(":")[0]) for o in got} <= {1, 2, 3, 4}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        # NaN CPUs, 2.5 batches in flight and a NaN or text placement timeout were taken
        # before; text CPUs failed with a TypeError. One wording now (reactive.checks).
        ({"actors": 0}, "actors must be a whole number of at least 1"),
        ({"actors": True}, "actors must be a whole number of at least 1"),
        ({"num_cpus": float("nan")}, "num_cpus must be a finite number of at least 0"),
        ({"num_gpus": "1"}, "num_gpus must be a finite number of at least 0"),
        ({"max_in_flight": 2.5}, "max_in_flight must be a whole number of at least 1"),
        ({"placement_timeout": float("nan")}, "placement_timeout must be a number of seconds above 0"),
        ({"placement_timeout": "60"}, "placement_timeout must be a number of seconds above 0"),
    ],
)
def test_bad_settings_are_refused_when_made(options: dict[str, Any], message: str) -> None:
    with pytest.raises(reactive.ConfigurationError, match=message):
        RayCompute(**options)

"""Where reactive's time goes on DuckDB: wall time per backend call, by thread; optionally cProfile.

``python -m benchmarks.profile_duckdb [--scenario bulk|backfill|restart|poll] [--rows N] [--cprofile]``

*bulk*: change capture running, one INSERT of ``rows`` rows, until idle. *backfill*: ``db.add``
on a table of ``rows`` rows. *restart*: ``db.add`` again in a new datalayer with every output
current (a restart's reconciliation: nothing to compute). *poll*: one poll of a ``rows``-row
table with 1% of its rows updated, five times. The stage table is the wall time inside each
backend method, per thread: it includes waiting for the backend's lock (one connection, one
lock), so the threads' columns can add up to more than the run. ``ibis compile`` is the part of
those calls spent turning ibis expressions into SQL. ``garbage collection`` rows are Python's
collections during the run (bulk, backfill, restart), under the thread whose allocation
started each; every thread waits for one. With ``--cprofile`` the handler's and the
listener's (or, for *poll*, the main thread's) functions are printed by cumulative time;
cProfile slows Python-heavy code, so use it for shares, not for speeds.
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import gc
import inspect
import io
import pstats
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import reactive
from reactive.backends.ibis.listener import IbisPollingListener
from reactive.components import Listener, Model
from reactive.handler import CDCHandler

from . import sql_duckdb as bench
from .common import markdown_table, scratch_dir

#: (role of the backend, method) timed as one stage each; the writer is the datalayer's.
STAGES = (
    ("snapshots", "ensure"),
    ("snapshots", "changed"),
    ("snapshots", "diff"),
    ("snapshots", "rows_with_fingerprints"),
    ("source", "read_rows"),
    ("source", "read_table"),
    ("outputs", "store_outputs"),
    ("outputs", "output_fingerprints"),
    ("writer", "write"),
    ("snapshots", "advance"),
    ("outputs", "delete_outputs"),
    ("source", "count"),
    ("source", "scan"),
    ("outputs", "scan_output_fingerprints"),
)


def wrap_stages(clock: StageClock, backend: Any, writer: Any = None) -> None:
    """Time every stage of ``backend`` (and of ``writer``, when given) on these instances."""
    owners = {"snapshots": backend.snapshots, "source": backend.source, "outputs": backend.outputs, "writer": writer}
    for role, method in STAGES:
        if owners[role] is not None:
            clock.wrap(owners[role], method, f"{role}.{method}")
    clock.wrap(backend.conn.con, "compile", "(ibis compile, inside the calls above)")


class StageClock:
    """Accumulates wall time and calls per (thread, stage)."""

    def __init__(self) -> None:
        self.totals: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0, 0.0])
        self._lock = threading.Lock()
        #: Python's garbage collections while :meth:`collections` was on: (thread, generation, seconds).
        self.gc_pauses: list[tuple[str, int, float]] = []

    @contextmanager
    def collections(self) -> Iterator[None]:
        """Time Python's garbage collections meanwhile (every thread waits for one): a stage of
        the thread whose allocation triggered it. Kept apart from ``totals`` until the end: a
        collection may start inside :meth:`add`, under its lock."""
        started: list[float] = []

        def callback(phase: str, info: dict[str, int]) -> None:
            if phase == "start":
                started.append(time.perf_counter())
            elif started:
                seconds = time.perf_counter() - started.pop()
                self.gc_pauses.append((threading.current_thread().name, info["generation"], seconds))

        gc.callbacks.append(callback)
        try:
            yield
        finally:
            gc.callbacks.remove(callback)

    def wrap(self, owner: Any, name: str, label: str | None = None) -> None:
        """Time ``owner.name`` on this instance only; a generator's time is its pages' (each
        ``next`` counts as a call)."""
        original = getattr(owner, name)
        stage = label or name

        @functools.wraps(original)
        def timed_call(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                result = original(*args, **kwargs)
            finally:
                self.add(stage, time.perf_counter() - started)
            return self._timed_pages(stage, result) if inspect.isgenerator(result) else result

        setattr(owner, name, timed_call)

    def _timed_pages(self, stage: str, pages: Iterator[Any]) -> Iterator[Any]:
        while True:
            started = time.perf_counter()
            try:
                page = next(pages)
            except StopIteration:
                self.add(stage, time.perf_counter() - started)
                return
            self.add(stage, time.perf_counter() - started)
            yield page

    def add(self, stage: str, seconds: float) -> None:
        with self._lock:
            total = self.totals[(threading.current_thread().name, stage)]
            total[0] += 1
            total[1] += seconds

    def instrument(self, db: reactive.Datalayer) -> None:
        wrap_stages(self, db.backend, db.writer)

    def markdown(self, wall: float) -> str:
        for thread, generation, seconds in self.gc_pauses:
            total = self.totals[(thread, f"(garbage collection, generation {generation})")]
            total[0] += 1
            total[1] += seconds
        self.gc_pauses.clear()
        rows = [
            [thread, stage, int(calls), f"{seconds * 1000:,.0f} ms", f"{seconds / wall:.0%}"]
            for (thread, stage), (calls, seconds) in sorted(self.totals.items(), key=lambda kv: -kv[1][1])
        ]
        return markdown_table(["thread", "stage", "calls", "wall time", "share of run"], rows)


class ThreadProfiles:
    """cProfile of the handler (planning and finishing windows) and the listener's ``_poll``,
    in their own threads."""

    #: (profile, class, method): the handler plans a window in ``_open``, writes it in ``_complete``.
    HOOKS = (
        ("handler", CDCHandler, "_open"),
        ("handler", CDCHandler, "_complete"),
        ("listener", IbisPollingListener, "_poll"),
    )

    def __init__(self) -> None:
        self.profiles = {"handler": cProfile.Profile(), "listener": cProfile.Profile()}

    @contextmanager
    def installed(self) -> Iterator[None]:
        originals = [(cls, name, getattr(cls, name)) for _, cls, name in self.HOOKS]
        for profile, cls, name in self.HOOKS:
            setattr(cls, name, self._profiled(self.profiles[profile], getattr(cls, name)))
        try:
            yield
        finally:
            for cls, name, original in originals:
                setattr(cls, name, original)

    @staticmethod
    def _profiled(profile: cProfile.Profile, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            profile.enable()
            try:
                return fn(*args, **kwargs)
            finally:
                profile.disable()

        return wrapper


def top_functions(profile: cProfile.Profile, limit: int = 30) -> str:
    out = io.StringIO()
    try:
        stats = pstats.Stats(profile, stream=out)
    except TypeError:  # never enabled: nothing ran in that thread
        return "(no samples)"
    stats.sort_stats("cumulative").print_stats(limit)
    return out.getvalue()


def run_bulk(rows: int, clock: StageClock) -> float:
    with scratch_dir() as workdir:
        path = workdir / "bulk.duckdb"
        client = bench.create_docs(path, 0)
        with bench.connect(path) as db:
            db.add(Listener(timed_model(clock), "text", "docs"), progress=False)
            clock.instrument(db)
            db.cdc.start()
            db.cdc.wait_idle(timeout=bench.CATCH_UP_TIMEOUT)
            with clock.collections():
                started = time.perf_counter()
                bench.insert_docs(client, 0, rows)
                db.cdc.wait_idle(timeout=bench.CATCH_UP_TIMEOUT)
                wall = time.perf_counter() - started
            db.cdc.stop()
        client.close()
    return wall


def timed_model(clock: StageClock) -> Model:
    """The benchmark's model, its input fingerprints timed (planning computes them)."""
    model = bench.make_model()
    clock.wrap(model, "fingerprints", "model.fingerprints (input fingerprints)")
    return model


def timed_add(path: Any, clock: StageClock) -> tuple[float, dict[str, Any]]:
    """``db.add`` of the benchmark's listener on ``path``, instrumented: its wall time, and the
    listener's counters."""
    with bench.connect(path) as db:
        clock.instrument(db)
        with clock.collections():
            started = time.perf_counter()
            db.add(Listener(timed_model(clock), "text", "docs"), progress=False)
            wall = time.perf_counter() - started
        counters = db.cdc.info()["listeners"]["len__text"]
        db.cdc.stop()
    return wall, counters


def run_backfill(rows: int, clock: StageClock) -> float:
    with scratch_dir() as workdir:
        path = workdir / "backfill.duckdb"
        client = bench.create_docs(path, rows)
        wall, _ = timed_add(path, clock)
        client.close()
    return wall


def run_restart(rows: int, clock: StageClock) -> float:
    """``db.add`` again in a new datalayer, every output current: a restart's reconciliation."""
    with scratch_dir() as workdir:
        path = workdir / "restart.duckdb"
        client = bench.create_docs(path, rows)
        with bench.connect(path) as db:
            db.add(Listener(bench.make_model(), "text", "docs"), progress=False)
        wall, counters = timed_add(path, clock)
        if counters["computed"]:
            raise RuntimeError("a restart with every output current computed rows")
        client.close()
    return wall


def run_poll(rows: int, clock: StageClock, profile: cProfile.Profile | None) -> float:
    with scratch_dir() as workdir:
        path = workdir / "poll.duckdb"
        client = bench.create_docs(path, rows)
        probe = bench.PollProbe(path, client)
        try:
            probe.create_snapshot()
            client.execute("UPDATE docs SET text = text || ' (edited)' WHERE id % 100 = 0")
            wrap_stages(clock, probe.backend)
            started = time.perf_counter()
            for _ in range(5):
                if profile is not None:
                    profile.enable()
                probe.reactive_poll()
                if profile is not None:
                    profile.disable()
                probe.drain()
            return time.perf_counter() - started
        finally:
            probe.close()
            client.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_duckdb", description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", choices=("bulk", "backfill", "restart", "poll"), default="bulk")
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--cprofile", action="store_true", help="also print cProfile's top functions per thread")
    args = parser.parse_args(argv)
    clock = StageClock()
    profiles = ThreadProfiles()
    main_profile = cProfile.Profile() if args.cprofile and args.scenario == "poll" else None
    if args.scenario == "poll":
        wall = run_poll(args.rows, clock, main_profile)
    else:
        run = {"bulk": run_bulk, "backfill": run_backfill, "restart": run_restart}[args.scenario]
        if args.cprofile:
            with profiles.installed():
                wall = run(args.rows, clock)
        else:
            wall = run(args.rows, clock)
    if args.scenario == "poll":
        print(f"### 5 polls of {args.rows:,} rows, 1% updated: {wall:.2f} s ({wall / 5 * 1000:,.0f} ms per poll)\n")
    else:
        print(f"### {args.scenario}, {args.rows:,} rows: {wall:.2f} s ({args.rows / wall:,.0f} rows/s)\n")
    print(clock.markdown(wall))
    if main_profile is not None:
        print("\n#### cProfile: main thread (5 polls)\n\n```\n" + top_functions(main_profile) + "```")
    elif args.cprofile:
        for name, profile in profiles.profiles.items():
            print(f"\n#### cProfile: {name} thread\n\n```\n" + top_functions(profile) + "```")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

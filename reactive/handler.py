"""The one consumer: takes packets off the queue, collates them and refreshes components."""

from __future__ import annotations

import dataclasses as dc
import functools
import logging
import math
import queue as queues
import time
import traceback
from collections import deque
from collections.abc import Callable, Collection, Hashable, Iterable, Mapping, Sequence
from concurrent.futures import ALL_COMPLETED, FIRST_COMPLETED, Future
from concurrent.futures import wait as wait_for_any
from typing import TYPE_CHECKING, Any

import numpy as np

from reactive import checks
from reactive.backends.base import (
    FINGERPRINT_FIELD,
    MAX_BACKOFF,
    OUTPUT_FIELD,
    SOURCE_FIELD,
    ErrorRecord,
    TableReader,
    outputs_table,
)
from reactive.components.base import PlannedRefresh
from reactive.errors import ComputeUnavailableError, LeaseLostError, PermissionDeniedError
from reactive.events import Batch, ChangePacket, ChangeSource, DBEvent, id_key, id_keys, window_batches
from reactive.rows import TableRows
from reactive.threads import ReactiveThread

if TYPE_CHECKING:
    from reactive.components.base import Component
    from reactive.components.model import Batching
    from reactive.compute import Compute
    from reactive.datalayer import Datalayer
    from reactive.feed.publisher import Committed, FeedHub
    from reactive.queue import CDCQueue

log = logging.getLogger(__name__)

#: Retries of a window after stop() was called, before it is released (none without the lease).
STOPPING_RETRIES = 3
#: Failed parts past the log2 of a window's rows after which narrowing it, with nothing written, stops.
NARROWING_SLACK = 4


class BackendUnavailableError(Exception):
    """Raised inside the handler when a component failed because the database is unreachable."""


@dc.dataclass(slots=True)
class ComponentStats:
    """Counters ``db.cdc.info()`` reports for one component."""

    inserts: int = 0
    updates: int = 0
    deletes: int = 0
    computed: int = 0
    skipped: int = 0
    errors: int = 0
    batches: int = 0
    last_error: str | None = None
    #: The component's model calls, live: the call running and since when, a call stuck.
    model_calls: Any = None

    def count(self, batch: Batch) -> None:
        self.batches += 1
        setattr(self, batch.event.counter, getattr(self, batch.event.counter) + len(batch))


def _seconds(value: object) -> bool:
    """Whether ``value`` is a number of seconds (an int or a float, not a bool)."""
    return type(value) in (int, float)


@dc.dataclass(frozen=True, slots=True)
class WindowRows:
    """How many rows of changes the handler takes at once (a window), and how that grows.

    Windows start at ``floor`` rows and grow toward ``cap`` while each is handled (read,
    computed, written, committed) in under ``target`` seconds: a cheap model over a fast
    database then pays for fewer statements, commits and lease checks per row, while a slow
    model, or a slow write (large vectors), keeps windows at ``floor`` and so keeps a window's
    write short beside the lease. A window's time is a part per row and a part per window
    (statements, commits, hand-offs between threads: :class:`WindowCost`, learnt by trying a
    window twice as large at the start and after every :data:`STALE_WINDOWS` windows of one
    size). Where the part per window is more than a quarter of
    ``target`` (DuckDB beside busy Python threads of the process: each of its statements waits
    for the GIL between tasks), windows may take up to four times it, so that it stays a
    quarter of their time: at most ``longest`` seconds (four times ``target`` unless set), or
    twice the part per window where that alone is over half of ``longest`` (no window size
    could then keep to it; smaller windows would only take more of them).
    ``floor == cap``: every window has the same bound.

    A model that sorts its inputs by length (``Model.sort_by_length``) sorts each window's, not
    the whole backlog's, so a window of few batches pads more than ``encode`` over its whole
    list (all-MiniLM-L6-v2 in batches of 1,024: 7.4% more tokens in windows of 5,000 rows, 1.5%
    in windows of 16,384) and ends in a part batch. Such a model's windows hold at least
    ``model_batches`` of its batches, or as many whole batches as it computes in
    ``model_seconds`` where that is fewer (:meth:`holding`).

    >>> WindowRows.of(None) == WindowRows(), WindowRows.of(100)
    (True, WindowRows(floor=100, cap=100, target=0.25, longest=None, model_batches=16, model_seconds=2.0))
    >>> WindowRows().limit, WindowRows(target=2.0).limit, WindowRows(longest=0.5).limit
    (1.0, 8.0, 0.5)
    """

    floor: int = 5_000
    cap: int = 50_000
    target: float = 0.25
    longest: float | None = None
    model_batches: int = 16
    model_seconds: float = 2.0

    def __post_init__(self) -> None:
        for field in ("floor", "cap", "target", "longest", "model_batches", "model_seconds"):
            object.__setattr__(self, field, checks.plain(getattr(self, field)))  # numpy's numbers as Python's
        if not (type(self.floor) is int and type(self.cap) is int and 1 <= self.floor <= self.cap):
            raise ValueError(f"WindowRows needs ints with 1 <= floor <= cap, not {self.floor!r} and {self.cap!r}")
        if not (_seconds(self.target) and self.target > 0):
            raise ValueError(f"WindowRows needs a target of more than 0 seconds, not {self.target!r}")
        if self.longest is not None and not (_seconds(self.longest) and self.longest >= self.target):
            raise ValueError(f"WindowRows needs longest of at least target ({self.target!r} s), not {self.longest!r}")
        if not (type(self.model_batches) is int and self.model_batches >= 0):
            raise ValueError(f"WindowRows needs model_batches of at least 0 (an int), not {self.model_batches!r}")
        if not (_seconds(self.model_seconds) and self.model_seconds >= 0):
            raise ValueError(f"WindowRows needs model_seconds of at least 0 seconds, not {self.model_seconds!r}")

    @property
    def limit(self) -> float:
        """The longest a window may take where its part per window is large: ``longest``, or
        four times ``target``."""
        return 4 * self.target if self.longest is None else self.longest

    @classmethod
    def of(cls, batch_rows: int | WindowRows | None) -> WindowRows:
        """Growing windows for ``None`` (the default); windows of at most ``batch_rows`` rows
        for an int; a :class:`WindowRows` as it is. Anything else is refused.

        >>> WindowRows.of(0)
        Traceback (most recent call last):
        ...
        ValueError: batch_rows must be a positive int, a WindowRows or None (growing windows), not 0
        """
        if batch_rows is None:
            return cls()
        if isinstance(batch_rows, WindowRows):
            return batch_rows
        rows = checks.plain(batch_rows)
        if type(rows) is not int or rows < 1:
            raise ValueError(
                f"batch_rows must be a positive int, a WindowRows or None (growing windows), not {batch_rows!r}"
            )
        return cls(rows, rows)

    @staticmethod
    def full(taken: int, rows: int) -> bool:
        """Whether a window taken under the bound ``taken`` that held ``rows`` rows says anything
        about the rate: one under half its bound does not (fixed costs dominate it)."""
        return rows >= taken / 2

    def holding(self, models: Iterable[Batching]) -> WindowRows:
        """These windows, with ``floor`` raised (up to ``cap``) so that a window holds
        ``model_batches`` whole batches of each of ``models`` (those that sort inputs by length),
        or as many as that model computes in ``model_seconds`` where that is fewer.

        >>> from reactive.components.model import Batching
        >>> w = WindowRows()
        >>> w.holding([Batching(1024, 0.0001)]).floor  # 16 batches of a GPU embedding model
        16384
        >>> w.holding([Batching(1024, 0.0003)]).floor  # whole batches it computes in 2 s
        6144
        >>> w.holding([Batching(64, 0.003)]).floor, w.holding([Batching(1024, 0.003)]).floor  # as they were
        (5000, 5000)
        >>> w.holding([Batching(8192, 1e-5)]).floor, WindowRows.of(500).holding([Batching(1024, 1e-5)]).floor
        (50000, 500)
        >>> WindowRows(model_seconds=float("inf")).holding([Batching(1024, 0.003)]).floor  # no time limit
        16384
        """
        floor = self.floor
        for model in models:
            rows = self.model_batches * model.size
            if model.seconds_per_input * rows > self.model_seconds:  # only the whole batches it computes in time
                rows = int(self.model_seconds / model.seconds_per_input) // model.size * model.size
            floor = max(floor, rows)
        return self if floor == self.floor else dc.replace(self, floor=min(floor, self.cap))

    def within(self, seconds: float) -> WindowRows:
        """The same windows, none taking more than ``seconds`` (``target`` and ``longest``)."""
        return dc.replace(self, target=min(self.target, seconds), longest=min(self.limit, seconds))

    def next(self, bound: int, taken: int, rows: int, seconds: float, fixed: float | None = 0.0) -> int:
        """The bound of the next window (``bound`` now), after a window taken under the bound
        ``taken`` held ``rows`` rows and took ``seconds``, of which ``fixed`` are the part any
        window costs (:class:`WindowCost`): at most twice ``taken``, toward the size whose time
        fits the target, within ``[floor, cap]``. A window under half its bound says little
        about the rate (fixed costs dominate it): ``bound`` stays.

        >>> w = WindowRows()
        >>> w.next(5_000, 5_000, 5_000, 0.02), w.next(40_000, 40_000, 40_000, 0.1), w.next(50_000, 50_000, 50_000, 1.0)
        (10000, 50000, 12500)
        >>> w.next(5_000, 5_000, 5_000, 17.0), w.next(20_000, 10_000, 3, 0.001)
        (5000, 20000)

        A window of 5,000 rows in 0.18 s, 0.15 s of which any window costs: growing pays, and
        windows may take four times 0.15 s. Without that part the target fits 6,944 rows, which
        windows of whole packets may never reach. With the part per window not known yet
        (``fixed=None``), a window twice as large is tried once, to learn it, however long the
        window took (unless windows are at ``cap``: then as with no part per window). A part
        per window of 2 s: windows may take 4 s.

        >>> w.next(5_000, 5_000, 5_000, 0.18, fixed=0.15), w.next(5_000, 5_000, 5_000, 0.18)
        (10000, 6944)
        >>> w.next(5_000, 5_000, 5_000, 0.18, fixed=None), w.next(5_000, 5_000, 5_000, 3.0, fixed=None)
        (10000, 10000)
        >>> w.next(50_000, 50_000, 50_000, 1.0, fixed=None)
        12500
        >>> w.next(5_000, 5_000, 5_000, 2.2, fixed=2.0), w.next(5_000, 5_000, 5_000, 2.2, fixed=0.0)
        (10000, 5000)
        """
        if not self.full(taken, rows):
            return bound
        if fixed is None and min(self.cap, 2 * taken) > rows:
            return max(self.floor, min(self.cap, 2 * taken, 2 * rows))
        fixed = min(max(fixed or 0.0, 0.0), seconds)
        allowed = min(max(self.target, 4 * fixed), max(self.limit, 2 * fixed))
        per_rows = seconds - fixed  # the part of the window's time its rows took
        fitting = self.cap if per_rows <= 0 else int(rows * max(allowed - fixed, 0.0) / per_rows)
        return max(self.floor, min(self.cap, 2 * taken, fitting))


def _backoff(attempt: int) -> float:
    """Seconds to wait before try ``attempt`` + 1 after ``attempt`` failures in a row.

    >>> [_backoff(n) for n in (1, 2, 3, 10)]
    [0.5, 1.0, 2.0, 5.0]
    """
    return min(0.5 * 2 ** (attempt - 1), MAX_BACKOFF)


#: Full windows of one size in a row after which :class:`WindowCost` asks for its estimate to be
#: tried again: what a window costs changes (a thread of the application starts running Python,
#: or stops), and windows of one size teach nothing.
STALE_WINDOWS = 8


@dc.dataclass(slots=True)
class WindowCost:
    """What any window costs whatever its rows (statements, commits, hand-offs between threads),
    estimated from pairs of consecutive full windows of different sizes: a window's time taken
    as a part per window plus a part per row. One pair is noisy (beside busy threads one window
    may take twice the next of the same size), so each new pair moves the estimate halfway; and
    after :data:`STALE_WINDOWS` windows of one size, :meth:`observe` answers None once, which
    makes the next window twice as large (a new pair).

    >>> cost = WindowCost()
    >>> cost.observe(5_000, 0.18), cost.observe(5_000, 0.18)  # one size says nothing yet
    (None, None)
    >>> round(cost.observe(10_000, 0.21), 3)  # 5,000 more rows cost 0.03 s: 0.15 s is per window
    0.15
    >>> round(cost.observe(20_000, 0.1), 3)  # a larger window took less: 0.1 s per window, halfway
    0.125
    >>> [cost.observe(20_000, 0.1) for _ in range(STALE_WINDOWS)][-2:]  # then tried again, once
    [0.125, None]
    >>> cost.observe(20_000, 0.1), cost.fixed
    (0.125, 0.125)
    """

    #: The last window observed: its rows and seconds.
    rows: int = 0
    seconds: float = 0.0
    #: Seconds of a window's time that any window costs (None until two sizes were seen).
    fixed: float | None = None
    #: Full windows of the last one's size since the last pair of different sizes.
    same: int = 0

    def observe(self, rows: int, seconds: float) -> float | None:
        """Take a full window's rows and seconds in; the estimate of the part per window, or
        None to have it tried again."""
        if self.rows and max(rows, self.rows) >= 1.25 * min(rows, self.rows):
            per_row = (seconds - self.seconds) / (rows - self.rows)
            # A larger window that took less: all of its time is per window.
            seen = min(seconds, self.seconds) if per_row <= 0 else min(seconds, max(0.0, seconds - per_row * rows))
            self.fixed = seen if self.fixed is None else (self.fixed + seen) / 2
            self.same = 0
        else:
            self.same += 1
        self.rows, self.seconds = rows, seconds
        if self.same >= STALE_WINDOWS:
            self.same = 0
            return None
        return self.fixed


@dc.dataclass(slots=True)
class HandlerTotals:
    """What the handler processed since the datalayer was created."""

    packets: int = 0
    rows: int = 0
    windows: int = 0
    internal_errors: int = 0
    #: Windows whose outputs were written (not only set apart as errors), and how many were
    #: when a window last failed: one written since says the database takes writes (see
    #: ``CDCHandler._narrow``). Kept here so that it outlives a handler (a stop, a backfill).
    windows_written: int = 0
    windows_written_at_failure: int = 0


def _halves(packets: Sequence[ChangePacket]) -> tuple[list[ChangePacket], list[ChangePacket]] | None:
    """``packets`` in two, in their order: its packets, or a lone packet's rows; None for one row.

    >>> p = ChangePacket("t", DBEvent.insert, (1, 2, 3), ({"x": 1}, {"x": 2}, {"x": 3}))
    >>> [[q.ids for q in half] for half in _halves([p])]
    [[(1,)], [(2, 3)]]
    >>> [[q.ids for q in half] for half in _halves([p, p, p])]
    [[(1, 2, 3)], [(1, 2, 3), (1, 2, 3)]]
    >>> _halves([ChangePacket("t", DBEvent.delete, (1,))]) is None
    True
    """
    if len(packets) > 1:
        middle = len(packets) // 2
        return list(packets[:middle]), list(packets[middle:])
    (packet,) = packets
    if len(packet) < 2:
        return None
    middle = len(packet) // 2
    rows = packet.rows
    return (
        [dc.replace(packet, ids=packet.ids[:middle], rows=None if rows is None else rows[:middle])],
        [dc.replace(packet, ids=packet.ids[middle:], rows=None if rows is None else rows[middle:])],
    )


def _unread(batch: Batch) -> bool:
    """Whether the handler reads rows of ``batch`` (a packet carried none for some of them)."""
    return batch.event is not DBEvent.delete and not isinstance(batch.rows, TableRows) and None in batch.rows


def _deleted(batch: Batch, ids: Sequence[Any]) -> Batch:
    """A delete of ``ids`` (rows of ``batch`` found gone when it was read)."""
    return dc.replace(batch, event=DBEvent.delete, ids=tuple(ids), rows=(None,) * len(ids))


def _as_read(output: Any) -> Any:
    """An output as a read of its table gives it back (a vector stored from an array: a list)."""
    return output.tolist() if isinstance(output, np.ndarray) else output


@dc.dataclass(eq=False)
class _Step:
    """One batch of a window's source changes, and each component's refresh of it under way
    (or why planning it failed: recorded against its rows when the window is finished)."""

    batch: Batch
    plans: list[tuple[Component, PlannedRefresh | Exception]]


@dc.dataclass(eq=False)
class _Window:
    """Packets taken off the queue together, and their refreshes once planned."""

    packets: Sequence[ChangePacket]
    #: The bound it was taken under (its rows, at most, unless one packet was larger).
    bound: int
    #: None until planned, and when planning failed (it is planned again at its turn).
    steps: list[_Step] | None = None
    #: Its batches, each with the read of its rows started ahead on the reader thread (None
    #: where it needs no read), until it is planned: see :meth:`CDCHandler._read_ahead`.
    reads: list[tuple[Batch, Future[list[Batch]] | None]] | None = None
    #: Seconds this thread spent on it so far (planning, waiting for its model work, writing).
    seconds: float = 0.0

    @functools.cached_property
    def keys(self) -> dict[str, set[Hashable]]:
        """The id keys each table's packets change: in flight until the window is finished."""
        keys: dict[str, set[Hashable]] = {}
        for packet in self.packets:
            keys.setdefault(packet.table, set()).update(id_keys(packet.ids))
        return keys

    @property
    def work(self) -> list[Future[Any]]:
        """The futures of its model work."""
        plans = [plan for step in self.steps or () for _, plan in step.plans]
        return [future for plan in plans if not isinstance(plan, Exception) for future in plan.work]

    def ready(self) -> bool:
        """Whether its model work is done (or it has none): finishing it will not wait."""
        return all(future.done() for future in self.work)


class _Known:
    """The outputs a window's model work computed, per component, by input fingerprint (see
    :class:`~reactive.components.base.PlannedRefresh`): what planning its rows again (a retry,
    narrowing) takes instead of computing them again. A row changed meanwhile has another
    fingerprint, so it is computed."""

    def __init__(self) -> None:
        #: id of the component: the component (kept, so that its id stays its own), its outputs.
        self._outputs: dict[int, tuple[Component, dict[int, Any]]] = {}

    def add(self, steps: Sequence[_Step] | None) -> None:
        """Keep what the model work of ``steps`` computed, once it is done (a write that failed
        may leave later batches' work running: planned again, their rows would only queue
        behind it on the model)."""
        for step in steps or ():
            for component, plan in step.plans:
                if isinstance(plan, PlannedRefresh) and plan.computed is not None:
                    wait_for_any(plan.work, return_when=ALL_COMPLETED)
                    outputs = plan.computed()
                    if outputs:
                        self._outputs.setdefault(id(component), (component, {}))[1].update(outputs)

    def of(self, component: Component) -> Mapping[int, Any] | None:
        entry = self._outputs.get(id(component))
        return entry[1] if entry is not None and entry[0] is component else None


@dc.dataclass(eq=False)
class _Narrowed:
    """What narrowing a window down found (see :meth:`CDCHandler._narrow`): each part is
    numbered in the order it was written or failed."""

    #: Parts that may fail before any is written; past it the window is given up: a database
    #: that refuses everything would otherwise be asked about every row.
    limit: int
    parts: int = 0
    failures: int = 0
    #: Each row that failed alone: its part's number, its packet, why.
    failed: list[tuple[int, ChangePacket, Exception]] = dc.field(default_factory=list)
    #: (table, id key) of each row written: the number of the last part that wrote it.
    written: dict[tuple[str, Hashable], int] = dc.field(default_factory=dict)


class _Reader(ReactiveThread):
    """Reads the rows of the handler's next window while the handler writes the one before
    (``reactive-cdc-reader``): one job after the other, until stopped."""

    def __init__(self) -> None:
        super().__init__("cdc-reader")
        self._jobs: queues.SimpleQueue[tuple[Future[Any], Callable[[], Any]] | None] = queues.SimpleQueue()

    def submit(self, job: Callable[[], Any]) -> Future[Any]:
        future: Future[Any] = Future()
        self._jobs.put((future, job))
        return future

    def on_stop(self) -> None:
        self._jobs.put(None)

    def run(self) -> None:
        while (item := self._jobs.get()) is not None:
            future, job = item
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(job())
                except BaseException as exc:  # handed to the handler, which waits on the future
                    future.set_exception(exc)


class CDCHandler(ReactiveThread):
    """Turns every waiting packet into collated batches and routes them to components.

    **Pipelining.** Model work runs on ``compute`` (a :class:`~reactive.compute.Compute`),
    not on this thread: while the model computes window N, the handler reads and plans
    window N+1 (up to ``pipeline`` windows in flight) and writes window N-1. Windows are
    finished (outputs written, then positions saved and committed) strictly in the order
    they were taken, so positions never pass an unwritten window; and a window planned while
    an earlier one is in flight does not trust the stored outputs of the rows that window
    changes (they are computed again), so an output from an older version of a row never
    lands over a newer one. ``pipeline=1`` finishes each window before taking the next.

    **Reading ahead.** Where the rows of a window taken while another is in flight must be
    read (a backfill's packets carry ids only), they are read on a thread of their own
    (``reactive-cdc-reader``). If the earlier window's model work ends before that read, the
    handler writes that window meanwhile and plans the new one after it is committed: with a
    model quicker than the database the handler is the bottleneck, and the database's read
    and write then overlap (DuckDB runs most of both without the GIL). Otherwise the new window
    is planned as soon as its rows are read, while the model still computes the earlier one,
    as without reading ahead. Its rows may be read before the earlier window commits, as when
    it is planned first; planned after that commit, it finds the outputs that window stored.

    The handler never dies: a component that raises has its batch recorded in the errors
    table, and processing goes on; a window whose writing fails otherwise is narrowed down to
    the rows that fail alone, which are set apart as errors (:meth:`_narrow`); a failure of the
    handler's own it cannot narrow releases the windows in flight (their sources deliver them
    again) and it goes on after a pause. :meth:`stop`
    closes the queue; everything already queued is processed before the thread exits.
    ``stats`` and ``totals`` are the counters it adds to (``db.cdc`` hands the same ones to
    every handler it starts, so they outlive a stop).
    """

    def __init__(
        self,
        db: Datalayer,
        queue: CDCQueue,
        *,
        compute: Compute,
        window_rows: WindowRows | None = None,
        pipeline: int = 2,
        stats: dict[str, ComponentStats] | None = None,
        totals: HandlerTotals | None = None,
        feed: FeedHub | None = None,
    ) -> None:
        super().__init__("cdc-handler")
        if pipeline < 1:
            raise ValueError("pipeline must be at least 1 window")
        self.db = db
        self.queue = queue
        self.compute = compute
        self.window_rows = WindowRows() if window_rows is None else window_rows
        #: The bound of the next window taken (see :class:`WindowRows`).
        self.bound = self.window_rows.floor
        #: What any window costs whatever its rows, as seen so far (see :class:`WindowCost`).
        self.window_cost = WindowCost()
        self.pipeline = pipeline
        self.stats = {} if stats is None else stats
        self.totals = HandlerTotals() if totals is None else totals
        #: Where committed changes go for ``db.cdc.publish`` (the change feed), if anywhere.
        self.feed = feed
        #: The current window's committed changes, while a feed is attached.
        self._committed: Committed | None = None
        #: Failures of the handler's own in a row (see :meth:`_recover`).
        self._failures = 0
        #: The thread that reads ahead (:meth:`_read_ahead`), started when first needed.
        self._reader: _Reader | None = None

    def stop(self) -> None:
        # Not the stop event: retry backoffs keep their length while the queue drains.
        self.queue.close()

    def run(self) -> None:
        ahead: deque[_Window] = deque()  # taken, not finished yet: oldest first
        try:
            while True:
                try:
                    if self._turn(ahead):
                        return
                except Exception as exc:
                    self._recover(ahead, exc)
        finally:
            if self._reader is not None:
                self._reader.stop()
                self._reader.join()

    def _turn(self, ahead: deque[_Window]) -> bool:
        """Take a window or finish the oldest one; True once the queue is closed and drained."""
        queue = self.queue
        # Plan what waits while there is room (so the model always has work queued); else
        # finish the oldest window once its work is done, the pipeline is full, or on a stop.
        plan_first = queue.packets > 0 and len(ahead) < self.pipeline
        if ahead and not plan_first and (ahead[0].ready() or len(ahead) >= self.pipeline or queue.closed):
            self._complete(ahead)
            return False
        packets = queue.get_batch(max_rows=self.bound)  # also returns when model work ends
        if packets:
            window = _Window(packets, self.bound)
            ahead.append(window)  # first: whatever happens next, run() knows these packets are taken
            if len(ahead) > 1 and self._read_ahead(window, ahead[0]):
                self._complete(ahead)  # the oldest, while the new window's rows are read
            self._open(window, list(ahead)[:-1])
            return False
        return queue.closed and not ahead and not queue.packets

    def _read_ahead(self, window: _Window, oldest: _Window) -> bool:
        """Start reading the rows of ``window``'s batches on the reader thread; True if the
        model work of ``oldest`` (the window finished next) ended first, so that it is
        written while they are read. False (at once where nothing is to be read): ``window``
        is planned first, as the model may still be computing."""
        reads: list[tuple[Batch, Future[list[Batch]] | None]] = []
        for batch in window_batches(window.packets, window.bound):
            needed = _unread(batch) and self.db.components_for(batch.table, batch.targets)
            reads.append((batch, self._read(batch) if needed else None))
        window.reads = reads
        pending_reads = {future for _, future in reads if future is not None}
        if not pending_reads:
            return False
        pending_work = {future for future in oldest.work if not future.done()}
        while pending_reads and pending_work:
            done, _ = wait_for_any(pending_reads | pending_work, return_when=FIRST_COMPLETED)
            pending_reads -= done
            pending_work -= done
        return not pending_work

    def _read(self, batch: Batch) -> Future[list[Batch]]:
        if self._reader is None:
            self._reader = _Reader()
            self._reader.start()
        return self._reader.submit(functools.partial(self._resolve_rows, batch))

    def _recover(self, ahead: deque[_Window], error: Exception) -> None:
        """After a failure of the handler's own (none of a component's, a database's or a
        source's: those are handled where they happen), release every window taken and not
        finished: their sources deliver those changes again. The thread goes on, after a pause
        that doubles with each failure in a row (a window finished ends the row)."""
        self.totals.internal_errors += 1
        self._failures += 1
        windows = list(ahead)
        ahead.clear()
        log.exception(
            "the change handler failed (%s); releasing %d windows in flight: their changes are delivered again",
            error,
            len(windows),
        )
        for window in windows:
            self._release(window.packets, error)
            self.queue.task_done(len(window.packets))
        self.bound = self.window_rows.floor
        # Closed (a stop), now or during the pause: what is left is drained without pauses.
        self.queue.wait_closed(_backoff(self._failures))

    def _open(self, window: _Window, ahead: Sequence[_Window]) -> None:
        """Plan a window taken after ``ahead`` now (its model work starts) unless that fails;
        it is then planned again when its turn comes."""
        started = time.perf_counter()
        packets = window.packets
        in_flight: dict[str, set[Hashable]] = {}
        for earlier in ahead:
            for table, keys in earlier.keys.items():
                in_flight.setdefault(table, set()).update(keys)
        reads, window.reads = window.reads, None
        try:
            window.steps = self._plan(packets, in_flight, window.bound, reads)
        except Exception as exc:
            log.debug("planning a window of %d packets failed (%s); it is planned again at its turn", len(packets), exc)
            return
        finally:
            window.seconds += time.perf_counter() - started
        for future in window.work:
            future.add_done_callback(lambda _: self.queue.wake_consumer())

    def _complete(self, ahead: deque[_Window]) -> None:
        """Finish the oldest window of ``ahead`` (written, or released), then take it off."""
        window = ahead[0]
        started = time.perf_counter()
        written = self._handle_with_retries(window)  # raises only on a failure of the handler's own: see run()
        ahead.popleft()
        self.queue.task_done(len(window.packets))
        if not written:
            # As after any failure of the handler's own: a pause before what comes next, that
            # doubles while windows keep failing (a stop ends it), so that a window delivered
            # again at once does not fail back to back.
            self._failures += 1
            self.queue.wait_closed(_backoff(self._failures))
            return
        self._failures = 0
        window.seconds += time.perf_counter() - started
        rows = sum(len(packet) for packet in window.packets)
        cost = self.window_cost
        fixed = cost.observe(rows, window.seconds) if self.window_rows.full(window.bound, rows) else cost.fixed
        windows = self.window_rows.holding(b for c in self.db.components() if (b := c.batching()) is not None)
        self.bound = windows.next(self.bound, window.bound, rows, window.seconds, fixed)

    def _handle_with_retries(self, window: _Window) -> bool:
        """Finish a window; while the database is unreachable, retry it with backoff. False if
        it was released.

        Writes are idempotent, so a window retried after a partial write ends the same; a
        retry plans the window again (its rows read again), taking the outputs its model work
        already computed (:class:`_Known`) for the rows that did not change meanwhile. A window
        that fails for another reason is narrowed down to the rows that fail alone
        (:meth:`_narrow`); if none of it can be written, it is released: its sources deliver
        those changes again.
        """
        packets = window.packets
        if not self._retake_lease():  # a standby now: its model work would be thrown away
            self._release(packets, LeaseLostError(f"another process holds the lease of {self.db.backend.uri}"))
            return False
        steps = window.steps
        known = _Known()
        attempt = 0
        failure: Exception | None = None  # once the window failed: narrowed down, see _narrow
        writes = False
        while True:
            try:
                if failure is not None:
                    self._narrow(packets, window.bound, failure, writes=writes, known=known)
                else:
                    if steps is None:
                        steps = self._plan(packets, {}, window.bound, known=known)
                    self._finish(packets, steps, known=known)
                    self.totals.windows_written += 1
                return True
            except (BackendUnavailableError, LeaseLostError) as exc:
                # Unreachable, or this process may not write right now (its lease is not renewed:
                # the database is slow or down, or another process takes over, and then db.cdc
                # stops this handler): nothing was committed, so the same window is tried again.
                known.add(steps)
                steps = None
                attempt += 1
                # Stopping without the lease (lost: db.cdc stands down), nothing can be written.
                if self.queue.closed and (attempt > STOPPING_RETRIES or isinstance(exc, LeaseLostError)):
                    log.error("%s while stopping; releasing %d packets", exc, len(packets))
                    self._release(packets, exc)
                    return False
                if isinstance(exc, LeaseLostError) and not self._retake_lease():
                    log.warning("%s: another process holds it; releasing %d packets", exc, len(packets))
                    self._release(packets, exc)
                    return False
                delay = _backoff(attempt)
                log.warning("%s; retrying %d packets in %.1f s", exc, len(packets), delay)
                self.wait(delay)
            except PermissionDeniedError as exc:
                # The database refuses reactive (a privilege revoked, a read-only session): not the
                # rows' fault, so none is set apart (narrowing set each apart: its output removed
                # and its change passed, so a grant brought nothing back). The window waits for
                # the grant, tried again with backoff as while the database is unreachable, its
                # rows listed by db.errors() with what to grant; a window someone waits on (the
                # backfill of db.add or db.retry_errors) is released instead: the caller raises it.
                known.add(steps)
                steps = None
                attempt += 1
                self._record_refusal(packets, exc, first=attempt == 1)
                waited_on = any(packet.on_processed is not None for packet in packets)
                if waited_on or (self.queue.closed and attempt > STOPPING_RETRIES):
                    log.error("%s; releasing %d packets", exc, len(packets))
                    self._release(packets, exc)
                    return False
                delay = _backoff(attempt)
                (log.warning if attempt == 1 else log.debug)(
                    "%s; retrying %d packets in %.1f s, and after until it is granted", exc, len(packets), delay
                )
                self.wait(delay)
            except Exception as exc:
                if failure is None:
                    self.totals.internal_errors += 1
                    known.add(steps)
                    if any(map(len, packets)):
                        log.warning("the change handler failed on %d packets (%s)", len(packets), exc)
                        failure = exc
                        # Whether a window was written since the last one failed.
                        totals = self.totals
                        writes = totals.windows_written > totals.windows_written_at_failure
                        totals.windows_written_at_failure = totals.windows_written
                        continue
                log.exception("the change handler failed on %d packets; they will be delivered again", len(packets))
                self._release(packets, exc)
                return False

    def _narrow(
        self, packets: Sequence[ChangePacket], bound: int, failure: Exception, *, writes: bool, known: _Known
    ) -> None:
        """Write a window that failed as a whole (with ``failure``) part by part, halving each
        part that fails (its packets, then a packet's rows), in the order of the window; then
        set apart each row that failed alone, and save and commit the window's positions.

        A row is set apart (the error recorded for each of its components, its output
        removed, as after a model's failure: ``db.retry_errors()`` computes it again) only
        where the database is seen to take other writes: some other part of the window was
        written or, where one row of the window failed and nothing else was written (a window
        of one row), some window was written since a window last failed (``writes``): so when
        a database starts refusing everything, the first lone row to fail may be set apart,
        none after it until a window is written again. Otherwise the last error is raised and
        the window is released: a database that refuses everything must not turn changes
        into errors; for the same reason narrowing stops once more parts
        failed, with none written, than one bad row explains (:data:`NARROWING_SLACK` past the
        log2 of the window's rows). Each part is planned again (its rows read again), its
        outputs taken from what the window's model work computed (``known``): a window with one
        bad row of n costs about 2 log2(n) more writes, and no more model work. Positions are
        saved only at the end: a crash meanwhile delivers the window again, and its writes are
        idempotent.
        """
        found = _Narrowed(limit=math.ceil(math.log2(max(sum(map(len, packets)), 1))) + NARROWING_SLACK)
        halves = _halves(packets)
        if halves is None:
            found.parts = 1
            found.failed.append((1, packets[0], failure))
        else:
            for half in halves:
                self._bisect(half, bound, found, known)
        if not found.written and not (writes and len(found.failed) == 1):
            raise found.failed[-1][2]
        if found.written:
            self.totals.windows_written += 1
        steps = []
        for order, part, exc in found.failed:
            if found.written.get((part.table, id_key(part.ids[0])), -1) > order:
                continue  # a later change of that row was written: this failure is past
            error = f"the change handler failed on this row alone: {type(exc).__name__}: {exc}"
            log.error("%s (%r, id %r)", error, part.table, part.ids[0])
            for batch in window_batches([part], bound):
                plans: list[tuple[Component, PlannedRefresh | Exception]] = [
                    (c, PlannedRefresh((), functools.partial(c.set_apart, batch, self.db, error)))
                    for c in self.db.components_for(batch.table, batch.targets)
                ]
                steps.append(_Step(batch, plans))
        self._finish(packets, steps)

    def _bisect(self, packets: Sequence[ChangePacket], bound: int, found: _Narrowed, known: _Known) -> None:
        """Write ``packets``' outputs (no positions) or, if that fails, each half of them in
        turn, down to the row; ``found`` gets what was written and the rows that failed alone."""
        try:
            self._finish(packets, self._plan(packets, {}, bound, known=known), positions=False, known=known)
        except (BackendUnavailableError, LeaseLostError, PermissionDeniedError):
            raise  # not the rows' fault: the window is tried again (see _handle_with_retries)
        except Exception as exc:
            found.failures += 1
            if not found.written and found.failures > found.limit:
                raise  # nothing written yet, and more failures than one bad row explains
            halves = _halves(packets)
            if halves is None:
                found.parts += 1
                found.failed.append((found.parts, packets[0], exc))
                return
            for half in halves:
                self._bisect(half, bound, found, known)
            return
        found.parts += 1
        for packet in packets:
            found.written.update(((packet.table, key), found.parts) for key in id_keys(packet.ids))

    def _retake_lease(self) -> bool:
        """Before db.cdc starts (a backfill of ``db.add``), nothing else takes a lapsed lease
        back (once started, the lease keeper does, and a takeover restarts this handler): take
        it if it is free, so the window can be written. False where another process holds it
        (it took over while this one was paused): this process is a standby now, and the
        window is not retried here (``db.add`` then returns, its backfill deferred, as a
        standby's does) instead of being retried for ever."""
        cdc = self.db.cdc
        if cdc.running or cdc.lease is None or cdc.lease.held is not None:
            return True
        try:
            if cdc.acquire():
                log.warning("took the lease of %s back after it lapsed", self.db.backend.uri)
                return True
        except Exception as exc:  # the database is down: tried again at the next retry
            log.warning("could not take the lease of %s back: %s", self.db.backend.uri, exc)
            return True
        return False

    # -- one window of packets ------------------------------------------------------------
    def _plan(
        self,
        packets: Sequence[ChangePacket],
        in_flight: Mapping[str, set[Hashable]],
        bound: int,
        reads: Sequence[tuple[Batch, Future[list[Batch]] | None]] | None = None,
        *,
        known: _Known | None = None,
    ) -> list[_Step]:
        """Coalesce, collate (in batches of at most ``bound`` rows), read the rows packets do
        not carry (or take ``reads``: the batches with their reads started ahead), and plan
        every component's refresh (its model work starts, for what ``known`` lacks); nothing
        is written."""
        steps = []
        batches = ((batch, None) for batch in window_batches(packets, bound)) if reads is None else reads
        for batch, read in batches:
            components = self.db.components_for(batch.table, batch.targets)
            if not components:
                continue
            try:
                resolved = self._resolve_rows(batch) if read is None else read.result()
            except Exception as exc:
                if self.db.backend.is_transient(exc):
                    raise BackendUnavailableError(f"database unreachable ({exc})") from exc
                raise
            busy = in_flight.get(batch.table, frozenset())
            for part in resolved:
                plans = [(c, self._plan_one(c, part, busy, None if known is None else known.of(c))) for c in components]
                steps.append(_Step(part, plans))
        return steps

    def _plan_one(
        self,
        component: Component,
        batch: Batch,
        in_flight: Collection[Hashable],
        known: Mapping[int, Any] | None = None,
    ) -> PlannedRefresh | Exception:
        stats = self.stats.setdefault(component.identifier, ComponentStats())
        stats.count(batch)
        stats.model_calls = component.model_calls  # a live view: info() shows the calls as they run
        # ``known`` only where there is some: a component that gives no ``computed`` never takes it.
        options: dict[str, Any] = {"in_flight": in_flight}
        if known is not None:
            options["known"] = known
        try:
            return component.plan_refresh(batch, self.db, compute=self.compute, wait=self.wait, **options)
        except (LeaseLostError, PermissionDeniedError):
            raise  # not the rows' fault: the window waits (see _handle_with_retries)
        except Exception as exc:
            if self.db.backend.is_transient(exc):
                raise BackendUnavailableError(f"database unreachable ({exc})") from exc
            return exc  # the rows' failure, recorded when the window is finished

    def _finish(
        self,
        packets: Sequence[ChangePacket],
        steps: list[_Step],
        *,
        positions: bool = True,
        known: _Known | None = None,
    ) -> None:
        """Finish a planned window; with a feed attached, hand what it committed to the feed after.
        Without ``positions``, only its outputs are written (a part of a window: see :meth:`_narrow`).
        ``known``: what chained listeners take, and get what they computed if the window fails.

        The feed's window lock is held meanwhile (uncontended but while a feed reads a table
        whole), so that what a feed reads is a state between two windows.
        """
        feed = self.feed
        if feed is None:
            self._write(packets, steps, positions=positions, known=known)
            return
        with feed.window():
            self._committed = [] if feed.active else None
            try:
                self._write(packets, steps, positions=positions, known=known)
                window = feed.count_window()
            finally:
                committed, self._committed = self._committed, None
        if committed:
            feed.committed(window, committed)

    def _write(
        self,
        packets: Sequence[ChangePacket],
        steps: list[_Step],
        *,
        positions: bool = True,
        known: _Known | None = None,
    ) -> None:
        """Wait for each refresh's model work and write it, refresh chained listeners, then
        commit positions.

        Chained listeners are planned here, as the outputs they read are written: they take
        what ``known`` holds for them, and where the window fails, ``known`` gets what they
        computed (a window written again computes their work once, as the others').

        Where the database has transactions (``backend.transactional``), the window's output
        writes are collected, then written with its positions in one transaction that first
        checks the lease: outputs and positions move together, and only while this process
        holds the lease.
        """
        # The model's work is awaited before the writing lock, which db.remove takes: a removal
        # waits for a window's writes, not for a slow or hung model (a late call, see
        # Listener.plan_refresh, and chained listeners compute under it).
        wait_for_any([f for step in steps for _, p in step.plans if isinstance(p, PlannedRefresh) for f in p.work])
        with self.db.writing():  # a component removed meanwhile is written for no more
            backend = self.db.backend
            committed = self._committed
            chained_steps: list[_Step] = []
            try:
                with self.db.writer.deferring(backend.transactional) as writes:
                    chained: deque[Batch] = deque()
                    for step in steps:
                        part = step.batch
                        if committed is not None:
                            event = "delete" if part.event is DBEvent.delete else "upsert"
                            rows = zip(part.ids, part.rows, strict=True)
                            committed.extend(("table", part.table, event, i, r) for i, r in rows)
                        for component, plan in step.plans:
                            if self.db.registered(component):  # else removed since it was planned
                                chained.extend(self._refreshed(component, part, plan))
                    while chained:  # listeners on the outputs just computed: planned and finished at once
                        batch = chained.popleft()
                        chained_steps.append(_Step(batch, plans := []))
                        for component in self.db.components_for(batch.table, batch.targets):
                            taken = None if known is None else known.of(component)
                            plans.append((component, plan := self._plan_one(component, batch, (), taken)))
                            chained.extend(self._refreshed(component, batch, plan))
                try:
                    with backend.transaction():
                        self.db.cdc.fence(atomic=backend.transactional)
                        for write in writes:
                            write()
                        if positions:
                            self._save_positions(packets, strict=backend.transactional)
                except Exception as exc:
                    if backend.is_transient(exc):
                        raise BackendUnavailableError(f"database unreachable ({exc})") from exc
                    raise
            except Exception:
                if known is not None:
                    known.add(chained_steps)
                raise
        if not positions:
            return
        for source, done in self._by_source(packets):
            source.commit(done)  # once, now that the window is written for good
        self.totals.packets += len(packets)
        self.totals.windows += 1
        self.totals.rows += sum(len(p) for p in packets)
        self._notify(packets, None)

    @staticmethod
    def _notify(packets: Sequence[ChangePacket], error: BaseException | None) -> None:
        for packet in packets:
            if packet.on_processed is not None:
                try:
                    packet.on_processed(packet, error)
                except Exception:
                    log.exception("a packet callback failed")

    def _resolve_rows(self, batch: Batch) -> list[Batch]:
        """Read the rows a packet did not carry (reconciliation packets carry none).

        A row that is gone by now is a delete: those ids come back as a delete batch, so a
        reconciliation that found an orphaned output, or a change whose row vanished before
        it was processed, removes the output and is counted as a delete.
        """
        if not _unread(batch):
            return [batch]
        source, table = self.db.source_for(batch.table), self.db.table_info(batch.table)
        if isinstance(source, TableReader) and batch.rows.count(None) == len(batch.rows):  # a backfill's: one table
            rows = source.read_table(table, batch.ids)
            if rows is not None:
                return self._split_gone(batch, rows, table.id_column)
        missing = [i for i, row in zip(batch.ids, batch.rows, strict=True) if row is None]
        found = source.read_rows(table, missing)
        present: list[tuple[Any, Any]] = []
        gone: list[Any] = []
        for row_id, row in zip(batch.ids, batch.rows, strict=True):
            row = row if row is not None else found.get(id_key(row_id))
            if row is None:
                gone.append(row_id)
            else:
                present.append((row_id, row))
        parts = []
        if present:
            parts.append(dc.replace(batch, ids=tuple(i for i, _ in present), rows=tuple(r for _, r in present)))
        if gone:
            parts.append(_deleted(batch, gone))
        return parts

    @staticmethod
    def _split_gone(batch: Batch, rows: TableRows, id_column: str) -> list[Batch]:
        """``batch`` as the rows read (in their order), and a delete of the ids not found."""
        ids = rows.column(id_column)
        parts = [dc.replace(batch, ids=tuple(ids), rows=rows)] if ids else []
        if len(ids) < len(batch.ids):
            present = set(map(id_key, ids))
            parts.append(_deleted(batch, [i for i in batch.ids if id_key(i) not in present]))
        return parts

    def _refreshed(self, component: Component, batch: Batch, plan: PlannedRefresh | Exception) -> list[Batch]:
        """Finish ``component``'s planned refresh of ``batch``; the batches for listeners chained on it."""
        stats = self.stats[component.identifier]
        try:
            if isinstance(plan, Exception):
                raise plan
            refresh = plan.finish()
        except (LeaseLostError, PermissionDeniedError):
            raise  # not the rows' fault: the window waits (see _handle_with_retries)
        except ComputeUnavailableError as exc:
            raise BackendUnavailableError(str(exc)) from exc  # the same retries as a database gone
        except Exception as exc:
            if self.db.backend.is_transient(exc):
                raise BackendUnavailableError(f"database unreachable ({exc})") from exc
            error = f"{type(exc).__name__}: {exc}"
            log.error("listener %s failed on %d rows of %r: %s", component.identifier, len(batch), batch.table, error)
            log.debug("%s", traceback.format_exc())
            refresh = None
            errors = [ErrorRecord(component.identifier, batch.table, i, error) for i in batch.ids]
        else:
            stats.computed += refresh.computed
            stats.skipped += refresh.skipped
            errors = refresh.errors
        if errors:
            stats.errors += len(errors)
            stats.last_error = errors[-1].error
            try:
                self.db.backend.errors.record_errors(errors)
            except Exception:
                log.exception("could not record %d errors of %s", len(errors), component.identifier)
        if refresh is None:
            return []
        if self._committed is not None:
            name = component.identifier
            self._committed.extend(("outputs", name, "upsert", i, out) for i, out, _ in refresh.written)
            self._committed.extend(("outputs", name, "delete", i, None) for i in refresh.deleted)
        return self._derived(component, refresh)

    def _derived(self, component: Component, refresh: Any) -> list[Batch]:
        """Batches for listeners chained on ``component``'s outputs table."""
        table = outputs_table(component.identifier)
        if not self.db.components_for(table, None):
            return []
        derived = []
        if refresh.written:
            ids = tuple(refresh.written.ids)
            # As a read of the outputs table gives them: a vector written as an array is a list.
            rows = tuple(
                {SOURCE_FIELD: i, OUTPUT_FIELD: _as_read(out), FINGERPRINT_FIELD: fp} for i, out, fp in refresh.written
            )
            derived.append(Batch(table, DBEvent.update, ids, rows))
        if refresh.deleted:
            ids = tuple(refresh.deleted)
            derived.append(Batch(table, DBEvent.delete, ids, (None,) * len(ids)))
        return derived

    @staticmethod
    def _by_source(packets: Sequence[ChangePacket]) -> list[tuple[ChangeSource, list[Any]]]:
        by_source: dict[int, tuple[ChangeSource, list[Any]]] = {}
        for packet in packets:
            if packet.source is not None:
                by_source.setdefault(id(packet.source), (packet.source, []))[1].append(packet.position)
        return list(by_source.values())

    def _save_positions(self, packets: Sequence[ChangePacket], *, strict: bool = False) -> None:
        """Have each source persist the positions of its processed packets, in arrival order.

        Outside a transaction a position that cannot be saved is logged (the outputs are
        written; the changes come again and are found current). Inside one (``strict``) it
        fails the whole window, outputs included, and the window is tried again.
        """
        for source, positions in self._by_source(packets):
            try:
                source.save_positions(positions)
            except Exception:
                if strict:
                    raise
                self.totals.internal_errors += 1
                log.exception("could not save the position of %s", source.name)

    def _record_refusal(self, packets: Sequence[ChangePacket], refusal: PermissionDeniedError, *, first: bool) -> None:
        """Record ``refusal`` for each row of ``packets`` and each component on its table, in place
        of the row's earlier record (one record a row, however often its window is tried):
        ``db.errors()`` and ``info()`` show what waits for a grant. Each component settles the
        records as its own once its rows are written (``Component.recorded``); as it settles them
        when it plans the window's writes, before they are tried, they are recorded again after
        each try that fails. Where the errors table cannot be written either (a read-only
        database), the log says so (at the ``first`` try)."""
        error = f"{type(refusal).__name__}: {refusal}"
        waiting: dict[str, tuple[Component, dict[Hashable, Any]]] = {}
        for packet in packets:
            for component in self.db.components_for(packet.table, packet.targets):
                ids = waiting.setdefault(component.identifier, (component, {}))[1]
                ids.update(zip(id_keys(packet.ids), packet.ids, strict=True))
        for identifier, (component, ids) in waiting.items():
            self.stats.setdefault(identifier, ComponentStats()).last_error = error
            sources = list(ids.values())
            try:
                self.db.backend.errors.clear_errors(identifier, sources)
                records = [ErrorRecord(identifier, component.table, i, error) for i in sources]
                self.db.backend.errors.record_errors(records)
            except Exception as exc:
                (log.warning if first else log.debug)(
                    "could not record that %d rows of %s wait for a grant: %s", len(sources), identifier, exc
                )
                continue
            component.recorded(sources)

    def _release(self, packets: Sequence[ChangePacket], error: BaseException) -> None:
        """Tell each source that its packets were not processed and must come again."""
        for source, positions in self._by_source(packets):
            try:
                source.release(positions)
            except Exception:
                log.exception("could not release packets of %s", source.name)
        self._notify(packets, error)

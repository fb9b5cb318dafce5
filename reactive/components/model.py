"""``Model``: a batch prediction function, and the failure handling around its calls.

Every call of ``predict`` runs on a thread of its own (``reactive-model-<identifier>``, one per
:meth:`Model.compute`, kept for all the batches of that window, or from window to window with
``keep_thread``) while the caller waits for it.
That is what lets the handler give a call up: after the model's ``timeout``, or when change
data capture stops while a call hangs. Python cannot
kill a thread, so a call that was given up runs on until ``predict`` returns; until then
the model is not called again (``predict`` is never called twice at once) and its batches
fail at once, recorded like any failure.
"""

from __future__ import annotations

import dataclasses as dc
import datetime as _dt
import inspect
import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence, Set
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from reactive import checks
from reactive.errors import ConfigurationError, ModelOutputError
from reactive.fingerprints import (
    column_fingerprints,
    fingerprint_text,
    fingerprints,
    legacy_fingerprint,
    versioned,
)
from reactive.outputs import from_tensor
from reactive.threads import ReactiveThread

if TYPE_CHECKING:
    from reactive.compute import Compute

log = logging.getLogger(__name__)

#: Longest wait between two tries of a batch that failed with a transient error.
MAX_RETRY_BACKOFF = 30.0
#: Seconds a running call may go on once change data capture is stopping.
STOP_GRACE = 10.0
#: How often a handler waiting for a call checks whether change data capture is stopping.
STOP_CHECK = 0.1
#: A call running this long is logged (once), so a hang without a timeout is visible.
LONG_CALL = 60.0
#: A model whose last call took less than this per input is not sorted by length: sorting and
#: putting outputs back in order costs about 0.15 us an input, which only a model this cheap
#: notices (a trivial one: 40 ns an input; MiniLM on a CPU: about 3 ms), and whatever padding
#: it saves cannot cost such a model more.
SORT_WORTH_SECONDS = 5e-6

Transient = type[BaseException] | tuple[type[BaseException], ...] | Callable[[BaseException], bool]


@dc.dataclass(frozen=True, slots=True)
class Failure:
    """Why one input produced no output."""

    error: str


@dc.dataclass(frozen=True, slots=True)
class CallInfo:
    """One call of ``predict``: its thread, when it started, how many inputs it got.

    ``abandoned`` says why the handler stopped waiting for it (None while it waits).
    """

    thread: str
    since: _dt.datetime
    inputs: int
    abandoned: str | None = None


@dc.dataclass(slots=True)
class ModelCalls:
    """What a model's calls are doing: shown per listener in ``db.cdc.info()``.

    ``running`` is the call the handler is waiting for; ``stuck`` a call it gave up that has
    not returned yet (the model is not called again until it does).
    """

    running: CallInfo | None = None
    stuck: CallInfo | None = None
    timeouts: int = 0
    transient_retries: int = 0


@dc.dataclass(frozen=True, slots=True)
class Batching:
    """How a model that sorts its inputs by length cuts a window into calls (``size`` inputs
    each), and how long its last call took per input: what the handler sizes its windows by
    (:meth:`reactive.WindowRows.holding`)."""

    size: int
    seconds_per_input: float


class _BatchFailed(Exception):
    """A failure that belongs to the whole batch: it is neither split nor retried."""


class _Call:
    """Calls of ``predict`` on ranges of ``values`` (``bounds``), one after the other on a caller
    thread: a window's batches are handed over once, not one round trip between two threads per
    batch (about 0.1 ms each, more than a cheap model's whole batch). ``done`` once every range
    returned, one raised, or the calls were cancelled (given up).

    ``batch`` is the range being called, ``started`` since when (``time.monotonic``) and
    ``info`` its :class:`CallInfo`: deadlines and ``Model.calls`` follow the range, not the
    whole hand-off. They move under the model's lock, with ``outputs``.
    """

    def __init__(self, model: Model, values: list[Any], bounds: Sequence[tuple[int, int]], thread: str) -> None:
        self.model = model
        self.values = values
        self.bounds = bounds
        #: What each range's call returned, in order: the ranges past the last one did not return.
        self.outputs: list[Any] = []
        #: What the call of the range after the last output raised, if one did.
        self.error: BaseException | None = None
        self.cancelled = False
        self.done = threading.Event()
        self.thread = thread
        self.batch = 0
        self.started = time.monotonic()
        self.info = CallInfo(thread, _dt.datetime.now(_dt.UTC), bounds[0][1] - bounds[0][0])

    def run(self) -> None:
        model = self.model
        spent, count = 0.0, 0  # seconds inside predict, and the inputs it got
        try:
            for index, (lo, hi) in enumerate(self.bounds):
                with model._lock:
                    if self.cancelled:
                        return
                    if index:
                        self.batch, self.started = index, time.monotonic()
                        self.info = CallInfo(self.thread, _dt.datetime.now(_dt.UTC), hi - lo)
                        model.calls.running = self.info
                began = time.monotonic()
                try:
                    outputs = model.predict(self.values[lo:hi])
                except BaseException as exc:  # handed to the waiting handler, which decides
                    self.error = exc
                    return
                spent, count = spent + time.monotonic() - began, count + hi - lo
                with model._lock:
                    if self.cancelled:
                        return  # given up: discarded
                    self.outputs.append(outputs)
                    self.started = time.monotonic()  # progress: no deadline passes between two ranges
        finally:
            if count:
                model._seconds_per_input = spent / count
            model._returned(self)
            self.done.set()


class _Caller(ReactiveThread):
    """The thread one :meth:`Model.compute` runs its calls of ``predict`` on, one after the
    other: kept for all the batches of a window, so what a framework keeps per thread (torch's
    and OpenMP's pools) stays warm; a new thread per call cost about 9% of MiniLM's time on CPU.
    It ends when stopped, once the call it runs returned."""

    def __init__(self, model: Model) -> None:
        super().__init__(f"model-{model.identifier}")
        self.calls: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()

    def on_stop(self) -> None:
        self.calls.put(None)

    def run(self) -> None:
        while (call := self.calls.get()) is not None:
            call.run()


#: The longest ``retry_backoff``: a thread cannot wait longer at once on every build.
_LONGEST_WAIT = 1e9


def _transient_predicate(transient: Transient) -> Callable[[BaseException], bool]:
    if isinstance(transient, type) and issubclass(transient, BaseException):
        transient = (transient,)
    if isinstance(transient, tuple):
        if not all(isinstance(t, type) and issubclass(t, BaseException) for t in transient):
            raise ConfigurationError("transient must be exception types or a predicate on an exception")
        types = transient
        return lambda exc: isinstance(exc, types)
    if callable(transient):
        return transient
    raise ConfigurationError("transient must be exception types or a predicate on an exception")


class Model:
    """A model: ``predict`` maps a list of inputs to a list of outputs of the same length.

    >>> m = Model("upper", predict=lambda texts: [t.upper() for t in texts], batch_size=2)
    >>> m.compute(["a", "b", "c"], wait=lambda s: True)
    ['A', 'B', 'C']

    ``output_type`` (an ibis type string such as ``"array<float32>"``) fixes the type of the
    stored outputs; by default it is inferred from the first outputs.

    **Errors.** When ``predict`` raises, :meth:`compute` splits the batch to isolate the
    failing inputs, retries each failing input ``max_retries`` times with exponential
    backoff starting at ``retry_backoff`` seconds, and reports it as a :class:`Failure`. An
    error ``transient`` declares (exception types, or a predicate) is not the inputs' fault
    (a remote model timing out, say): the batch is kept together and tried again up to
    ``transient_retries`` times, the backoff doubling from ``retry_backoff`` up to 30 s;
    after that every input of the batch fails with that error. A ``predict`` that returns
    the wrong number of outputs fails the whole batch (``model 'm' returned 4 outputs for 5
    inputs``).

    >>> calls = []
    >>> def remote(texts):
    ...     calls.append(len(texts))
    ...     if len(calls) == 1:
    ...         raise TimeoutError("the server is busy")
    ...     return [len(t) for t in texts]
    >>> Model("len", predict=remote, transient=TimeoutError).compute(["ab", "c"], wait=lambda s: True)
    [2, 1]
    >>> calls  # tried again as one batch, not split
    [2, 2]

    **Hangs.** ``timeout`` (seconds) bounds each call: a call that has not answered by then
    fails its batch (``did not answer within ...``) and the handler goes on. The call itself
    cannot be killed: it goes on in its thread, its outputs are discarded when it returns,
    and until then the model's batches fail at once. Without a timeout a call may run as
    long as it needs; it is given up only when change data capture stops (after 10 s).
    :attr:`calls` shows the running and stuck call.

    **Loading.** A large model is better built where it runs than shipped with every call:
    ``Model("embed", load=make_encoder)`` calls ``make_encoder()`` once, at the model's first
    use in a process (with :class:`~reactive.compute.RayCompute`, once in each actor), and uses
    what it returns as ``predict``. Give ``predict`` or ``load``, not both.

    >>> Model("len", load=lambda: lambda texts: [len(t) for t in texts]).compute(["ab"], wait=lambda s: True)
    [2]

    ``executor`` runs this model's work somewhere else than the datalayer's ``compute`` (for
    instance on Ray actors with GPUs, while the other models run in process).

    **Versions.** ``version`` names what the model computes. It is part of every stored
    output's fingerprint (:meth:`fingerprint`), so a listener added with a model of another
    version finds every output stale and computes it again. Change it whenever ``predict``
    would give other outputs for the same inputs.
    """

    def __init__(
        self,
        identifier: str,
        predict: Callable[[list[Any]], Sequence[Any]] | None = None,
        *,
        load: Callable[[], Callable[[list[Any]], Sequence[Any]]] | None = None,
        batch_size: int = 64,
        output_type: str | None = None,
        max_retries: int = 2,
        retry_backoff: float = 0.05,
        transient: Transient = (),
        transient_retries: int = 6,
        timeout: float | None = None,
        version: str | int | None = None,
        sort_by_length: bool = True,
        executor: Compute | None = None,
    ) -> None:
        if not identifier or not isinstance(identifier, str):
            raise ConfigurationError("a Model needs a non-empty string identifier")
        if "\x00" in identifier:
            # It names the outputs' table; an engine's C code stops a name at NUL.
            raise ConfigurationError(f"Model {identifier!r}: an identifier cannot hold the NUL character")
        if (predict is None) == (load is None):
            raise ConfigurationError(f"Model {identifier!r}: give predict (a function) or load (what builds it), one")
        if not callable(predict if load is None else load):
            raise ConfigurationError(f"Model {identifier!r}: {'predict' if load is None else 'load'} must be callable")
        if inspect.iscoroutinefunction(predict):
            # Called on a thread of its own, it returned a coroutine never awaited: every row failed.
            raise ConfigurationError(
                f"Model {identifier!r}: predict is a coroutine function (async def); reactive calls predict on a"
                " thread of its own: pass a plain function, e.g. predict=lambda xs: asyncio.run(embed(xs))"
            )
        batch_size = checks.whole(f"Model {identifier!r}: batch_size", batch_size, least=1)
        max_retries = checks.whole(f"Model {identifier!r}: max_retries", max_retries, least=0)
        transient_retries = checks.whole(f"Model {identifier!r}: transient_retries", transient_retries, least=0)
        retry_backoff = checks.seconds(f"Model {identifier!r}: retry_backoff", retry_backoff, zero=True)
        if retry_backoff >= _LONGEST_WAIT:  # what a thread's wait takes (threading.TIMEOUT_MAX on some builds)
            raise ConfigurationError(
                f"Model {identifier!r}: retry_backoff must be under 1e9 seconds, not {retry_backoff!r}"
            )
        if output_type is not None and (not isinstance(output_type, str) or not output_type.strip()):
            raise ConfigurationError(f"Model {identifier!r}: output_type must be a type name such as 'array<float32>'")
        if timeout is not None:
            # Infinity is no timeout, as None is. A text or a bool was taken (True: one second)
            # or failed with a TypeError comparing it.
            timeout = checks.seconds(f"Model {identifier!r}: timeout", timeout, infinite=True)
        if version is not None and (isinstance(version, bool) or not isinstance(version, str | int)):
            raise ConfigurationError(f"Model {identifier!r}: version must be a string or an int")
        self.identifier = identifier
        #: What builds ``predict`` where the model runs (once per process, or per Ray actor).
        self.load = load
        self._predict = predict
        self.batch_size = batch_size
        # JSON outputs are reactive's own kind (stored as text everywhere), whatever the case it
        # is written in: 'JSON' was parsed by ibis as its JSON type, which no store writes a dict to.
        self.output_type = "json" if output_type is not None and output_type.strip().lower() == "json" else output_type
        self.max_retries = max_retries
        self.retry_backoff = retry_backoff
        self.transient = transient
        self.is_transient = _transient_predicate(transient)
        self.transient_retries = transient_retries
        self.timeout = timeout
        self.version = None if version is None else str(version)
        #: Cut text inputs into batches longest first, as ``SentenceTransformer.encode`` does
        #: over its whole list: a batch of similar lengths pads less. Inputs that fit in one
        #: batch keep their order, and so do those of a model too cheap to gain from it
        #: (:data:`SORT_WORTH_SECONDS`).
        self.sort_by_length = sort_by_length
        #: Where this model's work runs, when not on the datalayer's ``compute`` (e.g. a
        #: :class:`~reactive.compute.RayCompute` for the one model that needs GPUs).
        self.executor = executor
        self._init_runtime()

    def _init_runtime(self) -> None:
        """What a model holds while it runs in a process (not pickled: see ``__getstate__``)."""
        #: The running and stuck call, and counters (a live view).
        self.calls = ModelCalls()
        self._lock = threading.Lock()
        self._returned_calls = threading.Condition(self._lock)
        self._in_flight: _Call | None = None
        #: Seconds per input of the last call that returned outputs (None before one).
        self._seconds_per_input: float | None = None
        self._loading = threading.Lock()
        #: The caller thread of the compute() running on this thread, or kept by the last one
        #: (``keep_thread``; see _Caller).
        self._local = threading.local()

    def __getstate__(self) -> dict[str, Any]:
        """The declaration only: a model sent to another process (a Ray actor) builds its own
        calls, locks and, with ``load``, its own ``predict`` there."""
        runtime = (
            "calls",
            "_lock",
            "_returned_calls",
            "_in_flight",
            "_seconds_per_input",
            "_loading",
            "executor",
            "_local",
        )
        state = {k: v for k, v in self.__dict__.items() if k not in runtime}
        if self.load is not None:
            state["_predict"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.executor = None
        self._init_runtime()

    @property
    def predict(self) -> Callable[[list[Any]], Sequence[Any]]:
        """The batch function: ``predict`` as given, or what ``load()`` returns (called once, at
        the first use in this process)."""
        predict = self._predict
        if predict is None:
            with self._loading:
                if self._predict is None:
                    assert self.load is not None
                    loaded = self.load()
                    if not callable(loaded):
                        raise ConfigurationError(
                            f"Model {self.identifier!r}: load() returned {type(loaded).__name__}, not a function"
                        )
                    self._predict = loaded
                predict = self._predict
        return predict

    def __repr__(self) -> str:
        version = "" if self.version is None else f", version={self.version!r}"
        return f"Model({self.identifier!r}, batch_size={self.batch_size}{version})"

    def same_model(self, other: Model) -> bool:
        """Whether ``other`` computes the same thing with the same settings.

        >>> def f(xs): return xs
        >>> Model("m", f).same_model(Model("m", f)), Model("m", f).same_model(Model("m", f, version=2))
        (True, False)
        """
        settings = ("identifier", "batch_size", "output_type", "max_retries", "retry_backoff", "transient")
        more = ("transient_retries", "timeout", "version")
        return self.same_function(other) and all(getattr(self, s) == getattr(other, s) for s in settings + more)

    def same_function(self, other: Model) -> bool:
        """Whether ``other`` has the same ``predict`` (or the same ``load``); nothing is loaded."""
        if self.load is not None or other.load is not None:
            return self.load is other.load
        return self._predict is other._predict

    def fingerprint(self, value: Any) -> int:
        """The fingerprint an output of this model computed from ``value`` is stored with.

        It depends on the input and on :attr:`version`: a new version makes every stored
        output stale.

        >>> from reactive.fingerprints import fingerprint
        >>> Model("m", predict=list).fingerprint("x") == fingerprint("x")
        True
        >>> Model("m", predict=list, version="2").fingerprint("x") == fingerprint("x")
        False
        """
        return self.fingerprints([value])[0]

    def fingerprints(self, values: Sequence[Any]) -> list[int]:
        """:meth:`fingerprint` of each value, in one call.

        >>> m = Model("m", predict=list, version="2")
        >>> m.fingerprints(["x", 1]) == [m.fingerprint("x"), m.fingerprint(1)]
        True
        """
        return self._versioned(fingerprints(values))

    def column_fingerprints(self, column: pa.Array | pa.ChunkedArray) -> list[int] | None:
        """:meth:`fingerprints` of an Arrow text column, from its buffers; None for a column of
        another type or with nulls.

        >>> m = Model("m", predict=list, version="2")
        >>> m.column_fingerprints(pa.array(["x", "y"])) == m.fingerprints(["x", "y"])
        True
        """
        digests = column_fingerprints(column)
        return None if digests is None else self._versioned(digests)

    def _versioned(self, digests: list[int]) -> list[int]:
        return digests if self.version is None else versioned(digests, self.version)

    def legacy_fingerprint(self, value: Any) -> int:
        """The fingerprint outputs were stored with before reactive 0.2 (see
        :func:`reactive.fingerprints.legacy_fingerprint`): such an output of an input that has
        not changed since is current."""
        digest = legacy_fingerprint(value)
        if self.version is None:
            return digest
        # No unversioned fingerprint's text starts with \x01.
        return fingerprint_text(f"\x01{self.version}\x01{digest}")

    # -- computing ------------------------------------------------------------------------
    def compute(
        self,
        inputs: Sequence[Any],
        *,
        wait: Callable[[float], bool],
        stopping: Callable[[], bool] = lambda: False,
        keep_thread: bool = False,
    ) -> list[Any]:
        """Outputs for ``inputs`` in order; an input that failed gets a :class:`Failure`.

        ``wait(seconds)`` sleeps between retries and returns False to give them up;
        ``stopping()`` says change data capture is stopping (transient retries stop, and a
        running call gets :data:`STOP_GRACE` more seconds). ``keep_thread`` keeps the thread
        ``predict`` ran on for the next ``compute`` from this thread (starting and joining one
        costs about 0.1 ms, a third of a one-row window's path); :meth:`end_thread` ends it.
        """
        order = _length_order(inputs) if self._sorts(len(inputs)) else None
        # Batches are ranges of ``values`` (the inputs longest first, or as they came), and each
        # batch's outputs land in the same range of ``found``: slices, not a tuple per input.
        values = list(inputs) if order is None else [inputs[i] for i in order.tolist()]
        found: list[Any] = [None] * len(values)
        if not keep_thread:
            self.end_thread()
        size = self.batch_size
        bounds = [(start, min(start + size, len(values))) for start in range(0, len(values), size)]
        try:
            k = 0
            while k < len(bounds):
                # Every batch left in one hand-off; one that fails is isolated alone, then the
                # batches after it go on in another.
                returned, error = self._call_many(values, bounds[k:], stopping)
                for outputs in returned:
                    lo, hi = bounds[k]
                    try:
                        found[lo:hi] = self.checked_outputs(outputs, hi - lo)
                    except (_BatchFailed, ModelOutputError) as exc:
                        found[lo:hi] = [Failure(str(exc))] * (hi - lo)
                    k += 1
                if error is not None:
                    self._isolate(values, *bounds[k], found, wait, stopping, first=error)
                    k += 1
        except BaseException:
            self.end_thread()  # interrupted: its call may still run
            raise
        if not keep_thread:
            self.end_thread()
        if order is None:
            return found
        position = np.empty(len(order), dtype=np.intp)
        position[order] = np.arange(len(order))  # where each input's output is in ``found``
        return [found[i] for i in position.tolist()]

    def _sorts(self, count: int) -> bool:
        """Whether :meth:`compute` sorts ``count`` inputs by length: ``sort_by_length``, more
        than one batch (inputs of one batch are called together whatever their order), and a
        model not so cheap that less padding cannot pay for sorting (:data:`SORT_WORTH_SECONDS`;
        until a call was timed, it is sorted)."""
        return count > self.batch_size and self._sorting_pays(self._seconds_per_input)

    def _sorting_pays(self, cost: float | None) -> bool:
        """Whether this model sorts inputs by length at ``cost`` seconds an input (None: not
        timed yet): ``sort_by_length``, and not so cheap that less padding cannot pay for it."""
        return self.sort_by_length and (cost is None or cost >= SORT_WORTH_SECONDS)

    @property
    def batching(self) -> Batching | None:
        """How this model cuts a window into calls, once a call was timed; None where it does
        not sort its inputs by length (``sort_by_length`` off, or a model too cheap to gain
        from it: :data:`SORT_WORTH_SECONDS`), or before its first call.

        >>> m = Model("m", predict=lambda texts: [t.upper() for t in texts], batch_size=2)
        >>> m.batching is None
        True
        >>> _ = m.compute(["a", "bb", "ccc"], wait=lambda s: True)
        >>> m._seconds_per_input = 0.001  # as timed on a model that takes 1 ms an input
        >>> m.batching
        Batching(size=2, seconds_per_input=0.001)
        """
        cost = self._seconds_per_input
        return None if cost is None or not self._sorting_pays(cost) else Batching(self.batch_size, cost)

    def end_thread(self) -> None:
        """End the thread ``predict`` runs on for this thread's compute(): at once when it is
        idle; one whose call is still running (given up, or compute() interrupted) ends when
        ``predict`` returns. Nothing to do if there is none.

        >>> m = Model("m", predict=list)
        >>> m.compute(["a"], wait=lambda s: True, keep_thread=True)
        ['a']
        >>> m.end_thread()
        """
        caller, self._local.caller = getattr(self._local, "caller", None), None
        if caller is None:
            return
        caller.stop()
        with self._lock:
            running = self._in_flight  # compute() was interrupted (Ctrl-C) mid-call
            if running is not None:
                running.cancelled = True  # the batches after the one running are not called
        if running is None:
            caller.join()

    def wait_calls(self, timeout: float | None = None) -> bool:
        """Wait until no call of this model is running (a stuck call has returned).

        >>> Model("m", predict=list).wait_calls(timeout=1)
        True
        """
        with self._returned_calls:
            return self._returned_calls.wait_for(lambda: self._in_flight is None, timeout)

    def _isolate(
        self,
        values: list[Any],
        lo: int,
        hi: int,
        results: list[Any],
        wait: Callable[[float], bool],
        stopping: Callable[[], bool],
        first: BaseException | None = None,
    ) -> None:
        """Outputs of ``values[lo:hi]`` (one call of ``predict``) into ``results[lo:hi]``: a
        batch that raises is split in halves until the inputs that fail are alone. ``first``:
        what its call already raised (it is handled as if that call were made here)."""
        batch = values[lo:hi]
        attempt = transient_attempt = 0
        while True:
            try:
                if first is not None:
                    error, first = first, None
                    raise error
                outputs = self._call(batch, stopping)
            except (_BatchFailed, ModelOutputError) as exc:
                results[lo:hi] = [Failure(str(exc))] * (hi - lo)
                return
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
                if self.is_transient(exc):
                    delay = min(self.retry_backoff * 2**transient_attempt, MAX_RETRY_BACKOFF)
                    if transient_attempt < self.transient_retries and _pause(delay, wait, stopping):
                        transient_attempt += 1
                        with self._lock:
                            self.calls.transient_retries += 1
                        log.info("model %s: transient error (%s); trying the batch again", self.identifier, error)
                        continue
                    failure = Failure(f"{error} (transient; gave up after {transient_attempt} retries)")
                    results[lo:hi] = [failure] * (hi - lo)
                    return
                if hi - lo > 1:
                    middle = lo + (hi - lo) // 2
                    self._isolate(values, lo, middle, results, wait, stopping)
                    self._isolate(values, middle, hi, results, wait, stopping)
                    return
                if attempt < self.max_retries and wait(self.retry_backoff * 2**attempt):
                    attempt += 1
                    continue
                results[lo] = Failure(error)
                log.debug("model %s failed on one input", self.identifier, exc_info=True)
                return
            results[lo:hi] = outputs
            return

    def _call(self, values: list[Any], stopping: Callable[[], bool]) -> list[Any]:
        """One call of ``predict`` on its own thread; what it returned, checked."""
        returned, error = self._call_many(values, [(0, len(values))], stopping)
        if error is not None:
            raise error
        return self.checked_outputs(returned[0], len(values))

    def _call_many(
        self, values: list[Any], bounds: Sequence[tuple[int, int]], stopping: Callable[[], bool]
    ) -> tuple[list[Any], BaseException | None]:
        """Call ``predict`` on each range of ``values`` in ``bounds`` in turn, on this thread's
        caller thread, in one hand-off: what the calls that returned gave, in order, and what
        stopped them at the next range, if anything (its exception, or a :class:`_BatchFailed`:
        the call was given up, or could not be made)."""
        with self._lock:
            if self._in_flight is not None:
                stuck = self.calls.stuck
                since = f" since {stuck.since:%H:%M:%S} UTC" if stuck else ""
                return [], _BatchFailed(
                    f"model {self.identifier!r} is not called: a call given up earlier is still running{since}"
                )
            caller = getattr(self._local, "caller", None)
            if caller is None:
                caller = self._local.caller = _Caller(self)
                caller.start()
            call = self._in_flight = _Call(self, values, bounds, caller.name)
            self.calls.running = call.info
        caller.calls.put(call)
        abandoned = self._await(call, stopping)
        with self._lock:
            self.calls.running = None
            if abandoned is not None and self._in_flight is call:
                call.cancelled = True
                self.calls.stuck = dc.replace(call.info, abandoned=abandoned)
                # The caller runs on until predict returns, then ends; the next call gets another.
                self._local.caller = None
                caller.stop()
                return list(call.outputs), _BatchFailed(abandoned)
        if call.error is None and len(call.outputs) < len(bounds):
            return call.outputs, _BatchFailed(f"model {self.identifier!r}: its calls were cancelled")
        return call.outputs, call.error

    def _await(self, call: _Call, stopping: Callable[[], bool]) -> str | None:
        """Wait for ``call``'s ranges; why the one running was given up, or None once all returned
        (or one raised). Each range has its own deadlines: the timeout, and the grace of a stop."""
        batch = call.batch
        stop_deadline: float | None = None
        warned = False
        while True:
            started = call.started
            if call.batch != batch:  # the next range's call: deadlines of its own
                batch, stop_deadline, warned = call.batch, None, False
            deadline = None if self.timeout is None else started + self.timeout
            now = time.monotonic()
            slice_ = STOP_CHECK if deadline is None else max(0.0, min(STOP_CHECK, deadline - now))
            if call.done.wait(slice_):
                return None
            now = time.monotonic()
            if call.started != started:
                continue  # a range returned meanwhile: its deadline does not hold
            if deadline is not None and now >= deadline:
                with self._lock:
                    self.calls.timeouts += 1
                log.warning("model %s did not answer within %g s; its call goes on", self.identifier, self.timeout)
                return f"model {self.identifier!r} did not answer within {self.timeout:g} s"
            if stop_deadline is None and stopping():
                stop_deadline = now + STOP_GRACE
            if stop_deadline is not None and now >= stop_deadline:
                log.warning("model %s still running %g s into a stop; its call goes on", self.identifier, STOP_GRACE)
                return f"model {self.identifier!r} was still running when change data capture stopped"
            if not warned and now - call.started >= LONG_CALL:
                warned = True
                seconds = now - call.started
                log.warning("model %s has run for %.0f s on %d inputs", self.identifier, seconds, call.info.inputs)

    def _returned(self, call: _Call) -> None:
        """``call`` returned (on its own thread): the model may be called again."""
        with self._returned_calls:
            if self._in_flight is call:
                self._in_flight = None
                if self.calls.stuck is not None:
                    log.warning("model %s: a call given up earlier returned; outputs discarded", self.identifier)
                    self.calls.stuck = None
            self._returned_calls.notify_all()

    def checked_outputs(self, outputs: Any, count: int) -> list[Any]:
        """What ``predict`` returned for ``count`` inputs, as a list of one output per input, or a
        :class:`ModelOutputError` saying why it is not (a count mismatch fails the whole batch).

        Text, bytes, a mapping, a set and a data frame are refused though they iterate: their
        characters, keys, members in no promised order or column names are not one output per
        input, whatever their number (a one-column frame for one input would pass the count).
        """
        try:
            if isinstance(outputs, str | bytes | bytearray | Mapping | Set) or hasattr(outputs, "columns"):
                raise TypeError
            # A tensor of a batch's outputs as one numpy array: its rows are then numpy rows
            # (a batch of vectors stays one block), not a tensor each.
            outputs = list(from_tensor(outputs))
        except TypeError:
            if inspect.iscoroutine(outputs):
                outputs.close()  # never awaited: said here, not by a RuntimeWarning at exit
                raise ModelOutputError(
                    f"model {self.identifier!r} returned a coroutine, not a list of outputs: predict is async;"
                    " pass a plain function (e.g. one that calls asyncio.run)"
                ) from None
            raise ModelOutputError(
                f"model {self.identifier!r} returned {type(outputs).__name__}, not a list of outputs"
            ) from None
        if len(outputs) != count:
            raise ModelOutputError(f"model {self.identifier!r} returned {len(outputs)} outputs for {count} inputs")
        return outputs


def length_order(inputs: Sequence[Any]) -> Sequence[int]:
    """Indices of ``inputs`` longest first when they are all text (else in order); ties keep
    their order.

    >>> length_order(["a", "ccc", "bb", "dd"])
    [1, 2, 3, 0]
    >>> length_order([3, "ccc"])
    range(0, 2)
    >>> length_order([b"ab", "c", "def"])
    [2, 0, 1]
    """
    order = _length_order(inputs)
    return range(len(inputs)) if order is None else order.tolist()


def _length_order(inputs: Sequence[Any]) -> np.ndarray | None:
    """:func:`length_order` as an array, or None where the inputs keep their order."""
    if not set(map(type, inputs)) <= _TEXT_TYPES and not all(isinstance(v, str | bytes) for v in inputs):
        return None
    lengths = np.fromiter(map(len, inputs), dtype=np.int64, count=len(inputs))
    return np.argsort(-lengths, kind="stable")  # a stable sort: ties keep their order


_TEXT_TYPES = frozenset({str, bytes})


def _pause(seconds: float, wait: Callable[[float], bool], stopping: Callable[[], bool]) -> bool:
    """Sleep ``seconds`` in slices; False as soon as ``wait`` or ``stopping`` says to give up."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        if stopping() or not wait(min(left, STOP_CHECK)):
            return False
    return not stopping()

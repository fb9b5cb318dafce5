"""Where model work runs: the seam between the change handler and ``Model.compute``.

The handler never calls a model itself. It hands each batch's inputs to a :class:`Compute`
and gets a :class:`~concurrent.futures.Future` back, so that while the model computes one
window the handler reads the next and writes the one before (see ``reactive.handler``).
Futures may complete in any order; the handler writes windows in the order they arrived,
whatever order their futures finish in.

:class:`LocalCompute`, the default, runs the calls in this process on one thread,
``reactive-compute``, in the order they were submitted. :class:`RayCompute` runs them on Ray
actors (``pip install 'reactive-ml[ray]'``), many batches at once.

>>> from reactive.components.model import Model
>>> compute = LocalCompute()
>>> upper = Model("upper", predict=lambda xs: [x.upper() for x in xs])
>>> compute.submit(upper, ["a", "b"], wait=lambda s: True).result()
['A', 'B']
>>> compute.close()
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, Protocol

from reactive import checks
from reactive.errors import ComputeUnavailableError, ConfigurationError
from reactive.threads import ReactiveThread

if TYPE_CHECKING:
    from reactive.components.model import Model

log = logging.getLogger(__name__)


class Compute(Protocol):
    """Runs model work for the handler: the seam a remote executor (Ray) plugs into.

    ``submit`` returns at once with a future of ``model.compute(inputs, wait=, stopping=)``:
    a list of outputs aligned with ``inputs``, where an input that failed holds a
    :class:`~reactive.components.model.Failure`. ``close`` gives back what the executor
    holds (threads, actors); a submit after ``close`` starts it again.
    """

    def submit(
        self,
        model: Model,
        inputs: Sequence[Any],
        *,
        wait: Callable[[float], bool],
        stopping: Callable[[], bool] = lambda: False,
    ) -> Future[list[Any]]: ...

    def close(self, timeout: float | None = None) -> None: ...


_Job = tuple["Future[list[Any]]", "Model", Sequence[Any], Callable[[float], bool], Callable[[], bool]]


#: Seconds without model work after which each model's ``predict`` thread ends (see
#: :class:`LocalCompute`).
IDLE_RELEASE = 1.0


class _Worker(ReactiveThread):
    """Takes jobs off a queue and runs them one after the other, until ``None``; ends the
    models' ``predict`` threads after ``idle_release`` seconds without a job."""

    def __init__(self, jobs: queue.SimpleQueue[_Job | None], idle_release: float) -> None:
        super().__init__("compute")
        self.jobs = jobs
        self.idle_release = idle_release
        #: The models computed on this thread since it was last idle: each keeps its
        #: ``predict`` thread until then.
        self.models: dict[int, Model] = {}

    def on_stop(self) -> None:
        self.jobs.put(None)

    def _next(self) -> _Job | None:
        """The next job, once the models' threads were ended if none came for a while."""
        if self.models:
            try:
                return self.jobs.get(timeout=self.idle_release)
            except queue.Empty:
                self._release()
        return self.jobs.get()

    def _release(self) -> None:
        models, self.models = self.models, {}
        for model in models.values():
            model.end_thread()

    def run(self) -> None:
        try:
            while (job := self._next()) is not None:
                future, model, inputs, wait, stopping = job
                if not future.set_running_or_notify_cancel():
                    continue
                self.models[id(model)] = model
                try:
                    future.set_result(model.compute(inputs, wait=wait, stopping=stopping, keep_thread=True))
                except BaseException as exc:  # handed to whoever waits on the future
                    future.set_exception(exc)
        finally:
            self._release()


class LocalCompute:
    """Model work in this process, on one thread (``reactive-compute``), in submission order.

    One thread is enough: a model is never called twice at once (``Model`` guarantees it),
    and every call of ``predict`` already runs on its own thread so that a hung call can be
    given up. The thread starts at the first :meth:`submit` and ends at :meth:`close`, after
    the jobs submitted before it. Each model's ``predict`` thread is kept from window to window
    (``Model.compute(keep_thread=True)``: starting one costs about 0.1 ms a window) and ends
    once no work came for ``idle_release`` seconds (default :data:`IDLE_RELEASE`), or at
    :meth:`close`.

    Why it ends: what a framework keeps per thread lives as long as the thread. A thread that
    ran torch on the CPU keeps an OpenMP team, and while more OpenMP threads exist than cores,
    libgomp makes every team's workers sleep between operations instead of spinning: one query
    embedded by MiniLM on the application's thread took a median 15-19 ms beside reactive's
    idle thread kept, 12-16 ms once it was ended (2 cores); the same 24 batches on one thread
    took 25% longer beside another that had run torch once. Ended when idle, reactive's thread
    slows the application's model calls only while reactive computes.
    """

    def __init__(self, idle_release: float = IDLE_RELEASE) -> None:
        self.idle_release = float(checks.seconds("idle_release", idle_release))
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._worker: _Worker | None = None

    def __repr__(self) -> str:
        return f"LocalCompute(idle_release={self.idle_release})"

    def submit(
        self,
        model: Model,
        inputs: Sequence[Any],
        *,
        wait: Callable[[float], bool],
        stopping: Callable[[], bool] = lambda: False,
    ) -> Future[list[Any]]:
        future: Future[list[Any]] = Future()
        with self._lock:
            if self._worker is None:
                self._worker = _Worker(self._jobs, self.idle_release)
                self._worker.start()
            self._jobs.put((future, model, inputs, wait, stopping))
        return future

    def close(self, timeout: float | None = None) -> None:
        """Run what was submitted, then end the thread (waiting up to ``timeout``)."""
        with self._lock:
            worker, self._worker = self._worker, None
            if worker is None:
                return
            self._jobs = queue.SimpleQueue()
            worker.stop()
        worker.join(timeout)
        if worker.is_alive():
            log.error("thread %s did not stop within %s s", worker.name, timeout)


class _ModelActor:
    """A Ray actor holding one model: built once (``load`` runs here), then called per batch."""

    def __init__(self, model: Model) -> None:
        self.model = model

    def ready(self) -> bool:
        self.model.predict  # noqa: B018 - load() runs now, so a broken loader fails the start
        return True

    def compute(self, inputs: list[Any]) -> list[Any]:
        # Errors are isolated per input here, exactly as in-process (Model.compute).
        return self.model.compute(inputs, wait=_sleep)


def _sleep(seconds: float) -> bool:
    threading.Event().wait(seconds)
    return True


#: Calls per actor a window's inputs are cut into: each call computes several of the model's
#: batches (fewer calls, each ~0.7 ms of Ray's own work), and each actor still gets several
#: calls per window, so actors finish a window together.
CALLS_PER_ACTOR = 4


class RayCompute:
    """Model work on Ray actors: many batches in flight, on this machine or a cluster.

    ``address`` is passed to ``ray.init`` when this process has no Ray instance yet (None:
    start a local one, shut down again by :meth:`close`); an instance the application started
    is used and left running. Each model gets ``actors`` actors, each asking for ``num_cpus``
    CPUs and ``num_gpus`` GPUs; the model is sent once per actor (``Model(load=...)`` builds it
    there). A window's inputs are ordered as in process (longest texts first), cut into
    :data:`CALLS_PER_ACTOR` calls per actor of whole model batches each (the actor cuts them
    into the model's batches as in process), and spread over the actors, at most
    ``max_in_flight`` calls at once (default: two per actor, so each actor has its next call
    waiting), the rest queued in this process oldest window first; :meth:`submit` itself never
    waits. Results come back in input order.

    Faults: an actor that dies mid-batch (killed, out of memory) is restarted by Ray and its
    batch run again; a cluster that cannot be reached fails the window with
    :class:`~reactive.errors.ComputeUnavailableError`, which the handler retries with backoff
    like an unreachable database; a model's own errors are isolated per row as in process.
    Actors that cannot be placed (too few CPUs or GPUs) fail the first batch with a
    ``ConfigurationError`` after ``placement_timeout`` seconds instead of hanging; a Ray
    ``address`` that does not answer within it is retried like an unreachable cluster.

    Ray moves the inputs and outputs with its own serialization, between its own processes;
    ``reactive`` unpickles nothing read from the database.
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        actors: int = 1,
        num_cpus: float = 1,
        num_gpus: float = 0,
        max_in_flight: int | None = None,
        placement_timeout: float = 60.0,
        init_options: dict[str, Any] | None = None,
        actor_options: dict[str, Any] | None = None,
    ) -> None:
        actors = checks.whole("actors", actors, least=1)
        num_cpus = checks.number("num_cpus", num_cpus)
        num_gpus = checks.number("num_gpus", num_gpus)
        if max_in_flight is not None:
            max_in_flight = checks.whole("max_in_flight", max_in_flight, least=1)
        placement_timeout = checks.seconds("placement_timeout", placement_timeout)
        self.address = address
        self.actors = actors
        self.num_cpus = num_cpus
        self.num_gpus = num_gpus
        self.max_in_flight = max_in_flight or 2 * actors
        self.placement_timeout = placement_timeout
        self.init_options = dict(init_options or {})
        #: More options of each actor (``runtime_env``, ``resources``, ``scheduling_strategy``...).
        self.actor_options = dict(actor_options or {})
        self._lock = threading.Lock()
        #: Held while a model's actors start (see _pool).
        self._starting = threading.Lock()
        #: The thread that started Ray and keeps it (see _RayOwner), while this executor owns it.
        self._owner: _RayOwner | None = None
        #: Per model identifier: the model object the actors were built from, and the actors.
        self._pools: dict[str, tuple[Model, list[Any]]] = {}
        self._next = 0
        #: Batches waiting for a free slot: (actors, inputs, what to call when done).
        self._pending: deque[tuple[list[Any], list[Any], Callable[[Future[list[Any]]], None]]] = deque()
        self._in_flight = 0
        #: What to call when each batch in flight is done (see _settle); close() calls them.
        self._running: set[Callable[[Future[list[Any]]], None]] = set()
        #: Set by close(), until a submit that is not a stop's: a handler that outlived its
        #: stop's timeout gets errors then, and starts neither Ray nor actors again.
        self._closed = False

    def __repr__(self) -> str:
        return f"RayCompute(actors={self.actors}, num_cpus={self.num_cpus}, num_gpus={self.num_gpus})"

    def _ray(self, stopping: Callable[[], bool]) -> Any:
        """Ray, started (or connected to, at ``address``) when this process has no instance.

        ``ray.init`` at an address nothing answers tries for about fourteen minutes before it
        raises, and cannot be interrupted: it is waited for at most ``placement_timeout`` seconds
        (less once ``stopping()``), then the window is retried, as while a database is
        unreachable; the next try waits for the same ``ray.init``."""
        try:
            import ray
        except ImportError:  # pragma: no cover - the ray extra is installed with the tests
            raise ConfigurationError("RayCompute needs Ray: pip install 'reactive-ml[ray]'") from None
        with self._lock:
            owner = self._owner
            if owner is None:
                if ray.is_initialized():
                    return ray  # the application's instance
                options = {"include_dashboard": False, "log_to_driver": False, **self.init_options}
                owner = self._owner = _RayOwner(self.address, options)
                owner.start()
        deadline = time.monotonic() + self.placement_timeout
        while not owner.ready.wait(min(0.1, max(0.0, deadline - time.monotonic()))):
            if stopping() or time.monotonic() >= deadline:
                raise ComputeUnavailableError(
                    f"Ray at {self.address or 'a new local instance'} did not answer within "
                    f"{self.placement_timeout:g} s (ray.init goes on)"
                )
        if owner.error is not None:
            with self._lock:
                if self._owner is owner:
                    self._owner = None  # the next try starts again
            if isinstance(owner.error, ConnectionError):
                raise ComputeUnavailableError(f"Ray at {self.address}: {owner.error}") from owner.error
            raise owner.error
        return ray

    def _pool(self, model: Model, stopping: Callable[[], bool]) -> list[Any]:
        """The actors of ``model`` (started at its first batch, again if the model was replaced).

        Actors start under their own lock, not the one ``_pump`` takes: other models' batches
        keep flowing while these wait to be placed (up to ``placement_timeout``)."""
        with self._starting:
            ray = self._ray(stopping)
            with self._lock:
                pool = self._pools.get(model.identifier)
            if pool is not None and pool[0] is model:
                return pool[1]
            if pool is not None:
                for actor in pool[1]:
                    ray.kill(actor)
            needed = {"CPU": self.num_cpus * self.actors, "GPU": self.num_gpus * self.actors}
            total = ray.cluster_resources()
            short = {k: v for k, v in needed.items() if v > total.get(k, 0)}
            if short:
                have = ", ".join(f"{total.get(k, 0):g} {k}" for k in short)
                raise ConfigurationError(
                    f"RayCompute asks for {self.actors} actors x {self.num_cpus:g} CPU / {self.num_gpus:g} GPU for "
                    f"model {model.identifier!r}; the Ray cluster has {have}"
                )
            options = {"max_restarts": -1, "max_task_retries": -1, **self.actor_options}
            remote = ray.remote(num_cpus=self.num_cpus, num_gpus=self.num_gpus, **options)(_ModelActor)
            actors = []
            try:
                actors.extend(remote.remote(model) for _ in range(self.actors))
            except TypeError as exc:  # Ray's report of what it could not serialize: 2 kB of it
                for actor in actors:
                    ray.kill(actor)
                cause = exc.__cause__ or exc
                raise ConfigurationError(
                    f"model {model.identifier!r} cannot be sent to its Ray actors ({str(cause).splitlines()[0]}): "
                    "build what cannot be pickled inside the actor, with Model(load=...)"
                ) from exc
            try:
                ray.get([actor.ready.remote() for actor in actors], timeout=self.placement_timeout)
            except ray.exceptions.GetTimeoutError:
                for actor in actors:
                    ray.kill(actor)
                raise ConfigurationError(
                    f"the actors of model {model.identifier!r} were not placed within {self.placement_timeout:g} s "
                    "(the Ray cluster's CPUs or GPUs are taken)"
                ) from None
            with self._lock:
                self._pools[model.identifier] = (model, actors)
            return actors

    def actors_of(self, identifier: str) -> list[Any]:
        """The actor handles running model ``identifier`` (none before its first batch)."""
        with self._lock:
            pool = self._pools.get(identifier)
            return list(pool[1]) if pool else []

    def _forget(self, model: Model, actors: list[Any]) -> None:
        """Actors Ray could not keep alive: the next batch of ``model`` starts new ones."""
        with self._lock:
            pool = self._pools.get(model.identifier)
            if pool is not None and pool[1] is actors:
                del self._pools[model.identifier]

    def submit(
        self,
        model: Model,
        inputs: Sequence[Any],
        *,
        wait: Callable[[float], bool],
        stopping: Callable[[], bool] = lambda: False,
    ) -> Future[list[Any]]:
        from reactive.components.model import length_order

        outer: Future[list[Any]] = Future()
        outer.set_running_or_notify_cancel()
        if not inputs:
            outer.set_result([])
            return outer
        stopping_now = stopping()
        with self._lock:
            if not stopping_now:
                self._closed = False
            closed = self._closed
        if closed:
            outer.set_exception(_closed_error(model))
            return outer
        try:
            actors = self._pool(model, stopping)
        except Exception as exc:
            outer.set_exception(exc)
            return outer
        order = list(length_order(inputs) if model.sort_by_length else range(len(inputs)))
        batches = -(-len(order) // model.batch_size)
        # Each call computes several of the model's batches, in order (Model.compute cuts them
        # again on the actor, the same way): Ray costs about 0.7 ms per call.
        step = model.batch_size * max(1, -(-batches // (CALLS_PER_ACTOR * len(actors))))
        parts = [order[start : start + step] for start in range(0, len(order), step)]
        results: list[Any] = [None] * len(inputs)
        remaining = [len(parts)]
        lock = threading.Lock()

        def settled(indices: list[int], future: Future[list[Any]]) -> None:
            error = future.exception()
            with lock:
                if outer.done():
                    return
                if error is not None:
                    error = _compute_error(error, model)
                    if isinstance(error, ComputeUnavailableError):
                        self._forget(model, actors)
                    outer.set_exception(error)
                    return
                for index, output in zip(indices, future.result(), strict=True):
                    results[index] = output
                remaining[0] -= 1
                if remaining[0] == 0:
                    outer.set_result(results)

        with self._lock:
            for indices in parts:
                self._pending.append((actors, [inputs[i] for i in indices], functools.partial(settled, indices)))
        self._pump()
        return outer

    def _pump(self) -> None:
        """Send waiting batches, oldest first, while fewer than ``max_in_flight`` compute."""
        while True:
            with self._lock:
                if self._in_flight >= self.max_in_flight or not self._pending:
                    return
                actors, batch, settled = self._pending.popleft()
                actor = actors[self._next % len(actors)]
                self._next += 1
                self._in_flight += 1
                self._running.add(settled)
            try:
                future = actor.compute.remote(batch).future()
            except Exception as exc:  # the cluster is gone: this batch fails, the window is retried
                future = Future()
                future.set_exception(exc)
            future.add_done_callback(functools.partial(self._settle, settled))

    def _settle(self, settled: Callable[[Future[list[Any]]], None], future: Future[list[Any]]) -> None:
        """A batch in flight is done: free its slot, send the next, hand its result on (unless
        close() gave it up already)."""
        with self._lock:
            if settled not in self._running:
                return
            self._running.discard(settled)
            self._in_flight -= 1
        self._pump()
        settled(future)

    def close(self, timeout: float | None = None) -> None:
        """Shut Ray down if this executor started it (its actors end with it); otherwise kill
        this executor's actors and return once Ray has (waiting up to ``timeout``, default
        :data:`KILL_SECONDS`: ``ray.kill`` only asks), leaving the application's Ray running."""
        with self._lock:
            pools, self._pools = self._pools, {}
            owner, self._owner = self._owner, None
            # Nothing computes them any more: whoever waits for them (a handler that outlived
            # its stop's timeout) gets an error rather than waiting for ever.
            dropped = [settled for _, _, settled in self._pending] + list(self._running)
            self._pending.clear()
            self._running.clear()
            self._in_flight = 0
            self._closed = True
        for settled in dropped:
            failed: Future[list[Any]] = Future()
            failed.set_exception(ComputeUnavailableError("RayCompute was closed before this batch was computed"))
            settled(failed)
        if owner is not None:
            owner.stop()
            if owner.ready.is_set():
                owner.join(timeout)
            else:  # ray.init cannot be interrupted: the thread shuts Ray down once it returns
                log.warning(
                    "Ray at %s has not answered; thread %s ends when ray.init gives up", self.address, owner.name
                )
            return
        if not pools:
            return
        import ray

        if not ray.is_initialized():
            return
        actors = [actor for _, pool in pools.values() for actor in pool]
        for actor in actors:
            ray.kill(actor)
        deadline = time.monotonic() + (KILL_SECONDS if timeout is None else timeout)
        for actor in actors:
            _wait_killed(ray, actor, deadline)


class _RayOwner(ReactiveThread):
    """Starts a local Ray instance (``ray.init``) and keeps it until stopped, then shuts it down.

    Ray starts its own processes (GCS, raylet) with ``PR_SET_PDEATHSIG``: they are killed when
    the *thread* that started them ends, not the process. Started on the handler's thread, they
    died with it: a close after the handler's stop found no raylet and waited 30 s for its
    actors, and a handler replaced after a failure would have met a dead cluster. This thread
    lives as long as the instance.
    """

    def __init__(self, address: str | None, options: dict[str, Any]) -> None:
        super().__init__("ray")
        self.address = address
        self.options = options
        #: Set once ``ray.init`` returned or raised (then ``error`` holds what it raised).
        self.ready = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        import ray

        try:
            ray.init(address=self.address, **self.options)
        except BaseException as exc:  # handed to RayCompute._ray's caller
            self.error = exc
            return
        finally:
            self.ready.set()
        try:
            self.stopped_event.wait()
        finally:
            ray.shutdown()


#: How long :meth:`RayCompute.close` waits for Ray to kill its actors, by default.
KILL_SECONDS = 30.0


def _wait_killed(ray: Any, actor: Any, deadline: float) -> None:
    """Return once ``actor`` no longer answers (Ray has killed it), or at ``deadline``."""
    while (left := deadline - time.monotonic()) > 0:
        try:
            ray.get(actor.ready.remote(), timeout=left)
        except ray.exceptions.RayActorError:
            return
        except ray.exceptions.GetTimeoutError:
            break
    log.warning("Ray did not kill actor %s within the deadline", actor)


def _closed_error(model: Model) -> ComputeUnavailableError:
    return ComputeUnavailableError(
        f"RayCompute was closed: model {model.identifier!r} is not computed while change data capture stops"
    )


def _compute_error(error: BaseException, model: Model) -> BaseException:
    """An error of Ray's own (an actor or node gone, the cluster unreachable) as the transient
    ComputeUnavailableError; a bug in the actor as itself."""
    import ray.exceptions

    if isinstance(error, ray.exceptions.RayTaskError):
        return error
    if isinstance(error, ray.exceptions.RayError | ConnectionError):
        return ComputeUnavailableError(f"Ray could not run model {model.identifier!r}: {error}")
    return error

"""Where model work runs: the seam between the change handler and ``Model.compute``.

The handler never calls a model itself. It hands each batch's inputs to a :class:`Compute`
and gets a :class:`~concurrent.futures.Future` back, so that while the model computes one
window the handler reads the next and writes the one before (see ``reactive.handler``).
Futures may complete in any order; the handler writes windows in the order they arrived,
whatever order their futures finish in.

:class:`LocalCompute`, the default, runs the calls in this process on one thread,
``reactive-compute``, in the order they were submitted.

>>> from reactive.components.model import Model
>>> compute = LocalCompute()
>>> upper = Model("upper", predict=lambda xs: [x.upper() for x in xs])
>>> compute.submit(upper, ["a", "b"], wait=lambda s: True).result()
['A', 'B']
>>> compute.close()
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, Protocol

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


class _Worker(ReactiveThread):
    """Takes jobs off a queue and runs them one after the other, until ``None``."""

    def __init__(self, jobs: queue.SimpleQueue[_Job | None]) -> None:
        super().__init__("compute")
        self.jobs = jobs

    def on_stop(self) -> None:
        self.jobs.put(None)

    def run(self) -> None:
        while (job := self.jobs.get()) is not None:
            future, model, inputs, wait, stopping = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(model.compute(inputs, wait=wait, stopping=stopping))
            except BaseException as exc:  # handed to whoever waits on the future
                future.set_exception(exc)


class LocalCompute:
    """Model work in this process, on one thread (``reactive-compute``), in submission order.

    One thread is enough: a model is never called twice at once (``Model`` guarantees it),
    and every call of ``predict`` already runs on its own thread so that a hung call can be
    given up. The thread starts at the first :meth:`submit` and ends at :meth:`close`, after
    the jobs submitted before it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._worker: _Worker | None = None

    def __repr__(self) -> str:
        return "LocalCompute()"

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
                self._worker = _Worker(self._jobs)
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

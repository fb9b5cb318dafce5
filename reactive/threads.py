"""The one thread base class every ``reactive`` thread derives from."""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from typing import Any, TypeVar

THREAD_PREFIX = "reactive-"

log = logging.getLogger(__name__)

T = TypeVar("T")


class ReactiveThread(threading.Thread):
    """A named daemon thread with a stop event.

    Subclasses loop ``while self.should_keep_running()`` and wait with
    ``self.wait(seconds)``, never ``time.sleep``, so :meth:`stop` takes effect at once.

    >>> class Ticker(ReactiveThread):
    ...     def run(self):
    ...         while self.should_keep_running():
    ...             self.wait(60)
    >>> t = Ticker("ticker"); t.start(); t.stop(); t.join(1); t.is_alive()
    False
    """

    def __init__(self, role: str) -> None:
        super().__init__(name=f"{THREAD_PREFIX}{role}", daemon=True)
        self._stopped_event = threading.Event()

    @property
    def stopped_event(self) -> threading.Event:
        return self._stopped_event

    def should_keep_running(self) -> bool:
        return not self._stopped_event.is_set()

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; return False at once when the thread is being stopped."""
        return not self._stopped_event.wait(seconds)

    def stop(self) -> None:
        """Ask the thread to stop; :meth:`on_stop` wakes anything it may be blocked on."""
        self._stopped_event.set()
        self.on_stop()

    def on_stop(self) -> None:
        """Hook: wake the thread from whatever it blocks on besides :meth:`wait`."""


def reactive_threads() -> list[threading.Thread]:
    """Every live thread that ``reactive`` started."""
    return [t for t in threading.enumerate() if t.name.startswith(THREAD_PREFIX)]


def on_own_thread(role: str, fn: Callable[[], T], *, timeout: float | None = None) -> T:
    """``fn()`` run on a thread of its own (``reactive-<role>``) that ends with it: what returns
    or raises. What a framework keeps per thread goes with the thread: torch on the CPU keeps an
    OpenMP team per thread that ran it, and while more OpenMP threads live than there are cores,
    libgomp makes every team's workers sleep between operations (see ``LocalCompute``).
    ``TimeoutError`` when ``fn`` has not returned within ``timeout`` seconds (its thread, a
    daemon, goes on until it does).

    >>> on_own_thread("doc", lambda: threading.current_thread().name)
    'reactive-doc'
    >>> on_own_thread("doc", lambda: 1 / 0)
    Traceback (most recent call last):
    ...
    ZeroDivisionError: division by zero
    >>> on_own_thread("doc", lambda: 2, timeout=math.inf)
    2
    """
    outcome: list[Any] = []

    class _Once(ReactiveThread):
        def run(self) -> None:
            try:
                outcome.append((True, fn()))
            except BaseException as exc:  # handed to the caller
                outcome.append((False, exc))

    thread = _Once(role)
    thread.start()
    thread.join(None if timeout is None or math.isinf(timeout) else timeout)  # join(inf) overflows
    if thread.is_alive():
        raise TimeoutError(f"did not return within {timeout:g} s")
    [(returned, value)] = outcome
    if not returned:
        raise value
    return value

"""The shared, bounded change-data-capture queue."""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Generic, Protocol, TypeVar

from reactive.errors import QueueClosedError

#: The queue's default bound, in rows: one of the handler's largest windows (50,000 rows;
#: see ``reactive.handler.WindowRows``), so that a window can fill while the one before it
#: is written (100,000 was no faster; 20,000 was 13% slower on a bulk load). Rows that
#: carry large documents (MongoDB, Kinetica) may want a lower bound: it counts rows, not bytes.
QUEUE_ROWS = 50_000


class Sized(Protocol):
    def __len__(self) -> int: ...


#: What the queue holds: change packets, or anything whose ``len`` is the rows it counts for
#: (the change feed's committed windows).
P = TypeVar("P", bound=Sized)


class CDCQueue(Generic[P]):
    """A FIFO of :class:`~reactive.events.ChangePacket` (or other sized items) bounded by the
    rows it holds.

    A full queue blocks producers (backpressure): a change is never dropped and memory never
    grows past ``max_rows`` (plus one packet, so a packet larger than the bound still passes
    when the queue is empty). The consumer marks every packet it takes with :meth:`task_done`;
    :meth:`join` waits until everything put so far has been processed.

    >>> from reactive.events import ChangePacket
    >>> q = CDCQueue(max_rows=10)
    >>> q.put(ChangePacket("t", "insert", (1, 2)))  # True had it waited for room
    False
    >>> [len(p) for p in q.get_batch(max_rows=100)], q.rows
    ([2], 0)
    """

    def __init__(self, max_rows: int = QUEUE_ROWS) -> None:
        if max_rows < 1:
            raise ValueError("max_rows must be at least 1")
        self.max_rows = max_rows
        self._packets: deque[P] = deque()
        self._rows = 0
        self._unfinished = 0
        self._closed = False
        #: Set by :meth:`wake_consumer`: the waiting (or next) :meth:`get_batch` returns at once.
        self._wake = False
        self._lock = threading.Lock()
        self._not_empty = threading.Condition(self._lock)
        self._not_full = threading.Condition(self._lock)
        self._all_done = threading.Condition(self._lock)
        self.put_packets = 0
        self.put_rows = 0
        self.blocked_seconds = 0.0

    @property
    def rows(self) -> int:
        return self._rows

    @property
    def packets(self) -> int:
        return len(self._packets)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def idle(self) -> bool:
        """Whether every packet put so far has been processed."""
        return self._unfinished == 0

    def put(self, packet: P, *, abandon: threading.Event | None = None) -> bool:
        """Append ``packet``, waiting while the queue is full; whether it had to wait.

        Raises :class:`~reactive.errors.QueueClosedError` when the queue is closed, or when
        ``abandon`` is set while waiting (a producer that is being stopped).
        """
        with self._not_full:
            started = None
            while self._rows and self._rows + len(packet) > self.max_rows:
                if self._closed or (abandon is not None and abandon.is_set()):
                    break
                started = started or time.monotonic()
                self._not_full.wait()
            if started is not None:
                self.blocked_seconds += time.monotonic() - started
            if self._closed:
                raise QueueClosedError("the change queue is closed")
            if abandon is not None and abandon.is_set():
                raise QueueClosedError("the producer is stopping")
            self._packets.append(packet)
            self._rows += len(packet)
            self._unfinished += 1
            self.put_packets += 1
            self.put_rows += len(packet)
            self._not_empty.notify()
            return started is not None

    def get_batch(self, *, max_rows: int, timeout: float | None = None) -> list[P]:
        """Wait for at least one packet, then take every waiting packet up to ``max_rows``.

        There is no fixed wait: one change on an idle queue is returned at once, and under
        load the batch grows to whatever has accumulated. Returns ``[]`` when the queue is
        closed and empty, when ``timeout`` passes, or when :meth:`wake_consumer` was called.
        """
        with self._not_empty:
            if not self._packets and not self._closed and not self._wake:
                self._not_empty.wait(timeout)
            self._wake = False
            taken: list[P] = []
            rows = 0
            while self._packets and (not taken or rows + len(self._packets[0]) <= max_rows):
                packet = self._packets.popleft()
                taken.append(packet)
                rows += len(packet)
            self._rows -= rows
            if taken:
                self._not_full.notify_all()
            return taken

    def task_done(self, count: int = 1) -> None:
        """Mark ``count`` packets taken with :meth:`get_batch` as processed."""
        with self._lock:
            self._unfinished -= count
            if self._unfinished <= 0:
                self._unfinished = 0
                self._all_done.notify_all()

    def join(self, timeout: float | None = None) -> bool:
        """Wait until every packet put so far is processed; False if ``timeout`` passed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._all_done:
            while self._unfinished:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._all_done.wait(remaining)
            return True

    def wait_closed(self, timeout: float) -> bool:
        """Wait until the queue is closed, at most ``timeout`` seconds; whether it is (a pause
        of the consumer's that a stop cuts short)."""
        with self._not_empty:
            return self._not_empty.wait_for(lambda: self._closed, timeout)

    def wake_consumer(self) -> None:
        """Make the consumer's waiting :meth:`get_batch` return, empty-handed if nothing is queued
        (the handler waits for packets and for its model work at once; this says work finished)."""
        with self._lock:
            self._wake = True
            self._not_empty.notify_all()

    def wake_producers(self) -> None:
        """Wake blocked producers so they can notice their ``abandon`` event."""
        with self._lock:
            self._not_full.notify_all()

    def close(self) -> None:
        """Refuse new packets and wake everyone; what is queued can still be taken."""
        with self._lock:
            self._closed = True
            self._not_empty.notify_all()
            self._not_full.notify_all()

    def reopen(self) -> None:
        with self._lock:
            self._closed = False

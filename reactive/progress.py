"""How a backfill (``db.add``) or a catch-up reports its progress.

``progress=True`` (the default): a tqdm bar on the terminal (rows done, the total, the rate and
the time left) when standard error is one, and plain log lines otherwise (logger
``reactive.progress``, level INFO: a line when it starts, one every :data:`LOG_EVERY` seconds,
one when it is done). ``progress=False``: nothing. A callable is called with ``(rows done,
rows in the table)`` after each packet of rows is processed, as before.

The total starts as the rows in the table; once the reconciliation has queued everything (it
compares the table with the stored outputs as it goes), it becomes the rows actually queued,
which is fewer when most outputs are current already (a resumed backfill).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO

log = logging.getLogger(__name__)

#: Seconds between two log lines of a backfill without a terminal.
LOG_EVERY = 10.0

Callback = Callable[[int, int], None]


class Progress:
    """Reports one backfill: ``update(rows done)``, ``set_total(rows)``, then ``close()``."""

    def __init__(self, identifier: str, total: int) -> None:
        self.identifier = identifier
        self.total = total
        self.rows = 0
        self.started = time.monotonic()

    def update(self, rows: int) -> None:
        self.rows = rows

    def set_total(self, total: int) -> None:
        self.total = total

    def close(self, *, done: bool) -> None:
        """The backfill ended (``done``: every row processed; else it failed or was interrupted)."""


class Silent(Progress):
    """``progress=False``."""


class CallbackProgress(Progress):
    """``progress=callable``: called with ``(rows done, rows in the table)``."""

    def __init__(self, identifier: str, total: int, callback: Callback) -> None:
        super().__init__(identifier, total)
        self.table_rows = total
        self.callback = callback

    def update(self, rows: int) -> None:
        super().update(rows)
        self.callback(rows, self.table_rows)


class LogProgress(Progress):
    """Plain log lines: the start, one every :data:`LOG_EVERY` seconds, the end."""

    def __init__(self, identifier: str, total: int) -> None:
        super().__init__(identifier, total)
        self._last = self.started
        self._lock = threading.Lock()
        log.info("backfill %s: started (table has %s rows)", identifier, f"{total:,}")

    def update(self, rows: int) -> None:
        super().update(rows)
        now = time.monotonic()
        with self._lock:
            if now - self._last < LOG_EVERY:
                return
            self._last = now
        log.info("backfill %s: %s", self.identifier, describe(rows, self.total, now - self.started))

    def close(self, *, done: bool) -> None:
        elapsed = time.monotonic() - self.started
        rate = f", {_rate(self.rows, elapsed)}" if self.rows else ""
        if done:
            log.info("backfill %s: done, %s rows in %.1f s%s", self.identifier, f"{self.rows:,}", elapsed, rate)
        else:
            log.info("backfill %s: stopped after %s rows", self.identifier, f"{self.rows:,}")


class BarProgress(Progress):
    """A tqdm bar on ``stream`` (a terminal)."""

    def __init__(self, identifier: str, total: int, stream: TextIO) -> None:
        super().__init__(identifier, total)
        from tqdm import tqdm

        self.bar: Any = tqdm(
            total=total,
            desc=f"backfill {identifier}",
            unit="rows",
            file=stream,
            dynamic_ncols=True,
            mininterval=0.2,
            leave=True,
        )
        self._lock = threading.Lock()

    def update(self, rows: int) -> None:
        with self._lock:
            if rows > self.bar.total:
                self.bar.total = rows
            self.bar.update(rows - self.bar.n)
            self.rows = rows

    def set_total(self, total: int) -> None:
        with self._lock:
            self.total = total
            self.bar.total = max(total, self.bar.n)
            self.bar.refresh()

    def close(self, *, done: bool) -> None:
        with self._lock:
            if done:
                self.bar.total = self.bar.n  # whatever the estimate was, it is complete
            self.bar.close()


def progress_for(identifier: str, total: int, progress: bool | Callback, *, stream: TextIO | None = None) -> Progress:
    """The :class:`Progress` that ``progress`` (``db.add``'s option) asks for."""
    if callable(progress):
        return CallbackProgress(identifier, total, progress)
    if not progress:
        return Silent(identifier, total)
    stream = sys.stderr if stream is None else stream
    if _is_terminal(stream):
        return BarProgress(identifier, total, stream)
    return LogProgress(identifier, total)


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # replaced by an object without it, or closed
        return False


def describe(rows: int, total: int, elapsed: float) -> str:
    """A log line's progress: rows done of the total, the rate, the time left.

    >>> describe(2_500, 10_000, 2.0)
    '2,500 of 10,000 rows (25%), 1,250 rows/s, about 6 s left'
    >>> describe(0, 0, 1.0)
    '0 of 0 rows'
    """
    text = f"{rows:,} of {total:,} rows"
    if total:
        text += f" ({min(rows / total, 1.0):.0%})"
    if rows and elapsed > 0:
        text += f", {_rate(rows, elapsed)}"
        if total > rows:
            text += f", about {(total - rows) * elapsed / rows:,.0f} s left"
    return text


def _rate(rows: int, elapsed: float) -> str:
    return f"{rows / max(elapsed, 1e-9):,.0f} rows/s"

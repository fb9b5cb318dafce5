"""``TableMonitor``: Kinetica's table monitor API (``GPUdbTableMonitor``) on every backend.

Code written for ``gpudb.GPUdbTableMonitor`` ports by changing its import and the ``db`` it
passes: ``db`` is a ``reactive`` datalayer of any backend (DuckDB, SQLite, PostgreSQL,
MongoDB, Kinetica).

>>> import duckdb, tempfile, threading, reactive
>>> from reactive import TableMonitor
>>> path = tempfile.mkdtemp() + "/app.duckdb"
>>> client = duckdb.connect(path)       # any other client of the database
>>> _ = client.execute("create table docs (id int primary key, text varchar)")
>>> seen, got = [], threading.Event()
>>> def on_insert(row):
...     seen.append(row["text"]); got.set()
>>> with reactive.connect(f"duckdb:///{path}", poll_interval=0.05) as db:
...     monitor = TableMonitor.Client(db, "docs", [
...         TableMonitor.Callback(TableMonitor.Callback.Type.INSERT_DECODED, on_insert)])
...     monitor.start_monitor()
...     _ = client.execute("insert into docs values (1, 'hello')")
...     _ = got.wait(10)
...     monitor.stop_monitor()
>>> seen
['hello']

How it differs from the official client, on purpose:

- A monitor is a thin adapter over the datalayer's change listener (``db.cdc``): it adds no
  second way of capturing changes. On Kinetica each event type the callbacks ask for gets its
  own server-side table monitor, as with the official client; on polling backends the monitor
  sees what differs between two polls (an insert and a delete of the same row between polls
  are not seen at all); on MongoDB and Kinetica every event is seen as the server reports it
  (an insert followed by a delete is two callbacks).
- Callbacks run on the monitor's own named thread (``reactive-monitor-<table>``), fed by a
  bounded queue: a slow callback never runs on the change listener's thread, and a full
  queue makes the change listener wait (backpressure); nothing is dropped.
- A callback that raises is not retried: the exception text goes to that callback's
  ``error_callback`` and monitoring goes on.
- Decoding (Kinetica): a frame that does not decode reloads the table's type once; if the
  type changed, TABLE_ALTERED is called and decoding goes on with the new type. If the frame
  still does not decode: SKIP logs it, calls the INSERT_DECODED ``error_callback`` and goes
  on; ABORT calls the ``error_callback``, then TABLE_ALTERED, then stops the monitor.
- TABLE_DROPPED is called once per monitor, then the monitor stops itself.
- ``stop_monitor()`` returns after the server-side monitors are cleared and the thread has
  ended; calling it again, or after the monitor stopped itself, does nothing.
- Beyond the seed: ``Callback.ChangedRowsOptions()`` on an UPDATED or DELETED callback gives
  it the updated rows (a list of dicts) or the deleted ids (a list) instead of a count, where
  the backend knows them (SQL backends, MongoDB; Kinetica's monitors report counts only).
"""

from __future__ import annotations

import contextlib
import enum
import json
import logging
import math
import queue
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from reactive.backends.base import TableInfo
from reactive.errors import ConfigurationError, MissingIdColumnError, ReactiveError
from reactive.events import DBEvent, SourceChange
from reactive.threads import ReactiveThread

if TYPE_CHECKING:
    from reactive.datalayer import Datalayer
    from reactive.rowformat import RowFormat

log = logging.getLogger(__name__)

#: Changes a monitor may hold before the change listener waits for its callbacks.
QUEUE_SIZE = 10_000


class MonitorSink(Protocol):
    """What a change listener delivers to: the engine side of one table monitor."""

    #: The events whose changes it wants.
    events: frozenset[DBEvent]
    #: Seconds without a message after which the listener checks the table (Kinetica).
    inactivity_timeout: float | None

    def deliver(self, change: SourceChange, abandon: threading.Event | None = None) -> None:
        """A change as the source reported it; may wait while the monitor's queue is full, until
        ``abandon`` is set (the change listener stops)."""

    def table_dropped(self, why: str) -> None:
        """The table is gone; nothing more will be delivered."""

    def closed(self) -> None:
        """The change listener stopped (``db.cdc.stop()``, ``db.close()``)."""


class TableMonitor:
    """The namespace of the API, as ``GPUdbTableMonitor`` is: ``Client``, ``Callback``, ``Options``."""

    class Options:
        """Options of a :class:`TableMonitor.Client`.

        ``inactivity_timeout`` is in minutes (a float), default 20: after that long without a
        message the table is checked (Kinetica: a dropped table fires TABLE_DROPPED). As in
        the seed, the getter returns milliseconds. ``max_retries``, ``wait_interval`` and
        ``monitor_port`` are accepted so that code written for the official client ports;
        the monitor port comes from the datalayer's URI (``?monitor_port=``), and a
        different one is refused. Unknown keys raise.

        >>> options = TableMonitor.Options(_dict={"inactivity_timeout": 0.5})
        >>> options.inactivity_timeout, options.as_dict()["inactivity_timeout"]
        (30000.0, 0.5)
        >>> TableMonitor.Options(_dict={"timeout": 1})
        Traceback (most recent call last):
        ...
        reactive.errors.ConfigurationError: unknown table monitor options: timeout; known: inactivity_timeout, ...
        """

        _KNOWN = ("inactivity_timeout", "max_retries", "wait_interval", "monitor_port")

        def __init__(self, _dict: Mapping[str, Any] | None = None) -> None:
            self._minutes = 20.0
            self.max_retries = 5
            self.wait_interval = 1
            self.monitor_port: int | None = None
            if _dict is None:
                return
            if not isinstance(_dict, Mapping):
                raise ConfigurationError(f"table monitor options must be a dict, not {type(_dict).__name__}")
            unknown = sorted(set(_dict) - set(self._KNOWN))
            if unknown:
                raise ConfigurationError(
                    f"unknown table monitor options: {', '.join(map(str, unknown))}; known: {', '.join(self._KNOWN)}"
                )
            for key, value in _dict.items():
                setattr(self, key, value)

        @staticmethod
        def default() -> TableMonitor.Options:
            return TableMonitor.Options()

        @property
        def inactivity_timeout(self) -> float:
            """Milliseconds (set in minutes, as in the seed)."""
            return self._minutes * 60 * 1000

        @inactivity_timeout.setter
        def inactivity_timeout(self, minutes: float) -> None:
            try:
                value = float(minutes)
            except (TypeError, ValueError):
                raise ConfigurationError(f"inactivity_timeout must be minutes as a number, not {minutes!r}") from None
            if isinstance(minutes, bool) or not value > 0 or not math.isfinite(value):
                raise ConfigurationError(f"inactivity_timeout must be finite and more than 0 minutes, not {minutes!r}")
            self._minutes = value

        def as_dict(self) -> dict[str, Any]:
            """The options as given to the constructor (``inactivity_timeout`` in minutes), so
            ``Options(_dict=o.as_dict())`` is ``o`` again."""
            return {
                "inactivity_timeout": self._minutes,
                "max_retries": self.max_retries,
                "wait_interval": self.wait_interval,
                "monitor_port": self.monitor_port,
            }

        def as_json(self) -> str:
            """:meth:`as_dict` as JSON text."""
            return json.dumps(self.as_dict())

    class Callback:
        """One callback: its type, the function called with each event, and one for errors.

        >>> cb = TableMonitor.Callback(TableMonitor.Callback.Type.DELETED, print)
        >>> cb.callback_type, cb.event_options
        (<Type.DELETED: 3>, None)
        """

        class Type(enum.Enum):
            """What a callback is for, and what it receives."""

            INSERT_DECODED = 1  #: each inserted row, as a dict
            INSERT_RAW = 2  #: each inserted row, as Avro bytes (``client.type_schema``)
            DELETED = 3  #: the number of deleted rows
            UPDATED = 4  #: the number of updated rows
            TABLE_ALTERED = 5  #: a message: the table's type changed
            TABLE_DROPPED = 6  #: a message: the table is gone

            @staticmethod
            def event_types() -> list[TableMonitor.Callback.Type]:
                return list(TableMonitor.Callback.Type)

            @staticmethod
            def monitor_types() -> list[TableMonitor.Callback.Type]:
                """The types that make a monitor (at least one is needed)."""
                t = TableMonitor.Callback.Type
                return [t.INSERT_RAW, t.INSERT_DECODED, t.DELETED, t.UPDATED]

        class Options:
            """Options of one callback type (use a subclass)."""

        class InsertDecodedOptions(Options):
            """What an INSERT_DECODED callback does with a record that cannot be decoded."""

            class DecodeFailureMode(enum.Enum):
                ABORT = 1  #: error callback, TABLE_ALTERED, stop the monitor
                SKIP = 2  #: log it, error callback, go on with the next record

            def __init__(
                self, decode_failure_mode: TableMonitor.Callback.InsertDecodedOptions.DecodeFailureMode | None = None
            ) -> None:
                mode = decode_failure_mode or TableMonitor.Callback.InsertDecodedOptions.DecodeFailureMode.SKIP
                if not isinstance(mode, TableMonitor.Callback.InsertDecodedOptions.DecodeFailureMode):
                    raise ConfigurationError(
                        f"decode_failure_mode must be DecodeFailureMode.SKIP or .ABORT, not {decode_failure_mode!r}"
                    )
                self.decode_failure_mode = mode

        class ChangedRowsOptions(Options):
            """Beyond the seed: UPDATED receives the updated rows and DELETED the deleted ids
            (lists), instead of counts, on backends that know them (not Kinetica)."""

        def __init__(
            self,
            callback_type: TableMonitor.Callback.Type,
            event_callback: Callable[[Any], Any],
            error_callback: Callable[[str], Any] | None = None,
            event_options: TableMonitor.Callback.Options | None = None,
        ) -> None:
            if not isinstance(callback_type, TableMonitor.Callback.Type):
                raise ConfigurationError(f"callback_type must be a Callback.Type, not {callback_type!r}")
            if not callable(event_callback):
                raise ConfigurationError(f"event_callback must be callable, not {event_callback!r}")
            if error_callback is not None and not callable(error_callback):
                raise ConfigurationError(f"error_callback must be callable, not {error_callback!r}")
            if event_options is not None and not isinstance(event_options, TableMonitor.Callback.Options):
                raise ConfigurationError("event_options must be a Callback.Options (e.g. InsertDecodedOptions)")
            kinds = TableMonitor.Callback
            if isinstance(event_options, kinds.InsertDecodedOptions) and callback_type is not kinds.Type.INSERT_DECODED:
                raise ConfigurationError("InsertDecodedOptions apply to INSERT_DECODED callbacks only")
            if isinstance(event_options, kinds.ChangedRowsOptions) and callback_type not in (
                kinds.Type.UPDATED,
                kinds.Type.DELETED,
            ):
                raise ConfigurationError("ChangedRowsOptions apply to UPDATED and DELETED callbacks only")
            self.callback_type = callback_type
            self.event_callback = event_callback
            self.error_callback = error_callback
            self.event_options = event_options

        def __repr__(self) -> str:
            return f"Callback({self.callback_type.name})"

    class Client:
        """Monitors one table of ``db`` and calls the callbacks in ``callback_list``.

        ``db`` is a ``reactive`` datalayer of any backend. Subclass it and pass bound methods,
        as in the seed's example, or pass functions. Nothing runs until :meth:`start_monitor`.
        Raises :class:`~reactive.errors.ConfigurationError` for a bad callback list (empty,
        not ``Callback`` objects, two callbacks of one type, none of the four event types)
        and :class:`~reactive.errors.TableNotFoundError` when the table does not exist.

        Beyond the seed: ``id_column`` names the column that identifies the table's rows where
        it has no one-column primary key (SQL backends follow rows by id: a row whose id is
        NULL is not reported, and DELETED's ids are that column's). A table is followed by one
        id column: a monitor naming another than the one its table is already followed by (a
        Listener's ``id_column``, another monitor's) is refused, with the column to pass.
        """

        def __init__(
            self,
            db: Datalayer,
            table_name: str,
            callback_list: Sequence[TableMonitor.Callback],
            options: TableMonitor.Options | None = None,
            *,
            id_column: str | None = None,
        ) -> None:
            from reactive.datalayer import Datalayer

            if not isinstance(db, Datalayer):
                raise ConfigurationError(f"db must be a reactive datalayer (reactive.connect(...)), not {db!r}")
            if not isinstance(table_name, str) or not table_name:
                raise ConfigurationError("table_name must be a non-empty string")
            if options is not None and not isinstance(options, TableMonitor.Options):
                raise ConfigurationError("options must be a TableMonitor.Options")
            if id_column is not None and (not isinstance(id_column, str) or not id_column):
                raise ConfigurationError(f"id_column must be a column name, not {id_column!r}")
            self.db = db
            self.table_name = table_name
            self.id_column = id_column
            self.options = options or TableMonitor.Options.default()
            self._callbacks = _check_callbacks(callback_list, db)
            _check_monitor_port(self.options, db)
            self.table: TableInfo = self._describe()
            self._format: RowFormat = db.backend.row_format(self.table)
            self._monitor: _Monitor | None = None
            self._lock = threading.Lock()

        def _describe(self) -> TableInfo:
            """The table as it is now; TableNotFoundError when it does not exist."""
            if self.id_column is not None:
                self.db.check_id_column(self.table_name, self.id_column, "a table monitor")
            found = self.db.followed_by(self.table_name)  # the column the others use, where none is named
            id_column = self.id_column if self.id_column is not None or found is None else found[0]
            try:
                return self.db.table_info(self.table_name, id_column=id_column)
            except MissingIdColumnError as exc:
                if self.db.backend.monitors_need_ids:
                    # The error names Listener(id_column=...): say what a monitor passes.
                    raise MissingIdColumnError(
                        f"table {self.table_name!r} has no one-column primary key, by which a table monitor"
                        " follows its rows here: give it one, or pass TableMonitor.Client(..., id_column=...)"
                        f"; {exc}",
                        table=self.table_name,
                    ) from None
                return TableInfo(self.table_name, "", ())

        @property
        def type_schema(self) -> str:
            """The Avro schema (JSON text) INSERT_RAW bytes are written in."""
            return self._format.type_schema

        @property
        def task_list(self) -> list[threading.Thread]:
            """The monitor's thread while it runs (the seed lists its threads here)."""
            monitor = self._monitor
            return [monitor] if monitor is not None and monitor.is_alive() else []

        @property
        def logging_level(self) -> int:
            return log.level

        @logging_level.setter
        def logging_level(self, level: int) -> None:
            log.setLevel(level)

        def start_monitor(self) -> None:
            """Start monitoring; returns once the source follows the table.

            On Kinetica its server-side monitors exist and are subscribed; on polling backends
            a poll has taken the baseline. Rows present before are not reported. Starts what
            it needs in ``db.cdc`` (no Listener and no ``db.cdc.start()`` needed). Calling it
            while running does nothing. Raises :class:`~reactive.errors.TableNotFoundError`,
            starting nothing, when the table was dropped since the client was made.
            """
            with self._lock:
                if self._monitor is not None and self._monitor.is_alive():
                    return
                self.table = self._describe()  # dropped since the client was made: nothing starts
                monitor = _Monitor(self)
                monitor.start()
                try:
                    self.db.cdc.monitor(self.table, monitor)
                except BaseException:
                    monitor.finish(unsubscribe=False)
                    raise
                self._monitor = monitor

        def stop_monitor(self) -> None:
            """Stop: the server-side monitors are cleared and the thread has ended when this returns."""
            with self._lock:
                monitor, self._monitor = self._monitor, None
            if monitor is not None:
                monitor.finish(unsubscribe=True)

        def __enter__(self) -> TableMonitor.Client:
            self.start_monitor()
            return self

        def __exit__(self, *exc: object) -> None:
            self.stop_monitor()

        def __repr__(self) -> str:
            return f"TableMonitor.Client({self.db!r}, {self.table_name!r})"


def _check_callbacks(
    callback_list: Sequence[TableMonitor.Callback], db: Datalayer
) -> dict[TableMonitor.Callback.Type, TableMonitor.Callback]:
    """The callbacks by type; a clear error for every list the seed refuses (nothing created)."""
    if isinstance(callback_list, TableMonitor.Callback) or not isinstance(callback_list, Sequence | set):
        raise ConfigurationError("callback_list must be a list of TableMonitor.Callback")
    callbacks: dict[TableMonitor.Callback.Type, TableMonitor.Callback] = {}
    for callback in callback_list:
        if not isinstance(callback, TableMonitor.Callback):
            raise ConfigurationError(f"callback_list must hold TableMonitor.Callback objects, not {callback!r}")
        if callback.callback_type in callbacks:
            raise ConfigurationError(f"two callbacks of type {callback.callback_type.name}")
        callbacks[callback.callback_type] = callback
    if not set(callbacks) & set(TableMonitor.Callback.Type.monitor_types()):
        raise ConfigurationError(
            "no monitor to create: callback_list needs at least one of INSERT_DECODED, INSERT_RAW, DELETED, UPDATED"
        )
    changed_rows = [
        c for c in callbacks.values() if isinstance(c.event_options, TableMonitor.Callback.ChangedRowsOptions)
    ]
    if changed_rows and db.backend.name == "kinetica":
        raise ConfigurationError("Kinetica's table monitors report counts only: ChangedRowsOptions is not available")
    return callbacks


def _check_monitor_port(options: TableMonitor.Options, db: Datalayer) -> None:
    port = options.monitor_port
    known = getattr(getattr(db.backend, "client", None), "uri", None)
    if port is not None and known is not None and getattr(known, "monitor_port", port) != port:
        raise ConfigurationError(
            f"monitor_port {port} differs from the datalayer's ({known.monitor_port}); set it in the URI"
        )


class _Notice(enum.Enum):
    DROPPED = "dropped"
    CLOSED = "closed"
    STOP = "stop"
    #: Nothing: the thread looks at its last word once it has taken what is queued.
    WAKE = "wake"


class _Monitor(ReactiveThread):
    """One client's thread: takes what the change listener delivered and calls the callbacks."""

    def __init__(self, client: TableMonitor.Client) -> None:
        super().__init__(f"monitor-{client.table_name}")
        self.client = client
        self.table = client.table_name
        self.callbacks = client._callbacks
        t = TableMonitor.Callback.Type
        wanted = set(self.callbacks)
        self.events = frozenset(
            event
            for event, types in (
                (DBEvent.insert, {t.INSERT_RAW, t.INSERT_DECODED}),
                (DBEvent.update, {t.UPDATED}),
                (DBEvent.delete, {t.DELETED}),
            )
            if wanted & types
        )
        self.inactivity_timeout: float | None = client.options.inactivity_timeout / 1000
        self.format = client._format
        self._queue: queue.Queue[SourceChange | _Notice] = queue.Queue(QUEUE_SIZE)
        #: Said once the changes queued before it are taken: why the monitor ends (the first
        #: of dropped, closed or stopped).
        self._last_word: tuple[_Notice, str] | None = None
        self._ended = threading.Event()
        self._finished = threading.RLock()
        self._unsubscribed = False

    # -- what the change listener calls (MonitorSink) ---------------------------------------
    def deliver(self, change: SourceChange, abandon: threading.Event | None = None) -> None:
        if change.event in self.events:
            self._put(change, abandon)

    def table_dropped(self, why: str) -> None:
        self._end_with(_Notice.DROPPED, why)

    def closed(self) -> None:
        self._end_with(_Notice.CLOSED, "the change listener stopped")

    def _put(self, change: SourceChange, abandon: threading.Event | None) -> None:
        """Wait while the queue is full (backpressure), unless this monitor has ended or the
        change listener stops (``abandon``): behind a slow callback, a full queue held the
        listener's stop, and ``db.close()`` with it, until the callback took one more change."""
        while not self._ended.is_set() and not (abandon is not None and abandon.is_set()):
            try:
                self._queue.put(change, timeout=0.1)
                return
            except queue.Full:
                continue

    def _end_with(self, notice: _Notice, why: str) -> None:
        """The monitor's last word, said after the changes queued before it; never waits for
        room in the queue (``db.close()`` waited there for a slow callback, for ever for a hung one)."""
        with self._finished:
            if self._last_word is None:
                self._last_word = (notice, why)
        with contextlib.suppress(queue.Full):  # full: the thread finds it once it took what is queued
            self._queue.put_nowait(_Notice.WAKE)

    # -- the thread --------------------------------------------------------------------------
    def _next(self) -> SourceChange | tuple[_Notice, str]:
        """The next change queued; once none is, the last word (waiting for either)."""
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                last_word = self._last_word
                if last_word is not None:
                    return last_word
                item = self._queue.get()  # _end_with puts a WAKE after setting the last word
            if isinstance(item, SourceChange):
                return item

    def run(self) -> None:
        stopped_by_itself = False
        try:
            while True:
                item = self._next()
                if isinstance(item, SourceChange):
                    if self._dispatch(item):
                        continue
                    stopped_by_itself = True  # ABORT
                    return
                notice, why = item
                if notice is _Notice.DROPPED:
                    message = f"Table {self.table} does not exist anymore ({why})"
                    self._call(TableMonitor.Callback.Type.TABLE_DROPPED, message)
                    stopped_by_itself = True
                return
        finally:
            self._ended.set()
            if stopped_by_itself:
                # Clear what the source holds for this monitor (its server-side monitors).
                self.client.stop_monitor()

    def _dispatch(self, change: SourceChange) -> bool:
        """Call the callbacks for one change; False when the monitor must stop (ABORT)."""
        t = TableMonitor.Callback.Type
        if change.event is DBEvent.insert:
            if change.frames is not None:
                return self._inserted_frames(change.frames)
            for row in change.rows or ():
                if t.INSERT_RAW in self.callbacks:
                    try:
                        raw = self.format.encode(row)
                    except Exception as exc:
                        self._error(t.INSERT_RAW, f"a row of {self.table} cannot be written as Avro: {exc}")
                    else:
                        self._call(t.INSERT_RAW, raw)
                self._call(t.INSERT_DECODED, dict(row))
            return True
        kind = t.UPDATED if change.event is DBEvent.update else t.DELETED
        callback = self.callbacks.get(kind)
        if callback is None:
            return True
        if isinstance(callback.event_options, TableMonitor.Callback.ChangedRowsOptions):
            if kind is t.UPDATED:
                self._call(kind, [dict(row) for row in change.rows or ()])
            else:
                self._call(kind, list(change.ids or ()))
        else:
            self._call(kind, change.count)
        return True

    def _inserted_frames(self, frames: Sequence[bytes]) -> bool:
        """Records as published (Kinetica), raw then decoded each; False to stop (ABORT).

        The frames of one message are decoded in one pass; only when one of them does not
        decode are they taken one by one (reload, TABLE_ALTERED, SKIP or ABORT).
        """
        t = TableMonitor.Callback.Type
        records = self.format.decode_all(frames) if t.INSERT_DECODED in self.callbacks else None
        if records is None and t.INSERT_DECODED in self.callbacks:
            return all(self._inserted_frame(frame) for frame in frames)
        if records is not None and t.INSERT_RAW in self.callbacks:
            for frame, record in zip(frames, records, strict=True):
                self._call(t.INSERT_RAW, frame)
                self._call(t.INSERT_DECODED, record)
        else:
            self._call_each(t.INSERT_DECODED if records is not None else t.INSERT_RAW, records or frames)
        return True

    def _call_each(self, kind: TableMonitor.Callback.Type, arguments: Sequence[Any]) -> None:
        """``_call`` for each argument, without a ``try`` per call (the hot path of a stream)."""
        callback = self.callbacks.get(kind)
        if callback is None:
            return
        function, start, end, ended = callback.event_callback, 0, len(arguments), self._ended
        while start < end:
            index = start
            try:
                for index in range(start, end):  # index tells which call raised
                    if ended.is_set():  # stopped by a callback: none is called after
                        return
                    function(arguments[index])
                return
            except Exception as exc:
                log.debug("the %s callback of the monitor on %s raised", kind.name, self.table, exc_info=True)
                self._error(kind, f"{type(exc).__name__}: {exc}")
                start = index + 1

    def _inserted_frame(self, frame: bytes) -> bool:
        """One record as published (Kinetica): raw, then decoded; False to stop (ABORT)."""
        t = TableMonitor.Callback.Type
        self._call(t.INSERT_RAW, frame)
        if t.INSERT_DECODED not in self.callbacks:
            return True
        try:
            record = self.format.decode(frame)
        except Exception as first:
            record, error = self._reload_and_decode(frame, first)
            if record is None:
                options = self.callbacks[t.INSERT_DECODED].event_options
                mode = getattr(options, "decode_failure_mode", None)
                message = f"a record inserted into {self.table} could not be decoded: {error}"
                log.warning("%s", message)
                self._error(t.INSERT_DECODED, message)
                if mode is TableMonitor.Callback.InsertDecodedOptions.DecodeFailureMode.ABORT:
                    self._call(t.TABLE_ALTERED, f"Table {self.table} altered, terminating the monitor")
                    return False
                return True
        self._call(t.INSERT_DECODED, record)
        return True

    def _reload_and_decode(self, frame: bytes, error: Exception) -> tuple[dict[str, Any] | None, Exception]:
        """Reload the table's type once; a changed type is TABLE_ALTERED, then decode again."""
        try:
            fresh = self.client.db.backend.row_format(self.client.table)
        except ReactiveError as exc:
            return None, exc
        if fresh.type_schema != self.format.type_schema:
            self.format = self.client._format = fresh
            self._call(TableMonitor.Callback.Type.TABLE_ALTERED, f"Table {self.table} altered: its type changed")
            try:
                return fresh.decode(frame), error
            except Exception as exc:
                return None, exc
        return None, error

    def _call(self, kind: TableMonitor.Callback.Type, argument: Any) -> None:
        callback = self.callbacks.get(kind)
        if callback is None or self._ended.is_set():  # stopped by a callback: none is called after
            return
        try:
            callback.event_callback(argument)
        except Exception as exc:
            log.debug("the %s callback of the monitor on %s raised", kind.name, self.table, exc_info=True)
            self._error(kind, f"{type(exc).__name__}: {exc}")

    def _error(self, kind: TableMonitor.Callback.Type, message: str) -> None:
        callback = self.callbacks.get(kind)
        if callback is None or callback.error_callback is None:
            log.warning("table monitor on %s: %s", self.table, message)
            return
        try:
            callback.error_callback(message)
        except Exception:
            log.exception("the error callback of the monitor on %s raised", self.table)

    # -- stopping ----------------------------------------------------------------------------
    def finish(self, *, unsubscribe: bool) -> None:
        """Unsubscribe from the source, end the thread, and wait for it (idempotent)."""
        with self._finished:
            if unsubscribe and not self._unsubscribed:
                self._unsubscribed = True
                try:
                    self.client.db.cdc.unmonitor(self.client.table, self)
                except ReactiveError as exc:
                    log.warning("stopping the monitor on %s: %s", self.table, exc)
            if self.is_alive():
                self._ended.set()  # no callback is called after this
                _drain(self._queue)
                self._end_with(_Notice.STOP, "stopped")
                # From a callback (its own thread), it ends once the callback returns: it went
                # on for ever, past db.close(), and no callback was called again.
                if threading.current_thread() is not self:
                    self.join()


def _drain(items: queue.Queue[Any]) -> None:
    while True:
        try:
            items.get_nowait()
        except queue.Empty:
            return

"""What every backend answers, and the change listener every backend provides.

A backend is one module under ``reactive/backends/``. It subclasses :class:`DataBackend`
(connect, describe tables, read rows, write outputs, keep checkpoints) and
:class:`BaseDatabaseListener` (a thread that turns what the database reports into
:class:`~reactive.events.ChangePacket` s on the shared queue).
"""

from __future__ import annotations

import dataclasses as dc
import datetime as _dt
import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Self

from reactive.errors import ConfigurationError
from reactive.events import ChangePacket, DBEvent, Row, id_key
from reactive.outputs import infer_output_type, normalize_output
from reactive.threads import ReactiveThread

if TYPE_CHECKING:
    from reactive.queue import CDCQueue

log = logging.getLogger(__name__)

OUTPUTS_PREFIX = "_outputs__"
SOURCE_FIELD = "_source"
OUTPUT_FIELD = "_output"
FINGERPRINT_FIELD = "_fingerprint"


def chunks(values: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    """``values`` in slices of at most ``size`` (one id list per statement).

    >>> [list(c) for c in chunks([1, 2, 3], 2)]
    [[1, 2], [3]]
    """
    for start in range(0, len(values), size):
        yield values[start : start + size]


def outputs_table(identifier: str) -> str:
    """The name of the table (collection) holding a listener's outputs.

    >>> outputs_table("embed__text")
    '_outputs__embed__text'
    """
    return f"{OUTPUTS_PREFIX}{identifier}"


@dc.dataclass(frozen=True, slots=True)
class TableInfo:
    """A watched table: its name, the column that identifies a row, and its columns."""

    name: str
    id_column: str
    columns: tuple[str, ...] = ()


@dc.dataclass(frozen=True, slots=True)
class OutputRecord:
    """One output to store: the source row id, the output, the fingerprint of the input.

    ``new`` says no output was stored for this row when the batch started, so a backend may
    insert instead of upsert (it must still cope with a row that exists after all).
    """

    source: Any
    output: Any
    fingerprint: int
    new: bool = False


@dc.dataclass(frozen=True, slots=True)
class OutputRejected:
    """An output the backend could not store (it does not fit the outputs' type)."""

    error: str


@dc.dataclass(frozen=True, slots=True)
class ErrorRecord:
    """A row a listener could not process."""

    listener: str
    table: str
    source: Any
    error: str
    at: _dt.datetime = dc.field(default_factory=lambda: _dt.datetime.now(_dt.UTC))


class DataBackend(ABC):
    """A connection to one database, and the questions the engine asks it.

    Implementations must be safe to call from several threads (the handler thread, the
    change listener thread and the user's thread).
    """

    #: Registry name, used by :class:`~reactive.cdc.DatabaseListenerFactory`.
    name: ClassVar[str]
    #: URI schemes :func:`reactive.connect` routes to this backend.
    schemes: ClassVar[tuple[str, ...]]
    #: The change listener class this backend's changes come from.
    listener_class: ClassVar[type[BaseDatabaseListener]]

    def __init__(self) -> None:
        self._output_types: dict[str, str] = {}
        self._output_types_lock = threading.RLock()

    @classmethod
    @abstractmethod
    def from_uri(cls, uri: str, **options: Any) -> Self:
        """Connect. Errors name the URI with its password redacted."""

    @property
    @abstractmethod
    def uri(self) -> str:
        """The connection URI, password redacted."""

    # -- tables ---------------------------------------------------------------------------
    @abstractmethod
    def describe(self, table: str, *, id_column: str | None = None) -> TableInfo:
        """Describe ``table``; raise TableNotFoundError or MissingIdColumnError."""

    @abstractmethod
    def table_exists(self, table: str) -> bool: ...

    @abstractmethod
    def count(self, table: TableInfo) -> int: ...

    @abstractmethod
    def read_rows(self, table: TableInfo, ids: Sequence[Any]) -> dict[Hashable, Row]:
        """The current rows with these ids, keyed by :func:`~reactive.events.id_key`."""

    @abstractmethod
    def existing_ids(self, table: TableInfo, ids: Sequence[Any]) -> set[Hashable]:
        """The :func:`~reactive.events.id_key` of those ``ids`` that are rows of ``table``."""

    @abstractmethod
    def scan(self, table: TableInfo, *, columns: Sequence[str] | None, page_size: int) -> Iterator[list[Row]]:
        """Every row, in pages; each row includes the id column."""

    # -- outputs --------------------------------------------------------------------------
    def output_type(self, identifier: str) -> str | None:
        """The type of ``identifier``'s stored outputs (an ibis type string), once known."""
        with self._output_types_lock:
            if identifier not in self._output_types:
                saved = self.load_checkpoint(f"outputs/{identifier}")
                if saved:
                    self._output_types[identifier] = saved["type"]
            return self._output_types.get(identifier)

    def _set_output_type(self, identifier: str, source: TableInfo, output_type: str) -> None:
        with self._output_types_lock:
            self.create_outputs(identifier, source, output_type)
            self.save_checkpoint(f"outputs/{identifier}", {"type": output_type, "source": source.name})
            self._output_types[identifier] = output_type

    def _forget_output_type(self, identifier: str) -> None:
        with self._output_types_lock:
            self.delete_checkpoint(f"outputs/{identifier}")
            self._output_types.pop(identifier, None)

    def prepare_outputs(self, identifier: str, source: TableInfo, output_type: str | None) -> None:
        """Fix the outputs' type when the model declares it (``db.add``); refuse a change."""
        existing = self.output_type(identifier)
        if existing is not None and output_type is not None and existing != output_type:
            raise ConfigurationError(
                f"outputs of {identifier!r} are stored as {existing}, not {output_type}; "
                f"remove the listener with drop_outputs=True to change the type",
                listener=identifier,
            )
        if existing is None and output_type is not None:
            self._set_output_type(identifier, source, output_type)

    def write_outputs(self, identifier: str, source: TableInfo, records: Sequence[OutputRecord]) -> list[Any]:
        """Store outputs in bulk (idempotent); return each output as stored, or why not.

        The outputs' type is inferred from the first batch when the model did not declare
        it; an output that does not fit it comes back as :class:`OutputRejected`.
        """
        logical = self.output_type(identifier)
        if logical is None:
            sample = next((r.output for r in records if r.output is not None), None)
            if sample is None:
                return [OutputRejected("the model returned None") for _ in records]
            logical = infer_output_type(sample)
            self._set_output_type(identifier, source, logical)
        stored: list[Any] = []
        kept: list[tuple[int, OutputRecord, Any]] = []
        for index, record in enumerate(records):
            try:
                value = normalize_output(record.output, logical)
            except (TypeError, ValueError) as exc:
                stored.append(OutputRejected(f"{exc} (outputs of {identifier!r} are {logical})"))
                continue
            stored.append(value)
            kept.append((index, record, value))
        if kept:
            self.store_outputs(identifier, logical, kept, stored)
        return stored

    @abstractmethod
    def create_outputs(self, identifier: str, source: TableInfo, output_type: str) -> None:
        """Create where ``identifier``'s outputs of ``output_type`` go (if the store needs it)."""

    @abstractmethod
    def store_outputs(
        self, identifier: str, output_type: str, kept: Sequence[tuple[int, OutputRecord, Any]], stored: list[Any]
    ) -> None:
        """Upsert ``(index, record, normalized output)``; put an :class:`OutputRejected` at
        ``stored[index]`` for a write the database refused."""

    @abstractmethod
    def delete_outputs(self, identifier: str, ids: Sequence[Any]) -> None: ...

    @abstractmethod
    def output_fingerprints(self, identifier: str, ids: Sequence[Any]) -> dict[Hashable, int]:
        """Input fingerprints of the stored outputs for these source ids."""

    @abstractmethod
    def scan_output_ids(self, identifier: str, *, page_size: int) -> Iterator[list[Any]]: ...

    @abstractmethod
    def read_outputs(self, identifier: str) -> list[dict[str, Any]]: ...

    @abstractmethod
    def drop_outputs(self, identifier: str) -> None: ...

    # -- errors and checkpoints -----------------------------------------------------------
    @abstractmethod
    def record_errors(self, records: Sequence[ErrorRecord]) -> None: ...

    @abstractmethod
    def read_errors(self, listener: str | None = None) -> list[dict[str, Any]]: ...

    @abstractmethod
    def load_checkpoint(self, name: str) -> dict[str, Any] | None: ...

    @abstractmethod
    def save_checkpoint(self, name: str, value: Mapping[str, Any]) -> None: ...

    @abstractmethod
    def delete_checkpoint(self, name: str) -> None: ...

    @abstractmethod
    def close(self) -> None: ...

    def is_transient(self, exc: BaseException) -> bool:
        """Whether ``exc`` means the database is unreachable for now (retry), not bad data."""
        return False

    # -- reconciliation -------------------------------------------------------------------
    def reconcile(
        self,
        table: TableInfo,
        *,
        identifier: str,
        columns: Sequence[str],
        is_current: Callable[[Row, int | None], bool],
        page_size: int,
    ) -> Iterator[ChangePacket]:
        """Compare a listener's outputs with the source and yield the difference.

        Outputs whose source row is gone come back first, as delete packets (checked before
        any output is written, so a new listener pays nothing for it). Rows whose output is
        missing or stale (``is_current(row, stored_fingerprint)`` is False) come back as
        insert packets *without rows*: the handler reads each row when it processes the
        packet, so a reconciliation never writes an output older than a live change
        processed before it.
        """
        for page in self.scan_output_ids(identifier, page_size=page_size):
            present = self.existing_ids(table, page)
            gone = tuple(i for i in page if id_key(i) not in present)
            if gone:
                yield ChangePacket(table.name, DBEvent.delete, gone)
        for page in self.scan(table, columns=columns, page_size=page_size):
            ids = [row[table.id_column] for row in page]
            stored = self.output_fingerprints(identifier, ids)
            stale = tuple(
                row[table.id_column] for row in page if not is_current(row, stored.get(id_key(row[table.id_column])))
            )
            if stale:
                yield ChangePacket(table.name, DBEvent.insert, stale)


class BaseDatabaseListener(ReactiveThread):
    """A backend's change source: a thread that puts change packets on the shared queue.

    One instance serves every watched table of a datalayer. The handler calls
    :meth:`commit` with the ``position`` of each packet once the packet is processed; a
    listener must never persist a position earlier than that.
    """

    def __init__(
        self, backend: DataBackend, queue: CDCQueue, *, poll_interval: float = 1.0, page_size: int = 5_000
    ) -> None:
        super().__init__(f"{backend.name}-listener")
        self.backend = backend
        self.queue = queue
        self.poll_interval = poll_interval
        self.page_size = page_size
        self._tables: dict[str, TableInfo] = {}
        self._lock = threading.RLock()
        #: Notified whenever the listener's state changes (packets settled, a stop, ...).
        self._changed = threading.Condition(self._lock)
        self._in_flight = 0
        self.counters = {"inserts": 0, "updates": 0, "deletes": 0}
        self.last_error: str | None = None
        #: Set by ``db.cdc``: bring the outputs of these tables up to date from the source
        #: (after lost history, or a table replaced under the listener). Puts packets on the
        #: queue, giving up when the event is set.
        self.on_reconcile: Callable[[list[str], threading.Event], None] | None = None
        #: Set by ``db.cdc``: a watched table was dropped or renamed; the str says how.
        self.on_table_gone: Callable[[str, str], None] | None = None

    @property
    def tables(self) -> dict[str, TableInfo]:
        with self._lock:
            return dict(self._tables)

    def watch(self, table: TableInfo) -> None:
        """Start following ``table``. Changes made after this call are never missed."""
        with self._lock:
            self._tables[table.name] = table

    def unwatch(self, table: str) -> None:
        with self._lock:
            self._tables.pop(table, None)

    def emit(self, packet: ChangePacket) -> None:
        """Put ``packet`` on the queue, waiting while the queue is full; it is in flight
        until the handler commits or releases it."""
        with self._changed:
            self._in_flight += 1
        try:
            self.queue.put(packet, abandon=self.stopped_event)
        except BaseException:
            self._settle(1)
            raise
        self.counters[packet.event.counter] += len(packet)

    def wait_for(self, predicate: Callable[[], bool], timeout: float | None = None) -> bool:
        """Wait until ``predicate()`` holds; it is checked whenever the listener's state changes.

        >>> # db.cdc.listener.wait_for(lambda: db.cdc.listener.history_lost > 0, timeout=30)
        """
        with self._changed:
            return self._changed.wait_for(predicate, timeout)

    def _settle(self, packets: int) -> None:
        with self._changed:
            self._in_flight -= packets
            self._changed.notify_all()

    def on_stop(self) -> None:
        self.queue.wake_producers()
        with self._changed:
            self._changed.notify_all()

    def commit(self, positions: Sequence[Any]) -> None:
        """The handler processed packets with these positions (in arrival order): save them."""
        try:
            self.save_positions(positions)
        finally:
            self._settle(len(positions))

    def release(self, positions: Sequence[Any]) -> None:
        """The handler gave up on packets with these positions: deliver their changes again."""
        try:
            self.redeliver(positions)
        finally:
            self._settle(len(positions))

    @abstractmethod
    def save_positions(self, positions: Sequence[Any]) -> None:
        """Persist the positions of processed packets (called from the handler thread)."""

    @abstractmethod
    def redeliver(self, positions: Sequence[Any]) -> None:
        """Arrange for the changes of unprocessed packets to be queued again."""

    @abstractmethod
    def sync(self, timeout: float | None) -> bool:
        """Wait until every change committed in the database before this call is queued."""

    def info(self) -> dict[str, Any]:
        return {
            "backend": self.backend.name,
            "running": self.is_alive(),
            "tables": sorted(self.tables),
            **self.counters,
            "last_error": self.last_error,
        }

"""What a backend provides: small roles, and the change listener every backend runs.

A backend is one package under ``reactive/backends/``. It provides:

- a :class:`SourceReader`: describe a table, read rows by id and in pages;
- an :class:`OutputStore`: where a listener's outputs live (bulk upsert, delete, fingerprints);
- an :class:`ErrorStore` and a :class:`CheckpointStore` (``_reactive_errors``,
  ``_reactive_checkpoints``);
- a change listener, a :class:`BaseDatabaseListener` thread that turns what the database
  reports into :class:`~reactive.events.ChangePacket` s on the shared queue.

:class:`DataBackend` ties these to one connection. The engine decides everything else
(output types, reconciliation, batching, retries) in one place for every backend.
"""

from __future__ import annotations

import contextlib
import dataclasses as dc
import datetime as _dt
import hashlib
import logging
import math
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, Self, runtime_checkable

from reactive import checks
from reactive.errors import ConfigurationError, MissingIdColumnError
from reactive.events import ChangePacket, Row, SourceChange, is_utf8
from reactive.threads import ReactiveThread
from reactive.uri import redact_text

if TYPE_CHECKING:
    from reactive.checkpoints import SectionStore
    from reactive.monitor import MonitorSink
    from reactive.outputs import OutputTypes
    from reactive.queue import CDCQueue
    from reactive.rowformat import RowFormat
    from reactive.rows import TableRows

log = logging.getLogger(__name__)

OUTPUTS_PREFIX = "_outputs__"
SOURCE_FIELD = "_source"
OUTPUT_FIELD = "_output"
FINGERPRINT_FIELD = "_fingerprint"

#: Longest wait between attempts while the database keeps failing (the listeners' reconnection,
#: the handler's retry of a window): once the database is back, work resumes within this.
MAX_BACKOFF = 5.0


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
    >>> outputs_table("sentence-transformers/paraphrase-multilingual-MiniLM-L12-v2__text")
    '_outputs__sentence-transformers/paraphrase-multili_5df839e5d409'
    """
    return bounded_name(OUTPUTS_PREFIX, identifier)


def outputs_keyed_otherwise(identifier: str, source: TableInfo, stored: Any, id_type: Any) -> ConfigurationError:
    """The error of an outputs table keyed by ids of type ``stored`` where ``source``'s id column
    is now of type ``id_type``: its outputs name rows by the old ids, and no write fits it.
    The one message for every backend."""
    name = outputs_table(identifier)
    return ConfigurationError(
        f"the outputs of {identifier!r} ({name!r}) are keyed by ids of type {stored}, and"
        f" {source.name!r} is now identified by {source.id_column!r} of type {id_type}: its id"
        f" column changed; drop that table (its outputs name rows by the old ids) and add the"
        f" listener again, or db.remove({identifier!r}, drop_outputs=True) in the process that runs it",
        listener=identifier,
        table=source.name,
    )


#: Longest name ``reactive`` gives a table or collection, in UTF-8 bytes: PostgreSQL's limit
#: (it silently truncates longer names, so two of them could become one table), the
#: shortest of the engines, so a database keeps its names on every engine.
MAX_NAME_BYTES = 63


def bounded_name(prefix: str, name: str) -> str:
    """``prefix + name``, or, past :data:`MAX_NAME_BYTES`, its start and a hash of all of it.

    Names that fit are unchanged, so existing databases keep theirs; longer ones stay
    readable and distinct however much they share.

    >>> bounded_name("_reactive_snapshot__", "docs")
    '_reactive_snapshot__docs'
    >>> [len(bounded_name("_p_", c * 80).encode()) for c in "aé"]
    [63, 62]
    """
    full = prefix + name
    encoded = full.encode("utf-8", "surrogatepass")
    if len(encoded) <= MAX_NAME_BYTES:
        return full
    digest = hashlib.sha256(encoded).hexdigest()[:12]
    # Cut at a character boundary: a UTF-8 sequence split in two is dropped whole.
    start = encoded[: MAX_NAME_BYTES - len(digest) - 1].decode("utf-8", "ignore")
    return f"{start}_{digest}"


@dc.dataclass(frozen=True, slots=True)
class TableInfo:
    """A watched table: its name, the column that identifies a row, and its columns."""

    name: str
    id_column: str
    columns: tuple[str, ...] = ()
    #: The change feed the table is followed from (``db.cdc.follow``), not the database: then
    #: ``reactive status`` does not take its absence from the database for a drop.
    feed: str | None = dc.field(default=None, compare=False, repr=False)


def same_but_case(name: str, names: Iterable[str]) -> str | None:
    """The one of ``names`` that differs from ``name`` only in case, if any: what a misspelt
    table or column name likely meant (PostgreSQL folds unquoted names to lower case).

    >>> same_but_case("Docs", ["notes", "docs"]), same_but_case("docs", ["docs"])
    ('docs', None)
    """
    return next((n for n in names if n.lower() == name.lower() and n != name), None)


#: reactive's own tables (collections) on every backend, outputs apart (listeners may read
#: those): checkpoints and positions, recorded errors, barrier marks, SQL snapshots.
OWN_TABLES = frozenset({"_reactive_checkpoints", "_reactive_errors", "_reactive_marks"})
OWN_TABLE_PREFIXES = ("_reactive_snapshot__",)


def own_table(name: str) -> bool:
    """Whether ``name`` is one of reactive's own tables, which no listener or monitor may follow:
    it computed reactive's own writes (a change at every save of a position, a failed row
    recording an error that is a change), or saw none of them (the marks are barriers).

    >>> own_table("_reactive_checkpoints"), own_table("_reactive_snapshot__docs"), own_table("docs")
    (True, True, False)
    """
    return name in OWN_TABLES or name.startswith(OWN_TABLE_PREFIXES)


def case_hint(name: str, names: Iterable[str]) -> str:
    """Which of ``names`` ``name`` may mean where only case differs, as the end of a "table not
    found" message (names are taken whole: a table made by ``CREATE TABLE Docs`` is ``docs`` on
    PostgreSQL, which folds unquoted names).

    >>> print(case_hint("Docs", ["docs", "notes"]))
     (names are taken as they are written, case included: did you mean 'docs'?)
    >>> case_hint("nope", ["docs"])
    ''
    """
    found = same_but_case(name, names)
    return f" (names are taken as they are written, case included: did you mean {found!r}?)" if found else ""


def warn_null_ids(table: TableInfo, count: int | None = None) -> None:
    """Say that rows of ``table`` have a NULL id (``count`` of them, where known): no output or
    error can name such a row, so no backend follows it until its id is set. The one message
    for every backend."""
    rows = "some rows" if count is None else f"{count} rows"
    log.warning(
        "%s of table %r have no id (%r is NULL): they are not followed (no output, no error) until their id is set",
        rows,
        table.name,
        table.id_column,
    )


def warn_unfollowed_ids(table: TableInfo, why: str, count: int | None = None) -> None:
    """Say that rows of ``table`` have an id no path can hold (``why``: "that is NaN or
    infinite", ``count`` of them where known), so no backend follows them. The one message for
    every backend (NULL ids: :func:`warn_null_ids`)."""
    rows = "some rows" if count is None else f"{count} rows"
    log.warning(
        "%s of table %r have an id (%r) %s: they are not followed (no output, no error)",
        rows,
        table.name,
        table.id_column,
        why,
    )


def identify_rows(
    table: str, columns: Sequence[str], primary_key: Sequence[str], id_column: str | None = None
) -> TableInfo:
    """The one place that decides which column identifies a table's rows.

    ``id_column`` when given (it must be a column), else a one-column primary key, else for
    reactive's own outputs tables (a chained listener's source) ``_source`` (on DuckDB they
    have no key: see ``Dialect.keyed_by``); a table without one gets
    :class:`~reactive.errors.MissingIdColumnError` saying what to pass.

    >>> identify_rows("docs", ("id", "text"), ("id",))
    TableInfo(name='docs', id_column='id', columns=('id', 'text'))
    >>> identify_rows("_outputs__embed__text", ("_source", "_output", "_fingerprint"), ()).id_column
    '_source'
    >>> identify_rows("notes", ("note_id", "body"), ())
    Traceback (most recent call last):
    ...
    reactive.errors.MissingIdColumnError: table 'notes' has no primary key: pass the column ... id_column='note_id'...
    """
    columns = tuple(columns)
    if id_column is not None:
        if id_column not in columns:
            raise ConfigurationError(
                f"id_column {id_column!r} is not a column of {table!r} (columns: {', '.join(columns)})", table=table
            )
        return TableInfo(table, id_column, columns)
    if len(primary_key) == 1:
        return TableInfo(table, primary_key[0], columns)
    if not primary_key and table.startswith(OUTPUTS_PREFIX) and SOURCE_FIELD in columns:
        return TableInfo(table, SOURCE_FIELD, columns)
    what = "has no primary key" if not primary_key else f"has a composite primary key ({', '.join(primary_key)})"
    raise MissingIdColumnError(
        f"table {table!r} {what}: pass the column that identifies a row, "
        f"e.g. Listener(..., select={table!r}, id_column={columns[0]!r}); columns: {', '.join(columns)}",
        table=table,
    )


@dc.dataclass(frozen=True, slots=True)
class VersionColumn:
    """A column the application moves forward on every write of a row: polls then read only
    the rows past the last version seen, not the whole table (the SQL backends).

    ``column`` is a timestamp (``updated_at``) or an integer counter that the application, or
    a trigger, sets on every insert and update. Given per table when connecting, as a name
    (the defaults below) or as a ``VersionColumn``::

        db = reactive.connect(uri, version_columns={"docs": "updated_at"})
        db = reactive.connect(uri, version_columns={"docs": VersionColumn("rev", overlap=100, full_diff_every=600)})

    **What a poll reads**: the rows whose version is at least *the highest version seen,
    minus* ``overlap``, and the rows whose version is NULL (a NULL version counts as
    "maybe changed": such rows are read by every poll). Each row read is compared with its
    fingerprint in the snapshot, so a row read again is reported only if it changed. The
    ``>=`` (not ``>``) is what keeps a row written later *with the same version* as the
    highest seen (two writes in one clock tick, a counter value taken twice) from being
    missed. ``overlap`` widens the window for writers whose versions commit out of order: a
    timestamp taken at the start of a transaction that commits later (PostgreSQL's ``now()``
    is the transaction's start), a sequence value taken before a slow commit. A row
    committed with a version older than the window is found by the next full diff.

    ``overlap``: in seconds (or a ``timedelta``) for a timestamp, in units for an integer;
    default 1 second for a timestamp, 0 for an integer. ``full_diff_every``: seconds between
    full diffs (the whole table against the snapshot, as without a version column), which
    find **deletes** and rows written without moving the version; default 60; 0 makes every
    poll a full diff; None never runs one on a timer (deletes are then never seen, except
    after ``db.cdc.listener.request_full_diff()``).

    The highest version seen and the time of the last full diff are saved in the
    checkpoint ``reactive`` (section ``snapshot/<table>``) once the changes they cover are
    processed, so a restart goes on from there. **Index the column** (``CREATE INDEX ON
    docs (updated_at)``): without an index PostgreSQL and SQLite read the whole table to
    find the recent rows (DuckDB needs none). A version column that does not exist, or is
    neither a timestamp nor an integer, is refused by ``db.add``.

    >>> VersionColumn("updated_at")
    VersionColumn(column='updated_at', overlap=None, full_diff_every=60.0)
    >>> VersionColumn("rev", overlap=-1)
    Traceback (most recent call last):
    ...
    reactive.errors.ConfigurationError: version column 'rev': overlap must be a number >= 0 or a timedelta, not -1
    """

    column: str
    overlap: float | int | _dt.timedelta | None = None
    full_diff_every: float | None = 60.0

    def __post_init__(self) -> None:
        if not isinstance(self.column, str) or not self.column:
            raise ConfigurationError(f"a version column is a column name, not {self.column!r}")
        for field in ("overlap", "full_diff_every"):  # numpy's numbers as Python's
            object.__setattr__(self, field, checks.plain(getattr(self, field)))
        overlap = self.overlap
        if not (
            overlap is None
            or (isinstance(overlap, _dt.timedelta) and overlap >= _dt.timedelta(0))
            or (
                isinstance(overlap, int | float)
                and not isinstance(overlap, bool)
                and math.isfinite(overlap)
                and overlap >= 0
            )
        ):
            raise ConfigurationError(
                f"version column {self.column!r}: overlap must be a number >= 0 or a timedelta, not {overlap!r}"
            )
        every = self.full_diff_every
        if every is not None and (
            isinstance(every, bool) or not isinstance(every, int | float) or not math.isfinite(every) or every < 0
        ):
            # NaN compared false with every elapsed time: no full diff, no delete, ever.
            raise ConfigurationError(
                f"version column {self.column!r}: full_diff_every must be seconds >= 0, or None for no full diff "
                f"on a timer, not {every!r}"
            )


def version_columns(value: Mapping[str, str | VersionColumn] | None) -> dict[str, VersionColumn]:
    """The ``version_columns`` connect option, checked: table name -> :class:`VersionColumn`.

    >>> version_columns({"docs": "updated_at"})
    {'docs': VersionColumn(column='updated_at', overlap=None, full_diff_every=60.0)}
    >>> version_columns({"docs": 3})
    Traceback (most recent call last):
    ...
    reactive.errors.ConfigurationError: version_columns['docs'] must be a column name or a VersionColumn, not 3
    """
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigurationError(f"version_columns maps table names to version columns, not {value!r}")
    checked: dict[str, VersionColumn] = {}
    for table, spec in value.items():
        if not isinstance(table, str) or not table:
            raise ConfigurationError(f"version_columns: {table!r} is not a table name")
        if isinstance(spec, str):
            spec = VersionColumn(spec)
        if not isinstance(spec, VersionColumn):
            raise ConfigurationError(
                f"version_columns[{table!r}] must be a column name or a VersionColumn, not {spec!r}", table=table
            )
        checked[table] = spec
    return checked


@dc.dataclass(frozen=True, slots=True)
class OutputBatch:
    """Outputs to store, as columns: the source row ids, the outputs, the fingerprints of
    their inputs (one entry per row, no object per row).

    ``new`` says, for every row (a bool) or row by row, that no output was stored for the row
    when its batch started, so a store may insert instead of upsert (it must still cope with
    a row that exists after all).

    >>> batch = OutputBatch([7, 8, 9], ["a", "b", "c"], [1, 2, 3], new=[True, False, True])
    >>> part = batch.take([0, 2])
    >>> list(part.sources), list(part.outputs), part.is_new(1), len(part)
    ([7, 9], ['a', 'c'], True, 2)
    """

    sources: Sequence[Any]
    outputs: Sequence[Any]
    fingerprints: Sequence[int]
    new: bool | Sequence[bool] = False

    def __len__(self) -> int:
        return len(self.sources)

    def is_new(self, index: int) -> bool:
        return self.new if isinstance(self.new, bool) else bool(self.new[index])

    def take(self, indexes: Sequence[int], outputs: Sequence[Any] | None = None) -> OutputBatch:
        """These rows only (their outputs replaced by ``outputs`` when given)."""
        new = self.new if isinstance(self.new, bool) else [self.new[i] for i in indexes]
        return OutputBatch(
            [self.sources[i] for i in indexes],
            [self.outputs[i] for i in indexes] if outputs is None else outputs,
            [self.fingerprints[i] for i in indexes],
            new,
        )


@dc.dataclass(frozen=True, slots=True)
class OutputRejected:
    """An output the store could not keep (it does not fit the outputs' type)."""

    error: str


@dc.dataclass(frozen=True, slots=True)
class ErrorRecord:
    """A row a listener could not process. ``error`` is kept as every database can store it
    (:func:`storable_text`): a message quoting an odd input must not lose the record; and with
    the password of any URI it quotes as ``***`` (a model's error naming the service it calls
    with credentials), as every message of reactive shows one."""

    listener: str
    table: str
    source: Any
    error: str
    at: _dt.datetime = dc.field(default_factory=lambda: _dt.datetime.now(_dt.UTC))

    def __post_init__(self) -> None:
        object.__setattr__(self, "error", storable_text(redact_text(self.error)))


def error_time(stored: _dt.datetime | str) -> _dt.datetime:
    """An error record's ``at`` as every store gives it back: an aware time in UTC. SQLite keeps
    it as ISO 8601 text, MongoDB as BSON's UTC time, which pymongo reads without a zone.

    >>> error_time("2026-11-29T18:26:43.712247+00:00")
    datetime.datetime(2026, 11, 29, 18, 26, 43, 712247, tzinfo=datetime.timezone.utc)
    >>> error_time(_dt.datetime(2026, 11, 29, 18, 26))
    datetime.datetime(2026, 11, 29, 18, 26, tzinfo=datetime.timezone.utc)
    """
    at = _dt.datetime.fromisoformat(stored) if isinstance(stored, str) else stored
    return at.replace(tzinfo=_dt.UTC) if at.tzinfo is None else at.astimezone(_dt.UTC)


def storable_text(text: str) -> str:
    """``text`` with what some database's text cannot hold written as an escape: a lone
    surrogate (no database's: it is not UTF-8) and the NUL character (PostgreSQL's).

    >>> storable_text("bad \\udc80 input \\x00!"), storable_text("fine, é")
    ('bad \\\\udc80 input \\\\x00!', 'fine, é')
    """
    if "\x00" not in text and is_utf8(text):
        return text
    return text.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")


# -- the roles a backend provides ---------------------------------------------------------
class SourceReader(Protocol):
    """Reads the tables listeners watch. Safe to call from several threads."""

    def describe(self, table: str, *, id_column: str | None = None) -> TableInfo:
        """Describe ``table``; raise TableNotFoundError or MissingIdColumnError."""

    def table_exists(self, table: str) -> bool: ...

    def count(self, table: TableInfo, *, where: Mapping[str, Any] | None = None) -> int:
        """The rows of ``table`` reactive follows; with ``where``, at least those that satisfy it
        (narrowed as :meth:`scan` narrows: never fewer, possibly more)."""

    def read_rows(self, table: TableInfo, ids: Sequence[Any]) -> dict[Hashable, Row]:
        """The current rows with these ids, keyed by :func:`~reactive.events.id_key`."""

    def existing_ids(self, table: TableInfo, ids: Sequence[Any]) -> set[Hashable]:
        """The :func:`~reactive.events.id_key` of those ``ids`` that are rows of ``table``."""

    def scan(
        self,
        table: TableInfo,
        *,
        columns: Sequence[str] | None,
        page_size: int,
        where: Mapping[str, Any] | None = None,
    ) -> Iterator[Sequence[Row]]:
        """Every row, in pages of at most ``page_size``, in no promised order (DuckDB streams
        one statement; other engines page by id); each row includes the id column (a page may
        be :class:`~reactive.rows.TableRows`: take a column with :func:`~reactive.rows.column_of`).
        ``where`` (field -> value) are equalities the caller compares each row with afterwards:
        a source may leave out rows that cannot satisfy them, never one that can, or ignore it."""


@runtime_checkable
class TableReader(Protocol):
    """A :class:`SourceReader` that can also return rows as one Arrow table."""

    def read_table(self, table: TableInfo, ids: Sequence[Any]) -> TableRows | None:
        """The current rows with these ids, in any order, as one table; None where this table's
        rows do not come as one (the engine's driver gives rows, or they need decoding)."""


class OutputStore(Protocol):
    """Where a listener's outputs live: ``_source``, ``_output``, ``_fingerprint`` per row.

    A store whose database cannot hold some values of a type (PostgreSQL's text and the NUL
    character) may also have ``refused_outputs(output_type, outputs) -> {position: why}``: the
    writer asks it before writing, and records those rows as failed. One that cannot name
    some identifiers' outputs (MongoDB: no ``$``) may have ``check_identifier(identifier)``,
    which raises ``ConfigurationError`` at ``db.add``.
    """

    def create_outputs(self, identifier: str, source: TableInfo, output_type: str) -> None:
        """Create where ``identifier``'s outputs of ``output_type`` go (if the store needs it)."""

    def store_outputs(
        self, identifier: str, output_type: str, batch: OutputBatch, stored: list[Any], positions: Sequence[int]
    ) -> None:
        """Upsert ``batch`` (its outputs normalized to ``output_type``); for a row ``k`` the
        database refused, put an :class:`OutputRejected` at ``stored[positions[k]]``."""

    def delete_outputs(self, identifier: str, ids: Sequence[Any]) -> None: ...

    def output_fingerprints(self, identifier: str, ids: Sequence[Any]) -> dict[Hashable, int]:
        """Input fingerprints of the stored outputs for these source ids."""

    def scan_output_fingerprints(self, identifier: str, *, page_size: int) -> Iterator[list[tuple[Any, int]]]:
        """Every stored ``(source id, input fingerprint)``, in pages of at most ``page_size``,
        in no promised order."""

    def read_outputs(self, identifier: str) -> list[dict[str, Any]]: ...

    def drop_outputs(self, identifier: str) -> None: ...


class ErrorStore(Protocol):
    """``_reactive_errors``: rows a listener could not process."""

    def record_errors(self, records: Sequence[ErrorRecord]) -> None: ...

    def read_errors(self, listener: str | None = None) -> list[dict[str, Any]]: ...

    def clear_errors(self, listener: str, sources: Sequence[Any] | None = None) -> None:
        """Forget ``listener``'s errors (of these source ids only, when given)."""


class CheckpointStore(Protocol):
    """The engine's named JSON values (positions, output types): :class:`reactive.checkpoints.Positions`
    over the backend's :class:`~reactive.checkpoints.SectionStore` (``_reactive_checkpoints``)."""

    def load_checkpoint(self, name: str) -> dict[str, Any] | None: ...

    def save_checkpoint(self, name: str, value: Mapping[str, Any]) -> None: ...

    def delete_checkpoint(self, name: str) -> None: ...


@dc.dataclass(frozen=True, slots=True)
class ListenerHooks:
    """What a change listener may ask of ``db.cdc`` (passed to its constructor).

    ``reconcile(tables, abandon)`` queues what brings every component on ``tables`` up to
    date with the source (after lost history, missed notifications, or a table replaced
    under the listener), giving up when ``abandon`` is set. ``table_gone(table, why)``
    reports a watched table that was dropped or renamed: its components stop.
    ``may_report(abandon)`` says whether this process may tell its table monitors of a change
    now (it holds the lease; it may wait while that is not known, giving up at ``abandon``).
    """

    reconcile: Callable[[list[str], threading.Event], None] = lambda tables, abandon: None
    table_gone: Callable[[str, str], None] = lambda table, why: None
    may_report: Callable[[threading.Event], bool] = lambda abandon: True


class DataBackend(ABC):
    """A connection to one database, and the roles the engine uses.

    Subclasses set the roles in their constructor and say how to connect and which change
    listener follows their tables. Every role must be safe to call from several threads
    (the handler thread, the change listener thread and the user's thread).
    """

    #: Registry name, used by :class:`~reactive.cdc.DatabaseListenerFactory`.
    name: ClassVar[str]
    #: URI schemes :func:`reactive.connect` routes to this backend.
    schemes: ClassVar[tuple[str, ...]]
    #: The change listener class this backend's changes come from.
    listener_class: ClassVar[type[BaseDatabaseListener]]
    #: Whether a table monitor needs the table's row ids (polling and streams report rows by
    #: id; Kinetica's monitors publish records and counts, so a table without a key works).
    monitors_need_ids: ClassVar[bool] = True

    source: SourceReader
    outputs: OutputStore
    errors: ErrorStore
    #: Where every checkpoint lives (``reactive.checkpoints.Table`` and the engine's positions).
    sections: SectionStore
    #: ``Positions(self.sections)``: the engine's named JSON values.
    checkpoints: CheckpointStore
    #: Built on ``checkpoints`` (``OutputTypes(self.checkpoints)``); a store may need it to
    #: decode what it reads back.
    output_types: OutputTypes

    @classmethod
    @abstractmethod
    def from_uri(cls, uri: str, **options: Any) -> Self:
        """Connect. Errors name the URI with its password redacted."""

    @property
    @abstractmethod
    def uri(self) -> str:
        """The connection URI, password redacted."""

    @abstractmethod
    def create_listener(self, queue: CDCQueue, hooks: ListenerHooks, **options: Any) -> BaseDatabaseListener:
        """The change listener that follows this database's tables."""

    @abstractmethod
    def close(self) -> None: ...

    def is_transient(self, exc: BaseException) -> bool:
        """Whether ``exc`` means the database is unreachable for now (retry), not bad data."""
        return False

    #: Whether :meth:`transaction` is atomic: then the handler writes a window's outputs and
    #: positions together in one (and checks the lease inside it).
    transactional: ClassVar[bool] = False

    def transaction(self) -> AbstractContextManager[None]:
        """A context whose writes are atomic, where the database has transactions."""
        return contextlib.nullcontext()

    def row_format(self, table: TableInfo) -> RowFormat:
        """The Avro record a row of ``table`` is written in for ``INSERT_RAW`` monitor callbacks."""
        raise ConfigurationError(f"the {self.name} backend offers no table monitors")

    def stopping(self, seconds: float) -> AbstractContextManager[None]:
        """A context inside which every wait for a lock another client holds ends within
        ``seconds`` (then fails as the driver's timeout would): a stop does not wait out a
        driver's own timeout. Default: nothing to cut (the driver's waits are short)."""
        return contextlib.nullcontext()

    def promptly(self, seconds: float) -> AbstractContextManager[None]:
        """A context inside which this thread waits at most ``seconds`` for the database (its
        connection, a lock another client holds): ``info()`` answers with what it knows.
        Default: the driver's own timeouts."""
        return contextlib.nullcontext()


class BaseDatabaseListener(ReactiveThread):
    """A backend's change source: a thread that puts change packets on the shared queue.

    One instance serves every watched table of a datalayer. It is the
    :class:`~reactive.events.ChangeSource` of its packets: the handler calls :meth:`commit`
    with the ``position`` of each packet once the packet is processed (a listener never
    persists a position earlier than that), or :meth:`release` when it gave up on it.

    Table monitors (:mod:`reactive.monitor`) subscribe to a table with :meth:`subscribe`:
    they receive every change as the source reports it, before the handler coalesces
    anything, on their own threads.
    """

    def __init__(
        self,
        queue: CDCQueue,
        *,
        name: str,
        hooks: ListenerHooks | None = None,
        poll_interval: float = 1.0,
        page_size: int = 5_000,
    ) -> None:
        super().__init__(f"{name}-listener")
        self.backend_name = name
        self.queue = queue
        self.hooks = hooks or ListenerHooks()
        self.poll_interval = poll_interval
        self.page_size = page_size
        self._tables: dict[str, TableInfo] = {}
        self._monitors: dict[str, list[MonitorSink]] = {}
        #: Sinks subscribed but not yet delivered to, by id, with the barrier that arms them.
        self._arming: dict[int, Any] = {}
        self._lock = threading.RLock()
        #: Notified whenever the listener's state changes (packets settled, a stop, ...).
        self._changed = threading.Condition(self._lock)
        #: The thread's loop returned or raised (see :meth:`run`).
        self._over = False
        self._in_flight = 0
        #: Packets emitted and settled (committed or released) so far: the handler settles
        #: them in the order they were queued.
        self._emitted = 0
        self._settled = 0
        #: Calls of :meth:`release` (and outputs found lost, which a listener reconciles) so far:
        #: ``wait_idle`` waits again when it moved meanwhile.
        self.releases = 0
        self.counters = {"inserts": 0, "updates": 0, "deletes": 0}
        self.last_error: str | None = None

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

    def forget(self, table: str) -> None:
        """Drop what following ``table`` kept (a polling backend's snapshot), once nothing
        watches it: it is then followed afresh, by whatever id column, when watched again.
        Backends that keep nothing per table do nothing."""

    # -- table monitors -------------------------------------------------------------------
    def subscribe(self, table: TableInfo, sink: MonitorSink) -> None:
        """Deliver ``table``'s changes to ``sink`` from now on (the table is watched too).

        Returns once the source follows the table for the sink: on a push backend once the
        stream or server-side monitor is subscribed, on a polling backend once a poll that
        started after this call has finished (its baseline).
        """
        with self._lock:
            self._monitors.setdefault(table.name, []).append(sink)
            self._arming[id(sink)] = None
        try:
            if table.name not in self.tables:
                self.watch(table)
            self._arm_after_barrier(sink)
        except BaseException:
            self.unsubscribe(table.name, sink)
            raise

    def _arm_after_barrier(self, sink: MonitorSink) -> None:
        """Start delivering to ``sink`` at a point of the source that comes after this call.

        Until it is armed, :meth:`monitors` leaves it out: what the source reports from before
        the monitor started (a poll against an old snapshot, a stream reopened a little in the
        past) never reaches it. Backends arm it on their own thread at a barrier; this default
        arms it at once.
        """
        self._arm(lambda target: True)

    def _arm(self, reached: Callable[[Any], bool]) -> None:
        """Arm every pending sink whose target ``reached(target)`` says is passed."""
        with self._changed:
            for key, target in list(self._arming.items()):
                if reached(target):
                    del self._arming[key]
            self._changed.notify_all()

    def unsubscribe(self, table: str, sink: MonitorSink) -> None:
        """Stop delivering to ``sink``; nothing is delivered to it after this returns."""
        with self._lock:
            sinks = self._monitors.get(table, [])
            if sink in sinks:
                sinks.remove(sink)
            if not sinks:
                self._monitors.pop(table, None)
            self._arming.pop(id(sink), None)

    def monitors(self, table: str) -> list[MonitorSink]:
        """The armed sinks subscribed to ``table`` (a copy)."""
        with self._lock:
            return [sink for sink in self._monitors.get(table, ()) if id(sink) not in self._arming]

    def monitored(self, table: str) -> bool:
        """Whether a sink is subscribed to ``table``, armed or not."""
        with self._lock:
            return bool(self._monitors.get(table))

    #: What the database calls a table, in log lines.
    table_noun: ClassVar[str] = "table"

    def _report_gone(self, table: str, why: str) -> None:
        """A watched table was dropped or renamed (``why``): stop following it and say so once."""
        log.warning("%s %r was %s: its listeners stop; their outputs are kept", self.table_noun, table, why)
        self.unwatch(table)
        with self._lock:
            # Armed or not: a monitor subscribed while the table went (one subscribed again at a
            # takeover after it was dropped) would otherwise wait on a table that is gone.
            subscribed = list(self._monitors.get(table, ()))
        for sink in subscribed:
            sink.table_dropped(why)
        self.hooks.table_gone(table, why)

    # -- packets --------------------------------------------------------------------------
    def report(self, packet: ChangePacket) -> None:
        """A change as the source reported it: the table's monitors see it (once: see
        :meth:`_for_monitors`), then it is queued."""
        sinks = self.monitors(packet.table)
        if sinks and self.hooks.may_report(self.stopped_event):
            change = self._for_monitors(packet)
            if change is not None:
                for sink in sinks:
                    sink.deliver(change, self.stopped_event)
        self.emit(packet)

    def _for_monitors(self, packet: ChangePacket) -> SourceChange | None:
        """What of ``packet`` the table's monitors are told (None: nothing). All of it, except
        where a source delivers again the changes of packets the handler released
        (:meth:`redeliver`): the monitors were told of them the first time."""
        return SourceChange.of(packet)

    def emit(self, packet: ChangePacket) -> None:
        """Put ``packet`` on the queue, waiting while the queue is full; it is in flight
        until the handler commits or releases it."""
        with self._changed:
            self._in_flight += 1
            self._emitted += 1
        try:
            self.queue.put(packet, abandon=self.stopped_event)
        except BaseException:
            self._settle(1)
            raise
        self.counters[packet.event.counter] += len(packet)

    def run(self) -> None:
        """The thread: :meth:`_follow`, then its end is said to every waiter, however it ended
        (a loop that raised ended the thread while waiters saw it running: a table monitor's
        start waited for its barrier for ever)."""
        try:
            self._follow()
        finally:
            with self._changed:
                self._over = True
                self._changed.notify_all()

    def _follow(self) -> None:
        """The listener's loop, until it is stopped (each backend's own)."""
        raise NotImplementedError

    def ending(self) -> bool:
        """Stopped or being stopped, or the loop is over: nothing more will be reported, so a
        wait for a barrier or a poll gives up. Not ``is_alive()`` alone: woken by the thread's
        last notification, a waiter still sees it alive and waits on for nothing (the whole of
        ``wait_idle``'s timeout, when a stand-down stopped the listener under it)."""
        return not self.should_keep_running() or self._over or not self.is_alive()

    def wait_for(self, predicate: Callable[[], bool], timeout: float | None = None) -> bool:
        """Wait until ``predicate()`` holds; it is checked whenever the listener's state changes.

        >>> # db.cdc.listener.wait_for(lambda: db.cdc.listener.history_lost > 0, timeout=30)
        """
        with self._changed:
            return self._changed.wait_for(predicate, timeout)

    def _settle(self, packets: int) -> None:
        with self._changed:
            self._in_flight -= packets
            self._settled += packets
            self._changed.notify_all()

    def wait_settled(self) -> bool:
        """Wait until every packet emitted before this call is committed or released (False
        when the listener stops first). A reconciliation that follows changes the listener
        reported waits so: their outputs are written before it reads the stored ones, so an
        output the packets wrote for a row gone since (inserted, then deleted or re-keyed) is
        found and removed."""
        with self._changed:
            emitted = self._emitted
            while self._settled < emitted:
                if not self.should_keep_running():
                    return False
                self._changed.wait(0.5)
            return True

    def on_stop(self) -> None:
        self.queue.wake_producers()
        with self._changed:
            self._changed.notify_all()

    def commit(self, positions: Sequence[Any]) -> None:
        """The packets with these positions are processed and their positions saved."""
        self._settle(len(positions))

    def release(self, positions: Sequence[Any]) -> None:
        """The handler gave up on packets with these positions: deliver their changes again."""
        try:
            self.redeliver(positions)
        finally:
            with self._changed:
                self.releases += 1
            self._settle(len(positions))

    @abstractmethod
    def save_positions(self, positions: Sequence[Any]) -> None:
        """Persist the positions of processed packets (called from the handler thread, in
        the window's transaction where there is one: it may run again for the same positions)."""

    @abstractmethod
    def redeliver(self, positions: Sequence[Any]) -> None:
        """Arrange for the changes of unprocessed packets to be queued again."""

    @abstractmethod
    def sync(self, timeout: float | None) -> bool:
        """Wait until every change committed in the database before this call is queued."""

    def info(self) -> dict[str, Any]:
        return {
            "backend": self.backend_name,
            "running": self.is_alive(),
            "tables": sorted(self.tables),
            **self.counters,
            "in_flight": self._in_flight,  # packets queued, not yet committed or released
            "last_error": self.last_error,
        }

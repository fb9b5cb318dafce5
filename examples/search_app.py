"""A search endpoint whose answers follow a table that other processes keep editing.

    python examples/search_app.py --uri sqlite:///docs.sqlite --port 8000 [--model minilm]

The app embeds the ``text`` of every row of table ``docs`` (created with a few rows if
missing, in a SQLite file; another database must have it), keeps a
:class:`~reactive.components.VectorIndex` over the embeddings fresh, and serves:

- ``GET /search?q=<text>&k=3`` -> ``{"query": ..., "results": [{"id", "distance", "text"}]}``;
  with ``&fresh=1`` it first waits until every change committed before the request is
  indexed (``db.cdc.wait_idle()``): read-your-writes for the client that just edited; if
  that takes longer than ``--fresh-timeout`` (30 s), it answers 503 with ``Retry-After``;
- ``GET /health`` -> ``{"ok": true, "rows": <rows indexed>}``.

Edit the table from anywhere (``sqlite3 docs.sqlite "insert into docs values (10, 'my cat
sleeps')"``) and the next search sees it. ``--model hash`` (the default) is a tiny
deterministic stand-in that needs nothing extra; ``--model minilm`` is all-MiniLM-L6-v2 (the
``embed`` extra). Stop it with Ctrl-C or SIGTERM: it closes the datalayer, which saves the index.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sqlite3
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import reactive
from reactive.components import Listener, Model, VectorIndex
from reactive.demo import LOADERS
from reactive.errors import ReactiveError, TableNotFoundError
from reactive.uri import file_path

SEED = [
    (1, "The cat sleeps on the warm windowsill."),
    (2, "Our dog loves long walks in the park."),
    (3, "The central bank raised interest rates again."),
    (4, "A new exhibition of modern sculpture opens at the museum."),
]


def ensure_table(uri: str) -> None:
    """Create ``docs`` with a few rows in a SQLite file that has none (another process may too)."""
    if not uri.startswith("sqlite:"):
        return
    with sqlite3.connect(file_path(uri)) as con:
        con.execute("CREATE TABLE IF NOT EXISTS docs (id INTEGER PRIMARY KEY, text TEXT)")
        con.executemany("INSERT OR IGNORE INTO docs VALUES (?, ?)", SEED)


class NotFresh(Exception):
    """The index did not catch up in time: the server's state, not the client's request (503)."""


def make_handler(db: reactive.Datalayer, index: VectorIndex, fresh_timeout: float) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            url = urlsplit(self.path)
            params = {key: values[-1] for key, values in parse_qs(url.query).items()}
            try:
                if url.path == "/health":
                    self.answer(200, {"ok": True, "rows": len(index)})
                elif url.path == "/search":
                    self.answer(200, self.search(params))
                else:
                    self.answer(404, {"error": f"no route {url.path}; try /search?q=...&k=3"})
            except NotFresh as exc:  # not the client's fault: try again soon
                self.answer(503, {"error": str(exc)}, {"Retry-After": "1"})
            except (ValueError, ReactiveError) as exc:  # a bad query: the client's to fix
                self.answer(400, {"error": str(exc)})

        def search(self, params: dict[str, str]) -> dict[str, Any]:
            query = params.get("q", "").strip()
            if not query:
                raise ValueError("give a query: /search?q=<text>")
            given = params.get("k", "3")
            k = int(given) if given.strip().isdecimal() else given  # anything else: db.search says why
            if params.get("fresh") in ("1", "true", "yes") and not db.cdc.wait_idle(timeout=fresh_timeout):
                raise NotFresh(f"the index did not catch up within {fresh_timeout:g} s; try again")
            hits = db.search(index.identifier, query, k=k, rows=True)
            results = [
                {"id": hit["_source"], "distance": round(hit["_distance"], 4), "text": hit["row"]["text"]}
                for hit in hits
            ]
            return {"query": query, "results": results}

        def answer(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:  # one line per request, on stderr
            sys.stderr.write(f"{self.address_string()} {format % args}\n")

    return Handler


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--uri", default="sqlite:///docs.sqlite", help="the database (default sqlite:///docs.sqlite)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--model", choices=sorted(LOADERS), default="hash")
    parser.add_argument(
        "--fresh-timeout", type=float, default=30.0, help="seconds a &fresh=1 search waits for the index (then 503)"
    )
    args = parser.parse_args(argv)
    if not args.fresh_timeout > 0:
        parser.error(f"--fresh-timeout must be a number of seconds above 0, not {args.fresh_timeout:g}")

    ensure_table(args.uri)
    embedder = LOADERS[args.model]()
    embed = Model("embed", predict=embedder.predict, output_type="array<float32>")
    db = reactive.connect(args.uri, poll_interval=0.2)
    try:
        try:
            db.add(Listener(embed, "text", "docs"), progress=False)
        except TableNotFoundError as exc:
            print(
                f"search_app: {exc}; the app creates it in a SQLite file only: create it (id INTEGER PRIMARY KEY,"
                " text VARCHAR) or use --uri sqlite:///docs.sqlite",
                file=sys.stderr,
            )
            return 2
        index = db.add(VectorIndex("docs_search", listener="embed__text", query_model=embed), progress=False)
        assert isinstance(index, VectorIndex)
        db.cdc.start()
        server = ThreadingHTTPServer((args.host, args.port), make_handler(db, index, args.fresh_timeout))
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
        print(f"listening on http://{args.host}:{server.server_port} ({embedder.description})", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            stop.wait()
        server.shutdown()
        server.server_close()
    finally:
        db.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

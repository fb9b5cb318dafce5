"""examples/search_app.py: a search endpoint over a table another process keeps editing."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

APP = Path(__file__).resolve().parents[1] / "examples" / "search_app.py"


def get(base: str, path: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(base + path, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@contextlib.contextmanager
def serving(database: Path, *options: str) -> Iterator[str]:
    """The app on a SQLite file, as its own process; its base URL. Stopped with SIGTERM after,
    which must end it cleanly (it closes the datalayer, which saves the index)."""
    app = subprocess.Popen(
        [sys.executable, str(APP), "--uri", f"sqlite:///{database}", "--port", "0", *options],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(APP.parents[1])},
    )
    try:
        assert app.stdout is not None
        line = app.stdout.readline()
        assert line.startswith("listening on http://"), line
        yield line.split()[2]
    finally:
        app.send_signal(signal.SIGTERM)
        assert app.wait(timeout=60) == 0


def test_the_search_app_answers_follow_another_process_edits(tmp_path: Path) -> None:
    database = tmp_path / "docs.sqlite"
    with serving(database) as base:
        assert get(base, "/health") == (200, {"ok": True, "rows": 4})
        status, body = get(base, "/search?q=cat+sleeps+windowsill&k=1")
        assert status == 200 and body["results"][0]["id"] == 1

        # Another process (this one, with plain sqlite3) edits the table.
        with sqlite3.connect(database) as editor:
            editor.execute("INSERT INTO docs VALUES (10, 'a parrot repeats every word it hears')")
            editor.execute("UPDATE docs SET text = 'stock markets fell sharply' WHERE id = 2")
            editor.execute("DELETE FROM docs WHERE id = 1")
        status, body = get(base, "/search?q=parrot+repeats+word&k=1&fresh=1")
        assert (status, body["results"][0]["id"]) == (200, 10)
        status, body = get(base, "/search?q=stock+markets+fell&k=1&fresh=1")
        assert body["results"][0] == {
            "id": 2,
            "distance": body["results"][0]["distance"],
            "text": "stock markets fell sharply",
        }
        status, body = get(base, "/search?q=cat+sleeps+windowsill&k=10&fresh=1")
        assert 1 not in [hit["id"] for hit in body["results"]] and len(body["results"]) == 4

        assert get(base, "/search?q=x&k=0")[0] == 400  # a bad query is the client's error
        status, body = get(base, "/search?q=x&k=abc")
        assert status == 400 and "k must be a whole number of at least 1, not 'abc'" in body["error"]
        # A digit int() does not read (str.isdigit() took it): "invalid literal for int() ...".
        status, body = get(base, "/search?q=x&k=%C2%B2")
        assert status == 400 and "k must be a whole number of at least 1, not '²'" in body["error"]
        assert get(base, "/search")[0] == 400
        assert get(base, "/nowhere")[0] == 404
    assert (tmp_path / "docs.sqlite.reactive-indexes" / "docs_search.usearch").exists()  # saved at close


def test_the_search_app_says_what_is_missing_on_a_database_without_docs(tmp_path: Path) -> None:
    """It creates ``docs`` in a SQLite file only; elsewhere it printed a traceback ending in
    TableNotFoundError."""
    uri = f"duckdb:///{tmp_path / 'app.duckdb'}"
    app = subprocess.run(
        [sys.executable, str(APP), "--uri", uri, "--port", "0"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(APP.parents[1])},
    )
    assert app.returncode == 2 and "Traceback" not in app.stderr, app.stderr
    assert app.stderr.strip() == (
        f"search_app: table 'docs' does not exist in {uri}; the app creates it in a SQLite file only:"
        " create it (id INTEGER PRIMARY KEY, text VARCHAR) or use --uri sqlite:///docs.sqlite"
    )


def test_a_fresh_search_the_index_cannot_catch_up_with_is_503_and_retried_later(tmp_path: Path) -> None:
    """Waiting for the index past its time was a 400 (the client's fault), though only the
    server's state was wrong: here another client holds the SQLite file exclusive."""
    database = tmp_path / "docs.sqlite"
    with serving(database, "--fresh-timeout", "0.5") as base:
        locker = sqlite3.connect(database, isolation_level=None)
        locker.execute("INSERT INTO docs VALUES (10, 'a parrot repeats every word it hears')")
        locker.execute("BEGIN EXCLUSIVE")  # the app's polls cannot read the file meanwhile
        try:
            with urllib.request.urlopen(base + "/search?q=parrot&k=1&fresh=1", timeout=30) as response:
                raise AssertionError(f"answered {response.status} while the index could not catch up")
        except urllib.error.HTTPError as error:
            assert error.code == 503 and error.headers["Retry-After"] == "1"
            assert json.loads(error.read()) == {"error": "the index did not catch up within 0.5 s; try again"}
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        for _ in range(60):  # as a client told Retry-After would: the lock is gone, the index catches up
            status, body = get(base, "/search?q=parrot+repeats+word&k=1&fresh=1")
            if status != 503:
                break
        assert status == 200 and body["results"][0]["id"] == 10

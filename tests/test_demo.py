"""``reactive demo`` end to end, with the stand-in hash model (no torch needed)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys

import pytest

from reactive import demo
from reactive.cli import main


def section(output: str, number: int) -> str:
    """The text of the demo's numbered section ``number``."""
    match = re.search(rf"^{number}\. .*?(?=^\d\. |^Timing: |\Z)", output, re.S | re.M)
    assert match, f"no section {number} in:\n{output}"
    return match.group(0)


def test_demo_with_the_hash_model(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "demo.duckdb"
    assert main(["demo", "--uri", f"duckdb:///{path}", "--model", "hash"]) == 0
    out = capsys.readouterr().out
    assert "not a real embedding model" in out

    backfill = section(out, 1)
    backfilled = re.findall(r"^\s+(\d+)\s+.+?\s+64\s+[+-]\d\.\d{4}", backfill, re.M)
    assert [int(i) for i in backfilled] == [doc_id for doc_id, _ in demo.DOCS]

    changes = section(out, 2)
    assert sorted(int(i) for i in re.findall(r"^\s+new\s+(\d+)", changes, re.M)) == [i for i, _ in demo.INSERTS]
    updated = {int(i): float(cos) for i, cos in re.findall(r"^\s+updated\s+(\d+)\s.*?(-?\d\.\d{3})$", changes, re.M)}
    assert sorted(updated) == sorted(i for i, _ in demo.UPDATES)
    assert all(cos < 0.99 for cos in updated.values()), "an updated doc kept its old embedding"
    assert [int(i) for i in re.findall(r"^\s+removed\s+(\d+)", changes, re.M)] == list(demo.DELETES)
    assert "FAILED" not in changes
    assert changes.count("[ok]") == 3

    neighbours = re.findall(r"^\s+(\d)\s+(\d+)\s+(-?\d\.\d{3})\s+\S", section(out, 3), re.M)
    assert [int(rank) for rank, _, _ in neighbours] == [1, 2, 3]
    alive = {i for i, _ in demo.DOCS + demo.INSERTS} - set(demo.DELETES)
    assert {int(i) for _, i, _ in neighbours} <= alive
    scores = [float(score) for _, _, score in neighbours]
    assert scores == sorted(scores, reverse=True)

    counters = re.search(r"^\s+embed__text((?:\s+\d+){7})$", section(out, 4), re.M)
    assert counters, out
    inserts, updates, deletes, computed, _, errors, _ = map(int, counters.group(1).split())
    assert (inserts, updates, deletes, errors) == (len(demo.DOCS) + len(demo.INSERTS), len(demo.UPDATES), 1, 0)
    assert computed == len(demo.DOCS) + len(demo.INSERTS) + len(demo.UPDATES)
    assert re.search(r"^Timing: .*total \d+\.\d\d s$", out, re.M)

    # The commands it prints for what comes next run as printed (status: the listener, all current).
    status = re.search(r"^What the database holds now: (reactive status .+)$", out, re.M)
    errors = re.search(r"^Rows that failed, and why: +(reactive errors .+)$", out, re.M)
    assert status and errors, out
    assert main(shlex.split(status.group(1))[1:]) == 0
    listed = re.search(r"^embed__text\s+docs\s+(\d+)\s+(\d+)\s+0\s+0\s", capsys.readouterr().out, re.M)
    assert listed and listed.group(1) == listed.group(2)
    assert main(shlex.split(errors.group(1))[1:]) == 0
    assert "no errors recorded" in capsys.readouterr().out


def test_demo_refuses_an_existing_database_it_did_not_create(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "mine.duckdb"
    path.write_bytes(b"precious")
    assert main(["demo", "--uri", f"duckdb:///{path}", "--model", "hash"]) == 1
    assert "exists" in capsys.readouterr().err
    assert path.read_bytes() == b"precious"


def test_demo_needs_a_duckdb_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--uri", "duckdb://", "--model", "hash"]) == 1
    assert "DuckDB file" in capsys.readouterr().err
    assert main(["demo", "--uri", "postgresql://localhost/test", "--model", "hash"]) == 1
    assert "DuckDB file" in capsys.readouterr().err


def test_demo_refuses_a_uri_it_would_misread_and_writes_nothing(
    tmp_path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A query was dropped (a file "qq" made for duckdb:///qq?threads=4), and a file in a
    # missing directory ended in DuckDB's traceback.
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--uri", "duckdb:///qq?threads=4", "--model", "hash"]) == 1
    assert "takes no query" in capsys.readouterr().err
    assert main(["demo", "--uri", "duckdb:///nodir/x.duckdb", "--model", "hash"]) == 1
    assert "no directory 'nodir'" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_demo_leaves_its_default_file_alone_while_another_process_holds_it(
    tmp_path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # It deleted the file under the process using it, which then wrote to a file nobody
    # could open again.
    monkeypatch.chdir(tmp_path)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import duckdb, sys; c = duckdb.connect(sys.argv[1]); print('open', flush=True); sys.stdin.read()",
            demo.DEFAULT_URI.rpartition("/")[2],
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "open\n"
        assert main(["demo", "--model", "hash"]) == 1
        assert f"in use by process {holder.pid}" in capsys.readouterr().err
        assert (tmp_path / demo.DEFAULT_URI.rpartition("/")[2]).exists()
    finally:
        holder.communicate("")


def test_missing_model_package_says_how_to_install_it(
    tmp_path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in demo._QUIET_OFFLINE_ENV:  # restored afterwards: the loader sets them
        monkeypatch.setenv(name, "")
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)  # import fails
    assert main(["demo", "--uri", f"duckdb:///{tmp_path / 'demo.duckdb'}"]) == 1
    err = capsys.readouterr().err
    assert "make demo" in err and "pip install -e '.[embed]'" in err
    assert not (tmp_path / "demo.duckdb").exists()


def test_the_demo_runs_without_the_search_extra(
    tmp_path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A core install (pip install reactive-ml) has no usearch: ``reactive demo --model hash``,
    which the demo's own message offers as what runs without extras, stopped at its first
    step (``VectorIndex needs usearch``). It now runs, checks its outputs and skips the search."""
    monkeypatch.setitem(sys.modules, "usearch.index", None)  # import fails
    assert main(["demo", "--uri", f"duckdb:///{tmp_path / 'demo.duckdb'}", "--model", "hash"]) == 0
    out = capsys.readouterr().out
    assert section(out, 2).count("[ok]") == 3
    assert "skipped: VectorIndex needs usearch: pip install 'reactive-ml[search]'" in section(out, 3)


def test_python_dash_m_reactive_shows_the_demo_options() -> None:
    done = subprocess.run([sys.executable, "-m", "reactive", "demo", "--help"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "--model {minilm,hash}" in done.stdout
    assert "--uri" in done.stdout

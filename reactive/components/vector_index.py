"""``VectorIndex``: approximate nearest-neighbour search over a listener's fresh vector outputs.

The index is a component on the listener's outputs table (the chained-listener path): the
outputs a window writes or deletes reach the index in that same window, before its positions
are committed, so a search never returns a row whose output was deleted. It is an HNSW graph
built with usearch (``pip install 'reactive-ml[search]'``), kept in memory and saved to a
file next to the database (or in ``directory``). The file records, for every indexed row,
the fingerprint of the input its vector was computed from; when ``db.add`` loads it, the
outputs table is compared with it (the same reconciliation a listener's backfill runs), so
an index saved before a crash, or missing, or corrupt, is caught up or rebuilt.
"""

from __future__ import annotations

import dataclasses as dc
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Collection, Hashable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from reactive import checks
from reactive.backends.base import FINGERPRINT_FIELD, OUTPUT_FIELD, ErrorRecord, TableInfo, outputs_table
from reactive.components.base import Component, FailedRows, PlannedRefresh, Refresh
from reactive.components.model import Model
from reactive.errors import ConfigurationError, ModelOutputError, SearchError
from reactive.events import Batch, ChangePacket, DBEvent, id_key
from reactive.feed.wire import from_wire, to_wire
from reactive.reconcile import OnProcessed, reconcile
from reactive.threads import on_own_thread
from reactive.uri import file_path

if TYPE_CHECKING:
    from reactive.compute import Compute
    from reactive.datalayer import Datalayer

log = logging.getLogger(__name__)

METRICS = ("cos", "ip", "l2sq")
#: Seconds between two saves of an index that changed (it is also saved at db.close()).
DEFAULT_SAVE_EVERY = 10.0
#: A filtered search asks the graph for this many times ``k`` first, then twice as many...
OVERFETCH = 4
#: The longest index name (a file name is at most 255 bytes, and a suffix is added).
MAX_NAME_BYTES = 200
_FORMAT = 1
_VECTOR_TYPES = ("array<float16>", "array<float32>", "array<float64>")


def _usearch() -> Any:
    try:
        from usearch.index import Index
    except ImportError:
        raise ConfigurationError("VectorIndex needs usearch: pip install 'reactive-ml[search]'") from None
    return Index


def search_missing() -> str | None:
    """Why :class:`VectorIndex` cannot work in this install (the ``search`` extra missing), or None."""
    try:
        _usearch()
    except ConfigurationError as exc:
        return str(exc)
    return None


class _Entries:
    """What the index holds: per source row, its usearch key and the fingerprint of the input
    its vector came from. It answers the two questions a reconciliation asks an output store."""

    def __init__(self) -> None:
        self.by_key: dict[Hashable, tuple[int, Any, int]] = {}  # id key -> (label, source id, fingerprint)
        self.sources: dict[int, Any] = {}  # label -> source id
        self.next_label = 0

    def __len__(self) -> int:
        return len(self.by_key)

    def label_for(self, source: Any) -> tuple[int, bool]:
        """The label of ``source`` (a new one if it has none); whether it is indexed already."""
        entry = self.by_key.get(id_key(source))
        if entry is not None:
            return entry[0], True
        label, self.next_label = self.next_label, self.next_label + 1
        return label, False

    def put(self, label: int, source: Any, fingerprint: int) -> None:
        self.by_key[id_key(source)] = (label, source, fingerprint)
        self.sources[label] = source

    def pop(self, source: Any) -> int | None:
        entry = self.by_key.pop(id_key(source), None)
        if entry is None:
            return None
        self.sources.pop(entry[0], None)
        return entry[0]

    # What reconcile() asks of an output store.
    def output_fingerprints(self, identifier: str, ids: Sequence[Any]) -> dict[Hashable, int]:
        found = {}
        for key in map(id_key, ids):
            entry = self.by_key.get(key)
            if entry is not None:
                found[key] = entry[2]
        return found

    def scan_output_fingerprints(self, identifier: str, *, page_size: int) -> Iterator[list[tuple[Any, int]]]:
        entries = [(source, fp) for _, source, fp in list(self.by_key.values())]
        for start in range(0, len(entries), page_size):
            yield entries[start : start + page_size]

    # The index's description file.
    def to_json(self) -> list[Any]:
        return [[label, to_wire(source), fp] for label, source, fp in self.by_key.values()]

    @classmethod
    def from_json(cls, items: list[Any]) -> _Entries:
        entries = cls()
        for label, source, fp in items:
            entries.put(int(label), from_wire(source), int(fp))
        entries.next_label = max((int(item[0]) for item in items), default=-1) + 1
        return entries


@dc.dataclass(frozen=True, slots=True)
class SearchHit:
    """One result of :meth:`VectorIndex.search` (``db.search`` returns them as dicts)."""

    source: Any
    distance: float


def _as_float32(value: Any) -> np.ndarray:
    """``value`` as float32s (the index's type), numbers past its range made infinite without
    numpy's overflow warning: :func:`_not_finite` says which."""
    with np.errstate(over="ignore"):
        return np.asarray(value, dtype=np.float32)


def _not_finite(value: Any, vector: np.ndarray) -> str | None:
    """Why ``vector`` (``value`` as float32s) is not all finite, or None when it is.

    >>> _not_finite([1.0, float("nan")], _as_float32([1.0, float("nan")]))
    'NaN or infinity'
    >>> _not_finite([1e39], _as_float32([1e39]))
    'a number past what float32 holds (about 3.4e38): 1e+39'
    """
    if np.all(np.isfinite(vector)):
        return None
    wide = np.asarray(value, dtype=np.float64)
    past = wide[np.isfinite(wide) & ~np.isfinite(vector)]
    if len(past):
        return f"a number past what float32 holds (about 3.4e38): {past[0]:g}"
    return "NaN or infinity"


class VectorIndex(Component):
    """Nearest-neighbour search over the vectors a listener keeps fresh.

    >>> import duckdb, tempfile, reactive
    >>> from reactive.components import Listener, Model
    >>> path = tempfile.mkdtemp() + "/app.duckdb"
    >>> _ = duckdb.connect(path).execute(
    ...     "create table docs (id int primary key, x float);"
    ...     "insert into docs values (1, 1), (2, 0), (3, 0.9)")
    >>> embed = Model("xy", predict=lambda xs: [[x, 1 - x] for x in xs], output_type="array<float32>")
    >>> db = reactive.connect(f"duckdb:///{path}")
    >>> _ = db.add(Listener(embed, "x", "docs"))
    >>> _ = db.add(VectorIndex("near", listener="xy__x", metric="l2sq"))
    >>> [hit["_source"] for hit in db.search("near", [1.0, 0.0], k=2)]
    [1, 3]
    >>> db.close()

    ``metric`` is ``"cos"`` (a hit's ``_distance`` is 1 - the cosine similarity), ``"ip"`` (1 -
    the inner product, usearch's distance: negative for vectors longer than 1) or ``"l2sq"``
    (the squared Euclidean distance). ``query_model`` embeds text queries (``db.search(name, "text")``);
    without it a query is a vector. ``directory`` is where the index file goes (by default
    next to a DuckDB or SQLite file, else ``./reactive-indexes/<hash of the URI>``); it is
    saved at most every ``save_every`` seconds while it changes (0: after every window;
    ``math.inf``: only then), and at ``db.close()``. ``connectivity`` (at least 2) and
    ``expansion_search`` (at least 1) are the HNSW graph's degree and search breadth (usearch's
    defaults: 16 and 64; a larger ``expansion_search`` raises recall, costs speed). Settings out
    of range are a ``ConfigurationError`` here, not at the first vector.
    """

    def __init__(
        self,
        identifier: str,
        listener: str,
        *,
        metric: str = "cos",
        query_model: Model | None = None,
        directory: str | os.PathLike[str] | None = None,
        save_every: float = DEFAULT_SAVE_EVERY,
        connectivity: int | None = None,
        expansion_search: int | None = None,
    ) -> None:
        # The name is the index's file name: no path, no hidden file, no NUL, and short enough.
        plain = isinstance(identifier, str) and identifier and not identifier.startswith(".")
        if not plain or any(c in identifier for c in "/\\\x00") or len(identifier.encode()) > MAX_NAME_BYTES:
            raise ConfigurationError(
                f"an index needs a plain name of at most {MAX_NAME_BYTES} bytes (it names its file), not {identifier!r}"
            )
        if not isinstance(listener, str) or not listener:
            raise ConfigurationError("listener must be the identifier of a listener whose outputs are vectors")
        if metric not in METRICS:
            raise ConfigurationError(f"metric must be one of {', '.join(METRICS)}, not {metric!r}")
        if query_model is not None and not isinstance(query_model, Model):
            raise ConfigurationError(f"query_model must be a reactive Model, not {type(query_model).__name__}")
        # Checked here: usearch refuses a bad graph setting only at the first vector, and the
        # save's time check at every window, each failing every row of it.
        save_every = checks.seconds("save_every", save_every, zero=True, infinite=True)  # infinity: at db.close()
        if connectivity is not None:
            connectivity = checks.whole("connectivity", connectivity, least=2)
        if expansion_search is not None:
            expansion_search = checks.whole("expansion_search", expansion_search, least=1)
        self.identifier = identifier
        self.listener = listener
        self.metric = metric
        self.query_model = query_model
        self.directory = None if directory is None else Path(directory)
        self.save_every = save_every
        self.connectivity = connectivity
        self.expansion_search = expansion_search
        self._lock = threading.RLock()
        self._index: Any = None
        self._entries = _Entries()
        self._ndim: int | None = None
        # The version of the listener's model whose vectors the index last took (see _upsert).
        self._version: str | None = None
        self._path: Path | None = None
        self._dirty = False
        self._saved_at = 0.0
        self._failed = FailedRows(identifier)

    def __repr__(self) -> str:
        return f"VectorIndex({self.identifier!r}, listener={self.listener!r}, metric={self.metric!r})"

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def table(self) -> str:
        return outputs_table(self.listener)

    @property
    def path(self) -> Path | None:
        """The index's file (known once it is added)."""
        return self._path

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "listener": self.listener, "metric": self.metric, "rows": len(self)}

    # -- declaration ------------------------------------------------------------------------
    def prepare(self, db: Datalayer) -> TableInfo:
        from reactive.components.listener import Listener

        upstream = next((c for c in db.components() if c.identifier == self.listener), None)
        if not isinstance(upstream, Listener):
            added = ", ".join(c.identifier for c in db.components() if isinstance(c, Listener)) or "none"
            raise ConfigurationError(
                f"index {self.identifier!r}: no listener {self.listener!r} in this datalayer (listeners: {added}); "
                "add the listener first",
                listener=self.identifier,
            )
        kind = db.backend.output_types.get(self.listener) or upstream.model.output_type
        if kind is not None and kind not in _VECTOR_TYPES:
            raise ConfigurationError(
                f"index {self.identifier!r}: the outputs of {self.listener!r} are {kind}, not vectors of floats",
                listener=self.identifier,
            )
        _usearch()
        with self._lock:
            self._path = self._file(db)
            self._load(upstream.model.version)
        self._failed.load(db)
        return db.table_info(self.table)

    def _file(self, db: Datalayer) -> Path:
        directory = self.directory
        if directory is None:
            uri = db.backend.uri
            scheme = uri.split("://", 1)[0].split("+", 1)[0]
            database = file_path(uri) if scheme in ("duckdb", "sqlite") else ":memory:"
            if database != ":memory:":
                directory = Path(f"{database}.reactive-indexes")
            else:
                directory = Path("reactive-indexes") / hashlib.sha256(uri.encode()).hexdigest()[:16]
        return directory / f"{self.identifier}.usearch"

    # -- its file -------------------------------------------------------------------------------
    def _new_index(self, ndim: int) -> Any:
        options = {}
        if self.connectivity is not None:
            options["connectivity"] = self.connectivity
        if self.expansion_search is not None:
            options["expansion_search"] = self.expansion_search
        return _usearch()(ndim=ndim, metric=self.metric, dtype="f32", **options)

    def _load(self, version: str | None) -> None:
        """Load the saved index, or start empty (the backfill then fills it) when it is missing,
        another index's, or corrupt. A file that does not say which model version its vectors
        came from (saved before reactive recorded it) is taken as of ``version``, the model's now."""
        self._index, self._entries, self._ndim, self._dirty = None, _Entries(), None, False
        assert self._path is not None
        meta_path = self._path.with_suffix(".json")
        if not self._path.exists() and not meta_path.exists():
            return
        try:
            meta = json.loads(meta_path.read_text())
            data = self._path.read_bytes()
            if meta.get("format") != _FORMAT or meta.get("digest") != hashlib.sha256(data).hexdigest():
                raise ValueError("the file does not match its description (corrupt or half written)")
            if (meta.get("listener"), meta.get("metric")) != (self.listener, self.metric):
                raise ValueError(f"it indexes {meta.get('listener')!r} with metric {meta.get('metric')!r}")
            entries = _Entries.from_json(meta["entries"])
            index = self._new_index(int(meta["ndim"]))
            index.load(str(self._path))
            if len(index) != len(entries):
                raise ValueError(f"it holds {len(index)} vectors for {len(entries)} rows")
        except Exception as exc:
            log.warning("index %s: %s is not usable (%s); it is built again", self.identifier, self._path, exc)
            self._dirty = True
            return
        self._index, self._entries, self._ndim = index, entries, int(meta["ndim"])
        self._version = meta.get("model_version", version)
        self._saved_at = time.monotonic()

    def save(self) -> None:
        """Write the index and its description (each atomically; a digest ties the pair together)."""
        with self._lock:
            if self._path is None:
                return
            meta_path = self._path.with_suffix(".json")
            if self._index is None:
                self._path.unlink(missing_ok=True)
                meta_path.unlink(missing_ok=True)
            else:
                self._path.parent.mkdir(parents=True, exist_ok=True)
                data = bytes(self._index.save())
                meta = {
                    "format": _FORMAT,
                    "listener": self.listener,
                    "metric": self.metric,
                    "ndim": self._ndim,
                    "model_version": self._version,
                    "digest": hashlib.sha256(data).hexdigest(),
                    "entries": self._entries.to_json(),
                }
                _replace(self._path, data)
                _replace(meta_path, json.dumps(meta).encode())
            self._dirty = False
            self._saved_at = time.monotonic()

    def close(self, db: Datalayer) -> None:
        if self._dirty:
            self.save()

    def drop(self, db: Datalayer) -> None:
        """Forget every vector and delete the index's file."""
        with self._lock:
            self._index, self._entries, self._ndim = None, _Entries(), None
            self.save()

    # -- keeping it fresh -------------------------------------------------------------------------
    def reconcile(
        self, db: Datalayer, *, page_size: int, on_processed: OnProcessed | None = None
    ) -> Iterator[ChangePacket]:
        """The outputs whose vectors the index lacks or holds from another input, and the rows it
        holds that have no output any more."""
        reader = db.source_for(self.table)
        if not reader.table_exists(self.table):
            with self._lock:  # no outputs (yet, or any more): nothing to index
                if len(self._entries):
                    self._index, self._entries, self._ndim, self._dirty = None, _Entries(), None, True
            return iter(())
        return reconcile(
            reader,
            self._entries,  # type: ignore[arg-type] # the two lookups reconcile() makes
            db.table_info(self.table),
            identifier=self.identifier,
            columns=[FINGERPRINT_FIELD],
            current=lambda rows, stored: [
                s is not None and s == row.get(FINGERPRINT_FIELD) for row, s in zip(rows, stored, strict=True)
            ],
            page_size=page_size,
            on_processed=on_processed,
        )

    def plan_refresh(
        self,
        batch: Batch,
        db: Datalayer,
        *,
        compute: Compute,
        wait: Callable[[float], bool],
        in_flight: Collection[Hashable] = frozenset(),
    ) -> PlannedRefresh:
        # Nothing to compute or look up: the vectors come with the batch (or are read for it).
        upstream = next((c for c in db.components() if c.identifier == self.listener), None)
        version = getattr(getattr(upstream, "model", None), "version", self._version)

        def finish() -> Refresh:
            refresh = self._apply(batch, version)
            self._failed.settle(batch.ids, db, refresh)
            return refresh

        return PlannedRefresh((), finish)

    def set_apart(self, batch: Batch, db: Datalayer, error: str) -> Refresh:
        refresh = super().set_apart(batch, db, error)
        self._failed.settle(batch.ids, db, refresh)
        return refresh

    def recorded(self, ids: Sequence[Any]) -> None:
        self._failed.recorded(ids)

    def _apply(self, batch: Batch, version: str | None) -> Refresh:
        refresh = Refresh()
        with self._lock:
            if batch.event is DBEvent.delete:
                labels = [label for label in map(self._entries.pop, batch.ids) if label is not None]
                if labels and self._index is not None:
                    self._index.remove(labels)
                refresh.deleted.extend(batch.ids)
            else:
                self._upsert(batch, refresh, version)
            self._dirty = True
            if time.monotonic() - self._saved_at >= self.save_every:
                self.save()
        return refresh

    def _upsert(self, batch: Batch, refresh: Refresh, version: str | None) -> None:
        """Index the batch's vectors. The index holds vectors of one length; vectors of another
        length are errors of their rows, unless the listener's model ``version`` is not the one
        the index took vectors from: a new model (another embedding), whose outputs replace every
        row's, so the index starts again from them rather than refuse them all."""
        checked = [(source, row, *self._vector(row)) for source, row in zip(batch.ids, batch.rows, strict=True)]
        lengths = [len(vector) for _, _, vector, _ in checked if vector is not None]
        if self._ndim is not None and version != self._version and any(n != self._ndim for n in lengths):
            log.info(
                "index %s: the model of %s is now version %r, of vectors of %d numbers (were %d): the index starts"
                " again from its new outputs",
                self.identifier,
                self.listener,
                version,
                next(n for n in lengths if n != self._ndim),
                self._ndim,
            )
            self._index, self._entries, self._ndim = None, _Entries(), None
        if self._ndim is None and lengths:
            self._ndim = lengths[0]
        labels: list[int] = []
        vectors: list[np.ndarray] = []
        replaced: list[int] = []
        added: list[tuple[int, Any, int]] = []
        for source, row, vector, error in checked:
            if vector is not None and len(vector) != self._ndim:
                error = f"a vector of {len(vector)} numbers, where the index holds vectors of {self._ndim}"
                vector = None
            if vector is None:
                refresh.errors.append(ErrorRecord(self.identifier, batch.table, source, error or "no vector"))
                label = self._entries.pop(source)  # the vector it had is not current any more
                if label is not None:
                    replaced.append(label)
                continue
            label, known = self._entries.label_for(source)
            if known:
                replaced.append(label)
            labels.append(label)
            vectors.append(vector)
            added.append((label, source, int((row or {}).get(FINGERPRINT_FIELD) or 0)))
        if replaced and self._index is not None:
            self._index.remove(replaced)
        if vectors:
            self._version = version
            if self._index is None:
                self._index = self._new_index(len(vectors[0]))
            self._index.add(np.asarray(labels, dtype=np.uint64), np.stack(vectors))
            for label, source, fp in added:
                self._entries.put(label, source, fp)
            refresh.computed = len(added)

    def _vector(self, row: Mapping[str, Any] | None) -> tuple[np.ndarray | None, str | None]:
        """The row's output as a vector of float32s, or why it is none (its length is not checked here)."""
        value = None if row is None else row.get(OUTPUT_FIELD)
        if value is None:
            return None, "the output is missing"
        try:
            vector = _as_float32(value)
        except (TypeError, ValueError):
            return None, f"the output is not a vector of numbers ({type(value).__name__})"
        if vector.ndim != 1 or len(vector) == 0:
            return None, f"the output has shape {vector.shape}, not a vector"
        if (why := _not_finite(value, vector)) is not None:
            return None, f"the vector holds {why}"
        return vector, None

    # -- search -------------------------------------------------------------------------------------
    def query_vector(self, query: Any) -> np.ndarray:
        """``query`` as a vector of the index's length: text is embedded by ``query_model``."""
        if isinstance(query, str | bytes):
            if self.query_model is None:
                raise SearchError(
                    f"index {self.identifier!r} has no query_model to embed text; "
                    "search with a vector, or declare VectorIndex(..., query_model=...)"
                )
            # On a thread that ends with the call: a long-lived caller (the application's main
            # thread) would keep torch's OpenMP team, which slows reactive's model thread.
            model, text = self.query_model, query
            try:
                # Bounded by the model's timeout, as its calls for a listener are.
                outputs = on_own_thread(
                    f"query-{self.identifier}", lambda: model.predict([text]), timeout=model.timeout
                )
                [query] = model.checked_outputs(outputs, 1)
            except TimeoutError:
                raise SearchError(
                    f"index {self.identifier!r} cannot embed the query: model {model.identifier!r} did not answer "
                    f"within {model.timeout:g} s"
                ) from None
            except ModelOutputError as exc:
                raise SearchError(f"index {self.identifier!r} cannot embed the query: {exc}") from None
        try:
            vector = _as_float32(query)
        except (TypeError, ValueError):
            raise SearchError(f"a query must be a vector of numbers, not {type(query).__name__}") from None
        if vector.ndim != 1 or len(vector) == 0:
            raise SearchError(f"a query must be one vector, not an array of shape {vector.shape}")
        if (why := _not_finite(query, vector)) is not None:
            raise SearchError(f"the query holds {why}")
        if self._ndim is not None and len(vector) != self._ndim:
            raise SearchError(
                f"the query has {len(vector)} numbers; index {self.identifier!r} holds vectors of {self._ndim}"
            )
        if self.metric == "cos" and not vector.any():
            # No direction to compare: usearch put every row at distance 1 and zero vectors at 0.
            raise SearchError(
                f"the query is all zeros: index {self.identifier!r} ranks by the cosine of the angle, which a"
                " zero vector has none of (an embedding of empty or unknown text?)"
            )
        return vector

    def search(
        self, query: Any, k: int = 10, *, keep: Callable[[list[Any]], set[Hashable]] | None = None
    ) -> list[SearchHit]:
        """The ``k`` nearest rows, nearest first. ``keep(source ids)`` (a filter) gives the id
        keys to keep among candidates: the graph is asked for more until ``k`` are kept or
        every row was a candidate."""
        k = checks.whole("k", k, least=1, error=SearchError)
        vector = self.query_vector(query)
        want = k if keep is None else k * OVERFETCH
        while True:
            with self._lock:  # the graph only: a filter reads rows without holding up the handler
                total = len(self._entries)
                if self._index is None or not total:
                    return []
                want = min(total, want)
                matches = self._index.search(vector, want)
                hits = [
                    SearchHit(self._entries.sources[int(key)], float(distance))
                    for key, distance in zip(matches.keys, matches.distances, strict=True)
                    if int(key) in self._entries.sources
                ]
            if keep is not None:
                kept = keep([hit.source for hit in hits])
                hits = [hit for hit in hits if id_key(hit.source) in kept]
            if len(hits) >= k or want >= total:
                return hits[:k]
            want *= 2


def _replace(path: Path, data: bytes) -> None:
    """Write ``path`` whole or not at all."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)

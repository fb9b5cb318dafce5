"""The MongoDB backend: storage through pymongo, changes through change streams."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from decimal import Decimal
from typing import Any, Self

import bson
import pymongo
from bson.codec_options import CodecOptions
from bson.decimal128 import Decimal128
from bson.errors import InvalidDocument
from pymongo import InsertOne, MongoClient, ReplaceOne
from pymongo.collection import Collection
from pymongo.database import Database
from pymongo.errors import BulkWriteError, InvalidName, InvalidURI, OperationFailure, PyMongoError
from pymongo.errors import ConfigurationError as PyMongoConfigurationError

from reactive.backends.base import (
    FINGERPRINT_FIELD,
    OUTPUT_FIELD,
    SOURCE_FIELD,
    DataBackend,
    ErrorRecord,
    ListenerHooks,
    OutputBatch,
    OutputRejected,
    TableInfo,
    case_hint,
    chunks,
    error_time,
    outputs_table,
)
from reactive.backends.mongodb import SCHEMES
from reactive.backends.mongodb.checkpoints import CHECKPOINTS_COLLECTION, MongoSections, acknowledged
from reactive.backends.mongodb.errors import Fault, classify, classify_code, server_message, stop_timeout
from reactive.backends.mongodb.listener import MongoChangeStreamListener
from reactive.checkpoints import Positions
from reactive.errors import BackendError, ConfigurationError, QueueClosedError
from reactive.events import Row, id_key, is_utf8
from reactive.outputs import OutputTypes, holds_leaves, refuse_output_type
from reactive.queue import CDCQueue
from reactive.rowformat import RowFormat, mongo_format
from reactive.threads import ReactiveThread
from reactive.uri import check_credentials, redact

log = logging.getLogger(__name__)

ERRORS_COLLECTION = "_reactive_errors"
#: Largest ``$in`` list sent in one query (SecantusDB's ``$in`` is quadratic in the
#: matching ids: 1,000 take 0.8 s, 5,000 take 18 s; on mongod small chunks cost nothing).
_CHUNK = 500


def _projection(fields: Sequence[str]) -> dict[str, int]:
    """A projection of ``fields`` (paths such as ``meta.title`` included) that MongoDB accepts:
    a path under another one asked for is left out (both are a "path collision").

    >>> _projection(["meta", "meta.title", "text", "text"])
    {'meta': 1, 'text': 1}
    """
    paths = dict.fromkeys(fields)
    return {p: 1 for p in paths if not any(p.startswith(other + ".") for other in paths)}


def _narrowing(where: Mapping[str, Any]) -> dict[str, Any]:
    """The equalities of ``where`` (a listener's filter) a query may test without leaving out a
    document whose value Python's ``==`` finds equal, on fields without a dot (a dotted name is a
    path to MongoDB, but to reactive first a field with the dots in its own name): ``None``
    (MongoDB's null also matches a missing field: more documents, never fewer), and text,
    ObjectIds, numbers and booleans as ``$in`` the values Python's ``==`` equates with them that
    MongoDB's equality does not (``True`` for ``1``: MongoDB compares numbers across their types,
    never with booleans) and the forms they are mistaken for (:func:`_mistaken_for`), so the
    documents holding such a form still reach the listener, which says that the filter matches
    none of them (``filter on ObjectId('...')``). Not text BSON cannot hold (a lone surrogate),
    nor a whole number past its 8 bytes.

    >>> _narrowing({"lang": "en", "n": 1, "flag": False, "meta.lang": "en", "owner": None, "odd": "\\udc80"})
    {'lang': {'$in': ['en']}, 'n': {'$in': [1, True, '1']}, 'flag': {'$in': [False, 0]}, 'owner': None}
    """
    narrowing: dict[str, Any] = {}
    for field, value in where.items():
        if "." in field:
            continue
        if value is None:
            narrowing[field] = None
        elif (type(value) is str and is_utf8(value)) or type(value) is bson.ObjectId:
            narrowing[field] = {"$in": [value, *_mistaken_for(value)]}
        elif type(value) in (bool, int, float) and -(2**63) <= value < 2**63:
            equated = [int(value)] if type(value) is bool else [value == 1] if value in (0, 1) else []
            narrowing[field] = {"$in": [value, *equated, *([str(value)] if type(value) is int else [])]}
    return narrowing


def _mistaken_for(value: str | bson.ObjectId) -> list[Any]:
    """The values of other types an application may mean by ``value``: an ObjectId for its hex
    and the hex for an ObjectId, a number for its text.

    >>> _mistaken_for("64b7f0c2a1b2c3d4e5f60718"), _mistaken_for("3"), _mistaken_for("0.5"), _mistaken_for("en")
    ([ObjectId('64b7f0c2a1b2c3d4e5f60718')], [3], [0.5], [])
    >>> _mistaken_for("9" * 30)  # past BSON's ints
    []
    """
    if isinstance(value, bson.ObjectId):
        return [str(value)]
    if bson.ObjectId.is_valid(value):
        return [bson.ObjectId(value)]
    for number in (int, float):
        try:
            parsed = number(value)
        except (ValueError, OverflowError):
            continue
        return [parsed] if number is float or -(2**63) <= parsed < 2**63 else []  # BSON's ints: 8 bytes
    return []


def _unfollowed(db: Database, table: str, found: Mapping[str, Any] | None) -> str | None:
    """Why a listener can never follow collection ``table`` (``found``: its ``listCollections``
    entry, None if it does not exist), or None. Each was taken: its backfill was all it got, or
    pymongo's error came at each read.

    >>> app = MongoClient(connect=False).app
    >>> _unfollowed(app, "system.views", None), _unfollowed(app, "docs", None)
    ("MongoDB's change streams do not report system collections", None)
    >>> _unfollowed(app, "a$b", None)
    "MongoDB cannot name it: collection names must not contain '$': 'a$b'"
    >>> _unfollowed(app, "metrics", {"name": "metrics", "type": "timeseries", "options": {"timeseries": {}}})
    "it is a time-series collection, whose changes MongoDB's change streams do not report"
    """
    try:
        db[table]
    except InvalidName as exc:
        return f"MongoDB cannot name it: {exc}"
    if table.startswith("system."):
        return "MongoDB's change streams do not report system collections"
    if found is not None and (found.get("type") == "timeseries" or "timeseries" in found.get("options", {})):
        return "it is a time-series collection, whose changes MongoDB's change streams do not report"
    return None


def _pages(cursor: Any, page_size: int) -> Iterator[list[Any]]:
    """A cursor's documents in lists of ``page_size``."""
    page: list[Any] = []
    with cursor:
        for doc in cursor:
            page.append(doc)
            if len(page) == page_size:
                yield page
                page = []
    if page:
        yield page


class MongoSource:
    """The :class:`~reactive.backends.base.SourceReader`: a row is a document, its id ``_id``."""

    def __init__(self, db: Database, *, uri: str) -> None:
        self.db = db
        self.uri = uri

    def table_exists(self, table: str) -> bool:
        return bool(self.db.list_collection_names(filter={"name": table}))

    def describe(self, table: str, *, id_column: str | None = None) -> TableInfo:
        """A collection, whether or not it exists yet: MongoDB creates one at its first insert,
        so listeners are declared before data arrives (one that does not exist is empty)."""
        if id_column not in (None, "_id"):
            raise ConfigurationError(f"MongoDB documents are identified by _id, not {id_column!r}", table=table)
        found = next(iter(self.db.list_collections(filter={"name": table})), None)
        unfollowed = _unfollowed(self.db, table, found)
        if unfollowed is not None:
            raise ConfigurationError(f"collection {table!r} cannot be followed: {unfollowed}", table=table)
        if found is None and (hint := case_hint(table, self.db.list_collection_names())):
            # Taken as an empty collection, as any missing one: a misspelt name was never said.
            log.warning("collection %r does not exist: it is followed as an empty one%s", table, hint)
        if found is not None and found.get("type") == "view":
            # Its backfill read the view; the change stream names the collection a write goes
            # to, never the view, so no change reached the listener (wait_idle said True).
            options = found.get("options", {})
            raise ConfigurationError(
                f"{table!r} is a view on {options.get('viewOn')!r}: MongoDB reports the changes of a view's"
                f" collection, not of the view; select {options.get('viewOn')!r} (with filter= for an equality"
                " the view matches on)",
                table=table,
            )
        return TableInfo(table, "_id", ())

    def count(self, table: TableInfo, *, where: Mapping[str, Any] | None = None) -> int:
        narrowing = _narrowing(where or {})
        if not narrowing:
            return self.db[table.name].estimated_document_count()
        return self.db[table.name].count_documents(narrowing)

    def read_rows(self, table: TableInfo, ids: Sequence[Any]) -> dict[Hashable, Row]:
        rows: dict[Hashable, Row] = {}
        for chunk in chunks(list(ids), _CHUNK):
            for doc in self.db[table.name].find({"_id": {"$in": list(chunk)}}):
                rows[id_key(doc["_id"])] = doc
        return rows

    def existing_ids(self, table: TableInfo, ids: Sequence[Any]) -> set[Hashable]:
        found: set[Hashable] = set()
        for chunk in chunks(list(ids), _CHUNK):
            cursor = self.db[table.name].find({"_id": {"$in": list(chunk)}}, {"_id": 1})
            found.update(id_key(doc["_id"]) for doc in cursor)
        return found

    def scan(
        self,
        table: TableInfo,
        *,
        columns: Sequence[str] | None,
        page_size: int,
        where: Mapping[str, Any] | None = None,
    ) -> Iterator[list[Row]]:
        projection = _projection(columns) if columns else None
        found = self.db[table.name].find(_narrowing(where or {}), projection)
        cursor = found.sort("_id", pymongo.ASCENDING).batch_size(page_size)
        yield from _pages(cursor, page_size)


#: Output types whose values pymongo encodes as they come from ``normalize_output`` (a UUID as
#: its text), alone or in arrays; others are parsed (:func:`_bson_leaf`).
_BSON_PLAIN = frozenset(
    {"json", "boolean", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32"}
    | {"float16", "float32", "float64", "string", "binary", "timestamp", "uuid"}
)
_BSON_TAKES = (
    "boolean, int8-int64, uint8-uint32, float16-float64, string, binary, timestamp (BSON keeps milliseconds), uuid"
    " (as its text), decimal with up to 34 digits (as Decimal128), or arrays, structs and maps with text keys of"
    " these"
)
#: The digits of BSON's Decimal128.
DECIMAL128_DIGITS = 34


def _bson_leaf(dtype: Any) -> bool:
    """A value BSON holds: a decimal of up to 34 digits (as Decimal128; one of no declared
    precision is checked value by value), no date, time or interval (BSON has none), no 64-bit
    unsigned integer (BSON's are signed)."""
    return (
        (dtype.is_decimal() and (dtype.precision or 0) <= DECIMAL128_DIGITS)
        or dtype.is_boolean()
        or dtype.is_string()
        or dtype.is_binary()
        or dtype.is_timestamp()
        or dtype.is_uuid()
        or dtype.is_json()
        or dtype.is_floating()
        or (dtype.is_integer() and not dtype.is_uint64())
    )


class MongoOutputs:
    """The :class:`~reactive.backends.base.OutputStore`: one collection per listener, ``_id`` = source id.

    Outputs are written with the URI's write concern (acknowledged at least), not journaled: the
    position that covers them is saved after them with ``j=True``, and a journaled write makes
    every earlier write of the server durable too (its journal is one log, flushed in order), so
    a position the server kept never covers an output it lost. Until then the outputs are as
    durable as the server's periodic journal flush; a server that restarted before it is seen
    by its new process id, and every collection is reconciled (see the listener).

    A write recreates a collection someone dropped, silently, and the other rows' outputs are
    gone with it: the store tells ``outputs_lost(source collection)``. While the change stream
    runs (``followed()``), the stream reports the drop (:meth:`dropped`), so a write costs no
    extra round trip; otherwise (a backfill before ``db.cdc.start``), before writing to a
    collection it knows to exist, the store checks that it is still there.
    """

    def __init__(
        self,
        db: Database,
        *,
        outputs_lost: Callable[[str], None] = lambda table: None,
        followed: Callable[[], bool] = lambda: False,
    ) -> None:
        self.db = db.with_options(write_concern=acknowledged(db.write_concern))
        self.outputs_lost = outputs_lost
        #: Whether a change stream that reports drops of outputs collections is running.
        self.followed = followed
        #: The source collection of each listener (``create_outputs`` comes first).
        self._sources: dict[str, str] = {}
        #: Listeners whose outputs collection exists, unless someone dropped it since.
        self._present: set[str] = set()
        #: Each listener's outputs collection object, made once (pymongo builds one for every
        #: ``db[name]``: 0.06 ms of each one-change window's write, measured in place).
        self._collections: dict[str, Collection] = {}

    def _collection(self, identifier: str) -> Collection:
        collection = self._collections.get(identifier)
        if collection is None:
            try:
                collection = self._collections[identifier] = self.db[outputs_table(identifier)]
            except InvalidName as exc:  # '$' in the identifier, say: the first use is db.add's
                raise ConfigurationError(
                    f"listener {identifier!r}: MongoDB cannot name its outputs collection: {exc}", listener=identifier
                ) from None
        return collection

    def check_identifier(self, identifier: str) -> None:
        """ConfigurationError if MongoDB cannot name ``identifier``'s outputs collection."""
        self._collection(identifier)

    def _exists(self, identifier: str) -> bool:
        return bool(self.db.list_collection_names(filter={"name": outputs_table(identifier)}))

    def refused_outputs(self, output_type: str, outputs: Sequence[Any]) -> dict[int, str]:
        """The decimal outputs Decimal128 cannot hold (see ``OutputWriter.write``), by position."""
        if "decimal" not in output_type:
            return {}
        refused = {}
        for k, value in enumerate(outputs):
            try:
                _as_decimal128(value)
            except _BeyondDecimal128 as exc:
                refused[k] = (
                    f"output has {exc.value}, which MongoDB's Decimal128 cannot hold ({DECIMAL128_DIGITS} digits)"
                )
        return refused

    def create_outputs(self, identifier: str, source: TableInfo, output_type: str) -> None:
        """Nothing to create (the collection appears with its first output): remember the source,
        refusing a declared type BSON cannot hold (its every output failed)."""
        if not holds_leaves(output_type, _BSON_PLAIN, _bson_leaf):
            raise refuse_output_type(output_type, "mongodb", _BSON_TAKES)
        self._sources[identifier] = source.name
        if self._exists(identifier):
            self._present.add(identifier)

    def store_outputs(
        self, identifier: str, output_type: str, batch: OutputBatch, stored: list[Any], positions: Sequence[int]
    ) -> None:
        # Without a stream, one round trip per write: the only sign of a drop, since the write
        # recreates it. With one, the stream reports the drop (before this write's changes).
        lost = identifier in self._present and not self.followed() and not self._exists(identifier)
        self._store(identifier, output_type, batch, stored, positions)
        self._present.add(identifier)
        if lost and identifier in self._sources:
            self.outputs_lost(self._sources[identifier])

    def dropped(self, collection: str) -> None:
        """The change stream saw ``collection`` dropped, or renamed away or replaced by a rename:
        if it holds a listener's outputs, they are lost."""
        for identifier, source in list(self._sources.items()):
            if outputs_table(identifier) == collection:
                self._present.discard(identifier)
                self.outputs_lost(source)

    def _store(
        self, identifier: str, output_type: str, batch: OutputBatch, stored: list[Any], positions: Sequence[int]
    ) -> None:
        outputs: Sequence[Any] = batch.outputs
        if "decimal" in output_type:  # pymongo encodes no Decimal: BSON's is Decimal128
            outputs = [_as_decimal128(value) for value in outputs]
        documents = [
            (
                positions[k],
                batch.is_new(k),
                {"_id": source, SOURCE_FIELD: source, OUTPUT_FIELD: value, FINGERPRINT_FIELD: fingerprint},
            )
            for k, (source, value, fingerprint) in enumerate(
                zip(batch.sources, outputs, batch.fingerprints, strict=True)
            )
        ]
        # New outputs are inserted (cheaper than upserts on some servers); an insert that
        # meets an existing output after all is retried as a replacement.
        retry = self._write(identifier, documents, stored)
        if retry:
            self._write(identifier, [(i, False, d) for i, _, d in retry], stored)

    def _write(
        self, identifier: str, documents: list[tuple[int, bool, dict[str, Any]]], stored: list[Any]
    ) -> list[tuple[int, bool, dict[str, Any]]]:
        """One unordered bulk write; returns the inserts that hit an existing output."""
        if not documents:
            return []
        operations = [InsertOne(d) if new else ReplaceOne({"_id": d["_id"]}, d, upsert=True) for _, new, d in documents]
        collection = self._collection(identifier)
        try:
            collection.bulk_write(operations, ordered=False)
        except (InvalidDocument, OverflowError, ValueError):
            # pymongo refuses the whole bulk when it cannot encode one document (an int past
            # 8 bytes, a key with a NUL byte): only those outputs are refused, the others are
            # written again (earlier batches may have gone through: every write is idempotent).
            kept = []
            for index, new, document in documents:
                why = _unencodable(document, collection.codec_options)
                if why is None:
                    kept.append((index, new, document))
                else:
                    stored[index] = OutputRejected(f"MongoDB cannot store this output: {why}")
            if len(kept) == len(documents):
                raise  # not a document's fault
            return self._write(identifier, kept, stored)
        except BulkWriteError as exc:
            retry = []
            # Unordered: every other write went through; only these failed.
            for error in exc.details.get("writeErrors", []):
                index, new, document = documents[error["index"]]
                if new and classify_code(error.get("code")) is Fault.DUPLICATE_KEY:
                    retry.append((index, new, document))
                else:
                    stored[index] = OutputRejected(error.get("errmsg", "write rejected"))
            return retry
        return []

    def delete_outputs(self, identifier: str, ids: Sequence[Any]) -> None:
        for chunk in chunks(list(ids), _CHUNK):
            self._collection(identifier).delete_many({"_id": {"$in": list(chunk)}})

    def output_fingerprints(self, identifier: str, ids: Sequence[Any]) -> dict[Hashable, int]:
        found: dict[Hashable, int] = {}
        for chunk in chunks(list(ids), _CHUNK):
            query = {"_id": {"$in": list(chunk)}}
            for doc in self._collection(identifier).find(query, {FINGERPRINT_FIELD: 1}):
                found[id_key(doc["_id"])] = doc.get(FINGERPRINT_FIELD)
        return found

    def scan_output_fingerprints(self, identifier: str, *, page_size: int) -> Iterator[list[tuple[Any, int]]]:
        projection = {"_id": 1, FINGERPRINT_FIELD: 1}
        cursor = self._collection(identifier).find({}, projection).sort("_id", 1).batch_size(page_size)
        for page in _pages(cursor, page_size):
            yield [(doc["_id"], doc.get(FINGERPRINT_FIELD)) for doc in page]

    def read_outputs(self, identifier: str) -> list[dict[str, Any]]:
        projection = {"_id": 0, SOURCE_FIELD: 1, OUTPUT_FIELD: 1}
        return list(self._collection(identifier).find({}, projection).sort("_id", 1))

    def drop_outputs(self, identifier: str) -> None:
        # Forgotten first: the stream reports this drop too, and it is not a loss.
        self._sources.pop(identifier, None)
        self._present.discard(identifier)
        self.db.drop_collection(outputs_table(identifier))


class _BeyondDecimal128(ArithmeticError):
    """A ``Decimal`` that Decimal128 cannot hold exactly (more than 34 digits, or an exponent
    past its range)."""

    def __init__(self, value: Decimal) -> None:
        super().__init__(value)
        self.value = value


def _as_decimal128(value: Any) -> Any:
    """``value`` with each ``Decimal`` in it as a ``Decimal128``; :class:`_BeyondDecimal128` for
    one that does not fit (:meth:`MongoOutputs.refused_outputs` refuses those before).

    >>> _as_decimal128({"p": [Decimal("1.25")]})
    {'p': [Decimal128('1.25')]}
    >>> _as_decimal128([Decimal("1.5"), {"a": Decimal("1" * 35)}])
    Traceback (most recent call last):
    ...
    reactive.backends.mongodb.backend._BeyondDecimal128: 11111111111111111111111111111111111
    """
    if isinstance(value, Decimal):
        try:
            return Decimal128(value)
        except ArithmeticError:  # decimal.Inexact
            raise _BeyondDecimal128(value) from None
    if isinstance(value, dict):
        return {k: _as_decimal128(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_as_decimal128(v) for v in value]
    return value


def _unencodable(document: dict[str, Any], codec_options: CodecOptions) -> str | None:
    """Why BSON cannot hold ``document`` under ``codec_options``, or None if it can."""
    try:
        bson.encode(document, codec_options=codec_options)
    except (InvalidDocument, OverflowError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


class MongoErrors:
    """The :class:`~reactive.backends.base.ErrorStore`: ``_reactive_errors``."""

    def __init__(self, db: Database) -> None:
        self.db = db.with_options(write_concern=acknowledged(db.write_concern))

    def record_errors(self, records: Sequence[ErrorRecord]) -> None:
        if records:
            documents = [
                {"listener": r.listener, "table": r.table, "source": r.source, "error": r.error, "at": r.at}
                for r in records
            ]
            self.db[ERRORS_COLLECTION].insert_many(documents, ordered=False)

    def clear_errors(self, listener: str, sources: Sequence[Any] | None = None) -> None:
        query: dict[str, Any] = {"listener": listener}
        if sources is not None:
            query["source"] = {"$in": list(sources)}
        self.db[ERRORS_COLLECTION].delete_many(query)

    def read_errors(self, listener: str | None = None) -> list[dict[str, Any]]:
        query = {} if listener is None else {"listener": listener}
        rows = list(self.db[ERRORS_COLLECTION].find(query, {"_id": 0}).sort("at", 1))
        for row in rows:
            row["at"] = error_time(row["at"])
        return rows


class OutputsRefill(ReactiveThread):
    """Reconciles collections whose listeners' outputs were dropped, then ends.

    The handler notices the loss (:class:`MongoOutputs`) but cannot queue a reconciliation
    itself: it would wait on the queue it drains. This thread queues it as a producer does,
    and gives up when stopped (``db.close()``) or when the queue closes (``db.cdc.stop()``).
    """

    def __init__(self, reconcile: Callable[[list[str], threading.Event], None], tables: list[str]) -> None:
        super().__init__("outputs-refill")
        self.reconcile = reconcile
        self.tables = tables

    def run(self) -> None:
        try:
            self.reconcile(self.tables, self.stopped_event)
        except QueueClosedError:
            log.info("computing the dropped outputs of %s again stopped with change data capture", self.tables)
        except Exception:
            log.exception("could not compute the dropped outputs of %s again; adding them again does", self.tables)


class MongoBackend(DataBackend):
    """MongoDB (a replica set or sharded cluster: change streams need one).

    The URI must name the database: ``mongodb://host:27017/app``. A row is a document
    and its id is ``_id``, of any BSON type.
    """

    name = "mongodb"
    schemes = SCHEMES
    listener_class = MongoChangeStreamListener

    def __init__(self, client: MongoClient, database: str, *, uri: str) -> None:
        self.client = client
        self.db = client[database]
        self._uri = redact(uri)
        self.source = MongoSource(self.db, uri=self._uri)
        self.outputs = MongoOutputs(self.db, outputs_lost=self._outputs_lost, followed=self._stream_running)
        self._hooks: ListenerHooks | None = None
        self._listener: MongoChangeStreamListener | None = None
        self._queue: CDCQueue | None = None
        self._refills: list[OutputsRefill] = []
        self._lock = threading.Lock()
        self.errors = MongoErrors(self.db)
        self.sections = MongoSections(self.db)
        self.checkpoints = Positions(self.sections)
        self.output_types = OutputTypes(self.checkpoints)

    @classmethod
    def from_uri(cls, uri: str, **options: Any) -> Self:
        if "serverselectiontimeoutms" not in uri.lower():
            options.setdefault("serverSelectionTimeoutMS", 5_000)
        check_credentials(uri)
        try:
            client: MongoClient = MongoClient(uri, **options)
        except (InvalidURI, PyMongoConfigurationError, ValueError) as exc:
            raise ConfigurationError(f"invalid MongoDB URI {redact(uri)!r}: {redact(str(exc))}") from None
        try:
            database = client.get_default_database().name
        except PyMongoConfigurationError:
            client.close()
            raise ConfigurationError(
                f"the MongoDB URI {redact(uri)!r} names no database; add it as the path: mongodb://host:27017/app"
            ) from None
        try:
            # Reads need the credentials, ping does not: check both now, not at the first change.
            client.admin.command("ping")
            client[database].list_collection_names(filter={"name": CHECKPOINTS_COLLECTION})
        except OperationFailure as exc:
            client.close()
            what = "authentication failed" if classify(exc) is Fault.AUTH_FAILED else "the server refused access"
            raise BackendError(f"{what} for {redact(uri)!r}: {redact(server_message(exc))}") from None
        except PyMongoError as exc:
            client.close()
            raise BackendError(f"could not connect to {redact(uri)!r}: {redact(str(exc))}") from None
        return cls(client, database, uri=uri)

    @property
    def uri(self) -> str:
        return self._uri

    def create_listener(self, queue: CDCQueue, hooks: ListenerHooks, **options: Any) -> MongoChangeStreamListener:
        self._hooks, self._queue = hooks, queue
        self._listener = MongoChangeStreamListener(
            self.db,
            self.checkpoints,
            queue,
            uri=self._uri,
            hooks=hooks,
            collection_dropped=self.outputs.dropped,
            fence=self.sections.lease_held,
            **options,
        )
        return self._listener

    def _stream_running(self) -> bool:
        """Whether the listener's stream runs: it reports every drop after its position, so
        also every drop after any write made now."""
        listener = self._listener
        return listener is not None and listener.is_alive()

    def _outputs_lost(self, table: str) -> None:
        """Outputs of ``table``'s listeners were dropped: reconcile it in the background (the
        backfill of ``db.add`` does when nothing follows changes yet)."""
        if self._hooks is None:
            return
        log.warning("outputs of listeners on %r were dropped; computing them again", table)
        refill = OutputsRefill(self._hooks.reconcile, [table])
        with self._lock:
            self._refills = [*(r for r in self._refills if r.is_alive()), refill]
        refill.start()

    def row_format(self, table: TableInfo) -> RowFormat:
        return mongo_format()

    def close(self) -> None:
        with self._lock:
            refills, self._refills = self._refills, []
        for refill in refills:
            refill.stop()
        if self._queue is not None:
            self._queue.wake_producers()
        for refill in refills:
            refill.join()
        with pymongo.timeout(stop_timeout(self.client)):  # it ends the client's sessions on the server
            self.client.close()

    def is_transient(self, exc: BaseException) -> bool:
        return classify(exc) is Fault.TRANSIENT

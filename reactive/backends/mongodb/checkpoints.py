"""``_reactive_checkpoints`` in MongoDB: one document per checkpoint, its sections as fields.

A checkpoint is one document ``{_id: <checkpoint>, sections: {<key>: {data, text, written_at}}}``
so that a ``Write`` of several sections is one ``update_one``, atomic on every server (no
multi-document transaction needed), and the lease's compare-and-set is one conditional update.
Section keys are stored hex-encoded (a field name cannot hold ``.`` or start with ``$``). A
checkpoint document is limited to MongoDB's 16 MB.

Every write asks for a journaled acknowledgement (``j=True``, with the URI's ``w``): a position
the server acknowledged survives the server's crash, and so does every write this client made
before it (the journal is one log, flushed in order), the outputs it covers among them.

The store sees every lease record this process writes (a lease is a section too), so it can
say whether this process holds a checkpoint's lease with a third of it still ahead
(:meth:`MongoSections.lease_held`), the fence ``db.cdc`` applies before its writes: the change
stream checks it before the positions it saves on its own thread.

Documents in the format of reactive 0.1 (``{_id: <name>, value: {...}}``) are migrated the first
time the store is used: their values become sections of the checkpoint ``reactive``.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ParamSpec, TypeVar

from bson import Binary
from pymongo import WriteConcern
from pymongo.database import Database
from pymongo.errors import DuplicateKeyError, OperationFailure

from reactive.backends.mongodb.errors import Fault, classify, while_down
from reactive.checkpoints import ENGINE_CHECKPOINT, LEASE_SECTION, Holder, Section
from reactive.errors import ConfigurationError
from reactive.fingerprints import plain_value

CHECKPOINTS_COLLECTION = "_reactive_checkpoints"


def durable(concern: WriteConcern) -> WriteConcern:
    """``concern`` (the URI's) acknowledged once in the server's journal: survives a crash of the
    server. The URI's ``w`` and ``wtimeout`` are kept (``w=0`` is raised to an acknowledgement).

    >>> durable(WriteConcern(w="majority", wtimeout=500)).document == {"w": "majority", "wtimeout": 500, "j": True}
    True
    >>> durable(WriteConcern(w=0)).document
    {'j': True}
    >>> durable(WriteConcern(j=False)).document, durable(WriteConcern(fsync=True)).document
    ({'j': True}, {'j': True})
    """
    kept = {k: v for k, v in acknowledged(concern).document.items() if k not in ("fsync", "j")}
    return WriteConcern(**kept, j=True)


def acknowledged(concern: WriteConcern) -> WriteConcern:
    """``concern`` unless it asks for no acknowledgement (``w=0``): a write reactive does not hear
    back from could land after the position that covers it.

    >>> acknowledged(WriteConcern(w=0)).document
    {}
    >>> acknowledged(WriteConcern(w=2)).document
    {'w': 2}
    """
    return concern if concern.acknowledged else WriteConcern()


def _field(key: str) -> str:
    """
    >>> _field("a.b")
    'sections.612e62'
    """
    return "sections." + key.encode("utf-8", "surrogatepass").hex()


def _key(field: str) -> str:
    return bytes.fromhex(field).decode("utf-8", "surrogatepass")


def _stored(section: Section) -> dict[str, Any]:
    return {"data": Binary(section.data), "text": section.text, "written_at": section.written_at}


_P = ParamSpec("_P")
_T = TypeVar("_T")


def _write(method: Callable[_P, _T]) -> Callable[_P, _T]:
    """A write that the URI's write concern may make impossible (``w=3`` on a one-member replica
    set, an unknown tag set): a :class:`~reactive.errors.ConfigurationError` saying so."""

    @functools.wraps(method)
    def write(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        try:
            return method(*args, **kwargs)
        except OperationFailure as exc:
            if classify(exc) is not Fault.BAD_WRITE_CONCERN:
                raise
            details = exc.details or {}
            concern = (details.get("errInfo") or {}).get("writeConcern") or {}
            asked = {k: v for k, v in concern.items() if k in ("w", "wtimeout")}
            raise ConfigurationError(
                f"the server cannot meet the URI's write concern {asked or ''}: {details.get('errmsg', exc)} "
                "(reactive writes with the URI's w; lower it, or name a tag set the replica set has)"
            ) from None

    return write


def _bounded(method: Callable[_P, _T]) -> Callable[_P, _T]:
    """A call that waits at most :data:`~reactive.backends.mongodb.errors.STOP_TIMEOUT` while the
    client last saw the server fail (:func:`~reactive.backends.mongodb.errors.while_down`): the
    lease's renewal, and its release at a stop, are not held by a server that is down for the
    whole server selection timeout."""

    @functools.wraps(method)
    def bounded(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        store = args[0]
        assert isinstance(store, MongoSections)
        with while_down(store.collection.database.client):
            return method(*args, **kwargs)

    return bounded


class MongoSections:
    """The :class:`~reactive.checkpoints.SectionStore` of a MongoDB database."""

    def __init__(self, db: Database) -> None:
        self.collection = db.get_collection(CHECKPOINTS_COLLECTION, write_concern=durable(db.write_concern))
        self._migrated = False
        #: Per checkpoint, the lease record this process last wrote, and when it wrote it
        #: (None: it gave the lease up, or failed to take or renew it).
        self._leases: dict[str, tuple[Holder | None, float]] = {}

    def _migrate(self) -> None:
        if self._migrated:
            return
        old = list(self.collection.find({"value": {"$exists": True}}))
        if old:
            values = {doc["_id"]: json.dumps(doc["value"], default=plain_value) for doc in old}
            self.write_sections(ENGINE_CHECKPOINT, {name: Section.of(v) for name, v in values.items()})
            self.collection.delete_many({"_id": {"$in": [doc["_id"] for doc in old]}})
        self._migrated = True

    @_bounded
    def read_sections(
        self, checkpoint: str, keys: Sequence[str] | None = None, *, lock: bool = False
    ) -> dict[str, Section]:
        self._migrate()
        projection = None if keys is None else {_field(k): 1 for k in keys} or {"_id": 1}
        doc = self.collection.find_one({"_id": checkpoint}, projection)
        if doc is None:
            return {}
        return {
            _key(field): Section(bytes(s["data"]), bool(s["text"]), float(s["written_at"]))
            for field, s in (doc.get("sections") or {}).items()
        }

    @_bounded
    @_write
    def write_sections(self, checkpoint: str, sections: Mapping[str, Section]) -> None:
        if sections:
            update = {"$set": {_field(k): _stored(s) for k, s in sections.items()}}
            self.collection.update_one({"_id": checkpoint}, update, upsert=True)

    @_bounded
    @_write
    def delete_sections(self, checkpoint: str, keys: Sequence[str] | None = None) -> None:
        if keys is None:
            self.collection.delete_one({"_id": checkpoint})
        elif keys:
            self.collection.update_one({"_id": checkpoint}, {"$unset": {_field(k): "" for k in keys}})

    @_bounded
    @_write
    def replace_section(self, checkpoint: str, key: str, expected: bytes | None, new: Section | None) -> bool:
        if expected is None and new is None:
            return key not in self.read_sections(checkpoint, [key])
        field = _field(key)
        condition: dict[str, Any] = {"_id": checkpoint}
        condition[f"{field}.data"] = {"$exists": False} if expected is None else Binary(expected)
        change = {"$unset": {field: ""}} if new is None else {"$set": {field: _stored(new)}}
        try:
            result = self.collection.update_one(condition, change, upsert=expected is None and new is not None)
        except DuplicateKeyError:
            replaced = False  # the document exists and the section is not absent: someone else's
        else:
            replaced = result.matched_count == 1 or result.upserted_id is not None
        if key == LEASE_SECTION:
            self._leases[checkpoint] = (
                (Holder.decode(new.data), new.written_at) if replaced and new is not None else (None, 0.0)
            )
        return replaced

    def lease_held(self, checkpoint: str = ENGINE_CHECKPOINT) -> bool:
        """Whether this process holds ``checkpoint``'s lease with a third of it still ahead,
        judging by the lease records it wrote (True when it never wrote one: no lease)."""
        if checkpoint not in self._leases:
            return True
        holder, written_at = self._leases[checkpoint]
        if holder is None:
            return False
        return holder.expires - time.time() > (holder.expires - written_at) / 3

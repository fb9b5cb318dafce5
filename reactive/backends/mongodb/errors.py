"""The one place that decides what a MongoDB error means (as pymongo's ``_resumable`` does).

>>> from pymongo.errors import AutoReconnect, OperationFailure
>>> classify(AutoReconnect("primary stepped down")) is Fault.TRANSIENT
True
>>> classify(OperationFailure("history lost", code=286)) is Fault.HISTORY_LOST
True
>>> classify(ValueError("not a server error")) is Fault.OTHER
True
>>> classify(OperationFailure("Not enough data-bearing nodes", code=100)) is Fault.BAD_WRITE_CONCERN
True
"""

from __future__ import annotations

import contextlib
from enum import Enum
from typing import TYPE_CHECKING

import pymongo
from pymongo.errors import BulkWriteError, ConnectionFailure, OperationFailure

if TYPE_CHECKING:
    from pymongo import MongoClient

#: How long a call waits for a server the client last saw fail (:func:`known_down`).
DOWN_TIMEOUT = 0.05
#: The longest a stop waits for the server (the last position, the barrier mark, the client's
#: sessions), and any other call while the client last saw the server fail (a reconnection, a
#: lease renewal, a checkpoint write): a stop then is not held by it. Otherwise each would wait
#: out the server selection timeout (reactive's 5 s, pymongo's 30 s).
STOP_TIMEOUT = 2.0


class Fault(Enum):
    """What a MongoDB error means for ``reactive``."""

    #: The server is unreachable for now: retry with backoff, nothing is lost.
    TRANSIENT = "transient"
    #: A resume token aged out of the oplog (``ChangeStreamHistoryLost``): reconcile.
    HISTORY_LOST = "history lost"
    #: A change event exceeded 16 MB: large documents must be read separately.
    EVENT_TOO_LARGE = "event too large"
    #: The server cannot produce change streams (a standalone server).
    NO_CHANGE_STREAMS = "no change streams"
    #: The credentials were refused.
    AUTH_FAILED = "authentication failed"
    #: An insert met an existing ``_id``.
    DUPLICATE_KEY = "duplicate key"
    #: The URI's write concern names more members, or a tag set, than the server has.
    BAD_WRITE_CONCERN = "write concern cannot be met"
    #: Anything else: a real error of this operation.
    OTHER = "other"


_CODES = {
    286: Fault.HISTORY_LOST,
    10334: Fault.EVENT_TOO_LARGE,
    40573: Fault.NO_CHANGE_STREAMS,
    18: Fault.AUTH_FAILED,
    11000: Fault.DUPLICATE_KEY,
    100: Fault.BAD_WRITE_CONCERN,  # UnsatisfiableWriteConcern
    79: Fault.BAD_WRITE_CONCERN,  # UnknownReplWriteConcern
}


def classify(exc: BaseException) -> Fault:
    """What ``exc`` means: a :class:`Fault`."""
    if isinstance(exc, ConnectionFailure):
        return Fault.TRANSIENT
    if isinstance(exc, BulkWriteError):
        return Fault.OTHER
    if isinstance(exc, OperationFailure):
        return _CODES.get(exc.code or 0, Fault.OTHER)
    return Fault.OTHER


def classify_code(code: int | None) -> Fault:
    """What a server error code (as found in a bulk write's ``writeErrors``) means.

    >>> classify_code(11000) is Fault.DUPLICATE_KEY
    True
    """
    return _CODES.get(code or 0, Fault.OTHER)


def server_message(exc: BaseException) -> str:
    """What the server said, without the reply's bookkeeping (``$clusterTime`` and its
    signature, ``operationTime``) that pymongo's text of an error carries; any other
    error's text.

    >>> details = {"ok": 0.0, "errmsg": "authentication failed", "code": 18, "codeName": "AuthenticationFailed",
    ...            "$clusterTime": {"signature": {"hash": b"\\x00"}}}
    >>> server_message(OperationFailure("authentication failed", code=18, details=details))
    'authentication failed (AuthenticationFailed, code 18)'
    >>> server_message(OperationFailure("not authorized on app to execute command")), server_message(KeyError("x"))
    ('not authorized on app to execute command', "'x'")
    """
    details = (exc.details if isinstance(exc, OperationFailure) else None) or {}
    message = str(details.get("errmsg") or exc)
    name = details.get("codeName")
    return f"{message} ({name}, code {details.get('code')})" if name else message


def known_down(client: MongoClient) -> bool:
    """Whether the client's last sight of the deployment was a failure: no server to write to,
    and one it could not reach (no round trip). A client that never tried is not known down.

    >>> from pymongo import MongoClient
    >>> client = MongoClient("mongodb://127.0.0.1:1/app", connect=False, serverSelectionTimeoutMS=100)
    >>> known_down(client)
    False
    >>> client.app.docs.find_one()
    Traceback (most recent call last):
    ...
    pymongo.errors.ServerSelectionTimeoutError: ...
    >>> known_down(client)
    True
    >>> client.close()
    """
    seen = client.topology_description
    return not seen.has_writable_server() and any(s.error is not None for s in seen.server_descriptions().values())


def stop_timeout(client: MongoClient) -> float:
    """How long what a stop still asks of the server may take: :data:`STOP_TIMEOUT`, or next to
    nothing (:data:`DOWN_TIMEOUT`) when the client last saw the server fail (:func:`known_down`):
    a server that is down takes nothing, and the position saved before stands.

    >>> from pymongo import MongoClient
    >>> stop_timeout(MongoClient("mongodb://127.0.0.1:1/app", connect=False))
    2.0
    """
    return DOWN_TIMEOUT if known_down(client) else STOP_TIMEOUT


def while_down(client: MongoClient) -> contextlib.AbstractContextManager[object]:
    """The time limit of a call: :data:`STOP_TIMEOUT` while the client last saw the server fail
    (:func:`known_down`), none of ours otherwise (the client's own, as long as it takes). A call
    that waits for a server known to be down holds whatever waits on it (a stop, the lease's
    thread), and each failed attempt asks the client to look at the server again, so a server
    that is back is found by the next one.
    """
    return pymongo.timeout(STOP_TIMEOUT) if known_down(client) else contextlib.nullcontext()

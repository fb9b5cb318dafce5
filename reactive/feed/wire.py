"""The change feed's wire format: JSON messages, with tagged values for what JSON lacks.

Everything a node sends is UTF-8 JSON (RFC 8259: no ``NaN``), so a client in any language can
subscribe. A value JSON has no type for is an object with one ``$``-key (two for a vector):

============================  ====================================================================
Python value                  on the wire
============================  ====================================================================
str, int, bool, None, float   themselves (a float is a JSON number)
NaN, inf, -inf                ``{"$float": "nan"}``, ``{"$float": "inf"}``, ``{"$float": "-inf"}``
list, tuple                   a JSON array (a tuple arrives as a list)
dict with str keys            a JSON object (a key starting with ``$`` is escaped: ``{"$dict": ...}``)
dict with other keys          ``{"$dict": [[key, value], ...]}``
a vector: numpy float array,  ``{"$vector": "<base64 of little-endian floats>", "dtype": "f4"}``
or a list of 8+ floats        (``"f8"`` for float64 and Python floats: exact); arrives as a list
                              of floats
datetime, date, time          ``{"$datetime": "2026-11-26T10:00:00+00:00"}``, ``{"$date": ...}``,
                              ``{"$time": ...}`` (ISO 8601)
timedelta                     ``{"$timedelta": 93603500000}`` (whole microseconds, exact)
decimal.Decimal               ``{"$decimal": "12.50"}`` (exact)
bytes                         ``{"$bytes": "<base64>"}``
uuid.UUID                     ``{"$uuid": "..."}``
bson ObjectId                 ``{"$oid": "<24 hex digits>"}`` (MongoDB Extended JSON's form)
set, frozenset                ``{"$set": [...]}``, elements in the order of their text (equal sets
                              are one text); arrives as a set, or as a frozenset where it must be
                              hashable (in a set, or as a dict key; a list there arrives as a tuple,
                              a mapping, frozendict-like, as a :class:`DocumentId`)
numpy scalars                 the plain number
============================  ====================================================================

Anything else is refused when it is published (:class:`FeedEncodeError`), as are an int of
more than 4300 digits (what Python converts to text) and a value nested deeper than Python's
recursion limit: nothing is pickled, nothing is guessed, and what is published can be read.
The messages themselves are described in :mod:`reactive.feed`.

>>> import datetime, decimal
>>> text = dumps({"when": datetime.date(2026, 11, 26), "price": decimal.Decimal("1.10"), "n": float("nan")})
>>> text
'{"when":{"$date":"2026-11-26"},"price":{"$decimal":"1.10"},"n":{"$float":"nan"}}'
>>> loads(text)["price"]
Decimal('1.10')
>>> loads(dumps([0.5] * 8)) == [0.5] * 8
True
"""

from __future__ import annotations

import base64
import datetime as _dt
import decimal
import json
import math
import uuid
from collections.abc import Mapping
from typing import Any

import numpy as np

from reactive.errors import ReactiveError
from reactive.events import id_key

#: Version of the message format; a message of another version is dropped and logged.
WIRE_VERSION = 1
#: A list of at least this many Python floats travels packed (exact float64).
VECTOR_MIN = 8

_DTYPES = {"f4": "<f4", "f8": "<f8"}


class FeedEncodeError(ReactiveError, TypeError):
    """A value has no encoding on the feed's wire."""


class FeedDecodeError(ReactiveError, ValueError):
    """A message is not what the feed's wire format says (malformed, wrong version)."""


class DocumentId(dict):
    """A dict that can be hashed: a row id that is a document (a MongoDB ``_id`` may be one), or
    a mapping where a value must be hashable (in a set, or as a dict key), as it arrives.

    >>> row_id = DocumentId({"a": 1, "tags": [2, 3]})
    >>> {row_id: "x"}[DocumentId({"tags": [2, 3], "a": 1})]
    'x'
    >>> row_id == {"a": 1, "tags": [2, 3]}
    True
    """

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(frozenset((k, id_key(v)) for k, v in self.items()))


class RawJSON(str):
    """Text already encoded as JSON; :func:`dumps` writes it as it is."""


def _vector(array: np.ndarray) -> dict[str, str]:
    kind = "f4" if array.dtype == np.float32 else "f8"
    packed = np.ascontiguousarray(array, dtype=_DTYPES[kind]).tobytes()
    return {"$vector": base64.b64encode(packed).decode("ascii"), "dtype": kind}


def _is_vector(value: list | tuple) -> bool:
    # set(map(type, ...)): the check runs in C (twice as fast as all() over a generator)
    return len(value) >= VECTOR_MIN and set(map(type, value)) == {float}


def to_wire(value: Any) -> Any:
    """``value`` as plain JSON data (the tagged forms above); raises :class:`FeedEncodeError`.

    >>> to_wire({"$ref": 1, "ids": {1, 2}})
    {'$dict': [['$ref', 1], ['ids', {'$set': [1, 2]}]]}
    """
    kind = type(value)
    if kind is str or kind is int or kind is bool or value is None:
        return value
    if kind is float:
        return value if math.isfinite(value) else {"$float": repr(value)}
    if kind is list or kind is tuple:
        if _is_vector(value):
            return _vector(np.asarray(value, dtype=np.float64))
        return [to_wire(v) for v in value]
    if isinstance(value, Mapping):
        if all(type(k) is str and not k.startswith("$") for k in value):
            return {k: to_wire(v) for k, v in value.items()}
        return {"$dict": [[to_wire(k), to_wire(v)] for k, v in value.items()]}
    return _tagged(value)


def _tagged(value: Any) -> Any:
    """The tagged form of a value json's encoder does not know (its ``default`` hook)."""
    if isinstance(value, np.ndarray):
        if value.dtype.kind == "f" and value.ndim == 1:
            return _vector(value)
        return to_wire(value.tolist())
    if isinstance(value, np.generic):
        return to_wire(value.item())
    if isinstance(value, float):  # a float subclass
        return to_wire(float(value))
    if isinstance(value, int):
        return int(value)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, _dt.datetime):
        return {"$datetime": value.isoformat()}
    if isinstance(value, _dt.date):
        return {"$date": value.isoformat()}
    if isinstance(value, _dt.time):
        return {"$time": value.isoformat()}
    if isinstance(value, _dt.timedelta):
        return {"$timedelta": value // _dt.timedelta(microseconds=1)}
    if isinstance(value, decimal.Decimal):
        return {"$decimal": str(value)}
    if isinstance(value, bytes | bytearray | memoryview):
        return {"$bytes": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, uuid.UUID):
        return {"$uuid": str(value)}
    if isinstance(value, set | frozenset):
        return {"$set": _canonical_order([to_wire(v) for v in value])}
    if type(value).__name__ == "ObjectId" and type(value).__module__.startswith("bson"):
        return {"$oid": str(value)}
    if isinstance(value, list | tuple):
        return to_wire(list(value))
    if isinstance(value, Mapping):
        return to_wire(dict(value))
    raise FeedEncodeError(f"a value of type {type(value).__name__} cannot be published (see reactive.feed.wire)")


#: ``json.dumps(..., separators=(",", ":"), allow_nan=False)`` without building an encoder per call.
_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)


def _canonical_order(items: list[Any]) -> list[Any]:
    """A set's elements (wire data) in the order of their text: equal sets iterate in different
    orders (of insertion, where hashes collide; of the process's hash seed, for text), and the
    feed takes a value whose text changed for a changed value (an update sent to every subscriber).

    >>> dumps({1, 9}) == dumps({9, 1}), dumps({"b", "a", 10, 9})
    (True, '{"$set":["a","b",10,9]}')
    """
    return sorted(items, key=_ENCODER.encode)


def dumps(value: Any) -> str:
    """``value`` as wire JSON text (compact); raises :class:`FeedEncodeError`.

    >>> dumps(10**5000)
    Traceback (most recent call last):
    ...
    reactive.feed.wire.FeedEncodeError: a value cannot be published: Exceeds the limit (4300 digits) ...
    """
    try:
        if type(value) is int:  # row ids: what json writes for an int
            return int.__repr__(value)
        data = to_wire(value)
        if type(data) is dict and "$vector" in data:  # only _vector makes one: base64 needs no escaping
            return f'{{"$vector":"{data["$vector"]}","dtype":"{data["dtype"]}"}}'
        return _ENCODER.encode(data)
    except ValueError as exc:  # an int of too many digits (for json's parser too)
        raise FeedEncodeError(f"a value cannot be published: {exc}") from None
    except RecursionError:
        raise FeedEncodeError("a value nested too deeply cannot be published") from None


def same_on_the_wire(a: Any, b: Any) -> bool:
    """Whether two values are one value to the feed: their wire text is the same (as a publisher
    compares a row with what it published). NaN is NaN; a ``Decimal('sNaN')`` does not raise.

    >>> same_on_the_wire(float("nan"), float("nan")), same_on_the_wire({"x": 1}, {"x": 1.0})
    (True, False)
    """
    return a is b or dumps(a) == dumps(b)


def from_wire(value: Any) -> Any:
    """The Python value of wire data (the inverse of :func:`to_wire`)."""
    if type(value) is list:
        return [from_wire(v) for v in value]
    if type(value) is dict:
        return _untag(value) if len(value) <= 2 and any(k.startswith("$") for k in value) else _plain(value)
    return value


def _plain(value: dict[str, Any]) -> dict[str, Any]:
    return {k: from_wire(v) for k, v in value.items()}


def _untag(value: dict[str, Any]) -> Any:
    try:
        if "$vector" in value:
            dtype = _DTYPES[value.get("dtype", "f8")]
            return np.frombuffer(base64.b64decode(value["$vector"], validate=True), dtype=dtype).tolist()
        ((tag, data),) = value.items()
        match tag:
            case "$float":
                return float(data) if data in ("nan", "inf", "-inf") else _bad(value)
            case "$dict":
                return {_hashable(from_wire(k)): from_wire(v) for k, v in data}
            case "$datetime":
                return _dt.datetime.fromisoformat(data)
            case "$date":
                return _dt.date.fromisoformat(data)
            case "$time":
                return _dt.time.fromisoformat(data)
            case "$timedelta":
                return _dt.timedelta(microseconds=data) if type(data) is int else _bad(value)
            case "$decimal":
                return decimal.Decimal(data)
            case "$bytes":
                return base64.b64decode(data, validate=True)
            case "$uuid":
                return uuid.UUID(data)
            case "$set":
                return {_hashable(from_wire(v)) for v in data}
            case "$oid":
                from bson import ObjectId

                return ObjectId(data)
    except FeedDecodeError:
        raise
    except Exception as exc:
        raise FeedDecodeError(f"bad tagged value {str(value)[:80]!r}: {exc}") from None
    return _plain(value)  # a two-key object that is not a vector: plain data


def _hashable(value: Any) -> Any:
    """A set's element or a dict's key as it was sent: hashable (a tuple, a frozenset, a
    :class:`DocumentId` of hashable values, as a frozendict's are).

    >>> loads('{"$set": [{"a": [1, 2]}]}')
    {{'a': (1, 2)}}
    """
    if isinstance(value, list):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, set):
        return frozenset(value)
    if isinstance(value, dict):
        return DocumentId({k: _hashable(v) for k, v in value.items()})
    return value


def _bad(value: Any) -> Any:
    raise FeedDecodeError(f"bad tagged value {str(value)[:80]!r}")


def loads(text: str | bytes) -> Any:
    """The Python value of wire JSON text; raises :class:`FeedDecodeError` if malformed."""
    try:
        data = json.loads(text)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise FeedDecodeError(f"not JSON: {exc}") from None
    return from_wire(data)


def parse(text: str | bytes) -> Any:
    """Wire JSON text as JSON data, tags left in place (:func:`from_wire` turns them into values)."""
    try:
        return json.loads(text)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise FeedDecodeError(f"not JSON: {exc}") from None

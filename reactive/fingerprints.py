"""Fingerprints of values: a stable 64-bit digest that tells whether a value changed."""

from __future__ import annotations

import datetime as _dt
import decimal
import hashlib
import json
import uuid
from collections.abc import Iterable
from typing import Any

import numpy as np


def plain_value(value: Any) -> Any:
    """A JSON-serializable stand-in for a value json cannot encode."""
    if isinstance(value, np.ndarray):
        return {"__ndarray__": str(value.dtype), "v": value.tolist()}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, _dt.datetime | _dt.date | _dt.time):
        return {"__dt__": value.isoformat()}
    if isinstance(value, bytes | bytearray | memoryview):
        return {"__bytes__": bytes(value).hex()}
    if isinstance(value, decimal.Decimal | uuid.UUID):
        return {"__str__": str(value)}
    if isinstance(value, set | frozenset):
        return sorted(value, key=repr)
    # bson types (ObjectId, Timestamp, Decimal128, ...) have a faithful str().
    return {"__" + type(value).__name__ + "__": str(value)}


def fingerprint_text(text: str) -> int:
    """A signed 64-bit digest of ``text`` (fits an SQL BIGINT): its UTF-8 bytes' 8-byte blake2b.

    >>> digest = hashlib.blake2b(b"abc", digest_size=8).digest()
    >>> fingerprint_text("abc") == int.from_bytes(digest, "little", signed=True)
    True
    """
    # A copy of an empty state, fed the text: blake2b's constructor parses its keywords on every
    # call, a third of the cost (SQLite's full diff calls this once per row).
    h = _EMPTY.copy()
    h.update(text.encode("utf-8", "surrogatepass"))
    return int.from_bytes(h.digest(), "little", signed=True)


def fingerprints(values: Iterable[Any]) -> list[int]:
    """:func:`fingerprint` of each value; texts (the common input) without a call per value.

    >>> fingerprints(["a", 1, {"b": None}]) == [fingerprint("a"), fingerprint(1), fingerprint({"b": None})]
    True
    """
    # A copy of a hash that has seen the NUL prefix, fed the text: the digest fingerprint_text
    # gives, at about half the cost (blake2b's constructor parses keywords; the copy does not).
    copy = _AFTER_NUL.copy
    digests: list[bytes] = []
    add = digests.append
    for v in values:
        if type(v) is str:
            h = copy()
            h.update(v.encode("utf-8", "surrogatepass"))
            add(h.digest())
        else:
            add(fingerprint(v).to_bytes(8, "little", signed=True))
    return np.frombuffer(b"".join(digests), "<i8").tolist()


#: The hash state of a text before its first byte (see :func:`fingerprint_text`).
_EMPTY = hashlib.blake2b(digest_size=8)
#: The hash state of a text's fingerprint after its NUL prefix (see :func:`fingerprint`).
_AFTER_NUL = hashlib.blake2b(b"\x00", digest_size=8)


def fingerprint(value: Any) -> int:
    """A signed 64-bit digest of any JSON-like or BSON value.

    Equal values give equal fingerprints; dict key order does not matter.

    >>> fingerprint({"a": 1, "b": [1.5, "x"]}) == fingerprint({"b": [1.5, "x"], "a": 1})
    True
    >>> fingerprint("hello") == fingerprint("hello!")
    False
    """
    if type(value) is str:
        # The common case (a text key), without JSON; no JSON text starts with NUL.
        return fingerprint_text("\x00" + value)
    text = json.dumps(value, sort_keys=True, default=plain_value, separators=(",", ":"))
    return fingerprint_text(text)

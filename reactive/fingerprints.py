"""Fingerprints of values: a stable 64-bit digest that tells whether a value changed.

A model's inputs are fingerprinted a batch at a time (:func:`fingerprints`, and
:func:`column_fingerprints` straight from an Arrow text column), by :func:`hash_texts`: a few
numpy operations per 8 bytes of text rather than a hash object per value, which was a fifth
of a trivial model's backfill. Outputs stored before reactive 0.2 hold
:func:`legacy_fingerprint` (blake2b), which a listener still accepts for an input that has not
changed. SQLite's snapshot rows are fingerprinted by :func:`fingerprint_text` (blake2b, inside
SQLite as a function).
"""

from __future__ import annotations

import base64
import datetime as _dt
import decimal
import hashlib
import json
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa


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


def from_plain(value: dict[str, Any]) -> Any:
    """The inverse of :func:`plain_value` for what a row id can be (a ``json.loads`` object
    hook): bytes, a date, time or datetime, a UUID or a decimal; any other object as it is.

    >>> import json
    >>> ids = [b"\\x00", _dt.date(2026, 1, 2), _dt.datetime(2026, 1, 2, 3, 4, tzinfo=_dt.UTC), _dt.time(5, 6),
    ...        uuid.UUID(int=7), decimal.Decimal("1.50")]
    >>> [json.loads(json.dumps(i, default=plain_value), object_hook=from_plain) for i in ids] == ids
    True
    """
    if len(value) != 1:
        return value
    [(tag, text)] = value.items()
    if tag == "__bytes__":
        return bytes.fromhex(text)
    if tag == "__dt__":
        if "T" in text:
            return _dt.datetime.fromisoformat(text)
        return _dt.time.fromisoformat(text) if ":" in text else _dt.date.fromisoformat(text)
    if tag == "__str__":  # a UUID's text never reads as a decimal, nor a decimal's as a UUID
        try:
            return uuid.UUID(text)
        except ValueError:
            return decimal.Decimal(text)
    return value


def json_value(value: Any) -> Any:
    """What JSON stored for a reader holds for a value JSON has no type for, in the forms JSON
    encoders write (pydantic's JSON mode, FastAPI's): ISO 8601 text for a datetime, date or
    time, an ISO 8601 duration for a timedelta, the text of a decimal or a UUID, base64 for
    bytes, a set as a sorted list, a numpy array or number as its values; anything else as its
    text (an ObjectId's hex, an address). Unlike :func:`plain_value` (the form of fingerprints
    and row ids) the type is not kept: a reader of the JSON gets what any JSON would give it.

    >>> values = [_dt.date(2024, 1, 2), _dt.timedelta(days=1, seconds=5, microseconds=500000),
    ...           decimal.Decimal("12.50"), b"\\x00\\xff", {2, 1}]
    >>> json.dumps(values, default=json_value)
    '["2024-01-02", "P1DT5.5S", "12.50", "AP8=", [1, 2]]'
    """
    if isinstance(value, _dt.datetime | _dt.date | _dt.time):
        return value.isoformat()
    if isinstance(value, _dt.timedelta):
        return iso_duration(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, set | frozenset):
        return sorted(value, key=repr)
    if isinstance(value, np.ndarray | np.generic):
        return value.tolist()
    return str(value)


def iso_duration(span: _dt.timedelta) -> str:
    """``span`` as an ISO 8601 duration, as pydantic writes one below a year (past it, in days:
    a year has no fixed length); pydantic's ``TypeAdapter(timedelta)`` parses it back exactly.

    >>> iso_duration(_dt.timedelta(days=1, seconds=5, microseconds=7)), iso_duration(_dt.timedelta(0))
    ('P1DT5.000007S', 'PT0S')
    >>> iso_duration(-_dt.timedelta(hours=1)), iso_duration(_dt.timedelta(days=2, minutes=3))
    ('-PT1H', 'P2DT3M')
    """
    sign = "-" if span < _dt.timedelta(0) else ""
    span = abs(span)
    hours, rest = divmod(span.seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    second = f"{seconds}.{span.microseconds:06d}".rstrip("0") if span.microseconds else str(seconds)
    clock = "".join(f"{n}{unit}" for n, unit in ((hours, "H"), (minutes, "M")) if n)
    clock += f"{second}S" if seconds or span.microseconds or not (clock or span.days) else ""
    return f"{sign}P{f'{span.days}D' if span.days else ''}{'T' + clock if clock else ''}"


def fingerprint_text(text: str) -> int:
    """A signed 64-bit digest of ``text`` (fits an SQL BIGINT): its UTF-8 bytes' 8-byte blake2b.

    >>> digest = hashlib.blake2b(b"abc", digest_size=8).digest()
    >>> fingerprint_text("abc") == int.from_bytes(digest, "little", signed=True)
    True
    """
    return fingerprint_bytes(text.encode("utf-8", "surrogatepass"))


def fingerprint_bytes(data: bytes) -> int:
    """:func:`fingerprint_text` of bytes as they are: a valid UTF-8 text's bytes get its digest.

    >>> fingerprint_bytes("é".encode()) == fingerprint_text("é")
    True
    """
    # A copy of an empty state, fed the bytes: blake2b's constructor parses its keywords on
    # every call, a third of the cost (SQLite's full diff calls this once per row).
    h = _EMPTY.copy()
    h.update(data)
    return int.from_bytes(h.digest(), "little", signed=True)


#: The hash state of a text before its first byte (see :func:`fingerprint_text`).
_EMPTY = hashlib.blake2b(digest_size=8)


def legacy_fingerprint(value: Any) -> int:
    """The input fingerprint of reactive before 0.2: the 8-byte blake2b of the value's text
    (a NUL, then the text itself for a ``str``; its JSON text otherwise).

    Outputs written before 0.2 keep it until their row changes: a listener takes an output
    whose stored fingerprint is this one of the current input as current (see
    ``Listener``), so an upgrade computes nothing again.

    >>> legacy_fingerprint({"a": 1, "b": [1.5, "x"]}) == legacy_fingerprint({"b": [1.5, "x"], "a": 1})
    True
    >>> legacy_fingerprint("abc") == fingerprint_text("\\x00abc")
    True
    """
    if type(value) is str:
        return fingerprint_text("\x00" + value)
    return fingerprint_text(json_text(value))


def json_text(value: Any) -> str:
    """The text a value that is not a ``str`` is fingerprinted by: JSON with sorted keys.

    >>> json_text({"b": [1.5, None], "a": 1})
    '{"a":1,"b":[1.5,null]}'
    """
    return json.dumps(value, sort_keys=True, default=plain_value, separators=(",", ":"))


# -- the fingerprint of inputs: one vectorised pass over a batch's texts ---------------------
#: The seeds of a ``str`` input and of a JSON text (an input that is not a ``str``): ``"1"`` and
#: ``1`` differ; and of a model version (see :func:`versioned`).
_SEED_TEXT, _SEED_JSON, _SEED_VERSION = 0x243F6A8885A308D3, 0x13198A2E03707344, 0xA4093822299F31D0
#: A word's place and a text's length are multiplied by these; SplitMix64's finaliser by those.
POSITION, LENGTH, MIX1, MIX2 = 0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
_U64 = np.uint64
_POSITION, _LENGTH, _MIX1, _MIX2 = (_U64(c) for c in (POSITION, LENGTH, MIX1, MIX2))


def _mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser, in place on a ``uint64`` array: a bijection that spreads every
    input bit over the output."""
    x ^= x >> _U64(30)
    x *= _MIX1
    x ^= x >> _U64(27)
    x *= _MIX2
    x ^= x >> _U64(31)
    return x


#: Words (8 bytes of text each) hashed per numpy pass: the temporary arrays of a pass take
#: about 48 bytes a word (12 MB), whatever the size of a window's texts.
WORDS_PER_PASS = 1 << 18


def hash_texts(data: np.ndarray, starts: np.ndarray, lengths: np.ndarray, seed: int = _SEED_TEXT) -> np.ndarray:
    """A 64-bit digest (``uint64``) of each byte string ``data[starts[i] : starts[i] + lengths[i]]``.

    Each string is cut into little-endian 8-byte words (the last one padded with zeros);
    word ``j`` plus ``(j + 1)`` times a constant goes through SplitMix64's finaliser, and the
    string's digest is the finaliser of the sum of its words', its length and ``seed``. Every
    step is one numpy operation over the words of many strings (up to :data:`WORDS_PER_PASS`
    at a time; a longer string in slices, its sum being theirs): a batch costs a few operations
    per 8 bytes, not a Python call per string, and no copy of the data. Two strings of one length
    that differ in one word always get different digests (the finaliser is a bijection);
    otherwise two strings share one by chance, about once in 2**64 pairs. Not a cryptographic
    hash: it tells whether an input changed, it does not defend against inputs made to collide.

    >>> data = np.frombuffer(b"hello, worldhello, world!", np.uint8)
    >>> h = hash_texts(data, np.array([0, 12]), np.array([12, 13]))
    >>> h.dtype, bool(h[0] == hash_texts(data[:12], np.array([0]), np.array([12]))[0]), bool(h[0] == h[1])
    (dtype('uint64'), True, False)
    """
    data = np.ascontiguousarray(data, np.uint8)
    starts, lengths = np.asarray(starts, np.int64), np.asarray(lengths, np.int64)
    read = _WordReader(data)
    words = (lengths + 7) >> 3
    ends = np.cumsum(words)
    sums = np.zeros(len(lengths), _U64)
    lo = 0
    while lo < len(lengths):
        # Strings lo .. hi-1: as many whole strings as fit in a pass, at least one.
        hi = max(lo + 1, int(np.searchsorted(ends, ends[lo] - words[lo] + WORDS_PER_PASS, side="right")))
        if hi - lo == 1 and words[lo] > WORDS_PER_PASS:  # one long string, in slices of whole words
            offsets = np.arange(0, int(words[lo]), WORDS_PER_PASS, dtype=np.int64)
            pieces = np.minimum(lengths[lo] - 8 * offsets, 8 * WORDS_PER_PASS)
            for offset, piece in zip(offsets.tolist(), pieces.tolist(), strict=True):
                part = _word_sums(read, starts[lo : lo + 1] + 8 * offset, np.array([piece]), offset)
                sums[lo : lo + 1] += part
        else:
            sums[lo:hi] = _word_sums(read, starts[lo:hi], lengths[lo:hi], 0)
        lo = hi
    sums += lengths.astype(_U64) * _LENGTH + _U64(seed)
    return _mix(sums)


class _WordReader:
    """The little-endian 8-byte word at any byte offset of ``data``, read in place (an unaligned
    view); the last 7 offsets, where 8 bytes would run past the end, from a zero-padded copy of
    the data's tail."""

    def __init__(self, data: np.ndarray) -> None:
        self.safe = len(data) - 7  # offsets below this have 8 bytes of data
        self.view = np.lib.stride_tricks.as_strided(
            np.frombuffer(data, "<u8", count=len(data) // 8), shape=(max(self.safe, 0),), strides=(1,), writeable=False
        )
        self.base = max(len(data) - 8, 0)
        tail = np.zeros(16, np.uint8)
        tail[: len(data) - self.base] = data[self.base :]
        self.tail = np.lib.stride_tricks.as_strided(tail.view("<u8"), shape=(9,), strides=(1,), writeable=False)

    def __call__(self, offsets: np.ndarray, last: int) -> np.ndarray:
        """The words at ``offsets``, the largest of which is ``last``."""
        if last < self.safe:
            return self.view[offsets]
        if self.safe <= 0:  # under 8 bytes of data: every word is in the tail
            return self.tail[offsets - self.base]
        # Only the last few words of the data are late (an Arrow column's last text usually
        # ends there): every word read in place, those few read again from the tail. Masks
        # over every offset tripled the cost of the read.
        late = np.flatnonzero(offsets >= self.safe)
        out = self.view[np.minimum(offsets, self.safe - 1)]
        out[late] = self.tail[offsets[late] - self.base]
        return out


def _word_sums(read: _WordReader, starts: np.ndarray, lengths: np.ndarray, offset: int) -> np.ndarray:
    """For each string, the wrapping sum of its words' finalised values; its words are numbered
    from ``offset`` (a slice of a longer string)."""
    words = (lengths + 7) >> 3
    first = np.cumsum(words) - words  # each string's first word
    k8 = np.arange(0, 8 * int(words.sum()), 8, dtype=np.int64)  # 8 times each word's number
    w = read(np.repeat(starts - 8 * first, words) + k8, int((starts + 8 * words - 8)[words > 0].max(initial=-1)))
    # The last word of a string that does not fill it: only the string's own bytes.
    partial = np.flatnonzero(lengths & 7)
    w[first[partial] + words[partial] - 1] &= (_U64(1) << (8 * (lengths[partial] & 7)).astype(_U64)) - _U64(1)
    # Each word's place in its string (from ``offset``), plus one, times the constant.
    place = (k8 >> 3).view(_U64) + _U64(offset + 1)
    place -= np.repeat(first.view(_U64), words)
    place *= _POSITION
    w += place
    sums = np.concatenate([np.zeros(1, _U64), np.cumsum(_mix(w), dtype=_U64)])  # wraps mod 2**64
    return sums[first + words] - sums[first]


#: Batches up to this many values, of texts up to this many bytes, are hashed in plain Python:
#: numpy's own cost per call (about 0.1 ms) is more than a short text's words cost one by one.
FEW_VALUES, SHORT_TEXT = 8, 256
_MASK = (1 << 64) - 1


def _hash_short(data: bytes, seed: int) -> int:
    """:func:`hash_texts` of one byte string, in plain Python (as a ``uint64`` value)."""
    total = 0
    for place in range(0, len(data), 8):
        word = int.from_bytes(data[place : place + 8], "little")
        total += _mix_int((word + (place // 8 + 1) * POSITION) & _MASK)
    return _mix_int((total + len(data) * LENGTH + seed) & _MASK)


def _mix_int(x: int) -> int:
    """:func:`_mix` of one value, in plain Python."""
    x ^= x >> 30
    x = (x * MIX1) & _MASK
    x ^= x >> 27
    x = (x * MIX2) & _MASK
    return x ^ (x >> 31)


def _hash_encoded(texts: Sequence[bytes], seed: int) -> np.ndarray:
    if len(texts) <= FEW_VALUES and all(len(t) <= SHORT_TEXT for t in texts):
        return np.array([_hash_short(t, seed) for t in texts], np.uint64)
    lengths = np.fromiter(map(len, texts), np.int64, len(texts))
    return hash_texts(np.frombuffer(b"".join(texts), np.uint8), np.cumsum(lengths) - lengths, lengths, seed)


def _hash_strs(texts: Sequence[str]) -> np.ndarray:
    """:func:`hash_texts` of the UTF-8 bytes of ``str`` values (lone surrogates as themselves)."""
    if len(texts) > FEW_VALUES:
        try:
            column = pa.array(texts, pa.large_string())  # their bytes in one buffer, without a call per value
        except UnicodeEncodeError:  # a lone surrogate (text from JSON, say): encoded below
            pass
        else:
            return _hash_column(column)
    return _hash_encoded([v.encode("utf-8", "surrogatepass") for v in texts], _SEED_TEXT)


def fingerprints(values: Sequence[Any]) -> list[int]:
    """The fingerprint of each value (a signed 64-bit int, fits an SQL BIGINT), in one pass:
    :func:`hash_texts` of a ``str``'s UTF-8 bytes, and of the JSON text (sorted keys) of any
    other JSON-like or BSON value. Equal values give equal fingerprints; dict key order does
    not matter. TypeError or ValueError for a value JSON cannot encode.

    >>> fingerprints(["a", 1, {"b": None}]) == [fingerprint("a"), fingerprint(1), fingerprint({"b": None})]
    True
    >>> fingerprint({"a": 1, "b": [1.5, "x"]}) == fingerprint({"b": [1.5, "x"], "a": 1})
    True
    >>> len(set(fingerprints(["1", 1, "", None, "hello", "hello!"])))
    6
    """
    if set(map(type, values)) == {str}:
        return _hash_strs(values).view(np.int64).tolist()
    texts = [k for k, v in enumerate(values) if type(v) is str]
    others = [k for k, v in enumerate(values) if type(v) is not str]
    out = np.empty(len(values), np.uint64)
    if texts:
        out[texts] = _hash_strs([values[k] for k in texts])
    encoded = [json_text(values[k]).encode("utf-8", "surrogatepass") for k in others]
    out[others] = _hash_encoded(encoded, _SEED_JSON)
    return out.view(np.int64).tolist()


def fingerprint(value: Any) -> int:
    """:func:`fingerprints` of one value.

    >>> fingerprint("hello") == fingerprint("hello!"), fingerprint("1") == fingerprint(1)
    (False, False)
    """
    return fingerprints([value])[0]


def column_fingerprints(column: pa.Array | pa.ChunkedArray) -> list[int] | None:
    """:func:`fingerprints` of an Arrow text column's values, read from its buffers (no Python
    object per value); None for a column of another type or with nulls.

    >>> column_fingerprints(pa.chunked_array([["a", "bc"], ["", "a"]])) == fingerprints(["a", "bc", "", "a"])
    True
    >>> column_fingerprints(pa.array([1, 2])) is None, column_fingerprints(pa.array(["a", None])) is None
    (True, True)
    """
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)) or column.null_count:
        return None
    return _hash_column(column).view(np.int64).tolist()


def _hash_column(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """:func:`hash_texts` of a text column without nulls, read from its buffers."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    parts = [np.empty(0, np.uint64)]
    for chunk in chunks:
        if not len(chunk):
            continue
        _, offsets_buffer, data_buffer = chunk.buffers()
        kind = np.int64 if pa.types.is_large_string(chunk.type) else np.int32
        offsets = np.frombuffer(offsets_buffer, kind)[chunk.offset : chunk.offset + len(chunk) + 1].astype(np.int64)
        data = np.frombuffer(data_buffer, np.uint8) if data_buffer is not None else np.empty(0, np.uint8)
        parts.append(hash_texts(data, offsets[:-1], np.diff(offsets), _SEED_TEXT))
    return np.concatenate(parts)


def versioned(digests: Sequence[int], version: str) -> list[int]:
    """Fingerprints of a model with a ``version``: each digest mixed with the version's own.

    >>> versioned([fingerprint("x")], "2") == versioned([fingerprint("x")], "3")
    False
    """
    seed = _hash_encoded([version.encode("utf-8", "surrogatepass")], _SEED_VERSION)[0]
    return _mix(np.asarray(digests, np.int64).view(np.uint64) ^ seed).view(np.int64).tolist()

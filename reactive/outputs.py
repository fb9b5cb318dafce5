"""Output types: inferred from the first outputs, and every output normalized to its type.

A stored output is a plain Python value (vectors are lists of floats), equal to what the
database gives back when it is read. Chained listeners see the same value whether it came
from a live write or from a read, so their input fingerprints agree. One exception, for
speed: a batch of float vectors (an embedding model's) is checked as one 2-D array, and a
store that takes arrays (``takes_arrays = True``: the SQL stores, which write the batch as
one Arrow column) gets the batch's outputs as that 2-D array (a row per output) and the
writer's callers each vector as a 1-D numpy array (a row of it); lists are made only for what
needs them (a chained listener's inputs).
"""

from __future__ import annotations

import contextlib
import dataclasses as dc
import datetime as _dt
import decimal
import enum
import functools
import json
import math
import re
import sys
import threading
import uuid
import zoneinfo
from collections import Counter
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from reactive.backends.base import OUTPUTS_PREFIX, OutputBatch, OutputRejected, TableInfo, outputs_table
from reactive.errors import ConfigurationError
from reactive.events import id_keys, is_utf8
from reactive.fingerprints import json_value
from reactive.uri import redact

if TYPE_CHECKING:
    import ibis.expr.datatypes as dt

    from reactive.backends.base import CheckpointStore, OutputStore

_SCALARS = {bool: "boolean", int: "int64", float: "float64", str: "string", bytes: "binary"}
#: Values that are never tensors (:func:`from_tensor` leaves them as they are, at once).
_PLAIN = (np.ndarray, np.generic, list, tuple, str, bytes, bytearray, int, float, bool, dict)
#: What a JSON output may hold beside JSON's own values and arrays, written in the forms JSON
#: encoders write them (``json_value``: ISO 8601 text, base64...).
_JSON_STAND_INS = (
    _dt.datetime,
    _dt.date,
    _dt.time,
    _dt.timedelta,
    bytes,
    bytearray,
    memoryview,
    decimal.Decimal,
    uuid.UUID,
    set,
    frozenset,
)
_PYTHON_TYPES = {name: kind for kind, name in _SCALARS.items()}
#: Output types whose values are numbers (or booleans), each checked to be stored unchanged.
_NUMPY_TYPES = {
    "boolean": np.dtype(np.bool_),
    **{name: np.dtype(name) for name in ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")},
    **{name: np.dtype(name) for name in ("float16", "float32", "float64")},
}
#: Numeric types a first batch may mix: whole numbers give way to fractional ones.
_INTS = ("int32", "int64")
_FLOATS = ("float32", "float64")


def from_tensor(value: Any) -> Any:
    """A tensor as a numpy array (torch's moved off its graph and device first; any other
    object with ``__array__``, as jax's and pyarrow's arrays have); anything else as it is.
    A model may return tensors: their items were stored as the text of their repr.

    >>> import pyarrow as pa
    >>> from_tensor(pa.array([1.5, 2.5])), from_tensor([1, 2]), from_tensor("x")
    (array([1.5, 2.5]), [1, 2], 'x')
    """
    if value is None or isinstance(value, _PLAIN):
        return value
    if callable(getattr(value, "detach", None)) and callable(getattr(value, "cpu", None)):
        value = value.detach().cpu()  # torch: a CUDA tensor has no __array__ of its own
        if str(getattr(value, "dtype", "")) == "torch.bfloat16" and callable(getattr(value, "float", None)):
            value = value.float()  # numpy has no bfloat16 (torch refuses); float32 holds each exactly
    if hasattr(value, "__array__"):
        try:
            array = np.asarray(value)
        except (TypeError, ValueError, RuntimeError):
            return value  # refused where it is stored, by its type's name
        # jax's bfloat16 arrives as ml_dtypes' own dtype, which no store knows: as float32.
        return array.astype(np.float32) if array.dtype.name == "bfloat16" else array
    return value


def infer_output_type(value: Any) -> str:
    """An ibis type string for ``value``.

    >>> infer_output_type(np.zeros(3, dtype=np.float32)), infer_output_type([1, 2.5])
    ('array<float32>', 'array<float64>')
    >>> infer_output_type({"label": "spam"}), infer_output_type("x"), infer_output_type(np.eye(2))
    ('json', 'string', 'json')
    >>> infer_output_type([True, 2])  # not numbers: True would be stored as 1
    'json'
    """
    value = _member_value(from_tensor(value))
    # numpy's times not by .item(): a nanosecond one is an int (1704164645123456789 was stored as int64).
    if isinstance(value, np.timedelta64):
        return "interval"
    if isinstance(value, np.datetime64):
        return "date" if np.datetime_data(value.dtype)[0] == "D" else "timestamp"
    if isinstance(value, np.ndarray):
        if value.ndim == 1 and value.dtype.kind in "fiub":
            kind = {"f": "float", "i": "int", "u": "int", "b": "bool"}[value.dtype.kind]
            bits = "" if kind == "bool" else str(max(value.dtype.itemsize * 8, 32))
            return f"array<{'boolean' if kind == 'bool' else kind + bits}>"
        return "json"
    if isinstance(value, np.generic):
        value = value.item()
    for kind, name in _SCALARS.items():
        if type(value) is kind:
            return name
    if (temporal := _temporal_type(value)) is not None:
        return temporal
    # A None among the items is a bad item (refused by normalize_output), not another type.
    items = [v for v in value if v is not None] if isinstance(value, list | tuple) else []
    if items:
        if all(isinstance(v, bool | np.bool_) for v in items):
            return "array<boolean>"
        if all(isinstance(v, int | np.integer) and not isinstance(v, bool) for v in items):
            return "array<int64>"
        if all(isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool) for v in items):
            return "array<float64>"
        if all(isinstance(v, str) for v in items):
            return "array<string>"
    return "json"


def _temporal_type(value: Any) -> str | None:
    """The type a date, time, datetime or timedelta is stored as when no type is declared: a
    datetime with a zone as ``timestamp('UTC')`` (the same instant), without one as
    ``timestamp``; a time with a zone has no such type (None: JSON).

    >>> utc = _dt.timezone.utc
    >>> [_temporal_type(v) for v in (_dt.datetime(2024, 1, 2), _dt.datetime(2024, 1, 2, tzinfo=utc))]
    ['timestamp', "timestamp('UTC')"]
    >>> [_temporal_type(v) for v in (_dt.date(2024, 1, 2), _dt.time(3, 4), _dt.time(3, 4, tzinfo=utc), "x")]
    ['date', 'time', None, None]
    >>> _temporal_type(_dt.timedelta(seconds=1.5))
    'interval'
    """
    if isinstance(value, _dt.datetime):
        return "timestamp" if value.utcoffset() is None else "timestamp('UTC')"
    if isinstance(value, _dt.date):
        return "date"
    if isinstance(value, _dt.time) and value.utcoffset() is None:
        return "time"
    if isinstance(value, _dt.timedelta):
        return "interval"
    return None


def _numpy_moment(value: np.datetime64 | np.timedelta64) -> Any:
    """A numpy datetime or duration as Python's: a ``date`` for a day, a ``datetime`` or a
    ``timedelta`` (None for NaT); ValueError where it is finer than the microsecond they hold.

    >>> _numpy_moment(np.datetime64("2024-01-02")), _numpy_moment(np.datetime64("2024-01-02T03:04:05.5", "ns"))
    (datetime.date(2024, 1, 2), datetime.datetime(2024, 1, 2, 3, 4, 5, 500000))
    >>> _numpy_moment(np.datetime64("2024-01-02T03:04:05.000000001"))
    Traceback (most recent call last):
    ...
    ValueError: output 2024-01-02T03:04:05.000000001 is finer than a microsecond (Python's datetime holds no finer)
    """
    if np.isnat(value):
        return None
    kind = "timedelta64" if isinstance(value, np.timedelta64) else "datetime64"
    if kind == "datetime64" and np.datetime_data(value.dtype)[0] == "D":
        return value.item()
    micro = value.astype(f"{kind}[us]")
    if micro != value:
        raise ValueError(f"output {value} is finer than a microsecond (Python's datetime holds no finer)")
    return micro.item()


_UTC = zoneinfo.ZoneInfo("UTC")
#: What an inferred type falls back to where a store refuses it (SQLite has no time, BSON no
#: date, Kinetica's timestamps no zone: it takes an aware datetime as its instant), in order.
#: JSON holds an interval as its ISO 8601 duration (``json_value``).
_INFERRED_ELSE = {
    "timestamp('UTC')": ("timestamp", "json"),
    "timestamp": ("json",),
    "date": ("json",),
    "time": ("json",),
    "interval": ("json",),
}


def infer_outputs_type(values: Sequence[Any]) -> str | None:
    """The type of a listener's first outputs (None when every one is None).

    Each output's own type, except that numbers of one batch share the widest: whole numbers
    next to fractional ones are floats, so a model whose first vector happens to be whole
    does not fix an integer type that truncates the next ones. Where the outputs are of
    different kinds, the kind most of them have decides (numbers counted together; the first
    among equals), so that one odd output (a model's ``"N/A"`` among its scores) is refused
    for its row rather than fixing a type every other row is refused by. An empty list fits
    any vector type and decides only when every output is one.

    >>> infer_outputs_type([[1, 2], [0.5, 1.5]]), infer_outputs_type([3, None, 4]), infer_outputs_type([None])
    ('array<float64>', 'int64', None)
    >>> infer_outputs_type(["N/A", 0.5, 1]), infer_outputs_type([1, "a", 2.5]), infer_outputs_type(["a", 1])
    ('float64', 'float64', 'string')
    >>> infer_outputs_type([[], [0.5, 1.5]]), infer_outputs_type([[]])
    ('array<float64>', 'json')
    """
    present = [v for v in values if v is not None]
    voters = [v for v in present if not (isinstance(v, list | tuple) and not v)] or present
    kinds = [infer_output_type(v) for v in voters]
    if not kinds:
        return None
    families = Counter(_number_family(kind) for kind in kinds)  # counts in order of first sight
    family = max(families, key=families.__getitem__)  # the first among equals
    if family not in ("{}", "array<{}>"):
        return family
    numbers = {number for number in (*_INTS, *_FLOATS) if family.format(number) in kinds}
    if numbers <= set(_INTS):
        return family.format(max(numbers, key=_INTS.index))
    return family.format("float32" if numbers == {"float32"} else "float64")


def _number_family(kind: str) -> str:
    """``"{}"`` for a number type, ``"array<{}>"`` for a vector of numbers, else ``kind``.

    >>> _number_family("int64"), _number_family("array<float32>"), _number_family("string")
    ('{}', 'array<{}>', 'string')
    """
    for form in ("{}", "array<{}>"):
        if any(kind == form.format(number) for number in (*_INTS, *_FLOATS)):
            return form
    return kind


def normalize_output(value: Any, output_type: str) -> Any:
    """``value`` as a plain Python value of ``output_type``; ValueError if it does not fit.

    A value is never changed to fit: a number is stored when the type holds it exactly (a
    whole float as an integer, an integer as a float), a float vector may be rounded to
    float32 when that is the type, and anything else is refused with the reason.

    >>> normalize_output(np.array([0.1, 0.2], dtype=np.float32), "array<float32>")[0] == float(np.float32(0.1))
    True
    >>> normalize_output([2.0, 3], "array<int64>"), normalize_output(np.eye(2), "json")
    ([2, 3], [[1.0, 0.0], [0.0, 1.0]])
    >>> normalize_output([0.9, 1.5], "array<int64>")
    Traceback (most recent call last):
    ...
    ValueError: output has 0.9 at position 0, which array<int64> cannot hold
    >>> normalize_output(2.5, "int64")
    Traceback (most recent call last):
    ...
    ValueError: output has 2.5, which int64 cannot hold
    >>> normalize_output("x", "array<float64>")
    Traceback (most recent call last):
    ...
    ValueError: output of type str does not fit array<float64>
    """
    if value is None:
        return None
    value = _member_value(from_tensor(value))
    if output_type == "json":
        return _json_output(value)
    if "struct<" in output_type:
        value = _all_fields(value)
    if output_type.startswith("array<"):
        return _vector_output(value, output_type)
    return _scalar_output(value, output_type)


def _member_value(value: Any) -> Any:
    """An enum member as its value (a classifier's ``Label.SPAM`` as ``"spam"``; a ``StrEnum``'s
    was stored as JSON text, a plain ``Enum``'s refused), a ``bytearray`` or ``memoryview`` as
    ``bytes`` (they were JSON's tagged hex, or refused where ``binary`` was declared), anything
    else as it is.

    >>> class Label(enum.Enum):
    ...     SPAM = "spam"
    >>> _member_value(Label.SPAM), infer_output_type(Label.SPAM), normalize_output(Label.SPAM, "string")
    ('spam', 'string', 'spam')
    >>> infer_output_type(bytearray(b"ab")), normalize_output(memoryview(b"ab"), "binary")
    ('binary', b'ab')
    """
    if isinstance(value, enum.Enum):
        return value.value
    return bytes(value) if isinstance(value, bytearray | memoryview) else value


def _fields(value: Any) -> dict[str, Any] | None:
    """A dataclass's or a pydantic model's fields as a dict (pydantic's as Python values: dates
    stay dates); None for any other value."""
    if isinstance(value, type):
        return None
    if dc.is_dataclass(value):
        return {field.name: getattr(value, field.name) for field in dc.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return value.model_dump()
    return None


def _all_fields(value: Any) -> Any:
    """``value`` with every dataclass and pydantic model in it, at any depth, as a dict of its
    fields (what a struct type takes).

    >>> @dc.dataclass
    ... class Line:
    ...     sku: str
    >>> _all_fields({"lines": [Line("a")], "n": 1})
    {'lines': [{'sku': 'a'}], 'n': 1}
    """
    if (fields := _fields(value)) is not None:
        value = fields
    if isinstance(value, Mapping):
        return {key: _all_fields(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_all_fields(item) for item in value]
    return value


def _json_default(value: Any) -> Any:
    """A JSON stand-in: arrays and tensors of any shape as nested lists; dates, times, durations,
    bytes, decimals, UUIDs and sets in JSON encoders' forms (:func:`~reactive.fingerprints.json_value`:
    ISO 8601, base64, text); a dataclass or a pydantic model (what an extraction model returns) as
    the dict of its fields; an object of another type is refused (its repr was stored:
    ``{"__Tensor__": "tensor([1., 1.])"}``).

    >>> @dc.dataclass
    ... class Invoice:
    ...     total: decimal.Decimal
    ...     due: _dt.date
    >>> normalize_output(Invoice(decimal.Decimal("12.50"), _dt.date(2024, 1, 2)), "json")
    {'total': '12.50', 'due': '2024-01-02'}
    """
    if (fields := _fields(value)) is not None:
        return fields
    if isinstance(value, enum.Enum):
        return value.value
    value = from_tensor(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.datetime64 | np.timedelta64):
        try:
            value = _numpy_moment(value)
        except ValueError as exc:
            raise _NotJSON(str(exc)) from None
    elif isinstance(value, np.generic):
        # A numpy number (a classifier's np.float32 score in a dict) was refused as no number.
        return value.item()
    if value is None:  # numpy's NaT
        return None
    if isinstance(value, _JSON_STAND_INS):
        return json_value(value)
    raise _NotJSON(f"output holds a {type(value).__module__}.{type(value).__name__}, which reactive cannot store")


class _NotJSON(TypeError):
    """An output holds an object JSON outputs cannot hold (see :func:`_json_default`)."""


def _json_output(value: Any) -> Any:
    try:
        return json.loads(json.dumps(value, default=_json_default, allow_nan=False))
    except RecursionError:
        raise ValueError(
            f"output is nested too deeply to be written as JSON (Python's limit: {sys.getrecursionlimit()} levels)"
        ) from None
    except _NotJSON as exc:
        raise ValueError(f"{exc}: return numbers, text, lists, dicts or numpy arrays") from None
    except ValueError:
        # json.dumps would write NaN, which is not JSON: the stored text could not be read back.
        raise ValueError("output contains NaN or infinity, which JSON cannot hold") from None


def _vector_output(value: Any, output_type: str) -> list[Any]:
    inner = output_type[6:-1]
    if isinstance(value, str | bytes | Mapping) or not hasattr(value, "__len__"):
        raise ValueError(f"output of type {type(value).__name__} does not fit {output_type}")
    if inner not in _NUMPY_TYPES:
        return [normalize_output(v, inner) for v in value]
    if inner != "boolean" and isinstance(value, list | tuple):
        # numpy takes True among numbers as 1: a value changed to fit (a bool alone is refused).
        flag = next((i for i, v in enumerate(value) if isinstance(v, bool | np.bool_)), None)
        if flag is not None:
            raise ValueError(f"output has {value[flag]!r} at position {flag}, a bool, which {output_type} cannot hold")
    source = _numbers(value, output_type, lambda i: f" at position {i}")
    if source.ndim != 1:
        raise ValueError(f"output of shape {source.shape} does not fit {output_type}")
    if source.dtype.kind not in "biuf":
        held = ", ".join(sorted({type(v).__name__ for v in value}))
        raise ValueError(f"output holds {held} values, which {output_type} cannot hold")
    return _exactly(source, inner, output_type, lambda i: f" at position {i}", value).tolist()


def vector_block(outputs: Sequence[Any], output_type: str) -> np.ndarray | None:
    """A batch of float vectors as one 2-D array of the type's floats, checked at once.

    For outputs that are 1-D float arrays of one length whose values are finite in the
    type (what an embedding model returns), this gives what :func:`normalize_output` gives
    each of them, at numpy's speed; for anything else it is None, and each output is
    normalized alone (and refused with its own reason).

    >>> vector_block([np.array([0.5, 1.0]), np.array([2.0, 3.0])], "array<float32>")
    array([[0.5, 1. ],
           [2. , 3. ]], dtype=float32)
    >>> vector_block([np.array([0.5, np.nan])], "array<float32>") is None
    True
    >>> vector_block([np.zeros(0)], "array<float32>") is None  # no block of no columns: Arrow has none
    True
    """
    inner = output_type[6:-1] if output_type.startswith("array<") else None
    if inner not in _FLOATS or not outputs:
        return None
    shape = getattr(outputs[0], "shape", None)
    if shape == (0,):
        return None
    for value in outputs:
        if type(value) is not np.ndarray or value.ndim != 1 or value.shape != shape or value.dtype.kind != "f":
            return None
    with np.errstate(over="ignore", invalid="ignore"):
        # One copy; np.stack would add a view per vector first (7 against 4.5 ms for 15,360 x 384).
        block = np.concatenate(outputs).reshape(len(outputs), -1).astype(_NUMPY_TYPES[inner], copy=False)
    # Not finite (NaN, or a float64 too large for float32): each is refused alone, with why.
    return block if np.isfinite(block).all() else None


#: A lone surrogate (see :func:`~reactive.events.is_utf8`): found to say where it is.
_SURROGATE = re.compile("[\ud800-\udfff]")
#: Up to this many values, :func:`plain_scalars` checks them one by one instead of with numpy.
_FEW = 64


def plain_scalars(values: Sequence[Any], output_type: str) -> bool:
    """Whether every value is already what :func:`normalize_output` would store: all of the
    type's own Python type and in its range (checked in one pass, not value by value).

    >>> plain_scalars([1.5, 2.0], "float64"), plain_scalars([1.5, 2], "float64"), plain_scalars([2**63], "int64")
    (True, False, False)
    >>> plain_scalars([float("nan")], "float64"), plain_scalars(["a", "b"], "string")
    (False, True)
    """
    kind = _PYTHON_TYPES.get(output_type)
    if kind is None or not values or set(map(type, values)) != {kind}:
        return False
    if kind is str or len(values) <= _FEW:
        # Texts one by one; a window of a few numbers too: numpy's call costs more than the
        # values (on a busy machine a one-float check took 0.09 ms through numpy, cold).
        return all(map(_fits_plainly, values))
    if kind is float:
        return bool(np.isfinite(np.fromiter(values, float, len(values))).all())
    if kind is int:
        return np.array(values).dtype == np.int64
    return True


def _scalar_output(value: Any, output_type: str) -> Any:
    if isinstance(value, np.datetime64 | np.timedelta64):
        value = _numpy_moment(value)
        if value is None:  # NaT: no value, as a model's None
            return None
    elif isinstance(value, np.generic):
        value = value.item()
    elif isinstance(value, _dt.datetime | _dt.timedelta) and (
        getattr(value, "nanosecond", 0) or getattr(value, "nanoseconds", 0)
    ):
        # pandas' Timestamp and Timedelta: Arrow dropped the nanoseconds without a word.
        raise ValueError(f"output {value} is finer than a microsecond (Python's datetime holds no finer)")
    if type(value) is _PYTHON_TYPES.get(output_type) and _fits_plainly(value):
        return value  # the common case, without numpy's cost per value
    if type(value) is str and (surrogate := _SURROGATE.search(value)) is not None:
        raise ValueError(
            f"output has {surrogate.group()!r} at character {surrogate.start()}, a lone surrogate: "
            f"not Unicode text, which no database stores"
        )
    if output_type in _NUMPY_TYPES:
        if type(value) not in (bool, int, float):
            raise ValueError(f"output of type {type(value).__name__} does not fit {output_type}")
        nowhere: Callable[[int], str] = lambda i: ""  # noqa: E731 - one value: no position to name
        return _exactly(_numbers([value], output_type, nowhere), output_type, output_type, nowhere, [value]).tolist()[0]
    expected = _PYTHON_TYPES.get(output_type)
    if expected is not None and type(value) is not expected:
        raise ValueError(f"output of type {type(value).__name__} does not fit {output_type}")
    return value if expected is not None else _other_output(value, output_type)


def _other_output(value: Any, output_type: str) -> Any:
    """``value`` for a declared type reactive has no Python type for, refused where that type
    cannot hold it as it is: what Arrow (through which every SQL store writes) refuses to
    convert, or for a UUID (text in Arrow) what is not one; a ``uuid.UUID`` as its text. It
    used to reach the database, which refused the whole window: every row of it, every time.

    >>> _other_output(decimal.Decimal("1.5"), "decimal(10, 2)")
    Decimal('1.5')
    >>> _other_output(uuid.UUID(int=5), "uuid")
    '00000000-0000-0000-0000-000000000005'
    >>> _other_output(1.5, "decimal(10, 2)")
    Traceback (most recent call last):
    ...
    ValueError: output of type float does not fit decimal(10, 2) (int or Decimal object expected, got float)
    >>> _other_output("x", "uuid")
    Traceback (most recent call last):
    ...
    ValueError: output 'x' is not a UUID, which uuid holds
    >>> _other_output(_dt.datetime(2024, 5, 1, 3, 4), "date")
    Traceback (most recent call last):
    ...
    ValueError: output of type datetime does not fit date (its time of day would be lost): return a date
    >>> _other_output(_dt.datetime(2024, 5, 1, 5, tzinfo=_dt.timezone(_dt.timedelta(hours=2))), "timestamp('UTC')")
    datetime.datetime(2024, 5, 1, 3, 0, tzinfo=zoneinfo.ZoneInfo(key='UTC'))
    """
    if output_type == "uuid":
        try:
            return str(value if isinstance(value, uuid.UUID) else uuid.UUID(value))
        except (TypeError, ValueError, AttributeError):
            raise ValueError(f"output {value!r} is not a UUID, which uuid holds") from None
    arrow_type = _arrow_type(output_type)
    if arrow_type is None:
        return value
    import pyarrow as pa

    if (expected := _temporal(arrow_type)) is not None and (
        not isinstance(value, expected) or (expected is _dt.date and isinstance(value, _dt.datetime))
    ):
        # Arrow takes a number as a count of the type's units since the epoch (5 as 5 us past
        # 1970), and a datetime as a date by dropping its time: a value changed to fit.
        lost = " (its time of day would be lost)" if isinstance(value, _dt.datetime) else ""
        raise ValueError(
            f"output of type {type(value).__name__} does not fit {output_type}{lost}: return a {expected.__name__}"
        )
    try:
        pa.array([value], type=arrow_type)
    except (TypeError, ValueError, pa.ArrowException) as exc:
        raise ValueError(f"output of type {type(value).__name__} does not fit {output_type} ({exc})") from None
    if (path := _undeclared_key(value, arrow_type)) is not None:
        # Arrow drops a key its struct lacks without a word: the value would be stored without it.
        raise ValueError(f"output has the key {path}, which {output_type} does not declare (it would be lost)")
    if (why := _finer_than_declared(value, arrow_type, output_type)) is not None:
        raise ValueError(why)
    if expected is _dt.datetime and arrow_type.tz == "UTC" and value.utcoffset() is not None:
        # The same instant in UTC, as the database gives it back (chained listeners see one value).
        return value.astimezone(_UTC)
    return value


def _temporal(arrow_type: Any) -> type | None:
    """The Python type a value of a temporal Arrow type must be, or None for other types."""
    import pyarrow as pa

    if pa.types.is_timestamp(arrow_type):
        return _dt.datetime
    if pa.types.is_date(arrow_type):
        return _dt.date
    if pa.types.is_time(arrow_type):
        return _dt.time
    if pa.types.is_duration(arrow_type) or pa.types.is_interval(arrow_type):
        return _dt.timedelta
    return None


def _nodes(value: Any, arrow_type: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any, Any]]:
    """Each value inside ``value`` with its Arrow type and where it is (keys as their repr,
    positions as ``[i]``), ``value`` itself first; a struct's keys it does not declare are not
    entered (see :func:`_undeclared_key`)."""
    import pyarrow as pa

    yield path, value, arrow_type
    if value is None:
        return
    if pa.types.is_struct(arrow_type) and isinstance(value, Mapping):
        fields = {arrow_type.field(i).name: arrow_type.field(i).type for i in range(arrow_type.num_fields)}
        for key, item in value.items():
            if key in fields:
                yield from _nodes(item, fields[key], (*path, repr(key)))
    elif pa.types.is_map(arrow_type):
        pairs = value.items() if isinstance(value, Mapping) else value
        for key, item in pairs:
            yield from _nodes(item, arrow_type.item_type, (*path, repr(key)))
    elif pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type) or pa.types.is_fixed_size_list(arrow_type):
        for i, item in enumerate(value):
            yield from _nodes(item, arrow_type.value_type, (*path, f"[{i}]"))


def _where(path: Sequence[str]) -> str:
    """A path of :func:`_nodes` as text: ``'a'[0].'d'``."""
    return "".join(part if i == 0 or part.startswith("[") else f".{part}" for i, part in enumerate(path))


def _undeclared_key(value: Any, arrow_type: Any) -> str | None:
    """Where ``value`` holds a key no struct of ``arrow_type`` declares (a path such as
    ``'b'[0].'d'``), or None.

    >>> import pyarrow as pa
    >>> print(_undeclared_key({"a": [{"c": 1, "d": 2}]}, pa.struct([("a", pa.list_(pa.struct([("c", pa.int8())])))])))
    'a'[0].'d'
    >>> _undeclared_key({"a": 1}, pa.struct([("a", pa.int8()), ("b", pa.int8())])) is None
    True
    """
    import pyarrow as pa

    for path, item, item_type in _nodes(value, arrow_type):
        if pa.types.is_struct(item_type) and isinstance(item, Mapping):
            declared = {item_type.field(i).name for i in range(item_type.num_fields)}
            if (key := next((k for k in item if k not in declared), None)) is not None:
                return _where((*path, repr(key)))
    return None


#: Microseconds in one unit of Arrow's coarser time units.
_UNIT_MICROSECONDS = {"s": 1_000_000, "ms": 1_000}


def _finer_than_declared(value: Any, arrow_type: Any, output_type: str) -> str | None:
    """Why a time in ``value`` does not fit a declared precision coarser than the
    microsecond (``timestamp(3)``: Arrow cut 03:04:05.123456 to 03:04:05.123 without a word), or None.

    >>> import pyarrow as pa
    >>> print(_finer_than_declared(_dt.datetime(2024, 1, 2, 3, 4, 5, 123456), pa.timestamp("ms"), "timestamp(3)"))
    output 2024-01-02 03:04:05.123456 is finer than timestamp(3) holds (it would be cut): round it first
    >>> _finer_than_declared(_dt.datetime(2024, 1, 2, 3, 4, 5, 123000), pa.timestamp("ms"), "timestamp(3)") is None
    True
    """
    for path, item, item_type in _nodes(value, arrow_type):
        unit = getattr(item_type, "unit", None) if isinstance(item, _dt.datetime | _dt.time) else None
        if unit in _UNIT_MICROSECONDS and item.microsecond % _UNIT_MICROSECONDS[unit]:
            where = f" at {_where(path)}," if path else ""
            return f"output {item}{where} is finer than {output_type} holds (it would be cut): round it first"
    return None


@functools.cache
def ibis_type(output_type: str) -> dt.DataType:
    """The ibis type of an output type string (:func:`infer_output_type`'s, or a model's
    declared ``output_type``; ``json`` is reactive's own and has none): scalars and arrays of
    them built directly, anything else parsed. The first parse of a type by ibis builds its
    parser, 60-140 ms on the first window of every process. ibis is imported here, not with
    the module: a MongoDB or Kinetica datalayer never loads it for its outputs.

    >>> import ibis
    >>> ibis_type("array<array<int64>>") == ibis.dtype("array<array<int64>>")
    True
    >>> ibis_type("decimal(10, 2)") == ibis.dtype("decimal(10, 2)")
    True
    >>> ibis_type("vector")
    Traceback (most recent call last):
    ...
    reactive.errors.ConfigurationError: output type 'vector' is not a type (...)
    """
    import ibis
    import ibis.expr.datatypes as dt

    if output_type.startswith("array<") and output_type.endswith(">"):
        return dt.Array(ibis_type(output_type[6:-1]))
    scalar = getattr(dt, output_type, None) if output_type.isidentifier() else None
    if isinstance(scalar, dt.DataType):
        return scalar
    try:
        return ibis.dtype(output_type)
    except Exception as exc:  # ibis's parser raises its own ParseError (and others for odd input)
        raise ConfigurationError(f"output type {output_type!r} is not a type ({type(exc).__name__}: {exc})") from None


def refuse_output_type(output_type: str, backend: str, takes: str) -> ConfigurationError:
    """The error of a declared output type ``backend``'s outputs cannot hold, raised at ``db.add``
    (before anything is created), naming what it takes.

    >>> print(refuse_output_type("date", "mongodb", "timestamp"))
    output type 'date' cannot be stored on mongodb: declare one of timestamp, or 'json' (any JSON value)
    """
    return ConfigurationError(
        f"output type {output_type!r} cannot be stored on {backend}: declare one of {takes}, or 'json' (any JSON value)"
    )


def holds_leaves(output_type: str, plain: frozenset[str], leaf: Callable[[dt.DataType], bool]) -> bool:
    """Whether every value ``output_type`` declares is a ``leaf``, inside arrays, structs and maps
    with text keys (a store writing documents or JSON holds no other keys). A type in ``plain``,
    alone or in arrays, is taken without parsing it (ibis is not loaded for it).

    >>> text, none = (lambda t: t.is_string()), frozenset()
    >>> holds_leaves("array<string>", frozenset({"string"}), text), holds_leaves("map<string, string>", none, text)
    (True, True)
    >>> holds_leaves("map<int64, string>", none, text), holds_leaves("struct<a: date>", none, text)
    (False, False)
    """
    inner = output_type
    while inner.startswith("array<") and inner.endswith(">"):
        inner = inner[6:-1]
    return inner in plain or _leaves(ibis_type(output_type), leaf)


def _leaves(dtype: dt.DataType, leaf: Callable[[dt.DataType], bool]) -> bool:
    if dtype.is_array():
        return _leaves(dtype.value_type, leaf)
    if dtype.is_struct():
        return all(_leaves(field, leaf) for field in dtype.types)
    if dtype.is_map():
        return dtype.key_type.is_string() and _leaves(dtype.value_type, leaf)
    return leaf(dtype)


@functools.lru_cache(maxsize=64)
def _arrow_type(output_type: str) -> Any:
    """The Arrow type of an output type string, or None where it is none (the declaration is
    refused elsewhere, where the store is made)."""
    try:
        return ibis_type(output_type).to_pyarrow()
    except Exception:
        return None


def _fits_plainly(value: bool | int | float | str | bytes) -> bool:
    """Whether a value of the output type's own Python type fits it (int64's range, a finite
    float, a text without a lone surrogate: Python holds one, UTF-8 cannot)."""
    if type(value) is int:
        return -(2**63) <= value < 2**63
    if type(value) is str:
        return is_utf8(value)
    return type(value) is not float or math.isfinite(value)


def _numbers(values: Any, output_type: str, at: Callable[[int], str]) -> np.ndarray:
    """``values`` as a numpy array; what numpy keeps as objects (huge ints, decimals) as floats.

    A None is refused here: numpy would read it as NaN, a value the output never had; so is a
    whole number no float holds exactly (the float would change it: ``-2**63 - 1`` became
    ``-2**63``, which int64 holds).
    """
    try:
        array = np.asarray(values)
    except (TypeError, ValueError):
        raise ValueError(f"output does not fit {output_type}") from None
    if array.dtype.kind != "O":
        return array
    gap = next((i for i, v in enumerate(values) if v is None), None)
    if gap is not None:
        raise ValueError(f"output has None at position {gap}, which {output_type} cannot hold")
    inexact = next((i for i, v in enumerate(values) if type(v) is int and not _float_holds(v)), None)
    if inexact is not None:
        raise ValueError(f"output has {values[inexact]!r}{at(inexact)}, which {output_type} cannot hold")
    try:
        return array.astype(np.float64)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"output does not fit {output_type}") from None


def _float_holds(number: int) -> bool:
    """Whether a float holds ``number`` exactly (Python compares the two exactly).

    >>> _float_holds(2**63), _float_holds(-(2**63) - 1), _float_holds(10**400)
    (True, False, False)
    """
    try:
        return float(number) == number
    except OverflowError:
        return False


def _exactly(
    source: np.ndarray, inner: str, output_type: str, at: Callable[[int], str], given: Sequence[Any] = ()
) -> np.ndarray:
    """``source`` as numbers of type ``inner``, every value unchanged; else ValueError naming the first.

    Floats may round to a narrower float type (that is what the type asks for); NaN and
    infinity are refused (JSON, and so SQLite's storage, cannot hold them). A value is named as
    the model gave it (``given``) where numpy made a Python int a float (2**70 was named
    ``1.1805916207174113e+21``).

    >>> normalize_output(2**70, "int64")
    Traceback (most recent call last):
    ...
    ValueError: output has 1180591620717411303424, which int64 cannot hold
    """
    target = _NUMPY_TYPES[inner]
    if (source.dtype.kind == "b") != (target.kind == "b"):
        # True is not the number 1 here: booleans and numbers are different outputs.
        raise ValueError(f"output of {source.dtype} values does not fit {output_type}")
    if source.dtype.kind == "f" and not np.all(np.isfinite(source)):
        raise ValueError(f"output has NaN or infinity{at(_first(~np.isfinite(source)))}")
    if source.dtype == target:
        return source
    with np.errstate(over="ignore", invalid="ignore"):
        array = source.astype(target)
        if target.kind == "f" and source.dtype.kind == "f":
            changed = ~np.isfinite(array)
        elif target.kind == "f":
            # Back to the integers: numpy compares an integer with a float as two float64s, so
            # 2**53 + 1 would equal the 2**53 float64 rounds it to.
            changed = array.astype(source.dtype) != source
        else:
            changed = array != source
    if np.any(changed):
        position = _first(changed)
        shown = given[position] if position < len(given) and type(given[position]) is int else source[position].item()
        raise ValueError(f"output has {shown!r}{at(position)}, which {output_type} cannot hold")
    return array


def _first(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def recorded_filter(where: Mapping[str, Any]) -> dict[str, Any]:
    """The conditions of a listener's filter a record in JSON keeps as they are (text, whole
    numbers, booleans, finite floats, None), for ``reactive status`` to count rows by: a
    count by fewer conditions counts more rows, never fewer.

    >>> import datetime
    >>> recorded_filter({"lang": "en", "n": 2, "day": datetime.date(2024, 1, 2), "x": float("nan"), "gone": None})
    {'lang': 'en', 'n': 2, 'gone': None}
    """
    return {
        field: value
        for field, value in where.items()
        if value is None or type(value) in (str, int, bool) or (type(value) is float and math.isfinite(value))
    }


class OutputTypes:
    """The type of each listener's stored outputs, kept in the checkpoint store.

    A type is fixed once: declared by the model (``Model(output_type=...)``) or inferred
    from the first outputs, and read back after a restart.
    """

    def __init__(self, checkpoints: CheckpointStore) -> None:
        self.checkpoints = checkpoints
        self._types: dict[str, str] = {}
        #: Per listener, the conditions of its filter ``reactive status`` counts rows by
        #: (:func:`recorded_filter`), once its ``prepare`` said them.
        self._filters: dict[str, dict[str, Any]] = {}
        #: Outputs table -> identifier, for every identifier whose type is known.
        self._identifiers: dict[str, str] = {}
        self._lock = threading.RLock()

    @staticmethod
    def _checkpoint(identifier: str) -> str:
        return f"outputs/{identifier}"

    def get(self, identifier: str) -> str | None:
        """The type of ``identifier``'s stored outputs (an ibis type string), once known."""
        with self._lock:
            if identifier not in self._types:
                saved = self.checkpoints.load_checkpoint(self._checkpoint(identifier))
                if saved and saved.get("type") is not None:  # None: declared, no output yet (see declare)
                    self._remember(identifier, saved["type"])
            return self._types.get(identifier)

    def of_table(self, table: str) -> str | None:
        """The type of the outputs stored in ``table``, if it is the outputs table of a listener.

        A long identifier's table name is shortened with a hash, so the identifier is looked
        up among those whose type is known (every listener added in this process).
        """
        if not table.startswith(OUTPUTS_PREFIX):
            return None
        with self._lock:
            identifier = self._identifiers.get(table)
        if identifier is None and outputs_table(table[len(OUTPUTS_PREFIX) :]) == table:
            identifier = table[len(OUTPUTS_PREFIX) :]
        return None if identifier is None else self.get(identifier)

    def _remember(self, identifier: str, output_type: str) -> None:
        self._types[identifier] = output_type
        self._identifiers[outputs_table(identifier)] = identifier

    def set(
        self,
        identifier: str,
        source: TableInfo,
        output_type: str,
        store: OutputStore,
        where: Mapping[str, Any] | None = None,
    ) -> None:
        """Create ``identifier``'s outputs in ``store`` with this type, and remember it (and
        ``where``, its listener's filter, where given: see :meth:`declare`)."""
        with self._lock:
            if where is not None:
                self._filters[identifier] = recorded_filter(where)
            store.create_outputs(identifier, source, output_type)
            self._record(identifier, source, output_type)
            self._remember(identifier, output_type)

    def declare(self, identifier: str, source: TableInfo, where: Mapping[str, Any] | None = None) -> None:
        """Record that ``identifier`` computes outputs of ``source`` (its filter ``where``)
        before their type is fixed (by its first outputs), or its filter where it changed:
        ``reactive status``, which finds listeners by these records, listed none that had
        written nothing yet (an empty table, a filter matching no row), and counted the rows a
        filter leaves out in their lag."""
        with self._lock:
            self._filters[identifier] = recorded_filter(where or {})
            saved = self.checkpoints.load_checkpoint(self._checkpoint(identifier))
            if saved is None:
                self._record(identifier, source, None)
            elif (saved.get("filter") or {}) != self._filters[identifier]:
                self._record(identifier, source, saved.get("type"))

    def _record(self, identifier: str, source: TableInfo, output_type: str | None) -> None:
        """Save what ``reactive status`` reads of a listener: its outputs' type, its source, the
        conditions of its filter it can count by."""
        saved: dict[str, Any] = {"type": output_type, "source": source.name, "id_column": source.id_column}
        if self._filters.get(identifier):
            saved["filter"] = self._filters[identifier]
        if source.feed:
            saved["feed"] = redact(source.feed)
        self.checkpoints.save_checkpoint(self._checkpoint(identifier), saved)

    def forget(self, identifier: str) -> None:
        with self._lock:
            self.checkpoints.delete_checkpoint(self._checkpoint(identifier))
            self._types.pop(identifier, None)
            self._filters.pop(identifier, None)
            self._identifiers.pop(outputs_table(identifier), None)


class WrittenIds:
    """The source ids of one listener's outputs written while a reconciliation runs (see
    :meth:`OutputWriter.recording`), by id key. Past ``limit`` ids it keeps none and says so
    (``overflowed``): the reconciliation then reads the stored ids again instead."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.ids: dict[Hashable, Any] = {}
        self.overflowed = False

    def add(self, sources: Sequence[Any]) -> None:
        if self.overflowed:
            return
        self.ids.update(zip(id_keys(sources), sources, strict=True))
        if len(self.ids) > self.limit:
            self.ids, self.overflowed = {}, True


class OutputWriter:
    """Writes listeners' outputs to a store: the type is fixed once, every output normalized.

    This is the one place that decides what an output becomes before any backend stores it,
    and every write of an output goes through it: ``fence()`` is called right before each one
    and raises when this process may no longer write (it lost the lease of ``db.cdc``).

    ``window_lock`` is the lock a window's writes are made under, until they are committed (the
    datalayer's :meth:`~reactive.datalayer.Datalayer.writing`); :meth:`write` takes it too.
    """

    def __init__(
        self,
        store: OutputStore,
        types: OutputTypes,
        *,
        fence: Callable[[], None] | None = None,
        window_lock: threading.RLock | None = None,
    ) -> None:
        self.store = store
        self.types = types
        self.fence = fence or (lambda: None)
        self._local = threading.local()
        self._window_lock = window_lock or threading.RLock()
        #: Per listener, the :meth:`recording` blocks open now.
        self._recordings: dict[str, list[WrittenIds]] = {}
        self._recordings_lock = threading.Lock()

    @contextlib.contextmanager
    def recording(self, identifier: str, limit: int) -> Iterator[WrittenIds]:
        """The source ids of ``identifier``'s outputs written from now until the block ends
        (at most ``limit``), for a reconciliation: the outputs live changes write while it scans.

        It starts between two windows (under ``window_lock``), so every output is either
        written and committed before it (a read made inside the block finds it) or recorded.
        Read what it holds once the block has ended.
        """
        written = WrittenIds(limit)
        with self._window_lock, self._recordings_lock:
            self._recordings.setdefault(identifier, []).append(written)
        try:
            yield written
        finally:
            with self._recordings_lock:
                open_now = self._recordings[identifier]
                open_now.remove(written)
                if not open_now:
                    del self._recordings[identifier]

    @contextlib.contextmanager
    def deferring(self, enabled: bool = True) -> Iterator[list[Callable[[], None]]]:
        """Writes made on this thread inside are not made: they are collected, in order, for the
        caller to make later (the handler makes a window's writes in one transaction with its
        positions). Outputs are still normalized, and rejected, at once."""
        pending: list[Callable[[], None]] = []
        if not enabled:
            yield pending
            return
        self._local.pending = pending
        try:
            yield pending
        finally:
            self._local.pending = None

    def _write(self, write: Callable[[], None]) -> None:
        pending = getattr(self._local, "pending", None)
        if pending is not None:
            pending.append(write)
        else:
            self.fence()
            write()

    def prepare(
        self, identifier: str, source: TableInfo, output_type: str | None, where: Mapping[str, Any] | None = None
    ) -> None:
        """Fix the outputs' type when the model declares it (``db.add``); refuse a change.
        ``where``: the listener's filter, recorded for ``reactive status``.

        Outputs of a known type are created again if they are gone (dropped by someone else
        while the process was down): the backfill then fills them. A store that cannot name
        the outputs of ``identifier`` says so here (``check_identifier``), before anything
        is written.
        """
        self.fence()
        check = getattr(self.store, "check_identifier", None)
        if check is not None:
            check(identifier)
        existing = self.types.get(identifier)
        if existing is not None and output_type is not None and existing != output_type:
            raise ConfigurationError(
                f"outputs of {identifier!r} are stored as {existing}, not {output_type}; "
                f"remove the listener with drop_outputs=True to change the type",
                listener=identifier,
            )
        if existing is None and output_type is not None:
            self.types.set(identifier, source, output_type, self.store, where)
            return
        self.types.declare(identifier, source, where)
        if existing is not None:
            self.store.create_outputs(identifier, source, existing)

    def write(self, identifier: str, source: TableInfo, batch: OutputBatch) -> list[Any]:
        """Store a batch of outputs (idempotent); return each output as stored, or why not.

        The outputs' type is inferred from the first batch when the model did not declare
        it (:func:`infer_outputs_type`); an output that does not fit it comes back as
        :class:`OutputRejected` (:func:`normalize_output` says why).
        """
        self.fence()
        logical = self.types.get(identifier)
        outputs = batch.outputs
        if logical is None:
            logical = infer_outputs_type(outputs)
            if logical is None:
                why = (
                    f"the model returned None, and the type of the outputs of {identifier!r} is not known yet"
                    " (the first output that is not None fixes it): declare Model(output_type=...) to store None"
                )
                return [OutputRejected(why) for _ in outputs]
            logical = self._fix_inferred(identifier, source, logical)
        positions: Sequence[int] = range(len(batch))
        block = vector_block(outputs, logical)
        if block is not None and getattr(self.store, "takes_arrays", False):
            # The store writes the block as it is; the rows are views of it, not copies.
            stored: list[Any] = list(block)
            kept = dc.replace(batch, outputs=block)
        elif block is not None:
            stored = block.tolist()
            kept = dc.replace(batch, outputs=stored)
        elif plain_scalars(outputs, logical):
            stored, kept = list(outputs), batch
        else:
            stored, positions = self._normalized(identifier, logical, outputs)
            kept = batch.take(positions, [stored[i] for i in positions])
        refused = self._refused(logical, kept.outputs) if len(kept) else {}
        if refused:  # what this store's database cannot hold, though the type can
            for k, why in refused.items():
                stored[positions[k]] = OutputRejected(why)
            rest = [k for k in range(len(kept)) if k not in refused]
            kept, positions = kept.take(rest), [positions[k] for k in rest]
        if len(kept):
            with self._window_lock:  # see recording
                with self._recordings_lock:
                    for written in self._recordings.get(identifier, ()):
                        written.add(kept.sources)
                self._write(functools.partial(self.store.store_outputs, identifier, logical, kept, stored, positions))
        return stored

    def _fix_inferred(self, identifier: str, source: TableInfo, inferred: str) -> str:
        """Fix ``identifier``'s outputs as ``inferred``, or where the store refuses a date or
        time type (as it refuses one declared) as the next it may hold; return the type fixed."""
        kinds = (inferred, *_INFERRED_ELSE.get(inferred, ()))
        for kind in kinds[:-1]:
            try:
                self.types.set(identifier, source, kind, self.store)
                return kind
            except ConfigurationError:
                continue
        self.types.set(identifier, source, kinds[-1], self.store)
        return kinds[-1]

    def _refused(self, output_type: str, outputs: Sequence[Any]) -> dict[int, str]:
        """What the store says its database cannot hold (``refused_outputs``, where it has one)."""
        refused = getattr(self.store, "refused_outputs", None)
        return {} if refused is None else refused(output_type, outputs)

    @staticmethod
    def _normalized(identifier: str, logical: str, outputs: Sequence[Any]) -> tuple[list[Any], list[int]]:
        """Each output normalized alone: what is stored (or why not), and the positions kept."""
        stored: list[Any] = []
        kept: list[int] = []
        for index, output in enumerate(outputs):
            try:
                value = normalize_output(output, logical)
            except (TypeError, ValueError) as exc:
                why = f"outputs of {identifier!r} are {logical}, fixed by the first outputs or Model(output_type=...)"
                stored.append(OutputRejected(f"{exc} ({why})"))
                continue
            stored.append(value)
            kept.append(index)
        return stored, kept

    def delete(self, identifier: str, ids: Sequence[Any]) -> None:
        """Delete the outputs of these source ids."""
        if ids:
            self._write(functools.partial(self.store.delete_outputs, identifier, list(ids)))

    def drop(self, identifier: str) -> None:
        """Drop ``identifier``'s outputs and forget their type."""
        self.fence()
        self.store.drop_outputs(identifier)
        self.types.forget(identifier)

"""Output types: inferred from the first outputs, and every output normalized to its type.

A stored output is a plain Python value (vectors are lists of floats), equal to what the
database gives back when it is read. Chained listeners see the same value whether it came
from a live write or from a read, so their input fingerprints agree.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from reactive.fingerprints import plain_value

_SCALARS = {bool: "boolean", int: "int64", float: "float64", str: "string", bytes: "binary"}
_PYTHON_TYPES = {name: kind for kind, name in _SCALARS.items()}


def infer_output_type(value: Any) -> str:
    """An ibis type string for ``value``.

    >>> infer_output_type(np.zeros(3, dtype=np.float32)), infer_output_type([1, 2.5])
    ('array<float32>', 'array<float64>')
    >>> infer_output_type({"label": "spam"}), infer_output_type("x")
    ('json', 'string')
    """
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
    if isinstance(value, list | tuple) and value:
        if all(isinstance(v, bool) for v in value):
            return "array<boolean>"
        if all(isinstance(v, int | np.integer) and not isinstance(v, bool) for v in value):
            return "array<int64>"
        if all(isinstance(v, int | float | np.integer | np.floating) for v in value):
            return "array<float64>"
        if all(isinstance(v, str) for v in value):
            return "array<string>"
    return "json"


def normalize_output(value: Any, output_type: str) -> Any:
    """``value`` as a plain Python value of ``output_type``; ValueError if it does not fit.

    >>> normalize_output(np.array([0.1, 0.2], dtype=np.float32), "array<float32>")[0] == float(np.float32(0.1))
    True
    >>> normalize_output("x", "array<float64>")
    Traceback (most recent call last):
    ...
    ValueError: output of type str does not fit array<float64>
    """
    if value is None:
        return None
    if output_type == "json":
        return json.loads(json.dumps(value, default=plain_value))
    if output_type.startswith("array<"):
        inner = output_type[6:-1]
        if isinstance(value, str | bytes | Mapping) or not hasattr(value, "__len__"):
            raise ValueError(f"output of type {type(value).__name__} does not fit {output_type}")
        if inner.startswith(("float", "int", "boolean")):
            numpy_type = {"boolean": np.bool_}.get(inner, inner)
            try:
                array = np.asarray(value, dtype=numpy_type)
            except (TypeError, ValueError):
                raise ValueError(f"output does not fit {output_type}") from None
            if array.ndim != 1:
                raise ValueError(f"output of shape {array.shape} does not fit {output_type}")
            if inner.startswith("float") and not np.all(np.isfinite(array)):
                raise ValueError("output contains NaN or infinity")
            return array.tolist()
        return [normalize_output(v, inner) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    expected = _PYTHON_TYPES.get(output_type)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if expected is not None and type(value) is not expected:
        raise ValueError(f"output of type {type(value).__name__} does not fit {output_type}")
    if expected is float and not math.isfinite(value):
        raise ValueError("output is NaN or infinity")
    return value

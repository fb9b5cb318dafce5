"""Output types: inferred from the first outputs, and every output normalized to its type.

A stored output is a plain Python value (vectors are lists of floats), equal to what the
database gives back when it is read. Chained listeners see the same value whether it came
from a live write or from a read, so their input fingerprints agree.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from reactive.backends.base import OutputRecord, OutputRejected, TableInfo
from reactive.errors import ConfigurationError
from reactive.fingerprints import plain_value

if TYPE_CHECKING:
    from reactive.backends.base import CheckpointStore, OutputStore

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


class OutputTypes:
    """The type of each listener's stored outputs, kept in the checkpoint store.

    A type is fixed once: declared by the model (``Model(output_type=...)``) or inferred
    from the first outputs, and read back after a restart.
    """

    def __init__(self, checkpoints: CheckpointStore) -> None:
        self.checkpoints = checkpoints
        self._types: dict[str, str] = {}
        self._lock = threading.RLock()

    @staticmethod
    def _checkpoint(identifier: str) -> str:
        return f"outputs/{identifier}"

    def get(self, identifier: str) -> str | None:
        """The type of ``identifier``'s stored outputs (an ibis type string), once known."""
        with self._lock:
            if identifier not in self._types:
                saved = self.checkpoints.load_checkpoint(self._checkpoint(identifier))
                if saved:
                    self._types[identifier] = saved["type"]
            return self._types.get(identifier)

    def set(self, identifier: str, source: TableInfo, output_type: str, store: OutputStore) -> None:
        """Create ``identifier``'s outputs in ``store`` with this type, and remember it."""
        with self._lock:
            store.create_outputs(identifier, source, output_type)
            self.checkpoints.save_checkpoint(self._checkpoint(identifier), {"type": output_type, "source": source.name})
            self._types[identifier] = output_type

    def forget(self, identifier: str) -> None:
        with self._lock:
            self.checkpoints.delete_checkpoint(self._checkpoint(identifier))
            self._types.pop(identifier, None)


class OutputWriter:
    """Writes listeners' outputs to a store: the type is fixed once, every output normalized.

    This is the one place that decides what an output becomes before any backend stores it,
    and every write of an output goes through it: ``fence()`` is called right before each one
    and raises when this process may no longer write (it lost the lease of ``db.cdc``).
    """

    def __init__(self, store: OutputStore, types: OutputTypes, *, fence: Callable[[], None] | None = None) -> None:
        self.store = store
        self.types = types
        self.fence = fence or (lambda: None)

    def prepare(self, identifier: str, source: TableInfo, output_type: str | None) -> None:
        """Fix the outputs' type when the model declares it (``db.add``); refuse a change."""
        self.fence()
        existing = self.types.get(identifier)
        if existing is not None and output_type is not None and existing != output_type:
            raise ConfigurationError(
                f"outputs of {identifier!r} are stored as {existing}, not {output_type}; "
                f"remove the listener with drop_outputs=True to change the type",
                listener=identifier,
            )
        if existing is None and output_type is not None:
            self.types.set(identifier, source, output_type, self.store)

    def write(self, identifier: str, source: TableInfo, records: Sequence[OutputRecord]) -> list[Any]:
        """Store outputs in bulk (idempotent); return each output as stored, or why not.

        The outputs' type is inferred from the first batch when the model did not declare
        it; an output that does not fit it comes back as :class:`OutputRejected`.
        """
        self.fence()
        logical = self.types.get(identifier)
        if logical is None:
            sample = next((r.output for r in records if r.output is not None), None)
            if sample is None:
                return [OutputRejected("the model returned None") for _ in records]
            logical = infer_output_type(sample)
            self.types.set(identifier, source, logical, self.store)
        stored: list[Any] = []
        kept: list[tuple[int, OutputRecord, Any]] = []
        for index, record in enumerate(records):
            try:
                value = normalize_output(record.output, logical)
            except (TypeError, ValueError) as exc:
                stored.append(OutputRejected(f"{exc} (outputs of {identifier!r} are {logical})"))
                continue
            stored.append(value)
            kept.append((index, record, value))
        if kept:
            self.fence()
            self.store.store_outputs(identifier, logical, kept, stored)
        return stored

    def delete(self, identifier: str, ids: Sequence[Any]) -> None:
        """Delete the outputs of these source ids."""
        if ids:
            self.fence()
            self.store.delete_outputs(identifier, ids)

    def drop(self, identifier: str) -> None:
        """Drop ``identifier``'s outputs and forget their type."""
        self.fence()
        self.store.drop_outputs(identifier)
        self.types.forget(identifier)

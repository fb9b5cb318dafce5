"""``Model``: a batch prediction function, and the failure isolation around it."""

from __future__ import annotations

import dataclasses as dc
import logging
from collections.abc import Callable, Sequence
from typing import Any

from reactive.errors import ConfigurationError, ModelOutputError

log = logging.getLogger(__name__)


@dc.dataclass(frozen=True, slots=True)
class Failure:
    """Why one input produced no output."""

    error: str


class Model:
    """A model: ``predict`` maps a list of inputs to a list of outputs of the same length.

    >>> m = Model("upper", predict=lambda texts: [t.upper() for t in texts], batch_size=2)
    >>> m.compute(["a", "b", "c"], wait=lambda s: True)
    ['A', 'B', 'C']

    ``output_type`` (an ibis type string such as ``"array<float32>"``) fixes the type of the
    stored outputs; by default it is inferred from the first outputs.

    When ``predict`` raises, :meth:`compute` splits the batch to isolate the failing
    inputs, retries each failing input ``max_retries`` times with exponential backoff
    starting at ``retry_backoff`` seconds, and reports it as a :class:`Failure`. A
    ``predict`` that returns the wrong number of outputs fails the whole batch with a
    :class:`~reactive.errors.ModelOutputError` message.
    """

    def __init__(
        self,
        identifier: str,
        predict: Callable[[list[Any]], Sequence[Any]],
        *,
        batch_size: int = 64,
        output_type: str | None = None,
        max_retries: int = 2,
        retry_backoff: float = 0.05,
    ) -> None:
        if not identifier or not isinstance(identifier, str):
            raise ConfigurationError("a Model needs a non-empty string identifier")
        if not callable(predict):
            raise ConfigurationError(f"Model {identifier!r}: predict must be callable")
        if batch_size < 1:
            raise ConfigurationError(f"Model {identifier!r}: batch_size must be at least 1")
        self.identifier = identifier
        self.predict = predict
        self.batch_size = batch_size
        self.output_type = output_type
        self.max_retries = max_retries
        self.retry_backoff = retry_backoff

    def __repr__(self) -> str:
        return f"Model({self.identifier!r}, batch_size={self.batch_size})"

    def compute(self, inputs: Sequence[Any], *, wait: Callable[[float], bool]) -> list[Any]:
        """Outputs for ``inputs`` in order; an input that failed gets a :class:`Failure`."""
        results: list[Any] = [None] * len(inputs)
        for start in range(0, len(inputs), self.batch_size):
            indexed = list(enumerate(inputs[start : start + self.batch_size], start))
            self._isolate(indexed, results, wait)
        return results

    def _predict(self, values: list[Any]) -> list[Any]:
        outputs = self.predict(values)
        try:
            outputs = list(outputs)
        except TypeError:
            raise ModelOutputError(
                f"model {self.identifier!r} returned {type(outputs).__name__}, not a list of outputs"
            ) from None
        if len(outputs) != len(values):
            raise ModelOutputError(
                f"model {self.identifier!r} returned {len(outputs)} outputs for {len(values)} inputs"
            )
        return outputs

    def _isolate(self, indexed: list[tuple[int, Any]], results: list[Any], wait: Callable[[float], bool]) -> None:
        values = [v for _, v in indexed]
        attempt = 0
        while True:
            try:
                outputs = self._predict(values)
            except ModelOutputError as exc:
                # A count mismatch is a property of the batch: record it for every input.
                for i, _ in indexed:
                    results[i] = Failure(str(exc))
                return
            except Exception as exc:
                if len(indexed) > 1:
                    middle = len(indexed) // 2
                    self._isolate(indexed[:middle], results, wait)
                    self._isolate(indexed[middle:], results, wait)
                    return
                if attempt < self.max_retries and wait(self.retry_backoff * 2**attempt):
                    attempt += 1
                    continue
                results[indexed[0][0]] = Failure(f"{type(exc).__name__}: {exc}")
                log.debug("model %s failed on one input", self.identifier, exc_info=True)
                return
            for (i, _), output in zip(indexed, outputs, strict=True):
                results[i] = output
            return

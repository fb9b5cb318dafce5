"""Checks of numeric settings, one wording for every part: a setting out of range is refused
by name when it is declared, before a thread meets it (a string compared with a float, or
NaN compared false with everything, failed or hung inside one).

>>> seconds("poll_interval", 0.05), whole("page_size", 5000, least=1)
(0.05, 5000)
>>> seconds("gap_timeout", float("nan"))
Traceback (most recent call last):
...
reactive.errors.ConfigurationError: gap_timeout must be a number of seconds above 0, not nan
>>> whole("hwm", True, least=1)
Traceback (most recent call last):
...
reactive.errors.ConfigurationError: hwm must be a whole number of at least 1, not True

Numbers of numpy's types (or any other ``numbers.Integral`` and ``numbers.Real``) are taken,
and given back as Python's ``int`` and ``float``: a setting computed with numpy
(``batch_size=np.int64(64)``, ``k`` of a search) was refused. Every check returns the value
to keep.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from reactive.errors import ConfigurationError


def plain(value: Any) -> Any:
    """``value`` as Python's ``int`` or ``float`` where it is another type's whole or real number
    (numpy's ``int64``, ``float32``); anything else as it is, for a check to refuse (the checks
    here, and those that keep their own wording: ``WindowRows``). A bool
    stays a bool (refused: ``True`` is no count), and so does numpy's, which is no ``Integral``.

    >>> import numpy as np
    >>> plain(np.int64(5)), plain(np.float32(0.5)), plain(True), plain("5")
    (5, 0.5, True, '5')
    """
    if isinstance(value, bool) or type(value) in (int, float):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return value


def seconds(name: str, value: Any, *, zero: bool = False, infinite: bool = False) -> float:
    """``value`` if it is a number of seconds above 0 (or 0 where ``zero``; infinity where
    ``infinite``); never a bool, text or NaN.

    >>> seconds("save_every", 0, zero=True), seconds("save_every", math.inf, zero=True, infinite=True)
    (0, inf)
    >>> seconds("rpc_timeout", math.inf)
    Traceback (most recent call last):
    ...
    reactive.errors.ConfigurationError: rpc_timeout must be a finite number of seconds above 0, not inf
    """
    value = plain(value)
    number = isinstance(value, int | float) and not isinstance(value, bool) and not math.isnan(value)
    if number and (infinite or math.isfinite(value)) and (value > 0 or (zero and value == 0)):
        return value
    finite = "finite " if number and value == math.inf and not infinite else ""
    bound = "of at least 0" if zero else "above 0"
    raise ConfigurationError(f"{name} must be a {finite}number of seconds {bound}, not {value!r}")


def whole(name: str, value: Any, *, least: int, error: type[Exception] = ConfigurationError) -> int:
    """``value`` as an ``int`` if it is a whole number (an ``Integral``, not a bool) of at least
    ``least``; else ``error`` (a ``ConfigurationError`` unless another is asked for).

    >>> import numpy as np
    >>> whole("k", np.int64(5), least=1)
    5
    >>> whole("batch_size", 64.0, least=1)
    Traceback (most recent call last):
    ...
    reactive.errors.ConfigurationError: batch_size must be a whole number of at least 1, not 64.0
    """
    number = plain(value)
    if isinstance(number, bool) or not isinstance(number, int) or number < least:
        raise error(f"{name} must be a whole number of at least {least}, not {value!r}")
    return number


def _finite_at_least(value: Any, least: float) -> bool:
    """Whether ``value`` (see :func:`plain`) is a finite int or float (never a bool) of at least ``least``."""
    return not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value) and value >= least


def milliseconds(name: str, value: Any, *, least: float, most: float = math.inf, most_is: str = "") -> float:
    """``value`` if it is a finite number of milliseconds (not a bool) of at least ``least``
    and at most ``most`` (``most_is`` says what that is, in words).

    >>> milliseconds("lease_ms", float("nan"), least=100)
    Traceback (most recent call last):
    ...
    reactive.errors.ConfigurationError: lease_ms must be a number of milliseconds of at least 100, not nan
    >>> milliseconds("lease_ms", 1e30, least=100, most=86_400_000, most_is="a day")
    Traceback (most recent call last):
    ...
    reactive.errors.ConfigurationError: lease_ms must be ... at most 86,400,000 (a day), not 1e+30
    """
    number = plain(value)
    if not _finite_at_least(number, least) or number > most:
        bound = "" if most == math.inf else f" and at most {most:,.0f}" + (f" ({most_is})" if most_is else "")
        raise ConfigurationError(f"{name} must be a number of milliseconds of at least {least:g}{bound}, not {value!r}")
    return number


def number(name: str, value: Any, *, least: float = 0) -> float:
    """``value`` if it is a finite number (not a bool) of at least ``least``.

    >>> number("num_gpus", 0.5)
    0.5
    >>> number("num_cpus", float("nan"))
    Traceback (most recent call last):
    ...
    reactive.errors.ConfigurationError: num_cpus must be a finite number of at least 0, not nan
    """
    number = plain(value)
    if not _finite_at_least(number, least):
        raise ConfigurationError(f"{name} must be a finite number of at least {least:g}, not {value!r}")
    return number

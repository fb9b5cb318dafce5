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
"""

from __future__ import annotations

import math
from typing import Any

from reactive.errors import ConfigurationError


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
    number = not isinstance(value, bool) and isinstance(value, int | float) and not math.isnan(value)
    if number and (infinite or math.isfinite(value)) and (value > 0 or (zero and value == 0)):
        return value
    finite = "finite " if number and value == math.inf and not infinite else ""
    bound = "of at least 0" if zero else "above 0"
    raise ConfigurationError(f"{name} must be a {finite}number of seconds {bound}, not {value!r}")


def whole(name: str, value: Any, *, least: int) -> int:
    """``value`` if it is a whole number (an ``int``, not a bool) of at least ``least``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ConfigurationError(f"{name} must be a whole number of at least {least}, not {value!r}")
    return value


def _finite_at_least(value: Any, least: float) -> bool:
    """Whether ``value`` is a finite int or float (never a bool) of at least ``least``."""
    return not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value) and value >= least


def milliseconds(name: str, value: Any, *, least: float) -> float:
    """``value`` if it is a finite number of milliseconds (not a bool) of at least ``least``.

    >>> milliseconds("lease_ms", float("nan"), least=100)
    Traceback (most recent call last):
    ...
    reactive.errors.ConfigurationError: lease_ms must be a number of milliseconds of at least 100, not nan
    """
    if not _finite_at_least(value, least):
        raise ConfigurationError(f"{name} must be a number of milliseconds of at least {least:g}, not {value!r}")
    return value


def number(name: str, value: Any, *, least: float = 0) -> float:
    """``value`` if it is a finite number (not a bool) of at least ``least``.

    >>> number("num_gpus", 0.5)
    0.5
    >>> number("num_cpus", float("nan"))
    Traceback (most recent call last):
    ...
    reactive.errors.ConfigurationError: num_cpus must be a finite number of at least 0, not nan
    """
    if not _finite_at_least(value, least):
        raise ConfigurationError(f"{name} must be a finite number of at least {least:g}, not {value!r}")
    return value

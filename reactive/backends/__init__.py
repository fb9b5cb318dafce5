"""The backend registry.

Backends are found by name in the entry-point group ``reactive.backends`` (the built-in
ones are also registered here, so a source checkout works without installing).
A third party registers ``name = "package.module:BackendClass"`` in that group, where the
class subclasses :class:`reactive.backends.base.DataBackend`. Where ``package.module`` also
defines ``SCHEMES`` (the class's ``schemes``) without importing the class, routing a URI imports
only the backend it names: connecting to DuckDB loads no MongoDB driver, and connecting to
MongoDB neither ibis nor DuckDB (each adds about 0.1-0.2 s and tens of thousands of objects
that every full garbage collection of the process then walks).
"""

from __future__ import annotations

import importlib
import logging
import threading
from collections.abc import Callable, Mapping
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

from reactive.errors import ConfigurationError
from reactive.uri import redact, scheme_of

if TYPE_CHECKING:
    from reactive.backends.base import DataBackend

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "reactive.backends"

_BUILTIN = {
    "ibis": "reactive.backends.ibis:IbisBackend",
    "mongodb": "reactive.backends.mongodb:MongoBackend",
    "kinetica": "reactive.backends.kinetica:KineticaBackend",
}
_registry: dict[str, str | type[DataBackend]] = dict(_BUILTIN)
_lock = threading.Lock()
_entry_points_loaded = False


def register_backend(name: str, target: str | type[DataBackend]) -> None:
    """Register a backend class (or its ``"module:Class"`` path) under ``name``."""
    with _lock:
        _registry[name] = target


def unregister_backend(name: str) -> None:
    """Forget the backend registered under ``name`` (for tests of plugins)."""
    with _lock:
        _registry.pop(name, None)


def _load_entry_points() -> None:
    global _entry_points_loaded
    with _lock:
        if _entry_points_loaded:
            return
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            _registry.setdefault(ep.name, ep.value)
        _entry_points_loaded = True


def backend_names() -> list[str]:
    """Names of every registered backend."""
    _load_entry_points()
    return sorted(_registry)


def load_backend(name: str) -> type[DataBackend]:
    """The backend class registered under ``name``; ValueError naming the supported ones."""
    _load_entry_points()
    target = _registry.get(name)
    if target is None:
        raise ConfigurationError(f"unknown backend {name!r}; supported backends: {', '.join(backend_names())}")
    if isinstance(target, str):
        module, _, attr = target.partition(":")
        target = getattr(importlib.import_module(module), attr)
        with _lock:
            _registry[name] = target
    return target


def lazy_exports(module: str, exports: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` that imports each name of ``exports`` from its module on first
    use, so that importing a backend's package (for its ``SCHEMES``) loads nothing else.

    >>> getattr_ = lazy_exports("pkg", {"sqrt": "math"})
    >>> getattr_("sqrt")(9.0)
    3.0
    >>> getattr_("cbrt")
    Traceback (most recent call last):
    ...
    AttributeError: module 'pkg' has no attribute 'cbrt'
    """

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        return getattr(importlib.import_module(exports[name]), name)

    return __getattr__


def _schemes(name: str) -> tuple[str, ...]:
    """The URI schemes of the backend registered under ``name``: its module's ``SCHEMES``
    where it declares them (the class and its driver are not loaded), else its class's."""
    target = _registry.get(name)
    if isinstance(target, str):
        declared = getattr(importlib.import_module(target.partition(":")[0]), "SCHEMES", None)
        if declared is not None:
            return tuple(declared)
    return tuple(load_backend(name).schemes)


def supported_schemes() -> dict[str, str]:
    """URI scheme -> backend name, for every backend whose schemes can be read."""
    schemes: dict[str, str] = {}
    for name in backend_names():
        try:
            declared = _schemes(name)
        except (ImportError, AttributeError) as exc:
            # A backend whose driver is not installed must not break the others.
            log.debug("backend %s is unavailable: %s", name, exc)
            continue
        for scheme in declared:
            schemes.setdefault(scheme, name)
    return schemes


def backend_for_uri(uri: str) -> type[DataBackend]:
    """The backend class whose schemes include ``uri``'s scheme.

    >>> backend_for_uri("duckdb:///app.duckdb").name
    'ibis'
    """
    if not isinstance(uri, str):
        raise ConfigurationError(f"a database URI must be a string, not {type(uri).__name__}")
    schemes = supported_schemes()
    name = schemes.get(scheme_of(uri))
    if name is None:
        listed = ", ".join(f"{s}://" for s in sorted(schemes))
        raise ConfigurationError(f"invalid database URI {redact(uri)!r}; supported schemes: {listed}")
    try:
        return load_backend(name)
    except ImportError as exc:  # its schemes were declared apart from it: a driver is missing
        raise ConfigurationError(f"the {name} backend for {redact(uri)!r} cannot be loaded: {exc}") from exc

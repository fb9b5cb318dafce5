"""The backend registry.

Backends are found by name in the entry-point group ``reactive.backends`` (the built-in
ones are also registered here, so a source checkout works without installing).
A third party registers ``name = "package.module:BackendClass"`` in that group, where the
class subclasses :class:`reactive.backends.base.DataBackend`.
"""

from __future__ import annotations

import importlib
import logging
import threading
from importlib.metadata import entry_points
from typing import TYPE_CHECKING

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


def supported_schemes() -> dict[str, str]:
    """URI scheme -> backend name, for every backend that can be imported."""
    schemes: dict[str, str] = {}
    for name in backend_names():
        try:
            cls = load_backend(name)
        except (ImportError, AttributeError) as exc:
            # A backend whose driver is not installed must not break the others.
            log.debug("backend %s is unavailable: %s", name, exc)
            continue
        for scheme in cls.schemes:
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
    return load_backend(name)

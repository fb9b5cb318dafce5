"""SQL databases through ibis: DuckDB (the embedded default), SQLite and PostgreSQL.

Importing this package loads neither ibis nor a driver: :data:`SCHEMES` is what the backend
registry reads to route a URI, and the classes load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from reactive.backends import lazy_exports

#: The URI schemes this backend serves (``IbisBackend.schemes``).
SCHEMES = ("duckdb", "sqlite", "postgres", "postgresql")

if TYPE_CHECKING:
    from reactive.backends.ibis.backend import IbisBackend
    from reactive.backends.ibis.listener import IbisPollingListener

__all__ = ["SCHEMES", "IbisBackend", "IbisPollingListener"]
__getattr__ = lazy_exports(
    __name__,
    {"IbisBackend": "reactive.backends.ibis.backend", "IbisPollingListener": "reactive.backends.ibis.listener"},
)

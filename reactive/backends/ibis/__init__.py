"""SQL databases through ibis: DuckDB (the embedded default), SQLite and PostgreSQL."""

from reactive.backends.ibis.backend import IbisBackend
from reactive.backends.ibis.listener import IbisPollingListener

__all__ = ["IbisBackend", "IbisPollingListener"]

"""reactive: keep model outputs fresh as the rows they come from change.

>>> import reactive
>>> from reactive.components import Model, Listener
>>> db = reactive.connect("duckdb://")     # doctest: +SKIP
"""

from reactive import feed
from reactive.backends.base import VersionColumn
from reactive.compute import Compute, LocalCompute
from reactive.datalayer import Datalayer, connect
from reactive.errors import (
    BackendError,
    ChangeStreamUnsupportedError,
    ConfigurationError,
    MissingIdColumnError,
    ModelOutputError,
    PermissionDeniedError,
    ReactiveError,
    TableNotFoundError,
)
from reactive.events import ChangePacket, DBEvent
from reactive.handler import WindowRows
from reactive.monitor import TableMonitor

__version__ = "0.2.0.dev0"

__all__ = [
    "BackendError",
    "ChangePacket",
    "ChangeStreamUnsupportedError",
    "Compute",
    "ConfigurationError",
    "DBEvent",
    "Datalayer",
    "LocalCompute",
    "MissingIdColumnError",
    "ModelOutputError",
    "PermissionDeniedError",
    "ReactiveError",
    "TableMonitor",
    "TableNotFoundError",
    "VersionColumn",
    "WindowRows",
    "__version__",
    "connect",
    "feed",
]

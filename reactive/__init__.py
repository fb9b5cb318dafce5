"""reactive: keep model outputs fresh as the rows they come from change.

>>> import reactive
>>> from reactive.components import Model, Listener
>>> db = reactive.connect("duckdb://")     # doctest: +SKIP
"""

from reactive.datalayer import Datalayer, connect
from reactive.errors import (
    BackendError,
    ChangeStreamUnsupportedError,
    ConfigurationError,
    MissingIdColumnError,
    ModelOutputError,
    ReactiveError,
    TableNotFoundError,
)
from reactive.events import ChangePacket, DBEvent

__version__ = "0.1.0"

__all__ = [
    "BackendError",
    "ChangePacket",
    "ChangeStreamUnsupportedError",
    "ConfigurationError",
    "DBEvent",
    "Datalayer",
    "MissingIdColumnError",
    "ModelOutputError",
    "ReactiveError",
    "TableNotFoundError",
    "__version__",
    "connect",
]

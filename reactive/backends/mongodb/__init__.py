"""MongoDB: change streams through pymongo.

Importing this package loads no driver: :data:`SCHEMES` is what the backend registry reads to
route a URI, and the classes load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from reactive.backends import lazy_exports

#: The URI schemes this backend serves (``MongoBackend.schemes``).
SCHEMES = ("mongodb", "mongodb+srv")

if TYPE_CHECKING:
    from reactive.backends.mongodb.backend import MongoBackend
    from reactive.backends.mongodb.listener import MongoChangeStreamListener

__all__ = ["SCHEMES", "MongoBackend", "MongoChangeStreamListener"]
__getattr__ = lazy_exports(
    __name__,
    {
        "MongoBackend": "reactive.backends.mongodb.backend",
        "MongoChangeStreamListener": "reactive.backends.mongodb.listener",
    },
)

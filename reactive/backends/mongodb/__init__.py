"""MongoDB: change streams through pymongo."""

from reactive.backends.mongodb.backend import MongoBackend
from reactive.backends.mongodb.listener import MongoChangeStreamListener

__all__ = ["MongoBackend", "MongoChangeStreamListener"]

"""``_reactive_checkpoints`` in MongoDB: named values (positions, output types)."""

from __future__ import annotations

import datetime as _dt
from collections.abc import Mapping
from typing import Any

from pymongo.database import Database

CHECKPOINTS_COLLECTION = "_reactive_checkpoints"


class MongoCheckpoints:
    """The :class:`~reactive.backends.base.CheckpointStore`: ``_reactive_checkpoints``."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def load_checkpoint(self, name: str) -> dict[str, Any] | None:
        doc = self.db[CHECKPOINTS_COLLECTION].find_one({"_id": name})
        return None if doc is None else dict(doc["value"])

    def delete_checkpoint(self, name: str) -> None:
        self.db[CHECKPOINTS_COLLECTION].delete_one({"_id": name})

    def save_checkpoint(self, name: str, value: Mapping[str, Any]) -> None:
        self.db[CHECKPOINTS_COLLECTION].replace_one(
            {"_id": name},
            {"_id": name, "value": dict(value), "updated_at": _dt.datetime.now(_dt.UTC)},
            upsert=True,
        )

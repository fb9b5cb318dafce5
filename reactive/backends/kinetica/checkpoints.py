"""``_reactive_checkpoints`` in Kinetica: named JSON values (positions, output types, monitors)."""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Mapping
from typing import Any

from reactive.backends.kinetica.tables import TableCatalog, epoch_ms
from reactive.fingerprints import plain_value

CHECKPOINTS_TABLE = "_reactive_checkpoints"


class KineticaCheckpoints:
    """The :class:`~reactive.backends.base.CheckpointStore`: ``_reactive_checkpoints`` (JSON values)."""

    def __init__(self, catalog: TableCatalog) -> None:
        self.catalog = catalog

    def _table(self) -> Any:
        columns = [("name", "string", False), ("value", "string", False), ("updated_at", "long", False)]
        return self.catalog.create(CHECKPOINTS_TABLE, columns, {"name": ["primary_key"], "updated_at": ["timestamp"]})

    def load_checkpoint(self, name: str) -> dict[str, Any] | None:
        if not self.catalog.exists(CHECKPOINTS_TABLE):
            return None
        found = list(self.catalog.records_by_ids(CHECKPOINTS_TABLE, "name", [name]))
        return json.loads(found[0]["value"]) if found else None

    def save_checkpoint(self, name: str, value: Mapping[str, Any]) -> None:
        self._table()
        record = {
            "name": name,
            "value": json.dumps(dict(value), default=plain_value),
            "updated_at": epoch_ms(_dt.datetime.now(_dt.UTC)),
        }
        codec = self.catalog.codec(CHECKPOINTS_TABLE)
        self.catalog.client.insert_records(CHECKPOINTS_TABLE, [record], codec, update_on_existing_pk=True)

    def delete_checkpoint(self, name: str) -> None:
        if self.catalog.exists(CHECKPOINTS_TABLE):
            self.catalog.delete_by_ids(CHECKPOINTS_TABLE, "name", [name])

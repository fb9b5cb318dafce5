"""``_reactive_checkpoints`` in a SQL database: named JSON values (positions, output types)."""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Mapping
from typing import Any

import ibis.expr.datatypes as dt
import pyarrow as pa

from reactive.backends.ibis.connection import IbisConnection
from reactive.backends.ibis.dialects import timestamp_column
from reactive.fingerprints import plain_value

CHECKPOINTS_TABLE = "_reactive_checkpoints"


class IbisCheckpoints:
    """The :class:`~reactive.backends.base.CheckpointStore`: ``_reactive_checkpoints``."""

    def __init__(self, conn: IbisConnection) -> None:
        self.conn = conn

    def load_checkpoint(self, name: str) -> dict[str, Any] | None:
        with self.conn.lock:
            if not self.conn.table_exists(CHECKPOINTS_TABLE):
                return None
            sql = self.conn.statements(CHECKPOINTS_TABLE, "name", ("name", "value")).by_ids
            rows = self.conn.fetch(sql, self.conn.dialect.bind_ids([name]))
        return json.loads(rows[0]["value"]) if rows else None

    def delete_checkpoint(self, name: str) -> None:
        with self.conn.lock:
            if self.conn.table_exists(CHECKPOINTS_TABLE):
                self.conn.delete_by_ids(
                    self.conn.statements(CHECKPOINTS_TABLE, "name", ("name",)).delete_by_ids, [name]
                )

    def save_checkpoint(self, name: str, value: Mapping[str, Any]) -> None:
        dialect = self.conn.dialect
        data = pa.table(
            {
                "name": [name],
                "value": [json.dumps(dict(value), default=plain_value)],
                "updated_at": timestamp_column(dialect, [_dt.datetime.now(_dt.UTC)]),
            }
        )
        with self.conn.lock:
            if not self.conn.table_exists(CHECKPOINTS_TABLE):
                self.conn.create_keyed_table(
                    CHECKPOINTS_TABLE,
                    {"name": dt.string, "value": dt.string, "updated_at": dialect.timestamp_type},
                    key="name",
                )
            self.conn.upsert(CHECKPOINTS_TABLE, "name", data)

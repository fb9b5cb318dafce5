"""The polling listener's position: a snapshot of every row's fingerprint, per table."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pyarrow as pa

from reactive.backends.base import TableInfo, bounded_name
from reactive.backends.ibis.connection import IbisConnection
from reactive.backends.ibis.dialects import FINGERPRINT_ALIAS, SnapshotSQL
from reactive.events import Row, id_key

SNAPSHOT_PREFIX = "_reactive_snapshot__"
ROW_ID, ROW_FINGERPRINT = "row_id", "fingerprint"


def snapshot_table(table: str) -> str:
    """The snapshot of ``table`` (a long name is shortened, see :func:`bounded_name`).

    >>> snapshot_table("docs")
    '_reactive_snapshot__docs'
    """
    return bounded_name(SNAPSHOT_PREFIX, table)


class SnapshotStore:
    """``_reactive_snapshot__<table>``: ``(row_id, fingerprint)`` of every row as last processed.

    This is what :class:`~reactive.backends.ibis.listener.IbisPollingListener` depends on
    (its ``Snapshots``): a poll is :meth:`diff`, the changed rows are read with
    :meth:`rows_with_fingerprints`, and the handler's commit calls :meth:`advance`.
    ``decoded`` turns stored JSON text back into values (the source reader's).
    """

    def __init__(self, conn: IbisConnection, *, decoded: Callable[[str, list[Row]], list[Row]]) -> None:
        self.conn = conn
        self.decoded = decoded
        self._sql: dict[tuple[str, str, tuple[str, ...]], SnapshotSQL] = {}

    def _statements(self, table: TableInfo) -> SnapshotSQL:
        columns = table.columns or tuple(self.conn.table(table.name).columns)
        key = (table.name, table.id_column, columns)
        with self.conn.lock:
            built = self._sql.get(key)
            if built is None:
                built = self._sql[key] = SnapshotSQL(
                    self.conn.dialect, table.name, table.id_column, columns, snapshot_table(table.name)
                )
            return built

    def lost(self, table: TableInfo) -> str | None:
        """Why ``table`` can no longer be followed as it was described, or None.

        Asked after its poll failed. A dropped table, a column that is gone (renamed or
        dropped) and an id column of another type do not heal by themselves: the snapshot and
        the statements no longer fit the table. Anything else may (a lock, a permission).
        """
        conn = self.conn
        with conn.lock:
            self.forget(table.name)
            if not conn.table_exists(table.name):
                return "dropped"
            schema = conn.table(table.name).schema()
            missing = [column for column in table.columns or (table.id_column,) if column not in schema]
            if missing:
                names = ", ".join(repr(column) for column in missing)
                return f"altered: column {names} no longer exists (renamed or dropped)"
            snapshot = snapshot_table(table.name)
            if conn.table_exists(snapshot):
                was = conn.table(snapshot).schema()[ROW_ID].copy(nullable=True)
                now = schema[table.id_column].copy(nullable=True)
                if was != now:
                    return f"altered: its id column {table.id_column!r} is now {now}, was {was}"
        return None

    def forget(self, table: str) -> None:
        """Drop cached statements and handles of ``table`` (it failed, was altered or dropped)."""
        with self.conn.lock:
            self.conn.forget(table)
            self.conn.forget(snapshot_table(table))
            self._sql = {k: v for k, v in self._sql.items() if k[0] != table}

    def drop(self, table: str) -> None:
        self.conn.drop_table(snapshot_table(table))

    def ensure(self, table: TableInfo) -> bool:
        """Record every row's fingerprint now, unless a snapshot exists. True if created."""
        conn = self.conn
        name = snapshot_table(table.name)
        with conn.lock:
            if conn.table_exists(name):
                return False
            id_type = conn.table(table.name).schema()[table.id_column]
            conn.create_keyed_table(name, {ROW_ID: id_type, ROW_FINGERPRINT: conn.dialect.fingerprint_type}, ROW_ID)
            conn.execute(self._statements(table).fill)
            return True

    def diff(self, table: TableInfo) -> list[tuple[Any, str]]:
        """``(row id, "insert" | "update" | "delete")`` for every row that differs from the snapshot.

        One full outer join inside the database; only the ids of changed rows come back. Where
        the dialect says so (SQLite), one join per range of ids, each its own short statement.
        """
        statements = self._statements(table)
        size = self.conn.dialect.diff_range_rows
        if size is None:
            return [(row["id"], row["kind"]) for row in self.conn.fetch(statements.diff)]
        changed: list[tuple[Any, str]] = []
        lower = None
        while True:
            if lower is None:
                found = self.conn.fetch(statements.first_bound, size - 1)
            else:
                found = self.conn.fetch(statements.next_bound, lower, size - 1)
            upper = found[0][table.id_column] if found else None
            bounds = [b for b in (lower, upper) if b is not None]
            for sql in statements.ranged_diff[(lower is not None, upper is not None)]:
                changed.extend((row["id"], row["kind"]) for row in self.conn.fetch(sql, *bounds))
            if upper is None:
                return changed
            lower = upper

    def rows_with_fingerprints(self, table: TableInfo, ids: Sequence[Any]) -> list[tuple[Row, int]]:
        """The current rows with these ids, each with its fingerprint, read in one statement."""
        sql = self._statements(table).by_ids_with_fingerprint
        found = self.decoded(table.name, self.conn.fetch(sql, self.conn.dialect.bind_ids(ids)))
        return [(row, row.pop(FINGERPRINT_ALIAS)) for row in found]

    def advance(self, table: str, upserts: Sequence[tuple[Any, int]], deletes: Sequence[Any]) -> None:
        """Move a table's position: record processed rows' fingerprints, forget deleted rows."""
        name = snapshot_table(table)
        conn = self.conn
        with conn.lock:
            schema = conn.table(name).schema()
            if deletes:
                conn.delete_by_ids(
                    conn.statements(name, ROW_ID, (ROW_ID, ROW_FINGERPRINT)).delete_by_ids, list(deletes)
                )
            if upserts:
                latest = {id_key(i): (i, fp) for i, fp in upserts}
                data = pa.table(
                    {
                        ROW_ID: pa.array([i for i, _ in latest.values()], type=schema[ROW_ID].to_pyarrow()),
                        ROW_FINGERPRINT: pa.array(
                            [fp for _, fp in latest.values()], type=schema[ROW_FINGERPRINT].to_pyarrow()
                        ),
                    }
                )
                conn.upsert(name, ROW_ID, data)

"""``_reactive_checkpoints`` in a SQL database: the sections of every checkpoint.

One row per section: ``key`` (the primary key, ``["checkpoint", "section"]`` as JSON text),
``checkpoint``, ``section``, ``data`` (binary), ``is_text`` (written as ``str``), ``written_at``
(seconds since the epoch). A write is one statement (an upsert of every section of the call),
so it is atomic; the lease's compare-and-set is one ``UPDATE ... WHERE data = ? RETURNING``.

A table in the format of reactive 0.1 (``name``, ``value``, ``updated_at``) is migrated the
first time it is used: its values become sections of the checkpoint ``reactive``.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any

import ibis.expr.datatypes as dt
import pyarrow as pa
import sqlglot as sg
import sqlglot.expressions as sge

from reactive.backends.ibis.connection import IbisConnection
from reactive.checkpoints import ENGINE_CHECKPOINT, Section
from reactive.errors import ConfigurationError

CHECKPOINTS_TABLE = "_reactive_checkpoints"
_COLUMNS = {
    "key": dt.string,
    "checkpoint": dt.string,
    "section": dt.string,
    "data": dt.binary,
    "is_text": dt.boolean,
    "written_at": dt.float64,
}


def section_key(checkpoint: str, section: str) -> str:
    """
    >>> section_key("reactive", "outputs/a")
    '["reactive", "outputs/a"]'
    """
    return json.dumps([checkpoint, section], ensure_ascii=False)


class IbisSections:
    """The :class:`~reactive.checkpoints.SectionStore` of a SQL database."""

    def __init__(self, conn: IbisConnection) -> None:
        self.conn = conn
        self._ready = False
        self._ready_lock = threading.Lock()
        self._sql: dict[str, str] = {}

    # -- the table ------------------------------------------------------------------------------
    def _ensure(self, *, create: bool) -> bool:
        """Whether the table exists (created, or migrated from 0.1, when ``create``)."""
        if self._ready:
            return True
        with self._ready_lock, self.conn.lock:
            if self._ready:
                return True
            if self.conn.table_exists(CHECKPOINTS_TABLE):
                columns = tuple(self.conn.table(CHECKPOINTS_TABLE).columns)
                if {"name", "value"} <= set(columns) and "section" not in columns:
                    self._migrate()
                elif not set(_COLUMNS) <= set(columns):
                    # An application's own table of that name: every checkpoint call (the lease
                    # of db.cdc.start() too) failed with the driver's "no column named key".
                    raise ConfigurationError(
                        f"table {CHECKPOINTS_TABLE!r} exists with other columns ({', '.join(columns)}): it is not"
                        " reactive's, which keeps its checkpoints (positions, the lease, checkpoints.Table) under"
                        " that name; rename it"
                    )
                self._ready = True
                return True
            if not create:
                return False
            self.conn.create_table(CHECKPOINTS_TABLE, _COLUMNS, key="key")
            self._ready = True
            return True

    def _migrate(self) -> None:
        """A 0.1 table (``name``, ``value`` JSON text): its values become sections of ``reactive``."""
        with self.conn.refusals():
            old = self.conn.table(CHECKPOINTS_TABLE).select("name", "value").to_pyarrow().to_pylist()
        self.conn.drop_table(CHECKPOINTS_TABLE)
        self.conn.create_table(CHECKPOINTS_TABLE, _COLUMNS, key="key")
        if old:
            self._upsert({row["name"]: Section.of(row["value"]) for row in old}, ENGINE_CHECKPOINT)

    def _statement(self, name: str, build: Any) -> str:
        sql = self._sql.get(name)
        if sql is None:
            dialect = self.conn.dialect
            sql = build().sql(dialect.name)
            if dialect.name == "postgres":
                sql = sql.replace("?", "%s")
            self._sql[name] = sql
        return sql

    # -- SectionStore ---------------------------------------------------------------------------
    def read_sections(
        self, checkpoint: str, keys: Sequence[str] | None = None, *, lock: bool = False
    ) -> dict[str, Section]:
        """``lock`` (PostgreSQL): ``FOR UPDATE``, the rows locked until the transaction ends. SQLite
        needs nothing (a transaction takes the database's write lock) nor does DuckDB (one process)."""
        if not self._ensure(create=False):
            return {}
        columns = [sg.column(c, quoted=True) for c in ("section", "data", "is_text", "written_at")]
        table = sg.table(CHECKPOINTS_TABLE, quoted=True)
        if keys is None:
            sql = self._statement(
                "all",
                lambda: (
                    sg.select(*columns).from_(table).where(sg.column("checkpoint", quoted=True).eq(sge.Placeholder()))
                ),
            )
            rows = self.conn.fetch_plain(sql, checkpoint)
        else:
            if not keys:
                return {}
            # One key (the lease's check before every window's write): a plain comparison.
            one = len(keys) == 1
            if one:
                condition = sg.column("key", quoted=True).eq(sge.Placeholder())
            else:
                condition = self.conn.dialect.ids_condition("key")
            locking = lock and self.conn.dialect.name == "postgres"
            sql = self._statement(
                ("one" if one else "some") + (" locked" if locking else ""),
                lambda: _locked(sg.select(*columns).from_(table).where(condition), locking),
            )
            bound = [section_key(checkpoint, k) for k in keys]
            rows = self.conn.fetch_plain(sql, bound[0] if one else self.conn.dialect.bind_ids(bound))
        return {
            row["section"]: Section(bytes(row["data"]), bool(row["is_text"]), float(row["written_at"])) for row in rows
        }

    def write_sections(self, checkpoint: str, sections: Mapping[str, Section]) -> None:
        if sections:
            self._ensure(create=True)
            self._upsert(sections, checkpoint)

    def _upsert(self, sections: Mapping[str, Section], checkpoint: str) -> None:
        data = pa.table(
            {
                "key": [section_key(checkpoint, key) for key in sections],
                "checkpoint": [checkpoint] * len(sections),
                "section": list(sections),
                "data": pa.array([s.data for s in sections.values()], type=pa.binary()),
                "is_text": [s.text for s in sections.values()],
                "written_at": [s.written_at for s in sections.values()],
            }
        )
        self.conn.upsert(CHECKPOINTS_TABLE, "key", data)

    def delete_sections(self, checkpoint: str, keys: Sequence[str] | None = None) -> None:
        if not self._ensure(create=False):
            return
        table = sg.table(CHECKPOINTS_TABLE, quoted=True)
        if keys is None:
            where = sg.column("checkpoint", quoted=True).eq(sge.Placeholder())
            self.conn.execute(self._statement("delete all", lambda: sge.delete(table, where=where)), checkpoint)
        elif keys:
            sql = self.conn.statements(CHECKPOINTS_TABLE, "key", ("key",)).delete_by_ids
            self.conn.delete_by_ids(sql, [section_key(checkpoint, k) for k in keys])

    def transaction(self) -> AbstractContextManager[None]:
        """Statements inside are atomic, and a read with ``lock`` holds its rows until the end:
        a write behind checks the lease and writes in one (``checkpoints.Table``)."""
        return self.conn.transaction()

    def replace_section(self, checkpoint: str, key: str, expected: bytes | None, new: Section | None) -> bool:
        self._ensure(create=True)
        table = sg.table(CHECKPOINTS_TABLE, quoted=True)
        column = sg.column
        matches = sg.and_(
            column("key", quoted=True).eq(sge.Placeholder()), column("data", quoted=True).eq(sge.Placeholder())
        )
        returning = sge.Returning(expressions=[column("key", quoted=True)])
        full_key = section_key(checkpoint, key)
        dialect = self.conn.dialect
        with self.conn.lock:
            if expected is None and new is None:
                return not self.read_sections(checkpoint, [key])
            if expected is None:
                assert new is not None
                values = (full_key, checkpoint, key, new.data, new.text, new.written_at)
                sql = self._statement("insert new", lambda: self._insert_if_absent())
            elif new is None:
                values = (full_key, expected)
                sql = self._statement("delete if", lambda: _returning(sge.delete(table, where=matches), returning))
            else:
                values = (new.data, new.text, new.written_at, full_key, expected)
                sql = self._statement("update if", lambda: self._update_if(matches, returning))
            return bool(dialect.fetch_written(self.conn.con, sql, values))

    def _insert_if_absent(self) -> sge.Expression:
        names = list(_COLUMNS)
        insert = sge.insert(
            sge.Values(expressions=[sge.Tuple(expressions=[sge.Placeholder() for _ in names])]),
            sg.table(CHECKPOINTS_TABLE, quoted=True),
            columns=[sg.to_identifier(n, quoted=True) for n in names],
        )
        insert.set(
            "conflict",
            sge.OnConflict(conflict_keys=[sg.to_identifier("key", quoted=True)], action=sge.var("DO NOTHING")),
        )
        return _returning(insert, sge.Returning(expressions=[sg.column("key", quoted=True)]))

    def _update_if(self, matches: sge.Expression, returning: sge.Expression) -> sge.Expression:
        update = sge.update(
            sg.table(CHECKPOINTS_TABLE, quoted=True),
            {c: sge.Placeholder() for c in ("data", "is_text", "written_at")},
            where=matches,
        )
        return _returning(update, returning)


def _returning(statement: sge.Expression, returning: sge.Expression) -> sge.Expression:
    statement.set("returning", returning)
    return statement


def _locked(select: sge.Select, lock: bool) -> sge.Select:
    return select.lock(update=True) if lock else select

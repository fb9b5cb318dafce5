"""What differs between the SQL engines the Ibis backend is tested on.

Everything else in the Ibis backend is written once, in ibis expressions. Identifiers in
the few statements ibis has no API for (DELETE, CREATE TABLE with a primary key) are built
with sqlglot, ibis's own SQL layer, and always quoted: a name is never pasted into SQL text.
"""

from __future__ import annotations

import datetime as _dt
import json
from typing import Any, ClassVar

import ibis
import ibis.expr.datatypes as dt
import ibis.expr.types as ir
import pyarrow as pa
import sqlglot as sg
import sqlglot.expressions as sge

from reactive.fingerprints import fingerprint_text


@ibis.udf.scalar.python
def reactive_fingerprint(text: str) -> int:
    """SQLite has no hash function; this one is registered on the connection by ibis."""
    return fingerprint_text(text)


class Dialect:
    """DuckDB and PostgreSQL: information_schema, native hash, native arrays, MERGE."""

    name: ClassVar[str] = "generic"
    native_arrays: ClassVar[bool] = True
    timestamp_type: ClassVar[dt.DataType] = dt.Timestamp(timezone="UTC")

    def primary_key(self, con: Any, table: str) -> list[str]:
        kcu = con.table("key_column_usage", database="information_schema")
        tc = con.table("table_constraints", database="information_schema")
        expr = (
            kcu.join(
                tc,
                [
                    kcu.constraint_name == tc.constraint_name,
                    kcu.table_name == tc.table_name,
                    kcu.table_schema == tc.table_schema,
                ],
            )
            .filter(
                tc.constraint_type == "PRIMARY KEY",
                kcu.table_name == table,
                kcu.table_schema == con.current_database,
            )
            .select(kcu.column_name, kcu.ordinal_position)
            .order_by("ordinal_position")
        )
        return [r["column_name"] for r in expr.to_pyarrow().to_pylist()]

    def hash_text(self, text: ir.StringValue) -> ir.IntegerValue:
        return text.hash()

    def storage_type(self, logical: str) -> dt.DataType:
        """The column type for a logical output type (JSON values are stored as text)."""
        return dt.string if logical == "json" else ibis.dtype(logical)

    def upsert(self, con: Any, table: str, rows: ir.Table, on: str) -> None:
        con.upsert(table, rows, on=on)


class SQLiteDialect(Dialect):
    """SQLite: pragma_table_info, a Python hash UDF, JSON text for arrays, delete+insert."""

    name = "sqlite"
    native_arrays = False
    # Python's sqlite3 cannot bind timestamps; ISO-8601 text sorts the same way.
    timestamp_type = dt.string

    def primary_key(self, con: Any, table: str) -> list[str]:
        query = (
            sg.select("name", "pk")
            .from_(sg.func("pragma_table_info", sge.convert(table)))
            .where(sg.column("pk").neq(0))
            .order_by("pk")
        )
        with con._safe_raw_sql(query) as cur:
            return [name for name, _ in cur.fetchall()]

    def hash_text(self, text: ir.StringValue) -> ir.IntegerValue:
        return reactive_fingerprint(text)

    def storage_type(self, logical: str) -> dt.DataType:
        dtype = super().storage_type(logical)
        return dt.string if dtype.is_array() else dtype

    def upsert(self, con: Any, table: str, rows: ir.Table, on: str) -> None:
        ids = rows[on].to_pyarrow().to_pylist()
        delete = delete_where_in(table, on, ids).sql(con.dialect)
        # sqlite3 opens a transaction at the DELETE; ibis commits it after the INSERT, so
        # readers never see the row missing. Any failure rolls both back.
        try:
            con.raw_sql(delete)
            con.insert(table, rows)
        except BaseException:
            con.con.rollback()
            raise


def timestamp_column(dialect: Dialect, values: list[_dt.datetime]) -> pa.Array:
    """Timestamps as the dialect stores them."""
    if dialect.timestamp_type.is_string():
        return pa.array([v.isoformat() for v in values], type=pa.string())
    return pa.array(values, type=pa.timestamp("us", tz="UTC"))


def delete_where_in(table: str, column: str, values: list[Any]) -> sge.Delete:
    return sge.delete(
        sg.table(table, quoted=True),
        where=sg.column(column, quoted=True).isin(*(sge.convert(v) for v in values)),
    )


def _stored_as_text(dialect: Dialect, logical: str) -> bool:
    return logical == "json" or (logical.startswith("array<") and not dialect.native_arrays)


def encode_for(dialect: Dialect, logical: str, value: Any) -> Any:
    """The value as the column stores it (JSON text where the engine has no native type)."""
    if value is not None and _stored_as_text(dialect, logical):
        return json.dumps(value)
    return value


def decode_for(dialect: Dialect, logical: str, value: Any) -> Any:
    """The inverse of :func:`encode_for`."""
    if isinstance(value, str) and _stored_as_text(dialect, logical):
        return json.loads(value)
    return value


def dialect_for(con: Any) -> Dialect:
    return SQLiteDialect() if con.name == "sqlite" else Dialect()

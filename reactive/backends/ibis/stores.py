"""What ``reactive`` writes into a SQL database: outputs and errors."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Any

import ibis
import ibis.expr.datatypes as dt
import numpy as np
import orjson
import pyarrow as pa
import sqlglot as sg
import sqlglot.expressions as sge

from reactive.backends.base import (
    FINGERPRINT_FIELD,
    OUTPUT_FIELD,
    SOURCE_FIELD,
    ErrorRecord,
    OutputBatch,
    TableInfo,
    error_time,
    outputs_keyed_otherwise,
    outputs_table,
)
from reactive.backends.ibis.connection import IbisConnection
from reactive.backends.ibis.dialects import (
    encode_for,
    id_array,
    id_kind,
    ids_type,
    stored_as_text,
    timestamp_column,
)
from reactive.errors import ConfigurationError
from reactive.events import Row, id_key
from reactive.fingerprints import from_plain, plain_value
from reactive.rows import column_of, pylist

log = logging.getLogger(__name__)

ERRORS_TABLE = "_reactive_errors"


def json_vectors(block: np.ndarray) -> list[str]:
    """Each row of a block of finite floats as JSON text, holding the numbers ``json.dumps``
    writes for it as a list of Python floats (each the shortest text that reads back as the same
    float64; orjson writes ``1e-8`` where ``json.dumps`` writes ``1e-08``, and no spaces): 5,000 x
    384 floats in 0.08 s, against 0.95 s for ``json.dumps``.

    >>> block = np.array([[0.1, -0.0, 3.4e38], [1e-20, 2.0, 0.5]], dtype=np.float32)
    >>> json_vectors(block)[0]
    '[0.10000000149011612,-0.0,3.3999999521443642e+38]'
    >>> [json.loads(text) for text in json_vectors(block)] == block.tolist()
    True
    >>> json_vectors(block)[1] == json.dumps(block[1].tolist()).replace(" ", "")
    True
    """
    wide = np.ascontiguousarray(block, dtype=np.float64)
    return [orjson.dumps(row, option=orjson.OPT_SERIALIZE_NUMPY).decode() for row in wide]


def nul_texts(output_type: str, outputs: Sequence[Any]) -> set[int]:
    """The positions of the outputs that hold the NUL character: texts, or texts in a vector.

    >>> sorted(nul_texts("string", ["a", "b\\x00"])), sorted(nul_texts("array<string>", [["a", None], ["\\x00"]]))
    ([1], [1])
    >>> nul_texts("json", ['{"a": "\\u0000"}'])  # JSON text writes it as an escape
    set()
    """
    if output_type == "string":
        return {k for k, text in enumerate(outputs) if "\x00" in text}
    if output_type == "array<string>":
        return {k for k, texts in enumerate(outputs) if any(t is not None and "\x00" in t for t in texts)}
    return set()


class IbisOutputs:
    """The :class:`~reactive.backends.base.OutputStore`: one table per listener, keyed by
    ``_source`` (its primary key, except on DuckDB for integer ids: ``Dialect.keyed_by``).

    It takes a batch of vectors as one 2-D numpy array (``takes_arrays``: a row per output)
    and writes it as one Arrow column, without a Python list per vector.

    ``decoded(table, rows)`` turns stored JSON text back into values (the source reader's).
    An outputs table dropped by someone else reads as empty and is created again at the next
    write; ``outputs_lost(source table)`` is then told, so the outputs of every other row
    are computed again.
    """

    def __init__(
        self,
        conn: IbisConnection,
        *,
        decoded: Callable[[str, list[Row]], list[Row]],
        outputs_lost: Callable[[str], None] = lambda table: None,
    ) -> None:
        self.conn = conn
        self.decoded = decoded
        self.outputs_lost = outputs_lost
        #: What each listener's outputs table is created from (``create_outputs`` comes first).
        self._declared: dict[str, TableInfo] = {}
        #: The outputs tables to make at their first write, with their type (see create_outputs).
        self._unmade: dict[str, str] = {}

    takes_arrays = True

    def refused_outputs(self, output_type: str, outputs: Sequence[Any]) -> dict[int, str]:
        """The outputs (normalized to ``output_type``) this database cannot store, by position,
        with why: the writer asks before it writes (a window's writes may be deferred to its
        transaction, too late to record a row as failed)."""
        if self.conn.dialect.text_holds_nul:
            return {}
        why = f"output has the NUL character (\\x00), which {self.conn.dialect.name} text cannot hold"
        return dict.fromkeys(nul_texts(output_type, outputs), why)

    def check_identifier(self, identifier: str) -> None:
        """A ConfigurationError where a table of another shape holds the name of
        ``identifier``'s outputs (an application's own ``_outputs__m__text``): it was read and
        written as outputs, and each statement failed with the driver's error (``no such
        column: _source``), after a log line that adding the listener again resumes it."""
        name = outputs_table(identifier)
        with self.conn.lock:
            if not self.conn.table_exists(name):
                return
            columns = tuple(self.conn.table(name).schema().names)
        if not {SOURCE_FIELD, OUTPUT_FIELD, FINGERPRINT_FIELD} <= set(columns):
            raise ConfigurationError(
                f"listener {identifier!r} keeps its outputs in table {name!r}, which exists with other columns"
                f" ({', '.join(columns)}): it is not reactive's; rename it, or give the listener another"
                " identifier (Listener(..., identifier=...))",
                listener=identifier,
            )

    def create_outputs(self, identifier: str, source: TableInfo, output_type: str) -> None:
        if source.name == outputs_table(identifier):
            raise ConfigurationError(f"listener {identifier!r} cannot read its own outputs", listener=identifier)
        conn = self.conn
        with conn.lock:
            name = outputs_table(identifier)
            if conn.table_exists(source.name):
                id_type = conn.table(source.name).schema()[source.id_column]
            elif conn.table_exists(name):
                id_type = conn.table(name).schema()[SOURCE_FIELD]
            else:
                # A source elsewhere (a table followed from a change feed): the type of its ids
                # is known from the ids themselves, so the table is made at the first write.
                # It was made keyed by int64 here, and every text id then failed its write.
                self._declared[identifier] = source
                self._unmade[identifier] = output_type
                return
            self._create(identifier, source, output_type, id_type)

    def _create(self, identifier: str, source: TableInfo, output_type: str, id_type: dt.DataType) -> None:
        conn = self.conn
        with conn.lock:
            name = outputs_table(identifier)
            conn.create_table(
                name,
                {
                    SOURCE_FIELD: id_type,
                    OUTPUT_FIELD: conn.dialect.storage_type(output_type),
                    FINGERPRINT_FIELD: dt.int64,
                },
                key=SOURCE_FIELD,
                keyed=conn.dialect.keyed_by(id_type),  # one made with its key before keeps it
            )
            conn.keyed(name)  # looked up here, not in the first window (a catalog query)
            stored = conn.table(name).schema()[SOURCE_FIELD]
            if id_kind(stored) != id_kind(id_type):
                conn.forget(name)  # read again at the next try: the application may drop it meanwhile
                raise outputs_keyed_otherwise(identifier, source, stored, id_type)
            self._declared[identifier] = source
            self._unmade.pop(identifier, None)

    def _make_for(self, identifier: str, sources: Sequence[Any]) -> None:
        """Make the outputs table :meth:`create_outputs` left to the first write, keyed by
        the type of the ids it writes (:func:`ids_type`)."""
        output_type = self._unmade.get(identifier)
        if output_type is not None:
            self._create(identifier, self._declared[identifier], output_type, ids_type(sources))

    def store_outputs(
        self, identifier: str, output_type: str, batch: OutputBatch, stored: list[Any], positions: Sequence[int]
    ) -> None:
        name = outputs_table(identifier)
        with self.conn.lock:
            self._make_for(identifier, batch.sources)
            try:
                self._upsert(name, output_type, batch)
            except Exception:
                if identifier not in self._declared or not self._gone(name):
                    raise  # the write's own error, with its cause (a value the column cannot take...)
                source = self._declared[identifier]
                self.create_outputs(identifier, source, output_type)
                self._make_for(identifier, batch.sources)
                self._upsert(name, output_type, batch)
                self.outputs_lost(source.name)

    def _upsert(self, name: str, output_type: str, batch: OutputBatch) -> None:
        conn = self.conn
        schema = conn.table(name).schema()
        data = pa.table(
            {
                SOURCE_FIELD: id_array(batch.sources, schema[SOURCE_FIELD]),
                OUTPUT_FIELD: self._column(batch.outputs, output_type, schema[OUTPUT_FIELD].to_pyarrow()),
                FINGERPRINT_FIELD: pa.array(batch.fingerprints, type=pa.int64()),
            }
        )
        conn.upsert(name, SOURCE_FIELD, data)

    def _column(self, values: Sequence[Any], output_type: str, arrow_type: pa.DataType) -> pa.Array:
        """The outputs as an Arrow column of the table's type: a batch of vectors from its one
        2-D float block (the writer's, see ``takes_arrays``), anything else value by value."""
        dialect = self.conn.dialect
        if isinstance(values, np.ndarray):
            if dialect.native_arrays:
                return pa.FixedSizeListArray.from_arrays(pa.array(values.ravel()), values.shape[1]).cast(arrow_type)
            if stored_as_text(dialect, output_type):
                return pa.array(json_vectors(values), type=arrow_type)
            values = values.tolist()
        if pa.types.is_duration(arrow_type):
            # As a timedelta holds them, in microseconds: ibis names PostgreSQL's interval one of
            # seconds, and Arrow dropped what was finer without a word (5.5 s stored as 5 s).
            return pa.array(values, type=pa.duration("us"))
        if not stored_as_text(dialect, output_type):
            return pa.array(values, type=arrow_type)  # encode_for leaves every value as it is
        return pa.array([encode_for(dialect, output_type, v) for v in values], type=arrow_type)

    def _gone(self, name: str) -> bool:
        """After a statement on ``name`` failed: whether the table was dropped (by someone else).
        False where the failed statement left its transaction aborted (DuckDB: "Current
        transaction is aborted"), so that the statement's own error is the one reported, not
        the look at the catalog that came after it."""
        self.conn.forget(name)
        try:
            return not self.conn.table_exists(name)
        except Exception:
            log.debug("could not look whether %r was dropped after a failed statement", name, exc_info=True)
            return False

    def _statements(self, identifier: str, *columns: str) -> Any:
        return self.conn.statements(outputs_table(identifier), SOURCE_FIELD, columns or (SOURCE_FIELD,))

    def delete_outputs(self, identifier: str, ids: Sequence[Any]) -> None:
        name = outputs_table(identifier)
        with self.conn.lock:
            if not ids or not self.conn.table_exists(name):
                return
            try:
                self.conn.delete_by_ids(self._statements(identifier).delete_by_ids, list(ids))
            except Exception:
                if not self._gone(name):
                    raise

    def output_fingerprints(self, identifier: str, ids: Sequence[Any]) -> dict[Hashable, int]:
        name = outputs_table(identifier)
        with self.conn.lock:
            if not ids or not self.conn.table_exists(name):
                return {}
            sql = self._statements(identifier, SOURCE_FIELD, FINGERPRINT_FIELD).by_ids
            try:
                parts = list(self.conn.read_rows_by_ids(sql, ids))
            except Exception:
                if not self._gone(name):
                    raise
                return {}
        found: dict[Hashable, int] = {}
        for rows in parts:
            keys = map(id_key, column_of(rows, SOURCE_FIELD))
            found.update(zip(keys, column_of(rows, FINGERPRINT_FIELD), strict=True))
        return found

    def scan_output_fingerprints(self, identifier: str, *, page_size: int) -> Iterator[list[tuple[Any, int]]]:
        name = outputs_table(identifier)
        with self.conn.lock:
            if not self.conn.table_exists(name):
                return
            statements = self._statements(identifier, SOURCE_FIELD, FINGERPRINT_FIELD)
        try:
            for page in self.conn.pages(statements, SOURCE_FIELD, page_size):
                yield list(zip(column_of(page, SOURCE_FIELD), column_of(page, FINGERPRINT_FIELD), strict=True))
        except Exception:
            if not self._gone(name):
                raise

    def read_outputs(self, identifier: str) -> list[dict[str, Any]]:
        name = outputs_table(identifier)
        with self.conn.lock, self.conn.refusals():
            if not self.conn.table_exists(name):
                return []
            try:
                o = self.conn.table(name)
                source = o[SOURCE_FIELD]
                # ibis's Arrow conversion of a UUID column fails on PostgreSQL and SQLite: read as
                # text, then as the driver hands the rows' ids over (PostgreSQL's: uuid.UUID).
                uuids = source.type().is_uuid()
                column = source.cast("string").name(SOURCE_FIELD) if uuids else source
                expr = o.select(column, OUTPUT_FIELD).order_by(SOURCE_FIELD)
                if o[OUTPUT_FIELD].type().is_interval():
                    # ibis reads an interval through Arrow as a duration of the unit it names
                    # (PostgreSQL's: seconds, what is finer dropped; DuckDB's fails the cast):
                    # the driver gives timedeltas as they are stored.
                    rows = self.conn.fetch_plain(self.conn.con.compile(expr))
                else:
                    table = expr.to_pyarrow()
                    # Maps as dicts, as the model returned them (Arrow's own list is of key-value pairs).
                    columns = [pylist(table.column(n)) for n in table.column_names]
                    rows = [dict(zip(table.column_names, values, strict=True)) for values in zip(*columns, strict=True)]
                if uuids and self.conn.dialect.uuid_objects:
                    for row in rows:
                        row[SOURCE_FIELD] = uuid.UUID(row[SOURCE_FIELD])
            except Exception:
                if not self._gone(name):
                    raise
                return []
        return self.decoded(name, rows)

    def drop_outputs(self, identifier: str) -> None:
        self.conn.drop_table(outputs_table(identifier))
        self._declared.pop(identifier, None)
        self._unmade.pop(identifier, None)


class IbisErrors:
    """The :class:`~reactive.backends.base.ErrorStore`: ``_reactive_errors``."""

    def __init__(self, conn: IbisConnection) -> None:
        self.conn = conn

    def record_errors(self, records: Sequence[ErrorRecord]) -> None:
        if not records:
            return
        dialect = self.conn.dialect
        schema = ibis.schema(
            {
                "listener": "string",
                "table": "string",
                "source": "string",
                "error": "string",
                "at": dialect.timestamp_type,
            }
        )
        data = pa.table(
            {
                "listener": [r.listener for r in records],
                "table": [r.table for r in records],
                "source": [json.dumps(r.source, default=plain_value) for r in records],
                "error": [r.error for r in records],
                "at": timestamp_column(dialect, [r.at for r in records]),
            }
        )
        with self.conn.lock, self.conn.refusals():
            if not self.conn.table_exists(ERRORS_TABLE):
                self.conn.con.create_table(ERRORS_TABLE, schema=schema)
            self.conn.con.insert(ERRORS_TABLE, ibis.memtable(data))

    def clear_errors(self, listener: str, sources: Sequence[Any] | None = None) -> None:
        """Forget ``listener``'s errors (of these source ids only, when given)."""
        dialect = self.conn.dialect
        where = sg.column("listener", quoted=True).eq(sge.Placeholder())
        params: list[Any] = [listener]
        if sources is not None:
            where = sg.and_(where, dialect.ids_condition("source"))
            params.append(dialect.bind_ids([json.dumps(s, default=plain_value) for s in sources]))
        sql = dialect.render(sge.delete(sg.table(ERRORS_TABLE, quoted=True), where=where))
        with self.conn.lock:
            if self.conn.table_exists(ERRORS_TABLE):
                self.conn.execute(sql, *params)

    def read_errors(self, listener: str | None = None) -> list[dict[str, Any]]:
        with self.conn.lock:
            if not self.conn.table_exists(ERRORS_TABLE):
                return []
            t = self.conn.table(ERRORS_TABLE)
            if listener is not None:
                t = t.filter(t.listener == listener)
            with self.conn.refusals():
                rows = t.order_by("at").to_pyarrow().to_pylist()
        for row in rows:
            row["source"] = json.loads(row["source"], object_hook=from_plain)
            row["at"] = error_time(row["at"])
        return rows

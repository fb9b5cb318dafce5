"""A Kinetica-protocol test server: REST (binary and JSON Avro envelopes) plus ZMQ table monitors.

It speaks enough of Kinetica 7.2 for the official ``gpudb`` client (``GPUdb``, ``GPUdbTable``,
``GPUdbTableMonitor.Client``) and for ``reactive``'s own Kinetica code, in memory, in-process.
The wire facts are in ``/work/shared/kinetica-protocol.md``; every schema below is written from
the request/response records that ``gpudb`` 7.2.3.13 embeds.

What it implements
    Endpoints: /show/system/properties, /show/system/status, /has/table, /show/table,
    /create/type, /show/types, /has/type, /create/table, /insert/records, /get/records,
    /update/records, /delete/records, /clear/table (drops the table), /alter/table
    (add_column, delete_column), /create/tablemonitor, /clear/tablemonitor. Anything else is 404.
    Envelopes: ``application/octet-stream`` (schemaless Avro) and ``application/json``; an ERROR
    answers HTTP 400 with ``data_type`` "none", OK answers 200; every answer carries
    ``x-request-time-secs`` (``GPUdbTable.insert_records`` needs it). Optional Basic auth (401).
    Column types int, long, float, double, string, bytes, nullable as the union [T, "null"];
    properties from /create/type (primary_key, charN (length checked), vector(N) on bytes: N
    little-endian float32, size checked; the rest is stored and shown as given). A primary-key
    index per table.
    Filter expressions (``expression``, ``expressions``, ``global_expression``): identifiers bare
    or double-quoted (``""`` escapes), single-quoted strings (``''`` escapes), numbers;
    ``= == != <> < <= > >=``, ``[not] in (...)``, ``is [not] null``, ``and``, ``or``, ``not``,
    parentheses; SQL three-valued logic for nulls; an empty expression is every row. Update
    values are constants unless ``use_expressions_in_new_values_maps`` is "true"; then literals,
    columns, ``null``, ``+ - * /`` and parentheses. Anything else is an ERROR, never a crash.

Choices worth knowing
    * Names: an unqualified table name lives in schema ``ki_home`` (``t`` is ``ki_home.t``), as in
      Kinetica; /show/table lists qualified names, /has/table and /create/tablemonitor echo the
      name given.
    * Type ids are derived from the type (same columns, properties and label: same id), and a
      type is kept after its table is dropped. /get/records answers ``type_name`` = the type id.
    * /show/table adds the ``data`` property to every column and ``nullable`` to union columns.
    * /get/records returns at most ``max_get_records`` rows (default 10,000, also what limit
      -9999 means) and sets ``has_more_records``; rows come in insertion order unless ``sort_by``.
    * /insert/records: a duplicate primary key is an ERROR for the whole batch unless
      ``update_on_existing_pk`` (replace), ``ignore_existing_pk`` (skip) or ``allow_partial_batch``
      / ``return_individual_errors`` (skip, reported in ``info``). A batch is applied record by
      record, so a key repeated inside one upsert batch is inserted once and then updated.
    * JSON records: bytes are Avro-JSON strings (one char per byte), which is also how the official
      JSON client sends vectors; a vector column also takes a list of floats, and is given back as one.
    * Every request runs under one lock. A write works on a copy of the table, committed at the end
      (an ERROR leaves the table unchanged), and queues its ZMQ messages before the lock is
      released, so messages go out in the order the writes were applied.

Table monitors
    One ZMQ XPUB socket, owned by one publisher thread (zmq sockets are not thread-safe) that a
    queue feeds. For each insert monitor of a table, an insert publishes one multipart message
    [topic_id, record, record, ...] in the table's current type; update and delete publish
    [topic_id, {"count": n}] in ``COUNT_SCHEMA``; nothing is sent when n is 0. An upsert publishes
    its new rows to insert monitors, then its ``count_updated`` (rows it replaced) to update monitors.
    /update/records with ``update_on_existing_pk`` that removes a collided-into row reports it as
    an update only. SNDHWM is 0 (no limit) so a test never loses a message to the high-water mark;
    LINGER is 0 so stop() never blocks on a slow subscriber (what is still queued is lost, as in a
    crash). XPUB reports subscriptions; ``wait_subscribed`` lets a test wait for one before it
    writes (a PUB drops messages for subscribers that have not joined yet). No message is sent for
    drops or alters, as in Kinetica; monitors of a dropped table are removed with it.

What it does not implement
    Schemas/collections as objects, views, SQL, /get/records/bycolumn, ``records_to_insert`` in
    /update/records, ``record_id`` deletes, monitor options other than ``event`` and
    ``monitor_id``, table TTLs, HA, snappy, multi-head. Unknown option keys are ignored unless
    listed here.

Test hooks: ``publish_raw``, ``fail_next``, ``monitors``, ``tables``, ``drop_table``, ``calls``,
``wait_subscribed``. ``stop()`` keeps the tables; ``start()`` again reuses the same ports and
forgets the server-side monitors, like a restarted Kinetica.
"""

from __future__ import annotations

import base64
import bisect
import contextlib
import hashlib
import io
import itertools
import json
import queue
import re
import socket
import struct
import sys
import threading
import time
import traceback
import uuid
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import Message
from functools import cached_property
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any, NamedTuple

import fastavro
import zmq
from fastavro.validation import validate

CORE_VERSION = "7.2.3.13"
DEFAULT_SCHEMA = "ki_home"
MAX_GET_RECORDS = 10_000
END_OF_SET = -9999
THREAD_PREFIX = "kinetica-test-"
COUNT_SCHEMA: dict[str, Any] = {"type": "record", "name": "type_name", "fields": [{"name": "count", "type": "long"}]}
COUNT_SCHEMA_JSON = json.dumps(COUNT_SCHEMA)


class KineticaError(Exception):
    """A request the server refuses: answered as an ERROR envelope carrying this message."""


# -- protocol records (field lists as gpudb 7.2.3.13 embeds them) -------------------------------
_STR_MAP = {"type": "map", "values": "string"}
_PROPS = {"type": "map", "values": {"type": "array", "items": "string"}}
_OPTIONS = ("options", _STR_MAP)
_INFO = ("info", _STR_MAP)
_TABLE = ("table_name", "string")


def _array(items: Any) -> dict[str, Any]:
    return {"type": "array", "items": items}


Field = tuple[str, Any]
# endpoint -> (record name stem, request fields, response fields)
_PROTOCOL: dict[str, tuple[str, list[Field], list[Field]]] = {
    "/show/system/properties": ("show_system_properties", [_OPTIONS], [("property_map", _STR_MAP), _INFO]),
    "/show/system/status": ("show_system_status", [_OPTIONS], [("status_map", _STR_MAP), _INFO]),
    "/has/table": ("has_table", [_TABLE, _OPTIONS], [_TABLE, ("table_exists", "boolean"), _INFO]),
    "/show/table": (
        "show_table",
        [_TABLE, _OPTIONS],
        [
            _TABLE,
            ("table_names", _array("string")),
            ("table_descriptions", _array(_array("string"))),
            ("type_ids", _array("string")),
            ("type_schemas", _array("string")),
            ("type_labels", _array("string")),
            ("properties", _array(_PROPS)),
            ("additional_info", _array(_STR_MAP)),
            ("sizes", _array("long")),
            ("full_sizes", _array("long")),
            ("join_sizes", _array("double")),
            ("total_size", "long"),
            ("total_full_size", "long"),
            _INFO,
        ],
    ),
    "/create/type": (
        "create_type",
        [("type_definition", "string"), ("label", "string"), ("properties", _PROPS), _OPTIONS],
        [("type_id", "string"), ("type_definition", "string"), ("label", "string"), ("properties", _PROPS), _INFO],
    ),
    "/show/types": (
        "show_types",
        [("type_id", "string"), ("label", "string"), _OPTIONS],
        [
            ("type_ids", _array("string")),
            ("type_schemas", _array("string")),
            ("labels", _array("string")),
            ("properties", _array(_PROPS)),
            _INFO,
        ],
    ),
    "/has/type": (
        "has_type",
        [("type_id", "string"), _OPTIONS],
        [("type_id", "string"), ("type_exists", "boolean"), _INFO],
    ),
    "/create/table": (
        "create_table",
        [_TABLE, ("type_id", "string"), _OPTIONS],
        [_TABLE, ("type_id", "string"), ("is_collection", "boolean"), _INFO],
    ),
    "/insert/records": (
        "insert_records",
        [_TABLE, ("list", _array("bytes")), ("list_str", _array("string")), ("list_encoding", "string"), _OPTIONS],
        [("record_ids", _array("string")), ("count_inserted", "int"), ("count_updated", "int"), _INFO],
    ),
    "/get/records": (
        "get_records",
        [_TABLE, ("offset", "long"), ("limit", "long"), ("encoding", "string"), _OPTIONS],
        [
            _TABLE,
            ("type_name", "string"),
            ("type_schema", "string"),
            ("records_binary", _array("bytes")),
            ("records_json", _array("string")),
            ("total_number_of_records", "long"),
            ("has_more_records", "boolean"),
            _INFO,
        ],
    ),
    "/update/records": (
        "update_records",
        [
            _TABLE,
            ("expressions", _array("string")),
            ("new_values_maps", _array({"type": "map", "values": ["string", "null"]})),
            ("records_to_insert", _array("bytes")),
            ("records_to_insert_str", _array("string")),
            ("record_encoding", "string"),
            _OPTIONS,
        ],
        [
            ("count_updated", "long"),
            ("counts_updated", _array("long")),
            ("count_inserted", "long"),
            ("counts_inserted", _array("long")),
            _INFO,
        ],
    ),
    "/delete/records": (
        "delete_records",
        [_TABLE, ("expressions", _array("string")), _OPTIONS],
        [("count_deleted", "long"), ("counts_deleted", _array("long")), _INFO],
    ),
    "/clear/table": ("clear_table", [_TABLE, ("authorization", "string"), _OPTIONS], [_TABLE, _INFO]),
    "/alter/table": (
        "alter_table",
        [_TABLE, ("action", "string"), ("value", "string"), _OPTIONS],
        [
            _TABLE,
            ("action", "string"),
            ("value", "string"),
            ("type_id", "string"),
            ("type_definition", "string"),
            ("properties", _PROPS),
            ("label", "string"),
            _INFO,
        ],
    ),
    "/create/tablemonitor": (
        "create_table_monitor",
        [_TABLE, _OPTIONS],
        [("topic_id", "string"), _TABLE, ("type_schema", "string"), _INFO],
    ),
    "/clear/tablemonitor": ("clear_table_monitor", [("topic_id", "string"), _OPTIONS], [("topic_id", "string"), _INFO]),
}


def _record_schema(name: str, fields: list[Field]) -> Any:
    return fastavro.parse_schema(
        {"type": "record", "name": name, "fields": [{"name": n, "type": t} for n, t in fields]}
    )


@dataclass(frozen=True)
class _Endpoint:
    request: Any
    response: Any
    response_name: str
    bytes_fields: tuple[str, ...]  # JSON carries these as strings, one char per byte


def _endpoints() -> dict[str, _Endpoint]:
    endpoints = {}
    for path, (stem, request, response) in _PROTOCOL.items():
        as_bytes = tuple(n for n, t in request if t == "bytes" or t == _array("bytes"))
        endpoints[path] = _Endpoint(
            _record_schema(f"{stem}_request", request),
            _record_schema(f"{stem}_response", response),
            f"{stem}_response",
            as_bytes,
        )
    return endpoints


_ENDPOINTS = _endpoints()
_ENVELOPE = _record_schema(
    "gpudb_response",
    [("status", "string"), ("message", "string"), ("data_type", "string"), ("data", "bytes"), ("data_str", "string")],
)
_COUNT_PARSED = fastavro.parse_schema(COUNT_SCHEMA)


def avro_encode(schema: Any, datum: Any) -> bytes:
    out = io.BytesIO()
    fastavro.schemaless_writer(out, schema, datum)
    return out.getvalue()


def avro_decode(schema: Any, data: bytes) -> Any:
    """Decode one datum; trailing bytes mean the writer used another schema, so they are an error."""
    stream = io.BytesIO(data)
    try:
        datum = fastavro.schemaless_reader(stream, schema, None)
    except Exception as exc:  # fastavro raises EOFError, ValueError, UnicodeDecodeError...
        raise KineticaError(f"cannot decode Avro data: {type(exc).__name__}: {exc}") from None
    if stream.tell() != len(data):
        raise KineticaError(f"cannot decode Avro data: {len(data) - stream.tell()} trailing bytes")
    return datum


def _bytes_to_json(value: Any) -> Any:
    """Avro's JSON encoding of bytes: one character per byte."""
    if isinstance(value, bytes):
        return value.decode("latin-1")
    if isinstance(value, dict):
        return {k: _bytes_to_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_bytes_to_json(v) for v in value]
    return value


def _bytes_from_json(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return value.encode("latin-1")
        except UnicodeEncodeError:
            raise KineticaError("bytes given as a JSON string must only hold characters below U+0100") from None
    if isinstance(value, list):
        return [_bytes_from_json(v) for v in value]
    return value


def _flag(options: dict[str, str], key: str, default: bool = False) -> bool:
    value = options.get(key)
    if value is None or value == "":
        return default
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise KineticaError(f"option '{key}' must be 'true' or 'false', not {value!r}")


def qualify(name: str) -> str:
    """Kinetica's name resolution: an unqualified table lives in the default schema."""
    if not name or name.count(".") > 1 or name.startswith(".") or name.endswith("."):
        raise KineticaError(f"invalid table name {name!r}")
    return name if "." in name else f"{DEFAULT_SCHEMA}.{name}"


# -- types ---------------------------------------------------------------------------------------
_PRIMITIVES = ("int", "long", "float", "double", "string", "bytes")
_NUMBERS = ("int", "long", "float", "double")
_CHAR = re.compile(r"char(\d+)$")
_VECTOR = re.compile(r"vector\((\d+)\)$")
_INT_RANGE = {"int": 2**31, "long": 2**63}


@dataclass(frozen=True)
class Column:
    name: str
    type: str
    nullable: bool
    properties: tuple[str, ...]

    @property
    def avro_type(self) -> str | list[str]:
        return [self.type, "null"] if self.nullable else self.type

    @property
    def char_limit(self) -> int | None:
        return next((int(m.group(1)) for p in self.properties if (m := _CHAR.match(p))), None)

    @property
    def vector_dims(self) -> int | None:
        return next((int(m.group(1)) for p in self.properties if (m := _VECTOR.match(p))), None)

    @property
    def kind(self) -> str:
        """What an expression sees: number, string or bytes."""
        return "number" if self.type in _NUMBERS else self.type

    def check(self, value: Any) -> Any:
        """The value as stored, or KineticaError: what Avro types cannot say (nulls, ranges, sizes)."""
        if value is None:
            if not self.nullable:
                raise KineticaError(f"column '{self.name}' is not nullable")
            return None
        if self.type in _INT_RANGE:
            limit = _INT_RANGE[self.type]
            if not isinstance(value, int) or isinstance(value, bool) or not -limit <= value < limit:
                raise KineticaError(f"column '{self.name}' ({self.type}) cannot hold {value!r}")
        elif self.type in ("float", "double"):
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise KineticaError(f"column '{self.name}' ({self.type}) cannot hold {value!r}")
            try:  # a float column keeps float32 precision, so JSON and binary reads agree
                value = struct.unpack("<f", struct.pack("<f", value))[0] if self.type == "float" else float(value)
            except OverflowError:
                raise KineticaError(f"column '{self.name}' ({self.type}) cannot hold {value!r}") from None
        elif not isinstance(value, str if self.type == "string" else bytes):
            raise KineticaError(f"column '{self.name}' ({self.type}) cannot hold {value!r}")
        if (limit := self.char_limit) is not None and len(value) > limit:
            raise KineticaError(f"value of column '{self.name}' is longer than {limit} characters")
        if (dims := self.vector_dims) is not None and len(value) != 4 * dims:
            raise KineticaError(f"column '{self.name}' holds vectors of {dims} floats, given {len(value)} bytes")
        return value

    def from_json(self, value: Any) -> Any:
        if self.type == "bytes" and value is not None:
            if self.vector_dims is not None and isinstance(value, list):
                return self._pack_vector(value)
            return _bytes_from_json(value)
        if self.type in ("float", "double") and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        return value

    def to_json(self, value: Any) -> Any:
        if isinstance(value, bytes):
            if self.vector_dims is not None:
                return list(struct.unpack(f"<{len(value) // 4}f", value))
            return value.decode("latin-1")
        return value

    def from_text(self, text: str | None) -> Any:
        """A constant from /update/records ``new_values_maps`` or /alter/table's default."""
        if text is None:
            return None
        try:
            if self.type in ("int", "long"):
                return int(text)
            if self.type in ("float", "double"):
                return float(text)
            if self.type == "string":
                return text
            if self.vector_dims is not None:
                return self._pack_vector(json.loads(text))
        except (ValueError, TypeError):
            raise KineticaError(f"{text!r} is not a valid value for column '{self.name}' ({self.type})") from None
        raise KineticaError(f"column '{self.name}' (bytes) cannot be set from text")

    def _pack_vector(self, values: Any) -> bytes:
        if not isinstance(values, list) or not all(isinstance(v, int | float) for v in values):
            raise KineticaError(f"column '{self.name}' takes a list of numbers")
        return struct.pack(f"<{len(values)}f", *values)

    @property
    def zero(self) -> Any:
        """What a new non-nullable column holds in existing rows when no default is given."""
        if self.type == "bytes":
            return bytes(4 * (self.vector_dims or 0))
        return {"int": 0, "long": 0, "float": 0.0, "double": 0.0, "string": ""}[self.type]


def make_column(name: Any, base: Any, nullable: bool, properties: list[str]) -> Column:
    """A column with Kinetica's checks; properties normalised the way /show/table shows them."""
    if not isinstance(name, str) or not name:
        raise KineticaError(f"invalid column name {name!r}")
    if base not in _PRIMITIVES:
        raise KineticaError(f"column '{name}': unsupported type {base!r}")
    props = list(dict.fromkeys(p.strip().lower() for p in properties if p.strip()))
    if "nullable" in props and not nullable:
        raise KineticaError(f"column '{name}' has property 'nullable' but its type is not a union with null")
    if nullable and "nullable" not in props:
        props.append("nullable")
    if "data" not in props and "store_only" not in props:
        props.insert(0, "data")  # what Kinetica shows for a column kept in memory
    column = Column(name, base, nullable, tuple(props))
    if "primary_key" in props and nullable:
        raise KineticaError(f"primary key column '{name}' cannot be nullable")
    if column.char_limit is not None and base != "string":
        raise KineticaError(f"column '{name}': charN applies to strings only")
    if any(p.startswith("vector") for p in props) and (base != "bytes" or not column.vector_dims):
        raise KineticaError(f"column '{name}': vector(N) needs a bytes column and N > 0")
    return column


@dataclass(frozen=True)
class TableType:
    columns: tuple[Column, ...]
    label: str = ""

    @classmethod
    def create(cls, definition: str, label: str, properties: dict[str, list[str]]) -> TableType:
        """Parse a /create/type request the way Kinetica validates it."""
        try:
            schema = json.loads(definition)
        except ValueError:
            raise KineticaError("type_definition is not valid JSON") from None
        if not isinstance(schema, dict) or schema.get("type") != "record" or not isinstance(schema.get("fields"), list):
            raise KineticaError("type_definition must be an Avro record with fields")
        if not schema["fields"]:
            raise KineticaError("a type needs at least one column")
        names = [f.get("name") if isinstance(f, dict) else None for f in schema["fields"]]
        if len(set(names)) != len(names):
            raise KineticaError("duplicate column names in type_definition")
        if unknown := set(properties) - set(names):
            raise KineticaError(f"properties name unknown columns: {sorted(unknown)}")
        columns = []
        for f, name in zip(schema["fields"], names, strict=True):
            base, nullable = _field_type(f.get("type") if isinstance(f, dict) else None, name)
            columns.append(make_column(name, base, nullable, properties.get(name, [])))
        return cls(tuple(columns), label)

    @cached_property
    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)

    @cached_property
    def by_name(self) -> dict[str, Column]:
        return {c.name: c for c in self.columns}

    @cached_property
    def schema(self) -> dict[str, Any]:
        fields = [{"name": c.name, "type": c.avro_type} for c in self.columns]
        return {"type": "record", "name": "type_name", "fields": fields}

    @cached_property
    def schema_json(self) -> str:
        return json.dumps(self.schema)

    @cached_property
    def parsed(self) -> Any:
        return fastavro.parse_schema(self.schema)

    @cached_property
    def properties(self) -> dict[str, list[str]]:
        return {c.name: list(c.properties) for c in self.columns}

    @cached_property
    def primary_key(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns if "primary_key" in c.properties)

    @cached_property
    def type_id(self) -> str:
        """Same type, same id (Kinetica's ids are decimal 64-bit numbers)."""
        canonical = json.dumps([self.schema, self.properties, self.label], sort_keys=True)
        return str(int.from_bytes(hashlib.sha256(canonical.encode()).digest()[:8], "big"))

    def column(self, name: str) -> Column:
        if name not in self.by_name:
            raise KineticaError(f"unknown column '{name}'")
        return self.by_name[name]

    def check(self, record: dict[str, Any]) -> dict[str, Any]:
        checked = {c.name: c.check(record.get(c.name)) for c in self.columns}
        if not validate(checked, self.parsed, raise_errors=False):
            raise KineticaError(f"record does not match the table type: {record!r}")
        return checked

    def decode(self, data: bytes) -> dict[str, Any]:
        return self.check(avro_decode(self.parsed, data))

    def encode(self, record: dict[str, Any]) -> bytes:
        return avro_encode(self.parsed, record)

    def from_json(self, text: str) -> dict[str, Any]:
        try:
            obj = json.loads(text)
        except ValueError:
            raise KineticaError(f"record is not valid JSON: {text!r}") from None
        if not isinstance(obj, dict):
            raise KineticaError(f"a JSON record must be an object: {text!r}")
        if unknown := set(obj) - set(self.names):
            raise KineticaError(f"unknown columns in JSON record: {sorted(unknown)}")
        return self.check({c.name: c.from_json(obj.get(c.name)) for c in self.columns})

    def to_json(self, record: dict[str, Any]) -> str:
        return json.dumps({c.name: c.to_json(record[c.name]) for c in self.columns})


def _field_type(avro_type: Any, name: Any) -> tuple[Any, bool]:
    """(base type, nullable) from a field type: T, [T, "null"] or ["null", T]."""
    if isinstance(avro_type, list) and len(avro_type) == 2 and "null" in avro_type:
        return next(t for t in avro_type if t != "null"), True
    if isinstance(avro_type, str):
        return avro_type, False
    raise KineticaError(f"column {name!r}: unsupported type {avro_type!r}")


@dataclass
class Table:
    """Rows in insertion order (a replaced row keeps its place) and the primary-key index."""

    name: str
    type: TableType
    replicated: bool = False
    rows: dict[int, dict[str, Any]] = field(default_factory=dict)
    index: dict[tuple[Any, ...], int] = field(default_factory=dict)
    next_id: int = 1

    def clone(self) -> Table:
        return Table(self.name, self.type, self.replicated, dict(self.rows), dict(self.index), self.next_id)

    def key(self, record: dict[str, Any]) -> tuple[Any, ...] | None:
        return tuple(record[c] for c in self.type.primary_key) if self.type.primary_key else None

    def lookup(self, record: dict[str, Any]) -> int | None:
        key = self.key(record)
        return None if key is None else self.index.get(key)

    def add(self, record: dict[str, Any]) -> int:
        row_id, self.next_id = self.next_id, self.next_id + 1
        self.put(row_id, record)
        return row_id

    def put(self, row_id: int, record: dict[str, Any]) -> None:
        if (old := self.rows.get(row_id)) is not None and (old_key := self.key(old)) is not None:
            self.index.pop(old_key, None)
        self.rows[row_id] = record
        if (key := self.key(record)) is not None:
            self.index[key] = row_id

    def remove(self, row_id: int) -> None:
        record = self.rows.pop(row_id)
        if (key := self.key(record)) is not None:
            self.index.pop(key, None)

    def matching(self, predicate: Callable[[dict[str, Any]], bool]) -> list[int]:
        return [row_id for row_id, row in self.rows.items() if predicate(row)]

    @cached_property
    def sorted_keys(self) -> list[Any]:
        """The single-column primary key's values, sorted (a write makes a new Table, so this
        is built at most once per version of the table)."""
        return sorted(key[0] for key in self.index)


# -- expressions ---------------------------------------------------------------------------------
class _Token(NamedTuple):
    kind: str  # number, string, ident, keyword, op, end
    value: Any
    pos: int


_TOKEN = re.compile(
    r"""(?P<number>(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)
      |(?P<string>'(?:[^']|'')*')
      |(?P<quoted>"(?:[^"]|"")*")
      |(?P<word>[^\W\d]\w*)
      |(?P<op><=|>=|<>|!=|==|[=<>(),+\-*/])""",
    re.VERBOSE,
)
_KEYWORDS = {"and", "or", "not", "in", "is", "null"}
_COMPARISONS: dict[str, Callable[[Any, Any], bool]] = {
    "=": lambda a, b: a == b,
    "==": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
    "<>": lambda a, b: a != b,
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
}
Row = dict[str, Any]
Predicate = Callable[[Row], bool | None]  # None is SQL's "unknown"
Value = Callable[[Row], Any]


def _tokenize(text: str) -> list[_Token]:
    tokens, pos = [], 0
    while True:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos == len(text):
            return [*tokens, _Token("end", None, pos)]
        m = _TOKEN.match(text, pos)
        if m is None:
            raise KineticaError(f"invalid expression {text!r}: unexpected {text[pos]!r} at position {pos}")
        kind, raw = m.lastgroup or "", m.group()
        if kind == "number":
            value: Any = float(raw) if any(c in raw for c in ".eE") else int(raw)
        elif kind in ("string", "quoted"):
            value = raw[1:-1].replace(raw[0] * 2, raw[0])
            kind = "string" if kind == "string" else "ident"
        elif kind == "word" and raw.lower() in _KEYWORDS:
            kind, value = "keyword", raw.lower()
        else:
            kind, value = ("ident" if kind == "word" else kind), raw
        tokens.append(_Token(kind, value, pos))
        pos = m.end()


def _both(left: Predicate, right: Predicate) -> Predicate:
    """SQL's AND: false wins over unknown (None), which wins over true."""

    def both(row: Row) -> bool | None:
        a, b = left(row), right(row)
        return False if a is False or b is False else None if a is None or b is None else True

    return both


def _either(left: Predicate, right: Predicate) -> Predicate:
    """SQL's OR: true wins over unknown (None), which wins over false."""

    def either(row: Row) -> bool | None:
        a, b = left(row), right(row)
        return True if a is True or b is True else None if a is None or b is None else False

    return either


class _Parser:
    """Recursive descent over the small grammar in the module docstring, compiled to closures."""

    def __init__(self, text: str, table_type: TableType) -> None:
        self.text, self.type = text, table_type
        self.tokens = _tokenize(text)
        self.i = 0

    # token helpers
    def peek(self) -> _Token:
        return self.tokens[self.i]

    def take(self) -> _Token:
        token = self.tokens[self.i]
        self.i += 1
        return token

    def accept(self, kind: str, value: Any) -> bool:
        if self.peek().kind == kind and self.peek().value == value:
            self.i += 1
            return True
        return False

    def expect(self, kind: str, value: Any = None) -> _Token:
        token = self.take()
        if token.kind != kind or (value is not None and token.value != value):
            self.fail(token, f"expected {value or kind}")
        return token

    def fail(self, token: _Token, what: str) -> None:
        found = "end of expression" if token.kind == "end" else repr(token.value)
        raise KineticaError(f"invalid expression {self.text!r}: {what}, found {found} at position {token.pos}")

    def finish(self) -> None:
        if self.peek().kind != "end":
            self.fail(self.peek(), "expected end of expression")

    # primary-key access, as a real server's index serves it
    def key_access(self) -> tuple[str, list[Any]] | None:
        """``("in", values)`` for ``pk = v`` / ``pk in (...)``, ``(">", [v])`` for ``pk > v``, else None."""
        key = self.type.primary_key
        first = self.peek()
        if len(key) != 1 or first.kind != "ident" or first.value != key[0]:
            return None
        column = self.column(self.take())
        if self.accept("keyword", "in"):
            plan = ("in", self.literal_list(column))
        elif self.accept("op", "=") or self.accept("op", "=="):
            plan = ("in", [self.literal(column)])
        elif self.accept("op", ">"):
            plan = (">", [self.literal(column)])
        else:
            return None
        return plan if self.peek().kind == "end" else None

    # filters
    def disjunction(self) -> Predicate:
        left = self.conjunction()
        while self.accept("keyword", "or"):
            left = _either(left, self.conjunction())
        return left

    def conjunction(self) -> Predicate:
        left = self.negation()
        while self.accept("keyword", "and"):
            left = _both(left, self.negation())
        return left

    def negation(self) -> Predicate:
        if self.accept("keyword", "not"):
            inner = self.negation()
            return lambda row: None if (v := inner(row)) is None else not v
        if self.accept("op", "("):
            inner = self.disjunction()
            self.expect("op", ")")
            return inner
        return self.comparison()

    def comparison(self) -> Predicate:
        token = self.peek()
        if token.kind != "ident":
            self.fail(token, "expected a column name")
        column = self.column(self.take())
        name = column.name
        if self.accept("keyword", "is"):
            negate = self.accept("keyword", "not")
            self.expect("keyword", "null")
            return lambda row: (row[name] is None) != negate
        negate = self.accept("keyword", "not")
        if self.accept("keyword", "in"):
            values = self.literal_list(column)
            return lambda row: None if row[name] is None else (row[name] in values) != negate
        if negate:
            self.fail(self.peek(), "expected 'in'")
        op = self.take()
        if op.kind != "op" or op.value not in _COMPARISONS:
            self.fail(op, "expected a comparison, 'in' or 'is null'")
        compare, literal = _COMPARISONS[op.value], self.literal(column)
        return lambda row: None if row[name] is None else compare(row[name], literal)

    def literal_list(self, column: Column) -> list[Any]:
        self.expect("op", "(")
        values = [self.literal(column)]
        while self.accept("op", ","):
            values.append(self.literal(column))
        self.expect("op", ")")
        return values

    def literal(self, column: Column) -> Any:
        negative = self.accept("op", "-")
        token = self.take()
        kind = {"number": "number", "string": "string"}.get(token.kind)
        if kind is None or (negative and kind != "number"):
            self.fail(token, "expected a literal")
        if kind != column.kind:
            self.fail(token, f"column '{column.name}' ({column.type}) cannot be compared with a {kind}")
        return -token.value if negative else token.value

    def column(self, token: _Token) -> Column:
        if token.value not in self.type.by_name:
            raise KineticaError(f"invalid expression {self.text!r}: unknown column '{token.value}'")
        return self.type.by_name[token.value]

    # update values: (evaluator, kind) with kind number, string, bytes or null
    def sum(self) -> tuple[Value, str]:
        left = self.product()
        while self.peek().kind == "op" and self.peek().value in "+-":
            left = self.arithmetic(left, self.take(), self.product())
        return left

    def product(self) -> tuple[Value, str]:
        left = self.unary()
        while self.peek().kind == "op" and self.peek().value in "*/":
            left = self.arithmetic(left, self.take(), self.unary())
        return left

    def unary(self) -> tuple[Value, str]:
        token = self.peek()
        if self.accept("op", "-"):
            inner, kind = self.unary()
            self.need_number(kind, token)
            return (lambda row: None if (v := inner(row)) is None else -v), kind
        if self.accept("op", "("):
            inner_value = self.sum()
            self.expect("op", ")")
            return inner_value
        token = self.take()
        if token.kind in ("number", "string"):
            return (lambda row: token.value), token.kind
        if token.kind == "keyword" and token.value == "null":
            return (lambda row: None), "null"
        if token.kind == "ident":
            name = self.column(token).name
            return (lambda row: row[name]), self.type.by_name[name].kind
        self.fail(token, "expected a value")
        raise AssertionError  # fail() raised

    def arithmetic(self, left: tuple[Value, str], op: _Token, right: tuple[Value, str]) -> tuple[Value, str]:
        (a, a_kind), (b, b_kind) = left, right
        self.need_number(a_kind, op)
        self.need_number(b_kind, op)
        apply = _ARITHMETIC[op.value]
        return (lambda row: None if (x := a(row)) is None or (y := b(row)) is None else apply(x, y)), "number"

    def need_number(self, kind: str, at: _Token) -> None:
        if kind not in ("number", "null"):
            self.fail(at, f"arithmetic needs numbers, not a {kind}")


def _divide(a: Any, b: Any) -> Any:
    if b == 0:
        raise KineticaError("division by zero")
    if isinstance(a, int) and isinstance(b, int):  # integer division truncates, as in SQL
        quotient = abs(a) // abs(b)
        return quotient if (a >= 0) == (b > 0) else -quotient
    return a / b


_ARITHMETIC: dict[str, Callable[[Any, Any], Any]] = {
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
    "*": lambda a, b: a * b,
    "/": _divide,
}


def compile_filter(text: str, table_type: TableType) -> Callable[[Row], bool]:
    """A row predicate; rows for which the expression is unknown (null) do not match."""
    if not text.strip():
        return lambda row: True
    parser = _Parser(text, table_type)
    predicate = parser.disjunction()
    parser.finish()
    return lambda row: predicate(row) is True


def compile_value(text: str, column: Column, table_type: TableType) -> Value:
    """An update value expression for ``column``, checked against its type."""
    parser = _Parser(text, table_type)
    value, kind = parser.sum()
    parser.finish()
    if kind not in (column.kind, "null"):
        raise KineticaError(f"column '{column.name}' ({column.type}) cannot be set to a {kind}: {text!r}")
    if column.type in ("int", "long"):
        return lambda row: None if (v := value(row)) is None else int(v)
    return value


def compile_filters(texts: list[str], global_text: str, table_type: TableType) -> list[Callable[[Row], bool]]:
    """One predicate per expression, each also bound by the ``global_expression`` option."""
    overall = compile_filter(global_text, table_type)
    return [_within(overall, compile_filter(t, table_type)) for t in texts]


def _within(overall: Callable[[Row], bool], match: Callable[[Row], bool]) -> Callable[[Row], bool]:
    return lambda row: overall(row) and match(row)


# -- the server ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Monitor:
    topic_id: str
    table: str  # qualified name
    event: str  # insert, update or delete


_STOP = object()


class _HTTPServer(HTTPServer):
    """One named daemon thread per connection; stop() closes them, keep-alive ones included."""

    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], owner: KineticaTestServer) -> None:
        super().__init__(address, _Handler)
        self.owner = owner
        self._connections: dict[threading.Thread, socket.socket] = {}
        self._connections_lock = threading.Lock()
        self._numbers = itertools.count(1)

    def process_request(self, request: Any, client_address: Any) -> None:
        name = f"{THREAD_PREFIX}http-conn-{next(self._numbers)}"
        thread = threading.Thread(target=self._serve, args=(request, client_address), name=name, daemon=True)
        with self._connections_lock:
            self._connections[thread] = request
        thread.start()

    def _serve(self, request: Any, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            with self._connections_lock:
                self._connections.pop(threading.current_thread(), None)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client hanging up (or stop() closing its socket) is not a server error.
        if not isinstance(sys.exc_info()[1], OSError):
            traceback.print_exc()

    def close_connections(self, timeout: float = 5.0) -> None:
        with self._connections_lock:
            connections = list(self._connections.items())
        for _, sock in connections:
            with contextlib.suppress(OSError):  # the client may have closed it already
                sock.shutdown(socket.SHUT_RDWR)
        for thread, _ in connections:
            thread.join(timeout)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the official client's requests.Session expects
    disable_nagle_algorithm = True  # headers and body are two writes: without this each call waits ~40 ms
    server: _HTTPServer

    def do_POST(self) -> None:
        started = time.perf_counter()
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        status, content_type, payload = self.server.owner.respond(self.path, self.headers, body)
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("x-request-time-secs", f"{time.perf_counter() - started:.6f}")
        if status == 401:
            self.send_header("WWW-Authenticate", 'Basic realm="kinetica"')
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # tests read server.calls, not an access log


class KineticaTestServer:
    """An in-memory Kinetica (see the module docstring).

    ``start()`` binds HTTP and the XPUB socket (port 0: free ports, kept for restarts) and returns the
    server; ``url`` and ``zmq_port`` say where. ``stop()`` closes both, joins every thread and keeps
    the tables; ``start()`` again is a restart. Test hooks: ``tables``, ``monitors()``,
    ``drop_table()``, ``fail_next()``, ``publish_raw()``, ``wait_subscribed()``, ``calls`` (a Counter
    of POSTs per path) and ``max_get_records``.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        http_port: int = 0,
        zmq_port: int = 0,
        username: str | None = None,
        password: str | None = None,
        max_get_records: int = MAX_GET_RECORDS,
    ) -> None:
        self.host = host
        self.http_port = http_port
        self.zmq_port = zmq_port
        self.username, self.password = username, password
        self.max_get_records = max_get_records
        self.calls: Counter[str] = Counter()
        self._lock = threading.RLock()  # tables, types, monitors; held while a write queues its messages
        self._tables: dict[str, Table] = {}
        self._types: dict[str, TableType] = {}
        self._monitors: dict[str, Monitor] = {}
        self._failures: dict[str, deque[str]] = {}
        self._subscribed: set[bytes] = set()
        self._subscribed_changed = threading.Condition()
        self._outbox: queue.Queue[Any] = queue.Queue()
        self._http: _HTTPServer | None = None
        self._threads: list[threading.Thread] = []
        self._zmq_context: zmq.Context[Any] | None = None
        self._handlers: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
            "/show/system/properties": self._show_system_properties,
            "/show/system/status": self._show_system_status,
            "/has/table": self._has_table,
            "/show/table": self._show_table,
            "/create/type": self._create_type,
            "/show/types": self._show_types,
            "/has/type": self._has_type,
            "/create/table": self._create_table,
            "/insert/records": self._insert_records,
            "/get/records": self._get_records,
            "/update/records": self._update_records,
            "/delete/records": self._delete_records,
            "/clear/table": self._clear_table,
            "/alter/table": self._alter_table,
            "/create/tablemonitor": self._create_table_monitor,
            "/clear/tablemonitor": self._clear_table_monitor,
        }

    # lifecycle
    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    def uri(self, *, monitor_port: int | None = None, userinfo: str = "") -> str:
        """A ``kinetica://`` URI of this server for ``reactive.connect`` (its REST port and
        its monitors' port, or ``monitor_port``; ``userinfo`` as ``"user:password@"``)."""
        port = self.zmq_port if monitor_port is None else monitor_port
        return f"kinetica://{userinfo}{self.host}:{self.http_port}?monitor_port={port}"

    @property
    def running(self) -> bool:
        return self._http is not None

    def start(self) -> KineticaTestServer:
        if self.running:
            raise RuntimeError("the Kinetica test server is already running")
        with self._lock:
            self._monitors.clear()  # a restarted Kinetica has no table monitors
        with self._subscribed_changed:
            self._subscribed.clear()
        http = _HTTPServer((self.host, self.http_port), self)
        context: zmq.Context[Any] = zmq.Context()
        try:
            publisher = context.socket(zmq.XPUB)
            publisher.setsockopt(zmq.SNDHWM, 0)  # no high-water mark: a test never loses a message to it
            publisher.setsockopt(zmq.LINGER, 0)  # stop() never waits for slow subscribers
            publisher.bind(f"tcp://{self.host}:{self.zmq_port or '*'}")
        except zmq.ZMQError:
            context.destroy(linger=0)
            http.server_close()
            raise
        self.http_port = http.server_address[1]
        self.zmq_port = int(publisher.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1])
        self._http, self._zmq_context, self._outbox = http, context, queue.Queue()
        self._threads = [
            threading.Thread(target=http.serve_forever, args=(0.01,), name=f"{THREAD_PREFIX}http", daemon=True),
            threading.Thread(
                target=self._publish_loop, args=(publisher, self._outbox), name=f"{THREAD_PREFIX}zmq", daemon=True
            ),
        ]
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        """Close HTTP (live connections too) and ZMQ and join every thread; the tables stay."""
        http, self._http = self._http, None
        if http is None:
            return
        http.shutdown()
        http.server_close()
        http.close_connections()
        self._outbox.put(_STOP)
        for thread in self._threads:
            thread.join(10)
        self._threads = []
        if self._zmq_context is not None:
            self._zmq_context.term()
            self._zmq_context = None

    def __enter__(self) -> KineticaTestServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # test hooks
    @property
    def tables(self) -> dict[str, list[dict[str, Any]]]:
        """A snapshot: qualified table name -> its rows, in order."""
        with self._lock:
            return {name: [dict(r) for r in t.rows.values()] for name, t in self._tables.items()}

    def monitors(self) -> dict[str, tuple[str, str]]:
        """The live server-side monitors: topic id -> (qualified table name, event)."""
        with self._lock:
            return {m.topic_id: (m.table, m.event) for m in self._monitors.values()}

    def drop_table(self, name: str) -> bool:
        """Drop a table (and its monitors) without HTTP; False if it did not exist."""
        with self._lock:
            return self._drop(qualify(name))

    def fail_next(self, endpoint: str, message: str) -> None:
        """The next call to ``endpoint`` answers ERROR with ``message`` (calls queue up)."""
        with self._lock:
            self._failures.setdefault(endpoint, deque()).append(message)

    def publish_raw(self, topic: str, frames: list[bytes]) -> None:
        """Publish [topic, *frames] as they are: corrupt data, unknown topics..."""
        message = [topic.encode(), *(bytes(f) for f in frames)]  # a str raises here, not in the publisher
        with self._lock:
            self._outbox.put(message)

    def wait_subscribed(self, topic: str, timeout: float = 5.0) -> bool:
        """Wait until some subscriber's prefix filter lets ``topic`` through."""
        wanted = topic.encode()
        with self._subscribed_changed:
            return self._subscribed_changed.wait_for(
                lambda: any(wanted.startswith(p) for p in self._subscribed), timeout
            )

    # ZMQ: this thread is the only user of the XPUB socket
    def _publish_loop(self, publisher: zmq.Socket[Any], outbox: queue.Queue[Any]) -> None:
        try:
            while True:
                self._read_subscriptions(publisher)
                try:
                    frames = outbox.get(timeout=0.005)
                except queue.Empty:
                    continue
                if frames is _STOP:
                    return
                publisher.send_multipart(frames)
        finally:
            publisher.close(linger=0)

    def _read_subscriptions(self, publisher: zmq.Socket[Any]) -> None:
        while publisher.poll(0, zmq.POLLIN):
            message = publisher.recv()
            if not message or message[0] not in (0, 1):
                continue  # XPUB passes other upstream messages too; only (un)subscriptions matter
            with self._subscribed_changed:
                if message[0] == 1:
                    self._subscribed.add(message[1:])
                else:
                    self._subscribed.discard(message[1:])
                self._subscribed_changed.notify_all()

    def _queue_inserts(self, table: Table, records: list[dict[str, Any]]) -> None:
        monitors = [m for m in self._monitors.values() if m.table == table.name and m.event == "insert"]
        if records and monitors:
            frames = [table.type.encode(r) for r in records]
            for m in monitors:
                self._outbox.put([m.topic_id.encode(), *frames])

    def _queue_count(self, table: str, event: str, count: int) -> None:
        if count > 0:
            payload = avro_encode(_COUNT_PARSED, {"count": count})
            for m in self._monitors.values():
                if m.table == table and m.event == event:
                    self._outbox.put([m.topic_id.encode(), payload])

    # HTTP
    def respond(self, path: str, headers: Message, body: bytes) -> tuple[int, str, bytes]:
        """(HTTP status, content type, body) for one POST."""
        with self._lock:
            self.calls[path] += 1
        if not self._authorized(headers.get("Authorization")):
            return 401, "text/plain", b"Unauthorized"
        endpoint = _ENDPOINTS.get(path)
        if endpoint is None:
            return 404, "text/plain", f"Unknown endpoint {path}".encode()
        as_json = (headers.get("Content-Type") or "").split(";")[0].strip().lower() == "application/json"
        try:
            with self._lock:
                failures = self._failures.get(path)
                if failures:
                    raise KineticaError(failures.popleft())
                request = self._decode_request(endpoint, body, as_json)
                response = self._handlers[path](request)
            return 200, *self._envelope(endpoint, "OK", "", response, as_json)
        except KineticaError as exc:
            return 400, *self._envelope(endpoint, "ERROR", str(exc), None, as_json)
        except Exception as exc:  # a server bug still answers, so the client shows it
            traceback.print_exc()
            return 400, *self._envelope(endpoint, "ERROR", f"internal error: {exc!r}", None, as_json)

    def _authorized(self, header: str | None) -> bool:
        if self.username is None and self.password is None:
            return True
        token = base64.b64encode(f"{self.username or ''}:{self.password or ''}".encode()).decode()
        return header == f"Basic {token}"

    @staticmethod
    def _decode_request(endpoint: _Endpoint, body: bytes, as_json: bool) -> dict[str, Any]:
        if not as_json:
            return avro_decode(endpoint.request, body)
        try:
            request = json.loads(body)
        except ValueError:
            raise KineticaError("request body is not valid JSON") from None
        if not isinstance(request, dict):
            raise KineticaError("a JSON request must be an object")
        for name in endpoint.bytes_fields:
            if name in request:
                request[name] = _bytes_from_json(request[name])
        missing = [f["name"] for f in endpoint.request["fields"] if f["name"] not in request]
        if missing or not validate(request, endpoint.request, raise_errors=False):
            raise KineticaError(f"request does not match the endpoint's schema (missing: {missing or 'none'})")
        return request

    @staticmethod
    def _envelope(endpoint: _Endpoint, status: str, message: str, response: Any, as_json: bool) -> tuple[str, bytes]:
        data_type = "none" if response is None else endpoint.response_name
        if as_json:
            data_str = "" if response is None else json.dumps(_bytes_to_json(response))
            envelope = {"status": status, "message": message, "data_type": data_type, "data": "", "data_str": data_str}
            return "application/json", json.dumps(envelope).encode()
        data = b"" if response is None else avro_encode(endpoint.response, response)
        envelope = {"status": status, "message": message, "data_type": data_type, "data": data, "data_str": ""}
        return "application/octet-stream", avro_encode(_ENVELOPE, envelope)

    # endpoint handlers: called with self._lock held
    def _table(self, name: str) -> Table:
        table = self._tables.get(qualify(name))
        if table is None:
            raise KineticaError(f"Table '{name}' does not exist")
        return table

    def _drop(self, qualified: str) -> bool:
        if self._tables.pop(qualified, None) is None:
            return False
        self._monitors = {t: m for t, m in self._monitors.items() if m.table != qualified}
        return True

    def _system_properties(self) -> dict[str, str]:
        return {
            "version.gpudb_core_version": CORE_VERSION,
            "conf.number_of_hosts": "1",
            "conf.host0_public_urls": f"http://{self.host}",
            "conf.worker_http_server_urls": self.url,
            "conf.enable_ha": "FALSE",
            "conf.ha_ring_head_nodes_full": "",
            "conf.use_https": "FALSE",
            "conf.enable_httpd_proxy": "FALSE",
            "conf.enable_worker_http_servers": "FALSE",
            "conf.set_monitor_port": str(self.zmq_port),
            "conf.max_get_records_size": str(self.max_get_records),
        }

    def _show_system_properties(self, req: dict[str, Any]) -> dict[str, Any]:
        properties = self._system_properties()
        if wanted := req["options"].get("properties"):
            properties = {k: properties[k] for k in wanted.split(",") if k in properties}
        return {"property_map": properties, "info": {}}

    def _show_system_status(self, req: dict[str, Any]) -> dict[str, Any]:
        system = json.dumps({"status": "running", "version": CORE_VERSION})
        return {"status_map": {"system": system}, "info": {}}

    def _has_table(self, req: dict[str, Any]) -> dict[str, Any]:
        name = req["table_name"]
        exists = bool(name) and qualify(name) in self._tables
        return {"table_name": name, "table_exists": exists, "info": {}}

    def _show_table(self, req: dict[str, Any]) -> dict[str, Any]:
        name = req["table_name"]
        if not name:
            tables = list(self._tables.values())
        elif (table := self._tables.get(qualify(name))) is not None:
            tables = [table]
        elif _flag(req["options"], "no_error_if_not_exists"):
            tables = []
        else:
            raise KineticaError(f"Table '{name}' does not exist")
        sizes = [len(t.rows) for t in tables]
        return {
            "table_name": name,
            "table_names": [t.name for t in tables],
            "table_descriptions": [["REPLICATED"] if t.replicated else [] for t in tables],
            "type_ids": [t.type.type_id for t in tables],
            "type_schemas": [t.type.schema_json for t in tables],
            "type_labels": [t.type.label for t in tables],
            "properties": [t.type.properties for t in tables],
            "additional_info": [{"schema_name": t.name.split(".")[0], "table_ttl": "-1"} for t in tables],
            "sizes": sizes,
            "full_sizes": sizes,
            "join_sizes": [float(s) for s in sizes],
            "total_size": sum(sizes),
            "total_full_size": sum(sizes),
            "info": {},
        }

    def _create_type(self, req: dict[str, Any]) -> dict[str, Any]:
        table_type = TableType.create(req["type_definition"], req["label"], req["properties"])
        self._types.setdefault(table_type.type_id, table_type)
        return {
            "type_id": table_type.type_id,
            "type_definition": table_type.schema_json,
            "label": table_type.label,
            "properties": table_type.properties,
            "info": {},
        }

    def _show_types(self, req: dict[str, Any]) -> dict[str, Any]:
        type_id, label = req["type_id"], req["label"]
        if type_id and type_id not in self._types:
            raise KineticaError(f"Type '{type_id}' does not exist")
        found = [t for i, t in self._types.items() if (not type_id or i == type_id) and (not label or t.label == label)]
        return {
            "type_ids": [t.type_id for t in found],
            "type_schemas": [t.schema_json for t in found],
            "labels": [t.label for t in found],
            "properties": [t.properties for t in found],
            "info": {},
        }

    def _has_type(self, req: dict[str, Any]) -> dict[str, Any]:
        return {"type_id": req["type_id"], "type_exists": req["type_id"] in self._types, "info": {}}

    def _create_table(self, req: dict[str, Any]) -> dict[str, Any]:
        name, options = req["table_name"], req["options"]
        qualified = qualify(name)
        if _flag(options, "is_collection"):
            raise KineticaError("collections are not supported by this test server")
        table_type = self._types.get(req["type_id"])
        if table_type is None:
            raise KineticaError(f"Type '{req['type_id']}' does not exist")
        if qualified in self._tables:
            if not _flag(options, "no_error_if_exists"):
                raise KineticaError(f"Table '{name}' already exists")
        else:
            self._tables[qualified] = Table(qualified, table_type, _flag(options, "is_replicated"))
        return {
            "table_name": name,
            "type_id": table_type.type_id,
            "is_collection": False,
            "info": {"qualified_table_name": qualified},
        }

    def _decode_records(self, table_type: TableType, binary: list[bytes], texts: list[str], encoding: str) -> list[Row]:
        encoding = (encoding or "binary").lower()
        if encoding not in ("binary", "json"):
            raise KineticaError(f"unsupported list_encoding {encoding!r}")
        decode: Callable[[Any], Row] = table_type.decode if encoding == "binary" else table_type.from_json
        items: list[Any] = binary if encoding == "binary" else texts
        records = []
        for i, item in enumerate(items):
            try:
                records.append(decode(item))
            except KineticaError as exc:
                raise KineticaError(f"record {i}: {exc}") from None
        return records

    def _insert_records(self, req: dict[str, Any]) -> dict[str, Any]:
        work = self._table(req["table_name"]).clone()
        records = self._decode_records(work.type, req["list"], req["list_str"], req["list_encoding"])
        options = req["options"]
        upsert = _flag(options, "update_on_existing_pk")
        ignore = _flag(options, "ignore_existing_pk")
        report = _flag(options, "allow_partial_batch") or _flag(options, "return_individual_errors")
        inserted: dict[int, Row] = {}  # this batch's new rows: what insert monitors receive
        updated, errors = 0, {}
        for i, record in enumerate(records):
            row_id = work.lookup(record)
            if row_id is None:
                inserted[work.add(record)] = record
            elif upsert:
                work.put(row_id, record)
                updated += 1
                if row_id in inserted:
                    inserted[row_id] = record
            elif not ignore:
                message = f"Insertion of record {i} failed: duplicate primary key {work.key(record)!r}"
                if not report:
                    raise KineticaError(message)
                errors[i] = message
        if not _flag(options, "dry_run"):
            self._tables[work.name] = work
            self._queue_inserts(work, list(inserted.values()))
            self._queue_count(work.name, "update", updated)
        info = {f"error_{i}": m for i, m in errors.items()}
        if errors:
            info["bad_record_indices"] = ",".join(map(str, errors))
        ids = [f"{row_id:016x}" for row_id in inserted] if _flag(options, "return_record_ids") else []
        return {"record_ids": ids, "count_inserted": len(inserted), "count_updated": updated, "info": info}

    def _get_records(self, req: dict[str, Any]) -> dict[str, Any]:
        table = self._table(req["table_name"])
        options, offset, limit = req["options"], req["offset"], req["limit"]
        encoding = req["encoding"].lower() or "binary"
        if encoding not in ("binary", "json"):
            raise KineticaError(f"unsupported encoding {req['encoding']!r}")
        if offset < 0 or (limit < 0 and limit != END_OF_SET):
            raise KineticaError(f"invalid offset {offset} or limit {limit}")
        if limit == END_OF_SET or limit > self.max_get_records:
            limit = self.max_get_records
        keyed = self._key_rows(table, options, offset + limit)
        rows, total = keyed if keyed is not None else self._filtered_rows(table, options)
        if sort_by := options.get("sort_by", ""):
            name = table.type.column(sort_by).name
            order = options.get("sort_order", "ascending").lower()
            if order not in ("ascending", "descending"):
                raise KineticaError(f"sort_order must be ascending or descending, not {order!r}")
            rows.sort(key=lambda r: (r[name] is not None, r[name]), reverse=order == "descending")
        page = rows[offset : offset + limit]
        return {
            "table_name": req["table_name"],
            "type_name": table.type.type_id,
            "type_schema": table.type.schema_json,
            "records_binary": [table.type.encode(r) for r in page] if encoding == "binary" else [],
            "records_json": [table.type.to_json(r) for r in page] if encoding == "json" else [],
            "total_number_of_records": total,
            "has_more_records": offset + len(page) < total,
            "info": {},
        }

    @staticmethod
    def _filtered_rows(table: Table, options: dict[str, str]) -> tuple[list[Row], int]:
        match = compile_filter(options.get("expression", ""), table.type)
        rows = [row for row in table.rows.values() if match(row)]
        return rows, len(rows)

    @staticmethod
    def _key_rows(table: Table, options: dict[str, str], needed: int) -> tuple[list[Row], int] | None:
        """Rows found through the primary-key index (a real server does not scan for these), and
        how many match; None when the expression is not a key lookup: ``pk in (...)``,
        ``pk = v``, or ``pk > v`` sorted by ``pk`` (keyset paging: only the first ``needed``
        rows are built)."""
        text = options.get("expression", "")
        try:
            plan = _Parser(text, table.type).key_access() if text.strip() else (">", [])
        except KineticaError:
            return None
        if plan is None:
            return None
        kind, values = plan
        if kind == "in":
            found = sorted({table.index[(v,)] for v in values if (v,) in table.index})
            return [table.rows[row_id] for row_id in found], len(found)
        ascending = options.get("sort_order", "ascending").lower() == "ascending"
        if table.type.primary_key != (options.get("sort_by"),) or not ascending:
            return None
        keys = table.sorted_keys
        start = bisect.bisect_right(keys, values[0]) if values else 0
        return [table.rows[table.index[(k,)]] for k in keys[start : start + needed]], len(keys) - start

    def _setters(self, table_type: TableType, values: dict[str, str | None], as_expressions: bool) -> dict[str, Value]:
        setters: dict[str, Value] = {}
        for name, text in values.items():
            column = table_type.column(name)
            if as_expressions and text is not None:
                setters[name] = compile_value(text, column, table_type)
            else:
                constant = column.from_text(text)
                setters[name] = lambda row, v=constant: v
        return setters

    def _update_records(self, req: dict[str, Any]) -> dict[str, Any]:
        work = self._table(req["table_name"]).clone()
        expressions, values_maps, options = req["expressions"], req["new_values_maps"], req["options"]
        if len(expressions) != len(values_maps):
            raise KineticaError("expressions and new_values_maps must have the same length")
        if req["records_to_insert"] or req["records_to_insert_str"]:
            raise KineticaError("records_to_insert is not supported by this test server")
        filters = compile_filters(expressions, options.get("global_expression", ""), work.type)
        as_expressions = _flag(options, "use_expressions_in_new_values_maps")
        replace, ignore = _flag(options, "update_on_existing_pk"), _flag(options, "ignore_existing_pk")
        counts = []
        for match, values in zip(filters, values_maps, strict=True):
            setters = self._setters(work.type, values, as_expressions)
            count = 0
            for row_id in work.matching(match):
                if row_id not in work.rows:
                    continue  # removed by an earlier primary-key collision in this request
                old = work.rows[row_id]
                new = work.type.check({**old, **{name: set_value(old) for name, set_value in setters.items()}})
                other = work.lookup(new)
                if other is not None and other != row_id:
                    if ignore and not replace:
                        continue
                    if not replace:
                        raise KineticaError(f"update would duplicate primary key {work.key(new)!r}")
                    work.remove(other)
                work.put(row_id, new)
                count += 1
            counts.append(count)
        self._tables[work.name] = work
        self._queue_count(work.name, "update", sum(counts))
        zeros = [0] * len(counts)
        return {
            "count_updated": sum(counts),
            "counts_updated": counts,
            "count_inserted": 0,
            "counts_inserted": zeros,
            "info": {},
        }

    def _delete_records(self, req: dict[str, Any]) -> dict[str, Any]:
        work = self._table(req["table_name"]).clone()
        expressions, options = req["expressions"], req["options"]
        if "record_id" in options:
            raise KineticaError("record_id is not supported by this test server")
        if _flag(options, "delete_all_records"):
            if any(e.strip() for e in expressions):
                raise KineticaError("delete_all_records and expressions are mutually exclusive")
            expressions = [""]
        elif not expressions:
            raise KineticaError("no expressions given")
        counts = []
        for match in compile_filters(expressions, options.get("global_expression", ""), work.type):
            doomed = work.matching(match)
            for row_id in doomed:
                work.remove(row_id)
            counts.append(len(doomed))
        self._tables[work.name] = work
        self._queue_count(work.name, "delete", sum(counts))
        return {"count_deleted": sum(counts), "counts_deleted": counts, "info": {}}

    def _clear_table(self, req: dict[str, Any]) -> dict[str, Any]:
        name = req["table_name"]
        if not name:
            raise KineticaError("clearing every table is not supported by this test server")
        if not self._drop(qualify(name)) and not _flag(req["options"], "no_error_if_not_exists"):
            raise KineticaError(f"Table '{name}' does not exist")
        return {"table_name": name, "info": {}}

    def _alter_table(self, req: dict[str, Any]) -> dict[str, Any]:
        table = self._table(req["table_name"])
        action, value, options = req["action"], req["value"], req["options"]
        old = table.type
        if action == "add_column":
            if value in old.by_name:
                raise KineticaError(f"column '{value}' already exists")
            parts = [p.strip().lower() for p in options.get("column_type", "").split(",")]
            properties = options.get("column_properties", "").split(",")
            nullable = "null" in parts[1:] or "nullable" in [p.strip().lower() for p in properties]
            column = make_column(value, parts[0], nullable, properties)
            if nullable:  # Kinetica: a nullable column starts null whatever the default
                default = None
            elif "column_default_value" in options:
                default = column.check(column.from_text(options["column_default_value"]))
            else:
                default = column.zero
            new_type = TableType((*old.columns, column), old.label)
            rows = {i: {**r, value: default} for i, r in table.rows.items()}
        elif action == "delete_column":
            column = old.column(value)
            if "primary_key" in column.properties or len(old.columns) == 1:
                raise KineticaError(f"column '{value}' cannot be deleted")
            new_type = TableType(tuple(c for c in old.columns if c.name != value), old.label)
            rows = {i: {k: v for k, v in r.items() if k != value} for i, r in table.rows.items()}
        else:
            raise KineticaError(f"alter/table action {action!r} is not supported by this test server")
        self._types.setdefault(new_type.type_id, new_type)
        altered = Table(table.name, new_type, table.replicated, rows, dict(table.index), table.next_id)
        self._tables[table.name] = altered
        return {
            "table_name": req["table_name"],
            "action": action,
            "value": value,
            "type_id": new_type.type_id,
            "type_definition": new_type.schema_json,
            "properties": new_type.properties,
            "label": new_type.label,
            "info": {},
        }

    def _create_table_monitor(self, req: dict[str, Any]) -> dict[str, Any]:
        table = self._table(req["table_name"])
        options = req["options"]
        if unsupported := set(options) - {"event", "monitor_id"}:
            raise KineticaError(f"table monitor options {sorted(unsupported)} are not supported by this test server")
        event = options.get("event", "insert").lower()
        if event not in ("insert", "update", "delete"):
            raise KineticaError(f"unknown table monitor event {event!r}")
        topic_id = options.get("monitor_id") or uuid.uuid4().hex
        if topic_id in self._monitors:
            raise KineticaError(f"table monitor '{topic_id}' already exists")
        self._monitors[topic_id] = Monitor(topic_id, table.name, event)
        schema = table.type.schema_json if event == "insert" else COUNT_SCHEMA_JSON
        return {
            "topic_id": topic_id,
            "table_name": req["table_name"],
            "type_schema": schema,
            "info": {"ttl": "-1", f"{event}_topic_id": topic_id, f"{event}_type_schema": schema},
        }

    def _clear_table_monitor(self, req: dict[str, Any]) -> dict[str, Any]:
        topic_id = req["topic_id"]
        if self._monitors.pop(topic_id, None) is None:
            raise KineticaError(f"Table monitor '{topic_id}' does not exist")
        return {"topic_id": topic_id, "info": {}}


def main() -> None:
    """Run a server as its own process (the benchmarks do, so server and clients do not share a GIL).

    Prints one JSON line ``{"url": ..., "zmq_port": ...}`` once it is listening, and stops when
    its standard input closes.
    """
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--http-port", type=int, default=0)
    parser.add_argument("--zmq-port", type=int, default=0)
    args = parser.parse_args()
    server = KineticaTestServer(http_port=args.http_port, zmq_port=args.zmq_port).start()
    try:
        print(json.dumps({"url": server.url, "zmq_port": server.zmq_port}), flush=True)
        sys.stdin.read()
    finally:
        server.stop()


if __name__ == "__main__":
    main()

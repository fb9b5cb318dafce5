"""A small Kinetica REST client: the few endpoints the Kinetica backend needs, and only these.

It calls ``/show/system/properties``, ``/show/system/status``, ``/has/table``, ``/show/table``,
``/create/type``, ``/show/types``, ``/has/type``, ``/create/table``, ``/insert/records``,
``/get/records``, ``/delete/records``, ``/clear/table``, ``/create/tablemonitor`` and
``/clear/tablemonitor``: nothing else. Each request and response is the record the official
protocol defines (the Avro schemas below are the ones the official ``gpudb`` client embeds),
sent as ``POST {head}{endpoint}`` in the binary envelope (schemaless Avro) or the JSON one.
So any server that speaks the official protocol serves this client, and the client relies on
nothing a real Kinetica server would not do.

The pieces:

- :class:`KineticaURI`: ``kinetica://user:password@h1:9191,h2:9191?monitor_port=9002`` parsed;
- :class:`KineticaClient`: one method per endpoint, failover around an HA ring of heads;
- :class:`RecordCodec`: a table's records to and from Avro binary (and JSON), the hot path of
  table monitor frames;
- :func:`quote_identifier`, :func:`quote_literal`, :func:`in_expression`,
  :func:`equals_expression`: filter expressions that survive any name or value;
- the errors, and :func:`is_transient`, the one predicate that says "unreachable for now".

Passwords never reach a message, a ``repr`` or a log line: URIs are shown redacted and the
credentials travel only in the ``Authorization`` header.
"""

from __future__ import annotations

import base64
import dataclasses as dc
import functools
import json
import logging
import math
import re
import struct
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from io import BytesIO
from typing import Any, Literal, NamedTuple, Self, TypeVar
from urllib.parse import parse_qsl, quote, unquote, urlsplit

import fastavro
import requests
from fastavro import schemaless_reader, schemaless_writer

from reactive.errors import BackendError, ConfigurationError
from reactive.rowformat import array_schema, decode_all
from reactive.uri import redact

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_PORT = 9191
DEFAULT_MONITOR_PORT = 9002
#: Seconds one request may take (connect, then each read) unless the URI says ``timeout=``.
DEFAULT_TIMEOUT = 60.0
#: ``/get/records`` ``limit`` meaning "as many as the server allows" (its ``max_get_records_size``).
END_OF_SET = -9999

Encoding = Literal["binary", "json"]
MonitorEvent = Literal["insert", "update", "delete"]

# -- errors ----------------------------------------------------------------------------------


class KineticaError(BackendError):
    """The server answered ``ERROR`` to a request: the request was refused (bad name, bad
    expression, missing table...). Not transient: retrying the same request fails the same way.

    ``endpoint`` is the endpoint called, ``server_message`` what the server said.
    """

    def __init__(self, endpoint: str, message: str, *, table: str | None = None) -> None:
        super().__init__(f"Kinetica {endpoint} failed: {message}", table=table)
        self.endpoint = endpoint
        self.server_message = message


class KineticaAuthError(BackendError):
    """The server refused the credentials (HTTP 401) or the TLS handshake failed. Not transient."""


class KineticaUnavailableError(BackendError):
    """No head answered: connection refused or reset, a timeout, HTTP 404/500/502/503/504, or
    a server message that means the database is going away (the official client fails over on
    the same signs). Transient: :func:`is_transient` is true and a retry may succeed.
    """


class KineticaProtocolError(BackendError):
    """A response (or a record) that does not decode: bad Avro, bad JSON, missing fields.

    Names the endpoint, never carries a raw fastavro, ``json`` or ``KeyError`` exception.
    """

    def __init__(self, message: str, *, endpoint: str | None = None, table: str | None = None) -> None:
        super().__init__(message, table=table)
        self.endpoint = endpoint


#: Server messages on which the official client fails over to the next head.
_FAILOVER_MESSAGES = (
    "Kinetica is exiting",
    "Kinetica is offline",
    "System is offline",
    "Connection refused",
    "Connection reset",
    "system-limited-fatal",
    "System shutting down",
    "Unavailable: Draining HA queue",
)
_FAILOVER_HTTP_STATUSES = frozenset({404, 500, 502, 503, 504})


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` means Kinetica is unreachable for now (retry later, or on another head).

    The only place that decides it: the client fails over on exactly these errors, and the
    rest of the backend retries on them. A refused request, bad credentials or a malformed
    response are not transient.

    >>> is_transient(KineticaUnavailableError("connection refused"))
    True
    >>> is_transient(KineticaError("/has/table", "bad name"))
    False
    """
    if isinstance(exc, KineticaUnavailableError):
        return True
    if isinstance(exc, requests.exceptions.SSLError):
        return False
    return isinstance(exc, requests.ConnectionError | requests.Timeout | ConnectionError | TimeoutError)


# -- URIs ------------------------------------------------------------------------------------

_SCHEMES = {"kinetica": "http", "kinetica+http": "http", "kinetica+https": "https"}
_HOSTNAME = re.compile(r"[\w.\-]+|[0-9a-f:.]+")


@dc.dataclass(frozen=True, slots=True)
class KineticaURI:
    """A parsed ``kinetica://`` URI.

    ``heads`` are the base URLs of the HA ring's head nodes, in the order given (the first is
    used first); the password is kept out of ``repr``; ``redacted`` is the URI to show.

    >>> uri = KineticaURI.parse("kinetica://alice:p%40ss@h1:9191,h2:9191?monitor_port=9005&timeout=10")
    >>> uri.heads, uri.username, uri.password, uri.monitor_port, uri.timeout
    (('http://h1:9191', 'http://h2:9191'), 'alice', 'p@ss', 9005, 10.0)
    >>> uri
    KineticaURI(heads=('http://h1:9191', 'http://h2:9191'), username='alice', monitor_port=9005, timeout=10.0, \
redacted='kinetica://alice:***@h1:9191,h2:9191?monitor_port=9005&timeout=10')
    >>> KineticaURI.parse("kinetica+https://db.example.com:8082/gpudb-0").heads
    ('https://db.example.com:8082/gpudb-0',)
    """

    heads: tuple[str, ...]
    username: str = ""
    password: str = dc.field(default="", repr=False)
    monitor_port: int = DEFAULT_MONITOR_PORT
    timeout: float = DEFAULT_TIMEOUT
    redacted: str = ""

    def __post_init__(self) -> None:
        if not self.heads:
            raise ConfigurationError("a Kinetica URI needs at least one head")
        if not self.redacted:
            userinfo = f"{quote(self.username, safe='')}:***@" if self.username or self.password else ""
            first = urlsplit(self.heads[0])
            scheme = "kinetica+https" if first.scheme == "https" else "kinetica"
            hosts = ",".join(urlsplit(head).netloc for head in self.heads)
            object.__setattr__(self, "redacted", f"{scheme}://{userinfo}{hosts}{first.path}")

    @classmethod
    def parse(cls, uri: str) -> KineticaURI:
        """Parse ``uri``; raise :class:`~reactive.errors.ConfigurationError` (URI redacted) if invalid.

        Forms: ``kinetica://host:port`` (HTTP), ``kinetica+https://host:port/path`` (HTTPS, the
        path prefix kept), ``user:password@`` (Basic auth; percent-encode ``/ @ : ? #`` in
        them), several comma-separated heads, and the query options ``monitor_port`` (the ZMQ
        port, default 9002) and ``timeout`` (seconds per request). The port defaults to 9191.

        >>> KineticaURI.parse("kinetica://alice:secret@host:99999")
        Traceback (most recent call last):
        ...
        reactive.errors.ConfigurationError: invalid Kinetica URI 'kinetica://alice:***@host:99999': bad port '99999'
        """
        shown = redact(uri)

        def invalid(why: str) -> ConfigurationError:
            return ConfigurationError(f"invalid Kinetica URI {shown!r}: {why}")

        scheme, sep, rest = uri.partition("://")
        http_scheme = _SCHEMES.get(scheme.lower())
        if not sep or http_scheme is None:
            raise invalid(f"the scheme must be one of {', '.join(_SCHEMES)}")
        if "#" in rest.rpartition("@")[2]:
            raise invalid("a fragment ('#...') means nothing here")
        userinfo, at, rest = rest.rpartition("@")
        if at and any(c in userinfo for c in "/?#@"):
            raise invalid("percent-encode '/', '@', ':', '?' and '#' in the user name and password")
        username, _, password = userinfo.partition(":")
        rest, _, query = rest.partition("?")
        hosts, slash, path = rest.partition("/")
        prefix = f"/{path}".rstrip("/") if slash else ""
        heads = tuple(f"{http_scheme}://{_host_and_port(host, invalid)}{prefix}" for host in hosts.split(","))
        options = _query_options(query, invalid)
        return cls(
            heads=heads,
            username=unquote(username),
            password=unquote(password),
            monitor_port=options.get("monitor_port", DEFAULT_MONITOR_PORT),
            timeout=options.get("timeout", DEFAULT_TIMEOUT),
            redacted=shown,
        )


def _host_and_port(text: str, invalid: Callable[[str], ConfigurationError]) -> str:
    if not text:
        raise invalid("no host")
    try:
        parts = urlsplit(f"//{text}")
        port = parts.port
    except ValueError:
        raise invalid(f"bad port {text.rpartition(':')[2]!r}") from None
    if not parts.hostname or not _HOSTNAME.fullmatch(parts.hostname):
        raise invalid(f"bad host {text!r}")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{host}:{DEFAULT_PORT if port is None else port}"


def _query_options(query: str, invalid: Callable[[str], ConfigurationError]) -> dict[str, Any]:
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True) if query else []
    except ValueError:
        raise invalid("malformed query string") from None
    options: dict[str, Any] = {}
    for key, value in pairs:
        if key in options:
            raise invalid(f"option {key!r} given twice")
        if key == "monitor_port":
            if not (value.isascii() and value.isdigit()) or not 0 < int(value) < 65536:
                raise invalid(f"monitor_port must be a port number, not {value!r}")
            options[key] = int(value)
        elif key == "timeout":
            try:
                seconds = float(value)
            except ValueError:
                seconds = math.nan
            if not 0 < seconds < math.inf:
                raise invalid(f"timeout must be a positive number of seconds, not {value!r}")
            options[key] = seconds
        else:
            raise invalid(f"unknown option {key!r} (known: monitor_port, timeout)")
    return options


# -- expressions -----------------------------------------------------------------------------


def quote_identifier(name: str) -> str:
    """``name`` as a quoted column (or table) name in a Kinetica expression: ``"`` doubled.

    >>> print(quote_identifier('say "hi"; drop'))
    "say ""hi""; drop"
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"an identifier must be a non-empty string, not {name!r}")
    return '"' + name.replace('"', '""') + '"'


def quote_literal(value: str | int | float) -> str:
    """``value`` as a literal in a Kinetica expression.

    Strings are single-quoted with ``'`` doubled; ints and floats are written as numbers
    (floats with ``repr``, which round-trips). Rejected, because no literal means them
    faithfully: ``None`` (write ``is null``, or use :func:`equals_expression`), NaN and
    infinities, booleans (Kinetica has no boolean column: pass ``int(flag)``) and anything else.

    >>> print(quote_literal("it's; 😀"), quote_literal(42), quote_literal(0.1))
    'it''s; 😀' 42 0.1
    >>> quote_literal(None)
    Traceback (most recent call last):
    ...
    ValueError: None has no literal: compare with 'is null'
    """
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    if value is None:
        raise ValueError("None has no literal: compare with 'is null'")
    if isinstance(value, bool):
        raise TypeError(f"no boolean literal for {value!r}: Kinetica stores flags as int, pass int(value)")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{value!r} has no literal in a Kinetica expression")
        return repr(value)
    raise TypeError(f"no Kinetica literal for a {type(value).__name__}")


def in_expression(column: str, values: Sequence[str | int | float]) -> str:
    """``"column" in (v1, v2, ...)``; ``values`` must not be empty.

    >>> print(in_expression("id", [1, 2, 3]))
    "id" in (1, 2, 3)
    >>> print(in_expression("name", ["a'b", "ü"]))
    "name" in ('a''b', 'ü')
    """
    if isinstance(values, str | bytes) or not values:
        raise ValueError(f"in_expression needs a non-empty sequence of values, not {values!r}")
    return f"{quote_identifier(column)} in ({', '.join(quote_literal(v) for v in values)})"


def equals_expression(column: str, value: str | int | float | None) -> str:
    """``"column" = value``, or ``"column" is null`` when ``value`` is None.

    >>> print(equals_expression("key", "x"), "|", equals_expression("key", None))
    "key" = 'x' | "key" is null
    """
    if value is None:
        return f"{quote_identifier(column)} is null"
    return f"{quote_identifier(column)} = {quote_literal(value)}"


# -- table records ---------------------------------------------------------------------------

#: The Avro types of Kinetica columns (each may be nullable: a union with ``"null"``).
COLUMN_TYPES = frozenset({"int", "long", "float", "double", "string", "bytes"})


def record_type_schema(name: str, columns: Sequence[tuple[str, str, bool]]) -> str:
    """The Avro type schema (JSON) of a table whose ``columns`` are ``(name, avro_type, nullable)``.

    >>> print(record_type_schema("docs", [("id", "long", False), ("text", "string", True)]))
    {"type":"record","name":"docs","fields":[{"name":"id","type":"long"},{"name":"text","type":["string","null"]}]}
    """
    fields = []
    for column, avro_type, nullable in columns:
        if avro_type not in COLUMN_TYPES:
            raise ValueError(f"column {column!r}: type {avro_type!r} is not one of {sorted(COLUMN_TYPES)}")
        fields.append({"name": column, "type": [avro_type, "null"] if nullable else avro_type})
    if not fields:
        raise ValueError("a table type needs at least one column")
    return json.dumps({"type": "record", "name": name, "fields": fields}, separators=(",", ":"), ensure_ascii=False)


class RecordCodec:
    """A table's records to and from schemaless Avro binary (and the JSON of JSON mode).

    Build it once per type schema (:meth:`for_schema` caches them); :meth:`decode` is strict:
    bytes left over after the last column raise :class:`KineticaProtocolError`, which is how an
    altered table shows (the official client silently drops the new column instead).

    >>> codec = RecordCodec(record_type_schema("t", [("id", "long", False), ("name", "string", True)]))
    >>> data = codec.encode({"id": 7, "name": "é"})
    >>> data, codec.decode(data)
    (b'\\x0e\\x00\\x04\\xc3\\xa9', {'id': 7, 'name': 'é'})
    >>> codec.columns
    ('id', 'name')
    """

    __slots__ = ("_array", "_bytes_columns", "_column_set", "_parsed", "columns", "name", "type_schema")

    def __init__(self, type_schema: str) -> None:
        try:
            schema = json.loads(type_schema)
            if not isinstance(schema, dict) or schema.get("type") != "record":
                raise ValueError("not a record schema")
            self._parsed = fastavro.parse_schema(schema)
            self._array = array_schema(schema)
            fields = schema["fields"]
            self.columns: tuple[str, ...] = tuple(field["name"] for field in fields)
        except Exception as exc:
            raise KineticaProtocolError(
                f"not a Kinetica type schema ({_describe(exc)}): {type_schema[:200]!r}"
            ) from None
        self.type_schema = type_schema
        self.name: str = schema.get("name", "")
        self._column_set = frozenset(self.columns)
        self._bytes_columns = tuple(f["name"] for f in fields if _base_type(f["type"]) == "bytes")

    @staticmethod
    @functools.lru_cache(maxsize=256)
    def for_schema(type_schema: str) -> RecordCodec:
        """The codec of ``type_schema``, built once."""
        return RecordCodec(type_schema)

    def encode(self, record: Mapping[str, Any]) -> bytes:
        """``record`` as schemaless Avro; a missing nullable column is null.

        Raises ``ValueError`` for an unknown column or a value that does not fit its column.
        """
        unknown = record.keys() - self._column_set
        if unknown:
            raise ValueError(f"columns {sorted(unknown)} are not in type {self.name!r}")
        stream = BytesIO()
        try:
            schemaless_writer(stream, self._parsed, record)
        except (TypeError, ValueError, AttributeError, OverflowError) as exc:
            raise ValueError(f"record does not fit type {self.name!r}: {_describe(exc)}") from None
        return stream.getvalue()

    def decode(self, data: bytes) -> dict[str, Any]:
        """The record in ``data`` (one schemaless Avro datum); :class:`KineticaProtocolError` if it
        does not decode exactly."""
        stream = BytesIO(data)
        try:
            record = schemaless_reader(stream, self._parsed, None)
        except Exception as exc:
            raise KineticaProtocolError(f"a record does not decode as type {self.name!r}: {_describe(exc)}") from None
        if stream.tell() != len(data):
            raise KineticaProtocolError(
                f"a record of type {self.name!r} has {len(data) - stream.tell()} bytes left over (table altered?)"
            )
        return record

    def decode_all(self, frames: Sequence[bytes]) -> list[dict[str, Any]] | None:
        """Every frame decoded in one pass, or None when one does not decode exactly (then
        :meth:`decode` them one by one to find it)."""
        return decode_all(self._array, frames)

    def to_json(self, record: Mapping[str, Any]) -> str:
        """``record`` as the JSON text of JSON mode (bytes as one character per byte, like Avro JSON)."""
        unknown = record.keys() - self._column_set
        if unknown:
            raise ValueError(f"columns {sorted(unknown)} are not in type {self.name!r}")
        if self._bytes_columns:
            record = dict(record)
            for column in self._bytes_columns:
                if isinstance(record.get(column), bytes | bytearray):
                    record[column] = record[column].decode("latin-1")
        return json.dumps(record)

    def from_json(self, text: str) -> dict[str, Any]:
        """The record in ``text`` (JSON mode), in the form binary mode gives it: a ``bytes``
        column as bytes, a vector column (which a server writes as a list of floats) packed
        as Kinetica stores it, little-endian float32.

        >>> codec = RecordCodec(record_type_schema("t", [("id", "long", False), ("vec", "bytes", True)]))
        >>> codec.from_json('{"id": 1, "vec": [1.0, 2.0]}')
        {'id': 1, 'vec': b'\\x00\\x00\\x80?\\x00\\x00\\x00@'}
        """
        try:
            record = json.loads(text)
            for column in self._bytes_columns:
                value = record.get(column)
                if isinstance(value, str):
                    record[column] = value.encode("latin-1")
                elif isinstance(value, list):
                    record[column] = struct.pack(f"<{len(value)}f", *value)
        except Exception as exc:
            raise KineticaProtocolError(
                f"a JSON record of type {self.name!r} does not decode: {_describe(exc)}"
            ) from None
        if not isinstance(record, dict):
            raise KineticaProtocolError(f"a JSON record of type {self.name!r} is not an object")
        return record

    def __repr__(self) -> str:
        return f"RecordCodec({self.name!r}, columns={self.columns!r})"


def _base_type(avro_type: Any) -> Any:
    if isinstance(avro_type, list):
        return next((t for t in avro_type if t != "null"), "null")
    return avro_type


# -- the protocol's records (from the official client's embedded schemas) ------------------
#
# Written compactly: ``name:type`` fields, where ``[t]`` is an array of ``t`` and ``{t}`` a
# map from strings to ``t``. tests/test_kinetica_client.py checks every one against the
# schemas the official ``gpudb`` client embeds.

_PROTOCOL = {
    "/show/system/properties": ("show_system_properties", "options:{string}", "property_map:{string} info:{string}"),
    "/show/system/status": ("show_system_status", "options:{string}", "status_map:{string} info:{string}"),
    "/has/table": (
        "has_table",
        "table_name:string options:{string}",
        "table_name:string table_exists:boolean info:{string}",
    ),
    "/show/table": (
        "show_table",
        "table_name:string options:{string}",
        "table_name:string table_names:[string] table_descriptions:[[string]] type_ids:[string] type_schemas:[string]"
        " type_labels:[string] properties:[{[string]}] additional_info:[{string}] sizes:[long] full_sizes:[long]"
        " join_sizes:[double] total_size:long total_full_size:long info:{string}",
    ),
    "/create/type": (
        "create_type",
        "type_definition:string label:string properties:{[string]} options:{string}",
        "type_id:string type_definition:string label:string properties:{[string]} info:{string}",
    ),
    "/show/types": (
        "show_types",
        "type_id:string label:string options:{string}",
        "type_ids:[string] type_schemas:[string] labels:[string] properties:[{[string]}] info:{string}",
    ),
    "/has/type": ("has_type", "type_id:string options:{string}", "type_id:string type_exists:boolean info:{string}"),
    "/create/table": (
        "create_table",
        "table_name:string type_id:string options:{string}",
        "table_name:string type_id:string is_collection:boolean info:{string}",
    ),
    "/insert/records": (
        "insert_records",
        "table_name:string list:[bytes] list_str:[string] list_encoding:string options:{string}",
        "record_ids:[string] count_inserted:int count_updated:int info:{string}",
    ),
    "/get/records": (
        "get_records",
        "table_name:string offset:long limit:long encoding:string options:{string}",
        "table_name:string type_name:string type_schema:string records_binary:[bytes] records_json:[string]"
        " total_number_of_records:long has_more_records:boolean info:{string}",
    ),
    "/delete/records": (
        "delete_records",
        "table_name:string expressions:[string] options:{string}",
        "count_deleted:long counts_deleted:[long] info:{string}",
    ),
    "/clear/table": (
        "clear_table",
        "table_name:string authorization:string options:{string}",
        "table_name:string info:{string}",
    ),
    "/create/tablemonitor": (
        "create_table_monitor",
        "table_name:string options:{string}",
        "topic_id:string table_name:string type_schema:string info:{string}",
    ),
    "/clear/tablemonitor": ("clear_table_monitor", "topic_id:string options:{string}", "topic_id:string info:{string}"),
}
_ENVELOPE_SPEC = "status:string message:string data_type:string data:bytes data_str:string"


def _avro_type(text: str) -> Any:
    if text.startswith("[") and text.endswith("]"):
        return {"type": "array", "items": _avro_type(text[1:-1])}
    if text.startswith("{") and text.endswith("}"):
        return {"type": "map", "values": _avro_type(text[1:-1])}
    return text


def _record_schema(name: str, spec: str) -> dict[str, Any]:
    fields = [field.split(":") for field in spec.split()]
    return {"type": "record", "name": name, "fields": [{"name": k, "type": _avro_type(t)} for k, t in fields]}


@dc.dataclass(frozen=True, slots=True)
class _Endpoint:
    """One endpoint's request and response records, parsed once."""

    path: str
    request: dict[str, Any]
    response: dict[str, Any]
    request_fields: tuple[str, ...]
    response_fields: tuple[str, ...]

    @classmethod
    def define(cls, path: str, name: str, request: str, response: str) -> _Endpoint:
        return cls(
            path,
            fastavro.parse_schema(_record_schema(f"{name}_request", request)),
            fastavro.parse_schema(_record_schema(f"{name}_response", response)),
            tuple(field.split(":")[0] for field in request.split()),
            tuple(field.split(":")[0] for field in response.split()),
        )


_ENDPOINTS = {path: _Endpoint.define(path, *spec) for path, spec in _PROTOCOL.items()}
_ENVELOPE = fastavro.parse_schema(_record_schema("gpudb_response", _ENVELOPE_SPEC))
_ENVELOPE_FIELDS = ("status", "message", "data_type", "data_str")


def encode_request(endpoint: str, request: Mapping[str, Any], encoding: Encoding) -> bytes:
    """The body of a request to ``endpoint`` (a schemaless Avro record, or JSON).

    >>> encode_request("/has/table", {"table_name": "t", "options": {}}, "binary")
    b'\\x02t\\x00'
    >>> encode_request("/has/table", {"table_name": "t", "options": {}}, "json")
    b'{"table_name": "t", "options": {}}'
    """
    spec = _ENDPOINTS[endpoint]
    if encoding == "json":
        return json.dumps({name: request[name] for name in spec.request_fields}).encode()
    stream = BytesIO()
    schemaless_writer(stream, spec.request, request)
    return stream.getvalue()


def decode_response(endpoint: str, body: bytes, encoding: Encoding) -> tuple[str, str, dict[str, Any]]:
    """``(status, message, response)`` from a ``gpudb_response`` envelope; ``response`` is
    empty unless ``status`` is ``OK``. Raises :class:`KineticaProtocolError` if it does not decode.

    >>> body = b'{"status": "ERROR", "message": "no such table", "data_type": "none", "data": "", "data_str": ""}'
    >>> decode_response("/has/table", body, "json")
    ('ERROR', 'no such table', {})
    """
    spec = _ENDPOINTS[endpoint]
    with _decoding(endpoint):
        if encoding == "json":
            envelope = _json_object(body, _ENVELOPE_FIELDS, "envelope")
        else:
            envelope = _avro_record(body, _ENVELOPE)
        status, message = envelope["status"], envelope["message"]
        if not isinstance(status, str) or not isinstance(message, str):
            raise ValueError("status and message must be strings")
        if status != "OK":
            return status, message, {}
        if encoding == "json":
            response = _json_object(envelope["data_str"], spec.response_fields, "data_str")
        else:
            response = _avro_record(envelope["data"], spec.response)
        return status, message, response


def _avro_record(data: Any, schema: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(data, bytes):
        raise ValueError(f"expected Avro bytes, got {type(data).__name__}")
    return schemaless_reader(BytesIO(data), schema, None)


def _json_object(text: Any, fields: Sequence[str], what: str) -> dict[str, Any]:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError(f"the {what} is not a JSON object")
    missing = [name for name in fields if name not in value]
    if missing:
        raise ValueError(f"the {what} lacks {', '.join(missing)}")
    return value


@contextmanager
def _decoding(endpoint: str, table: str | None = None) -> Iterator[None]:
    """Turn whatever a malformed response raises into a :class:`KineticaProtocolError`."""
    try:
        yield
    except KineticaProtocolError as exc:
        if exc.endpoint is not None:
            raise
        raise KineticaProtocolError(
            f"malformed Kinetica {endpoint} response: {exc}", endpoint=endpoint, table=table
        ) from None
    except Exception as exc:
        raise KineticaProtocolError(
            f"malformed Kinetica {endpoint} response: {_describe(exc)}", endpoint=endpoint, table=table
        ) from None


def _describe(exc: BaseException) -> str:
    """``exc`` in one short line: its innermost cause (requests wraps urllib3 wraps the socket's)."""
    seen = {id(exc)}
    while True:
        inner = getattr(exc, "reason", None)
        if not isinstance(inner, BaseException):
            inner = exc.args[0] if exc.args and isinstance(exc.args[0], BaseException) else exc.__cause__
        if not isinstance(inner, BaseException) or id(inner) in seen:
            break
        exc = inner
        seen.add(id(exc))
    text = str(exc)
    text = text if len(text) <= 300 else text[:300] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _options(options: Mapping[str, Any] | None) -> dict[str, str]:
    """Options as the protocol's ``map<string,string>``: booleans ``"true"``/``"false"``."""
    converted: dict[str, str] = {}
    for key, value in (options or {}).items():
        if isinstance(value, bool):
            converted[key] = "true" if value else "false"
        elif isinstance(value, str | int | float):
            converted[key] = str(value)
        else:
            raise TypeError(f"option {key!r}: {type(value).__name__} is not a string, number or bool")
    return converted


# -- results ---------------------------------------------------------------------------------


@dc.dataclass(frozen=True, slots=True)
class TableDescription:
    """What ``/show/table`` says about one table.

    ``properties`` maps a column to its properties (``primary_key``, ``char32``, ``nullable``...);
    ``primary_key`` lists the columns that have ``primary_key``, in column order.
    """

    name: str
    type_id: str
    type_schema: str
    columns: tuple[str, ...]
    properties: dict[str, tuple[str, ...]]
    primary_key: tuple[str, ...]
    size: int


@dc.dataclass(frozen=True, slots=True)
class TypeDescription:
    """One type known to the server (``/show/types``)."""

    type_id: str
    type_schema: str
    label: str
    properties: dict[str, tuple[str, ...]]


@dc.dataclass(frozen=True, slots=True)
class TableMonitor:
    """A table monitor created on the server: its ZMQ topic and the schema of its frames.

    For ``insert`` monitors the frames are table records; for ``update`` and ``delete`` they
    hold a ``count``, decoded with ``type_schema``. ``info`` has ``ttl`` and the per-event ids.
    """

    topic_id: str
    type_schema: str
    info: dict[str, str]


class InsertCounts(NamedTuple):
    """What ``/insert/records`` did."""

    count_inserted: int
    count_updated: int


class RecordPage(NamedTuple):
    """One page of ``/get/records``; ``type_schema`` is the type its records were decoded with."""

    records: list[dict[str, Any]]
    total_number_of_records: int
    has_more_records: bool
    type_schema: str = ""


# -- the client ------------------------------------------------------------------------------


class KineticaClient:
    """One Kinetica database (one head, or an HA ring of heads) over REST.

    Each public method calls one endpoint. With several heads, a transient failure on the
    current head (see :func:`is_transient`) moves to the next head, round robin, and the call
    is retried there; each head is tried at most once per call. :attr:`current_head` is the
    head in use and :attr:`head_changes` counts the moves, so a table monitor knows when to
    re-create itself on the new head.

    Thread safety: calls may be made from any number of threads at once. Each thread gets its
    own ``requests.Session`` (keep-alive per thread), because ``requests`` does not promise a
    session is safe to share. A ``session`` passed in is shared by every thread instead: this
    client only sends POSTs with explicit headers and no cookies, which ``requests`` handles
    safely in practice (urllib3's pool is thread-safe), but that is the caller's choice.

    >>> client = KineticaClient("kinetica://alice:s%2Fcret@h1:9191,h2:9191?monitor_port=9002")
    >>> client.current_head, client.monitor_address(), client.head_changes
    ('http://h1:9191', 'tcp://h1:9002', 0)
    >>> client
    KineticaClient('kinetica://alice:***@h1:9191,h2:9191?monitor_port=9002', encoding='binary')
    >>> client.close()
    """

    def __init__(
        self,
        uri_or_parsed: str | KineticaURI,
        *,
        encoding: Encoding = "binary",
        session: requests.Session | None = None,
    ) -> None:
        if encoding not in ("binary", "json"):
            raise ConfigurationError(f"encoding must be 'binary' or 'json', not {encoding!r}")
        self.uri = uri_or_parsed if isinstance(uri_or_parsed, KineticaURI) else KineticaURI.parse(uri_or_parsed)
        self.encoding: Encoding = encoding
        content_type = "application/json" if encoding == "json" else "application/octet-stream"
        self._headers = {"Content-Type": content_type, "Accept": content_type}
        if self.uri.username or self.uri.password:
            token = base64.b64encode(f"{self.uri.username}:{self.uri.password}".encode()).decode("ascii")
            self._headers["Authorization"] = f"Basic {token}"
        self._secrets = _secret_forms(self.uri.password)
        self._shared_session = session
        self._local = threading.local()
        self._lock = threading.Lock()
        self._sessions: list[requests.Session] = []
        self._head_index = 0
        self._head_changes = 0

    # -- ring -------------------------------------------------------------------------------
    @property
    def current_head(self) -> str:
        """The base URL of the head in use."""
        return self.uri.heads[self._head_index]

    @property
    def head_changes(self) -> int:
        """How many times this client moved to another head."""
        return self._head_changes

    def monitor_address(self) -> str:
        """The ZMQ address of the current head's table monitor publisher."""
        host = urlsplit(self.current_head).hostname or ""
        host = f"[{host}]" if ":" in host else host
        return f"tcp://{host}:{self.uri.monitor_port}"

    # -- endpoints --------------------------------------------------------------------------
    def show_system_properties(self) -> dict[str, str]:
        """The server's configuration (``conf.*``, ``version.*``...)."""
        return self._call("/show/system/properties", {"options": {}}, lambda r: _string_map(r["property_map"]))

    def show_system_status(self) -> dict[str, str]:
        """The server's status map; ``["system"]`` is JSON with ``"status": "running"`` when up."""
        return self._call("/show/system/status", {"options": {}}, lambda r: _string_map(r["status_map"]))

    def has_table(self, name: str) -> bool:
        """Whether table ``name`` exists."""
        request = {"table_name": name, "options": {}}
        return self._call("/has/table", request, lambda r: _boolean(r["table_exists"]), table=name)

    def show_table(self, name: str) -> TableDescription:
        """Describe table ``name``; :class:`KineticaError` if it does not exist."""
        request = {"table_name": name, "options": {"get_sizes": "true"}}
        return self._call("/show/table", request, functools.partial(_table_description, name), table=name)

    def table_names(self) -> list[str]:
        """The names of every table the server shows (``/show/table`` of the empty name),
        schema-qualified as the server writes them."""
        request = {"table_name": "", "options": {}}
        return self._call("/show/table", request, lambda r: [_string(name) for name in r["table_names"]])

    def create_type(self, type_schema: str, label: str, properties: Mapping[str, Sequence[str]]) -> str:
        """Register a record type (see :func:`record_type_schema`); returns its ``type_id``.

        ``properties`` maps columns to column properties, e.g. ``{"id": ["primary_key"]}``.
        """
        request = {
            "type_definition": type_schema,
            "label": label,
            "properties": {column: list(values) for column, values in properties.items()},
            "options": {},
        }
        return self._call("/create/type", request, lambda r: _string(r["type_id"]))

    def show_types(self, type_id: str = "", label: str = "") -> list[TypeDescription]:
        """The types whose id (or label) matches; empty strings match every type."""
        request = {"type_id": type_id, "label": label, "options": {}}
        return self._call("/show/types", request, _type_descriptions)

    def has_type(self, type_id: str) -> bool:
        """Whether a type with ``type_id`` exists."""
        return self._call("/has/type", {"type_id": type_id, "options": {}}, lambda r: _boolean(r["type_exists"]))

    def create_table(self, name: str, type_id: str, options: Mapping[str, Any] | None = None) -> None:
        """Create table ``name`` of type ``type_id`` (``options`` such as ``no_error_if_exists=True``)."""
        request = {"table_name": name, "type_id": type_id, "options": _options(options)}
        self._call("/create/table", request, _ignore, table=name)

    def insert_records(
        self,
        name: str,
        records: Sequence[Mapping[str, Any]],
        schema: str | RecordCodec,
        *,
        update_on_existing_pk: bool = False,
    ) -> InsertCounts:
        """Insert ``records`` (dicts by column) into table ``name`` of type ``schema``.

        With ``update_on_existing_pk`` a record whose primary key exists replaces it. An empty
        ``records`` sends nothing.
        """
        if not records:
            return InsertCounts(0, 0)
        codec = _codec(schema)
        if self.encoding == "json":
            binary, text, list_encoding = [], [codec.to_json(r) for r in records], "json"
        else:
            binary, text, list_encoding = [codec.encode(r) for r in records], [], "binary"
        request = {
            "table_name": name,
            "list": binary,
            "list_str": text,
            "list_encoding": list_encoding,
            "options": _options({"update_on_existing_pk": update_on_existing_pk}),
        }
        return self._call(
            "/insert/records",
            request,
            lambda r: InsertCounts(_integer(r["count_inserted"]), _integer(r["count_updated"])),
            table=name,
        )

    def get_records(
        self,
        name: str,
        schema: str | RecordCodec,
        *,
        expression: str = "",
        offset: int = 0,
        limit: int = END_OF_SET,
        sort_by: str | None = None,
        sort_order: Literal["ascending", "descending"] = "ascending",
    ) -> RecordPage:
        """One page of table ``name``'s records that match ``expression``.

        The records are decoded with the type the response says they have (its
        ``type_schema``): another client may have altered the table since ``schema`` (what the
        caller believes its type is, used only where a response names none) was read.
        ``limit`` defaults to as many as the server returns at once; page on with ``offset``
        while ``has_more_records``. Returns ``(records, total_number_of_records,
        has_more_records, type_schema)``.
        """
        expected = _codec(schema)
        options = {"expression": expression} if expression else {}
        if sort_by is not None:
            options |= {"sort_by": sort_by, "sort_order": sort_order}
        request = {"table_name": name, "offset": offset, "limit": limit, "encoding": self.encoding, "options": options}

        def read(response: dict[str, Any]) -> RecordPage:
            type_schema = _string(response["type_schema"])
            codec = RecordCodec.for_schema(type_schema) if type_schema else expected
            if self.encoding == "json":
                records = [codec.from_json(text) for text in response["records_json"]]
            else:
                binary = response["records_binary"]
                records = codec.decode_all(binary) or [codec.decode(data) for data in binary]
            total = _integer(response["total_number_of_records"])
            return RecordPage(records, total, _boolean(response["has_more_records"]), codec.type_schema)

        return self._call("/get/records", request, read, table=name)

    def delete_records(self, name: str, expressions: Sequence[str]) -> int:
        """Delete the records of table ``name`` matching any of ``expressions``; the count deleted.

        An empty expression is refused rather than sent (it must never mean "every row").
        """
        if isinstance(expressions, str):
            raise TypeError("expressions must be a list of expressions, not one string")
        if not all(isinstance(e, str) and e.strip() for e in expressions):
            raise ValueError("delete_records needs non-empty expressions")
        if not expressions:
            return 0
        request = {"table_name": name, "expressions": list(expressions), "options": {}}
        return self._call("/delete/records", request, lambda r: _integer(r["count_deleted"]), table=name)

    def clear_table(self, name: str, *, no_error_if_not_exists: bool = True) -> None:
        """Drop table ``name`` (by default, quietly when it does not exist)."""
        options = _options({"no_error_if_not_exists": no_error_if_not_exists})
        request = {"table_name": name, "authorization": "", "options": options}
        self._call("/clear/table", request, _ignore, table=name)

    def create_table_monitor(self, name: str, event: MonitorEvent, *, monitor_id: str | None = None) -> TableMonitor:
        """Ask the server to publish ``event`` s of table ``name`` on its ZMQ port.

        ``monitor_id`` chooses the topic id (the server picks one otherwise). Subscribe to
        ``topic_id`` at :meth:`monitor_address`; clear it with :meth:`clear_table_monitor`.
        """
        if event not in ("insert", "update", "delete"):
            raise ValueError(f"event must be 'insert', 'update' or 'delete', not {event!r}")
        options = {"event": event} | ({"monitor_id": monitor_id} if monitor_id else {})
        return self._call("/create/tablemonitor", {"table_name": name, "options": options}, _table_monitor, table=name)

    def clear_table_monitor(self, topic_id: str) -> None:
        """Stop the table monitor publishing on ``topic_id``."""
        self._call("/clear/tablemonitor", {"topic_id": topic_id, "options": {}}, _ignore)

    # -- lifecycle --------------------------------------------------------------------------
    def close(self) -> None:
        """Close the HTTP sessions this client opened (not one passed in)."""
        with self._lock:
            sessions, self._sessions = self._sessions, []
            self._local = threading.local()
        for session in sessions:
            session.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"KineticaClient({self.uri.redacted!r}, encoding={self.encoding!r})"

    # -- transport --------------------------------------------------------------------------
    def _call(
        self, endpoint: str, request: dict[str, Any], read: Callable[[dict[str, Any]], T], *, table: str | None = None
    ) -> T:
        """Send ``request`` to the current head, moving round the ring on transient errors;
        ``read`` turns the response into the result (what it raises on a malformed response
        becomes a :class:`KineticaProtocolError`)."""
        body = encode_request(endpoint, request, self.encoding)
        heads = self.uri.heads
        start = self._head_index
        tried: list[str] = []
        for step in range(len(heads)):
            index = (start + step) % len(heads)
            try:
                response = self._post(heads[index], endpoint, body, table)
            except KineticaUnavailableError as exc:
                tried.append(heads[index])
                if len(tried) == len(heads):
                    if len(heads) == 1:
                        raise
                    raise KineticaUnavailableError(
                        f"{exc} (every head tried: {', '.join(tried)})", table=table
                    ) from None
                self._move_off(index, exc)
                continue
            with _decoding(endpoint, table):
                return read(response)
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises

    def _move_off(self, index: int, exc: BaseException) -> None:
        """Make the head after ``index`` current, unless another thread already moved."""
        with self._lock:
            if self._head_index != index:
                return
            self._head_index = (index + 1) % len(self.uri.heads)
            self._head_changes += 1
        log.warning("Kinetica head %s unreachable (%s); moving to %s", self.uri.heads[index], exc, self.current_head)

    def _session(self) -> requests.Session:
        if self._shared_session is not None:
            return self._shared_session
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            with self._lock:
                self._sessions.append(session)
            self._local.session = session
        return session

    def _post(self, head: str, endpoint: str, body: bytes, table: str | None) -> dict[str, Any]:
        where = f"Kinetica {endpoint} at {head}"
        try:
            reply = self._session().post(head + endpoint, data=body, headers=self._headers, timeout=self.uri.timeout)
            content = reply.content
        except requests.exceptions.SSLError as exc:
            raise KineticaAuthError(self._scrub(f"{where}: TLS handshake failed: {exc}"), table=table) from None
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as exc:
            raise KineticaUnavailableError(self._scrub(f"{where}: {_describe(exc)}"), table=table) from None
        except requests.RequestException as exc:
            raise BackendError(self._scrub(f"{where}: {_describe(exc)}"), table=table) from None
        if reply.status_code == 401:
            raise KineticaAuthError(f"{where}: credentials refused for {self.uri.redacted}", table=table)
        if reply.status_code in _FAILOVER_HTTP_STATUSES:
            raise KineticaUnavailableError(f"{where}: HTTP {reply.status_code} {reply.reason}", table=table)
        try:
            status, message, response = decode_response(endpoint, content, self.encoding)
        except KineticaProtocolError as exc:
            raise KineticaProtocolError(
                self._scrub(f"{exc} (from {head}, HTTP {reply.status_code})"), endpoint=endpoint, table=table
            ) from None
        if status != "OK":
            message = self._scrub(message)
            if any(marker in message for marker in _FAILOVER_MESSAGES):
                raise KineticaUnavailableError(f"{where}: {message}", table=table)
            raise KineticaError(endpoint, message, table=table)
        return response

    def _scrub(self, text: str) -> str:
        """``text`` without the password, whatever the server or a library put in it."""
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text


def _secret_forms(password: str) -> tuple[str, ...]:
    """The password as it could appear in text: plain and percent-encoded.

    Passwords shorter than 4 characters are not scrubbed from server text: they would mangle
    every message, and the client itself never writes them anywhere.
    """
    if len(password) < 4:
        return ()
    return tuple(dict.fromkeys((password, quote(password, safe=""), quote(password))))


def _codec(schema: str | RecordCodec) -> RecordCodec:
    return schema if isinstance(schema, RecordCodec) else RecordCodec.for_schema(schema)


# Readers of responses: each raises on a malformed value (``_call`` reports it as a
# KineticaProtocolError), so nothing the server sent is taken on trust.


def _ignore(response: dict[str, Any]) -> None:
    return None


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"expected a boolean, got {type(value).__name__}")
    return value


def _integer(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"expected an integer, got {type(value).__name__}")
    return value


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    return value


def _string_map(value: Any) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise TypeError("expected a map of strings")
    return dict(value)


def _properties(value: Any) -> dict[str, tuple[str, ...]]:
    if not isinstance(value, dict):
        raise TypeError("expected a map of column properties")
    return {_string(column): tuple(_string(p) for p in values) for column, values in value.items()}


def _table_description(name: str, response: dict[str, Any]) -> TableDescription:
    type_schema = _string(response["type_schemas"][0])
    columns = RecordCodec.for_schema(type_schema).columns
    properties = _properties(response["properties"][0]) if response["properties"] else {}
    return TableDescription(
        name=_string(response["table_names"][0]) if response["table_names"] else name,
        type_id=_string(response["type_ids"][0]),
        type_schema=type_schema,
        columns=columns,
        properties=properties,
        primary_key=tuple(c for c in columns if "primary_key" in properties.get(c, ())),
        size=_integer(response["sizes"][0]) if response["sizes"] else 0,
    )


def _type_descriptions(response: dict[str, Any]) -> list[TypeDescription]:
    rows = zip(response["type_ids"], response["type_schemas"], response["labels"], response["properties"], strict=True)
    return [
        TypeDescription(_string(type_id), _string(schema), _string(label), _properties(properties))
        for type_id, schema, label, properties in rows
    ]


def _table_monitor(response: dict[str, Any]) -> TableMonitor:
    return TableMonitor(_string(response["topic_id"]), _string(response["type_schema"]), _string_map(response["info"]))

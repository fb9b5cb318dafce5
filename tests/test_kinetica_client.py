"""The Kinetica REST client: URIs, expressions, records, envelopes, errors and failover.

The first part needs no server: pure functions, then a scripted HTTP head (a tiny local
server answering what each test tells it) for the error paths a real server cannot be made
to produce on demand. The request and response schemas are checked against the ones the
official ``gpudb`` client embeds.
"""

from __future__ import annotations

import base64
import http.server
import inspect
import io
import json
import logging
import math
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote

import fastavro
import pytest

from reactive.backends.kinetica import client as kc
from reactive.backends.kinetica.client import (
    KineticaAuthError,
    KineticaClient,
    KineticaError,
    KineticaProtocolError,
    KineticaUnavailableError,
    KineticaURI,
    RecordCodec,
    equals_expression,
    in_expression,
    is_transient,
    quote_identifier,
    quote_literal,
    record_type_schema,
)
from reactive.errors import BackendError, ConfigurationError

PASSWORD = "p/ss@wörd:ü?#x"
USER = "ál ice"
SECRET_URI = f"kinetica://{quote(USER, safe='')}:{quote(PASSWORD, safe='')}@h1:9191"


def assert_no_password(text: str) -> None:
    for form in (PASSWORD, quote(PASSWORD, safe=""), quote(PASSWORD), "wörd", "w%C3%B6rd"):
        assert form not in text, text


# -- URIs ------------------------------------------------------------------------------------


def test_uri_single_head_defaults() -> None:
    uri = KineticaURI.parse("kinetica://db.example.com:9191")
    assert uri.heads == ("http://db.example.com:9191",)
    assert (uri.username, uri.password) == ("", "")
    assert uri.monitor_port == 9002
    assert uri.timeout == kc.DEFAULT_TIMEOUT
    assert KineticaURI.parse("kinetica://db").heads == ("http://db:9191",)


def test_uri_https_keeps_path_prefix() -> None:
    uri = KineticaURI.parse("kinetica+https://db.example.com:8082/gpudb-0")
    assert uri.heads == ("https://db.example.com:8082/gpudb-0",)
    assert KineticaURI.parse("kinetica+https://db:8082/gpudb-0/").heads == ("https://db:8082/gpudb-0",)


def test_uri_credentials_are_percent_decoded() -> None:
    uri = KineticaURI.parse(SECRET_URI)
    assert (uri.username, uri.password) == (USER, PASSWORD)
    assert uri.heads == ("http://h1:9191",)
    assert uri.redacted == f"kinetica://{quote(USER, safe='')}:***@h1:9191"
    assert_no_password(repr(uri))
    assert_no_password(str(uri))


def test_uri_ring_of_heads_and_options() -> None:
    uri = KineticaURI.parse("kinetica://u:p@h1:9191,h2:9292,[::1]:9393?monitor_port=9005&timeout=2.5")
    assert uri.heads == ("http://h1:9191", "http://h2:9292", "http://[::1]:9393")
    assert (uri.monitor_port, uri.timeout) == (9005, 2.5)


def test_uri_built_directly_gets_a_redacted_form() -> None:
    uri = KineticaURI(heads=("https://a:1/gpudb-0", "https://b:2/gpudb-0"), username="u", password=PASSWORD)
    assert uri.redacted == "kinetica+https://u:***@a:1,b:2/gpudb-0"
    assert_no_password(repr(uri))
    with pytest.raises(ConfigurationError):
        KineticaURI(heads=())


@pytest.mark.parametrize(
    ("uri", "why"),
    [
        ("kinetica://u:secretpw@host:99999", "bad port"),
        ("kinetica://u:secretpw@host:abc", "bad port"),
        ("kinetica://u:secretpw@:9191", "bad port|no host|bad host"),
        ("kinetica://u:secretpw@", "no host"),
        ("kinetica://u:secretpw@h1:9191,", "no host"),
        ("kinetica://u:secretpw@host:9191?monitor_port=x", "monitor_port"),
        ("kinetica://u:secretpw@host:9191?monitor_port=0", "monitor_port"),
        ("kinetica://u:secretpw@host:9191?timeout=-1", "timeout"),
        ("kinetica://u:secretpw@host:9191?timeout=nan", "timeout"),
        ("kinetica://u:secretpw@host:9191?colour=blue", "unknown option 'colour'"),
        ("kinetica://u:secretpw@host:9191?timeout=1&timeout=2", "given twice"),
        ("kinetica://u:secret/pw@host:9191", "percent-encode"),
        ("kinetica://u:secret@pw@host:9191", "percent-encode"),
        ("kinetica://u:secretpw@host:9191#frag", "fragment"),
        ("kinetica://u:secretpw@ho st:9191", "bad host"),
        ("postgres://u:secretpw@host:9191", "scheme"),
        ("u:secretpw@host:9191", "scheme"),
    ],
)
def test_invalid_uris_are_configuration_errors_without_the_password(uri: str, why: str) -> None:
    with pytest.raises(ConfigurationError, match=why) as info:
        KineticaURI.parse(uri)
    assert "secret" not in str(info.value)
    assert "pw" not in str(info.value).replace("pwd", "")
    assert "***" in str(info.value)


def test_password_like_query_values_are_hidden() -> None:
    with pytest.raises(ConfigurationError, match="unknown option 'password'") as info:
        KineticaURI.parse("kinetica://host:9191?password=hunter22")
    assert "hunter22" not in str(info.value)


@pytest.mark.parametrize(
    "raw",
    ["kinetica://u:se/cr@et@host:9191", "kinetica://u:p@ss@host:9191,h2:9191", "kinetica://u:a?b#c@host:9191"],
)
def test_redaction_hides_a_password_that_was_not_percent_encoded(raw: str) -> None:
    shown = kc.redact(raw)
    assert shown.startswith("kinetica://u:***@host:9191")
    assert not any(part in shown for part in ("se/cr", "p@ss", "a?b"))


# -- expressions -----------------------------------------------------------------------------

HOSTILE = ['a "quoted" name', "it's", "semi; drop table x; --", "spa ce", "ünï©ødé 😀", "'", '"', "a''b", "x\\y"]


@pytest.mark.parametrize("name", HOSTILE)
def test_quote_identifier_round_trips(name: str) -> None:
    quoted = quote_identifier(name)
    assert quoted.startswith('"') and quoted.endswith('"')
    assert quoted[1:-1].replace('""', '"') == name
    assert '"' not in quoted[1:-1].replace('""', "")


@pytest.mark.parametrize("value", HOSTILE)
def test_quote_literal_round_trips_strings(value: str) -> None:
    quoted = quote_literal(value)
    assert quoted[0] == quoted[-1] == "'"
    assert quoted[1:-1].replace("''", "'") == value
    assert "'" not in quoted[1:-1].replace("''", "")


def test_quote_literal_numbers_and_refusals() -> None:
    assert quote_literal(-3) == "-3"
    assert quote_literal(2**62) == str(2**62)
    assert float(quote_literal(1 / 3)) == 1 / 3
    assert float(quote_literal(1e300)) == 1e300
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError):
            quote_literal(bad)
    with pytest.raises(ValueError, match="is null"):
        quote_literal(None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="int"):
        quote_literal(True)
    with pytest.raises(TypeError):
        quote_literal(b"x")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        quote_identifier("")


def test_in_and_equals_expressions() -> None:
    assert in_expression('we"ird', ["a'b", 1, 2.5]) == "\"we\"\"ird\" in ('a''b', 1, 2.5)"
    assert equals_expression("k", "ü") == "\"k\" = 'ü'"
    assert equals_expression("k", None) == '"k" is null'
    with pytest.raises(ValueError):
        in_expression("k", [])
    with pytest.raises(ValueError):
        in_expression("k", "abc")  # type: ignore[arg-type]


# -- records ---------------------------------------------------------------------------------

ALL_TYPES = [(f"{t}_{'null' if n else 'req'}", t, n) for t in sorted(kc.COLUMN_TYPES) for n in (False, True)]
FULL_ROW = {
    "int_req": -(2**31),
    "int_null": None,
    "long_req": 2**62,
    "long_null": 5,
    "float_req": 1.5,
    "float_null": None,
    "double_req": 1 / 3,
    "double_null": -0.0,
    "string_req": "ünï'\"; 😀",
    "string_null": None,
    "bytes_req": bytes(range(256)),
    "bytes_null": b"",
}


def test_record_type_schema_is_what_kinetica_expects() -> None:
    schema = json.loads(record_type_schema("t", ALL_TYPES))
    assert schema["type"] == "record"
    assert {f["name"]: f["type"] for f in schema["fields"]}["long_null"] == ["long", "null"]
    with pytest.raises(ValueError, match="boolean"):
        record_type_schema("t", [("x", "boolean", False)])
    with pytest.raises(ValueError):
        record_type_schema("t", [])


def test_codec_round_trips_every_column_type() -> None:
    codec = RecordCodec(record_type_schema("t", ALL_TYPES))
    assert codec.columns == tuple(c for c, _, _ in ALL_TYPES)
    data = codec.encode(FULL_ROW)
    assert codec.decode(data) == FULL_ROW
    # the same bytes as fastavro straight from the schema: plain schemaless Avro
    reference = io.BytesIO()
    fastavro.schemaless_writer(reference, fastavro.parse_schema(json.loads(codec.type_schema)), FULL_ROW)
    assert data == reference.getvalue()
    assert codec.from_json(codec.to_json(FULL_ROW)) == FULL_ROW


def test_codec_hostile_column_names() -> None:
    columns = [(name, "string", True) for name in ("spa ce", "ünï", 'q"uote', "semi;colon")]
    codec = RecordCodec(record_type_schema("t", columns))
    row = {name: name * 2 for name, _, _ in columns}
    assert codec.decode(codec.encode(row)) == row


def test_codec_missing_nullable_column_is_null_and_errors_are_clear() -> None:
    codec = RecordCodec(record_type_schema("t", [("id", "long", False), ("text", "string", True)]))
    assert codec.decode(codec.encode({"id": 1})) == {"id": 1, "text": None}
    with pytest.raises(ValueError, match="not in type"):
        codec.encode({"id": 1, "typo": "x"})
    with pytest.raises(ValueError, match="does not fit"):
        codec.encode({"id": "one"})
    with pytest.raises(ValueError, match="not in type"):
        codec.to_json({"id": 1, "typo": "x"})


def test_codec_decode_is_strict() -> None:
    narrow = RecordCodec(record_type_schema("t", [("id", "long", False)]))
    wide = RecordCodec(record_type_schema("t", [("id", "long", False), ("text", "string", False)]))
    altered = wide.encode({"id": 1, "text": "new column"})
    with pytest.raises(KineticaProtocolError, match="left over"):
        narrow.decode(altered)
    with pytest.raises(KineticaProtocolError, match="does not decode"):
        wide.decode(altered[:-3])
    with pytest.raises(KineticaProtocolError, match="does not decode"):
        wide.from_json("{not json")
    with pytest.raises(KineticaProtocolError, match="not a Kinetica type schema"):
        RecordCodec('{"type": "map", "values": "string"}')
    with pytest.raises(KineticaProtocolError):
        RecordCodec("not json")


def test_codec_is_cached_per_schema() -> None:
    schema = record_type_schema("t", [("id", "long", False)])
    assert RecordCodec.for_schema(schema) is RecordCodec.for_schema(schema)


def test_codec_decodes_fast_enough_for_monitor_frames() -> None:
    codec = RecordCodec(
        record_type_schema("docs", [("id", "long", False), ("text", "string", True), ("score", "double", True)])
    )
    frames = [codec.encode({"id": i, "text": f"document number {i}", "score": i / 7}) for i in range(20_000)]
    started = time.perf_counter()
    for frame in frames:
        codec.decode(frame)
    rate = len(frames) / (time.perf_counter() - started)
    assert rate > 50_000, f"{rate:,.0f} records/s"  # about 400k/s here; the bar leaves room for slow CI


# -- envelopes, against the official client's schemas ----------------------------------------


def official_schemas() -> dict[str, tuple[dict, dict]]:
    """Endpoint -> (request schema, response schema), read from the installed gpudb.py."""
    import gpudb

    source = inspect.getsource(gpudb.gpudb)
    found: dict[str, tuple[dict, dict]] = {}
    pattern = r'name = "(/[^"]+)"\s+REQ_SCHEMA_STR = """(.*?)"""\s+RSP_SCHEMA_STR = """(.*?)"""'
    for endpoint, request, response in re.findall(pattern, source):
        found[endpoint] = (json.loads(request), json.loads(response))
    envelope = re.search(r'RSP_SCHEMA_STR = """(\{"type":"record","name":"gpudb_response".*?)"""', source)
    assert envelope is not None
    found["gpudb_response"] = ({}, json.loads(envelope.group(1)))
    return found


OFFICIAL = official_schemas()


@pytest.mark.parametrize("endpoint", sorted(kc._ENDPOINTS))
def test_schemas_match_the_official_client(endpoint: str) -> None:
    request, response = OFFICIAL[endpoint]
    spec = kc._ENDPOINTS[endpoint]
    assert fastavro.parse_schema(request) == spec.request
    assert fastavro.parse_schema(response) == spec.response


def test_the_client_calls_only_its_fourteen_endpoints() -> None:
    assert len(kc._ENDPOINTS) == 14
    source = inspect.getsource(KineticaClient)
    called = set(re.findall(r'self\._call\(\s*"(/[^"]+)"', source))
    assert called == set(kc._ENDPOINTS)
    for endpoint in called:
        assert endpoint in kc.__doc__


def avro(schema: dict, record: dict) -> bytes:
    stream = io.BytesIO()
    fastavro.schemaless_writer(stream, fastavro.parse_schema(schema), record)
    return stream.getvalue()


def envelope(endpoint: str, response: dict | None, encoding: str = "binary", *, message: str = "") -> bytes:
    """A server's reply, built with the official schemas: OK with ``response``, or ERROR."""
    wrapper = OFFICIAL["gpudb_response"][1]
    response_schema = OFFICIAL[endpoint][1]
    if response is None:
        record = {"status": "ERROR", "message": message, "data_type": "none", "data": b"", "data_str": ""}
    elif encoding == "json":
        name = response_schema["name"]
        record = {"status": "OK", "message": "", "data_type": name, "data": b"", "data_str": json.dumps(response)}
    else:
        name = response_schema["name"]
        record = {"status": "OK", "message": "", "data_type": name, "data": avro(response_schema, response)}
        record["data_str"] = ""
    if encoding == "json":
        return json.dumps(record | {"data": ""}).encode()
    return avro(wrapper, record)


def test_request_encoding_matches_the_official_schema() -> None:
    request = {"table_name": "t", "offset": 5, "limit": -9999, "encoding": "binary", "options": {"expression": "x"}}
    body = kc.encode_request("/get/records", request, "binary")
    official = fastavro.parse_schema(OFFICIAL["/get/records"][0])
    assert fastavro.schemaless_reader(io.BytesIO(body), official, None) == request
    assert json.loads(kc.encode_request("/get/records", request, "json")) == request
    assert list(json.loads(kc.encode_request("/get/records", request, "json"))) == list(request)


@pytest.mark.parametrize("encoding", ["binary", "json"])
def test_decode_response_ok_and_error(encoding: str) -> None:
    ok = envelope("/has/table", {"table_name": "t", "table_exists": True, "info": {}}, encoding)
    assert kc.decode_response("/has/table", ok, encoding) == (
        "OK",
        "",
        {"table_name": "t", "table_exists": True, "info": {}},
    )
    error = envelope("/has/table", None, encoding, message="nope")
    assert kc.decode_response("/has/table", error, encoding) == ("ERROR", "nope", {})


@pytest.mark.parametrize(
    ("encoding", "body"),
    [
        ("binary", b"<html>502 Bad Gateway</html>"),
        ("binary", b""),
        ("binary", b"\x04OK"),
        ("json", b"<html>"),
        ("json", b"[1, 2]"),
        ("json", b'{"status": "OK", "message": ""}'),
        ("json", b'{"status": "OK", "message": "", "data_type": "x", "data": "", "data_str": "{}"}'),
        ("json", b'{"status": 1, "message": "", "data_type": "x", "data": "", "data_str": "{}"}'),
    ],
)
def test_malformed_envelopes_are_protocol_errors(encoding: str, body: bytes) -> None:
    with pytest.raises(KineticaProtocolError, match="/has/table") as info:
        kc.decode_response("/has/table", body, encoding)
    assert info.value.endpoint == "/has/table"
    assert info.value.__suppress_context__


def test_options_are_strings() -> None:
    assert kc._options({"a": True, "b": False, "c": 3, "d": "x"}) == {"a": "true", "b": "false", "c": "3", "d": "x"}
    with pytest.raises(TypeError):
        kc._options({"a": None})


# -- errors ----------------------------------------------------------------------------------


def test_error_classes_and_is_transient() -> None:
    for cls in (KineticaAuthError, KineticaUnavailableError, KineticaProtocolError):
        assert issubclass(cls, BackendError)
    assert issubclass(KineticaError, BackendError)
    error = KineticaError("/has/table", "Table 'x' does not exist", table="x")
    assert "/has/table" in str(error) and "does not exist" in str(error)
    assert (error.endpoint, error.server_message, error.table) == ("/has/table", "Table 'x' does not exist", "x")
    assert is_transient(KineticaUnavailableError("down"))
    assert is_transient(ConnectionResetError())
    import requests

    assert is_transient(requests.ConnectionError())
    assert is_transient(requests.Timeout())
    assert not is_transient(requests.exceptions.SSLError())
    for permanent in (error, KineticaAuthError("x"), KineticaProtocolError("x"), ValueError(), KeyError()):
        assert not is_transient(permanent)


# -- a scripted head -------------------------------------------------------------------------

Reply = tuple[int, bytes] | Callable[[str, bytes], tuple[int, bytes]]


class ScriptedHead:
    """A local HTTP server standing in for one Kinetica head: it answers ``replies`` in order
    (then ``default``) and records every request. A reply is ``(status, body)`` or a function
    of ``(path, body)`` returning one."""

    def __init__(self, default: Reply = (503, b"")) -> None:
        self.replies: list[Reply] = []
        self.default = default
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        head = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            wbufsize = -1  # headers and body in one segment: no delayed-ACK stall per call

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                head.requests.append((self.path, dict(self.headers), body))
                reply = head.replies.pop(0) if head.replies else head.default
                status, payload = reply(self.path, body) if callable(reply) else reply
                self.send_response(status)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(
            target=self.server.serve_forever, args=(0.05,), name="scripted-kinetica-head", daemon=True
        )
        self.thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def heads() -> Iterator[Callable[..., ScriptedHead]]:
    started: list[ScriptedHead] = []

    def make(default: Reply = (503, b"")) -> ScriptedHead:
        started.append(ScriptedHead(default))
        return started[-1]

    yield make
    for head in started:
        head.stop()
    assert not any(head.thread.is_alive() for head in started)


def has_table_reply(exists: bool = True, encoding: str = "binary") -> tuple[int, bytes]:
    return 200, envelope("/has/table", {"table_name": "t", "table_exists": exists, "info": {}}, encoding)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("encoding", ["binary", "json"])
def test_scripted_call_sends_the_official_request(heads, encoding: str) -> None:
    head = heads(has_table_reply(True, encoding))
    with KineticaClient(f"kinetica://{head.address}", encoding=encoding) as client:
        assert client.has_table("t") is True
    path, headers, body = head.requests[0]
    assert path == "/has/table"
    content_type = "application/json" if encoding == "json" else "application/octet-stream"
    assert headers["Content-Type"] == headers["Accept"] == content_type
    assert "Authorization" not in headers
    if encoding == "binary":
        official = fastavro.parse_schema(OFFICIAL["/has/table"][0])
        assert fastavro.schemaless_reader(io.BytesIO(body), official, None) == {"table_name": "t", "options": {}}
    else:
        assert json.loads(body) == {"table_name": "t", "options": {}}


def test_basic_auth_is_utf8_and_the_path_prefix_is_kept(heads) -> None:
    head = heads(has_table_reply())
    uri = f"kinetica://{quote(USER, safe='')}:{quote(PASSWORD, safe='')}@{head.address}/gpudb-0"
    with KineticaClient(uri) as client:
        client.has_table("t")
    path, headers, _ = head.requests[0]
    assert path == "/gpudb-0/has/table"
    scheme, token = headers["Authorization"].split(" ")
    assert scheme == "Basic"
    assert base64.b64decode(token).decode() == f"{USER}:{PASSWORD}"


def test_error_status_is_a_kinetica_error(heads) -> None:
    head = heads((400, envelope("/has/table", None, message="Invalid table name: 'x y'")))
    with KineticaClient(f"kinetica://{head.address}") as client, pytest.raises(KineticaError) as info:
        client.has_table("x y")
    assert info.value.endpoint == "/has/table"
    assert info.value.table == "x y"
    assert "Invalid table name" in str(info.value)
    assert not is_transient(info.value)


@pytest.mark.parametrize(
    "message",
    [
        "Kinetica is exiting",
        "Kinetica is offline",
        "Connection refused by rank 1",
        "Connection reset by peer",
        "system-limited-fatal: out of memory",
        "System shutting down",
        "Unavailable: Draining HA queue",
    ],
)
def test_failover_messages_are_unavailable(heads, message: str) -> None:
    head = heads((200, envelope("/has/table", None, message=message)))
    with KineticaClient(f"kinetica://{head.address}") as client, pytest.raises(KineticaUnavailableError) as info:
        client.has_table("t")
    assert message in str(info.value)
    assert is_transient(info.value)


@pytest.mark.parametrize("status", [404, 500, 502, 503, 504])
def test_failover_http_statuses_are_unavailable(heads, status: int) -> None:
    head = heads((status, b"whatever"))
    with KineticaClient(f"kinetica://{head.address}") as client, pytest.raises(KineticaUnavailableError) as info:
        client.has_table("t")
    assert str(status) in str(info.value)
    assert is_transient(info.value)


def test_refused_connection_is_unavailable() -> None:
    with KineticaClient(f"kinetica://127.0.0.1:{free_port()}") as client:
        with pytest.raises(KineticaUnavailableError, match="Connection refused") as info:
            client.show_system_status()
        assert is_transient(info.value)
        assert client.head_changes == 0


def test_timeout_is_unavailable(heads) -> None:
    def slow(path: str, body: bytes) -> tuple[int, bytes]:
        time.sleep(0.5)
        return has_table_reply()

    head = heads(slow)
    client = KineticaClient(f"kinetica://{head.address}?timeout=0.1")
    with client, pytest.raises(KineticaUnavailableError, match="Timeout"):
        client.has_table("t")


def test_unauthorized_names_the_redacted_uri_never_the_password(heads, caplog) -> None:
    head = heads((401, b"Unauthorized"))
    uri = f"kinetica://{quote(USER, safe='')}:{quote(PASSWORD, safe='')}@{head.address}"
    caplog.set_level(logging.DEBUG)
    with KineticaClient(uri) as client:
        with pytest.raises(KineticaAuthError) as info:
            client.has_table("t")
        assert f"credentials refused for kinetica://{quote(USER, safe='')}:***@{head.address}" in str(info.value)
        assert not is_transient(info.value)
        assert_no_password(str(info.value))
        assert_no_password(repr(info.value))
        assert_no_password(repr(client))
        assert_no_password(repr(client.uri))
    assert_no_password(caplog.text)


def test_a_server_message_echoing_the_password_is_scrubbed(heads) -> None:
    head = heads((400, envelope("/has/table", None, message=f"bad login {PASSWORD} / {quote(PASSWORD, safe='')}")))
    uri = f"kinetica://u:{quote(PASSWORD, safe='')}@{head.address}"
    with KineticaClient(uri) as client, pytest.raises(KineticaError) as info:
        client.has_table("t")
    assert_no_password(str(info.value))
    assert "bad login ***" in str(info.value)


@pytest.mark.parametrize("encoding", ["binary", "json"])
def test_garbage_body_is_a_protocol_error(heads, encoding: str) -> None:
    head = heads((200, b"\xff\xfe garbage \x00"))
    client = KineticaClient(f"kinetica://{head.address}", encoding=encoding)
    with client, pytest.raises(KineticaProtocolError, match="/has/table") as info:
        client.has_table("t")
    assert info.value.endpoint == "/has/table"
    assert info.value.__suppress_context__
    assert not is_transient(info.value)


def test_wrongly_typed_fields_are_protocol_errors(heads) -> None:
    bad = {"status": "OK", "message": "", "data_type": "x", "data": "", "data_str": '{"table_name": "t"}'}
    head = heads((200, json.dumps(bad).encode()))
    with KineticaClient(f"kinetica://{head.address}", encoding="json") as client:
        with pytest.raises(KineticaProtocolError, match="lacks table_exists"):
            client.has_table("t")
        bad["data_str"] = json.dumps({"table_name": "t", "table_exists": "yes", "info": {}})
        head.default = (200, json.dumps(bad).encode())
        with pytest.raises(KineticaProtocolError, match="expected a boolean"):
            client.has_table("t")
        bad["data_str"] = json.dumps({"status_map": ["not", "a", "map"], "info": {}})
        head.default = (200, json.dumps(bad).encode())
        with pytest.raises(KineticaProtocolError, match="/show/system/status"):
            client.show_system_status()


def test_records_that_do_not_decode_are_protocol_errors(heads) -> None:
    schema = record_type_schema("t", [("id", "long", False), ("text", "string", False)])
    response = {
        "table_name": "t",
        "type_name": "x",
        "type_schema": schema,
        "records_binary": [b"\x02"],
        "records_json": [],
        "total_number_of_records": 1,
        "has_more_records": False,
        "info": {},
    }
    head = heads((200, envelope("/get/records", response)))
    client = KineticaClient(f"kinetica://{head.address}")
    with client, pytest.raises(KineticaProtocolError, match="does not decode") as info:
        client.get_records("t", schema)
    assert info.value.table == "t"


def test_ring_fails_over_to_the_next_head(heads, caplog) -> None:
    first, second = heads((503, b"")), heads(has_table_reply())
    uri = f"kinetica://u:{quote(PASSWORD, safe='')}@{first.address},{second.address}"
    with KineticaClient(uri) as client:
        assert client.current_head == f"http://{first.address}"
        assert client.has_table("t") is True
        assert (client.current_head, client.head_changes) == (f"http://{second.address}", 1)
        assert client.monitor_address() == "tcp://127.0.0.1:9002"
        client.has_table("t")
        assert client.head_changes == 1
    assert len(first.requests) == 1 and len(second.requests) == 2
    assert "moving to" in caplog.text
    assert_no_password(caplog.text)


def test_ring_with_every_head_down_tries_each_once() -> None:
    dead = [f"127.0.0.1:{free_port()}" for _ in range(3)]
    with KineticaClient(f"kinetica://{','.join(dead)}") as client:
        with pytest.raises(KineticaUnavailableError, match="every head tried") as info:
            client.has_table("t")
        assert is_transient(info.value)
        assert all(address in str(info.value) for address in dead)
        assert client.head_changes == 2


def test_ring_does_not_fail_over_on_a_refused_request(heads) -> None:
    first = heads((400, envelope("/has/table", None, message="no")))
    second = heads(has_table_reply())
    with KineticaClient(f"kinetica://{first.address},{second.address}") as client:
        with pytest.raises(KineticaError):
            client.has_table("t")
        assert client.head_changes == 0
    assert not second.requests


def test_concurrent_calls_each_thread_its_own_session(heads) -> None:
    head = heads(has_table_reply())
    results: list[bool] = []
    with KineticaClient(f"kinetica://{head.address}") as client:

        def work() -> None:
            for _ in range(20):
                results.append(client.has_table("t"))

        threads = [threading.Thread(target=work, name=f"kinetica-client-test-{i}") for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert len(client._sessions) == 8
    assert results == [True] * 160
    assert client._sessions == []


def test_a_session_passed_in_is_used_and_not_closed(heads) -> None:
    import requests

    head = heads(has_table_reply())
    session = requests.Session()
    with KineticaClient(f"kinetica://{head.address}", session=session) as client:
        client.has_table("t")
        assert client._sessions == []
    session.close()


def test_argument_checks_send_nothing(heads) -> None:
    head = heads(has_table_reply())
    schema = record_type_schema("t", [("id", "long", False)])
    with KineticaClient(f"kinetica://{head.address}") as client:
        assert client.insert_records("t", [], schema) == (0, 0)
        assert client.delete_records("t", []) == 0
        with pytest.raises(ValueError):
            client.delete_records("t", [""])
        with pytest.raises(TypeError):
            client.delete_records("t", '"id" = 1')
        with pytest.raises(ValueError):
            client.create_table_monitor("t", "drop")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="not in type"):
            client.insert_records("t", [{"idx": 1}], schema)
    with pytest.raises(ConfigurationError):
        KineticaClient(f"kinetica://{head.address}", encoding="snappy")  # type: ignore[arg-type]
    assert not head.requests


# -- against the Kinetica test server ----------------------------------------------------------

HOSTILE_COLUMNS = [
    ("id", "long", False),
    ('we"ird; col', "string", True),
    ("ünï 😀", "double", True),
    ("raw bytes", "bytes", True),
    ("n", "int", True),
]
HOSTILE_TABLE = 't\'; drop "x" ünï 😀'
HOSTILE_ROWS = [
    {"id": 1, 'we"ird; col': 'it\'s; "quoted" -- ünï 😀', "ünï 😀": 0.5, "raw bytes": bytes(range(256)), "n": -7},
    {"id": 2, 'we"ird; col': "'; delete from t; --", "ünï 😀": None, "raw bytes": b"\x00", "n": None},
    {"id": 3, 'we"ird; col': None, "ünï 😀": -1e300, "raw bytes": None, "n": 2**31 - 1},
    {"id": 4, 'we"ird; col': "back\\slash and spaces  ", "ünï 😀": 1 / 3, "raw bytes": b"", "n": 0},
]


def kinetica_uri(*servers: Any, credentials: str = "", **query: Any) -> str:
    hosts = ",".join(server.url.split("://", 1)[1] for server in servers)
    options = "&".join(f"{key}={value}" for key, value in query.items())
    return f"kinetica://{credentials}{hosts}" + (f"?{options}" if options else "")


def make_table(client: KineticaClient, name: str = HOSTILE_TABLE) -> str:
    """Create ``name`` with the hostile columns; its type schema."""
    schema = record_type_schema("hostile", HOSTILE_COLUMNS)
    type_id = client.create_type(schema, "hostile label ü", {"id": ["primary_key"]})
    client.create_table(name, type_id, {"no_error_if_exists": True})
    return schema


@pytest.fixture(params=["binary", "json"])
def client(request: pytest.FixtureRequest, kinetica_server: Any) -> Iterator[KineticaClient]:
    uri = kinetica_uri(kinetica_server, monitor_port=kinetica_server.zmq_port)
    with KineticaClient(uri, encoding=request.param) as kinetica:
        yield kinetica


def test_system_endpoints(client: KineticaClient) -> None:
    status = client.show_system_status()
    assert json.loads(status["system"])["status"] == "running"
    properties = client.show_system_properties()
    assert properties["version.gpudb_core_version"].startswith("7.2")


def test_types_and_tables(client: KineticaClient, kinetica_server: Any) -> None:
    schema = record_type_schema("hostile", HOSTILE_COLUMNS)
    type_id = client.create_type(schema, "hostile label ü", {"id": ["primary_key"], "ünï 😀": ["store_only"]})
    assert client.has_type(type_id) and not client.has_type("404")
    [described] = client.show_types(type_id, "")
    assert (described.type_id, described.label) == (type_id, "hostile label ü")
    assert RecordCodec(described.type_schema).columns == RecordCodec(schema).columns
    assert "primary_key" in described.properties["id"]
    assert type_id in [t.type_id for t in client.show_types(label="hostile label ü")]

    assert not client.has_table(HOSTILE_TABLE)
    client.create_table(HOSTILE_TABLE, type_id)
    client.create_table(HOSTILE_TABLE, type_id, {"no_error_if_exists": True})
    with pytest.raises(KineticaError, match="already exists") as info:
        client.create_table(HOSTILE_TABLE, type_id)
    assert info.value.table == HOSTILE_TABLE
    assert client.has_table(HOSTILE_TABLE)
    table = client.show_table(HOSTILE_TABLE)
    assert table.name.endswith(HOSTILE_TABLE)  # Kinetica qualifies it with its schema
    assert (table.type_id, table.columns, table.primary_key, table.size) == (
        type_id,
        tuple(c for c, _, _ in HOSTILE_COLUMNS),
        ("id",),
        0,
    )
    assert "store_only" in table.properties["ünï 😀"]
    assert RecordCodec(table.type_schema).columns == table.columns

    client.clear_table(HOSTILE_TABLE)
    assert not client.has_table(HOSTILE_TABLE)
    client.clear_table(HOSTILE_TABLE)
    with pytest.raises(KineticaError, match="does not exist"):
        client.clear_table(HOSTILE_TABLE, no_error_if_not_exists=False)
    with pytest.raises(KineticaError, match="does not exist") as info:
        client.show_table(HOSTILE_TABLE)
    assert info.value.endpoint == "/show/table"


def test_hostile_rows_round_trip(client: KineticaClient, kinetica_server: Any) -> None:
    schema = make_table(client)
    assert client.insert_records(HOSTILE_TABLE, HOSTILE_ROWS, schema) == (4, 0)
    page = client.get_records(HOSTILE_TABLE, schema)
    assert page[:3] == (HOSTILE_ROWS, 4, False)
    assert page.type_schema == client.show_table(HOSTILE_TABLE).type_schema  # what the server said it is
    assert client.show_table(HOSTILE_TABLE).size == 4

    for row in HOSTILE_ROWS:
        for column in ('we"ird; col', "ünï 😀", "n", "id"):
            expression = equals_expression(column, row[column])
            matching = [r for r in HOSTILE_ROWS if r[column] == row[column]]
            assert client.get_records(HOSTILE_TABLE, schema, expression=expression).records == matching, expression

    texts = [r['we"ird; col'] for r in HOSTILE_ROWS if r['we"ird; col'] is not None]
    page = client.get_records(HOSTILE_TABLE, schema, expression=in_expression('we"ird; col', texts))
    assert [r["id"] for r in page.records] == [1, 2, 4]

    by_n = client.get_records(HOSTILE_TABLE, schema, sort_by="n", sort_order="descending")
    assert [r["id"] for r in by_n.records][:3] == [3, 4, 1]
    first = client.get_records(HOSTILE_TABLE, schema, limit=3, sort_by="id")
    rest = client.get_records(HOSTILE_TABLE, schema, offset=3, limit=3, sort_by="id")
    assert (first.total_number_of_records, first.has_more_records, rest.has_more_records) == (4, True, False)
    assert first.records + rest.records == HOSTILE_ROWS

    deleted = client.delete_records(HOSTILE_TABLE, [in_expression('we"ird; col', texts[:2]), equals_expression("n", 0)])
    assert deleted == 3
    assert client.get_records(HOSTILE_TABLE, schema).records == [HOSTILE_ROWS[2]]
    assert client.delete_records(HOSTILE_TABLE, [equals_expression("id", 99)]) == 0


def test_upsert_on_the_primary_key(client: KineticaClient) -> None:
    schema = make_table(client)
    client.insert_records(HOSTILE_TABLE, HOSTILE_ROWS[:2], schema)
    with pytest.raises(KineticaError, match="duplicate primary key"):
        client.insert_records(HOSTILE_TABLE, HOSTILE_ROWS[:1], schema)
    changed = {**HOSTILE_ROWS[0], "n": 42}
    assert client.insert_records(HOSTILE_TABLE, [changed], schema, update_on_existing_pk=True) == (0, 1)
    assert client.get_records(HOSTILE_TABLE, schema, expression=equals_expression("id", 1)).records == [changed]


def test_bad_expressions_are_kinetica_errors(client: KineticaClient) -> None:
    schema = make_table(client)
    with pytest.raises(KineticaError) as info:
        client.get_records(HOSTILE_TABLE, schema, expression="id = = 1")
    assert info.value.endpoint == "/get/records" and info.value.table == HOSTILE_TABLE
    with pytest.raises(KineticaError, match="unknown column"):
        client.delete_records(HOSTILE_TABLE, [equals_expression("nope", 1)])


def test_table_monitors_and_their_frames(client: KineticaClient, kinetica_server: Any) -> None:
    import zmq

    schema = make_table(client)
    monitor = client.create_table_monitor(HOSTILE_TABLE, "insert")
    assert kinetica_server.monitors()[monitor.topic_id][1] == "insert"
    assert RecordCodec(monitor.type_schema).columns == RecordCodec(schema).columns
    counts = client.create_table_monitor(HOSTILE_TABLE, "delete", monitor_id="my-delete-topic")
    assert counts.topic_id == "my-delete-topic"
    assert RecordCodec(counts.type_schema).columns == ("count",)

    context = zmq.Context()
    subscriber = context.socket(zmq.SUB)
    try:
        subscriber.connect(client.monitor_address())
        subscriber.setsockopt_string(zmq.SUBSCRIBE, monitor.topic_id)
        assert kinetica_server.wait_subscribed(monitor.topic_id)
        client.insert_records(HOSTILE_TABLE, HOSTILE_ROWS, schema)
        assert subscriber.poll(5000)
        topic, *frames = subscriber.recv_multipart()
        assert topic == monitor.topic_id.encode()
        codec = RecordCodec(client.show_table(HOSTILE_TABLE).type_schema)
        assert [codec.decode(frame) for frame in frames] == HOSTILE_ROWS
    finally:
        subscriber.close(linger=0)
        context.term()

    client.clear_table_monitor(monitor.topic_id)
    client.clear_table_monitor(counts.topic_id)
    assert kinetica_server.monitors() == {}
    with pytest.raises(KineticaError):
        client.clear_table_monitor(monitor.topic_id)


def test_server_error_and_failover_messages(client: KineticaClient, kinetica_server: Any) -> None:
    kinetica_server.fail_next("/has/table", "Insufficient permissions: user lacks table_read")
    with pytest.raises(KineticaError, match="Insufficient permissions") as info:
        client.has_table("t")
    assert not is_transient(info.value)
    kinetica_server.fail_next("/has/table", "Kinetica is exiting")
    with pytest.raises(KineticaUnavailableError) as unavailable:
        client.has_table("t")
    assert is_transient(unavailable.value)
    assert client.has_table("t") is False


def test_stopped_server_is_unavailable_then_back(kinetica_server: Any) -> None:
    with KineticaClient(kinetica_uri(kinetica_server)) as client:
        assert client.has_table("t") is False
        kinetica_server.stop()
        with pytest.raises(KineticaUnavailableError, match="Connection refused") as info:
            client.has_table("t")
        assert is_transient(info.value)
        kinetica_server.start()
        assert client.has_table("t") is False
        assert client.head_changes == 0


def test_failover_between_two_servers(kinetica_server: Any) -> None:
    from kinetica_server import KineticaTestServer

    with KineticaTestServer() as second, KineticaClient(kinetica_uri(kinetica_server, second)) as client:
        schema = make_table(client)  # on the first server only
        assert client.has_table(HOSTILE_TABLE)
        kinetica_server.stop()
        assert client.has_table(HOSTILE_TABLE) is False  # answered by the second server
        assert (client.current_head, client.head_changes) == (second.url, 1)
        make_table(client)
        assert client.insert_records(HOSTILE_TABLE, HOSTILE_ROWS, schema) == (4, 0)
        assert client.head_changes == 1
        second.stop()
        with pytest.raises(KineticaUnavailableError, match="every head tried"):
            client.has_table(HOSTILE_TABLE)
        kinetica_server.start()
        assert client.has_table(HOSTILE_TABLE)  # the first server kept its tables
        assert client.current_head == kinetica_server.url


@pytest.mark.parametrize("encoding", ["binary", "json"])
def test_credentials(encoding: str, caplog) -> None:
    from kinetica_server import KineticaTestServer

    caplog.set_level(logging.DEBUG)
    with KineticaTestServer(username=USER, password=PASSWORD) as server:
        right = f"{quote(USER, safe='')}:{quote(PASSWORD, safe='')}@"
        with KineticaClient(kinetica_uri(server, credentials=right), encoding=encoding) as client:
            assert client.has_table("t") is False
        wrong_password = PASSWORD[::-1]
        wrong = f"{quote(USER, safe='')}:{quote(wrong_password, safe='')}@"
        with KineticaClient(kinetica_uri(server, credentials=wrong), encoding=encoding) as client:
            with pytest.raises(KineticaAuthError, match="credentials refused for kinetica://") as info:
                client.has_table("t")
            assert not is_transient(info.value)
            for text in (str(info.value), repr(info.value), repr(client), caplog.text):
                assert wrong_password not in text
                assert quote(wrong_password, safe="") not in text
                assert_no_password(text)

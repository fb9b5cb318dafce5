"""How a row becomes a schemaless Avro record: the bytes ``INSERT_RAW`` callbacks receive.

Kinetica publishes inserted records as Avro in the table's type; the other backends have rows,
so :class:`~reactive.monitor.TableMonitor` writes them in a schema derived from the table:

- **SQL tables** (DuckDB, SQLite, PostgreSQL): one field per column, in column order, each a
  union ``[T, "null"]`` (Kinetica's way of writing a nullable column). ``T`` is ``boolean``,
  ``int`` (8 to 32-bit integers), ``long``, ``float``, ``double``, ``string``, ``bytes``,
  ``{"type": "long", "logicalType": "timestamp-micros"}``, ``{"type": "int", "logicalType":
  "date"}``, or an ``array`` of one of these; any other type (decimal, uuid, JSON, maps,
  structs, nested arrays) is ``string``, holding JSON text (:func:`~reactive.fingerprints.json_value`
  for what JSON cannot hold).
- **MongoDB collections**, whose documents have no fixed shape: two string fields, ``_id`` and
  ``document``, each holding MongoDB relaxed Extended JSON (``bson.json_util``), which keeps
  every BSON type (ObjectId, dates, Decimal128, binary...).

``client.type_schema`` gives the schema as JSON text, so an Avro reader decodes the bytes. Field
names are the columns' names as they are: one that is not an Avro name (``[A-Za-z_][A-Za-z0-9_]*``:
a space, an accent, a leading digit) reads with fastavro, not with readers that check names.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from io import BytesIO
from typing import Any

import fastavro

from reactive.fingerprints import json_value

#: The record schema of MongoDB rows.
MONGO_SCHEMA = {
    "type": "record",
    "name": "document",
    "fields": [{"name": "_id", "type": "string"}, {"name": "document", "type": "string"}],
}


class RowFormat:
    """A record schema, and how a row becomes a record of it.

    >>> fmt = RowFormat.of_fields("docs", [("id", "long", None), ("text", "string", None)])
    >>> raw = fmt.encode({"id": 1, "text": "hé"})
    >>> raw, fmt.decode(raw)
    (b'\\x00\\x02\\x00\\x06h\\xc3\\xa9', {'id': 1, 'text': 'hé'})
    """

    def __init__(self, schema: Mapping[str, Any], to_record: Callable[[Mapping[str, Any]], dict[str, Any]]) -> None:
        self.schema = dict(schema)
        self.type_schema = json.dumps(self.schema, separators=(",", ":"))
        self._parsed = fastavro.parse_schema(self.schema)
        self._array = array_schema(self.schema)
        self.to_record = to_record

    @classmethod
    def of_fields(cls, name: str, fields: Sequence[tuple[str, Any, Callable[[Any], Any] | None]]) -> RowFormat:
        """A record of nullable ``fields`` ``(column, avro type, convert or None)``."""
        schema = {
            "type": "record",
            "name": _avro_name(name),
            "fields": [{"name": column, "type": [avro, "null"]} for column, avro, _ in fields],
        }
        converters = [(column, convert) for column, _, convert in fields]

        def to_record(row: Mapping[str, Any]) -> dict[str, Any]:
            record = {}
            for column, convert in converters:
                value = row.get(column)
                record[column] = value if value is None or convert is None else convert(value)
            return record

        return cls(schema, to_record)

    def encode(self, row: Mapping[str, Any]) -> bytes:
        stream = BytesIO()
        fastavro.schemaless_writer(stream, self._parsed, self.to_record(row))
        return stream.getvalue()

    def decode_all(self, frames: Sequence[bytes]) -> list[dict[str, Any]] | None:
        """Every frame decoded in one pass, or None when one does not decode exactly."""
        return decode_all(self._array, frames)

    def decode(self, data: bytes) -> dict[str, Any]:
        """The record in ``data``; ValueError when it does not decode exactly (bytes left over
        mean a record written in another type: the table was altered)."""
        stream = BytesIO(data)
        try:
            record = fastavro.schemaless_reader(stream, self._parsed, None)
        except Exception as exc:
            raise ValueError(f"not a record of this type: {type(exc).__name__}: {exc}") from None
        if stream.tell() != len(data):
            raise ValueError(f"{len(data) - stream.tell()} bytes left over after the record (was the table altered?)")
        return record


def array_schema(record_schema: Mapping[str, Any]) -> Any:
    """The parsed schema of an Avro array of ``record_schema`` (for :func:`decode_all`)."""
    return fastavro.parse_schema({"type": "array", "items": dict(record_schema)})


def decode_all(array: Any, frames: Sequence[bytes]) -> list[dict[str, Any]] | None:
    """Every frame (one schemaless record each) decoded in one call, or None if they do not
    decode exactly: then decode them one by one to find the bad ones.

    The frames, framed as one Avro array (a count, the records, an empty block), decode in
    one pass inside fastavro: about 1.5x faster than one call per frame. Exactness: the array
    must hold as many records as frames and consume every byte; a frame with bytes left over
    (a record of an altered table) shifts every later record and fails that test.

    >>> array = array_schema({"type": "record", "name": "r", "fields": [{"name": "n", "type": "long"}]})
    >>> decode_all(array, [b"\\x02", b"\\x04"]), decode_all(array, [b"\\x02\\x00", b"\\x04"])
    ([{'n': 1}, {'n': 2}], None)
    """
    if not frames:
        return []
    count = len(frames)
    header = bytearray()
    zigzag = count << 1
    while zigzag > 0x7F:
        header.append((zigzag & 0x7F) | 0x80)
        zigzag >>= 7
    header.append(zigzag)
    data = b"".join((bytes(header), *frames, b"\x00"))
    stream = BytesIO(data)
    try:
        records = fastavro.schemaless_reader(stream, array, None)
    except Exception:
        return None
    if stream.tell() != len(data) or len(records) != count:
        return None
    return records


def _avro_name(name: str) -> str:
    """A valid Avro record name for a table name (Avro names are ``[A-Za-z_][A-Za-z0-9_]*``).

    >>> _avro_name("ki_home.my docs")
    'ki_home_my_docs'
    """
    cleaned = "".join(c if c.isascii() and (c.isalnum() or c == "_") else "_" for c in name)
    return cleaned if cleaned[:1].isalpha() or cleaned[:1] == "_" else f"_{cleaned}"


def as_json_text(value: Any) -> str:
    return json.dumps(value, default=json_value, sort_keys=True)


def mongo_format() -> RowFormat:
    from bson import json_util

    relaxed = json_util.RELAXED_JSON_OPTIONS

    def to_record(row: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "_id": json_util.dumps(row.get("_id"), json_options=relaxed),
            "document": json_util.dumps(row, json_options=relaxed),
        }

    return RowFormat(MONGO_SCHEMA, to_record)

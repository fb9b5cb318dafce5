"""``_reactive_checkpoints`` in Kinetica: the sections of every checkpoint.

One record per section: ``key`` (the primary key, ``["checkpoint", "section"]`` as JSON text),
``checkpoint``, ``section``, ``data`` (base64 text: the official protocol's expressions compare
strings, which the lease's compare-and-set needs), ``is_text`` and ``written_at`` (epoch ms).

A write of several sections is one ``/insert/records`` with ``update_on_existing_pk``; the
protocol does not say that a multi-record insert is atomic, so on Kinetica each *section* is
written atomically, not each call. The compare-and-set uses only the protocol's endpoints: a
conditional ``/delete/records`` (``"key" = ... and "data" = ...``) followed by an insert that
fails when the key exists, so at most one of two racing processes wins.

A table in the format of reactive 0.1 (``name``, ``value``, ``updated_at``) is migrated the first
time it is used. A table dropped by someone else (or lost with the server's tables) reads as
empty and is created again at the next write.
"""

from __future__ import annotations

import base64
import functools
import json
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from reactive.backends.kinetica.client import KineticaError, equals_expression
from reactive.backends.kinetica.tables import TableCatalog
from reactive.checkpoints import ENGINE_CHECKPOINT, Section

T = TypeVar("T")

CHECKPOINTS_TABLE = "_reactive_checkpoints"
_COLUMNS = [
    ("key", "string", False),
    ("checkpoint", "string", False),
    ("section", "string", False),
    ("data", "string", False),
    ("is_text", "int", False),
    ("written_at", "double", False),
]


def _key(checkpoint: str, section: str) -> str:
    return json.dumps([checkpoint, section], ensure_ascii=False)


def _record(checkpoint: str, key: str, section: Section) -> dict[str, Any]:
    return {
        "key": _key(checkpoint, key),
        "checkpoint": checkpoint,
        "section": key,
        "data": base64.b64encode(section.data).decode("ascii"),
        "is_text": int(section.text),
        "written_at": section.written_at,
    }


class KineticaSections:
    """The :class:`~reactive.checkpoints.SectionStore` of a Kinetica database."""

    def __init__(self, catalog: TableCatalog) -> None:
        self.catalog = catalog
        self._lock = threading.Lock()

    def _ensure(self, *, create: bool) -> bool:
        """Whether the table exists (created where ``create``), in the current format. Once
        described, the catalog answers without asking the server, until a request finds the
        table gone (:meth:`TableCatalog.missing`)."""
        with self._lock:
            if self.catalog.exists(CHECKPOINTS_TABLE):
                if "name" in self.catalog.describe(CHECKPOINTS_TABLE).columns:
                    self._migrate()
                return True
            if not create:
                return False
            self.catalog.create(CHECKPOINTS_TABLE, _COLUMNS, {"key": ["primary_key"]})
            return True

    def _write(self, write: Callable[[], T]) -> T:
        """``write()`` to the table, made first where it does not exist, and again where
        someone dropped it since."""
        self._ensure(create=True)
        return self.catalog.recreating(CHECKPOINTS_TABLE, functools.partial(self._ensure, create=True), write)

    def _migrate(self) -> None:
        old = list(self.catalog.all_records(CHECKPOINTS_TABLE))
        self.catalog.drop(CHECKPOINTS_TABLE)
        self.catalog.create(CHECKPOINTS_TABLE, _COLUMNS, {"key": ["primary_key"]})
        if old:
            self._insert(ENGINE_CHECKPOINT, {r["name"]: Section.of(r["value"]) for r in old}, upsert=True)

    def _insert(self, checkpoint: str, sections: Mapping[str, Section], *, upsert: bool) -> int:
        records = [_record(checkpoint, key, section) for key, section in sections.items()]
        codec = self.catalog.codec(CHECKPOINTS_TABLE)
        counts = self.catalog.client.insert_records(CHECKPOINTS_TABLE, records, codec, update_on_existing_pk=upsert)
        return counts.count_inserted

    def read_sections(
        self, checkpoint: str, keys: Sequence[str] | None = None, *, lock: bool = False
    ) -> dict[str, Section]:
        sections: dict[str, Section] = {}
        if not self._ensure(create=False):
            return sections
        with self.catalog.unless_missing(CHECKPOINTS_TABLE):
            if keys is None:
                records = self.catalog.all_records(
                    CHECKPOINTS_TABLE, expression=equals_expression("checkpoint", checkpoint)
                )
            else:
                records = self.catalog.records_by_ids(CHECKPOINTS_TABLE, "key", [_key(checkpoint, k) for k in keys])
            sections = {
                r["section"]: Section(base64.b64decode(r["data"]), bool(r["is_text"]), float(r["written_at"]))
                for r in records
            }
        return sections

    def write_sections(self, checkpoint: str, sections: Mapping[str, Section]) -> None:
        if sections:
            self._write(functools.partial(self._insert, checkpoint, sections, upsert=True))

    def delete_sections(self, checkpoint: str, keys: Sequence[str] | None = None) -> None:
        if not self._ensure(create=False):
            return
        with self.catalog.unless_missing(CHECKPOINTS_TABLE):
            if keys is None:
                self.catalog.client.delete_records(CHECKPOINTS_TABLE, [equals_expression("checkpoint", checkpoint)])
            elif keys:
                self.catalog.delete_by_ids(CHECKPOINTS_TABLE, "key", [_key(checkpoint, k) for k in keys])

    def replace_section(self, checkpoint: str, key: str, expected: bytes | None, new: Section | None) -> bool:
        if expected is not None:
            matches = (
                f"{equals_expression('key', _key(checkpoint, key))} and "
                f"{equals_expression('data', base64.b64encode(expected).decode('ascii'))}"
            )
            if self._write(functools.partial(self.catalog.client.delete_records, CHECKPOINTS_TABLE, [matches])) != 1:
                return False  # not the expected section (a table made again holds none)
        elif new is None:
            return key not in self.read_sections(checkpoint, [key])
        if new is None:
            return True
        try:
            return self._write(functools.partial(self._insert, checkpoint, {key: new}, upsert=False)) == 1
        except KineticaError:
            return False  # the key exists: another process got there first

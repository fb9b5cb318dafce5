"""``Listener``: keeps a model's outputs for one field of one table fresh."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from reactive.backends.base import ErrorRecord, OutputRecord, OutputRejected, TableInfo, outputs_table
from reactive.components.base import Component, Refresh
from reactive.components.model import Failure, Model
from reactive.errors import ConfigurationError
from reactive.events import Batch, ChangePacket, DBEvent, Row, id_key
from reactive.fingerprints import fingerprint
from reactive.reconcile import OnProcessed, reconcile

if TYPE_CHECKING:
    from reactive.datalayer import Datalayer

_MISSING = object()
#: How many reconciled ids a listener remembers before it looks every live insert up.
RECONCILED_MEMORY = 200_000
#: Inputs above this size are refused: models truncate long inputs anyway, and a huge
#: payload should not stall the handler thread.
DEFAULT_MAX_INPUT_BYTES = 4 * 1024 * 1024


def _input_bytes(value: Any, limit: int) -> int:
    """The size of a text or bytes input (others are not measured)."""
    if isinstance(value, bytes | bytearray):
        return len(value)
    if isinstance(value, str) and len(value) * 4 > limit:
        return len(value.encode("utf-8", "surrogatepass"))
    return 0


def _check_filter(filter: Mapping[str, Any] | None) -> dict[str, Any]:
    if filter is None:
        return {}
    if not isinstance(filter, Mapping):
        raise ConfigurationError(f"filter must be a mapping of field -> value, not {type(filter).__name__}")
    for field, value in filter.items():
        operator = isinstance(value, Mapping) and any(str(k).startswith("$") for k in value)
        if not isinstance(field, str) or field.startswith("$") or operator:
            raise ConfigurationError(
                f"filter {dict(filter)!r}: only equality on fields is supported, e.g. {{'lang': 'en'}}"
            )
    return dict(filter)


class Listener(Component):
    """Computes ``model`` on field ``key`` of every row of table ``select``, and keeps it fresh.

    >>> import duckdb, tempfile, reactive
    >>> path = tempfile.mkdtemp() + "/app.duckdb"
    >>> _ = duckdb.connect(path).execute(
    ...     "create table docs (id int primary key, text varchar); insert into docs values (1, 'hello')")
    >>> db = reactive.connect(f"duckdb:///{path}")
    >>> upper = Model("upper", predict=lambda xs: [x.upper() for x in xs])
    >>> _ = db.add(Listener(model=upper, key="text", select="docs"))
    >>> db.outputs("upper__text")
    [{'_source': 1, '_output': 'HELLO'}]
    >>> db.close()

    Outputs are stored in ``_outputs__<identifier>`` with the source row id (``_source``),
    the output (``_output``) and the fingerprint of the input it was computed from. An
    update that leaves ``key`` unchanged recomputes nothing; deleting a row deletes its
    output. ``filter`` (field -> value, equality only) limits the rows: a row updated out of
    the filter loses its output. ``id_column`` names the row id when the table has no
    primary key. A text or bytes input larger than ``max_input_bytes`` is recorded as an
    error instead of being sent to the model.
    """

    def __init__(
        self,
        model: Model,
        key: str,
        select: str,
        *,
        filter: Mapping[str, Any] | None = None,
        identifier: str | None = None,
        id_column: str | None = None,
        max_input_bytes: int | None = DEFAULT_MAX_INPUT_BYTES,
    ) -> None:
        if not isinstance(model, Model):
            raise ConfigurationError(f"model must be a reactive Model, not {type(model).__name__}")
        if not isinstance(key, str) or not key:
            raise ConfigurationError("key must be the name of a field")
        if not isinstance(select, str) or not select:
            raise ConfigurationError("select must name a table")
        self.model = model
        self.key = key
        self.select = select
        self.filter = _check_filter(filter)
        self.identifier = identifier or f"{model.identifier}__{key}"
        self.id_column = id_column
        self.max_input_bytes = max_input_bytes
        self.source: TableInfo | None = None
        # Ids whose output a reconciliation wrote in this process (None: too many to keep).
        self._reconciled: set[Hashable] | None = set()

    def __repr__(self) -> str:
        return f"Listener({self.identifier!r}, select={self.select!r}, key={self.key!r})"

    @property
    def table(self) -> str:
        return self.select

    @property
    def outputs_table(self) -> str:
        return outputs_table(self.identifier)

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "model": self.model.identifier,
            "key": self.key,
            "filter": self.filter or None,
            "outputs": self.outputs_table,
        }

    def same_declaration(self, other: Listener) -> bool:
        return (self.model.identifier, self.key, self.select, self.filter, self.id_column) == (
            other.model.identifier,
            other.key,
            other.select,
            other.filter,
            other.id_column,
        )

    def prepare(self, db: Datalayer) -> TableInfo:
        source = db.table_info(self.select, id_column=self.id_column)
        if source.columns and self.key not in source.columns:
            raise ConfigurationError(
                f"listener {self.identifier!r}: table {self.select!r} has no column {self.key!r} "
                f"(columns: {', '.join(source.columns)})",
                table=self.select,
                listener=self.identifier,
            )
        db.writer.prepare(self.identifier, source, self.model.output_type)
        self.source = source
        return source

    def matches(self, row: Row) -> bool:
        return not self.filter or all(row.get(field, _MISSING) == value for field, value in self.filter.items())

    def _input(self, row: Row) -> Any:
        value = row.get(self.key, _MISSING)
        return _MISSING if value is None else value

    def is_current(self, row: Row, stored: int | None) -> bool:
        """Whether ``stored`` (an output's input fingerprint, or None) is right for ``row``."""
        if not self.matches(row):
            return stored is None
        value = self._input(row)
        return value is not _MISSING and stored == fingerprint(value)

    def _known_absent(self, batch: Batch) -> set[Hashable]:
        """Ids of a live insert batch that certainly have no output yet.

        A row a change source reports as inserted has no output, unless a reconciliation
        computed it first (a backfill racing live inserts, or rows inserted while the
        process was down, which the source reports again after the restart). Those ids are
        remembered, so only they are looked up; the rest skip a database round trip.
        """
        if batch.event is not DBEvent.insert or batch.targets is not None or self._reconciled is None:
            return set()
        return {key for key in map(id_key, batch.ids) if key not in self._reconciled}

    def _remember_reconciled(self, ids: Iterable[Any]) -> None:
        if self._reconciled is not None:
            self._reconciled.update(map(id_key, ids))
            if len(self._reconciled) > RECONCILED_MEMORY:
                # Past this many, remembering costs more than looking every insert up.
                self._reconciled = None

    def reconcile(
        self, db: Datalayer, *, page_size: int, on_processed: OnProcessed | None = None
    ) -> Iterator[ChangePacket]:
        assert self.source is not None, "prepare() first"
        return reconcile(
            db.backend.source,
            db.backend.outputs,
            self.source,
            identifier=self.identifier,
            columns=[self.key, *self.filter],
            is_current=self.is_current,
            page_size=page_size,
            on_processed=on_processed,
        )

    def refresh_outputs(self, batch: Batch, db: Datalayer, *, wait: Callable[[float], bool]) -> Refresh:
        assert self.source is not None, "prepare() first"
        store = db.backend.outputs
        refresh = Refresh()
        if batch.event is DBEvent.delete:
            store.delete_outputs(self.identifier, batch.ids)
            refresh.deleted.extend(batch.ids)
            return refresh

        def fail(row_id: Any, error: str) -> None:
            refresh.errors.append(ErrorRecord(self.identifier, self.select, row_id, error))
            remove.append(row_id)

        remove: list[Any] = []
        candidates: list[tuple[Any, Any, int]] = []
        for row_id, row in zip(batch.ids, batch.rows, strict=True):
            if row is None or not self.matches(row):
                remove.append(row_id)
                continue
            value = self._input(row)
            if value is _MISSING:
                fail(row_id, f"row has no value for key {self.key!r}")
                continue
            if self.max_input_bytes is not None and (size := _input_bytes(value, self.max_input_bytes)) > (
                self.max_input_bytes
            ):
                fail(row_id, f"input of {size:,} bytes is larger than max_input_bytes={self.max_input_bytes:,}")
                continue
            try:
                candidates.append((row_id, value, fingerprint(value)))
            except (TypeError, ValueError) as exc:
                fail(row_id, f"cannot fingerprint key {self.key!r}: {exc}")

        absent = self._known_absent(batch)
        looked_up = [c[0] for c in candidates if id_key(c[0]) not in absent]
        stored = store.output_fingerprints(self.identifier, looked_up) if looked_up else {}
        todo = [c for c in candidates if stored.get(id_key(c[0])) != c[2]]
        refresh.skipped = len(candidates) - len(todo)
        if todo:
            results = self.model.compute([value for _, value, _ in todo], wait=wait)
            records = []
            for (row_id, _, fp), result in zip(todo, results, strict=True):
                if isinstance(result, Failure):
                    fail(row_id, result.error)
                else:
                    records.append(OutputRecord(row_id, result, fp, new=id_key(row_id) not in stored))
            refresh.computed = len(records)
            if records:
                stored_outputs = db.writer.write(self.identifier, self.source, records)
                for record, kept in zip(records, stored_outputs, strict=True):
                    if isinstance(kept, OutputRejected):
                        fail(record.source, kept.error)
                    else:
                        refresh.written.append((record.source, kept))
                if batch.targets is not None:
                    self._remember_reconciled(record.source for record in records)
        remove = [i for i in remove if id_key(i) not in absent]
        if remove:
            # A row that left the filter, vanished or failed has no current output.
            store.delete_outputs(self.identifier, remove)
            refresh.deleted.extend(remove)
        return refresh

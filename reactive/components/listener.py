"""``Listener``: keeps a model's outputs for one field of one table fresh."""

from __future__ import annotations

import datetime as _dt
import decimal
import functools
import logging
import uuid
from collections.abc import Callable, Collection, Hashable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from reactive import checks
from reactive.backends.base import (
    ErrorRecord,
    OutputBatch,
    OutputRejected,
    TableInfo,
    outputs_table,
    same_but_case,
)
from reactive.components.base import Component, FailedRows, PlannedRefresh, Refresh
from reactive.components.model import Batching, Failure, Model, ModelCalls
from reactive.errors import ConfigurationError
from reactive.events import Batch, ChangePacket, DBEvent, Row, id_key, id_keys, is_utf8
from reactive.reconcile import OnProcessed, reconcile
from reactive.rows import NOT_PYTHON, TableRows, Unreadable, pylist

if TYPE_CHECKING:
    from reactive.compute import Compute
    from reactive.datalayer import Datalayer

log = logging.getLogger(__name__)

_MISSING = object()
#: How many reconciled ids a listener remembers before it looks every live insert up.
RECONCILED_MEMORY = 200_000
#: Inputs above this size are refused: models truncate long inputs anyway, and a huge
#: payload should not stall the handler thread.
DEFAULT_MAX_INPUT_BYTES = 4 * 1024 * 1024


class _Inputs:
    """The rows a batch sends to the model, as three aligned lists: ids, inputs, fingerprints
    (no object per row: a window of 5,000 rows is three lists, not 5,000 tuples).

    >>> inputs = _Inputs([1, 2, 3], ["a", "b", "c"], [10, 20, 30])
    >>> part = inputs.take([2, 0])
    >>> part.ids, part.values, part.fingerprints, len(part)
    ([3, 1], ['c', 'a'], [30, 10], 2)
    """

    __slots__ = ("fingerprints", "ids", "values")

    def __init__(self, ids: list[Any], values: list[Any], fingerprints: list[int]) -> None:
        self.ids, self.values, self.fingerprints = ids, values, fingerprints

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, indexes: Iterable[int]) -> _Inputs:
        indexes = list(indexes)
        ids, values, fps = self.ids, self.values, self.fingerprints
        return _Inputs([ids[k] for k in indexes], [values[k] for k in indexes], [fps[k] for k in indexes])


def _with_known(
    known: Mapping[int, Any], rows: _Inputs, call: Callable[[list[Any]], Future[list[Any]]]
) -> Future[list[Any]]:
    """The outputs of ``rows``: those ``known`` holds by fingerprint, the others from ``call``
    (the model, on the inputs it lacks), in the order of ``rows``.

    >>> def call(values):
    ...     future = Future()
    ...     future.set_result([v.upper() for v in values])
    ...     return future
    >>> _with_known({20: "<b>"}, _Inputs([1, 2, 3], ["a", "b", "c"], [10, 20, 30]), call).result()
    ['A', '<b>', 'C']
    >>> _with_known({10: "x"}, _Inputs([1], ["a"], [10]), lambda values: 1 / 0).result()
    ['x']
    """
    found = [known.get(fp, _MISSING) for fp in rows.fingerprints]
    missing = [k for k, output in enumerate(found) if output is _MISSING]
    if len(missing) == len(found):
        return call(rows.values)
    outer: Future[list[Any]] = Future()
    outer.set_running_or_notify_cancel()
    if not missing:
        outer.set_result(found)
        return outer
    values = rows.values

    def merge(inner: Future[list[Any]]) -> None:
        try:
            outputs = inner.result()
        except BaseException as exc:  # handed to whoever waits, as the model's own future would
            outer.set_exception(exc)
            return
        for k, output in zip(missing, outputs, strict=True):
            found[k] = output
        outer.set_result(found)

    call([values[k] for k in missing]).add_done_callback(merge)
    return outer


def _input_bytes(value: Any, limit: int) -> int:
    """The size of a text or bytes input (others are not measured)."""
    if isinstance(value, bytes | bytearray):
        return len(value)
    if isinstance(value, str) and len(value) * 4 > limit:
        return len(value.encode("utf-8", "surrogatepass"))
    return 0


#: Rows of a batch up to which its rows are checked one by one even when read as one Arrow
#: table: pyarrow's compute calls of the column's checks let go of the GIL and take it back,
#: which beside a thread running Python waits for it (a one-row column: 3 ms against 0.01 ms).
FEW_ROWS = 32

#: Arrow types whose values come as ``str`` or ``bytes`` (their size is checked in one call),
#: and types whose values never do (nothing to check).
_TEXT = (pa.types.is_string, pa.types.is_large_string, pa.types.is_binary, pa.types.is_large_binary)
_NEVER_TEXT = (pa.types.is_integer, pa.types.is_floating, pa.types.is_boolean, pa.types.is_temporal)


def field_value(row: Row, field: str) -> Any:
    """The value of ``field`` in ``row`` (``_MISSING`` where it has none). A field the row lacks
    whose name has dots is a path into nested documents and lists, as MongoDB reads one
    (``meta.title``, ``tags.0``); SQL and Kinetica keys name columns (checked at ``db.add``).

    >>> doc = {"meta": {"title": "a"}, "tags": ["x", "y"], "a.b": 1}
    >>> field_value(doc, "meta.title"), field_value(doc, "tags.1"), field_value(doc, "a.b")
    ('a', 'y', 1)
    >>> field_value(doc, "meta.author") is _MISSING, field_value(doc, "tags.x") is _MISSING
    (True, True)
    """
    value = row.get(field, _MISSING)
    if value is not _MISSING or "." not in field:
        return value
    value = row
    for part in field.split("."):
        if isinstance(value, Mapping):
            value = value.get(part, _MISSING)
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return _MISSING
        if value is _MISSING:
            return _MISSING
    return value


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


def filter_mismatch(have: Any, wanted: Any) -> str | None:
    """Why a row's value ``have`` can never equal a filter's ``wanted`` (Python's ``==``, which
    the filter uses, says False across types without a word), or None when it may.

    >>> import datetime, decimal
    >>> filter_mismatch(datetime.date(2024, 1, 2), "2024-01-02")
    'a datetime.date never equals a str: filter on datetime.date(2024, 1, 2)'
    >>> filter_mismatch(decimal.Decimal("0.10"), 0.1)
    "a float is not the decimal it was written as (0.1 is 0.1000000000000000055...): filter on Decimal('0.1')"
    >>> filter_mismatch(1, 1.0), filter_mismatch(1, True), filter_mismatch("en", "fr")
    (None, None, None)
    """
    if not _may_never_equal(have, wanted):
        return None
    kind, wanted_kind = _kind(have), _kind(wanted)
    if kind is None or wanted_kind is None:
        return None
    if kind != wanted_kind:
        return f"{_a_type(have)} never equals {_a_type(wanted)}: filter on {_like(have, wanted)}"
    if kind == "datetime" and (have.tzinfo is None) != (wanted.tzinfo is None):
        zone = "a zone" if have.tzinfo is not None else "no zone"
        return f"a datetime with {zone} never equals one without: filter on {have!r}"
    if isinstance(have, decimal.Decimal) and isinstance(wanted, float) and have == decimal.Decimal(repr(wanted)):
        exact = f"{decimal.Decimal(wanted):.20}"
        return (
            f"a float is not the decimal it was written as ({wanted!r} is {exact}...): "
            f"filter on Decimal({repr(wanted)!r})"
        )
    return None


def _may_never_equal(have: Any, wanted: Any) -> bool:
    """Whether unequal ``have`` and ``wanted`` may be so for their types: values of one type
    differ by value, except datetimes, whose zone alone makes them never equal. Cheap: a
    filter asks it of every row it leaves out (see :func:`filter_mismatch`)."""
    return type(have) is not type(wanted) or type(have) is _dt.datetime


def unmatchable(row: Row, conditions: Mapping[str, Any]) -> str | None:
    """Why ``row`` fails ``conditions`` in a way every row holding values of its types would
    (see :func:`filter_mismatch`), naming the field; None when it matches or may not.

    >>> unmatchable({"n": 3, "lang": "en"}, {"n": "3"})
    "'n' holds an int: an int never equals a str: filter on 3"
    """
    for field, wanted in conditions.items():
        have = field_value(row, field)
        if have != wanted:
            why = filter_mismatch(have, wanted)
            return None if why is None else f"{field!r} holds {_a_type(have)}: {why}"
    return None


#: The kinds of value that never compare equal across (Python's ``==``); bool is a number.
_KINDS: tuple[tuple[type | tuple[type, ...], str], ...] = (
    ((bool, int, float, decimal.Decimal, np.number, np.bool_), "number"),
    (str, "text"),
    ((bytes, bytearray, memoryview), "bytes"),
    (_dt.datetime, "datetime"),
    (_dt.date, "date"),
    (_dt.time, "time"),
    (_dt.timedelta, "timedelta"),
    (uuid.UUID, "uuid"),
    ((list, tuple), "list"),
    (Mapping, "dict"),
)


def _kind(value: Any) -> str | None:
    """The kind of ``value`` (see ``_KINDS``); a BSON type's own (an ``ObjectId`` never equals
    its hex), None for others."""
    kind = next((kind for types, kind in _KINDS if isinstance(value, types)), None)
    if kind is None and _is_bson(value):
        return type(value).__name__
    return kind


def _is_bson(value: Any) -> bool:
    return type(value).__module__.startswith("bson.")


def _a_type(value: Any) -> str:
    """``value``'s type with its article: ``an int``, ``a datetime.date``."""
    kind = type(value)
    name = kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__name__}"
    return f"{'an' if name[0] in 'aeio' else 'a'} {name}"


def _like(have: Any, wanted: Any) -> str:
    """``wanted`` written as a value of ``have``'s type, where one reads as the other.

    >>> _like(3, "3"), _like(3, "three"), _like(uuid.UUID(int=1), "00000000-0000-0000-0000-000000000001")
    ('3', 'an int, as the rows hold (such as 3)', "UUID('00000000-0000-0000-0000-000000000001')")
    >>> from bson import ObjectId
    >>> _like(ObjectId("64b7f0c2a1b2c3d4e5f60718"), "64b7f0c2a1b2c3d4e5f60718")
    "ObjectId('64b7f0c2a1b2c3d4e5f60718')"
    """
    kind = type(have)
    if isinstance(wanted, str) and not isinstance(have, bool):
        if isinstance(have, _dt.date | _dt.time):
            convert: Callable[[str], Any] | None = kind.fromisoformat
        else:
            readable = isinstance(have, int | float | decimal.Decimal | uuid.UUID) or _is_bson(have)
            convert = kind if readable else None
        if convert is not None:
            try:
                return repr(convert(wanted))
            except Exception:  # a hint only (bson's InvalidId is no ValueError): the generic one
                pass
    return f"{_a_type(have)}, as the rows hold (such as {have!r})"


def arrow_equal(column: pa.ChunkedArray | pa.Array, wanted: Any) -> np.ndarray | None:
    """Per value of ``column``, whether Python's ``==`` says it equals ``wanted`` (as a filter
    compares the value :func:`~reactive.rows.pylist` gives), computed by Arrow: for text with
    a ``str``, integers with an ``int``, booleans with a ``bool``, ``float64`` with a ``float``,
    and any column's nulls with ``None``, where the two agree on every value. None for other
    pairs (an ``int`` against floats differs past 2**53; dates, decimals...): compare in Python.

    >>> arrow_equal(pa.array(["en", None, "fr"]), "en").tolist(), arrow_equal(pa.array([1, 2]), 2**70).tolist()
    ([True, False, False], [False, False])
    >>> arrow_equal(pa.array([1, None]), None).tolist(), arrow_equal(pa.array([1.0]), 1)
    ([False, True], None)
    >>> arrow_equal(pa.array(["a"]), "\\udc80").tolist()  # a lone surrogate: no UTF-8 text holds it
    [False]
    """
    kind = column.type
    if wanted is None:
        return pc.is_null(column).to_numpy(zero_copy_only=False)
    if type(wanted) is str and (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        if not is_utf8(wanted):  # a lone surrogate: Arrow's text cannot hold it, and no row's equals it
            return np.zeros(len(column), dtype=bool)
        scalar = pa.scalar(wanted, kind)
    elif type(wanted) is int and pa.types.is_integer(kind):
        try:
            scalar = pa.scalar(wanted, kind)
        except (OverflowError, pa.ArrowInvalid):  # past the column's type: no value equals it
            return np.zeros(len(column), dtype=bool)
    elif (type(wanted) is bool and pa.types.is_boolean(kind)) or (type(wanted) is float and pa.types.is_float64(kind)):
        scalar = pa.scalar(wanted, kind)
    else:
        return None
    return pc.equal(column, scalar).fill_null(False).to_numpy(zero_copy_only=False)


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

    A stored fingerprint is :meth:`Model.fingerprint` of the input: it includes the model's
    ``version``, so outputs of another version are stale and computed again.
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
        for what, name in (("identifier", self.identifier), ("key", key), ("select", select)):
            if not isinstance(name, str) or not name or "\x00" in name:
                # The identifier names the outputs' table: DuckDB's C code stops a name at NUL
                # (the outputs went to another table, and read back as none).
                raise ConfigurationError(f"listener {what} must be a non-empty name without NUL, not {name!r}")
        self.id_column = id_column
        if max_input_bytes is not None:
            max_input_bytes = checks.whole("max_input_bytes", max_input_bytes, least=1)
        self.max_input_bytes = max_input_bytes
        self.source: TableInfo | None = None
        # Ids whose output a reconciliation wrote in this process (None: too many to keep).
        self._reconciled: set[Hashable] | None = set()
        # Whether live inserts may be replays of work already written (see _known_absent).
        self._replaying = True
        # Whether the last reconciliation found no output stored (a first backfill): its
        # batches then look no stored fingerprint up (see _looked_up).
        self._reconciled_from_nothing = False
        # Ids with recorded errors (see _settle_errors).
        self._failed = FailedRows(self.identifier)
        # Whether a row's value was found that never equals the filter's (said once).
        self._filter_told = False

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

    @property
    def model_calls(self) -> ModelCalls:
        return self.model.calls

    def batching(self) -> Batching | None:
        return self.model.batching

    def same_declaration(self, other: Listener) -> bool:
        """Whether ``other`` declares the same outputs (model name, key, table, filter, id column)."""
        return (self.model.identifier, self.key, self.select, self.filter, self.id_column) == (
            other.model.identifier,
            other.key,
            other.select,
            other.filter,
            other.id_column,
        )

    def same_settings(self, other: Listener) -> bool:
        """Whether ``other`` also computes them the same way (:meth:`Model.same_model`, input limit)."""
        return self.model.same_model(other.model) and self.max_input_bytes == other.max_input_bytes

    def close(self, db: Datalayer) -> None:
        """Close the model's own executor, if it has one (``Model(executor=...)``)."""
        if self.model.executor is not None:
            self.model.executor.close()

    def drop(self, db: Datalayer) -> None:
        """Drop the outputs table and forget the outputs' type."""
        db.writer.drop(self.identifier)

    def activate(self, db: Datalayer) -> None:
        """Fix the outputs' type when the model declares one (creates the outputs table)."""
        assert self.source is not None, "prepare() first"
        db.writer.prepare(self.identifier, self.source, self.model.output_type, self.filter)

    def prepare(self, db: Datalayer) -> TableInfo:
        source = db.table_info(self.select, id_column=self.id_column)
        # Tables with columns (SQL, Kinetica): a key or a filter field they lack would match no
        # row, silently. MongoDB collections have none: a field any document lacks is normal.
        missing = [field for field in (self.key, *self.filter) if source.columns and field not in source.columns]
        if missing:
            what = f"column {missing[0]!r}" if missing[0] == self.key else f"column {missing[0]!r} to filter on"
            same = same_but_case(missing[0], source.columns)
            meant = f"; did you mean {same!r}? names are taken as written, case included" if same else ""
            raise ConfigurationError(
                f"listener {self.identifier!r}: table {self.select!r} has no {what} "
                f"(columns: {', '.join(source.columns)}){meant}",
                table=self.select,
                listener=self.identifier,
            )
        self.source = source
        self._replaying = True
        self._failed.load(db)
        return source

    def matches(self, row: Row) -> bool:
        if not self.filter:
            return True
        for field, wanted in self.filter.items():
            have = field_value(row, field)
            if have != wanted:
                if not self._filter_told and _may_never_equal(have, wanted):
                    self._tell_unmatchable(row)
                return False
        return True

    def _tell_unmatchable(self, row: Row) -> None:
        """Say, once, that ``row`` holds a value of a type the filter's never equals: such a
        filter matches no row of that type, silently otherwise."""
        why = unmatchable(row, self.filter)
        if why is not None:
            self._filter_told = True
            log.warning("listener %r: filter %r matches no row whose %s", self.identifier, self.filter, why)

    def _input(self, row: Row) -> Any:
        value = field_value(row, self.key)
        return _MISSING if value is None else value

    def is_current(self, row: Row, stored: int | None) -> bool:
        """Whether ``stored`` (an output's input fingerprint, or None) is right for ``row``."""
        if not self.matches(row):
            return stored is None
        value = self._input(row)
        return (
            value is not _MISSING
            and stored is not None
            and not self._stale(value, self.model.fingerprint(value), stored)
        )

    def current(self, rows: Sequence[Row], stored: Sequence[int | None]) -> list[bool]:
        """:meth:`is_current` of each row; rows read as one Arrow table are fingerprinted from
        the key's column in one call, where every row the filter keeps (:meth:`_kept`) has a
        value."""
        kept = self._kept(rows) if isinstance(rows, TableRows) else None
        if kept is not None and not any(s is not None for s in stored):
            # Nothing stored (a first backfill): a row is current exactly when the filter leaves it out.
            return (~kept[0]).tolist()
        column = None if kept is None else self._key_column(kept[1])
        digests = None if column is None else self._column_fingerprints(column)
        if kept is None or column is None or digests is None:
            return self._current_rows(rows, stored)
        positions = np.flatnonzero(kept[0]).tolist()
        # A row the filter leaves out is current when it has no output.
        current = [s is None for s in stored]
        for k, position in enumerate(positions):
            current[position] = stored[position] == digests[k]
        # Outputs stored before 0.2 (another fingerprint) whose input has not changed are current.
        differ = [k for k, position in enumerate(positions) if not current[position] and stored[position] is not None]
        values = pylist(column.take(differ)) if differ else []
        for k, value in zip(differ, values, strict=True):
            current[positions[k]] = not self._stale(value, digests[k], stored[positions[k]])
        return current

    def _current_rows(self, rows: Sequence[Row], stored: Sequence[int | None]) -> list[bool]:
        """:meth:`is_current` of each row, the inputs that need it fingerprinted in one call: one
        call per row cost 6 us against 0.2 us a value in a batch (rows read as dicts: MongoDB,
        Kinetica, PostgreSQL and SQLite); a reconciliation of 1M Kinetica rows took 5x longer."""
        current = [False] * len(rows)
        needed: list[tuple[int, Any]] = []  # (position, input) of rows the filter keeps, with an output
        for k, (row, s) in enumerate(zip(rows, stored, strict=True)):
            if not self.matches(row):
                current[k] = s is None
            elif s is not None and (value := self._input(row)) is not _MISSING:
                needed.append((k, value))
        if not needed:
            return current
        try:
            digests = self.model.fingerprints([value for _, value in needed])
        except (TypeError, ValueError):  # a value that cannot be fingerprinted: raised for its row, as before
            return [self.is_current(row, s) for row, s in zip(rows, stored, strict=True)]
        for (k, value), digest in zip(needed, digests, strict=True):
            current[k] = not self._stale(value, digest, stored[k])
        return current

    def _kept(self, rows: TableRows) -> tuple[np.ndarray, TableRows] | None:
        """Which rows the filter keeps (a mask) and those rows, found by Arrow
        (:func:`arrow_equal`); None where a condition must be compared in Python."""
        mask = np.ones(len(rows), dtype=bool)
        for field, wanted in self.filter.items():
            equal = arrow_equal(rows.table.column(field), wanted) if field in rows.columns else None
            if equal is None:
                return None
            mask &= equal
        return mask, rows if mask.all() else TableRows(rows.table.filter(pa.array(mask)))

    def _stale(self, value: Any, digest: int, stored: int | None) -> bool:
        """Whether an output stored with input fingerprint ``stored`` (None: no output) must be
        computed again for ``value``, whose fingerprint is ``digest``: the one place that decides.
        An output written before reactive 0.2 holds the fingerprint of that time
        (:meth:`Model.legacy_fingerprint`): it is current while its input has not changed."""
        if stored is None or digest == stored:
            return stored is None
        try:
            return self.model.legacy_fingerprint(value) != stored
        except (TypeError, ValueError):
            return True

    def _column_fingerprints(self, column: pa.ChunkedArray, values: list[Any] | None = None) -> list[int] | None:
        """The model's fingerprints of a column's values (``values``, when already taken): from its
        buffers for text, else in one call; None if one cannot be taken."""
        digests = self.model.column_fingerprints(column)
        if digests is None:
            digests = self._fingerprinted(pylist(column) if values is None else values)
        return digests

    def _key_column(self, rows: TableRows) -> pa.ChunkedArray | None:
        """The key's column, where every row of ``rows`` has a value (``rows`` are those the
        filter keeps: see :meth:`_kept`)."""
        if self.key not in rows.columns:
            return None
        column = rows.table.column(self.key)
        return None if column.null_count else column

    def _fingerprinted(self, values: list[Any]) -> list[int] | None:
        """The model's fingerprints of ``values`` in one call; None if one cannot be taken."""
        try:
            return self.model.fingerprints(values)
        except (TypeError, ValueError):
            return None

    def _known_absent(self, batch: Batch) -> set[Hashable]:
        """Ids of a live insert batch that certainly have no output yet.

        A row a change source reports as inserted has no output, unless a reconciliation
        computed it first (a backfill racing live inserts, or rows inserted while the
        process was down, which the source reports again after the restart). Those ids are
        remembered, so only they are looked up; the rest skip a database round trip.

        Replays are looked up too. A crash between writing a window's outputs and saving
        its position makes the source deliver that window again after the restart, before
        anything newer. So after each :meth:`prepare` (each ``db.add``, so each start of a
        process) every live insert is looked up until one looked-up batch of live inserts
        has none of its rows stored: from then on inserts are new.
        """
        live_insert = batch.event is DBEvent.insert and batch.targets is None
        if not live_insert or self._replaying or self._reconciled is None:
            return set()
        keys = set(id_keys(batch.ids))
        return keys.difference(self._reconciled) if self._reconciled else keys

    def _looked_up(self, batch: Batch, ids: list[Any], absent: set[Hashable]) -> list[Any]:
        """The ids whose stored fingerprint is looked up (the others certainly have no output).

        The batches of a reconciliation that found no output stored look nothing up: a row
        whose output a live change wrote since then is computed once more, to the same output
        (its current row is read), which costs less than a lookup for every row of a backfill.
        """
        if batch.targets is not None and self._reconciled_from_nothing:
            return []
        return [i for i, key in zip(ids, id_keys(ids), strict=True) if key not in absent] if absent else ids

    def _replay_ended(self, batch: Batch, looked_up: list[Any], stored: Mapping[Hashable, int]) -> None:
        """A batch of live inserts whose rows are all unknown ends the replay (see :meth:`_known_absent`)."""
        if self._replaying and batch.event is DBEvent.insert and batch.targets is None and looked_up and not stored:
            self._replaying = False

    def _remember_reconciled(self, ids: Sequence[Any]) -> None:
        if self._reconciled is not None:
            self._reconciled.update(id_keys(ids))
            if len(self._reconciled) > RECONCILED_MEMORY:
                # Past this many, remembering costs more than looking every insert up.
                self._reconciled = None

    def reconcile(
        self, db: Datalayer, *, page_size: int, on_processed: OnProcessed | None = None
    ) -> Iterator[ChangePacket]:
        assert self.source is not None, "prepare() first"
        self._reconciled_from_nothing = False

        def nothing_stored() -> None:
            self._reconciled_from_nothing = True

        return reconcile(
            db.source_for(self.source.name),
            db.backend.outputs,
            self.source,
            identifier=self.identifier,
            columns=[self.key, *self.filter],
            current=self.current,
            page_size=page_size,
            on_processed=on_processed,
            absent_is_stale=not self.filter,
            on_nothing_stored=nothing_stored,
            where=self.filter,
            record_writes=functools.partial(db.writer.recording, self.identifier),
        )

    def plan_refresh(
        self,
        batch: Batch,
        db: Datalayer,
        *,
        compute: Compute,
        wait: Callable[[float], bool],
        in_flight: Collection[Hashable] = frozenset(),
        known: Mapping[int, Any] | None = None,
    ) -> PlannedRefresh:
        assert self.source is not None, "prepare() first"
        refresh = Refresh()
        if batch.event is DBEvent.delete:
            return PlannedRefresh((), lambda: self._finish_delete(batch, db, refresh))
        remove: list[Any] = []
        absent = self._known_absent(batch)
        # Every row of the batch known absent and none of them in flight (a bulk insert): no
        # row of it is in flight or has an output to look up, without a look at each.
        clear = len(absent) == len(batch.ids) and absent.isdisjoint(in_flight)
        if in_flight and not clear:
            absent.difference_update(in_flight)
        candidates = self._candidates(batch, refresh, remove)
        # The stored output of a row an earlier window still computes may be replaced before
        # this batch is written (a row changed and changed back): such rows are looked up
        # again, and computed if stale, when this batch is finished, after that window.
        sure, unsure = candidates, _Inputs([], [], [])
        keys = id_keys(candidates.ids) if in_flight and not clear else []
        if any(map(in_flight.__contains__, keys)):
            unsure = candidates.take(k for k, key in enumerate(keys) if key in in_flight)
            sure = candidates.take(k for k, key in enumerate(keys) if key not in in_flight)
        looked_up = [] if clear else self._looked_up(batch, sure.ids, absent)
        stored = db.backend.outputs.output_fingerprints(self.identifier, looked_up) if looked_up else {}
        self._replay_ended(batch, looked_up, stored)
        if stored:
            now = map(stored.get, id_keys(sure.ids))
            todo = sure.take(
                k
                for k, (value, fp, was) in enumerate(zip(sure.values, sure.fingerprints, now, strict=True))
                if fp != was and self._stale(value, fp, was)
            )
        else:
            todo = sure
        # A closed queue means the handler is draining it to stop: a hung call is given up.
        queue = db.cdc.queue

        def call(values: list[Any]) -> Future[list[Any]]:
            executor = self.model.executor or compute
            return executor.submit(self.model, values, wait=wait, stopping=lambda: queue.closed)

        def submit(rows: _Inputs) -> Future[list[Any]]:
            return call(rows.values) if not known else _with_known(known, rows, call)

        work = submit(todo) if todo else None
        late_results: list[tuple[list[int], list[Any]]] = []  # computed at the finish: see computed()

        def computed() -> dict[int, Any]:
            pairs = list(late_results)
            if work is not None and work.done() and not work.cancelled() and work.exception() is None:
                pairs.append((todo.fingerprints, work.result()))
            return {
                fp: output
                for fps, outputs in pairs
                for fp, output in zip(fps, outputs, strict=True)
                if type(output) is not Failure  # computed again: the failure may be the call's, not the row's
            }

        def finish() -> Refresh:
            if work is not None:
                self._write(batch, db, refresh, remove, todo, work.result(), stored)
            late = _Inputs([], [], [])
            if unsure:
                now = db.backend.outputs.output_fingerprints(self.identifier, unsure.ids)
                late = unsure.take(
                    k
                    for k, i in enumerate(unsure.ids)
                    if self._stale(unsure.values[k], unsure.fingerprints[k], now.get(id_key(i)))
                )
                if late:
                    results = submit(late).result()
                    late_results.append((late.fingerprints, results))
                    self._write(batch, db, refresh, remove, late, results, now)
            refresh.skipped = len(candidates) - len(todo) - len(late)
            kept = [i for i in remove if id_key(i) not in absent]
            if kept:
                # A row that left the filter, vanished or failed has no current output.
                db.writer.delete(self.identifier, kept)
                refresh.deleted.extend(kept)
            self._settle_errors(batch, db, refresh)
            return refresh

        return PlannedRefresh(() if work is None else (work,), finish, computed)

    def set_apart(self, batch: Batch, db: Datalayer, error: str) -> Refresh:
        """Each row of ``batch`` fails with ``error`` and, as after a model's failure, has no
        current output."""
        refresh = Refresh()
        remove: list[Any] = []
        for row_id in batch.ids:
            self._fail(refresh, remove, row_id, error)
        db.writer.delete(self.identifier, remove)
        refresh.deleted.extend(remove)
        self._settle_errors(batch, db, refresh)
        return refresh

    def _finish_delete(self, batch: Batch, db: Datalayer, refresh: Refresh) -> Refresh:
        db.writer.delete(self.identifier, batch.ids)
        refresh.deleted.extend(batch.ids)
        self._settle_errors(batch, db, refresh)
        return refresh

    def _candidates(self, batch: Batch, refresh: Refresh, remove: list[Any]) -> _Inputs:
        """The rows to compute (id, input, fingerprint); the others go to ``remove``."""
        if isinstance(batch.rows, TableRows) and len(batch.rows) > FEW_ROWS:
            candidates = self._column_candidates(batch.ids, batch.rows, remove)
            if candidates is not None:
                return candidates
        ids: list[Any] = []
        values: list[Any] = []
        for row_id, row in zip(batch.ids, batch.rows, strict=True):
            if row is None or not self.matches(row):
                remove.append(row_id)
                continue
            value = self._input(row)
            if value is _MISSING:
                error = f"row has no value for key {self.key!r}"
            elif isinstance(value, Unreadable):
                error = f"the value of {self.key!r} cannot be read in Python: {value.error}"
            elif self.max_input_bytes is not None and (size := _input_bytes(value, self.max_input_bytes)) > (
                self.max_input_bytes
            ):
                error = f"input of {size:,} bytes is larger than max_input_bytes={self.max_input_bytes:,}"
            else:
                ids.append(row_id)
                values.append(value)
                continue
            self._fail(refresh, remove, row_id, error)
        digests = self._fingerprinted(values)
        if digests is not None:
            return _Inputs(ids, values, digests)
        # Some value cannot be fingerprinted: found one by one, and only those rows fail.
        ok: list[int] = []
        fingerprints: list[int] = []
        for k, value in enumerate(values):
            try:
                fingerprints.append(self.model.fingerprint(value))
            except (TypeError, ValueError) as exc:
                self._fail(refresh, remove, ids[k], f"cannot fingerprint key {self.key!r}: {exc}")
            else:
                ok.append(k)
        return _Inputs([ids[k] for k in ok], [values[k] for k in ok], fingerprints)

    def _column_candidates(self, ids: Sequence[Any], rows: TableRows, remove: list[Any]) -> _Inputs | None:
        """:meth:`_candidates` of rows read as one Arrow table, from the key's column: the rows
        the filter leaves out (found by Arrow: :meth:`_kept`) go to ``remove``, every other row
        is a candidate; or None, ``remove`` untouched, when some row is not (a filter Arrow
        cannot compare, a missing value, an input too large or that cannot be fingerprinted):
        those rows then go one by one."""
        kept = self._kept(rows)
        if kept is None:
            return None
        mask, rows = kept
        column = self._key_column(rows)
        if column is None:
            return None
        limit, kind = self.max_input_bytes, column.type
        if limit is not None and not any(plain(kind) for plain in _NEVER_TEXT):
            sized = any(text(kind) for text in _TEXT)
            if not sized or (len(column) and pc.max(pc.binary_length(column)).as_py() > limit):
                return None
        try:
            values = pylist(column)
        except NOT_PYTHON:
            return None  # a value Python cannot hold: the rows one by one, that one failing alone
        digests = self._column_fingerprints(column, values)
        if digests is None:
            return None
        if len(rows) < len(ids):
            remove.extend(ids[k] for k in np.flatnonzero(~mask).tolist())
            ids = [ids[k] for k in np.flatnonzero(mask).tolist()]
        return _Inputs(list(ids), values, digests)

    def recorded(self, ids: Sequence[Any]) -> None:
        self._failed.recorded(ids)

    def _settle_errors(self, batch: Batch, db: Datalayer, refresh: Refresh) -> None:
        """Keep ``_reactive_errors`` to the current failures of this listener's rows (:class:`FailedRows`)."""
        self._failed.settle(batch.ids, db, refresh)

    def _set_apart(
        self, refresh: Refresh, remove: list[Any], ids: list[Any], values: list[Any], failed: type
    ) -> list[int]:
        """The positions of ``values`` that are not a ``failed`` (a model's Failure, a store's
        OutputRejected); each row whose value is one fails with its ``error``."""
        ok = []
        for k, value in enumerate(values):
            if isinstance(value, failed):
                self._fail(refresh, remove, ids[k], value.error)
            else:
                ok.append(k)
        return ok

    def _fail(self, refresh: Refresh, remove: list[Any], row_id: Any, error: str) -> None:
        """``row_id`` failed: record why, and remove its output (it has no current one)."""
        refresh.errors.append(ErrorRecord(self.identifier, self.select, row_id, error))
        remove.append(row_id)

    def _write(
        self,
        batch: Batch,
        db: Datalayer,
        refresh: Refresh,
        remove: list[Any],
        todo: _Inputs,
        results: list[Any],
        stored: Mapping[Hashable, int],
    ) -> None:
        """Write the outputs the model computed for ``todo`` (``stored``: the fingerprints found
        before); a failed row goes to ``remove``."""
        assert self.source is not None
        if Failure in set(map(type, results)):
            ok = self._set_apart(refresh, remove, todo.ids, results, Failure)
            todo, results = todo.take(ok), [results[k] for k in ok]
        refresh.computed += len(todo)
        if not todo:
            return
        # ``new``: nothing was stored for any of these rows (new rows, a first backfill), or row by row.
        new = [key not in stored for key in id_keys(todo.ids)] if stored else True
        kept = db.writer.write(self.identifier, self.source, OutputBatch(todo.ids, results, todo.fingerprints, new))
        if OutputRejected in set(map(type, kept)):
            ok = self._set_apart(refresh, remove, todo.ids, kept, OutputRejected)
            written = todo.take(ok)
            refresh.written.extend(written.ids, [kept[k] for k in ok], written.fingerprints)
        else:
            refresh.written.extend(todo.ids, kept, todo.fingerprints)
        if batch.targets is not None:
            self._remember_reconciled(todo.ids)

"""The datalayer: one database, its components, and ``db.cdc``."""

from __future__ import annotations

import atexit
import logging
import os
import threading
import weakref
from collections.abc import Callable, Hashable, Mapping
from types import TracebackType
from typing import Any, Self

from reactive import checks
from reactive.backends import backend_for_uri
from reactive.backends.base import (
    OUTPUTS_PREFIX,
    SOURCE_FIELD,
    DataBackend,
    ErrorRecord,
    SourceReader,
    TableInfo,
    outputs_table,
    own_table,
)
from reactive.cdc import STOP_WAIT_SECONDS, DatabaseChangeDataCapture
from reactive.checkpoints import DEFAULT_LEASE_MS, ENGINE_CHECKPOINT, Lease, check_lease_ms
from reactive.components.base import Component
from reactive.components.listener import Listener, _check_filter, field_value, unmatchable
from reactive.compute import Compute, LocalCompute
from reactive.errors import BackendError, ConfigurationError, LeaseLostError, PermissionDeniedError, SearchError
from reactive.events import ChangePacket, Row, id_key
from reactive.handler import WindowRows
from reactive.metrics import LagQueue
from reactive.outputs import OutputWriter
from reactive.progress import progress_for
from reactive.queue import QUEUE_ROWS
from reactive.rows import warm_arrow

log = logging.getLogger(__name__)

DEFAULT_URI = "duckdb:///reactive.duckdb"

Progress = Callable[[int, int], None]


def _check_settings(**settings: Any) -> dict[str, Any]:
    """The datalayer's settings as kept (numpy's numbers as Python's); a setting out of range is
    refused, by name, before anything starts (a string ``poll_interval`` or ``pipeline`` failed
    inside a thread; ``lease_ms=10`` lapsed all the time).

    >>> _check_settings(queue_rows=10, page_size=5, poll_interval=0.05, lease=True, lease_ms=5000, pipeline=2)
    {'queue_rows': 10, 'page_size': 5, 'poll_interval': 0.05, 'lease': True, 'lease_ms': 5000, 'pipeline': 2}
    >>> _check_settings(poll_interval="1")
    Traceback (most recent call last):
    ...
    reactive.errors.ConfigurationError: poll_interval must be a number of seconds above 0, not '1'
    """
    kept = dict(settings)
    for name, value in settings.items():
        if name in ("queue_rows", "page_size", "pipeline"):
            kept[name] = checks.whole(name, value, least=1)
        elif name == "poll_interval":
            kept[name] = checks.seconds(name, value)
        elif name == "lease_ms":
            kept[name] = check_lease_ms(value)
        elif name == "lease" and not isinstance(value, bool):
            raise ConfigurationError(f"lease must be True or False, not {value!r}")
    return kept


def _identifier(named: Any, method: str) -> Any:
    """A component's identifier from what a ``Datalayer`` method was given: the identifier
    itself, the component (what ``db.add`` returns) or None (all, where the method allows it).

    >>> _identifier("m__text", "remove"), _identifier(None, "errors")
    ('m__text', None)
    >>> _identifier(3, "remove")
    Traceback (most recent call last):
    ...
    reactive.errors.ConfigurationError: db.remove takes a component's identifier (a str) or the component, not int
    """
    if named is None or isinstance(named, str):
        return named
    if isinstance(named, Component):
        return named.identifier
    raise ConfigurationError(
        f"db.{method} takes a component's identifier (a str) or the component, not {type(named).__name__}"
    )


class Datalayer:
    """A database and the components that react to its changes.

    Build one with :func:`reactive.connect`. ``db.add`` declares a component and backfills
    it; ``db.cdc.start()`` follows changes made by any client from then on.

    >>> import duckdb, tempfile, reactive
    >>> from reactive.components import Model, Listener
    >>> path = tempfile.mkdtemp() + "/app.duckdb"
    >>> client = duckdb.connect(path)      # any other client of the same database
    >>> _ = client.execute("create table docs (id int primary key, text varchar)")
    >>> with reactive.connect(f"duckdb:///{path}") as db:
    ...     _ = db.add(Listener(Model("len", predict=lambda xs: [len(x) for x in xs]), "text", "docs"))
    ...     db.cdc.start()
    ...     _ = client.execute("insert into docs values (1, 'four')")
    ...     db.cdc.wait_idle(timeout=10)
    ...     db.outputs("len__text")
    True
    [{'_source': 1, '_output': 4}]
    """

    def __init__(
        self,
        backend: DataBackend,
        *,
        queue_rows: int = QUEUE_ROWS,
        batch_rows: int | WindowRows | None = None,
        page_size: int = 5_000,
        poll_interval: float = 1.0,
        lease: bool = True,
        lease_ms: int = DEFAULT_LEASE_MS,
        compute: Compute | None = None,
        pipeline: int = 2,
    ) -> None:
        settings = _check_settings(
            queue_rows=queue_rows,
            page_size=page_size,
            poll_interval=poll_interval,
            lease=lease,
            lease_ms=lease_ms,
            pipeline=pipeline,
        )
        queue_rows, page_size, poll_interval = settings["queue_rows"], settings["page_size"], settings["poll_interval"]
        lease_ms, pipeline = settings["lease_ms"], settings["pipeline"]
        self.backend = backend
        #: Where model work runs (``LocalCompute``, a thread of this process, by default).
        self.compute: Compute = LocalCompute() if compute is None else compute
        #: Held while the handler writes a window (see :meth:`writing`) and while a component is
        #: taken out of the registry: a window never writes for a component removed before.
        self._writing = threading.RLock()
        #: Where listeners' outputs go: their type fixed once, each output normalized, every
        #: write fenced by the lease (a process that lost it writes nothing).
        self.writer = OutputWriter(
            backend.outputs, backend.output_types, fence=lambda: self.cdc.fence(), window_lock=self._writing
        )
        self.page_size = page_size
        self._components: dict[str, Component] = {}
        self._tables: dict[str, TableInfo] = {}
        self._lock = threading.RLock()
        self._declare_lock = threading.Lock()
        #: Components whose backfill has not finished (adding them again resumes it).
        self._unfinished: set[str] = set()
        #: Components whose interrupted backfill the handler skips while db.cdc stops.
        self._abandoned: set[str] = set()
        #: Components declared while another process held the lease: activated at takeover.
        self._deferred: set[str] = set()
        listener_options: dict[str, Any] = {"poll_interval": poll_interval, "page_size": page_size}
        self.cdc = DatabaseChangeDataCapture(
            self,
            queue_rows=queue_rows,
            batch_rows=batch_rows,
            pipeline=pipeline,
            listener_options=listener_options,
            lease=Lease(backend.sections, ENGINE_CHECKPOINT, lease_ms=lease_ms) if lease else None,
        )

        #: Set by :meth:`close`: every later call says so instead of failing in the driver.
        self._closed = False
        _OPEN.add(self)

    def __repr__(self) -> str:
        return f"Datalayer({self.backend.uri!r})"

    # -- what the handler asks ------------------------------------------------------------
    def components_for(self, table: str, targets: frozenset[str] | None) -> list[Component]:
        """The components reading ``table`` (limited to ``targets`` when given), copied."""
        with self._lock:
            return [
                c
                for c in self._components.values()
                if c.table == table
                and (targets is None or (c.identifier in targets and c.identifier not in self._abandoned))
            ]

    def writing(self) -> threading.RLock:
        """The lock the handler holds while it writes a window's outputs, checking with
        :meth:`registered` that each component it writes for is still added. :meth:`remove`
        takes a component out under it: a window planned before the removal, still computing
        then, wrote afterwards (and a dropped outputs table came back, with the old outputs a
        listener added again then took for current). A reconciliation starts recording the
        outputs written while it runs under it (:meth:`OutputWriter.recording`)."""
        return self._writing

    def registered(self, component: Component) -> bool:
        """Whether ``component`` is the one added under its identifier now."""
        with self._lock:
            return self._components.get(component.identifier) is component

    def _internal_outputs(self, table: str) -> Listener | None:
        """The registered listener writing ``table``, if it is an outputs table."""
        if not table.startswith(OUTPUTS_PREFIX):
            return None
        with self._lock:  # a long identifier's table is named with a hash: compare table names
            return next(
                (c for c in self._components.values() if isinstance(c, Listener) and c.outputs_table == table), None
            )

    def table_info(self, table: str, *, id_column: str | None = None) -> TableInfo:
        """Describe ``table`` (cached once a component uses it). Refuses reactive's own tables
        (:func:`~reactive.backends.base.own_table`), on every backend, and every table once the
        datalayer is closed (a table monitor made or started then met the driver's error)."""
        self.check_open()
        if own_table(table):
            raise ConfigurationError(
                f"{table!r} cannot be followed: it is reactive's own (a listener on it computes reactive's"
                " writes, or sees none of them)",
                table=table,
            )
        with self._lock:
            info = self._tables.get(table)
            if info is not None and (id_column is None or id_column == info.id_column):
                return info
            followed = self.cdc.followed(table)
            if followed is not None:
                return followed.describe(table)
            internal = id_column is None and self._internal_outputs(table) is not None
            if internal and not self.backend.source.table_exists(table):
                # Outputs of a listener in this datalayer: their changes are routed from the
                # handler directly, and the table may not exist until the first output.
                return TableInfo(table, SOURCE_FIELD, ())
            return self.backend.source.describe(table, id_column=id_column)

    def source_for(self, table: str) -> SourceReader:
        """What reads ``table``: the database, or the change feed it is followed from."""
        return self.cdc.followed(table) or self.backend.source

    # -- the public API -------------------------------------------------------------------
    def add(self, component: Component, *, progress: bool | Progress = True) -> Component:
        """Declare ``component``, backfill its outputs, and follow its table from now on.

        Adding a listener whose identifier exists resumes it: only rows whose outputs are
        missing or stale are computed. Adding an equal declaration again does nothing, and
        returns the component already added, unless its model changed (another ``predict``,
        ``version`` or setting): then the new listener replaces the old one, and a new
        ``version`` computes every output again before ``add`` returns. A backfill that did
        not finish (an error, Ctrl-C) is resumed by adding the listener again.

        Raises :class:`~reactive.errors.TableNotFoundError` when the table does not exist,
        :class:`~reactive.errors.MissingIdColumnError` when it has no primary key, and
        :class:`~reactive.errors.ConfigurationError` when the identifier is taken by another
        declaration. ``progress`` logs backfill progress (``True``) or is called with
        ``(rows processed, rows in table)``.

        Ctrl-C (or ``SystemExit``) during the backfill stops ``db.cdc`` before it goes on, so
        no thread of ``reactive`` is left inside the database when the interpreter exits.
        """
        self.check_open()
        if not isinstance(component, Component):
            raise ConfigurationError(f"db.add takes a component (e.g. a Listener), not {type(component).__name__}")
        # Declarations are serialized by _declare_lock; _lock only guards the registry, so
        # the handler is never held up while a table is described or a stream reopened.
        with self._declare_lock:
            with self._lock:
                existing = self._components.get(component.identifier)
                if existing is not None:
                    component = self._redeclared(existing, component)
                    if component is existing and existing.identifier not in self._unfinished:
                        return existing
                self._check_chain(component)
            source = component.prepare(self)
            self.check_id_column(source.name, source.id_column, "a component", besides=component.identifier)
            active = self.cdc.acquire()
            if active:
                self._follow(component, source)
            with self._lock:
                self._tables[source.name] = source
                self._components[component.identifier] = component
                self._unfinished.add(component.identifier)
                if not active:
                    self._deferred.add(component.identifier)
        if not active:
            log.info(
                "%s is declared; another process holds the lease of %s, so its backfill waits until this one "
                "takes over",
                component.identifier,
                self.backend.uri,
            )
            return component
        self._backfill(component, source, progress)
        return component

    def followed_by(self, table: str, *, besides: str | None = None) -> tuple[str, str] | None:
        """The id column ``table`` is followed by and for what (its components but ``besides``,
        or its table monitors), or None where nothing follows it yet."""
        with self._lock:
            others = [c.identifier for c in self._components.values() if c.table == table and c.identifier != besides]
            followed = self._tables.get(table)
        if others and followed is not None:
            return followed.id_column, ", ".join(others)
        monitored = self.cdc.monitored_by(table)
        return None if monitored is None else (monitored, "its table monitors")

    def check_id_column(self, table: str, id_column: str, what: str, *, besides: str | None = None) -> None:
        """A table is followed by one id column: refuse ``what`` (a component, a table monitor)
        that identifies ``table``'s rows by ``id_column`` where the table is followed by another
        (its snapshot is keyed by one; following it by two made every poll see the table
        altered, and its listeners stopped)."""
        found = self.followed_by(table, besides=besides)
        if found is not None and found[0] != id_column:
            by, whom = found
            raise ConfigurationError(
                f"table {table!r} is followed by its id column {by!r} (for {whom}): {what} on it cannot"
                f" identify rows by {id_column!r}; pass id_column={by!r}",
                table=table,
            )

    def _follow(self, component: Component, source: TableInfo) -> None:
        """Create what ``component`` writes to and follow its table (this process holds the lease)."""
        component.activate(self)
        if self._internal_outputs(source.name) is None and self.cdc.followed(source.name) is None:
            # Follow the table before reading it for the backfill: nothing falls between.
            self.cdc.listen(source)

    def activate_components(self, *, start: Callable[[], None]) -> None:
        """At a takeover: follow the tables of the deferred components, ``start()`` the change
        listener, then run their backfills (``db.cdc`` calls this)."""
        with self._lock:
            deferred = [self._components[i] for i in self._deferred if i in self._components]
        for component in deferred:
            self._follow(component, self.table_info(component.table))
        start()
        for component in deferred:
            self._backfill(component, self.table_info(component.table), progress=True)
            with self._lock:
                self._deferred.discard(component.identifier)

    def deactivate_components(self) -> None:
        """The lease was lost: every component is activated again at the next takeover."""
        with self._lock:
            self._deferred.update(self._components)

    @staticmethod
    def _redeclared(existing: Component, component: Component) -> Component:
        """The component to keep when ``component`` is added under a taken identifier.

        The one already added when nothing differs; the new one when only its model or
        settings differ (a model is never swapped silently); an error for another declaration.
        """
        if not (
            isinstance(existing, Listener) and isinstance(component, Listener) and existing.same_declaration(component)
        ):
            raise ConfigurationError(
                f"a component {component.identifier!r} is already added with another declaration; "
                f"db.remove({component.identifier!r}) first",
                listener=component.identifier,
            )
        if existing.same_settings(component):
            return existing
        old, new = existing.model, component.model
        if old.version == new.version and not old.same_function(new):
            log.warning(
                "listener %s: the new model %r has the version of the old one (%r), so the stored outputs are "
                "kept; give it a new version= to compute them again",
                component.identifier,
                new,
                new.version,
            )
        log.info("listener %s: %r replaces %r", component.identifier, new, old)
        return component

    def _check_chain(self, component: Component) -> None:
        seen = {component.identifier}
        table = component.table
        if isinstance(component, Listener) and component.outputs_table == table:
            # Not registered yet, so the walk below misses it: each output it wrote was a change
            # that computed it again, for ever, and db.cdc.stop() waited for the handler in vain.
            raise ConfigurationError(
                f"listener {component.identifier!r} would read its own outputs", listener=component.identifier
            )
        while (upstream := self._internal_outputs(table)) is not None:
            if upstream.identifier in seen:
                raise ConfigurationError(f"listener {component.identifier!r} would read its own outputs")
            seen.add(upstream.identifier)
            table = upstream.table

    def _backfill(self, component: Component, source: TableInfo, progress: bool | Progress) -> None:
        """Reconcile ``component`` and wait until the handler processed what that queued."""
        reader = self.source_for(source.name)
        exists = source.columns or reader.table_exists(source.name)
        total = reader.count(source, where=dict(component.filter) or None) if exists else 0
        tracker = _Backfill(component.identifier, total, progress)
        queue = self.cdc.queue
        queued_before = queue.rows_put_for(component.identifier) if isinstance(queue, LagQueue) else None
        try:
            self.cdc.ensure_handler()
            packets = self.cdc.reconcile([component], on_processed=tracker.processed)
            if queued_before is not None and isinstance(queue, LagQueue):
                tracker.queued(queue.rows_put_for(component.identifier) - queued_before)
            tracker.wait_for(packets)
        except BaseException as exc:
            tracker.close(done=False)
            if isinstance(exc.__cause__, LeaseLostError) and not self.cdc.acquire():
                # Paused past its lease (a stopped process, a long GC) while another took
                # over: a standby now, whose backfill waits until this process takes over.
                with self._lock:
                    self._deferred.add(component.identifier)
                log.warning(
                    "another process took the lease of %s during the backfill of %s: this process is a standby; "
                    "the backfill goes on when it takes over",
                    self.backend.uri,
                    component.identifier,
                )
                return
            interrupt = _interrupt_in(exc)
            if interrupt is None:
                log.error("backfill of %s did not finish; adding it again resumes it", component.identifier)
                raise
            self._interrupted(component)
            if interrupt is exc:
                raise
            # A driver's error for Ctrl-C (DuckDB's "Query interrupted") ends as the Ctrl-C it was.
            raise type(interrupt)(*interrupt.args) from exc
        with self._lock:
            self._unfinished.discard(component.identifier)

    def _interrupted(self, component: Component) -> None:
        """Ctrl-C during a backfill: skip the rest of it and stop ``db.cdc`` before the
        interrupt goes on. A script that ends there would otherwise exit while the handler is
        inside the database, and an embedded database aborts the process (DuckDB: SIGABRT)."""
        log.warning(
            "backfill of %s interrupted: change data capture stops; add it again to resume the backfill",
            component.identifier,
        )
        with self._lock:
            self._abandoned.add(component.identifier)
        try:
            self.cdc.stop()
        finally:
            with self._lock:
                self._abandoned.discard(component.identifier)

    def remove(self, identifier: str | Component, *, drop_outputs: bool = False) -> None:
        """Stop routing changes to ``identifier`` (or the component ``db.add`` returned); with
        ``drop_outputs`` delete its outputs, and when no other component reads its table, what
        following the table kept (a SQL table's snapshot): a listener added again then starts
        afresh, by whatever id column."""
        self.check_open()
        identifier = _identifier(identifier, "remove")
        with self._declare_lock:
            with self._writing, self._lock:  # a window being written finishes first (see writing())
                component = self._components.get(identifier)
                if component is None:
                    added = ", ".join(self._components) or "none"
                    raise ConfigurationError(f"no component {identifier!r}; added: {added}")
                readers = [c.identifier for c in self._components.values() if c.table == outputs_table(identifier)]
                if drop_outputs and readers:
                    # Its outputs table dropped under them, they kept outputs of rows gone, said nothing,
                    # and a new process could not declare them (the table they select is missing).
                    raise ConfigurationError(
                        f"{', '.join(map(repr, readers))} reads the outputs of {identifier!r}: remove it first, "
                        f"or remove {identifier!r} without drop_outputs"
                    )
                del self._components[identifier]
                self._unfinished.discard(identifier)
                self._deferred.discard(identifier)
                unused = not any(c.table == component.table for c in self._components.values())
                if unused:
                    self._tables.pop(component.table, None)
            if unused:
                self.cdc.unlisten(component.table, forget=drop_outputs)
        if drop_outputs:
            component.drop(self)

    def show(self) -> list[dict[str, Any]]:
        """The components added to this datalayer."""
        with self._lock:
            return [c.describe() for c in self._components.values()]

    def outputs(self, identifier: str | Component) -> list[dict[str, Any]]:
        """The stored outputs of listener ``identifier`` (or the listener): dicts with ``_source``
        and ``_output``."""
        self.check_open()
        identifier = _identifier(identifier, "outputs")
        self._check_listener(identifier)
        return self.backend.outputs.read_outputs(identifier)

    def _check_listener(self, identifier: str) -> None:
        """Raise unless ``identifier`` is a component added here or has outputs stored."""
        with self._lock:
            known = identifier in self._components
        if not known and not self.backend.source.table_exists(outputs_table(identifier)):
            raise ConfigurationError(f"no listener {identifier!r}; added: {', '.join(self._components) or 'none'}")

    def errors(self, identifier: str | Component | None = None) -> list[dict[str, Any]]:
        """Rows that could not be processed: listener, table, source id, error, time (of one
        component, by identifier or the component, or of all)."""
        self.check_open()
        identifier = _identifier(identifier, "errors")
        errors = self.backend.errors.read_errors(identifier)
        if identifier is not None and not errors:
            self._check_listener(identifier)  # a misspelt name is not "no errors"
        return errors

    def retry_errors(self, identifier: str | Component | None = None) -> int:
        """Compute again the rows that failed, and return how many failed rows were retried.

        For listener ``identifier`` (default: every component added here), the recorded
        errors are cleared, then the listener is reconciled, like a resumed ``db.add``: a
        failed row has no output, so it is queued again (read when processed; a row gone by
        then is a delete), with anything else missing or stale. Waits until those rows are
        processed; a row that fails again is recorded again. Errors of listeners not added
        in this process are left alone: retrying needs the model.

        Raises :class:`~reactive.errors.ConfigurationError` for an identifier not added.
        """
        self.check_open()
        identifier = _identifier(identifier, "retry_errors")
        if not self.cdc.acquire():
            raise LeaseLostError(f"another process holds the lease of {self.backend.uri}: retry the errors there")
        with self._lock:
            if identifier is not None and identifier not in self._components:
                added = ", ".join(self._components) or "none"
                raise ConfigurationError(f"no component {identifier!r} to retry; added: {added}")
            components = [c for c in self._components.values() if identifier in (None, c.identifier)]
        retried = 0
        for component in components:
            errors = self.backend.errors.read_errors(component.identifier)
            sources = [error["source"] for error in errors]
            if not sources:
                continue
            self.backend.errors.clear_errors(component.identifier, sources)
            retried += len({id_key(source) for source in sources})
            try:
                self._backfill(component, self.table_info(component.table), progress=False)
            except BaseException:
                self._restore_errors(component.identifier, errors)
                raise
        return retried

    def _restore_errors(self, identifier: str, errors: list[dict[str, Any]]) -> None:
        """A retry that did not finish: record again the errors it cleared of the rows that
        still have neither an output nor a new error, so that they stay listed."""
        try:
            sources = [error["source"] for error in errors]
            settled = set(self.backend.outputs.output_fingerprints(identifier, sources))
            settled.update(id_key(error["source"]) for error in self.backend.errors.read_errors(identifier))
            kept = [
                ErrorRecord(identifier, error["table"], error["source"], error["error"])
                for error in errors
                if id_key(error["source"]) not in settled
            ]
            if kept:
                self.backend.errors.record_errors(kept)
        except Exception as exc:  # the database is down: the rows are found without an output later
            log.warning("could not record again the errors of %s that a retry cleared: %s", identifier, exc)

    def search(
        self,
        index: str,
        query: Any,
        k: int = 10,
        *,
        filter: Mapping[str, Any] | None = None,
        rows: bool = False,
    ) -> list[dict[str, Any]]:
        """The ``k`` rows nearest to ``query`` in :class:`~reactive.components.VectorIndex` ``index``.

        ``query`` is a vector, or text when the index has a ``query_model``. Each result is
        ``{"_source": <row id>, "_distance": <float>}``, nearest first, with the source row
        under ``"row"`` when ``rows`` is True. ``filter`` (field -> value, equality on the
        source rows' fields) keeps only matching rows: the graph is asked for more candidates
        until ``k`` match (or every row was considered), so a filter does not cost recall. A
        bad query raises :class:`~reactive.errors.SearchError` (a ``ValueError``).
        """
        self.check_open()
        from reactive.components.vector_index import VectorIndex

        with self._lock:
            component = self._components.get(index)
            indexes = [i for i, c in self._components.items() if isinstance(c, VectorIndex)]
        if not isinstance(component, VectorIndex):
            raise SearchError(f"no index {index!r}; indexes: {', '.join(indexes) or 'none'}")
        listener = self._components.get(component.listener)
        conditions = _check_filter(filter)
        if conditions and isinstance(listener, Listener):
            # As at db.add: a field the table has no column for would match no row, silently.
            columns = self.table_info(listener.select).columns
            missing = [field for field in conditions if columns and field not in columns]
            if missing:
                raise SearchError(
                    f"table {listener.select!r} has no column {missing[0]!r} to filter on"
                    f" (columns: {', '.join(columns)})"
                )
        need_rows = rows or bool(conditions)
        found: dict[Hashable, Row] = {}

        def keep(candidates: list[Any]) -> set[Hashable]:
            missing = [c for c in candidates if id_key(c) not in found]
            if missing and isinstance(listener, Listener):
                found.update(self.source_for(listener.select).read_rows(self.table_info(listener.select), missing))
            return {
                key
                for key in map(id_key, candidates)
                if key in found and all(field_value(found[key], f) == v for f, v in conditions.items())
            }

        try:
            hits = component.search(query, k, keep=keep if need_rows else None)
        except Exception:
            self.check_open()  # closed under the search: say so, not the driver's words
            raise
        if conditions and not hits and found:
            # Nothing matched: say so where no row of a type the rows hold could have.
            why = next((w for row in found.values() if (w := unmatchable(row, conditions))), None)
            if why is not None:
                log.warning("search in %r: filter %r matches no row whose %s", index, conditions, why)
        results = [{SOURCE_FIELD: hit.source, "_distance": hit.distance} for hit in hits]
        if rows:
            for result, hit in zip(results, hits, strict=True):
                result["row"] = found.get(id_key(hit.source))
        return results

    def components(self) -> list[Component]:
        """The components added to this datalayer (a copy)."""
        with self._lock:
            return list(self._components.values())

    def check_open(self) -> None:
        """ConfigurationError once :meth:`close` was called (the driver's own error said only
        that a connection was closed)."""
        if self._closed:
            raise ConfigurationError(
                f"the datalayer of {self.backend.uri!r} is closed; reactive.connect() makes a new one"
            )

    def close(self) -> None:
        """Stop change data capture and its feeds, save what components hold (indexes), and close
        the connection. Closing again does nothing. Locks another client holds on the database
        are waited for about a second in all (see :meth:`DatabaseChangeDataCapture.stop`): a
        feed reading a table for a subscriber gives up too."""
        if self._closed:
            return
        self._closed = True
        try:
            with self.backend.stopping(STOP_WAIT_SECONDS):
                self.cdc.stop()
                self.cdc.close_feeds()
                for component in self.components():
                    try:
                        component.close(self)
                    except Exception:
                        log.exception("could not close %s", component.identifier)
                self.backend.close()
        except BaseException:
            self._closed = False  # not closed after all: closing again tries again
            raise

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


#: Datalayers not closed yet: at interpreter exit their change data capture is stopped, so no
#: thread of reactive is inside the database when it goes (DuckDB aborts the process then).
_OPEN: weakref.WeakSet[Datalayer] = weakref.WeakSet()


@atexit.register
def _stop_at_exit() -> None:
    for db in list(_OPEN):
        try:
            db.cdc.stop(timeout=10)
        except Exception:
            log.exception("stopping %r at exit failed", db)


def _interrupt_in(exc: BaseException) -> KeyboardInterrupt | SystemExit | None:
    """The Ctrl-C or exit ``exc`` is, or that a driver raised ``exc`` for; None if neither.

    DuckDB turns a KeyboardInterrupt during a query into ``RuntimeError('Query
    interrupted')`` caused by it.

    >>> try:
    ...     try:
    ...         raise KeyboardInterrupt
    ...     except KeyboardInterrupt as interrupt:
    ...         raise RuntimeError("Query interrupted") from interrupt
    ... except RuntimeError as exc:
    ...     _interrupt_in(exc), _interrupt_in(ValueError("bad"))
    (KeyboardInterrupt(), None)
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, KeyboardInterrupt | SystemExit):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


class _Backfill:
    """Counts a backfill's packets as the handler processes them, and reports progress
    (:mod:`reactive.progress`: a bar on a terminal, log lines otherwise, or the callable)."""

    def __init__(self, identifier: str, total: int, progress: bool | Progress) -> None:
        self.identifier = identifier
        self.total = total
        self.progress = progress
        self.packets = 0
        self.rows = 0
        self.failures: list[BaseException] = []
        self._done = threading.Condition()
        self.reporter = progress_for(identifier, total, progress)
        self._closed = False

    def processed(self, packet: ChangePacket, error: BaseException | None) -> None:
        with self._done:
            self.packets += 1
            self.rows += len(packet)
            rows = self.rows
            if error is not None:
                self.failures.append(error)
            self._done.notify_all()
            if self._closed:
                # Ended (Ctrl-C): the handler passes over the rest of its packets, computing
                # nothing for this component; reported, they took the progress to its total.
                return
        self.reporter.update(rows)

    def queued(self, rows: int) -> None:
        """Every packet is queued, ``rows`` rows in all (fewer than the table's when most outputs
        are current): the total that progress is measured against from now on."""
        self.reporter.set_total(rows)

    def close(self, *, done: bool) -> None:
        """End the progress report (once); nothing is reported after it."""
        with self._done:
            closed, self._closed = self._closed, True
        if not closed:
            self.reporter.close(done=done)

    def wait_for(self, queued: int) -> None:
        """Wait until ``queued`` packets are processed; raise if any failed."""
        with self._done:
            self._done.wait_for(lambda: self.packets >= queued)
        self.close(done=not self.failures)
        refused = next((f for f in self.failures if isinstance(f, PermissionDeniedError)), None)
        if refused is not None:  # what to grant, as it is: no row failed
            raise PermissionDeniedError(f"{refused}; adding it again resumes the backfill", listener=self.identifier)
        if self.failures:
            raise BackendError(
                f"backfill of {self.identifier!r} failed for some rows: {self.failures[0]}; adding it again resumes it",
                listener=self.identifier,
            ) from self.failures[0]


def connect(uri: str | None = None, **options: Any) -> Datalayer:
    """Connect to a database and return its :class:`Datalayer`.

    ``uri`` defaults to ``$REACTIVE_URI``, else a DuckDB file ``reactive.duckdb`` in the
    working directory. Options: ``poll_interval`` (seconds between polls of SQL tables),
    ``queue_rows`` (bound of the change queue, default 50,000 rows), ``batch_rows`` (the
    most rows the handler takes at once, and hands a component in one batch; default None:
    windows start at 5,000 rows and grow to 50,000 while each takes under 0.25 s; a
    :class:`~reactive.WindowRows` sets those bounds), ``page_size``
    (rows per backfill page), ``lease`` (default True: only the
    process holding the database's lease runs listeners; others wait as standbys) and
    ``lease_ms`` (how long a lease lasts unrenewed, default 5,000), ``compute`` (where model
    work runs: a :class:`~reactive.compute.Compute`, default :class:`~reactive.compute.LocalCompute`)
    and ``pipeline`` (windows of changes in flight in the handler, default 2: while the model
    computes one, the next is read and the one before is written; 1 turns pipelining off).
    SQL backends also take ``version_columns`` (table -> column or
    :class:`~reactive.VersionColumn`: polls read only rows past the last version seen).

    >>> import reactive
    >>> reactive.connect("mysql://root:hunter2@db/app")
    Traceback (most recent call last):
    ...
    reactive.errors.ConfigurationError: invalid database URI 'mysql://root:***@db/app'; supported schemes: ...
    """
    uri = uri or os.environ.get("REACTIVE_URI") or DEFAULT_URI
    names = ("queue_rows", "batch_rows", "page_size", "poll_interval", "lease", "lease_ms", "compute", "pipeline")
    datalayer_options = {name: options.pop(name) for name in names if name in options}
    backend = backend_for_uri(uri).from_uri(uri, **options)
    warm_arrow()
    return Datalayer(backend, **datalayer_options)

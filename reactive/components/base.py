"""What the handler routes batches to."""

from __future__ import annotations

import dataclasses as dc
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Hashable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from reactive.backends.base import ErrorRecord
from reactive.events import id_key

if TYPE_CHECKING:
    from reactive.backends.base import TableInfo
    from reactive.components.model import Batching, ModelCalls
    from reactive.compute import Compute
    from reactive.datalayer import Datalayer
    from reactive.events import Batch, ChangePacket
    from reactive.reconcile import OnProcessed

log = logging.getLogger(__name__)


class Written:
    """The outputs a refresh wrote, as three aligned lists: source ids, outputs as stored,
    fingerprints of the inputs. Iterating gives ``(source id, output, fingerprint)``.

    >>> written = Written()
    >>> written.extend([1, 2], ["a", "b"], [10, 20])
    >>> len(written), list(written)
    (2, [(1, 'a', 10), (2, 'b', 20)])
    """

    __slots__ = ("fingerprints", "ids", "outputs")

    def __init__(self) -> None:
        self.ids: list[Any] = []
        self.outputs: list[Any] = []
        self.fingerprints: list[int] = []

    def extend(self, ids: Sequence[Any], outputs: Sequence[Any], fingerprints: Sequence[int]) -> None:
        if not len(ids) == len(outputs) == len(fingerprints):
            raise ValueError("ids, outputs and fingerprints must be as long")
        self.ids.extend(ids)
        self.outputs.extend(outputs)
        self.fingerprints.extend(fingerprints)

    def __len__(self) -> int:
        return len(self.ids)

    def __iter__(self) -> Iterator[tuple[Any, Any, int]]:
        return zip(self.ids, self.outputs, self.fingerprints, strict=True)


@dc.dataclass
class Refresh:
    """What a component did with one batch."""

    computed: int = 0
    skipped: int = 0
    #: The outputs written (see :class:`Written`).
    written: Written = dc.field(default_factory=Written)
    deleted: list[Any] = dc.field(default_factory=list)
    errors: list[ErrorRecord] = dc.field(default_factory=list)


@dc.dataclass(frozen=True, slots=True)
class PlannedRefresh:
    """A batch's refresh under way: its model work, and what finishes it once that is done.

    ``work`` are the futures of the model calls (empty when nothing is computed);
    ``finish()`` waits for them, writes the outputs and returns what was done. ``computed()``,
    where given, returns the outputs its model work produced so far, by input fingerprint:
    when the window fails to be written, the handler plans its rows again with those as
    ``known`` (see :meth:`Component.plan_refresh`), so that a retry or narrowing does not
    compute them again.
    """

    work: Sequence[Future[Any]]
    finish: Callable[[], Refresh]
    computed: Callable[[], Mapping[int, Any]] | None = None


#: How many failed row ids a component remembers to clear their errors once they succeed.
FAILED_MEMORY = 100_000


class FailedRows:
    """The rows of one component with recorded errors, so that ``_reactive_errors`` keeps only
    its current failures: a row recorded as failed that now succeeds, or is gone, loses its
    records; one that failed again keeps only the new record (the handler records it after
    :meth:`settle`). Only the failures this process knows of are settled: those recorded when
    the component was prepared (up to :data:`FAILED_MEMORY`) and those since."""

    def __init__(self, identifier: str) -> None:
        self.identifier = identifier
        self._ids: set[Hashable] | None = set()  # None: too many to keep

    def load(self, db: Datalayer) -> None:
        """Take the failures recorded so far (``prepare`` calls it)."""
        failed = {id_key(error["source"]) for error in db.backend.errors.read_errors(self.identifier)}
        self._ids = failed if len(failed) <= FAILED_MEMORY else None

    def settle(self, ids: Sequence[Any], db: Datalayer, refresh: Refresh) -> None:
        """Clear the records of ``ids`` (a batch just processed), then remember ``refresh``'s errors."""
        if self._ids is None:
            return
        settled = [row_id for row_id in ids if id_key(row_id) in self._ids] if self._ids else []
        if settled:
            try:
                db.backend.errors.clear_errors(self.identifier, settled)
            except Exception as exc:
                if db.backend.is_transient(exc):
                    raise
                # Bookkeeping must not fail a batch whose outputs are written; tried again later.
                log.warning("could not clear %d settled errors of %s: %s", len(settled), self.identifier, exc)
                return
            self._ids.difference_update(map(id_key, settled))
        self.recorded(error.source for error in refresh.errors)

    def recorded(self, ids: Iterable[Any]) -> None:
        """Remember that errors of ``ids`` were recorded (by :meth:`settle`'s caller, or by the
        handler for a window the database refused), to clear them once the rows succeed."""
        if self._ids is None:
            return
        self._ids.update(map(id_key, ids))
        if len(self._ids) > FAILED_MEMORY:
            self._ids = None


class Component(ABC):
    """A unit that reacts to the changes of one table.

    Components never touch a socket or a thread: the handler calls :meth:`plan_refresh`
    with collated batches, and the component reads and writes through ``db.backend`` and
    ``db.writer`` and hands model work to the handler's :class:`~reactive.compute.Compute`.
    """

    identifier: str
    #: Equalities every row the component follows satisfies (a ``Listener``'s ``filter``): a
    #: backfill's progress starts from the rows the database counts by them.
    filter: Mapping[str, Any] = MappingProxyType({})

    @property
    @abstractmethod
    def table(self) -> str:
        """The table this component reads."""

    @abstractmethod
    def prepare(self, db: Datalayer) -> TableInfo:
        """Check the declaration against the database (called by ``db.add``); writes nothing:
        a standby prepares the components it will run once it holds the lease."""

    def activate(self, db: Datalayer) -> None:  # noqa: B027 - most components need nothing here
        """Create what the component writes to (the process holds the lease: it runs it)."""

    @abstractmethod
    def plan_refresh(
        self,
        batch: Batch,
        db: Datalayer,
        *,
        compute: Compute,
        wait: Callable[[float], bool],
        in_flight: Collection[Hashable] = frozenset(),
    ) -> PlannedRefresh:
        """Start bringing the outputs for ``batch`` up to date: read what is needed, submit the
        model work to ``compute``; write nothing (``finish()`` of the result writes).

        The handler plans a window while the one before it is still computing, so the stored
        outputs of the ids in ``in_flight`` (id keys of ``batch.table`` that an earlier,
        unfinished window changes) cannot be trusted: they may be rewritten before this batch
        is. ``wait(seconds)`` sleeps for a retry backoff and returns False when the engine is
        stopping.

        A window that failed to be written is planned again (a retry while the database is
        unreachable; narrowing, see :class:`~reactive.handler.CDCHandler`): a component whose
        earlier :class:`PlannedRefresh` gave ``computed`` then gets ``known=`` what it returned
        (outputs by input fingerprint), and takes an input's output from it instead of
        computing it again. Components that give no ``computed`` never get ``known``.
        """

    @abstractmethod
    def reconcile(
        self, db: Datalayer, *, page_size: int, on_processed: OnProcessed | None = None
    ) -> Iterator[ChangePacket]:
        """Packets that bring missing or stale outputs up to date (backfill and resume).

        Built by :func:`reactive.reconcile.reconcile`; ``on_processed`` is set on each.
        """

    def set_apart(self, batch: Batch, db: Datalayer, error: str) -> Refresh:
        """The rows of ``batch`` failed alone in the handler (see ``CDCHandler``): each fails
        with ``error``, recorded in the errors table like a model's failure, so that the changes
        after it go on. Returns what was done (the handler records ``errors``)."""
        refresh = Refresh()
        refresh.errors.extend(ErrorRecord(self.identifier, batch.table, i, error) for i in batch.ids)
        return refresh

    def recorded(self, ids: Sequence[Any]) -> None:  # noqa: B027 - most components keep no errors
        """The handler recorded errors for these rows of the component (a window the database
        refused: see ``CDCHandler``): a component that settles its rows' errors once they succeed
        settles these too."""

    def close(self, db: Datalayer) -> None:  # noqa: B027 - most components hold nothing
        """Release what the component holds in this process (``db.close()`` calls it)."""

    def drop(self, db: Datalayer) -> None:  # noqa: B027 - a listener's outputs are dropped by db.writer
        """Delete what the component keeps outside the database (``db.remove(..., drop_outputs=True)``)."""

    @property
    def model_calls(self) -> ModelCalls | None:
        """A live view of the component's model calls (``db.cdc.info()`` shows it), if it has a model."""
        return None

    def batching(self) -> Batching | None:
        """How the component's model cuts a window into calls, if it has one that sorts its
        inputs by length (the handler's windows hold enough of its batches)."""
        return None

    def describe(self) -> dict[str, Any]:
        return {"identifier": self.identifier, "type": type(self).__name__, "table": self.table}

"""``reactive.checkpoints.Table``: named checkpoints of sections, the one place every position lives.

The API is the ASP checkpointing service's ``Table`` (the seed in ``shared/seeds``), with its
method names, so code written for it ports::

    from reactive.checkpoints import Table

    t = Table("jobs", Table.WR_ALL_REPLICAS, retention_ms=None, max_sections=100,
              max_section_size_bytes=64 * 1024, max_section_id_size_bytes=128)   # store=None: a SQLite file
    t.Write("cursor", "42")
    t.Read(["cursor", "missing"])          # {'cursor': '42'}

A checkpoint is a set of sections (key -> data, ``bytes`` or ``str``, returned as written). It
lives in a :class:`SectionStore`: the datalayer's own database (``_reactive_checkpoints``),
so a position and the outputs it covers are in one place, or an embedded SQLite file for a
process without a datalayer. The engine keeps its own positions (MongoDB resume tokens, output
types, Kinetica's monitor records, Ibis snapshot metadata) in the checkpoint ``reactive``, and
its lease in section ``__lease__`` of it.

**Flags** (the seed's, mapped onto a database):

- ``WR_ALL_REPLICAS``: synchronous. ``Write`` returns once the write is durable in the
  database; any process may write, no lease needed.
- ``WR_ACTIVE_REPLICA``: asynchronous. Writes are queued and written behind, in order, each
  ``Write`` call atomically (all its sections or none); only the active replica writes: each
  write behind checks the lease (in its transaction where the store has them), and what a
  process queued before it lost the lease is given up, never written over the new holder's.
- ``WR_ACTIVE_REPLICA_WEAK``: asynchronous, without the atomicity promise: the sections of
  one call may be written one by one.
- ``CHECKPOINT_COLLOCATED``: no active replica until :meth:`Table.Activate`. Without it, an
  asynchronous table activates itself when it is opened (if no other process is active).

**The active replica** is the process holding the checkpoint's lease (a section with the
holder, an epoch that grows at each change of holder, and an expiry): :meth:`Table.Activate`
takes it when it is free, expired, or held by a process of this host that is gone;
:meth:`Table.GetActiveStatus` says whether this process holds it; :meth:`Table.SetAutoActivate`
makes a standby take over on its own when the holder dies. A holder renews its lease on a
named daemon thread; a lease not renewed within ``lease_ms`` expires. Expiry compares wall
clocks: processes on different hosts need synchronized clocks.

**Writes** are atomic per call (one statement or one transaction; a SIGKILL leaves a section's
old or new value, never a mix). The seed's forms differ on purpose, and this module follows
them: ``Write("key", data)`` replaces the section (it truncates); the container forms
``Write([("k1", d1), ...])`` and ``Write({"k1": d1})`` write over the start of an existing
section and keep its tail when the new data is shorter (they do not truncate; data of the
other kind, ``str`` over ``bytes``, replaces). Limits are checked before anything is written:
a refused call raises :class:`CheckpointLimitError` (a ``ValueError``) and writes nothing.
Sections not written for ``retention_ms`` expire: reads no longer see them and the next write
removes them.

A ``Table`` needs no ``close()``: its threads are daemons, and pending asynchronous writes are
flushed (for at most a few seconds) when the interpreter exits.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import dataclasses as dc
import json
import logging
import os
import socket
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from reactive import checks
from reactive.errors import ConfigurationError, ReactiveError
from reactive.events import is_utf8
from reactive.fingerprints import plain_value

if TYPE_CHECKING:
    from reactive.backends.base import DataBackend
    from reactive.datalayer import Datalayer

log = logging.getLogger(__name__)

#: The engine's own checkpoint (positions, output types, its lease).
ENGINE_CHECKPOINT = "reactive"
LEASE_SECTION = "__lease__"
#: ``store=None``: this file, in the working directory unless ``$REACTIVE_CHECKPOINTS`` says.
DEFAULT_FILE = "reactive-checkpoints.sqlite"
#: Seconds a lease lasts without renewal (it is renewed every third of it).
DEFAULT_LEASE_MS = 5_000

#: The shortest lease: it is renewed every third of it, and a write needs a third still ahead.
MIN_LEASE_MS = 100
#: The longest: a holder on another host that dies is replaced after its lease at the latest. A
#: lease of 1e30 ms was taken, and its keeper's first wait (a third of it) ended its thread with
#: an OverflowError: nothing renewed it, and a standby's never took over.
MAX_LEASE_MS = 86_400_000


def check_lease_ms(lease_ms: object) -> float:
    """``lease_ms`` if it is a finite number of milliseconds from :data:`MIN_LEASE_MS` to
    :data:`MAX_LEASE_MS` (the one check of it: ``reactive.connect`` and :class:`Table` both take one)."""
    return checks.milliseconds("lease_ms", lease_ms, least=MIN_LEASE_MS, most=MAX_LEASE_MS, most_is="a day")


_EXIT_FLUSH_SECONDS = 5.0


class CheckpointError(ReactiveError):
    """A checkpoint operation failed."""


class CheckpointLimitError(CheckpointError, ConfigurationError):
    """A write over a limit (sections, section size, key size); nothing was written."""


class NotActiveError(CheckpointError):
    """An asynchronous write from a process that is not the active replica."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint section that cannot be read back (not what was written)."""


@dc.dataclass(frozen=True, slots=True)
class Section:
    """One section as stored: its data as bytes, whether it was written as ``str``, and when."""

    data: bytes
    text: bool
    written_at: float

    @classmethod
    def of(cls, value: bytes | str, written_at: float | None = None) -> Section:
        if isinstance(value, str):
            return cls(value.encode("utf-8", "surrogatepass"), True, time.time() if written_at is None else written_at)
        if isinstance(value, bytes | bytearray | memoryview):
            return cls(bytes(value), False, time.time() if written_at is None else written_at)
        raise TypeError(f"section data must be bytes or str, not {type(value).__name__}")

    @property
    def value(self) -> bytes | str:
        """The data as it was written."""
        return self.data.decode("utf-8", "surrogatepass") if self.text else self.data


class SectionStore(Protocol):
    """Where sections live: the role a backend provides (``reactive/backends/*/checkpoints.py``).

    Every method is atomic on its own. :meth:`replace_section` is a compare-and-set: it
    writes ``new`` (or deletes, when ``new`` is None) only if the section's data is still
    ``expected`` (absent when ``expected`` is None), and says whether it did.
    """

    def read_sections(
        self, checkpoint: str, keys: Sequence[str] | None = None, *, lock: bool = False
    ) -> dict[str, Section]:
        """Sections of ``checkpoint`` (those of ``keys`` that exist, or all). ``lock``: inside a
        transaction of the store, lock those rows until it ends (where the store can)."""

    def write_sections(self, checkpoint: str, sections: Mapping[str, Section]) -> None:
        """Write every section, all or none."""

    def delete_sections(self, checkpoint: str, keys: Sequence[str] | None = None) -> None:
        """Delete these sections (all of the checkpoint when ``keys`` is None)."""

    def replace_section(self, checkpoint: str, key: str, expected: bytes | None, new: Section | None) -> bool:
        """Compare-and-set on one section's data."""

    # Optional: ``transaction()``, a context whose statements are atomic and in which a read with
    # ``lock`` holds its rows until the end (SQL databases): a write behind checks the lease
    # inside one. A store without it checks right before the write (``Table._write_behind``).


# -- the lease ------------------------------------------------------------------------------------
@dc.dataclass(frozen=True, slots=True)
class Holder:
    """Who holds a lease: an owner id (one per process and lease), where it runs, until when."""

    owner: str
    host: str
    pid: int
    epoch: int
    expires: float

    def encode(self) -> bytes:
        return json.dumps(dc.asdict(self), sort_keys=True).encode()

    @classmethod
    def decode(cls, data: bytes) -> Holder | None:
        try:
            return cls(**json.loads(data))
        except (ValueError, TypeError):
            return None

    def gone(self, now: float) -> bool:
        """Expired, or a process of this host that no longer exists."""
        return self.expires < now or (self.host == socket.gethostname() and not process_alive(self.pid))

    @property
    def released(self) -> bool:
        """The record a holder leaves when it gives the lease up: nobody's, with its epoch.

        >>> Holder("", "", 0, 3, 0.0).released, Holder("h/1/ab", "h", 1, 3, 9e9).released
        (True, False)
        """
        return not self.owner

    def given_up(self) -> Holder:
        """This holder's record once it gave the lease up: the epoch stays, for the next to grow."""
        return Holder("", "", 0, self.epoch, 0.0)


class Lease:
    """A lease on one checkpoint, held by at most one process at a time (compare-and-set).

    The epoch grows each time the lease changes hands: it fences writes (a writer checks that
    the lease still has the epoch it took). A lease that lapsed here (not renewed in time: the
    store was down or slow) and that no other process took meanwhile (the stored record is
    still ours, with our epoch) is taken back with its epoch: it never changed hands.

    ``clock`` gives the time in seconds since the epoch (``time.time``); expiries are compared
    with it, so the processes sharing a lease need clocks that agree within a fraction of it.
    """

    def __init__(
        self,
        store: SectionStore,
        checkpoint: str,
        *,
        lease_ms: int = DEFAULT_LEASE_MS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.checkpoint = checkpoint
        self.lease_ms = check_lease_ms(lease_ms)
        self.clock = clock
        self.owner = f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:12]}"
        self._held: Holder | None = None
        self._raw: bytes | None = None
        #: Our record once it expired here, until the lease is held again, lost or released.
        self._lapsed: Holder | None = None
        self._lock = threading.RLock()

    @property
    def held(self) -> Holder | None:
        """Our holder record while we hold the lease (and it has not expired), else None."""
        with self._lock:
            if self._held is not None and self._held.expires < self.clock():
                self._lapsed, self._held, self._raw = self._held, None, None
            return self._held

    def valid(self, margin: float) -> bool:
        """Whether we hold the lease for at least ``margin`` more seconds (the fence before a
        write: a process paused past its lease's expiry fails it, without asking the store)."""
        held = self.held
        return held is not None and held.expires - self.clock() > margin

    def current(self) -> Holder | None:
        """Who holds it according to the store (None: nobody, given up, or unreadable)."""
        found = self.store.read_sections(self.checkpoint, [LEASE_SECTION]).get(LEASE_SECTION)
        holder = None if found is None else Holder.decode(found.data)
        return None if holder is None or holder.released else holder

    def _record(self, epoch: int) -> tuple[Holder, Section]:
        now = self.clock()
        holder = Holder(self.owner, socket.gethostname(), os.getpid(), epoch, now + self.lease_ms / 1000)
        return holder, Section(holder.encode(), False, now)

    @property
    def lapsed(self) -> bool:
        """Whether our lease expired here and was not yet found taken by another process."""
        with self._lock:
            return self.held is None and self._lapsed is not None

    def acquire(self, *, only_ours: bool = False) -> bool:
        """Take the lease if it is free, expired, or left by a process of this host that is gone.

        Our own lease that lapsed is taken back with its epoch where nobody took it meanwhile;
        otherwise the epoch grows. ``only_ours``: take back nothing but our lapsed lease.
        """
        if self.held is not None:
            return self.renew()
        with self._lock:
            lapsed = self._lapsed
        found = self.store.read_sections(self.checkpoint, [LEASE_SECTION]).get(LEASE_SECTION)
        current = None if found is None else Holder.decode(found.data)
        mine = None if lapsed is None else (self.owner, lapsed.epoch)
        ours = current is not None and mine == (current.owner, current.epoch)
        if not ours:
            with self._lock:
                if self._lapsed is lapsed:
                    self._lapsed = None  # taken or released since: it changed hands
        if (only_ours and not ours) or (
            current is not None and current.owner != self.owner and not current.gone(self.clock())
        ):
            return False
        epoch = lapsed.epoch if ours and lapsed is not None else (current.epoch if current else 0) + 1
        holder, section = self._record(epoch)
        expected = None if found is None else found.data
        if not self.store.replace_section(self.checkpoint, LEASE_SECTION, expected, section):
            return False
        with self._lock:
            self._held, self._raw, self._lapsed = holder, section.data, None
        return True

    # The store is never called with self._lock held: a writer holding the database's lock (a
    # window's transaction) checks the lease, and the keeper renews it through that database.
    def renew(self) -> bool:
        """Extend our lease; False (and no longer held) if another process took it.

        A renewal whose acknowledgement was lost (the server restarted, the connection broke)
        may still have been written: if the stored record is ours, with our epoch, it is taken
        as the one to replace. A record that is gone (a server that lost its tables) is written
        again, where no other process wrote one first: a process that takes the lease writes its
        record, so none took it meanwhile (taken for lost, the lease was taken again at once, after
        the holder had stopped its listeners).
        """
        with self._lock:
            held, raw = self._held, self._raw
        if held is None or raw is None:
            return False
        holder, section = self._record(held.epoch)
        replaced = self.store.replace_section(self.checkpoint, LEASE_SECTION, raw, section)
        if not replaced:
            found = self.store.read_sections(self.checkpoint, [LEASE_SECTION]).get(LEASE_SECTION)
            current = None if found is None else Holder.decode(found.data)
            ours = current is not None and (current.owner, current.epoch) == (self.owner, held.epoch)
            replaced = (found is None or ours) and self.store.replace_section(
                self.checkpoint, LEASE_SECTION, None if found is None else found.data, section
            )
        with self._lock:
            # Not released meanwhile. It may have lapsed here during the call (a slow store): a
            # renewal written holds it again, as no other process could take it in between.
            if self._raw is raw or (self._raw is None and self._lapsed is held):
                self._held, self._raw, self._lapsed = (holder, section.data, None) if replaced else (None, None, None)
        return bool(replaced)

    def release(self) -> None:
        """Give the lease up (a standby takes over at once), a lapsed one too while its record
        is still ours (a record is its holder's encoding). What stays is a record of nobody
        with the epoch (:meth:`Holder.given_up`): the next holder's epoch grows from it (the
        section was removed, and every holder after a release had epoch 1)."""
        with self._lock:
            mine = self._held or self._lapsed
            lapsed = None if self._lapsed is None else self._lapsed.encode()
            raw, self._held, self._raw, self._lapsed = self._raw or lapsed, None, None, None
        if raw is not None and mine is not None:
            left = Section(mine.given_up().encode(), False, self.clock())
            self.store.replace_section(self.checkpoint, LEASE_SECTION, raw, left)

    def check(self, *, lock: bool = False) -> bool:
        """Whether we still hold the lease according to the store (the fence before a write);
        ``lock`` locks the lease's row until the end of the store's open transaction."""
        if self.held is None:
            return False
        with self._lock:
            raw = self._raw
        found = self.store.read_sections(self.checkpoint, [LEASE_SECTION], lock=lock).get(LEASE_SECTION)
        if found is not None and found.data == raw:
            return True
        with self._lock:
            if self._raw is raw:
                self._held = self._raw = None
        return False


class LeaseKeeper:
    """A named daemon thread that renews a held lease and, when asked, takes a free one.

    ``on_look(held)`` is called on that thread after each look at the lease, with whether this
    process holds it: the caller compares it with its own state (a change reported once could
    be overtaken before it is acted on). A look that could not reach the store reports only a
    lease still held: one that lapsed meanwhile is not lost until the store says so (the next
    look takes it back if no other process took it). A standby notices a holder that died at
    once when it ran on this host (its pid is gone), otherwise when the lease expires.
    """

    def __init__(
        self, lease: Lease, *, auto_activate: bool, on_look: Callable[[bool], None] | None = None, name: str = ""
    ) -> None:
        self.lease = lease
        self.auto_activate = auto_activate
        self.on_look = on_look
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"reactive-lease-{name or lease.checkpoint}", daemon=True
        )
        self._changed = threading.Condition()
        self.last_error: str | None = None

    def wait_held(self, timeout: float | None) -> bool:
        """Wait until the lease is held by this process (it is looked at every few hundred ms)."""
        self.wake()
        with self._changed:
            return self._changed.wait_for(lambda: self.lease.held is not None, timeout)

    def start(self) -> None:
        if not self._thread.is_alive():
            self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stopped.set()
        self._wake.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(5)

    def _interval(self) -> float:
        renew = self.lease.lease_ms / 3000
        # A standby looks often: a holder that died on this host is noticed within this.
        return renew if self.lease.held is not None else min(renew, 0.25)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        while not self._stopped.is_set():
            if self.lease.held is None and not self.auto_activate and not self.lease.lapsed:
                return  # nothing to renew, nothing to take: the thread ends (started again when needed)
            self._wake.wait(self._interval())
            self._wake.clear()
            if self._stopped.is_set():
                return
            try:
                if self.lease.held is not None:
                    self.lease.renew()
                elif self.lease.lapsed or not self.auto_activate:
                    # Ours if nobody took it meanwhile; else lost, reported before any new tenure
                    # (taken again at the next look): what ran under the old one must stand down.
                    self.lease.acquire(only_ours=True)
                else:
                    self.lease.acquire()
                self.last_error = None
            except Exception as exc:  # a database that is down: the lease expires by itself
                again = self.last_error is not None  # said once per failure in a row (in info() meanwhile)
                self.last_error = f"{type(exc).__name__}: {exc}"
                (log.debug if again else log.warning)(
                    "could not renew or take the lease of %r: %s", self.lease.checkpoint, self.last_error
                )
            held = self.lease.held is not None
            with self._changed:
                self._changed.notify_all()
            if not held and self.last_error is not None:
                # The store did not answer: whether another process took the lease is unknown.
                # Nothing is reported: writes are fenced meanwhile, and the next look that reaches
                # the store takes the lease back (if still ours) or reports it lost.
                continue
            if self.on_look is not None:
                try:
                    self.on_look(held)
                except Exception:
                    log.exception("a lease callback failed")


Container = Mapping[str, bytes | str] | Iterable[tuple[str, bytes | str]]


# -- the seed's Table -----------------------------------------------------------------------------
class Table:
    """A named checkpoint of sections (see the module docstring for the flags and forms).

    >>> import tempfile
    >>> store = tempfile.mkdtemp() + "/checkpoints.sqlite"
    >>> t = Table("demo", Table.WR_ALL_REPLICAS, None, 10, 1024, 64, store=f"sqlite:///{store}")
    >>> t.Write("k", "hello"); t.Write([("k", "HE")]); t.Read(["k", "nope"])
    {'k': 'HEllo'}
    >>> t.Write("k", "HE"); t.Read(["k"])
    {'k': 'HE'}
    >>> t.Write("x" * 65, "too long a key")
    Traceback (most recent call last):
    ...
    reactive.checkpoints.CheckpointLimitError: section id of 65 bytes is over max_section_id_size_bytes=64
    """

    WR_ALL_REPLICAS = 0x1
    WR_ACTIVE_REPLICA = 0x2
    WR_ACTIVE_REPLICA_WEAK = 0x4
    CHECKPOINT_COLLOCATED = 0x8
    _WRITE_MODES = WR_ALL_REPLICAS | WR_ACTIVE_REPLICA | WR_ACTIVE_REPLICA_WEAK

    def __init__(
        self,
        name: str,
        flags: int,
        retention_ms: int | None,
        max_sections: int,
        max_section_size_bytes: int,
        max_section_id_size_bytes: int,
        *,
        store: Datalayer | str | SectionStore | None = None,
        lease_ms: int = DEFAULT_LEASE_MS,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise ConfigurationError("a checkpoint needs a non-empty name")
        if not isinstance(flags, int) or bin(flags & self._WRITE_MODES).count("1") != 1 or flags & ~0xF:
            raise ConfigurationError(
                f"flags {flags!r}: one of WR_ALL_REPLICAS, WR_ACTIVE_REPLICA, WR_ACTIVE_REPLICA_WEAK, "
                "optionally | CHECKPOINT_COLLOCATED"
            )
        max_sections = checks.whole("max_sections", max_sections, least=1)
        max_section_size_bytes = checks.whole("max_section_size_bytes", max_section_size_bytes, least=1)
        max_section_id_size_bytes = checks.whole("max_section_id_size_bytes", max_section_id_size_bytes, least=1)
        if retention_ms is not None:
            retention_ms = checks.whole("retention_ms", retention_ms, least=1)
        self.ckptName = name
        self.flags = flags
        self.retentionMs = retention_ms
        self.maxSections = max_sections
        self.maxSectionSizeBytes = max_section_size_bytes
        self.maxSectionIdSizeBytes = max_section_id_size_bytes
        self.store, self._opened = _opened_store(store)
        self._closed = False
        self.lease = Lease(self.store, name, lease_ms=lease_ms)
        self.autoActivate = False
        self._lock = threading.RLock()
        self._pending: collections.deque[dict[str, Section]] = collections.deque()
        self._idle = threading.Condition(self._lock)
        self._writer: _Writer | None = None
        self._keeper: LeaseKeeper | None = None
        #: Writes behind given up since the last :meth:`Synchronize`: another process became
        #: the active replica before they were written.
        self._given_up = 0
        self._transaction: Callable[[], contextlib.AbstractContextManager[Any]] = (
            getattr(self.store, "transaction", None) or contextlib.nullcontext
        )
        if self.asynchronous and not flags & self.CHECKPOINT_COLLOCATED:
            self.Activate()

    # -- attributes of the seed ---------------------------------------------------------------
    @property
    def asynchronous(self) -> bool:
        return not self.flags & self.WR_ALL_REPLICAS

    def __repr__(self) -> str:
        return f"Table({self.ckptName!r}, flags={self.flags:#x})"

    # -- reads and writes ---------------------------------------------------------------------
    def Read(self, keys: Iterable[str] | str) -> dict[str, bytes | str]:
        """The sections of ``keys`` that exist (missing, deleted or expired ones are absent)."""
        self._check_open()
        if not isinstance(keys, str) and not isinstance(keys, Iterable):
            raise ConfigurationError(f"Read takes a section id or an iterable of them, not {keys!r}")
        wanted = [_section_id(keys)] if isinstance(keys, str) else [_section_id(key) for key in keys]
        sections = self.store.read_sections(self.ckptName, wanted)
        pending = self._pending_view(wanted)
        sections.update(pending)
        live = self._live(sections)
        return {key: live[key].value for key in wanted if key in live}

    def Write(
        self,
        keyOrContainer: str | Mapping[str, bytes | str] | Iterable[tuple[str, bytes | str]],
        data: bytes | str | None = None,
    ) -> None:
        """Write sections: ``Write("key", data)`` replaces (truncates); ``Write([(k, d), ...])``
        and ``Write({k: d})`` write over the start of existing sections (do not truncate)."""
        self._check_open()
        if isinstance(keyOrContainer, str):
            if data is None:
                raise ConfigurationError("Write(key, data) needs data")
            items = [(keyOrContainer, data)]
            truncate = True
        else:
            container = keyOrContainer
            if data is not None or isinstance(container, bytes | bytearray) or not isinstance(container, Iterable):
                # Write(5, "x"), Write(b"k", "x"): not a container of (key, data) pairs either.
                raise ConfigurationError(f"a section id must be a non-empty str, not {container!r}")
            pairs = container.items() if isinstance(container, Mapping) else container
            try:
                # A text of two characters would unpack as a pair: Write(["ab"]) wrote "b" to "a".
                items = [(key, value) for key, value in (_pair(pair) for pair in pairs)]
            except (TypeError, ValueError):
                raise ConfigurationError("Write takes a key and data, a mapping, or (key, data) pairs") from None
            truncate = False
        sections = self._prepare(items, truncate=truncate)
        if self.asynchronous:
            self._enqueue(sections)
        else:
            self._apply(sections)

    def Delete(self, key: str) -> None:
        """Delete one section (deleting a missing one is not an error)."""
        self._check_open()
        key = _section_id(key)  # never the lease's: deleting it took the active replica's lease away
        self.Synchronize(None)
        self.store.delete_sections(self.ckptName, [key])

    def Synchronize(self, timeout: float | None = None) -> bool:
        """Wait until every asynchronous write is durable; False if ``timeout`` passed first,
        or if writes were given up since the last call: this process lost the active replica's
        lease to another before they were written (logged)."""
        with self._idle:
            done = self._idle.wait_for(lambda: not self._pending, timeout)
            given_up, self._given_up = self._given_up, 0
            return done and not given_up

    # -- the active replica -------------------------------------------------------------------
    def Activate(self) -> bool:
        """Make this process the active replica (take the lease); False if another live
        process holds it. While active, the lease is renewed on a daemon thread."""
        self._check_open()
        taken = self.lease.acquire()
        self._keep()
        return taken

    def GetActiveStatus(self) -> bool:
        """Whether this process is the active replica (holds the lease, not expired)."""
        return self.lease.held is not None

    def SetAutoActivate(self, val: bool = True) -> None:
        """With True, this process takes the lease on its own when the holder dies or leaves."""
        self._check_open()
        self.autoActivate = bool(val)
        keeper = self._keep()
        keeper.auto_activate = self.autoActivate
        keeper.wake()

    def WaitActive(self, timeout: float | None = None) -> bool:
        """Wait until this process is the active replica (not in the seed); False at ``timeout``.

        With auto-activation on, this is how a standby waits to take over.
        """
        keeper = self._keep()
        return keeper.wait_held(timeout)

    def close(self) -> None:
        """Make what is written behind durable (a few seconds at most), give the lease up (a
        standby takes over at once), and close the connection the table opened itself (from a
        URI or the embedded file; a datalayer's stays open). Not in the seed. A table left
        unclosed kept that connection until it was collected (a MongoDB client's monitor
        threads, a DuckDB file): ``with Table(...) as jobs:`` closes it."""
        self.Deactivate()
        with self._lock:
            opened, self._opened, self._closed = self._opened, None, True
        if opened is not None:
            opened.close()

    def _check_open(self) -> None:
        if self._closed:
            raise ConfigurationError(f"checkpoint table {self.ckptName!r} is closed; make a new Table to use it again")

    def __enter__(self) -> Table:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def Deactivate(self) -> None:
        """Give the lease up and stop taking it (not in the seed): a standby takes over at once."""
        self.Synchronize(_EXIT_FLUSH_SECONDS)
        self.autoActivate = False
        with self._lock:
            keeper, self._keeper = self._keeper, None
        if keeper is not None:
            keeper.stop()
        self.lease.release()

    def _keep(self) -> LeaseKeeper:
        """The thread that renews the lease (and takes it, with auto-activation), running."""
        with self._lock:
            if self._keeper is None or not self._keeper.alive:
                self._keeper = LeaseKeeper(self.lease, auto_activate=self.autoActivate, name=self.ckptName)
                self._keeper.start()
            return self._keeper

    # -- internals ----------------------------------------------------------------------------
    def _live(self, sections: Mapping[str, Section]) -> dict[str, Section]:
        if self.retentionMs is None:
            return dict(sections)
        oldest = time.time() - self.retentionMs / 1000
        return {key: s for key, s in sections.items() if s.written_at >= oldest}

    def _prepare(self, items: Sequence[tuple[str, bytes | str]], *, truncate: bool) -> dict[str, Section]:
        """The sections to write, limits checked (nothing is written when one is over)."""
        now = time.time()
        new: dict[str, Section] = {}
        for key, value in items:
            size = len(_section_id(key).encode("utf-8"))
            if size > self.maxSectionIdSizeBytes:
                raise CheckpointLimitError(
                    f"section id of {size} bytes is over max_section_id_size_bytes={self.maxSectionIdSizeBytes}"
                )
            new[key] = Section.of(value, now)
        existing = self._live(self.store.read_sections(self.ckptName, None))
        existing.update(self._pending_view(None))
        existing.pop(LEASE_SECTION, None)
        if not truncate:
            new = {key: _overlay(section, existing.get(key)) for key, section in new.items()}
        for key, section in new.items():
            if len(section.data) > self.maxSectionSizeBytes:
                raise CheckpointLimitError(
                    f"section {key!r} of {len(section.data)} bytes is over "
                    f"max_section_size_bytes={self.maxSectionSizeBytes}"
                )
        count = len(set(existing) | set(new))
        if count > self.maxSections:
            raise CheckpointLimitError(f"{count} sections would be over max_sections={self.maxSections}")
        return new

    def _apply(self, sections: dict[str, Section]) -> None:
        self.store.write_sections(self.ckptName, sections)
        if self.retentionMs is not None:
            self._expire()

    def _expire(self) -> None:
        everything = self.store.read_sections(self.ckptName, None)
        live = self._live(everything)
        expired = [key for key in everything if key not in live and key != LEASE_SECTION]
        if expired:
            self.store.delete_sections(self.ckptName, expired)

    def _pending_view(self, keys: Sequence[str] | None) -> dict[str, Section]:
        with self._lock:
            view: dict[str, Section] = {}
            for sections in self._pending:
                view.update(sections)
        return view if keys is None else {k: v for k, v in view.items() if k in keys}

    def _enqueue(self, sections: dict[str, Section]) -> None:
        if not self.GetActiveStatus():
            raise NotActiveError(
                f"checkpoint {self.ckptName!r} is written asynchronously by its active replica only: Activate() first"
            )
        with self._lock:
            if self.flags & self.WR_ACTIVE_REPLICA_WEAK:
                self._pending.extend({key: section} for key, section in sections.items())
            else:
                self._pending.append(sections)
            if self._writer is None:
                self._writer = _Writer(self)
                self._writer.start()

    def _writer_done(self, writer: _Writer) -> bool:
        """The writer ends when nothing is pending (under the lock that starts a new one)."""
        with self._lock:
            if self._pending:
                return False
            if self._writer is writer:
                self._writer = None
            return True

    def _drain_one(self) -> bool:
        """Write the oldest pending call; False when nothing is pending (or all of it was given
        up: this process is no longer the active replica)."""
        with self._lock:
            if not self._pending:
                self._idle.notify_all()
                return False
            sections = self._pending[0]
        if not self._write_behind(sections):
            with self._lock:
                given_up, self._pending = len(self._pending), collections.deque()
                self._given_up += given_up
                self._idle.notify_all()
            log.error(
                "checkpoint %r: %d asynchronous writes given up: another process is the active replica now",
                self.ckptName,
                given_up,
            )
            return False
        with self._lock:
            self._pending.popleft()
            self._idle.notify_all()
        return True

    def _write_behind(self, sections: dict[str, Section]) -> bool:
        """Write ``sections`` as the active replica, the lease checked in the write's transaction
        (where the store has them; right before it elsewhere); False once another process holds
        the lease. A writer that went on after its process lost the lease (paused past it) wrote
        its stale writes over the new active replica's."""
        with self._transaction():
            held = self.lease.valid(self.lease.lease_ms / 3000) and self.lease.check(lock=True)
            if held:
                self._apply(sections)
                return True
        if self.lease.held is None and not self.lease.lapsed:
            return False
        # Lapsed here (the store slow or down): the keeper takes it back, or finds it lost.
        raise _LeaseUnsettled


class _LeaseUnsettled(Exception):
    """A write behind waits: this process's lease lapsed, and is not yet taken back or found lost."""


class _Writer(threading.Thread):
    """Writes a table's asynchronous writes behind, in order (a daemon: never keeps the process)."""

    def __init__(self, table: Table) -> None:
        super().__init__(name=f"reactive-checkpoint-{table.ckptName}", daemon=True)
        self.table = weakref.ref(table)
        self.wake = threading.Event()
        _FLUSH_AT_EXIT.add(table)

    def run(self) -> None:
        """Write until nothing is pending, then end (the next asynchronous write starts another)."""
        while True:
            table = self.table()
            if table is None or table._writer_done(self):
                return
            try:
                while table._drain_one():
                    pass
            except _LeaseUnsettled:
                self.wake.wait(0.05)
            except Exception:
                log.exception("an asynchronous write of checkpoint %r failed; retrying", table.ckptName)
                self.wake.wait(0.5)  # the database is failing: back off before trying again
            del table


_FLUSH_AT_EXIT: weakref.WeakSet[Table] = weakref.WeakSet()


@atexit.register
def _flush_at_exit() -> None:
    for table in list(_FLUSH_AT_EXIT):
        if not table.Synchronize(_EXIT_FLUSH_SECONDS):
            log.warning("checkpoint %r: asynchronous writes not durable at exit", table.ckptName)


def _overlay(new: Section, old: Section | None) -> Section:
    """The container forms write over the start of a section and keep its tail."""
    if old is None or old.text != new.text or len(old.data) <= len(new.data):
        return new
    if new.text:
        value = new.value
        tail = str(old.value)[len(value) :]
        return Section.of(str(value) + tail, new.written_at)
    return Section(new.data + old.data[len(new.data) :], False, new.written_at)


def _section_id(key: Any) -> str:
    """``key`` if it can name a section of a :class:`Table`, else a ``ConfigurationError``: a
    non-empty text without lone surrogates, not the lease's own section.

    >>> _section_id("offsets")
    'offsets'
    >>> _section_id("__lease__")
    Traceback (most recent call last):
    ...
    reactive.errors.ConfigurationError: a section id must be a non-empty str (not '__lease__'), not '__lease__'
    """
    if not isinstance(key, str) or not key or key == LEASE_SECTION:
        raise ConfigurationError(f"a section id must be a non-empty str (not {LEASE_SECTION!r}), not {key!r}")
    if not is_utf8(key):
        raise ConfigurationError(f"a section id must be Unicode text (no lone surrogate), not {key!r}")
    return key


def _pair(pair: Any) -> tuple[Any, Any]:
    """A ``(key, data)`` pair of :meth:`Table.Write`; TypeError for anything else."""
    if isinstance(pair, str | bytes | bytearray) or len(pair) != 2:
        raise TypeError(f"not a (key, data) pair: {pair!r}")
    return pair[0], pair[1]


def section_store(store: Datalayer | str | SectionStore | None) -> SectionStore:
    """The :class:`SectionStore` of a datalayer, of a database URI, or of the embedded SQLite file."""
    return _opened_store(store)[0]


def _opened_store(store: Datalayer | str | SectionStore | None) -> tuple[SectionStore, DataBackend | None]:
    """:func:`section_store`, and the backend it connected for it (a URI, the embedded file),
    which its user closes; None where the store was given."""
    from reactive.datalayer import Datalayer

    if isinstance(store, Datalayer):
        return store.backend.sections, None
    if store is None:
        path = os.environ.get("REACTIVE_CHECKPOINTS") or DEFAULT_FILE
        store = f"sqlite:///{Path(path).absolute()}"
    if isinstance(store, str):
        from reactive.backends import backend_for_uri

        backend = backend_for_uri(store).from_uri(store)
        return backend.sections, backend
    if all(hasattr(store, m) for m in ("read_sections", "write_sections", "delete_sections", "replace_section")):
        return store, None
    raise ConfigurationError(f"store must be a datalayer, a database URI or None, not {type(store).__name__}")


# -- the engine's JSON values ----------------------------------------------------------------------
class Positions:
    """The engine's named JSON values (the small ``CheckpointStore`` the backends use), kept as
    sections of the checkpoint ``reactive`` of a :class:`SectionStore`.

    A value that does not decode raises :class:`CorruptCheckpointError`: a position that
    cannot be read is never taken for "no position" (which would mean "start from now").
    """

    def __init__(self, store: SectionStore, checkpoint: str = ENGINE_CHECKPOINT) -> None:
        self.store = store
        self.checkpoint = checkpoint

    def load_checkpoint(self, name: str) -> dict[str, Any] | None:
        found = self.store.read_sections(self.checkpoint, [name]).get(name)
        if found is None:
            return None
        try:
            value = json.loads(found.data)
        except ValueError as exc:
            raise CorruptCheckpointError(f"checkpoint section {name!r} is not what reactive wrote ({exc})") from None
        if not isinstance(value, dict):
            raise CorruptCheckpointError(f"checkpoint section {name!r} is not what reactive wrote")
        return value

    def save_checkpoint(self, name: str, value: Mapping[str, Any]) -> None:
        data = json.dumps(dict(value), default=plain_value, sort_keys=True).encode()
        self.store.write_sections(self.checkpoint, {name: Section(data, True, time.time())})

    def delete_checkpoint(self, name: str) -> None:
        self.store.delete_sections(self.checkpoint, [name])


def process_alive(pid: Any) -> bool:
    """Whether process ``pid`` of this host exists (anything but an int: assumed alive)."""
    if not isinstance(pid, int) or pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

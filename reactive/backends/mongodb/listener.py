"""One database-level change stream that follows every watched collection."""

from __future__ import annotations

import datetime as _dt
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import bson
import pymongo
from bson import ObjectId
from pymongo.errors import OperationFailure, PyMongoError

from reactive.backends.base import MAX_BACKOFF, BaseDatabaseListener, CheckpointStore, TableInfo
from reactive.backends.mongodb.errors import (
    Fault,
    classify,
    server_message,
    stop_timeout,
    while_down,
)
from reactive.checkpoints import CorruptCheckpointError
from reactive.errors import ChangeStreamUnsupportedError, QueueClosedError
from reactive.events import ChangePacket, DBEvent, SourceChange

if TYPE_CHECKING:
    from pymongo.change_stream import DatabaseChangeStream
    from pymongo.database import Database

log = logging.getLogger(__name__)

#: Where :meth:`MongoChangeStreamListener.sync` writes its barrier marks.
MARKS_COLLECTION = "_reactive_marks"
#: After the server refused an event over its 16 MB limit (error 10334), events bigger than
#: this lose their fullDocument (the handler reads the row instead). The stage is not used
#: until then: it halves how fast a stream delivers on some servers.
LARGE_DOCUMENT_BYTES = 8 * 1024 * 1024
#: An idle stream saves its post-batch resume token at most this often.
IDLE_SAVE_SECONDS = 1.0
#: While the stream is busy, the position of processed windows is saved at most this often
#: (each save is a journaled write); once the stream is quiet, at once.
BUSY_SAVE_SECONDS = 1.0

#: With at most this many packets in flight and nothing received left to read, the listener
#: waits until their outputs are written before it asks the server for more (see ``_hold``).
HOLD_BELOW = 16
#: The longest such wait (a slow model does not stop the stream being read for long).
HOLD_SECONDS = 0.05


class _Position(dict[str, Any]):
    """A packet's position, ``{"token": ..., "start_after": False}``, and the recovery epoch
    it was read in (not saved)."""

    __slots__ = ("epoch",)

    def __init__(self, token: Any, epoch: int) -> None:
        super().__init__(token=token, start_after=False)
        self.epoch = epoch


def _buffered(stream: Any) -> bool:
    """Whether the stream holds events already received (the next ``try_next`` asks nothing)."""
    has_next = getattr(getattr(stream, "_cursor", None), "_has_next", None)
    return bool(has_next()) if has_next is not None else False


_EVENTS = {"insert": DBEvent.insert, "update": DBEvent.update, "replace": DBEvent.update, "delete": DBEvent.delete}


class MongoChangeStreamListener(BaseDatabaseListener):
    """Follows the watched collections with one ``db.watch()`` stream.

    The position is the resume token of the last event whose packet was processed, or the
    stream's post-batch resume token while it is idle and nothing is in flight. It is saved
    (journaled) only after the outputs it covers are written, and only while ``fence()``
    says this process may write (it holds the lease): by the handler at most every
    :data:`BUSY_SAVE_SECONDS` while changes keep coming, and by this thread as soon as the
    stream has nothing new (and when it stops), so a window costs one write, its outputs (not
    journaled: the journaled position save after them makes them durable too). A crash
    replays at most that much, and the stored fingerprints of what comes again are looked up
    (nothing is computed twice). A restarted process resumes
    from it with ``resume_after`` (or ``start_after`` past an invalidate). If the token has
    aged out of the oplog, every watched collection is reconciled and the stream restarts
    from now.
    """

    table_noun = "collection"

    def __init__(
        self,
        database: Database,
        checkpoints: CheckpointStore,
        queue: Any,
        *,
        uri: str,
        max_await_ms: int = 200,
        collection_dropped: Callable[[str], None] = lambda collection: None,
        fence: Callable[[], bool] = lambda: True,
        **options: Any,
    ) -> None:
        super().__init__(queue, name="mongodb", **options)
        self.database = database
        #: Told of every collection of the database dropped, renamed away or replaced by a
        #: rename (the backend's outputs collections among them).
        self.collection_dropped = collection_dropped
        #: Whether this process may write positions now (it holds the lease, with a third of
        #: it ahead): checked before every save this thread makes on its own.
        self.fence = fence
        self.checkpoints = checkpoints
        self.uri = uri
        self.max_await_ms = max_await_ms
        self.checkpoint_name = f"mongodb/{database.name}/stream"
        self._stream: DatabaseChangeStream | None = None
        self._seen: dict[str, Any] | None = None
        self._committed: dict[str, Any] | None = None
        #: The position of the last processed packet, saved or not (a rewind goes back to it).
        self._processed: dict[str, Any] | None = None
        #: How many windows' positions were processed, and how many of them a save covers.
        self._processed_count = 0
        self._saved_count = 0
        #: One save at a time, never one older than the last (see :meth:`_save`).
        self._save_lock = threading.Lock()
        self._last_save = 0.0
        #: Set when this thread has made its last save: the handler then saves every window.
        self._finished = False
        #: Bumped when the history is recovered: positions of packets read before are stale.
        self._epoch = 0
        #: The positions (by ``id``) of packets whose outputs are written, not yet settled.
        self._written: set[int] = set()
        self._generation = 0
        self._opened_generation = -1
        self._rewind = False
        #: Resume tokens (encoded) of changes told to table monitors whose packets are not
        #: committed yet: a stream read again from before them (a released window) tells the
        #: monitors nothing twice (it told them again at every release).
        self._told: set[bytes] = set()
        self._mark_id = ObjectId()
        self._marks_sent = 0
        self._marks_seen = 0
        self._last_idle_save = 0.0
        self._strip_large_documents = False
        self.disconnected_since: _dt.datetime | None = None
        #: Set while the server is unreachable; ``connected`` is its opposite.
        self.disconnected = threading.Event()
        self.connected = threading.Event()
        self.history_lost = 0
        #: The saved position could not be read: the next start reconciles everything.
        self._unknown_history = False
        #: The primary's process id last seen: a change means a restart (or a new primary).
        self._server_process: str | None = None
        #: Why a recovery from lost history is under way: set until its reconciliation is
        #: queued, so one a transient error cut short runs again at the next step.
        self._recovering: str | None = None
        self._recovery_attempts = 0
        #: The recovery's barrier mark is still to be written again (see _write_mark).
        self._mark_owed = False
        self.server_restarts = 0
        self.positions_saved = 0

    # -- position -------------------------------------------------------------------------
    def _position(self) -> dict[str, Any] | None:
        if self._committed is None:
            try:
                self._committed = self.checkpoints.load_checkpoint(self.checkpoint_name)
            except CorruptCheckpointError as exc:
                # Never "no position" (that would start from now and skip what happened): the
                # next start follows from now AND reconciles every collection.
                self.last_error = f"unreadable stream position, every collection is reconciled: {exc}"
                log.error("%s on %s", self.last_error, self.uri)
                self.checkpoints.delete_checkpoint(self.checkpoint_name)
                self._unknown_history = True
        return self._committed

    def _save(self, position: dict[str, Any], covers: int | None = None) -> None:
        """Save ``position``, which covers the first ``covers`` processed windows (default:
        all of them so far). Saves run one at a time; one that covers fewer windows than a
        save made meanwhile is dropped (the handler's and this thread's saves may cross)."""
        with self._save_lock:
            with self._changed:
                covers = self._processed_count if covers is None else covers
                if covers < self._saved_count:
                    return
            self.checkpoints.save_checkpoint(self.checkpoint_name, position)
            with self._changed:
                self._committed = position
                self._saved_count = covers
                self._last_save = time.monotonic()
                self.positions_saved += 1
                self._changed.notify_all()

    @property
    def position(self) -> dict[str, Any] | None:
        """The saved position: ``{"token": <resume token>, "start_after": bool}``."""
        return self._position()

    def _pipeline(self) -> list[dict[str, Any]]:
        names = sorted(self.tables)
        stages: list[dict[str, Any]] = [
            {
                "$match": {
                    # Two branches, not three: some servers (SecantusDB) evaluate the match in
                    # Python on every event of the database, the handler's outputs included.
                    "$or": [
                        {"ns.coll": {"$in": [*names, MARKS_COLLECTION]}},
                        # Every drop and rename (rare): of outputs collections, onto watched ones.
                        {"operationType": {"$in": ["drop", "rename", "dropDatabase", "invalidate"]}},
                    ]
                }
            }
        ]
        if self._strip_large_documents:
            too_big = {"$gt": [{"$bsonSize": {"$ifNull": ["$fullDocument", {}]}}, LARGE_DOCUMENT_BYTES]}
            stages.append({"$set": {"fullDocument": {"$cond": [too_big, "$$REMOVE", "$fullDocument"]}}})
        return stages

    def _open(self, position: dict[str, Any] | None) -> DatabaseChangeStream:
        options: dict[str, Any] = {"full_document": "updateLookup", "max_await_time_ms": self.max_await_ms}
        if position is not None:
            options["start_after" if position.get("start_after") else "resume_after"] = position["token"]
        try:
            return self.database.watch(self._pipeline(), **options)
        except OperationFailure as exc:
            if classify(exc) is Fault.NO_CHANGE_STREAMS:
                raise ChangeStreamUnsupportedError(
                    f"{self.uri} cannot produce change streams ({server_message(exc)}). Run MongoDB as a replica "
                    f"set (mongod --replSet, even with one member) or a sharded cluster."
                ) from None
            raise

    def watch(self, table: TableInfo) -> None:
        """Follow ``table``; its changes from now on are never missed.

        Before the first backfill a position must exist, so the stream can start from a
        point no later than the backfill's reads. Raises
        :class:`~reactive.errors.ChangeStreamUnsupportedError` on a standalone server.
        """
        with self._changed:
            new = table.name not in self._tables
            super().watch(table)
            if new:
                self._generation += 1
            generation = self._generation
        if self._position() is None:
            self._save_now()
        elif not self.is_alive():
            # Fail at db.add, not later, when the server cannot stream at all.
            try:
                with self._open(self._position()):
                    pass
            except OperationFailure as exc:
                if classify(exc) is not Fault.HISTORY_LOST:
                    raise
                # db.add reconciles this table right after; for the others, start() will.
                log.warning("the saved position on %s is no longer in the oplog", self.uri)
        if new and self.is_alive():
            with self._changed:
                self._changed.wait_for(lambda: self._opened_generation >= generation or self.ending(), timeout=30)

    def unwatch(self, table: str) -> None:
        with self._changed:
            super().unwatch(table)
            self._generation += 1

    def _save_now(self) -> None:
        """Save the stream's current end as the position (nothing before it is needed)."""
        with self._open(None) as stream:
            self._save({"token": stream.resume_token, "start_after": False})

    def _reopen(self, position: dict[str, Any] | None) -> None:
        """Open the stream at ``position`` with the current watched set, and say so."""
        with self._changed:
            generation = self._generation
        self._close_stream()
        self._stream = self._open(position)
        with self._changed:
            self._opened_generation = generation
            self._changed.notify_all()

    def start(self) -> None:
        # Open the first stream here, in the caller's thread, so a server that cannot
        # stream fails cdc.start() with a clear error instead of failing in the background.
        try:
            position = self._position()
            if position is not None and position.get("reconcile"):
                self._recover_history("a reconciliation after lost history did not finish before the last stop")
            elif self._unknown_history:
                self._recover_history()
            else:
                self._reopen(position)
        except OperationFailure as exc:
            if classify(exc) is not Fault.HISTORY_LOST:
                raise
            self._recover_history()
        super().start()

    # -- the thread -----------------------------------------------------------------------
    def _follow(self) -> None:
        backoff = 0.5
        try:
            while self.should_keep_running():
                try:
                    self._step()
                    backoff = 0.5
                except QueueClosedError:
                    return
                except (PyMongoError, ChangeStreamUnsupportedError) as exc:
                    fault = classify(exc)
                    if fault is Fault.HISTORY_LOST:
                        self._history_lost()  # recovered by the next step, where its errors are handled
                        continue
                    if fault is Fault.EVENT_TOO_LARGE and not self._strip_large_documents:
                        log.warning("a change event exceeded 16 MB; large documents are now read separately")
                        self._strip_large_documents = True
                        self._close_stream()
                        continue
                    if fault is Fault.TRANSIENT:
                        self._disconnected(exc)
                    else:
                        self._failed(exc)
                except Exception as exc:  # a defect of ours, not the server's: said, then retried
                    # It ended the thread: nothing was followed any more, and a wait for a
                    # barrier (a table monitor's start) never returned. The stream reopens
                    # before the change it failed on: nothing is skipped.
                    log.exception("change stream on %s: unexpected error; reopening it in %s s", self.uri, backoff)
                    self.last_error = f"{type(exc).__name__}: {exc}"
                    self._close_stream()
                else:
                    continue
                self.wait(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)
        finally:
            self._close_stream()
            with self._changed:
                # From now on the handler saves every window's position itself.
                self._finished = True
                unsaved = self._processed if self._processed_count > self._saved_count else None
                covers = self._processed_count
                self._changed.notify_all()
            self._clean_up(unsaved, covers)

    def _clean_up(self, unsaved: dict[str, Any] | None, covers: int) -> None:
        """At the thread's end: save the last processed position if it is not saved, and remove
        the barrier mark, each waiting at most :func:`stop_timeout` for the server."""
        client = self.database.client
        if unsaved is not None:
            try:
                with pymongo.timeout(stop_timeout(client)):
                    self._save_fenced(unsaved, covers)
            except PyMongoError as exc:
                log.warning("could not save the stream position of %s: %s", self.uri, exc)
        try:
            with pymongo.timeout(stop_timeout(client)):
                self.database[MARKS_COLLECTION].delete_one({"_id": self._mark_id})
        except PyMongoError:
            log.debug("could not remove this listener's barrier mark", exc_info=True)

    def _disconnected(self, exc: BaseException) -> None:
        if self.disconnected_since is None:
            self.disconnected_since = _dt.datetime.now(_dt.UTC)
            self.connected.clear()
            self.disconnected.set()
            log.warning("lost the connection to %s (%s); reconnecting with backoff", self.uri, exc)
        self.last_error = f"disconnected since {self.disconnected_since.isoformat()}: {exc}"
        self._close_stream()

    def _failed(self, exc: BaseException) -> None:
        self.last_error = f"{type(exc).__name__}: {server_message(exc)}"
        log.error("change stream on %s failed: %s", self.uri, self.last_error)
        self._close_stream()

    def _close_stream(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            try:
                # Closing kills the server's cursor: not waited for when the server is down
                # (it lost the cursor, or times it out), else the next attempt, or a stop,
                # would wait out the server selection timeout first.
                with pymongo.timeout(stop_timeout(self.database.client)):
                    stream.close()
            except PyMongoError:
                log.debug("closing a broken change stream failed", exc_info=True)

    def _step(self) -> None:
        if self._recovering is not None:
            self._recover()
            return
        if self._mark_owed:
            self._write_mark()
        with self._changed:
            reopen = self._stream is None or self._opened_generation != self._generation or self._rewind
            if self._rewind:
                self._rewind, self._seen = False, None
        if reopen:
            with while_down(self.database.client):  # a stop then waits no longer for it
                self._reopen(self._seen or self._processed or self._position())
        assert self._stream is not None
        if not _buffered(self._stream):
            self._hold()
        change = self._stream.try_next()
        if self.disconnected_since is not None:
            log.warning("reconnected to %s (disconnected since %s)", self.uri, self.disconnected_since)
            self.disconnected_since = None
            self.last_error = None
            self.disconnected.clear()
            self._check_server_restart()
        self.connected.set()
        if change is None:
            self._check_server_restart()
            if not self._stream.alive:
                self._close_stream()
                return
            self._seen = {"token": self._stream.resume_token, "start_after": False}
            self._save_idle_position()
            return
        self._take_change(change)

    def _hold(self) -> None:
        """Before asking the server for more: while a few packets are in flight, wait (at most
        :data:`HOLD_SECONDS`) until the handler has written their outputs.

        A getMore waiting on the server is woken by every write to the database, the
        handler's own among them: the server then builds and filters those events and the
        two threads compete for the interpreter, all while the handler waits for its write
        to be acknowledged. Asking once the outputs are written (the position is saved
        meanwhile) costs a lone change nothing, and a burst is read in one getMore instead of
        many. Many packets in flight (a backlog) are not waited for: reading ahead pays.
        """
        with self._changed:
            if 0 < self._unwritten() <= HOLD_BELOW:
                self._changed.wait_for(lambda: self._unwritten() <= 0 or not self.should_keep_running(), HOLD_SECONDS)

    def _unwritten(self) -> int:
        """Packets in flight whose outputs are not written yet."""
        return self._in_flight - len(self._written)

    def _save_idle_position(self) -> None:
        """The stream has nothing new: save the position of what is processed, if the handler
        left it unsaved, and move it forward to the post-batch token when nothing is in flight
        (the latter at most every :data:`IDLE_SAVE_SECONDS`)."""
        now = time.monotonic()
        with self._changed:
            # Nothing in flight, and nothing queued by others (a reconciliation): a position
            # saved now covers only what is processed.
            quiet = self._in_flight == 0 and self.queue.idle
            unsaved = self._processed_count > self._saved_count
            position = self._seen if quiet and self._seen is not None else self._processed
            covers = self._processed_count
        if position is None or position == self._committed:
            return
        if unsaved or now - self._last_idle_save > IDLE_SAVE_SECONDS:
            self._last_idle_save = now
            self._save_fenced(position, covers)

    def _save_fenced(self, position: dict[str, Any], covers: int) -> None:
        """Save ``position`` from this thread, unless this process may not write now."""
        if self.fence():
            self._save(position, covers)
        else:
            log.debug("not saving the stream position of %s: this process does not hold the lease", self.uri)

    def _take_change(self, change: dict[str, Any]) -> None:
        operation = change["operationType"]
        token = change["_id"]
        collection = change.get("ns", {}).get("coll")
        event = _EVENTS.get(operation)
        if collection == MARKS_COLLECTION:
            with self._changed:
                if self._rewind:
                    # The handler released a window: the stream goes back to before its changes
                    # and reads this mark again after them. Passed now, it let wait_idle return
                    # before the released changes were queued again.
                    return
            document = change.get("fullDocument") or {}
            if change.get("documentKey", {}).get("_id") == self._mark_id and "n" in document:
                epoch = self._epoch
                # A barrier passes only once a server restart, if any, is reconciled. If asking
                # fails, the position stays before the mark: it is read again on reconnecting.
                self._check_server_restart(ask=True)
                with self._changed:
                    self._marks_seen = max(self._marks_seen, document["n"])
                    self._changed.notify_all()
                self._arm(lambda target: target is not None and target <= self._marks_seen)
                if self._epoch != epoch:
                    return  # the restart was recovered from: the stream now follows from then
            self._seen = {"token": token, "start_after": False}
            return
        if event is not None and collection in self._tables:
            row = change.get("fullDocument") if event is not DBEvent.delete else None
            row_id = change["documentKey"]["_id"]
            packet = ChangePacket(
                collection,
                event,
                (row_id,),
                None if row is None else (row,),
                position=_Position(token, self._epoch),
                source=self,
            )
            self.report(packet)
        elif operation in ("drop", "rename") and collection in self._tables:
            state = "dropped" if operation == "drop" else f"renamed to {change['to']['coll']!r}"
            self._report_gone(collection, state)
        elif operation == "dropDatabase":
            for name in list(self._tables):
                self._report_gone(name, "dropped with its database")
        elif operation == "invalidate":
            self._seen = {"token": token, "start_after": True}
            self._close_stream()
            return
        if operation in ("drop", "rename"):
            self.collection_dropped(collection)
            if operation == "rename":
                self.collection_dropped(change.get("to", {}).get("coll", ""))
        if operation == "rename" and change.get("to", {}).get("coll") in self._tables:
            replaced = change["to"]["coll"]
            log.warning("collection %r was replaced by a rename; reconciling its outputs", replaced)
            self.hooks.reconcile([replaced], self.stopped_event)
        self._seen = {"token": token, "start_after": False}

    def _primary_process(self, *, ask: bool) -> str | None:
        """The process id the writable server reports (``hello``'s ``topologyVersion``): from
        pymongo's view of the topology (no round trip), or asked now when ``ask``."""
        if ask:
            version = self.database.client.admin.command("hello").get("topologyVersion") or {}
            return str(version["processId"]) if "processId" in version else None
        descriptions = self.database.client.topology_description.server_descriptions().values()
        found = [d.topology_version for d in descriptions if d.is_writable and d.topology_version]
        return str(found[0]["processId"]) if found else None

    def _check_server_restart(self, *, ask: bool = False) -> None:
        """A server that restarted (or a new primary) may have lost writes it acknowledged
        without journaling, and the stream's position may point into that lost history, which
        a server can resume from without an error (pymongo resumes by itself): every collection
        is reconciled. A barrier asks the server (``ask``); idle steps look at pymongo's view."""
        process = self._primary_process(ask=ask)
        previous, self._server_process = self._server_process, process or self._server_process
        if previous is None or process is None or process == previous:
            return
        self.server_restarts += 1
        self._recover_history(f"{self.uri} restarted or changed primary: writes it acknowledged may be lost")

    def _recover_history(self, why: str | None = None) -> None:
        """The position is not to be trusted (aged out of the oplog, unreadable, or from before
        a server restart): follow from now, and reconcile every collection."""
        self._history_lost(why)
        self._recover()

    def _history_lost(self, why: str | None = None) -> None:
        """Note that the position is not to be trusted, and why: :meth:`_recover` runs until done."""
        self.history_lost += 1
        if why is not None:
            self.last_error = why
        elif not self._unknown_history:
            self.last_error = "resume token aged out of the oplog (ChangeStreamHistoryLost); reconciled"
        self._unknown_history = False
        self._recovering = why or f"the saved position on {self.uri} is no longer in the oplog"
        self._recovery_attempts = 0

    def _recover(self) -> None:
        """Follow from now and reconcile every collection; an error cuts it short, and the next
        step runs it again."""
        assert self._recovering is not None
        self._recovery_attempts += 1
        log.warning(
            "%s; reconciling outputs with the source, then following changes from now%s",
            self._recovering,
            " (again: the last attempt failed)" if self._recovery_attempts > 1 else "",
        )
        with self._changed:
            self._seen = self._processed = None
            self._epoch += 1
            self._told.clear()  # read before: their packets are never read again
        # Open from now first, so nothing written during the reconciliation is missed.
        self._reopen(None)
        assert self._stream is not None
        # Flagged until a later position is saved, which happens only once the reconciliation's
        # packets (queued before anything the new stream reads) are processed: a process that
        # stops before then reconciles again at its next start.
        self._save({"token": self._stream.resume_token, "start_after": False, "reconcile": True})
        # Windows in flight were read before: let them be written, so that the reconciliation
        # sees their outputs (an output of a row the server lost is then an orphan it removes).
        with self._changed:
            self._changed.wait_for(lambda: self._in_flight == 0 or not self.should_keep_running())
        self.hooks.reconcile(sorted(self.tables), self.stopped_event)
        self._recovering, self._mark_owed = None, True
        self._write_mark()

    def _write_mark(self) -> None:
        """Write the last barrier mark again if the stream has not passed it: a server that
        restarted may have lost it (it is not journaled), and a ``sync`` waiting for it would
        wait out its timeout. Written after the reconciliation is queued, it passes after it.
        A transient error leaves it owed: the next step writes it (the error backs off as any
        other). One that retrying cannot mend gives it up, as ``sync`` does its own."""
        with self._changed:
            mark, pending = self._marks_sent, self._marks_sent > self._marks_seen
        if pending:
            try:
                self._put_mark(mark)
            except PyMongoError as exc:
                if classify(exc) is Fault.TRANSIENT:
                    raise
                log.warning("could not write a barrier mark again: %s", exc)
        self._mark_owed = False

    def _put_mark(self, mark: int) -> None:
        """Write barrier mark ``mark``. Each write changes the document (its count of writes
        goes up): a write that leaves a document as it was makes no change event, so the same
        number written again (a server that kept the mark, a stream reopened past it when the
        restart was seen) would never pass, and ``wait_idle`` waited out its timeout."""
        self.database[MARKS_COLLECTION].update_one(
            {"_id": self._mark_id}, {"$set": {"n": mark}, "$inc": {"writes": 1}}, upsert=True
        )

    # -- what the handler and db.cdc call -------------------------------------------------
    def save_positions(self, positions: Sequence[Any]) -> None:
        """These packets are processed, their outputs written (the handler checked the lease
        just before): their position is saved now if the last save is
        :data:`BUSY_SAVE_SECONDS` old or this thread no longer runs, else by this thread as
        soon as the stream has nothing new (see :meth:`_save_idle_position`)."""
        with self._changed:
            # Their outputs are written: the stream may be read again (see _hold).
            self._written.update(map(id, positions))
            self._changed.notify_all()
            if getattr(positions[-1], "epoch", self._epoch) != self._epoch:
                return  # read before the history was recovered: never saved over its position
            self._processed = positions[-1]
            self._processed_count += 1
            covers = self._processed_count
            due = self._finished or time.monotonic() - self._last_save >= BUSY_SAVE_SECONDS
        if due:
            self._save(positions[-1], covers)

    def commit(self, positions: Sequence[Any]) -> None:
        with self._changed:
            self._written.difference_update(map(id, positions))
            if self._told:
                self._told.difference_update(bson.encode(position["token"]) for position in positions)
        super().commit(positions)

    def _for_monitors(self, packet: ChangePacket) -> SourceChange | None:
        """Nothing for a change the monitors were told of already (the stream read it again)."""
        told = bson.encode(packet.position["token"])
        with self._changed:
            if told in self._told:
                return None
            self._told.add(told)
        return super()._for_monitors(packet)

    def release(self, positions: Sequence[Any]) -> None:
        with self._changed:
            self._written.difference_update(map(id, positions))
        super().release(positions)

    def redeliver(self, positions: Sequence[Any]) -> None:
        """Reopen the stream after the last processed packet; later events come again too."""
        with self._changed:
            self._rewind = True

    def _arm_after_barrier(self, sink: Any) -> None:
        """Arm ``sink`` when the stream passes a mark written now: events before it (a stream
        reopened a little in the past for the new collection) are not the monitor's."""
        if self.is_alive():
            self.sync(None, arming=sink)
        else:
            self._arm(lambda target: True)

    def sync(self, timeout: float | None, *, arming: Any = None) -> bool:
        """Write a barrier mark and wait until the stream has passed it (and armed ``arming``)."""
        with self._changed:
            self._marks_sent += 1
            mark = self._marks_sent
            if arming is not None and id(arming) in self._arming:
                self._arming[id(arming)] = mark
        try:
            self._put_mark(mark)
        except PyMongoError as exc:
            log.warning("could not write a barrier mark: %s", exc)
            return False
        with self._changed:
            return self._changed.wait_for(lambda: self._marks_seen >= mark or self.ending(), timeout) and (
                self._marks_seen >= mark
            )

    def info(self) -> dict[str, Any]:
        return {
            **super().info(),
            "disconnected_since": self.disconnected_since.isoformat() if self.disconnected_since else None,
            "history_lost": self.history_lost,
            "server_restarts": self.server_restarts,
        }

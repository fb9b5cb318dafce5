"""What ``db.cdc`` measures while it runs: each listener's lag, and the counters as Prometheus metrics.

**Lag.** :class:`LagQueue` is the CDC queue that also remembers, for every packet not processed
yet (queued, or taken by the handler and not finished), when it was queued. ``db.cdc.info()``
reads it to say, per listener, how many row changes wait for it and how long the oldest has
waited (``info()["listeners"][id]["lag"]``).

**Prometheus.** ``db.cdc.metrics()`` returns a ``prometheus_client`` registry whose collector
reads ``db.cdc.info()`` at each scrape; :func:`serve` exposes it over HTTP::

    import reactive.metrics

    server = reactive.metrics.serve(db, 9464)  # http://127.0.0.1:9464/metrics
    ...
    server.close()

``prometheus_client`` is the ``metrics`` extra (``pip install 'reactive-ml[metrics]'``); it is
imported only when metrics are asked for.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from reactive.errors import ConfigurationError
from reactive.events import ChangePacket
from reactive.queue import QUEUE_ROWS, CDCQueue
from reactive.threads import THREAD_PREFIX

if TYPE_CHECKING:
    from reactive.datalayer import Datalayer

#: The prefix of every metric name.
PREFIX = "reactive"


class LagQueue(CDCQueue[ChangePacket]):
    """The CDC queue, plus what each unprocessed packet is and when it was queued.

    The handler takes packets in order and finishes its windows in the order it took them
    (``task_done`` once per window), so the packets taken and not finished yet are a FIFO
    too: those are the ones in flight.

    >>> q = LagQueue(max_rows=10)
    >>> q.put(ChangePacket("docs", "insert", (1, 2), targets=frozenset({"m__text"})))
    False
    >>> [(len(p), round(age)) for p, age in q.pending()], q.rows_put_for("m__text")
    ([(2, 0)], 2)
    >>> taken = q.get_batch(max_rows=10); len(q.pending())   # in flight: still pending
    1
    >>> q.task_done(len(taken)); q.pending()
    []
    """

    def __init__(self, max_rows: int = QUEUE_ROWS) -> None:
        super().__init__(max_rows=max_rows)
        self._lag_lock = threading.Lock()
        #: id(packet) -> when it was queued (monotonic), for packets in the queue.
        self._queued_at: dict[int, float] = {}
        #: Packets taken by the handler and not finished, oldest first, with when they were queued.
        self._taken: deque[tuple[ChangePacket, float]] = deque()
        #: Rows ever queued for packets limited to one component (backfills), by its identifier.
        self._rows_for: Counter[str] = Counter()

    def put(self, packet: ChangePacket, *, abandon: threading.Event | None = None) -> bool:
        with self._lag_lock:
            self._queued_at[id(packet)] = time.monotonic()  # a producer that waits: its change waits
        try:
            waited = super().put(packet, abandon=abandon)
        except BaseException:
            with self._lag_lock:
                self._queued_at.pop(id(packet), None)
            raise
        if packet.targets is not None and len(packet.targets) == 1:
            with self._lag_lock:
                self._rows_for[next(iter(packet.targets))] += len(packet)
        return waited

    def get_batch(self, *, max_rows: int, timeout: float | None = None) -> list[ChangePacket]:
        taken = super().get_batch(max_rows=max_rows, timeout=timeout)
        if taken:
            now = time.monotonic()
            with self._lag_lock:
                for packet in taken:
                    self._taken.append((packet, self._queued_at.pop(id(packet), now)))
        return taken

    def task_done(self, count: int = 1) -> None:
        super().task_done(count)
        with self._lag_lock:
            for _ in range(min(count, len(self._taken))):
                self._taken.popleft()

    def rows_put_for(self, identifier: str) -> int:
        """Rows queued so far in packets for ``identifier`` alone (a backfill's packets)."""
        with self._lag_lock:
            return self._rows_for[identifier]

    def pending(self) -> list[tuple[ChangePacket, float]]:
        """Every packet not processed yet, oldest first, with how many seconds ago it was queued."""
        now = time.monotonic()
        with self._lock, self._lag_lock:
            taken = list(self._taken)
            queued = [(p, self._queued_at.get(id(p), now)) for p in self._packets]
        return [(packet, max(0.0, now - at)) for packet, at in taken + queued]


def listener_lag(db: Datalayer, queue: CDCQueue) -> dict[str, dict[str, Any]]:
    """Per component of ``db``: ``rows`` (row changes queued or in flight for it) and ``seconds``
    (since the oldest of them was queued; None when none waits)."""
    lag: dict[str, dict[str, Any]] = {c.identifier: {"rows": 0, "seconds": None} for c in db.components()}
    if not isinstance(queue, LagQueue):
        return lag
    routes: dict[tuple[str, frozenset[str] | None], list[str]] = {}
    for packet, age in queue.pending():
        key = (packet.table, packet.targets)
        names = routes.get(key)
        if names is None:
            names = routes[key] = [c.identifier for c in db.components_for(packet.table, packet.targets)]
        for name in names:
            entry = lag.setdefault(name, {"rows": 0, "seconds": None})
            entry["rows"] += len(packet)
            if entry["seconds"] is None or age > entry["seconds"]:
                entry["seconds"] = round(age, 3)
    return lag


# -- Prometheus -------------------------------------------------------------------------------------
def _prometheus() -> Any:
    try:
        import prometheus_client
    except ImportError:
        raise ConfigurationError(
            "Prometheus metrics need the prometheus_client package: pip install 'reactive-ml[metrics]'"
        ) from None
    return prometheus_client


#: Counters of each listener in ``info()["listeners"][id]``: (key, metric name, help).
_LISTENER_COUNTERS = (
    ("computed", "listener_computed", "Rows whose output was computed"),
    ("skipped", "listener_skipped", "Rows whose stored output was already current"),
    ("errors", "listener_errors", "Rows recorded as failed"),
    ("batches", "listener_batches", "Batches of rows handed to the listener"),
)
_MODEL_COUNTERS = (
    ("timeouts", "listener_model_timeouts", "Model calls given up after the model's timeout"),
    ("transient_retries", "listener_model_transient_retries", "Model calls retried after a transient error"),
)
_HANDLER_COUNTERS = (
    ("packets", "handler_packets", "Change packets processed"),
    ("rows", "handler_rows", "Row changes processed"),
    ("windows", "handler_windows", "Windows of packets processed"),
    ("internal_errors", "handler_internal_errors", "Windows the handler failed on (delivered again)"),
)


class InfoCollector:
    """A ``prometheus_client`` collector: ``db.cdc.info()`` as metrics, read at each scrape."""

    def __init__(self, db: Datalayer) -> None:
        self.db = db

    def describe(self) -> list[Any]:
        return []  # the families depend on the listeners: registered without a check

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        info = self.db.cdc.info()

        def gauge(name: str, text: str, value: float, **labels: str) -> Any:
            family = GaugeMetricFamily(f"{PREFIX}_{name}", text, labels=list(labels))
            family.add_metric(list(labels.values()), value)
            return family

        def counter(name: str, text: str, value: float) -> Any:
            family = CounterMetricFamily(f"{PREFIX}_{name}", text)
            family.add_metric([], value)
            return family

        yield gauge("running", "1 while change data capture runs", float(bool(info["running"])))
        lease = info.get("lease")
        held = 1.0 if lease is None else float(bool(lease.get("this_process")))
        yield gauge("lease_held", "1 while this process holds the database's lease (runs the listeners)", held)
        yield gauge("stopped_tables", "Tables no longer followed (dropped, altered)", len(info["stopped_tables"]))

        queue = info["queue"]
        yield gauge("queue_rows", "Row changes waiting in the queue", queue["rows"])
        yield gauge("queue_packets", "Packets waiting in the queue", queue["packets"])
        yield gauge("queue_max_rows", "The queue's bound, in rows", queue["max_rows"])
        yield counter("queue_put_rows", "Row changes queued", queue["put_rows"])
        yield counter("queue_put_packets", "Packets queued", queue["put_packets"])
        yield counter(
            "queue_producer_blocked_seconds",
            "Seconds producers waited on a full queue",
            queue["producer_blocked_seconds"],
        )
        for key, name, text in _HANDLER_COUNTERS:
            yield counter(name, text, info["handler"][key])
        yield gauge(
            "handler_window_rows", "The bound of the handler's next window, in rows", info["handler"]["window_rows"]
        )

        source = info.get("source") or {}
        changes = CounterMetricFamily(
            f"{PREFIX}_source_changes", "Row changes the change listener reported", labels=["event"]
        )
        for event in ("inserts", "updates", "deletes"):
            changes.add_metric([event[:-1]], source.get(event, 0))
        yield changes

        listeners = info["listeners"]
        events = CounterMetricFamily(
            f"{PREFIX}_listener_changes", "Row changes handed to the listener", labels=["listener", "event"]
        )
        for name, stats in listeners.items():
            for event in ("inserts", "updates", "deletes"):
                events.add_metric([name, event[:-1]], stats[event])
        yield events
        for key, metric, text in _LISTENER_COUNTERS:
            family = CounterMetricFamily(f"{PREFIX}_{metric}", text, labels=["listener"])
            for name, stats in listeners.items():
                family.add_metric([name], stats[key])
            yield family
        for key, metric, text in _MODEL_COUNTERS:
            family = CounterMetricFamily(f"{PREFIX}_{metric}", text, labels=["listener"])
            for name, stats in listeners.items():
                family.add_metric([name], (stats.get("model_calls") or {}).get(key, 0))
            yield family
        rows = GaugeMetricFamily(
            f"{PREFIX}_listener_lag_rows", "Row changes queued or in flight for the listener", labels=["listener"]
        )
        seconds = GaugeMetricFamily(
            f"{PREFIX}_listener_lag_seconds",
            "Seconds since the oldest change waiting for the listener was queued (0: none waits)",
            labels=["listener"],
        )
        for name, stats in listeners.items():
            lag = stats.get("lag") or {}
            rows.add_metric([name], lag.get("rows", 0))
            seconds.add_metric([name], lag.get("seconds") or 0.0)
        yield rows
        yield seconds


def registry(db: Datalayer) -> Any:
    """A new ``prometheus_client.CollectorRegistry`` with ``db``'s metrics (read at each scrape)."""
    prometheus_client = _prometheus()
    found = prometheus_client.CollectorRegistry(auto_describe=False)
    found.register(InfoCollector(db))
    return found


class MetricsServer:
    """The HTTP server :func:`serve` started: ``url``, ``port``, and :meth:`close`."""

    def __init__(self, server: Any, thread: threading.Thread, registry: Any) -> None:
        self.server = server
        self.thread = thread
        self.registry = registry
        self.host, self.port = server.server_address[:2]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving (the thread ends, the port is free)."""
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"MetricsServer({self.url!r})"


def serve(db: Datalayer, port: int, *, addr: str = "127.0.0.1") -> MetricsServer:
    """Serve ``db``'s metrics for Prometheus at ``http://addr:port/metrics`` (port 0: any free
    port, ``server.port`` says which) on a daemon thread, until ``server.close()``.

    Binds 127.0.0.1 by default: the metrics name tables and listeners; pass ``addr="0.0.0.0"``
    to let another host scrape them.
    """
    prometheus_client = _prometheus()
    metrics = db.cdc.metrics()
    server, thread = prometheus_client.start_http_server(port, addr=addr, registry=metrics)
    thread.name = f"{THREAD_PREFIX}metrics"  # a thread of reactive's, as every other (reactive_threads)
    return MetricsServer(server, thread, metrics)

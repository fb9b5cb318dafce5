"""The Kinetica backend: REST for reads and writes, table monitors (ZMQ + Avro) for changes."""

from __future__ import annotations

import json
from typing import Any, Self

from reactive import checks
from reactive.backends.base import DataBackend, ListenerHooks, TableInfo
from reactive.backends.kinetica import SCHEMES
from reactive.backends.kinetica.checkpoints import KineticaSections
from reactive.backends.kinetica.client import KineticaAuthError, KineticaClient, KineticaURI, is_transient
from reactive.backends.kinetica.listener import KineticaMonitorListener
from reactive.backends.kinetica.stores import KineticaErrors, KineticaOutputs, KineticaSource
from reactive.backends.kinetica.tables import TableCatalog
from reactive.checkpoints import Positions
from reactive.errors import BackendError, ReactiveError
from reactive.outputs import OutputTypes
from reactive.queue import CDCQueue
from reactive.rowformat import RowFormat


class KineticaBackend(DataBackend):
    """Kinetica: ``kinetica://[user:password@]host:9191[,host2:9191][?monitor_port=9002]``.

    ``kinetica+https://`` talks HTTPS. Several comma-separated heads form an HA ring: a head
    that stops answering is left for the next one. ``monitor_port`` is the server's table
    monitor (ZMQ) port. Table names may be schema-qualified (``ki_home.docs``); a row's id
    is the table's primary key.

    Options of :func:`reactive.connect`: ``encoding`` (``"binary"``, the default, or
    ``"json"``), ``inactivity_timeout`` (seconds without a monitor message after which a
    table is checked for existence; default 60), ``reconcile_interval`` (seconds between
    periodic reconciliations of every table; off by default), ``connect_timeout`` (seconds
    ``db.cdc.start()`` waits for the first monitor message; default 10).
    """

    name = "kinetica"
    schemes = SCHEMES
    listener_class = KineticaMonitorListener
    monitors_need_ids = False

    def __init__(self, client: KineticaClient, *, listener_options: dict[str, Any] | None = None) -> None:
        self.client = client
        self.catalog = TableCatalog(client)
        self.sections = KineticaSections(self.catalog)
        self.checkpoints = Positions(self.sections)
        self.output_types = OutputTypes(self.checkpoints)
        self.source = KineticaSource(self.catalog, output_type=self.output_types.of_table)
        self.outputs = KineticaOutputs(self.catalog, decoded=self.source.decoded, outputs_lost=self._outputs_lost)
        self.errors = KineticaErrors(self.catalog)
        self.listener_options = listener_options or {}
        self._listener: KineticaMonitorListener | None = None

    @classmethod
    def from_uri(
        cls,
        uri: str,
        *,
        encoding: str = "binary",
        inactivity_timeout: float = 60.0,
        reconcile_interval: float | None = None,
        connect_timeout: float = 10.0,
    ) -> Self:
        # Checked before anything connects: a bad one failed inside the listener's maintenance
        # thread (a text), ended it without a word (a dropped table never noticed, periodic
        # reconciliations never run), or failed db.cdc.start() with a TypeError.
        inactivity_timeout = checks.seconds("inactivity_timeout", inactivity_timeout, infinite=True)
        if reconcile_interval is not None:
            reconcile_interval = checks.seconds("reconcile_interval", reconcile_interval, infinite=True)
        connect_timeout = checks.seconds("connect_timeout", connect_timeout)
        parsed = KineticaURI.parse(uri)
        client = KineticaClient(parsed, encoding=encoding)  # type: ignore[arg-type]
        try:
            status = client.show_system_status()
        except KineticaAuthError:
            client.close()
            raise
        except ReactiveError as exc:
            client.close()
            raise BackendError(f"could not connect to {parsed.redacted!r}: {exc}") from None
        if _system_status(status) != "running":
            client.close()
            raise BackendError(f"Kinetica at {parsed.redacted!r} is not running: {status.get('system')!r}")
        options = {
            "inactivity_timeout": inactivity_timeout,
            "reconcile_interval": reconcile_interval,
            "connect_timeout": connect_timeout,
        }
        return cls(client, listener_options=options)

    @property
    def uri(self) -> str:
        return self.client.uri.redacted

    def create_listener(self, queue: CDCQueue, hooks: ListenerHooks, **options: Any) -> KineticaMonitorListener:
        options.pop("poll_interval", None)  # monitors push; nothing polls
        self._listener = KineticaMonitorListener(
            self.client, self.catalog, self.checkpoints, queue, hooks=hooks, **self.listener_options, **options
        )
        return self._listener

    def _outputs_lost(self, table: str) -> None:
        """Outputs of ``table``'s listeners were dropped: the listener reconciles it (the backfill
        of ``db.add`` does when nothing follows changes yet)."""
        if self._listener is not None:
            self._listener.reconcile_soon(table)

    def row_format(self, table: TableInfo) -> RowFormat:
        """The table's own type: INSERT_RAW gets the records exactly as the server publishes them."""
        self.catalog.forget(table.name)
        return RowFormat(json.loads(self.catalog.describe(table.name).type_schema), dict)

    def close(self) -> None:
        self.client.close()

    def is_transient(self, exc: BaseException) -> bool:
        return is_transient(exc)


def _system_status(status: dict[str, str]) -> str | None:
    """``status_map["system"]["status"]`` (``"running"`` when the server is up)."""
    try:
        return json.loads(status["system"]).get("status")
    except (KeyError, TypeError, ValueError, AttributeError):
        return None

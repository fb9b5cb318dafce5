"""Typed errors. Each carries the table and listener it concerns, when there is one.

Messages never contain a password: URIs are redacted with :func:`reactive.uri.redact`
before they reach an error.
"""

from __future__ import annotations


class ReactiveError(Exception):
    """Base class of every error raised by ``reactive``."""

    def __init__(self, message: str, *, table: str | None = None, listener: str | None = None):
        super().__init__(message)
        self.table = table
        self.listener = listener


class ConfigurationError(ReactiveError, ValueError):
    """A declaration or setting is invalid (bad URI, unknown backend, bad filter...)."""


class TableNotFoundError(ReactiveError, LookupError):
    """The table a listener selects does not exist."""


class MissingIdColumnError(ReactiveError, ValueError):
    """A table has no primary key and no id column was given."""


class ModelOutputError(ReactiveError):
    """A model returned outputs that cannot be matched to its inputs."""


class BackendError(ReactiveError):
    """The database refused or failed an operation (connection, capability, query)."""


class PermissionDeniedError(BackendError):
    """The database refuses reactive's session a statement: a privilege its role lacks (on a
    watched table, on reactive's own tables, on the schema it creates them in), or a read-only
    session (a hot standby, ``default_transaction_read_only``). The message says what to grant
    or change. Not the rows' fault: a window it stops is kept and tried again, none of its rows
    set apart, until the grant comes."""


class ChangeStreamUnsupportedError(BackendError):
    """The server cannot produce changes (for example a MongoDB standalone server)."""


class QueueClosedError(ReactiveError):
    """A producer tried to put a change on a queue that is shutting down."""


class ComputeUnavailableError(ReactiveError):
    """Model work could not run because its executor is unreachable (a Ray cluster gone): the
    handler retries the window with backoff, as when the database is unreachable."""


class SearchError(ReactiveError, ValueError):
    """A search that cannot be answered as asked (unknown index, a query of the wrong length, k < 1...)."""


class LeaseLostError(ReactiveError):
    """This process does not hold the lease of its database (any more): it writes nothing."""

"""Parsing and redaction of database URIs.

Every URI that appears in a log line, an error or ``info()`` goes through :func:`redact`.
"""

from __future__ import annotations

import re
from urllib.parse import SplitResult, urlsplit

_USERINFO = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<user>[^:@/]*):(?P<pw>[^@/]*)@")


def redact(uri: str) -> str:
    """Return ``uri`` with any password replaced by ``***``.

    >>> redact("postgres://alice:s3cret@db:5432/app")
    'postgres://alice:***@db:5432/app'
    >>> redact("duckdb:///app.duckdb")
    'duckdb:///app.duckdb'
    """
    return _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:***@", uri, count=1)


def scheme_of(uri: str) -> str:
    """Return the lower-cased scheme of ``uri``, or ``""`` when it has none.

    >>> scheme_of("postgresql://localhost/test")
    'postgresql'
    """
    if "://" not in uri:
        return ""
    return uri.split("://", 1)[0].lower()


def split(uri: str) -> SplitResult:
    """``urllib.parse.urlsplit``, with errors that never show the password."""
    try:
        parts = urlsplit(uri)
        parts.port  # noqa: B018 - validates the port now rather than at first use
    except ValueError as exc:
        from reactive.errors import ConfigurationError

        raise ConfigurationError(f"invalid URI {redact(uri)!r}: {exc}") from None
    return parts

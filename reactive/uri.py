"""Parsing and redaction of database URIs.

Every URI that appears in a log line, an error or ``info()`` goes through :func:`redact`.
"""

from __future__ import annotations

import re
from urllib.parse import SplitResult, unquote, urlsplit

#: Schemes whose URI names a file: no host, no credentials.
_FILE_SCHEMES = ("duckdb", "sqlite")

_SECRET_QUERY_VALUE = re.compile(r"(?i)([?&][^=&#]*(?:pass|pwd|secret|token)[^=&#]*=)[^&#]*")


def redact(uri: str) -> str:
    """Return ``uri`` with any password (and password-like query value) replaced by ``***``.

    A password that was not percent-encoded (a raw ``/``, ``@``, ``?`` or ``#``) is hidden too:
    a URI that fails to parse is exactly the one an error shows, so everything up to the last
    ``@`` counts as credentials.

    >>> redact("postgres://alice:s3cret@db:5432/app")
    'postgres://alice:***@db:5432/app'
    >>> redact("duckdb:///app.duckdb")
    'duckdb:///app.duckdb'
    >>> redact("kinetica://alice:raw/pass@word@host:9191,h2:9191")
    'kinetica://alice:***@host:9191,h2:9191'
    >>> redact("postgres://bob@db/app?password=hunter2&sslmode=require")
    'postgres://bob@db/app?password=***&sslmode=require'
    >>> redact("postgres://bob@127.0.0.1:1/x?password=hun/ter@2")
    'postgres://bob@127.0.0.1:1/x?password=***'

    A file URI has no credentials: its path is shown as it is.

    >>> redact("sqlite:///a:b@c.sqlite")
    'sqlite:///a:b@c.sqlite'
    """
    # Query secrets first: a raw "@" in one must not be taken for the end of the credentials.
    scheme, sep, rest = _SECRET_QUERY_VALUE.sub(r"\1***", uri).partition("://")
    if not sep:
        scheme, rest = "", scheme
    if scheme.lower() in _FILE_SCHEMES:
        return f"{scheme}{sep}{rest}"
    userinfo, at, hosts = rest.rpartition("@")
    if at and ":" in userinfo:
        rest = f"{userinfo.partition(':')[0]}:***@{hosts}"
    return f"{scheme}{sep}{rest}"


#: A URI inside a text (``scheme://`` up to the next space).
_URI_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://\S+")


def redact_text(text: str) -> str:
    """``text`` with every URI in it redacted (:func:`redact`): a message that quotes one, such
    as a model's error naming the service it calls, or argparse's naming an argument.

    >>> redact_text("ConnectionError: https://bob:hunter2@api.example.com/v1 did not answer")
    'ConnectionError: https://bob:***@api.example.com/v1 did not answer'
    """
    return _URI_IN_TEXT.sub(lambda found: redact(found.group()), text)


def scheme_of(uri: str) -> str:
    """Return the lower-cased scheme of ``uri``, or ``""`` when it has none.

    >>> scheme_of("postgresql://localhost/test")
    'postgresql'
    """
    if "://" not in uri:
        return ""
    return uri.split("://", 1)[0].lower()


def file_path(uri: str) -> str:
    """The file of a ``duckdb://`` or ``sqlite://`` URI, or ``":memory:"``.

    SQLAlchemy's convention: three slashes then a relative path, four for an absolute one.

    >>> file_path("duckdb:///app.duckdb"), file_path("sqlite:////tmp/app.db"), file_path("duckdb://")
    ('app.duckdb', '/tmp/app.db', ':memory:')

    A query is refused (:class:`~reactive.errors.ConfigurationError`), wherever the URI is
    used (``reactive.connect``, ``reactive status``, the demo): reading up to the ``?`` dropped
    the rest, and opened (created) a file named up to it (``a?b.duckdb`` opened ``a``).
    """
    rest = uri.split("://", 1)[1] if "://" in uri else uri
    if "?" in rest:
        from reactive.errors import ConfigurationError

        scheme = scheme_of(uri)
        settings = (
            "; DuckDB settings go to reactive.connect as keyword arguments (e.g. checkpoint_threshold='256MB')"
            if scheme == "duckdb"
            else ""
        )
        raise ConfigurationError(
            f"a {scheme or 'file'} URI takes no query: {redact(uri)!r} (a '?' in a file name is written %3F){settings}"
        )
    path = rest[1:] if rest.startswith("/") else rest
    return ":memory:" if path in ("", ":memory:") else unquote(path)


def split(uri: str) -> SplitResult:
    """``urllib.parse.urlsplit``, with errors that never show the password."""
    try:
        parts = urlsplit(uri)
        parts.port  # noqa: B018 - validates the port now rather than at first use
    except ValueError as exc:
        from reactive.errors import ConfigurationError

        raise ConfigurationError(f"invalid URI {redact(uri)!r}: {_parse_error(uri, exc)}") from None
    return parts


_RAW_PASSWORD = "a password with '/', '@', '?' or '#' must be percent-encoded"


def check_credentials(uri: str) -> str:
    """``uri``, or a :class:`~reactive.errors.ConfigurationError` where its password holds a raw
    ``/``: a parser then ends the host part at it and takes a piece of the password for a host
    (pymongo looked ``ev`` up, and its error showed it, for the password ``s3cret@ev/il``).

    >>> check_credentials("mongodb://bob:s3cret@db/app")
    'mongodb://bob:s3cret@db/app'
    >>> check_credentials("mongodb://bob:s3cret@ev/il@db/app")
    Traceback (most recent call last):
    ...
    reactive.errors.ConfigurationError: invalid URI 'mongodb://bob:***@db/app': a password with '/', ... percent-encoded
    """
    head = uri.partition("://")[2].split("?", 1)[0].split("#", 1)[0]
    if "/" in head.rpartition("@")[0]:
        from reactive.errors import ConfigurationError

        raise ConfigurationError(
            f"invalid URI {redact(uri)!r}: a password with '/', '@', '?' or '#' must be percent-encoded"
        )
    return uri


def _parse_error(uri: str, exc: ValueError) -> str:
    """What the parser said, unless it quotes a piece of the credentials (a raw ``/`` in a
    password ends the host part early, and the rest is read as a port)."""
    credentials = uri.partition("://")[2].rpartition("@")[0]
    if credentials and any(quoted and quoted in credentials for quoted in re.findall(r"'([^']*)'", str(exc))):
        return _RAW_PASSWORD
    return str(exc)

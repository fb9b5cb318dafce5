"""Pytest fixtures for the Kinetica test server; tests/conftest.py loads this module as a plugin."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from kinetica_server import KineticaTestServer


@pytest.fixture
def kinetica_server() -> Iterator[KineticaTestServer]:
    """A started server on free ports, empty; stopped (threads joined) after the test."""
    server = KineticaTestServer().start()
    try:
        yield server
    finally:
        server.stop()  # idempotent, never asserts: a test may have stopped it already


@pytest.fixture
def kinetica_url(kinetica_server: KineticaTestServer) -> str:
    """The server's REST URL, e.g. http://127.0.0.1:40123."""
    return kinetica_server.url


@pytest.fixture
def kinetica_uri(kinetica_server: KineticaTestServer) -> str:
    """A ``kinetica://`` URI of :func:`kinetica_server` (its REST port and its monitors' port)."""
    return kinetica_server.uri()

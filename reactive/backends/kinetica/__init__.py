"""The Kinetica backend: REST reads and writes, changes through table monitors (ZMQ + Avro).

Importing this package loads none of the client: :data:`SCHEMES` is what the backend registry
reads to route a URI, and the class loads on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from reactive.backends import lazy_exports

#: The URI schemes this backend serves (``KineticaBackend.schemes``).
SCHEMES = ("kinetica", "kinetica+http", "kinetica+https")

if TYPE_CHECKING:
    from reactive.backends.kinetica.backend import KineticaBackend

__all__ = ["SCHEMES", "KineticaBackend"]
__getattr__ = lazy_exports(__name__, {"KineticaBackend": "reactive.backends.kinetica.backend"})

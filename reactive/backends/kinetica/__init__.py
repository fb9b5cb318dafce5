"""The Kinetica backend: REST reads and writes, changes through table monitors (ZMQ + Avro)."""

from reactive.backends.kinetica.backend import KineticaBackend

__all__ = ["KineticaBackend"]

"""Components: what reacts to changes."""

from reactive.components.base import Component, Refresh
from reactive.components.listener import Listener
from reactive.components.model import Failure, Model
from reactive.components.vector_index import VectorIndex

__all__ = ["Component", "Failure", "Listener", "Model", "Refresh", "VectorIndex"]

"""Benchmarks of reactive against hand-written references: ``python -m benchmarks``."""

# Two commands: `make demo` and `make test`. Each creates .venv when missing and installs
# what it needs once (a stamp file, redone when pyproject.toml changes).

PYTHON ?= python3
VENV = .venv
BIN = $(VENV)/bin

.DEFAULT_GOAL := help
.PHONY: help demo test lint bench

help:
	@echo "make demo   install the demo's embedding model into $(VENV) and run 'reactive demo'"
	@echo "make test   install the test tools into $(VENV), make sure PostgreSQL runs, run pytest"
	@echo "make lint   ruff check and ruff format --check"
	@echo "make bench  the benchmarks (DuckDB, MongoDB, Kinetica, the change feed, foreign writers); about twenty minutes"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.demo-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[embed]'
	touch $@

$(VENV)/.test-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

demo: $(VENV)/.demo-installed
	$(BIN)/reactive demo

test: $(VENV)/.test-installed
	./scripts/ensure-postgres.sh
	$(BIN)/python -m pytest

lint: $(VENV)/.test-installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(VENV)/.test-installed
	$(BIN)/python -m benchmarks
	$(BIN)/python -m benchmarks.mongo_changestream
	$(BIN)/python -m benchmarks.kinetica_monitor
	$(BIN)/python -m benchmarks.feed
	$(BIN)/python -m benchmarks.foreign_writer

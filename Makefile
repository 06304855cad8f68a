PYTHON ?= python3

.PHONY: install quickstart test lint

install:
	$(PYTHON) -m pip install -q torch==2.13.0
	$(PYTHON) -m pip install -q -e ".[dev]"

test:
	$(PYTHON) -m pytest -q

lint:
	ruff check .

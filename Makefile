# `make demo` and `make test` both work on a fresh machine: they create .venv and install first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	# The CPU build of torch first: a bare `torch` requirement would pull the CUDA wheels.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev,eval]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/unmask demo

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check unmask tests

bench: $(STAMP)
	$(BIN)/unmask bench train

clean:
	rm -rf $(VENV) .cache runs

# `make demo` and `make test` both work on a fresh machine: they create .venv and install first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean chromium

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	# The CPU build of torch first: a bare `torch` requirement would pull the CUDA wheels.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev,eval,serve,hf,track]'
	touch $(STAMP)

# The browser test drives Debian's chromium (playwright's own browser download needs the internet):
# installed here when the machine allows (root with apt-get); without it that test skips.
chromium:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  apt-get update -qq && apt-get install -y -qq chromium >/dev/null 2>&1 ; } || \
	  echo "chromium not installed: the browser test will skip"

demo: $(STAMP)
	$(BIN)/unmask demo

test: $(STAMP) chromium
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check unmask tests
	$(BIN)/ruff format --check unmask tests

bench: $(STAMP)
	$(BIN)/unmask bench train

clean:
	rm -rf $(VENV) .cache runs

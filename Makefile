# `make demo` and `make test` work on a fresh machine: they create .venv and install the project when missing.
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin

.PHONY: demo test test-all lint bench browser

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -e '.[test]'
	touch $@

# The browser test drives Debian's Chromium (Playwright only talks to it; no browser download).
CHROMIUM := $(shell command -v chromium || command -v chromium-browser)
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
ifeq ($(CHROMIUM),)
	$(SUDO) apt-get update -q && $(SUDO) DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium
endif

demo: $(BIN)/.installed
	$(BIN)/python examples/demo.py

# ruff, then the architecture: the import-linter contracts in pyproject.toml (layers, torch-free packages, no cycles).
lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/lint-imports

# Two workers taking tests in collection order; tests/conftest.py puts the longest files (the README tour) first.
PYTEST = $(BIN)/python -m pytest -q -n 2 --dist load

test: $(BIN)/.installed browser
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(PYTEST)

test-all: $(BIN)/.installed browser
	$(PYTEST) -m "slow or not slow"

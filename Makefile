# `make demo` and `make test` work on a fresh machine: they create .venv and install the project when missing.
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin

.PHONY: demo test test-all lint bench system-packages

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -e '.[test]'
	touch $@

# onnxruntime's CUDA build beside the venv, not in it: tests/test_onnxruntime_gpu_build.py puts it ahead of the CPU
# build in a subprocess, to check what `--device auto` and `cuda` do with it on a machine without a usable GPU.
ORT_GPU = $(VENV)/onnxruntime-gpu
$(ORT_GPU)/.installed: $(BIN)/.installed
	$(BIN)/pip install -q --disable-pip-version-check --no-deps --target $(ORT_GPU) 'onnxruntime-gpu==1.31.1'
	touch $@

# Debian packages the tests drive: Chromium for the serve page test (Playwright only talks to it; no browser
# download) and strace for the test that no process sends anything off the machine.
MISSING := $(if $(shell command -v chromium || command -v chromium-browser),,chromium) \
           $(if $(shell command -v strace),,strace)
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
system-packages:
ifneq ($(strip $(MISSING)),)
	$(SUDO) apt-get update -q && $(SUDO) DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(strip $(MISSING))
endif

demo: $(BIN)/.installed
	$(BIN)/python examples/demo.py

# ruff, then the architecture: the import-linter contracts in pyproject.toml (layers, torch-free packages, no cycles).
lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/lint-imports

# Two workers taking tests in collection order; tests/conftest.py puts the longest files first. -rs: every skipped
# test with its reason (only the `gpu` tests skip here, for want of CUDA).
PYTEST = $(BIN)/python -m pytest -q -n 2 --dist load -rs

# The edit-test loop: every test but the slow ones (minutes each: two processes, real VGG16/ResNet-152 exports).
test: lint system-packages $(ORT_GPU)/.installed
	$(PYTEST)

# What CI runs: every test, fast and slow; the `gpu` ones are collected and skipped with their reason without CUDA.
test-all: lint system-packages $(ORT_GPU)/.installed
	$(PYTEST) -m "slow or not slow"

# Quick start: `make run` (gateway on 127.0.0.1:8888 with local kernels), `make test` (everything).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
RUN_STAMP := $(VENV)/.run-stamp
STAMP := $(VENV)/.test-stamp
PYTEST_ARGS ?=

.PHONY: install run test test-fast browser-deps docs bench clean

# the gateway alone (what `make run` needs)
$(RUN_STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

# plus what the tests use (jupyter_server clients, JupyterLab, pytest)
$(STAMP): $(RUN_STAMP)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(STAMP)

run: $(RUN_STAMP)
	$(VENV)/bin/kernel-gateway --ip=127.0.0.1 --port=8888

browser-deps:
	bash tests/services/install-browser.sh

# The whole suite: every service the tests use is installed and started by the tests' own setup.
test: $(STAMP) browser-deps
	$(PY) -m pytest $(PYTEST_ARGS)

# The inner loop: no clusters, no browser.
test-fast: $(STAMP)
	$(PY) -m pytest -m "not cluster and not browser" $(PYTEST_ARGS)

docs: $(STAMP)
	$(VENV)/bin/kernel-gateway config-reference --write=README.md

bench: $(STAMP)
	$(PY) benchmarks/bench_gateway.py

clean:
	rm -rf $(VENV) tests/e2e/browser/node_modules .pytest_cache

# Quick start: `make run` (gateway on 127.0.0.1:8888 with local kernels; `make run RUN_PORT=9999` for
# another port), `make test` (everything).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
RUN_STAMP := $(VENV)/.run-stamp
STAMP := $(VENV)/.test-stamp
PYTEST_ARGS ?=
RUN_PORT ?= 8888
# pip's output (and the build backend's warnings) goes here; it is shown only when a step fails.
INSTALL_LOG := $(VENV)/install.log

# $(call pip_install,ARGS): `pip install -q ARGS` into the venv, its output appended to INSTALL_LOG;
# on failure the log is printed and make stops.
pip_install = $(PY) -m pip install -q $(1) >>$(INSTALL_LOG) 2>&1 \
	|| { cat $(INSTALL_LOG); echo "make: pip install $(1) failed (log: $(INSTALL_LOG))" >&2; exit 1; }

.PHONY: install run test test-fast browser-deps docs bench clean

# the gateway alone (what `make run` needs)
$(RUN_STAMP): pyproject.toml
	@echo "Installing the gateway into $(VENV) (log: $(INSTALL_LOG)) ..."
	@python3 -m venv $(VENV)
	@: >$(INSTALL_LOG)
	@$(call pip_install,--upgrade pip)
	@$(call pip_install,-e .)
	@touch $@

# plus what the tests use (jupyter_server clients, JupyterLab, pytest); the kerberos extra's gssapi is built
# from source against Debian's libkrb5-dev, which install-krb5.sh installs (with the test KDC's tools)
$(STAMP): $(RUN_STAMP)
	@echo "Installing the test tools into $(VENV) (log: $(INSTALL_LOG)) ..."
	@: >$(INSTALL_LOG)
	@bash tests/services/install-krb5.sh >>$(INSTALL_LOG) 2>&1 \
		|| { cat $(INSTALL_LOG); echo "make: tests/services/install-krb5.sh failed" >&2; exit 1; }
	@$(call pip_install,-e '.[test]')
	@touch $@

install: $(STAMP)

run: $(RUN_STAMP)
	@$(VENV)/bin/kernel-gateway --ip=127.0.0.1 --port=$(RUN_PORT)

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

# Two commands set everything up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CONFIG ?= config/demo.toml

.PHONY: run test test-fast test-lowest test-pipx man docs soak lint typecheck bench bench-quick bench-deps clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed-run: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@ $(VENV)/.installed-run

# The demo: 4 workers on 127.0.0.1:8080. The venv's bin goes first on PATH so
# the demo config's `python3` is the interpreter the package is installed in.
run: $(VENV)/.installed-run
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/supervisord -c $(CONFIG)

lint: $(VENV)/.installed-test
	$(BIN)/ruff check supervisor tests bench
	$(BIN)/ruff format --check supervisor tests bench

typecheck: $(VENV)/.installed-test
	$(BIN)/mypy

test: lint typecheck
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/pytest

# The fast tier: logic against fakes on trio's autojump clock, unprivileged, in seconds.
test-fast: $(VENV)/.installed-test
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/pytest tests/unit

# The fast tier against the lowest version of every dependency that
# pyproject.toml allows (.ci/lowest.txt), in a venv of its own.
LOWEST := .venv-lowest
$(LOWEST)/.installed: pyproject.toml .ci/lowest.txt
	$(PYTHON) -m venv $(LOWEST)
	$(LOWEST)/bin/pip install --quiet --upgrade pip
	$(LOWEST)/bin/pip install --quiet --constraint .ci/lowest.txt -e '.[test]'
	touch $@

test-lowest: $(LOWEST)/.installed
	PATH="$(abspath $(LOWEST))/bin:$$PATH" $(LOWEST)/bin/pytest -p no:cacheprovider -m "not slow and not soak"

# `pipx install .` with PyPI, then the demo served from what pipx exposed, in
# a private network namespace (tests/support/pipx_route.py; needs the network, so
# not part of make test).
test-pipx: $(VENV)/.installed-test
	$(BIN)/python tests/support/pipx_route.py

# The man pages in docs/man, made from the commands' parsers (a test checks they are current).
man: $(VENV)/.installed-run
	$(BIN)/python -m supervisor.daemon.manpage docs/man

# docs/configuration.md and docs/config.schema.json, from the config models
# (a test fails if they are stale).
docs: man
	$(BIN)/python -m supervisor.config.reference docs

# 1,000 reloads under load (several minutes): nothing lost, no fd or memory leak.
soak: $(VENV)/.installed-test
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/pytest -m soak -s

# Benchmarks: as root, in a private network namespace. Debian's wrk, nginx
# and haproxy; matplotlib and gunicorn from the `bench` extra.
$(VENV)/.installed-bench: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[bench]'
	touch $@ $(VENV)/.installed-run

bench-deps: $(VENV)/.installed-bench
	.ci/apt-install wrk=wrk nginx=nginx haproxy=haproxy

# About 25 minutes: writes bench/RESULTS.md and bench/*.png (docs/benchmarks.md shows them).
bench: bench-deps
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python bench/run.py

# Under 2 minutes, short phases: writes bench/quick/ (not committed).
bench-quick: bench-deps
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python bench/run.py --quick --out bench/quick

clean:
	rm -rf $(VENV) $(LOWEST) .mypy_cache .pytest_cache .ruff_cache *.egg-info

# Two commands set everything up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CONFIG ?= config/demo.toml

.PHONY: run test soak lint typecheck bench bench-quick bench-deps clean

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

# 1,000 reloads under load (several minutes): nothing lost, no fd or memory leak.
soak: $(VENV)/.installed-test
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/pytest -m soak -s

# Benchmarks: as root, in a private network namespace; wrk from Debian.
bench-deps: $(VENV)/.installed-run
	@command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk)

bench: bench-deps
	$(BIN)/python bench/reload_bench.py --seconds 30

bench-quick: bench-deps
	$(BIN)/python bench/reload_bench.py --seconds 8 --out bench/RESULTS-quick.md

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache *.egg-info

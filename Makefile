# Two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

.PHONY: install system-tools run test test-unit lint bench docs clean

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(INSTALLED)

install: $(INSTALLED)

## Debian packages the tests use as real peers (promtool checks /metrics; kcat is a stock librdkafka
## client; chromium loads the dashboard).
system-tools:
	@command -v promtool >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }
	@command -v kcat >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends kcat >/dev/null; }
	@command -v chromium >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; }

## Local broker (unless KAFKA_BROKER is set), one worker and demo traffic; Ctrl-C stops all.
run: install
	$(PY) -m app.dev

## The whole suite: lint and types, unit tests and real workers against real services.
test: install system-tools lint
	$(PY) -m pytest

## ruff (lint and format) and mypy on the application code.
lint: install
	$(PY) -m ruff check app agents models tables
	$(PY) -m ruff format --check app agents models tables
	$(PY) -m mypy

## The fast tests only (tests/unit: pure functions, agents under Faust's test_context, a few against the local broker).
test-unit: install
	$(PY) -m pytest tests/unit

## Throughput next to Quix Streams and Bytewax (bench/README.md): installs the bench extra, then one run.
## Extra options: make bench BENCH_ARGS="--repeat 3 --records 200000"
bench: install
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	$(PY) bench/compare.py $(BENCH_ARGS)

## docs/configuration.md from the Settings class (tests/unit/test_settings.py checks it is current).
docs: install
	$(PY) -c 'import sys; from app.settings import configuration_markdown; sys.stdout.write(configuration_markdown())' > docs/configuration.md

clean:
	rm -rf $(VENV) data

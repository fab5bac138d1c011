# Tally's everyday commands. Each sets up .venv first when it is missing or stale.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup lock browser wrk up demo test lint bench schemas compose-config clean

$(BIN)/tally: pyproject.toml sdk/pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]' -e ./sdk
	touch $@

setup: $(BIN)/tally

# constraints.txt from the newest releases pyproject.toml allows, in a scratch venv.
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install --quiet --upgrade pip
	.lock-venv/bin/pip install --quiet -e '.[dev]' -e ./sdk
	{ sed -n '1,3p' constraints.txt; .lock-venv/bin/pip freeze --exclude-editable; } > constraints.new
	mv constraints.new constraints.txt && rm -rf .lock-venv

# The dashboards' tests drive Debian's Chromium (not a Playwright download).
CHROMIUM ?= /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@[ -x $(CHROMIUM) ] || { $(SUDO) apt-get install -y -q chromium \
		|| { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q chromium; }; }

# bench.edge drives the APIs flat out with Debian's wrk (a C load generator);
# bench.middleware_cost --instructions counts with Debian's valgrind.
wrk:
	@command -v wrk >/dev/null || { $(SUDO) apt-get install -y -q wrk \
		|| { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q wrk; }; }
	@command -v valgrind >/dev/null || { $(SUDO) apt-get install -y -q valgrind \
		|| { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q valgrind; }; }

up: setup  ## all four services in one process, embedded Kafka (Tansu) and ClickHouse (chDB)
	$(BIN)/tally up

demo: setup  ## the same, with a synthetic workload driving it
	$(BIN)/tally up --demo

test: setup browser  ## the whole suite against real PostgreSQL, Redis, Tansu and chDB
	$(BIN)/pytest

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy .
	$(BIN)/lint-imports

bench: setup wrk  ## pipeline, tally up, enforcement, leases, usage reads, the SDK edge, the middleware's cost (CPU, and instructions counted by callgrind) and longest event-loop steps, events' cost (in tally up, and stage by stage), billing run, alerts (event → webhook), aggregator rejoin, kill -9 of tally up, the write-ahead log's cost (rates and latencies)
	$(BIN)/python -m bench.pipeline
	$(BIN)/python -m bench.up
	$(BIN)/python -m bench.enforce
	$(BIN)/python -m bench.leases
	$(BIN)/python -m bench.usage
	$(BIN)/python -m bench.sdk_client
	$(BIN)/python -m bench.edge
	$(BIN)/python -m bench.middleware_cost
	$(BIN)/python -m bench.middleware_cost --instructions
	$(BIN)/python -m bench.loop_steps
	$(BIN)/python -m bench.emit_cost
	$(BIN)/python -m bench.stages
	$(BIN)/python -m bench.billing
	$(BIN)/python -m bench.alerts
	$(BIN)/python -m bench.rejoin
	$(BIN)/python -m bench.crash
	$(BIN)/python -m bench.wal_cost

schemas: setup  ## regenerate the JSON Schema files from the pydantic models
	$(BIN)/python -m schemas.jsonschema

compose-config: setup
	$(BIN)/docker-compose -f docker-compose.yml config -q

clean:
	rm -rf .tally .pytest_cache .mypy_cache .ruff_cache

# FlowSmith Worker. `make help` lists the targets.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=
BENCH_ARGS ?=
PEERS_ARGS ?=
SCALE_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install demo test test-unit test-integration lint bench bench-scale bench-peers db-up db-down migrate-postgres migrate-mysql clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-18s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) ## create .venv and install the package with its dev tools

demo: $(STAMP) ## run the demo on SQLite: flaky APIs, a worker SIGKILLed mid-run
	$(BIN)/flowsmith demo

test: $(STAMP) ## the whole suite (starts local PostgreSQL and MariaDB servers when installed)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-unit: $(STAMP) ## in-memory and SQLite tests only
	$(BIN)/python -m pytest -m "not postgres and not mysql" $(PYTEST_ARGS)

test-integration: $(STAMP) ## the tests on real PostgreSQL and MariaDB servers
	$(BIN)/python -m pytest -m "postgres or mysql" $(PYTEST_ARGS)

lint: $(STAMP) ## ruff and mypy --strict
	$(BIN)/ruff check flowsmith_worker tests
	$(BIN)/mypy

bench: $(STAMP) ## throughput, latency, per-step costs on every backend (durable settings; ~10 min)
	$(BIN)/python -m tests.bench $(BENCH_ARGS)

bench-scale: $(STAMP) ## the same drain on 1,000,000 finished nodes and a 100,000 backlog, with EXPLAINs
	$(BIN)/python -m tests.bench.scale $(SCALE_ARGS)

# Versions checked to install on Python 3.11; the peers never become dependencies of ours.
PEERS := pgqueuer==1.6.0 procrastinate==3.10.0 dbos==3.4.0 'psycopg[binary]' asyncpg
bench-peers: $(STAMP) ## the same work on PgQueuer, Procrastinate, DBOS and FlowSmith, one durable PostgreSQL
	.peers-venv/bin/python -c 'import pgqueuer, procrastinate, dbos' 2>/dev/null || \
	  ($(PYTHON) -m venv .peers-venv && .peers-venv/bin/pip install --quiet $(PEERS))
	PEERS_PYTHON=.peers-venv/bin/python $(BIN)/python -m tests.bench.peers $(PEERS_ARGS)

db-up: $(STAMP) ## PostgreSQL 16 + MySQL 8 via compose if Docker answers, else local servers
	@if docker info >/dev/null 2>&1; then docker compose up -d postgres mysql && \
	  echo "FLOWSMITH_TEST_POSTGRES_URL=postgresql://flowsmith:flowsmith@127.0.0.1:5432/flowsmith" && \
	  echo "FLOWSMITH_TEST_MYSQL_URL=mysql://flowsmith:flowsmith@127.0.0.1:3306/flowsmith"; \
	else $(BIN)/python tests/servers.py up; fi

db-down: $(STAMP) ## stop what db-up started
	@if docker info >/dev/null 2>&1; then docker compose down; else $(BIN)/python tests/servers.py down; fi

migrate-postgres: $(STAMP) ## flowsmith migrate on $$FLOWSMITH_TEST_POSTGRES_URL
	$(BIN)/flowsmith migrate --url "$$FLOWSMITH_TEST_POSTGRES_URL"

migrate-mysql: $(STAMP) ## flowsmith migrate on $$FLOWSMITH_TEST_MYSQL_URL
	$(BIN)/flowsmith migrate --url "$$FLOWSMITH_TEST_MYSQL_URL"

clean: ## remove the venv and caches
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info

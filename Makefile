# FlowSmith Worker. `make help` lists the targets.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# What is installed in .venv: the runtime alone (install), or with the dev tools (dev).
STAMP     := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev
PYTEST_ARGS ?=
BENCH_ARGS ?=
PEERS_ARGS ?=
SCALE_ARGS ?=
CURVE_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install dev dist demo test test-pgbouncer test-unit test-integration lint bench bench-curve bench-scale bench-peers db-up db-down migrate-postgres migrate-mysql clean

# Each target's text after "## "; make's "$$" (a literal "$") is shown as "$".
help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | \
	  awk -F':.*## ' '{gsub(/[$$][$$]/, "$$", $$2); printf "  make %-18s %s\n", $$1, $$2}'

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $(STAMP)

# The dev tools come with the runtime: both stamps are then up to date.
$(DEV_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP) $(DEV_STAMP)

install: $(STAMP) ## create .venv and install the package (the runtime, no dev tools)

dev: $(DEV_STAMP) ## install the package with its dev tools (tests, lint, bench, build)

# Needs only `build` (in the dev tools too): packaging needs no linters.
dist: $(STAMP) ## build the sdist and the wheel into dist/
	$(BIN)/pip install --quiet build
	rm -rf dist
	$(BIN)/python -m build --quiet --outdir dist
	@ls -1 dist

demo: $(STAMP) ## run the demo on SQLite: flaky APIs, a worker SIGKILLed mid-run
	$(BIN)/flowsmith demo

test: $(DEV_STAMP) ## the whole suite (starts local PostgreSQL and MariaDB servers when installed), then test-pgbouncer
	$(BIN)/python -m pytest $(PYTEST_ARGS)
	$(MAKE) --no-print-directory test-pgbouncer

# Every PostgreSQL database the fixtures hand out is reached through PgBouncer in
# transaction mode (tests/servers/pgbouncer.py): the contract suite and the SIGKILL
# crash run on PostgreSQL, where no session state survives a transaction. Tests about
# session state skip there with the reason (skip_through_pgbouncer).
test-pgbouncer: $(DEV_STAMP) ## the contract suite and a SIGKILL crash on PostgreSQL through PgBouncer (transaction mode)
	FLOWSMITH_TEST_THROUGH_PGBOUNCER=1 FLOWSMITH_PG_POOLER=transaction \
		$(BIN)/python -m pytest -m postgres tests/contract tests/e2e/test_crash.py $(PYTEST_ARGS)

test-unit: $(DEV_STAMP) ## in-memory and SQLite tests only
	$(BIN)/python -m pytest -m "not postgres and not mysql" $(PYTEST_ARGS)

test-integration: $(DEV_STAMP) ## the tests on real PostgreSQL and MariaDB servers
	$(BIN)/python -m pytest -m "postgres or mysql" $(PYTEST_ARGS)

lint: $(DEV_STAMP) ## ruff, mypy --strict and the import layering (lint-imports)
	$(BIN)/ruff check flowsmith_worker tests
	$(BIN)/mypy
	$(BIN)/lint-imports

# make torture: the seed (empty: a new one, printed), seconds, backend (sqlite, postgresql, mysql).
SEED ?=
DURATION ?= 600
BACKEND ?= postgresql
.PHONY: torture
torture: $(DEV_STAMP) ## the chaos run: workers SIGKILLed, databases crashed (SEED= DURATION= BACKEND=)
	$(BIN)/python -m tests.torture.chaos --backend $(BACKEND) --duration $(DURATION) $(if $(SEED),--seed $(SEED))

bench: $(DEV_STAMP) ## throughput, latency, per-step costs on every backend, then the scaling curve (durable; ~12 min)
	$(BIN)/python -m tests.bench $(BENCH_ARGS)
	$(BIN)/python -m tests.bench.curve $(CURVE_ARGS)

bench-curve: $(DEV_STAMP) ## steps/s of 1, 2, 4, 8 workers on PostgreSQL, direct and via PgBouncer, with wait events and CPU
	$(BIN)/python -m tests.bench.curve $(CURVE_ARGS)

bench-scale: $(DEV_STAMP) ## the same drain on 1,000,000 finished nodes and a 100,000 backlog, with EXPLAINs
	$(BIN)/python -m tests.bench.scale $(SCALE_ARGS)

# Versions checked to install on Python 3.11; the peers never become dependencies of ours.
PEERS := pgqueuer==1.6.0 procrastinate==3.10.0 dbos==3.4.0 'psycopg[binary]' asyncpg
bench-peers: $(DEV_STAMP) ## the same work on PgQueuer, Procrastinate, DBOS and FlowSmith, one durable PostgreSQL
	.peers-venv/bin/python -c 'import pgqueuer, procrastinate, dbos' 2>/dev/null || \
	  ($(PYTHON) -m venv .peers-venv && .peers-venv/bin/pip install --quiet $(PEERS))
	PEERS_PYTHON=.peers-venv/bin/python $(BIN)/python -m tests.bench.peers $(PEERS_ARGS)

db-up: $(DEV_STAMP) ## PostgreSQL 16 + MySQL 8 via compose if Docker answers, else local servers
	@if docker info >/dev/null 2>&1; then docker compose up -d postgres mysql && \
	  echo "FLOWSMITH_TEST_POSTGRES_URL=postgresql://flowsmith:flowsmith@127.0.0.1:5432/flowsmith" && \
	  echo "FLOWSMITH_TEST_MYSQL_URL=mysql://flowsmith:flowsmith@127.0.0.1:3306/flowsmith"; \
	else $(BIN)/python -m tests.servers up; fi

db-down: $(DEV_STAMP) ## stop what db-up started
	@if docker info >/dev/null 2>&1; then docker compose down; else $(BIN)/python -m tests.servers down; fi

migrate-postgres: $(STAMP) ## flowsmith migrate on $$FLOWSMITH_TEST_POSTGRES_URL
	$(BIN)/flowsmith migrate --url "$$FLOWSMITH_TEST_POSTGRES_URL"

migrate-mysql: $(STAMP) ## flowsmith migrate on $$FLOWSMITH_TEST_MYSQL_URL
	$(BIN)/flowsmith migrate --url "$$FLOWSMITH_TEST_MYSQL_URL"

clean: ## remove the venv and caches
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info dist build

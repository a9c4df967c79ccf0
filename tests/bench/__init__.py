"""Benchmarks: `make bench` (python -m tests.bench) and `make bench-peers` (tests.bench.peers).

Modules by concept: workload (the flows, enqueueing, worker processes),
targets (the databases: servers with durable settings), ceilings (each
database's own single-row-commit rate), counters (round trips, statements and
commits per step), footprint (bytes written per step), latency (pickup from
enqueue to first step), report (the table and the JSON), routes (the workers
directly or through PgBouncer), observe (wait events and CPU during a drain),
curve (steps/s of 1 to 8 workers: `make bench-curve`), peers and peer_apps
(the same work on PgQueuer, Procrastinate and DBOS).

Nothing here asserts a speed: the numbers are printed, compared as ratios
between rows of one run, and tests/e2e/test_bench.py only proves the run completes
with every figure present. This file stays free of imports: the peers' venv
imports tests.bench.peer_apps, which has neither SQLAlchemy nor flowsmith.
"""

"""`make bench` runs: `python -m tests.bench --quick` completes on each backend with every figure.

Nothing here asserts a speed (speed is what the benchmark prints); these tests
prove the benchmark itself works against the installed engine, so CI notices
when a change breaks it. Each backend runs in its own subprocess, with the
benchmark's own durable server (fsync on), as `make bench` does. The bench
modules are not imported here: they register their flows in whatever process
imports them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from flowsmith_worker import Flow
from tests.servers import REQUIRE_ENV, ServerUnavailable, find_mariadb, find_postgres
from tests.servers.pgbouncer import find_pgbouncer

REPO = Path(__file__).resolve().parents[2]
QUICK_WORKERS = 2
QUICK_LATENCY_SAMPLES = 5


def _require_binaries(backend: str) -> None:
    """Skip when the server binaries are missing, unless CI demands every database."""
    finders = {"postgresql": find_postgres, "mysql": find_mariadb, "pgbouncer": find_pgbouncer}
    if backend not in finders:
        return
    try:
        finders[backend]()
    except ServerUnavailable as exc:
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{backend}: {exc.reason}; {REQUIRE_ENV}=1 requires it", pytrace=False)
        pytest.skip(exc.reason)


def _quick_bench(backend: str, tmp_path: Path) -> tuple[str, dict[str, Any]]:
    path = tmp_path / "bench.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.bench",
            "--quick",
            "--backends",
            backend,
            "--workers",
            str(QUICK_WORKERS),
            "--json",
            str(path),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    return result.stdout, json.loads(path.read_text())


def _positive(figures: dict[str, Any], *keys: str) -> None:
    for key in keys:
        value = figures[key]
        assert isinstance(value, (int, float)) and value > 0, f"{key} = {value!r}"


@pytest.mark.parametrize("bench_backend", ["sqlite", "postgresql", "mysql"])
def test_quick_bench_reports_every_figure(bench_backend: str, tmp_path: Path) -> None:
    """The quick benchmark on one backend exits 0, prints the table and writes a JSON
    file holding every figure of `make bench`: ceilings, enqueue rates (run_many's
    "n/a" only on an engine without it), steps/s of 1- and 10-step flows with every
    step of the backlog counted (PostgreSQL's 10-step drains also without PREPARE and,
    with pgbouncer installed, through PgBouncer), their ratios to the ceiling, pickup
    percentiles, round trips / statements / commits per step with the statements behind
    them, log flushes and bytes written per step (the log's only where the database
    counts it) and worker RSS."""
    _require_binaries(bench_backend)

    stdout, document = _quick_bench(bench_backend, tmp_path)

    assert "JSON:" in stdout and "steps/s" in stdout
    figures = document["backends"][bench_backend]
    _positive(figures["ceiling"], "python_commits_per_second")
    if bench_backend == "postgresql":
        _positive(figures["ceiling"], "pgbench_commits_per_second")
    _positive(figures["enqueue"], "single_flows_per_second", "single_flows_ratio")
    if hasattr(Flow, "run_many"):
        _positive(figures["enqueue"], "run_many_flows_per_second", "run_many_flows_ratio")
    else:
        assert figures["enqueue"]["run_many_flows_per_second"].startswith("n/a")
    shapes = {(run["steps_per_flow"], run["workers"]) for run in figures["throughput"]}
    assert shapes == {(1, QUICK_WORKERS), (10, QUICK_WORKERS)}
    routes = [run["route"] for run in figures["throughput"] if run["steps_per_flow"] == 10]
    assert routes == _expected_routes(bench_backend)
    for run in figures["throughput"]:
        _positive(run, "steps_per_second", "ratio", "python_ratio", "worker_peak_rss_mib")
        assert run["measured_steps"] == run["steps"]  # the backlog waited for every worker
    latency = figures["pickup_latency"]
    assert latency["samples"] == QUICK_LATENCY_SAMPLES
    assert 0 <= latency["p50_ms"] <= latency["p95_ms"] <= latency["p99_ms"]
    _positive(figures["per_step"], "round_trips", "statements", "commits")
    assert figures["per_step"]["breakdown"]
    if bench_backend != "sqlite":
        _positive(figures["per_step"], "log_flushes")
    written = figures["bytes_written"]
    _positive(written, "payload_bytes_per_step", "payload_ratio")
    if bench_backend == "sqlite":
        assert written["log_bytes_per_step"] is None
    else:
        _positive(written, "log_bytes_per_step", "log_ratio")
        assert written["log_breakdown"]  # where the log bytes went
    _positive(figures, "worker_peak_rss_mib")


def _expected_routes(backend: str) -> list[str]:
    """The 10-step drains' routes: PostgreSQL's also without PREPARE and (when pgbouncer
    is installed) through PgBouncer."""
    if backend != "postgresql":
        return ["direct"]
    try:
        find_pgbouncer()
    except ServerUnavailable:
        return ["direct", "no-prepare"]
    return ["direct", "no-prepare", "pgbouncer"]


# tests/bench/scale.py's QUICK sizes, repeated here: the bench modules are not imported.
QUICK_SCALE_FINISHED_NODES = 1_000
QUICK_SCALE_BACKLOG_NODES = 100
QUICK_SCALE_FLOWS = 3
TEMPLATE_FINISHED_NODES = 20  # two finished 10-step template runs, in every scenario
TEMPLATE_PENDING_NODES = 1  # the pending template run's first node


@pytest.mark.parametrize("bench_backend", ["sqlite", "postgresql", "mysql"])
def test_quick_scale_bench_fills_the_tables_and_explains(
    bench_backend: str, tmp_path: Path
) -> None:
    """`python -m tests.bench.scale --quick` on one backend exits 0 and reports, for the
    empty, finished, backlog and two-queue backlog scenarios: the rows the prefill made (exactly the
    finished nodes and the backlog asked for, besides the drain's and the templates'),
    a measured drain with its ratio to the empty database, and the plans of the claim
    and of the rescue as the database printed them (PostgreSQL's with ANALYZE's timings)."""
    _require_binaries(bench_backend)
    path = tmp_path / "scale.json"
    command = ["-m", "tests.bench.scale", "--quick", "--backends", bench_backend]
    result = subprocess.run(
        [sys.executable, *command, "--json", str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )

    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    assert "ratio to the empty database" in result.stdout
    scenarios = json.loads(path.read_text())["backends"][bench_backend]
    drain_nodes = QUICK_SCALE_FLOWS + TEMPLATE_PENDING_NODES
    assert scenarios["empty"]["rows_before_drain"] == {
        "COMPLETED": TEMPLATE_FINISHED_NODES,
        "PENDING": drain_nodes,
    }
    assert scenarios["finished"]["rows_before_drain"] == {
        "COMPLETED": QUICK_SCALE_FINISHED_NODES,
        "PENDING": drain_nodes,
    }
    for backlog in ("backlog", "backlog, 2 queues"):
        assert scenarios[backlog]["rows_before_drain"] == {
            "COMPLETED": TEMPLATE_FINISHED_NODES,
            "PENDING": QUICK_SCALE_BACKLOG_NODES + QUICK_SCALE_FLOWS,
        }
    assert scenarios["empty"]["ratio_to_empty"] == 1.0
    for figures in scenarios.values():
        _positive(figures, "steps_per_second", "ratio_to_empty", "measured_steps")
        roles = [plan["role"] for plan in figures["plans"]]
        assert any(role.startswith("claim") for role in roles), roles
        assert any(role.startswith("rescue") for role in roles), roles
        assert all(plan["plan"] for plan in figures["plans"])
        if bench_backend == "postgresql":
            assert all("Execution Time" in plan["plan"][-1] for plan in figures["plans"])


CURVE_WORKERS = (1, 2)
# The no-prepare route runs in the quick bench above; here the two ends of the comparison.
CURVE_ROUTES = ("direct", "pgbouncer")


def test_quick_curve_reports_rates_waits_and_cpu_per_route(tmp_path: Path) -> None:
    """`python -m tests.bench.curve --quick` (the scaling curve, `make bench-curve`) exits 0
    and reports, for every worker count and every route asked for (direct, and through
    PgBouncer in transaction mode): every step of the backlog drained, the rate with its
    ratios to pgbench's ceiling and to the route's single worker, wait events sampled from
    the workers' own backends (found by name: at least one per worker process when direct,
    the bouncer's server connections through it) and the CPU used by the server, the
    workers, PgBouncer and the rest of the machine."""
    _require_binaries("postgresql")
    _require_binaries("pgbouncer")
    path = tmp_path / "curve.json"
    command = ["-m", "tests.bench.curve", "--quick", "--json", str(path)]
    options = ["--workers", ",".join(map(str, CURVE_WORKERS)), "--routes", ",".join(CURVE_ROUTES)]
    result = subprocess.run(
        [sys.executable, *command, *options],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )

    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    assert "wait on" in result.stdout
    document = json.loads(path.read_text())
    _positive(document, "pgbench_commits_per_second")
    runs = document["runs"]
    assert [(run["route"], run["workers"]) for run in runs] == [
        (route, workers) for route in CURVE_ROUTES for workers in CURVE_WORKERS
    ]
    for run in runs:
        _positive(run, "steps_per_second", "ratio", "speedup", "vs_direct")
        assert run["measured_steps"] == run["steps"]
        if run["workers"] == CURVE_WORKERS[0]:
            assert run["speedup"] == 1.0
        if run["route"] == "direct":
            assert run["vs_direct"] == 1.0
        waits = run["waits"]
        least = 1 if run["route"] == "pgbouncer" else run["workers"]
        assert waits["samples"] >= 1 and waits["mean_backends"] >= least, waits
        assert 0 < sum(top["share"] for top in waits["top"]) <= 1 + 1e-9, waits
        assert 0 <= waits["mean_in_transaction"] <= waits["mean_backends"], waits
        cpu = run["cpu"]
        for party in ("server", "workers", "pgbouncer", "bench", "other", "machine_busy", "free"):
            assert cpu[f"{party}_cores"] >= 0, cpu

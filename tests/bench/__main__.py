"""Throughput benchmark: `make bench`, or `python -m tests.bench --help`.

For each backend (SQLite, and PostgreSQL and MariaDB started from local
binaries with durable settings: fsync on): the database's single-row-commit
ceiling, enqueue rates, steps/s of 1-step and 10-step no-op flows drained by
1, 2 and 4 `flowsmith worker` processes (concurrency 8), pickup latency,
round trips / statements / commits per step, bytes written per step, worker
peak RSS. On PostgreSQL the 10-step drains run once more for each other
route (--routes): direct without PREPARE, and through a PgBouncer in
transaction mode (no PREPARE, --no-listen) that the benchmark starts. The
scaling curve (1 to 8 workers, wait events, CPU) is `make bench-curve`
(tests/bench/curve.py). One table on stdout, progress on stderr, everything in a JSON file.

It measures whatever engine is installed. The machine may be shared and
noisy: compare ratios within one run (each rate is also shown as a ratio of
its backend's ceiling), not absolutes across runs.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flowsmith_worker.log import setup_logging
from flowsmith_worker.version import __version__
from tests.bench import ceilings, footprint, latency, report, throughput
from tests.bench.routes import DIRECT, ROUTES, Route, parse_routes
from tests.bench.targets import BACKENDS, Target, open_targets
from tests.bench.workload import CONCURRENCY, POLL_INTERVAL, REPO


@dataclass(frozen=True)
class Sizes:
    """How much work each phase does; --quick shrinks all of it."""

    flows: int  # 10-step runs per drain (1-step drains run 10x as many: same step count)
    single_enqueues: int
    run_many_enqueues: int
    latency_samples: int
    footprint_runs: int
    ceiling_seconds: float
    sqlite_counted_flows: int


DEFAULT = Sizes(300, 1000, 5000, 200, 10, 10.0, 100)
QUICK = Sizes(3, 10, 20, 5, 1, 1.0, 3)
COUNTED_WORKERS = 2  # the drain whose server counters give the per-step figures


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--backends", default=",".join(BACKENDS), help="%(default)s")
    parser.add_argument("--flows", type=int, help="10-step runs per drain (default 300)")
    parser.add_argument("--workers", default="1,2,4", help="worker processes per drain")
    parser.add_argument(
        "--routes",
        default=",".join(ROUTES),
        help="PostgreSQL's routes for the 10-step drains (%(default)s; direct always runs)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes: proves it runs (CI)")
    parser.add_argument("--json", type=Path, default=Path("bench-results.json"), help="%(default)s")
    args = parser.parse_args()
    unknown = set(args.backends.split(",")) - set(BACKENDS)
    if unknown:
        parser.error(f"unknown backend(s) {sorted(unknown)}: choose from {','.join(BACKENDS)}")
    try:
        args.routes = [r for r in parse_routes(args.routes) if r != DIRECT]
    except ValueError as exc:
        parser.error(str(exc))
    return args


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def main() -> None:
    args = _arguments()
    sizes = QUICK if args.quick else DEFAULT
    if args.flows:
        sizes = Sizes(**{**sizes.__dict__, "flows": args.flows})
    workers = [int(w) for w in args.workers.split(",")]
    setup_logging(level="WARNING")  # the benchmark's own enqueues log nothing per run
    results: dict[str, Any] = {}
    started = time.time()
    with (
        tempfile.TemporaryDirectory(prefix="flowsmith-bench-") as tmp,
        open_targets(
            args.backends.split(","), Path(tmp), bouncer=any(r.bounced for r in args.routes)
        ) as targets,
    ):
        for target in targets:
            logs = Path(tmp) / f"logs-{target.backend}"
            logs.mkdir()
            results[target.backend] = bench_backend(target, logs, sizes, workers, args.routes)
            report.add_ratios(results[target.backend])
    document = {"meta": _meta(sizes, workers, time.time() - started), "backends": results}
    report.write_json(document, args.json)
    print(report.table(results))
    print(report.NOTES)
    print(f"JSON: {args.json.resolve()}")


def bench_backend(
    target: Target, logs: Path, sizes: Sizes, workers: list[int], routes: list[Route]
) -> dict[str, Any]:
    """Every figure for one backend, in an order that keeps each phase's database quiet."""
    name = target.backend
    progress(f"{name}: commit ceilings")
    ceiling: dict[str, Any] = {
        "python_commits_per_second": ceilings.python_commits_per_second(
            target, sizes.ceiling_seconds
        ),
        "pgbench_commits_per_second": (
            ceilings.pgbench_commits_per_second(target, sizes.ceiling_seconds)
            if name == "postgresql"
            else None
        ),
    }
    progress(f"{name}: enqueue rates")
    enqueue = throughput.enqueue_rates(target, sizes.single_enqueues, sizes.run_many_enqueues)
    runs = []
    counted = COUNTED_WORKERS if COUNTED_WORKERS in workers else workers[0]
    for steps in (1, 10):
        for count in workers:
            flows = sizes.flows * 10 // steps
            progress(f"{name}: {flows} {steps}-step flows, {count} worker(s)")
            runs.append(
                throughput.drain(
                    target,
                    logs,
                    steps_per_flow=steps,
                    workers=count,
                    flows=flows,
                    counted=steps == 10 and count == counted and name != "sqlite",
                )
            )
            if steps == 10:
                runs += _other_routes(target, logs, routes, count, flows)
    progress(f"{name}: pickup latency")
    pickup = latency.measure(target, logs, sizes.latency_samples)
    progress(f"{name}: bytes written")
    bytes_written = footprint.measure(target, logs, sizes.footprint_runs)
    if name == "sqlite":
        progress(f"{name}: statements per step (in-process worker)")
        per_step = throughput.sqlite_counts_in_process(target, sizes.sqlite_counted_flows)
    else:
        per_step = next(run.pop("per_step") for run in runs if "per_step" in run)
    return {
        "ceiling": ceiling,
        "enqueue": enqueue,
        "throughput": runs,
        "pickup_latency": pickup,
        "per_step": per_step,
        "bytes_written": bytes_written,
        "worker_peak_rss_mib": max(run["worker_peak_rss_mib"] for run in runs),
    }


def _other_routes(
    target: Target, logs: Path, routes: list[Route], workers: int, flows: int
) -> list[dict[str, Any]]:
    """The same 10-step drain by the workers connected by each of ``routes`` (PostgreSQL's;
    the PgBouncer route only when pgbouncer is installed)."""
    if target.backend != "postgresql":
        return []
    runs = []
    for route in routes:
        if route.bounced and target.bouncer is None:
            continue
        progress(f"{target.backend}: {flows} 10-step flows, {workers} worker(s), {route.label}")
        runs.append(
            throughput.drain(
                target,
                logs,
                steps_per_flow=10,
                workers=workers,
                flows=flows,
                counted=False,
                route=route,
            )
        )
    return runs


def _meta(sizes: Sizes, workers: list[int], seconds: float) -> dict[str, Any]:
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    return {
        "flowsmith_version": __version__,
        "git_commit": commit or None,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_average_at_end": list(os.getloadavg()),
        "sizes": sizes.__dict__,
        "workers": workers,
        "concurrency": CONCURRENCY,
        "poll_interval_seconds": POLL_INTERVAL,
        "durable": True,
        "seconds": seconds,
    }


if __name__ == "__main__":
    main()

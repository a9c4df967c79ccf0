"""The scaling curve: `make bench-curve`, or `python -m tests.bench.curve --help`.

Steps/s of 10-step no-op flows drained by 1, 2, 4 and 8 `flowsmith worker`
processes (concurrency 8 each) against one PostgreSQL with durable settings,
for each route (routes.py: direct; direct without PREPARE; through PgBouncer
in transaction mode). During each drain the workers' backends' wait events
are sampled every 100 ms and the CPU of the server, the workers, PgBouncer
and everybody else is metered (observe.py), so the curve says where adding
workers stops paying and what bounds it: the database's CPU (backends
running: "CPU"), commits (IO:WALSync, LWLock:WALWrite), locks (Lock:*), or
the workers (backends idle, waiting for their next statement).

The machine may be shared and noisy: "other" is the CPU its other users
took meanwhile. The routes of one worker count are drained one after the
other, so they see the same weather; --rounds N repeats everything N times
and keeps each drain's median. Compare ratios within one run (to pgbench's
ceiling, to the route's smallest worker count, to the direct route's), not
absolutes across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from flowsmith_worker.log import setup_logging
from flowsmith_worker.version import __version__
from tests.bench import ceilings, throughput
from tests.bench.__main__ import progress
from tests.bench.routes import DIRECT, ROUTES, Route, parse_routes
from tests.bench.targets import Target, open_targets
from tests.bench.workload import CONCURRENCY, REPO

DEFAULT_FLOWS = 300
QUICK_FLOWS = 3
CEILING_SECONDS = {False: 10.0, True: 1.0}  # by --quick
TOP_EVENTS_SHOWN = 3


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.curve",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--workers", default="1,2,4,8", help="worker processes (%(default)s)")
    parser.add_argument("--routes", default=",".join(ROUTES), help="%(default)s")
    parser.add_argument("--flows", type=int, help=f"10-step runs per drain ({DEFAULT_FLOWS})")
    parser.add_argument(
        "--rounds", type=int, default=1, help="measure each drain N times (median shown)"
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes: proves it runs (CI)")
    parser.add_argument(
        "--json", type=Path, default=Path("bench-curve-results.json"), help="%(default)s"
    )
    args = parser.parse_args()
    try:
        args.routes = parse_routes(args.routes)
        args.workers = [int(count) for count in args.workers.split(",")]
    except ValueError as exc:
        parser.error(str(exc))
    if min(args.workers) < 1 or args.rounds < 1 or (args.flows is not None and args.flows < 1):
        parser.error("--workers, --rounds and --flows take whole numbers of at least 1")
    return args


def main() -> None:
    args = _arguments()
    flows = args.flows or (QUICK_FLOWS if args.quick else DEFAULT_FLOWS)
    setup_logging(level="WARNING")
    load_before = os.getloadavg()
    with (
        tempfile.TemporaryDirectory(prefix="flowsmith-bench-curve-") as tmp,
        open_targets(
            ["postgresql"], Path(tmp), bouncer=any(r.bounced for r in args.routes)
        ) as targets,
    ):
        if not targets:
            raise SystemExit("the curve needs PostgreSQL: apt-get install postgresql")
        target = targets[0]
        logs = Path(tmp) / "logs"
        logs.mkdir()
        progress("pgbench ceiling")
        ceiling = ceilings.pgbench_commits_per_second(target, CEILING_SECONDS[args.quick])
        routes = _available(args.routes, target)
        measured = [
            _drain(target, logs, route, count, flows)
            for _ in range(args.rounds)
            for count in args.workers
            for route in routes
        ]
    runs = medians(measured, routes)
    add_ratios(runs, ceiling)
    document = {
        "meta": _meta(flows, load_before),
        "pgbench_commits_per_second": ceiling,
        "runs": runs,
    }
    args.json.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
    print(table(runs, ceiling))
    print(f"JSON: {args.json.resolve()}")


def _available(routes: list[Route], target: Target) -> list[Route]:
    """The routes to measure: the PgBouncer one only with a bouncer (said on stderr)."""
    return [route for route in routes if not route.bounced or target.bouncer is not None]


def _drain(target: Target, logs: Path, route: Route, workers: int, flows: int) -> dict[str, Any]:
    progress(f"{flows} 10-step flows, {workers} worker(s), {route.label}")
    return throughput.drain(
        target,
        logs,
        steps_per_flow=10,
        workers=workers,
        flows=flows,
        counted=False,
        route=route,
        observe=True,
    )


def medians(measured: list[dict[str, Any]], routes: list[Route]) -> list[dict[str, Any]]:
    """Per route and worker count (in that order), the drain of median steps/s (the
    lower of the middle two for an even count), with every round's rate in
    ``rounds_steps_per_second``."""
    runs = []
    for route in routes:
        for workers in sorted({run["workers"] for run in measured}):
            rounds = [r for r in measured if (r["route"], r["workers"]) == (route.key, workers)]
            rates = [r["steps_per_second"] for r in rounds]
            median = rates.index(statistics.median_low(rates))
            runs.append({**rounds[median], "rounds_steps_per_second": rates})
    return runs


def add_ratios(runs: list[dict[str, Any]], ceiling: float) -> None:
    """Each rate / pgbench's (``ratio``), / its route's with the fewest workers
    (``speedup``) and / the direct route's with as many workers (``vs_direct``)."""
    fewest: dict[str, float] = {}
    direct = {r["workers"]: r["steps_per_second"] for r in runs if r["route"] == DIRECT.key}
    for run in sorted(runs, key=lambda r: r["workers"]):
        rate = run["steps_per_second"]
        fewest.setdefault(run["route"], rate)
        run["ratio"] = rate / ceiling
        run["speedup"] = _ratio(rate, fewest[run["route"]])
        run["vs_direct"] = _ratio(rate, direct.get(run["workers"]))


def _ratio(rate: float, base: float | None) -> float | None:
    return rate / base if base else None


def _meta(flows: int, load_before: tuple[float, float, float]) -> dict[str, Any]:
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    return {
        "flowsmith_version": __version__,
        "git_commit": commit or None,
        "cpus": os.cpu_count(),
        "load_average_at_start": list(load_before),
        "load_average_at_end": list(os.getloadavg()),
        "flows": flows,
        "steps_per_flow": 10,
        "concurrency": CONCURRENCY,
        "durable": True,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


# --------------------------------------------------------------------------- report

_HEADER = (
    f"{'route':<26}{'workers':>8}{'steps/s':>9}{'(pgb)':>7}{'speedup':>9}{'/direct':>8}{'server':>8}"
    f"{'workers':>8}{'pgbnc':>7}{'other':>7}{'free':>6}{'in txn':>8}"
    "  what the workers' backends in a transaction wait on"
)


def table(runs: list[dict[str, Any]], ceiling: float) -> str:
    """One line per drain: rate, ratios, cores used by each party, top wait events."""
    lines = [f"pgbench ceiling (2 clients, one-row INSERT commits/s): {ceiling:,.0f}", _HEADER]
    lines += [_line(run) for run in runs]
    lines.append(NOTES)
    return "\n".join(lines)


def _line(run: dict[str, Any]) -> str:
    cpu = run["cpu"]
    bouncer = cpu.get("pgbouncer_cores")
    waits = run["waits"]
    events = ", ".join(
        f"{top['event']} {top['share']:.0%}"
        for top in waits["in_transaction_top"][:TOP_EVENTS_SHOWN]
    )
    return (
        f"{ROUTES[run['route']].label:<26}{run['workers']:>8}{run['steps_per_second']:>9,.0f}"
        f"{run['ratio']:>7.2f}{_fixed(run['speedup']):>9}{_fixed(run['vs_direct']):>8}"
        f"{cpu['server_cores']:>8.2f}{cpu['workers_cores']:>8.2f}{_fixed(bouncer):>7}"
        f"{cpu['other_cores']:>7.2f}{cpu['free_cores']:>6.2f}"
        f"{waits['mean_in_transaction']:>8.1f}  {events}"
    )


def _fixed(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


NOTES = """\
(pgb) = steps/s / pgbench's commits/s; speedup = steps/s / the same route's with the fewest
workers; /direct = steps/s / the direct route's with as many workers. server / workers /
pgbnc / other: CPU cores used during the drain (from /proc) by PostgreSQL, the worker
processes, PgBouncer, and the rest of the machine (other users; the benchmark's own process
is in the JSON as bench_cores); free = cores left idle. in txn = the workers' backends in a
transaction, on average, in the 100 ms samples of pg_stat_activity; then their shares:
"CPU" = running, IO:WALSync / LWLock:WALWrite = commits, Lock:* = locks, "waiting for the
worker" = between two statements of a transaction. The JSON has every backend's shares too
(idle ones included)."""


if __name__ == "__main__":
    main()

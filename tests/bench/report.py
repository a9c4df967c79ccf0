"""The benchmark's results: ratios to each backend's ceiling, one table on stdout, a JSON file.

Every throughput figure is shown with its ratio to the backend's reference
ceiling: pgbench's for PostgreSQL (no Python in the way), the Python loop's
elsewhere; the JSON has the ratio to both where both were measured.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.bench.routes import DIRECT, ROUTES

Results = dict[str, Any]


def reference_ceiling(backend: Results) -> float:
    ceiling = backend["ceiling"]
    return float(ceiling.get("pgbench_commits_per_second") or ceiling["python_commits_per_second"])


def add_ratios(backend: Results) -> None:
    """Each rate / the ceiling (``ratio``), and / the Python loop's (``python_ratio``)."""
    reference = reference_ceiling(backend)
    python = float(backend["ceiling"]["python_commits_per_second"])
    enqueue = backend["enqueue"]
    for key in ("single_flows_per_second", "run_many_flows_per_second"):
        rate = enqueue[key]
        if isinstance(rate, float):
            enqueue[key.replace("per_second", "ratio")] = rate / reference
            enqueue[key.replace("per_second", "python_ratio")] = rate / python
    for run in backend["throughput"]:
        run["ratio"] = run["steps_per_second"] / reference
        run["python_ratio"] = run["steps_per_second"] / python


def write_json(results: Results, path: Path) -> None:
    path.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------- table


def _rate(value: Any, ratio: Any = None) -> str:
    if not isinstance(value, (int, float)):
        return "n/a"
    return f"{value:,.0f}" + (f" ({ratio:.2f})" if isinstance(ratio, float) else "")


def _number(value: Any, digits: int = 1) -> str:
    return f"{value:,.{digits}f}" if isinstance(value, (int, float)) else "n/a"


def _rows(results: Results) -> list[tuple[str, Callable[[Results], str]]]:
    rows: list[tuple[str, Callable[[Results], str]]] = [
        ("ceiling: pgbench, 2 clients, commits/s", _ceiling("pgbench_commits_per_second")),
        ("ceiling: Python, 2 processes, commits/s", _ceiling("python_commits_per_second")),
        ("enqueue: flow.run, 1 thread, flows/s", _enqueue("single")),
        ("enqueue: Flow.run_many x1000, flows/s", _enqueue("run_many")),
    ]
    routes = list(ROUTES)
    shapes = sorted(
        {_shape(run) for b in results.values() for run in b["throughput"]},
        key=lambda shape: (shape[0], shape[1], routes.index(shape[2])),
    )
    for steps, workers, route in shapes:
        via = "" if route == DIRECT.key else f", {ROUTES[route].label}"
        label = f"{steps}-step flows, {workers} worker(s) x 8{via}, steps/s"
        rows.append((label, _throughput((steps, workers, route))))
    rows += [
        ("pickup latency p50 / p95 / p99, ms", _latency),
        ("round trips per step", _per_step("round_trips")),
        ("statements per step", _per_step("statements")),
        ("commits per step", _per_step("commits")),
        ("log flushes (WAL/redo fsyncs) per step", _per_step("log_flushes")),
        ("50x1KB flow: payload bytes/step (x output)", _bytes("payload")),
        ("50x1KB flow: log bytes/step (x output)", _bytes("log")),
        ("worker peak RSS (VmHWM), MiB", lambda b: _number(b["worker_peak_rss_mib"])),
    ]
    return rows


def _ceiling(key: str) -> Callable[[Results], str]:
    return lambda b: _rate(b["ceiling"].get(key))


def _enqueue(kind: str) -> Callable[[Results], str]:
    def cell(b: Results) -> str:
        rate = b["enqueue"][f"{kind}_flows_per_second"]
        if isinstance(rate, str):
            return "n/a"
        return _rate(rate, b["enqueue"].get(f"{kind}_flows_ratio"))

    return cell


def _shape(run: Results) -> tuple[int, int, str]:
    """A drain's flow size, worker count and route (older JSON: direct)."""
    return run["steps_per_flow"], run["workers"], run.get("route", DIRECT.key)


def _throughput(shape: tuple[int, int, str]) -> Callable[[Results], str]:
    def cell(b: Results) -> str:
        for run in b["throughput"]:
            if _shape(run) == shape:
                return _rate(run["steps_per_second"], run["ratio"])
        return "-"

    return cell


def _latency(b: Results) -> str:
    latency = b["pickup_latency"]
    return " / ".join(_number(latency[k]) for k in ("p50_ms", "p95_ms", "p99_ms"))


def _per_step(key: str) -> Callable[[Results], str]:
    return lambda b: _number(b["per_step"][key])


def _bytes(kind: str) -> Callable[[Results], str]:
    def cell(b: Results) -> str:
        figures = b["bytes_written"]
        value, ratio = figures[f"{kind}_bytes_per_step"], figures[f"{kind}_ratio"]
        if value is None:
            return "n/a"
        return f"{value:,.0f} ({ratio:.2f}x)"

    return cell


def table(results: Results) -> str:
    """Figures down, backends across; throughput cells show (ratio to the ceiling)."""
    backends = list(results)
    rows = _rows(results)
    width = max(len(label) for label, _ in rows) + 2
    lines = [f"{'':<{width}}" + "".join(f"{name:>22}" for name in backends)]
    for label, cell in rows:
        cells = "".join(f"{cell(results[name]):>22}" for name in backends)
        lines.append(f"{label:<{width}}{cells}")
    return "\n".join(lines)


NOTES = """\
(x.xx) = ratio to the backend's ceiling measured in this run: pgbench for PostgreSQL,
the Python loop elsewhere. Steps/s: from the backlog's release (all workers ready) to
the last step's end.
Per-step counts: PostgreSQL pg_stat_statements / pg_stat_database (commits include
read-only transactions) / pg_stat_wal, MariaDB SHOW GLOBAL STATUS (both: the 10-step,
2-worker drain, direct); SQLite: an in-process Worker, sqlite3 trace callback. The JSON's
per_step.breakdown lists the most frequent statements. Log bytes and flushes: PostgreSQL
WAL, MariaDB InnoDB redo log; SQLite keeps no such count.
PostgreSQL routes: "no PREPARE" = FLOWSMITH_PG_PREPARE=off, direct; "PgBouncer txn" =
through PgBouncer in transaction mode, FLOWSMITH_PG_PREPARE=off and --no-listen."""

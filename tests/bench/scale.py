"""Throughput on big tables: `make bench-scale`, or `python -m tests.bench.scale --help`.

The same drain (10-step no-op flows, 2 `flowsmith worker` processes x 8) is
measured in four scenarios per backend, on durable servers, and each rate is
shown as a ratio to the first:

* empty: only the drain's runs;
* finished: after 1,000,000 COMPLETED nodes (100,000 finished 10-step runs);
* backlog: with 100,000 more PENDING runs (first nodes PENDING, due now) queued
  on the same queue behind the drain's runs;
* backlog, 2 queues: the same, drained by workers that also serve a second,
  empty queue, as a worker of several queues claims with another statement
  (``queue = ANY(...)`` / ``IN (a, b)``). Its ratio is to the empty database's
  one-queue workers: on an empty database the two shapes differ by a sort of
  the drain's own 1,000 runs at most.

The fair measurement of a backlog: the drain's runs are enqueued first, the
backlog right after, all due, one queue, one priority; so every claim picks
from the front of a queue 100,000 deep, as a worker that has fallen behind
does, and the steps measured are the same drain's in every scenario. The
rate is that of the first 90 % of the drain's steps, from the moment every
worker is ready: the last runs of a drain have fewer runs beside them in the
empty case, but the backlog's runs in the other, and the last 10 % would
compare idle slots with busy ones.

The big tables are made with set-based SQL in seconds (prefill.py), then
analysed; the claim's and the rescue's statements, caught as a real worker
sent them, are explained on them (explain.py), the two-queue worker's too.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from flowsmith_worker.log import setup_logging
from flowsmith_worker.storage import create_storage
from flowsmith_worker.storage.base import DEFAULT_QUEUE
from flowsmith_worker.storage.sql import SqlStorage, schema
from flowsmith_worker.worker import Worker
from tests.bench import explain, prefill
from tests.bench.targets import BACKENDS, Target, open_targets
from tests.bench.workload import (
    CONCURRENCY,
    MONITOR_INTERVAL,
    MONITOR_MARK,
    POLL_INTERVAL,
    TEN_STEPS,
    WorkerPool,
    enqueue_quickly,
    running_workers,
)

SCENARIOS = ("empty", "finished", "backlog", "backlog, 2 queues")
# The queues each scenario's workers serve.
ONE_QUEUE = (DEFAULT_QUEUE,)
TWO_QUEUES = (DEFAULT_QUEUE, "scale-other")
FILLED = ("finished", "backlog")  # the scenarios whose tables, prefill and plans are printed
WORKERS = 2
MEASURED_SHARE = 0.9  # of the drain's steps: the rate before its last runs (see above)
NODES_PER_RUN = 10  # TEN_STEPS: every finished copy holds 10 COMPLETED nodes
TEMPLATE_TIMEOUT = 120.0
DRAIN_TIMEOUT = 900.0


@dataclass(frozen=True)
class ScaleSizes:
    """How big the tables are and how long the drain is; --quick shrinks all of it."""

    finished_nodes: int
    backlog_nodes: int
    flows: int  # 10-step runs in each drain
    rounds: int = 1  # each scenario measured this many times; the median is shown


DEFAULT = ScaleSizes(1_000_000, 100_000, 1000)
QUICK = ScaleSizes(1_000, 100, 3)


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.scale",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--backends", default=",".join(BACKENDS), help="%(default)s")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: proves it runs (CI)")
    parser.add_argument("--flows", type=int, help=f"10-step runs per drain ({DEFAULT.flows})")
    parser.add_argument(
        "--rounds", type=int, default=1, help="measure each scenario N times (median shown)"
    )
    parser.add_argument(
        "--json", type=Path, default=Path("bench-scale-results.json"), help="%(default)s"
    )
    args = parser.parse_args()
    unknown = set(args.backends.split(",")) - set(BACKENDS)
    if unknown:
        parser.error(f"unknown backend(s) {sorted(unknown)}: choose from {','.join(BACKENDS)}")
    if args.rounds < 1 or (args.flows is not None and args.flows < 1):
        parser.error("--rounds and --flows take a whole number of at least 1")
    return args


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def main() -> None:
    args = _arguments()
    sizes = QUICK if args.quick else DEFAULT
    sizes = ScaleSizes(
        sizes.finished_nodes, sizes.backlog_nodes, args.flows or sizes.flows, args.rounds
    )
    setup_logging(level="WARNING")
    results: dict[str, Any] = {}
    with (
        tempfile.TemporaryDirectory(prefix="flowsmith-bench-scale-") as tmp,
        open_targets(args.backends.split(","), Path(tmp)) as targets,
    ):
        for target in targets:
            logs = Path(tmp) / f"logs-{target.backend}"
            logs.mkdir()
            results[target.backend] = bench_backend(target, logs, sizes)
            # Written after each backend: a later one failing keeps the earlier figures.
            document = {
                "meta": {"sizes": asdict(sizes), "workers": WORKERS},
                "backends": results,
            }
            args.json.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
    print(table(results))
    print(plans_text(results))
    print(f"JSON: {args.json.resolve()}")


def bench_backend(target: Target, logs: Path, sizes: ScaleSizes) -> dict[str, Any]:
    """Every scenario on one backend, with its rate as a ratio to the empty database's."""
    rounds: dict[str, list[dict[str, Any]]] = {scenario: [] for scenario in SCENARIOS}
    for number in range(sizes.rounds):
        # Every other round backwards: a load that drifts during the run then
        # weighs on every scenario alike.
        order = SCENARIOS if number % 2 == 0 else SCENARIOS[::-1]
        for scenario in order:
            progress(f"{target.backend}: {scenario} (round {number + 1} of {sizes.rounds})")
            rounds[scenario].append(run_scenario(target, logs, sizes, scenario))
    scenarios = {scenario: _median_round(runs) for scenario, runs in rounds.items()}
    empty = scenarios["empty"]["steps_per_second"]
    for figures in scenarios.values():
        figures["ratio_to_empty"] = figures["steps_per_second"] / empty if empty else None
    return scenarios


def _median_round(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The first round's figures, with the median rate of all rounds (and each)."""
    rates = sorted(run["steps_per_second"] for run in runs)
    return {
        **runs[0],
        "steps_per_second": statistics.median(rates),
        "rounds_steps_per_second": [run["steps_per_second"] for run in runs],
    }


def run_scenario(target: Target, logs: Path, sizes: ScaleSizes, scenario: str) -> dict[str, Any]:
    """Fill the tables for ``scenario``, explain the claim and rescue on them, drain."""
    wipe(target)
    storage = create_storage(target.url)
    assert isinstance(storage, SqlStorage), target.url
    try:
        templates = Templates.make(storage)
        enqueue_quickly(storage, TEN_STEPS, sizes.flows)
        prefill_started = time.perf_counter()
        with storage.engine.begin() as conn:
            _fill(conn, templates, sizes, scenario)
    finally:
        storage.close()
    with target.engine.connect() as conn:
        prefill.analyze(conn)
        rows = _rows_by_status(conn)
    prefill_seconds = time.perf_counter() - prefill_started
    plans = [explain.explain(target.url, sent) for sent in templates.caught]
    measured = int(sizes.flows * NODES_PER_RUN * MEASURED_SHARE)
    queues = TWO_QUEUES if scenario.endswith("2 queues") else ONE_QUEUE
    steps, seconds = drain(target, logs, sizes.flows, measured, queues)
    return {
        "rows_before_drain": rows,
        "prefill_seconds": prefill_seconds,
        "measured_steps": steps,
        "seconds": seconds,
        "steps_per_second": steps / seconds if seconds > 0 else 0.0,
        "plans": [plan.as_json() for plan in plans],
        "plan_warnings": [warning for plan in plans for warning in plan.warnings],
    }


def wipe(target: Target) -> None:
    """Empty the run tables; on MariaDB by TRUNCATE, as DELETE of a million rows takes minutes."""
    if target.backend != "mysql":
        target.wipe()
        return
    with target.engine.connect() as conn:
        conn.exec_driver_sql("SET FOREIGN_KEY_CHECKS = 0")  # this session's TRUNCATEs only
        for table in (schema.nodes, schema.flows, schema.workers):
            conn.exec_driver_sql(f"TRUNCATE TABLE {table.name}")
        conn.exec_driver_sql("SET FOREIGN_KEY_CHECKS = 1")


@dataclass(frozen=True)
class Templates:
    """The real runs the big tables copy, and the statements caught while making them.

    ``finished`` ran on a worker of one queue, ``finished_elsewhere`` on a
    worker of two (each caught claiming it); ``pending`` was only enqueued.
    """

    finished: int
    finished_elsewhere: int
    pending: int
    caught: list[explain.Sent]

    @classmethod
    def make(cls, storage: SqlStorage) -> Templates:
        TEN_STEPS.storage = storage
        one_queue = _run_caught(storage, "scale-template-finished", ONE_QUEUE)
        two_queues = _run_caught(storage, "scale-template-elsewhere", TWO_QUEUES)
        TEN_STEPS.run({"template": True}, tracking_id="scale-template-pending")
        with storage.engine.connect() as conn:
            ids = dict(conn.execute(sa.select(schema.flows.c.tracking_id, schema.flows.c.id)).all())
        several = [
            explain.Sent(f"{sent.role}, worker of two queues", sent.sql, sent.parameters)
            for sent in two_queues.claim.values()
            if sent.role.startswith("claim: pick") or "several" in sent.role
        ]
        if one_queue.rescue is None:
            raise SystemExit("the rescue's read was not seen: update explain._RESCUE_MARK")
        return cls(
            finished=ids["scale-template-finished"],
            finished_elsewhere=ids["scale-template-elsewhere"],
            pending=ids["scale-template-pending"],
            caught=[*one_queue.claim.values(), *several, one_queue.rescue],
        )


def _run_caught(storage: SqlStorage, tracking_id: str, queues: tuple[str, ...]) -> explain.Caught:
    """Run one 10-step run on an in-process worker of ``queues``, catching its statements."""
    TEN_STEPS.run({"template": True}, tracking_id=tracking_id)
    caught = explain.Caught()
    with explain.catching(storage.engine, storage.dialect, caught):
        worker = Worker(
            storage, concurrency=CONCURRENCY, poll_interval=POLL_INTERVAL, queues=queues
        )
        worker.run_until_idle(timeout=TEMPLATE_TIMEOUT)
        storage.rescue_expired()
    if not caught.claim:
        raise SystemExit("no claim statement was seen: update explain.claim_roles")
    return caught


def _fill(conn: sa.Connection, templates: Templates, sizes: ScaleSizes, scenario: str) -> None:
    """The scenario's rows, in one transaction: history, or a backlog behind the drain."""
    if scenario == "finished":
        made = 2  # the two finished templates
        runs = sizes.finished_nodes // NODES_PER_RUN - made
        prefill.copy_run(conn, templates.finished, runs, "scale-history-", due_now=False)
    elif scenario.startswith("backlog"):
        made = 1  # the pending template
        runs = sizes.backlog_nodes - made
        prefill.copy_run(conn, templates.pending, runs, "scale-backlog-", due_now=True)


def _rows_by_status(conn: sa.Connection) -> dict[str, int]:
    nodes = schema.nodes
    query = sa.select(nodes.c.status, sa.func.count()).group_by(nodes.c.status)
    return {status: int(count) for status, count in conn.execute(query)}


# --------------------------------------------------------------------------- the drain


def drain(
    target: Target, logs: Path, flows: int, measured: int, queues: tuple[str, ...]
) -> tuple[int, float]:
    """Steps and seconds of the first ``measured`` steps after every worker is ready.

    The workers start while the queue is capped at 0 running steps (a claim
    takes nothing), and the cap is lifted once all are ready: one row
    written, where moving every due node's run_after would rewrite 100,000.
    """
    _cap_queue(target.engine, 0)
    target.checkpoint()
    with running_workers(target.url, WORKERS, logs, queues) as pool:
        released_at = time.time()
        _cap_queue(target.engine, None)
        _wait_runs_completed(target.engine, pool, flows, released_at)
    with target.engine.connect() as conn:
        last = conn.execute(
            sa.text(
                "SELECT finished_at FROM fs_nodes"
                " WHERE status = 'COMPLETED' AND finished_at >= :released"
                f" ORDER BY finished_at LIMIT 1 OFFSET :skip {MONITOR_MARK}"
            ),
            {"released": released_at, "skip": measured - 1},
        ).scalar()
    if last is None:
        raise SystemExit(f"fewer than {measured} steps completed: read the worker logs")
    return measured, float(last) - released_at


def _cap_queue(engine: sa.Engine, cap: int | None) -> None:
    queues = schema.queues
    with engine.connect() as conn:
        conn.execute(sa.delete(queues).where(queues.c.name == DEFAULT_QUEUE))
        conn.execute(sa.insert(queues).values(name=DEFAULT_QUEUE, max_running=cap))


def _wait_runs_completed(
    engine: sa.Engine, pool: WorkerPool, flows: int, released_at: float
) -> None:
    """Until ``flows`` runs completed since the release (fs_flows_status_updated: a
    range of the index, however many runs finished before)."""
    done = sa.text(
        "SELECT count(*) FROM fs_flows WHERE status = 'COMPLETED' AND updated_at >= :released"
        f" {MONITOR_MARK}"
    )
    failed = sa.text(
        "SELECT count(*) FROM fs_flows WHERE status IN ('FAILED', 'CANCELLED')"
        f" AND updated_at >= :released {MONITOR_MARK}"
    )
    deadline = time.monotonic() + DRAIN_TIMEOUT
    with engine.connect() as conn:
        while conn.execute(done, {"released": released_at}).scalar_one() < flows:
            if conn.execute(failed, {"released": released_at}).scalar_one():
                raise SystemExit("a benchmark run failed: read the worker logs")
            pool.check_alive()
            if time.monotonic() > deadline:
                raise SystemExit(f"the drain did not finish in {DRAIN_TIMEOUT:.0f} s")
            time.sleep(MONITOR_INTERVAL)


# --------------------------------------------------------------------------- report


def table(results: dict[str, Any]) -> str:
    """Scenarios down, backends across: steps/s (ratio to the empty database)."""
    backends = list(results)
    lines = [f"{'':<44}" + "".join(f"{name:>22}" for name in backends)]
    for scenario in SCENARIOS:
        cells = []
        for name in backends:
            figures = results[name][scenario]
            cells.append(f"{figures['steps_per_second']:,.0f} ({figures['ratio_to_empty']:.2f})")
        label = f"{scenario}: {WORKERS} workers x {CONCURRENCY}, steps/s"
        lines.append(f"{label:<44}" + "".join(f"{cell:>22}" for cell in cells))
    for scenario in FILLED:
        cells = [f"{results[name][scenario]['prefill_seconds']:,.1f}" for name in backends]
        label = f"{scenario}: prefill + analyse, s"
        lines.append(f"{label:<44}" + "".join(f"{cell:>22}" for cell in cells))
    return "\n".join(lines) + "\n(x.xx) = ratio to the empty database, same backend, same run."


def plans_text(results: dict[str, Any]) -> str:
    """The plans on the big tables, and what in them grows with a table."""
    out = []
    for name, scenarios in results.items():
        for scenario in FILLED:
            for plan in scenarios[scenario]["plans"]:
                out.append(f"\n== {name}, {scenario}: {plan['role']}\n{plan['sql']}")
                out.extend(f"    {line}" for line in plan["plan"])
                out.extend(f"  WARNING {warning}" for warning in plan["warnings"])
    return "\n".join(out)


if __name__ == "__main__":
    main()

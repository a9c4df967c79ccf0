"""End-to-end throughput: a backlog of no-op runs drained by `flowsmith worker` processes.

The backlog is enqueued and held back first; the workers start, and once all
are ready the backlog is released and steps/s counted from then to the last
step's end (hold_backlog, release_backlog, steady_window in workload.py).
Enqueue rates are measured here too, one `flow.run` at a time and through
`Flow.run_many` in batches of 1,000.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flowsmith_worker.storage import create_storage
from flowsmith_worker.worker import Worker
from tests.bench import counters
from tests.bench.observe import Processes, observed
from tests.bench.routes import DIRECT, Route, drain_application
from tests.bench.targets import Target
from tests.bench.workload import (
    CONCURRENCY,
    NOOP_FLOWS,
    ONE_STEP,
    POLL_INTERVAL,
    RUN_MANY_BATCH,
    WorkerPool,
    enqueue_in_batches,
    enqueue_one_by_one,
    enqueue_quickly,
    has_run_many,
    hold_backlog,
    release_backlog,
    running_workers,
    steady_window,
    wait_completed,
)

NO_RUN_MANY = "n/a (this version has no Flow.run_many)"
SQLITE_COUNT_TIMEOUT = 600.0


def enqueue_rates(target: Target, single: int, batched: int) -> dict[str, Any]:
    """Flows/s enqueued from one thread: one `flow.run` each, and `run_many` batches."""
    target.wipe()
    storage = create_storage(target.url)
    try:
        single_rate = single / enqueue_one_by_one(storage, ONE_STEP, single)
        target.wipe()
        many_rate: float | str = NO_RUN_MANY
        if has_run_many():
            batch = min(RUN_MANY_BATCH, batched)
            many_rate = batched / enqueue_in_batches(storage, ONE_STEP, batched, batch)
    finally:
        storage.close()
    return {
        "single_flows": single,
        "single_flows_per_second": single_rate,
        "run_many_flows": batched,
        "run_many_batch": min(RUN_MANY_BATCH, batched),
        "run_many_flows_per_second": many_rate,
    }


def drain(
    target: Target,
    logs: Path,
    *,
    steps_per_flow: int,
    workers: int,
    flows: int,
    counted: bool,
    route: Route = DIRECT,
    observe: bool = False,
) -> dict[str, Any]:
    """Steps/s of ``workers`` processes connected by ``route`` draining ``flows`` runs;
    server counters if ``counted``; wait events and CPU (PostgreSQL) if ``observe``."""
    flow = NOOP_FLOWS[steps_per_flow]
    target.wipe()
    storage = create_storage(target.url)
    try:
        enqueue_quickly(storage, flow, flows)
    finally:
        storage.close()
    hold_backlog(target.engine)
    target.checkpoint()
    server = counters.ServerCounters(target) if counted else None
    if server is not None:
        server.start()
    application = drain_application()
    url = target.worker_url(route, application)
    with (
        running_workers(url, workers, logs, env=route.env, options=route.worker_options) as pool,
        _observing(target, pool, application) if observe else contextlib.nullcontext({}) as watched,
    ):
        released_at = release_backlog(target.engine)
        monitor_queries = wait_completed(target.engine, pool, flows) + 1
        rss = pool.peak_rss_mib()
    window = steady_window(target.engine, released_at)
    result: dict[str, Any] = {
        "steps_per_flow": steps_per_flow,
        "workers": workers,
        "route": route.key,
        "concurrency": CONCURRENCY,
        "flows": flows,
        "steps": flows * steps_per_flow,
        "measured_steps": window.steps,
        "seconds": window.seconds,
        "steps_per_second": window.steps_per_second,
        "worker_peak_rss_mib": rss,
        **watched,
    }
    if server is not None:
        result["per_step"] = server.counts(monitor_queries).per_step(flows * steps_per_flow)
    return result


@contextlib.contextmanager
def _observing(target: Target, pool: WorkerPool, application: str) -> Iterator[dict[str, Any]]:
    """The wait events of the workers (named ``application``) and everybody's CPU while
    the block runs (PostgreSQL)."""
    if target.server is None or target.backend != "postgresql":
        raise ValueError(f"wait events are PostgreSQL's: cannot observe {target.backend}")
    groups = {
        "server": Processes(frozenset({_pid_in(target.server.data_dir / "postmaster.pid")}), True),
        "workers": Processes(pool.pids),
        "bench": Processes(frozenset({os.getpid()})),  # this process: enqueue, monitor, sampler
    }
    if target.bouncer is not None:
        groups["pgbouncer"] = Processes(frozenset({_pid_in(target.bouncer.dir / "pgbouncer.pid")}))
    with observed(target.server.admin_url, target.database, application, groups) as figures:
        yield figures


def _pid_in(pid_file: Path) -> int:
    """The pid on the first line of a server's pid file."""
    return int(pid_file.read_text().split()[0])


def sqlite_counts_in_process(target: Target, flows: int) -> dict[str, Any]:
    """Round trips, statements and commits per step of 10-step runs, counted in-process."""
    target.wipe()
    flow = NOOP_FLOWS[10]
    setup = create_storage(target.url)
    try:
        enqueue_quickly(setup, flow, flows)
    finally:
        setup.close()
    with counters.traced_sqlite() as trace:
        storage = create_storage(target.url)
        try:
            worker = Worker(storage, concurrency=CONCURRENCY, poll_interval=POLL_INTERVAL)
            worker.run_until_idle(timeout=SQLITE_COUNT_TIMEOUT)
        finally:
            storage.close()
    return trace.result().per_step(flows * 10)

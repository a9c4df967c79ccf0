"""Pickup latency: from a run's enqueue to its first step starting.

Two idle workers wait; one-step runs are enqueued one at a time at a steady
pace well below what the workers can take, so each is picked up by an idle
worker and the figure measures the pickup path (NOTIFY on PostgreSQL, the
poll interval elsewhere), not a backlog. Both times come from the database
clock: fs_flows.created_at and the first node's started_at.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from flowsmith_worker.storage import create_storage
from tests.bench.targets import Target
from tests.bench.workload import (
    CONCURRENCY,
    MONITOR_MARK,
    ONE_STEP,
    POLL_INTERVAL,
    running_workers,
    tracking_ids,
    wait_completed,
)

WORKERS = 2
RATE = 20.0  # runs enqueued per second


def measure(target: Target, logs: Path, samples: int) -> dict[str, Any]:
    """Enqueue ``samples`` runs at RATE into idle workers; percentiles in milliseconds."""
    target.wipe()
    storage = create_storage(target.url)
    ONE_STEP.storage = storage
    try:
        with running_workers(target.url, WORKERS, logs) as pool:
            for i, tracking_id in enumerate(tracking_ids(samples)):
                due = time.monotonic() + 1 / RATE
                ONE_STEP.run({"i": i}, tracking_id=tracking_id)
                time.sleep(max(0.0, due - time.monotonic()))
            wait_completed(target.engine, pool, samples)
    finally:
        storage.close()
    delays = sorted(_pickup_delays_ms(target))
    return {
        "samples": len(delays),
        "rate_per_second": RATE,
        "workers": WORKERS,
        "concurrency": CONCURRENCY,
        "poll_interval_seconds": POLL_INTERVAL,
        "p50_ms": _percentile(delays, 50),
        "p95_ms": _percentile(delays, 95),
        "p99_ms": _percentile(delays, 99),
    }


def _pickup_delays_ms(target: Target) -> list[float]:
    query = sa.text(
        "SELECT (n.started_at - f.created_at) * 1000 FROM fs_nodes n"
        " JOIN fs_flows f ON f.id = n.flow_id WHERE n.position = 0"
        f" {MONITOR_MARK}"
    )
    with target.engine.connect() as conn:
        return [float(value) for (value,) in conn.execute(query)]


def _percentile(ordered: list[float], percent: int) -> float:
    """Percentile, interpolated between samples; with one sample, that sample."""
    if len(ordered) == 1:
        return ordered[0]
    return statistics.quantiles(ordered, n=100, method="inclusive")[percent - 1]

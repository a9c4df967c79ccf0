"""A backlog of one-step runs on a queue, for the tests of the backlog gauges and scalers."""

from __future__ import annotations

from flowsmith_worker import Flow
from flowsmith_worker.storage.base import Storage
from tests.support.steps import never_here


def enqueue_runs(storage: Storage, queue: str, runs: int, delay: float | None = None) -> list[str]:
    """The tracking ids of ``runs`` new runs of a one-step flow on ``queue``."""
    flow = Flow(f"{queue}_flow", queue=queue, storage=storage).step("one", never_here)
    return [flow.run({}, delay=delay).tracking_id for _ in range(runs)]

"""What the rate-limit tests share: a journal's check against the bucket, and the
stored state of limited runs (see flowsmith_worker/rate_limits.py)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from flowsmith_worker import FlowStatus, NodeStatus, Worker
from flowsmith_worker.records import NodeRecord
from flowsmith_worker.storage.base import Storage
from tests.conftest import eventually
from tests.support.cli import flow_of

POLL = 0.02
# How far a journal's start time (taken in the step, by the process clock) may lag
# the token's instant (taken in the database, by its clock): a thread that took
# its token may be scheduled late on a loaded two-core machine.
SLACK = 0.5


def over_the_limit(starts: Sequence[float], count: int, period: float) -> list[str]:
    """Every stretch of the journal with more starts than the bucket allows.

    A token bucket of ``count`` tokens refilled at ``count`` per ``period`` lets at
    most ``count + count * w / period`` starts into any window of ``w`` seconds
    (its burst: ``count`` at once). Checked for every window that begins and ends
    at a start, widened by SLACK (a start recorded late makes its window look shorter).
    """
    ordered = sorted(starts)
    found = []
    for first in range(len(ordered)):
        for last in range(first + 1, len(ordered)):
            window = ordered[last] - ordered[first] + SLACK
            allowed = count + count * window / period
            if last - first + 1 > allowed:
                found.append(
                    f"{last - first + 1} starts in {ordered[last] - ordered[first]:.3f} s "
                    f"(at most {allowed:.1f})"
                )
    return found


def steps_of(storage: Storage, tracking_id: str) -> dict[str, NodeRecord]:
    """The run's nodes by step name."""
    return {n.step_name: n for n in storage.list_nodes(flow_id=flow_of(storage, tracking_id).id)}


def completed(storage: Storage, tracking_ids: Sequence[str]) -> bool:
    return all(flow_of(storage, t).status == FlowStatus.COMPLETED for t in tracking_ids)


def waiting(storage: Storage, tracking_ids: Sequence[str]) -> bool:
    """Whether a limited node of these runs waits for its turn (PENDING, wake_at set)."""
    return any(
        node.status == NodeStatus.PENDING and node.wake_at is not None
        for tid in tracking_ids
        for node in steps_of(storage, tid).values()
    )


def turn_until(worker: Worker, done: Callable[[], Any], timeout: float = 20.0) -> Any:
    """Turn the worker's loop in this thread until ``done()`` is truthy."""

    def turn() -> Any:
        worker.run_once()
        return done()

    return eventually(turn, timeout=timeout, interval=POLL)

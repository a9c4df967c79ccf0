"""Rate limits of steps (Flow.step(rate_limit=...), @step(rate_limit=...)), on every backend.

The bucket is a row taken under its lock by the database clock (see
flowsmith_worker/rate_limits.py): these tests drive real Worker loops in threads
and read the stored rows. The race across several `flowsmith worker` processes
is in tests/integration/test_rate_limit_processes.py.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from flowsmith_worker import Flow, FlowStatus, NodeStatus, Worker
from flowsmith_worker.decorators import step, workflow
from flowsmith_worker.storage.base import Storage
from tests.conftest import eventually
from tests.contract.test_sleep import drive, nodes_of, status_of

Names = Callable[[str], str]
POLL = 0.02
# How far a journal's start time (taken in the step, by the process clock) may lag
# the token's instant (taken in the database, by its clock): a thread that took
# its token may be scheduled late on a loaded two-core machine.
SLACK = 0.25


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


def test_a_rate_limited_step_starts_no_faster_than_its_bucket_and_every_run_completes(
    storage: Storage, unique: Names
) -> None:
    """12 runs of a step limited to 3/s, claimed by 2 worker loops of 8 slots each:
    the journal of starts never has more in a window than the bucket allows (3 at
    once, then one every 1/3 s), the refused starts waited PENDING as RATE_LIMITED
    (no slot held), and every run completes."""
    journal: list[float] = []
    limited = Flow(unique("limited"), storage=storage).step(
        "call_api", lambda ctx: journal.append(time.time()), rate_limit="3/s"
    )
    runs = [limited.run({}, tracking_id=unique("r")).tracking_id for _ in range(12)]
    seen_waiting = _run_workers(storage, runs, loops=2, concurrency=8)

    assert len(journal) == 12
    assert not over_the_limit(journal, 3, 1.0)
    assert seen_waiting, "no start was ever refused a token"
    # 12 starts at 3/s with a burst of 3 take at least 3 s.
    assert max(journal) - min(journal) >= 3 - SLACK


def test_each_attempt_of_a_retried_step_is_a_start(storage: Storage, unique: Names) -> None:
    """A step limited to 2/s that fails twice before it succeeds: its three attempts
    are three starts, spaced as the bucket allows (2 at once, the third 0.5 s on)."""
    journal: list[float] = []

    def flaky(ctx: Any) -> str:
        journal.append(time.time())
        if len(journal) < 3:
            raise RuntimeError("try again")
        return "done"

    flaky_flow = Flow(unique("flaky"), storage=storage).step(
        "call_api", flaky, retries=2, backoff=0, rate_limit="2/s"
    )
    tid = unique("r")
    flaky_flow.run({}, tracking_id=tid)
    worker = Worker(storage=storage, poll_interval=POLL)
    drive(worker, lambda: status_of(storage, tid) == FlowStatus.COMPLETED)
    assert len(journal) == 3
    assert journal[2] - journal[0] >= 0.5 - SLACK, "the third attempt took no token"


def test_the_decorator_api_takes_a_rate_limit_and_limited_steps_share_no_bucket(
    storage: Storage, unique: Names
) -> None:
    """@step(rate_limit="1/h") limits its own step only: the first run's start takes the
    one token of the hour; a second run's start of that step waits (RATE_LIMITED, due
    within the hour), while the unlimited step before it ran for both."""
    ran: list[str] = []

    @workflow(unique("decorated"), storage=storage)
    def decorated() -> None:
        @step
        def free(ctx: Any) -> None:
            ran.append("free")

        @step(rate_limit="1/h")
        def scarce(ctx: Any) -> None:
            ran.append("scarce")

    first, second = unique("first"), unique("second")
    decorated({}, tracking_id=first)
    worker = Worker(storage=storage, poll_interval=POLL)
    drive(worker, lambda: status_of(storage, first) == FlowStatus.COMPLETED)
    decorated({}, tracking_id=second)
    drive(worker, lambda: nodes_of(storage, second).get("scarce") is not None)
    drive(worker, lambda: waiting(storage, [second]))
    node = nodes_of(storage, second)["scarce"]
    assert node.status == NodeStatus.PENDING
    assert ran == ["free", "scarce", "free"]
    assert node.wake_at is not None
    assert node.run_after == pytest.approx(node.wake_at, abs=1.0)  # due at its turn
    now = time.time()
    assert now < node.wake_at <= now + 3600 + SLACK


def test_a_cancelled_run_waiting_for_its_rate_limit_ends(storage: Storage, unique: Names) -> None:
    """A run whose limited step waits for its turn is cancelled: the node ends
    CANCELLED and never starts."""
    ran: list[str] = []
    limited = Flow(unique("limited"), storage=storage).step(
        "scarce", lambda ctx: ran.append("x"), rate_limit="1/h"
    )
    first, second = unique("first"), unique("second")
    limited.run({}, tracking_id=first)
    limited.run({}, tracking_id=second)
    worker = Worker(storage=storage, poll_interval=POLL)
    drive(worker, lambda: len(ran) == 1 and waiting(storage, [first, second]))
    refused = first if waiting(storage, [first]) else second
    storage.cancel_flow(tracking_id=refused)
    assert nodes_of(storage, refused)["scarce"].status == NodeStatus.CANCELLED
    assert ran == ["x"]


def waiting(storage: Storage, tracking_ids: Sequence[str]) -> bool:
    """Whether a limited node of these runs waits for its turn (PENDING, wake_at set)."""
    return any(
        node.status == NodeStatus.PENDING and node.wake_at is not None
        for tid in tracking_ids
        for node in nodes_of(storage, tid).values()
    )


def _run_workers(storage: Storage, runs: list[str], *, loops: int, concurrency: int) -> bool:
    """Run ``loops`` Worker loops in threads until every run completes; whether any
    limited node was seen waiting for its turn meanwhile."""
    stop = threading.Event()
    workers = [
        Worker(storage=storage, concurrency=concurrency, poll_interval=POLL) for _ in range(loops)
    ]

    def loop(worker: Worker) -> None:
        while not stop.is_set():
            worker.run_once()
            time.sleep(POLL)

    threads = [threading.Thread(target=loop, args=(w,), daemon=True) for w in workers]
    for thread in threads:
        thread.start()
    seen_waiting = False

    def all_done() -> bool:
        nonlocal seen_waiting
        seen_waiting = seen_waiting or waiting(storage, runs)
        return all(status_of(storage, tid) == FlowStatus.COMPLETED for tid in runs)

    try:
        eventually(all_done, timeout=30, interval=0.05)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=10)
    return seen_waiting


@pytest.mark.parametrize(
    ("written", "complaint"),
    [
        ("100 per minute", "is not COUNT/UNIT"),
        ("100/d", "is not COUNT/UNIT"),
        ("0/m", "at least 1"),
        ("-5/m", "at least 1"),
        (100, "must be a string"),
    ],
)
def test_a_rate_limit_that_cannot_be_read_is_refused_naming_its_step(
    unique: Names, written: Any, complaint: str
) -> None:
    """Flow.step and @step refuse a rate limit they cannot read, saying which step and
    how to write one, before anything runs."""
    from flowsmith_worker.errors import InvalidFlowDefinition

    with pytest.raises(InvalidFlowDefinition, match=complaint) as refused:
        Flow(unique("bad")).step("send_email", lambda ctx: None, rate_limit=written)
    assert "'send_email'" in str(refused.value)
    with pytest.raises(InvalidFlowDefinition, match=complaint):

        @workflow(unique("bad_decorated"))
        def bad() -> None:
            @step(rate_limit=written)
            def send_email(ctx: Any) -> None: ...

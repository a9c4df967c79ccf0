"""Durable sleeps (Flow.sleep, @sleep), on every backend (memory, sqlite, PostgreSQL, MySQL).

A sleeping run's node is parked in the database (see flowsmith_worker/parking.py):
these tests drive real Worker loops and read the stored rows, whose times are
all on the database clock. The worker-restart test is in
tests/integration/test_parking_restart.py (real processes, SIGKILL).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from flowsmith_worker import Flow, FlowStatus, NodeStatus, Worker
from flowsmith_worker.decorators import sleep, step, workflow
from flowsmith_worker.records import AttemptOutcome, Lease, Parked
from flowsmith_worker.storage.base import Storage
from tests.support.parking import POLL, drive, outcomes, parked
from tests.support.runs import nodes_of, status_of

Names = Callable[[str], str]


def test_a_sleeping_run_holds_no_slot_and_wakes_after_its_time(
    storage: Storage, unique: Names
) -> None:
    """A sleep of 3 s parks its node: a one-slot worker meanwhile runs other runs to the
    end, no node of the sleeper is RUNNING, and the sleep's next attempt starts at its
    wake time or later, which is 3 s after the sleep began (database clock)."""
    ran: list[str] = []
    sleeper = (
        Flow(unique("sleeper"), storage=storage)
        .step("before", lambda ctx: ran.append("before"))
        .sleep("nap", seconds=3)
        .step("after", lambda ctx: ran.append("after"))
    )
    other = Flow(unique("other"), storage=storage).step("quick", lambda ctx: "done")
    worker = Worker(storage=storage, concurrency=1, poll_interval=POLL)
    tid = unique("t")
    sleeper.run({}, tracking_id=tid)
    drive(worker, lambda: parked(storage, tid, "nap"))

    others = [other.run({}, tracking_id=unique("o")) for _ in range(3)]
    drive(worker, lambda: all(status_of(storage, r.tracking_id) == "COMPLETED" for r in others))
    nodes = nodes_of(storage, tid)
    assert nodes["nap"].status == NodeStatus.PENDING, "the sleep woke before its time"
    assert not any(n.status == NodeStatus.RUNNING for n in nodes.values())
    assert ran == ["before"]

    drive(worker, lambda: status_of(storage, tid) == FlowStatus.COMPLETED)
    nap = nodes_of(storage, tid)["nap"]
    assert ran == ["before", "after"]
    assert outcomes(nap) == [AttemptOutcome.PARKED, AttemptOutcome.COMPLETED]
    went_to_sleep, woke = nap.attempts
    assert nap.wake_at is not None and nap.wake_at >= went_to_sleep.started_at + 3
    assert woke.started_at >= nap.wake_at
    assert nap.output is None


def test_a_sleep_until_a_datetime_of_ctx_with_the_decorator_api(
    storage: Storage, unique: Names
) -> None:
    """@sleep's function returns a datetime from ctx.data: the node wakes exactly then
    (its stored wake time is that instant), and the steps after it run."""
    wake = datetime.now(UTC) + timedelta(seconds=1)

    @workflow(unique("decorated"), storage=storage)
    def decorated() -> None:
        @step
        def first(ctx: Any) -> str:
            return "first"

        @sleep
        def until_the_time(ctx: Any) -> datetime:
            return datetime.fromisoformat(ctx.data["wake"])

        @step
        def last(ctx: Any) -> Any:
            return ctx.data["first"]

    tid = unique("t")
    run = decorated({"wake": wake.isoformat()}, tracking_id=tid)
    worker = Worker(storage=storage, poll_interval=POLL)
    drive(worker, lambda: status_of(storage, tid) == FlowStatus.COMPLETED)
    node = nodes_of(storage, tid)["until_the_time"]
    assert node.wake_at == pytest.approx(wake.timestamp(), abs=1e-3)
    assert node.attempts[-1].started_at >= wake.timestamp() - 1e-3
    assert run.wait(5)["last"] == "first"


def test_a_sleep_whose_time_has_passed_does_not_park(storage: Storage, unique: Names) -> None:
    """A sleep until an instant already past completes at its first attempt: no PARKED
    attempt, no wake time stored."""
    flow = Flow(unique("f"), storage=storage).sleep(
        "late", until=lambda ctx: datetime.now(UTC) - timedelta(hours=1)
    )
    tid = unique("t")
    flow.run({}, tracking_id=tid)
    drive(
        Worker(storage=storage, poll_interval=POLL), lambda: status_of(storage, tid) == "COMPLETED"
    )
    node = nodes_of(storage, tid)["late"]
    assert outcomes(node) == [AttemptOutcome.COMPLETED]
    assert node.wake_at is None


def test_a_cancel_ends_a_sleeping_run(storage: Storage, unique: Names) -> None:
    """Cancelling a run that sleeps ends its parked node CANCELLED at once; it never wakes
    and the step after it never runs."""
    ran: list[str] = []
    flow = (
        Flow(unique("f"), storage=storage)
        .sleep("nap", seconds=0.5)
        .step("after", lambda ctx: ran.append("after"))
    )
    tid = unique("t")
    flow.run({}, tracking_id=tid)
    worker = Worker(storage=storage, poll_interval=POLL)
    drive(worker, lambda: parked(storage, tid, "nap"))
    storage.cancel_flow(tracking_id=tid)
    assert nodes_of(storage, tid)["nap"].status == NodeStatus.CANCELLED
    deadline = time.monotonic() + 1.0  # past the sleep's wake time
    while time.monotonic() < deadline:
        worker.run_once()
        time.sleep(POLL)
    assert status_of(storage, tid) == FlowStatus.CANCELLED
    assert ran == [] and "after" not in nodes_of(storage, tid)


def test_a_sleep_parks_in_a_parallel_group_while_its_siblings_run(
    storage: Storage, unique: Names
) -> None:
    """A sleep inside a parallel group parks while its sibling completes; the stage
    after the group starts only once the sleep is over too."""
    flow = Flow(unique("f"), storage=storage)
    with flow.parallel():
        flow.sleep("nap", seconds=0.5)
        flow.step("work", lambda ctx: "worked")
    flow.step("after", lambda ctx: sorted(k for k in ctx.data if k in ("nap", "work")))
    tid = unique("t")
    run = flow.run({}, tracking_id=tid)
    worker = Worker(storage=storage, poll_interval=POLL)
    drive(worker, lambda: status_of(storage, tid) == FlowStatus.COMPLETED)
    assert run.wait(5)["after"] == ["nap", "work"]
    assert outcomes(nodes_of(storage, tid)["nap"])[0] == AttemptOutcome.PARKED


def test_parking_is_fenced_by_the_lease(storage: Storage, unique: Names) -> None:
    """park_node writes only under the attempt's lease: another worker's (a lost lease)
    or a spent one (the node is parked already) writes nothing and answers None."""
    Flow(unique("f"), storage=storage).sleep("nap", seconds=60).run({}, tracking_id=unique("t"))
    [claimed] = storage.claim_nodes(worker_id="w1", limit=1, lease_seconds=60, queues=["default"])
    lease = claimed.lease
    other = Lease(lease.node_id, lease.flow_id, "w2", lease.attempt)
    assert storage.park_node(lease=other, event=None, seconds=60, until=None) is None
    [node] = storage.list_nodes(flow_id=lease.flow_id)
    assert node.status == NodeStatus.RUNNING and node.wake_at is None

    answer = storage.park_node(lease=lease, event=None, seconds=60, until=None)
    assert isinstance(answer, Parked) and answer.status == NodeStatus.PENDING
    [node] = storage.list_nodes(flow_id=lease.flow_id)
    assert node.wake_at == answer.until and node.run_after == pytest.approx(answer.until)
    assert storage.park_node(lease=lease, event=None, seconds=1, until=None) is None
    [node] = storage.list_nodes(flow_id=lease.flow_id)
    assert node.wake_at == answer.until


def test_a_wake_time_that_cannot_be_computed_fails_the_step(
    storage: Storage, unique: Names
) -> None:
    """until= raising, or returning something that is not a time, fails the sleep step
    (and its run) with the error, as any step's error."""
    flow = Flow(unique("f"), storage=storage).sleep("nap", until=lambda ctx: "tomorrow")
    tid = unique("t")
    flow.run({}, tracking_id=tid)
    drive(Worker(storage=storage, poll_interval=POLL), lambda: status_of(storage, tid) == "FAILED")
    error = nodes_of(storage, tid)["nap"].error
    assert error is not None and "was told to wake at 'tomorrow'" in error


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({}, ValueError),
        ({"seconds": 1, "until": lambda ctx: datetime.now(UTC)}, ValueError),
        ({"seconds": -1}, ValueError),
        ({"seconds": "5"}, ValueError),
        ({"until": "tomorrow"}, TypeError),
    ],
)
def test_a_sleep_is_checked_when_it_is_defined(
    kwargs: dict[str, Any], error: type[Exception], unique: Names
) -> None:
    """sleep() needs exactly one of seconds (>= 0) and until (a function of ctx)."""
    with pytest.raises(error, match="sleep 'nap'"):
        Flow(unique("f")).sleep("nap", **kwargs)


def test_an_async_until_is_refused(unique: Names) -> None:
    """until= is called in the worker's slot thread to decide a wake time: an async
    function would return a coroutine, so it is refused when the flow is defined."""

    async def later(ctx: Any) -> datetime:
        return datetime.now(UTC)

    with pytest.raises(TypeError, match="plain function of ctx"):
        Flow(unique("f")).sleep("nap", until=later)

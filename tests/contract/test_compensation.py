"""Compensations (``compensate=``), on every backend (memory, sqlite, PostgreSQL, MySQL).

When a run fails for good, the compensations of its completed steps run as
durable ``compensate:<step>`` nodes, one at a time in reverse plan order, and the
run ends FAILED with their outcome (see flowsmith_worker/compensation.py). These
tests drive real Worker loops and read the stored rows. SIGKILL of a worker
during a compensation: tests/integration/test_compensation_restart.py.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa

from flowsmith_worker import Compensation, Flow, FlowStatus, NodeStatus, Worker
from flowsmith_worker.decorators import step, workflow
from flowsmith_worker.errors import (
    EventRefused,
    InvalidFlowDefinition,
    RunNotCancellable,
    RunNotRetryable,
)
from flowsmith_worker.events import send_event
from flowsmith_worker.storage.base import Storage
from flowsmith_worker.storage.sql import schema
from flowsmith_worker.storage.sql.storage import SqlStorage
from tests.conftest import eventually
from tests.support.runs import nodes_of, status_of

Names = Callable[[str], str]
POLL = 0.02


def declined(_ctx: Any) -> None:
    raise RuntimeError("card declined")


def run_to_idle(storage: Storage, concurrency: int = 1) -> None:
    worker = Worker(storage=storage, concurrency=concurrency, poll_interval=POLL)
    try:
        worker.run_until_idle(timeout=30)
    finally:
        worker.shutdown()


def test_compensations_run_in_reverse_order_with_the_steps_outputs(
    storage: Storage, unique: Names
) -> None:
    """Steps a, b, c complete and d fails: the compensations of c then a run (b has
    none), each seeing its step's output in ctx.data; the run ends FAILED with
    COMPENSATED and the failed step's error, the compensations listed after the steps."""
    undone: list[tuple[str, Any]] = []
    flow = (
        Flow(unique("pay"), storage=storage)
        .step("a", lambda ctx: "A", compensate=lambda ctx: undone.append(("a", ctx.data["a"])))
        .step("b", lambda ctx: "B")
        .step("c", lambda ctx: {"id": 7}, compensate=lambda ctx: undone.append(("c", ctx.data)))
        .step("d", declined)
    )
    run = flow.run({"order": 1}, tracking_id=unique("t"))
    run_to_idle(storage)

    assert [u[0] for u in undone] == ["c", "a"]
    assert undone[1][1] == "A"
    assert undone[0][1] == {"order": 1, "a": "A", "b": "B", "c": {"id": 7}}
    record = run.record(with_payloads=False)
    assert record.status == FlowStatus.FAILED and "card declined" in (record.error or "")
    assert record.finished_at is not None
    assert run.compensation() == Compensation.COMPENSATED
    trace = run.trace()
    assert [n.step_name for n in trace] == ["a", "b", "c", "d", "compensate:c", "compensate:a"]
    assert all(n.status == NodeStatus.COMPLETED for n in trace[4:])


def test_a_compensation_is_retried_like_a_step(storage: Storage, unique: Names) -> None:
    """A compensation that raises once, with compensate_retries=1, runs again and
    completes: its two attempts are in the trace, the run is COMPENSATED."""
    calls: list[int] = []

    def refund(ctx: Any) -> str:
        calls.append(ctx.attempt)
        if len(calls) == 1:
            raise ConnectionError("payment provider unreachable")
        return "refunded"

    flow = (
        Flow(unique("pay"), storage=storage)
        .step("charge", lambda ctx: "ch_1", compensate=refund, compensate_retries=1, backoff=0)
        .step("ship", declined)
    )
    run = flow.run({}, tracking_id=unique("t"))
    run_to_idle(storage)

    node = nodes_of(storage, run.tracking_id)["compensate:charge"]
    assert calls == [1, 2]
    assert node.status == NodeStatus.COMPLETED and node.output == "refunded"
    assert [a.outcome for a in node.attempts] == ["FAILED", "COMPLETED"]
    assert run.compensation() == Compensation.COMPENSATED


def test_a_compensation_that_fails_for_good_does_not_stop_the_others(
    storage: Storage, unique: Names
) -> None:
    """The compensation of c fails with no retry left: it is FAILED, the compensation
    of a still runs, and the run ends FAILED with COMPENSATION_FAILED and the error of
    the step that failed it (not the compensation's)."""
    undone: list[str] = []

    def broken_refund(_ctx: Any) -> None:
        raise RuntimeError("refund refused")

    flow = (
        Flow(unique("pay"), storage=storage)
        .step("a", lambda ctx: 1, compensate=lambda ctx: undone.append("a"))
        .step("c", lambda ctx: 3, compensate=broken_refund)
        .step("d", declined)
    )
    run = flow.run({}, tracking_id=unique("t"))
    run_to_idle(storage)

    nodes = nodes_of(storage, run.tracking_id)
    assert nodes["compensate:c"].status == NodeStatus.FAILED
    assert "refund refused" in (nodes["compensate:c"].error or "")
    assert undone == ["a"]
    assert run.compensation() == Compensation.COMPENSATION_FAILED
    record = run.record(with_payloads=False)
    assert record.status == FlowStatus.FAILED and "card declined" in (record.error or "")


def test_a_parallel_groups_completed_siblings_are_compensated(
    storage: Storage, unique: Names
) -> None:
    """In a parallel group, "fast" completes, "slow" is still running when "bad" fails
    the run, and completes afterwards: both are compensated (none starts before slow
    ended), then the step before the group; the failed sibling is not."""
    undone: list[str] = []
    tid = unique("t")
    seen_compensating = threading.Event()

    def slow(_ctx: Any) -> str:
        # Ends only once its sibling's failure made the run COMPENSATING.
        if eventually(lambda: status_of(storage, tid) == FlowStatus.COMPENSATING, timeout=20):
            seen_compensating.set()
        return "slow done"

    def undo(name: str) -> Callable[[Any], None]:
        return lambda ctx: undone.append(name)

    flow = Flow(unique("fan"), storage=storage).step(
        "first", lambda ctx: 0, compensate=undo("first")
    )
    with flow.parallel():
        flow.step("fast", lambda ctx: 1, compensate=undo("fast"))
        flow.step("slow", slow, compensate=undo("slow"))
        flow.step("bad", declined, compensate=undo("bad"))
    run = flow.run({}, tracking_id=tid)
    run_to_idle(storage, concurrency=3)

    assert seen_compensating.is_set()
    assert sorted(undone[:2]) == ["fast", "slow"] and undone[2:] == ["first"]
    assert "compensate:bad" not in nodes_of(storage, tid)
    assert run.compensation() == Compensation.COMPENSATED


def test_a_failed_subflow_compensates_itself_before_its_parent(
    storage: Storage, unique: Names
) -> None:
    """The child run fails: its own compensations run, it ends FAILED, then its parent's
    subflow step fails and the parent's compensations run; both runs are COMPENSATED."""
    undone: list[str] = []
    child = (
        Flow(unique("child"), storage=storage)
        .step("reserve", lambda ctx: "r", compensate=lambda ctx: undone.append("child reserve"))
        .step("pay", declined)
    )
    parent = (
        Flow(unique("parent"), storage=storage)
        .step("open", lambda ctx: "o", compensate=lambda ctx: undone.append("parent open"))
        .subflow("checkout", child)
    )
    run = parent.run({}, tracking_id=unique("t"))
    run_to_idle(storage)

    assert undone == ["child reserve", "parent open"]
    assert run.status() == FlowStatus.FAILED
    assert run.compensation() == Compensation.COMPENSATED
    child_run = child.get_run(f"{run.tracking_id}:checkout")
    assert child_run.compensation() == Compensation.COMPENSATED


def test_a_subflow_step_whose_child_was_compensated_is_not_retried_for_nothing(
    storage: Storage, unique: Names
) -> None:
    """A parent (no compensations of its own) whose subflow step has retries=3: the child
    fails and is compensated; the step's next attempt finds the child refusing to resume
    (RunNotRetryable) and fails for good at once, not once per retry left. A retry of the
    parent is refused up front, naming the subflow step and the compensated child."""
    undone: list[str] = []
    child = (
        Flow(unique("child"), storage=storage)
        .step("reserve", lambda ctx: "r", compensate=lambda ctx: undone.append("reserve"))
        .step("pay", declined)
    )
    parent = Flow(unique("parent"), storage=storage).subflow("checkout", child, retries=3)
    run = parent.run({}, tracking_id=unique("t"))
    run_to_idle(storage)

    child_id = f"{run.tracking_id}:checkout"
    assert undone == ["reserve"]
    assert child.get_run(child_id).compensation() == Compensation.COMPENSATED
    assert run.status() == FlowStatus.FAILED
    step = nodes_of(storage, run.tracking_id)["checkout"]
    assert step.status == NodeStatus.FAILED and step.attempt == 2
    assert "RunNotRetryable" in (step.error or "")
    with pytest.raises(RunNotRetryable, match=rf"subflow step 'checkout'.*{child_id!r}"):
        run.retry()
    assert run.status() == FlowStatus.FAILED


def test_a_completed_run_and_a_run_without_compensations_compensate_nothing(
    storage: Storage, unique: Names
) -> None:
    """A run that completes runs no compensation; a failed run whose completed steps
    have none (the step with one was never reached) ends FAILED at once, with no
    compensation node and no outcome."""
    undone: list[str] = []
    ok = Flow(unique("ok"), storage=storage).step(
        "a", lambda ctx: 1, compensate=lambda ctx: undone.append("a")
    )
    plain = (
        Flow(unique("plain"), storage=storage)
        .step("a", lambda ctx: 1)
        .step("b", declined)
        .step("never", lambda ctx: 2, compensate=lambda ctx: undone.append("never"))
    )
    done = ok.run({}, tracking_id=unique("ok"))
    failed = plain.run({}, tracking_id=unique("plain"))
    run_to_idle(storage)

    assert done.status() == FlowStatus.COMPLETED and done.compensation() is None
    assert [n.step_name for n in done.trace()] == ["a"]
    assert failed.status() == FlowStatus.FAILED and failed.compensation() is None
    assert failed.record(with_payloads=False).finished_at is not None
    assert undone == []
    assert [n.step_name for n in failed.trace()] == ["a", "b"]


def test_a_cancel_runs_no_compensation_and_a_compensating_run_cannot_be_cancelled(
    storage: Storage, unique: Names
) -> None:
    """Cancelling a running run undoes nothing (a cancel is an order to stop, not a
    failure). A COMPENSATING run (its compensation waiting out a 60 s backoff) refuses
    a cancel, and a retry, saying why; it stays COMPENSATING."""
    undone: list[str] = []
    cancelled = (
        Flow(unique("c"), storage=storage)
        .step("a", lambda ctx: 1, compensate=lambda ctx: undone.append("a"))
        .sleep("nap", seconds=3600)
    )
    run = cancelled.run({}, tracking_id=unique("t"))
    worker = Worker(storage=storage, concurrency=1, poll_interval=POLL)
    eventually(lambda: worker.run_once() or nodes_of(storage, run.tracking_id)["nap"].wake_at)
    run.cancel()
    run_to_idle(storage)
    assert run.status() == FlowStatus.CANCELLED
    assert undone == [] and "compensate:a" not in nodes_of(storage, run.tracking_id)

    def refund_later(_ctx: Any) -> None:
        raise ConnectionError("provider down")

    slow_undo = (
        Flow(unique("s"), storage=storage)
        .step("a", lambda ctx: 1, compensate=refund_later, compensate_retries=3, backoff=60)
        .step("b", declined)
    )
    stuck = slow_undo.run({}, tracking_id=unique("t"))

    def retried_later() -> bool:
        worker.run_once()
        node = nodes_of(storage, stuck.tracking_id).get("compensate:a")
        return node is not None and node.status == NodeStatus.PENDING and node.attempt == 1

    eventually(retried_later)
    worker.shutdown()
    with pytest.raises(RunNotCancellable, match=r"COMPENSATING.*half undone"):
        stuck.cancel()
    with pytest.raises(RunNotRetryable, match="COMPENSATING"):
        stuck.retry()
    assert stuck.status() == FlowStatus.COMPENSATING


def test_a_compensating_run_waiting_on_a_subflow_names_the_child_to_cancel(
    storage: Storage, unique: Names
) -> None:
    """In a parallel group, subflow "sub" waits on a child that waits for an event for
    ever, and "bad" fails the run: it is COMPENSATING, no compensation started, waiting
    for "sub". A cancel is refused naming that step and its child (cancel child
    '<tid>:sub' first), not claiming compensations are undoing steps; cancelling the
    child ends the wait, and the compensation of "first" runs."""
    undone: list[str] = []
    tid = unique("t")
    child_id = f"{tid}:sub"

    def bad_once_the_child_waits(_ctx: Any) -> None:
        # Fails the run only once "sub" is WAITING for its child.
        eventually(lambda: nodes_of(storage, tid)["sub"].status == NodeStatus.WAITING)
        raise RuntimeError("card declined")

    child = Flow(unique("child"), storage=storage).wait_for("never")
    flow = Flow(unique("fan"), storage=storage).step(
        "first", lambda ctx: 0, compensate=lambda ctx: undone.append("first")
    )
    with flow.parallel():
        flow.subflow("sub", child)
        flow.step("bad", bad_once_the_child_waits)
    run = flow.run({}, tracking_id=tid)
    run_to_idle(storage, concurrency=2)
    assert run.status() == FlowStatus.COMPENSATING and undone == []

    with pytest.raises(RunNotCancellable) as refused:
        run.cancel()
    message = str(refused.value)
    assert f"cancel child {child_id!r} first" in message and "'sub'" in message
    assert "are undoing" not in message
    assert run.status() == FlowStatus.COMPENSATING

    storage.cancel_flow(tracking_id=child_id)
    run_to_idle(storage)
    assert undone == ["first"]
    assert run.status() == FlowStatus.FAILED
    assert run.compensation() == Compensation.COMPENSATED


def test_a_compensated_run_is_not_retried(storage: Storage, unique: Names) -> None:
    """Once its compensations ran, a FAILED run refuses `retry` and a trigger with its
    tracking_id (its steps were undone); the step that failed it does not run again."""
    calls: list[str] = []

    def fails(_ctx: Any) -> None:
        calls.append("b")
        raise RuntimeError("card declined")

    flow = (
        Flow(unique("pay"), storage=storage)
        .step("a", lambda ctx: 1, compensate=lambda ctx: None)
        .step("b", fails)
    )
    run = flow.run({}, tracking_id=unique("t"))
    run_to_idle(storage)
    assert run.compensation() == Compensation.COMPENSATED

    with pytest.raises(RunNotRetryable, match="undid its completed steps"):
        run.retry()
    with pytest.raises(RunNotRetryable, match="new tracking_id"):
        flow.run({}, tracking_id=run.tracking_id)
    run_to_idle(storage)
    assert calls == ["b"] and run.status() == FlowStatus.FAILED


def test_run_many_refuses_a_compensated_run_before_writing_any_run(
    storage: Storage, unique: Names
) -> None:
    """run_many(connection=...) with a new tracking_id and that of a compensated run
    raises RunNotRetryable before it writes anything: the caller's own transaction holds
    no new run (the batch is all or nothing, checked before the first write)."""
    assert isinstance(storage, SqlStorage)
    flow = (
        Flow(unique("pay"), storage=storage)
        .step("a", lambda ctx: 1, compensate=lambda ctx: None)
        .step("b", declined)
    )
    undone = flow.run({}, tracking_id=unique("t"))
    run_to_idle(storage)
    assert undone.compensation() == Compensation.COMPENSATED

    fresh = unique("t")
    flows = schema.flows
    with storage.engine.connect() as conn, conn.begin() as transaction:
        with pytest.raises(RunNotRetryable, match="undid its completed steps"):
            flow.run_many([{}, {}], tracking_ids=[fresh, undone.tracking_id], connection=conn)
        written = conn.execute(sa.select(flows.c.id).where(flows.c.tracking_id == fresh)).first()
        transaction.rollback()
    assert written is None
    assert undone.status() == FlowStatus.FAILED


def test_decorated_steps_take_async_compensations(storage: Storage, unique: Names) -> None:
    """``@step(compensate=...)`` with an ``async def`` compensation: it is awaited, and
    undoes its step when a later step fails."""
    undone: list[Any] = []

    async def refund(ctx: Any) -> str:
        undone.append(ctx.data["charge"])
        return "refunded"

    @workflow(unique("wf"), storage=storage)
    def checkout() -> None:
        @step(compensate=refund)
        def charge(_ctx: Any) -> str:
            return "ch_9"

        @step
        def ship(_ctx: Any) -> None:
            raise RuntimeError("no stock")

    run = checkout.run({}, tracking_id=unique("t"))
    run_to_idle(storage)
    assert undone == ["ch_9"]
    assert nodes_of(storage, run.tracking_id)["compensate:charge"].output == "refunded"
    assert run.compensation() == Compensation.COMPENSATED


def test_compensation_names_are_reserved(unique: Names) -> None:
    """A step may not be named like a compensation node, and compensate_retries
    without compensate= is refused."""
    with pytest.raises(InvalidFlowDefinition, match="names compensations"):
        Flow(unique("f")).step("Compensate:x", lambda ctx: None)
    with pytest.raises(ValueError, match="without compensate="):
        Flow(unique("g")).step("x", lambda ctx: None, compensate_retries=2)


def test_cancelling_a_parent_leaves_its_compensating_child_to_finish(
    storage: Storage, unique: Names
) -> None:
    """A parent waits for its subflow, which failed and is COMPENSATING (its compensation
    waits out a 60 s backoff): cancelling the parent cancels it, but not the child, whose
    pending compensation stays queued."""

    def refund_later(_ctx: Any) -> None:
        raise ConnectionError("provider down")

    child = (
        Flow(unique("child"), storage=storage)
        .step("pay", lambda ctx: 1, compensate=refund_later, compensate_retries=1, backoff=60)
        .step("ship", declined)
    )
    parent = Flow(unique("parent"), storage=storage).subflow("checkout", child)
    run = parent.run({}, tracking_id=unique("t"))
    child_tid = f"{run.tracking_id}:checkout"
    worker = Worker(storage=storage, concurrency=1, poll_interval=POLL)

    def child_waits_to_retry() -> bool:
        worker.run_once()
        node = nodes_of(storage, child_tid).get("compensate:pay") if child_exists() else None
        return node is not None and node.status == NodeStatus.PENDING and node.attempt == 1

    def child_exists() -> bool:
        return storage.get_flow(tracking_id=child_tid, with_payloads=False) is not None

    eventually(child_waits_to_retry)
    worker.shutdown()
    run.cancel()
    assert run.status() == FlowStatus.CANCELLED
    assert status_of(storage, child_tid) == FlowStatus.COMPENSATING
    assert nodes_of(storage, child_tid)["compensate:pay"].status == NodeStatus.PENDING


def test_an_event_for_a_compensating_run_is_refused_not_lost(
    storage: Storage, unique: Names
) -> None:
    """A run waiting for an event whose parallel sibling fails it for good is
    COMPENSATING: an event sent then is refused (EventRefused saying the run is undoing
    its steps), not stored for a wait that will never run again."""
    tid = unique("t")
    release = threading.Event()

    def slow_undo(_ctx: Any) -> None:
        assert release.wait(timeout=30), "the test never let the compensation end"

    flow = Flow(unique("approve"), storage=storage).step("a", lambda ctx: 1, compensate=slow_undo)
    with flow.parallel():
        flow.wait_for("approval")
        flow.step("boom", declined)
    flow.run({}, tracking_id=tid)
    worker = threading.Thread(target=run_to_idle, args=(storage, 2))
    worker.start()
    try:
        eventually(lambda: status_of(storage, tid) == FlowStatus.COMPENSATING)
        with pytest.raises(EventRefused, match=r"COMPENSATING.*undoing"):
            send_event(tid, "approval", {"ok": True}, storage=storage)
    finally:
        release.set()
        worker.join(timeout=60)
    assert status_of(storage, tid) == FlowStatus.FAILED

"""The rules of a run's life at their edges, on every backend (memory, sqlite, postgresql, mysql).

Lost workers are rescued without using up retries, up to max_rescues; a FAILED
run starts no new attempt; subflows cannot wait on themselves; racing retries
are told what happened; prune keeps a child its parent may still need. Each
test drives real storage operations or in-process workers with real threads.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa

from flowsmith_worker import Context, Flow, FlowRun, FlowStatus, NodeStatus, StepFailed, Worker
from flowsmith_worker.decorators import step, workflow
from flowsmith_worker.errors import RunNotCancellable, RunNotRetryable, SubflowTaken
from flowsmith_worker.executor import Executor, Outcome
from flowsmith_worker.plan import DEFAULT_MAX_RESCUES, Plan, PlannedStep
from flowsmith_worker.progress import STOPPED_BY_FAILURE
from flowsmith_worker.storage.base import (
    RESCUE_ERROR,
    ClaimedNode,
    EnqueueResult,
    NewFlow,
    NodeRecord,
    Storage,
)
from flowsmith_worker.storage.sql import SqlStorage, schema
from tests.conftest import eventually

Names = Callable[[str], str]
POLL = 0.02
ONE = (PlannedStep("only", 1),)  # a stage of one step with no retries


def raw_flow(tracking_id: str, *stages: tuple[PlannedStep, ...], flow_name: str = "raw") -> NewFlow:
    plan = Plan(stages=stages, module="tests.nowhere")
    return NewFlow(flow_name=flow_name, tracking_id=tracking_id, input={"n": 1}, plan=plan)


def claim(storage: Storage, limit: int = 10, lease: float = 30) -> list[ClaimedNode]:
    return storage.claim_nodes(worker_id="w", limit=limit, lease_seconds=lease, queues=["default"])


def nodes_of(storage: Storage, tracking_id: str) -> dict[str, NodeRecord]:
    record = storage.get_flow(tracking_id=tracking_id)
    assert record is not None
    return {n.step_name: n for n in storage.list_nodes(flow_id=record.id)}


def status_of(storage: Storage, tracking_id: str) -> FlowStatus | None:
    record = storage.get_flow(tracking_id=tracking_id)
    return None if record is None else record.status


# -- a lost worker: rescued apart from retries, up to max_rescues ----------------------


def test_a_lost_step_is_rerun_without_using_a_retry_until_max_rescues(
    storage: Storage, unique: Names
) -> None:
    """With no retries, a step whose lease expired runs again (its attempt given back);
    after max_rescues re-runs, one more loss fails it with an error saying why.
    """
    only = PlannedStep("only", max_attempts=1, max_rescues=2)
    storage.enqueue_flow(flow=raw_flow(tid := unique("t"), (only,)))
    for attempt in (1, 2):
        [node] = claim(storage, lease=0.2)
        assert (node.attempt, node.max_attempts) == (attempt, attempt)  # one real try each time
        time.sleep(0.3)
        [rescued] = storage.rescue_expired()
        assert (rescued.attempt, rescued.failed) == (attempt, False)
        assert status_of(storage, tid) == FlowStatus.RUNNING
    [third] = claim(storage, lease=0.2)
    assert third.attempt == 3
    time.sleep(0.3)
    [rescued] = storage.rescue_expired()
    assert rescued.failed
    assert claim(storage) == []
    record = storage.get_flow(tracking_id=tid)
    assert record is not None and record.status == FlowStatus.FAILED
    node = nodes_of(storage, tid)["only"]
    assert (node.status, node.attempt, node.rescues) == (NodeStatus.FAILED, 3, 3)
    for error in (record.error, node.error):
        assert error is not None and error.startswith(RESCUE_ERROR)
        assert "3 times running step 'only' (max_rescues=2)" in error
        assert "kept killing its worker" in error


def test_a_retry_gives_a_step_its_rescues_again(storage: Storage, unique: Names) -> None:
    """A step failed by the rescue limit, then retried, is rescued again on its next
    lost worker rather than failed at once (the error's advice works)."""
    only = PlannedStep("only", max_attempts=1, max_rescues=1)
    storage.enqueue_flow(flow=raw_flow(tid := unique("t"), (only,)))
    for failed in (False, True):
        claim(storage, lease=0.2)
        time.sleep(0.3)
        [rescued] = storage.rescue_expired()
        assert rescued.failed is failed
    storage.resume_flow(tracking_id=tid)
    claim(storage, lease=0.2)
    time.sleep(0.3)
    [rescued] = storage.rescue_expired()
    assert rescued.failed is False
    assert status_of(storage, tid) == FlowStatus.RUNNING


def test_a_rescued_step_still_has_its_retries(storage: Storage, unique: Names) -> None:
    """A rescue and a failure are counted apart: after one rescue, retries=1 still allows
    a retry of the next attempt's failure, and the flow completes.
    """
    only = PlannedStep("only", max_attempts=2)
    storage.enqueue_flow(flow=raw_flow(tid := unique("t"), (only,)))
    claim(storage, lease=0.2)
    time.sleep(0.3)
    assert [r.failed for r in storage.rescue_expired()] == [False]
    [second] = claim(storage)
    assert storage.fail_node(lease=second.lease, error="boom", retry_delay=0)
    [third] = claim(storage)
    assert (third.attempt, third.max_attempts) == (3, 3)
    assert storage.complete_node(lease=third.lease, output="done")
    assert status_of(storage, tid) == FlowStatus.COMPLETED


def test_max_rescues_is_a_step_option_stored_in_the_plan(unique: Names) -> None:
    """Flow.step, Flow.subflow, @step and @subflow take max_rescues (default 3); plans
    stored before it existed read as the default; bad values are refused at definition.
    """
    flow = Flow(unique("f")).step("a", lambda ctx: 1, max_rescues=0).step("b", lambda ctx: 2)
    flow.subflow("c", flow, tracking_id="c-{tracking_id}", max_rescues=5)

    @workflow(unique("w"))
    def decorated() -> None:
        @step(max_rescues=7)
        def d(ctx: Context) -> int:
            return 1

    plan = Plan.from_json(flow.plan().to_json())
    assert [s.max_rescues for stage in plan.stages for s in stage] == [0, DEFAULT_MAX_RESCUES, 5]
    assert decorated.flow.plan().stage(0)[0].max_rescues == 7
    old = '{"module": "m", "stages": [[{"name": "a", "max_attempts": 2, "subflow": false}]]}'
    assert Plan.from_json(old).stage(0) == (PlannedStep("a", 2, False, DEFAULT_MAX_RESCUES),)
    with pytest.raises(ValueError, match="max_rescues=-1 cannot be negative"):
        Flow(unique("f")).step("a", lambda ctx: 1, max_rescues=-1)
    with pytest.raises(TypeError, match="max_rescues=True is not a count"):
        Flow(unique("f")).step("a", lambda ctx: 1, max_rescues=True)


# -- a FAILED run starts no new attempt -------------------------------------------------


def test_a_failed_run_stops_its_siblings_and_a_retry_requeues_them(
    storage: Storage, unique: Names
) -> None:
    """A parallel group of four: `a` fails for good while `b` waits for its retry, `c`
    runs and `d` was never claimed. The run FAILS; nothing more can be claimed; `c`
    failing afterwards is recorded but not retried and the run keeps `a`'s error; the
    trace says `b` and `d` were stopped. `flowsmith retry` re-queues all four.
    """
    group = tuple(PlannedStep(name, max_attempts=5) for name in "bcd")
    storage.enqueue_flow(
        flow=raw_flow(tid := unique("t"), (PlannedStep("a", 1), *group), flow_name="group")
    )
    claimed = {n.step_name: n for n in claim(storage, limit=3)}
    assert sorted(claimed) == ["a", "b", "c"]
    assert storage.fail_node(lease=claimed["b"].lease, error="b: 503", retry_delay=0)
    assert storage.fail_node(lease=claimed["a"].lease, error="a: broken", retry_delay=None)
    assert claim(storage) == []
    assert storage.fail_node(lease=claimed["c"].lease, error="c: late", retry_delay=0)
    assert claim(storage) == []
    record = storage.get_flow(tracking_id=tid)
    assert record is not None and (record.status, record.error) == (FlowStatus.FAILED, "a: broken")
    nodes = nodes_of(storage, tid)
    assert {name: n.status for name, n in nodes.items()} == {
        "a": NodeStatus.FAILED,
        "b": NodeStatus.CANCELLED,
        "c": NodeStatus.FAILED,
        "d": NodeStatus.CANCELLED,
    }
    assert nodes["b"].error == f"b: 503\n{STOPPED_BY_FAILURE}"
    assert nodes["d"].error == STOPPED_BY_FAILURE
    assert (nodes["c"].error, nodes["c"].attempt) == ("c: late", 1)

    assert storage.resume_flow(tracking_id=tid).resumed
    again = {n.step_name: n for n in claim(storage)}
    assert sorted(again) == ["a", "b", "c", "d"]
    for node in again.values():
        assert storage.complete_node(lease=node.lease, output=node.step_name)
    record = storage.get_flow(tracking_id=tid)
    assert record is not None and record.status == FlowStatus.COMPLETED
    assert record.output == {"n": 1, "a": "a", "b": "b", "c": "c", "d": "d"}


def test_wait_names_the_step_that_failed_the_run_not_the_first_in_plan_order(
    storage: Storage, unique: Names
) -> None:
    """In a group `a`, `b`, `b` fails first and fails the run; `a`, already running,
    fails after it (recorded, not retried). wait() reports `b`'s failure, the one that
    failed the run, although `a` comes first in the plan.
    """
    group = (PlannedStep("a", 1), PlannedStep("b", 1))
    storage.enqueue_flow(flow=raw_flow(tid := unique("t"), group, flow_name="group"))
    claimed = {n.step_name: n for n in claim(storage)}
    assert storage.fail_node(lease=claimed["b"].lease, error="b: broken", retry_delay=None)
    assert storage.fail_node(lease=claimed["a"].lease, error="a: late", retry_delay=None)
    assert {n.status for n in nodes_of(storage, tid).values()} == {NodeStatus.FAILED}
    with pytest.raises(StepFailed) as failed:
        FlowRun(storage, "group", tid).wait(timeout=1)
    assert (failed.value.step, failed.value.error) == ("b", "b: broken")


def test_a_failed_run_ends_a_lost_or_released_sibling_instead_of_requeueing_it(
    storage: Storage, unique: Names
) -> None:
    """A sibling whose worker died, or that a stopping worker hands back, after its run
    FAILED is not handed to anyone: it is stopped, and a retry runs it again.
    """
    group = (PlannedStep("a", 1), PlannedStep("lost", 2), PlannedStep("released", 2))
    storage.enqueue_flow(flow=raw_flow(tid := unique("t"), group))
    claimed = {n.step_name: n for n in claim(storage, lease=0.3)}
    assert storage.fail_node(lease=claimed["a"].lease, error="a: broken", retry_delay=None)
    assert storage.release_nodes(leases=[claimed["released"].lease]) == 1
    time.sleep(0.4)
    [rescued] = storage.rescue_expired()
    assert (rescued.step_name, rescued.failed) == ("lost", False)
    assert claim(storage) == []
    nodes = nodes_of(storage, tid)
    assert nodes["lost"].status == nodes["released"].status == NodeStatus.CANCELLED
    assert nodes["lost"].error == f"{RESCUE_ERROR}\n{STOPPED_BY_FAILURE}"
    assert nodes["released"].error == STOPPED_BY_FAILURE
    storage.resume_flow(tracking_id=tid)
    assert sorted(n.step_name for n in claim(storage)) == ["a", "lost", "released"]


def test_a_run_with_an_unreadable_status_does_not_stop_the_rescue_of_others(
    storage: Storage, unique: Names
) -> None:
    """A lost step whose run's stored status this version cannot read is rescued like
    that of a run that is not over (as a failure or a completion of it is written), and
    the rescue goes on to the lost steps behind it: before, one such run raised in
    every rescue pass, and no lost step anywhere was rescued again.
    """
    storage.enqueue_flow(flow=raw_flow(corrupt := unique("corrupt"), ONE))
    [first] = claim(storage, lease=0.2)
    storage.enqueue_flow(flow=raw_flow(unique("fine"), ONE))
    [second] = claim(storage, lease=0.3)
    assert isinstance(storage, SqlStorage)
    with storage.engine.begin() as conn:
        conn.execute(
            sa.update(schema.flows)
            .where(schema.flows.c.tracking_id == corrupt)
            .values(status="EXPLODED")
        )
    time.sleep(0.4)
    rescued = storage.rescue_expired()
    assert [(r.node_id, r.failed) for r in rescued] == [
        (first.node_id, False),
        (second.node_id, False),
    ]
    assert nodes_of(storage, corrupt)["only"].status == NodeStatus.PENDING


def test_a_failing_parallel_sibling_stops_the_others_with_real_workers(
    storage: Storage, unique: Names
) -> None:
    """Worker threads run a group where `boom` fails at once, `flaky` (retries=5) fails
    after the run has FAILED, and `never` has no free slot. Neither is run again, so the
    worker goes idle; re-triggering the run runs all three, each once more.
    """
    calls: Counter[str] = Counter()
    broken = {"boom": True, "flaky": True}
    tid = unique("t")

    def boom(ctx: Context) -> str:
        calls["boom"] += 1
        if broken["boom"]:
            raise RuntimeError("boom")
        return "boom"

    def flaky(ctx: Context) -> str:
        calls["flaky"] += 1
        if broken["flaky"]:
            eventually(lambda: status_of(storage, tid) == FlowStatus.FAILED)
            raise ConnectionError("503")
        return "flaky"

    def never(ctx: Context) -> str:
        calls["never"] += 1
        return "never"

    flow = Flow(unique("group"), storage)
    with flow.parallel():
        flow.step("boom", boom)
        flow.step("flaky", flaky, retries=5, backoff=0)
        flow.step("never", never)
    run = flow.run({}, tracking_id=tid)
    worker = Worker(storage, concurrency=2, poll_interval=POLL)
    worker.run_until_idle(timeout=30)
    with pytest.raises(StepFailed, match="boom"):
        run.wait(timeout=1)
    assert calls == Counter(boom=1, flaky=1)
    nodes = nodes_of(storage, tid)
    assert nodes["flaky"].status == NodeStatus.FAILED and "503" in (nodes["flaky"].error or "")
    assert nodes["never"].status == NodeStatus.CANCELLED

    broken.update(boom=False, flaky=False)
    flow.run({}, tracking_id=tid)
    worker.run_until_idle(timeout=30)
    assert run.wait(timeout=5) == {"boom": "boom", "flaky": "flaky", "never": "never"}
    assert calls == Counter(boom=2, flaky=2, never=1)


def test_a_subflow_step_of_a_failed_run_starts_no_child(storage: Storage, unique: Names) -> None:
    """A subflow step whose run failed while its function ran does not start its child,
    and a child failing after its parent's run FAILED does not retry the parent step.
    """
    group = (PlannedStep("a", 1), PlannedStep("sub", 1, subflow=True))
    group_with_retry = (PlannedStep("a2", 1), PlannedStep("sub2", 3, subflow=True))
    storage.enqueue_flow(flow=raw_flow(late := unique("late"), group))
    storage.enqueue_flow(flow=raw_flow(waiting := unique("waiting"), group_with_retry))
    claimed = {n.step_name: n for n in claim(storage)}
    assert storage.fail_node(lease=claimed["a"].lease, error="a: broken", retry_delay=None)
    child = raw_flow(unique("child"), ONE)
    assert storage.start_subflow(lease=claimed["sub"].lease, child=child) == NodeStatus.CANCELLED
    assert storage.get_flow(tracking_id=child.tracking_id) is None
    assert nodes_of(storage, late)["sub"].status == NodeStatus.CANCELLED

    child2 = raw_flow(unique("child"), ONE)
    assert storage.start_subflow(lease=claimed["sub2"].lease, child=child2) == NodeStatus.WAITING
    assert storage.fail_node(lease=claimed["a2"].lease, error="a2: broken", retry_delay=None)
    [child_node] = claim(storage)
    assert storage.fail_node(lease=child_node.lease, error="child: broken", retry_delay=None)
    sub2 = nodes_of(storage, waiting)["sub2"]
    assert (sub2.status, sub2.attempt) == (NodeStatus.FAILED, 1)
    record = storage.get_flow(tracking_id=waiting)
    assert record is not None and record.error == "a2: broken"
    assert claim(storage) == []


def test_a_subflow_step_of_a_cancelled_run_starts_no_child_and_keeps_no_lease(
    storage: Storage, unique: Names
) -> None:
    """A subflow step whose run was cancelled while its function ran starts no child and
    ends CANCELLED as every ended node does, with no lease expiry left on it (it kept
    the expiry of its attempt's lease before).
    """
    sub = PlannedStep("sub", 1, subflow=True)
    storage.enqueue_flow(flow=raw_flow(tid := unique("t"), (sub,)))
    [claimed] = claim(storage)
    storage.cancel_flow(tracking_id=tid)
    child = raw_flow(unique("child"), ONE)
    assert storage.start_subflow(lease=claimed.lease, child=child) == NodeStatus.CANCELLED
    assert storage.get_flow(tracking_id=child.tracking_id) is None
    node = nodes_of(storage, tid)["sub"]
    assert (node.status, node.lease_expires_at) == (NodeStatus.CANCELLED, None)


def test_a_subflow_step_its_failed_run_stopped_is_logged_as_stopped_not_waiting(
    storage: Storage, unique: Names, logs: list[dict[str, Any]]
) -> None:
    """Worker threads run a group where `boom` fails the run while `sub`'s function is
    still choosing its child: `sub` starts no child and ends CANCELLED, and the worker
    logs `step.stopped` for it, not `step.waiting` (no child exists to wait for).
    """
    tid = unique("t")
    child = Flow(unique("child"), storage).step("c", lambda ctx: "c")

    def boom(ctx: Context) -> None:
        raise RuntimeError("boom")

    def child_id(ctx: Context) -> str:
        eventually(lambda: status_of(storage, tid) == FlowStatus.FAILED)
        return f"{tid}:child"

    flow = Flow(unique("group"), storage)
    with flow.parallel():
        flow.step("boom", boom)
        flow.subflow("sub", child, tracking_id=child_id)
    flow.run({}, tracking_id=tid)
    Worker(storage, concurrency=2, poll_interval=POLL).run_until_idle(timeout=30)
    events = [e["event"] for e in logs if e.get("step") == "sub" and e["event"] != "step.claimed"]
    assert events == ["step.started", "subflow.starting", "step.stopped"]
    assert nodes_of(storage, tid)["sub"].status == NodeStatus.CANCELLED
    assert storage.get_flow(tracking_id=f"{tid}:child") is None


# -- subflow cycles ---------------------------------------------------------------------


def test_a_subflow_naming_its_own_run_fails_at_once_naming_the_cycle(
    storage: Storage, unique: Names
) -> None:
    """`tracking_id="{tracking_id}"` of the same flow would wait for itself: the step
    fails on its first attempt (no retry), and so does the run.
    """
    flow = Flow(unique("selfish"), storage)
    flow.subflow("again", flow, tracking_id="{tracking_id}", retries=2)
    run = flow.run({}, tracking_id=(tid := unique("t")))
    Worker(storage, concurrency=1, poll_interval=POLL).run_until_idle(timeout=30)
    assert run.status() == FlowStatus.FAILED
    node = nodes_of(storage, tid)["again"]
    assert (node.status, node.attempt) == (NodeStatus.FAILED, 1)
    assert f"subflow cycle {tid!r} -> {tid!r}" in (node.error or "")


def test_a_subflow_naming_an_ancestor_fails_naming_the_cycle(
    storage: Storage, unique: Names
) -> None:
    """top -> mid -> top again: the grandchild step fails at once with the whole cycle,
    and the failure climbs to the top run; nothing is left waiting.
    """
    top = Flow(unique("top"), storage)
    mid = Flow(unique("mid"), storage)
    mid.subflow("back", top, tracking_id="{root}")
    top.subflow("down", mid)
    run = top.run({"root": (tid := unique("t"))}, tracking_id=tid)
    Worker(storage, concurrency=1, poll_interval=POLL).run_until_idle(timeout=30)
    with pytest.raises(StepFailed) as failed:
        run.wait(timeout=1)
    assert f"subflow cycle {tid!r} -> '{tid}:down' -> {tid!r}" in failed.value.error
    assert status_of(storage, f"{tid}:down") == FlowStatus.FAILED
    assert nodes_of(storage, f"{tid}:down")["back"].attempt == 1
    assert storage.count_open_nodes(queues=["default"]) == 0


# -- typed refusals and racing retries ---------------------------------------------------


def failed_run(storage: Storage, tracking_id: str) -> None:
    storage.enqueue_flow(flow=raw_flow(tracking_id, ONE))
    [node] = claim(storage)
    assert storage.fail_node(lease=node.lease, error="boom", retry_delay=None)


def test_racing_retries_one_wins_the_others_are_told_it_is_being_retried(
    storage: Storage, unique: Names
) -> None:
    """Eight threads retry one FAILED run at once: one re-queues it; every other is refused
    with RunNotRetryable, never told that the run "is FAILED".
    """
    failed_run(storage, tid := unique("t"))
    barrier = threading.Barrier(8)
    outcomes: list[Any] = []

    def retry() -> None:
        barrier.wait()
        try:
            outcomes.append(storage.resume_flow(tracking_id=tid))
        except RunNotRetryable as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=retry) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    refused = [str(o) for o in outcomes if isinstance(o, RunNotRetryable)]
    assert len(outcomes) == 8 and len(refused) == 7
    for message in refused:
        assert "is FAILED" not in message
        assert "already being retried" in message or "is RUNNING" in message


def test_racing_triggers_of_a_failed_run_one_resumes_the_others_see_it_running(
    storage: Storage, unique: Names
) -> None:
    """Eight threads trigger one FAILED run again at once (flow.run with its tracking_id):
    exactly one resumes it, and every other is answered with the run's status as it is
    now, RUNNING, never the FAILED it may have read before the winner committed.
    """
    failed_run(storage, tid := unique("t"))
    barrier = threading.Barrier(8)
    results: list[EnqueueResult] = []

    def trigger() -> None:
        barrier.wait()
        results.append(storage.enqueue_flow(flow=raw_flow(tid, ONE)))

    threads = [threading.Thread(target=trigger) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(results) == 8 and sum(r.resumed for r in results) == 1, results
    assert {r.status for r in results} == {FlowStatus.RUNNING}, results


def test_cancel_and_retry_refuse_with_typed_errors(storage: Storage, unique: Names) -> None:
    """The refusals are their own types, with messages saying what to do."""
    failed_run(storage, tid := unique("t"))
    with pytest.raises(RunNotCancellable, match="is FAILED: only a pending or running run"):
        storage.cancel_flow(tracking_id=tid)
    storage.resume_flow(tracking_id=tid)
    [node] = claim(storage)
    storage.complete_node(lease=node.lease, output=1)
    with pytest.raises(RunNotRetryable, match="is COMPLETED: only a FAILED run can be retried"):
        storage.resume_flow(tracking_id=tid)
    storage.enqueue_flow(flow=raw_flow(child := unique("c"), ONE))
    for _ in range(2):
        storage.enqueue_flow(flow=raw_flow(unique("p"), (PlannedStep("sub", 1, subflow=True),)))
    first, second = (n for n in claim(storage) if n.step_name == "sub")
    assert storage.start_subflow(lease=first.lease, child=raw_flow(child, ONE))
    with pytest.raises(SubflowTaken, match="already the subflow of another step"):
        storage.start_subflow(lease=second.lease, child=raw_flow(child, ONE))


# -- prune keeps a child its parent may still need ---------------------------------------


def test_prune_keeps_a_child_whose_parent_step_will_run_again(
    storage: Storage, unique: Names
) -> None:
    """A child FAILED, its parent step has a retry left: prune must not delete the child,
    or the retry would start a new one and re-run the child's completed steps.
    """
    parent = raw_flow(ptid := unique("p"), (PlannedStep("sub", 2, subflow=True),))
    child = raw_flow(ctid := unique("c"), (PlannedStep("one", 1),), (PlannedStep("two", 1),))
    storage.enqueue_flow(flow=parent)
    [sub] = claim(storage)
    assert storage.start_subflow(lease=sub.lease, child=child)
    [one] = claim(storage)
    assert storage.complete_node(lease=one.lease, output="one done")
    [two] = claim(storage)
    assert storage.fail_node(lease=two.lease, error="two: broken", retry_delay=None)
    assert status_of(storage, ctid) == FlowStatus.FAILED
    assert status_of(storage, ptid) == FlowStatus.RUNNING  # its step is queued again
    time.sleep(0.05)
    assert storage.prune_flows(older_than_seconds=0.01) == 0

    [sub_again] = claim(storage)
    assert storage.start_subflow(lease=sub_again.lease, child=child)
    [two_again] = claim(storage)
    assert two_again.step_name == "two"  # `one` keeps its output and does not run again
    assert storage.complete_node(lease=two_again.lease, output="two done")
    assert nodes_of(storage, ctid)["one"].attempt == 1
    assert status_of(storage, ptid) == FlowStatus.COMPLETED


def test_prune_deletes_a_finished_run_with_its_subflows(storage: Storage, unique: Names) -> None:
    """A finished parent and its finished child are deleted together."""
    parent = raw_flow(ptid := unique("p"), (PlannedStep("sub", 1, subflow=True),))
    storage.enqueue_flow(flow=parent)
    [sub] = claim(storage)
    assert storage.start_subflow(lease=sub.lease, child=raw_flow(ctid := unique("c"), ONE))
    [only] = claim(storage)
    assert storage.complete_node(lease=only.lease, output="done")
    assert status_of(storage, ptid) == FlowStatus.COMPLETED
    time.sleep(0.05)
    assert storage.prune_flows(older_than_seconds=0.01) == 2
    assert status_of(storage, ptid) is None and status_of(storage, ctid) is None


def test_a_sibling_failing_after_its_run_failed_is_logged_as_failed_not_retried(
    storage: Storage, unique: Names, logs: list[dict[str, Any]]
) -> None:
    """A step with retries left whose run a sibling has already FAILED gets no retry,
    and the executor says what the storage did: step.failed, never step.retry_scheduled.
    """

    def broken(ctx: Context) -> str:
        raise RuntimeError(f"{ctx.step}: broken")

    flow = Flow(unique("f"), storage=storage)
    with flow.parallel():
        flow.step("first", broken)
        flow.step("second", broken, retries=3)
    run = flow.run({}, tracking_id=unique("t"))
    claimed = {n.step_name: n for n in claim(storage)}
    executor = Executor(storage, worker_id="w")
    assert executor.execute(claimed["first"]) == Outcome.FAILED
    assert executor.execute(claimed["second"]) == Outcome.FAILED
    events = [(line["event"], line.get("step")) for line in logs if "step" in line]
    assert ("step.retry_scheduled", "second") not in events
    assert ("step.failed", "second") in events
    assert nodes_of(storage, run.tracking_id)["second"].status == NodeStatus.FAILED
    assert claim(storage) == []

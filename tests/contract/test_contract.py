"""The contract of engine and storage, on every backend: memory, sqlite, postgresql, mysql.

Each test drives real storage operations (and in-process workers with real
threads); none of them mocks the database.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from flowsmith_worker import (
    Context,
    Flow,
    FlowAlreadyCompleted,
    FlowSmithError,
    FlowStatus,
    NodeStatus,
    StepFailed,
    Worker,
    fixed,
    start_watchdog,
)
from flowsmith_worker.plan import Plan, PlannedStep
from flowsmith_worker.storage.base import RESCUE_ERROR, ClaimedNode, NewFlow, Storage
from tests.conftest import eventually

Names = Callable[[str], str]


def one_step_flow(storage: Storage, name: str, fn: Callable[[Context], Any], **kw: Any) -> Flow:
    return Flow(name, storage=storage).step("only", fn, **kw)


def new_flow(tracking_id: str, flow_name: str = "raw", max_attempts: int = 1) -> NewFlow:
    plan = Plan(stages=((PlannedStep("only", max_attempts),),), module="tests.nowhere")
    return NewFlow(flow_name=flow_name, tracking_id=tracking_id, input={"n": 1}, plan=plan)


def drain(storage: Storage, timeout: float = 20.0, **kw: Any) -> Worker:
    worker = Worker(storage=storage, poll_interval=0.05, **kw)
    worker.run_until_idle(timeout=timeout)
    return worker


# -- running and the idempotent trigger ---------------------------------------------


def test_steps_run_in_order_and_ctx_data_collects_outputs(storage: Storage, unique: Names) -> None:
    """Each step sees the input plus the outputs of the steps before it; wait() returns them."""
    seen: list[dict[str, Any]] = []

    def record(value: Any) -> Callable[[Context], Any]:
        def fn(ctx: Context) -> Any:
            seen.append(dict(ctx.data))
            return value

        return fn

    flow = Flow(unique("order"), storage=storage)
    flow.step("a", record({"x": 1})).step("b", record([1, "two"])).step("c", record(None))
    run = flow.run(Context({"order_id": 7}), tracking_id=unique("t"))
    drain(storage)
    assert run.wait(timeout=5) == {"order_id": 7, "a": {"x": 1}, "b": [1, "two"], "c": None}
    assert seen == [
        {"order_id": 7},
        {"order_id": 7, "a": {"x": 1}},
        {"order_id": 7, "a": {"x": 1}, "b": [1, "two"]},
    ]
    assert run.status() == FlowStatus.COMPLETED
    assert [(n.step_name, n.status, n.attempt) for n in run.trace()] == [
        ("a", NodeStatus.COMPLETED, 1),
        ("b", NodeStatus.COMPLETED, 1),
        ("c", NodeStatus.COMPLETED, 1),
    ]


def test_same_tracking_id_while_pending_returns_the_existing_run(
    storage: Storage, unique: Names
) -> None:
    """A second trigger with the same tracking_id enqueues nothing new."""
    flow = one_step_flow(storage, unique("f"), lambda ctx: 1)
    tid = unique("t")
    first = flow.run({"a": 1}, tracking_id=tid)
    second = flow.run({"a": 2}, tracking_id=tid)
    assert first.tracking_id == second.tracking_id
    assert len(first.trace()) == 1
    drain(storage)
    assert second.wait(5) == {"a": 1, "only": 1}


def test_failed_flow_resumes_at_the_failed_step_only(storage: Storage, unique: Names) -> None:
    """Re-triggering a FAILED run re-runs the failed step, never the completed ones."""
    calls = {"a": 0, "b": 0}
    broken = {"b": True}

    def a(ctx: Context) -> str:
        calls["a"] += 1
        return "a-done"

    def b(ctx: Context) -> str:
        calls["b"] += 1
        if broken["b"]:
            raise RuntimeError("payment API down")
        return "b-done"

    flow = Flow(unique("resume"), storage=storage).step("a", a).step("b", b)
    tid = unique("t")
    run = flow.run({}, tracking_id=tid)
    drain(storage)
    with pytest.raises(StepFailed) as failed:
        run.wait(5)
    assert (failed.value.step, failed.value.attempts) == ("b", 1)
    assert "payment API down" in failed.value.error
    broken["b"] = False
    flow.run({}, tracking_id=tid)
    drain(storage)
    assert run.wait(5) == {"a": "a-done", "b": "b-done"}
    assert calls == {"a": 1, "b": 2}


def test_completed_tracking_id_raises_flow_already_completed(
    storage: Storage, unique: Names
) -> None:
    flow = one_step_flow(storage, unique("f"), lambda ctx: 1)
    tid = unique("t")
    flow.run({}, tracking_id=tid)
    drain(storage)
    with pytest.raises(FlowAlreadyCompleted, match=tid):
        flow.run({}, tracking_id=tid)


# -- retries, backoff, timeouts ------------------------------------------------------


def test_retries_n_allow_n_plus_one_attempts(storage: Storage, unique: Names) -> None:
    calls: list[int] = []

    def always_fails(ctx: Context) -> None:
        calls.append(ctx.attempt)
        raise ValueError(f"attempt {ctx.attempt} failed")

    run = one_step_flow(storage, unique("f"), always_fails, retries=2, backoff=0).run(
        {}, tracking_id=unique("t")
    )
    drain(storage)
    with pytest.raises(StepFailed) as failed:
        run.wait(5)
    assert calls == [1, 2, 3]
    assert failed.value.attempts == 3
    assert "attempt 3 failed" in failed.value.error


def test_a_retry_waits_for_its_backoff_in_the_database(storage: Storage, unique: Names) -> None:
    """The retry is a stored run_after: nothing can claim the node before it."""
    storage.enqueue_flow(flow=new_flow(unique("t"), max_attempts=2))
    [node] = storage.claim_nodes(worker_id="w1", limit=5, lease_seconds=30, queues=["default"])
    assert storage.fail_node(lease=node.lease, error="boom", retry_delay=0.6)
    assert storage.claim_nodes(worker_id="w1", limit=5, lease_seconds=30, queues=["default"]) == []
    retried = eventually(
        lambda: storage.claim_nodes(worker_id="w2", limit=5, lease_seconds=30, queues=["default"]),
        timeout=5,
    )
    assert [n.attempt for n in retried] == [2]


def test_a_step_past_its_timeout_fails_the_attempt_and_is_retried(
    storage: Storage, unique: Names
) -> None:
    """The first attempt runs past its timeout: it keeps its slot until it returns, its
    result is dropped and the attempt fails with StepTimeout; only then does the retry
    start, and its result is the step's output. Nothing of the first attempt is left
    running once the worker is idle.
    """
    events: list[str] = []

    def slow_first_time(ctx: Context) -> str:
        events.append(f"start {ctx.attempt}")
        if ctx.attempt == 1:
            time.sleep(0.6)
        events.append(f"end {ctx.attempt}")
        return f"attempt {ctx.attempt}"

    flow = one_step_flow(storage, unique("f"), slow_first_time, retries=1, timeout=0.2, backoff=0)
    run = flow.run({}, tracking_id=unique("t"))
    drain(storage)
    assert events == ["start 1", "end 1", "start 2", "end 2"]
    assert run.wait(1)["only"] == "attempt 2"
    [node] = run.trace()
    assert node.attempt == 2 and node.error is not None and "StepTimeout" in node.error


def test_backoff_strategies_are_validated_when_the_step_is_defined(unique: Names) -> None:
    flow = Flow(unique("f"))
    with pytest.raises(TypeError, match="tenacity wait strategy"):
        flow.step("a", lambda ctx: 1, backoff="soon")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="negative"):
        flow.step("b", lambda ctx: 1, retries=-1)
    flow.step("c", lambda ctx: 1, backoff=fixed(1))


# -- leases, fencing and rescue ------------------------------------------------------


def test_a_worker_that_lost_its_lease_cannot_overwrite_the_newer_attempt(
    storage: Storage, unique: Names
) -> None:
    """The fencing token: node id, worker id and attempt must all match."""
    storage.enqueue_flow(flow=new_flow(tid := unique("t"), max_attempts=3))
    [old] = storage.claim_nodes(worker_id="old", limit=1, lease_seconds=0.2, queues=["default"])
    time.sleep(0.4)
    [rescued] = storage.rescue_expired()
    assert (rescued.step_name, rescued.attempt, rescued.failed) == ("only", 1, False)
    [new] = storage.claim_nodes(worker_id="new", limit=1, lease_seconds=30, queues=["default"])
    assert new.attempt == 2
    assert storage.complete_node(lease=old.lease, output="stale") is False
    assert storage.fail_node(lease=old.lease, error="stale", retry_delay=None) is None
    assert storage.extend_leases(leases=[old.lease], lease_seconds=30) == 0
    assert storage.complete_node(lease=new.lease, output="fresh") is True
    record = storage.get_flow(tracking_id=tid)
    assert record is not None and record.status == FlowStatus.COMPLETED
    assert record.output == {"n": 1, "only": "fresh"}
    [node] = storage.list_nodes(flow_id=record.id)
    assert (node.attempt, node.rescues, node.lease_owner) == (2, 1, "new")


def relapsed(storage: Storage, tracking_id: str) -> tuple[ClaimedNode, ClaimedNode]:
    """Attempt 1 of a node, its lease lapsed and rescued, and attempt 2 of it leased
    again to the same worker (as another slot of that worker would claim it)."""
    storage.enqueue_flow(flow=new_flow(tracking_id, max_attempts=3))
    [old] = storage.claim_nodes(worker_id="w", limit=1, lease_seconds=-1.0, queues=["default"])
    [rescued] = storage.rescue_expired()
    assert rescued.node_id == old.node_id
    [new] = storage.claim_nodes(worker_id="w", limit=1, lease_seconds=30, queues=["default"])
    assert (new.node_id, new.attempt) == (old.node_id, 2)
    return old, new


def test_a_stale_release_by_the_same_worker_leaves_the_newer_attempt_running(
    storage: Storage, unique: Names
) -> None:
    """A hand-back of attempt 1 after its node was rescued and leased again to the same
    worker (attempt 2, another slot) releases nothing: attempt 2 stays RUNNING, so no
    other worker runs the step a second time beside it."""
    old, new = relapsed(storage, tid := unique("t"))
    assert storage.release_nodes(leases=[old.lease]) == 0
    assert (
        storage.claim_nodes(worker_id="other", limit=1, lease_seconds=30, queues=["default"]) == []
    )
    [node] = storage.list_nodes(flow_id=new.lease.flow_id)
    assert (node.status, node.attempt, node.lease_owner) == (NodeStatus.RUNNING, 2, "w")
    assert storage.complete_node(lease=new.lease, output="once") is True
    record = storage.get_flow(tracking_id=tid)
    assert record is not None and record.status == FlowStatus.COMPLETED


def test_a_stale_heartbeat_by_the_same_worker_does_not_extend_the_newer_attempt(
    storage: Storage, unique: Names
) -> None:
    """Extending attempt 1's lease after its node was leased again to the same worker
    (attempt 2) extends nothing; attempt 2's own lease is extended."""
    old, new = relapsed(storage, unique("t"))
    assert storage.extend_leases(leases=[old.lease], lease_seconds=30) == 0
    assert storage.extend_leases(leases=[old.lease, new.lease], lease_seconds=30) == 1


def test_rescue_fails_the_flow_when_no_rescue_is_left(storage: Storage, unique: Names) -> None:
    """With max_rescues=0 a lost worker fails the step at once; nothing is rescued twice."""
    plan = Plan(stages=((PlannedStep("only", 1, max_rescues=0),),), module="tests.nowhere")
    storage.enqueue_flow(flow=NewFlow("raw", tid := unique("t"), {}, plan))
    storage.claim_nodes(worker_id="dead", limit=1, lease_seconds=0.2, queues=["default"])
    time.sleep(0.4)
    [rescued] = storage.rescue_expired()
    assert rescued.failed
    record = storage.get_flow(tracking_id=tid)
    assert record is not None and record.status == FlowStatus.FAILED
    assert record.error is not None and record.error.startswith(RESCUE_ERROR)
    assert storage.rescue_expired() == []  # nothing rescued twice


def test_heartbeat_keeps_a_long_step_from_being_rescued(storage: Storage, unique: Names) -> None:
    storage.enqueue_flow(flow=new_flow(unique("t")))
    [node] = storage.claim_nodes(worker_id="alive", limit=1, lease_seconds=0.5, queues=["default"])
    for _ in range(4):
        time.sleep(0.25)
        assert storage.extend_leases(leases=[node.lease], lease_seconds=0.5) == 1
    assert storage.rescue_expired() == []
    assert storage.complete_node(lease=node.lease, output=1)


def test_released_nodes_are_claimable_at_once_without_using_up_a_retry(
    storage: Storage, unique: Names
) -> None:
    """A release (shutdown) hands the node back now; its attempt is added back to the allowance."""
    storage.enqueue_flow(flow=new_flow(unique("t"), max_attempts=1))
    [node] = storage.claim_nodes(
        worker_id="leaving", limit=1, lease_seconds=300, queues=["default"]
    )
    assert storage.release_nodes(leases=[node.lease]) == 1
    [again] = storage.claim_nodes(worker_id="other", limit=1, lease_seconds=300, queues=["default"])
    assert again.node_id == node.node_id
    assert (again.attempt, again.max_attempts) == (2, 2)  # numbers grow; the retry is not spent
    assert storage.complete_node(lease=node.lease, output="late") is False


def test_racing_claimers_get_disjoint_nodes(storage: Storage, unique: Names) -> None:
    """SKIP LOCKED (BEGIN IMMEDIATE on SQLite): no node is handed to two workers."""
    for i in range(60):
        storage.enqueue_flow(flow=new_flow(unique(f"t{i}")))
    claimed: list[list[int]] = [[] for _ in range(6)]
    barrier = threading.Barrier(6)

    def claimer(slot: int) -> None:
        barrier.wait()
        while batch := storage.claim_nodes(
            worker_id=f"w{slot}", limit=3, lease_seconds=60, queues=["default"]
        ):
            claimed[slot].extend(n.node_id for n in batch)

    threads = [threading.Thread(target=claimer, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    every = [node_id for ids in claimed for node_id in ids]
    assert len(every) == 60 and len(set(every)) == 60


def test_watchdog_thread_rescues_expired_leases(storage: Storage, unique: Names) -> None:
    storage.enqueue_flow(flow=new_flow(unique("t"), max_attempts=2))
    storage.claim_nodes(worker_id="dead", limit=1, lease_seconds=0.2, queues=["default"])
    watchdog = start_watchdog(timeout_seconds=1, interval_seconds=0.1, storage=storage)
    try:
        [again] = eventually(
            lambda: storage.claim_nodes(
                worker_id="w", limit=1, lease_seconds=30, queues=["default"]
            ),
            timeout=5,
        )
    finally:
        watchdog.stop()
    assert again.attempt == 2


# -- bad input loses nothing and stops nothing ---------------------------------------


def test_output_that_is_not_json_fails_the_attempt_naming_step_and_type(
    storage: Storage, unique: Names
) -> None:
    run = one_step_flow(storage, unique("f"), lambda ctx: {1, 2}).run({}, tracking_id=unique("t"))
    drain(storage)
    with pytest.raises(StepFailed) as failed:
        run.wait(5)
    assert "step 'only' returned a set" in failed.value.error


def test_a_node_of_an_unknown_flow_fails_naming_the_flow_and_module(
    storage: Storage, unique: Names
) -> None:
    tid = unique("t")
    storage.enqueue_flow(flow=new_flow(tid, flow_name=unique("not_here")))
    drain(storage)
    record = storage.get_flow(tracking_id=tid)
    assert record is not None and record.status == FlowStatus.FAILED
    assert record.error is not None
    assert f"flow {record.flow_name!r} is not registered" in record.error
    assert "flowsmith worker tests.nowhere" in record.error


def test_a_raising_step_never_stops_the_worker(storage: Storage, unique: Names) -> None:
    def exits(ctx: Context) -> None:
        raise SystemExit("a step called sys.exit")

    bad = one_step_flow(storage, unique("bad"), exits).run({}, tracking_id=unique("t"))
    good = one_step_flow(storage, unique("good"), lambda ctx: "ok").run({}, tracking_id=unique("t"))
    drain(storage)
    with pytest.raises(StepFailed, match=r"sys\.exit"):
        bad.wait(5)
    assert good.wait(5)["only"] == "ok"


def test_step_logs_carry_flow_tracking_id_step_attempt_and_worker(
    storage: Storage, unique: Names, logs: list[dict[str, Any]]
) -> None:
    flow = one_step_flow(storage, unique("f"), lambda ctx: 1)
    flow.run({}, tracking_id=(tid := unique("t")))
    worker = drain(storage)
    step_lines = [line for line in logs if str(line["event"]).startswith("step.")]
    assert {line["event"] for line in step_lines} >= {"step.started", "step.completed"}
    for line in step_lines:
        assert (
            line["flow"],
            line["tracking_id"],
            line["step"],
            line["attempt"],
            line["worker_id"],
        ) == (flow.name, tid, "only", 1, worker.id)


# -- queues, priorities and caps -------------------------------------------------------


def queued_flow(queue: str, tracking_id: str, priority: int = 0) -> NewFlow:
    plan = Plan(stages=((PlannedStep("only", 1),),), module="tests.nowhere")
    return NewFlow("raw", tracking_id, {}, plan, queue=queue, priority=priority)


def test_workers_take_only_their_queues_in_priority_order(storage: Storage, unique: Names) -> None:
    """A lower priority number runs first; a worker never claims another queue's nodes."""
    for name, queue, priority in [
        ("late", "default", 5),
        ("mail", "emails", 0),
        ("soon", "default", 1),
    ]:
        storage.enqueue_flow(flow=queued_flow(queue, unique(name), priority))
    taken = storage.claim_nodes(worker_id="w", limit=10, lease_seconds=30, queues=["default"])
    assert [n.tracking_id.split("_")[0] for n in taken] == ["soon", "late"]
    [mail] = storage.claim_nodes(worker_id="w", limit=10, lease_seconds=30, queues=["emails"])
    assert mail.tracking_id.startswith("mail")


def test_a_queue_cap_holds_across_racing_workers(storage: Storage, unique: Names) -> None:
    """Six claimers racing over a queue capped at 3 never hold more than 3 of its nodes."""
    storage.set_queue_limit(queue="emails", max_running=3)
    assert storage.queue_limits() == {"emails": 3}
    for i in range(12):
        storage.enqueue_flow(flow=queued_flow("emails", unique(f"m{i}")))
        storage.enqueue_flow(flow=queued_flow("default", unique(f"d{i}")))
    barrier = threading.Barrier(6)
    claimed: list[Any] = []
    lock = threading.Lock()

    def claimer(slot: int) -> None:
        barrier.wait()
        got = storage.claim_nodes(
            worker_id=f"w{slot}", limit=4, lease_seconds=30, queues=["emails", "default"]
        )
        with lock:
            claimed.extend(got)

    threads = [threading.Thread(target=claimer, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    emails = [n for n in claimed if n.tracking_id.startswith("m")]
    assert len(emails) == 3
    assert len(claimed) == 3 + 12  # the uncapped queue is drained alongside
    storage.complete_node(lease=emails[0].lease, output=None)
    [next_email] = storage.claim_nodes(worker_id="w", limit=4, lease_seconds=30, queues=["emails"])
    assert next_email.tracking_id.startswith("m")
    storage.set_queue_limit(queue="emails", max_running=None)
    assert storage.queue_limits() == {}


# -- subflows, cancel, release and prune at their edges ----------------------------------


def subflow_parent(tracking_id: str) -> NewFlow:
    plan = Plan(stages=((PlannedStep("child", 1, subflow=True),),), module="tests.nowhere")
    return NewFlow("parent", tracking_id, {}, plan)


def start_parent_with_child(storage: Storage, parent_tid: str, child_tid: str) -> Any:
    """Enqueue a parent, claim its subflow node, start the child; return the parent's claim."""
    storage.enqueue_flow(flow=subflow_parent(parent_tid))
    [node] = [
        n
        for n in storage.claim_nodes(worker_id="w", limit=10, lease_seconds=30, queues=["default"])
        if n.tracking_id == parent_tid
    ]
    assert storage.start_subflow(lease=node.lease, child=new_flow(child_tid))
    return node


def test_cancelling_a_subflow_fails_its_waiting_parent(storage: Storage, unique: Names) -> None:
    """The parent step cannot finish without its child: it fails instead of waiting forever."""
    start_parent_with_child(storage, parent := unique("p"), child := unique("c"))
    storage.cancel_flow(tracking_id=child)
    record = storage.get_flow(tracking_id=parent)
    assert record is not None and record.status == FlowStatus.FAILED
    assert record.error is not None and "was cancelled" in record.error


def test_a_child_run_belongs_to_one_parent(storage: Storage, unique: Names) -> None:
    """A second parent naming the same child tracking_id fails its step; the first keeps it."""
    child = unique("shared")
    start_parent_with_child(storage, first := unique("p1"), child)
    storage.enqueue_flow(flow=subflow_parent(second := unique("p2")))
    claimed = {
        n.tracking_id: n
        for n in storage.claim_nodes(worker_id="w", limit=10, lease_seconds=30, queues=["default"])
    }
    with pytest.raises(FlowSmithError, match="already the subflow of another step"):
        storage.start_subflow(lease=claimed[second].lease, child=new_flow(child))
    assert storage.complete_node(lease=claimed[child].lease, output="done")
    record = storage.get_flow(tracking_id=first)
    assert record is not None and record.status == FlowStatus.COMPLETED


def test_a_released_node_of_a_cancelled_run_is_not_handed_on(
    storage: Storage, unique: Names
) -> None:
    storage.enqueue_flow(flow=new_flow(tid := unique("t")))
    [node] = storage.claim_nodes(worker_id="leaving", limit=1, lease_seconds=30, queues=["default"])
    storage.cancel_flow(tracking_id=tid)
    assert storage.release_nodes(leases=[node.lease]) == 1
    assert (
        storage.claim_nodes(worker_id="other", limit=1, lease_seconds=30, queues=["default"]) == []
    )
    record = storage.get_flow(tracking_id=tid)
    assert record is not None
    [ended] = storage.list_nodes(flow_id=record.id)
    assert ended.status == NodeStatus.CANCELLED


def test_a_child_finishing_after_its_parent_was_pruned_completes_quietly(
    storage: Storage, unique: Names
) -> None:
    """Retry a failed child, prune its FAILED parent meanwhile: the child still completes."""
    start_parent_with_child(storage, parent := unique("p"), child := unique("c"))
    [first] = storage.claim_nodes(worker_id="w", limit=1, lease_seconds=30, queues=["default"])
    assert storage.fail_node(lease=first.lease, error="boom", retry_delay=None)
    assert storage.get_flow(tracking_id=parent).status == FlowStatus.FAILED  # type: ignore[union-attr]
    storage.resume_flow(tracking_id=child)
    [again] = storage.claim_nodes(worker_id="w", limit=1, lease_seconds=30, queues=["default"])
    time.sleep(0.05)
    assert storage.prune_flows(older_than_seconds=0.01) == 1
    assert storage.complete_node(lease=again.lease, output="late") is True
    assert storage.get_flow(tracking_id=child).status == FlowStatus.COMPLETED  # type: ignore[union-attr]


def test_a_capped_queue_is_not_starved_by_lower_priority_work(
    storage: Storage, unique: Names
) -> None:
    storage.set_queue_limit(queue="emails", max_running=5)
    storage.enqueue_flow(flow=queued_flow("default", unique("low"), priority=9))
    storage.enqueue_flow(flow=queued_flow("emails", unique("urgent"), priority=0))
    [first] = storage.claim_nodes(
        worker_id="w", limit=1, lease_seconds=30, queues=["default", "emails"]
    )
    assert first.tracking_id.startswith("urgent")


def test_a_worker_that_reclaims_its_rescued_node_keeps_the_new_attempt_in_flight(
    storage: Storage, unique: Names
) -> None:
    """The old attempt ending must not free the new attempt's slot or stop its heartbeat."""
    release = {1: threading.Event(), 2: threading.Event()}

    def blocks(ctx: Context) -> int:
        release[ctx.attempt].wait(20)
        return ctx.attempt

    flow = one_step_flow(storage, unique("f"), blocks, retries=1)
    run = flow.run({}, tracking_id=unique("t"))
    worker = Worker(storage=storage, concurrency=2, lease_seconds=1)
    assert worker.claim_once() == 1  # attempt 1, never heartbeated: its lease runs out
    time.sleep(1.2)
    assert len(storage.rescue_expired()) == 1
    assert worker.claim_once() == 1  # the same node again: attempt 2
    release[1].set()
    eventually(lambda: [n.attempt for n in worker.in_flight()] == [2], timeout=10)
    assert worker.heartbeat_once() == 1  # attempt 2's lease is still kept
    release[2].set()
    eventually(lambda: not worker.in_flight(), timeout=10)
    assert run.wait(5)["only"] == 2


def test_a_subflow_may_adopt_a_run_started_on_its_own(storage: Storage, unique: Names) -> None:
    """The parent waits for an existing top-level run of that tracking_id and hears its end."""
    storage.enqueue_flow(flow=new_flow(child := unique("c")))
    [child_node] = storage.claim_nodes(worker_id="w", limit=1, lease_seconds=30, queues=["default"])
    start_parent_with_child(storage, parent := unique("p"), child)
    assert storage.complete_node(lease=child_node.lease, output="done")
    record = storage.get_flow(tracking_id=parent)
    assert record is not None and record.status == FlowStatus.COMPLETED


def test_a_step_finishing_after_its_run_was_pruned_is_refused_quietly(
    storage: Storage, unique: Names
) -> None:
    """Cancel lets a running step finish; if the run was pruned meanwhile, its write is refused."""
    storage.enqueue_flow(flow=new_flow(tid := unique("t")))
    [node] = storage.claim_nodes(worker_id="w", limit=1, lease_seconds=30, queues=["default"])
    storage.cancel_flow(tracking_id=tid)
    time.sleep(0.05)
    assert storage.prune_flows(older_than_seconds=0.01) == 1
    assert storage.complete_node(lease=node.lease, output="late") is False
    assert storage.fail_node(lease=node.lease, error="late", retry_delay=None) is None

"""A run keeps the plan it was enqueued with, on every backend (memory, sqlite,
postgresql, mysql), whatever code is deployed under it.

Each test enqueues a run with one definition of a flow, then "deploys" another:
the flow's name is registered again with changed steps, as a worker started on
new code would import it, and real worker threads run the run on that code.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import pytest

from flowsmith_worker import Compensation, Context, Flow, FlowStatus, StepFailed, Worker
from flowsmith_worker.flow import registry
from flowsmith_worker.storage.base import DEFAULT_QUEUE, Storage

Names = Callable[[str], str]
POLL = 0.02


def deploy(
    name: str, storage: Storage, calls: Counter[str], steps: Iterable[str], **options: Any
) -> Flow:
    """Flow ``name`` as a deploy defines it: one step per name, each counting its calls
    and returning its own name. Replaces the definition this process had."""
    registry.unregister(name)
    flow = Flow(name, storage)
    for step in steps:
        flow.step(step, _counted(calls, step), **options)
    return flow


def _counted(calls: Counter[str], step: str) -> Callable[[Context], str]:
    def run(_ctx: Context) -> str:
        calls[step] += 1
        return step

    return run


def drain(storage: Storage) -> None:
    """Run every step there is with real worker threads, on the code registered now."""
    worker = Worker(storage, poll_interval=POLL, listen=False)
    try:
        worker.run_until_idle(timeout=30)
    finally:
        worker.shutdown()


@pytest.mark.parametrize(
    "deployed", [["a", "c"], ["a", "b_renamed", "c"]], ids=["removed", "renamed"]
)
def test_a_step_missing_from_the_code_fails_the_run_naming_it_and_the_plan_version(
    storage: Storage, unique: Names, deployed: list[str]
) -> None:
    """A run enqueued with steps a, b, c meets code where b was removed or renamed: the
    run FAILS at b with an error naming b, the version of the run's plan and of the
    code, and the command to resume it (no KeyError, no traceback); c never runs. A
    retry on the same code fails the same way; once code with b is deployed again, a
    retry resumes the run at b, and a (completed) does not run again."""
    calls: Counter[str] = Counter()
    name = unique("versioned")
    enqueued = deploy(name, storage, calls, ["a", "b", "c"])
    run = enqueued.run({})
    new = deploy(name, storage, calls, deployed)
    drain(storage)

    with pytest.raises(StepFailed) as failed:
        run.wait(timeout=5)
    error = failed.value.error
    assert failed.value.step == "b"
    assert f"step 'b' of flow {name!r}" in error
    assert f"plan version {enqueued.plan().version}" in error
    assert f"plan version {new.plan().version}" in error
    assert f"`flowsmith retry {run.tracking_id}`" in error
    assert "KeyError" not in error and "Traceback" not in error
    assert calls == Counter(a=1)

    run.retry()
    drain(storage)
    with pytest.raises(StepFailed, match=f"plan version {enqueued.plan().version}"):
        run.wait(timeout=5)

    deploy(name, storage, calls, ["a", "b", "c"])
    run.retry()
    drain(storage)
    assert run.wait(timeout=5) == {"a": "a", "b": "b", "c": "c"}
    assert calls == Counter(a=1, b=1, c=1)


def test_a_step_added_joins_the_runs_enqueued_after_not_those_before(
    storage: Storage, unique: Names
) -> None:
    """A run enqueued with steps a, c and one enqueued after b was added between them,
    both run by the new code: the first runs a and c only, the second a, b and c; each
    run's plan_version() is the version of the code that enqueued it."""
    calls: Counter[str] = Counter()
    name = unique("versioned")
    old = deploy(name, storage, calls, ["a", "c"])
    before = old.run({})
    new = deploy(name, storage, calls, ["a", "b", "c"])
    after = new.run({})
    drain(storage)

    assert before.wait(timeout=5) == {"a": "a", "c": "c"}
    assert after.wait(timeout=5) == {"a": "a", "b": "b", "c": "c"}
    assert [node.step_name for node in before.trace()] == ["a", "c"]
    assert calls == Counter(a=2, b=1, c=2)
    assert before.plan_version() == old.plan().version
    assert after.plan_version() == new.plan().version != old.plan().version


def test_steps_reordered_in_the_code_run_in_the_order_of_the_runs_plan(
    storage: Storage, unique: Names
) -> None:
    """A run enqueued with a then b (b reads a's output) runs a first even on code that
    puts b first: the order and grouping of its steps are kept in its plan."""
    name = unique("versioned")

    def a(_ctx: Context) -> str:
        return "a"

    def b(ctx: Context) -> str:
        return str(ctx.data["a"]) + "b"

    run = Flow(name, storage).step("a", a).step("b", b).run({})
    registry.unregister(name)
    Flow(name, storage).step("b", b).step("a", a)
    drain(storage)

    assert run.wait(timeout=5) == {"a": "a", "b": "ab"}
    assert [node.step_name for node in run.trace()] == ["a", "b"]


def test_retries_are_the_plans_not_the_codes(storage: Storage, unique: Names) -> None:
    """A step enqueued with retries=2 that the new code gives retries=0 still gets its
    three attempts: how many a run's step may make is kept in its plan."""
    attempts: Counter[str] = Counter()
    name = unique("versioned")

    def failing(_ctx: Context) -> None:
        attempts["flaky"] += 1
        raise ConnectionError("503")

    run = Flow(name, storage).step("flaky", failing, retries=2, backoff=0).run({})
    registry.unregister(name)
    Flow(name, storage).step("flaky", failing, retries=0)
    drain(storage)

    with pytest.raises(StepFailed, match="503"):
        run.wait(timeout=5)
    assert attempts == Counter(flaky=3)
    assert [node.max_attempts for node in run.trace()] == [3]


def test_a_timeout_is_the_codes_not_the_plans(storage: Storage, unique: Names) -> None:
    """A step enqueued without a timeout that the new code gives timeout=0.05 s is held
    to it: a timeout (like the function, its condition and its backoff) is code, read by
    the worker at each attempt."""
    name = unique("versioned")

    def slow(_ctx: Context) -> str:
        time.sleep(0.3)
        return "late"

    run = Flow(name, storage).step("slow", slow).run({})
    registry.unregister(name)
    Flow(name, storage).step("slow", slow, timeout=0.05)
    drain(storage)

    with pytest.raises(StepFailed, match=r"longer than its timeout of 0\.05 s"):
        run.wait(timeout=5)


def _flow_with_refund(name: str, storage: Storage, undone: list[str], *steps: str) -> Flow:
    """Flow ``name`` as a deploy defines it: pay (compensate= refund), then ``steps``."""
    registry.unregister(name)
    flow = Flow(name, storage).step(
        "pay", lambda ctx: "paid", compensate=lambda ctx: undone.append("pay")
    )
    for step in steps:
        flow.step(step, _counted(Counter(), step))
    return flow


def test_a_step_missing_from_the_code_compensates_nothing_and_a_retry_resumes_it(
    storage: Storage, unique: Names
) -> None:
    """A run of pay (compensate=refund) then approve meets code that lost approve: the
    run ends FAILED naming approve, without a compensation (pay is not refunded, no
    compensate: node, no outcome), since a deploy is no failure of the run's work; once
    the old code is back, retry() resumes it at approve and it completes (issue 14.7)."""
    undone: list[str] = []
    name = unique("versioned")
    run = _flow_with_refund(name, storage, undone, "approve").run({})
    _flow_with_refund(name, storage, undone)
    drain(storage)

    with pytest.raises(StepFailed) as failed:
        run.wait(timeout=5)
    assert failed.value.step == "approve"
    assert f"step 'approve' of flow {name!r}" in failed.value.error
    assert run.status() == FlowStatus.FAILED and run.compensation() is None
    assert undone == [] and [n.step_name for n in run.trace()] == ["pay", "approve"]

    _flow_with_refund(name, storage, undone, "approve")
    run.retry()
    drain(storage)
    assert run.wait(timeout=5) == {"pay": "paid", "approve": "approve"}
    assert undone == []


def test_a_compensation_missing_from_the_code_says_so(storage: Storage, unique: Names) -> None:
    """A run of pay (compensate=refund) then a failing step meets code where pay lost its
    compensate=: the compensate:pay node fails saying compensate= of step 'pay' is no
    longer in the code (not a `flowsmith retry` the refusal of a compensated run would
    contradict), and the run ends FAILED with COMPENSATION_FAILED."""
    undone: list[str] = []
    name = unique("versioned")

    def declined(_ctx: Context) -> None:
        raise RuntimeError("card declined")

    registry.unregister(name)
    run = (
        Flow(name, storage)
        .step("pay", lambda ctx: "paid", compensate=lambda ctx: undone.append("pay"))
        .step("charge", declined)
        .run({})
    )
    registry.unregister(name)
    Flow(name, storage).step("pay", lambda ctx: "paid").step("charge", declined)
    drain(storage)

    assert run.status() == FlowStatus.FAILED
    assert run.compensation() == Compensation.COMPENSATION_FAILED
    error = {n.step_name: n for n in run.trace()}["compensate:pay"].error or ""
    assert "compensate= of step 'pay' is no longer in the code" in error
    assert "flowsmith retry" not in error
    assert undone == []


def test_the_items_of_a_map_missing_from_the_code_fail_naming_the_map(
    storage: Storage, unique: Names
) -> None:
    """A run whose map "m" started its items, then meets code without the map: its item
    fails with an error naming the map, not only its item node "m[1]": deploy code that
    has map 'm'."""
    calls: Counter[str] = Counter()
    name = unique("mapped")
    registry.unregister(name)
    old = Flow(name, storage).map("m", lambda ctx, item: item, items=lambda ctx: [0, 1])
    run = old.run({})
    [claimed] = storage.claim_nodes(
        worker_id="old-code", limit=1, lease_seconds=30, queues=[DEFAULT_QUEUE]
    )
    assert claimed.step_name == "m"
    storage.start_map(lease=claimed.lease, items=["0", "1"])  # as the old code did
    deploy(name, storage, calls, ["after"])
    drain(storage)

    with pytest.raises(StepFailed) as failed:
        run.wait(timeout=5)
    error = failed.value.error
    assert "(item 0 of map 'm')" in error or "(item 1 of map 'm')" in error
    assert "deploy code that has map 'm', then" in error
    assert "deploy code that has step" not in error

"""The decorator API (flowsmith_worker.decorators): definition, and running on every backend.

The definition tests need no database. The running tests take the `storage` fixture
(memory, sqlite, and the real PostgreSQL and MySQL servers) and an in-process Worker.
"""

from __future__ import annotations

import importlib
import sys
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import tenacity

from flowsmith_worker import (
    ChildRequest,
    Context,
    DuplicateFlowName,
    Flow,
    FlowRun,
    FlowStatus,
    InvalidFlowDefinition,
    NodeStatus,
    StepFailed,
    Worker,
)
from flowsmith_worker.decorators import Workflow, parallel, step, subflow, workflow
from flowsmith_worker.executor import Executor, Outcome
from flowsmith_worker.flow import registry
from flowsmith_worker.retry import retry_delay
from flowsmith_worker.storage.base import Storage

POLL = 0.02


def run_all(storage: Storage, timeout: float = 30) -> None:
    Worker(storage, concurrency=2, poll_interval=POLL).run_until_idle(timeout=timeout)


def checkout_flows(
    unique: Callable[[str], str], storage: Storage | None, in_stock: bool = True
) -> tuple[Workflow, Workflow]:
    """The issue's example, as written (plus the bodies it elides)."""

    @workflow(unique("send_invoice"), storage=storage)
    def send_invoice_flow() -> None:
        @step
        def render(ctx: Context) -> str:
            return f"invoice for order {ctx.data['order_id']}"

    @workflow(unique("checkout_process"), storage=storage)
    def process_order() -> None:
        @step(retries=3)
        def fetch_inventory(ctx: Context) -> dict[str, Any]:
            return {"in_stock": in_stock, "price": 100}

        @step(condition=lambda ctx: ctx.data["fetch_inventory"]["in_stock"])
        def reserve_items(ctx: Context) -> str:
            return "reserved"

        @parallel
        def notify_phase() -> None:
            @step
            def email(ctx: Context) -> str:
                return "emailed"

            @step
            def sms(ctx: Context) -> str:
                return "texted"

        @subflow
        def invoice(ctx: Context) -> dict[str, Any]:
            return {"flow": send_invoice_flow, "tracking_id": f"inv_{ctx.data['order_id']}"}

    return process_order, send_invoice_flow


# ------------------------------------------------------------------ definition


def test_nested_definitions_make_the_flow_in_the_order_written(
    unique: Callable[[str], str],
) -> None:
    """The example defines stages fetch_inventory, reserve_items, [email, sms], invoice,
    with each decorator's options on its StepSpec, registered under the workflow's name.
    """
    process_order, send_invoice = checkout_flows(unique, None)
    flow = process_order.flow
    assert isinstance(flow, Flow) and registry.lookup(flow.name) is flow
    assert [[s.name for s in stage] for stage in flow.stages] == [
        ["fetch_inventory"],
        ["reserve_items"],
        ["email", "sms"],
        ["invoice"],
    ]
    specs = {s.name: s for stage in flow.stages for s in stage}
    assert specs["fetch_inventory"].retries == 3 and specs["fetch_inventory"].condition is None
    assert specs["reserve_items"].condition is not None
    out_of_stock = Context({"fetch_inventory": {"in_stock": False}})
    assert specs["reserve_items"].condition(out_of_stock) is False
    assert specs["invoice"].subflow and not specs["email"].subflow
    assert [[(p.name, p.max_attempts, p.subflow) for p in st] for st in flow.plan().stages] == [
        [("fetch_inventory", 4, False)],
        [("reserve_items", 1, False)],
        [("email", 1, False), ("sms", 1, False)],
        [("invoice", 1, True)],
    ]
    assert process_order.name == flow.name and process_order.__name__ == "process_order"
    assert process_order.run == process_order.__call__
    assert flow.module == __name__  # the plan names the module a worker must import
    assert send_invoice.flow.stages[0][0].name == "render"


def test_step_bare_and_with_every_argument(unique: Callable[[str], str]) -> None:
    """`@step` bare and with `name`, `retries`, `timeout`, `backoff`, `condition`; the
    decorated function is returned unchanged, so it can be unit-tested directly.
    """
    condition = lambda ctx: True  # noqa: E731
    wait = tenacity.wait_fixed(7)

    @workflow(unique("step_args"))
    def wf() -> None:
        @step
        def bare(ctx: Context) -> int:
            return 1

        @step(name="renamed", retries=2, timeout=1.5, backoff=0.25, condition=condition)
        def original(ctx: Context) -> int:
            return 2

        @step(backoff=wait)
        def strategy(ctx: Context) -> int:
            return 3

        assert bare(Context()) == 1 and original.__name__ == "original"

    specs = {s.name: s for stage in wf.flow.stages for s in stage}
    assert list(specs) == ["bare", "renamed", "strategy"]
    bare = specs["bare"]
    assert (bare.retries, bare.timeout, bare.condition) == (0, None, None)
    renamed = specs["renamed"]
    assert (renamed.retries, renamed.timeout, renamed.condition) == (2, 1.5, condition)
    assert renamed.fn(Context()) == 2
    assert retry_delay(renamed.backoff, 1) == 0.25
    assert specs["strategy"].backoff is wait


def test_parallel_subflow_and_workflow_bare_and_called(unique: Callable[[str], str]) -> None:
    """`@parallel()` and `@subflow(...)` called, `@workflow` bare (named after the
    function) and with queue/priority. A subflow step's function hands the executor a
    Flow even when the user returned a @workflow object, and defaults the child's
    tracking_id to "<parent tracking_id>:<step>".
    """
    child_name = unique("sub_child")
    condition = lambda ctx: True  # noqa: E731

    @workflow(child_name, queue="emails", priority=5)
    def child() -> None:
        @step
        def only(ctx: Context) -> None: ...

    assert (child.flow.queue, child.flow.priority) == ("emails", 5)

    try:

        @workflow
        def bare_workflow_of_test_decorators() -> None:
            @parallel()
            def group() -> None:
                @step
                def a(ctx: Context) -> None: ...

                @subflow(name="side", retries=2, backoff=0.5, condition=condition)
                def start_side(ctx: Context) -> dict[str, Any]:
                    return {"flow": child, "data": {"k": 1}}

        wf = bare_workflow_of_test_decorators
        assert wf.name == "bare_workflow_of_test_decorators"
        assert registry.lookup(wf.name) is wf.flow
        (stage,) = wf.flow.stages
        a, side = stage
        assert (a.name, a.subflow) == ("a", False)
        assert (side.name, side.subflow, side.retries, side.condition) == (
            "side",
            True,
            2,
            condition,
        )
        assert retry_delay(side.backoff, 1) == 0.5
        asked = side.fn(Context({"x": 1}, tracking_id="parent-1", step="side"))
        assert asked == ChildRequest(child.flow, "parent-1:side", {"k": 1})
    finally:
        registry.unregister("bare_workflow_of_test_decorators")


def test_workflow_is_registered_when_its_module_is_imported(
    tmp_path: Path, unique: Callable[[str], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Importing a module that uses the decorators registers its flow by name, with the
    module recorded in the plan, which is all `flowsmith worker module` needs.
    """
    module_name, flow_name = unique("decorated_mod"), unique("imported_flow")
    (tmp_path / f"{module_name}.py").write_text(
        "from flowsmith_worker.decorators import workflow, step\n"
        f"@workflow({flow_name!r})\n"
        "def imported():\n"
        "    @step\n"
        "    def only(ctx):\n"
        "        return 1\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert registry.lookup(flow_name) is None
    try:
        module = importlib.import_module(module_name)
        flow = registry.lookup(flow_name)
        assert flow is module.imported.flow
        assert flow.plan().module == module_name
        assert flow.defined_at.startswith(str(tmp_path / f"{module_name}.py"))
    finally:
        sys.modules.pop(module_name, None)


@pytest.mark.parametrize("decorator", ["step", "parallel", "subflow", "step(retries=1)"])
def test_decorators_outside_a_workflow_body_raise(decorator: str) -> None:
    """`@step`, `@parallel` and `@subflow` outside a @workflow body raise a clear error
    naming the decorator and the function (InvalidFlowDefinition), instead of
    silently doing nothing.
    """
    decorators: dict[str, Callable[[Any], Any]] = {
        "step": step,
        "parallel": parallel,
        "subflow": subflow,
        "step(retries=1)": step(retries=1),
    }

    def stray(ctx: Context) -> None:
        return None

    with pytest.raises(InvalidFlowDefinition, match=r"outside a @workflow body") as raised:
        decorators[decorator](stray)
    assert "stray" in str(raised.value) and "@" + decorator.split("(")[0] in str(raised.value)


def test_functions_that_cannot_be_called_as_steps_are_refused(
    unique: Callable[[str], str],
) -> None:
    """An `async def` @parallel block or @workflow body (each runs once, at definition,
    where nothing would await it), a step or subflow not taking ctx, and a @parallel
    block that takes arguments are refused when the module is imported, not when a
    worker first runs them.
    """
    name = unique("bad_signature")
    with pytest.raises(TypeError, match="async function"):

        @workflow(name)
        def async_block() -> None:
            @parallel
            async def group() -> None: ...

    with pytest.raises(TypeError, match="on an async function"):

        @workflow(name)
        async def async_body() -> None: ...

    with pytest.raises(TypeError, match="must take one argument, ctx"):

        @workflow(name)
        def no_ctx() -> None:
            @step
            def fetch() -> None: ...

    with pytest.raises(TypeError, match="must take one argument, ctx"):

        @workflow(name)
        def sub_two_args() -> None:
            @subflow
            def start(ctx: Context, other: int) -> None: ...

    with pytest.raises(TypeError, match="must take no arguments"):

        @workflow(name)
        def block_with_ctx() -> None:
            @parallel
            def group(ctx: Context) -> None: ...

    assert registry.lookup(name) is None


def test_definition_mistakes_raise_and_leave_nothing_registered(
    unique: Callable[[str], str],
) -> None:
    """A workflow without steps, an empty or nested @parallel, a duplicate step name, or
    an exception in the body raises at definition (InvalidFlowDefinition for the
    definition's own mistakes), and the name stays free.
    """
    name = unique("mistake")

    with pytest.raises(InvalidFlowDefinition, match="defines no steps"):

        @workflow(name)
        def empty() -> None:
            pass

    with pytest.raises(InvalidFlowDefinition, match="declares no steps"):

        @workflow(name)
        def empty_block() -> None:
            @step
            def a(ctx: Context) -> None: ...

            @parallel
            def nothing() -> None:
                pass

    with pytest.raises(InvalidFlowDefinition, match="cannot nest"):

        @workflow(name)
        def nested() -> None:
            @parallel
            def outer() -> None:
                @parallel
                def inner() -> None:
                    @step
                    def a(ctx: Context) -> None: ...

    with pytest.raises(InvalidFlowDefinition, match="already has a step named 'a'"):

        @workflow(name)
        def duplicate() -> None:
            @step
            def a(ctx: Context) -> None: ...

            @step(name="a")
            def b(ctx: Context) -> None: ...

    with pytest.raises(ZeroDivisionError):

        @workflow(name)
        def broken() -> None:
            @step
            def a(ctx: Context) -> None: ...

            1 / 0  # noqa: B018

    assert registry.lookup(name) is None

    @workflow(name)
    def fine() -> None:  # the name is still free
        @step
        def a(ctx: Context) -> None: ...

    assert registry.lookup(name) is fine.flow
    with pytest.raises(DuplicateFlowName):

        @workflow(name)
        def clash() -> None:
            @step
            def a(ctx: Context) -> None: ...


def test_definitions_in_two_threads_do_not_mix(unique: Callable[[str], str]) -> None:
    """The flow being built is per thread: two modules imported at once by two threads
    each get exactly their own steps.
    """
    gate = threading.Barrier(2)
    built: dict[str, Workflow] = {}

    def define(label: str) -> None:
        @workflow(unique(label))
        def wf() -> None:
            @step(name=f"{label}_1")
            def first(ctx: Context) -> None: ...

            gate.wait(timeout=10)  # both bodies are half-way through here

            @step(name=f"{label}_2")
            def second(ctx: Context) -> None: ...

        built[label] = wf

    threads = [threading.Thread(target=define, args=(label,)) for label in ("left", "right")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert [s[0].name for s in built["left"].flow.stages] == ["left_1", "left_2"]
    assert [s[0].name for s in built["right"].flow.stages] == ["right_1", "right_2"]


# ------------------------------------------------------------------ running


def test_calling_the_workflow_enqueues_it_and_returns_the_flow_run(
    storage: Storage, unique: Callable[[str], str]
) -> None:
    """`process_order(Context({...}), tracking_id=...)` durably enqueues a run (the plan
    stored with it) and returns its FlowRun at once; nothing runs without a worker.
    """
    process_order, _ = checkout_flows(unique, storage)
    run = process_order(Context({"order_id": 42}), tracking_id="order_42")
    assert isinstance(run, FlowRun) and run.tracking_id == "order_42"
    record = run.record()
    assert record.flow_name == process_order.name and record.status == FlowStatus.PENDING
    assert record.input == {"order_id": 42}
    assert record.plan == process_order.flow.plan()
    assert [n.step_name for n in run.trace()] == ["fetch_inventory"]
    again = process_order.run({"order_id": 42}, tracking_id="order_42")  # idempotent
    assert again.record().id == record.id


@pytest.mark.parametrize("in_stock", [True, False])
def test_the_example_runs_end_to_end(
    storage: Storage, unique: Callable[[str], str], in_stock: bool
) -> None:
    """The issue's example runs to completion: the parallel pair, the subflow (its final
    data the `invoice` output) and the condition; out of stock, `reserve_items` is
    SKIPPED, leaves no key in ctx.data, and the flow goes on.
    """
    process_order, send_invoice = checkout_flows(unique, storage, in_stock=in_stock)
    run = process_order(Context({"order_id": 9}), tracking_id="order_9")
    run_all(storage)
    result = run.wait(timeout=5)
    assert result["fetch_inventory"] == {"in_stock": in_stock, "price": 100}
    assert (result["email"], result["sms"]) == ("emailed", "texted")
    assert result["invoice"]["render"] == "invoice for order 9"
    child = storage.get_flow(tracking_id="inv_9")
    assert child is not None and child.flow_name == send_invoice.name
    assert result["invoice"] == child.output
    nodes = {n.step_name: n for n in run.trace()}
    assert nodes["email"].position == nodes["sms"].position
    if in_stock:
        assert result["reserve_items"] == "reserved"
    else:
        assert "reserve_items" not in result and "reserve_items" not in child.input
        assert nodes["reserve_items"].status == NodeStatus.SKIPPED


def test_skipped_steps_leave_no_output_and_the_flow_goes_on(
    storage: Storage, unique: Callable[[str], str]
) -> None:
    """A step whose condition is False is never called, is SKIPPED, and leaves no key in
    ctx.data; a skipped sibling does not hold up its @parallel group.
    """
    called: list[str] = []
    seen: dict[str, list[str]] = {}

    @workflow(unique("skips"), storage=storage)
    def skips() -> None:
        @step(condition=lambda ctx: ctx.data["mode"] == "full")
        def optional(ctx: Context) -> str:
            called.append("optional")
            return "ran"

        @parallel
        def group() -> None:
            @step
            def kept(ctx: Context) -> str:
                return "kept"

            @step(condition=lambda ctx: "optional" in ctx.data)
            def dropped(ctx: Context) -> str:
                called.append("dropped")
                return "ran"

        @step
        def last(ctx: Context) -> list[str]:
            seen["last"] = sorted(ctx.data)
            return seen["last"]

    run = skips({"mode": "lite"}, tracking_id="skip-1")
    run_all(storage)
    result = run.wait(timeout=5)
    assert called == []
    assert seen["last"] == ["kept", "mode"]
    assert sorted(result) == ["kept", "last", "mode"]
    nodes = {n.step_name: n for n in run.trace()}
    assert nodes["optional"].status == nodes["dropped"].status == NodeStatus.SKIPPED
    assert nodes["optional"].output is None


def test_a_condition_that_raises_fails_its_step_with_the_error_kept(
    storage: Storage, unique: Callable[[str], str]
) -> None:
    """A condition raising fails its step (not skipped, the step never called) and the
    flow; the node keeps the traceback and the message, and wait() raises StepFailed.
    """
    called: list[str] = []

    @workflow(unique("bad_condition"), storage=storage)
    def bad() -> None:
        @step
        def first(ctx: Context) -> dict[str, Any]:
            return {}

        @step(condition=lambda ctx: ctx.data["first"]["flag"])
        def guarded(ctx: Context) -> str:
            called.append("guarded")
            return "ran"

        @step
        def after(ctx: Context) -> str:
            called.append("after")
            return "ran"

    run = bad({}, tracking_id="cond-1")
    run_all(storage)
    with pytest.raises(StepFailed) as failed:
        run.wait(timeout=5)
    assert failed.value.step == "guarded" and "KeyError" in str(failed.value)
    nodes = {n.step_name: n for n in run.trace()}
    assert nodes["guarded"].status == NodeStatus.FAILED
    error = nodes["guarded"].error or ""
    assert "Traceback" in error and "KeyError: 'flag'" in error
    assert run.status() == FlowStatus.FAILED and "after" not in nodes
    assert called == []


def _complete_first_step(storage: Storage, run: FlowRun, worker: Worker) -> None:
    """Run the first step alone, as a worker process that stopped after it (for a
    deploy) did: a Worker would chain the run's next step with the code it has."""
    [node] = storage.claim_nodes(
        worker_id=worker.id, limit=1, lease_seconds=30, queues=worker.settings.queues
    )
    assert Executor(storage, worker.id).execute(node) == Outcome.COMPLETED
    assert run.trace()[0].status == NodeStatus.COMPLETED


def test_changed_code_does_not_derail_runs_in_flight(
    storage: Storage, unique: Callable[[str], str]
) -> None:
    """A run follows the plan stored when it was enqueued: after a deploy that removes
    `a`, reorders, un-groups the parallel pair and adds `e`, the run already past `a`
    still runs [b, c] together then d, with the new code of each step, and never `e`.
    A run enqueued after the deploy follows the new plan.
    """
    name = unique("deploy")
    calls: list[str] = []

    def body(label: str) -> Callable[[Context], str]:
        def fn(ctx: Context) -> str:
            calls.append(label)
            return label

        return fn

    @workflow(name, storage=storage)
    def v1() -> None:
        step(name="a")(body("a1"))

        @parallel
        def pair() -> None:
            step(name="b")(body("b1"))
            step(name="c")(body("c1"))

        step(name="d")(body("d1"))

    run = v1({}, tracking_id="deploy-old")
    worker = Worker(storage, concurrency=1, poll_interval=POLL)
    _complete_first_step(storage, run, worker)

    registry.unregister(name)  # the new process after the deploy knows only v2

    @workflow(name, storage=storage)
    def v2() -> None:
        step(name="e")(body("e2"))
        step(name="d")(body("d2"))
        step(name="c")(body("c2"))
        step(name="b")(body("b2"))

    worker.run_until_idle(timeout=30)
    result = run.wait(timeout=5)
    assert calls[0] == "a1" and sorted(calls[1:3]) == ["b2", "c2"] and calls[3:] == ["d2"]
    assert result == {"a": "a1", "b": "b2", "c": "c2", "d": "d2"}
    nodes = {n.step_name: n for n in run.trace()}
    assert nodes["b"].position == nodes["c"].position == 1 and nodes["d"].position == 2

    calls.clear()
    fresh = v2({}, tracking_id="deploy-new")
    worker.run_until_idle(timeout=30)
    assert fresh.wait(timeout=5) == {"e": "e2", "d": "d2", "c": "c2", "b": "b2"}
    assert calls == ["e2", "d2", "c2", "b2"]


def test_a_stored_step_missing_from_the_code_fails_naming_step_and_flow(
    storage: Storage, unique: Callable[[str], str]
) -> None:
    """When a deploy removed the step a run is about to take, that step fails at once
    (no retry) with a message naming the step and the flow; later steps do not run.
    """
    name = unique("removed")
    calls: Counter[str] = Counter()

    def body(label: str) -> Callable[[Context], str]:
        def fn(ctx: Context) -> str:
            calls[label] += 1
            return label

        return fn

    @workflow(name, storage=storage)
    def v1() -> None:
        step(name="a")(body("a"))
        step(name="charge", retries=3)(body("charge"))
        step(name="z")(body("z"))

    run = v1({}, tracking_id="removed-1")
    worker = Worker(storage, concurrency=1, poll_interval=POLL)
    _complete_first_step(storage, run, worker)

    registry.unregister(name)

    @workflow(name, storage=storage)
    def v2() -> None:
        step(name="a")(body("a"))
        step(name="z")(body("z"))

    worker.run_until_idle(timeout=30)
    with pytest.raises(StepFailed) as failed:
        run.wait(timeout=5)
    nodes = {n.step_name: n for n in run.trace()}
    charge = nodes["charge"]
    assert charge.status == NodeStatus.FAILED and charge.attempt == 1
    assert "'charge'" in (charge.error or "") and repr(name) in (charge.error or "")
    assert "charge" in str(failed.value)
    assert "z" not in nodes and calls == Counter(a=1)

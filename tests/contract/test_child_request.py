"""A subflow's child request is one type, ChildRequest: the builder (Flow.subflow,
Flow.subflow_from) and the decorators (@subflow) make the same plans and the same
requests, the decorators go through the builder's public methods, and a child chosen
at run time by Flow.subflow_from runs with its own input on every storage.
"""

from __future__ import annotations

import ast
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import flowsmith_worker
from flowsmith_worker import ChildRequest, Context, Flow, StepFailed, Worker
from flowsmith_worker.decorators import step, subflow, workflow
from flowsmith_worker.storage import InMemoryStorage
from flowsmith_worker.storage.base import Storage

Names = Callable[[str], str]


def drain(storage: Storage) -> None:
    Worker(storage=storage, poll_interval=0.05).run_until_idle(timeout=30)


def test_the_decorators_and_the_builder_make_equal_plans_and_child_requests(
    unique: Names,
) -> None:
    """The same shape (a step, a subflow with retries and rescues, a step) declared with
    @workflow/@subflow and with Flow.subflow gives equal plans, and each subflow step's
    function answers an equal ChildRequest: the child's Flow (not the @workflow object)
    and the default tracking_id "<parent>:<step>"."""
    storage = InMemoryStorage()

    @workflow(unique("decorated"), storage=storage)
    def decorated() -> None:
        @step
        def a(ctx: Context) -> int:
            return 1

        @subflow(name="charge", retries=2, max_rescues=1)
        def start_charge(ctx: Context) -> dict[str, Any]:
            return {"flow": child_workflow, "tracking_id": None}

        @step
        def z(ctx: Context) -> int:
            return 2

    @workflow(unique("child"), storage=storage)
    def child_workflow() -> None:
        @step
        def c(ctx: Context) -> int:
            return 3

    built = Flow(unique("built"), storage=storage).step("a", lambda ctx: 1)
    built.subflow("charge", child_workflow.flow, retries=2, max_rescues=1)
    built.step("z", lambda ctx: 2)

    assert decorated.flow.plan() == built.plan()
    ctx = Context({"x": 1}, tracking_id="order-1", step="charge")
    from_decorator, from_builder = decorated.flow.get_step("charge"), built.get_step("charge")
    assert from_decorator is not None and from_builder is not None
    asked = from_decorator.fn(ctx)
    assert isinstance(asked, ChildRequest)
    assert asked == from_builder.fn(ctx) == ChildRequest(child_workflow.flow, "order-1:charge")


def test_the_decorators_add_steps_through_the_builders_public_methods() -> None:
    """No module but flow.py calls a private method of a Flow (``flow._add``): the
    decorator API is built on the public builder, so neither can drift from the other."""
    package = Path(flowsmith_worker.__file__).parent
    private_calls = [
        f"{path.relative_to(package)}:{node.lineno}"
        for path in package.rglob("*.py")
        if path.name != "flow.py"
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Attribute) and node.attr == "_add"
    ]
    assert private_calls == []


def test_subflow_from_runs_the_child_a_function_chooses_with_its_own_input(
    storage: Storage, unique: Names
) -> None:
    """Flow.subflow_from: a plain and an async function each choose the child flow and its
    input from ctx.data at run time; each child runs with that input (not the parent's
    ctx.data), and its final data is the parent step's output."""
    double = Flow(unique("double"), storage=storage).step("d", lambda ctx: ctx.data["n"] * 2)
    square = Flow(unique("square"), storage=storage).step("s", lambda ctx: ctx.data["n"] ** 2)
    children = {"double": double, "square": square}

    def pick(ctx: Context) -> ChildRequest:
        return ChildRequest(children[ctx.data["op"]], f"{ctx.tracking_id}:pick", {"n": 3})

    async def pick_async(ctx: Context) -> ChildRequest:
        return ChildRequest(square, f"{ctx.tracking_id}:again", {"n": ctx.data["pick"]["n"]})

    parent = Flow(unique("parent"), storage=storage).subflow_from("pick", pick, retries=1)
    parent.subflow_from("again", pick_async)
    runs = {op: parent.run({"op": op}, tracking_id=unique(op)) for op in children}
    drain(storage)

    assert runs["double"].wait(timeout=5) == {
        "op": "double",
        "pick": {"n": 3, "d": 6},
        "again": {"n": 3, "s": 9},
    }
    assert runs["square"].wait(timeout=5)["pick"] == {"n": 3, "s": 9}
    child = storage.get_flow(tracking_id=f"{runs['double'].tracking_id}:pick")
    assert child is not None and child.input == {"n": 3}


@pytest.mark.parametrize(
    "answer", [{"flow": 5, "tracking_id": "t"}, {"tracking_id": "t"}, "not a request"]
)
def test_a_subflow_function_answering_no_child_request_fails_naming_the_shape(
    unique: Names, answer: Any
) -> None:
    """A @subflow function whose answer names no flow, or is no dict, fails its step with
    the shape a child request has (dict or ChildRequest), not an AttributeError."""
    storage = InMemoryStorage()

    @workflow(unique("bad_answer"), storage=storage)
    def bad() -> None:
        @subflow
        def start(ctx: Context) -> Any:
            return answer

    run = bad({}, tracking_id=unique("t"))
    drain(storage)
    with pytest.raises(StepFailed, match=r"must return .*'flow': Flow.* or a ChildRequest"):
        run.wait(timeout=5)


def test_a_child_request_of_something_not_a_flow_is_refused_naming_what_it_needs(
    unique: Names,
) -> None:
    """ChildRequest(flow=<a @workflow object or a name>) fails its step saying the flow
    must be a Flow (a @workflow's .flow), instead of an AttributeError in the executor."""
    storage = InMemoryStorage()

    @workflow(unique("child"), storage=storage)
    def child() -> None:
        @step
        def c(ctx: Context) -> int:
            return 3

    parent = Flow(unique("parent"), storage=storage)
    parent.subflow_from("start", lambda ctx: ChildRequest(child, "kid"))  # type: ignore[arg-type]
    run = parent.run({}, tracking_id=unique("t"))
    drain(storage)
    with pytest.raises(StepFailed, match=r"must be a Flow \(for a @workflow, its \.flow\)"):
        run.wait(timeout=5)

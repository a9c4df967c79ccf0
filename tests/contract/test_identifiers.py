"""Tracking ids and names that no database stores alike are refused before any SQL.

An empty tracking_id, one that is not a str, and NUL characters or lone
surrogates in tracking ids, flow, step and queue names once reached the
drivers (raw errors; SQLite stored a NUL that PostgreSQL refused) or, for an
empty tracking_id, silently became a random run. Each is now one clear
InvalidIdentifier, the same on every backend, and nothing is written.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from flowsmith_worker import Context, Flow, Worker
from flowsmith_worker.errors import FlowSmithError, InvalidIdentifier
from flowsmith_worker.storage.base import FlowFilter, Storage

Names = Callable[[str], str]


def ok(ctx: Context) -> None:
    return None


BAD_TRACKING_IDS: dict[str, tuple[Any, str]] = {
    "empty": ("", "is empty"),
    "int": (42, "must be a str, not int"),
    "bytes": (b"order-1", "must be a str, not bytes"),
    "nul": ("order\x00-1", "NUL character"),
    "lone-surrogate": ("order-\udc801", "lone surrogate"),
    "too-long": ("x" * 256, "the limit is 255"),
}


@pytest.mark.parametrize("bad, message", BAD_TRACKING_IDS.values(), ids=BAD_TRACKING_IDS.keys())
def test_unstorable_tracking_ids_are_refused_before_anything_is_written(
    storage: Storage, unique: Names, bad: Any, message: str
) -> None:
    """flow.run() with such a tracking_id raises InvalidIdentifier (a FlowSmithError and
    a ValueError) naming the problem, on every backend, and stores no run."""
    flow = Flow(unique("ids"), storage=storage).step("only", ok)
    with pytest.raises(InvalidIdentifier, match=message) as refused:
        flow.run({}, tracking_id=bad)
    assert isinstance(refused.value, FlowSmithError) and isinstance(refused.value, ValueError)
    assert storage.list_flows(where=FlowFilter()) == []


def test_no_tracking_id_still_means_generate_one(storage: Storage, unique: Names) -> None:
    """None (the default) is the way to ask for a generated tracking_id; it still works."""
    run = Flow(unique("ids"), storage=storage).step("only", ok).run({})
    assert len(run.tracking_id) == 32
    assert storage.get_flow(tracking_id=run.tracking_id) is not None


@pytest.mark.parametrize(
    "define, message",
    [
        (lambda name: Flow(f"{name}\x00"), "flow name .* NUL"),
        (lambda name: Flow(f"{name}\ud800"), "flow name .* lone surrogate"),
        (lambda name: Flow(""), "flow name is empty"),
        (lambda name: Flow(None), "flow name must be a str"),
        (lambda name: Flow(name, queue="emails\x00"), "queue name .* NUL"),
        (lambda name: Flow(name, queue="\udfff"), "queue name .* lone surrogate"),
        (lambda name: Flow(name).step("send\x00", ok), "step name .* NUL"),
        (lambda name: Flow(name).step("send\udc00", ok), "step name .* lone surrogate"),
    ],
    ids=[
        "flow-nul",
        "flow-surrogate",
        "flow-empty",
        "flow-none",
        "queue-nul",
        "queue-surrogate",
        "step-nul",
        "step-surrogate",
    ],
)
def test_unstorable_names_are_refused_when_the_flow_is_defined(
    unique: Names, define: Callable[[str], Any], message: str
) -> None:
    """Flow, queue and step names pass the same check as tracking ids, when the flow is
    defined: a flow that could never be stored is never built."""
    with pytest.raises(InvalidIdentifier, match=message):
        define(unique("names"))


def test_a_subflow_computing_an_empty_tracking_id_fails_its_step(
    storage: Storage, unique: Names
) -> None:
    """A subflow step whose child tracking_id comes out empty fails with the same message
    instead of starting a child under a random id that no retry could find again."""
    child = Flow(unique("child"), storage=storage).step("only", ok)
    parent = Flow(unique("parent"), storage=storage).subflow("sub", child, tracking_id="{key}")
    run = parent.run({"key": ""})
    worker = Worker(storage=storage, poll_interval=0.05)
    try:
        worker.run_until_idle(timeout=20)
    finally:
        worker.shutdown()
    nodes = run.trace()
    assert [n.step_name for n in nodes] == ["sub"]
    assert "tracking_id is empty" in (nodes[0].error or "")
    assert [f.flow_name for f in storage.list_flows(where=FlowFilter())] == [parent.name]

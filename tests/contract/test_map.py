"""Dynamic fan-out (Flow.map, @map_step), on every backend (memory, sqlite, PostgreSQL, MySQL).

A map step's items are nodes of its stage (see flowsmith_worker/fanout.py): these
tests drive real Worker loops in threads and read the stored rows. The runs across
worker processes (max_parallel held by three processes, a SIGKILLed worker) are in
tests/integration/test_map_processes.py.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest

from flowsmith_worker import Flow, FlowStatus, NodeStatus, Worker
from flowsmith_worker.context import Context
from flowsmith_worker.storage.base import Storage
from tests.conftest import eventually
from tests.support.runs import nodes_of, status_of

Names = Callable[[str], str]
POLL = 0.02


def run_to_end(storage: Storage, tracking_id: str, concurrency: int = 4) -> FlowStatus:
    """Turn a worker's loop until the run is over; its status."""
    worker = Worker(storage=storage, concurrency=concurrency, poll_interval=POLL, listen=False)

    def over() -> FlowStatus | None:
        worker.run_once()
        status = status_of(storage, tracking_id)
        return status if status in (FlowStatus.COMPLETED, FlowStatus.FAILED) else None

    try:
        return eventually(over, timeout=60.0, interval=POLL)
    finally:
        worker.shutdown()


def test_outputs_come_back_in_item_order(storage: Storage, unique: Names) -> None:
    """Each item runs fn(ctx, item) once; the map's output, ctx.data[name] for the next
    step and the run's final data, is the list of outputs in item order, whatever the
    order the items finished in; no item node's output leaks into ctx.data."""
    seen: dict[str, Any] = {}

    def double(ctx: Context, item: int) -> int:
        return item * 2

    flow = (
        Flow(unique("doubles"), storage=storage)
        .step("load", lambda ctx: {"items": list(range(12))})
        .map("double", double, items=lambda ctx: ctx.data["load"]["items"])
        .step("after", lambda ctx: seen.update(ctx.data))
    )
    tid = unique("t")
    run = flow.run({}, tracking_id=tid)
    assert run_to_end(storage, tid) == FlowStatus.COMPLETED
    assert seen["double"] == [i * 2 for i in range(12)]
    assert not any("[" in key for key in seen)
    assert run.wait(timeout=0)["double"] == [i * 2 for i in range(12)]
    nodes = nodes_of(storage, tid)
    assert nodes["double"].status == NodeStatus.COMPLETED
    assert nodes["double[11]"].output == 22


class Journal:
    """Start and end of each item, from the items themselves (threads or processes)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running = 0
        self.most = 0
        self.runs: list[int] = []

    def item(self, ctx: Context, item: int) -> int:
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
            self.runs.append(item)
        threading.Event().wait(0.05)
        with self.lock:
            self.running -= 1
        return item


def test_max_parallel_holds_items_beyond_the_limit(storage: Storage, unique: Names) -> None:
    """With max_parallel=2 and a worker of 8 slots, never more than 2 items run at once
    (and 2 do: the items really run in parallel), and every item runs exactly once."""
    journal = Journal()
    flow = Flow(unique("limited"), storage=storage).map(
        "each", journal.item, items=lambda ctx: list(range(10)), max_parallel=2
    )
    tid = unique("t")
    flow.run({}, tracking_id=tid)
    assert run_to_end(storage, tid, concurrency=8) == FlowStatus.COMPLETED
    assert journal.most == 2
    assert sorted(journal.runs) == list(range(10))


def test_an_item_follows_its_own_retries(storage: Storage, unique: Names) -> None:
    """retries=2 applies per item: an item failing twice then succeeding completes the
    map, its node on its third attempt; the other items ran once."""
    calls: dict[int, int] = {}
    lock = threading.Lock()

    def flaky(ctx: Context, item: int) -> int:
        with lock:
            calls[item] = calls.get(item, 0) + 1
            if item == 3 and calls[item] < 3:
                raise RuntimeError(f"item {item} failed on attempt {calls[item]}")
        return item

    flow = Flow(unique("retried"), storage=storage).map(
        "each", flaky, items=lambda ctx: [1, 2, 3, 4], retries=2, backoff=0
    )
    tid = unique("t")
    run = flow.run({}, tracking_id=tid)
    assert run_to_end(storage, tid) == FlowStatus.COMPLETED
    assert run.wait(timeout=0)["each"] == [1, 2, 3, 4]
    assert calls == {1: 1, 2: 1, 3: 3, 4: 1}
    assert nodes_of(storage, tid)["each[2]"].attempt == 3


def test_a_failed_item_fails_the_map_and_stops_the_others(storage: Storage, unique: Names) -> None:
    """An item failed for good fails the map's run with its error, as a failed parallel
    sibling does: the items not started yet never run (stopped), the map is not done,
    and the step after it never runs."""
    ran: list[int] = []
    after: list[str] = []

    def charge(ctx: Context, item: int) -> int:
        ran.append(item)
        if item == 0:
            raise ValueError("card declined for item 0")
        return item

    flow = (
        Flow(unique("failing"), storage=storage)
        .map("charge", charge, items=lambda ctx: list(range(6)), max_parallel=1)
        .step("after", lambda ctx: after.append("ran"))
    )
    tid = unique("t")
    flow.run({}, tracking_id=tid)
    assert run_to_end(storage, tid) == FlowStatus.FAILED
    record = storage.get_flow(tracking_id=tid, with_payloads=False)
    assert record is not None and "card declined for item 0" in (record.error or "")
    nodes = nodes_of(storage, tid)
    assert ran == [0] and after == []
    assert nodes["charge[0]"].status == NodeStatus.FAILED
    assert all(nodes[f"charge[{i}]"].status == NodeStatus.CANCELLED for i in range(1, 6))
    assert nodes["charge"].status == NodeStatus.CANCELLED  # stopped, as its items


def test_allow_failures_records_each_items_error(storage: Storage, unique: Names) -> None:
    """With allow_failures=True a failed item does not fail the run: the map completes,
    its output a list in item order of {"output": value} or {"error": last line}."""

    def odd_fails(ctx: Context, item: int) -> int:
        if item % 2:
            raise ValueError(f"item {item} is odd")
        return item * 10

    flow = Flow(unique("tolerant"), storage=storage).map(
        "each", odd_fails, items=lambda ctx: [0, 1, 2, 3], allow_failures=True, max_parallel=2
    )
    tid = unique("t")
    run = flow.run({}, tracking_id=tid)
    assert run_to_end(storage, tid) == FlowStatus.COMPLETED
    assert run.wait(timeout=0)["each"] == [
        {"output": 0},
        {"error": "ValueError: item 1 is odd"},
        {"output": 20},
        {"error": "ValueError: item 3 is odd"},
    ]


def test_an_empty_list_completes_the_map_with_an_empty_list(
    storage: Storage, unique: Names
) -> None:
    """items(ctx) == []: the map completes at once with [], no item node is made, and the
    run goes on to its next step."""
    flow = (
        Flow(unique("empty"), storage=storage)
        .map("each", lambda ctx, item: item, items=lambda ctx: [])
        .step("after", lambda ctx: len(ctx.data["each"]))
    )
    tid = unique("t")
    run = flow.run({}, tracking_id=tid)
    assert run_to_end(storage, tid) == FlowStatus.COMPLETED
    assert run.wait(timeout=0)["each"] == []
    assert sorted(nodes_of(storage, tid)) == ["after", "each"]


@pytest.mark.parametrize("items", [{"a": 1}, "abc", None, 7])
def test_items_that_are_not_a_list_fail_naming_the_step(
    storage: Storage, unique: Names, items: Any
) -> None:
    """items(ctx) returning a dict, a string, None or a number fails the map step (not
    retried: the same input gives the same answer) with an error naming the step."""
    flow = Flow(unique("notalist"), storage=storage).map(
        "charge_items", lambda ctx, item: item, items=lambda ctx: items, retries=3
    )
    tid = unique("t")
    flow.run({}, tracking_id=tid)
    assert run_to_end(storage, tid) == FlowStatus.FAILED
    node = nodes_of(storage, tid)["charge_items"]
    assert node.attempt == 1
    assert "map step 'charge_items': items(ctx) returned a" in (node.error or "")
    assert "not a list" in (node.error or "")


def test_resuming_a_failed_run_reruns_only_the_failed_items(
    storage: Storage, unique: Names
) -> None:
    """After an item failed the run, `retry` runs again the failed and the stopped items,
    not those that completed; max_parallel still holds; the map then completes in order."""
    journal = Journal()
    broken = {"on": True}

    def item(ctx: Context, value: int) -> int:
        if value == 2 and broken["on"]:
            raise RuntimeError("item 2 broke")
        return journal.item(ctx, value)

    flow = Flow(unique("resumed"), storage=storage).map(
        "each", item, items=lambda ctx: list(range(6)), max_parallel=2
    )
    tid = unique("t")
    run = flow.run({}, tracking_id=tid)
    assert run_to_end(storage, tid, concurrency=8) == FlowStatus.FAILED
    completed_before = sorted(journal.runs)
    assert 2 not in completed_before
    broken["on"] = False
    storage.resume_flow(tracking_id=tid)
    assert run_to_end(storage, tid, concurrency=8) == FlowStatus.COMPLETED
    assert sorted(journal.runs) == list(range(6)), "an item ran twice or not at all"
    assert journal.most <= 2
    assert run.wait(timeout=0)["each"] == list(range(6))


def test_resuming_a_run_leaves_the_failed_items_of_a_completed_map_alone(
    storage: Storage, unique: Names
) -> None:
    """Regression (the torture model checker, issue 11 meets 14.3): a map that completed
    under allow_failures is done for good. When a later step fails the run, `retry`
    runs again that step only: the map's FAILED item is not called again, keeps its
    node as it ended, and the map's output (its error) is what the run ends with."""
    calls: list[int] = []
    broken = {"on": True}

    def item(ctx: Context, value: int) -> int:
        calls.append(value)
        if value == 1:
            raise ValueError("item 1 fails")
        return value

    def after(ctx: Context) -> None:
        if broken["on"]:
            raise RuntimeError("after broke")

    flow = (
        Flow(unique("done_map"), storage=storage)
        .map("each", item, items=lambda ctx: [0, 1], allow_failures=True)
        .step("after", after)
    )
    tid = unique("t")
    run = flow.run({}, tracking_id=tid)
    assert run_to_end(storage, tid) == FlowStatus.FAILED
    broken["on"] = False
    storage.resume_flow(tracking_id=tid)
    assert run_to_end(storage, tid) == FlowStatus.COMPLETED
    assert sorted(calls) == [0, 1], "an item of a completed map ran again"
    nodes = nodes_of(storage, tid)
    assert (nodes["each[1]"].status, nodes["each[1]"].attempt) == (NodeStatus.FAILED, 1)
    assert run.wait(timeout=0)["each"] == [{"output": 0}, {"error": "ValueError: item 1 fails"}]


def test_map_step_declares_a_map_in_a_workflow(storage: Storage, unique: Names) -> None:
    """@map_step in a @workflow body is Flow.map: an async def of (ctx, item) runs per
    item, its output the list in item order; a function not of (ctx, item) is refused."""
    from flowsmith_worker.decorators import map_step, step, workflow

    @workflow(unique("decorated"), storage=storage)
    def decorated() -> None:
        @step
        def load(ctx: Context) -> dict[str, Any]:
            return {"items": ["a", "b", "c"]}

        @map_step(items=lambda ctx: ctx.data["load"]["items"], max_parallel=2)
        async def shout(ctx: Context, item: str) -> str:
            return item.upper()

    tid = unique("t")
    run = decorated({}, tracking_id=tid)
    assert run_to_end(storage, tid) == FlowStatus.COMPLETED
    assert run.wait(timeout=0)["shout"] == ["A", "B", "C"]

    with pytest.raises(TypeError, match=r"must take \(ctx, item\)"):

        @workflow(unique("wrong"), storage=storage)
        def wrong() -> None:
            @map_step(items=lambda ctx: [1])
            def one_argument(ctx: Context) -> None: ...


def test_map_progress_counts_items_and_trace_lists_them_in_order(
    storage: Storage, unique: Names
) -> None:
    """Once a map has started 5 items with max_parallel=2 (none run yet), map_progress
    counts 2 PENDING and 3 HELD, and trace() lists the map's node, then its items in
    item order, each holding its item until it runs."""
    flow = Flow(unique("progress"), storage=storage).map(
        "each", lambda ctx, item: item, items=lambda ctx: ["a", "b", "c", "d", "e"], max_parallel=2
    )
    run = flow.run({}, tracking_id=unique("t"))
    [claimed] = storage.claim_nodes(worker_id="w", limit=1, lease_seconds=30, queues=[flow.queue])
    assert claimed.step_name == "each"
    assert storage.start_map(lease=claimed.lease, items=['"a"', '"b"', '"c"', '"d"', '"e"'])
    progress = run.map_progress("each")
    assert progress.counts == {"PENDING": 2, "HELD": 3}
    assert progress.summary() == "5 items: 2 PENDING, 3 HELD"
    trace = run.trace()
    assert [n.step_name for n in trace] == ["each"] + [f"each[{i}]" for i in range(5)]
    assert [n.output for n in trace[1:]] == ["a", "b", "c", "d", "e"]


def test_an_item_that_keeps_losing_its_worker_is_an_allowed_failure(
    storage: Storage, unique: Names
) -> None:
    """With allow_failures=True, an item failed because its worker was lost more than
    max_rescues times is recorded as that item's error: the run does not fail, and the
    map completes once its other item has run."""
    flow = Flow(unique("lost"), storage=storage).map(
        "each",
        lambda ctx, item: item,
        items=lambda ctx: ["a", "b"],
        allow_failures=True,
        max_rescues=0,
    )
    run = flow.run({}, tracking_id=unique("t"))
    [map_node] = storage.claim_nodes(worker_id="w", limit=1, lease_seconds=30, queues=[flow.queue])
    assert storage.start_map(lease=map_node.lease, items=['"a"', '"b"'])
    [lost] = storage.claim_nodes(worker_id="gone", limit=1, lease_seconds=0.01, queues=[flow.queue])
    eventually(lambda: storage.rescue_expired(), timeout=10)
    assert run.status() == FlowStatus.RUNNING
    assert run_to_end(storage, run.tracking_id) == FlowStatus.COMPLETED
    outputs = run.wait(timeout=0)["each"]
    survivor = 1 - int(lost.step_name == "each[1]")
    assert outputs[survivor] == {"output": "ab"[survivor]}
    assert "worker lost 1 times" in outputs[1 - survivor]["error"]


def test_cancelling_a_run_mid_map_ends_its_items_and_the_map(
    storage: Storage, unique: Names
) -> None:
    """A cancel while a map's items wait ends them and the map's node CANCELLED: no item
    is claimed afterwards, and an item running at the cancel does not move the run on."""
    flow = Flow(unique("cancelled"), storage=storage).map(
        "each", lambda ctx, item: item, items=lambda ctx: [1, 2, 3], max_parallel=2
    )
    run = flow.run({}, tracking_id=unique("t"))
    [map_node] = storage.claim_nodes(worker_id="w", limit=1, lease_seconds=30, queues=[flow.queue])
    assert storage.start_map(lease=map_node.lease, items=["1", "2", "3"])
    [running] = storage.claim_nodes(worker_id="w", limit=1, lease_seconds=30, queues=[flow.queue])
    run.cancel()
    assert storage.claim_nodes(worker_id="w", limit=5, lease_seconds=30, queues=[flow.queue]) == []
    assert storage.complete_node(lease=running.lease, output=1)
    nodes = nodes_of(storage, run.tracking_id)
    assert run.status() == FlowStatus.CANCELLED
    assert nodes["each"].status == NodeStatus.CANCELLED
    assert {nodes[f"each[{i}]"].status for i in range(3)} - {NodeStatus.COMPLETED} == {
        NodeStatus.CANCELLED
    }


def test_a_failed_item_runs_the_compensations_of_the_steps_before_the_map(
    storage: Storage, unique: Names
) -> None:
    """A run whose map fails (an item failed for good) is not left waiting for its map:
    the compensation of the step before the map runs and the run ends FAILED,
    COMPENSATED."""
    undone: list[str] = []
    flow = (
        Flow(unique("saga"), storage=storage)
        .step("reserve", lambda ctx: "held", compensate=lambda ctx: undone.append("released"))
        .map("charge", _fails_on_two, items=lambda ctx: [1, 2, 3])
    )
    run = flow.run({}, tracking_id=unique("t"))
    assert run_to_end(storage, run.tracking_id) == FlowStatus.FAILED
    assert undone == ["released"]
    assert run.compensation() == "COMPENSATED"


def _fails_on_two(ctx: Context, item: int) -> int:
    if item == 2:
        raise ValueError("item 2 cannot be charged")
    return item

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
from flowsmith_worker.records import NodeRecord
from flowsmith_worker.storage.base import Storage
from tests.conftest import eventually

Names = Callable[[str], str]
POLL = 0.02


def nodes_of(storage: Storage, tracking_id: str) -> dict[str, NodeRecord]:
    record = storage.get_flow(tracking_id=tracking_id, with_payloads=False)
    assert record is not None
    return {n.step_name: n for n in storage.list_nodes(flow_id=record.id)}


def status_of(storage: Storage, tracking_id: str) -> FlowStatus:
    record = storage.get_flow(tracking_id=tracking_id, with_payloads=False)
    assert record is not None
    return record.status


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

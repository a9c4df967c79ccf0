"""The storage's operator queries behind the dashboard, on every backend.

Runs are enqueued and run for real; where a test needs a run at a given time,
it moves the run's stored times with plain SQL first (times come from the
database clock, which a test cannot set).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import sqlalchemy as sa

from flowsmith_worker import Context, Flow, Worker
from flowsmith_worker.storage.base import FlowFilter, FlowStatus, Overview, RunCursor, Storage
from flowsmith_worker.storage.sql import SqlStorage, schema

Names = Callable[[str], str]


def drain(storage: Storage) -> None:
    worker = Worker(storage=storage, poll_interval=0.02)
    try:
        worker.run_until_idle(timeout=30)
    finally:
        worker.shutdown()


def ok(ctx: Context) -> dict[str, Any]:
    return {"ok": True}


def set_times(storage: Storage, tracking_ids: list[str], **values: float) -> None:
    """Move the stored times of these runs (created_at, updated_at, finished_at)."""
    assert isinstance(storage, SqlStorage)
    with storage.engine.begin() as conn:
        conn.execute(
            sa.update(schema.flows)
            .where(schema.flows.c.tracking_id.in_(tracking_ids))
            .values(**values)
        )


def listed(storage: Storage, **where: Any) -> list[str]:
    return [run.tracking_id for run in storage.list_flows(where=FlowFilter(limit=1000, **where))]


def test_pages_of_runs_follow_one_another_without_gap_or_repeat(
    storage: Storage, unique: Names
) -> None:
    """Keyset pages (after the last run of a page) list every run once, newest first,
    also where several runs share one created_at."""
    flow = Flow(unique("paged"), storage=storage).step("a", ok)
    ids = [flow.run({}, tracking_id=f"paged-{i}", delay=3600).tracking_id for i in range(7)]
    set_times(storage, ids[2:5], created_at=1_000_000.5)  # a tie across a page edge
    seen: list[str] = []
    after = None
    while True:
        page = storage.list_flows(where=FlowFilter(limit=3, after=after))
        seen += [run.tracking_id for run in page]
        if len(page) < 3:
            break
        after = RunCursor(created_at=page[-1].created_at, id=page[-1].id)
    everything = storage.list_flows(where=FlowFilter(limit=100))
    assert seen == [run.tracking_id for run in everything]
    assert sorted(seen) == sorted(ids)
    order = [(run.created_at, run.id) for run in everything]
    assert order == sorted(order, reverse=True)


def test_tracking_id_prefix_matches_byte_for_byte(storage: Storage, unique: Names) -> None:
    """The prefix search is exact: case counts, LIKE's % and _ are plain characters,
    and a prefix ending in any character (é, the largest code point) works."""
    flow = Flow(unique("prefix"), storage=storage).step("a", ok)
    for tracking_id in [
        "order-1",
        "order-2",
        "Order-3",
        "order_4",
        "ord%5",
        "orders",
        "café-1",
        "cafe-2",
        "z\U0010ffffa",
    ]:
        flow.run({}, tracking_id=tracking_id, delay=3600)
    assert sorted(listed(storage, tracking_id_prefix="order-")) == ["order-1", "order-2"]
    assert listed(storage, tracking_id_prefix="order_") == ["order_4"]
    assert listed(storage, tracking_id_prefix="ord%") == ["ord%5"]
    assert listed(storage, tracking_id_prefix="ORDER") == []
    assert listed(storage, tracking_id_prefix="café") == ["café-1"]
    assert listed(storage, tracking_id_prefix="z\U0010ffff") == ["z\U0010ffffa"]
    assert sorted(listed(storage, tracking_id_prefix="order")) == [
        "order-1",
        "order-2",
        "order_4",
        "orders",
    ]


def test_since_and_until_bound_the_time_range(storage: Storage, unique: Names) -> None:
    """since is inclusive, until exclusive, on created_at; both combine with the other filters."""
    flow = Flow(unique("ranged"), storage=storage).step("a", ok)
    for i in range(4):
        flow.run({}, tracking_id=f"ranged-{i}", delay=3600)
        set_times(storage, [f"ranged-{i}"], created_at=2_000_000.0 + 100 * i)
    assert listed(storage, since=2_000_100.0, until=2_000_300.0) == ["ranged-2", "ranged-1"]
    assert listed(storage, until=2_000_100.0) == ["ranged-0"]
    assert listed(storage, since=2_000_100.0, status=FlowStatus.PENDING, flow_name=flow.name) == [
        "ranged-3",
        "ranged-2",
        "ranged-1",
    ]


def overview(storage: Storage, within: float = 3600) -> Overview:
    return storage.overview(window_seconds=3600, buckets=12, finished_within=within)


def test_the_overview_counts_runs_steps_and_slices_of_the_last_hour(
    storage: Storage, unique: Names
) -> None:
    """Open runs are counted whole, finished ones in their window; completed and failed
    runs fall in the slice of the hour they finished in (older ones nowhere); open
    steps and the runnable backlog (not what is delayed) are counted by queue."""

    def broken(ctx: Context) -> None:
        raise RuntimeError("broken")

    good = Flow(unique("good"), storage=storage).step("a", ok)
    bad = Flow(unique("bad"), storage=storage).step("a", broken)
    for i in range(3):
        good.run({}, tracking_id=f"good-{i}")
    bad.run({}, tracking_id="bad-0")
    drain(storage)
    now = overview(storage).now
    set_times(storage, ["good-1"], updated_at=now - 1650, finished_at=now - 1650)
    set_times(storage, ["good-2"], updated_at=now - 7200, finished_at=now - 7200)
    later = Flow(unique("later"), storage=storage, queue="reports").step("a", ok)
    later.run({}, tracking_id="later-0")
    later.run({}, tracking_id="later-1", delay=3600)

    seen = overview(storage)
    assert len(seen.slices) == 12
    assert [s.completed for s in seen.slices] == [0] * 6 + [1] + [0] * 4 + [1]
    assert [s.failed for s in seen.slices] == [0] * 11 + [1]
    assert seen.runs_by_status == {"COMPLETED": 2, "FAILED": 1, "PENDING": 2}
    assert overview(storage, within=86400).runs_by_status["COMPLETED"] == 3
    assert seen.open_steps_by_queue == {"reports": {"PENDING": 2}}
    assert seen.runnable_by_queue == {"reports": 1}
    assert seen.oldest_runnable_age is not None and 0 <= seen.oldest_runnable_age < 600


def test_a_compensating_run_is_counted_as_open(storage: Storage, unique: Names) -> None:
    """A COMPENSATING run is still at work (its compensations run): the overview counts
    it among the open runs, whenever it last changed, as it does a RUNNING one."""
    flow = Flow(unique("undoing"), storage=storage).step("a", ok)
    tid = unique("t")
    flow.run({}, tracking_id=tid)
    drain(storage)
    assert isinstance(storage, SqlStorage)
    now = overview(storage).now
    with storage.engine.begin() as conn:  # as a run whose compensations are under way
        conn.execute(
            sa.update(schema.flows)
            .where(schema.flows.c.tracking_id == tid)
            .values(status=FlowStatus.COMPENSATING, updated_at=now - 7200, finished_at=None)
        )
    assert overview(storage).runs_by_status == {"COMPENSATING": 1}


def test_subflow_links_go_both_ways(storage: Storage, unique: Names) -> None:
    """A parent run names the runs its steps started; a child names the parent's run and step."""
    child = Flow(unique("child"), storage=storage).step("charge", ok)
    parent = Flow(unique("parent"), storage=storage).step("a", ok)
    parent.subflow("pay", child, tracking_id="{tracking_id}:pay")
    parent.run({}, tracking_id="parent-1")
    drain(storage)
    parent_run = storage.get_flow(tracking_id="parent-1")
    child_run = storage.get_flow(tracking_id="parent-1:pay")
    assert parent_run is not None and child_run is not None
    down = storage.subflow_links(flow=parent_run)
    assert down.parent is None
    assert [(c.tracking_id, c.flow_name, c.step_name) for c in down.children] == [
        ("parent-1:pay", child.name, "pay")
    ]
    up = storage.subflow_links(flow=child_run)
    assert up.parent is not None
    assert (up.parent.tracking_id, up.parent.flow_name, up.parent.step_name) == (
        "parent-1",
        parent.name,
        "pay",
    )
    assert up.children == ()


def test_failure_groups_gather_failed_steps_by_step_and_message(
    storage: Storage, unique: Names
) -> None:
    """Runs failed by the same step with the same last error line make one group, the
    largest first, with their times and a few tracking_ids; runs that failed before
    the window are left out."""

    def declined(ctx: Context) -> None:
        raise ValueError(f"card declined ({ctx.data['kind']})")

    flow = Flow(unique("pay"), storage=storage).step("check", ok).step("charge", declined)
    for i, kind in enumerate(["visa", "visa", "visa", "amex", "visa"]):
        flow.run({"kind": kind}, tracking_id=f"pay-{i}")
    drain(storage)
    now = overview(storage).now
    set_times(storage, ["pay-4"], updated_at=now - 2 * 86400)

    groups = storage.failure_groups(within_seconds=86400, max_runs=100)
    assert [(g.step_name, g.message, g.count) for g in groups] == [
        ("charge", "ValueError: card declined (visa)", 3),
        ("charge", "ValueError: card declined (amex)", 1),
    ]
    assert {g.flow_name for g in groups} == {flow.name}
    assert sorted(groups[0].tracking_ids) == ["pay-0", "pay-1", "pay-2"]
    assert groups[0].first_at <= groups[0].last_at
    assert len(storage.failure_groups(within_seconds=86400, max_runs=2)) <= 2
    assert sum(g.count for g in storage.failure_groups(within_seconds=86400, max_runs=2)) == 2

"""Delayed runs (``run_at=``) and cron schedules, on every backend.

The Scheduler's clock is injected, so ticks minutes or hours apart take no time;
only the run_at test waits, about a second, for the database clock to pass it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from flowsmith_worker import Flow, FlowStatus, Worker
from flowsmith_worker.decorators import step, workflow
from flowsmith_worker.schedule import (
    DEFAULT_GRACE_SECONDS,
    Scheduler,
    scheduled_flows,
    tick_tracking_id,
)
from flowsmith_worker.storage.base import FlowFilter, Storage
from tests.conftest import eventually

NOON = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)  # a tick of every cron used here


class Clock:
    """A settable clock for the Scheduler, in epoch seconds."""

    def __init__(self, at: datetime) -> None:
        self.now = at.timestamp()

    def set(self, at: datetime) -> None:
        self.now = at.timestamp()

    def __call__(self) -> float:
        return self.now


def scheduled(storage: Storage, name: str, cron: str = "*/5 * * * *", **input: Any) -> Flow:
    flow = Flow(name, storage)
    flow.step("tick", lambda ctx: {"ran": True})
    return flow.schedule(cron, input or None)


def claim(storage: Storage) -> list[Any]:
    return storage.claim_nodes(worker_id="test", limit=10, lease_seconds=30, queues=["default"])


def test_bad_cron_is_rejected_at_once(unique: Callable[[str], str]) -> None:
    """A malformed, second-resolution or never-firing cron raises ValueError naming it."""
    flow = Flow(unique("bad_cron"))
    flow.step("s", lambda ctx: None)
    for bad in ["not a cron", "*/5 * * *", "61 * * * *", "* * * * * *", "0 0 31 2 *"]:
        with pytest.raises(ValueError, match="cron expression") as info:
            flow.schedule(bad)
        assert repr(bad) in str(info.value)
    assert flow.cron is None
    with pytest.raises(ValueError, match="not JSON"):
        flow.schedule("* * * * *", {"when": datetime.now(UTC)})
    assert flow.schedule("@hourly").cron == "@hourly"
    assert flow.schedule("  */5   * * * * ").cron == "*/5 * * * *"


def test_a_tick_is_enqueued_once_by_five_concurrent_schedulers(
    storage: Storage, unique: Callable[[str], str], logs: list[dict[str, Any]]
) -> None:
    """Five workers' schedulers racing on one tick leave exactly one run for it."""
    flow = scheduled(storage, unique("every5"), region="eu")
    clock = Clock(NOON + timedelta(seconds=10))
    schedulers = [Scheduler(storage, lambda: [flow], clock=clock) for _ in range(5)]
    barrier = threading.Barrier(len(schedulers))
    results: list[list[str]] = []
    errors: list[BaseException] = []

    def race(scheduler: Scheduler) -> None:
        barrier.wait()
        try:
            results.append(scheduler.run_once())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=race, args=(s,)) for s in schedulers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    tracking_id = f"{flow.name}@2030-01-01T12:00Z"
    assert sorted(tid for r in results for tid in r) == [tracking_id]
    record = storage.get_flow(tracking_id=tracking_id)
    assert record is not None
    assert record.status == FlowStatus.PENDING
    assert record.input == {"region": "eu"}
    assert len(claim(storage)) == 1  # one run, one first node
    enqueued = [e for e in logs if e["event"] == "schedule.enqueued"]
    assert [(e["flow"], e["tracking_id"]) for e in enqueued] == [(flow.name, tracking_id)]


def test_same_tick_twice_enqueues_nothing_and_next_tick_enqueues_the_next(
    storage: Storage, unique: Callable[[str], str]
) -> None:
    """Within one tick run_once is idempotent (also for a fresh scheduler); the next tick runs."""
    flow = scheduled(storage, unique("twice"))
    clock = Clock(NOON + timedelta(seconds=1))
    scheduler = Scheduler(storage, lambda: [flow], clock=clock)
    assert scheduler.run_once() == [tick_tracking_id(flow.name, NOON)]
    clock.set(NOON + timedelta(minutes=4, seconds=59))
    assert scheduler.run_once() == []
    # A worker started later in the same tick finds the run already there.
    assert Scheduler(storage, lambda: [flow], clock=clock).run_once() == []
    clock.set(NOON + timedelta(minutes=5))
    assert scheduler.run_once() == [f"{flow.name}@2030-01-01T12:05Z"]
    assert scheduler.run_once() == []
    assert len(claim(storage)) == 2


def test_seconds_until_due_bounds_the_sleep(storage: Storage, unique: Callable[[str], str]) -> None:
    """Due now before the tick is handled; afterwards, the time to the next tick."""
    flow = scheduled(storage, unique("due"), "0 * * * *")
    clock = Clock(NOON + timedelta(minutes=1))
    scheduler = Scheduler(storage, lambda: [flow], clock=clock)
    assert scheduler.seconds_until_due() == 0.0
    scheduler.run_once()
    assert scheduler.seconds_until_due() == pytest.approx(59 * 60)
    clock.set(NOON + timedelta(hours=1))
    assert scheduler.seconds_until_due() == 0.0
    assert Scheduler(storage, lambda: [], clock=clock).seconds_until_due() == float("inf")


@pytest.mark.parametrize("outcome", [FlowStatus.COMPLETED, FlowStatus.FAILED])
def test_a_finished_tick_is_neither_rerun_nor_resumed(
    storage: Storage, unique: Callable[[str], str], outcome: FlowStatus
) -> None:
    """A tick whose run completed or failed stays as it is when schedulers see it again."""
    calls: list[str] = []

    def work(ctx: Any) -> dict[str, bool]:
        calls.append(ctx.tracking_id)
        if outcome == FlowStatus.FAILED:
            raise RuntimeError("boom")
        return {"ok": True}

    flow = Flow(unique("finished"), storage).step("work", work).schedule("*/5 * * * *")
    clock = Clock(NOON + timedelta(seconds=30))
    [tracking_id] = Scheduler(storage, lambda: [flow], clock=clock).run_once()
    Worker(storage, concurrency=1, poll_interval=0.02, listen=False).run_until_idle(timeout=30)
    record = storage.get_flow(tracking_id=tracking_id)
    assert record is not None and record.status == outcome
    attempts = [n.attempt for n in storage.list_nodes(flow_id=record.id)]

    # Restarted workers (fresh schedulers, no memory) in the same tick, and one racing.
    clock.set(NOON + timedelta(minutes=2))
    for _ in range(3):
        assert Scheduler(storage, lambda: [flow], clock=clock).run_once() == []
    assert not claim(storage)
    after = storage.get_flow(tracking_id=tracking_id)
    assert after is not None and after.status == outcome
    assert [n.attempt for n in storage.list_nodes(flow_id=record.id)] == attempts
    assert calls == [tracking_id]


def test_a_stale_tick_beyond_the_grace_is_skipped(
    storage: Storage, unique: Callable[[str], str], logs: list[dict[str, Any]]
) -> None:
    """A worker starting long after a tick skips it; within the grace it still runs it."""
    stale = scheduled(storage, unique("stale"), "0 * * * *")
    late = scheduled(storage, unique("late"), "0 * * * *")
    clock = Clock(NOON + timedelta(seconds=DEFAULT_GRACE_SECONDS + 60))
    assert Scheduler(storage, lambda: [stale], clock=clock).run_once() == []
    assert storage.get_flow(tracking_id=tick_tracking_id(stale.name, NOON)) is None
    assert any(e["event"] == "schedule.stale_tick_skipped" for e in logs)

    clock.set(NOON + timedelta(seconds=DEFAULT_GRACE_SECONDS - 60))
    assert Scheduler(storage, lambda: [late], clock=clock).run_once() == [
        tick_tracking_id(late.name, NOON)
    ]

    # Hours of downtime: only the latest tick is looked at, and it is stale too.
    scheduler = Scheduler(storage, lambda: [stale], clock=clock)
    clock.set(NOON + timedelta(hours=5, minutes=30))
    assert scheduler.run_once() == []
    clock.set(NOON + timedelta(hours=6, seconds=5))
    assert scheduler.run_once() == [f"{stale.name}@2030-01-01T18:00Z"]


def test_run_at_in_the_future_is_claimable_only_from_then(
    storage: Storage, unique: Callable[[str], str]
) -> None:
    """A run_at one second ahead: nothing to claim before it, the first step after it."""
    flow = Flow(unique("later"), storage).step("s", lambda ctx: None)
    run_at = datetime.now(UTC) + timedelta(seconds=1)
    flow.run({"x": 1}, tracking_id=unique("later_run"), run_at=run_at)
    assert claim(storage) == []
    claimed = eventually(lambda: claim(storage), timeout=10, interval=0.05)
    assert time.time() >= run_at.timestamp() - 0.1  # databases round to the ms
    assert [n.step_name for n in claimed] == ["s"]

    # A run_at already past runs at once.
    flow.run(tracking_id=unique("past_run"), run_at=datetime.now(UTC) - timedelta(hours=1))
    assert len(claim(storage)) == 1


def test_run_at_must_be_aware_and_alone(unique: Callable[[str], str]) -> None:
    """A naive datetime is refused with a hint to pass tzinfo; delay with run_at is refused."""
    from flowsmith_worker.storage import InMemoryStorage

    storage = InMemoryStorage()
    flow = Flow(unique("aware"), storage).step("s", lambda ctx: None)
    with pytest.raises(ValueError, match="naive datetime: pass tzinfo"):
        flow.run(run_at=datetime.now() + timedelta(minutes=1))  # naive on purpose
    with pytest.raises(ValueError, match="not both"):
        flow.run(delay=5, run_at=datetime.now(UTC))
    assert storage.stats().flows_by_status.get("PENDING", 0) == 0


def test_workflow_decorator_registers_the_schedule(
    storage: Storage, unique: Callable[[str], str]
) -> None:
    """@workflow(schedule=...) sets the cron, the default Scheduler finds it; a bad one fails."""
    name = unique("nightly")

    @workflow(name, storage=storage, schedule="30 2 * * *")
    def nightly() -> None:
        @step
        def report(ctx: Any) -> None:
            return None

    assert nightly.flow.cron == "30 2 * * *"
    assert nightly.flow.cron_input == {}
    assert nightly.flow in scheduled_flows()
    clock = Clock(datetime(2030, 1, 2, 2, 31, tzinfo=UTC))
    assert f"{name}@2030-01-02T02:30Z" in Scheduler(storage, clock=clock).run_once()

    bad = unique("bad_schedule")
    with pytest.raises(ValueError, match="every day"):

        @workflow(bad, schedule="every day")
        def never() -> None:
            @step
            def s(ctx: Any) -> None:
                return None

    assert all(f.name != bad for f in scheduled_flows())


def test_running_workers_enqueue_the_current_tick_once(
    storage: Storage, unique: Callable[[str], str]
) -> None:
    """Three workers' loops all see the tick; one run per tick exists, and it completes."""
    flow = Flow(unique("every_minute"), storage=storage).step("tick", lambda ctx: "ran")
    flow.schedule("* * * * *")
    first_tick = datetime.now(UTC).replace(second=0, microsecond=0)
    workers = [Worker(storage=storage, poll_interval=0.05) for _ in range(3)]
    threads = [threading.Thread(target=w.run, daemon=True) for w in workers]
    for thread in threads:
        thread.start()
    try:
        done = eventually(
            lambda: any(
                r.status == FlowStatus.COMPLETED
                for r in storage.list_flows(where=FlowFilter(flow_name=flow.name))
            ),
            timeout=20,
        )
    finally:
        for worker in workers:
            worker.stop()
        for thread in threads:
            thread.join(30)
    last_tick = datetime.now(UTC).replace(second=0, microsecond=0)
    assert done
    ticks = {tick_tracking_id(flow.name, first_tick), tick_tracking_id(flow.name, last_tick)}
    runs = storage.list_flows(where=FlowFilter(flow_name=flow.name))
    assert {r.tracking_id for r in runs} <= ticks and len(runs) <= len(ticks)

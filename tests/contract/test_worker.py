"""The worker's heartbeat and its registration, on every backend, with real threads.

The heartbeat renews leases on a thread of its own: a stalled main loop does
not lose the lease of a running step, and a worker that could not renew for a
whole lease writes no outcome (the node may be running elsewhere by then).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa

from flowsmith_worker import Flow, FlowStatus, NodeStatus, Worker
from flowsmith_worker.storage.base import Storage, WorkerRecord
from flowsmith_worker.storage.sql import schema
from tests.conftest import eventually

Names = Callable[[str], str]
LEASE = 1.0


def test_a_stalled_main_loop_does_not_lose_the_lease_of_a_running_step(
    storage: Storage, unique: Names
) -> None:
    """The loop blocks after its first claim for 3 leases; the step (2.5 s) keeps its lease.

    Meanwhile a second worker rescues and claims all the time: it never gets the
    node, and the step runs exactly once.
    """
    runs: list[int] = []
    flow = Flow(unique("f"), storage=storage).step(
        "slow", lambda ctx: (runs.append(ctx.attempt), time.sleep(2.5))[0], retries=3
    )
    run = flow.run({}, tracking_id=unique("t"))
    first = Worker(storage=storage, lease_seconds=LEASE, poll_interval=0.05)
    stall, claims = threading.Event(), 0
    real_claim = first.claim_once

    def claim_then_stall() -> int:
        nonlocal claims
        claims += 1
        if claims > 1:
            stall.wait(3 * LEASE)  # the loop is stuck, as in a long database backoff
        return real_claim()

    first.claim_once = claim_then_stall  # type: ignore[method-assign]
    loop = threading.Thread(target=first.run, daemon=True)
    loop.start()
    eventually(lambda: runs, timeout=10)
    second = Worker(storage=storage, lease_seconds=LEASE, poll_interval=0.05)
    deadline = time.monotonic() + 3 * LEASE
    while time.monotonic() < deadline:
        second.rescue_once()
        assert second.claim_once() == 0, "the running step's lease was lost"
        time.sleep(0.1)
    stall.set()
    assert run.wait(10) == {"slow": None}
    first.stop()
    loop.join(10)
    second.shutdown()
    assert runs == [1]
    [node] = run.trace()
    assert (node.attempt, node.rescues) == (1, 0)


def test_a_worker_that_cannot_renew_past_its_lease_writes_no_outcome(
    storage: Storage, unique: Names, logs: list[dict[str, Any]]
) -> None:
    """Another transaction holds the node's row (SQLite: the write lock) for 2.5 leases.

    The heartbeat cannot renew; the step ends after 2 leases, when the lease
    may be another worker's: the worker writes nothing, logs
    step.outcome_withheld, and the node is rescued and run again.
    """
    release = threading.Event()
    flow = Flow(unique("f"), storage=storage).step(
        "s", lambda ctx: time.sleep(2 * LEASE) if ctx.attempt == 1 else "again", retries=1
    )
    run = flow.run({}, tracking_id=unique("t"))
    worker = Worker(storage=storage, lease_seconds=LEASE, poll_interval=0.05)
    assert worker.claim_once() == 1
    [node] = worker.in_flight()
    locked = threading.Event()

    def hold_the_row() -> None:
        engine: sa.Engine = storage.engine  # type: ignore[attr-defined]
        with engine.begin() as conn:
            nodes = schema.nodes
            conn.execute(
                sa.update(nodes).where(nodes.c.id == node.node_id).values(priority=nodes.c.priority)
            )
            locked.set()
            release.wait(2.5 * LEASE)

    holder = threading.Thread(target=hold_the_row, daemon=True)
    holder.start()
    assert locked.wait(10)
    worker.heartbeat.start()
    eventually(lambda: not worker.in_flight(), timeout=10)
    release.set()
    holder.join(10)
    events = [e["event"] for e in logs]
    assert "step.outcome_withheld" in events, events
    assert "step.completed" not in events
    record = storage.get_flow(tracking_id=run.tracking_id)
    assert record is not None and record.status == FlowStatus.RUNNING
    worker.heartbeat.stop()
    time.sleep(LEASE)  # the lease the blocked renewal set runs out
    worker.run_until_idle(timeout=20)
    assert run.wait(5)["s"] == "again"
    [done] = run.trace()
    assert (done.status, done.attempt, done.rescues) == (NodeStatus.COMPLETED, 2, 1)


def test_a_worker_removed_as_dead_registers_again_at_its_next_heartbeat(
    storage: Storage,
) -> None:
    """Paused longer than three leases (SIGSTOP), its fs_workers row is removed; it comes back."""
    worker = Worker(storage=storage, lease_seconds=LEASE)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    eventually(lambda: [w.id for w in storage.list_workers()] == [worker.id], timeout=10)
    worker.heartbeat.stop()  # as if the process were paused
    time.sleep(3 * LEASE + 0.3)
    storage.remove_dead_workers()  # as any rescuer does (the worker's own loop too)
    eventually(lambda: storage.list_workers() == [], timeout=5)
    worker.heartbeat_once()
    assert [w.id for w in storage.list_workers()] == [worker.id]
    worker.stop()
    thread.join(10)


def test_a_worker_run_in_process_is_not_registered_by_its_heartbeat(storage: Storage) -> None:
    """run_until_idle() (tests, scripts) never registered: its heartbeat adds no row."""
    worker = Worker(storage=storage, lease_seconds=LEASE)
    worker.run_until_idle(timeout=5)
    worker.heartbeat_once()
    assert storage.list_workers() == []


def test_a_stopped_worker_in_process_leaves_a_running_step_to_its_lease(
    storage: Storage, unique: Names
) -> None:
    """Worker.run() in a thread of a process that lives on, stopped past its grace:
    the step's call still runs here, so its node is not handed to another worker
    (two attempts would run at once); the call's outcome is written when it returns.
    """
    release = threading.Event()
    flow = Flow(unique("f"), storage=storage)
    flow.step("slow", lambda ctx: release.wait(10))
    run = flow.run({}, tracking_id=unique("t"))
    worker = Worker(storage=storage, poll_interval=0.05, lease_seconds=30, shutdown_timeout=0.2)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    eventually(lambda: worker.in_flight())
    worker.stop(graceful=False)
    thread.join(10)
    assert not thread.is_alive()
    taken = storage.claim_nodes(worker_id="other", limit=5, lease_seconds=30, queues=["default"])
    assert taken == []
    release.set()
    assert run.wait(timeout=10) == {"slow": True}


def test_workers_register_heartbeat_and_dead_ones_are_removed(storage: Storage) -> None:
    """fs_workers keeps each worker's identity and in-flight count; a worker silent for
    three of its leases is removed, a live one stays until it unregisters."""
    record = WorkerRecord("w-dead", "host-a", 41, "0.1.0", ("default",), 4, 0.2, 0, 0.0, 0.0)
    storage.register_worker(worker=record)
    storage.register_worker(
        worker=WorkerRecord("w-live", "host-b", 42, "0.1.0", ("a", "b"), 8, 60, 0, 0.0, 0.0)
    )
    storage.worker_heartbeat(worker_id="w-live", in_flight=3)
    time.sleep(0.8)  # three leases of w-dead (0.2 s) pass without its heartbeat
    assert storage.remove_dead_workers() == 1
    [live] = storage.list_workers()
    assert (live.id, live.host, live.pid, live.queues, live.in_flight) == (
        "w-live",
        "host-b",
        42,
        ("a", "b"),
        3,
    )
    assert live.heartbeat_at >= live.started_at > 0
    storage.unregister_worker(worker_id="w-live")
    assert storage.list_workers() == []


def test_a_running_worker_is_listed_and_gone_after_a_clean_stop(storage: Storage) -> None:
    """A Worker run in a thread lists itself with this process's pid and unregisters when
    it stops cleanly."""
    worker = Worker(storage=storage, poll_interval=0.05)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    [listed] = eventually(storage.list_workers, timeout=10)
    assert (listed.id, listed.pid) == (worker.id, os.getpid())
    worker.stop()
    thread.join(30)
    assert storage.list_workers() == []

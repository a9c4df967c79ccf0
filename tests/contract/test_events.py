"""Waiting for events (Flow.wait_for, wait_for() in @workflow, send_event), on every
backend (memory, sqlite, PostgreSQL, MySQL).

A waiting run's node is parked in the database (see flowsmith_worker/parking.py);
send_event stores the event in fs_events and wakes the wait in one transaction.
Real Worker loops run the flows; events are sent from the test, from other
threads, while the workers run.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import pytest

from flowsmith_worker import (
    EventRefused,
    Flow,
    FlowNotFound,
    FlowStatus,
    InvalidIdentifier,
    NodeStatus,
    PayloadNotJSON,
    RunNotRetryable,
    Worker,
    send_event,
    send_event_async,
)
from flowsmith_worker.decorators import step, wait_for, workflow
from flowsmith_worker.records import AttemptOutcome
from flowsmith_worker.storage.base import Storage
from tests.conftest import eventually
from tests.support.parking import POLL, drive, outcomes, parked
from tests.support.runs import nodes_of, status_of

Names = Callable[[str], str]


def approval_flow(storage: Storage, name: str, **wait: Any) -> Flow:
    return (
        Flow(name, storage=storage)
        .step("submit", lambda ctx: "submitted")
        .wait_for("approval", **wait)
        .step("decide", lambda ctx: ctx.data["approval"])
    )


def test_an_event_wakes_the_waiting_run_and_is_the_steps_output(
    storage: Storage, unique: Names
) -> None:
    """The run parks at its wait (no node RUNNING); send_event wakes it and its payload
    is the wait step's output, which the next step reads from ctx.data."""
    flow = approval_flow(storage, unique("f"))
    tid = unique("t")
    run = flow.run({}, tracking_id=tid)
    worker = Worker(storage=storage, poll_interval=POLL)
    drive(worker, lambda: parked(storage, tid, "approval"))
    assert not any(n.status == NodeStatus.RUNNING for n in nodes_of(storage, tid).values())

    sent = send_event(tid, "approval", {"approved": True, "by": "ana"}, storage=storage)
    assert sent.delivered and sent.woke
    drive(worker, lambda: status_of(storage, tid) == FlowStatus.COMPLETED)
    assert run.wait(5)["decide"] == {"approved": True, "by": "ana"}
    node = nodes_of(storage, tid)["approval"]
    assert outcomes(node) == [AttemptOutcome.PARKED, AttemptOutcome.COMPLETED]


def test_an_event_sent_before_the_run_waits_is_kept_for_it(storage: Storage, unique: Names) -> None:
    """An event sent while the run is still at an earlier step is stored; the wait finds
    it on arrival and completes at its first attempt, without parking."""
    flow = approval_flow(storage, unique("f"))
    tid = unique("t")
    run = flow.run({}, tracking_id=tid)
    sent = send_event(tid, "approval", ["early"], storage=storage)
    assert sent.delivered and not sent.woke
    drive(
        Worker(storage=storage, poll_interval=POLL), lambda: status_of(storage, tid) == "COMPLETED"
    )
    assert run.wait(5)["decide"] == ["early"]
    assert outcomes(nodes_of(storage, tid)["approval"]) == [AttemptOutcome.COMPLETED]


def test_the_same_idempotency_key_delivers_once(storage: Storage, unique: Names) -> None:
    """A second send with the first one's key writes nothing (its payload is not used);
    one with another key, or none, is refused: a wait takes one event."""
    flow = approval_flow(storage, unique("f"))
    tid = unique("t")
    run = flow.run({}, tracking_id=tid)
    first = send_event(tid, "approval", "first", idempotency_key="hook-1", storage=storage)
    again = send_event(tid, "approval", "second", idempotency_key="hook-1", storage=storage)
    assert first.delivered and not again.delivered
    with pytest.raises(EventRefused, match="already has one"):
        send_event(tid, "approval", "third", idempotency_key="hook-2", storage=storage)
    with pytest.raises(EventRefused, match="already has one"):
        send_event(tid, "approval", "fourth", storage=storage)
    drive(
        Worker(storage=storage, poll_interval=POLL), lambda: status_of(storage, tid) == "COMPLETED"
    )
    assert run.wait(5)["decide"] == "first"
    # Sent again after the run finished, with its key: still a no-op, not an error.
    assert not send_event(
        tid, "approval", "late", idempotency_key="hook-1", storage=storage
    ).delivered


def test_events_the_run_cannot_take_are_refused(storage: Storage, unique: Names) -> None:
    """An unknown run (FlowNotFound), a name the run does not wait for, and a finished
    run (EventRefused) are refused with a message naming them; nothing is stored."""
    flow = approval_flow(storage, unique("f"))
    with pytest.raises(FlowNotFound, match="no flow run has tracking_id 'nobody'"):
        send_event("nobody", "approval", storage=storage)
    tid = unique("t")
    flow.run({}, tracking_id=tid)
    with pytest.raises(
        EventRefused, match=r"no wait_for step of that name \(its waits: 'approval'\)"
    ):
        send_event(tid, "aproval", storage=storage)
    storage.cancel_flow(tracking_id=tid)
    with pytest.raises(EventRefused, match="is CANCELLED"):
        send_event(tid, "approval", storage=storage)


def test_a_payload_or_name_that_cannot_be_stored_is_refused_before_any_write(
    storage: Storage, unique: Names
) -> None:
    """The payload must be JSON and the names storable: checked before the database."""
    flow = approval_flow(storage, unique("f"))
    tid = unique("t")
    flow.run({}, tracking_id=tid)
    with pytest.raises(PayloadNotJSON):
        send_event(tid, "approval", {"when": object()}, storage=storage)
    with pytest.raises(InvalidIdentifier):
        send_event(tid, "approval\x00", storage=storage)
    assert send_event(tid, "approval", "fine", storage=storage).delivered


def test_a_wait_that_times_out_fails_its_run_then_waits_afresh_on_retry(
    storage: Storage, unique: Names
) -> None:
    """timeout= without the event fails the step and the run, saying what to do; a
    retry of the run waits again (its wake time is cleared), and an event then ends it."""
    flow = approval_flow(storage, unique("f"), timeout=0.3)
    tid = unique("t")
    run = flow.run({}, tracking_id=tid)
    worker = Worker(storage=storage, poll_interval=POLL)
    drive(worker, lambda: status_of(storage, tid) == FlowStatus.FAILED)
    record = storage.get_flow(tracking_id=tid, with_payloads=False)
    assert record is not None and record.error is not None
    assert "wait_for 'approval' timed out" in record.error
    assert "send-event" in record.error

    storage.resume_flow(tracking_id=tid)
    drive(worker, lambda: parked(storage, tid, "approval"))
    send_event(tid, "approval", "late but fine", storage=storage)
    drive(worker, lambda: status_of(storage, tid) == FlowStatus.COMPLETED)
    assert run.wait(5)["decide"] == "late but fine"


def test_a_timed_out_wait_of_a_run_with_compensations_promises_no_refused_retry(
    storage: Storage, unique: Names
) -> None:
    """A wait times out in a run whose completed step has compensate=: the run is
    compensated, and neither its error nor the refusal of a late event tells to
    `flowsmith retry` it (a compensated run refuses a retry); both say why and that a
    new run is needed."""
    undone: list[str] = []
    flow = (
        Flow(unique("f"), storage=storage)
        .step("submit", lambda ctx: "submitted", compensate=lambda ctx: undone.append("s"))
        .wait_for("approval", timeout=0.3)
    )
    tid = unique("t")
    run = flow.run({}, tracking_id=tid)
    worker = Worker(storage=storage, poll_interval=POLL)
    drive(worker, lambda: status_of(storage, tid) == FlowStatus.FAILED)
    assert undone == ["s"]
    with pytest.raises(RunNotRetryable):
        run.retry()
    with pytest.raises(EventRefused, match="never retried") as refused:
        send_event(tid, "approval", "too late", storage=storage)
    assert "retry` it first" not in str(refused.value)
    record = storage.get_flow(tracking_id=tid, with_payloads=False)
    assert record is not None and record.error is not None
    assert "wait_for 'approval' timed out" in record.error
    assert "cannot be retried" in record.error
    assert "to go on, `flowsmith retry`" not in record.error


def test_a_wait_with_a_default_outputs_it_on_timeout(storage: Storage, unique: Names) -> None:
    """on_timeout=<value>: past the timeout the step completes with that value."""
    flow = approval_flow(storage, unique("f"), timeout=0.2, on_timeout={"approved": False})
    tid = unique("t")
    run = flow.run({}, tracking_id=tid)
    drive(
        Worker(storage=storage, poll_interval=POLL), lambda: status_of(storage, tid) == "COMPLETED"
    )
    assert run.wait(5)["decide"] == {"approved": False}


def test_wait_for_in_the_decorator_api(storage: Storage, unique: Names) -> None:
    """wait_for() called in a @workflow body adds the same parked step as Flow.wait_for."""

    @workflow(unique("decorated"), storage=storage)
    def decorated() -> None:
        @step
        def ask(ctx: Any) -> str:
            return "asked"

        wait_for("answer")

        @step
        def use(ctx: Any) -> Any:
            return [ctx.data["ask"], ctx.data["answer"]]

    tid = unique("t")
    run = decorated({}, tracking_id=tid)
    worker = Worker(storage=storage, poll_interval=POLL)
    drive(worker, lambda: parked(storage, tid, "answer"))
    send_event(tid, "answer", 42, storage=storage)
    drive(worker, lambda: status_of(storage, tid) == FlowStatus.COMPLETED)
    assert run.wait(5)["use"] == ["asked", 42]


def test_events_sent_while_waits_park_are_never_missed(storage: Storage, unique: Names) -> None:
    """Events are sent from another thread while two worker threads claim and park the
    waits: each event is either seen by its wait or wakes it once parked (both take the
    run's lock), so every run completes. A missed event would leave its run parked
    forever (no timeout), and the test would time out."""
    flow = approval_flow(storage, unique("f"))
    tids = [unique("t") for _ in range(12)]
    runs = [flow.run({"n": i}, tracking_id=tid) for i, tid in enumerate(tids)]
    workers = [Worker(storage=storage, concurrency=2, poll_interval=POLL) for _ in range(2)]
    threads = [threading.Thread(target=w.run, daemon=True) for w in workers]
    for thread in threads:
        thread.start()
    try:
        for i, tid in enumerate(tids):
            send_event(tid, "approval", i, storage=storage)
        eventually(
            lambda: all(status_of(storage, t) == FlowStatus.COMPLETED for t in tids), timeout=30
        )
    finally:
        for w in workers:
            w.stop()
        for thread in threads:
            thread.join(10)
    assert [r.wait(5)["decide"] for r in runs] == list(range(12))


def test_send_event_async_delivers_as_send_event(storage: Storage, unique: Names) -> None:
    """send_event_async, awaited from async code (a webhook handler), stores and delivers
    the event as send_event does; the same key again delivers nothing."""
    flow = approval_flow(storage, unique("f"))
    tid = unique("t")
    run = flow.run({}, tracking_id=tid)

    async def webhook() -> list[bool]:
        sends = [
            await send_event_async(
                tid, "approval", {"via": "hook"}, idempotency_key="h", storage=storage
            )
            for _ in range(2)
        ]
        return [sent.delivered for sent in sends]

    assert asyncio.run(webhook()) == [True, False]
    drive(
        Worker(storage=storage, poll_interval=POLL), lambda: status_of(storage, tid) == "COMPLETED"
    )
    assert run.wait(5)["decide"] == {"via": "hook"}


def test_run_until_idle_returns_while_a_run_waits_for_its_event(
    storage: Storage, unique: Names
) -> None:
    """A wait with no timeout is not work a worker can do: run_until_idle returns with
    the run parked, and once the event is sent, a second one finishes the run."""
    flow = approval_flow(storage, unique("f"))
    tid = unique("t")
    run = flow.run({}, tracking_id=tid)
    worker = Worker(storage=storage, poll_interval=POLL)
    worker.run_until_idle(timeout=10)
    assert parked(storage, tid, "approval")
    send_event(tid, "approval", "yes", storage=storage)
    worker.run_until_idle(timeout=10)
    assert run.wait(5)["decide"] == "yes"


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"timeout": 0}, ValueError),
        ({"timeout": -5}, ValueError),
        ({"on_timeout": {1j}}, Exception),
    ],
)
def test_a_wait_is_checked_when_it_is_defined(
    kwargs: dict[str, Any], error: type[Exception], unique: Names
) -> None:
    """timeout must be positive seconds; on_timeout must be storable JSON."""
    with pytest.raises(error):
        Flow(unique("f")).wait_for("approval", **kwargs)

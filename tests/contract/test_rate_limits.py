"""Rate limits of steps (Flow.step(rate_limit=...), @step(rate_limit=...)), on every backend.

The bucket is a row taken under its lock by the database clock (see
flowsmith_worker/rate_limits.py): these tests drive real Worker loops in threads
and read the stored rows. The race across several `flowsmith worker` processes
is in tests/integration/test_rate_limit_processes.py.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from flowsmith_worker import Compensation, Flow, FlowStatus, InMemoryStorage, NodeStatus, Worker
from flowsmith_worker.decorators import step, workflow
from flowsmith_worker.records import ClaimedNode
from flowsmith_worker.storage.base import Storage
from tests.conftest import eventually
from tests.support.cli import flow_of
from tests.support.rate_limits import (
    POLL,
    SLACK,
    completed,
    over_the_limit,
    steps_of,
    turn_until,
    waiting,
)

Names = Callable[[str], str]


def test_a_rate_limited_step_starts_no_faster_than_its_bucket_and_every_run_completes(
    storage: Storage, unique: Names
) -> None:
    """12 runs of a step limited to 3/s, claimed by 2 worker loops of 8 slots each:
    the journal of starts never has more in a window than the bucket allows (3 at
    once, then one every 1/3 s), the refused starts waited PENDING as RATE_LIMITED
    (no slot held), and every run completes."""
    journal: list[float] = []
    limited = Flow(unique("limited"), storage=storage).step(
        "call_api", lambda ctx: journal.append(time.time()), rate_limit="3/s"
    )
    runs = [limited.run({}, tracking_id=unique("r")).tracking_id for _ in range(12)]
    seen_waiting = _run_workers(storage, runs, loops=2, concurrency=8)

    assert len(journal) == 12
    assert not over_the_limit(journal, 3, 1.0)
    assert seen_waiting, "no start was ever refused a token"
    # 12 starts at 3/s with a burst of 3 take at least 3 s.
    assert max(journal) - min(journal) >= 3 - SLACK


def test_each_attempt_of_a_retried_step_is_a_start(storage: Storage, unique: Names) -> None:
    """A step limited to 1/s that fails twice before it succeeds (no backoff): its
    three attempts are three starts, each taking a token, so they span 2 s at least."""
    journal: list[float] = []

    def flaky(ctx: Any) -> str:
        journal.append(time.time())
        if len(journal) < 3:
            raise RuntimeError("try again")
        return "done"

    flaky_flow = Flow(unique("flaky"), storage=storage).step(
        "call_api", flaky, retries=2, backoff=0, rate_limit="1/s"
    )
    tid = unique("r")
    flaky_flow.run({}, tracking_id=tid)
    worker = Worker(storage=storage, poll_interval=POLL)
    turn_until(worker, lambda: completed(storage, [tid]))
    assert len(journal) == 3
    assert journal[2] - journal[0] >= 2 - SLACK, "a retry started without its token"


def test_the_decorator_api_takes_a_rate_limit_that_limits_its_own_step_only(
    storage: Storage, unique: Names
) -> None:
    """@step(rate_limit="1/h") limits its own step only: the first run's start takes the
    one token of the hour; a second run's start of that step waits (RATE_LIMITED, due
    within the hour), while the unlimited step before it ran for both."""
    ran: list[str] = []

    @workflow(unique("decorated"), storage=storage)
    def decorated() -> None:
        @step
        def free(ctx: Any) -> None:
            ran.append("free")

        @step(rate_limit="1/h")
        def scarce(ctx: Any) -> None:
            ran.append("scarce")

    first, second = unique("first"), unique("second")
    decorated({}, tracking_id=first)
    worker = Worker(storage=storage, poll_interval=POLL)
    turn_until(worker, lambda: completed(storage, [first]))
    decorated({}, tracking_id=second)
    turn_until(worker, lambda: steps_of(storage, second).get("scarce") is not None)
    turn_until(worker, lambda: waiting(storage, [second]))
    node = steps_of(storage, second)["scarce"]
    assert node.status == NodeStatus.PENDING
    assert ran == ["free", "scarce", "free"]
    assert node.wake_at is not None
    assert node.run_after == pytest.approx(node.wake_at, abs=1.0)  # due at its turn
    now = time.time()
    assert now < node.wake_at <= now + 3600 + SLACK


def test_a_cancelled_run_waiting_for_its_rate_limit_ends(storage: Storage, unique: Names) -> None:
    """A run whose limited step waits for its turn is cancelled: the node ends
    CANCELLED and never starts."""
    ran: list[str] = []
    limited = Flow(unique("limited"), storage=storage).step(
        "scarce", lambda ctx: ran.append("x"), rate_limit="1/h"
    )
    first, second = unique("first"), unique("second")
    limited.run({}, tracking_id=first)
    limited.run({}, tracking_id=second)
    worker = Worker(storage=storage, poll_interval=POLL)
    turn_until(worker, lambda: len(ran) == 1 and waiting(storage, [first, second]))
    refused = first if waiting(storage, [first]) else second
    storage.cancel_flow(tracking_id=refused)
    assert steps_of(storage, refused)["scarce"].status == NodeStatus.CANCELLED
    assert ran == ["x"]


def _run_workers(storage: Storage, runs: list[str], *, loops: int, concurrency: int) -> bool:
    """Run ``loops`` Worker loops in threads until every run completes; whether any
    limited node was seen waiting for its turn meanwhile."""
    stop = threading.Event()
    workers = [
        Worker(storage=storage, concurrency=concurrency, poll_interval=POLL) for _ in range(loops)
    ]

    def loop(worker: Worker) -> None:
        while not stop.is_set():
            worker.run_once()
            time.sleep(POLL)

    threads = [threading.Thread(target=loop, args=(w,), daemon=True) for w in workers]
    for thread in threads:
        thread.start()
    seen_waiting = False

    def all_done() -> bool:
        nonlocal seen_waiting
        seen_waiting = seen_waiting or waiting(storage, runs)
        return all(completed(storage, [tid]) for tid in runs)

    try:
        eventually(all_done, timeout=30, interval=0.05)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=10)
    return seen_waiting


class ClaimsSeen(InMemoryStorage):
    """An in-memory storage that remembers which steps its claims handed out."""

    def __init__(self) -> None:
        super().__init__()
        self.claimed: list[str] = []

    def claim_nodes(
        self, *, worker_id: str, limit: int, lease_seconds: float, queues: Sequence[str]
    ) -> list[ClaimedNode]:
        found = super().claim_nodes(
            worker_id=worker_id, limit=limit, lease_seconds=lease_seconds, queues=queues
        )
        self.claimed += [node.step_name for node in found]
        return found


def test_a_limited_step_chained_after_the_one_before_takes_a_token_too(unique: Names) -> None:
    """A limited step after a plain one is leased by that step's commit (chained, never
    claimed): it still takes its token. The second run's limited step is refused and
    waits, and no claim ever handed out the limited step."""
    storage = ClaimsSeen()
    ran: list[str] = []
    chain = (
        Flow(unique("chain"), storage=storage)
        .step("free", lambda ctx: None)
        .step("scarce", lambda ctx: ran.append(ctx.tracking_id), rate_limit="1/h")
    )
    first, second = unique("first"), unique("second")
    chain.run({}, tracking_id=first)
    chain.run({}, tracking_id=second)
    worker = Worker(storage=storage, concurrency=1, poll_interval=POLL)
    turn_until(worker, lambda: completed(storage, [first]) and waiting(storage, [second]))
    assert ran == [first]
    assert "scarce" not in storage.claimed, "the limited step was claimed, not chained"
    storage.close()


def _group_with_a_limited_sibling(
    storage: Storage, unique: Names, ran: list[str], undone: list[str]
) -> Flow:
    """A flow: "book" (compensated), then a parallel group [boom, limited (1/h)];
    boom fails when ctx.data["fail"], limited records the run it ran in."""

    def boom(ctx: Any) -> None:
        if ctx.data["fail"]:
            raise RuntimeError("boom")

    flow = Flow(unique("undo"), storage=storage).step(
        "book", lambda ctx: None, compensate=lambda ctx: undone.append(ctx.tracking_id)
    )
    with flow.parallel():
        flow.step("boom", boom)
        flow.step("limited", lambda ctx: ran.append(ctx.tracking_id), rate_limit="1/h")
    return flow


def _token_once_compensating(
    storage: Storage, monkeypatch: pytest.MonkeyPatch, tracking_id: str
) -> None:
    """Make the run ``tracking_id``'s limited step ask for its token only once the run
    is COMPENSATING: its sibling failed the run while it was claimed, before its start."""
    take = storage.take_rate_token
    failing = flow_of(storage, tracking_id).id

    def late_take(**kwargs: Any) -> Any:
        if kwargs["lease"].flow_id == failing:
            eventually(
                lambda: flow_of(storage, tracking_id).status == FlowStatus.COMPENSATING,
                timeout=20,
            )
        return take(**kwargs)

    monkeypatch.setattr(storage, "take_rate_token", late_take)


def _compensated_without_the_limited_step(
    storage: Storage, flow: Flow, tid: str, ran: list[str], undone: list[str]
) -> None:
    """Run ``tid`` (boom fails it) with two slots: it ends FAILED and COMPENSATED, its
    limited step stopped, never run and never left waiting for its turn."""
    worker = Worker(storage=storage, concurrency=2, poll_interval=POLL)
    try:
        turn_until(worker, lambda: flow_of(storage, tid).status == FlowStatus.FAILED)
    finally:
        worker.shutdown()
    assert tid not in ran, "the limited step ran inside a failed run"
    assert undone == [tid]
    assert flow.get_run(tid).compensation() == Compensation.COMPENSATED
    limited = steps_of(storage, tid)["limited"]
    assert limited.status not in (NodeStatus.PENDING, NodeStatus.RUNNING, NodeStatus.COMPLETED)
    assert not waiting(storage, [tid])


def test_a_limited_sibling_of_a_compensating_run_is_stopped_and_spends_no_token(
    storage: Storage, unique: Names, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A parallel group [boom, limited 1/h]: boom fails the run while limited is
    claimed, which asks for its token only then (its bucket still has the hour's
    token). It is stopped, not started: the compensation runs, the run ends FAILED
    and COMPENSATED, and the token is left for a later run, whose limited step
    starts at once."""
    ran: list[str] = []
    undone: list[str] = []
    flow = _group_with_a_limited_sibling(storage, unique, ran, undone)
    failing, later = unique("failing"), unique("later")
    flow.run({"fail": True}, tracking_id=failing)
    _token_once_compensating(storage, monkeypatch, failing)
    _compensated_without_the_limited_step(storage, flow, failing, ran, undone)

    flow.run({"fail": False}, tracking_id=later)
    worker = Worker(storage=storage, poll_interval=POLL)
    turn_until(worker, lambda: completed(storage, [later]) or waiting(storage, [later]))
    assert completed(storage, [later]), "the failed run spent the hour's token"
    assert ran == [later]


def test_a_limited_sibling_with_no_token_left_does_not_hold_a_compensating_run(
    storage: Storage, unique: Names, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As above, but an earlier run spent the hour's token: the limited sibling of the
    failed run is not parked PENDING for an hour (holding its run, its compensation
    not started) but stopped, and the run compensates at once."""
    ran: list[str] = []
    undone: list[str] = []
    flow = _group_with_a_limited_sibling(storage, unique, ran, undone)
    earlier, failing = unique("earlier"), unique("failing")
    flow.run({"fail": False}, tracking_id=earlier)
    worker = Worker(storage=storage, poll_interval=POLL)
    turn_until(worker, lambda: completed(storage, [earlier]))
    assert ran == [earlier]

    flow.run({"fail": True}, tracking_id=failing)
    _token_once_compensating(storage, monkeypatch, failing)
    _compensated_without_the_limited_step(storage, flow, failing, ran, undone)


def test_a_skipped_limited_step_spends_no_token(storage: Storage, unique: Names) -> None:
    """A step limited to 1/h with a condition: its condition is evaluated before its
    token is taken, so a run that skips it leaves the hour's token to the next run,
    whose step starts at once instead of waiting an hour for its turn."""
    notified: list[str] = []
    flow = Flow(unique("notify"), storage=storage).step(
        "notify",
        lambda ctx: notified.append(ctx.tracking_id),
        rate_limit="1/h",
        condition=lambda ctx: ctx.data["vip"],
    )
    skipped, vip = unique("skipped"), unique("vip")
    flow.run({"vip": False}, tracking_id=skipped)
    worker = Worker(storage=storage, poll_interval=POLL)
    turn_until(worker, lambda: completed(storage, [skipped]))
    assert steps_of(storage, skipped)["notify"].status == NodeStatus.SKIPPED

    flow.run({"vip": True}, tracking_id=vip)
    turn_until(worker, lambda: completed(storage, [vip]) or waiting(storage, [vip]))
    assert completed(storage, [vip]), "the skipped step spent the hour's token"
    assert notified == [vip]

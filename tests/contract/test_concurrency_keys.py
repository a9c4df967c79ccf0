"""Concurrency keys (Flow(concurrency_key=, max_concurrent=), @workflow's), on every backend.

At most N runs of a flow per key in flight; the others wait with their first
stage BLOCKED (never claimed) and start in the order they were enqueued, each
when a run of the key ends: completed, failed for good or cancelled (see
flowsmith_worker/concurrency.py). These tests drive real Worker loops with
several slots, journal when each run's steps start and end, and read the
stored rows. Races between worker processes are in
tests/integration/test_concurrency_processes.py.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from flowsmith_worker import Flow, FlowStatus, NodeStatus, Worker
from flowsmith_worker.concurrency import IN_FLIGHT
from flowsmith_worker.context import Context
from flowsmith_worker.decorators import step, workflow
from flowsmith_worker.errors import ConcurrencyKeyFailed, FlowNotFound, InvalidIdentifier
from flowsmith_worker.storage.base import DEFAULT_QUEUE, Storage
from tests.conftest import eventually

Names = Callable[[str], str]
POLL = 0.02
STEP_SECONDS = 0.05  # long enough that runs let run together would overlap


class Journal:
    """When each run's steps started and ended (this process's monotonic clock)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.spans: dict[str, list[float]] = {}  # tracking_id -> [first start, last end]
        self.starts: list[str] = []  # tracking_ids in the order their first step began

    def step(self, ctx: Context) -> None:
        assert ctx.tracking_id is not None
        with self._lock:
            if ctx.tracking_id not in self.spans:
                self.starts.append(ctx.tracking_id)
                self.spans[ctx.tracking_id] = [time.monotonic(), 0.0]
        time.sleep(STEP_SECONDS)
        with self._lock:
            self.spans[ctx.tracking_id][1] = time.monotonic()

    def most_at_once(self, tracking_ids: list[str]) -> int:
        """The most of these runs that were between their first start and last end at once."""
        edges = sorted(
            edge
            for tid in tracking_ids
            if tid in self.spans
            for edge in ((self.spans[tid][0], 1), (self.spans[tid][1], -1))
        )
        most = now = 0
        for _, change in edges:  # at equal times an end (-1) sorts before a start
            now += change
            most = max(most, now)
        return most


def record_of(storage: Storage, tracking_id: str) -> Any:
    record = storage.get_flow(tracking_id=tracking_id, with_payloads=False)
    assert record is not None
    return record


def node_statuses(storage: Storage, tracking_id: str) -> list[NodeStatus]:
    return [n.status for n in storage.list_nodes(flow_id=record_of(storage, tracking_id).id)]


def drive(worker: Worker, done: Callable[[], Any], timeout: float = 30.0) -> Any:
    def turn() -> Any:
        worker.run_once()
        return done()

    return eventually(turn, timeout=timeout, interval=POLL)


def all_finished(storage: Storage, tracking_ids: list[str]) -> bool:
    finished = (FlowStatus.COMPLETED, FlowStatus.FAILED, FlowStatus.CANCELLED)
    return all(record_of(storage, tid).status in finished for tid in tracking_ids)


def keyed_flow(storage: Storage, name: str, journal: Journal, limit: int) -> Flow:
    return (
        Flow(
            name,
            storage=storage,
            concurrency_key=lambda ctx: ctx.data["customer"],
            max_concurrent=limit,
        )
        .step("first", journal.step)
        .step("second", journal.step)
    )


def test_runs_beyond_the_limit_wait_blocked_and_start_in_enqueue_order(
    storage: Storage, unique: Names
) -> None:
    """max_concurrent=1, five runs of key "acme" and one of "zeta", a worker with 6 slots:
    at enqueue only the first acme run and the zeta run may be claimed (the others'
    first step is BLOCKED and they wait in line); the acme runs then run one at a
    time, in the order they were enqueued, while zeta runs beside them."""
    journal = Journal()
    flow = keyed_flow(storage, unique("keyed"), journal, limit=1)
    acme = [flow.run({"customer": "acme"}, tracking_id=unique("a")).tracking_id for _ in range(5)]
    zeta = flow.run({"customer": "zeta"}, tracking_id=unique("z")).tracking_id

    assert node_statuses(storage, acme[0]) == [NodeStatus.PENDING]
    assert node_statuses(storage, zeta) == [NodeStatus.PENDING]
    for tid in acme[1:]:
        assert node_statuses(storage, tid) == [NodeStatus.BLOCKED]
        record = record_of(storage, tid)
        assert record.concurrency_key == "acme"
        assert record.key_turn is not None and record.key_turn > IN_FLIGHT

    worker = Worker(storage=storage, concurrency=6, poll_interval=POLL)
    drive(worker, lambda: all_finished(storage, [*acme, zeta]))
    assert all(record_of(storage, t).status == FlowStatus.COMPLETED for t in [*acme, zeta])
    assert journal.most_at_once(acme) == 1
    assert [t for t in journal.starts if t in acme] == acme
    assert all(record_of(storage, t).key_turn is None for t in [*acme, zeta])


def test_at_most_n_in_flight_with_a_limit_of_two(storage: Storage, unique: Names) -> None:
    """max_concurrent=2 and six runs of one key on a worker of 6 slots: never more than
    two of them between their first step's start and their last step's end, and
    at some moment two (the limit is used, not only respected)."""
    journal = Journal()
    flow = keyed_flow(storage, unique("two"), journal, limit=2)
    runs = [flow.run({"customer": "acme"}, tracking_id=unique("r")).tracking_id for _ in range(6)]
    worker = Worker(storage=storage, concurrency=6, poll_interval=POLL)
    drive(worker, lambda: all_finished(storage, runs))
    assert journal.most_at_once(runs) == 2
    assert journal.starts[:2] == runs[:2]


def test_a_run_failed_for_good_or_cancelled_hands_its_place_on(
    storage: Storage, unique: Names
) -> None:
    """Three runs of one key, limit 1: the first fails for good (no retries left), the
    second is cancelled while it waits in line; the third then gets the place and
    completes. A waiting run cancelled leaves the line (its node CANCELLED)."""
    journal = Journal()

    def first(ctx: Context) -> None:
        if ctx.data["fail"]:
            raise RuntimeError("card declined")
        journal.step(ctx)

    flow = Flow(
        unique("ends"),
        storage=storage,
        concurrency_key=lambda ctx: ctx.data["customer"],
        max_concurrent=1,
    ).step("first", first)
    failing = flow.run({"customer": "c", "fail": True}, tracking_id=unique("f")).tracking_id
    cancelled = flow.run({"customer": "c", "fail": False}, tracking_id=unique("x"))
    last = flow.run({"customer": "c", "fail": False}, tracking_id=unique("l")).tracking_id
    cancelled.cancel()
    assert node_statuses(storage, cancelled.tracking_id) == [NodeStatus.CANCELLED]
    assert node_statuses(storage, last) == [NodeStatus.BLOCKED]

    worker = Worker(storage=storage, concurrency=3, poll_interval=POLL)
    drive(worker, lambda: record_of(storage, last).status == FlowStatus.COMPLETED)
    assert record_of(storage, failing).status == FlowStatus.FAILED
    assert journal.starts == [last]


def test_a_run_failed_by_its_rescue_limit_hands_its_place_on(
    storage: Storage, unique: Names
) -> None:
    """Two runs of one key, limit 1, a step with max_rescues=0: the first run's worker
    is lost (its lease expires, as in test_run_rules.py), so the rescue fails the step
    and the run at once; the second run, BLOCKED in line until then, gets the place
    and completes."""
    journal = Journal()
    flow = Flow(
        unique("lost"),
        storage=storage,
        concurrency_key=lambda ctx: ctx.data["customer"],
        max_concurrent=1,
    ).step("first", journal.step, max_rescues=0)
    lost = flow.run({"customer": "c"}, tracking_id=unique("lost")).tracking_id
    waiting = flow.run({"customer": "c"}, tracking_id=unique("w")).tracking_id
    assert node_statuses(storage, waiting) == [NodeStatus.BLOCKED]

    [taken] = storage.claim_nodes(
        worker_id="dead-worker", limit=10, lease_seconds=0.2, queues=[DEFAULT_QUEUE]
    )
    assert taken.tracking_id == lost
    time.sleep(0.3)
    [rescued] = storage.rescue_expired()
    assert rescued.failed
    assert record_of(storage, lost).status == FlowStatus.FAILED
    assert node_statuses(storage, waiting) == [NodeStatus.PENDING]

    worker = Worker(storage=storage, concurrency=2, poll_interval=POLL)
    drive(worker, lambda: record_of(storage, waiting).status == FlowStatus.COMPLETED)
    assert journal.starts == [waiting]


def test_a_compensating_run_keeps_its_place_until_its_compensations_end(
    storage: Storage, unique: Names
) -> None:
    """Limit 1: a run that fails for good and compensates is still in flight while its
    compensation runs; the next run of the key starts only after the run ends FAILED."""
    ends: dict[str, float] = {}
    starts: dict[str, float] = {}

    def reserve(ctx: Context) -> str:
        assert ctx.tracking_id is not None
        starts[ctx.tracking_id] = time.monotonic()
        return "reserved"

    def release(ctx: Context) -> None:
        time.sleep(STEP_SECONDS * 4)  # a slow undo: the next run would overlap it
        ends["release"] = time.monotonic()

    def charge(ctx: Context) -> None:
        if ctx.data["fail"]:
            raise RuntimeError("card declined")

    flow = (
        Flow(
            unique("undo"),
            storage=storage,
            concurrency_key=lambda ctx: ctx.data["customer"],
            max_concurrent=1,
        )
        .step("reserve", reserve, compensate=release)
        .step("charge", charge)
    )
    failing = flow.run({"customer": "c", "fail": True}, tracking_id=unique("f")).tracking_id
    nxt = flow.run({"customer": "c", "fail": False}, tracking_id=unique("n")).tracking_id

    worker = Worker(storage=storage, concurrency=3, poll_interval=POLL)
    drive(worker, lambda: record_of(storage, nxt).status == FlowStatus.COMPLETED)
    assert record_of(storage, failing).status == FlowStatus.FAILED
    assert starts[nxt] >= ends["release"]


def test_cancelling_the_run_in_flight_starts_the_next(storage: Storage, unique: Names) -> None:
    """Limit 1: cancelling the run that holds the place (before any worker ran it)
    starts the one waiting, in the cancel's own transaction."""
    flow = Flow(
        unique("cancel"),
        storage=storage,
        concurrency_key=lambda ctx: "one",
        max_concurrent=1,
    ).step("only", lambda ctx: None)
    holder = flow.run({}, tracking_id=unique("h"))
    waiter = flow.run({}, tracking_id=unique("w")).tracking_id
    assert node_statuses(storage, waiter) == [NodeStatus.BLOCKED]
    holder.cancel()
    assert node_statuses(storage, waiter) == [NodeStatus.PENDING]
    assert record_of(storage, waiter).key_turn == IN_FLIGHT


def test_a_failed_run_retried_takes_a_place_again(storage: Storage, unique: Names) -> None:
    """Limit 1: a FAILED run retried while another run of its key is in flight waits
    (its failed step BLOCKED, its key_turn the time of the retry, behind the runs
    already waiting); it runs once that run ends, and completes."""
    attempts: list[str] = []

    def flaky(ctx: Context) -> None:
        attempts.append(str(ctx.tracking_id))
        if ctx.data["fail"] and attempts.count(str(ctx.tracking_id)) == 1:
            raise RuntimeError("first attempt fails")

    flow = Flow(
        unique("retry"),
        storage=storage,
        concurrency_key=lambda ctx: "k",
        max_concurrent=1,
    ).step("flaky", flaky)
    worker = Worker(storage=storage, concurrency=2, poll_interval=POLL)
    failed = flow.run({"fail": True}, tracking_id=unique("f"))
    drive(worker, lambda: record_of(storage, failed.tracking_id).status == FlowStatus.FAILED)
    holder = flow.run({"fail": False}, tracking_id=unique("h")).tracking_id
    assert node_statuses(storage, holder) == [NodeStatus.PENDING]

    failed.retry()
    assert node_statuses(storage, failed.tracking_id) == [NodeStatus.BLOCKED]
    drive(worker, lambda: all_finished(storage, [holder, failed.tracking_id]))
    assert record_of(storage, failed.tracking_id).status == FlowStatus.COMPLETED
    assert attempts == [failed.tracking_id, holder, failed.tracking_id]


def test_the_decorator_api_takes_the_same_limit(storage: Storage, unique: Names) -> None:
    """@workflow(concurrency_key=..., max_concurrent=1): the second run of a key waits."""
    journal = Journal()

    @workflow(
        unique("decorated"),
        storage=storage,
        concurrency_key=lambda ctx: ctx.data["customer"],
        max_concurrent=1,
    )
    def decorated() -> None:
        @step
        def work(ctx: Context) -> None:
            journal.step(ctx)

    runs = [decorated({"customer": "acme"}, tracking_id=unique("d")).tracking_id for _ in range(3)]
    assert [node_statuses(storage, t) for t in runs] == [
        [NodeStatus.PENDING],
        [NodeStatus.BLOCKED],
        [NodeStatus.BLOCKED],
    ]
    drive(
        Worker(storage=storage, concurrency=3, poll_interval=POLL),
        lambda: all_finished(storage, runs),
    )
    assert journal.most_at_once(runs) == 1
    assert journal.starts == runs


def test_twenty_threads_enqueueing_one_key_at_once_fill_only_the_free_places(
    storage: Storage, unique: Names
) -> None:
    """A run of a key (limit 3) is in flight; then 20 threads each enqueue a run of that
    key at the same moment: exactly 2 of them get a place (their first step PENDING),
    18 wait BLOCKED, whatever the interleaving; the key's row, which exists already,
    is the lock that orders the enqueues."""
    flow = Flow(
        unique("threads"),
        storage=storage,
        concurrency_key=lambda ctx: "shared",
        max_concurrent=3,
    ).step("only", lambda ctx: None)
    first = flow.run({}, tracking_id=unique("first")).tracking_id
    barrier = threading.Barrier(20)
    tids = [unique("t") for _ in range(20)]
    errors: list[BaseException] = []

    def enqueue(tid: str) -> None:
        barrier.wait()
        try:
            flow.run({}, tracking_id=tid)
        except BaseException as exc:  # reported below, not lost in the thread
            errors.append(exc)

    threads = [threading.Thread(target=enqueue, args=(tid,)) for tid in tids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    assert node_statuses(storage, first) == [NodeStatus.PENDING]
    statuses = [node_statuses(storage, tid) for tid in tids]
    assert statuses.count([NodeStatus.PENDING]) == 2
    assert statuses.count([NodeStatus.BLOCKED]) == 18


def test_completions_racing_enqueues_never_pass_the_limit(storage: Storage, unique: Names) -> None:
    """A worker of 8 slots runs a key's runs (limit 2) while 4 threads keep enqueueing
    more: never more than two in flight, and every run completes (none is left
    waiting after the last one in flight ends)."""
    journal = Journal()
    flow = keyed_flow(storage, unique("racing"), journal, limit=2)
    tids = [unique("r") for _ in range(24)]
    stop = threading.Event()
    worker = Worker(storage=storage, concurrency=8, poll_interval=POLL)

    def enqueue(mine: list[str]) -> None:
        for tid in mine:
            flow.run({"customer": "acme"}, tracking_id=tid)
            time.sleep(0.01)

    def work() -> None:
        while not stop.is_set():
            worker.run_once()
            time.sleep(POLL)

    runner = threading.Thread(target=work)
    runner.start()
    try:
        enqueuers = [threading.Thread(target=enqueue, args=(tids[i::4],)) for i in range(4)]
        for thread in enqueuers:
            thread.start()
        for thread in enqueuers:
            thread.join(60)
        eventually(lambda: all_finished(storage, tids), timeout=60, interval=0.05)
    finally:
        stop.set()
        runner.join(30)
    assert all(record_of(storage, t).status == FlowStatus.COMPLETED for t in tids)
    assert journal.most_at_once(tids) <= 2


# -- refused at enqueue -----------------------------------------------------------


def test_a_key_function_that_raises_refuses_the_run_naming_the_flow(
    storage: Storage, unique: Names
) -> None:
    """The key function raises KeyError on an input without "customer": ConcurrencyKeyFailed
    names the flow and the error, and no run is stored."""
    name = unique("nokey")
    flow = Flow(
        name, storage=storage, concurrency_key=lambda ctx: ctx.data["customer"], max_concurrent=1
    ).step("only", lambda ctx: None)
    tid = unique("t")
    with pytest.raises(
        ConcurrencyKeyFailed, match=f"flow {name!r}: concurrency_key raised KeyError"
    ):
        flow.run({}, tracking_id=tid)
    with pytest.raises(FlowNotFound):
        flow.get_run(tid)


def test_a_key_that_is_not_a_name_refuses_the_run(storage: Storage, unique: Names) -> None:
    """A key function answering an int, or an empty string: InvalidIdentifier saying what
    the key must be, and no run is stored."""
    name = unique("badkey")
    flow = Flow(
        name, storage=storage, concurrency_key=lambda ctx: ctx.data["k"], max_concurrent=1
    ).step("only", lambda ctx: None)
    with pytest.raises(InvalidIdentifier, match=r"concurrency key .* must be a str, not int"):
        flow.run({"k": 42}, tracking_id=unique("t"))
    with pytest.raises(InvalidIdentifier, match=r"concurrency key .* is empty"):
        flow.run({"k": ""}, tracking_id=unique("t"))
    first = unique("t")
    with pytest.raises(InvalidIdentifier):
        flow.run_many([{"k": "ok"}, {"k": 7}], tracking_ids=[first, unique("t")])
    with pytest.raises(FlowNotFound):
        flow.get_run(first)  # the batch is all or nothing

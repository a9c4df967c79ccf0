"""Races, each run many rounds, on every backend where they apply (issue 11, point 4).

Each round starts its racers together on a barrier, each after a short random pause
(seeded by the round number: the same pauses on every run; the threads' scheduling
is the server's and the OS's), and then checks that the rules hold however they met:
one run per tracking_id, one retry per lost lease, one schema, one consistent end
for a run, an outcome counted once. 20 rounds a race in the default suite (the
migrate race, five processes a round, one round in twenty); for a long run before a
release:

    FLOWSMITH_RACE_ROUNDS=500 .venv/bin/python -m pytest tests/torture/test_races.py --timeout=0

Section 6 races ``send_event`` (issue 14) with a cancel, a retry and the parking of
the wait: every event is either consumed by its run or refused (EventRefused),
never accepted after the run was cancelled.
"""

from __future__ import annotations

import functools
import json
import os
import random
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest

from flowsmith_worker import Flow, FlowRun, FlowStatus, NodeStatus, send_event
from flowsmith_worker.errors import (
    EventRefused,
    FlowAlreadyCompleted,
    RunNotCancellable,
    RunNotRetryable,
)
from flowsmith_worker.plan import WAIT_FOR_EVENT, Plan, PlannedStep
from flowsmith_worker.storage import InMemoryStorage, create_storage
from flowsmith_worker.storage.base import (
    AttemptOutcome,
    Chain,
    ClaimedNode,
    Finished,
    Lease,
    NewFlow,
    NodeRecord,
    Storage,
    Woken,
)
from flowsmith_worker.storage.sql import SqlStorage, migrations, schema
from tests.conftest import database_url, eventually
from tests.support.locks import Background, lock_waits
from tests.support.schema import ALL_VERSIONS, FS_TABLES, schema_versions, table_names

Names = Callable[[str], str]

ROUNDS = int(os.environ.get("FLOWSMITH_RACE_ROUNDS", "20"))
# Random pause before each racer: up to 2 ms, longer than a round trip to the local
# servers, so the winner changes from round to round.
JITTER = 0.002
STEP_DONE = '"done"'  # a step's output, encoded as the executor encodes it


def raw_flow(tracking_id: str, *stages: tuple[PlannedStep, ...]) -> NewFlow:
    plan = Plan(stages=stages, module="tests.nowhere")
    return NewFlow(flow_name="raw", tracking_id=tracking_id, input={}, plan=plan)


def claim(storage: Storage, tracking_id: str, lease: float = 60) -> ClaimedNode:
    """Claim the runnable step of that run (leased for ``lease`` seconds; < 0: expired)."""
    claimed = storage.claim_nodes(worker_id="w", limit=10, lease_seconds=lease, queues=["default"])
    # Nothing else runnable: a round leaves no step behind for the next to claim.
    [node] = claimed
    assert node.tracking_id == tracking_id, node
    return node


def nodes_of(storage: Storage, tracking_id: str) -> dict[str, NodeRecord]:
    record = storage.get_flow(tracking_id=tracking_id)
    assert record is not None
    return {n.step_name: n for n in storage.list_nodes(flow_id=record.id)}


def race(round_no: int, *racers: Callable[[], Any]) -> list[Any]:
    """Run the racers in threads released together, each after its own random pause.

    Returns what each returned or raised, in the racers' order.
    """
    dice = random.Random(round_no)
    pauses = [dice.uniform(0, JITTER) for _ in racers]
    barrier = threading.Barrier(len(racers))
    outcomes: list[Any] = [RuntimeError("never ran")] * len(racers)

    def run(index: int) -> None:
        barrier.wait()
        time.sleep(pauses[index])
        try:
            outcomes[index] = racers[index]()
        except Exception as exc:
            outcomes[index] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(racers))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
        assert not thread.is_alive(), f"round {round_no}: a racer never finished"
    return outcomes


def assert_consistent(storage: Storage, tracking_id: str) -> FlowStatus:
    """Once every racer is done, the run and its nodes tell one story; its status."""
    record = storage.get_flow(tracking_id=tracking_id)
    assert record is not None
    nodes = {n.step_name: n.status for n in storage.list_nodes(flow_id=record.id)}
    if record.status == FlowStatus.COMPLETED:
        assert set(nodes.values()) <= {NodeStatus.COMPLETED, NodeStatus.SKIPPED}, nodes
    if record.status in (FlowStatus.CANCELLED, FlowStatus.FAILED):
        unfinished = {NodeStatus.PENDING, NodeStatus.RUNNING, NodeStatus.WAITING}
        assert not unfinished & set(nodes.values()), (record.status, nodes)
    if record.status == FlowStatus.RUNNING:
        assert NodeStatus.PENDING in nodes.values() or NodeStatus.RUNNING in nodes.values()
    return record.status


def rival_storage(storage: Storage) -> Storage:
    """A second storage on the same database, with its own connections (a second worker).

    The in-memory storage is private to its object: its rival is itself.
    """
    if isinstance(storage, InMemoryStorage):
        return storage
    assert isinstance(storage, SqlStorage)
    rival = create_storage(storage.engine.url.render_as_string(hide_password=False))
    rival.check_schema()
    return rival


# -- 1. fifty callers of flow.run with one tracking_id -----------------------------------


def test_fifty_threads_running_one_tracking_id_make_one_run(
    storage: Storage, unique: Names, logs: list[dict[str, Any]]
) -> None:
    """50 threads call flow.run with the same tracking_id at once, round after round:
    every caller gets a handle to the one run (none is refused: the run is not
    COMPLETED), exactly one of them enqueued it, and it has one node, not attempted yet.
    """
    flow = Flow(unique("f"), storage=storage).step("only", lambda ctx: 1)
    for round_no in range(ROUNDS):
        tid = unique("t")
        handles = race(round_no, *[functools.partial(flow.run, {"n": 1}, tracking_id=tid)] * 50)
        assert all(isinstance(h, FlowRun) and h.tracking_id == tid for h in handles), handles
        enqueued = [e for e in logs if e.get("tracking_id") == tid]
        assert Counter(e["event"] for e in enqueued) == {"flow.enqueued": 1, "flow.exists": 49}
        [node] = nodes_of(storage, tid).values()
        assert node.status == NodeStatus.PENDING and node.attempt == 0, node


def test_fifty_triggers_of_a_completed_run_are_all_refused_alike(
    storage: Storage, unique: Names
) -> None:
    """50 threads call flow.run with the tracking_id of a COMPLETED run at once: each gets
    the documented refusal (FlowAlreadyCompleted), and the run stays as it was.
    """
    flow = Flow(unique("f"), storage=storage).step("only", lambda ctx: 1)
    for round_no in range(max(1, ROUNDS // 4)):
        tid = unique("t")
        flow.run({"n": 1}, tracking_id=tid)
        assert storage.complete_node(lease=claim(storage, tid).lease, output="done")
        outcomes = race(round_no, *[functools.partial(flow.run, {"n": 2}, tracking_id=tid)] * 50)
        assert all(isinstance(o, FlowAlreadyCompleted) for o in outcomes), outcomes
        assert assert_consistent(storage, tid) == FlowStatus.COMPLETED


# -- 2. two workers rescuing the same expired lease --------------------------------------


def test_two_rescuers_of_one_expired_lease_make_one_retry(storage: Storage, unique: Names) -> None:
    """Two storages (two workers' watchdogs, each with its own connections) rescue the
    same expired lease at once: exactly one of them rescues it, the node is PENDING with
    one rescue and one RESCUED attempt, and its next claim is attempt 2, not 3.
    """
    rival = rival_storage(storage)
    try:
        for round_no in range(ROUNDS):
            storage.enqueue_flow(flow=raw_flow(tid := unique("t"), (PlannedStep("only", 1),)))
            claim(storage, tid, lease=-1)  # its worker is lost: the lease has expired
            found = race(round_no, storage.rescue_expired, rival.rescue_expired)
            assert sum(len(rescued) for rescued in found) == 1, found
            node = nodes_of(storage, tid)["only"]
            assert (node.status, node.rescues) == (NodeStatus.PENDING, 1), node
            assert [a.outcome for a in node.attempts] == [AttemptOutcome.RESCUED]
            assert claim(storage, tid).attempt == 2
    finally:
        if rival is not storage:
            rival.close()


# -- 3. `flowsmith migrate` from five processes at once ----------------------------------


@pytest.mark.parametrize("backend", ["sqlite", "postgresql", "mysql"])
def test_five_migrate_processes_at_once_build_one_schema(
    request: pytest.FixtureRequest, backend: str, tmp_path: Path
) -> None:
    """Five `flowsmith migrate` processes started together on an empty database, round
    after round: every one exits 0, the schema has exactly our tables, and each schema
    version is recorded once. (A round starts five processes: a twentieth of the rounds.)
    """
    for round_no in range(max(1, ROUNDS // 20)):
        url = database_url(request, backend, tmp_path / str(round_no))
        (tmp_path / str(round_no)).mkdir()
        outputs, codes = migrate_at_once(url, processes=5)
        assert codes == [0] * 5, outputs
        assert schema_versions(url) == ALL_VERSIONS
        assert table_names(url) == FS_TABLES


def migrate_at_once(url: str, processes: int) -> tuple[list[str], list[int]]:
    """Start that many `flowsmith migrate` processes together; their outputs and codes."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "flowsmith_worker", "migrate", "--url", url],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(processes)
    ]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    return outputs, [p.returncode for p in procs]


@pytest.mark.parametrize("backend", ["mysql"])
def test_a_migrate_taking_the_lock_just_let_go_sees_the_last_version_written(
    request: pytest.FixtureRequest, backend: str, tmp_path: Path
) -> None:
    """Regression (found by the race above): MySQL's migration lock is a named session
    lock, let go before the transaction's COMMIT. The version row written after the
    last DDL was still uncommitted then, so the next `flowsmith migrate` to take the
    lock read the version before it, applied that migration again and failed on the
    duplicate version row. Here the first migrate is held between letting go of the
    lock and its COMMIT: the second must find the schema done and succeed.
    """
    url = database_url(request, backend, tmp_path)
    first, second = (cast(SqlStorage, create_storage(url)) for _ in range(2))
    request.addfinalizer(first.close)
    request.addfinalizer(second.close)
    with first.engine.connect() as conn:
        conn.begin()
        migrations.migrate(conn, first.dialect)  # the lock is taken and let go; no COMMIT yet
        rival = Background(second.migrate)
        # It has read the version: it is either done or waiting on the version row.
        eventually(lambda: not rival.thread.is_alive() or lock_waits(second), interval=0.25)
        conn.commit()
    assert rival.result() == schema.SCHEMA_VERSION
    assert schema_versions(url) == ALL_VERSIONS


# -- 4. resume, cancel and completion of one run at the same moment ----------------------

TWO_STEPS = ((PlannedStep("a", 1),), (PlannedStep("b", 1),))


def finish_chained(storage: Storage, lease: Lease, step_name: str) -> list[str]:
    """The worker's side: complete ``step_name`` chaining the next step, and that one
    too, as the worker does; the steps it wrote (a lost lease ends the chain)."""
    written: list[str] = []
    chain = Chain(worker_id=lease.worker_id, lease_seconds=60)
    while True:
        finished = Finished(lease, NodeStatus.COMPLETED, STEP_DONE, step_name=step_name)
        [answer] = storage.complete_batch(finished=[finished], chain=chain)
        if not answer.won:
            return written
        written.append(step_name)
        if answer.chained is None:
            return written
        lease, step_name = answer.chained.lease, answer.chained.step_name


def test_cancel_racing_the_completion_of_a_step_leaves_one_consistent_end(
    storage: Storage, unique: Names
) -> None:
    """A run of two sequential steps: its worker completes `a` (chaining `b` to itself,
    then completing `b`) while an operator cancels the run. Either the run COMPLETED
    with both steps, or it is CANCELLED with nothing left pending or running (`b` never
    starts after the cancel); never a COMPLETED run with a cancelled step.
    """
    for round_no in range(ROUNDS):
        storage.enqueue_flow(flow=raw_flow(tid := unique("t"), *TWO_STEPS))
        step = claim(storage, tid)
        wrote, cancel = race(
            round_no,
            functools.partial(finish_chained, storage, step.lease, "a"),
            functools.partial(storage.cancel_flow, tracking_id=tid),
        )
        end = assert_consistent(storage, tid)
        if end == FlowStatus.COMPLETED:
            assert wrote == ["a", "b"], wrote
        if isinstance(cancel, Exception):
            assert isinstance(cancel, RunNotCancellable) and end == FlowStatus.COMPLETED
        else:
            assert end == FlowStatus.CANCELLED, (end, wrote)


@pytest.mark.parametrize("retry_delay", [None, 0.0], ids=["last-attempt", "retried"])
def test_cancel_racing_the_failure_of_a_step_leaves_one_consistent_end(
    storage: Storage, unique: Names, retry_delay: float | None
) -> None:
    """A step fails (its last attempt, failing the run; or re-queued for a retry) while
    an operator cancels the run. Failure first: a FAILED run refuses the cancel, a
    re-queued step is cancelled with its run. Cancel first: the failure ends the step
    CANCELLED and schedules no retry. Either way nothing is left pending or running.
    """
    attempts = 1 if retry_delay is None else 2
    stages = ((PlannedStep("a", attempts),), (PlannedStep("b", 1),))
    for round_no in range(ROUNDS):
        storage.enqueue_flow(flow=raw_flow(tid := unique("t"), *stages))
        step = claim(storage, tid)
        failed, cancel = race(
            round_no,
            functools.partial(
                storage.fail_node, lease=step.lease, error="x", retry_delay=retry_delay
            ),
            functools.partial(storage.cancel_flow, tracking_id=tid),
        )
        end = assert_consistent(storage, tid)
        if isinstance(cancel, Exception):
            assert isinstance(cancel, RunNotCancellable), cancel
            assert (retry_delay, failed, end) == (None, NodeStatus.FAILED, FlowStatus.FAILED)
            continue
        assert end == FlowStatus.CANCELLED, (end, failed)
        assert failed in (NodeStatus.CANCELLED, NodeStatus.PENDING), failed
        assert nodes_of(storage, tid)["a"].status == NodeStatus.CANCELLED


def failed_run(storage: Storage, tracking_id: str) -> None:
    """A run of two sequential steps whose first failed without retries: FAILED."""
    storage.enqueue_flow(flow=raw_flow(tracking_id, *TWO_STEPS))
    step = claim(storage, tracking_id)
    assert storage.fail_node(lease=step.lease, error="boom", retry_delay=None)


def test_resume_trigger_and_cancel_of_a_failed_run_leave_one_consistent_end(
    storage: Storage, unique: Names
) -> None:
    """A FAILED run is retried (`flowsmith retry`), triggered again (flow.run) and
    cancelled at the same moment: at most one of the retry and the trigger re-queues it;
    a cancel after that cancels the re-queued step with the run; a cancel before it is
    refused (a FAILED run is not cancellable). Its worker then finishes what is left:
    the run ends COMPLETED with both steps, or CANCELLED with none left pending.
    """
    for round_no in range(ROUNDS):
        failed_run(storage, tid := unique("t"))
        retry, trigger, cancel = race(
            round_no,
            functools.partial(storage.resume_flow, tracking_id=tid),
            functools.partial(storage.enqueue_flow, flow=raw_flow(tid, *TWO_STEPS)),
            functools.partial(storage.cancel_flow, tracking_id=tid),
        )
        resumed = [r for r in (retry, trigger) if not isinstance(r, Exception) and r.resumed]
        assert len(resumed) <= 1, (retry, trigger)
        assert not isinstance(retry, Exception) or isinstance(retry, RunNotRetryable), retry
        assert not isinstance(trigger, Exception), trigger
        cancelled = not isinstance(cancel, Exception)
        assert cancelled or isinstance(cancel, RunNotCancellable), cancel
        status = assert_consistent(storage, tid)
        if cancelled:
            assert resumed and status == FlowStatus.CANCELLED, (status, retry, trigger)
            continue
        assert status == (FlowStatus.RUNNING if resumed else FlowStatus.FAILED), status
        if resumed:
            assert finish_chained(storage, claim(storage, tid).lease, "a") == ["a", "b"]
            assert assert_consistent(storage, tid) == FlowStatus.COMPLETED


def finish_all(storage: Storage) -> None:
    """The worker's side after a race: run every runnable step to the end."""
    while claimed := storage.claim_nodes(
        worker_id="w", limit=10, lease_seconds=60, queues=["default"]
    ):
        for node in claimed:
            finish_chained(storage, node.lease, node.step_name)


def test_resume_cancel_and_completion_of_one_run_at_once_leave_one_consistent_end(
    storage: Storage, unique: Names
) -> None:
    """A run of a parallel pair `a`, `b` then `c`: `a` failed the run while `b` still runs.
    At the same moment `b`'s worker completes it, an operator retries the run, and
    another cancels it. A cancel before the retry is refused (the run is FAILED); one
    after it cancels the run with `a`. Once the worker has run what is left, the run is
    COMPLETED with every step, or CANCELLED with nothing pending or running; `b` ran
    once and its completion was kept either way.
    """
    stages = ((PlannedStep("a", 1), PlannedStep("b", 1)), (PlannedStep("c", 1),))
    for round_no in range(ROUNDS):
        storage.enqueue_flow(flow=raw_flow(tid := unique("t"), *stages))
        claimed = storage.claim_nodes(worker_id="w", limit=10, lease_seconds=60, queues=["default"])
        a, b = sorted(claimed, key=lambda n: n.step_name)
        assert storage.fail_node(lease=a.lease, error="boom", retry_delay=None)
        wrote, retry, cancel = race(
            round_no,
            functools.partial(finish_chained, storage, b.lease, "b"),
            functools.partial(storage.resume_flow, tracking_id=tid),
            functools.partial(storage.cancel_flow, tracking_id=tid),
        )
        assert wrote == ["b"] and retry.resumed, (wrote, retry)
        assert not isinstance(cancel, Exception) or isinstance(cancel, RunNotCancellable), cancel
        finish_all(storage)
        end = assert_consistent(storage, tid)
        assert end == (
            FlowStatus.COMPLETED if isinstance(cancel, Exception) else FlowStatus.CANCELLED
        )
        node_b = nodes_of(storage, tid)["b"]
        assert [t.outcome for t in node_b.attempts] == [AttemptOutcome.COMPLETED], node_b


# -- 5. a step completing exactly as its lease expires -----------------------------------


def test_a_step_completing_as_its_lease_expires_is_counted_once(
    storage: Storage, unique: Names
) -> None:
    """A step's lease expires as its worker writes its outcome (the hot path's
    complete_batch) while another worker's watchdog rescues it, released together on a
    barrier with varied timing: in odd rounds the lease has lapsed already, in even
    ones it lapses within a few milliseconds of the release. Exactly one wins: either
    the outcome is written and the rescue finds nothing, or the write is fenced out and
    the step is rescued for a retry -- never both, never neither.
    """
    rival = rival_storage(storage)
    try:
        for round_no in range(ROUNDS):
            storage.enqueue_flow(flow=raw_flow(tid := unique("t"), (PlannedStep("only", 1),)))
            lapsing = random.Random(round_no).uniform(0, 3 * JITTER)
            step = claim(storage, tid, lease=-1 if round_no % 2 else lapsing)
            finished = Finished(step.lease, NodeStatus.COMPLETED, STEP_DONE, step_name="only")
            written, rescued = race(
                round_no,
                functools.partial(storage.complete_batch, finished=[finished]),
                rival.rescue_expired,
            )
            won = written[0].won
            assert won != bool(rescued), (written, rescued)
            node = nodes_of(storage, tid)["only"]
            if won:
                assert (node.status, node.rescues) == (NodeStatus.COMPLETED, 0), node
                assert [a.outcome for a in node.attempts] == [AttemptOutcome.COMPLETED]
                continue
            assert (node.status, node.rescues) == (NodeStatus.PENDING, 1), node
            assert [a.outcome for a in node.attempts] == [AttemptOutcome.RESCUED]
            retry = claim(storage, tid)  # one retry: the next attempt, and only it
            assert retry.attempt == 2 and storage.complete_node(lease=retry.lease, output=1)
    finally:
        if rival is not storage:
            rival.close()


# -- 6. send_event racing a cancel, a retry and the parking of its wait --------------

APPROVAL = "approval"
WAIT = PlannedStep(APPROVAL, 1, kind=WAIT_FOR_EVENT)


@dataclass(frozen=True)
class Timed:
    """What a racer returned or raised, and when its call began and ended (monotonic)."""

    result: Any
    began: float
    ended: float

    def ok(self) -> bool:
        return not isinstance(self.result, Exception)

    def before(self, other: Timed) -> bool:
        """Certainly ordered before ``other``: it returned before the other began."""
        return self.ended < other.began


def timed(call: Callable[[], Any]) -> Callable[[], Timed]:
    def run() -> Timed:
        began = time.monotonic()
        try:
            result = call()
        except Exception as exc:
            result = exc
        return Timed(result, began, time.monotonic())

    return run


def sender(storage: Storage, tracking_id: str, payload: Any) -> Callable[[], Timed]:
    return timed(functools.partial(send_event, tracking_id, APPROVAL, payload, storage=storage))


def work_off(storage: Storage, tracking_id: str) -> Any:
    """The worker's side: run what is runnable of the run, a wait as the executor does
    (park_node: woken by its event, it completes with the payload; else it stays
    parked). The wait's output (decoded), or None if it has none yet."""
    while claimed := storage.claim_nodes(
        worker_id="w", limit=10, lease_seconds=60, queues=["default"]
    ):
        for node in claimed:
            assert node.tracking_id == tracking_id, node
            if node.step_name != APPROVAL:
                finish_chained(storage, node.lease, node.step_name)
                continue
            answer = storage.park_node(lease=node.lease, event=APPROVAL, seconds=None, until=None)
            if isinstance(answer, Woken):
                assert answer.by_event and answer.event_payload is not None, answer
                payload = json.loads(answer.event_payload)
                assert storage.complete_node(lease=node.lease, output=payload)
    return nodes_of(storage, tracking_id)[APPROVAL].output


def check_no_event_lost(sent: Timed, cancel: Timed, end: FlowStatus) -> None:
    """An event accepted for a run that a cancel had ended already would be lost
    silently: send_event must refuse it. (Two calls that overlapped in time may have
    taken the run's lock in either order.)"""
    if end == FlowStatus.CANCELLED and cancel.ok() and cancel.before(sent):
        assert isinstance(sent.result, EventRefused), sent
    if isinstance(sent.result, EventRefused):
        assert "already has one" not in str(sent.result), sent


def failed_run_parked_at_its_wait(storage: Storage, tracking_id: str) -> None:
    """A run of a wait for APPROVAL beside a step `a`, then `b`: the wait parked, then
    `a` failed for good: the run is FAILED, its parked wait CANCELLED."""
    storage.enqueue_flow(flow=raw_flow(tracking_id, (WAIT, PlannedStep("a", 1)), TWO_STEPS[1]))
    claimed = storage.claim_nodes(worker_id="w", limit=10, lease_seconds=60, queues=["default"])
    wait, a = sorted(claimed, key=lambda n: n.step_name != APPROVAL)
    parked = storage.park_node(lease=wait.lease, event=APPROVAL, seconds=None, until=None)
    assert not isinstance(parked, Woken) and parked is not None, parked
    assert storage.fail_node(lease=a.lease, error="boom", retry_delay=None)


def test_send_event_racing_a_retry_and_a_cancel_leaves_one_consistent_end(
    storage: Storage, unique: Names
) -> None:
    """A FAILED run whose wait for an event was parked when it failed: at the same
    moment a sender sends the event, an operator retries the run (`flowsmith retry`)
    and another cancels it. The event is refused while the run is FAILED (before the
    retry) or CANCELLED, else kept for the wait; a cancel is refused before the retry.
    Then the worker runs what is left, the event is sent once more if the first was
    refused, and the run ends COMPLETED with the payload that was accepted as the
    wait's output, or CANCELLED with nothing pending or running; never an event
    accepted after the cancel."""
    for round_no in range(ROUNDS):
        failed_run_parked_at_its_wait(storage, tid := unique("t"))
        sent, retry, cancel = race(
            round_no,
            sender(storage, tid, {"round": round_no}),
            timed(functools.partial(storage.resume_flow, tracking_id=tid)),
            timed(functools.partial(storage.cancel_flow, tracking_id=tid)),
        )
        assert retry.ok() and retry.result.resumed, retry
        assert cancel.ok() or isinstance(cancel.result, RunNotCancellable), cancel
        assert sent.ok() or isinstance(sent.result, EventRefused), sent
        if sent.ok():  # the run was running: the retry came first, and the cancel after it
            assert sent.result.delivered and not sent.result.woke, sent
            assert not sent.before(retry), (sent, retry)
        output = work_off(storage, tid)
        end = assert_consistent(storage, tid)
        check_no_event_lost(sent, cancel, end)
        if cancel.ok():
            assert end == FlowStatus.CANCELLED and output is None, (end, output)
            continue
        if not sent.ok():
            again = send_event(tid, APPROVAL, {"again": round_no}, storage=storage)
            assert again.delivered and again.woke, again
            output = work_off(storage, tid)
        assert output == ({"round": round_no} if sent.ok() else {"again": round_no}), output
        assert assert_consistent(storage, tid) == FlowStatus.COMPLETED


def test_send_event_racing_the_parking_of_its_wait_and_a_cancel_leaves_one_consistent_end(
    storage: Storage, unique: Names
) -> None:
    """A run at its wait for an event, claimed by a worker about to park it: at the same
    moment the worker parks it (park_node), a sender sends its event and an operator
    cancels the run. The wait sees an event sent before it parked (Woken), or is woken
    by one sent after it parked (never missed in between); an event sent after the
    cancel is refused. Once the worker has run what is left, the run is CANCELLED (the
    cancel always finds it running) with nothing pending or running."""
    for round_no in range(ROUNDS):
        storage.enqueue_flow(flow=raw_flow(tid := unique("t"), (WAIT,), TWO_STEPS[1]))
        wait = claim(storage, tid)
        parked, sent, cancel = race(
            round_no,
            timed(
                functools.partial(
                    storage.park_node, lease=wait.lease, event=APPROVAL, seconds=None, until=None
                )
            ),
            sender(storage, tid, {"round": round_no}),
            timed(functools.partial(storage.cancel_flow, tracking_id=tid)),
        )
        assert parked.ok() and parked.result is not None, parked
        assert cancel.ok(), cancel  # nothing else could end the run
        assert sent.ok() or isinstance(sent.result, EventRefused), sent
        if isinstance(parked.result, Woken):  # the event was there when it looked
            assert sent.ok() and not sent.result.woke and not parked.before(sent), (sent, parked)
            payload = json.loads(parked.result.event_payload or "null")
            assert storage.complete_node(lease=wait.lease, output=payload)
        elif sent.ok():
            assert sent.result.woke == (parked.result.status == NodeStatus.PENDING), sent
        work_off(storage, tid)
        end = assert_consistent(storage, tid)
        assert end == FlowStatus.CANCELLED, end  # the cancel always finds the run running
        check_no_event_lost(sent, cancel, end)


TIMEOUT = 0.01  # of the waits below, in seconds


def timed_out_wait(storage: Storage, tracking_id: str) -> ClaimedNode:
    """The run's wait for APPROVAL parked with a timeout of TIMEOUT, then claimed again
    once the timeout has run out (by the database clock), before it looks again."""
    first = claim(storage, tracking_id)
    parked = storage.park_node(lease=first.lease, event=APPROVAL, seconds=TIMEOUT, until=None)
    assert parked is not None and not isinstance(parked, Woken), parked
    return eventually(lambda: next(iter(claim_any(storage)), None), interval=TIMEOUT)


def claim_any(storage: Storage) -> list[ClaimedNode]:
    return storage.claim_nodes(worker_id="w", limit=10, lease_seconds=60, queues=["default"])


def test_an_event_for_a_wait_that_timed_out_is_refused_not_lost(
    storage: Storage, unique: Names
) -> None:
    """Regression (found writing the races below): a wait with on_timeout=<value> that
    timed out completed with that value while its run went on; an event sent then was
    accepted (delivered=True) and never used: lost silently. It is refused now, saying
    the wait is over, and the run keeps the value its wait completed with."""
    storage.enqueue_flow(flow=raw_flow(tid := unique("t"), (WAIT,), TWO_STEPS[1]))
    wait = timed_out_wait(storage, tid)
    woken = storage.park_node(lease=wait.lease, event=APPROVAL, seconds=TIMEOUT, until=None)
    assert isinstance(woken, Woken) and not woken.by_event, woken  # its time has come
    assert storage.complete_node(lease=wait.lease, output="the default")
    try:
        with pytest.raises(EventRefused, match="is over"):
            send_event(tid, APPROVAL, "too late", storage=storage)
    finally:
        work_off(storage, tid)  # the run's next step: no leftover for the next test
    assert nodes_of(storage, tid)[APPROVAL].output == "the default"


def test_send_event_racing_the_timeout_of_its_wait_is_consumed_or_refused(
    storage: Storage, unique: Names
) -> None:
    """A wait whose timeout has just run out is claimed and looks for its event
    (park_node) while a sender sends it: the wait sees the event (its payload is the
    output) or ends by its timeout, and then the event is refused; never accepted and
    left unused."""
    for round_no in range(ROUNDS):
        storage.enqueue_flow(flow=raw_flow(tid := unique("t"), (WAIT,), TWO_STEPS[1]))
        wait = timed_out_wait(storage, tid)
        looked, sent = race(
            round_no,
            timed(
                functools.partial(
                    storage.park_node, lease=wait.lease, event=APPROVAL, seconds=TIMEOUT, until=None
                )
            ),
            sender(storage, tid, {"round": round_no}),
        )
        assert isinstance(looked.result, Woken), looked
        by_event = looked.result.by_event
        output = json.loads(looked.result.event_payload or '"the default"')
        assert storage.complete_node(lease=wait.lease, output=output)
        work_off(storage, tid)
        if by_event:
            assert sent.ok() and sent.result.delivered and output == {"round": round_no}
        else:
            assert isinstance(sent.result, EventRefused), sent
            assert output == "the default"

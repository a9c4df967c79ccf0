"""Every attempt of every step is kept (fs_attempts, schema 5), on every storage.

A node's row describes its latest attempt; the attempt a node leaves behind when
it runs again (a failure retried, a timeout, a lost worker, a release, a failed
subflow, a retry of its failed run) is kept apart, in the same fenced write.
trace() and `flowsmith status` show them merged; prune deletes them with the run.
The real SIGKILLed worker is in tests/e2e/test_crash.py (check_rescued), the v4 to
v5 migration in tests/integration/test_migrations.py.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from flowsmith_worker import Context, Flow
from flowsmith_worker.cli import main
from flowsmith_worker.plan import Plan, PlannedStep
from flowsmith_worker.storage.base import (
    RESCUE_ERROR,
    AttemptOutcome,
    ClaimedNode,
    Lease,
    NewFlow,
    NodeRecord,
    Storage,
)
from flowsmith_worker.storage.sql import schema
from flowsmith_worker.worker import Worker

Names = Callable[[str], str]
A = schema.attempts


def drain(storage: Storage) -> None:
    Worker(storage=storage, poll_interval=0.02).run_until_idle(timeout=30)


def failing(times: int) -> Callable[[Context], str]:
    """A step whose first ``times`` attempts (of each run) raise, then it succeeds."""

    def step(ctx: Context) -> str:
        if ctx.attempt <= times:
            raise RuntimeError(f"boom {ctx.attempt}")
        return "ok"

    return step


def nodes_of(storage: Storage, tracking_id: str) -> dict[str, NodeRecord]:
    record = storage.get_flow(tracking_id=tracking_id, with_payloads=False)
    assert record is not None
    return {n.step_name: n for n in storage.list_nodes(flow_id=record.id, with_payloads=False)}


def outcomes(node: NodeRecord) -> list[tuple[int, AttemptOutcome]]:
    return [(a.attempt, a.outcome) for a in node.attempts]


def one_step(tracking_id: str, max_attempts: int = 1) -> NewFlow:
    plan = Plan(stages=((PlannedStep("only", max_attempts),),), module="tests.nowhere")
    return NewFlow(flow_name="raw", tracking_id=tracking_id, input={}, plan=plan)


def claim(storage: Storage, worker_id: str, lease: float = 30.0) -> ClaimedNode:
    [node] = storage.claim_nodes(
        worker_id=worker_id, limit=1, lease_seconds=lease, queues=["default"]
    )
    return node


def stored_attempts(storage: Storage) -> list[tuple[int, int]]:
    """(node_id, attempt) of every row of fs_attempts, read from the table itself."""
    engine = storage.engine  # type: ignore[attr-defined]
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(sa.select(A.c.node_id, A.c.attempt))]


# -- what is kept ------------------------------------------------------------------


def test_a_step_failing_twice_then_succeeding_shows_three_attempts(
    storage: Storage, unique: Names
) -> None:
    """trace() lists each attempt, oldest first: two FAILED with their own error and
    traceback, then the COMPLETED one (no error), each with its worker and times."""
    flow = Flow(unique("f"), storage=storage).step("flaky", failing(2), retries=3, backoff=0)
    flow.step("after", lambda ctx: 1)
    run = flow.run({}, tracking_id=unique("t"))
    drain(storage)

    flaky, after = run.trace()
    assert outcomes(flaky) == [
        (1, AttemptOutcome.FAILED),
        (2, AttemptOutcome.FAILED),
        (3, AttemptOutcome.COMPLETED),
    ]
    first, second, third = flaky.attempts
    for attempt, n in ((first, 1), (second, 2)):
        assert attempt.error is not None
        assert attempt.error.startswith("Traceback (most recent call last):")
        assert attempt.error.rstrip().endswith(f"RuntimeError: boom {n}")
    assert third.error is None
    assert {a.worker_id for a in flaky.attempts} == {flaky.lease_owner} != {None}
    for attempt in flaky.attempts:
        assert attempt.ended_at is not None and attempt.started_at <= attempt.ended_at
        assert (attempt.node_id, attempt.flow_id, attempt.step_name) == (
            flaky.id,
            flaky.flow_id,
            "flaky",
        )
    assert first.ended_at <= second.started_at and second.ended_at <= third.started_at  # type: ignore[operator]
    assert outcomes(after) == [(1, AttemptOutcome.COMPLETED)]


def test_a_step_failing_the_same_way_every_time_shows_each_error(
    storage: Storage, unique: Names
) -> None:
    """Two attempts failing with the very same traceback both show it: the last one's
    error, on the node's row, is not taken for the one kept before it."""

    def always(ctx: Context) -> None:
        raise ValueError("bad input")

    flow = Flow(unique("f"), storage=storage).step("always", always, retries=1, backoff=0)
    run = flow.run({}, tracking_id=unique("t"))
    drain(storage)

    [node] = run.trace()
    assert outcomes(node) == [(1, AttemptOutcome.FAILED), (2, AttemptOutcome.FAILED)]
    first, last = node.attempts
    assert first.error == last.error == node.error
    assert (last.error or "").rstrip().endswith("ValueError: bad input")


def test_a_timed_out_attempt_is_kept_with_its_timeout(storage: Storage, unique: Names) -> None:
    """A step past its timeout fails that attempt (StepTimeout, its result dropped):
    the attempt is kept, FAILED with that error, and the retry's attempt follows."""
    calls: list[int] = []

    def slow_once(ctx: Context) -> str:
        calls.append(1)
        if len(calls) == 1:
            time.sleep(0.3)
        return "done"

    flow = Flow(unique("f"), storage=storage).step(
        "slow", slow_once, retries=1, timeout=0.1, backoff=0
    )
    run = flow.run({}, tracking_id=unique("t"))
    drain(storage)

    [slow] = run.trace()
    assert outcomes(slow) == [(1, AttemptOutcome.FAILED), (2, AttemptOutcome.COMPLETED)]
    assert "StepTimeout" in (slow.attempts[0].error or "")


def test_a_rescued_attempt_is_kept_with_its_lost_worker(storage: Storage, unique: Names) -> None:
    """An expired lease re-queues the node: the lost attempt is kept as RESCUED, with
    the dead worker's id and the rescue's error; the next worker's is the latest."""
    storage.enqueue_flow(flow=one_step(tid := unique("t")))
    claim(storage, "dead", lease=-1.0)  # expired at once
    [rescued] = storage.rescue_expired()
    assert rescued.worker_id == "dead"
    claim(storage, "alive")

    [node] = nodes_of(storage, tid).values()
    lost, running = node.attempts
    assert (lost.attempt, lost.outcome, lost.worker_id, lost.error) == (
        1,
        AttemptOutcome.RESCUED,
        "dead",
        RESCUE_ERROR,
    )
    assert lost.ended_at is not None
    assert (running.attempt, running.outcome, running.worker_id) == (
        2,
        AttemptOutcome.RUNNING,
        "alive",
    )
    assert running.ended_at is None and running.error is None


def test_a_released_attempt_is_kept_as_released(storage: Storage, unique: Names) -> None:
    """A worker that stops hands its steps back: each handed-back attempt is kept as
    RELEASED with that worker's id, and only the nodes it still held."""
    storage.enqueue_flow(flow=one_step(mine := unique("t")))
    storage.enqueue_flow(flow=one_step(other := unique("t")))
    held = claim(storage, "stopping")
    not_mine = claim(storage, "busy")
    stale = Lease(not_mine.node_id, not_mine.lease.flow_id, "stopping", not_mine.attempt)
    released = storage.release_nodes(leases=[held.lease, stale])
    assert released == 1
    claim(storage, "next")

    [node] = nodes_of(storage, mine).values()
    assert outcomes(node) == [(1, AttemptOutcome.RELEASED), (2, AttemptOutcome.RUNNING)]
    assert [a.worker_id for a in node.attempts] == ["stopping", "next"]
    assert node.attempts[0].error is None
    [busy] = nodes_of(storage, other).values()
    assert outcomes(busy) == [(1, AttemptOutcome.RUNNING)]


def test_a_worker_that_lost_its_lease_records_nothing(storage: Storage, unique: Names) -> None:
    """The history is fenced like the node: a failure reported by the worker whose
    lease was rescued is refused, and keeps no attempt beside the rescued one."""
    storage.enqueue_flow(flow=one_step(tid := unique("t"), max_attempts=3))
    old = claim(storage, "old", lease=-1.0)
    storage.rescue_expired()
    claim(storage, "new")
    assert storage.fail_node(lease=old.lease, error="late", retry_delay=0.0) is None
    assert storage.release_nodes(leases=[old.lease]) == 0

    [node] = nodes_of(storage, tid).values()
    assert outcomes(node) == [(1, AttemptOutcome.RESCUED), (2, AttemptOutcome.RUNNING)]
    assert len(stored_attempts(storage)) == 1


def test_a_retry_of_a_node_whose_start_was_erased_still_goes_through(
    storage: Storage, unique: Names
) -> None:
    """A row changed by hand (started_at NULL) cannot make the write that retries its
    node fail: the attempt is kept with its end as its start, and the node runs again."""
    storage.enqueue_flow(flow=one_step(tid := unique("t"), max_attempts=2))
    node = claim(storage, "w")
    engine = storage.engine  # type: ignore[attr-defined]
    with engine.begin() as conn:
        nodes = schema.nodes
        conn.execute(sa.update(nodes).where(nodes.c.id == node.node_id).values(started_at=None))
    assert storage.fail_node(lease=node.lease, error="e", retry_delay=0.0) is not None

    [kept] = nodes_of(storage, tid)["only"].attempts
    assert (kept.outcome, kept.error, kept.started_at) == (
        AttemptOutcome.FAILED,
        "e",
        kept.ended_at,
    )


def test_retrying_a_failed_run_keeps_its_failed_attempt(storage: Storage, unique: Names) -> None:
    """`flowsmith retry` (resume_flow) re-queues the failed step: the attempt that
    failed the run is kept, with its error, before the next one replaces the row."""
    flow = Flow(unique("f"), storage=storage).step("once", failing(1))
    run = flow.run({}, tracking_id=unique("t"))
    drain(storage)
    storage.resume_flow(tracking_id=run.tracking_id)
    drain(storage)

    [node] = run.trace()
    assert outcomes(node) == [(1, AttemptOutcome.FAILED), (2, AttemptOutcome.COMPLETED)]
    assert (node.attempts[0].error or "").rstrip().endswith("RuntimeError: boom 1")
    assert node.attempts[1].error is None


def test_a_subflow_step_keeps_the_attempt_its_failed_child_ended(
    storage: Storage, unique: Names
) -> None:
    """A child run that fails ends its parent step's attempt (FAILED, naming the child);
    the parent's retry resumes the child, whose own failed attempt is kept too."""
    child = Flow(unique("child"), storage=storage).step("inner", failing(1))
    parent = Flow(unique("parent"), storage=storage).subflow("sub", child, retries=1)
    run = parent.run({}, tracking_id=unique("t"))
    drain(storage)

    [sub] = run.trace()
    assert outcomes(sub) == [(1, AttemptOutcome.FAILED), (2, AttemptOutcome.COMPLETED)]
    assert "subflow" in (sub.attempts[0].error or "")
    [inner] = nodes_of(storage, f"{run.tracking_id}:sub").values()
    assert outcomes(inner) == [(1, AttemptOutcome.FAILED), (2, AttemptOutcome.COMPLETED)]


# -- prune, and the success path ---------------------------------------------------


def test_prune_removes_the_attempts_with_their_run(storage: Storage, unique: Names) -> None:
    """Pruning a finished run deletes its kept attempts; a run not pruned keeps its own."""
    flow = Flow(unique("f"), storage=storage).step("flaky", failing(1), retries=1, backoff=0)
    old = flow.run({}, tracking_id=unique("old"))
    drain(storage)
    [kept_before] = stored_attempts(storage)
    assert storage.prune_flows(older_than_seconds=0) == 1
    assert stored_attempts(storage) == []
    assert storage.get_flow(tracking_id=old.tracking_id) is None

    young = flow.run({}, tracking_id=unique("young"))
    drain(storage)
    assert storage.prune_flows(older_than_seconds=3600) == 0
    [kept] = stored_attempts(storage)
    assert kept != kept_before
    assert young.trace()[0].attempts[0].outcome == AttemptOutcome.FAILED


def test_a_step_that_succeeds_at_once_writes_no_attempt_row(
    storage: Storage, unique: Names
) -> None:
    """The success path is unchanged: claims, completions and chaining of steps that
    succeed at their first attempt send no statement about fs_attempts (while a retry
    does, in the same listener). tests/contract/test_group_commit.py counts the batch's
    statements."""
    engine = storage.engine  # type: ignore[attr-defined]
    ok = Flow(unique("ok"), storage=storage).step("a", lambda ctx: 1).step("b", lambda ctx: 2)
    with ok.parallel() as group:
        group.step("c", lambda ctx: 3).step("d", lambda ctx: 4)
    retried = Flow(unique("retried"), storage=storage).step("x", failing(1), retries=1, backoff=0)

    def statements_of(work: Callable[[], Any]) -> list[str]:
        seen: list[str] = []
        listener = lambda *args: seen.append(args[2])  # noqa: E731
        sa.event.listen(engine, "before_cursor_execute", listener)
        try:
            work()
        finally:
            sa.event.remove(engine, "before_cursor_execute", listener)
        return seen

    def run_flow(flow: Flow) -> Callable[[], Any]:
        return lambda: (flow.run({}, tracking_id=unique("t")), drain(storage))

    succeeded = statements_of(run_flow(ok))
    assert not [s for s in succeeded if "fs_attempts" in s], succeeded
    assert [s for s in statements_of(run_flow(retried)) if "fs_attempts" in s]


# -- flowsmith status --------------------------------------------------------------


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_status_lists_every_attempt_of_a_step_that_ran_more_than_once(
    storage: Storage, unique: Names
) -> None:
    """`flowsmith status` adds a table of the attempts of steps that ran more than once
    (none for a step that ran once); --traceback prints each attempt's traceback; --json
    gives every step its attempts."""
    flow = Flow(unique("f"), storage=storage).step("flaky", failing(2), retries=2, backoff=0)
    flow.step("steady", lambda ctx: 1)
    run = flow.run({}, tracking_id=unique("t"))
    drain(storage)
    url = storage.engine.url.render_as_string(hide_password=False)  # type: ignore[attr-defined]

    shown = CliRunner().invoke(main, ["status", run.tracking_id, "--url", url, "--traceback"])
    assert shown.exit_code == 0, shown.output
    table = shown.output.split("Attempts of the steps that ran more than once:")[1]
    rows = [line.split() for line in table.splitlines() if line.startswith("flaky")]
    assert [row[1:3] for row in rows] == [["1", "FAILED"], ["2", "FAILED"], ["3", "COMPLETED"]]
    assert "steady" not in table.split("---")[0]
    assert shown.output.count("Traceback (most recent call last)") == 2
    assert "RuntimeError: boom 1" in shown.output and "RuntimeError: boom 2" in shown.output

    as_json = CliRunner().invoke(main, ["status", run.tracking_id, "--url", url, "--json"])
    steps = {s["step_name"]: s for s in json.loads(as_json.stdout)["steps"]}
    assert [a["outcome"] for a in steps["flaky"]["attempts"]] == ["FAILED", "FAILED", "COMPLETED"]
    assert [a["outcome"] for a in steps["steady"]["attempts"]] == ["COMPLETED"]


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_status_shows_an_unreadable_outcome_as_such(storage: Storage, unique: Names) -> None:
    """A kept attempt whose stored outcome this version does not know (changed by hand,
    or written by a newer version) is shown UNREADABLE, with why on stderr, and null in
    --json: never as the placeholder its record holds, never a traceback."""
    flow = Flow(unique("f"), storage=storage).step("flaky", failing(1), retries=1, backoff=0)
    run = flow.run({}, tracking_id=unique("t"))
    drain(storage)
    engine = storage.engine  # type: ignore[attr-defined]
    with engine.begin() as conn:
        conn.execute(sa.update(A).values(outcome="EXPLODED"))
    url = engine.url.render_as_string(hide_password=False)

    shown = CliRunner().invoke(main, ["status", run.tracking_id, "--url", url])
    assert shown.exit_code == 0, shown.output
    rows = [line.split() for line in shown.stdout.splitlines() if line.startswith("flaky ")]
    assert rows[-2][1:3] == ["1", "UNREADABLE"]
    assert "attempt 1: the stored outcome cannot be read: 'EXPLODED'" in shown.stderr
    assert "Traceback" not in shown.output
    as_json = CliRunner().invoke(main, ["status", run.tracking_id, "--url", url, "--json"])
    [step] = json.loads(as_json.stdout)["steps"]
    assert [a["outcome"] for a in step["attempts"]] == [None, "COMPLETED"]

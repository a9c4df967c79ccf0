"""PostgreSQL: once a storage knows a run's plan (from an earlier batch of that run), a
batch of its sequential steps is one statement: FINISH_PG locks the runs itself instead
of a SELECT ... FOR UPDATE sent before it. What the batch does must not change: each
case is played twice, the last write once through the folded statement (the storage
that knows the plans) and once through the lock-first path (a new storage on the same
database, which knows none), and both must leave the database the same.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from flowsmith_worker.plan import Plan, PlannedStep
from flowsmith_worker.storage import create_storage
from flowsmith_worker.storage.base import (
    Chain,
    ClaimedNode,
    Finished,
    FlowStatus,
    NewFlow,
    NodeStatus,
    Written,
)
from flowsmith_worker.storage.sql import SqlStorage

Names = Callable[[str], str]
CHAIN = Chain("w1", lease_seconds=60)
Snapshot = tuple[str, list[tuple[str, str, str | None]]]


@pytest.fixture
def storages(pg_url: str) -> Iterator[Callable[[], SqlStorage]]:
    """New storages on one migrated PostgreSQL database, each knowing no plan yet."""
    made: list[SqlStorage] = []

    def new() -> SqlStorage:
        storage = create_storage(pg_url)
        assert isinstance(storage, SqlStorage)
        if not made:
            storage.migrate()
        made.append(storage)
        return storage

    yield new
    for storage in made:
        storage.close()


def run_of(tracking_id: str, queue: str, steps: int = 3) -> NewFlow:
    """A run of ``steps`` sequential steps, on a queue of its case's own."""
    plan = Plan(stages=tuple((PlannedStep(f"s{i}", 1),) for i in range(steps)))
    return NewFlow("raw", tracking_id, {"n": 1}, plan, queue=queue)


def claim(storage: SqlStorage, queue: str) -> ClaimedNode:
    [node] = storage.claim_nodes(worker_id="w1", limit=1, lease_seconds=60, queues=[queue])
    return node


def done(node: ClaimedNode) -> Finished:
    return Finished(node.lease, NodeStatus.COMPLETED, '"ok"', step_name=node.step_name)


def snapshot(storage: SqlStorage, tracking_id: str) -> Snapshot:
    record = storage.get_flow(tracking_id=tracking_id, with_payloads=False)
    assert record is not None
    nodes = storage.list_nodes(flow_id=record.id, with_payloads=False)
    return str(record.status), [(n.step_name, str(n.status), n.lease_owner) for n in nodes]


def sent_by(storage: SqlStorage, work: Callable[[], Any]) -> list[str]:
    sent: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        prepared = re.match(r"(?:PREPARE|EXECUTE) (fs_\w+)", statement)
        sent.append(prepared.group(1) if prepared else statement.split()[0])

    sa.event.listen(storage.engine, "before_cursor_execute", record)
    try:
        work()
    finally:
        sa.event.remove(storage.engine, "before_cursor_execute", record)
    return sent


def test_a_run_whose_plan_is_known_is_moved_on_in_one_statement(
    storages: Callable[[], SqlStorage], unique: Names
) -> None:
    """A run's first batch locks it first (to read its plan); its later batches are the
    prepared FINISH_PG alone, chaining as before."""
    storage = storages()
    tracking_id, queue = unique("t"), unique("q")
    storage.enqueue_flow(flow=run_of(tracking_id, queue))
    first = claim(storage, queue)
    written: list[Written] = []
    sent = sent_by(storage, lambda: written.extend(storage.complete_batch(finished=[done(first)])))
    assert sent == ["fs_lock_runs", "fs_finish"]
    second = claim(storage, queue)
    sent = sent_by(
        storage,
        lambda: written.extend(storage.complete_batch(finished=[done(second)], chain=CHAIN)),
    )
    assert sent == ["fs_finish"]
    chained = written[-1].chained
    assert chained is not None and chained.step_name == "s2"
    last = Finished(chained.lease, NodeStatus.COMPLETED, '"ok"', step_name=chained.step_name)
    assert sent_by(storage, lambda: storage.complete_batch(finished=[last])) == ["fs_finish"]
    assert snapshot(storage, tracking_id)[0] == FlowStatus.COMPLETED


def play(
    storages: Callable[[], SqlStorage],
    unique: Names,
    meanwhile: Callable[[SqlStorage, str], None],
    folded: bool,
) -> tuple[bool, Snapshot]:
    """s0 is written (its plan now known), s1 is claimed, ``meanwhile`` happens, then s1
    is written: by the storage that knows the plan (folded) or by a new one."""
    storage = storages()
    tracking_id, queue = unique("t"), unique("q")
    storage.enqueue_flow(flow=run_of(tracking_id, queue))
    assert storage.complete_batch(finished=[done(claim(storage, queue))])[0].won
    second = claim(storage, queue)
    meanwhile(storage, tracking_id)
    writer = storage if folded else storages()
    written: list[Written] = []
    sent = sent_by(writer, lambda: written.extend(writer.complete_batch(finished=[done(second)])))
    # The folded statement first; the lock-first path locks first.
    assert sent[0] == ("fs_finish" if folded else "fs_lock_runs")
    return written[0].won, snapshot(storage, tracking_id)


def cancel(storage: SqlStorage, tracking_id: str) -> None:
    storage.cancel_flow(tracking_id=tracking_id)


def fail_run(storage: SqlStorage, tracking_id: str) -> None:
    with storage.engine.begin() as conn:
        conn.execute(
            sa.text("UPDATE fs_flows SET status = 'FAILED' WHERE tracking_id = :t"),
            {"t": tracking_id},
        )


def prune(storage: SqlStorage, tracking_id: str) -> None:
    with storage.engine.begin() as conn:
        conn.execute(
            sa.text(
                "DELETE FROM fs_nodes WHERE flow_id = "
                "(SELECT id FROM fs_flows WHERE tracking_id = :t)"
            ),
            {"t": tracking_id},
        )
        conn.execute(sa.text("DELETE FROM fs_flows WHERE tracking_id = :t"), {"t": tracking_id})


def nothing(storage: SqlStorage, tracking_id: str) -> None:
    pass


@pytest.mark.parametrize("meanwhile", [nothing, cancel, fail_run])
def test_the_folded_batch_does_what_the_lock_first_batch_does(
    storages: Callable[[], SqlStorage], unique: Names, meanwhile: Callable[[SqlStorage, str], None]
) -> None:
    """A run going on, cancelled, or failed while its step ran: the same outcome recorded,
    the same nodes started (none for a run that is over), the same answer."""
    folded_won, folded = play(storages, unique, meanwhile, folded=True)
    plain_won, plain = play(storages, unique, meanwhile, folded=False)
    assert folded_won == plain_won
    assert folded == plain


def test_a_pruned_run_is_not_written_by_the_folded_batch(
    storages: Callable[[], SqlStorage], unique: Names
) -> None:
    """A run pruned while its step ran: the folded batch answers lost, as the lock-first
    batch does, and writes nothing."""
    storage = storages()
    tracking_id, queue = unique("t"), unique("q")
    storage.enqueue_flow(flow=run_of(tracking_id, queue))
    assert storage.complete_batch(finished=[done(claim(storage, queue))])[0].won
    second = claim(storage, queue)
    prune(storage, tracking_id)
    assert storage.complete_batch(finished=[done(second)]) == [Written(False)]
    assert storage.get_flow(tracking_id=tracking_id) is None


def test_a_subflow_s_last_step_wakes_its_parent_through_the_general_path(
    storages: Callable[[], SqlStorage], unique: Names
) -> None:
    """A child run's last step, its plan known: FINISH_PG finds the run has a parent and
    defers it; the general path completes the child and wakes the parent in the same
    batch, as the lock-first batch does."""
    outcomes = []
    for folded in (True, False):
        storage = storages()
        parent_id, child_id, queue = unique("parent"), unique("child"), unique("q")
        storage.enqueue_flow(flow=run_of(parent_id, queue, steps=2))
        parent_step = claim(storage, queue)
        child = run_of(child_id, queue, steps=2)
        assert storage.start_subflow(lease=parent_step.lease, child=child) == NodeStatus.WAITING
        assert storage.complete_batch(finished=[done(claim(storage, queue))])[0].won
        last = claim(storage, queue)
        writer = storage if folded else storages()
        assert writer.complete_batch(finished=[done(last)])[0].won
        outcomes.append((snapshot(storage, child_id), snapshot(storage, parent_id)))
    folded_result, plain_result = outcomes
    assert folded_result[0][0] == FlowStatus.COMPLETED
    assert [status for _, status, _ in folded_result[1][1]] == ["COMPLETED", "PENDING"]
    assert folded_result == plain_result

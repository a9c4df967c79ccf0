"""Races between two transactions, forced into their worst order on real servers.

A transaction of ours is held inside a real code path by a lock the test owns
(a row lock taken in another connection, or a PostgreSQL trigger waiting on an
advisory lock); the rival transaction is started and seen waiting in the
server's own lock tables; then the test lets go. No sleeps decide the order.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest
import sqlalchemy as sa

from flowsmith_worker import FlowStatus, NodeStatus
from flowsmith_worker.errors import FlowCancelled, RunNotRetryable, SubflowTaken
from flowsmith_worker.plan import Plan, PlannedStep
from flowsmith_worker.storage import create_storage
from flowsmith_worker.storage.base import ClaimedNode, NewFlow, NodeRecord, Storage
from flowsmith_worker.storage.sql import SqlStorage
from tests.conftest import database_url, eventually
from tests.servers.pgbouncer import through_pgbouncer
from tests.support.locks import Background, lock_waits

Names = Callable[[str], str]
ADVISORY_KEY = 4242
ONE = (PlannedStep("only", 1),)


def raw_flow(tracking_id: str, stage: tuple[PlannedStep, ...]) -> NewFlow:
    plan = Plan(stages=(stage,), module="tests.nowhere")
    return NewFlow(flow_name="raw", tracking_id=tracking_id, input={}, plan=plan)


def claim_one(storage: Storage, tracking_id: str) -> ClaimedNode:
    claimed = storage.claim_nodes(worker_id="w", limit=10, lease_seconds=60, queues=["default"])
    [node] = [n for n in claimed if n.tracking_id == tracking_id]
    return node


def sql_storage(request: pytest.FixtureRequest, backend: str, tmp_path: Path) -> SqlStorage:
    storage = cast(SqlStorage, create_storage(database_url(request, backend, tmp_path)))
    storage.migrate()
    request.addfinalizer(storage.close)
    return storage


# -- PostgreSQL: adopting a top-level run while it ends, or while another parent adopts it --


@contextlib.contextmanager
def updates_of_run_held(storage: SqlStorage, flow_id: int) -> Iterator[None]:
    """Any UPDATE of that fs_flows row waits, holding the row's lock, until the block ends.

    A BEFORE UPDATE trigger takes an advisory lock this connection holds: the
    updating transaction has locked the row and decided what to write, and
    cannot commit yet.
    """
    if through_pgbouncer():
        pytest.skip("the holder's session advisory lock does not outlive its transaction there")
    with storage.engine.connect() as holder:
        holder.execute(sa.select(sa.func.pg_advisory_lock(ADVISORY_KEY)))
        holder.commit()
        with storage.engine.begin() as conn:
            conn.execute(
                sa.text(
                    "CREATE FUNCTION fs_test_hold() RETURNS trigger LANGUAGE plpgsql AS $$ "
                    f"BEGIN PERFORM pg_advisory_xact_lock({ADVISORY_KEY}); RETURN NEW; END $$"
                )
            )
            conn.execute(
                sa.text(
                    "CREATE TRIGGER fs_test_hold BEFORE UPDATE ON fs_flows FOR EACH ROW "
                    f"WHEN (OLD.id = {int(flow_id)}) EXECUTE FUNCTION fs_test_hold()"
                )
            )
        try:
            yield
        finally:
            holder.execute(sa.select(sa.func.pg_advisory_unlock(ADVISORY_KEY)))
            holder.commit()


@dataclass(frozen=True)
class AdoptionRace:
    parent: str
    child: str
    child_step: ClaimedNode
    rival: Any  # what the rival transaction returned or raised
    adoption: Any  # what start_subflow returned (the node's status) or raised


def adoption_race(
    storage: SqlStorage, unique: Names, rival: Callable[[str, ClaimedNode], Any]
) -> AdoptionRace:
    """A top-level run `child` (its step claimed) and a parent whose subflow adopts it,
    started while ``rival(child, child_step)`` holds the child's row mid-transaction,
    after it decided what to write from a row that had no parent yet.
    """
    child = storage.enqueue_flow(flow=raw_flow(unique("c"), ONE))
    child_step = claim_one(storage, child.tracking_id)
    storage.enqueue_flow(flow=raw_flow(parent := unique("p"), (PlannedStep("sub", 1, True),)))
    parent_step = claim_one(storage, parent)
    request = raw_flow(child.tracking_id, ONE)
    with updates_of_run_held(storage, child.flow_id):
        first = Background(lambda: rival(child.tracking_id, child_step))
        eventually(lambda: lock_waits(storage, advisory=True) == 1)
        adopter = Background(lambda: storage.start_subflow(lease=parent_step.lease, child=request))
        eventually(lambda: lock_waits(storage) == 1)
    return AdoptionRace(parent, child.tracking_id, child_step, first.result(), adopter.result())


def step_of(storage: Storage, tracking_id: str) -> NodeRecord:
    record = storage.get_flow(tracking_id=tracking_id)
    assert record is not None
    [node] = storage.list_nodes(flow_id=record.id)
    return node


@pytest.mark.parametrize("backend", ["postgresql"])
def test_adopting_a_run_as_it_completes_hears_its_completion(
    request: pytest.FixtureRequest, backend: str, tmp_path: Path, unique: Names
) -> None:
    """The child completes (seeing no parent yet) while a parent adopts it: the parent
    step still completes with the child's data instead of waiting forever.
    """
    storage = sql_storage(request, backend, tmp_path)
    race = adoption_race(
        storage,
        unique,
        lambda child, step: storage.complete_node(lease=step.lease, output="child done"),
    )
    assert race.rival is True and race.adoption == NodeStatus.COMPLETED
    record = storage.get_flow(tracking_id=race.parent)
    assert record is not None and record.status == FlowStatus.COMPLETED
    assert record.output is not None and record.output["sub"]["only"] == "child done"


@pytest.mark.parametrize("backend", ["postgresql"])
def test_adopting_a_run_as_it_is_cancelled_sees_the_cancel(
    request: pytest.FixtureRequest, backend: str, tmp_path: Path, unique: Names
) -> None:
    """The child is cancelled (seeing no parent yet) while a parent adopts it: the
    adoption raises FlowCancelled (its step then fails without retry) instead of
    parking the parent step WAITING for a child that will never finish.
    """
    storage = sql_storage(request, backend, tmp_path)
    race = adoption_race(
        storage, unique, lambda child, step: storage.cancel_flow(tracking_id=child)
    )
    assert race.rival.status == FlowStatus.CANCELLED
    assert isinstance(race.adoption, FlowCancelled), race.adoption
    assert step_of(storage, race.parent).status == NodeStatus.RUNNING  # left to its worker


@pytest.mark.parametrize("backend", ["postgresql"])
def test_two_parents_adopting_one_run_at_once_only_one_gets_it(
    request: pytest.FixtureRequest, backend: str, tmp_path: Path, unique: Names
) -> None:
    """Two parents adopt the same top-level run at the same moment: the second is refused
    (SubflowTaken) rather than waiting forever for a child that reports to the first,
    and the first completes when the child does.
    """
    storage = sql_storage(request, backend, tmp_path)
    storage.enqueue_flow(flow=raw_flow(first := unique("p1"), (PlannedStep("sub", 1, True),)))
    first_step = claim_one(storage, first)
    race = adoption_race(
        storage,
        unique,
        lambda child, step: storage.start_subflow(
            lease=first_step.lease, child=raw_flow(child, ONE)
        ),
    )
    assert race.rival == NodeStatus.WAITING
    assert isinstance(race.adoption, SubflowTaken), race.adoption
    assert step_of(storage, race.parent).status == NodeStatus.RUNNING  # left to its worker
    assert storage.complete_node(lease=race.child_step.lease, output="child done")
    record = storage.get_flow(tracking_id=first)
    assert record is not None and record.status == FlowStatus.COMPLETED


# -- PostgreSQL and MySQL: the loser of racing retries -----------------------------------


@contextlib.contextmanager
def run_row_locked(storage: SqlStorage, tracking_id: str) -> Iterator[None]:
    """Hold the fs_flows row's lock in another transaction until the block ends."""
    flows = sa.table("fs_flows", sa.column("id"), sa.column("tracking_id"))
    with storage.engine.connect() as conn, conn.begin():
        conn.execute(
            sa.select(flows.c.id).where(flows.c.tracking_id == tracking_id).with_for_update()
        )
        yield


@pytest.mark.parametrize("backend", ["postgresql", "mysql"])
def test_racing_retries_that_read_failed_are_told_it_is_being_retried(
    request: pytest.FixtureRequest, backend: str, tmp_path: Path, unique: Names
) -> None:
    """Three retries all read the run as FAILED, then queue on its row lock: one re-queues
    it, and the two others re-read the status and say it is already being retried.
    """
    storage = sql_storage(request, backend, tmp_path)
    storage.enqueue_flow(flow=raw_flow(tid := unique("t"), ONE))
    step = claim_one(storage, tid)
    assert storage.fail_node(lease=step.lease, error="boom", retry_delay=None)
    with run_row_locked(storage, tid):
        retries = [Background(lambda: storage.resume_flow(tracking_id=tid)) for _ in range(3)]
        # InnoDB refreshes INNODB_TRX only after 0.1 s without reads: poll slower.
        eventually(lambda: lock_waits(storage) == 3, interval=0.25)
    outcomes = [r.result() for r in retries]
    refused = [o for o in outcomes if isinstance(o, Exception)]
    assert len(refused) == 2, outcomes
    for error in refused:
        assert isinstance(error, RunNotRetryable), error
        assert f"flow run {tid!r} is already being retried" in str(error)


@pytest.mark.parametrize("backend", ["postgresql", "mysql"])
def test_racing_triggers_of_a_failed_run_all_answer_its_current_status(
    request: pytest.FixtureRequest, backend: str, tmp_path: Path, unique: Names
) -> None:
    """Three flow.run() triggers of a FAILED run queue on its row lock (on PostgreSQL
    after reading it FAILED): one resumes it, and the two others re-read the run and
    answer RUNNING, not the FAILED they read before they waited.
    """
    storage = sql_storage(request, backend, tmp_path)
    storage.enqueue_flow(flow=raw_flow(tid := unique("t"), ONE))
    step = claim_one(storage, tid)
    assert storage.fail_node(lease=step.lease, error="boom", retry_delay=None)
    with run_row_locked(storage, tid):
        triggers = [
            Background(lambda: storage.enqueue_flow(flow=raw_flow(tid, ONE))) for _ in range(3)
        ]
        # InnoDB refreshes INNODB_TRX only after 0.1 s without reads: poll slower.
        eventually(lambda: lock_waits(storage) == 3, interval=0.25)
    results = [t.result() for t in triggers]
    assert sorted(r.resumed for r in results) == [False, False, True], results
    assert {r.status for r in results} == {FlowStatus.RUNNING}, results

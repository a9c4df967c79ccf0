"""PostgreSQL's hot statements (the batch write, the claim) are PREPAREd once per
connection and then only EXECUTEd, whatever the batch's size; a connection that is
replaced (pg_terminate_backend) or loses its statements (DEALLOCATE ALL, as a pooler
does) costs the caller nothing; FLOWSMITH_PG_PREPARE=off sends plain statements.

What a connection holds is read from pg_prepared_statements through the storage's
own pool, kept to one connection so that every transaction shares it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from flowsmith_worker.config import PoolSettings
from flowsmith_worker.errors import DatabaseUnavailable
from flowsmith_worker.plan import Plan, PlannedStep
from flowsmith_worker.storage import create_storage
from flowsmith_worker.storage.base import ClaimedNode, Finished, NewFlow, NodeStatus
from flowsmith_worker.storage.sql import SqlStorage
from flowsmith_worker.storage.sql.prepared import SWITCH_ENV
from tests.servers.pgbouncer import skip_through_pgbouncer

pytestmark = skip_through_pgbouncer("prepared statements held by a connection")
Names = Callable[[str], str]
ONE_CONNECTION = PoolSettings(pool_min=1, pool_max=1)


@pytest.fixture
def pg(pg_url: str) -> Iterator[SqlStorage]:
    storage = create_storage(pg_url, ONE_CONNECTION)
    assert isinstance(storage, SqlStorage)
    storage.migrate()
    yield storage
    storage.close()


def enqueue(storage: SqlStorage, unique: Names, runs: int, steps: int = 2) -> None:
    plan = Plan(stages=tuple((PlannedStep(f"s{i}", 1),) for i in range(steps)))
    for _ in range(runs):
        tracking_id = unique("t")
        storage.enqueue_flow(flow=NewFlow("raw", tracking_id, {"n": 1}, plan))


def claim(storage: SqlStorage, limit: int, queues: list[str] | None = None) -> list[ClaimedNode]:
    return storage.claim_nodes(
        worker_id="w1", limit=limit, lease_seconds=60, queues=queues or ["default"]
    )


def finish(storage: SqlStorage, nodes: list[ClaimedNode]) -> list[bool]:
    """Write ``nodes`` as one batch of first steps done; which fences held."""
    finished = [Finished(n.lease, NodeStatus.COMPLETED, "1", step_name=n.step_name) for n in nodes]
    return [w.won for w in storage.complete_batch(finished=finished)]


def prepared(storage: SqlStorage) -> dict[str, int]:
    """The statements the storage's connection holds, with how often each ran."""
    with storage.engine.connect() as conn:
        rows = conn.exec_driver_sql(
            "SELECT name, generic_plans + custom_plans FROM pg_prepared_statements"
        ).all()
    return {name: runs for name, runs in rows}


def backend_pid(storage: SqlStorage) -> int:
    with storage.engine.connect() as conn:
        return int(conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one())


def test_one_prepared_batch_write_serves_every_batch_size(pg: SqlStorage, unique: Names) -> None:
    """Batches of 1, 3 and 2 outcomes run the same two prepared statements (lock the
    runs, write the batch) three times each: the arrays are bound, not written into a
    new text each time. Claims of different sizes run one prepared claim."""
    enqueue(pg, unique, runs=6)
    nodes = claim(pg, 1) + claim(pg, 3) + claim(pg, 2)
    assert len(nodes) == 6
    assert finish(pg, nodes[:1]) == [True]
    assert finish(pg, nodes[1:4]) == [True] * 3
    assert finish(pg, nodes[4:]) == [True] * 2
    held = prepared(pg)
    assert held["fs_lock_runs"] == 3
    assert held["fs_finish"] == 3
    assert held["fs_claim_one_queue"] == 3
    # The runs moved on as before: their second steps are there to claim.
    assert {n.step_name for n in claim(pg, 10)} == {"s1"}


def test_enqueues_run_one_prepared_statement_and_survive_losing_it(
    pg: SqlStorage, unique: Names
) -> None:
    """Each new run (flow.run's one-statement path) is one EXECUTE of the prepared
    enqueue; after DEALLOCATE ALL the next enqueue runs again on a new connection
    instead of failing, and every run was written once."""
    enqueue(pg, unique, runs=3)
    assert prepared(pg)["fs_enqueue_runs"] == 3
    with pg.engine.connect() as conn:
        conn.exec_driver_sql("DEALLOCATE ALL")
    enqueue(pg, unique, runs=1)
    assert prepared(pg) == {"fs_enqueue_runs": 1}
    assert len(claim(pg, 10)) == 4


def test_claims_of_several_queues_have_their_own_prepared_statement(
    pg: SqlStorage, unique: Names
) -> None:
    """A claim over several queues is the other prepared claim, and claims correctly."""
    enqueue(pg, unique, runs=2)
    assert len(claim(pg, 5, queues=["default", "other"])) == 2
    assert prepared(pg)["fs_claim_queues"] == 1


def test_a_terminated_backend_is_replaced_and_prepares_again(
    pg: SqlStorage, pg_url: str, unique: Names
) -> None:
    """pg_terminate_backend kills the storage's connection while it holds the statements:
    the next batch and claim still work (on a new connection, which prepares afresh)."""
    enqueue(pg, unique, runs=2)
    first, second = claim(pg, 1), claim(pg, 1)
    assert finish(pg, first) == [True]
    old_pid = backend_pid(pg)
    admin = sa.create_engine(pg_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        assert conn.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": old_pid}).scalar()
    admin.dispose()
    assert finish(pg, second) == [True]
    assert backend_pid(pg) != old_pid
    assert prepared(pg) == {"fs_lock_runs": 1, "fs_finish": 1}
    assert len(claim(pg, 5)) == 2


def test_a_connection_that_lost_its_statements_is_replaced(pg: SqlStorage, unique: Names) -> None:
    """DEALLOCATE ALL (what a pooler's reset does) behind the storage's back: the next
    batch and claim are not refused with "prepared statement does not exist"; they run
    again on a new connection."""
    enqueue(pg, unique, runs=2)
    first, second = claim(pg, 1), claim(pg, 1)
    assert finish(pg, first) == [True]
    with pg.engine.connect() as conn:
        conn.exec_driver_sql("DEALLOCATE ALL")
    assert finish(pg, second) == [True]
    assert len(claim(pg, 5)) == 2
    assert set(prepared(pg)) == {"fs_lock_runs", "fs_finish", "fs_claim_one_queue"}


def test_preparing_can_be_turned_off(
    pg_url: str, unique: Names, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FLOWSMITH_PG_PREPARE=off (for a pooler in transaction mode): nothing is prepared,
    and batches and claims work as before."""
    monkeypatch.setenv(SWITCH_ENV, "off")
    storage = create_storage(pg_url, ONE_CONNECTION)
    assert isinstance(storage, SqlStorage)
    try:
        storage.migrate()
        enqueue(storage, unique, runs=3)
        assert finish(storage, claim(storage, 3)) == [True] * 3
        assert len(claim(storage, 5)) == 3
        assert prepared(storage) == {}
    finally:
        storage.close()


def test_a_migration_that_changes_a_result_type_costs_the_caller_nothing(
    pg: SqlStorage, pg_url: str, unique: Names
) -> None:
    """A table altered under a prepared statement (PostgreSQL then refuses with "cached
    plan must not change result type"): the next batch runs again on a new connection."""
    enqueue(pg, unique, runs=2)
    first, second = claim(pg, 1), claim(pg, 1)
    assert finish(pg, first) == [True]
    admin = sa.create_engine(pg_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text("ALTER TABLE fs_flows ALTER COLUMN error TYPE varchar(5000)"))
    admin.dispose()
    assert finish(pg, second) == [True]


def test_behind_a_pooler_that_keeps_losing_them_the_error_says_what_to_do(
    pg: SqlStorage, unique: Names
) -> None:
    """Every connection handed out holds other statements of the same names (a pooler in
    transaction mode): the batch fails with DatabaseUnavailable naming the switch, not
    with "run flowsmith migrate" (PostgreSQL says "does not exist" / "already exists")."""
    enqueue(pg, unique, runs=1)
    nodes = claim(pg, 1)

    def other_session(dbapi_connection: Any, *_args: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("DEALLOCATE ALL; PREPARE fs_lock_runs AS SELECT 1")
        cursor.close()

    sa.event.listen(pg.engine, "checkout", other_session)
    try:
        with pytest.raises(DatabaseUnavailable, match=f"{SWITCH_ENV}=off"):
            finish(pg, nodes)
    finally:
        sa.event.remove(pg.engine, "checkout", other_session)
    assert finish(pg, nodes) == [True]

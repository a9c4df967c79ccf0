"""The SQL storage asks its dialect what it can do, never which database it is on.

Each backend's dialect is given another name; the storage must claim and write
batches exactly as before, statement for statement, on the real servers. Had it
branched on the name anywhere on those paths, a renamed PostgreSQL would take
another backend's claim, and a renamed PostgreSQL or MySQL another's batch
write (whose SQL its server refuses); a renamed SQLite would skip its read
before the claim.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import pytest
import sqlalchemy as sa

from flowsmith_worker.plan import Plan, PlannedStep
from flowsmith_worker.records import FlowStatus, NodeStatus
from flowsmith_worker.storage.base import Chain, Finished, NewFlow, Storage
from flowsmith_worker.storage.sql.dialects import Dialect

Names = Callable[[str], str]
CHAIN = Chain("w1", lease_seconds=60)


def renamed(dialect: Dialect) -> Dialect:
    """The same dialect, under a name no branch on names would recognise."""
    subclass = type(f"Renamed{type(dialect).__name__}", (type(dialect),), {"name": "renamed"})
    made: Dialect = subclass()
    return made


@contextlib.contextmanager
def recording(storage: Storage) -> Iterator[list[str]]:
    """The text of every statement sent meanwhile (counted by the engine itself)."""
    statements: list[str] = []
    engine = storage.engine  # type: ignore[attr-defined]

    def record(*args: object) -> None:
        statements.append(str(args[2]))

    sa.event.listen(engine, "before_cursor_execute", record)
    try:
        yield statements
    finally:
        sa.event.remove(engine, "before_cursor_execute", record)


def run_two_steps(storage: Storage, unique: Names) -> list[str]:
    """Enqueue two runs of two steps, claim them, and finish them in two batches (the
    second chained, and on PostgreSQL moved by the plans the first remembered).
    Checks both runs completed; returns the statements the claims and batches took."""
    plan = Plan(stages=((PlannedStep("a", 1),), (PlannedStep("b", 1),)), module="tests.nowhere")
    tracking_ids = [unique("run"), unique("run")]
    for tracking_id in tracking_ids:
        storage.enqueue_flow(
            flow=NewFlow(flow_name="raw", tracking_id=tracking_id, input={}, plan=plan)
        )
    with recording(storage) as statements:
        claimed = storage.claim_nodes(
            worker_id="w1", limit=10, lease_seconds=60, queues=["default"]
        )
        assert sorted(n.tracking_id for n in claimed) == sorted(tracking_ids)
        written = storage.complete_batch(
            finished=[
                Finished(n.lease, NodeStatus.COMPLETED, '"x"', step_name=n.step_name)
                for n in claimed
            ],
            chain=CHAIN,
        )
        chained = [w.chained for w in written if w.chained is not None]
        assert [c.step_name for c in chained] == ["b", "b"]
        storage.complete_batch(
            finished=[
                Finished(c.lease, NodeStatus.COMPLETED, '"y"', step_name=c.step_name)
                for c in chained
            ]
        )
    for tracking_id in tracking_ids:
        assert storage.get_flow(tracking_id=tracking_id).status == FlowStatus.COMPLETED  # type: ignore[union-attr]
    return statements


@pytest.mark.parametrize("backend", ["sqlite", "postgresql", "mysql"], indirect=True)
def test_a_renamed_dialect_claims_and_writes_with_the_same_statements(
    storage: Storage, backend: str, unique: Names
) -> None:
    """Under another name, each backend's dialect makes the storage send exactly the
    statements it sends under its own: the claim and batch paths follow the dialect's
    capabilities (claims_in_one_statement, claim_reads_first, binds_arrays,
    batch_write), not its name."""
    run_two_steps(storage, unique)  # PostgreSQL PREPAREs on the first use, EXECUTEs after
    as_itself = run_two_steps(storage, unique)
    storage.dialect = renamed(storage.dialect)  # type: ignore[attr-defined]
    assert run_two_steps(storage, unique) == as_itself

"""The claim's plan on a backlog: it walks the first runnable nodes in claim order
instead of sorting every due one, whatever the number of queues a worker serves.

The plans are the databases' own (EXPLAIN ANALYZE on PostgreSQL, EXPLAIN QUERY PLAN
on SQLite) of the statement exactly as the storage sent it, caught on its way to the
driver by tests/bench/explain.py, on a freshly analysed backlog. MySQL/MariaDB is not
here: without partial indexes it has no index for this (see schema.py), and `make
bench-scale` prints its plan.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from flowsmith_worker.flow import Flow
from flowsmith_worker.storage import create_storage
from flowsmith_worker.storage.sql import SqlStorage
from tests.bench import explain
from tests.conftest import database_url

Names = Callable[[str], str]
BACKLOG = 3000  # due runs: enough that a sort of them is the plan a planner picks
CLAIMED = 8


@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
def test_a_worker_of_two_queues_claims_without_sorting_the_backlog(
    request: pytest.FixtureRequest, backend: str, tmp_path: Path, unique: Names
) -> None:
    """With 3,000 due runs analysed, the claim of a worker serving two queues takes the
    first 8 in order through fs_nodes_runnable_in_order: its plan neither scans
    fs_nodes whole nor sorts its rows (PostgreSQL: no Seq Scan, no sort keyed on
    fs_nodes; SQLite: no temporary B-tree for the ORDER BY)."""
    url = database_url(request, backend, tmp_path)
    storage = create_storage(url)
    assert isinstance(storage, SqlStorage)
    try:
        storage.migrate()
        flow = Flow(unique("backlog"), storage=storage).step("a", lambda ctx: 1)
        flow.run_many([{"i": i} for i in range(BACKLOG)])
        with storage.engine.begin() as conn:
            conn.exec_driver_sql("ANALYZE")
        caught = explain.Caught()
        with explain.catching(storage.engine, storage.dialect, caught):
            claimed = storage.claim_nodes(
                worker_id="w", limit=CLAIMED, lease_seconds=30, queues=["default", "other"]
            )
    finally:
        storage.close()

    assert len(claimed) == CLAIMED
    picks = [s for s in caught.claim.values() if "pick" in s.role or "several" in s.role]
    assert len(picks) == 1, list(caught.claim)
    plan = explain.explain(url, picks[0])
    assert plan.warnings == [], "\n".join(plan.plan)

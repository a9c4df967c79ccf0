"""The claim's plan on a backlog: it walks the first runnable nodes in claim order
instead of sorting every due one, whatever the number of queues a worker serves.

The plans are the databases' own (EXPLAIN ANALYZE on PostgreSQL, EXPLAIN QUERY PLAN
on SQLite) of the statement exactly as the storage sent it, caught on its way to the
driver by tests/bench/explain.py, on a freshly analysed backlog. MySQL/MariaDB is not
here: without partial indexes it has no index for this (see schema.py), and `make
bench-scale` prints its plan.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest

from flowsmith_worker.config import PoolSettings
from flowsmith_worker.flow import Flow
from flowsmith_worker.storage import create_storage
from flowsmith_worker.storage.sql import SqlStorage
from flowsmith_worker.storage.sql import claim as sql_claim
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


def test_the_prepared_claims_generic_plan_reads_only_what_it_claims(
    request: pytest.FixtureRequest, tmp_path: Path, unique: Names
) -> None:
    """PostgreSQL keeps a prepared statement's generic plan (planned without the
    values) once it looks no dearer than planning each time, as it does on small
    tables. That plan must stay cheap when the tables grow: it estimates LIMIT $n
    as a tenth of the due rows, and had picked a hash join over a scan of all of
    fs_nodes and a merge join over all of fs_flows to lease 8 nodes. With 3,000 due
    runs in another queue and 20 in the worker's, analysed, the generic plan of the
    one-queue claim reads by key only: no Seq Scan, no Merge Join."""
    url = database_url(request, "postgresql", tmp_path)
    storage = create_storage(url, PoolSettings(pool_min=1, pool_max=1))
    assert isinstance(storage, SqlStorage)
    try:
        storage.migrate()
        Flow(unique("other"), storage=storage, queue="other").step("a", lambda ctx: 1).run_many(
            [{"i": i} for i in range(BACKLOG)]
        )
        Flow(unique("mine"), storage=storage).step("a", lambda ctx: 1).run_many([{}] * 20)
        with storage.engine.begin() as conn:
            conn.exec_driver_sql("ANALYZE")
        storage.claim_nodes(worker_id="w", limit=1, lease_seconds=30, queues=["default"])
        claim = sql_claim.CLAIM_PG_ONE_QUEUE
        arguments = ", ".join(f"%({name})s" for name in claim.types)
        values = {"queues": ["default"], "only_queue": "default", "limit": CLAIMED}
        with storage.engine.connect() as conn:  # the one connection, which holds the claim
            conn.exec_driver_sql("SET plan_cache_mode = force_generic_plan")
            rows = conn.exec_driver_sql(
                f"EXPLAIN (ANALYZE) EXECUTE {claim.name} ({arguments})",
                {**values, "worker_id": "w", "lease_seconds": 30.0},
            ).all()
            conn.rollback()
            conn.exec_driver_sql("RESET plan_cache_mode")
    finally:
        storage.close()

    plan = "\n".join(row[0] for row in rows)
    assert f"rows={CLAIMED} loops=1" in plan  # it did claim
    assert not re.search(r"Seq Scan on fs_(nodes|flows)|Merge Join", plan), plan

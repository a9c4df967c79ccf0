"""fs_nodes_status_lease on PostgreSQL: a partial index of the unfinished nodes (schema v4).

A node that finishes writes no entry into it (a non-HOT update writes one into
every index whose predicate the new row meets): less WAL per step, and an index
as small as the work in flight however many finished nodes pile up. The
queries that read nodes by status and lease can still use it.
MySQL/MariaDB have no partial indexes and SQLite matches one only by the very
same term, so both keep the full index.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event

from flowsmith_worker.flow import Flow
from flowsmith_worker.storage.sql import SqlStorage
from flowsmith_worker.worker import Worker

Names = Callable[[str], str]
# schema.py's "status IN ('PENDING', 'RUNNING')", as PostgreSQL prints it back.
UNFINISHED = (
    "((status)::text = ANY ((ARRAY['PENDING'::character varying, "
    "'RUNNING'::character varying])::text[]))"
)
# Every index entry's heap row (a deduplicated posting tuple holds several), leaf pages only.
ENTRIES_OF_FINISHED_NODES = """
SELECT count(*) FROM fs_nodes n
WHERE n.status = 'COMPLETED' AND n.ctid IN (
    SELECT unnest(coalesce(i.tids, ARRAY[i.htid]))
    FROM generate_series(1, pg_relation_size('fs_nodes_status_lease') / 8192 - 1) AS b,
         bt_page_stats('fs_nodes_status_lease', b::int) AS s,
         bt_page_items('fs_nodes_status_lease', b::int) AS i
    WHERE s.type = 'l'
)
"""


def run_three_steps(storage: SqlStorage, unique: Names) -> None:
    flow = Flow(unique("lease_index"))
    for name in ("a", "b", "c"):
        flow.step(name, lambda ctx: "done")
    flow.storage = storage
    flow.run({}, tracking_id=unique("run"))
    Worker(storage=storage, poll_interval=0.05).run_until_idle(timeout=20)


def test_a_migrated_postgresql_database_indexes_only_unfinished_leases(
    pg_storage: SqlStorage,
) -> None:
    """Migration 4 rebuilds fs_nodes_status_lease with the predicate schema.py declares."""
    with pg_storage.engine.connect() as conn:
        predicate = conn.execute(
            sa.text(
                "SELECT pg_get_expr(indpred, indrelid) FROM pg_index "
                "WHERE indexrelid = 'fs_nodes_status_lease'::regclass"
            )
        ).scalar_one()
    assert predicate == UNFINISHED


def test_finished_nodes_have_no_entry_in_the_lease_index(
    pg_storage: SqlStorage, unique: Names
) -> None:
    """After a worker has run a 3-step flow, no entry of fs_nodes_status_lease points at
    any of its COMPLETED rows (a full index holds one for each of the three)."""
    run_three_steps(pg_storage, unique)
    with pg_storage.engine.begin() as conn:
        conn.execute(sa.text("CREATE EXTENSION IF NOT EXISTS pageinspect"))
        assert conn.execute(sa.text("SELECT count(*) FROM fs_nodes")).scalar_one() == 3
        assert conn.execute(sa.text(ENTRIES_OF_FINISHED_NODES)).scalar_one() == 0


@contextmanager
def sent(storage: SqlStorage) -> Iterator[list[tuple[str, Any]]]:
    """Each statement the storage sends meanwhile, with its parameters."""
    statements: list[tuple[str, Any]] = []

    def record(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        statements.append((statement, parameters))

    event.listen(storage.engine, "before_cursor_execute", record)
    try:
        yield statements
    finally:
        event.remove(storage.engine, "before_cursor_execute", record)


@pytest.mark.parametrize(
    "read",
    [
        pytest.param(lambda s: s.rescue_expired(), id="rescue"),
        pytest.param(lambda s: s.count_open_nodes(queues=["default"]), id="count_open_nodes"),
    ],
)
def test_reads_by_status_and_lease_can_still_use_the_partial_index(
    pg_storage: SqlStorage, unique: Names, read: Callable[[SqlStorage], Any]
) -> None:
    """The rescue (RUNNING by lease expiry) and count_open_nodes (PENDING or RUNNING)
    send literal statuses that imply the predicate: with sequential scans off, their
    plans read fs_nodes_status_lease, so finished rows never have to be scanned."""
    run_three_steps(pg_storage, unique)
    with sent(pg_storage) as statements:
        read(pg_storage)
    selects = [(s, p) for s, p in statements if s.lstrip().upper().startswith("SELECT")]
    assert selects
    with pg_storage.engine.begin() as conn:
        conn.execute(sa.text("SET LOCAL enable_seqscan = off"))
        for statement, parameters in selects:
            plan = conn.exec_driver_sql(f"EXPLAIN {statement}", parameters).scalars().all()
            assert "fs_nodes_status_lease" in "\n".join(plan), plan

"""Big tables, fast: copies of one real run, made by set-based SQL on the database itself.

The scale phase (scale.py) needs 1,000,000 finished nodes or a 100,000-node
backlog in seconds, not the hours that enqueueing and running them would take.
So one run of the benchmark's 10-step flow is made for real (enqueued, and for
a finished one run by a worker), and copied ``count - 1`` times by two
statements: INSERT ... SELECT of the run's fs_flows row crossed with a
numbers table (generate_series on PostgreSQL, a recursive CTE elsewhere),
then of its fs_nodes rows for every new run. The copies are therefore shaped
exactly like real rows (plan, input, outputs, leases, statuses), differing
only in id, tracking_id and, for a backlog, the times it became due.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from flowsmith_worker.storage.sql import schema
from flowsmith_worker.storage.sql.dialects import dialect_of

F, N = schema.flows, schema.nodes
# MariaDB stops a recursive CTE after max_recursive_iterations rows (1,000 on
# 10.11 by default); the numbers CTE needs one per copy.
_MARIADB_RECURSION = "SET SESSION max_recursive_iterations = 4294967295"


def copy_run(
    conn: sa.Connection, template_id: int, count: int, prefix: str, *, due_now: bool
) -> None:
    """``count`` copies of run ``template_id``, with its nodes.

    ``due_now``: the copies and their nodes are created (and due) at the
    database clock's now, which puts a backlog behind everything already
    queued; otherwise every time is the template's own (history).
    """
    if count <= 0:
        return
    numbers = _numbers(conn, count)
    first_new = conn.execute(sa.select(sa.func.coalesce(sa.func.max(F.c.id), 0))).scalar_one()
    now = dialect_of(conn.engine).now()
    conn.execute(_copy_flows(template_id, numbers, prefix, now if due_now else None))
    new_runs = F.c.id > first_new
    conn.execute(_copy_nodes(template_id, new_runs, now if due_now else None))


def _numbers(conn: sa.Connection, count: int) -> sa.CTE:
    """A CTE ``numbers(n)`` of 1..count."""
    if conn.dialect.name == "postgresql":
        return sa.select(sa.func.generate_series(1, count).label("n")).cte("numbers")
    if conn.dialect.name in ("mysql", "mariadb"):
        conn.exec_driver_sql(_MARIADB_RECURSION)
    seed = sa.select(sa.literal(1).label("n")).cte("numbers", recursive=True)
    return seed.union_all(sa.select(seed.c.n + 1).where(seed.c.n < count))


def _copy_flows(
    template_id: int, numbers: sa.CTE, prefix: str, now: sa.ColumnElement[float] | None
) -> sa.Insert:
    template = F.alias("template")
    replaced: dict[str, Any] = {
        "tracking_id": sa.literal(prefix) + sa.cast(numbers.c.n, sa.String),
    }
    if now is not None:
        replaced |= {"created_at": now, "updated_at": now}
    columns = [c.name for c in F.columns if c.name != "id"]
    values = [replaced.get(name, template.c[name]).label(name) for name in columns]
    select = (
        sa.select(*values)
        .select_from(template)
        .join(numbers, sa.true())
        .where(template.c.id == template_id)
    )
    return sa.insert(F).from_select(columns, select)


def _copy_nodes(
    template_id: int, new_runs: sa.ColumnElement[bool], now: sa.ColumnElement[float] | None
) -> sa.Insert:
    template = N.alias("template")
    replaced: dict[str, Any] = {"flow_id": F.c.id}
    if now is not None:
        replaced |= {"created_at": now, "run_after": now}
    columns = [c.name for c in N.columns if c.name != "id"]
    values = [replaced.get(name, template.c[name]).label(name) for name in columns]
    select = (
        sa.select(*values)
        .select_from(F)
        .join(template, template.c.flow_id == template_id)
        .where(new_runs)
    )
    return sa.insert(N).from_select(columns, select)


def analyze(conn: sa.Connection) -> None:
    """Fresh planner statistics for the two big tables (``conn`` in autocommit)."""
    name = conn.dialect.name
    if name == "postgresql":
        conn.exec_driver_sql("VACUUM ANALYZE fs_flows, fs_nodes")
    elif name == "sqlite":
        conn.exec_driver_sql("ANALYZE")
    else:
        conn.exec_driver_sql("ANALYZE TABLE fs_flows, fs_nodes").all()

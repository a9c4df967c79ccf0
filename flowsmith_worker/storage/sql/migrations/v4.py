"""Version 4: fs_nodes.input dropped; queue tables vacuumed often; claim and lease indexes.

fs_nodes.input held a copy of ctx.data in every node. Since version 3's code
rebuilds ctx.data from the run's input and the outputs of the completed steps,
nothing reads it and new nodes stored only 'null': the column is dropped, not
kept nullable, so no writer or reader can come to depend on it again and no
row carries it. Dropping is instant on PostgreSQL and on MySQL 8.0.29+ / MariaDB
10.4+ (metadata only; older MySQL rebuilds the table); SQLite 3.35+ rewrites
the table in the migration's transaction.

PostgreSQL: fs_flows and fs_nodes are vacuumed once 1 % of their rows are dead,
with no cost delay, instead of at 20 % and throttled (see schema.AUTOVACUUM_OFTEN).
fs_nodes_status_lease is built again as a partial index of the PENDING and
RUNNING nodes only, so a finishing node writes no entry into it (one scan of
fs_nodes, inside the migration's transaction, like the column drop).

PostgreSQL and SQLite: fs_nodes_runnable_in_order, the pending nodes in claim
order whatever their queue, so a worker of several queues claims without
sorting every due node (see schema.py).
"""

from __future__ import annotations

from sqlalchemy.engine import Connection

from flowsmith_worker.errors import UnsupportedDatabase

# SQLite learnt ALTER TABLE ... DROP COLUMN in 3.35.0.
SQLITE_DROP_COLUMN = (3, 35, 0)
AUTOVACUUM = "autovacuum_vacuum_scale_factor = 0.01, autovacuum_vacuum_cost_delay = 0"
UNFINISHED_LEASES = (
    "CREATE INDEX fs_nodes_status_lease ON fs_nodes (status, lease_expires_at) "
    "WHERE status IN ('PENDING', 'RUNNING')"
)
RUNNABLE_IN_ORDER = (
    "CREATE INDEX fs_nodes_runnable_in_order ON fs_nodes (priority, run_after, id)"
    " WHERE status = 'PENDING'"
)


def apply(conn: Connection) -> None:
    if conn.dialect.name == "sqlite":
        _require_drop_column()
    conn.exec_driver_sql("ALTER TABLE fs_nodes DROP COLUMN input")
    if conn.dialect.name == "postgresql":
        for table in ("fs_flows", "fs_nodes"):
            conn.exec_driver_sql(f"ALTER TABLE {table} SET ({AUTOVACUUM})")
        conn.exec_driver_sql("DROP INDEX fs_nodes_status_lease")
        conn.exec_driver_sql(UNFINISHED_LEASES)
    if conn.dialect.name in ("postgresql", "sqlite"):
        conn.exec_driver_sql(RUNNABLE_IN_ORDER)


def _require_drop_column() -> None:
    import sqlite3  # here: a Python built without SQLite can still use the other databases

    if sqlite3.sqlite_version_info < SQLITE_DROP_COLUMN:
        raise UnsupportedDatabase(
            f"this Python's SQLite is {sqlite3.sqlite_version}; FlowSmith needs SQLite 3.35+ "
            "(ALTER TABLE ... DROP COLUMN): use a Python built with a newer SQLite"
        )

"""Version 3: names compare byte for byte, and ids are never reused (frozen, see v1).

MySQL/MariaDB: the name columns (tracking_id, flow, step and queue names,
worker ids) get a binary NO PAD collation; the default one made `Order-aBc`,
`order-AbC`, `cafe`, `café` and `k `, `k` the same run. Uniqueness only gets
finer, so no existing row can collide. ALTER TABLE rebuilds each table.

SQLite: fs_flows and fs_nodes become AUTOINCREMENT tables, so a deleted run's
or node's id is never handed out again (a late completion is fenced by node
id, worker and attempt). SQLite cannot ALTER a table to that; each is rebuilt
in the migration's transaction, keeping every id, and SQLite sets the table's
sqlite_sequence to the highest id copied.

PostgreSQL: nothing to do. Its default collations compare byte for byte
(they are deterministic), and sequences never go back.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from flowsmith_worker.errors import UnsupportedDatabase

# The NO PAD binary collations this version gave the name columns, kept here
# rather than read from the dialects: were schema.Identifier ever to move to
# another collation, version 3 would still build what it built, and
# tests/integration/test_migrations.py would ask for the version that converts
# the columns.
MARIADB_COLLATION = "utf8mb4_nopad_bin"
MYSQL_COLLATION = "utf8mb4_0900_bin"

# table -> (column, length, nullable) of every name column.
NAME_COLUMNS: dict[str, tuple[tuple[str, int, bool], ...]] = {
    "fs_flows": (("flow_name", 200, False), ("tracking_id", 255, False), ("queue", 100, False)),
    "fs_nodes": (("step_name", 200, False), ("queue", 100, False), ("lease_owner", 64, True)),
    "fs_workers": (("id", 64, False),),
    "fs_queues": (("name", 100, False),),
}


def apply(conn: Connection) -> None:
    if conn.dialect.name in ("mysql", "mariadb"):
        _binary_names(conn)
    elif conn.dialect.name == "sqlite":
        _autoincrement_ids(conn)


def _binary_names(conn: Connection) -> None:
    collation = MARIADB_COLLATION if getattr(conn.dialect, "is_mariadb", False) else MYSQL_COLLATION
    known = conn.execute(
        sa.text("SELECT 1 FROM information_schema.collations WHERE collation_name = :name"),
        {"name": collation},
    ).first()
    if known is None:
        raise UnsupportedDatabase(
            f"this server has no collation {collation}, which compares names byte for "
            "byte: FlowSmith needs MySQL 8.0.17+ or MariaDB 10.2+"
        )
    for table, columns in NAME_COLUMNS.items():
        changes = ", ".join(
            f"MODIFY {name} VARCHAR({length}) CHARACTER SET utf8mb4 COLLATE {collation} "
            + ("NULL" if nullable else "NOT NULL")
            for name, length, nullable in columns
        )
        conn.exec_driver_sql(f"ALTER TABLE {table} {changes}")


# -- SQLite -------------------------------------------------------------------------

sqlite_metadata = sa.MetaData()

Seconds: sa.Double[float] = sa.Double()

flows = sa.Table(
    "fs_flows",
    sqlite_metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("flow_name", sa.String(200), nullable=False),
    sa.Column("tracking_id", sa.String(255), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("input", sa.Text, nullable=False),
    sa.Column("output", sa.Text),
    sa.Column("error", sa.Text),
    sa.Column("plan", sa.Text, nullable=False),
    sa.Column("queue", sa.String(100), nullable=False),
    sa.Column("priority", sa.Integer, nullable=False),
    sa.Column("parent_node_id", sa.Integer),
    sa.Column("created_at", Seconds, nullable=False),
    sa.Column("updated_at", Seconds, nullable=False),
    sa.Column("finished_at", Seconds),
    sa.UniqueConstraint("tracking_id", name="fs_flows_tracking_id_key"),
    sa.Index("fs_flows_parent_node_id", "parent_node_id"),
    sa.Index("fs_flows_status_updated", "status", "updated_at"),
    sa.Index("fs_flows_created", "created_at"),
    sqlite_autoincrement=True,
)

nodes = sa.Table(
    "fs_nodes",
    sqlite_metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column(
        "flow_id", sa.Integer, sa.ForeignKey("fs_flows.id", ondelete="CASCADE"), nullable=False
    ),
    sa.Column("step_name", sa.String(200), nullable=False),
    sa.Column("position", sa.Integer, nullable=False),
    sa.Column("group_index", sa.Integer, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("queue", sa.String(100), nullable=False),
    sa.Column("priority", sa.Integer, nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("max_attempts", sa.Integer, nullable=False),
    sa.Column("rescues", sa.Integer, nullable=False),
    sa.Column("run_after", Seconds, nullable=False),
    sa.Column("lease_owner", sa.String(64)),
    sa.Column("lease_expires_at", Seconds),
    sa.Column("input", sa.Text, nullable=False),
    sa.Column("output", sa.Text),
    sa.Column("error", sa.Text),
    sa.Column("created_at", Seconds, nullable=False),
    sa.Column("started_at", Seconds),
    sa.Column("finished_at", Seconds),
    sa.UniqueConstraint("flow_id", "step_name", name="fs_nodes_flow_step_key"),
    sa.Index("fs_nodes_status_lease", "status", "lease_expires_at"),
    sqlite_autoincrement=True,
)
sa.Index(
    "fs_nodes_runnable",
    nodes.c.queue,
    nodes.c.priority,
    nodes.c.run_after,
    nodes.c.id,
    sqlite_where=nodes.c.status == "PENDING",
)


def _autoincrement_ids(conn: Connection) -> None:
    """Rebuild fs_flows and fs_nodes as AUTOINCREMENT tables, ids and rows kept.

    Foreign keys stay on, so the order matters: renaming fs_flows first points
    fs_nodes' foreign key at the old copy, and the old child is dropped before
    the old parent, so no ON DELETE CASCADE ever reaches the new tables.
    """
    tables = (flows, nodes)
    for (index,) in conn.exec_driver_sql(
        "SELECT name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL "
        "AND tbl_name IN ('fs_flows', 'fs_nodes')"
    ).all():
        conn.exec_driver_sql(f'DROP INDEX "{index}"')  # the new tables reuse the names
    for table in tables:
        conn.exec_driver_sql(f"ALTER TABLE {table.name} RENAME TO {table.name}_v2")
    sqlite_metadata.create_all(conn, tables=list(tables))
    for table in tables:
        columns = ", ".join(column.name for column in table.columns)
        conn.exec_driver_sql(
            f"INSERT INTO {table.name} ({columns}) SELECT {columns} FROM {table.name}_v2"
        )
    for table in reversed(tables):
        conn.exec_driver_sql(f"DROP TABLE {table.name}_v2")

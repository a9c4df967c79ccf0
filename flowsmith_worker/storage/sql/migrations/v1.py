"""Version 1: fs_flows and fs_nodes, exactly as version 1 created them.

Frozen: a fresh install replays every version in order, so this module must
keep building what version 1 built, whatever schema.py says today. Change a
table with a new version instead.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import Connection

metadata = sa.MetaData()

LongText = sa.Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb")
Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Seconds: sa.Double[float] = sa.Double()

flows = sa.Table(
    "fs_flows",
    metadata,
    sa.Column("id", Id, primary_key=True, autoincrement=True),
    sa.Column("flow_name", sa.String(200), nullable=False),
    sa.Column("tracking_id", sa.String(255), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("input", LongText, nullable=False),
    sa.Column("output", LongText),
    sa.Column("error", LongText),
    sa.Column("plan", LongText, nullable=False),
    sa.Column("queue", sa.String(100), nullable=False),
    sa.Column("priority", sa.Integer, nullable=False),
    sa.Column("parent_node_id", Id),
    sa.Column("created_at", Seconds, nullable=False),
    sa.Column("updated_at", Seconds, nullable=False),
    sa.Column("finished_at", Seconds),
    sa.UniqueConstraint("tracking_id", name="fs_flows_tracking_id_key"),
    sa.Index("fs_flows_parent_node_id", "parent_node_id"),
    sa.Index("fs_flows_status_updated", "status", "updated_at"),
)

nodes = sa.Table(
    "fs_nodes",
    metadata,
    sa.Column("id", Id, primary_key=True, autoincrement=True),
    sa.Column("flow_id", Id, sa.ForeignKey("fs_flows.id", ondelete="CASCADE"), nullable=False),
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
    sa.Column("input", LongText, nullable=False),
    sa.Column("output", LongText),
    sa.Column("error", LongText),
    sa.Column("created_at", Seconds, nullable=False),
    sa.Column("started_at", Seconds),
    sa.Column("finished_at", Seconds),
    sa.UniqueConstraint("flow_id", "step_name", name="fs_nodes_flow_step_key"),
)

_pending = nodes.c.status == "PENDING"
sa.Index(
    "fs_nodes_runnable",
    nodes.c.queue,
    nodes.c.priority,
    nodes.c.run_after,
    nodes.c.id,
    postgresql_where=_pending,
    sqlite_where=_pending,
).ddl_if(dialect=("postgresql", "sqlite"))  # type: ignore[arg-type]  # tuples are documented
sa.Index(
    "fs_nodes_runnable_by_status",
    nodes.c.status,
    nodes.c.queue,
    nodes.c.priority,
    nodes.c.run_after,
).ddl_if(dialect=("mysql", "mariadb"))  # type: ignore[arg-type]  # tuples are documented
sa.Index("fs_nodes_status_lease", nodes.c.status, nodes.c.lease_expires_at)


def apply(conn: Connection) -> None:
    metadata.create_all(conn, checkfirst=True)

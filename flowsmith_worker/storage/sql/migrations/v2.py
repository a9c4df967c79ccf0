"""Version 2: fs_workers and fs_queues, and runs indexed by age (frozen, see v1)."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection

metadata = sa.MetaData()

Seconds: sa.Double[float] = sa.Double()

workers = sa.Table(
    "fs_workers",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("host", sa.String(255), nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("version", sa.String(32), nullable=False),
    sa.Column("queues", sa.String(1000), nullable=False),
    sa.Column("concurrency", sa.Integer, nullable=False),
    sa.Column("lease_seconds", Seconds, nullable=False),
    sa.Column("in_flight", sa.Integer, nullable=False),
    sa.Column("started_at", Seconds, nullable=False),
    sa.Column("heartbeat_at", Seconds, nullable=False),
)

queues = sa.Table(
    "fs_queues",
    metadata,
    sa.Column("name", sa.String(100), primary_key=True),
    sa.Column("max_running", sa.Integer),
)

# Only the column the index needs: fs_flows itself belongs to version 1.
_flows = sa.Table("fs_flows", metadata, sa.Column("created_at", Seconds))
flows_by_created = sa.Index("fs_flows_created", _flows.c.created_at)


def apply(conn: Connection) -> None:
    metadata.create_all(conn, tables=[workers, queues], checkfirst=True)
    flows_by_created.create(conn, checkfirst=True)

"""Version 5: fs_attempts, the attempts a step left behind (frozen, see v1).

A new table only: nothing existing is rewritten, and the rows already stored
keep describing each node's latest attempt. Attempts superseded before this
version (a retried failure, a rescue) were not kept and cannot be recovered.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import Connection

metadata = sa.MetaData()

LongText = sa.Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb")
Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Seconds: sa.Double[float] = sa.Double()

# Only the column the foreign key refers to: fs_nodes belongs to earlier versions.
_nodes = sa.Table("fs_nodes", metadata, sa.Column("id", Id, primary_key=True))

attempts = sa.Table(
    "fs_attempts",
    metadata,
    sa.Column("node_id", Id, sa.ForeignKey("fs_nodes.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("attempt", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("flow_id", Id, nullable=False),
    sa.Column("worker_id", sa.String(64)),
    sa.Column("started_at", Seconds, nullable=False),
    sa.Column("ended_at", Seconds, nullable=False),
    sa.Column("outcome", sa.String(16), nullable=False),
    sa.Column("error", LongText),
    sa.Index("fs_attempts_flow", "flow_id"),
)


def apply(conn: Connection) -> None:
    attempts.create(conn, checkfirst=True)

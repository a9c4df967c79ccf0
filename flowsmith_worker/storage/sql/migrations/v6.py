"""Version 6: parked nodes (fs_nodes.wake_at) and fs_events (frozen, see v1).

A sleep or a wait for an event parks its node PENDING until ``wake_at``; events
sent to runs are kept in fs_events until their wait takes them. Adding a
nullable column rewrites no row on PostgreSQL, MySQL 8 / MariaDB 10.3+ (instant
ADD COLUMN) or SQLite.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import Connection
from sqlalchemy.ext.compiler import compiles

from flowsmith_worker.storage.sql.migrations.v3 import MARIADB_COLLATION, MYSQL_COLLATION

metadata = sa.MetaData()

LongText = sa.Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb")
Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Seconds: sa.Double[float] = sa.Double()

# The type fs_nodes' other times were created with, on each database.
WAKE_AT_TYPE = {"postgresql": "DOUBLE PRECISION", "mysql": "DOUBLE", "sqlite": "DOUBLE"}


class Name(sa.String):
    """A name compared byte for byte (schema.Identifier as of this version)."""


@compiles(Name, "mysql")
@compiles(Name, "mariadb")
def _name_on_mysql(type_: Name, compiler: Any, **_kw: Any) -> str:
    # Version 3's collations, frozen here as there (not read from dialects.py).
    collation = (
        MARIADB_COLLATION if getattr(compiler.dialect, "is_mariadb", False) else MYSQL_COLLATION
    )
    return f"VARCHAR({type_.length}) CHARACTER SET utf8mb4 COLLATE {collation}"


# Only the column the foreign key refers to: fs_flows belongs to earlier versions.
_flows = sa.Table("fs_flows", metadata, sa.Column("id", Id, primary_key=True))

events = sa.Table(
    "fs_events",
    metadata,
    sa.Column("flow_id", Id, sa.ForeignKey("fs_flows.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("name", Name(200), primary_key=True),
    sa.Column("payload", LongText, nullable=False),
    sa.Column("idempotency_key", Name(255)),
    sa.Column("created_at", Seconds, nullable=False),
)


def apply(conn: Connection) -> None:
    wake_at_type = WAKE_AT_TYPE[conn.dialect.name]
    conn.exec_driver_sql(f"ALTER TABLE fs_nodes ADD COLUMN wake_at {wake_at_type}")
    events.create(conn, checkfirst=True)

"""Version 7: concurrency keys (fs_flows.concurrency_key, key_turn; fs_concurrency_keys)
(frozen, see v1).

A run of a flow with a concurrency key stores the key and its place under it;
one row per flow and key holds the limit and is locked to count places (see
concurrency.py). Adding nullable columns rewrites no row on PostgreSQL, MySQL 8 /
MariaDB 10.3+ (instant ADD COLUMN) or SQLite.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.ext.compiler import compiles

from flowsmith_worker.storage.sql.migrations.v3 import MARIADB_COLLATION, MYSQL_COLLATION

metadata = sa.MetaData()

# The type fs_flows' other times were created with, on each database.
SECONDS_TYPE = {"postgresql": "DOUBLE PRECISION", "mysql": "DOUBLE", "sqlite": "DOUBLE"}
# Only runs with a key are indexed where an index can be partial.
KEY_TURN_INDEX = "CREATE INDEX fs_flows_key_turn ON fs_flows (flow_name, concurrency_key, key_turn)"
KEYED_ONLY = " WHERE concurrency_key IS NOT NULL"


class Name(sa.String):
    """A name compared byte for byte (schema.Identifier as of this version)."""


@compiles(Name, "mysql")
@compiles(Name, "mariadb")
def _name_on_mysql(type_: Name, compiler: Any, **_kw: Any) -> str:
    return f"VARCHAR({type_.length}) CHARACTER SET utf8mb4 COLLATE {_collation(compiler.dialect)}"


def _collation(dialect: Any) -> str:
    # Version 3's collations, frozen here as there (not read from dialects.py).
    return MARIADB_COLLATION if getattr(dialect, "is_mariadb", False) else MYSQL_COLLATION


concurrency_keys = sa.Table(
    "fs_concurrency_keys",
    metadata,
    sa.Column("flow_name", Name(200), primary_key=True),
    sa.Column("concurrency_key", Name(255), primary_key=True),
    sa.Column("max_concurrent", sa.Integer, nullable=False),
)


def _key_type(conn: Connection) -> str:
    if conn.dialect.name == "mysql":
        return f"VARCHAR(255) CHARACTER SET utf8mb4 COLLATE {_collation(conn.dialect)}"
    return "VARCHAR(255)"


def apply(conn: Connection) -> None:
    conn.exec_driver_sql(f"ALTER TABLE fs_flows ADD COLUMN concurrency_key {_key_type(conn)}")
    seconds = SECONDS_TYPE[conn.dialect.name]
    conn.exec_driver_sql(f"ALTER TABLE fs_flows ADD COLUMN key_turn {seconds}")
    partial = conn.dialect.name in ("postgresql", "sqlite")
    conn.exec_driver_sql(KEY_TURN_INDEX + (KEYED_ONLY if partial else ""))
    concurrency_keys.create(conn, checkfirst=True)

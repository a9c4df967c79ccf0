"""Version 8: fs_rate_limits, one token bucket per rate-limited step (frozen, see v1).

A row is created by the first start of a step that has a rate_limit, and holds
the bucket's state only (see rate_limits.py): the rate itself is the code's.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.ext.compiler import compiles

from flowsmith_worker.storage.sql.migrations.v3 import MARIADB_COLLATION, MYSQL_COLLATION

metadata = sa.MetaData()

Seconds: sa.Double[float] = sa.Double()


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


rate_limits = sa.Table(
    "fs_rate_limits",
    metadata,
    sa.Column("flow_name", Name(200), primary_key=True),
    sa.Column("step_name", Name(200), primary_key=True),
    sa.Column("tat", Seconds, nullable=False),
    sa.Column("line_end", Seconds, nullable=False),
)


def apply(conn: Connection) -> None:
    rate_limits.create(conn, checkfirst=True)

"""Schema migrations: ordered, immutable steps, each applied once.

`flowsmith migrate` applies every step above the recorded version, under a
lock (dialects.migration_lock) so concurrent runs from several processes are
safe. It creates only fs_* tables and touches nothing else of the user's.
When a later version changes a table, version 1 must keep its own frozen copy
of the tables it created instead of using schema.py's current ones.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from flowsmith_worker.storage import schema
from flowsmith_worker.storage.dialects import Dialect


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    apply: Callable[[Connection], None]


def _create_flows_and_nodes(conn: Connection) -> None:
    schema.metadata.create_all(conn, tables=[schema.flows, schema.nodes], checkfirst=True)


def _create_workers_and_queues(conn: Connection) -> None:
    schema.metadata.create_all(conn, tables=[schema.workers, schema.queues], checkfirst=True)
    schema.flows_by_created.create(conn, checkfirst=True)


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "create fs_flows and fs_nodes", _create_flows_and_nodes),
    Migration(2, "create fs_workers and fs_queues; index runs by age", _create_workers_and_queues),
)
assert MIGRATIONS[-1].version == schema.SCHEMA_VERSION


def current_version(conn: Connection) -> int:
    """The version recorded in the database; 0 when nothing was ever migrated."""
    if not sa.inspect(conn).has_table(schema.schema_version.name):
        return 0
    found = conn.execute(sa.select(sa.func.max(schema.schema_version.c.version))).scalar()
    return int(found or 0)


def migrate(conn: Connection, dialect: Dialect) -> int:
    """Apply what is missing; return the version now in place."""
    with dialect.migration_lock(conn):
        schema.metadata.create_all(conn, tables=[schema.schema_version], checkfirst=True)
        version = current_version(conn)
        for step in MIGRATIONS:
            if step.version > version:
                step.apply(conn)
                conn.execute(
                    sa.insert(schema.schema_version).values(
                        version=step.version, applied_at=dialect.now()
                    )
                )
                version = step.version
    return version

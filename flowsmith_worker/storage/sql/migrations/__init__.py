"""Schema migrations: ordered, immutable steps, each applied once.

`flowsmith migrate` applies every step above the recorded version, under a
lock (dialects.migration_lock) so concurrent runs from several processes are
safe. It creates only fs_* tables and touches nothing else of the user's.
Each version is its own module holding the literal tables it created, frozen:
a fresh install replays them all, and tests/integration/test_migrations.py checks that the
result is the schema.py of today. Nothing here reads schema.py's tables: a
migration that built from them would change whenever the schema does, and a
database migrated years ago would differ from one migrated today.

New tables are SQLAlchemy Core (each module its own MetaData): one definition
gives each database its own DDL (types, AUTOINCREMENT, partial indexes), as
schema.py does, so the two compare column for column. Changes to existing
tables are SQL text: ALTER TABLE differs per database anyway, and a literal
statement cannot drift with a library's DDL compiler.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from flowsmith_worker.storage.sql import schema
from flowsmith_worker.storage.sql.dialects import Dialect
from flowsmith_worker.storage.sql.migrations import v0, v1, v2, v3, v4, v5, v6, v7


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    apply: Callable[[Connection], None]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "create fs_flows and fs_nodes", v1.apply),
    Migration(2, "create fs_workers and fs_queues; index runs by age", v2.apply),
    Migration(3, "names compare byte for byte; ids never reused", v3.apply),
    Migration(4, "drop fs_nodes.input; vacuum the queue tables often", v4.apply),
    Migration(5, "create fs_attempts, every attempt a step left behind", v5.apply),
    Migration(6, "park sleeps and waits (fs_nodes.wake_at); create fs_events", v6.apply),
    Migration(7, "store concurrency keys and their places; create fs_concurrency_keys", v7.apply),
)
assert MIGRATIONS[-1].version == schema.SCHEMA_VERSION


def current_version(conn: Connection) -> int:
    """The version recorded in the database; 0 when nothing was ever migrated."""
    if not sa.inspect(conn).has_table(v0.versions.name):
        return 0
    found = conn.execute(sa.select(sa.func.max(v0.versions.c.version))).scalar()
    return int(found or 0)


def migrate(conn: Connection, dialect: Dialect, up_to: int = schema.SCHEMA_VERSION) -> int:
    """Apply what is missing, up to version ``up_to``; return the version now in place."""
    with dialect.migration_lock(conn):
        v0.versions.create(conn, checkfirst=True)
        version = current_version(conn)
        for step in MIGRATIONS:
            if version < step.version <= up_to:
                step.apply(conn)
                conn.execute(
                    sa.insert(v0.versions).values(version=step.version, applied_at=dialect.now())
                )
                version = step.version
    return version

"""Everything that differs between SQLite, PostgreSQL and MySQL/MariaDB.

One Dialect subclass per backend (sqlite.py, postgresql.py, mysql.py, on the
shared base.py), and the engine each needs (engine.py). The SQL storage asks its
dialect how to do a thing (its capabilities: claims_in_one_statement,
batch_write, binds_arrays, ...), and what an error means, never which database
it is on: a `name` is for messages and SQLAlchemy, not for branching.
"""

from flowsmith_worker.storage.sql.dialects.base import (
    CONFLICTS,
    MISSING_SCHEMA,
    READ_ONLY_OPTION,
    UNAVAILABLE,
    BatchWrite,
    DbError,
    Dialect,
    is_stale_connection,
)
from flowsmith_worker.storage.sql.dialects.engine import create_engine, dialect_of
from flowsmith_worker.storage.sql.dialects.mysql import MYSQL_UTC_EPOCH_SQL, identifier_collation
from flowsmith_worker.storage.sql.dialects.postgresql import NOTIFY_CHANNEL
from flowsmith_worker.storage.sql.dialects.sqlite import SqliteMode

__all__ = [
    "CONFLICTS",
    "MISSING_SCHEMA",
    "MYSQL_UTC_EPOCH_SQL",
    "NOTIFY_CHANNEL",
    "READ_ONLY_OPTION",
    "UNAVAILABLE",
    "BatchWrite",
    "DbError",
    "Dialect",
    "SqliteMode",
    "create_engine",
    "dialect_of",
    "identifier_collation",
    "is_stale_connection",
]

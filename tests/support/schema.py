"""What a database's schema looks like from outside: its tables and version rows."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from flowsmith_worker.config import parse_database_url
from flowsmith_worker.storage.sql import schema

FS_TABLES = set(schema.metadata.tables)
ALL_VERSIONS = list(range(1, schema.SCHEMA_VERSION + 1))


def engine_for(url: str) -> sa.Engine:
    return sa.create_engine(parse_database_url(url), poolclass=NullPool)


def execute(url: str, *statements: sa.Executable) -> None:
    """Write to the database behind FlowSmith's back."""
    engine = engine_for(url)
    try:
        with engine.begin() as conn:
            for statement in statements:
                conn.execute(statement)
    finally:
        engine.dispose()


def table_names(url: str) -> set[str]:
    engine = engine_for(url)
    try:
        return set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()


def schema_versions(url: str) -> list[int]:
    engine = engine_for(url)
    try:
        with engine.connect() as conn:
            query = sa.text("SELECT version FROM fs_schema_version ORDER BY version")
            return list(conn.execute(query).scalars())
    finally:
        engine.dispose()

"""PostgreSQL: NOTIFY, advisory locks, ON CONFLICT, and errors by SQLSTATE."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, ClassVar

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Connection

from flowsmith_worker.storage.sql.dialects.base import BatchWrite, DbError, Dialect

# pg_advisory_xact_lock takes a bigint; any constant of ours will do.
MIGRATION_LOCK_KEY = 0x666C6F77736D  # "flowsm"
NOTIFY_CHANNEL = "flowsmith"

# https://www.postgresql.org/docs/current/errcodes-appendix.html
SQLSTATES = {
    "40P01": DbError.DEADLOCK,  # deadlock_detected
    "40001": DbError.SERIALIZATION_FAILURE,  # serialization_failure
    "55P03": DbError.LOCK_TIMEOUT,  # lock_not_available: lock_timeout, NOWAIT
    "08000": DbError.CONNECTION_LOST,  # connection_exception
    "08003": DbError.CONNECTION_LOST,  # connection_does_not_exist
    "08006": DbError.CONNECTION_LOST,  # connection_failure
    "08007": DbError.CONNECTION_LOST,  # transaction_resolution_unknown
    "57P01": DbError.CONNECTION_LOST,  # admin_shutdown: pg_terminate_backend, a fast stop
    "57P02": DbError.CONNECTION_LOST,  # crash_shutdown: another backend crashed
    "25P03": DbError.CONNECTION_LOST,  # idle_in_transaction_session_timeout
    "57P05": DbError.CONNECTION_LOST,  # idle_session_timeout
    "08001": DbError.CANNOT_CONNECT,  # sqlclient_unable_to_establish_sqlconnection
    "08004": DbError.CANNOT_CONNECT,  # sqlserver_rejected_establishment_of_sqlconnection
    "57P03": DbError.CANNOT_CONNECT,  # cannot_connect_now: starting up, shutting down
    "53300": DbError.TOO_MANY_CONNECTIONS,  # too_many_connections
    "25006": DbError.READ_ONLY,  # read_only_sql_transaction: a standby, or read-only set
    "23505": DbError.UNIQUE_VIOLATION,  # unique_violation
    "42P01": DbError.UNDEFINED_TABLE,  # undefined_table
    "42703": DbError.UNDEFINED_COLUMN,  # undefined_column
}


class PostgresDialect(Dialect):
    name = "postgresql"
    supports_notify = True
    enqueues_in_one_statement = True
    prepares_statements = True
    binds_arrays = True
    claims_in_one_statement = True
    batch_write = BatchWrite.ARRAYS
    # now() is the transaction's start: our transactions are short, and a
    # stable value (unlike clock_timestamp()) can bound an index scan.
    _now: ClassVar[sa.ColumnElement[float]] = sa.cast(
        sa.func.extract("epoch", sa.func.now()), sa.Double
    )
    _clock: ClassVar[sa.ColumnElement[float]] = sa.cast(
        sa.func.extract("epoch", sa.func.clock_timestamp()), sa.Double
    )

    def clock(self) -> sa.ColumnElement[float]:
        return self._clock

    def insert_if_absent(self, table: sa.Table) -> Any:
        return postgresql.insert(table).on_conflict_do_nothing()

    @contextlib.contextmanager
    def migration_lock(self, conn: Connection) -> Iterator[None]:
        """A transaction-scoped advisory lock: released by the migration's COMMIT."""
        conn.execute(sa.select(sa.func.pg_advisory_xact_lock(MIGRATION_LOCK_KEY)))
        yield

    def notify(self, conn: Connection, payload: str) -> None:
        conn.execute(sa.select(sa.func.pg_notify(NOTIFY_CHANNEL, payload)))

    def starts_with(self, column: sa.ColumnElement[str], prefix: str) -> sa.ColumnElement[bool]:
        """LIKE 'prefix%', escaped. PostgreSQL's default collation may be a language's,
        whose order puts some of those names outside the code point range: LIKE is
        exact under any collation, and the planner turns it into that range under "C".
        """
        return column.startswith(prefix, autoescape=True)

    def classify_driver_error(self, error: BaseException) -> DbError | None:
        # psycopg2 calls the SQLSTATE pgcode, psycopg (3) sqlstate (Django's connections).
        code = getattr(error, "pgcode", None) or getattr(error, "sqlstate", None)
        return SQLSTATES.get(code) if isinstance(code, str) else None


POSTGRESQL = PostgresDialect()

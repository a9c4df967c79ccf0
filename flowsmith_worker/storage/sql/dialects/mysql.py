"""MySQL and MariaDB: their clock, collations, named locks, mysql-connector's
round trips, and errors by error number."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, ClassVar

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import Connection, Engine

from flowsmith_worker.storage.sql.dialects.base import BatchWrite, DbError, Dialect

MIGRATION_LOCK_NAME = "flowsmith_migrate"
# MySQL's clock as UTC epoch seconds. UNIX_TIMESTAMP(NOW(6)) would pass through
# the session's time zone and back, which in a DST zone's repeated autumn hour
# gives the first of the two instants: an hour behind. UTC_TIMESTAMP(6) is UTC
# whatever the server's or the caller's session zone, and the difference of two
# DATETIMEs is plain arithmetic. (The text for hand-written SQL; the expression for the rest.)
MYSQL_UTC_EPOCH_SQL = "(TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', UTC_TIMESTAMP(6)) / 1e6)"
MYSQL_UTC_EPOCH: sa.ColumnElement[float] = sa.literal_column(MYSQL_UTC_EPOCH_SQL, sa.Double())
# Names must compare byte for byte (schema.Identifier), and trailing spaces
# count: MySQL's and MariaDB's utf8mb4_bin pad with spaces, so `k` = `k `. Each
# has its own NO PAD binary collation (MySQL 8.0.17+, MariaDB 10.2+).
MARIADB_IDENTIFIER_COLLATION = "utf8mb4_nopad_bin"
MYSQL_IDENTIFIER_COLLATION = "utf8mb4_0900_bin"
# MySQL's and MariaDB's ER_DUP_ENTRY: a unique key already holds the value.
MYSQL_DUPLICATE_KEY = 1062

# The server's numbers (https://dev.mysql.com/doc/mysql-errors/8.0/en/server-error-reference.html,
# https://mariadb.com/kb/en/mariadb-error-code-reference/) and the client's (2000 up).
ERROR_NUMBERS = {
    1213: DbError.DEADLOCK,  # ER_LOCK_DEADLOCK
    1205: DbError.LOCK_TIMEOUT,  # ER_LOCK_WAIT_TIMEOUT
    3572: DbError.LOCK_TIMEOUT,  # ER_LOCK_NOWAIT (MySQL 8)
    # ER_CHECKREAD, "Record has changed since last read": MariaDB's REPEATABLE READ
    # with innodb_snapshot_isolation, where PostgreSQL would say 40001.
    1020: DbError.SERIALIZATION_FAILURE,
    2006: DbError.CONNECTION_LOST,  # CR_SERVER_GONE_ERROR
    2013: DbError.CONNECTION_LOST,  # CR_SERVER_LOST
    2055: DbError.CONNECTION_LOST,  # CR_SERVER_LOST_EXTENDED
    1053: DbError.CONNECTION_LOST,  # ER_SERVER_SHUTDOWN
    1927: DbError.CONNECTION_LOST,  # ER_CONNECTION_KILLED (MariaDB: KILL)
    4031: DbError.CONNECTION_LOST,  # ER_CLIENT_INTERACTION_TIMEOUT (MySQL 8: wait_timeout)
    2002: DbError.CANNOT_CONNECT,  # CR_CONNECTION_ERROR (socket)
    2003: DbError.CANNOT_CONNECT,  # CR_CONN_HOST_ERROR (TCP)
    1040: DbError.TOO_MANY_CONNECTIONS,  # ER_CON_COUNT_ERROR: max_connections
    1203: DbError.TOO_MANY_CONNECTIONS,  # ER_TOO_MANY_USER_CONNECTIONS: max_user_connections
    # ER_USER_LIMIT_REACHED: an account's own MAX_USER_CONNECTIONS (or an hourly limit).
    1226: DbError.TOO_MANY_CONNECTIONS,
    1290: DbError.READ_ONLY,  # ER_OPTION_PREVENTS_STATEMENT: --read-only
    1792: DbError.READ_ONLY,  # ER_CANT_EXECUTE_IN_READ_ONLY_TRANSACTION
    1836: DbError.READ_ONLY,  # ER_READ_ONLY_MODE
    MYSQL_DUPLICATE_KEY: DbError.UNIQUE_VIOLATION,
    1586: DbError.UNIQUE_VIOLATION,  # ER_DUP_ENTRY_WITH_KEY_NAME
    1146: DbError.UNDEFINED_TABLE,  # ER_NO_SUCH_TABLE
    1054: DbError.UNDEFINED_COLUMN,  # ER_BAD_FIELD_ERROR
}


class MysqlDialect(Dialect):
    name = "mysql"
    batch_write = BatchWrite.JSON_TABLE
    _now: ClassVar[sa.ColumnElement[float]] = MYSQL_UTC_EPOCH

    def insert_if_absent(self, table: sa.Table) -> Any:
        """Not MySQL's INSERT IGNORE: that also turns a too-long or invalid value
        into a warning and stores it truncated. Assigning the primary key to
        itself on a duplicate ignores the duplicate and nothing else.
        """
        key = table.primary_key.columns[0]
        return mysql.insert(table).on_duplicate_key_update({key.name: key})

    def inserted_a_row(self, result: sa.CursorResult[Any]) -> bool:
        """mysql-connector reports rowcount -1 for INSERT, and with SQLAlchemy's
        CLIENT_FOUND_ROWS a duplicate would count 1 like an insert anyway; the
        lastrowid is 0 when the duplicate key left the row alone, so that tells.
        """
        return bool(result.lastrowid)

    def returns_inserted_rows(self, conn: Connection) -> bool:
        """No: MySQL has no INSERT ... RETURNING (MariaDB has, but not for the rows an
        ON DUPLICATE KEY UPDATE left alone)."""
        return False

    def for_latest(self, select: sa.Select[Any]) -> sa.Select[Any]:
        """MySQL needs a locking read to see the latest committed row; a share lock is
        weaker than the exclusive one insert_if_absent's duplicate check (ON
        DUPLICATE KEY UPDATE) already holds, so it waits on nothing new."""
        return select.with_for_update(read=True)

    @contextlib.contextmanager
    def migration_lock(self, conn: Connection) -> Iterator[None]:
        """A named session lock: MySQL commits DDL implicitly, so a transaction cannot
        hold the lock."""
        got = conn.execute(sa.select(sa.func.get_lock(MIGRATION_LOCK_NAME, 120))).scalar()
        if got != 1:
            raise TimeoutError("another `flowsmith migrate` held the lock for 120 s")
        try:
            yield
            # Commit before letting go: the version row written after the last DDL is
            # not committed by it, and the next `flowsmith migrate` to take the lock
            # would read the version before, apply that migration again and fail on
            # the duplicate version row (tests/torture/test_races.py).
            conn.execute(sa.text("COMMIT"))
        finally:
            conn.execute(sa.select(sa.func.release_lock(MIGRATION_LOCK_NAME)))

    def classify_driver_error(self, error: BaseException) -> DbError | None:
        # mysql-connector names the number errno; PyMySQL and mysqlclient pass it first.
        code = getattr(error, "errno", None)
        if code is None and error.args:
            code = error.args[0]
        return ERROR_NUMBERS.get(code) if isinstance(code, int) else None


MYSQL = MysqlDialect()


def identifier_collation(dialect: sa.Dialect) -> str:
    """The byte-for-byte, trailing-space-significant collation of this MySQL server."""
    if getattr(dialect, "is_mariadb", False):
        return MARIADB_IDENTIFIER_COLLATION
    return MYSQL_IDENTIFIER_COLLATION


def tune_mysql_connector(engine: Engine) -> None:
    """mysql-connector without the round trips it would add to every statement and transaction."""
    _no_ping_per_statement(engine)
    _rollback_only_if_open(engine)


def _no_ping_per_statement(engine: Engine) -> None:
    """Stop mysql-connector pinging the server before every statement.

    Its cursor() asks is_connected(), which sends a COM_PING and waits for the
    answer, and SQLAlchemy opens a cursor per statement: a round trip more for
    each one, as pool_pre_ping would cost per transaction (see
    engine._ping_after_idle for why we do without). Without the ping, a
    connection the server dropped fails at its next statement with "Lost
    connection" (2013/2055), which SQLAlchemy reads as a disconnect and our
    callers retry, as on the other drivers. Only cursor() and the driver's own
    pool and reconnect() ask is_connected(); SQLAlchemy uses neither and pings
    with ping().
    """

    @event.listens_for(engine, "connect")
    def _connected(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.is_connected = _in_use


def _in_use() -> bool:
    """is_connected() for a connection the pool hands out: open, until a statement fails."""
    return True


def _rollback_only_if_open(engine: Engine) -> None:
    """Roll a connection back on its return to the pool only if a transaction is open.

    The pool's default reset sends a ROLLBACK on every return, and
    mysql-connector sends it even when the transaction has just committed: a
    round trip more per transaction (psycopg2 skips it when idle). The driver
    knows from the server's status flags, without asking, whether one is open.
    """

    @event.listens_for(engine, "reset")
    def _reset(dbapi_conn: Any, _record: Any, state: sa.PoolResetState) -> None:
        if not state.terminate_only and dbapi_conn.in_transaction:
            dbapi_conn.rollback()

"""What the SQL storage asks of a database, answered once per backend.

The SQL storage asks its Dialect how to do a thing (what "now" is, how to insert
only if absent, how to lock rows for a claim, how to serialise migrations,
whether NOTIFY exists, what a driver's error means) and never which database
it is on. Each backend is one subclass in a module of its own (sqlite.py,
postgresql.py, mysql.py); this base holds what most of them share.

Errors are told apart by the code the database or the driver attaches to them
(SQLSTATE, MySQL error number, SQLite result code), never by their text: a
server may be set to report errors in any language.
"""

from __future__ import annotations

import contextlib
import enum
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any, ClassVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection

# The execution option that marks a transaction of reads only.
READ_ONLY_OPTION = "flowsmith_read_only"
# The largest code point, and the UTF-16 surrogates, which no UTF-8 text holds.
_MAX_CODE_POINT = 0x10FFFF
_SURROGATES = range(0xD800, 0xE000)


class DbError(enum.Enum):
    """What a database error means to FlowSmith, read from its code."""

    DEADLOCK = "deadlock"
    SERIALIZATION_FAILURE = "serialization failure"
    LOCK_TIMEOUT = "lock wait timeout"
    # SQLite: another process held the file's one write lock past the busy timeout.
    BUSY = "database is locked"
    CONNECTION_LOST = "connection lost"
    CANNOT_CONNECT = "cannot connect"
    TOO_MANY_CONNECTIONS = "too many connections"
    READ_ONLY = "read-only"
    UNIQUE_VIOLATION = "unique violation"
    # A table or column FlowSmith's statements name is not there: a migration not run.
    UNDEFINED_TABLE = "undefined table"
    UNDEFINED_COLUMN = "undefined column"


# Another transaction got in the way: running ours again is the documented remedy.
CONFLICTS = frozenset({DbError.DEADLOCK, DbError.SERIALIZATION_FAILURE, DbError.LOCK_TIMEOUT})
# The database cannot serve us now, and may later (a restart, a failover, a full server).
UNAVAILABLE = frozenset(
    {
        DbError.BUSY,
        DbError.CONNECTION_LOST,
        DbError.CANNOT_CONNECT,
        DbError.TOO_MANY_CONNECTIONS,
        DbError.READ_ONLY,
    }
)
MISSING_SCHEMA = frozenset({DbError.UNDEFINED_TABLE, DbError.UNDEFINED_COLUMN})


class BatchWrite(enum.Enum):
    """How a batch of finished steps is written in a few statements (sql/finish.py):
    the batch's items reach the database as one parameter, unpacked by the
    database's own idiom."""

    # PostgreSQL: arrays, unnest()ed by one data-modifying CTE that also locks
    # each item's run and checks it is as the item's move assumes.
    ARRAYS = "arrays"
    # MySQL/MariaDB: JSON_TABLE over a JSON array, a statement per kind of write.
    JSON_TABLE = "JSON_TABLE"
    # SQLite: json_each over a JSON array, a statement per kind of write.
    JSON_EACH = "json_each"


class Dialect(ABC):
    """One database backend: its SQL idioms, and what its drivers' errors mean.

    Instances hold no state; dialect_of() hands out one per backend.
    """

    name: ClassVar[str]  # "sqlite", "postgresql" or "mysql" (MariaDB included)
    supports_notify: ClassVar[bool] = False
    # SQLite has none: every writing transaction is BEGIN IMMEDIATE, which takes
    # the database's one write lock up front instead.
    has_row_locks: ClassVar[bool] = True
    # Whether new runs, their first nodes and the NOTIFY fit in one statement
    # (a data-modifying CTE, see sql/enqueue.py); the others insert runs, then nodes.
    enqueues_in_one_statement: ClassVar[bool] = False
    # Whether the hot statements can be PREPAREd (see sql/prepared.py).
    prepares_statements: ClassVar[bool] = False
    # Whether a list binds as one array parameter (`id = ANY(:ids)`): one
    # statement text, and one prepared plan, whatever the list's length.
    binds_arrays: ClassVar[bool] = False
    # Whether a claim picks, leases and starts runs in one statement (a
    # data-modifying CTE, see sql/claim.py); the others take several.
    claims_in_one_statement: ClassVar[bool] = False
    # Whether a claim first reads, without a write lock, whether anything is due:
    # where a writing transaction takes the whole database's one write lock
    # (SQLite), an empty poll then takes none and waits on no other writer.
    claim_reads_first: ClassVar[bool] = False
    # How a batch of finished steps reaches the database (each backend sets its own).
    batch_write: ClassVar[BatchWrite]
    # The database clock, in seconds since the epoch (UTC, whatever the time
    # zones). Built once at import: building it afresh took 14 % of a step's
    # CPU, and an expression is immutable, so statements share it.
    _now: ClassVar[sa.ColumnElement[float]]

    def __repr__(self) -> str:
        return f"<{type(self).__name__}>"

    def now(self) -> sa.ColumnElement[float]:
        """The database clock, in seconds since the epoch (UTC, whatever the time zones)."""
        return self._now

    def clock(self) -> sa.ColumnElement[float]:
        """The database clock when the statement starts, not when its transaction did
        (PostgreSQL's now()): for a decision made after waiting for a lock."""
        return self._now

    def greatest(self, *values: Any) -> sa.ColumnElement[float]:
        """The largest of the values."""
        return sa.func.greatest(*values, type_=sa.Double())

    @abstractmethod
    def insert_if_absent(self, table: sa.Table) -> Any:
        """An INSERT that does nothing when a unique key already exists."""

    def inserted_a_row(self, result: sa.CursorResult[Any]) -> bool:
        """Whether a single-row insert_if_absent() inserted (into a table with an auto-id)."""
        return result.rowcount == 1

    def returns_inserted_rows(self, conn: Connection) -> bool:
        """Whether insert_if_absent(...).returning(...) returns exactly the rows it inserted.

        ON CONFLICT DO NOTHING RETURNING does, on PostgreSQL and on SQLite 3.35+
        (SQLAlchemy knows the version).
        """
        return bool(conn.dialect.insert_returning)

    @contextlib.contextmanager
    def autocommit(self, conn: Connection) -> Iterator[Connection]:
        """``conn`` with each statement its own transaction: no BEGIN, no COMMIT sent.

        The driver's own switch, not SQLAlchemy's isolation_level="AUTOCOMMIT":
        with psycopg2 that one sends SET default_transaction_isolation when it
        is set and again when the pool resets the connection (two extra round
        trips per use), while psycopg2's ``autocommit`` attribute is only read
        when the next transaction would begin. Set back before the connection
        returns to the pool, so its next user gets transactions as usual.
        """
        raw = conn.connection.dbapi_connection
        raw.autocommit = True  # type: ignore[union-attr]
        try:
            yield conn
        finally:
            if not raw.closed:  # type: ignore[union-attr]  # gone with the server: discarded
                raw.autocommit = False  # type: ignore[union-attr]

    def for_claim(self, select: sa.Select[Any]) -> sa.Select[Any]:
        """Lock the selected rows, skipping rows another worker holds.

        SQLAlchemy compiles FOR UPDATE SKIP LOCKED to nothing on SQLite; that is
        right there, because BEGIN IMMEDIATE already made this transaction the
        only writer.
        """
        return select.with_for_update(skip_locked=True)

    def for_latest(self, select: sa.Select[Any]) -> sa.Select[Any]:
        """A read that sees the latest committed row, even in a REPEATABLE READ snapshot.

        As it is, but on MySQL. A share lock on PostgreSQL would make racing
        resumes each need to upgrade it, and deadlock; there the caller's
        REPEATABLE READ gets a serialization failure instead, reported as such.
        """
        return select

    def for_update(self, select: sa.Select[Any]) -> sa.Select[Any]:
        """Lock the selected rows until commit (nothing to add on SQLite)."""
        return select.with_for_update()

    @contextlib.contextmanager
    def migration_lock(self, conn: Connection) -> Iterator[None]:
        """Serialise concurrent `flowsmith migrate` runs across processes.

        Nothing to take on SQLite: BEGIN IMMEDIATE already serialises writers.
        """
        yield

    def notify(self, conn: Connection, payload: str) -> None:
        """Wake listening workers when this transaction commits (where NOTIFY exists)."""
        return  # no NOTIFY here: workers poll

    def starts_with(self, column: sa.ColumnElement[str], prefix: str) -> sa.ColumnElement[bool]:
        """Names in ``column`` that start with ``prefix``, byte for byte, through its index.

        SQLite's and MySQL's name columns order strings as their code points
        (BINARY, utf8mb4 *_bin, see schema.Identifier), so those names are exactly
        the range from the prefix up to its successor, an index range scan.
        (SQLite's LIKE would ignore case.)
        """
        upper = successor(prefix)
        if upper is None:  # only U+10FFFF characters: no name sorts above
            return column >= prefix
        return sa.and_(column >= prefix, column < upper)

    # -- errors ---------------------------------------------------------------

    def classify(self, error: BaseException) -> DbError | None:
        """What ``error`` (SQLAlchemy's, or the driver's own) means; None if nothing we know."""
        return self.classify_driver_error(getattr(error, "orig", None) or error)

    @abstractmethod
    def classify_driver_error(self, error: BaseException) -> DbError | None:
        """What the driver's exception means, by its code."""

    def is_conflict(self, error: BaseException) -> bool:
        """A deadlock, lock timeout or serialization failure: run the transaction again."""
        if not isinstance(error, sa.exc.DBAPIError) or error.connection_invalidated:
            return False
        return self.classify(error) in CONFLICTS

    def is_worth_running_again(self, error: BaseException) -> bool:
        """A conflict, or a connection found dead: our transaction may simply run again."""
        return self.is_conflict(error) or is_stale_connection(error)

    def is_transient(self, error: BaseException) -> bool:
        """Errors worth retrying later: the connection went away, or a conflict.

        An error without a code we know is transient when the driver calls it
        operational: its own client-side failures (a socket closed) carry no code.
        """
        if isinstance(error, sa.exc.DBAPIError) and error.connection_invalidated:
            return True
        kind = self.classify(error)
        if kind is not None:
            return kind in CONFLICTS or kind in UNAVAILABLE
        return isinstance(error, (sa.exc.OperationalError, sa.exc.InterfaceError))


def is_stale_connection(error: BaseException) -> bool:
    """A statement failed on a pooled connection the server had dropped (a restart).

    Connections are not pinged before every transaction (see
    engine._ping_after_idle), so the first one used after a restart fails (in a
    statement, or in the rollback after it: mysql-connector reports its first
    failure in words SQLAlchemy does not take for a disconnect). SQLAlchemy
    then invalidates the pool's older connections: running the transaction
    again takes a new one.
    """
    return isinstance(error, sa.exc.DBAPIError) and error.connection_invalidated


def successor(prefix: str) -> str | None:
    """The least string above every string that starts with ``prefix``, in code point
    order; None if there is none."""
    while prefix and ord(prefix[-1]) == _MAX_CODE_POINT:
        prefix = prefix[:-1]
    if not prefix:
        return None
    following = ord(prefix[-1]) + 1
    if following in _SURROGATES:
        following = _SURROGATES.stop
    return prefix[:-1] + chr(following)

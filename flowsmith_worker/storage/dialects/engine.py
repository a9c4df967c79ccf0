"""Everything that differs between SQLite, PostgreSQL and MySQL/MariaDB.

The SQL storage asks this module how to do a thing (what "now" is, how to insert
only if absent, how to lock rows for a claim, how to serialise migrations,
whether NOTIFY exists) and never which database it is on.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import quote

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from flowsmith_worker.config import URL_ENV_VARS, PoolSettings, redact_url
from flowsmith_worker.errors import DatabaseNotFound, InvalidDatabaseURL

MIGRATION_LOCK_NAME = "flowsmith_migrate"
# pg_advisory_xact_lock takes a bigint; any constant of ours will do.
MIGRATION_LOCK_KEY = 0x666C6F77736D  # "flowsm"
NOTIFY_CHANNEL = "flowsmith"
SQLITE_BUSY_TIMEOUT_SECONDS = 30.0
# Between tries at switching a file to WAL while another connection switches it.
SQLITE_WAL_SWITCH_RETRY_SECONDS = 0.01
SQLITE_BUSY = 5  # sqlite3.SQLITE_BUSY, without importing sqlite3 for every database
# A pooled connection idle for longer than this is tested before use.
PING_AFTER_IDLE_SECONDS = 10.0
_IDLE_SINCE = "flowsmith_idle_since"
# The execution option that marks a transaction of reads only.
READ_ONLY_OPTION = "flowsmith_read_only"
# MySQL's clock as UTC epoch seconds. UNIX_TIMESTAMP(NOW(6)) would pass through
# the session's time zone and back, which in a DST zone's repeated autumn hour
# gives the first of the two instants: an hour behind. UTC_TIMESTAMP(6) is UTC
# whatever the server's or the caller's session zone, and the difference of two
# DATETIMEs is plain arithmetic. (The text for hand-written SQL; the expression for the rest.)
MYSQL_UTC_EPOCH_SQL = "(TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', UTC_TIMESTAMP(6)) / 1e6)"
MYSQL_UTC_EPOCH: sa.ColumnElement[float] = sa.literal_column(MYSQL_UTC_EPOCH_SQL, sa.Double())
_NOW: dict[str, sa.ColumnElement[float]] = {
    # now() is the transaction's start: our transactions are short, and a
    # stable value (unlike clock_timestamp()) can bound an index scan.
    "postgresql": sa.cast(sa.func.extract("epoch", sa.func.now()), sa.Double),
    "mysql": MYSQL_UTC_EPOCH,
    "sqlite": (sa.func.julianday("now") - 2440587.5) * 86400.0,
}
# Names must compare byte for byte (schema.Identifier), and trailing spaces
# count: MySQL's and MariaDB's utf8mb4_bin pad with spaces, so `k` = `k `. Each
# has its own NO PAD binary collation (MySQL 8.0.17+, MariaDB 10.2+).
MARIADB_IDENTIFIER_COLLATION = "utf8mb4_nopad_bin"
MYSQL_IDENTIFIER_COLLATION = "utf8mb4_0900_bin"
# New SQLite files are readable by their owner only: they hold every input and output.
SQLITE_FILE_MODE = 0o600
# How a SQLite file is opened, as the mode= of its URI (https://sqlite.org/uri.html):
# read-write and created if missing, read-write if it exists, or read-only.
SqliteMode = Literal["rwc", "rw", "ro"]


@dataclass(frozen=True)
class Dialect:
    name: str  # "sqlite", "postgresql" or "mysql" (MariaDB included)

    @property
    def supports_notify(self) -> bool:
        return self.name == "postgresql"

    @property
    def has_row_locks(self) -> bool:
        # SQLite has none: every transaction is BEGIN IMMEDIATE (see _sqlite_setup),
        # which takes the database's one write lock up front instead.
        return self.name != "sqlite"

    def now(self) -> sa.ColumnElement[float]:
        """The database clock, in seconds since the epoch (UTC, whatever the time zones).

        One expression per dialect, built at import: building it afresh took 14 %
        of a step's CPU, and an expression is immutable, so statements share it.
        """
        return _NOW[self.name]

    def greatest(self, *values: Any) -> sa.ColumnElement[float]:
        """The largest of the values (SQLite's scalar max() is everyone else's GREATEST)."""
        if self.name == "sqlite":
            return sa.func.max(*values, type_=sa.Double())
        return sa.func.greatest(*values, type_=sa.Double())

    def insert_if_absent(self, table: sa.Table) -> Any:
        """An INSERT that does nothing when a unique key already exists.

        Not MySQL's INSERT IGNORE: that also turns a too-long or invalid value
        into a warning and stores it truncated. Assigning the primary key to
        itself on a duplicate ignores the duplicate and nothing else.
        """
        if self.name == "postgresql":
            return postgresql.insert(table).on_conflict_do_nothing()
        if self.name == "sqlite":
            return sqlite.insert(table).on_conflict_do_nothing()
        key = table.primary_key.columns[0]
        return mysql.insert(table).on_duplicate_key_update({key.name: key})

    def inserted_a_row(self, result: sa.CursorResult[Any]) -> bool:
        """Whether a single-row insert_if_absent() inserted (into a table with an auto-id).

        mysql-connector reports rowcount -1 for INSERT, and with SQLAlchemy's
        CLIENT_FOUND_ROWS a duplicate would count 1 like an insert anyway; the
        lastrowid is 0 when the duplicate key left the row alone, so that tells.
        """
        if self.name == "mysql":
            return bool(result.lastrowid)
        return result.rowcount == 1

    @property
    def enqueues_in_one_statement(self) -> bool:
        """Whether new runs, their first nodes and the NOTIFY fit in one statement.

        PostgreSQL only: a data-modifying CTE does it in one round trip (see
        sql_enqueue); the others insert runs, then nodes.
        """
        return self.name == "postgresql"

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

    def returns_inserted_rows(self, conn: Connection) -> bool:
        """Whether insert_if_absent(...).returning(...) returns exactly the rows it inserted.

        ON CONFLICT DO NOTHING RETURNING does, on PostgreSQL and on SQLite 3.35+
        (SQLAlchemy knows the version). MySQL has no INSERT ... RETURNING (MariaDB
        has, but not for the rows an ON DUPLICATE KEY UPDATE left alone).
        """
        return self.name in ("postgresql", "sqlite") and conn.dialect.insert_returning

    def for_claim(self, select: sa.Select[Any]) -> sa.Select[Any]:
        """Lock the selected rows, skipping rows another worker holds.

        SQLAlchemy compiles FOR UPDATE SKIP LOCKED to nothing on SQLite; that is
        right there, because BEGIN IMMEDIATE already made this transaction the
        only writer.
        """
        return select.with_for_update(skip_locked=True)

    def for_latest(self, select: sa.Select[Any]) -> sa.Select[Any]:
        """A read that sees the latest committed row, even in a REPEATABLE READ snapshot.

        MySQL needs a locking read for that; a share lock is weaker than the
        exclusive one insert_if_absent's duplicate check (ON DUPLICATE KEY
        UPDATE) already holds, so it waits on nothing new. PostgreSQL must not
        take it: racing resumes would each need to upgrade it and deadlock;
        there the caller's REPEATABLE READ gets a serialization failure instead,
        reported as such.
        """
        return select.with_for_update(read=True) if self.name == "mysql" else select

    def for_update(self, select: sa.Select[Any]) -> sa.Select[Any]:
        """Lock the selected rows until commit (nothing to add on SQLite)."""
        return select.with_for_update()

    @contextlib.contextmanager
    def migration_lock(self, conn: Connection) -> Iterator[None]:
        """Serialise concurrent `flowsmith migrate` runs across processes."""
        if self.name == "postgresql":
            conn.execute(sa.select(sa.func.pg_advisory_xact_lock(MIGRATION_LOCK_KEY)))
            yield
        elif self.name == "mysql":
            # MySQL commits DDL implicitly, so a transaction cannot hold the lock: a
            # named session lock can.
            got = conn.execute(sa.select(sa.func.get_lock(MIGRATION_LOCK_NAME, 120))).scalar()
            if got != 1:
                raise TimeoutError("another `flowsmith migrate` held the lock for 120 s")
            try:
                yield
            finally:
                conn.execute(sa.select(sa.func.release_lock(MIGRATION_LOCK_NAME)))
        else:
            yield  # BEGIN IMMEDIATE already serialises writers.

    def notify(self, conn: Connection, payload: str) -> None:
        """Wake listening workers when this transaction commits (PostgreSQL only)."""
        if self.supports_notify:
            conn.execute(sa.select(sa.func.pg_notify(NOTIFY_CHANNEL, payload)))


def identifier_collation(dialect: sa.Dialect) -> str:
    """The byte-for-byte, trailing-space-significant collation of this MySQL server."""
    if getattr(dialect, "is_mariadb", False):
        return MARIADB_IDENTIFIER_COLLATION
    return MYSQL_IDENTIFIER_COLLATION


def dialect_of(engine_or_conn: Engine | Connection) -> Dialect:
    name = engine_or_conn.dialect.name
    return Dialect("mysql" if name in ("mysql", "mariadb") else name)


def create_engine(url: sa.URL, pool: PoolSettings, sqlite_mode: SqliteMode = "rwc") -> Engine:
    """An engine with the settings each database needs to run a worker pool.

    ``sqlite_mode`` says whether a SQLite file may be created, or only written, or
    only read; other databases ignore it.
    """
    if url.get_backend_name() == "sqlite":
        return _sqlite_engine(_sqlite_opened_as(url, sqlite_mode), sqlite_mode)
    kwargs: dict[str, Any] = {
        "pool_size": pool.pool_min,
        "max_overflow": max(0, pool.pool_max - pool.pool_min),
        "pool_timeout": pool.pool_timeout,
        "pool_recycle": 3600,
        # The most recently used connection first: a worker keeps reusing one warm
        # connection, so its idle ones age out and only they are pinged (see below).
        "pool_use_lifo": True,
    }
    if url.get_backend_name() in ("mysql", "mariadb"):
        # REPEATABLE READ (MySQL's default) takes gap locks that make concurrent
        # claims and inserts deadlock; READ COMMITTED sees each statement afresh.
        kwargs["isolation_level"] = "READ COMMITTED"
    mysqlconnector = url.get_driver_name() == "mysqlconnector"
    if mysqlconnector:
        kwargs["pool_reset_on_return"] = None  # see _rollback_only_if_open
    engine = sa.create_engine(url, **kwargs)
    _refuse_bad_arguments_cleanly(engine)
    _ping_after_idle(engine)
    if mysqlconnector:
        _no_ping_per_statement(engine)
        _rollback_only_if_open(engine)
    return engine


def _ping_after_idle(engine: Engine) -> None:
    """Test a pooled connection before use only if it sat idle for a while.

    pool_pre_ping would cost a round trip (SELECT 1, COM_PING) on every
    transaction of a busy worker. A connection in steady use needs none: if the
    server went away, its next statement fails, SQLAlchemy marks the pool's
    older connections invalid, and our callers retry (DatabaseUnavailable). A
    connection that sat idle is the one a restart most likely broke while
    nobody was looking, so an application calling flow.run() once in a while
    does not get the error: that one is pinged, and replaced if dead.
    """

    @event.listens_for(engine, "checkin")
    def _checked_in(_dbapi_conn: Any, record: Any) -> None:
        if record is not None:
            record.info[_IDLE_SINCE] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checked_out(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        idle_since = record.info.get(_IDLE_SINCE)
        if idle_since is None or time.monotonic() - idle_since < PING_AFTER_IDLE_SECONDS:
            return
        try:
            engine.dialect.do_ping(dbapi_conn)
        except engine.dialect.loaded_dbapi.Error as exc:
            # The pool discards this connection and checks out another (or a new one).
            raise sa.exc.DisconnectionError(str(exc)) from exc


def _no_ping_per_statement(engine: Engine) -> None:
    """Stop mysql-connector pinging the server before every statement.

    Its cursor() asks is_connected(), which sends a COM_PING and waits for the
    answer, and SQLAlchemy opens a cursor per statement: a round trip more for
    each one, as pool_pre_ping would cost per transaction (see _ping_after_idle
    for why we do without). Without the ping, a connection the server dropped
    fails at its next statement with "Lost connection" (2013/2055), which
    SQLAlchemy reads as a disconnect and our callers retry, as on the other
    drivers. Only cursor() and the driver's own pool and reconnect() ask
    is_connected(); SQLAlchemy uses neither and pings with ping().
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


def _refuse_bad_arguments_cleanly(engine: Engine) -> None:
    """A driver that rejects an argument of the URL says so in our words.

    mysql-connector raises AttributeError for an unknown ?option=, which
    SQLAlchemy passes through untranslated.
    """
    shown = redact_url(engine.url.render_as_string(hide_password=False))

    @event.listens_for(engine, "do_connect")
    def _connect(dialect: Any, _record: Any, cargs: Any, cparams: Any) -> Any:
        try:
            return dialect.loaded_dbapi.connect(*cargs, **cparams)
        except dialect.loaded_dbapi.Error:
            raise  # SQLAlchemy and SqlStorage translate these
        except (AttributeError, TypeError, ValueError) as exc:
            raise InvalidDatabaseURL(f"the driver refused the URL {shown}: {exc}") from None


def _sqlite_opened_as(url: sa.URL, mode: SqliteMode) -> sa.URL:
    """The URL of the same file, as a URI that SQLite opens in ``mode``.

    A file that must exist and does not is refused here, with what to do, rather
    than by SQLite's "unable to open database file".
    """
    path = url.database
    if mode == "rwc" or not path or path == ":memory:" or url.query.get("uri"):
        return url
    absolute = os.path.abspath(path)
    if not os.path.isfile(absolute):
        raise DatabaseNotFound(
            f"there is no SQLite database at {absolute}: point FlowSmith at your database "
            f"with --url or {URL_ENV_VARS[0]} (postgresql://user@host/db, "
            "sqlite:///path.db), or create this one with `flowsmith migrate`"
        )
    return url.set(
        database=f"file:{quote(absolute)}", query={**url.query, "mode": mode, "uri": "true"}
    )


def _sqlite_engine(url: sa.URL, mode: SqliteMode = "rwc") -> Engine:
    engine = sa.create_engine(
        url,
        connect_args={"timeout": SQLITE_BUSY_TIMEOUT_SECONDS, "check_same_thread": False},
        # A read-only connection cannot take the write lock: every BEGIN is a reader's.
        execution_options={READ_ONLY_OPTION: True} if mode == "ro" else {},
    )
    _sqlite_setup(engine, switch_to_wal=mode != "ro")
    _sqlite_private_files(engine)
    return engine


def _sqlite_private_files(engine: Engine) -> None:
    """Create a new database file 0600 before SQLite does (it would use 0644).

    SQLite gives the -wal and -shm files the database file's mode, so this one
    file is enough. A file that exists keeps the mode its owner gave it.
    """

    @event.listens_for(engine, "do_connect")
    def _connect(_dialect: Any, _record: Any, cargs: Any, cparams: Any) -> None:
        path = str(cargs[0]) if cargs else ""
        if path not in ("", ":memory:") and not cparams.get("uri"):
            _create_private_file(path)


def _create_private_file(path: str) -> None:
    # There already, or no such directory: SQLite opens it or says what is wrong.
    with contextlib.suppress(FileExistsError, FileNotFoundError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, SQLITE_FILE_MODE))


def _sqlite_setup(engine: Engine, switch_to_wal: bool = True) -> None:
    """WAL, a busy timeout, and BEGIN IMMEDIATE for every transaction.

    pysqlite's own BEGIN is deferred, so two processes could both read then
    both try to write and one would fail; taking the write lock at BEGIN makes
    the claim's select-then-update atomic across local worker processes.
    A read-only connection cannot switch the file to WAL: it reads the file in
    whatever journal mode it is (every file we create is WAL already).
    """

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
        cursor = dbapi_conn.cursor()
        if switch_to_wal:
            _switch_to_wal(cursor)
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT_SECONDS * 1000)}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # Readers (status, wait(), stats) need no write lock: in WAL mode a plain
        # BEGIN reads a snapshot without blocking the workers' writes.
        read_only = conn.get_execution_options().get(READ_ONLY_OPTION, False)
        conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")


def _switch_to_wal(cursor: Any) -> None:
    """PRAGMA journal_mode=WAL, tried again while another connection is switching the file.

    Switching reads the file's header, then writes it. A connection that finds
    another one holding the write lock between the two gets SQLITE_BUSY at once:
    SQLite does not call the busy handler (busy_timeout) for a reader that wants
    to become a writer, as the writer may be waiting for that reader's lock
    (https://sqlite.org/c3ref/busy_handler.html). So concurrent first connections
    to a new file (`flowsmith migrate` run by several processes at once) failed
    with "database is locked". The failed statement gave its read lock up, which
    lets the other finish; the next try finds the file WAL and writes nothing.
    """
    import sqlite3  # here: a Python built without SQLite can still use the other databases

    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_SECONDS
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if not _is_sqlite_busy(exc) or time.monotonic() > deadline:
                raise
        time.sleep(SQLITE_WAL_SWITCH_RETRY_SECONDS)


def _is_sqlite_busy(error: Exception) -> bool:
    # The primary code is the low byte; the extended ones (BUSY_RECOVERY...) are busy too.
    return getattr(error, "sqlite_errorcode", 0) & 0xFF == SQLITE_BUSY


_MISSING_TABLE_MARKERS = ("no such table", "does not exist", "doesn't exist")


def is_missing_table(error: BaseException) -> bool:
    text = str(getattr(error, "orig", error)).lower()
    return any(marker in text for marker in _MISSING_TABLE_MARKERS) and "fs_" in text


# MySQL's and MariaDB's ER_DUP_ENTRY: a unique key already holds the value.
MYSQL_DUPLICATE_KEY = 1062


def is_duplicate_key(error: BaseException) -> bool:
    """A plain INSERT on MySQL found its unique key taken (the statement alone is undone)."""
    orig = getattr(error, "orig", None)
    return isinstance(error, sa.exc.IntegrityError) and getattr(orig, "errno", None) == (
        MYSQL_DUPLICATE_KEY
    )


_CONFLICT_MARKERS = ("deadlock", "lock wait timeout", "serializ")


def is_conflict(error: BaseException) -> bool:
    """A deadlock, lock timeout or serialization failure: run the transaction again."""
    if not isinstance(error, sa.exc.DBAPIError) or error.connection_invalidated:
        return False
    text = str(error.orig).lower()
    return any(marker in text for marker in _CONFLICT_MARKERS)


def is_stale_connection(error: BaseException) -> bool:
    """A statement failed on a pooled connection the server had dropped (a restart).

    Connections are not pinged before every transaction (see _ping_after_idle),
    so the first one used after a restart fails (in a statement, or in the
    rollback after it: mysql-connector reports its first failure in words
    SQLAlchemy does not take for a disconnect). SQLAlchemy then invalidates the
    pool's older connections: running the transaction again takes a new one.
    """
    return isinstance(error, sa.exc.DBAPIError) and error.connection_invalidated


def is_worth_running_again(error: BaseException) -> bool:
    """A conflict, or a connection found dead: our transaction may simply run again."""
    return is_conflict(error) or is_stale_connection(error)


def is_transient(error: BaseException) -> bool:
    """Errors worth retrying: the connection went away, or a conflict."""
    if isinstance(error, sa.exc.DBAPIError) and error.connection_invalidated:
        return True
    if isinstance(error, (sa.exc.OperationalError, sa.exc.InterfaceError)):
        return not is_missing_table(error)
    return is_conflict(error)

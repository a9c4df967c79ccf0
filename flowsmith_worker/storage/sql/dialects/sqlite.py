"""SQLite: one file, one writer at a time (BEGIN IMMEDIATE), WAL, private files,
and errors by result code."""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any, ClassVar, Literal
from urllib.parse import quote

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects import sqlite
from sqlalchemy.engine import Connection, Engine

from flowsmith_worker.config import URL_ENV_VARS
from flowsmith_worker.errors import DatabaseNotFound
from flowsmith_worker.storage.sql.dialects.base import (
    READ_ONLY_OPTION,
    BatchWrite,
    DbError,
    Dialect,
)

SQLITE_BUSY_TIMEOUT_SECONDS = 30.0
# Between tries at switching a file to WAL while another connection switches it.
SQLITE_WAL_SWITCH_RETRY_SECONDS = 0.01
# New SQLite files are readable by their owner only: they hold every input and output.
SQLITE_FILE_MODE = 0o600
# How a SQLite file is opened, as the mode= of its URI (https://sqlite.org/uri.html):
# read-write and created if missing, read-write if it exists, or read-only.
SqliteMode = Literal["rwc", "rw", "ro"]

# Result codes (https://sqlite.org/rescode.html), as sqlite3.SQLITE_* names them,
# without importing sqlite3 for every database. An extended code keeps its primary
# code in the low byte (SQLITE_BUSY_SNAPSHOT is SQLITE_BUSY | 2 << 8).
SQLITE_ERROR = 1
SQLITE_BUSY = 5
SQLITE_LOCKED = 6
SQLITE_READONLY = 8
SQLITE_CANTOPEN = 14
SQLITE_CONSTRAINT_PRIMARYKEY = 1555
SQLITE_CONSTRAINT_UNIQUE = 2067
PRIMARY_CODES = {
    SQLITE_BUSY: DbError.BUSY,
    SQLITE_LOCKED: DbError.BUSY,
    SQLITE_READONLY: DbError.READ_ONLY,
    SQLITE_CANTOPEN: DbError.CANNOT_CONNECT,
}
EXTENDED_CODES = {
    SQLITE_CONSTRAINT_UNIQUE: DbError.UNIQUE_VIOLATION,
    SQLITE_CONSTRAINT_PRIMARYKEY: DbError.UNIQUE_VIOLATION,
}
# SQLite gives a missing table or column only the catch-all SQLITE_ERROR; its
# message tells them apart, and SQLite's messages are fixed English text in the
# library itself (it has no translations), so reading them here is safe.
SQLITE_ERROR_MESSAGES = {
    "no such table": DbError.UNDEFINED_TABLE,
    "no such column": DbError.UNDEFINED_COLUMN,
}


class SqliteDialect(Dialect):
    name = "sqlite"
    has_row_locks = False
    claim_reads_first = True
    batch_write = BatchWrite.JSON_EACH
    _now: ClassVar[sa.ColumnElement[float]] = (sa.func.julianday("now") - 2440587.5) * 86400.0

    def greatest(self, *values: Any) -> sa.ColumnElement[float]:
        """SQLite's scalar max() is everyone else's GREATEST."""
        return sa.func.max(*values, type_=sa.Double())

    def insert_if_absent(self, table: sa.Table) -> Any:
        return sqlite.insert(table).on_conflict_do_nothing()

    def classify_driver_error(self, error: BaseException) -> DbError | None:
        # sqlite_errorcode: Python 3.11+, the extended code.
        code = getattr(error, "sqlite_errorcode", None)
        if not isinstance(code, int):
            return None
        if code & 0xFF == SQLITE_ERROR:
            text = str(error)
            return next((k for m, k in SQLITE_ERROR_MESSAGES.items() if text.startswith(m)), None)
        return EXTENDED_CODES.get(code) or PRIMARY_CODES.get(code & 0xFF)


SQLITE = SqliteDialect()


def create_sqlite_engine(url: sa.URL, mode: SqliteMode) -> Engine:
    """An engine on the SQLite file of ``url``: created if missing, only written, or only read."""
    return _sqlite_engine(_sqlite_opened_as(url, mode), mode)


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
            if SQLITE.classify_driver_error(exc) is not DbError.BUSY or time.monotonic() > deadline:
                raise
        time.sleep(SQLITE_WAL_SWITCH_RETRY_SECONDS)

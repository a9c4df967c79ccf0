"""Database errors are told apart by their code, never by their words (storage/sql/dialects/).

Each kind is provoked on the real servers where that is cheap: a unique
violation, a missing table or column, a deadlock between two threads, a lock
wait timeout, a serialization failure, a killed connection, a refused
connection, an account's connection limit, a read-only transaction, SQLite's
"database is locked". MariaDB is asked to speak German (lc_messages) where
the English words would have been what the old classification read. The codes
no server gives cheaply, built as each driver builds them: tests/unit/test_dialect_errors.py.
"""

from __future__ import annotations

import socket
import sqlite3
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine, make_url

from flowsmith_worker.config import PoolSettings
from flowsmith_worker.errors import DatabaseUnavailable, SchemaNotMigrated
from flowsmith_worker.storage import create_storage
from flowsmith_worker.storage.sql import SqlStorage
from flowsmith_worker.storage.sql.dialects import DbError, create_engine, dialect_of
from flowsmith_worker.storage.sql.dialects.sqlite import SQLITE
from tests.conftest import database_url
from tests.servers import DatabaseServer
from tests.support.dbapi import wrapped

SERVERS = ["postgresql", "mysql"]
_ROWS = sa.Table(
    "t_rows",
    sa.MetaData(),
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("name", sa.String(20), unique=True),
)


@pytest.fixture
def engine(request: pytest.FixtureRequest, backend: str, tmp_path: Path) -> Iterator[Engine]:
    """FlowSmith's engine on a fresh database holding t_rows: (1, 'a') and (2, 'b')."""
    made = create_engine(make_url(database_url(request, backend, tmp_path)), PoolSettings())
    with made.begin() as conn:
        _ROWS.metadata.create_all(conn)
        conn.execute(sa.insert(_ROWS), [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}])
    yield made
    made.dispose()


def _speaking(engine: Engine, language: str) -> Engine:
    """Each new MariaDB session of ``engine`` reports errors in ``language``."""

    @event.listens_for(engine, "connect")
    def _connected(dbapi_conn: Any, _record: Any) -> None:
        cursor = dbapi_conn.cursor()
        cursor.execute(f"SET lc_messages = '{language}'")
        cursor.close()

    return engine


def _failure(conn: Connection, statement: str) -> sa.exc.DBAPIError:
    """The error ``statement`` fails with; its transaction is rolled back."""
    with pytest.raises(sa.exc.DBAPIError) as caught:
        conn.execute(sa.text(statement))
    conn.rollback()
    return caught.value


def _classified(engine: Engine, error: BaseException) -> DbError | None:
    return dialect_of(engine).classify(error)


# -- on the real databases ------------------------------------------------------------


@pytest.mark.parametrize("backend", ["sqlite", *SERVERS])
def test_a_unique_violation_is_classified_on_every_database(engine: Engine) -> None:
    """A real duplicate key is a UNIQUE_VIOLATION, neither a conflict nor transient."""
    with engine.connect() as conn:
        error = _failure(conn, "INSERT INTO t_rows (id, name) VALUES (3, 'a')")
    assert _classified(engine, error) is DbError.UNIQUE_VIOLATION
    assert not dialect_of(engine).is_transient(error)


@pytest.mark.parametrize("backend", ["sqlite", *SERVERS])
def test_a_missing_table_or_column_is_classified_on_every_database(engine: Engine) -> None:
    """A real missing table is UNDEFINED_TABLE, a real missing column UNDEFINED_COLUMN."""
    with engine.connect() as conn:
        table = _failure(conn, "SELECT id FROM fs_flows")
        column = _failure(conn, "SELECT lease_owner FROM t_rows")
    assert _classified(engine, table) is DbError.UNDEFINED_TABLE
    assert _classified(engine, column) is DbError.UNDEFINED_COLUMN


@pytest.mark.mysql
def test_an_unmigrated_database_says_run_migrate_in_any_language(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """MariaDB reporting in German ("Tabelle ... existiert nicht"): the storage still says
    the tables are missing and to run `flowsmith migrate`, not a driver traceback."""
    storage = create_storage(database_url(request, "mysql", tmp_path))
    assert isinstance(storage, SqlStorage)
    _speaking(storage.engine, "de_DE")
    try:
        with pytest.raises(SchemaNotMigrated, match="flowsmith migrate") as caught:
            storage.get_flow(tracking_id="nope")
    finally:
        storage.close()
    assert "existiert nicht" in str(caught.value.__cause__)


@pytest.mark.parametrize("backend", SERVERS)
def test_a_deadlock_between_two_threads_is_a_conflict(engine: Engine, backend: str) -> None:
    """Two threads lock rows 1 and 2 in opposite orders: the one the server aborts
    gets DEADLOCK, a conflict worth running again (MariaDB speaking German)."""
    if backend == "mysql":
        _speaking(engine, "de_DE")
    both_locked_one = threading.Barrier(2)
    errors: list[sa.exc.DBAPIError] = []

    def lock(first: int, second: int) -> None:
        try:
            with engine.begin() as conn:
                conn.execute(sa.update(_ROWS).where(_ROWS.c.id == first).values(name=None))
                both_locked_one.wait(timeout=30)
                conn.execute(sa.update(_ROWS).where(_ROWS.c.id == second).values(name=None))
        except sa.exc.DBAPIError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=lock, args=order) for order in ((1, 2), (2, 1))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    [error] = errors
    assert _classified(engine, error) is DbError.DEADLOCK
    assert dialect_of(engine).is_conflict(error)


@pytest.mark.parametrize("backend", SERVERS)
def test_a_lock_wait_timeout_is_a_conflict(engine: Engine, backend: str) -> None:
    """A row held by another transaction past the lock timeout (PostgreSQL's
    lock_timeout, 55P03; MariaDB's innodb_lock_wait_timeout, 1205, in German) is
    LOCK_TIMEOUT: a conflict, whatever the server's words."""
    if backend == "mysql":
        _speaking(engine, "de_DE")
    short_wait = {
        "postgresql": "SET lock_timeout = '50ms'",
        "mysql": "SET SESSION innodb_lock_wait_timeout = 1",
    }[backend]
    with engine.connect() as holder, engine.connect() as waiter:
        holder.execute(sa.update(_ROWS).where(_ROWS.c.id == 1).values(name="held"))
        waiter.execute(sa.text(short_wait))
        error = _failure(waiter, "UPDATE t_rows SET name = 'waited' WHERE id = 1")
    assert "lock wait timeout" not in str(error.orig).lower()  # the words the old check read
    assert _classified(engine, error) is DbError.LOCK_TIMEOUT
    assert dialect_of(engine).is_conflict(error)


@pytest.mark.parametrize("backend", SERVERS)
def test_a_serialization_failure_is_a_conflict(engine: Engine, backend: str) -> None:
    """A REPEATABLE READ transaction updating a row changed since its snapshot fails
    (PostgreSQL 40001; MariaDB 1020 with innodb_snapshot_isolation): a conflict."""
    with engine.connect() as reader, engine.connect() as writer:
        reader.execution_options(isolation_level="REPEATABLE READ")
        if backend == "mysql":
            reader.execute(sa.text("SET SESSION innodb_snapshot_isolation = ON"))
            reader.commit()
        reader.execute(sa.select(_ROWS.c.name).where(_ROWS.c.id == 1)).one()
        with writer.begin():
            writer.execute(sa.update(_ROWS).where(_ROWS.c.id == 1).values(name="changed"))
        error = _failure(reader, "UPDATE t_rows SET name = 'stale' WHERE id = 1")
    assert _classified(engine, error) is DbError.SERIALIZATION_FAILURE
    assert dialect_of(engine).is_conflict(error)


@pytest.mark.parametrize("backend", SERVERS)
def test_a_killed_connection_is_transient(engine: Engine, backend: str) -> None:
    """pg_terminate_backend / KILL CONNECTION: the next statement fails, the connection
    is invalidated and the error is transient. MariaDB says why by number (2013,
    CONNECTION_LOST); psycopg2 gives such an error no SQLSTATE, so its class decides."""
    own_id, kill = {
        "postgresql": ("SELECT pg_backend_pid()", "SELECT pg_terminate_backend({})"),
        "mysql": ("SELECT CONNECTION_ID()", "KILL CONNECTION {}"),
    }[backend]
    with engine.connect() as victim, engine.connect() as killer:
        session = int(victim.execute(sa.text(own_id)).scalar_one())
        killer.execute(sa.text(kill.format(session)))
        killer.commit()
        error = _failure(victim, "SELECT 1")
    assert error.connection_invalidated
    assert dialect_of(engine).is_transient(error)
    if backend == "mysql":
        assert _classified(engine, error) is DbError.CONNECTION_LOST


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.mysql
def test_a_refused_connection_is_cannot_connect(mysql_server: DatabaseServer) -> None:
    """A server not listening (2003, CR_CONN_HOST_ERROR) is CANNOT_CONNECT: transient."""
    url = make_url(mysql_server.url_for("mysql")).set(host="127.0.0.1", port=_closed_port())
    engine = create_engine(url, PoolSettings())
    with pytest.raises(sa.exc.DBAPIError) as caught:
        engine.connect()
    assert _classified(engine, caught.value) is DbError.CANNOT_CONNECT
    assert dialect_of(engine).is_transient(caught.value)


def test_an_sqlite_file_that_cannot_be_opened_is_cannot_connect(tmp_path: Path) -> None:
    """A file in a directory that does not exist: SQLITE_CANTOPEN, CANNOT_CONNECT."""
    engine = create_engine(make_url(f"sqlite:///{tmp_path / 'absent' / 'f.db'}"), PoolSettings())
    with pytest.raises(sa.exc.DBAPIError) as caught:
        engine.connect()
    assert _classified(engine, caught.value) is DbError.CANNOT_CONNECT


@pytest.fixture
def limited_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A MariaDB database, as an account allowed one connection at a time."""
    url = make_url(database_url(request, "mysql", tmp_path))
    user = f"fs_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(url)
    with admin.begin() as conn:
        conn.execute(sa.text(f"CREATE USER {user} IDENTIFIED BY 'pw' WITH MAX_USER_CONNECTIONS 1"))
        conn.execute(sa.text(f"GRANT ALL ON {url.database}.* TO {user}"))
    yield url.set(username=user, password="pw").render_as_string(hide_password=False)
    with admin.begin() as conn:
        conn.execute(sa.text(f"DROP USER {user}"))
    admin.dispose()


@pytest.mark.mysql
def test_an_account_at_its_connection_limit_is_unavailable_not_a_bad_url(
    limited_url: str,
) -> None:
    """The account's one connection is taken (1226): the storage says the database is
    unavailable for now and why, not that the URL is wrong (the account is fine)."""
    holder = sa.create_engine(limited_url)
    storage = create_storage(limited_url)
    try:
        with holder.connect(), pytest.raises(DatabaseUnavailable, match="connection limit"):
            storage.get_flow(tracking_id="nope")
    finally:
        storage.close()
        holder.dispose()


@pytest.mark.parametrize("backend", SERVERS)
def test_a_write_in_a_read_only_transaction_is_read_only(engine: Engine, backend: str) -> None:
    """A read-only transaction (as on a standby) refuses a write: PostgreSQL 25006,
    MariaDB 1792, both READ_ONLY, which is transient (a failover ends it)."""
    read_only = {
        "postgresql": "SET TRANSACTION READ ONLY",
        "mysql": "START TRANSACTION READ ONLY",
    }[backend]
    with engine.connect() as conn:
        conn.exec_driver_sql(read_only)
        error = _failure(conn, "UPDATE t_rows SET name = 'x' WHERE id = 1")
    assert _classified(engine, error) is DbError.READ_ONLY
    assert dialect_of(engine).is_transient(error)


@pytest.mark.postgres
def test_a_read_only_postgresql_database_says_to_use_the_primary(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """A database whose transactions are read-only (as a standby's) makes a write fail
    with DatabaseUnavailable saying to point FlowSmith at the primary."""
    url = database_url(request, "postgresql", tmp_path)
    storage = create_storage(url)
    storage.migrate()
    admin = sa.create_engine(url)
    with admin.begin() as conn:
        name = make_url(url).database
        conn.execute(sa.text(f"ALTER DATABASE {name} SET default_transaction_read_only = on"))
    admin.dispose()
    storage.close()
    storage = create_storage(url)  # new sessions take the database's new default
    try:
        with pytest.raises(DatabaseUnavailable, match="point FlowSmith at the primary"):
            storage.set_queue_limit(queue="q", max_running=1)
    finally:
        storage.close()


def test_a_write_to_a_read_only_sqlite_file_is_read_only(tmp_path: Path) -> None:
    """A file opened read-only (sqlite_mode="ro") refuses a write: SQLITE_READONLY."""
    url = f"sqlite:///{tmp_path / 'f.db'}"
    create_storage(url).migrate()
    storage = create_storage(url, sqlite_mode="ro")
    try:
        with pytest.raises(DatabaseUnavailable, match="point FlowSmith at the primary") as caught:
            storage.set_queue_limit(queue="q", max_running=1)
    finally:
        storage.close()
    assert SQLITE.classify(caught.value.__cause__) is DbError.READ_ONLY  # type: ignore[arg-type]


def test_sqlite_database_is_locked_is_busy_not_a_conflict(tmp_path: Path) -> None:
    """Another connection holds the write lock and we wait no longer: SQLITE_BUSY is
    BUSY, transient (the worker tries again later) but no conflict to run again at
    once, as each try already waited the busy timeout."""
    path = tmp_path / "f.db"
    holder = sqlite3.connect(path, isolation_level=None)
    waiter = sqlite3.connect(path, isolation_level=None, timeout=0)
    try:
        holder.execute("BEGIN IMMEDIATE")
        with pytest.raises(sqlite3.OperationalError) as caught:
            waiter.execute("BEGIN IMMEDIATE")
    finally:
        holder.close()
        waiter.close()
    error = wrapped(caught.value, sqlite3.Error)
    assert SQLITE.classify(error) is DbError.BUSY
    assert SQLITE.is_transient(error)
    assert not SQLITE.is_conflict(error)

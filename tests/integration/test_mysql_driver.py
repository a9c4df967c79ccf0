"""mysql-connector without its extra round trips (storage/sql/dialects/mysql.py).

The driver's cursor() sends a COM_PING and waits for the answer, and SQLAlchemy
opens a cursor per statement (_no_ping_per_statement); and the pool's reset sent
a ROLLBACK on every return, even after a COMMIT (_rollback_only_if_open). These
tests prove the round trips are gone, that an open transaction is still rolled
back, and that a connection the server dropped is still replaced without an
error to the caller.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import sqlalchemy as sa

from flowsmith_worker.flow import Flow
from flowsmith_worker.storage import create_storage
from flowsmith_worker.storage.sql import SqlStorage
from tests.conftest import database_url
from tests.servers.admin import kill_mysql_sessions

Names = Callable[[str], str]


@pytest.fixture
def mysql_storage(request: pytest.FixtureRequest, tmp_path: Path) -> SqlStorage:
    storage = create_storage(database_url(request, "mysql", tmp_path))
    assert isinstance(storage, SqlStorage)
    storage.migrate()
    request.addfinalizer(storage.close)
    return storage


def _admin_commands(conn: sa.Connection) -> int:
    """This session's COM_PING and other admin commands, as the server counted them."""
    row = conn.exec_driver_sql("SHOW SESSION STATUS LIKE 'Com_admin_commands'").one()
    return int(row[1])


def test_a_statement_is_one_round_trip(mysql_storage: SqlStorage) -> None:
    """Ten statements on one connection send no COM_PING (the driver sent one each)."""
    with mysql_storage.engine.connect() as conn:
        before = _admin_commands(conn)
        for _ in range(10):
            conn.exec_driver_sql("SELECT 1").all()
        # The status read is a statement too: it would have sent its own ping.
        assert _admin_commands(conn) == before


def _session(conn: sa.Connection) -> tuple[int, int]:
    """This session's id and the ROLLBACKs it has received."""
    session = conn.exec_driver_sql("SELECT CONNECTION_ID()").scalar()
    row = conn.exec_driver_sql("SHOW SESSION STATUS LIKE 'Com_rollback'").one()
    return int(session or 0), int(row[1])


def test_a_committed_transaction_is_not_rolled_back_on_return(
    mysql_storage: SqlStorage,
) -> None:
    """Five committed transactions on one pooled connection send no ROLLBACK when the
    connection goes back to the pool (the pool's reset sent one each)."""
    engine = mysql_storage.engine
    with engine.begin() as conn:
        session, before = _session(conn)
    for _ in range(5):
        with engine.begin() as conn:
            conn.exec_driver_sql("SELECT 1").all()
    with engine.begin() as conn:
        assert _session(conn) == (session, before)  # the same connection (the pool is LIFO)


def test_a_transaction_left_open_is_rolled_back_on_return(mysql_storage: SqlStorage) -> None:
    """A connection returned to the pool with a transaction open (the driver used
    directly) is still rolled back: its next user, the same session, does not see
    the uncommitted row."""
    engine = mysql_storage.engine
    raw = engine.raw_connection()
    cursor = raw.cursor()
    cursor.execute("SELECT CONNECTION_ID()")
    [(session,)] = cursor.fetchall()
    cursor.execute(
        "INSERT INTO fs_workers (id, host, pid, version, queues, concurrency,"
        " lease_seconds, in_flight, started_at, heartbeat_at)"
        " VALUES ('left-open', 'h', 1, 'v', 'q', 1, 1, 0, 0, 0)"
    )
    cursor.close()
    raw.close()  # back to the pool, the INSERT neither committed nor rolled back
    with engine.begin() as conn:
        assert conn.exec_driver_sql("SELECT CONNECTION_ID()").scalar() == session
        assert conn.exec_driver_sql("SELECT count(*) FROM fs_workers").scalar() == 0


def test_a_connection_the_server_dropped_is_replaced_without_an_error(
    mysql_storage: SqlStorage, unique: Names
) -> None:
    """The server kills every connection of the storage (as a restart does): the next
    enqueue and read work, on new connections, with no error to the caller."""
    flow = Flow(unique("f"), storage=mysql_storage).step("a", lambda ctx: 1)
    flow.run({}, tracking_id=unique("t"))
    url = mysql_storage.engine.url
    admin = sa.create_engine(url, poolclass=sa.pool.NullPool)
    with admin.connect() as conn:
        alive = conn.exec_driver_sql(
            "SELECT count(*) FROM information_schema.processlist "
            "WHERE db = DATABASE() AND id <> CONNECTION_ID()"
        ).scalar()
        kill_mysql_sessions(conn, str(url.database))
    admin.dispose()
    assert alive
    run = flow.run({}, tracking_id=unique("t"))
    assert run.status() is not None

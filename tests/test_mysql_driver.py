"""mysql-connector without its ping before every statement (dialects._no_ping_per_statement).

The driver's cursor() sends a COM_PING and waits for the answer, and SQLAlchemy
opens a cursor per statement; the engine turns that off. These tests prove the
round trips are gone and that a connection the server dropped is still replaced
without an error to the caller.
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
from tests.servers import _kill_mysql_sessions

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
        _kill_mysql_sessions(conn, str(url.database))
    admin.dispose()
    assert alive
    run = flow.run({}, tracking_id=unique("t"))
    assert run.status() is not None

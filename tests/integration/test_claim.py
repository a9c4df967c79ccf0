"""The claim's cost: statements per claim and per idle poll, queue caps without a lookup,
SQLite's empty poll without the write lock, no ping per transaction.

Statements are counted with a SQLAlchemy ``before_cursor_execute`` listener on the
storage's own engine: a behaviour (what is sent to the database), never a timing.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event

from flowsmith_worker.flow import Flow
from flowsmith_worker.storage import create_storage
from flowsmith_worker.storage.sql import SqlStorage
from flowsmith_worker.worker import Worker
from tests.conftest import database_url
from tests.servers.pgbouncer import skip_through_pgbouncer

Names = Callable[[str], str]


@pytest.fixture(params=["sqlite", "postgresql", "mysql"])
def sql_storage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SqlStorage]:
    storage = create_storage(database_url(request, str(request.param), tmp_path))
    assert isinstance(storage, SqlStorage)
    storage.migrate()
    yield storage
    storage.close()


@contextmanager
def statements(storage: SqlStorage) -> Iterator[list[str]]:
    """Every statement the storage's engine sends meanwhile (BEGIN IMMEDIATE included)."""
    sent: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        sent.append(" ".join(statement.split()))

    event.listen(storage.engine, "before_cursor_execute", record)
    try:
        yield sent
    finally:
        event.remove(storage.engine, "before_cursor_execute", record)


def claim(storage: SqlStorage, limit: int = 4) -> list[Any]:
    return storage.claim_nodes(worker_id="w", limit=limit, lease_seconds=30, queues=["default"])


def queue_lookups(sent: list[str]) -> list[str]:
    """Statements that read fs_queues on their own (not a guard inside the claim)."""
    return [s for s in sent if "fs_queues" in s and "fs_nodes" not in s]


def test_an_uncapped_claim_reads_no_queue_caps(sql_storage: SqlStorage, unique: Names) -> None:
    """With no queue capped, a claim sends no fs_queues statement; on PostgreSQL the whole
    claim of first steps (pick, lease, start the runs, their input) is one statement."""
    flow = Flow(unique("f"), storage=sql_storage).step("a", lambda ctx: 1)
    for _ in range(3):
        flow.run({"x": 1}, tracking_id=unique("t"))
    with statements(sql_storage) as sent:
        claimed = claim(sql_storage)
    assert len(claimed) == 3 and all(n.input == {"x": 1} for n in claimed)
    assert queue_lookups(sent) == []
    if sql_storage.dialect.name == "postgresql":
        assert len(sent) == 1, sent


def test_a_cap_set_while_a_worker_runs_is_honoured(sql_storage: SqlStorage, unique: Names) -> None:
    """A claim that found no cap, then a cap set: the next claims keep to it exactly; once
    the cap is lifted, claims stop reading fs_queues again."""
    flow = Flow(unique("f"), storage=sql_storage).step("a", lambda ctx: 1)
    flow.run({}, tracking_id=unique("t"))
    [first] = claim(sql_storage)
    sql_storage.set_queue_limit(queue="default", max_running=2)
    for _ in range(4):
        flow.run({}, tracking_id=unique("t"))
    assert len(claim(sql_storage)) == 1  # 2 - the one still running
    assert claim(sql_storage) == []
    assert sql_storage.complete_node(lease=first.lease, output=1)
    assert len(claim(sql_storage)) == 1
    sql_storage.set_queue_limit(queue="default", max_running=None)
    assert len(claim(sql_storage)) == 2  # the capped path finds no cap any more
    flow.run({}, tracking_id=unique("t"))
    with statements(sql_storage) as sent:
        assert len(claim(sql_storage)) == 1
    assert queue_lookups(sent) == []


@pytest.mark.parametrize("backend", ["postgresql"])
def test_an_idle_listening_worker_sends_one_statement_per_poll(
    request: pytest.FixtureRequest, backend: str, tmp_path: Path
) -> None:
    """Ten empty polls of a worker with LISTEN on PostgreSQL: ten statements, one each."""
    storage = create_storage(database_url(request, backend, tmp_path))
    assert isinstance(storage, SqlStorage)
    storage.migrate()
    worker = Worker(storage=storage, poll_interval=0.05)
    with statements(storage) as sent:
        for _ in range(10):
            assert worker.claim_once() == 0
    assert len(sent) == 10, sent
    storage.close()


@pytest.mark.parametrize("backend", ["sqlite"])
def test_an_empty_poll_on_sqlite_takes_no_write_lock(
    request: pytest.FixtureRequest, backend: str, tmp_path: Path, unique: Names
) -> None:
    """An empty poll reads in a plain BEGIN: no BEGIN IMMEDIATE, so another process
    holding the file's write lock does not make it wait (it used to wait out the busy
    timeout and fail). With work waiting, the claim still takes the lock."""
    url = database_url(request, backend, tmp_path)
    storage = create_storage(url)
    assert isinstance(storage, SqlStorage)
    storage.migrate()
    with statements(storage) as sent:
        assert claim(storage) == []
    assert "BEGIN IMMEDIATE" not in sent and sent, sent

    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sqlite3, sys\n"
            f"c = sqlite3.connect({str(tmp_path / 'flowsmith.db')!r}, isolation_level=None)\n"
            "c.execute('BEGIN IMMEDIATE')\n"
            "print('locked', flush=True)\n"
            "sys.stdin.readline()\n",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        assert claim(storage) == []
        assert holder.poll() is None  # still holding the lock when the poll came back
    finally:
        assert holder.stdin is not None
        holder.stdin.write("\n")
        holder.stdin.flush()
        holder.wait(10)
    Flow(unique("f"), storage=storage).step("a", lambda ctx: 1).run({}, tracking_id=unique("t"))
    with statements(storage) as sent:
        assert len(claim(storage)) == 1
    assert "BEGIN IMMEDIATE" in sent
    storage.close()


def test_transactions_do_not_ping_their_connection(
    sql_storage: SqlStorage, unique: Names, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No SELECT 1 / COM_PING before each transaction of a busy storage (pool_pre_ping
    did one per checkout); SQLite, with no server to lose, never pinged."""
    pings: list[int] = []
    dialect = sql_storage.engine.dialect
    real_ping = dialect.do_ping
    monkeypatch.setattr(dialect, "do_ping", lambda conn: pings.append(1) or real_ping(conn))
    flow = Flow(unique("f"), storage=sql_storage).step("a", lambda ctx: 1)
    for _ in range(5):
        flow.run({}, tracking_id=unique("t"))
    Worker(storage=sql_storage, poll_interval=0.05).run_until_idle(timeout=20)
    assert pings == []


@skip_through_pgbouncer("pg_terminate_backend of the storage's own server sessions")
@pytest.mark.parametrize("backend", ["postgresql"])
def test_a_connection_the_server_dropped_is_replaced_without_an_error(
    request: pytest.FixtureRequest, backend: str, tmp_path: Path, unique: Names
) -> None:
    """The server ends every connection of the storage (as a restart does): the next
    enqueue and read work, on new connections, with no error to the caller."""
    storage = create_storage(database_url(request, backend, tmp_path))
    assert isinstance(storage, SqlStorage)
    storage.migrate()
    flow = Flow(unique("f"), storage=storage).step("a", lambda ctx: 1)
    flow.run({}, tracking_id=unique("t"))
    admin = sa.create_engine(storage.engine.url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        ended = conn.execute(
            sa.text(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        ).scalar()
    admin.dispose()
    assert ended
    run = flow.run({}, tracking_id=unique("t"))
    assert run.status() is not None
    storage.close()

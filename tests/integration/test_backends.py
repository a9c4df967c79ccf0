"""What differs by database: URLs and drivers, pools, NOTIFY, the caller's transaction,
and the database going away under running workers. Real servers throughout.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from flowsmith_worker import Context, Flow, FlowStatus, NodeStatus, Worker, configure
from flowsmith_worker.config import parse_database_url
from flowsmith_worker.errors import DatabaseUnavailable, InvalidDatabaseURL
from flowsmith_worker.rescue import Rescuer
from flowsmith_worker.storage import create_storage
from flowsmith_worker.storage.base import Storage
from flowsmith_worker.storage.sql import SqlStorage
from flowsmith_worker.storage.sql.schema import SCHEMA_VERSION
from tests.conftest import database_url, eventually
from tests.servers import DatabaseServer
from tests.servers.pgbouncer import skip_through_pgbouncer

Names = Callable[[str], str]


@pytest.mark.parametrize(
    ("url", "driver"),
    [
        ("postgres://u:p@h/db", "postgresql+psycopg2"),
        ("postgresql://u:p@h/db", "postgresql+psycopg2"),
        ("mysql://u:p@h/db", "mysql+mysqlconnector"),
        ("mariadb://u:p@h/db", "mysql+mysqlconnector"),
        ("sqlite:///x.db", "sqlite"),
    ],
)
def test_plain_url_schemes_pick_the_bundled_driver(url: str, driver: str) -> None:
    assert parse_database_url(url).drivername == driver


def test_an_unsupported_database_is_refused_without_leaking_the_password() -> None:
    with pytest.raises(InvalidDatabaseURL) as refused:
        parse_database_url("oracle://scott:tiger-pass@db/orcl")
    assert "tiger-pass" not in str(refused.value) and "***" in str(refused.value)


def plain_scheme(url: str) -> str:
    """The URL as a platform hands it out: no +driver part."""
    scheme, rest = url.split("://", 1)
    return scheme.split("+")[0] + "://" + rest


@pytest.mark.parametrize("backend", ["postgresql", "mysql"])
def test_plain_scheme_urls_reach_the_real_server_with_the_pool_settings(
    request: pytest.FixtureRequest, backend: str, tmp_path: Path
) -> None:
    url = plain_scheme(database_url(request, backend, tmp_path))
    storage = configure(url, pool_min=2, pool_max=5, pool_timeout=3)
    assert isinstance(storage, SqlStorage)
    assert storage.migrate() == SCHEMA_VERSION
    pool: Any = storage.engine.pool
    assert (pool.size(), pool._max_overflow, pool._timeout) == (2, 3, 3)


# -- NOTIFY -------------------------------------------------------------------------


def start_worker(storage: Storage, **kw: Any) -> tuple[Worker, threading.Thread]:
    worker = Worker(storage=storage, **kw)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    return worker, thread


def stop_worker(worker: Worker, thread: threading.Thread) -> None:
    worker.stop()
    thread.join(30)
    assert not thread.is_alive()


@skip_through_pgbouncer("LISTEN on a connection of its own")
def test_notify_wakes_an_idle_worker_long_before_its_next_poll(
    pg_storage: SqlStorage, unique: Names, logs: list[dict[str, Any]]
) -> None:
    """With a 30 s poll interval, only NOTIFY can start the flow within seconds."""
    flow = Flow(unique("f"), storage=pg_storage).step("a", lambda ctx: "done")
    worker, thread = start_worker(pg_storage, poll_interval=30, lease_seconds=120)
    try:
        eventually(lambda: any(line["event"] == "listen.started" for line in logs))
        time.sleep(0.2)  # the worker is asleep in its poll interval now
        assert flow.run({}, tracking_id=unique("t")).wait(timeout=5) == {"a": "done"}
        terminated = _terminate_listeners(pg_storage)
        assert terminated == 1
        eventually(lambda: [line["event"] for line in logs].count("listen.started") >= 2)
        assert flow.run({}, tracking_id=unique("t")).wait(timeout=5) == {"a": "done"}
    finally:
        stop_worker(worker, thread)
    assert any(line["event"] == "listen.lost" for line in logs)


class RecordedWakeup(threading.Event):
    """A worker's wakeup event that records each sleep: how long it was to be, and
    whether it ended by being woken (True) or by its timer running out (False)."""

    def __init__(self) -> None:
        super().__init__()
        self.asleep = threading.Event()
        self.sleeps: list[tuple[float | None, bool]] = []

    def wait(self, timeout: float | None = None) -> bool:
        self.asleep.set()
        woken = super().wait(timeout)
        self.sleeps.append((timeout, woken))
        return woken


def test_no_listen_means_polling_only(pg_storage: SqlStorage, unique: Names) -> None:
    """--no-listen (PgBouncer in transaction mode): a run enqueued while the worker
    sleeps waits for its next poll. The NOTIFY the enqueue sends does not end that
    sleep: it runs its whole poll interval (the rescue pushed out of the way), and
    only the claim after it starts the run.
    """
    poll = 1.0
    flow = Flow(unique("f"), storage=pg_storage).step("a", lambda ctx: "done")
    worker = Worker(storage=pg_storage, poll_interval=poll, lease_seconds=120, listen=False)
    worker.rescuer = Rescuer(pg_storage, interval=600, rescuer_id=worker.id, first_delay=600)
    worker.wakeup = wakeup = RecordedWakeup()
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        assert wakeup.asleep.wait(10)  # its first claim found nothing: asleep until its poll
        run = flow.run({}, tracking_id=unique("t"))
        assert run.wait(timeout=10) == {"a": "done"}
        timeout, woken = wakeup.sleeps[0]
        assert not woken, "the sleep was cut short: the worker heard the NOTIFY"
        assert timeout is not None and timeout >= 0.9 * poll  # the poll's, not the rescue's
    finally:
        stop_worker(worker, thread)


def _terminate_listeners(storage: SqlStorage) -> int:
    with storage.engine.begin() as conn:
        return len(
            conn.execute(
                sa.text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE query LIKE 'LISTEN flowsmith%' AND datname = current_database()"
                )
            ).all()
        )


# -- enqueue in the caller's transaction ---------------------------------------------


@pytest.mark.parametrize("outcome", ["commit", "rollback"])
def test_enqueue_commits_or_rolls_back_with_the_callers_transaction(
    sql_url: str, outcome: str, unique: Names
) -> None:
    storage = create_storage(sql_url)
    storage.migrate()
    flow = Flow(unique("f"), storage=storage).step("a", lambda ctx: ctx.data["order"])
    app = sa.create_engine(parse_database_url(sql_url))
    tid = unique("t")
    with app.connect() as conn:
        conn.execute(sa.text("CREATE TABLE orders (id VARCHAR(20) PRIMARY KEY)"))
        conn.commit()
        conn.execute(sa.text("INSERT INTO orders (id) VALUES ('o1')"))
        flow.run({"order": "o1"}, tracking_id=tid, connection=conn)
        conn.commit() if outcome == "commit" else conn.rollback()
    with app.connect() as conn:
        orders = conn.execute(sa.text("SELECT count(*) FROM orders")).scalar()
    record = storage.get_flow(tracking_id=tid)
    if outcome == "commit":
        assert orders == 1 and record is not None
        Worker(storage=storage, poll_interval=0.05).run_until_idle(timeout=10)
        assert storage.get_flow(tracking_id=tid).status == FlowStatus.COMPLETED  # type: ignore[union-attr]
    else:
        assert orders == 0 and record is None
    app.dispose()
    storage.close()


# -- the database going away ---------------------------------------------------------


@pytest.mark.parametrize("backend", ["postgresql", "mysql"])
def test_workers_ride_out_a_database_restart(
    request: pytest.FixtureRequest,
    backend: str,
    tmp_path: Path,
    unique: Names,
    logs: list[dict[str, Any]],
) -> None:
    """Stop the server mid-run for several seconds: nothing lost, nothing completed re-run."""
    server: DatabaseServer = request.getfixturevalue(
        "postgres_server" if backend == "postgresql" else "mysql_server"
    )
    storage = create_storage(database_url(request, backend, tmp_path))
    storage.migrate()
    executions: list[tuple[str, str, float]] = []
    lock = threading.Lock()

    def step(ctx: Context) -> str:
        with lock:
            executions.append((str(ctx.tracking_id), str(ctx.step), time.time()))
        time.sleep(0.05)
        return "ok"

    flow = Flow(unique("f"), storage=storage)
    for name in ("a", "b", "c"):
        flow.step(name, step, retries=5, backoff=0.2)
    runs = [flow.run({}, tracking_id=unique("t")) for _ in range(40)]
    workers = [
        start_worker(storage, concurrency=4, poll_interval=0.1, lease_seconds=30) for _ in range(2)
    ]
    try:
        eventually(lambda: len(executions) >= 20, timeout=30)
        server.stop()
        time.sleep(5)
        server.start()
        for run in runs:
            assert run.wait(timeout=90)["c"] == "ok"
    finally:
        for worker, thread in workers:
            stop_worker(worker, thread)
    events = [line["event"] for line in logs]
    assert "database.unavailable" in events
    for run in runs:
        for node in run.trace():
            assert node.status == NodeStatus.COMPLETED and node.finished_at is not None
            started = [
                t for tid, s, t in executions if (tid, s) == (run.tracking_id, node.step_name)
            ]
            assert started and all(t <= node.finished_at + 0.01 for t in started), (
                f"{run.tracking_id}/{node.step_name} ran again after it had completed"
            )
    storage.close()


@pytest.mark.parametrize("backend", ["postgresql", "mysql"])
def test_a_callers_repeatable_read_transaction_sees_a_run_committed_meanwhile(
    request: pytest.FixtureRequest, backend: str, tmp_path: Path, unique: Names
) -> None:
    """The idempotency-key race inside the application's own (REPEATABLE READ) transaction.

    Another request commits the same tracking_id after this transaction took its
    snapshot; the trigger must return that run, not fail to find the row it just
    lost the insert race to.
    """
    url = database_url(request, backend, tmp_path)
    storage = create_storage(url)
    storage.migrate()
    flow = Flow(unique("f"), storage=storage).step("a", lambda ctx: 1)
    tid = unique("t")
    app = sa.create_engine(parse_database_url(url), isolation_level="REPEATABLE READ")
    with app.connect() as conn:
        conn.execute(sa.text("SELECT count(*) FROM fs_flows")).scalar()  # take the snapshot
        flow.run({"from": "other request"}, tracking_id=tid)  # commits on its own
        if backend == "postgresql":
            # PostgreSQL refuses the insert in a snapshot that cannot see the row;
            # the caller is told to retry, and the retry finds the run.
            with pytest.raises(DatabaseUnavailable, match="retry the transaction"):
                flow.run({"from": "this request"}, tracking_id=tid, connection=conn)
            conn.rollback()
        run = flow.run({"from": "this request"}, tracking_id=tid, connection=conn)
        conn.commit()
    record = storage.get_flow(tracking_id=tid)
    assert run.tracking_id == tid and record is not None
    assert record.input == {"from": "other request"}
    app.dispose()
    storage.close()

"""What the schema and the dialects promise on every backend: names compare byte for
byte, ids are never handed out twice, the clock is UTC whatever the time zones, a
value too long for its column is refused (not truncated), SQLite files are private.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from flowsmith_worker import Flow
from flowsmith_worker.cli import main
from flowsmith_worker.config import parse_database_url
from flowsmith_worker.storage import create_storage
from flowsmith_worker.storage.base import FlowFilter, Storage
from flowsmith_worker.storage.sql import SqlStorage, schema
from tests.conftest import database_url
from tests.servers import DatabaseServer, require_restart

Names = Callable[[str], str]

# Pairs that MySQL's default collation (case- and accent-insensitive, PAD SPACE) merged.
LOOKALIKES = [("k", "k "), ("cafe", "café"), ("Order-aBc", "order-AbC")]
# 2023-10-29 02:30:00.25 in Europe/Berlin, the second time (CET, UTC+1): the
# repeated hour, when local time alone is ambiguous.
REPEATED_HOUR = datetime(2023, 10, 29, 1, 30, 0, 250000, tzinfo=UTC).timestamp()
DST_ZONE = "Europe/Berlin"


def sql(storage: Storage) -> SqlStorage:
    assert isinstance(storage, SqlStorage)
    return storage


# -- names ---------------------------------------------------------------------------


def test_names_differing_in_case_accents_or_trailing_spaces_are_different_runs(
    storage: Storage, unique: Names
) -> None:
    """`k`/`k `, `cafe`/`café` and `Order-aBc`/`order-AbC` are six runs, each with its own
    input; `flowsmith flows --flow` matches the exact flow name only."""
    flow = Flow(unique("Report"), storage=storage).step("a", lambda ctx: 1)
    for pair in LOOKALIKES:
        for tid in pair:
            assert flow.run({"tid": tid}, tracking_id=tid).tracking_id == tid
    records = [storage.get_flow(tracking_id=tid) for pair in LOOKALIKES for tid in pair]
    assert [r.input["tid"] for r in records if r] == [tid for pair in LOOKALIKES for tid in pair]
    assert len({r.id for r in records if r}) == 6
    assert storage.list_flows(where=FlowFilter(flow_name=flow.name.lower())) == []
    assert storage.list_flows(where=FlowFilter(flow_name=flow.name + " ")) == []
    assert len(storage.list_flows(where=FlowFilter(flow_name=flow.name))) == 6


def test_queue_names_differing_in_case_or_trailing_spaces_are_different_queues(
    storage: Storage, unique: Names
) -> None:
    """A worker on queue `EMAILS` or `emails ` claims nothing of queue `emails`, and each
    of the three has its own cap."""
    flow = Flow(unique("f"), storage=storage, queue="emails").step("a", lambda ctx: 1)
    flow.run({}, tracking_id=unique("t"))
    for other in ("EMAILS", "emails ", "émails"):
        assert storage.claim_nodes(worker_id="w", limit=5, lease_seconds=30, queues=[other]) == []
    [claimed] = storage.claim_nodes(worker_id="w", limit=5, lease_seconds=30, queues=["emails"])
    assert claimed.tracking_id == storage.list_flows(where=FlowFilter())[0].tracking_id
    for cap, queue in enumerate(("q", "Q", "q "), start=1):
        storage.set_queue_limit(queue=queue, max_running=cap)
    assert storage.queue_limits() == {"q": 1, "Q": 2, "q ": 3}


# -- ids -----------------------------------------------------------------------------


def test_a_late_completion_of_a_pruned_run_never_lands_in_a_new_run(
    storage: Storage, unique: Names
) -> None:
    """Cancel and prune a run while its step runs; a new run then gets new flow and node
    ids, so the old attempt's completion (same worker, same attempt number) is refused
    and the new run's own result is accepted."""
    flow = Flow(unique("f"), storage=storage).step("only", lambda ctx: 1)
    old_run = flow.run({"run": "old"}, tracking_id=unique("t"))
    [old] = storage.claim_nodes(worker_id="w", limit=1, lease_seconds=30, queues=["default"])
    storage.cancel_flow(tracking_id=old_run.tracking_id)
    # A negative age prunes every finished run, including the one cancelled just now.
    assert storage.prune_flows(older_than_seconds=-60) == 1

    new_run = flow.run({"run": "new"}, tracking_id=unique("t"))
    [new] = storage.claim_nodes(worker_id="w", limit=1, lease_seconds=30, queues=["default"])
    assert new.attempt == old.attempt
    assert new.lease.flow_id > old.lease.flow_id and new.node_id > old.node_id
    assert storage.complete_node(lease=old.lease, output="stale") is False
    assert storage.complete_node(lease=new.lease, output="fresh") is True
    record = storage.get_flow(tracking_id=new_run.tracking_id)
    assert record is not None and record.output == {"run": "new", "only": "fresh"}


def test_mariadb_keeps_its_id_counters_across_a_restart(
    request: pytest.FixtureRequest, tmp_path: Path, unique: Names
) -> None:
    """Delete the newest run and its nodes, restart the server: InnoDB (MariaDB 10.2.4+,
    MySQL 8) persists AUTO_INCREMENT, so the next run's ids are still higher. Older
    servers recomputed it as max(id) + 1 at startup, handing the deleted ids out again."""
    server: DatabaseServer = request.getfixturevalue("mysql_server")
    require_restart(server)
    storage = sql(create_storage(database_url(request, "mysql", tmp_path)))
    storage.migrate()
    flow = Flow(unique("f"), storage=storage).step("a", lambda ctx: 1).step("b", lambda ctx: 2)
    flow.run({}, tracking_id=unique("t"))
    newest = flow.run({}, tracking_id=unique("t"))
    deleted_flow, deleted_nodes = ids_of(storage, newest.tracking_id)
    with storage.engine.begin() as conn:
        conn.execute(sa.delete(schema.flows).where(schema.flows.c.id == deleted_flow))

    server.restart()  # the first statement on a cut connection runs again on a new one
    after = flow.run({}, tracking_id=unique("t"))
    new_flow, new_nodes = ids_of(storage, after.tracking_id)
    assert new_flow > deleted_flow and min(new_nodes) > max(deleted_nodes)
    storage.close()


def ids_of(storage: SqlStorage, tracking_id: str) -> tuple[int, list[int]]:
    record = storage.get_flow(tracking_id=tracking_id)
    assert record is not None
    with storage.engine.connect() as conn:
        nodes = conn.execute(
            sa.select(schema.nodes.c.id).where(schema.nodes.c.flow_id == record.id)
        ).scalars()
        return record.id, sorted(nodes)


# -- the clock -----------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["postgresql", "mysql"])
def test_the_database_clock_is_utc_seconds_in_a_dst_session_zone(
    request: pytest.FixtureRequest, backend: str, tmp_path: Path, unique: Names
) -> None:
    """With the session (ours, or the caller's connection= one) in Europe/Berlin, the
    clock is the host's UTC clock; on MySQL, pinned inside the repeated autumn hour
    (SET timestamp), it is that instant, not the same wall time an hour earlier."""
    url = database_url(request, backend, tmp_path)
    storage = sql(create_storage(url))
    storage.migrate()
    app = sa.create_engine(parse_database_url(url))
    flow = Flow(unique("f"), storage=storage).step("a", lambda ctx: 1)
    with app.connect() as conn:
        use_time_zone(conn, request, backend, DST_ZONE)
        assert conn.execute(sa.select(storage.dialect.now())).scalar() == pytest.approx(
            time.time(), abs=5
        )
        tid = unique("t")
        flow.run({}, tracking_id=tid, connection=conn)
        conn.commit()
        record = storage.get_flow(tracking_id=tid)
        assert record is not None and record.created_at == pytest.approx(time.time(), abs=5)
        if backend == "mysql":
            conn.exec_driver_sql(f"SET timestamp = {REPEATED_HOUR}")
            assert conn.execute(sa.select(storage.dialect.now())).scalar() == pytest.approx(
                REPEATED_HOUR, abs=1e-3
            )
            tid = unique("t")
            flow.run({}, tracking_id=tid, connection=conn)
            conn.commit()
            record = storage.get_flow(tracking_id=tid)
            assert record is not None
            assert record.created_at == pytest.approx(REPEATED_HOUR, abs=1e-3)
    app.dispose()
    storage.close()


def use_time_zone(
    conn: sa.Connection, request: pytest.FixtureRequest, backend: str, zone: str
) -> None:
    """Put the session in ``zone``, loading MySQL's time zone tables for it if needed."""
    if backend == "postgresql":
        conn.exec_driver_sql(f"SET TIME ZONE '{zone}'")
        return
    try:
        conn.exec_driver_sql(f"SET time_zone = '{zone}'")
    except sa.exc.DatabaseError:
        load_mysql_time_zone(request.getfixturevalue("mysql_server"), zone)
        conn.exec_driver_sql(f"SET time_zone = '{zone}'")


def load_mysql_time_zone(server: DatabaseServer, zone: str) -> None:
    """The private test server starts without time zone tables: load one zone's rules."""
    to_sql = shutil.which("mariadb-tzinfo-to-sql") or shutil.which("mysql_tzinfo_to_sql")
    client = shutil.which("mariadb") or shutil.which("mysql")
    if to_sql is None or client is None:
        pytest.fail(f"the server has no time zone {zone!r} and no tzinfo-to-sql tool to load it")
    rules = subprocess.run(
        [to_sql, f"/usr/share/zoneinfo/{zone}", zone], capture_output=True, check=True
    ).stdout
    admin = sa.make_url(server.admin_url)
    subprocess.run(
        [client, "-h", str(admin.host), "-P", str(admin.port), "-u", str(admin.username), "mysql"],
        input=rules,
        env={**os.environ, "MYSQL_PWD": str(admin.password)},
        capture_output=True,
        check=True,
    )


# -- host clock skew ------------------------------------------------------------------

HOST_SKEW = 2 * 3600.0  # this host's clock runs two hours ahead of the database's


@pytest.fixture
def skewed_host_clock(monkeypatch: pytest.MonkeyPatch) -> float:
    """time.time() two hours ahead from here on; the database clock stays right."""
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + HOST_SKEW)
    return HOST_SKEW


def test_run_at_is_compared_with_the_database_clock(
    storage: Storage, unique: Names, skewed_host_clock: float
) -> None:
    """run_at= a minute from now holds the run for that minute even though this host
    believes that minute passed long ago (it used to run at once)."""
    flow = Flow(unique("f"), storage=storage).step("a", lambda ctx: 1)
    at = time.time() - skewed_host_clock + 60  # a minute from now, by a right clock
    run = flow.run({}, tracking_id=unique("t"), run_at=datetime.fromtimestamp(at, UTC))
    assert storage.claim_nodes(worker_id="w", limit=1, lease_seconds=30, queues=["default"]) == []
    [node] = run.trace()
    assert node.run_after == pytest.approx(at, abs=1e-3)


def test_flows_since_a_duration_counts_back_from_the_database_clock(
    sql_url: str, unique: Names, skewed_host_clock: float
) -> None:
    """`flowsmith flows --since 1h` lists a run created just now although this host's
    clock says "now" is two hours later (it used to list nothing)."""
    storage = create_storage(sql_url)
    storage.migrate()
    tid = unique("t")
    Flow(unique("f"), storage=storage).step("a", lambda ctx: 1).run({}, tracking_id=tid)
    result = CliRunner().invoke(main, ["flows", "--since", "1h", "--json", "--url", sql_url])
    assert result.exit_code == 0, result.output
    assert [run["tracking_id"] for run in json.loads(result.stdout)["flows"]] == [tid]
    storage.close()


# -- values too long -----------------------------------------------------------------


def test_a_name_too_long_for_its_column_is_refused_not_truncated(storage: Storage) -> None:
    """fs_queues.name holds 100 characters; PostgreSQL and MySQL refuse 101 (MySQL's
    INSERT IGNORE stored the first 100); SQLite does not enforce lengths and keeps all."""
    queue = "q" * 101
    try:
        storage.set_queue_limit(queue=queue, max_running=1)
    except sa.exc.DataError:
        assert storage.queue_limits() == {}
        return
    assert sql(storage).dialect.name == "sqlite"
    assert storage.queue_limits() == {queue: 1}


# -- SQLite files ---------------------------------------------------------------------


def test_a_new_sqlite_database_and_its_wal_files_are_readable_by_the_owner_only(
    tmp_path: Path,
) -> None:
    """Even under umask 022 the database, -wal and -shm files are 0600: they hold every
    input and output."""
    path = tmp_path / "new.db"
    previous = os.umask(0o022)
    try:
        storage = sql(create_storage(f"sqlite:///{path}"))
        storage.migrate()
        with storage.engine.connect() as conn:  # an open connection keeps -wal and -shm
            conn.execute(sa.select(schema.flows.c.id)).all()
            for suffix in ("", "-wal", "-shm"):
                assert file_mode(Path(f"{path}{suffix}")) == 0o600, suffix
        storage.close()
    finally:
        os.umask(previous)


def test_an_existing_sqlite_file_keeps_the_mode_its_owner_gave_it(tmp_path: Path) -> None:
    """A database file the user made (here group-readable on purpose) is not chmod'ed."""
    path = tmp_path / "mine.db"
    sqlite3.connect(path).close()
    path.chmod(0o640)
    storage = create_storage(f"sqlite:///{path}")
    storage.migrate()
    storage.close()
    assert file_mode(path) == 0o640


def test_connecting_while_another_connection_switches_the_file_to_wal_waits(
    tmp_path: Path,
) -> None:
    """A connection to a SQLite file that another connection holds the write lock of,
    before the file is WAL (as a concurrent `flowsmith migrate` holds it while switching
    a new file to WAL), waits for the lock instead of failing at once with "database is
    locked" (SQLite calls no busy handler there); then it migrates, and the file is WAL."""
    path = tmp_path / "new.db"
    switching = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    switching.execute("BEGIN IMMEDIATE")  # the write lock of a file still in rollback mode
    released = threading.Event()

    def release() -> None:
        released.set()
        switching.execute("COMMIT")

    timer = threading.Timer(0.5, release)
    timer.start()
    try:
        storage = create_storage(f"sqlite:///{path}")
        assert storage.migrate() == schema.SCHEMA_VERSION
        storage.close()
    finally:
        timer.join()
        switching.close()
    assert released.is_set()
    with sqlite3.connect(path) as check:
        assert check.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def file_mode(path: Path) -> int:
    return path.stat().st_mode & 0o777

"""The database fixtures themselves: fresh databases, SKIP LOCKED, restarts.

Everything else in the suite trusts these properties, so they are checked
against the real servers on both PostgreSQL and MariaDB.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from tests.servers import DatabaseServer, require_restart

SERVERS = ["postgres_server", "mysql_server"]


@pytest.fixture(params=SERVERS)
def server(request: pytest.FixtureRequest) -> DatabaseServer:
    """Each test here runs once per server kind."""
    result: DatabaseServer = request.getfixturevalue(request.param)
    return result


FreshEngine = Callable[..., Engine]


@pytest.fixture
def fresh(server: DatabaseServer) -> Iterator[FreshEngine]:
    """Makes engines on new, empty databases; disposes and drops them afterwards
    (on an external server they would otherwise pile up)."""
    made: list[tuple[str, Engine]] = []

    def make(**engine_options: Any) -> Engine:
        name = "t_" + uuid.uuid4().hex[:12]
        engine = sa.create_engine(server.create_database(name), **engine_options)
        made.append((name, engine))
        return engine

    yield make
    for name, engine in made:
        engine.dispose()
        server.drop_database(name)


def table_names(engine: Engine) -> list[str]:
    return sorted(sa.inspect(engine).get_table_names())


def test_fresh_database_is_empty_and_isolated(fresh: FreshEngine) -> None:
    first = fresh()
    with first.begin() as conn:
        conn.execute(sa.text("CREATE TABLE jobs (id INTEGER PRIMARY KEY)"))
        conn.execute(sa.text("INSERT INTO jobs (id) VALUES (1)"))
    second = fresh()

    assert table_names(first) == ["jobs"]
    assert table_names(second) == []


def test_drop_database_cuts_off_clients_and_name_can_be_reused(server: DatabaseServer) -> None:
    name = "t_" + uuid.uuid4().hex[:12]
    engine = sa.create_engine(server.create_database(name))
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE leftover (id INTEGER)"))
        idle = engine.connect()  # still open: drop_database must not hang on it
        server.drop_database(name)
        idle.close()
        engine.dispose()
        server.create_database(name)
        assert table_names(engine) == []
    finally:
        engine.dispose()
        server.drop_database(name)


def _create_jobs(engine: Engine, count: int) -> None:
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE jobs (id INTEGER PRIMARY KEY, owner VARCHAR(40) NULL)"))
        conn.execute(
            sa.text("INSERT INTO jobs (id) VALUES (:id)"), [{"id": i} for i in range(count)]
        )


CLAIM = "SELECT id FROM jobs WHERE owner IS NULL ORDER BY id LIMIT 3 FOR UPDATE SKIP LOCKED"


def test_skip_locked_hands_out_disjoint_rows(fresh: FreshEngine) -> None:
    engine = fresh()
    _create_jobs(engine, 10)

    with engine.connect() as a, engine.connect() as b:
        a.begin()
        b.begin()
        rows_a = {row[0] for row in a.execute(sa.text(CLAIM))}
        rows_b = {row[0] for row in b.execute(sa.text(CLAIM))}
        a.rollback()
        b.rollback()

    assert rows_a == {0, 1, 2}
    assert rows_b == {3, 4, 5}


def test_skip_locked_under_concurrent_claimers(fresh: FreshEngine) -> None:
    engine = fresh(pool_size=4)
    _create_jobs(engine, 60)
    claimed: dict[str, list[int]] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def claimer(owner: str) -> None:
        try:
            claim_until_empty(owner)
        except BaseException as exc:
            errors.append(exc)

    def claim_until_empty(owner: str) -> None:
        mine: list[int] = []
        start.wait()
        while True:
            with engine.begin() as conn:
                ids = [row[0] for row in conn.execute(sa.text(CLAIM))]
                if not ids:
                    break
                conn.execute(
                    sa.text("UPDATE jobs SET owner = :owner WHERE id = :id"),
                    [{"owner": owner, "id": i} for i in ids],
                )
            mine += ids
        claimed[owner] = mine

    threads = [threading.Thread(target=claimer, args=(f"w{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)

    assert errors == []
    everything = [i for ids in claimed.values() for i in ids]
    assert sorted(everything) == list(range(60))  # every row once, none twice
    with engine.connect() as conn:
        owners: dict[int, str] = dict(conn.execute(sa.text("SELECT id, owner FROM jobs")).all())
    assert all(owners[i] == owner for owner, ids in claimed.items() for i in ids)


def test_stop_makes_clients_fail_and_start_brings_data_back(
    server: DatabaseServer, fresh: FreshEngine
) -> None:
    require_restart(server)
    engine = fresh(pool_pre_ping=False)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE kept (v VARCHAR(20))"))
        conn.execute(sa.text("INSERT INTO kept (v) VALUES ('survives')"))
    held = engine.connect()
    port = server.port

    server.stop()
    try:
        assert not server.is_running()
        with pytest.raises(sa.exc.DBAPIError):
            held.execute(sa.text("SELECT 1"))
        with pytest.raises(sa.exc.DBAPIError), sa.create_engine(engine.url).connect():
            pass
    finally:
        held.invalidate()
        server.start()

    assert server.port == port
    engine.dispose()
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT v FROM kept")).scalar_one() == "survives"

"""Enqueue in a Django transaction: ``flow.run(..., connection=django.db.connection)``.

Django is configured once for this process (settings.configure) with two
databases: "default" on the PostgreSQL test server (through psycopg 3, which
Django prefers when it is installed) and "lite", a SQLite file. psycopg2,
which Django takes when psycopg 3 is missing, runs in a process of its own.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import django
import pytest
import sqlalchemy as sa
from django.conf import settings
from django.db import connections, transaction

from flowsmith_worker import ConnectionNotUsable, Flow, FlowAlreadyCompleted, Worker
from flowsmith_worker.storage import create_storage
from flowsmith_worker.storage.base import Storage
from flowsmith_worker.storage.sql.lent import lend
from tests.servers import DatabaseServer

REPO = Path(__file__).resolve().parents[2]
ORDERS_TABLE = "CREATE TABLE orders (id VARCHAR(40) PRIMARY KEY)"


def _django_database(url: str) -> dict[str, Any]:
    """Django's DATABASES entry for a SQLAlchemy URL of the test server."""
    parsed = sa.make_url(url)
    return {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": parsed.database,
        "USER": parsed.username,
        "PASSWORD": parsed.password,
        "HOST": parsed.host,
        "PORT": parsed.port,
    }


@pytest.fixture(scope="module")
def databases(
    postgres_server: DatabaseServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Storage]]:
    """The migrated storages of Django's two databases, by alias, each with an orders table."""
    name = f"dj_{uuid.uuid4().hex[:12]}"
    pg_url = postgres_server.create_database(name)
    lite_path = tmp_path_factory.mktemp("django") / "app.db"
    settings.configure(
        DATABASES={
            "default": _django_database(pg_url),
            "lite": {"ENGINE": "django.db.backends.sqlite3", "NAME": str(lite_path)},
        },
        USE_TZ=True,
    )
    django.setup()
    storages = {"default": create_storage(pg_url), "lite": create_storage(f"sqlite:///{lite_path}")}
    for alias, storage in storages.items():
        storage.migrate()
        with connections[alias].cursor() as cursor:
            cursor.execute(ORDERS_TABLE)
    # Django takes psycopg 3 when it is installed (the dev extra installs it).
    assert type(connections["default"].connection).__module__ == "psycopg"
    yield storages
    for alias, storage in storages.items():
        connections[alias].close()
        storage.close()
    postgres_server.drop_database(name)


@pytest.fixture(params=["default", "lite"], ids=["postgresql", "sqlite"])
def alias(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _order_saved(alias: str, order_id: str) -> bool:
    with connections[alias].cursor() as cursor:
        cursor.execute("SELECT count(*) FROM orders WHERE id = %s", [order_id])
        return bool(cursor.fetchone()[0])


def _save_order(alias: str, order_id: str) -> None:
    with connections[alias].cursor() as cursor:
        cursor.execute("INSERT INTO orders (id) VALUES (%s)", [order_id])


def _notify_flow(unique: Callable[[str], str], storage: Storage) -> Flow:
    return Flow(unique("notify"), storage=storage).step("email", lambda ctx: f"mailed {ctx.data}")


def test_a_run_enqueued_in_an_atomic_block_commits_with_it_and_a_worker_runs_it(
    databases: dict[str, Storage], alias: str, unique: Callable[[str], str]
) -> None:
    """The run is written on Django's connection inside its transaction: another
    connection does not see it before the block commits, sees it after, and a
    worker runs it."""
    storage = databases[alias]
    flow = _notify_flow(unique, storage)
    order_id = unique("order")
    with transaction.atomic(using=alias):
        _save_order(alias, order_id)
        run = flow.run({"order": order_id}, tracking_id=order_id, connection=connections[alias])
        assert storage.get_flow(tracking_id=order_id) is None  # (SQLite: WAL, readers go on)
    assert storage.get_flow(tracking_id=order_id) is not None
    assert _order_saved(alias, order_id)
    Worker(storage=storage, poll_interval=0.05).run_until_idle(timeout=30)
    assert run.wait(timeout=5)["email"] == f"mailed {{'order': '{order_id}'}}"


def test_a_rolled_back_block_leaves_neither_the_order_nor_the_run(
    databases: dict[str, Storage], alias: str, unique: Callable[[str], str]
) -> None:
    """An exception that rolls the atomic block back takes the enqueued runs with it
    (one by run, a batch by run_many)."""
    storage = databases[alias]
    flow = _notify_flow(unique, storage)
    order_id = unique("order")
    batch = [f"{order_id}:{n}" for n in range(3)]
    with pytest.raises(RuntimeError, match="payment declined"), transaction.atomic(using=alias):
        _save_order(alias, order_id)
        flow.run({"order": order_id}, tracking_id=order_id, connection=connections[alias])
        flow.run_many([{}] * 3, tracking_ids=batch, connection=connections[alias])
        raise RuntimeError("payment declined")
    assert all(storage.get_flow(tracking_id=t) is None for t in [order_id, *batch])
    assert not _order_saved(alias, order_id)
    assert connections[alias].get_autocommit()  # Django's connection is as Django left it


def test_outside_an_atomic_block_the_enqueue_commits_on_its_own(
    databases: dict[str, Storage], alias: str, unique: Callable[[str], str]
) -> None:
    """In Django's autocommit mode the enqueue is a transaction of its own, as an ORM
    write is, and the connection stays in autocommit mode for the next query."""
    storage = databases[alias]
    flow = _notify_flow(unique, storage)
    tracking_id = unique("run")
    flow.run({}, tracking_id=tracking_id, connection=connections[alias])
    assert storage.get_flow(tracking_id=tracking_id) is not None
    assert connections[alias].get_autocommit()
    assert not connections[alias].in_atomic_block


def test_a_refused_enqueue_rolls_the_whole_block_back(
    databases: dict[str, Storage], unique: Callable[[str], str]
) -> None:
    """Triggering a COMPLETED run again raises inside the block and the order it
    was for is not committed: no order without its flow."""
    storage = databases["default"]
    flow = _notify_flow(unique, storage)
    tracking_id = unique("run")
    flow.run({}, tracking_id=tracking_id)
    Worker(storage=storage, poll_interval=0.05).run_until_idle(timeout=30)
    order_id = unique("order")
    with pytest.raises(FlowAlreadyCompleted), transaction.atomic():
        _save_order("default", order_id)
        flow.run({}, tracking_id=tracking_id, connection=connections["default"])
    assert not _order_saved("default", order_id)


def test_the_storage_must_be_on_the_connections_database(
    databases: dict[str, Storage], unique: Callable[[str], str]
) -> None:
    """A PostgreSQL connection given to a flow whose storage is SQLite is refused,
    naming both, and nothing is written."""
    flow = _notify_flow(unique, databases["lite"])
    tracking_id = unique("run")
    with pytest.raises(ConnectionNotUsable, match=r"connection= is on postgresql but .* on sqlite"):
        flow.run({}, tracking_id=tracking_id, connection=connections["default"])
    assert databases["default"].get_flow(tracking_id=tracking_id) is None
    assert databases["lite"].get_flow(tracking_id=tracking_id) is None


def test_a_connection_of_another_kind_is_refused_saying_what_is_taken(
    databases: dict[str, Storage], unique: Callable[[str], str]
) -> None:
    """connection= given something else (a DBAPI connection) says what it takes."""
    flow = _notify_flow(unique, databases["lite"])
    connections["lite"].ensure_connection()
    with pytest.raises(
        ConnectionNotUsable, match=r"SQLAlchemy Connection .* or a Django connection"
    ):
        flow.run({}, connection=connections["lite"].connection)


PSYCOPG2_SCRIPT = """
import sys
sys.modules["psycopg"] = None  # Django falls back to psycopg2 when psycopg 3 is missing
import django
from django.conf import settings
from django.db import connection, transaction
settings.configure(DATABASES={"default": DATABASE})
django.setup()
from flowsmith_worker import Flow, Worker
from flowsmith_worker.storage import create_storage

storage = create_storage(URL)
flow = Flow("notify", storage=storage).step("email", lambda ctx: "mailed")
assert type(connection.ensure_connection() or connection.connection).__module__.startswith(
    "psycopg2"
)
with transaction.atomic():
    flow.run({}, tracking_id="kept", connection=connection)
    assert storage.get_flow(tracking_id="kept") is None
try:
    with transaction.atomic():
        flow.run({}, tracking_id="dropped", connection=connection)
        raise RuntimeError
except RuntimeError:
    pass
Worker(storage=storage, poll_interval=0.05).run_until_idle(timeout=30)
kept, dropped = storage.get_flow(tracking_id="kept"), storage.get_flow(tracking_id="dropped")
print("outcome:", kept.status, dropped)
"""


def test_django_on_psycopg2_commits_and_rolls_back_the_run_too(
    postgres_server: DatabaseServer,
) -> None:
    """The same on psycopg2, the driver Django uses when psycopg 3 is not installed."""
    name = f"dj2_{uuid.uuid4().hex[:12]}"
    url = postgres_server.create_database(name)
    try:
        create_storage(url).migrate()
        script = f"URL = {url!r}\nDATABASE = {_django_database(url)!r}\n" + PSYCOPG2_SCRIPT
        done = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(script)],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=REPO,
        )
    finally:
        postgres_server.drop_database(name)
    assert done.returncode == 0, done.stderr
    assert "outcome: COMPLETED None" in done.stdout.splitlines()


def test_a_driver_that_cannot_be_lent_is_named() -> None:
    """A DBAPI connection of a driver FlowSmith has no lent dialect for (mysql-connector:
    Django's MySQL backend uses mysqlclient) is refused, naming the drivers it takes."""
    import mysql.connector.connection

    unconnected = mysql.connector.connection.MySQLConnection()
    taken = r"holds a mysql connection .* psycopg, psycopg2, sqlite3"
    with pytest.raises(ConnectionNotUsable, match=taken), lend(unconnected):
        pass

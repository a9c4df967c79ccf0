"""How many database connections a `flowsmith worker` opens, counted on the server.

The README's formula, per worker: --concurrency + 5 from its pool, and 1 for
LISTEN on PostgreSQL (not with --no-listen or FLOWSMITH_PG_POOLER=transaction).
A real worker process whose step asks the worker's own storage for more
connections than that, all at once, is seen holding exactly that many on the
server (pg_stat_activity, MariaDB's information_schema.PROCESSLIST); and
--max-connections refuses, before connecting, settings that could exceed it.
"""

from __future__ import annotations

import os
import textwrap
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from flowsmith_worker import Flow
from flowsmith_worker.cli import main
from flowsmith_worker.storage import create_storage
from flowsmith_worker.storage.sql.pooler import POOLER_ENV
from tests.conftest import eventually
from tests.servers import DatabaseServer
from tests.worker_process import WorkerProcess

Names = Callable[[str], str]

# A step that asks the worker's own pool (flowsmith's configured storage) for
# more connections than it may open, holds them until $FS_RELEASE exists, then
# lets the waiting ones have theirs in turn.
GREEDY_MODULE = textwrap.dedent(
    """
    import os
    import threading
    import time
    from pathlib import Path

    from flowsmith_worker import Flow
    from flowsmith_worker.storage import default_storage

    def _hold(release):
        with default_storage().engine.connect():
            while not release.exists():
                time.sleep(0.02)


    def hold(ctx):
        release = Path(os.environ["FS_RELEASE"])
        threads = [
            threading.Thread(target=_hold, args=(release,))
            for _ in range(int(os.environ["FS_ASK"]))
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return "held"


    flow = Flow(os.environ["FS_FLOW_NAME"]).step("hold", hold)
    """
)

# How long the held connections are counted: several of the step threads' 20 ms
# polls and of the pool's checkouts, longer than one scheduling hiccup of a busy machine.
HELD_SAMPLING = 3.0

_COUNTS = {
    "postgresql": "SELECT count(*) FROM pg_stat_activity WHERE datname = :name",
    "mysql": "SELECT count(*) FROM information_schema.PROCESSLIST WHERE DB = :name",
}


def connections_to(server: DatabaseServer, backend: str, name: str) -> int:
    """Connections the server has open to database ``name`` (ours to count are elsewhere)."""
    with server.admin_engine().connect() as conn:
        return int(conn.execute(sa.text(_COUNTS[backend]), {"name": name}).scalar_one())


@pytest.mark.slow
@pytest.mark.parametrize(
    ("backend", "concurrency", "args", "expected"),
    [
        ("postgresql", 1, (), 1 + 5 + 1),  # the listener's LISTEN
        ("postgresql", 3, ("--no-listen",), 3 + 5),
        ("mysql", 2, (), 2 + 5),  # no NOTIFY there: no listener
    ],
)
def test_a_worker_opens_the_connections_the_readme_says_and_no_more(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    unique: Names,
    backend: str,
    concurrency: int,
    args: tuple[str, ...],
    expected: int,
) -> None:
    """A `flowsmith worker` whose step asks its pool for 10 connections more than the
    README's formula allows holds exactly the formula's count on the server (by
    pg_stat_activity or PROCESSLIST) and never more while they are held, with
    --max-connections set to that count (the largest it accepts); released, the run
    completes."""
    server: DatabaseServer = request.getfixturevalue(
        "postgres_server" if backend == "postgresql" else "mysql_server"
    )
    name = f"t_{uuid.uuid4().hex[:12]}"
    url = server.create_database(name)
    request.addfinalizer(lambda: server.drop_database(name))
    storage = create_storage(url)
    storage.migrate()
    flow_name = unique("greedy")
    run = Flow(flow_name, storage=storage).step("hold", _not_here).run({})
    storage.close()  # the test's own connections are not counted
    (tmp_path / "greedyflows.py").write_text(GREEDY_MODULE)
    release = tmp_path / "release"
    env = dict(
        os.environ, FS_FLOW_NAME=flow_name, FS_RELEASE=str(release), FS_ASK=str(expected + 10)
    )
    env.pop(POOLER_ENV, None)
    limit = ("--max-connections", str(expected), "--concurrency", str(concurrency))
    worker = WorkerProcess(tmp_path, url, env, *limit, *args, module="greedyflows")
    try:
        eventually(lambda: connections_to(server, backend, name) == expected, timeout=30)
        # The 10 threads over the limit wait in the pool's queue meanwhile: sampled
        # for HELD_SAMPLING seconds, no count may pass the formula's.
        seen = []
        deadline = time.monotonic() + HELD_SAMPLING
        while time.monotonic() < deadline:
            seen.append(connections_to(server, backend, name))
            time.sleep(0.05)
        assert max(seen) == expected, seen
        release.touch()
        assert run.wait(timeout=30) == {"hold": "held"}, worker.output()[-3000:]
    finally:
        release.touch()
        worker.cleanup()
        storage.close()


def _not_here(_ctx: object) -> None:
    raise AssertionError("steps run in the worker process, not in the test")


def worker_command(*args: str) -> tuple[int, str]:
    """`flowsmith worker` with a module that does not exist: it must stop before importing
    it, and before connecting (nothing listens on port 1)."""
    url = "postgresql://nobody@127.0.0.1:1/none"
    result = CliRunner().invoke(main, ["worker", "nosuchmodule", "--url", url, *args])
    return result.exit_code, result.output


def test_max_connections_refuses_settings_above_it_before_connecting() -> None:
    """--concurrency 8 on PostgreSQL may open 8 + 5 + 1 = 14 connections: with
    --max-connections 13 the worker exits 1 with what to change, before it imports a
    module or connects; at 14 it gets as far as the import."""
    code, output = worker_command("--concurrency", "8", "--max-connections", "13")
    assert code == 1
    assert "--max-connections 13 is too few" in output
    assert "may open 14 database connections" in output
    assert "lower --concurrency to 7, pass --no-listen, or raise --max-connections to 14" in output
    assert "Traceback" not in output
    code, output = worker_command("--concurrency", "8", "--max-connections", "14")
    assert code == 1 and "cannot import module 'nosuchmodule'" in output


@pytest.mark.parametrize(
    ("args", "environment"),
    [
        (("--no-listen",), {}),
        ((), {POOLER_ENV: "transaction"}),
        (("--url", "mysql://nobody@127.0.0.1:1/none"), {}),
    ],
    ids=["no-listen", "transaction-pooler", "mysql"],
)
def test_max_connections_counts_no_listener_where_there_is_none(
    args: tuple[str, ...], environment: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a LISTEN connection (--no-listen, FLOWSMITH_PG_POOLER=transaction, or
    MariaDB), --concurrency 8 fits FLOWSMITH_MAX_CONNECTIONS=13 (the environment works
    as the option does); 12 is refused, with no advice to pass --no-listen."""
    for key, value in environment.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("FLOWSMITH_MAX_CONNECTIONS", "13")
    code, output = worker_command("--concurrency", "8", *args)
    assert code == 1 and "cannot import module 'nosuchmodule'" in output
    monkeypatch.setenv("FLOWSMITH_MAX_CONNECTIONS", "12")
    code, output = worker_command("--concurrency", "8", *args)
    assert code == 1 and "may open 13 database connections" in output
    assert "lower --concurrency to 7, or raise --max-connections to 13" in output

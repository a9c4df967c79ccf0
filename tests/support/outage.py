"""Crash a database server, and make a test database's commits survive it."""

from __future__ import annotations

import os
import signal

import sqlalchemy as sa

from tests.servers import DatabaseServer, LocalServer


def crash_and_restart(server: LocalServer) -> None:
    """Crash the server as a power cut would, then start it on the same data.

    PostgreSQL: SIGQUIT to the postmaster, its immediate shutdown (what
    ``pg_ctl stop -m immediate`` sends): sessions killed at once, no
    checkpoint, crash recovery at the next start. MariaDB: SIGKILL.
    """
    pid = server._pid()
    assert pid is not None
    server._before_stop()  # tests/servers/'s own background work, not the worker's
    server._dispose_engine()
    os.kill(pid, signal.SIGQUIT if server.kind == "postgresql" else signal.SIGKILL)
    assert server._wait_exit(pid, 30), f"{server.kind} did not die"
    server._proc = None
    server.start()


def durable_commits(server: DatabaseServer, name: str) -> None:
    """Make the commits on database ``name`` survive a crash of the server.

    The test servers trade durability for speed (synchronous_commit=off,
    innodb_flush_log_at_trx_commit=0): a crash then loses the last commits,
    claims and outcomes included, and a step whose completion was lost runs
    again. No worker can prevent that; production servers commit durably.
    PostgreSQL: for this database only. MariaDB: the whole server, until its
    next start (its command line sets the fast value again).
    """
    with server.admin_engine().connect() as conn:
        if server.kind == "postgresql":
            conn.execute(sa.text(f'ALTER DATABASE "{name}" SET synchronous_commit = on'))
        else:
            conn.execute(sa.text("SET GLOBAL innodb_flush_log_at_trx_commit = 1"))

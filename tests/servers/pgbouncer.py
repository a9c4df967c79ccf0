"""A PgBouncer in transaction pooling mode in front of the session's PostgreSQL.

Why this exists: operators put PgBouncer (transaction mode) between workers and
PostgreSQL, where each transaction may run on another server connection and
nothing set on a session (PREPARE, LISTEN, SET) survives it. Debian 12's
PgBouncer 1.18 has no prepared-statement support in that mode, so it shows
exactly what such a pooler does to the engine.

The bouncer runs from the distribution package (``apt-get install pgbouncer``)
on a free loopback port, with its ini and auth files in a temporary directory
removed at the end. Its ``*`` database entry forwards every database name to
the test server, so a database created there is reachable through the bouncer
under the same name. Missing binaries skip the tests, or fail them when
FLOWSMITH_REQUIRE_DATABASES=1 (CI).

With FLOWSMITH_TEST_THROUGH_PGBOUNCER=1 every PostgreSQL database the suite's
fixtures hand out (``storage``, ``sql_url``, ``database_url``) is reached
through the bouncer, so any part of the suite can be run through it::

    FLOWSMITH_TEST_THROUGH_PGBOUNCER=1 FLOWSMITH_PG_POOLER=transaction \
        .venv/bin/python -m pytest -m postgres tests/

Tests about session state (prepared statements, session advisory locks,
pg_terminate_backend of the storage's own sessions) skip there
(``skip_through_pgbouncer``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from tests.servers.admin import (
    REQUIRE_ENV,
    START_TIMEOUT,
    STOP_TIMEOUT,
    DatabaseServer,
    ServerStartError,
    ServerUnavailable,
    answers,
)
from tests.servers.fixtures import DatabaseNotTestedWarning
from tests.servers.process import free_port, log_tail, spawn_server

INSTALL_HINT = "apt-get install pgbouncer"
THROUGH_ENV = "FLOWSMITH_TEST_THROUGH_PGBOUNCER"
# PgBouncer refuses to run as root; Debian's package runs it as ``postgres``.
_RUN_AS = "postgres"
# More than a few workers' pools at once, fewer than the server's 300 connections.
_SERVER_POOL_SIZE = 40

_INI = """\
[databases]
* = host={server_host} port={server_port}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = scram-sha-256
auth_file = {auth_file}
pool_mode = transaction
default_pool_size = {pool_size}
max_client_conn = 1000
pidfile = {pid_file}
"""


_PREPARED_HERE = "SELECT pg_backend_pid(), ARRAY(SELECT name::text FROM pg_prepared_statements)"
_LISTENING_HERE = "SELECT pg_backend_pid(), ARRAY(SELECT pg_listening_channels()::text)"


def through_pgbouncer() -> bool:
    """Whether FLOWSMITH_TEST_THROUGH_PGBOUNCER=1 asks to reach PostgreSQL through the bouncer."""
    return os.environ.get(THROUGH_ENV) == "1"


def find_pgbouncer() -> Path:
    """The pgbouncer binary (Debian puts it in /usr/sbin, off a normal user's PATH)."""
    found = shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin")
    if found is None:
        raise ServerUnavailable(f"pgbouncer not found: {INSTALL_HINT}")
    return Path(found)


class PgBouncer:
    """A pgbouncer process in transaction mode, forwarding to ``server``."""

    def __init__(self, server: DatabaseServer, binary: Path) -> None:
        self.server = server
        self.binary = binary
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="flowsmith-pgbouncer-"))
        self._proc: subprocess.Popen[bytes] | None = None
        self._write_config()

    @property
    def log_path(self) -> Path:
        """PgBouncer's own log; its tail goes into startup errors."""
        return self.dir / "pgbouncer.log"

    def url_for(self, name: str) -> str:
        """The URL of database ``name`` of the server, reached through the bouncer."""
        url = make_url(self.server.url_for(name)).set(host="127.0.0.1", port=self.port)
        return url.render_as_string(hide_password=False)

    def prepared_statements(self, name: str) -> dict[int, list[str]]:
        """What every server connection the bouncer holds to database ``name`` has
        PREPAREd, by backend pid."""
        return self.ask_every_server_connection(name, _PREPARED_HERE)

    def listening_channels(self, name: str) -> dict[int, list[str]]:
        """The channels every server connection the bouncer holds to database ``name``
        LISTENs on, by backend pid."""
        return self.ask_every_server_connection(name, _LISTENING_HERE)

    def ask_every_server_connection(self, name: str, query: str) -> dict[int, list[str]]:
        """``query`` (which returns the backend's pid and a list of names) run on every
        server connection the bouncer holds to database ``name``.

        Session state (pg_prepared_statements, pg_listening_channels) shows only
        the asking session's own, so one transaction per server connection is held
        open through the bouncer at the same time: each then runs on another of
        them, idle ones first.
        """
        with self.server.admin_engine().connect() as admin:
            backends = set(
                admin.execute(
                    sa.text("SELECT pid FROM pg_stat_activity WHERE datname = :n"), {"n": name}
                ).scalars()
            )
        engine = sa.create_engine(self.url_for(name), poolclass=NullPool)
        try:
            with contextlib.ExitStack() as stack:
                held: dict[int, list[str]] = {}
                for _ in backends:
                    conn = stack.enter_context(engine.connect())
                    pid, names = conn.execute(sa.text(query)).one()
                    held[int(pid)] = sorted(names)
        finally:
            engine.dispose()
        if set(held) != backends:
            raise AssertionError(f"reached backends {sorted(held)}, not all of {sorted(backends)}")
        return held

    def start(self) -> None:
        """Start pgbouncer and wait until a login through it reaches the server."""
        for attempt in range(3):
            self._proc = self._spawn()
            if self._wait_ready(self._proc):
                return
            self.stop()
            log = self.log_path.read_text(errors="replace")
            if attempt == 2 or "Address already in use" not in log:
                break
            # Somebody took the port between free_port() and pgbouncer's bind().
            self.port = free_port()
            self._write_config()
        raise ServerStartError(
            f"pgbouncer on port {self.port} did not start.\n"
            f"Last lines of {self.log_path}:\n{log_tail(self.log_path)}"
        )

    def _spawn(self) -> subprocess.Popen[bytes]:
        return spawn_server(
            [str(self.binary), str(self.dir / "pgbouncer.ini")],
            self.log_path,
            user=_RUN_AS if os.geteuid() == 0 else None,
            stop_with_parent=signal.SIGTERM,
            append=False,  # each start's log alone: start() reads it for "Address already in use"
        )

    def _wait_ready(self, proc: subprocess.Popen[bytes]) -> bool:
        """Poll with real logins through the bouncer until one succeeds (True), or the
        bouncer exits or time is up (False)."""
        deadline = time.monotonic() + START_TIMEOUT
        admin = self.url_for(make_url(self.server.admin_url).database or "postgres")
        while not answers(admin, "postgresql"):
            if proc.poll() is not None or time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def stop(self) -> None:
        """Immediate shutdown (SIGTERM in PgBouncer 1.18): clients are cut off."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(10)
        self._proc = None

    def destroy(self) -> None:
        """Stop and remove the config, auth file and log."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _write_config(self) -> None:
        # The server's own login (ours, or the one in $FLOWSMITH_TEST_POSTGRES_URL).
        login = make_url(self.server.admin_url)
        auth_file = self.dir / "users.txt"
        # A plain password lets PgBouncer answer the client's SCRAM and run its own
        # SCRAM exchange with the server.
        auth_file.write_text(f'"{login.username}" "{login.password}"\n')
        (self.dir / "pgbouncer.ini").write_text(
            _INI.format(
                server_host=login.host or "127.0.0.1",
                server_port=login.port or 5432,
                port=self.port,
                auth_file=auth_file,
                pool_size=_SERVER_POOL_SIZE,
                pid_file=self.dir / "pgbouncer.pid",
            )
        )
        if os.geteuid() == 0:
            for path in (self.dir, auth_file, self.dir / "pgbouncer.ini"):
                shutil.chown(path, _RUN_AS, _RUN_AS)
            auth_file.chmod(0o600)


@pytest.fixture(scope="session")
def pgbouncer(postgres_server: DatabaseServer) -> Iterator[PgBouncer]:
    """One PgBouncer in transaction mode per session, in front of ``postgres_server``."""
    try:
        binary = find_pgbouncer()
    except ServerUnavailable as exc:
        reason = exc.reason
    else:
        bouncer = PgBouncer(postgres_server, binary)
        try:
            bouncer.start()
            yield bouncer
        finally:
            bouncer.destroy()
        return
    _skip_or_fail(reason)  # outside `except`: no chained traceback in the report


class BouncedDatabase(NamedTuple):
    """A test's database, reached through the bouncer (``url``) or not (``direct_url``)."""

    name: str
    url: str
    direct_url: str


@pytest.fixture
def bouncer_database(request: pytest.FixtureRequest, pgbouncer: PgBouncer) -> BouncedDatabase:
    """A fresh database for this test, dropped at its end."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    direct_url = pgbouncer.server.create_database(name)
    request.addfinalizer(lambda: pgbouncer.server.drop_database(name))
    return BouncedDatabase(name, pgbouncer.url_for(name), direct_url)


def _skip_or_fail(reason: str) -> None:
    message = f"PGBOUNCER TESTS NOT RUN: {reason}"
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{message}; {REQUIRE_ENV}=1 requires it", pytrace=False)
    warnings.warn(DatabaseNotTestedWarning(message), stacklevel=2)
    pytest.skip(message)


def skip_through_pgbouncer(what: str) -> pytest.MarkDecorator:
    """Skip a test about session state when FLOWSMITH_TEST_THROUGH_PGBOUNCER=1: in
    transaction mode the bouncer hands each transaction any server connection."""
    return pytest.mark.skipif(
        through_pgbouncer(),
        reason=f"{what}: session state, which PgBouncer in transaction mode does not keep",
    )

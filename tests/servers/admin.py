"""What the tests need from any database server, whoever runs it.

``DatabaseServer`` creates and drops a fresh database per test on an admin
connection; ``ExternalServer`` is one given by URL (Docker, ``make db-up``), which
tests must never stop. The login and the drivers every server here shares are
fixed below, so tests can check that the password never reaches a log.
"""

from __future__ import annotations

import contextlib
import re
import threading
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.pool import NullPool

USER = "flowsmith"
PASSWORD = "flowsmith-secret"
URL_ENV = {"postgresql": "FLOWSMITH_TEST_POSTGRES_URL", "mysql": "FLOWSMITH_TEST_MYSQL_URL"}
REQUIRE_ENV = "FLOWSMITH_REQUIRE_DATABASES"
DATA_ROOT_ENV = "FLOWSMITH_TEST_DATA_ROOT"
DRIVERS = {"postgresql": "postgresql+psycopg2", "mysql": "mysql+mysqlconnector"}
ADMIN_DATABASE = {"postgresql": "postgres", "mysql": "mysql"}
INSTALL_HINT = {
    "postgresql": "apt-get install postgresql",
    "mysql": "apt-get install mariadb-server",
}
START_TIMEOUT = 60.0
STOP_TIMEOUT = 60.0
MAX_CONNECTIONS = 300
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}\Z")


class ServerUnavailable(Exception):
    """The server binaries are not installed; ``reason`` says what to install."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ServerStartError(RuntimeError):
    """Binaries exist but the server did not come up: a real failure, never a skip."""


class CannotRestartExternalServer(RuntimeError):
    """Raised by stop()/start() on a server given by URL: we do not own it."""


class DatabaseServer:
    """What tests need from any server: an admin URL and per-test databases.

    Kept separate from process control so a server given by URL
    (``ExternalServer``) and one we started (``LocalServer``) look the same.
    """

    can_restart = False

    def __init__(self, kind: str, admin_url: str) -> None:
        if kind not in DRIVERS:
            raise ValueError(f"unknown server kind {kind!r}")
        self.kind = kind
        self.admin_url = admin_url
        self.port: int | None = None
        self.data_dir: Path | None = None
        self._engine: Engine | None = None
        self._engine_lock = threading.Lock()

    def start(self) -> None:
        """Start the server and wait until it accepts logins."""
        raise NotImplementedError

    def stop(self) -> None:
        """Stop the server; clients see the database go away."""
        raise NotImplementedError

    def restart(self) -> None:
        """stop() then start()."""
        self.stop()
        self.start()

    def is_running(self) -> bool:
        """Whether the server is up."""
        raise NotImplementedError

    def url_for(self, name: str) -> str:
        """The SQLAlchemy URL of database ``name`` on this server (password included)."""
        url = make_url(self.admin_url).set(database=checked_name(name))
        return url.render_as_string(hide_password=False)

    def create_database(self, name: str, *, exist_ok: bool = False) -> str:
        """Create an empty database and return its SQLAlchemy URL."""
        if exist_ok and self._database_exists(name):
            return self.url_for(name)
        self._create(checked_name(name))
        return self.url_for(name)

    def drop_database(self, name: str) -> None:
        """Drop ``name`` even if clients are still connected (they get cut off)."""
        name = checked_name(name)
        with self.admin_engine().connect() as conn:
            if self.kind == "postgresql":
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            else:
                kill_mysql_sessions(conn, name)
                conn.execute(sa.text(f"DROP DATABASE IF EXISTS `{name}`"))

    def admin_engine(self) -> Engine:
        """A small autocommit engine on the admin database, shared by all calls."""
        with self._engine_lock:
            if self._engine is None:
                self._engine = sa.create_engine(
                    self.admin_url,
                    isolation_level="AUTOCOMMIT",
                    pool_size=2,
                    max_overflow=4,
                    pool_pre_ping=True,
                    connect_args=connect_timeout(self.kind, 10),
                )
            return self._engine

    def _dispose_engine(self) -> None:
        """Forget pooled connections, which die with the server anyway."""
        with self._engine_lock:
            if self._engine is not None:
                self._engine.dispose()
                self._engine = None

    def _database_exists(self, name: str) -> bool:
        if self.kind == "postgresql":
            query = "SELECT 1 FROM pg_database WHERE datname = :n"
        else:
            query = "SELECT 1 FROM information_schema.schemata WHERE schema_name = :n"
        with self.admin_engine().connect() as conn:
            return conn.execute(sa.text(query), {"n": name}).first() is not None

    def _create(self, name: str) -> None:
        if self.kind == "postgresql":
            statement = f'CREATE DATABASE "{name}"'
        else:
            statement = f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4"
        with self.admin_engine().connect() as conn:
            conn.execute(sa.text(statement))


def checked_name(name: str) -> str:
    """Database names are pasted into SQL, so only plain identifiers are allowed."""
    if not _NAME.match(name):
        raise ValueError(f"database name must match {_NAME.pattern}: {name!r}")
    return name


def connect_timeout(kind: str, seconds: int) -> dict[str, int]:
    """Each driver spells its connect timeout differently."""
    key = "connect_timeout" if kind == "postgresql" else "connection_timeout"
    return {key: seconds}


def kill_mysql_sessions(conn: sa.Connection, name: str) -> None:
    """MySQL has no DROP ... FORCE: kill sessions using ``name`` so DROP cannot hang."""
    rows = conn.execute(
        sa.text(
            "SELECT id FROM information_schema.processlist WHERE db = :n AND id <> CONNECTION_ID()"
        ),
        {"n": name},
    )
    for (session_id,) in rows.all():
        # Already gone, or not ours to kill on an external server: fine either way.
        with contextlib.suppress(sa.exc.DBAPIError):
            conn.execute(sa.text(f"KILL CONNECTION {int(session_id)}"))


def _normalize_url(kind: str, url: str) -> str:
    """Accept ``postgresql://`` / ``mysql://`` and pin the drivers the project ships."""
    parsed = make_url(url)
    if parsed.get_backend_name() != kind:
        raise ValueError(f"{URL_ENV[kind]} must be a {kind} URL, got {parsed.drivername!r}")
    if "+" not in parsed.drivername:
        parsed = parsed.set(drivername=DRIVERS[kind])
    return parsed.render_as_string(hide_password=False)


class ExternalServer(DatabaseServer):
    """A server somebody else runs (Docker, ``make db-up``), reached by URL.

    Its own database (e.g. ``flowsmith``) serves as the admin database; other
    databases are created next to it. It cannot be stopped or restarted.
    """

    def __init__(self, kind: str, url: str) -> None:
        super().__init__(kind, _normalize_url(kind, url))
        self.port = make_url(self.admin_url).port

    def start(self) -> None:
        """Refuse: we did not start this server."""
        raise CannotRestartExternalServer(f"cannot restart an external server ({self.kind})")

    def stop(self) -> None:
        """Refuse: stopping a shared server would break whoever else uses it."""
        raise CannotRestartExternalServer(f"cannot stop an external server ({self.kind})")

    def is_running(self) -> bool:
        """True when the server answers a login."""
        return answers(self.admin_url, self.kind)


def answers(url: str, kind: str) -> bool:
    """One login attempt, no pooling: is the server up and accepting us?"""
    engine = sa.create_engine(url, poolclass=NullPool, connect_args=connect_timeout(kind, 2))
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        return True
    except sa.exc.DBAPIError:
        return False
    finally:
        engine.dispose()

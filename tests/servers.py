"""Real PostgreSQL and MariaDB servers, started from local binaries.

Why this exists: the engine's guarantees (SKIP LOCKED claiming, lease expiry,
surviving a database restart) only mean something when checked against real
servers, and CI machines here have no Docker. So the test suite, and
``make db-up`` when no Docker engine answers, start throwaway servers from the
distribution packages (``apt-get install postgresql mariadb-server``).

Layout under a base directory (``tmp_path_factory`` in tests, ``.dbdata/`` for
``make db-up``)::

    postgresql/        data directory (see _new_data_dir for when it lives elsewhere:
                       tests put data on /dev/shm, which is 10-30x faster here)
    postgresql.log     server output
    postgresql.json    port / data dir / settings, so ``down`` and a second
                       ``up`` find the server again
    mariadb/ mariadb.log mysql.json   the same for MariaDB

Every server has a superuser ``flowsmith`` with password ``flowsmith-secret``
that has to be sent over TCP, so tests can check passwords never reach logs.

pytest: the session fixtures ``postgres_server`` / ``mysql_server`` start one
server of each kind per session, or use $FLOWSMITH_TEST_POSTGRES_URL /
$FLOWSMITH_TEST_MYSQL_URL. Missing binaries skip those tests, or fail them
when FLOWSMITH_REQUIRE_DATABASES=1 (CI).

Command line::

    python tests/servers.py up [--dir DIR] [--durable]   # prints FLOWSMITH_TEST_*_URL=...
    python tests/servers.py down [--dir DIR]
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import ctypes
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import NoReturn, Protocol

import pytest
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
_REPO_ROOT = Path(__file__).resolve().parent.parent


class ServerUnavailable(Exception):
    """The server binaries are not installed; ``reason`` says what to install."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ServerStartError(RuntimeError):
    """Binaries exist but the server did not come up: a real failure, never a skip."""


class DatabaseNotTestedWarning(UserWarning):
    """Shown in pytest's warnings summary when a server kind was skipped."""


class CannotRestartExternalServer(RuntimeError):
    """Raised by stop()/start() on a server given by URL: we do not own it."""


# --------------------------------------------------------------------------- admin


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
        url = make_url(self.admin_url).set(database=_checked_name(name))
        return url.render_as_string(hide_password=False)

    def create_database(self, name: str, *, exist_ok: bool = False) -> str:
        """Create an empty database and return its SQLAlchemy URL."""
        if exist_ok and self._database_exists(name):
            return self.url_for(name)
        self._create(_checked_name(name))
        return self.url_for(name)

    def drop_database(self, name: str) -> None:
        """Drop ``name`` even if clients are still connected (they get cut off)."""
        name = _checked_name(name)
        with self.admin_engine().connect() as conn:
            if self.kind == "postgresql":
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            else:
                _kill_mysql_sessions(conn, name)
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
                    connect_args=_connect_timeout(self.kind, 10),
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


def _checked_name(name: str) -> str:
    """Database names are pasted into SQL, so only plain identifiers are allowed."""
    if not _NAME.match(name):
        raise ValueError(f"database name must match {_NAME.pattern}: {name!r}")
    return name


def _connect_timeout(kind: str, seconds: int) -> dict[str, int]:
    """Each driver spells its connect timeout differently."""
    key = "connect_timeout" if kind == "postgresql" else "connection_timeout"
    return {key: seconds}


def _kill_mysql_sessions(conn: sa.Connection, name: str) -> None:
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
        return _answers(self.admin_url, self.kind)


def _answers(url: str, kind: str) -> bool:
    """One login attempt, no pooling: is the server up and accepting us?"""
    engine = sa.create_engine(url, poolclass=NullPool, connect_args=_connect_timeout(kind, 2))
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        return True
    except sa.exc.DBAPIError:
        return False
    finally:
        engine.dispose()


# --------------------------------------------------------------------------- processes


def _free_port() -> int:
    """Let the kernel pick an unused loopback port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _die_with_parent(sig: signal.Signals) -> Callable[[], None] | None:
    """A preexec hook making the kernel signal the server when the test process dies.

    atexit does not run on SIGKILL or a hard crash; PR_SET_PDEATHSIG does. It
    fires when the *thread* that started the server ends, so it is used only
    from the main thread (a restart() from a test's helper thread relies on
    atexit alone).
    """
    if not sys.platform.startswith("linux"):
        return None
    if threading.current_thread() is not threading.main_thread():
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    pr_set_pdeathsig = 1

    def hook() -> None:
        prctl(pr_set_pdeathsig, int(sig), 0, 0, 0)

    return hook


def _process_alive(pid: int, names: tuple[str, ...]) -> bool:
    """True if ``pid`` runs one of ``names`` (a stale pid file may point elsewhere)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        if sys.platform.startswith("linux"):
            return False
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        return True
    return any(name.encode() in cmdline for name in names)


def _log_tail(path: Path, lines: int = 30) -> str:
    """The end of a server log, for error messages that explain themselves."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def _run(cmd: list[str], *, user: str | None) -> None:
    """Run a setup command (initdb, install-db), failing with its output."""
    result = subprocess.run(
        cmd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        cwd="/",
        user=user,
        group=user,
        extra_groups=[] if user else None,
        check=False,
    )
    if result.returncode != 0:
        output = (result.stdout + result.stderr)[-4000:]
        raise ServerStartError(f"{cmd[0]} failed ({result.returncode}):\n{output}")


_OWNED: list[LocalServer] = []


def _stop_owned() -> None:
    """atexit: servers started for tests must not outlive the test process."""
    for server in list(_OWNED):
        try:
            server.stop()
        except Exception as exc:  # best effort at interpreter exit
            print(f"servers.py: could not stop {server.kind}: {exc}", file=sys.stderr)


atexit.register(_stop_owned)


class LocalServer(DatabaseServer):
    """A server process we run from local binaries, on 127.0.0.1:``port``.

    ``stop()``/``start()`` keep port and data, so a test can take the database
    away and bring it back. Build with ``start_postgres``/``start_mariadb``.
    """

    can_restart = True
    port: int
    data_dir: Path
    _stop_signal = signal.SIGTERM
    _process_names: tuple[str, ...] = ()

    def __init__(
        self,
        kind: str,
        base_dir: Path,
        data_dir: Path,
        port: int,
        fast: bool,
        detached: bool,
        settings: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(kind, "")
        self.base_dir = base_dir
        self.data_dir = data_dir
        self.fast = fast
        self.detached = detached
        # Server settings on top of ours (the benchmark's pg_stat_statements), kept
        # across stop()/start() and in the state file.
        self.settings = dict(settings or {})
        self._proc: subprocess.Popen[bytes] | None = None
        self._use_port(port)

    def _use_port(self, port: int) -> None:
        """Set the loopback TCP port (kept across stop()/start()) and the URLs using it."""
        self.port = port
        self.admin_url = self.url_for(ADMIN_DATABASE[self.kind])

    def url_for(self, name: str) -> str:
        """``driver://flowsmith:flowsmith-secret@127.0.0.1:PORT/name``."""
        name = _checked_name(name)
        return f"{DRIVERS[self.kind]}://{USER}:{PASSWORD}@127.0.0.1:{self.port}/{name}"

    @property
    def log_path(self) -> Path:
        """Server stdout/stderr; its tail goes into startup errors."""
        return self.base_dir / f"{self.kind_dir}.log"

    @property
    def kind_dir(self) -> str:
        """File-name stem under base_dir: ``postgresql`` or ``mariadb``."""
        return "postgresql" if self.kind == "postgresql" else "mariadb"

    # -- lifecycle --------------------------------------------------------------

    def start(self) -> None:
        """Start the server (no-op if running) and wait until it accepts logins."""
        if self.is_running():
            self._wait_ready(time.monotonic() + START_TIMEOUT)
            self._after_start()
            return
        if not self.detached and self not in _OWNED:
            _OWNED.append(self)
        for attempt in range(3):
            offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            self._proc = self._spawn()
            try:
                self._wait_ready(time.monotonic() + START_TIMEOUT)
                break
            except ServerStartError:
                if attempt == 2 or not self._lost_port_race(offset):
                    raise
                self._use_port(_free_port())
                self.save_state()
        self._after_start()

    def stop(self) -> None:
        """Fast shutdown: clients are cut off and see the database go away."""
        self._before_stop()
        self._dispose_engine()
        pid = self._pid()
        if pid is None:
            return
        try:
            os.kill(pid, self._stop_signal)
            if not self._wait_exit(pid, STOP_TIMEOUT):
                os.kill(pid, signal.SIGKILL)
                self._wait_exit(pid, 10)
        except ProcessLookupError:
            pass  # exited on its own in the meantime
        self._proc = None

    def is_running(self) -> bool:
        """True while the server process exists (not whether it answers yet)."""
        if self._proc is not None and self._proc.poll() is None:
            return True
        pid = self._pid()
        return pid is not None

    def destroy(self) -> None:
        """Stop and delete the data directory (end of a test session)."""
        self.stop()
        if self in _OWNED:
            _OWNED.remove(self)
        shutil.rmtree(self.data_dir, ignore_errors=True)

    # -- state ------------------------------------------------------------------

    def save_state(self) -> None:
        """Record port and data dir so ``down`` and a later ``up`` find this server."""
        state = {
            "kind": self.kind,
            "port": self.port,
            "data_dir": str(self.data_dir),
            "fast": self.fast,
            "settings": self.settings,
        }
        _state_path(self.base_dir, self.kind).write_text(json.dumps(state, indent=2) + "\n")

    @staticmethod
    def load(base_dir: Path, kind: str, *, detached: bool = True) -> LocalServer | None:
        """The server recorded under ``base_dir``, if its data directory still exists."""
        path = _state_path(base_dir, kind)
        if not path.exists():
            return None
        state = json.loads(path.read_text())
        data_dir = Path(state["data_dir"])
        if not data_dir.is_dir():
            return None
        cls: type[LocalServer] = PostgresServer if kind == "postgresql" else MariaDBServer
        return cls(
            kind,
            base_dir,
            data_dir,
            int(state["port"]),
            bool(state["fast"]),
            detached,
            state.get("settings", {}),
        )

    # -- helpers ----------------------------------------------------------------

    def _spawn(self) -> subprocess.Popen[bytes]:
        """Launch the server in its own session, output appended to the log."""
        user = self._run_as()
        with self.log_path.open("ab") as log:
            return subprocess.Popen(
                self._command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd="/",
                start_new_session=True,
                user=user,
                group=user,
                extra_groups=[] if user else None,
                preexec_fn=None if self.detached else _die_with_parent(self._stop_signal),
            )

    def _wait_ready(self, deadline: float) -> None:
        """Poll with real logins until one succeeds, the process dies or time is up."""
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                self._fail(f"exited with code {self._proc.returncode} during startup")
            if _answers(self.admin_url, self.kind):
                return
            time.sleep(0.05)
        self.stop()
        self._fail(f"did not accept connections within {START_TIMEOUT:.0f}s")

    def _fail(self, what: str) -> NoReturn:
        raise ServerStartError(
            f"{self.kind} server on port {self.port} {what}.\n"
            f"Last lines of {self.log_path}:\n{_log_tail(self.log_path)}"
        )

    def _lost_port_race(self, offset: int) -> bool:
        """Did someone take our port between _free_port() and bind()?"""
        with self.log_path.open("rb") as log:
            log.seek(offset)
            return b"Address already in use" in log.read()

    def _wait_exit(self, pid: int, timeout: float) -> bool:
        """Wait for ``pid`` to exit; reap it if it is our child."""
        if self._proc is not None and self._proc.pid == pid:
            try:
                self._proc.wait(timeout)
                return True
            except subprocess.TimeoutExpired:
                return False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not _process_alive(pid, self._process_names):
                return True
            time.sleep(0.05)
        return False

    def _pid(self) -> int | None:
        """The live server pid, from our child or the server's pid file."""
        if self._proc is not None and self._proc.poll() is None:
            return self._proc.pid
        try:
            pid = int(self._pid_file().read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if _process_alive(pid, self._process_names) else None

    # -- per-kind hooks -----------------------------------------------------------

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _pid_file(self) -> Path:
        raise NotImplementedError

    def _run_as(self) -> str | None:
        return None

    def _after_start(self) -> None:
        pass

    def _before_stop(self) -> None:
        pass


def _state_path(base_dir: Path, kind: str) -> Path:
    return base_dir / f"{kind}.json"


# --------------------------------------------------------------------------- PostgreSQL


def find_postgres() -> Path:
    """The bin directory of the newest PostgreSQL: Debian's layout first, then PATH."""
    candidates = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/postgres"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    if candidates:
        return candidates[-1].parent
    on_path = shutil.which("postgres")
    if on_path and shutil.which("initdb"):
        return Path(on_path).parent
    raise ServerUnavailable(f"PostgreSQL server binaries not found: {INSTALL_HINT['postgresql']}")


def _postgres_user() -> str | None:
    """PostgreSQL refuses to run as root, so as root we run it as ``postgres``."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        raise ServerUnavailable(
            "running as root needs the 'postgres' system user: " + INSTALL_HINT["postgresql"]
        ) from None
    return "postgres"


def _traversable_by(path: Path, user: str) -> bool:
    """Can ``user`` reach ``path``? (pytest's /tmp/pytest-of-root is 0700.)"""
    entry = pwd.getpwnam(user)
    groups = set(os.getgrouplist(user, entry.pw_gid))
    for directory in (path, *path.parents):
        st = directory.stat()
        if st.st_uid == entry.pw_uid:
            bit = 0o100
        elif st.st_gid in groups:
            bit = 0o010
        else:
            bit = 0o001
        if not st.st_mode & bit:
            return False
    return True


def _new_data_dir(
    base_dir: Path, stem: str, data_root: Path | None, detached: bool, user: str | None
) -> Path:
    """An empty directory for a new server's data, owned by the server's user.

    It is ``base_dir/stem`` unless a ``data_root`` is asked for (tmpfs, for
    speed) or ``user`` cannot reach base_dir (as root, pytest's
    /tmp/pytest-of-root is 0700 and PostgreSQL runs as ``postgres``). Such
    directories of test servers carry our pid, so a later session can delete
    them if this process was killed before cleaning up.
    """
    if data_root is None and (user is None or _traversable_by(base_dir, user)):
        data_dir = base_dir / stem
        data_dir.mkdir(mode=0o700)
    else:
        root = data_root or Path(tempfile.gettempdir())
        prefix = f"flowsmith-{stem}-" if detached else f"{_TEST_DIR_PREFIX}{os.getpid()}-{stem}-"
        data_dir = Path(tempfile.mkdtemp(prefix=prefix, dir=root))
        if user is not None and not _traversable_by(root, user):
            shutil.rmtree(data_dir)
            raise ServerStartError(f"user {user} can reach neither {base_dir} nor {root}")
    if user is not None:
        shutil.chown(data_dir, user, user)
    return data_dir


_TEST_DIR_PREFIX = "flowsmith-test-"


def remove_stale_data_dirs(root: Path) -> None:
    """Delete test data dirs under ``root`` whose creating process is gone.

    A killed test run cannot clean up; on tmpfs its data would hold memory
    until reboot.
    """
    for path in root.glob(_TEST_DIR_PREFIX + "*"):
        pid = path.name.removeprefix(_TEST_DIR_PREFIX).split("-")[0]
        if pid.isdigit() and not _pid_exists(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def _password_file(user: str | None) -> Iterator[Path]:
    """initdb reads the password from a file that ``user`` must be able to open
    (``/dev/stdin`` is a pipe owned by us, which ``postgres`` may not reopen)."""
    fd, name = tempfile.mkstemp(prefix="flowsmith-pw-")
    path = Path(name)
    try:
        with os.fdopen(fd, "w") as file:
            file.write(PASSWORD + "\n")
        if user is not None:
            shutil.chown(path, user, user)
        yield path
    finally:
        path.unlink()


class PostgresServer(LocalServer):
    """PostgreSQL: settings on the command line, no unix socket, spare databases."""

    _stop_signal = signal.SIGINT  # "fast" shutdown: abort transactions, disconnect
    _process_names = ("postgres",)

    def __init__(
        self,
        kind: str,
        base_dir: Path,
        data_dir: Path,
        port: int,
        fast: bool,
        detached: bool,
        settings: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(kind, base_dir, data_dir, port, fast, detached, settings)
        self._spares = _SparePool(self)
        # A benchmark turns this off: a spare's CREATE DATABASE in the background
        # writes megabytes of WAL into whatever it is measuring.
        self.keep_spares = True

    @classmethod
    def initialize(
        cls,
        base_dir: Path,
        fast: bool,
        detached: bool,
        data_root: Path | None,
        settings: Mapping[str, str] | None = None,
    ) -> PostgresServer:
        """initdb a new data directory with the ``flowsmith`` superuser."""
        user = _postgres_user()
        data_dir = _new_data_dir(base_dir, "postgresql", data_root, detached, user)
        with _password_file(user) as password_file:
            cmd = [
                str(find_postgres() / "initdb"),
                "-D",
                str(data_dir),
                "-U",
                USER,
                f"--pwfile={password_file}",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "-E",
                "UTF8",
                "--locale=C",
            ]
            try:
                _run(cmd + (["--no-sync"] if fast else []), user=user)
            except ServerStartError:
                shutil.rmtree(data_dir, ignore_errors=True)
                raise
        server = cls("postgresql", base_dir, data_dir, _free_port(), fast, detached, settings)
        server.save_state()
        return server

    def _command(self) -> list[str]:
        settings = {
            "listen_addresses": "127.0.0.1",
            "unix_socket_directories": "",
            "max_connections": str(MAX_CONNECTIONS),
        }
        if self.fast:
            settings.update(fsync="off", synchronous_commit="off", full_page_writes="off")
        settings.update(self.settings)
        cmd = [str(find_postgres() / "postgres"), "-D", str(self.data_dir), "-p", str(self.port)]
        for key, value in settings.items():
            cmd += ["-c", f"{key}={value}"]
        return cmd

    def _pid_file(self) -> Path:
        return self.data_dir / "postmaster.pid"

    def _run_as(self) -> str | None:
        return _postgres_user()

    def _create(self, name: str) -> None:
        """Rename a pre-made spare (~1 ms) instead of copying template1 (10-600 ms)."""
        spare = self._spares.take()
        if spare is not None:
            try:
                with self.admin_engine().connect() as conn:
                    conn.execute(sa.text(f'ALTER DATABASE "{spare}" RENAME TO "{name}"'))
                return
            except sa.exc.DBAPIError:
                # e.g. the name exists, or autovacuum sits in the spare: CREATE
                # then succeeds or fails with the usual error.
                self._spares.give_back(spare)
        super()._create(name)

    def _after_start(self) -> None:
        # `up` exits at once; tests then create databases by URL
        if not self.detached and self.keep_spares:
            self._spares.start()

    def _before_stop(self) -> None:
        self._spares.stop()


class _SparePool:
    """Keeps a few empty databases ready, created by a background thread.

    CREATE DATABASE copies template1: 10-20 ms on tmpfs, 200-600 ms on this
    project's CI disk. Tests want a fresh database each, so the copying happens
    while tests run instead.
    """

    PREFIX = "fs_spare_"
    SIZE = 3

    def __init__(self, server: DatabaseServer) -> None:
        self._server = server
        self._ready: list[str] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Adopt spares left from before a restart, then keep the pool full."""
        if self._thread is not None:
            return
        with self._server.admin_engine().connect() as conn:
            rows = conn.execute(
                sa.text("SELECT datname FROM pg_database WHERE datname LIKE :p"),
                {"p": self.PREFIX + "%"},
            )
            with self._lock:
                self._ready = [row[0] for row in rows]
        self._stopping.clear()
        self._thread = threading.Thread(target=self._fill, name="pg-spares", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop filling before the server goes away (waits for one CREATE at most)."""
        if self._thread is None:
            return
        self._stopping.set()
        self._wake.set()
        self._thread.join()
        self._thread = None

    def take(self) -> str | None:
        """A ready spare's name, or None if the pool is empty."""
        with self._lock:
            spare = self._ready.pop(0) if self._ready else None
        self._wake.set()
        return spare

    def give_back(self, spare: str) -> None:
        """Return an unused spare (its rename failed)."""
        with self._lock:
            self._ready.append(spare)

    def _fill(self) -> None:
        while not self._stopping.is_set():
            with self._lock:
                full = len(self._ready) >= self.SIZE
            if full:
                self._wake.wait()
                self._wake.clear()
                continue
            self._create_one()

    def _create_one(self) -> None:
        name = self.PREFIX + uuid.uuid4().hex[:16]
        try:
            with self._server.admin_engine().connect() as conn:
                conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        except sa.exc.SQLAlchemyError:
            self._stopping.wait(0.5)  # server down or busy; stop() or retry
            return
        with self._lock:
            self._ready.append(name)


def start_postgres(
    base_dir: Path,
    fast: bool = True,
    *,
    detached: bool = False,
    data_root: Path | None = None,
    settings: Mapping[str, str] | None = None,
    spares: bool = True,
) -> LocalServer:
    """Start PostgreSQL with data under ``base_dir`` (reusing it if initialized).

    ``fast`` turns off fsync, synchronous_commit and full_page_writes: fine
    for throwaway test data, wrong for benchmarks.
    ``detached`` servers (``up``) survive this process; others are stopped at
    exit. ``data_root`` puts a new data directory there (e.g. tmpfs) instead.
    ``settings`` are more ``-c`` server settings (a new server's only: a
    reused one keeps those it was made with), e.g.
    ``{"shared_preload_libraries": "pg_stat_statements"}``. ``spares=False``
    creates no spare databases in the background (see _SparePool).
    Raises ServerUnavailable when the binaries are missing.
    """
    find_postgres()
    _postgres_user()
    base_dir.mkdir(parents=True, exist_ok=True)
    server = LocalServer.load(base_dir, "postgresql", detached=detached)
    if server is None:
        server = PostgresServer.initialize(base_dir, fast, detached, data_root, settings)
    if isinstance(server, PostgresServer):
        server.keep_spares = spares
    server.start()
    return server


# --------------------------------------------------------------------------- MariaDB

_MARIADB_BOOTSTRAP = f"""
FLUSH PRIVILEGES;
DELETE FROM mysql.global_priv WHERE User = '';
FLUSH PRIVILEGES;
CREATE USER '{USER}'@'%' IDENTIFIED BY '{PASSWORD}';
GRANT ALL PRIVILEGES ON *.* TO '{USER}'@'%' WITH GRANT OPTION;
"""


def find_mariadb() -> tuple[Path, Path]:
    """(mariadbd, mariadb-install-db), from PATH or /usr/sbin, /usr/bin."""
    server = _which("mariadbd", "mysqld")
    install = _which("mariadb-install-db", "mysql_install_db")
    if server is None or install is None:
        raise ServerUnavailable(f"MariaDB server binaries not found: {INSTALL_HINT['mysql']}")
    version = subprocess.run([str(server), "--version"], capture_output=True, text=True).stdout
    if "mariadb" not in version.lower():
        raise ServerUnavailable(
            f"{server} is not MariaDB ({version.strip()}): " + INSTALL_HINT["mysql"]
        )
    return server, install


def _which(*names: str) -> Path | None:
    """First of ``names`` on PATH, then in the sbin dirs a normal user's PATH lacks."""
    for name in names:
        found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin")
        if found:
            return Path(found)
    return None


class MariaDBServer(LocalServer):
    """MariaDB: every option on the command line (``--no-defaults``), so the
    system's /etc/mysql configuration and a running system server don't matter."""

    _stop_signal = signal.SIGTERM  # normal shutdown; kills client sessions
    _process_names = ("mariadbd", "mysqld")

    @classmethod
    def initialize(
        cls,
        base_dir: Path,
        fast: bool,
        detached: bool,
        data_root: Path | None,
        settings: Mapping[str, str] | None = None,
    ) -> MariaDBServer:
        """mariadb-install-db a new data directory and create the ``flowsmith`` user."""
        data_dir = _new_data_dir(base_dir, "mariadb", data_root, detached, None)
        server = cls("mysql", base_dir, data_dir, _free_port(), fast, detached, settings)
        script = base_dir / "mariadb-bootstrap.sql"
        script.write_text(_MARIADB_BOOTSTRAP)
        try:
            _run(
                [
                    str(find_mariadb()[1]),
                    "--no-defaults",
                    *server._options(),
                    "--auth-root-authentication-method=normal",
                    "--skip-test-db",
                    f"--extra-file={script}",
                ],
                user=None,
            )
        except ServerStartError:
            shutil.rmtree(data_dir, ignore_errors=True)
            raise
        finally:
            script.unlink()
        server.save_state()
        return server

    def _options(self) -> list[str]:
        """Options shared by install-db and the server."""
        options = [
            f"--datadir={self.data_dir}",
            "--skip-name-resolve",  # 127.0.0.1 must not turn into ''@localhost
            "--character-set-server=utf8mb4",
            "--collation-server=utf8mb4_general_ci",
            "--innodb-buffer-pool-size=256M",
        ]
        if os.geteuid() == 0:
            options.append("--user=root")
        if self.fast:
            options += [
                "--innodb-flush-log-at-trx-commit=0",
                "--sync-binlog=0",
                "--skip-log-bin",
                "--innodb-doublewrite=0",
            ]
        options += [f"--{key}={value}" for key, value in self.settings.items()]
        return options

    def _command(self) -> list[str]:
        return [
            str(find_mariadb()[0]),
            "--no-defaults",
            *self._options(),
            f"--port={self.port}",
            "--bind-address=127.0.0.1",
            f"--socket={self._socket_path()}",
            f"--pid-file={self._pid_file()}",
            f"--max-connections={MAX_CONNECTIONS}",
        ]

    def _socket_path(self) -> Path:
        """Unix socket paths are limited to ~107 bytes; long data dirs fall back to $TMPDIR."""
        path = self.data_dir / "mariadbd.sock"
        if len(str(path)) < 100:
            return path
        return Path(tempfile.gettempdir()) / f"flowsmith-mariadb-{self.port}.sock"

    def _pid_file(self) -> Path:
        return self.data_dir / "mariadbd.pid"


def start_mariadb(
    base_dir: Path,
    fast: bool = True,
    *,
    detached: bool = False,
    data_root: Path | None = None,
    settings: Mapping[str, str] | None = None,
) -> LocalServer:
    """Start MariaDB with data under ``base_dir`` (reusing it if initialized).

    ``fast`` relaxes InnoDB durability (no flush per commit, no doublewrite, no
    binlog). ``detached`` and ``data_root`` as for start_postgres();
    ``settings`` are more server options (``{"key": "value"}`` becomes
    ``--key=value``) for a new server.
    Raises ServerUnavailable when the binaries are missing.
    """
    find_mariadb()
    base_dir.mkdir(parents=True, exist_ok=True)
    server = LocalServer.load(base_dir, "mysql", detached=detached)
    if server is None:
        server = MariaDBServer.initialize(base_dir, fast, detached, data_root, settings)
    server.start()
    return server


class _Starter(Protocol):
    def __call__(
        self,
        base_dir: Path,
        fast: bool = True,
        *,
        detached: bool = False,
        data_root: Path | None = None,
    ) -> LocalServer: ...


STARTERS: dict[str, _Starter] = {
    "postgresql": start_postgres,
    "mysql": start_mariadb,
}


# --------------------------------------------------------------------------- pytest


def _server_for_tests(kind: str, factory: pytest.TempPathFactory) -> Iterator[DatabaseServer]:
    """An external server from the environment, else a local one for this session."""
    url = os.environ.get(URL_ENV[kind])
    if url:
        yield ExternalServer(kind, url)
        return
    data_root = _test_data_root()
    try:
        server = STARTERS[kind](factory.mktemp(kind), True, data_root=data_root)
    except ServerUnavailable as exc:
        reason = exc.reason
    else:
        try:
            yield server
        finally:
            server.destroy()
        return
    _skip_or_fail(kind, reason)  # outside `except`: no chained traceback in the report


def _test_data_root() -> Path | None:
    """Where test servers keep data: $FLOWSMITH_TEST_DATA_ROOT, else tmpfs.

    On this machine kind, CREATE DATABASE took 200-600 ms on the ext4 disk and
    10-20 ms on /dev/shm, and every DDL statement pays similarly. /dev/shm is
    used only with 2 GiB free (Docker gives containers 64 MiB); otherwise the
    data stays under pytest's tmp_path_factory.
    """
    configured = os.environ.get(DATA_ROOT_ENV)
    if configured:
        root = Path(configured)
    else:
        root = Path("/dev/shm")
        if not (root.is_dir() and os.access(root, os.W_OK | os.X_OK)):
            return None
        stats = os.statvfs(root)
        if stats.f_bavail * stats.f_frsize < 2 * 1024**3:
            return None
    root.mkdir(parents=True, exist_ok=True)
    remove_stale_data_dirs(root)
    return root


def _skip_or_fail(kind: str, reason: str) -> NoReturn:
    """Missing servers skip loudly, unless CI demands them (FLOWSMITH_REQUIRE_DATABASES=1)."""
    message = (
        f"{kind.upper()} TESTS NOT RUN: {reason} (or set {URL_ENV[kind]} to an existing server)"
    )
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{message}; {REQUIRE_ENV}=1 requires it", pytrace=False)
    warnings.warn(DatabaseNotTestedWarning(message), stacklevel=2)
    pytest.skip(message)


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DatabaseServer]:
    """One PostgreSQL server per test session (or $FLOWSMITH_TEST_POSTGRES_URL)."""
    yield from _server_for_tests("postgresql", tmp_path_factory)


@pytest.fixture(scope="session")
def mysql_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DatabaseServer]:
    """One MariaDB server per test session (or $FLOWSMITH_TEST_MYSQL_URL)."""
    yield from _server_for_tests("mysql", tmp_path_factory)


def require_restart(server: DatabaseServer) -> None:
    """Skip the calling test when ``server`` cannot be stopped and started."""
    if not server.can_restart:
        pytest.skip(f"cannot restart an external server ({server.kind}, given by URL)")


# --------------------------------------------------------------------------- CLI


def _up(base_dir: Path, fast: bool) -> int:
    started = 0
    for kind, starter in STARTERS.items():
        try:
            server = starter(base_dir, fast, detached=True)
        except ServerUnavailable as exc:
            print(f"*** SKIPPED {kind}: {exc.reason}", file=sys.stderr)
            continue
        url = server.create_database("flowsmith", exist_ok=True)
        print(f"{URL_ENV[kind]}={url}", flush=True)
        print(f"{kind}: port {server.port}, data {server.data_dir}", file=sys.stderr)
        started += 1
    print(
        f"stop with: python {Path(__file__).relative_to(_REPO_ROOT)} down --dir {base_dir}",
        file=sys.stderr,
    )
    return 0 if started else 1


def _down(base_dir: Path) -> int:
    for kind in STARTERS:
        server = LocalServer.load(base_dir, kind)
        if server is None:
            continue
        was_running = server.is_running()
        server.stop()
        print(f"{kind}: {'stopped' if was_running else 'was not running'}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``up`` / ``down`` for the Makefile's db-up / db-down without Docker."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("command", choices=["up", "down"])
    parser.add_argument(
        "--dir",
        type=Path,
        default=_REPO_ROOT / ".dbdata",
        help="data directory (default: .dbdata/ in the repo)",
    )
    parser.add_argument(
        "--durable", action="store_true", help="keep fsync and friends on (for benchmarks)"
    )
    args = parser.parse_args(argv)
    base_dir: Path = args.dir.resolve()
    if args.command == "up":
        return _up(base_dir, fast=not args.durable)
    return _down(base_dir)


if __name__ == "__main__":
    sys.exit(main())

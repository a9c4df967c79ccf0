"""PostgreSQL from Debian's binaries: initdb, settings on the command line, spare databases.

The server listens on TCP only (no unix socket) and runs as ``postgres`` when we are
root, so a system server or its configuration cannot interfere.
"""

from __future__ import annotations

import contextlib
import functools
import os
import pwd
import shutil
import signal
import tempfile
import threading
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path

import sqlalchemy as sa

from tests.servers.admin import (
    INSTALL_HINT,
    MAX_CONNECTIONS,
    PASSWORD,
    USER,
    DatabaseServer,
    ServerStartError,
    ServerUnavailable,
)
from tests.servers.process import LocalServer, free_port, new_data_dir, run_setup


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

    # A benchmark turns this off: a spare's CREATE DATABASE in the background
    # writes megabytes of WAL into whatever it is measuring.
    keep_spares = True

    @functools.cached_property
    def _spares(self) -> _SparePool:
        return _SparePool(self)

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
        data_dir = new_data_dir(base_dir, "postgresql", data_root, detached, user)
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
                run_setup(cmd + (["--no-sync"] if fast else []), user=user)
            except ServerStartError:
                shutil.rmtree(data_dir, ignore_errors=True)
                raise
        server = cls("postgresql", base_dir, data_dir, free_port(), fast, detached, settings)
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
    server = PostgresServer.load(base_dir, "postgresql", detached=detached)
    if server is None:
        server = PostgresServer.initialize(base_dir, fast, detached, data_root, settings)
    server.keep_spares = spares
    server.start()
    return server

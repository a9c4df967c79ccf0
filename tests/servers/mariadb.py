"""MariaDB from Debian's binaries: mariadb-install-db, every option on the command line.

``--no-defaults`` keeps the system's /etc/mysql and a running system server out of it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path

from tests.servers.admin import (
    INSTALL_HINT,
    MAX_CONNECTIONS,
    PASSWORD,
    USER,
    ServerStartError,
    ServerUnavailable,
)
from tests.servers.process import LocalServer, free_port, new_data_dir, run_setup

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
        data_dir = new_data_dir(base_dir, "mariadb", data_root, detached, None)
        server = cls("mysql", base_dir, data_dir, free_port(), fast, detached, settings)
        script = base_dir / "mariadb-bootstrap.sql"
        script.write_text(_MARIADB_BOOTSTRAP)
        try:
            run_setup(
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
        # Its own tmpdir: in the shared /tmp, temporary tables of servers started at the
        # same time (other sessions, benchmarks) collided ("Error on delete of
        # '/tmp/#sql-temptable-...'"), failing mariadb-install-db now and then.
        tmpdir = self.base_dir / "mariadb-tmp"
        tmpdir.mkdir(exist_ok=True)
        options = [
            f"--datadir={self.data_dir}",
            f"--tmpdir={tmpdir}",
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
    server = MariaDBServer.load(base_dir, "mysql", detached=detached)
    if server is None:
        server = MariaDBServer.initialize(base_dir, fast, detached, data_root, settings)
    server.start()
    return server

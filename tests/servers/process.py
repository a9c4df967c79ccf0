"""The process plumbing shared by the servers we start: ports, data directories, pids.

``LocalServer`` runs a server binary on 127.0.0.1 with its own data directory and
keeps its port across stop()/start(), so a test can take the database away and
bring it back; the subclasses in postgres.py and mariadb.py say how to run each.
A server started for tests never outlives the test process (atexit, and the
kernel's parent-death signal when the process is killed).
"""

from __future__ import annotations

import atexit
import ctypes
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import NoReturn, Self

from tests.servers.admin import (
    ADMIN_DATABASE,
    DRIVERS,
    PASSWORD,
    START_TIMEOUT,
    STOP_TIMEOUT,
    USER,
    DatabaseServer,
    ServerStartError,
    answers,
    checked_name,
)


def free_port() -> int:
    """Let the kernel pick an unused loopback port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def die_with_parent(sig: signal.Signals) -> Callable[[], None] | None:
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


def spawn_server(
    command: list[str],
    log_path: Path,
    *,
    user: str | None,
    stop_with_parent: signal.Signals | None,
    append: bool = True,
) -> subprocess.Popen[bytes]:
    """Launch a server in its own session, as ``user`` (None: as we are), its output
    written to ``log_path`` (opened by us: the server's user need not write there).
    ``stop_with_parent``: the signal the kernel sends it when the test process dies
    (None for a server meant to outlive us)."""
    with log_path.open("ab" if append else "wb") as log:
        return subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd="/",
            start_new_session=True,
            user=user,
            group=user,
            extra_groups=[] if user else None,
            preexec_fn=die_with_parent(stop_with_parent) if stop_with_parent else None,
        )


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


def log_tail(path: Path, lines: int = 30) -> str:
    """The end of a server log, for error messages that explain themselves."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def run_setup(cmd: list[str], *, user: str | None) -> None:
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
            print(f"tests.servers: could not stop {server.kind}: {exc}", file=sys.stderr)


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
        name = checked_name(name)
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
                self._use_port(free_port())
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

    @classmethod
    def load(cls, base_dir: Path, kind: str, *, detached: bool = True) -> Self | None:
        """The server recorded under ``base_dir``, if its data directory still exists.

        Called on the subclass that runs ``kind`` (PostgresServer, MariaDBServer).
        """
        path = _state_path(base_dir, kind)
        if not path.exists():
            return None
        state = json.loads(path.read_text())
        data_dir = Path(state["data_dir"])
        if not data_dir.is_dir():
            return None
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
        return spawn_server(
            self._command(),
            self.log_path,
            user=self._run_as(),
            stop_with_parent=None if self.detached else self._stop_signal,
        )

    def _wait_ready(self, deadline: float) -> None:
        """Poll with real logins until one succeeds, the process dies or time is up."""
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                self._fail(f"exited with code {self._proc.returncode} during startup")
            if answers(self.admin_url, self.kind):
                return
            time.sleep(0.05)
        self.stop()
        self._fail(f"did not accept connections within {START_TIMEOUT:.0f}s")

    def _fail(self, what: str) -> NoReturn:
        raise ServerStartError(
            f"{self.kind} server on port {self.port} {what}.\n"
            f"Last lines of {self.log_path}:\n{log_tail(self.log_path)}"
        )

    def _lost_port_race(self, offset: int) -> bool:
        """Did someone take our port between free_port() and bind()?"""
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


def new_data_dir(
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

"""The pytest side: one server of each kind per session, or the one named by URL.

Missing binaries skip those tests loudly, or fail them when
FLOWSMITH_REQUIRE_DATABASES=1 (CI).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn, Protocol

import pytest

from tests.servers.admin import (
    DATA_ROOT_ENV,
    REQUIRE_ENV,
    URL_ENV,
    DatabaseServer,
    ExternalServer,
    ServerUnavailable,
)
from tests.servers.mariadb import start_mariadb
from tests.servers.postgres import start_postgres
from tests.servers.process import LocalServer, remove_stale_data_dirs


class DatabaseNotTestedWarning(UserWarning):
    """Shown in pytest's warnings summary when a server kind was skipped."""


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

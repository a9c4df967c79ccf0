"""Fixtures of the integration tier: migrated databases for the CLI, PostgreSQL alone.

The CLI tests (test_cli_ops, test_cli_status, test_cli_enqueue) hand the commands a
URL and read the same database through a storage of their own: ``Db`` is both.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from flowsmith_worker.storage import create_storage
from flowsmith_worker.storage.base import Storage
from flowsmith_worker.storage.sql import SqlStorage
from tests.conftest import database_url


@dataclass
class Db:
    url: str
    storage: Storage


def migrated(url: str) -> Iterator[Db]:
    """A storage on ``url`` brought to the newest schema, closed when the caller is done."""
    storage = create_storage(url)
    storage.migrate()
    yield Db(url, storage)
    storage.close()


@pytest.fixture
def db(sql_url: str) -> Iterator[Db]:
    """A migrated database on each SQL backend, and the URL the commands get."""
    yield from migrated(sql_url)


@pytest.fixture
def sqlite_db(tmp_path: Path) -> Iterator[Db]:
    """A migrated SQLite database, for tests where the backend does not matter."""
    yield from migrated(f"sqlite:///{tmp_path / 'cli.db'}")


@pytest.fixture
def pg_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, unmigrated PostgreSQL database, for what only PostgreSQL does."""
    return database_url(request, "postgresql", tmp_path)


@pytest.fixture
def pg_storage(pg_url: str) -> Iterator[SqlStorage]:
    """A PostgreSQL database brought to the newest version by the migrations."""
    storage = create_storage(pg_url)
    assert isinstance(storage, SqlStorage)
    storage.migrate()
    yield storage
    storage.close()

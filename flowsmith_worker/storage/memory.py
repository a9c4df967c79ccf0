"""InMemoryStorage: the SQL storage on a private, throw-away SQLite database.

It used to be a second implementation of the state machine in plain Python,
and the two drifted apart. Now every rule, message and check is the SQL
storage's own; only where the rows live differs: a SQLite file in a private
temporary directory (mode 0700), deleted by close() or when the object is
garbage-collected. Nothing of it outlives the process, so, as the name says, it
is for tests, examples and the REPL; a worker in another process cannot see it.

Must never grow logic of its own: a storage that behaved otherwise than SqlStorage
would make the contract suite prove nothing.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import sqlalchemy as sa

from flowsmith_worker.config import PoolSettings
from flowsmith_worker.storage.sql.storage import SqlStorage

DISPLAY_URL = "memory://"


class InMemoryStorage(SqlStorage):
    """A migrated storage of this process alone; ``close()`` deletes it."""

    def __init__(self) -> None:
        self._directory = tempfile.TemporaryDirectory(prefix="flowsmith-memory-")
        path = Path(self._directory.name) / "flowsmith.db"
        super().__init__(sa.URL.create("sqlite", database=str(path)), PoolSettings())
        self.url_for_display = DISPLAY_URL
        self.migrate()

    def close(self) -> None:
        super().close()
        self._directory.cleanup()

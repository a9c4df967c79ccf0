"""Storage: the seam between the engine and a database."""

from __future__ import annotations

from typing import TYPE_CHECKING

import sqlalchemy as sa

from flowsmith_worker.config import PoolSettings, parse_database_url, redact_url
from flowsmith_worker.errors import InvalidDatabaseURL
from flowsmith_worker.storage.base import Storage

if TYPE_CHECKING:
    from flowsmith_worker.storage.dialects import SqliteMode

_EXTRAS = {"postgresql": "postgres", "mysql": "mysql", "mariadb": "mysql"}


def create_storage(
    url: str, pool: PoolSettings | None = None, *, sqlite_mode: SqliteMode = "rwc"
) -> Storage:
    """The storage for a URL: ``memory://`` or a SQLAlchemy URL of a supported database.

    A SQLite file is created if missing unless ``sqlite_mode`` says otherwise:
    "rw" (it must exist) or "ro" (it must exist, and is only read).
    """
    parsed = parse_database_url(url)
    if parsed.drivername == "memory":
        return InMemoryStorage()
    from flowsmith_worker.storage.sql.storage import SqlStorage

    try:
        return SqlStorage(parsed, pool or PoolSettings(), sqlite_mode)
    except sa.exc.ArgumentError as exc:
        message = str(exc).splitlines()[0]
        raise InvalidDatabaseURL(f"invalid database URL {redact_url(url)!r}: {message}") from None
    except ModuleNotFoundError as exc:
        extra = _EXTRAS.get(parsed.get_backend_name(), "postgres")
        raise InvalidDatabaseURL(
            f"the driver for {redact_url(url)!r} is not installed ({exc.name}): "
            f"pip install 'flowsmith-worker[{extra}]'"
        ) from None


# Last: it is built on the SQL storage, whose modules import this package.
from flowsmith_worker.storage.memory import InMemoryStorage  # noqa: E402

__all__ = ["InMemoryStorage", "Storage", "create_storage"]

"""Storage: the seam between the engine and a database.

create_storage builds one for a URL; configure() sets the process-wide one that
flows and workers use when given none (default_storage()).
"""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING

import sqlalchemy as sa

from flowsmith_worker import payload
from flowsmith_worker.config import (
    DEFAULT_DATABASE_URL,
    DEFAULT_POOL_MAX,
    DEFAULT_POOL_MIN,
    DEFAULT_POOL_TIMEOUT,
    URL_ENV_VARS,
    PoolSettings,
    parse_database_url,
    redact_url,
    url_from_environment,
)
from flowsmith_worker.errors import FlowSmithNotConfigured, InvalidDatabaseURL
from flowsmith_worker.log import get_logger
from flowsmith_worker.storage.base import Storage

if TYPE_CHECKING:
    from flowsmith_worker.storage.sql.dialects import SqliteMode

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


_lock = threading.Lock()
_default_storage: Storage | None = None


def configure(
    database_url: str | None = None,
    *,
    pool_min: int = DEFAULT_POOL_MIN,
    pool_max: int = DEFAULT_POOL_MAX,
    pool_timeout: float = DEFAULT_POOL_TIMEOUT,
    max_payload_bytes: int | None = None,
) -> Storage:
    """Set the process-wide storage that flows and workers use by default.

    ``max_payload_bytes`` sets the largest input or output stored, as JSON
    (see flowsmith_worker.payload); None keeps the limit in force.
    """
    if max_payload_bytes is not None:
        payload.set_limits(payload.PayloadLimits(max_bytes=max_payload_bytes))

    url = database_url or url_from_environment()
    if url is None:
        _warn_of_the_default_database()
        url = DEFAULT_DATABASE_URL
    storage = create_storage(
        url, PoolSettings(pool_min=pool_min, pool_max=pool_max, pool_timeout=pool_timeout)
    )
    global _default_storage
    with _lock:
        old, _default_storage = _default_storage, storage
    if old is not None:
        old.close()
    return storage


def default_storage() -> Storage:
    """The configured storage; configured from the environment if a URL is set there."""
    with _lock:
        storage = _default_storage
    if storage is not None:
        return storage
    if any(os.environ.get(name) for name in URL_ENV_VARS):
        return configure()
    raise FlowSmithNotConfigured(
        "FlowSmith is not configured: call flowsmith.configure(database_url=...) "
        "or set FLOWSMITH_DATABASE_URL (configure() with no URL uses "
        f"{DEFAULT_DATABASE_URL})"
    )


def reset() -> None:
    """Forget the configured storage and payload limit (tests)."""
    payload.set_limits(None)
    global _default_storage
    with _lock:
        old, _default_storage = _default_storage, None
    if old is not None:
        old.close()


def _warn_of_the_default_database() -> None:
    """An application whose environment lost its URL would otherwise enqueue into a
    local file that no worker reads, without a word."""
    get_logger(__name__).warning(
        "database.default_used",
        file=os.path.abspath(sa.make_url(DEFAULT_DATABASE_URL).database or ""),
        hint=f"no database URL was given and {' and '.join(URL_ENV_VARS)} are unset: "
        f"set {URL_ENV_VARS[0]} (or pass the URL) to use your database",
    )


# Last: it is built on the SQL storage, whose modules import this package.
from flowsmith_worker.storage.memory import InMemoryStorage  # noqa: E402

__all__ = [
    "InMemoryStorage",
    "Storage",
    "configure",
    "create_storage",
    "default_storage",
    "reset",
]

"""Configuration: which database, which pool, validated when built.

The URL is looked up in this order: the ``database_url`` argument (or ``--url``),
``FLOWSMITH_DATABASE_URL``, ``DATABASE_URL``, then ``sqlite:///flowsmith.db`` in
the working directory. Passwords never leave this module unredacted.
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

import sqlalchemy as sa

from flowsmith_worker import payload
from flowsmith_worker.errors import FlowSmithNotConfigured, InvalidDatabaseURL

if TYPE_CHECKING:
    from flowsmith_worker.storage.base import Storage

DEFAULT_DATABASE_URL = "sqlite:///flowsmith.db"
URL_ENV_VARS = ("FLOWSMITH_DATABASE_URL", "DATABASE_URL")
# SQLAlchemy's own defaults (pool_size=5, max_overflow=10). Connections above
# pool_min are closed when returned, so a busy process wants pool_min near its
# concurrency: `flowsmith worker` sizes its pool from --concurrency.
DEFAULT_POOL_MIN = 5
DEFAULT_POOL_MAX = 15
DEFAULT_POOL_TIMEOUT = 30.0

# Users write the scheme of their platform's URL; we pick the driver we ship with.
_DRIVERS = {
    "postgres": "postgresql+psycopg2",
    "postgresql": "postgresql+psycopg2",
    "mysql": "mysql+mysqlconnector",
    "mariadb": "mysql+mysqlconnector",
}
_SUPPORTED = "sqlite:///path.db, postgresql://user:pass@host/db, mysql://user:pass@host/db"


@dataclass(frozen=True)
class PoolSettings:
    pool_min: int = DEFAULT_POOL_MIN
    pool_max: int = DEFAULT_POOL_MAX
    pool_timeout: float = DEFAULT_POOL_TIMEOUT

    def __post_init__(self) -> None:
        if self.pool_min < 0 or self.pool_max < 1 or self.pool_min > self.pool_max:
            raise ValueError(
                f"pool_min={self.pool_min}, pool_max={self.pool_max}: "
                "need 0 <= pool_min <= pool_max and pool_max >= 1"
            )
        if self.pool_timeout <= 0:
            raise ValueError(f"pool_timeout={self.pool_timeout}: must be positive seconds")


def resolve_database_url(explicit: str | None = None) -> str:
    """The URL to use: the argument, then the environment, then the SQLite default."""
    if explicit:
        return explicit
    for name in URL_ENV_VARS:
        if os.environ.get(name):
            return os.environ[name]
    return DEFAULT_DATABASE_URL


# Query parameters that carry a secret (libpq's ?password=, drivers' ?passwd=...).
_SECRET_QUERY_KEYS = ("password", "passwd", "pwd", "pass", "secret", "sslpassword")


def redact_url(url: str) -> str:
    """The URL with every password replaced by ***, even when the URL does not parse."""
    try:
        parsed = sa.make_url(url)
        if "@" in (parsed.host or ""):  # an unescaped @ in the password: parsed wrongly
            raise ValueError(url)
    except Exception:  # a URL we cannot parse still must not leak
        hidden = re.sub(r"(://[^:/@]*:).*@", r"\1***@", url)  # up to the last @
        keys = "|".join(_SECRET_QUERY_KEYS)
        return re.sub(rf"([?&](?:{keys})=)[^&]*", r"\1***", hidden, flags=re.IGNORECASE)
    secret_keys = [k for k in parsed.query if k.lower() in _SECRET_QUERY_KEYS]
    if secret_keys:
        parsed = parsed.update_query_dict(dict.fromkeys(secret_keys, "***"))
    return parsed.render_as_string(hide_password=True).replace("%2A%2A%2A", "***")


def parse_database_url(url: str) -> sa.URL:
    """A SQLAlchemy URL with our driver chosen; InvalidDatabaseURL says what is wrong."""
    if url.startswith("memory:"):
        return sa.URL.create("memory")
    try:
        parsed = sa.make_url(url)
    except Exception:
        # "from None": the parser's own message may quote the password.
        raise InvalidDatabaseURL(
            f"cannot parse database URL {redact_url(url)!r}; expected one of: {_SUPPORTED}"
        ) from None
    backend = parsed.drivername
    if backend in _DRIVERS:
        parsed = parsed.set(drivername=_DRIVERS[backend])
    if parsed.get_backend_name() not in ("sqlite", "postgresql", "mysql", "mariadb"):
        raise InvalidDatabaseURL(
            f"unsupported database {parsed.get_backend_name()!r} in "
            f"{redact_url(url)!r}; expected one of: {_SUPPORTED}"
        )
    return parsed


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
    from flowsmith_worker.storage import create_storage

    if max_payload_bytes is not None:
        payload.set_limits(payload.PayloadLimits(max_bytes=max_payload_bytes))

    storage = create_storage(
        resolve_database_url(database_url),
        PoolSettings(pool_min=pool_min, pool_max=pool_max, pool_timeout=pool_timeout),
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

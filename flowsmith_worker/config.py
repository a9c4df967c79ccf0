"""Configuration: which database, which pool, validated when built.

The URL is looked up in this order: the ``database_url`` argument (or ``--url``),
``FLOWSMITH_DATABASE_URL``, ``DATABASE_URL``, then ``sqlite:///flowsmith.db`` in
the working directory (configure() logs a warning when it falls back to that file).
Pure settings only: the process-wide storage that configure() sets lives beside
the storage factory (flowsmith_worker.storage), so this module imports none of it.
Passwords never leave this module unredacted, and every password seen here is
scrubbed from the text we print or log (``redact``).
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import quote, unquote

import sqlalchemy as sa

from flowsmith_worker.errors import InvalidDatabaseURL

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
    return explicit or url_from_environment() or DEFAULT_DATABASE_URL


def url_from_environment() -> str | None:
    return next((os.environ[name] for name in URL_ENV_VARS if os.environ.get(name)), None)


# Query parameters and libpq keywords that carry a secret (?password=, password=...).
_SECRET_KEYS = ("password", "passwd", "pwd", "pass", "secret", "sslpassword")
_KEYWORD_SECRET = re.compile(
    rf"(?P<key>\b(?:{'|'.join(_SECRET_KEYS)})\s*=\s*)(?P<value>'(?:[^'\\]|\\.)*'|[^\s&]*)",
    re.IGNORECASE,
)
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:/*")
REDACTED = "***"
MIN_REDACTED_LENGTH = 4

# Every password this process was given in a URL, so that text we print or
# log can be scrubbed of it even where a driver quotes it back (a password
# with an unescaped @ makes libpq print its tail as the host name).
_secrets_lock = threading.Lock()
_known_secrets: tuple[str, ...] = ()


def secrets_in(url: str) -> frozenset[str]:
    """Every text in ``url`` that is, or may be, a password, whatever the URL's shape."""
    found = {match["value"].strip("'") for match in _KEYWORD_SECRET.finditer(url)}
    parsed = _parse_cleanly(url)
    if parsed is None:
        start, end = _userinfo_password_span(url)
        # Split at unescaped @s too: a driver given such a URL quotes the tail back.
        found.update((url[start:end], *url[start:end].split("@")))
    else:
        found.update(v for k, v in parsed.query.items() if k.lower() in _SECRET_KEYS)
        if parsed.password:
            found.add(quote(str(parsed.password), safe=""))
            found.add(str(parsed.password))
    found.update([unquote(s) for s in found])
    return frozenset(s for s in found if s)


def _parse_cleanly(url: str) -> sa.URL | None:
    """SQLAlchemy's reading of the URL, or None where it failed or misread it."""
    try:
        parsed = sa.make_url(url)
    except Exception:  # any parser error: the caller falls back to masking
        return None
    # An unescaped @ in the password: SQLAlchemy takes its tail for the host.
    return None if "@" in (parsed.host or "") else parsed


def _userinfo_password_span(url: str) -> tuple[int, int]:
    """In a URL that does not parse: where the text between the user's ':' and the
    last '@' is (an empty span if there is none). It may hold more than the password;
    better to hide too much than too little."""
    at = url.rfind("@")
    if at < 0:
        # No host at all (postgresql://user:PW/db): hide from the user's ':' up to
        # the path or query; a port shown as *** is the price of never leaking.
        scheme = _SCHEME.match(url)
        start = scheme.end() if scheme and scheme.group().endswith("//") else -1
        colon = url.find(":", start) if start >= 0 else -1
        if colon < 0:
            return 0, 0
        end = min((i for i in (url.find("/", colon), url.find("?", colon)) if i >= 0), default=-1)
        return colon + 1, end if end >= 0 else len(url)
    scheme = _SCHEME.match(url, 0, at)
    colon = url.find(":", scheme.end() if scheme else 0, at)
    if colon < 0 and scheme:  # "u:PW@host/db": what looked like a scheme was the user
        colon = url.find(":", 0, at)
    return (colon + 1, at) if colon >= 0 else (0, 0)


def remember_secrets(url: str) -> None:
    """Add the URL's passwords to those redact() removes from any text."""
    global _known_secrets
    new = secrets_in(url)
    with _secrets_lock:
        if not new <= set(_known_secrets):
            # Longest first, so a piece never leaves the rest of a longer secret behind.
            _known_secrets = tuple(sorted({*_known_secrets, *new}, key=len, reverse=True))


def known_secrets() -> tuple[str, ...]:
    """The passwords redact() removes from any text, longest first (none until a URL
    with one was used)."""
    return _known_secrets


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with every password we were given (and ``secrets``) replaced by ***.

    Passwords (or pieces) shorter than MIN_REDACTED_LENGTH are left: they would
    blot out ordinary words of every message, and hide nothing worth hiding.
    """
    extra = set(secrets)
    # _known_secrets is kept longest first already: sort only when others join it.
    ordered = sorted({*_known_secrets, *extra}, key=len, reverse=True) if extra else _known_secrets
    for secret in ordered:
        if len(secret) >= MIN_REDACTED_LENGTH:
            text = text.replace(secret, REDACTED)
    return text


def redact_url(url: str) -> str:
    """The URL with every password replaced by ***, whatever its shape."""
    parsed = _parse_cleanly(url)
    if parsed is None:  # a URL we cannot parse still must not leak
        start, end = _userinfo_password_span(url)
        shown = url[:start] + REDACTED + url[end:] if end > start else url
    else:
        secret_keys = [k for k in parsed.query if k.lower() in _SECRET_KEYS]
        if secret_keys:
            parsed = parsed.update_query_dict(dict.fromkeys(secret_keys, REDACTED))
        shown = parsed.render_as_string(hide_password=True).replace("%2A%2A%2A", REDACTED)
    shown = _KEYWORD_SECRET.sub(lambda m: m["key"] + REDACTED, shown)
    return redact(shown, secrets_in(url))


def parse_database_url(url: str) -> sa.URL:
    """A SQLAlchemy URL with our driver chosen; InvalidDatabaseURL says what is wrong."""
    remember_secrets(url)
    if url.startswith("memory:"):
        return sa.URL.create("memory")
    try:
        parsed = sa.make_url(url)
    except Exception:
        # "from None": the parser's own message may quote the password.
        raise InvalidDatabaseURL(
            f"cannot parse database URL {redact_url(url)!r}; expected one of: {_SUPPORTED}"
        ) from None
    if "@" in (parsed.host or ""):
        # The driver would take the password's tail for the host name and print it.
        raise InvalidDatabaseURL(
            f"the database URL {redact_url(url)!r} has an unescaped '@' in its password "
            "or user name: percent-encode it as %40 (postgresql://user:p%40ss@host/db)"
        )
    backend = parsed.drivername
    if backend in _DRIVERS:
        parsed = parsed.set(drivername=_DRIVERS[backend])
    if parsed.get_backend_name() not in ("sqlite", "postgresql", "mysql", "mariadb"):
        raise InvalidDatabaseURL(
            f"unsupported database {parsed.get_backend_name()!r} in "
            f"{redact_url(url)!r}; expected one of: {_SUPPORTED}"
        )
    return parsed

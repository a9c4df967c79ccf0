"""The engine of each database, with what a worker pool needs.

The settings shared by the server databases (a LIFO pool, a ping only after
idling, the driver's refusals in our words) are here; each backend's own are
in its module.
"""

from __future__ import annotations

import time
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine

from flowsmith_worker.config import PoolSettings, redact_url
from flowsmith_worker.errors import InvalidDatabaseURL
from flowsmith_worker.storage.sql.dialects.base import Dialect
from flowsmith_worker.storage.sql.dialects.mysql import MYSQL, tune_mysql_connector
from flowsmith_worker.storage.sql.dialects.postgresql import POSTGRESQL
from flowsmith_worker.storage.sql.dialects.sqlite import SQLITE, SqliteMode, create_sqlite_engine

# A pooled connection idle for longer than this is tested before use.
PING_AFTER_IDLE_SECONDS = 10.0
_IDLE_SINCE = "flowsmith_idle_since"
_DIALECTS: dict[str, Dialect] = {
    "postgresql": POSTGRESQL,
    "mysql": MYSQL,
    "mariadb": MYSQL,
    "sqlite": SQLITE,
}


def dialect_of(engine_or_conn: Engine | Connection) -> Dialect:
    """The Dialect of the database behind ``engine_or_conn`` (one instance per backend)."""
    name = engine_or_conn.dialect.name
    try:
        return _DIALECTS[name]
    except KeyError:
        raise InvalidDatabaseURL(
            f"FlowSmith runs on PostgreSQL, MySQL/MariaDB and SQLite, not {name}"
        ) from None


def create_engine(url: sa.URL, pool: PoolSettings, sqlite_mode: SqliteMode = "rwc") -> Engine:
    """An engine with the settings each database needs to run a worker pool.

    ``sqlite_mode`` says whether a SQLite file may be created, or only written, or
    only read; other databases ignore it.
    """
    if url.get_backend_name() == "sqlite":
        return create_sqlite_engine(url, sqlite_mode)
    kwargs: dict[str, Any] = {
        "pool_size": pool.pool_min,
        "max_overflow": max(0, pool.pool_max - pool.pool_min),
        "pool_timeout": pool.pool_timeout,
        "pool_recycle": 3600,
        # The most recently used connection first: a worker keeps reusing one warm
        # connection, so its idle ones age out and only they are pinged (see below).
        "pool_use_lifo": True,
    }
    if url.get_backend_name() in ("mysql", "mariadb"):
        # REPEATABLE READ (MySQL's default) takes gap locks that make concurrent
        # claims and inserts deadlock; READ COMMITTED sees each statement afresh.
        kwargs["isolation_level"] = "READ COMMITTED"
    mysqlconnector = url.get_driver_name() == "mysqlconnector"
    if mysqlconnector:
        kwargs["pool_reset_on_return"] = None  # see mysql._rollback_only_if_open
    engine = sa.create_engine(url, **kwargs)
    _refuse_bad_arguments_cleanly(engine)
    _ping_after_idle(engine)
    if mysqlconnector:
        tune_mysql_connector(engine)
    return engine


def _ping_after_idle(engine: Engine) -> None:
    """Test a pooled connection before use only if it sat idle for a while.

    pool_pre_ping would cost a round trip (SELECT 1, COM_PING) on every
    transaction of a busy worker. A connection in steady use needs none: if the
    server went away, its next statement fails, SQLAlchemy marks the pool's
    older connections invalid, and our callers retry (DatabaseUnavailable). A
    connection that sat idle is the one a restart most likely broke while
    nobody was looking, so an application calling flow.run() once in a while
    does not get the error: that one is pinged, and replaced if dead.
    """

    @event.listens_for(engine, "checkin")
    def _checked_in(_dbapi_conn: Any, record: Any) -> None:
        if record is not None:
            record.info[_IDLE_SINCE] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checked_out(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        idle_since = record.info.get(_IDLE_SINCE)
        if idle_since is None or time.monotonic() - idle_since < PING_AFTER_IDLE_SECONDS:
            return
        try:
            engine.dialect.do_ping(dbapi_conn)
        except engine.dialect.loaded_dbapi.Error as exc:
            # The pool discards this connection and checks out another (or a new one).
            raise sa.exc.DisconnectionError(str(exc)) from exc


def _refuse_bad_arguments_cleanly(engine: Engine) -> None:
    """A driver that rejects an argument of the URL says so in our words.

    mysql-connector raises AttributeError for an unknown ?option=, which
    SQLAlchemy passes through untranslated.
    """
    shown = redact_url(engine.url.render_as_string(hide_password=False))

    @event.listens_for(engine, "do_connect")
    def _connect(dialect: Any, _record: Any, cargs: Any, cparams: Any) -> Any:
        try:
            return dialect.loaded_dbapi.connect(*cargs, **cparams)
        except dialect.loaded_dbapi.Error:
            raise  # SQLAlchemy and SqlStorage translate these
        except (AttributeError, TypeError, ValueError) as exc:
            raise InvalidDatabaseURL(f"the driver refused the URL {shown}: {exc}") from None

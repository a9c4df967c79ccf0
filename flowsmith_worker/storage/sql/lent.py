"""The caller's transaction: ``flow.run(..., connection=...)`` writes inside it.

A SQLAlchemy Connection is used as it is. A Django connection (see
flowsmith_worker.contrib.django) holds a DBAPI connection of its own driver
(psycopg 3, psycopg2, sqlite3), which SQLAlchemy cannot take as a Connection:
``lend`` wraps it in one. Its transaction stays the owner's: the dialects
below never commit, roll back or close the DBAPI connection they are lent,
and set nothing on it (no type registrations, no isolation level), so the
owner finds its connection as it left it. The first use of a driver in a
process only reads the server's version and settings on it, as SQLAlchemy
does on its first connection.

Must never commit, roll back, close or reconfigure a connection it was lent: the
run commits or rolls back with the caller's own writes, never on its own.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Iterator
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import registry
from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg
from sqlalchemy.dialects.postgresql.psycopg2 import PGDialect_psycopg2
from sqlalchemy.dialects.sqlite.pysqlite import SQLiteDialect_pysqlite
from sqlalchemy.engine import Connection, Engine

from flowsmith_worker.errors import ConnectionNotUsable
from flowsmith_worker.storage.sql.dialects import Dialect, dialect_of

# The DBAPI connection lent to the current thread (or task): what the engines'
# pools "connect" to.
_LENT: contextvars.ContextVar[Any] = contextvars.ContextVar("flowsmith_lent_connection")


class _OwnedByTheLender:
    """A dialect mixin: the DBAPI connection, and its transaction, are the lender's."""

    def on_connect(self) -> None:
        return None  # nothing registered on, or set on, the lender's connection

    def do_commit(self, dbapi_connection: Any) -> None:
        pass  # the lender commits (Django: its atomic block)

    def do_rollback(self, dbapi_connection: Any) -> None:
        pass  # the lender rolls back; SQLAlchemy would on closing its Connection

    def do_close(self, dbapi_connection: Any) -> None:
        pass  # the lender's connection outlives ours

    def do_terminate(self, dbapi_connection: Any) -> None:
        pass  # nor is a connection SQLAlchemy finds broken ours to end


class LentPsycopg(_OwnedByTheLender, PGDialect_psycopg):
    supports_statement_cache = True  # its SQL is the dialect's own: cacheable


class LentPsycopg2(_OwnedByTheLender, PGDialect_psycopg2):
    supports_statement_cache = True  # its SQL is the dialect's own: cacheable


# The ignore: mypy sees SQLAlchemy's SQLite dialect class as Any (its module is untyped).
class LentSqlite(_OwnedByTheLender, SQLiteDialect_pysqlite):  # type: ignore[misc]
    supports_statement_cache = True  # its SQL is the dialect's own: cacheable


# DBAPI module of the lent connection -> (SQLAlchemy URL scheme, dialect class).
_DIALECTS: dict[str, tuple[str, type[Any]]] = {
    "psycopg": ("postgresql+flowsmith_lent_psycopg", LentPsycopg),
    "psycopg2": ("postgresql+flowsmith_lent_psycopg2", LentPsycopg2),
    "sqlite3": ("sqlite+flowsmith_lent_sqlite", LentSqlite),
}
for _scheme, _cls in _DIALECTS.values():
    registry.register(_scheme.replace("+", "."), __name__, _cls.__name__)

_engines: dict[str, Engine] = {}
_engines_lock = threading.Lock()


@contextlib.contextmanager
def lend(dbapi_connection: Any) -> Iterator[Connection]:
    """A SQLAlchemy Connection over ``dbapi_connection``, inside the transaction it is in.

    Closing it leaves the DBAPI connection open and its transaction as it is.
    """
    engine = _engine_for(dbapi_connection)
    token = _LENT.set(dbapi_connection)
    try:
        with engine.connect() as conn:
            yield conn
    finally:
        _LENT.reset(token)


def _engine_for(dbapi_connection: Any) -> Engine:
    """One engine per driver: NullPool, so each use "connects" to the connection lent now."""
    driver = type(dbapi_connection).__module__.split(".")[0]
    if driver not in _DIALECTS:
        raise ConnectionNotUsable(
            f"connection= holds a {driver} connection ({type(dbapi_connection).__name__}): "
            f"FlowSmith can write in the transactions of {', '.join(sorted(_DIALECTS))} "
            "connections; pass a SQLAlchemy Connection to enqueue on another driver"
        )
    with _engines_lock:
        engine = _engines.get(driver)
        if engine is None:
            scheme = _DIALECTS[driver][0]
            engine = _engines[driver] = sa.create_engine(
                f"{scheme}://", creator=_LENT.get, poolclass=sa.NullPool
            )
    return engine


@contextlib.contextmanager
def callers_transaction(connection: Any, storage_dialect: Dialect) -> Iterator[Connection]:
    """``connection`` as a SQLAlchemy Connection in the caller's transaction.

    ``connection`` is a SQLAlchemy Connection or a Django connection; its
    database must be the storage's kind: the run is written where the
    connection points, and only the storage's workers would run it.
    """
    with _as_sqlalchemy(connection) as conn:
        on = dialect_of(conn)
        if on != storage_dialect:
            raise ConnectionNotUsable(
                f"connection= is on {on.name} but this flow's storage is on "
                f"{storage_dialect.name}: configure() the storage on the database that "
                "connection belongs to (or pass Flow(..., storage=...))"
            )
        yield conn


def _as_sqlalchemy(connection: Any) -> contextlib.AbstractContextManager[Connection]:
    if isinstance(connection, Connection):
        return contextlib.nullcontext(connection)
    # Here, not at the top: only a caller that passes a Django connection needs it.
    from flowsmith_worker.contrib import django

    if django.is_django_connection(connection):
        return _lent_in(django.transaction_of(connection))
    raise ConnectionNotUsable(
        f"connection= takes the SQLAlchemy Connection of your transaction, or a Django "
        f"connection (django.db.connection, connections[alias]), not "
        f"{type(connection).__module__}.{type(connection).__qualname__}"
    )


@contextlib.contextmanager
def _lent_in(transaction: contextlib.AbstractContextManager[Any]) -> Iterator[Connection]:
    """A SQLAlchemy Connection on the DBAPI connection ``transaction`` yields, inside it."""
    with transaction as dbapi_connection, lend(dbapi_connection) as conn:
        yield conn

"""PostgreSQL: the hot statements PREPAREd once per connection, then only EXECUTEd.

The batch write (finish.FINISH_PG) and the claim (claim.CLAIM_PG_*) are
large data-modifying CTEs that a worker sends over and over. psycopg2 puts
every value into the text it sends (an array becomes ARRAY[...]), so each
batch was a new text to parse, analyse and plan: the server's CPU, on a
machine the workers share with it. PREPARE does that once per connection;
each EXECUTE then only binds the values (and PostgreSQL may keep a generic plan).

Which statements a connection holds is kept in the pool's ``info`` of that
DBAPI connection, which SQLAlchemy empties when it replaces the connection (a
restart, pg_terminate_backend): a new connection prepares again, in the same
round trip as its first EXECUTE. A connection that lost its statements behind
our back (DISCARD ALL / DEALLOCATE ALL by a pooler, or a pooler that hands each
transaction another server connection) fails with "prepared statement ...
does not exist" (or "already exists"): ``heal_lost_statements`` makes
SQLAlchemy take that for a dead connection, so the transaction runs once more
on a new one, as after a restart. Behind a pooler in transaction mode that can
keep happening: FLOWSMITH_PG_POOLER=transaction (see sql/pooler.py), or
FLOWSMITH_PG_PREPARE=off alone, sends the plain statements instead.

Must never change what a statement does, only how it is sent.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, CursorResult, Engine, ExceptionContext

from flowsmith_worker.storage.sql import pooler

SWITCH_ENV = "FLOWSMITH_PG_PREPARE"
_OFF = ("off", "0", "false", "no")
_INFO_KEY = "flowsmith_prepared"
# SQLSTATE 26000 invalid_sql_statement_name, 42P05 duplicate_prepared_statement.
_LOST_OR_DUPLICATE = ("26000", "42P05")
_PARAMETER = re.compile(r"%\((\w+)\)s")


def wanted() -> bool:
    """Whether to prepare: on unless FLOWSMITH_PG_PREPARE says off or
    FLOWSMITH_PG_POOLER says transaction (PgBouncer in transaction mode does not
    keep SQL-level PREPAREs)."""
    if pooler.transaction_pooling():
        return False
    return os.environ.get(SWITCH_ENV, "on").strip().lower() not in _OFF


@dataclass(frozen=True)
class PreparedStatement:
    """A statement written with %(name)s placeholders, sent as EXECUTE ``name``.

    ``types`` gives each parameter's SQL type; its order is the order of the
    prepared statement's $1, $2 ... .
    """

    name: str
    text: str
    types: Mapping[str, str]
    _prepare: str = field(init=False)
    _execute: str = field(init=False)
    # The plain statement with :name binds, for a caller's connection on a driver
    # whose placeholders are not %(name)s (asyncpg's $1, pg8000's %s).
    _portable: sa.TextClause = field(init=False)

    def __post_init__(self) -> None:
        order = list(self.types)
        unknown = set(_PARAMETER.findall(self.text)) - set(order)
        if unknown:
            raise ValueError(f"{self.name}: no type given for {sorted(unknown)}")
        body = _PARAMETER.sub(lambda m: f"${order.index(m.group(1)) + 1}", self.text)
        signature = ", ".join(self.types.values())
        object.__setattr__(self, "_prepare", f"PREPARE {self.name} ({signature}) AS {body}")
        arguments = ", ".join(f"%({name})s" for name in order)
        object.__setattr__(self, "_execute", f"EXECUTE {self.name} ({arguments})")
        object.__setattr__(self, "_portable", sa.text(_PARAMETER.sub(r":\1", self.text)))

    def sent_as(self, statement: str) -> bool:
        """Whether ``statement``, as it reached the driver, is this one (prepared or plain)."""
        return statement == self.text or statement.endswith(self._execute)

    def execute(
        self, conn: Connection, values: Mapping[str, Any], *, prepare: bool = True
    ) -> CursorResult[*tuple[Any, ...]]:
        """Run it in ``conn``'s transaction; prepared on this connection first if need be."""
        if not prepare:
            if conn.dialect.paramstyle == "pyformat":  # psycopg2 or psycopg: as written
                return conn.exec_driver_sql(self.text, dict(values))
            # A caller's connection= on another driver (an AsyncConnection on
            # asyncpg, from run_async): SQLAlchemy renders that driver's placeholders.
            return conn.execute(self._portable, dict(values))
        held: set[str] = conn.connection.info.setdefault(_INFO_KEY, set())
        if self.name in held:
            return conn.exec_driver_sql(self._execute, dict(values))
        # PREPARE is not undone by a rollback: once it has run, it is held,
        # whatever becomes of the EXECUTE sent with it in the same round trip.
        result = conn.exec_driver_sql(f"{self._prepare};\n{self._execute}", dict(values))
        held.add(self.name)
        return result


def heal_lost_statements(engine: Engine) -> None:
    """A connection whose prepared statements are not what we hold is replaced.

    SQLAlchemy then invalidates that connection only (not the pool), and the
    error says so (``connection_invalidated``): SqlBase._transact runs the
    transaction once more on a new connection, which prepares afresh.
    """

    @event.listens_for(engine, "handle_error")
    def _lost(context: ExceptionContext) -> None:
        if is_lost_statement(context.original_exception, context.statement):
            context.is_disconnect = True
            context.invalidate_pool_on_disconnect = False


def is_lost_statement(error: BaseException | None, statement: str | None) -> bool:
    """Whether ``statement``, one of ours, failed because the connection does not
    hold the prepared statements we think it does.

    SQLSTATE 26000 "prepared statement ... does not exist" (a pooler reset the
    session, or handed us another server connection), 42P05 "... already
    exists" (the same, the other way round), 0A000 "cached plan must not change
    result type" (a migration altered a table the statement reads). By code, not
    words (the server may speak another language): a lone EXECUTE of a statement
    that PREPAREd fine meets feature_not_supported only when its plan changed.
    """
    if statement is None or not statement.startswith(("EXECUTE fs_", "PREPARE fs_")):
        return False
    code = getattr(error, "pgcode", None)
    if code == "0A000":
        return statement.startswith("EXECUTE fs_")
    return code in _LOST_OR_DUPLICATE


POOLER_HINT = (
    "the connection lost FlowSmith's prepared statements: behind a connection pooler "
    f"in transaction mode (PgBouncer), set {pooler.POOLER_ENV}={pooler.TRANSACTION} "
    f"(no prepared statements, no LISTEN; {SWITCH_ENV}=off turns off only the first)"
)

"""The plumbing every SQL operation shares: engine, transactions, errors, records.

SqlStorage (sql/storage.py) builds on it with the engine's operations, and
SqlOperators (sql/operators.py) with what operators ask.

Owns the engine, the transactions (``_transact``: one per operation, run again after
a deadlock, a serialization failure or a dead connection; ``_read``: no writer's turn,
no write lock on SQLite) and the translation of driver errors into ours. Must never
let a raw driver error, or a URL with its password, reach the caller.
"""

from __future__ import annotations

import contextlib
import json
import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import sqlalchemy as sa
import tenacity
from sqlalchemy.engine import Connection, Row

from flowsmith_worker import payload
from flowsmith_worker.config import PoolSettings, redact, redact_url
from flowsmith_worker.errors import (
    DatabaseUnavailable,
    InvalidDatabaseURL,
    SchemaNotMigrated,
    TransactionConflict,
)
from flowsmith_worker.plan import Plan
from flowsmith_worker.storage.base import (
    AttemptOutcome,
    AttemptRecord,
    FlowRecord,
    FlowStatus,
    FlowSummary,
    NodeRecord,
    NodeStatus,
)
from flowsmith_worker.storage.sql import migrations, notify, schema
from flowsmith_worker.storage.sql import prepared as sql_prepared
from flowsmith_worker.storage.sql.context import stored_input
from flowsmith_worker.storage.sql.dialects import (
    MISSING_SCHEMA,
    READ_ONLY_OPTION,
    DbError,
    SqliteMode,
    create_engine,
    dialect_of,
    is_stale_connection,
)

T = TypeVar("T")
F, N = schema.flows, schema.nodes
# fs_flows without its payloads (input, output): what moving a run on needs. A
# payload may be megabytes; locking a run's row must not read it every time.
FLOW_STATE = [column for column in F.c if column.name not in ("input", "output")]

# Deadlocks between short transactions are resolved by the database aborting
# one of them; running it again is the documented remedy.
_DEADLOCK_RETRY = dict(
    # Seven more after a first try made without tenacity (see _transact).
    stop=tenacity.stop_after_attempt(7),
    wait=tenacity.wait_random(0.005, 0.1),
    reraise=True,
)

# What to do about an unavailable database, where its cause says more than "later".
_UNAVAILABLE_HINTS: dict[DbError | None, str] = {
    DbError.READ_ONLY: ": it takes no writes (a standby, or read-only set): point FlowSmith "
    "at the primary",
    DbError.TOO_MANY_CONNECTIONS: ": its connection limit is reached: raise it "
    "(max_connections), or open fewer (fewer workers, a lower --concurrency or pool_max)",
}


def columns_but(table: sa.Table, *skipped: str) -> list[sa.Column[Any]]:
    """The table's columns but ``skipped`` (payloads a reader does not show)."""
    return [c for c in table.c if c.name not in skipped]


def dumps(value: Any) -> str:
    """Standard JSON within the payload limits (flowsmith_worker.payload), or PayloadRejected."""
    return payload.encode(value)


def loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


class SqlBase:
    supports_notify: bool
    url_for_display: str

    def __init__(self, url: sa.URL, pool: PoolSettings, sqlite_mode: SqliteMode = "rwc") -> None:
        self.engine = create_engine(url, pool, sqlite_mode)
        self.dialect = dialect_of(self.engine)
        self.supports_notify = self.dialect.supports_notify
        self.url_for_display = redact_url(url.render_as_string(hide_password=False))
        # The hot statements are PREPAREd on PostgreSQL (see sql/prepared.py).
        self.prepares = self.dialect.prepares_statements and sql_prepared.wanted()
        if self.prepares:
            sql_prepared.heal_lost_statements(self.engine)
        # SQLite has one write lock per file, and a thread that misses it sleeps
        # in SQLite's busy handler (1, 2, 5 ... 100 ms). Threads of one process
        # queue on a Python lock instead and take turns at once; other processes
        # still meet the busy handler. Row-locking databases need no such turn.
        self._writer_turn: contextlib.AbstractContextManager[Any] = (
            threading.Lock() if not self.dialect.has_row_locks else contextlib.nullcontext()
        )

    # -- plumbing -------------------------------------------------------------

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """Driver errors become ours; the URL shown has no password."""
        try:
            yield
        except sa.exc.DBAPIError as exc:
            if sql_prepared.is_lost_statement(exc.orig, exc.statement):
                # Still lost after running again on new connections: say why
                # ("does not exist" is not a missing table here).
                raise DatabaseUnavailable(
                    f"database {self.url_for_display} is unavailable: {sql_prepared.POOLER_HINT}"
                ) from exc
            kind = self.dialect.classify(exc)
            if kind in MISSING_SCHEMA:
                what = "missing" if kind is DbError.UNDEFINED_TABLE else "older than this code"
                raise SchemaNotMigrated(
                    f"the FlowSmith tables are {what} in {self.url_for_display}: "
                    "run `flowsmith migrate` (or `flowsmith migrate --url URL`)"
                ) from exc
            if exc.statement is None and not self.dialect.is_transient(exc):
                # Raised while connecting, not by a statement: the URL itself is wrong.
                raise InvalidDatabaseURL(
                    f"cannot connect to {self.url_for_display}: {_first_line(exc.orig or exc)}"
                ) from exc
            if self.dialect.is_conflict(exc):
                raise TransactionConflict(
                    f"transaction conflict on {self.url_for_display} "
                    f"({_first_line(exc.orig or exc)}): retry the transaction"
                ) from exc
            if self.dialect.is_transient(exc):
                raise DatabaseUnavailable(
                    f"database {self.url_for_display} is unavailable: "
                    f"{type(exc.orig).__name__}: {_first_line(exc.orig or exc)}"
                    f"{_UNAVAILABLE_HINTS.get(kind, '')}"
                ) from exc
            raise

    def _transact(self, work: Callable[[Connection], T], connection: Any = None) -> T:
        """Run ``work`` in a transaction of ours, or inside the caller's own.

        ``connection``: the caller's SQLAlchemy Connection or Django connection.
        """
        with self._errors():
            if connection is not None:
                # Imported on first use: the worker and most enqueues never pass one.
                from flowsmith_worker.storage.sql.lent import callers_transaction

                with callers_transaction(connection, self.dialect) as conn:
                    return work(conn)
            try:  # the usual case: no retry machinery built for it
                with self._writer_turn, self.engine.begin() as conn:
                    return work(conn)
            except sa.exc.DBAPIError as exc:
                if not self.dialect.is_worth_running_again(exc):
                    raise
                time.sleep(random.uniform(0.005, 0.1))  # let the other transaction finish
            for attempt in tenacity.Retrying(
                retry=tenacity.retry_if_exception(self.dialect.is_worth_running_again),
                **_DEADLOCK_RETRY,  # type: ignore[arg-type]
            ):
                with attempt, self._writer_turn, self.engine.begin() as conn:
                    return work(conn)
        raise AssertionError("unreachable")  # pragma: no cover

    def _read(self, work: Callable[[Connection], T]) -> T:
        """Run ``work``, which only reads: no writer's turn, no write lock on SQLite."""
        with self._errors():
            try:
                return self._read_once(work)
            except sa.exc.DBAPIError as exc:
                if not is_stale_connection(exc):
                    raise
            return self._read_once(work)  # once more, on a new connection

    def _read_once(self, work: Callable[[Connection], T]) -> T:
        with self.engine.connect() as conn:
            conn = conn.execution_options(**{READ_ONLY_OPTION: True})
            with conn.begin():
                return work(conn)

    def _now(self) -> sa.ColumnElement[float]:
        return self.dialect.now()

    # -- schema ---------------------------------------------------------------

    def migrate(self) -> int:
        with self._errors(), self.engine.connect() as conn, conn.begin():
            return migrations.migrate(conn, self.dialect)

    def check_schema(self) -> None:
        with self._errors(), self.engine.connect() as conn:
            version = migrations.current_version(conn)
        if version < schema.SCHEMA_VERSION:
            raise SchemaNotMigrated(
                f"the FlowSmith schema in {self.url_for_display} is at version {version}, "
                f"this code needs {schema.SCHEMA_VERSION}: run `flowsmith migrate`"
            )
        if version > schema.SCHEMA_VERSION:
            raise SchemaNotMigrated(
                f"the FlowSmith schema in {self.url_for_display} is at version {version}, "
                f"newer than this code knows ({schema.SCHEMA_VERSION}): upgrade flowsmith-worker"
            )

    def _lock_flow(self, conn: Connection, where: sa.ColumnElement[bool]) -> Row[Any] | None:
        """The flow row, locked until commit; None if it is gone (pruned)."""
        return conn.execute(self.dialect.for_update(sa.select(*FLOW_STATE).where(where))).first()

    def listen_for_work(self, *, on_notify: Callable[[str], None], stop: threading.Event) -> None:
        if not self.supports_notify:
            raise NotImplementedError(f"{self.url_for_display} has no NOTIFY; poll instead")
        notify.listen_for_work(self.engine, on_notify, stop)

    def close(self) -> None:
        self.engine.dispose()


def _first_line(error: BaseException) -> str:
    """The driver's first line, without any password it quotes back."""
    return redact((str(error).strip().splitlines() or [""])[0])


class _TolerantRow:
    """Reads a row's stored values; one that cannot be read is noted, not raised,
    so one corrupt row (hand-edited, or written by a newer version) never makes
    the operators' tools unusable."""

    def __init__(self, row: Row[Any]) -> None:
        self._values = row._mapping
        self.unreadable: dict[str, str] = {}

    def read(self, column: str, parse: Callable[[Any], T], placeholder: T) -> T:
        """The parsed value; ``placeholder`` if the column was not selected or is unreadable."""
        if column not in self._values:
            return placeholder
        raw = self._values[column]
        try:
            return parse(raw)
        except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as exc:
            self.unreadable[column] = _why_unreadable(raw, exc)
            return placeholder


def _why_unreadable(raw: Any, error: Exception) -> str:
    shown = repr(raw) if len(repr(raw)) <= 40 else repr(raw)[:37] + "..."
    return f"{shown}: {type(error).__name__}: {_first_line(error)}"


# Placeholders for unreadable values. A run whose status cannot be read goes no
# further without an operator, as a FAILED one; readers check `unreadable` first.
_NO_PLAN = Plan(stages=())


def flow_record(row: Row[Any]) -> FlowRecord:
    values = _TolerantRow(row)
    return FlowRecord(
        id=row.id,
        flow_name=row.flow_name,
        tracking_id=row.tracking_id,
        status=values.read("status", FlowStatus, FlowStatus.FAILED),
        input=values.read("input", stored_input, {}),
        output=values.read("output", loads, None),
        error=row.error,
        plan=values.read("plan", Plan.from_json, _NO_PLAN),
        queue=row.queue,
        priority=row.priority,
        parent_node_id=row.parent_node_id,
        created_at=row.created_at,
        updated_at=row.updated_at,
        finished_at=row.finished_at,
        unreadable=values.unreadable,
        concurrency_key=row.concurrency_key,
        key_turn=row.key_turn,
    )


def flow_summary(row: Row[Any]) -> FlowSummary:
    values = _TolerantRow(row)
    return FlowSummary(
        id=row.id,
        flow_name=row.flow_name,
        tracking_id=row.tracking_id,
        status=values.read("status", FlowStatus, FlowStatus.FAILED),
        queue=row.queue,
        priority=row.priority,
        parent_node_id=row.parent_node_id,
        error=row.error,
        created_at=row.created_at,
        updated_at=row.updated_at,
        finished_at=row.finished_at,
        unreadable=values.unreadable,
    )


def node_record(row: Row[Any], input: dict[str, Any]) -> NodeRecord:
    """The node of ``row`` with its ``input``, rebuilt from the run's payloads."""
    values = _TolerantRow(row)
    return NodeRecord(
        id=row.id,
        flow_id=row.flow_id,
        step_name=row.step_name,
        position=row.position,
        group_index=row.group_index,
        status=values.read("status", NodeStatus, NodeStatus.FAILED),
        attempt=row.attempt,
        max_attempts=row.max_attempts,
        rescues=row.rescues,
        run_after=row.run_after,
        lease_owner=row.lease_owner,
        lease_expires_at=row.lease_expires_at,
        input=input,
        output=values.read("output", loads, None),
        error=row.error,
        started_at=row.started_at,
        finished_at=row.finished_at,
        unreadable=values.unreadable,
        wake_at=getattr(row, "wake_at", None),
    )


def attempt_record(row: Row[Any]) -> AttemptRecord:
    """An attempt of fs_attempts (with its node's step_name)."""
    values = _TolerantRow(row)
    return AttemptRecord(
        node_id=row.node_id,
        flow_id=row.flow_id,
        step_name=row.step_name,
        attempt=row.attempt,
        worker_id=row.worker_id,
        started_at=row.started_at,
        ended_at=row.ended_at,
        outcome=values.read("outcome", AttemptOutcome, AttemptOutcome.FAILED),
        error=row.error,
        unreadable=values.unreadable,
    )

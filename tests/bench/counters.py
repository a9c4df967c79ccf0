"""Round trips, statements and commits per step, as the database counts them.

* PostgreSQL: pg_stat_statements (calls of every statement in the benchmark's
  database, BEGIN, COMMIT and the pool's ping included: with psycopg2 each call
  is one round trip), pg_stat_database.xact_commit and pg_stat_wal.wal_sync
  (log flushes). Read after the workers exited, since a backend reports its
  transaction counts when it goes idle or away.
* MariaDB: SHOW GLOBAL STATUS. Round trips = Questions (every client statement)
  + Com_admin_commands (COM_PING, which Questions leaves out); statements =
  the Com_* counts of SELECT/INSERT/UPDATE/DELETE/REPLACE; commits = Com_commit;
  log flushes = Innodb_data_fsyncs. The server is the benchmark's own, so
  global counts are ours.
* SQLite has no server: a Worker in this process drains the same flows while
  sqlite3's trace callback counts every statement each connection runs
  (BEGIN and COMMIT included: each is one call into the library).

The benchmark's own monitoring queries are left out: they carry MONITOR_MARK
(PostgreSQL) or are counted by the caller and subtracted (``monitor_queries``,
each one statement in autocommit).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import sqlalchemy as sa

from tests.bench.targets import Target
from tests.bench.workload import MONITOR_MARK

_CONTROL = ("BEGIN", "COMMIT", "ROLLBACK", "END", "SAVEPOINT", "RELEASE")
_BREAKDOWN_SIZE = 12
_QUERY_CHARS = 90
_MARIADB_STATEMENTS = (
    "Com_select",
    "Com_insert",
    "Com_insert_select",
    "Com_update",
    "Com_update_multi",
    "Com_delete",
    "Com_delete_multi",
    "Com_replace",
    "Com_replace_select",
)


@dataclass(frozen=True)
class Counts:
    round_trips: int
    statements: int
    commits: int
    # Write-ahead log syncs (fsync/fdatasync), the physical cost of a durable commit.
    log_flushes: int | None
    source: str
    # The most frequent statements (or statement kinds), so a figure can be explained.
    breakdown: dict[str, int]

    def per_step(self, steps: int) -> dict[str, Any]:
        figures: dict[str, Any] = asdict(self)
        for key in ("round_trips", "statements", "commits", "log_flushes"):
            value = figures[key]
            figures[key] = value / steps if steps and value is not None else None
        figures["breakdown"] = {k: v / steps for k, v in self.breakdown.items()} if steps else {}
        figures["steps"] = steps
        return figures


class ServerCounters:
    """Take a baseline with start(), then read the difference with counts()."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self._before: dict[str, int] = {}

    def start(self) -> None:
        if self.target.backend == "postgresql":
            with self.target.engine.connect() as conn:
                conn.execute(sa.text("CREATE EXTENSION IF NOT EXISTS pg_stat_statements"))
                conn.execute(sa.text("SELECT pg_stat_statements_reset()"))
                conn.execute(sa.text("SELECT pg_stat_reset()"))
                conn.execute(sa.text("SELECT pg_stat_reset_shared('wal')"))
        else:
            self._before = self._mariadb_status()

    def counts(self, monitor_queries: int) -> Counts:
        if self.target.backend == "postgresql":
            return self._postgres_counts(monitor_queries)
        return self._mariadb_counts(monitor_queries)

    def _postgres_counts(self, monitor_queries: int) -> Counts:
        calls = sa.text(
            "SELECT s.query, s.calls FROM pg_stat_statements s"
            " JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = current_database()"
        )
        commits = sa.text(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
        )
        # A backend reports its transaction counts when idle for a second or when it
        # exits: end the monitor's session so its commits are all in, then subtract them.
        self.target.engine.dispose()
        time.sleep(0.5)
        with self.target.engine.connect() as conn:
            rows = [(str(q), int(c)) for q, c in conn.execute(calls) if MONITOR_MARK not in q]
            committed = int(conn.execute(commits).scalar_one())
            syncs = int(conn.execute(sa.text("SELECT wal_sync FROM pg_stat_wal")).scalar_one())
        ours = [(q, c) for q, c in rows if not _is_bookkeeping(q)]
        top = sorted(ours, key=lambda row: -row[1])[:_BREAKDOWN_SIZE]
        return Counts(
            round_trips=sum(c for _, c in ours),
            statements=sum(c for q, c in ours if not _is_control(q)),
            # + 1: the transaction of pg_stat_reset() itself, counted after the reset.
            commits=max(0, committed - monitor_queries - 1),
            log_flushes=syncs,
            source="pg_stat_statements calls, pg_stat_database.xact_commit "
            "(read-only transactions too), pg_stat_wal.wal_sync",
            breakdown={" ".join(q.split())[:_QUERY_CHARS]: c for q, c in top},
        )

    def _mariadb_status(self) -> dict[str, int]:
        with self.target.engine.connect() as conn:
            rows = conn.execute(sa.text("SHOW GLOBAL STATUS"))
            return {str(k): int(v) for k, v in rows if str(v).isdigit()}

    def _mariadb_counts(self, monitor_queries: int) -> Counts:
        after = self._mariadb_status()

        def delta(name: str) -> int:
            return after.get(name, 0) - self._before.get(name, 0)

        commands = {k: delta(k) for k in after if k.startswith("Com_") and delta(k) > 0}
        top = sorted(commands.items(), key=lambda item: -item[1])[:_BREAKDOWN_SIZE]
        # Questions also counts the SHOW GLOBAL STATUS that took `after`.
        return Counts(
            round_trips=delta("Questions") + delta("Com_admin_commands") - monitor_queries - 1,
            statements=sum(delta(name) for name in _MARIADB_STATEMENTS) - monitor_queries,
            commits=delta("Com_commit"),
            # MariaDB 10.11 has no Innodb_os_log_fsyncs: its redo log syncs are counted
            # here, with the (rare, checkpoint-time) data file syncs.
            log_flushes=delta("Innodb_data_fsyncs"),
            source="SHOW GLOBAL STATUS: Questions + Com_admin_commands, Com_*, Com_commit, "
            "Innodb_data_fsyncs",
            breakdown=dict(top),
        )


def _is_control(query: str) -> bool:
    return query.lstrip().upper().startswith(_CONTROL) or query.strip() == "SELECT $1"


def _is_bookkeeping(query: str) -> bool:
    """Counter resets and reads made by this module."""
    return "pg_stat_statements_reset" in query or "pg_stat_reset" in query


class _SqliteTrace:
    """Counts the statements every new sqlite3 connection of this process runs."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.shapes: Counter[str] = Counter()
        self._lock = threading.Lock()

    def on_connect(self, dbapi_connection: Any, _record: Any) -> None:
        if isinstance(dbapi_connection, sqlite3.Connection):
            dbapi_connection.set_trace_callback(self._traced)

    def _traced(self, statement: str) -> None:
        words = statement.split()
        head = words[0].upper() if words else ""
        kind = "commit" if head in ("COMMIT", "END") else "control" if head in _CONTROL else "sql"
        if head == "PRAGMA":
            kind = "pragma"  # connection setup, not per-step work
        # The statement's shape: its first words, before any value is spliced in.
        shape = " ".join(words[:4])
        with self._lock:
            self.counts[kind] += 1
            self.shapes[shape] += 1

    def result(self) -> Counts:
        with self._lock:
            counts = Counter(self.counts)
            top = self.shapes.most_common(_BREAKDOWN_SIZE)
        return Counts(
            round_trips=counts["sql"] + counts["control"] + counts["commit"],
            statements=counts["sql"],
            commits=counts["commit"],
            log_flushes=None,
            source="sqlite3 trace callback on every connection of an in-process Worker",
            breakdown=dict(top),
        )


@contextmanager
def traced_sqlite() -> Iterator[_SqliteTrace]:
    """Trace every SQLite connection opened (through any SQLAlchemy pool) meanwhile."""
    trace = _SqliteTrace()
    sa.event.listen(sa.pool.Pool, "connect", trace.on_connect)
    try:
        yield trace
    finally:
        sa.event.remove(sa.pool.Pool, "connect", trace.on_connect)

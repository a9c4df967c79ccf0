"""The tables, in one place.

Times are stored as seconds since the epoch (DOUBLE), taken from the database
clock (see storage/sql/dialects/): one representation on three databases, compared and
added to without dialect date functions, and no host clock ever decides a lease.
JSON values are stored as text we encode ourselves, so a row can never run code
and every backend stores exactly the same bytes. Names (tracking_id, flow, step,
queue and worker ids) are Identifier columns: compared byte for byte everywhere.

This is the schema of the newest version; migrations/ builds it step by step,
each version from tables of its own (never from these), and tests/integration/
test_migrations.py checks that the two agree. Change a table here only with a
new migration that makes the same change.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import mysql
from sqlalchemy.ext.compiler import compiles

from flowsmith_worker.storage.sql.dialects import identifier_collation

SCHEMA_VERSION = 7

metadata = sa.MetaData()

# Large text: MySQL's TEXT stops at 64 KiB, which a run's input, a step's output
# or an error's traceback can pass (up to the payload limit, see payload.py).
LongText = sa.Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb")
# SQLite only auto-increments INTEGER PRIMARY KEY columns.
Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Seconds: sa.Double[float] = sa.Double()


class Identifier(sa.String):
    """A name that equals another only when their bytes are equal.

    PostgreSQL's and SQLite's default comparison already is; MySQL's default
    collation would make `Order-aBc`, `order-AbC` and `order-abc ` one run.
    """


@compiles(Identifier, "mysql")
@compiles(Identifier, "mariadb")
def _identifier_on_mysql(type_: Identifier, compiler: Any, **_kw: Any) -> str:
    collation = identifier_collation(compiler.dialect)
    return f"VARCHAR({type_.length}) CHARACTER SET utf8mb4 COLLATE {collation}"


# fs_flows and fs_nodes are queue tables: every step updates rows of both, so
# dead tuples pile up fast. PostgreSQL's defaults vacuum a table once a fifth of
# it is dead and throttle the vacuum; a claim scanning a bloated index slows
# down long before that. Vacuum after 1 % and unthrottled (created by migration 4).
AUTOVACUUM_OFTEN = {"autovacuum_vacuum_scale_factor": 0.01, "autovacuum_vacuum_cost_delay": 0}

# The versions applied, one row each; every migrate creates it first (migrations/v0.py).
schema_version = sa.Table(
    "fs_schema_version",
    metadata,
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("applied_at", Seconds, nullable=False),
)

flows = sa.Table(
    "fs_flows",
    metadata,
    sa.Column("id", Id, primary_key=True, autoincrement=True),
    sa.Column("flow_name", Identifier(200), nullable=False),
    sa.Column("tracking_id", Identifier(255), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("input", LongText, nullable=False),
    sa.Column("output", LongText),
    sa.Column("error", LongText),
    sa.Column("plan", LongText, nullable=False),
    sa.Column("queue", Identifier(100), nullable=False),
    sa.Column("priority", sa.Integer, nullable=False),
    sa.Column("parent_node_id", Id),
    sa.Column("created_at", Seconds, nullable=False),
    sa.Column("updated_at", Seconds, nullable=False),
    sa.Column("finished_at", Seconds),
    # The run's concurrency key and its place under it (see concurrency.py);
    # NULL for a run of a flow without one. Added by migration 7.
    sa.Column("concurrency_key", Identifier(255)),
    sa.Column("key_turn", Seconds),
    sa.UniqueConstraint("tracking_id", name="fs_flows_tracking_id_key"),
    sa.Index("fs_flows_parent_node_id", "parent_node_id"),
    # flowsmith flows --status ... and prune --older-than.
    sa.Index("fs_flows_status_updated", "status", "updated_at"),
    # Ids are fencing tokens: never hand a deleted run's id to a new one.
    sqlite_autoincrement=True,
    postgresql_with=AUTOVACUUM_OFTEN,
)
# flowsmith flows (newest first); created by migration 2.
flows_by_created = sa.Index("fs_flows_created", flows.c.created_at)

nodes = sa.Table(
    "fs_nodes",
    metadata,
    sa.Column("id", Id, primary_key=True, autoincrement=True),
    sa.Column("flow_id", Id, sa.ForeignKey("fs_flows.id", ondelete="CASCADE"), nullable=False),
    sa.Column("step_name", Identifier(200), nullable=False),
    sa.Column("position", sa.Integer, nullable=False),
    sa.Column("group_index", sa.Integer, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    # Copied from the flow so the claim reads one table through one index.
    sa.Column("queue", Identifier(100), nullable=False),
    sa.Column("priority", sa.Integer, nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("max_attempts", sa.Integer, nullable=False),
    sa.Column("rescues", sa.Integer, nullable=False),
    sa.Column("run_after", Seconds, nullable=False),
    sa.Column("lease_owner", Identifier(64)),
    sa.Column("lease_expires_at", Seconds),
    sa.Column("output", LongText),
    sa.Column("error", LongText),
    sa.Column("created_at", Seconds, nullable=False),
    sa.Column("started_at", Seconds),
    sa.Column("finished_at", Seconds),
    # A parked sleep or wait for an event: when it wakes (see parking.py); NULL
    # for every other node. Added by migration 6.
    sa.Column("wake_at", Seconds),
    sa.UniqueConstraint("flow_id", "step_name", name="fs_nodes_flow_step_key"),
    # A late completion is fenced by (node id, worker, attempt): a reused id could match.
    sqlite_autoincrement=True,
    postgresql_with=AUTOVACUUM_OFTEN,
)

# The claim: runnable nodes by queue, priority and run_after. PostgreSQL and
# SQLite keep only PENDING rows in it (a partial index stays small however many
# finished rows pile up); MySQL has no partial indexes, so status leads instead.
_pending = nodes.c.status == "PENDING"
sa.Index(
    "fs_nodes_runnable",
    nodes.c.queue,
    nodes.c.priority,
    nodes.c.run_after,
    nodes.c.id,
    postgresql_where=_pending,
    sqlite_where=_pending,
).ddl_if(dialect=("postgresql", "sqlite"))  # type: ignore[arg-type]  # tuples are documented
# A worker of several queues claims in the same order across them: through the
# index above that is a sort of every due node of its queues (a 100,000-node
# backlog: ~100 ms per claim), through this one a walk of the first few in
# order (created by migration 4). MySQL has none: without a partial index it
# would be rewritten at every step, not once per run.
sa.Index(
    "fs_nodes_runnable_in_order",
    nodes.c.priority,
    nodes.c.run_after,
    nodes.c.id,
    postgresql_where=_pending,
    sqlite_where=_pending,
).ddl_if(dialect=("postgresql", "sqlite"))  # type: ignore[arg-type]  # tuples are documented
sa.Index(
    "fs_nodes_runnable_by_status",
    nodes.c.status,
    nodes.c.queue,
    nodes.c.priority,
    nodes.c.run_after,
).ddl_if(dialect=("mysql", "mariadb"))  # type: ignore[arg-type]  # tuples are documented
# The rescue: RUNNING nodes by lease expiry. PostgreSQL keeps only unfinished
# rows in it (created by migration 4): a finishing node then writes no entry
# here, about 75 bytes of WAL less per step, and the index stays as small as
# the work in flight however many finished rows pile up. PENDING stays in so
# that "status IN (PENDING, RUNNING)" (count_open_nodes) can use it too. As
# with fs_nodes_runnable, the planner proves the predicate from literal
# statuses only: a generic plan with the status as a parameter cannot use it.
# SQLite matches a partial index only by the same term, MySQL has none.
_unfinished = nodes.c.status.in_(["PENDING", "RUNNING"])
sa.Index(
    "fs_nodes_status_lease",
    nodes.c.status,
    nodes.c.lease_expires_at,
    postgresql_where=_unfinished,
)

# Version 2 ------------------------------------------------------------------

# Live workers, for `flowsmith workers`; a row whose heartbeat is older than
# three of its leases belongs to a dead process and is removed by any rescuer.
workers = sa.Table(
    "fs_workers",
    metadata,
    sa.Column("id", Identifier(64), primary_key=True),
    sa.Column("host", sa.String(255), nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("version", sa.String(32), nullable=False),
    sa.Column("queues", sa.String(1000), nullable=False),
    sa.Column("concurrency", sa.Integer, nullable=False),
    sa.Column("lease_seconds", Seconds, nullable=False),
    sa.Column("in_flight", sa.Integer, nullable=False),
    sa.Column("started_at", Seconds, nullable=False),
    sa.Column("heartbeat_at", Seconds, nullable=False),
)

# Per-queue limits on steps RUNNING at once, across all workers. A claim on a
# limited queue locks its row, so two workers cannot both take the last slot.
queues = sa.Table(
    "fs_queues",
    metadata,
    sa.Column("name", Identifier(100), primary_key=True),
    sa.Column("max_running", sa.Integer),
)

# Version 5 ------------------------------------------------------------------

# The attempts a node left behind: a failure that was retried, a lost worker
# (rescued), a release at shutdown, a failed subflow. A node's row describes its
# latest attempt; a row is written here only when a write makes the node run
# again, in that write's transaction, so a step that succeeds at once writes
# nothing here (see progress.py). Deleted with the run (prune).
attempts = sa.Table(
    "fs_attempts",
    metadata,
    sa.Column("node_id", Id, sa.ForeignKey("fs_nodes.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("attempt", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("flow_id", Id, nullable=False),
    # Shown, never compared as a name: no byte-for-byte collation needed.
    sa.Column("worker_id", sa.String(64)),
    sa.Column("started_at", Seconds, nullable=False),
    sa.Column("ended_at", Seconds, nullable=False),
    sa.Column("outcome", sa.String(16), nullable=False),
    sa.Column("error", LongText),
    # A run's attempts, for its trace and its prune.
    sa.Index("fs_attempts_flow", "flow_id"),
)

# Version 6 ------------------------------------------------------------------

# Events sent to runs (send_event), one per run and name: kept from the moment
# it is sent, so an event sent before the run reaches its wait_for step is
# there when it does; the step's output is its payload. ``idempotency_key``
# lets a sender send again without a second delivery. Deleted with the run.
events = sa.Table(
    "fs_events",
    metadata,
    sa.Column("flow_id", Id, sa.ForeignKey("fs_flows.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("name", Identifier(200), primary_key=True),
    sa.Column("payload", LongText, nullable=False),
    sa.Column("idempotency_key", Identifier(255)),
    sa.Column("created_at", Seconds, nullable=False),
)

# Version 7 ------------------------------------------------------------------

# A key's places: the runs in flight (key_turn = IN_FLIGHT) counted, the ones
# waiting (key_turn > 0) taken in turn. PostgreSQL and SQLite keep only runs with
# a key in it, so a run without one writes no entry; on MySQL such a run's entry
# (NULL, NULL) never changes either.
_keyed = flows.c.concurrency_key.is_not(None)
sa.Index(
    "fs_flows_key_turn",
    flows.c.flow_name,
    flows.c.concurrency_key,
    flows.c.key_turn,
    postgresql_where=_keyed,
    sqlite_where=_keyed,
)

# One row per flow and concurrency key: its limit, and the lock that orders every
# change to the key's places (see concurrency.py). Kept when the key's runs are
# pruned (a few bytes per key).
concurrency_keys = sa.Table(
    "fs_concurrency_keys",
    metadata,
    sa.Column("flow_name", Identifier(200), primary_key=True),
    sa.Column("concurrency_key", Identifier(255), primary_key=True),
    sa.Column("max_concurrent", sa.Integer, nullable=False),
)

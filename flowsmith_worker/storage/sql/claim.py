"""The claim's statements, built once: the runnable nodes of a worker's queues, leased to it.

Three shapes, fewest statements each database allows:

* PostgreSQL: one statement (CLAIM_PG) picks, leases and starts runs, and
  returns the nodes with their run's input; a data-modifying CTE is one
  transaction's worth of work in one round trip.
* MySQL/MariaDB: no UPDATE ... RETURNING, and a table cannot be updated while a
  subquery selects from it: lock the ids (RUNNABLE), lease them (LEASE), read
  them back (CLAIMED), start their runs (START_RUNS).
* SQLite: the same statements, after one read (SQLITE_PRECHECK) in a plain
  BEGIN, so an empty poll never takes the file's one write lock.

Queue caps (fs_queues.max_running) need a lookup and a lock, which no uncapped
queue should pay for. So every uncapped claim carries a guard: it takes nothing
while any of its queues has a cap, and says so (``capped``); the storage then
takes the capped path (SqlStorage._runnable_ids), which locks the caps' rows,
and remembers to go there first until no cap is left.

Statuses are literals, never bound parameters: with a parameter a prepared
(generic) plan on PostgreSQL cannot use the partial index fs_nodes_runnable,
whose predicate is status = 'PENDING', and scans the table instead.

Owns the statements, not their sending (SqlStorage.claim_nodes sends them). This is
the hot path: a change here must never add a statement or a round trip to a claim or
to an idle poll.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, cast

import sqlalchemy as sa

from flowsmith_worker.storage.sql import schema
from flowsmith_worker.storage.sql.dialects import Dialect
from flowsmith_worker.storage.sql.prepared import PreparedStatement

F, N, Q = schema.flows, schema.nodes, schema.queues

PENDING: sa.ColumnElement[str] = sa.literal_column("'PENDING'")
RUNNING: sa.ColumnElement[str] = sa.literal_column("'RUNNING'")

_queues: sa.BindParameter[Any] = sa.bindparam("queues", expanding=True)
_ids: sa.BindParameter[Any] = sa.bindparam("ids", expanding=True)

# Whether any queue of the worker has a cap (then the capped path claims).
_CAPPED = sa.exists().where(Q.c.name.in_(_queues), Q.c.max_running.is_not(None))


@dataclass(frozen=True)
class ClaimStatements:
    """The statements of the multi-statement claim (MySQL/MariaDB and SQLite)."""

    runnable: sa.Select[Any]
    lease: sa.Update
    claimed: sa.Select[Any]
    start_runs: sa.Update
    sqlite_precheck: sa.Select[Any]
    capped: sa.Select[Any]


@functools.cache
def statements(dialect: Dialect) -> ClaimStatements:
    """Built once per dialect: a claim only binds its values."""
    return ClaimStatements(
        runnable=runnable(dialect),
        lease=lease(dialect),
        claimed=claimed(),
        start_runs=start_runs(dialect),
        sqlite_precheck=sqlite_precheck(dialect),
        capped=sa.select(_CAPPED),
    )


def runnable(dialect: Dialect) -> sa.Select[Any]:
    """Up to :limit runnable node ids, locked; none while a queue of the worker is capped.

    SQLAlchemy compiles FOR UPDATE SKIP LOCKED to nothing on SQLite; that is
    right there, as BEGIN IMMEDIATE already made this transaction the only writer.
    On MySQL the locking clause does not lock fs_queues, read in a subquery.
    """
    return dialect.for_claim(
        sa.select(N.c.id, N.c.priority, N.c.run_after)
        .where(
            N.c.status == PENDING,
            N.c.run_after <= dialect.now(),
            N.c.queue.in_(_queues),
            ~_CAPPED,
        )
        .order_by(N.c.priority, N.c.run_after, N.c.id)
        .limit(sa.bindparam("limit"))
    )


def lease(dialect: Dialect) -> sa.Update:
    """Lease the nodes :ids to :worker_id for :lease_seconds, as a new attempt."""
    now = dialect.now()
    return (
        sa.update(N)
        .where(N.c.id.in_(_ids))
        .values(
            status=RUNNING,
            lease_owner=sa.bindparam("worker_id"),
            attempt=N.c.attempt + 1,
            lease_expires_at=now + sa.bindparam("lease_seconds", type_=sa.Double()),
            started_at=now,
            finished_at=None,
        )
    )


# A run's input is read once however many of its nodes are claimed together
# (the siblings of a wide group): on its first node's row only.
_first_of_its_run = sa.func.row_number().over(partition_by=N.c.flow_id, order_by=N.c.id)


def claimed() -> sa.Select[Any]:
    """The nodes :ids as just leased, with their run's names, status and input."""
    return (
        sa.select(
            N.c.id,
            N.c.flow_id,
            N.c.step_name,
            N.c.attempt,
            N.c.max_attempts,
            N.c.position,
            F.c.flow_name,
            F.c.tracking_id,
            F.c.status.label("flow_status"),
            sa.case((_first_of_its_run == 1, F.c.input)).label("run_input"),
        )
        .join(F, F.c.id == N.c.flow_id)
        .where(N.c.id.in_(_ids))
        .order_by(N.c.priority, N.c.run_after, N.c.id)
    )


def start_runs(dialect: Dialect) -> sa.Update:
    """A run's first claim moves it from PENDING to RUNNING."""
    return (
        sa.update(F)
        .where(F.c.id.in_(_ids), F.c.status == PENDING)
        .values(status=RUNNING, updated_at=dialect.now())
    )


def sqlite_precheck(dialect: Dialect) -> sa.Select[Any]:
    """Whether anything is runnable now on :queues, and whether one of them is capped."""
    due = sa.exists().where(
        N.c.status == PENDING, N.c.run_after <= dialect.now(), N.c.queue.in_(_queues)
    )
    return cast("sa.Select[Any]", sa.select(due.label("runnable"), _CAPPED.label("capped")))


# PostgreSQL: the whole claim in one statement. `picked` locks first (SKIP
# LOCKED: nodes another claimer holds are passed over), then `claimed` leases
# them, `started` moves their runs' first claims to RUNNING; the SELECT sees the
# runs as they were (flow_status), as every CTE reads the statement's snapshot.
# The one `guard` row makes the statement answer even when it claims nothing.
# One queue compares with `=`, so the index hands the rows over in claim order;
# `= ANY(...)` of several queues makes PostgreSQL sort the due rows first.
# The claimed nodes and their runs are read by key, `= ANY(ARRAY(SELECT ...))`,
# not joined: the plan PostgreSQL keeps for a prepared statement (the generic
# one, once it looks no dearer than planning each time, as on small tables)
# estimates LIMIT %(limit)s as a tenth of the due rows, and for thousands it
# chose a hash join over all of fs_nodes and a merge join over all of fs_flows
# (tests/integration/test_claim_plans.py); an array of keys is an index lookup whatever its size.
_NOW_PG = "extract(epoch FROM now())::float8"
_CLAIM_PG = """
WITH guard AS MATERIALIZED (
    SELECT EXISTS (
        SELECT 1 FROM fs_queues WHERE name = ANY(%(queues)s) AND max_running IS NOT NULL
    ) AS capped
), picked AS MATERIALIZED (
    SELECT id FROM fs_nodes
    WHERE status = 'PENDING' AND {queue_is} AND run_after <= {now}
      AND NOT (SELECT capped FROM guard)
    ORDER BY priority, run_after, id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), claimed AS (
    UPDATE fs_nodes n
    SET status = 'RUNNING', lease_owner = %(worker_id)s, attempt = n.attempt + 1,
        lease_expires_at = {now} + %(lease_seconds)s, started_at = {now},
        finished_at = NULL
    WHERE n.id = ANY(ARRAY(SELECT id FROM picked))
    RETURNING n.id, n.flow_id, n.step_name, n.attempt, n.max_attempts, n.position,
              n.priority, n.run_after
), started AS (
    UPDATE fs_flows f SET status = 'RUNNING', updated_at = {now}
    WHERE f.id IN (SELECT flow_id FROM claimed) AND f.status = 'PENDING'
)
SELECT g.capped, c.id, c.flow_id, c.step_name, c.attempt, c.max_attempts, c.position,
       f.flow_name, f.tracking_id,
       CASE WHEN row_number() OVER (PARTITION BY c.flow_id ORDER BY c.id) = 1
            THEN f.input END AS run_input
FROM guard g
LEFT JOIN (
    claimed c JOIN fs_flows f ON f.id = c.flow_id AND f.id = ANY(ARRAY(SELECT flow_id FROM claimed))
) ON true
ORDER BY c.priority, c.run_after, c.id
"""
# Prepared once per connection (sql/prepared.py), as the claim is sent at every poll.
_CLAIM_TYPES = {"queues": "text[]", "limit": "int", "worker_id": "text", "lease_seconds": "float8"}
CLAIM_PG_ONE_QUEUE = PreparedStatement(
    "fs_claim_one_queue",
    _CLAIM_PG.format(queue_is="queue = %(only_queue)s", now=_NOW_PG),
    {**_CLAIM_TYPES, "only_queue": "text"},
)
CLAIM_PG_QUEUES = PreparedStatement(
    "fs_claim_queues",
    _CLAIM_PG.format(queue_is="queue = ANY(%(queues)s)", now=_NOW_PG),
    _CLAIM_TYPES,
)

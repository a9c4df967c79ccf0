"""A batch of finished sequential steps written set-based (PostgreSQL and SQLite).

Most outcomes a worker writes are the common case: a step alone in its stage
finished well, and its run either goes on with a step alone in the next stage
or is complete. For those, the batch (CompletionBatcher, Storage.complete_batch)
has already locked the runs and the storage has decided, with the same pure
functions as every other path (progress.after_stage, progress.chains), what
comes next. What is left is to apply it, and FINISH_PG does that for the whole
batch in one round trip on PostgreSQL (SQLite, with no data-modifying CTEs,
sends the same three parts as three statements, each for the whole batch,
unpacking the batch from JSON with json_each):

* ``done``: each node's fenced write, per row: (node, RUNNING, worker, attempt);
* ``started``: for each node written, its run's next node, RUNNING and leased to
  the worker when the batch chains, else PENDING for any worker;
* ``completed``: the runs whose last step it was.

Only the rows ``done`` wrote move their runs on, so a lost lease moves nothing.
Statuses are literals (see sql_claim.py on generic plans and partial indexes).

On PostgreSQL FINISH_PG also locks the batch's runs (``runs``, in id order,
all of them before any node is written: the count(*) InitPlan), so that when the
storage already knows every run's plan from an earlier batch it need not lock
and read them first (SqlStorage._moves_from_known_plans): one round trip per
batch. The moves were then decided from the plans alone, assuming each run
RUNNING; ``ready`` keeps an item only if its run is so (and has no parent to
wake when it completes) or is over (the outcome recorded, nothing started, as
when the row was read first). Any other item is ``deferred``: not written, and
handed back for the general path, in the same transaction.
Everything else (parallel groups, a subflow's last step, replays, a run of which
a batch holds several nodes) takes the general path, statement by statement, as
does all of MySQL/MariaDB (no UPDATE ... RETURNING to say which fences held).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.engine import Connection

from flowsmith_worker import progress
from flowsmith_worker.storage.base import Chain, Finished
from flowsmith_worker.storage.sql_base import FLOW_STATE
from flowsmith_worker.storage.sql_prepared import PreparedStatement

_NOW = "CAST(EXTRACT(epoch FROM now()) AS DOUBLE PRECISION)"
_SQLITE_NOW = "((julianday('now') - 2440587.5) * 86400.0)"
_OVER = ", ".join(f"'{status}'" for status in sorted(progress.OVER))

FINISH_PG = f"""
WITH item AS (
    SELECT * FROM unnest(
        CAST(%(node_id)s AS bigint[]), CAST(%(owner)s AS text[]), CAST(%(attempt)s AS int[]),
        CAST(%(status)s AS text[]), CAST(%(output)s AS text[]), CAST(%(flow_id)s AS bigint[]),
        CAST(%(next_step)s AS text[]), CAST(%(next_position)s AS int[]),
        CAST(%(next_max_attempts)s AS int[]), CAST(%(finishes)s AS boolean[])
    ) AS t(node_id, owner, attempt, status, output, flow_id,
           next_step, next_position, next_max_attempts, finishes)
), runs AS MATERIALIZED (
    SELECT id, status, parent_node_id FROM fs_flows
    WHERE id IN (SELECT flow_id FROM item)
    ORDER BY id
    FOR UPDATE
), ready AS (
    SELECT item.*, r.status IN ({_OVER}) AS over
    FROM item JOIN runs r ON r.id = item.flow_id
    WHERE r.status IN ({_OVER})
       OR (r.status = 'RUNNING' AND (NOT item.finishes OR r.parent_node_id IS NULL))
), done AS (
    UPDATE fs_nodes n
    SET status = item.status, output = item.output,
        finished_at = {_NOW}, lease_expires_at = NULL
    FROM ready item
    WHERE n.id = item.node_id AND n.status = 'RUNNING'
      AND n.lease_owner = item.owner AND n.attempt = item.attempt
      AND (SELECT count(*) FROM runs) > 0
    RETURNING n.id
), moved AS (
    SELECT ready.* FROM ready JOIN done ON done.id = ready.node_id WHERE NOT ready.over
), started AS (
    INSERT INTO fs_nodes (
        flow_id, step_name, position, group_index, status, queue, priority, attempt,
        max_attempts, rescues, lease_owner, lease_expires_at, run_after, started_at, created_at
    )
    SELECT m.flow_id, m.next_step, m.next_position, 0,
           CASE WHEN %(chain_to)s IS NULL THEN 'PENDING' ELSE 'RUNNING' END,
           f.queue, f.priority,
           CASE WHEN %(chain_to)s IS NULL THEN 0 ELSE 1 END,
           m.next_max_attempts, 0, %(chain_to)s,
           {_NOW} + %(lease_seconds)s,
           {_NOW},
           CASE WHEN %(chain_to)s IS NULL THEN NULL ELSE {_NOW} END,
           {_NOW}
    FROM moved m JOIN fs_flows f ON f.id = m.flow_id
    WHERE m.next_step IS NOT NULL
    ON CONFLICT DO NOTHING
    RETURNING id, flow_id, step_name, max_attempts
), completed AS (
    UPDATE fs_flows f
    SET status = 'COMPLETED', error = NULL, updated_at = {_NOW}, finished_at = {_NOW}
    FROM moved m
    WHERE f.id = m.flow_id AND m.finishes
    RETURNING f.id
)
SELECT item.node_id, done.id IS NOT NULL AS won,
       r.id IS NOT NULL AND rd.node_id IS NULL AS deferred,
       started.id AS next_id, started.step_name, started.max_attempts
FROM item
LEFT JOIN runs r ON r.id = item.flow_id
LEFT JOIN ready rd ON rd.node_id = item.node_id
LEFT JOIN done ON done.id = item.node_id
LEFT JOIN started ON started.flow_id = item.flow_id
"""
# Prepared once per connection (sql_prepared.py): one text whatever the batch's size.
FINISH_PG_PREPARED = PreparedStatement(
    "fs_finish",
    FINISH_PG,
    {
        "node_id": "bigint[]",
        "owner": "text[]",
        "attempt": "int[]",
        "status": "text[]",
        "output": "text[]",
        "flow_id": "bigint[]",
        "next_step": "text[]",
        "next_position": "int[]",
        "next_max_attempts": "int[]",
        "finishes": "boolean[]",
        "chain_to": "text",
        "lease_seconds": "float8",
    },
)


# The batch's runs, locked in id order (as every batch locks them) until commit,
# before anything is decided: prepared too, one text however many runs.
LOCK_RUNS_PG = PreparedStatement(
    "fs_lock_runs",
    f"SELECT {', '.join(c.name for c in FLOW_STATE)} FROM fs_flows"
    " WHERE id = ANY(%(flow_ids)s) ORDER BY id FOR UPDATE",
    {"flow_ids": "bigint[]"},
)


# SQLite: the batch's items as one JSON array of [node, owner, attempt, status, output].
DONE_SQLITE = f"""
UPDATE fs_nodes AS n
SET status = i.status, output = i.output, finished_at = {_SQLITE_NOW}, lease_expires_at = NULL
FROM (
    SELECT json_extract(value, '$[0]') AS node_id, json_extract(value, '$[1]') AS owner,
           json_extract(value, '$[2]') AS attempt, json_extract(value, '$[3]') AS status,
           json_extract(value, '$[4]') AS output
    FROM json_each(:items)
) AS i
WHERE n.id = i.node_id AND n.status = 'RUNNING'
  AND n.lease_owner = i.owner AND n.attempt = i.attempt
RETURNING id
"""
# The next nodes of the runs whose fences held: [flow, step, position, max_attempts].
# ("WHERE true" lets SQLite read ON CONFLICT as the upsert clause of INSERT ... SELECT.)
START_SQLITE = f"""
INSERT INTO fs_nodes (
    flow_id, step_name, position, group_index, status, queue, priority, attempt,
    max_attempts, rescues, lease_owner, lease_expires_at, run_after, started_at, created_at
)
SELECT m.flow_id, m.step_name, m.position, 0,
       CASE WHEN :chain_to IS NULL THEN 'PENDING' ELSE 'RUNNING' END,
       f.queue, f.priority,
       CASE WHEN :chain_to IS NULL THEN 0 ELSE 1 END,
       m.max_attempts, 0, :chain_to,
       {_SQLITE_NOW} + :lease_seconds,
       {_SQLITE_NOW},
       CASE WHEN :chain_to IS NULL THEN NULL ELSE {_SQLITE_NOW} END,
       {_SQLITE_NOW}
FROM (
    SELECT json_extract(value, '$[0]') AS flow_id, json_extract(value, '$[1]') AS step_name,
           json_extract(value, '$[2]') AS position, json_extract(value, '$[3]') AS max_attempts
    FROM json_each(:moves)
) AS m JOIN fs_flows f ON f.id = m.flow_id
WHERE true
ON CONFLICT DO NOTHING
RETURNING id, flow_id, step_name, max_attempts
"""
COMPLETE_SQLITE = f"""
UPDATE fs_flows
SET status = 'COMPLETED', error = NULL, updated_at = {_SQLITE_NOW}, finished_at = {_SQLITE_NOW}
WHERE id IN (SELECT value FROM json_each(:runs))
"""


@dataclass(frozen=True)
class NextNode:
    """The node a batch began for a run: RUNNING and leased when it chains."""

    id: int
    step_name: str
    max_attempts: int


@dataclass(frozen=True)
class Move:
    """What the run of a finished node does next: start ``next_step`` (at
    ``next_position``) or, with ``finishes``, complete; neither when it is over."""

    next_step: str | None = None
    next_position: int | None = None
    next_max_attempts: int | None = None
    finishes: bool = False


@dataclass(frozen=True)
class Applied:
    """What a batch wrote: the nodes whose fences held, by id, each with the next
    node begun for its run (None if none was); and, on PostgreSQL, the nodes
    ``deferred`` unwritten because their run, found locked in the statement, is
    not as the move assumed (see FINISH_PG): the general path writes those."""

    won: dict[int, NextNode | None]
    deferred: frozenset[int] = frozenset()


@dataclass
class FinishBatch:
    """The columns of FINISH_PG's parameters, one entry per finished node."""

    node_id: list[int] = field(default_factory=list)
    owner: list[str] = field(default_factory=list)
    attempt: list[int] = field(default_factory=list)
    status: list[str] = field(default_factory=list)
    output: list[str | None] = field(default_factory=list)
    flow_id: list[int] = field(default_factory=list)
    next_step: list[str | None] = field(default_factory=list)
    next_position: list[int | None] = field(default_factory=list)
    next_max_attempts: list[int | None] = field(default_factory=list)
    finishes: list[bool] = field(default_factory=list)

    def add(self, item: Finished, move: Move) -> None:
        lease = item.lease
        self.node_id.append(lease.node_id)
        self.owner.append(lease.worker_id)
        self.attempt.append(lease.attempt)
        self.status.append(str(item.status))  # the value, not the enum, for the driver
        self.output.append(item.output)
        self.flow_id.append(lease.flow_id)
        self.next_step.append(move.next_step)
        self.next_position.append(move.next_position)
        self.next_max_attempts.append(move.next_max_attempts)
        self.finishes.append(move.finishes)

    def apply(
        self, conn: Connection, dialect: str, chain: Chain | None, *, prepare: bool = True
    ) -> Applied:
        """Write the batch (see Applied). ``prepare``: PostgreSQL sends FINISH_PG as
        a prepared statement."""
        chained = {
            "chain_to": None if chain is None else chain.worker_id,
            "lease_seconds": None if chain is None else chain.lease_seconds,
        }
        if dialect == "postgresql":
            values = {**vars(self), **chained}
            rows = FINISH_PG_PREPARED.execute(conn, values, prepare=prepare).all()
            won = {
                row.node_id: None if row.next_id is None else NextNode(*row[3:])
                for row in rows
                if row.won
            }
            return Applied(won, frozenset(row.node_id for row in rows if row.deferred))
        return Applied(self._apply_on_sqlite(conn, chained))

    def _apply_on_sqlite(
        self, conn: Connection, chained: dict[str, Any]
    ) -> dict[int, NextNode | None]:
        items = zip(self.node_id, self.owner, self.attempt, self.status, self.output, strict=True)
        done = conn.exec_driver_sql(DONE_SQLITE, {"items": json.dumps(list(items))}).all()
        won = {row.id for row in done}
        moved = [i for i, node_id in enumerate(self.node_id) if node_id in won]
        moves = [
            (self.flow_id[i], self.next_step[i], self.next_position[i], self.next_max_attempts[i])
            for i in moved
            if self.next_step[i] is not None
        ]
        started: dict[int, NextNode] = {}
        if moves:
            parameters = {"moves": json.dumps(moves), **chained}
            for row in conn.exec_driver_sql(START_SQLITE, parameters).all():
                started[row.flow_id] = NextNode(row.id, row.step_name, row.max_attempts)
        finishing = [self.flow_id[i] for i in moved if self.finishes[i]]
        if finishing:
            conn.exec_driver_sql(COMPLETE_SQLITE, {"runs": json.dumps(finishing)})
        return {self.node_id[i]: started.get(self.flow_id[i]) for i in moved}

"""A batch of finished sequential steps written set-based (every SQL backend).

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
Statuses are literals (see sql/claim.py on generic plans and partial indexes).

On PostgreSQL FINISH_PG also locks the batch's runs (``runs``, in id order,
all of them before any node is written: the count(*) InitPlan), so that when the
storage already knows every run's plan from an earlier batch it need not lock
and read them first (SqlStorage._moves_from_known_plans): one round trip per
batch. The moves were then decided from the plans alone, assuming each run
RUNNING; ``ready`` keeps an item only if its run is so (and has no parent to
wake, nor a concurrency key's place to hand on, when it completes) or is over
(the outcome recorded, nothing started, as when the row was read first). Any
other item is ``deferred``: not written, and handed back for the general path,
in the same transaction.
Everything else (parallel groups, a subflow's last step, replays, a run of which
a batch holds several nodes) takes the general path, statement by statement.
MySQL/MariaDB, with neither, send the parts one statement each, the batch as
one JSON parameter unpacked with JSON_TABLE (see the end of this module).

Runs inside the one transaction of Storage.complete_batch and must never open one of
its own, nor decide what comes next (the storage did, with progress.py): it applies
the moves it is given, fenced per row.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.engine import Connection

from flowsmith_worker import progress
from flowsmith_worker.storage.base import Chain, Finished, NodeStatus
from flowsmith_worker.storage.sql.base import FLOW_STATE
from flowsmith_worker.storage.sql.dialects import MYSQL_UTC_EPOCH_SQL, BatchWrite
from flowsmith_worker.storage.sql.prepared import PreparedStatement

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
    SELECT id, status, parent_node_id, concurrency_key FROM fs_flows
    WHERE id IN (SELECT flow_id FROM item)
    ORDER BY id
    FOR UPDATE
), ready AS (
    SELECT item.*, r.status IN ({_OVER}) AS over
    FROM item JOIN runs r ON r.id = item.flow_id
    WHERE r.status IN ({_OVER})
       OR (r.status = 'RUNNING'
           AND (NOT item.finishes OR (r.parent_node_id IS NULL AND r.concurrency_key IS NULL)))
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
# Prepared once per connection (sql/prepared.py): one text whatever the batch's size.
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
        self, conn: Connection, how: BatchWrite, chain: Chain | None, *, prepare: bool = True
    ) -> Applied:
        """Write the batch (see Applied), the way the database unpacks it. ``prepare``:
        PostgreSQL sends FINISH_PG as a prepared statement."""
        chained = {
            "chain_to": None if chain is None else chain.worker_id,
            "lease_seconds": None if chain is None else chain.lease_seconds,
        }
        if how is BatchWrite.ARRAYS:
            values = {**vars(self), **chained}
            rows = FINISH_PG_PREPARED.execute(conn, values, prepare=prepare).all()
            won = {
                row.node_id: None if row.next_id is None else NextNode(*row[3:])
                for row in rows
                if row.won
            }
            return Applied(won, frozenset(row.node_id for row in rows if row.deferred))
        if how is BatchWrite.JSON_TABLE:
            return Applied(_apply_on_mysql(self, conn, chained))
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


# -- MySQL/MariaDB ------------------------------------------------------------------
#
# No UPDATE ... RETURNING and no data-modifying CTEs: one statement per part, each
# for the whole batch, the batch as one JSON parameter unpacked with JSON_TABLE
# (MySQL 8.0, MariaDB 10.6), so a statement's text is the same whatever the batch's
# size. Which fences held is read first, on the nodes locked (their runs are locked
# already). What the statements rely on:
# * JSON_TABLE first (STRAIGHT_JOIN), then the table by its key (FORCE INDEX): on a
#   small table the optimizer would rather scan it, and a locking scan waits on, and
#   can deadlock with, the rows other workers' batches hold;
# * strings come out as TEXT, so a value too long for its column fails the write as
#   it would row by row (a VARCHAR there is cut silently), and none is compared with
#   a column: JSON_TABLE's collation is not the Identifier columns' byte-exact one;
# * no output is an absent key (NULL ON EMPTY, the default): MySQL reads a JSON null
#   into a string column as the text 'null'.

LOCK_NODES_MYSQL = """
SELECT n.id, n.status, n.lease_owner, n.attempt
FROM JSON_TABLE(%(nodes)s, '$[*]' COLUMNS (id BIGINT PATH '$')) AS i
STRAIGHT_JOIN fs_nodes AS n FORCE INDEX (PRIMARY) ON n.id = i.id
FOR UPDATE
"""
# The outcomes of the nodes whose fences held: {"id", "status", "output"?}.
DONE_MYSQL = f"""
UPDATE JSON_TABLE(%(done)s, '$[*]' COLUMNS (
    id BIGINT PATH '$.id', status TEXT PATH '$.status', output LONGTEXT PATH '$.output'
)) AS d
STRAIGHT_JOIN fs_nodes AS n FORCE INDEX (PRIMARY) ON n.id = d.id
SET n.status = d.status, n.output = d.output,
    n.finished_at = {MYSQL_UTC_EPOCH_SQL}, n.lease_expires_at = NULL
"""
DONE_ONE_MYSQL = f"""
UPDATE fs_nodes
SET status = %(status)s, output = %(output)s,
    finished_at = {MYSQL_UTC_EPOCH_SQL}, lease_expires_at = NULL
WHERE id = %(id)s
"""
# The next nodes of those runs: [flow, step, position, max_attempts].
START_MYSQL = f"""
INSERT INTO fs_nodes (
    flow_id, step_name, position, group_index, status, queue, priority, attempt,
    max_attempts, rescues, lease_owner, lease_expires_at, run_after, started_at, created_at
)
SELECT m.flow_id, m.step_name, m.position, 0,
       CASE WHEN %(chain_to)s IS NULL THEN 'PENDING' ELSE 'RUNNING' END,
       f.queue, f.priority,
       CASE WHEN %(chain_to)s IS NULL THEN 0 ELSE 1 END,
       m.max_attempts, 0, %(chain_to)s,
       {MYSQL_UTC_EPOCH_SQL} + %(lease_seconds)s,
       {MYSQL_UTC_EPOCH_SQL},
       CASE WHEN %(chain_to)s IS NULL THEN NULL ELSE {MYSQL_UTC_EPOCH_SQL} END,
       {MYSQL_UTC_EPOCH_SQL}
FROM JSON_TABLE(%(moves)s, '$[*]' COLUMNS (
    flow_id BIGINT PATH '$[0]', step_name TEXT PATH '$[1]',
    position INT PATH '$[2]', max_attempts INT PATH '$[3]'
)) AS m
STRAIGHT_JOIN fs_flows AS f FORCE INDEX (PRIMARY) ON f.id = m.flow_id
ON DUPLICATE KEY UPDATE id = fs_nodes.id
"""
# Their ids (MySQL has no INSERT ... RETURNING): the node at the next position,
# RUNNING under this worker's first lease. Not a locking read: no hints needed.
CHAINED_MYSQL = """
SELECT n.id, n.flow_id, n.step_name, n.max_attempts
FROM JSON_TABLE(%(moves)s, '$[*]' COLUMNS (
    flow_id BIGINT PATH '$[0]', position INT PATH '$[2]'
)) AS m
JOIN fs_nodes AS n ON n.flow_id = m.flow_id AND n.position = m.position
WHERE n.status = 'RUNNING' AND n.lease_owner = %(chain_to)s AND n.attempt = 1
"""
COMPLETE_MYSQL = f"""
UPDATE JSON_TABLE(%(runs)s, '$[*]' COLUMNS (id BIGINT PATH '$')) AS r
STRAIGHT_JOIN fs_flows AS f FORCE INDEX (PRIMARY) ON f.id = r.id
SET f.status = 'COMPLETED', f.error = NULL,
    f.updated_at = {MYSQL_UTC_EPOCH_SQL}, f.finished_at = {MYSQL_UTC_EPOCH_SQL}
"""
# An output in DONE_MYSQL is escaped twice, as JSON and then by the driver: up to 7
# bytes a character (a control character becomes \\u0001: 7 bytes). Outputs up to
# SMALL_OUTPUT characters go together, at most OUTPUT_PER_STATEMENT characters of
# them per statement (under 7 MiB: MariaDB's max_allowed_packet is 16 MiB by
# default); a larger one is sent alone, escaped once, as a single write always was.
SMALL_OUTPUT = 64 * 1024
OUTPUT_PER_STATEMENT = 1024 * 1024


def _apply_on_mysql(
    batch: FinishBatch, conn: Connection, chained: dict[str, Any]
) -> dict[int, NextNode | None]:
    """FinishBatch.apply on MySQL/MariaDB; a batch that does not chain reads no ids
    back, so its runs' next nodes (PENDING, anyone's) are answered as None."""
    moved = _fences_held(batch, conn)
    for statement, parameters in _outcome_writes(batch, moved):
        conn.exec_driver_sql(statement, parameters)
    started = _start_next_nodes(batch, conn, moved, chained)
    finishing = [batch.flow_id[i] for i in moved if batch.finishes[i]]
    if finishing:
        conn.exec_driver_sql(COMPLETE_MYSQL, {"runs": json.dumps(finishing)})
    return {batch.node_id[i]: started.get(batch.flow_id[i]) for i in moved}


def _fences_held(batch: FinishBatch, conn: Connection) -> list[int]:
    """The indexes of the items whose node is still RUNNING under their lease, locked.

    Compared here rather than in SQL: Python's str equality is byte for byte, as the
    Identifier columns' collation is, and JSON_TABLE's strings have another collation.
    """
    rows = conn.exec_driver_sql(LOCK_NODES_MYSQL, {"nodes": json.dumps(batch.node_id)})
    held = {
        (row.id, row.lease_owner, row.attempt) for row in rows if row.status == NodeStatus.RUNNING
    }
    leases = zip(batch.node_id, batch.owner, batch.attempt, strict=True)
    return [i for i, lease in enumerate(leases) if lease in held]


def _outcome_writes(batch: FinishBatch, moved: list[int]) -> Iterator[tuple[str, dict[str, Any]]]:
    """The statements that write the outcomes of ``moved``: DONE_MYSQL for as many
    as fit in one (see SMALL_OUTPUT), DONE_ONE_MYSQL for each large one."""
    together: list[dict[str, Any]] = []
    size = 0
    for i in moved:
        outcome: dict[str, Any] = {"id": batch.node_id[i], "status": batch.status[i]}
        output = batch.output[i]
        length = 0 if output is None else len(output)
        if length > SMALL_OUTPUT:
            yield DONE_ONE_MYSQL, {**outcome, "output": output}
            continue
        if together and size + length > OUTPUT_PER_STATEMENT:
            yield DONE_MYSQL, {"done": json.dumps(together, ensure_ascii=False)}
            together, size = [], 0
        if output is not None:
            outcome["output"] = output
        together.append(outcome)
        size += length
    if together:
        yield DONE_MYSQL, {"done": json.dumps(together, ensure_ascii=False)}


def _start_next_nodes(
    batch: FinishBatch, conn: Connection, moved: list[int], chained: dict[str, Any]
) -> dict[int, NextNode]:
    """Insert the next node of each moved run that goes on; the chained ones by run."""
    moves = [
        (batch.flow_id[i], batch.next_step[i], batch.next_position[i], batch.next_max_attempts[i])
        for i in moved
        if batch.next_step[i] is not None
    ]
    if not moves:
        return {}
    parameters = {"moves": json.dumps(moves, ensure_ascii=False), **chained}
    conn.exec_driver_sql(START_MYSQL, parameters)
    if chained["chain_to"] is None:
        return {}
    rows = conn.exec_driver_sql(CHAINED_MYSQL, parameters)
    return {row.flow_id: NextNode(row.id, row.step_name, row.max_attempts) for row in rows}

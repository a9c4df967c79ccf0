"""fs_attempts: the attempts a node left behind, written and read.

Which attempts, and as what, is decided in progress.py (``Retry.superseded_as``,
``attempts_of``). Every write here belongs to the transaction of the write that
makes the node run again, under the same lock of its run and only if that
write's fence matched: a worker whose lease was taken cannot record anything.
None of this is on the success path: a step that succeeds at its first attempt
writes nothing here.

Each insert leaves an attempt already kept alone, and a start that is unknown
(a row changed by hand) is taken as the end: the write that makes a node run
again must never fail on its history.

Must never open a transaction of its own: every function takes the connection of the
write it belongs to.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from flowsmith_worker import progress
from flowsmith_worker.storage.base import AttemptRecord, NodeRecord
from flowsmith_worker.storage.sql import schema
from flowsmith_worker.storage.sql.base import attempt_record
from flowsmith_worker.storage.sql.dialects import Dialect

A, N = schema.attempts, schema.nodes


@dataclass(frozen=True)
class EndedAttempt:
    """The attempt a fenced write ends, as read under its run's lock before the write."""

    node_id: int
    flow_id: int
    attempt: int
    worker_id: str | None
    started_at: float | None


def record(conn: Connection, dialect: Dialect, ended: EndedAttempt, retry: progress.Retry) -> None:
    """Keep the attempt that ``retry`` leaves behind: the node runs again.

    Called once the write carrying out ``retry`` matched its fence.
    """
    now = dialect.now()
    conn.execute(
        dialect.insert_if_absent(A).values(
            node_id=ended.node_id,
            flow_id=ended.flow_id,
            attempt=ended.attempt,
            worker_id=ended.worker_id,
            started_at=now if ended.started_at is None else ended.started_at,
            ended_at=now,
            outcome=retry.superseded_as,
            error=retry.error,
        )
    )


def record_matching(
    conn: Connection,
    dialect: Dialect,
    fence: Sequence[sa.ColumnElement[bool]],
    retry: progress.Retry,
) -> None:
    """Keep the attempts of every node ``fence`` matches, which ``retry`` then re-queues.

    Run before that update, with the same fence, in its transaction: the runs
    are locked, so the fence matches the same nodes then.
    """
    now = dialect.now()
    ended = sa.select(
        N.c.id,
        N.c.flow_id,
        N.c.attempt,
        N.c.lease_owner,
        sa.func.coalesce(N.c.started_at, now),
        now,
        sa.literal(retry.superseded_as.value, sa.String(16)),
        sa.literal(retry.error, A.c.error.type),
    ).where(*fence)
    columns = ["node_id", "flow_id", "attempt", "worker_id", "started_at", "ended_at"]
    conn.execute(dialect.insert_if_absent(A).from_select([*columns, "outcome", "error"], ended))


def keep_latest(conn: Connection, dialect: Dialect, nodes: Sequence[NodeRecord]) -> None:
    """Keep the latest attempt of each of ``nodes``, unless already kept: their row is
    about to describe a new attempt (a retry of their FAILED run re-queues them)."""
    if not nodes:
        return
    recorded = recorded_attempts(conn, A.c.node_id.in_([n.id for n in nodes]))
    latest = [progress.unrecorded_attempt(n, recorded.get(n.id, [])) for n in nodes]
    rows = [_values(a, dialect.now()) for a in latest if a is not None]
    if rows:  # multi-row VALUES, not executemany: ``now`` is an expression
        conn.execute(dialect.insert_if_absent(A).values(rows))


def _values(attempt: AttemptRecord, now: Any) -> dict[str, Any]:
    return dict(
        node_id=attempt.node_id,
        flow_id=attempt.flow_id,
        attempt=attempt.attempt,
        worker_id=attempt.worker_id,
        started_at=attempt.started_at,
        ended_at=now if attempt.ended_at is None else attempt.ended_at,
        outcome=attempt.outcome,
        error=attempt.error,
    )


def recorded_attempts(
    conn: Connection, where: sa.ColumnElement[bool]
) -> dict[int, list[AttemptRecord]]:
    """The kept attempts matching ``where``, by node id, oldest first."""
    rows = conn.execute(
        sa.select(A, N.c.step_name)
        .join(N, N.c.id == A.c.node_id)
        .where(where)
        .order_by(A.c.node_id, A.c.attempt)
    ).all()
    found: dict[int, list[AttemptRecord]] = {}
    for row in rows:
        found.setdefault(row.node_id, []).append(attempt_record(row))
    return found

"""The statements behind the dashboard's questions, each with the index that serves it.

SqlOperators (sql/operators.py) runs them; what they answer is put together
here too. None is on the hot path of claiming and completing.

Must never write: every statement built here is a SELECT.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa

from flowsmith_worker.storage.base import (
    FINISHED_FLOW_STATUSES,
    ActivitySlice,
    FailureGroup,
    FlowStatus,
    NodeStatus,
    Overview,
    RunCursor,
)
from flowsmith_worker.storage.sql import schema

F, N = schema.flows, schema.nodes

# The statuses of finished runs the overview charts.
CHARTED = (FlowStatus.COMPLETED, FlowStatus.FAILED)
# A COMPENSATING run is open too: its compensations run (see compensation.py).
OPEN_RUNS = (FlowStatus.PENDING, FlowStatus.RUNNING, FlowStatus.COMPENSATING)
OPEN_STEPS = (NodeStatus.PENDING, NodeStatus.RUNNING)
# How many runs a failure group names.
FAILURE_SAMPLES = 5


# -- pages of runs (fs_flows_created; the tracking_id search: fs_flows_tracking_id_key) --


def older_than(cursor: RunCursor) -> sa.ColumnElement[bool]:
    """Runs after ``cursor`` in newest-first order: the next page.

    Written so that "created_at <= x" bounds the index scan on its own: a row
    comparison (created_at, id) < (x, y) would need an index of both columns.
    """
    return sa.and_(
        F.c.created_at <= cursor.created_at,
        sa.or_(F.c.created_at < cursor.created_at, F.c.id < cursor.id),
    )


# -- the overview -------------------------------------------------------------------


def slice_edges(now: float, window_seconds: float, buckets: int) -> list[float]:
    """The ``buckets + 1`` edges of equal slices of the last ``window_seconds``."""
    width = window_seconds / buckets
    return [now - window_seconds + i * width for i in range(buckets)] + [now]


def finished_per_slice(edges: list[float]) -> sa.Select[Any]:
    """Completed and failed runs per slice: one range scan of fs_flows_status_updated
    (a finished run's updated_at is its finished_at). Each slice is counted by a
    CASE, which every database computes alike (no dialect's floor or round)."""
    counts = [
        sa.func.sum(sa.case((sa.and_(F.c.updated_at >= start, F.c.updated_at < end), 1), else_=0))
        for start, end in itertools.pairwise(edges)
    ]
    return (
        sa.select(F.c.status, *counts)
        .where(F.c.status.in_(CHARTED), F.c.updated_at >= edges[0])
        .group_by(F.c.status)
    )


def runs_by_status(finished_since: float) -> sa.CompoundSelect[Any]:
    """Runs by status, through fs_flows_status_updated only: the open ones all, the
    finished ones since then (counting every finished run is a scan of the table)."""
    return sa.union_all(
        sa.select(F.c.status, sa.func.count())
        .where(F.c.status.in_(OPEN_RUNS))
        .group_by(F.c.status),
        sa.select(F.c.status, sa.func.count())
        .where(F.c.status.in_(FINISHED_FLOW_STATUSES), F.c.updated_at >= finished_since)
        .group_by(F.c.status),
    )


def open_steps_by_queue() -> sa.Select[Any]:
    """Steps PENDING or RUNNING by queue and status, through fs_nodes_status_lease (on
    PostgreSQL a partial index of exactly those)."""
    return (
        sa.select(N.c.queue, N.c.status, sa.func.count())
        .where(N.c.status.in_(OPEN_STEPS))
        .group_by(N.c.queue, N.c.status)
    )


def runnable_by_queue(now: float) -> sa.Select[Any]:
    """Steps PENDING and due, by queue, with the oldest due time: through the claim's
    partial index fs_nodes_runnable."""
    return (
        sa.select(N.c.queue, sa.func.count(), sa.func.min(N.c.run_after))
        .where(N.c.status == NodeStatus.PENDING, N.c.run_after <= now)
        .group_by(N.c.queue)
    )


def overview(
    *,
    now: float,
    finished_within: float,
    runs: Sequence[Any],
    steps: Sequence[Any],
    runnable: Sequence[Any],
    edges: list[float],
    finished: Sequence[Any],
) -> Overview:
    """The answers of the statements above, as a record."""
    open_steps: dict[str, dict[str, int]] = {}
    for queue, status, count in steps:
        open_steps.setdefault(queue, {})[status] = int(count)
    oldest = min((float(due) for _, _, due in runnable), default=None)
    return Overview(
        now=now,
        runs_by_status={status: int(count) for status, count in runs},
        finished_within=finished_within,
        open_steps_by_queue=open_steps,
        runnable_by_queue={queue: int(count) for queue, count, _ in runnable},
        oldest_runnable_age=None if oldest is None else max(0.0, now - oldest),
        slices=activity_slices(edges, finished),
    )


def activity_slices(edges: list[float], finished: Sequence[Any]) -> tuple[ActivitySlice, ...]:
    """The answer of finished_per_slice, one record per slice."""
    per_status = {status: [int(count or 0) for count in counts] for status, *counts in finished}
    empty = [0] * (len(edges) - 1)
    completed = per_status.get(FlowStatus.COMPLETED, empty)
    failed = per_status.get(FlowStatus.FAILED, empty)
    return tuple(
        ActivitySlice(start=start, end=end, completed=completed[i], failed=failed[i])
        for i, (start, end) in enumerate(itertools.pairwise(edges))
    )


# -- a run's subflows (fs_flows_parent_node_id and the nodes' primary key) ---------------

_LINK = (F.c.tracking_id, F.c.flow_name, N.c.step_name)


def link_to_step(node_id: int) -> sa.Select[Any]:
    """The run and step of a node: where a subflow run was started."""
    return sa.select(*_LINK).join_from(N, F, N.c.flow_id == F.c.id).where(N.c.id == node_id)


def links_to_children(flow_id: int) -> sa.Select[Any]:
    """The runs the steps of a run started, in plan order."""
    return (
        sa.select(*_LINK)
        .join_from(F, N, F.c.parent_node_id == N.c.id)
        .where(N.c.flow_id == flow_id)
        .order_by(N.c.position, N.c.group_index)
    )


# -- failures ----------------------------------------------------------------------------


def failed_steps(since: sa.ColumnElement[float], max_runs: int) -> sa.Select[Any]:
    """The failed nodes of the newest ``max_runs`` runs FAILED since then: the runs
    through fs_flows_status_updated, their nodes through fs_nodes_flow_step_key.
    Rows of (flow, step, error, finished_at, tracking_id), newest first."""
    runs = (
        sa.select(F.c.id, F.c.flow_name, F.c.tracking_id, F.c.updated_at)
        .where(F.c.status == FlowStatus.FAILED, F.c.updated_at >= since)
        .order_by(F.c.updated_at.desc())
        .limit(max_runs)
        .subquery()
    )
    return (
        sa.select(
            runs.c.flow_name,
            N.c.step_name,
            N.c.error,
            sa.func.coalesce(N.c.finished_at, runs.c.updated_at),
            runs.c.tracking_id,
        )
        .join_from(runs, N, N.c.flow_id == runs.c.id)
        .where(N.c.status == NodeStatus.FAILED)
        .order_by(runs.c.updated_at.desc())
    )


def group_failures(rows: Sequence[Any]) -> list[FailureGroup]:
    """The rows of failed_steps grouped by flow, step and the error's last line (an
    error is a traceback of any length: SQL cannot group by that); largest first."""
    groups: dict[tuple[str, str, str], list[Any]] = {}
    for row in rows:
        groups.setdefault((row[0], row[1], error_message(row[2])), []).append(row)
    return sorted(
        (
            FailureGroup(
                flow_name=flow_name,
                step_name=step_name,
                message=message,
                count=len(members),
                first_at=float(min(m[3] for m in members)),
                last_at=float(max(m[3] for m in members)),
                tracking_ids=tuple(m[4] for m in members[:FAILURE_SAMPLES]),
            )
            for (flow_name, step_name, message), members in groups.items()
        ),
        key=lambda group: (-group.count, -group.last_at),
    )


def error_message(error: str | None) -> str:
    """The line of an error that says what failed: a traceback's last one."""
    lines = [line.strip() for line in (error or "").splitlines() if line.strip()]
    return lines[-1] if lines else "(no error recorded)"

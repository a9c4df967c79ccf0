"""What operators ask of a SQL database: reading runs, cancelling, pruning, stats,
workers and queue limits, and the dashboard's questions (pages of runs, activity,
subflow links, failure groups). Nothing here is on the hot path of claiming and
completing.

Must never change a run in flight: its writes are fs_workers, queue limits and
prune, which deletes only finished runs (in short transactions of a batch each), and
never a subflow run whose parent run is still stored.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Row

from flowsmith_worker import fanout, progress
from flowsmith_worker.errors import CorruptRow
from flowsmith_worker.parking import FOREVER
from flowsmith_worker.storage.base import (
    FINISHED_FLOW_STATUSES,
    FailureGroup,
    FlowFilter,
    FlowRecord,
    FlowStatus,
    FlowSummary,
    NodeRecord,
    NodeStatus,
    Overview,
    QueueBacklog,
    RunLink,
    Stats,
    SubflowLinks,
    WorkerRecord,
)
from flowsmith_worker.storage.sql import attempts as sql_attempts
from flowsmith_worker.storage.sql import context as sql_context
from flowsmith_worker.storage.sql import dashboard as sql_dashboard
from flowsmith_worker.storage.sql import schema
from flowsmith_worker.storage.sql.base import (
    F,
    N,
    SqlBase,
    columns_but,
    flow_record,
    flow_summary,
    node_record,
)

W, Q, A = schema.workers, schema.queues, schema.attempts

# What is not read unless shown: an input or output can be megabytes.
_PAYLOADS = ("input", "output")


class SqlOperators(SqlBase):
    # -- reading --------------------------------------------------------------

    def get_flow(self, *, tracking_id: str, with_payloads: bool = True) -> FlowRecord | None:
        """The run; a COMPLETED run's output (its final ctx.data) is rebuilt from its nodes."""

        def work(conn: Connection) -> FlowRecord | None:
            columns = F.c if with_payloads else columns_but(F, *_PAYLOADS)
            row = conn.execute(sa.select(*columns).where(F.c.tracking_id == tracking_id)).first()
            if row is None:
                return None
            record = flow_record(row)
            if not with_payloads or record.status != FlowStatus.COMPLETED or record.unreadable:
                return record
            try:
                output = sql_context.final_data(conn, record.id, record.tracking_id, record.input)
            except CorruptRow as exc:  # shown as unreadable, as any other bad value
                return dataclasses.replace(record, unreadable={"output": str(exc)})
            return dataclasses.replace(record, output=output)

        return self._read(work)

    def list_nodes(self, *, flow_id: int, with_payloads: bool = True) -> list[NodeRecord]:
        """Every node, with its attempts, and with the ctx.data it started with rebuilt
        from the run's payloads."""

        def work(conn: Connection) -> list[NodeRecord]:
            skipped = () if with_payloads else ("output",)
            rows = conn.execute(
                sa.select(*columns_but(N, *skipped))
                .where(N.c.flow_id == flow_id)
                .order_by(N.c.position, N.c.group_index)
            ).all()
            if with_payloads:
                run = conn.execute(
                    sa.select(F.c.tracking_id, F.c.input).where(F.c.id == flow_id)
                ).first()
                records = _with_inputs(run, rows)
            else:
                records = [node_record(row, {}) for row in rows]
            recorded = sql_attempts.recorded_attempts(conn, A.c.flow_id == flow_id)
            return fanout.in_plan_order(
                dataclasses.replace(n, attempts=progress.attempts_of(n, recorded.get(n.id, [])))
                for n in records
            )

        return self._read(work)

    def current_time(self) -> float:
        return float(self._read(lambda conn: conn.execute(sa.select(self._now())).scalar_one()))

    def runnable_backlog(self, *, queues: Sequence[str]) -> dict[str, QueueBacklog]:
        now = self._now()
        query = (
            sa.select(N.c.queue, sa.func.count(), now - sa.func.min(N.c.run_after))
            .where(
                N.c.status == NodeStatus.PENDING,
                N.c.run_after <= now,
                N.c.queue.in_(list(queues)),
            )
            .group_by(N.c.queue)
        )
        rows = self._read(lambda conn: conn.execute(query).all())
        return {queue: QueueBacklog(int(n), float(age)) for queue, n, age in rows}

    def count_open_nodes(self, *, queues: Sequence[str]) -> int:
        return int(
            self._read(
                lambda conn: conn.execute(
                    sa.select(sa.func.count()).where(
                        N.c.status.in_([NodeStatus.PENDING, NodeStatus.RUNNING]),
                        N.c.queue.in_(list(queues)),
                        # A wait for an event with no timeout: only a sender ends it.
                        N.c.run_after < FOREVER,
                    )
                ).scalar_one()
            )
        )

    def stats(self) -> Stats:
        def work(conn: Connection) -> Stats:
            flows: dict[str, int] = {
                status: count
                for status, count in conn.execute(
                    sa.select(F.c.status, sa.func.count()).group_by(F.c.status)
                )
            }
            by_queue: dict[str, dict[str, int]] = {}
            for queue, status, count in conn.execute(
                sa.select(N.c.queue, N.c.status, sa.func.count()).group_by(N.c.queue, N.c.status)
            ):
                by_queue.setdefault(queue, {})[status] = count
            nodes: dict[str, int] = {}
            for counts in by_queue.values():
                for status, count in counts.items():
                    nodes[status] = nodes.get(status, 0) + count
            in_flight: dict[str, int] = {
                owner: count
                for owner, count in conn.execute(
                    sa.select(N.c.lease_owner, sa.func.count())
                    .where(N.c.status == NodeStatus.RUNNING)
                    .group_by(N.c.lease_owner)
                )
            }
            attempts, rescues = conn.execute(
                sa.select(
                    sa.func.coalesce(sa.func.sum(N.c.attempt), 0),
                    sa.func.coalesce(sa.func.sum(N.c.rescues), 0),
                )
            ).one()
            oldest = conn.execute(
                sa.select(self._now() - sa.func.min(N.c.run_after)).where(
                    N.c.status == NodeStatus.PENDING, N.c.run_after <= self._now()
                )
            ).scalar()
            return Stats(
                flows_by_status=flows,
                nodes_by_status=nodes,
                nodes_by_queue=by_queue,
                in_flight_by_worker=in_flight,
                attempts=int(attempts),
                rescues=int(rescues),
                oldest_runnable_age=None if oldest is None else float(oldest),
            )

        return self._read(work)

    def list_flows(self, *, where: FlowFilter) -> list[FlowSummary]:
        query = (
            # Nor the plan: a listing shows none of them.
            sa.select(*columns_but(F, *_PAYLOADS, "plan"))
            .order_by(F.c.created_at.desc(), F.c.id.desc())
            .limit(where.limit)
        )
        rows: Sequence[Row[Any]] = self._read(
            lambda conn: conn.execute(query.where(*self._matching(where))).all()
        )
        return [flow_summary(r) for r in rows]

    def _matching(self, where: FlowFilter) -> list[sa.ColumnElement[bool]]:
        """The conditions of ``where``; with the newest-first order, fs_flows_created serves
        the time range and the pages, fs_flows_tracking_id_key the prefix search."""
        conditions: list[sa.ColumnElement[bool]] = []
        if where.status is not None:
            conditions.append(F.c.status == where.status)
        if where.flow_name is not None:
            conditions.append(F.c.flow_name == where.flow_name)
        if where.since is not None:
            conditions.append(F.c.created_at >= where.since)
        if where.created_within is not None:
            conditions.append(F.c.created_at >= self._now() - where.created_within)
        if where.until is not None:
            conditions.append(F.c.created_at < where.until)
        if where.tracking_id_prefix:
            conditions.append(self.dialect.starts_with(F.c.tracking_id, where.tracking_id_prefix))
        if where.after is not None:
            conditions.append(sql_dashboard.older_than(where.after))
        return conditions

    # -- the dashboard (its statements: sql/dashboard.py) ----------------------------

    def overview(self, *, window_seconds: float, buckets: int, finished_within: float) -> Overview:
        def work(conn: Connection) -> Overview:
            now = float(conn.execute(sa.select(self._now())).scalar_one())
            edges = sql_dashboard.slice_edges(now, window_seconds, buckets)
            return sql_dashboard.overview(
                now=now,
                finished_within=finished_within,
                runs=conn.execute(sql_dashboard.runs_by_status(now - finished_within)).all(),
                steps=conn.execute(sql_dashboard.open_steps_by_queue()).all(),
                runnable=conn.execute(sql_dashboard.runnable_by_queue(now)).all(),
                edges=edges,
                finished=conn.execute(sql_dashboard.finished_per_slice(edges)).all(),
            )

        return self._read(work)

    def subflow_links(self, *, flow: FlowRecord) -> SubflowLinks:
        def work(conn: Connection) -> SubflowLinks:
            parent = None
            if flow.parent_node_id is not None:
                parent = conn.execute(sql_dashboard.link_to_step(flow.parent_node_id)).first()
            children = conn.execute(sql_dashboard.links_to_children(flow.id)).all()
            return SubflowLinks(
                parent=None if parent is None else RunLink(*parent),
                children=tuple(RunLink(*child) for child in children),
            )

        return self._read(work)

    def failure_groups(self, *, within_seconds: float, max_runs: int) -> list[FailureGroup]:
        query = sql_dashboard.failed_steps(self._now() - within_seconds, max_runs)
        return sql_dashboard.group_failures(self._read(lambda conn: conn.execute(query).all()))

    # -- cancelling and pruning -------------------------------------------------

    def prune_flows(self, *, older_than_seconds: float, batch_size: int = 500) -> int:
        """Each batch is its own short transaction, so no lock is held for long."""
        pruned = 0
        while True:
            deleted = self._transact(
                lambda conn: self._prune_batch(conn, older_than_seconds, batch_size)
            )
            pruned += deleted
            if deleted < batch_size:
                return pruned

    def count_prunable_flows(self, *, older_than_seconds: float) -> int:
        """How many runs prune_flows would delete now, their finished subflows included."""

        def work(conn: Connection) -> int:
            total = 0
            level: sa.Select[Any] | None = self._prunable_runs(older_than_seconds)
            while level is not None:
                found = conn.execute(
                    sa.select(sa.func.count()).select_from(level.subquery())
                ).scalar_one()
                total += int(found)
                level = _finished_subflows_of(level) if found else None
            return total

        return int(self._read(work))

    def _prunable_runs(self, older_than_seconds: float) -> sa.Select[Any]:
        """The ids of the runs prune_flows deletes, with the subflows below them.

        A subflow run is never pruned on its own while its parent run is stored:
        the parent's step may run again (a retry, a resume) and must find its
        child, not start a new one that re-runs the child's completed steps.
        """
        parent_stored = sa.exists().where(N.c.id == F.c.parent_node_id)
        return sa.select(F.c.id).where(
            # updated_at equals finished_at once a run is finished, and
            # (status, updated_at) is indexed.
            F.c.status.in_(FINISHED_FLOW_STATUSES),
            F.c.updated_at < self._now() - older_than_seconds,
            ~parent_stored,
        )

    def _prune_batch(self, conn: Connection, older_than_seconds: float, batch_size: int) -> int:
        """Delete up to ``batch_size`` old finished runs, each with its finished subflows."""
        query = self._prunable_runs(older_than_seconds).order_by(F.c.updated_at).limit(batch_size)
        ids = list(conn.execute(query).scalars())
        ids += self._finished_subflows(conn, ids)
        if ids:
            # Attempts and nodes first: not every SQLite connection enforces ON
            # DELETE CASCADE.
            conn.execute(sa.delete(A).where(A.c.flow_id.in_(ids)))
            conn.execute(sa.delete(schema.events).where(schema.events.c.flow_id.in_(ids)))
            conn.execute(sa.delete(N).where(N.c.flow_id.in_(ids)))
            conn.execute(sa.delete(F).where(F.c.id.in_(ids)))
        return len(ids)

    @staticmethod
    def _finished_subflows(conn: Connection, run_ids: list[int]) -> list[int]:
        """The finished subflow runs below these runs, level by level.

        An unfinished one stays, with what is below it: once its parent is
        gone it is a run of its own, pruned when it is finished and old.
        """
        found: list[int] = []
        level = run_ids
        while level:
            level = list(conn.execute(_finished_subflows_of(level)).scalars())
            found += level
        return found

    # -- workers ------------------------------------------------------------------

    def register_worker(self, *, worker: WorkerRecord) -> None:
        values = {**dataclasses.asdict(worker), "queues": ",".join(worker.queues)}
        values.update(started_at=self._now(), heartbeat_at=self._now())
        self._transact(lambda conn: conn.execute(sa.insert(W).values(**values)))

    def worker_heartbeat(self, *, worker_id: str, in_flight: int) -> bool:
        # rowcount counts matched rows on MySQL too: SQLAlchemy sets CLIENT_FOUND_ROWS.
        return bool(
            self._transact(
                lambda conn: (
                    conn.execute(
                        sa.update(W)
                        .where(W.c.id == worker_id)
                        .values(heartbeat_at=self._now(), in_flight=in_flight)
                    ).rowcount
                )
            )
        )

    def unregister_worker(self, *, worker_id: str) -> None:
        self._transact(lambda conn: conn.execute(sa.delete(W).where(W.c.id == worker_id)))

    def list_workers(self) -> list[WorkerRecord]:
        rows = self._read(lambda conn: conn.execute(sa.select(W).order_by(W.c.started_at)).all())
        return [
            WorkerRecord(**{**row._asdict(), "queues": tuple(row.queues.split(","))})
            for row in rows
        ]

    def remove_dead_workers(self) -> int:
        return int(
            self._transact(
                lambda conn: (
                    conn.execute(
                        sa.delete(W).where(W.c.heartbeat_at < self._now() - 3 * W.c.lease_seconds)
                    ).rowcount
                )
            )
        )

    # -- queue limits ---------------------------------------------------------------

    def set_queue_limit(self, *, queue: str, max_running: int | None) -> None:
        if max_running is not None and max_running < 0:
            raise ValueError(f"max_running={max_running}: cannot be negative")

        def work(conn: Connection) -> None:
            # Update in place (NULL: no cap): a claim waiting on this row's lock
            # must find it afterwards, not a deleted row and so no cap at all.
            updated = conn.execute(
                sa.update(Q).where(Q.c.name == queue).values(max_running=max_running)
            ).rowcount
            if not updated and max_running is not None:
                conn.execute(
                    self.dialect.insert_if_absent(Q).values(name=queue, max_running=max_running)
                )

        self._transact(work)

    def queue_limits(self) -> dict[str, int]:
        rows = self._read(
            lambda conn: conn.execute(
                sa.select(Q.c.name, Q.c.max_running).where(Q.c.max_running.is_not(None))
            ).all()
        )
        return {name: int(cap) for name, cap in rows}


def _finished_subflows_of(runs: Sequence[int] | sa.Select[Any]) -> sa.Select[Any]:
    """The ids of the finished subflow runs one level below ``runs`` (ids, or a query of them)."""
    steps = sa.select(N.c.id).where(N.c.flow_id.in_(runs))
    return sa.select(F.c.id).where(
        F.c.parent_node_id.in_(steps), F.c.status.in_(FINISHED_FLOW_STATUSES)
    )


def _with_inputs(run: Any, rows: Sequence[Any]) -> list[NodeRecord]:
    """Node records, each with the ctx.data its stage started with.

    The records are a report: they share the parsed run input and outputs
    (each parsed once), where claimed nodes each get a copy of their own. A
    value that does not parse is reported in ``unreadable``, as for any record:
    the run's input makes every snapshot unreadable, a step's output those of
    the stages after it.
    """
    if run is None:  # no such run, or it was pruned
        return []
    records = [node_record(row, {}) for row in rows]

    def parsed(value: Any, where: str) -> sql_context.StoredJson:
        return sql_context.StoredJson.parsed(value, where, run.tracking_id)

    where = f"fs_flows.input of run {run.tracking_id!r}"
    try:
        run_input = sql_context.StoredJson(run.input, where, run.tracking_id).value()
        outputs = [
            sql_context.StoredOutput(r.step_name, r.position, parsed(r.output, ""))
            for r in records
            if r.status == NodeStatus.COMPLETED and "output" not in r.unreadable
        ]
        payloads = sql_context.RunPayloads(run.tracking_id, parsed(run_input, where), outputs)
        inputs = [payloads.data_before(r.position) for r in records]
    except CorruptRow as exc:
        return [_unreadable_input(r, str(exc)) for r in records]
    broken = [r for r in records if r.status == NodeStatus.COMPLETED and "output" in r.unreadable]
    return [
        _unreadable_input(r, f"rebuilt from the unreadable output of step {broken[0].step_name!r}")
        if broken and r.position > broken[0].position
        else dataclasses.replace(r, input=data)
        for r, data in zip(records, inputs, strict=True)
    ]


def _unreadable_input(record: NodeRecord, why: str) -> NodeRecord:
    return dataclasses.replace(record, unreadable={**record.unreadable, "input": why})

"""What operators ask of a SQL database: reading runs, cancelling, pruning, stats,
workers and queue limits. Nothing here is on the hot path of claiming and completing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from flowsmith_worker.storage import schema
from flowsmith_worker.storage.base import (
    FINISHED_FLOW_STATUSES,
    FlowFilter,
    FlowRecord,
    NodeRecord,
    NodeStatus,
    Stats,
    WorkerRecord,
)
from flowsmith_worker.storage.sql_base import F, N, SqlBase, flow_record, node_record

W, Q = schema.workers, schema.queues


class SqlOperators(SqlBase):
    # -- reading --------------------------------------------------------------

    def get_flow(self, *, tracking_id: str) -> FlowRecord | None:
        row = self._read(
            lambda conn: conn.execute(sa.select(F).where(F.c.tracking_id == tracking_id)).first()
        )
        return None if row is None else flow_record(row)

    def list_nodes(self, *, flow_id: int) -> list[NodeRecord]:
        rows = self._read(
            lambda conn: conn.execute(
                sa.select(N).where(N.c.flow_id == flow_id).order_by(N.c.position, N.c.group_index)
            ).all()
        )
        return [node_record(r) for r in rows]

    def count_runnable_nodes(self, *, queues: Sequence[str]) -> int:
        query = sa.select(sa.func.count()).where(
            N.c.status == NodeStatus.PENDING,
            N.c.run_after <= self._now(),
            N.c.queue.in_(list(queues)),
        )
        return int(self._read(lambda conn: conn.execute(query).scalar_one()))

    def count_open_nodes(self, *, queues: Sequence[str]) -> int:
        return int(
            self._read(
                lambda conn: conn.execute(
                    sa.select(sa.func.count()).where(
                        N.c.status.in_([NodeStatus.PENDING, NodeStatus.RUNNING]),
                        N.c.queue.in_(list(queues)),
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

    def list_flows(self, *, where: FlowFilter) -> list[FlowRecord]:
        query = sa.select(F).order_by(F.c.created_at.desc(), F.c.id.desc()).limit(where.limit)
        if where.status is not None:
            query = query.where(F.c.status == where.status)
        if where.flow_name is not None:
            query = query.where(F.c.flow_name == where.flow_name)
        if where.since is not None:
            query = query.where(F.c.created_at >= where.since)
        if where.created_within is not None:
            query = query.where(F.c.created_at >= self._now() - where.created_within)
        rows = self._read(lambda conn: conn.execute(query).all())
        return [flow_record(r) for r in rows]

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

    def _prune_batch(self, conn: Connection, older_than_seconds: float, batch_size: int) -> int:
        ids = list(
            conn.execute(
                sa.select(F.c.id)
                .where(
                    # updated_at equals finished_at once a run is finished, and
                    # (status, updated_at) is indexed.
                    F.c.status.in_(FINISHED_FLOW_STATUSES),
                    F.c.updated_at < self._now() - older_than_seconds,
                )
                .order_by(F.c.updated_at)
                .limit(batch_size)
            ).scalars()
        )
        if ids:
            # Nodes first: not every SQLite connection enforces ON DELETE CASCADE.
            conn.execute(sa.delete(N).where(N.c.flow_id.in_(ids)))
            conn.execute(sa.delete(F).where(F.c.id.in_(ids)))
        return len(ids)

    # -- workers ------------------------------------------------------------------

    def register_worker(self, *, worker: WorkerRecord) -> None:
        values = {**dataclasses.asdict(worker), "queues": ",".join(worker.queues)}
        values.update(started_at=self._now(), heartbeat_at=self._now())
        self._transact(lambda conn: conn.execute(sa.insert(W).values(**values)))

    def worker_heartbeat(self, *, worker_id: str, in_flight: int) -> None:
        self._transact(
            lambda conn: conn.execute(
                sa.update(W)
                .where(W.c.id == worker_id)
                .values(heartbeat_at=self._now(), in_flight=in_flight)
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

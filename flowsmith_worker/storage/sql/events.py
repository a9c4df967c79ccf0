"""send_event: an event stored for a run's wait_for step, and the wait woken.

One transaction under the run's lock (the lock park_node takes too, see
parking.py): the event is inserted into fs_events, keyed by (run, name), and a
wait of that name parked now is made due at once. A wait not reached yet finds
the event when it is. An idempotency key that already sent the event makes a
second send a no-op, whatever the run has become since (a sender that lost the
answer can send again). A wait that timed out and went on (or is being ended by
its timeout) refuses an event: it would be accepted and never used.

Must never complete a node itself: the woken wait is claimed and completed by
a worker, through the fenced write of any step.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Row

from flowsmith_worker import compensation
from flowsmith_worker.errors import EventRefused, FlowNotFound
from flowsmith_worker.plan import WAIT_FOR_EVENT
from flowsmith_worker.storage.base import (
    FINISHED_FLOW_STATUSES,
    EventSent,
    FlowStatus,
    NodeStatus,
)
from flowsmith_worker.storage.sql import context as sql_context
from flowsmith_worker.storage.sql import schema
from flowsmith_worker.storage.sql.base import F, N, SqlBase

E = schema.events


class SqlEvents(SqlBase):
    def send_event(
        self,
        *,
        tracking_id: str,
        name: str,
        payload: str,
        idempotency_key: str | None = None,
        connection: Any = None,
    ) -> EventSent:
        def work(conn: Connection) -> EventSent:
            run = self._lock_flow(conn, F.c.tracking_id == tracking_id)
            if run is None:
                raise FlowNotFound(
                    f"event {name!r} not sent: no flow run has tracking_id {tracking_id!r}"
                )
            earlier = self._earlier_key(conn, run.id, name)
            if (
                earlier is not None
                and idempotency_key is not None
                and earlier == (idempotency_key,)
            ):
                return EventSent(tracking_id, name, delivered=False, woke=False)
            self._refuse(conn, run, name, sent_before=earlier is not None)
            self._refuse_if_timed_out(conn, run, name)
            conn.execute(
                sa.insert(E).values(
                    flow_id=run.id,
                    name=name,
                    payload=payload,
                    idempotency_key=idempotency_key,
                    created_at=self._now(),
                )
            )
            woke = bool(self._wake(conn, run.id, name))
            if woke:
                self.dialect.notify(conn, run.queue)
            return EventSent(tracking_id, name, delivered=True, woke=woke)

        return self._transact(work, connection)

    def _earlier_key(self, conn: Connection, flow_id: int, name: str) -> tuple[str | None] | None:
        """(its idempotency key,) of the event already sent under ``name``; None if none was.

        for_latest: in a caller's REPEATABLE READ snapshot (connection= on MySQL) a
        plain read could miss an event committed since the snapshot began.
        """
        row = conn.execute(
            self.dialect.for_latest(
                sa.select(E.c.idempotency_key).where(E.c.flow_id == flow_id, E.c.name == name)
            )
        ).first()
        return None if row is None else (row.idempotency_key,)

    @staticmethod
    def _refuse(conn: Connection, run: Row[Any], name: str, *, sent_before: bool) -> None:
        """Raise EventRefused unless the run is not over (nor undoing its steps) and has a
        wait_for step ``name`` that no event was sent to yet."""
        if run.status in FINISHED_FLOW_STATUSES:
            # A compensated FAILED run is never retried: do not tell to retry it first.
            # (No plan read: a plan that cannot be parsed must not hide the refusal.)
            compensated = (
                run.status == FlowStatus.FAILED
                and conn.execute(
                    sa.select(N.c.id)
                    .where(
                        N.c.flow_id == run.id,
                        N.c.step_name.startswith(compensation.COMPENSATE_PREFIX, autoescape=True),
                    )
                    .limit(1)
                ).first()
                is not None
            )
            raise EventRefused.run_finished(run.tracking_id, name, run.status, compensated)
        if run.status == FlowStatus.COMPENSATING:
            # Failed for good and undoing its steps: no wait of it will run again.
            raise EventRefused.run_finished(run.tracking_id, name, run.status, compensated=True)
        plan = sql_context.parse_plan(run.plan, run.tracking_id)
        waits = [s.name for stage in plan.stages for s in stage if s.kind == WAIT_FOR_EVENT]
        if name not in waits:
            raise EventRefused.not_awaited(run.tracking_id, run.flow_name, name, waits)
        if sent_before:
            raise EventRefused.already_sent(run.tracking_id, name)

    def _refuse_if_timed_out(self, conn: Connection, run: Row[Any], name: str) -> None:
        """Raise EventRefused if the wait ``name`` is over without an event: it completed
        with its on_timeout value, or it is being ended by its timeout (claimed, its wake
        time past: park_node decided under this lock). An event stored then would be
        accepted and never used. (A wait that failed by its timeout failed its run.)"""
        node = conn.execute(
            self.dialect.for_latest(
                sa.select(N.c.status, N.c.wake_at, self._now().label("now")).where(
                    N.c.flow_id == run.id, N.c.step_name == name
                )
            )
        ).first()
        if node is None:
            return  # the run has not got there yet: the wait finds the event when it does
        timing_out = node.status == NodeStatus.RUNNING and (
            node.wake_at is not None and node.wake_at <= node.now
        )
        if node.status == NodeStatus.COMPLETED or timing_out:
            raise EventRefused.wait_over(run.tracking_id, name)

    def _wake(self, conn: Connection, flow_id: int, name: str) -> int:
        """Make the wait ``name`` due now if it is parked: 1 if it was, else 0."""
        return conn.execute(
            sa.update(N)
            .where(
                N.c.flow_id == flow_id,
                N.c.step_name == name,
                N.c.status == NodeStatus.PENDING,
                N.c.wake_at.is_not(None),
            )
            .values(run_after=self._now())
        ).rowcount

"""The rows of a map's items: inserted set-based, released, counted, collected.

The decisions are fanout.py's; this module carries them out inside the caller's
transaction, the run locked already (storage.py: start_map, _advance, fail_node,
_resume). Every statement here is about a whole map, never one per item, but for
the release of the one held item an ended item makes room for.

Must never open a transaction, nor decide what the run does next: storage.py
moves it on (progress.py) once ``item_ended`` says the map is complete.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Row

from flowsmith_worker import fanout, parking
from flowsmith_worker.errors import CorruptRow
from flowsmith_worker.plan import MAP, Plan, PlannedStep
from flowsmith_worker.storage.base import Lease, NodeStatus
from flowsmith_worker.storage.sql import context as sql_context
from flowsmith_worker.storage.sql.base import N, SqlBase


class SqlFanOut(SqlBase):
    def _insert_items(
        self,
        conn: Connection,
        flow_row: Row[Any],
        position: int,
        planned: PlannedStep,
        items: Sequence[str],
    ) -> None:
        """Insert a node per item, ITEMS_PER_INSERT rows per statement; those beyond
        max_parallel held (PENDING until parking.FOREVER, see fanout.py)."""
        now = conn.execute(sa.select(self._now())).scalar_one()
        released = fanout.released_at_start(len(items), planned.max_parallel)
        rows = [
            dict(
                flow_id=flow_row.id,
                step_name=fanout.item_name(planned.name, index),
                position=position,
                group_index=fanout.group_index_of(index),
                status=NodeStatus.PENDING,
                queue=flow_row.queue,
                priority=flow_row.priority,
                attempt=0,
                max_attempts=planned.max_attempts,
                rescues=0,
                output=item,
                run_after=now if index < released else parking.FOREVER,
                created_at=now,
            )
            for index, item in enumerate(items)
        ]
        for chunk in fanout.chunks(rows, fanout.ITEMS_PER_INSERT):
            conn.execute(sa.insert(N).values(chunk))

    def map_item(self, *, lease: Lease) -> str | None:
        def work(conn: Connection) -> str | None:
            item: str | None = conn.execute(
                sa.select(N.c.output).where(
                    N.c.id == lease.node_id,
                    N.c.status == NodeStatus.RUNNING,
                    N.c.lease_owner == lease.worker_id,
                    N.c.attempt == lease.attempt,
                )
            ).scalar()
            return item

        return self._read(work)

    def _item_ended(
        self, conn: Connection, flow_row: Row[Any], planned: PlannedStep, position: int
    ) -> int | None:
        """An item of the map ``planned`` ended: release the next held item, or, if it
        was the last, complete the map node with the items' outputs. The map node's
        id when the map is complete (the caller moves the run on), else None."""
        items = _items_of(flow_row.id, position)
        # Whether any item has not ended: the query stops at the first one it finds,
        # where a count would visit every item of the map at each item's end.
        unended = conn.execute(
            sa.select(N.c.id).where(*items, N.c.status.notin_(fanout.ENDED)).limit(1)
        ).first()
        if unended is not None:
            if planned.max_parallel is not None:
                self._release_next(conn, flow_row, items)
            return None
        outputs = conn.execute(
            sa.select(N.c.status, N.c.output, N.c.error)
            .where(*items)
            .order_by(N.c.group_index.desc())  # item 0 is group_index -1
        ).all()
        collected = fanout.collect(
            ((r.status, r.output, r.error) for r in outputs), planned.allow_failures
        )
        map_node = sa.and_(
            N.c.flow_id == flow_row.id,
            N.c.step_name == planned.name,
            N.c.status == NodeStatus.WAITING,
        )
        node_id: int | None = conn.execute(sa.select(N.c.id).where(map_node)).scalar()
        if node_id is None:
            return None  # not waiting for its items (cancelled meanwhile)
        conn.execute(
            sa.update(N)
            .where(N.c.id == node_id)
            .values(status=NodeStatus.COMPLETED, output=collected, finished_at=self._now())
        )
        return node_id

    def _release_next(
        self, conn: Connection, flow_row: Row[Any], items: tuple[sa.ColumnElement[bool], ...]
    ) -> None:
        """Make the held item of lowest index runnable now (see fanout.py)."""
        held = conn.execute(
            sa.select(N.c.id)
            .where(*items, N.c.status == NodeStatus.PENDING, N.c.run_after >= parking.FOREVER)
            .order_by(N.c.group_index.desc())
            .limit(1)
        ).scalar()
        if held is None:
            return
        conn.execute(sa.update(N).where(N.c.id == held).values(run_after=self._now()))
        self.dialect.notify(conn, flow_row.queue)

    def _stop_waiting_maps(self, conn: Connection, flow_row: Row[Any], stopped: Any) -> None:
        """A failing run stops its maps waiting for items as it stops its PENDING nodes
        (``stopped``: the column values of that fate): nothing of the run is left in
        flight, so its compensations can begin, and a retry finds them (see below)."""
        names = _map_names(flow_row)
        if names:
            conn.execute(
                sa.update(N)
                .where(
                    N.c.flow_id == flow_row.id,
                    N.c.status == NodeStatus.WAITING,
                    N.c.step_name.in_(names),
                )
                .values(**stopped)
            )

    def _without_items_of_maps_done(
        self, conn: Connection, flow_id: int, resumed: Sequence[Row[Any]]
    ) -> list[Row[Any]]:
        """``resumed`` but the items of a map COMPLETED: done for good, its FAILED items
        (under allow_failures) with it, whose errors are in its output."""
        positions = sorted({row.position for row in resumed if row.group_index < 0})
        if not positions:
            return list(resumed)
        done = set(
            conn.execute(
                sa.select(N.c.position).where(
                    N.c.flow_id == flow_id,
                    N.c.position.in_(positions),
                    N.c.group_index >= 0,
                    N.c.status == NodeStatus.COMPLETED,
                )
            ).scalars()
        )
        return [row for row in resumed if row.group_index >= 0 or row.position not in done]

    def _maps_waiting_again(
        self, conn: Connection, flow_id: int, plan: Plan, resumed: Sequence[Row[Any]]
    ) -> set[int]:
        """The resumed map nodes whose items were started: WAITING for them again (their
        failed and stopped items are resumed with them), not run again; their ids."""
        maps = [
            row
            for row in resumed
            if row.group_index >= 0 and (p := plan.step(row.step_name)) and p.kind == MAP
        ]
        started = {
            row.id
            for row in maps
            if conn.execute(
                sa.select(N.c.id).where(*_items_of(flow_id, row.position)).limit(1)
            ).first()
            is not None
        }
        if started:
            conn.execute(
                sa.update(N)
                .where(N.c.id.in_(sorted(started)))
                .values(status=NodeStatus.WAITING, finished_at=None, lease_expires_at=None)
            )
        return started

    def _hold_resumed_items(
        self, conn: Connection, flow_id: int, plan: Plan, resumed: Sequence[Row[Any]]
    ) -> None:
        """Keep each map's max_parallel when a FAILED run's items run again: the resumed
        items beyond the places its items still running leave free are held."""
        for step_name, position in _maps_with_limits(plan):
            indexes = {
                fanout.index_of(row.group_index): row.id
                for row in resumed
                if row.position == position and row.group_index < 0
            }
            if not indexes:
                continue
            running = conn.execute(
                sa.select(sa.func.count()).where(
                    *_items_of(flow_id, position), N.c.status == NodeStatus.RUNNING
                )
            ).scalar_one()
            planned = plan.step(step_name)
            assert planned is not None
            held = fanout.held_on_resume(list(indexes), running, planned.max_parallel)
            for ids in fanout.chunks([indexes[i] for i in sorted(held)], fanout.IDS_PER_STATEMENT):
                conn.execute(sa.update(N).where(N.c.id.in_(ids)).values(run_after=parking.FOREVER))


def map_of_item(plan: Plan, step_name: str) -> tuple[PlannedStep, int] | None:
    """The map step (and its stage) whose item ``step_name`` names; None if it is none."""
    found = fanout.parse_item_name(step_name)
    if found is None or plan.step(step_name) is not None:
        return None
    planned = plan.step(found[0])
    position = plan.position_of(found[0])
    if planned is None or planned.kind != MAP or position is None:
        return None
    return planned, position


def planned_of(plan: Plan, step_name: str) -> PlannedStep | None:
    """The planned step of a node: its own, or for a map's item, its map's."""
    found = map_of_item(plan, step_name)
    return plan.step(step_name) if found is None else found[0]


def _items_of(flow_id: int, position: int) -> tuple[sa.ColumnElement[bool], ...]:
    """The item nodes of the map at ``position`` (a map is alone in its stage)."""
    return (N.c.flow_id == flow_id, N.c.position == position, N.c.group_index < 0)


def _map_names(flow_row: Row[Any]) -> list[str]:
    """The run's map steps. A plan that cannot be read has none: the run that fails
    because of it must still fail (a bad row stops only its run)."""
    try:
        plan = sql_context.parse_plan(flow_row.plan, flow_row.tracking_id)
    except CorruptRow:
        return []
    return [planned.name for stage in plan.stages for planned in stage if planned.kind == MAP]


def _maps_with_limits(plan: Plan) -> list[tuple[str, int]]:
    return [
        (planned.name, position)
        for position, stage in enumerate(plan.stages)
        for planned in stage
        if planned.kind == MAP and planned.max_parallel is not None
    ]

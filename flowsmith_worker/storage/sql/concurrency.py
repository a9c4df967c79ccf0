"""Concurrency keys' places, in the transaction of the write that takes or ends one.

See flowsmith_worker/concurrency.py for the design. Every change to a key's
places locks its fs_concurrency_keys row first, so the count of runs in flight
read next is exact: the runs that change a key's places all wait for that lock.
The reads that follow the lock are plain: each statement sees what was committed
before it (READ COMMITTED on PostgreSQL and MySQL, see dialects/engine.py;
SQLite has one writer), and a locking read over the key's runs would wait on
the run a finishing step holds while that step waits for the key. In a caller's
transaction (connection=) they are not: on MySQL its REPEATABLE READ snapshot may
be older than the lock, so there they read the latest rows (Dialect.for_latest).

Lock order: an enqueue locks its keys (in key order) before it inserts its runs;
a run's end, a cancel and a retry hold the run's row, then lock its key, then
write the waiting runs they start. A cancel of a waiting run racing the end that
starts it may deadlock: the database aborts one and _transact runs it again.

Must never decide who gets a place (concurrency.py does) nor run outside the
caller's transaction.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from flowsmith_worker import concurrency
from flowsmith_worker.storage.base import NewFlow, NodeStatus
from flowsmith_worker.storage.sql import schema
from flowsmith_worker.storage.sql.base import F, N, SqlBase

K = schema.concurrency_keys
# A run's key: (flow name, concurrency key).
Key = tuple[str, str]


class SqlConcurrency(SqlBase):
    """Taking, handing on and waiting for places under concurrency keys."""

    def _lock_keys_for(self, conn: Connection, flows: Iterable[NewFlow]) -> list[Key]:
        """Lock the keys of the runs about to be enqueued, in key order, each with its
        flow's limit now; the keys locked."""
        limits = {
            (flow.flow_name, flow.concurrency_key): flow.max_concurrent
            for flow in flows
            if flow.concurrency_key is not None and flow.max_concurrent is not None
        }
        for (flow_name, key), limit in sorted(limits.items()):
            where = (K.c.flow_name == flow_name, K.c.concurrency_key == key)
            conn.execute(
                self.dialect.insert_if_absent(K).values(
                    flow_name=flow_name, concurrency_key=key, max_concurrent=limit
                )
            )
            # An UPDATE locks the row where a plain read would not: it is the key's lock.
            conn.execute(sa.update(K).where(*where).values(max_concurrent=limit))
        return sorted(limits)

    def _wait_for_places(self, conn: Connection, run_ids: Sequence[int]) -> None:
        """Make runs (new, or retried) wait for a place: their nodes due to run are BLOCKED
        until _give_places starts them, in the order of their key_turn (now)."""
        if not run_ids:
            return
        conn.execute(sa.update(F).where(F.c.id.in_(run_ids)).values(key_turn=self._now()))
        conn.execute(
            sa.update(N)
            .where(N.c.flow_id.in_(run_ids), N.c.status == NodeStatus.PENDING)
            .values(status=NodeStatus.BLOCKED)
        )

    def _end_place(self, conn: Connection, run_id: int, flow_name: str, key: str | None) -> None:
        """The run ended (completed, failed, cancelled): it holds, or waits for, no place
        now; the next runs waiting for its key get the places free."""
        if key is None:
            return
        limit = self._lock_key(conn, (flow_name, key))
        conn.execute(sa.update(F).where(F.c.id == run_id).values(key_turn=None))
        if limit is not None:
            self._give_places(conn, (flow_name, key), limit)

    def _end_place_of(self, conn: Connection, run_id: int) -> None:
        """_end_place for a run known by its id (a cancel)."""
        run = conn.execute(
            sa.select(F.c.flow_name, F.c.concurrency_key).where(F.c.id == run_id)
        ).first()
        if run is not None:
            self._end_place(conn, run_id, run.flow_name, run.concurrency_key)

    def _retry_place(self, conn: Connection, run_id: int, flow_name: str, key: str | None) -> None:
        """A FAILED run resumed: it takes a place again as a new arrival would (its
        failed nodes, PENDING again, wait BLOCKED until it has one)."""
        if key is None:
            return
        limit = self._lock_key(conn, (flow_name, key))
        self._wait_for_places(conn, [run_id])
        if limit is not None:
            self._give_places(conn, (flow_name, key), limit)

    def _give_free_places(self, conn: Connection, keys: Sequence[Key]) -> None:
        """Give each key's free places (its row locked already) to its runs waiting longest."""
        for key in keys:
            limit = self._lock_key(conn, key)
            if limit is not None:
                self._give_places(conn, key, limit)

    def _lock_key(self, conn: Connection, key: Key) -> int | None:
        """Lock the key's row (a no-op when this transaction holds it); its limit, or None
        if the row is gone (deleted by hand: the key then limits nothing)."""
        flow_name, concurrency_key = key
        found = conn.execute(
            self.dialect.for_update(
                sa.select(K.c.max_concurrent).where(
                    K.c.flow_name == flow_name, K.c.concurrency_key == concurrency_key
                )
            )
        ).scalar()
        return None if found is None else int(found)

    def _latest(self, conn: Connection, query: sa.Select[Any]) -> sa.Select[Any]:
        """``query`` as it reads the rows committed before the key's lock: as it is on
        our own connections, which read committed; on a caller's, for_latest."""
        return query if conn.engine is self.engine else self.dialect.for_latest(query)

    def _give_places(self, conn: Connection, key: Key, limit: int) -> None:
        """Start the runs waiting longest for the key, as many as it has places free."""
        flow_name, concurrency_key = key
        of_key = (F.c.flow_name == flow_name, F.c.concurrency_key == concurrency_key)
        in_flight = conn.execute(
            self._latest(
                conn,
                sa.select(sa.func.count()).where(*of_key, F.c.key_turn == concurrency.IN_FLIGHT),
            )
        ).scalar_one()
        free = concurrency.places_free(limit, in_flight)
        if not free:
            return
        waiting = conn.execute(
            self._latest(
                conn,
                sa.select(F.c.id, F.c.queue)
                .where(*of_key, F.c.key_turn > concurrency.IN_FLIGHT)
                .order_by(F.c.key_turn, F.c.id)
                .limit(free),
            )
        ).all()
        if not waiting:
            return
        ids = [row.id for row in waiting]
        conn.execute(sa.update(F).where(F.c.id.in_(ids)).values(key_turn=concurrency.IN_FLIGHT))
        # Due when they were enqueued for: a run delayed, or waiting since, keeps its time.
        conn.execute(
            sa.update(N)
            .where(N.c.flow_id.in_(ids), N.c.status == NodeStatus.BLOCKED)
            .values(status=NodeStatus.PENDING)
        )
        for queue in sorted({row.queue for row in waiting}):
            self.dialect.notify(conn, queue)

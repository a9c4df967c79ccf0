"""Enqueue's writes: new runs and their first stages, in as few statements as each database allows.

SqlStorage (storage.py) decides what a trigger does to each tracking_id (the
idempotent-trigger rules); this module only inserts runs that are new:

- many at once (``Flow.run_many``): multi-row INSERTs of the runs and of their
  first nodes, in chunks of at most MAX_ROWS_PER_STATEMENT rows and of at most
  the payload limit in bytes of inputs and plans. So no statement of a batch is
  larger than the largest single enqueue (MariaDB refuses a statement over its
  max_allowed_packet, 16 MiB by default) or binds more parameters than a
  database takes (SQLite 32,766; PostgreSQL and MySQL 65,535). Still one
  transaction: the chunks commit or roll back together.
- one, on PostgreSQL, without a caller's connection: one statement, sent in
  autocommit (no BEGIN or COMMIT round trip), that inserts the run, its first
  stage and the NOTIFY together, or nothing when the tracking_id exists.

Must never decide what a trigger does to an existing tracking_id (storage.py does), and
never commit a batch in parts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Row

from flowsmith_worker import payload
from flowsmith_worker.plan import PlannedStep
from flowsmith_worker.storage.base import FlowStatus, NewFlow, NodeStatus
from flowsmith_worker.storage.sql.base import FLOW_STATE, F, N, dumps
from flowsmith_worker.storage.sql.concurrency import Key, SqlConcurrency
from flowsmith_worker.storage.sql.context import input_to_store
from flowsmith_worker.storage.sql.dialects import NOTIFY_CHANNEL, DbError, is_stale_connection
from flowsmith_worker.storage.sql.prepared import PreparedStatement

T = TypeVar("T")
# Rows per INSERT or per IN (...) list: big enough that a statement's round trip
# is shared by many runs, small enough that none binds too many parameters.
MAX_ROWS_PER_STATEMENT = 1000

# New runs of one flow (no parent) and their first stages, as ONE statement
# (PostgreSQL): the runs share flow, plan, queue, priority and start; the
# tracking_ids and inputs travel as two arrays, which PostgreSQL parses and
# plans far faster than a VALUES list of the same rows (about 3x for 1,000).
# ON CONFLICT DO NOTHING skips a tracking_id that exists, and with it that
# run's nodes: the statement returns the runs it inserted, and the caller
# applies the trigger rules to the others. The data-modifying CTEs run whether
# or not the final SELECT reads them; the nodes' foreign key is checked at the
# end of the statement, when the runs exist. pg_notify is sent once per
# inserted run and PostgreSQL folds the repeats into one at commit. Times are
# the database's, as everywhere (see dialects.Dialect.now). Prepared once per
# connection (sql/prepared.py): a single flow.run is then bind, execute, commit.
ENQUEUE_NEW_RUNS_PG = PreparedStatement(
    "fs_enqueue_runs",
    f"""
WITH clock AS (
    SELECT CAST(extract(epoch FROM now()) AS DOUBLE PRECISION) AS now
), new_runs AS (
    INSERT INTO fs_flows (flow_name, tracking_id, status, input, plan, queue, priority,
                          created_at, updated_at)
    SELECT %(flow_name)s, v.tracking_id, '{FlowStatus.PENDING}', v.input, %(plan)s, %(queue)s,
           %(priority)s, clock.now, clock.now
    FROM clock
    CROSS JOIN unnest(CAST(%(tracking_ids)s AS TEXT[]), CAST(%(inputs)s AS TEXT[]))
         AS v(tracking_id, input)
    ON CONFLICT DO NOTHING
    RETURNING id, tracking_id, queue, priority, created_at
), first_stage AS (
    INSERT INTO fs_nodes (flow_id, step_name, position, group_index, status, queue, priority,
                          attempt, max_attempts, rescues, run_after, created_at)
    SELECT r.id, s.step_name, 0, CAST(s.ordinality AS INTEGER) - 1, '{NodeStatus.PENDING}',
           r.queue, r.priority, 0, s.max_attempts, 0,
           CASE WHEN CAST(%(run_at)s AS DOUBLE PRECISION) IS NULL THEN r.created_at + %(delay)s
                ELSE GREATEST(r.created_at, CAST(%(run_at)s AS DOUBLE PRECISION)) END,
           r.created_at
    FROM new_runs r
    CROSS JOIN unnest(CAST(%(step_names)s AS TEXT[]), CAST(%(max_attempts)s AS INTEGER[]))
         WITH ORDINALITY AS s(step_name, max_attempts, ordinality)
)
SELECT id, tracking_id, pg_notify('{NOTIFY_CHANNEL}', queue) FROM new_runs
""",
    {
        "flow_name": "text",
        "plan": "text",
        "queue": "text",
        "priority": "int",
        "delay": "float8",
        "run_at": "float8",
        "tracking_ids": "text[]",
        "inputs": "text[]",
        "step_names": "text[]",
        "max_attempts": "int[]",
    },
)


def chunks(items: Sequence[T], size_of: Callable[[T], int] | None = None) -> Iterator[list[T]]:
    """``items`` in order, in lists of at most MAX_ROWS_PER_STATEMENT and, when
    ``size_of`` is given, of at most the payload limit in bytes (or one item)."""
    budget = payload.limits().max_bytes
    chunk: list[T] = []
    used = 0
    for item in items:
        size = size_of(item) if size_of else 0
        if chunk and (len(chunk) == MAX_ROWS_PER_STATEMENT or used + size > budget):
            yield chunk
            chunk, used = [], 0
        chunk.append(item)
        used += size
    if chunk:
        yield chunk


class SqlEnqueue(SqlConcurrency):
    """Inserting new runs; what to do with existing ones is SqlStorage's."""

    def _read_runs(self, conn: Connection, tracking_ids: Sequence[str]) -> dict[str, Row[Any]]:
        """The runs (without payloads) that have these tracking_ids, by tracking_id.

        for_latest: the latest committed rows, even in a caller's REPEATABLE READ
        transaction on MySQL (see Dialect.for_latest).
        """
        found: dict[str, Row[Any]] = {}
        for chunk in chunks(tracking_ids):
            query = sa.select(*FLOW_STATE).where(F.c.tracking_id.in_(chunk))
            for row in conn.execute(self.dialect.for_latest(query)):
                found[row.tracking_id] = row
        return found

    def _insert_new_run(
        self, conn: Connection, flow: NewFlow, parent_node_id: int | None
    ) -> int | None:
        """Insert the run, its first stage and the NOTIFY unless its tracking_id exists
        (then nothing); its new id, or None. A run of its own takes _insert_new_runs'
        path (on PostgreSQL one statement, in the caller's transaction too)."""
        if parent_node_id is None:
            return self._insert_new_runs(conn, [flow]).get(flow.tracking_id)
        keys = self._lock_keys_for(conn, [flow])
        new_id = self._insert_subflow_run(conn, flow, parent_node_id)
        if new_id is not None:
            self._insert_first_stages(conn, [(new_id, flow)])
            self.dialect.notify(conn, flow.queue)
            if keys:
                self._take_places(conn, keys, [new_id])
        return new_id

    def _insert_subflow_run(
        self, conn: Connection, flow: NewFlow, parent_node_id: int
    ) -> int | None:
        """Insert the run unless its tracking_id exists; its new id, or None."""
        now = self._now()
        row = _run_row(flow, dumps(input_to_store(flow)), flow.plan.to_json(), parent_node_id)
        insert = self.dialect.insert_if_absent(F).values(
            {**row, "created_at": now, "updated_at": now}
        )
        if self.dialect.returns_inserted_rows(conn):
            new_id = conn.execute(insert.returning(F.c.id)).scalar()
            return None if new_id is None else int(new_id)
        result = conn.execute(insert)
        return int(result.lastrowid) if self.dialect.inserted_a_row(result) else None

    def _insert_new_runs(self, conn: Connection, flows: Sequence[NewFlow]) -> dict[str, int]:
        """Insert each run whose tracking_id is free, with its first stage, and wake
        the workers of its queue; tracking_id -> id of the runs inserted.

        A tracking_id that exists (another transaction may have inserted it since
        the caller's read) is left out: the caller applies the trigger rules to it.
        """
        plans = _PlanTexts()
        inputs = {flow.tracking_id: dumps(input_to_store(flow)) for flow in flows}
        # Runs with a concurrency key lock their keys first (see sql/concurrency.py)
        # and take the statement-by-statement path, which stores their keys.
        keys = self._lock_keys_for(conn, flows)
        alike = [flow for flow in flows if _in_one_statement(self, flow)]
        created = self._insert_runs_alike(conn, alike, inputs, plans) if alike else {}
        rest = [flow for flow in flows if not _in_one_statement(self, flow)]
        if rest:
            created.update(self._insert_runs_in_parts(conn, rest, inputs, plans))
        keyed = [flow.tracking_id for flow in flows if flow.concurrency_key is not None]
        self._take_places(conn, keys, [created[tid] for tid in keyed if tid in created])
        return created

    def _insert_runs_in_parts(
        self,
        conn: Connection,
        flows: Sequence[NewFlow],
        inputs: dict[str, str],
        plans: _PlanTexts,
    ) -> dict[str, int]:
        """_insert_new_runs statement by statement: the runs, then their first stages."""
        rows = [_run_row(flow, inputs[flow.tracking_id], plans.of(flow), None) for flow in flows]
        created: dict[str, int] = {}
        for chunk in chunks(rows, lambda row: len(row["input"]) + len(row["plan"])):
            created.update(self._insert_run_rows(conn, chunk))
        new = [flow for flow in flows if flow.tracking_id in created]
        self._insert_first_stages(conn, [(created[flow.tracking_id], flow) for flow in new])
        for queue in sorted({flow.queue for flow in new}):
            self.dialect.notify(conn, queue)
        return created

    def _take_places(self, conn: Connection, keys: Sequence[Key], new_ids: Sequence[int]) -> None:
        """New runs with a key wait for a place, and get one now where one is free
        (their keys are locked: _lock_keys_for)."""
        for chunk in chunks(new_ids):
            self._wait_for_places(conn, chunk)
        self._give_free_places(conn, keys)

    def _insert_runs_alike(
        self,
        conn: Connection,
        flows: Sequence[NewFlow],
        inputs: dict[str, str],
        plans: _PlanTexts,
    ) -> dict[str, int]:
        """_insert_new_runs with ENQUEUE_NEW_RUNS_PG: one statement per chunk of runs alike."""
        created: dict[str, int] = {}
        for group in _runs_alike(flows):
            for chunk in chunks(group, lambda flow: len(inputs[flow.tracking_id])):
                created.update(self._insert_new_runs_in_one_statement(conn, chunk, inputs, plans))
        return created

    def _insert_run_rows(self, conn: Connection, rows: list[dict[str, Any]]) -> dict[str, int]:
        now = self._now()
        if self.dialect.returns_inserted_rows(conn):
            insert = self.dialect.insert_if_absent(F).values(created_at=now, updated_at=now)
            returned = conn.execute(insert.returning(F.c.id, F.c.tracking_id), rows)
            return {tracking_id: int(new_id) for new_id, tracking_id in returned}
        # MySQL: no INSERT ... RETURNING, and ON DUPLICATE KEY UPDATE would not
        # say which rows it skipped. A plain INSERT either inserts every row or,
        # when a tracking_id was taken since our read, fails as a whole: InnoDB
        # undoes that statement alone, and the rows go one by one instead, each
        # saying whether it inserted (as a single run does from the start).
        if len(rows) == 1:
            return self._insert_run_rows_one_by_one(conn, rows)
        try:
            conn.execute(sa.insert(F).values(created_at=now, updated_at=now), rows)
        except sa.exc.IntegrityError as exc:
            if self.dialect.classify(exc) is not DbError.UNIQUE_VIOLATION:
                raise
            return self._insert_run_rows_one_by_one(conn, rows)
        query = sa.select(F.c.id, F.c.tracking_id).where(
            F.c.tracking_id.in_([row["tracking_id"] for row in rows])
        )
        return {tracking_id: int(new_id) for new_id, tracking_id in conn.execute(query)}

    def _insert_run_rows_one_by_one(
        self, conn: Connection, rows: list[dict[str, Any]]
    ) -> dict[str, int]:
        """Insert-if-absent row by row: each says whether it inserted (MySQL's lastrowid)."""
        inserted: dict[str, int] = {}
        now = self._now()
        for row in rows:
            result = conn.execute(
                self.dialect.insert_if_absent(F).values(
                    {**row, "created_at": now, "updated_at": now}
                )
            )
            if self.dialect.inserted_a_row(result):
                inserted[row["tracking_id"]] = int(result.lastrowid)
        return inserted

    def _insert_first_stages(self, conn: Connection, runs: Sequence[tuple[int, NewFlow]]) -> None:
        """Insert the first stage of each new run (flow id, request): PENDING, due
        ``delay_seconds`` from now or at ``run_at``, whichever the request gives.

        One multi-row INSERT per chunk and per distinct start (run_many: one);
        their ctx.data is rebuilt when they are claimed (sql/context.py).
        """
        by_start: dict[tuple[float, float | None], list[dict[str, Any]]] = {}
        for flow_id, flow in runs:
            rows = by_start.setdefault((flow.delay_seconds, flow.run_at), [])
            rows.extend(_first_stage_rows(flow_id, flow))
        for (delay, run_at), rows in by_start.items():
            insert = sa.insert(N).values(
                run_after=self._start_time(delay, run_at), created_at=self._now()
            )
            for chunk in chunks(rows):
                conn.execute(insert, chunk)

    def _start_time(self, delay: float, run_at: float | None) -> sa.ColumnElement[float]:
        """When a new run's first stage is due, by the database clock."""
        now = self._now()
        return now + delay if run_at is None else self.dialect.greatest(now, run_at)

    def _insert_new_runs_in_one_statement(
        self,
        conn: Connection,
        flows: Sequence[NewFlow],
        inputs: dict[str, str],
        plans: _PlanTexts,
    ) -> dict[str, int]:
        """ENQUEUE_NEW_RUNS_PG for runs alike (see _runs_alike); tracking_id -> new id."""
        first = flows[0]
        stage = first.plan.stage(0)
        parameters = {
            "flow_name": first.flow_name,
            "plan": plans.of(first),
            "queue": first.queue,
            "priority": first.priority,
            "delay": first.delay_seconds,
            "run_at": first.run_at,
            "tracking_ids": [flow.tracking_id for flow in flows],
            "inputs": [inputs[flow.tracking_id] for flow in flows],
            "step_names": [step.name for step in stage],
            "max_attempts": [step.max_attempts for step in stage],
        }
        # Never prepared on a caller's connection (connection=): its session is not
        # ours to leave statements in, nor is its pool ours to replace one that lost them.
        prepare = self.prepares and conn.engine is self.engine
        rows = ENQUEUE_NEW_RUNS_PG.execute(conn, parameters, prepare=prepare)
        return {tracking_id: int(new_id) for new_id, tracking_id, _ in rows}

    def _enqueue_in_one_statement(self, flow: NewFlow) -> int | None:
        """Insert a new run, its first stage and the NOTIFY in one round trip (PostgreSQL).

        Autocommit: the statement is its own transaction, so no BEGIN or COMMIT
        travels. The new run's id, or None when the tracking_id exists (nothing
        was written). A pooled connection the server dropped (a restart: pooled
        connections are not pinged, see dialects.engine._ping_after_idle) fails the
        statement, which runs once more on a new one: it inserts nothing twice,
        so if the first did commit, the second finds the run and returns None.
        """
        with self._errors():
            try:
                return self._enqueue_in_one_statement_once(flow)
            except sa.exc.DBAPIError as exc:
                if not is_stale_connection(exc):
                    raise
            return self._enqueue_in_one_statement_once(flow)

    def _enqueue_in_one_statement_once(self, flow: NewFlow) -> int | None:
        inputs = {flow.tracking_id: dumps(input_to_store(flow))}
        with self.engine.connect() as pooled, self.dialect.autocommit(pooled) as conn:
            created = self._insert_new_runs_in_one_statement(conn, [flow], inputs, _PlanTexts())
        return created.get(flow.tracking_id)


class _PlanTexts:
    """Each plan encoded once: the runs of one run_many share one Plan object."""

    def __init__(self) -> None:
        self._texts: dict[int, str] = {}

    def of(self, flow: NewFlow) -> str:
        key = id(flow.plan)  # the plans outlive this object: ids stay unique meanwhile
        text = self._texts.get(key)
        if text is None:
            text = self._texts[key] = flow.plan.to_json()
        return text


def _runs_alike(flows: Sequence[NewFlow]) -> list[list[NewFlow]]:
    """``flows`` grouped by what ENQUEUE_NEW_RUNS_PG takes once for all its runs (run_many:
    one group), each group in the order given."""
    groups: dict[tuple[Any, ...], list[NewFlow]] = {}
    for flow in flows:
        key = (
            flow.flow_name,
            id(flow.plan),
            flow.queue,
            flow.priority,
            flow.delay_seconds,
            flow.run_at,
        )
        groups.setdefault(key, []).append(flow)
    return list(groups.values())


def _in_one_statement(storage: SqlEnqueue, flow: NewFlow) -> bool:
    """Whether the run is inserted by ENQUEUE_NEW_RUNS_PG, which stores no concurrency key."""
    return storage.dialect.enqueues_in_one_statement and flow.concurrency_key is None


def _run_row(
    flow: NewFlow, input_json: str, plan_json: str, parent_node_id: int | None
) -> dict[str, Any]:
    """The fs_flows values of a new run, but its times (the database's clock)."""
    row: dict[str, Any] = dict(
        flow_name=flow.flow_name,
        tracking_id=flow.tracking_id,
        status=FlowStatus.PENDING,
        input=input_json,
        plan=plan_json,
        queue=flow.queue,
        priority=flow.priority,
        concurrency_key=flow.concurrency_key,
    )
    if parent_node_id is not None:
        row["parent_node_id"] = parent_node_id
    return row


def _first_stage_rows(flow_id: int, flow: NewFlow) -> list[dict[str, Any]]:
    return stage_rows(flow_id, flow.queue, flow.priority, 0, flow.plan.stage(0))


def stage_rows(
    flow_id: int, queue: str, priority: int, position: int, steps: Sequence[PlannedStep]
) -> list[dict[str, Any]]:
    """The fs_nodes rows of a stage waiting to run, in plan order (enqueue and _start_stage)."""
    return [
        dict(
            flow_id=flow_id,
            step_name=step.name,
            position=position,
            group_index=index,
            status=NodeStatus.PENDING,
            queue=queue,
            priority=priority,
            attempt=0,
            max_attempts=step.max_attempts,
            rescues=0,
        )
        for index, step in enumerate(steps)
    ]

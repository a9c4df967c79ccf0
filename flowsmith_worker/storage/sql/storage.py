"""One SQLAlchemy Core storage for SQLite, PostgreSQL and MySQL/MariaDB.

Every operation is one short transaction. Writes about an attempt are fenced
by its Lease (node id, worker id, attempt): a worker that lost its lease
cannot overwrite the newer attempt. Transactions that change a flow lock the
flow row first, then its nodes, so a parallel group's siblings advance the flow
exactly once. Two paths take locks in another order — a cancel walking down to
a subflow, or a subflow step locking the child run it adopts, while the child's
completion walks up to its parent — and may deadlock; the database then aborts
one and _transact runs it again. The same holds for a run's end handing its
concurrency key's place to a waiting run that a cancel holds (sql/concurrency.py).

Owns the state machine's writes: each operation, a batch of outcomes included, in
one transaction (base.SqlBase._transact), locking runs before nodes. Must never write
about an attempt without its lease's fence, split an operation across transactions,
read this host's clock (times are the database's: dialect.now()), or decide a rule
itself: progress.py decides, this module carries the answer out.
"""

from __future__ import annotations

import contextlib
import functools
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Row

from flowsmith_worker import compensation, fanout, parking, payload, progress, rate_limits
from flowsmith_worker.errors import (
    CorruptRow,
    DatabaseUnavailable,
    FlowAlreadyCompleted,
    FlowCancelled,
    FlowNotFound,
    RunNotCancellable,
    RunNotRetryable,
    RunStatusUnreadable,
    SubflowCycle,
    SubflowTaken,
    TrackingIdTaken,
)
from flowsmith_worker.log import get_logger
from flowsmith_worker.plan import DEFAULT_MAX_RESCUES, Plan, PlannedStep
from flowsmith_worker.storage.base import (
    FINISHED_FLOW_STATUSES,
    Chain,
    ChainedNode,
    ClaimedNode,
    EnqueueResult,
    Finished,
    FlowRecord,
    FlowStatus,
    Lease,
    NewFlow,
    NodeStatus,
    Parked,
    RescuedNode,
    Storage,
    Woken,
    Written,
)
from flowsmith_worker.storage.sql import attempts as sql_attempts
from flowsmith_worker.storage.sql import claim as sql_claim
from flowsmith_worker.storage.sql import context as sql_context
from flowsmith_worker.storage.sql import rate_limits as sql_rate_limits
from flowsmith_worker.storage.sql import schema
from flowsmith_worker.storage.sql.base import (
    FLOW_STATE,
    F,
    N,
    columns_but,
    dumps,
    flow_record,
    node_record,
)
from flowsmith_worker.storage.sql.context import RunPayloads
from flowsmith_worker.storage.sql.dialects import BatchWrite
from flowsmith_worker.storage.sql.enqueue import SqlEnqueue, stage_rows
from flowsmith_worker.storage.sql.events import SqlEvents
from flowsmith_worker.storage.sql.fanout import SqlFanOut, map_of_item, planned_of
from flowsmith_worker.storage.sql.finish import LOCK_RUNS_PG, FinishBatch, Move
from flowsmith_worker.storage.sql.operators import SqlOperators

Q = schema.queues
T = TypeVar("T")
# Claimed node rows, and the payloads of their runs.
_Claimed = tuple[Sequence[Any], dict[int, RunPayloads]]
# Plans of runs remembered for folding the batch's lock into FINISH_PG: a worker
# moves on far fewer runs at once (a slot's chain holds one).
_KNOWN_PLANS = 10_000
log = get_logger(__name__)


class SqlStorage(SqlEnqueue, SqlEvents, SqlFanOut, SqlOperators, Storage):
    """The storage on SQLite, PostgreSQL and MySQL/MariaDB."""

    # -- enqueue --------------------------------------------------------------

    def enqueue_flow(self, *, flow: NewFlow, connection: Any = None) -> EnqueueResult:
        if (
            connection is None
            and self.dialect.enqueues_in_one_statement
            and not flow.concurrency_key
        ):
            new_id = self._enqueue_in_one_statement(flow)
            if new_id is not None:
                return EnqueueResult(new_id, flow.tracking_id, FlowStatus.PENDING, True, False)
            # The tracking_id exists: the trigger rules need a transaction.
        return self._transact(lambda conn: self._enqueue(conn, flow, None), connection)

    def enqueue_flows(
        self, *, flows: Sequence[NewFlow], connection: Any = None
    ) -> list[EnqueueResult]:
        refuse_repeated_tracking_ids(flows)
        if not flows:
            return []
        return self._transact(lambda conn: self._enqueue_many(conn, flows), connection)

    def _enqueue(
        self, conn: Connection, flow: NewFlow, parent_node_id: int | None
    ) -> EnqueueResult:
        new_id = self._insert_new_run(conn, flow, parent_node_id)
        if new_id is not None:
            return EnqueueResult(new_id, flow.tracking_id, FlowStatus.PENDING, True, False)
        # See for_latest for why MySQL needs a (shared) locking read here. The
        # FAILED -> RUNNING transition takes its own lock with a conditional
        # UPDATE (see _resume).
        row = conn.execute(
            self.dialect.for_latest(
                sa.select(*FLOW_STATE).where(F.c.tracking_id == flow.tracking_id)
            )
        ).one()
        _refuse_other_flow(flow, row)
        if parent_node_id is not None:
            row = self._adopt(conn, row, parent_node_id)
        result = self._trigger_existing(conn, flow, row)
        if result.resumed:
            self.dialect.notify(conn, row.queue)
        return result

    def _enqueue_many(self, conn: Connection, flows: Sequence[NewFlow]) -> list[EnqueueResult]:
        """Enqueue ``flows`` in this transaction: every rule of _enqueue, set-based.

        Runs are written in tracking_id order, so two batches that share ids
        take their locks in the same order and do not deadlock each other. A
        tracking_id that belongs to another flow, to a COMPLETED run, or to a
        FAILED run that was compensated (_refuse_undone), is refused before
        anything is written.
        """
        ordered = sorted(flows, key=lambda flow: flow.tracking_id)
        existing = self._read_runs(conn, [flow.tracking_id for flow in ordered])
        for flow in ordered:  # refused before the first write, the caller's transaction clean
            if flow.tracking_id in existing:
                _refuse_other_flow(flow, existing[flow.tracking_id])
                _refuse_completed(flow, existing[flow.tracking_id])
                if existing[flow.tracking_id].status == FlowStatus.FAILED:
                    self._refuse_undone(conn, existing[flow.tracking_id])
        absent = [flow for flow in ordered if flow.tracking_id not in existing]
        created = self._insert_new_runs(conn, absent)
        raced = [flow.tracking_id for flow in absent if flow.tracking_id not in created]
        existing.update(self._read_runs(conn, raced))  # inserted by others since our read
        results: dict[str, EnqueueResult] = {}
        for flow in ordered:
            new_id = created.get(flow.tracking_id)
            if new_id is not None:
                results[flow.tracking_id] = EnqueueResult(
                    new_id, flow.tracking_id, FlowStatus.PENDING, True, False
                )
            else:
                row = existing[flow.tracking_id]
                _refuse_other_flow(flow, row)  # again: a raced run was not checked above
                results[flow.tracking_id] = self._trigger_existing(conn, flow, row)
        # New runs woke their queues' workers already (_insert_new_runs).
        for queue in sorted({flow.queue for flow in ordered if results[flow.tracking_id].resumed}):
            self.dialect.notify(conn, queue)
        return [results[flow.tracking_id] for flow in flows]

    def _trigger_existing(self, conn: Connection, flow: NewFlow, row: Row[Any]) -> EnqueueResult:
        """The idempotent trigger of an existing run: a FAILED one resumes, a COMPLETED
        one refuses, any other answers with its status. The caller sends the NOTIFY."""
        status = FlowStatus(row.status)
        if status == FlowStatus.FAILED:
            self._refuse_undone(conn, row)
            if self._resume(conn, row):
                return EnqueueResult(row.id, flow.tracking_id, FlowStatus.RUNNING, False, True)
            # Another trigger resumed it after our read: answer with what it is now.
            status = self._status_now(conn, row)
        _refuse_completed(flow, row, status)
        return EnqueueResult(row.id, flow.tracking_id, status, False, False)

    def _adopt(self, conn: Connection, row: Row[Any], parent_node_id: int) -> Row[Any]:
        """Make an existing run the subflow of ``parent_node_id``; return the run as it is now.

        The run is locked and read again before anything is decided. The read in
        _enqueue takes no lock on PostgreSQL: a completion or cancel of this run
        may have committed since, having seen no parent to tell, and a second
        parent adopting it at the same moment must find this one's mark.
        """
        row = conn.execute(self.dialect.for_update(sa.select(F).where(F.c.id == row.id))).one()
        self._refuse_cycle(conn, row, parent_node_id)
        self._check_child(row, parent_node_id)
        if row.parent_node_id is None:  # adopt a run started on its own
            conn.execute(sa.update(F).where(F.c.id == row.id).values(parent_node_id=parent_node_id))
        return row

    def _refuse_cycle(self, conn: Connection, child: Row[Any], parent_node_id: int) -> None:
        """Refuse a child that is the parent's own run or one of its ancestors.

        Such a run would wait for itself forever. The walk up reads committed
        links; two adoptions that would close a cycle together each lock both
        of their runs, so one of them deadlocks, runs again, and sees the other.
        """
        chain = [child.tracking_id]
        seen: set[int] = set()
        node_id: int | None = parent_node_id
        while node_id is not None:
            run = conn.execute(
                sa.select(F.c.id, F.c.tracking_id, F.c.parent_node_id)
                .join(N, N.c.flow_id == F.c.id)
                .where(N.c.id == node_id)
            ).first()
            if run is None or run.id in seen:
                return
            chain.append(run.tracking_id)
            if run.id == child.id:
                raise SubflowCycle.for_chain(chain[::-1])
            seen.add(run.id)
            node_id = run.parent_node_id

    @staticmethod
    def _check_child(row: Row[Any], parent_node_id: int) -> None:
        """An existing run may become a subflow only of the node that started it."""
        if row.parent_node_id not in (None, parent_node_id):
            raise SubflowTaken.for_run(row.tracking_id)
        if row.status == FlowStatus.CANCELLED:
            raise FlowCancelled(f"the subflow run {row.tracking_id!r} was cancelled")

    def resume_flow(self, *, tracking_id: str) -> EnqueueResult:
        def work(conn: Connection) -> EnqueueResult:
            row = conn.execute(sa.select(F).where(F.c.tracking_id == tracking_id)).first()
            if row is None:
                raise FlowNotFound.for_tracking_id(tracking_id)
            _refuse_unreadable_status(row)
            if row.status != FlowStatus.FAILED:
                raise RunNotRetryable.for_run(tracking_id, row.status)
            self._refuse_undone(conn, row)
            if not self._resume(conn, row):
                self._refuse_lost_resume(conn, row)
            self.dialect.notify(conn, row.queue)
            return EnqueueResult(row.id, tracking_id, FlowStatus.RUNNING, False, True)

        return self._transact(work)

    def _refuse_undone(self, conn: Connection, flow_row: Row[Any]) -> None:
        """A FAILED run whose compensations ran is not resumed: its steps were undone
        (see compensation.py). Nor one with a subflow whose child run was compensated:
        its subflow step would resume that child, which refuses, so the retry would only
        fail again. Only a plan with compensations or subflows costs a read."""
        plan = sql_context.parse_plan(flow_row.plan, flow_row.tracking_id)
        if plan.compensates:
            compensated = conn.execute(
                sa.select(N.c.id)
                .where(N.c.flow_id == flow_row.id, *_nodes_of_kind(compensations=True))
                .limit(1)
            ).first()
            if compensated is not None:
                raise RunNotRetryable.compensated(flow_row.tracking_id)
        if any(planned.subflow for stage in plan.stages for planned in stage):
            child = self._compensated_child(conn, flow_row.id)
            if child is not None:
                step_name, child_id = child
                raise RunNotRetryable.child_compensated(flow_row.tracking_id, step_name, child_id)

    @staticmethod
    def _compensated_child(conn: Connection, flow_id: int) -> tuple[str, str] | None:
        """(subflow step, child tracking_id) of a FAILED child run of the run ``flow_id``
        whose compensations ran; None if there is none."""
        undo = N.alias("undo")
        step = N.alias("subflow_step")
        row = conn.execute(
            sa.select(F.c.tracking_id, step.c.step_name)
            .join(step, F.c.parent_node_id == step.c.id)
            .where(
                step.c.flow_id == flow_id,
                F.c.status == FlowStatus.FAILED,
                sa.exists().where(
                    undo.c.flow_id == F.c.id,
                    undo.c.step_name.startswith(compensation.COMPENSATE_PREFIX, autoescape=True),
                ),
            )
            .order_by(F.c.id)
            .limit(1)
        ).first()
        return None if row is None else (row.step_name, row.tracking_id)

    def _refuse_lost_resume(self, conn: Connection, flow_row: Row[Any]) -> None:
        """The run was FAILED when read, but another retry changed it first: say what it is now."""
        now = self._status_now(conn, flow_row)
        if now in (FlowStatus.PENDING, FlowStatus.RUNNING):
            raise RunNotRetryable.being_retried(flow_row.tracking_id)
        raise RunNotRetryable.for_run(flow_row.tracking_id, now)

    def _status_now(self, conn: Connection, flow_row: Row[Any]) -> FlowStatus:
        """The run's status as last committed, read again after our resume lost the race.

        for_latest: in a REPEATABLE READ snapshot (a caller's connection= on
        MySQL) a plain read would give back the FAILED we already saw.
        """
        now = conn.execute(
            self.dialect.for_latest(sa.select(F.c.status).where(F.c.id == flow_row.id))
        ).scalar()
        if now is None:
            raise FlowNotFound(f"no flow run has tracking_id {flow_row.tracking_id!r} (pruned)")
        return FlowStatus(now)

    def _resume(self, conn: Connection, flow_row: Row[Any]) -> bool:
        """Re-queue the failed node(s) and the ones the failure stopped, with fresh attempts.

        The conditional UPDATE locks the flow row and lets one of several racing
        triggers win. Which nodes, and their new allowance: progress.RESUMED_ON_RETRY
        and progress.max_attempts_on_retry (allowance_on_retry).
        """
        won = conn.execute(
            sa.update(F)
            .where(F.c.id == flow_row.id, F.c.status == FlowStatus.FAILED)
            .values(status=FlowStatus.RUNNING, error=None, finished_at=None, updated_at=self._now())
        ).rowcount
        if not won:
            return False
        plan = sql_context.parse_plan(flow_row.plan, flow_row.tracking_id)
        failed = conn.execute(
            sa.select(*columns_but(N, "output")).where(
                N.c.flow_id == flow_row.id,
                N.c.status.in_(progress.RESUMED_ON_RETRY),
            )
        ).all()
        failed = self._without_items_of_maps_done(conn, flow_row.id, failed)
        # Their rows are about to describe new attempts: keep the ones they describe now.
        sql_attempts.keep_latest(conn, self.dialect, [node_record(row, {}) for row in failed])
        waiting_again = self._maps_waiting_again(conn, flow_row.id, plan, failed)
        # One UPDATE per allowance, not per node: a map's thousands of items share one.
        by_allowance: dict[int, list[int]] = {}
        for node in (n for n in failed if n.id not in waiting_again):
            allowance = progress.allowance_on_retry(planned_of(plan, node.step_name))
            by_allowance.setdefault(allowance, []).append(node.id)
        for allowance, node_ids in sorted(by_allowance.items()):
            for ids in fanout.chunks(node_ids, fanout.IDS_PER_STATEMENT):
                self._requeue(conn, ids, allowance)
        self._hold_resumed_items(conn, flow_row.id, plan, failed)
        self._retry_place(conn, flow_row.id, flow_row.flow_name, flow_row.concurrency_key)
        return True

    def _requeue(self, conn: Connection, node_ids: Sequence[int], allowance: int) -> None:
        """Make resumed nodes PENDING with ``allowance`` attempts on top of theirs."""
        conn.execute(
            sa.update(N)
            .where(N.c.id.in_(node_ids))
            .values(
                status=NodeStatus.PENDING,
                # progress.max_attempts_on_retry, for each row in the database
                max_attempts=N.c.attempt + allowance,
                # A retry gives the step its max_rescues afresh, as its retries.
                rescues=0,
                run_after=self._now(),
                lease_expires_at=None,
                finished_at=None,
                # A sleep or wait resumed starts its wait afresh (see parking.py).
                wake_at=None,
            )
        )

    def _start_stage(
        self,
        conn: Connection,
        flow_row: Row[Any],
        position: int,
        steps: Sequence[PlannedStep],
    ) -> None:
        """Insert the nodes of a later stage (enqueue writes the first one itself);
        their ctx.data is rebuilt when they are claimed."""
        now = self._now()
        conn.execute(
            self.dialect.insert_if_absent(N).values(run_after=now, created_at=now),
            stage_rows(flow_row.id, flow_row.queue, flow_row.priority, position, steps),
        )
        if len(steps) > 1:
            # A fan-out: wake idle workers so the siblings really run in parallel.
            self.dialect.notify(conn, flow_row.queue)

    def _start_chained(
        self,
        conn: Connection,
        flow_row: Row[Any],
        position: int,
        step: PlannedStep,
        chain: Chain,
    ) -> ChainedNode | None:
        """Insert a sequential stage's node already RUNNING, leased to the chaining worker.

        It is its first attempt, exactly as a claim would have made it, and it
        never enters the runnable index. None (and nothing inserted) if the
        node exists already.
        """
        result = conn.execute(
            self._chained_statement,
            dict(
                flow_id=flow_row.id,
                step_name=step.name,
                position=position,
                queue=flow_row.queue,
                priority=flow_row.priority,
                max_attempts=step.max_attempts,
                lease_owner=chain.worker_id,
                b_lease_seconds=chain.lease_seconds,
            ),
        )
        key = result.inserted_primary_key
        if not self.dialect.inserted_a_row(result) or key is None:
            return None
        lease = Lease(key[0], flow_row.id, chain.worker_id, 1)
        return ChainedNode(lease, step.name, step.max_attempts)

    @functools.cached_property
    def _chained_statement(self) -> Any:
        """The insert of a chained node (see _start_chained), built once."""
        now = self._now()
        return self.dialect.insert_if_absent(N).values(
            group_index=0,
            status=NodeStatus.RUNNING,
            attempt=1,
            rescues=0,
            lease_expires_at=now + sa.bindparam("b_lease_seconds", type_=sa.Double()),
            run_after=now,
            started_at=now,
            created_at=now,
        )

    # -- claim ----------------------------------------------------------------

    def claim_nodes(
        self, *, worker_id: str, limit: int, lease_seconds: float, queues: Sequence[str]
    ) -> list[ClaimedNode]:
        """Claim in the fewest statements; through the queues' caps only while one is set.

        See sql/claim.py. The queue lists found capped are remembered, so their
        claims go straight to the capped path until a claim there finds no cap.
        """
        if limit <= 0:
            return []
        params = dict(
            worker_id=worker_id,
            limit=limit,
            lease_seconds=float(lease_seconds),
            queues=list(queues),
            only_queue=queues[0],
        )
        key = tuple(queues)
        if key not in self._capped_queues:
            found = self._claim_uncapped(params)
            if found is not None:
                return self._with_context(worker_id, *found)
            self._capped_queues.add(key)
        rows, payloads, capped = self._transact(lambda conn: self._claim_capped(conn, params))
        if not capped:
            self._capped_queues.discard(key)
        return self._with_context(worker_id, rows, payloads)

    def _claim_uncapped(self, params: dict[str, Any]) -> _Claimed | None:
        """The claim when no queue of the worker is capped; None if one is."""
        if self.dialect.claims_in_one_statement:
            return self._transact(lambda conn: self._claim_in_one(conn, params))
        if self.dialect.claim_reads_first:
            # A plain BEGIN reads without the write lock: an empty poll takes none,
            # and another process writing does not make it wait.
            due = self._read(lambda conn: conn.execute(self._claims.sqlite_precheck, params).one())
            if due.capped:
                return None
            if not due.runnable:
                return [], {}
        return self._transact(lambda conn: self._claim_in_steps(conn, params))

    def _claim_in_one(self, conn: Connection, params: dict[str, Any]) -> _Claimed | None:
        """PostgreSQL: pick, lease and start runs in one statement (claim.CLAIM_PG_*)."""
        several = len(params["queues"]) > 1
        claim = sql_claim.CLAIM_PG_QUEUES if several else sql_claim.CLAIM_PG_ONE_QUEUE
        result = claim.execute(conn, params, prepare=self.prepares).all()
        if result[0].capped:
            return None
        rows = [r for r in result if r.id is not None]
        return rows, sql_context.read_for_claimed(conn, rows)

    def _claim_in_steps(self, conn: Connection, params: dict[str, Any]) -> _Claimed | None:
        """MySQL/MariaDB and SQLite: lock the runnable ids, then lease them."""
        ids = [r.id for r in conn.execute(self._claims.runnable, params)]
        if not ids:
            # Nothing runnable, or the guard kept a capped queue out: which?
            return None if conn.execute(self._claims.capped, params).scalar() else ([], {})
        return self._lease(conn, ids, params)

    def _claim_capped(
        self, conn: Connection, params: dict[str, Any]
    ) -> tuple[Sequence[Any], dict[int, RunPayloads], bool]:
        """The claim through the queues' caps; also whether any cap is still set."""
        ids, capped = self._runnable_ids(conn, params["limit"], params["queues"])
        rows, payloads = self._lease(conn, ids, params) if ids else ([], {})
        return rows, payloads, capped

    def _lease(self, conn: Connection, ids: list[int], params: dict[str, Any]) -> _Claimed:
        """Lease the locked nodes ``ids``, start their runs, read what they start with.

        MySQL has no UPDATE ... RETURNING and cannot update a table it selects
        from in a subquery: the ids were selected (and locked) first.
        """
        claims = self._claims
        # Only its own parameters: any other named after a column would be SET too.
        lease = {"worker_id": params["worker_id"], "lease_seconds": params["lease_seconds"]}
        conn.execute(claims.lease, {**lease, "ids": ids})
        rows = conn.execute(claims.claimed, {"ids": ids}).all()
        # Only a run's first claim moves it from PENDING to RUNNING.
        starting = sorted({r.flow_id for r in rows if r.flow_status == FlowStatus.PENDING})
        if starting:
            conn.execute(claims.start_runs, {"ids": starting})
        # Read here, parsed after the commit (_with_context): no lock is held
        # while a large payload parses.
        return rows, sql_context.read_for_claimed(conn, rows)

    @functools.cached_property
    def _claims(self) -> sql_claim.ClaimStatements:
        return sql_claim.statements(self.dialect)

    @functools.cached_property
    def _capped_queues(self) -> set[tuple[str, ...]]:
        """Queue lists last seen with a cap: their claims take the capped path first."""
        return set()

    def _with_context(
        self, worker_id: str, rows: Sequence[Any], payloads: dict[int, RunPayloads]
    ) -> list[ClaimedNode]:
        """The claimed nodes with their ctx.data; a node whose stored JSON is
        corrupt is failed, with its run, instead of being handed out."""
        claimed = []
        for r in rows:
            lease = Lease(r.id, r.flow_id, worker_id, r.attempt)
            try:
                data, trace_parent = payloads[r.flow_id].data_and_trace(r.position)
            except CorruptRow as exc:
                self._fail_corrupt(lease, r.tracking_id, r.step_name, exc)
                continue
            claimed.append(
                ClaimedNode(
                    lease,
                    r.flow_name,
                    r.tracking_id,
                    r.step_name,
                    r.max_attempts,
                    data,
                    trace_parent,
                )
            )
        return claimed

    def _fail_corrupt(self, lease: Lease, tracking_id: str, step: str, error: CorruptRow) -> None:
        """Fail a claimed node (and its run) whose ctx.data cannot be rebuilt.

        Rolling the claim back instead would hand out the same row first every
        time, and no worker of its queue would claim anything again.
        """
        log.error(
            "step.failed",
            tracking_id=tracking_id,
            step=step,
            attempt=lease.attempt,
            worker_id=lease.worker_id,
            error=str(error),
        )
        # If the database is away, the lease expires and the next claim fails it.
        with contextlib.suppress(DatabaseUnavailable):
            self.fail_node(lease=lease, error=str(error), retry_delay=None)

    def _runnable_ids(
        self, conn: Connection, limit: int, queues: Sequence[str]
    ) -> tuple[list[int], bool]:
        """Lock up to ``limit`` runnable nodes, within the queues' concurrency caps.

        A capped queue's fs_queues row is locked (FOR UPDATE, not SKIP LOCKED)
        while its RUNNING nodes are counted, so claimers of that queue take
        turns and cannot together exceed the cap. Candidates of capped and
        uncapped queues are merged in priority order; the few locked but not
        taken are free again when this short transaction commits. Also says
        whether any of the queues is capped.
        """
        capped = self.dialect.for_update(
            sa.select(Q.c.name, Q.c.max_running).where(
                Q.c.name.in_(list(queues)), Q.c.max_running.is_not(None)
            )
        )
        caps: dict[str, int] = {name: cap for name, cap in conn.execute(capped)}
        uncapped = [q for q in queues if q not in caps]
        candidates = self._lock_runnable(conn, limit, uncapped) if uncapped else []
        for queue, cap in caps.items():
            running = conn.execute(
                sa.select(sa.func.count()).where(
                    N.c.queue == queue, N.c.status == sql_claim.RUNNING
                )
            ).scalar_one()
            if cap - running > 0:
                candidates += self._lock_runnable(conn, min(limit, cap - running), [queue])
        if caps:
            candidates.sort(key=lambda r: (r.priority, r.run_after, r.id))
        return [r.id for r in candidates[:limit]], bool(caps)

    def _lock_runnable(self, conn: Connection, limit: int, queues: Sequence[str]) -> list[Row[Any]]:
        runnable = (
            sa.select(N.c.id, N.c.priority, N.c.run_after)
            .where(
                N.c.status == sql_claim.PENDING,
                N.c.run_after <= self._now(),
                N.c.queue.in_(list(queues)),
            )
            .order_by(N.c.priority, N.c.run_after, N.c.id)
            .limit(limit)
        )
        return list(conn.execute(self.dialect.for_claim(runnable)).all())

    # -- outcomes of an attempt -----------------------------------------------

    def _fenced(self, lease: Lease) -> sa.Update:
        return sa.update(N).where(*_held(lease))

    def complete_node(self, *, lease: Lease, output: Any) -> bool:
        finished = Finished(lease, NodeStatus.COMPLETED, dumps(output))
        return self.complete_batch(finished=[finished])[0].won

    def skip_node(self, *, lease: Lease) -> bool:
        return self.complete_batch(finished=[Finished(lease, NodeStatus.SKIPPED, None)])[0].won

    def complete_batch(
        self, *, finished: Sequence[Finished], chain: Chain | None = None
    ) -> list[Written]:
        """Write every outcome in one transaction: one commit for the whole batch.

        The runs are locked in id order, so two workers' batches over the same
        runs queue up instead of deadlocking. A value that cannot be read (a
        corrupt plan) rolls the whole batch back: a batch of one then fails
        that node and its run (see _advancing); a caller with a larger batch
        writes its items one by one to find it.
        """
        order = sorted(range(len(finished)), key=lambda i: finished[i].lease.flow_id)
        runs = Counter(item.lease.flow_id for item in finished)

        def work(conn: Connection) -> list[Written]:
            # With every run's plan known, FINISH_PG locks the runs itself (one
            # round trip less); else they are locked first, to decide with their rows.
            folded = self._moves_from_known_plans(finished, runs)
            locked = {} if folded is not None else self._lock_flows(conn, sorted(runs))
            written: dict[int, Written] = {}
            together, in_one = FinishBatch(), []
            for i in order:
                item = finished[i]
                flow_id = item.lease.flow_id
                flow_row = locked.get(flow_id)
                move = (
                    folded[i]
                    if folded is not None
                    else self._move_in_one(item, flow_row, runs[flow_id])
                )
                if move is not None:
                    together.add(item, move)
                    in_one.append(i)
                    continue
                if runs[flow_id] > 1 and flow_row is not None:
                    # Siblings of one run in one batch: read the run again (it is
                    # locked already), as the one before may have moved it on.
                    flow_row = self._lock_flow(conn, F.c.id == flow_id)
                written[i] = self._finish(conn, item, flow_row, chain)
            if in_one:
                answers = self._finish_in_one(conn, together, chain)
                for i, answer in zip(in_one, answers, strict=True):
                    # None: deferred, its run (locked now) was not as the move assumed.
                    written[i] = answer or self._finish_alone(conn, finished[i], chain)
            return [written[i] for i in range(len(finished))]

        if len(finished) == 1:
            return self._advancing(finished[0].lease, work)
        return self._transact(work)

    def _lock_flows(self, conn: Connection, flow_ids: Sequence[int]) -> dict[int, Row[Any]]:
        """The runs' rows, locked in id order (as every batch locks them) until commit."""
        if self.dialect.binds_arrays:
            values = {"flow_ids": list(flow_ids)}
            locked = LOCK_RUNS_PG.execute(conn, values, prepare=self.prepares).all()
            return {row.id: row for row in locked}
        rows = conn.execute(
            self.dialect.for_update(
                sa.select(*FLOW_STATE).where(F.c.id.in_(flow_ids)).order_by(F.c.id)
            )
        ).all()
        return {row.id: row for row in rows}

    def _move_in_one(
        self, item: Finished, flow_row: Row[Any] | None, nodes_of_run: int
    ) -> Move | None:
        """What the item's run does next, if FINISH_PG can apply it; None for the general path.

        The same decision as _advance's, for the common case only: a step alone
        in its stage, whose run moves to a step alone in the next stage, or
        completes (without a parent to wake), or is over already.
        """
        if flow_row is None or nodes_of_run > 1 or item.replay or item.step_name is None:
            return None
        if flow_row.status == FlowStatus.COMPENSATING:
            return None  # its next compensation is decided by _advance
        if progress.is_over(flow_row.status):
            return Move()  # the outcome is recorded; the run goes no further
        plan = sql_context.parse_plan(flow_row.plan, flow_row.tracking_id)
        self._remember_plan(flow_row.id, plan)
        move = _planned_move(plan, item.step_name, item.status)
        if move is not None and move.finishes and flow_row.parent_node_id is not None:
            return None  # a subflow's last step: its parent wakes (the general path)
        if move is not None and move.finishes and flow_row.concurrency_key is not None:
            return None  # its place goes to the next run of its key (the general path)
        return move

    def _moves_from_known_plans(
        self, finished: Sequence[Finished], runs: Counter[int]
    ) -> list[Move] | None:
        """PostgreSQL: each item's move from its run's plan, remembered from an
        earlier batch, if every item has one; None if any has not.

        Nothing of the run's row is read: FINISH_PG locks each run, and writes an
        item only if its run is as these moves assume (RUNNING, and without a
        parent when it completes) or over (the outcome recorded, nothing more,
        as _move_in_one does); it defers any other to the general path.
        """
        if self.dialect.batch_write is not BatchWrite.ARRAYS:
            return None  # only that write checks each run itself
        moves = []
        for item in finished:
            plan = self._known_plans.get(item.lease.flow_id)
            if plan is None or runs[item.lease.flow_id] > 1 or item.replay or not item.step_name:
                return None
            move = _planned_move(plan, item.step_name, item.status)
            if move is None:
                return None
            moves.append(move)
        return moves

    def _remember_plan(self, flow_id: int, plan: Plan) -> None:
        """A run's plan never changes once enqueued; its id is never reused."""
        if self.dialect.batch_write is not BatchWrite.ARRAYS:
            return  # no use: _moves_from_known_plans asks for none
        if len(self._known_plans) >= _KNOWN_PLANS:
            self._known_plans.clear()  # runs long finished make most of it
        self._known_plans[flow_id] = plan

    @functools.cached_property
    def _known_plans(self) -> dict[int, Plan]:
        """Plans of runs this storage moved on lately, by run id (PostgreSQL)."""
        return {}

    def _finish_alone(self, conn: Connection, item: Finished, chain: Chain | None) -> Written:
        """The general path for an item FINISH_PG deferred; its run is locked already."""
        return self._finish(conn, item, self._lock_flow(conn, F.c.id == item.lease.flow_id), chain)

    def _finish_in_one(
        self, conn: Connection, together: FinishBatch, chain: Chain | None
    ) -> list[Written | None]:
        """Apply the moves of ``together`` set-based (sql/finish.py); the answers in its
        order, None for an item deferred to the general path."""
        applied = together.apply(conn, self.dialect.batch_write, chain, prepare=self.prepares)
        won = applied.won
        answers: list[Written | None] = []
        for node_id, flow_id, finishes in zip(
            together.node_id, together.flow_id, together.finishes, strict=True
        ):
            if node_id in applied.deferred:
                answers.append(None)
                continue
            if finishes:
                self._known_plans.pop(flow_id, None)
            if node_id not in won:
                answers.append(Written(False))
                continue
            begun = won[node_id]
            if chain is None or begun is None:
                answers.append(Written(True))
                continue
            lease = Lease(begun.id, flow_id, chain.worker_id, 1)
            answers.append(Written(True, ChainedNode(lease, begun.step_name, begun.max_attempts)))
        return answers

    def _finish(
        self, conn: Connection, item: Finished, flow_row: Row[Any] | None, chain: Chain | None
    ) -> Written:
        """Write one outcome into the batch's transaction; its run is locked already."""
        lease = item.lease
        if flow_row is None:
            return Written(False)  # the run was pruned while this step ran
        done = conn.execute(
            self._finish_statement,
            dict(
                b_node=lease.node_id,
                b_owner=lease.worker_id,
                b_attempt=lease.attempt,
                b_status=item.status,
                b_output=item.output,
            ),
        ).rowcount
        if not done:
            return self._replayed(conn, item) if item.replay else Written(False)
        finished = None if item.step_name is None else (item.step_name, item.status)
        return Written(True, self._advance(conn, flow_row, lease.node_id, chain, finished))

    @functools.cached_property
    def _finish_statement(self) -> sa.Update:
        """The fenced write of a finished attempt, built once: building a statement
        cost more than sending it, on the path every step takes."""
        return (
            sa.update(N)
            .where(
                N.c.id == sa.bindparam("b_node"),
                N.c.status == NodeStatus.RUNNING,
                N.c.lease_owner == sa.bindparam("b_owner"),
                N.c.attempt == sa.bindparam("b_attempt"),
            )
            .values(
                status=sa.bindparam("b_status"),
                output=sa.bindparam("b_output"),
                finished_at=self._now(),
                lease_expires_at=None,
            )
        )

    def _replayed(self, conn: Connection, item: Finished) -> Written:
        """A write sent again after its answer was lost: did the first send commit?

        If it did, the node carries this attempt's outcome (its lease_owner and
        attempt are kept when it finishes), and the run's next step, if one was
        chained, is RUNNING under the same worker: hand it back (even to a worker
        that has begun to stop and asks for no chain now: it releases it) rather
        than leave it stranded until its lease expires.
        """
        lease = item.lease
        node = conn.execute(
            sa.select(N.c.status, N.c.position).where(
                N.c.id == lease.node_id,
                N.c.lease_owner == lease.worker_id,
                N.c.attempt == lease.attempt,
            )
        ).first()
        if node is None or node.status != item.status:
            return Written(False)
        following = conn.execute(
            sa.select(N.c.id, N.c.step_name, N.c.max_attempts).where(
                N.c.flow_id == lease.flow_id,
                N.c.position == node.position + 1,
                N.c.status == NodeStatus.RUNNING,
                N.c.lease_owner == lease.worker_id,
                N.c.attempt == 1,
            )
        ).all()
        if len(following) != 1:
            return Written(True)
        [next_node] = following
        next_lease = Lease(next_node.id, lease.flow_id, lease.worker_id, 1)
        return Written(True, ChainedNode(next_lease, next_node.step_name, next_node.max_attempts))

    def _advancing(self, lease: Lease, work: Callable[[Connection], T]) -> T:
        """Run ``work``, a write of an attempt's outcome that moves the run on.

        Moving on parses stored JSON (the plan, a finished subflow's payloads).
        A value that does not parse would roll the write back every time and
        the node would go round its lease forever; instead the node and its run
        are FAILED with the error, and CorruptRow is raised for the caller to
        report.
        """
        try:
            return self._transact(work)
        except CorruptRow as exc:
            self.fail_node(lease=lease, error=str(exc), retry_delay=None)
            raise

    def fail_node(
        self, *, lease: Lease, error: str, retry_delay: float | None, compensate: bool = True
    ) -> NodeStatus | None:
        # A step's error may quote anything (a NUL, a lone surrogate): an error
        # that cannot be stored would leave the node to its lease and be lost.
        error = payload.storable_text(error)

        def work(conn: Connection) -> NodeStatus | None:
            flow_row = self._lock_flow(conn, F.c.id == lease.flow_id)
            if flow_row is None:
                return None  # the run was pruned while this step ran
            # The run is locked, so the node's allowance cannot change before the write.
            node = conn.execute(
                sa.select(N.c.max_attempts, N.c.started_at, N.c.step_name).where(*_held(lease))
            ).first()
            if node is None:
                return None  # the lease was lost
            fate = progress.after_failure(
                compensation.as_seen_by(flow_row.status, node.step_name),
                error=error,
                attempt=lease.attempt,
                max_attempts=node.max_attempts,
                retry_delay=retry_delay,
                compensates=compensate,
            )
            ended = _ended_attempt(lease, node.started_at)
            return self._carry_out_item(
                conn, self._fenced(lease), flow_row, fate, ended, node.step_name
            )

        return self._transact(work)

    def _carry_out_item(
        self,
        conn: Connection,
        update: sa.Update,
        flow_row: Row[Any],
        fate: progress.Fate,
        ended: sql_attempts.EndedAttempt,
        step_name: str,
    ) -> NodeStatus | None:
        """_carry_out, but for an item of a map with allow_failures a fate that would
        fail the run ends the item FAILED alone, and the map goes on (see fanout.py)."""
        allowed = self._allowed_failure(flow_row, step_name, fate)
        status = self._carry_out(conn, update, flow_row, allowed or fate, ended)
        if allowed is not None and status is not None:
            self._advance(conn, flow_row, ended.node_id, None, (step_name, status))
        return status

    def _allowed_failure(
        self, flow_row: Row[Any], step_name: str, fate: progress.Fate
    ) -> progress.End | None:
        """If ``fate`` fails the run and is that of an item of a map with allow_failures,
        the item's own end instead: FAILED, the run going on (see fanout.py); else None."""
        if not isinstance(fate, progress.End) or fate.run_error is None:
            return None
        if fanout.parse_item_name(step_name) is None:  # no plan parsed for a plain step
            return None
        try:
            plan = sql_context.parse_plan(flow_row.plan, flow_row.tracking_id)
        except CorruptRow:
            return None  # the run fails, as it must (a bad row stops only its run)
        found = map_of_item(plan, step_name)
        if found is None or not found[0].allow_failures:
            return None
        return progress.End(progress.Ending.FAILED, fate.error)

    def start_map(self, *, lease: Lease, items: Sequence[str]) -> NodeStatus | None:
        def work(conn: Connection) -> NodeStatus | None:
            flow_row = self._lock_flow(conn, F.c.id == lease.flow_id)
            if flow_row is None:
                return None  # the run was pruned while this step ran
            ended = progress.end_of_over_run(flow_row.status)
            if ended is not None:  # the run is over: no item now
                return self._carry_out(conn, self._fenced(lease), flow_row, ended, None)
            node = conn.execute(sa.select(N.c.step_name, N.c.position).where(*_held(lease))).first()
            if node is None:
                return None  # the lease was lost
            if not items:
                empty = Finished(lease, NodeStatus.COMPLETED, "[]", step_name=node.step_name)
                return (
                    NodeStatus.COMPLETED if self._finish(conn, empty, flow_row, None).won else None
                )
            planned = sql_context.parse_plan(flow_row.plan, flow_row.tracking_id).step(
                node.step_name
            )
            if planned is None:
                raise CorruptRow(f"map step {node.step_name!r} is not in the plan of its run")
            conn.execute(
                self._fenced(lease).values(status=NodeStatus.WAITING, lease_expires_at=None)
            )
            self._insert_items(conn, flow_row, node.position, planned, items)
            self.dialect.notify(conn, flow_row.queue)
            return NodeStatus.WAITING

        return self._advancing(lease, work)

    def start_subflow(self, *, lease: Lease, child: NewFlow) -> NodeStatus | None:
        def work(conn: Connection) -> NodeStatus | None:
            flow_row = self._lock_flow(conn, F.c.id == lease.flow_id)
            if flow_row is None:
                return None  # the run was pruned while this step ran
            ended = progress.end_of_over_run(compensation.as_seen_by_a_step(flow_row.status))
            if ended is not None:  # the run is over: no child now
                return self._carry_out(conn, self._fenced(lease), flow_row, ended, None)
            parked = conn.execute(
                self._fenced(lease).values(status=NodeStatus.WAITING, lease_expires_at=None)
            ).rowcount
            if not parked:
                return None
            try:
                self._enqueue(conn, child, parent_node_id=lease.node_id)
            except FlowAlreadyCompleted:
                done = sql_context.read_run(conn, F.c.tracking_id == child.tracking_id)
                if done is None:
                    raise FlowNotFound(
                        f"the completed subflow run {child.tracking_id!r} was pruned meanwhile"
                    ) from None
                self._child_completed(conn, lease.node_id, done.final_data())
                return NodeStatus.COMPLETED
            return NodeStatus.WAITING

        return self._advancing(lease, work)

    def park_node(
        self,
        *,
        lease: Lease,
        event: str | None,
        seconds: float | None,
        until: float | None,
    ) -> Woken | Parked | None:
        def work(conn: Connection) -> Woken | Parked | None:
            # The run's lock orders this with send_event: an event is either
            # seen here, or sent after the node is parked and wakes it.
            flow_row = self._lock_flow(conn, F.c.id == lease.flow_id)
            if flow_row is None:
                return None  # the run was pruned while this step ran
            node = conn.execute(
                sa.select(
                    N.c.wake_at, N.c.started_at, N.c.step_name, self._now().label("now")
                ).where(*_held(lease))
            ).first()
            if node is None:
                return None  # the lease was lost
            stored = None if event is None else self._event_payload(conn, lease.flow_id, event)
            decision = parking.decide(
                now=node.now,
                wake_at=node.wake_at,
                first_deadline=parking.deadline(node.now, seconds, until),
                event_came=stored is not None,
            )
            if isinstance(decision, parking.Wake):
                return Woken(decision.by_event, stored)
            run = compensation.as_seen_by(flow_row.status, node.step_name)
            fate = parking.park(run, now=node.now, until=decision.until)
            parked = self._fenced(lease).values(wake_at=decision.until)
            ended = _ended_attempt(lease, node.started_at)
            status = self._carry_out(conn, parked, flow_row, fate, ended)
            return None if status is None else Parked(decision.until, status)

        return self._transact(work)

    def take_rate_token(
        self, *, lease: Lease, flow_name: str, step_name: str, rate: rate_limits.RateLimit
    ) -> bool | Parked | None:
        def work(conn: Connection) -> bool | Parked | None:
            # The run's lock first, as park_node: a cancel cannot slip between the
            # decision and the node's write. Buckets are locked after it, always.
            flow_row = self._lock_flow(conn, F.c.id == lease.flow_id)
            if flow_row is None:
                return None  # the run was pruned while this step was claimed
            node = conn.execute(sa.select(N.c.wake_at).where(*_held(lease))).first()
            if node is None:
                return None  # the lease was lost: no token is spent on it
            # A step of a COMPENSATING run is one of a failed run (as in park_node):
            # a run that is over starts nothing, so it spends no token either.
            run = compensation.as_seen_by(flow_row.status, step_name)
            over = progress.end_of_over_run(run)
            if over is not None:
                status = self._carry_out(conn, self._fenced(lease), flow_row, over, None)
                return None if status is None else Parked(node.wake_at or 0.0, status)
            bucket = sql_rate_limits.lock_bucket(conn, self.dialect, flow_name, step_name)
            # Read once the bucket is ours: a clock read before the lock wait would
            # be as late as that wait, and let starts in that much too early.
            now, fate_now = conn.execute(sa.select(self.dialect.clock(), self._now())).one()
            waited = node.wake_at is not None  # it was given a turn: it queues no more
            decision = rate_limits.decide(rate, bucket, now=now, waited=waited)
            sql_rate_limits.save_bucket(conn, flow_name, step_name, decision.bucket)
            if isinstance(decision, rate_limits.Take):
                if waited:  # it waits no more
                    conn.execute(self._fenced(lease).values(wake_at=None))
                return True
            # The write's run_after counts from the clock it is written with.
            fate = parking.park(run, now=fate_now, until=decision.until)
            # No attempt is left behind in fs_attempts: the step never started.
            waiting = self._fenced(lease).values(wake_at=decision.until)
            status = self._carry_out(conn, waiting, flow_row, fate, None)
            return None if status is None else Parked(decision.until, status)

        return self._transact(work)

    def _event_payload(self, conn: Connection, flow_id: int, name: str) -> str | None:
        """The payload (JSON text) of the event ``name`` sent to the run; None if none was."""
        E = schema.events
        found: str | None = conn.execute(
            self.dialect.for_latest(
                sa.select(E.c.payload).where(E.c.flow_id == flow_id, E.c.name == name)
            )
        ).scalar()
        return found

    # -- advancing and failing flows (inside the caller's transaction) --------

    def _advance(
        self,
        conn: Connection,
        flow_row: Row[Any],
        finished_node_id: int,
        chain: Chain | None = None,
        finished: tuple[str, NodeStatus] | None = None,
    ) -> ChainedNode | None:
        """Move the flow on now that a node of it finished (its row is locked).

        With ``chain``, a sequential step followed by a sequential step hands
        that step to the same worker (the chained node is returned). A parallel
        group is not chained: the worker finishing its last sibling does not
        hold the other siblings' outputs, and a group after a step should fan
        out to every idle worker.
        """
        if flow_row.status == FlowStatus.COMPENSATING:
            self._compensate(conn, flow_row)  # a compensation, or a late sibling, ended
            return None
        if progress.is_over(flow_row.status):
            return None  # the running step finished; a cancelled or failed flow goes no further
        plan = sql_context.parse_plan(flow_row.plan, flow_row.tracking_id)
        if finished is not None and (found := map_of_item(plan, finished[0])):
            map_node_id = self._item_ended(conn, flow_row, *found)
            if map_node_id is None:
                return None  # other items have not ended yet
            # The map moves its run on, never chained: the worker that ran the last
            # item holds neither the map's output nor the other items'.
            finished_node_id, chain, finished = (
                map_node_id,
                None,
                (found[0].name, NodeStatus.COMPLETED),
            )
        position = None if finished is None else _alone_in_stage(plan, finished[0])
        if finished is not None and position is not None:
            # The finished step is its stage: its own status is the stage's.
            stage = [progress.StageNode(*finished)]
        else:
            position, stage = self._stage_of(conn, flow_row.id, finished_node_id)
        decision = progress.after_stage(plan, position, stage)
        if isinstance(decision, progress.StartStage):
            if chain is not None and (step := progress.chained_step(stage, decision)):
                return self._start_chained(conn, flow_row, decision.position, step, chain)
            self._start_stage(conn, flow_row, decision.position, decision.steps)
        elif isinstance(decision, progress.FinishFlow):
            # fs_flows.output stays empty: it would be a second copy of every
            # output. get_flow rebuilds the final ctx.data from the nodes.
            conn.execute(
                sa.update(F)
                .where(F.c.id == flow_row.id)
                .values(
                    status=FlowStatus.COMPLETED,
                    error=None,
                    updated_at=self._now(),
                    finished_at=self._now(),
                )
            )
            self._end_place(conn, flow_row.id, flow_row.flow_name, flow_row.concurrency_key)
            if flow_row.parent_node_id is not None:
                # The parent step's output is the child's final ctx.data.
                child = sql_context.read_run(conn, F.c.id == flow_row.id)
                if child is not None:
                    self._child_completed(conn, flow_row.parent_node_id, child.final_data())
        return None

    def _stage_of(
        self, conn: Connection, flow_id: int, node_id: int
    ) -> tuple[int, list[progress.StageNode]]:
        """The position of the node's stage and the statuses of its nodes, in plan order."""
        same_stage = sa.select(N.c.position).where(N.c.id == node_id).scalar_subquery()
        # Statuses only: whether the stage is done needs no payload of it.
        rows = conn.execute(
            sa.select(N.c.step_name, N.c.status, N.c.position)
            .where(N.c.flow_id == flow_id, N.c.position == same_stage)
            .order_by(N.c.group_index)
        ).all()
        return rows[0].position, [
            progress.StageNode(r.step_name, NodeStatus(r.status)) for r in rows
        ]

    def _lock_parent_flow(self, conn: Connection, parent_node_id: int) -> Row[Any] | None:
        """The flow of a subflow's parent node, locked; None if it was pruned meanwhile."""
        parent_flow_id = sa.select(N.c.flow_id).where(N.c.id == parent_node_id).scalar_subquery()
        return conn.execute(
            self.dialect.for_update(sa.select(*FLOW_STATE).where(F.c.id == parent_flow_id))
        ).first()

    def _child_completed(self, conn: Connection, parent_node_id: int, data: Any) -> None:
        parent_flow = self._lock_parent_flow(conn, parent_node_id)
        if parent_flow is None:
            return
        done = conn.execute(
            sa.update(N)
            .where(N.c.id == parent_node_id, N.c.status == NodeStatus.WAITING)
            .values(status=NodeStatus.COMPLETED, output=dumps(data), finished_at=self._now())
        ).rowcount
        if done:
            self._advance(conn, parent_flow, parent_node_id)

    def _fail_flow(
        self, conn: Connection, flow_row: Row[Any], error: str, compensate: bool = True
    ) -> None:
        """Fail the run, stop its nodes waiting to run, and tell its parent step.

        ``compensate`` False (progress.End.compensates): the run ends FAILED at once,
        its compensations not run even if its plan has some, so a retry can resume it.

        A run that is already over keeps its status and its first error. Stopping
        the PENDING nodes here (queued siblings, scheduled retries) is what keeps
        a FAILED run from starting new attempts, without the claim reading runs.
        """
        if flow_row.status == FlowStatus.COMPENSATING:
            self._compensate(conn, flow_row)  # a compensation failed for good: on to the next
            return
        if progress.is_over(flow_row.status):
            return
        compensates = compensate and _compensates(flow_row)
        status = FlowStatus.COMPENSATING if compensates else FlowStatus.FAILED
        self._set_flow(conn, flow_row.id, status, error=error, finished=not compensates)
        if not compensates:  # a compensating run keeps its place until it ends
            self._end_place(conn, flow_row.id, flow_row.flow_name, flow_row.concurrency_key)
        stopped = sa.update(N).where(
            N.c.flow_id == flow_row.id, N.c.status.in_(progress.STOPPED_BY_RUN_FAILURE)
        )
        stopped_values = self._fate_values(progress.End(progress.Ending.STOPPED))
        conn.execute(stopped.values(**stopped_values))
        self._stop_waiting_maps(conn, flow_row, stopped_values)
        if compensates:
            self._compensate(conn, flow_row)
        elif flow_row.parent_node_id is not None:
            self._tell_parent_failed(conn, flow_row, error)

    def _tell_parent_failed(self, conn: Connection, flow_row: Row[Any], error: str) -> None:
        failure = progress.subflow_failed_error(flow_row.tracking_id, flow_row.flow_name, error)
        self._fail_parent(conn, flow_row.parent_node_id, failure)

    def _compensate(self, conn: Connection, flow_row: Row[Any]) -> None:
        """Carry out compensation.next_move for a COMPENSATING run (locked): start its
        next compensation, wait, or end it FAILED and tell its parent step."""
        plan = sql_context.parse_plan(flow_row.plan, flow_row.tracking_id)
        nodes = conn.execute(
            sa.select(N.c.step_name, N.c.status).where(N.c.flow_id == flow_row.id)
        ).all()
        move = compensation.next_move(
            plan, [compensation.NodeState(n.step_name, NodeStatus(n.status)) for n in nodes]
        )
        if isinstance(move, compensation.Start):
            undo = PlannedStep(move.name, move.max_attempts)
            self._start_stage(conn, flow_row, move.position, [undo])
            self.dialect.notify(conn, flow_row.queue)
        elif isinstance(move, compensation.Finish):
            # The run's error is the step's that failed it, written when it began compensating.
            error = conn.execute(sa.select(F.c.error).where(F.c.id == flow_row.id)).scalar()
            self._set_flow(conn, flow_row.id, FlowStatus.FAILED, error=error, finished=True)
            self._end_place(conn, flow_row.id, flow_row.flow_name, flow_row.concurrency_key)
            if flow_row.parent_node_id is not None:
                self._tell_parent_failed(conn, flow_row, error or "")

    def _fail_parent(self, conn: Connection, parent_node_id: int, parent_error: str) -> None:
        """The child of a WAITING subflow node failed or was cancelled: retry it, or fail it."""
        parent_flow = self._lock_parent_flow(conn, parent_node_id)
        if parent_flow is None:
            return
        waiting = (N.c.id == parent_node_id, N.c.status == NodeStatus.WAITING)
        node = conn.execute(
            sa.select(N.c.attempt, N.c.max_attempts, N.c.lease_owner, N.c.started_at).where(
                *waiting
            )
        ).first()
        if node is None:
            return  # the node is no longer waiting for this child
        fate = progress.after_subflow_failed(
            compensation.as_seen_by_a_step(parent_flow.status),
            error=parent_error,
            attempt=node.attempt,
            max_attempts=node.max_attempts,
        )
        ended = sql_attempts.EndedAttempt(
            parent_node_id, parent_flow.id, node.attempt, node.lease_owner, node.started_at
        )
        self._carry_out(conn, sa.update(N).where(*waiting), parent_flow, fate, ended)

    def _carry_out(
        self,
        conn: Connection,
        update: sa.Update,
        flow_row: Row[Any],
        fate: progress.Fate,
        ended: sql_attempts.EndedAttempt | None,
    ) -> NodeStatus | None:
        """Apply a node's decided fate with ``update``, the write fenced as the caller
        needs; fail its run if the fate says so. None if the fence matched nothing.

        A Retry leaves the attempt ``ended`` behind: it is kept in fs_attempts
        (``ended`` is None only where the fate cannot be a Retry).
        """
        if not conn.execute(update.values(**self._fate_values(fate))).rowcount:
            return None
        if isinstance(fate, progress.Retry) and ended is not None:
            sql_attempts.record(conn, self.dialect, ended, fate)
        if isinstance(fate, progress.End) and fate.run_error is not None:
            self._fail_flow(conn, flow_row, fate.run_error, compensate=fate.compensates)
        elif isinstance(fate, progress.End) and flow_row.status == FlowStatus.COMPENSATING:
            self._compensate(conn, flow_row)  # a step in flight when the run failed ended
        return fate.status

    def _fate_values(self, fate: progress.Fate) -> dict[str, Any]:
        """The column values that carry out a node's decided fate."""
        now = self._now()
        values: dict[str, Any]
        if isinstance(fate, progress.Retry):
            values = dict(
                status=NodeStatus.PENDING,
                run_after=now + fate.delay if fate.delay else now,
                lease_expires_at=None,
            )
            if fate.gives_back_attempt:
                values.update(max_attempts=N.c.max_attempts + 1)
        else:
            values = dict(status=fate.status, lease_expires_at=None, finished_at=now)
        if isinstance(fate, progress.End) and fate.ending == progress.Ending.STOPPED:
            # The attempt's error, or else the node's earlier one, is kept above the reason.
            earlier = (
                sa.func.coalesce(N.c.error + "\n", "") if fate.error is None else f"{fate.error}\n"
            )
            values.update(error=earlier + progress.STOPPED_BY_FAILURE)
        elif fate.error is not None:
            values.update(error=fate.error)
        return values

    def _set_flow(
        self,
        conn: Connection,
        flow_id: int,
        status: FlowStatus,
        *,
        error: str | None,
        finished: bool,
    ) -> None:
        conn.execute(
            sa.update(F)
            .where(F.c.id == flow_id)
            .values(
                status=status,
                error=error,
                updated_at=self._now(),
                finished_at=self._now() if finished else None,
            )
        )

    # -- cancelling ------------------------------------------------------------

    def cancel_flow(self, *, tracking_id: str) -> FlowRecord:
        def work(conn: Connection) -> FlowRecord:
            row = self._lock_flow(conn, F.c.tracking_id == tracking_id)
            if row is None:
                raise FlowNotFound.for_tracking_id(tracking_id)
            _refuse_unreadable_status(row)
            if row.status == FlowStatus.COMPENSATING:
                raise RunNotCancellable.compensating(tracking_id, self._awaited(conn, row.id))
            if not progress.cancellable(row.status):
                raise RunNotCancellable.for_run(tracking_id, row.status)
            self._cancel(conn, row.id)
            if row.parent_node_id is not None:
                # Its parent step cannot finish without it: retry that step (which
                # then fails, as the child stays cancelled) or fail its run.
                cancelled = progress.subflow_cancelled_error(tracking_id, row.flow_name)
                self._fail_parent(conn, row.parent_node_id, cancelled)
            return flow_record(conn.execute(sa.select(F).where(F.c.id == row.id)).one())

        return self._transact(work)

    @staticmethod
    def _awaited(conn: Connection, flow_id: int) -> list[tuple[str, str | None]]:
        """What a COMPENSATING run waits for before its next compensation: its steps
        still in flight, each with the tracking_id of the child a subflow step waits
        for (None for others). Empty if a compensation is in flight already."""
        child = F.alias("child")
        rows = conn.execute(
            sa.select(N.c.step_name, child.c.tracking_id)
            .outerjoin(child, child.c.parent_node_id == N.c.id)
            .where(
                N.c.flow_id == flow_id,
                N.c.status.in_([NodeStatus.PENDING, NodeStatus.RUNNING, NodeStatus.WAITING]),
            )
            .order_by(N.c.id)
        ).all()
        if any(compensation.is_compensation(r.step_name) for r in rows):
            return []
        return [(r.step_name, r.tracking_id) for r in rows]

    def _cancel(self, conn: Connection, flow_id: int) -> None:
        """Cancel a run, its pending nodes and, through its waiting nodes, its subflows."""
        waiting = list(
            conn.execute(
                sa.select(N.c.id).where(N.c.flow_id == flow_id, N.c.status == NodeStatus.WAITING)
            ).scalars()
        )
        ended = sa.update(N).where(N.c.flow_id == flow_id, N.c.status.in_(progress.ENDED_BY_CANCEL))
        conn.execute(ended.values(**self._fate_values(progress.End(progress.Ending.CANCELLED))))
        cancelled = conn.execute(
            sa.update(F)
            .where(F.c.id == flow_id, F.c.status.notin_(FINISHED_FLOW_STATUSES))
            .values(status=FlowStatus.CANCELLED, updated_at=self._now(), finished_at=self._now())
        ).rowcount
        if cancelled:
            self._end_place_of(conn, flow_id)
        if waiting:
            # A child undoing its steps is not stopped halfway (progress.cancellable):
            # it ends FAILED and finds its parent's node CANCELLED, which it leaves be.
            children = sa.select(F.c.id).where(
                F.c.parent_node_id.in_(waiting), F.c.status != FlowStatus.COMPENSATING
            )
            for child_id in conn.execute(children).scalars():
                self._cancel(conn, child_id)

    # -- leases ---------------------------------------------------------------

    def extend_leases(self, *, leases: Sequence[Lease], lease_seconds: float) -> int:
        if not leases:
            return 0
        return self._transact(
            lambda conn: (
                conn.execute(
                    sa.update(N)
                    .where(*_held_any(leases))
                    .values(lease_expires_at=self._now() + lease_seconds)
                ).rowcount
            )
        )

    def release_nodes(self, *, leases: Sequence[Lease]) -> int:
        if not leases:
            return 0
        node_ids = [lease.node_id for lease in leases]

        def work(conn: Connection) -> int:
            # Lock the runs first, as every other write does, so that no cancel
            # commits between reading their statuses and the updates below.
            flow_ids = sa.select(N.c.flow_id).where(N.c.id.in_(node_ids))
            runs = sa.select(F.c.id, F.c.status).where(F.c.id.in_(flow_ids)).order_by(F.c.id)
            # By fate, and which nodes of those runs it is for (see _release_groups).
            fates: dict[tuple[progress.Fate, bool | None], list[int]] = {}
            compensating = []
            for run in conn.execute(self.dialect.for_update(runs)).all():
                for fate_of_nodes in _release_groups(run.status):
                    fates.setdefault(fate_of_nodes, []).append(run.id)
                if run.status == FlowStatus.COMPENSATING:
                    compensating.append(run.id)
            mine = _held_any(leases)
            released = 0
            for (fate, compensations), of_runs in fates.items():
                fence = (*mine, N.c.flow_id.in_(of_runs), *_nodes_of_kind(compensations))
                values = self._fate_values(fate)
                if isinstance(fate, progress.Retry):
                    sql_attempts.record_matching(conn, self.dialect, fence, fate)
                    values.update(lease_owner=None)  # handed back: no one holds it now
                released += conn.execute(sa.update(N).where(*fence).values(**values)).rowcount
            for flow_id in compensating:  # a step in flight when the run failed may have ended
                flow_row = self._lock_flow(conn, F.c.id == flow_id)
                if flow_row is not None:
                    self._compensate(conn, flow_row)
            return released

        return self._transact(work)

    def rescue_expired(self, *, limit: int = 100) -> list[RescuedNode]:
        """Rescue each expired node in its own short transaction.

        The candidates are read without locks; each is then rescued with the
        flow row locked first (the same order as completion, so no deadlock)
        and fenced by its exact lease, so two rescuers cannot both rescue it.
        """
        candidates = self._read(
            lambda conn: conn.execute(
                sa.select(
                    N.c.id,
                    N.c.flow_id,
                    N.c.lease_owner,
                    N.c.attempt,
                    N.c.rescues,
                    N.c.step_name,
                    N.c.started_at,
                    F.c.tracking_id,
                    F.c.flow_name,
                )
                .join(F, F.c.id == N.c.flow_id)
                .where(N.c.status == NodeStatus.RUNNING, N.c.lease_expires_at < self._now())
                .order_by(N.c.lease_expires_at)
                .limit(limit)
            ).all()
        )
        rescued = []
        for c in candidates:
            lease = Lease(c.id, c.flow_id, c.lease_owner, c.attempt)
            rescue = functools.partial(
                self._rescue_one,
                lease=lease,
                step_name=c.step_name,
                rescues=c.rescues,
                started_at=c.started_at,
            )
            ended = self._transact(rescue)
            if ended is not None:
                rescued.append(
                    RescuedNode(
                        c.id,
                        c.flow_name,
                        c.tracking_id,
                        c.step_name,
                        c.attempt,
                        c.lease_owner,
                        ended == NodeStatus.FAILED,
                    )
                )
        return rescued

    def _rescue_one(
        self,
        conn: Connection,
        *,
        lease: Lease,
        step_name: str,
        rescues: int,
        started_at: float | None,
    ) -> NodeStatus | None:
        """Re-queue (or end) one node whose lease expired; None if it was not ours to rescue.

        ``rescues`` and ``started_at`` were read with the lease, and the fence
        matches that exact attempt, so they are still the node's when the update
        applies. The fence includes the expiry, which the lost worker may still
        push back: the lost attempt is kept only once the update matched.
        """
        flow_row = self._lock_flow(conn, F.c.id == lease.flow_id)
        if flow_row is None:
            return None  # the run was pruned while this step ran
        fate = progress.after_lost_lease(
            compensation.as_seen_by(flow_row.status, step_name),
            step_name=step_name,
            rescues=rescues,
            max_rescues=_max_rescues(flow_row, step_name),
        )
        fenced = self._fenced(lease).where(N.c.lease_expires_at < self._now())
        update = fenced.values(rescues=N.c.rescues + 1)
        ended = _ended_attempt(lease, started_at)
        return self._carry_out_item(conn, update, flow_row, fate, ended, step_name)


def _held(lease: Lease) -> tuple[sa.ColumnElement[bool], ...]:
    """The fence of a write about an attempt: the node is still RUNNING under this lease."""
    return (
        N.c.id == lease.node_id,
        N.c.status == NodeStatus.RUNNING,
        N.c.lease_owner == lease.worker_id,
        N.c.attempt == lease.attempt,
    )


def _release_groups(run: str) -> list[tuple[progress.Fate, bool | None]]:
    """The fates of a run's released nodes: one for all of them (None), or, in a
    COMPENSATING run, one for its compensations (True) and one for its steps (False)."""
    if run != FlowStatus.COMPENSATING:
        return [(progress.after_release(run), None)]
    of_compensations = compensation.as_seen_by(run, compensation.COMPENSATE_PREFIX)
    return [
        (progress.after_release(of_compensations), True),
        (progress.after_release(compensation.as_seen_by_a_step(run)), False),
    ]


def _nodes_of_kind(compensations: bool | None) -> tuple[sa.ColumnElement[bool], ...]:
    """The fence of _release_groups' kind of node: compensations, steps, or any."""
    if compensations is None:
        return ()
    is_compensation = N.c.step_name.startswith(compensation.COMPENSATE_PREFIX, autoescape=True)
    return (is_compensation if compensations else sa.not_(is_compensation),)


def _held_any(leases: Sequence[Lease]) -> tuple[sa.ColumnElement[bool], ...]:
    """The fence of a write about several attempts: each node still RUNNING under its lease.

    The attempt must match too, not just the worker: a lapsed lease's node can be
    rescued and leased again to this same worker (attempt + 1, another slot), and
    a write meant for the old attempt must leave the new one alone. The plain
    ``id IN`` keeps the primary-key index in use whatever the planner makes of the OR.
    """
    return (
        N.c.id.in_([lease.node_id for lease in leases]),
        sa.or_(*(sa.and_(*_held(lease)) for lease in leases)),
    )


def _ended_attempt(lease: Lease, started_at: float | None) -> sql_attempts.EndedAttempt:
    """The attempt of ``lease``, which a fenced write ends."""
    return sql_attempts.EndedAttempt(
        lease.node_id, lease.flow_id, lease.attempt, lease.worker_id, started_at
    )


def _planned_move(plan: Plan, step_name: str, status: NodeStatus) -> Move | None:
    """What the run does next, from its plan alone, if FINISH_PG can apply it:
    the step is alone in its stage, and the run goes on with a step alone in the
    next stage, or completes. The same decision as _advance's, for that case."""
    position = _alone_in_stage(plan, step_name)
    if position is None:
        return None
    stage = [progress.StageNode(step_name, status)]
    decision = progress.after_stage(plan, position, stage)
    if isinstance(decision, progress.StartStage) and (
        step := progress.chained_step(stage, decision)
    ):
        # Leased to this worker when the batch chains, else PENDING for any.
        return Move(step.name, decision.position, step.max_attempts)
    if isinstance(decision, progress.FinishFlow):
        return Move(finishes=True)
    return None


def _alone_in_stage(plan: Plan, step_name: str) -> int | None:
    """The position of the step's stage if the step is all of it, else None."""
    position = plan.position_of(step_name)
    if position is None or len(plan.stage(position)) != 1:
        return None
    return position


def _compensates(flow_row: Row[Any]) -> bool:
    """Whether the run's plan has compensations. A plan that cannot be read has none:
    the run fails at once, as it must (a bad row stops only its run)."""
    try:
        return sql_context.parse_plan(flow_row.plan, flow_row.tracking_id).compensates
    except CorruptRow:
        return False


def _max_rescues(flow_row: Row[Any], step_name: str) -> int:
    """The step's max_rescues in the run's stored plan (the default if it is not there);
    a compensation has its step's.

    A plan that cannot be read gives the default too: the rescue must not fail
    on every pass; the run fails, naming its plan, when the step next finishes
    and the run would advance.
    """
    try:
        plan = sql_context.parse_plan(flow_row.plan, flow_row.tracking_id)
        planned = planned_of(plan, compensation.compensated_step(step_name))
    except CorruptRow:
        return DEFAULT_MAX_RESCUES
    return planned.max_rescues if planned is not None else DEFAULT_MAX_RESCUES


def refuse_repeated_tracking_ids(flows: Sequence[NewFlow]) -> None:
    """Each tracking_id once per batch: a repeat is a bug upstream, refused before any write."""
    seen: dict[str, int] = {}
    for position, flow in enumerate(flows):
        first = seen.setdefault(flow.tracking_id, position)
        if first != position:
            raise ValueError(
                f"tracking_id {flow.tracking_id!r} is given twice, at positions {first} and "
                f"{position}: one call enqueues each run once (nothing was enqueued)"
            )


def _refuse_other_flow(flow: NewFlow, row: Row[Any]) -> None:
    if row.flow_name != flow.flow_name:
        raise TrackingIdTaken.for_run(flow.tracking_id, row.flow_name, flow.flow_name)


def _refuse_completed(flow: NewFlow, row: Row[Any], status: str | None = None) -> None:
    if (status or row.status) == FlowStatus.COMPLETED:
        raise FlowAlreadyCompleted.for_run(row.flow_name, flow.tracking_id)


def _refuse_unreadable_status(row: Row[Any]) -> None:
    """A run whose stored status this version cannot read is not taken at its word:
    a cancel would overwrite the status, a retry would call it not FAILED."""
    try:
        FlowStatus(row.status)
    except ValueError:
        raise RunStatusUnreadable.for_run(
            row.tracking_id, row.flow_name, repr(row.status)
        ) from None

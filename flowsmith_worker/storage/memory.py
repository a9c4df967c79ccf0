"""InMemoryStorage: the storage contract in plain Python, for unit tests.

One lock guards everything, which makes every operation atomic the way a
database transaction is; the flow decisions come from progress.py, as in the
SQL storage, so both behave alike (tests/test_contract.py runs both).
"""

from __future__ import annotations

import copy
import itertools
import json
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from flowsmith_worker import progress
from flowsmith_worker.errors import (
    FlowAlreadyCompleted,
    FlowCancelled,
    FlowNotFound,
    FlowSmithError,
    TrackingIdTaken,
)
from flowsmith_worker.plan import PlannedStep
from flowsmith_worker.storage.base import (
    FINISHED_FLOW_STATUSES,
    RESCUE_ERROR,
    ClaimedNode,
    EnqueueResult,
    FlowRecord,
    FlowStatus,
    Lease,
    NewFlow,
    NodeRecord,
    NodeStatus,
    RescuedNode,
    Storage,
)
from flowsmith_worker.storage.memory_operators import MemoryOperators, Node
from flowsmith_worker.storage.schema import SCHEMA_VERSION


def _copy_json(value: Any) -> Any:
    # Round-trip through JSON, as a database would: callers never share our objects.
    return json.loads(json.dumps(value))


class InMemoryStorage(MemoryOperators, Storage):
    url_for_display = "memory://"

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.RLock()
        self._ids = itertools.count(1)
        self._flows: dict[int, FlowRecord] = {}
        self._by_tracking_id: dict[str, int] = {}
        self._nodes: dict[int, Node] = {}
        self._init_operators()

    def migrate(self) -> int:
        return SCHEMA_VERSION

    def check_schema(self) -> None:
        return None

    # -- enqueue --------------------------------------------------------------

    def enqueue_flow(self, *, flow: NewFlow, connection: Any = None) -> EnqueueResult:
        if connection is not None:
            raise FlowSmithError("InMemoryStorage cannot join a caller's database transaction")
        with self._lock:
            return self._enqueue(flow, None)

    def _enqueue(self, flow: NewFlow, parent_node_id: int | None) -> EnqueueResult:
        now = self._clock()
        existing_id = self._by_tracking_id.get(flow.tracking_id)
        if existing_id is None:
            record = FlowRecord(
                id=next(self._ids),
                flow_name=flow.flow_name,
                tracking_id=flow.tracking_id,
                status=FlowStatus.PENDING,
                input=_copy_json(flow.input),
                output=None,
                error=None,
                plan=flow.plan,
                queue=flow.queue,
                priority=flow.priority,
                parent_node_id=parent_node_id,
                created_at=now,
                updated_at=now,
                finished_at=None,
            )
            self._flows[record.id] = record
            self._by_tracking_id[flow.tracking_id] = record.id
            self._start_stage(record, 0, flow.plan.stage(0), flow.input, flow.delay_seconds)
            return EnqueueResult(record.id, flow.tracking_id, FlowStatus.PENDING, True, False)
        record = self._flows[existing_id]
        if record.flow_name != flow.flow_name:
            raise TrackingIdTaken.for_run(flow.tracking_id, record.flow_name, flow.flow_name)
        if parent_node_id is not None:
            _check_child(record, parent_node_id)
            record = self._update_flow(record.id, parent_node_id=parent_node_id)
        if record.status == FlowStatus.COMPLETED:
            raise FlowAlreadyCompleted.for_run(record.flow_name, flow.tracking_id)
        if record.status == FlowStatus.FAILED:
            self._resume(record)
            return EnqueueResult(record.id, flow.tracking_id, FlowStatus.RUNNING, False, True)
        return EnqueueResult(record.id, flow.tracking_id, record.status, False, False)

    def resume_flow(self, *, tracking_id: str) -> EnqueueResult:
        with self._lock:
            flow_id = self._by_tracking_id.get(tracking_id)
            if flow_id is None:
                raise FlowNotFound(f"no flow run has tracking_id {tracking_id!r}")
            record = self._flows[flow_id]
            if record.status != FlowStatus.FAILED:
                raise FlowSmithError(
                    f"flow run {tracking_id!r} is {record.status}; only a FAILED run can be retried"
                )
            self._resume(record)
            return EnqueueResult(flow_id, tracking_id, FlowStatus.RUNNING, False, True)

    def _resume(self, record: FlowRecord) -> None:
        for node in self._nodes_of(record.id):
            if node.record.status == NodeStatus.FAILED:
                planned = record.plan.step(node.record.step_name)
                allowance = planned.max_attempts if planned else 1
                self._update_node(
                    node,
                    status=NodeStatus.PENDING,
                    max_attempts=node.record.attempt + allowance,
                    run_after=self._clock(),
                    lease_expires_at=None,
                    finished_at=None,
                )
        self._update_flow(record.id, status=FlowStatus.RUNNING, error=None, finished_at=None)

    def _start_stage(
        self,
        flow: FlowRecord,
        position: int,
        steps: Sequence[PlannedStep],
        data: dict[str, Any],
        delay: float = 0.0,
    ) -> None:
        now = self._clock()
        taken = {n.record.step_name for n in self._nodes_of(flow.id)}
        for index, step in enumerate(steps):
            if step.name in taken:
                continue  # unique (flow_id, step_name), as in SQL
            record = NodeRecord(
                id=next(self._ids),
                flow_id=flow.id,
                step_name=step.name,
                position=position,
                group_index=index,
                status=NodeStatus.PENDING,
                attempt=0,
                max_attempts=step.max_attempts,
                rescues=0,
                run_after=now + delay,
                lease_owner=None,
                lease_expires_at=None,
                input=_copy_json(data),
                output=None,
                error=None,
                started_at=None,
                finished_at=None,
            )
            self._nodes[record.id] = Node(record, flow.queue, flow.priority)

    # -- claim ----------------------------------------------------------------

    def claim_nodes(
        self, *, worker_id: str, limit: int, lease_seconds: float, queues: Sequence[str]
    ) -> list[ClaimedNode]:
        with self._lock:
            now = self._clock()
            runnable = sorted(
                (
                    n
                    for n in self._nodes.values()
                    if n.record.status == NodeStatus.PENDING
                    and n.record.run_after <= now
                    and n.queue in queues
                ),
                key=lambda n: (n.priority, n.record.run_after, n.record.id),
            )
            room = {q: self._room_in(q) for q in queues}
            claimed: list[ClaimedNode] = []
            for node in runnable:
                if len(claimed) >= limit:
                    break
                if room[node.queue] is not None:
                    if room[node.queue] == 0:
                        continue  # the queue's cap across all workers is reached
                    room[node.queue] = (room[node.queue] or 0) - 1
                self._update_node(
                    node,
                    status=NodeStatus.RUNNING,
                    lease_owner=worker_id,
                    attempt=node.record.attempt + 1,
                    lease_expires_at=now + lease_seconds,
                    started_at=now,
                    finished_at=None,
                )
                flow = self._flows[node.record.flow_id]
                if flow.status == FlowStatus.PENDING:
                    self._update_flow(flow.id, status=FlowStatus.RUNNING)
                claimed.append(
                    ClaimedNode(
                        lease=Lease(node.record.id, flow.id, worker_id, node.record.attempt),
                        flow_name=flow.flow_name,
                        tracking_id=flow.tracking_id,
                        step_name=node.record.step_name,
                        max_attempts=node.record.max_attempts,
                        input=_copy_json(node.record.input),
                    )
                )
            return claimed

    # -- outcomes -------------------------------------------------------------

    def _fenced(self, lease: Lease) -> Node | None:
        node = self._nodes.get(lease.node_id)
        if (
            node is None
            or node.record.status != NodeStatus.RUNNING
            or node.record.lease_owner != lease.worker_id
            or node.record.attempt != lease.attempt
        ):
            return None
        return node

    def complete_node(self, *, lease: Lease, output: Any) -> bool:
        return self._finish(lease, NodeStatus.COMPLETED, _copy_json(output))

    def skip_node(self, *, lease: Lease) -> bool:
        return self._finish(lease, NodeStatus.SKIPPED, None)

    def _finish(self, lease: Lease, status: NodeStatus, output: Any) -> bool:
        with self._lock:
            node = self._fenced(lease)
            if node is None:
                return False
            self._update_node(
                node, status=status, output=output, finished_at=self._clock(), lease_expires_at=None
            )
            self._advance(node.record.flow_id, node.record.position)
            return True

    def fail_node(self, *, lease: Lease, error: str, retry_delay: float | None) -> bool:
        with self._lock:
            node = self._fenced(lease)
            if node is None:
                return False
            cancelled = self._flows[node.record.flow_id].status == FlowStatus.CANCELLED
            if (
                retry_delay is not None
                and not cancelled
                and progress.attempts_left(node.record.attempt, node.record.max_attempts)
            ):
                self._update_node(
                    node,
                    status=NodeStatus.PENDING,
                    error=error,
                    run_after=self._clock() + retry_delay,
                    lease_expires_at=None,
                )
                return True
            self._update_node(
                node,
                status=NodeStatus.CANCELLED if cancelled else NodeStatus.FAILED,
                error=error,
                finished_at=self._clock(),
                lease_expires_at=None,
            )
            if not cancelled:
                self._fail_flow(node.record.flow_id, error)
            return True

    def start_subflow(self, *, lease: Lease, child: NewFlow) -> bool:
        with self._lock:
            node = self._fenced(lease)
            if node is None:
                return False
            if self._flows[node.record.flow_id].status == FlowStatus.CANCELLED:
                self._update_node(node, status=NodeStatus.CANCELLED, finished_at=self._clock())
                return True
            # Enqueue first: if it raises, the node must still be RUNNING so the
            # executor's fail_node (fenced) can record the error.
            try:
                self._enqueue(child, parent_node_id=lease.node_id)
            except FlowAlreadyCompleted:
                finished = self._flows[self._by_tracking_id[child.tracking_id]]
                self._update_node(node, status=NodeStatus.WAITING, lease_expires_at=None)
                self._child_completed(lease.node_id, finished.output)
                return True
            self._update_node(node, status=NodeStatus.WAITING, lease_expires_at=None)
            return True

    # -- advancing and failing ------------------------------------------------

    def _advance(self, flow_id: int, position: int) -> None:
        flow = self._flows[flow_id]
        if flow.status == FlowStatus.CANCELLED:
            return
        stage = sorted(
            (n.record for n in self._nodes_of(flow_id) if n.record.position == position),
            key=lambda r: r.group_index,
        )
        decision = progress.after_stage(
            flow.plan,
            position,
            [progress.StageNode(r.step_name, r.status, r.input, r.output) for r in stage],
        )
        if isinstance(decision, progress.StartStage):
            self._start_stage(flow, decision.position, decision.steps, decision.data)
        elif isinstance(decision, progress.FinishFlow):
            self._update_flow(
                flow_id,
                status=FlowStatus.COMPLETED,
                output=_copy_json(decision.data),
                error=None,
                finished_at=self._clock(),
            )
            if flow.parent_node_id is not None:
                self._child_completed(flow.parent_node_id, decision.data)

    def _child_completed(self, parent_node_id: int, data: Any) -> None:
        parent = self._nodes.get(parent_node_id)  # None: pruned meanwhile
        if parent is None or parent.record.status != NodeStatus.WAITING:
            return
        self._update_node(
            parent, status=NodeStatus.COMPLETED, output=_copy_json(data), finished_at=self._clock()
        )
        self._advance(parent.record.flow_id, parent.record.position)

    def _fail_flow(self, flow_id: int, error: str) -> None:
        flow = self._update_flow(
            flow_id, status=FlowStatus.FAILED, error=error, finished_at=self._clock()
        )
        if flow.parent_node_id is not None:
            failure = f"subflow {flow.tracking_id!r} ({flow.flow_name}) failed:\n{error}"
            self._fail_parent(flow.parent_node_id, failure)

    def _fail_parent(self, parent_node_id: int, parent_error: str) -> None:
        """The child of a WAITING subflow node failed or was cancelled: retry it, or fail it."""
        parent = self._nodes.get(parent_node_id)  # None: pruned meanwhile
        if parent is None or parent.record.status != NodeStatus.WAITING:
            return
        if progress.attempts_left(parent.record.attempt, parent.record.max_attempts):
            self._update_node(
                parent, status=NodeStatus.PENDING, error=parent_error, run_after=self._clock()
            )
            return
        self._update_node(
            parent, status=NodeStatus.FAILED, error=parent_error, finished_at=self._clock()
        )
        self._fail_flow(parent.record.flow_id, parent_error)

    # -- cancelling ------------------------------------------------------------

    def cancel_flow(self, *, tracking_id: str) -> FlowRecord:
        with self._lock:
            flow_id = self._by_tracking_id.get(tracking_id)
            if flow_id is None:
                raise FlowNotFound(f"no flow run has tracking_id {tracking_id!r}")
            status = self._flows[flow_id].status
            if status in (FlowStatus.COMPLETED, FlowStatus.FAILED):
                raise FlowSmithError(
                    f"flow run {tracking_id!r} is {status}; only a pending or running "
                    "run can be cancelled"
                )
            self._cancel(flow_id)
            cancelled = self._flows[flow_id]
            if cancelled.parent_node_id is not None:
                self._fail_parent(
                    cancelled.parent_node_id,
                    f"subflow {tracking_id!r} ({cancelled.flow_name}) was cancelled",
                )
            return copy.deepcopy(self._flows[flow_id])

    def _cancel(self, flow_id: int) -> None:
        now = self._clock()
        waiting = []
        for node in self._nodes.values():
            if node.record.flow_id == flow_id and node.record.status in (
                NodeStatus.PENDING,
                NodeStatus.WAITING,
            ):
                if node.record.status == NodeStatus.WAITING:
                    waiting.append(node.record.id)
                node.record = replace(node.record, status=NodeStatus.CANCELLED, finished_at=now)
        flow = self._flows[flow_id]
        if flow.status not in FINISHED_FLOW_STATUSES:
            self._flows[flow_id] = replace(
                flow, status=FlowStatus.CANCELLED, updated_at=now, finished_at=now
            )
        for child in list(self._flows.values()):
            if child.parent_node_id in waiting:
                self._cancel(child.id)

    # -- leases ---------------------------------------------------------------

    def _owned(self, worker_id: str, node_ids: Sequence[int]) -> list[Node]:
        return [
            n
            for i in node_ids
            if (n := self._nodes.get(i)) is not None
            and n.record.status == NodeStatus.RUNNING
            and n.record.lease_owner == worker_id
        ]

    def extend_leases(
        self, *, worker_id: str, node_ids: Sequence[int], lease_seconds: float
    ) -> int:
        with self._lock:
            owned = self._owned(worker_id, node_ids)
            for node in owned:
                self._update_node(node, lease_expires_at=self._clock() + lease_seconds)
            return len(owned)

    def release_nodes(self, *, worker_id: str, node_ids: Sequence[int]) -> int:
        with self._lock:
            owned = self._owned(worker_id, node_ids)
            for node in owned:
                if self._flows[node.record.flow_id].status == FlowStatus.CANCELLED:
                    # A node of a cancelled run is not handed to anyone.
                    self._update_node(
                        node,
                        status=NodeStatus.CANCELLED,
                        lease_expires_at=None,
                        finished_at=self._clock(),
                    )
                    continue
                self._update_node(
                    node,
                    status=NodeStatus.PENDING,
                    max_attempts=node.record.max_attempts + 1,
                    lease_owner=None,
                    lease_expires_at=None,
                    run_after=self._clock(),
                )
            return len(owned)

    def rescue_expired(self, *, limit: int = 100) -> list[RescuedNode]:
        with self._lock:
            now = self._clock()
            expired = sorted(
                (
                    n
                    for n in self._nodes.values()
                    if n.record.status == NodeStatus.RUNNING
                    and n.record.lease_expires_at is not None
                    and n.record.lease_expires_at < now
                ),
                key=lambda n: n.record.lease_expires_at or 0.0,
            )[:limit]
            rescued = []
            for node in expired:
                r = node.record
                final = not progress.attempts_left(r.attempt, r.max_attempts)
                flow = self._flows[r.flow_id]
                cancelled = flow.status == FlowStatus.CANCELLED
                ended = NodeStatus.CANCELLED if cancelled else NodeStatus.FAILED
                self._update_node(
                    node,
                    status=ended if final or cancelled else NodeStatus.PENDING,
                    error=RESCUE_ERROR,
                    rescues=r.rescues + 1,
                    lease_expires_at=None,
                    run_after=now,
                    finished_at=now if final or cancelled else None,
                )
                if final and not cancelled:
                    self._fail_flow(r.flow_id, RESCUE_ERROR)
                rescued.append(
                    RescuedNode(
                        r.id,
                        flow.flow_name,
                        flow.tracking_id,
                        r.step_name,
                        r.attempt,
                        r.lease_owner or "",
                        final,
                    )
                )
            return rescued

    # -- helpers --------------------------------------------------------------

    def _nodes_of(self, flow_id: int) -> list[Node]:
        return [n for n in self._nodes.values() if n.record.flow_id == flow_id]

    def _update_node(self, node: Node, **changes: Any) -> None:
        node.record = replace(node.record, **changes)

    def _update_flow(self, flow_id: int, **changes: Any) -> FlowRecord:
        record = replace(self._flows[flow_id], updated_at=self._clock(), **changes)
        self._flows[flow_id] = record
        return record


def _check_child(record: FlowRecord, parent_node_id: int) -> None:
    """An existing run may become a subflow only of the node that started it."""
    if record.parent_node_id not in (None, parent_node_id):
        raise FlowSmithError(
            f"tracking_id {record.tracking_id!r} is already the subflow of another step; "
            "give each parent its own child tracking_id"
        )
    if record.status == FlowStatus.CANCELLED:
        raise FlowCancelled(f"the subflow run {record.tracking_id!r} was cancelled")

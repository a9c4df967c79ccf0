"""The operators' side of InMemoryStorage: reading, cancelling, pruning, stats,
workers and queue caps, over the same dictionaries as memory.py.
"""

from __future__ import annotations

import copy
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from flowsmith_worker.storage.base import (
    FINISHED_FLOW_STATUSES,
    FlowFilter,
    FlowRecord,
    NodeRecord,
    NodeStatus,
    Stats,
    WorkerRecord,
)


@dataclass
class Node:
    record: NodeRecord
    queue: str
    priority: int


class MemoryOperators:
    _clock: Callable[[], float]
    _lock: threading.RLock
    _flows: dict[int, FlowRecord]
    _by_tracking_id: dict[str, int]
    _nodes: dict[int, Node]

    def _init_operators(self) -> None:
        self._workers: dict[str, WorkerRecord] = {}
        self._queue_caps: dict[str, int] = {}

    # -- reading ------------------------------------------------------------------

    def get_flow(self, *, tracking_id: str) -> FlowRecord | None:
        with self._lock:
            flow_id = self._by_tracking_id.get(tracking_id)
            return None if flow_id is None else copy.deepcopy(self._flows[flow_id])

    def list_nodes(self, *, flow_id: int) -> list[NodeRecord]:
        with self._lock:
            return sorted(
                (
                    copy.deepcopy(n.record)
                    for n in self._nodes.values()
                    if n.record.flow_id == flow_id
                ),
                key=lambda r: (r.position, r.group_index),
            )

    def count_runnable_nodes(self, *, queues: Sequence[str]) -> int:
        with self._lock:
            now = self._clock()
            return sum(
                1
                for n in self._nodes.values()
                if n.queue in queues
                and n.record.status == NodeStatus.PENDING
                and n.record.run_after <= now
            )

    def count_open_nodes(self, *, queues: Sequence[str]) -> int:
        with self._lock:
            open_statuses = (NodeStatus.PENDING, NodeStatus.RUNNING)
            return sum(
                1
                for n in self._nodes.values()
                if n.queue in queues and n.record.status in open_statuses
            )

    def list_flows(self, *, where: FlowFilter) -> list[FlowRecord]:
        with self._lock:
            found = [
                f
                for f in self._flows.values()
                if (where.status is None or f.status == where.status)
                and (where.flow_name is None or f.flow_name == where.flow_name)
                and (where.since is None or f.created_at >= where.since)
            ]
            found.sort(key=lambda f: (f.created_at, f.id), reverse=True)
            return copy.deepcopy(found[: where.limit])

    def stats(self) -> Stats:
        with self._lock:
            now = self._clock()
            nodes = list(self._nodes.values())
            by_queue: dict[str, dict[str, int]] = {}
            for node in nodes:
                counts = by_queue.setdefault(node.queue, {})
                counts[str(node.record.status)] = counts.get(str(node.record.status), 0) + 1
            runnable = [
                n.record.run_after
                for n in nodes
                if n.record.status == NodeStatus.PENDING and n.record.run_after <= now
            ]
            running = [
                n.record.lease_owner or "" for n in nodes if n.record.status == NodeStatus.RUNNING
            ]
            return Stats(
                flows_by_status=dict(Counter(str(f.status) for f in self._flows.values())),
                nodes_by_status=dict(Counter(str(n.record.status) for n in nodes)),
                nodes_by_queue=by_queue,
                in_flight_by_worker=dict(Counter(running)),
                attempts=sum(n.record.attempt for n in nodes),
                rescues=sum(n.record.rescues for n in nodes),
                oldest_runnable_age=now - min(runnable) if runnable else None,
            )

    # -- cancelling and pruning -------------------------------------------------

    def prune_flows(self, *, older_than_seconds: float, batch_size: int = 500) -> int:
        with self._lock:
            cutoff = self._clock() - older_than_seconds
            old = [
                f
                for f in self._flows.values()
                if f.status in FINISHED_FLOW_STATUSES
                and f.finished_at is not None
                and f.finished_at < cutoff
            ]
            gone = {f.id for f in old}
            for flow in old:
                del self._flows[flow.id]
                del self._by_tracking_id[flow.tracking_id]
            for node_id in [i for i, n in self._nodes.items() if n.record.flow_id in gone]:
                del self._nodes[node_id]
            return len(old)

    # -- workers and queue caps ---------------------------------------------------------

    def register_worker(self, *, worker: WorkerRecord) -> None:
        with self._lock:
            now = self._clock()
            self._workers[worker.id] = replace(worker, started_at=now, heartbeat_at=now)

    def worker_heartbeat(self, *, worker_id: str, in_flight: int) -> None:
        with self._lock:
            if worker_id in self._workers:
                self._workers[worker_id] = replace(
                    self._workers[worker_id], heartbeat_at=self._clock(), in_flight=in_flight
                )

    def unregister_worker(self, *, worker_id: str) -> None:
        with self._lock:
            self._workers.pop(worker_id, None)

    def list_workers(self) -> list[WorkerRecord]:
        with self._lock:
            return sorted(self._workers.values(), key=lambda w: w.started_at)

    def remove_dead_workers(self) -> int:
        with self._lock:
            now = self._clock()
            dead = [
                w.id for w in self._workers.values() if w.heartbeat_at < now - 3 * w.lease_seconds
            ]
            for worker_id in dead:
                del self._workers[worker_id]
            return len(dead)

    def set_queue_limit(self, *, queue: str, max_running: int | None) -> None:
        if max_running is not None and max_running < 0:
            raise ValueError(f"max_running={max_running}: cannot be negative")
        with self._lock:
            self._queue_caps.pop(queue, None)
            if max_running is not None:
                self._queue_caps[queue] = max_running

    def queue_limits(self) -> dict[str, int]:
        with self._lock:
            return dict(self._queue_caps)

    def _room_in(self, queue: str) -> int | None:
        """Free slots under the queue's cap; None when it has none."""
        cap = self._queue_caps.get(queue)
        if cap is None:
            return None
        running = sum(
            1
            for n in self._nodes.values()
            if n.queue == queue and n.record.status == NodeStatus.RUNNING
        )
        return max(0, cap - running)

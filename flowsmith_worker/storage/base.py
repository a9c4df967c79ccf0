"""The storage seam: named operations, small frozen records, no driver rows.

One implementation, SqlStorage, serves SQLite, PostgreSQL and MySQL/MariaDB;
InMemoryStorage is the same class on a private temporary SQLite database. The
contract suite (tests/contract/test_contract.py) runs over all of them. The words used
here name the log events and the tests too.

Owns the interface; the value types every layer shares (statuses, Lease, the
records) live in records.py and are re-exported here. Must never hold a backend's
code or a rule of the state machine (that is progress.py's), and never hand out a
driver's row or connection.
"""

from __future__ import annotations

import abc
import threading
from collections.abc import Callable, Sequence
from typing import Any

from flowsmith_worker.rate_limits import RateLimit
from flowsmith_worker.records import (
    DEFAULT_QUEUE,
    FINISHED_FLOW_STATUSES,
    RESCUE_ERROR,
    ActivitySlice,
    AttemptOutcome,
    AttemptRecord,
    Chain,
    ChainedNode,
    ClaimedNode,
    EnqueueResult,
    EventSent,
    FailureGroup,
    Finished,
    FlowFilter,
    FlowRecord,
    FlowStatus,
    FlowSummary,
    Lease,
    NewFlow,
    NodeRecord,
    NodeStatus,
    Overview,
    Parked,
    QueueBacklog,
    RescuedNode,
    RunCursor,
    RunLink,
    Stats,
    SubflowLinks,
    Woken,
    WorkerRecord,
    Written,
)

# The records live in flowsmith_worker.records; imported from here too, as ever.
__all__ = [
    "DEFAULT_QUEUE",
    "FINISHED_FLOW_STATUSES",
    "RESCUE_ERROR",
    "ActivitySlice",
    "AttemptOutcome",
    "AttemptRecord",
    "Chain",
    "ChainedNode",
    "ClaimedNode",
    "EnqueueResult",
    "EventSent",
    "FailureGroup",
    "Finished",
    "FlowFilter",
    "FlowRecord",
    "FlowStatus",
    "FlowSummary",
    "Lease",
    "NewFlow",
    "NodeRecord",
    "NodeStatus",
    "Overview",
    "Parked",
    "QueueBacklog",
    "RescuedNode",
    "RunCursor",
    "RunLink",
    "Stats",
    "Storage",
    "SubflowLinks",
    "Woken",
    "WorkerRecord",
    "Written",
]


class Storage(abc.ABC):
    """What the engine needs from a database. Methods take keyword arguments."""

    # Capabilities, so no caller asks "which database am I on?".
    supports_notify: bool = False
    url_for_display: str = ""

    @abc.abstractmethod
    def migrate(self) -> int:
        """Create or upgrade the schema; return the schema version now in place."""

    @abc.abstractmethod
    def check_schema(self) -> None:
        """Raise SchemaNotMigrated unless the schema is at the version the code expects."""

    @abc.abstractmethod
    def enqueue_flow(self, *, flow: NewFlow, connection: Any = None) -> EnqueueResult:
        """Insert a run, or apply the idempotent-trigger rules to an existing one."""

    @abc.abstractmethod
    def enqueue_flows(
        self, *, flows: Sequence[NewFlow], connection: Any = None
    ) -> list[EnqueueResult]:
        """enqueue_flow for each of ``flows`` in one transaction; the results in their order.

        All or nothing: a tracking_id given twice (ValueError), one that belongs
        to another flow (TrackingIdTaken) or to a COMPLETED run
        (FlowAlreadyCompleted) refuses the whole batch.
        """

    @abc.abstractmethod
    def claim_nodes(
        self, *, worker_id: str, limit: int, lease_seconds: float, queues: Sequence[str]
    ) -> list[ClaimedNode]:
        """Take up to ``limit`` runnable nodes, leased to ``worker_id``."""

    @abc.abstractmethod
    def complete_node(self, *, lease: Lease, output: Any) -> bool:
        """Record the output and advance the flow; False if the lease was lost."""

    @abc.abstractmethod
    def skip_node(self, *, lease: Lease) -> bool:
        """Mark the node SKIPPED (its condition was false) and advance the flow."""

    @abc.abstractmethod
    def complete_batch(
        self, *, finished: Sequence[Finished], chain: Chain | None = None
    ) -> list[Written]:
        """Write the outcomes of several attempts in one transaction (group commit).

        Each write is fenced by its own lease, exactly as complete_node and
        skip_node are; the answers come in the order of ``finished``. With
        ``chain``, the run of a sequential step that is followed by another
        sequential step gets that step RUNNING, leased to ``chain.worker_id``,
        in the same transaction.
        """

    @abc.abstractmethod
    def fail_node(
        self, *, lease: Lease, error: str, retry_delay: float | None, compensate: bool = True
    ) -> NodeStatus | None:
        """Re-queue after ``retry_delay`` seconds, or fail node and flow when it is None.

        ``compensate`` False: a run this fails ends FAILED without running its
        compensations, so it stays retryable (a step missing from the worker's code).

        Returns the node's status after the write: PENDING (a retry is scheduled),
        FAILED, or CANCELLED when its run was already cancelled; a run another
        step failed gets no retry, so its node ends FAILED. None if the lease was
        lost.
        """

    @abc.abstractmethod
    def start_subflow(self, *, lease: Lease, child: NewFlow) -> NodeStatus | None:
        """Enqueue (or resume) the child flow and park the node WAITING for it.

        Returns the node's status after the write: WAITING, or COMPLETED when the
        child had already completed; CANCELLED when the node's run was already
        over (failed or cancelled), so no child was started; None if the lease
        was lost.
        """

    @abc.abstractmethod
    def park_node(
        self,
        *,
        lease: Lease,
        event: str | None,
        seconds: float | None,
        until: float | None,
    ) -> Woken | Parked | None:
        """A claimed sleep or wait for ``event``: Woken if it is over, else park it.

        Over: the event was sent, or the node's wake time has passed (set at its
        first parking: ``until``, or ``seconds`` from then, or never). The node
        then stays RUNNING under the lease for the attempt to complete. Parked:
        the node is PENDING until its wake time (CANCELLED if its run is over).
        None if the lease was lost. See parking.py.
        """

    @abc.abstractmethod
    def take_rate_token(
        self, *, lease: Lease, flow_name: str, step_name: str, rate: RateLimit
    ) -> bool | Parked | None:
        """Take a token of the step's rate limit for the claimed node, about to start.

        True: taken, the step starts. Parked: none is left; the node waits PENDING
        until its turn. Parked too, the node ended (CANCELLED, or stopped) and no
        token taken, if its run is over or COMPENSATING. None if the lease was lost
        (no token is taken). By the database clock, under the bucket's row lock:
        see rate_limits.py.
        """

    @abc.abstractmethod
    def start_map(self, *, lease: Lease, items: Sequence[str]) -> NodeStatus | None:
        """Start the claimed map step's items (each JSON text), a node each (see fanout.py).

        The map node becomes WAITING until its last item ends; with no item it
        is COMPLETED at once (output ``[]``) and its run moves on. CANCELLED if
        its run is over (no item is started); None if the lease was lost.
        """

    @abc.abstractmethod
    def map_item(self, *, lease: Lease) -> str | None:
        """The item (JSON text) of the claimed item node; None if the lease was lost."""

    @abc.abstractmethod
    def send_event(
        self,
        *,
        tracking_id: str,
        name: str,
        payload: str,
        idempotency_key: str | None = None,
        connection: Any = None,
    ) -> EventSent:
        """Store the event ``name`` (``payload``: JSON text) for the run's wait_for step,
        waking it if it is parked; inside the caller's transaction with ``connection``.

        FlowNotFound for an unknown run; EventRefused for a finished run, a name
        the run does not wait for, or a second event of that name (unless it has
        the first one's idempotency key: then nothing is written).
        """

    @abc.abstractmethod
    def extend_leases(self, *, leases: Sequence[Lease], lease_seconds: float) -> int:
        """Push back the lease expiry of these attempts, where each still holds its node.

        Fenced by the whole lease (node, worker, attempt), like every write about
        an attempt: a node rescued and leased again, even to the same worker, is
        not extended by the old attempt's lease.
        """

    @abc.abstractmethod
    def release_nodes(self, *, leases: Sequence[Lease]) -> int:
        """Hand these attempts' nodes back at once (shutdown), where each still holds its node.

        Fenced by the whole lease (node, worker, attempt): releasing an attempt
        whose node was rescued and leased again, even to the same worker, leaves
        the new attempt running.

        The interrupted attempt keeps its number (attempt numbers only grow: with
        the worker id they are the fencing token) but is given back to the step's
        allowance: max_attempts grows by one, so a release never uses up a retry.
        """

    @abc.abstractmethod
    def rescue_expired(self, *, limit: int = 100) -> list[RescuedNode]:
        """Expired leases: back to PENDING (the lost attempt given back), up to max_rescues.

        One loss more than the step's max_rescues fails node and flow; a node of a
        run that is over (failed or cancelled) ends CANCELLED instead.
        """

    @abc.abstractmethod
    def get_flow(self, *, tracking_id: str, with_payloads: bool = True) -> FlowRecord | None:
        """The run with that tracking_id, or None.

        ``with_payloads=False`` reads neither input nor output (left {} and None):
        for callers that do not show them, since either can be megabytes.
        """

    @abc.abstractmethod
    def list_nodes(self, *, flow_id: int, with_payloads: bool = True) -> list[NodeRecord]:
        """Every node of a run, in plan order, with its attempts (``with_payloads`` as
        for get_flow)."""

    @abc.abstractmethod
    def runnable_backlog(self, *, queues: Sequence[str]) -> dict[str, QueueBacklog]:
        """Per queue, the nodes PENDING and due now; queues with none are left out."""

    @abc.abstractmethod
    def count_open_nodes(self, *, queues: Sequence[str]) -> int:
        """Nodes PENDING or RUNNING on these queues (for run_until_idle); a wait for an
        event with no timeout is left out, as nothing but its event can end it."""

    # -- operators (flowsmith status/flows/retry/cancel/prune/stats/workers) --------

    @abc.abstractmethod
    def list_flows(self, *, where: FlowFilter) -> list[FlowSummary]:
        """Runs matching the filter, newest first, without their payloads."""

    @abc.abstractmethod
    def resume_flow(self, *, tracking_id: str) -> EnqueueResult:
        """Re-queue the failed node(s) of a FAILED run, and those its failure stopped.

        What `flowsmith retry` does; RunNotRetryable if the run is not FAILED.
        """

    @abc.abstractmethod
    def cancel_flow(self, *, tracking_id: str) -> FlowRecord:
        """Pending steps never start; a running step finishes but the flow goes no further."""

    @abc.abstractmethod
    def prune_flows(self, *, older_than_seconds: float, batch_size: int = 500) -> int:
        """Delete finished runs (their nodes and attempts) older than that, in small batches."""

    @abc.abstractmethod
    def count_prunable_flows(self, *, older_than_seconds: float) -> int:
        """How many runs prune_flows would delete now (`flowsmith prune --dry-run`)."""

    @abc.abstractmethod
    def current_time(self) -> float:
        """The database clock, in seconds since the epoch: every stored time is on it,
        so "3s ago" and "in 10m" are measured against it, not this host's clock."""

    @abc.abstractmethod
    def register_worker(self, *, worker: WorkerRecord) -> None:
        """Insert the worker's row (its timestamps are taken from the database clock)."""

    @abc.abstractmethod
    def worker_heartbeat(self, *, worker_id: str, in_flight: int) -> bool:
        """Refresh the worker's row; False if it is gone (removed as dead)."""

    @abc.abstractmethod
    def unregister_worker(self, *, worker_id: str) -> None:
        """Remove the worker's row at a clean stop."""

    @abc.abstractmethod
    def list_workers(self) -> list[WorkerRecord]:
        """Registered workers, oldest first."""

    @abc.abstractmethod
    def remove_dead_workers(self) -> int:
        """Drop rows whose heartbeat is older than three of their leases."""

    @abc.abstractmethod
    def set_queue_limit(self, *, queue: str, max_running: int | None) -> None:
        """Cap the steps of a queue RUNNING at once across all workers (None: no cap)."""

    @abc.abstractmethod
    def queue_limits(self) -> dict[str, int]:
        """The capped queues and their caps."""

    def listen_for_work(self, *, on_notify: Callable[[str], None], stop: threading.Event) -> None:
        """Call ``on_notify(queue)`` when work is enqueued, until ``stop`` (NOTIFY storages)."""
        raise NotImplementedError(f"{type(self).__name__} has no NOTIFY; poll instead")

    @abc.abstractmethod
    def stats(self) -> Stats:
        """Counts of flows and nodes by status, attempts, rescues, backlog age."""

    # -- the dashboard's questions (flowsmith_worker.dashboard) ----------------------

    @abc.abstractmethod
    def overview(self, *, window_seconds: float, buckets: int, finished_within: float) -> Overview:
        """What the dashboard's overview shows, through indexes only (no count of a whole
        table): runs open now and those finished in the last ``finished_within`` seconds
        by status, open steps and the runnable backlog by queue, and the runs finished
        in the last ``window_seconds`` in ``buckets`` equal slices."""

    @abc.abstractmethod
    def subflow_links(self, *, flow: FlowRecord) -> SubflowLinks:
        """The run that started ``flow`` as a subflow (if any) and the runs its steps started."""

    @abc.abstractmethod
    def failure_groups(self, *, within_seconds: float, max_runs: int) -> list[FailureGroup]:
        """The failed steps of runs that FAILED in the last ``within_seconds`` (the newest
        ``max_runs`` runs at most), grouped by flow, step and error message, most frequent
        first."""

    def close(self) -> None:  # noqa: B027 - optional: storages without connections keep it
        """Release connections."""

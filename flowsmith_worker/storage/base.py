"""The storage seam: named operations, small frozen records, no driver rows.

One implementation, SqlStorage, serves SQLite, PostgreSQL and MySQL/MariaDB;
InMemoryStorage is the same class on a private temporary SQLite database. The
contract suite (tests/contract/test_contract.py) runs over all of them. The words used
here name the log events and the tests too.

Owns the interface and the value types every layer shares (statuses, Lease, the
records). Must never hold a backend's code or a rule of the state machine (that is
progress.py's), and never hand out a driver's row or connection.
"""

from __future__ import annotations

import abc
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from flowsmith_worker.plan import Plan


class FlowStatus(StrEnum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


class NodeStatus(StrEnum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    SKIPPED = "SKIPPED"
    WAITING = "WAITING"  # a subflow node waiting for its child flow
    CANCELLED = "CANCELLED"


class AttemptOutcome(StrEnum):
    """How one attempt of a step ended (or RUNNING / WAITING: it has not yet)."""

    RUNNING = "RUNNING"
    WAITING = "WAITING"  # a subflow step's attempt, waiting for its child run
    COMPLETED = "COMPLETED"
    SKIPPED = "SKIPPED"
    FAILED = "FAILED"  # the step raised, timed out, or its subflow failed
    CANCELLED = "CANCELLED"
    RESCUED = "RESCUED"  # its worker was lost (the lease expired); the step ran again
    RELEASED = "RELEASED"  # its worker handed it back unfinished as it stopped


DEFAULT_QUEUE = "default"
RESCUE_ERROR = "lease expired: worker lost"


@dataclass(frozen=True)
class NewFlow:
    """A flow run to enqueue."""

    flow_name: str
    tracking_id: str
    input: dict[str, Any]
    plan: Plan
    queue: str = DEFAULT_QUEUE
    priority: int = 0
    delay_seconds: float = 0.0
    # Not before this instant (seconds since the epoch), compared with the
    # database clock: a host clock that is off cannot move it.
    run_at: float | None = None


@dataclass(frozen=True)
class EnqueueResult:
    flow_id: int
    tracking_id: str
    status: FlowStatus
    created: bool  # a new run was inserted
    resumed: bool  # a FAILED run was re-queued at its failed step(s)


@dataclass(frozen=True)
class Lease:
    """The fencing token of one attempt: every write about it must match all of it."""

    node_id: int
    flow_id: int
    worker_id: str
    attempt: int


@dataclass(frozen=True)
class ClaimedNode:
    lease: Lease
    flow_name: str
    tracking_id: str
    step_name: str
    max_attempts: int
    input: dict[str, Any]

    @property
    def attempt(self) -> int:
        return self.lease.attempt

    @property
    def node_id(self) -> int:
        return self.lease.node_id


@dataclass(frozen=True)
class Finished:
    """An attempt that ended well, to be written by complete_batch.

    ``output`` is the step's output already encoded as JSON (None for SKIPPED):
    encoded once, by the executor, which had to check it could be stored anyway.
    ``replay`` marks a write sent again because the answer to an earlier send
    was lost: if that send committed, the node is already this attempt's, which
    is then a success, not a lost lease.
    """

    lease: Lease
    status: NodeStatus  # COMPLETED or SKIPPED
    output: str | None
    replay: bool = False
    # The node's step, when the caller knows it: a step alone in its stage then
    # moves the run on without reading the stage's nodes.
    step_name: str | None = None


@dataclass(frozen=True)
class Chain:
    """Ask complete_batch to lease each run's next step to this worker in the same
    transaction (chaining): the worker runs it without a claim round trip."""

    worker_id: str
    lease_seconds: float


@dataclass(frozen=True)
class ChainedNode:
    """The next step of a run, created RUNNING and leased to the completing worker."""

    lease: Lease
    step_name: str
    max_attempts: int


@dataclass(frozen=True)
class Written:
    """complete_batch's answer for one Finished: ``won`` is False if the lease was lost."""

    won: bool
    chained: ChainedNode | None = None


@dataclass(frozen=True)
class RescuedNode:
    node_id: int
    flow_name: str
    tracking_id: str
    step_name: str
    attempt: int
    worker_id: str
    failed: bool  # its max_rescues was used up: the node and its flow are FAILED


@dataclass(frozen=True)
class FlowRecord:
    id: int
    flow_name: str
    tracking_id: str
    status: FlowStatus
    input: dict[str, Any]
    output: dict[str, Any] | None
    error: str | None
    plan: Plan
    queue: str
    priority: int
    parent_node_id: int | None
    created_at: float
    updated_at: float
    finished_at: float | None
    # Stored values that could not be read (an unknown status, text that is not
    # JSON): column -> why. Such a field holds a placeholder (FAILED, {}, None, an
    # empty plan) that nobody should act on; FlowRun refuses the record.
    unreadable: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class FlowSummary:
    """A run as `flowsmith flows` lists it: no input, output or plan is read."""

    id: int
    flow_name: str
    tracking_id: str
    status: FlowStatus
    queue: str
    priority: int
    parent_node_id: int | None
    error: str | None
    created_at: float
    updated_at: float
    finished_at: float | None
    unreadable: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class AttemptRecord:
    """One attempt of one step: when, on which worker, how it ended, with what error.

    ``ended_at`` is None while the attempt runs (or waits for its subflow).
    ``error`` is the attempt's own error text, with its traceback.
    """

    node_id: int
    flow_id: int
    step_name: str
    attempt: int
    worker_id: str | None
    started_at: float
    ended_at: float | None
    outcome: AttemptOutcome
    error: str | None
    unreadable: Mapping[str, str] = field(default_factory=dict)  # as FlowRecord's


@dataclass(frozen=True)
class NodeRecord:
    id: int
    flow_id: int
    step_name: str
    position: int
    group_index: int
    status: NodeStatus
    attempt: int
    max_attempts: int
    rescues: int
    run_after: float
    lease_owner: str | None
    lease_expires_at: float | None
    input: dict[str, Any]
    output: Any
    error: str | None
    started_at: float | None
    finished_at: float | None
    unreadable: Mapping[str, str] = field(default_factory=dict)  # as FlowRecord's
    # Every attempt of the step so far, oldest first: those superseded (a retried
    # failure, a lost worker, a release) and the one the node's own columns
    # describe. Filled by list_nodes; attempts made before schema version 5
    # were not kept, only the node's last one.
    attempts: tuple[AttemptRecord, ...] = ()


@dataclass(frozen=True)
class WorkerRecord:
    """A live (or recently dead) worker process, for `flowsmith workers`."""

    id: str
    host: str
    pid: int
    version: str
    queues: tuple[str, ...]
    concurrency: int
    lease_seconds: float
    in_flight: int
    started_at: float
    heartbeat_at: float


@dataclass(frozen=True)
class QueueBacklog:
    """A queue's steps runnable now: how many, and how long the oldest has waited."""

    runnable: int = 0
    oldest_age_seconds: float = 0.0


@dataclass(frozen=True)
class RunCursor:
    """Where a page of runs ended: the (created_at, id) of its last run (keyset paging)."""

    created_at: float
    id: int


@dataclass(frozen=True)
class FlowFilter:
    """Which runs `flowsmith flows` and the dashboard list, newest first."""

    status: FlowStatus | None = None
    flow_name: str | None = None
    since: float | None = None  # created at or after, seconds since the epoch
    created_within: float | None = None  # created in the last N seconds of the database clock
    limit: int = 50
    until: float | None = None  # created before, seconds since the epoch
    tracking_id_prefix: str | None = None  # compared byte for byte, as tracking_ids are
    after: RunCursor | None = None  # only runs older than this one: the next page


FINISHED_FLOW_STATUSES = (FlowStatus.COMPLETED, FlowStatus.FAILED, FlowStatus.CANCELLED)


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
        self, *, lease: Lease, error: str, retry_delay: float | None
    ) -> NodeStatus | None:
        """Re-queue after ``retry_delay`` seconds, or fail node and flow when it is None.

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
    def extend_leases(
        self, *, worker_id: str, node_ids: Sequence[int], lease_seconds: float
    ) -> int:
        """Push back the lease expiry of the worker's in-flight nodes."""

    @abc.abstractmethod
    def release_nodes(self, *, worker_id: str, node_ids: Sequence[int]) -> int:
        """Hand unfinished nodes back at once (shutdown).

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
        """Nodes PENDING or RUNNING on these queues (for run_until_idle)."""

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


@dataclass(frozen=True)
class Stats:
    """Counts for `flowsmith stats` and the demo's summary."""

    flows_by_status: dict[str, int]
    nodes_by_status: dict[str, int]
    nodes_by_queue: dict[str, dict[str, int]]  # queue -> status -> count
    in_flight_by_worker: dict[str, int]
    attempts: int  # every attempt ever started, retries and rescues included
    rescues: int
    oldest_runnable_age: float | None  # seconds the oldest runnable node has waited


@dataclass(frozen=True)
class ActivitySlice:
    """Runs that ended in one slice of time: ``start`` and ``end`` in seconds since the epoch."""

    start: float
    end: float
    completed: int
    failed: int


@dataclass(frozen=True)
class Overview:
    """The dashboard's overview; times by the database clock."""

    now: float
    runs_by_status: dict[str, int]  # PENDING and RUNNING: all; the others: finished_within
    finished_within: float
    open_steps_by_queue: dict[str, dict[str, int]]  # queue -> PENDING/RUNNING -> count
    runnable_by_queue: dict[str, int]  # steps PENDING and due now
    oldest_runnable_age: float | None  # seconds the longest-waiting runnable step has waited
    slices: tuple[ActivitySlice, ...]  # runs completed and failed, oldest slice first


@dataclass(frozen=True)
class RunLink:
    """Another run, as a link: its tracking_id, and the step that started the subflow."""

    tracking_id: str
    flow_name: str
    step_name: str


@dataclass(frozen=True)
class SubflowLinks:
    parent: RunLink | None  # the run whose step started this one
    children: tuple[RunLink, ...]  # runs started by this run's steps (step_name: this run's)


@dataclass(frozen=True)
class FailureGroup:
    """Failed steps with the same flow, step and error message (the error's last line)."""

    flow_name: str
    step_name: str
    message: str
    count: int
    first_at: float  # when the oldest of them finished (seconds since the epoch)
    last_at: float
    tracking_ids: tuple[str, ...]  # a few of the runs, newest first

"""The engine's nouns: run, step and attempt statuses, and the small frozen records
the storage hands out and takes in.

The ground floor: the state machine's rules (progress.py), every storage and
the tools above them import these; this module imports nothing of ours but the
plan's shape (plan.py), so no import ever runs back up to it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from flowsmith_worker.plan import Plan


class FlowStatus(StrEnum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    # A step failed it for good: its completed steps' compensations run, then it
    # ends FAILED (see compensation.py).
    COMPENSATING = "COMPENSATING"
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
    # A node of a run waiting for a place under its concurrency key (concurrency.py):
    # never claimed; PENDING when the run gets its place.
    BLOCKED = "BLOCKED"
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
    # A sleep or a wait for an event that was not over: the node was parked
    # PENDING until its wake time (see parking.py) and runs again then.
    PARKED = "PARKED"


DEFAULT_QUEUE = "default"
RESCUE_ERROR = "lease expired: worker lost"
# The run span's W3C traceparent (tracing.py) is kept in the stored input under this key
# until the schema has a column for it: the storage takes it out of every input it
# reads, so ctx.data, `flowsmith status` and a run's output never see it.
TRACE_PARENT_KEY = "flowsmith.traceparent"


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
    # The W3C traceparent of the run's span (tracing.py); None when the enqueuing
    # process does not trace.
    trace_parent: str | None = None
    # At most ``max_concurrent`` runs of this flow with this key in flight at once
    # (concurrency.py); None: no limit.
    concurrency_key: str | None = None
    max_concurrent: int | None = None


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
    # The traceparent stored with the run: its attempts' spans are children of it.
    trace_parent: str | None = None

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
class Woken:
    """park_node's answer when the sleep or wait is over: the node is still RUNNING
    under its lease, and the attempt completes it as any step's."""

    by_event: bool  # False: its time came (a sleep's end, a wait's timeout)
    event_payload: str | None = None  # the event's payload as stored (JSON text)


@dataclass(frozen=True)
class Parked:
    """park_node's answer when the node waits on: ``status`` is what it became
    (PENDING until ``until``; CANCELLED if its run was over)."""

    until: float
    status: NodeStatus


@dataclass(frozen=True)
class EventSent:
    """send_event's answer: ``delivered`` is False when the same idempotency key
    had already sent it (nothing was written); ``woke`` when a parked wait was woken."""

    tracking_id: str
    name: str
    delivered: bool
    woke: bool


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
    # The run's concurrency key (None: none), and its turn under it: see
    # concurrency.py (None: holds no place, IN_FLIGHT, or waiting since then).
    concurrency_key: str | None = None
    key_turn: float | None = None


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
    # A parked sleep or wait: when it wakes if nothing comes first (parking.FOREVER:
    # a wait with no timeout). None for every other node.
    wake_at: float | None = None
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

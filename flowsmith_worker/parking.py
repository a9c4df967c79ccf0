"""Parked nodes: a durable sleep, and a wait for an event, decided purely.

Design (issue 14, points 1 and 2). A sleep (``flow.sleep``) and a wait for an
event (``flow.wait_for``) are steps of the plan (PlannedStep.kind) whose node
is PARKED while it waits: PENDING, with ``run_after`` at its wake time and
``fs_nodes.wake_at`` saying it is parked. It holds no slot, no thread and no
lease; the claim needs nothing new (a PENDING node is claimed once its
``run_after`` has passed, by the database clock), a cancel or a failure of the
run ends it as any PENDING node, and a worker restart cannot lose it: it is a
row. Each time the node is claimed, the worker asks the storage (park_node, one
transaction under the run's lock) and the storage asks ``decide`` here:

* its event is stored (fs_events): it is Woken, and the attempt completes the
  step with the event's payload as output, through the usual fenced write;
* its time has come (the sleep is over, the wait timed out): Woken too; a sleep's
  output is None, a timed-out wait fails or outputs its ``on_timeout`` value;
* else it is parked (again) until its wake time, as a Retry that gives its
  attempt back (``park``): the attempt it leaves is kept as PARKED, so the trace
  shows when it went to sleep and when it woke.

An event is stored by send_event in one transaction under the run's lock:
fs_events is keyed by (run, name), so an event sent before the run reaches its
wait is kept and found there, and the same idempotency key sent twice stores it
once. The same transaction makes a parked wait of that name due at once
(``run_after`` = now), so it is claimed within a poll interval (at once where
the database notifies). Because park_node takes the same lock, an event cannot
slip between a wait's look for it and its parking.

``wake_at`` is set by the first parking and kept while the node waits, so a
sleep of N seconds wakes N seconds after it began however often it is claimed;
a retry of the run (``flowsmith retry``) clears it, so a wait that timed out
waits afresh.

Shown: `flowsmith status` and the dashboard say SLEEPING or AWAITING_EVENT
(``parked_as``) with the wake time (``wakes_at``); run.trace() has
``NodeRecord.wake_at`` and the PARKED attempts.

Not yet (next): the torture model (tests/torture/model.py) knows no parked
step; each parking gives its attempt back, so ATTEMPTS reads 1/2 for a step
parked once.

Must never do I/O (as progress.py): every input is a plain value.
"""

from __future__ import annotations

from dataclasses import dataclass

from flowsmith_worker import progress
from flowsmith_worker.plan import WAIT_FOR_EVENT
from flowsmith_worker.records import AttemptOutcome, FlowRecord, NodeRecord, NodeStatus

# The wake time of a wait with no timeout: 9999-12-31T23:59:59Z. A real instant
# (not NULL), so the claim's due-time condition needs no special case.
FOREVER = 253402300799.0

# What the operator tools show as the status of a parked node (a PENDING row).
SLEEPING = "SLEEPING"
AWAITING_EVENT = "AWAITING_EVENT"


@dataclass(frozen=True)
class Wake:
    """The sleep or the wait is over."""

    by_event: bool  # its event came; False: its time came


@dataclass(frozen=True)
class Park:
    """The node waits on, until ``until`` (seconds since the epoch, database clock)."""

    until: float


def deadline(now: float, seconds: float | None, until: float | None) -> float:
    """When a node parked for the first time at ``now`` wakes if nothing comes first."""
    if until is not None:
        return until
    if seconds is not None:
        return now + seconds
    return FOREVER


def decide(
    *, now: float, wake_at: float | None, first_deadline: float, event_came: bool
) -> Wake | Park:
    """Whether a claimed sleep or wait is over.

    ``wake_at`` is the node's stored wake time (None: it was never parked),
    ``first_deadline`` the wake time it gets if it is parked now for the first time.
    """
    if event_came:
        return Wake(by_event=True)
    wakes = first_deadline if wake_at is None else wake_at
    if wakes <= now:
        return Wake(by_event=False)
    return Park(wakes)


def park(run: str, *, now: float, until: float) -> progress.Fate:
    """The fate of a node parked until ``until``: it runs again then, its attempt given
    back (parking is not a failure); a run that is over starts nothing more."""
    return progress.end_of_over_run(run) or progress.Retry(
        delay=until - now, gives_back_attempt=True, superseded_as=AttemptOutcome.PARKED
    )


def parked_as(flow: FlowRecord, node: NodeRecord) -> str | None:
    """The status `flowsmith status` and the dashboard show for a parked node: SLEEPING,
    or AWAITING_EVENT for a wait_for step (its event has the step's name); None for a
    node that is not parked."""
    if node.status != NodeStatus.PENDING or node.wake_at is None:
        return None
    planned = flow.plan.step(node.step_name)
    return AWAITING_EVENT if planned and planned.kind == WAIT_FOR_EVENT else SLEEPING


def wakes_at(node: NodeRecord) -> float | None:
    """When a parked node wakes if nothing comes first (a sleep's end, a wait's
    timeout); None if it is not parked or waits with no timeout."""
    if node.wake_at is None or node.wake_at >= FOREVER:
        return None
    return node.wake_at

"""How a run moves on: every decision about it, pure, shared by every storage.

A storage locks the run, reads the plain values a decision needs (statuses,
counts), asks one of these functions, and carries out the answer with fenced
writes. Nothing here touches a database, so each rule has one definition, unit
tested on its own (tests/unit/test_progress.py):

* ``after_stage`` and ``chained_step``: what comes after a stage, and whether
  the worker that finished it runs the next step itself (chaining);
* ``after_failure`` / ``after_subflow_failed``: retry or fail (or end CANCELLED);
* ``after_lost_lease``: a rescue; ``after_release``: a node handed back;
* ``end_of_over_run``: what a run that is over does to a node that would run;
* ``cancellable``, ``ENDED_BY_CANCEL``: a cancel; ``RESUMED_ON_RETRY``,
  ``max_attempts_on_retry``: a retry of a FAILED run;
* the errors written into rows, each defined once;
* ``Retry.superseded_as`` and ``attempts_of``: an attempt's history (below).

Attempt history. A node's row describes its latest attempt. When the node
runs again without having ended (every Retry: a failure retried, a lost
worker, a release, a failed subflow), the attempt it leaves behind is recorded
apart, as ``Retry.superseded_as`` says, in the transaction of the write that
retries it. A step that succeeds at once records nothing apart; ``attempts_of``
merges what was recorded with what the node's row says.

The decision about a stage needs statuses only, never payloads: finishing one
sibling of a wide parallel group must not read every sibling's input and output.

A run's status is passed as stored (``str``): a status this version does not
know is a run that is not over, as the storages always treated it.

``context_data`` is the one definition of ctx.data: the run's input plus the
outputs of the steps that completed before, in plan order.

Must never do I/O: no database, no clock, no log, no randomness. Every input is a
plain value passed in, so each rule is one pure function that a table of cases pins.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, ClassVar

from flowsmith_worker.plan import Plan, PlannedStep
from flowsmith_worker.records import (
    RESCUE_ERROR,
    AttemptOutcome,
    AttemptRecord,
    FlowStatus,
    NodeRecord,
    NodeStatus,
)

DONE = frozenset({NodeStatus.COMPLETED, NodeStatus.SKIPPED})


@dataclass(frozen=True)
class StageNode:
    step_name: str
    status: NodeStatus


@dataclass(frozen=True)
class Wait:
    """Some node of the stage is not done yet: only its last sibling advances."""


@dataclass(frozen=True)
class StartStage:
    position: int
    steps: tuple[PlannedStep, ...]


@dataclass(frozen=True)
class FinishFlow:
    """Every stage is done: the run is COMPLETED."""


Decision = Wait | StartStage | FinishFlow


def context_data(
    run_input: Mapping[str, Any], outputs: Iterable[tuple[str, Any]]
) -> dict[str, Any]:
    """ctx.data: the run's input plus each ``(step_name, output)``, in plan order.

    ``outputs`` are those of the COMPLETED steps of the stages before: a skipped
    step leaves no output behind, and a later step's output replaces an input
    key of the same name, as it always did.
    """
    data = dict(run_input)
    for step_name, output in outputs:
        data[step_name] = output
    return data


def after_stage(plan: Plan, position: int, nodes: Sequence[StageNode]) -> Decision:
    """What to do now that a node of stage ``position`` finished."""
    if len(nodes) < len(plan.stage(position)) or any(n.status not in DONE for n in nodes):
        return Wait()
    if plan.is_last(position):
        return FinishFlow()
    return StartStage(position + 1, plan.stage(position + 1))


def chained_step(finished_stage: Sequence[StageNode], start: StartStage) -> PlannedStep | None:
    """The step that the worker which finished ``finished_stage`` runs next itself, if any.

    Only a step alone in its stage followed by a step alone in its stage is
    chained. A parallel group is not: the worker finishing its last sibling
    does not hold the other siblings' outputs, and a group after a step should
    fan out to every idle worker.
    """
    if len(finished_stage) == 1 and len(start.steps) == 1:
        return start.steps[0]
    return None


def attempts_left(attempt: int, max_attempts: int) -> bool:
    return attempt < max_attempts


# -- what becomes of a node --------------------------------------------------------

# The error of a node that a failure of its run stopped before it could run (again).
STOPPED_BY_FAILURE = (
    "stopped: another step failed this run, so this one was not run (again); "
    "`flowsmith retry` (or triggering the run again) runs it"
)


class Ending(StrEnum):
    """Why a node runs no more."""

    FAILED = "failed"  # its attempt failed, with no retry left (or none wanted)
    CANCELLED = "cancelled"  # its run was cancelled
    # Another step failed its run: it ends CANCELLED, STOPPED_BY_FAILURE is
    # appended to its error, and a retry of the run runs it again.
    STOPPED = "stopped"

    @property
    def status(self) -> NodeStatus:
        return NodeStatus.FAILED if self is Ending.FAILED else NodeStatus.CANCELLED


@dataclass(frozen=True)
class Retry:
    """The node runs again: PENDING, runnable ``delay`` seconds from now."""

    error: str | None = None  # recorded on the node; None keeps the node's error
    delay: float = 0.0
    # Not the step's fault (a release, a lost worker): the attempt keeps its
    # number, the fencing token, but does not count against max_attempts.
    gives_back_attempt: bool = False
    # How the attempt this retry leaves behind is recorded (with ``error``).
    superseded_as: AttemptOutcome = AttemptOutcome.FAILED

    status: ClassVar[NodeStatus] = NodeStatus.PENDING


@dataclass(frozen=True)
class End:
    """The node runs no more."""

    ending: Ending
    error: str | None = None  # the attempt's error; None keeps the node's error
    fails_run: bool = False  # the run, not over yet, fails with ``error``
    # With fails_run: whether the run's compensations (if its plan has any) undo its
    # completed steps. False for a step missing from the worker's code: that is no
    # failure of the run's work but a deploy, and a compensated run could never be
    # retried once the old code is back (issue 14.7).
    compensates: bool = True

    def __post_init__(self) -> None:
        if self.fails_run and (self.ending is not Ending.FAILED or self.error is None):
            raise ValueError("only a FAILED node, with its error, fails its run")

    @property
    def status(self) -> NodeStatus:
        return self.ending.status

    @property
    def run_error(self) -> str | None:
        """The error the run fails with; None if the run does not fail."""
        return self.error if self.fails_run else None


Fate = Retry | End

# A run that is over starts nothing more, and keeps its status and its first
# error. (A COMPLETED run has no node left that could run, fail or be rescued.)
OVER = frozenset({FlowStatus.FAILED, FlowStatus.CANCELLED})


def is_over(run: str) -> bool:
    return run in OVER


def end_of_over_run(run: str, error: str | None = None) -> End | None:
    """How a node that would run (again) ends because its run is over; None if it is not.

    A cancel's nodes end CANCELLED. A failure's nodes are stopped, so that a
    retry of the run (RESUMED_ON_RETRY) runs them again.
    """
    if run == FlowStatus.CANCELLED:
        return End(Ending.CANCELLED, error)
    if run == FlowStatus.FAILED:
        return End(Ending.STOPPED, error)
    return None


def after_failure(
    run: str,
    *,
    error: str,
    attempt: int,
    max_attempts: int,
    retry_delay: float | None,
    compensates: bool = True,
) -> Fate:
    """What becomes of a node whose attempt failed; ``retry_delay`` None: no retry wanted;
    ``compensates`` False: a run this failure fails runs no compensation (End.compensates).

    A cancelled run goes no further: the node ends CANCELLED and the run stays
    CANCELLED. A run that another step failed records this failure too, but
    retries nothing and keeps its first error. Otherwise the node retries while
    it has attempts left, and else fails, failing its run.
    """
    if run == FlowStatus.CANCELLED:
        return End(Ending.CANCELLED, error)
    if run == FlowStatus.FAILED:
        return End(Ending.FAILED, error)
    if retry_delay is not None and attempts_left(attempt, max_attempts):
        return Retry(error, retry_delay)
    return End(Ending.FAILED, error, fails_run=True, compensates=compensates)


def after_subflow_failed(parent_run: str, *, error: str, attempt: int, max_attempts: int) -> Fate:
    """What becomes of a WAITING subflow node whose child run failed or was cancelled.

    It is a failure of the subflow step: with attempts left (and its run not
    over) the step runs again at once, as the child had its own backoff, and
    its function's tracking_id resumes this same child.
    """
    return after_failure(
        parent_run, error=error, attempt=attempt, max_attempts=max_attempts, retry_delay=0.0
    )


def after_release(run: str) -> Fate:
    """What becomes of a RUNNING node its worker hands back unfinished (it is stopping).

    That is not the step's fault: its attempt is given back. A node of a run
    that is over is handed to no one.
    """
    return end_of_over_run(run) or Retry(
        gives_back_attempt=True, superseded_as=AttemptOutcome.RELEASED
    )


def after_lost_lease(run: str, *, step_name: str, rescues: int, max_rescues: int) -> Fate:
    """What becomes of a node whose worker was lost (its lease expired).

    ``rescues`` counts the node's earlier rescues. A lost worker is not the step's
    fault: the node runs again without using up a retry, up to ``max_rescues``
    times, so a step that kills its worker every time still ends. A run that is
    over (cancelled, or failed by another step) starts nothing more.
    """
    if run == FlowStatus.CANCELLED:
        return End(Ending.CANCELLED, RESCUE_ERROR)
    if rescues >= max_rescues:
        error = rescue_limit_error(step_name, rescues + 1, max_rescues)
        return End(Ending.FAILED, error, fails_run=not is_over(run))
    return end_of_over_run(run, RESCUE_ERROR) or Retry(
        RESCUE_ERROR, gives_back_attempt=True, superseded_as=AttemptOutcome.RESCUED
    )


def rescue_limit_error(step_name: str, lost: int, max_rescues: int) -> str:
    """The error of a step failed because its worker was lost once more than max_rescues."""
    return (
        f"{RESCUE_ERROR} {lost} times running step {step_name!r} (max_rescues={max_rescues}): "
        "the step kept killing its worker (or holding it past its lease), so it is not run "
        "again; fix the step, then `flowsmith retry` the run (which gives the step its "
        "rescues again; max_rescues itself is kept in the run's stored plan)"
    )


def subflow_failed_error(tracking_id: str, flow_name: str, error: str) -> str:
    """The error of a subflow step (and of its run) whose child run failed with ``error``."""
    return f"subflow {tracking_id!r} ({flow_name}) failed:\n{error}"


def subflow_cancelled_error(tracking_id: str, flow_name: str) -> str:
    """The error of a subflow step (and of its run) whose child run was cancelled."""
    return f"subflow {tracking_id!r} ({flow_name}) was cancelled"


# The nodes a run's failure stops at once: those waiting to run (queued
# siblings, scheduled retries), so that the claim need not read runs. A RUNNING
# node ends when its attempt reports, a WAITING one when its child run does.
STOPPED_BY_RUN_FAILURE = frozenset({NodeStatus.PENDING, NodeStatus.BLOCKED})


# -- cancel and retry of a run -----------------------------------------------------

# The nodes a cancel ends at once: those waiting to run, and those waiting for
# a subflow (whose child is cancelled with them). A RUNNING node ends when its
# attempt reports (see after_failure; a completion does not move the run on).
ENDED_BY_CANCEL = frozenset({NodeStatus.PENDING, NodeStatus.WAITING, NodeStatus.BLOCKED})


def cancellable(run: str) -> bool:
    """A COMPLETED or FAILED run cannot be cancelled; cancelling a CANCELLED one changes nothing.

    Nor can a COMPENSATING one: stopping its compensations halfway would leave it
    half undone (see compensation.py)."""
    return run not in (FlowStatus.COMPLETED, FlowStatus.FAILED, FlowStatus.COMPENSATING)


# What resuming a FAILED run re-queues: its failed nodes and those its failure
# stopped. In a FAILED run a CANCELLED node is one of the latter: a cancel makes
# the run CANCELLED, and a CANCELLED run is never resumed.
RESUMED_ON_RETRY = frozenset({NodeStatus.FAILED, NodeStatus.CANCELLED})


def max_attempts_on_retry(attempt: int, planned: PlannedStep | None) -> int:
    """A resumed node's new max_attempts: its step's allowance again, on top of the
    attempts already made (``attempt`` keeps counting up: it is the fencing
    token). A step no longer in the run's plan gets one attempt."""
    return attempt + allowance_on_retry(planned)


def allowance_on_retry(planned: PlannedStep | None) -> int:
    """How many attempts a resumed node gets on top of those it made (see above)."""
    return planned.max_attempts if planned is not None else 1


# -- the history of a node's attempts ---------------------------------------------

# What the node's row says of its latest attempt, by the node's status. PENDING
# is absent: a node waiting to run again left its attempt to the history.
_OUTCOME_OF_STATUS = {
    NodeStatus.RUNNING: AttemptOutcome.RUNNING,
    NodeStatus.WAITING: AttemptOutcome.WAITING,
    NodeStatus.COMPLETED: AttemptOutcome.COMPLETED,
    NodeStatus.SKIPPED: AttemptOutcome.SKIPPED,
    NodeStatus.FAILED: AttemptOutcome.FAILED,
    NodeStatus.CANCELLED: AttemptOutcome.CANCELLED,
}
_ENDED_WITH_ERROR = frozenset({NodeStatus.FAILED, NodeStatus.CANCELLED})


def attempts_of(node: NodeRecord, recorded: Sequence[AttemptRecord]) -> tuple[AttemptRecord, ...]:
    """Every attempt of ``node``, oldest first: the ``recorded`` ones (superseded), then
    the latest, as the node's row describes it, unless it was recorded too."""
    ordered = sorted(recorded, key=lambda a: a.attempt)
    latest = unrecorded_attempt(node, ordered)
    return tuple(ordered) if latest is None else (*ordered, latest)


def unrecorded_attempt(node: NodeRecord, recorded: Sequence[AttemptRecord]) -> AttemptRecord | None:
    """The attempt the node's row describes, unless ``recorded`` (oldest first) holds it.

    None too if the node never started an attempt, or waits to run again
    (PENDING): its latest attempt is then in the history. The row keeps the
    error of an earlier attempt until a later one writes its own: a FAILED
    attempt always writes its own (the same text as the attempt before, if the
    step failed the same way), a CANCELLED one may not (a cancel while it waited
    for its subflow), so its error is the row's unless that is the error kept
    for the attempt before. A running or successful attempt has no error.
    """
    outcome = _OUTCOME_OF_STATUS.get(node.status)
    if outcome is None or node.attempt < 1 or node.started_at is None:
        return None
    if any(a.attempt == node.attempt for a in recorded):
        return None
    error = node.error if node.status in _ENDED_WITH_ERROR else None
    if node.status == NodeStatus.CANCELLED and recorded and error == recorded[-1].error:
        error = None
    running = node.status in (NodeStatus.RUNNING, NodeStatus.WAITING)
    return AttemptRecord(
        node_id=node.id,
        flow_id=node.flow_id,
        step_name=node.step_name,
        attempt=node.attempt,
        worker_id=node.lease_owner,
        started_at=node.started_at,
        ended_at=None if running else node.finished_at,
        outcome=outcome,
        error=error,
    )

"""Compensations (sagas): undoing a failed run's completed steps, decided purely.

Design (issue 14, point 4). ``flow.step("create_payment", fn, compensate=refund)``
(or ``@step(compensate=refund)``) gives a step a compensation: a function of ctx,
plain or ``async def``, that undoes what the step did.

Stored as steps. The plan records, per step, how many attempts its compensation
has (``PlannedStep.compensation_attempts``, 0: none), so any worker knows what
a run needs undone without its code. When a run fails for good (no retry or
rescue left), the transaction that fails it makes it COMPENSATING instead of
FAILED if its plan has compensations, and inserts the first compensation node:
an ordinary PENDING node named ``compensate:<step>`` (COMPENSATE_PREFIX),
claimed, leased, retried, rescued, released and fenced exactly like a step. The
hot path gains nothing: a run without compensations in its plan fails as before.

One at a time, in reverse plan order. Each time a node of a COMPENSATING run
ends, ``next_move`` looks at the run's nodes (statuses only) and says what comes
next: wait while a step or a compensation is still in flight (a parallel
sibling still running when its sibling failed the run: it may complete, and is
then compensated too), else start the compensation of the last COMPLETED step
not yet compensated, else finish: the run ends FAILED. Reverse plan order is the
reverse completion order of every pair of steps where one came after the other;
siblings of a parallel group ran together, so no order between them means
anything, and plan order makes the sequence the same on every backend.

Failures continue. A compensation has its own ``retries`` (the step's by
default). One that fails for good is recorded FAILED and the next one runs all
the same (Temporal's and the saga pattern's practice: undo as much as can be
undone, and report what could not).

The outcome is derived, not stored: the run ends FAILED (every reader of FAILED
runs, `flowsmith failures`, stats, alerts and a parent step, sees it as before)
and ``outcome`` reads its compensation nodes: COMPENSATED when every one
completed, COMPENSATION_FAILED when one failed, None when the run had nothing to
undo. One truth, which cannot disagree with the nodes it sums up, and no schema
change. `flowsmith status` shows it on the Status line (and ``compensation`` in
--json), each compensation as a step row with its attempts; run.trace() lists
the compensation nodes after the steps.

ctx of a compensation: ``ctx.step`` is its node's name, ``ctx.data`` the run's
input and the outputs of its completed steps (``ctx.data["create_payment"]`` is
what the step returned), plus those of the compensations that ran before it.

A parent waits. A subflow whose run fails tells its parent step when its
compensations have ended, so the parent's own compensations run after the
child's. A subflow step itself takes no ``compensate=``: its child run undoes its
own steps when it fails, and a completed child is undone by compensations of the
steps after it in the parent, or of the child's steps, as the author decides.

Cancel and retry. A cancel runs no compensation (it is an operator's order to
stop now, not a failure), and a COMPENSATING run cannot be cancelled: stopping
halfway would leave the run half undone. A FAILED run whose compensations ran
cannot be retried or triggered again (``flowsmith retry`` refuses): its completed
steps were undone, and resuming at the failed step would build on work that is
gone; a new run (a new tracking_id) starts from the beginning.

Not yet (next): the torture model (tests/torture/model.py) knows no compensation;
the demo's order flow (examples/orders.py) has none; a worker of an older version
cannot read the COMPENSATING status (deploy this one everywhere before flows use
``compensate=``).

Must never do I/O (as progress.py): every input is a plain value.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from flowsmith_worker.plan import Plan, PlannedStep
from flowsmith_worker.records import FlowStatus, NodeRecord, NodeStatus

COMPENSATE_PREFIX = "compensate:"
# A step still at work: its outcome decides whether it needs undoing.
_IN_FLIGHT = frozenset({NodeStatus.PENDING, NodeStatus.RUNNING, NodeStatus.WAITING})


class Compensation(StrEnum):
    """How a failed run's compensations ended."""

    COMPENSATED = "COMPENSATED"  # every one completed
    COMPENSATION_FAILED = "COMPENSATION_FAILED"  # one or more failed for good


def node_name(step_name: str) -> str:
    """The name of the node that compensates ``step_name``."""
    return COMPENSATE_PREFIX + step_name


def is_compensation(node_name_: str) -> bool:
    return node_name_.startswith(COMPENSATE_PREFIX)


def compensated_step(node_name_: str) -> str:
    """The step a compensation node undoes."""
    return node_name_.removeprefix(COMPENSATE_PREFIX)


def as_seen_by(run: str, node_name_: str) -> str:
    """The run's status as progress.py's rules must see it for this node.

    A COMPENSATING run is running for its compensations (they retry, are rescued,
    fail it), and failed for its steps (a sibling still running when the run
    failed ends as in a FAILED run: nothing is retried or started again).
    """
    if run == FlowStatus.COMPENSATING and is_compensation(node_name_):
        return FlowStatus.RUNNING
    return as_seen_by_a_step(run)


def as_seen_by_a_step(run: str) -> str:
    """as_seen_by for a node known to be a step (a subflow's, a parallel sibling's)."""
    return FlowStatus.FAILED if run == FlowStatus.COMPENSATING else run


@dataclass(frozen=True)
class NodeState:
    step_name: str
    status: NodeStatus


@dataclass(frozen=True)
class Wait:
    """A step or a compensation is still at work: the next one waits for it."""


@dataclass(frozen=True)
class Start:
    """Insert the node ``name`` (PENDING) at ``position``, with ``max_attempts``."""

    name: str
    position: int
    max_attempts: int


@dataclass(frozen=True)
class Finish:
    """Nothing is left to undo: the run ends FAILED, its compensations' outcome ``outcome``."""

    outcome: Compensation | None


Move = Wait | Start | Finish


def next_move(plan: Plan, nodes: Sequence[NodeState]) -> Move:
    """What a COMPENSATING run does now that one of its nodes ended."""
    compensations = [n for n in nodes if is_compensation(n.step_name)]
    if any(n.status in _IN_FLIGHT for n in nodes):
        return Wait()
    undone = {compensated_step(n.step_name) for n in compensations}
    completed = {n.step_name for n in nodes if n.status == NodeStatus.COMPLETED}
    for planned in reversed(_compensable(plan)):
        if planned.name in completed and planned.name not in undone:
            # After every stage, in the order they start: ctx.data of each holds
            # the outputs of all the steps and of the compensations before it.
            # (One stage apart from the last step's: a replayed write of that step
            # looks for its chained successor at its position + 1.)
            position = len(plan.stages) + 1 + len(compensations)
            return Start(node_name(planned.name), position, planned.compensation_attempts)
    return Finish(outcome([n.status for n in compensations]))


def outcome(statuses: Sequence[NodeStatus]) -> Compensation | None:
    """The outcome of compensations that ended with ``statuses`` (None: there were none)."""
    if not statuses:
        return None
    if all(s == NodeStatus.COMPLETED for s in statuses):
        return Compensation.COMPENSATED
    return Compensation.COMPENSATION_FAILED


def outcome_of_run(run: str, nodes: Sequence[NodeState | NodeRecord]) -> Compensation | None:
    """What `flowsmith status` shows of a run's compensations: None while it is not
    FAILED (a COMPENSATING run says so itself) or when it had nothing to undo."""
    if run != FlowStatus.FAILED:
        return None
    return outcome([n.status for n in nodes if is_compensation(n.step_name)])


def _compensable(plan: Plan) -> list[PlannedStep]:
    """The plan's steps that have a compensation, in plan order."""
    return [planned for stage in plan.stages for planned in stage if planned.compensation_attempts]

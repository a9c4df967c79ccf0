"""How a flow moves on: pure decisions shared by every storage.

Storages lock the flow, read the statuses of one stage's nodes, ask
``after_stage`` what to do, and carry it out. The decision needs statuses only,
never payloads: finishing one sibling of a wide parallel group must not read
every sibling's input and output. Keeping the decision here, pure, means it has
one definition of "the group is done", testable without a database.

``context_data`` is the one definition of ctx.data: the run's input plus the
outputs of the steps that completed before, in plan order.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from flowsmith_worker.plan import Plan, PlannedStep
from flowsmith_worker.storage.base import RESCUE_ERROR, FlowStatus, NodeStatus

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


def attempts_left(attempt: int, max_attempts: int) -> bool:
    return attempt < max_attempts


# The error of a node that a failure of its run stopped before it could run (again).
STOPPED_BY_FAILURE = (
    "stopped: another step failed this run, so this one was not run (again); "
    "`flowsmith retry` (or triggering the run again) runs it"
)
# What resuming a FAILED run re-queues: its failed nodes and those its failure
# stopped. In a FAILED run a CANCELLED node is one of the latter: a cancel makes
# the run CANCELLED, and a CANCELLED run is never resumed.
RESUMED_ON_RETRY = frozenset({NodeStatus.FAILED, NodeStatus.CANCELLED})


def after_lost_lease(run: FlowStatus, rescues: int, max_rescues: int) -> NodeStatus:
    """What becomes of a node whose worker was lost (its lease expired).

    ``rescues`` counts the node's earlier rescues. A lost worker is not the step's
    fault: the node runs again without using up a retry, up to ``max_rescues``
    times, so a step that kills its worker every time still ends. A run that is
    over (cancelled, or failed by another step) starts nothing more.
    """
    if run == FlowStatus.CANCELLED:
        return NodeStatus.CANCELLED
    if rescues >= max_rescues:
        return NodeStatus.FAILED
    if run == FlowStatus.FAILED:
        return NodeStatus.CANCELLED
    return NodeStatus.PENDING


def rescue_limit_error(step_name: str, lost: int, max_rescues: int) -> str:
    """The error of a step failed because its worker was lost once more than max_rescues."""
    return (
        f"{RESCUE_ERROR} {lost} times running step {step_name!r} (max_rescues={max_rescues}): "
        "the step kept killing its worker (or holding it past its lease), so it is not run "
        "again; fix the step, then `flowsmith retry` the run (which gives the step its "
        "rescues again; max_rescues itself is kept in the run's stored plan)"
    )

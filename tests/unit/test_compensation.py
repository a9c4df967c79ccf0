"""compensation.py's pure rules: which compensation runs next, when a run waits,
how the outcome is read, and how a compensation is kept in the stored plan."""

from __future__ import annotations

import pytest

from flowsmith_worker import Flow, FlowStatus, NodeStatus
from flowsmith_worker.compensation import (
    Compensation,
    Finish,
    NodeState,
    Start,
    Wait,
    as_seen_by,
    next_move,
    outcome_of_run,
)
from flowsmith_worker.plan import Plan, PlannedStep

C, F, R, P, W = (
    NodeStatus.COMPLETED,
    NodeStatus.FAILED,
    NodeStatus.RUNNING,
    NodeStatus.PENDING,
    NodeStatus.WAITING,
)
# a (undo: 2 attempts), b (none), a group of g1 (undo) and g2 (undo), then d (undo).
PLAN = Plan(
    stages=(
        (PlannedStep("a", 1, compensation_attempts=2),),
        (PlannedStep("b", 1),),
        (
            PlannedStep("g1", 1, compensation_attempts=1),
            PlannedStep("g2", 1, compensation_attempts=1),
        ),
        (PlannedStep("d", 1, compensation_attempts=1),),
    )
)
AFTER_STAGES = len(PLAN.stages) + 1


def nodes(**statuses: NodeStatus) -> list[NodeState]:
    return [NodeState(name.replace("__", ":"), status) for name, status in statuses.items()]


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        # d failed: g2, then g1, then a (b has no compensation), one at a time.
        (nodes(a=C, b=C, g1=C, g2=C, d=F), Start("compensate:g2", AFTER_STAGES, 1)),
        (
            nodes(a=C, b=C, g1=C, g2=C, d=F, compensate__g2=C),
            Start("compensate:g1", AFTER_STAGES + 1, 1),
        ),
        (
            nodes(a=C, b=C, g1=C, g2=C, d=F, compensate__g2=C, compensate__g1=F),
            Start("compensate:a", AFTER_STAGES + 2, 2),
        ),
        # A compensation still at work (pending a retry, running): the next one waits.
        (nodes(a=C, b=C, g1=C, g2=C, d=F, compensate__g2=P), Wait()),
        (nodes(a=C, b=C, g1=C, g2=C, d=F, compensate__g2=R), Wait()),
        # g1 failed the run while g2 runs, or waits for its subflow: nothing starts yet.
        (nodes(a=C, b=C, g1=F, g2=R), Wait()),
        (nodes(a=C, b=C, g1=F, g2=W), Wait()),
        # g2 then completed: it is undone too; the failed g1 is not.
        (nodes(a=C, b=C, g1=F, g2=C), Start("compensate:g2", AFTER_STAGES, 1)),
        # Every one ended: the outcome.
        (nodes(a=C, b=F, compensate__a=C), Finish(Compensation.COMPENSATED)),
        (
            nodes(a=C, b=C, g1=C, g2=C, d=F, compensate__g2=C, compensate__g1=F, compensate__a=C),
            Finish(Compensation.COMPENSATION_FAILED),
        ),
        # Nothing to undo: the run ends FAILED with no outcome.
        (nodes(a=F), Finish(None)),
    ],
)
def test_next_move(state: list[NodeState], expected: object) -> None:
    """Reverse plan order, one at a time, after every step in flight ended; a failed
    compensation does not stop the others; the outcome sums them up."""
    assert next_move(PLAN, state) == expected


def test_a_compensating_run_is_running_for_its_compensations_and_failed_for_its_steps() -> None:
    """progress.py's rules see a COMPENSATING run as RUNNING for a compensation node
    (it retries, is rescued) and as FAILED for a step (nothing starts again)."""
    assert as_seen_by(FlowStatus.COMPENSATING, "compensate:a") == FlowStatus.RUNNING
    assert as_seen_by(FlowStatus.COMPENSATING, "a") == FlowStatus.FAILED
    assert as_seen_by(FlowStatus.RUNNING, "a") == FlowStatus.RUNNING
    assert as_seen_by(FlowStatus.CANCELLED, "compensate:a") == FlowStatus.CANCELLED


def test_the_outcome_is_read_only_of_a_failed_run() -> None:
    """A COMPENSATING run has no outcome yet; a FAILED one has that of its compensations."""
    undone = nodes(a=C, b=F, compensate__a=C)
    assert outcome_of_run(FlowStatus.COMPENSATING, undone) is None
    assert outcome_of_run(FlowStatus.FAILED, undone) == Compensation.COMPENSATED
    assert outcome_of_run(FlowStatus.FAILED, nodes(a=C, b=F)) is None


def test_the_plan_keeps_each_compensations_attempts_and_old_plans_their_version() -> None:
    """A step's compensation is stored in the plan as its attempts (retries + 1, the
    step's retries by default), survives the JSON round trip, and changes the version;
    a plan without compensations is stored, and versioned, exactly as before."""

    def undo(_ctx: object) -> None:
        pass

    flow = Flow("compensation_plan_unit")
    flow.step("a", lambda ctx: 1, retries=2, compensate=undo)
    flow.step("b", lambda ctx: 1, compensate=undo, compensate_retries=0)
    flow.step("c", lambda ctx: 1)
    plan = flow.plan()
    assert [s.compensation_attempts for stage in plan.stages for s in stage] == [3, 1, 0]
    assert Plan.from_json(plan.to_json()) == plan and plan.compensates
    bare = Plan(stages=tuple((PlannedStep(s.name, s.max_attempts),) for s in plan.stages[0]))
    assert "compensation" not in bare.to_json() and not bare.compensates
    assert (
        plan.version
        != Plan(
            stages=tuple(
                tuple(PlannedStep(s.name, s.max_attempts) for s in st) for st in plan.stages
            )
        ).version
    )
    spec = flow.get_step("compensate:a")
    assert spec is not None and spec.fn is undo and spec.max_attempts == 3
    assert flow.get_step("compensate:c") is None

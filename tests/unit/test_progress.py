"""The decisions about a run, on their own: pure functions, no database.

Each storage reads the plain values a decision needs, asks flowsmith_worker.progress,
and carries out the answer (the contract suite proves it does, on every backend).
These tables pin every branch of every decision: what comes after a stage, chaining,
retry or fail, the end of a node whose run is over, release, rescue, cancel and retry
of a run, and the errors written into rows.
"""

from __future__ import annotations

import pytest

from flowsmith_worker.plan import Plan, PlannedStep
from flowsmith_worker.progress import (
    STOPPED_BY_FAILURE,
    End,
    Ending,
    FinishFlow,
    Retry,
    StageNode,
    StartStage,
    Wait,
    after_failure,
    after_lost_lease,
    after_release,
    after_stage,
    after_subflow_failed,
    attempts_left,
    attempts_of,
    cancellable,
    chained_step,
    context_data,
    end_of_over_run,
    is_over,
    max_attempts_on_retry,
    rescue_limit_error,
    subflow_cancelled_error,
    subflow_failed_error,
)
from flowsmith_worker.storage.base import (
    RESCUE_ERROR,
    AttemptOutcome,
    AttemptRecord,
    FlowStatus,
    NodeRecord,
    NodeStatus,
)

A, B, C, D = (PlannedStep(name, 1) for name in "abcd")
# a, then the parallel group (b, c), then d
PLAN = Plan(stages=((A,), (B, C), (D,)))
# A status that this version does not know, as a corrupt or newer row may hold.
UNKNOWN = "EXPLODED"
NOT_OVER = [FlowStatus.PENDING, FlowStatus.RUNNING, FlowStatus.COMPLETED, UNKNOWN]


def nodes(**statuses: NodeStatus) -> list[StageNode]:
    return [StageNode(name, status) for name, status in statuses.items()]


# -- what comes after a stage ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("position", "stage", "expected"),
    [
        (0, nodes(a=NodeStatus.COMPLETED), StartStage(1, (B, C))),
        (0, nodes(a=NodeStatus.SKIPPED), StartStage(1, (B, C))),
        (1, nodes(b=NodeStatus.COMPLETED, c=NodeStatus.SKIPPED), StartStage(2, (D,))),
        (1, nodes(b=NodeStatus.COMPLETED, c=NodeStatus.RUNNING), Wait()),
        (1, nodes(b=NodeStatus.COMPLETED, c=NodeStatus.WAITING), Wait()),
        (1, nodes(b=NodeStatus.COMPLETED, c=NodeStatus.FAILED), Wait()),
        (1, nodes(b=NodeStatus.COMPLETED), Wait()),  # c's node is not there yet
        (2, nodes(d=NodeStatus.COMPLETED), FinishFlow()),
        (2, nodes(d=NodeStatus.SKIPPED), FinishFlow()),
        (2, nodes(d=NodeStatus.PENDING), Wait()),
    ],
)
def test_after_stage(position: int, stage: list[StageNode], expected: object) -> None:
    """A stage moves the run on only when all of its nodes exist and are COMPLETED or
    SKIPPED; then the next stage starts, or the run finishes after the last one."""
    assert after_stage(PLAN, position, stage) == expected


@pytest.mark.parametrize(
    ("finished", "start", "expected"),
    [
        (nodes(a=NodeStatus.COMPLETED), StartStage(1, (D,)), D),
        (nodes(a=NodeStatus.SKIPPED), StartStage(1, (D,)), D),
        (nodes(a=NodeStatus.COMPLETED), StartStage(1, (B, C)), None),  # a fan-out
        (nodes(b=NodeStatus.COMPLETED, c=NodeStatus.COMPLETED), StartStage(2, (D,)), None),
    ],
)
def test_chained_step(
    finished: list[StageNode], start: StartStage, expected: PlannedStep | None
) -> None:
    """Only a step alone in its stage, followed by a step alone in its stage, is chained
    to the worker that finished it; a parallel group on either side is not."""
    assert chained_step(finished, start) == expected


# -- retry or fail --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attempt", "max_attempts", "left"), [(1, 1, False), (1, 3, True), (3, 3, False), (4, 3, False)]
)
def test_attempts_left(attempt: int, max_attempts: int, left: bool) -> None:
    """A node has attempts left while its attempt number is below max_attempts."""
    assert attempts_left(attempt, max_attempts) is left


@pytest.mark.parametrize(
    ("run", "attempt", "max_attempts", "retry_delay", "expected"),
    [
        (FlowStatus.RUNNING, 1, 3, 2.5, Retry("boom", 2.5)),
        (FlowStatus.RUNNING, 1, 3, 0.0, Retry("boom", 0.0)),
        (FlowStatus.PENDING, 1, 2, 1.0, Retry("boom", 1.0)),
        (UNKNOWN, 1, 2, 1.0, Retry("boom", 1.0)),
        (FlowStatus.RUNNING, 3, 3, 2.5, End(Ending.FAILED, "boom", fails_run=True)),
        (FlowStatus.RUNNING, 1, 3, None, End(Ending.FAILED, "boom", fails_run=True)),
        (UNKNOWN, 1, 3, None, End(Ending.FAILED, "boom", fails_run=True)),
        # A run another step failed: recorded, not retried, and the run keeps its error.
        (FlowStatus.FAILED, 1, 3, 2.5, End(Ending.FAILED, "boom")),
        (FlowStatus.FAILED, 3, 3, None, End(Ending.FAILED, "boom")),
        # A cancelled run goes no further and stays CANCELLED.
        (FlowStatus.CANCELLED, 1, 3, 2.5, End(Ending.CANCELLED, "boom")),
        (FlowStatus.CANCELLED, 3, 3, None, End(Ending.CANCELLED, "boom")),
    ],
)
def test_after_failure(
    run: str, attempt: int, max_attempts: int, retry_delay: float | None, expected: object
) -> None:
    """A failed attempt retries (after its delay) only if a retry is wanted, attempts are
    left and the run is not over; else the node fails, failing its run unless the run
    is over already; in a cancelled run it ends CANCELLED."""
    fate = after_failure(
        run, error="boom", attempt=attempt, max_attempts=max_attempts, retry_delay=retry_delay
    )
    assert fate == expected


@pytest.mark.parametrize(
    ("parent_run", "attempt", "max_attempts", "expected"),
    [
        (FlowStatus.RUNNING, 1, 2, Retry("child failed", 0.0)),
        (FlowStatus.RUNNING, 2, 2, End(Ending.FAILED, "child failed", fails_run=True)),
        (FlowStatus.FAILED, 1, 2, End(Ending.FAILED, "child failed")),
        (FlowStatus.CANCELLED, 1, 2, End(Ending.CANCELLED, "child failed")),
    ],
)
def test_after_subflow_failed(
    parent_run: str, attempt: int, max_attempts: int, expected: object
) -> None:
    """A subflow step whose child failed is a failed attempt of that step: it runs again
    at once (the child had its own backoff) while attempts are left and its run is not
    over, else it fails its run."""
    fate = after_subflow_failed(
        parent_run, error="child failed", attempt=attempt, max_attempts=max_attempts
    )
    assert fate == expected


# -- a run that is over, release, rescue ----------------------------------------------------


@pytest.mark.parametrize("run", NOT_OVER)
def test_a_run_that_is_not_over_ends_no_node(run: str) -> None:
    """PENDING, RUNNING, COMPLETED and unknown statuses are not over: nothing is ended."""
    assert not is_over(run)
    assert end_of_over_run(run) is None
    assert end_of_over_run(run, "why") is None


@pytest.mark.parametrize(
    ("run", "error", "expected"),
    [
        (FlowStatus.CANCELLED, None, End(Ending.CANCELLED)),
        (FlowStatus.CANCELLED, "why", End(Ending.CANCELLED, "why")),
        (FlowStatus.FAILED, None, End(Ending.STOPPED)),
        (FlowStatus.FAILED, "why", End(Ending.STOPPED, "why")),
    ],
)
def test_a_run_that_is_over_ends_its_node(run: str, error: str | None, expected: End) -> None:
    """A cancelled run's node ends CANCELLED; a failed run's is stopped (CANCELLED, so
    that a retry of the run runs it again), each with the error given, if any."""
    assert is_over(run)
    assert end_of_over_run(run, error) == expected
    assert expected.status == NodeStatus.CANCELLED and expected.run_error is None


# Retries that give the attempt back, and keep it as released or rescued.
RELEASED = Retry(gives_back_attempt=True, superseded_as=AttemptOutcome.RELEASED)
RESCUED = Retry(RESCUE_ERROR, gives_back_attempt=True, superseded_as=AttemptOutcome.RESCUED)


@pytest.mark.parametrize(
    ("run", "expected"),
    [
        (FlowStatus.PENDING, RELEASED),
        (FlowStatus.RUNNING, RELEASED),
        (UNKNOWN, RELEASED),
        (FlowStatus.CANCELLED, End(Ending.CANCELLED)),
        (FlowStatus.FAILED, End(Ending.STOPPED)),
    ],
)
def test_after_release(run: str, expected: object) -> None:
    """A node its stopping worker hands back runs again at once with its attempt given
    back (and kept as RELEASED) and its error kept, unless its run is over: then it is
    handed to no one."""
    assert after_release(run) == expected


@pytest.mark.parametrize(
    ("run", "rescues", "max_rescues", "expected"),
    [
        (FlowStatus.RUNNING, 0, 3, RESCUED),
        (FlowStatus.RUNNING, 2, 3, RESCUED),
        (UNKNOWN, 0, 3, RESCUED),
        (
            FlowStatus.RUNNING,
            3,
            3,
            End(Ending.FAILED, rescue_limit_error("s", 4, 3), fails_run=True),
        ),
        (
            FlowStatus.RUNNING,
            0,
            0,
            End(Ending.FAILED, rescue_limit_error("s", 1, 0), fails_run=True),
        ),
        # The rescue limit is checked before a failed run's stop, and fails nothing more.
        (FlowStatus.FAILED, 3, 3, End(Ending.FAILED, rescue_limit_error("s", 4, 3))),
        (FlowStatus.FAILED, 0, 3, End(Ending.STOPPED, RESCUE_ERROR)),
        # A cancel wins over the limit.
        (FlowStatus.CANCELLED, 0, 3, End(Ending.CANCELLED, RESCUE_ERROR)),
        (FlowStatus.CANCELLED, 3, 3, End(Ending.CANCELLED, RESCUE_ERROR)),
    ],
)
def test_after_lost_lease(run: str, rescues: int, max_rescues: int, expected: object) -> None:
    """A node whose worker was lost runs again (the lost attempt kept as RESCUED)
    without using up a retry, up to
    max_rescues times, then fails its run; in a run that is over it ends as that run's
    nodes end, recording the lost worker."""
    fate = after_lost_lease(run, step_name="s", rescues=rescues, max_rescues=max_rescues)
    assert fate == expected


def test_the_rescue_limit_error_says_what_happened_and_what_to_do() -> None:
    """The error names the step, the count and the limit, and says how to run it again."""
    error = rescue_limit_error("charge", 4, 3)
    assert error.startswith(f"{RESCUE_ERROR} 4 times running step 'charge' (max_rescues=3)")
    assert "`flowsmith retry`" in error


# -- the fate of a node itself --------------------------------------------------------------


@pytest.mark.parametrize(
    ("fate", "status"),
    [
        (Retry(), NodeStatus.PENDING),
        (End(Ending.FAILED, "x"), NodeStatus.FAILED),
        (End(Ending.CANCELLED), NodeStatus.CANCELLED),
        (End(Ending.STOPPED), NodeStatus.CANCELLED),
    ],
)
def test_each_fate_has_one_node_status(fate: Retry | End, status: NodeStatus) -> None:
    """A retried node is PENDING; a failed one FAILED; a cancelled or stopped one CANCELLED."""
    assert fate.status == status


def test_only_a_failed_node_with_its_error_fails_its_run() -> None:
    """The run fails with the node's error, so a fate failing the run without one,
    or failing it from a node that was cancelled or stopped, cannot be made."""
    assert End(Ending.FAILED, "boom", fails_run=True).run_error == "boom"
    assert End(Ending.FAILED, "boom").run_error is None
    for ending, error in [(Ending.FAILED, None), (Ending.CANCELLED, "x"), (Ending.STOPPED, "x")]:
        with pytest.raises(ValueError, match="only a FAILED node"):
            End(ending, error, fails_run=True)


# -- cancel and retry of a run --------------------------------------------------------------


@pytest.mark.parametrize(
    ("run", "expected"),
    [
        (FlowStatus.PENDING, True),
        (FlowStatus.RUNNING, True),
        (FlowStatus.CANCELLED, True),  # again: nothing changes
        (FlowStatus.COMPLETED, False),
        (FlowStatus.FAILED, False),
    ],
)
def test_cancellable(run: str, expected: bool) -> None:
    """Only a run that has not COMPLETED or FAILED can be cancelled."""
    assert cancellable(run) is expected


@pytest.mark.parametrize(
    ("attempt", "planned", "expected"),
    [(3, PlannedStep("s", 3), 6), (1, PlannedStep("s", 1), 2), (5, None, 6)],
)
def test_max_attempts_on_retry(attempt: int, planned: PlannedStep | None, expected: int) -> None:
    """A retried run gives each resumed step its allowance again on top of the attempts
    made (the attempt number keeps counting: it is the fencing token); a step no longer
    in the plan gets one attempt."""
    assert max_attempts_on_retry(attempt, planned) == expected


# -- messages and ctx.data ------------------------------------------------------------------


def test_subflow_errors_name_the_child_run() -> None:
    """The parent step's error names the child's tracking_id and flow, and quotes the
    child's error below."""
    assert subflow_failed_error("child-1", "billing", "card declined") == (
        "subflow 'child-1' (billing) failed:\ncard declined"
    )
    assert (
        subflow_cancelled_error("child-1", "billing") == "subflow 'child-1' (billing) was cancelled"
    )


def test_the_stopped_error_says_how_to_run_the_step() -> None:
    """A node stopped by its run's failure says why and how to run it again."""
    assert "another step failed this run" in STOPPED_BY_FAILURE
    assert "`flowsmith retry`" in STOPPED_BY_FAILURE


def test_context_data() -> None:
    """ctx.data is the run's input plus each output in plan order; an output replaces an
    input key of the same name, and the input is not changed."""
    run_input = {"order": 1, "a": "input"}
    data = context_data(run_input, [("a", {"x": 1}), ("b", None)])
    assert data == {"order": 1, "a": {"x": 1}, "b": None}
    assert run_input == {"order": 1, "a": "input"}


# -- the history of a node's attempts -----------------------------------------------


def node(status: NodeStatus, attempt: int, error: str | None = None) -> NodeRecord:
    """A node whose latest attempt, number ``attempt``, started at 10 and (unless it
    runs) finished at 20, on worker w."""
    return NodeRecord(
        id=7,
        flow_id=3,
        step_name="s",
        position=0,
        group_index=0,
        status=status,
        attempt=attempt,
        max_attempts=5,
        rescues=0,
        run_after=0.0,
        lease_owner="w",
        lease_expires_at=None,
        input={},
        output=None,
        error=error,
        started_at=10.0 if attempt else None,
        finished_at=20.0,
    )


def kept(attempt: int, outcome: AttemptOutcome, error: str | None) -> AttemptRecord:
    return AttemptRecord(7, 3, "s", attempt, "w0", 1.0, 2.0, outcome, error)


def latest(attempt: int, outcome: AttemptOutcome, error: str | None = None) -> AttemptRecord:
    ended = None if outcome in (AttemptOutcome.RUNNING, AttemptOutcome.WAITING) else 20.0
    return AttemptRecord(7, 3, "s", attempt, "w", 10.0, ended, outcome, error)


FAILED_1 = kept(1, AttemptOutcome.FAILED, "e1")


@pytest.mark.parametrize(
    ("the_node", "recorded", "expected"),
    [
        # Never started, or waiting to run again: the row describes no attempt.
        (node(NodeStatus.PENDING, 0), [], []),
        (node(NodeStatus.PENDING, 1, "e1"), [FAILED_1], [FAILED_1]),
        # A step that succeeds at once keeps nothing apart: its row is its one attempt.
        (node(NodeStatus.COMPLETED, 1), [], [latest(1, AttemptOutcome.COMPLETED)]),
        # The row keeps the earlier attempt's error: not the latest attempt's own.
        (
            node(NodeStatus.RUNNING, 2, "e1"),
            [FAILED_1],
            [FAILED_1, latest(2, AttemptOutcome.RUNNING)],
        ),
        (
            node(NodeStatus.COMPLETED, 2, "e1"),
            [FAILED_1],
            [FAILED_1, latest(2, AttemptOutcome.COMPLETED)],
        ),
        (
            node(NodeStatus.CANCELLED, 2, "e1"),
            [FAILED_1],
            [FAILED_1, latest(2, AttemptOutcome.CANCELLED)],
        ),
        (node(NodeStatus.WAITING, 1), [], [latest(1, AttemptOutcome.WAITING)]),
        # A latest attempt that failed with an error of its own shows it.
        (
            node(NodeStatus.FAILED, 2, "e2"),
            [FAILED_1],
            [FAILED_1, latest(2, AttemptOutcome.FAILED, "e2")],
        ),
        (node(NodeStatus.FAILED, 1, "e1"), [], [latest(1, AttemptOutcome.FAILED, "e1")]),
        # A FAILED attempt wrote its error, even the same text as the attempt before.
        (
            node(NodeStatus.FAILED, 2, "e1"),
            [FAILED_1],
            [FAILED_1, latest(2, AttemptOutcome.FAILED, "e1")],
        ),
        # A node stopped while waiting to run again: its latest attempt is the kept one.
        (node(NodeStatus.CANCELLED, 1, "e1\nstopped"), [FAILED_1], [FAILED_1]),
        # Kept attempts come oldest first, however they were read.
        (
            node(NodeStatus.SKIPPED, 3),
            [kept(2, AttemptOutcome.RESCUED, RESCUE_ERROR), FAILED_1],
            [
                FAILED_1,
                kept(2, AttemptOutcome.RESCUED, RESCUE_ERROR),
                latest(3, AttemptOutcome.SKIPPED),
            ],
        ),
    ],
)
def test_attempts_of(
    the_node: NodeRecord, recorded: list[AttemptRecord], expected: list[AttemptRecord]
) -> None:
    """A node's attempts: those kept apart, then the one its row describes (its times,
    its worker, its status as outcome) unless that one was kept, or never began."""
    assert list(attempts_of(the_node, recorded)) == expected


def test_each_retry_says_how_its_superseded_attempt_is_kept() -> None:
    """A failure retried is kept FAILED with its error; a release RELEASED; a rescue
    RESCUED with the rescue's error; a failed subflow FAILED with the child's error."""
    retried = after_failure(
        FlowStatus.RUNNING, error="e", attempt=1, max_attempts=2, retry_delay=0.0
    )
    assert isinstance(retried, Retry)
    assert (retried.superseded_as, retried.error) == (AttemptOutcome.FAILED, "e")
    subflow = after_subflow_failed(FlowStatus.RUNNING, error="c", attempt=1, max_attempts=2)
    assert isinstance(subflow, Retry)
    assert (subflow.superseded_as, subflow.error) == (AttemptOutcome.FAILED, "c")
    assert after_release(FlowStatus.RUNNING) == RELEASED
    assert after_lost_lease(FlowStatus.RUNNING, step_name="s", rescues=0, max_rescues=1) == RESCUED

"""The model checker: generated flows against a pure reference model (issue 11, point 3).

Hypothesis generates flow shapes (sequential stages, parallel groups,
conditions, retries) with failure schedules (which attempt of which step
raises); each runs to its end on the real worker, and its final status, ctx.data,
node statuses, attempt counts, attempt histories and outputs are compared with
what tests/torture/model.py says. Profiles: tests/torture/conftest.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from flowsmith_worker.storage import InMemoryStorage, create_storage
from flowsmith_worker.storage.base import AttemptOutcome, FlowStatus, NodeStatus, Storage
from tests.torture import model
from tests.torture.engine import Observed, run_on, scheduled_failure
from tests.torture.model import FlowShape, NodeEnd, RunEnd, StepShape
from tests.torture.verdict import calls_of, check

FLAGS = ("flag_a", "flag_b")
MAX_STAGES = 4
MAX_WIDTH = 3
MAX_RETRIES = 2
MAX_CONCURRENCY = 4
MAX_RETRIES_OF_RUN = 2  # `flowsmith retry` of a FAILED run


@st.composite
def step_shapes(draw: st.DrawFn, name: str, keys: list[str]) -> StepShape:
    """A step: its retries, which of its attempts raise, maybe a condition on an input
    flag or on an earlier step's output (absent when that step was skipped), sync or async."""
    retries = draw(st.integers(0, MAX_RETRIES))
    allowance = retries + 1
    first_run = st.frozensets(st.integers(1, allowance))
    # Attempts past the allowance are those of the retries of a FAILED run.
    retried = st.frozensets(st.integers(allowance + 1, allowance * (1 + MAX_RETRIES_OF_RUN)))
    no_failure = st.just(frozenset[int]())
    fails_on = draw(no_failure | first_run) | draw(no_failure | retried)
    condition = draw(st.none() | st.sampled_from(keys))
    return StepShape(name, retries, fails_on, condition, draw(st.booleans()))


@st.composite
def flow_shapes(draw: st.DrawFn) -> FlowShape:
    flags = {flag: draw(st.booleans()) for flag in FLAGS}
    keys = list(flags)
    stages: list[model.Stage] = []
    for position in range(draw(st.integers(1, MAX_STAGES))):
        width = draw(st.integers(1, MAX_WIDTH))
        stage = tuple(draw(step_shapes(f"s{position}_{i}", keys)) for i in range(width))
        stages.append(stage)
        keys += [step.name for step in stage]
    return FlowShape(tuple(stages), flags)


@pytest.fixture(scope="module", params=["memory", "sqlite"])
def shared_storage(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Storage]:
    """One storage for every example of a test: each run has its own flow name and
    tracking_id, and the runs before it are over, so they cannot mix (a fresh database
    per example would spend the time on migrations)."""
    if request.param == "memory":
        made: Storage = InMemoryStorage()
    else:
        made = create_storage(f"sqlite:///{tmp_path_factory.mktemp('model') / 'model.db'}")
    made.migrate()
    yield made
    made.close()


@given(
    shape=flow_shapes(),
    concurrency=st.integers(1, MAX_CONCURRENCY),
    retries_of_run=st.integers(0, MAX_RETRIES_OF_RUN),
)
def test_the_engine_ends_every_run_as_the_model_says(
    shared_storage: Storage, shape: FlowShape, concurrency: int, retries_of_run: int
) -> None:
    """Any flow of stages, parallel groups, conditions and retries, under any failure
    schedule, ends (status, ctx.data, every node's status, attempts and output) as the
    reference model says, and so does each retry of it while it FAILED; with an
    in-process worker of 1 to 4 slots, on the in-memory storage and on SQLite."""
    start: dict[str, NodeEnd] = {}
    for number, observed in enumerate(run_on(shared_storage, shape, concurrency, retries_of_run)):
        expected = model.run(shape, start)
        event(f"run {number}: {expected.status}")  # shown by --hypothesis-show-statistics
        check(shape, expected, observed)
        start = observed.nodes  # checked: the next retry of the run starts from there


# -- the model and the checker, on flows worked out by hand ------------------------

F, C, S = AttemptOutcome.FAILED, AttemptOutcome.COMPLETED, AttemptOutcome.SKIPPED
# Stage 0: "a" fails once then completes, beside "b", skipped (flag_a is false).
# Stage 1: "c" runs only if "b" left an output (it did not): skipped. Stage 2: "d".
HAND_MADE = FlowShape(
    (
        (StepShape("a", 1, frozenset({1})), StepShape("b", condition="flag_a")),
        (StepShape("c", condition="b"),),
        (StepShape("d", 2),),
    ),
    {"flag_a": False},
)
# Stage 0: "a" fails both its attempts, beside "b", which fails its first of three.
FAILING = FlowShape(
    ((StepShape("a", 1, frozenset({1, 2})), StepShape("b", 2, frozenset({1}))), (StepShape("c"),)),
    {},
)


def test_the_model_on_a_flow_worked_out_by_hand() -> None:
    """The model says what the README says: retries, skips, and ctx.data with the
    outputs of earlier stages only (not a sibling's, not a skipped step's)."""
    a_output = {"attempt": 2, "saw": ["flag_a"]}
    d_output = {"attempt": 1, "saw": ["a", "flag_a"]}
    assert model.run(HAND_MADE) == RunEnd(
        FlowStatus.COMPLETED,
        {"flag_a": False, "a": a_output, "d": d_output},
        {
            "a": NodeEnd(NodeStatus.COMPLETED, 2, (F, C), a_output),
            "b": NodeEnd(NodeStatus.SKIPPED, 1, (S,)),
            "c": NodeEnd(NodeStatus.SKIPPED, 1, (S,)),
            "d": NodeEnd(NodeStatus.COMPLETED, 1, (C,), d_output),
        },
    )


def test_the_model_of_a_failed_run_worked_out_by_hand() -> None:
    """A step failing all its attempts fails the run in its stage; no later stage
    runs; a sibling may be caught anywhere in its course."""
    expected = model.run(FAILING)
    assert (expected.status, expected.failed_stage, set(expected.nodes)) == (
        FlowStatus.FAILED,
        0,
        {"a", "b"},
    )
    b_output = {"attempt": 2, "saw": []}
    assert model.cut_short(expected.nodes["b"]) == [
        NodeEnd(NodeStatus.COMPLETED, 2, (F, C), b_output),
        NodeEnd(NodeStatus.CANCELLED, 0, ()),  # stopped before its first attempt
        NodeEnd(NodeStatus.CANCELLED, 1, (F,)),  # stopped while its retry waited
        NodeEnd(NodeStatus.FAILED, 1, (F,)),  # its attempt failed after the run had
    ]


def test_the_model_of_a_retried_run_worked_out_by_hand() -> None:
    """A retry of a FAILED run runs its failed and stopped nodes again, attempt numbers
    counting on with a fresh allowance, and keeps what completed."""
    b_output = {"attempt": 2, "saw": []}
    stopped = NodeEnd(NodeStatus.CANCELLED, 1, (F,))
    failed = model.run(FAILING)
    first = {"a": failed.nodes["a"], "b": stopped}
    retried = model.run(FAILING, first)
    assert retried.status is FlowStatus.COMPLETED
    assert retried.nodes["a"] == NodeEnd(
        NodeStatus.COMPLETED, 3, (F, F, C), {"attempt": 3, "saw": []}
    )
    assert retried.nodes["b"] == NodeEnd(NodeStatus.COMPLETED, 2, (F, C), b_output)
    assert retried.nodes["c"].output == {"attempt": 1, "saw": ["a", "b"]}
    # A node done before stays as it was, whatever the retry of its stage meets.
    done = {"a": failed.nodes["a"], "b": retried.nodes["b"]}
    assert model.cut_short(retried.nodes["b"], done["b"]) == [retried.nodes["b"]]


def as_observed(expected: RunEnd) -> Observed:
    """What an engine that behaves exactly as the model says would report."""
    failing = [n for n, end in expected.nodes.items() if end.status is NodeStatus.FAILED]
    error = scheduled_failure(failing[0], expected.nodes[failing[0]].attempt) if failing else None
    calls = calls_of(expected.nodes)
    return Observed(expected.status, expected.nodes, expected.data, error, calls)


def one_attempt_too_many(seen: Observed) -> Observed:
    a = seen.nodes["a"]
    nodes = {**seen.nodes, "a": replace(a, attempt=a.attempt + 1)}
    return replace(seen, nodes=nodes)


def a_sibling_output_seen(seen: Observed) -> Observed:
    d = seen.nodes["d"]
    nodes = {**seen.nodes, "d": replace(d, output={"attempt": 1, "saw": ["a", "b", "flag_a"]})}
    return replace(seen, nodes=nodes)


def a_completed_step_run_again(seen: Observed) -> Observed:
    return replace(seen, calls={**seen.calls, "d": [1, 1]})


def a_skipped_output_in_data(seen: Observed) -> Observed:
    return replace(seen, data={**(seen.data or {}), "b": None})


@pytest.mark.parametrize(
    "mutation",
    [
        one_attempt_too_many,
        a_sibling_output_seen,
        a_completed_step_run_again,
        a_skipped_output_in_data,
    ],
)
def test_the_checker_refuses_a_completed_run_the_model_does_not_allow(
    mutation: Callable[[Observed], Observed],
) -> None:
    """The comparison is not vacuous: it accepts the model's own end of HAND_MADE and
    refuses each way an engine could get it wrong."""
    expected = model.run(HAND_MADE)
    check(HAND_MADE, expected, as_observed(expected))
    with pytest.raises(AssertionError):
        check(HAND_MADE, expected, mutation(as_observed(expected)))


def a_later_stage_started(seen: Observed) -> Observed:
    return replace(seen, nodes={**seen.nodes, "c": NodeEnd(NodeStatus.CANCELLED, 0, ())})


def the_failing_step_cut_short(seen: Observed) -> Observed:
    stopped = NodeEnd(NodeStatus.CANCELLED, 1, (F,))
    return replace(seen, nodes={**seen.nodes, "a": stopped}, calls={**seen.calls, "a": [1]})


def a_failed_attempt_out_of_schedule(seen: Observed) -> Observed:
    return replace(seen, nodes={**seen.nodes, "b": NodeEnd(NodeStatus.FAILED, 2, (F, F))})


def the_run_error_of_another_step(seen: Observed) -> Observed:
    return replace(seen, error=scheduled_failure("b", 1))


@pytest.mark.parametrize(
    "mutation",
    [
        a_later_stage_started,
        the_failing_step_cut_short,
        a_failed_attempt_out_of_schedule,
        the_run_error_of_another_step,
    ],
)
def test_the_checker_refuses_a_failed_run_the_model_does_not_allow(
    mutation: Callable[[Observed], Observed],
) -> None:
    """As above, for a failed run, whose failing stage the model allows some leeway."""
    expected = model.run(FAILING)
    check(FAILING, expected, as_observed(expected))
    with pytest.raises(AssertionError):
        check(FAILING, expected, mutation(as_observed(expected)))

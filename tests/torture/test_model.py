"""The model checker: generated flows against a pure reference model (issue 11, point 3).

Hypothesis generates flow shapes (sequential stages, parallel groups,
conditions, retries) with failure schedules (which attempt of which step
raises); each runs to its end on the real worker, and its final status, ctx.data,
node statuses, attempt counts, attempt histories and outputs are compared with
what tests/torture/model.py says. Profiles: tests/torture/conftest.py.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from flowsmith_worker.storage import InMemoryStorage, create_storage
from flowsmith_worker.storage.base import AttemptOutcome, FlowStatus, NodeStatus, Storage
from tests.torture import model
from tests.torture.engine import Observed, run_on
from tests.torture.model import FlowShape, RunEnd, StepShape

FLAGS = ("flag_a", "flag_b")
MAX_STAGES = 4
MAX_WIDTH = 3
MAX_RETRIES = 2
MAX_CONCURRENCY = 4
# The outcomes of an attempt that called the step's function.
CALLED = frozenset({AttemptOutcome.FAILED, AttemptOutcome.COMPLETED})


@st.composite
def step_shapes(draw: st.DrawFn, name: str, keys: list[str]) -> StepShape:
    """A step: its retries, which of its attempts raise, and maybe a condition on
    an input flag or on an earlier step's output (absent when that step was skipped)."""
    retries = draw(st.integers(0, MAX_RETRIES))
    attempts = st.integers(1, retries + 1)
    fails_on = draw(st.just(frozenset[int]()) | st.frozensets(attempts))
    condition = draw(st.none() | st.sampled_from(keys))
    return StepShape(name, retries, fails_on, condition)


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


def check(shape: FlowShape, expected: RunEnd, observed: Observed) -> None:
    """The engine's end of a run of ``shape`` is one the model allows."""
    assert observed.status == expected.status
    assert observed.calls == calls_of(observed.nodes), "the trace and the journal disagree"
    if expected.failed_stage is None:
        assert observed.nodes == expected.nodes
        assert observed.data == expected.data
        return
    failed = expected.failed_stage
    ran = {step.name for stage in shape.stages[: failed + 1] for step in stage}
    assert set(observed.nodes) == ran, "a stage after the failed one was started"
    for step in (step for stage in shape.stages[:failed] for step in stage):
        assert observed.nodes[step.name] == expected.nodes[step.name], step.name
    for step in shape.stages[failed]:
        allowed = model.cut_short(expected.nodes[step.name])
        assert observed.nodes[step.name] in allowed, step.name
    failing = [step.name for step in shape.stages[failed] if is_failure(expected, step.name)]
    assert any(observed.nodes[name] == expected.nodes[name] for name in failing), (
        "no step failed the run as scheduled"
    )


def calls_of(nodes: dict[str, model.NodeEnd]) -> dict[str, list[int]]:
    """The calls of the step functions that the nodes' attempt histories account for:
    each attempt but a skipped one called its function once (a step that completed
    never ran again, no attempt ran twice)."""
    calls = {
        name: [number for number, outcome in enumerate(end.attempts, 1) if outcome in CALLED]
        for name, end in nodes.items()
    }
    return {name: numbers for name, numbers in calls.items() if numbers}


def is_failure(expected: RunEnd, name: str) -> bool:
    return expected.nodes[name].status is NodeStatus.FAILED


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


@given(shape=flow_shapes(), concurrency=st.integers(1, MAX_CONCURRENCY))
def test_the_engine_ends_every_run_as_the_model_says(
    shared_storage: Storage, shape: FlowShape, concurrency: int
) -> None:
    """Any flow of stages, parallel groups, conditions and retries, under any failure
    schedule, ends (status, ctx.data, every node's status, attempts and output) as the
    reference model says, with an in-process worker of 1 to 4 slots, on the in-memory
    storage and on SQLite."""
    expected = model.run(shape)
    event(f"run {expected.status}")  # shown by --hypothesis-show-statistics
    check(shape, expected, run_on(shared_storage, shape, concurrency))


def test_the_checker_catches_a_wrong_attempt_count() -> None:
    """The comparison is not vacuous: an engine end with one attempt too many is refused."""
    shape = FlowShape(((StepShape("only", 1, frozenset({1})),),), {})
    expected = model.run(shape)
    node = expected.nodes["only"]
    wrong = model.NodeEnd(node.status, node.attempt + 1, node.attempts, node.output)
    observed = Observed(FlowStatus.COMPLETED, {"only": wrong}, expected.data)
    try:
        check(shape, expected, observed)
    except AssertionError:
        return
    raise AssertionError("check accepted a wrong attempt count")

"""Whether an engine's end of a run is one the reference model allows.

Shared by the model checker (test_model.py) and the chaos run's checks
(chaos_check.py): the comparison of what the engine did with what model.py says.
"""

from __future__ import annotations

from flowsmith_worker.storage.base import AttemptOutcome, NodeStatus
from tests.torture import model
from tests.torture.engine import Observed, scheduled_failure
from tests.torture.model import FlowShape, RunEnd

# The outcomes of an attempt that called the step's function.
CALLED = frozenset({AttemptOutcome.FAILED, AttemptOutcome.COMPLETED})


def check(shape: FlowShape, expected: RunEnd, observed: Observed) -> None:
    """The engine's end of a run of ``shape`` is one the model allows."""
    assert observed.status == expected.status
    uncalled = parked_steps(shape) | map_steps(shape)
    called = {name: end for name, end in observed.nodes.items() if name not in uncalled}
    assert observed.calls == calls_of(called), "the trace and the journal disagree"
    check_sends(shape, observed)
    if expected.failed_stage is None:
        assert observed.nodes == expected.nodes
        assert observed.data == expected.data
        assert observed.error is None, "a COMPLETED run kept an error"
    else:
        check_failed(shape, expected, observed, expected.failed_stage)


def check_failed(shape: FlowShape, expected: RunEnd, observed: Observed, failed: int) -> None:
    """A FAILED run: the stages before ``failed`` as the model says, no stage after it
    started, each node of it somewhere in its course, and one that failed the run."""
    ran = {
        name for stage in shape.stages[: failed + 1] for s in stage for name in model.node_names(s)
    }
    assert set(observed.nodes) == ran, "a stage after the failed one was started"
    for name in (
        name for stage in shape.stages[:failed] for s in stage for name in model.node_names(s)
    ):
        assert observed.nodes[name] == expected.nodes[name], name
    steps = list(shape.stages[failed])
    if steps[0].map is not None:  # a map is alone in its stage: its node stopped
        assert observed.nodes[steps[0].name] == model.MAP_STOPPED, steps[0].name
        steps = model.item_steps(steps[0])
        for index, item in enumerate(steps):
            start = expected.start.get(item.name, model.NOT_STARTED)
            allowed = model.cut_short_item(index, expected.nodes[item.name], start)
            assert observed.nodes[item.name] in allowed, item.name
    else:
        for step in steps:
            start = expected.start.get(step.name, model.NOT_STARTED)
            allowed = model.cut_short(expected.nodes[step.name], start)
            assert observed.nodes[step.name] in allowed, step.name
    failing = [step for step in steps if is_failure(expected, step.name)]
    failed_as_scheduled = [
        failure_of(step, observed.nodes[step.name].attempt)
        for step in failing
        if observed.nodes[step.name] == expected.nodes[step.name]
    ]
    assert failed_as_scheduled, "no step failed the run as scheduled"
    assert any(message in (observed.error or "") for message in failed_as_scheduled), (
        f"the run's error is not that of a step that failed it: {observed.error!r}"
    )


def failure_of(step: model.StepShape, attempt: int) -> str:
    """What the run's error says when ``step`` failed it at ``attempt``: its scheduled
    failure, or a wait's timeout."""
    if step.wait is not None:
        return f"wait_for {step.name!r} timed out"
    return scheduled_failure(step.name, attempt)


def parked_steps(shape: FlowShape) -> set[str]:
    """The sleeps and waits of ``shape``: steps that call no function."""
    return {step.name for stage in shape.stages for step in stage if step.parks}


def map_steps(shape: FlowShape) -> set[str]:
    """The maps of ``shape``: their own nodes call no function (their items do)."""
    return {step.name for stage in shape.stages for step in stage if step.map}


def check_sends(shape: FlowShape, observed: Observed) -> None:
    """Each event the driver sent was answered as the model says for its wait and why
    it was sent: kept, waking a parked wait, a no-op with the same key, refused."""
    waits = {step.name: step.wait for stage in shape.stages for step in stage if step.wait}
    for name, why, answer in observed.sends:
        assert answer == model.answer_to(waits[name], why), (name, why, answer)


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

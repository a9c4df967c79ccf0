"""A small pure reference model of what a run of a flow does (issue 11, point 3).

A flow shape is stages of steps (a stage of several steps is a parallel
group); each step has a retry allowance, a failure schedule (which of its
attempts raise) and maybe a condition (a key of ctx.data that must be truthy).
The model says, without any engine code, how the run ends, what ctx.data it
ends with, and how each node ends after how many attempts. tests/torture/
test_model.py runs generated shapes on the real worker and compares.

What a step returns is what it saw: its attempt number and the keys of
ctx.data, so a wrong attempt count or a leaked sibling output shows up in the
outputs themselves.

The rules, as the README and progress.py state them:

* stages run in order; a stage starts once every node of the one before is
  COMPLETED or SKIPPED;
* ctx.data is the run's input plus the output of every step COMPLETED in an
  earlier stage (a sibling's output is not seen; a SKIPPED step leaves none);
* a step whose condition is false is SKIPPED at its first attempt;
* a step runs attempts 1, 2, ... up to retries + 1: the first that does not
  raise COMPLETES it, and if all raise it FAILS, failing its run;
* when a run fails, the nodes of the failing stage may be caught anywhere in
  their own course (a sibling still queued is stopped, one running finishes
  its attempt), and no later stage runs (see ``cut_short``);
* a retry of a FAILED run runs its FAILED and stopped nodes again, attempt
  numbers counting on, each with its allowance of attempts afresh.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from flowsmith_worker.storage.base import AttemptOutcome, FlowStatus, NodeStatus


@dataclass(frozen=True)
class StepShape:
    name: str
    retries: int = 0
    fails_on: frozenset[int] = frozenset()  # the attempt numbers that raise
    condition: str | None = None  # runs only if ctx.data[condition] is truthy
    # Its function and condition are ``async def``: the same semantics, another path.
    is_async: bool = False

    @property
    def max_attempts(self) -> int:
        return self.retries + 1


Stage = tuple[StepShape, ...]


@dataclass(frozen=True)
class FlowShape:
    stages: tuple[Stage, ...]
    input: Mapping[str, Any]


@dataclass(frozen=True)
class NodeEnd:
    """How one node ends: its status, its last attempt's number, every attempt's outcome."""

    status: NodeStatus
    attempt: int
    attempts: tuple[AttemptOutcome, ...]
    output: Any = None


@dataclass(frozen=True)
class RunEnd:
    """How a run ends. ``failed_stage``: the index of the stage that failed it, if any.

    ``nodes`` holds the end of every step of the stages that ran; for the
    failed stage, the end each of its steps would reach left alone (its
    ``fate``), which ``cut_short`` widens."""

    status: FlowStatus
    data: dict[str, Any]
    nodes: dict[str, NodeEnd]
    failed_stage: int | None = None
    start: Mapping[str, NodeEnd] = field(default_factory=dict)  # see ``run``


def output_of(attempt: int, data: Mapping[str, Any]) -> dict[str, Any]:
    """What every step of the model returns: what it saw."""
    return {"attempt": attempt, "saw": sorted(data)}


DONE = frozenset({NodeStatus.COMPLETED, NodeStatus.SKIPPED})
NOT_STARTED = NodeEnd(NodeStatus.CANCELLED, 0, ())  # also a node stopped before its first attempt


def fate(step: StepShape, data: Mapping[str, Any], start: NodeEnd = NOT_STARTED) -> NodeEnd:
    """How ``step`` ends when it runs on ``data`` from ``start`` and nothing stops it.

    ``start`` is where an earlier run of it ended (a retry of a FAILED run runs
    its FAILED and stopped nodes again, with attempt numbers counting on and a
    fresh allowance of attempts); a node done is done for good.
    """
    if start.status in DONE:
        return start
    first = start.attempt + 1
    if step.condition is not None and not data.get(step.condition):
        return NodeEnd(NodeStatus.SKIPPED, first, (*start.attempts, AttemptOutcome.SKIPPED))
    last = start.attempt + step.max_attempts
    for attempt in range(first, last + 1):
        if attempt not in step.fails_on:
            failed = (AttemptOutcome.FAILED,) * (attempt - first)
            done = (*start.attempts, *failed, AttemptOutcome.COMPLETED)
            return NodeEnd(NodeStatus.COMPLETED, attempt, done, output_of(attempt, data))
    every = (*start.attempts, *(AttemptOutcome.FAILED,) * step.max_attempts)
    return NodeEnd(NodeStatus.FAILED, last, every)


def run(shape: FlowShape, start: Mapping[str, NodeEnd] | None = None) -> RunEnd:
    """The end of a run of ``shape``: stage after stage until one fails or none is left.

    ``start``: the nodes of the FAILED run this one retries (none: a new run).
    """
    start = start or {}
    data = dict(shape.input)
    nodes: dict[str, NodeEnd] = {}
    for index, stage in enumerate(shape.stages):
        ends = {step.name: fate(step, data, start.get(step.name, NOT_STARTED)) for step in stage}
        nodes.update(ends)
        if any(end.status is NodeStatus.FAILED for end in ends.values()):
            return RunEnd(FlowStatus.FAILED, data, nodes, failed_stage=index, start=start)
        # Outputs join ctx.data only once the whole stage is done: siblings never see them.
        data.update({name: end.output for name, end in ends.items() if end.output is not None})
    return RunEnd(FlowStatus.COMPLETED, data, nodes, start=start)


def cut_short(expected: NodeEnd, start: NodeEnd = NOT_STARTED) -> list[NodeEnd]:
    """The ends a node of the stage that failed its run may reach, its fate included.

    A sibling's failure can reach it at any point of its own course from
    ``start``: before its first attempt or while a retry waits (the node is
    stopped: CANCELLED, its last attempt kept as it ended), or while an attempt
    runs (the attempt still ends as scheduled, but a failed one is no longer
    retried). A SKIPPED or COMPLETED fate can also be stopped before it, never
    changed; a node done before is left alone.
    """
    if start.status in DONE:
        return [expected]
    made = len(start.attempts)
    ends = [expected, replace(start, status=NodeStatus.CANCELLED)]
    # After each failed attempt of this run but its last:
    for attempt in range(start.attempt + 1, expected.attempt):
        before = expected.attempts[: made + attempt - start.attempt]
        ends.append(NodeEnd(NodeStatus.CANCELLED, attempt, before))
        ends.append(NodeEnd(NodeStatus.FAILED, attempt, before))
    return ends

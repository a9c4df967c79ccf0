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
  numbers counting on, each with its allowance of attempts afresh;
* a sleep or a wait for an event (``SleepShape``, ``WaitShape``) calls no
  function: it parks (an attempt ended PARKED, given back) unless it is over at
  once (a sleep of no time, an event sent before the run got there), then
  completes with None (a sleep), the event's payload, or its ``on_timeout``
  value; a wait that times out with ``on_timeout="fail"`` fails its run, and
  its retry waits afresh (``parked_fate``);
* a map (``MapShape``, issue 14.3, alone in its stage) runs a node per item,
  ``name[i]``, each a step of its own with the map's retries and its own failure
  schedule, seeing the ctx.data of the stages before; the map's node completes
  with the items' outputs in item order (under ``allow_failures``, a list of
  ``{"output"}`` or ``{"error"}``); an item failed for good otherwise fails the run
  and stops the map's node (CANCELLED), and a retry runs its failed and stopped
  items again (``map_ends``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from flowsmith_worker.storage.base import AttemptOutcome, FlowStatus, NodeStatus

# When the driver (engine.py) sends a wait's event: before the run reaches it (right
# after enqueuing it), once the wait has parked, or never (the wait times out).
BEFORE, ONCE_PARKED, NEVER = "before", "once parked", "never"
# A wait's on_timeout that fails it (as flowsmith_worker.flow.FAIL).
FAIL = "fail"
# Why the driver sends an event: the first send, the same again (with the first one's
# idempotency key, or with none), or one to the run once it is over.
FIRST, AGAIN_SAME_KEY, AGAIN_NO_KEY, LATE = "first", "again, same key", "again, no key", "late"
# What send_event answered: delivered (and woke a parked wait, or not), delivered
# nothing (the same idempotency key), or refused (EventRefused) for either reason.
DELIVERED, WOKE, NOT_DELIVERED = "delivered", "delivered and woke", "not delivered"
REFUSED_SENT, REFUSED_OVER = "refused: already sent", "refused: run over"


@dataclass(frozen=True)
class SleepShape:
    """A ``flow.sleep``: of ``seconds`` (0: its time has come already), given as
    ``until=`` (a callable of ctx) rather than ``seconds=`` if ``by_until``."""

    seconds: float
    by_until: bool = False


@dataclass(frozen=True)
class WaitShape:
    """A ``flow.wait_for``: when its event is sent, whether it is sent twice (``again``:
    AGAIN_SAME_KEY, AGAIN_NO_KEY or None), its timeout and its on_timeout."""

    event: str = ONCE_PARKED  # BEFORE, ONCE_PARKED or NEVER
    again: str | None = None
    timeout: float | None = None  # a NEVER wait has one, or it would wait for ever
    on_timeout: Any = FAIL


@dataclass(frozen=True)
class MapShape:
    """A ``flow.map`` over the items ``0 .. items - 1``: ``fails_on[i]`` the attempt
    numbers of item i that raise, ``retries`` each item's, ``max_parallel`` at most
    that many items at once (None: no limit)."""

    items: int
    fails_on: tuple[frozenset[int], ...] = ()
    retries: int = 0
    allow_failures: bool = False
    max_parallel: int | None = None

    def fails_of(self, index: int) -> frozenset[int]:
        return self.fails_on[index] if index < len(self.fails_on) else frozenset()


@dataclass(frozen=True)
class StepShape:
    name: str
    retries: int = 0
    fails_on: frozenset[int] = frozenset()  # the attempt numbers that raise
    condition: str | None = None  # runs only if ctx.data[condition] is truthy
    # Its function and condition are ``async def``: the same semantics, another path.
    is_async: bool = False
    # A sleep or a wait for an event (then no retries, no failures, no condition).
    sleep: SleepShape | None = None
    wait: WaitShape | None = None
    # A map (then alone in its stage, no retries, failures or condition of its own).
    map: MapShape | None = None

    @property
    def parks(self) -> bool:
        """A sleep or a wait: a step that calls no function of the application."""
        return self.sleep is not None or self.wait is not None

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


# How the worker names the failure an item raises in a map's {"error"} (its class, by
# module, as for any exception not built in: engine.ScheduledFailure).
FAILURE_CLASS = "tests.torture.engine.ScheduledFailure"


def scheduled_failure(step_name: str, attempt: int) -> str:
    """The message of the failure a step (or item) raises on an attempt its schedule names."""
    return f"{step_name}: attempt {attempt} is scheduled to fail"


def item_name(map_name: str, index: int) -> str:
    """The node name of item ``index`` of the map ``map_name`` (as fanout.item_name)."""
    return f"{map_name}[{index}]"


def item_output_of(index: int, attempt: int, data: Mapping[str, Any]) -> dict[str, Any]:
    """What an item of a map returns: what it saw, and which item it was."""
    return {**output_of(attempt, data), "item": index}


def item_steps(step: StepShape) -> list[StepShape]:
    """The items of a map as steps: each its node's name, the map's retries, its schedule."""
    shape = step.map
    assert shape is not None
    return [
        StepShape(item_name(step.name, i), shape.retries, shape.fails_of(i))
        for i in range(shape.items)
    ]


def node_names(step: StepShape) -> list[str]:
    """The nodes a step makes: itself, and a map its items."""
    return [step.name, *(item.name for item in item_steps(step))] if step.map else [step.name]


def payload_of(wait_name: str, why: str = FIRST) -> dict[str, Any]:
    """The payload the driver sends to the wait ``wait_name`` (a send again carries
    another payload, which must never become the step's output)."""
    return {"event": wait_name, "sent": why}


def answer_to(wait: WaitShape, why: str) -> str:
    """What send_event answers the driver's send ``why`` to a wait shaped ``wait``.

    A first send before the run reaches the wait is kept (it wakes nothing); once the
    wait has parked, it wakes it. A send again is a no-op with the first one's key,
    refused without it; a send to a run that is over is refused.
    """
    if why == LATE:
        return REFUSED_OVER
    if why == AGAIN_SAME_KEY:
        return NOT_DELIVERED
    if why == AGAIN_NO_KEY:
        return REFUSED_SENT
    return DELIVERED if wait.event == BEFORE else WOKE


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
    if step.parks:
        return parked_fate(step, start)
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


def parked_fate(step: StepShape, start: NodeEnd = NOT_STARTED) -> NodeEnd:
    """How a sleep or a wait ends from ``start``: parked first (an attempt PARKED) unless
    it is over when first claimed, then completed, or failed by its timeout."""
    over_at_once = (step.sleep is not None and step.sleep.seconds == 0) or (
        step.wait is not None and step.wait.event == BEFORE
    )
    parked = () if over_at_once else (AttemptOutcome.PARKED,)
    status, output = NodeStatus.COMPLETED, None
    if step.wait is not None and step.wait.event == NEVER:
        if step.wait.on_timeout == FAIL:
            status = NodeStatus.FAILED
        output = None if status is NodeStatus.FAILED else step.wait.on_timeout
    elif step.wait is not None:
        output = payload_of(step.name)
    last = AttemptOutcome.COMPLETED if status is NodeStatus.COMPLETED else AttemptOutcome.FAILED
    attempts = (*start.attempts, *parked, last)
    return NodeEnd(status, start.attempt + len(parked) + 1, attempts, output)


def item_fate(step: StepShape, index: int, data: Mapping[str, Any], start: NodeEnd) -> NodeEnd:
    """How item ``index`` of the map ``step`` ends: a step's fate, its output what the
    item returned once it completes; until then its node holds the item itself."""
    item = item_steps(step)[index]
    end = fate(item, data, start)
    if end.status is NodeStatus.COMPLETED:
        return replace(end, output=item_output_of(index, end.attempt, data))
    return replace(end, output=index)


MAP_STOPPED = NodeEnd(NodeStatus.CANCELLED, 1, (AttemptOutcome.CANCELLED,))


def map_ends(
    step: StepShape, data: Mapping[str, Any], start: Mapping[str, NodeEnd]
) -> dict[str, NodeEnd]:
    """The ends of a map's node and of its items' nodes, run on ``data`` from ``start``.

    The map's node is claimed once (its attempt 1 starts the items, never again on a
    retry of the run); it completes with the items' outputs in item order, or is
    stopped (CANCELLED) when an item fails the run. A retry of the run completes it
    keeping the attempt it had (CANCELLED)."""
    shape = step.map
    assert shape is not None
    before = start.get(step.name)
    if before is not None and before.status is NodeStatus.COMPLETED:
        # A map done is done for good, its items too (a FAILED one under allow_failures).
        names = node_names(step)
        return {name: start[name] for name in names}
    items = {
        item_name(step.name, i): item_fate(
            step, i, data, start.get(item_name(step.name, i), NOT_STARTED)
        )
        for i in range(shape.items)
    }
    failed = [end for end in items.values() if end.status is NodeStatus.FAILED]
    if failed and not shape.allow_failures:
        return {step.name: MAP_STOPPED, **items}
    output: list[Any] = []
    for name, end in items.items():
        if not shape.allow_failures:
            output.append(end.output)
        elif end.status is NodeStatus.COMPLETED:
            output.append({"output": end.output})
        else:
            output.append({"error": f"{FAILURE_CLASS}: {scheduled_failure(name, end.attempt)}"})
    attempts = before.attempts if before is not None else (AttemptOutcome.COMPLETED,)
    return {step.name: NodeEnd(NodeStatus.COMPLETED, 1, attempts, output), **items}


def run(shape: FlowShape, start: Mapping[str, NodeEnd] | None = None) -> RunEnd:
    """The end of a run of ``shape``: stage after stage until one fails or none is left.

    ``start``: the nodes of the FAILED run this one retries (none: a new run).
    """
    start = start or {}
    data = dict(shape.input)
    nodes: dict[str, NodeEnd] = {}
    for index, stage in enumerate(shape.stages):
        if stage[0].map is not None:  # a map is alone in its stage
            ends = map_ends(stage[0], data, start)
            nodes.update(ends)
            if ends[stage[0].name].status is not NodeStatus.COMPLETED:
                return RunEnd(FlowStatus.FAILED, data, nodes, failed_stage=index, start=start)
            data[stage[0].name] = ends[stage[0].name].output
            continue
        ends = {step.name: fate(step, data, start.get(step.name, NOT_STARTED)) for step in stage}
        nodes.update(ends)
        if any(end.status is NodeStatus.FAILED for end in ends.values()):
            return RunEnd(FlowStatus.FAILED, data, nodes, failed_stage=index, start=start)
        # Outputs join ctx.data only once the whole stage is done: siblings never see them.
        # A sleep's None is an output too; a skipped step leaves none.
        data.update(
            {name: end.output for name, end in ends.items() if end.status is NodeStatus.COMPLETED}
        )
    return RunEnd(FlowStatus.COMPLETED, data, nodes, start=start)


def cut_short_item(index: int, expected: NodeEnd, start: NodeEnd = NOT_STARTED) -> list[NodeEnd]:
    """As ``cut_short``, for item ``index`` of a map: a node that did not complete holds
    its item as its output."""
    return [
        end if end.status is NodeStatus.COMPLETED else replace(end, output=index)
        for end in cut_short(expected, start)
    ]


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
    if AttemptOutcome.PARKED in expected.attempts[made:]:
        # A sleep or a wait stopped while parked, or claimed to park as its run failed
        # (a run that is over parks nothing: the attempt ends CANCELLED).
        parked = (*start.attempts, AttemptOutcome.PARKED)
        claimed = (*start.attempts, AttemptOutcome.CANCELLED)
        return [
            *ends,
            NodeEnd(NodeStatus.CANCELLED, start.attempt + 1, parked),
            NodeEnd(NodeStatus.CANCELLED, start.attempt + 1, claimed),
        ]
    # After each failed attempt of this run but its last:
    for attempt in range(start.attempt + 1, expected.attempt):
        before = expected.attempts[: made + attempt - start.attempt]
        ends.append(NodeEnd(NodeStatus.CANCELLED, attempt, before))
        ends.append(NodeEnd(NodeStatus.FAILED, attempt, before))
    return ends

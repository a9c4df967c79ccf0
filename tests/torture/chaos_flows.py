"""The flows of the chaos run (tests/torture/chaos.py), as both sides build them.

The driver builds them to enqueue runs; every `flowsmith worker` process loads
this module (``flowsmith worker tests.torture.chaos_flows``) and builds the same
flows from the same plan, a JSON file named by $FS_CHAOS_PLAN.

A sleep or a wait for an event (StepPlan.kind) calls no function: the driver's
EventSender (tests/torture/chaos_events.py) sends the waits' events.
A map (StepPlan.kind MAP) runs the items' function, scripted and journaled under
each item node's name (``m[3]``); its own node calls nothing.

A run's failures are scripted in its own input (``ctx.data["script"]``: per
step, which attempt numbers raise, hang past the step's timeout or are slow),
so each run's end is predictable whatever the chaos does. Each call of a step
function appends a "start" line and, unless its process dies first, an "end"
line to the journal ($FS_CHAOS_JOURNAL): the independent record the checks
compare with the engine's trace. A line is one ``write`` on an O_APPEND file:
lines of concurrent processes never interleave, and a SIGKILLed process loses
none it wrote (the kernel has it; only a machine crash would, hence no fsync).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from flowsmith_worker import Context, Flow
from flowsmith_worker.child_request import ChildRequest
from flowsmith_worker.flow import Condition, StepFunction
from flowsmith_worker.storage.base import Storage
from tests.torture.engine import ScheduledFailure, scheduled_failure
from tests.torture.model import item_name, item_output_of, output_of

PLAN_ENV = "FS_CHAOS_PLAN"
JOURNAL_ENV = "FS_CHAOS_JOURNAL"
# A lost worker is the chaos, not the step's fault: never let rescues fail a run.
MAX_RESCUES = 1000
# What a subflow step's start journals as its end: its child run's end decides its own.
CHILD_STARTED = "child started"
STEP_TIMEOUT = 1.0  # of the async steps that may hang
HANG_SECONDS = 3 * STEP_TIMEOUT
# StepPlan.kind: a step calling its function, a durable sleep, a wait for an event, a
# map (its items call the function, each scripted under its node's name ``m[i]``).
STEP, SLEEP, WAIT, MAP = "step", "sleep", "wait", "map"
SLEEP_SECONDS = (0.0, 0.3, 1.0)  # none (over at once), or long enough to be caught asleep
PARKED_SHARE = 0.25  # of a parent flow's steps


@dataclass(frozen=True)
class StepPlan:
    name: str
    retries: int
    condition: str | None  # a key of ctx.data that must be truthy
    is_async: bool  # async steps have a timeout, which a scripted hang trips
    child: str | None = None  # a subflow step: the name of its child flow's plan
    kind: str = STEP  # SLEEP: of ``seconds``; WAIT: for the event of its name
    seconds: float = 0.0
    items: int = 0  # MAP: over the items 0 .. items - 1
    max_parallel: int | None = None
    allow_failures: bool = False

    @property
    def parks(self) -> bool:
        return self.kind in (SLEEP, WAIT)

    def node_names(self) -> list[str]:
        """Its node's name, and a map's its items' (as the engine names them)."""
        return [self.name, *(item_name(self.name, i) for i in range(self.items))]


def parked_step(rng: random.Random, name: str) -> StepPlan:
    """A sleep (of no time, or long enough for the chaos to catch it asleep) or a wait
    for its event, with no timeout: the run ends only once EventSender sent it."""
    if rng.random() < 0.5:
        return StepPlan(name, 0, None, False, kind=SLEEP, seconds=rng.choice(SLEEP_SECONDS))
    return StepPlan(name, 0, None, False, kind=WAIT)


@dataclass(frozen=True)
class FlowPlan:
    name: str
    stages: tuple[tuple[StepPlan, ...], ...]

    def steps(self) -> list[StepPlan]:
        return [step for stage in self.stages for step in stage]


@dataclass(frozen=True)
class StepScript:
    """What the attempts of one step of one run do (attempt numbers as the engine counts)."""

    fail: frozenset[int] = frozenset()  # raise ScheduledFailure
    hang: frozenset[int] = frozenset()  # sleep past the step's timeout (async steps only)
    pause: float = 0.0  # seconds every attempt sleeps first: a window for the chaos

    def to_json(self) -> dict[str, Any]:
        return {"fail": sorted(self.fail), "hang": sorted(self.hang), "pause": self.pause}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StepScript:
        return cls(frozenset(data["fail"]), frozenset(data["hang"]), float(data["pause"]))

    @property
    def fails_on(self) -> frozenset[int]:
        """The attempts that end FAILED: raised or timed out."""
        return self.fail | self.hang


def save_plans(plans: list[FlowPlan], path: Path) -> None:
    path.write_text(json.dumps([asdict(plan) for plan in plans]))


def load_plans(path: Path) -> list[FlowPlan]:
    def step(data: dict[str, Any]) -> StepPlan:
        return StepPlan(**data)

    return [
        FlowPlan(item["name"], tuple(tuple(step(s) for s in stage) for stage in item["stages"]))
        for item in json.loads(path.read_text())
    ]


class Journal:
    """Appends one JSON line per event of a step call to the journal file."""

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._pid = os.getpid()

    def note(self, ctx: Context, event: str, result: str | None = None) -> None:
        line = {
            "run": ctx.tracking_id,
            "step": ctx.step,
            "attempt": ctx.attempt,
            "pid": self._pid,
            "event": event,
            "result": result,
            "t": time.time(),
        }
        os.write(self._fd, (json.dumps(line) + "\n").encode())  # one write: one whole line


def script_of(ctx: Context, step_name: str) -> StepScript:
    return StepScript.from_json(ctx.data["script"][step_name])


def outcome_of(ctx: Context, script: StepScript, step_name: str) -> dict[str, Any]:
    """Raise as scripted, else return what the model's steps return: what they saw."""
    if ctx.attempt in script.fail:
        raise ScheduledFailure(scheduled_failure(step_name, ctx.attempt))
    return output_of(ctx.attempt, ctx.data)


def step_function(step: StepPlan, journal: Journal | None) -> StepFunction:
    """The step's function: journals its call, pauses, hangs or raises as scripted."""

    def sync_body(ctx: Context) -> dict[str, Any]:
        script = script_of(ctx, step.name)
        with journaled(ctx, journal):
            time.sleep(script.pause)
            return outcome_of(ctx, script, step.name)

    async def async_body(ctx: Context) -> dict[str, Any]:
        script = script_of(ctx, step.name)
        with journaled(ctx, journal):
            await asyncio.sleep(HANG_SECONDS if ctx.attempt in script.hang else script.pause)
            return outcome_of(ctx, script, step.name)

    return async_body if step.is_async else sync_body


def item_function(step: StepPlan, journal: Journal | None) -> Callable[[Context, int], Any]:
    """A map's items' function: as a step's, scripted and journaled under the item's name."""

    def each(ctx: Context, item: int) -> dict[str, Any]:
        name = item_name(step.name, item)
        script = script_of(ctx, name)
        with journaled(ctx, journal):
            time.sleep(script.pause)
            outcome_of(ctx, script, name)
            return item_output_of(item, ctx.attempt, ctx.data)

    return each


def subflow_start(
    step: StepPlan, child: Flow, journal: Journal | None
) -> Callable[[Context], ChildRequest]:
    """A subflow step's start: journaled like a step (its child's end decides its own)."""

    def start(ctx: Context) -> ChildRequest:
        with journaled(ctx, journal, CHILD_STARTED):
            return ChildRequest(child, f"{ctx.tracking_id}:{step.name}")

    return start


@contextlib.contextmanager
def journaled(ctx: Context, journal: Journal | None, done: str = "completed") -> Iterator[None]:
    """A "start" line, then an "end" line saying how the call ended: ``done``, or
    the exception's name (a timeout's cancellation included). None: the driver's
    copy of the flows, which never runs a step."""
    if journal is None:
        yield
        return
    journal.note(ctx, "start")
    try:
        yield
    except BaseException as error:
        journal.note(ctx, "end", type(error).__name__)
        raise
    journal.note(ctx, "end", done)


def condition_function(step: StepPlan) -> Condition | None:
    key = step.condition
    if key is None:
        return None
    return lambda ctx: bool(ctx.data.get(key))


def build_all(
    plans: list[FlowPlan], journal: Journal | None, storage: Storage | None = None
) -> dict[str, Flow]:
    """The flows of ``plans`` by name (a child's plan comes before its parents')."""
    flows: dict[str, Flow] = {}
    for plan in plans:
        flows[plan.name] = build(plan, journal, flows, storage)
    return flows


def build(
    plan: FlowPlan, journal: Journal | None, flows: Mapping[str, Flow], storage: Storage | None
) -> Flow:
    """The flow of ``plan``; its steps journal their calls if ``journal`` is given."""
    flow = Flow(plan.name, storage=storage)
    for stage in plan.stages:
        if len(stage) == 1:
            add_step(flow, stage[0], journal, flows)
            continue
        with flow.parallel():
            for step in stage:
                add_step(flow, step, journal, flows)
    return flow


def add_step(
    flow: Flow, step: StepPlan, journal: Journal | None, flows: Mapping[str, Flow]
) -> None:
    if step.kind == SLEEP:
        flow.sleep(step.name, seconds=step.seconds)
        return
    if step.kind == WAIT:
        flow.wait_for(step.name)
        return
    if step.kind == MAP:
        count = step.items
        flow.map(
            step.name,
            item_function(step, journal),
            items=lambda ctx: list(range(count)),
            retries=step.retries,
            backoff=0.0,
            allow_failures=step.allow_failures,
            max_parallel=step.max_parallel,
            max_rescues=MAX_RESCUES,
        )
        return
    if step.child is not None:
        start = subflow_start(step, flows[step.child], journal)
        condition = condition_function(step)
        flow.subflow_from(step.name, start, condition=condition, max_rescues=MAX_RESCUES)
        return
    timeout = STEP_TIMEOUT if step.is_async else None
    flow.step(
        step.name,
        step_function(step, journal),
        step.retries,
        timeout=timeout,
        backoff=0.0,
        condition=condition_function(step),
        max_rescues=MAX_RESCUES,
    )


def _load_in_worker() -> dict[str, Flow]:
    """In a worker process: the plan's flows, journaling to $FS_CHAOS_JOURNAL."""
    plan_path = os.environ.get(PLAN_ENV)
    if not plan_path:
        return {}
    return build_all(load_plans(Path(plan_path)), Journal(Path(os.environ[JOURNAL_ENV])))


FLOWS = _load_in_worker()

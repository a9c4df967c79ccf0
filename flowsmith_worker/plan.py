"""The plan of a flow run: its stages as they were when the run was enqueued.

A plan is stored with every run (fs_flows.plan) so that a deploy which adds,
removes or reorders steps does not derail runs already in flight. A stage is
one step, or the steps of one parallel group; stage ``i`` starts only when every
step of stage ``i - 1`` is done.

Owns the frozen Plan, its JSON form and its version. A plan holds names and counts,
never step functions, so any process can read any stored plan; it is written once with
its run and must never be rewritten (a retry changes nodes, not the plan).

What the plan keeps, the run keeps whatever is deployed later: its steps, their order
and grouping, each step's max_attempts (retries + 1), max_rescues and whether it is a
subflow. What is code stays code: a step's function, condition, timeout and backoff are
the running worker's, read at each attempt.

The version is computed from the stored plan, not stored beside it: every run has one
(those enqueued before versions existed too), it cannot disagree with the plan it
names, and enqueue writes nothing more. So the version's input must never change for
a stored plan: a field added to PlannedStep later must stay out of the hashed form
while it holds its default, or every run's version would change with the upgrade.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from typing import Any

# How many times a step is re-run after its worker was lost (SIGKILL, OOM, a
# lease that ran out) before it fails: a lost lease is not the step's fault, so
# it does not use up `retries`, but a step that kills its worker every time
# must end somewhere.
DEFAULT_MAX_RESCUES = 3
# Hex digits of a plan's version: 48 bits, as short as a glance can compare (git
# shows 7 to 12) while two plans of one flow colliding stays out of reach.
VERSION_LENGTH = 12


# What a step is, besides a function's call: a sleep or a wait for an event
# parks its node (see parking.py). Only those are written into the plan's JSON.
STEP = "step"
SLEEP = "sleep"
WAIT_FOR_EVENT = "wait_for"
# A fan-out over a list (``flow.map``): one node per item (see fanout.py).
MAP = "map"


@dataclass(frozen=True)
class PlannedStep:
    name: str
    max_attempts: int
    subflow: bool = False
    max_rescues: int = DEFAULT_MAX_RESCUES
    kind: str = STEP
    # The attempts of the step's compensation (see compensation.py); 0: it has none.
    compensation_attempts: int = 0
    # A map's items: at most this many RUNNING at once (None: no limit), and
    # whether an item failed for good fails the map (see fanout.py).
    max_parallel: int | None = None
    allow_failures: bool = False


@dataclass(frozen=True)
class Plan:
    stages: tuple[tuple[PlannedStep, ...], ...]
    # The module that defined the flow, so a worker that does not know the flow
    # can say which module to import.
    module: str = ""

    def stage(self, position: int) -> tuple[PlannedStep, ...]:
        return self.stages[position]

    def is_last(self, position: int) -> bool:
        return position >= len(self.stages) - 1

    def step(self, name: str) -> PlannedStep | None:
        found = self._positions.get(name)
        return None if found is None else self.stages[found[0]][found[1]]

    def position_of(self, name: str) -> int | None:
        """The stage the step ``name`` belongs to; None if it is not in this plan."""
        found = self._positions.get(name)
        return None if found is None else found[0]

    @functools.cached_property
    def _positions(self) -> dict[str, tuple[int, int]]:
        """(stage, index in the stage) by step name: a plan is read once per step it moves."""
        return {
            planned.name: (position, index)
            for position, stage in enumerate(self.stages)
            for index, planned in enumerate(stage)
        }

    @functools.cached_property
    def version(self) -> str:
        """A short hash of the plan's stages: which steps, in which order and groups,
        with their attempts, rescues and kinds (the module is not part of it).

        The SHA-256 of their canonical JSON (sorted keys, no spaces, ASCII), so the
        same plan has the same version in every process, on every Python and every
        machine: unlike hash(), which differs between processes. Computed when asked
        for, never on the hot path.
        """
        canonical = json.dumps(
            self._stages_json(), sort_keys=True, separators=(",", ":"), ensure_ascii=True
        )
        return hashlib.sha256(canonical.encode("ascii")).hexdigest()[:VERSION_LENGTH]

    @functools.cached_property
    def compensates(self) -> bool:
        """Whether a step of the plan has a compensation (see compensation.py)."""
        return any(planned.compensation_attempts for stage in self.stages for planned in stage)

    def names(self) -> list[str]:
        """The steps' names, in plan order."""
        return [planned.name for stage in self.stages for planned in stage]

    def _stages_json(self) -> list[list[dict[str, Any]]]:
        return [[_step_json(s) for s in stage] for stage in self.stages]

    def to_json(self) -> str:
        return json.dumps({"module": self.module, "stages": self._stages_json()})

    @classmethod
    def from_json(cls, text: str) -> Plan:
        raw: dict[str, Any] = json.loads(text)
        stages = tuple(
            tuple(
                PlannedStep(
                    s["name"],
                    int(s["max_attempts"]),
                    bool(s.get("subflow", False)),
                    # Plans stored before max_rescues existed get the default.
                    int(s.get("max_rescues", DEFAULT_MAX_RESCUES)),
                    str(s.get("kind", STEP)),
                    int(s.get("compensation_attempts", 0)),
                    _optional_count(s.get("max_parallel")),
                    bool(s.get("allow_failures", False)),
                )
                for s in stage
            )
            for stage in raw["stages"]
        )
        return cls(stages=stages, module=str(raw.get("module", "")))


def _step_json(step: PlannedStep) -> dict[str, Any]:
    """A step as stored; ``kind`` only when it is not a plain step, and
    ``compensation_attempts`` only when it has a compensation, so the plans of
    flows without them are stored (and versioned) exactly as before."""
    stored: dict[str, Any] = {
        "name": step.name,
        "max_attempts": step.max_attempts,
        "subflow": step.subflow,
        "max_rescues": step.max_rescues,
    }
    if step.kind != STEP:
        stored["kind"] = step.kind
    if step.compensation_attempts:
        stored["compensation_attempts"] = step.compensation_attempts
    if step.kind == MAP:  # only a map's: every other plan is stored (and hashed) as before
        stored["max_parallel"] = step.max_parallel
        stored["allow_failures"] = step.allow_failures
    return stored


def _optional_count(value: Any) -> int | None:
    return None if value is None else int(value)

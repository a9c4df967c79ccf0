"""The plan of a flow run: its stages as they were when the run was enqueued.

A plan is stored with every run (fs_flows.plan) so that a deploy which adds,
removes or reorders steps does not derail runs already in flight. A stage is
one step, or the steps of one parallel group; stage ``i`` starts only when every
step of stage ``i - 1`` is done.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class PlannedStep:
    name: str
    max_attempts: int
    subflow: bool = False


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
        for stage in self.stages:
            for planned in stage:
                if planned.name == name:
                    return planned
        return None

    def to_json(self) -> str:
        return json.dumps(
            {
                "module": self.module,
                "stages": [
                    [
                        {"name": s.name, "max_attempts": s.max_attempts, "subflow": s.subflow}
                        for s in stage
                    ]
                    for stage in self.stages
                ],
            }
        )

    @classmethod
    def from_json(cls, text: str) -> Plan:
        raw: dict[str, Any] = json.loads(text)
        stages = tuple(
            tuple(
                PlannedStep(s["name"], int(s["max_attempts"]), bool(s.get("subflow", False)))
                for s in stage
            )
            for stage in raw["stages"]
        )
        return cls(stages=stages, module=str(raw.get("module", "")))

"""What the pages show, computed from storage records: pure functions, no HTTP, no SQL.

The templates only lay these out; every number placed in an SVG is computed
here, so the pages need no script to draw and no inline style.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from flowsmith_worker import compensation, parking
from flowsmith_worker.storage.base import (
    ActivitySlice,
    AttemptOutcome,
    AttemptRecord,
    FlowRecord,
    NodeRecord,
    RunLink,
)

# A payload is shown up to this many characters; the rest is cut, and said so.
MAX_SHOWN_CHARS = 64 * 1024


@dataclass(frozen=True)
class Attempt:
    """One attempt of a step, as the page lists it. Attempts made before every
    attempt was kept (schema 5) are counted only: ``known=False``."""

    number: int
    known: bool
    worker: str | None = None
    started_at: float | None = None
    finished_at: float | None = None
    error: str | None = None
    rescued: bool = False


def attempts_of(node: NodeRecord) -> list[Attempt]:
    """The attempts of ``node``, first to last, as the storage keeps them."""
    kept = {attempt.attempt: attempt for attempt in node.attempts}
    return [_attempt(number, kept.get(number)) for number in range(1, node.attempt + 1)]


def _attempt(number: int, kept: AttemptRecord | None) -> Attempt:
    if kept is None:
        return Attempt(number=number, known=False)
    return Attempt(
        number=number,
        known=True,
        worker=kept.worker_id,
        started_at=kept.started_at,
        finished_at=kept.ended_at,
        error=kept.error,
        rescued=kept.outcome == AttemptOutcome.RESCUED,
    )


@dataclass(frozen=True)
class Bar:
    """A span on a 0-100 axis, for an SVG rect: where it starts and how wide it is."""

    x: float
    width: float


@dataclass(frozen=True)
class StepView:
    name: str
    node: NodeRecord | None  # None: planned, not reached (yet)
    bar: Bar | None
    attempts: list[Attempt]
    subflows: list[RunLink]
    # A parked sleep or wait (parking.parked_as): SLEEPING or AWAITING_EVENT, shown
    # instead of its PENDING row's status, with when it wakes (None: no timeout).
    parked: str | None = None
    wakes_at: float | None = None

    @property
    def retries(self) -> int:
        """Attempts after the first that were not rescues."""
        if self.node is None:
            return 0
        return max(0, self.node.attempt - 1 - self.node.rescues)


@dataclass(frozen=True)
class Stage:
    """One position of the plan: a step, or parallel siblings shown side by side."""

    position: int
    steps: list[StepView]


def timeline(
    flow: FlowRecord, nodes: Sequence[NodeRecord], children: Sequence[RunLink], now: float
) -> list[Stage]:
    """The run's stages in plan order, each step with its bar on the run's time axis;
    then its compensations (``compensate:<step>`` nodes, not in the plan), one stage
    each, in the order they were started (see compensation.py)."""
    by_name = {node.step_name: node for node in nodes}
    start = flow.created_at
    end = max([now if flow.finished_at is None else flow.finished_at, start + 0.001])
    stages = []
    planned_stages = [[step.name for step in stage] for stage in flow.plan.stages]
    for position, planned in enumerate(planned_stages or _stages_of(nodes)):
        steps = [
            _step_view(flow, name, by_name.get(name), children, start, end, now) for name in planned
        ]
        stages.append(Stage(position=position, steps=steps))
    if planned_stages:  # else _stages_of has listed every node, compensations too
        undone = [n for n in nodes if compensation.is_compensation(n.step_name)]
        for node in sorted(undone, key=lambda n: n.position):
            view = _step_view(flow, node.step_name, node, children, start, end, now)
            stages.append(Stage(position=node.position, steps=[view]))
    return stages


def _step_view(
    flow: FlowRecord,
    name: str,
    node: NodeRecord | None,
    children: Sequence[RunLink],
    start: float,
    end: float,
    now: float,
) -> StepView:
    return StepView(
        name=name,
        node=node,
        bar=_bar(node, start, end, now),
        attempts=attempts_of(node) if node else [],
        subflows=[c for c in children if c.step_name == name],
        parked=parking.parked_as(flow, node) if node else None,
        wakes_at=parking.wakes_at(node) if node else None,
    )


def _stages_of(nodes: Sequence[NodeRecord]) -> list[list[str]]:
    """Stages from the nodes alone, for a run whose plan cannot be read."""
    stages: dict[int, list[str]] = {}
    for node in nodes:
        stages.setdefault(node.position, []).append(node.step_name)
    return [stages[p] for p in sorted(stages)]


def _bar(node: NodeRecord | None, start: float, end: float, now: float) -> Bar | None:
    if node is None or node.started_at is None:
        return None
    span = end - start
    left = _clamp((node.started_at - start) / span)
    finished = node.finished_at if node.finished_at is not None else now
    right = _clamp((finished - start) / span)
    return Bar(x=round(left * 100, 2), width=round(max(right - left, 0.005) * 100, 2))


def _clamp(fraction: float) -> float:
    return min(1.0, max(0.0, fraction))


@dataclass(frozen=True)
class Column:
    """One slice of the activity chart: a completed bar and a failed bar on 0-100."""

    slice: ActivitySlice
    completed_height: float
    failed_height: float


def activity_columns(slices: Sequence[ActivitySlice]) -> list[Column]:
    """Bar heights scaled to the busiest slice (completed and failed on one scale)."""
    peak = max([1, *(s.completed for s in slices), *(s.failed for s in slices)])
    return [
        Column(
            slice=s,
            completed_height=round(100 * s.completed / peak, 2),
            failed_height=round(100 * s.failed / peak, 2),
        )
        for s in slices
    ]


def shown_json(value: Any) -> str:
    """A payload as indented JSON, cut at MAX_SHOWN_CHARS."""
    text = json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True, default=str)
    return shown_text(text)


def shown_text(text: str | None) -> str:
    if text is None:
        return ""
    if len(text) <= MAX_SHOWN_CHARS:
        return text
    return (
        f"{text[:MAX_SHOWN_CHARS]}\n... ({len(text) - MAX_SHOWN_CHARS} more characters not shown)"
    )

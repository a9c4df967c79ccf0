"""A plan's version: a short hash of its stages, the same in every process.

`flowsmith status` shows it and a worker names it when a run's step is missing
from its code, so two readers (today's worker, tomorrow's CLI, another Python)
must compute the same text for the same plan, and a different one whenever the
steps differ in what the run keeps.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace

import pytest

from flowsmith_worker import Flow
from flowsmith_worker.plan import Plan, PlannedStep

PLAN = Plan(
    stages=(
        (PlannedStep("a", 1),),
        (PlannedStep("b", 3), PlannedStep("c", 1, subflow=True)),
    ),
    module="shop.flows",
)
# `printf '%s' '<the canonical JSON of PLAN's stages>' | sha256sum | cut -c1-12`,
# computed outside Python: the version is that hash and nothing of this process.
PLAN_VERSION = "03968da1f245"


def test_the_version_is_the_sha256_of_the_canonical_json_of_the_stages() -> None:
    """The version of a known plan is the literal computed by sha256sum from its
    canonical JSON (sorted keys, no spaces): nothing of Python's hash() or of the
    module enters it."""
    assert PLAN.version == PLAN_VERSION
    assert replace(PLAN, module="elsewhere").version == PLAN_VERSION


def test_the_version_is_the_same_in_another_process_with_another_hash_seed() -> None:
    """A fresh interpreter with a different PYTHONHASHSEED, reading the plan from its
    stored JSON, computes the same version."""
    script = (
        "import sys; from flowsmith_worker.plan import Plan; "
        "print(Plan.from_json(sys.stdin.read()).version)"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        input=PLAN.to_json(),
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "12345", "PATH": ""},
    )
    assert result.stdout.strip() == PLAN_VERSION


@pytest.mark.parametrize(
    "changed",
    [
        pytest.param(
            ((PlannedStep("a", 1),), (PlannedStep("b2", 3), PlannedStep("c", 1, True))),
            id="a step renamed",
        ),
        pytest.param(((PlannedStep("a", 1),), (PlannedStep("b", 3),)), id="a step removed"),
        pytest.param(
            ((PlannedStep("a", 1),), (PlannedStep("b", 2), PlannedStep("c", 1, True))),
            id="retries changed",
        ),
        pytest.param(
            (
                (PlannedStep("a", 1, max_rescues=0),),
                (PlannedStep("b", 3), PlannedStep("c", 1, True)),
            ),
            id="max_rescues changed",
        ),
        pytest.param(
            ((PlannedStep("a", 1),), (PlannedStep("c", 1, True), PlannedStep("b", 3))),
            id="a group reordered",
        ),
        pytest.param(
            ((PlannedStep("a", 1),), (PlannedStep("b", 3),), (PlannedStep("c", 1, True),)),
            id="a group split",
        ),
        pytest.param(
            ((PlannedStep("a", 1),), (PlannedStep("b", 3), PlannedStep("c", 1))),
            id="a subflow made a step",
        ),
    ],
)
def test_every_change_the_run_keeps_changes_the_version(
    changed: tuple[tuple[PlannedStep, ...], ...],
) -> None:
    """Each change a deploy can make to what a run keeps gives another version."""
    assert Plan(stages=changed, module=PLAN.module).version != PLAN_VERSION


def test_what_stays_code_does_not_change_the_version(unique: Callable[[str], str]) -> None:
    """A step's function, timeout and backoff are not in the plan: changing them keeps
    the flow's version (its runs go on with the new code, see docs of plan.py)."""

    def one(_ctx: object) -> int:
        return 1

    def two(_ctx: object) -> int:
        return 2

    before = Flow(unique("before")).step("s", one, retries=1)
    after = Flow(unique("after")).step("s", two, retries=1, timeout=5, backoff=3)
    assert before.plan().version == after.plan().version

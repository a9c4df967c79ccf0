"""The chaos run's events and sleeps (tests/torture/chaos_events.py): its checks refuse
what the engine must never do, and a calm round sends every kind of event.

The chaos itself (kills, restarts) with events in it is test_chaos.py's short run.
"""

from __future__ import annotations

import collections
import itertools
import json
import random
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from flowsmith_worker.records import AttemptRecord, NodeRecord
from flowsmith_worker.storage.base import AttemptOutcome, FlowStatus, NodeStatus
from tests.torture import model
from tests.torture.chaos import Database, Record, Settings, make_plans, play
from tests.torture.chaos_check import Call, check_node, check_round
from tests.torture.chaos_events import EVENTS_FILE, check_sleep, check_wait
from tests.torture.chaos_flows import CHILD_STARTED, SLEEP, WAIT

SEED = 20261201
WAIT_NAME = "s1_1"
P, C = AttemptOutcome.PARKED, AttemptOutcome.COMPLETED


def node(
    name: str, output: Any, wake_at: float | None, *attempts: tuple[AttemptOutcome, float]
) -> NodeRecord:
    """A COMPLETED node whose attempts 1, 2, ... ended with these outcomes, each started
    at its time and ended a tenth of a second later."""
    made = tuple(
        AttemptRecord(1, 1, name, number, "w", start, start + 0.1, outcome, None)
        for number, (outcome, start) in enumerate(attempts, 1)
    )
    return NodeRecord(
        1, 1, name, 0, 0, NodeStatus.COMPLETED, len(made), len(made), 0, 0.0, None, None,
        {}, output, None, 0.0, 1.0, attempts=made, wake_at=wake_at,
    )  # fmt: skip


def said(*answers: tuple[str, str]) -> list[dict[str, Any]]:
    return [
        {"run": "r", "wait": WAIT_NAME, "why": why, "answer": answer} for why, answer in answers
    ]


PAYLOAD = model.payload_of(WAIT_NAME)
WOKEN = node(WAIT_NAME, PAYLOAD, None, (P, 1.0), (C, 2.0))
GOOD = said(
    (model.FIRST, model.WOKE),
    (model.AGAIN_SAME_KEY, model.NOT_DELIVERED),
    (model.LATE, model.REFUSED_OVER),
)


def test_the_event_checks_accept_what_the_engine_may_do() -> None:
    """A wait woken by its event, sent again with its key, refused once the run is over;
    and one whose first answer was lost (the retry with its key found it stored)."""
    assert check_wait(FlowStatus.COMPLETED, WOKEN, GOOD) == []
    lost_answer = said((model.FIRST, model.NOT_DELIVERED), (model.LATE, model.REFUSED_OVER))
    assert check_wait(FlowStatus.COMPLETED, WOKEN, lost_answer) == []
    failed_first = said((model.FIRST, model.REFUSED_OVER), (model.LATE, model.REFUSED_OVER))
    assert check_wait(FlowStatus.FAILED, None, failed_first) == []


@pytest.mark.parametrize(
    ("status", "wait", "answers", "problem"),
    [
        # The same event delivered twice (its idempotency key not honoured).
        (FlowStatus.COMPLETED, WOKEN, said(
            (model.FIRST, model.WOKE), (model.AGAIN_SAME_KEY, model.DELIVERED),
            (model.LATE, model.REFUSED_OVER),
        ), "delivered 2 times"),
        # An event accepted by a run that was over.
        (FlowStatus.COMPLETED, WOKEN, said(
            (model.FIRST, model.WOKE), (model.LATE, model.DELIVERED)
        ), "not refused"),
        # The wait's output is not the payload sent.
        (FlowStatus.COMPLETED, replace(WOKEN, output={"other": 1}), GOOD, "not the payload"),
        # Completed with no event delivered to it.
        (FlowStatus.COMPLETED, WOKEN, said((model.LATE, model.REFUSED_OVER)), "no event was"),
        # Refused as a second event though every send carried the wait's key.
        (FlowStatus.FAILED, None, said(
            (model.FIRST, model.REFUSED_SENT), (model.LATE, model.REFUSED_OVER)
        ), "every send had its key"),
        # Refused by a run that then completed: it cannot have been over.
        (FlowStatus.COMPLETED, WOKEN, said(
            (model.FIRST, model.REFUSED_OVER), (model.AGAIN_SAME_KEY, model.WOKE),
            (model.LATE, model.REFUSED_OVER),
        ), "refused though its run ended"),
    ],
)  # fmt: skip
def test_the_event_checks_refuse_what_the_engine_must_never_do(
    status: FlowStatus, wait: NodeRecord | None, answers: list[dict[str, Any]], problem: str
) -> None:
    """Each promise about events is checked: breaking it is reported."""
    problems = check_wait(status, wait, answers)
    assert any(problem in found for found in problems), problems


def test_the_sleep_check_refuses_a_wake_before_its_time() -> None:
    """A sleep parked at 1.0 until 3.0 must resume at 3.0 or later (database clock)."""
    assert check_sleep(node("nap", None, 3.0, (P, 1.0), (C, 3.2))) == []
    assert check_sleep(node("nap", None, 3.0, (P, 1.0), (C, 2.5)))


def seed_with_sleeps_and_waits(start: int) -> int:
    """The first seed from ``start`` whose flows have both a sleep and a wait: which kinds
    a seed draws changes whenever the flows' generator learns a new kind (maps did)."""
    for seed in itertools.count(start):
        plans = make_plans(random.Random(seed), Settings(seed, "sqlite", 0.0, 60).flows, "probe")
        if {SLEEP, WAIT} <= {step.kind for plan in plans for step in plan.steps()}:
            return seed
    raise AssertionError("unreachable: itertools.count never ends")


@pytest.mark.slow
def test_a_calm_round_sends_every_kind_of_event(tmp_path: Path) -> None:
    """A round without chaos on SQLite (fixed seed) has sleeps and waits; its events are
    sent before the runs reach their waits and once the waits parked, again with their
    key, and late to finished runs, each answered as it must be; every check passes."""
    path = tmp_path / "calm.db"
    database = Database(f"sqlite:///{path}", "sqlite", path=path)
    played = play(Settings(seed_with_sleeps_and_waits(SEED), "sqlite", 0.0, 60), database, tmp_path)
    assert check_round(played, database.url) == []
    kinds = {step.kind for plan in played.plans.values() for step in plan.steps()}
    assert {SLEEP, WAIT} <= kinds
    lines = [json.loads(line) for line in (tmp_path / EVENTS_FILE).read_text().splitlines()]
    answers = collections.Counter((line["why"], line["answer"]) for line in lines)
    for seen in [
        (model.FIRST, model.DELIVERED),
        (model.FIRST, model.WOKE),
        (model.AGAIN_SAME_KEY, model.NOT_DELIVERED),
        (model.LATE, model.REFUSED_OVER),
    ]:
        assert answers[seen], (seen, answers)


def test_a_subflow_start_finding_its_run_over_is_no_lost_worker() -> None:
    """Regression (found by the chaos run with events, seed 485654983, PostgreSQL; not
    about events): a subflow step's start ran (journaled "child started") while a
    sibling failed the run, so start_subflow started no child and ended the attempt
    CANCELLED with its worker alive. The check took it for a lost worker's attempt."""
    start = AttemptRecord(1, 1, "s3_0", 1, "w", 0.0, 0.2, AttemptOutcome.CANCELLED, None)
    trace = replace(node("s3_0", None, None), status=NodeStatus.CANCELLED, attempts=(start,))
    calls = {("r", "s3_0", 1): [Call(100, 0.0, 0.1, CHILD_STARTED)]}
    assert check_node(trace, calls, Record()) == []
    # A plain step's call that completed is no such case: still reported.
    plain = {("r", "s3_0", 1): [Call(100, 0.0, 0.1, "completed")]}
    assert check_node(trace, plain, Record()) != []

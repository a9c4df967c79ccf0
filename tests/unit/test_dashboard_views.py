"""The dashboard's pure parts: what the pages compute from records (views.py), and the
prefix bound of the storage's tracking_id search."""

from __future__ import annotations

import dataclasses

from flowsmith_worker.dashboard import views
from flowsmith_worker.parking import FOREVER
from flowsmith_worker.plan import SLEEP, WAIT_FOR_EVENT, Plan, PlannedStep
from flowsmith_worker.storage.base import (
    RESCUE_ERROR,
    ActivitySlice,
    AttemptOutcome,
    AttemptRecord,
    FlowRecord,
    FlowStatus,
    NodeRecord,
    NodeStatus,
    RunLink,
)
from flowsmith_worker.storage.sql.dashboard import error_message
from flowsmith_worker.storage.sql.dialects.base import successor

PLAN = Plan(
    stages=(
        (PlannedStep("fetch", 1),),
        (PlannedStep("left", 1), PlannedStep("right", 1)),
        (PlannedStep("pay", 1, subflow=True),),
    )
)
RUN = FlowRecord(
    id=1,
    flow_name="order",
    tracking_id="o-1",
    status=FlowStatus.RUNNING,
    input={},
    output=None,
    error=None,
    plan=PLAN,
    queue="default",
    priority=0,
    parent_node_id=None,
    created_at=100.0,
    updated_at=150.0,
    finished_at=None,
)


def node(name: str, position: int, **changes: object) -> NodeRecord:
    made = NodeRecord(
        id=position + 10,
        flow_id=1,
        step_name=name,
        position=position,
        group_index=0,
        status=NodeStatus.COMPLETED,
        attempt=1,
        max_attempts=1,
        rescues=0,
        run_after=100.0,
        lease_owner="worker-1",
        lease_expires_at=None,
        input={},
        output=None,
        error=None,
        started_at=100.0,
        finished_at=120.0,
    )
    return dataclasses.replace(made, **changes)  # type: ignore[arg-type]


def test_the_timeline_keeps_plan_order_with_siblings_side_by_side() -> None:
    """Stages follow the plan; parallel siblings share a stage; a step not reached yet has
    no node and no bar; bars sit on the run's axis from its creation to now."""
    nodes = [
        node("fetch", 0),
        node("left", 1, started_at=120.0, finished_at=140.0),
        node("right", 1, status=NodeStatus.RUNNING, started_at=120.0, finished_at=None),
    ]
    child = RunLink("o-1:pay", "payment", "pay")
    stages = views.timeline(RUN, nodes, [child], now=200.0)
    assert [[step.name for step in stage.steps] for stage in stages] == [
        ["fetch"],
        ["left", "right"],
        ["pay"],
    ]
    fetch, (left, right), pay = stages[0].steps[0], stages[1].steps, stages[2].steps[0]
    assert fetch.bar == views.Bar(x=0.0, width=20.0)
    assert left.bar == views.Bar(x=20.0, width=20.0)
    assert right.bar == views.Bar(x=20.0, width=80.0)  # running: up to now
    assert pay.node is None and pay.bar is None and pay.subflows == [child]


def test_a_parked_node_shows_what_it_waits_for_and_until_when() -> None:
    """A parked sleep is SLEEPING and a parked wait AWAITING_EVENT, each with its wake
    time (none for a wait without timeout), a plain step waiting for its rate limit's
    turn RATE_LIMITED with its turn; a PENDING node that is not parked (a retry
    waiting for its backoff) keeps its own status."""
    plan = Plan(
        stages=(
            (PlannedStep("nap", 1, kind=SLEEP),),
            (PlannedStep("approval", 1, kind=WAIT_FOR_EVENT),),
            (PlannedStep("forever", 1, kind=WAIT_FOR_EVENT),),
            (PlannedStep("retry_me", 2),),
            (PlannedStep("limited", 1),),
        )
    )
    run = dataclasses.replace(RUN, plan=plan)
    pending = {"status": NodeStatus.PENDING, "finished_at": None}
    nodes = [
        node("nap", 0, wake_at=500.0, **pending),
        node("approval", 1, wake_at=900.0, **pending),
        node("forever", 2, wake_at=FOREVER, **pending),
        node("retry_me", 3, **pending),
        node("limited", 4, wake_at=700.0, **pending),
    ]
    steps = [stage.steps[0] for stage in views.timeline(run, nodes, [], now=200.0)]
    assert [(s.parked, s.wakes_at) for s in steps] == [
        ("SLEEPING", 500.0),
        ("AWAITING_EVENT", 900.0),
        ("AWAITING_EVENT", None),
        (None, None),
        ("RATE_LIMITED", 700.0),
    ]


def attempt(number: int, outcome: AttemptOutcome, error: str | None = None) -> AttemptRecord:
    return AttemptRecord(
        node_id=10,
        flow_id=1,
        step_name="fetch",
        attempt=number,
        worker_id=f"worker-{number}",
        started_at=100.0 + number,
        ended_at=100.5 + number,
        outcome=outcome,
        error=error,
    )


def test_every_kept_attempt_is_shown_in_full_and_rescues_are_marked() -> None:
    """Three attempts kept (failed, rescued, failed): each with its own worker, times
    and error, the rescued one marked; the step counts one retry and one rescue. A
    node whose attempts were not kept (made before schema 5) lists them by number."""
    kept = (
        attempt(1, AttemptOutcome.FAILED, "Traceback\nValueError: first"),
        attempt(2, AttemptOutcome.RESCUED, RESCUE_ERROR),
        attempt(3, AttemptOutcome.FAILED, "Traceback\nValueError: no"),
    )
    failed = node("fetch", 0, attempt=3, rescues=1, error="Traceback\nValueError: no")
    attempts = views.attempts_of(dataclasses.replace(failed, attempts=kept))
    assert [(a.number, a.known, a.worker) for a in attempts] == [
        (1, True, "worker-1"),
        (2, True, "worker-2"),
        (3, True, "worker-3"),
    ]
    assert [a.rescued for a in attempts] == [False, True, False]
    assert attempts[0].error == kept[0].error and attempts[0].finished_at == 101.5
    step = views.timeline(dataclasses.replace(RUN, plan=Plan(stages=())), [failed], [], 200)
    assert step[0].steps[0].retries == 1
    assert views.attempts_of(node("fetch", 0, attempt=0)) == []
    assert [(a.number, a.known) for a in views.attempts_of(failed)] == [
        (1, False),
        (2, False),
        (3, False),
    ]


def test_activity_bars_share_one_scale() -> None:
    """The busiest slice, completed or failed, is 100 high; an empty hour draws nothing."""
    slices = [ActivitySlice(0, 1, 4, 0), ActivitySlice(1, 2, 2, 8), ActivitySlice(2, 3, 0, 0)]
    columns = views.activity_columns(slices)
    assert [(c.completed_height, c.failed_height) for c in columns] == [
        (50.0, 0.0),
        (25.0, 100.0),
        (0.0, 0.0),
    ]
    assert views.activity_columns([ActivitySlice(0, 1, 0, 0)])[0].completed_height == 0


def test_a_large_payload_is_cut_and_says_so() -> None:
    """Up to MAX_SHOWN_CHARS characters are shown, then how many more there were."""
    big = "x" * (views.MAX_SHOWN_CHARS + 10)
    assert views.shown_text(big).endswith("(10 more characters not shown)")
    assert views.shown_json({"a": "<b>"}) == '{\n  "a": "<b>"\n}'


def test_the_prefix_bound_is_the_next_string_in_code_point_order() -> None:
    """The successor of a prefix bounds exactly the strings that start with it."""
    assert successor("order-") == "order."
    assert successor("a\U0010ffff") == "b"
    assert successor("\U0010ffff") is None
    assert successor("x\ud7ff") == "x\ue000"  # skips the surrogates, which UTF-8 never holds


def test_an_error_message_is_its_last_line() -> None:
    assert error_message("Traceback (most recent call last):\n  ...\nKeyError: 'x'\n") == (
        "KeyError: 'x'"
    )
    assert error_message(None) == "(no error recorded)"


def test_a_runs_compensations_follow_its_steps_in_the_order_they_ran() -> None:
    """A failed run's ``compensate:<step>`` nodes are not in its plan: the timeline shows
    them after the planned stages, one stage each, in the order they were started
    (their positions), each with its node and bar."""
    failed = dataclasses.replace(RUN, status=FlowStatus.COMPENSATING)
    nodes = [
        node("fetch", 0),
        node("left", 1),
        node("right", 1, status=NodeStatus.FAILED),
        node("compensate:left", 5, status=NodeStatus.RUNNING, finished_at=None),
        node("compensate:fetch", 6, status=NodeStatus.PENDING, started_at=None),
    ]
    stages = views.timeline(failed, nodes, [], now=200.0)
    assert [[step.name for step in stage.steps] for stage in stages] == [
        ["fetch"],
        ["left", "right"],
        ["pay"],
        ["compensate:left"],
        ["compensate:fetch"],
    ]
    undo_left, undo_fetch = stages[3].steps[0], stages[4].steps[0]
    assert undo_left.node is nodes[3] and undo_left.bar is not None
    assert undo_fetch.node is nodes[4] and undo_fetch.bar is None
    assert [stage.position for stage in stages[3:]] == [5, 6]

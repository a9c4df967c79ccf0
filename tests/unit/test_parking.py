"""The pure decisions of parking.py: when a claimed sleep or wait is over, and what
parking does to its node. A table of cases each (no database, no clock)."""

from __future__ import annotations

import pytest

from flowsmith_worker import parking, progress
from flowsmith_worker.records import AttemptOutcome, FlowStatus, NodeStatus

NOW = 1_000.0


@pytest.mark.parametrize(
    ("wake_at", "first_deadline", "event_came", "expected"),
    [
        # First arrival: parks until its deadline, or is over if that has passed.
        (None, NOW + 30, False, parking.Park(NOW + 30)),
        (None, NOW - 1, False, parking.Wake(by_event=False)),
        (None, NOW, False, parking.Wake(by_event=False)),
        # Claimed again: its stored wake time decides, not a new deadline (a sleep of
        # N seconds does not start over at each claim).
        (NOW + 5, NOW + 30, False, parking.Park(NOW + 5)),
        (NOW - 5, NOW + 30, False, parking.Wake(by_event=False)),
        # An event ends the wait whatever its time.
        (None, parking.FOREVER, True, parking.Wake(by_event=True)),
        (NOW + 5, NOW + 30, True, parking.Wake(by_event=True)),
        (NOW - 5, NOW + 30, True, parking.Wake(by_event=True)),
    ],
)
def test_decide(
    wake_at: float | None,
    first_deadline: float,
    event_came: bool,
    expected: parking.Wake | parking.Park,
) -> None:
    """Over when its event came or its wake time has passed; else parked until it."""
    decided = parking.decide(
        now=NOW, wake_at=wake_at, first_deadline=first_deadline, event_came=event_came
    )
    assert decided == expected


@pytest.mark.parametrize(
    ("seconds", "until", "expected"),
    [(30.0, None, NOW + 30), (None, 1234.5, 1234.5), (None, None, parking.FOREVER)],
)
def test_deadline(seconds: float | None, until: float | None, expected: float) -> None:
    """An instant is kept, seconds count from now, and neither is a wait without end."""
    assert parking.deadline(NOW, seconds, until) == expected


def test_parking_gives_the_attempt_back_and_keeps_it_as_parked() -> None:
    """A parked node runs again at its wake time without using up an attempt; a run
    that is over starts nothing more, as for any node that would run again."""
    fate = parking.park(FlowStatus.RUNNING, now=NOW, until=NOW + 7)
    assert fate == progress.Retry(
        delay=7, gives_back_attempt=True, superseded_as=AttemptOutcome.PARKED
    )
    assert parking.park(FlowStatus.CANCELLED, now=NOW, until=NOW + 7).status == (
        NodeStatus.CANCELLED
    )
    assert parking.park(FlowStatus.FAILED, now=NOW, until=NOW + 7).status == NodeStatus.CANCELLED

"""rate_limits.py: reading a rate limit (and refusing one that cannot be read), and the
bucket's pure decisions: its burst and refill, and the waiting line."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from flowsmith_worker import Flow
from flowsmith_worker.decorators import step, workflow
from flowsmith_worker.errors import InvalidFlowDefinition
from flowsmith_worker.rate_limits import Bucket, RateLimit, Take, Wait, decide, parse

NEW = Bucket(0.0, 0.0)


@pytest.mark.parametrize(
    ("written", "count", "period"),
    [("100/m", 100, 60.0), (" 5 / s ", 5, 1.0), ("1/h", 1, 3600.0)],
)
def test_a_rate_limit_reads_count_per_unit(written: str, count: int, period: float) -> None:
    """COUNT/UNIT with s, m or h, spaces allowed around the parts."""
    rate = parse(written, step="s")
    assert (rate.count, rate.period) == (count, period)


def starts(rate: RateLimit, times: list[float]) -> tuple[list[float], Bucket]:
    """The instants among ``times`` at which a fresh start takes a token."""
    bucket, taken = NEW, []
    for now in times:
        decision = decide(rate, bucket, now=now, waited=False)
        bucket = decision.bucket
        if isinstance(decision, Take):
            taken.append(now)
    return taken, bucket


def test_a_full_bucket_lets_its_count_start_at_once_then_one_per_interval() -> None:
    """5/s: five starts at the same instant, the sixth refused; then one start per
    0.2 s, as the tokens come back."""
    rate = parse("5/s", step="s")
    taken, _ = starts(rate, [100.0] * 6)
    assert taken == [100.0] * 5
    taken, _ = starts(rate, [100.0] * 5 + [100.1, 100.2, 100.3, 100.4])
    assert taken == [100.0] * 5 + [100.2, 100.4]


def test_refused_starts_get_turns_one_interval_apart_and_fresh_ones_queue_behind() -> None:
    """Three refusals of an empty 5/s bucket get turns 0.2 s apart from the next
    token's instant; a fresh start before the last turn is refused too (it queues
    behind), while a waiter whose turn has come takes its token."""
    rate = parse("5/s", step="s")
    _, bucket = starts(rate, [100.0] * 5)
    turns = []
    for _ in range(3):
        decision = decide(rate, bucket, now=100.0, waited=False)
        assert isinstance(decision, Wait)
        turns.append(decision.until)
        bucket = decision.bucket
    assert turns == pytest.approx([100.2, 100.4, 100.6])
    assert isinstance(decide(rate, bucket, now=100.2, waited=True), Take)
    assert isinstance(decide(rate, bucket, now=100.2, waited=False), Wait)


@pytest.mark.parametrize(
    ("written", "complaint"),
    [
        ("100 per minute", "is not COUNT/UNIT"),
        ("100/d", "is not COUNT/UNIT"),
        ("0/m", "at least 1"),
        ("-5/m", "at least 1"),
        (100, "must be a string"),
    ],
)
def test_a_rate_limit_that_cannot_be_read_is_refused_naming_its_step(
    unique: Callable[[str], str], written: Any, complaint: str
) -> None:
    """Flow.step and @step refuse a rate limit they cannot read, saying which step and
    how to write one, before anything runs."""
    with pytest.raises(InvalidFlowDefinition, match=complaint) as refused:
        Flow(unique("bad")).step("send_email", lambda ctx: None, rate_limit=written)
    assert "'send_email'" in str(refused.value)
    with pytest.raises(InvalidFlowDefinition, match=complaint):

        @workflow(unique("bad_decorated"))
        def bad() -> None:
            @step(rate_limit=written)
            def send_email(ctx: Any) -> None: ...

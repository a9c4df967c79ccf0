"""Retry policy: how long to wait before the next attempt of a failed step.

The user-facing form is tenacity's wait strategies (``tenacity.wait_fixed(2)``,
``tenacity.wait_exponential_jitter(...)`` and their sums), or a number of
seconds. The result is stored as the node's ``run_after``: a retry waits in the
database, not in a sleeping thread, so it survives any worker's death.
"""

from __future__ import annotations

from collections.abc import Callable

import tenacity

WaitStrategy = Callable[[tenacity.RetryCallState], float]
Backoff = WaitStrategy | float | int

DEFAULT_INITIAL_SECONDS = 1.0
DEFAULT_MAX_SECONDS = 60.0


def fixed(seconds: float) -> WaitStrategy:
    """The same wait before every retry."""
    return tenacity.wait_fixed(seconds)


def exponential(
    initial: float = DEFAULT_INITIAL_SECONDS,
    maximum: float = DEFAULT_MAX_SECONDS,
    jitter: float = 1.0,
) -> WaitStrategy:
    """initial * 2**(n-1) seconds plus up to ``jitter`` random seconds, capped at ``maximum``."""
    return tenacity.wait_exponential_jitter(multiplier=initial, max=maximum, jitter=jitter)


DEFAULT_BACKOFF: WaitStrategy = exponential()


def as_wait_strategy(backoff: Backoff | None) -> WaitStrategy:
    """Validate ``backoff=`` when the step is defined, not when it first fails."""
    if backoff is None:
        return DEFAULT_BACKOFF
    if isinstance(backoff, bool) or not (isinstance(backoff, (int, float)) or callable(backoff)):
        raise TypeError(
            f"backoff={backoff!r}: give seconds (a number) or a tenacity wait strategy "
            "such as tenacity.wait_exponential_jitter(multiplier=1, max=60)"
        )
    if isinstance(backoff, (int, float)):
        if backoff < 0:
            raise ValueError(f"backoff={backoff}: seconds cannot be negative")
        return fixed(float(backoff))
    return backoff


def retry_delay(wait: WaitStrategy, failed_attempt: int) -> float:
    """Seconds to wait after attempt number ``failed_attempt`` (1-based) failed."""
    state = tenacity.RetryCallState(retry_object=None, fn=None, args=(), kwargs={})  # type: ignore[arg-type]
    state.attempt_number = failed_attempt
    return max(0.0, float(wait(state)))

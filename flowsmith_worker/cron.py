"""When: cron expressions and run_at instants checked as a flow is defined or started.

Pure parsing, apart from the scheduler service (schedule.py) that enqueues the
ticks: Flow imports this, and the scheduler imports Flow, never the reverse.
Expressions are parsed by croniter, in UTC; ``H`` fields are hashed on the
flow's name (see schedule.py for the decisions).
"""

from __future__ import annotations

from datetime import UTC, datetime

from croniter import CroniterError, croniter


def validate_cron(expression: str, hash_id: str = "") -> str:
    """The expression, stripped, if croniter accepts it and it ever fires; else ValueError."""
    if not isinstance(expression, str):
        raise ValueError(f"cron expression {expression!r}: must be a string")
    expr = " ".join(expression.split())
    fields = expr.split(" ")
    if not expr.startswith("@") and len(fields) != 5:
        raise ValueError(
            f"cron expression {expression!r}: needs the 5 fields 'minute hour day month "
            "weekday' (e.g. '*/5 * * * *') or an alias such as '@hourly'"
        )
    try:
        # Constructing parses it; asking for the next tick catches dates that never
        # come (``0 0 31 2 *``).
        croniter(expr, datetime.now(UTC), hash_id=hash_id or None).get_next(datetime)
    except (CroniterError, ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"invalid cron expression {expression!r}: {exc}") from None
    return expr


def instant_of(run_at: datetime) -> float:
    """``run_at`` (timezone-aware) in seconds since the epoch."""
    if not isinstance(run_at, datetime):
        raise TypeError(f"run_at={run_at!r}: must be a datetime")
    if run_at.tzinfo is None or run_at.utcoffset() is None:
        raise ValueError(
            f"run_at={run_at.isoformat()} is a naive datetime: pass tzinfo "
            "(e.g. datetime(..., tzinfo=UTC) or datetime.now(UTC) + timedelta(...))"
        )
    return run_at.timestamp()

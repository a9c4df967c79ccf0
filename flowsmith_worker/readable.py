"""Times, durations and worker ids as people read and type them.

Shared by the command line (cli/) and the web dashboard, which show the same
times the same way: pure functions, so a test renders any moment by giving
its own "now".
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime

WORKER_ID_WIDTH = 8

# A cell whose stored value cannot be shown (a time changed by hand, say).
UNREADABLE_CELL = "UNREADABLE"


def _moment(seconds: object) -> datetime | None:
    """Seconds since the epoch as a UTC datetime; None if a hand-edited value is no time."""
    try:
        return datetime.fromtimestamp(float(seconds), tz=UTC)  # type: ignore[arg-type]
    except (ValueError, TypeError, OverflowError, OSError):
        return None


def format_time(seconds: float | None) -> str:
    """UTC ISO-8601 to the second: 2024-05-01T12:00:03Z; '-' for None."""
    if seconds is None:
        return "-"
    moment = _moment(seconds)
    # A time column changed by hand ('abc', Infinity): one cell, not the listing.
    return UNREADABLE_CELL if moment is None else moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def iso_time(seconds: object) -> str | None:
    """UTC ISO-8601 to the millisecond, for --json: 2024-05-01T12:00:03.900Z; None if no time."""
    moment = None if seconds is None else _moment(seconds)
    return None if moment is None else moment.isoformat(timespec="milliseconds")[:-6] + "Z"


def format_duration(seconds: float | None) -> str:
    """Human: 350ms, 1.2s, 3m05s, 2h07m, 3d04h; '-' for None."""
    if seconds is None:
        return "-"
    try:
        value = max(0.0, float(seconds))
    except (TypeError, ValueError):
        return UNREADABLE_CELL
    if not math.isfinite(value):
        return UNREADABLE_CELL
    if round(value * 1000) < 1000:
        return f"{round(value * 1000)}ms"
    if round(value, 1) < 60:
        return f"{value:.1f}s"
    return _whole_span(round(value))


def _whole_span(seconds: int) -> str:
    """45s, 3m05s, 2h07m, 3d04h: two units at most, as people read them."""
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        minutes, secs = divmod(seconds, 60)
        return f"{minutes}m{secs:02d}s"
    if seconds < 86400:
        hours, rest = divmod(seconds, 3600)
        return f"{hours}h{rest // 60:02d}m"
    days, rest = divmod(seconds, 86400)
    return f"{days}d{rest // 3600:02d}h"


def format_relative(seconds: float | None, now: float) -> str:
    """A time as seen from ``now``: '3s ago', '2h07m ago', 'in 9m59s'; '-' for None.

    ``now`` is the database clock (Storage.current_time), the clock every stored
    time comes from; a test gives its own.
    """
    if seconds is None:
        return "-"
    try:
        delta = round(now - float(seconds))
    except (TypeError, ValueError, OverflowError):
        return UNREADABLE_CELL
    return f"{_whole_span(delta)} ago" if delta >= 0 else f"in {_whole_span(-delta)}"


def format_moment(seconds: float | None, now: float, wide: bool) -> str:
    """The ISO time with --wide, where columns may be long; the relative time otherwise."""
    return format_time(seconds) if wide else format_relative(seconds, now)


def format_both(seconds: float | None, now: float) -> str:
    """2024-05-01T12:00:03Z (3m05s ago): for a line of its own, where there is room."""
    if seconds is None:
        return "-"
    absolute = format_time(seconds)
    return (
        absolute if absolute == UNREADABLE_CELL else f"{absolute} ({format_relative(seconds, now)})"
    )


def short_worker(worker_id: str | None) -> str:
    return worker_id[:WORKER_ID_WIDTH] if worker_id else "-"


# -- what people type ------------------------------------------------------------

_UNIT_SECONDS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_DURATION = re.compile(r"(?:\d+(?:\.\d+)?[smhdw])+")


def parse_duration(text: str) -> float | None:
    """Seconds in '45s', '30m', '2h', '7d', '2w' or '1h30m'; None if it is not a duration."""
    cleaned = text.strip().lower()
    if not _DURATION.fullmatch(cleaned):
        return None
    return sum(float(n) * _UNIT_SECONDS[unit] for n, unit in _DURATION_PART.findall(cleaned))


def parse_when(text: str) -> float | None:
    """Seconds since the epoch for an ISO date/datetime (UTC if naive); None if it is not one.

    A duration ago ('2h') is not resolved here: Since leaves it to the database
    clock (Ago), as this host's may be off.
    """
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()

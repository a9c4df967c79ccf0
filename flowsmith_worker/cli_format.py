"""Parsing and printing for the operator commands: durations, times, tables, JSON.

Pure functions and click parameter types, so the commands in cli_ops.py stay
about what they ask the storage.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import Decimal
from enum import Enum
from typing import TYPE_CHECKING, Any

import click

# Re-exported: the CLI's modules import it from here.
from flowsmith_worker.terminal import printable as printable

WORKER_ID_WIDTH = 8
ERROR_WIDTH = 72


# -- parameters ---------------------------------------------------------------

_UNIT_SECONDS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_DURATION = re.compile(r"(?:\d+(?:\.\d+)?[smhdw])+")
_DURATION_HINT = "use a number and a unit: 45s, 30m, 2h, 7d, 2w (or 1h30m)"


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


@dataclasses.dataclass(frozen=True)
class Ago:
    """A duration before now (`--since 2h`), left for the database to resolve with its
    own clock: this host's may be off."""

    seconds: float


# click.ParamType is generic from click 8.4 on; pyproject allows click 8.1.
if TYPE_CHECKING:
    _FloatParam = click.ParamType[float]
    _MomentParam = click.ParamType[Ago | float]
else:
    _FloatParam = click.ParamType
    _MomentParam = click.ParamType


class Duration(_FloatParam):
    """A positive duration: 45s, 30m, 2h, 7d, 2w; converted to seconds."""

    name = "DURATION"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        if isinstance(value, int | float):
            seconds: float | None = float(value)
        else:
            seconds = parse_duration(str(value))
        if seconds is None:
            self.fail(f"{value!r} is not a duration: {_DURATION_HINT}", param, ctx)
        if seconds <= 0:
            self.fail(f"{value!r}: the duration must be more than 0", param, ctx)
        return seconds


class Since(_MomentParam):
    """A moment: a duration ago (30m, 2h, 7d) as Ago, or an ISO date/datetime in epoch seconds."""

    name = "WHEN"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> Ago | float:
        if isinstance(value, Ago):
            return value
        if isinstance(value, int | float):
            return float(value)
        ago = parse_duration(str(value))
        if ago is not None:
            return Ago(ago)
        moment = parse_when(str(value))
        if moment is None:
            self.fail(
                f"{value!r} is neither a duration ({_DURATION_HINT}) nor an ISO date or "
                "datetime (2024-05-01, 2024-05-01T12:00:00Z)",
                param,
                ctx,
            )
        return moment


def json_option(fn: Any) -> Any:
    return click.option(
        "--json", "as_json", is_flag=True, help="Print JSON (stable keys) for scripts."
    )(fn)


# -- formatting ---------------------------------------------------------------


# A cell whose stored value cannot be shown (a time changed by hand, say).
UNREADABLE_CELL = "UNREADABLE"


def format_time(seconds: float | None) -> str:
    """UTC ISO-8601 to the second: 2024-05-01T12:00:03Z; '-' for None."""
    if seconds is None:
        return "-"
    try:
        return datetime.fromtimestamp(float(seconds), tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (ValueError, TypeError, OverflowError, OSError):
        # A time column changed by hand ('abc', Infinity): one cell, not the listing.
        return UNREADABLE_CELL


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
    total = round(value)
    if total < 3600:
        minutes, secs = divmod(total, 60)
        return f"{minutes}m{secs:02d}s"
    if total < 86400:
        hours, rest = divmod(total, 3600)
        return f"{hours}h{rest // 60:02d}m"
    days, rest = divmod(total, 86400)
    return f"{days}d{rest // 3600:02d}h"


def short_worker(worker_id: str | None) -> str:
    return worker_id[:WORKER_ID_WIDTH] if worker_id else "-"


def last_line(text: str | None) -> str:
    lines = (text or "").strip().splitlines()
    return lines[-1].strip() if lines else ""


def clip(text: str, width: int = ERROR_WIDTH) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def echo(text: str = "", err: bool = False) -> None:
    """Print human-readable text: whatever it quotes from the database is made printable."""
    click.echo(printable(text), err=err)


def _cell(value: object) -> str:
    text = "-" if value is None or value == "" else str(value)
    # Escaped before the widths are measured, so the columns stay aligned.
    return printable(" ".join(text.split()) if any(c in text for c in "\t\r\n") else text)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Aligned plain-text columns, two spaces apart; numbers right-aligned."""
    cells = [list(headers), *([_cell(v) for v in row] for row in rows)]
    widths = [max(len(line[i]) for line in cells) for i in range(len(headers))]
    numeric = [
        bool(rows) and all(isinstance(row[i], int | float) for row in rows)
        for i in range(len(headers))
    ]
    lines = []
    for line in cells:
        padded = [
            text.rjust(width) if right else text.ljust(width)
            for text, width, right in zip(line, widths, numeric, strict=True)
        ]
        lines.append("  ".join(padded).rstrip())
    return "\n".join(lines)


def to_jsonable(value: Any) -> Any:
    """dataclasses as dicts, enums as their string values, tuples as lists."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_jsonable(dataclasses.asdict(value))
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, Decimal):
        value = float(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no Infinity or NaN; a hand-edited row may hold them
    if isinstance(value, dict):
        return {str(to_jsonable(k)): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    return value


def echo_json(value: Any) -> None:
    click.echo(json.dumps(to_jsonable(value), indent=2, sort_keys=True))

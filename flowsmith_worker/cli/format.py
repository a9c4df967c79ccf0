"""What the commands print: times (relative, UTC, ISO-8601), durations, colour, tables, JSON.

Pure functions, so the commands stay about what they ask the storage, and a
test renders any moment by giving its own "now".
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Collection, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from enum import Enum
from typing import Any

import click

# Re-exported: the CLI's modules import it from here.
from flowsmith_worker.terminal import printable as printable

WORKER_ID_WIDTH = 8


def json_option(fn: Any) -> Any:
    return click.option(
        "--json", "as_json", is_flag=True, help="Print JSON (stable keys) for scripts."
    )(fn)


# -- times and durations --------------------------------------------------------------


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


def last_line(text: str | None) -> str:
    lines = (text or "").strip().splitlines()
    return lines[-1].strip() if lines else ""


def clip(text: str, width: int) -> str:
    """``text`` cut to ``width`` characters, its end replaced by '...' when cut."""
    return text if len(text) <= width else text[: width - 3] + "..."


def echo(text: str = "", err: bool = False) -> None:
    """Print human-readable text: whatever it quotes from the database is made printable."""
    click.echo(printable(text), err=err)


# -- colour -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Styled:
    """Text shown in colour on a terminal, plain anywhere else (a pipe, a file, NO_COLOR)."""

    text: str
    fg: str | None = None
    bold: bool = False
    dim: bool = False

    def __str__(self) -> str:
        return self.text


_STATUS_STYLES = {
    "COMPLETED": Styled("", fg="green"),
    "FAILED": Styled("", fg="red", bold=True),
    "RUNNING": Styled("", fg="cyan"),
    "WAITING": Styled("", fg="blue"),
    "PENDING": Styled("", fg="yellow"),
    "CANCELLED": Styled("", fg="magenta"),
    "SKIPPED": Styled("", dim=True),
    UNREADABLE_CELL: Styled("", fg="red", bold=True),
}


def status_text(status: str) -> Styled:
    """A run's or step's status, in the colour of its meaning (red: FAILED, green: COMPLETED)."""
    return dataclasses.replace(_STATUS_STYLES.get(status, Styled("")), text=status)


def paint(value: object) -> str:
    """``value`` made printable, then coloured if it is Styled: for echo_painted."""
    text = printable(str(value))
    if not isinstance(value, Styled):
        return text
    return click.style(text, fg=value.fg, bold=value.bold or None, dim=value.dim or None)


def echo_painted(text: str = "") -> None:
    """Print text whose quoted parts were made printable already (by paint or format_table).

    Our own colour codes stay, for click to drop off a terminal; NO_COLOR
    (https://no-color.org) drops them everywhere.
    """
    click.echo(text, color=False if os.environ.get("NO_COLOR") else None)


# -- tables -------------------------------------------------------------------------------

TABLE_WIDTH = 100  # what a table fits in without --wide
MIN_SHRUNK_WIDTH = 10  # a column narrowed to fit keeps this much (or its header's width)
_GAP = "  "


def _cell(value: object) -> str:
    text = "-" if value is None or value == "" else str(value)
    # Escaped before the widths are measured, so the columns stay aligned.
    return printable(" ".join(text.split()) if any(c in text for c in "\t\r\n") else text)


def format_table(
    headers: Sequence[str],
    rows: Sequence[Sequence[object]],
    *,
    width: int | None = None,
    shrink: Collection[str] = (),
) -> str:
    """Aligned columns, two spaces apart; numbers right-aligned; Styled cells in colour.

    With ``width``, the columns named in ``shrink`` are narrowed, widest first,
    until a line fits, their longer cells cut with "...". Print the table with
    echo_painted: its cells are printable already.
    """
    values: list[Sequence[object]] = [headers, *rows]
    texts = [[_cell(v) for v in line] for line in values]
    widths = [max(len(line[i]) for line in texts) for i in range(len(headers))]
    if width is not None:
        widths = _fit(widths, headers, shrink, width)
    numeric = [
        bool(rows) and all(isinstance(row[i], int | float) for row in rows)
        for i in range(len(headers))
    ]
    lines = []
    for line_values, line_texts in zip(values, texts, strict=True):
        cells = []
        for value, text, column_width, right in zip(
            line_values, line_texts, widths, numeric, strict=True
        ):
            shown = clip(text, column_width)
            padding = " " * (column_width - len(shown))
            styled = (
                paint(dataclasses.replace(value, text=shown))
                if isinstance(value, Styled)
                else shown
            )
            cells.append(padding + styled if right else styled + padding)
        lines.append(_GAP.join(cells).rstrip())
    return "\n".join(lines)


def _fit(
    widths: list[int], headers: Sequence[str], shrink: Collection[str], limit: int
) -> list[int]:
    """Column widths narrowed, the widest shrinkable first, until a line is ``limit`` long."""
    fitted = list(widths)
    floors = [max(len(header), MIN_SHRUNK_WIDTH) for header in headers]
    shrinkable = [i for i, header in enumerate(headers) if header in shrink]
    excess = sum(fitted) + len(_GAP) * (len(fitted) - 1) - limit
    while excess > 0:
        candidates = [i for i in shrinkable if fitted[i] > floors[i]]
        if not candidates:
            break  # as narrow as they go: the line stays longer
        widest = max(candidates, key=lambda i: fitted[i])
        fitted[widest] -= 1
        excess -= 1
    return fitted


# -- JSON ---------------------------------------------------------------------------------

# The fields of the records that hold a time: ISO-8601 in --json, for people and jq alike.
TIME_FIELDS = frozenset(
    {
        "created_at",
        "updated_at",
        "finished_at",
        "started_at",
        "ended_at",
        "run_after",
        "lease_expires_at",
        "heartbeat_at",
    }
)


def record_for_json(record: Any) -> dict[str, Any]:
    """A record's fields for --json: its times in ISO-8601 UTC, a field that could not be
    read null (not its placeholder). Only the record's own fields: never a key of its
    input or output, which are the application's. Records inside it (a step's
    attempts) go through here in turn, by to_jsonable."""
    fields = {field.name: getattr(record, field.name) for field in dataclasses.fields(record)}
    fields.update({name: iso_time(fields[name]) for name in TIME_FIELDS & fields.keys()})
    fields.update(dict.fromkeys(getattr(record, "unreadable", {}), None))
    return fields


def to_jsonable(value: Any) -> Any:
    """Records as record_for_json, enums as their string values, tuples as lists."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_jsonable(record_for_json(value))
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

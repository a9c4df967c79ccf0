"""What the commands print: colour, tables, JSON (times and durations: readable.py).

Pure functions, so the commands stay about what they ask the storage.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Collection, Sequence
from decimal import Decimal
from enum import Enum
from typing import Any

import click

from flowsmith_worker.readable import UNREADABLE_CELL, iso_time

# Re-exported: the CLI's modules import it from here.
from flowsmith_worker.terminal import printable as printable


def json_option(fn: Any) -> Any:
    return click.option(
        "--json", "as_json", is_flag=True, help="Print JSON (stable keys) for scripts."
    )(fn)


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
    # Failed, and undoing its completed steps (compensation.py).
    "COMPENSATING": Styled("", fg="red"),
    "WAITING": Styled("", fg="blue"),
    # A parked sleep or wait (parking.parked_as), and its attempts left behind.
    "SLEEPING": Styled("", fg="blue"),
    "AWAITING_EVENT": Styled("", fg="blue"),
    "PARKED": Styled("", fg="blue"),
    # A step of a run waiting for a place under its concurrency key.
    "BLOCKED": Styled("", fg="blue"),
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

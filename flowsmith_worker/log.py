"""Logging through structlog: one stable event name per state transition.

Lines about a step carry flow, tracking_id, step, attempt and worker_id. A
console renderer on a TTY, JSON lines otherwise (``--log-format``).
"""

from __future__ import annotations

import datetime
import logging
import sys
import time
from collections.abc import Mapping, MutableMapping
from typing import Any, Literal

import structlog

from flowsmith_worker.config import known_secrets, redact
from flowsmith_worker.terminal import printable

LogFormat = Literal["auto", "console", "json"]


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)


def setup_logging(fmt: LogFormat = "auto", level: str = "INFO") -> None:
    """Configure structlog for a process of ours (the CLI); libraries leave it alone."""
    use_console = fmt == "console" or (fmt == "auto" and sys.stderr.isatty())
    # JSON escapes control characters itself; the console renderer prints strings raw.
    renderers: list[Any] = (
        [_escape_for_terminal, structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())]
        if use_console
        else [structlog.processors.JSONRenderer()]
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            _add_timestamp,
            structlog.processors.format_exc_info,
            _redact_secrets,
            *renderers,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )


def _redact_secrets(
    _logger: Any, _method: str, event: MutableMapping[str, Any]
) -> Mapping[str, Any]:
    """No line carries a database password, not even inside a driver's traceback.

    Until a URL with a password has been used, no text can hold one: the line
    goes as it is (every step logs a line; this keeps it cheap).
    """
    if not known_secrets():
        return event
    return {key: redact(value) if isinstance(value, str) else value for key, value in event.items()}


# The "YYYY-MM-DDTHH:MM:SS" of the second last stamped, and that second.
_stamped_second: tuple[int, str] = (-1, "")


def _add_timestamp(
    _logger: Any, _method: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """The time as structlog's TimeStamper(fmt="iso", utc=True) writes it
    ("2026-05-01T12:00:00.123456Z"), with the date part formatted once a second
    rather than on every line."""
    global _stamped_second
    second, micros = divmod(time.time_ns() // 1000, 1_000_000)
    stamped, prefix = _stamped_second
    if second != stamped:
        moment = datetime.datetime.fromtimestamp(second, tz=datetime.UTC)
        prefix = moment.strftime("%Y-%m-%dT%H:%M:%S")
        _stamped_second = (second, prefix)
    # datetime.isoformat() leaves out a zero fraction; so does the stamp.
    event["timestamp"] = f"{prefix}.{micros:06d}Z" if micros else f"{prefix}Z"
    return event


# Keys the console renderer prints as text rather than as a repr: the message and
# the traceback (already text, format_exc_info runs first), which keep their newlines.
_TEXT_KEYS = frozenset({"event", "exception"})


def _escape_for_terminal(
    _logger: Any, _method: str, event: MutableMapping[str, Any]
) -> Mapping[str, Any]:
    """Tracking ids, names and step errors are shown on the console, never obeyed by it.

    Anyone who can enqueue a flow or raise in a step chooses that text; an ESC in
    it could clear the operator's screen or retitle the window.
    """
    return {
        printable(str(key)): (
            printable(value) if key in _TEXT_KEYS and isinstance(value, str) else _shown(value)
        )
        for key, value in event.items()
    }


def _shown(value: Any) -> Any:
    """``value``, or a stand-in whose repr, all the renderer prints of it, is escaped."""
    if value is None or isinstance(value, int | float):
        return value
    if isinstance(value, str) and printable(value) == value:
        return value  # plain text: the renderer prints it bare, or quoted if it has spaces
    # repr() escapes a string's control characters (as the JSON lines do), and
    # quotes it, which marks it odd; a class's own __repr__ need not escape them.
    return _EscapedRepr(printable(repr(value)))


class _EscapedRepr:
    """A value the console renderer prints as this already escaped repr."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text

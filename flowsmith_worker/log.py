"""Logging through structlog: one stable event name per state transition.

Lines about a step carry flow, tracking_id, step, attempt and worker_id. A
console renderer on a TTY, JSON lines otherwise (``--log-format``).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any, Literal

import structlog

from flowsmith_worker.config import redact

LogFormat = Literal["auto", "console", "json"]


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)


def setup_logging(fmt: LogFormat = "auto", level: str = "INFO") -> None:
    """Configure structlog for a process of ours (the CLI); libraries leave it alone."""
    use_console = fmt == "console" or (fmt == "auto" and sys.stderr.isatty())
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
        if use_console
        else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            _redact_secrets,
            renderer,
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
    """No line carries a database password, not even inside a driver's traceback."""
    return {key: redact(value) if isinstance(value, str) else value for key, value in event.items()}

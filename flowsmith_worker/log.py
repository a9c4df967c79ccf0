"""Logging: the library logs through the standard ``logging`` module; the CLI renders it.

Every logger is the stdlib logger of its module (``flowsmith_worker.worker``...)
wrapped by structlog for key-value events: one stable event name per state
transition, and lines about a step carry flow, tracking_id, step, attempt and
worker_id. The library adds no handler and sets no level: the application's
logging configuration decides what is shown and where (with none at all, Python
prints WARNING and above to stderr, its own last resort).

Each event reaches ``logging`` as a :class:`LogEvent`: a dict, which structlog's
``ProcessorFormatter`` renders field by field (as ``flowsmith worker`` does, see
setup_logging), whose ``str()`` is ``event key=value ...`` for a plain Formatter.
"""

from __future__ import annotations

import datetime
import logging
import os
import sys
import time
from collections.abc import Mapping, MutableMapping
from typing import Any, Literal

import structlog

from flowsmith_worker.config import known_secrets, redact
from flowsmith_worker.terminal import printable

LogFormat = Literal["auto", "console", "json"]
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

# The stdlib level of each method of structlog's stdlib BoundLogger.
_METHOD_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "exception": logging.ERROR,
    "critical": logging.CRITICAL,
    "fatal": logging.CRITICAL,
}


class LogEvent(dict[str, Any]):
    """One event's fields; ``str()`` renders it as one line for a plain ``logging.Formatter``."""

    __slots__ = ()

    def __str__(self) -> str:
        fields = " ".join(
            f"{key}={_logfmt_value(value)}"
            for key, value in self.items()
            if key not in ("event", "exception")
        )
        line = f"{self.get('event', '')} {fields}".rstrip()
        exception = self.get("exception")
        return f"{line}\n{exception}" if exception else line


def _logfmt_value(value: Any) -> str:
    """Plain words bare; anything else as its repr, quoted and with control characters escaped."""
    if isinstance(value, str) and value and value.isprintable() and " " not in value:
        return value
    return repr(value)


class _Logger(structlog.stdlib.BoundLogger):
    """structlog's stdlib BoundLogger that does nothing at all for a level logging drops.

    Steps log a few lines each, most of them DEBUG: a disabled line must not
    build its event or run the processors.
    """

    def _proxy_to_logger(
        self, method_name: str, event: str | None = None, *event_args: str, **event_kw: Any
    ) -> Any:
        if not self._logger.isEnabledFor(_METHOD_LEVELS[method_name]):
            return None
        return super()._proxy_to_logger(method_name, event, *event_args, **event_kw)


def get_logger(name: str) -> Any:
    """The logger of module ``name`` (pass ``__name__``), ready to ``bind()`` fields."""
    return structlog.wrap_logger(
        logging.getLogger(name),
        processors=[structlog.processors.format_exc_info, _redact_secrets, _to_logging],
        wrapper_class=_Logger,
        context_class=dict,
        cache_logger_on_first_use=True,
    )


def _to_logging(
    logger: Any, method_name: str, event: MutableMapping[str, Any]
) -> tuple[tuple[LogEvent], dict[str, Any]]:
    """The arguments of the stdlib logger's call, as structlog.stdlib.ProcessorFormatter.
    wrap_for_formatter makes them (so an application's ProcessorFormatter renders our
    fields), with a message that reads well through a plain Formatter too."""
    # exc_info=False: format_exc_info made any traceback a (redacted) field, and
    # Logger.exception() would attach the raw one again.
    extra = {"_logger": logger, "_name": method_name}
    return (LogEvent(event),), {"extra": extra, "exc_info": False}


def _redact_secrets(
    _logger: Any, _method: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """No line carries a database password, not even inside a driver's traceback.

    Until a URL with a password has been used, no text can hold one: the line
    goes as it is (every step logs a line; this keeps it cheap).
    """
    if not known_secrets():
        return event
    return {key: redact(value) if isinstance(value, str) else value for key, value in event.items()}


# -- the CLI's own output ------------------------------------------------------


def setup_logging(fmt: LogFormat = "auto", level: str = "INFO") -> None:
    """Send every logger's lines at ``level`` and above to stderr, rendered by structlog.

    For a process of ours (the CLI): a library leaves logging to its application.
    A console renderer on a TTY, JSON lines otherwise; the lines of the user's own
    modules (stdlib logging) are rendered the same way.
    """
    use_console = fmt == "console" or (fmt == "auto" and sys.stderr.isatty())
    # JSON escapes control characters itself; the console renderer prints strings raw.
    renderers: list[Any] = (
        [_escape_for_terminal, structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())]
        if use_console
        else [structlog.processors.JSONRenderer()]
    )
    handler = PipeSafeHandler(sys.stderr)
    handler.setFormatter(StructlogFormatter([_add_timestamp, *renderers]))
    logging.basicConfig(handlers=[handler], level=level.upper(), force=True)
    _collect_only_what_is_shown()


def _collect_only_what_is_shown() -> None:
    """No caller, thread or process details in this process's records: no line shows
    them, and finding the caller and the names costs a step's line as much as the
    rest. These are the switches of the logging HOWTO's "Optimization" section."""
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False


class StructlogFormatter(logging.Formatter):
    """Renders each record through structlog processors: ours field by field, others
    (the user's modules, libraries) as their message and traceback; level and logger
    name added to both.

    What structlog.stdlib.ProcessorFormatter does, without the copy of the record it
    makes first (its own processors may change it): a quarter of a step's log line.
    """

    def __init__(self, processors: list[Any]) -> None:
        super().__init__()
        self.processors = processors

    def format(self, record: logging.LogRecord) -> str:
        if isinstance(record.msg, LogEvent):
            event: Any = dict(record.msg)  # redacted, its traceback formatted, already
        else:
            event = {"event": record.getMessage(), "exc_info": record.exc_info}
            event = _redact_secrets(None, "", structlog.processors.format_exc_info(None, "", event))
        level = record.levelname.lower()
        event["level"], event["logger"] = level, record.name
        for processor in self.processors:
            event = processor(None, level, event)
        return str(event)


class PipeSafeHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler that goes quiet when the reader of its pipe is gone.

    `flowsmith worker ... 2>&1 | tee log` and Ctrl-C: the terminal sends SIGINT to
    the whole pipeline, tee dies, and every line written after it fails with
    EPIPE. The worker must still shut down gracefully and log nothing about it
    (logging's default would print a traceback per line, to that same pipe).
    """

    def handleError(self, record: logging.LogRecord) -> None:
        if isinstance(sys.exc_info()[1], BrokenPipeError):
            _silence(self.stream)
            return
        super().handleError(record)


def flush_output() -> None:
    """Flush stdout and stderr before the process ends, a pipe whose reader is gone
    included (what a step printed may still be buffered for it)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BrokenPipeError:
            _silence(stream)


def _silence(stream: Any) -> None:
    """Point the stream's file descriptor at /dev/null, its reader being gone: what it
    still buffers, and the interpreter's own last flush at exit, go nowhere instead
    of failing again (click would exit 1, the interpreter 120)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, stream.fileno())
    finally:
        os.close(devnull)


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

"""JSON encoding of the values FlowSmith stores: inputs, outputs, ctx.data.

Every value is checked here before a database sees it, so a value that cannot
be stored fails with a message saying what is wrong, instead of a driver error
in the middle of a transaction (a 20 MiB value on MariaDB looks like a lost
connection) or a document that nothing can read back:

- its size: at most ``max_bytes`` of encoded JSON. The default, 4 MiB, is
  chosen for MariaDB, the tightest of our backends: its max_allowed_packet
  defaults to 16 MiB for a whole statement, and mysql-connector escapes the
  text into the statement, which can double it (every quote and backslash of
  the JSON gains a backslash). 4 MiB doubled still leaves room for the rest of
  the statement. PostgreSQL and SQLite store up to about 1 GB.
- its depth: at most ``max_depth`` nested lists and objects. Python's own JSON
  decoder recurses once per level and fails near 1,000, so a deeper document
  could be written but never read back; 100 is what MySQL's JSON type allows
  and more than any sane payload uses.
- standard JSON only: NaN and Infinity are refused by name, because
  ``json.dumps`` writes them as bare words that JSON readers (``jq``, browsers,
  other languages reading ``flowsmith status --json``) reject.

The limits are process-wide: ``configure(max_payload_bytes=...)``,
``flowsmith worker --max-payload-bytes`` or $FLOWSMITH_MAX_PAYLOAD_BYTES.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from flowsmith_worker.errors import PayloadNotJSON, PayloadTooDeep, PayloadTooLarge

MiB = 1024 * 1024
DEFAULT_MAX_PAYLOAD_BYTES = 4 * MiB
DEFAULT_MAX_DEPTH = 100
MAX_PAYLOAD_BYTES_ENV_VAR = "FLOWSMITH_MAX_PAYLOAD_BYTES"


@dataclass(frozen=True)
class PayloadLimits:
    max_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
    max_depth: int = DEFAULT_MAX_DEPTH

    def __post_init__(self) -> None:
        if self.max_bytes < 1024:
            raise ValueError(
                f"max_payload_bytes={self.max_bytes}: use at least 1024 bytes "
                f"(the default is {DEFAULT_MAX_PAYLOAD_BYTES})"
            )
        if self.max_depth < 2:
            raise ValueError(f"max_depth={self.max_depth}: use at least 2")


_lock = threading.Lock()
_limits: PayloadLimits | None = None
# The limits last parsed from the environment, with the text they came from:
# encode() runs for every step's output, and the variable rarely changes.
_from_environment: tuple[str, PayloadLimits] = ("", PayloadLimits())


def limits() -> PayloadLimits:
    """The limits in force: set_limits(), else $FLOWSMITH_MAX_PAYLOAD_BYTES, else defaults."""
    with _lock:
        current = _limits
    return current if current is not None else _limits_from_environment()


def set_limits(new: PayloadLimits | None) -> None:
    """Set the process-wide limits; None goes back to the environment and defaults."""
    global _limits
    with _lock:
        _limits = new


def _limits_from_environment() -> PayloadLimits:
    global _from_environment
    text = os.environ.get(MAX_PAYLOAD_BYTES_ENV_VAR, "").strip()
    parsed_text, parsed = _from_environment
    if text == parsed_text:
        return parsed
    parsed = _parse_limit(text)
    _from_environment = (text, parsed)
    return parsed


def _parse_limit(text: str) -> PayloadLimits:
    if not text:
        return PayloadLimits()
    try:
        return PayloadLimits(max_bytes=int(text))
    except ValueError as exc:
        raise ValueError(
            f"${MAX_PAYLOAD_BYTES_ENV_VAR}={text!r}: give a whole number of bytes "
            f"of at least 1024 ({exc})"
        ) from None


def storable_text(text: str) -> str:
    """``text`` as every backend stores it: NUL (PostgreSQL refuses it) shown as
    \\x00, and lone surrogates (not UTF-8 at all) as \\udxxx escapes."""
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def encode(value: Any, what: str = "a value to store") -> str:
    """``value`` as standard JSON text, within the limits; ``what`` names it in errors."""
    bounds = limits()
    try:
        text = json.dumps(value, allow_nan=False)
    except RecursionError:  # the C encoder's own limit, near 1,000 levels
        raise _too_deep(value, what, bounds.max_depth) from None
    except (TypeError, ValueError) as exc:
        raise _not_json(value, what, exc) from None
    # ensure_ascii (json's default) escapes every other character: one byte each.
    size = len(text)
    if size > bounds.max_bytes:
        raise PayloadTooLarge(
            f"{what} is {_size(size)} as JSON, over the limit of {_size(bounds.max_bytes)} "
            f"by {_size(size - bounds.max_bytes)}; store large data elsewhere (a file, "
            "object storage, a table of yours) and pass a reference, or raise the limit "
            f"with --max-payload-bytes / configure(max_payload_bytes=...) / "
            f"${MAX_PAYLOAD_BYTES_ENV_VAR} if your database accepts more"
        )
    if _nests_deeper(text, bounds.max_depth):
        raise _too_deep(value, what, bounds.max_depth)
    return text


# In JSON text, strings (with their escapes), then everything but brackets.
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_INNERMOST_PAIR = re.compile(r"\[\]|\{\}")


def _nests_deeper(text: str, max_depth: int) -> bool:
    """Whether the JSON text nests more than ``max_depth`` lists/objects.

    Read from the text, with regular expressions (C speed) rather than a
    Python walk of every item: each pass removes the innermost empty pairs,
    so a document ``max_depth`` deep is empty after ``max_depth`` passes.
    """
    if text.count("[") + text.count("{") <= max_depth:
        return False  # the common case: too few containers to nest that deep
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))
    for _ in range(max_depth):
        if not brackets:
            return False
        brackets = _INNERMOST_PAIR.sub("", brackets)
    return bool(brackets)


def _too_deep(value: Any, what: str, max_depth: int) -> PayloadTooDeep:
    path, excess = _deepest_path(value, max_depth)
    return PayloadTooDeep(
        f"{what} nests lists/objects deeper than the limit of {max_depth} by {excess} "
        f"(at {path}); flatten it"
    )


def _not_json(value: Any, what: str, error: Exception) -> PayloadNotJSON:
    found = _first_non_finite(value)
    if found is not None:
        name, path = found
        return PayloadNotJSON(
            f"{what} contains {name} at {path}: JSON has no NaN or Infinity "
            "(readers reject them); use None or a string instead"
        )
    return PayloadNotJSON(
        f"{what} cannot be stored as JSON ({error}); use dicts, lists, strings, "
        "numbers, booleans and None"
    )


# The walks below run only to explain a refusal. They are iterative (no
# recursion limit) and stop at _SEARCH_DEPTH (a list may contain itself).
_SEARCH_DEPTH = 2_000


def _items(value: Any) -> Iterator[tuple[Any, int, str]]:
    """Every value inside ``value`` with its nesting level and its path, like $["a"][3]."""
    stack: list[tuple[Any, int, str]] = [(value, 1, "$")]
    while stack:
        item, level, path = stack.pop()
        yield item, level, path
        if level > _SEARCH_DEPTH:
            continue
        if isinstance(item, dict):
            stack.extend((v, level + 1, f"{path}[{json.dumps(str(k))}]") for k, v in item.items())
        elif isinstance(item, list | tuple):
            stack.extend((v, level + 1, f"{path}[{i}]") for i, v in enumerate(item))


def _deepest_path(value: Any, max_depth: int) -> tuple[str, str]:
    """The path to the first container past ``max_depth``, and how far past the deepest is."""
    first, deepest = "$", 0
    for item, level, path in _items(value):
        if isinstance(item, dict | list | tuple):
            if level > max_depth and first == "$":
                first = path
            deepest = max(deepest, level)
    excess = (
        str(deepest - max_depth)
        if deepest <= _SEARCH_DEPTH
        else f"over {_SEARCH_DEPTH - max_depth}"
    )
    return _shorten(first), excess


def _first_non_finite(value: Any) -> tuple[str, str] | None:
    for item, _level, path in _items(value):
        if isinstance(item, float) and not math.isfinite(item):
            name = "NaN" if math.isnan(item) else ("Infinity" if item > 0 else "-Infinity")
            return name, _shorten(path)
    return None


def _shorten(path: str) -> str:
    return path if len(path) <= 120 else f"{path[:60]}...{path[-60:]}"


def _size(size: int) -> str:
    if size >= MiB:
        return f"{size / MiB:.1f} MiB ({size} bytes)"
    return f"{size} bytes"

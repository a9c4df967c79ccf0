"""Text from rows and steps made safe to show on a terminal.

Shared by the CLI's human output (cli/format.py) and the worker's console logs
(log): both print tracking ids, names and errors that anyone who can enqueue a
flow or raise in a step chose.
"""

from __future__ import annotations

import re

# Text from rows (tracking ids, errors, names) is shown, never obeyed by the
# terminal: control characters (ESC starts the sequences that clear a screen or
# retitle a window; CR overwrites a line), bidi overrides that reorder what is
# seen, and lone surrogates that cannot be printed at all are shown escaped.
_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def printable(text: str) -> str:
    """``text`` safe for a terminal: unsafe characters escaped (\\x1b), newlines and tabs kept."""
    return _UNSAFE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)

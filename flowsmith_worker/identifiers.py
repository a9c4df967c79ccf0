"""The one check every name and key passes before it reaches a database.

Tracking ids, flow names, step names and queue names are stored in indexed
string columns of three databases that disagree about odd text: PostgreSQL
refuses a NUL character, SQLite stores it, MySQL cuts at it or not depending on
the driver, and a lone surrogate is not UTF-8 at all, so each driver fails in its
own words. We refuse them the same way everywhere, before any SQL, with a
message saying what to do.
"""

from __future__ import annotations

from flowsmith_worker.errors import InvalidIdentifier

MAX_TRACKING_ID_LENGTH = 255  # the width of fs_flows.tracking_id


def check_identifier(what: str, value: object, max_length: int) -> str:
    """``value`` if it is a usable ``what`` (e.g. "tracking_id"); InvalidIdentifier if not."""
    if not isinstance(value, str):
        raise InvalidIdentifier(
            f"{what} must be a str, not {type(value).__name__} ({value!r}): "
            f"convert it first, e.g. str(value)"
        )
    if not value:
        raise InvalidIdentifier(f"{what} is empty: give 1 to {max_length} characters")
    if len(value) > max_length:
        raise InvalidIdentifier(
            f"{what} {value[:40]!r}... is {len(value)} characters; the limit is {max_length}"
            + (" (hash a long key, e.g. with hashlib)" if what == "tracking_id" else "")
        )
    if "\x00" in value:
        raise InvalidIdentifier(
            f"{what} {value!r} contains a NUL character (\\x00), which databases do not "
            "store alike: remove it"
        )
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidIdentifier(
            f"{what} {value!r} contains a lone surrogate ({value[exc.start]!r}), which is "
            "not text: decode the bytes it came from with the right encoding"
        ) from None
    return value

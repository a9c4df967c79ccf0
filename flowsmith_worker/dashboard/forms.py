"""The pages' query parameters and the actions' forms, read and checked.

A value no database could hold (bytes that are not UTF-8, a name too long) is
refused with a message here, before any SQL.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from urllib.parse import parse_qs

from starlette.exceptions import HTTPException
from starlette.requests import Request

from flowsmith_worker.errors import InvalidIdentifier
from flowsmith_worker.flow import MAX_TRACKING_ID_LENGTH
from flowsmith_worker.identifiers import check_identifier
from flowsmith_worker.readable import (
    parse_duration,
    parse_when,
)
from flowsmith_worker.storage.base import FlowFilter, FlowStatus, FlowSummary, RunCursor

PAGE_SIZE = 50
MAX_FLOW_NAME_LENGTH = 200  # fs_flows.flow_name
FAILURE_WINDOWS = {"1h": 3600.0, "24h": 86400.0, "7d": 604800.0}
DEFAULT_FAILURE_WINDOW = "24h"
# An action's form is a tracking_id and a token; anything larger is not ours.
MAX_FORM_BYTES = 4096
_DATE_HINT = "an ISO date or datetime in UTC (2026-05-01, 2026-05-01T12:00)"
_WHEN_HINT = f"a duration ago (30m, 2h, 7d) or {_DATE_HINT}"


class InvalidQuery(ValueError):
    """A filter the runs page cannot apply; the message says which and why."""


@dataclass(frozen=True)
class RunsQuery:
    """The runs page's filters and page, as typed in the form (blank: no filter)."""

    status: str = ""
    flow_name: str = ""
    tracking_id_prefix: str = ""
    since: str = ""
    until: str = ""
    after: str = ""  # "created_at,id" of the last run of the page before

    @classmethod
    def from_params(cls, params: Mapping[str, str]) -> RunsQuery:
        fields = cls.__dataclass_fields__
        return cls(**{name: params.get(name, "").strip() for name in fields})

    def filter(self) -> FlowFilter:
        """The storage's filter for this page, one run more than shown (is there another page?)."""
        since, within = self._since()
        return FlowFilter(
            status=self._status(),
            flow_name=_name("flow name", self.flow_name, MAX_FLOW_NAME_LENGTH),
            since=since,
            created_within=within,
            until=_moment("until", self.until) if self.until else None,
            tracking_id_prefix=_name(
                "tracking_id prefix", self.tracking_id_prefix, MAX_TRACKING_ID_LENGTH
            ),
            after=self._after(),
            limit=PAGE_SIZE + 1,
        )

    def older_than(self, last: FlowSummary) -> dict[str, str]:
        """The query parameters of the next page, after ``last``."""
        params = {**asdict(self), "after": f"{last.created_at!r},{last.id}"}
        return {name: value for name, value in params.items() if value}

    def params(self) -> dict[str, str]:
        """The filters, for links that keep them (the first page)."""
        return {name: value for name, value in asdict(self).items() if value and name != "after"}

    def _status(self) -> FlowStatus | None:
        if not self.status:
            return None
        try:
            return FlowStatus(self.status)
        except ValueError:
            known = ", ".join(s.value for s in FlowStatus)
            raise InvalidQuery(f"unknown status {self.status!r}: use one of {known}") from None

    def _since(self) -> tuple[float | None, float | None]:
        """(since, created_within): a duration ago is left to the database clock."""
        if not self.since:
            return None, None
        ago = parse_duration(self.since)
        if ago is not None:
            return None, ago
        return _moment("since", self.since), None

    def _after(self) -> RunCursor | None:
        if not self.after:
            return None
        created_at, _, run_id = self.after.partition(",")
        try:
            return RunCursor(created_at=float(created_at), id=int(run_id))
        except ValueError:
            raise InvalidQuery(
                f"the page marker {self.after!r} is not one of ours: start from the first page"
            ) from None


def _moment(field: str, text: str) -> float:
    moment = parse_when(text)
    if moment is None:
        hint = _WHEN_HINT if field == "since" else _DATE_HINT
        raise InvalidQuery(f"{field} {text!r} is not a time: give {hint}")
    return moment


def _name(what: str, text: str, length: int) -> str | None:
    if not text:
        return None
    try:
        return check_identifier(what, text, length)
    except InvalidIdentifier as exc:
        raise InvalidQuery(str(exc)) from None


def tracking_id(text: str | None) -> str:
    """The tracking_id of a run page or an action: 400 if missing or impossible."""
    if not text:
        raise HTTPException(400, "which run? Give its tracking_id (?tracking_id=...)")
    try:
        return check_identifier("tracking_id", text, MAX_TRACKING_ID_LENGTH)
    except InvalidIdentifier as exc:
        raise HTTPException(400, str(exc)) from None


def failure_window(text: str | None) -> str:
    """The failures page's window: one of FAILURE_WINDOWS (the default if blank)."""
    if not text:
        return DEFAULT_FAILURE_WINDOW
    if text not in FAILURE_WINDOWS:
        raise HTTPException(400, f"within must be one of {', '.join(FAILURE_WINDOWS)}")
    return text


async def action_form(request: Request) -> dict[str, str]:
    """The URL-encoded form of an action (the first value of each field)."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise HTTPException(413, "the form is too large")
    try:
        fields = parse_qs(body.decode(), strict_parsing=False)
    except UnicodeDecodeError:
        raise HTTPException(400, "the form is not UTF-8") from None
    return {name: values[0] for name, values in fields.items()}

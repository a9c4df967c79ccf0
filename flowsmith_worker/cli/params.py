"""The command line's own parameter types: durations, moments, queue names, --url.

Each turns what a person types (45s, 2024-05-01, emails,default) into a value
or a usage error saying what to type instead, before any command runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import click

from flowsmith_worker.errors import InvalidIdentifier
from flowsmith_worker.flow import MAX_QUEUE_LENGTH
from flowsmith_worker.identifiers import check_identifier
from flowsmith_worker.readable import parse_duration, parse_when

URL_HELP = (
    "Database URL (postgresql://, mysql://, sqlite:///path). "
    "Default: $FLOWSMITH_DATABASE_URL, then $DATABASE_URL, then sqlite:///flowsmith.db."
)


def url_option(fn: Any) -> Any:
    return click.option("--url", metavar="URL", help=URL_HELP, default=None, show_default=False)(fn)


_DURATION_HINT = "use a number and a unit: 45s, 30m, 2h, 7d, 2w (or 1h30m)"


@dataclasses.dataclass(frozen=True)
class Ago:
    """A duration before now (`--since 2h`), left for the database to resolve with its
    own clock: this host's may be off."""

    seconds: float


# click.ParamType is generic from click 8.4 on; pyproject allows click 8.1.
if TYPE_CHECKING:
    _FloatParam = click.ParamType[float]
    _MomentParam = click.ParamType[Ago | float]
    _NamesParam = click.ParamType[tuple[str, ...]]
else:
    _FloatParam = click.ParamType
    _MomentParam = click.ParamType
    _NamesParam = click.ParamType


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


class QueueNames(_NamesParam):
    """Queue names separated by commas, as Celery's -Q a,b: a tuple of names."""

    name = "NAME[,NAME...]"

    def split_envvar_value(self, rv: str) -> Sequence[str]:
        # Commas separate the names in the environment too: "a, b" is two queues.
        return [rv]

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> tuple[str, ...]:
        if isinstance(value, tuple):
            return value
        names = tuple(name.strip() for name in str(value).split(","))
        if not all(names):
            self.fail(
                f"{value!r} holds an empty queue name: give names separated by commas, "
                "e.g. emails,default",
                param,
                ctx,
            )
        for name in names:
            try:
                check_identifier("a queue name", name, MAX_QUEUE_LENGTH)
            except InvalidIdentifier as exc:
                self.fail(str(exc), param, ctx)
        return names

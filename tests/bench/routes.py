"""How the benchmark's workers reach PostgreSQL: directly, or through PgBouncer.

Operators often put PgBouncer in transaction mode between the workers and the
server, where nothing set on a session survives a transaction: the workers
then run with FLOWSMITH_PG_PREPARE=off and --no-listen. Two routes beside the
direct one separate the costs: "no-prepare" is direct without PREPARE (what
not preparing costs), "pgbouncer" adds the pooler on top (what the pooler
costs). The bouncer is tests/servers/pgbouncer.py's, started once per benchmark.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field

import sqlalchemy as sa

from tests.servers import LocalServer, ServerUnavailable
from tests.servers.pgbouncer import PgBouncer, find_pgbouncer

# The workers' connections carry this name and a drain's own suffix (application_name), so
# pg_stat_activity tells a drain's backends (also those PgBouncer opens for them) from the
# benchmark's own and from those the bouncer keeps open, idle, after earlier drains.
WORKER_APPLICATION = "flowsmith-bench-worker"
# Each route says it, so a FLOWSMITH_PG_PREPARE in the caller's environment changes none.
_PREPARE = {"FLOWSMITH_PG_PREPARE": "on"}
_NO_PREPARE = {"FLOWSMITH_PG_PREPARE": "off"}


@dataclass(frozen=True)
class Route:
    """One way for the workers to connect: its environment and extra worker options."""

    key: str
    label: str  # as the table shows it, after the drain's shape
    env: Mapping[str, str] = field(default_factory=dict)
    worker_options: tuple[str, ...] = ()
    bounced: bool = False


DIRECT = Route("direct", "direct", _PREPARE)
ROUTES = {
    route.key: route
    for route in (
        DIRECT,
        Route("no-prepare", "direct, no PREPARE", _NO_PREPARE),
        Route(
            "pgbouncer",
            "PgBouncer txn, no PREPARE",
            _NO_PREPARE,
            ("--no-listen",),
            bounced=True,
        ),
    )
}


def parse_routes(text: str) -> list[Route]:
    """``direct,no-prepare,pgbouncer`` -> the routes; ValueError names the unknown ones."""
    keys = [key.strip() for key in text.split(",") if key.strip()]
    unknown = [key for key in keys if key not in ROUTES]
    if unknown:
        raise ValueError(f"unknown route(s) {unknown}: choose from {','.join(ROUTES)}")
    return [ROUTES[key] for key in keys]


def start_bouncer(server: LocalServer) -> PgBouncer | None:
    """A PgBouncer in transaction mode in front of ``server``, or None (said on stderr)
    when pgbouncer is not installed: the other routes are measured all the same."""
    try:
        bouncer = PgBouncer(server, find_pgbouncer())
    except ServerUnavailable as exc:
        print(f"skipping the PgBouncer route: {exc.reason}", file=sys.stderr)
        return None
    bouncer.start()
    return bouncer


def drain_application() -> str:
    """A new application_name for one drain's workers."""
    return f"{WORKER_APPLICATION}-{uuid.uuid4().hex[:8]}"


def worker_url(
    url: str, database: str, route: Route, bouncer: PgBouncer | None, application: str
) -> str:
    """The URL the workers of ``route`` get: the bouncer's for a bounced route, named
    ``application`` on PostgreSQL (the driver passes URL query keys on; PgBouncer sets
    the name on whichever server connection it lends)."""
    if route.bounced:
        if bouncer is None:
            raise ValueError("the PgBouncer route needs a running bouncer")
        url = bouncer.url_for(database)
    parsed = sa.make_url(url)
    if parsed.get_backend_name() != "postgresql":
        return url
    named = parsed.update_query_dict({"application_name": application})
    return named.render_as_string(hide_password=False)

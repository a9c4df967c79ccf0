"""The plans of the claim and the rescue, for statements exactly as a worker sends them.

The statements are not rebuilt here: they are caught on their way to the
driver (SQLAlchemy's before_cursor_execute) while a real Worker claims and a
real rescue pass runs, then explained later, with the same text and the same
parameters, on the big tables: EXPLAIN (ANALYZE, BUFFERS) on PostgreSQL (in a
transaction rolled back, since the claim writes), EXPLAIN on MariaDB and
EXPLAIN QUERY PLAN on SQLite, neither of which runs the statement.

Each plan is also checked for the shapes that grow with the tables: a scan of
a whole big table, or a sort of every matching row (``warnings``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from flowsmith_worker.storage.sql import claim as sql_claim
from flowsmith_worker.storage.sql.dialects import Dialect

# The rescue's candidate read (SqlStorage.rescue_expired) is built per call, so
# it is recognised by what it reads rather than by identity.
_RESCUE_MARK = "lease_expires_at <"
# Reads by primary key of the few nodes just picked: nothing in them grows with a table.
_BY_IDS = ("claim: lease them", "claim: read them back", "claim: start their runs")
# Plan shapes that cost in proportion to a big table, per database.
_BAD_SHAPES = {
    # A sort keyed on fs_nodes' own columns sorts the table's matching rows; the
    # claim's last sort (keys c.*) only orders the few it claimed.
    "postgresql": (r"Seq Scan on fs_(nodes|flows)", r"Sort Key: fs_nodes\."),
    "mysql": (r"table=\w*fs_(nodes|flows)\b.*type=ALL", r"Using filesort"),
    "sqlite": (r"SCAN \w*\s*fs_(nodes|flows)\b(?! USING)", r"USE TEMP B-TREE FOR ORDER BY"),
}


@dataclass(frozen=True)
class Sent:
    """One statement as it reached the driver: its role, text and parameters."""

    role: str
    sql: str
    parameters: Any


@dataclass
class Caught:
    """The claim's statements (in the order first sent) and the rescue's read."""

    claim: dict[str, Sent] = field(default_factory=dict)
    rescue: Sent | None = None


# PostgreSQL's claim is one prepared statement (storage/sql/prepared.py), sent as
# EXECUTE: it is recognised by its text and explained as its plain text.
_PG_CLAIMS = {
    "claim (one statement, one queue)": sql_claim.CLAIM_PG_ONE_QUEUE,
    "claim (one statement, several queues)": sql_claim.CLAIM_PG_QUEUES,
}


def claim_roles(dialect: Dialect) -> dict[int, str]:
    """The prebuilt claim constructs of ``dialect`` (by identity), each with its role."""
    if dialect.claims_in_one_statement:
        return {}  # its claim is _PG_CLAIMS's one statement
    built = sql_claim.statements(dialect)
    return {
        id(built.sqlite_precheck): "claim: anything due? (SQLite)",
        id(built.runnable): "claim: pick and lock the runnable nodes",
        id(built.lease): "claim: lease them",
        id(built.claimed): "claim: read them back",
        id(built.start_runs): "claim: start their runs",
    }


@contextmanager
def catching(engine: sa.Engine, dialect: Dialect, caught: Caught) -> Iterator[Caught]:
    """Record into ``caught`` the claim's and the rescue's statements ``engine`` sends."""
    roles = claim_roles(dialect)

    def record(
        _conn: Any, _cursor: Any, statement: str, parameters: Any, context: Any, _many: bool
    ) -> None:
        construct = getattr(context.compiled, "statement", None) if context else None
        role = roles.get(id(construct))
        if role is not None:
            caught.claim.setdefault(role, Sent(role, statement, parameters))
            return
        for role, claim in _PG_CLAIMS.items():
            if claim.sent_as(statement):
                caught.claim.setdefault(role, Sent(role, claim.text, parameters))
                return
        if _RESCUE_MARK in statement and statement.lstrip().upper().startswith("SELECT"):
            caught.rescue = caught.rescue or Sent("rescue: expired leases", statement, parameters)

    sa.event.listen(engine, "before_cursor_execute", record)
    try:
        yield caught
    finally:
        sa.event.remove(engine, "before_cursor_execute", record)


@dataclass(frozen=True)
class Plan:
    role: str
    sql: str
    plan: list[str]
    warnings: list[str]

    def as_json(self) -> dict[str, Any]:
        return {"role": self.role, "sql": self.sql, "plan": self.plan, "warnings": self.warnings}


def explain(url: str, sent: Sent) -> Plan:
    """The plan of ``sent`` on the database at ``url``, with its warnings."""
    engine = sa.create_engine(url, poolclass=sa.NullPool)
    try:
        with engine.connect() as conn:
            name = "mysql" if conn.dialect.name in ("mysql", "mariadb") else conn.dialect.name
            lines = _PLANNERS[name](conn, sent)
            conn.rollback()  # PostgreSQL's EXPLAIN ANALYZE of the claim ran it: undone
    finally:
        engine.dispose()
    text = "\n".join(lines)
    shapes = () if sent.role in _BY_IDS else _BAD_SHAPES[name]
    warnings = [
        f"{sent.role}: plan matches {shape!r}" for shape in shapes if re.search(shape, text)
    ]
    return Plan(sent.role, " ".join(sent.sql.split()), lines, warnings)


def _postgresql(conn: sa.Connection, sent: Sent) -> list[str]:
    rows = conn.exec_driver_sql(f"EXPLAIN (ANALYZE, BUFFERS) {sent.sql}", sent.parameters)
    return [row[0] for row in rows]


def _mysql(conn: sa.Connection, sent: Sent) -> list[str]:
    result = conn.exec_driver_sql(f"EXPLAIN {sent.sql}", sent.parameters)
    keys = list(result.keys())
    return [
        " ".join(
            f"{key}={value}" for key, value in zip(keys, row, strict=True) if value is not None
        )
        for row in result
    ]


def _sqlite(conn: sa.Connection, sent: Sent) -> list[str]:
    rows = conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {sent.sql}", sent.parameters).all()
    depth = {0: -1}
    lines = []
    for node, parent, _unused, detail in rows:
        depth[node] = depth.get(parent, -1) + 1
        lines.append("  " * depth[node] + detail)
    return lines


_PLANNERS = {"postgresql": _postgresql, "mysql": _mysql, "sqlite": _sqlite}

"""Migrations: replaying every version builds exactly the schema the code expects, and no
version's code changes once written; a database filled at any older version keeps every row
through the upgrade and is drained by a worker after it; an existing version 2 database
reaches version 3 with every row and id kept, a version 3 database reaches version 4 with
every node's values (but its input copy) kept, and a version 4 database reaches version 5
with every row kept, each node's last attempt shown from its row.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from flowsmith_worker.cli import main
from flowsmith_worker.config import PoolSettings, parse_database_url
from flowsmith_worker.flow import Flow
from flowsmith_worker.storage.base import AttemptOutcome, FlowFilter, FlowStatus, NodeRecord
from flowsmith_worker.storage.sql import SqlStorage, migrations, schema
from flowsmith_worker.storage.sql.dialects import dialect_of, identifier_collation
from flowsmith_worker.storage.sql.migrations import MIGRATIONS, v0, v1, v3
from flowsmith_worker.worker import Worker
from tests.conftest import SQL_BACKENDS, database_url

Names = Callable[[str], str]
IDENTIFIER_COLUMNS = {
    (table.name, column.name)
    for table in schema.metadata.tables.values()
    for column in table.columns
    if isinstance(column.type, schema.Identifier)
}


def describe(engine: sa.Engine) -> dict[str, Any]:
    """What the database itself says about every fs_* table, in comparable form."""
    inspector = sa.inspect(engine)
    shape: dict[str, Any] = {}
    for table in sorted(inspector.get_table_names()):
        shape[table] = {
            "columns": [
                (
                    c["name"],
                    repr(c["type"]),
                    c["nullable"],
                    c.get("default"),
                    bool(c.get("autoincrement")),
                )
                for c in inspector.get_columns(table)
            ],
            "primary_key": inspector.get_pk_constraint(table)["constrained_columns"],
            "indexes": sorted(
                (
                    i["name"],
                    tuple(i["column_names"]),
                    bool(i["unique"]),
                    # PostgreSQL's partial index conditions (SQLite's are in sqlite_master).
                    i.get("dialect_options", {}).get("postgresql_where"),
                )
                for i in inspector.get_indexes(table)
            ),
            "unique": sorted(
                (u["name"], tuple(u["column_names"]))
                for u in inspector.get_unique_constraints(table)
            ),
            "foreign_keys": sorted(
                (
                    f["name"],
                    tuple(f["constrained_columns"]),
                    f["referred_table"],
                    tuple(f["referred_columns"]),
                    f["options"].get("ondelete"),
                )
                for f in inspector.get_foreign_keys(table)
            ),
            "checks": sorted(
                (c["name"], c["sqltext"]) for c in inspector.get_check_constraints(table)
            ),
        }
        if engine.dialect.name == "postgresql":
            # Per-table storage parameters (the autovacuum settings of version 4).
            shape[table]["options"] = inspector.get_table_options(table)
    if engine.dialect.name == "sqlite":
        # Partial index conditions and AUTOINCREMENT are only in the DDL text. Its
        # whitespace is not compared: ALTER TABLE ADD COLUMN (version 6) splices
        # the column in without the line break CREATE TABLE puts before it.
        with engine.connect() as conn:
            shape["sqlite_master"] = sorted(
                (name, " ".join((sql or "").split()))
                for name, sql in conn.execute(sa.text("SELECT name, sql FROM sqlite_master"))
            )
    return shape


@pytest.mark.parametrize("backend", SQL_BACKENDS)
def test_replaying_every_migration_builds_the_schema_the_code_expects(
    request: pytest.FixtureRequest, backend: str, tmp_path: Path
) -> None:
    """Versions 1 to 6 applied to an empty database give the tables, columns (type,
    nullability, default), indexes (partial ones with their conditions), unique keys,
    checks and foreign keys that schema.metadata creates directly, and no other table, so
    a change of schema.py without a migration, or of a migration alone, fails; on MySQL
    every name column has the NO PAD binary collation, on SQLite the id tables AUTOINCREMENT,
    on PostgreSQL fs_flows and fs_nodes carry the same autovacuum settings and the
    partial indexes the same conditions.
    """
    (tmp_path / "migrated").mkdir()
    (tmp_path / "direct").mkdir()
    migrated = sa.create_engine(
        parse_database_url(database_url(request, backend, tmp_path / "migrated"))
    )
    direct = sa.create_engine(
        parse_database_url(database_url(request, backend, tmp_path / "direct"))
    )
    with migrated.begin() as conn:
        assert migrations.migrate(conn, dialect_of(conn)) == schema.SCHEMA_VERSION
    schema.metadata.create_all(direct)

    assert describe(migrated) == describe(direct)
    assert set(describe(migrated)) - {"sqlite_master"} == set(schema.metadata.tables)
    if backend == "mysql":
        assert name_collations(migrated) == {
            column: identifier_collation(migrated.dialect) for column in IDENTIFIER_COLUMNS
        }
    if backend == "sqlite":
        tables = dict(describe(migrated)["sqlite_master"])
        assert "AUTOINCREMENT" in tables["fs_flows"] and "AUTOINCREMENT" in tables["fs_nodes"]
    if backend == "postgresql":
        assert describe(migrated)["fs_nodes"]["options"]["postgresql_with"] == {
            "autovacuum_vacuum_scale_factor": "0.01",
            "autovacuum_vacuum_cost_delay": "0",
        }
    migrated.dispose()
    direct.dispose()


def name_collations(engine: sa.Engine) -> dict[tuple[str, str], str]:
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT table_name, column_name, collation_name FROM information_schema.columns "
                "WHERE table_schema = DATABASE() AND collation_name LIKE '%bin'"
            )
        ).all()
    return {(table, column): collation for table, column, collation in rows}


def test_a_version_2_database_reaches_version_3_with_its_rows_and_ids(
    sql_url: str, unique: Names
) -> None:
    """Rows written at version 2 are all there after the migration, with their ids; names
    that version 2 merged are distinct runs afterwards, and (SQLite's AUTOINCREMENT
    rebuild) a deleted highest id is not handed out again, cascades still work.
    """
    storage = SqlStorage(parse_database_url(sql_url), PoolSettings())
    with storage.engine.begin() as conn:
        assert migrations.migrate(conn, storage.dialect, up_to=2) == 2
    flow = Flow(unique("f"), storage=storage).step("a", lambda ctx: 1).step("b", lambda ctx: 2)
    for tid in ("k", "cafe", "Order-aBc", unique("t")):
        write_old_run(storage.engine, flow.name, tid)
    before = all_rows(storage.engine, v1.flows, v1.nodes)

    with storage.engine.begin() as conn:
        assert migrations.migrate(conn, storage.dialect, up_to=3) == 3
    assert all_rows(storage.engine, v1.flows, v1.nodes) == before
    assert storage.migrate() == schema.SCHEMA_VERSION
    storage.check_schema()
    assert sorted(sa.inspect(storage.engine).get_table_names()) == sorted(schema.metadata.tables)

    highest = max(row["id"] for row in before["fs_flows"])
    highest_node = max(row["id"] for row in before["fs_nodes"])
    with storage.engine.begin() as conn:
        conn.execute(sa.delete(schema.flows).where(schema.flows.c.id == highest))
        orphans = conn.execute(sa.select(schema.nodes).where(schema.nodes.c.flow_id == highest))
        assert orphans.all() == []  # ON DELETE CASCADE survived the rebuild
    new_runs = [flow.run({"tid": tid}, tracking_id=tid) for tid in ("k ", "café", "order-AbC")]
    for tid in ("k", "k ", "cafe", "café", "Order-aBc", "order-AbC"):
        record = storage.get_flow(tracking_id=tid)
        assert record is not None and record.input == {"tid": tid}
    new_ids = {storage.get_flow(tracking_id=run.tracking_id).id for run in new_runs}  # type: ignore[union-attr]
    assert min(new_ids) > highest
    with storage.engine.connect() as conn:
        new_nodes = conn.execute(
            sa.select(schema.nodes.c.id).where(schema.nodes.c.flow_id.in_(new_ids))
        )
        assert min(new_nodes.scalars()) > highest_node
    storage.close()


def all_rows(engine: sa.Engine, *tables: sa.Table) -> dict[str, list[dict[str, Any]]]:
    """Every row of these tables, by id, as its values that are not NULL: the columns the
    database has now (a later version's column is NULL in an older row, so absent both
    before and after the migration that adds it)."""
    existing = {t.name: _column_names(engine, t.name) for t in tables}
    with engine.connect() as conn:
        rows = {}
        for table in tables:
            columns = [c for c in table.c if c.name in existing[table.name]]
            found = conn.execute(sa.select(*columns).order_by(*table.primary_key)).all()
            rows[table.name] = [
                {k: v for k, v in row._mapping.items() if v is not None} for row in found
            ]
        return rows


def _column_names(engine: sa.Engine, table: str) -> set[str]:
    with engine.connect() as conn:
        return {c["name"] for c in sa.inspect(conn).get_columns(table)}


def write_old_run(engine: sa.Engine, flow_name: str, tracking_id: str) -> None:
    """A run of steps a, b as versions 1-3 stored it: a COMPLETED with output 1, b PENDING,
    each node with its copy of ctx.data in fs_nodes.input (the column version 4 drops)."""
    plan = (
        '{"stages": [[{"name": "a", "max_attempts": 1, "max_rescues": 3, "subflow": false}],'
        ' [{"name": "b", "max_attempts": 1, "max_rescues": 3, "subflow": false}]]}'
    )
    run_input = f'{{"tid": "{tracking_id}"}}'
    with engine.begin() as conn:
        flow_id = conn.execute(
            sa.insert(v1.flows).values(
                flow_name=flow_name,
                tracking_id=tracking_id,
                status="RUNNING",
                input=run_input,
                plan=plan,
                queue="default",
                priority=0,
                created_at=1.0,
                updated_at=2.0,
            )
        ).inserted_primary_key[0]
        common = dict(flow_id=flow_id, group_index=0, queue="default", priority=0, rescues=0)
        conn.execute(
            sa.insert(v1.nodes),
            [
                dict(
                    common,
                    step_name="a",
                    position=0,
                    status="COMPLETED",
                    attempt=1,
                    max_attempts=1,
                    run_after=1.0,
                    input=run_input,
                    output="1",
                    created_at=1.0,
                    started_at=1.5,
                    finished_at=2.0,
                ),
                dict(
                    common,
                    step_name="b",
                    position=1,
                    status="PENDING",
                    attempt=0,
                    max_attempts=1,
                    run_after=2.0,
                    input=f'{{"tid": "{tracking_id}", "a": 1}}',
                    output=None,
                    created_at=2.0,
                    started_at=None,
                    finished_at=None,
                ),
            ],
        )


def test_a_version_3_database_reaches_version_4_with_every_node_but_its_input_copy(
    sql_url: str, unique: Names
) -> None:
    """Migration 4 drops fs_nodes.input and keeps every other value of every node and run;
    `flowsmith status` still shows each step's input snapshot (rebuilt from the run's input
    and the outputs), and a worker finishes the old run with the ctx.data it had."""
    storage = SqlStorage(parse_database_url(sql_url), PoolSettings())
    with storage.engine.begin() as conn:
        assert migrations.migrate(conn, storage.dialect, up_to=3) == 3
    seen: list[dict[str, Any]] = []
    flow = Flow(unique("f"), storage=storage).step("a", lambda ctx: 1)
    flow.step("b", lambda ctx: seen.append(dict(ctx.data)) or 2)
    tid = unique("t")
    write_old_run(storage.engine, flow.name, tid)
    before = all_rows(storage.engine, schema.flows, schema.nodes)

    assert storage.migrate() == schema.SCHEMA_VERSION  # through 4, and on
    storage.check_schema()
    assert all_rows(storage.engine, schema.flows, schema.nodes) == before
    columns = {c["name"] for c in sa.inspect(storage.engine).get_columns("fs_nodes")}
    assert "input" not in columns and "output" in columns

    shown = CliRunner().invoke(
        main, ["status", tid, "--json", "--url", storage.engine.url.render_as_string(False)]
    )
    assert shown.exit_code == 0, shown.output
    inputs = {s["step_name"]: s["input"] for s in json.loads(shown.stdout)["steps"]}
    assert inputs == {"a": {"tid": tid}, "b": {"tid": tid, "a": 1}}
    Worker(storage=storage, poll_interval=0.05).run_until_idle(timeout=20)
    assert seen == [{"tid": tid, "a": 1}]
    assert storage.get_flow(tracking_id=tid).output == {"tid": tid, "a": 1, "b": 2}  # type: ignore[union-attr]
    storage.close()


def write_v4_failed_run(engine: sa.Engine, flow_name: str, tracking_id: str) -> None:
    """A FAILED run of one step as version 4 stored it: its second (and last) attempt
    failed on worker old-w; the first left nothing behind (versions 1-4 kept no history)."""
    plan = '{"stages": [[{"name": "a", "max_attempts": 2, "max_rescues": 3, "subflow": false}]]}'
    with engine.begin() as conn:
        flow_id = conn.execute(
            sa.insert(schema.flows).values(
                flow_name=flow_name,
                tracking_id=tracking_id,
                status="FAILED",
                input="{}",
                error="ValueError: second",
                plan=plan,
                queue="default",
                priority=0,
                created_at=1.0,
                updated_at=3.0,
                finished_at=3.0,
            )
        ).inserted_primary_key[0]
        conn.execute(
            sa.insert(schema.nodes).values(
                flow_id=flow_id,
                step_name="a",
                position=0,
                group_index=0,
                status="FAILED",
                queue="default",
                priority=0,
                attempt=2,
                max_attempts=2,
                rescues=0,
                run_after=1.0,
                lease_owner="old-w",
                error="Traceback ...\nValueError: second",
                created_at=1.0,
                started_at=2.0,
                finished_at=3.0,
            )
        )


def test_a_version_4_database_reaches_version_5_with_its_rows_and_their_last_attempts(
    sql_url: str, unique: Names
) -> None:
    """Migration 5 adds fs_attempts and changes no row: a run failed at version 4 shows
    its step's last attempt (from the node's row) after it; retried, that attempt is kept
    with its error and worker, and the new one follows it."""
    storage = SqlStorage(parse_database_url(sql_url), PoolSettings())
    with storage.engine.begin() as conn:
        assert migrations.migrate(conn, storage.dialect, up_to=4) == 4
    flow = Flow(unique("f"), storage=storage).step("a", lambda ctx: 1)
    tid = unique("t")
    write_v4_failed_run(storage.engine, flow.name, tid)
    before = all_rows(storage.engine, schema.flows, schema.nodes)

    assert storage.migrate() == schema.SCHEMA_VERSION  # through 5, and on
    storage.check_schema()
    assert all_rows(storage.engine, schema.flows, schema.nodes) == before
    assert all_rows(storage.engine, schema.attempts) == {"fs_attempts": []}
    [node] = _trace(storage, tid)
    [old] = node.attempts
    assert (old.attempt, old.outcome, old.worker_id, old.started_at, old.ended_at) == (
        2,
        AttemptOutcome.FAILED,
        "old-w",
        2.0,
        3.0,
    )
    assert old.error == "Traceback ...\nValueError: second"

    storage.resume_flow(tracking_id=tid)
    Worker(storage=storage, poll_interval=0.05).run_until_idle(timeout=20)
    [node] = _trace(storage, tid)
    assert [(a.attempt, a.outcome) for a in node.attempts] == [
        (2, AttemptOutcome.FAILED),
        (3, AttemptOutcome.COMPLETED),
    ]
    assert (node.attempts[0].error, node.attempts[0].worker_id) == (old.error, "old-w")
    storage.close()


def _trace(storage: SqlStorage, tracking_id: str) -> list[NodeRecord]:
    record = storage.get_flow(tracking_id=tracking_id)
    assert record is not None
    return storage.list_nodes(flow_id=record.id)


def test_a_mysql_server_without_the_binary_collation_is_told_what_it_needs(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server older than MySQL 8.0.17 / MariaDB 10.2 has no NO PAD binary collation:
    `flowsmith migrate` says which versions work, with no traceback, and records no v3."""
    url = database_url(request, "mysql", tmp_path)
    monkeypatch.setattr(v3, "MARIADB_COLLATION", "utf8mb4_from_the_future")
    monkeypatch.setattr(v3, "MYSQL_COLLATION", "utf8mb4_from_the_future")
    result = CliRunner().invoke(main, ["migrate", "--url", url])
    assert result.exit_code == 1, result.output
    assert "utf8mb4_from_the_future" in result.output and "MariaDB 10.2+" in result.output
    assert "Traceback" not in result.output
    engine = sa.create_engine(parse_database_url(url))
    with engine.connect() as conn:
        assert migrations.current_version(conn) < 3
    engine.dispose()


def test_sqlite_without_drop_column_is_told_what_it_needs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Migration 4 needs SQLite 3.35 (DROP COLUMN): an older library is named, with what to
    do, no traceback, and the database stays at version 3."""
    import sqlite3

    url = f"sqlite:///{tmp_path / 'old.db'}"
    monkeypatch.setattr(sqlite3, "sqlite_version_info", (3, 31, 1))
    monkeypatch.setattr(sqlite3, "sqlite_version", "3.31.1")
    result = CliRunner().invoke(main, ["migrate", "--url", url])
    assert result.exit_code == 1, result.output
    assert "3.31.1" in result.output and "SQLite 3.35+" in result.output
    assert "Traceback" not in result.output
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        assert migrations.current_version(conn) == 0  # the one transaction rolled back
    engine.dispose()


# -- each version frozen ---------------------------------------------------------------

# What each migration module does, as the SHA-256 of its code without comments or
# docstrings (fingerprint below). A database migrated with an old release keeps
# what that release built; a change to an old version would reach new databases
# only, and the two would differ without any test noticing if schema.py moved too.
FROZEN = {
    0: "f314f180e974bdff207a46d2dc229b87b53b419064349fae05e8fa25d3fd05f0",
    1: "c6ca62f69869788fdd6986e2ebd2ae6d2396513d6b15015ea948bd2f845a6cd4",
    2: "8c129a9fe8d73e84c6bc5b6a7bb558d468944903f23fac9971a894139cbddc63",
    3: "6142db255bb1e4278eef7e33fcf33c2962847f7dbba73eeaf5948dba796b59e7",
    4: "c27d8134094444d0d11ae9017c525b0a64e75cc71f53b4ff37b75588ec9f79a3",
    5: "fb7bf27beba1dba601fe3c355d6e4f8d59d6be127ac78ffaf7d685a2d5f67240",
    6: "2e00c121f760ede1162e28285731612668524c8bedde4eaa0a048944b2045156",
    7: "0a4fe7bd2f813965a06c7ba51a764fd33aae19aa14dab21252510d1f13d250e2",
}


def fingerprint(module: ModuleType) -> str:
    """The SHA-256 of a module's syntax tree, docstrings left out (comments never are in it)."""
    tree = ast.parse(inspect.getsource(module))
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (
            isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            node.body = body[1:]
    return hashlib.sha256(json.dumps(syntax(tree)).encode()).hexdigest()


def syntax(node: Any) -> Any:
    """A syntax tree as plain values, the same on every Python 3.11+: empty fields are left
    out, as Python versions add fields (type_params) and ast.dump shows them differently."""
    if isinstance(node, ast.AST):
        fields = {name: syntax(value) for name, value in ast.iter_fields(node)}
        return [type(node).__name__, {k: v for k, v in fields.items() if v not in (None, [])}]
    if isinstance(node, list):
        return [syntax(item) for item in node]
    return repr(node)


def test_no_migration_changes_once_written() -> None:
    """Every version's module (and v0's, the bookkeeping table) has the code it
    was written with: fixing an old version instead of adding one fails here."""
    modules = {0: v0, **{m.version: sys.modules[m.apply.__module__] for m in MIGRATIONS}}
    found = {version: fingerprint(module) for version, module in modules.items()}
    changed = {v: found[v] for v in found if FROZEN.get(v) != found[v]}
    assert not changed, (
        f"migration modules {sorted(changed)} differ from what they were: a database "
        "migrated before keeps what the old code built, so put the change in a new version. "
        "A new version, or one no database was ever migrated with (unreleased), records "
        f"its fingerprint in FROZEN: {changed}"
    )


# -- a full database, upgraded -------------------------------------------------------------

Values = dict[str, Any]  # a row's values by column
NodeValues = tuple[str, str, Values]  # step name, status, other values

OLD_TIME = 1.0  # 1970: every lease written at the old version has long expired
RUNNING: Values = {"status": "RUNNING"}
FAILURE = "Traceback ...\nValueError: first"
DROPPED_COLUMNS = {("fs_nodes", "input")}  # by version 4


@pytest.mark.parametrize("old_version", range(1, schema.SCHEMA_VERSION))
def test_a_database_filled_at_each_version_keeps_every_row_and_is_drained_after_upgrade(
    sql_url: str, unique: Names, old_version: int
) -> None:
    """Runs in every state (pending, halfway, a lost worker's, a retry due, completed with a
    skipped step, failed, cancelled, a parent waiting for its pending child), a worker and a
    queue limit, written at version N, keep every value of every row but dropped columns
    through the upgrade to the newest version; a worker then finishes each unfinished run
    (rescuing the lost step, resuming the parent from its child) and touches no finished one.
    """
    storage = SqlStorage(parse_database_url(sql_url), PoolSettings())
    with storage.engine.begin() as conn:
        assert migrations.migrate(conn, storage.dialect, up_to=old_version) == old_version
    flows = OldFlows.define(storage, unique)
    tid = unique("t")
    write_runs_of_every_state(storage.engine, flows, tid)
    before = reflected_rows(storage.engine)

    assert storage.migrate() == schema.SCHEMA_VERSION
    storage.check_schema()
    assert kept_columns(reflected_rows(storage.engine), before) == kept_columns(before, before)

    Worker(storage=storage, poll_interval=0.05).run_until_idle(timeout=60)
    done = {"a": 1, "b": 2}
    assert outcomes(storage, tid) == {
        "fresh": (FlowStatus.COMPLETED, done),
        "halfway": (FlowStatus.COMPLETED, done),
        "lost": (FlowStatus.COMPLETED, done),
        "retrying": (FlowStatus.COMPLETED, done),
        "parent": (FlowStatus.COMPLETED, {"sub": {"c": 3}, "d": 4}),
        "parent:sub": (FlowStatus.COMPLETED, {"c": 3}),
        "done": (FlowStatus.COMPLETED, {"b": 2}),
        "failed": (FlowStatus.FAILED, None),
        "cancelled": (FlowStatus.CANCELLED, None),
    }
    finished = {f"{tid}-{name}" for name in ("done", "failed", "cancelled")}
    after = kept_columns(reflected_rows(storage.engine), before)
    assert rows_of_runs(after, finished) == rows_of_runs(kept_columns(before, before), finished)
    storage.close()


@dataclass(frozen=True)
class OldFlows:
    """The flows of the runs written at an old version: a, b; c; and sub (runs c), d."""

    plain: Flow
    child: Flow
    parent: Flow

    @classmethod
    def define(cls, storage: SqlStorage, unique: Names) -> OldFlows:
        plain = Flow(unique("plain"), storage=storage).step("a", lambda ctx: 1, retries=1)
        child = Flow(unique("child"), storage=storage).step("c", lambda ctx: 3)
        parent = Flow(unique("parent"), storage=storage).subflow("sub", child)
        return cls(plain.step("b", lambda ctx: 2), child, parent.step("d", lambda ctx: 4))


def write_runs_of_every_state(engine: sa.Engine, flows: OldFlows, tid: str) -> None:
    """Rows as the engine of versions 1-4 left them, through the tables as they are now."""
    running: Values = dict(attempt=1, started_at=OLD_TIME)
    lost: Values = dict(lease_owner="gone-w", lease_expires_at=OLD_TIME)
    failure: Values = dict(attempt=1, error=FAILURE, finished_at=OLD_TIME)
    completed: Values = dict(attempt=1, started_at=OLD_TIME, finished_at=OLD_TIME)
    plain: dict[str, tuple[str, list[NodeValues]]] = {
        "fresh": ("PENDING", [("a", "PENDING", {})]),
        "halfway": (
            "RUNNING",
            [("a", "COMPLETED", completed | {"output": "1"}), ("b", "PENDING", {})],
        ),
        "lost": ("RUNNING", [("a", "RUNNING", running | lost)]),
        "retrying": ("RUNNING", [("a", "PENDING", failure | {"finished_at": None})]),
        "done": (
            "COMPLETED",
            [("a", "SKIPPED", {}), ("b", "COMPLETED", completed | {"output": "2"})],
        ),
        "failed": ("FAILED", [("a", "FAILED", failure | {"attempt": 2})]),
        "cancelled": ("CANCELLED", [("a", "CANCELLED", {})]),
    }
    ended: dict[str, Values] = {
        "done": dict(output='{"b": 2}', finished_at=OLD_TIME),
        "failed": dict(error=FAILURE, finished_at=OLD_TIME),
        "cancelled": dict(finished_at=OLD_TIME),
    }
    tables = reflected_tables(engine)
    with engine.begin() as conn:
        for name, (status, nodes) in plain.items():
            run = {"status": status} | ended.get(name, {})
            write_run(conn, tables, flows.plain, f"{tid}-{name}", run, nodes)
        [sub] = write_run(
            conn, tables, flows.parent, f"{tid}-parent", RUNNING, [("sub", "WAITING", running)]
        )
        child: list[NodeValues] = [("c", "PENDING", {})]
        as_child = RUNNING | {"parent_node_id": sub}
        write_run(conn, tables, flows.child, f"{tid}-parent:sub", as_child, child)
        if "fs_workers" in tables:  # version 2 on
            conn.execute(
                sa.insert(tables["fs_workers"]).values(
                    id="gone-w",
                    host="h",
                    pid=1,
                    version="0.1",
                    queues="default",
                    concurrency=4,
                    lease_seconds=30.0,
                    in_flight=1,
                    started_at=OLD_TIME,
                    heartbeat_at=OLD_TIME,
                )
            )
            conn.execute(sa.insert(tables["fs_queues"]).values(name="slow", max_running=2))


def write_run(
    conn: sa.Connection,
    tables: dict[str, sa.Table],
    flow: Flow,
    tracking_id: str,
    values: Values,
    nodes: list[NodeValues],
) -> list[int]:
    """One run and its nodes (the values of columns this version has); the nodes' ids."""
    plan = {
        "stages": [
            [dict(name=s.name, max_attempts=s.max_attempts, max_rescues=3, subflow=s.subflow)]
            for [s] in flow.stages
        ]
    }
    run = dict(
        flow_name=flow.name,
        tracking_id=tracking_id,
        input="{}",
        plan=json.dumps(plan),
        queue="default",
        priority=0,
        created_at=OLD_TIME,
        updated_at=OLD_TIME,
    )
    inserted = conn.execute(sa.insert(tables["fs_flows"]).values(run | values))
    flow_id = inserted.inserted_primary_key[0]
    ids = []
    for position, (step, node_status, values) in enumerate(nodes):
        spec = flow.get_step(step)
        assert spec is not None
        node = dict(
            flow_id=flow_id,
            step_name=step,
            position=position,
            group_index=0,
            status=node_status,
            queue="default",
            priority=0,
            attempt=0,
            max_attempts=spec.max_attempts,
            rescues=0,
            run_after=OLD_TIME,
            input="{}",  # versions 1-3 only
            created_at=OLD_TIME,
        )
        row = {k: v for k, v in (node | values).items() if k in tables["fs_nodes"].c}
        ids.append(conn.execute(sa.insert(tables["fs_nodes"]).values(row)).inserted_primary_key[0])
    return ids


def reflected_tables(engine: sa.Engine) -> dict[str, sa.Table]:
    """The fs_* tables as the database has them now (whatever the version)."""
    metadata = sa.MetaData()
    metadata.reflect(engine, only=lambda name, _: name.startswith("fs_"))
    return dict(metadata.tables)


Rows = dict[str, list[dict[str, Any]]]


def reflected_rows(engine: sa.Engine) -> Rows:
    """Every row of every fs_* table as a dict of the columns it has now, in key order."""
    tables = reflected_tables(engine)
    with engine.connect() as conn:
        return {
            name: [
                dict(row._mapping)
                for row in conn.execute(sa.select(table).order_by(*table.primary_key))
            ]
            for name, table in tables.items()
            if name != "fs_schema_version"
        }


def kept_columns(rows: Rows, old: Rows) -> Rows:
    """``rows`` cut to the tables and columns of ``old`` that no migration dropped."""
    return {
        table: [
            {k: v for k, v in row.items() if k in old_rows[0] and (table, k) not in DROPPED_COLUMNS}
            for row in rows[table]
        ]
        for table, old_rows in old.items()
        if old_rows
    }


def rows_of_runs(rows: Rows, tracking_ids: set[str]) -> Rows:
    """The fs_flows and fs_nodes rows of these runs."""
    ids = {r["id"] for r in rows["fs_flows"] if r["tracking_id"] in tracking_ids}
    return {
        "fs_flows": [r for r in rows["fs_flows"] if r["id"] in ids],
        "fs_nodes": [r for r in rows["fs_nodes"] if r["flow_id"] in ids],
    }


def outcomes(storage: SqlStorage, tid: str) -> dict[str, tuple[str, Any]]:
    """Each run's status and output, by its name in write_runs_of_every_state."""
    summaries = storage.list_flows(where=FlowFilter(tracking_id_prefix=f"{tid}-"))
    records = [storage.get_flow(tracking_id=s.tracking_id) for s in summaries]
    return {r.tracking_id.removeprefix(f"{tid}-"): (r.status, r.output) for r in records if r}

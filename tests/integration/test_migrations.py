"""Migrations: replaying every version builds exactly the schema the code expects; an
existing version 2 database reaches version 3 with every row and id kept, a version 3
database reaches version 4 with every node's values (but its input copy) kept, and a version 4
database reaches version 5 with every row kept, each node's last attempt shown from its row.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from flowsmith_worker.cli import main
from flowsmith_worker.config import PoolSettings, parse_database_url
from flowsmith_worker.flow import Flow
from flowsmith_worker.storage import migrations, schema
from flowsmith_worker.storage.base import AttemptOutcome, NodeRecord
from flowsmith_worker.storage.dialects import dialect_of, identifier_collation
from flowsmith_worker.storage.migrations import v1, v3
from flowsmith_worker.storage.sql import SqlStorage
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
                (c["name"], repr(c["type"]), c["nullable"], bool(c.get("autoincrement")))
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
                (tuple(f["constrained_columns"]), f["referred_table"], f["options"].get("ondelete"))
                for f in inspector.get_foreign_keys(table)
            ),
        }
        if engine.dialect.name == "postgresql":
            # Per-table storage parameters (the autovacuum settings of version 4).
            shape[table]["options"] = inspector.get_table_options(table)
    if engine.dialect.name == "sqlite":
        # Partial index conditions and AUTOINCREMENT are only in the DDL text.
        with engine.connect() as conn:
            shape["sqlite_master"] = sorted(
                tuple(row) for row in conn.execute(sa.text("SELECT name, sql FROM sqlite_master"))
            )
    return shape


@pytest.mark.parametrize("backend", SQL_BACKENDS)
def test_replaying_every_migration_builds_the_schema_the_code_expects(
    request: pytest.FixtureRequest, backend: str, tmp_path: Path
) -> None:
    """Versions 1 to 5 applied to an empty database give the tables, columns, types,
    indexes, unique keys and foreign keys that schema.metadata creates directly; on MySQL
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
    assert set(describe(migrated)) >= set(schema.metadata.tables)
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

    highest = max(row.id for row in before["fs_flows"])
    highest_node = max(row.id for row in before["fs_nodes"])
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


def all_rows(engine: sa.Engine, *tables: sa.Table) -> dict[str, list[sa.Row[Any]]]:
    """Every row of these tables (as that version's columns describe them), by id."""
    with engine.connect() as conn:
        return {
            table.name: conn.execute(sa.select(table).order_by(*table.primary_key)).all()
            for table in tables
        }


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

    assert storage.migrate() == 5
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
    monkeypatch.setattr(v3, "identifier_collation", lambda _dialect: "utf8mb4_from_the_future")
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

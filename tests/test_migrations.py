"""Migrations: replaying every version builds exactly the schema the code expects, and
an existing version 2 database reaches version 3 with every row and id kept.
"""

from __future__ import annotations

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
from flowsmith_worker.storage.dialects import dialect_of, identifier_collation
from flowsmith_worker.storage.migrations import v3
from flowsmith_worker.storage.sql import SqlStorage
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
                (i["name"], tuple(i["column_names"]), bool(i["unique"]))
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
    """Versions 1, 2 and 3 applied to an empty database give the tables, columns, types,
    indexes, unique keys and foreign keys that schema.metadata creates directly; on MySQL
    every name column has the NO PAD binary collation, on SQLite the id tables AUTOINCREMENT.
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
        flow.run({"tid": tid}, tracking_id=tid)
    before = all_rows(storage.engine)

    assert storage.migrate() == 3
    storage.check_schema()
    assert all_rows(storage.engine) == before
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


def all_rows(engine: sa.Engine) -> dict[str, list[sa.Row[Any]]]:
    with engine.connect() as conn:
        return {
            table.name: conn.execute(sa.select(table).order_by(*table.primary_key)).all()
            for table in (schema.flows, schema.nodes)
        }


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

"""No silent local database: with no URL set, nothing creates ./flowsmith.db unasked.

The operator commands never create a SQLite file (those that only read open it
read-only), and configure() falling back to the default file says so in a warning.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from flowsmith_worker import Flow, configure
from flowsmith_worker.cli import main
from flowsmith_worker.config import URL_ENV_VARS
from flowsmith_worker.storage import create_storage

READ_COMMANDS = [["status", "order-1"], ["flows"], ["stats"], ["workers"]]
WRITE_COMMANDS = [["cancel", "order-1"], ["retry", "order-1"], ["prune", "--older-than", "1d"]]


@pytest.fixture
def no_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory of its own, and no database URL in the environment."""
    for name in URL_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("args", READ_COMMANDS + WRITE_COMMANDS, ids=lambda a: a[0])
def test_operator_commands_say_there_is_no_database_and_create_none(
    no_url: Path, args: list[str]
) -> None:
    """With no URL set and no ./flowsmith.db, an operator command exits 1 saying there
    is no database at that path and how to set the URL, and leaves no file behind."""
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    message = " ".join(result.output.split())
    assert f"there is no SQLite database at {no_url / 'flowsmith.db'}" in message, message
    assert "FLOWSMITH_DATABASE_URL" in message and "flowsmith migrate" in message, message
    assert list(no_url.iterdir()) == []


def test_read_commands_open_the_file_read_only(no_url: Path) -> None:
    """status, flows, stats and workers read a file without writing it: one in
    rollback-journal mode is still in that mode afterwards (any read-write open
    of ours switches a file to WAL)."""
    storage = create_storage("sqlite:///flowsmith.db")
    storage.migrate()
    Flow("readonly", storage=storage).step("one", lambda ctx: 1).run({}, tracking_id="order-1")
    storage.close()
    with sqlite3.connect(no_url / "flowsmith.db") as conn:
        conn.execute("PRAGMA journal_mode=DELETE")
    for args in READ_COMMANDS:
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, (args, result.output)
    with sqlite3.connect(no_url / "flowsmith.db") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("delete",)


def test_configure_without_a_url_warns_naming_the_file(
    no_url: Path, logs: list[dict[str, Any]]
) -> None:
    """configure() with no URL given or set logs one warning naming the default file
    and the variable to set; with a URL from the environment it logs none."""
    configure()
    (warning,) = [line for line in logs if line["log_level"] == "warning"]
    assert warning["event"] == "database.default_used"
    assert warning["file"] == str(no_url / "flowsmith.db")
    assert "set FLOWSMITH_DATABASE_URL" in warning["hint"]

    logs.clear()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("FLOWSMITH_DATABASE_URL", f"sqlite:///{no_url / 'chosen.db'}")
        configure()
    assert [line for line in logs if line["log_level"] == "warning"] == []

"""`flowsmith status`, `retry` and `cancel` of runs with compensations (see
flowsmith_worker/compensation.py), through click's CliRunner on a real database."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flowsmith_worker import Flow
from tests.integration.conftest import Db
from tests.support.cli import cli, cli_json, doomed, drain, row_of, run_line

Names = Callable[[str], str]


def refused(_ctx: Any) -> None:
    raise RuntimeError("refund refused")


def test_status_shows_the_compensations_and_their_outcome(sqlite_db: Db, unique: Names) -> None:
    """A run whose compensation of "a" completed and of "b" failed: the Status line says
    FAILED (COMPENSATION_FAILED), each compensation is a step row, --json has the
    outcome, and the exit code is 1 (the run did not go through)."""
    flow = (
        Flow(unique("saga"), storage=sqlite_db.storage)
        .step("a", lambda ctx: 1, compensate=lambda ctx: "undone")
        .step("b", lambda ctx: 2, compensate=refused)
        .step("c", doomed)
    )
    tracking_id = unique("t")
    flow.run(tracking_id=tracking_id)
    drain(sqlite_db.storage)

    result = cli(sqlite_db.url, "status", tracking_id)
    assert result.exit_code == 1, result.output
    assert run_line(result.stdout, "Status") == "FAILED (COMPENSATION_FAILED)"
    assert row_of(result.stdout, "compensate:b")[2] == "FAILED"
    assert row_of(result.stdout, "compensate:a")[2] == "COMPLETED"
    shown = cli_json(sqlite_db.url, "status", tracking_id, exit_code=1)
    assert shown["compensation"] == "COMPENSATION_FAILED"
    assert [s["step_name"] for s in shown["steps"]][-2:] == ["compensate:b", "compensate:a"]


def test_retry_of_a_compensated_run_is_refused_with_why(sqlite_db: Db, unique: Names) -> None:
    """`flowsmith retry` of a FAILED run whose steps were undone exits 1 and says to
    start a new run; the run stays FAILED and no step is queued."""
    flow = (
        Flow(unique("saga"), storage=sqlite_db.storage)
        .step("a", lambda ctx: 1, compensate=lambda ctx: None)
        .step("b", doomed)
    )
    tracking_id = unique("t")
    run = flow.run(tracking_id=tracking_id)
    drain(sqlite_db.storage)

    result = cli(sqlite_db.url, "retry", tracking_id)
    assert result.exit_code == 1, result.output
    assert "undid its completed steps" in result.output and "new tracking_id" in result.output
    assert "Traceback" not in result.output
    assert run.status() == "FAILED" and run.compensation() == "COMPENSATED"

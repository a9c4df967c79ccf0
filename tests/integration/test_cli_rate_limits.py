"""`flowsmith status` of a run whose rate-limited step waits for its turn (SQLite).

The run is real: enqueued on a real database and run by an in-process Worker; the
command runs through click's CliRunner against the same URL, as `flowsmith` does.
"""

from __future__ import annotations

from collections.abc import Callable

from flowsmith_worker import Flow, Worker
from tests.integration.conftest import Db
from tests.support.cli import cli, cli_json
from tests.support.rate_limits import POLL, completed, turn_until, waiting


def test_status_shows_a_step_waiting_for_its_rate_limit_with_its_turn_as_due(
    sqlite_db: Db, unique: Callable[[str], str]
) -> None:
    """Two runs of a step limited to 1/h: the first starts and completes, the second's
    step shows as RATE_LIMITED, due in about an hour (its turn), not as PENDING; no
    attempt of it is in the trace, as it never started."""
    limited = Flow(unique("limited"), storage=sqlite_db.storage).step(
        "call_api", lambda ctx: "called", rate_limit="1/h"
    )
    first, second = unique("first"), unique("second")
    limited.run({}, tracking_id=first)
    worker = Worker(storage=sqlite_db.storage, poll_interval=POLL)
    turn_until(worker, lambda: completed(sqlite_db.storage, [first]))
    limited.run({}, tracking_id=second)
    turn_until(worker, lambda: waiting(sqlite_db.storage, [second]))

    shown = cli(sqlite_db.url, "status", second)
    assert shown.exit_code == 0, shown.output
    [row] = [line for line in shown.stdout.splitlines() if " call_api " in line]
    assert "RATE_LIMITED" in row and ("in 59m" in row or "in 1h" in row), row
    [step] = cli_json(sqlite_db.url, "status", second)["steps"]
    assert step["status"] == "PENDING" and step["wake_at"] is not None
    assert step["attempts"] == []

"""The operators' tools on rows they cannot trust: corrupt, huge, or full of escapes.

Rows are corrupted by hand with SQL on every SQL backend (an unknown status,
text that is not JSON, an unparsable plan); payload columns are renamed away to
prove which commands never read them; tracking ids, names and errors carry
terminal escape sequences. The commands run through click's CliRunner, as
`flowsmith` runs them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner, Result

from flowsmith_worker import Context, Flow, Worker
from flowsmith_worker.cli import main
from flowsmith_worker.errors import UnreadableRow
from flowsmith_worker.run import FlowRun
from flowsmith_worker.storage import create_storage
from flowsmith_worker.storage.base import FlowStatus, Storage
from flowsmith_worker.storage.sql import schema
from tests.support.schema import execute

Names = Callable[[str], str]
F, N = schema.flows, schema.nodes


@pytest.fixture
def db(sql_url: str) -> Iterator[tuple[str, Storage]]:
    """A migrated database on each SQL backend: its URL and a storage on it."""
    storage = create_storage(sql_url)
    storage.migrate()
    yield sql_url, storage
    storage.close()


def cli(url: str, *args: str) -> Result:
    return CliRunner().invoke(main, [*args, "--url", url])


def ok(ctx: Context) -> dict[str, Any]:
    return {"ok": True}


def assert_clean(result: Result, exit_code: int) -> None:
    assert result.exit_code == exit_code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exc_info
    assert "Traceback" not in result.output


# -- malformed rows --------------------------------------------------------------------------


def test_corrupt_rows_are_shown_as_unreadable_and_the_rest_still_listed(
    db: tuple[str, Storage], unique: Names
) -> None:
    """An unknown status, bad JSON and an unparsable plan in some rows: `flows`,
    `status`, `stats` (and --json) still answer with the exit codes of their help,
    the bad field marked UNREADABLE with why, the good rows as before, no traceback;
    retry and cancel refuse the unreadable run; the API raises UnreadableRow."""
    url, storage = db
    flow = Flow(unique("corrupt"), storage=storage).step("first", ok).step("second", ok)
    for tracking_id in ("bad-status", "bad-plan", "bad-json", "good"):
        flow.run({"n": 1}, tracking_id=tracking_id)
    execute(
        url,
        sa.update(F).where(F.c.tracking_id == "bad-status").values(status="EXPLODED"),
        sa.update(F).where(F.c.tracking_id == "bad-plan").values(plan='{"stages": [[{"nam'),
        sa.update(F).where(F.c.tracking_id == "bad-json").values(input="{not json"),
        sa.update(N).values(status="WEIRD", output="[1, 2"),
    )

    listed = cli(url, "flows")
    assert_clean(listed, 0)
    for tracking_id in ("bad-status", "bad-plan", "bad-json", "good"):
        assert tracking_id in listed.stdout
    assert "UNREADABLE" in next(line for line in listed.stdout.splitlines() if "bad-status" in line)
    assert "the stored status cannot be read: 'EXPLODED'" in listed.stderr
    as_json = json.loads(cli(url, "flows", "--json").stdout)["flows"]
    bad = next(f for f in as_json if f["tracking_id"] == "bad-status")
    assert bad["status"] is None and "EXPLODED" in bad["unreadable"]["status"]
    assert {f["status"] for f in as_json if f["tracking_id"] != "bad-status"} == {"PENDING"}

    shown = cli(url, "status", "bad-status")
    assert_clean(shown, 1)  # documented: 1 when the run's status cannot be read
    assert "UNREADABLE" in shown.stdout and "EXPLODED" in shown.stderr
    assert "WEIRD" in shown.stderr  # the step's status too
    plan = cli(url, "status", "bad-plan")
    assert_clean(plan, 0)
    assert "the stored plan cannot be read" in plan.stderr
    payloads = cli(url, "status", "bad-json", "--json")
    assert_clean(payloads, 0)
    record = json.loads(payloads.stdout)
    assert record["flow"]["input"] is None and "input" in record["flow"]["unreadable"]
    assert record["steps"][0]["output"] is None and record["steps"][0]["status"] is None
    # The step's input snapshot is rebuilt from the run's unreadable input.
    assert set(record["steps"][0]["unreadable"]) == {"status", "output", "input"}

    stats = cli(url, "stats")
    assert_clean(stats, 0)
    assert "UNREADABLE 'EXPLODED'" in stats.stdout
    assert "UNREADABLE" in stats.stdout.split("Steps by queue")[1]
    assert json.loads(cli(url, "stats", "--json").stdout)["flows_by_status"]["EXPLODED"] == 1

    for command in ("retry", "cancel"):
        refused = cli(url, command, "bad-status")
        assert_clean(refused, 1)
        assert "cannot be read" in refused.output and "nothing done" in refused.output
    with pytest.raises(UnreadableRow, match="EXPLODED"):
        FlowRun(storage, flow.name, "bad-status").status()
    assert FlowRun(storage, flow.name, "good").status() == FlowStatus.PENDING


# -- what listing commands read -------------------------------------------------------------


def test_listings_never_read_payloads_they_do_not_print(
    db: tuple[str, Storage], unique: Names
) -> None:
    """With every input and output column (and the runs' plan) renamed away, `flows`,
    `stats`, `workers` and `status` (table) still work: they never select a payload.
    `status --json`, which prints them, is the one that needs them."""
    url, storage = db
    flow = Flow(unique("big"), storage=storage).step("first", ok)
    big = {"blob": "x" * 100_000}
    flow.run(big, tracking_id="big-1")
    worker = Worker(storage=storage, poll_interval=0.05)
    try:
        worker.run_until_idle(timeout=20)
    finally:
        worker.shutdown()
    renames = [
        ("fs_flows", "input"),
        ("fs_flows", "output"),
        ("fs_nodes", "output"),
    ]
    execute(url, *(sa.text(f"ALTER TABLE {t} RENAME COLUMN {c} TO {c}_gone") for t, c in renames))

    for args in (["flows"], ["flows", "--json"], ["stats"], ["workers"], ["status", "big-1"]):
        result = cli(url, *args)
        assert_clean(result, 0)
    assert "big-1" in cli(url, "flows").stdout
    assert "COMPLETED" in cli(url, "status", "big-1").stdout
    assert cli(url, "status", "big-1", "--json").exit_code == 1  # it does read them

    execute(url, sa.text("ALTER TABLE fs_flows RENAME COLUMN plan TO plan_gone"))
    assert_clean(cli(url, "flows"), 0)  # nor the plan


# -- terminal escapes -------------------------------------------------------------------------

ESCAPES = ("\x1b", "\x07", "\x9b", "\r", "\u202e")


def explode(ctx: Context) -> None:
    raise ValueError("card \x1b[2J\x1b]0;pwned\x07 declined\r\u202e\x9b31m")


def test_terminal_escapes_in_rows_are_shown_escaped(tmp_path: Path, unique: Names) -> None:
    """Escape sequences in a tracking_id, a flow and a queue name and a step's error reach
    no terminal: every human-readable output shows them escaped (\\x1b), --json as JSON."""
    url = f"sqlite:///{tmp_path / 'escapes.db'}"
    storage = create_storage(url)
    storage.migrate()
    try:
        name = unique("esc") + "\x1b[1m"
        queue = "q\x1b[5m"
        Flow(name, storage=storage, queue=queue).step("pay\x1b[8m", explode).run(
            {}, tracking_id="order-\x1b[2J\x07"
        )
        worker = Worker(storage=storage, poll_interval=0.05, queues=[queue])
        try:
            worker.run_until_idle(timeout=20)
        finally:
            worker.shutdown()
    finally:
        storage.close()
    tracking_id = "order-\x1b[2J\x07"
    outputs = [
        cli(url, "flows"),
        cli(url, "status", tracking_id),
        cli(url, "status", tracking_id, "--traceback"),
        cli(url, "stats"),
        cli(url, "cancel", tracking_id),  # refused: it FAILED; the message names the run
        cli(url, "status", "nope\x1b[2J"),  # not found: the message quotes the argument
        cli(url, "flows", "--json"),
    ]
    for result in outputs:
        for char in ESCAPES:
            assert char not in result.output, (char, result.output)
    assert "order-\\x1b[2J\\x07" in outputs[0].stdout
    assert "\\x1b]0;pwned\\x07" in outputs[2].stdout
    assert "q\\x1b[5m" in outputs[3].stdout
    assert json.loads(outputs[-1].stdout)["flows"][0]["tracking_id"] == tracking_id


def test_hand_edited_times_and_arguments_no_database_takes_give_no_traceback(
    tmp_path: Path, unique: Names
) -> None:
    """A time column holding text or Infinity is one UNREADABLE cell (and null in
    --json), not a traceback that hides every other run; a tracking_id argument that is
    not text (bytes that are not UTF-8) and a --limit no database takes are usage errors."""
    url = f"sqlite:///{tmp_path / 'times.db'}"
    storage = create_storage(url)
    storage.migrate()
    flow = Flow(unique("times"), storage=storage).step("first", ok)
    for tracking_id in ("bad-created", "bad-finished", "good"):
        flow.run({}, tracking_id=tracking_id)
    storage.close()
    execute(
        url,
        sa.text("UPDATE fs_flows SET created_at = 'abc' WHERE tracking_id = 'bad-created'"),
        sa.update(F).where(F.c.tracking_id == "bad-finished").values(finished_at=float("inf")),
    )
    listed = cli(url, "flows")
    assert_clean(listed, 0)
    assert "UNREADABLE" in next(row for row in listed.stdout.splitlines() if "bad-created" in row)
    assert "good" in listed.stdout
    as_json = json.loads(cli(url, "flows", "--json").stdout)["flows"]
    assert next(f for f in as_json if f["tracking_id"] == "bad-finished")["finished_at"] is None
    assert_clean(cli(url, "status", "bad-created"), 0)
    not_text = cli(url, "status", "\udcff\udcfe")  # how Python passes on non-UTF-8 argv bytes
    assert_clean(not_text, 2)
    assert "lone surrogate" in not_text.output
    assert_clean(cli(url, "flows", "--limit", "99999999999999999999"), 2)

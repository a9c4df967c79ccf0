"""The operators' commands (flowsmith_worker/cli/ops.py): status, flows, retry, cancel,
prune, stats, workers, queue-limit.

Runs are real: flows enqueued on a real database and run by an in-process
Worker; the commands run through click's CliRunner against the same URL, each
opening (and closing) its own storage as `flowsmith` does. Tests where the
backend matters take ``sql_url`` (sqlite, postgresql, mysql); the rest use SQLite.
"""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from flowsmith_worker import Context, Flow, Worker
from flowsmith_worker.cli import main
from flowsmith_worker.cli.format import (
    format_table,
)
from flowsmith_worker.readable import (
    format_duration,
    format_time,
    parse_duration,
    parse_when,
)
from flowsmith_worker.storage.base import (
    FlowFilter,
    FlowStatus,
    NodeStatus,
    WorkerRecord,
)
from flowsmith_worker.storage.sql.operators import SqlOperators
from tests.conftest import eventually
from tests.integration.conftest import Db
from tests.support.cli import (
    cli,
    cli_json,
    doomed,
    drain,
    flow_of,
    iso_seconds,
    ok,
    row_of,
    run_line,
)

Names = Callable[[str], str]

OPERATOR_COMMANDS = [
    "enqueue",
    "status",
    "flows",
    "retry",
    "cancel",
    "prune",
    "stats",
    "workers",
    "queue-limit",
]


def test_status_of_a_completed_run_exits_0_and_lists_every_step(db: Db, unique: Names) -> None:
    """status of a COMPLETED run exits 0; each step shows status, attempts, times and the
    worker (8 characters in the table, in full in --json), a retried step its last error."""

    def charge(ctx: Context) -> dict[str, Any]:
        if ctx.attempt == 1:
            raise RuntimeError("card network hiccup")
        return {"charged": True}

    flow = Flow(unique("order"), storage=db.storage).step("reserve", ok)
    flow.step("charge", charge, retries=1, backoff=0.01)
    tracking_id = unique("order")
    flow.run(tracking_id=tracking_id)
    worker = drain(db.storage)

    result = cli(db.url, "status", tracking_id)
    assert result.exit_code == 0, result.output
    assert run_line(result.stdout, "Run") == tracking_id
    assert run_line(result.stdout, "Flow") == f"{flow.name} (queue default)"
    assert run_line(result.stdout, "Status") == "COMPLETED"
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ \(\d+s ago\)", run_line(result.stdout, "Created")
    )
    assert re.fullmatch(r".*Z \(\d+s ago\), after [0-9.]+m?s", run_line(result.stdout, "Finished"))
    reserve, charged = row_of(result.stdout, "reserve"), row_of(result.stdout, "charge")
    assert reserve[1:4] == ["reserve", "COMPLETED", "1/1"]
    assert charged[1:4] == ["charge", "COMPLETED", "2/2"]
    assert re.fullmatch(r"\d+s", reserve[4]) and reserve[5] == "ago"
    assert worker.id[:8] in reserve and worker.id[:8] in charged
    assert worker.id not in result.stdout
    assert "RuntimeError: card network hiccup" in result.stdout
    wide = cli(db.url, "status", tracking_id, "--wide")
    assert worker.id in wide.stdout
    started, finished = row_of(wide.stdout, "reserve")[4:6]
    assert started.startswith(str(datetime.now(UTC).year)) and started.endswith("Z")
    assert finished >= started

    data = cli_json(db.url, "status", tracking_id)
    assert data["flow"]["status"] == "COMPLETED"
    assert data["flow"]["tracking_id"] == tracking_id
    assert [s["step_name"] for s in data["steps"]] == ["reserve", "charge"]
    assert [s["attempt"] for s in data["steps"]] == [1, 2]
    assert {s["lease_owner"] for s in data["steps"]} == {worker.id}
    assert all(s["status"] == "COMPLETED" for s in data["steps"])
    assert all(iso_seconds(s["finished_at"]) >= iso_seconds(s["started_at"]) for s in data["steps"])
    assert abs(iso_seconds(data["flow"]["created_at"]) - time.time()) < 60
    assert data["not_reached"] == []


def test_status_of_a_failed_run_exits_1_and_shows_the_traceback_on_request(
    sqlite_db: Db, unique: Names
) -> None:
    """status of a FAILED run exits 1 with the error's last line; --traceback prints the
    step's whole traceback; steps never reached are listed; --json exits 1 too."""
    flow = Flow(unique("order"), storage=sqlite_db.storage)
    flow.step("reserve", ok).step("charge", doomed).step("ship", ok)
    tracking_id = unique("order")
    flow.run(tracking_id=tracking_id)
    drain(sqlite_db.storage)

    plain = cli(sqlite_db.url, "status", tracking_id)
    assert plain.exit_code == 1, plain.output
    assert run_line(plain.stdout, "Status") == "FAILED"
    assert run_line(plain.stdout, "Error") == "ValueError: card declined for order 42"
    assert row_of(plain.stdout, "charge")[1:4] == ["charge", "FAILED", "1/1"]
    assert "ValueError: card declined for order 42" in plain.stdout
    assert "Traceback" not in plain.stdout
    assert "(not reached)" in " ".join(row_of(plain.stdout, "ship"))

    traced = cli(sqlite_db.url, "status", tracking_id, "--traceback")
    assert traced.exit_code == 1
    assert "Traceback (most recent call last)" in traced.stdout
    assert "in doomed" in traced.stdout
    assert 'raise ValueError("card declined for order 42")' in traced.stdout

    data = cli_json(sqlite_db.url, "status", tracking_id, exit_code=1)
    assert data["flow"]["status"] == "FAILED"
    assert "ValueError: card declined" in data["flow"]["error"]
    charge = data["steps"][1]
    assert charge["status"] == "FAILED" and "Traceback" in charge["error"]
    assert data["not_reached"] == ["ship"]


def test_unknown_tracking_id_exits_3_with_a_clear_message(sqlite_db: Db) -> None:
    """status, retry and cancel of a tracking_id no run has exit 3 and say so."""
    for command in ("status", "retry", "cancel"):
        for extra in ((), ("--json",)):
            result = cli(sqlite_db.url, command, "no-such-run", *extra)
            assert result.exit_code == 3, (command, result.output)
            assert "no flow run has tracking_id 'no-such-run'" in result.stderr
            assert result.stdout == ""


# -- flows ------------------------------------------------------------------------------


def test_flows_filters_by_status_flow_since_and_limit(db: Db, unique: Names) -> None:
    """flows lists runs newest first; --status, --flow, --since (ISO datetime, date,
    duration) and --limit narrow it; no match is not an error."""
    alpha = Flow(unique("alpha"), storage=db.storage).step("only", ok)
    beta = Flow(unique("beta"), storage=db.storage).step("only", doomed)
    a1, b1, a2 = unique("a1"), unique("b1"), unique("a2")
    alpha.run(tracking_id=a1)
    time.sleep(0.02)
    beta.run(tracking_id=b1)
    drain(db.storage)
    time.sleep(0.3)
    between = datetime.fromtimestamp(time.time(), UTC).isoformat()
    time.sleep(0.3)
    alpha.run(tracking_id=a2)
    drain(db.storage)

    def ids(*args: str) -> list[str]:
        return [f["tracking_id"] for f in cli_json(db.url, "flows", *args)["flows"]]

    assert ids() == [a2, b1, a1]
    for listed in cli_json(db.url, "flows")["flows"]:  # times in ISO-8601, UTC
        assert iso_seconds(listed["finished_at"]) >= iso_seconds(listed["created_at"])
    assert ids("--status", "FAILED") == [b1]
    assert ids("--status", "completed") == [a2, a1]
    assert ids("--flow", alpha.name) == [a2, a1]
    assert ids("--flow", alpha.name, "--status", "FAILED") == []
    assert ids("--since", between) == [a2]
    assert ids("--since", "1h") == [a2, b1, a1]
    assert ids("--since", "2000-01-01") == [a2, b1, a1]
    assert ids("--since", "2999-01-01") == []
    assert ids("--limit", "1") == [a2]
    assert ids("--limit", "2", "--flow", alpha.name) == [a2, a1]

    table = cli(db.url, "flows", "--status", "FAILED")
    assert table.exit_code == 0
    assert table.stdout.splitlines()[0].split()[:3] == ["TRACKING_ID", "FLOW", "STATUS"]
    assert row_of(table.stdout, b1)[:3] == [b1, beta.name, "FAILED"]
    assert "ValueError: card declined for order 42" in table.stdout
    limited = cli(db.url, "flows", "--limit", "1")
    assert a2 in limited.stdout and a1 not in limited.stdout
    assert "--limit shows more" in limited.stdout
    none = cli(db.url, "flows", "--since", "2999-01-01")
    assert none.exit_code == 0 and "No flow run matches." in none.stdout


# -- retry ------------------------------------------------------------------------------


def test_retry_resumes_only_the_failed_step_and_refuses_a_completed_run(
    sqlite_db: Db, unique: Names
) -> None:
    """retry of a FAILED run re-queues its failed step only (the steps before it do not run
    again); the run then completes; retry of a COMPLETED run exits 1 and says why."""
    calls: Counter[str] = Counter()
    broken = {"payment_api": True}

    def first(ctx: Context) -> dict[str, Any]:
        calls["first"] += 1
        return {"x": 1}

    def second(ctx: Context) -> dict[str, Any]:
        calls["second"] += 1
        if broken["payment_api"]:
            raise RuntimeError("payment API down")
        return {"y": ctx.data["first"]["x"] + 1}

    def third(ctx: Context) -> None:
        calls["third"] += 1

    flow = Flow(unique("pay"), storage=sqlite_db.storage)
    flow.step("first", first).step("second", second).step("third", third)
    tracking_id = unique("pay")
    flow.run(tracking_id=tracking_id)
    drain(sqlite_db.storage)
    assert flow_of(sqlite_db.storage, tracking_id).status == FlowStatus.FAILED
    assert calls == Counter(first=1, second=1)

    broken["payment_api"] = False
    data = cli_json(sqlite_db.url, "retry", tracking_id)
    assert data["requeued_steps"] == ["second"]
    assert data["resumed"] is True and data["status"] == "RUNNING"
    drain(sqlite_db.storage)
    assert calls == Counter(first=1, second=2, third=1)
    assert cli(sqlite_db.url, "status", tracking_id).exit_code == 0

    refused = cli(sqlite_db.url, "retry", tracking_id)
    assert refused.exit_code == 1
    assert "is COMPLETED: only a FAILED run can be retried" in refused.stderr
    assert "Traceback" not in refused.output


def test_retry_does_not_list_the_failed_items_of_a_completed_map(
    sqlite_db: Db, unique: Names
) -> None:
    """Regression (with the resume fix found by the torture model checker): a map that
    completed under allow_failures is done for good, so when a later step failed the
    run, retry lists that step only, not the map's FAILED item it does not run again."""

    def item(ctx: Context, value: int) -> int:
        if value == 1:
            raise ValueError("item 1 fails")
        return value

    flow = Flow(unique("mapped"), storage=sqlite_db.storage)
    flow.map("each", item, items=lambda ctx: [0, 1], allow_failures=True).step("after", doomed)
    tracking_id = unique("mapped")
    flow.run(tracking_id=tracking_id)
    drain(sqlite_db.storage)
    assert flow_of(sqlite_db.storage, tracking_id).status == FlowStatus.FAILED
    data = cli_json(sqlite_db.url, "retry", tracking_id)
    assert data["requeued_steps"] == ["after"]


def test_retry_prints_what_it_queued(sqlite_db: Db, unique: Names) -> None:
    """retry without --json names the step(s) it queued again."""
    flow = Flow(unique("once"), storage=sqlite_db.storage).step("charge", doomed)
    tracking_id = unique("once")
    flow.run(tracking_id=tracking_id)
    drain(sqlite_db.storage)
    result = cli(sqlite_db.url, "retry", tracking_id)
    assert result.exit_code == 0, result.output
    assert f"Retrying flow run {tracking_id!r}" in result.stdout and "'charge'" in result.stdout
    assert flow_of(sqlite_db.storage, tracking_id).status == FlowStatus.RUNNING


def test_retry_lists_the_siblings_the_failure_stopped_and_refuses_in_the_storages_words(
    sqlite_db: Db, unique: Names
) -> None:
    """A parallel group where `charge` fails and stops `ship` before it ran: retry
    re-queues both and lists both; the run then completes. Retrying it again (now
    COMPLETED) or cancelling a FAILED run is refused with exit 1 in the storage's words.
    """
    broken = {"charge": True}

    def charge(ctx: Context) -> str:
        if broken["charge"]:
            raise ValueError("card declined")
        return "charged"

    flow = Flow(unique("order"), storage=sqlite_db.storage)
    with flow.parallel():
        flow.step("charge", charge).step("ship", lambda ctx: "shipped")
    tracking_id = unique("order")
    flow.run(tracking_id=tracking_id)
    [charge_node] = sqlite_db.storage.claim_nodes(
        worker_id="w", limit=1, lease_seconds=30, queues=["default"]
    )
    assert charge_node.step_name == "charge"
    sqlite_db.storage.fail_node(lease=charge_node.lease, error="card declined", retry_delay=None)

    refused = cli(sqlite_db.url, "cancel", tracking_id)
    assert refused.exit_code == 1
    assert "is FAILED: only a pending or running run can be cancelled" in refused.stderr

    broken["charge"] = False
    data = cli_json(sqlite_db.url, "retry", tracking_id)
    assert sorted(data["requeued_steps"]) == ["charge", "ship"]
    drain(sqlite_db.storage)
    assert flow_of(sqlite_db.storage, tracking_id).status == FlowStatus.COMPLETED

    again = cli(sqlite_db.url, "retry", tracking_id)
    assert again.exit_code == 1 and "Traceback" not in again.output
    assert "is COMPLETED: only a FAILED run can be retried" in again.stderr


# -- cancel -----------------------------------------------------------------------------


def test_cancel_a_pending_run_its_steps_never_start(db: Db, unique: Names) -> None:
    """cancel of a PENDING run: a worker started afterwards runs none of its steps, the run
    is CANCELLED (status exits 1); cancelling again succeeds; a COMPLETED run is refused."""
    calls: Counter[str] = Counter()

    def step(ctx: Context) -> None:
        calls[ctx.step or "?"] += 1

    flow = Flow(unique("mail"), storage=db.storage).step("a", step).step("b", step)
    tracking_id = unique("mail")
    flow.run(tracking_id=tracking_id)

    result = cli(db.url, "cancel", tracking_id)
    assert result.exit_code == 0, result.output
    assert f"Cancelled flow run {tracking_id!r}" in result.stdout
    assert "Never to start: a." in result.stdout

    worker = Worker(storage=db.storage, poll_interval=0.05)
    for _ in range(3):
        assert worker.run_once() == 0
    worker.shutdown()
    drain(db.storage)
    assert calls == Counter()
    record = db.storage.get_flow(tracking_id=tracking_id)
    assert record is not None and record.status == FlowStatus.CANCELLED
    assert [n.status for n in db.storage.list_nodes(flow_id=record.id)] == [NodeStatus.CANCELLED]

    status = cli(db.url, "status", tracking_id)
    assert status.exit_code == 1 and run_line(status.stdout, "Status") == "CANCELLED"
    again = cli_json(db.url, "cancel", tracking_id)
    assert again["already_cancelled"] is True and again["flow"]["status"] == "CANCELLED"

    done = unique("done")
    Flow(unique("quick"), storage=db.storage).step("only", ok).run(tracking_id=done)
    drain(db.storage)
    refused = cli(db.url, "cancel", done)
    assert refused.exit_code == 1
    assert "is COMPLETED: only a pending or running run can be cancelled" in refused.stderr


def test_cancel_a_running_step_finishes_and_the_run_goes_no_further(db: Db, unique: Names) -> None:
    """cancel while a step runs: the step is not interrupted and completes, but the next
    step never runs and the run stays CANCELLED."""
    started, release = threading.Event(), threading.Event()
    calls: Counter[str] = Counter()

    def slow(ctx: Context) -> dict[str, Any]:
        calls["slow"] += 1
        started.set()
        assert release.wait(30)
        return {"slow": "done"}

    def after(ctx: Context) -> None:
        calls["after"] += 1

    flow = Flow(unique("long"), storage=db.storage).step("slow", slow).step("after", after)
    tracking_id = unique("long")
    flow.run(tracking_id=tracking_id)
    worker = Worker(storage=db.storage, poll_interval=0.05)
    failures: list[BaseException] = []

    def run() -> None:
        try:
            worker.run_until_idle(timeout=40)
        except BaseException as exc:  # reported by the main thread
            failures.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        assert started.wait(20)
        data = cli_json(db.url, "cancel", tracking_id)
        assert data["flow"]["status"] == "CANCELLED"
        assert data["running_steps"] == ["slow"] and data["cancelled_steps"] == []
    finally:
        release.set()
        thread.join(40)
        worker.shutdown()
    assert not thread.is_alive() and failures == []

    assert calls == Counter(slow=1)
    record = db.storage.get_flow(tracking_id=tracking_id)
    assert record is not None and record.status == FlowStatus.CANCELLED
    nodes = db.storage.list_nodes(flow_id=record.id)
    assert [(n.step_name, n.status) for n in nodes] == [("slow", NodeStatus.COMPLETED)]
    status = cli(db.url, "status", tracking_id)
    assert status.exit_code == 1
    assert row_of(status.stdout, "slow")[2] == "COMPLETED"
    assert "(not reached)" in " ".join(row_of(status.stdout, "after"))


def test_cancel_while_running_says_which_step_will_finish(sqlite_db: Db, unique: Names) -> None:
    """cancel without --json names the running step (and its worker, shortened)."""
    flow = Flow(unique("held"), storage=sqlite_db.storage).step("only", ok)
    tracking_id = unique("held")
    flow.run(tracking_id=tracking_id)
    worker_id = "f00dfeed" + "0" * 24
    claimed = sqlite_db.storage.claim_nodes(
        worker_id=worker_id, limit=1, lease_seconds=60, queues=["default"]
    )
    assert len(claimed) == 1
    result = cli(sqlite_db.url, "cancel", tracking_id)
    assert result.exit_code == 0, result.output
    assert "Still running, will finish, and the run goes no further: only (worker f00dfeed)" in (
        result.stdout
    )


# -- prune ------------------------------------------------------------------------------


def test_prune_deletes_old_finished_runs_and_their_nodes_in_batches(
    db: Db, unique: Names, monkeypatch: pytest.MonkeyPatch
) -> None:
    """prune --older-than deletes finished runs (COMPLETED, FAILED) older than that with their
    nodes, batch by batch; pending, running and recently finished runs stay."""
    batches: list[int] = []
    original = SqlOperators._prune_batch

    def counting(self: SqlOperators, *args: Any) -> int:
        deleted = original(self, *args)
        batches.append(deleted)
        return deleted

    monkeypatch.setattr(SqlOperators, "_prune_batch", counting)

    good = Flow(unique("good"), storage=db.storage).step("a", ok).step("b", ok)
    bad = Flow(unique("bad"), storage=db.storage).step("only", doomed)
    parked = Flow(unique("parked"), storage=db.storage, queue="parked").step("only", ok)
    old = [unique("old"), unique("old"), unique("old")]
    good.run(tracking_id=old[0])
    good.run(tracking_id=old[1])
    bad.run(tracking_id=old[2])
    drain(db.storage)
    old_ids = [flow_of(db.storage, t).id for t in old]
    assert sum(len(db.storage.list_nodes(flow_id=i)) for i in old_ids) == 5
    pending, running = unique("pending"), unique("running")
    parked.run(tracking_id=pending)
    parked.run(tracking_id=running)
    assert db.storage.claim_nodes(worker_id="w1", limit=1, lease_seconds=60, queues=["parked"])
    time.sleep(1.3)
    recent = unique("recent")
    good.run(tracking_id=recent)
    drain(db.storage)

    data = cli_json(db.url, "prune", "--older-than", "1s", "--batch-size", "2")
    assert data == {"pruned": 3, "older_than_seconds": 1.0, "dry_run": False}
    assert batches == [2, 1]
    for tracking_id, flow_id in zip(old, old_ids, strict=True):
        assert db.storage.get_flow(tracking_id=tracking_id) is None
        assert db.storage.list_nodes(flow_id=flow_id) == []
    statuses = {}
    for tracking_id in (pending, running, recent):
        record = db.storage.get_flow(tracking_id=tracking_id)
        assert record is not None and db.storage.list_nodes(flow_id=record.id)
        statuses[tracking_id] = record.status
    assert statuses[recent] == FlowStatus.COMPLETED
    assert {statuses[pending], statuses[running]} == {FlowStatus.PENDING, FlowStatus.RUNNING}

    again = cli(db.url, "prune", "--older-than", "1h")
    assert again.exit_code == 0, again.output
    assert "Pruned 0 finished flow run(s)" in again.stdout


def test_prune_dry_run_counts_what_prune_deletes_and_deletes_nothing(db: Db, unique: Names) -> None:
    """prune --dry-run counts the runs that would go (an old run's finished subflow too;
    a pending run and recently finished ones not) and deletes nothing; prune then
    deletes exactly that many."""
    child = Flow(unique("child"), storage=db.storage).step("c", ok)
    parent = Flow(unique("parent"), storage=db.storage).step("p", ok).subflow("sub", child)
    bad = Flow(unique("bad"), storage=db.storage).step("only", doomed)
    parked = Flow(unique("parked"), storage=db.storage, queue="parked").step("only", ok)
    parent.run(tracking_id=unique("old"))
    bad.run(tracking_id=unique("old"))
    parked.run(tracking_id=unique("pending"))
    drain(db.storage)
    # The recent runs must stay younger than --older-than through five CLI calls,
    # each a new process: a few seconds on a loaded CI machine, not one.
    time.sleep(5.3)
    parent.run(tracking_id=unique("recent"))
    drain(db.storage)

    def stored() -> int:
        return len(db.storage.list_flows(where=FlowFilter(limit=100)))

    assert stored() == 6  # old: parent, its child, bad; pending; recent: parent, its child
    data = cli_json(db.url, "prune", "--older-than", "5s", "--dry-run")
    assert data == {"would_prune": 3, "older_than_seconds": 5.0, "dry_run": True}
    said = cli(db.url, "prune", "--older-than", "5s", "--dry-run")
    assert said.exit_code == 0, said.output
    assert "Would prune 3 finished flow run(s)" in said.stdout
    assert "Nothing was deleted (--dry-run)" in said.stdout
    assert stored() == 6
    assert cli_json(db.url, "prune", "--older-than", "5s")["pruned"] == 3
    assert stored() == 3
    assert cli_json(db.url, "prune", "--older-than", "5s", "--dry-run")["would_prune"] == 0


# -- stats, queue-limit, workers ---------------------------------------------------------------


def test_stats_counts_by_status_and_queue_backlog_age_in_flight_and_limits(
    db: Db, unique: Names
) -> None:
    """stats shows runs by status, steps by queue and status with the queue limits set by
    queue-limit, how long the oldest runnable step has waited, and in-flight by worker."""
    good = Flow(unique("good"), storage=db.storage).step("only", ok)
    bad = Flow(unique("bad"), storage=db.storage).step("only", doomed)
    mail = Flow(unique("mail"), storage=db.storage, queue="emails").step("send", ok)
    good.run(tracking_id=unique("g"))
    good.run(tracking_id=unique("g"))
    bad.run(tracking_id=unique("b"))
    drain(db.storage)
    mail.run(tracking_id=unique("m"))
    mail.run(tracking_id=unique("m"))
    worker_id = "cafebabe" + "1" * 24
    assert db.storage.claim_nodes(worker_id=worker_id, limit=1, lease_seconds=60, queues=["emails"])
    time.sleep(0.05)

    limited = cli(db.url, "queue-limit", "emails", "3")
    assert limited.exit_code == 0, limited.output
    assert "at most 3 step(s) running at once" in limited.stdout

    data = cli_json(db.url, "stats")
    assert data["flows_by_status"] == {"COMPLETED": 2, "FAILED": 1, "PENDING": 1, "RUNNING": 1}
    assert data["nodes_by_queue"] == {
        "default": {"COMPLETED": 2, "FAILED": 1},
        "emails": {"PENDING": 1, "RUNNING": 1},
    }
    assert data["in_flight_by_worker"] == {worker_id: 1}
    assert data["queue_limits"] == {"emails": 3}
    assert isinstance(data["oldest_runnable_age"], float) and data["oldest_runnable_age"] > 0
    assert data["attempts"] == 4

    table = cli(db.url, "stats")
    assert table.exit_code == 0, table.output
    out = table.stdout
    assert row_of(out, "COMPLETED")[:2] == ["COMPLETED", "2"]
    assert row_of(out, "FAILED")[:2] == ["FAILED", "1"]
    assert row_of(out, "QUEUE") == ["QUEUE", "PENDING", "RUNNING", "COMPLETED", "FAILED", "LIMIT"]
    assert row_of(out, "emails") == ["emails", "1", "1", "0", "0", "3"]
    assert row_of(out, "default") == ["default", "0", "0", "2", "1", "-"]
    assert "Oldest runnable step: waiting for " in out
    assert row_of(out, "cafebabe") == ["cafebabe", "1"]
    assert worker_id not in out

    removed = cli(db.url, "queue-limit", "emails", "none")
    assert removed.exit_code == 0 and "no limit" in removed.stdout
    assert cli_json(db.url, "stats")["queue_limits"] == {}
    assert cli_json(db.url, "queue-limit", "emails", "0") == {"queue": "emails", "max_running": 0}


def test_stats_of_an_empty_database(sqlite_db: Db) -> None:
    """stats on a fresh database prints zero counts and no backlog, not an error."""
    result = cli(sqlite_db.url, "stats")
    assert result.exit_code == 0, result.output
    assert "Oldest runnable step: none waiting" in result.stdout
    assert "(no step running)" in result.stdout
    assert cli_json(sqlite_db.url, "stats")["oldest_runnable_age"] is None


def test_workers_lists_registered_workers(sqlite_db: Db) -> None:
    """workers shows each registered worker's short id, host, pid, queues, in-flight and the
    database-clock start and heartbeat; --json has the full id."""
    assert "No worker is registered." in cli(sqlite_db.url, "workers").stdout
    assert cli_json(sqlite_db.url, "workers") == {"workers": []}
    worker_id = "0123abcd" + "9" * 24
    sqlite_db.storage.register_worker(
        worker=WorkerRecord(
            id=worker_id,
            host="build-host-7",
            pid=4242,
            version="9.9.9",
            queues=("default", "emails"),
            concurrency=8,
            lease_seconds=30.0,
            in_flight=3,
            started_at=0.0,
            heartbeat_at=0.0,
        )
    )
    result = cli(sqlite_db.url, "workers")
    assert result.exit_code == 0, result.output
    cells = row_of(result.stdout, "0123abcd")
    assert cells[:6] == ["0123abcd", "build-host-7", "4242", "9.9.9", "default,emails", "3/8"]
    assert cells[7] == cells[9] == "ago"  # started and heartbeat: "0s ago"
    assert worker_id not in result.stdout
    wide = cli(sqlite_db.url, "workers", "--wide").stdout
    cells = row_of(wide, worker_id)
    assert cells[6].startswith(str(datetime.now(UTC).year)) and cells[7].endswith("Z")

    (listed,) = cli_json(sqlite_db.url, "workers")["workers"]
    assert listed["id"] == worker_id and listed["host"] == "build-host-7"
    assert listed["pid"] == 4242 and listed["queues"] == ["default", "emails"]
    assert abs(iso_seconds(listed["heartbeat_at"]) - time.time()) < 60


def test_workers_lists_a_running_worker(sqlite_db: Db) -> None:
    """A Worker running in a thread registers itself: workers shows its host and pid."""
    worker = Worker(storage=sqlite_db.storage, poll_interval=0.05, shutdown_timeout=1)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        # Until its loop turns: the worker thread logs worker.started to stdout just
        # before, and the CLI runner below captures stdout while it runs.
        eventually(lambda: worker.health._last_tick is not None)
        (listed,) = cli_json(sqlite_db.url, "workers")["workers"]
        assert listed["id"] == worker.id
        assert (listed["host"], listed["pid"]) == (worker.host, worker.pid)
    finally:
        worker.stop()
        thread.join(10)
    assert cli_json(sqlite_db.url, "workers") == {"workers": []}


# -- help, usage, safety ----------------------------------------------------------------


def test_every_command_has_help_with_examples_and_exit_codes() -> None:
    """--help of the group and of every operator command shows examples and the exit codes."""
    runner = CliRunner()
    group = runner.invoke(main, ["--help"])
    assert group.exit_code == 0
    assert "Exit codes" in group.output and "3  no flow run has that tracking_id" in group.output
    for command in OPERATOR_COMMANDS:
        assert command in group.output
        result = runner.invoke(main, [command, "--help"])
        assert result.exit_code == 0, (command, result.output)
        assert "Example" in result.output, command
        assert "Exit codes" in result.output, command
        assert "--url" in result.output and "--json" in result.output, command
        assert "--batch-size" not in result.output
    assert "3  no flow run has TRACKING_ID" in runner.invoke(main, ["status", "--help"]).output


@pytest.mark.parametrize(
    "args",
    [
        ["flows", "--since", "yesterday"],
        ["flows", "--since", "7"],
        ["flows", "--status", "DONE"],
        ["flows", "--limit", "0"],
        ["prune"],
        ["prune", "--older-than", "0s"],
        ["prune", "--older-than", "7"],
        ["prune", "--older-than", "7d", "--batch-size", "0"],
        ["queue-limit", "emails", "lots"],
        ["queue-limit", "emails", "--", "-1"],
        ["queue-limit", "emails"],
        ["status"],
    ],
)
def test_usage_errors_exit_2(sqlite_db: Db, args: list[str]) -> None:
    """Bad or missing arguments are usage errors: exit 2 with click's message, no traceback."""
    result = CliRunner().invoke(main, [args[0], "--url", sqlite_db.url, *args[1:]])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "Error" in result.output


def test_errors_never_show_the_database_password(tmp_path: Path) -> None:
    """An unreachable database is a one-line error (exit 1) with the password masked; an
    unmigrated one says to run `flowsmith migrate`."""
    for url in (
        "postgresql://fs:hunter2-secret@127.0.0.1:1/nowhere",
        "mysql://fs:hunter2-secret@127.0.0.1:1/nowhere",
    ):
        for args in (["status", "x"], ["flows"], ["stats"], ["prune", "--older-than", "1d"]):
            result = cli(url, *args)
            assert result.exit_code == 1, result.output
            assert "hunter2-secret" not in result.output
            assert "***" in result.stderr and "unavailable" in result.stderr
    fresh = cli(f"sqlite:///{tmp_path / 'empty.db'}", "flows")
    assert fresh.exit_code == 1 and "flowsmith migrate" in fresh.stderr


# -- formatting ---------------------------------------------------------------------------


def test_formatting_and_parsing_helpers() -> None:
    """Durations print as 350ms, 1.2s, 3m05s, 2h01m; times as UTC ISO-8601 to the second;
    --since/--older-than parse units, combinations and ISO dates; tables align."""
    assert format_duration(None) == "-"
    assert format_duration(0.35) == "350ms"
    assert format_duration(1.23) == "1.2s"
    assert format_duration(59.96) == "1m00s"
    assert format_duration(185) == "3m05s"
    assert format_duration(7260) == "2h01m"
    assert format_duration(3 * 86400 + 4 * 3600) == "3d04h"
    assert format_time(0) == "1970-01-01T00:00:00Z"
    assert format_time(1714564803.9) == "2024-05-01T12:00:03Z"
    assert format_time(None) == "-"

    assert parse_duration("45s") == 45
    assert parse_duration("30m") == 1800
    assert parse_duration("2h") == 7200
    assert parse_duration("7d") == 7 * 86400
    assert parse_duration("1h30m") == 5400
    assert parse_duration("7") is None and parse_duration("soon") is None
    assert parse_when("2h") is None  # durations are Since's, resolved by the database
    noon = datetime(2024, 5, 1, 12, tzinfo=UTC).timestamp()
    assert parse_when("2024-05-01T12:00:00Z") == noon
    assert parse_when("2024-05-01T14:00:00+02:00") == noon
    assert parse_when("2024-05-01T12:00:00") == noon
    assert parse_when("2024-05-01") == noon - 12 * 3600
    assert parse_when("next week") is None

    table = format_table(("NAME", "N"), [["a", 1], ["longer", 22]])
    assert table.splitlines() == ["NAME     N", "a        1", "longer  22"]

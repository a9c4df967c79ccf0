"""`flowsmith send-event`, `flowsmith status` of parked runs, and send_event inside the
caller's transaction (connection=), on each SQL backend.

Runs are real: flows enqueued on a real database and run by an in-process Worker;
the commands run through click's CliRunner against the same URL, each opening its
own storage as `flowsmith` does.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa

from flowsmith_worker import Flow, FlowStatus, Worker, send_event, send_event_async
from flowsmith_worker.config import parse_database_url
from flowsmith_worker.records import Woken
from flowsmith_worker.storage.base import Storage
from tests.integration.conftest import Db
from tests.support.cli import cli, cli_json
from tests.support.parking import POLL, drive, parked
from tests.support.runs import status_of

Names = Callable[[str], str]


def waiting_run(storage: Storage, unique: Names, **wait: Any) -> tuple[Flow, str, Worker]:
    """A run parked at its wait_for("approval") step, and the worker that parked it."""
    flow = (
        Flow(unique("f"), storage=storage)
        .wait_for("approval", **wait)
        .step("decide", lambda ctx: ctx.data["approval"])
    )
    tid = unique("t")
    flow.run({}, tracking_id=tid)
    worker = Worker(storage=storage, poll_interval=POLL)
    drive(worker, lambda: parked(storage, tid, "approval"))
    return flow, tid, worker


def test_send_event_delivers_the_data_and_the_run_goes_on(db: Db, unique: Names) -> None:
    """`flowsmith send-event ID NAME --data JSON` wakes the waiting run; its data is the
    wait step's output. The same --idempotency-key again exits 0 and sends nothing."""
    _flow, tid, worker = waiting_run(db.storage, unique)
    sent = cli_json(
        db.url, "send-event", tid, "approval", "--data", '{"ok": true}', "--idempotency-key", "k1"
    )
    assert sent == {"tracking_id": tid, "name": "approval", "delivered": True}
    again = cli(db.url, "send-event", tid, "approval", "--data", "1", "--idempotency-key", "k1")
    assert again.exit_code == 0 and "not sent again" in again.stdout
    drive(worker, lambda: status_of(db.storage, tid) == FlowStatus.COMPLETED)
    shown = cli_json(db.url, "status", tid)
    outputs = {s["step_name"]: s["output"] for s in shown["steps"]}
    assert outputs == {"approval": {"ok": True}, "decide": {"ok": True}}


def test_send_event_refusals_are_one_line_with_their_exit_code(
    sqlite_db: Db, unique: Names
) -> None:
    """Unknown run: exit 3; a name the run does not wait for, or a finished run: exit 1;
    --data that is not JSON: exit 2. One line on stderr, never a traceback."""
    _flow, tid, _worker = waiting_run(sqlite_db.storage, unique)
    unknown = cli(sqlite_db.url, "send-event", "nobody", "approval")
    assert unknown.exit_code == 3 and "no flow run has tracking_id 'nobody'" in unknown.stderr
    wrong = cli(sqlite_db.url, "send-event", tid, "aproval")
    assert wrong.exit_code == 1 and "its waits: 'approval'" in wrong.stderr
    bad = cli(sqlite_db.url, "send-event", tid, "approval", "--data", "{nope")
    assert bad.exit_code == 2 and "not JSON" in bad.output
    sqlite_db.storage.cancel_flow(tracking_id=tid)
    over = cli(sqlite_db.url, "send-event", tid, "approval")
    assert over.exit_code == 1 and "is CANCELLED" in over.stderr
    for result in (unknown, wrong, bad, over):
        assert "Traceback" not in result.output


def test_status_shows_what_a_parked_run_waits_for(sqlite_db: Db, unique: Names) -> None:
    """A wait shows as AWAITING_EVENT (no due time without a timeout), a sleep as SLEEPING
    with its wake time as due; their parked attempts are PARKED in the trace."""
    _flow, waiting, _worker = waiting_run(sqlite_db.storage, unique)
    shown = cli(sqlite_db.url, "status", waiting)
    assert shown.exit_code == 0, shown.output
    [row] = [line for line in shown.stdout.splitlines() if " approval " in line]
    assert "AWAITING_EVENT" in row and "in " not in row.split("AWAITING_EVENT")[1]

    sleeper = Flow(unique("s"), storage=sqlite_db.storage).sleep("nap", seconds=3600)
    tid = unique("t")
    sleeper.run({}, tracking_id=tid)
    drive(
        Worker(storage=sqlite_db.storage, poll_interval=POLL),
        lambda: parked(sqlite_db.storage, tid, "nap"),
    )
    shown = cli(sqlite_db.url, "status", tid)
    [row] = [line for line in shown.stdout.splitlines() if " nap " in line]
    assert "SLEEPING" in row and ("in 59m" in row or "in 1h" in row), row
    steps = cli_json(sqlite_db.url, "status", tid)["steps"]
    assert steps[0]["wake_at"] is not None
    assert [a["outcome"] for a in steps[0]["attempts"]] == ["PARKED"]


@pytest.mark.parametrize("outcome", ["commit", "rollback"])
def test_send_event_commits_or_rolls_back_with_the_callers_transaction(
    db: Db, outcome: str, unique: Names
) -> None:
    """send_event(connection=conn) stores the event in the caller's transaction: after a
    rollback the run still waits (and the event can be sent again), after a commit the
    run is woken and completes with the payload."""
    _flow, tid, worker = waiting_run(db.storage, unique)
    app = sa.create_engine(parse_database_url(db.url))
    with app.connect() as conn:
        sent = send_event(tid, "approval", "from the request", connection=conn, storage=db.storage)
        assert sent.delivered
        conn.commit() if outcome == "commit" else conn.rollback()
    app.dispose()
    if outcome == "rollback":
        assert parked(db.storage, tid, "approval")
        assert send_event(tid, "approval", "sent again", storage=db.storage).delivered
    drive(worker, lambda: status_of(db.storage, tid) == FlowStatus.COMPLETED)
    record = db.storage.get_flow(tracking_id=tid)
    assert record is not None and record.output is not None
    expected = "from the request" if outcome == "commit" else "sent again"
    assert record.output["decide"] == expected
    assert json.dumps(record.output)  # the payload is stored JSON


def test_send_event_async_commits_or_rolls_back_with_a_sync_connection(
    sqlite_db: Db, unique: Names
) -> None:
    """send_event_async(connection=<SQLAlchemy Connection>) sends inside the caller's
    transaction: rolled back, the run still waits; committed, the event is its output."""
    _flow, tid, worker = waiting_run(sqlite_db.storage, unique)
    app = sa.create_engine(parse_database_url(sqlite_db.url))

    async def send(payload: str, commit: bool) -> None:
        with app.connect() as conn, conn.begin() as transaction:
            await send_event_async(
                tid, "approval", payload, connection=conn, storage=sqlite_db.storage
            )
            if not commit:
                transaction.rollback()

    asyncio.run(send("dropped", commit=False))
    assert parked(sqlite_db.storage, tid, "approval")
    asyncio.run(send("kept", commit=True))
    app.dispose()
    drive(worker, lambda: status_of(sqlite_db.storage, tid) == FlowStatus.COMPLETED)
    record = sqlite_db.storage.get_flow(tracking_id=tid)
    assert record is not None and record.output is not None
    assert record.output["decide"] == "kept"


def test_a_wait_parking_while_its_event_is_being_sent_takes_it(db: Db, unique: Names) -> None:
    """The race send_event and park_node settle with the run's lock: an event whose
    transaction is still open when the claimed wait parks is seen by the park once it
    commits. (Without the lock the park would read no event, park for ever, and the
    send, finding the node still RUNNING, would wake nothing.)"""
    flow = Flow(unique("f"), storage=db.storage).wait_for("approval")
    tid = unique("t")
    flow.run({}, tracking_id=tid)
    [claimed] = db.storage.claim_nodes(
        worker_id="w1", limit=1, lease_seconds=60, queues=["default"]
    )
    answers: list[object] = []

    def park() -> None:
        answers.append(
            db.storage.park_node(lease=claimed.lease, event="approval", seconds=None, until=None)
        )

    app = sa.create_engine(parse_database_url(db.url))
    parker = threading.Thread(target=park)
    with app.connect() as conn:
        send_event(tid, "approval", "raced", connection=conn, storage=db.storage)
        parker.start()
        time.sleep(0.3)  # the park's chance to go first, were it not held back
        conn.commit()
    parker.join(30)
    app.dispose()
    assert answers == [Woken(by_event=True, event_payload='"raced"')]

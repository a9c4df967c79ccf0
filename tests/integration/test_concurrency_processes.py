"""Concurrency keys across real `flowsmith worker` processes, on each SQL backend.

Three worker processes run the runs of two keys of one flow; each step journals
its start and end to a file (one O_APPEND write per line, as tests/support/crash.py
does), and the journal proves what the database promised: never more runs of a
key in flight than its limit, a limit of 1 runs them in the order they were
enqueued, and a run that fails for good, is cancelled while it waits, or whose
worker is SIGKILLed mid-step (the step rescued on another worker) still lets the
next run of its key go. `flowsmith status` shows a waiting run as waiting for its key.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from flowsmith_worker import Flow, FlowStatus, create_storage
from flowsmith_worker.config import parse_database_url
from flowsmith_worker.storage.base import NodeStatus, Storage
from tests.conftest import database_url, eventually
from tests.support.cli import cli, cli_json, row_of, run_line
from tests.support.crash import read_events
from tests.worker_process import WorkerProcess

WORKERS = 3
PAIR_LIMIT = 2  # runs of key "pair" in flight at once
PAIR_RUNS = 8
SOLO_RUNS = 6  # runs of key "solo", one at a time
FLOWS_MODULE = """
import json
import os
import time

from flowsmith_worker import Flow

_fd = os.open(os.environ["FS_JOURNAL"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)


def _journal(ctx, event):
    line = {"tid": ctx.tracking_id, "key": ctx.data["key"], "step": ctx.step,
            "event": event, "pid": os.getpid(), "t": time.time()}
    os.write(_fd, (json.dumps(line) + "\\n").encode())


def work(ctx):
    _journal(ctx, "start")
    if ctx.data.get("fail"):
        _journal(ctx, "end")
        raise RuntimeError("fails for good")
    marker = os.environ["FS_HANG_MARKER"]
    if ctx.data.get("hang") and not os.path.exists(marker):
        open(marker, "w").close()
        time.sleep(120)  # until the test SIGKILLs this worker
    time.sleep(0.1)
    _journal(ctx, "end")


# The limits of the runs' keys are set by their enqueues (in the test): these
# definitions only say what the steps do.
for name in (os.environ["FS_SOLO"], os.environ["FS_PAIR"]):
    Flow(name, concurrency_key=lambda ctx: ctx.data["key"], max_concurrent=1).step(
        "one", work
    ).step("two", work)
"""


@pytest.fixture
def workers() -> Iterator[Callable[..., WorkerProcess]]:
    started: list[WorkerProcess] = []

    def start(*args: object) -> WorkerProcess:
        started.append(WorkerProcess(*args, module="keyflows"))  # type: ignore[arg-type]
        return started[-1]

    yield start
    for worker in started:
        worker.cleanup()


def _flow(storage: Storage, name: str, limit: int) -> Flow:
    """The flow as the test enqueues it (its steps run in the workers only)."""
    return (
        Flow(
            name, storage=storage, concurrency_key=lambda ctx: ctx.data["key"], max_concurrent=limit
        )
        .step("one", _never)
        .step("two", _never)
    )


def test_limits_hold_across_worker_processes_through_failure_cancel_and_sigkill(
    sql_url: str,
    tmp_path: Path,
    unique: Callable[[str], str],
    workers: Callable[..., WorkerProcess],
) -> None:
    """Flow A, key "solo" (limit 1): 6 runs, one failing for good, one cancelled while it waits,
    one whose worker is SIGKILLed mid-step; flow B, key "pair" (limit 2): 8 runs. Three
    workers of 4 slots each. Every run ends (none stuck); never two solo runs, nor
    three pair runs, between their first start and last end at once; the solo runs
    that ran started in the order they were enqueued."""
    storage = create_storage(sql_url)
    storage.migrate()
    solo_flow = _flow(storage, unique("solo"), 1)
    pair_flow = _flow(storage, unique("pair"), PAIR_LIMIT)
    solo = []
    for i in range(SOLO_RUNS):
        data: dict[str, Any] = {"key": "solo", "fail": i == 1, "hang": i == 3}
        solo.append(solo_flow.run(data, tracking_id=unique(f"solo{i}")).tracking_id)
    cancelled = solo[4]
    storage.cancel_flow(tracking_id=cancelled)
    pair = [
        pair_flow.run({"key": "pair"}, tracking_id=unique(f"pair{i}")).tracking_id
        for i in range(PAIR_RUNS)
    ]

    workdir = tmp_path / "app"
    workdir.mkdir()
    (workdir / "keyflows.py").write_text(FLOWS_MODULE)
    journal = tmp_path / "journal.jsonl"
    journal.touch()
    env = dict(
        os.environ,
        FS_SOLO=solo_flow.name,
        FS_PAIR=pair_flow.name,
        FS_JOURNAL=str(journal),
        FS_HANG_MARKER=str(tmp_path / "hung"),
    )
    args = ("--concurrency", "4", "--lease", "2", "--poll-interval", "0.1")
    running = [workers(workdir, sql_url, env, *args) for _ in range(WORKERS)]
    for worker in running:
        worker.wait_started()

    hung = eventually(lambda: _started(journal, solo[3]), timeout=60, interval=0.05)
    victim = next(w for w in running if w.pid == hung["pid"])
    victim.signal(signal.SIGKILL)
    victim.wait(10)

    everyone = solo + pair
    eventually(lambda: _all_ended(storage, everyone), timeout=120, interval=0.1)
    statuses = {tid: _record(storage, tid).status for tid in everyone}
    assert statuses[solo[1]] == FlowStatus.FAILED
    assert statuses[cancelled] == FlowStatus.CANCELLED
    assert all(
        statuses[t] == FlowStatus.COMPLETED for t in everyone if t not in (solo[1], cancelled)
    )

    spans = _spans(read_events(journal))
    assert cancelled not in spans, "a run cancelled while it waited ran"
    assert _most_at_once([spans[t] for t in solo if t in spans]) == 1
    assert _most_at_once([spans[t] for t in pair]) == PAIR_LIMIT  # used, never passed
    ran = [t for t in solo if t in spans]
    assert sorted(ran, key=lambda t: spans[t][0]) == ran
    storage.close()


def test_status_shows_a_waiting_run_and_the_key_it_waits_for(
    sql_url: str, unique: Callable[[str], str]
) -> None:
    """Limit 1: the second run of key "acme" shows a Key line saying it is WAITING,
    its step BLOCKED, and waiting_for_key "acme" in --json; the first is in flight."""
    storage = create_storage(sql_url)
    storage.migrate()
    flow = _flow(storage, unique("shown"), 1)
    first = flow.run({"key": "acme"}, tracking_id=unique("first")).tracking_id
    second = flow.run({"key": "acme"}, tracking_id=unique("second")).tracking_id

    shown = cli(sql_url, "status", second)
    assert shown.exit_code == 0, shown.output
    assert run_line(shown.output, "Key").startswith("'acme': WAITING for a place")
    assert row_of(shown.output, "one")[2] == NodeStatus.BLOCKED
    assert cli_json(sql_url, "status", second)["waiting_for_key"] == "acme"

    assert run_line(cli(sql_url, "status", first).output, "Key") == "'acme': in flight"
    assert cli_json(sql_url, "status", first)["waiting_for_key"] is None
    storage.close()


def test_a_callers_repeatable_read_snapshot_cannot_hide_a_run_in_flight(
    request: pytest.FixtureRequest, tmp_path: Path, unique: Callable[[str], str]
) -> None:
    """MariaDB, connection= at REPEATABLE READ (MySQL's default) whose snapshot was taken
    before another connection enqueued a run of the key (limit 1): the run enqueued in
    the caller's transaction waits BLOCKED. Counted from the snapshot, it would have
    found none in flight and made two."""
    url = database_url(request, "mysql", tmp_path)
    storage = create_storage(url)
    storage.migrate()
    flow = _flow(storage, unique("rr"), 1)
    app = sa.create_engine(parse_database_url(url), isolation_level="REPEATABLE READ")
    with app.connect() as conn:
        conn.execute(sa.text("SELECT count(*) FROM fs_flows")).scalar()  # the snapshot
        first = flow.run({"key": "acme"}, tracking_id=unique("first")).tracking_id
        second = flow.run({"key": "acme"}, tracking_id=unique("second"), connection=conn)
        conn.commit()
    app.dispose()
    assert _node_statuses(storage, first) == [NodeStatus.PENDING]
    assert _node_statuses(storage, second.tracking_id) == [NodeStatus.BLOCKED]
    storage.close()


def _node_statuses(storage: Storage, tracking_id: str) -> list[NodeStatus]:
    return [n.status for n in storage.list_nodes(flow_id=_record(storage, tracking_id).id)]


def _record(storage: Storage, tracking_id: str) -> Any:
    record = storage.get_flow(tracking_id=tracking_id, with_payloads=False)
    assert record is not None
    return record


def _all_ended(storage: Storage, tracking_ids: list[str]) -> bool:
    ended = (FlowStatus.COMPLETED, FlowStatus.FAILED, FlowStatus.CANCELLED)
    return all(_record(storage, tid).status in ended for tid in tracking_ids)


def _started(journal: Path, tracking_id: str) -> dict[str, Any] | None:
    for event in read_events(journal):
        if event["tid"] == tracking_id and event["event"] == "start":
            return event
    return None


def _spans(events: list[dict[str, Any]]) -> dict[str, tuple[float, float]]:
    """Each run's first start and last end (a killed attempt has a start, no end)."""
    spans: dict[str, tuple[float, float]] = {}
    for event in events:
        start, end = spans.get(event["tid"], (event["t"], event["t"]))
        spans[event["tid"]] = (min(start, event["t"]), max(end, event["t"]))
    return spans


def _most_at_once(spans: list[tuple[float, float]]) -> int:
    edges = sorted(edge for start, end in spans for edge in ((start, 1), (end, -1)))
    most = now = 0
    for _, change in edges:  # at equal times an end (-1) sorts before a start
        now += change
        most = max(most, now)
    return most


def _never(_ctx: object) -> None:
    raise AssertionError("steps run in the worker processes, not in the test")

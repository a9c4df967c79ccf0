"""Maps across real `flowsmith worker` processes (each SQL backend): max_parallel holds
across three processes, and a SIGKILLed worker's items are rescued while the items it
completed never run again.

The items journal each start and end to a file (one os.write on an O_APPEND descriptor
per line: lines never interleave, a SIGKILL leaves no half line), so the test sees what
really ran, in which process, when.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from flowsmith_worker import Flow, FlowStatus, NodeStatus, create_storage
from flowsmith_worker.storage.base import Storage
from tests.conftest import eventually
from tests.support.runs import nodes_of, status_of
from tests.worker_process import WorkerProcess

FLOWS_MODULE = """
import json
import os
import time

from flowsmith_worker import Flow

_fd = os.open(os.environ["FS_JOURNAL"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)


def _journal(event, item):
    line = {"event": event, "item": item, "pid": os.getpid(), "t": time.time()}
    os.write(_fd, (json.dumps(line) + "\\n").encode())


def each(ctx, item):
    _journal("start", item)
    time.sleep(float(os.environ["FS_ITEM_SECONDS"]))
    _journal("end", item)
    return item * 2


limit = os.environ.get("FS_MAX_PARALLEL")
Flow(os.environ["FS_MAP"]).map(
    "each",
    each,
    items=lambda ctx: list(range(ctx.data["count"])),
    max_parallel=int(limit) if limit else None,
)
"""


@pytest.fixture
def app(tmp_path: Path) -> Path:
    workdir = tmp_path / "app"
    workdir.mkdir()
    (workdir / "mapflows.py").write_text(FLOWS_MODULE)
    return workdir


@pytest.fixture
def workers() -> Iterator[Callable[..., WorkerProcess]]:
    started: list[WorkerProcess] = []

    def start(*args: Any) -> WorkerProcess:
        started.append(WorkerProcess(*args, module="mapflows"))
        return started[-1]

    yield start
    for worker in started:
        worker.cleanup()


def journal(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def most_at_once(lines: list[dict[str, Any]]) -> int:
    """The most items running at the same moment, from their start and end lines."""
    events = sorted((line["t"], 1 if line["event"] == "start" else -1) for line in lines)
    running = most = 0
    for _t, change in sorted(events, key=lambda e: (e[0], e[1])):  # an end first at a tie
        running += change
        most = max(most, running)
    return most


def test_max_parallel_holds_across_three_worker_processes(
    sql_url: str,
    app: Path,
    tmp_path: Path,
    unique: Callable[[str], str],
    workers: Callable[..., WorkerProcess],
) -> None:
    """Three workers of 4 slots each (12 slots) run a map of 18 items with max_parallel=3:
    the journal never shows more than 3 items running at once, and shows 3 (they do run
    in parallel); every item ran once, and the outputs are in item order."""
    storage = create_storage(sql_url)
    storage.migrate()
    name, path = unique("limited"), tmp_path / "journal.log"
    Flow(name, storage=storage).map("each", _never, items=_never, max_parallel=3)
    env = _env(name, path, seconds=0.3, max_parallel=3)
    args = ("--concurrency", "4", "--poll-interval", "0.05")
    started = [workers(app, sql_url, env, *args) for _ in range(3)]
    for worker in started:
        worker.wait_started()
    run = storage_flow(storage, name).run({"count": 18}, tracking_id=unique("t"))
    eventually(lambda: status_of(storage, run.tracking_id) == FlowStatus.COMPLETED, timeout=90)
    lines = journal(path)
    assert most_at_once(lines) == 3
    assert sorted(line["item"] for line in lines if line["event"] == "end") == list(range(18))
    assert run.wait(timeout=0)["each"] == [i * 2 for i in range(18)]
    storage.close()


def test_a_sigkilled_workers_items_are_rescued_and_completed_ones_never_rerun(
    sql_url: str,
    app: Path,
    tmp_path: Path,
    unique: Callable[[str], str],
    workers: Callable[..., WorkerProcess],
) -> None:
    """A worker is SIGKILLed in the middle of a map of 16 items: a second worker rescues
    the items it was running (their leases expire) and runs the rest; no item COMPLETED
    before the kill starts again, and the map's output has every item, in order."""
    storage = create_storage(sql_url)
    storage.migrate()
    name, path = unique("killed"), tmp_path / "journal.log"
    Flow(name, storage=storage).map("each", _never, items=_never)
    env = _env(name, path, seconds=0.4, max_parallel=None)
    args = ("--concurrency", "4", "--poll-interval", "0.05", "--lease", "2")
    first = workers(app, sql_url, env, *args)
    first.wait_started()
    run = storage_flow(storage, name).run({"count": 16}, tracking_id=unique("t"))
    eventually(lambda: _mid_map(storage, run.tracking_id), timeout=60, interval=0.02)
    first.signal(signal.SIGKILL)
    first.wait(10)
    nodes = nodes_of(storage, run.tracking_id)
    completed = {n for n, node in nodes.items() if node.status == NodeStatus.COMPLETED}
    killed_while_running = {n for n, node in nodes.items() if node.status == NodeStatus.RUNNING}
    assert completed and killed_while_running, "the kill did not land mid-map"
    runs_before = len(journal(path))

    second = workers(app, sql_url, env, *args)
    second.wait_started()
    eventually(lambda: status_of(storage, run.tracking_id) == FlowStatus.COMPLETED, timeout=90)
    after_kill = journal(path)[runs_before:]
    started_again = {f"each[{line['item']}]" for line in after_kill if line["event"] == "start"}
    assert not started_again & completed, "an item that had completed ran again"
    assert killed_while_running <= started_again, "an item the kill interrupted was not rescued"
    assert run.wait(timeout=0)["each"] == [i * 2 for i in range(16)]
    storage.close()


def _mid_map(storage: Storage, tracking_id: str) -> bool:
    """At least 4 items COMPLETED (committed, not only journaled) and one RUNNING."""
    statuses = [n.status for name, n in nodes_of(storage, tracking_id).items() if "[" in name]
    return statuses.count(NodeStatus.COMPLETED) >= 4 and NodeStatus.RUNNING in statuses


def storage_flow(storage: Storage, name: str) -> Flow:
    from flowsmith_worker.flow import registry

    flow = registry.lookup(name)
    assert flow is not None
    return flow


def _env(name: str, path: Path, *, seconds: float, max_parallel: int | None) -> dict[str, str]:
    env = dict(os.environ, FS_MAP=name, FS_JOURNAL=str(path), FS_ITEM_SECONDS=str(seconds))
    if max_parallel is not None:
        env["FS_MAX_PARALLEL"] = str(max_parallel)
    return env


def _never(*_args: object) -> Any:
    raise AssertionError("items run in the worker processes, not in the test")

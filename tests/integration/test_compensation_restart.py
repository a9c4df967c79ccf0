"""A compensation survives its worker: SIGKILL a `flowsmith worker` process in the middle
of a compensation, and another worker rescues it and runs it to its end, while a
compensation that had COMPLETED never runs again (each SQL backend).

A compensation is an ordinary leased node (see flowsmith_worker/compensation.py): the
lease of the killed worker expires, the next worker's rescue hands the node back,
and it runs again without using up its retries.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from flowsmith_worker import Compensation, Flow, FlowStatus, NodeStatus, create_storage
from flowsmith_worker.records import AttemptOutcome
from tests.conftest import eventually
from tests.worker_process import WorkerProcess

FLOWS_MODULE = """
import os
import time
from pathlib import Path

from flowsmith_worker import Flow

MARKS = Path(os.environ["FS_MARKS"])


def mark(what):
    with MARKS.open("a") as marks:
        marks.write(f"{what} {os.getpid()}\\n")


def undo_charge(ctx):
    mark("charge")
    return "refunded"


def undo_reserve(ctx):
    first = "reserve" not in MARKS.read_text()
    mark("reserve")
    if first:
        time.sleep(600)  # killed here
    return "released"


def ship(ctx):
    raise RuntimeError("no stock")


(
    Flow(os.environ["FS_FLOW"])
    .step("reserve", lambda ctx: "r1", compensate=undo_reserve)
    .step("charge", lambda ctx: "c1", compensate=undo_charge)
    .step("ship", ship)
)
"""


@pytest.fixture
def workers() -> Iterator[Callable[..., WorkerProcess]]:
    started: list[WorkerProcess] = []

    def start(*args: object) -> WorkerProcess:
        started.append(WorkerProcess(*args, module="sagaflows"))  # type: ignore[arg-type]
        return started[-1]

    yield start
    for worker in started:
        worker.cleanup()


def test_a_compensation_killed_midway_is_rescued_and_a_completed_one_never_runs_again(
    sql_url: str,
    tmp_path: Path,
    unique: Callable[[str], str],
    workers: Callable[..., WorkerProcess],
) -> None:
    """ship fails: compensate:charge completes, then the worker is SIGKILLed inside
    compensate:reserve. A second worker rescues it once the lease (1 s) expired and
    runs it to its end; compensate:charge ran once, and the run ends FAILED, COMPENSATED."""
    storage = create_storage(sql_url)
    storage.migrate()
    name = unique("saga")
    # The plan the run keeps is this one: it says which steps have compensations.
    flow = Flow(name, storage=storage)
    flow.step("reserve", _never, compensate=_never).step("charge", _never, compensate=_never)
    flow.step("ship", _never)
    run = flow.run({}, tracking_id=unique("t"))
    workdir = tmp_path / "app"
    workdir.mkdir()
    (workdir / "sagaflows.py").write_text(FLOWS_MODULE)
    marks = tmp_path / "marks"
    marks.write_text("")
    env = dict(os.environ, FS_FLOW=name, FS_MARKS=str(marks))
    options = ("--poll-interval", "0.1", "--lease", "1")

    first = workers(workdir, sql_url, env, *options)
    first.wait_started()
    eventually(lambda: "reserve" in marks.read_text(), timeout=60)
    first.signal(signal.SIGKILL)
    first.wait(10)
    second = workers(workdir, sql_url, env, *options)
    second.wait_started()
    eventually(lambda: run.status() == FlowStatus.FAILED, timeout=60, interval=0.1)

    lines = marks.read_text().split()
    assert lines[0::2] == ["charge", "reserve", "reserve"]
    killed, rescuer = lines[3], lines[5]
    assert killed == str(first.pid) and rescuer == str(second.pid)
    nodes = {n.step_name: n for n in run.trace()}
    reserve = nodes["compensate:reserve"]
    assert reserve.status == NodeStatus.COMPLETED and reserve.output == "released"
    assert [a.outcome for a in reserve.attempts] == [
        AttemptOutcome.RESCUED,
        AttemptOutcome.COMPLETED,
    ]
    assert len(nodes["compensate:charge"].attempts) == 1
    assert run.compensation() == Compensation.COMPENSATED
    storage.close()


def _never(_ctx: object) -> None:
    raise AssertionError("steps run in the worker processes, not in the test")

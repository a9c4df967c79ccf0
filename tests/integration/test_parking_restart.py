"""Parked runs survive their worker: SIGKILL a `flowsmith worker` process while runs
sleep and wait for events, start another one, and every run resumes (each SQL backend).

A parked node is a row (PENDING until its wake time, see flowsmith_worker/parking.py),
held by no process: the second worker, which never saw these runs, wakes the sleeps
at their time and the waits when their events are sent.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from flowsmith_worker import Flow, FlowStatus, create_storage, send_event
from flowsmith_worker.storage.base import Storage
from tests.conftest import eventually
from tests.support.parking import parked
from tests.support.runs import nodes_of, status_of
from tests.worker_process import WorkerProcess

RUNS = 4
SLEEP_SECONDS = 4.0

FLOWS_MODULE = """
import os

from flowsmith_worker import Flow

Flow(os.environ["FS_SLEEPER"]).step("before", lambda ctx: "slept").sleep(
    "nap", seconds=float(os.environ["FS_SLEEP_SECONDS"])
).step("after", lambda ctx: ctx.data["before"])

Flow(os.environ["FS_WAITER"]).wait_for("approval").step(
    "after", lambda ctx: ctx.data["approval"]
)
"""


@pytest.fixture
def workers() -> Iterator[Callable[..., WorkerProcess]]:
    started: list[WorkerProcess] = []

    def start(*args: object) -> WorkerProcess:
        started.append(WorkerProcess(*args, module="parkflows"))  # type: ignore[arg-type]
        return started[-1]

    yield start
    for worker in started:
        worker.cleanup()


def test_sleeping_and_waiting_runs_resume_on_another_worker_after_sigkill(
    sql_url: str,
    tmp_path: Path,
    unique: Callable[[str], str],
    workers: Callable[..., WorkerProcess],
) -> None:
    """Runs parked in a sleep (4 s) and in a wait for an event; the worker is killed
    (SIGKILL: no clean stop, nothing handed back). A new worker wakes every sleep no
    earlier than its wake time, and every wait once its event is sent; all complete."""
    storage = create_storage(sql_url)
    storage.migrate()
    sleeper_name, waiter_name = unique("sleeper"), unique("waiter")
    sleeper = (
        Flow(sleeper_name, storage=storage)
        .step("before", _never)
        .sleep("nap", seconds=SLEEP_SECONDS)
        .step("after", _never)
    )
    waiter = Flow(waiter_name, storage=storage).wait_for("approval").step("after", _never)
    sleeping = [sleeper.run({}, tracking_id=unique("s")).tracking_id for _ in range(RUNS)]
    waiting = [waiter.run({}, tracking_id=unique("w")).tracking_id for _ in range(RUNS)]

    workdir = tmp_path / "app"
    workdir.mkdir()
    (workdir / "parkflows.py").write_text(FLOWS_MODULE)
    env = dict(
        os.environ,
        FS_SLEEPER=sleeper_name,
        FS_WAITER=waiter_name,
        FS_SLEEP_SECONDS=str(SLEEP_SECONDS),
    )
    first = workers(workdir, sql_url, env, "--poll-interval", "0.1")
    first.wait_started()
    eventually(lambda: _all_parked(storage, sleeping, "nap"), timeout=30)
    eventually(lambda: _all_parked(storage, waiting, "approval"), timeout=30)
    first.signal(signal.SIGKILL)
    first.wait(10)

    second = workers(workdir, sql_url, env, "--poll-interval", "0.1")
    second.wait_started()
    for i, tid in enumerate(waiting):
        send_event(tid, "approval", {"n": i}, storage=storage)
    done = lambda: all(  # noqa: E731
        status_of(storage, t) == FlowStatus.COMPLETED for t in sleeping + waiting
    )
    eventually(done, timeout=60, interval=0.1)
    for tid in sleeping:
        nap = nodes_of(storage, tid)["nap"]
        assert nap.wake_at is not None and nap.attempts[-1].started_at >= nap.wake_at
        assert nap.attempts[-1].worker_id != nap.attempts[0].worker_id  # the second worker
    outputs = [nodes_of(storage, tid)["after"].output for tid in waiting]
    assert outputs == [{"n": i} for i in range(RUNS)]
    storage.close()


def _all_parked(storage: Storage, tracking_ids: list[str], step: str) -> bool:
    return all(parked(storage, tid, step) for tid in tracking_ids)


def _never(_ctx: object) -> None:
    raise AssertionError("steps run in the worker processes, not in the test")

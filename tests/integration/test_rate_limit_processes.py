"""A step's rate limit holds across three `flowsmith worker` processes (each SQL backend).

The bucket is one row, locked while a start takes its token by the database clock
(see flowsmith_worker/rate_limits.py): three processes of 16 slots each, claiming
the same limited step at once, start it no faster than the bucket allows, and a
start that found no token waits for its turn without being claimed over and over.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from flowsmith_worker import Flow, create_storage
from tests.conftest import eventually
from tests.support.rate_limits import completed, over_the_limit, steps_of
from tests.worker_process import WorkerProcess

PROCESSES = 3
CONCURRENCY = 16
RUNS = 30
FLAKY = 5  # runs whose first attempt fails: each attempt is a start
COUNT, PERIOD = 5, 1.0
RATE = f"{COUNT}/s"

FLOWS_MODULE = """
import json
import os
import time

from flowsmith_worker import Flow


def call_api(ctx):
    path = os.environ["FS_JOURNAL"]
    with open(path) as journal:
        first = json.dumps(ctx.tracking_id) not in journal.read()
    with open(path, "a") as journal:
        journal.write(json.dumps({"t": time.time(), "run": ctx.tracking_id}) + "\\n")
    if ctx.data.get("flaky") and first:
        raise RuntimeError("the API said try again")
    return "called"


Flow(os.environ["FS_LIMITED"]).step(
    "call_api", call_api, retries=1, backoff=0, rate_limit=os.environ["FS_RATE"]
)
"""


@pytest.fixture
def workers() -> Iterator[Callable[..., WorkerProcess]]:
    started: list[WorkerProcess] = []

    def start(*args: object) -> WorkerProcess:
        started.append(WorkerProcess(*args, module="limitedflows"))  # type: ignore[arg-type]
        return started[-1]

    yield start
    for worker in started:
        worker.cleanup()


def test_three_worker_processes_start_a_limited_step_no_faster_than_its_bucket(
    sql_url: str,
    tmp_path: Path,
    unique: Callable[[str], str],
    workers: Callable[..., WorkerProcess],
) -> None:
    """30 runs (5 of them failing their first attempt) of a step limited to 5/s, with
    3 worker processes of 16 slots each: every run completes; the journal of the 35
    starts (each attempt is one) never has more in a window of w seconds than the
    bucket's 5 + 5 * w (its burst is 5 at once); and the limited nodes were leased
    at most about twice per start (claimed once, refused, claimed again at their
    turn): nobody polls a node that waits for its turn."""
    storage = create_storage(sql_url)
    storage.migrate()
    name = unique("limited")
    # The plan (stored with each run) keeps the attempts: retries as the worker's code.
    limited = Flow(name, storage=storage).step("call_api", _never, retries=1, rate_limit=RATE)
    runs = [
        limited.run({"flaky": i < FLAKY}, tracking_id=unique("r")).tracking_id for i in range(RUNS)
    ]
    workdir = tmp_path / "app"
    workdir.mkdir()
    (workdir / "limitedflows.py").write_text(FLOWS_MODULE)
    journal = tmp_path / "journal.jsonl"
    journal.touch()
    env = dict(os.environ, FS_LIMITED=name, FS_RATE=RATE, FS_JOURNAL=str(journal))
    started = [
        workers(workdir, sql_url, env, "--concurrency", str(CONCURRENCY), "--poll-interval", "0.1")
        for _ in range(PROCESSES)
    ]
    for worker in started:
        worker.wait_started()

    eventually(lambda: completed(storage, runs), timeout=90, interval=0.2)

    starts = [json.loads(line) for line in journal.read_text().splitlines()]
    assert len(starts) == RUNS + FLAKY
    assert not over_the_limit([s["t"] for s in starts], COUNT, PERIOD)
    # 35 starts at 5/s, 5 of them at once: 6 s at least.
    times = sorted(s["t"] for s in starts)
    assert times[-1] - times[0] >= (RUNS + FLAKY - COUNT) / COUNT * PERIOD - 0.5
    leases = sum(steps_of(storage, t)["call_api"].attempt for t in runs)
    assert leases <= 2 * (RUNS + FLAKY) + PROCESSES * CONCURRENCY // 4, (
        f"{leases} claims of limited nodes for {RUNS + FLAKY} starts: they were polled"
    )
    storage.close()


def _never(_ctx: object) -> None:
    raise AssertionError("steps run in the worker processes, not in the test")

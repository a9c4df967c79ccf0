"""A rolling restart, as a Deployment's rolling update does it, loses nothing.

Three real `flowsmith worker` processes are replaced one by one while a thread
keeps enqueuing runs of three steps; one run in LONG_EVERY has a step that
takes LONG_STEP seconds, longer than the workers' --shutdown-timeout, and each
worker is stopped while it is inside such a step (started too recently to
finish within the grace period), so every stop hands a step back. Two orders:

- maxSurge 1: the new worker starts and is ready (/readyz answers 200, what
  the kubelet's readiness probe waits for) before the old one gets SIGTERM;
- maxSurge 0: the old one gets SIGTERM and exits before the new one starts.

Checked: every run completes; no COMPLETED step runs again and every execution
has its own attempt (tests/e2e/test_crash.py's check_outcome, over the journal the
steps append to, outside the engine's tables); the steps are allowed one
attempt, their history shows only releases and completions (no lost lease, no
failure), and each release gave its attempt back; each stopped worker released
at least the step it was cut off in and exited 0, within the grace margin the
manifests allow; and steps completed in every THROUGHPUT_WINDOW seconds of the
roll.
"""

from __future__ import annotations

import os
import signal
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from flowsmith_worker import Flow
from flowsmith_worker.storage import create_storage
from flowsmith_worker.storage.base import AttemptOutcome, Storage
from tests.conftest import database_url, eventually
from tests.e2e.test_crash import (
    STEPS,
    check_outcome,
    open_steps,
    read_events,
    wait_all_finished,
)
from tests.e2e.test_deploy import MIN_STOP_MARGIN
from tests.integration.test_worker_health import _free_port, _probe
from tests.worker_process import WorkerProcess

pytestmark = pytest.mark.slow

REPLICAS = 3
SHUTDOWN_TIMEOUT = 1.0
LONG_STEP = 4.0
LONG_EVERY = 10
SHORT_STEP = 0.02
# Runs enqueued per second: enough to keep every worker busy through the roll.
ENQUEUE_RATE = 10.0
# A stopped worker must be inside a long step that has at least this long left
# after --shutdown-timeout, so that the step is certainly handed back.
CUT_OFF_MARGIN = 1.0
THROUGHPUT_WINDOW = 1.0
WORKER_ARGS = (
    "--concurrency", "8", "--poll-interval", "0.1", "--lease", "10",
    "--shutdown-timeout", str(SHUTDOWN_TIMEOUT),
)  # fmt: skip
MODULE = "rollflows"

FLOWS_MODULE = textwrap.dedent(
    '''
    """Flows for tests/e2e/test_rolling_restart.py: each execution is journaled."""
    import json
    import os
    import time

    from flowsmith_worker import Flow

    STEPS = ("reserve", "charge", "notify")
    _fd = os.open(os.environ["FS_EXEC_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    _short, _long = float(os.environ["FS_SHORT"]), float(os.environ["FS_LONG"])
    _long_every = int(os.environ["FS_LONG_EVERY"])


    def _record(ctx, event, **extra):
        line = json.dumps({
            "tracking_id": ctx.tracking_id, "step": ctx.step, "attempt": ctx.attempt,
            "pid": os.getpid(), "event": event, "t": time.time(), **extra,
        })
        os.write(_fd, (line + "\\n").encode())  # one write: lines never interleave


    def _make(step):
        def run(ctx):
            long = step == "charge" and ctx.data["n"] % _long_every == 0
            _record(ctx, "start", long=long)
            time.sleep(_long if long else _short)
            _record(ctx, "end")
            return {step: os.getpid()}

        return run


    flow = Flow(os.environ["FS_FLOW_NAME"])
    for _step in STEPS:
        flow.step(_step, _make(_step))
    '''
)


class Enqueuer(threading.Thread):
    """Enqueues runs at ENQUEUE_RATE from a thread of this process until stopped."""

    def __init__(self, storage: Storage, flow_name: str) -> None:
        super().__init__(name="enqueuer", daemon=True)
        self.flow = Flow(flow_name, storage=storage)
        for step in STEPS:  # the plan stored with each run: no retries, as the workers'
            self.flow.step(step, _never_here)
        self.tracking_ids: list[str] = []
        self.halt = threading.Event()
        self.error: Exception | None = None

    def run(self) -> None:
        try:
            while not self.halt.wait(1 / ENQUEUE_RATE):
                n = len(self.tracking_ids)
                self.flow.run({"n": n}, tracking_id=f"{self.flow.name}-{n}")
                self.tracking_ids.append(f"{self.flow.name}-{n}")
        except Exception as exc:  # reported by stop(), in the test's thread
            self.error = exc

    def stop(self) -> list[str]:
        self.halt.set()
        self.join(30)
        assert self.error is None, f"enqueuing failed: {self.error!r}"
        return list(self.tracking_ids)


def _never_here(_ctx: Any) -> None:
    raise AssertionError("steps run in the worker processes, not in the test")


def _wait_ready(port: int) -> None:
    eventually(lambda: _probe(port, "/readyz")[0] == 200, timeout=30)


class Cluster:
    """The worker processes of one test, their journal, and how to replace them."""

    def __init__(self, tmp_path: Path, url: str, flow_name: str) -> None:
        workdir = tmp_path / "app"
        workdir.mkdir()
        (workdir / f"{MODULE}.py").write_text(FLOWS_MODULE)
        self.journal = tmp_path / "journal.jsonl"
        self.journal.touch()
        self.workdir, self.url = workdir, url
        self.env = dict(
            os.environ,
            FS_FLOW_NAME=flow_name,
            FS_EXEC_LOG=str(self.journal),
            FS_SHORT=str(SHORT_STEP),
            FS_LONG=str(LONG_STEP),
            FS_LONG_EVERY=str(LONG_EVERY),
        )
        self.started: list[WorkerProcess] = []
        self.stop_seconds: list[float] = []

    def start(self, count: int = 1) -> list[WorkerProcess]:
        """New workers, started together and returned once each is ready (as the
        readiness probe sees it)."""
        workers = []
        for _ in range(count):
            port = _free_port()
            worker = WorkerProcess(
                self.workdir, self.url, self.env, *WORKER_ARGS, "--metrics-port", str(port),
                module=MODULE,
            )  # fmt: skip
            self.started.append(worker)
            workers.append((worker, port))
        for worker, port in workers:
            worker.wait_started()
            _wait_ready(port)
        return [worker for worker, _ in workers]

    def stop(self, *workers: WorkerProcess) -> None:
        """SIGTERM, as the kubelet sends it; each worker must exit 0. How long each
        took is kept for the grace margin check."""
        sent = [worker.signal(signal.SIGTERM) for worker in workers]
        for worker, at in zip(workers, sent, strict=True):
            assert worker.wait(SHUTDOWN_TIMEOUT + 30) == 0, worker.output()[-3000:]
            self.stop_seconds.append(time.monotonic() - at)

    def stop_inside_a_long_step(self, worker: WorkerProcess) -> None:
        """Stop the worker while it runs a long step that cannot finish in time."""

        def cut_off() -> bool:
            latest = time.time() - (LONG_STEP - SHUTDOWN_TIMEOUT - CUT_OFF_MARGIN)
            running = open_steps(read_events(self.journal), worker.pid)
            return any(e["long"] and e["t"] > latest for e in running)

        eventually(cut_off, timeout=60, interval=0.05)
        self.stop(worker)

    def cleanup(self) -> None:
        for worker in self.started:
            worker.cleanup()


@pytest.fixture
def cluster(
    request: pytest.FixtureRequest, backend: str, tmp_path: Path
) -> Iterator[tuple[Cluster, Storage]]:
    url = database_url(request, backend, tmp_path)
    storage = create_storage(url)
    storage.migrate()
    made = Cluster(tmp_path, url, f"roll_{backend}")
    yield made, storage
    made.cleanup()
    storage.close()


def _roll_max_surge_1(cluster: Cluster, workers: list[WorkerProcess]) -> list[WorkerProcess]:
    """Each old worker is stopped only once its replacement is ready."""
    replaced = []
    for old in workers:
        replaced += cluster.start()
        cluster.stop_inside_a_long_step(old)
    return replaced


def _roll_max_surge_0(cluster: Cluster, workers: list[WorkerProcess]) -> list[WorkerProcess]:
    """Each old worker has exited before its replacement starts."""
    replaced = []
    for old in workers:
        cluster.stop_inside_a_long_step(old)
        replaced += cluster.start()
    return replaced


def _check_no_attempt_used_up(storage: Storage, tracking_ids: list[str], rolled: int) -> None:
    """Steps allowed one attempt all completed; their history holds only releases
    and completions, each release gave its attempt back, and each worker stopped
    released at least one step."""
    released = 0
    for tracking_id in tracking_ids:
        record = storage.get_flow(tracking_id=tracking_id, with_payloads=False)
        assert record is not None
        for node in storage.list_nodes(flow_id=record.id, with_payloads=False):
            outcomes = [a.outcome for a in node.attempts]
            assert outcomes[-1] == AttemptOutcome.COMPLETED, (tracking_id, node.step_name, outcomes)
            assert set(outcomes[:-1]) <= {AttemptOutcome.RELEASED}, (tracking_id, outcomes)
            # A release gives its attempt back by raising the limit by one.
            assert node.max_attempts == len(outcomes), (tracking_id, node.step_name, node)
            released += len(outcomes) - 1
    assert released >= rolled, f"{released} steps handed back by {rolled} stopped workers"


def _check_throughput_never_zero(journal: Path, since: float, until: float) -> None:
    ends = sorted(e["t"] for e in read_events(journal) if e["event"] == "end")
    windows = int((until - since) // THROUGHPUT_WINDOW)
    counts = [0] * windows
    for t in ends:
        index = int((t - since) // THROUGHPUT_WINDOW)
        if 0 <= index < windows:
            counts[index] += 1
    assert windows >= 3 and all(counts), (
        f"steps completed per {THROUGHPUT_WINDOW:g} s during the roll: {counts}"
    )


# Both orders on SQLite and PostgreSQL; MariaDB, whose claims and releases differ
# from PostgreSQL's only in their SQL, in the Deployment's default order (keeps
# the suite short).
@pytest.mark.parametrize(
    ("backend", "roll"),
    [
        ("sqlite", _roll_max_surge_1),
        ("sqlite", _roll_max_surge_0),
        ("postgresql", _roll_max_surge_1),
        ("postgresql", _roll_max_surge_0),
        ("mysql", _roll_max_surge_1),
    ],
    ids=lambda v: v if isinstance(v, str) else v.__name__.removeprefix("_roll_"),
)
def test_rolling_restart_under_load_loses_nothing(
    cluster: tuple[Cluster, Storage],
    roll: Callable[[Cluster, list[WorkerProcess]], list[WorkerProcess]],
) -> None:
    """Replacing every worker one by one under continuous load (maxSurge 1, then
    0): no run lost, no completed step run again, no attempt used up by the
    graceful releases, steps completed in every window of the roll, and each
    worker exited 0 within the grace margin."""
    app, storage = cluster
    workers = app.start(REPLICAS)
    enqueuer = Enqueuer(storage, app.env["FS_FLOW_NAME"])
    enqueuer.start()
    since = time.time()
    new_workers = roll(app, workers)
    until = time.time()
    tracking_ids = enqueuer.stop()
    wait_all_finished(storage, tracking_ids, timeout=120)
    app.stop(*new_workers)

    check_outcome(storage, tracking_ids, read_events(app.journal))
    _check_no_attempt_used_up(storage, tracking_ids, rolled=len(workers))
    _check_throughput_never_zero(app.journal, since, until)
    for worker in app.started:
        assert '"step.lease_lost"' not in worker.output(), worker.output()[-3000:]
    for worker in workers:
        released = [e for e in worker.log_lines() if e["event"] == "worker.released"]
        assert released and released[0]["released"] >= 1, worker.output()[-3000:]
    assert max(app.stop_seconds) < SHUTDOWN_TIMEOUT + MIN_STOP_MARGIN, app.stop_seconds

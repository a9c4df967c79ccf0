"""The benchmark's flows, how they are enqueued, and the `flowsmith worker` processes.

`flowsmith worker tests.bench.workload` imports this module to register the
flows; the benchmark process imports it to enqueue them. Every step does
nothing (or returns 1 KB, for the bytes-written figure), so what is measured
is the engine and the database, not the work.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from flowsmith_worker import Context, Flow
from flowsmith_worker.storage.base import Storage

REPO = Path(__file__).resolve().parents[2]
WORKER_MODULE = "tests.bench.workload"
POLL_INTERVAL = 0.05  # the workers' idle poll: short, as a latency-minded deployment would set
CONCURRENCY = 8
RUN_MANY_BATCH = 1000
# A string of this many characters encodes to exactly 1,024 bytes of JSON (with its quotes).
KILOBYTE_OUTPUT = "x" * 1022
START_TIMEOUT = 60.0
DRAIN_TIMEOUT = 900.0
MONITOR_INTERVAL = 0.2  # the drain is watched gently: the monitor shares the cores
# Marks the benchmark's own queries, so counters.py can leave them out.
MONITOR_MARK = "/* flowsmith-bench monitor */"


def _noop(ctx: Context) -> int:
    return ctx.attempt


def _kilobyte(ctx: Context) -> str:
    return KILOBYTE_OUTPUT


def _flow(name: str, steps: int, fn: Any) -> Flow:
    flow = Flow(name)
    for index in range(steps):
        flow.step(f"s{index:02d}", fn)
    return flow


ONE_STEP = _flow("bench_one_step", 1, _noop)
TEN_STEPS = _flow("bench_ten_steps", 10, _noop)
FIFTY_KILOBYTE_STEPS = _flow("bench_fifty_kilobyte_steps", 50, _kilobyte)
NOOP_FLOWS = {1: ONE_STEP, 10: TEN_STEPS}


# --------------------------------------------------------------------------- enqueue


def tracking_ids(count: int) -> list[str]:
    prefix = uuid.uuid4().hex[:12]
    return [f"bench-{prefix}-{i}" for i in range(count)]


def has_run_many() -> bool:
    """Flow.run_many arrives with issue 15; older engines only have flow.run."""
    return hasattr(Flow, "run_many")


def enqueue_one_by_one(storage: Storage, flow: Flow, count: int) -> float:
    """``count`` runs, one `flow.run` (one transaction) each from this thread; seconds taken."""
    flow.storage = storage
    ids = tracking_ids(count)
    started = time.perf_counter()
    for i, tracking_id in enumerate(ids):
        flow.run({"i": i}, tracking_id=tracking_id)
    return time.perf_counter() - started


def enqueue_in_batches(storage: Storage, flow: Flow, count: int, batch: int) -> float:
    """``count`` runs through `Flow.run_many`, ``batch`` per call; seconds taken."""
    flow.storage = storage
    ids = tracking_ids(count)
    run_many = flow.run_many  # type: ignore[attr-defined]  # see has_run_many()
    started = time.perf_counter()
    for first in range(0, count, batch):
        chunk = ids[first : first + batch]
        run_many([{"i": first + i} for i in range(len(chunk))], tracking_ids=chunk)
    return time.perf_counter() - started


def enqueue_quickly(storage: Storage, flow: Flow, count: int) -> None:
    """Prepare a backlog (not measured): run_many where the engine has it."""
    if has_run_many():
        enqueue_in_batches(storage, flow, count, RUN_MANY_BATCH)
    else:
        enqueue_one_by_one(storage, flow, count)


# --------------------------------------------------------------------------- workers


@dataclass
class WorkerPool:
    """Real `flowsmith worker` processes on one database, logging to files under ``logs``."""

    url: str
    count: int
    logs: Path
    concurrency: int = CONCURRENCY
    poll_interval: float = POLL_INTERVAL
    queues: tuple[str, ...] = ("default",)
    env: Mapping[str, str] = field(default_factory=dict)  # on top of this process's
    options: tuple[str, ...] = ()  # more `flowsmith worker` options (--no-listen)

    def __post_init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.log_paths: list[Path] = []

    def start(self) -> None:
        """Start the processes and wait until each has logged worker.started."""
        for _ in range(self.count):
            path = self.logs / f"worker-{uuid.uuid4().hex[:8]}.log"
            with path.open("wb") as log:
                self.procs.append(subprocess.Popen(self._command(), **self._popen_options(log)))
            self.log_paths.append(path)
        deadline = time.monotonic() + START_TIMEOUT
        while not all('"worker.started"' in p.read_text(errors="replace") for p in self.log_paths):
            self.check_alive()
            if time.monotonic() > deadline:
                raise SystemExit(f"workers not started after {START_TIMEOUT:.0f} s")
            time.sleep(0.05)

    def _command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "flowsmith_worker",
            "worker",
            WORKER_MODULE,
            "--url",
            self.url,
            "--concurrency",
            str(self.concurrency),
            "--poll-interval",
            str(self.poll_interval),
            "--log-format",
            "json",
            *(option for queue in self.queues for option in ("--queue", queue)),
            *self.options,
        ]

    def _popen_options(self, log: Any) -> dict[str, Any]:
        return {
            "cwd": REPO,
            "stdout": log,
            "stderr": subprocess.STDOUT,
            "env": {**os.environ, **self.env, "PYTHONPATH": str(REPO)},
        }

    def check_alive(self) -> None:
        """Stop the benchmark, showing why, when a worker exited by itself."""
        for proc, path in zip(self.procs, self.log_paths, strict=True):
            if proc.poll() is not None:
                tail = path.read_text(errors="replace")[-3000:]
                raise SystemExit(f"a worker exited early ({proc.returncode}); its log:\n{tail}")

    @property
    def pids(self) -> frozenset[int]:
        return frozenset(proc.pid for proc in self.procs)

    def peak_rss_mib(self) -> float:
        """The largest resident set (VmHWM) any of the processes reached so far, in MiB."""
        return max(_peak_rss_kib(proc.pid) for proc in self.procs) / 1024

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def _peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmHWM in /proc/{pid}/status")


@contextmanager
def running_workers(
    url: str,
    count: int,
    logs: Path,
    queues: tuple[str, ...] = ("default",),
    *,
    env: Mapping[str, str] | None = None,
    options: tuple[str, ...] = (),
) -> Iterator[WorkerPool]:
    """Started workers (all of them ready) of ``queues``, stopped at the end whatever happens."""
    pool = WorkerPool(url, count, logs, queues=queues, env=env or {}, options=options)
    try:
        pool.start()
        yield pool
    finally:
        pool.stop()


# --------------------------------------------------------------------------- watching


def monitor_engine(url: str) -> sa.Engine:
    """The benchmark's own connection: autocommit, so each query is one statement and
    one transaction that counters.py can subtract, and never holds a snapshot open."""
    return sa.create_engine(url, isolation_level="AUTOCOMMIT", pool_size=1)


def wait_completed(engine: sa.Engine, pool: WorkerPool, flows: int) -> int:
    """Poll until ``flows`` runs are COMPLETED; return how many queries that took."""
    done = sa.text(f"SELECT count(*) FROM fs_flows WHERE status = 'COMPLETED' {MONITOR_MARK}")
    failed = sa.text(
        f"SELECT count(*) FROM fs_flows WHERE status IN ('FAILED', 'CANCELLED') {MONITOR_MARK}"
    )
    deadline = time.monotonic() + DRAIN_TIMEOUT
    polls = 0
    with engine.connect() as conn:
        while True:
            polls += 2
            completed = conn.execute(done).scalar_one()
            if conn.execute(failed).scalar_one():
                raise SystemExit("a benchmark run failed: read the worker logs")
            if completed >= flows:
                return polls
            pool.check_alive()
            if time.monotonic() > deadline:
                raise SystemExit(f"{completed} of {flows} runs completed after {DRAIN_TIMEOUT} s")
            time.sleep(MONITOR_INTERVAL)


# A backlog waits this far in the future until every worker is ready (see hold_backlog).
_HOLD_SECONDS = 86400.0


def hold_backlog(engine: sa.Engine) -> None:
    """Push every pending node a day ahead, so no worker starts before all are ready.

    Run between enqueue and the workers' start (older engines have no delay on
    `Flow.run_many`, and the same bench measures them): workers start one after
    another, so the first would otherwise drain part of the backlog alone and the
    rate of 4 workers would include start-up.
    """
    with engine.connect() as conn:
        conn.execute(
            sa.text("UPDATE fs_nodes SET run_after = run_after + :hold WHERE status = 'PENDING'"),
            {"hold": _HOLD_SECONDS},
        )


def release_backlog(engine: sa.Engine) -> float:
    """Make the held backlog runnable now; return that moment (epoch seconds).

    Times in the FlowSmith tables are epoch seconds from the database clock,
    which is this host's clock: every database here runs on this machine.
    """
    now = time.time()
    with engine.connect() as conn:
        conn.execute(
            sa.text(
                f"UPDATE fs_nodes SET run_after = :now WHERE status = 'PENDING' {MONITOR_MARK}"
            ),
            {"now": now},
        )
    return now


@dataclass(frozen=True)
class Window:
    """Steps finished between the backlog's release and the last step's end."""

    steps: int
    seconds: float

    @property
    def steps_per_second(self) -> float:
        return self.steps / self.seconds if self.seconds > 0 else 0.0


def steady_window(engine: sa.Engine, released_at: float) -> Window:
    """Steps finished since the release, and the seconds until the last one finished."""
    query = sa.text(
        "SELECT count(*), max(finished_at) FROM fs_nodes"
        f" WHERE status = 'COMPLETED' AND finished_at >= :released {MONITOR_MARK}"
    )
    with engine.connect() as conn:
        steps, last = conn.execute(query, {"released": released_at}).one()
    return Window(int(steps), float(last) - released_at if last is not None else 0.0)

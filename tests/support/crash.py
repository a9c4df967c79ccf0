"""The crash tests' harness: a flows module whose steps journal each start and end to a file
(one os.write on an O_APPEND descriptor per line: lines never interleave, a SIGKILL leaves
no half line), worker processes SIGSTOPped to look at what they run, and the checks that
compare the journal (what ran) with the database (what the engine believes).
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import textwrap
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flowsmith_worker import Flow
from flowsmith_worker.storage.base import (
    RESCUE_ERROR,
    AttemptOutcome,
    FlowStatus,
    NodeStatus,
    Storage,
)
from tests.support.steps import never_here
from tests.worker_process import WorkerProcess

STEPS = ("reserve", "charge", "notify")
# Times of the database (finished_at) and of the steps (time.time()) come from
# the same host clock; this covers SQLite's millisecond 'now' and float rounding.
CLOCK_SLACK = 0.005
CONCURRENCY = 4
WORKER_ARGS = (
    "--lease",
    "2",
    "--poll-interval",
    "0.1",
    "--concurrency",
    str(CONCURRENCY),
    "--shutdown-timeout",
    "10",
)

FLOWS_MODULE = textwrap.dedent(
    '''
    """Flows for tests/e2e/test_crash.py: every execution is recorded, nothing else."""
    import json
    import os
    import random
    import time

    import sqlalchemy as sa

    from flowsmith_worker import Flow
    from flowsmith_worker.config import parse_database_url

    STEPS = ("reserve", "charge", "notify")
    _fd = os.open(os.environ["FS_EXEC_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    _min, _max = float(os.environ["FS_STEP_MIN"]), float(os.environ["FS_STEP_MAX"])
    _engine = None
    _executions = sa.table(
        "executions",
        sa.column("tracking_id"), sa.column("step"), sa.column("attempt"),
        sa.column("pid"), sa.column("started_at"), sa.column("ended_at"),
    )
    if os.environ.get("FS_EXEC_DB"):
        _engine = sa.create_engine(
            parse_database_url(os.environ["FS_EXEC_DB"]), pool_size=4, max_overflow=4
        )


    def _record(ctx, event, **extra):
        line = json.dumps({
            "tracking_id": ctx.tracking_id, "step": ctx.step, "attempt": ctx.attempt,
            "pid": os.getpid(), "event": event, "t": time.time(), **extra,
        })
        os.write(_fd, (line + "\\n").encode())


    def _key(ctx):
        c = _executions.c
        return (c.tracking_id == ctx.tracking_id) & (c.step == ctx.step) & (
            c.attempt == ctx.attempt) & (c.pid == os.getpid())


    def _make(step):
        def run(ctx):
            _record(ctx, "start")
            inserted = False
            if _engine is not None:
                try:
                    with _engine.begin() as conn:
                        conn.execute(_executions.insert().values(
                            tracking_id=ctx.tracking_id, step=ctx.step, attempt=ctx.attempt,
                            pid=os.getpid(), started_at=time.time(),
                        ))
                    inserted = True
                except sa.exc.IntegrityError as exc:
                    # Raising would only look like a retry: leave the evidence instead.
                    _record(ctx, "duplicate", error=str(exc.orig)[:300])
            time.sleep(random.uniform(_min, _max))
            if inserted:
                with _engine.begin() as conn:
                    conn.execute(
                        _executions.update().where(_key(ctx)).values(ended_at=time.time())
                    )
            _record(ctx, "end")
            return {"by": os.getpid()}

        return run


    flow = Flow(os.environ["FS_FLOW_NAME"])
    for _step in STEPS:
        flow.step(_step, _make(_step), retries=int(os.environ["FS_RETRIES"]), backoff=0.05)
    '''
)


def prepare(
    tmp_path: Path,
    flow_name: str,
    step_min: float,
    step_max: float,
    exec_db: str | None = None,
    retries: int = 3,
) -> tuple[Path, Path, dict[str, str]]:
    """The worker directory with the flows module, the events file and the workers' env."""
    workdir = tmp_path / "app"
    workdir.mkdir()
    (workdir / "crashflows.py").write_text(FLOWS_MODULE)
    events = tmp_path / "events.jsonl"
    events.touch()
    env = dict(
        os.environ,
        FS_FLOW_NAME=flow_name,
        FS_EXEC_LOG=str(events),
        FS_STEP_MIN=str(step_min),
        FS_STEP_MAX=str(step_max),
        FS_RETRIES=str(retries),
    )
    env.pop("FS_EXEC_DB", None)
    if exec_db:
        env["FS_EXEC_DB"] = exec_db
    return workdir, events, env


def enqueue(storage: Storage, flow_name: str, count: int, retries: int = 3) -> list[str]:
    """Enqueue ``count`` runs of the flow from this process; the workers run them.

    The run's stored plan comes from here, so ``retries`` must match the workers'.
    """
    flow = Flow(flow_name, storage=storage)
    for step in STEPS:
        flow.step(step, never_here, retries=retries)
    return [flow.run({"n": i}, tracking_id=f"{flow_name}-{i}").tracking_id for i in range(count)]


def read_events(path: Path) -> list[dict[str, Any]]:
    """The complete lines of the events file (a line being written right now is left out)."""
    *complete, _partial = path.read_text().split("\n")
    return [json.loads(line) for line in complete]


def open_steps(events: list[dict[str, Any]], pid: int) -> list[dict[str, Any]]:
    """Executions by ``pid`` that started and have not ended."""
    ended = {
        (e["tracking_id"], e["step"], e["attempt"])
        for e in events
        if e["pid"] == pid and e["event"] == "end"
    }
    return [
        e
        for e in events
        if e["pid"] == pid
        and e["event"] == "start"
        and (e["tracking_id"], e["step"], e["attempt"]) not in ended
    ]


def freeze_mid_step(
    worker: WorkerProcess, events_path: Path, after_starts: int, timeout: float = 60.0
) -> list[dict[str, Any]]:
    """SIGSTOP the worker at a moment it is inside a step; return the open steps.

    Waits until ``after_starts`` executions (by any worker) have started, so the
    workers have run side by side for a while. The worker stays stopped: the
    caller kills (or signals) it while those steps are provably unfinished.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        events = read_events(events_path)
        if sum(e["event"] == "start" for e in events) >= after_starts:
            worker.signal(signal.SIGSTOP)
            time.sleep(0.01)  # let the stop take effect before reading the file
            running = open_steps(read_events(events_path), worker.pid)
            if running:
                return running
            worker.signal(signal.SIGCONT)
        time.sleep(0.01)
    raise AssertionError(f"worker {worker.pid} was never caught inside a step:\n{worker.output()}")


def first_unfinished(storage: Storage, tracking_ids: list[str], start: int = 0) -> int:
    """The index of the first run that has not COMPLETED (len(tracking_ids) when all have)."""
    for index in range(start, len(tracking_ids)):
        record = storage.get_flow(tracking_id=tracking_ids[index])
        if record is None or record.status != FlowStatus.COMPLETED:
            return index
    return len(tracking_ids)


def wait_all_finished(storage: Storage, tracking_ids: list[str], timeout: float) -> None:
    """Wait until no run is PENDING or RUNNING (the checks that follow say what went wrong)."""
    deadline = time.monotonic() + timeout
    done = 0
    while True:
        done = first_unfinished(storage, tracking_ids, done)
        if done == len(tracking_ids):
            return
        record = storage.get_flow(tracking_id=tracking_ids[done])
        if record is not None and record.status not in (FlowStatus.PENDING, FlowStatus.RUNNING):
            done += 1  # finished, but not COMPLETED: check_outcome reports it
            continue
        if time.monotonic() > deadline:
            raise AssertionError(f"not every flow finished within {timeout} s: {record}")
        time.sleep(0.25)


def check_outcome(
    storage: Storage, tracking_ids: list[str], events: list[dict[str, Any]]
) -> dict[tuple[str, str], Any]:
    """The guarantees every crash test checks; returns the nodes by (tracking_id, step)."""
    starts: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    ends: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for e in events:
        if e["event"] == "start":
            starts[(e["tracking_id"], e["step"])].append(e)
        elif e["event"] == "end":
            ends[(e["tracking_id"], e["step"])].append(e)
    nodes: dict[tuple[str, str], Any] = {}
    problems: list[str] = []
    for tracking_id in tracking_ids:
        record = storage.get_flow(tracking_id=tracking_id)
        assert record is not None, tracking_id
        if record.status != FlowStatus.COMPLETED:
            problems.append(f"flow {tracking_id} is {record.status}: {record.error}")
        flow_nodes = storage.list_nodes(flow_id=record.id)
        if [n.step_name for n in flow_nodes] != list(STEPS):
            problems.append(f"flow {tracking_id} has nodes {[n.step_name for n in flow_nodes]}")
        for node in flow_nodes:
            key = (tracking_id, node.step_name)
            nodes[key] = node
            if node.status != NodeStatus.COMPLETED or node.finished_at is None:
                problems.append(f"{key} is {node.status} (error {node.error!r})")
                continue
            # A COMPLETED node is final: nothing of it may start after it completed.
            late = [s for s in starts[key] if s["t"] > node.finished_at + CLOCK_SLACK]
            if late:
                problems.append(f"{key} completed at {node.finished_at} but ran again: {late}")
            # At-least-once: its side effect happened, to the end, at least once.
            if not ends[key]:
                problems.append(f"{key} is COMPLETED but no execution of it ever ended")
            # Every execution has its own attempt number (one claim, one execution).
            attempts = [s["attempt"] for s in starts[key]]
            if len(attempts) != len(set(attempts)) or max(attempts, default=0) > node.attempt:
                problems.append(f"{key}: executions of attempts {attempts}, node at {node.attempt}")
    assert not problems, f"{len(problems)} problems:\n" + "\n".join(problems[:30])
    return nodes


def check_rescued(
    nodes: dict[tuple[str, str], Any],
    killed_mid_step: list[dict[str, Any]],
    survivors: list[WorkerProcess],
) -> None:
    """Each step the killed worker was inside was rescued, and its record and its
    attempts (trace) say so.

    And only those: the killed worker held at most CONCURRENCY leases, and a
    live worker (heartbeating every lease/3) never has its lease taken, so no
    survivor ever had a write refused (step.lease_lost).
    """
    assert killed_mid_step
    for e in killed_mid_step:
        node = nodes[(e["tracking_id"], e["step"])]
        assert node.rescues >= 1, (e, node)
        assert node.attempt > e["attempt"], (e, node)
        assert node.error is not None and RESCUE_ERROR in node.error, (e, node)
        # Its history shows the lost attempt as rescued, on the dead worker, and the
        # attempt that completed it on another.
        [lost] = [a for a in node.attempts if a.attempt == e["attempt"]]
        assert (lost.outcome, lost.error) == (AttemptOutcome.RESCUED, RESCUE_ERROR), (e, node)
        last = node.attempts[-1]
        assert last.outcome == AttemptOutcome.COMPLETED and last.worker_id != lost.worker_id
    rescued = {key: node.rescues for key, node in nodes.items() if node.rescues}
    assert sum(rescued.values()) <= CONCURRENCY, f"live workers' steps were rescued: {rescued}"
    for worker in survivors:
        lost = [line for line in worker.output().splitlines() if '"step.lease_lost"' in line]
        assert not lost, f"worker {worker.pid} lost leases while alive: {lost[:5]}"


@dataclass(frozen=True)
class Execution:
    tracking_id: str
    step: str
    attempt: int
    pid: int
    started_at: float
    ended_at: float | None


def executions_from_events(events: list[dict[str, Any]]) -> list[Execution]:
    ends = {
        (e["tracking_id"], e["step"], e["attempt"], e["pid"]): e["t"]
        for e in events
        if e["event"] == "end"
    }
    return [
        Execution(
            e["tracking_id"],
            e["step"],
            e["attempt"],
            e["pid"],
            e["t"],
            ends.get((e["tracking_id"], e["step"], e["attempt"], e["pid"])),
        )
        for e in events
        if e["event"] == "start"
    ]


def check_no_overlap(executions: Iterable[Any], killed_pid: int, killed_at: float) -> None:
    """Per node, executions ordered by attempt never overlap in time: one worker at a time.

    Only the SIGKILLed worker may leave an execution without an end: it ended
    when the worker died.
    """
    by_node: dict[tuple[str, str], list[Any]] = defaultdict(list)
    for ex in executions:
        by_node[(ex.tracking_id, ex.step)].append(ex)
    problems = []
    for key, runs in by_node.items():
        runs.sort(key=lambda r: r.attempt)
        for ex in runs:
            if ex.ended_at is None and ex.pid != killed_pid:
                problems.append(f"{key} attempt {ex.attempt} by {ex.pid} never ended")
        for prev, nxt in itertools.pairwise(runs):
            prev_end = prev.ended_at if prev.ended_at is not None else killed_at
            if nxt.started_at < prev_end:
                problems.append(
                    f"{key}: attempt {nxt.attempt} (pid {nxt.pid}) started at {nxt.started_at}, "
                    f"before attempt {prev.attempt} (pid {prev.pid}) ended at {prev_end}"
                )
    assert not problems, f"{len(problems)} overlaps:\n" + "\n".join(problems[:30])


def worker_pids_of(events: list[dict[str, Any]]) -> set[int]:
    return {e["pid"] for e in events if e["event"] == "start"}


def kill_one_of_two(
    storage: Storage,
    url: str,
    spawn: Callable[..., WorkerProcess],
    workdir: Path,
    events_path: Path,
    env: dict[str, str],
    tracking_ids: list[str],
    timeout: float,
    after_starts: int | None = None,
) -> tuple[list[dict[str, Any]], dict[tuple[str, str], Any]]:
    """Two workers, A SIGKILLed inside a step after ``after_starts`` step starts (one per
    run by default); every run finishes, checked as check_* say; B stops cleanly.

    Returns the executions A was inside when killed, and every node by (run, step).
    """
    a = spawn(workdir, url, env, *WORKER_ARGS)
    b = spawn(workdir, url, env, *WORKER_ARGS)
    a.wait_started()
    b.wait_started()
    starts = len(tracking_ids) if after_starts is None else after_starts
    killed_mid_step = freeze_mid_step(a, events_path, after_starts=starts)
    a.signal(signal.SIGKILL)
    killed_at = time.time()
    assert a.wait(10) == -signal.SIGKILL

    wait_all_finished(storage, tracking_ids, timeout=timeout)
    events = read_events(events_path)
    check_no_overlap(executions_from_events(events), a.pid, killed_at)
    nodes = check_outcome(storage, tracking_ids, events)
    check_rescued(nodes, killed_mid_step, [b])
    assert worker_pids_of(events) == {a.pid, b.pid}

    b.signal(signal.SIGTERM)
    assert b.wait(10 + 5) == 0, b.output()[-3000:]
    return killed_mid_step, nodes

"""Crash tests with real `flowsmith worker` processes and real signals.

Every step of the flows (tests/support/crash.py) appends one JSON line per event ("start", "end",
and "duplicate" when the side table refused an execution) to a file, with
``os.write`` on an O_APPEND descriptor: each line is written by one system call,
so lines never interleave and a SIGKILL cannot leave half a line behind. The
file is the ground truth of what ran, where and when; the database is the
ground truth of what the engine believes. The tests compare the two.

Worker processes are SIGSTOPped for a moment to look at what they are running,
so "killed mid-step" is proved, not hoped for.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest
import sqlalchemy as sa

from flowsmith_worker.config import parse_database_url
from flowsmith_worker.storage import create_storage
from tests.conftest import database_url
from tests.support.crash import (
    STEPS,
    WORKER_ARGS,
    check_no_overlap,
    check_outcome,
    check_rescued,
    enqueue,
    executions_from_events,
    first_unfinished,
    freeze_mid_step,
    kill_one_of_two,
    prepare,
    read_events,
    wait_all_finished,
    worker_pids_of,
)
from tests.worker_process import WorkerProcess

pytestmark = pytest.mark.slow

# --------------------------------------------------------------------------- helpers


@pytest.fixture
def spawn() -> Iterable[Callable[..., WorkerProcess]]:
    """Start worker processes; whatever is still running at the end is killed."""
    started: list[WorkerProcess] = []

    def start(workdir: Path, url: str, env: dict[str, str], *args: str) -> WorkerProcess:
        started.append(WorkerProcess(workdir, url, env, *args, module="crashflows"))
        return started[-1]

    yield start
    for worker in started:
        worker.cleanup()


# --------------------------------------------------------------------------- SQLite


def test_sqlite_two_workers_one_sigkilled_mid_step(
    tmp_path: Path, unique: Callable[[str], str], spawn: Callable[..., WorkerProcess]
) -> None:
    """Two worker processes on one SQLite file, one SIGKILLed while inside a step.

    Proves, for 100 flows of 3 steps: every flow completes; no COMPLETED step
    runs again (no execution starts after its node's finished_at); every step's
    side effect happened at least once; the steps the dead worker was running
    were rescued (rescues >= 1, error "lease expired", a later attempt), and no
    step of the live worker was; a node's executions never overlap in time; and
    the surviving worker stops cleanly on SIGTERM.
    """
    url = f"sqlite:///{tmp_path / 'flows.db'}"
    storage = create_storage(url)
    storage.migrate()
    name = unique("crash_sqlite")
    workdir, events_path, env = prepare(tmp_path, name, 0.05, 0.15)
    tracking_ids = enqueue(storage, name, 100)
    # Side by side for a third of the work, then A dies inside a step.
    kill_one_of_two(storage, url, spawn, workdir, events_path, env, tracking_ids, 90)
    storage.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql", "mysql"])
def test_with_no_retries_a_step_whose_worker_is_sigkilled_still_completes(
    request: pytest.FixtureRequest,
    backend: str,
    tmp_path: Path,
    unique: Callable[[str], str],
    spawn: Callable[..., WorkerProcess],
) -> None:
    """retries=0 on every step; one of two workers is SIGKILLed inside steps.

    A lost worker is not the step's fault: each step it was running is rescued
    and run once more by the survivor, without using up a retry (its allowance
    of attempts grows with the rescue), and every flow completes, with no
    COMPLETED step running again and no two executions of a node overlapping.
    """
    url = database_url(request, backend, tmp_path)
    storage = create_storage(url)
    storage.migrate()
    name = unique(f"rescue_{backend}")
    workdir, events_path, env = prepare(tmp_path, name, 0.05, 0.15, retries=0)
    tracking_ids = enqueue(storage, name, 20, retries=0)
    # A dies inside a step half way through the first steps' starts.
    killed_mid_step, nodes = kill_one_of_two(
        storage, url, spawn, workdir, events_path, env, tracking_ids, 60, after_starts=10
    )
    for e in killed_mid_step:
        node = nodes[(e["tracking_id"], e["step"])]
        rerun = e["attempt"] + 1
        assert (node.attempt, node.max_attempts, node.rescues) == (rerun, rerun, 1), node
    storage.close()


# --------------------------------------------------------------------------- PostgreSQL, MySQL

EXECUTIONS_DDL = sa.MetaData()
EXECUTIONS = sa.Table(
    "executions",
    EXECUTIONS_DDL,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("tracking_id", sa.String(255), nullable=False),
    sa.Column("step", sa.String(50), nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("started_at", sa.Double, nullable=False),
    sa.Column("ended_at", sa.Double),
    sa.UniqueConstraint("tracking_id", "step", "attempt", name="executions_node_attempt"),
)


@pytest.mark.parametrize("backend", ["postgresql", "mysql"])
def test_four_workers_one_sigkilled_one_sigtermed(
    request: pytest.FixtureRequest,
    backend: str,
    tmp_path: Path,
    unique: Callable[[str], str],
    spawn: Callable[..., WorkerProcess],
) -> None:
    """Four worker processes on PostgreSQL/MySQL; one SIGKILLed mid-step, one SIGTERMed mid-run.

    Proves, for 500 flows of 3 steps: every flow completes; no COMPLETED step
    executes again; no node is ever executed by two workers at once (each
    execution inserts (tracking_id, step, attempt) under a unique key, which is
    never hit, and a node's executions ordered by attempt never overlap in
    time); the steps of the killed worker were rescued, and no live worker's;
    the SIGTERMed worker finished the step it was inside (not rescued, not
    re-run) and exited 0, as did the others at the end.
    """
    url = database_url(request, backend, tmp_path)
    storage = create_storage(url)
    storage.migrate()
    engine = sa.create_engine(parse_database_url(url), poolclass=sa.pool.NullPool)
    EXECUTIONS_DDL.create_all(engine)
    name = unique(f"crash_{backend}")
    workdir, events_path, env = prepare(tmp_path, name, 0.005, 0.02, exec_db=url)
    tracking_ids = enqueue(storage, name, 500)
    workers = [spawn(workdir, url, env, *WORKER_ARGS) for _ in range(4)]
    for worker in workers:
        worker.wait_started()
    killed, termed, *others = workers

    steps = len(tracking_ids) * len(STEPS)
    killed_mid_step = freeze_mid_step(killed, events_path, after_starts=steps // 5)
    killed.signal(signal.SIGKILL)
    killed_at = time.time()
    assert killed.wait(10) == -signal.SIGKILL

    # SIGTERM while stopped inside a step: it is delivered on SIGCONT, and the
    # worker must finish that step itself before it exits.
    termed_mid_step = freeze_mid_step(termed, events_path, after_starts=steps * 2 // 5)
    termed.signal(signal.SIGTERM)
    termed.signal(signal.SIGCONT)
    assert termed.wait(10 + 5) == 0, termed.output()[-3000:]
    assert first_unfinished(storage, tracking_ids) < len(tracking_ids), (
        "the SIGTERM came after the work was done: the test proves nothing"
    )

    wait_all_finished(storage, tracking_ids, timeout=90)
    for worker in others:
        worker.signal(signal.SIGTERM)
    for worker in others:
        assert worker.wait(10 + 5) == 0, worker.output()[-3000:]

    events = read_events(events_path)
    duplicates = [e for e in events if e["event"] == "duplicate"]
    assert not duplicates, f"an attempt ran twice: {duplicates[:10]}"
    with engine.connect() as conn:
        rows = conn.execute(sa.select(EXECUTIONS)).all()
    check_no_overlap(rows, killed.pid, killed_at)
    check_no_overlap(executions_from_events(events), killed.pid, killed_at)
    assert len(rows) >= len(tracking_ids) * len(STEPS)
    nodes = check_outcome(storage, tracking_ids, events)
    check_rescued(nodes, killed_mid_step, [termed, *others])
    ended = {
        (e["tracking_id"], e["step"], e["attempt"])
        for e in events
        if e["event"] == "end" and e["pid"] == termed.pid
    }
    for e in termed_mid_step:
        node = nodes[(e["tracking_id"], e["step"])]
        assert (e["tracking_id"], e["step"], e["attempt"]) in ended, e
        assert (node.attempt, node.rescues) == (e["attempt"], 0), (e, node)
    assert worker_pids_of(events) == {w.pid for w in workers}
    engine.dispose()
    storage.close()

"""Health and metrics that mean what they say, and a graceful stop however it is asked.

The backlog gauges on every backend (one worker per queue reports them); real
`flowsmith worker` processes for /readyz while draining, for Ctrl-C through
a pipe whose reader dies with it, and for --metrics-port and --metrics-host.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from flowsmith_worker import Flow, Worker
from flowsmith_worker.storage import create_storage
from flowsmith_worker.storage.base import FlowStatus, NodeStatus, Storage
from flowsmith_worker.storage.sql import SqlStorage, schema
from tests.conftest import eventually
from tests.servers import DatabaseServer
from tests.support.backlog import enqueue_runs
from tests.support.http import free_port, probe
from tests.support.steps import never_here
from tests.worker_process import WorkerProcess

Names = Callable[[str], str]

# The workers' flows: one step that prints to stdout (as steps do), says it started
# (a line in FS_STARTED), then waits until the test creates FS_RELEASE (60 s at most).
FLOWS_MODULE = textwrap.dedent(
    '''
    """Flows for tests/integration/test_worker_health.py."""
    import os
    import time

    from flowsmith_worker import Flow


    def slow(ctx):
        print("charging", ctx.tracking_id)
        with open(os.environ["FS_STARTED"], "a") as started:
            started.write(f"{os.getpid()}\\n")
        deadline = time.monotonic() + 60
        while not os.path.exists(os.environ["FS_RELEASE"]) and time.monotonic() < deadline:
            time.sleep(0.02)
        return "done"


    flow = Flow(os.environ["FS_FLOW_NAME"]).step("slow", slow)
    '''
)


# -- the backlog gauges ------------------------------------------------------------


def _due_since(storage: Storage, tracking_id: str, seconds: float) -> None:
    """Make the run's node runnable ``seconds`` earlier, as if it had waited that long."""
    assert isinstance(storage, SqlStorage)
    nodes = schema.nodes
    flow_ids = sa.select(schema.flows.c.id).where(schema.flows.c.tracking_id == tracking_id)
    with storage.engine.begin() as conn:
        conn.execute(
            sa.update(nodes)
            .where(nodes.c.flow_id.in_(flow_ids))
            .values(run_after=nodes.c.run_after - seconds)
        )


def test_runnable_backlog_counts_each_queue_and_its_oldest(storage: Storage, unique: Names) -> None:
    """runnable_backlog gives, per queue asked, the steps runnable now and how long
    the oldest has waited; a delayed run is not runnable yet, other queues and
    queues with nothing runnable are left out."""
    busy, delayed_only, other = unique("busy"), unique("delayed"), unique("other")
    oldest, *_ = enqueue_runs(storage, busy, 4)
    _due_since(storage, oldest, 120)
    enqueue_runs(storage, delayed_only, 2, delay=3600)
    enqueue_runs(storage, other, 1)
    backlog = storage.runnable_backlog(queues=[busy, delayed_only])
    assert set(backlog) == {busy}
    assert backlog[busy].runnable == 4
    assert 119 < backlog[busy].oldest_age_seconds < 180, backlog


def test_each_queue_backlog_is_reported_by_one_worker(storage: Storage, unique: Names) -> None:
    """Three registered workers with overlapping queues: each queue's backlog gauge
    is reported by exactly one of them, so summed over the workers it is the queue's
    backlog (not twice it), and no queue goes unreported."""
    shared, emails, reports = unique("shared"), unique("emails"), unique("reports")
    for queue, runs in ((shared, 4), (emails, 2), (reports, 1)):
        enqueue_runs(storage, queue, runs)
    workers = [
        Worker(storage, queues=[shared, emails]),
        Worker(storage, queues=[shared]),
        Worker(storage, queues=[reports, shared]),
    ]
    try:
        for worker in workers:
            storage.register_worker(worker=worker.record())
        for worker in workers:
            worker.rescue_once()
        for queue, runs in ((shared, 4), (emails, 2), (reports, 1)):
            values = [
                w.metrics.registry.get_sample_value("flowsmith_runnable_backlog", {"queue": queue})
                for w in workers
            ]
            assert sorted(v for v in values if v is not None) == [runs], (queue, values)
    finally:
        for worker in workers:
            storage.unregister_worker(worker_id=worker.id)


# -- real worker processes -----------------------------------------------------------


class App:
    """A working directory with the flows module, a migrated SQLite database, and
    the workers' environment."""

    def __init__(self, tmp_path: Path, name: str, url: str | None = None) -> None:
        (tmp_path / "healthflows.py").write_text(FLOWS_MODULE)
        self.dir = tmp_path
        self.url = url or f"sqlite:///{tmp_path / 'health.db'}"
        self.started_path = tmp_path / "started.txt"
        self.started_path.touch()
        self.release_path = tmp_path / "release"
        self.env = dict(
            os.environ,
            FS_FLOW_NAME=name,
            FS_STARTED=str(self.started_path),
            FS_RELEASE=str(self.release_path),
        )
        self.storage = create_storage(self.url)
        self.storage.migrate()
        self.flow = Flow(name, storage=self.storage).step("slow", never_here)

    def step_started(self) -> bool:
        return bool(self.started_path.read_text())

    def release_step(self) -> None:
        self.release_path.touch()

    def node(self, tracking_id: str) -> tuple[NodeStatus, str | None]:
        record = self.storage.get_flow(tracking_id=tracking_id)
        assert record is not None
        (node,) = self.storage.list_nodes(flow_id=record.id)
        return node.status, node.lease_owner

    def flow_status(self, tracking_id: str) -> FlowStatus:
        record = self.storage.get_flow(tracking_id=tracking_id)
        assert record is not None
        return record.status


@pytest.fixture
def app(tmp_path: Path, unique: Names) -> Iterator[App]:
    made = App(tmp_path, unique("health"))
    yield made
    made.storage.close()


def test_readyz_fails_from_the_moment_draining_starts_livez_stays_up(app: App) -> None:
    """A worker running a step is ready; after SIGTERM (grace 20 s) it answers
    /readyz 503 "draining" while the step runs on, /livez (and /healthz) 200; the
    step completes and the worker exits 0."""
    port = free_port()
    run = app.flow.run({})
    worker = WorkerProcess(
        app.dir,
        app.url,
        app.env,
        "--metrics-port",
        str(port),
        "--poll-interval",
        "0.1",
        "--shutdown-timeout",
        "20",
        module="healthflows",
    )
    try:
        worker.wait_started()
        eventually(app.step_started, timeout=15)
        eventually(lambda: probe(port, "/readyz") == (200, "ok\n"), timeout=10)
        worker.signal(signal.SIGTERM)
        eventually(lambda: probe(port, "/readyz")[0] == 503, timeout=5)
        assert worker.proc.poll() is None, "the step must still be running"
        assert probe(port, "/readyz")[1].startswith("draining"), worker.output()
        assert probe(port, "/livez") == (200, "ok\n")
        assert probe(port, "/healthz") == (200, "ok\n")
        app.release_step()
        assert worker.wait(30) == 0, worker.output()
    finally:
        worker.cleanup()
    assert app.flow_status(run.tracking_id) == FlowStatus.COMPLETED


@pytest.mark.parametrize(
    ("grace", "left"),
    [("20", NodeStatus.COMPLETED), ("1", NodeStatus.PENDING)],
    ids=["step-finishes", "step-handed-back"],
)
def test_ctrl_c_through_a_pipe_whose_reader_dies_still_stops_gracefully(
    app: App, grace: str, left: NodeStatus
) -> None:
    """`flowsmith worker ... 2>&1 | tee log` and Ctrl-C: SIGINT reaches the whole
    process group, tee dies, and every later log line, and the flush of what the
    step printed (stdout buffered, as without PYTHONUNBUFFERED), meets a broken pipe.
    The worker still exits 0 and unregisters itself; its step finishes within the
    grace period, or is handed back (PENDING, no owner) after it."""
    run = app.flow.run({})
    log_path = app.dir / "tee.log"
    tee = subprocess.Popen(
        ["tee", str(log_path)], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, process_group=0
    )
    assert tee.stdin is not None
    env = {k: v for k, v in app.env.items() if k != "PYTHONUNBUFFERED"}
    options = ["--poll-interval", "0.1", "--shutdown-timeout", grace, "--log-format", "json"]
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "flowsmith_worker",
            "worker",
            "healthflows",
            "--url",
            app.url,
            *options,
        ],
        cwd=app.dir,
        env=env,
        stdout=tee.stdin,
        stderr=subprocess.STDOUT,
        process_group=tee.pid,
    )
    tee.stdin.close()  # the worker holds the pipe's only writing end now
    try:
        eventually(app.step_started, timeout=20)
        os.killpg(tee.pid, signal.SIGINT)  # what the terminal's Ctrl-C does
        assert tee.wait(10) == -signal.SIGINT
        if left == NodeStatus.COMPLETED:
            app.release_step()  # within the grace period
        returncode = worker.wait(30)
    finally:
        for process in (worker, tee):
            if process.poll() is None:
                process.kill()
                process.wait(10)
    assert returncode == 0, log_path.read_text()
    assert "worker.started" in log_path.read_text()
    assert app.storage.list_workers() == []
    status, owner = app.node(run.tracking_id)
    assert status == left and (owner is None) == (left == NodeStatus.PENDING)


def test_readyz_fails_during_a_database_outage_livez_does_not(
    postgres_server: DatabaseServer, tmp_path: Path, unique: Names
) -> None:
    """A worker whose PostgreSQL database stops accepting connections (its sessions
    cut off) answers /readyz 503 "database unavailable" and /livez 200 (a restart
    would not bring the database back); once the database is back, /readyz is 200."""
    name = f"t_{unique('outage')[-12:]}"
    url = postgres_server.create_database(name)
    port = free_port()
    app = App(tmp_path, unique("outage"), url)
    worker = WorkerProcess(
        app.dir,
        url,
        app.env,
        "--metrics-port",
        str(port),
        "--poll-interval",
        "0.1",
        module="healthflows",
    )
    try:
        worker.wait_started()
        eventually(lambda: probe(port, "/readyz") == (200, "ok\n"), timeout=10)
        _accept_connections(postgres_server, name, accept=False)
        eventually(lambda: probe(port, "/readyz")[0] == 503, timeout=20)
        assert "database unavailable" in probe(port, "/readyz")[1]
        assert probe(port, "/livez") == (200, "ok\n")
        _accept_connections(postgres_server, name, accept=True)
        eventually(lambda: probe(port, "/readyz") == (200, "ok\n"), timeout=30)
        worker.signal()
        assert worker.wait(30) == 0, worker.output()
    finally:
        worker.cleanup()
        app.storage.close()
        postgres_server.drop_database(name)


def _accept_connections(server: DatabaseServer, name: str, *, accept: bool) -> None:
    """Let clients connect to database ``name``, or refuse them and cut off those in."""
    with server.admin_engine().connect() as conn:
        conn.execute(sa.text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {str(accept).lower()}'))
        if not accept:
            conn.execute(
                sa.text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"
                ),
                {"n": name},
            )


def test_worker_serves_metrics_and_healthz(tmp_path: Path, unique: Names) -> None:
    """A real `flowsmith worker --metrics-port` counts the steps it ran and reports healthy,
    on 127.0.0.1 only by default (another address of this machine, 127.0.0.2, is refused)."""
    url = f"sqlite:///{tmp_path / 'm.db'}"
    storage = create_storage(url)
    storage.migrate()
    name = unique("metered")
    (tmp_path / "meteredflows.py").write_text(
        "from flowsmith_worker import Flow\n"
        f"flow = Flow({name!r}).step('one', lambda ctx: 1).step('two', lambda ctx: 2)\n"
    )
    flow = Flow(name, storage=storage).step("one", lambda ctx: 1).step("two", lambda ctx: 2)
    for i in range(3):
        flow.run({}, tracking_id=f"{name}-{i}")
    port = free_port()
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "flowsmith_worker",
            "worker",
            "meteredflows",
            "--url",
            url,
            "--metrics-port",
            str(port),
            "--poll-interval",
            "0.05",
            "--log-format",
            "json",
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        eventually(lambda: probe(port, "/healthz")[0] == 200, timeout=20)
        line = f'flowsmith_steps_completed_total{{flow="{name}",queue="default",step="two"}} 3.0'
        eventually(lambda: line in probe(port, "/metrics")[1], timeout=20)
        assert "flowsmith_step_duration_seconds_bucket" in probe(port, "/metrics")[1]
        assert probe(port, "/healthz", host="127.0.0.2")[0] == 0
    finally:
        worker.terminate()
        worker.wait(30)
    assert worker.returncode == 0


def test_worker_metrics_host_option_opens_every_interface(tmp_path: Path) -> None:
    """`flowsmith worker --metrics-host 0.0.0.0` (what a container needs) answers
    /healthz on another address of this machine too."""
    url = f"sqlite:///{tmp_path / 'h.db'}"
    storage = create_storage(url)
    storage.migrate()
    storage.close()
    (tmp_path / "noflows.py").write_text("")
    port = free_port()
    command = ["worker", "noflows", "--url", url, "--metrics-port", str(port)]
    worker = subprocess.Popen(
        [sys.executable, "-m", "flowsmith_worker", *command, "--metrics-host", "0.0.0.0"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        eventually(lambda: probe(port, "/healthz", host="127.0.0.2")[0] == 200, timeout=20)
    finally:
        worker.terminate()
        worker.wait(30)
    assert worker.returncode == 0

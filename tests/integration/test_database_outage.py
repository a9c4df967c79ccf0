"""The database goes away under a running `flowsmith worker` process, and comes back.

Real PostgreSQL and MariaDB servers, real worker processes, steps long enough
that the outage hits them mid-step. Two outages per server:

- a crash and restart: PostgreSQL's immediate shutdown (what ``pg_ctl restart
  -m immediate`` sends: SIGQUIT, no checkpoint, crash recovery at start),
  MariaDB SIGKILLed. Shorter than the lease: the steps in flight keep their
  leases, their outcomes are written once the server is back, and no step runs
  twice.
- an outage longer than the lease: the server stopped for the lease and a few
  seconds. The steps in flight end meanwhile and their outcomes cannot be
  written; their leases lapse, so the worker writes nothing for them (another
  worker may already run them), and once the server is back the watchdog
  rescues their nodes: each runs again, as a second attempt, the first
  recorded RESCUED. What had committed before the outage never runs again.

In both, the worker process lives on (no restart), /readyz says 503 naming the
database (never its password) for as long as it is away and 200 after, and the log says
what happened once per part of the worker, not once per poll.

SQLite has no server to lose. Its nearest equivalent, the file's write lock
held by another process for longer than the lease, is a wait, not an error:
the worker's transactions wait in SQLite's busy handler (up to 30 s) and go on
when the lock is released; the last test shows that nothing is lost then.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import textwrap
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import sqlalchemy as sa

from flowsmith_worker import Flow
from flowsmith_worker.storage import create_storage
from flowsmith_worker.storage.base import AttemptOutcome, NodeStatus, Storage
from flowsmith_worker.worker import Worker
from tests.conftest import eventually
from tests.servers import DatabaseServer, LocalServer, require_restart
from tests.worker_process import WorkerProcess

pytestmark = pytest.mark.slow
T = TypeVar("T")

STEPS = ("first", "second")
STEP_SECONDS = 2.0
CONCURRENCY = 4
# What the parts of the worker say when the database goes away: once each.
OUTAGE_EVENTS = ("database.unavailable", "heartbeat.failed", "listen.lost")

FLOWS_MODULE = textwrap.dedent(
    '''
    """Flows for tests/integration/test_database_outage.py: each step notes its start and end."""
    import json
    import os
    import time

    from flowsmith_worker import Flow

    _fd = os.open(os.environ["FS_EVENTS"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)


    def _note(ctx, event):
        line = {"tracking_id": ctx.tracking_id, "step": ctx.step, "attempt": ctx.attempt,
                "event": event, "t": time.time()}
        os.write(_fd, (json.dumps(line) + "\\n").encode())  # one write: lines never interleave


    def _step(ctx):
        _note(ctx, "start")
        time.sleep(float(os.environ["FS_STEP_SECONDS"]))
        _note(ctx, "end")
        return ctx.step


    flow = Flow(os.environ["FS_FLOW_NAME"])
    for _name in ("first", "second"):
        flow.step(_name, _step, retries=3, backoff=0.1)
    '''
)


@dataclass
class Outage:
    """One test's database, flow, worker process and what its steps noted."""

    url: str
    storage: Storage
    flow: Flow
    workdir: Path
    events: Path
    env: dict[str, str]
    port: int
    # The server the test takes away (None for SQLite).
    database_server: LocalServer | None = None

    @property
    def server(self) -> LocalServer:
        assert self.database_server is not None, "SQLite has no server"
        return self.database_server

    def start_worker(self, lease: float) -> WorkerProcess:
        worker = WorkerProcess(
            self.workdir,
            self.url,
            self.env,
            "--lease",
            str(lease),
            "--poll-interval",
            "0.2",
            "--concurrency",
            str(CONCURRENCY),
            "--metrics-port",
            str(self.port),
            module="outageflows",
        )
        worker.wait_started()
        return worker

    def noted(self) -> list[dict[str, Any]]:
        """What the steps noted, complete lines only."""
        *complete, _partial = self.events.read_text().split("\n")
        return [json.loads(line) for line in complete]

    def started(self) -> Counter[tuple[str, str]]:
        """How many times each (run, step) started."""
        return Counter((e["tracking_id"], e["step"]) for e in self.noted() if e["event"] == "start")

    def running(self) -> set[tuple[str, str]]:
        """The (run, step) pairs started and not ended."""
        open_: set[tuple[str, str]] = set()
        for event in self.noted():
            key = (event["tracking_id"], event["step"])
            (open_.add if event["event"] == "start" else open_.discard)(key)
        return open_

    def readyz(self) -> tuple[int, str]:
        return _probe(self.port, "/readyz")


@pytest.fixture(params=["postgresql", "mysql"])
def outage(
    request: pytest.FixtureRequest, tmp_path: Path, unique: Callable[[str], str]
) -> Iterator[Outage]:
    """A fresh migrated database on the session's server (which the test may stop)."""
    server: DatabaseServer = request.getfixturevalue(
        "postgres_server" if request.param == "postgresql" else "mysql_server"
    )
    require_restart(server)
    assert isinstance(server, LocalServer)
    name = f"t_{unique('o')[-12:]}"
    url = server.create_database(name)
    _durable_commits(server, name)
    prepared = _prepare(tmp_path, unique, url, server)
    yield prepared
    if not server.is_running():
        server.start()  # a failed test must not leave the session's server down
    if server.kind == "mysql" and server.fast:
        # Fast again for the tests after this one (a start sets it; a failed test may not).
        with server.admin_engine().connect() as conn:
            conn.execute(sa.text("SET GLOBAL innodb_flush_log_at_trx_commit = 0"))
    prepared.storage.close()
    server.drop_database(name)


def _prepare(
    tmp_path: Path, unique: Callable[[str], str], url: str, server: LocalServer | None
) -> Outage:
    """The migrated database at ``url``, the flows module, the steps' events file."""
    storage = create_storage(url)
    storage.migrate()
    workdir = tmp_path / "app"
    workdir.mkdir()
    (workdir / "outageflows.py").write_text(FLOWS_MODULE)
    events = tmp_path / "events.jsonl"
    events.touch()
    flow_name = unique("outage")
    env = dict(
        os.environ,
        FS_FLOW_NAME=flow_name,
        FS_EVENTS=str(events),
        FS_STEP_SECONDS=str(STEP_SECONDS),
        PYTHONUNBUFFERED="1",
    )
    flow = Flow(flow_name, storage=storage)
    for step in STEPS:
        flow.step(step, _never_here, retries=3)
    return Outage(url, storage, flow, workdir, events, env, _free_port(), server)


def _never_here(_ctx: Any) -> None:
    raise AssertionError("steps run in the worker process, not in the test")


def test_a_worker_rides_out_a_crash_and_restart_of_its_database(outage: Outage) -> None:
    """PostgreSQL restarted in immediate mode, MariaDB SIGKILLed and restarted, while
    four steps run: the worker process lives on, writes their outcomes once the
    server is back, and every step of every run ran exactly once (the lease, 30 s,
    outlasts the restart; the server commits durably, see _durable_commits). /readyz
    is 200 again afterwards; nothing about the outage is said more than once."""
    runs = [outage.flow.run({}, tracking_id=f"crash-{i}") for i in range(2 * CONCURRENCY)]
    worker = outage.start_worker(lease=30)
    try:
        eventually(lambda: len(outage.running()) == CONCURRENCY, timeout=30)
        in_flight = outage.running()
        crash_and_restart(outage.server)
        for run in runs:
            assert run.wait(timeout=90) is not None
        assert worker.proc.poll() is None, "the worker must survive without a restart"
        eventually(lambda: outage.readyz() == (200, "ok\n"), timeout=30)
        worker.signal(signal.SIGTERM)
        assert worker.wait(30) == 0, worker.output()
    finally:
        worker.cleanup()
    assert in_flight <= set(outage.started())
    assert set(outage.started().values()) == {1}, f"a step ran twice: {outage.started()}"
    for run in runs:
        for node in run.trace():
            assert (node.status, node.attempt, node.rescues) == (NodeStatus.COMPLETED, 1, 0)
    _assert_said_once(worker)


def test_a_worker_rides_out_an_outage_longer_than_the_lease(outage: Outage) -> None:
    """The server stopped for the lease (3 s) and 4 s more while four steps run:
    /readyz answers 503 naming the database (not its password) meanwhile, /livez
    200. The steps end during the outage; their outcomes are never written (the
    leases lapsed), and once the server is back their nodes are rescued and run
    again as attempt 2, the first RESCUED. No step that had completed ran again,
    every run completes, and the worker process lives on."""
    lease = 3.0
    runs = [outage.flow.run({}, tracking_id=f"long-{i}") for i in range(2 * CONCURRENCY)]
    worker = outage.start_worker(lease=lease)
    try:
        eventually(lambda: len(outage.running()) == CONCURRENCY, timeout=30)
        in_flight = outage.running()
        outage.server.stop()
        eventually(lambda: outage.readyz()[0] == 503, timeout=15)
        why = outage.readyz()[1]
        assert "database" in why and str(outage.server.port) in why, why
        assert "flowsmith-secret" not in why
        assert _probe(outage.port, "/livez") == (200, "ok\n")
        # Not ready for the whole outage, though the loop's turns with every slot
        # taken ask the database nothing (and so meet no error).
        answers = _sample(outage.readyz, seconds=lease + 4.0 - STEP_SECONDS)
        assert {status for status, _why in answers} == {503}, answers
        assert not outage.running(), "the steps in flight must have ended during the outage"
        outage.server.start()
        for run in runs:
            assert run.wait(timeout=90) is not None
        assert worker.proc.poll() is None, "the worker must survive without a restart"
        eventually(lambda: outage.readyz() == (200, "ok\n"), timeout=30)
        worker.signal(signal.SIGTERM)
        assert worker.wait(30) == 0, worker.output()
    finally:
        worker.cleanup()
    started = outage.started()
    assert {key for key, count in started.items() if count > 1} == in_flight, started
    for run in runs:
        for node in run.trace():
            assert node.status == NodeStatus.COMPLETED
            if (run.tracking_id, node.step_name) in in_flight:
                outcomes = [a.outcome for a in node.attempts]
                assert outcomes == [AttemptOutcome.RESCUED, AttemptOutcome.COMPLETED]
            else:
                assert (node.attempt, node.rescues) == (1, 0)
    said = _assert_said_once(worker)
    assert said["database.unavailable"] == said["database.reconnected"] == 1, said


def test_a_worker_rides_out_its_sqlite_file_locked_for_longer_than_the_lease(
    tmp_path: Path, unique: Callable[[str], str]
) -> None:
    """SQLite's nearest to the database going away: another process holds the
    file's write lock (BEGIN EXCLUSIVE) for the lease (3 s) and 3 s more while
    four steps run. The worker's transactions wait for it (SQLite's busy handler)
    instead of failing; once it is released every run completes, each step in
    flight then is written or rescued and run again (whichever got the lock
    first), and the worker process lives on. No other step runs twice: the next
    steps their writes chained, leased longer ago than a lease by then, are
    handed back (RELEASED, not run) rather than run to have their outcome withheld."""
    path = tmp_path / "locked.db"
    outage = _prepare(tmp_path, unique, f"sqlite:///{path}", None)
    runs = [outage.flow.run({}, tracking_id=f"lock-{i}") for i in range(2 * CONCURRENCY)]
    worker = outage.start_worker(lease=3)
    try:
        eventually(lambda: len(outage.running()) == CONCURRENCY, timeout=30)
        in_flight = outage.running()
        locker = sqlite3.connect(path, isolation_level=None)
        locker.execute("BEGIN EXCLUSIVE")
        time.sleep(6.0)
        locker.rollback()
        locker.close()
        for run in runs:
            assert run.wait(timeout=90) is not None
        assert worker.proc.poll() is None, "the worker must survive without a restart"
        worker.signal(signal.SIGTERM)
        assert worker.wait(30) == 0, worker.output()
    finally:
        worker.cleanup()
        outage.storage.close()
    started = outage.started()
    assert {key for key, count in started.items() if count > 1} <= in_flight, started
    for run in runs:
        for node in run.trace():
            outcomes = [a.outcome for a in node.attempts]
            assert outcomes[-1] == AttemptOutcome.COMPLETED, (run.tracking_id, node.step_name)
            ran = [o for o in outcomes if o != AttemptOutcome.RELEASED]
            assert started[(run.tracking_id, node.step_name)] == len(ran)


def test_a_worker_stays_unready_for_a_whole_outage_with_every_slot_busy(
    postgres_server: DatabaseServer, unique: Callable[[str], str]
) -> None:
    """With its one slot running a step, most turns of the loop ask the database
    nothing (no claim, no rescue due) and so meet no error; they must not count as
    the database answering. From the first failure to the server's return the
    worker stays unready (sampled for 3 s); then it is ready again, and the step,
    which ran through the outage, is written as attempt 1 (the outage was shorter
    than the lease). PostgreSQL only: what is tested is the worker's bookkeeping."""
    require_restart(postgres_server)
    name = f"t_{unique('b')[-12:]}"
    storage = create_storage(postgres_server.create_database(name))
    storage.migrate()
    release = threading.Event()
    flow = Flow(unique("busy"), storage=storage).step("hold", lambda ctx: release.wait(60))
    run = flow.run({})
    worker = Worker(storage, concurrency=1, poll_interval=0.05, lease_seconds=20)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        eventually(lambda: worker.in_flight(), timeout=20)
        postgres_server.stop()
        eventually(lambda: not worker.health.readiness()[0], timeout=20)
        answers = _sample(worker.health.readiness, seconds=3.0)
        assert not any(ready for ready, _why in answers), answers
        postgres_server.start()
        eventually(lambda: worker.health.readiness() == (True, "ok"), timeout=30)
        release.set()
        run.wait(timeout=30)
    finally:
        release.set()
        if not postgres_server.is_running():
            postgres_server.start()
        worker.stop()
        thread.join(30)
    assert [(n.status, n.attempt) for n in run.trace()] == [(NodeStatus.COMPLETED, 1)]
    storage.close()
    postgres_server.drop_database(name)


def crash_and_restart(server: LocalServer) -> None:
    """Crash the server as a power cut would, then start it on the same data.

    PostgreSQL: SIGQUIT to the postmaster, its immediate shutdown (what
    ``pg_ctl stop -m immediate`` sends): sessions killed at once, no
    checkpoint, crash recovery at the next start. MariaDB: SIGKILL.
    """
    pid = server._pid()
    assert pid is not None
    server._before_stop()  # tests/servers/'s own background work, not the worker's
    server._dispose_engine()
    os.kill(pid, signal.SIGQUIT if server.kind == "postgresql" else signal.SIGKILL)
    assert server._wait_exit(pid, 30), f"{server.kind} did not die"
    server._proc = None
    server.start()


def _durable_commits(server: DatabaseServer, name: str) -> None:
    """Make the commits on database ``name`` survive a crash of the server.

    The test servers trade durability for speed (synchronous_commit=off,
    innodb_flush_log_at_trx_commit=0): a crash then loses the last commits,
    claims and outcomes included, and a step whose completion was lost runs
    again. No worker can prevent that; production servers commit durably.
    PostgreSQL: for this database only. MariaDB: the whole server, until its
    next start (its command line sets the fast value again).
    """
    with server.admin_engine().connect() as conn:
        if server.kind == "postgresql":
            conn.execute(sa.text(f'ALTER DATABASE "{name}" SET synchronous_commit = on'))
        else:
            conn.execute(sa.text("SET GLOBAL innodb_flush_log_at_trx_commit = 1"))


def _assert_said_once(worker: WorkerProcess) -> Counter[str]:
    """Each part of the worker said at most once that the database was away (not once
    per poll or per retry); return how often each event was said."""
    said = Counter(line["event"] for line in worker.log_lines())
    repeated = {event: said[event] for event in OUTAGE_EVENTS if said[event] > 1}
    assert not repeated, f"said more than once: {repeated}"
    return said


def _sample(probe: Callable[[], T], seconds: float) -> list[T]:
    """``probe``'s answers, every 0.1 s for ``seconds``."""
    deadline = time.monotonic() + seconds
    answers: list[T] = []
    while time.monotonic() < deadline:
        answers.append(probe())
        time.sleep(0.1)
    return answers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _probe(port: int, path: str) -> tuple[int, str]:
    """The status and body of GET path; (0, "") while nothing listens."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
    except (urllib.error.URLError, ConnectionError):
        return 0, ""

"""The `flowsmith` command line: migrate, worker start-up errors, signals, logs.

click's CliRunner where no process is needed; real `flowsmith worker`
subprocesses (with the flows module in their working directory) where signals,
exit codes or the process's own output matter. `flowsmith worker` configures
logging for its whole process, so it always runs in a subprocess here.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click
import pytest
import sqlalchemy as sa
from click.testing import CliRunner, Result

from flowsmith_worker import Flow, SchemaNotMigrated
from flowsmith_worker.cli import main
from flowsmith_worker.storage import create_storage
from flowsmith_worker.storage.base import FlowStatus, NodeStatus, Storage
from flowsmith_worker.storage.sql import schema
from tests.conftest import database_url, eventually
from tests.support.schema import ALL_VERSIONS, FS_TABLES, engine_for, schema_versions, table_names
from tests.support.steps import never_here
from tests.worker_process import WorkerProcess

pytestmark = pytest.mark.slow

# The brief named fs_flows, fs_nodes and fs_schema_version; later migrations may add
# more tables, all of them fs_*, all of them declared in storage/sql/schema.py.
FS_CORE_TABLES = {"fs_flows", "fs_nodes", "fs_schema_version"}

FLOWS_MODULE = textwrap.dedent(
    '''
    """Flows for tests/integration/test_cli.py."""
    import json
    import os
    import time

    from flowsmith_worker import Flow

    _fd = os.open(os.environ["FS_EXEC_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)


    def _record(ctx, event):
        line = json.dumps({"tracking_id": ctx.tracking_id, "step": ctx.step,
                           "attempt": ctx.attempt, "pid": os.getpid(), "event": event,
                           "t": time.time()})
        os.write(_fd, (line + "\\n").encode())


    def slow(ctx):
        _record(ctx, "start")
        time.sleep(float(os.environ.get("FS_STEP_SECONDS", "0.05")))
        _record(ctx, "end")
        return {"pid": os.getpid()}


    def flaky(ctx):
        if ctx.attempt == 1:
            raise RuntimeError("flaky: first attempt fails")
        return "ok"


    def doomed(ctx):
        raise RuntimeError("doomed: every attempt fails")


    def interrupted(ctx):
        if ctx.attempt == 1:
            raise KeyboardInterrupt("raised by the step itself")
        if ctx.attempt == 2:
            raise SystemExit(3)
        return "third attempt"


    def exits(ctx):
        os._exit(0)


    def big(ctx):
        return "b" * 5000


    NAME = os.environ["FS_FLOW_NAME"]
    slow_flow = Flow(NAME).step("slow", slow)
    interrupted_flow = Flow(NAME + "_interrupted").step(
        "interrupted", interrupted, retries=2, backoff=0)
    exits_flow = Flow(NAME + "_exits").step("exits", exits)
    big_flow = Flow(NAME + "_big").step("big", big, retries=2)
    logged_flow = Flow(NAME + "_logged").step("first", slow).step(
        "flaky", flaky, retries=1, backoff=0.05)
    doomed_flow = Flow(NAME + "_doomed").step("doomed", doomed)
    '''
)


# --------------------------------------------------------------------------- helpers


def invoke(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def assert_clean_failure(result: Result) -> None:
    """Non-zero exit through click's error path: a message, not a traceback."""
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), result.exc_info
    assert "Traceback" not in result.output, result.output


def flowsmith(
    *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flowsmith_worker", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


class App:
    """A working directory with the flows module, a database and the workers' env."""

    def __init__(self, tmp_path: Path, url: str, flow_name: str) -> None:
        self.dir = tmp_path / "app"
        self.dir.mkdir()
        (self.dir / "cliflows.py").write_text(FLOWS_MODULE)
        self.events_path = tmp_path / "events.jsonl"
        self.events_path.touch()
        self.url = url
        self.name = flow_name
        self.env = dict(os.environ, FS_FLOW_NAME=flow_name, FS_EXEC_LOG=str(self.events_path))
        self.storage: Storage = create_storage(url)
        self.storage.migrate()
        self.workers: list[WorkerProcess] = []

    def worker(
        self, *args: str, step_seconds: float = 0.05, module: str = "cliflows"
    ) -> WorkerProcess:
        env = dict(self.env, FS_STEP_SECONDS=str(step_seconds))
        self.workers.append(WorkerProcess(self.dir, self.url, env, *args, module=module))
        return self.workers[-1]

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.events_path.read_text().splitlines() if line]

    def started(self, pid: int) -> list[dict[str, Any]]:
        return [e for e in self.events() if e["pid"] == pid and e["event"] == "start"]

    def node(self, tracking_id: str, step: str) -> Any:
        record = self.storage.get_flow(tracking_id=tracking_id)
        assert record is not None
        return next(n for n in self.storage.list_nodes(flow_id=record.id) if n.step_name == step)

    def flow_status(self, tracking_id: str) -> FlowStatus:
        record = self.storage.get_flow(tracking_id=tracking_id)
        assert record is not None
        return record.status

    def close(self) -> None:
        for worker in self.workers:
            worker.cleanup()
        self.storage.close()


@pytest.fixture
def sqlite_app(tmp_path: Path, unique: Callable[[str], str]) -> Iterator[App]:
    app = App(tmp_path, f"sqlite:///{tmp_path / 'app.db'}", unique("cli"))
    yield app
    app.close()


def mirror(name: str, storage: Storage, *steps: tuple[str, int]) -> Flow:
    """The flow of the workers' module, as far as enqueueing needs: names and retries."""
    flow = Flow(name, storage=storage)
    for step, retries in steps:
        flow.step(step, never_here, retries=retries)
    return flow


# --------------------------------------------------------------------------- migrate


def test_migrate_creates_only_fs_tables_and_is_repeatable(sql_url: str) -> None:
    """`flowsmith migrate --url` adds fs_flows, fs_nodes, fs_schema_version and no table
    that is not an fs_* table of the schema.

    A user table that was there before keeps its columns and rows; a second
    run succeeds and records nothing new.
    """
    assert FS_CORE_TABLES <= FS_TABLES and all(t.startswith("fs_") for t in FS_TABLES)
    engine = engine_for(sql_url)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE orders (id INTEGER PRIMARY KEY, note VARCHAR(50))"))
        conn.execute(sa.text("INSERT INTO orders (id, note) VALUES (1, 'keep me')"))
    before = table_names(sql_url)
    columns_before = [c["name"] for c in sa.inspect(engine).get_columns("orders")]

    first = invoke("migrate", "--url", sql_url)
    assert first.exit_code == 0, first.output
    assert f"version {schema.SCHEMA_VERSION}" in first.output
    assert table_names(sql_url) - before == FS_TABLES
    assert before <= table_names(sql_url)

    second = invoke("migrate", "--url", sql_url)
    assert second.exit_code == 0, second.output
    password = sa.make_url(sql_url).password
    if password:
        assert password not in first.output + second.output
    assert table_names(sql_url) - before == FS_TABLES
    assert schema_versions(sql_url) == ALL_VERSIONS
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT id, note FROM orders")).all() == [(1, "keep me")]
    assert [c["name"] for c in sa.inspect(engine).get_columns("orders")] == columns_before
    engine.dispose()


# --------------------------------------------------------------------------- before migrating


def test_flow_run_before_migrate_says_run_migrate(
    sql_url: str, unique: Callable[[str], str]
) -> None:
    """flow.run on an unmigrated database raises SchemaNotMigrated naming `flowsmith migrate`."""
    storage = create_storage(sql_url)
    flow = mirror(unique("early"), storage, ("only", 0))
    with pytest.raises(SchemaNotMigrated, match="flowsmith migrate") as caught:
        flow.run({"x": 1})
    password = sa.make_url(sql_url).password
    if password:
        assert password not in str(caught.value)
    storage.close()


def test_worker_before_migrate_exits_with_a_message(sql_url: str, tmp_path: Path) -> None:
    """`flowsmith worker` on an unmigrated database exits non-zero saying `flowsmith migrate`."""
    (tmp_path / "emptyflows.py").write_text("")
    done = flowsmith("worker", "emptyflows", "--url", sql_url, cwd=tmp_path, timeout=30)
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert "flowsmith migrate" in output
    assert "Traceback" not in output
    password = sa.make_url(sql_url).password
    if password:
        assert password not in output
    assert not FS_TABLES & table_names(sql_url), "the worker must not create the tables itself"


# --------------------------------------------------------------------------- bad URLs and modules

BAD_URLS = {
    "refused-postgresql": ("postgresql://bob:hunter2@127.0.0.1:1/x", "127.0.0.1"),
    "refused-mysql": ("mysql://bob:hunter2@127.0.0.1:1/x", "127.0.0.1"),
    "garbage": ("this is not a url", "cannot parse database URL"),
    "garbage-with-password": ("postgresql://bob:hunter2@db:port/x", "cannot parse database URL"),
    "unsupported-scheme": ("oracle://bob:hunter2@db.example.com/x", "unsupported database"),
    # The driver refuses the option when connecting (psycopg2: ProgrammingError
    # "invalid dsn"; mysql-connector: AttributeError).
    "unknown-option-postgresql": ("postgresql://bob:hunter2@127.0.0.1:1/x?bogus=1", "bogus"),
    "unknown-option-mysql": ("mysql://bob:hunter2@127.0.0.1:1/x?bogus=1", "bogus"),
    # SQLAlchemy's sqlite dialect refuses it when the engine is created.
    "malformed-sqlite": ("sqlite://bob:hunter2@/x.db", "sqlite"),
    # libpq takes the password from the query too; hide_password only hides user:pass@.
    "password-in-query": ("postgresql://bob@127.0.0.1:1/x?password=hunter2", "127.0.0.1"),
}


@pytest.mark.parametrize("url, expected", BAD_URLS.values(), ids=BAD_URLS.keys())
def test_migrate_bad_url_fails_fast_without_password(url: str, expected: str) -> None:
    """`flowsmith migrate` with a bad URL: a clear one-line error, no password, no traceback."""
    started = time.monotonic()
    result = invoke("migrate", "--url", url)
    assert time.monotonic() - started < 10
    assert_clean_failure(result)
    assert expected in result.output
    assert "hunter2" not in result.output


WORKER_BAD_URLS = [
    "refused-postgresql",
    "garbage-with-password",
    "unsupported-scheme",
    "unknown-option-mysql",
    "password-in-query",
]


@pytest.mark.parametrize(
    "url, expected", [BAD_URLS[k] for k in WORKER_BAD_URLS], ids=WORKER_BAD_URLS
)
def test_worker_bad_url_fails_fast_without_password(
    url: str, expected: str, tmp_path: Path
) -> None:
    """`flowsmith worker` with a bad URL exits non-zero at once: no password, no traceback."""
    (tmp_path / "emptyflows.py").write_text("")
    started = time.monotonic()
    done = flowsmith("worker", "emptyflows", "--url", url, cwd=tmp_path, timeout=30)
    output = done.stdout + done.stderr
    assert time.monotonic() - started < 15, output
    assert done.returncode != 0, output
    assert expected in output
    assert "hunter2" not in output
    assert "Traceback" not in output


def test_worker_nonexistent_module_cannot_import(tmp_path: Path) -> None:
    """`flowsmith worker nonexistent_module` says it cannot import the module."""
    url = f"sqlite:///{tmp_path / 'x.db'}"
    done = flowsmith("worker", "nonexistent_module_xyz", "--url", url, cwd=tmp_path, timeout=30)
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert "cannot import module 'nonexistent_module_xyz'" in output
    assert "Traceback" not in output


# --------------------------------------------------------------------------- configuration


WORKER_ENVIRONMENT = {
    "FLOWSMITH_CONCURRENCY": ("7", "concurrency", 7),
    "FLOWSMITH_POLL_INTERVAL": ("0.5", "poll_interval", 0.5),
    "FLOWSMITH_LEASE": ("45", "lease_seconds", 45.0),
    "FLOWSMITH_QUEUE": ("emails, default", "queues", ("emails", "default")),
    "FLOWSMITH_SHUTDOWN_TIMEOUT": ("12", "shutdown_timeout", 12.0),
    "FLOWSMITH_NO_LISTEN": ("1", "no_listen", True),
    "FLOWSMITH_METRICS_PORT": ("9100", "metrics_port", 9100),
    "FLOWSMITH_METRICS_HOST": ("0.0.0.0", "metrics_host", "0.0.0.0"),
    "FLOWSMITH_MAX_PAYLOAD_BYTES": ("4096", "max_payload_bytes", 4096),
    "FLOWSMITH_LOG_FORMAT": ("json", "log_format", "json"),
    "FLOWSMITH_MODULES": ("app.flows app.billing", "modules", ("app.flows", "app.billing")),
}


def test_every_worker_option_also_comes_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each `flowsmith worker` option (and MODULES) is read from FLOWSMITH_<OPTION> when
    the command line does not give it, and --help names the variable of every option,
    those added later included; the command line wins over the environment."""
    command = main.commands["worker"]
    help_text = invoke("worker", "--help").output
    options = [p for p in command.params if isinstance(p, click.Option) and p.name != "url"]
    for option in options:
        assert isinstance(option.envvar, str) and option.envvar.startswith("FLOWSMITH_")
        assert option.envvar in help_text, option.name
    for name, (value, _, _) in WORKER_ENVIRONMENT.items():
        monkeypatch.setenv(name, value)
    params = command.make_context("worker", []).params
    assert {param: params[param] for _, param, _ in WORKER_ENVIRONMENT.values()} == {
        param: parsed for _, param, parsed in WORKER_ENVIRONMENT.values()
    }
    given = command.make_context("worker", ["mine", "--concurrency", "3", "--queue", "a"]).params
    assert (given["modules"], given["concurrency"], given["queues"]) == (("mine",), 3, ("a",))


def test_queue_takes_names_separated_by_commas_and_refuses_an_empty_one() -> None:
    """--queue a,b is two queues, and may be repeated (duplicates once); an empty name
    or one too long for the database is a usage error naming the option."""
    command = main.commands["worker"]
    args = ["m", "--queue", "a,b", "--queue", "c", "--queue", "a"]
    assert command.make_context("worker", args).params["queues"] == ("a", "b", "c")
    for bad, says in [
        ("a,,b", "empty queue name"),
        (",", "empty queue name"),
        ("", "empty"),
        ("q" * 101, "the limit is 100"),
    ]:
        result = invoke("worker", "m", "--queue", bad)
        assert result.exit_code == 2, result.output
        assert "--queue" in result.output and says in result.output, result.output


def test_a_worker_configured_from_the_environment_alone(sqlite_app: App) -> None:
    """A real `flowsmith worker` with FLOWSMITH_QUEUE=alpha,default and
    FLOWSMITH_CONCURRENCY=3 registers with those two queues and that concurrency, and runs
    a run of the default queue; FLOWSMITH_MODULES names the modules to import."""
    app = sqlite_app
    env = dict(app.env, FLOWSMITH_QUEUE="alpha,default", FLOWSMITH_CONCURRENCY="3")
    worker = WorkerProcess(app.dir, app.url, env, module="cliflows")
    app.workers.append(worker)
    worker.wait_started()
    [registered] = app.storage.list_workers()
    assert (registered.queues, registered.concurrency) == (("alpha", "default"), 3)
    run = mirror(app.name, app.storage, ("slow", 0)).run({})
    eventually(lambda: app.flow_status(run.tracking_id) == FlowStatus.COMPLETED, timeout=20)
    worker.signal()
    assert worker.wait(15) == 0, worker.output()

    env = dict(app.env, FLOWSMITH_MODULES="no_such_module_from_env")
    done = flowsmith("worker", "--url", app.url, cwd=app.dir, env=env, timeout=30)
    assert done.returncode == 1, done.stderr
    assert "cannot import module 'no_such_module_from_env'" in done.stderr


# Python leaves SIGINT ignored in a process started with it ignored (a background job
# of a script, as CI runs us): the child installs the usual Ctrl-C handler itself.
RUN_WITH_CTRL_C = (
    "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "runpy.run_module('flowsmith_worker', run_name='__main__')"
)


def test_ctrl_c_ends_status_watch_quietly(sqlite_app: App) -> None:
    """SIGINT (Ctrl-C) to a real `flowsmith status --watch` of a pending run ends it with
    exit code 130 and nothing on stderr: no traceback, no "Aborted!"."""
    run = mirror(sqlite_app.name, sqlite_app.storage, ("slow", 0)).run({})
    command = ["status", run.tracking_id, "--watch", "--url", sqlite_app.url]
    watch = subprocess.Popen(
        [sys.executable, "-c", RUN_WITH_CTRL_C, *command],
        cwd=sqlite_app.dir,
        env=dict(sqlite_app.env, PYTHONUNBUFFERED="1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert watch.stdout is not None
        assert watch.stdout.readline().startswith("Run "), "the run is shown first"
        watch.send_signal(signal.SIGINT)
        _, stderr = watch.communicate(timeout=15)
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.wait(10)
    assert watch.returncode == 130, stderr
    assert stderr == ""


# --------------------------------------------------------------------------- signals


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stop_signal_idle_worker_exits_zero_promptly(sqlite_app: App, sig: signal.Signals) -> None:
    """SIGTERM (or SIGINT) wakes an idle worker at once (even with a 5 s poll); it exits 0."""
    worker = sqlite_app.worker("--poll-interval", "5")
    worker.wait_started()
    time.sleep(0.3)  # in its idle sleep by now
    sent = worker.signal(sig)
    assert worker.wait(10) == 0, worker.output()
    assert time.monotonic() - sent < 2.0, worker.output()


def test_sigterm_lets_the_running_step_finish(sqlite_app: App) -> None:
    """SIGTERM during a 3 s step, grace 10 s: the step finishes, commits, and the worker exits 0.

    With a 1 s lease and a second worker watching, the step's lease is kept
    alive while the worker waits to stop: it is not rescued, and runs once.
    """
    app = sqlite_app
    run = mirror(app.name, app.storage, ("slow", 3)).run({})
    worker = app.worker(
        "--poll-interval", "0.1", "--shutdown-timeout", "10", "--lease", "1", step_seconds=3
    )
    worker.wait_started()
    eventually(lambda: app.started(worker.pid), timeout=15)
    watcher = app.worker("--poll-interval", "0.1", "--lease", "1")
    watcher.wait_started()
    assert [e["event"] for e in app.events()] == ["start"], "the step must still be running"
    sent = worker.signal()
    assert worker.wait(15) == 0, worker.output()
    assert time.monotonic() - sent < 5, worker.output()
    assert app.flow_status(run.tracking_id) == FlowStatus.COMPLETED
    node = app.node(run.tracking_id, "slow")
    assert (node.status, node.attempt, node.rescues) == (NodeStatus.COMPLETED, 1, 0), node
    assert [(e["event"], e["pid"]) for e in app.events()] == [
        ("start", worker.pid),
        ("end", worker.pid),
    ]
    watcher.signal()
    assert watcher.wait(15) == 0, watcher.output()


def test_sigterm_past_the_grace_period_releases_the_step(sqlite_app: App) -> None:
    """Grace 0.5 s and a 30 s step: the worker exits within seconds and hands the step back.

    The node is PENDING as soon as the worker is gone (released, not left to a
    60 s lease), and a second worker runs it right away.
    """
    app = sqlite_app
    run = mirror(app.name, app.storage, ("slow", 0)).run({})
    first = app.worker(
        "--poll-interval", "0.1", "--shutdown-timeout", "0.5", "--lease", "60", step_seconds=30
    )
    first.wait_started()
    eventually(lambda: app.started(first.pid), timeout=15)
    sent = first.signal()
    assert first.wait(10) == 0, first.output()
    assert time.monotonic() - sent < 4, first.output()
    node = app.node(run.tracking_id, "slow")
    assert node.status == NodeStatus.PENDING, node
    assert node.lease_owner is None and node.lease_expires_at is None, node
    assert node.rescues == 0, node

    second = app.worker("--poll-interval", "0.1", "--lease", "60", step_seconds=0.05)
    second.wait_started()
    eventually(lambda: app.flow_status(run.tracking_id) == FlowStatus.COMPLETED, timeout=15)
    assert app.started(second.pid), "the second worker did not run the released step"
    assert [e["event"] for e in app.events() if e["pid"] == first.pid] == ["start"]
    second.signal()
    assert second.wait(15) == 0, second.output()


def test_second_sigterm_stops_at_once(sqlite_app: App) -> None:
    """A first SIGTERM waits for the 30 s step (grace 30 s); a second one stops at once.

    The worker exits 0 and the unfinished node is PENDING again.
    """
    app = sqlite_app
    run = mirror(app.name, app.storage, ("slow", 0)).run({})
    worker = app.worker(
        "--poll-interval", "0.1", "--shutdown-timeout", "30", "--lease", "60", step_seconds=30
    )
    worker.wait_started()
    eventually(lambda: app.started(worker.pid), timeout=15)
    worker.signal()
    time.sleep(1.0)
    assert worker.proc.poll() is None, "the first SIGTERM must let the step run on"
    sent = worker.signal()
    assert worker.wait(10) == 0, worker.output()
    assert time.monotonic() - sent < 2.0, worker.output()
    node = app.node(run.tracking_id, "slow")
    assert node.status == NodeStatus.PENDING and node.lease_owner is None, node


def test_keyboard_interrupt_and_system_exit_from_a_step_are_its_errors(sqlite_app: App) -> None:
    """A step raising KeyboardInterrupt, then SystemExit, in a real worker with a 60 s lease.

    Each is recorded at once as its attempt's error (no wait for the lease, no
    rescue), the third attempt completes, and the worker goes on running steps.
    """
    app = sqlite_app
    run = mirror(app.name + "_interrupted", app.storage, ("interrupted", 2)).run({})
    worker = app.worker("--poll-interval", "0.1", "--lease", "60")
    worker.wait_started()
    eventually(lambda: app.flow_status(run.tracking_id) == FlowStatus.COMPLETED, timeout=20)
    node = app.node(run.tracking_id, "interrupted")
    assert (node.attempt, node.rescues) == (3, 0), node
    retries = [e for e in worker.log_lines() if e["event"] == "step.retry_scheduled"]
    assert [e["error"].split(":")[0] for e in retries] == ["KeyboardInterrupt", "SystemExit"]
    after = mirror(app.name, app.storage, ("slow", 0)).run({})
    eventually(lambda: app.flow_status(after.tracking_id) == FlowStatus.COMPLETED, timeout=20)
    assert worker.proc.poll() is None, "the worker must keep running"
    worker.signal()
    assert worker.wait(15) == 0, worker.output()


def test_a_step_calling_os_exit_0_ends_the_worker_with_status_0(sqlite_app: App) -> None:
    """os._exit(0) in a step ends the process with status 0: nothing in-process can stop it.

    No handler, finally block or atexit hook runs. This is why the systemd units
    restart always (tests/e2e/test_deploy.py checks Restart=always), not only on failure.
    """
    app = sqlite_app
    run = mirror(app.name + "_exits", app.storage, ("exits", 0)).run({})
    worker = app.worker("--poll-interval", "0.1", "--lease", "60")
    worker.wait_started()
    assert worker.wait(20) == 0, worker.output()
    assert '"worker.stopped"' not in worker.output()
    assert app.node(run.tracking_id, "exits").status == NodeStatus.RUNNING


def test_max_payload_bytes_option_fails_a_larger_output_at_once(sqlite_app: App) -> None:
    """--max-payload-bytes 2048 and a 5,000-byte output: FAILED at attempt 1 of 3, limit named."""
    app = sqlite_app
    run = mirror(app.name + "_big", app.storage, ("big", 2)).run({})
    worker = app.worker("--poll-interval", "0.1", "--lease", "60", "--max-payload-bytes", "2048")
    worker.wait_started()
    eventually(lambda: app.flow_status(run.tracking_id) == FlowStatus.FAILED, timeout=20)
    node = app.node(run.tracking_id, "big")
    assert (node.status, node.attempt) == (NodeStatus.FAILED, 1), node
    assert "over the limit of 2048 bytes by 2954 bytes" in node.error
    worker.signal()
    assert worker.wait(15) == 0, worker.output()


def test_a_bad_max_payload_environment_variable_stops_the_start(sqlite_app: App) -> None:
    """$FLOWSMITH_MAX_PAYLOAD_BYTES=lots: the worker exits at once, a usage error (2) whose
    message names the variable."""
    env = dict(sqlite_app.env, FLOWSMITH_MAX_PAYLOAD_BYTES="lots")
    done = flowsmith(
        "worker", "cliflows", "--url", sqlite_app.url, cwd=sqlite_app.dir, env=env, timeout=30
    )
    assert done.returncode == 2, done.stderr
    assert "FLOWSMITH_MAX_PAYLOAD_BYTES" in done.stderr and "Traceback" not in done.stderr


# --------------------------------------------------------------------------- unknown flows


def test_unknown_flow_fails_naming_the_module_to_import(
    sqlite_app: App, unique: Callable[[str], str]
) -> None:
    """A run of a flow the worker never imported fails; the error names it and its module."""
    app = sqlite_app
    orphan = mirror(unique("orphan"), app.storage, ("lonely", 0))
    run = orphan.run({})
    worker = app.worker("--poll-interval", "0.1")
    worker.wait_started()
    eventually(lambda: app.flow_status(run.tracking_id) == FlowStatus.FAILED, timeout=15)
    node = app.node(run.tracking_id, "lonely")
    assert node.status == NodeStatus.FAILED
    assert repr(orphan.name) in node.error
    assert f"flowsmith worker {__name__}" in node.error, node.error
    assert app.events() == [], "no step of the worker's own flows may run instead"
    worker.signal()
    assert worker.wait(15) == 0, worker.output()


# --------------------------------------------------------------------------- logs


@pytest.mark.parametrize("backend", ["postgresql", "mysql"])
def test_json_logs_carry_step_fields_and_never_the_password(
    request: pytest.FixtureRequest, backend: str, tmp_path: Path, unique: Callable[[str], str]
) -> None:
    """With --log-format json every line is JSON; each line about a step carries flow,
    tracking_id, step, attempt and worker_id; the URL's password never appears."""
    url = database_url(request, backend, tmp_path)
    password = sa.make_url(url).password
    assert password
    app = App(tmp_path, url, unique("logs"))
    try:
        logged = mirror(app.name + "_logged", app.storage, ("first", 0), ("flaky", 1)).run({})
        doomed = mirror(app.name + "_doomed", app.storage, ("doomed", 0)).run({})
        worker = app.worker("--poll-interval", "0.1")
        worker.wait_started()
        eventually(
            lambda: (
                app.flow_status(logged.tracking_id) == FlowStatus.COMPLETED
                and app.flow_status(doomed.tracking_id) == FlowStatus.FAILED
            ),
            timeout=20,
        )
        worker.signal()
        assert worker.wait(15) == 0, worker.output()

        output = worker.output()
        assert password not in output
        lines = worker.log_lines()  # fails on any line that is not JSON
        worker_ids = {line["worker_id"] for line in lines if line["event"] == "worker.started"}
        assert len(worker_ids) == 1
        assert "***" in next(
            line["database"] for line in lines if line["event"] == "worker.started"
        )
        runs = {logged.tracking_id: logged.flow_name, doomed.tracking_id: doomed.flow_name}
        step_lines = [line for line in lines if line["event"].startswith("step.")]
        # One INFO line per attempt, when it ends (step.started is DEBUG): a busy
        # worker must not print two lines for every step.
        assert {line["event"] for line in step_lines} >= {
            "step.completed",
            "step.retry_scheduled",
            "step.failed",
        }
        assert "step.started" not in {line["event"] for line in step_lines}
        assert all(
            isinstance(line["seconds"], float)
            for line in step_lines
            if line["event"] == "step.completed"
        )
        for line in step_lines:
            assert runs[line["tracking_id"]] == line["flow"], line
            assert line["step"] in ("first", "flaky", "doomed"), line
            assert isinstance(line["attempt"], int) and line["attempt"] >= 1, line
            assert line["worker_id"] in worker_ids, line
        assert {
            (line["step"], line["attempt"])
            for line in step_lines
            if line["event"] == "step.retry_scheduled"
        } == {("flaky", 1)}
    finally:
        app.close()


def test_rescue_log_lines_carry_step_fields(sqlite_app: App) -> None:
    """The worker that rescues a dead worker's step logs it with flow, tracking_id, step,
    attempt and worker_id (its own), like every other line about a step."""
    app = sqlite_app
    run = mirror(app.name, app.storage, ("slow", 2)).run({})
    doomed = app.worker("--poll-interval", "0.1", "--lease", "1", step_seconds=30)
    doomed.wait_started()
    eventually(lambda: app.started(doomed.pid), timeout=15)
    os.kill(doomed.pid, signal.SIGKILL)
    assert doomed.wait(10) == -signal.SIGKILL
    rescuer = app.worker("--poll-interval", "0.1", "--lease", "1")
    rescuer.wait_started()
    eventually(lambda: app.flow_status(run.tracking_id) == FlowStatus.COMPLETED, timeout=20)
    rescuer.signal()
    assert rescuer.wait(15) == 0, rescuer.output()

    lines = rescuer.log_lines()
    worker_id = next(line["worker_id"] for line in lines if line["event"] == "worker.started")
    about_steps = [line for line in lines if "step" in line]
    assert "lease.rescued" in {line["event"] for line in about_steps}, lines
    for line in about_steps:
        missing = {"flow", "tracking_id", "step", "attempt", "worker_id"} - line.keys()
        assert not missing, f"{line['event']} lacks {missing}: {line}"
        assert (line["flow"], line["tracking_id"], line["worker_id"]) == (
            app.name,
            run.tracking_id,
            worker_id,
        ), line

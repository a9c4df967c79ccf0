"""The public API around the engine: configuration, the registry, backoff, the demo,
worker registration, metrics over HTTP, and passwords kept out of help texts.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
import tenacity
from click.testing import CliRunner

import flowsmith_worker as flowsmith
from flowsmith_worker import (
    DuplicateFlowName,
    Flow,
    FlowSmithNotConfigured,
    InMemoryStorage,
    Worker,
    errors,
)
from flowsmith_worker.cli import main
from flowsmith_worker.config import DEFAULT_DATABASE_URL, resolve_database_url
from flowsmith_worker.retry import as_wait_strategy, retry_delay
from flowsmith_worker.storage.base import Storage, WorkerRecord
from flowsmith_worker.storage.sql import SqlStorage
from tests.conftest import eventually

Names = Callable[[str], str]
REPO = Path(__file__).resolve().parents[2]


# -- configuration ----------------------------------------------------------------------


def test_url_order_is_argument_then_flowsmith_then_database_url_then_sqlite(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("FLOWSMITH_DATABASE_URL", raising=False)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    assert resolve_database_url(None) == DEFAULT_DATABASE_URL == "sqlite:///flowsmith.db"
    monkeypatch.setenv("DATABASE_URL", "postgresql://app@db/app")
    assert resolve_database_url(None) == "postgresql://app@db/app"
    monkeypatch.setenv("FLOWSMITH_DATABASE_URL", "mysql://fs@db/fs")
    assert resolve_database_url(None) == "mysql://fs@db/fs"
    assert resolve_database_url("sqlite:///given.db") == "sqlite:///given.db"


def test_configure_without_a_url_uses_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("FLOWSMITH_DATABASE_URL", f"sqlite:///{tmp_path / 'env.db'}")
    storage = flowsmith.configure(pool_min=1, pool_max=2, pool_timeout=5)
    assert isinstance(storage, SqlStorage)
    assert str(tmp_path / "env.db") in storage.url_for_display


def test_running_a_flow_unconfigured_says_how_to_configure(
    monkeypatch: pytest.MonkeyPatch, unique: Names
) -> None:
    monkeypatch.delenv("FLOWSMITH_DATABASE_URL", raising=False)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    flow = Flow(unique("f")).step("a", lambda ctx: 1)
    with pytest.raises(FlowSmithNotConfigured, match=r"flowsmith\.configure"):
        flow.run({})


def test_bad_pool_settings_are_refused_when_configured() -> None:
    with pytest.raises(ValueError, match="pool_min"):
        flowsmith.configure("sqlite:///x.db", pool_min=5, pool_max=2)


# -- the registry -------------------------------------------------------------------------


def test_a_second_different_flow_of_the_same_name_is_an_error(unique: Names) -> None:
    name = unique("orders")
    Flow(name)
    with pytest.raises(DuplicateFlowName, match=name):
        Flow(name)


def test_the_same_definition_executed_again_replaces_the_old_one(unique: Names) -> None:
    """A module imported twice (as __main__ and by name, or reloaded) is not a conflict."""
    name = unique("reloaded")
    flows = [Flow(name) for _ in range(2)]  # one source line: the same definition site
    assert flowsmith.registry.lookup(name) is flows[1]


def test_a_flow_input_must_be_json(unique: Names) -> None:
    flow = Flow(unique("f"), storage=InMemoryStorage()).step("a", lambda ctx: 1)
    with pytest.raises(flowsmith.FlowSmithError, match="JSON"):
        flow.run({"when": object()})


def test_overlong_tracking_ids_are_refused_before_the_database(unique: Names) -> None:
    flow = Flow(unique("f"), storage=InMemoryStorage()).step("a", lambda ctx: 1)
    with pytest.raises(ValueError, match="255"):
        flow.run({}, tracking_id="x" * 256)


def test_every_error_a_caller_can_catch_is_exported() -> None:
    """Each FlowSmithError subclass is importable from the package and listed in __all__,
    so applications catch our errors without importing private modules."""
    defined = {
        name
        for name, value in vars(errors).items()
        if isinstance(value, type) and issubclass(value, errors.FlowSmithError)
    }
    assert defined - set(flowsmith.__all__) == set()
    for name in defined:
        assert getattr(flowsmith, name) is getattr(errors, name)


# -- backoff ------------------------------------------------------------------------------


def test_tenacity_wait_strategies_are_accepted_as_backoff() -> None:
    wait = as_wait_strategy(tenacity.wait_exponential(multiplier=1, max=8))
    assert [retry_delay(wait, n) for n in (1, 2, 3, 4, 5)] == [1, 2, 4, 8, 8]
    assert retry_delay(as_wait_strategy(2.5), 3) == 2.5
    jittered = [retry_delay(flowsmith.exponential(1, 60, jitter=1), 3) for _ in range(20)]
    assert all(4 <= d <= 5 for d in jittered) and len(set(jittered)) > 1


# -- workers in fs_workers ---------------------------------------------------------------


def test_workers_register_heartbeat_and_dead_ones_are_removed(storage: Storage) -> None:
    record = WorkerRecord("w-dead", "host-a", 41, "0.1.0", ("default",), 4, 0.2, 0, 0.0, 0.0)
    storage.register_worker(worker=record)
    storage.register_worker(
        worker=WorkerRecord("w-live", "host-b", 42, "0.1.0", ("a", "b"), 8, 60, 0, 0.0, 0.0)
    )
    storage.worker_heartbeat(worker_id="w-live", in_flight=3)
    time.sleep(0.8)  # three leases of w-dead (0.2 s) pass without its heartbeat
    assert storage.remove_dead_workers() == 1
    [live] = storage.list_workers()
    assert (live.id, live.host, live.pid, live.queues, live.in_flight) == (
        "w-live",
        "host-b",
        42,
        ("a", "b"),
        3,
    )
    assert live.heartbeat_at >= live.started_at > 0
    storage.unregister_worker(worker_id="w-live")
    assert storage.list_workers() == []


def test_a_running_worker_is_listed_and_gone_after_a_clean_stop(storage: Storage) -> None:
    import threading

    worker = Worker(storage=storage, poll_interval=0.05)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    [listed] = eventually(storage.list_workers, timeout=10)
    assert (listed.id, listed.pid) == (worker.id, os.getpid())
    worker.stop()
    thread.join(30)
    assert storage.list_workers() == []


# -- passwords and help --------------------------------------------------------------------


def test_help_has_examples_and_never_the_database_url_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://app:hunter2@db/app")
    runner = CliRunner()
    commands = ([], ["migrate"], ["worker"], ["demo"], ["status"], ["flows"], ["stats"], ["prune"])
    for command in commands:
        result = runner.invoke(main, [*command, "--help"])
        assert result.exit_code == 0, result.output
        assert "hunter2" not in result.output
        assert "Example" in result.output


# -- processes: metrics and the demo -------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str) -> tuple[int, str]:
    """Status and body; (0, "") while nothing listens yet."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
    except (urllib.error.URLError, ConnectionError):
        return 0, ""


def test_worker_serves_metrics_and_healthz(tmp_path: Path, unique: Names) -> None:
    """A real `flowsmith worker --metrics-port` counts the steps it ran and reports healthy,
    on 127.0.0.1 only by default (another address of this machine, 127.0.0.2, is refused)."""
    url = f"sqlite:///{tmp_path / 'm.db'}"
    storage = flowsmith.create_storage(url)
    storage.migrate()
    name = unique("metered")
    (tmp_path / "meteredflows.py").write_text(
        "from flowsmith_worker import Flow\n"
        f"flow = Flow({name!r}).step('one', lambda ctx: 1).step('two', lambda ctx: 2)\n"
    )
    flow = Flow(name, storage=storage).step("one", lambda ctx: 1).step("two", lambda ctx: 2)
    for i in range(3):
        flow.run({}, tracking_id=f"{name}-{i}")
    port = _free_port()
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
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        eventually(lambda: _get(f"http://127.0.0.1:{port}/healthz")[0] == 200, timeout=20)
        line = f'flowsmith_steps_completed_total{{flow="{name}",queue="default",step="two"}} 3.0'
        eventually(lambda: line in _get(f"http://127.0.0.1:{port}/metrics")[1], timeout=20)
        assert (
            "flowsmith_step_duration_seconds_bucket" in _get(f"http://127.0.0.1:{port}/metrics")[1]
        )
        assert _get(f"http://127.0.0.2:{port}/healthz")[0] == 0
    finally:
        worker.terminate()
        worker.wait(30)
    assert worker.returncode == 0


def test_worker_metrics_host_option_opens_every_interface(tmp_path: Path) -> None:
    """`flowsmith worker --metrics-host 0.0.0.0` (what a container needs) answers
    /healthz on another address of this machine too."""
    url = f"sqlite:///{tmp_path / 'h.db'}"
    storage = flowsmith.create_storage(url)
    storage.migrate()
    storage.close()
    (tmp_path / "noflows.py").write_text("")
    port = _free_port()
    command = ["worker", "noflows", "--url", url, "--metrics-port", str(port)]
    worker = subprocess.Popen(
        [sys.executable, "-m", "flowsmith_worker", *command, "--metrics-host", "0.0.0.0"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        eventually(lambda: _get(f"http://127.0.0.2:{port}/healthz")[0] == 200, timeout=20)
    finally:
        worker.terminate()
        worker.wait(30)
    assert worker.returncode == 0


def test_the_demo_completes_every_order_and_rescues_the_killed_workers_steps(
    tmp_path: Path,
) -> None:
    """`flowsmith demo` (what `make demo` runs) ends with every flow completed."""
    started = time.monotonic()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "flowsmith_worker",
            "demo",
            "--flows",
            "60",
            "--db",
            str(tmp_path / "demo.db"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SIGKILL -> worker 1" in done.stdout
    assert "flows completed   60" in done.stdout
    assert "steps completed   240" in done.stdout
    assert time.monotonic() - started < 60

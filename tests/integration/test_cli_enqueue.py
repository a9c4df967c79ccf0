"""`flowsmith enqueue` (flowsmith_worker/cli/enqueue.py): a run started from a shell.

The flows live in a real module written for each test and imported by the
command, as a worker imports it; the runs go to a real database, and an
in-process Worker (which finds the same flows by name) runs them.
"""

from __future__ import annotations

import json
import sys
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from flowsmith_worker import Worker
from flowsmith_worker.flow import registry
from flowsmith_worker.storage.base import FlowFilter, FlowStatus
from tests.integration.conftest import Db, migrated
from tests.integration.test_cli_ops import cli, cli_json, flow_of

Names = Callable[[str], str]

FLOWS = '''
"""Flows for tests/integration/test_cli_enqueue.py."""
from flowsmith_worker import Flow


def echo_input(ctx):
    return {{"seen": dict(ctx.data)}}


def doomed(ctx):
    raise ValueError("declined")


orders = Flow("{flow}", queue="emails").step("echo", echo_input)
doomed_orders = Flow("{flow}_doomed", queue="emails").step("doomed", doomed)
'''


@dataclass
class App:
    """A module defining two flows (on the queue "emails"), importable by its name."""

    module: str
    flow: str
    db: Db

    def enqueue(self, *args: str) -> tuple[int, str, str]:
        result = cli(self.db.url, "enqueue", *args)
        return result.exit_code, result.stdout, result.stderr

    def drain(self) -> None:
        worker = Worker(storage=self.db.storage, poll_interval=0.05, queues=["emails"])
        try:
            worker.run_until_idle(timeout=20)
        finally:
            worker.shutdown()

    def runs(self) -> int:
        return len(self.db.storage.list_flows(where=FlowFilter(limit=1000)))


def _app(db: Db, tmp_path: Path, unique: Names, monkeypatch: pytest.MonkeyPatch) -> Iterator[App]:
    module, flow = unique("shellflows"), unique("order")
    (tmp_path / f"{module}.py").write_text(textwrap.dedent(FLOWS.format(flow=flow)))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield App(module, flow, db)
    sys.modules.pop(module, None)
    registry.unregister(flow)
    registry.unregister(flow + "_doomed")


@pytest.fixture
def app(
    sql_url: str, tmp_path: Path, unique: Names, monkeypatch: pytest.MonkeyPatch
) -> Iterator[App]:
    """The flows module and a migrated database on each SQL backend."""
    for db in migrated(sql_url):
        yield from _app(db, tmp_path, unique, monkeypatch)


@pytest.fixture
def sqlite_app(tmp_path: Path, unique: Names, monkeypatch: pytest.MonkeyPatch) -> Iterator[App]:
    """The flows module and a migrated SQLite database."""
    for db in migrated(f"sqlite:///{tmp_path / 'enqueue.db'}"):
        yield from _app(db, tmp_path, unique, monkeypatch)


def test_enqueue_starts_a_run_of_the_modules_flow_with_the_input_given(
    app: App, unique: Names
) -> None:
    """enqueue FLOW --module M --input JSON --tracking-id ID: the run is stored with that
    input and the flow's own plan and queue, a worker runs it with that input, and the
    command says how to follow it."""
    tracking_id = unique("order")
    code, out, err = app.enqueue(
        app.flow,
        "--module",
        app.module,
        "--input",
        '{"order_id": 42, "items": [1, 2]}',
        "--tracking-id",
        tracking_id,
    )
    assert code == 0, err
    assert f"Enqueued flow run {tracking_id!r} of flow {app.flow!r} on queue 'emails'" in out
    assert f"flowsmith status {tracking_id} --watch" in out
    record = flow_of(app.db.storage, tracking_id)
    assert record.input == {"order_id": 42, "items": [1, 2]}
    assert (record.queue, record.status) == ("emails", FlowStatus.PENDING)
    assert [step.name for stage in record.plan.stages for step in stage] == ["echo"]

    app.drain()
    [node] = app.db.storage.list_nodes(flow_id=record.id)
    assert node.output == {"seen": {"order_id": 42, "items": [1, 2]}}
    assert flow_of(app.db.storage, tracking_id).status == FlowStatus.COMPLETED


def test_a_tracking_id_in_use_enqueues_nothing_and_exits_4(sqlite_app: App, unique: Names) -> None:
    """A tracking_id whose run is pending, completed, or of another flow: exit 4, a message
    saying so, nothing enqueued; a FAILED run's tracking_id resumes that run (exit 0), as
    flow.run() does."""
    app = sqlite_app
    pending, failed = unique("pending"), unique("failed")
    assert app.enqueue(app.flow, "--module", app.module, "--tracking-id", pending)[0] == 0
    code, out, err = app.enqueue(app.flow, "--module", app.module, "--tracking-id", pending)
    assert code == 4 and out == ""
    assert f"flow run {pending!r} ({app.flow}) already exists and is PENDING" in err
    assert "nothing was enqueued" in err
    other = app.enqueue(app.flow + "_doomed", "--module", app.module, "--tracking-id", pending)
    assert other[0] == 4 and "nothing was enqueued" in other[2]
    assert app.runs() == 1

    app.drain()
    done = app.enqueue(app.flow, "--module", app.module, "--tracking-id", pending)
    assert done[0] == 4 and "already completed" in done[2], done

    doomed = app.flow + "_doomed"
    assert app.enqueue(doomed, "--module", app.module, "--tracking-id", failed)[0] == 0
    app.drain()
    assert flow_of(app.db.storage, failed).status == FlowStatus.FAILED
    code, out, err = app.enqueue(doomed, "--module", app.module, "--tracking-id", failed)
    assert code == 0, err
    assert f"Resumed the FAILED flow run {failed!r}" in out
    assert flow_of(app.db.storage, failed).status == FlowStatus.RUNNING
    assert app.runs() == 2


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("{bad", "not JSON"),
        ("[1, 2]", "not an array"),
        ('"text"', "not a string"),
        ("42", "not a number"),
        ("null", "not null"),
        ('{"x": NaN}', "NaN"),
    ],
)
def test_input_that_is_not_a_json_object_is_a_usage_error(
    sqlite_app: App, text: str, says: str
) -> None:
    """--input that is not JSON, not an object, or not standard JSON: exit 2 with a
    message naming --input and what is wrong; nothing enqueued."""
    code, out, err = sqlite_app.enqueue(
        sqlite_app.flow, "--module", sqlite_app.module, "--input", text
    )
    assert code == 2, (out, err)
    assert "--input" in err and says in err and "Traceback" not in err
    assert sqlite_app.runs() == 0


def test_an_unknown_flow_or_module_says_what_to_import(sqlite_app: App) -> None:
    """A flow no module given defines: exit 3, naming the flows defined and --module; no
    --module at all: exit 3 saying so; a module that cannot be imported: exit 1."""
    app = sqlite_app
    code, _, err = app.enqueue("no_such_flow", "--module", app.module)
    assert code == 3
    assert f"no flow named 'no_such_flow' is defined in {app.module}" in err
    assert app.flow in err and "--module" in err
    code, _, err = app.enqueue(app.flow + "_elsewhere")
    assert code == 3 and "(no --module was given)" in err
    code, _, err = app.enqueue(app.flow, "--module", "no_such_module_anywhere")
    assert code == 1 and "cannot import module 'no_such_module_anywhere'" in err
    assert app.runs() == 0


def test_input_from_stdin_modules_from_the_environment_json_and_a_delay(
    sqlite_app: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--input - reads stdin, $FLOWSMITH_MODULES stands for --module, --json prints the
    run's key and state, and --delay holds its first step back by the database clock."""
    from click.testing import CliRunner

    from flowsmith_worker.cli import main

    app = sqlite_app
    monkeypatch.setenv("FLOWSMITH_MODULES", app.module)
    result = CliRunner().invoke(
        main,
        ["enqueue", app.flow, "--input", "-", "--delay", "10m", "--json", "--url", app.db.url],
        input='{"from": "stdin"}',
    )
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    tracking_id = shown.pop("tracking_id")
    assert len(tracking_id) == 32  # made up, as flow.run() makes one up
    assert shown == {
        "flow_name": app.flow,
        "queue": "emails",
        "status": "PENDING",
        "created": True,
        "resumed": False,
    }
    record = flow_of(app.db.storage, tracking_id)
    assert record.input == {"from": "stdin"}
    [node] = app.db.storage.list_nodes(flow_id=record.id)
    assert 590 < node.run_after - app.db.storage.current_time() <= 600
    assert cli_json(app.db.url, "status", tracking_id)["flow"]["status"] == "PENDING"

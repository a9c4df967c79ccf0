"""A run keeps its plan across deploys, seen from the outside: `flowsmith status` and
the dashboard show the plan's version, and real `flowsmith worker` processes on
changed code fail a run whose step is gone until the old code is back and
`flowsmith retry` resumes it.

On every SQL backend (the CLI reads a database; the dashboard's page on SQLite: its
queries are the status command's); the same rules on every storage, in-process, are
tests/contract/test_versioning.py.
"""

from __future__ import annotations

import json
import os
import signal
import textwrap
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from flowsmith_worker import Flow, StepFailed
from flowsmith_worker.dashboard import create_app
from flowsmith_worker.plan import Plan, PlannedStep
from flowsmith_worker.storage.sql import schema
from tests.dashboard_support import serving
from tests.integration.conftest import Db
from tests.support.cli import cli, ok, run_line
from tests.support.schema import execute
from tests.worker_process import WorkerProcess

Names = Callable[[str], str]

# A flows module as one deploy has it: the steps named in $<MODULE>_STEPS (written as
# old_code.py, it reads $OLD_CODE_STEPS), each returning
# the module that ran it, so the run's outputs say which code ran which step.
FLOWS_MODULE = textwrap.dedent(
    """
    import os

    from flowsmith_worker import Flow

    def ran_here(ctx):
        return __name__

    flow = Flow(os.environ["FS_FLOW_NAME"])
    for name in os.environ[__name__.upper() + "_STEPS"].split(","):
        flow.step(name, ran_here)
    """
)


def test_status_shows_the_version_of_the_plan_the_run_was_enqueued_with(
    db: Db, unique: Names
) -> None:
    """`flowsmith status` prints the run's plan version and step count on its Plan line,
    and --json as plan_version: the version of the code that enqueued the run,
    computed by a process that has none of its code."""
    flow = Flow(unique("shown"), storage=db.storage).step("first", ok).step("second", ok)
    run = flow.run({})

    shown = cli(db.url, "status", run.tracking_id)
    assert shown.exit_code == 0, shown.output
    assert run_line(shown.stdout, "Plan") == f"version {flow.plan().version} (2 steps)"
    as_json = json.loads(cli(db.url, "status", run.tracking_id, "--json").stdout)
    assert as_json["plan_version"] == flow.plan().version


def test_an_unreadable_plan_has_no_version(db: Db, unique: Names) -> None:
    """A plan edited by hand into text that cannot be read shows UNREADABLE on the Plan
    line and null in --json, not the version of the empty placeholder plan."""
    run = Flow(unique("edited"), storage=db.storage).step("first", ok).run({})
    execute(
        db.url,
        sa.update(schema.flows)
        .where(schema.flows.c.tracking_id == run.tracking_id)
        .values(plan='{"stages": [[{"nam'),
    )

    shown = cli(db.url, "status", run.tracking_id)
    assert run_line(shown.stdout, "Plan") == "UNREADABLE"
    as_json = json.loads(cli(db.url, "status", run.tracking_id, "--json").stdout)
    assert as_json["plan_version"] is None


def test_the_dashboard_shows_the_plan_version_of_a_run(sqlite_db: Db, unique: Names) -> None:
    """The run page of the dashboard has the run's plan version beside its flow."""
    flow = Flow(unique("seen"), storage=sqlite_db.storage).step("first", ok)
    run = flow.run({})
    with serving(create_app(sqlite_db.storage)) as base:
        page = httpx.get(f"{base}/run", params={"tracking_id": run.tracking_id})
    assert page.status_code == 200, page.text
    assert f'<code class="plan-version">{flow.plan().version}</code> (1 step)' in page.text


@pytest.mark.slow
def test_a_deploy_that_drops_a_step_fails_its_runs_until_a_rollback_and_a_retry(
    db: Db, unique: Names, tmp_path: Path
) -> None:
    """A run enqueued with steps a, b, c; a worker process on code without b (new_code:
    a, c; its worker.started log line gives that code's plan version) runs a and fails
    the run at b, naming b and the run's plan version in `flowsmith status`. That worker
    stopped, one on the old code (old_code: a, b, c) started, `flowsmith retry` resumes
    the run at b: it completes, a's output still the new code's (a did not run again),
    b and c the old code's."""
    flow_name = unique("deployed")
    enqueued = Flow(flow_name, storage=db.storage)
    for step in ("a", "b", "c"):
        enqueued.step(step, ok)
    run = enqueued.run({})
    for module in ("old_code", "new_code"):
        (tmp_path / f"{module}.py").write_text(FLOWS_MODULE)
    env = dict(os.environ, FS_FLOW_NAME=flow_name, OLD_CODE_STEPS="a,b,c", NEW_CODE_STEPS="a,c")

    new_worker = WorkerProcess(tmp_path, db.url, env, module="new_code")
    try:
        with pytest.raises(StepFailed) as failed:
            run.wait(timeout=30)
        new_worker.signal(signal.SIGTERM)
        assert new_worker.wait(timeout=30) == 0
    finally:
        new_worker.cleanup()
    assert failed.value.step == "b", new_worker.output()[-3000:]
    new_code = Plan(stages=((PlannedStep("a", 1),), (PlannedStep("c", 1),)))
    (started,) = [line for line in new_worker.log_lines() if line["event"] == "worker.started"]
    assert started["flows"] == {flow_name: new_code.version}
    shown = cli(db.url, "status", run.tracking_id, "--wide")  # the whole error
    assert shown.exit_code == 1  # FAILED
    assert run_line(shown.stdout, "Plan") == f"version {enqueued.plan().version} (3 steps)"
    error = run_line(shown.stdout, "Error")
    assert "step 'b'" in error and f"plan version {enqueued.plan().version}" in error

    old_worker = WorkerProcess(tmp_path, db.url, env, module="old_code")
    try:
        old_worker.wait_started()
        retried = cli(db.url, "retry", run.tracking_id)
        assert retried.exit_code == 0, retried.output
        data = run.wait(timeout=30)
    finally:
        old_worker.cleanup()
    assert data == {"a": "new_code", "b": "old_code", "c": "old_code"}

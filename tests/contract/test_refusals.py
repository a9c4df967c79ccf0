"""Typed refusals: the engine refuses with one exception type per rule, each
carrying the exit code of `flowsmith`, and the command line prints it with that
code without checking the rule itself (flowsmith_worker/errors.py, cli/app.py).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner, Result

from flowsmith_worker import Context, Flow, FlowStatus, Worker, get_run
from flowsmith_worker.cli import main
from flowsmith_worker.errors import (
    EXIT_ERROR,
    EXIT_NOT_FOUND,
    EXIT_TAKEN,
    FlowAlreadyCompleted,
    FlowNotFound,
    FlowSmithError,
    Refused,
    RunAlreadyEnqueued,
    RunNotCancellable,
    RunNotRetryable,
    RunStatusUnreadable,
    TrackingIdTaken,
)
from flowsmith_worker.storage import create_storage
from flowsmith_worker.storage.base import Storage
from flowsmith_worker.storage.sql import SqlStorage, schema

Names = Callable[[str], str]


def ok(ctx: Context) -> dict[str, Any]:
    return {"ok": True}


def completed_run(storage: Storage, flow: Flow, tracking_id: str) -> None:
    """Enqueue a run of ``flow`` and work it to COMPLETED."""
    flow.run({"n": 1}, tracking_id=tracking_id)
    worker = Worker(storage=storage, poll_interval=0.05)
    try:
        worker.run_until_idle(timeout=20)
    finally:
        worker.shutdown()
    record = storage.get_flow(tracking_id=tracking_id)
    assert record is not None and record.status == FlowStatus.COMPLETED


def set_status_by_hand(storage: Storage, tracking_id: str, status: str) -> None:
    """Write a status no version of FlowSmith writes, as a hand edit would."""
    assert isinstance(storage, SqlStorage)
    with storage.engine.begin() as conn:
        conn.execute(
            sa.update(schema.flows)
            .where(schema.flows.c.tracking_id == tracking_id)
            .values(status=status)
        )


def stored_status(storage: Storage, tracking_id: str) -> str:
    assert isinstance(storage, SqlStorage)
    with storage.engine.connect() as conn:
        return str(
            conn.execute(
                sa.select(schema.flows.c.status).where(schema.flows.c.tracking_id == tracking_id)
            ).scalar_one()
        )


# -- the engine's refusals, on every backend -------------------------------------------------


def test_an_unknown_tracking_id_is_flow_not_found_with_exit_code_3(storage: Storage) -> None:
    """Retrying or cancelling a run that does not exist raises FlowNotFound, exit code 3."""
    for act in (storage.resume_flow, storage.cancel_flow):
        with pytest.raises(FlowNotFound) as raised:
            act(tracking_id="never-enqueued")
        assert raised.value.exit_code == EXIT_NOT_FOUND == 3


def test_retry_and_cancel_refusals_are_refused_with_exit_code_1(
    storage: Storage, unique: Names
) -> None:
    """A retry of a run that has not failed raises RunNotRetryable; a cancel of a
    COMPLETED run raises RunNotCancellable: both are Refused, exit code 1, and the
    run is left as it was."""
    flow = Flow(unique("refusals"), storage=storage).step("only", ok)
    flow.run({"n": 1}, tracking_id="pending")
    with pytest.raises(RunNotRetryable, match="only a FAILED run can be retried") as retried:
        storage.resume_flow(tracking_id="pending")
    completed_run(storage, flow, "done")
    with pytest.raises(RunNotCancellable, match="only a pending or running run") as cancelled:
        storage.cancel_flow(tracking_id="done")
    for refusal in (retried.value, cancelled.value):
        assert isinstance(refusal, Refused)
        assert refusal.exit_code == EXIT_ERROR == 1
    assert stored_status(storage, "done") == FlowStatus.COMPLETED


def test_the_storage_refuses_to_act_on_a_status_it_cannot_read(
    storage: Storage, unique: Names
) -> None:
    """A run whose stored status this version cannot read is neither retried nor
    cancelled: the storage raises RunStatusUnreadable (a Refused, exit code 1) and
    the status stays as it was; a cancel used to overwrite it."""
    flow = Flow(unique("unreadable"), storage=storage).step("only", ok)
    flow.run({"n": 1}, tracking_id="bad-status")
    set_status_by_hand(storage, "bad-status", "EXPLODED")
    for act in (storage.resume_flow, storage.cancel_flow):
        with pytest.raises(RunStatusUnreadable, match=r"cannot be read.*nothing done") as raised:
            act(tracking_id="bad-status")
        assert isinstance(raised.value, Refused) and raised.value.exit_code == 1
        assert "EXPLODED" in str(raised.value)
    assert stored_status(storage, "bad-status") == "EXPLODED"


def test_enqueue_refusals_are_run_already_enqueued_with_exit_code_4(
    storage: Storage, unique: Names
) -> None:
    """A tracking_id of another flow's run raises TrackingIdTaken, and one of a
    COMPLETED run FlowAlreadyCompleted: both are RunAlreadyEnqueued, exit code 4."""
    flow = Flow(unique("first"), storage=storage).step("only", ok)
    other = Flow(unique("other"), storage=storage).step("only", ok)
    completed_run(storage, flow, "taken")
    with pytest.raises(TrackingIdTaken) as taken:
        other.run({"n": 1}, tracking_id="taken")
    with pytest.raises(FlowAlreadyCompleted) as completed:
        flow.run({"n": 1}, tracking_id="taken")
    for refusal in (taken.value, completed.value):
        assert isinstance(refusal, RunAlreadyEnqueued)
        assert refusal.exit_code == EXIT_TAKEN == 4


def test_every_error_type_carries_an_exit_code_the_group_help_documents() -> None:
    """Each FlowSmithError subclass exits with a code the `flowsmith --help` epilog lists."""
    documented = CliRunner().invoke(main, ["--help"]).output.split("Exit codes")[1]
    pending = [FlowSmithError]
    while pending:
        kind = pending.pop()
        pending.extend(kind.__subclasses__())
        assert f"  {kind.exit_code}  " in documented, kind


# -- the command line prints them with their codes -------------------------------------------


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'refusals.db'}"
    made = create_storage(url)
    made.migrate()
    made.close()
    return url


def cli(url: str, *args: str) -> Result:
    return CliRunner().invoke(main, [*args, "--url", url], catch_exceptions=False)


@pytest.mark.parametrize(
    ("setup", "command", "exit_code", "said"),
    [
        (None, "retry", 3, "no flow run has tracking_id 'run-1'"),
        (None, "cancel", 3, "no flow run has tracking_id 'run-1'"),
        ("pending", "retry", 1, "is PENDING: only a FAILED run can be retried"),
        ("completed", "cancel", 1, "is COMPLETED: only a pending or running run"),
        ("completed", "retry", 1, "a completed run never runs again"),
        ("unreadable", "retry", 1, "has a stored status that cannot be read ('EXPLODED')"),
        ("unreadable", "cancel", 1, "has a stored status that cannot be read ('EXPLODED')"),
    ],
)
def test_the_cli_prints_each_refusal_with_its_exit_code(
    sqlite_url: str, unique: Names, setup: str | None, command: str, exit_code: int, said: str
) -> None:
    """retry and cancel print the storage's refusal on one line, with the exit code
    its type carries, and no traceback."""
    storage = create_storage(sqlite_url)
    try:
        flow = Flow(unique("cli"), storage=storage).step("only", ok)
        if setup == "pending":
            flow.run({"n": 1}, tracking_id="run-1")
        elif setup == "completed":
            completed_run(storage, flow, "run-1")
        elif setup == "unreadable":
            flow.run({"n": 1}, tracking_id="run-1")
            set_status_by_hand(storage, "run-1", "EXPLODED")
        result = cli(sqlite_url, command, "run-1")
    finally:
        storage.close()
    assert result.exit_code == exit_code, result.output
    assert result.stderr.startswith("Error: ") and said in result.stderr, result.stderr
    assert "Traceback" not in result.output


def test_an_unknown_tracking_id_is_said_in_the_same_words_everywhere(sqlite_url: str) -> None:
    """The engine words FlowNotFound for an unknown tracking_id once: the storage's
    retry and cancel, get_run, and `flowsmith status/retry/cancel` (exit code 3)
    all say exactly FlowNotFound.for_tracking_id's message."""
    said = str(FlowNotFound.for_tracking_id("nope"))
    storage = create_storage(sqlite_url)
    try:
        for act in (storage.resume_flow, storage.cancel_flow, get_run_of(storage)):
            with pytest.raises(FlowNotFound) as raised:
                act(tracking_id="nope")
            assert str(raised.value) == said
    finally:
        storage.close()
    for command in ("status", "retry", "cancel"):
        result = cli(sqlite_url, command, "nope")
        assert result.exit_code == EXIT_NOT_FOUND, result.output
        assert result.stderr == f"Error: {said}\n", result.stderr


def get_run_of(storage: Storage) -> Callable[..., Any]:
    """get_run on ``storage``, called as the storage's own methods are (tracking_id=)."""
    return lambda tracking_id: get_run(tracking_id, storage)

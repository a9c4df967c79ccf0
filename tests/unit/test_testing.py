"""flowsmith_worker.testing.run_flow: a flow run to its end in the test's own thread."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest

from flowsmith_worker import Context, Flow, FlowSmithNotConfigured, InMemoryStorage, StepFailed
from flowsmith_worker.decorators import step, workflow
from flowsmith_worker.retry import fixed
from flowsmith_worker.storage import default_storage
from flowsmith_worker.testing import run_flow


def test_a_flow_runs_to_its_end_and_its_data_comes_back(unique: Callable[[str], str]) -> None:
    """Parallel steps, a skipped condition, a subflow on another queue and a retried
    step all run, with no configure() and no worker process."""
    child = Flow(unique("child"), queue=unique("reports")).step("count", lambda ctx: len(ctx.data))
    attempts: list[int] = []

    def flaky(ctx: Context) -> str:
        attempts.append(1)
        if len(attempts) < 2:
            raise ConnectionError("the API blinked")
        return "charged"

    parent = Flow(unique("parent"))
    parent.step("load", lambda ctx: [1, 2, 3])
    with parent.parallel():
        parent.step("sum", lambda ctx: sum(ctx.data["load"]))
        parent.step("max", lambda ctx: max(ctx.data["load"]))
    parent.step("never", lambda ctx: "no", condition=lambda ctx: ctx.data["sum"] > 100)
    parent.step("charge", flaky, retries=2, backoff=fixed(0.01))
    parent.subflow("report", child)
    data = run_flow(parent, {"order": 7})
    assert (data["sum"], data["max"], data["charge"], "never" in data) == (6, 3, "charged", False)
    assert data["report"]["count"] == len(data) - 1  # the child saw the parent's data so far
    assert len(attempts) == 2
    with pytest.raises(FlowSmithNotConfigured):
        default_storage()  # nothing was configured to run it


def test_a_failed_step_raises_with_its_error_and_traceback(unique: Callable[[str], str]) -> None:
    """The step's own error ends the message; its traceback is attached as a note."""

    def charge(ctx: Context) -> None:
        raise ValueError(f"card declined for order {ctx.data['order']}")

    flow = Flow(unique("failing")).step("charge", charge, retries=1, backoff=fixed(0.01))
    with pytest.raises(StepFailed, match="card declined for order 9") as failed:
        run_flow(flow, {"order": 9})
    assert (failed.value.step, failed.value.attempts) == ("charge", 2)
    notes = "\n".join(getattr(failed.value, "__notes__", []))
    assert "Traceback" in notes and 'raise ValueError(f"card declined' in notes


def test_the_run_goes_to_a_private_storage_not_the_flows_own(
    unique: Callable[[str], str],
) -> None:
    """A flow bound to a storage is run elsewhere: its storage is left untouched, and a
    @workflow object is taken for its flow."""
    storage = InMemoryStorage()

    @workflow(unique("bound"), storage=storage)
    def bound() -> None:
        @step
        def greet(ctx: Context) -> str:
            return f"hello {ctx.data['name']}"

    assert run_flow(bound, {"name": "ada"}, tracking_id="t1")["greet"] == "hello ada"
    assert storage.get_flow(tracking_id="t1") is None
    storage.close()


def test_a_run_still_going_after_the_timeout_says_so(unique: Callable[[str], str]) -> None:
    """A step that does not end within ``timeout`` gives a TimeoutError naming the flow,
    at once, without waiting for the step."""
    release = threading.Event()

    def stuck(ctx: Context) -> Any:
        return release.wait(30)

    flow = Flow(unique("stuck")).step("stuck", stuck)
    try:
        with pytest.raises(TimeoutError, match=f"flow '{flow.name}' did not finish within 0.2 s"):
            run_flow(flow, timeout=0.2)
    finally:
        release.set()


def test_something_else_than_a_flow_is_refused() -> None:
    """A function given by mistake (the undecorated step, say) is named in the error."""
    with pytest.raises(TypeError, match="run_flow takes a Flow or a @workflow, not function"):
        run_flow(lambda ctx: None)


def test_a_wait_with_no_timeout_is_named_rather_than_timing_out_after_0_s(
    unique: Callable[[str], str],
) -> None:
    """run_flow sends no events: a flow parked on a wait_for with no timeout ends run_flow
    with an error naming the event and saying what to do, not "still RUNNING after 0 s"."""
    flow = Flow(unique("approval"))
    flow.step("open", lambda ctx: "opened")
    flow.wait_for("manager_ok")
    with pytest.raises(TimeoutError, match=r"event\(s\) 'manager_ok' with no timeout.*send_event"):
        run_flow(flow, {}, timeout=5)

"""Run flows synchronously in your own tests.

    from flowsmith_worker.testing import run_flow

    def test_checkout() -> None:
        data = run_flow(checkout, {"order_id": 42})
        assert data["reserve_items"] == "reserved"

``run_flow`` runs a flow to its end in the calling thread, on a throw-away
in-memory storage of its own, with the same worker that `flowsmith worker`
runs: retries, backoff, conditions, parallel groups and subflows behave as in
production. No database, no configure(), no worker process. A backoff or a
``delay=`` is waited for in real time: give the steps under test short ones.
"""

from __future__ import annotations

from typing import Any

from flowsmith_worker.context import Context
from flowsmith_worker.errors import StepFailed
from flowsmith_worker.flow import Flow, registry
from flowsmith_worker.parking import AWAITING_EVENT, parked_as
from flowsmith_worker.run import FlowRun
from flowsmith_worker.storage.memory import InMemoryStorage
from flowsmith_worker.worker import Worker

DEFAULT_TIMEOUT_SECONDS = 30.0
# Short: a test waits at most this long after its last step before it sees the end.
_POLL_SECONDS = 0.01


def run_flow(
    flow: Any,
    data: Context | dict[str, Any] | None = None,
    *,
    tracking_id: str | None = None,
    timeout: float = DEFAULT_TIMEOUT_SECONDS,
) -> dict[str, Any]:
    """Run ``flow`` (a Flow or a @workflow) on ``data`` to its end; return its final ctx.data.

    The run goes into a private in-memory storage, whatever storage the flow
    or configure() names, and is gone when this returns. A step that fails
    after all its attempts raises StepFailed: its message ends with the step's
    error, and the step's traceback is attached to it as a note (pytest shows
    it). A cancelled run raises FlowCancelled; a run still going after
    ``timeout`` seconds, TimeoutError.
    """
    flow = getattr(flow, "flow", flow)  # a @workflow stands for its Flow
    if not isinstance(flow, Flow):
        raise TypeError(f"run_flow takes a Flow or a @workflow, not {type(flow).__name__}")
    storage = InMemoryStorage()
    try:
        request = flow.new_run(data, tracking_id)
        storage.enqueue_flow(flow=request)
        _drain(storage, flow, timeout)
        return _outcome(FlowRun(storage, flow.name, request.tracking_id))
    finally:
        storage.close()


def _drain(storage: InMemoryStorage, flow: Flow, timeout: float) -> None:
    """Run every step until none is left, on every queue a flow of this process uses
    (a subflow may run on another queue than its parent)."""
    known = (registry.lookup(name) for name in registry.names())
    queues = sorted({flow.queue} | {f.queue for f in known if f is not None})
    worker = Worker(storage=storage, poll_interval=_POLL_SECONDS, queues=queues, listen=False)
    try:
        worker.run_until_idle(timeout=timeout)
    except TimeoutError:
        worker.stop(graceful=False)  # shut down without waiting for the step still running
        raise TimeoutError(
            f"flow {flow.name!r} did not finish within {timeout} s: a step is still running "
            "or waiting for its retry's backoff (give run_flow a longer timeout=)"
        ) from None
    finally:
        worker.shutdown()


def _outcome(run: FlowRun) -> dict[str, Any]:
    try:
        return run.wait(timeout=0)
    except StepFailed as failure:
        failure.add_note(f"the error of step {failure.step!r}:\n{failure.error}")
        raise
    except TimeoutError:
        # The worker went idle with the run unfinished: only a wait with no
        # timeout does that, and nothing here will ever send its event.
        waits = _awaited_events(run)
        if not waits:
            raise
        raise TimeoutError(
            f"flow run {run.tracking_id!r} waits for event(s) {', '.join(map(repr, waits))} "
            "with no timeout, and run_flow sends no events: give the wait a short timeout= "
            "(with on_timeout= for the value it stands for), or run the flow with a Worker "
            "and send_event"
        ) from None


def _awaited_events(run: FlowRun) -> list[str]:
    """The names of the run's wait_for steps parked for their event."""
    record = run.storage.get_flow(tracking_id=run.tracking_id, with_payloads=False)
    if record is None:
        return []
    nodes = run.storage.list_nodes(flow_id=record.id, with_payloads=False)
    return [n.step_name for n in nodes if parked_as(record, n) == AWAITING_EVENT]

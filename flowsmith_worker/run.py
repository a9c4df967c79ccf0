"""FlowRun: the handle flow.run() returns, and get_run() finds again by tracking_id.

Owns reading one run for its caller: status, trace, and wait (each poll reads the
run's status only; its ctx.data is read once, at the end). Cancel and retry are the
storage's: a FlowRun must never decide itself whether they are allowed, never keep
state besides (storage, flow name, tracking_id), so a handle made in any process is
the same, and never show an unreadable row's placeholders as the run's state.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from flowsmith_worker import fanout
from flowsmith_worker.compensation import Compensation, outcome_of_run
from flowsmith_worker.errors import FlowCancelled, FlowNotFound, StepFailed, UnreadableRow
from flowsmith_worker.identifiers import MAX_TRACKING_ID_LENGTH, check_identifier
from flowsmith_worker.storage import default_storage
from flowsmith_worker.storage.base import FlowRecord, FlowStatus, NodeRecord, NodeStatus, Storage

_FIRST_POLL_SECONDS = 0.01
_MAX_POLL_SECONDS = 0.5


class FlowRun:
    """A run of a flow, known by its tracking_id."""

    def __init__(self, storage: Storage, flow_name: str, tracking_id: str) -> None:
        self.storage = storage
        self.flow_name = flow_name
        self.tracking_id = tracking_id

    def __repr__(self) -> str:
        return f"FlowRun({self.flow_name!r}, tracking_id={self.tracking_id!r})"

    def record(self, with_payloads: bool = True) -> FlowRecord:
        """The run as stored; ``with_payloads=False`` leaves its input and output unread."""
        found = stored_run(self.storage, self.tracking_id, with_payloads=with_payloads)
        if found.unreadable:  # its placeholders must not pass for the run's state
            raise UnreadableRow(
                f"flow run {self.tracking_id!r} cannot be read: "
                + "; ".join(f"{column}: {why}" for column, why in found.unreadable.items())
                + f" (`flowsmith status {self.tracking_id}` shows the run)"
            )
        return found

    def status(self) -> FlowStatus:
        return self.record(with_payloads=False).status

    def trace(self) -> list[NodeRecord]:
        """Every step of the run: status, input, output, error, timings, worker, and each
        of its attempts (``NodeRecord.attempts``: start, end, worker, outcome, error)."""
        return self.storage.list_nodes(flow_id=self.record(with_payloads=False).id)

    def map_progress(self, name: str) -> fanout.MapProgress:
        """How far the map step ``name`` is: its items by status (``.counts``, HELD for
        those waiting under max_parallel) and ``.summary()``, e.g. "10 items: 7
        COMPLETED, 3 RUNNING". Its items are in trace() too, after the map's node."""
        nodes = self.storage.list_nodes(
            flow_id=self.record(with_payloads=False).id, with_payloads=False
        )
        return fanout.progress_of(name, nodes)

    def compensation(self) -> Compensation | None:
        """How the compensations of this FAILED run ended: COMPENSATED, COMPENSATION_FAILED,
        or None (the run has not FAILED, or had nothing to undo). See compensation.py."""
        record = self.record(with_payloads=False)
        return outcome_of_run(record.status, self.storage.list_nodes(flow_id=record.id))

    def plan_version(self) -> str:
        """The version of the plan this run was enqueued with, as `flowsmith status` shows
        it: a short hash of its steps (see plan.py). The run keeps that plan whatever code
        is deployed since; compare it with ``flow.plan().version`` of the code at hand."""
        return self.record(with_payloads=False).plan.version

    def cancel(self) -> None:
        """Cancel the run, as `flowsmith cancel` does: its pending steps never start.

        A step already running finishes, but the run goes no further; its
        subflows are cancelled too, and cancelling a cancelled run again does
        nothing. RunNotCancellable if the run has COMPLETED or FAILED, or is
        COMPENSATING (undoing its steps, see compensation.py).
        """
        self.storage.cancel_flow(tracking_id=self.tracking_id)

    def retry(self) -> None:
        """Resume a FAILED run, as `flowsmith retry` does: its failed step(s) run again.

        Completed steps keep their outputs; each failed step, and each parallel
        sibling its failure stopped, gets a fresh allowance of attempts.
        RunNotRetryable if the run is not FAILED (or another retry came first), or if
        its compensations ran (its steps were undone).
        """
        self.storage.resume_flow(tracking_id=self.tracking_id)

    def wait(self, timeout: float | None = None) -> dict[str, Any]:
        """Block until the run ends; return the final ctx.data.

        Raises StepFailed when a step failed after all its attempts, FlowCancelled
        when it was cancelled, TimeoutError when ``timeout`` seconds pass first.
        Each poll reads only the run's status (its input can be megabytes); the
        final ctx.data is read once, when the run has completed.
        """
        waiting = _Waiting(self, timeout)
        while (pause := waiting.poll()) is not None:
            time.sleep(pause)
        return waiting.data

    async def wait_async(self, timeout: float | None = None) -> dict[str, Any]:
        """``wait`` for async code: the event loop goes on while the run is not over.

        Each poll is a blocking database read, so it runs in a thread
        (asyncio.to_thread); between polls it sleeps with asyncio.sleep, holding
        no thread, and cancelling the awaiting task (a client gone) stops it.
        """
        waiting = _Waiting(self, timeout)
        while (pause := await asyncio.to_thread(waiting.poll)) is not None:
            await asyncio.sleep(pause)
        return waiting.data

    def _failure(self, record: FlowRecord) -> StepFailed:
        """The failure of the step that failed the run.

        A failed run stops its siblings, but one already running may fail after
        it (recorded, not retried), and plan order says nothing of which came
        first: the run keeps the error that failed it, so look for that step,
        else take the step that failed first.
        """
        nodes = self.storage.list_nodes(flow_id=record.id, with_payloads=False)
        failed = [n for n in nodes if n.status == NodeStatus.FAILED]
        if not failed:
            return StepFailed("?", 0, record.error or "unknown error", self.tracking_id)
        node = next(
            (n for n in failed if n.error == record.error),
            min(failed, key=lambda n: (n.finished_at is None, n.finished_at or 0.0)),
        )
        return StepFailed(node.step_name, node.attempt, node.error or "", self.tracking_id)


class _Waiting:
    """The polls of one wait for a run to end, shared by ``wait`` and ``wait_async``
    (which differ only in how they sleep between polls)."""

    def __init__(self, run: FlowRun, timeout: float | None) -> None:
        self.run = run
        self.timeout = timeout
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.pause = _FIRST_POLL_SECONDS
        self.data: dict[str, Any] = {}

    def poll(self) -> float | None:
        """Read the run's status: None once it has completed (``data`` holds its final
        ctx.data), else the seconds to sleep before the next poll. Raises when the run
        failed or was cancelled, or the timeout has passed."""
        run = self.run
        record = run.record(with_payloads=False)
        if record.status == FlowStatus.COMPLETED:
            self.data = dict(run.record().output or {})
            return None
        if record.status == FlowStatus.FAILED:
            raise run._failure(record)
        if record.status == FlowStatus.CANCELLED:
            raise FlowCancelled(f"flow run {run.tracking_id!r} was cancelled")
        if self.deadline is None:
            pause = self.pause
        else:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(
                    f"flow run {run.tracking_id!r} is still {record.status} after {self.timeout} s"
                )
            pause = min(self.pause, left)
        self.pause = min(self.pause * 2, _MAX_POLL_SECONDS)
        return pause


def stored_run(storage: Storage, tracking_id: str, *, with_payloads: bool = True) -> FlowRecord:
    """The run with that tracking_id as stored, its unreadable values marked (see
    FlowRecord.unreadable); FlowNotFound if there is none (never committed, or pruned)."""
    found = storage.get_flow(tracking_id=tracking_id, with_payloads=with_payloads)
    if found is None:
        raise FlowNotFound.for_tracking_id(tracking_id)
    return found


def find_run(tracking_id: str, storage: Storage, flow_name: str | None = None) -> FlowRun:
    """The handle of the stored run with that tracking_id (of flow ``flow_name``, if given).

    FlowNotFound if there is none (never committed, or pruned), or it is a run
    of another flow.
    """
    check_identifier("tracking_id", tracking_id, MAX_TRACKING_ID_LENGTH)
    record = stored_run(storage, tracking_id, with_payloads=False)
    if flow_name is not None and record.flow_name != flow_name:
        raise FlowNotFound(
            f"tracking_id {tracking_id!r} is a run of flow {record.flow_name!r}, not of "
            f"{flow_name!r}: ask that flow, or flowsmith_worker.get_run(), for it"
        )
    return FlowRun(storage, record.flow_name, tracking_id)


def get_run(tracking_id: str, storage: Storage | None = None) -> FlowRun:
    """The handle of the run with that tracking_id, whatever its flow, as ``flow.run``
    returned it; ``storage`` defaults to the configured one. FlowNotFound if none has it."""
    return find_run(tracking_id, storage or default_storage())

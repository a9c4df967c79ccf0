"""FlowRun: the handle flow.run() returns."""

from __future__ import annotations

import time
from typing import Any

from flowsmith_worker.errors import FlowCancelled, FlowNotFound, StepFailed, UnreadableRow
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
        found = self.storage.get_flow(tracking_id=self.tracking_id, with_payloads=with_payloads)
        if found is None:
            raise FlowNotFound(
                f"no flow run has tracking_id {self.tracking_id!r} "
                "(it was never committed, or it was pruned)"
            )
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

    def wait(self, timeout: float | None = None) -> dict[str, Any]:
        """Block until the run ends; return the final ctx.data.

        Raises StepFailed when a step failed after all its attempts, FlowCancelled
        when it was cancelled, TimeoutError when ``timeout`` seconds pass first.
        Each poll reads only the run's status (its input can be megabytes); the
        final ctx.data is read once, when the run has completed.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = _FIRST_POLL_SECONDS
        while True:
            record = self.record(with_payloads=False)
            if record.status == FlowStatus.COMPLETED:
                return dict(self.record().output or {})
            if record.status == FlowStatus.FAILED:
                raise self._failure(record)
            if record.status == FlowStatus.CANCELLED:
                raise FlowCancelled(f"flow run {self.tracking_id!r} was cancelled")
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(
                    f"flow run {self.tracking_id!r} is still {record.status} after {timeout} s"
                )
            wait = pause if deadline is None else min(pause, max(0.0, deadline - time.monotonic()))
            time.sleep(wait)
            pause = min(pause * 2, _MAX_POLL_SECONDS)

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

"""Run one claimed node and record its outcome, fenced by its lease.

Shared by every way of running a node: the worker process, an in-process
worker in tests. The outcome is decided first and written once, so whatever the
step does (raise, hang past its timeout, return something that is not JSON)
the worker goes on and the attempt is accounted for.
"""

from __future__ import annotations

import json
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TypeVar

import tenacity

from flowsmith_worker import registry
from flowsmith_worker.context import Context
from flowsmith_worker.errors import (
    CorruptRow,
    DatabaseUnavailable,
    FlowCancelled,
    StepOutputNotJSON,
    StepTimeout,
    SubflowCycle,
)
from flowsmith_worker.flow import Flow, StepSpec
from flowsmith_worker.log import get_logger
from flowsmith_worker.progress import attempts_left
from flowsmith_worker.retry import DEFAULT_BACKOFF, retry_delay
from flowsmith_worker.storage.base import ClaimedNode, NewFlow, Storage

T = TypeVar("T")
DEFAULT_GIVE_UP_SECONDS = 30.0
log = get_logger("flowsmith.executor")


class Outcome(StrEnum):
    COMPLETED = "completed"
    SKIPPED = "skipped"
    WAITING = "waiting"  # a subflow was started
    RETRY = "retry_scheduled"
    FAILED = "failed"
    LEASE_LOST = "lease_lost"  # our write was refused: a newer attempt owns the node


@dataclass(frozen=True)
class _Failure:
    error: str
    retryable: bool = True


class Executor:
    def __init__(
        self,
        storage: Storage,
        worker_id: str,
        lookup: Callable[[str], Flow | None] = registry.lookup,
        stop_retrying: threading.Event | None = None,
        give_up_after: float = DEFAULT_GIVE_UP_SECONDS,
    ) -> None:
        self.storage = storage
        self.worker_id = worker_id
        self.lookup = lookup
        # Set on a hard stop: give up re-trying a write while the database is away.
        self.stop_retrying = stop_retrying or threading.Event()
        # Past the lease, the node is being rescued and our write would be refused
        # anyway; and an error that only looks transient must not retry forever.
        self.give_up_after = give_up_after

    def execute(self, node: ClaimedNode) -> Outcome:
        bound = log.bind(
            flow=node.flow_name,
            tracking_id=node.tracking_id,
            step=node.step_name,
            attempt=node.attempt,
            worker_id=self.worker_id,
        )
        flow = self.lookup(node.flow_name)
        spec = flow.get_step(node.step_name) if flow else None
        if flow is None:
            return self._record_failure(node, None, _Failure(self._unknown_flow(node)), bound)
        if spec is None:
            failure = _Failure(
                f"step {node.step_name!r} is in the stored plan of this run of flow "
                f"{node.flow_name!r} but no longer in the flow's code; restore the step "
                "(or deploy the old code) and retry the flow",
                retryable=False,
            )
            return self._record_failure(node, None, failure, bound)
        bound.info("step.started")
        ctx = Context(
            node.input, tracking_id=node.tracking_id, step=node.step_name, attempt=node.attempt
        )
        try:
            if spec.condition is not None and not spec.condition(ctx):
                return self._write(
                    node, bound, Outcome.SKIPPED, lambda: self.storage.skip_node(lease=node.lease)
                )
            result = _call_with_timeout(spec, ctx)
            if spec.subflow:
                child = _child_request(spec, ctx, result)
                bound.info(
                    "subflow.starting",
                    child_flow=child.flow_name,
                    child_tracking_id=child.tracking_id,
                )
                return self._write(
                    node,
                    bound,
                    Outcome.WAITING,
                    lambda: self.storage.start_subflow(lease=node.lease, child=child),
                )
            _check_json(spec, result)
        except BaseException as exc:
            if isinstance(exc, KeyboardInterrupt):
                raise
            # A cancelled child stays cancelled, and a subflow cycle stays a cycle:
            # running the step again cannot help.
            retryable = not isinstance(exc, (FlowCancelled, SubflowCycle))
            return self._record_failure(node, spec, _Failure(_describe(exc), retryable), bound)
        return self._write(
            node,
            bound,
            Outcome.COMPLETED,
            lambda: self.storage.complete_node(lease=node.lease, output=result),
        )

    def _record_failure(
        self, node: ClaimedNode, spec: StepSpec | None, failure: _Failure, bound: Any
    ) -> Outcome:
        retry = failure.retryable and attempts_left(node.attempt, node.max_attempts)
        delay = (
            retry_delay(spec.backoff if spec else DEFAULT_BACKOFF, node.attempt) if retry else None
        )
        outcome = Outcome.RETRY if retry else Outcome.FAILED
        written = self._write(
            node,
            bound,
            outcome,
            lambda: self.storage.fail_node(
                lease=node.lease, error=failure.error, retry_delay=delay
            ),
            error=failure.error.strip().splitlines()[-1] if failure.error.strip() else "",
            retry_in=None if delay is None else round(delay, 3),
        )
        return written

    def _write(
        self,
        node: ClaimedNode,
        bound: Any,
        outcome: Outcome,
        write: Callable[[], bool],
        **fields: Any,
    ) -> Outcome:
        """Write the outcome; while the database is away, try again, up to the lease."""
        try:
            written = self._with_db_retry(write, bound)
        except DatabaseUnavailable as exc:
            # The node stays RUNNING without heartbeats: it is rescued when its
            # lease expires and the attempt counted, so nothing is lost.
            bound.error("step.outcome_unwritten", intended=str(outcome), error=str(exc))
            return Outcome.LEASE_LOST
        except CorruptRow as exc:
            # The run could not move on past a row it cannot read; the storage
            # has failed this node and its run with that error.
            bound.error("step.failed", intended=str(outcome), error=str(exc))
            return Outcome.FAILED
        if not written:
            bound.warning("step.lease_lost", intended=str(outcome))
            return Outcome.LEASE_LOST
        level = "warning" if outcome in (Outcome.RETRY, Outcome.FAILED) else "info"
        getattr(bound, level)(f"step.{outcome}", **fields)
        return outcome

    def _with_db_retry(self, write: Callable[[], T], bound: Any) -> T:
        def before_sleep(state: tenacity.RetryCallState) -> None:
            bound.warning(
                "database.unavailable",
                error=str(state.outcome.exception()) if state.outcome else "",
            )

        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(DatabaseUnavailable),
            wait=tenacity.wait_exponential_jitter(multiplier=0.1, max=5.0),
            stop=tenacity.stop_when_event_set(self.stop_retrying)
            | tenacity.stop_after_delay(self.give_up_after),
            before_sleep=before_sleep,
            reraise=True,
        )
        return retrying(write)

    def _unknown_flow(self, node: ClaimedNode) -> str:
        record = self.storage.get_flow(tracking_id=node.tracking_id)
        module = record.plan.module if record else ""
        known = ", ".join(registry.names()) or "none"
        where = (
            f"`flowsmith worker {module}`"
            if module
            else "the worker with the module that defines it"
        )
        return (
            f"flow {node.flow_name!r} is not registered in this worker (it knows: {known}); "
            f"start {where} so the flow's module is imported"
        )


def _call_with_timeout(spec: StepSpec, ctx: Context) -> Any:
    """Call the step; past its timeout, abandon the thread and raise StepTimeout.

    Python cannot kill a thread: the abandoned call may still finish later; its
    result is dropped (the attempt was already recorded as failed), and had it
    reached the storage, the fencing token would refuse it.
    """
    if spec.timeout is None:
        return spec.fn(ctx)
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = spec.fn(ctx)
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=target, name=f"step-{spec.name}", daemon=True)
    thread.start()
    thread.join(spec.timeout)
    if thread.is_alive():
        raise StepTimeout(f"step {spec.name!r} ran longer than its timeout of {spec.timeout} s")
    if "error" in box:
        raise box["error"]
    return box.get("result")


def _check_json(spec: StepSpec, result: Any) -> None:
    try:
        json.dumps(result)
    except (TypeError, ValueError) as exc:
        raise StepOutputNotJSON(
            f"step {spec.name!r} returned a {type(result).__name__}, which cannot be stored as "
            f"JSON ({exc}); return dicts, lists, strings, numbers, booleans or None"
        ) from None


def _child_request(spec: StepSpec, ctx: Context, result: Any) -> NewFlow:
    """The child run a subflow step asked for: {"flow", "tracking_id"[, "data"]}."""
    flow = result.get("flow") if isinstance(result, dict) else None
    if isinstance(flow, str):
        flow = registry.lookup(flow)
    if not isinstance(flow, Flow) or not isinstance(result.get("tracking_id"), str):
        raise TypeError(
            f"subflow step {spec.name!r} must return {{'flow': Flow, 'tracking_id': str}} "
            f"(and optionally 'data': dict), not {result!r}"
        )
    data = result.get("data", ctx.data)
    return flow.new_run(dict(data), result["tracking_id"])


def _describe(exc: BaseException) -> str:
    """The error as kept in fs_nodes.error: the traceback, ending with the message."""
    return "".join(traceback.format_exception(exc)).rstrip()

"""Run one claimed node and record its outcome, fenced by its lease.

Shared by every way of running a node: the worker process, an in-process
worker in tests. The outcome is decided first and written once, so whatever the
step does (raise anything, even KeyboardInterrupt or SystemExit, run past its
timeout, return something that cannot be stored) the worker goes on and the
attempt is accounted for.

Timeouts. Python cannot kill a thread, so a step past its ``timeout`` is not
stopped: the attempt keeps its worker slot and its lease (the heartbeat goes
on) until the call really returns; then it is recorded as failed with
StepTimeout, its late result dropped, and only then is the retry scheduled.
Two attempts of one step therefore never run at the same time, and nothing of
a step runs after its flow FAILED. The alternative, running steps with a
timeout in a child process that can be killed, was not chosen: a step is any
callable of the application (closures, open clients, module state), which a
child process cannot in general receive, and killing it mid-write leaves the
application's side effects as broken as a stuck thread does.

``async def`` steps and conditions are awaited on the process's event loop
(event_loop.py) while the slot thread waits for them, so they keep the slot,
the lease and the fencing of a sync step. They can be stopped: past its
timeout the coroutine is cancelled, and once it has ended the attempt fails
with StepTimeout, as above.

Owns one attempt, from its step's call to its written outcome. Must never let
anything a step does escape to the worker, never write an outcome without its
lease's fence or once the lease may have lapsed (``lease_held``), and never decide
what the run does next: the storage does, with progress.py.
"""

from __future__ import annotations

import copy
import inspect
import json
import shlex
import threading
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any, TypeVar, cast

import tenacity

from flowsmith_worker import compensation, event_loop, fanout, payload, tracing
from flowsmith_worker.child_request import ChildRequest
from flowsmith_worker.context import Context
from flowsmith_worker.errors import (
    CorruptRow,
    DatabaseUnavailable,
    FlowCancelled,
    NotAwaited,
    PayloadNotJSON,
    PayloadRejected,
    RunNotRetryable,
    StepOutputNotJSON,
    StepTimeout,
    SubflowCycle,
)
from flowsmith_worker.event_loop import DeadlinePassed
from flowsmith_worker.flow import FAIL, Flow, Parking, StepSpec, registry
from flowsmith_worker.log import get_logger
from flowsmith_worker.outage import DatabaseOutage
from flowsmith_worker.plan import MAP, WAIT_FOR_EVENT, Plan
from flowsmith_worker.progress import attempts_left, context_data
from flowsmith_worker.rate_limits import RateLimit
from flowsmith_worker.retry import DEFAULT_BACKOFF, retry_delay
from flowsmith_worker.storage.base import (
    ClaimedNode,
    Finished,
    Lease,
    NewFlow,
    NodeStatus,
    Parked,
    Storage,
    Woken,
    Written,
)

T = TypeVar("T")
DEFAULT_GIVE_UP_SECONDS = 30.0
# fs_nodes.error keeps the head and the tail of a longer traceback: an exception
# carrying megabytes of text must not make the failure itself unstorable.
MAX_ERROR_CHARS = 64 * 1024
# Before the first retry of a write that met the database away (then tenacity's backoff).
_FIRST_RETRY_WAIT = 0.1
log = get_logger(__name__)


class Outcome(StrEnum):
    COMPLETED = "completed"
    SKIPPED = "skipped"
    WAITING = "waiting"  # a subflow was started
    STOPPED = "stopped"  # its run was over (failed or cancelled): no subflow was started
    RETRY = "retry_scheduled"
    FAILED = "failed"
    LEASE_LOST = "lease_lost"  # our write was refused: a newer attempt owns the node
    PARKED = "parked"  # a sleep or a wait that is not over: back to PENDING until it is
    # A sleep or a wait that is over, on its way to be completed: never an Executed's outcome.
    WOKEN = "woken"
    # A rate-limited start that found no token: back to PENDING until its turn.
    RATE_LIMITED = "rate_limited"
    # A rate-limited start that took its token and goes on: never an Executed's outcome.
    TOKEN_TAKEN = "token_taken"


@dataclass(frozen=True)
class Executed:
    """What became of a node; ``chained`` is its run's next step, already leased to
    this worker by the same commit (see CompletionBatcher), to run next."""

    outcome: Outcome
    chained: ClaimedNode | None = None
    # When the write that leased ``chained`` was sent: its lease counts from then.
    sent_at: float = 0.0


@dataclass(frozen=True)
class _Failure:
    error: str
    retryable: bool = True
    exception: BaseException | None = None  # what the step raised, if it did
    compensates: bool = True  # a run it fails runs its compensations (End.compensates)

    @property
    def summary(self) -> str:
        """The error's last line: the exception and its message."""
        text = self.error.strip()
        return text.splitlines()[-1] if text else ""


class Executor:
    def __init__(
        self,
        storage: Storage,
        worker_id: str,
        lookup: Callable[[str], Flow | None] = registry.lookup,
        stop_retrying: threading.Event | None = None,
        give_up_after: float = DEFAULT_GIVE_UP_SECONDS,
        lease_held: Callable[[Lease], bool] = lambda _lease: True,
        complete: Callable[[Finished], Written] | None = None,
        outage: DatabaseOutage | None = None,
    ) -> None:
        self.storage = storage
        # Writes a finished attempt; the worker passes its CompletionBatcher's
        # write (group commit and chaining), others write each one alone.
        self.complete = complete or (lambda done: storage.complete_batch(finished=[done])[0])
        self.worker_id = worker_id
        self.lookup = lookup
        # False once this worker cannot be sure it still holds the lease (its
        # renewals failed for a whole lease): the node may be running elsewhere.
        self.lease_held = lease_held
        # Set on a hard stop: give up re-trying a write while the database is away.
        self.stop_retrying = stop_retrying or threading.Event()
        # Past the lease, the node is being rescued and our write would be refused
        # anyway; and an error that only looks transient must not retry forever.
        self.give_up_after = give_up_after
        # Told when a write meets the database away, and when one gets through
        # after that: the worker's other parts meet the same outage, and it is
        # said once for all of them, not once per step and retry.
        self.outage = outage or DatabaseOutage(worker_id)

    def execute(self, node: ClaimedNode) -> Outcome:
        return self.run(node).outcome

    def run(self, node: ClaimedNode) -> Executed:
        """Run the node's step and write its outcome; say what came next."""
        if not tracing.enabled():  # the one cost of tracing to a process that does not trace
            return self._run(node)
        with tracing.attempt_span(node, self.worker_id) as span:
            executed = self._run(node)
            span.record_outcome(str(executed.outcome))
        return executed

    def _run(self, node: ClaimedNode) -> Executed:
        bound = log.bind(
            flow=node.flow_name,
            tracking_id=node.tracking_id,
            step=node.step_name,
            attempt=node.attempt,
            worker_id=self.worker_id,
        )
        flow = self.lookup(node.flow_name)
        spec = flow.get_step(node.step_name) if flow else None
        if flow is not None and spec is None and (map_spec := _map_of_item(flow, node)):
            return self._run_item(node, map_spec, bound)
        if flow is None:
            failure = _Failure(self._unknown_flow(node))
            return Executed(self._record_failure(node, None, failure, bound))
        if spec is None:
            # Not retried here: every attempt on this code would fail the same way.
            # Nor compensated: a deploy that renamed or dropped a step is no failure
            # of the run's work, and a compensated run can never be retried, whereas
            # issue 14.7 has it resumed by a retry once the old code is deployed again.
            failure = _Failure(self._missing_step(node, flow), retryable=False, compensates=False)
            return Executed(self._record_failure(node, None, failure, bound))
        return self._run_spec(node, spec, bound)

    def _run_spec(
        self, node: ClaimedNode, spec: StepSpec, bound: Any, private: bool = True
    ) -> Executed:
        """Run the attempt of ``spec`` on the claimed node and write its outcome;
        ``private``: on a copy of its ctx.data of its own (see _private_copy)."""
        rate = spec.rate_limit
        if rate is not None and spec.parking is not None:
            refused = self._take_token(node, rate, bound)
            if refused is not None:
                return Executed(refused)
        bound.debug("step.started")
        started = time.monotonic()
        # The step gets a copy of its own: what it changes in place must not leak
        # into the ctx.data of a chained next step, which a claim would have read
        # afresh from the stored outputs.
        ctx = Context(
            _private_copy(node.input) if private else node.input,
            tracking_id=node.tracking_id,
            step=node.step_name,
            attempt=node.attempt,
        )
        if spec.parking is not None:
            return self._park_or_wake(node, spec, spec.parking, ctx, bound, started)

        # A rate-limited step takes its token once its condition held, just before
        # its call: a skipped step spends none.
        def take_token() -> Outcome | None:
            assert rate is not None
            return self._take_token(node, rate, bound)

        try:
            proceed, result = _attempt(spec, ctx, bound, None if rate is None else take_token)
            if isinstance(result, _Refused):
                return Executed(result.outcome)
            if not proceed:
                skipped = Finished(node.lease, NodeStatus.SKIPPED, None, step_name=spec.name)
                return self._finish(node, bound, skipped, started)
            if spec.fan_out is not None:
                return Executed(self._start_map(node, spec, result, bound))
            if spec.subflow:
                child = _child_request(spec, ctx, result)
                bound.info(
                    "subflow.starting",
                    child_flow=child.flow_name,
                    child_tracking_id=child.tracking_id,
                )
                waiting = self._write(
                    node,
                    bound,
                    Outcome.WAITING,
                    lambda: _subflow_written(
                        self.storage.start_subflow(lease=node.lease, child=child)
                    ),
                )
                return Executed(waiting)
            output = _encode_output(spec, result)
        except BaseException as exc:
            # Anything a step raises is its attempt's error, KeyboardInterrupt and
            # SystemExit included: only the main thread receives signals (and
            # flowsmith.signals handles those), so here they come from the step's
            # own code, and re-raising them would only kill this pool thread and
            # leave the node to its lease.
            failure = _Failure(_describe(exc), _retryable(exc), exc)
            return Executed(self._record_failure(node, spec, failure, bound))
        completed = Finished(node.lease, NodeStatus.COMPLETED, output, step_name=spec.name)
        return self._finish(node, bound, completed, started)

    def _start_map(self, node: ClaimedNode, spec: StepSpec, items: Any, bound: Any) -> Outcome:
        """Hand a map's items to the storage, which makes a node of each (see fanout.py)."""
        if not isinstance(items, list | tuple):
            _refuse_awaitable(spec, "items function", items)
            failure = _Failure(str(fanout.not_a_list(spec.name, items)), retryable=False)
            return self._record_failure(node, spec, failure, bound)
        texts = [
            payload.encode(item, what=f"item {index} of map {spec.name!r}")
            for index, item in enumerate(items)
        ]
        bound.info("map.starting", items=len(texts))
        return self._write(
            node,
            bound,
            Outcome.WAITING,
            lambda: _map_written(self.storage.start_map(lease=node.lease, items=texts)),
        )

    def _run_item(self, node: ClaimedNode, map_spec: StepSpec, bound: Any) -> Executed:
        """Run one item node of a map: ``each(ctx, item)``, the item read from its node."""
        try:
            stored = self._with_db_retry(
                node.lease, lambda: self.storage.map_item(lease=node.lease)
            )
        except DatabaseUnavailable as exc:
            bound.error("step.outcome_unwritten", intended="run item", error=str(exc))
            return Executed(Outcome.LEASE_LOST)
        if stored is None:
            bound.warning("step.lease_lost", intended="run item")
            return Executed(Outcome.LEASE_LOST)
        assert map_spec.fan_out is not None
        item_spec = map_spec.fan_out.for_item(map_spec, node.step_name, json.loads(stored))
        # Its ctx.data was parsed for it alone and no step is chained after an item
        # (see fanout.py): the private copy, costly for a map over a long list, is not needed.
        return self._run_spec(node, item_spec, bound, private=False)

    def _finish(
        self, node: ClaimedNode, bound: Any, finished: Finished, started: float
    ) -> Executed:
        """Write a completed or skipped attempt; the chained next step, if any, comes back."""
        answers: list[Written] = []
        sent_at = 0.0

        def write() -> bool:
            nonlocal sent_at
            sent_at = time.monotonic()
            # A second send may follow a first that committed but whose answer
            # was lost: the storage then recognises the attempt as already ours.
            answers.append(self.complete(replace(finished, replay=True) if answers else finished))
            return answers[-1].won

        outcome = Outcome.COMPLETED if finished.status == NodeStatus.COMPLETED else Outcome.SKIPPED
        elapsed = round(time.monotonic() - started, 6)
        written = self._write(node, bound, outcome, write, seconds=elapsed)
        if written != outcome or not answers or answers[-1].chained is None:
            return Executed(written)
        chained = answers[-1].chained
        data = node.input
        if finished.output is not None:
            data = context_data(node.input, [(node.step_name, json.loads(finished.output))])
        next_node = ClaimedNode(
            chained.lease,
            node.flow_name,
            node.tracking_id,
            chained.step_name,
            chained.max_attempts,
            data,
            node.trace_parent,
        )
        return Executed(written, next_node, sent_at)

    def _park_or_wake(
        self,
        node: ClaimedNode,
        spec: StepSpec,
        parking: Parking,
        ctx: Context,
        bound: Any,
        started: float,
    ) -> Executed:
        """A sleep or a wait for an event: complete it if it is over, else park it
        (see parking.py). Nothing of the application's runs but a sleep's ``until``."""
        try:
            seconds, until = parking.wake_time(ctx)
        except Exception as exc:
            failure = _Failure(_describe(exc), retryable=False)
            return Executed(self._record_failure(node, spec, failure, bound))
        answers: list[Woken | Parked | None] = []

        def write() -> bool | Outcome:
            answers.append(
                self.storage.park_node(
                    lease=node.lease,
                    event=spec.name if parking.kind == WAIT_FOR_EVENT else None,
                    seconds=seconds,
                    until=until,
                )
            )
            return _parking_written(answers[-1])

        written = self._write(node, bound, Outcome.PARKED, write)
        woken = answers[-1] if answers else None
        if written != Outcome.WOKEN or not isinstance(woken, Woken):
            return Executed(written)
        if woken.by_event or parking.kind != WAIT_FOR_EVENT:
            output = woken.event_payload or "null"  # a sleep's output is None
        elif parking.on_timeout == FAIL:
            stored = self._stored_plan(node)
            compensates = stored is not None and stored.compensates
            failure = _Failure(
                _wait_timed_out(spec.name, parking.seconds, compensates), retryable=False
            )
            return Executed(self._record_failure(node, spec, failure, bound))
        else:
            output = payload.encode(parking.on_timeout, what=f"on_timeout of {spec.name!r}")
        completed = Finished(node.lease, NodeStatus.COMPLETED, output, step_name=spec.name)
        return self._finish(node, bound, completed, started)

    def _take_token(self, node: ClaimedNode, rate: RateLimit, bound: Any) -> Outcome | None:
        """None when the step may start (its token is taken); else what became of the
        node: RATE_LIMITED (it waits for its turn), STOPPED or LEASE_LOST."""

        def write() -> bool | Outcome:
            answer = self.storage.take_rate_token(
                lease=node.lease, flow_name=node.flow_name, step_name=node.step_name, rate=rate
            )
            return _token_written(answer)

        written = self._write(node, bound, Outcome.RATE_LIMITED, write, rate_limit=rate.text)
        return None if written == Outcome.TOKEN_TAKEN else written

    def _record_failure(
        self, node: ClaimedNode, spec: StepSpec | None, failure: _Failure, bound: Any
    ) -> Outcome:
        retry = failure.retryable and attempts_left(node.attempt, node.max_attempts)
        delay = (
            retry_delay(spec.backoff if spec else DEFAULT_BACKOFF, node.attempt) if retry else None
        )
        outcome = Outcome.RETRY if retry else Outcome.FAILED
        tracing.attempt_failed(failure.exception, failure.summary)
        written = self._write(
            node,
            bound,
            outcome,
            lambda: _failure_written(
                self.storage.fail_node(
                    lease=node.lease,
                    error=failure.error,
                    retry_delay=delay,
                    compensate=failure.compensates,
                )
            ),
            error=failure.summary,
            retry_in=None if delay is None else round(delay, 3),
        )
        return written

    def _write(
        self,
        node: ClaimedNode,
        bound: Any,
        outcome: Outcome,
        write: Callable[[], bool | Outcome],
        **fields: Any,
    ) -> Outcome:
        """Write the outcome; while the database is away, try again, up to the lease.

        ``write`` returns True when written as intended, False when the lease was
        lost, or the Outcome the storage recorded instead.
        """
        if not self.lease_held(node.lease):
            return self._withhold(bound, outcome)
        try:
            written = self._with_db_retry(node.lease, write)
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
        except PayloadRejected as exc:
            if outcome in (Outcome.RETRY, Outcome.FAILED):
                raise  # a failure stores no JSON: this cannot happen, and must not loop
            # What this outcome would also store is over the limits: the last step
            # of a subflow stores the child's final ctx.data as its parent step's
            # output. Fail the attempt now rather than leave the node to its lease;
            # running it again cannot help.
            error = f"step {node.step_name!r} finished, but its outcome cannot be stored: {exc}"
            return self._record_failure(node, None, _Failure(error, retryable=False), bound)
        if not written:
            bound.warning("step.lease_lost", intended=str(outcome))
            return Outcome.LEASE_LOST
        if isinstance(written, Outcome):
            outcome = written
        level = "warning" if outcome in (Outcome.RETRY, Outcome.FAILED) else "info"
        getattr(bound, level)(f"step.{outcome}", **fields)
        return outcome

    def _withhold(self, bound: Any, outcome: Outcome) -> Outcome:
        """Our lease may have expired: the node may already run elsewhere, so write nothing."""
        bound.error(
            "step.outcome_withheld",
            intended=str(outcome),
            reason="the lease was not renewed in time; the node is rescued when it expires",
        )
        return Outcome.LEASE_LOST

    def _with_db_retry(self, lease: Lease, write: Callable[[], T]) -> T:
        try:
            return write()  # the usual case: no retry machinery built for it
        except DatabaseUnavailable as exc:
            self.outage.failed(exc, noticed_by="a step's outcome write")
            if self.stop_retrying.is_set() or not self.lease_held(lease):
                raise
            self.stop_retrying.wait(_FIRST_RETRY_WAIT)

        def before_sleep(state: tenacity.RetryCallState) -> None:
            error = state.outcome.exception() if state.outcome else None
            if error is not None:
                self.outage.failed(error, noticed_by="a step's outcome write")

        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(DatabaseUnavailable),
            wait=tenacity.wait_exponential_jitter(multiplier=0.1, max=5.0),
            stop=tenacity.stop_any(
                tenacity.stop_when_event_set(self.stop_retrying),
                tenacity.stop_after_delay(self.give_up_after),
                _StopWhen(lambda: not self.lease_held(lease)),
            ),
            before_sleep=before_sleep,
            reraise=True,
        )
        written = retrying(write)
        self.outage.answered()
        return written

    def _missing_step(self, node: ClaimedNode, flow: Flow) -> str:
        """The code under the run changed: say which step, which plan and what to do."""
        stored, deployed = self._stored_plan(node), flow.plan()
        enqueued = f"plan version {stored.version}" if stored else "its stored plan"
        if compensation.is_compensation(node.step_name):
            # The run is COMPENSATING: this compensation fails for good, the others
            # run (compensation.py), and a compensated run is not retried.
            undone = compensation.compensated_step(node.step_name)
            return (
                f"compensate= of step {undone!r} is no longer in the code: flow "
                f"{node.flow_name!r} has it in the plan this run was enqueued with "
                f"({enqueued}), not in this worker's code (plan version {deployed.version}); "
                f"the step was not undone (undo it by hand), the run's other compensations "
                f"go on, and the run ends FAILED with COMPENSATION_FAILED"
            )
        # An item of a map removed from the code: the map is what the code lacks.
        item_of = fanout.parse_item_name(node.step_name)
        planned = None if item_of is None or stored is None else stored.step(item_of[0])
        if item_of is not None and planned is not None and planned.kind == MAP:
            step = f"map {item_of[0]!r}"
            missing = f"step {node.step_name!r} (item {item_of[1]} of {step})"
        else:
            step = f"step {node.step_name!r}"
            missing = step
        return (
            f"{missing} of flow {node.flow_name!r} is in the plan this run was "
            f"enqueued with ({enqueued}) but not in this worker's code (plan version "
            f"{deployed.version}, steps: {', '.join(deployed.names()) or 'none'}); "
            f"deploy code that has {step}, then "
            f"`flowsmith retry {shlex.quote(node.tracking_id)}`"
        )

    def _stored_plan(self, node: ClaimedNode) -> Plan | None:
        record = self.storage.get_flow(tracking_id=node.tracking_id, with_payloads=False)
        return None if record is None or "plan" in record.unreadable else record.plan

    def _unknown_flow(self, node: ClaimedNode) -> str:
        stored = self._stored_plan(node)
        module = stored.module if stored else ""
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


class _StopWhen(tenacity.stop.stop_base):
    """Stop re-trying a write once ``done()``: here, when the lease may be gone."""

    def __init__(self, done: Callable[[], bool]) -> None:
        self.done = done

    def __call__(self, retry_state: tenacity.RetryCallState) -> bool:
        return self.done()


@dataclass(frozen=True)
class _Refused:
    """_attempt's result when its gate refused the step's start (no token of its
    rate limit): what became of the node (RATE_LIMITED, STOPPED, LEASE_LOST)."""

    outcome: Outcome


def _attempt(
    spec: StepSpec, ctx: Context, bound: Any, gate: Callable[[], Outcome | None] | None = None
) -> tuple[bool, Any]:
    """Evaluate the condition, then call the step: (False, None) when the condition is false.

    ``gate``, if any, is asked between the two (the step's rate limit: see _run_spec):
    None lets the step be called; else (False, _Refused) and the step is not called.
    The condition and the call run under one timeout (see the module docstring):
    past it a timer logs ``step.timed_out``; a sync call goes on, a coroutine is
    cancelled; when the call has ended, its result (or error) is dropped and
    StepTimeout raised instead.
    """

    def condition_then_call(deadline: float | None) -> tuple[bool, Any]:
        if not _condition_holds(spec, ctx, deadline):
            return False, None
        if gate is not None and (refused := gate()) is not None:
            return False, _Refused(refused)
        return True, _call(spec, ctx, deadline)

    if spec.timeout is None:
        return condition_then_call(None)
    started = time.monotonic()
    timer = threading.Timer(
        spec.timeout,
        lambda: bound.warning(
            "step.timed_out",
            timeout=spec.timeout,
            action=(
                "cancelling the coroutine; the retry waits for it to end"
                if spec.awaits
                else "waiting for the call to return; the retry waits for it"
            ),
        ),
    )
    timer.name = f"flowsmith-timeout-{spec.name}"
    timer.daemon = True
    timer.start()
    try:
        outcome = condition_then_call(started + spec.timeout)
    except BaseException as exc:
        if time.monotonic() - started <= spec.timeout and not isinstance(exc, DeadlinePassed):
            raise
        raise _timed_out(spec, started) from exc
    finally:
        timer.cancel()
    if isinstance(outcome[1], _Refused):
        return outcome  # the node was written (parked, stopped): no attempt to time out
    if time.monotonic() - started > spec.timeout:
        raise _timed_out(spec, started)
    return outcome


def _condition_holds(spec: StepSpec, ctx: Context, deadline: float | None) -> bool:
    """Whether the step is to run: no condition, or it says so; an ``async def``
    condition is awaited on the event loop (cancelled at ``deadline``)."""
    condition = spec.condition
    if condition is None:
        return True
    verdict = (
        event_loop.run(lambda: cast(Awaitable[bool], condition(ctx)), deadline)
        if spec.condition_is_async
        else condition(ctx)
    )
    return verdict is True or _verdict(spec, verdict)


def _call(spec: StepSpec, ctx: Context, deadline: float | None) -> Any:
    """Call the step; an ``async def`` step is awaited on the event loop (cancelled
    at ``deadline``), a sync one is called in this thread, as always."""
    if spec.fn_is_async:
        return event_loop.run(lambda: spec.fn(ctx), deadline)
    return spec.fn(ctx)


def _verdict(spec: StepSpec, verdict: Any) -> bool:
    """A condition's answer as a bool; a coroutine from a condition that is not ``async
    def`` (a lambda calling an async function) is refused, not taken as true."""
    if verdict is True or verdict is False:  # the usual case, checked first and cheaply
        return verdict
    _refuse_awaitable(spec, "condition", verdict)
    return bool(verdict)


def _refuse_awaitable(spec: StepSpec, what: str, value: Any) -> None:
    """A sync function that returned a coroutine: close it (no "never awaited" warning) and
    fail the attempt for good, since running it again returns one again."""
    if not inspect.isawaitable(value):
        return
    if inspect.iscoroutine(value):
        value.close()
    raise NotAwaited(
        f"the {what} of step {spec.name!r} returned {type(value).__name__} without being an "
        f"async function: declare it `async def` (FlowSmith awaits those) or await inside it"
    )


def _timed_out(spec: StepSpec, started: float) -> StepTimeout:
    return StepTimeout(
        f"step {spec.name!r} ran {time.monotonic() - started:.1f} s, longer than its timeout "
        f"of {spec.timeout} s; its result was dropped"
    )


# Values a step cannot change in place: a dict of only these needs no deep copy.
_IMMUTABLE = (str, int, float, bool, type(None))


def _private_copy(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` for one step, so that what the step changes in place stays its own.

    Context copies the dict itself; a deep copy (the costly part) is needed only
    when a value inside could be changed in place, such as a step's list output.
    """
    if all(isinstance(value, _IMMUTABLE) for value in data.values()):
        return data
    return copy.deepcopy(data)


def _encode_output(spec: StepSpec, result: Any) -> str:
    """The output as the JSON text to store; an output that cannot be stored is
    refused here, before the database sees it."""
    try:
        return payload.encode(
            result, what=f"step {spec.name!r} returned a {type(result).__name__}, which"
        )
    except PayloadNotJSON as exc:
        _refuse_awaitable(spec, "function", result)  # checked only once it is not JSON
        raise StepOutputNotJSON(str(exc)) from None


def _subflow_written(status: NodeStatus | None) -> bool | Outcome:
    """What start_subflow's answer means for _write: a node its run's end stopped is
    not WAITING for any child."""
    if status is None:
        return False
    return Outcome.STOPPED if status == NodeStatus.CANCELLED else True


def _map_written(status: NodeStatus | None) -> bool | Outcome:
    """What start_map's answer means for _write: an empty list completed the map at
    once; a map whose run is over started no item."""
    if status is None:
        return False
    if status == NodeStatus.COMPLETED:
        return Outcome.COMPLETED
    return True if status == NodeStatus.WAITING else Outcome.STOPPED


def _map_of_item(flow: Flow, node: ClaimedNode) -> StepSpec | None:
    """The map step whose item node ``node`` is; None if it is no item of a map."""
    found = fanout.parse_item_name(node.step_name)
    if found is None:
        return None
    spec = flow.get_step(found[0])
    return spec if spec is not None and spec.fan_out is not None else None


def _failure_written(status: NodeStatus | None) -> bool | Outcome:
    """What fail_node's answer means for _write: a run that is already over
    schedules no retry, whatever was intended."""
    if status is None:
        return False
    return {
        NodeStatus.PENDING: Outcome.RETRY,
        NodeStatus.FAILED: Outcome.FAILED,
    }.get(status, Outcome.STOPPED)


def _parking_written(answer: Woken | Parked | None) -> bool | Outcome:
    """What park_node's answer means for _write: a node whose run is over is not parked."""
    if answer is None:
        return False
    if isinstance(answer, Woken):
        return Outcome.WOKEN
    return True if answer.status == NodeStatus.PENDING else Outcome.STOPPED


def _token_written(answer: bool | Parked | None) -> bool | Outcome:
    """What take_rate_token's answer means for _write: True, a token, lets the step start."""
    if isinstance(answer, Parked):
        return _parking_written(answer)
    return Outcome.TOKEN_TAKEN if answer else False


def _wait_timed_out(name: str, timeout: float | None, compensates: bool = False) -> str:
    """The error of a wait_for step whose event did not come in time (on_timeout="fail").

    ``compensates``: the run's plan has compensations. Then the failure runs those of
    its completed steps, and a run they undid refuses `flowsmith retry`; say so rather
    than promise a retry that may be refused."""
    resume = (
        f"`flowsmith retry` the run (it waits afresh) and send the event "
        f"(`flowsmith send-event TRACKING_ID {name} --data JSON`)"
    )
    if compensates:
        return (
            f"wait_for {name!r} timed out: no event {name!r} was sent to this run within "
            f"{timeout} s; the run's compensations now undo its completed steps, and a run "
            f"they undid cannot be retried (start a new run with a new tracking_id); if none "
            f"ran (`flowsmith status` shows no compensate: step), {resume}"
        )
    return (
        f"wait_for {name!r} timed out: no event {name!r} was sent to this run within "
        f"{timeout} s; to go on, {resume}"
    )


def _retryable(exc: BaseException) -> bool:
    # A cancelled child stays cancelled, a compensated child refuses to be resumed
    # (RunNotRetryable), a subflow cycle stays a cycle, a value over the payload
    # limits is refused again, and a sync function returns its coroutine again:
    # running the step again cannot help.
    return not isinstance(
        exc, FlowCancelled | RunNotRetryable | SubflowCycle | PayloadRejected | NotAwaited
    )


def _child_request(spec: StepSpec, ctx: Context, result: Any) -> NewFlow:
    """The child run a subflow step asked for: a ChildRequest (Flow.subflow_from), which
    @subflow makes of its function's dict."""
    if not isinstance(result, ChildRequest):
        _refuse_awaitable(spec, "function", result)
        raise TypeError(
            f"subflow step {spec.name!r} must return {{'flow': Flow, 'tracking_id': str}} "
            f"(and optionally 'data': dict) or a ChildRequest, not {result!r}"
        )
    return result.new_run(ctx.data)


def _describe(exc: BaseException) -> str:
    """The error as kept in fs_nodes.error: the traceback, ending with the message."""
    text = "".join(traceback.format_exception(exc)).rstrip()
    if len(text) <= MAX_ERROR_CHARS:
        return text
    half = MAX_ERROR_CHARS // 2
    cut = len(text) - 2 * half
    return f"{text[:half]}\n[... {cut} characters cut ...]\n{text[-half:]}"

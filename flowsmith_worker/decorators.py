"""The decorator API: a flow written as nested functions, in the order they run.

::

    from flowsmith_worker.decorators import workflow, step, parallel, subflow

    @workflow("checkout_process")
    def process_order():
        @step(retries=3)
        def fetch_inventory(ctx):
            return {"in_stock": True, "price": 100}

        @step(condition=lambda ctx: ctx.data["fetch_inventory"]["in_stock"])
        def reserve_items(ctx): ...

        @parallel
        def notify_phase():
            @step
            def email(ctx): ...

            @step
            def sms(ctx): ...

        @subflow
        def invoice(ctx):
            return {"flow": send_invoice, "tracking_id": f"inv_{ctx.data['order_id']}"}

    run = process_order(Context({"order_id": 7}), tracking_id="order_7")   # a FlowRun

How it works: ``@workflow`` creates a :class:`~flowsmith_worker.flow.Flow` and calls
the decorated body once, right away, while that Flow is "being built" (a
context variable, so threads importing modules at the same time cannot mix
their flows). Each nested ``@step``, ``@parallel`` and ``@subflow`` adds to that
Flow as it is applied, which is the order written. The Flow is registered by
its name as it is created, so importing the module is all a
``flowsmith worker module`` needs. Nothing here changes how a flow runs: it is
the builder API (``Flow.step``, ``Flow.parallel``, subflow steps) in another
spelling, with the same engine underneath.

Decisions, written down:

* ``@step``, ``@parallel`` and ``@subflow`` return the function unchanged, so
  a step can still be unit-tested by calling it with a Context.
* ``@step`` and ``@subflow`` functions and conditions may be ``async def``:
  the worker awaits them on its event loop (see event_loop.py).
* A step is named after its function unless ``name=`` says otherwise; a
  ``@workflow`` with no name is named after its function.
* ``@parallel`` and ``@subflow`` work bare or called (``@parallel()``,
  ``@subflow(retries=2, condition=...)``). A ``@subflow`` may sit inside a
  ``@parallel`` block; ``@parallel`` blocks cannot nest (as with
  ``Flow.parallel()``).
* A ``@subflow`` function returns ``{"flow": child, "tracking_id": str}``, plus
  ``"data": dict`` to give the child an input other than the parent's ctx.data.
  ``child`` is a Flow, a ``@workflow`` object or a registered flow's name. With
  no ``tracking_id`` (or None) the child's is ``"<parent tracking_id>:<step>"``,
  the builder's default. Keep it a function of ctx.data: a resumed parent then
  resumes the same child run instead of starting a new one.
* ``@sleep`` decorates a function of ctx that says when the sleep ends (a
  timezone-aware datetime, or a timedelta or seconds from when it begins).
  ``wait_for("name", timeout=..., on_timeout=...)`` is called in the body, not
  applied: a wait has no function of its own. Both are ``Flow.sleep`` and
  ``Flow.wait_for``: parked steps that hold no slot (see parking.py).
* A mistake in the definition (a decorator outside a ``@workflow`` body, a
  workflow or ``@parallel`` block without steps, an exception in the body)
  raises at import time, and an aborted definition is not left registered.

Owns only the spelling. Must never write to a storage or keep state beyond the flow
being built: every definition ends in the Flow builder, so both APIs give the same
plan and run on the same engine.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar, overload

from flowsmith_worker import event_loop
from flowsmith_worker.child_request import ChildRequest
from flowsmith_worker.context import Context
from flowsmith_worker.errors import InvalidFlowDefinition
from flowsmith_worker.flow import (
    FAIL,
    Condition,
    Flow,
    ItemsSource,
    KeyFunction,
    StepFunction,
    WakeTime,
    registry,
)
from flowsmith_worker.plan import DEFAULT_MAX_RESCUES
from flowsmith_worker.retry import Backoff
from flowsmith_worker.run import FlowRun
from flowsmith_worker.storage.base import DEFAULT_QUEUE, Storage

__all__ = ["Workflow", "parallel", "sleep", "step", "subflow", "wait_for", "workflow"]

StepFn = TypeVar("StepFn", bound=Callable[[Context], Any])
BlockFn = TypeVar("BlockFn", bound=Callable[[], Any])
ItemFn = TypeVar("ItemFn", bound=Callable[[Context, Any], Any])
WorkflowBody = Callable[[], Any]

# The Flow whose @workflow body is running in this thread (or task), if any.
_building: ContextVar[Flow | None] = ContextVar("flowsmith_building", default=None)


class Workflow:
    """What ``@workflow`` returns: call it to enqueue a run; ``.flow`` is the Flow."""

    def __init__(self, flow: Flow, body: WorkflowBody) -> None:
        self.flow = flow
        self.name = flow.name
        functools.update_wrapper(self, body, updated=())

    def __repr__(self) -> str:
        return f"<workflow {self.name!r} ({len(self.flow.stages)} stages)>"

    def __call__(
        self,
        ctx: Context | dict[str, Any] | None = None,
        tracking_id: str | None = None,
        delay: float | None = None,
        connection: Any = None,
        run_at: datetime | None = None,
    ) -> FlowRun:
        """Enqueue a run durably and return its handle at once (see ``Flow.run``)."""
        return self.flow.run(
            ctx, tracking_id=tracking_id, delay=delay, connection=connection, run_at=run_at
        )

    run = __call__

    async def run_async(
        self,
        ctx: Context | dict[str, Any] | None = None,
        tracking_id: str | None = None,
        delay: float | None = None,
        connection: Any = None,
        run_at: datetime | None = None,
    ) -> FlowRun:
        """``run`` for async code: the event loop goes on meanwhile (see ``Flow.run_async``)."""
        return await self.flow.run_async(
            ctx, tracking_id=tracking_id, delay=delay, connection=connection, run_at=run_at
        )

    def get_run(self, tracking_id: str) -> FlowRun:
        """The handle of this workflow's run with that tracking_id (see ``Flow.get_run``)."""
        return self.flow.get_run(tracking_id)


@dataclass(frozen=True)
class Limits:
    """A workflow's concurrency limit (Flow's concurrency_key and max_concurrent)."""

    concurrency_key: KeyFunction | None = None
    max_concurrent: int | None = None


@overload
def workflow(name: WorkflowBody, /) -> Workflow: ...


@overload
def workflow(
    name: str | None = None,
    /,
    *,
    storage: Storage | None = None,
    queue: str = DEFAULT_QUEUE,
    priority: int = 0,
    schedule: str | None = None,
    concurrency_key: KeyFunction | None = None,
    max_concurrent: int | None = None,
) -> Callable[[WorkflowBody], Workflow]: ...


def workflow(
    name: str | WorkflowBody | None = None,
    /,
    *,
    storage: Storage | None = None,
    queue: str = DEFAULT_QUEUE,
    priority: int = 0,
    schedule: str | None = None,
    concurrency_key: KeyFunction | None = None,
    max_concurrent: int | None = None,
) -> Workflow | Callable[[WorkflowBody], Workflow]:
    """Define a flow from a function whose body declares its steps.

    ``@workflow("name")``, ``@workflow(name, storage=..., queue=..., priority=...)``
    or bare ``@workflow`` (named after the function). The body runs once, now.
    ``schedule="*/5 * * * *"`` runs it at every cron tick (``Flow.schedule``).
    ``concurrency_key=lambda ctx: ..., max_concurrent=N`` limits its runs in flight
    per key (see ``Flow``).
    """
    if callable(name):
        return _build(name, name.__name__, None, DEFAULT_QUEUE, 0)
    if name is not None and not isinstance(name, str):
        raise TypeError(f"@workflow(name): the name must be a string, not {name!r}")

    def decorate(body: WorkflowBody) -> Workflow:
        limits = Limits(concurrency_key, max_concurrent)
        return _build(body, name or body.__name__, storage, queue, priority, schedule, limits)

    return decorate


def _build(
    body: WorkflowBody,
    name: str,
    storage: Storage | None,
    queue: str,
    priority: int,
    schedule: str | None = None,
    limits: Limits | None = None,
) -> Workflow:
    if not callable(body):
        raise TypeError(f"@workflow({name!r}) decorates a function, not {body!r}")
    if event_loop.is_async(body):
        raise TypeError(
            f"@workflow({name!r}) on an async function: its body runs once, now, to declare "
            "the steps; make it a plain def (its steps may be async def)"
        )
    limits = limits or Limits()
    flow = Flow(
        name,
        storage,
        queue=queue,
        priority=priority,
        concurrency_key=limits.concurrency_key,
        max_concurrent=limits.max_concurrent,
    )
    token = _building.set(flow)
    try:
        body()
        if not flow.stages:
            raise InvalidFlowDefinition(
                f"workflow {name!r} defines no steps: declare them inside its body "
                "with @step, @parallel or @subflow"
            )
        if schedule is not None:
            flow.schedule(schedule)
    except BaseException:
        # A half-built flow must not stay registered under a name users will reuse.
        if registry.lookup(name) is flow:
            registry.unregister(name)
        raise
    finally:
        _building.reset(token)
    return Workflow(flow, body)


def _current(decorator: str, target: Callable[..., Any]) -> Flow:
    flow = _building.get()
    if flow is None:
        where = getattr(target, "__qualname__", repr(target))
        raise InvalidFlowDefinition(
            f"{decorator} on {where} is outside a @workflow body: define steps inside the "
            "function decorated with @workflow(...), or use Flow.step() to build a flow by hand"
        )
    return flow


def _check_callable(decorator: str, target: object, *args: object) -> None:
    """A function callable as the engine will call it: (ctx) for steps, (ctx, item) for
    a map's, () for blocks.

    Steps may be ``async def`` (see event_loop.py); blocks (``@parallel``) may not,
    since they run once, now, while the workflow is defined.
    """
    if not callable(target):
        raise TypeError(f"{decorator} decorates a function, not {target!r}")
    where = getattr(target, "__qualname__", repr(target))
    if not args and event_loop.is_async(target):
        raise TypeError(
            f"{decorator} on async function {where!r}: the block runs once, while the "
            "workflow is defined; make it a plain def (its steps may be async def)"
        )
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        return  # no signature to check (some builtins): the call will tell
    try:
        signature.bind(*args)
    except TypeError:
        takes = {0: "no arguments", 1: "one argument, ctx"}.get(len(args), "(ctx, item)")
        raise TypeError(f"{decorator} on {where}{signature}: it must take {takes}") from None


@overload
def step(fn: StepFn, /) -> StepFn: ...


@overload
def step(
    *,
    name: str | None = None,
    retries: int = 0,
    timeout: float | None = None,
    backoff: Backoff | None = None,
    condition: Condition | None = None,
    max_rescues: int = DEFAULT_MAX_RESCUES,
    compensate: StepFunction | None = None,
    compensate_retries: int | None = None,
    rate_limit: str | None = None,
) -> Callable[[StepFn], StepFn]: ...


def step(
    fn: StepFn | None = None,
    /,
    *,
    name: str | None = None,
    retries: int = 0,
    timeout: float | None = None,
    backoff: Backoff | None = None,
    condition: Condition | None = None,
    max_rescues: int = DEFAULT_MAX_RESCUES,
    compensate: StepFunction | None = None,
    compensate_retries: int | None = None,
    rate_limit: str | None = None,
) -> StepFn | Callable[[StepFn], StepFn]:
    """Declare a step of the workflow being defined, bare or with options.

    ``retries=N`` allows N + 1 attempts; ``timeout`` is in seconds; ``backoff`` is
    seconds or a tenacity wait strategy; ``condition(ctx)`` False skips the step
    (it leaves no output and the flow goes on), and raising fails it. The step
    and its condition may be ``async def``; past its timeout a coroutine is cancelled.
    ``max_rescues`` bounds the re-runs after its worker was lost (not retries).
    ``compensate(ctx)`` undoes the step if the run fails for good after it
    completed (``compensate_retries``: its own retries, the step's by default).
    ``rate_limit="100/m"`` allows at most that many starts per period across all
    workers (see Flow.step).
    """

    def decorate(target: StepFn) -> StepFn:
        flow = _current("@step", target)
        _check_callable("@step", target, None)
        flow.step(
            name or target.__name__,
            target,
            retries=retries,
            timeout=timeout,
            backoff=backoff,
            condition=condition,
            max_rescues=max_rescues,
            compensate=compensate,
            compensate_retries=compensate_retries,
            rate_limit=rate_limit,
        )
        return target

    if fn is not None:
        return decorate(fn)
    return decorate


SleepFn = TypeVar("SleepFn", bound=WakeTime)


@overload
def sleep(fn: SleepFn, /) -> SleepFn: ...


@overload
def sleep(*, name: str | None = None) -> Callable[[SleepFn], SleepFn]: ...


def sleep(
    fn: SleepFn | None = None, /, *, name: str | None = None
) -> SleepFn | Callable[[SleepFn], SleepFn]:
    """Declare a durable sleep: the function of ctx says when it ends.

    It returns a timezone-aware datetime, or a timedelta or a number of
    seconds counted from when the sleep begins. The run holds no slot or
    thread while it sleeps (``Flow.sleep``); the step's output is None.
    """

    def decorate(target: SleepFn) -> SleepFn:
        flow = _current("@sleep", target)
        _check_callable("@sleep", target, None)
        flow.sleep(name or target.__name__, until=target)
        return target

    if fn is not None:
        return decorate(fn)
    return decorate


def map_step(
    *,
    items: ItemsSource,
    name: str | None = None,
    max_parallel: int | None = None,
    retries: int = 0,
    timeout: float | None = None,
    backoff: Backoff | None = None,
    allow_failures: bool = False,
    condition: Condition | None = None,
    max_rescues: int = DEFAULT_MAX_RESCUES,
) -> Callable[[ItemFn], ItemFn]:
    """Declare a fan-out: the function of ``(ctx, item)`` runs once per item of
    ``items(ctx)``, a node per item across the workers (``Flow.map``'s rules).

    Named map_step, not map (the builtin) nor @step(map=...): the function takes
    an item besides ctx, so it is another kind of step, and says so where it is
    declared. Its output is the list of the items' outputs, in item order.
    """

    def decorate(target: ItemFn) -> ItemFn:
        flow = _current("@map_step", target)
        _check_callable("@map_step", target, None, None)
        flow.map(
            name or target.__name__,
            target,
            items=items,
            max_parallel=max_parallel,
            retries=retries,
            timeout=timeout,
            backoff=backoff,
            allow_failures=allow_failures,
            condition=condition,
            max_rescues=max_rescues,
        )
        return target

    return decorate


def wait_for(name: str, *, timeout: float | None = None, on_timeout: Any = FAIL) -> None:
    """Declare, inside a @workflow body, a step that waits for the event ``name``.

    Called, not a decorator (there is no function to run): ``Flow.wait_for``'s
    rules apply, and the event's payload (``send_event``) is the step's output.
    """
    flow = _building.get()
    if flow is None:
        raise InvalidFlowDefinition(
            f"wait_for({name!r}) is outside a @workflow body: call it inside the function "
            "decorated with @workflow(...), or use Flow.wait_for() to build a flow by hand"
        )
    flow.wait_for(name, timeout=timeout, on_timeout=on_timeout)


@overload
def parallel(fn: BlockFn, /) -> BlockFn: ...


@overload
def parallel() -> Callable[[BlockFn], BlockFn]: ...


def parallel(fn: BlockFn | None = None, /) -> BlockFn | Callable[[BlockFn], BlockFn]:
    """Run the steps declared in the decorated function at the same time.

    The function is called once, now; the step after the block starts when all
    of the block's steps are done (completed or skipped).
    """

    def decorate(target: BlockFn) -> BlockFn:
        flow = _current("@parallel", target)
        _check_callable("@parallel", target)
        before = len(flow.stages)
        with flow.parallel():
            target()
        if len(flow.stages) == before:
            raise InvalidFlowDefinition(
                f"workflow {flow.name!r}: @parallel block {target.__name__!r} declares no steps"
            )
        return target

    if fn is not None:
        return decorate(fn)
    return decorate


@overload
def subflow(fn: StepFn, /) -> StepFn: ...


@overload
def subflow(
    *,
    name: str | None = None,
    retries: int = 0,
    backoff: Backoff | None = None,
    condition: Condition | None = None,
    max_rescues: int = DEFAULT_MAX_RESCUES,
) -> Callable[[StepFn], StepFn]: ...


def subflow(
    fn: StepFn | None = None,
    /,
    *,
    name: str | None = None,
    retries: int = 0,
    backoff: Backoff | None = None,
    condition: Condition | None = None,
    max_rescues: int = DEFAULT_MAX_RESCUES,
) -> StepFn | Callable[[StepFn], StepFn]:
    """Declare a step that runs a child flow; the child's final data is its output.

    The function returns ``{"flow": child, "tracking_id": str[, "data": dict]}``
    (or a ChildRequest, as ``Flow.subflow_from``'s functions do).
    The parent's node waits for the child without holding a worker slot; a
    failed child fails this step, and resuming the parent resumes that child.
    ``retries`` apply to the function raising and to the child failing: a retry
    runs the function again, and its tracking_id resumes the same child run.
    ``max_rescues`` bounds the re-runs of the function after its worker was lost.
    """

    def decorate(target: StepFn) -> StepFn:
        flow = _current("@subflow", target)
        _check_callable("@subflow", target, None)
        step_name = name or target.__name__
        flow.subflow_from(
            step_name,
            _child_starter(target, step_name),
            retries,
            backoff,
            condition,
            max_rescues,
        )
        return target

    if fn is not None:
        return decorate(fn)
    return decorate


def _child_starter(target: Callable[[Context], Any], step_name: str) -> Callable[[Context], Any]:
    """The user's subflow function, with its answer put in the executor's terms; ``async
    def`` if the function is, so the executor awaits it."""

    def answer_of(ctx: Context, result: Any) -> Any:
        return _as_child_request(result, f"{ctx.tracking_id}:{step_name}")

    if event_loop.is_async(target):

        @functools.wraps(target)
        async def start_child_async(ctx: Context) -> Any:
            return answer_of(ctx, await target(ctx))

        return start_child_async

    @functools.wraps(target)
    def start_child(ctx: Context) -> Any:
        return answer_of(ctx, target(ctx))

    return start_child


def _as_child_request(answer: Any, default_tracking_id: str) -> Any:
    """A @subflow function's answer as a ChildRequest: ``{"flow", "tracking_id"[,
    "data"]}``, the flow a Flow, a @workflow object or a registered flow's name. Any
    other answer is returned as it is, for the executor to refuse with the shape
    expected (or as a coroutine a sync function returned)."""
    if not isinstance(answer, dict):
        return answer
    flow = answer.get("flow")
    if isinstance(flow, Workflow):
        flow = flow.flow
    elif isinstance(flow, str):
        flow = registry.lookup(flow)
    tracking_id = answer.get("tracking_id")
    if tracking_id is None:
        tracking_id = default_tracking_id
    if not isinstance(flow, Flow) or not isinstance(tracking_id, str):
        return answer
    return ChildRequest(flow, tracking_id, answer.get("data"))

"""Flow definitions: steps, parallel groups, subflows, and running them.

Owns a flow's definition (its stages, each step checked as it is added), its Plan,
and the enqueue request: input, tracking_id and start time are checked here, so a bad
run is refused before anything is written. Must never run a step or decide how a run
moves on: ``run`` hands the storage one NewFlow and returns a FlowRun at once; the
workers run the steps, and progress.py decides what comes next.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import json
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from flowsmith_worker import (
    compensation,
    concurrency,
    event_loop,
    fanout,
    payload,
    rate_limits,
    tracing,
)
from flowsmith_worker.async_calls import call_with_connection
from flowsmith_worker.child_request import ChildRequest
from flowsmith_worker.context import Context
from flowsmith_worker.cron import instant_of, validate_cron
from flowsmith_worker.errors import ConcurrencyKeyFailed, InvalidFlowDefinition, PayloadRejected
from flowsmith_worker.identifiers import (
    MAX_TRACKING_ID_LENGTH as MAX_TRACKING_ID_LENGTH,  # re-exported: callers import it here
)
from flowsmith_worker.identifiers import check_identifier
from flowsmith_worker.log import get_logger
from flowsmith_worker.plan import (
    DEFAULT_MAX_RESCUES,
    MAP,
    SLEEP,
    STEP,
    WAIT_FOR_EVENT,
    Plan,
    PlannedStep,
)
from flowsmith_worker.rate_limits import RateLimit
from flowsmith_worker.records import TRACE_PARENT_KEY
from flowsmith_worker.registry import Registry
from flowsmith_worker.retry import Backoff, WaitStrategy, as_wait_strategy
from flowsmith_worker.run import FlowRun, find_run
from flowsmith_worker.storage import default_storage
from flowsmith_worker.storage.base import DEFAULT_QUEUE, NewFlow, Storage

# A step or condition is a plain function of ctx or an ``async def`` one.
StepFunction = Callable[[Context], Any]
Condition = Callable[[Context], bool] | Callable[[Context], Awaitable[bool]]
TrackingIdSource = str | Callable[[Context], str] | None
# A run's concurrency key, from its input (see concurrency.py).
KeyFunction = Callable[[Context], str]
# When a sleep ends, from ctx: a timezone-aware datetime, or a timedelta or
# seconds from when it begins.
WakeTime = Callable[[Context], datetime | timedelta | float]
# A wait_for's on_timeout that fails the step (anything else is its output).
FAIL = "fail"

log = get_logger(__name__)
# The widths of fs_flows.flow_name and fs_nodes.step_name (and of
# fs_flows.tracking_id, MAX_TRACKING_ID_LENGTH): checked here so the caller gets
# our message rather than a driver error (and because SQLite would store a
# longer value than the other databases accept).
MAX_NAME_LENGTH = 200
MAX_QUEUE_LENGTH = 100  # fs_flows.queue and fs_nodes.queue


@dataclass(frozen=True)
class Parking:
    """What a sleep or a wait for an event waits for (see parking.py)."""

    kind: str  # plan.SLEEP or plan.WAIT_FOR_EVENT
    seconds: float | None = None  # a sleep's length, a wait's timeout; None: no limit
    until: WakeTime | None = None  # a sleep's end, from ctx
    on_timeout: Any = FAIL  # a wait's output when it times out, or FAIL

    def wake_time(self, ctx: Context) -> tuple[float | None, float | None]:
        """(seconds, until) of this sleep or wait: ``until(ctx)`` decides, when given.

        ``until`` may answer a timezone-aware datetime (the instant), or a
        timedelta or a number of seconds (counted from when the node first parks,
        by the database clock).
        """
        if self.until is None:
            return self.seconds, None
        wake = self.until(ctx)
        if isinstance(wake, datetime):
            return None, instant_of(wake)
        if isinstance(wake, timedelta):
            return wake.total_seconds(), None
        if isinstance(wake, int | float) and not isinstance(wake, bool):
            return float(wake), None
        raise TypeError(
            f"sleep step {ctx.step!r} was told to wake at {wake!r}: return a "
            "timezone-aware datetime, a timedelta or a number of seconds"
        )


# A map's function: of ctx and one item, plain or ``async def``.
ItemFunction = Callable[[Context, Any], Any]
# A map's items, from ctx: a list (or tuple).
ItemsSource = Callable[[Context], Any]


@dataclass(frozen=True)
class FanOut:
    """What a map step runs for each item (see fanout.py); the step's own fn is ``items``."""

    each: ItemFunction
    max_parallel: int | None = None
    allow_failures: bool = False

    def for_item(self, spec: StepSpec, item_step: str, item: Any) -> StepSpec:
        """The step that runs ``each(ctx, item)`` as the item node ``item_step``: the
        map's retries, backoff and timeout, no condition (the map's was evaluated)."""
        each = self.each
        call: StepFunction
        if event_loop.is_async(each):

            async def call(ctx: Context) -> Any:
                return await each(ctx, item)

        else:

            def call(ctx: Context) -> Any:
                return each(ctx, item)

        return dataclasses.replace(
            spec, name=item_step, fn=call, condition=None, fan_out=None, compensation=None
        )


def _never_called(_ctx: Context) -> None:
    """The function of a sleep or wait step: the executor parks it instead of calling."""


@dataclass(frozen=True)
class StepSpec:
    name: str
    fn: StepFunction
    retries: int = 0
    timeout: float | None = None
    backoff: WaitStrategy = field(default_factory=lambda: as_wait_strategy(None))
    condition: Condition | None = None
    # A subflow step's fn returns a ChildRequest (see Flow.subflow_from).
    subflow: bool = False
    # Re-runs after a lost worker, counted apart from retries (see plan.py).
    max_rescues: int = DEFAULT_MAX_RESCUES
    # A sleep or a wait for an event: parked, never called (see parking.py).
    parking: Parking | None = None
    # What undoes this step if its run fails for good (see compensation.py): a
    # step of its own, named compensate:<name>, run by Flow.get_step's lookup.
    compensation: StepSpec | None = None
    # At most so many starts per period across all workers (see rate_limits.py).
    rate_limit: RateLimit | None = None
    # A map: fn is its items function, fan_out what runs per item (see fanout.py).
    fan_out: FanOut | None = None
    # Whether fn, the condition, or either is ``async def`` (awaited on the
    # process's event loop, see event_loop.py): decided once here, so running a
    # sync step costs one attribute read more, not an inspection per attempt.
    fn_is_async: bool = field(init=False, repr=False)
    condition_is_async: bool = field(init=False, repr=False)
    awaits: bool = field(init=False, repr=False)

    def __post_init__(self) -> None:
        fn_is_async = event_loop.is_async(self.fn)
        condition_is_async = event_loop.is_async(self.condition)
        object.__setattr__(self, "fn_is_async", fn_is_async)
        object.__setattr__(self, "condition_is_async", condition_is_async)
        object.__setattr__(self, "awaits", fn_is_async or condition_is_async)

    @property
    def max_attempts(self) -> int:
        return self.retries + 1


class Flow:
    """A named sequence of steps and parallel groups, registered by its name.

    ``flow.run(ctx)`` enqueues a run and returns at once; ``flowsmith worker``
    processes that import the module defining the flow run it.

    ``concurrency_key=lambda ctx: ctx.data["customer_id"], max_concurrent=N``: at
    most N runs of this flow per key in flight across all workers; the others wait,
    holding no worker slot, and start in the order they were enqueued (see
    concurrency.py). The key is computed once, when the run is enqueued.
    """

    def __init__(
        self,
        name: str,
        storage: Storage | None = None,
        *,
        queue: str = DEFAULT_QUEUE,
        priority: int = 0,
        concurrency_key: KeyFunction | None = None,
        max_concurrent: int | None = None,
    ) -> None:
        check_identifier("flow name", name, MAX_NAME_LENGTH)
        check_identifier(f"the queue name of flow {name!r}", queue, MAX_QUEUE_LENGTH)
        if concurrency_key is not None and not callable(concurrency_key):
            raise TypeError(
                f"flow {name!r}: concurrency_key={concurrency_key!r} must be a function of "
                "ctx that returns the run's key, e.g. lambda ctx: ctx.data['customer_id']"
            )
        self.max_concurrent = concurrency.check_limit(
            name, max_concurrent, concurrency_key is not None
        )
        self.concurrency_key = concurrency_key
        self.name = name
        self.storage = storage
        self.queue = queue
        self.priority = priority
        self.stages: list[list[StepSpec]] = []
        self._group: list[StepSpec] | None = None
        self.module, self.defined_at = _definition_site()
        registry.register(self)

    def __repr__(self) -> str:
        return f"Flow({self.name!r})"

    # -- building -------------------------------------------------------------

    def step(
        self,
        name: str,
        fn: StepFunction,
        retries: int = 0,
        timeout: float | None = None,
        backoff: Backoff | None = None,
        condition: Condition | None = None,
        max_rescues: int = DEFAULT_MAX_RESCUES,
        compensate: StepFunction | None = None,
        compensate_retries: int | None = None,
        rate_limit: str | None = None,
    ) -> Flow:
        """Add a step; ``retries=N`` allows N + 1 attempts in all.

        ``fn`` and ``condition`` may be ``async def`` functions: the worker awaits
        them on its event loop, and cancels a coroutine past ``timeout`` seconds.

        ``max_rescues`` bounds the re-runs after the step's worker was lost
        (killed, out of memory, past its lease): they do not use up ``retries``.

        ``compensate(ctx)`` (plain or ``async def``) undoes the step: when the run
        fails for good after this step completed, it runs, durably, in reverse
        order with the other steps' compensations; ``ctx.data[name]`` is this
        step's output. It has ``compensate_retries`` (default: ``retries``), the
        step's timeout, backoff and max_rescues. See flowsmith_worker.compensation.

        ``rate_limit="100/m"`` (units s, m, h) allows at most that many starts of
        this step per period across all workers, each attempt a start; a start
        over the limit waits PENDING for its turn, holding no slot (see
        rate_limits.py for the burst it allows).
        """
        wait = as_wait_strategy(backoff)
        limit = None if rate_limit is None else rate_limits.parse(rate_limit, step=name)
        undo = None
        if compensate is not None:
            undo_retries = retries if compensate_retries is None else compensate_retries
            undo = StepSpec(
                compensation.node_name(name),
                compensate,
                undo_retries,
                timeout,
                wait,
                max_rescues=max_rescues,
            )
        elif compensate_retries is not None:
            raise ValueError(f"step {name!r}: compensate_retries without compensate=")
        spec = StepSpec(
            name,
            fn,
            retries,
            timeout,
            wait,
            condition,
            max_rescues=max_rescues,
            compensation=undo,
            rate_limit=limit,
        )
        return self._add(spec)

    def subflow(
        self,
        name: str,
        child: Flow,
        tracking_id: TrackingIdSource = None,
        retries: int = 0,
        condition: Condition | None = None,
        max_rescues: int = DEFAULT_MAX_RESCUES,
    ) -> Flow:
        """Add a step that runs ``child`` to completion; its final data is this step's output.

        ``tracking_id`` is a callable of ctx, a format string over ctx.data (and
        ``{tracking_id}``, the parent's), or None for "<parent tracking_id>:<name>".
        """

        child = getattr(child, "flow", child)  # a @workflow object stands for its Flow
        if event_loop.is_async(tracking_id):
            raise TypeError(
                f"subflow {name!r}: tracking_id={tracking_id!r} is an async function; "
                "make it a plain function of ctx (or a format string)"
            )

        def start_child(ctx: Context) -> ChildRequest:
            return ChildRequest(child, _child_tracking_id(tracking_id, ctx, name))

        return self.subflow_from(
            name, start_child, retries, condition=condition, max_rescues=max_rescues
        )

    def subflow_from(
        self,
        name: str,
        start: Callable[[Context], ChildRequest] | Callable[[Context], Awaitable[ChildRequest]],
        retries: int = 0,
        backoff: Backoff | None = None,
        condition: Condition | None = None,
        max_rescues: int = DEFAULT_MAX_RESCUES,
    ) -> Flow:
        """Add a subflow step whose child run ``start(ctx)`` decides, each time it runs.

        ``start`` (a plain or ``async def`` function) returns a ChildRequest: the
        child flow, its tracking_id and optionally its input. ``retries`` apply to
        ``start`` raising and to the child failing; a retry calls ``start`` again,
        and the same tracking_id resumes the same child run. ``Flow.subflow`` and
        the ``@subflow`` decorator both add their steps through here.
        """
        wait = as_wait_strategy(backoff)
        spec = StepSpec(
            name, start, retries, None, wait, condition, subflow=True, max_rescues=max_rescues
        )
        return self._add(spec)

    def sleep(
        self,
        name: str,
        *,
        seconds: float | None = None,
        until: WakeTime | None = None,
    ) -> Flow:
        """Add a step that waits ``seconds``, or until the datetime ``until(ctx)`` returns
        (it may return a timedelta or seconds instead: counted from when the sleep begins).

        The run holds no worker slot or thread meanwhile: its node is parked in
        the database, survives any worker restart, and runs on within a poll
        interval of its time (by the database clock). Its output is None.
        """
        if (seconds is None) == (until is None):
            raise ValueError(f"sleep {name!r}: give seconds= or until=, one of them")
        if seconds is not None and not (_is_number(seconds) and seconds >= 0):
            raise ValueError(f"sleep {name!r}: seconds={seconds!r} must be a number >= 0")
        if until is not None and (not callable(until) or event_loop.is_async(until)):
            raise TypeError(
                f"sleep {name!r}: until={until!r} must be a plain function of ctx "
                "returning a timezone-aware datetime (or a timedelta, or seconds)"
            )
        parking = Parking(SLEEP, seconds=seconds, until=until)
        return self._add(StepSpec(name, _never_called, parking=parking))

    def wait_for(
        self,
        name: str,
        *,
        timeout: float | None = None,
        on_timeout: Any = FAIL,
    ) -> Flow:
        """Add a step that waits for the event ``name``, sent with ``send_event``.

        The event's payload becomes this step's output. An event sent before the
        run gets here is kept and used when it does. After ``timeout`` seconds
        (None: no limit) without it, the step fails (``on_timeout="fail"``) or
        outputs ``on_timeout``. The run holds no slot or thread while it waits.
        """
        if timeout is not None and not (_is_number(timeout) and timeout > 0):
            raise ValueError(f"wait_for {name!r}: timeout={timeout!r} must be positive seconds")
        if on_timeout != FAIL:
            payload.encode(on_timeout, what=f"the on_timeout value of wait_for {name!r}")
        parking = Parking(WAIT_FOR_EVENT, seconds=timeout, on_timeout=on_timeout)
        return self._add(StepSpec(name, _never_called, parking=parking))

    def map(
        self,
        name: str,
        fn: ItemFunction,
        *,
        items: ItemsSource,
        max_parallel: int | None = None,
        retries: int = 0,
        timeout: float | None = None,
        backoff: Backoff | None = None,
        allow_failures: bool = False,
        condition: Condition | None = None,
        max_rescues: int = DEFAULT_MAX_RESCUES,
    ) -> Flow:
        """Add a step that runs ``fn(ctx, item)`` for each item of ``items(ctx)``, a node
        per item, across every worker; its output (``ctx.data[name]``) is the list of
        the items' outputs, in item order.

        ``max_parallel=N`` runs at most N items at once across all workers. Each item
        has its own ``retries`` (and ``timeout``, ``backoff``); an item failed for
        good fails the step and the run, unless ``allow_failures=True``: the output
        is then a list of ``{"output": value}`` or ``{"error": message}`` per item.
        ``items`` is a plain function of ctx (called once, when the step starts);
        ``fn`` may be ``async def``. See flowsmith_worker/fanout.py.
        """
        if self._group is not None:
            raise InvalidFlowDefinition(
                f"flow {self.name!r}: map {name!r} cannot be inside a parallel group "
                "(its items already run in parallel); put it before or after the group"
            )
        if not callable(items) or event_loop.is_async(items):
            raise TypeError(
                f"map {name!r}: items={items!r} must be a plain function of ctx returning "
                "a list, e.g. items=lambda ctx: ctx.data['load']['items']"
            )
        if not callable(fn):
            raise TypeError(f"map {name!r}: {fn!r} is not callable: give a function of (ctx, item)")
        if max_parallel is not None and (
            isinstance(max_parallel, bool) or not isinstance(max_parallel, int) or max_parallel < 1
        ):
            raise ValueError(
                f"map {name!r}: max_parallel={max_parallel!r} must be a count >= 1 (None: no limit)"
            )
        fan_out = FanOut(fn, max_parallel, bool(allow_failures))
        wait = as_wait_strategy(backoff)
        spec = StepSpec(
            name, items, retries, timeout, wait, condition, max_rescues=max_rescues, fan_out=fan_out
        )
        return self._add(spec)

    @contextlib.contextmanager
    def parallel(self) -> Iterator[Flow]:
        """Steps added inside run at the same time; the next step waits for all of them."""
        if self._group is not None:
            raise InvalidFlowDefinition(f"flow {self.name!r}: parallel groups cannot nest")
        self._group = []
        try:
            yield self
        finally:
            group, self._group = self._group, None
        if group:
            self.stages.append(group)

    def _add(self, spec: StepSpec) -> Flow:
        check_identifier(f"a step name of flow {self.name!r}", spec.name, MAX_NAME_LENGTH)
        if compensation.is_compensation(spec.name.lower()):
            raise InvalidFlowDefinition(
                f"flow {self.name!r}: step name {spec.name!r} starts with "
                f"{compensation.COMPENSATE_PREFIX!r}, which names compensations: rename the step"
            )
        if len(compensation.node_name(spec.name)) > MAX_NAME_LENGTH and spec.compensation:
            raise InvalidFlowDefinition(
                f"flow {self.name!r}: step name {spec.name!r} is too long to have a "
                f"compensation (at most {MAX_NAME_LENGTH - len(compensation.COMPENSATE_PREFIX)} "
                "characters): shorten it"
            )
        if self.get_step(spec.name) is not None or any(
            s.name == spec.name for s in self._group or []
        ):
            raise InvalidFlowDefinition(
                f"flow {self.name!r} already has a step named {spec.name!r}"
            )
        self._check_item_names(spec)
        if spec.retries < 0:
            raise ValueError(f"step {spec.name!r}: retries={spec.retries} cannot be negative")
        if isinstance(spec.max_rescues, bool) or not isinstance(spec.max_rescues, int):
            raise TypeError(f"step {spec.name!r}: max_rescues={spec.max_rescues!r} is not a count")
        if spec.max_rescues < 0:
            raise ValueError(
                f"step {spec.name!r}: max_rescues={spec.max_rescues} cannot be negative "
                "(0: a step whose worker is lost fails at once)"
            )
        if spec.timeout is not None and spec.timeout <= 0:
            raise ValueError(f"step {spec.name!r}: timeout={spec.timeout} must be positive seconds")
        if not callable(spec.fn):
            raise TypeError(f"step {spec.name!r}: {spec.fn!r} is not callable")
        if spec.compensation is not None:
            self._check_compensation(spec, spec.compensation)
        if self._group is not None:
            self._group.append(spec)
        else:
            self.stages.append([spec])
        return self

    @staticmethod
    def _check_compensation(spec: StepSpec, undo: StepSpec) -> None:
        if not callable(undo.fn):
            raise TypeError(f"step {spec.name!r}: compensate={undo.fn!r} is not callable")
        if undo.retries < 0:
            raise ValueError(
                f"step {spec.name!r}: compensate_retries={undo.retries} cannot be negative"
            )

    # -- reading --------------------------------------------------------------

    def _check_item_names(self, spec: StepSpec) -> None:
        """Refuse a step whose name is that of an item of a map of the flow (``m[0]``
        and the map ``m``, in either order: their nodes would collide), and a map
        whose name leaves no room for its items' ``[N]`` suffix (see fanout.py)."""
        steps = [s for stage in self.stages for s in stage] + list(self._group or [])
        item_of = fanout.parse_item_name(spec.name)
        if item_of is not None and any(
            s.fan_out is not None and s.name == item_of[0] for s in steps
        ):
            raise InvalidFlowDefinition(
                f"flow {self.name!r}: step name {spec.name!r} is the name of an item of "
                f"its map {item_of[0]!r}: rename the step"
            )
        if spec.fan_out is None:
            return
        for other in steps:
            found = fanout.parse_item_name(other.name)
            if found is not None and found[0] == spec.name:
                raise InvalidFlowDefinition(
                    f"flow {self.name!r}: map {spec.name!r} would name its items like its "
                    f"step {other.name!r}: rename the map or the step"
                )
        room = MAX_NAME_LENGTH - fanout.ITEM_SUFFIX_ROOM
        if len(spec.name) > room:
            raise InvalidFlowDefinition(
                f"flow {self.name!r}: map name {spec.name!r} is too long: its items are "
                f"named {spec.name}[N] (at most {room} characters): shorten it"
            )

    def get_step(self, name: str) -> StepSpec | None:
        """The step ``name``, or the compensation a ``compensate:<step>`` name stands for."""
        if compensation.is_compensation(name):
            undone = self.get_step(compensation.compensated_step(name))
            return None if undone is None else undone.compensation
        for stage in self.stages:
            for spec in stage:
                if spec.name == name:
                    return spec
        return None

    def plan(self) -> Plan:
        return Plan(
            stages=tuple(
                tuple(
                    PlannedStep(
                        s.name,
                        s.max_attempts,
                        s.subflow,
                        s.max_rescues,
                        _kind(s),
                        s.compensation.max_attempts if s.compensation else 0,
                        s.fan_out.max_parallel if s.fan_out else None,
                        s.fan_out.allow_failures if s.fan_out else False,
                    )
                    for s in stage
                )
                for stage in self.stages
            ),
            module=self.module,
        )

    # -- running --------------------------------------------------------------

    def run(
        self,
        ctx: Context | dict[str, Any] | None = None,
        tracking_id: str | None = None,
        delay: float | None = None,
        connection: Any = None,
        run_at: datetime | None = None,
    ) -> FlowRun:
        """Enqueue a run durably and return its handle at once.

        With ``connection`` (the application's SQLAlchemy Connection, or a Django
        connection: see flowsmith_worker.contrib.django) the run commits or rolls
        back with the application's own writes. ``delay``
        (seconds) or ``run_at`` (a timezone-aware datetime) holds its first
        step back until then.
        """
        request = self.new_run(ctx, tracking_id, delay, run_at=_start_instant(delay, run_at))
        storage = self.storage or default_storage()
        result = storage.enqueue_flow(flow=request, connection=connection)
        # DEBUG: a web app enqueuing thousands of runs must not print thousands of lines.
        log.debug(
            "flow.enqueued"
            if result.created
            else ("flow.resumed" if result.resumed else "flow.exists"),
            flow=self.name,
            tracking_id=request.tracking_id,
            status=str(result.status),
        )
        return FlowRun(storage, self.name, request.tracking_id)

    async def run_async(
        self,
        ctx: Context | dict[str, Any] | None = None,
        tracking_id: str | None = None,
        delay: float | None = None,
        connection: Any = None,
        run_at: datetime | None = None,
    ) -> FlowRun:
        """``run`` for async code (FastAPI, Starlette, aiohttp): the event loop goes on meanwhile.

        The enqueue is blocking database work, so it runs in a thread
        (asyncio.to_thread), as does ``connection`` when it is a SQLAlchemy
        Connection. An AsyncConnection or AsyncSession (SQLAlchemy's asyncio
        extension) is used through its own ``run_sync``, on its own driver: the
        run commits or rolls back with it.
        """
        enqueue = functools.partial(self.run, ctx, tracking_id, delay, run_at=run_at)
        return await call_with_connection(enqueue, connection)

    def get_run(self, tracking_id: str) -> FlowRun:
        """The handle of this flow's run with that tracking_id, as ``run`` returned it.

        For a process other than the one that enqueued it (a web request asking
        how its order is doing). FlowNotFound if no run of this flow has it.
        """
        return find_run(tracking_id, self.storage or default_storage(), flow_name=self.name)

    def run_many(
        self,
        inputs: Iterable[Context | dict[str, Any] | None],
        tracking_ids: Iterable[str] | None = None,
        *,
        connection: Any = None,
        delay: float | None = None,
        run_at: datetime | None = None,
    ) -> list[FlowRun]:
        """Enqueue a run per input in one transaction; return their handles in order.

        Each tracking_id (made up when ``tracking_ids`` is None) follows the rules
        of ``run``: a pending or running run answers with its handle and nothing
        new, a FAILED one is resumed. The batch is all or nothing: every input
        and tracking_id is checked before anything is written, and a tracking_id
        given twice (ValueError), one of another flow (TrackingIdTaken), one
        whose run has COMPLETED (FlowAlreadyCompleted) or one whose FAILED run
        was compensated (RunNotRetryable) enqueues none of them.
        With ``connection`` the runs commit or roll back with the application's
        own writes (roll back after an error, as after any failed statement).
        ``delay`` or ``run_at`` applies to every run.
        """
        if isinstance(inputs, (str, bytes, Mapping, Context)):
            raise TypeError(
                f"run_many takes a list of inputs, one per run, not one {type(inputs).__name__}"
            )
        if isinstance(tracking_ids, (str, bytes)):
            raise TypeError("tracking_ids is one string: give a list, one tracking_id per input")
        data = list(inputs)
        ids = [None] * len(data) if tracking_ids is None else list(tracking_ids)
        if len(ids) != len(data):
            raise ValueError(
                f"run_many got {len(data)} inputs but {len(ids)} tracking_ids: give one per input"
            )
        start = _start_instant(delay, run_at)
        plan = self._runnable_plan()
        requests = [
            self._request(value, tid, delay, start, plan, what=f"input {i} of run_many")
            for i, (value, tid) in enumerate(zip(data, ids, strict=True))
        ]
        if not requests:
            return []
        storage = self.storage or default_storage()
        results = storage.enqueue_flows(flows=requests, connection=connection)
        log.debug(
            "flow.enqueued_many",
            flow=self.name,
            runs=len(results),
            created=sum(r.created for r in results),
            resumed=sum(r.resumed for r in results),
        )
        return [FlowRun(storage, self.name, r.tracking_id) for r in results]

    def new_run(
        self,
        ctx: Context | dict[str, Any] | None,
        tracking_id: str | None,
        delay: float | None = None,
        run_at: float | None = None,
    ) -> NewFlow:
        """The enqueue request for a run of this flow, validated."""
        return self._request(ctx, tracking_id, delay, run_at, self._runnable_plan(), "input")

    def _runnable_plan(self) -> Plan:
        if not self.stages:
            raise InvalidFlowDefinition(f"flow {self.name!r} has no steps")
        if self._group is not None:
            raise InvalidFlowDefinition(
                f"flow {self.name!r}: run() inside its own parallel() block"
            )
        return self.plan()

    def _request(
        self,
        ctx: Context | dict[str, Any] | None,
        tracking_id: str | None,
        delay: float | None,
        run_at: float | None,
        plan: Plan,
        what: str,
    ) -> NewFlow:
        """A validated request; ``what`` names the input in errors ("input", "input 7 of ...")."""
        data = ctx.data if isinstance(ctx, Context) else dict(ctx or {})
        # Checked here, so a bad input is refused before anything is written.
        payload.encode(data, what=f"the {what} of flow {self.name!r}")
        if TRACE_PARENT_KEY in data:
            raise PayloadRejected(
                f"the {what} of flow {self.name!r} has the key {TRACE_PARENT_KEY!r}, which "
                "FlowSmith keeps for the run's trace context: rename that key"
            )
        if delay is not None and delay < 0:
            raise ValueError(f"delay={delay}: cannot be negative")
        # None means "make one up"; an empty string is a bug upstream, not a request
        # for a random run that could never be found again by its key.
        if tracking_id is None:
            tracking_id = uuid.uuid4().hex
        check_identifier("tracking_id", tracking_id, MAX_TRACKING_ID_LENGTH)
        key = self._key_of(data, tracking_id)
        return NewFlow(
            flow_name=self.name,
            tracking_id=tracking_id,
            input=data,
            plan=plan,
            queue=self.queue,
            priority=self.priority,
            delay_seconds=float(delay or 0.0),
            run_at=run_at,
            concurrency_key=key,
            max_concurrent=self.max_concurrent if key is not None else None,
            # Last, once the request is known to be valid: a refused one makes no span.
            trace_parent=tracing.run_enqueued(self.name, tracking_id, self.queue),
        )

    def _key_of(self, data: dict[str, Any], tracking_id: str) -> str | None:
        """The run's concurrency key, from its input; the run is refused if none comes."""
        if self.concurrency_key is None:
            return None
        try:
            key = self.concurrency_key(Context(data, tracking_id=tracking_id))
        except Exception as exc:
            raise ConcurrencyKeyFailed(
                f"flow {self.name!r}: concurrency_key raised {type(exc).__name__}: {exc} "
                f"for run {tracking_id!r}: nothing was enqueued; give an input the key "
                "function can read, or fix the function"
            ) from exc
        what = f"the concurrency key of run {tracking_id!r} of flow {self.name!r}"
        return check_identifier(what, key, concurrency.MAX_KEY_LENGTH)

    # -- schedule -------------------------------------------------------------

    cron: str | None = None
    cron_input: dict[str, Any] | None = None

    def schedule(self, cron: str, input: dict[str, Any] | None = None) -> Flow:
        """Run this flow at every tick of ``cron`` (5 fields, UTC), once per tick.

        The workers that import this flow enqueue each tick's run with the
        tracking_id "<name>@<YYYY-MM-DDTHH:MMZ>" (see flowsmith_worker.schedule).
        Calling it again replaces the schedule.
        """
        expression = validate_cron(cron, hash_id=self.name)
        try:
            json.dumps(input or {})
        except (TypeError, ValueError) as exc:
            raise ValueError(f"schedule input of flow {self.name!r} is not JSON: {exc}") from None
        self.cron, self.cron_input = expression, dict(input or {})
        return self


# The process's flows by name: exactly what its workers may run (see registry.py).
registry: Registry[Flow] = Registry()


def plan_versions() -> dict[str, str]:
    """The plan version of each flow this process defines: what a run enqueued by this
    code would keep, to compare with a run's own (`flowsmith status`)."""
    flows = (registry.lookup(name) for name in registry.names())
    return {flow.name: flow.plan().version for flow in flows if flow is not None}


def _kind(spec: StepSpec) -> str:
    if spec.parking is not None:
        return spec.parking.kind
    return MAP if spec.fan_out is not None else STEP


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _start_instant(delay: float | None, run_at: datetime | None) -> float | None:
    """``run_at`` as seconds since the epoch (None without it), refused beside a delay."""
    if run_at is not None and delay is not None:
        raise ValueError("give delay= or run_at=, not both")
    # run_at stays an instant: the database compares it with its own clock.
    return None if run_at is None else instant_of(run_at)


def _child_tracking_id(source: TrackingIdSource, ctx: Context, step: str) -> str:
    if source is None:
        return f"{ctx.tracking_id}:{step}"
    if callable(source):
        return str(source(ctx))
    return source.format_map({**ctx.data, "tracking_id": ctx.tracking_id})


def _definition_site() -> tuple[str, str]:
    """The module and file:line that called Flow(), skipping our own frames."""
    frame = inspect.currentframe()
    while frame is not None and frame.f_globals.get("__name__", "").startswith("flowsmith_worker."):
        if frame.f_globals.get("__name__", "").startswith("flowsmith_worker.examples"):
            break
        frame = frame.f_back
    if frame is None:
        return "", "<unknown>"
    return str(frame.f_globals.get("__name__", "")), f"{frame.f_code.co_filename}:{frame.f_lineno}"

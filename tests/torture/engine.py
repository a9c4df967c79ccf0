"""Runs a model FlowShape on the real engine and reads back how it ended."""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from flowsmith_worker import Context, Flow, send_event
from flowsmith_worker.errors import EventRefused
from flowsmith_worker.flow import Condition, StepFunction, registry
from flowsmith_worker.run import FlowRun
from flowsmith_worker.storage.base import FlowStatus, NodeStatus, Storage
from flowsmith_worker.worker import Worker
from tests.torture import model
from tests.torture.model import FlowShape, NodeEnd, StepShape, output_of

# A retry is runnable at once: no example waits for a backoff.
NO_BACKOFF = 0.0
# What a sleep of no time given as until= returns: an instant long past.
LONG_AGO = datetime(2000, 1, 1, tzinfo=UTC)
POLL_SECONDS = 0.005
TIMEOUT_SECONDS = 30.0


class ScheduledFailure(RuntimeError):
    """What a step raises on an attempt its failure schedule names."""


# The message of the ScheduledFailure of an attempt (the model says it too).
scheduled_failure = model.scheduled_failure


@dataclass(frozen=True)
class Observed:
    status: FlowStatus
    nodes: dict[str, NodeEnd]
    data: dict[str, Any] | None = None  # ctx.data at the end of a COMPLETED run
    error: str | None = None  # the run's
    # The attempt numbers each step's function was called with, in call order, as
    # the functions themselves wrote them down: a journal apart from the engine's.
    calls: dict[str, list[int]] = field(default_factory=dict)
    # The events the driver sent since the run's previous end: (wait, why, answer).
    sends: tuple[tuple[str, str, str], ...] = ()


class Journal:
    """The calls of the step functions of one run, thread-safe (a worker has slots)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.calls: dict[str, list[int]] = {}

    def record(self, step_name: str, attempt: int) -> None:
        with self._lock:
            self.calls.setdefault(step_name, []).append(attempt)


def step_function(step: StepShape, journal: Journal) -> StepFunction:
    """The step's function: it writes its call down, raises if its schedule says so,
    and returns what it saw. ``async def`` if the step is async: the worker then
    runs it (and its condition) on its event loop, another path to the same ends."""

    def body(ctx: Context) -> dict[str, Any]:
        journal.record(step.name, ctx.attempt)
        if ctx.attempt in step.fails_on:
            raise ScheduledFailure(scheduled_failure(step.name, ctx.attempt))
        return output_of(ctx.attempt, ctx.data)

    async def async_body(ctx: Context) -> dict[str, Any]:
        return body(ctx)

    return async_body if step.is_async else body


def condition_function(step: StepShape) -> Condition | None:
    key = step.condition
    if key is None:
        return None

    def holds(ctx: Context) -> bool:
        return bool(ctx.data.get(key))

    async def async_holds(ctx: Context) -> bool:
        return holds(ctx)

    return async_holds if step.is_async else holds


def item_function(step: StepShape, journal: Journal) -> Any:
    """The function of a map's items: as a step's, under the item node's name."""
    shape = step.map
    assert shape is not None

    def each(ctx: Context, item: int) -> dict[str, Any]:
        name = model.item_name(step.name, item)
        journal.record(name, ctx.attempt)
        if ctx.attempt in shape.fails_of(item):
            raise ScheduledFailure(scheduled_failure(name, ctx.attempt))
        return model.item_output_of(item, ctx.attempt, ctx.data)

    return each


def add_step(flow: Flow, step: StepShape, journal: Journal) -> None:
    if step.map is not None:
        count = step.map.items
        flow.map(
            step.name,
            item_function(step, journal),
            items=lambda ctx: list(range(count)),
            retries=step.map.retries,
            backoff=NO_BACKOFF,
            allow_failures=step.map.allow_failures,
            max_parallel=step.map.max_parallel,
        )
        return
    if step.sleep is not None:
        add_sleep(flow, step.name, step.sleep)
        return
    if step.wait is not None:
        wait = step.wait
        flow.wait_for(step.name, timeout=wait.timeout, on_timeout=wait.on_timeout)
        return
    body, condition = step_function(step, journal), condition_function(step)
    flow.step(step.name, body, step.retries, backoff=NO_BACKOFF, condition=condition)


def add_sleep(flow: Flow, name: str, sleep: model.SleepShape) -> None:
    if not sleep.by_until:
        flow.sleep(name, seconds=sleep.seconds)
        return
    # until= answers an instant long past (its time has come) or a timedelta.
    wake: datetime | timedelta = (
        LONG_AGO if sleep.seconds == 0 else timedelta(seconds=sleep.seconds)
    )
    flow.sleep(name, until=lambda ctx: wake)


class Sender:
    """Sends the events of one run's waits as their shapes say, noting every answer."""

    def __init__(self, storage: Storage, shape: FlowShape, tracking_id: str) -> None:
        self.storage, self.tracking_id = storage, tracking_id
        self.waits = {s.name: s.wait for stage in shape.stages for s in stage if s.wait}
        self.sent: set[str] = set()
        self.answers: list[tuple[str, str, str]] = []

    def send(self, name: str, why: str) -> None:
        key = None if why in (model.AGAIN_NO_KEY, model.LATE) else f"key-{name}"
        try:
            sent = send_event(
                self.tracking_id,
                name,
                model.payload_of(name, why),
                idempotency_key=key,
                storage=self.storage,
            )
            answer = model.NOT_DELIVERED if not sent.delivered else model.DELIVERED
            answer = model.WOKE if sent.woke else answer
        except EventRefused as refused:
            answer = model.REFUSED_SENT if "already has one" in str(refused) else model.REFUSED_OVER
        self.answers.append((name, why, answer))

    def send_first(self, name: str) -> None:
        """The wait's event, and the same again if its shape says so."""
        self.sent.add(name)
        self.send(name, model.FIRST)
        again = self.waits[name].again
        if again is not None:
            self.send(name, again)

    def before(self) -> None:
        for name, wait in self.waits.items():
            if wait.event == model.BEFORE:
                self.send_first(name)

    def once_parked(self) -> bool:
        """Send the event of each wait parked now that wants it then; whether any was."""
        record = self.storage.get_flow(tracking_id=self.tracking_id, with_payloads=False)
        assert record is not None
        due = [
            node.step_name
            for node in self.storage.list_nodes(flow_id=record.id)
            if node.status == NodeStatus.PENDING
            and node.wake_at is not None
            and node.step_name not in self.sent
            and (wait := self.waits.get(node.step_name)) is not None
            and wait.event == model.ONCE_PARKED
        ]
        for name in due:
            self.send_first(name)
        return bool(due)

    def taken(self) -> tuple[tuple[str, str, str], ...]:
        """The answers since the last call."""
        answers, self.answers = tuple(self.answers), []
        return answers


def build(shape: FlowShape, journal: Journal) -> Flow:
    flow = Flow(f"model_{uuid.uuid4().hex[:12]}")
    for stage in shape.stages:
        if len(stage) == 1:
            add_step(flow, stage[0], journal)
            continue
        with flow.parallel():
            for step in stage:
                add_step(flow, step, journal)
    return flow


def run_on(
    storage: Storage, shape: FlowShape, concurrency: int = 4, retries_of_run: int = 0
) -> list[Observed]:
    """Run ``shape`` to its end with an in-process worker, and retry the run (as
    `flowsmith retry` does) while it FAILED, up to ``retries_of_run`` times: how the
    run and its nodes ended each time. The waits' events are sent as their shapes
    say (see Sender), and once the run is over, one more to its first wait (LATE)."""
    journal = Journal()
    flow = build(shape, journal)
    try:
        request = flow.new_run(dict(shape.input), None)
        storage.enqueue_flow(flow=request)
        handle = FlowRun(storage, flow.name, request.tracking_id)
        sender = Sender(storage, shape, request.tracking_id)
        sender.before()
        ends = [run_until_idle(storage, handle, journal, concurrency, sender)]
        while ends[-1].status is FlowStatus.FAILED and len(ends) <= retries_of_run:
            handle.retry()
            ends.append(run_until_idle(storage, handle, journal, concurrency, sender))
        if sender.waits:
            sender.send(next(iter(sender.waits)), model.LATE)
            ends[-1] = replace(ends[-1], sends=ends[-1].sends + sender.taken())
        return ends
    finally:
        registry.unregister(flow.name)


def run_until_idle(
    storage: Storage, run: FlowRun, journal: Journal, concurrency: int, sender: Sender
) -> Observed:
    """Run the worker until nothing is left but waits for events, send those their
    events wait for once parked, and again, until the run is over."""
    worker = Worker(
        storage=storage, concurrency=concurrency, poll_interval=POLL_SECONDS, listen=False
    )
    try:
        worker.run_until_idle(timeout=TIMEOUT_SECONDS)
        while sender.once_parked():
            worker.run_until_idle(timeout=TIMEOUT_SECONDS)
    finally:
        worker.shutdown()
    calls = {k: list(v) for k, v in journal.calls.items()}
    return replace(observe(storage, run), calls=calls, sends=sender.taken())


def observe(storage: Storage, run: FlowRun) -> Observed:
    record = storage.get_flow(tracking_id=run.tracking_id, with_payloads=False)
    assert record is not None
    nodes = storage.list_nodes(flow_id=record.id, with_payloads=True)
    ends = {
        node.step_name: NodeEnd(
            node.status, node.attempt, tuple(a.outcome for a in node.attempts), node.output
        )
        for node in nodes
    }
    status = FlowStatus(record.status)
    # ctx.data as the caller of a run gets it.
    completed = status is FlowStatus.COMPLETED
    data = run.wait(timeout=0) if completed else None
    return Observed(status, ends, data, record.error)

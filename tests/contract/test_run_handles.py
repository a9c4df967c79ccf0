"""Run handles found again by tracking_id, what they can do, and their async forms.

``flow.get_run(tracking_id)`` and ``flowsmith_worker.get_run(tracking_id)`` give the
FlowRun that ``flow.run`` returned, in any process; ``.cancel()`` and ``.retry()``
sit next to ``.status()``, ``.wait()`` and ``.trace()`` and refuse what the
storage refuses. ``await flow.run_async(...)`` and ``await run.wait_async()`` leave
the caller's event loop free while the database works.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

import flowsmith_worker
from flowsmith_worker import (
    Context,
    Flow,
    FlowCancelled,
    FlowNotFound,
    FlowRun,
    FlowStatus,
    InMemoryStorage,
    InvalidIdentifier,
    NodeStatus,
    RunNotCancellable,
    RunNotRetryable,
    Worker,
    configure,
)
from flowsmith_worker.decorators import step, workflow
from flowsmith_worker.storage.base import EnqueueResult, FlowRecord, NewFlow, Storage

Names = Callable[[str], str]
# How long a test waits for something only its event loop can do: past it, the
# loop was blocked.
_LOOP_BLOCKED_AFTER = 10.0


def drain(storage: Storage) -> None:
    Worker(storage=storage, poll_interval=0.05).run_until_idle(timeout=30)


# -- get_run ------------------------------------------------------------------------------


def test_get_run_gives_the_handle_flow_run_gave(storage: Storage, unique: Names) -> None:
    """flow.get_run, a @workflow's get_run and flowsmith_worker.get_run find a run by its
    tracking_id alone (as a web request would, later, in another process) and answer
    what the handle from flow.run answers: status, trace, wait."""
    flow = Flow(unique("handles"), storage=storage).step("double", lambda ctx: ctx.data["n"] * 2)
    enqueued = flow.run({"n": 21}, tracking_id="order-21")

    found = flow.get_run("order-21")
    anywhere = flowsmith_worker.get_run("order-21", storage=storage)
    for run in (found, anywhere):
        assert isinstance(run, FlowRun)
        assert (run.flow_name, run.tracking_id) == (flow.name, "order-21")
        assert run.status() == enqueued.status() == FlowStatus.PENDING
    drain(storage)
    assert found.wait(timeout=5) == anywhere.wait(timeout=5) == {"n": 21, "double": 42}
    assert [n.step_name for n in anywhere.trace()] == ["double"]

    @workflow(unique("handles_decorated"), storage=storage)
    def decorated() -> None:
        @step
        def only(ctx: Context) -> str:
            return "done"

    decorated({}, tracking_id="deco-1")
    assert decorated.get_run("deco-1").status() == FlowStatus.PENDING


def test_get_run_of_an_unknown_or_foreign_tracking_id_is_flow_not_found(
    storage: Storage, unique: Names
) -> None:
    """An unknown tracking_id raises FlowNotFound saying so; so does asking a flow for
    another flow's run (naming the flow it belongs to); an id that could never be
    stored is InvalidIdentifier, before any query."""
    flow = Flow(unique("mine"), storage=storage).step("s", lambda ctx: None)
    other = Flow(unique("theirs"), storage=storage).step("s", lambda ctx: None)
    other.run({}, tracking_id="theirs-1")

    with pytest.raises(FlowNotFound, match="no flow run has tracking_id 'nope'"):
        flow.get_run("nope")
    with pytest.raises(FlowNotFound, match="no flow run has tracking_id 'nope'"):
        flowsmith_worker.get_run("nope", storage=storage)
    with pytest.raises(FlowNotFound, match=f"is a run of flow '{other.name}', not of"):
        flow.get_run("theirs-1")
    assert flowsmith_worker.get_run("theirs-1", storage=storage).flow_name == other.name
    with pytest.raises(InvalidIdentifier, match="NUL"):
        flow.get_run("bad\x00id")


def test_get_run_uses_the_configured_storage(tmp_path: Path, unique: Names) -> None:
    """Without storage=, flowsmith_worker.get_run reads the storage configure() set, as
    flow.run writes to it."""
    configure(f"sqlite:///{tmp_path / 'configured.db'}").migrate()
    flow = Flow(unique("configured")).step("s", lambda ctx: "ok")
    flow.run({}, tracking_id="configured-1")
    assert flowsmith_worker.get_run("configured-1").flow_name == flow.name
    assert flow.get_run("configured-1").status() == FlowStatus.PENDING


# -- cancel and retry -----------------------------------------------------------------


def test_cancel_from_a_found_handle_stops_the_run(storage: Storage, unique: Names) -> None:
    """handle.cancel() cancels a pending run (its steps never start, its wait raises
    FlowCancelled); again, it changes nothing; a COMPLETED run refuses with
    RunNotCancellable, the storage's own rule."""
    ran: list[str] = []
    flow = Flow(unique("cancel"), storage=storage).step("s", lambda ctx: ran.append("s"))
    flow.run({}, tracking_id="to-cancel")
    flow.run({}, tracking_id="to-complete")

    run = flow.get_run("to-cancel")
    run.cancel()
    run.cancel()
    assert run.status() == FlowStatus.CANCELLED
    assert [n.status for n in run.trace()] == [NodeStatus.CANCELLED]
    drain(storage)
    assert ran == ["s"]  # to-complete's only
    with pytest.raises(FlowCancelled):
        run.wait(timeout=5)
    with pytest.raises(RunNotCancellable, match="is COMPLETED"):
        flow.get_run("to-complete").cancel()


def test_retry_from_a_found_handle_resumes_a_failed_run(storage: Storage, unique: Names) -> None:
    """handle.retry() resumes a FAILED run (the failed step runs again, the completed one
    does not) and the run completes; retrying a COMPLETED run raises RunNotRetryable."""
    calls: list[str] = []
    broken = threading.Event()
    broken.set()

    def flaky(ctx: Context) -> str:
        calls.append("flaky")
        if broken.is_set():
            raise RuntimeError("the service is down")
        return "fixed"

    flow = Flow(unique("retry"), storage=storage)
    flow.step("first", lambda ctx: calls.append("first") or "kept").step("flaky", flaky)
    flow.run({}, tracking_id="to-retry")
    drain(storage)
    run = flow.get_run("to-retry")
    assert run.status() == FlowStatus.FAILED

    broken.clear()
    run.retry()
    drain(storage)
    assert run.wait(timeout=5) == {"first": "kept", "flaky": "fixed"}
    assert calls == ["first", "flaky", "flaky"]
    with pytest.raises(RunNotRetryable, match="is COMPLETED"):
        run.retry()


# -- run_async and wait_async ---------------------------------------------------------------


class GatedStorage(InMemoryStorage):
    """An in-memory storage whose enqueues and reads of a run wait until the test's event
    loop opens the gate: one run on that loop's own thread would wait in vain."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()

    def _through_gate(self, what: str) -> None:
        if not self.gate.wait(_LOOP_BLOCKED_AFTER):
            raise AssertionError(f"the gate stayed shut: {what} blocked the event loop")

    def enqueue_flow(self, *, flow: NewFlow, connection: Any = None) -> EnqueueResult:
        self._through_gate("the enqueue")
        return super().enqueue_flow(flow=flow, connection=connection)

    def get_flow(self, *, tracking_id: str, with_payloads: bool = True) -> FlowRecord | None:
        self._through_gate("a read of the run")
        return super().get_flow(tracking_id=tracking_id, with_payloads=with_payloads)


def test_run_async_enqueues_off_the_event_loop(unique: Names) -> None:
    """`await flow.run_async(...)` (and a @workflow's) does the blocking enqueue in a
    thread: while it waits on the database, the loop runs other tasks (here, the one
    that lets the enqueue go on)."""
    storage = GatedStorage()
    flow = Flow(unique("run_async"), storage=storage).step("s", lambda ctx: "done")

    @workflow(unique("run_async_decorated"), storage=storage)
    def decorated() -> None:
        @step
        def only(ctx: Context) -> str:
            return "done"

    async def enqueue_both() -> list[FlowRun]:
        enqueuing = asyncio.gather(
            flow.run_async({"n": 1}, tracking_id="async-1"),
            decorated.run_async({}, tracking_id="async-2"),
        )
        await asyncio.sleep(0.05)
        assert not enqueuing.done()
        storage.gate.set()  # only this loop can let them go on
        return list(await enqueuing)

    runs = asyncio.run(enqueue_both())
    assert [(r.flow_name, r.tracking_id) for r in runs] == [
        (flow.name, "async-1"),
        (decorated.name, "async-2"),
    ]
    assert [r.status() for r in runs] == [FlowStatus.PENDING, FlowStatus.PENDING]


def test_wait_async_polls_without_blocking_the_event_loop(unique: Names) -> None:
    """`await run.wait_async()` returns the final data like wait(), and lets the loop run
    meanwhile: the step can only finish when a task on the waiting loop releases it.
    Cancelling a wait_async (a client gone) ends it at once."""
    storage = InMemoryStorage()
    release = threading.Event()

    def held(ctx: Context) -> str:
        if not release.wait(_LOOP_BLOCKED_AFTER):
            raise AssertionError("never released: the wait blocked the event loop")
        return "released"

    flow = Flow(unique("wait_async"), storage=storage).step("held", held)
    run = flow.run({}, tracking_id="held")
    worker = threading.Thread(target=drain, args=(storage,))
    worker.start()

    async def wait_and_release() -> dict[str, Any]:
        waiting = asyncio.create_task(run.wait_async(timeout=30))
        await asyncio.sleep(0.1)
        assert not waiting.done()
        release.set()
        return await waiting

    try:
        assert asyncio.run(wait_and_release()) == {"held": "released"}
    finally:
        release.set()
        worker.join(timeout=30)

    pending = flow.run({}, tracking_id="pending")

    async def give_up() -> None:
        waiting = asyncio.create_task(pending.wait_async())
        await asyncio.sleep(0.05)
        waiting.cancel()
        await waiting

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(give_up())
    with pytest.raises(TimeoutError, match=r"still PENDING after 0\.05 s"):
        asyncio.run(pending.wait_async(timeout=0.05))


def test_wait_async_reads_the_run_off_the_event_loop(unique: Names) -> None:
    """Each poll of wait_async is a blocking database read, done in a thread: while one
    waits on the database, the loop runs other tasks (here, the one that lets it go on)."""
    storage = GatedStorage()
    storage.gate.set()
    flow = Flow(unique("wait_async_reads"), storage=storage).step("s", lambda ctx: "done")
    run = flow.run({}, tracking_id="done")
    drain(storage)
    storage.gate.clear()

    async def wait_then_open() -> dict[str, Any]:
        waiting = asyncio.create_task(run.wait_async(timeout=30))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        storage.gate.set()
        return await waiting

    assert asyncio.run(wait_then_open()) == {"s": "done"}


def test_run_async_commits_or_rolls_back_with_a_sync_connection(
    tmp_path: Path, unique: Names
) -> None:
    """run_async(connection=<SQLAlchemy Connection>) enqueues inside the caller's
    transaction (used from a thread, one call at a time): committed, the run is there;
    rolled back, it never was."""
    url = f"sqlite:///{tmp_path / 'app.db'}"
    storage = configure(url)
    storage.migrate()
    flow = Flow(unique("async_tx")).step("s", lambda ctx: "ok")
    engine = sa.create_engine(url)

    async def enqueue(tracking_id: str, commit: bool) -> None:
        with engine.connect() as conn, conn.begin() as transaction:
            await flow.run_async({}, tracking_id=tracking_id, connection=conn)
            if not commit:
                transaction.rollback()

    try:
        asyncio.run(enqueue("kept", commit=True))
        asyncio.run(enqueue("dropped", commit=False))
    finally:
        engine.dispose()
    assert flow.get_run("kept").status() == FlowStatus.PENDING
    with pytest.raises(FlowNotFound):
        flow.get_run("dropped")

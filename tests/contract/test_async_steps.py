"""``async def`` steps and conditions, in both APIs, on every backend.

The worker awaits them on one event loop per process (flowsmith_worker.event_loop)
while the slot thread waits, so they keep the slot, the lease and the timeouts of
a sync step, except that a coroutine past its timeout is cancelled. Nothing here
may leave a coroutine "never awaited": the RuntimeWarning Python gives then is an
error in these tests (an unraisable one, as it is emitted when the coroutine is
collected, fails the test too).
"""

from __future__ import annotations

import asyncio
import functools
import gc
import os
import signal
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from flowsmith_worker import (
    Context,
    Flow,
    FlowStatus,
    InMemoryStorage,
    NodeStatus,
    StepFailed,
    Worker,
    create_storage,
)
from flowsmith_worker.decorators import step, subflow, workflow
from flowsmith_worker.executor import Executor, Outcome
from flowsmith_worker.storage.base import Storage
from tests.conftest import database_url, eventually
from tests.worker_process import WorkerProcess

Names = Callable[[str], str]

pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")


@pytest.fixture(autouse=True)
def _collect_coroutines() -> Iterator[None]:
    """A coroutine left unawaited warns when it is collected: collect before the test ends."""
    yield
    gc.collect()


def drain(storage: Storage, timeout: float = 30.0, concurrency: int = 4) -> None:
    Worker(storage=storage, poll_interval=0.05, concurrency=concurrency).run_until_idle(timeout)


def nodes_of(storage: Storage, tracking_id: str) -> dict[str, Any]:
    record = storage.get_flow(tracking_id=tracking_id)
    assert record is not None
    return {n.step_name: n for n in storage.list_nodes(flow_id=record.id)}


async def fetch_price(ctx: Context) -> dict[str, int]:
    await asyncio.sleep(0.01)
    return {"price": ctx.data["qty"] * 3}


async def is_big(ctx: Context) -> bool:
    await asyncio.sleep(0)
    return bool(ctx.data["fetch"]["price"] > 10)


def test_async_steps_and_conditions_of_the_builder_run_on_every_backend(
    storage: Storage, unique: Names
) -> None:
    """`Flow.step` takes `async def` steps and conditions: they are awaited, their
    results stored like a sync step's; a false async condition skips its step, a true
    one runs it; sync and async steps mix in one flow and in one parallel group."""

    async def discount(ctx: Context) -> int:
        return int(ctx.data["fetch"]["price"] * 0.9)

    flow = Flow(unique("async_builder"), storage=storage)
    flow.step("fetch", fetch_price)
    with flow.parallel():
        flow.step("discount", discount, condition=is_big)
        flow.step("label", lambda ctx: f"qty {ctx.data['qty']}", condition=is_big)
    flow.step("total", lambda ctx: ctx.data.get("discount", ctx.data["fetch"]["price"]))

    big = flow.run({"qty": 5}, tracking_id="big")
    small = flow.run({"qty": 2}, tracking_id="small")
    drain(storage)

    assert big.wait(timeout=5) == {
        "qty": 5,
        "fetch": {"price": 15},
        "discount": 13,
        "label": "qty 5",
        "total": 13,
    }
    assert small.wait(timeout=5) == {"qty": 2, "fetch": {"price": 6}, "total": 6}
    skipped = nodes_of(storage, "small")
    assert skipped["discount"].status == skipped["label"].status == NodeStatus.SKIPPED


class Pricer:
    """A callable object whose ``__call__`` is ``async def``."""

    async def __call__(self, ctx: Context) -> int:
        await asyncio.sleep(0)
        return int(ctx.data["qty"]) * 7


async def scaled(factor: int, ctx: Context) -> int:
    return int(ctx.data["qty"]) * factor


def test_partials_and_objects_with_an_async_call_are_awaited_too(unique: Names) -> None:
    """A functools.partial of an async function and an object with an `async def
    __call__` are async steps as well (not plain functions returning a coroutine)."""
    storage = InMemoryStorage()
    flow = Flow(unique("async_callables"), storage=storage)
    flow.step("object", Pricer()).step("partial", functools.partial(scaled, 10))
    run = flow.run({"qty": 2})
    drain(storage)
    assert run.wait(timeout=5) == {"qty": 2, "object": 14, "partial": 20}


def test_async_steps_subflows_and_conditions_of_the_decorators_run_on_every_backend(
    storage: Storage, unique: Names
) -> None:
    """`@step` and `@subflow` take `async def` functions and conditions (they used to
    be refused); the child run started by an async subflow function completes."""
    child_name, parent_name = unique("async_child"), unique("async_parent")

    @workflow(child_name, storage=storage)
    def child() -> None:
        @step
        async def double(ctx: Context) -> int:
            await asyncio.sleep(0)
            return int(ctx.data["n"]) * 2

    @workflow(parent_name, storage=storage)
    def parent() -> None:
        @step(retries=1)
        async def fetch(ctx: Context) -> dict[str, int]:
            return await fetch_price(ctx)

        @subflow(condition=is_big)
        async def compute(ctx: Context) -> dict[str, Any]:
            await asyncio.sleep(0)
            return {"flow": child, "data": {"n": ctx.data["fetch"]["price"]}}

    run = parent({"qty": 4}, tracking_id="p")
    drain(storage)
    result = run.wait(timeout=5)
    assert result["fetch"] == {"price": 12}
    assert result["compute"]["double"] == 24
    done = storage.get_flow(tracking_id="p:compute")
    assert done is not None and done.status == FlowStatus.COMPLETED


def test_a_timed_out_async_step_is_cancelled_and_retried_after_it_ended(
    storage: Storage, unique: Names
) -> None:
    """Past its timeout a coroutine is cancelled (its `finally` runs), the attempt fails
    with StepTimeout, and the next attempt starts only after the cancelled one ended;
    all attempts used, the run FAILED. Without cancellation each attempt would hold its
    slot for 60 s and run_until_idle would give up first."""
    spans: list[tuple[str, int]] = []

    async def stuck(ctx: Context) -> str:
        spans.append(("start", ctx.attempt))
        try:
            await asyncio.sleep(60)
        finally:
            spans.append(("cancelled", ctx.attempt))
        return "never"

    flow = Flow(unique("async_timeout"), storage=storage)
    flow.step("stuck", stuck, retries=1, timeout=0.2, backoff=0)
    run = flow.run({}, tracking_id="stuck")
    drain(storage, timeout=20)

    assert spans == [("start", 1), ("cancelled", 1), ("start", 2), ("cancelled", 2)]
    with pytest.raises(StepFailed, match="longer than its timeout") as failed:
        run.wait(timeout=5)
    assert failed.value.attempts == 2
    assert "StepTimeout" in nodes_of(storage, "stuck")["stuck"].error


def test_a_coroutine_that_swallows_its_cancellation_still_times_out(unique: Names) -> None:
    """A coroutine that catches the cancellation and returns is still past its timeout:
    its result is dropped and the attempt fails with StepTimeout, as a late sync call's."""
    storage = InMemoryStorage()

    async def stubborn(ctx: Context) -> str:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            return "late result"
        return "never"

    flow = Flow(unique("async_stubborn"), storage=storage)
    flow.step("stubborn", stubborn, timeout=0.1)
    run = flow.run({}, tracking_id="stubborn")
    drain(storage, timeout=20)
    with pytest.raises(StepFailed, match="longer than its timeout"):
        run.wait(timeout=5)
    assert nodes_of(storage, "stubborn")["stubborn"].output is None


def test_a_slow_async_condition_is_cancelled_at_the_step_timeout(unique: Names) -> None:
    """The step's timeout covers its async condition too: a condition past it is
    cancelled, and the step fails with StepTimeout without being called."""
    storage = InMemoryStorage()
    called: list[int] = []

    async def slow_condition(ctx: Context) -> bool:
        await asyncio.sleep(60)
        return True

    flow = Flow(unique("async_slow_condition"), storage=storage)
    flow.step("guarded", lambda ctx: called.append(1), timeout=0.1, condition=slow_condition)
    run = flow.run({}, tracking_id="guarded")
    drain(storage, timeout=20)
    with pytest.raises(StepFailed, match="longer than its timeout"):
        run.wait(timeout=5)
    assert called == []


def test_async_steps_of_all_slots_share_one_event_loop(unique: Names) -> None:
    """Two parallel async steps on two slots run at the same time on the same loop: each
    waits for an asyncio.Event the other sets, which works only on one shared loop (an
    asyncio object belongs to the loop that first uses it, as an async client does)."""
    storage = InMemoryStorage()
    arrived = {"left": asyncio.Event(), "right": asyncio.Event()}
    loops: list[asyncio.AbstractEventLoop] = []

    async def meet(ctx: Context) -> str:
        other = "right" if ctx.step == "left" else "left"
        loops.append(asyncio.get_running_loop())
        arrived[ctx.step].set()
        await asyncio.wait_for(arrived[other].wait(), timeout=10)
        return f"{ctx.step} met {other}"

    flow = Flow(unique("async_meet"), storage=storage)
    with flow.parallel():
        flow.step("left", meet)
        flow.step("right", meet)
    run = flow.run({}, tracking_id="meet")
    drain(storage, concurrency=2)
    assert run.wait(timeout=5) == {"left": "left met right", "right": "right met left"}
    assert len(loops) == 2 and loops[0] is loops[1]


def test_a_sync_function_returning_a_coroutine_fails_at_once_and_closes_it(
    unique: Names,
) -> None:
    """A plain function that returns a coroutine (a lambda calling an async function)
    fails its step at once, retries left unused, saying to declare it `async def`; its
    coroutine is closed, so no "never awaited" warning. The same for a condition and
    for a subflow step's function."""
    storage = InMemoryStorage()
    flow = Flow(unique("not_awaited"), storage=storage)
    flow.step("fetch", lambda ctx: fetch_price(ctx), retries=3)
    run = flow.run({"qty": 1}, tracking_id="lambda")
    guarded = Flow(unique("not_awaited_condition"), storage=storage)
    guarded.step("g", lambda ctx: "ran", retries=3, condition=lambda ctx: is_big(ctx))
    guarded_run = guarded.run({"fetch": {"price": 1}}, tracking_id="condition")

    async def child_request(ctx: Context) -> dict[str, Any]:
        return {"flow": flow, "tracking_id": "never"}

    @workflow(unique("not_awaited_subflow"), storage=storage)
    def starts_child() -> None:
        @subflow(retries=3)
        def start(ctx: Context) -> Any:
            return child_request(ctx)  # an async function's coroutine, not awaited

    subflow_run = starts_child({}, tracking_id="subflow")
    drain(storage)

    with pytest.raises(StepFailed, match="async def") as failed:
        run.wait(timeout=5)
    assert failed.value.attempts == 1 and "NotAwaited" in failed.value.error
    with pytest.raises(StepFailed, match="condition of step 'g'") as failed:
        guarded_run.wait(timeout=5)
    assert failed.value.attempts == 1
    with pytest.raises(StepFailed, match="function of step 'start'") as failed:
        subflow_run.wait(timeout=5)
    assert failed.value.attempts == 1


def test_an_async_subflow_tracking_id_function_is_refused_at_definition(unique: Names) -> None:
    """Flow.subflow(tracking_id=<async function>) raises when the flow is defined: the
    child's tracking_id is computed where nothing awaits, and would be a coroutine's repr."""
    child = Flow(unique("child"), storage=InMemoryStorage()).step("s", lambda ctx: None)

    async def child_id(ctx: Context) -> str:
        return "child-1"

    with pytest.raises(TypeError, match="is an async function"):
        Flow(unique("parent")).subflow("start", child, tracking_id=child_id)


def test_an_async_step_raising_system_exit_fails_its_attempt_and_the_loop_goes_on(
    unique: Names,
) -> None:
    """KeyboardInterrupt or SystemExit from an async step is its attempt's error, as from
    a sync step; asyncio would re-raise it out of the loop and stop every async step of
    the process, so the next async step proves the loop still runs."""
    storage = InMemoryStorage()

    async def exits(ctx: Context) -> None:
        await asyncio.sleep(0)
        raise SystemExit(3)

    flow = Flow(unique("async_exit"), storage=storage)
    flow.step("exits", exits)
    failed_run = flow.run({}, tracking_id="exits")
    drain(storage)
    with pytest.raises(StepFailed, match="SystemExit"):
        failed_run.wait(timeout=5)

    after = Flow(unique("async_after_exit"), storage=storage).step("fetch", fetch_price)
    run = after.run({"qty": 1}, tracking_id="after")
    drain(storage)
    assert run.wait(timeout=5)["fetch"] == {"price": 3}


def test_an_async_step_that_lost_its_lease_cannot_overwrite_the_newer_attempt(
    storage: Storage, unique: Names
) -> None:
    """Fencing holds for coroutines: an async attempt whose lease expired while it was
    awaited (rescued, claimed and completed by another worker meanwhile) has its
    outcome refused when it finally returns; the newer attempt's output stays."""
    go_on = threading.Event()

    async def slow(ctx: Context) -> str:
        while not go_on.is_set():
            await asyncio.sleep(0.01)
        return f"stale attempt {ctx.attempt}"

    flow = Flow(unique("async_fenced"), storage=storage).step("slow", slow, retries=2)
    flow.run({}, tracking_id="fenced")
    [old] = storage.claim_nodes(worker_id="old", limit=1, lease_seconds=0.2, queues=["default"])
    outcome: list[Outcome] = []
    running = threading.Thread(target=lambda: outcome.append(Executor(storage, "old").execute(old)))
    running.start()
    try:
        time.sleep(0.4)  # past the old lease
        assert [r.attempt for r in storage.rescue_expired()] == [1]
        [new] = storage.claim_nodes(worker_id="new", limit=1, lease_seconds=30, queues=["default"])
        assert storage.complete_node(lease=new.lease, output="fresh")
    finally:
        go_on.set()
        running.join(timeout=10)
    assert outcome == [Outcome.LEASE_LOST]
    record = storage.get_flow(tracking_id="fenced")
    assert record is not None and record.status == FlowStatus.COMPLETED
    assert record.output == {"slow": "fresh"}


# -- a real `flowsmith worker` process -------------------------------------------------

ASYNC_FLOWS_MODULE = textwrap.dedent(
    '''
    """Async flows for tests/contract/test_async_steps.py."""
    import asyncio
    import os

    from flowsmith_worker.decorators import step, workflow

    NAME = os.environ["FS_FLOW_NAME"]


    async def is_big(ctx):
        await asyncio.sleep(0)
        return ctx.data["qty"] > 2


    @workflow(NAME)
    def priced():
        @step(retries=2, backoff=0)
        async def fetch(ctx):
            await asyncio.sleep(0.01)
            if ctx.attempt == 1:
                raise ConnectionError("first attempt fails")
            return {"price": ctx.data["qty"] * 3, "attempt": ctx.attempt}

        @step(condition=is_big)
        async def discount(ctx):
            return ctx.data["fetch"]["price"] - 1


    @workflow(os.environ["FS_STUCK_NAME"])
    def stuck():
        @step(timeout=0.3)
        async def wait_forever(ctx):
            await asyncio.sleep(3600)
    '''
)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_real_worker_process_runs_async_steps(
    request: pytest.FixtureRequest, backend: str, tmp_path: Path, unique: Names
) -> None:
    """`flowsmith worker` awaits async steps and conditions, retries a failed coroutine,
    cancels one past its timeout (its run FAILED with StepTimeout, not stuck for an
    hour), stops cleanly on SIGTERM, and prints no "never awaited" or "Task was
    destroyed" on the way."""
    url = database_url(request, backend, tmp_path)
    storage = create_storage(url)
    storage.migrate()
    name, stuck_name = unique("async_proc"), unique("async_stuck")
    (tmp_path / "asyncflows.py").write_text(ASYNC_FLOWS_MODULE)
    env = dict(os.environ, FS_FLOW_NAME=name, FS_STUCK_NAME=stuck_name)
    env["PYTHONWARNINGS"] = "default"  # show every warning, once
    # What enqueueing needs of the workers' flows: names and retries (the stored plan).
    priced = Flow(name, storage=storage)
    priced.step("fetch", _not_here, retries=2).step("discount", _not_here)
    stuck = Flow(stuck_name, storage=storage).step("wait_forever", _not_here)
    big, small = priced.run({"qty": 3}), priced.run({"qty": 1})
    hung = stuck.run({})
    worker = WorkerProcess(tmp_path, url, env, "--poll-interval", "0.1", module="asyncflows")
    try:
        worker.wait_started()
        assert big.wait(timeout=30) == {
            "qty": 3,
            "fetch": {"price": 9, "attempt": 2},
            "discount": 8,
        }
        assert small.wait(timeout=30) == {"qty": 1, "fetch": {"price": 3, "attempt": 2}}
        with pytest.raises(StepFailed, match="longer than its timeout"):
            hung.wait(timeout=30)
        worker.signal(signal.SIGTERM)
        assert worker.wait(timeout=30) == 0
        output = worker.output()
        assert "never awaited" not in output and "Task was destroyed" not in output, output
        assert eventually(lambda: not storage.list_workers())
    finally:
        worker.cleanup()
        storage.close()


def _not_here(_ctx: Context) -> None:
    raise AssertionError("steps run in the worker process, not in the test")

"""What the executor does with whatever a step does, on every backend.

Timeouts (a timed-out call keeps its slot until it returns, so attempts never
overlap), BaseExceptions raised by steps, and values that cannot be stored
(too large, too deep, NaN): each attempt ends at once with an error saying
why, instead of being left to its lease. In-process workers with real threads
and the real databases.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from flowsmith_worker import Context, Flow, FlowSmithError, FlowStatus, NodeStatus, Worker
from flowsmith_worker import payload as payload_module
from flowsmith_worker.errors import PayloadNotJSON, PayloadTooDeep, PayloadTooLarge
from flowsmith_worker.payload import PayloadLimits
from flowsmith_worker.storage.base import Storage
from tests.conftest import eventually

Names = Callable[[str], str]


class Executions:
    """Start and end times (monotonic) of every call of a step, kept by the step itself."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.spans: list[tuple[int, float, float | None]] = []  # attempt, start, end
        self.running = 0
        self.most_at_once = 0

    def run(self, ctx: Context, seconds: float) -> str:
        with self.lock:
            index = len(self.spans)
            self.spans.append((ctx.attempt, time.monotonic(), None))
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        time.sleep(seconds)
        with self.lock:
            attempt, start, _ = self.spans[index]
            self.spans[index] = (attempt, start, time.monotonic())
            self.running -= 1
        return f"attempt {ctx.attempt}"


@pytest.fixture
def small_payload_limit() -> Iterator[int]:
    """A 64 KiB payload limit for this test (the storage reset() restores the default)."""
    limit = 64 * 1024
    payload_module.set_limits(PayloadLimits(max_bytes=limit))
    yield limit


def drain(storage: Storage, timeout: float = 30.0, **kw: Any) -> Worker:
    worker = Worker(storage=storage, poll_interval=0.05, **kw)
    worker.run_until_idle(timeout=timeout)
    return worker


def only_node(storage: Storage, tracking_id: str) -> Any:
    record = storage.get_flow(tracking_id=tracking_id)
    assert record is not None
    [node] = storage.list_nodes(flow_id=record.id)
    return record, node


# -- timeouts -------------------------------------------------------------------------


def test_attempts_of_a_timed_out_step_never_overlap_and_none_runs_after_failed(
    storage: Storage, unique: Names
) -> None:
    """A step past its timeout keeps its slot until it returns; only then is the retry due.

    Each of the 3 attempts sleeps 0.6 s against a 0.15 s timeout: every one
    ends before the next starts, the run FAILS with StepTimeout after the third
    has returned, and nothing of the step runs after that.
    """
    calls = Executions()
    flow = Flow(unique("f"), storage=storage).step(
        "slow", lambda ctx: calls.run(ctx, 0.6), retries=2, timeout=0.15, backoff=0
    )
    run = flow.run({}, tracking_id=unique("t"))
    drain(storage, concurrency=4)
    record, node = only_node(storage, run.tracking_id)
    assert record.status == FlowStatus.FAILED
    assert (node.status, node.attempt) == (NodeStatus.FAILED, 3)
    assert "StepTimeout" in (node.error or "") and "its result was dropped" in (node.error or "")
    failed_seen = time.monotonic()
    assert [attempt for attempt, _, _ in calls.spans] == [1, 2, 3]
    for (_, _, end), (_, next_start, _) in zip(calls.spans, calls.spans[1:], strict=False):
        assert end is not None and end <= next_start, calls.spans
    assert all(end is not None and end < failed_seen for _, _, end in calls.spans)
    time.sleep(0.3)
    assert len(calls.spans) == 3, "an attempt started after the run FAILED"


def test_timed_out_steps_never_hold_more_threads_than_slots(
    storage: Storage, unique: Names
) -> None:
    """Six runs whose steps all time out, two slots: never more than two calls run at once.

    Before, each timed-out call was abandoned on a thread of its own and the
    slot reused, so calls (and threads) piled up. After the worker stops, no
    thread of it is left.
    """
    calls = Executions()
    flow = Flow(unique("f"), storage=storage).step(
        "slow", lambda ctx: calls.run(ctx, 0.3), retries=1, timeout=0.05, backoff=0
    )
    before = threading.active_count()
    for _ in range(6):
        flow.run({}, tracking_id=unique("t"))
    worker = drain(storage, concurrency=2)
    assert len(calls.spans) == 12
    assert calls.most_at_once <= 2, calls.most_at_once
    worker.shutdown()
    eventually(lambda: threading.active_count() <= before, timeout=10)


def test_a_condition_is_covered_by_the_step_timeout(storage: Storage, unique: Names) -> None:
    """A condition= function slower than the step's timeout fails the attempt with StepTimeout."""

    def slow_condition(ctx: Context) -> bool:
        time.sleep(0.4)
        return True

    flow = Flow(unique("f"), storage=storage).step(
        "guarded", lambda ctx: "ran", timeout=0.1, condition=slow_condition
    )
    run = flow.run({}, tracking_id=unique("t"))
    drain(storage)
    record, node = only_node(storage, run.tracking_id)
    assert record.status == FlowStatus.FAILED
    assert node.status == NodeStatus.FAILED and "StepTimeout" in (node.error or "")


def test_a_step_within_its_timeout_completes(storage: Storage, unique: Names) -> None:
    """The timeout only fails calls that run past it."""
    flow = Flow(unique("f"), storage=storage).step("quick", lambda ctx: "done", timeout=5)
    run = flow.run({}, tracking_id=unique("t"))
    drain(storage)
    assert run.wait(5)["quick"] == "done"


# -- BaseExceptions raised by steps ------------------------------------------------------


@pytest.mark.parametrize("raised", [KeyboardInterrupt, SystemExit], ids=lambda e: e.__name__)
def test_a_step_raising_a_base_exception_fails_its_attempt_at_once(
    storage: Storage, unique: Names, raised: type[BaseException]
) -> None:
    """KeyboardInterrupt or SystemExit from a step is that attempt's error, written at once.

    The lease is 60 s: the attempt is not left to it, the retry runs at once,
    and the worker goes on to the next run.
    """

    def interrupts_once(ctx: Context) -> str:
        if ctx.attempt == 1:
            raise raised("raised by the step")
        return "second attempt"

    flow = Flow(unique("f"), storage=storage).step("s", interrupts_once, retries=1, backoff=0)
    run = flow.run({}, tracking_id=unique("t"))
    after = Flow(unique("g"), storage=storage).step("s", lambda ctx: "next").run({})
    started = time.monotonic()
    drain(storage, lease_seconds=60, timeout=20)
    assert time.monotonic() - started < 20
    assert run.wait(1)["s"] == "second attempt"
    assert after.wait(1)["s"] == "next"
    [node] = run.trace()
    assert node.attempt == 2 and node.rescues == 0
    assert raised.__name__ in (node.error or "")


# -- values that cannot be stored ---------------------------------------------------------


def test_an_output_over_the_payload_limit_fails_at_once_without_retry(
    storage: Storage, unique: Names, small_payload_limit: int
) -> None:
    """An output over the limit fails its attempt at once, saying which limit and by how much.

    retries=3, but a value over the limit would be refused again: no retry.
    """
    big = "x" * (small_payload_limit + 1000)
    flow = Flow(unique("f"), storage=storage).step("big", lambda ctx: big, retries=3)
    run = flow.run({}, tracking_id=unique("t"))
    drain(storage, lease_seconds=60)
    record, node = only_node(storage, run.tracking_id)
    assert record.status == FlowStatus.FAILED
    assert (node.status, node.attempt, node.rescues) == (NodeStatus.FAILED, 1, 0)
    assert "PayloadTooLarge" in (node.error or "")
    assert f"over the limit of {small_payload_limit} bytes by 1002 bytes" in (node.error or "")


def test_run_data_past_the_limit_is_stored_as_outputs_but_never_copied_whole(
    storage: Storage, unique: Names, small_payload_limit: int
) -> None:
    """Each output fits but ctx.data as a whole would not: the run goes on, since each
    output is stored once and ctx.data is rebuilt, never stored; the one place that
    copies it whole, a subflow's input, fails its step at once, without retry,
    naming the limit, and no child run is written.
    """
    half = "y" * (small_payload_limit // 2 + 100)
    child = Flow(unique("child"), storage=storage).step("noop", lambda ctx: None)
    flow = Flow(unique("f"), storage=storage)
    flow.step("a", lambda ctx: half).step("b", lambda ctx: half)
    flow.step("sizes", lambda ctx: len(ctx.data["a"]) + len(ctx.data["b"]))
    flow.subflow("c", child)
    run = flow.run({}, tracking_id=unique("t"))
    drain(storage, lease_seconds=60)
    record = storage.get_flow(tracking_id=run.tracking_id)
    assert record is not None and record.status == FlowStatus.FAILED
    nodes = {n.step_name: n for n in storage.list_nodes(flow_id=record.id)}
    assert nodes["sizes"].output == 2 * len(half)
    assert (nodes["c"].status, nodes["c"].attempt) == (NodeStatus.FAILED, 1)
    assert f"the input of flow {child.name!r}" in (nodes["c"].error or "")
    assert f"over the limit of {small_payload_limit} bytes" in (nodes["c"].error or "")
    assert storage.get_flow(tracking_id=f"{run.tracking_id}:c") is None


def test_a_subflow_whose_final_data_is_over_the_limit_fails_at_once(
    storage: Storage, unique: Names, small_payload_limit: int
) -> None:
    """The child's input and its step's output each fit, but its final ctx.data, which
    becomes the parent step's output, does not: the child's last step fails at once
    (retries=3, no retry) saying its outcome cannot be stored, and so does the parent.
    """
    half = "y" * (small_payload_limit // 2 + 100)
    child = Flow(unique("child"), storage=storage).step("big", lambda ctx: half, retries=3)
    parent = Flow(unique("parent"), storage=storage).subflow("sub", child)
    run = parent.run({"blob": half}, tracking_id=unique("t"))
    drain(storage, lease_seconds=60)
    _, node = only_node(storage, f"{run.tracking_id}:sub")
    assert (node.status, node.attempt) == (NodeStatus.FAILED, 1)
    assert "step 'big' finished, but its outcome cannot be stored" in (node.error or "")
    assert f"over the limit of {small_payload_limit} bytes" in (node.error or "")
    record, sub = only_node(storage, run.tracking_id)
    assert (record.status, sub.status) == (FlowStatus.FAILED, NodeStatus.FAILED)


def test_an_output_nested_a_thousand_levels_fails_at_once(storage: Storage, unique: Names) -> None:
    """A 1,000-deep output is refused before the database sees it, naming the depth limit."""

    def deep(ctx: Context) -> list[Any]:
        value: list[Any] = []
        for _ in range(1000):
            value = [value]
        return value

    run = Flow(unique("f"), storage=storage).step("deep", deep, retries=2).run({})
    drain(storage, lease_seconds=60)
    record, node = only_node(storage, run.tracking_id)
    assert record.status == FlowStatus.FAILED
    assert (node.attempt, node.rescues) == (1, 0)
    assert "PayloadTooDeep" in (node.error or "") and "limit of 100" in (node.error or "")


@pytest.mark.parametrize(
    ("value", "name"),
    [(math.nan, "NaN"), (math.inf, "Infinity"), (-math.inf, "-Infinity")],
    ids=["nan", "inf", "-inf"],
)
def test_nan_and_infinity_outputs_are_refused_by_name(
    storage: Storage, unique: Names, value: float, name: str
) -> None:
    """NaN and ±Infinity are not JSON: the step fails saying which and where."""
    flow = Flow(unique("f"), storage=storage).step("n", lambda ctx: {"score": [1.0, value]})
    run = flow.run({}, tracking_id=unique("t"))
    drain(storage)
    _, node = only_node(storage, run.tracking_id)
    assert node.status == NodeStatus.FAILED
    assert f'contains {name} at $["score"][1]' in (node.error or "")


@pytest.mark.parametrize(
    ("data", "error", "words"),
    [
        ({"x": math.nan}, PayloadNotJSON, "contains NaN"),
        ({"x": -math.inf}, PayloadNotJSON, "contains -Infinity"),
        ({"x": "z" * 70_000}, PayloadTooLarge, "over the limit of 65536 bytes"),
        ({"x": [[[[]]]] * 2}, None, ""),
    ],
    ids=["nan", "-inf", "large", "fine"],
)
def test_an_input_that_cannot_be_stored_is_refused_and_nothing_written(
    storage: Storage,
    unique: Names,
    small_payload_limit: int,
    data: dict[str, Any],
    error: type[Exception] | None,
    words: str,
) -> None:
    """Flow.run refuses such an input with a clear error before anything is written."""
    flow = Flow(unique("f"), storage=storage).step("s", lambda ctx: None)
    tracking_id = unique("t")
    if error is None:
        flow.run(data, tracking_id=tracking_id)
        assert storage.get_flow(tracking_id=tracking_id) is not None
        return
    with pytest.raises(error, match=words) as refused:
        flow.run(data, tracking_id=tracking_id)
    assert isinstance(refused.value, FlowSmithError)
    assert f"the input of flow {flow.name!r}" in str(refused.value)
    assert storage.get_flow(tracking_id=tracking_id) is None


def test_a_deep_input_is_refused(storage: Storage, unique: Names) -> None:
    """An input 152 levels deep (a dict, then 151 lists) is refused by name; nothing is written."""
    value: list[Any] = []
    for _ in range(150):
        value = [value]
    flow = Flow(unique("f"), storage=storage).step("s", lambda ctx: None)
    with pytest.raises(PayloadTooDeep, match="deeper than the limit of 100 by 52"):
        flow.run({"v": value}, tracking_id=(tid := unique("t")))
    assert storage.get_flow(tracking_id=tid) is None


@pytest.mark.parametrize("backend", ["mysql"], indirect=True)
def test_a_20_mib_output_on_mariadb_fails_cleanly_at_once(storage: Storage, unique: Names) -> None:
    """The issue's case, with the default limit: a 20 MiB output on MariaDB.

    Before, the driver's "packet too large" error looked like a lost database,
    and the node waited for its lease and ran again. Now it fails at once,
    with the limit named, and MariaDB never sees the value.
    """
    big = "m" * (20 * 1024 * 1024)
    run = Flow(unique("f"), storage=storage).step("huge", lambda ctx: big, retries=2).run({})
    started = time.monotonic()
    drain(storage, lease_seconds=60)
    assert time.monotonic() - started < 30
    record, node = only_node(storage, run.tracking_id)
    assert record.status == FlowStatus.FAILED
    assert (node.attempt, node.rescues) == (1, 0)
    assert "over the limit of 4.0 MiB" in (node.error or "")
    assert "unavailable" not in (node.error or "")


@pytest.mark.parametrize("message", ["NUL \x00 inside", "lone \ud800 surrogate"])
def test_an_error_no_database_could_store_as_is_is_recorded_escaped_at_once(
    storage: Storage, unique: Names, message: str
) -> None:
    """A step's error quoting a NUL or a lone surrogate is stored escaped, on its one
    attempt: it is not left to its lease, rescued and run again with its error lost."""

    def quoting(ctx: Context) -> None:
        raise ValueError(message)

    flow = Flow(unique("f"), storage=storage).step("quoting", quoting)
    run = flow.run({}, tracking_id=unique("t"))
    drain(storage, lease_seconds=60, timeout=20)
    _record, node = only_node(storage, run.tracking_id)
    assert (node.status, node.attempt, node.rescues) == (NodeStatus.FAILED, 1, 0)
    escaped = message.replace("\x00", "\\x00").replace("\ud800", "\\ud800")
    assert escaped in (node.error or "")


def test_the_payload_limit_follows_its_environment_variable_as_it_changes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """$FLOWSMITH_MAX_PAYLOAD_BYTES is parsed once per value, not once per encode; a new
    value still takes effect at the next encode, and clearing it restores the default."""
    payload_module.set_limits(None)
    value = "x" * 3000
    monkeypatch.setenv(payload_module.MAX_PAYLOAD_BYTES_ENV_VAR, "2048")
    with pytest.raises(PayloadTooLarge):
        payload_module.encode(value)
    monkeypatch.setenv(payload_module.MAX_PAYLOAD_BYTES_ENV_VAR, "4096")
    assert payload_module.encode(value) == f'"{value}"'
    monkeypatch.setenv(payload_module.MAX_PAYLOAD_BYTES_ENV_VAR, "2048")
    with pytest.raises(PayloadTooLarge):
        payload_module.encode(value)
    monkeypatch.delenv(payload_module.MAX_PAYLOAD_BYTES_ENV_VAR)
    assert payload_module.limits() == PayloadLimits()


def test_a_step_cannot_change_scalar_ctx_data_that_the_next_step_sees(
    storage: Storage, unique: Names
) -> None:
    """When ctx.data holds only strings and numbers (copied without a deep copy), what a
    step assigns or deletes in it still does not reach the next step."""
    seen: list[dict[str, Any]] = []

    def change(ctx: Context) -> None:
        ctx.data["a"] = "changed"
        ctx.data["n"] += 1
        del ctx.data["s"]

    flow = Flow(unique("scalars"), storage=storage)
    flow.step("a", lambda ctx: 1).step("b", change).step("c", lambda ctx: seen.append(ctx.data))
    flow.run({"n": 1, "s": "text"}, tracking_id=unique("t"))
    Worker(storage=storage, poll_interval=0.05, concurrency=1).run_until_idle(timeout=20)
    assert seen == [{"n": 1, "s": "text", "a": 1, "b": None}]

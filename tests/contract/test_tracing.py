"""OpenTelemetry spans of runs and step attempts (flowsmith_worker/tracing.py), on every backend.

The SDK's InMemorySpanExporter keeps the spans that the enqueuing code and the
in-process workers (real threads) make: a span per run, a child of the span
current at the enqueue; a span per step attempt, a child of its run's span, with
its attributes, its outcome and, on failure, its error. The run's traceparent
goes through the real database (it is stored with the run), and never shows in
ctx.data, the run's record or its output.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from flowsmith_worker import Context, Flow, FlowStatus, Worker
from flowsmith_worker.errors import PayloadRejected
from flowsmith_worker.records import TRACE_PARENT_KEY
from flowsmith_worker.storage.base import Storage

Names = Callable[[str], str]
CONSUMER, PRODUCER = trace.SpanKind.CONSUMER, trace.SpanKind.PRODUCER
tracer = trace.get_tracer("tests.contract.test_tracing")


def drain(storage: Storage) -> Worker:
    worker = Worker(storage=storage, poll_interval=0.05, concurrency=4)
    worker.run_until_idle(timeout=30)
    return worker


def named(spans: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    found = [s for s in spans.get_finished_spans() if s.name == name]
    return sorted(found, key=lambda s: (s.attributes or {}).get("flowsmith.attempt", 0))


def parent_of(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent else None


def span_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return span.context.span_id


def trace_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return span.context.trace_id


def test_attempt_spans_are_children_of_the_run_span_in_the_enqueuing_trace(
    storage: Storage, unique: Names, spans: InMemorySpanExporter
) -> None:
    """The run span is a child of the request that enqueued the run; each attempt of its
    two steps (the second chained to the first) is a child of the run span, with the
    attempt's attributes. The stored traceparent is in no ctx.data, record or output."""
    seen: list[dict[str, Any]] = []

    def step(ctx: Context) -> int:
        seen.append(dict(ctx.data))
        return len(seen)

    name = unique("checkout")
    flow = Flow(name, storage=storage).step("reserve", step).step("charge", step)
    with tracer.start_as_current_span("POST /orders") as request:
        run = flow.run({"order": 7}, tracking_id=unique("t"))
    worker = drain(storage)

    [run_span] = named(spans, f"run {name}")
    assert run_span.kind == PRODUCER
    assert parent_of(run_span) == request.get_span_context().span_id
    assert trace_id(run_span) == request.get_span_context().trace_id
    assert run_span.attributes == {
        "flowsmith.flow": name,
        "flowsmith.tracking_id": run.tracking_id,
        "flowsmith.queue": "default",
    }
    for step_name in ("reserve", "charge"):
        [attempt] = named(spans, f"step {name}.{step_name}")
        assert attempt.kind == CONSUMER
        assert parent_of(attempt) == span_id(run_span)
        assert trace_id(attempt) == trace_id(run_span)
        assert attempt.status.status_code == trace.StatusCode.UNSET
        assert attempt.attributes == {
            "flowsmith.flow": name,
            "flowsmith.step": step_name,
            "flowsmith.tracking_id": run.tracking_id,
            "flowsmith.attempt": 1,
            "flowsmith.worker_id": worker.id,
            "flowsmith.outcome": "completed",
        }
    assert seen == [{"order": 7}, {"order": 7, "reserve": 1}]
    record = storage.get_flow(tracking_id=run.tracking_id)
    assert record is not None and record.status == FlowStatus.COMPLETED
    assert record.input == {"order": 7}
    assert record.output == {"order": 7, "reserve": 1, "charge": 2}
    [first, _] = storage.list_nodes(flow_id=record.id)
    assert first.input == {"order": 7}


def test_a_failed_attempt_records_its_error_and_each_retry_has_a_span(
    storage: Storage, unique: Names, spans: InMemorySpanExporter
) -> None:
    """A step that raises on its first attempt and succeeds on its second: two spans
    under one run span, the first with status ERROR, the exception as an event and the
    outcome retry_scheduled. A step that fails for good ends with outcome failed."""

    def flaky(ctx: Context) -> str:
        if ctx.attempt == 1:
            raise ValueError("card declined")
        return "charged"

    def broken(ctx: Context) -> None:
        raise RuntimeError("ledger is gone")

    name = unique("pay")
    flow = Flow(name, storage=storage).step("charge", flaky, retries=1, backoff=0)
    flow.step("book", broken)
    flow.run({}, tracking_id=unique("t"))
    drain(storage)

    [run_span] = named(spans, f"run {name}")
    first, second = named(spans, f"step {name}.charge")
    assert [parent_of(first), parent_of(second)] == [span_id(run_span)] * 2
    assert (first.attributes or {})["flowsmith.attempt"] == 1
    assert (first.attributes or {})["flowsmith.outcome"] == "retry_scheduled"
    assert first.status.status_code == trace.StatusCode.ERROR
    assert first.status.description == "ValueError: card declined"
    [event] = first.events
    assert event.name == "exception"
    assert (event.attributes or {})["exception.message"] == "card declined"
    assert (second.attributes or {})["flowsmith.attempt"] == 2
    assert (second.attributes or {})["flowsmith.outcome"] == "completed"
    assert second.status.status_code == trace.StatusCode.UNSET
    [booked] = named(spans, f"step {name}.book")
    assert (booked.attributes or {})["flowsmith.outcome"] == "failed"
    assert booked.status.description == "RuntimeError: ledger is gone"


def test_a_subflow_run_nests_inside_the_attempt_that_started_it(
    storage: Storage, unique: Names, spans: InMemorySpanExporter
) -> None:
    """The child run's span is a child of the parent's subflow attempt, and the child's
    attempts are children of it: parent and child runs are one trace."""
    child_name, parent_name = unique("child"), unique("parent")
    child = Flow(child_name, storage=storage).step("ship", lambda ctx: "shipped")
    parent = Flow(parent_name, storage=storage).subflow("fulfil", child)
    parent.step("notify", lambda ctx: ctx.data["fulfil"]["ship"])
    with tracer.start_as_current_span("POST /orders"):
        run = parent.run({}, tracking_id=unique("t"))
    drain(storage)
    # The child's output, its final ctx.data, reaches the parent without its traceparent.
    assert run.wait(timeout=5) == {"fulfil": {"ship": "shipped"}, "notify": "shipped"}

    [parent_run] = named(spans, f"run {parent_name}")
    [fulfil] = named(spans, f"step {parent_name}.fulfil")
    [child_run] = named(spans, f"run {child_name}")
    [ship] = named(spans, f"step {child_name}.ship")
    [notify] = named(spans, f"step {parent_name}.notify")
    assert parent_of(fulfil) == span_id(parent_run)
    assert (fulfil.attributes or {})["flowsmith.outcome"] == "waiting"
    assert parent_of(child_run) == span_id(fulfil)
    assert parent_of(ship) == span_id(child_run)
    assert parent_of(notify) == span_id(parent_run)
    assert len({trace_id(s) for s in (parent_run, fulfil, child_run, ship, notify)}) == 1


def test_run_many_gives_each_run_a_span_of_its_own(
    storage: Storage, unique: Names, spans: InMemorySpanExporter
) -> None:
    """Each run of a run_many has its own run span under the request's span, and its
    attempt is a child of that span, not of another run's."""
    name = unique("bulk")
    flow = Flow(name, storage=storage).step("one", lambda ctx: ctx.data["n"])
    with tracer.start_as_current_span("POST /batch") as request:
        runs = flow.run_many([{"n": n} for n in range(3)])
    drain(storage)

    run_spans = {
        (s.attributes or {})["flowsmith.tracking_id"]: s for s in named(spans, f"run {name}")
    }
    assert set(run_spans) == {r.tracking_id for r in runs}
    assert {parent_of(s) for s in run_spans.values()} == {request.get_span_context().span_id}
    attempts = named(spans, f"step {name}.one")
    assert len(attempts) == 3
    for attempt in attempts:
        tracking_id = (attempt.attributes or {})["flowsmith.tracking_id"]
        assert parent_of(attempt) == span_id(run_spans[tracking_id])


def test_run_async_enqueues_in_the_trace_of_the_awaiting_request(
    unique: Names, spans: InMemorySpanExporter
) -> None:
    """``await flow.run_async()`` enqueues in a thread; the run span is still a child of
    the span current in the coroutine that awaited it (an async web handler's)."""
    from flowsmith_worker.storage import InMemoryStorage

    name = unique("async_enqueue")
    flow = Flow(name, storage=InMemoryStorage()).step("one", lambda ctx: None)

    async def handler() -> int:
        with tracer.start_as_current_span("POST /async") as request:
            await flow.run_async({})
        return request.get_span_context().span_id

    request_id = asyncio.run(handler())
    [run_span] = named(spans, f"run {name}")
    assert parent_of(run_span) == request_id


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_spans_a_step_makes_nest_inside_its_attempt(
    kind: str, unique: Names, spans: InMemorySpanExporter, tmp_path: Path
) -> None:
    """The attempt's span is the current one while the step runs, in a sync step and in
    an ``async def`` one (awaited on the worker's event loop thread): what the step
    traces itself (an instrumented HTTP call) is a child of its attempt."""
    from flowsmith_worker.storage import InMemoryStorage

    def sync_step(ctx: Context) -> None:
        with tracer.start_as_current_span("GET /inventory"):
            pass

    async def async_step(ctx: Context) -> None:
        with tracer.start_as_current_span("GET /inventory"):
            pass

    storage = InMemoryStorage()
    storage.migrate()
    name = unique("inner")
    Flow(name, storage=storage).step("look", sync_step if kind == "sync" else async_step).run()
    drain(storage)
    storage.close()
    [attempt] = named(spans, f"step {name}.look")
    [inner] = named(spans, "GET /inventory")
    assert parent_of(inner) == span_id(attempt)


@pytest.mark.parametrize("stored", [None, "not a traceparent"])
def test_a_run_stored_without_a_usable_traceparent_starts_a_trace_of_its_own(
    stored: str | None, unique: Names, spans: InMemorySpanExporter
) -> None:
    """A run enqueued by a process that does not trace (no traceparent), or one whose
    stored traceparent is garbage, still runs, and its attempt's span is a root."""
    from flowsmith_worker.storage import InMemoryStorage

    storage = InMemoryStorage()
    storage.migrate()
    name = unique("plain")
    flow = Flow(name, storage=storage).step("one", lambda ctx: dict(ctx.data))
    request = dataclasses.replace(flow.new_run({"a": 1}, unique("t")), trace_parent=stored)
    storage.enqueue_flow(flow=request)
    spans.clear()  # new_run's own run span
    drain(storage)
    record = storage.get_flow(tracking_id=request.tracking_id)
    storage.close()
    assert record is not None and record.output == {"a": 1, "one": {"a": 1}}
    [attempt] = named(spans, f"step {name}.one")
    assert attempt.parent is None


def test_the_key_kept_for_the_traceparent_is_refused_in_an_input(unique: Names) -> None:
    """An input that has the reserved key is refused before anything is written, with a
    message saying which key and what to do: its value would be taken for a trace."""
    from flowsmith_worker.storage import InMemoryStorage

    flow = Flow(unique("f"), storage=InMemoryStorage()).step("one", lambda ctx: None)
    with pytest.raises(PayloadRejected, match="rename that key"):
        flow.run({TRACE_PARENT_KEY: "00-" + "1" * 32 + "-" + "2" * 16 + "-01"})


def test_a_process_that_does_not_trace_never_imports_opentelemetry(tmp_path: Path) -> None:
    """Enqueuing and running a flow, a subflow and a failing step in a fresh process that
    never imported OpenTelemetry leaves it unimported: tracing costs such a process only a
    dictionary lookup per enqueue and per attempt."""
    script = textwrap.dedent(
        """
        import sys
        from flowsmith_worker import Flow, Worker
        from flowsmith_worker.storage import InMemoryStorage

        storage = InMemoryStorage()
        storage.migrate()
        child = Flow("child", storage=storage).step("one", lambda ctx: 1)
        def fails(ctx):
            raise ValueError("no")
        flow = Flow("parent", storage=storage).subflow("sub", child).step("bad", fails)
        flow.run({"x": 1})
        flow.run_many([{"x": 2}])
        Worker(storage=storage, poll_interval=0.05).run_until_idle(timeout=30)
        loaded = sorted(m for m in sys.modules if m.startswith("opentelemetry"))
        assert not loaded, loaded
        print("ok")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_with_the_api_alone_a_run_joins_the_trace_it_was_enqueued_in(tmp_path: Path) -> None:
    """A process with OpenTelemetry's API and no SDK (the extra installed, nothing set up)
    records no span, yet a run enqueued inside a received trace context stores that
    context, for workers that do trace; its steps run, and nothing of it shows in the
    run's input or output."""
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    script = textwrap.dedent(
        f"""
        import sqlite3
        from opentelemetry import context
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
        from flowsmith_worker import Flow, Worker
        from flowsmith_worker.storage import create_storage

        url = "sqlite:///{tmp_path}/api.db"
        storage = create_storage(url)
        storage.migrate()
        flow = Flow("api_only", storage=storage).step("one", lambda ctx: sorted(ctx.data))
        received = TraceContextTextMapPropagator().extract({{"traceparent": "{traceparent}"}})
        token = context.attach(received)
        run = flow.run({{"a": 1}})
        context.detach(token)
        Worker(storage=storage, poll_interval=0.05).run_until_idle(timeout=30)
        print(run.wait(timeout=5))
        print(storage.get_flow(tracking_id=run.tracking_id).input)
        [stored] = sqlite3.connect("{tmp_path}/api.db").execute(
            "SELECT input FROM fs_flows"
        ).fetchone()
        print(stored)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert done.returncode == 0, done.stderr
    output, record_input, stored = done.stdout.strip().splitlines()
    assert output == "{'a': 1, 'one': ['a']}"
    assert record_input == "{'a': 1}"
    assert json.loads(stored) == {"a": 1, TRACE_PARENT_KEY: traceparent}

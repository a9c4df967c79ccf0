"""OpenTelemetry spans of runs and step attempts, for the applications that trace.

A run outlives the process that enqueued it and its steps run on any worker, at
any later time; OpenTelemetry lets only the process that started a span end it.
So, as Temporal's tracing interceptor does with its workflow spans:

* the **run span** ("run <flow>", kind PRODUCER) is started and ended by the
  enqueue itself (``flow.run``, ``run_many``, a subflow step starting its child),
  as a child of whatever span is current there (the web request that enqueued
  it). Its context, as a W3C ``traceparent``, is stored with the run: its
  start time and its place in the trace are right, its length is the enqueue's;
* each **attempt span** ("step <flow>.<step>", kind CONSUMER) covers one attempt
  of one step, from its call to its written outcome, on the worker that ran it,
  as a child of its run span. It is the current span while the step runs, so
  the spans the step makes itself (an instrumented HTTP client) nest inside it;
  a subflow's run span, and so its whole run, nests inside the attempt that
  started it.

Nothing here imports OpenTelemetry until the process has: an application that
traces imports it to set up its tracer provider, and one that does not pays
one dictionary lookup per enqueue and per attempt. So the ``otel`` extra
(``opentelemetry-api``) is all FlowSmith needs; the SDK and its exporter are the
application's choice.

Owns the spans and the traceparent's text. Must never decide what a run does:
an error here (a broken exporter) is OpenTelemetry's to handle, and a run
without a stored traceparent simply starts a trace of its own.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from flowsmith_worker.records import ClaimedNode
from flowsmith_worker.version import __version__

if TYPE_CHECKING:
    from opentelemetry.trace import Span, Tracer

# The module whose presence in sys.modules says that the process traces.
_OTEL = "opentelemetry.trace"
_TRACEPARENT = "traceparent"  # the W3C Trace Context header, as the propagator names it


def enabled() -> bool:
    """Whether this process uses OpenTelemetry (imported it): a dictionary lookup."""
    return _OTEL in sys.modules


def run_enqueued(flow_name: str, tracking_id: str, queue: str) -> str | None:
    """Start and end the span of a run being enqueued; its ``traceparent`` to store.

    None when the process does not trace, or has no trace to join (no SDK set up
    and no trace context received): the run's attempts then start traces of their own.
    """
    if not enabled():
        return None
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    attributes: dict[str, str | int] = {
        "flowsmith.flow": flow_name,
        "flowsmith.tracking_id": tracking_id,
        "flowsmith.queue": queue,
    }
    span = _tracer().start_span(
        f"run {flow_name}", kind=trace.SpanKind.PRODUCER, attributes=attributes
    )
    span.end()
    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier, trace.set_span_in_context(span))
    return carrier.get(_TRACEPARENT)


@contextmanager
def attempt_span(node: ClaimedNode, worker_id: str) -> Iterator[AttemptSpan]:
    """The span of one attempt, current while it runs, a child of its run's span."""
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    parent = None
    if node.trace_parent is not None:
        parent = TraceContextTextMapPropagator().extract({_TRACEPARENT: node.trace_parent})
    attributes: dict[str, str | int] = {
        "flowsmith.flow": node.flow_name,
        "flowsmith.step": node.step_name,
        "flowsmith.tracking_id": node.tracking_id,
        "flowsmith.attempt": node.attempt,
        "flowsmith.worker_id": worker_id,
    }
    with _tracer().start_as_current_span(
        f"step {node.flow_name}.{node.step_name}",
        context=parent,
        kind=trace.SpanKind.CONSUMER,
        attributes=attributes,
        # The executor catches everything a step raises, and says so (attempt_failed).
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        yield AttemptSpan(span)


class AttemptSpan:
    """The executor's handle on the span of the attempt it runs."""

    def __init__(self, span: Span) -> None:
        self.span = span

    def record_outcome(self, outcome: str) -> None:
        """What became of the attempt: "completed", "retry_scheduled", "failed"..."""
        self.span.set_attribute("flowsmith.outcome", outcome)


def attempt_failed(error: BaseException | None, summary: str) -> None:
    """Mark the current attempt's span failed, with the step's exception if it raised one."""
    if not enabled():
        return
    from opentelemetry import trace

    span = trace.get_current_span()
    if error is not None:
        span.record_exception(error)
    span.set_status(trace.Status(trace.StatusCode.ERROR, summary))


@functools.cache
def _tracer() -> Tracer:
    """The library's tracer, made once: a tracer taken before the application sets its
    provider forwards to that provider once it is set."""
    from opentelemetry import trace

    return trace.get_tracer("flowsmith_worker", __version__)

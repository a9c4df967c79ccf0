"""A trace across processes: enqueued here, run by a real `flowsmith worker` process.

The run's traceparent goes through the real database, from the process that
enqueued the run to the worker process that runs its steps, which exports its
spans (to a JSON-lines file, through the SDK) under the enqueuing request's trace.
"""

from __future__ import annotations

import json
import os
import signal
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

from opentelemetry import trace

from flowsmith_worker import Flow
from flowsmith_worker.storage import create_storage
from tests.conftest import eventually
from tests.worker_process import WorkerProcess

# The worker's module: the application sets up its SDK, then defines its flow.
TRACED_FLOWS = textwrap.dedent(
    """
    import json, os
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
    from flowsmith_worker import Flow

    class JsonLines(SpanExporter):
        def export(self, spans):
            with open(os.environ["FS_SPANS"], "a") as out:
                for span in spans:
                    out.write(json.dumps({
                        "name": span.name,
                        "trace_id": span.context.trace_id,
                        "parent_id": span.parent.span_id if span.parent else None,
                        "attributes": dict(span.attributes),
                        "status": span.status.status_code.name,
                    }) + "\\n")
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(JsonLines()))
    trace.set_tracer_provider(provider)

    def flaky(ctx):
        if ctx.attempt == 1:
            raise ValueError("the first attempt fails")
        return "ok"

    Flow(os.environ["FS_FLOW_NAME"]).step("flaky", flaky, retries=1, backoff=0).step(
        "after", lambda ctx: ctx.data["flaky"]
    )
    """
)


def test_a_worker_process_traces_a_run_under_the_request_that_enqueued_it(
    sql_url: str, tmp_path: Path, unique: Callable[[str], str], spans: Any
) -> None:
    """Each attempt the worker process runs (a failed one, its retry, the next step) is
    a span of the enqueuing request's trace, a child of the run span made here."""
    name = unique("traced")
    (tmp_path / "tracedflows.py").write_text(TRACED_FLOWS)
    spans_path = tmp_path / "spans.jsonl"
    storage = create_storage(sql_url)
    storage.migrate()
    # The enqueuing side's definition: the run's plan (its retries) comes from it.
    flow = Flow(name, storage=storage).step("flaky", lambda ctx: None, retries=1)
    flow.step("after", lambda ctx: None)
    with trace.get_tracer(__name__).start_as_current_span("POST /orders"):
        run = flow.run({}, tracking_id=unique("t"))
    [run_span] = [s for s in spans.get_finished_spans() if s.name == f"run {name}"]
    env = dict(os.environ, FS_FLOW_NAME=name, FS_SPANS=str(spans_path))
    worker = WorkerProcess(tmp_path, sql_url, env, "--poll-interval", "0.1", module="tracedflows")
    try:
        exported: list[dict[str, Any]] = eventually(
            lambda: _steps(spans_path) if len(_steps(spans_path)) == 3 else None, timeout=60
        )
        worker.signal(signal.SIGTERM)
        assert worker.wait(30) == 0, worker.output()
    finally:
        worker.cleanup()
        storage.close()
    assert run.wait(timeout=5)["after"] == "ok"
    assert [(s["name"], s["attributes"]["flowsmith.attempt"], s["status"]) for s in exported] == [
        (f"step {name}.flaky", 1, "ERROR"),
        (f"step {name}.flaky", 2, "UNSET"),
        (f"step {name}.after", 1, "UNSET"),
    ]
    assert {s["trace_id"] for s in exported} == {run_span.context.trace_id}
    assert {s["parent_id"] for s in exported} == {run_span.context.span_id}


def _steps(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [s for s in lines if s["name"].startswith("step ")]

"""What tracing (flowsmith_worker/tracing.py) costs per step attempt and per enqueued run.

    .venv/bin/python -m tests.bench.tracing_cost [--attempts 2000] [--rounds 30] [--runs 300]

Each mode runs in a fresh process, so that only the "off" one never imports
OpenTelemetry:

* off: the process does not trace (the ``otel`` extra not installed, or not used);
* api: OpenTelemetry imported, no SDK set up (the extra installed and left alone);
* sdk: the SDK's TracerProvider with a BatchSpanProcessor whose exporter drops the
  spans (what an application exporting to a collector pays in the worker's threads).

It times the executor's part of an attempt, Executor.run on a no-op step with
its outcome write answered at once (no database: the database's share of a step
is the same in every mode), and Flow.new_run, the enqueue's Python part, and
prints microseconds per call, the least of ``--rounds``; and, in the "off"
mode, the attempt without Executor.run's tracing wrapper (what the wrapper costs
a process that does not trace). Then, the whole step: the CPU per step of a
worker draining ``--runs`` 10-step runs from a SQLite file (claims and writes
included).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

MODES = ("off", "api", "sdk")


def _set_up(mode: str) -> None:
    if mode == "off":
        return
    from opentelemetry import trace

    if mode == "sdk":
        from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
        from opentelemetry.sdk.trace.export import (
            BatchSpanProcessor,
            SpanExporter,
            SpanExportResult,
        )

        class Dropped(SpanExporter):
            def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
                return SpanExportResult.SUCCESS

        provider = TracerProvider()
        provider.add_span_processor(BatchSpanProcessor(Dropped()))
        trace.set_tracer_provider(provider)
    with trace.get_tracer("bench").start_as_current_span("request"):
        pass


def _per_call(*calls: Callable[[], Any], count: int, rounds: int) -> list[float]:
    """Microseconds per call of each of ``calls``: the least of ``rounds`` timings of
    ``count`` calls (as timeit advises: the other processes of a busy machine only ever
    add time), the calls taking turns round by round so that they meet the same load."""
    timings: list[list[float]] = [[] for _ in calls]
    for _ in range(rounds):
        for call, taken in zip(calls, timings, strict=True):
            started = time.perf_counter()
            for _ in range(count):
                call()
            taken.append((time.perf_counter() - started) / count * 1e6)
    return [min(taken) for taken in timings]


def measure(mode: str, attempts: int, rounds: int, runs: int, workdir: str) -> dict[str, float]:
    """In this process: the cost of an attempt and of an enqueue request, in µs."""
    _set_up(mode)
    from flowsmith_worker import Flow
    from flowsmith_worker.executor import Executor
    from flowsmith_worker.records import ClaimedNode, Lease, Written
    from flowsmith_worker.storage import InMemoryStorage

    storage = InMemoryStorage()
    flow = Flow("bench_tracing", storage=storage).step("noop", lambda ctx: None)
    executor = Executor(storage, "bench-worker", complete=lambda _done: Written(True))
    request = flow.new_run({"n": 1}, "t")
    node = ClaimedNode(
        Lease(1, 1, "bench-worker", 1), flow.name, "t", "noop", 1, {"n": 1}, request.trace_parent
    )
    drained = _drain_cpu_per_step(runs, workdir)
    loaded = any(name.startswith("opentelemetry") for name in sys.modules)
    assert loaded == (mode != "off"), f"mode {mode}: OpenTelemetry loaded={loaded}"
    # The attempt without Executor.run's tracing wrapper: what the wrapper costs a
    # process that does not trace is the difference in mode "off".
    attempt, unwrapped = _per_call(
        lambda: executor.run(node), lambda: executor._run(node), count=attempts, rounds=rounds
    )
    [enqueue] = _per_call(lambda: flow.new_run({"n": 1}, None), count=attempts, rounds=rounds)
    return {
        "attempt_us": attempt,
        "unwrapped_us": unwrapped,
        "enqueue_us": enqueue,
        "drain_cpu_us": drained,
    }


def _drain_cpu_per_step(runs: int, workdir: str) -> float:
    """CPU µs of this process per step while one worker drains ``runs`` 10-step no-op
    runs from a SQLite file: the whole attempt, its claim and its write included."""
    from flowsmith_worker import Flow, Worker
    from flowsmith_worker.storage import create_storage

    storage = create_storage(f"sqlite:///{workdir}/drain.db")
    storage.migrate()
    flow = Flow("bench_tracing_drain", storage=storage)
    for index in range(10):
        flow.step(f"s{index}", lambda ctx: None)
    flow.run_many([{} for _ in range(runs)])
    worker = Worker(storage=storage, concurrency=4, poll_interval=0.01)
    started = time.process_time()
    worker.run_until_idle(timeout=600)
    cpu = time.process_time() - started
    storage.close()
    return cpu / (runs * 10) * 1e6


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--attempts", type=int, default=2000, help="calls per round")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--runs", type=int, default=300, help="10-step runs drained per mode")
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)  # one child's mode
    args = parser.parse_args(argv)
    if args.mode:
        with tempfile.TemporaryDirectory() as workdir:
            print(json.dumps(measure(args.mode, args.attempts, args.rounds, args.runs, workdir)))
        return
    results = {}
    for mode in MODES:
        child = subprocess.run(
            [
                *(sys.executable, "-m", "tests.bench.tracing_cost", "--mode", mode),
                *("--attempts", str(args.attempts), "--rounds", str(args.rounds)),
                *("--runs", str(args.runs)),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        results[mode] = json.loads(child.stdout)
    off = results["off"]
    wrapper = off["attempt_us"] - off["unwrapped_us"]
    print(f"the wrapper, not tracing: {wrapper:.2f} µs of an attempt's {off['attempt_us']:.2f} µs")
    columns = {
        "attempt_us": "attempt µs",
        "enqueue_us": "enqueue µs",
        "drain_cpu_us": "drain CPU µs",
    }
    print(f"{'mode':<5}" + "".join(f" {title:>13} {'x off':>6}" for title in columns.values()))
    for mode, got in results.items():
        print(
            f"{mode:<5}"
            + "".join(f" {got[key]:>13.2f} {got[key] / off[key]:>6.2f}" for key in columns)
        )


if __name__ == "__main__":
    main()

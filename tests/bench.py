"""Throughput benchmark: `make bench` (or `python -m tests.bench --help`).

Enqueues FLOWS runs of a three-step flow whose steps do nothing, starts WORKERS
real `flowsmith worker` processes, and reports enqueue rate and steps per
second on each backend. Servers run with their durable defaults (fsync on):
this measures what production would see, not what the test settings allow.
Quote results as ratios between rows of one run: the machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from flowsmith_worker import Context, Flow
from flowsmith_worker.config import redact_url
from flowsmith_worker.log import setup_logging
from flowsmith_worker.storage import create_storage
from flowsmith_worker.storage.base import Storage

REPO = Path(__file__).resolve().parents[1]
STEPS_PER_FLOW = 3


def _noop(ctx: Context) -> int:
    return ctx.attempt


bench_flow = Flow("bench_three_steps")
for _name in ("first", "second", "third"):
    bench_flow.step(_name, _noop)


def enqueue(storage: Storage, count: int) -> float:
    """Enqueue ``count`` runs, one transaction each as a web request would; return seconds."""
    bench_flow.storage = storage
    started = time.perf_counter()
    for i in range(count):
        bench_flow.run({"i": i}, tracking_id=f"bench-{uuid.uuid4().hex}")
    return time.perf_counter() - started


def drain(url: str, storage: Storage, flows: int, workers: int, concurrency: int) -> float:
    """Start the workers, wait until every run completed; return seconds."""
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "flowsmith_worker",
                "worker",
                "tests.bench",
                "--url",
                url,
                "--concurrency",
                str(concurrency),
                "--poll-interval",
                "0.05",
                "--log-format",
                "json",
            ],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        for _ in range(workers)
    ]
    started = time.perf_counter()
    try:
        while storage.stats().flows_by_status.get("COMPLETED", 0) < flows:
            if any(p.poll() is not None for p in procs):
                raise SystemExit("a worker exited early: run it by hand to see why")
            time.sleep(0.2)  # stats() scans: poll gently, it shares the cores with the workers
        return time.perf_counter() - started
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(30)


def bench(url: str, flows: int, workers: int, concurrency: int) -> tuple[float, float]:
    storage = create_storage(url)
    storage.migrate()
    enqueue_seconds = enqueue(storage, flows)
    drain_seconds = drain(url, storage, flows, workers, concurrency)
    storage.close()
    return flows / enqueue_seconds, flows * STEPS_PER_FLOW / drain_seconds


def urls(backends: list[str], base: Path, servers: list[Any]) -> dict[str, str]:
    """A database per backend; the servers started are appended to ``servers``."""
    from tests.servers import ServerUnavailable, start_mariadb, start_postgres

    found = {}
    for backend in backends:
        if backend == "sqlite":
            found[backend] = f"sqlite:///{base / 'bench.db'}"
            continue
        start = start_postgres if backend == "postgresql" else start_mariadb
        try:
            server = start(base, fast=False)
        except ServerUnavailable as exc:
            print(f"skipping {backend}: {exc}")
            continue
        servers.append(server)
        found[backend] = server.create_database("bench")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--flows", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--backends", default="sqlite,postgresql,mysql")
    args = parser.parse_args()
    setup_logging(level="WARNING")
    servers: list[Any] = []
    with tempfile.TemporaryDirectory(prefix="flowsmith-bench-") as tmp:
        try:
            run_all(args, urls(args.backends.split(","), Path(tmp), servers))
        finally:
            for server in servers:
                server.destroy()  # stop it and remove its data, wherever it lives


def run_all(args: argparse.Namespace, targets: dict[str, str]) -> None:
    print(
        f"{args.flows} flows x {STEPS_PER_FLOW} no-op steps, {args.workers} workers "
        f"x concurrency {args.concurrency}, durable database settings"
    )
    print(f"{'backend':<12}{'enqueue flows/s':>18}{'steps/s':>12}")
    for backend, url in targets.items():
        enqueue_rate, step_rate = bench(url, args.flows, args.workers, args.concurrency)
        print(f"{backend:<12}{enqueue_rate:>18.0f}{step_rate:>12.0f}   {redact_url(url)}")


if __name__ == "__main__":
    main()

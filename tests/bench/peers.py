"""Peer benchmark: `make bench-peers`, or `PEERS_PYTHON=... python -m tests.bench.peers`.

The same no-op work through PgQueuer, Procrastinate, DBOS and FlowSmith, on
ONE PostgreSQL server started with durable settings (fsync on), a fresh
database each, in one run:

* 1-step: JOBS no-op jobs (PgQueuer, Procrastinate), 1-step DBOS workflows,
  1-step FlowSmith flows;
* 10-step: JOBS/10 workflows of 10 no-op steps (DBOS) and FlowSmith flows.
  The job queues have no workflows: n/a (a chain of jobs each deferring the
  next would be a different program, not the same work).

WORKERS processes of each, CONCURRENCY at a time each (PgQueuer:
max_concurrent_tasks with batch_size CONCURRENCY/2, its minimum ratio;
Procrastinate: --concurrency; DBOS: a queue with worker_concurrency). Every
backlog is enqueued first; the rate is steps from the workers' spawn to the
last completion, the same clock points for every system (process start-up
included: more --jobs dilutes it). FlowSmith's rate is printed as a ratio of
each peer's.

The peers run in their own venv (PEERS_PYTHON; `make bench-peers` makes
.peers-venv from the package index), never as dependencies of this package.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from tests.bench import peer_apps
from tests.bench.workload import (
    NOOP_FLOWS,
    REPO,
    WorkerPool,
    enqueue_quickly,
    monitor_engine,
    wait_completed,
)

PEERS = ("pgqueuer", "procrastinate", "dbos")
VENV_HINT = (
    "set PEERS_PYTHON to a Python that has pgqueuer, procrastinate and dbos, e.g.\n"
    "  python3 -m venv .peers-venv\n"
    "  .peers-venv/bin/pip install pgqueuer procrastinate dbos 'psycopg[binary]'\n"
    "  export PEERS_PYTHON=.peers-venv/bin/python"
)
DURABILITY = {
    "pgqueuer": "frees a slot before its completion commits (completions are buffered and "
    "written every ~0.1 s, not fenced): a crash re-runs finished jobs",
    "procrastinate": "one finish_job call per job, committed before the slot takes the next",
    "dbos": "each step's output committed before the next step; the whole workflow runs in "
    "the process that dequeued it (no claim per step)",
    "flowsmith": "a slot is held until its step's outcome committed, fenced by "
    "(node, worker, attempt)",
}
POLL_SECONDS = 0.2
DRAIN_TIMEOUT = 900.0


@dataclass(frozen=True)
class Measured:
    system: str
    version: str
    steps_per_item: int
    items: int
    enqueue_seconds: float | None
    drain_seconds: float

    @property
    def steps_per_second(self) -> float:
        return self.items * self.steps_per_item / self.drain_seconds


# --------------------------------------------------------------- running the peers


@dataclass(frozen=True)
class Peer:
    """How to enqueue a backlog for a peer, start its workers, and see them finish."""

    name: str
    enqueue: Callable[[int, int], str]  # (items, steps) -> Python code for PEERS_PYTHON
    worker: Callable[[str, int], list[str]]  # (peers python, concurrency) -> command
    progress: str  # SQL: (finished, failed)
    steps: tuple[int, ...]
    install: list[str] | None = None  # arguments to PEERS_PYTHON, run before enqueueing


PEER_SPECS = {
    "pgqueuer": Peer(
        "pgqueuer",
        lambda items, _steps: (
            f"from tests.bench.peer_apps import pgqueuer_enqueue as e; e({items})"
        ),
        lambda python, concurrency: [
            python,
            "-c",
            f"from tests.bench.peer_apps import pgqueuer_worker; pgqueuer_worker({concurrency})",
        ],
        # Done jobs are deleted from the queue table and logged in pgqueuer_log.
        "SELECT (SELECT count(*) FROM pgqueuer_log WHERE status = 'successful'),"
        " (SELECT count(*) FROM pgqueuer_log WHERE status = 'exception')",
        (1,),
        install=["-m", "pgqueuer", "install"],
    ),
    "procrastinate": Peer(
        "procrastinate",
        lambda items, _steps: (
            f"from tests.bench.peer_apps import procrastinate_enqueue as e; e({items})"
        ),
        lambda python, concurrency: [
            python,
            "-m",
            "procrastinate",
            "--app=tests.bench.peer_apps.procrastinate_app",
            "worker",
            "--concurrency",
            str(concurrency),
        ],
        "SELECT count(*) FILTER (WHERE status = 'succeeded'),"
        " count(*) FILTER (WHERE status IN ('failed', 'aborted')) FROM procrastinate_jobs",
        (1,),
    ),
    "dbos": Peer(
        "dbos",
        lambda items, steps: (
            f"from tests.bench.peer_apps import dbos_enqueue as e; e({items}, {steps})"
        ),
        lambda python, _concurrency: [
            python,
            "-c",
            "from tests.bench.peer_apps import dbos_worker; dbos_worker()",
        ],
        "SELECT count(*) FILTER (WHERE status = 'SUCCESS'),"
        " count(*) FILTER (WHERE status IN ('ERROR', 'CANCELLED')) FROM dbos.workflow_status",
        (1, 10),
    ),
}


def _libpq_dsn(url: str) -> str:
    return sa.make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def _peer_env(url: str, concurrency: int) -> dict[str, str]:
    dsn = _libpq_dsn(url)
    return {
        **os.environ,
        "PYTHONPATH": str(REPO),
        peer_apps.DSN_ENV: dsn,
        peer_apps.CONCURRENCY_ENV: str(concurrency),
        "PGQUEUER_DSN": dsn,
    }


def _run_peer_python(python: str, args: list[str], env: dict[str, str]) -> str:
    result = subprocess.run(
        [python, *args], cwd=REPO, env=env, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{result.stdout}{result.stderr[-3000:]}")
    return result.stdout


def bench_peer(
    peer: Peer, python: str, url: str, steps: int, items: int, workers: int, concurrency: int
) -> tuple[float, float]:
    """(enqueue seconds, drain seconds) of ``items`` jobs/workflows of ``steps`` steps."""
    env = _peer_env(url, concurrency)
    if peer.install:
        _run_peer_python(python, peer.install, env)
    enqueued = _run_peer_python(python, ["-c", peer.enqueue(items, steps)], env)
    enqueue_seconds = float(enqueued.split()[-1])
    quiesce(url)
    with contextlib.ExitStack() as stack:
        logs = [stack.enter_context(tempfile.TemporaryFile()) for _ in range(workers)]
        started = time.perf_counter()
        procs = [
            subprocess.Popen(
                peer.worker(python, concurrency), cwd=REPO, env=env, stdout=log, stderr=log
            )
            for log in logs
        ]
        stack.callback(_stop, procs)
        engine = monitor_engine(url)
        stack.callback(engine.dispose)
        _wait_finished(engine, peer, items, procs, logs)
        return enqueue_seconds, time.perf_counter() - started


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _wait_finished(
    engine: sa.Engine, peer: Peer, items: int, procs: list[subprocess.Popen[bytes]], logs: list[Any]
) -> None:
    deadline = time.monotonic() + DRAIN_TIMEOUT
    with engine.connect() as conn:
        while True:
            try:
                finished, failed = conn.execute(sa.text(peer.progress)).one()
            except sa.exc.ProgrammingError:  # the peer creates its tables as it starts
                finished, failed = 0, 0
            if failed:
                raise SystemExit(f"{failed} {peer.name} jobs failed")
            if finished >= items:
                return
            for proc, log in zip(procs, logs, strict=True):
                if proc.poll() is not None:
                    log.seek(0)
                    tail = log.read().decode(errors="replace")[-3000:]
                    raise SystemExit(f"a {peer.name} worker exited early:\n{tail}")
            if time.monotonic() > deadline:
                raise SystemExit(f"{peer.name}: {finished} of {items} done after {DRAIN_TIMEOUT} s")
            time.sleep(POLL_SECONDS)


def bench_flowsmith(url: str, steps: int, items: int, workers: int, concurrency: int) -> float:
    """Drain seconds of ``items`` FlowSmith flows, same clock points as the peers."""
    from flowsmith_worker.storage import create_storage

    storage = create_storage(url)
    storage.migrate()
    try:
        enqueue_quickly(storage, NOOP_FLOWS[steps], items)
    finally:
        storage.close()
    quiesce(url)
    engine = monitor_engine(url)
    with tempfile.TemporaryDirectory(prefix="flowsmith-peers-logs-") as logs:
        pool = WorkerPool(url, workers, Path(logs), concurrency=concurrency)
        started = time.perf_counter()
        try:
            pool.start()
            wait_completed(engine, pool, items)
            return time.perf_counter() - started
        finally:
            pool.stop()
            engine.dispose()


def quiesce(url: str) -> None:
    """Wait until no other client is busy, then CHECKPOINT, so no system pays for
    another's writes (or for its own enqueue)."""
    engine = monitor_engine(url)
    busy = sa.text(
        "SELECT count(*) FROM pg_stat_activity WHERE state = 'active'"
        " AND backend_type = 'client backend' AND pid <> pg_backend_pid()"
    )
    with engine.connect() as conn:
        quiet_since, deadline = time.monotonic(), time.monotonic() + 120
        while time.monotonic() - quiet_since < 1.0 and time.monotonic() < deadline:
            if conn.execute(busy).scalar_one():
                quiet_since = time.monotonic()
            time.sleep(0.1)
        conn.execute(sa.text("CHECKPOINT"))
    engine.dispose()


# --------------------------------------------------------------- versions and report


def peer_versions(python: str, peers: list[str]) -> dict[str, str]:
    probe = (
        "import importlib.metadata as m, sys; "
        f"print(' '.join(m.version(name) for name in {peers!r}))"
    )
    try:
        out = subprocess.run([python, "-c", probe], check=True, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        raise SystemExit(f"PEERS_PYTHON={python} lacks a peer ({exc})\n{VENV_HINT}") from None
    return dict(zip(peers, out.stdout.split(), strict=True))


def table(results: list[Measured]) -> str:
    ours = {m.steps_per_item: m.steps_per_second for m in results if m.system == "flowsmith"}
    lines = [f"{'system':<24}{'work':<22}{'items':>7}{'steps/s':>10}{'FlowSmith / it':>16}"]
    for steps in sorted({m.steps_per_item for m in results}):
        work = "1-step jobs/flows" if steps == 1 else f"{steps}-step workflows"
        for m in (m for m in results if m.steps_per_item == steps):
            ratio = "" if m.system == "flowsmith" else f"{ours[steps] / m.steps_per_second:.2f}"
            lines.append(
                f"{m.system + ' ' + m.version:<24}{work:<22}{m.items:>7}"
                f"{m.steps_per_second:>10,.0f}{ratio:>16}"
            )
        if steps > 1:
            lines.append(f"{'pgqueuer, procrastinate':<24}{work:<22}{'n/a: no workflows':>33}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.peers",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--jobs", type=int, default=10000, help="1-step items; 10-step: a tenth as many"
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--peers", default=",".join(PEERS))
    parser.add_argument("--json", type=Path, default=Path("bench-peers.json"))
    args = parser.parse_args()
    python = os.environ.get("PEERS_PYTHON")
    if not python:
        raise SystemExit(VENV_HINT)
    peers = args.peers.split(",")
    versions = peer_versions(python, peers)

    from flowsmith_worker.log import setup_logging
    from flowsmith_worker.version import __version__
    from tests.servers import start_postgres

    setup_logging(level="WARNING")
    versions["flowsmith"] = __version__
    results: list[Measured] = []
    with tempfile.TemporaryDirectory(prefix="flowsmith-peers-") as tmp:
        server = start_postgres(Path(tmp), fast=False, spares=False)
        try:
            for steps in (1, 10):
                items = max(1, args.jobs // steps)
                for name in [*peers, "flowsmith"]:
                    if name != "flowsmith" and steps not in PEER_SPECS[name].steps:
                        continue
                    _progress(f"{name}: {items} x {steps}-step")
                    url = server.create_database(f"peers_{name}_{steps}")
                    if name == "flowsmith":
                        enqueue, drain = (
                            None,
                            bench_flowsmith(url, steps, items, args.workers, args.concurrency),
                        )
                    else:
                        enqueue, drain = bench_peer(
                            PEER_SPECS[name],
                            python,
                            url,
                            steps,
                            items,
                            args.workers,
                            args.concurrency,
                        )
                    results.append(Measured(name, versions[name], steps, items, enqueue, drain))
                    server.drop_database(f"peers_{name}_{steps}")
            with server.admin_engine().connect() as conn:
                postgres = conn.exec_driver_sql("SHOW server_version").scalar_one()
        finally:
            server.destroy()
    print(
        f"{args.workers} worker processes x concurrency {args.concurrency} each, one durable "
        f"PostgreSQL {postgres} (fsync on), Python {sys.version.split()[0]}; rate = steps from "
        "worker spawn to the last completion"
    )
    print(table(results))
    print("Durability (what a completed step means):")
    for name in [*peers, "flowsmith"]:
        print(f"  {name}: {DURABILITY[name]}")
    document = {
        "meta": {"postgresql": postgres, "workers": args.workers, "concurrency": args.concurrency},
        "results": [{**asdict(m), "steps_per_second": m.steps_per_second} for m in results],
        "durability": {name: DURABILITY[name] for name in [*peers, "flowsmith"]},
    }
    args.json.write_text(json.dumps(document, indent=2) + "\n")
    print(f"JSON: {args.json.resolve()}")


def _progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()

"""Peer benchmark: Procrastinate vs flowsmith-worker on one durable PostgreSQL.

    python3 -m venv /tmp/peers-venv
    /tmp/peers-venv/bin/pip install procrastinate 'psycopg[binary]'
    PEERS_PYTHON=/tmp/peers-venv/bin/python python -m tests.bench_peers --jobs 3000

Same shape of work for both, on fresh databases of one server started like
tests/bench.py's (fsync on): JOBS no-op Procrastinate jobs deferred one
transaction each, then WORKERS `procrastinate worker` processes with
CONCURRENCY drain them (rate from first worker start until the job table says
all succeeded); then tests.bench with JOBS/3 flows of 3 steps, so the step
count matches. Procrastinate needs psycopg 3, so it runs in its own venv.

PEERS_PYTHON imports this module too (`--app=tests.bench_peers.app`, and to
defer; never as __main__, which Procrastinate warns about), so its top-level
imports stay in the standard library.
"""

from __future__ import annotations

import argparse
import functools
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DSN_ENV = "BENCH_PEERS_DSN"
VENV_HINT = (
    "set PEERS_PYTHON to a Python that has procrastinate, e.g.\n"
    "  python3 -m venv /tmp/peers-venv\n"
    "  /tmp/peers-venv/bin/pip install procrastinate 'psycopg[binary]'\n"
    "  export PEERS_PYTHON=/tmp/peers-venv/bin/python"
)


# --------------------------------------------------------------- inside PEERS_PYTHON


@functools.cache
def _procrastinate_app() -> Any:
    import procrastinate  # type: ignore[import-not-found,unused-ignore]

    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=os.environ[DSN_ENV]))

    @app.task(name="noop")  # type: ignore[untyped-decorator,unused-ignore]
    def noop(i: int) -> int:
        return i

    return app


def __getattr__(name: str) -> Any:
    """`procrastinate --app=tests.bench_peers.app` builds the app only when asked."""
    if name == "app":
        return _procrastinate_app()
    raise AttributeError(name)


def _peer_defer(count: int) -> None:
    """Apply the schema, defer ``count`` jobs one transaction each; print the seconds."""
    app = _procrastinate_app()
    with app.open():
        app.schema_manager.apply_schema()
        noop = app.tasks["noop"]
        started = time.perf_counter()
        for i in range(count):
            noop.defer(i=i)
        print(time.perf_counter() - started)


# --------------------------------------------------------------- inside our venv


def _quiesce(url: str) -> None:
    """Wait until no other client is busy (servers.py makes spare databases in the
    background), then CHECKPOINT, so neither system pays for the other's writes."""
    import sqlalchemy as sa

    engine = sa.create_engine(url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
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


def bench_procrastinate(
    peers: str, url: str, jobs: int, workers: int, concurrency: int
) -> tuple[float, float]:
    """(defer jobs/s, drain jobs/s), with the same clock points as tests.bench."""
    import sqlalchemy as sa

    dsn = sa.make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    env = {**os.environ, "PYTHONPATH": str(REPO), DSN_ENV: dsn}
    defer = [peers, "-c", f"from tests.bench_peers import _peer_defer; _peer_defer({jobs})"]
    out = subprocess.run(defer, cwd=REPO, env=env, check=True, stdout=subprocess.PIPE, text=True)
    defer_seconds = float(out.stdout.split()[-1])

    worker = [peers, "-m", "procrastinate", "--app=tests.bench_peers.app", "worker"]
    procs = [
        subprocess.Popen(
            [*worker, "--concurrency", str(concurrency)],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,  # INFO per job, as tests.bench drops its workers' logs
        )
        for _ in range(workers)
    ]
    started = time.perf_counter()
    engine = sa.create_engine(url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    counts = sa.text(
        "SELECT count(*) FILTER (WHERE status = 'succeeded'),"
        " count(*) FILTER (WHERE status IN ('failed', 'aborted')) FROM procrastinate_jobs"
    )
    try:
        with engine.connect() as conn:
            while True:
                succeeded, failed = conn.execute(counts).one()
                if failed:
                    raise SystemExit(f"{failed} procrastinate jobs failed")
                if succeeded >= jobs:
                    return jobs / defer_seconds, jobs / (time.perf_counter() - started)
                if any(p.poll() is not None for p in procs):
                    raise SystemExit(
                        "a procrastinate worker exited early: run it by hand to see why"
                    )
                time.sleep(0.2)  # as tests.bench polls
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(30)
        engine.dispose()


def _peer_versions(peers: str) -> str:
    probe = "import procrastinate as p, psycopg; print(p.__version__, psycopg.__version__)"
    try:
        out = subprocess.run([peers, "-c", probe], check=True, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        raise SystemExit(
            f"PEERS_PYTHON={peers} cannot import procrastinate ({exc})\n{VENV_HINT}"
        ) from None
    return out.stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=3000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    peers = os.environ.get("PEERS_PYTHON")
    if not peers:
        raise SystemExit(VENV_HINT)
    procrastinate_version, psycopg_version = _peer_versions(peers).split()

    from flowsmith_worker.log import setup_logging
    from flowsmith_worker.version import __version__
    from tests.bench import STEPS_PER_FLOW, bench
    from tests.servers import start_postgres

    setup_logging(level="WARNING")
    flows = args.jobs // STEPS_PER_FLOW
    with tempfile.TemporaryDirectory(prefix="flowsmith-peers-") as tmp:
        server = start_postgres(Path(tmp), fast=False)
        try:
            theirs = server.create_database("peers_procrastinate")
            ours = server.create_database("peers_flowsmith")
            _quiesce(theirs)
            peer_rates = bench_procrastinate(
                peers, theirs, args.jobs, args.workers, args.concurrency
            )
            _quiesce(ours)
            our_rates = bench(ours, flows, args.workers, args.concurrency)
            with server.admin_engine().connect() as conn:
                postgres_version = conn.exec_driver_sql("SHOW server_version").scalar_one()
        finally:
            server.destroy()
    print(
        f"{args.jobs} no-op jobs vs {flows} flows x {STEPS_PER_FLOW} no-op steps, "
        f"{args.workers} workers x concurrency {args.concurrency}, durable PostgreSQL "
        f"{postgres_version}; Python {sys.version.split()[0]}, psycopg {psycopg_version} "
        "for procrastinate"
    )
    print(f"{'system':<38}{'enqueue/s':>12}{'steps-or-jobs/s':>18}")
    for name, (enqueue_rate, work_rate) in (
        (f"procrastinate {procrastinate_version} (jobs)", peer_rates),
        (f"flowsmith-worker {__version__} (flows, steps)", our_rates),
    ):
        print(f"{name:<38}{enqueue_rate:>12.0f}{work_rate:>18.0f}")


if __name__ == "__main__":
    main()

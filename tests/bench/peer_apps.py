"""The peers' side of `make bench-peers`: run by PEERS_PYTHON (.peers-venv), never by ours.

The same no-op work for each peer: a task/entrypoint that does nothing, and for
DBOS workflows of 1 and 10 no-op steps. Each peer is imported inside the
functions that need it, and only the standard library at the top: this
module is also imported (for its constants) by tests/bench/peers.py in our venv,
which has none of the peers. The database comes from $BENCH_PEERS_DSN
(a libpq URL); the peers' tables live in that database only.
"""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import threading
import time
from typing import Any

DSN_ENV = "BENCH_PEERS_DSN"
CONCURRENCY_ENV = "BENCH_PEERS_CONCURRENCY"
DBOS_QUEUE = "bench"
DBOS_VERSION = "bench"  # workers only dequeue workflows of their application version
DBOS_WORKFLOWS = {1: "bench_one_step", 10: "bench_ten_steps"}
DBOS_POLL_SECONDS = 0.05  # as FlowSmith's --poll-interval in the benchmark


def _dsn() -> str:
    return os.environ[DSN_ENV]


def _concurrency() -> int:
    return int(os.environ.get(CONCURRENCY_ENV, "8"))


def _timed(work: Any) -> None:
    """Run ``work()`` and print the seconds it took (the parent reads the last line)."""
    started = time.perf_counter()
    work()
    print(time.perf_counter() - started)


# --------------------------------------------------------------- Procrastinate


@functools.cache
def _procrastinate_app() -> Any:
    import procrastinate  # type: ignore[import-not-found,unused-ignore]

    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=_dsn()))

    @app.task(name="noop")  # type: ignore[untyped-decorator,unused-ignore]
    def noop(i: int) -> int:
        return i

    return app


def __getattr__(name: str) -> Any:
    """`procrastinate --app=tests.bench.peer_apps.procrastinate_app` builds it only when asked."""
    if name == "procrastinate_app":
        return _procrastinate_app()
    raise AttributeError(name)


def procrastinate_enqueue(jobs: int) -> None:
    """Apply Procrastinate's schema, then defer ``jobs`` jobs in batches of 1,000."""
    app = _procrastinate_app()
    with app.open():
        app.schema_manager.apply_schema()
        noop = app.tasks["noop"]

        def defer() -> None:
            for first in range(0, jobs, 1000):
                noop.batch_defer(*({"i": i} for i in range(first, min(jobs, first + 1000))))

        _timed(defer)


# --------------------------------------------------------------- PgQueuer


async def create_pgqueuer() -> Any:
    """A PgQueuer with one no-op entrypoint."""
    import asyncpg  # type: ignore[import-not-found,unused-ignore]
    from pgqueuer import PgQueuer  # type: ignore[import-not-found,unused-ignore]
    from pgqueuer.db import AsyncpgDriver  # type: ignore[import-not-found,unused-ignore]

    connection = await asyncpg.connect(_dsn())
    pgq = PgQueuer(AsyncpgDriver(connection))

    @pgq.entrypoint("noop")  # type: ignore[untyped-decorator,unused-ignore]
    async def noop(job: Any) -> None:
        return None

    return pgq


def pgqueuer_worker(concurrency: int) -> None:
    """What `pgqueuer run` does (its CLI fails in 1.6.0: AttributeError in logconfig).

    --max-concurrent-tasks must be at least twice the batch size: batch
    concurrency/2. SIGTERM ends the process (the benchmark is done by then).
    """

    async def run() -> None:
        pgq = await create_pgqueuer()
        await pgq.run(batch_size=max(1, concurrency // 2), max_concurrent_tasks=concurrency)

    asyncio.run(run())


def pgqueuer_enqueue(jobs: int) -> None:
    """Enqueue ``jobs`` no-op jobs, 1,000 per statement (after `pgqueuer install`)."""
    import asyncpg
    from pgqueuer.db import AsyncpgDriver
    from pgqueuer.queries import Queries  # type: ignore[import-not-found,unused-ignore]

    async def enqueue() -> None:
        connection = await asyncpg.connect(_dsn())
        queries = Queries(AsyncpgDriver(connection))
        for first in range(0, jobs, 1000):
            size = min(1000, jobs - first)
            await queries.enqueue(["noop"] * size, [None] * size, [0] * size)
        await connection.close()

    _timed(lambda: asyncio.run(enqueue()))


# --------------------------------------------------------------- DBOS


def _dbos(listen: bool) -> Any:
    """Launch DBOS with the two workflows and the queue (``listen``: dequeue from it).

    Queues are registered after launch (DBOS 3 persists their settings then).
    """
    from dbos import DBOS  # type: ignore[import-not-found,unused-ignore]

    DBOS(
        config={
            "name": "flowsmith_bench",
            "system_database_url": _dsn(),
            "application_version": DBOS_VERSION,
            "log_level": "WARNING",
        }
    )

    @DBOS.step(name="bench_noop")  # type: ignore[untyped-decorator,unused-ignore]
    def noop(i: int) -> int:
        return i

    @DBOS.workflow(name=DBOS_WORKFLOWS[1])  # type: ignore[untyped-decorator,unused-ignore]
    def one_step(i: int) -> int:
        return int(noop(i))

    @DBOS.workflow(name=DBOS_WORKFLOWS[10])  # type: ignore[untyped-decorator,unused-ignore]
    def ten_steps(i: int) -> int:
        for step in range(10):
            noop(i + step)
        return i

    if not listen:
        DBOS.listen_queues([])
    DBOS.launch()
    DBOS.register_queue(
        DBOS_QUEUE, worker_concurrency=_concurrency(), polling_interval_sec=DBOS_POLL_SECONDS
    )
    return DBOS


def dbos_enqueue(workflows: int, steps: int) -> None:
    """Create DBOS's tables (launch, not listening to the queue), enqueue ``workflows``."""
    dbos = _dbos(listen=False)
    from dbos import DBOSClient

    client = DBOSClient(system_database_url=_dsn())
    options = {
        "queue_name": DBOS_QUEUE,
        "workflow_name": DBOS_WORKFLOWS[steps],
        "app_version": DBOS_VERSION,
    }

    def enqueue() -> None:
        for i in range(workflows):
            client.enqueue(options, i)

    try:
        _timed(enqueue)
    finally:
        client.destroy()
        dbos.destroy()


def dbos_worker() -> None:
    """A DBOS process running queued workflows, CONCURRENCY at a time, until SIGTERM."""
    dbos = _dbos(listen=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    dbos.destroy()

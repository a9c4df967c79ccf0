"""For the dashboard's tests: a server on a real port, and runs in every state made by
real flows and a real Worker.

One run of each: COMPLETED (parallel steps and a subflow), FAILED after a retry,
FAILED but repairable (a retry then completes), RUNNING (a step held on an
event), PENDING (delayed an hour), CANCELLED. A step output holds a <script>
that must show as text.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from starlette.types import ASGIApp

from flowsmith_worker import Context, Flow, Worker
from flowsmith_worker.storage import create_storage
from flowsmith_worker.storage.base import FlowStatus, Storage
from tests.conftest import eventually

XSS = '<script>document.title = "owned"</script><img src=x onerror="document.title=1">'
DECLINED = "card declined for order 42"


@dataclass
class Zoo:
    """The tracking_ids of the runs, and the handles that move them on."""

    completed: str
    child: str
    failed: str
    repairable: str
    running: str
    pending: str
    cancelled: str
    flow_names: dict[str, str]
    release: threading.Event = field(default_factory=threading.Event)
    repaired: threading.Event = field(default_factory=threading.Event)
    proceed: threading.Event = field(default_factory=threading.Event)

    def repair(self, then_wait: bool = False) -> None:
        """Make the repairable run's step succeed (after ``proceed`` if ``then_wait``)."""
        if not then_wait:
            self.proceed.set()
        self.repaired.set()

    def tracking_ids(self) -> list[str]:
        return [
            self.completed,
            self.child,
            self.failed,
            self.repairable,
            self.running,
            self.pending,
            self.cancelled,
        ]


def with_script(ctx: Context) -> dict[str, Any]:
    return {"note": XSS}


def ok(ctx: Context) -> dict[str, Any]:
    return {"ok": True}


def declined(ctx: Context) -> None:
    raise ValueError(DECLINED)


def build_zoo(storage: Storage, unique: Callable[[str], str], worker: Worker) -> Zoo:
    """Enqueue the runs and drive them to their states with ``worker``'s loop, in this thread.

    The RUNNING run's step waits for ``zoo.release``; the repairable run's step
    fails until ``zoo.repair()``. The worker must not be running elsewhere.
    """
    names = {kind: unique(kind) for kind in ("order", "child", "refund", "sync", "report")}
    release, repaired, proceed = threading.Event(), threading.Event(), threading.Event()

    def held(ctx: Context) -> dict[str, Any]:
        release.wait(60)
        return {"released": True}

    def repairable(ctx: Context) -> dict[str, Any]:
        if not repaired.is_set():
            raise ConnectionError("inventory service unreachable")
        proceed.wait(60)
        return {"synced": True}

    child = Flow(names["child"], storage=storage).step("charge", ok)
    order = Flow(names["order"], storage=storage).step("reserve", with_script)
    with order.parallel():
        order.step("email", ok)
        order.step("sms", ok)
    order.subflow("pay", child, tracking_id="{tracking_id}:pay")
    refund = Flow(names["refund"], storage=storage).step("lookup", with_script)
    refund.step("refund", declined, retries=1, backoff=0)
    sync = Flow(names["sync"], storage=storage).step("sync", repairable)
    report = Flow(names["report"], storage=storage).step("build", held)

    zoo = Zoo(
        completed=order.run({"order": 1}, tracking_id="order-1").tracking_id,
        child="order-1:pay",
        failed=refund.run({"order": 2}, tracking_id="refund-2").tracking_id,
        repairable=sync.run({"order": 3}, tracking_id="sync-3").tracking_id,
        running=report.run({"day": "monday"}, tracking_id="report-4").tracking_id,
        pending=order.run({"order": 5}, tracking_id="order-5", delay=3600).tracking_id,
        cancelled=order.run({"order": 6}, tracking_id="order-6", delay=3600).tracking_id,
        flow_names=names,
        release=release,
        repaired=repaired,
        proceed=proceed,
    )
    storage.cancel_flow(tracking_id=zoo.cancelled)

    def settled() -> bool:
        worker.run_once()
        return all(
            status_of(storage, tracking_id) == expected
            for tracking_id, expected in [
                (zoo.completed, FlowStatus.COMPLETED),
                (zoo.failed, FlowStatus.FAILED),
                (zoo.repairable, FlowStatus.FAILED),
                (zoo.running, FlowStatus.RUNNING),
            ]
        )

    eventually(settled, timeout=30)
    return zoo


def status_of(storage: Storage, tracking_id: str) -> FlowStatus | None:
    run = storage.get_flow(tracking_id=tracking_id, with_payloads=False)
    return None if run is None else run.status


@contextlib.contextmanager
def serving(app: ASGIApp) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a free loopback port, in a thread; yield its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        eventually(lambda: server.started, timeout=10)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


# Named apart from their fixtures, so a test module imports them without shadowing.
@pytest.fixture(name="db_url")
def db_url_fixture(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'dashboard.db'}"


@pytest.fixture(name="db")
def db_fixture(db_url: str) -> Iterator[Storage]:
    """A migrated SQLite storage."""
    made = create_storage(db_url)
    made.migrate()
    yield made
    made.close()


@pytest.fixture(name="zoo")
def zoo_fixture(db: Storage, unique: Callable[[str], str]) -> Iterator[Zoo]:
    """The runs in every state on ``db``, and a worker running in a thread afterwards."""
    worker = Worker(storage=db, poll_interval=0.05, shutdown_timeout=5)
    made = build_zoo(db, unique, worker)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    yield made
    made.release.set()
    made.proceed.set()
    worker.stop()
    thread.join(10)

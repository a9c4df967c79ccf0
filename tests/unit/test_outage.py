"""The outage state (outage.py) as the worker's parts report it: one loop that keeps
failing is one outage, whatever the other parts meet meanwhile.

On InMemoryStorage with its claim made to fail: what is tested is the worker's
bookkeeping, not a database (the real servers going away are in
tests/integration/test_database_outage.py).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from flowsmith_worker import Worker
from flowsmith_worker.errors import DatabaseUnavailable, TransactionConflict
from flowsmith_worker.outage import LOOP, DatabaseOutage
from flowsmith_worker.records import ClaimedNode, RescuedNode
from flowsmith_worker.rescue import start_watchdog
from flowsmith_worker.storage.memory import InMemoryStorage
from tests.conftest import eventually

Events = list[dict[str, Any]]


class ClaimsFail(InMemoryStorage):
    """Every claim fails as if the database were away (as a claim behind a pooler
    that drops prepared statements does) until ``claims_work`` is set; every other
    call, the heartbeat's included, works."""

    def __init__(self) -> None:
        super().__init__()
        self.claims_work = threading.Event()
        self.claims = 0
        self.heartbeats = 0

    def claim_nodes(self, **kwargs: Any) -> Sequence[ClaimedNode]:
        self.claims += 1
        if not self.claims_work.is_set():
            raise DatabaseUnavailable("database memory:// is unavailable: claim refused")
        return super().claim_nodes(**kwargs)

    def worker_heartbeat(self, **kwargs: Any) -> bool:
        self.heartbeats += 1
        return super().worker_heartbeat(**kwargs)


def said(logs: Events, event: str) -> int:
    return sum(1 for e in logs if e.get("event") == event)


def test_a_failing_loop_keeps_the_worker_unready_though_its_heartbeat_works(
    logs: Events,
) -> None:
    """While every claim fails and every heartbeat works, /readyz stays 503 (sampled
    at each of several heartbeats and failed claims), and the log says
    database.unavailable once and database.reconnected not at all: the heartbeat
    alone does not end an outage the loop still meets. Once claims work, the worker
    is ready again and says database.reconnected once."""
    storage = ClaimsFail()
    worker = Worker(storage, concurrency=1, poll_interval=0.05, lease_seconds=1.0)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        eventually(lambda: storage.claims >= 1, timeout=10)
        answers = []
        beats = storage.heartbeats
        while storage.claims < 4 or storage.heartbeats < beats + 4:
            answers.append(worker.health.readiness()[0])
            threading.Event().wait(0.02)
        assert not any(answers), answers
        assert said(logs, "database.unavailable") == 1
        assert said(logs, "database.reconnected") == 0
        storage.claims_work.set()
        eventually(lambda: worker.health.readiness() == (True, "ok"), timeout=20)
        assert said(logs, "database.unavailable") == said(logs, "database.reconnected") == 1
    finally:
        worker.stop()
        thread.join(30)
        storage.close()


def test_a_transaction_conflict_is_not_an_outage(logs: Events) -> None:
    """A conflict (a deadlock, a serialization failure) is retried, but the database
    answered: it starts no outage, so /readyz and the log do not say it is away."""
    outage = DatabaseOutage()
    outage.failed(TransactionConflict("transaction conflict: retry it"), noticed_by=LOOP)
    assert outage.why is None
    assert said(logs, "database.unavailable") == 0


class RescuesFail(InMemoryStorage):
    """Every rescue fails as if the database were away, until ``rescues_work`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.rescues_work = threading.Event()
        self.rescues = 0

    def rescue_expired(self, *, limit: int = 100) -> list[RescuedNode]:
        self.rescues += 1
        if not self.rescues_work.is_set():
            raise DatabaseUnavailable("database memory:// is unavailable: rescue refused")
        return super().rescue_expired(limit=limit)


def test_the_watchdog_says_an_outage_once_and_its_end(logs: Events) -> None:
    """start_watchdog's thread, its rescue failing turn after turn, logs
    database.unavailable once (not once a turn), and database.reconnected once
    the rescue works again."""
    storage = RescuesFail()
    watchdog = start_watchdog(timeout_seconds=1, interval_seconds=0.05, storage=storage)
    try:
        eventually(lambda: storage.rescues >= 5, timeout=10)
        assert said(logs, "database.unavailable") == 1
        storage.rescues_work.set()
        eventually(lambda: said(logs, "database.reconnected") == 1, timeout=10)
    finally:
        watchdog.stop()
        watchdog.join(10)
        storage.close()

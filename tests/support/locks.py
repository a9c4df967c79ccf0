"""Threads that wait on a database lock, and how many transactions are waiting."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa

from flowsmith_worker.storage.sql import SqlStorage


def lock_waits(storage: SqlStorage, *, advisory: bool = False) -> int:
    """Transactions of this server now waiting for a lock (advisory ones, or row locks)."""
    if storage.dialect.name == "postgresql":
        kind = "= 'advisory'" if advisory else "<> 'advisory'"
        query = (
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            f"AND wait_event_type = 'Lock' AND wait_event {kind}"
        )
    else:
        query = "SELECT count(*) FROM information_schema.innodb_trx WHERE trx_state = 'LOCK WAIT'"
    with storage.engine.connect() as conn:
        return int(conn.execute(sa.text(query)).scalar_one())


class Background:
    """Run a call in a thread; keep its result or exception."""

    def __init__(self, call: Callable[[], Any]) -> None:
        self.outcome: Any = None
        self.thread = threading.Thread(target=self._run, args=(call,), daemon=True)
        self.thread.start()

    def _run(self, call: Callable[[], Any]) -> None:
        try:
            self.outcome = call()
        except Exception as exc:
            self.outcome = exc

    def result(self) -> Any:
        self.thread.join(30)
        assert not self.thread.is_alive(), "the transaction never finished"
        return self.outcome

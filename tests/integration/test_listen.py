"""The LISTEN connection's probe (storage/sql/notify.py) against a real PostgreSQL:
one probe that misses does not turn LISTEN off; several in a row do.

A probe is made to miss by giving it no time to wait (``probe_timeout``), as a
server too busy to deliver the NOTIFY within PROBE_TIMEOUT_SECONDS would.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa

from flowsmith_worker.storage.sql import SqlStorage
from flowsmith_worker.storage.sql.dialects import NOTIFY_CHANNEL
from flowsmith_worker.storage.sql.notify import UNHEARD_LIMIT, listen_for_work
from tests.conftest import eventually

Events = list[dict[str, Any]]


def listening(
    storage: SqlStorage, probe_timeout: Callable[[int], float]
) -> tuple[threading.Thread, threading.Event, list[str]]:
    """listen_for_work in a thread of its own; the queues it was told of."""
    heard: list[str] = []
    stop = threading.Event()
    thread = threading.Thread(
        target=listen_for_work,
        args=(storage.engine, heard.append, stop, probe_timeout),
        daemon=True,
    )
    thread.start()
    return thread, stop, heard


def said(logs: Events, event: str) -> int:
    return sum(1 for e in logs if e.get("event") == event)


def test_one_unheard_probe_does_not_turn_listen_off(pg_storage: SqlStorage, logs: Events) -> None:
    """The first probe misses, the next is heard: the listener LISTENs (no
    listen.unheard warning) and a NOTIFY on FlowSmith's channel reaches it."""
    thread, stop, heard = listening(pg_storage, lambda unheard: 0.0 if unheard == 0 else 5.0)
    try:
        eventually(lambda: said(logs, "listen.started") == 1, timeout=20)
        assert said(logs, "listen.probe_unheard") == 1
        assert said(logs, "listen.unheard") == 0

        def notify() -> bool:
            with pg_storage.engine.begin() as conn:
                conn.execute(sa.select(sa.func.pg_notify(NOTIFY_CHANNEL, "reports")))
            return "reports" in heard

        eventually(notify, timeout=10, interval=0.2)
    finally:
        stop.set()
        thread.join(10)


def test_probes_unheard_several_times_in_a_row_turn_listen_off(
    pg_storage: SqlStorage, logs: Events
) -> None:
    """Every probe misses: after UNHEARD_LIMIT of them the listener warns
    listen.unheard once and ends (polling only), never having LISTENed."""
    thread, stop, _heard = listening(pg_storage, lambda _unheard: 0.0)
    thread.join(30)
    stop.set()
    assert not thread.is_alive()
    assert said(logs, "listen.probe_unheard") == UNHEARD_LIMIT - 1
    assert said(logs, "listen.unheard") == 1
    assert said(logs, "listen.started") == 0

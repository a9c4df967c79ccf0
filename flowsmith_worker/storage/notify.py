"""LISTEN/NOTIFY on PostgreSQL: wake idle workers the moment work is enqueued.

Polling stays on as the fallback: a notification only shortens a sleep. The
listener holds one dedicated autocommit connection outside the pool; when it
drops, the listener reconnects with backoff and re-listens, and wakes the
worker once in case something was enqueued meanwhile.
"""

from __future__ import annotations

import select
import threading
from collections.abc import Callable
from typing import Any

import tenacity
from sqlalchemy.engine import Engine

from flowsmith_worker.log import get_logger
from flowsmith_worker.retry import retry_delay
from flowsmith_worker.storage.dialects import NOTIFY_CHANNEL

log = get_logger(__name__)
_RECONNECT_BACKOFF = tenacity.wait_exponential_jitter(multiplier=0.2, max=10.0)
# How often the listener looks at its stop event while nothing arrives.
_SELECT_TIMEOUT_SECONDS = 1.0
# Detect a server that vanished without closing the socket.
_KEEPALIVES = {
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
}


def listen_for_work(
    engine: Engine, on_notify: Callable[[str], None], stop: threading.Event
) -> None:
    """Call ``on_notify(queue)`` for each NOTIFY until ``stop`` is set."""
    failures = 0
    while not stop.is_set():
        conn = None
        try:
            conn = _connect(engine)
            log.info("listen.started", channel=NOTIFY_CHANNEL, reconnect=failures > 0)
            if failures:
                on_notify("")  # anything enqueued while we were away
            failures = 0
            _pump(conn, on_notify, stop)
        except Exception as exc:
            failures += 1
            # Said once; the reconnects that fail while the database is away, at DEBUG.
            (log.warning if failures == 1 else log.debug)(
                "listen.lost", error=f"{type(exc).__name__}: {exc}".strip(), failures=failures
            )
            stop.wait(retry_delay(_RECONNECT_BACKOFF, failures))
        finally:
            if conn is not None:
                _close_quietly(conn)


def _connect(engine: Engine) -> Any:
    cargs, cparams = engine.dialect.create_connect_args(engine.url)
    conn = engine.dialect.loaded_dbapi.connect(*cargs, **{**_KEEPALIVES, **cparams})
    conn.autocommit = True
    with conn.cursor() as cursor:
        cursor.execute(f"LISTEN {NOTIFY_CHANNEL}")
    return conn


def _pump(conn: Any, on_notify: Callable[[str], None], stop: threading.Event) -> None:
    while not stop.is_set():
        readable, _, _ = select.select([conn], [], [], _SELECT_TIMEOUT_SECONDS)
        if not readable:
            continue
        conn.poll()  # raises when the connection is gone
        queues = {n.payload for n in conn.notifies}
        conn.notifies.clear()
        for queue in queues:
            on_notify(queue)


def _close_quietly(conn: Any) -> None:
    try:
        conn.close()
    except Exception:
        return

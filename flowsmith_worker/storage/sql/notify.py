"""LISTEN/NOTIFY on PostgreSQL: wake idle workers the moment work is enqueued.

Polling stays on as the fallback: a notification only shortens a sleep. The
listener holds one dedicated autocommit connection outside the pool; when it
drops, the listener reconnects with backoff and re-listens, and wakes the
worker once in case something was enqueued meanwhile.

Must never be needed for correctness: a lost notification only delays a claim until
the next poll, and the listener never shares the pool's connections.

Before it listens, each new connection checks that a NOTIFY sent through the
pool reaches it, on a channel of its own: behind a pooler in transaction mode
(PgBouncer) the LISTEN registers whichever server connection ran it, and that
one's notifications go to whichever client uses it next, never to the listener
(and pile up unread in those clients' connections). Unheard, the worker says
what to set and only polls, instead of listening to nothing.
"""

from __future__ import annotations

import select
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
import tenacity
from sqlalchemy.engine import Engine

from flowsmith_worker.log import get_logger
from flowsmith_worker.retry import retry_delay
from flowsmith_worker.storage.sql import pooler
from flowsmith_worker.storage.sql.dialects import NOTIFY_CHANNEL

log = get_logger(__name__)
_RECONNECT_BACKOFF = tenacity.wait_exponential_jitter(multiplier=0.2, max=10.0)
# How often the listener looks at its stop event while nothing arrives.
_SELECT_TIMEOUT_SECONDS = 1.0
# A NOTIFY reaches a direct listener within milliseconds of its commit; this
# leaves room for a loaded server. Waited once per (re)connection, off the hot path.
PROBE_TIMEOUT_SECONDS = 5.0
UNHEARD_HINT = (
    f"a NOTIFY sent through the pool did not reach the LISTEN connection within "
    f"{PROBE_TIMEOUT_SECONDS:g} s: behind a connection pooler in transaction mode "
    f"(PgBouncer), set {pooler.POOLER_ENV}={pooler.TRANSACTION} (or pass --no-listen)"
)
# Probes unheard in a row (with backoff between) before concluding that a pooler
# is in the way: one slow probe (a server busy for a few seconds) must not turn
# LISTEN off for the life of the process.
UNHEARD_LIMIT = 3


class Unheard(Exception):
    """The listener's own test NOTIFY never reached it."""


# Detect a server that vanished without closing the socket.
_KEEPALIVES = {
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
}


def listen_for_work(
    engine: Engine,
    on_notify: Callable[[str], None],
    stop: threading.Event,
    probe_timeout: Callable[[int], float] = lambda _unheard: PROBE_TIMEOUT_SECONDS,
) -> None:
    """Call ``on_notify(queue)`` for each NOTIFY until ``stop`` is set.

    ``probe_timeout(unheard)``: how long a probe waits after ``unheard`` probes in
    a row went unheard (tests make a probe miss with it).
    """
    if pooler.transaction_pooling():
        # A LISTEN would register some server connection of the pooler's, not ours.
        log.info("listen.off", reason=f"{pooler.POOLER_ENV}={pooler.TRANSACTION}")
        return
    failures = unheard = 0
    while not stop.is_set():
        conn = None
        try:
            conn = _connect(engine)
            _listen(conn, engine, probe_timeout(unheard))
            log.info("listen.started", channel=NOTIFY_CHANNEL, reconnect=failures + unheard > 0)
            if failures or unheard:
                on_notify("")  # anything enqueued while we were away
            failures = unheard = 0
            _pump(conn, on_notify, stop)
        except Unheard:
            unheard += 1
            if unheard >= UNHEARD_LIMIT:
                log.warning("listen.unheard", action="polling only", hint=UNHEARD_HINT)
                return
            log.info("listen.probe_unheard", unheard=unheard, action="probing again")
            stop.wait(retry_delay(_RECONNECT_BACKOFF, unheard))
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
    return conn


def _listen(conn: Any, engine: Engine, probe_timeout: float) -> None:
    """LISTEN on ``conn``, once a NOTIFY sent through the pool was seen to reach it."""
    probe = f"{NOTIFY_CHANNEL}_probe_{uuid.uuid4().hex}"
    with conn.cursor() as cursor:
        cursor.execute(f"LISTEN {probe}")
    with engine.begin() as sender:
        sender.execute(sa.select(sa.func.pg_notify(probe, "")))
    if not _heard(conn, probe, probe_timeout):
        raise Unheard(probe)
    with conn.cursor() as cursor:
        cursor.execute(f"UNLISTEN {probe}")
        cursor.execute(f"LISTEN {NOTIFY_CHANNEL}")


def _heard(conn: Any, channel: str, timeout: float) -> bool:
    """Whether a notification on ``channel`` arrives within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        readable, _, _ = select.select([conn], [], [], left)
        if readable:
            conn.poll()  # raises when the connection is gone
            if any(n.channel == channel for n in conn.notifies):
                conn.notifies.clear()
                return True
    return False


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

"""The database connections a `flowsmith worker` process opens, and their bound.

All but one come from the worker's pool (SQLAlchemy's QueuePool, opened on
first use, never more than ``pool_max``):

- one per slot (``--concurrency``): a step's thread writes a retry, starts a
  subflow, or leads a group-commit batch (the others queue without one);
- the loop: claims, rescues, the backlog gauges, cron ticks, shutdown;
- the heartbeat thread (it waits for one like any other user of the pool, so a
  step that takes the whole pool through the worker's storage delays renewals);
- one more kept open: the listener's test NOTIFY when it (re)connects, or a
  step's own thread enqueuing through the worker's storage;
- two more opened only when all those are busy, closed when returned.

Outside the pool, on PostgreSQL, the listener holds one connection for LISTEN
unless ``--no-listen`` or FLOWSMITH_PG_POOLER=transaction. The HTTP endpoints
(/metrics, /livez, /readyz) read the worker's memory, never the database.
Connections a step opens itself (an engine of its own) are not counted here.
"""

from __future__ import annotations

from flowsmith_worker.config import PoolSettings, parse_database_url
from flowsmith_worker.errors import InvalidSetting
from flowsmith_worker.storage.sql import pooler

# The loop, the heartbeat and one spare: kept open beside one per slot.
KEPT_BESIDE_SLOTS = 3
# Opened beyond those only while all are in use.
OVERFLOW = 2


def worker_pool(concurrency: int) -> PoolSettings:
    """The pool of a worker with ``concurrency`` slots."""
    kept = concurrency + KEPT_BESIDE_SLOTS
    return PoolSettings(pool_min=kept, pool_max=kept + OVERFLOW)


def most_per_worker(concurrency: int, listens: bool) -> int:
    """The most connections one worker opens: concurrency + 5, and 1 for LISTEN."""
    return worker_pool(concurrency).pool_max + (1 if listens else 0)


def listens(url: str, listen: bool) -> bool:
    """Whether a worker on ``url`` holds a LISTEN connection (``listen``: no --no-listen)."""
    postgresql = parse_database_url(url).get_backend_name() == "postgresql"
    return listen and postgresql and not pooler.transaction_pooling()


def refuse_above(limit: int, concurrency: int, listens: bool) -> None:
    """InvalidSetting, saying what to change, if a worker could open more than ``limit``."""
    most = most_per_worker(concurrency, listens)
    if most <= limit:
        return
    listener = " and 1 for LISTEN" if listens else ""
    fits = limit - most_per_worker(0, listens)
    lower = f"lower --concurrency to {fits}, " if fits >= 1 else ""
    no_listen = "pass --no-listen, " if listens else ""
    raise InvalidSetting(
        f"--max-connections {limit} is too few: with --concurrency {concurrency} this "
        f"worker may open {most} database connections (its pool: {concurrency} + "
        f"{KEPT_BESIDE_SLOTS + OVERFLOW}, one per slot, the loop, the heartbeat and spares"
        f"{listener}): {lower}{no_listen}or raise --max-connections to {most}"
    )

"""The rescue of expired leases: inside every worker's loop, or in a watchdog thread.

A node whose worker died (or lost the database for longer than its lease)
stays RUNNING until its lease expires; then any rescuer puts it back to
PENDING without using up a retry, or fails it once the step's max_rescues
is used up.

Owns when to rescue (jittered, so workers started together do not rescue in step)
and the log line of each rescue. What a rescue does is Storage.rescue_expired's,
decided by progress.after_lost_lease on the database clock: this module must never
judge a lease by this host's clock, nor let a failed pass end the watchdog thread.
"""

from __future__ import annotations

import random
import threading
import time

from flowsmith_worker.errors import DatabaseUnavailable
from flowsmith_worker.log import get_logger
from flowsmith_worker.outage import DatabaseOutage
from flowsmith_worker.storage import default_storage
from flowsmith_worker.storage.base import RescuedNode, Storage

log = get_logger(__name__)


class Rescuer:
    def __init__(
        self,
        storage: Storage,
        interval: float,
        rescuer_id: str = "watchdog",
        first_delay: float | None = None,
    ) -> None:
        self.storage = storage
        self.interval = interval
        self.log = log.bind(worker_id=rescuer_id)
        # By default a random first delay, so workers started together do not
        # rescue in step; a test that must know when the loop wakes sets it.
        if first_delay is None:
            first_delay = random.uniform(0, interval)
        self._next_run = time.monotonic() + first_delay

    def seconds_until_due(self) -> float:
        return max(0.0, self._next_run - time.monotonic())

    def run_once(self) -> list[RescuedNode]:
        self._next_run = time.monotonic() + self.interval * random.uniform(0.75, 1.25)
        rescued = self.storage.rescue_expired()
        for node in rescued:
            self.log.warning(
                "lease.rescued",
                flow=node.flow_name,
                tracking_id=node.tracking_id,
                step=node.step_name,
                attempt=node.attempt,
                lost_worker_id=node.worker_id,
                failed=node.failed,
            )
        return rescued


class Watchdog(threading.Thread):
    """A daemon thread running the rescue every ``interval_seconds``; stop() ends it."""

    def __init__(self, rescuer: Rescuer) -> None:
        super().__init__(name="flowsmith-watchdog", daemon=True)
        self.rescuer = rescuer
        # Says an outage once, and when it ends, not at every failed turn.
        self.outage = DatabaseOutage()
        self._stopped = threading.Event()

    def run(self) -> None:
        while not self._stopped.is_set():
            try:
                self.rescuer.run_once()
            except DatabaseUnavailable as exc:
                self.outage.failed(exc, noticed_by="watchdog")
            except Exception:
                log.exception("watchdog.failed")
            else:
                self.outage.answered()
            self._stopped.wait(self.rescuer.interval)

    def stop(self) -> None:
        self._stopped.set()


def start_watchdog(
    timeout_seconds: float = 300,
    interval_seconds: float = 60,
    storage: Storage | None = None,
) -> Watchdog:
    """Rescue expired leases from a daemon thread of this process.

    For applications that run no `flowsmith worker` of their own (the seed's
    API). In this design a step is lost when its lease expires, and the lease
    is set by the worker that claimed it (``--lease``); ``timeout_seconds`` is
    kept for compatibility and must be positive.
    """
    if timeout_seconds <= 0 or interval_seconds <= 0:
        raise ValueError("start_watchdog: timeout_seconds and interval_seconds must be positive")
    watchdog = Watchdog(Rescuer(storage or default_storage(), interval_seconds))
    watchdog.start()
    return watchdog

"""Lease renewal on a thread of its own, and what this process knows of its leases.

The heartbeat must not ride on the worker's main loop: that loop backs off for
seconds while the database is away and can stall on a slow claim, and a lease
that lapses while its step still runs lets a second worker run the step too.
So a thread renews the leases every lease/3, with its own pool connection (the
pool is sized for it: see `flowsmith worker`), and retries quickly after a
failed renewal instead of following the loop's backoff.

What it cannot do: run while a step holds the GIL in one long C call. Then
nothing of the process runs, and the lease can expire; ``LeaseTimes`` lets the
worker notice afterwards and keep quiet rather than write an outcome for a node
that may already run elsewhere.

Must never renew a lease this process cannot be sure it still holds
(``LeaseTimes.held``), nor give up after a failed renewal: it tries again every
RETRY_SECONDS, never later than the next lease/3.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable

from flowsmith_worker.errors import DatabaseUnavailable
from flowsmith_worker.log import get_logger
from flowsmith_worker.outage import DatabaseOutage
from flowsmith_worker.storage.base import Lease

log = get_logger(__name__)
# After a failed renewal, try again this often (at most), not at the next lease/3.
RETRY_SECONDS = 0.5


class LeaseTimes:
    """When each lease of this process was last surely renewed, on the monotonic clock.

    "Surely": the time taken *before* the claim or renewal was sent. The database
    set the expiry to its own now + lease, at or after that moment, so until
    that time + lease the lease is ours whatever the clocks of the hosts say.
    """

    def __init__(self, lease_seconds: float) -> None:
        self.lease_seconds = lease_seconds
        self._lock = threading.Lock()
        self._renewed: dict[Lease, float] = {}
        self._lapsed: set[Lease] = set()

    def claimed(self, leases: Iterable[Lease], sent_at: float) -> None:
        with self._lock:
            for lease in leases:
                self._renewed[lease] = sent_at

    def renewed(self, leases: Iterable[Lease], sent_at: float) -> None:
        """Leases that were forgotten (their step ended) or lapsed meanwhile stay so."""
        with self._lock:
            for lease in leases:
                if lease in self._renewed and lease not in self._lapsed:
                    self._renewed[lease] = max(sent_at, self._renewed[lease])

    def forget(self, lease: Lease) -> None:
        with self._lock:
            self._renewed.pop(lease, None)
            self._lapsed.discard(lease)

    def held(self, lease: Lease) -> bool:
        """Whether the lease is surely still ours (unknown leases are not)."""
        with self._lock:
            renewed = self._renewed.get(lease)
        return renewed is not None and time.monotonic() < renewed + self.lease_seconds

    def newly_lapsed(self, leases: Iterable[Lease]) -> list[tuple[Lease, float]]:
        """Leases not renewed for a whole lease, each reported once, with seconds since."""
        now = time.monotonic()
        found = []
        with self._lock:
            for lease in leases:
                renewed = self._renewed.get(lease)
                if lease in self._lapsed or renewed is None:
                    continue
                if now >= renewed + self.lease_seconds:
                    self._lapsed.add(lease)
                    found.append((lease, now - renewed))
        return found


class Heartbeat:
    """Calls ``beat`` every ``interval`` seconds on a daemon thread, until stop()."""

    def __init__(
        self,
        beat: Callable[[], object],
        interval: float,
        worker_id: str,
        outage: DatabaseOutage | None = None,
    ) -> None:
        self.beat = beat
        self.interval = interval
        self.log = log.bind(worker_id=worker_id)
        # Told of the database going away and coming back; it says so once for
        # the whole worker (this thread retries every RETRY_SECONDS meanwhile).
        self.outage = outage or DatabaseOutage(worker_id)
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        with self._lock:
            if self.running:
                return
            self._stopped = threading.Event()  # a thread still stopping keeps its own
            thread = threading.Thread(
                target=self._run, args=(self._stopped,), name="flowsmith-heartbeat", daemon=True
            )
            thread.start()
            self._thread = thread

    def stop(self, wait: float = 1.0) -> None:
        """Stop; wait a little for a renewal in progress (a stuck one is abandoned)."""
        with self._lock:
            self._stopped.set()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(wait)

    def _run(self, stopped: threading.Event) -> None:
        delay = 0.0
        failures = 0
        while not stopped.wait(delay):
            try:
                self.beat()
            except DatabaseUnavailable as exc:
                self.outage.failed(exc, noticed_by="heartbeat")
                delay = min(self.interval, RETRY_SECONDS)
                continue
            except Exception:
                failures += 1
                self.log.exception("heartbeat.failed", failures=failures)
                delay = min(self.interval, RETRY_SECONDS)
                continue
            self.outage.answered()
            if failures:
                self.log.info("heartbeat.recovered", after_failures=failures)
            failures = 0
            delay = self.interval

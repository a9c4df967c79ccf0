"""Whether a worker is alive, and whether it is ready: what /livez and /readyz say.

Alive: its loop turns (or its shutdown makes progress). Restarting a worker whose
loop is stuck helps; restarting one whose database is away does not, so liveness
ignores the database. Ready: alive, claiming (not draining after SIGTERM), and its
loop's last turn worked, and the database answers (see outage.py).
"""

from __future__ import annotations

import threading
import time

from flowsmith_worker.outage import DatabaseOutage

# The answer of a check: (healthy, why, in a line).
Verdict = tuple[bool, str]


class Health:
    """The worker's loop and database calls report here; the HTTP probes read it."""

    def __init__(
        self,
        stale_after: float = 60.0,
        draining: threading.Event | None = None,
        database: DatabaseOutage | None = None,
    ) -> None:
        self.stale_after = stale_after
        # Set from the moment the worker stops claiming (the worker's `stopping`).
        self.draining = draining or threading.Event()
        # Told by every part of the worker that calls the database, not only the loop.
        self.database = database or DatabaseOutage()
        self._lock = threading.Lock()
        self._last_tick: float | None = None
        self._failure: str | None = None

    def loop_ticked(self) -> None:
        """The loop turned, or the shutdown waiting for in-flight steps did."""
        with self._lock:
            self._last_tick = time.monotonic()

    def turn_succeeded(self) -> None:
        with self._lock:
            self._failure = None

    def turn_failed(self, why: str) -> None:
        """The loop's turn failed (a bug; the database away is DatabaseOutage's): not
        ready until one works."""
        with self._lock:
            self._failure = why

    def liveness(self) -> Verdict:
        with self._lock:
            last_tick = self._last_tick
        if last_tick is None:
            return False, "worker loop has not started"
        idle = time.monotonic() - last_tick
        if idle > self.stale_after:
            return False, f"loop stalled: no turn for {idle:.1f} s (limit {self.stale_after:g} s)"
        return True, "ok"

    def readiness(self) -> Verdict:
        alive, why = self.liveness()
        if not alive:
            return alive, why
        if self.draining.is_set():
            return False, "draining: not claiming, letting in-flight steps finish"
        database_away = self.database.why
        if database_away is not None:
            return False, f"database unavailable: {database_away}"
        with self._lock:
            failure = self._failure
        return (False, failure) if failure is not None else (True, "ok")

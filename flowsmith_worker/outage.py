"""Whether the worker's database is away, as the parts of the worker find it.

Every part of a worker meets an outage on its own: the loop's claims, the
heartbeat thread's renewals, each step's outcome write. Each retries on its
own schedule (the loop and the writes with backoff, the heartbeat every half
second), so if each logged its failures the log of a minute's outage would be
hundreds of lines saying one thing. They report here instead, and this says it
once: ``database.unavailable`` when the first part fails, ``database.reconnected``
when one gets an answer again, with how long it lasted. /readyz reads it too
(see health.py): not ready while the database is away.

The loop is the part that claims: while its calls fail, the worker does no new
work, whatever the others meet. So an outage the loop met ends only when the
loop gets an answer; the heartbeat's working renewals alone do not end it (a
claim that keeps failing while renewals work, as behind a pooler that drops
prepared statements, would otherwise log a new outage and flip /readyz on every
turn). A transaction conflict is no outage at all: the database answered.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from flowsmith_worker.errors import TransactionConflict
from flowsmith_worker.log import get_logger

log = get_logger(__name__)

# The ``noticed_by`` of the worker's loop, the one part whose answer ends an outage it met.
LOOP = "loop"


class DatabaseOutage:
    """The outage in progress, if any: since when, why, how many calls failed."""

    def __init__(self, worker_id: str = "", on_back: Callable[[], None] = lambda: None) -> None:
        self.log = log.bind(worker_id=worker_id) if worker_id else log
        # Called once the database answers again: the worker's loop may be in a
        # backoff of seconds, and should claim (and rescue) at once instead.
        self.on_back = on_back
        self._lock = threading.Lock()
        self._since: float | None = None
        self._why = ""
        self._failed_calls = 0
        self._loop_failing = False  # the loop met this outage and has had no answer since
        self._others_failing = False  # so has some other part

    @property
    def why(self) -> str | None:
        """The first error of the outage in progress; None while the database answers."""
        with self._lock:
            return self._why if self._since is not None else None

    def failed(self, error: BaseException, noticed_by: str) -> None:
        """A call to the database failed because it is away (DatabaseUnavailable)."""
        if isinstance(error, TransactionConflict):  # it answered: retried, but no outage
            self.log.debug("database.conflict", error=str(error), noticed_by=noticed_by)
            return
        with self._lock:
            first = self._since is None
            if first:
                self._since, self._why, self._failed_calls = time.monotonic(), str(error), 0
            self._failed_calls += 1
            if noticed_by == LOOP:
                self._loop_failing = True
            else:
                self._others_failing = True
            failed_calls = self._failed_calls
        if first:
            self.log.warning(
                "database.unavailable",
                error=str(error),
                noticed_by=noticed_by,
                action="retrying with backoff; /readyz answers 503 until it is back",
            )
        else:  # already said: the details stay at DEBUG
            self.log.debug(
                "database.still_unavailable",
                error=str(error),
                noticed_by=noticed_by,
                failed_calls=failed_calls,
            )

    def answered(self, by: str = "") -> None:
        """A call to the database by ``by`` worked: an outage in progress is over,
        unless the loop met it and is still to get an answer."""
        if self._since is None:  # the usual case, read without the lock
            return
        with self._lock:
            since, failed_calls = self._since, self._failed_calls
            if by == LOOP:
                self._loop_failing = False
            # Wake the loop when another part that failed gets an answer again
            # (the loop may be in a backoff of seconds), but not at every answer
            # of a part that never failed: that would undo the loop's backoff.
            wake = by != LOOP and self._others_failing
            if by != LOOP:
                self._others_failing = False
            over = since is not None and not self._loop_failing
            if over:
                self._since, self._others_failing = None, False
        if since is not None and over:  # another thread may have ended it meanwhile
            self.log.info(
                "database.reconnected",
                seconds_away=round(time.monotonic() - since, 1),
                failed_calls=failed_calls,
            )
        if over or wake:
            self.on_back()

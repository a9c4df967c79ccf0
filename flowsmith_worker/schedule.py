"""Delayed and periodic runs: ``run_at=``, ``Flow.schedule(cron)`` and the Scheduler.

A scheduled flow is enqueued by the workers themselves, exactly once per tick
however many of them run: every worker's :class:`Scheduler` computes the same
tick and the same tracking_id, ``"<flow name>@<tick as YYYY-MM-DDTHH:MMZ>"``,
and the unique key on fs_flows.tracking_id lets only one run exist. Nothing
home-made coordinates the workers; there is no leader.

Decisions, written down:

* Cron expressions are parsed by croniter, have the five classic fields
  (minute resolution, as the tick in the tracking_id) or an alias such as
  ``@hourly``, and are evaluated in UTC. ``H`` fields (Jenkins-style spread)
  are hashed on the flow's name, so different flows spread out.
* A scheduler enqueues only the most recent tick <= now, and only while that
  tick is younger than the grace period (``DEFAULT_GRACE_SECONDS``): a worker
  that starts after hours of downtime does not run stale ticks, and missed
  ticks are not back-filled one by one.
* A scheduler only ever inserts. Re-enqueueing a tracking_id whose run FAILED
  would resume it, and one whose run COMPLETED raises FlowAlreadyCompleted:
  neither is what "the tick came round" means, so a tick whose run already
  exists, in any state, is left alone.
* Ticks come from the worker's clock (``clock=``), not the database's: a host
  whose clock runs ahead may enqueue a tick a little early, but never twice.
* A run's input is the ``input`` given to ``Flow.schedule`` (an empty dict by
  default); the tick is in ``ctx.tracking_id``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from croniter import croniter

from flowsmith_worker.errors import DatabaseUnavailable, FlowAlreadyCompleted, FlowSmithError
from flowsmith_worker.flow import registry
from flowsmith_worker.log import get_logger
from flowsmith_worker.storage.base import Storage

if TYPE_CHECKING:
    from flowsmith_worker.flow import Flow

# A tick older than this when a scheduler first sees it is skipped, not run late.
DEFAULT_GRACE_SECONDS = 300.0
TICK_FORMAT = "%Y-%m-%dT%H:%MZ"

log = get_logger(__name__)


def tick_tracking_id(flow_name: str, tick: datetime) -> str:
    """The tracking_id of a flow's run for one tick: the same in every worker."""
    return f"{flow_name}@{tick.astimezone(UTC):{TICK_FORMAT}}"


def scheduled_flows() -> list[Flow]:
    """The flows registered in this process that have a schedule."""
    flows = (registry.lookup(name) for name in registry.names())
    return [f for f in flows if f is not None and f.cron]


@dataclass(frozen=True)
class _Ticks:
    cron: str
    current: datetime  # the most recent tick <= the time it was computed
    next: datetime  # the tick after it


class Scheduler:
    """Enqueues the runs of scheduled flows as their ticks come; one per worker.

    ``run_once()`` is cheap when no tick is new (no database access), so a worker
    calls it every turn of its loop; ``seconds_until_due()`` bounds its sleep.
    """

    def __init__(
        self,
        storage: Storage,
        flows: Callable[[], Iterable[Flow]] = scheduled_flows,
        clock: Callable[[], float] = time.time,
        grace_seconds: float = DEFAULT_GRACE_SECONDS,
    ) -> None:
        if grace_seconds < 0:
            raise ValueError(f"grace_seconds={grace_seconds}: cannot be negative")
        self.storage = storage
        self.flows = flows
        self.clock = clock
        self.grace_seconds = grace_seconds
        self._ticks: dict[str, _Ticks] = {}
        # The newest tick this scheduler has dealt with, per flow: enqueued, found
        # already there, skipped as stale, or refused by the flow.
        self._handled: dict[str, datetime] = {}

    def run_once(self) -> list[str]:
        """Enqueue the due tick of every scheduled flow; return the tracking_ids inserted.

        DatabaseUnavailable propagates (the worker backs off) and the tick stays
        due, so the next call tries again while it is within the grace period.
        """
        now = self._now()
        enqueued: list[str] = []
        for flow in self._scheduled():
            tick = self._ticks_of(flow, now).current
            if (handled := self._handled.get(flow.name)) is not None and tick <= handled:
                continue
            tracking_id = tick_tracking_id(flow.name, tick)
            age = (now - tick).total_seconds()
            if age > self.grace_seconds:
                log.info(
                    "schedule.stale_tick_skipped",
                    flow=flow.name,
                    tracking_id=tracking_id,
                    age_seconds=round(age, 1),
                    grace_seconds=self.grace_seconds,
                )
            elif self._insert(flow, tracking_id):
                enqueued.append(tracking_id)
            self._handled[flow.name] = tick
        return enqueued

    def seconds_until_due(self) -> float:
        """Seconds until a tick needs ``run_once()``: 0 if one is due now, inf with no schedule."""
        now = self._now()
        wait = math.inf
        for flow in self._scheduled():
            ticks = self._ticks_of(flow, now)
            handled = self._handled.get(flow.name)
            if handled is None or ticks.current > handled:
                return 0.0
            wait = min(wait, (ticks.next - now).total_seconds())
        return max(0.0, wait)

    # -- parts ------------------------------------------------------------------

    def _insert(self, flow: Flow, tracking_id: str) -> bool:
        """Insert the tick's run only if no run has that tracking_id; True if inserted."""
        try:
            if self.storage.get_flow(tracking_id=tracking_id, with_payloads=False) is not None:
                log.debug("schedule.exists", flow=flow.name, tracking_id=tracking_id)
                return False
            # Race: a run another worker inserted, ran and saw FAIL between the
            # check above and this enqueue would be resumed here. The window is
            # one round trip against a whole run, and an insert-only enqueue
            # (``enqueue_flow(..., resume=False)``) would close it. A run that
            # COMPLETED in that window raises FlowAlreadyCompleted, caught below.
            result = self.storage.enqueue_flow(flow=flow.new_run(flow.cron_input, tracking_id))
        except FlowAlreadyCompleted:
            log.debug("schedule.exists", flow=flow.name, tracking_id=tracking_id)
            return False
        except DatabaseUnavailable:
            raise
        except FlowSmithError as exc:
            # The flow cannot be enqueued (no steps, input not JSON, tracking_id of
            # another flow): say so once per tick, not at every turn of the loop.
            log.error("schedule.failed", flow=flow.name, tracking_id=tracking_id, error=str(exc))
            return False
        if not result.created:
            log.debug("schedule.exists", flow=flow.name, tracking_id=tracking_id)
            return False
        log.info("schedule.enqueued", flow=flow.name, tracking_id=tracking_id)
        return True

    def _scheduled(self) -> list[Flow]:
        return [f for f in self.flows() if f.cron]

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self.clock(), UTC)

    def _ticks_of(self, flow: Flow, now: datetime) -> _Ticks:
        """The flow's latest tick <= now and the one after, cached until the next comes."""
        cron = flow.cron or ""
        cached = self._ticks.get(flow.name)
        if cached is not None and cached.cron == cron and cached.current <= now < cached.next:
            return cached
        # Ticks fall on whole minutes, and croniter's get_prev is strictly before
        # its start: starting at the next whole minute finds the latest tick <= now.
        start = now.replace(second=0, microsecond=0).timestamp() + 60
        itr = croniter(cron, datetime.fromtimestamp(start, UTC), hash_id=flow.name)
        current = itr.get_prev(datetime)
        ticks = _Ticks(cron, current, itr.get_next(datetime))
        self._ticks[flow.name] = ticks
        return ticks

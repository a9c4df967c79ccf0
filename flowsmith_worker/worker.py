"""The worker: claim runnable nodes up to its free slots, run them, keep leases, rescue.

It is assembled from small parts, each with a ``*_once()`` method that tests
call directly: ``claim_once`` (the poller), ``heartbeat_once`` (extends the
leases of in-flight nodes, all in one statement; run every lease/3 by a thread
of its own, see heartbeat.py) and ``rescue_once`` (the watchdog, folded into
every worker). The loop around them is trivial: it sleeps on an event, so a
freed slot, a NOTIFY or a stop signal wakes it at once.

Owns its slots (never more steps in flight than ``concurrency``), the loop, the
chain of a run's steps in one slot, and a graceful stop. Must never free a slot
before its step's outcome has committed, never renew leases from the main loop (it
may stall), never hand back a node whose call still runs in this process (only
``release_unfinished``, right before the process exits), and never die of a failed
turn: it backs off and tries again.
"""

from __future__ import annotations

import functools
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import tenacity

from flowsmith_worker.batcher import CompletionBatcher
from flowsmith_worker.errors import DatabaseUnavailable
from flowsmith_worker.executor import Executed, Executor, Outcome
from flowsmith_worker.flow import plan_versions
from flowsmith_worker.health import Health
from flowsmith_worker.heartbeat import Heartbeat, LeaseTimes
from flowsmith_worker.log import get_logger
from flowsmith_worker.metrics import WorkerMetrics, queues_to_report
from flowsmith_worker.outage import LOOP, DatabaseOutage
from flowsmith_worker.rescue import Rescuer
from flowsmith_worker.retry import retry_delay
from flowsmith_worker.schedule import Scheduler
from flowsmith_worker.storage import default_storage
from flowsmith_worker.storage.base import (
    DEFAULT_QUEUE,
    Chain,
    ClaimedNode,
    Lease,
    Storage,
    WorkerRecord,
)
from flowsmith_worker.version import __version__

DEFAULT_CONCURRENCY = 4
DEFAULT_POLL_INTERVAL = 1.0
DEFAULT_LEASE_SECONDS = 30.0
DEFAULT_SHUTDOWN_TIMEOUT = 30.0
# How long the loop waits between tries while the database is away.
_DB_BACKOFF = tenacity.wait_exponential_jitter(multiplier=0.2, max=10.0)
_IDLE_CHECK_SECONDS = 0.05

T = TypeVar("T")
log = get_logger(__name__)


@dataclass(frozen=True)
class WorkerSettings:
    concurrency: int = DEFAULT_CONCURRENCY
    poll_interval: float = DEFAULT_POLL_INTERVAL
    lease_seconds: float = DEFAULT_LEASE_SECONDS
    queues: tuple[str, ...] = (DEFAULT_QUEUE,)
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT
    listen: bool = True

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError(f"concurrency={self.concurrency}: a worker needs at least 1 slot")
        if self.poll_interval <= 0:
            raise ValueError(f"poll_interval={self.poll_interval}: must be positive seconds")
        if self.lease_seconds < 1:
            raise ValueError(f"lease_seconds={self.lease_seconds}: use at least 1 second")
        if not self.queues:
            raise ValueError("a worker needs at least one queue")
        if self.shutdown_timeout < 0:
            raise ValueError(f"shutdown_timeout={self.shutdown_timeout}: cannot be negative")

    @property
    def heartbeat_interval(self) -> float:
        return self.lease_seconds / 3


@dataclass
class _Slot:
    """One of the worker's slots; ``lease`` follows its chain from step to step."""

    lease: Lease


class Worker:
    """Runs steps of the flows registered in this process."""

    def __init__(
        self,
        storage: Storage | None = None,
        concurrency: int = DEFAULT_CONCURRENCY,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        queues: Sequence[str] = (DEFAULT_QUEUE,),
        shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT,
        listen: bool = True,
    ) -> None:
        self.settings = WorkerSettings(
            concurrency, poll_interval, lease_seconds, tuple(queues), shutdown_timeout, listen
        )
        self.storage = storage or default_storage()
        # New at every start, never a host or pod name: a restarted pod must not
        # take the dead process's leases for its own.
        self.id = uuid.uuid4().hex
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.stopping = threading.Event()  # stop claiming; let in-flight steps finish
        self.hard_stop = threading.Event()  # stop now; release what is in flight
        self.wakeup = threading.Event()
        self.lease_times = LeaseTimes(lease_seconds)
        # Every part below that calls the database tells it when the database is
        # away and when it answers again: the log says so once, /readyz meanwhile.
        self.outage = DatabaseOutage(self.id, on_back=self.wakeup.set)
        # Group commit: every finished step's outcome waits for the next batch.
        self.batcher = CompletionBatcher(self.storage, chain=self._chain)
        self.executor = Executor(
            self.storage,
            self.id,
            stop_retrying=self.hard_stop,
            give_up_after=lease_seconds,
            lease_held=self.lease_times.held,
            complete=self.batcher.write,
            outage=self.outage,
        )
        self.heartbeat = Heartbeat(
            self.heartbeat_once,
            self.settings.heartbeat_interval,
            worker_id=self.id,
            outage=self.outage,
        )
        self.rescuer = Rescuer(
            self.storage, interval=_rescue_interval(self.settings), rescuer_id=self.id
        )
        # Cron ticks of the flows registered here; the tick's tracking_id makes
        # each enqueue happen once however many workers try.
        self.scheduler = Scheduler(self.storage)
        self._pool = ThreadPoolExecutor(concurrency, thread_name_prefix="flowsmith-step")
        self._lock = threading.Lock()
        # Keyed by the lease, not the node: a node rescued from us and claimed by
        # us again is a new attempt, and the old one's end must not free its slot.
        self._in_flight: dict[Lease, ClaimedNode] = {}
        self._registered = False  # in fs_workers: run() registers, run_until_idle() does not
        self.log = log.bind(worker_id=self.id)
        self.metrics = WorkerMetrics(self.id, self.host, __version__)
        # Stale after a few of the loop's longest waits: a poll, or the database backoff.
        # Not ready from the moment it stops claiming.
        self.health = Health(
            stale_after=max(60.0, 3 * poll_interval), draining=self.stopping, database=self.outage
        )

    # -- the parts --------------------------------------------------------------

    @property
    def free_slots(self) -> int:
        with self._lock:
            return self.settings.concurrency - len(self._in_flight)

    def in_flight(self) -> list[ClaimedNode]:
        with self._lock:
            return list(self._in_flight.values())

    def claim_once(self) -> int:
        """Claim up to the free slots and start them; return how many were claimed."""
        free = self.free_slots
        if free <= 0 or self.stopping.is_set():
            return 0
        sent_at = time.monotonic()
        claimed = self.storage.claim_nodes(
            worker_id=self.id,
            limit=free,
            lease_seconds=self.settings.lease_seconds,
            queues=self.settings.queues,
        )
        self.lease_times.claimed([node.lease for node in claimed], sent_at)
        for node in claimed:
            self.log.debug(
                "step.claimed",
                flow=node.flow_name,
                tracking_id=node.tracking_id,
                step=node.step_name,
                attempt=node.attempt,
            )
            slot = _Slot(node.lease)
            with self._lock:
                self._in_flight[node.lease] = node
                self.metrics.set_in_flight(len(self._in_flight))
            future = self._pool.submit(self._run_slot, node, slot)
            future.add_done_callback(functools.partial(self._slot_freed, slot))
        return len(claimed)

    def heartbeat_once(self) -> int:
        """Extend the leases of every in-flight node in one statement; refresh fs_workers.

        The heartbeat thread calls it every lease/3; tests call it directly. A
        lease not renewed for a whole lease (the database or this process was
        stalled) is given up: the node may already run elsewhere, so it is not
        renewed again and its outcome is not written (see Executor.lease_held).
        """
        in_flight = self.in_flight()
        for lease, silent in self.lease_times.newly_lapsed(n.lease for n in in_flight):
            self.log.error(
                "lease.lapsed",
                node_id=lease.node_id,
                attempt=lease.attempt,
                seconds_since_renewal=round(silent, 3),
                action="not renewing it and not writing its outcome; it is rescued",
            )
        leases = [n.lease for n in in_flight if self.lease_times.held(n.lease)]
        sent_at = time.monotonic()
        extended = 0
        if leases:
            extended = self.storage.extend_leases(
                leases=leases, lease_seconds=self.settings.lease_seconds
            )
            self.lease_times.renewed(leases, sent_at)
        alive = self.storage.worker_heartbeat(worker_id=self.id, in_flight=len(in_flight))
        if not alive and self._registered:
            # Paused (SIGSTOP, a frozen VM) past three leases: a rescuer removed
            # our row as dead. We are alive: say so again, or `flowsmith workers`
            # would never list this process.
            self.log.warning("worker.reregistered")
            self.storage.register_worker(worker=self.record())
        return extended

    def rescue_once(self) -> int:
        """Rescue expired leases, drop dead workers' rows, refresh the backlog gauges."""
        rescued = self.rescuer.run_once()
        for node in rescued:
            self.metrics.step_rescued(node.flow_name, node.step_name)
        self.storage.remove_dead_workers()
        self._report_backlog()
        return len(rescued)

    def _report_backlog(self) -> None:
        """The backlog gauges of the queues this worker is the one to report."""
        queues = queues_to_report(self.id, self.settings.queues, self.storage.list_workers())
        backlog = self.storage.runnable_backlog(queues=queues) if queues else {}
        self.metrics.set_backlog(queues, backlog)

    def run_once(self) -> int:
        """One turn of the loop: rescue when due, then claim.

        Leases are renewed by the heartbeat thread, not here: this loop may
        back off or stall, and the leases of running steps must not lapse.
        """
        if self.rescuer.seconds_until_due() == 0:
            self.rescue_once()
        return self.claim_once()

    def _chain(self) -> Chain | None:
        """Chain a run's next step to this worker, unless it is stopping (it takes no new steps)."""
        if self.stopping.is_set():
            return None
        return Chain(self.id, self.settings.lease_seconds)

    def _run_slot(self, node: ClaimedNode, slot: _Slot) -> Outcome:
        """Run the node, then each next step its completion leased to this worker (a chain).

        The slot stays taken until the chain ends: a run's steps go one after
        the other in this thread, with no claim between them. A chained step
        not yet started when the worker begins to stop is handed back at once,
        and so is one whose lease may be over already (below).
        """
        while True:
            executed = self._execute(node)
            if executed.chained is None:
                return executed.outcome
            node = self._move_slot(slot, node, executed)
            if self.stopping.is_set() or self._lapsed_on_arrival(node, executed.sent_at):
                self._hand_back(node)
                return executed.outcome

    def _execute(self, node: ClaimedNode) -> Executed:
        self.metrics.step_started(node.flow_name, node.step_name)
        started = time.monotonic()
        executed = self.executor.run(node)
        self.metrics.step_finished(
            node.flow_name, node.step_name, executed.outcome, time.monotonic() - started
        )
        return executed

    def _lapsed_on_arrival(self, chained: ClaimedNode, sent_at: float) -> bool:
        """Whether the write that leased ``chained`` (sent at ``sent_at``) took longer
        than a lease.

        Its lease counts from when the write was sent (the database may have
        granted it at once), so it is not surely ours any more: run now, the step
        would have its outcome withheld and be rescued, then run again. It is
        handed back instead (a release uses up no attempt). A write that waited
        so long met the database locked or away (SQLite's write lock held by
        another process, a lost connection retried).
        """
        lapsed = time.monotonic() - sent_at >= self.settings.lease_seconds
        if lapsed:
            self.log.warning(
                "step.chain_lapsed",
                flow=chained.flow_name,
                tracking_id=chained.tracking_id,
                step=chained.step_name,
                action="handing it back: its lease ran out while the write that chained it waited",
            )
        return lapsed

    def _move_slot(self, slot: _Slot, done: ClaimedNode, executed: Executed) -> ClaimedNode:
        """The slot goes on with the chained node: in flight (heartbeats, release) in its place."""
        chained = executed.chained
        assert chained is not None
        self.lease_times.claimed([chained.lease], executed.sent_at)
        with self._lock:
            self._in_flight.pop(done.lease, None)
            self._in_flight[chained.lease] = chained
            slot.lease = chained.lease
        self.lease_times.forget(done.lease)
        return chained

    def _hand_back(self, node: ClaimedNode) -> None:
        """Release a chained node that will not run here; the lease keeps it if that fails.

        By its exact lease: its node may have been rescued meanwhile and leased
        again to this worker in another slot, where that attempt must run on.
        """
        self._try(lambda: self.storage.release_nodes(leases=[node.lease]))

    def _slot_freed(self, slot: _Slot, future: Future[Outcome]) -> None:
        lease = slot.lease
        with self._lock:
            self._in_flight.pop(lease, None)
            self.metrics.set_in_flight(len(self._in_flight))
        self.lease_times.forget(lease)
        if future.exception() is not None:  # the executor itself failed: say so loudly
            self.log.error(
                "executor.crashed", node_id=lease.node_id, error=repr(future.exception())
            )
        self.wakeup.set()

    # -- the loop ---------------------------------------------------------------

    def run(self) -> None:
        """Run until stop() (or SIGTERM/SIGINT through flowsmith.signals); then shut down."""
        self.storage.check_schema()
        self.storage.register_worker(worker=self.record())
        self._registered = True
        self.heartbeat.start()
        self._start_listener()
        self.log.info(
            "worker.started",
            host=self.host,
            pid=self.pid,
            concurrency=self.settings.concurrency,
            queues=list(self.settings.queues),
            database=self.storage.url_for_display,
            flows=plan_versions(),
        )
        try:
            self._loop()
        finally:
            self.shutdown()

    def _loop(self) -> None:
        failures = 0
        while not self.stopping.is_set():
            self.health.loop_ticked()
            # With every slot taken and no rescue due, a turn asks the database
            # nothing: its success must not end an outage the others still meet.
            asks_database = self.free_slots > 0 or self.rescuer.seconds_until_due() == 0
            try:
                claimed = self.run_once()
                self.scheduler.run_once()
                self.health.turn_succeeded()
                if asks_database:
                    self.outage.answered(by=LOOP)
                failures = 0
            except Exception as exc:
                # The database away, or anything unforeseen: a worker that dies here
                # strands its in-flight steps until their leases expire, so it backs
                # off and tries again instead.
                failures += 1
                if isinstance(exc, DatabaseUnavailable):
                    self.outage.failed(exc, noticed_by=LOOP)  # /readyz reads it too
                else:
                    # The error's text stays in the log: a probe's answer may travel further.
                    self.health.turn_failed(f"loop failing: {type(exc).__name__} (see the log)")
                    self.log.exception("worker.loop_failed", failures=failures)
                self.wakeup.wait(retry_delay(_DB_BACKOFF, failures))
                self.wakeup.clear()
                continue
            if claimed and self.free_slots > 0:
                continue  # there may be more: claim again before sleeping
            self._sleep()

    def record(self) -> WorkerRecord:
        """This worker as a row of fs_workers (the timestamps come from the database)."""
        return WorkerRecord(
            id=self.id,
            host=self.host,
            pid=self.pid,
            version=__version__,
            queues=self.settings.queues,
            concurrency=self.settings.concurrency,
            lease_seconds=self.settings.lease_seconds,
            in_flight=0,
            started_at=0.0,
            heartbeat_at=0.0,
        )

    def _start_listener(self) -> None:
        """On PostgreSQL, LISTEN in a thread of its own; a NOTIFY ends the loop's sleep."""
        if not (self.settings.listen and self.storage.supports_notify):
            return

        def on_notify(queue: str) -> None:
            if not queue or queue in self.settings.queues:
                self.wakeup.set()

        threading.Thread(
            target=self.storage.listen_for_work,
            kwargs={"on_notify": on_notify, "stop": self.stopping},
            name="flowsmith-listen",
            daemon=True,
        ).start()

    def run_until_idle(self, timeout: float | None = None) -> None:
        """Run in this thread until no step is pending or running on its queues.

        Pending includes retries waiting for their backoff and delayed runs.
        Raises TimeoutError if that takes longer than ``timeout`` seconds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        started_heartbeat = not self.heartbeat.running
        self.heartbeat.start()
        try:
            self._run_until_idle(deadline, timeout)
        finally:
            if started_heartbeat:
                self.heartbeat.stop()

    def _run_until_idle(self, deadline: float | None, timeout: float | None) -> None:
        while True:
            claimed = self.run_once()
            if (
                not claimed
                and not self.in_flight()
                and not self.storage.count_open_nodes(queues=self.settings.queues)
            ):
                return
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"worker still busy after {timeout} s")
            if not claimed:
                self.wakeup.wait(min(self.settings.poll_interval, _IDLE_CHECK_SECONDS))
                self.wakeup.clear()

    def _sleep(self) -> None:
        jittered = self.settings.poll_interval * random.uniform(0.9, 1.1)
        self.wakeup.wait(
            min(
                jittered,
                self.rescuer.seconds_until_due(),
                self.scheduler.seconds_until_due(),
            )
        )
        self.wakeup.clear()

    # -- stopping ---------------------------------------------------------------

    def stop(self, graceful: bool = True) -> None:
        """First call: stop claiming, let steps finish. With graceful=False: stop now."""
        self.stopping.set()
        if not graceful:
            self.hard_stop.set()
        self.wakeup.set()

    def shutdown(self) -> None:
        """Wait for in-flight steps up to the grace period; the rest keep their leases."""
        self.stopping.set()
        deadline = time.monotonic() + self.settings.shutdown_timeout
        self.log.info(
            "worker.stopping",
            in_flight=len(self.in_flight()),
            grace_seconds=self.settings.shutdown_timeout,
        )
        if self.in_flight():
            self.heartbeat.start()  # the steps finishing keep their leases meanwhile
        while self.in_flight() and not self.hard_stop.is_set() and time.monotonic() < deadline:
            self.health.loop_ticked()  # alive while it drains: no probe may kill it now
            if self.rescuer.seconds_until_due() == 0:
                # Still live to the others (it heartbeats), so still the one to
                # report its queues' backlog: an autoscaler reads it meanwhile.
                self._try(self.rescue_once)
            self.wakeup.wait(min(0.1, max(0.0, deadline - time.monotonic())))
            self.wakeup.clear()
        self.hard_stop.set()
        # Stopped first, so no renewal follows the end of this worker.
        self.heartbeat.stop()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.batcher.close()  # what is queued is still written; steps left write alone
        self._try(lambda: self.storage.unregister_worker(worker_id=self.id))
        left = self.in_flight()
        if left:
            # Their calls still run in this process: handing their nodes on now would
            # let another worker run them at the same time. They keep their leases
            # (and are rescued when those expire) unless the process ends at once
            # and says so with release_unfinished(), as `flowsmith worker` does.
            self.log.warning(
                "worker.steps_still_running",
                steps=[n.step_name for n in left],
                lease_seconds=self.settings.lease_seconds,
            )
        self.log.info("worker.stopped", unfinished=len(left))

    def release_unfinished(self) -> int:
        """Hand the steps still running back at once, for other workers to take now.

        Only for a process that ends right after (`flowsmith worker` calls it just
        before it exits): while this process lives, their calls run on, and a
        second attempt elsewhere would run at the same time.
        """
        left = [n.lease for n in self.in_flight()]
        if not left:
            return 0
        released = self._try(lambda: self.storage.release_nodes(leases=left))
        self.log.info("worker.released", released=released or 0, unfinished=len(left))
        return released or 0

    def _try(self, call: Callable[[], T]) -> T | None:
        """Shutdown goes on whatever one of its steps raises."""
        try:
            return call()
        except DatabaseUnavailable as exc:
            self.outage.failed(exc, noticed_by="shutdown")  # said once, with the others
        except Exception:
            self.log.exception("worker.shutdown_step_failed")
        return None


def _rescue_interval(settings: WorkerSettings) -> float:
    """Often enough that a lost step waits little more than its lease; never a busy loop."""
    return min(max(settings.lease_seconds / 4, 0.5), 15.0)

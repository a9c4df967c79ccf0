"""Prometheus metrics and health checks for `flowsmith worker --metrics-port P`.

``WorkerMetrics`` holds the counters, owning its registry so several workers in
one process (tests) never collide. ``serve()`` publishes them on /metrics, and
the worker's health.Health on /livez and /readyz, over HTTP from a daemon thread.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from importlib import metadata
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

import prometheus_client
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    make_wsgi_app,
)

from flowsmith_worker import fanout
from flowsmith_worker.errors import FlowSmithError
from flowsmith_worker.flow import registry
from flowsmith_worker.health import Health, Verdict
from flowsmith_worker.storage.base import QueueBacklog, WorkerRecord

# Only this machine, unless told otherwise (a container: --metrics-host 0.0.0.0).
DEFAULT_METRICS_HOST = "127.0.0.1"
# The label of a flow or step this process does not define. Names come from
# database rows, which anyone who can enqueue writes: one label value each
# would let them grow the metrics without bound.
UNREGISTERED = "unregistered"

# From a 5 ms step to a 10 min one; +Inf is added by prometheus_client.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

# Which counter each executor.Outcome moves. A skipped step (its condition was
# False) and a waiting one (its subflow was started) are done with as far as
# this step is concerned, so they count as completed. lease_lost moves no
# counter: a newer attempt owns the node and is counted when it ends. Nor does
# stopped: the step that failed the run (or the operator's cancel) ended it.
_COUNTER_FOR_OUTCOME = {
    "completed": "completed",
    "skipped": "completed",
    "waiting": "completed",
    "retry_scheduled": "retried",
    "failed": "failed",  # failed for good: no attempt left
    "lease_lost": None,
    "stopped": None,
    # A sleep or a wait parked: counted when it wakes and completes (or fails);
    # woken is only on the way there, never an attempt's last outcome.
    "parked": None,
    "woken": None,
    # A rate-limited start with no token: counted when it runs, at its turn.
    "rate_limited": None,
    "token_taken": None,
}


def metric_labels(flow: str, step: str) -> tuple[str, str, str]:
    """(flow, step, queue) if this process defines them; UNREGISTERED in their place if not.

    A step runs on its flow's queue, so the queue label adds no series of its own.
    """
    defined = registry.lookup(flow)
    if defined is None:
        return UNREGISTERED, UNREGISTERED, UNREGISTERED
    if defined.get_step(step) is None:
        # A map's items count under the map's name: one series per map, not one per item.
        item = fanout.parse_item_name(step)
        step = item[0] if item and defined.get_step(item[0]) is not None else UNREGISTERED
    return flow, step, defined.queue


def queues_to_report(
    worker_id: str, queues: Sequence[str], workers: Sequence[WorkerRecord]
) -> list[str]:
    """The queues whose backlog this worker reports: those where it has the lowest id
    of the live workers that serve them.

    The backlog is the database's, the same for every worker: were each to report
    it, sum() over workers would multiply it. One worker per queue reports it
    instead, so both sum() and max() are right. Live: a heartbeat no older than its
    lease, next to the newest heartbeat (all stamped by the database's clock, so
    every worker reading the same rows elects the same one). For one rescue interval
    after a worker joins or dies, a queue may be reported by two workers or none. A
    worker with no row (run_until_idle) reports its queues itself.
    """
    if not any(w.id == worker_id for w in workers):
        return list(queues)
    newest = max(w.heartbeat_at for w in workers)
    live = [w for w in workers if w.heartbeat_at + w.lease_seconds >= newest]
    return [
        q
        for q in queues
        if min((w.id for w in live if q in w.queues), default=worker_id) == worker_id
    ]


def _package_version() -> str:
    try:
        return metadata.version("flowsmith-worker")
    except metadata.PackageNotFoundError:
        return "unknown"


class WorkerMetrics:
    def __init__(self, worker_id: str, host: str, version: str | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        # The process's CPU, memory and file descriptors; the interpreter's version and GC.
        for collector in (ProcessCollector, PlatformCollector, GCCollector):
            collector(registry=self.registry)
        self._children: dict[tuple[str, str, str], Any] = {}
        self._reported_queues: set[str] = set()
        r, labels = self.registry, ("flow", "step", "queue")
        self._counters = {
            name: Counter(f"flowsmith_steps_{name}_total", doc, labels, registry=r)
            for name, doc in (
                ("started", "Step attempts started."),
                ("completed", "Steps completed, skipped, or waiting on their subflow."),
                ("failed", "Steps failed for good: no attempt left."),
                ("retried", "Step attempts that failed with a retry scheduled."),
                ("rescued", "Expired leases of steps rescued by this worker."),
            )
        }
        self.duration = Histogram(
            "flowsmith_step_duration_seconds",
            "Time to run one step attempt and record its outcome.",
            labels,
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        # Reported by one worker per queue (see queues_to_report): sum() over workers is right.
        self.backlog = Gauge(
            "flowsmith_runnable_backlog",
            "Steps runnable now on the queue (one worker per queue reports it).",
            ("queue",),
            registry=r,
        )
        self.oldest_runnable_age = Gauge(
            "flowsmith_oldest_runnable_age_seconds",
            "How long the queue's oldest runnable step has waited (one worker per queue "
            "reports it).",
            ("queue",),
            registry=r,
        )
        self.in_flight = Gauge(
            "flowsmith_steps_in_flight", "Steps this worker is running.", registry=r
        )
        Info("flowsmith_worker", "This worker process.", registry=r).info(
            {"worker_id": worker_id, "host": host, "version": version or _package_version()}
        )

    def step_started(self, flow: str, step: str) -> None:
        self._child("started", flow, step).inc()

    def step_finished(self, flow: str, step: str, outcome: str, seconds: float) -> None:
        """Count the attempt by its outcome (an executor.Outcome) and record how long it took."""
        if outcome not in _COUNTER_FOR_OUTCOME:
            raise ValueError(f"unknown step outcome {outcome!r}; expected one of executor.Outcome")
        counter = _COUNTER_FOR_OUTCOME[outcome]
        if counter is not None:
            self._child(counter, flow, step).inc()
        self._child("duration", flow, step).observe(seconds)

    def _child(self, metric: str, flow: str, step: str) -> Any:
        """The metric's child for (flow, step) and its queue, looked up once per step of the code.

        Every step moves two or three of them: prometheus_client's labels() and the
        registry lookup behind metric_labels would otherwise run each time. Only
        defined steps are kept (a bounded set); others are looked up every time.
        """
        key = (metric, flow, step)
        child = self._children.get(key)
        if child is None:
            labels = metric_labels(flow, step)
            parent = self.duration if metric == "duration" else self._counters[metric]
            child = parent.labels(*labels)
            if labels[:2] == (flow, step):
                self._children[key] = child
        return child

    def step_rescued(self, flow: str, step: str) -> None:
        self._counters["rescued"].labels(*metric_labels(flow, step)).inc()

    def set_in_flight(self, n: int) -> None:
        self.in_flight.set(n)

    def set_backlog(self, queues: Sequence[str], backlog: Mapping[str, QueueBacklog]) -> None:
        """Report these queues' backlog (none runnable where ``backlog`` has no entry),
        and no longer the queues reported before but not now."""
        for queue in self._reported_queues.difference(queues):
            self.backlog.remove(queue)
            self.oldest_runnable_age.remove(queue)
        for queue in queues:
            known = backlog.get(queue, QueueBacklog())
            self.backlog.labels(queue).set(known.runnable)
            self.oldest_runnable_age.labels(queue).set(known.oldest_age_seconds)
        self._reported_queues = set(queues)


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_port = False  # a second worker on the same port must fail, not share it


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # scrapes are not news
        pass


class MetricsServer:
    def __init__(self, server: WSGIServer) -> None:
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.1},  # how soon shutdown() is noticed
            name="flowsmith-metrics",
            daemon=True,
        )
        self._thread.start()

    @property
    def port(self) -> int:
        return self._server.server_port

    def shutdown(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


def serve(
    port: int, metrics: WorkerMetrics, health: Health, host: str = DEFAULT_METRICS_HOST
) -> MetricsServer:
    """Serve /metrics (and /), /livez, /readyz and /healthz on ``host:port`` from a
    daemon thread. /healthz is /livez under its old name (kept for probes already set).

    No ``*_created`` series: they double the series of every counter and histogram
    and say only when this process started. prometheus_client's switch for them is
    process-wide; a process that serves a worker's metrics is that worker's.
    """
    prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]
    metrics_app: WSGIApplication = make_wsgi_app(metrics.registry)
    checks: dict[str, Callable[[], Verdict]] = {
        "/livez": health.liveness,
        "/healthz": health.liveness,
        "/readyz": health.readiness,
    }

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO") or "/"
        if path in ("/", "/metrics"):
            return metrics_app(environ, start_response)
        if path in checks:
            ok, text = checks[path]()
            status = "200 OK" if ok else "503 Service Unavailable"
        else:
            status, text = "404 Not Found", "not found: try /metrics, /livez or /readyz"
        body = f"{text}\n".encode()
        start_response(
            status,
            [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))],
        )
        return [body]

    try:
        server = make_server(host, port, app, server_class=_Server, handler_class=_QuietHandler)
    except OSError as exc:
        why = (
            "the port is already in use"
            if exc.errno == errno.EADDRINUSE
            else exc.strerror or str(exc)
        )
        raise FlowSmithError(
            f"cannot serve metrics on {host}:{port}: {why}; "
            "choose another --metrics-port (or --metrics-host)"
        ) from exc
    return MetricsServer(server)

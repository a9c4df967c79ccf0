"""Prometheus metrics and a health check for `flowsmith worker --metrics-port P`.

``WorkerMetrics`` holds the counters, owning its registry so several workers in
one process (tests) never collide. ``Health`` is what ``/healthz`` reports:
healthy while the worker loop turns and the database answers. ``serve()``
publishes both over HTTP from a daemon thread.
"""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Iterable
from importlib import metadata
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, make_wsgi_app

from flowsmith_worker import registry
from flowsmith_worker.errors import FlowSmithError

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
}


def metric_labels(flow: str, step: str) -> tuple[str, str]:
    """(flow, step) if this process defines them; UNREGISTERED in their place if not."""
    defined = registry.lookup(flow)
    if defined is None:
        return UNREGISTERED, UNREGISTERED
    return flow, step if defined.get_step(step) is not None else UNREGISTERED


def _package_version() -> str:
    try:
        return metadata.version("flowsmith-worker")
    except metadata.PackageNotFoundError:
        return "unknown"


class WorkerMetrics:
    def __init__(self, worker_id: str, host: str, version: str | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._children: dict[tuple[str, str, str], Any] = {}
        r, labels = self.registry, ("flow", "step")
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
        self.backlog = Gauge(
            "flowsmith_runnable_backlog", "Steps runnable now on this worker's queues.", registry=r
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
        """The metric's child for (flow, step), looked up once per step of the code.

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
            if labels == (flow, step):
                self._children[key] = child
        return child

    def step_rescued(self, flow: str, step: str) -> None:
        self._counters["rescued"].labels(*metric_labels(flow, step)).inc()

    def set_in_flight(self, n: int) -> None:
        self.in_flight.set(n)

    def set_backlog(self, n: int) -> None:
        self.backlog.set(n)


class Health:
    """Healthy while the loop ticked within ``stale_after`` s and the last database call worked."""

    def __init__(self, stale_after: float = 60.0) -> None:
        self.stale_after = stale_after
        self._lock = threading.Lock()
        self._last_tick: float | None = None
        self._db_error: str | None = None

    def loop_ticked(self) -> None:
        with self._lock:
            self._last_tick = time.monotonic()

    def database_ok(self) -> None:
        with self._lock:
            self._db_error = None

    def database_failed(self, error: str) -> None:
        with self._lock:
            self._db_error = error or "unknown error"

    def check(self) -> tuple[bool, str]:
        with self._lock:
            last_tick, db_error = self._last_tick, self._db_error
        if last_tick is None:
            return False, "worker loop has not started"
        idle = time.monotonic() - last_tick
        if idle > self.stale_after:
            return False, f"loop stalled: no turn for {idle:.1f} s (limit {self.stale_after:g} s)"
        if db_error is not None:
            return False, f"database unavailable: {db_error}"
        return True, "ok"


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
    """Serve /metrics (and /) and /healthz on ``host:port`` from a daemon thread."""
    metrics_app: WSGIApplication = make_wsgi_app(metrics.registry)

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO") or "/"
        if path in ("/", "/metrics"):
            return metrics_app(environ, start_response)
        if path == "/healthz":
            ok, text = health.check()
            status = "200 OK" if ok else "503 Service Unavailable"
        else:
            status, text = "404 Not Found", "not found: try /metrics or /healthz"
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

"""The worker's Prometheus metrics, /livez and /readyz, read over real HTTP (no database)."""

from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from flowsmith_worker import Context, Flow
from flowsmith_worker.errors import FlowSmithError
from flowsmith_worker.executor import Outcome
from flowsmith_worker.health import Health
from flowsmith_worker.metrics import (
    UNREGISTERED,
    MetricsServer,
    WorkerMetrics,
    queues_to_report,
    serve,
)
from flowsmith_worker.storage.base import QueueBacklog, WorkerRecord


def _charge(ctx: Context) -> None:
    return None


# Labels come only from flows this process defines: the tests define theirs.
ORDERS = Flow(f"orders_{uuid.uuid4().hex[:8]}", queue="payments").step("charge", _charge)
LABELS = {"flow": ORDERS.name, "step": "charge", "queue": "payments"}
NOWHERE = {"flow": UNREGISTERED, "step": UNREGISTERED, "queue": UNREGISTERED}


@pytest.fixture
def metrics() -> WorkerMetrics:
    return WorkerMetrics(worker_id="w1", host="test-host", version="9.9.9")


@pytest.fixture
def health() -> Health:
    return Health()


@pytest.fixture
def server(metrics: WorkerMetrics, health: Health) -> Iterator[MetricsServer]:
    srv = serve(0, metrics, health, host="127.0.0.1")
    yield srv
    srv.shutdown()


def get(srv: MetricsServer, path: str) -> tuple[int, str, str]:
    """GET a path: (status, body, content type), error statuses included."""
    url = f"http://127.0.0.1:{srv.port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode(), resp.headers["Content-Type"]
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(), err.headers["Content-Type"]


def sample(srv: MetricsServer, name: str, **labels: str) -> float | None:
    """The value of one sample scraped from /metrics, or None if it is not exposed."""
    status, text, _ = get(srv, "/metrics")
    assert status == 200
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return s.value
    return None


def test_counters_follow_outcomes(server: MetricsServer, metrics: WorkerMetrics) -> None:
    """Each outcome moves its counter: completed+skipped+waiting → completed,
    retry_scheduled → retried, failed → failed, lease_lost and stopped → none; rescues and
    starts count."""
    outcomes = ("completed", "skipped", "waiting", "retry_scheduled", "failed", "lease_lost")
    for _ in range(7):
        metrics.step_started(ORDERS.name, "charge")
    for outcome in (*outcomes, "stopped"):
        metrics.step_finished(ORDERS.name, "charge", outcome, 0.1)
    metrics.step_rescued(ORDERS.name, "charge")

    assert sample(server, "flowsmith_steps_started_total", **LABELS) == 7
    assert sample(server, "flowsmith_steps_completed_total", **LABELS) == 3
    assert sample(server, "flowsmith_steps_retried_total", **LABELS) == 1
    assert sample(server, "flowsmith_steps_failed_total", **LABELS) == 1
    assert sample(server, "flowsmith_steps_rescued_total", **LABELS) == 1
    assert sample(server, "flowsmith_step_duration_seconds_count", **LABELS) == 7


def test_duration_histogram_buckets(server: MetricsServer, metrics: WorkerMetrics) -> None:
    """Durations land in buckets from 5 ms to 10 min, longer ones only in +Inf."""
    for seconds in (0.003, 0.2, 700.0):
        metrics.step_finished(ORDERS.name, "charge", "completed", seconds)

    def bucket(le: str) -> float | None:
        return sample(server, "flowsmith_step_duration_seconds_bucket", le=le, **LABELS)

    assert bucket("0.005") == 1
    assert bucket("0.25") == 2
    assert bucket("600.0") == 2
    assert bucket("+Inf") == 3
    assert sample(server, "flowsmith_step_duration_seconds_sum", **LABELS) == pytest.approx(700.203)


def test_gauges_and_worker_info(server: MetricsServer, metrics: WorkerMetrics) -> None:
    """Backlog and in-flight gauges show the last value set; the info metric names the worker."""
    metrics.set_backlog(["default", "emails"], {"default": QueueBacklog(42, 3.5)})
    metrics.set_in_flight(3)
    metrics.set_in_flight(2)
    assert sample(server, "flowsmith_runnable_backlog", queue="default") == 42
    assert sample(server, "flowsmith_oldest_runnable_age_seconds", queue="default") == 3.5
    assert sample(server, "flowsmith_runnable_backlog", queue="emails") == 0
    assert sample(server, "flowsmith_oldest_runnable_age_seconds", queue="emails") == 0
    assert sample(server, "flowsmith_steps_in_flight") == 2
    info = {"worker_id": "w1", "host": "test-host", "version": "9.9.9"}
    assert sample(server, "flowsmith_worker_info", **info) == 1


def test_every_executor_outcome_is_accepted(metrics: WorkerMetrics) -> None:
    """Every executor.Outcome (passed as the enum) is known; anything else is a ValueError."""
    for outcome in Outcome:
        metrics.step_finished(ORDERS.name, "charge", outcome, 0.01)
    with pytest.raises(ValueError, match="unknown step outcome"):
        metrics.step_finished(ORDERS.name, "charge", "exploded", 0.01)


def test_paths(server: MetricsServer) -> None:
    """/ also serves the metrics; an unknown path is a 404 that points to the right ones."""
    status, text, _ = get(server, "/")
    assert status == 200 and "flowsmith_steps_in_flight" in text
    status, text, _ = get(server, "/nope")
    assert status == 404 and "/livez" in text and "/readyz" in text


@pytest.mark.parametrize("path", ["/livez", "/healthz"])
def test_livez_follows_the_loop_not_the_database_nor_draining(path: str) -> None:
    """/livez (and /healthz, its old name): 503 until the loop ticks, 200 while it ticks,
    503 once it is stale; a database outage and draining leave it 200 (restarting the
    worker would help neither)."""
    health = Health(stale_after=0.2)
    srv = serve(0, WorkerMetrics("w2", "h"), health, host="127.0.0.1")
    try:
        assert get(srv, path)[:2] == (503, "worker loop has not started\n")
        health.loop_ticked()
        assert get(srv, path) == (200, "ok\n", "text/plain; charset=utf-8")
        health.turn_failed("database unavailable: connection refused")
        health.draining.set()
        assert get(srv, path)[:2] == (200, "ok\n")
        time.sleep(0.3)
        status, text, _ = get(srv, path)
        assert status == 503 and "loop stalled" in text
    finally:
        srv.shutdown()


def test_readyz_follows_loop_database_and_draining() -> None:
    """/readyz: 503 until the loop ticks, 200 while it ticks and the database answers,
    503 during a database failure (with the error), 200 again after, 503 from the
    moment the worker drains, and 503 once the loop is stale."""
    health = Health(stale_after=0.2)
    srv = serve(0, WorkerMetrics("w2", "h"), health, host="127.0.0.1")
    try:
        assert get(srv, "/readyz")[:2] == (503, "worker loop has not started\n")
        health.loop_ticked()
        assert get(srv, "/readyz") == (200, "ok\n", "text/plain; charset=utf-8")
        health.turn_failed("database unavailable: connection refused")
        status, text, _ = get(srv, "/readyz")
        assert status == 503 and "database unavailable: connection refused" in text
        health.turn_succeeded()
        assert get(srv, "/readyz")[:2] == (200, "ok\n")
        health.draining.set()
        status, text, _ = get(srv, "/readyz")
        assert status == 503 and text.startswith("draining")
        health.draining.clear()
        time.sleep(0.3)
        status, text, _ = get(srv, "/readyz")
        assert status == 503 and "loop stalled" in text
    finally:
        srv.shutdown()


def test_process_and_python_metrics_and_no_created_series(
    server: MetricsServer, metrics: WorkerMetrics
) -> None:
    """/metrics carries the process's CPU, memory and file descriptors and the Python
    runtime's version and GC, and no *_created series next to counters and histograms."""
    metrics.step_started(ORDERS.name, "charge")
    metrics.step_finished(ORDERS.name, "charge", "completed", 0.1)
    _, text, _ = get(server, "/metrics")
    names = {s.name for family in text_string_to_metric_families(text) for s in family.samples}
    assert {
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "python_info",
        "python_gc_collections_total",
    } <= names, names
    assert {"flowsmith_steps_started_total", "flowsmith_step_duration_seconds_count"} <= names
    assert not [name for name in names if name.endswith("_created")], names


def _worker(worker_id: str, queues: tuple[str, ...], heartbeat_at: float) -> WorkerRecord:
    return WorkerRecord(worker_id, "h", 1, "v", queues, 4, 30.0, 0, 0.0, heartbeat_at)


def test_one_live_worker_per_queue_reports_its_backlog() -> None:
    """Of the live workers serving a queue, the one with the lowest id reports its
    backlog; a worker whose heartbeat is older than its lease (dead) is passed over,
    and a worker with no row of its own (not registered) reports all its queues."""
    now = 1000.0
    workers = [
        _worker("a", ("emails",), now),
        _worker("b", ("default", "emails"), now - 5),
        _worker("c", ("default", "reports"), now),
        _worker("0-dead", ("default", "reports"), now - 31),
    ]
    assert queues_to_report("a", ["emails"], workers) == ["emails"]
    assert queues_to_report("b", ["default", "emails"], workers) == ["default"]
    assert queues_to_report("c", ["default", "reports"], workers) == ["reports"]
    assert queues_to_report("z", ["default"], workers) == ["default"]
    reported = [q for w in workers[:3] for q in queues_to_report(w.id, w.queues, workers)]
    assert sorted(reported) == ["default", "emails", "reports"]


def test_a_queue_no_longer_reported_leaves_the_gauges(
    server: MetricsServer, metrics: WorkerMetrics
) -> None:
    """A worker that stops being the one to report a queue drops its series, so the
    sum over workers does not count that queue twice."""
    metrics.set_backlog(["default", "emails"], {"emails": QueueBacklog(7, 1.0)})
    metrics.set_backlog(["default"], {"default": QueueBacklog(3, 2.0)})
    assert sample(server, "flowsmith_runnable_backlog", queue="default") == 3
    assert sample(server, "flowsmith_runnable_backlog", queue="emails") is None
    assert sample(server, "flowsmith_oldest_runnable_age_seconds", queue="emails") is None


def test_two_workers_do_not_collide() -> None:
    """Two WorkerMetrics in one process register the same names without error and count
    separately, each served on its own port."""
    a, b = WorkerMetrics("a", "h"), WorkerMetrics("b", "h")
    servers = [serve(0, m, Health(), host="127.0.0.1") for m in (a, b)]
    try:
        a.step_started(ORDERS.name, "charge")
        a.step_started(ORDERS.name, "charge")
        b.step_started(ORDERS.name, "charge")
        assert sample(servers[0], "flowsmith_steps_started_total", **LABELS) == 2
        assert sample(servers[1], "flowsmith_steps_started_total", **LABELS) == 1
    finally:
        for srv in servers:
            srv.shutdown()


def test_busy_port_is_a_clear_error() -> None:
    """A port already in use raises FlowSmithError naming the port and --metrics-port."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(FlowSmithError, match=rf"{port}.*already in use.*--metrics-port"):
            serve(port, WorkerMetrics("w", "h"), Health(), host="127.0.0.1")


def test_shutdown_frees_the_port(metrics: WorkerMetrics, health: Health) -> None:
    """After shutdown() the port is closed and can be served again at once."""
    srv = serve(0, metrics, health, host="127.0.0.1")
    port = srv.port
    srv.shutdown()
    again = serve(port, WorkerMetrics("w3", "h"), health, host="127.0.0.1")
    again.shutdown()


def test_labels_come_only_from_flows_and_steps_this_process_defines(
    server: MetricsServer, metrics: WorkerMetrics
) -> None:
    """Flow and step names read from rows are labels only if this process defines them:
    any other name counts under "unregistered", so rows cannot grow the metrics."""
    for i in range(20):
        metrics.step_started(f"someone_elses_flow_{i}", "step")
        metrics.step_rescued(f"someone_elses_flow_{i}", "step")
    metrics.step_started(ORDERS.name, "step_from_an_older_deploy")
    metrics.step_finished(ORDERS.name, "charge", "completed", 0.1)
    assert sample(server, "flowsmith_steps_started_total", **NOWHERE) == 20
    assert sample(server, "flowsmith_steps_rescued_total", **NOWHERE) == 20
    older_step = {**LABELS, "step": UNREGISTERED}
    assert sample(server, "flowsmith_steps_started_total", **older_step) == 1
    assert sample(server, "flowsmith_steps_completed_total", **LABELS) == 1
    _, text, _ = get(server, "/metrics")
    assert "someone_elses_flow" not in text and "older_deploy" not in text


def _reachable(host: str, port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/livez", timeout=5):
            return True
    except urllib.error.HTTPError:
        return True  # it answered (503 before the loop ticks)
    except (urllib.error.URLError, ConnectionError):
        return False


def test_metrics_listen_on_loopback_unless_told_otherwise(
    metrics: WorkerMetrics, health: Health
) -> None:
    """By default /metrics and /livez answer on 127.0.0.1 alone (127.0.0.2, another
    address of this machine, is refused); host="0.0.0.0" answers on every address."""
    default = serve(0, metrics, health)
    try:
        assert _reachable("127.0.0.1", default.port)
        assert not _reachable("127.0.0.2", default.port)
    finally:
        default.shutdown()
    everywhere = serve(0, metrics, health, host="0.0.0.0")
    try:
        assert _reachable("127.0.0.2", everywhere.port)
    finally:
        everywhere.shutdown()

"""deploy/kubernetes/autoscaling/: the KEDA ScaledObjects, the HPA and its Prometheus
adapter rule.

- The KEDA scalers' queries, read from the YAML files as KEDA reads them, run
  against the real PostgreSQL and MariaDB servers over a known backlog and must
  count exactly the runnable steps of their queue, as the engine does.
- The HPA (and the rendered kustomization with each component) passes the
  Kubernetes OpenAPI schemas in strict mode, as tests/e2e/test_deploy.py does.
- KEDA's own CRD schema is not available offline (cloudcoil-models-keda on PyPI
  holds models generated from it, but they ignore unknown fields): the
  ScaledObject and TriggerAuthentication are checked against a schema of the
  fields we use, named as in KEDA 2.16's CRD, unknown fields rejected; their
  HPA ``behavior`` goes through the Kubernetes schema.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import sqlalchemy as sa
import yaml

from flowsmith_worker import Flow, Worker
from flowsmith_worker.context import Context
from flowsmith_worker.metrics import WorkerMetrics
from flowsmith_worker.storage import create_storage
from flowsmith_worker.storage.base import DEFAULT_QUEUE, Storage
from flowsmith_worker.storage.sql import SqlStorage
from flowsmith_worker.storage.sql import schema as s
from flowsmith_worker.storage.sql.dialects import MYSQL_UTC_EPOCH_SQL
from tests.conftest import database_url, eventually
from tests.e2e.test_deploy import CHECKED_K8S_VERSIONS, K8S_DIR, _docs, _one, _validate_k8s
from tests.integration.test_worker_health import _enqueue

AUTOSCALING = K8S_DIR / "autoscaling"
COMPONENTS = ("keda-postgresql", "keda-mysql", "hpa")
SCALER_FILE = {
    "postgresql": AUTOSCALING / "keda-postgresql" / "scaledobject.yaml",
    "mysql": AUTOSCALING / "keda-mysql" / "scaledobject.yaml",
}
# The trigger type and the metadata keys of its query and target, per KEDA scaler.
SCALER_KEYS = {"postgresql": ("postgresql", "targetQueryValue"), "mysql": ("mysql", "queryValue")}
BACKLOG_METRIC = "flowsmith_runnable_backlog"
OTHER_QUEUE = "reports"

_NAME = {"type": "string", "minLength": 1}
_STRICT = {"type": "object", "additionalProperties": False}
# The parts of KEDA's ScaledObject and TriggerAuthentication (keda.sh/v1alpha1)
# these manifests use; field names as in KEDA 2.16's CRD. Trigger metadata is a
# map of strings there: a YAML number would be rejected by the API server.
KEDA_SCHEMA: dict[str, Any] = {
    **_STRICT,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"enum": ["ScaledObject", "TriggerAuthentication"]},
        "metadata": {
            **_STRICT,
            "required": ["name"],
            "properties": {"name": _NAME, "labels": {"additionalProperties": {"type": "string"}}},
        },
        "spec": {
            **_STRICT,
            "properties": {
                "scaleTargetRef": {
                    **_STRICT,
                    "required": ["name"],
                    "properties": {"name": _NAME, "kind": _NAME, "apiVersion": _NAME},
                },
                "pollingInterval": {"type": "integer", "minimum": 1},
                "cooldownPeriod": {"type": "integer", "minimum": 0},
                "minReplicaCount": {"type": "integer", "minimum": 0},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "advanced": {
                    **_STRICT,
                    "properties": {
                        "horizontalPodAutoscalerConfig": {
                            **_STRICT,
                            "properties": {"behavior": {"type": "object"}},
                        }
                    },
                },
                "triggers": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        **_STRICT,
                        "required": ["type", "metadata"],
                        "properties": {
                            "type": _NAME,
                            "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                            "metadata": {
                                "type": "object",
                                "additionalProperties": {"type": "string"},
                            },
                            "authenticationRef": {
                                **_STRICT,
                                "required": ["name"],
                                "properties": {"name": _NAME},
                            },
                        },
                    },
                },
                "secretTargetRef": {
                    "type": "array",
                    "items": {
                        **_STRICT,
                        "required": ["parameter", "name", "key"],
                        "properties": {"parameter": _NAME, "name": _NAME, "key": _NAME},
                    },
                },
            },
        },
    },
}


def _scaler(backend: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ScaledObject and its TriggerAuthentication for that backend's KEDA scaler."""
    docs = {doc["kind"]: doc for doc in _docs(SCALER_FILE[backend])}
    assert set(docs) == {"ScaledObject", "TriggerAuthentication"}, set(docs)
    return docs["ScaledObject"], docs["TriggerAuthentication"]


def _trigger(backend: str) -> dict[str, Any]:
    triggers = _scaler(backend)[0]["spec"]["triggers"]
    assert len(triggers) == 1, triggers
    assert triggers[0]["type"] == SCALER_KEYS[backend][0]
    metadata: dict[str, Any] = triggers[0]["metadata"]
    return metadata


# --- the scalers' queries against real servers ------------------------------------


@pytest.fixture(params=["postgresql", "mysql"])
def known_backlog(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SqlStorage]:
    """A migrated database of that backend holding, on the default queue: 3 steps
    due now, 2 due in an hour (a retry delay), 2 RUNNING under a live lease, 1
    RUNNING under an expired one, 1 COMPLETED and 1 FAILED; 4 due now on another
    queue and 1 on a queue whose name differs only in case."""
    storage = create_storage(database_url(request, str(request.param), tmp_path))
    assert isinstance(storage, SqlStorage)
    storage.migrate()
    now = storage.current_time()
    nodes = [
        *[(DEFAULT_QUEUE, "PENDING", now - age, None) for age in (3600, 60, 1)],
        *[(DEFAULT_QUEUE, "PENDING", now + 3600, None) for _ in range(2)],
        *[(DEFAULT_QUEUE, "RUNNING", now - 5, now + 30) for _ in range(2)],
        (DEFAULT_QUEUE, "RUNNING", now - 60, now - 30),
        (DEFAULT_QUEUE, "COMPLETED", now - 60, None),
        (DEFAULT_QUEUE, "FAILED", now - 60, None),
        *[(OTHER_QUEUE, "PENDING", now - 10, None) for _ in range(4)],
        (DEFAULT_QUEUE.upper(), "PENDING", now - 10, None),
    ]
    with storage.engine.begin() as conn:
        for i, node in enumerate(nodes):
            _insert_one_step_run(conn, f"run-{i}", *node, now=now)
    yield storage
    storage.close()


def _insert_one_step_run(
    conn: sa.Connection,
    tracking_id: str,
    queue: str,
    status: str,
    run_after: float,
    lease_expires_at: float | None,
    *,
    now: float,
) -> None:
    """A run of one step in that state, written as the engine's tables hold it."""
    flow = {"flow_name": "f", "tracking_id": tracking_id, "status": "RUNNING", "input": "{}"}
    flow |= {"plan": "[]", "queue": queue, "priority": 0, "created_at": now, "updated_at": now}
    flow_id = conn.execute(sa.insert(s.flows).values(flow)).inserted_primary_key[0]
    node = {"flow_id": flow_id, "step_name": "a", "position": 0, "group_index": 0}
    node |= {"status": status, "queue": queue, "priority": 0, "attempt": 1, "max_attempts": 3}
    node |= {"rescues": 0, "run_after": run_after, "created_at": now}
    if lease_expires_at is not None:
        node |= {"lease_owner": "w", "lease_expires_at": lease_expires_at}
    conn.execute(sa.insert(s.nodes).values(node))


def _run_query(storage: SqlStorage, query: str) -> Any:
    """The query's single value, sent as text the way KEDA sends it."""
    with storage.engine.connect() as conn:
        rows = conn.exec_driver_sql(query).all()
    assert len(rows) == 1 and len(rows[0]) == 1, rows
    return rows[0][0]


def test_keda_query_counts_the_runnable_backlog_of_its_queue(known_backlog: SqlStorage) -> None:
    """The scaler's exact query counts the default queue's steps PENDING and due now
    (not the delayed, running, finished, or other queues' ones): the same number as
    the engine's runnable_backlog, which the workers export for the HPA."""
    backend = "postgresql" if known_backlog.dialect.name == "postgresql" else "mysql"
    query = _trigger(backend)["query"]
    assert f"queue IN ('{DEFAULT_QUEUE}')" in query
    assert _run_query(known_backlog, query) == 3
    engine_says = known_backlog.runnable_backlog(queues=[DEFAULT_QUEUE])[DEFAULT_QUEUE].runnable
    assert engine_says == 3
    # Pointed at another queue, it counts that queue's backlog.
    other = query.replace(f"('{DEFAULT_QUEUE}')", f"('{OTHER_QUEUE}')")
    assert _run_query(known_backlog, other) == 4


def test_keda_mysql_query_reads_the_database_clock_in_utc() -> None:
    """run_after is UTC seconds taken from the database clock: the MySQL query must
    compare it with the engine's own expression for "now", not NOW() in the
    session's time zone (which would scale on steps hours early or late)."""
    assert MYSQL_UTC_EPOCH_SQL in " ".join(_trigger("mysql")["query"].split())


# --- the backlog gauge the HPA reads ------------------------------------------------


def test_a_draining_worker_keeps_its_backlog_gauge_current(
    storage: Storage, unique: Callable[[str], str], logs: list[dict[str, Any]]
) -> None:
    """A worker draining after SIGTERM still heartbeats, so the others still leave
    its queues' backlog to it: it must keep its gauge current for as long as it
    drains (up to --shutdown-timeout), not freeze it at its value of the moment
    it stopped claiming, which an autoscaler would read all that time."""
    queue = unique("draining")
    started, release = threading.Event(), threading.Event()

    def slow(_ctx: Context) -> str:
        started.set()
        release.wait(30)
        return "done"

    Flow(f"{queue}_slow", queue=queue, storage=storage).step("slow", slow).run({})
    worker = Worker(storage, queues=[queue], lease_seconds=2.0, shutdown_timeout=30)
    thread = threading.Thread(target=worker.run, name="draining-worker")
    thread.start()
    try:
        assert started.wait(15), "the step never started"
        worker.stop()  # as SIGTERM does: no more claims, the step runs on
        eventually(lambda: any(e["event"] == "worker.stopping" for e in logs), timeout=15)
        _enqueue(storage, queue, 3)
        gauge = "flowsmith_runnable_backlog"
        eventually(
            lambda: worker.metrics.registry.get_sample_value(gauge, {"queue": queue}) == 3,
            timeout=15,
        )
        assert thread.is_alive(), "the worker should still be draining"
    finally:
        release.set()
        thread.join(30)


# --- the manifests -----------------------------------------------------------------


@pytest.mark.parametrize("backend", sorted(SCALER_FILE))
def test_keda_manifests_use_only_known_fields(backend: str) -> None:
    """The ScaledObject and TriggerAuthentication have only fields KEDA's CRD
    defines, strings where it wants strings; their HPA behavior passes the
    Kubernetes schema (strict)."""
    scaled, auth = _scaler(backend)
    for doc in (scaled, auth):
        jsonschema.validate(doc, KEDA_SCHEMA)
    behavior = scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    hpa = _hpa()
    hpa["spec"]["behavior"] = behavior
    for version in CHECKED_K8S_VERSIONS:
        _validate_k8s(hpa, version)


def test_keda_strict_schema_rejects_unknown_fields() -> None:
    """The KEDA schema above is strict: a misspelt field is an error, as is a number
    in trigger metadata."""
    scaled, _ = _scaler("postgresql")
    misspelt = {**scaled, "spec": {**scaled["spec"], "minReplicas": 1}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(misspelt, KEDA_SCHEMA)
    trigger = {**scaled["spec"]["triggers"][0], "metadata": {"targetQueryValue": 50}}
    numeric = {**scaled, "spec": {**scaled["spec"], "triggers": [trigger]}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(numeric, KEDA_SCHEMA)


@pytest.mark.parametrize("backend", sorted(SCALER_FILE))
def test_keda_scaler_targets_the_workers_with_the_workers_secret(backend: str) -> None:
    """The ScaledObject scales the worker Deployment, its trigger authenticates
    through the TriggerAuthentication beside it, and that reads a key the example
    Secret has; targets are positive numbers; it never scales to zero."""
    scaled, auth = _scaler(backend)
    deployment = _one("Deployment")
    assert scaled["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert scaled["spec"]["scaleTargetRef"].get("kind", "Deployment") == "Deployment"
    trigger = scaled["spec"]["triggers"][0]
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    secret = _one("Secret")
    (ref,) = auth["spec"]["secretTargetRef"]
    assert ref["parameter"] == {"postgresql": "connection", "mysql": "connectionString"}[backend]
    assert ref["name"] == secret["metadata"]["name"]
    assert ref["key"] in secret["stringData"]
    assert float(trigger["metadata"][SCALER_KEYS[backend][1]]) > 0
    spec = scaled["spec"]
    assert 1 <= spec["minReplicaCount"] < spec["maxReplicaCount"]


def _hpa() -> dict[str, Any]:
    (hpa,) = _docs(AUTOSCALING / "hpa" / "hpa.yaml")
    return hpa


@pytest.mark.parametrize("version", CHECKED_K8S_VERSIONS)
def test_hpa_matches_openapi_schema_strictly(version: str) -> None:
    for path in (AUTOSCALING / "hpa" / "hpa.yaml", AUTOSCALING / "prometheus-adapter-rules.yaml"):
        for doc in _docs(path):
            _validate_k8s(doc, version)


def _adapter_rule() -> dict[str, Any]:
    (config_map,) = _docs(AUTOSCALING / "prometheus-adapter-rules.yaml")
    config = yaml.safe_load(config_map["data"]["config.yaml"])
    (rule,) = config["externalRules"]
    assert isinstance(rule, dict)
    return rule


def test_hpa_reads_the_backlog_the_workers_export_through_the_adapter_rule() -> None:
    """The HPA asks for an External metric the adapter rule serves, named as the
    gauge the workers export, per queue, with max() so that two workers reporting
    the same queue during a handover do not double it."""
    hpa = _hpa()
    assert hpa["spec"]["scaleTargetRef"]["name"] == _one("Deployment")["metadata"]["name"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "External"
    assert metric["external"]["metric"]["name"] == BACKLOG_METRIC
    assert metric["external"]["metric"]["selector"]["matchLabels"] == {"queue": DEFAULT_QUEUE}
    assert metric["external"]["target"]["type"] == "AverageValue"
    exported = {m.name for m in WorkerMetrics("w", "h", "v").registry.collect()}
    assert BACKLOG_METRIC in exported
    rule = _adapter_rule()
    assert rule["seriesQuery"].startswith(BACKLOG_METRIC + "{")
    assert rule["name"]["as"] == BACKLOG_METRIC
    query = " ".join(rule["metricsQuery"].split())
    assert query.startswith("max by (queue) ("), query
    assert "<<.LabelMatchers>>" in query, "the HPA's selector and namespace would be ignored"
    assert rule["resources"]["overrides"]["namespace"] == {"resource": "namespace"}
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]


def _kustomize_with(tmp_path: Path, component: str) -> list[dict[str, Any]]:
    """`kubectl kustomize` of an overlay: the base manifests plus one component."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed; components checked structurally only")
    base = os.path.relpath(K8S_DIR, tmp_path)
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump({"resources": [base], "components": [f"{base}/autoscaling/{component}"]})
    )
    proc = subprocess.run(
        [kubectl, "kustomize", str(tmp_path)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


@pytest.mark.parametrize("component", COMPONENTS)
def test_each_autoscaling_component_renders_with_the_base(tmp_path: Path, component: str) -> None:
    """Each component renders over the base with kustomize: it adds its autoscaler,
    and the Deployment no longer sets replicas (or every apply would reset what the
    autoscaler chose). The Kubernetes objects pass the strict schema."""
    rendered = _kustomize_with(tmp_path, component)
    kinds = sorted(d["kind"] for d in rendered)
    added = (
        ["HorizontalPodAutoscaler"]
        if component == "hpa"
        else ["ScaledObject", "TriggerAuthentication"]
    )
    assert kinds == sorted(["Deployment", "Job", "PodDisruptionBudget", *added]), kinds
    (deployment,) = [d for d in rendered if d["kind"] == "Deployment"]
    assert "replicas" not in deployment["spec"]
    for doc in rendered:
        if doc["apiVersion"].startswith("keda.sh/"):
            jsonschema.validate(doc, KEDA_SCHEMA)
        else:
            _validate_k8s(doc, CHECKED_K8S_VERSIONS[-1])


def test_the_base_kustomization_names_the_components() -> None:
    """Every autoscaling directory is a kustomize Component, and the base's
    kustomization.yaml shows how to turn one on."""
    assert "autoscaling/keda-postgresql" in (K8S_DIR / "kustomization.yaml").read_text()
    for component in COMPONENTS:
        kustomization = yaml.safe_load((AUTOSCALING / component / "kustomization.yaml").read_text())
        assert kustomization["kind"] == "Component", component

"""The deploy/ files as the deployment tests read them: paths, the Kubernetes manifests
parsed, and validated against the Kubernetes OpenAPI schemas in strict mode."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate import utils as kv_utils

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S_DIR = DEPLOY / "kubernetes"
# A grace period must leave at least this much after --shutdown-timeout for
# the interpreter to exit once the last step is done.
MIN_STOP_MARGIN = 5
K8S_VERSIONS = sorted(set(kv_utils.all_versions()), key=lambda v: tuple(map(int, v.split("."))))
# The oldest and the newest Kubernetes that kubernetes-validate has schemas for.
CHECKED_K8S_VERSIONS = sorted({K8S_VERSIONS[0], K8S_VERSIONS[-1]})


def k8s_files() -> list[Path]:
    return sorted(p for p in K8S_DIR.glob("*.yaml") if p.name != "kustomization.yaml")


def yaml_docs(path: Path) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path} holds no document"
    return docs


def k8s_objects() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in k8s_files():
        for doc in yaml_docs(path):
            yield path, doc


def one_object(kind: str) -> dict[str, Any]:
    found = [doc for _, doc in k8s_objects() if doc.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def validate_k8s(doc: dict[str, Any], version: str) -> None:
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        path = ".".join(str(p) for p in e.path)
        pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} (k8s {version}): {path}: {e.message}")

"""The deployment files under deploy/ and compose.yml, checked with real tools.

- systemd units: ``systemd-analyze verify`` (and ``security --offline``) in a
  throw-away root that holds the unit, systemd's own units and a stand-in for
  /opt/flowsmith/venv/bin/flowsmith; any message about our unit fails.
- Kubernetes manifests: the Kubernetes OpenAPI schemas shipped by the PyPI
  package kubernetes-validate, in strict mode (unknown fields are errors).
- compose.yml: the Compose specification schema (check-jsonschema's vendored
  copy) and the services' wiring.
- deploy/Containerfile: parsed by BuildKit's own parser (the ``dockerfile``
  package).
- Cross-file consistency: each grace period is longer than the worker's
  --shutdown-timeout and each probe/scrape port is its --metrics-port.

Needs the dev extras (kubernetes-validate, check-jsonschema, dockerfile,
PyYAML). Only the systemd-analyze tests skip, and only when systemd-analyze is
not installed.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import dockerfile
import kubernetes_validate
import pytest
import yaml

from tests.support.deploy import (
    CHECKED_K8S_VERSIONS,
    DEPLOY,
    K8S_DIR,
    MIN_STOP_MARGIN,
    REPO,
    k8s_files,
    k8s_objects,
    one_object,
    validate_k8s,
    yaml_docs,
)

SYSTEMD_DIR = DEPLOY / "systemd"
CONTAINERFILE = DEPLOY / "Containerfile"
COMPOSE = REPO / "compose.yml"

UNIT = "flowsmith-worker.service"
TEMPLATE = "flowsmith-worker@.service"
INSTANCE = "flowsmith-worker@1.service"
EXEC_PATH = "/opt/flowsmith/venv/bin/flowsmith"
ENV_FILE = "/etc/flowsmith/worker.env"
# The uid the image runs as and the manifests ask for.
IMAGE_UID = 10001

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None,
    reason="systemd-analyze is not installed (Debian: apt-get install systemd)",
)


# --- helpers: command lines --------------------------------------------------


def _option(args: list[str], name: str) -> str:
    """The value of ``--name VALUE`` or ``--name=VALUE`` in an argument list."""
    for i, arg in enumerate(args):
        if arg == name:
            assert i + 1 < len(args), f"{name} has no value in {args}"
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"{name} missing from {args}")


def _seconds(value: str) -> float:
    """A systemd/compose time span ("75", "75s", "1min 15s", "1m15s") in seconds."""
    units = {
        "": 1, "s": 1, "sec": 1, "second": 1, "seconds": 1,
        "ms": 0.001, "msec": 0.001,
        "m": 60, "min": 60, "minute": 60, "minutes": 60,
        "h": 3600, "hr": 3600, "hour": 3600, "hours": 3600,
    }  # fmt: skip
    text = value.strip()
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", text)
    assert parts and re.fullmatch(r"(?:\s*\d+(?:\.\d+)?\s*[a-z]*)+\s*", text), value
    total = 0.0
    for number, unit in parts:
        assert unit in units, f"unknown time unit {unit!r} in {value!r}"
        total += float(number) * units[unit]
    return total


# --- helpers: systemd units ---------------------------------------------------


def _parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """Sections -> key -> every assigned value, in order (systemd unit syntax)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    pending = ""
    for raw in path.read_text().splitlines():
        line = pending + raw.strip() if pending else raw.strip()
        pending = ""
        if not line or line[0] in "#;":
            continue
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"{path}: assignment outside a section: {line}"
        key, sep, value = line.partition("=")
        assert sep, f"{path}: not an assignment: {line}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def _last(unit: dict[str, dict[str, list[str]]], section: str, key: str) -> str:
    values = unit.get(section, {}).get(key)
    assert values, f"[{section}] {key}= is not set"
    return values[-1]


def _exec_start(unit: dict[str, dict[str, list[str]]]) -> list[str]:
    values = [v for v in unit["Service"].get("ExecStart", []) if v]
    assert len(values) == 1, f"expected one ExecStart=, got {values}"
    argv = shlex.split(values[0])
    argv[0] = argv[0].lstrip("-@:+!")
    return argv


def _vendor_unit_dir() -> Path:
    """The directory holding systemd's own units (sysinit.target and friends)."""
    candidates = ["/usr/lib/systemd/system", "/lib/systemd/system"]
    pkg_config = shutil.which("pkg-config")
    if pkg_config:
        out = subprocess.run(
            [pkg_config, "--variable=systemdsystemunitdir", "systemd"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if out.returncode == 0 and out.stdout.strip():
            candidates.insert(0, out.stdout.strip())
    for candidate in candidates:
        if (Path(candidate) / "sysinit.target").exists():
            return Path(candidate)
    raise AssertionError(f"systemd's own units not found in {candidates}")


def _make_root(root: Path, units: dict[str, str]) -> Path:
    """A file-system root in which systemd-analyze --root= can load our units.

    systemd-analyze resolves unit search paths *and* ExecStart= executables
    inside --root, so the root needs systemd's own units (for the default
    dependencies: sysinit.target, basic.target, ...), an executable at
    EXEC_PATH, and our units in /etc/systemd/system. Nothing of the host's
    /etc/systemd leaks in.
    """
    shutil.copytree(_vendor_unit_dir(), root / "usr/lib/systemd/system", symlinks=True)
    unit_dir = root / "etc/systemd/system"
    unit_dir.mkdir(parents=True)
    for name, text in units.items():
        (unit_dir / name).write_text(text)
    exe = root / EXEC_PATH.lstrip("/")
    exe.parent.mkdir(parents=True)
    exe.write_text("#!/bin/sh\nexit 0\n")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    env_file = root / ENV_FILE.lstrip("/")
    env_file.parent.mkdir(parents=True)
    shutil.copy(SYSTEMD_DIR / "worker.env.example", env_file)
    return root


def _systemd_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYSTEMD_")}
    # Warnings are logged at "warning"/"notice"; make sure none is filtered out.
    env.update(SYSTEMD_LOG_LEVEL="info", SYSTEMD_LOG_COLOR="0", SYSTEMD_LOG_TARGET="console")
    env["SYSTEMD_PAGER"] = "cat"
    return env


def _verify(root: Path, unit_name: str) -> tuple[int, list[str]]:
    """Run systemd-analyze verify; return its exit code and the lines about our unit.

    Lines that name one of systemd's own unit files or another unit are
    ignored; everything else (our file's path, our unit's name, "Unit ... not
    found", ...) counts as a problem.
    """
    assert SYSTEMD_ANALYZE is not None
    proc = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", f"--root={root}", "--man=no", "--generators=no",
         "--recursive-errors=yes", unit_name],
        capture_output=True, text=True, env=_systemd_env(), timeout=120, check=False,
    )  # fmt: skip
    vendor_prefix = str(root / "usr/lib/systemd/system") + "/"
    ours = {unit_name, TEMPLATE, UNIT}
    problems = []
    for line in (proc.stdout + proc.stderr).splitlines():
        if not line.strip() or line.startswith(vendor_prefix):
            continue
        named = re.match(r"^([\w@.\\:-]+\.(?:service|socket|target|mount|path|timer|slice)):", line)
        if named and named.group(1) not in ours:
            continue
        problems.append(line)
    return proc.returncode, problems


def _units_for(unit_name: str) -> dict[str, str]:
    source = TEMPLATE if "@" in unit_name else UNIT
    return {source: (SYSTEMD_DIR / source).read_text()}


# --- systemd: real verification -------------------------------------------------


@needs_systemd_analyze
@pytest.mark.parametrize("unit_name", [UNIT, INSTANCE])
def test_systemd_analyze_verify_is_clean(tmp_path: Path, unit_name: str) -> None:
    root = _make_root(tmp_path / "root", _units_for(unit_name))
    code, problems = _verify(root, unit_name)
    assert code == 0 and not problems, (
        f"systemd-analyze verify {unit_name} (exit {code}):\n" + "\n".join(problems)
    )


@needs_systemd_analyze
@pytest.mark.parametrize(
    ("unit_name", "sabotage", "expect"),
    [
        (UNIT, lambda t: t.replace("[Service]\n", "[Service]\nNoSuchSetting=1\n"), "NoSuchSetting"),
        (INSTANCE, lambda t: t.replace("ProtectSystem=strict", "ProtectSystem=bogus"), "bogus"),
        (UNIT, lambda t: t.replace(EXEC_PATH, "/opt/flowsmith/venv/bin/missing"), "missing"),
    ],
    ids=["unknown-key", "bad-value-in-template", "missing-executable"],
)
def test_systemd_verification_catches_broken_units(
    tmp_path: Path, unit_name: str, sabotage: Any, expect: str
) -> None:
    """The harness above really reads our unit: a broken copy must be reported."""
    units = {name: sabotage(text) for name, text in _units_for(unit_name).items()}
    assert units != _units_for(unit_name), "the sabotage changed nothing"
    root = _make_root(tmp_path / "root", units)
    _code, problems = _verify(root, unit_name)
    assert problems, f"systemd-analyze verify did not notice the broken {unit_name}"
    assert any(expect in line for line in problems), problems


@needs_systemd_analyze
@pytest.mark.parametrize("unit_name", [UNIT, INSTANCE])
def test_systemd_security_exposure_is_low(tmp_path: Path, unit_name: str) -> None:
    assert SYSTEMD_ANALYZE is not None
    root = _make_root(tmp_path / "root", _units_for(unit_name))
    proc = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=yes", f"--root={root}", "--no-pager",
         "--threshold=20", unit_name],
        capture_output=True, text=True, env=_systemd_env(), timeout=120, check=False,
    )  # fmt: skip
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", proc.stdout)
    assert match, f"no exposure level in:\n{proc.stdout}\n{proc.stderr}"
    exposure = float(match.group(1))
    # 0 = locked down, 10 = unprotected; "OK" is below 2.
    assert exposure <= 2.0 and proc.returncode == 0, (
        f"{unit_name}: exposure {exposure}\n{proc.stdout}\n{proc.stderr}"
    )


# --- systemd: what the units say --------------------------------------------------


@pytest.mark.parametrize("name", [UNIT, TEMPLATE])
def test_systemd_unit_settings(name: str) -> None:
    unit = _parse_unit(SYSTEMD_DIR / name)
    service = unit["Service"]
    argv = _exec_start(unit)
    assert argv[0] == EXEC_PATH
    assert argv[1] == "worker"
    # always, not on-failure: a step calling os._exit(0) ends the worker with
    # status 0, which on-failure would leave stopped (see the unit's comment).
    assert _last(unit, "Service", "Restart") == "always"
    assert _seconds(_last(unit, "Service", "RestartSec")) > 0
    assert _last(unit, "Service", "KillSignal") == "SIGTERM"
    assert service.get("EnvironmentFile") == [ENV_FILE], "EnvironmentFile must be required"
    # Migrations are a deploy step, never part of starting a worker.
    for key in ("ExecStartPre", "ExecStartPost", "ExecStart"):
        for value in service.get(key, []):
            assert "migrate" not in shlex.split(value), f"{key}={value}"
    # A dedicated user.
    dynamic = service.get("DynamicUser", ["no"])[-1] == "yes"
    user = service.get("User", ["root"])[-1]
    assert dynamic or user not in ("root", "0"), "runs as root"
    assert re.fullmatch(r"[a-z_][a-z0-9_-]*", user), f"User={user}"
    # $FLOWSMITH_MODULES in ExecStart needs a default, or the worker gets no module.
    if "$FLOWSMITH_MODULES" in argv:
        defaults = [v for v in service.get("Environment", []) if v.startswith("FLOWSMITH_MODULES=")]
        assert defaults and defaults[-1].split("=", 1)[1].strip(), "no FLOWSMITH_MODULES default"
    hardening = {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes",
        "ProtectControlGroups": "yes",
        "RestrictNamespaces": "yes",
        "RestrictRealtime": "yes",
        "RestrictSUIDSGID": "yes",
        "LockPersonality": "yes",
        "MemoryDenyWriteExecute": "yes",
        "SystemCallArchitectures": "native",
        "CapabilityBoundingSet": "",
    }
    for key, want in hardening.items():
        assert _last(unit, "Service", key) == want, f"{key}= should be {want!r}"
    assert service["SystemCallFilter"][0] == "@system-service"
    families = set(_last(unit, "Service", "RestrictAddressFamilies").split())
    assert {"AF_INET", "AF_INET6"} <= families <= {"AF_INET", "AF_INET6", "AF_UNIX"}
    assert _last(unit, "Install", "WantedBy") == "multi-user.target"


@pytest.mark.parametrize("name", [UNIT, TEMPLATE])
def test_systemd_stop_timeout_exceeds_shutdown_timeout(name: str) -> None:
    unit = _parse_unit(SYSTEMD_DIR / name)
    shutdown = float(_option(_exec_start(unit), "--shutdown-timeout"))
    stop = _seconds(_last(unit, "Service", "TimeoutStopSec"))
    assert stop >= shutdown + MIN_STOP_MARGIN, (
        f"{name}: TimeoutStopSec={stop:g}s must exceed --shutdown-timeout {shutdown:g}s "
        f"by at least {MIN_STOP_MARGIN}s, or systemd SIGKILLs a draining worker"
    )


def test_systemd_template_metrics_ports_differ_per_instance() -> None:
    single = int(_option(_exec_start(_parse_unit(SYSTEMD_DIR / UNIT)), "--metrics-port"))
    port_arg = _option(_exec_start(_parse_unit(SYSTEMD_DIR / TEMPLATE)), "--metrics-port")
    assert "%i" in port_arg, "template instances would all bind the same metrics port"
    ports = [int(port_arg.replace("%i", str(n))) for n in range(1, 10)]
    assert len(set(ports)) == len(ports)
    assert all(1024 < p < 65536 for p in ports), ports
    assert single not in ports, "flowsmith-worker.service collides with an instance 1-9"


def test_worker_env_example() -> None:
    lines = [
        line.strip()
        for line in (SYSTEMD_DIR / "worker.env.example").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    keys = {}
    for line in lines:
        assert not line.startswith("export "), "systemd EnvironmentFile= has no `export`"
        key, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"[A-Z_][A-Z0-9_]*", key), line
        keys[key] = value
    assert keys.get("DATABASE_URL", "").startswith(("postgresql", "mysql", "sqlite")), keys


# --- Kubernetes -------------------------------------------------------------------


def test_k8s_expected_files() -> None:
    names = {p.name for p in K8S_DIR.glob("*.yaml")}
    expected = {
        "secret.example.yaml", "migrate-job.yaml", "worker-deployment.yaml",
        "pdb.yaml", "kustomization.yaml",
    }  # fmt: skip
    assert expected <= names, expected - names


@pytest.mark.parametrize("version", CHECKED_K8S_VERSIONS)
@pytest.mark.parametrize("path", k8s_files(), ids=lambda p: p.name)
def test_k8s_manifest_matches_openapi_schema_strictly(path: Path, version: str) -> None:
    for doc in yaml_docs(path):
        validate_k8s(doc, version)


def test_k8s_strict_validation_rejects_unknown_fields() -> None:
    """Strict mode is on: a misspelt field is an error, not silently dropped."""
    doc = json.loads(json.dumps(one_object("Deployment")))
    doc["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = doc["spec"]["template"][
        "spec"
    ]["containers"][0]["readinessProbe"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, CHECKED_K8S_VERSIONS[-1], strict=True)


def test_kustomization_lists_the_manifests() -> None:
    kustomization = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kustomization["kind"] == "Kustomization"
    resources = kustomization["resources"]
    for resource in resources:
        assert (K8S_DIR / resource).is_file(), f"{resource} listed but missing"
    # Every manifest but the example Secret, which must never overwrite the real one.
    wanted = {p.name for p in k8s_files()} - {"secret.example.yaml"}
    assert set(resources) == wanted
    images = {image["name"] for image in kustomization.get("images", [])}
    used = {
        container["image"]
        for _, doc in k8s_objects()
        if doc["kind"] in ("Deployment", "Job")
        for container in doc["spec"]["template"]["spec"]["containers"]
    }
    assert used <= images, f"images not set by kustomization: {used - images}"


def test_kustomize_build_renders_valid_manifests() -> None:
    """`kubectl kustomize` (kustomize's real build) renders; the result validates."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed; kustomization checked structurally only")
    proc = subprocess.run(
        [kubectl, "kustomize", str(K8S_DIR)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    rendered = [d for d in yaml.safe_load_all(proc.stdout) if d]
    assert sorted(d["kind"] for d in rendered) == ["Deployment", "Job", "PodDisruptionBudget"]
    for doc in rendered:
        validate_k8s(doc, CHECKED_K8S_VERSIONS[-1])
        if doc["kind"] in ("Deployment", "Job"):
            for container in doc["spec"]["template"]["spec"]["containers"]:
                assert "/" in container["image"] and ":" in container["image"], container


def _worker_container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def _k8s_argv(container: dict[str, Any]) -> list[str]:
    argv = list(container.get("command", [])) + list(container.get("args", []))
    assert argv and Path(argv[0]).name == "flowsmith", argv
    return argv[1:]


def _effective_security(pod_spec: dict[str, Any], container: dict[str, Any]) -> dict[str, Any]:
    merged = dict(pod_spec.get("securityContext", {}))
    merged.update(container.get("securityContext", {}))
    return merged


def _assert_locked_down(pod_spec: dict[str, Any], container: dict[str, Any]) -> None:
    sec = _effective_security(pod_spec, container)
    assert sec.get("runAsNonRoot") is True
    assert sec.get("runAsUser") == IMAGE_UID
    assert sec.get("readOnlyRootFilesystem") is True
    assert sec.get("allowPrivilegeEscalation") is False
    assert sec.get("capabilities", {}).get("drop") == ["ALL"]
    assert sec.get("capabilities", {}).get("add") in (None, [])
    assert sec.get("seccompProfile", {}).get("type") == "RuntimeDefault"
    assert sec.get("privileged") in (None, False)
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container.get("resources", {}).get(kind, {})), kind
    # A read-only root needs a writable /tmp.
    mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in pod_spec.get("volumes", [])}
    assert "/tmp" in mounts and "emptyDir" in volumes[mounts["/tmp"]]


def _assert_database_url_from_secret(container: dict[str, Any]) -> None:
    secret = one_object("Secret")
    data = {**secret.get("stringData", {}), **secret.get("data", {})}
    refs = {
        env["name"]: env["valueFrom"]["secretKeyRef"]
        for env in container.get("env", [])
        if "secretKeyRef" in env.get("valueFrom", {})
    }
    ref = refs.get("DATABASE_URL") or refs.get("FLOWSMITH_DATABASE_URL")
    assert ref, "no database URL from a Secret"
    assert ref["name"] == secret["metadata"]["name"]
    assert ref["key"] in data


def test_worker_deployment() -> None:
    deployment = one_object("Deployment")
    spec = deployment["spec"]
    pod = spec["template"]["spec"]
    container = _worker_container(deployment)
    argv = _k8s_argv(container)
    assert argv[:2] == ["worker", "myapp.flows"], argv
    assert _option(argv, "--log-format") == "json"
    assert spec["replicas"] == 3
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    _assert_locked_down(pod, container)
    _assert_database_url_from_secret(container)
    assert pod.get("automountServiceAccountToken") is False


def test_worker_deployment_grace_period_exceeds_shutdown_timeout() -> None:
    deployment = one_object("Deployment")
    shutdown = float(_option(_k8s_argv(_worker_container(deployment)), "--shutdown-timeout"))
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace >= shutdown + MIN_STOP_MARGIN, (
        f"terminationGracePeriodSeconds {grace} must exceed --shutdown-timeout {shutdown:g} "
        f"by at least {MIN_STOP_MARGIN}s, or the kubelet SIGKILLs a draining worker"
    )
    # Liveness must not kill a worker that is draining, even if its loop were slow to say so.
    liveness = _worker_container(deployment)["livenessProbe"]
    patience = liveness.get("periodSeconds", 10) * liveness.get("failureThreshold", 3)
    assert patience > shutdown, f"liveness gives up after {patience}s, shutdown takes {shutdown}"


def test_worker_deployment_probes_and_scrape_use_metrics_port() -> None:
    deployment = one_object("Deployment")
    container = _worker_container(deployment)
    port = int(_option(_k8s_argv(container), "--metrics-port"))
    # Probes and scrapes come to the pod's IP: the default 127.0.0.1 would refuse them.
    assert _option(_k8s_argv(container), "--metrics-host") == "0.0.0.0"
    named = {p["name"]: p["containerPort"] for p in container.get("ports", []) if "name" in p}
    assert port in {p["containerPort"] for p in container.get("ports", [])}
    for probe_name, path in (("livenessProbe", "/livez"), ("readinessProbe", "/readyz")):
        http = container[probe_name]["httpGet"]
        probe_port = named.get(http["port"], http["port"])
        assert probe_port == port, f"{probe_name} probes {probe_port}, worker listens on {port}"
        assert http["path"] == path, f"{probe_name} asks {http['path']}, not {path}"
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == port
    assert annotations.get("prometheus.io/path", "/metrics") == "/metrics"


def test_migrate_job() -> None:
    job = one_object("Job")
    spec = job["spec"]
    pod = spec["template"]["spec"]
    containers = pod["containers"]
    assert len(containers) == 1
    assert _k8s_argv(containers[0]) == ["migrate"]
    assert isinstance(spec["backoffLimit"], int) and 0 < spec["backoffLimit"] <= 10
    assert spec["ttlSecondsAfterFinished"] > 0
    assert pod["restartPolicy"] in ("Never", "OnFailure")
    _assert_locked_down(pod, containers[0])
    _assert_database_url_from_secret(containers[0])
    deployment = one_object("Deployment")
    assert containers[0]["image"] == _worker_container(deployment)["image"]


def test_pod_disruption_budget_selects_the_workers() -> None:
    pdb = one_object("PodDisruptionBudget")
    deployment = one_object("Deployment")
    assert pdb["apiVersion"] == "policy/v1"
    selector = pdb["spec"]["selector"]["matchLabels"]
    assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    job_labels = one_object("Job")["spec"]["template"]["metadata"].get("labels", {})
    assert not selector.items() <= job_labels.items(), "the PDB also selects migrate pods"
    assert ("minAvailable" in pdb["spec"]) != ("maxUnavailable" in pdb["spec"])
    if "minAvailable" in pdb["spec"]:
        assert pdb["spec"]["minAvailable"] < deployment["spec"]["replicas"], "blocks all drains"


# --- compose.yml ----------------------------------------------------------------


def _compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def _compose_argv(service: dict[str, Any]) -> list[str]:
    command = service["command"]
    return shlex.split(command) if isinstance(command, str) else [str(c) for c in command]


def test_compose_matches_compose_spec_schema() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
         str(COMPOSE)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_compose_services() -> None:
    services = _compose()["services"]
    assert {"postgres", "mysql", "migrate", "worker"} <= set(services)

    postgres = services["postgres"]
    assert postgres["image"] == "postgres:16"
    assert postgres["environment"] == {
        "POSTGRES_USER": "flowsmith", "POSTGRES_PASSWORD": "flowsmith", "POSTGRES_DB": "flowsmith",
    }  # fmt: skip
    assert "pg_isready" in postgres["healthcheck"]["test"]
    assert any(str(p).endswith("5432") for p in postgres["ports"])

    mysql = services["mysql"]
    assert mysql["image"] == "mysql:8"
    assert mysql["healthcheck"]["test"][0] in ("CMD", "CMD-SHELL")
    assert any(str(p).endswith("3306") for p in mysql["ports"])

    migrate = services["migrate"]
    build = migrate["build"]
    assert (REPO / build["context"] / build["dockerfile"]).resolve() == CONTAINERFILE
    assert _compose_argv(migrate) == ["migrate"]
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_compose_worker_wiring() -> None:
    services = _compose()["services"]
    worker, migrate = services["worker"], services["migrate"]
    assert worker["image"] == migrate["image"] and worker.get("build") == migrate.get("build")
    argv = _compose_argv(worker)
    assert argv[:2] == ["worker", "flowsmith_worker.examples.orders"], argv
    port = _option(argv, "--metrics-port")
    assert port == "9100"
    assert _option(argv, "--metrics-host") == "0.0.0.0"  # the port is published
    assert worker["environment"]["DATABASE_URL"] == (
        "postgresql://flowsmith:flowsmith@postgres:5432/flowsmith"
    )
    depends = worker["depends_on"]
    assert depends["migrate"]["condition"] == "service_completed_successfully"
    assert depends.get("postgres", {}).get("condition", "service_healthy") == "service_healthy"
    # The healthcheck asks the worker's own /healthz, on its --metrics-port.
    test = worker["healthcheck"]["test"]
    assert test[0] in ("CMD", "CMD-SHELL")
    assert re.search(rf"(127\.0\.0\.1|localhost):{port}/healthz\b", " ".join(test)), test
    # compose's SIGKILL must not cut the graceful shutdown short.
    if "--shutdown-timeout" in argv:
        shutdown = float(_option(argv, "--shutdown-timeout"))
        grace = _seconds(str(worker.get("stop_grace_period", "10s")))
        assert grace >= shutdown + MIN_STOP_MARGIN, (grace, shutdown)
    assert worker.get("stop_signal", "SIGTERM") == "SIGTERM"


# --- Containerfile ----------------------------------------------------------------


def _stages() -> list[list[dockerfile.Command]]:
    stages: list[list[dockerfile.Command]] = []
    for command in dockerfile.parse_file(str(CONTAINERFILE)):
        if command.cmd == "FROM":
            stages.append([])
        assert stages, f"{command.original} before the first FROM"
        stages[-1].append(command)
    return stages


def test_containerfile_is_multi_stage_python_312_slim() -> None:
    stages = _stages()
    assert len(stages) >= 2
    for stage in stages:
        assert stage[0].value[0] == "python:3.12-slim", stage[0].original
    build_runs = [c for c in stages[0] if c.cmd == "RUN"]
    installs = [c.value for c in build_runs if "install" in c.value]
    assert any(
        any(re.fullmatch(r"\.\[(postgres,mysql|mysql,postgres)\]", arg) for arg in install)
        for install in installs
    ), installs


def test_containerfile_entrypoint_and_user() -> None:
    final = _stages()[-1]
    entrypoint = [c for c in final if c.cmd == "ENTRYPOINT"]
    cmd = [c for c in final if c.cmd == "CMD"]
    assert entrypoint and entrypoint[-1].json, "ENTRYPOINT must be exec (JSON) form"
    assert entrypoint[-1].value == ("flowsmith",)
    assert cmd and cmd[-1].json and cmd[-1].value == ("worker", "--help")
    users = [c for c in final if c.cmd == "USER"]
    assert users, "the image runs as root"
    user = users[-1].value[0].split(":")[0]
    # Numeric, so Kubernetes' runAsNonRoot can check it, and matching the manifests.
    assert user.isdigit() and int(user) == IMAGE_UID, user
    # Nothing after the last USER switches back to root.
    assert final.index(users[-1]) > max(i for i, c in enumerate(final) if c.cmd in ("RUN", "COPY"))


def test_containerfile_has_no_shell_tricks() -> None:
    for stage in _stages():
        for command in stage:
            if command.cmd in ("RUN", "CMD", "ENTRYPOINT"):
                assert command.json, f"line {command.start_line}: use exec form: {command.original}"
                assert command.value[:2] not in (("sh", "-c"), ("/bin/sh", "-c")), command.original


def test_containerfile_copies_what_the_build_needs() -> None:
    """The build stage gets pyproject.toml, its readme and the package, and they exist."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    readme = pyproject["project"].get("readme")
    readme_file = readme if isinstance(readme, str) else (readme or {}).get("file")
    needed = {"pyproject.toml", "flowsmith_worker"} | ({readme_file} if readme_file else set())
    copied = set()
    for command in _stages()[0]:
        if command.cmd == "COPY" and not any(f.startswith("--from") for f in command.flags):
            copied.update(command.value[:-1])
    assert needed <= copied, f"not copied into the build stage: {needed - copied}"
    missing = sorted(src for src in copied if not (REPO / src).exists())
    assert not missing, f"COPY sources missing from the repository: {missing}"

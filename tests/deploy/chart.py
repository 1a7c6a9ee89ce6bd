"""The Helm chart rendered by the real Helm, and ways to look into what it renders.

Set-up (deploy/local/k8s-tools.sh, run by `make setup`) puts Helm, kubernetes-validate and checkov
in the cache folder's k8s-tools/bin; a missing tool fails the test that needs it with what to run.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.common.binaries import PartsSettings
from tests.fixtures.parts import REPO_ROOT

CHART = REPO_ROOT / "deploy" / "helm" / "lmcluster"
GPU_VALUES = REPO_ROOT / "deploy" / "helm" / "values-gpu.yaml"
# Every option a user is likely to turn: tracing, API keys, digests, a PVC, autoscaling off, ...
ALL_OPTIONS_VALUES = Path(__file__).resolve().parent / "values-all-options.yaml"
RELEASE, NAMESPACE = "lmcluster", "lmcluster"
WORKLOADS = ("Deployment", "DaemonSet", "StatefulSet")

Manifest = dict[str, Any]


def tool(name: str) -> Path:
    """helm, kubernetes-validate or checkov, as set-up installed it."""
    path = PartsSettings().cache_dir / "k8s-tools" / "bin" / name
    if not path.exists():
        pytest.fail(f"{name} is missing at {path}: run `make setup` (deploy/local/k8s-tools.sh installs it)")
    return path


def render_text(values: Sequence[Path] = (), namespace: str = NAMESPACE) -> str:
    args = [str(tool("helm")), "template", RELEASE, str(CHART), "--namespace", namespace]
    for path in values:
        args += ["--values", str(path)]
    result = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout


def render(values: Sequence[Path] = ()) -> list[Manifest]:
    return [doc for doc in yaml.safe_load_all(render_text(values)) if doc]


def find(manifests: list[Manifest], kind: str, name: str) -> Manifest:
    for doc in manifests:
        if doc["kind"] == kind and doc["metadata"]["name"] == name:
            return doc
    raise AssertionError(f"no {kind} {name} among {[(d['kind'], d['metadata']['name']) for d in manifests]}")


def workloads(manifests: list[Manifest]) -> Iterator[Manifest]:
    return (doc for doc in manifests if doc["kind"] in WORKLOADS)


def pod_spec(workload: Manifest) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def container(workload: Manifest, name: str) -> dict[str, Any]:
    for candidate in pod_spec(workload)["containers"]:
        if candidate["name"] == name:
            return dict(candidate)
    raise AssertionError(f"{workload['metadata']['name']} has no container {name}")


def env(container_spec: dict[str, Any]) -> dict[str, Any]:
    """Variable -> its value, or its valueFrom for one taken from elsewhere."""
    return {item["name"]: item.get("value", item.get("valueFrom")) for item in container_spec.get("env", [])}


def component(manifest: Manifest) -> str:
    return str(manifest["metadata"]["labels"]["app.kubernetes.io/component"])


def service_host(name: str) -> str:
    return f"{name}.{NAMESPACE}.svc.cluster.local"


def dump(manifests: list[Manifest], path: Path) -> Path:
    path.write_text(yaml.safe_dump_all(manifests, sort_keys=False))
    return path

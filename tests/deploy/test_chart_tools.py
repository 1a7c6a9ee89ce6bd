"""The rendered chart checked by real tools, offline: Helm's linter, the Kubernetes API schemas
(kubernetes-validate), checkov's security policies, and Envoy on the configuration its pods run.
`make k8s` is run as a user runs it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.deploy.chart import (
    ALL_OPTIONS_VALUES,
    CHART,
    GPU_VALUES,
    Manifest,
    container,
    dump,
    env,
    find,
    render_text,
    service_host,
    tool,
)
from tests.fixtures.parts import REPO_ROOT, envoy_argv

# Prometheus Operator resources: their schemas come with the Operator's CRDs, which
# kubernetes-validate does not ship. These kinds alone skip schema validation;
# test_chart_structure checks the fields that matter in them.
CUSTOM_RESOURCES = {"ServiceMonitor", "PrometheusRule"}
# The oldest Kubernetes the chart supports (Chart.yaml's kubeVersion) and the newest schemas known.
KUBERNETES_VERSIONS = ("1.29.0", "1.37.0")
# The only checks a chart may skip, each with its reason in the skip annotation itself.
ALLOWED_SKIPS = {"CKV_K8S_43", "CKV_K8S_15", "CKV_K8S_35"}
# Nothing from the network: no policy metadata from the vendor's platform (--skip-download and
# this), no look-up of a newer checkov.
CHECKOV_OFFLINE = {"BC_SKIP_MAPPING": "TRUE", "CKV_SKIP_PACKAGE_UPDATE_CHECK": "true"}
VARIANTS = {"default": (), "gpu": (GPU_VALUES,), "all-options": (ALL_OPTIONS_VALUES,)}


def _manifests(values: tuple[Path, ...]) -> list[Manifest]:
    return [doc for doc in yaml.safe_load_all(render_text(values)) if doc]


def test_helm_lint_is_clean() -> None:
    for values in VARIANTS.values():
        args = [str(tool("helm")), "lint", "--strict", str(CHART), "--namespace", "lmcluster"]
        args += [item for path in values for item in ("--values", str(path))]
        result = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_object_matches_the_kubernetes_schema(variant: str, tmp_path: Path) -> None:
    manifests = _manifests(VARIANTS[variant])
    core = [doc for doc in manifests if doc["kind"] not in CUSTOM_RESOURCES]
    path = dump(core, tmp_path / "manifests.yaml")
    versions = [arg for version in KUBERNETES_VERSIONS for arg in ("-k", version)]
    result = subprocess.run(
        [str(tool("kubernetes-validate")), "--strict", *versions, str(path)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    lines = result.stdout.splitlines()
    # WARN is an object without a schema (an unknown kind or apiVersion): a failure here too.
    problems = [line for line in lines if not line.startswith("INFO")]
    assert result.returncode == 0 and not problems, "\n".join(problems) + result.stderr
    assert len(lines) == len(core) * len(KUBERNETES_VERSIONS)


@pytest.mark.parametrize("variant", VARIANTS)
def test_checkov_finds_nothing(variant: str, tmp_path: Path) -> None:
    manifests = _manifests(VARIANTS[variant])
    folder = tmp_path / "manifests"
    folder.mkdir()
    dump(manifests, folder / "lmcluster.yaml")
    result = subprocess.run(
        [str(tool("checkov")), "--directory", str(folder), "--framework", "kubernetes", "--output", "json", "--skip-download"],
        capture_output=True, text=True, timeout=300, check=False, env={**os.environ, **CHECKOV_OFFLINE},
    )  # fmt: skip
    report = json.loads(result.stdout)
    summary = report["summary"]
    failed = [f"{c['check_id']} {c['resource']}: {c['check_name']}" for c in report["results"]["failed_checks"]]
    assert summary["failed"] == 0 and summary["parsing_errors"] == 0, "\n".join(failed)
    assert result.returncode == 0, result.stderr[-2000:]
    checked = {check["resource"] for check in report["results"]["passed_checks"]}
    for doc in manifests:
        if doc["kind"] in ("Deployment", "DaemonSet", "StatefulSet"):
            assert f"{doc['kind']}.lmcluster.{doc['metadata']['name']}" in checked
    for skipped in report["results"]["skipped_checks"]:
        reason = skipped["check_result"]["suppress_comment"]
        assert skipped["check_id"] in ALLOWED_SKIPS and len(reason) > 20, skipped
    if variant == "all-options":  # digests given: only the API keys' environment variable is skipped
        assert {s["check_id"] for s in report["results"]["skipped_checks"]} == {"CKV_K8S_35"}


@pytest.mark.parametrize("variant", ["default", "all-options"])
def test_envoy_accepts_the_configuration_its_pods_render(variant: str, tmp_path: Path) -> None:
    """The Envoy container's own environment, through its own entrypoint, into `envoy --mode validate`."""
    envoy = container(find(_manifests(VARIANTS[variant]), "Deployment", "lmcluster-envoy"), "envoy")
    variables = {name: value if isinstance(value, str) else "sk-from-the-secret" for name, value in env(envoy).items()}
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("LMC_", "OTEL_"))}
    out = tmp_path / "envoy.yaml"
    script = envoy["command"][1]
    result = subprocess.run(
        [sys.executable, script, "--render-only", str(out)],
        cwd=REPO_ROOT, env={**clean, **variables}, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(out.read_text())
    router = next(c for c in config["static_resources"]["clusters"] if c["name"] == "router")
    assert router["type"] == "STRICT_DNS"
    addresses = [e["endpoint"]["address"]["socket_address"] for group in router["load_assignment"]["endpoints"] for e in group["lb_endpoints"]]
    assert addresses == [{"address": service_host("lmcluster-router"), "port_value": 50051}]
    assert ("envoy.filters.http.api_key_auth" in out.read_text()) == (variant == "all-options")
    validate = subprocess.run([*envoy_argv(out), "--mode", "validate"], capture_output=True, text=True, timeout=60, check=False)
    assert validate.returncode == 0, validate.stdout[-2000:] + validate.stderr[-2000:]


def test_make_k8s_prints_the_default_manifests_and_nothing_else() -> None:
    # As a user runs it: not as a sub-make of `make test`, which would print "Entering directory".
    outer = ("MAKELEVEL", "MAKEFLAGS", "MFLAGS", "MAKEOVERRIDES")
    user_env = {k: v for k, v in os.environ.items() if k not in outer}
    result = subprocess.run(["make", "k8s"], cwd=REPO_ROOT, env=user_env, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout == render_text()
    kinds = {doc["kind"] for doc in yaml.safe_load_all(result.stdout) if doc}
    assert {"DaemonSet", "Deployment", "StatefulSet", "NetworkPolicy", "ServiceMonitor"} <= kinds

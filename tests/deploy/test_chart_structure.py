"""What a user of deploy/helm/lmcluster relies on, read from what Helm renders.

Inference nodes as a DaemonSet (Registry + Supervisor, models read-only, backends advertised at the
pod's IP), the gateway as autoscaled Deployments behind Envoy, Redis Stack with an append-only
file, hardened pods, native gRPC probes, and the Services that tie them together by DNS name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from services.cache.settings import CacheSettings
from services.common.binaries import redis_server_command
from services.common.settings import SHARED_FIELDS
from services.common.telemetry import TelemetrySettings, TraceContentSettings
from services.embedding.settings import EmbeddingSettings
from services.registry.settings import RegistrySettings
from services.router.settings import RouterSettings
from services.supervisor.settings import SupervisorSettings
from tests.deploy.chart import (
    NAMESPACE,
    Manifest,
    component,
    container,
    env,
    find,
    pod_spec,
    service_host,
    workloads,
)
from tests.fixtures.parts import REPO_ROOT
from tests.observability.test_compose import _entrypoint, _env_names

GRPC = {
    "router": (50051, "lmcluster.router.v1.RouterService"),
    "embedding": (50052, "lmcluster.embedding.v1.EmbeddingService"),
    "cache": (50053, "lmcluster.cache.v1.CacheService"),
    "supervisor": (50054, "lmcluster.supervisor.v1.SupervisorService"),
    "registry": (50055, "lmcluster.registry.v1.RegistryService"),
}
METRICS = {"router": 9151, "embedding": 9152, "cache": 9153, "supervisor": 9154, "registry": 9155}
SETTINGS = {
    "router": RouterSettings,
    "embedding": EmbeddingSettings,
    "cache": CacheSettings,
    "supervisor": SupervisorSettings,
    "registry": RegistrySettings,
}
GATEWAY = ("router", "embedding", "cache", "envoy")
VARIANTS = ["default_manifests", "gpu_manifests", "all_options_manifests"]


def _containers(manifests: list[Manifest]) -> list[tuple[Manifest, dict[str, Any]]]:
    return [(w, c) for w in workloads(manifests) for c in pod_spec(w)["containers"]]


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_pod_is_hardened(variant: str, request: pytest.FixtureRequest) -> None:
    manifests = request.getfixturevalue(variant)
    assert {component(w) for w in workloads(manifests)} == {"node", *GATEWAY, "redis"}
    for workload in workloads(manifests):
        spec = pod_spec(workload)
        name = workload["metadata"]["name"]
        assert spec["automountServiceAccountToken"] is False, name
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["runAsUser"] >= 10000, name
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert not any(spec.get(key) for key in ("hostNetwork", "hostPID", "hostIPC")), name
        volumes = {volume["name"]: volume for volume in spec["volumes"]}
        for item in spec["containers"]:
            where = f"{name}/{item['name']}"
            security = item["securityContext"]
            assert security["runAsNonRoot"] is True and security["runAsUser"] >= 10000, where
            assert security["allowPrivilegeEscalation"] is False and security["privileged"] is False, where
            assert security["readOnlyRootFilesystem"] is True, where
            assert security["capabilities"] == {"drop": ["ALL"]}, where
            assert security["seccompProfile"] == {"type": "RuntimeDefault"}, where
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(item["resources"][bound]), f"{where}: {bound}"
            # The one writable place besides data volumes: /tmp, an emptyDir.
            mounts = {mount["mountPath"]: mount["name"] for mount in item["volumeMounts"]}
            assert "emptyDir" in volumes[mounts["/tmp"]], where
            image = item["image"]
            assert ":" in image.split("/")[-1] and not image.endswith(":latest"), f"{where}: {image}"
            assert item["imagePullPolicy"] == "IfNotPresent", where


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_object_names_its_namespace(variant: str, request: pytest.FixtureRequest) -> None:
    for manifest in request.getfixturevalue(variant):
        assert manifest["metadata"]["namespace"] == NAMESPACE, manifest["metadata"]["name"]


def test_services_have_native_grpc_probes_on_their_own_health_names(default_manifests: list[Manifest]) -> None:
    seen = set()
    for _, item in _containers(default_manifests):
        if item["name"] not in GRPC:
            continue
        port, service = GRPC[item["name"]]
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert item[probe]["grpc"] == {"port": port, "service": service}, f"{item['name']} {probe}"
        seen.add(item["name"])
    assert seen == set(GRPC)
    envoy = container(find(default_manifests, "Deployment", "lmcluster-envoy"), "envoy")
    assert envoy["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert envoy["readinessProbe"]["httpGet"]["path"] == "/readyz"


def test_services_bind_every_interface_on_the_product_ports(default_manifests: list[Manifest]) -> None:
    for _, item in _containers(default_manifests):
        if item["name"] not in GRPC:
            continue
        prefix = f"LMC_{item['name'].upper()}"
        variables = env(item)
        assert variables[f"{prefix}_HOST"] == "0.0.0.0"
        assert variables[f"{prefix}_PORT"] == str(GRPC[item["name"]][0])
        assert variables[f"{prefix}_METRICS_PORT"] == str(METRICS[item["name"]])
        assert item["args"] == ["serve", item["name"]]


def test_every_variable_is_a_setting_its_reader_accepts(all_options_manifests: list[Manifest], monkeypatch: pytest.MonkeyPatch) -> None:
    shared = {f"LMC_{name.upper()}" for name in SHARED_FIELDS} | _env_names(TelemetrySettings) | _env_names(TraceContentSettings)
    readers = {**SETTINGS, "envoy": _entrypoint().EnvoyContainerSettings}
    for _, item in _containers(all_options_manifests):
        if item["name"] not in readers:
            continue
        settings = readers[item["name"]]
        # The Router also reads the Cache's index settings (services/router/index_reader.py).
        also = (CacheSettings,) if item["name"] == "router" else ()
        accepted = _env_names(settings).union(*map(_env_names, also))
        for variable, value in env(item).items():
            assert variable in accepted | shared, f"{item['name']}: {variable} is read by nothing"
            monkeypatch.setenv(variable, value if isinstance(value, str) else "127.0.0.2")
        if item["name"] != "envoy":
            for reader in (settings, *also):
                reader()  # raises on a value the service would refuse at start
        for variable in env(item):
            monkeypatch.delenv(variable)


def test_node_daemonset_runs_registry_and_supervisor_on_read_only_models(default_manifests: list[Manifest], all_options_manifests: list[Manifest]) -> None:
    for manifests in (default_manifests, all_options_manifests):
        node = find(manifests, "DaemonSet", "lmcluster-node")
        assert [item["name"] for item in pod_spec(node)["containers"]] == ["registry", "supervisor"]
        assert container(node, "supervisor")["image"].split("@")[0].rsplit(":", 1)[0].endswith("lmcluster-supervisor")
        models = next(volume for volume in pod_spec(node)["volumes"] if volume["name"] == "models")
        for name in ("registry", "supervisor"):
            mount = next(m for m in container(node, name)["volumeMounts"] if m["name"] == "models")
            assert mount == {"name": "models", "mountPath": "/models", "readOnly": True}
        assert env(container(node, "registry"))["LMC_MODELS_DIR"] == "/models"
    default_models = next(v for v in pod_spec(find(default_manifests, "DaemonSet", "lmcluster-node"))["volumes"] if v["name"] == "models")
    assert default_models["hostPath"]["type"] == "Directory"
    assert models["persistentVolumeClaim"] == {"claimName": "lmstudio-models", "readOnly": True}


def test_backends_are_advertised_at_the_pod_ip(default_manifests: list[Manifest]) -> None:
    supervisor = env(container(find(default_manifests, "DaemonSet", "lmcluster-node"), "supervisor"))
    assert supervisor["LMC_SUPERVISOR_BACKEND_HOST"] == "0.0.0.0"
    assert supervisor["LMC_SUPERVISOR_ADVERTISE_HOST"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    assert (supervisor["LMC_SUPERVISOR_PORT_RANGE_START"], supervisor["LMC_SUPERVISOR_PORT_RANGE_END"]) == ("8100", "8199")
    assert supervisor["LMC_REGISTRY_ADDRESS"] == "127.0.0.1:50055"
    # The backends run inside the Supervisor's container: its memory limit covers them.
    resources = container(find(default_manifests, "DaemonSet", "lmcluster-node"), "supervisor")["resources"]
    assert "nvidia.com/gpu" not in resources["limits"]


def test_gpu_values_ask_for_gpus_and_the_cuda_supervisor(gpu_manifests: list[Manifest]) -> None:
    node = find(gpu_manifests, "DaemonSet", "lmcluster-node")
    supervisor = container(node, "supervisor")
    assert supervisor["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert supervisor["image"].endswith("-cuda")
    assert env(supervisor)["LMC_SUPERVISOR_GPU_LAYERS"] == "all"
    assert pod_spec(node)["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod_spec(node)["tolerations"]
    assert "nvidia.com/gpu" not in container(node, "registry")["resources"]["limits"]


def test_routers_find_nodes_embedding_and_cache_by_dns(default_manifests: list[Manifest]) -> None:
    node_service = find(default_manifests, "Service", "lmcluster-node")
    assert node_service["spec"]["clusterIP"] == "None"
    assert node_service["spec"]["selector"]["app.kubernetes.io/component"] == "node"
    assert {p["port"] for p in node_service["spec"]["ports"]} >= {50054, 50055}
    router = env(container(find(default_manifests, "Deployment", "lmcluster-router"), "router"))
    assert router["LMC_ROUTER_NODES"] == service_host("lmcluster-node")
    for name, port in (("embedding", 50052), ("cache", 50053)):
        assert router[f"LMC_ROUTER_{name.upper()}_ADDRESS"] == f"{service_host(f'lmcluster-{name}')}:{port}"
        service = find(default_manifests, "Service", f"lmcluster-{name}")
        assert port in {p["port"] for p in service["spec"]["ports"]}
    cache = env(container(find(default_manifests, "Deployment", "lmcluster-cache"), "cache"))
    assert cache["REDIS_URL"] == f"redis://{service_host('lmcluster-redis')}:6379"
    assert router["LMC_ROUTER_REDIS_URL"] == cache["REDIS_URL"]


def test_envoy_balances_over_every_router_pod(default_manifests: list[Manifest]) -> None:
    routers = find(default_manifests, "Service", "lmcluster-router")
    assert routers["spec"]["clusterIP"] == "None"  # DNS answers every Router pod, for STRICT_DNS
    envoy = container(find(default_manifests, "Deployment", "lmcluster-envoy"), "envoy")
    assert envoy["command"] == ["python", "deploy/docker/envoy_entrypoint.py"]
    assert (REPO_ROOT / "deploy" / "docker" / "envoy_entrypoint.py").is_file()
    assert env(envoy)["LMC_ROUTER_ADDRESS"] == f"{service_host('lmcluster-router')}:50051"
    # Envoy's admin port is for Prometheus only: never on the (possibly public) API Service.
    api = find(default_manifests, "Service", "lmcluster-envoy")
    assert [p["port"] for p in api["spec"]["ports"]] == [8080]


@pytest.mark.parametrize("name", GATEWAY)
def test_gateway_deployments_autoscale_and_survive_disruptions(name: str, default_manifests: list[Manifest]) -> None:
    deployment = find(default_manifests, "Deployment", f"lmcluster-{name}")
    assert "replicas" not in deployment["spec"]  # the autoscaler owns it
    hpa = find(default_manifests, "HorizontalPodAutoscaler", f"lmcluster-{name}")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": f"lmcluster-{name}"}
    assert hpa["spec"]["minReplicas"] >= 2
    pdb = find(default_manifests, "PodDisruptionBudget", f"lmcluster-{name}")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert pdb["spec"]["maxUnavailable"] == 1
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_redis_stack_keeps_an_append_only_file_on_its_own_volume(default_manifests: list[Manifest]) -> None:
    redis = find(default_manifests, "StatefulSet", "lmcluster-redis")
    item = container(redis, "redis")
    assert item["image"] == "redis/redis-stack-server:7.4.0-v3"
    args = item["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--appendfsync") + 1] == "everysec"
    assert args[args.index("--dir") + 1] == "/data"
    # The modules and arguments `lmcluster up` starts Redis Stack with.
    local, _ = redis_server_command(6379, REPO_ROOT)
    modules = [Path(arg).name for arg in local if arg.endswith(".so")]
    assert modules == [Path(arg).name for arg in args if arg.endswith(".so")] == ["redisearch.so", "rejson.so"]
    [claim] = redis["spec"]["volumeClaimTemplates"]
    assert {"name": "data", "mountPath": "/data"} in item["volumeMounts"] and claim["metadata"]["name"] == "data"
    service = find(default_manifests, "Service", "lmcluster-redis")
    assert redis["spec"]["serviceName"] == "lmcluster-redis" and service["spec"]["ports"][0]["port"] == 6379


def test_every_metrics_port_has_a_service_monitor(default_manifests: list[Manifest]) -> None:
    monitors = [doc for doc in default_manifests if doc["kind"] == "ServiceMonitor"]
    scraped = set()
    for monitor in monitors:
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        selector = monitor["spec"]["selector"]["matchLabels"]
        services = [d for d in default_manifests if d["kind"] == "Service" and selector.items() <= d["metadata"]["labels"].items()]
        assert len(services) == 1, monitor["metadata"]["name"]
        port_names = {p["name"]: p["port"] for p in services[0]["spec"]["ports"]}
        for endpoint in monitor["spec"]["endpoints"]:
            labels = {r["targetLabel"]: r["replacement"] for r in endpoint["relabelings"]}
            scraped.add((labels["job"], labels["service"], port_names[endpoint["port"]], endpoint["path"]))
    # The job and service labels deploy/prometheus's alerts and the dashboard select on.
    expected = {("lmcluster", name, port, "/metrics") for name, port in METRICS.items()}
    assert scraped == expected | {("envoy", "envoy", 9901, "/stats/prometheus")}


def test_alerts_and_dashboard_are_the_repository_files(default_manifests: list[Manifest], all_options_manifests: list[Manifest]) -> None:
    alerts_file = REPO_ROOT / "deploy" / "prometheus" / "alerts.yml"
    rule = find(default_manifests, "PrometheusRule", "lmcluster-alerts")
    assert rule["spec"] == yaml.safe_load(alerts_file.read_text())
    as_config_map = find(all_options_manifests, "ConfigMap", "lmcluster-alerts")
    assert as_config_map["data"]["alerts.yml"] == alerts_file.read_text()
    dashboard = find(default_manifests, "ConfigMap", "lmcluster-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["data"]["lmcluster.json"] == (REPO_ROOT / "deploy" / "grafana" / "dashboards" / "lmcluster.json").read_text()


def test_digests_pin_images_by_content(all_options_manifests: list[Manifest]) -> None:
    for workload, item in _containers(all_options_manifests):
        assert "@sha256:" in item["image"], item["name"]
        assert not any(key.startswith("checkov.io/skip-digest") for key in workload["metadata"].get("annotations", {}))
    supervisor = container(find(all_options_manifests, "DaemonSet", "lmcluster-node"), "supervisor")
    assert supervisor["image"].startswith("registry.example.com/ml/lmcluster-supervisor:0.1.0@sha256:2222")

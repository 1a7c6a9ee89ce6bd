"""deploy/docker-compose.yml and its images, checked without a Docker engine (none runs here).

The compose file is read with PyYAML (anchors and merge keys as Compose resolves them) and its
`${VAR:-default}` values taken at their defaults. It must run the product PRODUCT.md describes:
Envoy, the five services, Redis Stack, Jaeger, Prometheus and Grafana; gRPC ports 50051-50055, the
public API on 8080, Redis on 6379, traces over OTLP/gRPC to Jaeger's 4317; health checks, restart
policies, resource limits, the models folder read-only; every variable a setting the service really
reads; a CPU or CUDA llama-server. Its helper scripts are run for real: the Envoy entrypoint renders
a configuration Envoy accepts, the health check asks a real gRPC health service.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from pydantic import AliasChoices
from pydantic_settings import BaseSettings

from services.cache.settings import CacheSettings
from services.common.binaries import PartsSettings
from services.common.telemetry import TelemetrySettings, TraceContentSettings
from services.embedding.settings import EmbeddingSettings
from services.registry.settings import RegistrySettings
from services.router.settings import RouterSettings
from services.supervisor.settings import SupervisorSettings
from tests.fixtures.parts import REPO_ROOT, envoy_argv, free_port
from tests.gateway.fake_router import FakeRouter

DEPLOY = REPO_ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
CUDA_OVERRIDE = DEPLOY / "docker-compose.cuda.yml"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"

# PRODUCT.md's defaults.
GRPC_PORTS = {"router": 50051, "embedding": 50052, "cache": 50053, "supervisor": 50054, "registry": 50055}
HTTP_PORT, ENVOY_ADMIN_PORT, REDIS_PORT, OTLP_GRPC_PORT = 8080, 9901, 6379, 4317
SETTINGS: dict[str, type[BaseSettings]] = {
    "router": RouterSettings,
    "embedding": EmbeddingSettings,
    "cache": CacheSettings,
    "supervisor": SupervisorSettings,
    "registry": RegistrySettings,
}
SERVICES = set(GRPC_PORTS)
ALL = SERVICES | {"envoy", "redis", "jaeger", "prometheus", "grafana"}


def _interpolate(value: Any) -> Any:
    """Compose's `${VAR:-default}` / `${VAR-default}` / `${VAR}` with nothing set: the defaults."""
    if isinstance(value, str):
        value = re.sub(r"\$\{(\w+)(?::?-([^}]*))?\}", lambda m: m.group(2) or "", value)
        return value.replace("$$", "$")
    if isinstance(value, list):
        return [_interpolate(item) for item in value]
    if isinstance(value, dict):
        return {key: _interpolate(item) for key, item in value.items()}
    return value


def _load(path: Path) -> dict[str, Any]:
    document = yaml.safe_load(path.read_text())
    assert isinstance(document, dict)
    return _interpolate(document)  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return _load(COMPOSE)


def _env(service: dict[str, Any]) -> dict[str, str]:
    environment = service.get("environment", {})
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    return {key: "" if value is None else str(value) for key, value in environment.items()}


def _ports(service: dict[str, Any]) -> dict[int, str]:
    """Published container port -> host address:port."""
    published = {}
    for entry in service.get("ports", []):
        parts = str(entry).split(":")
        published[int(parts[-1])] = ":".join(parts[:-1])
    return published


def _env_names(settings: type[BaseSettings]) -> set[str]:
    """Every variable a settings class reads."""
    prefix = str(settings.model_config.get("env_prefix", ""))
    names = set()
    for name, field in settings.model_fields.items():
        alias = field.validation_alias
        if alias is None:
            names.add((prefix + name).upper())
        elif isinstance(alias, str):
            names.add(alias.upper())
        elif isinstance(alias, AliasChoices):
            names.update(choice.upper() for choice in alias.choices if isinstance(choice, str))
    return names


def _entrypoint() -> ModuleType:
    """deploy/docker/envoy_entrypoint.py as a module (it is a script in the image)."""
    name = "lmc_envoy_entrypoint"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, DEPLOY / "docker" / "envoy_entrypoint.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # pydantic resolves the settings' annotations through it
        spec.loader.exec_module(module)
    return sys.modules[name]


def test_the_product_and_its_observability_run(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == ALL
    for name, service in compose["services"].items():
        assert service.get("restart") in ("unless-stopped", "always"), f"{name} has no restart policy"
        limits = service.get("deploy", {}).get("resources", {}).get("limits", {})
        assert limits.get("cpus") and limits.get("memory"), f"{name} has no resource limits"
        if name != "jaeger":  # its image has no tool to run a check with (documented in the file)
            test = service.get("healthcheck", {}).get("test")
            assert test and test[0] in ("CMD", "CMD-SHELL"), f"{name} has no health check"


def test_ports_match_the_product(compose: dict[str, Any]) -> None:
    services = compose["services"]
    envoy = services["envoy"]
    assert _ports(envoy) == {HTTP_PORT: str(HTTP_PORT)}  # the public API; admin stays inside
    assert _env(envoy)["LMC_HTTP_PORT"] == str(HTTP_PORT)
    assert _env(envoy)["LMC_ENVOY_ADMIN_PORT"] == str(ENVOY_ADMIN_PORT)
    assert _env(envoy)["LMC_ROUTER_ADDRESS"] == f"router:{GRPC_PORTS['router']}"
    assert "LMC_API_KEYS" in _env(envoy)
    for name, port in GRPC_PORTS.items():
        service, env = services[name], _env(services[name])
        assert env[f"LMC_{name.upper()}_PORT"] == str(port)
        assert env[f"LMC_{name.upper()}_HOST"] == "0.0.0.0"
        assert str(port) in service["expose"]
        assert service["healthcheck"]["test"][-1] == f"127.0.0.1:{port}"
        assert not _ports(service), f"{name} must not be published; Envoy is the way in"
    # UIs are published on loopback only.
    for name, port in (("jaeger", 16686), ("prometheus", 9090), ("grafana", 3000)):
        assert _ports(services[name]) == {port: f"127.0.0.1:{port}"}


def test_services_find_each_other_by_name(compose: dict[str, Any]) -> None:
    services = compose["services"]
    router = _env(services["router"])
    for peer in ("registry", "supervisor", "embedding", "cache"):
        assert router[f"LMC_ROUTER_{peer.upper()}_ADDRESS"] == f"{peer}:{GRPC_PORTS[peer]}"
        assert peer in services["router"]["depends_on"]
    assert _env(services["supervisor"])["LMC_REGISTRY_ADDRESS"] == f"registry:{GRPC_PORTS['registry']}"
    assert _env(services["cache"])["REDIS_URL"] == f"redis://redis:{REDIS_PORT}"
    assert str(REDIS_PORT) in services["redis"]["expose"]
    assert services["redis"]["image"].startswith("redis/redis-stack-server:7.4")
    # llama-server backends are reachable as supervisor:PORT by the Router and Prometheus.
    supervisor = _env(services["supervisor"])
    assert services["supervisor"]["hostname"] == supervisor["LMC_SUPERVISOR_BACKEND_HOST"] == "supervisor"
    first, last = supervisor["LMC_SUPERVISOR_PORT_RANGE_START"], supervisor["LMC_SUPERVISOR_PORT_RANGE_END"]
    assert f"{first}-{last}" in services["supervisor"]["expose"]


def test_defaults_match_the_product(compose: dict[str, Any]) -> None:
    cache = _env(compose["services"]["cache"])
    assert float(cache["LMC_CACHE_THRESHOLD"]) == CacheSettings.model_fields["threshold"].default == 0.95
    assert int(cache["LMC_CACHE_TTL"]) == CacheSettings.model_fields["ttl"].default == 3600
    for name in ("router", "embedding", "cache"):
        port = _env(compose["services"][name])[f"LMC_{name.upper()}_METRICS_PORT"]
        assert int(port) == SETTINGS[name].model_fields["metrics_port"].default


def test_traces_go_to_jaeger_over_otlp_grpc(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in SERVICES | {"envoy"}:
        env = _env(services[name])
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == f"http://jaeger:{OTLP_GRPC_PORT}", name
        assert "OTEL_SERVICE_NAME" not in env, f"{name}: each service names itself (lmcluster-{name})"
        assert env.get("LMC_TRACE_PROMPTS", "false") == "false"
    jaeger = services["jaeger"]
    assert jaeger["image"].startswith("jaegertracing/all-in-one:")
    assert _env(jaeger)["COLLECTOR_OTLP_ENABLED"] == "true"
    assert str(OTLP_GRPC_PORT) in jaeger["expose"]


def test_every_variable_is_a_setting_the_service_reads(compose: dict[str, Any]) -> None:
    shared = _env_names(TelemetrySettings) | _env_names(TraceContentSettings) | _env_names(PartsSettings)
    envoy_settings = _entrypoint().EnvoyContainerSettings
    readers = {**SETTINGS, "envoy": envoy_settings}
    for name, settings in readers.items():
        known = _env_names(settings) | shared
        for variable in _env(compose["services"][name]):
            assert variable in known, f"{name}: {variable} is read by nothing ({settings.__name__})"


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_every_value_is_one_the_service_accepts(name: str, compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in list(os.environ):
        if variable.startswith(("LMC_", "OTEL_", "REDIS_URL")):
            monkeypatch.delenv(variable)
    for variable, value in _env(compose["services"][name]).items():
        monkeypatch.setenv(variable, value)
    settings = SETTINGS[name]()  # raises on a value the service would refuse at start
    assert settings.host == "0.0.0.0" and settings.port == GRPC_PORTS[name]  # type: ignore[attr-defined]
    assert TelemetrySettings().enabled


def test_models_are_mounted_read_only(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in ("registry", "supervisor"):
        mounts = [m for m in services[name]["volumes"] if isinstance(m, dict) and m.get("target") == "/models"]
        assert len(mounts) == 1 and mounts[0]["read_only"] is True, name
    assert _env(services["registry"])["LMC_MODELS_DIR"] == "/models"
    for name in SERVICES - {"registry", "supervisor"}:
        assert not services[name].get("volumes"), f"{name} needs no models"
    for name in SERVICES | {"envoy"}:
        assert services[name]["read_only"] is True and "/tmp" in services[name]["tmpfs"]


def test_prometheus_and_grafana_are_wired(compose: dict[str, Any]) -> None:
    services = compose["services"]
    prometheus_config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in prometheus_config["scrape_configs"]}
    targets = {
        group["labels"]["service"]: group["targets"][0] for group in jobs["lmcluster"]["static_configs"]
    }
    for name in SERVICES:
        port = _env(services[name])[f"LMC_{name.upper()}_METRICS_PORT"]
        assert targets[name] == f"{name}:{port}"
        assert port in services[name]["expose"]
    assert jobs["envoy"]["metrics_path"] == "/stats/prometheus"
    assert jobs["envoy"]["static_configs"][0]["targets"] == [f"envoy:{ENVOY_ADMIN_PORT}"]
    # The Supervisor writes the llama-server targets where Prometheus reads them.
    targets_file = Path(_env(services["supervisor"])["LMC_SUPERVISOR_SCRAPE_TARGETS_FILE"])
    supervisor_volume = next(v for v in services["supervisor"]["volumes"] if isinstance(v, str) and v.endswith(":/targets"))
    volume = supervisor_volume.split(":")[0]
    assert targets_file.parent == Path("/targets")
    mounted = next(v for v in services["prometheus"]["volumes"] if v.startswith(f"{volume}:"))
    prometheus_dir = mounted.split(":")[1]
    sd_files = jobs["llama-server"]["file_sd_configs"][0]["files"]
    assert sd_files == [f"{prometheus_dir}/*.json"]
    assert volume in compose["volumes"]
    # Configuration files mounted from the repository exist.
    for name in ("prometheus", "grafana"):
        for mount in services[name]["volumes"]:
            source = mount.split(":")[0]
            if source.startswith("./"):
                assert (DEPLOY / source).exists(), f"{name} mounts {source}, which does not exist"
    assert "/etc/prometheus/alerts.yml" in prometheus_config["rule_files"]


def test_llama_server_image_is_cpu_or_cuda(compose: dict[str, Any]) -> None:
    supervisor = compose["services"]["supervisor"]
    assert supervisor["build"]["target"] == "supervisor"
    assert supervisor["build"]["args"]["LLAMA_SERVER_IMAGE"] == "ghcr.io/ggml-org/llama.cpp:server"
    cuda = _load(CUDA_OVERRIDE)["services"]["supervisor"]
    devices = cuda["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]
    assert _env(cuda)["LMC_SUPERVISOR_GPU_LAYERS"] == "all"
    assert "LMC_SUPERVISOR_GPU_LAYERS" in _env_names(SupervisorSettings)
    dockerfile = DOCKERFILE.read_text()
    assert "ARG LLAMA_SERVER_IMAGE=ghcr.io/ggml-org/llama.cpp:server" in dockerfile
    assert "FROM ${LLAMA_SERVER_IMAGE} AS supervisor" in dockerfile


def test_images_build_from_files_that_exist(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        build = service.get("build")
        if build is None:
            assert ":" in service["image"] and not service["image"].endswith(":latest"), f"{name}: pin the image"
            continue
        context = (COMPOSE.parent / build["context"]).resolve()
        assert context == REPO_ROOT
        assert (context / build["dockerfile"]).is_file()
        assert f" AS {build['target']}" in DOCKERFILE.read_text()
    # Every COPY from the build context names something the repository has.
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            for source in line.split()[1:-1]:
                assert (REPO_ROOT / source).exists(), f"the Dockerfile copies {source}, which does not exist"


def test_envoy_entrypoint_renders_a_configuration_envoy_accepts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, compose: dict[str, Any]) -> None:
    for variable, value in _env(compose["services"]["envoy"]).items():
        monkeypatch.setenv(variable, value)
    monkeypatch.setenv("LMC_API_KEYS", "sk-one,sk-two")
    out = tmp_path / "envoy.yaml"
    assert _entrypoint().main(["--render-only", str(out)]) == 0
    config = yaml.safe_load(out.read_text())
    clusters = {cluster["name"]: cluster for cluster in config["static_resources"]["clusters"]}
    router = clusters["router"]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
    assert router["socket_address"] == {"address": "router", "port_value": 50051}
    assert clusters["router"]["type"] == "STRICT_DNS"
    collector = clusters["opentelemetry_collector"]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
    assert collector["endpoint"]["address"]["socket_address"] == {"address": "jaeger", "port_value": 4317}
    assert config["admin"]["address"]["socket_address"] == {"address": "0.0.0.0", "port_value": 9901}
    listener = config["static_resources"]["listeners"][0]["address"]["socket_address"]
    assert listener == {"address": "0.0.0.0", "port_value": 8080}
    assert "envoy.filters.http.api_key_auth" in out.read_text()
    result = subprocess.run([*envoy_argv(out), "--mode", "validate"], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]


def test_healthcheck_script_asks_real_health_services() -> None:
    script = str(DEPLOY / "docker" / "healthcheck.py")
    router = FakeRouter()
    router.start()
    try:
        serving = subprocess.run([sys.executable, script, "grpc", f"127.0.0.1:{router.port}"], timeout=30, check=False)
        named = subprocess.run(
            [sys.executable, script, "grpc", f"127.0.0.1:{router.port}", "lmcluster.router.v1.RouterService"],
            timeout=30, check=False,
        )  # fmt: skip
    finally:
        router.stop()
    closed = subprocess.run(
        [sys.executable, script, "grpc", f"127.0.0.1:{free_port()}"], capture_output=True, timeout=30, check=False
    )
    assert (serving.returncode, named.returncode, closed.returncode) == (0, 0, 1)
    http = subprocess.run([sys.executable, script, "http", f"http://127.0.0.1:{free_port()}/readyz"], capture_output=True, timeout=30, check=False)
    assert http.returncode == 1

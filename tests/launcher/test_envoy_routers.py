"""Envoy in front of several Routers: one endpoint each, balanced by least requests, retries that
prefer another Router; every rendering accepted by the real Envoy (`--mode validate`)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from services.launcher.envoy_config import render_envoy_config
from tests.fixtures.parts import DESCRIPTOR_SET, ENVOY_TEMPLATE, REPO_ROOT, envoy_argv

HEADLESS = "router.lmcluster.svc.cluster.local:50051"


def validate(config: Path) -> None:
    result = subprocess.run(
        envoy_argv(config, "--mode", "validate"), capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, f"envoy rejects {config}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"


def rendered(tmp_path: Path, router_address: Any) -> Path:
    return render_envoy_config(
        ENVOY_TEMPLATE,
        tmp_path / "envoy.yaml",
        http_port=18080,
        admin_port=19901,
        router_address=router_address,
        descriptor_set=DESCRIPTOR_SET,
    )


def render(tmp_path: Path, router_address: Any) -> dict[str, Any]:
    """The configuration for `router_address`, once the real Envoy accepted it."""
    out = rendered(tmp_path, router_address)
    validate(out)
    config: dict[str, Any] = yaml.safe_load(out.read_text())
    return config


def router_cluster(config: dict[str, Any]) -> dict[str, Any]:
    (cluster,) = [c for c in config["static_resources"]["clusters"] if c["name"] == "router"]
    return cluster


def endpoints(cluster: dict[str, Any]) -> list[str]:
    addresses = []
    for lb_endpoint in cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]:
        socket_address = lb_endpoint["endpoint"]["address"]["socket_address"]
        addresses.append(f"{socket_address['address']}:{socket_address['port_value']}")
    return addresses


@pytest.mark.parametrize(
    ("router_address", "kind", "expected"),
    [
        ("127.0.0.1:50051", "STATIC", ["127.0.0.1:50051"]),
        (["127.0.0.1:50051", "127.0.0.1:50061"], "STATIC", ["127.0.0.1:50051", "127.0.0.1:50061"]),
        ("127.0.0.2:50051, 127.0.0.3:50051", "STATIC", ["127.0.0.2:50051", "127.0.0.3:50051"]),
        (HEADLESS, "STRICT_DNS", [HEADLESS]),
        (["127.0.0.1:50051", HEADLESS], "STRICT_DNS", ["127.0.0.1:50051", HEADLESS]),
    ],
    ids=["one", "two", "comma-separated", "dns-name", "ip-and-name"],
)
def test_one_endpoint_per_router_accepted_by_envoy(
    tmp_path: Path, router_address: Any, kind: str, expected: list[str]
) -> None:
    cluster = router_cluster(render(tmp_path, router_address))
    assert cluster["type"] == kind
    assert endpoints(cluster) == expected
    # What the template says about each Router stays: gRPC health checks and HTTP/2.
    assert cluster["health_checks"][0]["grpc_health_check"]["service_name"] == "lmcluster.router.v1.RouterService"
    assert "http2_protocol_options" in str(cluster["typed_extension_protocol_options"])


def test_long_generations_are_balanced_by_least_requests_and_retries_prefer_another_router(tmp_path: Path) -> None:
    config = render(tmp_path, ["127.0.0.1:50051", "127.0.0.1:50061"])
    assert router_cluster(config)["lb_policy"] == "LEAST_REQUEST"
    listener = config["static_resources"]["listeners"][0]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    (virtual_host,) = hcm["route_config"]["virtual_hosts"]
    retry = virtual_host["retry_policy"]
    # The retry policy as before: only requests no Router has seen.
    assert retry["retry_on"] == "connect-failure,refused-stream,reset-before-request,reset"
    assert retry["num_retries"] == 25
    assert [p["name"] for p in retry["retry_host_predicate"]] == ["envoy.retry_host_predicates.previous_hosts"]
    assert retry["host_selection_retry_max_attempts"] >= 3


@pytest.mark.parametrize("router_address", ["", " , ", [], ["127.0.0.1"], "127.0.0.1:50051,router"])
def test_a_router_list_without_a_port_or_any_address_is_refused(tmp_path: Path, router_address: Any) -> None:
    with pytest.raises(ValueError):
        rendered(tmp_path, router_address)


def entrypoint() -> ModuleType:
    """deploy/docker/envoy_entrypoint.py as a module (it is a script in the image)."""
    name = "lmc_envoy_entrypoint"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "deploy" / "docker" / "envoy_entrypoint.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # pydantic resolves the settings' annotations through it
        spec.loader.exec_module(module)
    return sys.modules[name]


def test_the_container_takes_a_comma_separated_router_list(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMC_ROUTER_ADDRESS", "router-0.router:50051,router-1.router:50051")
    out = tmp_path / "envoy.yaml"
    assert entrypoint().main(["--render-only", str(out)]) == 0
    validate(out)
    cluster = router_cluster(yaml.safe_load(out.read_text()))
    assert cluster["type"] == "STRICT_DNS"
    assert endpoints(cluster) == ["router-0.router:50051", "router-1.router:50051"]

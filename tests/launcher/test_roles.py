"""Which parts `lmcluster up` starts for each role, with which environment, on which ports."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError
from typer.testing import CliRunner

from services.cli.main import app
from services.launcher.process import ProcessSpec
from services.launcher.roles import build_specs, endpoints_text
from services.launcher.settings import Role, StackSettings
from tests.fixtures.parts import free_port

NODE_VARIABLES = {
    "LMC_REGISTRY_HOST",
    "LMC_SUPERVISOR_HOST",
    "LMC_SUPERVISOR_BACKEND_HOST",
    "LMC_SUPERVISOR_ADVERTISE_HOST",
    "LMC_REGISTRY_ADDRESS",
    "LMC_MODELS_DIR",
}


def settings(tmp_path: Path, **values: Any) -> StackSettings:
    # A Redis URL nobody answers on: the launcher would start its own.
    defaults: dict[str, Any] = {"run_dir": tmp_path / "run", "redis_url": f"redis://127.0.0.1:{free_port()}"}
    return StackSettings(**{**defaults, **values})


def by_name(specs: list[ProcessSpec]) -> dict[str, ProcessSpec]:
    return {spec.name: spec for spec in specs}


def router_clusters(tmp_path: Path) -> dict[str, Any]:
    config = yaml.safe_load((tmp_path / "run" / "envoy.yaml").read_text())
    return {cluster["name"]: cluster for cluster in config["static_resources"]["clusters"]}


def endpoints(cluster: dict[str, Any]) -> list[tuple[str, int]]:
    return [
        (e["endpoint"]["address"]["socket_address"]["address"], e["endpoint"]["address"]["socket_address"]["port_value"])
        for e in cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    ]


def test_all_is_the_one_host_stack_as_before(tmp_path: Path) -> None:
    specs = build_specs(settings(tmp_path))
    assert [spec.name for spec in specs] == ["redis", "registry", "supervisor", "embedding", "cache", "router", "envoy"]
    parts = by_name(specs)
    for name in ("registry", "supervisor", "embedding", "cache", "router"):
        assert parts[name].argv[-2:] == ["serve", name]
    env = parts["router"].env
    assert env["LMC_ROUTER_REGISTRY_ADDRESS"] == "127.0.0.1:50055"
    assert env["LMC_ROUTER_SUPERVISOR_ADDRESS"] == "127.0.0.1:50054"
    assert (env["LMC_ROUTER_PORT"], env["LMC_ROUTER_METRICS_PORT"]) == ("50051", "9151")
    assert "LMC_ROUTER_NODES" not in env
    # Each node service keeps its own LMC_<SERVICE>_HOST (127.0.0.1 by default), as before roles.
    assert not {"LMC_REGISTRY_HOST", "LMC_SUPERVISOR_HOST", "LMC_SUPERVISOR_BACKEND_HOST"} & set(env)
    assert parts["supervisor"].env["LMC_REGISTRY_ADDRESS"] == "127.0.0.1:50055"
    assert endpoints(router_clusters(tmp_path)["router"]) == [("127.0.0.1", 50051)]
    # A node's address from the environment does not move the parts of `all`.
    moved = by_name(build_specs(settings(tmp_path, node_host="127.0.0.5")))["supervisor"].env
    assert moved["LMC_REGISTRY_ADDRESS"] == "127.0.0.1:50055"


def test_a_node_runs_the_registry_and_the_supervisor_bound_to_its_address(tmp_path: Path) -> None:
    specs = build_specs(settings(tmp_path, role=Role.NODE, node_host="127.0.0.2", registry_port=51055))
    assert [spec.name for spec in specs] == ["registry", "supervisor"]
    for spec in specs:
        env = spec.env
        assert NODE_VARIABLES <= set(env)
        assert env["LMC_REGISTRY_HOST"] == env["LMC_SUPERVISOR_HOST"] == "127.0.0.2"
        assert env["LMC_SUPERVISOR_BACKEND_HOST"] == env["LMC_SUPERVISOR_ADVERTISE_HOST"] == "127.0.0.2"
        assert env["LMC_REGISTRY_PORT"] == "51055" and env["LMC_SUPERVISOR_PORT"] == "50054"
        assert env["LMC_REGISTRY_ADDRESS"] == "127.0.0.2:51055"
        assert "REDIS_URL" not in env and not any(name.startswith("LMC_ROUTER") for name in env)
    assert not (tmp_path / "run" / "envoy.yaml").exists()


def test_a_node_on_every_interface_advertises_what_it_is_told(tmp_path: Path) -> None:
    node = settings(tmp_path, role=Role.NODE, node_host="0.0.0.0", node_advertise_host="127.0.0.9")
    env = build_specs(node)[1].env
    assert env["LMC_SUPERVISOR_BACKEND_HOST"] == "0.0.0.0"
    assert env["LMC_SUPERVISOR_ADVERTISE_HOST"] == "127.0.0.9"
    # What this host itself dials (the Registry, readiness probes) is loopback, not the wildcard.
    assert env["LMC_REGISTRY_ADDRESS"] == "127.0.0.1:50055"
    text = endpoints_text(node)
    assert "0.0.0.0:50055" in text and "--nodes 127.0.0.9" in text


def test_a_gateway_runs_n_routers_following_the_nodes_behind_one_envoy(tmp_path: Path) -> None:
    gateway = settings(
        tmp_path, role=Role.GATEWAY, nodes=" 127.0.0.2, 127.0.0.3 ,", routers=3, registry_port=51055
    )
    specs = build_specs(gateway)
    assert [spec.name for spec in specs] == ["redis", "embedding", "cache", "router", "router-2", "router-3", "envoy"]
    routers = [spec for spec in specs if spec.name.startswith("router")]
    ports = [(spec.env["LMC_ROUTER_PORT"], spec.env["LMC_ROUTER_METRICS_PORT"]) for spec in routers]
    assert ports == [("50051", "9151"), ("50061", "9161"), ("50071", "9171")]
    for spec in routers:
        assert spec.argv[-2:] == ["serve", "router"]
        assert spec.env["LMC_ROUTER_NODES"] == "127.0.0.2,127.0.0.3"
        assert spec.env["LMC_ROUTER_NODE_REGISTRY_PORT"] == "51055"
        assert spec.env["LMC_ROUTER_NODE_SUPERVISOR_PORT"] == "50054"
        assert not NODE_VARIABLES & set(spec.env)
    cluster = router_clusters(tmp_path)["router"]
    assert cluster["type"] == "STATIC" and cluster["lb_policy"] == "LEAST_REQUEST"
    assert endpoints(cluster) == [("127.0.0.1", 50051), ("127.0.0.1", 50061), ("127.0.0.1", 50071)]
    assert "127.0.0.2, 127.0.0.3" in endpoints_text(gateway)


def test_a_gateway_may_follow_a_dns_name(tmp_path: Path) -> None:
    name = "lmcluster-node.ns.svc.cluster.local"
    router = by_name(build_specs(settings(tmp_path, role=Role.GATEWAY, nodes=name)))["router"]
    assert router.env["LMC_ROUTER_NODES"] == name


def test_all_with_several_routers(tmp_path: Path) -> None:
    specs = build_specs(settings(tmp_path, routers=2, router_metrics_port=0))
    assert [spec.name for spec in specs][-3:] == ["router", "router-2", "envoy"]
    second = by_name(specs)["router-2"].env
    assert second["LMC_ROUTER_PORT"] == "50061" and second["LMC_ROUTER_METRICS_PORT"] == "0"
    assert second["LMC_ROUTER_REGISTRY_ADDRESS"] == "127.0.0.1:50055"
    assert endpoints(router_clusters(tmp_path)["router"]) == [("127.0.0.1", 50051), ("127.0.0.1", 50061)]


def test_the_environment_chooses_the_role(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {"LMC_ROLE": "gateway", "LMC_NODES": "127.0.0.4", "LMC_ROUTERS": "2"}.items():
        monkeypatch.setenv(name, value)
    read = settings(tmp_path)
    assert (read.role, read.node_list, read.routers) == (Role.GATEWAY, ["127.0.0.4"], 2)
    monkeypatch.setenv("LMC_SUPERVISOR_ADVERTISE_HOST", "127.0.0.5")
    assert settings(tmp_path, role=Role.NODE).node_advertise_host == "127.0.0.5"


def test_a_gateway_without_nodes_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="--nodes"):
        settings(tmp_path, role=Role.GATEWAY, nodes=" , ")


def test_up_without_nodes_exits_2_with_a_clear_message() -> None:
    result = CliRunner().invoke(app, ["up", "--role", "gateway"])
    assert result.exit_code == 2, result.output
    assert "--role gateway needs the inference nodes it routes to: --nodes" in result.output


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["--role", "node", "--host", "node-1"], "is not an IP address"),
        (["--host", "127.0.0.2"], "--host and --advertise-host are for --role node"),
        (["--role", "gateway", "--nodes", "127.0.0.2", "--advertise-host", "127.0.0.2"], "are for --role node"),
        (["--role", "bogus"], "role: Input should be 'all', 'node' or 'gateway'"),
        (["--routers", "0"], "--routers"),
    ],
)
def test_up_refuses_flags_that_do_not_fit(argv: list[str], said: str) -> None:
    result = CliRunner().invoke(app, ["up", *argv])
    assert result.exit_code == 2 and said in result.output, result.output


def test_routers_past_the_last_port_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="beyond 65535"):
        settings(tmp_path, router_port=65500, routers=5)

"""`lmcluster up --role node --host 127.0.0.2`: an inference node on a loopback alias, as one host
of a cluster simulated on this machine. Its Registry and Supervisor answer on that address only,
and its backend is advertised, and answers, there."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import grpc
import httpx
from lmcluster.registry.v1 import registry_pb2, registry_service_pb2, registry_service_pb2_grpc
from lmcluster.supervisor.v1 import supervisor_pb2, supervisor_service_pb2, supervisor_service_pb2_grpc

from services.supervisor.ports import port_is_free
from tests.fixtures.parts import REPO_ROOT, running_part
from tests.fixtures.stack import (
    DEMO_MODEL_ID,
    STACK_START_TIMEOUT,
    STACK_STOP_GRACE,
    TEST_DEFAULTS,
    backend_port_range,
    link_demo_model,
)

NODE = "127.0.0.2"


def free_port_on(host: str) -> int:
    """A port nothing listens on at `host` right now (the kernel's pick for port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def ready_models(registry: str) -> list[registry_pb2.Model]:
    with grpc.insecure_channel(registry) as channel:
        reply = registry_service_pb2_grpc.RegistryServiceStub(channel).ListModels(
            registry_service_pb2.ListModelsRequest(), timeout=5.0
        )
    return [model for model in reply.models if model.state == registry_pb2.MODEL_STATE_READY]


def ready_backends(supervisor: str) -> list[supervisor_pb2.Backend]:
    with grpc.insecure_channel(supervisor) as channel:
        reply = supervisor_service_pb2_grpc.SupervisorServiceStub(channel).ListBackends(
            supervisor_service_pb2.ListBackendsRequest(), timeout=5.0
        )
    return [backend for backend in reply.backends if backend.state == supervisor_pb2.BACKEND_STATE_READY]


def test_a_node_serves_its_models_on_its_own_address(tmp_path: Path, demo_model: Path) -> None:
    models = tmp_path / "models"
    link_demo_model(models, demo_model)
    ports = {name: free_port_on(NODE) for name in ("registry", "supervisor", "registry_metrics", "supervisor_metrics")}
    launcher_metrics = free_port_on(NODE)
    first, last = backend_port_range()
    targets = tmp_path / "run" / "llama-servers.json"
    env = {
        **TEST_DEFAULTS,
        "LMC_REGISTRY_PORT": str(ports["registry"]),
        "LMC_SUPERVISOR_PORT": str(ports["supervisor"]),
        "LMC_REGISTRY_METRICS_PORT": str(ports["registry_metrics"]),
        "LMC_SUPERVISOR_METRICS_PORT": str(ports["supervisor_metrics"]),
        "LMC_LAUNCHER_METRICS_PORT": str(launcher_metrics),
        "LMC_SUPERVISOR_PORT_RANGE_START": str(first),
        "LMC_SUPERVISOR_PORT_RANGE_END": str(last),
        "LMC_SUPERVISOR_SCRAPE_TARGETS_FILE": str(targets),
        "LMC_MODELS_DIR": str(models),
        "LMC_RUN_DIR": str(tmp_path / "run"),
        "PYTHONUNBUFFERED": "1",
    }
    registry, supervisor = f"{NODE}:{ports['registry']}", f"{NODE}:{ports['supervisor']}"
    argv = [sys.executable, "-m", "services.cli.main", "up", "--role", "node", "--host", NODE]
    with running_part("node", argv, tmp_path, env=env, cwd=REPO_ROOT, stop_grace=STACK_STOP_GRACE) as node:
        node.wait_until(lambda: "lmcluster node is up" in node.log_path.read_text(), STACK_START_TIMEOUT, "node up")
        node.wait_until(lambda: bool(ready_backends(supervisor)), 60, "a READY backend")

        assert [model.id for model in ready_models(registry)] == [DEMO_MODEL_ID]
        (backend,) = ready_backends(supervisor)
        port = int(backend.endpoint.rsplit(":", 1)[1])
        assert backend.endpoint == f"http://{NODE}:{port}"
        assert backend.metrics_url == f"http://{NODE}:{port}/metrics"
        assert first <= port <= last
        assert httpx.get(f"{backend.endpoint}/health", timeout=5.0).status_code == 200
        assert f'"{NODE}:{port}"' in targets.read_text()
        # Bound to the node's address only: the same ports on 127.0.0.1 belong to nobody.
        for taken in (ports["registry"], ports["supervisor"], port, launcher_metrics, ports["supervisor_metrics"]):
            assert port_is_free("127.0.0.1", taken), taken
            assert not port_is_free(NODE, taken), taken
        assert httpx.get(f"http://{NODE}:{launcher_metrics}/metrics", timeout=5.0).status_code == 200
        log = node.log_path.read_text()
        assert "registry ready" in log and "supervisor ready" in log
        # A node runs nothing of the gateway.
        for part in ("redis", "embedding", "cache", "router", "envoy"):
            assert f"{part} ready" not in log, part

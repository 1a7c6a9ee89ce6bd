"""A cluster on one machine: two inference nodes on loopback aliases and a gateway with two Routers.

Node A binds 127.0.0.2 and node B 127.0.0.3, each `lmcluster up --role node` with its own models
folder, run folder and process group, on the same port numbers (as two hosts would be). The
gateway is `lmcluster up --role gateway --nodes 127.0.0.2,127.0.0.3 --routers 2` on 127.0.0.1: Envoy,
two Routers, Embedding, Cache, and the session's Redis Stack. Every address is in 127.0.0.0/8.

Both nodes hold the demo model (real copies: the rolling swap replaces them); node B also holds a
second model that node A does not have.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
import pytest
from lmcluster.supervisor.v1 import supervisor_pb2, supervisor_service_pb2, supervisor_service_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from services.supervisor.ports import port_is_free
from tests.fixtures.parts import REPO_ROOT, RunningPart, descendants, free_port, running_part
from tests.fixtures.stack import (
    DEMO_FILE,
    DEMO_MODEL_ID,
    DEMO_PUBLISHER,
    DEMO_REPO,
    STACK_START_TIMEOUT,
    STACK_STOP_GRACE,
    TEST_DEFAULTS,
    backend_port_range,
)

NODE_A, NODE_B = "127.0.0.2", "127.0.0.3"
ONLY_ON_B_PUBLISHER, ONLY_ON_B_REPO = "lmcluster-test", "Only-On-Node-B-GGUF"
ONLY_ON_B_MODEL_ID = f"{ONLY_ON_B_PUBLISHER}/{ONLY_ON_B_REPO}/{DEMO_FILE.removesuffix('.gguf')}"
ROUTER_PORT_STEP = 10  # Router i listens on the first Router's port + 10 * i

NODE_ENV = {
    **TEST_DEFAULTS,
    # Three llama-servers share two cores with everything else.
    "LMC_SUPERVISOR_THREADS": "1",
    "LMC_RESTART_BACKOFF_INITIAL_SECONDS": "0.2",
    "LMC_CRASH_LOOP_LIMIT": "20",
}


@dataclass
class Node:
    """One inference node (`lmcluster up --role node --host HOST`); started and killed by the tests."""

    host: str
    models_dir: Path
    work_dir: Path
    registry_port: int
    supervisor_port: int
    env: dict[str, str]
    part: RunningPart | None = None
    _parts: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    _starts: int = 0

    @property
    def supervisor(self) -> str:
        return f"{self.host}:{self.supervisor_port}"

    def start(self) -> None:
        self._starts += 1
        argv = [sys.executable, "-m", "services.cli.main", "up", "--role", "node", "--host", self.host]
        self.part = self._parts.enter_context(
            running_part(
                f"node-{self.host}-{self._starts}", argv, self.work_dir, env=self.env, cwd=REPO_ROOT,
                stop_grace=STACK_STOP_GRACE,
            )
        )  # fmt: skip
        self.part.wait_until(self.settled, STACK_START_TIMEOUT, f"node {self.host}: READY backends, none starting")

    def signal_all(self, sig: signal.Signals) -> None:
        """`sig` to every process of the node, as a host failing would: the launcher's process group
        and each part's own group below it (Registry, Supervisor, llama-servers)."""
        assert self.part is not None
        launcher = self.part.process.pid
        groups = {launcher}
        for pid in descendants(launcher):
            with contextlib.suppress(ProcessLookupError):  # ended since the process table was read
                groups.add(os.getpgid(pid))
        for group in groups:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, sig)

    def kill(self) -> None:
        """SIGKILL of every process of the node."""
        assert self.part is not None
        self.signal_all(signal.SIGKILL)
        self.part.process.wait(30)

    def stop(self) -> None:
        self._parts.close()

    def backends(self) -> list[supervisor_pb2.Backend]:
        with grpc.insecure_channel(self.supervisor) as channel:
            stub = supervisor_service_pb2_grpc.SupervisorServiceStub(channel)
            return list(stub.ListBackends(supervisor_service_pb2.ListBackendsRequest(), timeout=5.0).backends)

    def ready_backends(self, model: str = "") -> list[supervisor_pb2.Backend]:
        return [
            b for b in self.backends()
            if b.state == supervisor_pb2.BACKEND_STATE_READY and (not model or b.model_id == model)
        ]  # fmt: skip

    def settled(self) -> bool:
        backends = self.backends()
        return any(b.state == supervisor_pb2.BACKEND_STATE_READY for b in backends) and not any(
            b.state == supervisor_pb2.BACKEND_STATE_STARTING for b in backends
        )

    def prompt_tokens(self, model: str = DEMO_MODEL_ID) -> float:
        """Prompt tokens its READY backends of `model` have processed (llama-server's own counter)."""
        return sum(backend_counter(b.endpoint, "llamacpp:prompt_tokens") for b in self.ready_backends(model))


@dataclass(frozen=True)
class Cluster:
    """The gateway's public entry and what the tests need to see inside."""

    http_url: str
    grpc_target: str
    router_ports: tuple[int, ...]
    router_metrics: tuple[str, ...]
    nodes: dict[str, Node]
    gateway: RunningPart

    @property
    def base_url(self) -> str:
        return f"{self.http_url}/v1"

    def log_tail(self, lines: int = 60) -> str:
        return self.gateway.log_tail(lines)


def backend_counter(endpoint: str, name: str) -> float:
    text = httpx.get(f"{endpoint}/metrics", timeout=5.0).text
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples if s.name.startswith(name))


def router_gauge(metrics_url: str, name: str, **labels: str) -> float:
    text = httpx.get(metrics_url, timeout=5.0).text
    return sum(
        s.value for family in text_string_to_metric_families(text) for s in family.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )  # fmt: skip


def _router_ports(count: int) -> list[int]:
    """A first port whose Routers' ports (+10 each) are all free."""
    for _ in range(200):
        first = free_port()
        ports = [first + ROUTER_PORT_STEP * i for i in range(count)]
        if all(port_is_free("127.0.0.1", port) for port in ports):
            return ports
    raise RuntimeError("no free ports for the Routers")


def _models_dir(root: Path, demo_model: Path, *, with_only_b: bool) -> Path:
    target = root / DEMO_PUBLISHER / DEMO_REPO / DEMO_FILE
    target.parent.mkdir(parents=True)
    shutil.copy2(demo_model, target)  # its old mtime: settled, so preloaded at boot
    if with_only_b:
        other = root / ONLY_ON_B_PUBLISHER / ONLY_ON_B_REPO / DEMO_FILE
        other.parent.mkdir(parents=True)
        other.symlink_to(demo_model.resolve())
    return root


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, demo_model: Path, redis_stack: str) -> Iterator[Cluster]:
    work = tmp_path_factory.mktemp("cluster")
    registry_port, supervisor_port = free_port(), free_port()
    first, last = backend_port_range()
    nodes: dict[str, Node] = {}
    for host, name in ((NODE_A, "a"), (NODE_B, "b")):
        node_work = work / f"node-{name}"
        backend_logs = node_work / "backends"
        backend_logs.mkdir(parents=True)
        models = _models_dir(node_work / "models", demo_model, with_only_b=host == NODE_B)
        env = {
            **NODE_ENV,
            "LMC_MODELS_DIR": str(models),
            "LMC_RUN_DIR": str(node_work / "run"),
            "LMC_REGISTRY_PORT": str(registry_port),
            "LMC_SUPERVISOR_PORT": str(supervisor_port),
            "LMC_REGISTRY_METRICS_PORT": str(free_port()),
            "LMC_SUPERVISOR_METRICS_PORT": str(free_port()),
            "LMC_LAUNCHER_METRICS_PORT": "0",
            "LMC_SUPERVISOR_PORT_RANGE_START": str(first),
            "LMC_SUPERVISOR_PORT_RANGE_END": str(last),
            "LMC_SUPERVISOR_LOG_DIR": str(backend_logs),
            "PYTHONUNBUFFERED": "1",
        }
        nodes[host] = Node(host, models, node_work, registry_port, supervisor_port, env)

    router_ports = _router_ports(2)
    router_metrics = _router_ports(2)
    http_port = free_port()
    gateway_env = {
        **TEST_DEFAULTS,
        "LMC_HTTP_PORT": str(http_port),
        "LMC_ENVOY_ADMIN_PORT": str(free_port()),
        "LMC_ROUTER_PORT": str(router_ports[0]),
        "LMC_ROUTER_METRICS_PORT": str(router_metrics[0]),
        "LMC_EMBEDDING_PORT": str(free_port()),
        "LMC_EMBEDDING_METRICS_PORT": str(free_port()),
        "LMC_CACHE_PORT": str(free_port()),
        "LMC_CACHE_METRICS_PORT": str(free_port()),
        "LMC_REGISTRY_PORT": str(registry_port),
        "LMC_SUPERVISOR_PORT": str(supervisor_port),
        "LMC_LAUNCHER_METRICS_PORT": "0",
        "LMC_RUN_DIR": str(work / "gateway" / "run"),
        "REDIS_URL": redis_stack,
        "LMC_CACHE_INDEX_PREFIX": f"lmc:test:cluster:{random.randrange(1 << 30):x}",
        "LMC_RESTART_BACKOFF_INITIAL_SECONDS": "0.2",
        "LMC_CRASH_LOOP_LIMIT": "20",
        "PYTHONUNBUFFERED": "1",
    }
    argv = [
        sys.executable, "-m", "services.cli.main", "up", "--role", "gateway",
        "--nodes", f"{NODE_A},{NODE_B}", "--routers", "2",
    ]  # fmt: skip
    try:
        for node in nodes.values():
            node.start()
        with running_part(
            "gateway", argv, work / "gateway", env=gateway_env, cwd=REPO_ROOT, stop_grace=STACK_STOP_GRACE
        ) as gateway:
            http_url = f"http://127.0.0.1:{http_port}"
            gateway.wait_until(
                lambda: httpx.get(f"{http_url}/readyz", timeout=2.0).status_code == 200,
                STACK_START_TIMEOUT, "Envoy /readyz 200",
            )  # fmt: skip
            cluster = Cluster(
                http_url=http_url,
                grpc_target=f"127.0.0.1:{http_port}",
                router_ports=tuple(router_ports),
                router_metrics=tuple(f"http://127.0.0.1:{port}/metrics" for port in router_metrics),
                nodes=nodes,
                gateway=gateway,
            )
            gateway.wait_until(lambda: all_nodes_followed(cluster), 60, "both Routers following both nodes")
            yield cluster
    finally:
        for node in nodes.values():
            node.stop()


def all_nodes_followed(cluster: Cluster, count: int = 2) -> bool:
    return all(router_gauge(url, "lmc_router_nodes", state="reachable") == count for url in cluster.router_metrics)


def wait_for(probe: object, what: str, timeout: float = 180.0) -> float:
    """Polls `probe()` (exceptions count as false); the seconds it took. A bound, never a target."""
    started = time.monotonic()
    while True:
        with contextlib.suppress(Exception):
            if probe():  # type: ignore[operator]
                return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise AssertionError(f"no {what} within {timeout:.0f} s")
        time.sleep(0.2)

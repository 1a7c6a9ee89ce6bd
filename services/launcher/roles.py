"""The parts `lmcluster up` runs for each role, with their environment, in start order.

- `node`: the Registry and the Supervisor (and its llama-servers) for this host's models folder,
  every one bound to `node_host`; backends advertised at `node_advertise_host` (default: the bind
  address). Nothing else: no Redis, no Envoy.
- `gateway`: Redis (unless one answers already), Embedding, Cache, `routers` Routers following the
  inference nodes in `nodes`, and Envoy balancing over the Routers.
- `all`: Redis, the node's parts, then the gateway's parts following that one local node.

Each service reads its own port and its peers' addresses from the environment (each settings.py);
every part of a role gets the same variables, a Router its own ports on top.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import sys
from urllib.parse import urlparse

from services.common import binaries
from services.common.children import niced, permitted_niceness, realtime_permitted, round_robin
from services.common.telemetry import TelemetrySettings
from services.launcher import probes
from services.launcher.envoy_config import render_envoy_config
from services.launcher.process import ProcessSpec
from services.launcher.settings import ROUTER_PORT_STEP, Role, StackSettings
from services.supervisor.ports import advertised_host, host_port, local_host

log = logging.getLogger(__name__)

# The gateway's own services always run beside Envoy, on loopback.
LOOPBACK = "127.0.0.1"


def build_specs(settings: StackSettings) -> list[ProcessSpec]:
    """The parts of `settings.role`, in start order."""
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    if settings.role is Role.NODE:
        return node_parts(settings, {**node_env(settings), **node_binding(settings)})
    niceness = request_path_niceness(settings)
    realtime = hit_path_priority(settings, niceness)
    if settings.role is Role.GATEWAY:
        env = gateway_env(settings, followed_nodes(settings))
        return at_priority([*redis_parts(settings), *gateway_parts(settings, env)], niceness, realtime)
    env = {**node_env(settings), **gateway_env(settings, local_node(settings))}
    return [
        *at_priority(redis_parts(settings), niceness, realtime),
        *node_parts(settings, env),
        *at_priority(gateway_parts(settings, env), niceness, realtime),
    ]


def request_path_niceness(settings: StackSettings) -> int:
    """The niceness of the request path's parts: a request's few milliseconds of CPU come before any
    other process of the host at normal priority (llama-server, under SCHED_IDLE, comes after both)."""
    niceness = permitted_niceness(settings.gateway_niceness)
    if niceness != settings.gateway_niceness:
        log.warning(
            "the request path runs at niceness %d, not %d (LMC_GATEWAY_NICENESS): a higher priority needs "
            "CAP_SYS_NICE or RLIMIT_NICE (docs/supervisor.md)",
            niceness, settings.gateway_niceness,
        )
    return niceness


def hit_path_priority(settings: StackSettings, niceness: int) -> int:
    """The SCHED_RR priority of the hit path's parts, 0 where none is asked for or permitted.

    Beside generating misses, niceness alone left hits waiting: a woken thread at -5 may wait for a
    time slice of a client or batch job at 0, and every hop of a hit (Envoy, the Router's gRPC and
    event-loop threads, Redis, the lookup's embedding) is such a wake-up (docs/benchmarks.md)."""
    priority = settings.gateway_realtime_priority
    if priority and not realtime_permitted(priority):
        log.warning(
            "Redis, the Routers and Envoy run at niceness %d, not under SCHED_RR %d (LMC_GATEWAY_REALTIME_PRIORITY): "
            "real-time scheduling needs CAP_SYS_NICE or RLIMIT_RTPRIO, and real-time time for the cgroup "
            "(docs/supervisor.md)",
            niceness, priority,
        )  # fmt: skip
        return 0
    return priority


def on_the_hit_path(part: ProcessSpec) -> bool:
    """A cache hit goes through Envoy and a Router to Redis; Embedding and Cache work after the answer."""
    return part.name in ("redis", "envoy") or part.name.startswith("router")


def at_priority(parts: list[ProcessSpec], niceness: int, realtime: int) -> list[ProcessSpec]:
    """Every part at `niceness`; the hit path's under SCHED_RR at `realtime` too, unless it is 0."""
    placed = []
    for part in parts:
        argv = niced(part.argv, niceness)
        if realtime and on_the_hit_path(part):
            argv = round_robin(argv, realtime)
        placed.append(dataclasses.replace(part, argv=argv))
    return placed


def service_spec(name: str, address: str, env: dict[str, str]) -> ProcessSpec:
    """A gRPC service of this project, run as `lmcluster serve SERVICE` (a Router too, under its part name)."""
    service = "router" if name.startswith("router") else name
    return ProcessSpec(
        name=name,
        argv=[sys.executable, "-m", "services.cli.main", "serve", service],
        env=env,
        ready=probes.grpc_serving(address),
        ready_timeout=120.0,
    )


# --- the inference node --------------------------------------------------------------------------


def node_bind_host(settings: StackSettings) -> str:
    """What the node's parts bind: `node_host` for a node; under `all`, the services' default."""
    return settings.node_host if settings.role is Role.NODE else LOOPBACK


def node_address(settings: StackSettings, port: int) -> str:
    """Where this host reaches a node part (loopback when the node binds every interface)."""
    return host_port(local_host(node_bind_host(settings)), port)


def node_binding(settings: StackSettings) -> dict[str, str]:
    """A node binds, and advertises, its address; under `all` each service keeps its own setting."""
    host = settings.node_host
    return {
        "LMC_REGISTRY_HOST": host,
        "LMC_SUPERVISOR_HOST": host,
        "LMC_SUPERVISOR_BACKEND_HOST": host,
        "LMC_SUPERVISOR_ADVERTISE_HOST": settings.node_advertise_host or host,
    }


def node_env(settings: StackSettings) -> dict[str, str]:
    return {
        "LMC_MODELS_DIR": str(settings.effective_models_dir().resolve()),
        "LMC_REGISTRY_PORT": str(settings.registry_port),
        "LMC_SUPERVISOR_PORT": str(settings.supervisor_port),
        "LMC_REGISTRY_ADDRESS": node_address(settings, settings.registry_port),
        "LMC_SUPERVISOR_PRELOAD": settings.preload,
        # Prometheus file_sd targets of every llama-server (deploy/prometheus/prometheus.local.yml).
        "LMC_SUPERVISOR_SCRAPE_TARGETS_FILE": str(
            (settings.scrape_targets_file or settings.run_dir / "prometheus" / "llama-servers.json").resolve()
        ),
    }


def node_parts(settings: StackSettings, env: dict[str, str]) -> list[ProcessSpec]:
    # The Supervisor follows the Registry.
    return [
        service_spec("registry", node_address(settings, settings.registry_port), env),
        service_spec("supervisor", node_address(settings, settings.supervisor_port), env),
    ]


def node_advertised_host(settings: StackSettings) -> str:
    """Where other hosts reach this node's backends (what the Supervisor will advertise)."""
    return advertised_host(settings.node_host, settings.node_advertise_host or settings.node_host)


# --- the gateway ---------------------------------------------------------------------------------


def local_node(settings: StackSettings) -> dict[str, str]:
    """The Routers of `all` follow the one node on this host."""
    return {
        "LMC_ROUTER_REGISTRY_ADDRESS": node_address(settings, settings.registry_port),
        "LMC_ROUTER_SUPERVISOR_ADDRESS": node_address(settings, settings.supervisor_port),
    }


def followed_nodes(settings: StackSettings) -> dict[str, str]:
    """The Routers of a gateway follow every node of the list, each at the ports this launcher knows."""
    return {
        "LMC_ROUTER_NODES": ",".join(settings.node_list),
        "LMC_ROUTER_NODE_REGISTRY_PORT": str(settings.registry_port),
        "LMC_ROUTER_NODE_SUPERVISOR_PORT": str(settings.supervisor_port),
    }


def gateway_env(settings: StackSettings, nodes: dict[str, str]) -> dict[str, str]:
    return {
        "REDIS_URL": settings.redis_url,
        # The Routers read exact entries and same-word candidates from the Cache's Redis themselves (services/router/index_reader.py).
        "LMC_ROUTER_REDIS_URL": settings.redis_url,
        "LMC_EMBEDDING_PORT": str(settings.embedding_port),
        "LMC_CACHE_PORT": str(settings.cache_port),
        "LMC_ROUTER_PORT": str(settings.router_port),
        "LMC_ROUTER_EMBEDDING_ADDRESS": f"{LOOPBACK}:{settings.embedding_port}",
        "LMC_ROUTER_CACHE_ADDRESS": f"{LOOPBACK}:{settings.cache_port}",
        **nodes,
    }


def router_name(index: int) -> str:
    return "router" if index == 0 else f"router-{index + 1}"


def router_ports(settings: StackSettings) -> list[tuple[int, int]]:
    """(gRPC port, metrics port) of each Router; a metrics port of 0 stays off for all."""
    metrics = settings.router_metrics_port
    return [
        (settings.router_port + ROUTER_PORT_STEP * index, metrics + ROUTER_PORT_STEP * index if metrics else 0)
        for index in range(settings.routers)
    ]


def router_addresses(settings: StackSettings) -> list[str]:
    return [f"{LOOPBACK}:{port}" for port, _ in router_ports(settings)]


def gateway_parts(settings: StackSettings, env: dict[str, str]) -> list[ProcessSpec]:
    # The Routers need the Embedding and Cache services; Envoy needs a Router.
    parts = [
        service_spec("embedding", f"{LOOPBACK}:{settings.embedding_port}", env),
        service_spec("cache", f"{LOOPBACK}:{settings.cache_port}", env),
    ]
    for index, (port, metrics_port) in enumerate(router_ports(settings)):
        router_env = {**env, "LMC_ROUTER_PORT": str(port), "LMC_ROUTER_METRICS_PORT": str(metrics_port)}
        parts.append(service_spec(router_name(index), f"{LOOPBACK}:{port}", router_env))
    parts.append(envoy_part(settings))
    return parts


def envoy_part(settings: StackSettings) -> ProcessSpec:
    config = render_envoy_config(
        settings.envoy_template,
        settings.run_dir / "envoy.yaml",
        http_port=settings.http_port,
        admin_port=settings.envoy_admin_port,
        router_address=router_addresses(settings),
        descriptor_set=settings.descriptor_set,
        api_keys=[key for key in settings.api_keys.split(",") if key.strip()],
        # Traces only when OTEL_EXPORTER_OTLP_ENDPOINT is set (the services read the same variables).
        telemetry=TelemetrySettings(),
    )
    return ProcessSpec(
        "envoy",
        [str(binaries.envoy_binary()), "-c", str(config), "--use-dynamic-base-id", "--log-level", "warn"],
        ready=probes.http_ok(f"http://{LOOPBACK}:{settings.http_port}/healthz"),
    )


def redis_parts(settings: StackSettings) -> list[ProcessSpec]:
    """A Redis Stack of its own on a local URL nobody answers on yet; none for a Redis elsewhere."""
    redis_url = urlparse(settings.redis_url)
    redis_host, redis_port = redis_url.hostname or LOOPBACK, redis_url.port or 6379
    if redis_host not in (LOOPBACK, "localhost") or _port_in_use(redis_host, redis_port):
        log.info("using the Redis already at %s", settings.redis_url)
        return []
    data_dir = settings.run_dir / "redis"
    data_dir.mkdir(parents=True, exist_ok=True)
    argv, redis_env = binaries.redis_server_command(redis_port, data_dir)
    return [ProcessSpec("redis", argv, redis_env, ready=probes.redis_ping(settings.redis_url))]


def _port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.3)
        return sock.connect_ex((host, port)) == 0


# --- what the launcher prints once its parts are up -------------------------------------------------


def launcher_metrics_host(settings: StackSettings) -> str:
    """A node's launcher /metrics is where its parts are: where Prometheus finds the node."""
    return node_bind_host(settings)


def endpoints_text(settings: StackSettings) -> str:
    """Where this host's role answers, for people."""
    if settings.role is Role.NODE:
        registry = host_port(settings.node_host, settings.registry_port)
        supervisor = host_port(settings.node_host, settings.supervisor_port)
        advertised = node_advertised_host(settings)
        return (
            "\n[bold]lmcluster node is up[/]\n"
            f"  Registry (gRPC)         {registry}   (`lmcluster models --registry {registry}`)\n"
            f"  Supervisor (gRPC)       {supervisor}   (`lmcluster backends --supervisor {supervisor}`)\n"
            f"  backends advertised at  {advertised}\n"
            f"  models folder           {settings.effective_models_dir()}\n"
            f"  a gateway follows it    lmcluster up --role gateway --nodes {advertised}\n"
            "Press Ctrl-C to stop.\n"
        )
    port = settings.http_port
    lines = [
        f"\n[bold]lmcluster {'gateway ' if settings.role is Role.GATEWAY else ''}is up[/]",
        f"  OpenAI-compatible REST  http://{LOOPBACK}:{port}/v1   (health: http://{LOOPBACK}:{port}/healthz)",
        f"  gRPC (Router)           {LOOPBACK}:{port}",
    ]
    if settings.routers > 1:
        lines.append(f"  Routers                 {', '.join(router_addresses(settings))}")
    if settings.role is Role.GATEWAY:
        lines.append(f"  inference nodes         {', '.join(settings.node_list)}")
    else:
        lines += [
            f"  Registry (gRPC)         {node_address(settings, settings.registry_port)}   (`lmcluster models`)",
            f"  Supervisor (gRPC)       {node_address(settings, settings.supervisor_port)}   (`lmcluster backends`)",
        ]
    lines += [
        f"  Cache (gRPC)            {LOOPBACK}:{settings.cache_port}   (`lmcluster cache stats`)",
        f"  Envoy admin             http://{LOOPBACK}:{settings.envoy_admin_port}",
    ]
    if settings.role is Role.ALL:
        lines.append(f"  models folder           {settings.effective_models_dir()}")
    return "\n".join(lines) + "\nPress Ctrl-C to stop.\n"

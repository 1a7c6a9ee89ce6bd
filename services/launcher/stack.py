"""`lmcluster up`: every part of the stack in the foreground, in dependency order.

Parts start one after the other, each only once the one before answers its readiness probe, and
stop in reverse order on Ctrl-C or SIGTERM. A part that exits on its own is restarted (backoff with
jitter, services/launcher/supervision.py) while the others keep serving; the stack stops by itself
only when a part crash-loops, naming it and why, so a broken part is never hidden behind a running
Envoy either. A part that fails its very first start stops the stack at once: that is a
configuration fault, not a crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import sys
from collections.abc import Coroutine
from typing import Any
from urllib.parse import urlparse

from rich.console import Console
from rich.markup import escape

from services.common import binaries
from services.common.metrics import serve_metrics
from services.common.telemetry import TelemetrySettings
from services.launcher import probes
from services.launcher.envoy_config import render_envoy_config
from services.launcher.process import ManagedProcess, ProcessSpec
from services.launcher.settings import StackSettings
from services.launcher.supervision import CrashLoop, PartSupervisor, RestartPolicy

log = logging.getLogger(__name__)
console = Console(stderr=True)

_COLORS = ["\033[31m", "\033[32m", "\033[33m", "\033[34m", "\033[35m", "\033[36m", "\033[91m", "\033[92m"]


def _port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.3)
        return sock.connect_ex((host, port)) == 0


def service_spec(name: str, address: str, env: dict[str, str]) -> ProcessSpec:
    """A gRPC service of this project, run as `lmcluster serve NAME`."""
    return ProcessSpec(
        name=name,
        argv=[sys.executable, "-m", "services.cli.main", "serve", name],
        env=env,
        ready=probes.grpc_serving(address),
        ready_timeout=120.0,
    )


def build_specs(settings: StackSettings) -> list[ProcessSpec]:
    """The parts, in start order."""
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    specs: list[ProcessSpec] = []
    addresses = {
        "router": f"127.0.0.1:{settings.router_port}",
        "embedding": f"127.0.0.1:{settings.embedding_port}",
        "cache": f"127.0.0.1:{settings.cache_port}",
        "supervisor": f"127.0.0.1:{settings.supervisor_port}",
        "registry": f"127.0.0.1:{settings.registry_port}",
    }
    # Each service reads its own port and its peers' addresses from these (see each settings.py).
    env = {
        "LMC_MODELS_DIR": str(settings.effective_models_dir().resolve()),
        "REDIS_URL": settings.redis_url,
        **{f"LMC_{name.upper()}_PORT": address.rsplit(":", 1)[1] for name, address in addresses.items()},
        "LMC_REGISTRY_ADDRESS": addresses["registry"],
        "LMC_SUPERVISOR_PRELOAD": settings.preload,
        # Prometheus file_sd targets of every llama-server (deploy/prometheus/prometheus.local.yml).
        "LMC_SUPERVISOR_SCRAPE_TARGETS_FILE": str(
            (settings.scrape_targets_file or settings.run_dir / "prometheus" / "llama-servers.json").resolve()
        ),
        "LMC_ROUTER_REGISTRY_ADDRESS": addresses["registry"],
        "LMC_ROUTER_SUPERVISOR_ADDRESS": addresses["supervisor"],
        "LMC_ROUTER_EMBEDDING_ADDRESS": addresses["embedding"],
        "LMC_ROUTER_CACHE_ADDRESS": addresses["cache"],
    }

    redis_url = urlparse(settings.redis_url)
    redis_host, redis_port = redis_url.hostname or "127.0.0.1", redis_url.port or 6379
    if redis_host in ("127.0.0.1", "localhost") and not _port_in_use(redis_host, redis_port):
        data_dir = settings.run_dir / "redis"
        data_dir.mkdir(parents=True, exist_ok=True)
        argv, redis_env = binaries.redis_server_command(redis_port, data_dir)
        specs.append(ProcessSpec("redis", argv, redis_env, ready=probes.redis_ping(settings.redis_url)))
    else:
        log.info("using the Redis already at %s", settings.redis_url)

    # Dependency order: the Supervisor follows the Registry; the Router needs all four.
    for name in ("registry", "supervisor", "embedding", "cache", "router"):
        specs.append(service_spec(name, addresses[name], env))

    envoy_config = render_envoy_config(
        settings.envoy_template,
        settings.run_dir / "envoy.yaml",
        http_port=settings.http_port,
        admin_port=settings.envoy_admin_port,
        router_address=addresses["router"],
        descriptor_set=settings.descriptor_set,
        api_keys=[key for key in settings.api_keys.split(",") if key.strip()],
        # Traces only when OTEL_EXPORTER_OTLP_ENDPOINT is set (the services read the same variables).
        telemetry=TelemetrySettings(),
    )
    specs.append(
        ProcessSpec(
            "envoy",
            [str(binaries.envoy_binary()), "-c", str(envoy_config), "--use-dynamic-base-id", "--log-level", "warn"],
            ready=probes.http_ok(f"http://127.0.0.1:{settings.http_port}/healthz"),
        )
    )
    return specs


async def run_stack(settings: StackSettings) -> int:
    """Starts every part, keeps them running until a signal or a crash loop, stops everything; an exit code."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    running: list[ManagedProcess] = []
    exit_code = 0
    try:
        for index, spec in enumerate(build_specs(settings)):
            if stop.is_set():
                break
            part = ManagedProcess(spec, color=_COLORS[index % len(_COLORS)] if sys.stdout.isatty() else "")
            with console.status(f"starting {spec.name}"):
                await part.start()
                running.append(part)
                await _race(part.wait_ready(), stop)
            console.print(f"[green]✔[/] {spec.name} ready (pid {part.pid})")
        if not stop.is_set():
            _serve_launcher_metrics(settings)
            _print_endpoints(settings)
            exit_code = await _supervise(running, settings.restart_policy(), stop)
    except RuntimeError as error:
        console.print(f"[red]✘ {error}[/]")
        exit_code = 1
    finally:
        for part in reversed(running):
            console.print(f"stopping {part.spec.name}")
            await part.stop()
        console.print("all stopped")
    return exit_code


async def _race(work: Coroutine[Any, Any, None], stop: asyncio.Event) -> None:
    """Runs `work` but gives up as soon as a stop is requested."""
    task = asyncio.create_task(work)
    stopper = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    for pending in (task, stopper):
        if pending not in done:
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pending
    if task in done:
        task.result()


async def _supervise(running: list[ManagedProcess], policy: RestartPolicy, stop: asyncio.Event) -> int:
    """Restarts parts that exit until `stop` is set (0) or one crash-loops (1)."""
    def say(text: str) -> None:
        console.print(text, soft_wrap=True)

    supervisors = [PartSupervisor(part, policy, stop, say) for part in running]
    tasks = [asyncio.create_task(s.run(), name=f"supervise-{s.name}") for s in supervisors]
    try:
        for finished in asyncio.as_completed(tasks):
            try:
                await finished
            except CrashLoop as error:
                console.print(f"[red]✘ {escape(str(error))}; stopping the stack[/]", soft_wrap=True)
                return 1
        return 0
    finally:
        stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _serve_launcher_metrics(settings: StackSettings) -> None:
    """The launcher's own /metrics (restarts per part); a port in use is logged, not fatal."""
    try:
        serve_metrics("127.0.0.1", settings.launcher_metrics_port)
    except OSError as error:
        log.warning("launcher metrics not served on port %d: %s", settings.launcher_metrics_port, error)


def _print_endpoints(settings: StackSettings) -> None:
    port = settings.http_port
    console.print(
        "\n[bold]lmcluster is up[/]\n"
        f"  OpenAI-compatible REST  http://127.0.0.1:{port}/v1   (health: http://127.0.0.1:{port}/healthz)\n"
        f"  gRPC (Router)           127.0.0.1:{port}\n"
        f"  Registry (gRPC)         127.0.0.1:{settings.registry_port}   (`lmcluster models`)\n"
        f"  Supervisor (gRPC)       127.0.0.1:{settings.supervisor_port}   (`lmcluster backends`)\n"
        f"  Cache (gRPC)            127.0.0.1:{settings.cache_port}   (`lmcluster cache stats`)\n"
        f"  Envoy admin             http://127.0.0.1:{settings.envoy_admin_port}\n"
        f"  models folder           {settings.effective_models_dir()}\n"
        "Press Ctrl-C to stop.\n",
        soft_wrap=True,
    )

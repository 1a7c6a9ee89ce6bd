"""Builds, serves and shuts down one grpc.aio server the same way for every service.

Every server gets `grpc.health.v1.Health` (NOT_SERVING until the service says it is ready),
server reflection (so grpcurl works), RPC metrics, a span per RPC when tracing is on, and a graceful shutdown on SIGTERM/SIGINT:
health flips to NOT_SERVING, streaming RPCs are told to finish, in-flight RPCs drain for the
grace period, then the caller closes its clients in reverse order.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from collections.abc import Callable, Sequence
from typing import Any, Self

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common.logging import configure_logging
from services.common.metrics import MetricsInterceptor, serve_metrics
from services.common.settings import EventLoop, ServiceSettings
from services.common.telemetry import configure_tracing, server_interceptors, shutdown_tracing

log = logging.getLogger(__name__)

# Streams such as WatchModels run for hours; keepalives notice dead clients and idle proxies.
_CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.keepalive_permit_without_calls", 1),
    # Routers ping their nodes every few seconds to notice one cut off (services/router/nodes.py).
    ("grpc.http2.min_ping_interval_without_data_ms", 1_000),
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    ("grpc.max_send_message_length", 16 * 1024 * 1024),
]


class ServiceHost:
    """One service's gRPC server with health, reflection and metrics.

    Usage::

        host = ServiceHost("registry", settings, [RegistryService full name])
        host.add(add_RegistryServiceServicer_to_server, servicer)
        async with host:               # starts serving, NOT_SERVING
            await host.set_serving(True)
            await host.wait_for_shutdown()
        # leaving the block: NOT_SERVING, streams told to end, in-flight RPCs drained
    """

    def __init__(
        self,
        name: str,
        settings: ServiceSettings,
        service_names: Sequence[str],
        *,
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    ) -> None:
        self.name = name
        self.settings = settings
        self.service_names = list(service_names)
        # Tracing outermost (when on), so that the RPC's span covers everything else.
        self.server = grpc.aio.server(
            interceptors=[*server_interceptors(), MetricsInterceptor(), *interceptors], options=_CHANNEL_OPTIONS
        )
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [*self.service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
            self.server,
        )
        self.port = 0
        self.metrics_port = 0
        # Set when shutdown starts; long-lived streams watch it to end cleanly instead of being cut.
        self.shutting_down = asyncio.Event()
        self._stop_requested = asyncio.Event()

    def add(self, add_to_server: Callable[[Any, grpc.aio.Server], None], servicer: Any) -> None:
        add_to_server(servicer, self.server)

    async def start(self) -> int:
        """Binds and starts serving (health NOT_SERVING); returns the bound port."""
        self.port = self.server.add_insecure_port(self.settings.address)
        if self.port == 0:
            raise RuntimeError(f"{self.name}: cannot listen on {self.settings.address}")
        await self.server.start()
        await self.set_serving(False)
        self.metrics_port = serve_metrics(self.settings.host, self.settings.metrics_port)
        log.info(
            "%s listening on %s:%d%s",
            self.name,
            self.settings.host,
            self.port,
            f" (metrics on :{self.metrics_port})" if self.metrics_port else "",
        )
        return self.port

    async def set_serving(self, serving: bool) -> None:
        """Sets the overall health and every service's health to SERVING or NOT_SERVING."""
        if serving:
            freeze_startup_heap()
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for service in ("", *self.service_names):
            await self.health.set(service, status)

    def request_stop(self) -> None:
        self._stop_requested.set()

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)

    async def wait_for_shutdown(self) -> None:
        """Returns when SIGTERM/SIGINT arrived (after install_signal_handlers) or request_stop()."""
        await self._stop_requested.wait()

    async def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING, tell streams to end, then drain in-flight RPCs for up to `grace` seconds."""
        grace = self.settings.shutdown_grace_seconds if grace is None else grace
        log.info("%s shutting down (grace %.1f s)", self.name, grace)
        await self.health.enter_graceful_shutdown()
        self.shutting_down.set()
        await self.server.stop(grace)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


def freeze_startup_heap() -> None:
    """Takes what start-up allocated (modules, protobuf descriptors, the embedding model) out of
    the garbage collector's generations. A full collection otherwise walks all of it in the middle
    of a request: 17 ms for the Router's modules alone on these cores. They live as long as the
    process anyway; only what requests allocate is collected from here on."""
    gc.collect()
    gc.freeze()


def loop_factory(event_loop: EventLoop) -> Callable[[], asyncio.AbstractEventLoop]:
    """The event loop a service runs on: uvloop's by default, asyncio's on request."""
    if event_loop == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return asyncio.new_event_loop


def run_service(
    name: str,
    settings: ServiceSettings,
    main: Callable[[ServiceSettings], Any],
    *,
    starts_processes: bool = False,
) -> None:
    """Process entry shared by every service: logging, tracing, then `main(settings)` on the
    configured event loop.

    A service that `starts_processes` runs on asyncio's loop whatever the setting. uvloop starts a
    child with a plain fork(): the child of this threaded process runs gRPC's at-fork handlers and
    Python's after-fork hooks before it execs, and crashed there (SIGSEGV, SIGABRT) while other
    threads were inside gRPC. asyncio's subprocesses use vfork, which runs none of them."""
    configure_logging(name, settings.log_level, settings.log_format)
    configure_tracing(name)
    event_loop: EventLoop = "asyncio" if starts_processes else settings.event_loop
    try:
        with asyncio.Runner(loop_factory=loop_factory(event_loop)) as runner:
            runner.run(main(settings))
    except KeyboardInterrupt:
        pass
    finally:
        shutdown_tracing()

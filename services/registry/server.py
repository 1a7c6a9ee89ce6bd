"""The Registry process: `lmcluster serve registry`, or in-process through `running_registry`."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from lmcluster.registry.v1 import registry_service_pb2, registry_service_pb2_grpc

from services.common.server import ServiceHost, run_service
from services.registry.catalog import ModelCatalog
from services.registry.servicer import RegistryServicer
from services.registry.settings import RegistrySettings

log = logging.getLogger(__name__)

SERVICE_NAME = registry_service_pb2.DESCRIPTOR.services_by_name["RegistryService"].full_name


@dataclass(frozen=True)
class RunningRegistry:
    """A started Registry: its gRPC host (bound port in `port`) and its model table."""

    host: ServiceHost
    catalog: ModelCatalog

    @property
    def port(self) -> int:
        return self.host.port

    @property
    def address(self) -> str:
        return f"{self.host.settings.host}:{self.host.port}"


@contextlib.asynccontextmanager
async def running_registry(
    settings: RegistrySettings, *, handle_signals: bool = False
) -> AsyncIterator[RunningRegistry]:
    """Serves the Registry until the block ends; health is SERVING once the first full scan is done.

    The port is bound first (health NOT_SERVING, RPCs wait for the scan), so clients can connect
    while a large folder is still being read. Leaving the block: NOT_SERVING, watch streams end,
    in-flight RPCs drain for the grace period, then the watcher and scanner stop. With
    `handle_signals`, SIGTERM/SIGINT request a stop (`host.wait_for_shutdown()` returns), also
    during the first scan.
    """
    host = ServiceHost("registry", settings, [SERVICE_NAME])
    catalog = ModelCatalog(settings)
    servicer = RegistryServicer(catalog, host.shutting_down)
    host.add(registry_service_pb2_grpc.add_RegistryServiceServicer_to_server, servicer)
    await host.start()
    if handle_signals:
        host.install_signal_handlers()
    try:
        await catalog.start()
        await host.set_serving(True)
        yield RunningRegistry(host, catalog)
    finally:
        await host.stop()
        await catalog.close()
        log.info("registry stopped")


async def serve(settings: RegistrySettings) -> None:
    """Runs the Registry until SIGTERM or SIGINT."""
    async with running_registry(settings, handle_signals=True) as registry:
        await registry.host.wait_for_shutdown()


def main() -> None:
    """Process entry: settings from the environment, then `serve`."""
    run_service("registry", RegistrySettings(), serve)  # type: ignore[arg-type]


if __name__ == "__main__":
    main()

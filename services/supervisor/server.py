"""The Supervisor process: `lmcluster serve supervisor`, or in-process through `running_supervisor`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from lmcluster.supervisor.v1 import supervisor_service_pb2_grpc as pb_grpc

from services.common import binaries
from services.common.server import ServiceHost, run_service
from services.common.units import human_bytes
from services.supervisor.fleet import Fleet
from services.supervisor.servicer import SERVICE_NAME, SupervisorServicer
from services.supervisor.settings import SupervisorSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunningSupervisor:
    """A started Supervisor: its gRPC host (bound port in `port`) and its Fleet."""

    host: ServiceHost
    fleet: Fleet
    # Done once the Registry's first snapshot arrived and the preload finished (health SERVING).
    ready: asyncio.Task[None]

    @property
    def port(self) -> int:
        return self.host.port

    @property
    def address(self) -> str:
        return f"{self.host.settings.host}:{self.host.port}"


@contextlib.asynccontextmanager
async def running_supervisor(
    settings: SupervisorSettings, *, handle_signals: bool = False, budget: int | None = None
) -> AsyncIterator[RunningSupervisor]:
    """Serves the Supervisor until the block ends, then stops every backend it started.

    Health is NOT_SERVING until the Registry's first snapshot arrived and the preload is done.
    Leaving the block: NOT_SERVING, watch streams end, in-flight RPCs drain, then every backend is
    drained (bounded) and stopped.
    """
    binary = settings.llama_server or binaries.llama_server_binary()
    fleet = Fleet(settings, binary, budget=budget)
    host = ServiceHost("supervisor", settings, [SERVICE_NAME])
    host.add(pb_grpc.add_SupervisorServiceServicer_to_server, SupervisorServicer(fleet, host.shutting_down))
    await host.start()
    if handle_signals:
        host.install_signal_handlers()
    log.info(
        "llama-server %s; memory budget %s; backend ports %d-%d; Registry at %s",
        binary,
        human_bytes(fleet.budget),
        settings.port_range_start,
        settings.port_range_end,
        settings.registry_address,
    )
    fleet.start_background()
    ready = asyncio.create_task(_become_ready(fleet, host), name="supervisor-ready")
    try:
        yield RunningSupervisor(host, fleet, ready)
    finally:
        ready.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ready
        await host.stop()
        await fleet.close()
        log.info("supervisor stopped; no backend left running")


async def _become_ready(fleet: Fleet, host: ServiceHost) -> None:
    await fleet.registry_synced.wait()
    await fleet.preload()
    await host.set_serving(True)


async def serve(settings: SupervisorSettings) -> None:
    """Runs the Supervisor until SIGTERM or SIGINT."""
    async with running_supervisor(settings, handle_signals=True) as supervisor:
        await supervisor.host.wait_for_shutdown()


def main() -> None:
    """Process entry: settings from the environment, then `serve`."""
    run_service("supervisor", SupervisorSettings(), serve, starts_processes=True)  # type: ignore[arg-type]


if __name__ == "__main__":
    main()

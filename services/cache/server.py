"""The Cache process: Redis client, index, servicer and gRPC server; `lmcluster serve cache` runs main().

Health is NOT_SERVING until the vector index exists (created on an empty Redis, reused otherwise).
If Redis is down at start the server still answers (degraded misses) while a background task keeps
trying to create the index, and health turns SERVING once it exists.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from lmcluster.cache.v1 import cache_service_pb2, cache_service_pb2_grpc

from services.cache.servicer import CacheServicer
from services.cache.settings import CacheSettings
from services.cache.store import CacheStore
from services.common.server import ServiceHost, run_service

log = logging.getLogger(__name__)

SERVICE_NAME = cache_service_pb2.DESCRIPTOR.services_by_name["CacheService"].full_name


@dataclass
class RunningCache:
    """A started cache service: its host (port, health), servicer (counters) and store."""

    host: ServiceHost
    servicer: CacheServicer
    store: CacheStore

    @property
    def port(self) -> int:
        return self.host.port


async def _serve_when_indexed(host: ServiceHost, store: CacheStore) -> None:
    store.start_index_keeper()
    await store.index_ready.wait()
    await host.set_serving(True)
    log.info("cache ready: index %s on %s", store.layout.name, store.settings.redis_url.split("@")[-1])


@contextlib.asynccontextmanager
async def running_cache(settings: CacheSettings) -> AsyncIterator[RunningCache]:
    """Serves the cache until the block exits; then NOT_SERVING, drain, and close Redis."""
    store = CacheStore(settings)
    servicer = CacheServicer(settings, store)
    host = ServiceHost("cache", settings, [SERVICE_NAME])
    host.add(cache_service_pb2_grpc.add_CacheServiceServicer_to_server, servicer)
    readiness: asyncio.Task[None] | None = None
    try:
        await host.start()
        readiness = asyncio.create_task(_serve_when_indexed(host, store), name="cache-readiness")
        yield RunningCache(host, servicer, store)
    finally:
        if readiness is not None:
            readiness.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await readiness
        await host.stop()
        await store.close()
        log.info("cache stopped: Redis client closed")


async def serve(settings: CacheSettings) -> None:
    """Runs the cache service until SIGTERM/SIGINT."""
    async with running_cache(settings) as cache:
        cache.host.install_signal_handlers()
        await cache.host.wait_for_shutdown()


def main() -> None:
    """Process entry of `lmcluster serve cache`."""
    settings = CacheSettings()
    run_service("cache", settings, serve)  # type: ignore[arg-type]


if __name__ == "__main__":
    main()

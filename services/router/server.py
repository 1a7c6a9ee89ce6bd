"""The Router process: follows every node's Registry and Supervisor, serves RouterService."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
from lmcluster.cache.v1 import cache_service_pb2_grpc
from lmcluster.embedding.v1 import embedding_service_pb2_grpc
from lmcluster.router.v1 import router_service_pb2, router_service_pb2_grpc

from services.cache.settings import CacheSettings
from services.common.server import ServiceHost, run_service
from services.router.caching import AnswerCache
from services.router.catalog import ModelCatalog
from services.router.follow import cancel_and_wait
from services.router.index_reader import IndexReader
from services.router.llama_client import LlamaClient
from services.router.lookup_embedding import LookupEmbedder
from services.router.nodes import NodeSet
from services.router.routing import RoutingTable
from services.router.servicer import RouterServicer
from services.router.settings import RouterSettings

log = logging.getLogger(__name__)

SERVICE_NAME = router_service_pb2.DESCRIPTOR.services_by_name["RouterService"].full_name


@dataclass
class RouterRuntime:
    """Everything a running Router holds, closed in reverse order of creation."""

    host: ServiceHost
    servicer: RouterServicer
    catalog: ModelCatalog
    table: RoutingTable
    cache: AnswerCache
    llama: LlamaClient
    nodes: NodeSet
    channels: list[grpc.aio.Channel]
    watchers: list[asyncio.Task[None]]

    async def close(self) -> None:
        await self.host.stop()
        await self.servicer.close()
        await self.cache.drain()
        for task in self.watchers:
            await cancel_and_wait(task)
        await self.nodes.close()
        await self.llama.aclose()
        for channel in reversed(self.channels):
            await channel.close()


@contextlib.asynccontextmanager
async def running_router(settings: RouterSettings) -> AsyncIterator[RouterRuntime]:
    """Starts a Router (health SERVING once it heard from a node's Registry and Supervisor)."""
    embedding_channel = grpc.aio.insecure_channel(settings.embedding_address)
    cache_channel = grpc.aio.insecure_channel(settings.cache_address)
    embedding = embedding_service_pb2_grpc.EmbeddingServiceStub(embedding_channel)

    catalog = ModelCatalog()
    table = RoutingTable(
        queue_limit=settings.queue_limit,
        queue_timeout=settings.queue_timeout_seconds,
        overflow_queue_threshold=settings.overflow_queue_threshold,
        retry_after=settings.retry_after_seconds,
        load_factor=settings.prefix_load_factor,
    )
    nodes = NodeSet(settings, catalog, table)
    cache_stub = cache_service_pb2_grpc.CacheServiceStub(cache_channel)
    index = IndexReader(CacheSettings(redis_url=settings.redis_url), cache_stub) if settings.redis_url else None
    local = LookupEmbedder() if settings.cache_enabled and settings.lookup_embedding == "router" else None
    cache = AnswerCache(
        embedding, cache_stub, enabled=settings.cache_enabled, timeout=settings.cache_timeout_seconds, index=index,
        local=local,
    )  # fmt: skip
    llama = LlamaClient(
        connect_timeout=settings.connect_timeout_seconds,
        first_token_timeout=settings.first_token_timeout_seconds,
        token_timeout=settings.token_timeout_seconds,
    )
    servicer = RouterServicer(
        settings, catalog=catalog, table=table, cache=cache, llama=llama, nodes=nodes, embedding=embedding
    )
    host = ServiceHost("router", settings, [SERVICE_NAME])
    host.add(router_service_pb2_grpc.add_RouterServiceServicer_to_server, servicer)
    watchers: list[asyncio.Task[None]] = []
    runtime = RouterRuntime(host, servicer, catalog, table, cache, llama, nodes, [embedding_channel, cache_channel], watchers)
    try:
        await nodes.start()
        await host.start()
        cache.start_local_embedding()
        watchers.append(asyncio.create_task(_serve_when_synced(runtime)))
        yield runtime
    finally:
        await runtime.close()


async def _serve_when_synced(runtime: RouterRuntime) -> None:
    while not (runtime.catalog.synced and runtime.table.synced):
        await asyncio.sleep(0.05)
    await runtime.host.set_serving(True)
    log.info("router ready: following %d node(s)", len(runtime.nodes.nodes))


async def serve(settings: RouterSettings) -> None:
    async with running_router(settings) as runtime:
        runtime.host.install_signal_handlers()
        await runtime.host.wait_for_shutdown()


def main() -> None:
    settings = RouterSettings()
    run_service("router", settings, serve)  # type: ignore[arg-type]

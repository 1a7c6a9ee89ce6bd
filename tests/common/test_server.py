"""ServiceHost: health follows readiness, reflection lists the services, shutdown drains in-flight RPCs."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from lmcluster.embedding.v1 import embedding_service_pb2 as pb
from lmcluster.embedding.v1 import embedding_service_pb2_grpc as pb_grpc
from prometheus_client import REGISTRY

from services.common.server import ServiceHost
from services.common.settings import ServiceSettings

EMBEDDING_SERVICE = pb.DESCRIPTOR.services_by_name["EmbeddingService"].full_name


class SlowEmbedder(pb_grpc.EmbeddingServiceServicer):
    """A stand-in servicer whose RPC takes a while, to watch draining."""

    def __init__(self) -> None:
        self.started = asyncio.Event()

    async def Embed(self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext) -> pb.EmbedResponse:
        self.started.set()
        await asyncio.sleep(0.5)
        if not request.texts:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "texts is empty")
        return pb.EmbedResponse(model="slow", dimensions=1)


def make_host() -> tuple[ServiceHost, SlowEmbedder]:
    settings = ServiceSettings(port=0, shutdown_grace_seconds=5)
    host = ServiceHost("test", settings, [EMBEDDING_SERVICE])
    servicer = SlowEmbedder()
    host.add(pb_grpc.add_EmbeddingServiceServicer_to_server, servicer)
    return host, servicer


async def health_status(channel: grpc.aio.Channel, service: str = "") -> int:
    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service))
    return reply.status


async def test_health_is_not_serving_until_ready() -> None:
    host, _ = make_host()
    async with host:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{host.port}") as channel:
            assert await health_status(channel) == health_pb2.HealthCheckResponse.NOT_SERVING
            await host.set_serving(True)
            assert await health_status(channel) == health_pb2.HealthCheckResponse.SERVING
            assert await health_status(channel, EMBEDDING_SERVICE) == health_pb2.HealthCheckResponse.SERVING


async def test_reflection_lists_the_service_health_and_reflection() -> None:
    host, _ = make_host()
    async with host:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{host.port}") as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            names = set()
            async for reply in stub.ServerReflectionInfo(iter([request])):
                names |= {s.name for s in reply.list_services_response.service}
    assert {EMBEDDING_SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names


async def test_stop_drains_in_flight_rpcs_and_refuses_new_ones() -> None:
    host, servicer = make_host()
    await host.start()
    await host.set_serving(True)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{host.port}") as channel:
        stub = pb_grpc.EmbeddingServiceStub(channel)
        in_flight = asyncio.ensure_future(stub.Embed(pb.EmbedRequest(texts=["a"])))
        await servicer.started.wait()
        stopping = asyncio.create_task(host.stop())
        reply = await in_flight
        assert reply.model == "slow"
        await stopping
        assert host.shutting_down.is_set()
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Embed(pb.EmbedRequest(texts=["b"]), timeout=2)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_rpc_metrics_count_codes() -> None:
    host, _ = make_host()
    labels = {"grpc_service": EMBEDDING_SERVICE, "grpc_method": "Embed", "grpc_code": "INVALID_ARGUMENT"}
    before = REGISTRY.get_sample_value("lmc_grpc_server_handled_total", labels) or 0.0
    async with host:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{host.port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError):
                await pb_grpc.EmbeddingServiceStub(channel).Embed(pb.EmbedRequest())
    assert REGISTRY.get_sample_value("lmc_grpc_server_handled_total", labels) == before + 1

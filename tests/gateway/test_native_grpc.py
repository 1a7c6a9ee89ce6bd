"""Native gRPC clients on Envoy's public port: real statuses, metadata and messages, untouched."""

from __future__ import annotations

import json

import grpc
import pytest
from google.protobuf import struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from lmcluster.router.v1 import openai_pb2 as oa
from lmcluster.router.v1 import router_service_pb2 as pb
from lmcluster.router.v1 import router_service_pb2_grpc as pb_grpc

from services.common import gateway as contract
from tests.gateway.conftest import Gateway
from tests.gateway.fake_router import ROUTER_SERVICE, STREAM_CHUNKS, FakeRouter


def chat(model: str, *, user: str = "") -> oa.CreateChatCompletionRequest:
    return oa.CreateChatCompletionRequest(
        model=model,
        messages=[oa.ChatMessage(role="user", content=struct_pb2.Value(string_value="hi"))],
        user=user,
    )


async def test_unary_call_with_initial_metadata(gateway: Gateway, fake_router: FakeRouter) -> None:
    async with grpc.aio.insecure_channel(gateway.grpc_target) as channel:
        call = pb_grpc.RouterServiceStub(channel).CreateChatCompletion(chat("cached"))
        reply = await call
        metadata = dict(await call.initial_metadata())
    assert reply.choices[0].message.content == "echo: hi"
    assert metadata[contract.CACHE_HEADER] == "hit"
    assert metadata[contract.SIMILARITY_HEADER] == "0.9731"
    assert not fake_router.calls[-1].came_through_rest


async def test_errors_keep_their_grpc_status_and_trailing_metadata(gateway: Gateway) -> None:
    async with grpc.aio.insecure_channel(gateway.grpc_target) as channel:
        stub = pb_grpc.RouterServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as too_long:
            await stub.CreateChatCompletion(chat("too-long"))
        with pytest.raises(grpc.aio.AioRpcError) as busy:
            await stub.CreateChatCompletion(chat("busy"))
        with pytest.raises(grpc.aio.AioRpcError) as crashed:
            await stub.CreateChatCompletion(chat("crash"))
    assert too_long.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert too_long.value.details().endswith("(Größe).")
    trailing = dict(too_long.value.trailing_metadata() or ())
    body = json.loads(trailing[contract.ERROR_METADATA])
    assert body["error"]["code"] == "context_length_exceeded"
    assert busy.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert dict(busy.value.trailing_metadata() or ())[contract.RETRY_AFTER_METADATA] == "7"
    assert crashed.value.code() == grpc.StatusCode.UNKNOWN


async def test_stream_is_plain_grpc_without_the_rest_end_marker(
    gateway: Gateway, fake_router: FakeRouter
) -> None:
    fake_router.open_gate("grpc-stream")
    async with grpc.aio.insecure_channel(gateway.grpc_target) as channel:
        stub = pb_grpc.RouterServiceStub(channel)
        # A client cannot pass itself off as REST: Envoy strips x-lmc-* from every request.
        call = stub.StreamChatCompletion(
            chat("echo-model", user="grpc-stream"), metadata=((contract.REST_MARKER, "1"),)
        )
        chunks = [chunk async for chunk in call]
        assert await call.code() == grpc.StatusCode.OK
    assert len(chunks) == STREAM_CHUNKS + 1
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    assert not fake_router.calls[-1].came_through_rest


async def test_stream_error_before_the_first_chunk_is_a_grpc_status(gateway: Gateway) -> None:
    async with grpc.aio.insecure_channel(gateway.grpc_target) as channel:
        call = pb_grpc.RouterServiceStub(channel).StreamCompletion(
            oa.CreateCompletionRequest(model="missing", prompt=struct_pb2.Value(string_value="hi"))
        )
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            async for _ in call:
                pass
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND


async def test_health_service_passes_through(gateway: Gateway) -> None:
    async with grpc.aio.insecure_channel(gateway.grpc_target) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=ROUTER_SERVICE)
        )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_unknown_grpc_method_is_unimplemented(gateway: Gateway) -> None:
    async with grpc.aio.insecure_channel(gateway.grpc_target) as channel:
        method = channel.unary_unary(
            "/lmcluster.router.v1.RouterService/NoSuchMethod",
            request_serializer=pb.ListModelsRequest.SerializeToString,
            response_deserializer=pb.ListModelsResponse.FromString,
        )
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await method(pb.ListModelsRequest())
    assert unknown.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_router_down_is_unavailable(routerless_gateway: Gateway) -> None:
    async with grpc.aio.insecure_channel(routerless_gateway.grpc_target) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as down:
            await pb_grpc.RouterServiceStub(channel).ListModels(pb.ListModelsRequest())
    assert down.value.code() == grpc.StatusCode.UNAVAILABLE
    assert not (down.value.details() or "").startswith("{")

"""A small RouterService that follows the gateway contract (services/common/gateway.py).

It stands behind a real Envoy so the tests can check what REST and gRPC clients see. Its answers
are chosen by the request's `model`:

| model            | answer                                                                        |
|------------------|-------------------------------------------------------------------------------|
| anything else    | a completion echoing the last prompt; `x-lmc-cache: miss`                     |
| `cached`         | the same with `x-lmc-cache: hit` and `x-lmc-similarity: 0.9731`               |
| `missing`        | NOT_FOUND, `model_not_found`                                                  |
| `too-long`       | INVALID_ARGUMENT, `context_length_exceeded` (param `messages`)                |
| `busy`           | RESOURCE_EXHAUSTED, `overloaded`, `retry-after: 7`                            |
| `unavailable`    | UNAVAILABLE, `model_unavailable`, `retry-after: 5`                            |
| `too-big`        | INVALID_ARGUMENT with `x-lmc-http-status: 413`                                |
| `crash`          | an unhandled exception: UNKNOWN without `x-lmc-error`                         |
| `late-error`     | initial metadata first, then NOT_FOUND (error in trailers, not trailers-only) |
| `stream-error`   | streams only: one chunk, then an error chunk and the end marker               |
| `stream-abort`   | streams only: one chunk, then an abort (an unexpected failure mid-stream)     |
| `echo-stream`    | streams only: the first chunk's text is the prompt's                          |
| `big`            | embeddings only: BIG_EMBEDDING_COUNT vectors (a response of megabytes)        |

Streams send their first chunk, then wait until the test opens the gate named by the request's
`user` field (`open_gate`), then send the rest: a test that opens the gate only after it has read
the first chunk proves that the chunk crossed Envoy before the rest existed.

The servicer runs on its own thread and event loop, so blocking clients (the openai SDK's sync
client, httpx) can call it from the test's thread.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc
from google.protobuf import struct_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from lmcluster.router.v1 import openai_pb2 as oa
from lmcluster.router.v1 import router_service_pb2 as pb
from lmcluster.router.v1 import router_service_pb2_grpc as pb_grpc

from services.common import gateway
from services.common.gateway import StreamChunk

ROUTER_SERVICE = pb.DESCRIPTOR.services_by_name["RouterService"].full_name
STREAM_CHUNKS = 4
EMBEDDING_DIMENSIONS = 384
# Embeddings of model `big`: a response of about 2.5 MB, beyond Envoy's default 1 MiB buffers.
BIG_EMBEDDING_COUNT = 1500
# Upper bound on a stream's wait for its gate: a failing test ends instead of hanging.
GATE_WAIT_S = 30.0


RouterRequest = oa.CreateChatCompletionRequest | oa.CreateCompletionRequest | oa.CreateEmbeddingRequest


@dataclass(frozen=True)
class Call:
    """One RPC as the fake saw it."""

    method: str
    request: RouterRequest | None
    metadata: tuple[tuple[str, str], ...]

    @property
    def came_through_rest(self) -> bool:
        return (gateway.REST_MARKER, "1") in self.metadata


class FakeRouterServicer(pb_grpc.RouterServiceServicer):
    """RouterService answers chosen by model name (see the module docstring)."""

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self._gates: dict[str, threading.Event] = {}
        self._gate_lock = threading.Lock()
        # Gate name -> whether the gate was open before the rest of the stream was sent.
        self.gate_results: dict[str, bool] = {}

    def gate(self, name: str) -> threading.Event:
        with self._gate_lock:
            return self._gates.setdefault(name, threading.Event())

    def open_all_gates(self) -> None:
        with self._gate_lock:
            for gate in self._gates.values():
                gate.set()

    def _record(self, method: str, request: RouterRequest | None, context: grpc.aio.ServicerContext) -> None:
        metadata = tuple(
            (key, value) for key, value in context.invocation_metadata() or () if isinstance(value, str)
        )
        self.calls.append(Call(method, request, metadata))

    async def _fail_if_asked(self, model: str, context: grpc.aio.ServicerContext) -> None:
        abort = gateway.abort_with_openai_error
        if model == "missing":
            await abort(
                context,
                grpc.StatusCode.NOT_FOUND,
                "The model `missing` does not exist.",
                type="invalid_request_error",
                code="model_not_found",
                param="model",
            )
        if model == "too-long":
            await abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                "This model's maximum context length is 2048 tokens; the messages have 5000 (Größe).",
                type="invalid_request_error",
                code="context_length_exceeded",
                param="messages",
            )
        if model == "busy":
            await abort(
                context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "Every slot is busy; retry later.",
                type="rate_limit_error",
                code="overloaded",
                retry_after=7,
            )
        if model == "unavailable":
            await abort(
                context,
                grpc.StatusCode.UNAVAILABLE,
                "No backend can serve the model right now.",
                type="server_error",
                code="model_unavailable",
                retry_after=5,
            )
        if model == "too-big":
            await abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                "The prompt is too large.",
                type="invalid_request_error",
                code="request_too_large",
                http_status=413,
            )
        if model == "crash":
            raise RuntimeError("the fake router crashed on purpose")
        if model == "late-error":
            await context.send_initial_metadata(((gateway.CACHE_HEADER, "miss"),))
            await abort(
                context,
                grpc.StatusCode.NOT_FOUND,
                "The model `late-error` went away.",
                type="invalid_request_error",
                code="model_not_found",
            )

    async def _send_cache_metadata(self, model: str, context: grpc.aio.ServicerContext) -> None:
        if model == "cached":
            await context.send_initial_metadata(
                ((gateway.CACHE_HEADER, "hit"), (gateway.SIMILARITY_HEADER, "0.9731"))
            )
        else:
            await context.send_initial_metadata(((gateway.CACHE_HEADER, "miss"),))

    async def CreateChatCompletion(
        self, request: oa.CreateChatCompletionRequest, context: grpc.aio.ServicerContext
    ) -> oa.CreateChatCompletionResponse:
        self._record("CreateChatCompletion", request, context)
        await self._fail_if_asked(request.model, context)
        await self._send_cache_metadata(request.model, context)
        text = _last_text(request)
        return oa.CreateChatCompletionResponse(
            id="chatcmpl-fake",
            object="chat.completion",
            created=1_700_000_000,
            model=request.model,
            choices=[
                oa.ChatCompletionChoice(
                    index=0,
                    message=oa.ChatCompletionMessage(role="assistant", content=f"echo: {text}"),
                    finish_reason="stop",
                )
            ],
            usage=oa.Usage(prompt_tokens=3, completion_tokens=2, total_tokens=5),
        )

    async def StreamChatCompletion(
        self, request: oa.CreateChatCompletionRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[oa.CreateChatCompletionStreamResponse]:
        self._record("StreamChatCompletion", request, context)
        await self._fail_if_asked(request.model, context)
        await self._send_cache_metadata(request.model, context)
        rest = gateway.came_through_rest(context)

        def chunk(index: int, **delta: str) -> oa.CreateChatCompletionStreamResponse:
            return oa.CreateChatCompletionStreamResponse(
                id="chatcmpl-fake",
                object="chat.completion.chunk",
                created=1_700_000_000,
                model=request.model,
                choices=[oa.ChatCompletionChunkChoice(index=0, delta=oa.ChatCompletionDelta(**delta))],
            )

        async for item in self._stream(request, context, chunk, oa.CreateChatCompletionStreamResponse, rest):
            yield item
        if request.model not in ("stream-error",):
            final = chunk(0)
            final.choices[0].finish_reason = "stop"
            yield final
            if rest:
                yield gateway.stream_end(oa.CreateChatCompletionStreamResponse)

    async def CreateCompletion(
        self, request: oa.CreateCompletionRequest, context: grpc.aio.ServicerContext
    ) -> oa.CreateCompletionResponse:
        self._record("CreateCompletion", request, context)
        await self._fail_if_asked(request.model, context)
        await self._send_cache_metadata(request.model, context)
        return oa.CreateCompletionResponse(
            id="cmpl-fake",
            object="text_completion",
            created=1_700_000_000,
            model=request.model,
            choices=[
                oa.CompletionChoice(text=f"echo: {_prompt_text(request)}", index=0, finish_reason="stop")
            ],
            usage=oa.Usage(prompt_tokens=3, completion_tokens=2, total_tokens=5),
        )

    async def StreamCompletion(
        self, request: oa.CreateCompletionRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[oa.CreateCompletionStreamResponse]:
        self._record("StreamCompletion", request, context)
        await self._fail_if_asked(request.model, context)
        await self._send_cache_metadata(request.model, context)
        rest = gateway.came_through_rest(context)

        def chunk(index: int, content: str = "", role: str = "") -> oa.CreateCompletionStreamResponse:
            return oa.CreateCompletionStreamResponse(
                id="cmpl-fake",
                object="text_completion",
                created=1_700_000_000,
                model=request.model,
                choices=[oa.CompletionChoice(text=content, index=0)],
            )

        async for item in self._stream(request, context, chunk, oa.CreateCompletionStreamResponse, rest):
            yield item
        if request.model not in ("stream-error",):
            final = chunk(0)
            final.choices[0].finish_reason = "stop"
            yield final
            if rest:
                yield gateway.stream_end(oa.CreateCompletionStreamResponse)

    async def _stream(
        self,
        request: oa.CreateChatCompletionRequest | oa.CreateCompletionRequest,
        context: grpc.aio.ServicerContext,
        chunk: Callable[..., StreamChunk],
        chunk_type: type[StreamChunk],
        rest: bool,
    ) -> AsyncIterator[StreamChunk]:
        """The shared middle of both streams: first chunk, gate, the other chunks."""
        first = "chunk-0 "
        if request.model == "echo-stream":
            first = (
                _last_text(request)
                if isinstance(request, oa.CreateChatCompletionRequest)
                else _prompt_text(request)
            )
        yield chunk(0, role="assistant", content=first)
        if request.model == "stream-error":
            yield gateway.error_chunk(
                chunk_type,
                "The backend stopped answering.",
                type="server_error",
                code="stream_interrupted",
            )
            if rest:
                yield gateway.stream_end(chunk_type)
            return
        if request.model == "stream-abort":
            await context.abort(grpc.StatusCode.INTERNAL, "the fake router failed mid-stream")
        if request.user:
            gate = self.gate(request.user)
            opened = await asyncio.to_thread(gate.wait, GATE_WAIT_S)
            self.gate_results[request.user] = opened
        for index in range(1, STREAM_CHUNKS):
            yield chunk(index, content=f"chunk-{index} ")

    async def CreateEmbedding(
        self, request: oa.CreateEmbeddingRequest, context: grpc.aio.ServicerContext
    ) -> oa.CreateEmbeddingResponse:
        self._record("CreateEmbedding", request, context)
        await self._fail_if_asked(request.model, context)
        await self._send_cache_metadata(request.model, context)
        count = BIG_EMBEDDING_COUNT if request.model == "big" else 1
        vector = struct_pb2.Value(
            list_value=struct_pb2.ListValue(
                values=[struct_pb2.Value(number_value=0.25)] * EMBEDDING_DIMENSIONS
            )
        )
        return oa.CreateEmbeddingResponse(
            object="list",
            data=[
                oa.EmbeddingData(object="embedding", index=index, embedding=vector) for index in range(count)
            ],
            model=request.model,
            usage=oa.EmbeddingUsage(prompt_tokens=1, total_tokens=1),
        )

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        self._record("ListModels", None, context)
        await context.send_initial_metadata(((gateway.CACHE_HEADER, "bypass"),))
        return pb.ListModelsResponse(
            object="list", data=[oa.ModelCard(id="fake-model", object="model", owned_by="lmcluster")]
        )


def _last_text(request: oa.CreateChatCompletionRequest) -> str:
    if not request.messages:
        return ""
    content = request.messages[-1].content
    return content.string_value if content.HasField("string_value") else ""


def _prompt_text(request: oa.CreateCompletionRequest) -> str:
    return request.prompt.string_value if request.prompt.HasField("string_value") else ""


class FakeRouter:
    """The fake servicer on a grpc.aio server with health, on its own thread and event loop."""

    def __init__(self) -> None:
        self.servicer = FakeRouterServicer()
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fake-router", daemon=True)
        self._server: grpc.aio.Server | None = None

    def start(self) -> int:
        """Serves on 127.0.0.1 on a free port; returns the port."""
        self._thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=30)
        return self.port

    async def _start(self) -> int:
        self._server = grpc.aio.server()
        pb_grpc.add_RouterServiceServicer_to_server(self.servicer, self._server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, self._server)
        port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()
        for service in ("", ROUTER_SERVICE):
            await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
        return port

    def stop(self) -> None:
        self.servicer.open_all_gates()
        if self._server is not None:
            asyncio.run_coroutine_threadsafe(self._server.stop(0), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        self._loop.close()

    @property
    def calls(self) -> list[Call]:
        return self.servicer.calls

    def open_gate(self, name: str) -> None:
        self.servicer.gate(name).set()

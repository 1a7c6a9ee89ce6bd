"""Prometheus metrics shared by every service: RPC counts and latency, and the /metrics endpoint."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from prometheus_client import Counter, Histogram, start_http_server

RPC_REQUESTS = Counter(
    "lmc_grpc_server_handled_total",
    "RPCs completed, by service, method and gRPC status code.",
    ["grpc_service", "grpc_method", "grpc_code"],
)
RPC_LATENCY = Histogram(
    "lmc_grpc_server_handling_seconds",
    "Time from an RPC's start to its last message, by service, method and gRPC status code.",
    ["grpc_service", "grpc_method", "grpc_code"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)


def serve_metrics(host: str, port: int) -> int:
    """Starts the /metrics HTTP endpoint in a background thread; returns the bound port (0 = off)."""
    if port == 0:
        return 0
    server, _thread = start_http_server(port, addr=host)
    return int(server.server_port)


def _split_method(full_method: str) -> tuple[str, str]:
    service, _, method = full_method.lstrip("/").rpartition("/")
    return service, method


def _code_of(context: grpc.aio.ServicerContext, error: BaseException | None) -> str:
    if isinstance(error, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED.name
    code = context.code()
    if code is None:
        return grpc.StatusCode.UNKNOWN.name if error is not None else grpc.StatusCode.OK.name
    return code.name if isinstance(code, grpc.StatusCode) else str(code)


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts every RPC and times it, unary and server-streaming alike."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        service, method = _split_method(handler_call_details.method)

        def record(started: float, context: grpc.aio.ServicerContext, error: BaseException | None) -> None:
            code = _code_of(context, error)
            RPC_LATENCY.labels(service, method, code).observe(time.perf_counter() - started)
            RPC_REQUESTS.labels(service, method, code).inc()

        if handler.unary_unary is not None:
            inner_unary = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                started, error = time.perf_counter(), None
                try:
                    return await inner_unary(request, context)
                except BaseException as exc:
                    error = exc
                    raise
                finally:
                    record(started, context, error)

            return grpc.unary_unary_rpc_method_handler(
                unary_unary, handler.request_deserializer, handler.response_serializer
            )
        if handler.unary_stream is not None:
            inner_stream = handler.unary_stream

            async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                started, error = time.perf_counter(), None
                try:
                    async for response in inner_stream(request, context):
                        yield response
                except BaseException as exc:
                    error = exc
                    raise
                finally:
                    record(started, context, error)

            return grpc.unary_stream_rpc_method_handler(
                unary_stream, handler.request_deserializer, handler.response_serializer
            )
        return handler

"""A Router that sends a unary answer's headers and then never the answer: the test kills it there.

`python -m tests.gateway.dying_router PORT` serves RouterService's unary generation methods on
127.0.0.1:PORT (and gRPC health, so Envoy balances to it). Each call sends its initial metadata
as the real Router does before a whole answer, prints `headers sent METHOD`, and waits forever: a
SIGKILL then lands exactly between an answer's headers and its body.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from lmcluster.router.v1 import router_service_pb2_grpc as pb_grpc

from services.common import gateway
from tests.gateway.fake_router import ROUTER_SERVICE


class HeadersThenNothing(pb_grpc.RouterServiceServicer):
    async def _hang(self, method: str, context: grpc.aio.ServicerContext) -> Any:
        await context.send_initial_metadata(((gateway.CACHE_HEADER, "miss"),))
        print(f"headers sent {method}", flush=True)
        await asyncio.Event().wait()

    async def CreateChatCompletion(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._hang("CreateChatCompletion", context)

    async def CreateCompletion(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._hang("CreateCompletion", context)

    async def CreateEmbedding(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._hang("CreateEmbedding", context)


async def serve(port: int) -> None:
    server = grpc.aio.server()
    pb_grpc.add_RouterServiceServicer_to_server(HeadersThenNothing(), server)
    health_servicer = health.aio.HealthServicer()
    await health_servicer.set(ROUTER_SERVICE, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("serving", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1])))

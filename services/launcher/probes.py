"""Readiness probes the launcher waits on before it starts what depends on a part."""

from __future__ import annotations

import grpc
import httpx
import redis.asyncio as aioredis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.launcher.process import Probe


def redis_ping(url: str) -> Probe:
    async def probe() -> bool:
        client = aioredis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)
        try:
            return bool(await client.ping())
        finally:
            await client.aclose()

    return probe


def http_ok(url: str) -> Probe:
    async def probe() -> bool:
        async with httpx.AsyncClient(timeout=1.0) as client:
            return (await client.get(url)).status_code == 200

    return probe


def grpc_serving(address: str) -> Probe:
    async def probe() -> bool:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
            return reply.status == health_pb2.HealthCheckResponse.SERVING

    return probe

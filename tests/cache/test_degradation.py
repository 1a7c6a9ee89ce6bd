"""The cache never fails a request: Redis killed, hung or absent gives degraded misses, dropped
stores, and recovery without intervention once Redis is back (index recreated on an empty Redis)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from lmcluster.cache.v1 import cache_pb2
from lmcluster.cache.v1 import cache_service_pb2 as pb

from services.cache.store import BreakerState
from tests.cache.conftest import Embedder, RedisProcess, cache_settings, cache_with_stub
from tests.cache.test_cache_service import CHAT_TYPE, chat_answer

RECOVERY_TIMEOUT = 30.0
PROMPT = "How do I reverse a string in Python?"
PARAPHRASE = "In Python, how can I reverse a string?"  # verified equal: a fronted phrase


async def wait_until(
    condition: Callable[[], Awaitable[bool]], what: str, timeout: float = RECOVERY_TIMEOUT
) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        assert time.monotonic() < deadline, f"no {what} after {timeout:.0f} s"
        await asyncio.sleep(0.1)


def store_request(embed: Embedder, prompt: str = PROMPT, exact_key: str = "k") -> pb.StoreRequest:
    return pb.StoreRequest(scope="s", embedding=embed(prompt), exact_key=exact_key, prompt=prompt,
                           response=chat_answer("s[::-1]"), response_type=CHAT_TYPE)  # fmt: skip


def lookup_request(embed: Embedder, prompt: str = PROMPT, exact_key: str = "") -> pb.LookupRequest:
    return pb.LookupRequest(scope="s", embedding=embed(prompt), prompt=prompt, exact_key=exact_key)


async def health(port: int) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    return reply.status


async def test_redis_killed_mid_test_then_restarted(
    own_redis: RedisProcess, cache_prefix: str, embed: Embedder
) -> None:
    settings = cache_settings(
        own_redis.url, cache_prefix, breaker_reset_seconds=0.2, breaker_max_reset_seconds=0.5
    )
    async with cache_with_stub(settings) as (running, stub):
        assert (await stub.Store(store_request(embed))).stored
        assert (await stub.Lookup(lookup_request(embed, PARAPHRASE))).hit

        own_redis.kill()
        for _ in range(10):
            reply = await stub.Lookup(lookup_request(embed, PARAPHRASE, exact_key="k"))
            assert not reply.hit and reply.degraded
        assert running.store.breaker.state is not BreakerState.CLOSED
        dropped = await stub.Store(store_request(embed, "Another question?", "k2"))
        assert not dropped.stored and "Redis unavailable" in dropped.reason
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await stub.Invalidate(pb.InvalidateRequest(all=True))
        assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
        stats = await stub.GetStats(pb.GetStatsRequest())
        assert not stats.redis_available
        assert stats.degraded_lookups >= 10 and stats.misses >= 10 and stats.stores_dropped >= 1
        assert await health(running.port) == health_pb2.HealthCheckResponse.SERVING  # still answers

        # Back, empty (no persistence): the cache recreates its index and serves again by itself.
        own_redis.start()

        async def stores_again() -> bool:
            return (await stub.Store(store_request(embed))).stored

        await wait_until(stores_again, "successful Store after the restart")

        async def semantic_hit() -> bool:
            reply = await stub.Lookup(lookup_request(embed, PARAPHRASE))
            return reply.hit and reply.kind == cache_pb2.HIT_KIND_SEMANTIC

        await wait_until(semantic_hit, "semantic hit after the restart (index recreated)")
        exact = await stub.Lookup(lookup_request(embed, PROMPT, exact_key="k"))
        assert exact.hit and exact.kind == cache_pb2.HIT_KIND_EXACT and not exact.degraded
        assert (await stub.GetStats(pb.GetStatsRequest())).redis_available
        assert running.store.breaker.state is BreakerState.CLOSED


async def test_hung_redis_gives_degraded_misses_and_opens_the_circuit(
    own_redis: RedisProcess, cache_prefix: str, embed: Embedder
) -> None:
    settings = cache_settings(own_redis.url, cache_prefix, lookup_timeout_ms=100, store_timeout_ms=100,
                              admin_timeout_ms=300, breaker_reset_seconds=0.2,
                              breaker_max_reset_seconds=0.5)  # fmt: skip
    async with cache_with_stub(settings) as (running, stub):
        assert (await stub.Store(store_request(embed))).stored
        own_redis.pause()
        try:
            for _ in range(settings.breaker_failures + 2):
                reply = await stub.Lookup(lookup_request(embed, PARAPHRASE))
                assert not reply.hit and reply.degraded
            assert running.store.breaker.state is not BreakerState.CLOSED
            assert not (await stub.Store(store_request(embed, "Something else?", "k3"))).stored
            assert not (await stub.GetStats(pb.GetStatsRequest())).redis_available
        finally:
            own_redis.resume()

        async def hit_again() -> bool:
            return (await stub.Lookup(lookup_request(embed, PARAPHRASE))).hit

        await wait_until(hit_again, "hit after Redis resumed")
        assert running.store.breaker.state is BreakerState.CLOSED


async def test_redis_absent_at_start_then_appears(
    own_redis: RedisProcess, cache_prefix: str, embed: Embedder
) -> None:
    own_redis.kill()
    settings = cache_settings(
        own_redis.url, cache_prefix, breaker_reset_seconds=0.2, breaker_max_reset_seconds=0.5
    )
    async with cache_with_stub(settings, wait_for_index=False) as (running, stub):
        assert await health(running.port) == health_pb2.HealthCheckResponse.NOT_SERVING
        reply = await stub.Lookup(lookup_request(embed, exact_key="k"))
        assert not reply.hit and reply.degraded
        assert not (await stub.Store(store_request(embed))).stored

        own_redis.start()

        async def serving() -> bool:
            return await health(running.port) == health_pb2.HealthCheckResponse.SERVING

        await wait_until(serving, "SERVING once Redis is up and the index exists")

        async def stores() -> bool:
            return (await stub.Store(store_request(embed))).stored

        await wait_until(stores, "Store once Redis is up")
        assert (await stub.Lookup(lookup_request(embed, PARAPHRASE))).hit

"""Cache benchmark: Lookup latency at 10k and 100k entries, the exact path, degraded lookups, and the
precision/recall table of the labelled pairs.

Run: `.venv/bin/python -m pytest tests/bench/bench_cache.py -s` (prints the tables; asserts only
correctness, never time).

- The Cache service runs in its own process (`python -m services.cache.server`, defaults except the
  port, Redis URL and key namespace), on a Redis Stack of its own; the client is this process.
- Entries: random unit vectors clustered around 2,000 centres (so neighbours are close, as
  paraphrases are), spread over 10 scopes; written as Store writes them (one pipeline per batch).
- Lookups, each p50/p99 over LOOKUPS calls:
  * semantic hit: a stored vector slightly perturbed (cosine about 0.99) and its prompt: KNN, one
    verification, the entry read;
  * semantic miss: a fresh random vector (nothing above the threshold);
  * exact path: scope + exact key, no embedding;
  * baseline: the same KNN as a raw FT.SEARCH from this process (redis-py), the floor under Lookup;
    "ratio" is Lookup / baseline;
  * degraded: Redis paused (SIGSTOP) once the circuit is open: a miss without touching Redis.
- Quality: the pairs of tests/data/cache_pairs.jsonl through the service, against plain cosine.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from lmcluster.cache.v1 import cache_service_pb2 as pb
from lmcluster.cache.v1 import cache_service_pb2_grpc as pb_grpc
from redis.asyncio import Redis

from services.cache.index import IndexLayout, scope_tag
from services.cache.store import NewEntry, entry_fields, entry_id_for
from services.cache.verification import verify
from tests.cache.conftest import Embedder, RedisProcess
from tests.cache.test_quality import class_table, cosines, load_pairs, lookup_hits
from tests.fixtures.parts import free_port, running_part

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

DIMENSIONS = 384
SCOPES = 10
CENTRES = 2_000
SIZES = (10_000, 100_000)
LOOKUPS = 400
WARMUP = 40
BATCH = 500
START_TIMEOUT = 60.0
PREFIX = "lmc-bench"
RESPONSE = b"x" * 600  # about one short chat answer, serialized


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


@dataclass
class Latency:
    p50_ms: float
    p99_ms: float

    @classmethod
    def of(cls, seconds: list[float]) -> Latency:
        return cls(percentile(seconds, 0.5) * 1000, percentile(seconds, 0.99) * 1000)

    def __str__(self) -> str:
        return f"p50 {self.p50_ms:7.2f} ms   p99 {self.p99_ms:7.2f} ms"


async def timed(calls: list[Callable[[], Awaitable[object]]], check: Callable[[object], None]) -> Latency:
    for call in calls[:WARMUP]:
        check(await call())
    samples = []
    for call in calls[WARMUP:]:
        started = time.perf_counter()
        result = await call()
        samples.append(time.perf_counter() - started)
        check(result)
    return Latency.of(samples)


def unit(vectors: np.ndarray) -> np.ndarray:
    return (vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)).astype(np.float32)


class Corpus:
    """Clustered unit vectors; entry i is in scope i % SCOPES with prompt "Question number i?"."""

    def __init__(self, seed: int = 7) -> None:
        self.rng = np.random.default_rng(seed)
        self.centres = unit(self.rng.standard_normal((CENTRES, DIMENSIONS)))
        self.vectors = np.zeros((0, DIMENSIONS), dtype=np.float32)

    def grow(self, total: int) -> np.ndarray:
        count = total - len(self.vectors)
        centres = self.centres[self.rng.integers(0, CENTRES, count)]
        fresh = unit(centres + 0.35 * self.rng.standard_normal((count, DIMENSIONS)) / np.sqrt(DIMENSIONS))
        self.vectors = np.vstack([self.vectors, fresh])
        return fresh

    @staticmethod
    def scope(i: int) -> str:
        return f"bench-scope-{i % SCOPES}"

    @staticmethod
    def prompt(i: int) -> str:
        return f"Question number {i}?"


async def populate(
    client: Redis, layout: IndexLayout, corpus: Corpus, start: int, vectors: np.ndarray
) -> float:
    started = time.perf_counter()
    now_ms = int(time.time() * 1000)
    for offset in range(0, len(vectors), BATCH):
        async with client.pipeline(transaction=False) as pipe:
            for j, vector in enumerate(vectors[offset : offset + BATCH]):
                i = start + offset + j
                entry = NewEntry(scope=corpus.scope(i), exact_key=f"exact-{i}", prompt=corpus.prompt(i), response=RESPONSE,
                                 response_type="bench.Answer", model="bench", vector=vector.tobytes(), ttl_s=86_400)  # fmt: skip
                key = layout.entry_key(entry_id_for(entry.scope, entry.exact_key))
                pipe.hset(key, mapping=entry_fields(entry, now_ms))
                pipe.expire(key, entry.ttl_s)
            await pipe.execute()
    return time.perf_counter() - started


async def serving(port: int) -> bool:
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=1
            )
        return reply.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.aio.AioRpcError:
        return False


async def measure_size(stub: pb_grpc.CacheServiceStub, client: Redis, layout: IndexLayout, corpus: Corpus,
                       size: int) -> dict[str, Latency]:  # fmt: skip
    rng = np.random.default_rng(size)
    targets = rng.integers(0, size, LOOKUPS + WARMUP)
    hit_vectors = unit(
        corpus.vectors[targets] + 0.1 * rng.standard_normal((len(targets), DIMENSIONS)) / np.sqrt(DIMENSIONS)
    )
    miss_vectors = unit(rng.standard_normal((len(targets), DIMENSIONS)))

    def semantic(i: int) -> Callable[[], Awaitable[object]]:
        t = int(targets[i])
        request = pb.LookupRequest(
            scope=corpus.scope(t), embedding=hit_vectors[i].tolist(), prompt=corpus.prompt(t)
        )
        return lambda: stub.Lookup(request)

    def miss(i: int) -> Callable[[], Awaitable[object]]:
        t = int(targets[i])
        request = pb.LookupRequest(
            scope=corpus.scope(t), embedding=miss_vectors[i].tolist(), prompt="Unrelated?"
        )
        return lambda: stub.Lookup(request)

    def exact(i: int) -> Callable[[], Awaitable[object]]:
        t = int(targets[i])
        request = pb.LookupRequest(scope=corpus.scope(t), exact_key=f"exact-{t}")
        return lambda: stub.Lookup(request)

    def raw(i: int) -> Callable[[], Awaitable[object]]:
        t = int(targets[i])
        query = f"(@scope_tag:{{{scope_tag(corpus.scope(t))}}})=>[KNN 4 @vec $vec AS dist]"
        blob = hit_vectors[i].tobytes()
        return lambda: client.execute_command(
            "FT.SEARCH", layout.name, query, "PARAMS", "2", "vec", blob, "SORTBY", "dist",
            "RETURN", "3", "dist", "scope", "prompt", "LIMIT", "0", "4", "DIALECT", "2",
        )  # fmt: skip

    def is_hit(kind: int) -> Callable[[object], None]:
        def check(reply: object) -> None:
            assert isinstance(reply, pb.LookupResponse) and reply.hit and reply.kind == kind, reply

        return check

    def is_miss(reply: object) -> None:
        assert isinstance(reply, pb.LookupResponse) and not reply.hit and not reply.degraded

    def has_rows(reply: object) -> None:
        assert isinstance(reply, dict) and reply.get(b"results"), reply

    n = len(targets)
    return {
        "semantic hit": await timed([semantic(i) for i in range(n)], is_hit(2)),
        "semantic miss": await timed([miss(i) for i in range(n)], is_miss),
        "exact hit": await timed([exact(i) for i in range(n)], is_hit(1)),
        "raw FT.SEARCH (baseline)": await timed([raw(i) for i in range(n)], has_rows),
    }


async def index_size(client: Redis, layout: IndexLayout) -> tuple[int, float, int]:
    info = await client.execute_command("FT.INFO", layout.name)
    info = {k.decode() if isinstance(k, bytes) else k: v for k, v in info.items()}
    memory_mb = float(info["vector_index_sz_mb"]) + float(info["total_index_memory_sz_mb"])
    return int(info["num_docs"]), memory_mb, int(info.get("hash_indexing_failures", 0))


def test_cache_benchmark(tmp_path: Path, embedding_model: SentenceTransformer) -> None:
    asyncio.run(run_benchmark(tmp_path, Embedder(embedding_model)))


async def run_benchmark(tmp_path: Path, embed: Embedder) -> None:
    redis_server = RedisProcess(tmp_path, tmp_path / "redis.log")
    redis_server.start()
    port = free_port()
    env = {"LMC_CACHE_PORT": str(port), "REDIS_URL": redis_server.url, "LMC_CACHE_INDEX_PREFIX": PREFIX,
           "LMC_CACHE_METRICS_PORT": "0", "LMC_LOG_LEVEL": "WARNING", "LMC_CACHE_LOG_LEVEL": "WARNING"}  # fmt: skip
    layout = IndexLayout(PREFIX, DIMENSIONS)
    try:
        with running_part("cache", [sys.executable, "-m", "services.cache.server"], tmp_path,
                          env={**os.environ, **env}):  # fmt: skip
            deadline = time.monotonic() + START_TIMEOUT
            while not await serving(port):
                assert time.monotonic() < deadline, "cache service did not become SERVING"
                await asyncio.sleep(0.2)
            client = Redis.from_url(redis_server.url, protocol=3)
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pb_grpc.CacheServiceStub(channel)
                corpus = Corpus()
                results: dict[int, dict[str, Latency]] = {}
                print()
                for size in SIZES:
                    start = len(corpus.vectors)
                    fresh = corpus.grow(size)
                    seconds = await populate(client, layout, corpus, start, fresh)
                    docs, memory_mb, failures = await index_size(client, layout)
                    assert docs == size and failures == 0
                    print(f"{size:,} entries in {SCOPES} scopes: written and indexed in {seconds:.1f} s "
                          f"({len(fresh) / seconds:,.0f}/s); index memory {memory_mb:.1f} MiB")  # fmt: skip
                    results[size] = await measure_size(stub, client, layout, corpus, size)

                degraded = await measure_degraded(stub, redis_server)
                quality = await measure_quality(stub, embed)
            await client.aclose()
    finally:
        redis_server.kill()
    report(results, degraded, quality)


async def measure_degraded(stub: pb_grpc.CacheServiceStub, redis_server: RedisProcess) -> Latency:
    """Redis hung (SIGSTOP): the first lookups spend the timeout and open the circuit; then misses are immediate."""
    request = pb.LookupRequest(scope="bench-scope-0", exact_key="exact-0")
    redis_server.pause()
    try:
        for _ in range(5):  # open the circuit
            await stub.Lookup(request)
        samples = []
        for _ in range(LOOKUPS):
            started = time.perf_counter()
            reply = await stub.Lookup(request)
            samples.append(time.perf_counter() - started)
            assert not reply.hit and reply.degraded
    finally:
        redis_server.resume()
    return Latency.of(samples)


async def measure_quality(stub: pb_grpc.CacheServiceStub, embed: Embedder) -> list[str]:
    pairs = load_pairs()
    hits = await lookup_hits(stub, pairs, embed)
    started = time.perf_counter()
    for pair in pairs:
        verify(pair.b + " ", pair.a)  # a fresh prompt text: nothing memoized for it
    verify_us = (time.perf_counter() - started) / len(pairs) * 1e6
    return [f"{len(pairs)} labelled pairs (verification alone: {verify_us:.0f} µs per candidate)",
            *class_table(pairs, hits, cosines(pairs, embed)).splitlines()]  # fmt: skip


def report(results: dict[int, dict[str, Latency]], degraded: Latency, quality: list[str]) -> None:
    print("\nLookup latency through gRPC (service in its own process), 400 calls each:")
    for size, rows in results.items():
        baseline = rows["raw FT.SEARCH (baseline)"]
        print(f"  {size:,} entries")
        for name, latency in rows.items():
            ratio = "" if name.startswith("raw") else f"   ratio p50 {latency.p50_ms / baseline.p50_ms:4.1f}×"
            print(f"    {name:26} {latency}{ratio}")
    print(f"  Redis hung, circuit open: degraded miss {degraded}")
    print("\nQuality (tests/data/cache_pairs*.jsonl):")
    for line in quality:
        print("  " + line)

"""Embedding benchmark: the gRPC service against sentence-transformers called in-process.

Run: `.venv/bin/python -m pytest tests/bench/bench_embedding.py -s` (prints the tables; asserts only
that the vectors agree, never on time).

- Latency of one short query: p50/p99 of Embed through gRPC (the service in its own process, as
  deployed) against `model.encode([query])` in this process on the same backend; the ratio is the
  service's overhead (protobuf, HTTP/2, the event loop, the batching window).
- Throughput at concurrency 1, 8 and 32 (each client sends one short text per request, the next as
  soon as the last returns) against in-process encoding of batches of the same size, i.e. the best a
  caller holding that many texts at once could do.
- Backends in-process: torch, ONNX float32 and ONNX int8: latency, batch throughput and cosine to
  torch's vectors.
- The direct ONNX path (services/embedding/encoder.py `MeanPooledOnnx`) against
  `SentenceTransformer.encode` on the same session, calls interleaved: one short query and a batch
  of 32.

The service runs with its defaults (LMC_EMBEDDING_* variables apply), so the numbers describe what
`lmcluster serve embedding` does on this machine.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from lmcluster.embedding.v1 import embedding_service_pb2 as pb
from lmcluster.embedding.v1 import embedding_service_pb2_grpc as pb_grpc

from services.embedding.encoder import Encoder, export_onnx, load_encoder, resolve_model
from services.embedding.settings import EmbeddingSettings
from tests.fixtures.parts import free_port, running_part

QUERY = "What is the capital of France?"
LATENCY_CALLS = 300
WARMUP_CALLS = 30
# Requests per concurrency level: enough for a stable rate, few enough for a shared 2-core machine.
REQUESTS = {1: 300, 8: 800, 32: 1600}
START_TIMEOUT = 120.0


def queries(count: int, offset: int = 0) -> list[str]:
    """Distinct short queries, each about as long as QUERY."""
    return [f"What is the capital of country number {offset + i}?" for i in range(count)]


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


def time_calls(call: Callable[[], object], count: int) -> list[float]:
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        call()
        samples.append(time.perf_counter() - started)
    return samples


def table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]
    print(f"\n{title}")
    print("  " + "  ".join(cell.rjust(width) for cell, width in zip(header, widths, strict=True)))
    for row in rows:
        print("  " + "  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True)))


@pytest.fixture(scope="module")
def settings() -> EmbeddingSettings:
    return EmbeddingSettings()


@pytest.fixture(scope="module")
def service_port(settings: EmbeddingSettings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """`python -m services.embedding.server` in its own process, SERVING."""
    export_onnx(resolve_model(settings), settings.onnx_cache_dir)  # what set-up does
    port = free_port()
    env = {"LMC_EMBEDDING_PORT": str(port), "LMC_EMBEDDING_METRICS_PORT": "0"}
    argv = [sys.executable, "-m", "services.embedding.server"]
    with running_part("embedding", argv, tmp_path_factory.mktemp("bench-embedding"), env=env) as part:

        def serving() -> bool:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                request = health_pb2.HealthCheckRequest()
                return (
                    health_pb2_grpc.HealthStub(channel).Check(request, timeout=2).status
                    == health_pb2.HealthCheckResponse.SERVING
                )

        part.wait_until(serving, START_TIMEOUT, "health SERVING")
        if settings.background_lane != "shared":
            # The background lane's copy loads after SERVING; measured beside it, a query waits for CPU.
            part.wait_until(lambda: "background lane ready" in part.log_tail(), START_TIMEOUT, "the background lane")
        yield port


@pytest.fixture(scope="module")
def in_process(settings: EmbeddingSettings) -> Encoder:
    """The service's backend, loaded here: the baseline without gRPC or batching."""
    source = resolve_model(settings)
    return load_encoder(
        source, backend=settings.backend, cache_dir=settings.onnx_cache_dir, threads=settings.threads
    )


async def grpc_latency(stub: pb_grpc.EmbeddingServiceStub) -> Latency:
    for _ in range(WARMUP_CALLS):
        await stub.Embed(pb.EmbedRequest(texts=[QUERY]))
    samples = []
    for _ in range(LATENCY_CALLS):
        started = time.perf_counter()
        await stub.Embed(pb.EmbedRequest(texts=[QUERY]))
        samples.append(time.perf_counter() - started)
    return Latency.of(samples)


async def grpc_throughput(stub: pb_grpc.EmbeddingServiceStub, concurrency: int, requests: int) -> float:
    """Requests per second with `concurrency` clients, each one text per request."""
    texts = queries(requests)
    next_index = 0

    async def client() -> None:
        nonlocal next_index
        while next_index < requests:
            index = next_index
            next_index += 1
            await stub.Embed(pb.EmbedRequest(texts=[texts[index]]))

    await asyncio.gather(*(stub.Embed(pb.EmbedRequest(texts=[QUERY])) for _ in range(concurrency)))
    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return requests / (time.perf_counter() - started)


def in_process_throughput(encoder: Encoder, batch: int, requests: int) -> float:
    """Texts per second encoding batches of `batch` texts in this process."""
    texts = queries(requests)
    encoder.encode(texts[:batch])
    started = time.perf_counter()
    for start in range(0, requests, batch):
        encoder.encode(texts[start : start + batch])
    return requests / (time.perf_counter() - started)


async def test_grpc_service_against_in_process(
    settings: EmbeddingSettings, service_port: int, in_process: Encoder
) -> None:
    model = in_process.model
    for _ in range(WARMUP_CALLS):
        in_process.encode([QUERY])
    # What the service's model thread runs per batch (Encoder.encode), without gRPC or batching.
    local = Latency.of(time_calls(lambda: in_process.encode([QUERY]), LATENCY_CALLS))

    async with grpc.aio.insecure_channel(f"127.0.0.1:{service_port}") as channel:
        stub = pb_grpc.EmbeddingServiceStub(channel)
        remote = await grpc_latency(stub)
        reply = await stub.Embed(pb.EmbedRequest(texts=[QUERY]))
        same = float(
            np.dot(np.array(reply.embeddings[0].vector), model.encode(QUERY, normalize_embeddings=True))
        )
        rates = {c: await grpc_throughput(stub, c, n) for c, n in REQUESTS.items()}
    local_rates = {c: in_process_throughput(in_process, c, n) for c, n in REQUESTS.items()}

    print(
        f"\n\nEmbedding service: backend={settings.backend} threads={settings.threads} "
        f"batch_window_ms={settings.batch_window_ms} max_batch_size={settings.max_batch_size}"
    )
    table(
        f"One short query ({len(QUERY)} chars), {LATENCY_CALLS} sequential calls",
        ["path", "p50 ms", "p99 ms"],
        [
            ["gRPC Embed", f"{remote.p50_ms:.2f}", f"{remote.p99_ms:.2f}"],
            ["in-process encode", f"{local.p50_ms:.2f}", f"{local.p99_ms:.2f}"],
            ["ratio", f"{remote.p50_ms / local.p50_ms:.2f}x", f"{remote.p99_ms / local.p99_ms:.2f}x"],
        ],
    )
    table(
        "Throughput, one text per request (in-process: batches of that many texts)",
        ["concurrency", "gRPC req/s", "in-process texts/s", "gRPC / in-process"],
        [
            [str(c), f"{rates[c]:.0f}", f"{local_rates[c]:.0f}", f"{rates[c] / local_rates[c]:.2f}"]
            for c in REQUESTS
        ],
    )
    assert same > 0.999


def test_backends_in_process(settings: EmbeddingSettings) -> None:
    source = resolve_model(settings)
    export_onnx(source, settings.onnx_cache_dir)
    sentences = [line for line in Path(source.path, "README.md").read_text().splitlines() if len(line) > 30][
        :100
    ]
    batch = queries(32)
    rows = []
    reference: np.ndarray | None = None
    for backend in ("torch", "onnx", "onnx-int8"):
        encoder = load_encoder(
            source, backend=backend, cache_dir=settings.onnx_cache_dir, threads=settings.threads
        )
        model = encoder.model
        for _ in range(WARMUP_CALLS):
            model.encode([QUERY])
        latency = Latency.of(time_calls(lambda m=model: m.encode([QUERY]), LATENCY_CALLS))
        batch_seconds = min(time_calls(lambda m=model: m.encode(batch, batch_size=32), 10))
        vectors = model.encode(sentences, normalize_embeddings=True)
        if reference is None:
            reference = vectors
        cosine = np.sum(vectors * reference, axis=1)
        rows.append(
            [
                backend,
                f"{latency.p50_ms:.2f}",
                f"{latency.p99_ms:.2f}",
                f"{32 / batch_seconds:.0f}",
                f"{cosine.min():.4f}",
                f"{statistics.fmean(cosine.tolist()):.4f}",
            ]
        )
        if backend == "onnx":
            assert cosine.min() >= 0.999
    table(
        f"Backends in-process, {settings.threads} thread(s); cosine to torch over {len(sentences)} sentences",
        ["backend", "p50 ms", "p99 ms", "batch-32 texts/s", "cos min", "cos mean"],
        rows,
    )


def test_direct_onnx_path_against_the_library(in_process: Encoder) -> None:
    direct = in_process.direct
    assert direct is not None, "the service's backend is not ONNX"
    model = in_process.model
    batch = queries(32)
    for texts in ([QUERY], batch):
        np.testing.assert_allclose(
            direct.encode(texts), model.encode(texts, normalize_embeddings=True, batch_size=32), atol=1e-5
        )
    rows = []
    for name, texts, calls in (("one short query", [QUERY], LATENCY_CALLS), ("batch of 32", batch, 30)):
        ours: list[float] = []
        theirs: list[float] = []
        for _ in range(calls):  # interleaved, so that the machine's drift hits both alike
            ours += time_calls(lambda t=texts: direct.encode(t), 1)
            theirs += time_calls(lambda t=texts: model.encode(t, normalize_embeddings=True, batch_size=32), 1)
        a, b = Latency.of(ours), Latency.of(theirs)
        rows.append([name, f"{a.p50_ms:.2f}", f"{b.p50_ms:.2f}", f"{a.p50_ms / b.p50_ms:.2f}x", f"{a.p99_ms:.2f}", f"{b.p99_ms:.2f}"])
    table(
        "Direct ONNX path against SentenceTransformer.encode, same session",
        ["input", "direct p50 ms", "library p50 ms", "ratio", "direct p99 ms", "library p99 ms"],
        rows,
    )


async def test_a_lookup_embedded_in_the_router_against_the_service(service_port: int) -> None:
    """What the Router's lookup waits for: its own copy of the model (services/router/
    lookup_embedding.py, one thread hop) against the Embedding service's Embed over gRPC, calls
    alternating, back to back and 50 ms apart (as lookups come: caches cooled in between)."""
    from services.router.lookup_embedding import LookupEmbedder

    async with grpc.aio.insecure_channel(f"127.0.0.1:{service_port}") as channel:
        stub = pb_grpc.EmbeddingServiceStub(channel)

        async def service(texts: list[str]) -> list[list[float]]:
            replies = [await stub.Embed(pb.EmbedRequest(texts=[text])) for text in texts]
            return [list(reply.embeddings[0].vector) for reply in replies]

        embedder = LookupEmbedder()
        embedder.start(service)  # type: ignore[arg-type]
        assert embedder._task is not None
        await embedder._task
        assert embedder.ready, "the Router's copy did not match the service"
        rows = []
        try:
            for pause in (0.0, 0.05):
                samples: dict[str, list[float]] = {"service": [], "router": []}
                for i in range(LATENCY_CALLS):
                    text = queries(1, offset=i)[0]
                    for name, call in (("service", lambda: service([text])), ("router", lambda: embedder.embed(text))):
                        started = time.perf_counter()
                        await call()
                        samples[name].append(time.perf_counter() - started)
                        await asyncio.sleep(pause)
                theirs, ours = Latency.of(samples["service"]), Latency.of(samples["router"])
                rows.append([
                    "back to back" if not pause else f"{pause * 1000:.0f} ms apart",
                    f"{theirs.p50_ms:.2f} / {theirs.p99_ms:.2f}", f"{ours.p50_ms:.2f} / {ours.p99_ms:.2f}",
                    f"{theirs.p50_ms / ours.p50_ms:.2f}x",
                ])  # fmt: skip
        finally:
            await embedder.close()
    table(
        "A lookup's vector: the Embedding service's Embed against the Router's own copy (p50 / p99 ms)",
        ["calls", "service (gRPC)", "Router's copy", "p50 ratio"],
        rows,
    )

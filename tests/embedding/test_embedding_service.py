"""EmbeddingService over real gRPC with the real all-MiniLM-L6-v2, called through the generated stub."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from lmcluster.embedding.v1 import embedding_service_pb2 as pb
from lmcluster.embedding.v1 import embedding_service_pb2_grpc as pb_grpc
from prometheus_client import REGISTRY

from services.embedding.server import EmbeddingServer
from services.embedding.servicer import SERVICE_NAME
from services.embedding.settings import EmbeddingSettings
from tests.fixtures.parts import free_port, running_part
from tests.fixtures.threads import threads_under

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

pytestmark = pytest.mark.slow

MAX_BATCH = 64
MAX_TEXT_CHARS = 4000
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# Process start: imports and model load on a busy 2-core machine.
PROCESS_START_TIMEOUT = 120.0


def make_settings(**overrides: object) -> EmbeddingSettings:
    values: dict[str, object] = {
        "port": 0,
        "metrics_port": 0,
        "max_batch": MAX_BATCH,
        "max_text_chars": MAX_TEXT_CHARS,
        "batch_window_ms": 2.0,
        "max_batch_size": 32,
        "shutdown_grace_seconds": 5.0,
        # float32, whose vectors equal the library's: these tests compare the service's with them
        # (the default int8 backend's own closeness: tests/embedding/test_encoder.py).
        "backend": "onnx",
        **overrides,
    }
    return EmbeddingSettings(**values)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
async def server() -> AsyncIterator[EmbeddingServer]:
    async with EmbeddingServer(make_settings()) as running:
        yield running


@pytest.fixture(scope="module")
async def stub(server: EmbeddingServer) -> AsyncIterator[pb_grpc.EmbeddingServiceStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield pb_grpc.EmbeddingServiceStub(channel)


def batches(lane: str) -> float:
    return REGISTRY.get_sample_value("lmc_embedding_batch_size_count", {"lane": lane}) or 0.0


def reference(model: SentenceTransformer, texts: list[str]) -> np.ndarray:
    return model.encode(texts, convert_to_numpy=True, normalize_embeddings=True)


async def health(channel: grpc.aio.Channel, service: str = "") -> int:
    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service))
    return reply.status


async def invalid_argument(stub: pb_grpc.EmbeddingServiceStub, texts: list[str]) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await stub.Embed(pb.EmbedRequest(texts=texts))
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    return failure.value.details() or ""


async def test_health_is_not_serving_until_the_model_is_loaded_and_warm() -> None:
    server = EmbeddingServer(make_settings())
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            assert await health(channel) == NOT_SERVING
            assert await health(channel, SERVICE_NAME) == NOT_SERVING
            with pytest.raises(grpc.aio.AioRpcError) as early:
                await pb_grpc.EmbeddingServiceStub(channel).Embed(pb.EmbedRequest(texts=["too early"]))
            assert early.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "loading" in (early.value.details() or "")

            await server.load()
            assert await health(channel) == SERVING
            assert await health(channel, SERVICE_NAME) == SERVING
            reply = await pb_grpc.EmbeddingServiceStub(channel).Embed(pb.EmbedRequest(texts=["now"]))
            assert len(reply.embeddings) == 1
    finally:
        await server.stop()


async def test_embed_returns_normalized_vectors_and_fills_every_field(
    stub: pb_grpc.EmbeddingServiceStub, embedding_model: SentenceTransformer
) -> None:
    texts = ["What is the capital of France?", "Paris is the capital of France.", "hello world"]
    reply = await stub.Embed(pb.EmbedRequest(texts=texts))
    assert reply.model == "all-MiniLM-L6-v2"
    assert reply.dimensions == 384
    assert len(reply.embeddings) == len(texts)
    got = np.array([list(embedding.vector) for embedding in reply.embeddings], dtype=np.float32)
    assert got.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert np.sum(got * reference(embedding_model, texts), axis=1).min() > 0.999
    tokenizer = embedding_model.tokenizer
    for text, embedding in zip(texts, reply.embeddings, strict=True):
        assert embedding.token_count == len(tokenizer(text)["input_ids"])
        assert embedding.truncated is False


async def test_concurrent_callers_each_get_their_own_vectors(
    stub: pb_grpc.EmbeddingServiceStub, embedding_model: SentenceTransformer
) -> None:
    topics = ["the ocean", "tax law", "baking bread", "black holes", "football", "jazz", "volcanoes"]
    requests = [
        [f"Request {i}: a note about {topics[i % len(topics)]} number {i}."]
        + [f"Request {i}, extra text {j} on {topics[(i + j) % len(topics)]}." for j in range(i % 3)]
        for i in range(50)
    ]
    before = batches("interactive")
    replies = await asyncio.gather(*(stub.Embed(pb.EmbedRequest(texts=texts)) for texts in requests))
    assert batches("interactive") > before
    all_texts = [text for texts in requests for text in texts]
    expected = dict(zip(all_texts, reference(embedding_model, all_texts), strict=True))
    for texts, reply in zip(requests, replies, strict=True):
        assert len(reply.embeddings) == len(texts)
        for text, embedding in zip(texts, reply.embeddings, strict=True):
            assert float(np.dot(np.array(embedding.vector, dtype=np.float32), expected[text])) > 0.999


async def test_text_over_the_window_is_truncated_and_says_so(stub: pb_grpc.EmbeddingServiceStub) -> None:
    long = "The committee reviewed every clause of the agreement again. " * 60  # about 600 tokens
    reply = await stub.Embed(pb.EmbedRequest(texts=["short text", long]))
    short_embedding, long_embedding = reply.embeddings
    assert (short_embedding.truncated, long_embedding.truncated) == (False, True)
    assert long_embedding.token_count == 256
    assert short_embedding.token_count == 4


async def test_empty_batch_is_invalid(stub: pb_grpc.EmbeddingServiceStub) -> None:
    assert "texts is empty" in await invalid_argument(stub, [])


async def test_too_many_texts_are_invalid_and_the_message_names_the_limit(
    stub: pb_grpc.EmbeddingServiceStub,
) -> None:
    details = await invalid_argument(stub, [f"text {i}" for i in range(MAX_BATCH + 1)])
    assert details.startswith(f"texts has {MAX_BATCH + 1} entries; the limit is {MAX_BATCH}")
    assert "LMC_EMBEDDING_MAX_BATCH" in details


async def test_a_huge_text_is_invalid(stub: pb_grpc.EmbeddingServiceStub) -> None:
    details = await invalid_argument(stub, ["fine", "x" * (MAX_TEXT_CHARS + 1)])
    assert details.startswith(f"texts[1] has {MAX_TEXT_CHARS + 1} characters; the limit is {MAX_TEXT_CHARS}")
    assert "LMC_EMBEDDING_MAX_TEXT_CHARS" in details


@pytest.mark.parametrize("blank", ["", "   \n\t"])
async def test_empty_strings_are_invalid(stub: pb_grpc.EmbeddingServiceStub, blank: str) -> None:
    assert "texts[2] is empty" in await invalid_argument(stub, ["a", "b", blank])


async def test_the_limits_admit_a_full_batch(stub: pb_grpc.EmbeddingServiceStub) -> None:
    longest = "y " * (MAX_TEXT_CHARS // 2)  # 2000 one-letter words, far over the window
    reply = await stub.Embed(pb.EmbedRequest(texts=[longest] + [f"t{i}" for i in range(MAX_BATCH - 1)]))
    assert len(reply.embeddings) == MAX_BATCH
    assert reply.embeddings[0].truncated


async def test_cancelled_calls_leave_the_others_and_the_service_working(
    stub: pb_grpc.EmbeddingServiceStub,
) -> None:
    calls = [stub.Embed(pb.EmbedRequest(texts=[f"call {i} text {j}" for j in range(8)])) for i in range(20)]
    await asyncio.sleep(0.01)  # let some reach the server; which ones does not matter
    for call in calls[::2]:
        call.cancel()
    for i, call in enumerate(calls):
        if i % 2:
            assert len((await call).embeddings) == 8
        else:
            with contextlib.suppress(asyncio.CancelledError):
                await call  # finished before the cancel, or cancelled
    reply = await stub.Embed(pb.EmbedRequest(texts=["still here"]))
    assert len(reply.embeddings) == 1


BACKGROUND = pb.EMBED_PRIORITY_BACKGROUND


async def test_background_texts_get_the_same_vectors_on_a_lane_of_their_own_under_sched_idle(
    server: EmbeddingServer, stub: pb_grpc.EmbeddingServiceStub, embedding_model: SentenceTransformer
) -> None:
    await server.background_loaded()
    assert server.lanes.background is not None and server.lanes.background.policy == "idle"
    assert threads_under(os.getpid(), os.SCHED_IDLE) >= 1
    texts = ["Which plan includes phone support?", "How long do updates last with the Solo licence?"]
    before = batches("background"), batches("interactive")
    reply = await stub.Embed(pb.EmbedRequest(texts=texts, priority=BACKGROUND))
    assert (batches("background") - before[0], batches("interactive") - before[1]) == (1, 0)
    got = np.array([list(embedding.vector) for embedding in reply.embeddings], dtype=np.float32)
    assert np.sum(got * reference(embedding_model, texts), axis=1).min() > 0.999
    assert [embedding.token_count for embedding in reply.embeddings] == [
        len(embedding_model.tokenizer(text)["input_ids"]) for text in texts
    ]


async def test_an_interactive_text_never_waits_for_background_work(
    server: EmbeddingServer, stub: pb_grpc.EmbeddingServiceStub
) -> None:
    """Two full batches of long texts on the background lane (seconds of CPU) are still running when a
    lookup's text, sent after it, has its vector."""
    await server.background_loaded()
    long_texts = [f"Document {i}: " + "the licence terms and the refund policy explained at length " * 60 for i in range(MAX_BATCH)]
    stores = [asyncio.ensure_future(stub.Embed(pb.EmbedRequest(texts=long_texts, priority=BACKGROUND))) for _ in range(2)]
    await asyncio.sleep(0.2)  # the background lane has taken the first batch
    lookup = await stub.Embed(pb.EmbedRequest(texts=["Is there a refund policy?"]))
    still_running = [not store.done() for store in stores]
    replies = await asyncio.gather(*stores)
    assert len(lookup.embeddings) == 1
    assert any(still_running), "the background work finished before the lookup; it proves nothing"
    assert all(len(reply.embeddings) == MAX_BATCH for reply in replies)


async def test_a_shared_lane_embeds_background_texts_in_the_one_model_thread() -> None:
    async with EmbeddingServer(make_settings(background_lane="shared")) as shared:
        await shared.background_loaded()
        assert shared.lanes.background is None
        async with grpc.aio.insecure_channel(f"127.0.0.1:{shared.port}") as channel:
            before = batches("interactive")
            reply = await pb_grpc.EmbeddingServiceStub(channel).Embed(
                pb.EmbedRequest(texts=["one text"], priority=BACKGROUND)
            )
        assert len(reply.embeddings) == 1 and batches("interactive") == before + 1


def test_the_service_process_serves_and_stops_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    env = {
        "LMC_EMBEDDING_PORT": str(port),
        "LMC_EMBEDDING_METRICS_PORT": "0",
        "LMC_EMBEDDING_LOG_LEVEL": "INFO",
    }
    argv = [sys.executable, "-m", "services.embedding.server"]
    with running_part("embedding", argv, tmp_path, env=env) as part:

        def serving() -> bool:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
                if reply.status != SERVING:
                    return False
                answer = pb_grpc.EmbeddingServiceStub(channel).Embed(
                    pb.EmbedRequest(texts=["ping"]), timeout=10
                )
                return answer.dimensions == 384

        part.wait_until(serving, PROCESS_START_TIMEOUT, "health SERVING")
        part.process.send_signal(signal.SIGTERM)
        assert part.process.wait(30) == 0, part.log_tail()
        assert "embedding stopped" in part.log_tail()

"""EmbeddingService.Embed: validates the batch, queues it on the micro-batcher, answers in order.

Empty strings (and whitespace-only ones, which the model strips to empty) are rejected with
INVALID_ARGUMENT rather than embedded: sentence-transformers would return a vector for "", but it
means nothing, and OpenAI's API rejects empty input the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from lmcluster.embedding.v1 import embedding_service_pb2 as pb
from lmcluster.embedding.v1 import embedding_service_pb2_grpc as pb_grpc
from opentelemetry import trace
from prometheus_client import Counter

from services.embedding.batcher import BatcherClosedError
from services.embedding.lanes import Lanes
from services.embedding.settings import EmbeddingSettings

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["EmbeddingService"].full_name

TEXTS = Counter("lmc_embedding_texts_total", "Texts embedded.")
TRUNCATED_TEXTS = Counter("lmc_embedding_truncated_texts_total", "Texts longer than the model's window.")


@dataclass(frozen=True)
class Limits:
    """What one Embed request may carry."""

    max_batch: int
    max_text_chars: int

    @classmethod
    def from_settings(cls, settings: EmbeddingSettings) -> Limits:
        return cls(max_batch=settings.max_batch, max_text_chars=settings.max_text_chars)


def find_invalid_texts(texts: Sequence[str], limits: Limits) -> str | None:
    """Why the batch cannot be embedded, in words a caller can act on; None when it can."""
    if not texts:
        return "texts is empty; send at least one text to embed"
    if len(texts) > limits.max_batch:
        return (
            f"texts has {len(texts)} entries; the limit is {limits.max_batch} (LMC_EMBEDDING_MAX_BATCH); "
            "split the batch into smaller requests"
        )
    for index, text in enumerate(texts):
        if len(text) > limits.max_text_chars:
            return (
                f"texts[{index}] has {len(text)} characters; the limit is {limits.max_text_chars} "
                "(LMC_EMBEDDING_MAX_TEXT_CHARS); only the first few hundred tokens are embedded anyway"
            )
        if not text.strip():
            return f"texts[{index}] is empty or only whitespace; every text needs some content to embed"
    return None


@dataclass(frozen=True)
class LoadedModel:
    """What the servicer needs once the model is ready."""

    name: str
    dimensions: int
    lanes: Lanes


class EmbeddingServicer(pb_grpc.EmbeddingServiceServicer):
    """Answers Embed once a model is attached; UNAVAILABLE before that."""

    def __init__(self, limits: Limits) -> None:
        self._limits = limits
        self._model: LoadedModel | None = None

    def attach(self, model: LoadedModel) -> None:
        self._model = model

    async def Embed(self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext) -> pb.EmbedResponse:
        model = self._model
        if model is None:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                "the embedding model is still loading; retry when health is SERVING",
            )
        batcher = model.lanes.batcher_for(request.priority)
        assert batcher is not None  # attached only once the interactive lane is loaded
        texts = list(request.texts)
        problem = find_invalid_texts(texts, self._limits)
        if problem is not None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        span = trace.get_current_span()
        if span.is_recording():  # the RPC's span (tracing on): how much work it brought
            span.set_attributes({"lmc.embedding.texts": len(texts), "lmc.embedding.chars": sum(map(len, texts))})
        try:
            results = await batcher.submit(texts)
        except BatcherClosedError as error:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"{error}; retry on another replica or later")
        except Exception as error:  # the model itself failed: nothing the caller did
            log.exception("Embed failed")
            await context.abort(
                grpc.StatusCode.INTERNAL, f"embedding failed: {type(error).__name__}: {error}"
            )
        TEXTS.inc(len(results))
        truncated = sum(result.truncated for result in results)
        if truncated:
            TRUNCATED_TEXTS.inc(truncated)
        return pb.EmbedResponse(
            embeddings=[
                pb.Embedding(
                    vector=result.vector.tolist(), token_count=result.token_count, truncated=result.truncated
                )
                for result in results
            ],
            model=model.name,
            dimensions=model.dimensions,
        )

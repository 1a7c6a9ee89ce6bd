"""The Router's side of the semantic cache: look up before a generation, store after it.

The exact lookup and the embedding of the final user message run at the same time; an exact hit
cancels the embedding. The whole lookup has a small budget (`cache_timeout_seconds`): a slow or
broken cache is a miss, never a failed request. Stores run in the background after the client
has its answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import Literal

import grpc
from google.protobuf import duration_pb2
from google.protobuf.message import Message
from lmcluster.cache.v1 import cache_pb2, cache_service_pb2, cache_service_pb2_grpc
from lmcluster.embedding.v1 import embedding_service_pb2, embedding_service_pb2_grpc

from services.common.cache_scope import CacheScope, cache_scope
from services.router.codec import GenerationRequest

log = logging.getLogger(__name__)

CacheStatus = Literal["hit", "miss", "bypass"]


@dataclass
class CacheDecision:
    status: CacheStatus
    scope: CacheScope | None = None
    kind: str = ""
    similarity: float = 0.0
    entry: cache_pb2.CacheEntry | None = None
    embedding: list[float] = field(default_factory=list)
    store: bool = False

    def parse(self, message_type: type[Message]) -> Message | None:
        """The stored answer as `message_type`, or None if it is of another type or unreadable."""
        if self.entry is None or self.entry.response_type != message_type.DESCRIPTOR.full_name:
            return None
        message = message_type()
        try:
            message.ParseFromString(self.entry.response)
        except Exception:  # a corrupt entry is a miss
            return None
        return message


class AnswerCache:
    def __init__(
        self,
        embedding: embedding_service_pb2_grpc.EmbeddingServiceStub,
        cache: cache_service_pb2_grpc.CacheServiceStub,
        *,
        enabled: bool,
        timeout: float,
    ) -> None:
        self._embedding = embedding
        self._cache = cache
        self._enabled = enabled
        self._timeout = timeout
        self._background: set[asyncio.Task[None]] = set()

    async def lookup(self, request: GenerationRequest, model: str) -> CacheDecision:
        options = request.cache
        scope = cache_scope(request, model=model)
        store = self._enabled and scope.cacheable and not options.skip_store
        if not self._enabled or not scope.cacheable or options.skip_lookup:
            decision = CacheDecision("bypass", scope=scope, store=store)
            if store:
                decision.embedding = await self._embed(scope.prompt)
            return decision
        threshold = options.threshold if options.HasField("threshold") else None
        try:
            async with asyncio.timeout(self._timeout):
                return await self._lookup(scope, threshold, store)
        except (TimeoutError, grpc.aio.AioRpcError) as error:
            log.warning("cache lookup failed (%s); treating it as a miss", _describe(error))
            return CacheDecision("miss", scope=scope, store=False)

    async def _lookup(self, scope: CacheScope, threshold: float | None, store: bool) -> CacheDecision:
        embedding_task = asyncio.create_task(self._embed(scope.prompt))
        try:
            exact = await self._cache.Lookup(cache_service_pb2.LookupRequest(scope=scope.scope, exact_key=scope.exact_key))
            if exact.hit:
                return CacheDecision("hit", scope=scope, kind="exact", similarity=1.0, entry=exact.entry)
            vector = await embedding_task
            if not vector:
                return CacheDecision("miss", scope=scope, store=False)
            request = cache_service_pb2.LookupRequest(
                scope=scope.scope, embedding=vector, exact_key=scope.exact_key, prompt=scope.prompt
            )
            if threshold is not None:
                request.threshold = threshold
            semantic = await self._cache.Lookup(request)
            if semantic.hit:
                kind = "exact" if semantic.kind == cache_pb2.HIT_KIND_EXACT else "semantic"
                return CacheDecision("hit", scope=scope, kind=kind, similarity=semantic.similarity, entry=semantic.entry)
            return CacheDecision("miss", scope=scope, embedding=vector, store=store)
        finally:
            if not embedding_task.done():
                embedding_task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await embedding_task

    async def _embed(self, text: str) -> list[float]:
        try:
            reply = await self._embedding.Embed(embedding_service_pb2.EmbedRequest(texts=[text]), timeout=self._timeout)
        except grpc.aio.AioRpcError as error:
            log.warning("embedding failed (%s); the semantic cache is skipped", error.code().name)
            return []
        return list(reply.embeddings[0].vector) if reply.embeddings else []

    def store_later(self, decision: CacheDecision, response: Message, model_id: str, ttl_seconds: int | None) -> None:
        """Stores the answer in the background; failures are logged, never raised."""
        if not decision.store or decision.scope is None or not decision.embedding:
            return
        request = cache_service_pb2.StoreRequest(
            scope=decision.scope.scope,
            embedding=decision.embedding,
            exact_key=decision.scope.exact_key,
            prompt=decision.scope.prompt,
            response=response.SerializeToString(),
            response_type=response.DESCRIPTOR.full_name,
            model=model_id,
        )
        if ttl_seconds:
            request.ttl.CopyFrom(duration_pb2.Duration(seconds=ttl_seconds))
        task = asyncio.create_task(self._store(request))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _store(self, request: cache_service_pb2.StoreRequest) -> None:
        try:
            reply = await self._cache.Store(request, timeout=5.0)
            if not reply.stored:
                log.info("answer not cached: %s", reply.reason)
        except grpc.aio.AioRpcError as error:
            log.warning("storing an answer failed: %s", _describe(error))

    async def drain(self) -> None:
        """Waits for the stores still running (at shutdown)."""
        if self._background:
            await asyncio.wait(self._background, timeout=5.0)


def _describe(error: BaseException) -> str:
    if isinstance(error, grpc.aio.AioRpcError):
        return f"{error.code().name}: {error.details()}"
    return type(error).__name__

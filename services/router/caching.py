"""The Router's side of the semantic cache: look up before a generation, store after it.

The exact lookup comes first (its key is the canonical prompt: case, spacing, politeness and the
like do not matter), read from Redis by the Router itself where it may (services/router/
index_reader.py), else through the Cache service. On its miss, the same read returns the entries
of the scope with the prompt's words, the only ones verification could accept. None (nearly every
miss): no semantic lookup, and the vector the store needs is computed after the answer. A few: the
Router verifies them itself (services/router/candidates.py); only if one is accepted is the final
user message embedded, to compare it with that entry's vector. So a refused reordering costs no
embedding on the path, and a semantic hit neither a KNN search nor a Lookup RPC. More than
`index_reader.LIMIT`, or no direct read: the Cache's KNN lookup decides, as it always has; the
first lookup then says that a semantic lookup follows a miss, so the Cache counts the request once. The whole lookup has a small budget
(`cache_timeout_seconds`): a slow or broken cache is a miss, never a failed request; a slow one
still gets the answer stored, since the vector is finished in the background. Stores run in the
background after the client has its answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import grpc
from google.protobuf import duration_pb2
from google.protobuf.message import Message
from lmcluster.cache.v1 import cache_pb2, cache_service_pb2, cache_service_pb2_grpc
from lmcluster.embedding.v1 import embedding_service_pb2, embedding_service_pb2_grpc
from lmcluster.registry.v1 import registry_pb2
from lmcluster.supervisor.v1 import supervisor_pb2
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.cache.store import CacheUnavailable, WordCandidate, entry_message
from services.common.cache_scope import CacheScope, cache_scope
from services.router import metrics, observe
from services.router.codec import GenerationRequest
from services.router import candidates as judging
from services.router.index_reader import IndexRead, IndexReader
from services.router.lookup_embedding import LookupEmbedder

log = logging.getLogger(__name__)

CacheStatus = Literal["hit", "miss", "bypass"]
# Request metadata that Envoy's api_key_auth filter sets to the key's client id (a hash of the key).
TENANT_METADATA = "lmc-client"


class CacheTenancy(BaseSettings):
    """Whether API keys share cached answers: `LMC_CACHE_SHARED_ACROSS_KEYS=true` shares them."""

    model_config = SettingsConfigDict(env_prefix="LMC_CACHE_", frozen=True, extra="ignore")

    shared_across_keys: bool = Field(
        False, description="One cache for every API key (public FAQ bots); by default each key has its own."
    )


def same_weights(model: registry_pb2.Model | None, backend: supervisor_pb2.Backend | None) -> bool:
    """Whether the backend that answered runs the file the Registry lists now.

    During a swap the old backend answers until the new one is ready, while lookups already use
    the new file's scope: its answers must not be cached there.
    """
    if model is None or backend is None:
        return False
    if not backend.model_fingerprint:
        return True  # a Supervisor that does not say: the scope's fingerprint is all there is
    return backend.model_fingerprint == model.fingerprint.header_sha256


def tenant_of(metadata: Any) -> str:
    """The API key's client id Envoy forwarded with the request, "" without keys."""
    values = [value for key, value in metadata or () if key == TENANT_METADATA]
    return str(values[-1]) if values else ""
# How long a vector computed for the store (after the lookup's budget) may take.
BACKGROUND_EMBED_TIMEOUT = 10.0


@dataclass
class CacheDecision:
    status: CacheStatus
    scope: CacheScope | None = None
    kind: str = ""
    similarity: float = 0.0
    entry: cache_pb2.CacheEntry | None = None
    embedding: list[float] = field(default_factory=list)
    store: bool = False
    # The vector of a miss whose lookup ran out of time, still being computed; the store awaits it.
    pending_embedding: asyncio.Task[list[float]] | None = None

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
        tenancy: CacheTenancy | None = None,
        index: IndexReader | None = None,
        local: LookupEmbedder | None = None,
    ) -> None:
        self._embedding = embedding
        self._local = local
        self._cache = cache
        self._index = index
        self._enabled = enabled
        self._timeout = timeout
        self._tenancy = tenancy or CacheTenancy()
        self._background: set[asyncio.Task[Any]] = set()

    async def lookup(
        self,
        request: GenerationRequest,
        model: str,
        *,
        weights: str = "",
        tenant: str = "",
        on_exact_miss: Callable[[CacheScope], None] | None = None,
    ) -> CacheDecision:
        """Exact, then semantic lookup (or a bypass), in the `cache lookup` span.

        `weights` identifies the model files that may answer; `tenant` is the API key's client id.
        `on_exact_miss` is called when the exact lookup missed and the semantic one begins (the
        caller may start work that overlaps it).
        """
        with observe.start_cache_lookup() as span:
            decision = await self._decide(request, model, weights, tenant, on_exact_miss)
            observe.record_cache_decision(span, decision)
            return decision

    async def forget(self, entry_id: str) -> bool:
        """Removes an entry whose answer was reported wrong; False if there was none."""
        reply = await self._cache.Invalidate(
            cache_service_pb2.InvalidateRequest(entry_id=entry_id, reported_wrong=True), timeout=5.0
        )
        return reply.removed > 0

    async def _decide(
        self,
        request: GenerationRequest,
        model: str,
        weights: str,
        tenant: str,
        on_exact_miss: Callable[[CacheScope], None] | None,
    ) -> CacheDecision:
        options = request.cache
        tenant = "" if self._tenancy.shared_across_keys else tenant
        scope = cache_scope(request, model=model, weights=weights, tenant=tenant)
        store = self._enabled and scope.cacheable and not options.skip_store
        if not self._enabled or not scope.cacheable or options.skip_lookup:
            # The vector is computed after the answer, for the store: not beside the prompt's processing.
            return CacheDecision("bypass", scope=scope, store=store)
        threshold = options.threshold if options.HasField("threshold") else None
        return await self._lookup(scope, threshold, store, on_exact_miss)

    async def _lookup(
        self,
        scope: CacheScope,
        threshold: float | None,
        store: bool,
        on_exact_miss: Callable[[CacheScope], None] | None = None,
    ) -> CacheDecision:
        """Exact first (no embedding needed: most repeats are word for word), then semantic.

        The whole lookup has `timeout` seconds. Past it the request is a miss, but the embedding
        goes on in the background and the answer is still stored: under load, when lookups are
        slow, is when the cache is needed most.
        """
        deadline = asyncio.get_running_loop().time() + self._timeout
        try:
            async with asyncio.timeout_at(deadline):
                read = await self._read_index(scope, deadline)
        except grpc.aio.AioRpcError as error:
            log.warning("cache lookup failed (%s); treating it as a miss", _describe(error))
            self._record_miss_later(scope)
            return CacheDecision("miss", scope=scope, store=False)
        except TimeoutError:
            log.warning("cache lookup took over %.2f s; treating it as a miss", self._timeout)
            self._record_miss_later(scope)
            return CacheDecision("miss", scope=scope, store=store, pending_embedding=self._embed_later(scope.prompt))
        exact = read.reply
        if exact.hit:
            return CacheDecision("hit", scope=scope, kind="exact", similarity=1.0, entry=exact.entry)
        if exact.no_candidate:
            # No entry of this scope could pass verification (none has this prompt's words; a new
            # system prompt or document has none at all): no semantic lookup, and the vector the
            # store needs is computed after the answer, off the first token's path. The miss is
            # counted.
            return CacheDecision("miss", scope=scope, store=store)
        if read.candidates is not None and self._index is not None:
            return await self._judge(scope, threshold, store, read.candidates, self._index, deadline)
        embedding = self._embed_later(scope.prompt)
        if on_exact_miss is not None:
            on_exact_miss(scope)
        try:
            async with asyncio.timeout_at(deadline):
                vector = await asyncio.shield(embedding)
                if not vector:
                    self._record_miss_later(scope)  # no semantic lookup after all
                    return CacheDecision("miss", scope=scope, store=False)
                request = cache_service_pb2.LookupRequest(
                    scope=scope.scope, embedding=vector, exact_key=scope.exact_key, prompt=scope.prompt
                )
                if threshold is not None:
                    request.threshold = threshold
                semantic = await self._cache.Lookup(request)
        except grpc.aio.AioRpcError as error:
            log.warning("cache lookup failed (%s); treating it as a miss", _describe(error))
            return CacheDecision("miss", scope=scope, store=False)
        except TimeoutError:
            log.warning("cache lookup took over %.2f s; treating it as a miss", self._timeout)
            if not _has_vector(embedding):
                self._record_miss_later(scope)  # the semantic lookup was never asked
            return CacheDecision("miss", scope=scope, store=store, pending_embedding=embedding)
        observe.record_cache_reply(semantic)
        if semantic.hit:
            kind = "exact" if semantic.kind == cache_pb2.HIT_KIND_EXACT else "semantic"
            return CacheDecision("hit", scope=scope, kind=kind, similarity=semantic.similarity, entry=semantic.entry)
        return CacheDecision("miss", scope=scope, embedding=vector, store=store)

    async def _read_index(self, scope: CacheScope, deadline: float) -> IndexRead:
        """Straight from Redis where the Router may read it, else (or when Redis cannot be read) the
        Cache service's exact Lookup, which says `semantic_follows` and returns no candidates."""
        if self._index is not None:
            try:
                return await self._index.lookup(scope, deadline - asyncio.get_running_loop().time())
            except CacheUnavailable as error:
                log.debug("reading the index failed (%s); asking the Cache", error)
        reply = await self._cache.Lookup(
            cache_service_pb2.LookupRequest(
                scope=scope.scope, exact_key=scope.exact_key, prompt=scope.prompt, semantic_follows=True
            )
        )
        return IndexRead(reply)

    async def _judge(
        self,
        scope: CacheScope,
        threshold: float | None,
        store: bool,
        found: list[WordCandidate],
        index: IndexReader,
        deadline: float,
    ) -> CacheDecision:
        """Verification first; only an accepted candidate waits for the prompt's vector, which must
        then be at least `threshold` similar to that candidate's. Counted here, as one lookup."""
        judged = judging.judge(scope.prompt, found)
        rejected = judged.rejected_by_reason()
        observe.record_cache_reply(cache_service_pb2.LookupResponse(rejected=judged.rejected))
        if not judged.accepted:
            index.count(misses=1, rejected=rejected)
            return CacheDecision("miss", scope=scope, store=store)
        settings = index.settings
        limit = settings.threshold if threshold is None else max(threshold, settings.min_threshold)
        embedding = self._embed_later(scope.prompt)
        # The accepted entries are read while the prompt is embedded (nearly always just one).
        remaining = deadline - asyncio.get_running_loop().time()
        entries = asyncio.ensure_future(
            asyncio.gather(*(index.entry(candidate, remaining) for candidate in judged.accepted), return_exceptions=True)
        )
        try:
            async with asyncio.timeout_at(deadline):
                vector = await asyncio.shield(embedding)
                best = judging.closest(vector, judged.accepted, limit) if vector else None
                fetched = await entries if best is not None else []
        except TimeoutError:
            log.warning("cache lookup took over %.2f s; treating it as a miss", self._timeout)
            index.count(misses=1, rejected=rejected)
            return CacheDecision("miss", scope=scope, store=store, pending_embedding=embedding)
        finally:
            entries.cancel()
        entry = None
        if best is not None:
            stored = fetched[judged.accepted.index(best[0])]
            entry = stored if not isinstance(stored, BaseException) else None
        if best is None or entry is None:
            index.count(misses=1, rejected=rejected)
            # No vector (the Embedding service failed): nothing to store either.
            return CacheDecision("miss", scope=scope, embedding=vector, store=store and bool(vector))
        index.count(semantic_hits=1, rejected=rejected)
        return CacheDecision("hit", scope=scope, kind="semantic", similarity=best[1], entry=entry_message(entry))

    def _record_miss_later(self, scope: CacheScope) -> None:
        """Tells the Cache that a request whose first lookup said `semantic_follows` was a miss."""

        async def record() -> None:
            with contextlib.suppress(grpc.aio.AioRpcError):
                await self._cache.Lookup(
                    cache_service_pb2.LookupRequest(scope=scope.scope, record_miss=True), timeout=BACKGROUND_EMBED_TIMEOUT
                )

        task = asyncio.create_task(record())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _embed_later(self, text: str) -> asyncio.Task[list[float]]:
        """The prompt's vector, computed in a task of its own that outlives the lookup's budget."""
        task = asyncio.create_task(self._embed(text, BACKGROUND_EMBED_TIMEOUT))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    def start_local_embedding(self) -> None:
        """Prepares the Router's copy of the model for lookups (when there is one), checked against
        the Embedding service's vectors."""
        if self._local is not None:
            self._local.start(self._service_vectors)

    async def _service_vectors(self, texts: Sequence[str]) -> list[list[float]]:
        """Each text in a request of its own, as a lookup asks (with int8 weights a batch's padding
        moves its vectors a little); [] while the Embedding service does not answer."""
        vectors = []
        for text in texts:
            try:
                request = embedding_service_pb2.EmbedRequest(texts=[text])
                reply = await self._embedding.Embed(request, timeout=BACKGROUND_EMBED_TIMEOUT)
            except grpc.aio.AioRpcError:
                return []
            vectors.append(list(reply.embeddings[0].vector) if reply.embeddings else [])
        return vectors

    async def _embed(
        self, text: str, timeout: float, priority: int = embedding_service_pb2.EMBED_PRIORITY_INTERACTIVE
    ) -> list[float]:
        if priority == embedding_service_pb2.EMBED_PRIORITY_INTERACTIVE and self._local is not None and self._local.ready:
            try:
                with observe.start_local_embedding():
                    vector = await self._local.embed(text)
                metrics.LOOKUP_EMBEDDINGS.labels("router").inc()
                return vector
            except Exception as error:  # the Embedding service still answers: never a failed lookup
                log.warning("embedding in the Router failed (%s); asking the Embedding service", error)
        if priority == embedding_service_pb2.EMBED_PRIORITY_INTERACTIVE:
            metrics.LOOKUP_EMBEDDINGS.labels("service").inc()
        try:
            request = embedding_service_pb2.EmbedRequest(texts=[text], priority=priority)
            reply = await self._embedding.Embed(request, timeout=timeout)
        except grpc.aio.AioRpcError as error:
            log.warning("embedding failed (%s); the semantic cache is skipped", error.code().name)
            return []
        return list(reply.embeddings[0].vector) if reply.embeddings else []

    def store_later(
        self, decision: CacheDecision, response: Message, model_id: str, ttl_seconds: int | None
    ) -> bool:
        """Stores the answer in the background (False: the decision stores nothing); failures are
        logged, never raised."""
        if not decision.store or decision.scope is None:
            return False
        request = cache_service_pb2.StoreRequest(
            scope=decision.scope.scope,
            exact_key=decision.scope.exact_key,
            prompt=decision.scope.prompt,
            response=response.SerializeToString(),
            response_type=response.DESCRIPTOR.full_name,
            model=model_id,
        )
        if ttl_seconds:
            request.ttl.CopyFrom(duration_pb2.Duration(seconds=ttl_seconds))
        task = asyncio.create_task(self._store(request, decision.embedding, decision.pending_embedding))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return True

    async def _store(
        self,
        request: cache_service_pb2.StoreRequest,
        vector: list[float],
        pending: asyncio.Task[list[float]] | None,
    ) -> None:
        """With the vector at hand, one store. Without it, the entry goes in by its exact key at
        once, so an identical request finds it on any Router from now on, even while the vector is
        still computed (under load, when the background lane waits for idle CPU, that takes
        seconds) or the Embedding service is down; the vector is attached when it comes."""
        if not vector and pending is not None and _has_vector(pending):
            vector = pending.result()
        if not vector and request.exact_key:
            if not await self._send_store(request):
                return  # Redis down, or an answer not worth keeping: no vector needed either
            request.attach_embedding = True
        if not vector and pending is not None:
            vector = await pending
        elif not vector:
            # Nobody waits on this one: the Embedding service's background lane, which yields the
            # CPU to lookups and to the generations.
            vector = await self._embed(
                request.prompt, BACKGROUND_EMBED_TIMEOUT, embedding_service_pb2.EMBED_PRIORITY_BACKGROUND
            )
        if not vector:
            return
        request.embedding.extend(vector)
        await self._send_store(request)

    async def _send_store(self, request: cache_service_pb2.StoreRequest) -> bool:
        try:
            reply = await self._cache.Store(request, timeout=5.0)
        except grpc.aio.AioRpcError as error:
            log.warning("storing an answer failed: %s", _describe(error))
            return False
        if not reply.stored:
            log.info("answer not cached: %s", reply.reason)
        return reply.stored

    async def drain(self) -> None:
        """Waits for the stores still running (at shutdown), then reports the last counts."""
        if self._background:
            await asyncio.wait(self._background, timeout=5.0)
        if self._local is not None:
            await self._local.close()
        if self._index is not None:
            await self._index.close()


def _has_vector(task: asyncio.Task[list[float]]) -> bool:
    return task.done() and not task.cancelled() and task.exception() is None and bool(task.result())


def _describe(error: BaseException) -> str:
    if isinstance(error, grpc.aio.AioRpcError):
        return f"{error.code().name}: {error.details()}"
    return type(error).__name__

"""CacheService: exact and semantic lookups with verification, stores, invalidation and counters.

Lookup: the exact path first (one HMGET of the entry derived from scope + exact key), then a KNN
search restricted to the scope, then verification of each candidate at or above the threshold, most
similar first; the first one that passes is served. Any Redis trouble makes a Lookup a miss with
`degraded` set and a Store a `stored: false` answer: the cache never fails a request. Malformed
requests are INVALID_ARGUMENT.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import DecodeError
from lmcluster.cache.v1 import cache_pb2, cache_service_pb2, cache_service_pb2_grpc
from lmcluster.router.v1 import openai_pb2
from prometheus_client import Counter as PromCounter
from prometheus_client import Gauge
from redis.exceptions import RedisError

from services.cache.settings import CacheSettings
from services.cache.store import CacheStore, CacheUnavailable, Candidate, NewEntry, StoredEntry, entry_message
from services.cache.verification import Reason, match_keys, reason_name, verify
from services.common import telemetry

log = logging.getLogger(__name__)
_tracer = telemetry.tracer(__name__)

LOOKUPS = PromCounter(
    "lmc_cache_lookups_total",
    "Cache lookups by result: exact or semantic (hits), miss, degraded.",
    ["result"],
)
HIT_RATIO = Gauge(
    "lmc_cache_hit_ratio",
    "Hits over lookups since this process started (for a window, use rate() of lmc_cache_lookups_total).",
)
REJECTED = PromCounter(
    "lmc_cache_rejected_candidates_total", "Candidates refused by verification.", ["reason"]
)
WRONG_REPORTED = PromCounter(
    "lmc_cache_wrong_answers_reported_total", "Cached answers removed because a client reported them wrong."
)
STORES = PromCounter("lmc_cache_stores_total", "Store requests by outcome.", ["outcome"])
REDIS_UP = Gauge("lmc_cache_redis_available", "1 while the cache's circuit to Redis is closed.")

_REASON_NAMES = {reason: reason_name(reason) for reason in Reason}
_ENTRY_ID_CHARS = set("0123456789abcdef")
# Response types whose completeness the cache checks before storing (others are opaque).
_COMPLETE_TYPES = {
    openai_pb2.CreateChatCompletionResponse.DESCRIPTOR.full_name: openai_pb2.CreateChatCompletionResponse,
    openai_pb2.CreateCompletionResponse.DESCRIPTOR.full_name: openai_pb2.CreateCompletionResponse,
}
_CHUNK_TYPES = {
    openai_pb2.CreateChatCompletionStreamResponse.DESCRIPTOR.full_name,
    openai_pb2.CreateCompletionStreamResponse.DESCRIPTOR.full_name,
}
_STORABLE_FINISH = {"stop", "length", "tool_calls", "function_call"}


class InvalidRequest(ValueError):
    """A request the caller must fix; its message names the field."""


@dataclass
class CacheCounters:
    """Counters since the service started (GetStats)."""

    exact_hits: int = 0
    semantic_hits: int = 0
    misses: int = 0
    degraded_lookups: int = 0
    stores: int = 0
    stores_dropped: int = 0
    wrong_answers_reported: int = 0
    rejected: Counter[str] = field(default_factory=Counter)

    @property
    def lookups(self) -> int:
        return self.exact_hits + self.semantic_hits + self.misses


# --- validation (pure) --------------------------------------------------------------------------


def check_scope(scope: str, settings: CacheSettings) -> None:
    if not scope.strip():
        raise InvalidRequest("scope is empty: compute it with services.common.cache_scope.cache_scope()")
    if len(scope) > settings.max_scope_chars:
        raise InvalidRequest(f"scope is {len(scope)} characters; at most {settings.max_scope_chars}")


def check_exact_key(exact_key: str, settings: CacheSettings) -> None:
    if len(exact_key) > settings.max_scope_chars:
        raise InvalidRequest(f"exact_key is {len(exact_key)} characters; at most {settings.max_scope_chars}")


def check_prompt(prompt: str, settings: CacheSettings) -> None:
    if len(prompt) > settings.max_prompt_chars:
        raise InvalidRequest(f"prompt is {len(prompt)} characters; at most {settings.max_prompt_chars}")


def embedding_bytes(values: list[float] | object, settings: CacheSettings) -> bytes:
    """The L2-normalized embedding as float32 bytes; empty when none was given."""
    vector = np.asarray(values, dtype=np.float64)
    if vector.size == 0:
        return b""
    if vector.size != settings.dimensions:
        raise InvalidRequest(
            f"embedding has {vector.size} dimensions; this cache indexes {settings.dimensions}"
        )
    if not np.all(np.isfinite(vector)):
        raise InvalidRequest("embedding holds NaN or infinite values")
    norm = float(np.linalg.norm(vector))
    if norm == 0.0 or not math.isfinite(norm):
        raise InvalidRequest("embedding is the zero vector")
    return (vector / norm).astype("<f4").tobytes()


def effective_threshold(requested: float | None, settings: CacheSettings) -> float:
    """The request's threshold within [min_threshold, 1], or the default."""
    if requested is None:
        return settings.threshold
    if math.isnan(requested) or requested < 0.0 or requested > 1.0:
        raise InvalidRequest(f"threshold {requested} is outside 0..1")
    return max(requested, settings.min_threshold)


def effective_ttl(ttl: Duration | None, settings: CacheSettings) -> int:
    """TTL in whole seconds within [1, max_ttl], or the default."""
    if ttl is None:
        return settings.ttl
    seconds = ttl.seconds + ttl.nanos / 1e9
    if seconds <= 0:
        raise InvalidRequest(f"ttl must be positive, got {seconds:g} s")
    return max(1, min(math.ceil(seconds), settings.max_ttl))


def incomplete_reason(response: bytes, response_type: str) -> str:
    """Why an answer must not be stored (cut off, ended in an error, a lone chunk); "" if storable."""
    if response_type in _CHUNK_TYPES:
        return "a stream chunk is not an answer: store the assembled response"
    message_type = _COMPLETE_TYPES.get(response_type)
    if message_type is None:
        return ""
    message = message_type()
    try:
        message.ParseFromString(response)
    except DecodeError:
        return f"response does not parse as {response_type}"
    if not message.choices:
        return "response has no choices"
    for choice in message.choices:
        if not choice.HasField("finish_reason"):
            return f"choice {choice.index} was cut off (no finish_reason)"
        if choice.finish_reason not in _STORABLE_FINISH:
            return f"choice {choice.index} ended with finish_reason {choice.finish_reason!r}"
    return ""


def _duration(seconds: float) -> Duration:
    duration = Duration()
    duration.FromNanoseconds(int(max(seconds, 0.0) * 1e9))
    return duration


def _age(entry: StoredEntry) -> Duration:
    return _duration(time.time() - entry.created_ms / 1000)


def _lookup_attributes(
    request: cache_service_pb2.LookupRequest,
    semantic: bool,
    threshold: float,
    response: cache_service_pb2.LookupResponse,
) -> dict[str, Any]:
    """The `cache.lookup` span's story: hit or not, how, how close, and why candidates were refused."""
    kind = cache_pb2.HitKind.Name(response.kind).removeprefix("HIT_KIND_").lower() if response.hit else "none"
    attributes: dict[str, Any] = {
        "lmc.cache.hit": response.hit,
        "lmc.cache.kind": kind,
        "lmc.cache.similarity": round(response.similarity, 6),
        "lmc.cache.threshold": threshold,
        "lmc.cache.semantic": semantic,
        "lmc.cache.scope_hash": telemetry.scope_hash(request.scope),
        "lmc.cache.degraded": response.degraded,
        "lmc.cache.rejected_candidates": len(response.rejected),
    }
    if response.rejected:
        attributes["lmc.cache.rejection_reasons"] = [
            reason_name(candidate.reason) for candidate in response.rejected
        ]
        attributes["lmc.cache.rejected_similarities"] = [
            round(candidate.similarity, 6) for candidate in response.rejected
        ]
    if telemetry.capture_prompts() and request.prompt:
        attributes["lmc.cache.prompt"] = telemetry.traced_prompt(request.prompt)
    return attributes


# --- the service --------------------------------------------------------------------------------


class CacheServicer(cache_service_pb2_grpc.CacheServiceServicer):
    """The RPCs; all Redis work goes through CacheStore."""

    def __init__(self, settings: CacheSettings, store: CacheStore) -> None:
        self.settings = settings
        self.store = store
        self.counters = CacheCounters()

    async def Lookup(
        self, request: cache_service_pb2.LookupRequest, context: grpc.aio.ServicerContext
    ) -> cache_service_pb2.LookupResponse:
        try:
            check_scope(request.scope, self.settings)
            check_exact_key(request.exact_key, self.settings)
            check_prompt(request.prompt, self.settings)
            vector = embedding_bytes(request.embedding, self.settings)
            threshold = effective_threshold(
                request.threshold if request.HasField("threshold") else None, self.settings
            )
            if request.record_miss:
                return self._record_miss()
            if not vector and not request.exact_key:
                raise InvalidRequest("give an embedding, an exact_key, or both")
            if vector and not request.prompt.strip():
                raise InvalidRequest(
                    "prompt is required with an embedding: semantic candidates are verified against it"
                )
        except InvalidRequest as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))

        deadline = time.monotonic() + self.settings.lookup_timeout_ms / 1000
        with _tracer.start_as_current_span("cache.lookup") as span:
            try:
                response = await self._lookup(request, vector, threshold, deadline)
            except CacheUnavailable as error:
                log.debug("lookup degraded: %s", error)
                if not request.semantic_follows:
                    self.counters.misses += 1
                    self.counters.degraded_lookups += 1
                    LOOKUPS.labels("degraded").inc()
                REDIS_UP.set(1 if self.store.available else 0)
                response = cache_service_pb2.LookupResponse(hit=False, degraded=True)
            if span.is_recording():
                span.set_attributes(_lookup_attributes(request, bool(vector), threshold, response))
            self._publish_ratio()
            return response

    def _record_miss(self) -> cache_service_pb2.LookupResponse:
        self.counters.misses += 1
        LOOKUPS.labels("miss").inc()
        self._publish_ratio()
        return cache_service_pb2.LookupResponse(hit=False)

    def _publish_ratio(self) -> None:
        counters = self.counters
        if counters.lookups:
            HIT_RATIO.set((counters.exact_hits + counters.semantic_hits) / counters.lookups)

    @staticmethod
    def _remaining_ms(deadline: float) -> float:
        remaining = (deadline - time.monotonic()) * 1000
        if remaining <= 0:
            raise CacheUnavailable("lookup budget spent")
        return remaining

    async def _lookup(
        self, request: cache_service_pb2.LookupRequest, vector: bytes, threshold: float, deadline: float
    ) -> cache_service_pb2.LookupResponse:
        if request.exact_key:
            entry = await self.store.get_exact(request.scope, request.exact_key, self._remaining_ms(deadline))
            if entry is not None:
                self.counters.exact_hits += 1
                LOOKUPS.labels("exact").inc()
                return cache_service_pb2.LookupResponse(
                    hit=True, kind=cache_pb2.HIT_KIND_EXACT, entry=entry_message(entry), similarity=1.0,
                    age=_age(entry),
                )  # fmt: skip
        rejected: list[cache_pb2.RejectedCandidate] = []
        if vector:
            candidates = await self.store.nearest(
                request.scope, vector, self.settings.candidates, self._remaining_ms(deadline)
            )
            for candidate in candidates:
                if candidate.similarity < threshold:
                    break  # most similar first
                refusal = self._refusal(request.prompt, candidate)
                if refusal is not None:
                    rejected.append(refusal)
                    continue
                entry = await self.store.get_entry(candidate.entry_id, self._remaining_ms(deadline))
                if entry is None or entry.scope != request.scope:
                    continue
                self.counters.semantic_hits += 1
                LOOKUPS.labels("semantic").inc()
                return cache_service_pb2.LookupResponse(
                    hit=True, kind=cache_pb2.HIT_KIND_SEMANTIC, entry=entry_message(entry),
                    similarity=min(candidate.similarity, 1.0), age=_age(entry), rejected=rejected,
                )  # fmt: skip
        if not request.semantic_follows:  # else the follow-up lookup counts this request
            self.counters.misses += 1
            LOOKUPS.labels("miss").inc()
        elif request.exact_key and not vector:
            no_candidate = await self._no_candidate(request, deadline)
            if no_candidate:  # the caller skips the semantic lookup: this was the request's lookup
                self.counters.misses += 1
                LOOKUPS.labels("miss").inc()
            return cache_service_pb2.LookupResponse(hit=False, no_candidate=no_candidate)
        return cache_service_pb2.LookupResponse(hit=False, rejected=rejected)

    async def _no_candidate(self, request: cache_service_pb2.LookupRequest, deadline: float) -> bool:
        """Whether the semantic lookup that follows this exact miss can be skipped: no entry of the
        scope shares a match key with the prompt, so none could pass verification. False when unsure."""
        try:
            # A caller that sends no prompt learns only whether the scope is empty.
            forms = match_keys(request.prompt) if request.prompt.strip() else ()
            return not await self.store.has_candidates(request.scope, forms, self._remaining_ms(deadline))
        except CacheUnavailable:
            return False

    def _refusal(self, prompt: str, candidate: Candidate) -> cache_pb2.RejectedCandidate | None:
        verdict = verify(prompt, candidate.prompt)
        if verdict.accepted:
            return None
        reason = verdict.reason or Reason.UNEXPLAINED
        name = _REASON_NAMES[reason]
        self.counters.rejected[name] += 1
        REJECTED.labels(name).inc()
        return cache_pb2.RejectedCandidate(
            entry_id=candidate.entry_id, similarity=min(candidate.similarity, 1.0), reason=int(reason),
            detail=verdict.detail,
        )  # fmt: skip

    async def Store(
        self, request: cache_service_pb2.StoreRequest, context: grpc.aio.ServicerContext
    ) -> cache_service_pb2.StoreResponse:
        try:
            check_scope(request.scope, self.settings)
            check_exact_key(request.exact_key, self.settings)
            check_prompt(request.prompt, self.settings)
            vector = embedding_bytes(request.embedding, self.settings)
            ttl = effective_ttl(request.ttl if request.HasField("ttl") else None, self.settings)
            if not vector and not request.exact_key:
                raise InvalidRequest("give an embedding, an exact_key, or both")
            if request.attach_embedding and not (vector and request.exact_key):
                raise InvalidRequest("attach_embedding needs the embedding and the exact_key of the stored entry")
            if vector and not request.prompt.strip():
                raise InvalidRequest("prompt is required with an embedding")
            if not request.response:
                raise InvalidRequest("response is empty")
            if not request.response_type:
                raise InvalidRequest("response_type is empty: name the protobuf type of response")
            if len(request.response) > self.settings.max_response_bytes:
                raise InvalidRequest(
                    f"response is {len(request.response)} bytes; at most {self.settings.max_response_bytes}"
                )
        except InvalidRequest as error:
            self.counters.stores_dropped += 1
            STORES.labels("invalid").inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))

        reason = incomplete_reason(request.response, request.response_type)
        if reason:
            self.counters.stores_dropped += 1
            STORES.labels("incomplete").inc()
            return cache_service_pb2.StoreResponse(stored=False, reason=reason)
        entry = NewEntry(
            scope=request.scope, exact_key=request.exact_key, prompt=request.prompt, response=request.response,
            response_type=request.response_type, model=request.model, vector=vector, ttl_s=ttl,
            forms=match_keys(request.prompt) if vector else (),
        )  # fmt: skip
        try:
            if request.attach_embedding:
                attached = await self.store.attach_vector(entry, self.settings.store_timeout_ms)
            else:
                entry_id = await self.store.put(entry, self.settings.store_timeout_ms)
        except CacheUnavailable as error:
            self.counters.stores_dropped += 1
            STORES.labels("dropped").inc()
            REDIS_UP.set(1 if self.store.available else 0)
            return cache_service_pb2.StoreResponse(stored=False, reason=f"Redis unavailable: {error}")
        if request.attach_embedding:
            # The entry was counted when it was stored; this only makes it findable by similarity.
            STORES.labels("embedding_attached" if attached else "entry_gone").inc()
            if attached is None:
                return cache_service_pb2.StoreResponse(
                    stored=False, reason="the entry is gone or holds another answer; nothing was written"
                )
            return cache_service_pb2.StoreResponse(entry_id=attached, stored=True)
        self.counters.stores += 1
        STORES.labels("stored").inc()
        return cache_service_pb2.StoreResponse(entry_id=entry_id, stored=True)

    async def Invalidate(
        self, request: cache_service_pb2.InvalidateRequest, context: grpc.aio.ServicerContext
    ) -> cache_service_pb2.InvalidateResponse:
        target = request.WhichOneof("target")
        try:
            if target == "scope":
                check_scope(request.scope, self.settings)
                removed = await self.store.delete_scope(request.scope)
            elif target == "entry_id":
                if (
                    not request.entry_id
                    or not set(request.entry_id) <= _ENTRY_ID_CHARS
                    or len(request.entry_id) > 64
                ):
                    raise InvalidRequest(
                        f"entry_id {request.entry_id[:80]!r} is not an entry id (lowercase hex)"
                    )
                removed = await self.store.delete_entry(request.entry_id)
                if removed and request.reported_wrong:
                    self.counters.wrong_answers_reported += removed
                    WRONG_REPORTED.inc(removed)
            elif target == "all":
                if not request.all:
                    raise InvalidRequest("all must be true to remove every entry")
                removed = await self.store.delete_all()
            else:
                raise InvalidRequest("say what to remove: scope, entry_id or all")
        except InvalidRequest as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        except CacheUnavailable as error:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"Redis unavailable, nothing removed: {error}")
        log.info("invalidated %d entries (%s)", removed, target)
        return cache_service_pb2.InvalidateResponse(removed=removed)

    async def RecordLookups(
        self, request: cache_service_pb2.RecordLookupsRequest, context: grpc.aio.ServicerContext
    ) -> cache_service_pb2.RecordLookupsResponse:
        unknown = sorted(set(request.rejected_by_reason) - set(_REASON_NAMES.values()))
        if unknown:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"rejected_by_reason names unknown reasons {unknown[:5]}; known: {sorted(_REASON_NAMES.values())}",
            )
        self.counters.exact_hits += request.exact_hits
        self.counters.semantic_hits += request.semantic_hits
        self.counters.misses += request.misses
        LOOKUPS.labels("exact").inc(request.exact_hits)
        LOOKUPS.labels("semantic").inc(request.semantic_hits)
        LOOKUPS.labels("miss").inc(request.misses)
        for name, count in request.rejected_by_reason.items():
            self.counters.rejected[name] += count
            REJECTED.labels(name).inc(count)
        self._publish_ratio()
        return cache_service_pb2.RecordLookupsResponse()

    async def GetStats(
        self, request: cache_service_pb2.GetStatsRequest, context: grpc.aio.ServicerContext
    ) -> cache_service_pb2.GetStatsResponse:
        counters = self.counters
        entries, memory, available = 0, 0, False
        try:
            entries, memory = await self.store.stats()
            available = True
        except (RedisError, OSError, TimeoutError) as error:
            log.debug("stats without Redis: %s", error)
        REDIS_UP.set(1 if available else 0)
        lookups = counters.lookups
        return cache_service_pb2.GetStatsResponse(
            entries=entries,
            exact_hits=counters.exact_hits,
            semantic_hits=counters.semantic_hits,
            misses=counters.misses,
            rejected_candidates=sum(counters.rejected.values()),
            rejected_by_reason=dict(counters.rejected),
            hit_ratio=(counters.exact_hits + counters.semantic_hits) / lookups if lookups else 0.0,
            index_memory_bytes=memory,
            stores=counters.stores,
            stores_dropped=counters.stores_dropped,
            degraded_lookups=counters.degraded_lookups,
            redis_available=available,
            index_name=self.store.layout.name,
            threshold=self.settings.threshold,
            wrong_answers_reported=counters.wrong_answers_reported,
        )

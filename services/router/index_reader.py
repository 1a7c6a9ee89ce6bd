"""The Router's reads of the Cache's Redis index: exact entries, and same-word candidates.

An exact lookup is one HMGET of the entry both sides derive from (scope, exact key). On a miss, one
FT.SEARCH of the scope's tag and the prompt's match keys (services/cache/verification.py
`match_keys`) returns the only entries verification could accept, with their prompts and vectors:
none (nearly every miss: a new document, or only other questions) means no semantic lookup at all;
a few are judged by the Router itself (services/router/candidates.py), so a semantic hit or a
refused candidate costs no Lookup RPC and no KNN search. Only when more than `LIMIT` entries share
the prompt's words does the Cache's KNN lookup pick the nearest. Done here instead of in the Cache
service, these reads take that process off every request's path.

The Cache service stays the only writer of the index and keeps the counts: what the Router
answered by itself is reported with `RecordLookups`, once a second. When Redis cannot be read
(timeout, breaker open), the lookup goes to the Cache service as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from collections import Counter
from dataclasses import dataclass, field

import grpc
from lmcluster.cache.v1 import cache_pb2, cache_service_pb2, cache_service_pb2_grpc

from services.cache.settings import CacheSettings
from services.cache.store import CacheStore, CacheUnavailable, StoredEntry, WordCandidate, entry_message
from services.cache.verification import match_keys
from services.common.cache_scope import CacheScope

log = logging.getLogger(__name__)

REPORT_INTERVAL_SECONDS = 1.0
_REPORT_TIMEOUT_SECONDS = 5.0
# Most same-word entries the Router judges itself; past it, the Cache's KNN search picks the nearest
# `candidates` (a scope rarely holds more than a few orderings of one question's words).
LIMIT = 16


@dataclass
class _Tally:
    exact_hits: int = 0
    semantic_hits: int = 0
    misses: int = 0
    rejected: Counter[str] = field(default_factory=Counter)

    def __bool__(self) -> bool:
        return bool(self.exact_hits or self.semantic_hits or self.misses or self.rejected)


@dataclass(frozen=True)
class IndexRead:
    """What the index says before any embedding: the Cache's exact Lookup reply (with
    `semantic_follows`), and on a miss the same-word candidates (None: too many to read, or
    unknown; the Cache's semantic lookup decides)."""

    reply: cache_service_pb2.LookupResponse
    candidates: list[WordCandidate] | None = None


class IndexReader:
    """Exact lookups and candidate reads against Redis, counted for the Cache service in the background."""

    def __init__(self, settings: CacheSettings, cache: cache_service_pb2_grpc.CacheServiceStub) -> None:
        self.settings = settings
        self._store = CacheStore(settings)
        self._cache = cache
        self._tally = _Tally()
        self._reporter: asyncio.Task[None] | None = None

    async def lookup(self, scope: CacheScope, timeout: float) -> IndexRead:
        """The exact entry, else the prompt's same-word candidates; raises CacheUnavailable when
        Redis cannot be read in time."""
        budget_ms = max(timeout, 0.001) * 1000
        entry = await self._store.get_exact(scope.scope, scope.exact_key, budget_ms)
        if entry is not None:
            self.count(exact_hits=1)
            reply = cache_service_pb2.LookupResponse(
                hit=True, kind=cache_pb2.HIT_KIND_EXACT, entry=entry_message(entry), similarity=1.0
            )
            return IndexRead(reply)
        # Verification compares prompts: with no prompt, nothing but the exact entry can answer.
        forms = match_keys(scope.prompt) if scope.prompt.strip() else ()
        candidates = await self._store.word_candidates(scope.scope, forms, LIMIT, budget_ms) if forms else []
        if candidates == []:
            self.count(misses=1)
            return IndexRead(cache_service_pb2.LookupResponse(hit=False, no_candidate=True), [])
        return IndexRead(cache_service_pb2.LookupResponse(hit=False), candidates)

    async def entry(self, candidate: WordCandidate, timeout: float) -> StoredEntry | None:
        """The candidate's whole entry (None if it expired or was removed since it was read)."""
        entry = await self._store.get_entry(candidate.entry_id, max(timeout, 0.001) * 1000)
        return entry if entry is not None and entry.scope == candidate.scope else None

    def count(
        self, *, exact_hits: int = 0, semantic_hits: int = 0, misses: int = 0, rejected: Counter[str] | None = None
    ) -> None:
        """Adds what the Router decided by itself to the next report."""
        self._tally.exact_hits += exact_hits
        self._tally.semantic_hits += semantic_hits
        self._tally.misses += misses
        self._tally.rejected.update(rejected or {})
        if self._reporter is None or self._reporter.done():
            # A context of its own: the report belongs to no request's trace.
            self._reporter = asyncio.create_task(self._report_soon(), context=contextvars.Context())

    async def _report_soon(self) -> None:
        """Sends what was counted after a second's worth has gathered; a failed report is kept for
        the next one (the counts are statistics: losing them at a crash loses no answer)."""
        await asyncio.sleep(REPORT_INTERVAL_SECONDS)
        await self.report()

    async def report(self) -> None:
        tally, self._tally = self._tally, _Tally()
        if not tally:
            return
        request = cache_service_pb2.RecordLookupsRequest(
            exact_hits=tally.exact_hits,
            semantic_hits=tally.semantic_hits,
            misses=tally.misses,
            rejected_by_reason=dict(tally.rejected),
        )
        try:
            await self._cache.RecordLookups(request, timeout=_REPORT_TIMEOUT_SECONDS)
        except grpc.aio.AioRpcError as error:
            log.debug("reporting lookups to the Cache failed (%s); kept for the next report", error.code().name)
            self._tally.exact_hits += tally.exact_hits
            self._tally.semantic_hits += tally.semantic_hits
            self._tally.misses += tally.misses
            self._tally.rejected.update(tally.rejected)

    async def close(self) -> None:
        if self._reporter is not None:
            self._reporter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reporter
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.CancelledError):
            await self.report()
        await self._store.close()


__all__ = ["CacheUnavailable", "IndexRead", "IndexReader"]

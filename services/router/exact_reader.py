"""The Router's exact lookups, read straight from the Cache's Redis index.

An exact lookup is one HMGET of the entry both sides derive from (scope, exact key); on a miss,
one FT.SEARCH count says whether any entry of the scope could be a semantic candidate
(services/cache/verification.py `match_keys`). Done here instead of in a Lookup RPC, they take
the Cache's process off every request's path (about a millisecond, and that process's tail).

The Cache service stays the only writer of the index and keeps the counts: what the Router
answered by itself is reported with `RecordLookups`, once a second. When Redis cannot be read
(timeout, breaker open), the lookup goes to the Cache service as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from dataclasses import dataclass

import grpc
from lmcluster.cache.v1 import cache_pb2, cache_service_pb2, cache_service_pb2_grpc

from services.cache.settings import CacheSettings
from services.cache.store import CacheStore, CacheUnavailable, entry_message
from services.cache.verification import match_keys
from services.common.cache_scope import CacheScope

log = logging.getLogger(__name__)

REPORT_INTERVAL_SECONDS = 1.0
_REPORT_TIMEOUT_SECONDS = 5.0


@dataclass
class _Tally:
    exact_hits: int = 0
    misses: int = 0


class ExactReader:
    """Exact lookups against Redis, counted for the Cache service in the background."""

    def __init__(self, settings: CacheSettings, cache: cache_service_pb2_grpc.CacheServiceStub) -> None:
        self._store = CacheStore(settings)
        self._cache = cache
        self._tally = _Tally()
        self._reporter: asyncio.Task[None] | None = None

    async def lookup(self, scope: CacheScope, timeout: float) -> cache_service_pb2.LookupResponse:
        """What the Cache's exact Lookup (with `semantic_follows`) would answer; raises
        CacheUnavailable when Redis cannot be read in time."""
        budget_ms = max(timeout, 0.001) * 1000
        entry = await self._store.get_exact(scope.scope, scope.exact_key, budget_ms)
        if entry is not None:
            self._count(exact_hits=1)
            return cache_service_pb2.LookupResponse(
                hit=True, kind=cache_pb2.HIT_KIND_EXACT, entry=entry_message(entry), similarity=1.0
            )
        forms = match_keys(scope.prompt) if scope.prompt.strip() else ()
        if await self._store.has_candidates(scope.scope, forms, budget_ms):
            return cache_service_pb2.LookupResponse(hit=False)  # the semantic lookup that follows counts it
        self._count(misses=1)
        return cache_service_pb2.LookupResponse(hit=False, no_candidate=True)

    def _count(self, *, exact_hits: int = 0, misses: int = 0) -> None:
        self._tally.exact_hits += exact_hits
        self._tally.misses += misses
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
        if not (tally.exact_hits or tally.misses):
            return
        request = cache_service_pb2.RecordLookupsRequest(exact_hits=tally.exact_hits, misses=tally.misses)
        try:
            await self._cache.RecordLookups(request, timeout=_REPORT_TIMEOUT_SECONDS)
        except grpc.aio.AioRpcError as error:
            log.debug("reporting lookups to the Cache failed (%s); kept for the next report", error.code().name)
            self._tally.exact_hits += tally.exact_hits
            self._tally.misses += tally.misses

    async def close(self) -> None:
        if self._reporter is not None:
            self._reporter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reporter
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.CancelledError):
            await self.report()
        await self._store.close()


__all__ = ["CacheUnavailable", "ExactReader"]

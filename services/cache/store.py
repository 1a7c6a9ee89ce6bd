"""Redis access for the cache: entries, KNN search, invalidation, with timeouts and a circuit breaker.

The cache must never make a request fail or wait: every call into Redis runs under a deadline
(`asyncio.timeout`), and a small circuit breaker counts consecutive failures. Once it opens,
calls fail at once without touching Redis (a Lookup is then a miss in microseconds) until a single
trial call is let through after `breaker_reset_seconds`; each failed trial doubles the wait, up to
`breaker_max_reset_seconds`, and a successful one closes the circuit. redis-py's own retries are
turned off: retrying is exactly what the critical path cannot afford. (No tenacity here: it retries,
it does not short-circuit.)

Redis restarted empty (no persistence) loses the index too: a search that finds no index schedules
`ensure_index` in the background, and entries stored meanwhile are indexed when it is created.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from lmcluster.cache.v1 import cache_pb2
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError

from services.cache.index import IndexLayout, ensure_index, index_stats, is_missing_index_error, scope_tag
from services.cache.settings import CacheSettings
from services.common import telemetry

log = logging.getLogger(__name__)

T = TypeVar("T")

# Fields read for a served entry (the vector is never read back).
_ENTRY_FIELDS = ("scope", "exact_key", "prompt", "response", "response_type", "model", "created_ms", "ttl_s")
_DELETE_BATCH = 1000
# Adds a vector (and the match keys it brings) to an entry, only while the entry holds the answer it
# was computed for: a check and a write in one step, so an entry invalidated or replaced in between
# is never brought back or given another answer's vector.
_ATTACH_VECTOR = """
if redis.call('HGET', KEYS[1], 'response') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'vec', ARGV[2])
if ARGV[3] ~= '' then redis.call('HSET', KEYS[1], 'forms', ARGV[3]) end
return 1
"""


class CacheUnavailable(Exception):
    """Redis could not be used for this call: down, slow, circuit open, or index missing."""


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Opens after `failures` consecutive failures; lets one trial through after a growing pause."""

    def __init__(self, failures: int, reset_seconds: float, max_reset_seconds: float,
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self._threshold = failures
        self._base_reset = reset_seconds
        self._max_reset = max(max_reset_seconds, reset_seconds)
        self._clock = clock
        self._failures = 0
        self._reset = reset_seconds
        self._opened_at = 0.0
        self._trial_in_flight = False
        self.state = BreakerState.CLOSED

    def allow(self) -> bool:
        """Whether a call may go to Redis now."""
        if self.state is BreakerState.CLOSED:
            return True
        if self.state is BreakerState.OPEN and self._clock() - self._opened_at >= self._reset:
            self.state = BreakerState.HALF_OPEN
            self._trial_in_flight = False
        if self.state is BreakerState.HALF_OPEN and not self._trial_in_flight:
            self._trial_in_flight = True
            return True
        return False

    def success(self) -> None:
        if self.state is not BreakerState.CLOSED:
            log.info("Redis answers again: cache circuit closed")
        self.state = BreakerState.CLOSED
        self._failures = 0
        self._reset = self._base_reset
        self._trial_in_flight = False

    def failure(self) -> None:
        self._failures += 1
        if self.state is BreakerState.HALF_OPEN:
            self._reset = min(self._reset * 2, self._max_reset)
            self._open()
        elif self.state is BreakerState.CLOSED and self._failures >= self._threshold:
            self._open()

    def _open(self) -> None:
        if self.state is BreakerState.CLOSED:
            log.warning(
                "Redis failed %d times in a row: cache circuit open for %.1f s", self._failures, self._reset
            )
        self.state = BreakerState.OPEN
        self._opened_at = self._clock()
        self._trial_in_flight = False


@dataclass(frozen=True)
class StoredEntry:
    """An entry as read back from Redis."""

    entry_id: str
    scope: str
    exact_key: str
    prompt: str
    response: bytes
    response_type: str
    model: str
    created_ms: int
    ttl_s: int


@dataclass(frozen=True)
class Candidate:
    """A nearest neighbour of a lookup's embedding, within its scope."""

    entry_id: str
    similarity: float
    scope: str
    prompt: str


@dataclass(frozen=True)
class WordCandidate:
    """An entry whose prompt shares a match key with a lookup's (the only kind verification can
    accept), with its stored vector (empty for an entry stored without one)."""

    entry_id: str
    scope: str
    prompt: str
    vector: bytes


@dataclass(frozen=True)
class NewEntry:
    """What Store writes."""

    scope: str
    exact_key: str
    prompt: str
    response: bytes
    response_type: str
    model: str
    vector: bytes  # little-endian float32, empty for an exact-only entry
    ttl_s: int
    forms: tuple[str, ...] = ()  # the prompt's match keys (verification.match_keys)


def entry_id_for(scope: str, exact_key: str) -> str:
    """Entries with an exact key get a derived id: the exact path is then one HMGET, and storing the
    same request again replaces the entry instead of adding a duplicate."""
    if not exact_key:
        return uuid.uuid4().hex
    return hashlib.sha256(f"{scope}\x00{exact_key}".encode()).hexdigest()[:32]


def entry_fields(entry: NewEntry, created_ms: int) -> dict[str, bytes | str | int]:
    """The Redis hash of an entry (see services/cache/index.py for which fields are indexed)."""
    fields: dict[str, bytes | str | int] = {
        "scope": entry.scope,
        "scope_tag": scope_tag(entry.scope),
        "exact_key": entry.exact_key,
        "prompt": entry.prompt,
        "response": entry.response,
        "response_type": entry.response_type,
        "model": entry.model,
        "created_ms": created_ms,
        "ttl_s": entry.ttl_s,
    }
    if entry.vector:
        fields["vec"] = entry.vector
    if entry.forms:
        fields["forms"] = ",".join(entry.forms)
    return fields


def entry_message(entry: StoredEntry, *, with_response: bool = True) -> cache_pb2.CacheEntry:
    """The entry as the API shows it (Lookup's `entry`)."""
    created = Timestamp()
    created.FromMilliseconds(entry.created_ms)
    return cache_pb2.CacheEntry(
        entry_id=entry.entry_id,
        scope=entry.scope,
        exact_key=entry.exact_key,
        prompt=entry.prompt,
        response=entry.response if with_response else b"",
        response_type=entry.response_type,
        model=entry.model,
        created_at=created,
        ttl=Duration(seconds=entry.ttl_s),
    )


def _text(value: Any) -> str:
    if value is None:
        return ""
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


class CacheStore:
    """All Redis work of the cache service."""

    def __init__(self, settings: CacheSettings, client: Redis | None = None) -> None:
        self.settings = settings
        self.layout = IndexLayout(settings.index_prefix, settings.dimensions)
        if client is None:
            pool = BlockingConnectionPool.from_url(
                settings.redis_url,
                max_connections=settings.pool_size,
                timeout=settings.admin_timeout_ms / 1000,
                socket_connect_timeout=settings.connect_timeout_ms / 1000,
                socket_timeout=settings.admin_timeout_ms / 1000,
                retry=Retry(NoBackoff(), 0),
                protocol=3,
            )
            client = Redis(connection_pool=pool, protocol=3, retry=Retry(NoBackoff(), 0))
        # A span per command while tracing is on (arguments, so prompts and vectors, left out).
        telemetry.instrument_redis_client(client)
        self.client = client
        self._attach_vector = client.register_script(_ATTACH_VECTOR)
        self.breaker = CircuitBreaker(
            settings.breaker_failures, settings.breaker_reset_seconds, settings.breaker_max_reset_seconds
        )
        self.index_ready = asyncio.Event()
        self._index_task: asyncio.Task[None] | None = None
        self._closed = False

    # --- plumbing ------------------------------------------------------------------------------

    async def _guarded(self, operation: Callable[[], Awaitable[T]], timeout_ms: float) -> T:
        """Runs one Redis operation under a deadline and the breaker; CacheUnavailable on any failure."""
        if not self.breaker.allow():
            raise CacheUnavailable("circuit open")
        try:
            async with asyncio.timeout(timeout_ms / 1000):
                result = await operation()
        except ResponseError as error:
            if is_missing_index_error(error):
                # Redis answers, so the breaker stays closed; the index is rebuilt in the background.
                self.breaker.success()
                self.index_ready.clear()
                self.start_index_keeper()
                raise CacheUnavailable("index missing; recreating it") from error
            self.breaker.failure()
            raise CacheUnavailable(f"Redis error: {error}") from error
        except (RedisError, OSError, TimeoutError) as error:
            self.breaker.failure()
            raise CacheUnavailable(
                f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
            ) from error
        self.breaker.success()
        return result

    @property
    def available(self) -> bool:
        """Whether the last calls reached Redis (the circuit is not open)."""
        return self.breaker.state is BreakerState.CLOSED

    async def ensure_index(self) -> bool:
        """Creates the index if missing (no breaker: start-up and the keeper call it)."""
        async with asyncio.timeout(self.settings.admin_timeout_ms / 1000):
            created = await ensure_index(self.client, self.layout)
        self.index_ready.set()
        return created

    def start_index_keeper(self) -> None:
        """Keeps trying to ensure the index in the background until it exists (Redis may be down)."""
        if self._closed or (self._index_task is not None and not self._index_task.done()):
            return
        self._index_task = asyncio.create_task(self._keep_index(), name="cache-index-keeper")

    async def _keep_index(self) -> None:
        delay = 0.1
        while not self._closed:
            try:
                await self.ensure_index()
                self.breaker.success()
                return
            except (RedisError, OSError, TimeoutError) as error:
                log.warning(
                    "cache index not ready (%s); retrying in %.1f s", error or type(error).__name__, delay
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def close(self) -> None:
        self._closed = True
        if self._index_task is not None:
            self._index_task.cancel()
            try:
                await self._index_task
            except asyncio.CancelledError:
                pass
        await self.client.aclose()
        await self.client.connection_pool.disconnect()

    # --- lookups --------------------------------------------------------------------------------

    async def _read_entry(self, entry_id: str) -> StoredEntry | None:
        values = await self.client.hmget(self.layout.entry_key(entry_id), list(_ENTRY_FIELDS))
        if values[0] is None or values[3] is None:
            return None  # gone (expired or invalidated) since it was found
        fields = dict(zip(_ENTRY_FIELDS, values, strict=True))
        return StoredEntry(
            entry_id=entry_id,
            scope=_text(fields["scope"]),
            exact_key=_text(fields["exact_key"]),
            prompt=_text(fields["prompt"]),
            response=bytes(fields["response"] or b""),
            response_type=_text(fields["response_type"]),
            model=_text(fields["model"]),
            created_ms=int(fields["created_ms"] or 0),
            ttl_s=int(fields["ttl_s"] or 0),
        )

    async def get_exact(self, scope: str, exact_key: str, timeout_ms: float) -> StoredEntry | None:
        """The entry stored for exactly this request, if any: one HMGET, no search."""
        entry_id = entry_id_for(scope, exact_key)
        entry = await self._guarded(lambda: self._read_entry(entry_id), timeout_ms)
        if entry is None or entry.scope != scope or entry.exact_key != exact_key:
            return None
        return entry

    async def has_candidates(self, scope: str, forms: tuple[str, ...], timeout_ms: float) -> bool:
        """Whether any entry of this scope shares a match key with the prompt (else no candidate of
        a KNN search could pass verification); with no keys, whether the scope holds any entry.
        Tags are hashes: a collision says yes, which only costs a lookup."""
        query = f"@scope_tag:{{{scope_tag(scope)}}}"
        if forms:
            query += f" @forms:{{{' | '.join(forms)}}}"

        async def count() -> Any:
            return await self.client.execute_command(
                "FT.SEARCH", self.layout.name, query, "NOCONTENT", "LIMIT", "0", "0", "DIALECT", "2"
            )

        reply = await self._guarded(count, timeout_ms)
        total = reply.get(b"total_results") if isinstance(reply, dict) else None
        return total is None or int(total) > 0

    async def word_candidates(
        self, scope: str, forms: tuple[str, ...], limit: int, timeout_ms: float
    ) -> list[WordCandidate] | None:
        """The entries of this scope that share one of the prompt's match keys, with their prompts
        and vectors; None when more than `limit` do (a KNN search then picks the nearest).
        A scope_tag collision is filtered out here: another scope's entry is never a candidate."""
        query = f"@scope_tag:{{{scope_tag(scope)}}} @forms:{{{' | '.join(forms)}}}"

        async def search() -> Any:
            return await self.client.execute_command(
                "FT.SEARCH", self.layout.name, query, "RETURN", "3", "scope", "prompt", "vec",
                "LIMIT", "0", str(limit + 1), "DIALECT", "2",
            )  # fmt: skip

        reply = await self._guarded(search, timeout_ms)
        rows = reply.get(b"results", []) if isinstance(reply, dict) else None
        if rows is None or len(rows) > limit:
            return None
        prefix = len(self.layout.key_prefix)
        candidates = []
        for row in rows:
            fields = row.get(b"extra_attributes", {})
            if _text(fields.get(b"scope")) != scope:
                continue
            vector = fields.get(b"vec") or b""
            candidates.append(
                WordCandidate(
                    entry_id=_text(row.get(b"id"))[prefix:],
                    scope=scope,
                    prompt=_text(fields.get(b"prompt")),
                    vector=vector if isinstance(vector, bytes) else b"",
                )
            )
        return candidates

    async def nearest(self, scope: str, vector: bytes, k: int, timeout_ms: float) -> list[Candidate]:
        """The k nearest entries of this scope by cosine similarity, most similar first."""
        query = f"(@scope_tag:{{{scope_tag(scope)}}})=>[KNN {k} @vec $vec AS dist]"

        async def search() -> Any:
            return await self.client.execute_command(
                "FT.SEARCH", self.layout.name, query, "PARAMS", "2", "vec", vector,
                "SORTBY", "dist", "RETURN", "3", "dist", "scope", "prompt",
                "LIMIT", "0", str(k), "DIALECT", "2",
            )  # fmt: skip

        reply = await self._guarded(search, timeout_ms)
        candidates = []
        prefix = len(self.layout.key_prefix)
        for row in reply.get(b"results", []):
            fields = row.get(b"extra_attributes", {})
            distance = float(_text(fields.get(b"dist")) or 2.0)
            entry_scope = _text(fields.get(b"scope"))
            if entry_scope != scope:
                continue  # a scope_tag collision: never serve another scope
            candidates.append(
                Candidate(
                    entry_id=_text(row.get(b"id"))[prefix:],
                    similarity=1.0 - distance,
                    scope=entry_scope,
                    prompt=_text(fields.get(b"prompt")),
                )
            )
        return candidates

    async def get_entry(self, entry_id: str, timeout_ms: float) -> StoredEntry | None:
        return await self._guarded(lambda: self._read_entry(entry_id), timeout_ms)

    # --- writes ---------------------------------------------------------------------------------

    async def put(self, entry: NewEntry, timeout_ms: float) -> str:
        """Writes an entry with its TTL in one transaction; returns its id."""
        entry_id = entry_id_for(entry.scope, entry.exact_key)
        key = self.layout.entry_key(entry_id)
        mapping = entry_fields(entry, int(time.time() * 1000))

        async def write() -> None:
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.unlink(key)  # a re-stored request replaces its entry, vector included
                pipe.hset(key, mapping=mapping)
                pipe.expire(key, entry.ttl_s)
                await pipe.execute()

        await self._guarded(write, timeout_ms)
        return entry_id

    async def attach_vector(self, entry: NewEntry, timeout_ms: float) -> str | None:
        """Adds `entry.vector` and `entry.forms` to the entry of its exact key stored earlier without
        them; None, writing nothing, when that entry is gone or holds another response."""
        entry_id = entry_id_for(entry.scope, entry.exact_key)
        args = [entry.response, entry.vector, ",".join(entry.forms)]
        key = self.layout.entry_key(entry_id)
        attached = await self._guarded(lambda: self._attach_vector(keys=[key], args=args), timeout_ms)
        return entry_id if attached else None

    async def delete_entry(self, entry_id: str) -> int:
        return int(await self._guarded(lambda: self.client.unlink(self.layout.entry_key(entry_id)),
                                       self.settings.admin_timeout_ms))  # fmt: skip

    async def delete_scope(self, scope: str) -> int:
        """Removes every entry of a scope, in batches found through the index's TAG field."""
        query = f"@scope_tag:{{{scope_tag(scope)}}}"

        async def delete() -> int:
            removed = 0
            while True:
                reply = await self.client.execute_command(
                    "FT.SEARCH", self.layout.name, query, "NOCONTENT", "LIMIT", "0", str(_DELETE_BATCH),
                    "DIALECT", "2",
                )  # fmt: skip
                keys = [row.get(b"id") for row in reply.get(b"results", [])]
                if not keys:
                    return removed
                removed += int(await self.client.unlink(*keys))

        return await self._guarded(delete, self.settings.admin_timeout_ms * 10)

    async def delete_all(self) -> int:
        """Removes every entry of this index's key prefix (the index itself stays)."""

        async def delete() -> int:
            removed = 0
            batch: list[bytes] = []
            async for key in self.client.scan_iter(match=self.layout.key_prefix + "*", count=_DELETE_BATCH):
                batch.append(key)
                if len(batch) >= _DELETE_BATCH:
                    removed += int(await self.client.unlink(*batch))
                    batch = []
            if batch:
                removed += int(await self.client.unlink(*batch))
            return removed

        return await self._guarded(delete, self.settings.admin_timeout_ms * 10)

    async def stats(self) -> tuple[int, int]:
        """(entries, index memory bytes), asked of Redis directly whatever the breaker says."""
        async with asyncio.timeout(self.settings.admin_timeout_ms / 1000):
            result = await index_stats(self.client, self.layout)
        self.breaker.success()
        return result

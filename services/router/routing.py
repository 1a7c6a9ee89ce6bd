"""The local routing table: READY backends per model, fed by every node's WatchBackends.

Choosing a backend is a local decision with no RPC. Requests that share a prompt prefix (an
`affinity` key) go to the replica that rendezvous hashing ranks first for that key while it is
below `load_factor` times the mean load (consistent hashing with bounded load), so llama-server
reuses its prompt cache; every Router ranks the same way without talking to the others. Requests
with no key, and those the bound turns away, go to the replica with the fewest outstanding
requests. When every slot of every candidate is busy, requests wait in a bounded queue (per
route) and are refused with 429 beyond it.

A node whose Supervisor cannot be reached is suspended (no new requests), then forgotten: its
backends leave the table and generations running on them are cut (`Lease.unless_lost`).

Quantization routing: a route lists variants best first. A request takes the first variant with a
free slot (the best one may take `overflow_queue_threshold` requests beyond its slots, which then
queue inside llama-server); so under load traffic overflows from the best quantization to lighter
ones, and returns as soon as the best has room again.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from lmcluster.supervisor.v1 import supervisor_pb2, supervisor_service_pb2

from services.router import metrics
from services.router.errors import BackendUnavailable, Overloaded

READY = supervisor_pb2.BACKEND_STATE_READY
DRAINING = supervisor_pb2.BACKEND_STATE_DRAINING
EVENT = supervisor_service_pb2


@dataclass
class BackendLoad:
    backend: supervisor_pb2.Backend
    node: str = ""
    outstanding: int = 0
    # Set after a failure seen by the Router; the backend is skipped until then (the Supervisor restarts it).
    avoid_until: float = 0.0
    # Its node's Supervisor is unreachable: no new requests until the node is heard from again.
    suspended: bool = False
    # Its node was given up on: generations still running on it are cut.
    lost: bool = False
    cutters: set[Callable[[], None]] = field(default_factory=set)

    @property
    def key(self) -> str:
        """Unique across nodes (backend ids are unique per Supervisor only)."""
        return _key(self.node, self.backend.id)

    @property
    def capacity(self) -> int:
        return max(1, self.backend.slots.total)

    @property
    def has_free_slot(self) -> bool:
        return self.outstanding < self.capacity

    @property
    def usable(self) -> bool:
        return self.backend.state == READY and not self.suspended and time.monotonic() >= self.avoid_until


@dataclass
class Lease:
    """A backend held for one generation; released when the generation ends."""

    load: BackendLoad
    model_id: str
    waited_seconds: float = 0.0
    variants_tried: list[str] = field(default_factory=list)

    @property
    def endpoint(self) -> str:
        return self.load.backend.endpoint

    @property
    def backend_model(self) -> str:
        return self.load.backend.alias or self.load.backend.model_id

    @contextlib.asynccontextmanager
    async def unless_lost(self) -> AsyncIterator[None]:
        """Runs the block until its backend's node is given up on, then raises BackendUnavailable
        there: a node cut off sends no reset, and its streams would otherwise hang until a timeout."""
        timeout = asyncio.timeout(None)
        loop = asyncio.get_running_loop()

        def cut() -> None:
            timeout.reschedule(loop.time())

        self.load.cutters.add(cut)
        try:
            async with timeout:
                yield
        except TimeoutError:
            if not timeout.expired():
                raise
            raise BackendUnavailable(f"the node of backend {self.load.key} was lost") from None
        finally:
            self.load.cutters.discard(cut)


class RoutingTable:
    def __init__(
        self,
        *,
        queue_limit: int,
        queue_timeout: float,
        overflow_queue_threshold: int,
        retry_after: int,
        load_factor: float = 1.25,
    ) -> None:
        self._loads: dict[str, BackendLoad] = {}
        self._load_factor = load_factor
        self._waiting: dict[tuple[str, ...], int] = {}
        self._changed = asyncio.Event()
        self._queue_limit = queue_limit
        self._queue_timeout = queue_timeout
        self._overflow_threshold = overflow_queue_threshold
        self._retry_after = retry_after
        self.synced = False

    # --- following the nodes' Supervisors -----------------------------------------------------
    def apply(self, message: supervisor_service_pb2.WatchBackendsResponse, node: str = "") -> None:
        kind = message.WhichOneof("update")
        if kind == "snapshot":
            # A snapshot replaces this node's backends only; loads of backends that stay keep their counts.
            previous = {key: load for key, load in self._loads.items() if load.node == node}
            for key in previous:
                del self._loads[key]
            for backend in message.snapshot.backends:
                self._upsert(backend, node, previous).suspended = False
            self.synced = True
        elif kind == "event":
            event = message.event
            if event.type == EVENT.BACKEND_EVENT_TYPE_REMOVED:
                self._loads.pop(_key(node, event.backend.id), None)
            else:
                self._upsert(event.backend, node, self._loads)
                if event.type == EVENT.BACKEND_EVENT_TYPE_SWITCHED and event.HasField("replaced"):
                    self._upsert(event.replaced, node, self._loads)
        self._notify()

    def add(self, backend: supervisor_pb2.Backend, node: str = "") -> None:
        """A backend learned from EnsureBackend, before the watch reports it."""
        self._upsert(backend, node, self._loads)
        self._notify()

    def suspend(self, node: str) -> None:
        """The node's Supervisor cannot be reached: its backends take no new request for now."""
        for load in self._loads.values():
            if load.node == node:
                load.suspended = True
        self._notify()

    def forget(self, node: str) -> None:
        """The node is gone: its backends leave the table, and what still runs on them is cut."""
        for load in self._remove(node):
            load.lost = True
            for cut in list(load.cutters):
                cut()
        self._notify()

    def release(self, node: str) -> None:
        """The node left the node list: its backends leave the table; what runs on them finishes."""
        self._remove(node)
        self._notify()

    def _remove(self, node: str) -> list[BackendLoad]:
        removed = [load for load in self._loads.values() if load.node == node]
        for load in removed:
            del self._loads[load.key]
        return removed

    def _upsert(self, backend: supervisor_pb2.Backend, node: str, previous: dict[str, BackendLoad]) -> BackendLoad:
        key = _key(node, backend.id)
        load = previous.get(key)
        if load is None:
            load = BackendLoad(backend, node)
        else:
            load.backend = backend
        self._loads[key] = load
        return load

    def _notify(self) -> None:
        # Wakes every waiter; each re-checks for a free slot (an Event is simpler than a Condition
        # here because the watch callbacks that call this are not coroutines).
        self._changed.set()
        self._changed = asyncio.Event()

    # --- choosing ------------------------------------------------------------------------------
    def backends_of(self, model_id: str) -> list[BackendLoad]:
        return [load for load in self._loads.values() if load.backend.model_id == model_id]

    def serves(self, model_id: str) -> bool:
        """Some backend of the model is READY (also one paused after a failure: it is coming back)."""
        return any(load.backend.state == READY for load in self.backends_of(model_id))

    def has_ready(self, model_ids: tuple[str, ...], *, exclude: set[str] | frozenset[str] = frozenset()) -> bool:
        return any(load.usable and load.key not in exclude for m in model_ids for load in self.backends_of(m))

    def has_free_slot(self, model_ids: tuple[str, ...]) -> bool:
        return any(load.usable and load.has_free_slot for m in model_ids for load in self.backends_of(m))

    def backends_on(self, node: str) -> int:
        return sum(1 for load in self._loads.values() if load.node == node)

    def find(self, key: str) -> BackendLoad | None:
        return self._loads.get(key)

    def snapshot(self) -> list[BackendLoad]:
        return list(self._loads.values())

    def _pick(self, model_ids: tuple[str, ...], exclude: frozenset[str], affinity: str = "") -> BackendLoad | None:
        for position, model_id in enumerate(model_ids):
            # The best variant may take a few requests beyond its slots before traffic overflows.
            extra = self._overflow_threshold if position == 0 and len(model_ids) > 1 else 0
            usable = [load for load in self.backends_of(model_id) if load.usable]
            candidates = [
                load for load in usable if load.outstanding < load.capacity + extra and load.key not in exclude
            ]
            if candidates:
                preferred = self._by_affinity(affinity, usable, candidates) if affinity and len(usable) > 1 else None
                return preferred or min(candidates, key=lambda load: load.outstanding / load.capacity)
        candidates = [
            load
            for load in self._draining_only(model_ids)
            if load.outstanding < load.capacity and load.key not in exclude and time.monotonic() >= load.avoid_until
        ]
        return min(candidates, key=lambda load: load.outstanding / load.capacity) if candidates else None

    def _by_affinity(self, affinity: str, usable: list[BackendLoad], candidates: list[BackendLoad]) -> BackendLoad | None:
        """The highest-ranked candidate for the key whose load stays within the bound; None when
        all of them are above it (the least loaded one is taken then)."""
        bound = math.ceil(self._load_factor * (sum(load.outstanding for load in usable) + 1) / len(usable))
        # Ranked over every usable replica, so "preferred" means the key's own replica, also when it
        # is full (then the request spills to the next one: it never waits while a slot is free).
        ranked = sorted(usable, key=lambda load: _rank(affinity, load.backend.endpoint), reverse=True)
        open_keys = {load.key for load in candidates}
        for position, load in enumerate(ranked):
            if load.key in open_keys and load.outstanding + 1 <= bound:
                metrics.PREFIX_ROUTING.labels("preferred" if position == 0 else "next").inc()
                return load
        metrics.PREFIX_ROUTING.labels("least_loaded").inc()
        return None

    def _draining_only(self, model_ids: tuple[str, ...]) -> list[BackendLoad]:
        """DRAINING backends of models that have no READY one: a removed model's, or one stopped
        with a gap. Requests the Router already accepted finish there; while a READY backend
        exists (a swap), a draining one gets nothing new, or a busy swap would never finish."""
        loads = [load for m in model_ids for load in self.backends_of(m)]
        if any(load.backend.state == READY for load in loads):
            return []
        return [load for load in loads if load.backend.state == DRAINING]

    def can_serve(self, model_ids: tuple[str, ...]) -> bool:
        """A usable READY backend, or a draining one that still finishes accepted requests."""
        return self.has_ready(model_ids) or bool(self._draining_only(model_ids))

    @contextlib.asynccontextmanager
    async def lease(
        self, model_ids: tuple[str, ...], *, exclude: frozenset[str] = frozenset(), affinity: str = ""
    ) -> AsyncIterator[Lease]:
        """Holds a backend of one of `model_ids` (best first) for the duration of the block."""
        route = model_ids
        started = time.monotonic()
        load = self._pick(model_ids, exclude, affinity)
        if load is None:
            if self._waiting.get(route, 0) >= self._queue_limit:
                raise Overloaded(
                    f"All {self._slots(model_ids)} slots of `{model_ids[0]}` are busy and {self._queue_limit} "
                    "requests are already waiting. Retry after a short pause.",
                    retry_after=self._retry_after,
                )
            self._waiting[route] = self._waiting.get(route, 0) + 1
            try:
                async with asyncio.timeout(self._queue_timeout):
                    while (load := self._pick(model_ids, exclude, affinity)) is None:
                        # A backend skipped after a failure comes back when its pause ends, which
                        # no watch event or released lease announces: wake up then, too.
                        # (asyncio.timeout, not wait_for: on Python 3.11 wait_for can lose a cancellation.)
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(self._until_avoid_ends(model_ids)):
                                await self._changed.wait()
            except TimeoutError:
                raise Overloaded(
                    f"No slot of `{model_ids[0]}` became free within {self._queue_timeout:.0f} s. Retry later.",
                    retry_after=self._retry_after,
                ) from None
            finally:
                self._waiting[route] -= 1
        load.outstanding += 1
        busy = metrics.BACKEND_OUTSTANDING.labels(load.key, load.backend.model_id)
        busy.set(load.outstanding)
        lease = Lease(load, load.backend.model_id, waited_seconds=time.monotonic() - started)
        try:
            yield lease
        finally:
            load.outstanding -= 1
            busy.set(load.outstanding)
            self._notify()

    def _until_avoid_ends(self, model_ids: tuple[str, ...]) -> float | None:
        """Seconds until the first paused backend of `model_ids` may be used again (None: none paused)."""
        now = time.monotonic()
        pauses = [
            load.avoid_until - now
            for m in model_ids
            for load in self.backends_of(m)
            if load.backend.state == READY and load.avoid_until > now
        ]
        return max(0.01, min(pauses)) if pauses else None

    def _slots(self, model_ids: tuple[str, ...]) -> int:
        return sum(load.capacity for m in model_ids for load in self.backends_of(m) if load.usable)

    def avoid(self, key: str, seconds: float = 2.0) -> None:
        """Skips a backend that just failed until the Supervisor has had time to act on it."""
        load = self._loads.get(key)
        if load is not None:
            load.avoid_until = time.monotonic() + seconds

    def queue_depth(self) -> int:
        return sum(self._waiting.values())


def _key(node: str, backend_id: str) -> str:
    return f"{node}|{backend_id}" if node else backend_id


def _rank(affinity: str, endpoint: str) -> int:
    """Rendezvous (highest random weight) score: the same on every Router, and only the keys of a
    replica that leaves or joins move."""
    digest = hashlib.blake2b(f"{affinity}\x00{endpoint}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")

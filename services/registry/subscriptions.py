"""Per-watcher event buffers: the catalog never waits for a slow WatchModels client.

Each stream gets a bounded buffer. When a client falls so far behind that its buffer is full, the
buffered events are dropped and the stream is marked for a resync: its next message is a fresh
snapshot (a `WatchModelsResponse` with `snapshot` set, at the current revision), which replaces
everything the client knew. Clients must therefore accept a snapshot at any point of a stream.
"""

from __future__ import annotations

import asyncio
from collections import deque
from enum import Enum

from lmcluster.registry.v1 import registry_service_pb2


class Resync(Enum):
    """Returned instead of an event when the watcher must be sent a fresh snapshot."""

    NEEDED = "resync"


class Subscription:
    """One watcher's bounded buffer of responses, filled by the catalog, drained by one stream."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._items: deque[registry_service_pb2.WatchModelsResponse] = deque()
        self._wake = asyncio.Event()
        self._resync = False
        self.closed = False

    def offer(self, response: registry_service_pb2.WatchModelsResponse) -> bool:
        """Buffers one event; returns False when this overflowed the buffer (a resync is now due)."""
        if self.closed or self._resync:
            return True
        if len(self._items) >= self._limit:
            self._items.clear()
            self._resync = True
            self._wake.set()
            return False
        self._items.append(response)
        self._wake.set()
        return True

    def close(self) -> None:
        self.closed = True
        self._wake.set()

    async def next(self) -> registry_service_pb2.WatchModelsResponse | Resync | None:
        """The next event, `Resync.NEEDED` after an overflow, or None once closed."""
        while True:
            if self.closed:
                return None
            if self._resync:
                self._resync = False
                return Resync.NEEDED
            if self._items:
                return self._items.popleft()
            self._wake.clear()
            await self._wake.wait()

"""One generation on a llama-server, shared by every identical request that arrives meanwhile.

A Generation runs in its own task and records the backend's events; each caller subscribes and
reads them from the start, so a request that joins late still gets every token. When the last
subscriber leaves (clients disconnected), the backend request is cancelled and its slot freed.

Readers share the generation's fate: a backend lost mid-answer fails all of them. A generation
whose tokens have stopped coming (its node hung or cut off, not yet given up on) takes no new
readers: an identical request starts its own generation, on a backend that answers.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from services.router.errors import BackendUnavailable

log = logging.getLogger(__name__)

Producer = Callable[["Generation"], AsyncIterator[dict[str, Any]]]


class Generation:
    def __init__(self, key: str, produce: Producer) -> None:
        self.key = key
        self.events: list[dict[str, Any]] = []
        self.error: BaseException | None = None
        self.done = False
        # Filled by the producer once a backend is chosen.
        self.model_id = ""
        self.backend_id = ""
        self.subscribers = 0
        # When the last event (or the start) came: a generation silent for long has stalled.
        self.progressed_at = time.monotonic()
        # Every subscriber left: the backend request is being cancelled, nobody may join any more.
        self.abandoned = False
        # Its answer was handed to the cache: by the first reader to finish, not once per reader.
        self.stored = False
        self._changed = asyncio.Event()
        self._task = asyncio.create_task(self._run(produce), name=f"generation-{key[:12]}")

    async def _run(self, produce: Producer) -> None:
        try:
            async for event in produce(self):
                self.events.append(event)
                self.progressed_at = time.monotonic()
                self._wake()
        except asyncio.CancelledError:
            self.error = BackendUnavailable("the generation was cancelled (the Router is stopping)")
        except BaseException as error:  # handed to every subscriber
            self.error = error
        finally:
            self.done = True
            self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def stalled(self, after_seconds: float) -> bool:
        """Tokens had begun and none came for `after_seconds`. Before the first token a silence is
        the queue or the prompt's evaluation, and a lost backend is retried unseen by readers."""
        return bool(self.events) and time.monotonic() - self.progressed_at > after_seconds

    def join(self) -> Subscription:
        """A new reader of this generation (it counts once it starts reading)."""
        return Subscription(self)

    def subscribe(self) -> AsyncIterator[dict[str, Any]]:
        """Every event from the first; raises the generation's error at the point it happened."""
        return self.join().events()

    def _reader_left(self) -> None:
        self.subscribers -= 1
        if self.subscribers == 0 and not self.done:
            self.abandoned = True
            self._task.cancel()

    async def cancel(self) -> None:
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass


class Subscription:
    """One reader of a Generation. `events()` reads it; `leave()` ends the reading from outside
    (e.g. when the RPC is cancelled while its handler is not inside `events()`). The last reader
    leaving cancels the backend request."""

    def __init__(self, generation: Generation) -> None:
        self._generation = generation
        self._reading = False
        self._left = False

    @property
    def generation(self) -> Generation:
        return self._generation

    def hold(self) -> None:
        """Counts as a reader from now, before reading: a generation started ahead of its answer's
        need (while the semantic lookup runs) is not cancelled by another reader leaving meanwhile."""
        if not self._left and not self._reading:
            self._reading = True
            self._generation.subscribers += 1

    def leave(self) -> None:
        """Idempotent; a reader that has not started yet never will."""
        if self._left:
            return
        self._left = True
        if self._reading:
            self._reading = False
            self._generation._reader_left()

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        generation = self._generation
        if self._left:
            return
        self.hold()
        index = 0
        try:
            while not self._left:
                while index < len(generation.events):
                    yield generation.events[index]
                    index += 1
                    if self._left:
                        return
                if generation.done:
                    if generation.error is not None:
                        raise generation.error
                    return
                await generation._changed.wait()
        finally:
            self.leave()


class Coalescer:
    """Identical concurrent requests (same exact key) share one Generation, unless it has stalled
    for `stall_seconds`."""

    def __init__(self, stall_seconds: float = math.inf) -> None:
        # Per key, the generation an identical request joins.
        self._running: dict[str, Generation] = {}
        # Every keyed generation not done yet, stalled ones that were replaced included.
        self._live: set[Generation] = set()
        self._stall_seconds = stall_seconds
        self.shared = 0

    def join_or_start(self, key: str | None, produce: Producer) -> Generation:
        if key:
            running = self._running.get(key)
            if running is not None and not (
                running.done or running.abandoned or running.stalled(self._stall_seconds)
            ):
                self.shared += 1
                return running
        generation = Generation(key or "", produce)
        if key:
            self._running[key] = generation
            self._live.add(generation)
            generation._task.add_done_callback(lambda _: self._forget(key, generation))
        return generation

    def _forget(self, key: str, generation: Generation) -> None:
        if self._running.get(key) is generation:
            del self._running[key]
        self._live.discard(generation)

    async def close(self) -> None:
        for generation in list(self._live):
            await generation.cancel()

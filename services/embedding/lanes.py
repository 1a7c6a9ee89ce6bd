"""The Embedding service's two lanes: interactive texts (a caller waits on them) and background texts
(vectors of answers being stored, which nobody waits on).

Each lane is one thread with its own copy of the model and its own micro-batcher, so a semantic
lookup never queues behind a batch of stores. The background thread runs under SCHED_IDLE by
default: on a host shared with llama-server, a stored answer's vector (7-9 ms of one core for a
short question) is computed on CPU that the gateway does not want, instead of ahead of the next
prompt's processing. It shares that CPU with a llama-server under SCHED_IDLE (the Supervisor's
default) as an equal.

The interactive lane loads first and the service reports SERVING with it alone; until the
background copy is loaded, background texts join the interactive queue. The background copy runs
on one thread whatever `threads` says: it is there to use spare CPU, not to compete for cores.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

from lmcluster.embedding.v1 import embedding_service_pb2 as pb

from services.embedding.batcher import MicroBatcher
from services.embedding.encoder import EmbeddedText, Encoder
from services.embedding.settings import BackgroundLane, EmbeddingSettings

log = logging.getLogger(__name__)

ThreadPolicy = Literal["idle", "normal"]


def schedule_this_thread(policy: ThreadPolicy) -> ThreadPolicy:
    """Puts the calling thread (not the process: Linux schedules threads) under `policy`; returns
    the policy it runs under. Lowering one's own priority needs no privilege; where it still fails
    (no SCHED_IDLE on this system), the thread stays at normal priority."""
    if policy == "normal":
        return "normal"
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError) as error:
        log.warning("cannot put the background embedding thread under SCHED_IDLE (%s); it runs at normal priority", error)
        return "normal"
    return "idle"


@dataclass
class Lane:
    """One model thread, the model copy it owns, and the batcher that feeds it."""

    name: str
    executor: ThreadPoolExecutor
    batcher: MicroBatcher[EmbeddedText] | None = None
    encoder: Encoder | None = None
    policy: ThreadPolicy = "normal"

    @classmethod
    def open(cls, name: str) -> Lane:
        # The only thread that touches this lane's model: loading, warm-up and every batch.
        return cls(name, ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"embedding-{name}"))

    async def load(self, load: Callable[[], Encoder], settings: EmbeddingSettings, policy: ThreadPolicy) -> None:
        """Loads and warms the model in the lane's thread at normal priority (a load that waited
        for idle CPU could hold up a shutdown for as long), then puts the thread under `policy`.
        A policy other than normal needs a model on one thread: a runtime's own worker threads,
        created with the model, would keep normal priority."""
        loop = asyncio.get_running_loop()
        encoder = await loop.run_in_executor(self.executor, load)
        if settings.warmup:
            await loop.run_in_executor(self.executor, encoder.warm_up)
        self.policy = await loop.run_in_executor(self.executor, schedule_this_thread, policy)
        self.encoder = encoder
        self.batcher = MicroBatcher(
            encoder.encode,
            self.executor,
            window_seconds=settings.batch_window_ms / 1000,
            max_batch_size=settings.max_batch_size,
            lane=self.name,
        )
        self.batcher.start()

    async def close(self) -> None:
        """Fails what is queued, waits out the batch running now, ends the thread."""
        if self.batcher is not None:
            await self.batcher.close()
        # A no-op queued behind whatever runs in the thread now (a batch, or a load) waits it out
        # without blocking the event loop; the shutdown after it is immediate.
        await asyncio.get_running_loop().run_in_executor(self.executor, lambda: None)
        self.executor.shutdown(wait=True)


@dataclass
class Lanes:
    """Which batcher embeds a request of each priority."""

    interactive: Lane
    background: Lane | None = None

    @classmethod
    def open(cls, setting: BackgroundLane) -> Lanes:
        return cls(Lane.open("interactive"), None if setting == "shared" else Lane.open("background"))

    def batcher_for(self, priority: int) -> MicroBatcher[EmbeddedText] | None:
        """The background lane's batcher once it is loaded, else the interactive one (None while
        even that is loading)."""
        if priority == pb.EMBED_PRIORITY_BACKGROUND and self.background is not None and self.background.batcher:
            return self.background.batcher
        return self.interactive.batcher

    async def close(self) -> None:
        for lane in (self.interactive, self.background):
            if lane is not None:
                await lane.close()

"""Dynamic micro-batching: texts from concurrent RPCs share one model call.

Callers `submit` their texts and await one result per text. A single worker task takes the queued
texts as one batch once the oldest has waited `window` seconds or `max_batch_size` texts are queued,
whichever comes first, and runs the model on them in ONE worker thread (the model is not safe under
concurrent calls, and parallel calls would only fight over the same cores). Texts that queue up while
the model runs go into the next batch without waiting again, since their window started when they
arrived. The window is only waited while callers overlap (the previous batch held more than one
text): an idle service runs a lone query at once instead of adding the window to its latency, and
under load the queue fills while the model runs anyway. A caller that is cancelled (its RPC ended)
is skipped if its texts have not run yet, and is otherwise ignored when the results come back; it
never breaks the batch for the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from prometheus_client import Histogram

log = logging.getLogger(__name__)

Result = TypeVar("Result")

BATCH_SIZE = Histogram(
    "lmc_embedding_batch_size",
    "Texts per model call, after micro-batching.",
    ["lane"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
)
QUEUE_WAIT = Histogram(
    "lmc_embedding_queue_wait_seconds",
    "Time a text waited from its RPC's arrival to the start of its model call.",
    ["lane"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
INFERENCE_TIME = Histogram(
    "lmc_embedding_inference_seconds",
    "Time of one model call (tokenizing, the forward pass and pooling) for a whole batch.",
    ["lane"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)


class BatcherClosedError(RuntimeError):
    """The batcher stopped before these texts ran (the service is shutting down)."""


@dataclass(eq=False)
class _Queued(Generic[Result]):
    text: str
    future: asyncio.Future[Result]
    arrived: float = field(default_factory=time.perf_counter)


class MicroBatcher(Generic[Result]):
    """Runs `encode(texts) -> one result per text` on batches gathered from concurrent callers.

    `encode` is called in `executor`, which must run one call at a time (one worker thread).
    `lane` labels the metrics (interactive or background).
    """

    def __init__(
        self,
        encode: Callable[[list[str]], Sequence[Result]],
        executor: Executor,
        *,
        window_seconds: float,
        max_batch_size: int,
        lane: str = "interactive",
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        self._encode = encode
        self._executor = executor
        self._window = max(0.0, window_seconds)
        self._max_batch_size = max_batch_size
        self._lane = lane
        self._queue: deque[_Queued[Result]] = deque()
        self._running: list[_Queued[Result]] = []
        # Set while the worker sleeps; woken by the first text, or by a full batch.
        self._wakeup: asyncio.Future[None] | None = None
        self._wake_when_full = False
        self._worker: asyncio.Task[None] | None = None
        self._closed = False
        self._last_batch_size = 0
        self._batch_size = BATCH_SIZE.labels(lane)
        self._queue_wait = QUEUE_WAIT.labels(lane)
        self._inference_time = INFERENCE_TIME.labels(lane)

    @property
    def queued(self) -> int:
        """Texts waiting for a model call (not counting the one running)."""
        return len(self._queue)

    def start(self) -> None:
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._run(), name=f"embedding-batcher-{self._lane}")

    async def submit(self, texts: Sequence[str]) -> list[Result]:
        """One result per text, in order. Raises BatcherClosedError after close()."""
        if self._closed:
            raise BatcherClosedError("the embedding batcher is closed")
        loop = asyncio.get_running_loop()
        arrived = time.perf_counter()
        queued = [_Queued(text, loop.create_future(), arrived) for text in texts]
        self._queue.extend(queued)
        if self._wakeup is not None and (
            not self._wake_when_full or len(self._queue) >= self._max_batch_size
        ):
            self._wake()
        try:
            return list(await asyncio.gather(*(item.future for item in queued)))
        finally:
            # Cancelled or failed: leave nothing of ours for the worker to run.
            for item in queued:
                if not item.future.done():
                    item.future.cancel()

    async def close(self) -> None:
        """Stops the worker; texts still queued or running fail with BatcherClosedError."""
        self._closed = True
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
        error = BatcherClosedError("the embedding service is shutting down")
        for item in (*self._running, *self._queue):
            if not item.future.done():
                item.future.set_exception(error)
        self._running = []
        self._queue.clear()

    def _wake(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    async def _sleep(self, timeout: float | None, *, until_full: bool) -> None:
        loop = asyncio.get_running_loop()
        self._wakeup = loop.create_future()
        self._wake_when_full = until_full
        timer = loop.call_later(timeout, self._wake) if timeout is not None else None
        try:
            await self._wakeup
        finally:
            if timer is not None:
                timer.cancel()
            self._wakeup = None

    def _drop_cancelled(self) -> None:
        while self._queue and self._queue[0].future.done():
            self._queue.popleft()

    def _take_batch(self) -> list[_Queued[Result]]:
        batch: list[_Queued[Result]] = []
        while self._queue and len(batch) < self._max_batch_size:
            item = self._queue.popleft()
            if not item.future.done():
                batch.append(item)
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._drop_cancelled()
            if not self._queue:
                await self._sleep(None, until_full=False)
                continue
            # The window is counted from the oldest text's arrival, not from now, and only waited
            # while callers overlap: after a lone text, the next lone text runs at once.
            remaining = self._queue[0].arrived + self._window - time.perf_counter()
            if self._last_batch_size > 1 and remaining > 0 and len(self._queue) < self._max_batch_size:
                await self._sleep(remaining, until_full=True)
            batch = self._take_batch()
            if not batch:
                continue
            self._last_batch_size = len(batch)
            started = time.perf_counter()
            for item in batch:
                self._queue_wait.observe(started - item.arrived)
            self._batch_size.observe(len(batch))
            # Kept while the model runs so that close() can fail these callers.
            self._running = batch
            try:
                results = await loop.run_in_executor(
                    self._executor, self._encode, [item.text for item in batch]
                )
            except Exception as error:
                self._running = []
                log.exception("embedding a batch of %d texts failed", len(batch))
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(error)
                continue
            self._running = []
            self._inference_time.observe(time.perf_counter() - started)
            if len(results) != len(batch):
                error = RuntimeError(f"the model returned {len(results)} results for {len(batch)} texts")
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(error)
                continue
            for item, result in zip(batch, results, strict=True):
                if not item.future.done():
                    item.future.set_result(result)

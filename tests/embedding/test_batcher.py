"""MicroBatcher's logic with a stand-in encoder: batching, order, limits, cancellation, failures.

The stand-in records every batch it gets and can be held at a gate, so that what queues up while
a batch runs is decided by the test rather than by timing.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from prometheus_client import REGISTRY

from services.embedding.batcher import BatcherClosedError, MicroBatcher

# Guards against a hang only; no test asserts on how long anything takes.
HANG_GUARD_SECONDS = 30


class RecordingEncoder:
    """Returns "vec(<text>)" per text and records each batch.

    After `hold()`, each batch waits in the model thread for a permit: `allow(n)` lets n batches
    through, `release()` lets everything through from then on.
    """

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.fail_on: str | None = None
        self._permits: threading.Semaphore | None = None

    def hold(self) -> None:
        self._permits = threading.Semaphore(0)

    def allow(self, batches: int = 1) -> None:
        assert self._permits is not None
        self._permits.release(batches)

    def release(self) -> None:
        permits, self._permits = self._permits, None
        if permits is not None:
            permits.release(1000)

    def __call__(self, texts: list[str]) -> list[str]:
        self.batches.append(list(texts))
        permits = self._permits
        if permits is not None:
            permits.acquire(timeout=HANG_GUARD_SECONDS)
        if self.fail_on is not None and self.fail_on in texts:
            raise ValueError(f"cannot embed {self.fail_on!r}")
        return [f"vec({text})" for text in texts]


@pytest.fixture
def model_thread() -> Iterator[ThreadPoolExecutor]:
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="test-model")
    yield executor
    executor.shutdown(wait=True)


@pytest.fixture
def encoder() -> Iterator[RecordingEncoder]:
    encoder = RecordingEncoder()
    yield encoder
    encoder.release()


def make_batcher(
    encoder: RecordingEncoder, executor: ThreadPoolExecutor, *, window: float = 0.0, max_batch_size: int = 8
) -> MicroBatcher[str]:
    batcher: MicroBatcher[str] = MicroBatcher(
        encoder, executor, window_seconds=window, max_batch_size=max_batch_size
    )
    batcher.start()
    return batcher


@pytest.fixture
async def closing() -> AsyncIterator[list[MicroBatcher[str]]]:
    batchers: list[MicroBatcher[str]] = []
    yield batchers
    for batcher in batchers:
        await batcher.close()


async def wait_batches(encoder: RecordingEncoder, count: int) -> None:
    """Until the model thread has started `count` batches."""
    async with asyncio.timeout(HANG_GUARD_SECONDS):
        while len(encoder.batches) < count:
            await asyncio.sleep(0.001)


async def wait_queued(batcher: MicroBatcher[str], count: int) -> None:
    """Until `count` texts wait in the queue."""
    async with asyncio.timeout(HANG_GUARD_SECONDS):
        while batcher.queued < count:
            await asyncio.sleep(0)


async def test_one_caller_gets_its_results_in_order(
    encoder: RecordingEncoder, model_thread: ThreadPoolExecutor, closing: list[MicroBatcher[str]]
) -> None:
    batcher = make_batcher(encoder, model_thread)
    closing.append(batcher)
    results = await asyncio.wait_for(batcher.submit(["a", "b", "c"]), HANG_GUARD_SECONDS)
    assert results == ["vec(a)", "vec(b)", "vec(c)"]
    assert encoder.batches == [["a", "b", "c"]]


async def test_callers_queued_while_the_model_runs_share_the_next_batch(
    encoder: RecordingEncoder, model_thread: ThreadPoolExecutor, closing: list[MicroBatcher[str]]
) -> None:
    batcher = make_batcher(encoder, model_thread, max_batch_size=64)
    closing.append(batcher)
    encoder.hold()
    first = asyncio.ensure_future(batcher.submit(["first"]))
    await wait_batches(encoder, 1)
    callers = [asyncio.ensure_future(batcher.submit([f"t{i}-a", f"t{i}-b"])) for i in range(10)]
    await wait_queued(batcher, 20)
    encoder.release()
    results = await asyncio.wait_for(asyncio.gather(first, *callers), HANG_GUARD_SECONDS)
    assert results[0] == ["vec(first)"]
    for i, result in enumerate(results[1:]):
        assert result == [f"vec(t{i}-a)", f"vec(t{i}-b)"]
    assert encoder.batches[0] == ["first"]
    assert encoder.batches[1] == [text for i in range(10) for text in (f"t{i}-a", f"t{i}-b")]
    assert len(encoder.batches) == 2


async def test_batches_never_exceed_the_maximum(
    encoder: RecordingEncoder, model_thread: ThreadPoolExecutor, closing: list[MicroBatcher[str]]
) -> None:
    batcher = make_batcher(encoder, model_thread, max_batch_size=4)
    closing.append(batcher)
    texts = [f"text {i}" for i in range(11)]
    results = await asyncio.wait_for(batcher.submit(texts), HANG_GUARD_SECONDS)
    assert results == [f"vec({text})" for text in texts]
    assert [len(batch) for batch in encoder.batches] == [4, 4, 3]


async def test_a_full_batch_does_not_wait_for_the_window(
    encoder: RecordingEncoder, model_thread: ThreadPoolExecutor, closing: list[MicroBatcher[str]]
) -> None:
    # An hour-long window: this only finishes because a full batch starts at once.
    batcher = make_batcher(encoder, model_thread, window=3600, max_batch_size=3)
    closing.append(batcher)
    await asyncio.wait_for(batcher.submit(["busy-1", "busy-2"]), HANG_GUARD_SECONDS)  # callers overlap
    first = asyncio.ensure_future(batcher.submit(["q0"]))
    await wait_queued(batcher, 1)
    for _ in range(5):  # the worker goes to sleep on the window
        await asyncio.sleep(0)
    others = [asyncio.ensure_future(batcher.submit([f"q{i}"])) for i in (1, 2)]
    results = await asyncio.wait_for(asyncio.gather(first, *others), HANG_GUARD_SECONDS)
    assert results == [["vec(q0)"], ["vec(q1)"], ["vec(q2)"]]
    assert encoder.batches == [["busy-1", "busy-2"], ["q0", "q1", "q2"]]


async def test_a_lone_text_on_an_idle_batcher_does_not_wait_for_the_window(
    encoder: RecordingEncoder, model_thread: ThreadPoolExecutor, closing: list[MicroBatcher[str]]
) -> None:
    # An hour-long window: this only finishes because nothing overlapped before.
    batcher = make_batcher(encoder, model_thread, window=3600, max_batch_size=100)
    closing.append(batcher)
    assert await asyncio.wait_for(batcher.submit(["alone"]), HANG_GUARD_SECONDS) == ["vec(alone)"]
    assert await asyncio.wait_for(batcher.submit(["alone again"]), HANG_GUARD_SECONDS) == ["vec(alone again)"]
    assert encoder.batches == [["alone"], ["alone again"]]


async def test_once_callers_overlap_the_window_gathers_those_that_arrive_within_it(
    encoder: RecordingEncoder, model_thread: ThreadPoolExecutor, closing: list[MicroBatcher[str]]
) -> None:
    batcher = make_batcher(encoder, model_thread, window=3600, max_batch_size=100)
    closing.append(batcher)
    await asyncio.wait_for(batcher.submit(["busy-1", "busy-2"]), HANG_GUARD_SECONDS)  # a batch of two
    early = asyncio.ensure_future(batcher.submit(["early"]))
    await wait_queued(batcher, 1)
    for _ in range(5):  # the worker runs and goes to sleep on the window
        await asyncio.sleep(0)
    assert len(encoder.batches) == 1, "the early text waits for company"
    late = asyncio.ensure_future(batcher.submit(["late"] * 99))
    results = await asyncio.wait_for(asyncio.gather(early, late), HANG_GUARD_SECONDS)
    assert results == [["vec(early)"], ["vec(late)"] * 99]
    assert encoder.batches == [["busy-1", "busy-2"], ["early", *["late"] * 99]]


async def test_a_cancelled_caller_does_not_break_the_running_batch(
    encoder: RecordingEncoder, model_thread: ThreadPoolExecutor, closing: list[MicroBatcher[str]]
) -> None:
    batcher = make_batcher(encoder, model_thread, max_batch_size=64)
    closing.append(batcher)
    encoder.hold()
    blocker = asyncio.ensure_future(batcher.submit(["blocker"]))
    await wait_batches(encoder, 1)
    leaving = asyncio.ensure_future(batcher.submit(["leaving"]))
    staying = asyncio.ensure_future(batcher.submit(["staying"]))
    await wait_queued(batcher, 2)
    encoder.allow(1)  # the blocker's batch finishes; the next one starts and is held
    await wait_batches(encoder, 2)
    leaving.cancel()  # cancelled while its batch runs
    encoder.release()
    assert await asyncio.wait_for(staying, HANG_GUARD_SECONDS) == ["vec(staying)"]
    assert await blocker == ["vec(blocker)"]
    with pytest.raises(asyncio.CancelledError):
        await leaving
    assert encoder.batches == [["blocker"], ["leaving", "staying"]]
    # And the batcher goes on working.
    assert await asyncio.wait_for(batcher.submit(["after"]), HANG_GUARD_SECONDS) == ["vec(after)"]


async def test_a_caller_cancelled_while_queued_is_not_run(
    encoder: RecordingEncoder, model_thread: ThreadPoolExecutor, closing: list[MicroBatcher[str]]
) -> None:
    batcher = make_batcher(encoder, model_thread, max_batch_size=64)
    closing.append(batcher)
    encoder.hold()
    blocker = asyncio.ensure_future(batcher.submit(["blocker"]))
    await wait_batches(encoder, 1)
    gone = asyncio.ensure_future(batcher.submit(["gone-1", "gone-2"]))
    kept = asyncio.ensure_future(batcher.submit(["kept"]))
    await wait_queued(batcher, 3)
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    encoder.release()
    assert await asyncio.wait_for(kept, HANG_GUARD_SECONDS) == ["vec(kept)"]
    await blocker
    assert encoder.batches == [["blocker"], ["kept"]]


async def test_a_failing_batch_fails_its_callers_and_the_batcher_goes_on(
    encoder: RecordingEncoder, model_thread: ThreadPoolExecutor, closing: list[MicroBatcher[str]]
) -> None:
    batcher = make_batcher(encoder, model_thread)
    closing.append(batcher)
    encoder.fail_on = "poison"
    with pytest.raises(ValueError, match="poison"):
        await asyncio.wait_for(batcher.submit(["ok", "poison"]), HANG_GUARD_SECONDS)
    assert await asyncio.wait_for(batcher.submit(["fine"]), HANG_GUARD_SECONDS) == ["vec(fine)"]


async def test_close_fails_queued_and_running_callers_and_refuses_new_ones(
    encoder: RecordingEncoder, model_thread: ThreadPoolExecutor
) -> None:
    batcher = make_batcher(encoder, model_thread, max_batch_size=64)
    encoder.hold()
    running = asyncio.ensure_future(batcher.submit(["running"]))
    await wait_batches(encoder, 1)
    queued = asyncio.ensure_future(batcher.submit(["queued"]))
    await wait_queued(batcher, 1)
    await batcher.close()
    encoder.release()
    for caller in (running, queued):
        with pytest.raises(BatcherClosedError):
            await caller
    with pytest.raises(BatcherClosedError):
        await batcher.submit(["late"])


async def test_batch_sizes_are_recorded(
    encoder: RecordingEncoder, model_thread: ThreadPoolExecutor, closing: list[MicroBatcher[str]]
) -> None:
    batcher = make_batcher(encoder, model_thread, max_batch_size=16)
    closing.append(batcher)

    def sample(name: str) -> float:
        return REGISTRY.get_sample_value(name, {"lane": "interactive"}) or 0.0

    before = sample("lmc_embedding_batch_size_sum"), sample("lmc_embedding_batch_size_count")
    await asyncio.wait_for(batcher.submit(["x"] * 5), HANG_GUARD_SECONDS)
    after = sample("lmc_embedding_batch_size_sum"), sample("lmc_embedding_batch_size_count")
    assert after[0] - before[0] == 5
    assert after[1] - before[1] == 1

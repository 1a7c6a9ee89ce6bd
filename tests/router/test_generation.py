"""Coalescing: identical concurrent requests share one generation; the last one to leave cancels it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from services.router.generation import Coalescer, Generation


async def test_a_late_subscriber_gets_every_event() -> None:
    gate = asyncio.Event()
    starts = 0

    async def produce(generation: Generation) -> AsyncIterator[dict[str, Any]]:
        nonlocal starts
        starts += 1
        yield {"n": 1}
        await gate.wait()
        yield {"n": 2}

    coalescer = Coalescer()
    first = coalescer.join_or_start("k", produce)

    async def read(generation: Generation) -> list[int]:
        return [event["n"] async for event in generation.subscribe()]

    reader = asyncio.create_task(read(first))
    await asyncio.sleep(0.01)
    second = coalescer.join_or_start("k", produce)
    assert second is first
    late = asyncio.create_task(read(second))
    gate.set()
    assert await reader == [1, 2] and await late == [1, 2]
    assert starts == 1


async def test_the_last_subscriber_leaving_cancels_the_backend_request() -> None:
    cancelled = asyncio.Event()

    async def produce(generation: Generation) -> AsyncIterator[dict[str, Any]]:
        try:
            yield {"n": 1}
            await asyncio.sleep(3600)
        finally:
            cancelled.set()

    generation = Coalescer().join_or_start("k", produce)
    async for _ in generation.subscribe():
        break  # the client went away after the first token
    await asyncio.wait_for(cancelled.wait(), 5)


async def test_errors_reach_every_subscriber() -> None:
    async def produce(generation: Generation) -> AsyncIterator[dict[str, Any]]:
        yield {"n": 1}
        raise RuntimeError("backend died")

    generation = Coalescer().join_or_start(None, produce)
    seen = []
    try:
        async for event in generation.subscribe():
            seen.append(event)
    except RuntimeError as error:
        assert "backend died" in str(error)
    assert seen == [{"n": 1}]


async def test_leaving_from_outside_cancels_once_every_reader_left() -> None:
    # What the Router's RPC done callback does when grpc cancels a handler that is suspended while
    # sending (not inside the subscription): the reader's generator is never resumed or closed.
    cancelled = asyncio.Event()

    async def produce(generation: Generation) -> AsyncIterator[dict[str, Any]]:
        try:
            yield {"n": 1}
            await asyncio.sleep(3600)
        finally:
            cancelled.set()

    generation = Coalescer().join_or_start("k", produce)
    first, second = generation.join(), generation.join()
    first_events, second_events = first.events(), second.events()
    assert await anext(first_events) == {"n": 1}
    assert await anext(second_events) == {"n": 1}
    assert generation.subscribers == 2
    first.leave()
    first.leave()  # idempotent
    await asyncio.sleep(0.01)
    assert generation.subscribers == 1 and not cancelled.is_set()
    second.leave()
    await asyncio.wait_for(cancelled.wait(), 5)
    assert generation.abandoned
    # A subscription left before it started reading never counts.
    late = generation.join()
    late.leave()
    assert [event async for event in late.events()] == []
    assert generation.subscribers == 0


async def test_a_stalled_generation_takes_no_new_reader() -> None:
    """Tokens had begun, then none for longer than the stall: an identical request starts afresh.
    Before the first token a silence is no stall (the queue, the prompt's evaluation)."""
    never = asyncio.Event()

    async def produce(generation: Generation) -> AsyncIterator[dict[str, Any]]:
        if generation.key == "k":
            yield {"n": 1}
        await never.wait()

    coalescer = Coalescer(stall_seconds=0.05)
    waiting = coalescer.join_or_start("q", produce)
    stalled = coalescer.join_or_start("k", produce)
    readers = [asyncio.create_task(anext(g.subscribe())) for g in (stalled,)]
    await asyncio.sleep(0.01)
    assert coalescer.join_or_start("k", produce) is stalled  # a token 10 ms ago: running
    await asyncio.sleep(0.1)
    assert coalescer.join_or_start("q", produce) is waiting  # no token yet: not a stall
    fresh = coalescer.join_or_start("k", produce)
    assert fresh is not stalled
    assert coalescer.join_or_start("k", produce) is fresh
    await coalescer.close()
    assert all(g._task.done() for g in (waiting, stalled, fresh))
    await asyncio.gather(*readers, return_exceptions=True)

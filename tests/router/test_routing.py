"""The routing table's choices: least loaded replica, bounded queue, overflow to a lighter variant."""

from __future__ import annotations

import asyncio

import pytest
from lmcluster.supervisor.v1 import supervisor_pb2, supervisor_service_pb2

from services.router.errors import Overloaded
from services.router.routing import RoutingTable


def backend(backend_id: str, model_id: str, slots: int = 1, state: int = supervisor_pb2.BACKEND_STATE_READY):
    return supervisor_pb2.Backend(
        id=backend_id, model_id=model_id, endpoint=f"http://{backend_id}", state=state,
        slots=supervisor_pb2.Slots(total=slots),
    )


def table_with(*backends: supervisor_pb2.Backend, queue_limit: int = 4, queue_timeout: float = 5.0) -> RoutingTable:
    table = RoutingTable(queue_limit=queue_limit, queue_timeout=queue_timeout, overflow_queue_threshold=0, retry_after=3)
    table.apply(
        supervisor_service_pb2.WatchBackendsResponse(
            revision=1, snapshot=supervisor_service_pb2.BackendSnapshot(backends=list(backends))
        )
    )
    return table


async def test_least_loaded_replica_is_chosen() -> None:
    table = table_with(backend("a", "m", slots=2), backend("b", "m", slots=2))
    async with table.lease(("m",)) as first:
        async with table.lease(("m",)) as second:
            assert {first.load.backend.id, second.load.backend.id} == {"a", "b"}


async def test_draining_and_failed_backends_get_no_requests() -> None:
    table = table_with(
        backend("a", "m", state=supervisor_pb2.BACKEND_STATE_DRAINING),
        backend("b", "m"),
        backend("c", "m", state=supervisor_pb2.BACKEND_STATE_FAILED),
    )
    async with table.lease(("m",)) as lease:
        assert lease.load.backend.id == "b"


async def test_overflow_goes_to_the_lighter_variant_and_comes_back() -> None:
    table = table_with(backend("q8", "m-q8", slots=1), backend("q4", "m-q4", slots=1))
    async with table.lease(("m-q8", "m-q4")) as first:
        assert first.model_id == "m-q8"
        async with table.lease(("m-q8", "m-q4")) as overflow:
            assert overflow.model_id == "m-q4"
    async with table.lease(("m-q8", "m-q4")) as again:
        assert again.model_id == "m-q8"


async def test_waiters_get_the_slot_when_it_frees() -> None:
    table = table_with(backend("a", "m", slots=1))
    order: list[str] = []

    async def hold(name: str, entered: asyncio.Event | None = None, release: asyncio.Event | None = None) -> None:
        async with table.lease(("m",)):
            order.append(name)
            if entered:
                entered.set()
            if release:
                await release.wait()

    entered, release = asyncio.Event(), asyncio.Event()
    holder = asyncio.create_task(hold("first", entered, release))
    await entered.wait()
    waiter = asyncio.create_task(hold("second"))
    await asyncio.sleep(0)
    assert table.queue_depth() == 1
    release.set()
    await asyncio.gather(holder, waiter)
    assert order == ["first", "second"]


async def test_a_full_queue_answers_overloaded_with_retry_after() -> None:
    table = table_with(backend("a", "m", slots=1), queue_limit=1)
    entered, release = asyncio.Event(), asyncio.Event()

    async def hold() -> None:
        async with table.lease(("m",)):
            entered.set()
            await release.wait()

    holder = asyncio.create_task(hold())
    await entered.wait()
    waiter = asyncio.create_task(hold())
    await asyncio.sleep(0)
    with pytest.raises(Overloaded) as refused:
        async with table.lease(("m",)):
            pass
    assert refused.value.retry_after == 3
    release.set()
    await asyncio.gather(holder, waiter)


async def test_waiting_too_long_is_overloaded() -> None:
    table = table_with(backend("a", "m", slots=1), queue_timeout=0.05)
    async with table.lease(("m",)):
        with pytest.raises(Overloaded, match="became free"):
            async with table.lease(("m",)):
                pass


async def test_switched_event_moves_traffic_to_the_new_backend() -> None:
    table = table_with(backend("old", "m"))
    new = backend("new", "m")
    old_draining = backend("old", "m", state=supervisor_pb2.BACKEND_STATE_DRAINING)
    table.apply(
        supervisor_service_pb2.WatchBackendsResponse(
            revision=2,
            event=supervisor_service_pb2.BackendEvent(
                type=supervisor_service_pb2.BACKEND_EVENT_TYPE_SWITCHED, backend=new, replaced=old_draining
            ),
        )
    )
    async with table.lease(("m",)) as lease:
        assert lease.load.backend.id == "new"


async def test_a_waiter_gets_a_backend_back_when_its_pause_after_a_failure_ends() -> None:
    # The only backend failed a request and is skipped for a moment; nothing else happens (no watch
    # event, no released lease). The waiting request must still get it when the pause ends, not be
    # refused when the queue timeout (much longer than the pause) passes.
    table = table_with(backend("a", "m", slots=1), queue_timeout=5.0)
    table.avoid("a", seconds=0.3)
    async with table.lease(("m",)) as lease:
        assert lease.load.backend.id == "a"

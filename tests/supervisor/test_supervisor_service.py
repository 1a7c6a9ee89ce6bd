"""SupervisorService through its generated stub: the real Registry, the real llama-server."""

from __future__ import annotations

import asyncio
import os
import signal

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from lmcluster.supervisor.v1 import supervisor_pb2
from lmcluster.supervisor.v1 import supervisor_service_pb2 as pb

from services.registry.server import RunningRegistry
from tests.fixtures.threads import threads_niceness, threads_policy
from tests.supervisor.support import (
    BROKEN_ALIAS,
    DEMO_ALIAS,
    DEMO_ID,
    OTHER_ALIAS,
    THIRD_ALIAS,
    llama_server_children,
    list_backends,
    started_supervisor,
    wait_until,
)

READY = supervisor_pb2.BACKEND_STATE_READY
FAILED = supervisor_pb2.BACKEND_STATE_FAILED
STOPPED = supervisor_pb2.BACKEND_STATE_STOPPED
DRAINING = supervisor_pb2.BACKEND_STATE_DRAINING


async def ensure(stub, model: str, variant: str = "") -> supervisor_pb2.Backend:  # type: ignore[no-untyped-def]
    return (await stub.EnsureBackend(pb.EnsureBackendRequest(model=model, variant=variant), timeout=90)).backend


async def rpc_error(call) -> grpc.aio.AioRpcError:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    return raised.value


async def test_ensure_starts_a_ready_backend_and_fills_every_field(registry: RunningRegistry) -> None:
    async with started_supervisor(registry.address) as (supervisor, stub):
        backend = await ensure(stub, DEMO_ALIAS)
        assert backend.state == READY
        assert backend.model_id == DEMO_ID and backend.alias == DEMO_ALIAS and backend.variant == "Q4_1"
        assert backend.base_id and backend.model_fingerprint
        assert backend.id == f"{DEMO_ALIAS}#0@{backend.endpoint.rsplit(':', 1)[1]}"
        assert backend.endpoint.startswith("http://127.0.0.1:") and backend.metrics_url == backend.endpoint + "/metrics"
        assert backend.pid in llama_server_children()
        # Every thread of it (ggml's workers too) yields the CPU to the gateway's request work.
        assert threads_policy(backend.pid) == {os.SCHED_IDLE}  # LMC_SUPERVISOR_SCHED_POLICY's default
        assert backend.slots.total == 2 and backend.slots.context_per_slot == 512
        assert backend.command[0].endswith("llama-server") and "--ctx-size" in backend.command
        assert backend.HasField("started_at") and backend.HasField("ready_at") and backend.HasField("last_used_at")
        assert backend.memory_estimate_bytes > 98_000_000
        async with httpx.AsyncClient(timeout=30) as client:
            reply = await client.post(f"{backend.endpoint}/completion", json={"prompt": "Hi", "n_predict": 4})
            assert reply.status_code == 200
        # By id, the same backend; the listing has it and the memory in use.
        assert (await ensure(stub, DEMO_ID)).id == backend.id
        listing = await stub.ListBackends(pb.ListBackendsRequest(model=DEMO_ALIAS))
        assert [b.id for b in listing.backends] == [backend.id]
        assert listing.memory.used_bytes == backend.memory_estimate_bytes and listing.memory.budget_bytes > 0


async def test_normal_scheduling_runs_every_thread_at_the_niceness(registry: RunningRegistry) -> None:
    async with started_supervisor(registry.address, sched_policy="normal") as (_, stub):
        backend = await ensure(stub, DEMO_ALIAS)
        assert backend.state == READY
        assert threads_policy(backend.pid) == {os.SCHED_OTHER}
        assert threads_niceness(backend.pid) == {10}  # LMC_SUPERVISOR_NICE's default
        async with httpx.AsyncClient(timeout=30) as client:
            reply = await client.post(f"{backend.endpoint}/completion", json={"prompt": "Hi", "n_predict": 4})
            assert reply.status_code == 200 and reply.json()["content"] is not None


async def test_concurrent_ensure_calls_start_one_process(registry: RunningRegistry) -> None:
    before = llama_server_children()
    async with started_supervisor(registry.address) as (_supervisor, stub):
        backends = await asyncio.gather(*(ensure(stub, name) for name in [DEMO_ALIAS, DEMO_ID] * 4))
        assert len({b.id for b in backends}) == 1 and len({b.pid for b in backends}) == 1
        assert len(llama_server_children() - before) == 1
        assert len(await list_backends(stub)) == 1


async def test_bad_requests_get_clear_errors(registry: RunningRegistry) -> None:
    async with started_supervisor(registry.address, budget=50_000_000) as (_supervisor, stub):
        error = await rpc_error(stub.EnsureBackend(pb.EnsureBackendRequest(model=" ")))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "model is empty" in error.details()

        error = await rpc_error(stub.EnsureBackend(pb.EnsureBackendRequest(model="no-such-model")))
        assert error.code() == grpc.StatusCode.NOT_FOUND
        assert "no-such-model" in error.details() and DEMO_ALIAS in error.details()

        error = await rpc_error(stub.EnsureBackend(pb.EnsureBackendRequest(model=DEMO_ALIAS, variant="Q8_0")))
        assert error.code() == grpc.StatusCode.NOT_FOUND and "Q4_1" in error.details()

        error = await rpc_error(stub.EnsureBackend(pb.EnsureBackendRequest(model=BROKEN_ALIAS)))
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "INVALID" in error.details() and "only READY models" in error.details()

        # 50 MB cannot hold a 98 MB model: never, and the message says by how much.
        error = await rpc_error(stub.EnsureBackend(pb.EnsureBackendRequest(model=DEMO_ALIAS)))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "can never fit" in error.details() and "47.7 MiB" in error.details()

        error = await rpc_error(stub.StopBackend(pb.StopBackendRequest()))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        error = await rpc_error(stub.StopBackend(pb.StopBackendRequest(backend_id="nope#0@1")))
        assert error.code() == grpc.StatusCode.NOT_FOUND
        assert await list_backends(stub) == []


async def test_a_crash_loop_ends_failed_and_is_not_hammered(registry: RunningRegistry) -> None:
    async with started_supervisor(
        registry.address, model_args={DEMO_ALIAS: ["--no-such-flag"]}, max_restarts=2
    ) as (_supervisor, stub):
        error = await rpc_error(stub.EnsureBackend(pb.EnsureBackendRequest(model=DEMO_ALIAS), timeout=60))
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert "invalid argument: --no-such-flag" in error.details()
        (backend,) = await list_backends(stub)
        assert backend.state == FAILED and backend.restart_count == 2 and backend.pid == 0
        assert "invalid argument: --no-such-flag" in backend.last_error
        # Asking again answers at once with the reason and starts nothing.
        again = await rpc_error(stub.EnsureBackend(pb.EnsureBackendRequest(model=DEMO_ALIAS), timeout=5))
        assert again.code() == grpc.StatusCode.UNAVAILABLE and "Next try in" in again.details()
        (same,) = await list_backends(stub)
        assert same.id == backend.id and same.restart_count == 2 and not llama_server_children()
        # StopBackend clears it.
        (stopped,) = (await stub.StopBackend(pb.StopBackendRequest(backend_id=backend.id))).backends
        assert stopped.state == STOPPED


async def test_watch_streams_a_snapshot_then_every_change(registry: RunningRegistry) -> None:
    async with started_supervisor(registry.address) as (_supervisor, stub):
        first = await ensure(stub, DEMO_ALIAS)
        stream = stub.WatchBackends(pb.WatchBackendsRequest())
        snapshot = await anext(aiter(stream))
        assert [b.id for b in snapshot.snapshot.backends] == [first.id]
        revision = snapshot.revision
        await stub.StopBackend(pb.StopBackendRequest(model=DEMO_ALIAS))
        second = await ensure(stub, OTHER_ALIAS)
        seen: list[tuple[int, str, int]] = []
        async for message in stream:
            assert message.revision == revision + 1, "revisions have no gaps"
            revision = message.revision
            seen.append((message.event.type, message.event.backend.id, message.event.backend.state))
            if message.event.backend.id == second.id and message.event.backend.state == READY:
                break
        stream.cancel()
        assert (pb.BACKEND_EVENT_TYPE_CHANGED, first.id, DRAINING) in seen
        assert (pb.BACKEND_EVENT_TYPE_CHANGED, first.id, STOPPED) in seen
        assert seen[[s[1] for s in seen].index(second.id)][0] == pb.BACKEND_EVENT_TYPE_ADDED


async def test_kill_9_is_seen_in_the_listing_as_a_restart(registry: RunningRegistry) -> None:
    async with started_supervisor(registry.address) as (_supervisor, stub):
        backend = await ensure(stub, DEMO_ALIAS)
        os.kill(backend.pid, signal.SIGKILL)

        async def restarted() -> supervisor_pb2.Backend | None:
            (now,) = await list_backends(stub)
            return now if now.state == READY and now.restart_count == 1 else None

        now = await wait_until(restarted, 30, "READY with restarts=1")
        assert now.pid != backend.pid and "SIGKILL" in now.last_error


async def test_replicas_are_separate_backends(registry: RunningRegistry) -> None:
    async with started_supervisor(registry.address, replicas={DEMO_ALIAS: 2}) as (_supervisor, stub):
        await ensure(stub, DEMO_ALIAS)

        async def both_ready() -> list[supervisor_pb2.Backend] | None:
            backends = await list_backends(stub)
            return backends if len(backends) == 2 and all(b.state == READY for b in backends) else None

        backends = await wait_until(both_ready, 60, "two READY replicas")
        assert [b.replica for b in backends] == [0, 1]
        assert len({b.endpoint for b in backends}) == 2 and len({b.pid for b in backends}) == 2


async def test_preload_starts_models_before_serving(registry: RunningRegistry) -> None:
    async with started_supervisor(registry.address, preload=f"{DEMO_ALIAS}, {OTHER_ALIAS}") as (supervisor, stub):
        await asyncio.wait_for(asyncio.shield(supervisor.ready), 90)
        async with grpc.aio.insecure_channel(supervisor.address) as channel:
            health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        backends = await list_backends(stub)
        assert sorted(b.alias for b in backends) == sorted([DEMO_ALIAS, OTHER_ALIAS])
        assert all(b.state == READY for b in backends)


async def test_idle_backends_unload_after_the_ttl(registry: RunningRegistry) -> None:
    async with started_supervisor(registry.address, idle_ttl_seconds=1.0) as (_supervisor, stub):
        backend = await ensure(stub, DEMO_ALIAS)

        async def unloaded() -> supervisor_pb2.Backend | None:
            (now,) = await list_backends(stub)
            return now if now.state == STOPPED else None

        now = await wait_until(unloaded, 30, "the idle unload")
        assert now.state_reason == "idle for 1 s" and now.pid == 0
        assert backend.pid not in llama_server_children()
        # Asked for again, it starts again.
        assert (await ensure(stub, DEMO_ALIAS)).state == READY


async def test_least_recently_used_idle_backend_makes_room(registry: RunningRegistry) -> None:
    async with started_supervisor(registry.address) as (supervisor, stub):
        one = (await ensure(stub, DEMO_ALIAS)).memory_estimate_bytes
        await stub.StopBackend(pb.StopBackendRequest(model=DEMO_ALIAS))
        # Room for two backends, not three.
        supervisor.fleet.budget = int(one * 2.5)
        first = await ensure(stub, DEMO_ALIAS)
        second = await ensure(stub, OTHER_ALIAS)
        await ensure(stub, DEMO_ALIAS)  # used again: OTHER is now the least recently used
        third = await ensure(stub, THIRD_ALIAS)
        states = {b.id: b for b in await list_backends(stub)}
        assert states[first.id].state == READY and states[third.id].state == READY
        assert states[second.id].state == STOPPED
        assert states[second.id].state_reason == f"evicted (least recently used) to make room for {third.model_id}"
        memory = (await stub.ListBackends(pb.ListBackendsRequest())).memory
        assert memory.used_bytes == 2 * one <= memory.budget_bytes


async def test_a_model_that_does_not_fit_next_to_busy_backends_is_refused(registry: RunningRegistry) -> None:
    async with started_supervisor(registry.address) as (supervisor, stub):
        first = await ensure(stub, DEMO_ALIAS)
        supervisor.fleet.budget = int(first.memory_estimate_bytes * 1.5)
        async with httpx.AsyncClient(timeout=60) as client:
            busy = asyncio.create_task(
                client.post(
                    f"{first.endpoint}/completion",
                    json={"prompt": "Tell a long story.", "n_predict": 96, "ignore_eos": True},
                )
            )
            backend = supervisor.fleet.backends[first.id]
            await wait_until(lambda: backend.slots_busy > 0, 20, "the backend to be seen busy")
            error = await rpc_error(stub.EnsureBackend(pb.EnsureBackendRequest(model=OTHER_ALIAS)))
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "busy" in error.details() and "MiB" in error.details()
            assert (await busy).status_code == 200


async def test_a_removed_model_file_drains_and_stops_its_backend(registry: RunningRegistry) -> None:
    async with started_supervisor(registry.address) as (_supervisor, stub):
        backend = await ensure(stub, OTHER_ALIAS)
        (registry.host.settings.models_dir / "acme/Other-GGUF/Other-Model.Q4_1.gguf").unlink()

        async def stopped() -> supervisor_pb2.Backend | None:
            (now,) = await list_backends(stub)
            return now if now.state == STOPPED else None

        now = await wait_until(stopped, 30, "the backend of the removed file to stop")
        assert now.state_reason == "its model file was removed" and backend.pid not in llama_server_children()
        error = await rpc_error(stub.EnsureBackend(pb.EnsureBackendRequest(model=OTHER_ALIAS)))
        assert error.code() == grpc.StatusCode.NOT_FOUND

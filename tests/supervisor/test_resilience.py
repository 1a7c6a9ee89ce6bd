"""The Supervisor's own failures: killed with SIGKILL, or losing the Registry."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from lmcluster.supervisor.v1 import supervisor_pb2
from lmcluster.supervisor.v1 import supervisor_service_pb2 as pb

from services.registry.server import RunningRegistry, running_registry
from tests.fixtures.parts import free_port, process_alive, running_part
from tests.supervisor.support import (
    DEMO_ALIAS,
    OTHER_ALIAS,
    OTHER_RELATIVE,
    TEST_PORTS,
    list_backends,
    llama_server_children,
    registry_settings,
    started_supervisor,
    wait_until,
)

READY = supervisor_pb2.BACKEND_STATE_READY
STOPPED = supervisor_pb2.BACKEND_STATE_STOPPED


async def test_sigkill_of_the_supervisor_leaves_no_llama_server(registry: RunningRegistry, tmp_path: Path) -> None:
    port = free_port()
    env = {
        "LMC_SUPERVISOR_PORT": str(port),
        "LMC_SUPERVISOR_REGISTRY_ADDRESS": registry.address,
        "LMC_SUPERVISOR_PRELOAD": f"{DEMO_ALIAS},{OTHER_ALIAS}",
        "LMC_SUPERVISOR_THREADS": "1",
        "LMC_SUPERVISOR_PARALLEL": "2",
        "LMC_SUPERVISOR_CONTEXT_PER_SLOT": "512",
        "LMC_SUPERVISOR_PROMPT_CACHE_MIB": "0",
        "LMC_SUPERVISOR_PORT_RANGE_START": str(TEST_PORTS[0]),
        "LMC_SUPERVISOR_PORT_RANGE_END": str(TEST_PORTS[1]),
    }
    argv = [sys.executable, "-m", "services.supervisor.server"]
    with running_part("supervisor", argv, tmp_path, env=env, cwd=Path.cwd()) as supervisor:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:

            async def serving() -> bool:
                if supervisor.process.poll() is not None:
                    pytest.fail(f"the Supervisor exited:\n{supervisor.log_tail()}")
                try:
                    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
                except grpc.aio.AioRpcError:
                    return False
                return reply.status == health_pb2.HealthCheckResponse.SERVING

            await wait_until(serving, 90, "the Supervisor to preload and serve")
        backends = llama_server_children(parent=supervisor.process.pid)
        assert len(backends) == 2
        for pid in backends:
            assert os.getpgid(pid) == pid, "each llama-server leads its own process group"
        os.kill(supervisor.process.pid, signal.SIGKILL)
        supervisor.process.wait()
        deadline = time.monotonic() + 15
        while any(process_alive(pid) for pid in backends) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in backends if process_alive(pid)], "llama-server outlived a SIGKILLed Supervisor"


async def test_the_supervisor_rides_out_a_lost_registry(models_dir: Path) -> None:
    port = free_port()
    address = f"127.0.0.1:{port}"
    async with started_supervisor(address, registry_wait_seconds=0.5) as (supervisor, stub):
        # No Registry yet: a clear, retryable error.
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.EnsureBackend(pb.EnsureBackendRequest(model=DEMO_ALIAS))
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE and address in raised.value.details()

        async with running_registry(registry_settings(models_dir, port)):
            demo = (await stub.EnsureBackend(pb.EnsureBackendRequest(model=DEMO_ALIAS), timeout=60)).backend
            other = (await stub.EnsureBackend(pb.EnsureBackendRequest(model=OTHER_ALIAS), timeout=60)).backend

        # The Registry is gone: what runs keeps running and the known models are still served.
        again = (await stub.EnsureBackend(pb.EnsureBackendRequest(model=DEMO_ALIAS), timeout=10)).backend
        assert again.id == demo.id and again.state == READY and again.pid == demo.pid
        # A file removed while the Registry is away is noticed in its first snapshot after reconnecting.
        (models_dir / OTHER_RELATIVE).unlink()
        async with running_registry(registry_settings(models_dir, port)):

            async def other_retired() -> bool:
                states = {b.id: b.state for b in await list_backends(stub)}
                return states.get(other.id) == STOPPED

            await wait_until(other_retired, 60, "the backend of the removed file to stop after reconnecting")
            (now,) = [b for b in await list_backends(stub) if b.id == demo.id]
            assert now.state == READY and now.pid == demo.pid
        assert other.pid not in llama_server_children()
        assert supervisor.fleet.registry_synced.is_set()

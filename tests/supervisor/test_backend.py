"""One backend's life cycle against the real llama-server on the demo model."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import httpx
from lmcluster.registry.v1 import registry_pb2, registry_service_pb2, registry_service_pb2_grpc

from services.common import binaries
from services.registry.server import RunningRegistry
from services.supervisor.backend import DRAINING, FAILED, READY, STARTING, STOPPED, Backend, error_tail, restart_delay
from services.supervisor.ports import PortPool
from tests.fixtures.parts import process_alive
from tests.supervisor.support import DEMO_ALIAS, TEST_PORTS, supervisor_settings, wait_until


async def registry_model(registry: RunningRegistry, name: str = DEMO_ALIAS) -> registry_pb2.Model:
    async with grpc.aio.insecure_channel(registry.address) as channel:
        stub = registry_service_pb2_grpc.RegistryServiceStub(channel)
        return (await stub.GetModel(registry_service_pb2.GetModelRequest(model=name))).model


@contextlib.asynccontextmanager
async def running_backend(registry: RunningRegistry, **overrides: Any) -> AsyncIterator[tuple[Backend, list[int]]]:
    """A started Backend on the demo model and the states it reported, stopped at the end."""
    model = await registry_model(registry)
    settings = supervisor_settings(registry.address, **overrides)
    ports = PortPool(settings.backend_host, *TEST_PORTS)
    states: list[int] = []
    backend = Backend(
        backend_id="test#0",
        model=model,
        replica=0,
        settings=settings,
        binary=binaries.llama_server_binary(),
        ports=ports,
        port=ports.acquire(),
        on_change=lambda b: states.append(b.state),
    )
    backend.start()
    try:
        yield backend, states
    finally:
        await backend.stop("test over", drain=False)


async def ready(backend: Backend) -> None:
    await asyncio.wait_for(backend.wait_ready(), 60)


async def test_flags_reach_llama_server(registry: RunningRegistry, tmp_path: Path) -> None:
    async with running_backend(
        registry, log_dir=tmp_path, extra_args=["--log-verbosity", "4"], context_per_slot=512, parallel=2
    ) as (backend, states):
        await ready(backend)
        async with httpx.AsyncClient(base_url=backend.endpoint, timeout=10) as client:
            slots = (await client.get("/slots")).json()
            props = (await client.get("/props")).json()
            metrics = (await client.get("/metrics")).text
        assert [slot["n_ctx"] for slot in slots] == [512, 512]
        assert props["total_slots"] == 2 and props["model_alias"] == DEMO_ALIAS
        assert "llamacpp:requests_processing" in metrics
        assert backend.slots_total == 2 and backend.context_per_slot == 512
        # llama-server's own account of its KV cache (at verbosity 4), from the backend's log file.
        assert backend.log_path is not None
        log_text = backend.log_path.read_text()
        kv_line = next(line for line in log_text.splitlines() if "llama_kv_cache: size" in line)
        assert re.search(r"K \(q8_0\)", kv_line) and re.search(r"V \(q4_0\)", kv_line), kv_line
        assert "flash_attn            = enabled" in log_text
        assert states[0] == STARTING and states[-1] == READY
        proto = backend.to_proto()
        assert proto.command == backend.plan.argv and proto.pid == backend.pid > 0
        assert proto.slots.context_per_slot == 512 and proto.HasField("ready_at")


async def test_kill_9_returns_to_ready_with_one_restart(registry: RunningRegistry) -> None:
    async with running_backend(registry) as (backend, _states):
        await ready(backend)
        first_pid, port = backend.pid, backend.port
        os.kill(first_pid, signal.SIGKILL)
        await wait_until(lambda: backend.restart_count == 1, 30, "a restart")
        await ready(backend)
        assert backend.state == READY and backend.pid not in (0, first_pid)
        assert backend.port == port, "a restart keeps the endpoint while the port is free"
        assert "killed by SIGKILL" in backend.last_error
        assert not process_alive(first_pid)
        async with httpx.AsyncClient(timeout=10) as client:
            assert (await client.get(f"{backend.endpoint}/health")).status_code == 200


async def test_a_hung_backend_is_restarted_by_the_liveness_check(registry: RunningRegistry) -> None:
    async with running_backend(registry, liveness_interval_seconds=0.3, health_timeout_seconds=0.5) as (backend, _):
        await ready(backend)
        hung = backend.pid
        os.kill(hung, signal.SIGSTOP)  # alive but answering nothing
        await wait_until(lambda: backend.restart_count == 1, 30, "a liveness restart")
        await ready(backend)
        assert backend.pid != hung and not process_alive(hung)
        assert "/health did not answer" in backend.last_error


async def test_a_flag_llama_server_rejects_ends_failed_with_its_reason(registry: RunningRegistry) -> None:
    async with running_backend(registry, extra_args=["--no-such-flag"], max_restarts=2) as (backend, states):
        await wait_until(lambda: backend.state == FAILED, 30, "FAILED")
        assert backend.restart_count == 2, "max_restarts=2: three attempts in all, then FAILED"
        assert states.count(FAILED) == 1
        assert "invalid argument: --no-such-flag" in backend.last_error
        assert "exited with code 1" in backend.last_error
        assert backend.pid == 0 and backend.port == 0
        assert "gave up after 3 failures" in backend.state_reason


async def test_drain_lets_the_in_flight_request_finish(registry: RunningRegistry) -> None:
    async with running_backend(registry, drain_settle_seconds=0.2) as (backend, states):
        await ready(backend)
        pid = backend.pid
        async with httpx.AsyncClient(timeout=60) as client:
            request = asyncio.create_task(
                client.post(
                    f"{backend.endpoint}/completion",
                    json={"prompt": "Write a long story about a lighthouse.", "n_predict": 48, "ignore_eos": True},
                )
            )
            await wait_until(lambda: backend.in_flight(), 20, "the request to be processing")
            await backend.stop("test drain")
            reply = await request
        assert reply.status_code == 200 and reply.json()["tokens_predicted"] == 48
        assert backend.state == STOPPED and not process_alive(pid)
        assert states[-2:] == [DRAINING, STOPPED]


def test_restart_delay_grows_exponentially_with_jitter_and_is_capped() -> None:
    import random

    rng = random.Random(7)
    delays = [restart_delay(n, 1.0, 30.0, rng) for n in range(1, 8)]
    for n, delay in enumerate(delays, start=1):
        base = min(30.0, 2 ** (n - 1))
        assert base * 0.5 <= delay <= base
    assert restart_delay(50, 1.0, 30.0, rng) <= 30.0


def test_error_tail_keeps_the_error_lines_without_timestamps() -> None:
    lines = [
        "0.00.002.230 I srv  llama_server: initializing ...",
        "0.00.158.280 E llama_init_from_model: quantized V cache requires flash_attn to be enabled",
        "0.00.158.308 I srv    operator(): cleaning up before exit...",
        "0.00.158.785 E srv  llama_server: exiting due to model loading error",
    ]
    tail = error_tail(lines)
    assert tail.splitlines() == [
        "E llama_init_from_model: quantized V cache requires flash_attn to be enabled",
        "E srv  llama_server: exiting due to model loading error",
    ]
    assert error_tail(["a", "b", "c", "d"]) == "b\nc\nd"

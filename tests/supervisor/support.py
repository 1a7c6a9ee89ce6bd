"""Helpers of the Supervisor tests: models folder layout, process checks, waiting, small settings."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from lmcluster.supervisor.v1 import supervisor_service_pb2 as pb
from lmcluster.supervisor.v1 import supervisor_service_pb2_grpc as pb_grpc

from services.registry.settings import RegistrySettings
from services.supervisor.server import RunningSupervisor, running_supervisor
from services.supervisor.settings import SupervisorSettings
from tests.fixtures.parts import process_table

DEMO_RELATIVE = Path("HuggingFaceTB/SmolLM2-135M-Instruct-GGUF/SmolLM2-135M-Instruct.Q4_1.gguf")
DEMO_ALIAS = "smollm2-135m-instruct-q4_1"
DEMO_ID = "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF/SmolLM2-135M-Instruct.Q4_1"
OTHER_RELATIVE = Path("acme/Other-GGUF/Other-Model.Q4_1.gguf")
OTHER_ALIAS = "other-model-q4_1"
THIRD_RELATIVE = Path("acme/Third-GGUF/Third-Model.Q4_1.gguf")
THIRD_ALIAS = "third-model-q4_1"
BROKEN_RELATIVE = Path("junk/Broken-GGUF/broken.gguf")
BROKEN_ALIAS = "broken"

# A range of its own, away from the defaults; ports in use by anyone are skipped anyway.
TEST_PORTS = (28100, 28299)


# --- processes ---------------------------------------------------------------------------------


def llama_server_children(parent: int | None = None) -> set[int]:
    """pids of llama-server processes whose parent is `parent` (this process by default)."""
    parent = os.getpid() if parent is None else parent
    return {pid for pid, info in process_table().items() if info.name.startswith("llama-server") and info.ppid == parent}


# --- waiting ------------------------------------------------------------------------------------


async def wait_until(
    condition: Callable[[], Awaitable[Any] | Any], timeout: float = 60.0, what: str = "condition"
) -> Any:
    """Polls `condition` (sync or async) until it returns something truthy; fails after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if asyncio.iscoroutine(result) or isinstance(result, Awaitable):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(0.1)


# --- models and the Registry --------------------------------------------------------------------


def place_model(models_dir: Path, relative: Path, source: Path, *, copy: bool = False) -> Path:
    target = models_dir / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    if copy:
        shutil.copyfile(source, target)
    else:
        os.symlink(source, target)
    return target


def registry_settings(models_dir: Path, port: int = 0) -> RegistrySettings:
    return RegistrySettings(
        port=port, metrics_port=0, models_dir=models_dir, settle_seconds=0.2, watch_debounce_ms=50
    )


# --- the Supervisor -----------------------------------------------------------------------------


def supervisor_settings(registry_address: str, **overrides: Any) -> SupervisorSettings:
    """Small, fast backends for tests; `overrides` replace any setting."""
    values: dict[str, Any] = {
        "port": 0,
        "metrics_port": 0,
        "registry_address": registry_address,
        "port_range_start": TEST_PORTS[0],
        "port_range_end": TEST_PORTS[1],
        "threads": 1,
        "parallel": 2,
        "context_per_slot": 512,
        "prompt_cache_mib": 0,
        "ready_timeout_seconds": 60,
        "health_timeout_seconds": 2,
        "liveness_interval_seconds": 0.5,
        "liveness_failures": 3,
        "restart_backoff_initial_seconds": 0.2,
        "restart_backoff_max_seconds": 1.0,
        "max_restarts": 3,
        "drain_timeout_seconds": 30,
        "drain_settle_seconds": 0.3,
        "stop_grace_seconds": 5,
        "idle_ttl_seconds": 0,
        "shutdown_grace_seconds": 2,
    }
    values.update(overrides)
    return SupervisorSettings(**values)


@contextlib.asynccontextmanager
async def started_supervisor(
    registry_address: str, *, budget: int | None = None, **overrides: Any
) -> AsyncIterator[tuple[RunningSupervisor, pb_grpc.SupervisorServiceStub]]:
    """A Supervisor in this process, and a stub talking to it over gRPC."""
    settings = supervisor_settings(registry_address, **overrides)
    async with running_supervisor(settings, budget=budget) as supervisor:
        async with grpc.aio.insecure_channel(supervisor.address) as channel:
            yield supervisor, pb_grpc.SupervisorServiceStub(channel)


async def list_backends(stub: pb_grpc.SupervisorServiceStub, model: str = "") -> list[Any]:
    return list((await stub.ListBackends(pb.ListBackendsRequest(model=model))).backends)

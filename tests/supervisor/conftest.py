"""Fixtures for the Supervisor tests: a models folder, the real Registry, and a leftover check.

Every test that starts backends runs the real llama-server on the demo model with one thread, two
slots of 512 tokens and no prompt cache (tests/supervisor/support.py), so several fit on a small
machine. An autouse fixture fails any test that leaves a llama-server child of the test process
behind.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from lmcluster.registry.v1 import registry_pb2, registry_service_pb2, registry_service_pb2_grpc

from services.registry.server import RunningRegistry, running_registry
from tests.supervisor.support import (
    BROKEN_ALIAS,
    BROKEN_RELATIVE,
    DEMO_RELATIVE,
    OTHER_RELATIVE,
    THIRD_RELATIVE,
    llama_server_children,
    place_model,
    registry_settings,
    wait_until,
)


@pytest.fixture(autouse=True)
def no_llama_server_left() -> Iterator[None]:
    """Fails the test if a llama-server it started is still running afterwards."""
    before = llama_server_children()
    yield
    deadline = time.monotonic() + 15
    while (left := llama_server_children() - before) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, f"llama-server processes left behind: {sorted(left)}"


@pytest.fixture
def models_dir(tmp_path: Path, demo_model: Path) -> Path:
    """An LM Studio-style folder: the demo model under two more names, and a broken file."""
    folder = tmp_path / "models"
    place_model(folder, DEMO_RELATIVE, demo_model)
    place_model(folder, OTHER_RELATIVE, demo_model)
    place_model(folder, THIRD_RELATIVE, demo_model)
    broken = folder / BROKEN_RELATIVE
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"GGUF" + b"\0" * 100)
    return folder


@pytest.fixture
async def registry(models_dir: Path) -> AsyncIterator[RunningRegistry]:
    """The real Registry on `models_dir`, once the broken file has been judged INVALID."""
    async with running_registry(registry_settings(models_dir)) as running:
        async with grpc.aio.insecure_channel(running.address) as channel:
            stub = registry_service_pb2_grpc.RegistryServiceStub(channel)

            async def broken_is_invalid() -> bool:
                reply = await stub.GetModel(registry_service_pb2.GetModelRequest(model=BROKEN_ALIAS))
                return reply.model.state == registry_pb2.MODEL_STATE_INVALID

            await wait_until(broken_is_invalid, 30, "the Registry to judge the broken file")
        yield running

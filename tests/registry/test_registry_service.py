"""RegistryService over real gRPC: a server on port 0 built with ServiceHost, called through the stubs."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import shutil
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import httpx
import pytest
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from lmcluster.registry.v1 import registry_pb2, registry_service_pb2, registry_service_pb2_grpc
from rich.console import Console

from services.registry.cli_table import print_models
from services.registry.server import SERVICE_NAME, RunningRegistry, running_registry
from services.registry.settings import RegistrySettings
from tests.fixtures.parts import free_port, running_part
from tests.registry.conftest import DEMO_ID, DEMO_REL
from tests.registry.gguf_files import derive, header_copy, write_small_gguf

READY = registry_pb2.MODEL_STATE_READY
DOWNLOADING = registry_pb2.MODEL_STATE_DOWNLOADING
INVALID = registry_pb2.MODEL_STATE_INVALID
ADDED = registry_service_pb2.MODEL_EVENT_TYPE_ADDED
CHANGED = registry_service_pb2.MODEL_EVENT_TYPE_CHANGED
REMOVED = registry_service_pb2.MODEL_EVENT_TYPE_REMOVED
REPO_ROOT = Path(__file__).resolve().parents[2]


@asynccontextmanager
async def registry_on(
    models_dir: Path, **overrides: object
) -> AsyncIterator[tuple[RunningRegistry, registry_service_pb2_grpc.RegistryServiceStub]]:
    values: dict[str, object] = {
        "models_dir": models_dir,
        "port": 0,
        "metrics_port": 0,
        "settle_seconds": 0.2,
        "watch_debounce_ms": 100,
        "shutdown_grace_seconds": 2,
    }
    values.update(overrides)
    settings = RegistrySettings(**values)  # type: ignore[arg-type]
    async with running_registry(settings) as registry, grpc.aio.insecure_channel(registry.address) as channel:
        yield registry, registry_service_pb2_grpc.RegistryServiceStub(channel)


@pytest.fixture
def models_dir(tmp_path: Path, demo_model: Path, place: Callable[..., Path]) -> Path:
    models = tmp_path / "models"
    place(models, demo_model, DEMO_REL)
    projector = write_small_gguf(
        models / "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF/mmproj-f16.gguf", arch="clip"
    )
    broken = models / "broken/notes.gguf"
    broken.parent.mkdir()
    broken.write_text("hello")
    for path in (projector, broken):
        os.utime(path, (time.time() - 60, time.time() - 60))
    return models


async def test_list_models(models_dir: Path) -> None:
    async with registry_on(models_dir) as (_, stub):
        listed = await stub.ListModels(registry_service_pb2.ListModelsRequest())
        assert [m.id for m in listed.models] == [
            "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF/SmolLM2-135M-Instruct.Q4_1",
            "broken/notes",
        ]
        demo = listed.models[0]
        assert demo.state == READY and demo.quantization == "Q4_1" and demo.context_length == 8192
        assert [Path(p.path).name for p in demo.projectors] == ["mmproj-f16.gguf"]
        assert listed.models[1].state == INVALID and listed.models[1].reason.startswith("not a GGUF file")

        everything = await stub.ListModels(registry_service_pb2.ListModelsRequest(include_projectors=True))
        kinds = {m.id.rsplit("/", 1)[1]: m.kind for m in everything.models}
        assert kinds["mmproj-f16"] == registry_pb2.MODEL_KIND_PROJECTOR
        assert [m.id for m in everything.models] == sorted(m.id for m in everything.models)

        ready = await stub.ListModels(registry_service_pb2.ListModelsRequest(states=[READY]))
        assert [m.id for m in ready.models] == [DEMO_ID]
        invalid = await stub.ListModels(registry_service_pb2.ListModelsRequest(states=[INVALID, DOWNLOADING]))
        assert [m.id for m in invalid.models] == ["broken/notes"]


async def test_get_model(models_dir: Path, demo_model: Path) -> None:
    async with registry_on(models_dir) as (_, stub):
        by_id = await stub.GetModel(registry_service_pb2.GetModelRequest(model=DEMO_ID))
        by_alias = await stub.GetModel(
            registry_service_pb2.GetModelRequest(model="smollm2-135m-instruct-q4_1")
        )
        assert by_id.model == by_alias.model and by_id.model.fingerprint.sha256 == ""

        hashed = await stub.GetModel(registry_service_pb2.GetModelRequest(model=DEMO_ID, compute_sha256=True))
        assert hashed.model.fingerprint.sha256 == hashlib.sha256(demo_model.read_bytes()).hexdigest()

        with pytest.raises(grpc.aio.AioRpcError) as empty:
            await stub.GetModel(registry_service_pb2.GetModelRequest(model=" "))
        assert empty.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "model id or alias" in (empty.value.details() or "")

        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await stub.GetModel(registry_service_pb2.GetModelRequest(model="smollm2-135m-instruct-q4"))
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        assert "did you mean 'smollm2-135m-instruct-q4_1'" in (missing.value.details() or "")

        os.mkfifo(models_dir / "pipe.gguf")
        await _wait_for(stub, "pipe", lambda m: m.state == INVALID)
        with pytest.raises(grpc.aio.AioRpcError) as pipe_hash:
            await stub.GetModel(registry_service_pb2.GetModelRequest(model="pipe", compute_sha256=True))
        assert pipe_hash.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "named pipe" in (pipe_hash.value.details() or "")


async def _wait_for(
    stub: registry_service_pb2_grpc.RegistryServiceStub,
    model: str,
    predicate: Callable[[registry_pb2.Model], bool],
    timeout: float = 10,
) -> registry_pb2.Model:
    deadline = time.monotonic() + timeout
    while True:
        listed = await stub.ListModels(registry_service_pb2.ListModelsRequest(include_projectors=True))
        for candidate in listed.models:
            if candidate.id == model and predicate(candidate):
                return candidate
        if time.monotonic() > deadline:
            raise AssertionError(f"{model} never matched within {timeout} s: {listed}")
        await asyncio.sleep(0.05)


async def _next_event(
    stream: AsyncIterator[registry_service_pb2.WatchModelsResponse],
    predicate: Callable[[registry_service_pb2.WatchModelsResponse], bool],
    timeout: float = 10,
) -> registry_service_pb2.WatchModelsResponse:
    """The first message matching `predicate`; the wait is bounded, the events are not timed."""

    async def scan() -> registry_service_pb2.WatchModelsResponse:
        async for message in stream:
            if predicate(message):
                return message
        raise AssertionError("the stream ended")

    return await asyncio.wait_for(scan(), timeout)


async def test_watch_models_sees_files_added_replaced_and_removed(models_dir: Path, demo_model: Path) -> None:
    async with registry_on(models_dir, rescan_seconds=3600) as (_, stub):
        call = stub.WatchModels(registry_service_pb2.WatchModelsRequest())
        stream = call.__aiter__()
        first = await stream.__anext__()
        assert first.WhichOneof("update") == "snapshot"
        assert DEMO_ID in [m.id for m in first.snapshot.models]
        assert any(m.kind == registry_pb2.MODEL_KIND_PROJECTOR for m in first.snapshot.models)
        revision = first.revision

        def about(
            model_id: str, event_type: int, state: int | None = None
        ) -> Callable[[registry_service_pb2.WatchModelsResponse], bool]:
            return lambda m: (
                m.WhichOneof("update") == "event"
                and m.event.model.id == model_id
                and m.event.type == event_type
                and (state is None or m.event.model.state == state)
            )

        # A new download appears: a fresh copy, DOWNLOADING until it has settled, then READY.
        added_path = models_dir / "new/copy/SmolLM2-135M-Instruct-Q4_1.gguf"
        added_path.parent.mkdir(parents=True)
        shutil.copyfile(demo_model, added_path)
        added = await _next_event(stream, about("new/copy/SmolLM2-135M-Instruct-Q4_1", ADDED))
        assert added.revision > revision
        if added.event.model.state != READY:
            assert added.event.model.state == DOWNLOADING
            ready = await _next_event(stream, about("new/copy/SmolLM2-135M-Instruct-Q4_1", CHANGED, READY))
        else:
            ready = added
        assert ready.event.model.quantization == "Q4_1" and ready.event.model.reason == ""

        # Replaced by a broken file: CHANGED to INVALID with the reason.
        derive(demo_model, added_path.with_suffix(".tmp"), length=50_000_000)
        os.replace(added_path.with_suffix(".tmp"), added_path)
        broken = await _next_event(stream, about("new/copy/SmolLM2-135M-Instruct-Q4_1", CHANGED, INVALID))
        assert broken.event.model.reason.startswith("truncated: tensor '")

        # Removed.
        added_path.unlink()
        removed = await _next_event(stream, about("new/copy/SmolLM2-135M-Instruct-Q4_1", REMOVED))
        assert removed.revision > broken.revision
        call.cancel()


async def test_slow_watcher_gets_a_fresh_snapshot(
    tmp_path: Path, demo_model: Path, place: Callable[..., Path]
) -> None:
    models = tmp_path / "models"
    place(models, demo_model, DEMO_REL)
    async with registry_on(models, watch=False, watch_queue_size=2) as (registry, stub):
        call = stub.WatchModels(registry_service_pb2.WatchModelsRequest())
        stream = call.__aiter__()
        first = await stream.__anext__()
        assert first.WhichOneof("update") == "snapshot" and len(first.snapshot.models) == 1
        for n in range(30):  # thirty models in one refresh: thirty events at once, more than the buffer
            write_small_gguf(models / "bulk" / f"m{n:02d}-F16.gguf")
        await registry.catalog.refresh()
        resync = await _next_event(stream, lambda m: m.WhichOneof("update") == "snapshot")
        assert len(resync.snapshot.models) == 31
        assert resync.revision == registry.catalog.revision
        call.cancel()


async def test_watch_streams_end_cleanly_on_shutdown(models_dir: Path) -> None:
    async with registry_on(models_dir) as (registry, stub):
        call = stub.WatchModels(registry_service_pb2.WatchModelsRequest())
        stream = call.__aiter__()
        assert (await stream.__anext__()).WhichOneof("update") == "snapshot"
        stopping = asyncio.create_task(registry.host.stop(grace=5))
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(stream.__anext__(), 10)
        assert await call.code() == grpc.StatusCode.OK
        await stopping


async def test_health_is_serving_only_after_the_first_scan(
    tmp_path: Path, demo_model: Path, demo_data_offset: int
) -> None:
    models = tmp_path / "models"
    for n in range(40):  # enough real headers that the first scan takes a moment
        header_copy(demo_model, models / "many" / f"m{n:02d}.Q4_1.gguf", demo_data_offset)
    port = free_port()
    settings = RegistrySettings(models_dir=models, port=port, metrics_port=0, settle_seconds=0)  # type: ignore[call-arg]
    observed: list[tuple[bool, int]] = []
    registry_ready = asyncio.Event()

    async def watch_health() -> None:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while not registry_ready.is_set():
                try:
                    answer = await health.Check(
                        health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=1
                    )
                    observed.append((registry_ready.is_set(), answer.status))
                except grpc.aio.AioRpcError:
                    pass
                await asyncio.sleep(0.01)
            answer = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5)
            observed.append((True, answer.status))

    watcher = asyncio.create_task(watch_health())
    async with running_registry(settings) as registry:
        registry_ready.set()
        await watcher
        assert registry.catalog.ready
    before = {status for ready, status in observed if not ready}
    assert before <= {health_pb2.HealthCheckResponse.NOT_SERVING}
    assert observed[-1] == (True, health_pb2.HealthCheckResponse.SERVING)


def _reflect(address: str) -> tuple[list[str], list[tuple[str, bool]]]:
    """What grpcurl does: list the services, then describe RegistryService from the server's descriptors."""
    with grpc.insecure_channel(address) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = sorted(database.get_services())
        pool = descriptor_pool.DescriptorPool(database)
        service = pool.FindServiceByName(SERVICE_NAME)
        methods = [(method.name, method.server_streaming) for method in service.methods]
        model = pool.FindMessageTypeByName("lmcluster.registry.v1.Model")
        assert "reason" in model.fields_by_name and "variants" in model.fields_by_name
    return services, methods


async def test_reflection_lists_and_describes_the_service(models_dir: Path) -> None:
    async with registry_on(models_dir) as (registry, _):
        services, methods = await asyncio.to_thread(_reflect, registry.address)
    assert services == ["grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection", SERVICE_NAME]
    assert methods == [("ListModels", False), ("GetModel", False), ("WatchModels", True)]


async def test_print_models_table(models_dir: Path) -> None:
    async with registry_on(models_dir) as (registry, _):
        output = io.StringIO()
        console = Console(file=output, width=200, color_system=None)
        code = await asyncio.to_thread(print_models, registry.address, console=console)
        assert code == 0
        text = output.getvalue()
        for heading in ("ID", "QUANT", "SIZE", "CONTEXT", "STATE", "REASON"):
            assert heading in text
        assert DEMO_ID in text and "Q4_1" in text and "98.4 MB" in text and "8192" in text and "READY" in text
        assert "broken/notes" in text and "INVALID" in text and "not a GGUF file" in text
        assert "mmproj" not in text

        only_valid = io.StringIO()
        console = Console(file=only_valid, width=200, color_system=None)
        assert (
            await asyncio.to_thread(print_models, registry.address, include_invalid=False, console=console)
            == 0
        )
        assert "broken/notes" not in only_valid.getvalue()

    unreachable = io.StringIO()
    code = print_models(f"127.0.0.1:{free_port()}", console=Console(file=unreachable, width=200))
    assert code == 1 and "cannot reach the Registry" in unreachable.getvalue()


def test_lmcluster_serve_registry_process(models_dir: Path, tmp_path: Path) -> None:
    """The real process: `lmcluster serve registry` on its configured port, stopped by SIGTERM."""
    port, metrics_port = free_port(), free_port()
    env = {
        "LMC_MODELS_DIR": str(models_dir),
        "LMC_REGISTRY_PORT": str(port),
        "LMC_REGISTRY_METRICS_PORT": str(metrics_port),
        "LMC_REGISTRY_SETTLE_SECONDS": "0",
    }
    argv = [sys.executable, "-m", "services.cli.main", "serve", "registry"]
    with running_part("registry", argv, tmp_path / "logs", env=env, cwd=REPO_ROOT) as part:

        def serving() -> bool:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
                return answer.status == health_pb2.HealthCheckResponse.SERVING

        part.wait_until(serving, 60, "health SERVING")
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = registry_service_pb2_grpc.RegistryServiceStub(channel)
            listed = stub.ListModels(registry_service_pb2.ListModelsRequest(), timeout=10)
        assert DEMO_ID in [m.id for m in listed.models]
        scraped = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
        assert 'lmc_registry_models{kind="llm",state="ready"}' in scraped
        part.process.send_signal(signal.SIGTERM)
        assert part.process.wait(30) == 0, part.log_tail()
        assert "registry stopped" in part.log_tail()

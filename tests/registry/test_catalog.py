"""The catalog over real folders: grouping, states, symlinks, growing files, events."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from lmcluster.registry.v1 import registry_pb2, registry_service_pb2
from prometheus_client import REGISTRY

from services.registry.catalog import ModelCatalog
from services.registry.settings import RegistrySettings
from tests.registry.conftest import DEMO_ID, DEMO_REL
from tests.registry.gguf_files import derive, write_small_gguf

READY = registry_pb2.MODEL_STATE_READY
DOWNLOADING = registry_pb2.MODEL_STATE_DOWNLOADING
INVALID = registry_pb2.MODEL_STATE_INVALID
REPO = "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF"


def settings_for(models_dir: Path, **overrides: object) -> RegistrySettings:
    # Settle time 0: files the tests place are complete; the tests about settling set their own.
    values: dict[str, object] = {"models_dir": models_dir, "port": 0, "metrics_port": 0, "settle_seconds": 0, "watch": False}
    values.update(overrides)
    return RegistrySettings(**values)  # type: ignore[arg-type]


@asynccontextmanager
async def catalog_of(models_dir: Path, **overrides: object) -> AsyncIterator[ModelCatalog]:
    catalog = ModelCatalog(settings_for(models_dir, **overrides))
    await catalog.start()
    try:
        yield catalog
    finally:
        await catalog.close()


async def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(0.05)


def by_id(catalog: ModelCatalog) -> dict[str, registry_pb2.Model]:
    return {model.id: model for model in catalog.models()}


async def test_lm_studio_folder_with_variants_split_and_projector(
    tmp_path: Path, demo_model: Path, q8_model: Path, split_parts: list[Path], place: Callable[..., Path]
) -> None:
    models = tmp_path / "models"
    place(models, demo_model, DEMO_REL)
    place(models, q8_model, f"{REPO}/SmolLM2-135M-Instruct-Q8_0.gguf")
    for number, part in enumerate(split_parts, 1):
        place(models, part, f"split/SmolLM2-Split/SmolLM2-Split-Q4_1-{number:05d}-of-00002.gguf")
    projector = write_small_gguf(models / REPO / "mmproj-SmolLM2-f16.gguf", arch="clip")
    async with catalog_of(models) as catalog:
        table = by_id(catalog)
        assert set(table) == {
            DEMO_ID,
            f"{REPO}/SmolLM2-135M-Instruct-Q8_0",
            "split/SmolLM2-Split/SmolLM2-Split-Q4_1",
            f"{REPO}/mmproj-SmolLM2-f16",
        }
        demo = table[DEMO_ID]
        assert demo.state == READY and demo.reason == ""
        assert demo.alias == "smollm2-135m-instruct-q4_1"
        assert (demo.publisher, demo.repo, demo.architecture, demo.quantization) == (
            "HuggingFaceTB",
            "SmolLM2-135M-Instruct-GGUF",
            "llama",
            "Q4_1",
        )
        assert demo.kind == registry_pb2.MODEL_KIND_LLM
        assert demo.path == str(models / DEMO_REL) and [f.path for f in demo.files] == [demo.path]
        assert demo.size_bytes == demo_model.stat().st_size == demo.fingerprint.size_bytes
        assert demo.fingerprint.mtime_ns == demo_model.stat().st_mtime_ns
        assert len(demo.fingerprint.header_sha256) == 64 and demo.fingerprint.sha256 == ""
        assert (demo.parameter_count, demo.context_length, demo.embedding_length, demo.block_count) == (
            134_515_008,
            8192,
            576,
            30,
        )
        assert (demo.head_count, demo.head_count_kv, demo.key_length, demo.value_length) == (9, 3, 0, 0)
        assert demo.has_chat_template and demo.name
        assert demo.discovered_at.seconds > 0 and demo.updated_at == demo.discovered_at

        # Both quantizations share a base id; the Q8_0 (more bits per weight) comes first.
        assert demo.base_id == f"{REPO}/SmolLM2-135M-Instruct"
        q8 = table[f"{REPO}/SmolLM2-135M-Instruct-Q8_0"]
        assert q8.state == READY and q8.quantization == "Q8_0" and q8.base_id == demo.base_id
        assert [v.model_id for v in demo.variants] == [q8.id, demo.id] == [v.model_id for v in q8.variants]
        assert [v.quantization for v in demo.variants] == ["Q8_0", "Q4_1"]
        assert demo.variants[0].bits_per_weight > demo.variants[1].bits_per_weight > 5
        assert all(v.state == READY for v in demo.variants)

        # The projector is attached to every model in its folder and is itself a PROJECTOR.
        mmproj = table[f"{REPO}/mmproj-SmolLM2-f16"]
        assert mmproj.kind == registry_pb2.MODEL_KIND_PROJECTOR and mmproj.state == READY
        assert [p.path for p in demo.projectors] == [str(projector)] == [p.path for p in q8.projectors]
        assert not mmproj.variants and not mmproj.projectors

        # The split model: one model, parts in order, the same parameters as the whole file.
        split = table["split/SmolLM2-Split/SmolLM2-Split-Q4_1"]
        assert split.state == READY, split.reason
        assert split.alias == "smollm2-split-q4_1" and split.base_id == "split/SmolLM2-Split/SmolLM2-Split"
        assert [Path(f.path).name for f in split.files] == [
            "SmolLM2-Split-Q4_1-00001-of-00002.gguf",
            "SmolLM2-Split-Q4_1-00002-of-00002.gguf",
        ]
        assert split.path == split.files[0].path
        assert split.size_bytes == sum(p.stat().st_size for p in split_parts)
        assert split.parameter_count == demo.parameter_count and split.context_length == 8192
        assert len(split.fingerprint.header_sha256) == 2 * 64
        assert not split.projectors

    assert REGISTRY.get_sample_value("lmc_registry_models", {"state": "ready", "kind": "llm"}) == 3
    assert REGISTRY.get_sample_value("lmc_registry_models", {"state": "ready", "kind": "projector"}) == 1


async def test_split_model_with_a_missing_or_broken_part(
    tmp_path: Path, split_parts: list[Path], place: Callable[..., Path]
) -> None:
    models = tmp_path / "models"
    place(models, split_parts[0], f"a/missing/{split_parts[0].name}")
    place(models, split_parts[0], f"a/broken/{split_parts[0].name}")
    derive(
        split_parts[1], models / "a/broken" / split_parts[1].name, length=split_parts[1].stat().st_size // 2
    )
    async with catalog_of(models) as catalog:
        table = by_id(catalog)
        missing = table["a/missing/SmolLM2-135M-Instruct-Q4_1"]
        assert missing.state == INVALID
        assert missing.reason == "missing part 2 of 2: SmolLM2-135M-Instruct-Q4_1-00002-of-00002.gguf"
        broken = table["a/broken/SmolLM2-135M-Instruct-Q4_1"]
        assert broken.state == INVALID
        assert broken.reason.startswith(
            "part 2 of 2 (SmolLM2-135M-Instruct-Q4_1-00002-of-00002.gguf): truncated:"
        )
        assert len(broken.files) == 2


async def test_hostile_and_odd_entries(tmp_path: Path, demo_model: Path, place: Callable[..., Path]) -> None:
    models = tmp_path / "models"
    models.mkdir()
    (models / "zero.gguf").touch()
    (models / "notes.gguf").write_text("not a model\n")
    os.mkfifo(models / "pipe.gguf")
    (models / "dangling.gguf").symlink_to(tmp_path / "gone.gguf")
    (models / "loop-a.gguf").symlink_to(models / "loop-b.gguf")
    (models / "loop-b.gguf").symlink_to(models / "loop-a.gguf")
    elsewhere = place(tmp_path / "elsewhere", demo_model, "real.gguf")
    (models / "linked.gguf").symlink_to(elsewhere)
    (models / "folder.gguf").mkdir()  # a folder with a model's name is just a folder
    place(models, demo_model, "folder.gguf/inside.Q4_1.gguf")
    (models / "sub").mkdir()
    (models / "sub" / "up").symlink_to(models)  # a folder link loop
    (models / "download.gguf.part").write_bytes(b"GGUF")  # in-progress names are not listed
    (models / "x.gguf.crdownload").write_bytes(b"GGUF")
    (models / ".hidden").mkdir()
    place(models, demo_model, ".hidden/secret.gguf")
    write_small_gguf(models / "future-arch.gguf", arch="llama99")
    async with catalog_of(models) as catalog:
        table = by_id(catalog)
        assert set(table) == {
            "zero",
            "notes",
            "pipe",
            "dangling",
            "loop-a",
            "loop-b",
            "linked",
            "folder.gguf/inside.Q4_1",
            "future-arch",
        }
        reasons = {model_id: (m.state, m.reason) for model_id, m in table.items()}
        assert reasons["zero"] == (INVALID, "empty file (0 bytes); the download did not start or failed")
        assert reasons["notes"][0] == INVALID and reasons["notes"][1].startswith("not a GGUF file")
        assert reasons["pipe"] == (INVALID, "not a regular file (a named pipe)")
        assert reasons["dangling"][0] == INVALID and "broken symbolic link" in reasons["dangling"][1]
        assert reasons["loop-a"] == (INVALID, "broken symbolic link: it points in a loop")
        assert (
            reasons["future-arch"][0] == INVALID
            and "unknown architecture 'llama99'" in reasons["future-arch"][1]
        )
        linked = table["linked"]
        assert linked.state == READY and linked.path == str(models / "linked.gguf")  # the link's own path
        assert table["folder.gguf/inside.Q4_1"].state == READY
        assert table["folder.gguf/inside.Q4_1"].repo == "folder.gguf"
    async with catalog_of(models, extra_architectures="llama99, other") as catalog:
        assert by_id(catalog)["future-arch"].state == READY


async def test_a_file_growing_during_the_scan(tmp_path: Path, demo_model: Path) -> None:
    """A copy written slowly while the catalog starts: DOWNLOADING while it grows, then READY."""
    models = tmp_path / "models"
    target = models / REPO / "SmolLM2-135M-Instruct.Q4_1.gguf"
    target.parent.mkdir(parents=True)
    data = demo_model.read_bytes()
    started = threading.Event()
    finished = threading.Event()

    def writer() -> None:
        with target.open("wb") as out:
            chunk = len(data) // 40
            for start in range(0, len(data), chunk):
                out.write(data[start : start + chunk])
                out.flush()
                started.set()
                time.sleep(0.05)
        finished.set()

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        await asyncio.to_thread(started.wait, 10)
        async with catalog_of(models, settle_seconds=0.5, rescan_seconds=0.2) as catalog:
            first = by_id(catalog)[DEMO_ID]
            assert first.state == DOWNLOADING and first.reason.startswith("still being written")
            seen_states = [first.state]

            def ready() -> bool:
                model = by_id(catalog).get(DEMO_ID)
                if model is not None and model.state != seen_states[-1]:
                    seen_states.append(model.state)
                return model is not None and model.state == READY

            await wait_until(ready, 30, "the grown file to be READY")
            assert finished.is_set()
            model = by_id(catalog)[DEMO_ID]
            assert model.size_bytes == len(data) and model.quantization == "Q4_1"
            assert INVALID not in seen_states  # never judged while still growing
    finally:
        thread.join()


async def test_mtime_in_the_future_settles_by_observation(tmp_path: Path, demo_model: Path) -> None:
    models = tmp_path / "models"
    path = derive(demo_model, models / "future.gguf", length=demo_model.stat().st_size)
    future = time.time() + 3600
    os.utime(path, (future, future))
    async with catalog_of(models, settle_seconds=0.3) as catalog:
        assert by_id(catalog)["future"].state == DOWNLOADING
        await wait_until(lambda: by_id(catalog)["future"].state == READY, 10, "READY after the settle time")


async def test_events_for_added_changed_and_removed(
    tmp_path: Path, demo_model: Path, place: Callable[..., Path]
) -> None:
    models = tmp_path / "models"
    place(models, demo_model, DEMO_REL)
    async with catalog_of(models) as catalog:
        subscription, revision, snapshot = catalog.subscribe()
        assert [m.id for m in snapshot] == [DEMO_ID] and revision == catalog.revision >= 1

        tiny = write_small_gguf(models / "mine" / "tiny-F16.gguf")
        os.utime(tiny, (time.time() - 60, time.time() - 60))
        await catalog.refresh()
        added = await subscription.next()
        assert isinstance(added, registry_service_pb2.WatchModelsResponse)
        assert added.revision == revision + 1
        assert added.event.type == registry_service_pb2.MODEL_EVENT_TYPE_ADDED
        assert added.event.model.id == "mine/tiny-F16" and added.event.model.state == READY

        derive(demo_model, models / "mine" / "tiny-F16.gguf.new", length=10_000)
        os.replace(models / "mine" / "tiny-F16.gguf.new", tiny)
        await catalog.refresh([tiny], "watch")
        changed = await subscription.next()
        assert isinstance(changed, registry_service_pb2.WatchModelsResponse)
        assert changed.revision == revision + 2
        assert changed.event.type == registry_service_pb2.MODEL_EVENT_TYPE_CHANGED
        assert changed.event.model.state == INVALID and changed.event.model.reason.startswith("truncated")
        assert changed.event.model.updated_at.ToNanoseconds() >= added.event.model.updated_at.ToNanoseconds()
        assert changed.event.model.discovered_at == added.event.model.discovered_at

        tiny.unlink()
        await catalog.refresh([tiny.parent], "watch")
        removed = await subscription.next()
        assert isinstance(removed, registry_service_pb2.WatchModelsResponse)
        assert removed.event.type == registry_service_pb2.MODEL_EVENT_TYPE_REMOVED
        assert removed.event.model.id == "mine/tiny-F16" and removed.revision == revision + 3

        await catalog.refresh()  # nothing changed: no event, no new revision
        assert catalog.revision == revision + 3
        catalog.unsubscribe(subscription)
        assert await subscription.next() is None


async def test_models_folder_that_does_not_exist_yet(
    tmp_path: Path, demo_model: Path, place: Callable[..., Path]
) -> None:
    models = tmp_path / "later"
    async with catalog_of(models, watch=True, rescan_seconds=60) as catalog:
        assert catalog.ready and catalog.models() == []
        place(models, demo_model, DEMO_REL)
        await wait_until(lambda: DEMO_ID in by_id(catalog), 15, "the folder to be noticed")


async def test_lookup_by_id_alias_and_path(
    tmp_path: Path, demo_model: Path, place: Callable[..., Path]
) -> None:
    models = tmp_path / "models"
    place(models, demo_model, DEMO_REL)
    async with catalog_of(models) as catalog:
        for name in (
            DEMO_ID,
            "smollm2-135m-instruct-q4_1",
            DEMO_ID.lower(),
            DEMO_REL,
            str(models / DEMO_REL),
        ):
            found = catalog.lookup(name)
            assert found is not None and found.id == DEMO_ID, name
        assert catalog.lookup("nope") is None
        assert catalog.suggestions("smollm2-135m-instruct-q4") == ["smollm2-135m-instruct-q4_1"]

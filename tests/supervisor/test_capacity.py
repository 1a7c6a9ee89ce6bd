"""Memory estimates, the derived budget and the least-recently-used choice of what to stop."""

from __future__ import annotations

from pathlib import Path

import pytest
from lmcluster.registry.v1 import registry_pb2

from services.supervisor.capacity import (
    GIB,
    MIB,
    DoesNotFit,
    Resident,
    default_budget,
    estimate_memory,
    kv_cache_bytes,
    mem_total_bytes,
    plan_room,
)

# SmolLM2-135M's attention shape, as the Registry reads it from the GGUF.
SMOLLM2 = registry_pb2.Model(
    block_count=30, embedding_length=576, head_count=9, head_count_kv=3, context_length=8192, size_bytes=98_362_432
)


def test_kv_cache_matches_what_llama_cpp_allocates() -> None:
    # llama-server on the demo model, 2 slots × 1024 cells, q8_0/q4_0, reports
    # "K (q8_0): 11.95 MiB, V (q4_0): 6.33 MiB".
    k_only = kv_cache_bytes(SMOLLM2, 2048, "q8_0", "q8_0") / 2
    v_only = kv_cache_bytes(SMOLLM2, 2048, "q4_0", "q4_0") / 2
    assert round(k_only / MIB, 2) == 11.95
    assert round(v_only / MIB, 2) == 6.33
    assert kv_cache_bytes(SMOLLM2, 2048, "q8_0", "q4_0") == pytest.approx(k_only + v_only, abs=1)


def test_explicit_key_and_value_lengths_win_over_the_derived_head_size() -> None:
    wide = registry_pb2.Model(block_count=2, embedding_length=64, head_count=4, head_count_kv=2, key_length=32)
    # K: 2 layers × 2 heads × 32 × 2 bytes; V: 2 × 2 × 16 × 2 bytes; per cell.
    assert kv_cache_bytes(wide, 10, "f16", "f16") == 10 * (2 * 2 * 32 * 2 + 2 * 2 * 16 * 2)


def test_estimate_adds_files_kv_prompt_cache_and_overhead() -> None:
    with_projector = registry_pb2.Model()
    with_projector.CopyFrom(SMOLLM2)
    with_projector.projectors.add(path="/p.gguf", size_bytes=1000)
    estimate = estimate_memory(
        with_projector, ctx_total=2048, cache_type_k="q8_0", cache_type_v="q4_0",
        prompt_cache_bytes=256 * MIB, overhead_bytes=64 * MIB,
    )  # fmt: skip
    assert estimate.file_bytes == 98_362_432 + 1000
    assert estimate.total == estimate.file_bytes + estimate.kv_cache_bytes + 320 * MIB
    assert "KV cache" in estimate.describe()


def test_default_budget_is_a_fraction_of_memtotal_minus_a_reserve(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24576000 kB\nMemFree:        1000 kB\n")
    total = mem_total_bytes(meminfo)
    assert total == 24_576_000 * 1024
    assert default_budget(total, 0.8, 2 * GIB) == int(total * 0.8) - 2 * GIB
    assert default_budget(GIB, 0.5, 2 * GIB) == 0
    assert mem_total_bytes() > 0  # this machine's


def residents() -> list[Resident]:
    return [
        Resident("a", 4 * GIB, evictable=True, last_used=30.0),
        Resident("b", 4 * GIB, evictable=True, last_used=10.0),
        Resident("busy", 4 * GIB, evictable=False, last_used=1.0),
    ]


def test_no_eviction_when_it_fits() -> None:
    assert plan_room(2 * GIB, 16 * GIB, residents()) == []


def test_least_recently_used_idle_backend_goes_first_and_only_as_many_as_needed() -> None:
    assert plan_room(6 * GIB, 16 * GIB, residents()) == ["b"]
    assert plan_room(10 * GIB, 16 * GIB, residents()) == ["b", "a"]


def test_busy_backends_are_never_evicted() -> None:
    with pytest.raises(DoesNotFit, match="busy") as raised:
        plan_room(13 * GIB, 16 * GIB, residents())
    assert raised.value.ever


def test_a_model_larger_than_the_budget_can_never_fit_and_the_message_has_the_numbers() -> None:
    with pytest.raises(DoesNotFit) as raised:
        plan_room(20 * GIB, 16 * GIB, [], what="big-q8_0")
    assert not raised.value.ever
    assert "20.0 GiB" in str(raised.value) and "16.0 GiB" in str(raised.value) and "big-q8_0" in str(raised.value)

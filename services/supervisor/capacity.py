"""Memory accounting: what a backend will use, how much all backends may use, what to evict.

Pure functions over numbers; the Fleet feeds them the running backends.

A backend's estimate is its model file (mapped into memory whole), the projector if any, the KV
cache for its total context at its cache types, the prompt-cache limit, and a fixed runtime
overhead (compute and output buffers).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from lmcluster.registry.v1 import registry_pb2

from services.common.units import human_bytes

GIB = 1024**3
MIB = 1024**2

# Bytes per stored element of each KV cache type (block size 32 for the quantized ones).
BYTES_PER_ELEMENT: dict[str, float] = {
    "f32": 4.0,
    "f16": 2.0,
    "bf16": 2.0,
    "q8_0": 34 / 32,
    "q4_0": 18 / 32,
    "q4_1": 20 / 32,
    "iq4_nl": 18 / 32,
    "q5_0": 22 / 32,
    "q5_1": 24 / 32,
}


def kv_cache_bytes(model: registry_pb2.Model, ctx_total: int, cache_type_k: str, cache_type_v: str) -> int:
    """K and V for `ctx_total` cells over every layer and KV head."""
    head_dim = model.embedding_length // model.head_count if model.head_count else 0
    key_length = model.key_length or head_dim
    value_length = model.value_length or head_dim
    kv_heads = model.head_count_kv or model.head_count
    per_cell = model.block_count * kv_heads * (
        key_length * BYTES_PER_ELEMENT[cache_type_k] + value_length * BYTES_PER_ELEMENT[cache_type_v]
    )
    return math.ceil(per_cell * ctx_total)


@dataclass(frozen=True)
class MemoryEstimate:
    file_bytes: int
    kv_cache_bytes: int
    prompt_cache_bytes: int
    overhead_bytes: int

    @property
    def total(self) -> int:
        return self.file_bytes + self.kv_cache_bytes + self.prompt_cache_bytes + self.overhead_bytes

    def describe(self) -> str:
        return (
            f"{human_bytes(self.total)} (model files {human_bytes(self.file_bytes)} + KV cache "
            f"{human_bytes(self.kv_cache_bytes)} + prompt cache {human_bytes(self.prompt_cache_bytes)} + "
            f"runtime {human_bytes(self.overhead_bytes)})"
        )


def estimate_memory(
    model: registry_pb2.Model,
    *,
    ctx_total: int,
    cache_type_k: str,
    cache_type_v: str,
    prompt_cache_bytes: int,
    overhead_bytes: int,
) -> MemoryEstimate:
    files = model.size_bytes + sum(projector.size_bytes for projector in model.projectors[:1])
    return MemoryEstimate(
        file_bytes=files,
        kv_cache_bytes=kv_cache_bytes(model, ctx_total, cache_type_k, cache_type_v),
        prompt_cache_bytes=prompt_cache_bytes,
        overhead_bytes=overhead_bytes,
    )


def mem_total_bytes(meminfo: Path = Path("/proc/meminfo")) -> int:
    """MemTotal of the machine (or of what /proc/meminfo shows inside a container)."""
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise ValueError(f"no MemTotal in {meminfo}")


def default_budget(mem_total: int, fraction: float, reserve: int) -> int:
    """`fraction` of MemTotal minus `reserve`, never negative."""
    return max(0, int(mem_total * fraction) - reserve)


@dataclass(frozen=True)
class Resident:
    """A backend holding memory, as far as eviction is concerned."""

    backend_id: str
    estimate: int
    # Only idle READY backends of other models may be stopped to make room.
    evictable: bool
    # Monotonic time of the last use; the smallest goes first.
    last_used: float


class DoesNotFit(Exception):
    """The model cannot be started within the budget; the message carries the numbers."""

    def __init__(self, message: str, *, ever: bool) -> None:
        super().__init__(message)
        # False: it would never fit, even with nothing else running.
        self.ever = ever


def plan_room(needed: int, budget: int, residents: Iterable[Resident], *, what: str = "the model") -> list[str]:
    """Backends to stop, least recently used first, so that `needed` more bytes fit the budget."""
    residents = list(residents)
    if needed > budget:
        raise DoesNotFit(
            f"{what} needs {human_bytes(needed)} but the memory budget for all backends is "
            f"{human_bytes(budget)}; it can never fit (raise LMC_SUPERVISOR_MEMORY_BUDGET or use a "
            "smaller context, fewer slots or a smaller quantization)",
            ever=False,
        )
    used = sum(resident.estimate for resident in residents)
    free = budget - used
    evict: list[str] = []
    for resident in sorted((r for r in residents if r.evictable), key=lambda r: r.last_used):
        if free >= needed:
            break
        evict.append(resident.backend_id)
        free += resident.estimate
    if free < needed:
        raise DoesNotFit(
            f"{what} needs {human_bytes(needed)}; the budget is {human_bytes(budget)} and backends that "
            f"are busy or starting use {human_bytes(budget - free)}, so only {human_bytes(max(0, free))} "
            "can be freed now; retry when a backend is idle",
            ever=True,
        )
    return evict

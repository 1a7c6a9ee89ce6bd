"""llama-server's command line, computed from the Registry's metadata and the settings.

Pure: the same model, settings and port always give the same argv. Each flag and why it is there
is described in docs/supervisor.md; `LaunchPlan.reasons` carries the same explanations, so the
Supervisor can log why a backend was started the way it was.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from lmcluster.registry.v1 import registry_pb2

from services.supervisor.settings import UNQUANTIZED_CACHE_TYPES, SupervisorSettings

# llama.cpp pads each sequence's context to a multiple of 256 cells; staying on that grid keeps the
# per-slot context we report equal to what llama-server allocates.
CONTEXT_GRANULE = 256


@dataclass(frozen=True)
class LaunchPlan:
    """One backend's command line and the numbers it was derived from."""

    argv: list[str]
    context_per_slot: int
    parallel: int
    cache_type_k: str
    cache_type_v: str
    flash_attn: str
    reasons: list[tuple[str, str]] = field(default_factory=list)

    @property
    def ctx_size(self) -> int:
        return self.context_per_slot * self.parallel


def slot_context(model: registry_pb2.Model, settings: SupervisorSettings) -> int:
    """Context per slot: the configured one, never above what the model was trained with."""
    wanted = settings.context_per_slot
    trained = model.context_length
    per_slot = min(wanted, trained) if trained > 0 else wanted
    if per_slot >= CONTEXT_GRANULE:
        per_slot -= per_slot % CONTEXT_GRANULE
    return per_slot


def thread_count(settings: SupervisorSettings, cpu_count: int | None = None) -> int:
    if settings.threads > 0:
        return settings.threads
    return max(1, cpu_count if cpu_count is not None else (os.cpu_count() or 1))


def flash_attention(settings: SupervisorSettings) -> str:
    """A quantized V cache only works with flash attention, so it is turned on for it."""
    if settings.cache_type_v not in UNQUANTIZED_CACHE_TYPES:
        return "on"
    return settings.flash_attn


def extra_arguments(model: registry_pb2.Model, settings: SupervisorSettings) -> list[str]:
    """`extra_args` for every backend, then `model_args` for this model (by id, then alias)."""
    per_model = settings.model_args.get(model.id) or settings.model_args.get(model.alias) or []
    return [*settings.extra_args, *per_model]


def build_command(
    binary: Path | str,
    model: registry_pb2.Model,
    settings: SupervisorSettings,
    port: int,
    *,
    cpu_count: int | None = None,
) -> LaunchPlan:
    """The argv that starts llama-server for `model` on `port`."""
    per_slot = slot_context(model, settings)
    parallel = settings.parallel
    fa = flash_attention(settings)
    reasons: list[tuple[str, str]] = []

    def add(flags: list[str], why: str) -> None:
        argv.extend(flags)
        reasons.append((" ".join(flags), why))

    argv: list[str] = [str(binary)]
    add(["--model", model.path], "the Registry's path of the model's first file")
    add(["--alias", model.alias or model.id], "clients and /props see the Registry's alias")
    add(["--host", settings.backend_host], "backends are reached only through the Router")
    add(["--port", str(port)], "a free port from the configured pool")
    trained = f"trained context {model.context_length}" if model.context_length else "trained context unknown"
    add(
        ["--ctx-size", str(per_slot * parallel)],
        f"{per_slot} tokens per slot × {parallel} slots ({trained}, configured {settings.context_per_slot})",
    )
    add(["--parallel", str(parallel)], "continuous batching over this many slots")
    add(["--no-kv-unified"], "each slot owns exactly ctx-size/parallel cells, never more")
    add(["--threads", str(thread_count(settings, cpu_count))], "CPU threads for generation")
    add(["--cache-type-k", settings.cache_type_k], "KV cache type for keys")
    add(["--cache-type-v", settings.cache_type_v], "KV cache type for values")
    add(
        ["--flash-attn", fa],
        "required by the quantized V cache" if fa == "on" and settings.flash_attn != "on" else "as configured",
    )
    if settings.gpu_layers:
        add(["--n-gpu-layers", settings.gpu_layers], "layers offloaded to the GPU, as configured")
    if not settings.mmap:
        add(
            ["--load-mode", "none"],
            "no mmap: the weights are read into memory, so a model file rewritten in place cannot change under a running backend",
        )
    add(["--cache-ram", str(settings.prompt_cache_mib)], "bounded host-memory prompt cache (MiB)")
    add(["--metrics"], "Prometheus /metrics: busy slots and use, scraped too")
    add(["--slots"], "/slots: per-slot context and which slots are processing (draining)")
    add(["--no-webui"], "a data plane serves no web UI")
    if model.kind == registry_pb2.MODEL_KIND_EMBEDDING:
        add(["--embeddings"], "an embedding model serves /v1/embeddings")
    if model.projectors:
        add(["--mmproj", model.projectors[0].path], "the multimodal projector found beside the model")
    extra = extra_arguments(model, settings)
    if extra:
        add(extra, "extra arguments from the settings")
    return LaunchPlan(
        argv=argv,
        context_per_slot=per_slot,
        parallel=parallel,
        cache_type_k=settings.cache_type_k,
        cache_type_v=settings.cache_type_v,
        flash_attn=fa,
        reasons=reasons,
    )

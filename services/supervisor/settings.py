"""Supervisor settings, read once from `LMC_SUPERVISOR_*` variables.

List and mapping values (`EXTRA_ARGS`, `MODEL_ARGS`, `REPLICAS`) are JSON, e.g.
`LMC_SUPERVISOR_REPLICAS='{"smollm2-135m-instruct-q4_1": 2}'`. Sizes accept units
(`LMC_SUPERVISOR_MEMORY_BUDGET=12GiB`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, ByteSize, Field, model_validator
from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings

# KV cache element types llama-server accepts for `--cache-type-k/-v`.
CacheType = Literal["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1"]
FlashAttention = Literal["auto", "on", "off"]
# "idle": SCHED_IDLE, CPU only when no one else wants it; "normal": the kernel's fair scheduler at `nice`.
SchedPolicy = Literal["normal", "idle"]

UNQUANTIZED_CACHE_TYPES = frozenset({"f32", "f16", "bf16"})


class SupervisorSettings(ServiceSettings):
    model_config = SettingsConfigDict(
        env_prefix="LMC_SUPERVISOR_", frozen=True, extra="ignore", validate_by_name=True, validate_by_alias=True
    )

    port: int = Field(50054, ge=0, le=65535)
    metrics_port: int = Field(9154, ge=0, le=65535)

    # --- where things are --------------------------------------------------------------------
    registry_address: str = Field(
        "127.0.0.1:50055",
        validation_alias=AliasChoices("LMC_SUPERVISOR_REGISTRY_ADDRESS", "LMC_REGISTRY_ADDRESS"),
        description="The Registry's gRPC address.",
    )
    registry_wait_seconds: float = Field(
        10.0, ge=0, description="Right after start, how long EnsureBackend waits for the Registry's first snapshot."
    )
    llama_server: Path | None = Field(
        None, description="llama-server binary; the one set-up built (services.common.binaries) when unset."
    )
    preload: str = Field(
        "", description="Models to start at boot: comma-separated ids or aliases, or 'all' (every READY model)."
    )

    # --- backends' network --------------------------------------------------------------------
    backend_host: str = Field("127.0.0.1", description="Interface llama-server listens on (`--host`).")
    advertise_host: str = Field(
        "",
        description=(
            "Address or name other hosts reach the backends at (endpoints, metrics URLs, scrape targets); empty: "
            "the backend host, or this machine's name resolved to an address when that is a wildcard (0.0.0.0, ::)."
        ),
    )
    port_range_start: int = Field(8100, ge=1, le=65535, description="First port of the backend pool.")
    port_range_end: int = Field(8199, ge=1, le=65535, description="Last port of the backend pool (inclusive).")

    # --- flags derived for every backend (see docs/supervisor.md) -------------------------------
    context_per_slot: int = Field(
        4096, ge=256, description="Context tokens per slot; capped at the model's trained context."
    )
    parallel: int = Field(4, ge=1, le=256, description="Slots per backend (`--parallel`, continuous batching).")
    threads: int = Field(0, ge=0, description="`--threads`; 0 means every core of the machine.")
    nice: int = Field(
        10,
        ge=0,
        le=19,
        description=(
            "Niceness of every llama-server (`nice -n`) under sched_policy 'normal': on a host the gateway "
            "shares, its short request work runs before generation compute; 0 gives both the same weight."
        ),
    )
    sched_policy: SchedPolicy = Field(
        "idle",
        description=(
            "CPU scheduling of every llama-server: 'idle' (SCHED_IDLE: a waking gateway process always preempts "
            "it; it gets every cycle nobody else wants) or 'normal' (the fair scheduler at `nice`); docs/supervisor.md."
        ),
    )
    cache_type_k: CacheType = Field("q8_0", description="KV cache type for keys (`--cache-type-k`).")
    cache_type_v: CacheType = Field("q4_0", description="KV cache type for values (`--cache-type-v`).")
    flash_attn: FlashAttention = Field(
        "auto", description="`--flash-attn`; forced 'on' when the V cache is quantized (llama.cpp requires it)."
    )
    gpu_layers: str = Field(
        "", description="`--n-gpu-layers` (a number, 'auto' or 'all'); not passed when empty (CPU)."
    )
    mmap: bool = Field(
        False,
        description=(
            "Map the model file instead of reading it into memory (`--load-mode none` when off). Off by default: a file "
            "rewritten in place would change (or truncate) the pages a running backend has mapped."
        ),
    )
    prompt_cache_mib: int = Field(
        256, ge=0, description="Host-memory prompt cache per backend (`--cache-ram`, MiB); 0 turns it off."
    )
    extra_args: list[str] = Field(
        default_factory=list, description="Appended to every backend's command line (JSON list)."
    )
    model_args: dict[str, list[str]] = Field(
        default_factory=dict, description="Extra arguments per model id or alias (JSON object of lists)."
    )
    replicas: dict[str, int] = Field(
        default_factory=dict, description="Backends per model id or alias (JSON object); others get 1."
    )

    # --- staying up ------------------------------------------------------------------------------
    ready_timeout_seconds: float = Field(180.0, gt=0, description="Longest a model may take to load.")
    health_timeout_seconds: float = Field(5.0, gt=0, description="Timeout of one /health request.")
    liveness_interval_seconds: float = Field(5.0, gt=0, description="Time between liveness checks.")
    liveness_failures: int = Field(3, ge=1, description="Failed checks in a row before a restart.")
    restart_backoff_initial_seconds: float = Field(1.0, ge=0, description="First restart delay.")
    restart_backoff_max_seconds: float = Field(60.0, ge=0, description="Largest restart delay.")
    max_restarts: int = Field(
        5, ge=0, description="Failures in a row (crash or failed start) before the backend is FAILED."
    )
    stable_seconds: float = Field(
        120.0, ge=0, description="READY this long resets the failure count (a crash loop needs quick crashes)."
    )
    failed_retry_seconds: float = Field(
        300.0, ge=0, description="An EnsureBackend this long after a FAILED backend tries again."
    )

    # --- stopping --------------------------------------------------------------------------------
    # A full-length answer on a CPU (thousands of tokens at a few tokens per second) takes minutes;
    # a drain that gives up first cuts it. Ctrl-C of the whole stack is still bounded by the launcher.
    drain_timeout_seconds: float = Field(
        1800.0, ge=0, description="Longest wait for in-flight generations of a replaced or stopped backend."
    )
    shutdown_drain_seconds: float = Field(
        5.0, ge=0, description="When the Supervisor itself stops, how long its backends may drain before being cut."
    )
    drain_settle_seconds: float = Field(
        1.0, ge=0, description="Wait after DRAINING is announced before checking for idle (routers catch up)."
    )
    stop_grace_seconds: float = Field(10.0, ge=0, description="SIGTERM to SIGKILL.")
    stopped_retention_seconds: float = Field(
        600.0, ge=0, description="How long a STOPPED backend stays listed before it is removed."
    )

    # --- capacity --------------------------------------------------------------------------------
    memory_budget: ByteSize | None = Field(
        None, description="Memory for all backends together; derived from MemTotal when unset."
    )
    memory_fraction: float = Field(0.8, gt=0, le=1, description="Share of MemTotal for the derived budget.")
    memory_reserve: ByteSize = Field(
        ByteSize(2 * 1024**3), description="Subtracted from the derived budget for the OS and other services."
    )
    runtime_overhead: ByteSize = Field(
        ByteSize(64 * 1024**2), description="Per-backend compute and output buffers, added to each estimate."
    )
    idle_ttl_seconds: float = Field(
        1800.0, ge=0, description="Unload a backend idle this long; 0 keeps backends forever. Preloaded ones stay."
    )

    log_dir: Path | None = Field(
        None, description="Each backend's llama-server output is appended to <log_dir>/<backend id>.log."
    )

    # --- publishing --------------------------------------------------------------------------------
    scrape_targets_file: Path | None = Field(
        None, description="Prometheus file_sd JSON of every backend's /metrics, rewritten on change."
    )

    @model_validator(mode="after")
    def _check(self) -> SupervisorSettings:
        if self.port_range_end < self.port_range_start:
            raise ValueError("port_range_end must not be below port_range_start")
        if self.cache_type_v not in UNQUANTIZED_CACHE_TYPES and self.flash_attn == "off":
            raise ValueError(
                f"cache_type_v={self.cache_type_v} needs flash attention, but flash_attn=off: "
                "set LMC_SUPERVISOR_FLASH_ATTN=auto/on or LMC_SUPERVISOR_CACHE_TYPE_V=f16"
            )
        return self

    @property
    def preload_all(self) -> bool:
        return self.preload.strip().lower() == "all"

    @property
    def preload_models(self) -> list[str]:
        """The preload list (empty for 'all', which is decided against the Registry's models)."""
        if self.preload_all:
            return []
        return [name.strip() for name in self.preload.split(",") if name.strip()]

"""The Registry's settings: `LMC_REGISTRY_*`, plus the shared `LMC_MODELS_DIR`."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings, default_models_dir
from services.registry.gguf_validation import KNOWN_ARCHITECTURES, ValidationLimits

_LIMITS = ValidationLimits()


class RegistrySettings(ServiceSettings):
    """Where the Registry listens, which folder it watches, and how it judges files."""

    model_config = SettingsConfigDict(
        env_prefix="LMC_REGISTRY_", frozen=True, extra="ignore", validate_by_name=True, validate_by_alias=True
    )

    port: int = Field(50055, ge=0, le=65535)
    metrics_port: int = Field(9155, ge=0, le=65535)
    models_dir: Path = Field(
        default_factory=default_models_dir,
        validation_alias="LMC_MODELS_DIR",
        description="The models folder (LM Studio layout `<publisher>/<repo>/<file>.gguf`).",
    )
    settle_seconds: float = Field(
        1.0, ge=0, description="A file must keep its size and mtime this long before it is validated."
    )
    rescan_seconds: float = Field(
        60.0, gt=0, description="Full rescan interval, the safety net for changes the watcher cannot see."
    )
    watch: bool = Field(True, description="Watch the folder for changes (off: periodic rescans only).")
    watch_force_polling: bool = Field(
        False, description="Poll instead of inotify (network file systems that send no events)."
    )
    watch_debounce_ms: int = Field(300, ge=10, le=10_000, description="Longest wait to batch file events.")
    max_depth: int = Field(8, ge=0, le=64, description="Folder levels walked below the models folder.")
    scan_workers: int = Field(4, ge=1, le=64, description="Threads that validate files in parallel.")
    watch_queue_size: int = Field(
        1024, ge=1, description="Events buffered per WatchModels stream before it is resynchronised."
    )
    hash_concurrency: int = Field(2, ge=1, le=16, description="Full SHA-256 computations at once.")
    max_header_bytes: int = Field(_LIMITS.max_header_bytes, ge=1024)
    max_metadata_count: int = Field(_LIMITS.max_metadata_count, ge=1)
    max_tensor_count: int = Field(_LIMITS.max_tensor_count, ge=1)
    max_array_length: int = Field(_LIMITS.max_array_length, ge=1)
    max_string_bytes: int = Field(_LIMITS.max_string_bytes, ge=1)
    extra_architectures: str = Field(
        "", description="Comma-separated architecture names to accept beyond those the gguf package knows."
    )

    @property
    def limits(self) -> ValidationLimits:
        return ValidationLimits(
            max_header_bytes=self.max_header_bytes,
            max_metadata_count=self.max_metadata_count,
            max_tensor_count=self.max_tensor_count,
            max_array_length=self.max_array_length,
            max_string_bytes=self.max_string_bytes,
        )

    @property
    def architectures(self) -> frozenset[str]:
        extra = {name.strip() for name in self.extra_architectures.split(",") if name.strip()}
        return KNOWN_ARCHITECTURES | extra

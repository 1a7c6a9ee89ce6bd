"""Embedding settings: which model, which inference backend, micro-batching and request limits."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.binaries import parts_settings
from services.common.settings import ServiceSettings

# "onnx": ONNX Runtime, float32, same vectors as torch (cosine ≥ 0.999), two to three times faster per query.
# "onnx-int8": ONNX Runtime with int8 weights, faster still but vectors drift (cosine about 0.97-0.99).
# "torch": plain eager PyTorch, no export needed.
Backend = Literal["onnx", "onnx-int8", "torch"]
# The background lane (vectors of answers being stored, EMBED_PRIORITY_BACKGROUND):
# "idle": a second copy of the model in a thread under SCHED_IDLE, which runs only on CPU that
#   nothing else wants (llama-server's generations keep theirs; run it beside a llama-server
#   under SCHED_IDLE too, the Supervisor's default, and the two share what is left over);
# "normal": the same thread at normal priority (lookups still never queue behind stores);
# "shared": no second copy (saves its memory, about 100 MB): background texts join the one queue.
BackgroundLane = Literal["idle", "normal", "shared"]


def _default_onnx_cache_dir() -> Path:
    return parts_settings().cache_dir / "onnx"


class EmbeddingSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="LMC_EMBEDDING_", frozen=True, extra="ignore")

    port: int = Field(50052, ge=0, le=65535)
    metrics_port: int = Field(9152, ge=0, le=65535)

    model_path: Path | None = Field(
        None, description="A sentence-transformers folder; unset: the installed all-MiniLM-L6-v2."
    )
    model_name: str = Field(
        "", description="Name reported in responses; empty: all-MiniLM-L6-v2, or the folder's name."
    )
    backend: Backend = Field(
        "onnx-int8",
        description=(
            "'onnx-int8' (default: weights quantized to int8, a short query in under half the time), 'onnx' "
            "(float32, the same vectors as torch) or 'torch'."
        ),
    )
    onnx_cache_dir: Path = Field(
        default_factory=_default_onnx_cache_dir,
        description="Where ONNX exports are kept, one folder per model and content hash.",
    )
    threads: int = Field(1, ge=1, le=256, description="Intra-op threads of torch and ONNX Runtime.")

    batch_window_ms: float = Field(
        2.0,
        ge=0,
        le=1000,
        description="Longest wait of a queued text for company while callers overlap; lone ones never wait.",
    )
    max_batch_size: int = Field(32, ge=1, le=1024, description="Most texts the model runs at once.")
    background_lane: BackgroundLane = Field(
        "idle", description="'idle' (default), 'normal' or 'shared': where background texts are embedded."
    )

    max_batch: int = Field(256, ge=1, description="Most texts one Embed request may carry.")
    max_text_chars: int = Field(
        32_768,
        ge=1,
        description="Longest text (characters) accepted; longer token runs are truncated anyway.",
    )
    warmup: bool = Field(True, description="Run a few batches before reporting SERVING.")

"""The Router's own copy of the embedding model, for the one vector a lookup waits for.

A semantic hit waits for its prompt's vector. Asked of the Embedding service, that vector costs a
gRPC call and the wake-ups of another process's event loop and model thread, on cores that
llama-server keeps busy: beside generating misses, half of a semantic hit's time. So the Router
runs the Embedding service's own ONNX export (the same file, through ONNX Runtime and the model's
own tokenizer, with no sentence-transformers or torch: about 85 MB resident) on one thread of its own.

It is used only once it has proven to give the service's vectors: at start the Router embeds a few
texts (short, long past the model's window, accented, mixed case) both ways and compares them; any
difference (another backend or model configured for the service, an export not there) leaves
lookups with the Embedding service, as before, and says why. Stores (the background lane that yields
the CPU) and `/v1/embeddings` always go to the Embedding service. `LMC_ROUTER_LOOKUP_EMBEDDING=service`
turns the Router's copy off.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from services.embedding.encoder import (
    ONNX_FILE,
    export_dir,
    int8_config_name,
    int8_file_name,
    mean_pooled,
    resolve_model,
    session_options,
)
from services.embedding.settings import EmbeddingSettings
from services.router import metrics

log = logging.getLogger(__name__)

# The texts both copies embed before the Router's is trusted.
CHECK_TEXTS = (
    "How long do updates last with the Solo licence?",
    "  In Excel, how do I FREEZE the top row?  ",
    "Café déjà vu: naïve façade, Ærøskøbing, Straße, 東京, emoji 🙂",
    " ".join(f"word{i} of a long document that runs past the model's window" for i in range(120)),
)
SAME_VECTOR = 0.9999  # cosine; the same weights and runtime differ by float rounding only

ServiceEmbed = Callable[[Sequence[str]], Awaitable[list[list[float]]]]


class OnnxQueryEncoder:
    """Tokenizer, ONNX Runtime session, mean pooling and normalization: what the Embedding service's
    direct ONNX path computes for one text."""

    def __init__(self, tokenizer: Any, session: Any) -> None:
        self._tokenizer = tokenizer
        self._session = session
        self._inputs = [node.name for node in session.get_inputs()]

    @classmethod
    def load(cls, settings: EmbeddingSettings) -> OnnxQueryEncoder:
        """The export the Embedding service runs; FileNotFoundError or ValueError says why not."""
        import onnxruntime as ort
        from tokenizers import Tokenizer

        if settings.backend == "torch":
            raise ValueError("the Embedding service runs torch, which the Router does not load")
        folder = export_dir(resolve_model(settings), settings.onnx_cache_dir)
        model = folder / (int8_file_name(int8_config_name()) if settings.backend == "onnx-int8" else ONNX_FILE)
        if not model.is_file():
            raise FileNotFoundError(f"no ONNX export at {model} (the Embedding service writes it at start-up)")
        _check_mean_pooled(folder)
        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        window = json.loads((folder / "tokenizer_config.json").read_text()).get("model_max_length", 512)
        tokenizer.no_padding()
        tokenizer.enable_truncation(max_length=int(min(window, 512)))
        session = ort.InferenceSession(str(model), sess_options=session_options(1), providers=["CPUExecutionProvider"])
        return cls(tokenizer, session)

    def encode(self, text: str) -> list[float]:
        encoding = self._tokenizer.encode(text.strip())
        features = {
            "input_ids": encoding.ids,
            "attention_mask": encoding.attention_mask,
            "token_type_ids": encoding.type_ids,
        }
        feed = {name: np.asarray([features[name]], dtype=np.int64) for name in self._inputs}
        hidden = self._session.run(None, feed)[0]
        return mean_pooled(hidden, [encoding.attention_mask])[0].tolist()


def _check_mean_pooled(folder: Path) -> None:
    """Only a transformer, mean pooling and normalization, as the service's direct path requires."""
    kinds = [module["type"].rsplit(".", 1)[-1] for module in json.loads((folder / "modules.json").read_text())]
    pooling = json.loads((folder / "1_Pooling" / "config.json").read_text()) if (folder / "1_Pooling").is_dir() else {}
    mean = pooling.get("pooling_mode") == "mean" or pooling.get("pooling_mode_mean_tokens") is True
    if kinds != ["Transformer", "Pooling", "Normalize"] or not mean:
        raise ValueError(f"the model is {kinds} with pooling {pooling}, not a mean-pooled, normalized transformer")


def _cosine(a: Sequence[float], b: Sequence[float]) -> float:
    left, right = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if left.shape != right.shape:
        return -1.0
    return float(left @ right / max(np.linalg.norm(left) * np.linalg.norm(right), 1e-12))


class LookupEmbedder:
    """Embeds a lookup's prompt in the Router once its copy matches the Embedding service."""

    def __init__(self, settings: EmbeddingSettings | None = None) -> None:
        self._settings = settings or EmbeddingSettings()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lookup-embedding")
        self._encoder: OnnxQueryEncoder | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def ready(self) -> bool:
        return self._encoder is not None

    def start(self, service_embed: ServiceEmbed) -> None:
        self._task = asyncio.create_task(self._prepare(service_embed), name="lookup-embedding")

    async def _prepare(self, service_embed: ServiceEmbed) -> None:
        loop = asyncio.get_running_loop()
        try:
            encoder = await loop.run_in_executor(self._executor, OnnxQueryEncoder.load, self._settings)
            mine = [await loop.run_in_executor(self._executor, encoder.encode, text) for text in CHECK_TEXTS]
        except Exception as error:  # a missing or unreadable export, an unknown model: the service embeds
            log.warning("lookups are embedded by the Embedding service: the Router's copy did not load (%s)", error)
            return
        delay = 0.5
        while True:  # the Embedding service may still be starting
            theirs = await service_embed(CHECK_TEXTS)
            if theirs:
                break
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)
        worst = min(_cosine(a, b) for a, b in zip(mine, theirs, strict=True)) if len(theirs) == len(mine) else -1.0
        if worst < SAME_VECTOR:
            log.warning(
                "lookups are embedded by the Embedding service: the Router's copy differs from it (cosine %.4f)", worst
            )
            return
        self._encoder = encoder
        metrics.LOOKUP_EMBEDDING_IN_ROUTER.set(1)
        log.info("lookups are embedded in the Router (its copy matches the Embedding service, cosine %.6f)", worst)

    async def embed(self, text: str) -> list[float]:
        encoder = self._encoder
        assert encoder is not None, "embed() before ready"
        return await asyncio.get_running_loop().run_in_executor(self._executor, encoder.encode, text)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        self._executor.shutdown(wait=False, cancel_futures=True)


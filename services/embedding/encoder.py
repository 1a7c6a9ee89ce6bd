"""The embedding model: loading it offline, its ONNX export cache, and encoding with truncation info.

Three backends run the same sentence-transformers model:

- "torch": eager PyTorch on the model folder itself.
- "onnx": ONNX Runtime on a float32 export. Same vectors as torch (cosine ≥ 0.999), and two to
  three times faster per short query on one thread.
- "onnx-int8" (the default): ONNX Runtime on a dynamically quantized int8 export. A short query in
  under half the float32 time, and far less slowed by caches that other work has emptied; its
  vectors drift from torch's (cosine about 0.97-0.99). The cache's verification decides what may
  hit, the vectors only narrow it, and every move verification accepts in tests/data/cache_moves.jsonl
  stays above the threshold (0.972 at the lowest, against 0.981 for float32).

On the ONNX backends a model of the usual shape (a transformer, mean pooling, normalization, as
all-MiniLM-L6-v2) runs straight on its ONNX Runtime session (`MeanPooledOnnx`): the library's
vectors, without its per-call input handling.

An export is a complete sentence-transformers folder (tokenizer, pooling, `onnx/*.onnx`) under the
cache folder, named `<model>-<hash>`; the hash covers the source model's files and the versions of
the exporting libraries, so a changed model or library gets a fresh export instead of a stale one.
Exports are written into a temporary folder and renamed into place, so a process that dies half-way
leaves nothing a later one would load. Set-up runs `python -m services.embedding.export` so that the
service itself never waits for one; when it is missing anyway, the service exports and says so.

Nothing here is thread-safe: one thread (a lane's worker) loads its own copy and calls `encode`.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from services.common.binaries import embedding_model_path
from services.embedding.settings import Backend, EmbeddingSettings

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"
ONNX_FILE = "onnx/model.onnx"
# Subfolders of a model folder that hold other backends' files, not the model's own weights.
_EXPORT_SUBFOLDERS = {"onnx", "openvino"}
# Library versions that shape an export; a change gives a new export folder.
_EXPORT_LIBRARIES = (
    "sentence-transformers",
    "transformers",
    "optimum-onnx",
    "optimum",
    "torch",
    "onnxruntime",
)


class ModelLoadError(RuntimeError):
    """The configured model folder cannot be loaded."""


@dataclass(frozen=True)
class EmbeddedText:
    """The vector of one text, with how much of the text the model read."""

    vector: np.ndarray  # float32, shape (dimensions,), L2-normalized
    token_count: int
    truncated: bool


@dataclass(frozen=True)
class ModelSource:
    """A sentence-transformers folder and the name responses report for it."""

    path: Path
    name: str


def resolve_model(settings: EmbeddingSettings) -> ModelSource:
    """The folder and name the settings ask for: the installed all-MiniLM-L6-v2 unless set."""
    if settings.model_path is None:
        return ModelSource(embedding_model_path(), settings.model_name or DEFAULT_MODEL_NAME)
    path = settings.model_path.expanduser().resolve()
    if not (path / "modules.json").is_file() and not (path / "config.json").is_file():
        raise ModelLoadError(
            f"LMC_EMBEDDING_MODEL_PATH={settings.model_path} is not a sentence-transformers folder "
            "(no modules.json or config.json in it)"
        )
    return ModelSource(path, settings.model_name or path.name)


def use_offline_hub() -> None:
    """Nothing may be fetched from a model hub: every model is a local folder."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _library_versions() -> str:
    versions = []
    for name in _EXPORT_LIBRARIES:
        try:
            versions.append(f"{name}={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{name}=-")
    return ",".join(versions)


def _source_files(source: Path) -> list[Path]:
    files = []
    for path in sorted(source.rglob("*")):
        relative = path.relative_to(source)
        if (
            path.is_file()
            and relative.parts[0] not in _EXPORT_SUBFOLDERS
            and not relative.name.startswith(".")
        ):
            files.append(path)
    return files


def export_key(source: Path) -> str:
    """A short hash of the model's files and the exporting libraries' versions."""
    digest = hashlib.sha256(_library_versions().encode())
    for path in _source_files(source):
        digest.update(str(path.relative_to(source)).encode() + b"\0")
        with path.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name).strip("-.") or "model"


def export_dir(source: ModelSource, cache_dir: Path) -> Path:
    """Where the ONNX export of this model lives: `<cache_dir>/<model>-<hash>`."""
    return cache_dir.expanduser() / f"{_slug(source.name)}-{export_key(source.path)}"


def int8_config_name() -> str:
    """The dynamic-quantization preset for this CPU: VNNI int8 where the CPU has it, else AVX2's."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        flags = ""
    if "avx512_vnni" in flags:
        return "avx512_vnni"
    if "avx512" in flags:
        return "avx512"
    return "avx2"


def int8_file_name(config_name: str) -> str:
    """The file sentence-transformers writes for a preset (avx2 quantizes to uint8, the others int8)."""
    dtype = "quint8" if config_name == "avx2" else "qint8"
    return f"onnx/model_{dtype}_{config_name}.onnx"


def session_options(threads: int) -> Any:
    """ONNX Runtime options of every copy of the model (the service's lanes, the Router's)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Idle threads sleep instead of spinning: the cores are shared with llama-server.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def _load_onnx(folder: Path, file_name: str, threads: int) -> SentenceTransformer:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(
        str(folder),
        device="cpu",
        backend="onnx",
        model_kwargs={
            "file_name": file_name,
            "provider": "CPUExecutionProvider",
            "session_options": session_options(threads),
        },
    )


def export_onnx(source: ModelSource, cache_dir: Path, *, int8: bool = True) -> Path:
    """Makes sure the float32 (and, with `int8`, the quantized) ONNX export exists; returns its folder.

    Idempotent and safe against concurrent exporters: each writes into its own temporary folder and
    the first rename wins.
    """
    use_offline_hub()
    target = export_dir(source, cache_dir)
    if not (target / ONNX_FILE).is_file():
        _export_float32(source, target)
    if int8:
        _export_int8(target, int8_config_name())
    return target


def _export_float32(source: ModelSource, target: Path) -> None:
    from sentence_transformers import SentenceTransformer

    started = time.perf_counter()
    log.info("exporting %s to ONNX in %s (once per model and library version)", source.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    staging.chmod(0o755)  # mkdtemp's 0700 would stay with the folder after the rename
    try:
        # Loading a folder without onnx/ with backend="onnx" exports it in memory; its advice to
        # save the export and the tracer's warnings are moot here, the export is saved next.
        export_logger = logging.getLogger("sentence_transformers.backend.utils")
        advice = _ExportAdvice()
        export_logger.addFilter(advice)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = SentenceTransformer(str(source.path), device="cpu", backend="onnx")
        finally:
            export_logger.removeFilter(advice)
        model.save_pretrained(str(staging))
        if not (staging / ONNX_FILE).is_file():
            raise ModelLoadError(f"exporting {source.path} to ONNX wrote no {ONNX_FILE}")
        try:
            staging.rename(target)
        except OSError:
            if not (target / ONNX_FILE).is_file():
                raise
            log.info("another process finished the same export first; using it")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("ONNX export of %s done in %.1f s", source.name, time.perf_counter() - started)


class _ExportAdvice(logging.Filter):
    """sentence-transformers' "Saving the exported ONNX model is heavily recommended" (we do)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Saving the exported")


class _QuantizerChatter(logging.Filter):
    """ONNX Runtime's quantizer logs one INFO line per tensor on the root logger; drop those."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno <= logging.INFO and str(record.msg).startswith("Quantization parameters"))


def _export_int8(target: Path, config_name: str) -> None:
    file_name = int8_file_name(config_name)
    if (target / file_name).is_file():
        return
    from sentence_transformers.backend import export_dynamic_quantized_onnx_model

    started = time.perf_counter()
    log.info("quantizing %s to int8 (%s)", target, config_name)
    model = _load_onnx(target, ONNX_FILE, threads=1)
    staging = Path(tempfile.mkdtemp(prefix=".int8-", dir=target))
    chatter = _QuantizerChatter()
    logging.getLogger().addFilter(chatter)
    try:
        export_dynamic_quantized_onnx_model(model, config_name, str(staging))
        # Renamed, not copied, into place: a reader never sees half a file.
        os.replace(staging / file_name, target / file_name)
    finally:
        logging.getLogger().removeFilter(chatter)
        shutil.rmtree(staging, ignore_errors=True)
    log.info("int8 quantization done in %.1f s", time.perf_counter() - started)


def prepare_texts(texts: Sequence[str], *, lowercase: bool) -> list[str]:
    """What the Transformer module does to a text before tokenizing: strip (and lowercase when the
    model says so); token counts and the direct path must see the same strings."""
    prepared = [text.strip() for text in texts]
    return [text.lower() for text in prepared] if lowercase else prepared


class MeanPooledOnnx:
    """sentence-transformers' Transformer, mean Pooling and Normalize modules run straight on the
    ONNX Runtime session: the same vectors to float rounding, without the library's per-call
    input handling (1-2 ms of a 7-9 ms short query). Only for a model made of exactly those modules;
    `of` returns None for any other, which then runs through `SentenceTransformer.encode`."""

    def __init__(self, tokenizer: Any, session: Any, *, max_length: int, lowercase: bool, batch_size: int) -> None:
        self._tokenizer = tokenizer
        self._session = session
        self._inputs = [node.name for node in session.get_inputs()]
        self._max_length = max_length
        self._lowercase = lowercase
        self._batch_size = batch_size

    @classmethod
    def of(cls, model: SentenceTransformer, *, lowercase: bool, max_length: int, batch_size: int) -> MeanPooledOnnx | None:
        import onnxruntime as ort
        from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

        modules = list(model)
        if not modules or not isinstance(modules[0], Transformer):
            return None
        pooling, *rest = modules[1:] or [None]
        if not isinstance(pooling, Pooling) or any(not isinstance(module, Normalize) for module in rest):
            return None
        config = pooling.get_config_dict()
        if config.get("pooling_mode") != "mean" or not config.get("include_prompt", True):
            return None
        auto_model = modules[0].auto_model
        session = getattr(auto_model, "session", None) or getattr(auto_model, "model", None)
        if not isinstance(session, ort.InferenceSession):
            return None
        if session.get_outputs()[0].name != "last_hidden_state" or not {node.name for node in session.get_inputs()} <= {
            "input_ids",
            "attention_mask",
            "token_type_ids",
        }:
            return None
        return cls(model.tokenizer, session, max_length=max_length, lowercase=lowercase, batch_size=batch_size)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """L2-normalized float32 vectors, in order."""
        prepared = prepare_texts(texts, lowercase=self._lowercase)
        chunks = []
        for start in range(0, len(prepared), self._batch_size):
            features = self._tokenizer(
                prepared[start : start + self._batch_size],
                padding=True,
                truncation="longest_first",
                max_length=self._max_length,
                return_tensors="np",
            )
            feed = {name: features[name].astype(np.int64, copy=False) for name in self._inputs}
            hidden = self._session.run(None, feed)[0]
            chunks.append(mean_pooled(hidden, features["attention_mask"]))
        return np.concatenate(chunks)


def mean_pooled(hidden: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """L2-normalized float32 means of a batch's token vectors over its attention mask."""
    mask = np.asarray(attention_mask, dtype=np.float32)[..., None]
    pooled = ((hidden * mask).sum(axis=1) / np.clip(mask.sum(axis=1), 1e-9, None)).astype(np.float32, copy=False)
    return pooled / np.clip(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12, None)


class Encoder:
    """A loaded sentence-transformers model that reports token counts and truncation per text."""

    def __init__(self, model: SentenceTransformer, *, name: str, backend: Backend, batch_size: int) -> None:
        self.model = model
        self.name = name
        self.backend = backend
        self.batch_size = batch_size
        self.tokenizer = model.tokenizer
        first = model[0]
        # The Transformer module strips (and maybe lowercases) before tokenizing; counts must agree.
        self._lowercase = bool(getattr(first, "do_lower_case", False))
        window = model.max_seq_length or getattr(self.tokenizer, "model_max_length", 512)
        self.max_seq_length = int(window)
        dimension_of = (
            getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        )
        dimensions = dimension_of()
        if dimensions is None:
            dimensions = int(model.encode(["dimensions"], convert_to_numpy=True).shape[1])
        self.dimensions = int(dimensions)
        self.direct = (
            MeanPooledOnnx.of(model, lowercase=self._lowercase, max_length=self.max_seq_length, batch_size=batch_size)
            if backend != "torch"
            else None
        )

    def token_lengths(self, texts: Sequence[str]) -> list[int]:
        """Tokens per text before truncation, special tokens included, as the model tokenizes."""
        prepared = prepare_texts(texts, lowercase=self._lowercase)
        encoded = self.tokenizer(
            prepared,
            add_special_tokens=True,
            truncation=False,
            return_attention_mask=False,
            return_token_type_ids=False,
            verbose=False,
        )
        return [len(ids) for ids in encoded["input_ids"]]

    def encode(self, texts: Sequence[str]) -> list[EmbeddedText]:
        """L2-normalized float32 vectors, in order; texts over the window are truncated to it."""
        lengths = self.token_lengths(texts)
        if self.direct is not None:
            vectors = self.direct.encode(texts)
        else:
            vectors = self.model.encode(
                list(texts),
                batch_size=self.batch_size,
                convert_to_numpy=True,
                normalize_embeddings=True,
                show_progress_bar=False,
            ).astype(np.float32, copy=False)
        return [
            EmbeddedText(vector, min(length, self.max_seq_length), length > self.max_seq_length)
            for vector, length in zip(vectors, lengths, strict=True)
        ]

    def warm_up(self) -> None:
        """First calls allocate and pick kernels; run them before real traffic does."""
        self.encode(["warm-up"])
        self.encode(["a short sentence for warming up"] * self.batch_size)
        self.encode(["word " * (self.max_seq_length + 8)])


def load_encoder(
    source: ModelSource,
    *,
    backend: Backend,
    cache_dir: Path,
    threads: int,
    batch_size: int = 32,
) -> Encoder:
    """Loads the model for one backend, exporting to ONNX first when the export is missing."""
    use_offline_hub()
    started = time.perf_counter()
    import torch

    # Per calling thread under OpenMP: call this from the thread that will run the model.
    torch.set_num_threads(threads)
    if backend == "torch":
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(str(source.path), device="cpu")
    else:
        int8 = backend == "onnx-int8"
        folder = export_dir(source, cache_dir)
        file_name = int8_file_name(int8_config_name()) if int8 else ONNX_FILE
        if not (folder / file_name).is_file():
            log.warning(
                "no ONNX export of %s at %s; exporting now (`python -m services.embedding.export` "
                "does it at set-up)",
                source.name,
                folder / file_name,
            )
            folder = export_onnx(source, cache_dir, int8=int8)
        model = _load_onnx(folder, file_name, threads)
    model.eval()
    encoder = Encoder(model, name=source.name, backend=backend, batch_size=batch_size)
    log.info(
        "loaded %s (%s, %d dimensions, window %d tokens, %d threads) in %.1f s",
        source.name,
        backend,
        encoder.dimensions,
        encoder.max_seq_length,
        threads,
        time.perf_counter() - started,
    )
    return encoder


def load_from_settings(settings: EmbeddingSettings) -> Encoder:
    """`load_encoder` with everything taken from the settings."""
    return load_encoder(
        resolve_model(settings),
        backend=settings.backend,
        cache_dir=settings.onnx_cache_dir,
        threads=settings.threads,
        batch_size=settings.max_batch_size,
    )

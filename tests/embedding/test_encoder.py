"""The real all-MiniLM-L6-v2 on each backend: ONNX export and its cache, equal vectors, truncation."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

from services.cache.settings import CacheSettings
from services.cache.verification import verify
from services.common.binaries import embedding_model_path
from services.common.prompt_text import canonical_tokens
from services.embedding.encoder import (
    DEFAULT_MODEL_NAME,
    ONNX_FILE,
    Encoder,
    ModelLoadError,
    ModelSource,
    export_dir,
    export_key,
    export_onnx,
    int8_config_name,
    int8_file_name,
    load_encoder,
    resolve_model,
)
from services.embedding.settings import EmbeddingSettings
from tests.fixtures.parts import REPO_ROOT

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

pytestmark = pytest.mark.slow

SENTENCES = [
    "What is the capital of France?",
    "Paris is the capital and most populous city of France.",
    "The quick brown fox jumps over the lazy dog.",
    "A man is eating food.",
    "A man is riding a white horse on an enclosed ground.",
    "How do I reset my password?",
    "Quantum computers use qubits, which can be in superpositions of states.",
    "¿Dónde está la biblioteca?",
    "東京は日本の首都です。",
    "def fibonacci(n): return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "hi",
    "The semantic cache returns a stored answer when a new prompt is close enough to an old one.",
    "Embeddings map text to vectors so that similar meanings end up close together.",
    "It was the best of times, it was the worst of times, it was the age of wisdom. " * 4,
]


@dataclass
class LoadedOnce:
    encoder: Encoder
    cache_dir: Path
    log: list[logging.LogRecord]


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def source() -> ModelSource:
    return ModelSource(embedding_model_path(), DEFAULT_MODEL_NAME)


@pytest.fixture(scope="module")
def onnx_loaded(source: ModelSource, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoadedOnce]:
    """The ONNX encoder, loaded from an empty cache folder (so loading exports first)."""
    cache_dir = tmp_path_factory.mktemp("onnx-cache")
    records = _Records()
    logger = logging.getLogger("services.embedding.encoder")
    logger.addHandler(records)
    previous_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        encoder = load_encoder(source, backend="onnx", cache_dir=cache_dir, threads=1)
    finally:
        logger.removeHandler(records)
        logger.setLevel(previous_level)
    yield LoadedOnce(encoder, cache_dir, records.records)


@pytest.fixture(scope="module")
def torch_encoder(source: ModelSource, tmp_path_factory: pytest.TempPathFactory) -> Encoder:
    return load_encoder(source, backend="torch", cache_dir=tmp_path_factory.mktemp("unused"), threads=1)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def vectors(encoder: Encoder, texts: list[str]) -> np.ndarray:
    return np.stack([result.vector for result in encoder.encode(texts)])


def test_loading_without_an_export_exports_once_into_the_cache(
    onnx_loaded: LoadedOnce, source: ModelSource
) -> None:
    folder = export_dir(source, onnx_loaded.cache_dir)
    assert folder.parent == onnx_loaded.cache_dir
    assert folder.name.startswith("all-MiniLM-L6-v2-")
    assert (folder / ONNX_FILE).is_file()
    assert any("exporting now" in record.getMessage() for record in onnx_loaded.log)
    exported_at = (folder / ONNX_FILE).stat().st_mtime_ns
    # Exporting again finds it and writes nothing.
    assert export_onnx(source, onnx_loaded.cache_dir, int8=False) == folder
    assert (folder / ONNX_FILE).stat().st_mtime_ns == exported_at
    assert [path.name for path in onnx_loaded.cache_dir.iterdir()] == [folder.name]


def test_onnx_vectors_equal_sentence_transformers_on_torch(
    onnx_loaded: LoadedOnce, embedding_model: SentenceTransformer
) -> None:
    encoder = onnx_loaded.encoder
    assert encoder.backend == "onnx"
    assert encoder.dimensions == 384
    got = vectors(encoder, SENTENCES)
    expected = embedding_model.encode(SENTENCES, convert_to_numpy=True, normalize_embeddings=True)
    assert got.dtype == np.float32
    assert got.shape == (len(SENTENCES), 384)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert cosines(got, expected).min() >= 0.999


def test_the_direct_onnx_path_gives_the_librarys_own_vectors_on_the_same_session(onnx_loaded: LoadedOnce) -> None:
    """The ONNX encoders skip sentence-transformers' per-call input handling; what they compute
    must not move: long texts (truncated), padding in a batch of mixed lengths, outer spaces."""
    encoder = onnx_loaded.encoder
    assert encoder.direct is not None
    texts = [*SENTENCES, "  padded with spaces  ", "word " * 400, "line\nbreaks\tand tabs"]
    library = encoder.model.encode(texts, convert_to_numpy=True, normalize_embeddings=True)
    np.testing.assert_allclose(vectors(encoder, texts), library, atol=1e-5)
    for text in texts[-3:]:
        np.testing.assert_allclose(vectors(encoder, [text])[0], library[texts.index(text)], atol=1e-5)
    # More texts than one model call takes: chunked, in order.
    many = texts * 3
    np.testing.assert_allclose(encoder.direct.encode(many), np.concatenate([library] * 3), atol=1e-5)


def test_torch_backend_gives_sentence_transformers_vectors(
    torch_encoder: Encoder, embedding_model: SentenceTransformer
) -> None:
    assert torch_encoder.direct is None
    got = vectors(torch_encoder, SENTENCES)
    expected = embedding_model.encode(SENTENCES, convert_to_numpy=True, normalize_embeddings=True)
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_order_is_kept_in_a_mixed_length_batch(onnx_loaded: LoadedOnce) -> None:
    # sentence-transformers sorts a batch by length inside; each vector must come back to its text.
    texts = list(reversed(SENTENCES))
    batch = vectors(onnx_loaded.encoder, texts)
    one_by_one = np.stack([vectors(onnx_loaded.encoder, [text])[0] for text in texts])
    assert cosines(batch, one_by_one).min() >= 0.999


def test_token_counts_and_truncation_follow_the_models_window(onnx_loaded: LoadedOnce) -> None:
    encoder = onnx_loaded.encoder
    assert encoder.max_seq_length == 256
    # "word" is one token; [CLS] and [SEP] make two more.
    fits, over, long = "word " * 254, "word " * 255, "word " * 2000
    short, exact, one_over, far_over = encoder.encode(["hello world", fits, over, long])
    assert (short.token_count, short.truncated) == (4, False)
    assert (exact.token_count, exact.truncated) == (256, False)
    assert (one_over.token_count, one_over.truncated) == (256, True)
    assert (far_over.token_count, far_over.truncated) == (256, True)
    # Only the window is read: the text past it changes nothing.
    assert float(np.dot(one_over.vector, far_over.vector)) >= 0.999


def test_int8_backend_runs_with_vectors_close_to_torch(
    onnx_loaded: LoadedOnce, source: ModelSource, embedding_model: SentenceTransformer
) -> None:
    # Quantizes next to the float32 export that the fixture made.
    encoder = load_encoder(source, backend="onnx-int8", cache_dir=onnx_loaded.cache_dir, threads=1)
    assert (export_dir(source, onnx_loaded.cache_dir) / int8_file_name(int8_config_name())).is_file()
    got = vectors(encoder, SENTENCES)
    expected = embedding_model.encode(SENTENCES, convert_to_numpy=True, normalize_embeddings=True)
    similarity = cosines(got, expected)
    # int8 drifts, but stays the same meaning.
    assert similarity.min() >= 0.95
    assert similarity.mean() >= 0.98


def test_export_key_follows_the_model_files(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"hidden_size": 384}')
    (tmp_path / "tokenizer.json").write_text("{}")
    first = export_key(tmp_path)
    assert export_key(tmp_path) == first
    (tmp_path / "onnx").mkdir()
    (tmp_path / "onnx" / "model.onnx").write_bytes(b"an earlier export")
    assert export_key(tmp_path) == first, "the model's own onnx/ folder is not part of the key"
    (tmp_path / "config.json").write_text('{"hidden_size": 768}')
    assert export_key(tmp_path) != first


def test_resolve_model_defaults_to_the_installed_minilm(tmp_path: Path) -> None:
    default = resolve_model(EmbeddingSettings(model_path=None, model_name=""))
    assert default == ModelSource(embedding_model_path(), "all-MiniLM-L6-v2")
    (tmp_path / "my-model").mkdir()
    (tmp_path / "my-model" / "modules.json").write_text("[]")
    custom = resolve_model(EmbeddingSettings(model_path=tmp_path / "my-model", model_name=""))
    assert custom.name == "my-model"
    with pytest.raises(ModelLoadError, match="LMC_EMBEDDING_MODEL_PATH"):
        resolve_model(EmbeddingSettings(model_path=tmp_path, model_name=""))


def test_the_default_backend_keeps_every_semantic_move_above_the_threshold(
    onnx_loaded: LoadedOnce, source: ModelSource
) -> None:
    """A semantic hit needs verification to accept a move (a fronted phrase, two words exchanged
    around "and"/"or") and the two vectors at the cache's threshold or above; the default backend
    (int8) must not turn such hits into misses. tests/data/cache_moves.jsonl was written before
    either backend was run on it."""
    pairs = [json.loads(line) for line in (REPO_ROOT / "tests" / "data" / "cache_moves.jsonl").read_text().splitlines() if line]
    moves = [(p["a"], p["b"]) for p in pairs if canonical_tokens(p["a"]) != canonical_tokens(p["b"])]
    accepted = [(a, b) for a, b in moves if verify(b, a).accepted]
    assert len(accepted) >= 25, f"only {len(accepted)} of {len(moves)} pairs are moves verification accepts"
    backend = EmbeddingSettings.model_fields["backend"].default
    encoder = load_encoder(source, backend=backend, cache_dir=onnx_loaded.cache_dir, threads=1)
    stored, asked = vectors(encoder, [a for a, _ in accepted]), vectors(encoder, [b for _, b in accepted])
    similarity = cosines(stored, asked)
    threshold = CacheSettings.model_fields["threshold"].default
    below = [(pair, round(float(s), 3)) for pair, s in zip(accepted, similarity, strict=True) if s < threshold]
    assert not below, below

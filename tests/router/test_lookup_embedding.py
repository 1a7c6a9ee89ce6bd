"""The Router's copy of the embedding model: the Embedding service's vectors, or not used at all.

Real all-MiniLM-L6-v2 both ways: the service's encoder (sentence-transformers on the set-up's ONNX
export) and the Router's (ONNX Runtime and the tokenizer on the same files)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence

import numpy as np
import pytest

from services.embedding.encoder import Encoder, load_from_settings
from services.embedding.settings import EmbeddingSettings
from services.router.lookup_embedding import SAME_VECTOR, LookupEmbedder, OnnxQueryEncoder
from tests.fixtures.parts import REPO_ROOT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def service_encoder() -> Encoder:
    return load_from_settings(EmbeddingSettings())


def prompts() -> list[str]:
    """Labelled prompts of the repository, and texts past the window, blank, accented, all capitals."""
    moves = [json.loads(line) for line in (REPO_ROOT / "tests/data/cache_moves.jsonl").read_text().splitlines() if line]
    extra = ["x " * 400, "   padded   ", "ÉCOLE NORMALE SUPÉRIEURE, où est-elle ?", "emoji 🙂 and 東京", "?"]
    return [m["a"] for m in moves] + [m["b"] for m in moves] + extra


def service_vectors(encoder: Encoder) -> object:
    async def embed(texts: Sequence[str]) -> list[list[float]]:
        return [encoder.encode([text])[0].vector.tolist() for text in texts]  # one text a request, as lookups

    return embed


def test_the_routers_copy_gives_the_services_vectors(service_encoder: Encoder) -> None:
    mine = OnnxQueryEncoder.load(EmbeddingSettings())
    texts = prompts()
    theirs = np.asarray([service_encoder.encode([text])[0].vector for text in texts])
    ours = np.asarray([mine.encode(text) for text in texts])
    assert ours.shape == theirs.shape
    assert float(np.min(np.sum(ours * theirs, axis=1))) >= SAME_VECTOR


async def test_a_copy_that_differs_from_the_service_is_never_used(service_encoder: Encoder) -> None:
    # The service runs int8 (the default); a Router told float32 computes other vectors.
    other = LookupEmbedder(EmbeddingSettings(backend="onnx"))
    other.start(service_vectors(service_encoder))  # type: ignore[arg-type]
    same = LookupEmbedder(EmbeddingSettings())
    same.start(service_vectors(service_encoder))  # type: ignore[arg-type]
    torch = LookupEmbedder(EmbeddingSettings(backend="torch"))
    torch.start(service_vectors(service_encoder))  # type: ignore[arg-type]
    try:
        for embedder in (other, same, torch):
            assert embedder._task is not None
            await asyncio.wait_for(embedder._task, 120)
        assert not other.ready and not torch.ready
        assert same.ready
        vector = await same.embed("How long do updates last with the Solo licence?")
        assert len(vector) == 384 and abs(float(np.linalg.norm(vector)) - 1.0) < 1e-5
    finally:
        for embedder in (other, same, torch):
            await embedder.close()


async def test_the_check_waits_for_an_embedding_service_that_is_not_up_yet(service_encoder: Encoder) -> None:
    calls = 0
    answer = service_vectors(service_encoder)

    async def starting(texts: Sequence[str]) -> list[list[float]]:
        nonlocal calls
        calls += 1
        return [] if calls < 3 else await answer(texts)  # type: ignore[operator]

    embedder = LookupEmbedder()
    embedder.start(starting)
    try:
        assert embedder._task is not None
        await asyncio.wait_for(embedder._task, 120)
        assert embedder.ready and calls == 3
    finally:
        await embedder.close()

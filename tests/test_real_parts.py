"""Smoke tests of the real parts as set-up installs them: Envoy, Redis Stack, llama-server, MiniLM.

If one of these fails, every test built on that part would fail too; these say which part it is.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import numpy as np
import pytest
import redis
from redis.commands.search.field import TagField, VectorField
from redis.commands.search.index_definition import IndexDefinition, IndexType
from redis.commands.search.query import Query

from services.common import binaries
from tests.fixtures.parts import (
    DESCRIPTOR_SET,
    ENVOY_TEMPLATE,
    REPO_ROOT,
    envoy_argv,
    envoy_for_router,
    free_port,
    process_alive,
    require_part,
    running_part,
)

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer


def _validate_envoy_config(config: Path, cwd: Path) -> None:
    result = subprocess.run(
        envoy_argv(config, "--mode", "validate"),
        check=False,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, f"envoy rejects {config}:\n{result.stdout}\n{result.stderr}"


def test_envoy_accepts_the_repository_config() -> None:
    # As committed: the descriptor set path is relative to the repository root.
    _validate_envoy_config(ENVOY_TEMPLATE, cwd=REPO_ROOT)


def test_envoy_serves_healthz_with_the_rendered_config(tmp_path: Path) -> None:
    # No Router runs here: /healthz is answered by Envoy itself.
    with envoy_for_router(f"127.0.0.1:{free_port()}", tmp_path) as envoy:
        _validate_envoy_config(envoy.config, cwd=tmp_path)
        assert str(DESCRIPTOR_SET.resolve()) in envoy.config.read_text()
        response = httpx.get(f"{envoy.http_url}/healthz", timeout=5.0)
    assert response.status_code == 200, response.text


def test_a_stopped_part_leaves_no_process_behind(tmp_path: Path) -> None:
    # A part that ignores SIGTERM and has a child of its own: the stop must still end both.
    child_file = tmp_path / "child.pid"
    script = f"trap '' TERM; sleep 300 & echo $! > {child_file}; wait"
    with running_part("stubborn", ["bash", "-c", script], tmp_path, stop_grace=0.5) as part:
        part.wait_until(lambda: child_file.read_text().strip().isdigit(), 10.0, "child pid")
        leader, child = part.process.pid, int(child_file.read_text())
        assert process_alive(leader) and process_alive(child)
    assert not process_alive(leader)
    assert not process_alive(child)


def test_redis_stack_answers_a_knn_query_on_an_hnsw_cosine_index(redis_stack: str) -> None:
    client = redis.Redis.from_url(redis_stack)
    index = f"smoke-{uuid.uuid4().hex[:8]}"
    prefix = f"{index}:"
    vectors = {
        "east": [1.0, 0.0, 0.0, 0.0],
        "north": [0.0, 1.0, 0.0, 0.0],
        "northeast": [1.0, 1.0, 0.0, 0.0],
        "up": [0.0, 0.0, 1.0, 0.0],
    }
    search = client.ft(index)
    search.create_index(
        [
            TagField("kind"),
            VectorField("embedding", "HNSW", {"TYPE": "FLOAT32", "DIM": 4, "DISTANCE_METRIC": "COSINE"}),
        ],
        definition=IndexDefinition(prefix=[prefix], index_type=IndexType.HASH),
    )
    try:
        for name, vector in vectors.items():
            client.hset(
                prefix + name,
                mapping={"kind": "point", "embedding": np.asarray(vector, np.float32).tobytes()},
            )
        query = (
            Query("(@kind:{point})=>[KNN 2 @embedding $vector AS distance]")
            .sort_by("distance")
            .return_fields("distance")
            .dialect(2)
        )
        # Closest to "mostly east, a little north": east first, then northeast.
        probe = np.asarray([0.9, 0.2, 0.0, 0.0], np.float32).tobytes()
        result = search.search(query, query_params={"vector": probe})
        assert [doc.id for doc in result.docs] == [prefix + "east", prefix + "northeast"]
        expected = 1 - 0.9 / np.hypot(0.9, 0.2)
        assert float(result.docs[0].distance) == pytest.approx(expected, abs=1e-5)
    finally:
        search.dropindex(delete_documents=True)
        client.close()


@pytest.mark.parametrize("tool", ["llama-server", "llama-quantize", "llama-gguf-split"])
def test_every_llama_cpp_tool_of_the_build_finds_its_libraries(tool: str) -> None:
    # Set-up builds only these tools; their shared libraries lie beside them ($ORIGIN rpath).
    binary = require_part(lambda: binaries.llama_tool(tool))
    linked = subprocess.run(["ldd", str(binary)], check=True, capture_output=True, text=True, timeout=30).stdout
    assert "not found" not in linked, linked
    assert str(binary.parent) in linked, linked  # libllama and libggml from the build itself


def test_llama_server_reports_its_version() -> None:
    server = require_part(binaries.llama_server_binary)
    result = subprocess.run([str(server), "--version"], check=False, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "version" in (result.stdout + result.stderr)


@pytest.mark.slow
def test_llama_server_answers_a_chat_completion(llama_server: str) -> None:
    response = httpx.post(
        f"{llama_server}/v1/chat/completions",
        json={
            "messages": [{"role": "user", "content": "Name one colour of the rainbow."}],
            "max_tokens": 16,
            "temperature": 0,
        },
        timeout=120.0,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    content = body["choices"][0]["message"]["content"]
    assert content.strip(), body
    assert body["usage"]["completion_tokens"] > 0


@pytest.mark.slow
def test_embedding_model_gives_unit_vectors_offline(embedding_model: SentenceTransformer) -> None:
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    vectors = embedding_model.encode(
        [
            "How do I reset my password?",
            "I forgot my password, how can I change it?",
            "The cat sat on the mat.",
        ]
    )
    assert vectors.shape == (3, 384)
    assert np.linalg.norm(vectors, axis=1) == pytest.approx(np.ones(3), abs=1e-4)
    similar, unrelated = vectors[0] @ vectors[1], vectors[0] @ vectors[2]
    assert similar > unrelated + 0.3, (similar, unrelated)

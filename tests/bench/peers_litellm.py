"""The LiteLLM proxy as a peer of lmcluster in tests/bench/bench_peers.py.

`litellm_binary()` installs the pinned LiteLLM proxy into its own virtual environment under the
cache folder (deploy/local/peers.sh; about a minute the first time, nothing afterwards) and
returns its `litellm` executable. `running_litellm(...)` runs it on a free loopback port with a
config of `litellm_config(...)` and yields its base URL once it answers.

The three ways it runs (`litellm_config`'s `cache`):
- "none": a pass-through to llama-server;
- "exact": `litellm_settings.cache` with `type: redis` (an exact cache keyed by the whole request);
- "semantic": `type: redis-semantic` (redisvl's SemanticCache on a RediSearch HNSW index); the
  prompt it embeds is every message's text concatenated, by the embedding model named in
  `redis_semantic_cache_embedding_model`, which is a model of the config's own `model_list`: here an
  OpenAI-compatible `/v1/embeddings` endpoint serving all-MiniLM-L6-v2 (lmcluster's own).
Each cache gets its own key namespace or index name on the shared Redis.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from tests.fixtures.parts import REPO_ROOT, free_port, running_part

PEERS_SCRIPT = REPO_ROOT / "deploy" / "local" / "peers.sh"
MASTER_KEY = "sk-lmcluster-bench-peers"
START_TIMEOUT = 180.0
EMBEDDING_MODEL = "all-MiniLM-L6-v2"


def litellm_binary() -> Path:
    """The pinned LiteLLM proxy's executable, installed first if needed (deploy/local/peers.sh)."""
    done = subprocess.run([str(PEERS_SCRIPT)], check=True, stdout=subprocess.PIPE, text=True, timeout=900)
    return Path(done.stdout.strip().splitlines()[-1])


def litellm_version(binary: Path) -> str:
    python = binary.resolve().parent / "python"
    done = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('litellm'), m.version('redisvl'))"],
        check=True, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    litellm, redisvl = done.stdout.split()
    return f"litellm {litellm} (redisvl {redisvl})"


def litellm_config(
    *,
    cache: str,
    model: str,
    backend_url: str,
    redis_url: str,
    namespace: str,
    embeddings_url: str = "",
    similarity_threshold: float = 0.95,
) -> dict:
    """A proxy config.yaml (as a dict): `model` served by the llama-server at `backend_url`."""
    models = [
        {
            "model_name": model,
            "litellm_params": {
                "model": f"openai/{model}",
                "api_base": f"{backend_url}/v1",
                "api_key": "none",
            },
        }
    ]
    settings: dict = {}
    redis = urlsplit(redis_url)
    if cache == "exact":
        settings = {
            "cache": True,
            "cache_params": {
                "type": "redis",
                "host": redis.hostname,
                "port": redis.port,
                "namespace": namespace,
                "ttl": 3600,
            },
        }
    elif cache == "semantic":
        models.append(
            {
                "model_name": EMBEDDING_MODEL,
                "litellm_params": {
                    "model": f"openai/{EMBEDDING_MODEL}",
                    "api_base": embeddings_url,
                    "api_key": "none",
                },
                "model_info": {"mode": "embedding"},
            }
        )
        settings = {
            "cache": True,
            "cache_params": {
                "type": "redis-semantic",
                "redis_url": redis_url,
                "similarity_threshold": similarity_threshold,
                "redis_semantic_cache_embedding_model": EMBEDDING_MODEL,
                "redis_semantic_cache_index_name": namespace,
                "ttl": 3600,
            },
        }
    elif cache != "none":
        raise ValueError(f"unknown cache {cache!r}")
    return {"model_list": models, "litellm_settings": settings}


@contextlib.contextmanager
def running_litellm(binary: Path, name: str, config: dict, work_dir: Path) -> Iterator[str]:
    """`litellm --config` on a free loopback port (default workers: one); yields http://127.0.0.1:PORT."""
    work_dir.mkdir(parents=True, exist_ok=True)
    config_path = work_dir / f"{name}.yaml"
    config_path.write_text(json.dumps(config, indent=2))  # JSON is YAML
    port = free_port()
    argv = [str(binary), "--config", str(config_path), "--host", "127.0.0.1", "--port", str(port)]
    env = {
        "LITELLM_MASTER_KEY": MASTER_KEY,
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # no fetch of the model price list
        "LITELLM_LOG": "ERROR",
        "PYTHONUNBUFFERED": "1",
    }
    url = f"http://127.0.0.1:{port}"
    with running_part(name, argv, work_dir, env=env) as part:
        part.wait_until(
            lambda: httpx.get(f"{url}/health/liveliness", timeout=2.0).status_code == 200,
            START_TIMEOUT,
            "/health/liveliness 200",
        )
        yield url

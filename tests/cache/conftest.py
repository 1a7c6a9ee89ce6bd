"""Cache test fixtures: a cache service on the shared Redis Stack, and a Redis of one's own to kill.

Each test gets its own key namespace (`index_prefix`), so tests sharing the session's Redis Stack
never see each other's entries or indexes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import numpy as np
import pytest
import redis
from lmcluster.cache.v1 import cache_service_pb2_grpc as pb_grpc

from services.cache.server import RunningCache, running_cache
from services.cache.settings import CacheSettings
from services.common import binaries
from services.common.children import OWN_PROCESS_GROUP, dies_with_parent
from tests.fixtures.parts import REDIS_START_TIMEOUT, free_port, require_part

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

INDEX_READY_TIMEOUT = 30.0


def cache_settings(redis_url: str, prefix: str, **overrides: object) -> CacheSettings:
    values: dict[str, object] = {
        "port": 0,
        "metrics_port": 0,
        "redis_url": redis_url,
        "index_prefix": prefix,
        "shutdown_grace_seconds": 2.0,
        # A busy 2-core machine running the whole suite: generous budgets, so a slow moment is
        # not mistaken for a Redis outage in the functional tests.
        "lookup_timeout_ms": 2000.0,
        "store_timeout_ms": 2000.0,
        **overrides,
    }
    return CacheSettings(**values)  # type: ignore[arg-type]


@pytest.fixture
def cache_prefix() -> str:
    """A key namespace of this test's own."""
    return f"lmc-test:{uuid.uuid4().hex[:12]}"


@contextlib.asynccontextmanager
async def cache_with_stub(settings: CacheSettings, *, wait_for_index: bool = True
                          ) -> AsyncIterator[tuple[RunningCache, pb_grpc.CacheServiceStub]]:  # fmt: skip
    async with running_cache(settings) as cache:
        if wait_for_index:
            async with asyncio.timeout(INDEX_READY_TIMEOUT):
                await cache.store.index_ready.wait()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{cache.port}") as channel:
            yield cache, pb_grpc.CacheServiceStub(channel)


@pytest.fixture
async def cache(
    redis_stack: str, cache_prefix: str
) -> AsyncIterator[tuple[RunningCache, pb_grpc.CacheServiceStub]]:
    """A cache service on the session's Redis Stack, in a namespace of its own, index ready."""
    async with cache_with_stub(cache_settings(redis_stack, cache_prefix)) as pair:
        yield pair
    with redis.Redis.from_url(redis_stack) as client:
        for name in client.execute_command("FT._LIST"):
            if name.decode().startswith(cache_prefix):
                client.execute_command("FT.DROPINDEX", name, "DD")


class Embedder:
    """The real all-MiniLM-L6-v2, as the Router would call it, memoized per text."""

    def __init__(self, model: SentenceTransformer) -> None:
        self.model = model
        self._memo: dict[str, list[float]] = {}

    def __call__(self, text: str) -> list[float]:
        if text not in self._memo:
            self.many([text])
        return self._memo[text]

    def many(self, texts: list[str]) -> list[list[float]]:
        missing = [t for t in dict.fromkeys(texts) if t not in self._memo]
        if missing:
            vectors = self.model.encode(
                missing, normalize_embeddings=True, convert_to_numpy=True, batch_size=64
            )
            for text, vector in zip(missing, np.asarray(vectors, dtype=np.float32), strict=True):
                self._memo[text] = vector.tolist()
        return [self._memo[t] for t in texts]


@pytest.fixture(scope="session")
def embed(embedding_model: SentenceTransformer) -> Embedder:
    return Embedder(embedding_model)


class RedisProcess:
    """A Redis Stack server of one test's own, which the test may kill, pause and restart."""

    def __init__(self, data_dir: Path, log_path: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}"
        self.data_dir = data_dir
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        argv, env = require_part(lambda: binaries.redis_server_command(self.port, self.data_dir))
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                dies_with_parent(argv), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, **env}, **OWN_PROCESS_GROUP,
            )  # fmt: skip
        self.wait_until_ready()

    def wait_until_ready(self) -> None:
        deadline = time.monotonic() + REDIS_START_TIMEOUT
        while True:
            assert self.process is not None
            if self.process.poll() is not None:
                pytest.fail(
                    f"redis exited with {self.process.returncode}: {self.log_path.read_text()[-2000:]}"
                )
            with (
                contextlib.suppress(redis.RedisError),
                redis.Redis.from_url(self.url, socket_timeout=1) as client,
            ):
                if client.ping():
                    return
            if time.monotonic() > deadline:
                pytest.fail(
                    f"redis on port {self.port} did not answer PING: {self.log_path.read_text()[-2000:]}"
                )
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.kill()
            self.process.wait()

    def pause(self) -> None:
        """SIGSTOP: Redis accepts connections but answers nothing (a hung server)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    """A Redis Stack on a free port, started; killed at the end of the test whatever happened."""
    server = RedisProcess(tmp_path, tmp_path / "redis.log")
    server.start()
    try:
        yield server
    finally:
        server.kill()

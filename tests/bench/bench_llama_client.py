"""The Router's client to llama-server: CPU per streamed generation, against an httpx client.

Run: `.venv/bin/python -m pytest tests/bench/bench_llama_client.py -s -o python_files='bench_*.py'`
(part of `make bench`; under a minute on 2 cores). One `lmcluster up` with the product's defaults;
its llama-server answers the same streamed question, 8 tokens, prompt cached, alternately to:
- `LlamaClient.stream` (services/router/llama_client.py: aiohttp), the Router's client;
- the same loop on httpx (`AsyncClient.stream`, `aiter_lines`, a connection per generation), the
  Router's client before.
Both in this process, on uvloop, one after the other. It prints this process's CPU per generation
(`time.process_time`) up to the first event and in all, and the ratios; it asserts only that both
read the same events.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvloop

from services.router.llama_client import LlamaClient
from tests.bench.bench_stack import product_stack
from tests.fixtures.parts import free_port
from tests.fixtures.stack import DEMO_MODEL_ID

ROUNDS = int(os.environ.get("BENCH_LLAMA_CLIENT_ROUNDS", "200"))
BODY = {
    "model": DEMO_MODEL_ID,
    "messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three large oceans."}],
    "max_tokens": 8,
    "temperature": 0,
    "stream": True,
}

Stream = Callable[[], AsyncIterator[dict[str, Any]]]


async def httpx_events(client: httpx.AsyncClient, url: str) -> AsyncIterator[dict[str, Any]]:
    async with client.stream("POST", url, json=BODY) as response:
        async for line in response.aiter_lines():
            if line.startswith("data:"):
                payload = line[5:].strip()
                if payload == "[DONE]":
                    return
                yield json.loads(payload)


async def measure(stream: Stream) -> tuple[float, float, int]:
    """CPU seconds to the first event and in all, and the events read."""
    started, first, count = time.process_time(), 0.0, 0
    async for _event in stream():
        count += 1
        if count == 1:
            first = time.process_time() - started
    return first, time.process_time() - started, count


async def compare(endpoint: str) -> dict[str, list[tuple[float, float, int]]]:
    url = endpoint.rstrip("/") + "/v1/chat/completions"
    llama = LlamaClient(connect_timeout=5.0, first_token_timeout=60.0, token_timeout=60.0)
    client = httpx.AsyncClient(timeout=60.0, limits=httpx.Limits(keepalive_expiry=2.0))
    clients: dict[str, Stream] = {
        "aiohttp (LlamaClient)": lambda: llama.stream(endpoint, "/v1/chat/completions", BODY),
        "httpx": lambda: httpx_events(client, url),
    }
    found: dict[str, list[tuple[float, float, int]]] = {name: [] for name in clients}
    try:
        for round_ in range(ROUNDS + 10):
            order = list(clients.items()) if round_ % 2 else list(reversed(clients.items()))
            for name, stream in order:
                sample = await measure(stream)
                if round_ >= 10:  # the first rounds warm both up
                    found[name].append(sample)
    finally:
        await llama.aclose()
        await client.aclose()
    return found


@pytest.mark.timeout(900)
def test_llama_client_cpu(tmp_path_factory: pytest.TempPathFactory, demo_model: Path) -> None:
    redis_url = f"redis://127.0.0.1:{free_port()}"
    with product_stack(tmp_path_factory, "llama-client", demo_model, redis_url=redis_url) as stack:
        endpoint = stack.ready_backends(DEMO_MODEL_ID)[0].endpoint
        found = uvloop.run(compare(endpoint))
    mean: dict[str, tuple[float, float]] = {
        name: (sum(s[0] for s in samples) / len(samples), sum(s[1] for s in samples) / len(samples))
        for name, samples in found.items()
    }
    print(f"\n| {ROUNDS} streamed generations each, 8 tokens | CPU to the first event ms | CPU per generation ms |")
    print("|---|---|---|")
    for name, (first, whole) in mean.items():
        print(f"| {name} | {first * 1000:.2f} | {whole * 1000:.2f} |")
    (new_first, new_whole), (old_first, old_whole) = mean["aiohttp (LlamaClient)"], mean["httpx"]
    print(f"| httpx over aiohttp | {old_first / new_first:.2f}× | {old_whole / new_whole:.2f}× |")
    counts = {name: {s[2] for s in samples} for name, samples in found.items()}
    assert counts["aiohttp (LlamaClient)"] == counts["httpx"], counts

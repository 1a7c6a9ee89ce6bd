"""What holding a unary answer's headers until its end costs at the gateway.

Run: `.venv/bin/python -m pytest tests/bench/bench_unary_hold.py -s -o python_files='bench_*.py'`
(part of `make bench`; about a minute). It prints the table of docs/benchmarks.md and asserts only
correctness (every answer whole, with its x-lmc-cache header), never time.

Two Envoys rendered from the repository's envoy.yaml stand in front of one fake Router
(tests/gateway/fake_router.py, answering at once): the gateway as shipped, whose `router` cluster
holds a unary answer's headers until its last byte (the upstream filter
`lmcluster.unary_answers_whole`, a Lua script), and the same without that filter. One client
alternates between them request by request, the order flipped each time, so both see the same
moments of a shared machine: REST and native gRPC chat completions (an answer of a few hundred
bytes, as a cache hit is), the first chunk of REST and native gRPC streams (which the filter lets
through at once: what it adds to a miss's TTFT), and REST embeddings of 1500 vectors (about
2.5 MB, which the filter buffers whole).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from google.protobuf import struct_pb2
from lmcluster.router.v1 import openai_pb2 as oa
from lmcluster.router.v1 import router_service_pb2_grpc as pb_grpc

from services.common import gateway as contract
from tests.gateway.conftest import Gateway, running_gateway, template_without_unary_hold
from tests.gateway.fake_router import BIG_EMBEDDING_COUNT, FakeRouter

SMALL_REQUESTS = 2000
BIG_REQUESTS = 150
WARMUP = 50
PLACEMENTS = ("without the filter", "as shipped")

Call = Callable[[Gateway], Awaitable[None]]


@pytest.fixture(scope="module")
def gateways(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Gateway]]:
    router = FakeRouter()
    router.start()
    work = tmp_path_factory.mktemp("unary-hold")
    address = f"127.0.0.1:{router.port}"
    try:
        with (
            running_gateway(work / "plain", address, template=template_without_unary_hold(work), access_log=False) as plain,
            running_gateway(work / "shipped", address, access_log=False) as shipped,
        ):
            yield {PLACEMENTS[0]: plain, PLACEMENTS[1]: shipped}
    finally:
        router.stop()


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _alternate(gateways: dict[str, Gateway], call: Call, requests: int) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {name: [] for name in gateways}
    names = list(gateways)
    for i in range(WARMUP + requests):
        for name in names if i % 2 else reversed(names):
            started = time.perf_counter()
            await call(gateways[name])
            if i >= WARMUP:
                samples[name].append((time.perf_counter() - started) * 1000)
    return samples


def _rows(what: str, samples: dict[str, list[float]]) -> list[str]:
    plain, shipped = (samples[name] for name in PLACEMENTS)
    rows = []
    for label, stat in (("p50", statistics.median), ("p99", lambda v: _percentile(v, 0.99))):
        a, b = stat(plain), stat(shipped)
        rows.append(f"| {what} | {label} | {a:.2f} | {b:.2f} | {b / a:.2f}x |")
    return rows


def test_holding_unary_headers_costs_little(gateways: dict[str, Gateway]) -> None:
    text = struct_pb2.Value(string_value="hello")

    async def run() -> list[str]:
        async with httpx.AsyncClient(timeout=30) as http:
            channels = {name: grpc.aio.insecure_channel(g.grpc_target) for name, g in gateways.items()}
            stubs = {g.grpc_target: pb_grpc.RouterServiceStub(channels[name]) for name, g in gateways.items()}

            async def rest_chat(g: Gateway) -> None:
                body = {"model": "cached", "messages": [{"role": "user", "content": "hello"}]}
                response = await http.post(f"{g.base_url}/chat/completions", json=body)
                assert response.status_code == 200 and response.headers[contract.CACHE_HEADER] == "hit"
                assert response.json()["choices"][0]["message"]["content"] == "echo: hello"

            async def grpc_chat(g: Gateway) -> None:
                request = oa.CreateChatCompletionRequest(model="cached", messages=[oa.ChatMessage(role="user", content=text)])
                call = stubs[g.grpc_target].CreateChatCompletion(request)
                reply = await call
                assert dict(await call.initial_metadata())[contract.CACHE_HEADER] == "hit"
                assert reply.choices[0].message.content == "echo: hello"

            async def rest_stream(g: Gateway) -> None:
                body = {"model": "echo-model", "stream": True, "messages": [{"role": "user", "content": "hello"}]}
                async with http.stream("POST", f"{g.base_url}/chat/completions", json=body) as response:
                    assert response.status_code == 200 and response.headers[contract.CACHE_HEADER] == "miss"
                    async for line in response.aiter_lines():
                        if line.startswith("data:"):
                            assert "chunk-0" in line
                            return  # the first chunk: what a stream's TTFT adds at the gateway
                raise AssertionError("a stream without chunks")

            async def grpc_stream(g: Gateway) -> None:
                request = oa.CreateChatCompletionRequest(model="echo-model", messages=[oa.ChatMessage(role="user", content=text)])
                call = stubs[g.grpc_target].StreamChatCompletion(request)
                first = await call.read()
                assert first.choices[0].delta.content == "chunk-0 "
                call.cancel()

            async def rest_big(g: Gateway) -> None:
                response = await http.post(f"{g.base_url}/embeddings", json={"model": "big", "input": "hello"})
                assert response.status_code == 200 and len(response.json()["data"]) == BIG_EMBEDDING_COUNT

            rows = []
            rows += _rows("REST chat completion (ms)", await _alternate(gateways, rest_chat, SMALL_REQUESTS))
            rows += _rows("gRPC chat completion (ms)", await _alternate(gateways, grpc_chat, SMALL_REQUESTS))
            rows += _rows("REST stream, first chunk (ms)", await _alternate(gateways, rest_stream, SMALL_REQUESTS))
            rows += _rows("gRPC stream, first chunk (ms)", await _alternate(gateways, grpc_stream, SMALL_REQUESTS))
            rows += _rows("REST embeddings, 2.5 MB (ms)", await _alternate(gateways, rest_big, BIG_REQUESTS))
            for channel in channels.values():
                await channel.close()
            return rows

    rows = asyncio.run(run())
    print("\n| call | | without the filter | as shipped | ratio |\n|---|---|---:|---:|---:|")
    print("\n".join(rows))

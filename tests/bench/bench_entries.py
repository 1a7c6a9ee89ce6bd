"""A miss's time to first token by entry: what each hop in front of llama-server adds.

Run: `.venv/bin/python -m pytest tests/bench/bench_entries.py -s -o python_files='bench_*.py'`
(part of `make bench`; under a minute on 2 cores). One `lmcluster up` with the product's defaults.
The same streamed question (so the same prompt tokens, and llama-server's prompt cache the same
for all) is sent, in rounds, through each entry in turn:
- straight to the stack's llama-server (the Router's own backend);
- native gRPC straight to the Router, with `cache: {skip_lookup, skip_store}` (no cache work);
- native gRPC through Envoy, the same;
- REST through Envoy, the same (adds the JSON transcoding and the Lua filter);
- REST through Envoy with the cache lookup and `skip_store` only: a miss, since nothing is ever stored.
TTFT is the first token's content. It prints the p50 of each entry and, of the paired differences
within a round, each entry's p50 over the one before it; it asserts only that every entry answered.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import httpx
import pytest
from google.protobuf import struct_pb2
from lmcluster.router.v1 import openai_pb2 as oa
from lmcluster.router.v1 import router_service_pb2_grpc

from tests.bench.bench_stack import TIMEOUT, product_stack
from tests.fixtures.stack import DEMO_MODEL_ID

ROUNDS = int(os.environ.get("BENCH_ENTRIES_ROUNDS", "40"))
WARM_ROUNDS = 3
SYSTEM = "You are terse."
QUESTION = "Name three large oceans of the world."
NO_CACHE = {"skip_lookup": True, "skip_store": True}


def rest_body(cache: dict | None) -> dict:
    body = {
        "model": DEMO_MODEL_ID,
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}],
        "max_tokens": 2,
        "temperature": 0,
        "stream": True,
    }
    return {**body, "cache": cache} if cache is not None else body


def rest_ttft(http: httpx.Client, url: str, body: dict) -> float:
    """Seconds to the first SSE event that carries content; the rest of the stream is read too."""
    started, first = time.perf_counter(), None
    with http.stream("POST", url, json=body) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if first is None and line.startswith("data:") and '"content":"' in line.replace(" ", "") and '"content":""' not in line.replace(" ", ""):
                first = time.perf_counter() - started
    assert first is not None, "no content"
    return first


def grpc_ttft(stub: router_service_pb2_grpc.RouterServiceStub) -> float:
    request = oa.CreateChatCompletionRequest(
        model=DEMO_MODEL_ID,
        messages=[
            oa.ChatMessage(role="system", content=struct_pb2.Value(string_value=SYSTEM)),
            oa.ChatMessage(role="user", content=struct_pb2.Value(string_value=QUESTION)),
        ],
        max_tokens=2,
        temperature=0,
        cache=oa.CacheOptions(**NO_CACHE),
    )
    started, first = time.perf_counter(), None
    for chunk in stub.StreamChatCompletion(request, timeout=60):
        if first is None and any(choice.delta.content for choice in chunk.choices):
            first = time.perf_counter() - started
    assert first is not None, "no content"
    return first


@pytest.mark.timeout(900)
def test_entries(tmp_path_factory: pytest.TempPathFactory, redis_stack: str, demo_model: Path) -> None:
    # BENCH_ENTRIES_ENV (a JSON object) adds settings, e.g. '{"LMC_EVENT_LOOP": "asyncio"}'.
    with product_stack(tmp_path_factory, "entries", demo_model, redis_url=redis_stack, env_variable="BENCH_ENTRIES_ENV") as stack:
        endpoint = stack.ready_backends(DEMO_MODEL_ID)[0].endpoint
        direct = (endpoint if "://" in endpoint else f"http://{endpoint}") + "/v1/chat/completions"
        rest = f"{stack.base_url}/chat/completions"
        with (
            httpx.Client(timeout=TIMEOUT) as http,
            grpc.insecure_channel(stack.grpc_target) as through_envoy,
            grpc.insecure_channel(stack.router) as to_router,
        ):
            envoy_stub = router_service_pb2_grpc.RouterServiceStub(through_envoy)
            router_stub = router_service_pb2_grpc.RouterServiceStub(to_router)
            entries: dict[str, Callable[[], float]] = {
                "llama-server, straight": lambda: rest_ttft(http, direct, rest_body(None)),
                "native gRPC to the Router, no cache work": lambda: grpc_ttft(router_stub),
                "native gRPC through Envoy, no cache work": lambda: grpc_ttft(envoy_stub),
                "REST through Envoy, no cache work": lambda: rest_ttft(http, rest, rest_body(NO_CACHE)),
                "REST through Envoy, a miss (lookup, nothing stored)": lambda: rest_ttft(http, rest, rest_body({"skip_store": True})),
            }
            times: dict[str, list[float]] = {name: [] for name in entries}
            for round_ in range(WARM_ROUNDS + ROUNDS):
                for name, send in entries.items():
                    seconds = send()
                    if round_ >= WARM_ROUNDS:
                        times[name].append(seconds * 1000)

    names = list(entries)
    print(f"\n| a miss's TTFT, {ROUNDS} rounds, entries in turn | p50 ms | over the row above, p50 of paired differences ms |")
    print("|---|---|---|")
    for index, name in enumerate(names):
        step = (
            f"{statistics.median(a - b for a, b in zip(times[name], times[names[index - 1]], strict=True)):+.1f}"
            if index
            else ""
        )
        print(f"| {name} | {statistics.median(times[name]):.1f} | {step} |")
    total = statistics.median(a - b for a, b in zip(times[names[-1]], times[names[0]], strict=True))
    print(f"a miss through Envoy's REST port over llama-server straight, p50 of paired differences: {total:+.1f} ms")

"""What tracing costs on the cache-hit path: 100% sampling against tracing off.

Run: `.venv/bin/python -m pytest tests/bench/bench_tracing.py -s` (part of `make bench`; about three
minutes on 2 cores). It prints the table of docs/benchmarks.md and asserts only correctness (every
answer a hit; the traced stack's hits all traced, the other's never), never time.

- Two stacks (`lmcluster up`, tests/fixtures/stack.py `running_stack`) on the demo model, side by
  side on one machine and one Redis Stack: one with tracing off (no OTEL_EXPORTER_OTLP_ENDPOINT),
  one with every part exporting every span (Envoy and the five services, default sampler
  parentbased_always_on, the SDK's default batch processor) to an OTLP/gRPC receiver in a process of
  its own (tests/observability/otlp_receiver.py), which stands in for Jaeger and, like a collector on
  the same host, takes its share of the CPU.
- Each stack answers one question once (a miss, stored), then only hits: the same chat completion
  request through Envoy's REST API, `x-lmc-cache: hit` checked on every answer. A hit's trace has
  about ten spans: Envoy's two, the Router's RPC, cache lookup and client calls, the Cache's RPC,
  cache.lookup and Redis command, and the Embedding call the Router starts beside the exact lookup.
- Sequential: one client, REQUESTS requests per stack, alternating between the two stacks request
  by request (the order flipped each time), so both see the same moments of a shared machine.
- Concurrent: CLIENTS clients for CONCURRENT_SECONDS per stack, in alternating slices: requests/s
  and latency under load, where the exporters' work competes with the answers for the cores.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fixtures.parts import REPO_ROOT, free_port, running_part
from tests.fixtures.stack import DEMO_MODEL_ID, Stack, running_stack

REQUESTS = 1000
WARMUP = 50
CLIENTS = 8
CONCURRENT_SECONDS = 8.0
SLICES = 3
QUESTION = "In one word: what colour is the sky on a clear day?"
BODY = {"model": DEMO_MODEL_ID, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 16, "temperature": 0}
TRACE_FLUSH_WAIT = 30.0


@dataclass
class Samples:
    latencies_ms: list[float]
    requests: int = 0
    seconds: float = 0.0

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


@dataclass(frozen=True)
class Receiver:
    """The OTLP receiver process: its endpoint and its span counts."""

    endpoint: str
    stats_file: Path

    def stats(self) -> dict[str, Any]:
        try:
            return json.loads(self.stats_file.read_text())  # type: ignore[no-any-return]
        except (FileNotFoundError, json.JSONDecodeError):
            return {"spans": 0, "exports": 0, "names": {}, "services": [], "traces": 0}

    def wait_for(self, ready: Callable[[dict[str, Any]], bool], timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while not ready(stats := self.stats()):
            assert time.monotonic() < deadline, f"the receiver has only {stats}"
            time.sleep(0.5)
        return stats


@pytest.fixture(scope="module")
def receiver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Receiver]:
    work_dir = tmp_path_factory.mktemp("otlp-receiver")
    port = free_port()
    stats_file = work_dir / "stats.json"
    argv = [sys.executable, "-m", "tests.observability.otlp_receiver", str(port), str(stats_file)]
    with running_part("otlp-receiver", argv, work_dir, cwd=REPO_ROOT) as part:
        part.wait_until(stats_file.exists, 30, "its first stats")
        yield Receiver(f"http://127.0.0.1:{port}", stats_file)


@pytest.fixture(scope="module")
def stacks(
    receiver: Receiver, redis_stack: str, demo_models_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Stack]]:
    quiet = {"LMC_LOG_LEVEL": "WARNING", "LMC_ROUTER_LOG_LEVEL": "WARNING", "LMC_CACHE_LOG_LEVEL": "WARNING",
             "LMC_EMBEDDING_LOG_LEVEL": "WARNING"}  # fmt: skip
    off = {**quiet, "OTEL_EXPORTER_OTLP_ENDPOINT": "", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": ""}
    on = {**quiet, "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_TRACES_SAMPLER": "parentbased_always_on"}
    with running_stack(tmp_path_factory.mktemp("tracing-off"), redis_url=redis_stack, models_dir=demo_models_dir, env=off) as untraced:
        with running_stack(tmp_path_factory.mktemp("tracing-on"), redis_url=redis_stack, models_dir=demo_models_dir, env=on) as traced:
            yield {"off": untraced, "on": traced}


def _ask(client: httpx.Client, stack: Stack) -> tuple[float, str]:
    started = time.perf_counter()
    reply = client.post(f"{stack.base_url}/chat/completions", json=BODY)
    elapsed = (time.perf_counter() - started) * 1000
    assert reply.status_code == 200, reply.text
    return elapsed, reply.headers.get("x-lmc-cache", "")


def _warm(client: httpx.Client, stack: Stack) -> None:
    """One miss (stored in the background), then hits only."""
    deadline = time.monotonic() + 120
    while _ask(client, stack)[1] != "hit":
        assert time.monotonic() < deadline, "the answer was never stored"
        time.sleep(0.2)
    for _ in range(WARMUP):
        assert _ask(client, stack)[1] == "hit"


def _sequential(stacks: dict[str, Stack]) -> dict[str, Samples]:
    samples = {name: Samples([]) for name in stacks}
    with httpx.Client(timeout=30) as client:
        for stack in stacks.values():
            _warm(client, stack)
        order = list(stacks)
        for index in range(REQUESTS):
            for name in order if index % 2 == 0 else reversed(order):
                elapsed, cache = _ask(client, stacks[name])
                assert cache == "hit"
                samples[name].latencies_ms.append(elapsed)
    return samples


async def _load(stack: Stack, seconds: float, samples: Samples) -> None:
    stop = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:

        async def user() -> None:
            while time.monotonic() < stop:
                started = time.perf_counter()
                reply = await client.post(f"{stack.base_url}/chat/completions", json=BODY)
                samples.latencies_ms.append((time.perf_counter() - started) * 1000)
                assert reply.status_code == 200 and reply.headers.get("x-lmc-cache") == "hit", reply.text
                samples.requests += 1

        began = time.perf_counter()
        await asyncio.gather(*(user() for _ in range(CLIENTS)))
        samples.seconds += time.perf_counter() - began


def _concurrent(stacks: dict[str, Stack]) -> dict[str, Samples]:
    samples = {name: Samples([]) for name in stacks}
    order = list(stacks)
    for index in range(SLICES):
        for name in order if index % 2 == 0 else reversed(order):
            asyncio.run(_load(stacks[name], CONCURRENT_SECONDS / SLICES, samples[name]))
    return samples


def _row(what: str, off: Samples, on: Samples, rate: bool = False) -> str:
    cells = [
        f"{off.percentile(50):.1f}", f"{on.percentile(50):.1f}", f"{on.percentile(50) / off.percentile(50):.2f}×",
        f"{off.percentile(99):.1f}", f"{on.percentile(99):.1f}", f"{on.percentile(99) / off.percentile(99):.2f}×",
    ]  # fmt: skip
    if rate:
        cells += [f"{off.rate:.0f}", f"{on.rate:.0f}", f"{on.rate / off.rate:.2f}×"]
    else:
        cells += ["", "", ""]
    return f"| {what} | " + " | ".join(cells) + " |"


def test_tracing_cost_on_the_cache_hit_path(stacks: dict[str, Stack], receiver: Receiver) -> None:
    sequential = _sequential(stacks)
    concurrent = _concurrent(stacks)

    # Correctness: the traced stack traced every hit (one `cache lookup` span each, plus its
    # misses'), from Envoy to the Cache; the other stack exported nothing.
    hits = REQUESTS + WARMUP + concurrent["on"].requests
    stats = receiver.wait_for(lambda stats: stats["names"].get("cache lookup", 0) >= hits, TRACE_FLUSH_WAIT)
    assert {"lmcluster-envoy", "lmcluster-router", "lmcluster-cache"} <= set(stats["services"])
    assert stats["names"].get("cache lookup", 0) < hits + 10  # nothing from the untraced stack
    per_hit = stats["spans"] / stats["traces"]

    print()
    print(f"{REQUESTS} sequential hits per stack (alternating), then {CLIENTS} clients for "
          f"{CONCURRENT_SECONDS:.0f} s per stack; {per_hit:.1f} spans per traced request; "
          f"{stats['spans']} spans received in {stats['exports']} exports")  # fmt: skip
    print("| cache hit through Envoy | p50 off ms | p50 on ms | p50 ratio | p99 off ms | p99 on ms | p99 ratio "
          "| req/s off | req/s on | req/s ratio |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(_row("sequential, 1 client", sequential["off"], sequential["on"]))
    print(_row(f"concurrent, {CLIENTS} clients", concurrent["off"], concurrent["on"], rate=True))

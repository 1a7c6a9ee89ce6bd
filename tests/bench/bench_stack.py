"""The whole stack against a bare llama-server, on the workload lmcluster is made for.

Run: `.venv/bin/python -m pytest tests/bench/bench_stack.py -s` (part of `make bench`; about three
minutes on 2 cores). It prints the tables of docs/benchmarks.md and asserts only correctness
(every request answered, zero errors), never time.

- The stack: `lmcluster up` (tests/fixtures/stack.py `running_stack`) on the demo model with the
  product's defaults (4 slots of 4096 tokens, every core, quantized KV cache), clients through Envoy.
- The baseline: a second llama-server started with exactly the argv the Supervisor gave the
  stack's backend (read from ListBackends; only the port differs), clients straight to it.
- Workload (tests/bench/stack_workload.py): RAG-style questions about four documents (the document
  in the system message, the question last); 40% of requests ask a question for the first time,
  60% repeat one first asked at least 50 requests (one round of the users) earlier, half word for
  word and half reworded; max_tokens 32, temperature 0, streamed, so time to first token (TTFT) is
  measured where a user sees it.
- Phases, one run:
  1. unloaded overhead: 20 questions that are cache misses, one at a time, each sent to the bare
     llama-server and then through the stack: TTFT and total time, the stack's over the baseline's;
  2. 50 concurrent users, 160 requests: first the bare llama-server, then the stack. Per cache
     outcome p50/p99, TTFT on misses against the baseline's, requests/s (ratio), and the share of
     requests answered without a model (cache hits);
  3. 200 concurrent users for 60 s against the stack, each sending its next question as soon as
     the last is answered, questions drawn from the same documents: errors must be zero.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.bench.stack_workload import Ask, questions, sequence
from tests.fixtures.parts import free_port, running_part
from tests.fixtures.stack import DEMO_MODEL_ID, Stack, link_demo_model, running_stack

MODEL = "smollm2-135m-instruct-q4_1"
MAX_TOKENS = 32
USERS = 50
REQUESTS = 160  # 64 first askings (every question of the documents once) and 96 repeats
NEW_SHARE = 0.4
OVERHEAD_REQUESTS = 20
SOAK_USERS = 200
SOAK_SECONDS = 60.0
# The product's defaults (services/supervisor/settings.py), instead of the test suite's small ones.
PRODUCT_DEFAULTS = {
    "LMC_SUPERVISOR_PARALLEL": "4",
    "LMC_SUPERVISOR_CONTEXT_PER_SLOT": "4096",
    "LMC_SUPERVISOR_THREADS": "0",
    "LMC_SUPERVISOR_PROMPT_CACHE_MIB": "256",
    "LMC_LOG_LEVEL": "WARNING",
}
TIMEOUT = httpx.Timeout(600.0, connect=60.0)
LIMITS = httpx.Limits(max_connections=SOAK_USERS + 50, max_keepalive_connections=SOAK_USERS + 50)
# The bare llama-server serves HTTP with a pool of n_parallel + 2 threads, and a thread stays with
# a keep-alive connection until it is idle for 5 s: 50 keep-alive clients starve it (in a first run,
# 160 requests took 373 s, and 2 failed with "Server disconnected"). Its clients open a connection
# per request, its best case; Envoy keeps few, busy connections to the Router, the Router few to it.
DIRECT_LIMITS = httpx.Limits(max_connections=SOAK_USERS + 50, max_keepalive_connections=0)


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))] if ordered else float("nan")


@dataclass
class Result:
    ok: bool
    cache: str  # "hit", "miss", "bypass"; "model" for the bare llama-server
    ttft: float
    total: float
    error: str = ""
    kind: str = ""  # a hit's x-lmc-cache-kind: "exact" or "semantic"


@dataclass
class Run:
    results: list[Result] = field(default_factory=list)
    wall: float = 0.0

    def of(self, cache: str | None = None) -> list[Result]:
        return [r for r in self.results if r.ok and (cache is None or r.cache == cache)]

    @property
    def errors(self) -> list[Result]:
        return [r for r in self.results if not r.ok]

    @property
    def rate(self) -> float:
        return len(self.results) / self.wall if self.wall else 0.0


def body(ask: Ask | tuple[str, str]) -> dict:
    system, question = (ask.question.system, ask.text) if isinstance(ask, Ask) else ask
    return {
        "model": MODEL,
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "stream": True,
    }


async def tokens(http: httpx.AsyncClient, endpoint: str, text: str) -> int:
    """How many tokens llama-server at `endpoint` makes of `text` (its /tokenize)."""
    reply = await http.post(f"{endpoint}/tokenize", json={"content": text})
    reply.raise_for_status()
    return len(reply.json()["tokens"])


async def send(http: httpx.AsyncClient, url: str, payload: dict, *, through_stack: bool) -> Result:
    """One streamed chat completion; TTFT is the first event with text in it."""
    started = time.perf_counter()
    ttft = 0.0
    try:
        async with http.stream("POST", url, json=payload) as response:
            if response.status_code != 200:
                await response.aread()
                return Result(False, "", 0, time.perf_counter() - started, f"HTTP {response.status_code}: {response.text[:200]}")
            cache = response.headers.get("x-lmc-cache", "?") if through_stack else "model"
            kind = response.headers.get("x-lmc-cache-kind", "")
            done = False
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    continue
                event = json.loads(data)
                if "error" in event:
                    return Result(False, cache, ttft, time.perf_counter() - started, f"error event: {event['error']}")
                if not ttft and any((c.get("delta") or {}).get("content") for c in event.get("choices", [])):
                    ttft = time.perf_counter() - started
            total = time.perf_counter() - started
            if not done:
                return Result(False, cache, ttft, total, "the stream ended without [DONE]")
            return Result(True, cache, ttft or total, total, kind=kind)
    except httpx.HTTPError as error:
        return Result(False, "", 0, time.perf_counter() - started, f"{type(error).__name__}: {error}")


async def closed_loop(
    url: str, next_payload: Callable[[], dict | None], users: int, *, through_stack: bool, until: float | None = None
) -> Run:
    """`users` clients, each sending the next request as soon as its last one is answered."""
    run = Run()
    async with httpx.AsyncClient(timeout=TIMEOUT, limits=LIMITS if through_stack else DIRECT_LIMITS) as http:

        async def user() -> None:
            while until is None or time.monotonic() < until:
                payload = next_payload()
                if payload is None:
                    return
                run.results.append(await send(http, url, payload, through_stack=through_stack))

        started = time.perf_counter()
        await asyncio.gather(*(user() for _ in range(users)))
        run.wall = time.perf_counter() - started
    return run


def from_list(payloads: list[dict]) -> Callable[[], dict | None]:
    pending = list(reversed(payloads))
    return lambda: pending.pop() if pending else None


async def one_at_a_time(stack_url: str, direct_url: str, payloads: list[dict]) -> tuple[Run, Run]:
    stack, direct = Run(), Run()
    async with httpx.AsyncClient(timeout=TIMEOUT) as http, httpx.AsyncClient(timeout=TIMEOUT, limits=DIRECT_LIMITS) as bare:
        for payload in payloads:
            direct.results.append(await send(bare, direct_url, payload, through_stack=False))
            stack.results.append(await send(http, stack_url, payload, through_stack=True))
    return stack, direct


def counter(stack: Stack, name: str) -> float:
    text = httpx.get(stack.metrics["router"], timeout=10).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ") or line.startswith(name + "{"))


def progress(what: str) -> None:
    print(f"[bench_stack {time.strftime('%H:%M:%S')}] {what}", flush=True)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:8.0f}"


def line(name: str, results: list[Result]) -> str:
    ttft = [r.ttft for r in results]
    total = [r.total for r in results]
    return (
        f"| {name:<28} | {len(results):5d} | {ms(percentile(ttft, 0.5))} | {ms(percentile(ttft, 0.99))} "
        f"| {ms(percentile(total, 0.5))} | {ms(percentile(total, 0.99))} |"
    )


HEADER = (
    "| requests                     |     n | TTFT p50 ms | TTFT p99 ms | total p50 ms | total p99 ms |\n"
    "|---|---|---|---|---|---|"
)


@contextlib.contextmanager
def product_stack(
    tmp_path_factory: pytest.TempPathFactory,
    name: str,
    demo_model: Path,
    *,
    redis_url: str,
    env: Mapping[str, str] | None = None,
    env_variable: str = "",
) -> Iterator[Stack]:
    """`lmcluster up` on the demo model with the product's defaults, then `env`, then the JSON object
    in the variable `env_variable` names (a benchmark's knob, e.g. '{"LMC_EVENT_LOOP": "asyncio"}')."""
    models = tmp_path_factory.mktemp(f"{name}-models")
    link_demo_model(models, demo_model)
    extra = json.loads(os.environ.get(env_variable, "{}")) if env_variable else {}
    settings = {**PRODUCT_DEFAULTS, **(env or {}), **extra}
    with running_stack(tmp_path_factory.mktemp(name), redis_url=redis_url, models_dir=models, env=settings) as stack:
        yield stack


@pytest.fixture(scope="module")
def bench_stack(tmp_path_factory: pytest.TempPathFactory, redis_stack: str, demo_model: Path) -> Stack:
    models = tmp_path_factory.mktemp("bench-models")
    link_demo_model(models, demo_model)
    with running_stack(tmp_path_factory.mktemp("bench-stack"), redis_url=redis_stack, models_dir=models, env=PRODUCT_DEFAULTS) as stack:
        yield stack  # type: ignore[misc]


@pytest.mark.timeout(1800)
def test_stack_against_bare_llama_server(bench_stack: Stack, tmp_path: Path) -> None:
    stack = bench_stack
    backend = stack.ready_backends(DEMO_MODEL_ID)[0]
    argv = list(backend.command)
    port = free_port()
    argv[argv.index("--port") + 1] = str(port)
    direct_url = f"http://127.0.0.1:{port}/v1/chat/completions"
    stack_url = f"{stack.base_url}/chat/completions"

    with running_part("llama-server-direct", argv, tmp_path) as direct_part:
        direct_part.wait_until(
            lambda: httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200, 120, "/health 200"
        )
        # 1. Unloaded: misses one at a time (each question is new to both servers).
        document = questions()[0].system
        overhead = [body((document, f"What does the document say about point {i + 1}?")) for i in range(OVERHEAD_REQUESTS)]
        asyncio.run(one_at_a_time(stack_url, direct_url, overhead[:3]))  # warm-up of both paths
        overhead = [body((document, f"What does the document say about section {i + 1}?")) for i in range(OVERHEAD_REQUESTS)]
        quiet_stack, quiet_direct = asyncio.run(one_at_a_time(stack_url, direct_url, overhead))
        progress("unloaded misses done")

        # 2. 50 users, 160 requests of the RAG workload: the bare llama-server, then the stack.
        asks = sequence(REQUESTS, NEW_SHARE, gap=USERS)
        payloads = [body(ask) for ask in asks]
        direct = asyncio.run(closed_loop(direct_url, from_list(payloads), USERS, through_stack=False))
        progress(f"bare llama-server, {USERS} users: {direct.wall:.0f} s")
    coalesced_before = counter(stack, "lmc_router_coalesced_requests_total")
    loaded = asyncio.run(closed_loop(stack_url, from_list(payloads), USERS, through_stack=True))
    coalesced = counter(stack, "lmc_router_coalesced_requests_total") - coalesced_before
    progress(f"stack, {USERS} users: {loaded.wall:.0f} s")

    # 3. 200 users for 60 s, questions about the same documents (reworded half the time).
    rng = random.Random(5)
    pool = questions()

    def soak_payload() -> dict:
        question = rng.choice(pool)
        return body(Ask(question, 0 if rng.random() < 0.5 else rng.choice((1, 2)), repeat=True))

    soak = asyncio.run(
        closed_loop(stack_url, soak_payload, SOAK_USERS, through_stack=True, until=time.monotonic() + SOAK_SECONDS)
    )

    # --- report ---------------------------------------------------------------------------------
    repeats = sum(ask.repeat for ask in asks)
    reworded = sum(ask.repeat and ask.wording > 0 for ask in asks)
    quiet_s, quiet_d = quiet_stack.of(), quiet_direct.of()
    misses, hits = loaded.of("miss"), loaded.of("hit")
    print(f"\n\nWorkload: {REQUESTS} requests, {repeats} repeats ({reworded} reworded), max_tokens {MAX_TOKENS}")
    print(f"Baseline argv: {' '.join(argv[1:])}\n")
    print(f"Unloaded, {OVERHEAD_REQUESTS} cache misses one at a time:\n{HEADER}")
    print(line("bare llama-server", quiet_d))
    print(line("stack (Envoy → Router → …)", quiet_s))
    print(
        f"TTFT overhead on a miss: p50 {percentile([r.ttft for r in quiet_s], 0.5) / percentile([r.ttft for r in quiet_d], 0.5):.2f}×, "
        f"+{(percentile([r.ttft for r in quiet_s], 0.5) - percentile([r.ttft for r in quiet_d], 0.5)) * 1000:.0f} ms; "
        f"stack results: {sorted({r.cache for r in quiet_s})}\n"
    )
    print(f"{USERS} concurrent users, {REQUESTS} requests:\n{HEADER}")
    print(line("bare llama-server (all)", direct.of()))
    print(line("stack, all", loaded.of()))
    print(line("stack, cache hits", hits))
    print(line("stack, cache misses", misses))
    print(
        f"requests/s: stack {loaded.rate:.2f}, bare {direct.rate:.2f}, ratio {loaded.rate / direct.rate:.2f}×\n"
        f"answered from the cache (no model): {len(hits)}/{len(loaded.results)} = {len(hits) / len(loaded.results):.0%}; "
        f"misses that joined an identical running generation: {coalesced:.0f}; "
        f"generations: {len(misses) - coalesced:.0f} (bare llama-server: {len(direct.results)})"
    )
    print(
        f"TTFT on misses vs the bare server under the same load: p50 "
        f"{percentile([r.ttft for r in misses], 0.5) / percentile([r.ttft for r in direct.of()], 0.5):.2f}×, "
        f"p99 {percentile([r.ttft for r in misses], 0.99) / percentile([r.ttft for r in direct.of()], 0.99):.2f}×\n"
    )
    print(f"{SOAK_USERS} concurrent users for {SOAK_SECONDS:.0f} s through the stack:\n{HEADER}")
    print(line("all", soak.of()))
    print(line("cache hits", soak.of("hit")))
    print(line("cache misses", soak.of("miss")))
    print(
        f"requests: {len(soak.results)} in {soak.wall:.1f} s ({soak.rate:.1f}/s), errors: {len(soak.errors)}, "
        f"answered without a model: {len(soak.of('hit')) / max(1, len(soak.results)):.0%}"
    )
    for failure in (quiet_direct.errors + quiet_stack.errors + direct.errors + loaded.errors + soak.errors)[:10]:
        print("  error:", failure.error)

    assert not quiet_direct.errors and not quiet_stack.errors
    assert not direct.errors, direct.errors[:3]
    assert not loaded.errors, loaded.errors[:3]
    assert len(loaded.results) == len(direct.results) == REQUESTS
    assert hits, "no request was answered from the cache"
    assert len(soak.errors) == 0, soak.errors[:3]

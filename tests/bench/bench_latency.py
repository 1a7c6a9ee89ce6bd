"""What the gateway adds to a request, idle and beside generating misses.

Run: `.venv/bin/python -m pytest tests/bench/bench_latency.py -s -o python_files='bench_*.py'`
(`make bench PYTEST_ARGS="-k latency"`; about five minutes on 2 cores). It prints the tables of
docs/benchmarks.md ("Latency: misses, exact hits, hits under load") and asserts only that every
request was answered, never time.

One `lmcluster up` with the product's defaults (tests/bench/bench_stack.py `PRODUCT_DEFAULTS`) and
`LMC_SUPERVISOR_NICE=0` at start, so the same run can compare llama-server at niceness 0 and 10.

1. **Miss overhead, idle**: pairs of streamed questions about one document, each pair one request
   straight to the stack's own llama-server (the backend the Router uses, so the same prompt cache)
   and one through Envoy, in alternating order; every request its own question (`skip_store`,
   nothing is stored). Twice: with nothing cached in the documents' scopes (a miss skips the
   semantic lookup), then with one answer cached in each (the semantic lookup runs and misses).
   TTFT = first event with text.
2. **Exact hits, idle**: one answer stored, then sequential identical requests: REST unary and
   streamed through Envoy, native gRPC through Envoy and straight to the Router (what Envoy costs).
3. **Hits beside misses**: 16 clients, 160 streamed requests, 40% first askings and 60% repeats
   (half word for word, half reworded; tests/bench/stack_workload.py), `max_tokens` 16; once with
   llama-server at niceness 0, once at 10 (every thread reniced in place), each with its own
   system-prompt tag so neither finds the other's answers.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import time
from collections import Counter
from pathlib import Path

import grpc
import httpx
import pytest
from google.protobuf import struct_pb2
from lmcluster.router.v1 import openai_pb2 as oa
from lmcluster.router.v1 import router_service_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from tests.bench.bench_stack import (
    DIRECT_LIMITS,
    MODEL,
    PRODUCT_DEFAULTS,
    TIMEOUT,
    Result,
    Run,
    closed_loop,
    from_list,
    percentile,
    send,
)
from tests.bench.stack_workload import Ask, questions, sequence
from tests.fixtures.stack import DEMO_MODEL_ID, Stack, link_demo_model, running_stack

MISS_PAIRS = int(os.environ.get("BENCH_LATENCY_MISS_PAIRS", "20"))
HITS = int(os.environ.get("BENCH_LATENCY_HITS", "300"))
LOAD_CLIENTS = 16
LOAD_REQUESTS = int(os.environ.get("BENCH_LATENCY_LOAD_REQUESTS", "160"))
LOAD_MAX_TOKENS = 16
NICENESS = (0, 10, 19)


def progress(what: str) -> None:
    print(f"[bench_latency {time.strftime('%H:%M:%S')}] {what}", flush=True)


def chat(system: str, question: str, *, max_tokens: int, stream: bool = True, **extra: object) -> dict:
    return {
        "model": MODEL,
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
        **extra,
    }


def renice(pid: int, niceness: int) -> None:
    """Every thread of `pid` to `niceness` (lowering it needs CAP_SYS_NICE; this run only raises it)."""
    for task in os.listdir(f"/proc/{pid}/task"):
        os.setpriority(os.PRIO_PROCESS, int(task), niceness)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:,.1f}"


# --- 1. miss overhead ---------------------------------------------------------------------------


async def seed_scopes(stack_url: str) -> None:
    """One stored answer in each document's scope, so that a miss there runs the semantic lookup."""
    async with httpx.AsyncClient(timeout=TIMEOUT) as http:
        for system in {q.system for q in questions()}:
            body = chat(system, "Summarize the document in one sentence.", max_tokens=8, stream=False)
            deadline = time.monotonic() + 30
            while (await http.post(stack_url, json=body)).headers.get("x-lmc-cache") != "hit":
                assert time.monotonic() < deadline, "a seed answer was never stored"
                await asyncio.sleep(0.2)


async def miss_pairs(stack_url: str, bare_url: str, wording: int) -> tuple[Run, Run, list[float]]:
    # Two questions about the same document per pair (each document has an even number of them).
    pool = sorted(questions(), key=lambda q: (q.document.name, q.key))
    assert len(pool) >= 2 * (MISS_PAIRS + 2), len(pool)
    stack, bare, differences = Run(), Run(), []
    # llama-server drops idle keep-alive connections (bench_stack's DIRECT_LIMITS): one per request.
    async with httpx.AsyncClient(timeout=TIMEOUT) as http, httpx.AsyncClient(timeout=TIMEOUT, limits=DIRECT_LIMITS) as direct_http:
        for i in range(MISS_PAIRS + 2):
            mine, theirs = pool[2 * i], pool[2 * i + 1]
            # A tag of its own first in each question: llama-server's slot keeps the last prompt, and
            # two questions that start alike would share more than the document (fewer tokens to
            # evaluate for whichever request follows its look-alike).
            through = chat(
                mine.system, f"[{secrets.token_hex(3)}] {mine.wordings[wording]}", max_tokens=8, cache={"skip_store": True}
            )
            straight = chat(theirs.system, f"[{secrets.token_hex(3)}] {theirs.wordings[wording]}", max_tokens=8)
            if i % 2:
                direct = await send(direct_http, bare_url, straight, through_stack=False)
                via = await send(http, stack_url, through, through_stack=True)
            else:
                via = await send(http, stack_url, through, through_stack=True)
                direct = await send(direct_http, bare_url, straight, through_stack=False)
            if i < 2:
                continue  # warm-up: connections, the document in a slot
            stack.results.append(via)
            bare.results.append(direct)
            if via.ok and direct.ok:
                differences.append(via.ttft - direct.ttft)
    return stack, bare, differences


# --- 2. exact hits ------------------------------------------------------------------------------


async def rest_hits(url: str, payload: dict) -> list[float]:
    times = []
    async with httpx.AsyncClient(timeout=TIMEOUT) as http:
        for _ in range(HITS):
            started = time.perf_counter()
            if payload["stream"]:
                result = await send(http, url, payload, through_stack=True)
                assert result.ok and result.cache == "hit", result
                times.append(result.ttft)
            else:
                response = await http.post(url, json=payload)
                assert response.status_code == 200 and response.headers["x-lmc-cache"] == "hit", response.text
                times.append(time.perf_counter() - started)
    return times


def grpc_hits(target: str, payload: dict) -> list[float]:
    request = oa.CreateChatCompletionRequest(
        model=payload["model"],
        messages=[
            oa.ChatMessage(role=m["role"], content=struct_pb2.Value(string_value=m["content"])) for m in payload["messages"]
        ],
        max_tokens=payload["max_tokens"],
        temperature=0,
    )
    times = []
    with grpc.insecure_channel(target) as channel:
        stub = router_service_pb2_grpc.RouterServiceStub(channel)
        for _ in range(HITS):
            started = time.perf_counter()
            _reply, call = stub.CreateChatCompletion.with_call(request, timeout=30)
            times.append(time.perf_counter() - started)
            assert dict(call.initial_metadata()).get("x-lmc-cache") == "hit"
    return times


def cache_counters(stack: Stack) -> Counter:
    """The Cache's lookups by result and its refused candidates by reason."""
    found: Counter = Counter()
    text = httpx.get(stack.metrics["cache"], timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "lmc_cache_lookups_total":
                found[f"lookup {sample.labels['result']}"] += sample.value
            elif sample.name == "lmc_cache_rejected_candidates_total":
                found[f"refused {sample.labels['reason']}"] += sample.value
    return found


# --- 3. hits beside misses ----------------------------------------------------------------------


def load_payloads(tag: str) -> list[dict]:
    asks: list[Ask] = sequence(LOAD_REQUESTS, 0.4, gap=LOAD_CLIENTS)
    return [chat(f"{a.question.system}\nSession {tag}.", a.text, max_tokens=LOAD_MAX_TOKENS) for a in asks]


def hit_line(name: str, run: Run, kind: str) -> str:
    times = [r.ttft for r in run.of("hit") if r.kind == kind]
    return f"| {name} | {kind} | {len(times)} | {ms(percentile(times, 0.5))} | {ms(percentile(times, 0.99))} |"


@pytest.mark.timeout(1800)
def test_gateway_latency(tmp_path_factory: pytest.TempPathFactory, redis_stack: str, demo_model: Path) -> None:
    models = tmp_path_factory.mktemp("latency-models")
    link_demo_model(models, demo_model)
    # BENCH_LATENCY_ENV (a JSON object) adds settings, e.g. '{"LMC_ROUTER_OVERLAP_LOOKUP": "false"}'.
    env = {**PRODUCT_DEFAULTS, "LMC_SUPERVISOR_NICE": "0", **json.loads(os.environ.get("BENCH_LATENCY_ENV", "{}"))}
    with running_stack(tmp_path_factory.mktemp("latency"), redis_url=redis_stack, models_dir=models, env=env) as stack:
        report(stack)


def report(stack: Stack) -> None:
    backend = stack.ready_backends(DEMO_MODEL_ID)[0]
    stack_url = f"{stack.base_url}/chat/completions"
    bare_url = f"{backend.endpoint}/v1/chat/completions"

    # 1. Miss overhead: first in scopes with nothing cached (a new document), then in scopes that
    # hold an answer (the semantic lookup runs).
    print(f"\n| idle, {MISS_PAIRS} misses each, alternating | TTFT p50 ms | TTFT p99 ms |")
    print("|---|---|---|")
    for wording, scopes in ((0, "nothing cached in the scope"), (1, "answers cached in the scope")):
        if wording:
            asyncio.run(seed_scopes(stack_url))
        through, bare, differences = asyncio.run(miss_pairs(stack_url, bare_url, wording))
        progress(f"misses, {scopes}, done")
        for name, run in ((f"llama-server, straight ({scopes})", bare), (f"through Envoy and the Router ({scopes})", through)):
            ttft = [r.ttft for r in run.of()]
            print(f"| {name} | {ms(percentile(ttft, 0.5))} | {ms(percentile(ttft, 0.99))} |")
        print(
            f"| **overhead, {scopes}** (paired difference) | {ms(percentile(differences, 0.5))} "
            f"| {ms(percentile(differences, 0.99))} |"
        )
        assert not through.errors and not bare.errors, (through.errors[:2], bare.errors[:2])

    # 2. Exact hits.
    hit = chat("You are terse.", "Name a large ocean.", max_tokens=8, stream=False)
    with httpx.Client(timeout=TIMEOUT) as http:
        first = http.post(stack_url, json=hit)
        assert first.status_code == 200, first.text
        deadline = time.monotonic() + 30
        while http.post(stack_url, json=hit).headers.get("x-lmc-cache") != "hit":
            assert time.monotonic() < deadline, "the answer was never stored"
            time.sleep(0.2)
    rows = {
        "REST unary through Envoy": asyncio.run(rest_hits(stack_url, hit)),
        "REST streamed through Envoy (TTFT)": asyncio.run(rest_hits(stack_url, {**hit, "stream": True})),
        "native gRPC through Envoy": grpc_hits(stack.grpc_target, hit),
        "native gRPC straight to the Router": grpc_hits(stack.router, hit),
    }
    progress("exact hits done")
    print(f"\n| idle, {HITS} sequential exact hits | p50 ms | p99 ms |")
    print("|---|---|---|")
    for name, times in rows.items():
        print(f"| {name} | {ms(percentile(times, 0.5))} | {ms(percentile(times, 0.99))} |")

    # 3. Hits beside misses, llama-server at each niceness.
    runs: dict[int, Run] = {}
    verdicts: dict[int, Counter] = {}
    for niceness in NICENESS:
        renice(backend.pid, niceness)
        payloads = load_payloads(f"nice-{niceness}-{time.monotonic_ns()}")
        before = cache_counters(stack)
        runs[niceness] = asyncio.run(closed_loop(stack_url, from_list(payloads), LOAD_CLIENTS, through_stack=True))
        verdicts[niceness] = cache_counters(stack)
        verdicts[niceness].subtract(before)
        progress(f"load at niceness {niceness}: {runs[niceness].wall:.0f} s")
    print(f"\n| {LOAD_CLIENTS} clients, {LOAD_REQUESTS} requests | hit kind | n | TTFT p50 ms | TTFT p99 ms |")
    print("|---|---|---|---|---|")
    for niceness, run in runs.items():
        for kind in ("exact", "semantic"):
            print(hit_line(f"llama-server niceness {niceness}", run, kind))
    base = runs[NICENESS[0]]
    print("\n| llama-server niceness | requests/s | vs niceness 0 | hits | misses TTFT p50 ms | errors |")
    print("|---|---|---|---|---|---|")
    for niceness, run in runs.items():
        misses = [r.ttft for r in run.of("miss")]
        print(
            f"| {niceness} | {run.rate:.2f} | {run.rate / base.rate:.2f}× | {len(run.of('hit'))} "
            f"| {ms(percentile(misses, 0.5))} | {len(run.errors)} |"
        )
    for niceness, counts in verdicts.items():
        print(f"Cache at niceness {niceness}: {dict(+counts)}")
    for run in runs.values():
        assert not run.errors, run.errors[:3]
        assert len(run.results) == LOAD_REQUESTS

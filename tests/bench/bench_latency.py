"""What the gateway adds to a request, idle and beside generating misses.

Run: `.venv/bin/python -m pytest tests/bench/bench_latency.py -s -o python_files='bench_*.py'`
(`make bench PYTEST_ARGS="-k latency"`; about five minutes on 2 cores). It prints the tables of
docs/benchmarks.md ("Latency: misses, exact hits, hits under load") and asserts only that every
request was answered, never time.

One `lmcluster up` with the product's defaults (tests/bench/bench_stack.py `PRODUCT_DEFAULTS`).

1. **Miss overhead, idle**: pairs of one streamed question, one request straight to the stack's own
   llama-server (the backend the Router uses, so the same prompt cache) and one through Envoy, in
   alternating order. The two carry tags of equal token counts (llama-server's /tokenize), so each
   has as many prompt tokens to evaluate, and an unmeasured request first puts the document into a
   slot for both. Nothing is stored (`skip_store`). Three times: nothing cached in the documents'
   scopes; other questions' answers cached (no entry has the question's words); an answer with the
   same words in another order cached before each pair (a candidate the Router reads and
   verification refuses). TTFT = first event with text.
2. **Exact hits, idle**: one answer stored, then sequential identical requests: REST unary and
   streamed through Envoy, native gRPC through Envoy and straight to the Router (what Envoy costs).
3. **Hits beside misses**: 16 clients, 160 streamed requests, 40% first askings and 60% repeats
   (half word for word, half reworded; tests/bench/stack_workload.py; a rewording here is the
   original with its closing phrase in front where it has one, which verification serves as a
   semantic hit),
   `max_tokens` 16; once per
   scheduling of llama-server (`SCHEDULING`: niceness 0, niceness 10, SCHED_IDLE; every thread
   changed in place, which needs CAP_SYS_NICE where it favours llama-server again), each with its
   own system-prompt tag so that none finds another's answers. Beside each load, a client of its own
   process (tests/bench/hit_probe.py) sends phase 2's exact hit every 50 ms, REST and native gRPC:
   the load's own TTFTs include the 16 clients' event loop, the probe's do not.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import subprocess
import sys
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

from services.cache.verification import verify
from services.router.index_reader import REPORT_INTERVAL_SECONDS
from tests.bench.bench_stack import (
    DIRECT_LIMITS,
    MODEL,
    TIMEOUT,
    Run,
    closed_loop,
    from_list,
    percentile,
    product_stack,
    send,
    tokens,
)
from tests.bench.stack_workload import questions, sequence
from tests.fixtures.parts import REPO_ROOT, free_port
from tests.fixtures.stack import DEMO_MODEL_ID, Stack

MISS_PAIRS = int(os.environ.get("BENCH_LATENCY_MISS_PAIRS", "20"))
HITS = int(os.environ.get("BENCH_LATENCY_HITS", "300"))
LOAD_CLIENTS = 16
LOAD_REQUESTS = int(os.environ.get("BENCH_LATENCY_LOAD_REQUESTS", "160"))
LOAD_MAX_TOKENS = 16
# llama-server's CPU scheduling in phase 3: (name, policy, niceness), applied to every thread in place.
SCHEDULING = (
    ("niceness 0", os.SCHED_OTHER, 0),
    ("niceness 10", os.SCHED_OTHER, 10),
    ("SCHED_IDLE", os.SCHED_IDLE, 0),
)


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


def schedule(pid: int, policy: int, niceness: int) -> None:
    """Every thread of `pid` to `policy` and `niceness` (leaving SCHED_IDLE or lowering the niceness
    needs CAP_SYS_NICE, so the phases run from the most to the least favoured)."""
    for task in os.listdir(f"/proc/{pid}/task"):
        os.sched_setscheduler(int(task), policy, os.sched_param(0))
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


async def equal_tags(http: httpx.AsyncClient, endpoint: str, question: str) -> tuple[str, str]:
    """Two tagged copies of `question` that tokenize to as many tokens: each side of a pair then
    has exactly as many prompt tokens to evaluate (one token is about 8 ms on these cores)."""
    seen: dict[int, str] = {}  # a tagged copy per token count: some random tags tokenize unusually
    for _ in range(400):
        tagged = f"[{secrets.token_hex(3)}] {question}"
        count = await tokens(http, endpoint, tagged)
        if count in seen:
            return seen[count], tagged
        seen[count] = tagged
    raise AssertionError(f"no two tags of as many tokens for {question!r}")


def moved_words(question: str) -> str:
    """The tagged question with its tag moved to the end: the same words in another order, which
    verification refuses (so the lookup finds a candidate, and misses)."""
    tag, _, rest = question.partition(" ")
    return f"{rest} {tag}"


async def miss_pairs(stack_url: str, endpoint: str, wording: int, *, candidate: bool) -> tuple[Run, Run, list[float]]:
    """Pairs of the same question with tags of equal token counts, one through the stack and one
    straight to llama-server, the order flipped every pair. With `candidate`, an answer with the
    through-question's words in another order is stored first, so that its lookup finds a candidate."""
    pool = sorted(questions(), key=lambda q: (q.document.name, q.key))
    assert len(pool) >= MISS_PAIRS + 2, len(pool)
    stack, bare, differences = Run(), Run(), []
    bare_url = f"{endpoint}/v1/chat/completions"
    # llama-server drops idle keep-alive connections (bench_stack's DIRECT_LIMITS): one per request.
    async with httpx.AsyncClient(timeout=TIMEOUT) as http, httpx.AsyncClient(timeout=TIMEOUT, limits=DIRECT_LIMITS) as direct_http:
        for i in range(MISS_PAIRS + 2):
            question = pool[i]
            mine, theirs = await equal_tags(direct_http, endpoint, question.wordings[wording])
            through = chat(question.system, mine, max_tokens=8, cache={"skip_store": True})
            straight = chat(question.system, theirs, max_tokens=8)
            if candidate:
                seed = chat(question.system, moved_words(mine), max_tokens=4, stream=False)
                while (await http.post(stack_url, json=seed)).headers.get("x-lmc-cache") != "hit":
                    await asyncio.sleep(0.1)
            # The document into a slot first, unmeasured: both requests of the pair then find it there.
            warm = chat(question.system, f"[{secrets.token_hex(3)}] {question.wordings[wording]}", max_tokens=1)
            assert (await send(direct_http, bare_url, warm, through_stack=False)).ok
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


_TRAILING_PHRASE = re.compile(r"^(?P<rest>.+?) (?P<phrase>(?:with|for|in|on|of|about|at|to|from|by|per|under|during) [^,?]+)\?$", re.IGNORECASE)


def fronted(question: str) -> str | None:
    """The question with its closing prepositional phrase in front ("With the Solo licence, how
    long do updates last?"): the same words, which the Cache's verification serves semantically."""
    match = _TRAILING_PHRASE.match(question)
    if match is None or len(match["phrase"].split()) > 5:
        return None
    moved = f"{match['phrase'][0].upper()}{match['phrase'][1:]}, {match['rest'][0].lower()}{match['rest'][1:]}?"
    return moved if verify(moved, question).accepted else None


def load_payloads(tag: str) -> list[dict]:
    """The run's requests; a reworded repeat says the original with its closing phrase in front
    where it has one, so that some repeats are semantic hits."""
    payloads = []
    for ask in sequence(LOAD_REQUESTS, 0.4, gap=LOAD_CLIENTS):
        text = ask.text
        if ask.wording:
            text = fronted(ask.question.wordings[0]) or text
        payloads.append(chat(f"{ask.question.system}\nSession {tag}.", text, max_tokens=LOAD_MAX_TOKENS))
    return payloads


def start_probe(stack: Stack, stack_url: str, exact: dict, semantic: dict) -> subprocess.Popen[str]:
    """Sequential hits from a process of its own while the load runs (tests/bench/hit_probe.py)."""
    argv = [
        sys.executable, "-m", "tests.bench.hit_probe", stack_url, stack.grpc_target, json.dumps(exact), json.dumps(semantic)
    ]
    return subprocess.Popen(argv, cwd=REPO_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def stop_probe(probe: subprocess.Popen[str]) -> tuple[dict[str, list[float]], list[str]]:
    """The probe's hit times by kind, and its replies that were not the expected hit."""
    out, _ = probe.communicate("", timeout=120)
    assert probe.returncode == 0, out
    found = json.loads(out)
    return found["times"], found["problems"]


def hit_line(name: str, run: Run, kind: str) -> str:
    times = [r.ttft for r in run.of("hit") if r.kind == kind]
    return f"| {name} | {kind} | {len(times)} | {ms(percentile(times, 0.5))} | {ms(percentile(times, 0.99))} |"


@pytest.mark.timeout(1800)
def test_gateway_latency(tmp_path_factory: pytest.TempPathFactory, demo_model: Path) -> None:
    # BENCH_LATENCY_ENV (a JSON object) adds settings, e.g. '{"LMC_EMBEDDING_BACKEND": "onnx-int8"}'.
    # A Redis of the stack's own, as `lmcluster up` starts it: on the request path, at its priority.
    redis_url = f"redis://127.0.0.1:{free_port()}"
    with product_stack(tmp_path_factory, "latency", demo_model, redis_url=redis_url, env_variable="BENCH_LATENCY_ENV") as stack:
        report(stack)


def report(stack: Stack) -> None:
    backend = stack.ready_backends(DEMO_MODEL_ID)[0]
    stack_url = f"{stack.base_url}/chat/completions"

    # 1. Miss overhead: in scopes with nothing cached (a new document), in scopes that hold other
    # questions' answers (no candidate), and beside a stored answer with the same words in another
    # order (a candidate that verification refuses).
    print(f"\n| idle, {MISS_PAIRS} misses each, alternating | TTFT p50 ms | TTFT p99 ms |")
    print("|---|---|---|")
    phases = (
        (0, "nothing cached in the scope", False),
        (1, "other answers cached in the scope", False),
        (2, "the same words cached in another order", True),
    )
    for wording, scopes, candidate in phases:
        if wording == 1:
            asyncio.run(seed_scopes(stack_url))
        through, bare, differences = asyncio.run(miss_pairs(stack_url, backend.endpoint, wording, candidate=candidate))
        progress(f"misses, {scopes}, done")
        for name, run in ((f"llama-server, straight ({scopes})", bare), (f"through Envoy and the Router ({scopes})", through)):
            ttft = [r.ttft for r in run.of()]
            print(f"| {name} | {ms(percentile(ttft, 0.5))} | {ms(percentile(ttft, 0.99))} |")
        print(
            f"| **overhead, {scopes}** (paired difference) | {ms(percentile(differences, 0.5))} "
            f"| {ms(percentile(differences, 0.99))} |"
        )
        assert not through.errors and not bare.errors, (through.errors[:2], bare.errors[:2])

    # 2. Exact hits, and semantic hits: a stored question's rewording with its closing phrase in front.
    hit = chat("You are terse.", "Name a large ocean.", max_tokens=8, stream=False)
    original = "How long do updates last with the Solo licence?"
    reworded = fronted(original)
    assert reworded is not None
    semantic = chat("You are terse.", reworded, max_tokens=8, stream=False, cache={"skip_store": True})
    with httpx.Client(timeout=TIMEOUT) as http:
        for stored in (hit, chat("You are terse.", original, max_tokens=8, stream=False)):
            first = http.post(stack_url, json=stored)
            assert first.status_code == 200, first.text
            deadline = time.monotonic() + 30
            while http.post(stack_url, json=stored).headers.get("x-lmc-cache") != "hit":
                assert time.monotonic() < deadline, "the answer was never stored"
                time.sleep(0.2)
        # An answer is an exact hit once complete; a rewording finds it once its vector is attached.
        deadline = time.monotonic() + 30
        while http.post(stack_url, json=semantic).headers.get("x-lmc-cache-kind") != "semantic":
            assert time.monotonic() < deadline, "the stored answer's vector was never attached"
            time.sleep(0.2)
    rows = {
        "REST unary through Envoy": asyncio.run(rest_hits(stack_url, hit)),
        "REST streamed through Envoy (TTFT)": asyncio.run(rest_hits(stack_url, {**hit, "stream": True})),
        "native gRPC through Envoy": grpc_hits(stack.grpc_target, hit),
        "native gRPC straight to the Router": grpc_hits(stack.router, hit),
        "REST unary through Envoy, semantic hits": asyncio.run(rest_hits(stack_url, semantic)),
    }
    progress("exact hits done")
    print(f"\n| idle, {HITS} sequential hits | p50 ms | p99 ms |")
    print("|---|---|---|")
    for name, times in rows.items():
        print(f"| {name} | {ms(percentile(times, 0.5))} | {ms(percentile(times, 0.99))} |")

    # 3. Hits beside misses, llama-server under each scheduling.
    runs: dict[str, Run] = {}
    verdicts: dict[str, Counter] = {}
    probes: dict[str, dict[str, list[float]]] = {}
    problems: dict[str, list[str]] = {}
    for name, policy, niceness in SCHEDULING:
        try:
            schedule(backend.pid, policy, niceness)
        except PermissionError:
            progress(f"llama-server at {name} skipped: it needs CAP_SYS_NICE")
            continue
        payloads = load_payloads(f"{name}-{time.monotonic_ns()}")
        time.sleep(REPORT_INTERVAL_SECONDS + 1)  # the Routers' counts of the phase before have arrived
        before = cache_counters(stack)
        probe = start_probe(stack, stack_url, hit, semantic)
        runs[name] = asyncio.run(closed_loop(stack_url, from_list(payloads), LOAD_CLIENTS, through_stack=True))
        probes[name], problems[name] = stop_probe(probe)
        time.sleep(REPORT_INTERVAL_SECONDS + 1)
        verdicts[name] = cache_counters(stack)
        verdicts[name].subtract(before)
        progress(f"load, llama-server at {name}: {runs[name].wall:.0f} s")
    print(f"\n| {LOAD_CLIENTS} clients, {LOAD_REQUESTS} requests | hit kind | n | TTFT p50 ms | TTFT p99 ms |")
    print("|---|---|---|---|---|")
    for name, run in runs.items():
        for kind in ("exact", "semantic"):
            print(hit_line(f"llama-server at {name}", run, kind))
    print(f"\n| beside the load, a client of its own (tests/bench/hit_probe.py) | hits | p50 ms | p99 ms |")
    print("|---|---|---|---|")
    for name, found in probes.items():
        for kind, times in found.items():
            print(f"| llama-server at {name}, {kind} | {len(times)} | {ms(percentile(times, 0.5))} | {ms(percentile(times, 0.99))} |")
    base = next(iter(runs.values()))
    print(f"\n| llama-server at | requests/s | vs {next(iter(runs))} | hits | misses TTFT p50 ms | errors |")
    print("|---|---|---|---|---|---|")
    for name, run in runs.items():
        misses = [r.ttft for r in run.of("miss")]
        print(
            f"| {name} | {run.rate:.2f} | {run.rate / base.rate:.2f}× | {len(run.of('hit'))} "
            f"| {ms(percentile(misses, 0.5))} | {len(run.errors)} |"
        )
    for name, counts in verdicts.items():
        print(f"Cache at {name}: {dict(+counts)}")
    for name, wrong in problems.items():
        misses = Counter(problem for problem in wrong if problem.startswith("miss: "))
        if misses:
            print(f"Probe at {name}: lookups past the Router's budget (misses): {dict(misses)}")
        wrong = [problem for problem in wrong if not problem.startswith("miss: ")]
        assert not wrong, f"{len(wrong)} probe replies were not the expected hit: {wrong[:3]}"
    for run in runs.values():
        assert not run.errors, run.errors[:3]
        assert len(run.results) == LOAD_REQUESTS

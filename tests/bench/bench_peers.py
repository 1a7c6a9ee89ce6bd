"""lmcluster side by side with the LiteLLM proxy, in front of the same llama-server.

Run: `make bench-peers` (set-up, LiteLLM's install (deploy/local/peers.sh), then this file; about
13 minutes on 2 cores; BENCH_PEERS_* make it smaller). Not part of `make test` nor of `make bench`.
It prints the tables of docs/benchmarks.md, "Side by side with LiteLLM", and asserts only
correctness (every request answered, zero errors), never time.

- One `lmcluster up` (tests/fixtures/stack.py `running_stack`) on the demo model with the product's
  defaults (bench_stack's PRODUCT_DEFAULTS: 4 slots of 4096 tokens) but one llama-server thread
  (BACKEND_THREADS; `LMC_SUPERVISOR_*` set in the shell wins) and the `redis_stack` fixture's Redis.
- The targets, all in front of the ONE llama-server the stack's Supervisor started (its endpoint
  from ListBackends): that llama-server itself ("bare"); lmcluster through Envoy; and the LiteLLM
  proxy (tests/bench/peers_litellm.py; one worker, its default) three ways, one after the other:
  no cache, its Redis exact cache, its redis-semantic cache at similarity 0.95 (lmcluster's default
  threshold) embedding with all-MiniLM-L6-v2 through lmcluster's own `/v1/embeddings`, the model
  lmcluster's semantic path uses. Both LiteLLM caches use the same Redis, in their own namespace
  or index.
- Every request: a streamed chat completion, max_tokens 16, temperature 0. TTFT is the first
  event carrying text (bench_stack's `send`); a hit is `x-lmc-cache: hit` for lmcluster and the
  presence of `x-litellm-cache-key` for LiteLLM.

Phases, per target:
1. misses: MISSES fresh questions to the target, alternating one by one with as many other fresh
   questions to the bare llama-server (order flipped every pair), after WARMUP of each; the two
   questions of a pair tokenize to as many tokens (llama-server's /tokenize). The
   questions ("What do a lantern, a walnut and a glacier have in common?", three nouns of which no
   two appear together in another question) are never asked twice in the whole run, so neither
   llama-server's prompt cache nor any answer cache helps, and no two are closer than 0.92 cosine
   (all-MiniLM-L6-v2, system message and question concatenated as LiteLLM embeds them: 0.90 at
   most), so the semantic caches miss too. Overhead: the median
   of the pairs' differences (target TTFT minus bare TTFT, asked back to back).
2. hits: the first HIT_QUESTIONS of those questions again, HIT_REPEATS times, one at a time:
   TTFT p50/p99 (for bare llama-server and LiteLLM without a cache: a repeated question answered by
   the model).
3. load: USERS clients, REQUESTS requests (each client sends its next one when the last is
   answered) of the RAG workload (tests/bench/stack_workload.py's documents and questions): 40%
   ask a question for the first time, 60% repeat one of POPULAR popular questions first asked at
   least USERS requests earlier, half word for word, half in one of its two rewordings. Every
   target gets the same sequence, with a system message of its own ("Session: <target>" before the
   document, so no target reuses another's prompt KV cache); each document's prompt is warmed on
   llama-server first. requests/s, hits, and hits that answered with another question's answer
   (the hit's text is not an answer the model gave this target for its own question, but one it
   gave for another), and how close LiteLLM's semantic cache finds the workload's questions
   (`close_pairs`).
4. more load rounds (LOAD_ROUNDS, 2 by default): the same load again for every target, in the
   reverse order of the round before (bare, lmcluster, LiteLLM ×3, then LiteLLM ×3, lmcluster,
   bare), each with a system message of its own again ("Session: <target> round <n>"), so no answer
   and no KV cache of an earlier round helps. Only their requests per second (and errors) are kept:
   one 45-second load per target swings with the machine's speed, which moves within minutes on
   these shared cores; the table's requests/s is the mean over the rounds.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import random
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from lmcluster.embedding.v1 import embedding_service_pb2, embedding_service_pb2_grpc

from tests.bench.bench_stack import (
    DIRECT_LIMITS,
    LIMITS,
    PRODUCT_DEFAULTS,
    TIMEOUT,
    Result,
    Run,
    body,
    counter,
    percentile,
    send,
    tokens,
)
from tests.bench.peers_litellm import (
    MASTER_KEY,
    litellm_binary,
    litellm_config,
    litellm_version,
    running_litellm,
)
from tests.bench.stack_workload import Ask, Question, questions
from tests.fixtures.stack import DEMO_MODEL_ID, Stack, link_demo_model, running_stack

MODEL = "smollm2-135m-instruct-q4_1"
MAX_TOKENS = 16
# Smaller values for a quick run while developing, e.g. BENCH_PEERS_MISSES=4 BENCH_PEERS_REQUESTS=40.
MISSES = int(os.environ.get("BENCH_PEERS_MISSES", "20"))
HIT_QUESTIONS = int(os.environ.get("BENCH_PEERS_HIT_QUESTIONS", "10"))
HIT_REPEATS = int(os.environ.get("BENCH_PEERS_HIT_REPEATS", "3"))
USERS = int(os.environ.get("BENCH_PEERS_USERS", "16"))
REQUESTS = int(os.environ.get("BENCH_PEERS_REQUESTS", "160"))
POPULAR = int(os.environ.get("BENCH_PEERS_POPULAR", "20"))
LOAD_ROUNDS = int(os.environ.get("BENCH_PEERS_LOAD_ROUNDS", "2"))
REPEAT_SHARE = 0.6
WARMUP = 3
THRESHOLD = 0.95  # lmcluster's default LMC_CACHE_THRESHOLD
SEED = 11
# One llama-server thread: on 2 shared cores, a llama-server on every core stalls whenever a gateway
# (or anything else) takes a core from it (docs/benchmarks.md, "The whole stack"), which would
# measure how much CPU each gateway takes from the model rather than the gateway. With one thread,
# the other core is the gateways' and the clients'.
BACKEND_THREADS = {"LMC_SUPERVISOR_THREADS": "1"}

MISS_SYSTEM = "You are a helpful assistant. Answer in one short sentence."
NOUNS = """
apple anchor badger balloon bicycle blanket bottle bridge candle canyon carpet castle cactus
chimney cloud compass copper crayon desert diamond dolphin drum eagle engine feather forest
fountain garden glacier guitar hammer harbor helmet island jacket jungle kettle ladder lantern
lemon library lighthouse magnet marble meadow mirror mountain needle ocean orchard otter paddle
parrot pencil pepper piano pillow planet pocket pumpkin puzzle quilt rabbit radio river rocket
saddle sailboat scarf shovel snail spider sponge stadium statue sunflower telescope tiger tractor
trumpet tunnel umbrella valley violin volcano wagon walnut whistle window wizard yacht zebra
""".split()  # noqa: SIM905


def fresh_questions(seed: int = SEED) -> Iterator[str]:
    """Questions on three nouns, no two nouns together in two questions (about 1,300 of them)."""
    rng = random.Random(seed)
    triples = list(itertools.combinations(NOUNS, 3))
    rng.shuffle(triples)
    pairs: set[tuple[str, str]] = set()
    for triple in triples:
        mine = set(itertools.combinations(triple, 2))
        if mine & pairs:
            continue
        pairs |= mine
        a, b, c = (("an " if noun[0] in "aeiou" else "a ") + noun for noun in triple)
        yield f"What do {a}, {b} and {c} have in common?"


def load_sequence(total: int, popular: int, gap: int, seed: int = SEED) -> list[Ask]:
    """The load phase's requests: `popular` questions asked first, then once-only questions and
    repeats of the popular ones (first asked at least `gap` requests earlier) mixed at random."""
    rng = random.Random(seed)
    bank = questions()
    by_document: dict[str, list[Question]] = defaultdict(list)
    for question in bank:
        by_document[question.document.name].append(question)
    new = round(total * (1 - REPEAT_SHARE))
    popular = min(popular, new)
    documents = list(by_document)
    chosen: list[Question] = []
    for index in range(popular):  # round robin over the documents
        pool = [q for q in by_document[documents[index % len(documents)]] if q not in chosen]
        chosen.append(rng.choice(pool))
    once = [q for q in bank if q not in chosen]
    rng.shuffle(once)
    if new - popular > len(once):
        raise ValueError(
            f"{total} requests need {new - popular} once-only questions; the workload has {len(once)}"
        )
    asks = [Ask(q, 0, repeat=False) for q in chosen]
    rest = ["once"] * (new - popular) + ["repeat"] * (total - new)
    rng.shuffle(rest)
    once_iter = iter(once)
    for kind in rest:
        if kind == "once":
            asks.append(Ask(next(once_iter), 0, repeat=False))
            continue
        position = len(asks)
        eligible = [q for i, q in enumerate(chosen) if i <= position - gap] or chosen[: max(1, position)]
        wording = 0 if rng.random() < 0.5 else rng.choice((1, 2))
        asks.append(Ask(rng.choice(eligible), wording, repeat=True))
    return asks


# --- one request, seen whole ----------------------------------------------------------------------


@dataclass
class Seen:
    headers: httpx.Headers
    body: bytearray


class _Tee(httpx.AsyncByteStream):
    def __init__(self, inner: httpx.AsyncByteStream, sink: bytearray) -> None:
        self._inner, self._sink = inner, sink

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._inner:
            self._sink.extend(chunk)
            yield chunk

    async def aclose(self) -> None:
        await self._inner.aclose()


class RecordingTransport(httpx.AsyncBaseTransport):
    """httpx's transport, keeping each response's headers and body for the task that sent it, so
    bench_stack's `send` (which keeps neither) can be used unchanged."""

    def __init__(self, limits: httpx.Limits) -> None:
        self._inner = httpx.AsyncHTTPTransport(limits=limits)
        self._seen: dict[asyncio.Task | None, Seen] = {}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self._inner.handle_async_request(request)
        seen = Seen(response.headers, bytearray())
        self._seen[asyncio.current_task()] = seen
        response.stream = _Tee(response.stream, seen.body)  # type: ignore[arg-type]
        return response

    def take(self) -> Seen | None:
        return self._seen.pop(asyncio.current_task(), None)

    async def aclose(self) -> None:
        await self._inner.aclose()


@dataclass
class Answer:
    result: Result
    text: str = ""
    kind: str = ""  # on a hit: "exact" or "semantic"


def answer_text(body_bytes: bytearray) -> str:
    parts = []
    for line in body_bytes.decode(errors="replace").splitlines():
        data = line[5:].strip() if line.startswith("data:") else ""
        if not data or data == "[DONE]":
            continue
        with contextlib.suppress(ValueError):
            for choice in json.loads(data).get("choices", []):
                parts.append((choice.get("delta") or {}).get("content") or "")
    return "".join(parts)


# --- targets ----------------------------------------------------------------------------------------


@dataclass
class Target:
    name: str
    slug: str
    kind: str  # "bare", "lmcluster", "litellm"
    url: str = ""  # its chat completions URL, set when it runs
    misses: list[Answer] = field(default_factory=list)
    bare_misses: list[Answer] = field(default_factory=list)  # the bare server's, alternating with these
    hits: list[Answer] = field(default_factory=list)
    load: Run = field(default_factory=Run)
    load_answers: list[Answer] = field(default_factory=list)
    reruns: list[Run] = field(default_factory=list)  # the later load rounds (requests/s and errors)

    @property
    def rate(self) -> float:
        """Requests per second over every load round."""
        rounds = [self.load, *self.reruns]
        return sum(run.rate for run in rounds) / len(rounds)

    def rate_cell(self) -> str:
        if not self.reruns:
            return f"{self.load.rate:.2f}"
        return f"{self.rate:.2f} ({', '.join(f'{run.rate:.2f}' for run in (self.load, *self.reruns))})"

    @property
    def headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {MASTER_KEY}"} if self.kind == "litellm" else {}

    def outcome(self, headers: httpx.Headers) -> tuple[str, str]:
        if self.kind == "bare":
            return "model", ""
        if self.kind == "lmcluster":
            return headers.get("x-lmc-cache", "?"), headers.get("x-lmc-cache-kind", "")
        if "x-litellm-cache-key" in headers:
            return "hit", "semantic" if "x-litellm-semantic-similarity" in headers else "exact"
        return "miss", ""

    @contextlib.asynccontextmanager
    async def client(self) -> AsyncIterator[tuple[httpx.AsyncClient, RecordingTransport]]:
        recorder = RecordingTransport(DIRECT_LIMITS if self.kind == "bare" else LIMITS)
        async with httpx.AsyncClient(transport=recorder, timeout=TIMEOUT, headers=self.headers) as http:
            yield http, recorder

    async def ask(self, http: httpx.AsyncClient, recorder: RecordingTransport, payload: dict) -> Answer:
        result = await send(http, self.url, payload, through_stack=False)
        seen = recorder.take()
        if seen is None:
            return Answer(result)
        if result.ok:
            result.cache, kind = self.outcome(seen.headers)
            return Answer(result, answer_text(seen.body), kind)
        return Answer(result)


def payload(system: str, question: str) -> dict:
    return {**body((system, question)), "max_tokens": MAX_TOKENS}


async def as_long(bare: Target, question: str, fresh: Iterator[str]) -> str:
    """The next fresh question of as many tokens as `question`: both sides of a miss pair then have
    the same prompt to evaluate (one token is about 8 ms on these cores)."""
    endpoint = bare.url.split("/v1/", 1)[0]
    async with httpx.AsyncClient(timeout=TIMEOUT) as http:
        wanted = await tokens(http, endpoint, question)
        for _ in range(100):
            other = next(fresh)
            if await tokens(http, endpoint, other) == wanted:
                return other
    raise AssertionError(f"no fresh question of {wanted} tokens")


async def miss_and_hit_phases(target: Target, bare: Target, fresh: Iterator[str]) -> None:
    async with target.client() as (http, recorder), bare.client() as (bare_http, bare_recorder):
        for _ in range(WARMUP):
            await bare.ask(bare_http, bare_recorder, payload(MISS_SYSTEM, next(fresh)))
            await target.ask(http, recorder, payload(MISS_SYSTEM, next(fresh)))
        asked = []
        for index in range(MISSES):
            question = next(fresh)
            mine, theirs = payload(MISS_SYSTEM, question), payload(MISS_SYSTEM, await as_long(bare, question, fresh))
            asked.append(mine)
            if index % 2:
                target.bare_misses.append(await bare.ask(bare_http, bare_recorder, theirs))
                target.misses.append(await target.ask(http, recorder, mine))
            else:
                target.misses.append(await target.ask(http, recorder, mine))
                target.bare_misses.append(await bare.ask(bare_http, bare_recorder, theirs))
        for _ in range(HIT_REPEATS):
            for again in asked[:HIT_QUESTIONS]:
                target.hits.append(await target.ask(http, recorder, again))


async def load_phase(target: Target, bare: Target, asks: list[Ask], round_number: int = 1) -> None:
    """The load; round 1 keeps every answer, later rounds only their Run (in `target.reruns`)."""
    system = f"Session: {target.slug}.\n" if round_number == 1 else f"Session: {target.slug} round {round_number}.\n"
    async with bare.client() as (http, recorder):  # each document's prompt, into llama-server's KV cache
        for question in {ask.question.document.name: ask.question for ask in asks}.values():
            warm = await bare.ask(
                http, recorder, payload(system + question.system, "Summarize the document.")
            )
            assert warm.result.ok, warm.result.error
    payloads = [payload(system + ask.question.system, ask.text) for ask in asks]
    answers = [Answer(Result(False, "", 0, 0, "not sent"))] * len(payloads)
    run = target.load if round_number == 1 else Run()
    pending = list(reversed(list(enumerate(payloads))))
    async with target.client() as (http, recorder):

        async def user() -> None:
            while pending:
                index, one = pending.pop()
                answer = await target.ask(http, recorder, one)
                answers[index] = answer
                run.results.append(answer.result)

        started = time.perf_counter()
        await asyncio.gather(*(user() for _ in range(USERS)))
        run.wall = time.perf_counter() - started
    if round_number == 1:
        target.load_answers = answers
    else:
        target.reruns.append(run)


def wrong_hits(target: Target, asks: list[Ask]) -> tuple[int, int, list[str]]:
    """Hits with another question's answer, hits whose text no model answer of this target had, and
    a few examples of the first kind."""
    answered: dict[int, set[str]] = defaultdict(set)
    for ask, answer in zip(asks, target.load_answers):
        if answer.result.ok and answer.result.cache != "hit":
            answered[ask.question.key].add(answer.text)
    wording = {ask.question.key: ask.question.wordings[0] for ask in asks}
    wrong, unknown, examples = 0, 0, []
    for ask, answer in zip(asks, target.load_answers):
        if answer.result.cache != "hit" or answer.text in answered[ask.question.key]:
            continue
        others = [key for key, texts in answered.items() if key != ask.question.key and answer.text in texts]
        if others:
            wrong += 1
            examples.append(
                f"asked {ask.text!r}, answered {answer.text!r} (the answer to {wording[others[0]]!r})"
            )
        else:
            unknown += 1
    return wrong, unknown, examples


def close_pairs(embeddings_url: str, system: str) -> tuple[int, int, int]:
    """How LiteLLM's semantic cache sees the load phase's questions: each request embedded as it
    embeds it (every message's text concatenated) by lmcluster's /v1/embeddings. Returns (pairs of
    different questions about one document at cosine >= THRESHOLD, such pairs, wordings whose nearest
    wording of another question is at >= THRESHOLD)."""
    bank = questions()
    texts = [system + question.system + wording for question in bank for wording in question.wordings]
    owners = [question for question in bank for _ in question.wordings]
    vectors = []
    with httpx.Client(timeout=60) as http:
        for first in range(0, len(texts), 32):
            reply = http.post(
                f"{embeddings_url}/embeddings",
                json={"model": "all-MiniLM-L6-v2", "input": texts[first : first + 32]},
            )
            reply.raise_for_status()
            vectors += [
                item["embedding"] for item in sorted(reply.json()["data"], key=lambda item: item["index"])
            ]
    matrix = np.asarray(vectors, dtype=np.float64)
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    similarity = matrix @ matrix.T
    close = pairs = 0
    near = 0
    for i, mine in enumerate(owners):
        best = max(similarity[i, j] for j, theirs in enumerate(owners) if theirs.key != mine.key)
        near += best >= THRESHOLD
        for j in range(i + 1, len(owners)):
            if owners[j].key != mine.key and owners[j].document is mine.document:
                pairs += 1
                close += similarity[i, j] >= THRESHOLD
    return close, pairs, near


def progress(what: str) -> None:
    print(f"[bench_peers {time.strftime('%H:%M:%S')}] {what}", flush=True)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f}"


def ttft(answers: list[Answer], fraction: float) -> float:
    return percentile([a.result.ttft for a in answers if a.result.ok], fraction)


# --- the benchmark ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def peers_stack(
    tmp_path_factory: pytest.TempPathFactory, redis_stack: str, demo_model: Path
) -> Iterator[Stack]:
    models = tmp_path_factory.mktemp("peers-models")
    link_demo_model(models, demo_model)
    shell = {k: v for k, v in os.environ.items() if k.startswith("LMC_SUPERVISOR_")}
    env = {**PRODUCT_DEFAULTS, **BACKEND_THREADS, **shell}
    with running_stack(
        tmp_path_factory.mktemp("peers-stack"), redis_url=redis_stack, models_dir=models, env=env
    ) as stack:
        yield stack


@pytest.mark.timeout(1800)
def test_lmcluster_and_litellm_side_by_side(peers_stack: Stack, redis_stack: str, tmp_path: Path) -> None:
    stack = peers_stack
    load_before, started = os.getloadavg()[0], time.monotonic()
    binary = litellm_binary()
    version = litellm_version(binary)
    backend = stack.ready_backends(DEMO_MODEL_ID)[0]
    backend_url = backend.endpoint
    tag = f"{int(time.time()):x}"
    fresh = fresh_questions()
    asks = load_sequence(REQUESTS, POPULAR, gap=USERS)

    bare = Target("bare llama-server", "bare", "bare", url=f"{backend_url}/v1/chat/completions")
    lmcluster = Target(
        "lmcluster (Envoy → Router → llama-server)",
        "lmcluster",
        "lmcluster",
        url=f"{stack.base_url}/chat/completions",
    )
    peers = [
        Target("LiteLLM, no cache", "litellm-none", "litellm"),
        Target("LiteLLM, Redis exact cache", "litellm-exact", "litellm"),
        Target("LiteLLM, redis-semantic cache (0.95)", "litellm-semantic", "litellm"),
    ]
    targets = [bare, lmcluster, *peers]

    # What LiteLLM's semantic cache pays per embedding: lmcluster's /v1/embeddings, one short text.
    embed_times = []
    with httpx.Client(timeout=30) as http:
        for index in range(25):
            started = time.perf_counter()
            reply = http.post(
                f"{stack.base_url}/embeddings",
                json={"model": "all-MiniLM-L6-v2", "input": f"A short question number {index}?"},
            )
            embed_times.append(time.perf_counter() - started)
            assert reply.status_code == 200, reply.text
    embed_p50 = percentile(embed_times[5:], 0.5)
    grpc_times = []
    with grpc.insecure_channel(stack.embedding) as channel:
        embedder = embedding_service_pb2_grpc.EmbeddingServiceStub(channel)
        for index in range(25):
            started = time.perf_counter()
            embedder.Embed(
                embedding_service_pb2.EmbedRequest(texts=[f"A short question number {index}?"]), timeout=30
            )
            grpc_times.append(time.perf_counter() - started)
    grpc_p50 = percentile(grpc_times[5:], 0.5)

    async def bare_alone() -> None:  # the bare server's own hit phase: repeated questions, no cache
        async with bare.client() as (http, recorder):
            asked = [payload(MISS_SYSTEM, next(fresh)) for _ in range(HIT_QUESTIONS)]
            for one in asked:
                bare.misses.append(await bare.ask(http, recorder, one))
            for _ in range(HIT_REPEATS):
                for one in asked:
                    bare.hits.append(await bare.ask(http, recorder, one))

    asyncio.run(bare_alone())
    asyncio.run(load_phase(bare, bare, asks))
    progress(f"bare llama-server: load {bare.load.wall:.0f} s")

    asyncio.run(miss_and_hit_phases(lmcluster, bare, fresh))
    coalesced_before = counter(stack, "lmc_router_coalesced_requests_total")
    asyncio.run(load_phase(lmcluster, bare, asks))
    coalesced = int(counter(stack, "lmc_router_coalesced_requests_total") - coalesced_before)
    progress(f"lmcluster: load {lmcluster.load.wall:.0f} s")

    caches = {"litellm-none": "none", "litellm-exact": "exact", "litellm-semantic": "semantic"}

    def peer_config(peer: Target, namespace: str) -> dict:
        return litellm_config(
            cache=caches[peer.slug],
            model=MODEL,
            backend_url=backend_url,
            redis_url=redis_stack,
            namespace=namespace,
            embeddings_url=stack.base_url,
            similarity_threshold=THRESHOLD,
        )

    configs = {}
    for peer in peers:
        config = peer_config(peer, f"litellm-bench-{caches[peer.slug]}-{tag}")
        configs[peer.slug] = config
        with running_litellm(binary, peer.slug, config, tmp_path) as url:
            peer.url = f"{url}/v1/chat/completions"
            asyncio.run(miss_and_hit_phases(peer, bare, fresh))
            asyncio.run(load_phase(peer, bare, asks))
        progress(f"{peer.name}: load {peer.load.wall:.0f} s")

    # Later load rounds, each in the reverse order of the one before: requests/s only.
    order = targets
    for round_number in range(2, LOAD_ROUNDS + 1):
        order = list(reversed(order))
        for target in order:
            if target.kind == "litellm":
                # Caches of their own: LiteLLM's semantic cache would serve round 1's answers to
                # round 2's questions, whose system message differs by a word.
                config = peer_config(target, f"litellm-bench-{target.slug}-{tag}-round{round_number}")
                with running_litellm(binary, f"{target.slug}-round{round_number}", config, tmp_path) as url:
                    target.url = f"{url}/v1/chat/completions"
                    asyncio.run(load_phase(target, bare, asks, round_number))
            else:
                asyncio.run(load_phase(target, bare, asks, round_number))
            progress(f"{target.name}: load round {round_number} {target.reruns[-1].wall:.0f} s")

    # --- report -----------------------------------------------------------------------------------
    repeats = sum(ask.repeat for ask in asks)
    reworded = sum(ask.repeat and ask.wording > 0 for ask in asks)
    all_bare_misses = bare.misses + [a for t in targets for a in t.bare_misses]
    print(
        f"\n\n{version}; {time.monotonic() - started:.0f} s; load average (1 min) {load_before:.1f} before, "
        f"{os.getloadavg()[0]:.1f} after, {os.cpu_count()} cores"
    )
    print(f"backend {backend_url}: {' '.join(backend.command[1:])}")
    print(f"LiteLLM config (semantic): {json.dumps(configs['litellm-semantic'])}")
    print(
        f"one short text embedded, p50: lmcluster's /v1/embeddings (what LiteLLM's semantic cache calls, twice per miss) "
        f"{embed_p50 * 1000:.1f} ms; the Embedding service's gRPC Embed (what lmcluster's Router calls) {grpc_p50 * 1000:.1f} ms"
    )
    print(
        f"misses: {MISSES} per target, alternating with the bare server; hits: {HIT_QUESTIONS} questions × {HIT_REPEATS}; "
        f"load: {USERS} clients, {REQUESTS} requests, {repeats} repeats of {min(POPULAR, REQUESTS - repeats)} popular questions "
        f"({reworded} reworded), max_tokens {MAX_TOKENS}, temperature 0, streamed\n"
    )
    print(
        "| target | miss TTFT p50 ms | miss overhead over bare, p50 of the paired differences, ms | hit TTFT p50 / p99 ms "
        f"| load requests/s{' (mean of rounds: each round)' if LOAD_ROUNDS > 1 else ''} | load hits "
        "| hits with another question's answer | errors |"
    )
    print("|---|---|---|---|---|---|---|---|")
    wrong_examples: list[str] = []
    for target in targets:
        answers = target.misses + target.bare_misses + target.hits + target.load_answers
        errors = sum(not a.result.ok for a in answers) + sum(not r.ok for run in target.reruns for r in run.results)
        load_hits = [a for a in target.load_answers if a.result.cache == "hit"]
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(Counter(a.kind for a in load_hits).items()))
        wrong, unknown, examples = wrong_hits(target, asks)
        wrong_examples += [f"{target.name}: {example}" for example in examples[:3]]
        if target is bare:
            miss = ms(ttft(all_bare_misses, 0.5))
            overhead = "(baseline)"
        else:
            misses = [a for a in target.misses if a.result.cache != "hit"]
            miss = ms(ttft(misses, 0.5))
            # The median of the pairs' differences (each pair asked back to back), as bench_latency
            # does: steadier than the difference of two medians while the machine's speed drifts.
            differences = [
                mine.result.ttft - theirs.result.ttft
                for mine, theirs in zip(target.misses, target.bare_misses, strict=True)
                if mine.result.ok and theirs.result.ok and mine.result.cache != "hit"
            ]
            delta = percentile(differences, 0.5)
            overhead = f"{delta * 1000:+.0f} (medians {ttft(misses, 0.5) / ttft(target.bare_misses, 0.5):.2f}×)"
        hits_cell = (
            "—"
            if target.kind == "bare" or target.slug == "litellm-none"
            else f"{len(load_hits)}" + (f" ({kinds})" if kinds else "")
        )
        if target is lmcluster and coalesced:
            # Repeats that arrived while their question was generating read that generation.
            hits_cell += f"; +{coalesced} joined a running generation"
        wrong_cell = "—" if hits_cell == "—" else f"{wrong}" + (f" (+{unknown} unmatched)" if unknown else "")
        print(
            f"| {target.name} | {miss} | {overhead} | {ms(ttft(target.hits, 0.5))} / {ms(ttft(target.hits, 0.99))} "
            f"| {target.rate_cell()} | {hits_cell} | {wrong_cell} | {errors} |"
        )

    print(
        "\nDetails:\n| target | miss phase: hits | hit phase: hits | load: generations "
        "| load TTFT p50 / p99 ms | load: hit TTFT p50 ms | load: miss TTFT p50 / p99 ms | load wall s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for target in targets:
        load_hits = [a for a in target.load_answers if a.result.ok and a.result.cache == "hit"]
        load_misses = [a for a in target.load_answers if a.result.ok and a.result.cache != "hit"]
        print(
            f"| {target.name} | {sum(a.result.cache == 'hit' for a in target.misses)} "
            f"| {sum(a.result.cache == 'hit' for a in target.hits)}/{len(target.hits)} "
            f"| {len(load_misses) - (coalesced if target is lmcluster else 0)} "
            f"| {ms(ttft(target.load_answers, 0.5))} / {ms(ttft(target.load_answers, 0.99))} "
            f"| {ms(ttft(load_hits, 0.5)) if load_hits else '—'} "
            f"| {ms(ttft(load_misses, 0.5))} / {ms(ttft(load_misses, 0.99))} | {target.load.wall:.1f} |"
        )
    print("\nHits with another question's answer, examples:")
    for example in wrong_examples:
        print(" ", example)
    close, pairs, near = close_pairs(stack.base_url, f"Session: {peers[2].slug}.\n")
    print(
        f"As LiteLLM's semantic cache embeds the load's requests (system message and question, concatenated): "
        f"{close} of {pairs} pairs of different questions about the same document at cosine >= {THRESHOLD} "
        f"({close / pairs:.0%}); {near} of {len(questions()) * 3} wordings have another question's wording at >= {THRESHOLD}"
    )
    failures = [
        a.result.error
        for t in targets
        for a in t.misses + t.bare_misses + t.hits + t.load_answers
        if not a.result.ok
    ] + [result.error for t in targets for run in t.reruns for result in run.results if not result.ok]
    for error in failures[:10]:
        print("  error:", error)

    assert not failures, failures[:3]
    for target in targets:
        assert len(target.load.results) == REQUESTS, target.name
        assert [len(run.results) for run in target.reruns] == [REQUESTS] * (LOAD_ROUNDS - 1), target.name
        assert all(a.result.ok for a in target.load_answers), target.name
        assert len(target.hits) == HIT_QUESTIONS * HIT_REPEATS, target.name
    assert all(a.text for t in targets for a in t.load_answers), "an answer without text"

"""`lmcluster bench`: load a running lmcluster (or any OpenAI-compatible server) and report.

Simulated users ask questions about a few documents; a share of them repeat or rephrase an
earlier question, as RAG traffic does. Every answer is streamed, so time to first token is
measured too. The report splits latency by the `x-lmc-cache` header (hit / miss / bypass).
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from dataclasses import dataclass, field

import httpx
from rich.console import Console
from rich.table import Table

DOCUMENTS = {
    "lease": "The tenant pays 1,200 EUR rent on the first day of each month. The deposit is two months' rent. "
    "Either party may end the lease with three months' notice. Pets need the landlord's written consent.",
    "refund": "Orders may be returned within 30 days of delivery for a full refund. Sale items are final. "
    "Refunds go back to the original payment method within 5 business days of receiving the item.",
    "server": "The build server runs nightly at 02:00 UTC. Failed builds page the on-call engineer. "
    "Artifacts are kept for 14 days; release artifacts are kept forever.",
}

# (question, paraphrase) per document: a repeat sends the question again or its paraphrase.
QUESTIONS = {
    "lease": [
        ("How much is the monthly rent?", "What is the rent per month?"),
        ("How large is the deposit?", "What is the size of the security deposit?"),
        ("How much notice is needed to end the lease?", "What notice period ends the lease?"),
        ("Can the tenant keep a dog?", "Is the tenant allowed to have a dog?"),
    ],
    "refund": [
        ("How long do I have to return an order?", "Within how many days can an order be returned?"),
        ("Can sale items be returned?", "Are sale items returnable?"),
        ("When will I get my refund?", "How soon is the refund paid back?"),
    ],
    "server": [
        ("When does the nightly build run?", "At what time does the nightly build start?"),
        ("Who is paged when a build fails?", "Who gets paged for a failed build?"),
        ("How long are artifacts kept?", "For how long are build artifacts retained?"),
    ],
}


@dataclass
class BenchResult:
    latencies: dict[str, list[float]] = field(default_factory=dict)
    first_tokens: dict[str, list[float]] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    completed: int = 0
    elapsed: float = 0.0

    def record(self, cache: str, latency: float, first_token: float) -> None:
        self.completed += 1
        self.latencies.setdefault(cache, []).append(latency)
        self.first_tokens.setdefault(cache, []).append(first_token)

    def error(self, what: str) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation; 0.0 for no values."""
    if not values:
        return 0.0
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[max(0, min(98, round(q) - 1))]


def request_body(rng: random.Random, model: str, repeat_share: float, max_tokens: int) -> dict[str, object]:
    """One user request: a known question (or its paraphrase) with `repeat_share`, else a fresh one."""
    document = rng.choice(list(DOCUMENTS))
    if rng.random() < repeat_share:
        question, paraphrase = rng.choice(QUESTIONS[document])
        text = rng.choice((question, paraphrase))
    else:
        text = f"In one sentence, what does this text say about item {rng.randrange(1_000_000)}?"
    return {
        "model": model,
        "stream": True,
        "max_tokens": max_tokens,
        "temperature": 0,
        "messages": [
            {"role": "system", "content": f"Answer from this document only.\n\n{DOCUMENTS[document]}"},
            {"role": "user", "content": text},
        ],
    }


async def _one(client: httpx.AsyncClient, body: dict[str, object], result: BenchResult) -> None:
    started = time.perf_counter()
    first_token = 0.0
    try:
        async with client.stream("POST", "/chat/completions", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                result.error(f"HTTP {response.status_code}")
                return
            cache = response.headers.get("x-lmc-cache", "none")
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    break
                event = json.loads(payload)
                if "error" in event:
                    result.error(str(event["error"].get("code") or "stream error"))
                    return
                if not first_token:
                    first_token = time.perf_counter() - started
    except httpx.HTTPError as error:
        result.error(type(error).__name__)
        return
    result.record(cache, time.perf_counter() - started, first_token)


async def run_bench(
    base_url: str,
    *,
    model: str,
    users: int,
    requests: int,
    repeat_share: float,
    max_tokens: int,
    api_key: str | None = None,
    seed: int = 7,
) -> BenchResult:
    """`requests` streamed chat completions from `users` concurrent users against `base_url` (…/v1)."""
    rng = random.Random(seed)
    bodies = [request_body(rng, model, repeat_share, max_tokens) for _ in range(requests)]
    queue: asyncio.Queue[dict[str, object]] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    result = BenchResult()
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=users, max_keepalive_connections=users)
    async with httpx.AsyncClient(base_url=base_url, headers=headers, limits=limits, timeout=300.0) as client:

        async def user() -> None:
            while not queue.empty():
                await _one(client, queue.get_nowait(), result)

        started = time.perf_counter()
        await asyncio.gather(*(user() for _ in range(users)))
        result.elapsed = time.perf_counter() - started
    return result


def report(result: BenchResult, console: Console) -> None:
    table = Table(header_style="bold")
    for column in ("x-lmc-cache", "requests", "p50 s", "p95 s", "p99 s", "p50 first token s"):
        table.add_column(column, justify="right")
    for cache, values in sorted(result.latencies.items()):
        table.add_row(
            cache, str(len(values)), f"{percentile(values, 50):.3f}", f"{percentile(values, 95):.3f}",
            f"{percentile(values, 99):.3f}", f"{percentile(result.first_tokens[cache], 50):.3f}",
        )  # fmt: skip
    console.print(table)
    hits = len(result.latencies.get("hit", []))
    rate = result.completed / result.elapsed if result.elapsed else 0.0
    share = hits / result.completed if result.completed else 0.0
    console.print(
        f"{result.completed} answered in {result.elapsed:.1f} s ({rate:.2f} requests/s), "
        f"{share:.0%} from the cache; errors: {sum(result.errors.values())} {result.errors or ''}",
        highlight=False,
    )

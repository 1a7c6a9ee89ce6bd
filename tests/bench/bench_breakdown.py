"""Where a request's milliseconds go, from its traces: each span's share of a hit and of a miss.

Run: `.venv/bin/python -m pytest tests/bench/bench_breakdown.py -s -o python_files='bench_*.py'`
(part of `make bench`; about two minutes on 2 cores). It prints the table of docs/benchmarks.md
("Where the milliseconds go") and asserts only that each request got the answer kind it was sent
for and that its trace arrived, never time.

One `lmcluster up` with the product's defaults, every part exporting every span to an in-memory
OTLP receiver (tests/observability/otlp_receiver.py) in the benchmark's process. Sequential requests
of three kinds, one kind per phase: exact hits, semantic hits (a stored question's rewording with its
closing phrase in front, each request with a question of its own) and misses with a candidate (an
answer with the same words, the roles exchanged, is stored: verification refuses it). For
every span name, the median and p90 of its duration over the phase's traces; the root is Envoy's
ingress span. Tracing itself costs a little on every span (docs/benchmarks.md, "Tracing"): the
shares are what count.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections import defaultdict
from pathlib import Path

import httpx
import pytest

from tests.bench.bench_latency import fronted
from tests.bench.bench_stack import PRODUCT_DEFAULTS, TIMEOUT, percentile
from tests.fixtures.stack import DEMO_MODEL_ID, running_stack, link_demo_model
from tests.observability.otlp_receiver import ReceivedSpan, running_otlp_receiver

REQUESTS = int(os.environ.get("BENCH_BREAKDOWN_REQUESTS", "60"))
SUBJECTS = (
    "the Solo licence", "the Team plan", "the backup service", "the mobile app", "the API quota",
    "the support desk", "the trial account", "the data export", "the audit log", "the billing portal",
)
ASKS = (
    "How long do updates last with {}?", "What does the price include for {}?", "Who can reset passwords in {}?",
    "When does the renewal happen for {}?", "Where are invoices kept for {}?", "Why is the limit lower on {}?",
)


def questions(count: int) -> list[tuple[str, str]]:
    """Distinct stored questions and their rewordings (closing phrase in front: the same words)."""
    pairs = []
    for ask in ASKS:
        for subject in SUBJECTS:
            question = ask.format(subject)
            reworded = fronted(question)
            if reworded is not None:
                pairs.append((question, reworded))
    assert len(pairs) >= count, f"only {len(pairs)} rewordings"
    return pairs[:count]


def exchanged(count: int) -> list[tuple[str, str]]:
    """Stored questions and the same words with the roles exchanged ("Is X older than Y?" / "Is Y
    older than X?"): a candidate the Router finds and verification refuses."""
    names = [subject.removeprefix("the ") for subject in SUBJECTS]
    pairs = [(f"Is {a} older than {b}?", f"Is {b} older than {a}?") for a, b in itertools.combinations(names, 2)]
    return pairs[:count]


def chat(question: str, **extra: object) -> dict:
    return {
        "model": DEMO_MODEL_ID,
        "messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": question}],
        "max_tokens": 4,
        **extra,
    }


def stored(http: httpx.Client, url: str, payload: dict) -> None:
    assert http.post(url, json=payload).status_code == 200
    deadline = time.monotonic() + 30
    while http.post(url, json=payload).headers.get("x-lmc-cache") != "hit":
        assert time.monotonic() < deadline, "the answer was never stored"
        time.sleep(0.2)


def traced(receiver, http: httpx.Client, url: str, payloads: list[dict], expected: str) -> list[list[ReceivedSpan]]:
    """Sends each payload once; returns each request's trace once all of it has arrived."""
    receiver.clear()
    for payload in payloads:
        reply = http.post(url, json=payload)
        assert reply.status_code == 200, reply.text
        got = reply.headers.get("x-lmc-cache-kind") or reply.headers.get("x-lmc-cache", "")
        assert got == expected, (payload, dict(reply.headers))
    time.sleep(3)  # the batch processors' last exports
    spans = receiver.spans()
    roots = sorted((s for s in spans if not s.parent_span_id), key=lambda s: s.start_ns)
    assert len(roots) >= len(payloads), f"{len(roots)} root spans for {len(payloads)} requests"
    by_trace = defaultdict(list)
    for span in spans:
        by_trace[span.trace_id].append(span)
    return [by_trace[root.trace_id] for root in roots[-len(payloads):]]


def table(name: str, traces: list[list[ReceivedSpan]]) -> None:
    durations: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    starts: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for trace in traces:
        start = min(span.start_ns for span in trace)
        for span in trace:
            key = (span.service, span.kind, span.name)
            durations[key].append(span.duration_s)
            starts[key].append((span.start_ns - start) / 1e9)
    print(f"\n| {name}: span ({len(traces)} traces) | n | starts at, p50 ms | p50 ms | p90 ms |")
    print("|---|---|---|---|---|")
    for key in sorted(durations, key=lambda k: percentile(starts[k], 0.5)):
        service, kind, span = key
        print(
            f"| {service}: {kind} {span} | {len(durations[key])} | {percentile(starts[key], 0.5) * 1000:.2f} "
            f"| {percentile(durations[key], 0.5) * 1000:.2f} | {percentile(durations[key], 0.9) * 1000:.2f} |"
        )


@pytest.mark.timeout(900)
def test_breakdown(tmp_path_factory: pytest.TempPathFactory, redis_stack: str, demo_model: Path) -> None:
    models = tmp_path_factory.mktemp("breakdown-models")
    link_demo_model(models, demo_model)
    with running_otlp_receiver() as receiver:
        env = {
            **PRODUCT_DEFAULTS,
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
            "OTEL_TRACES_SAMPLER": "parentbased_always_on",
            "OTEL_BSP_SCHEDULE_DELAY": "500",
            # BENCH_BREAKDOWN_ENV (a JSON object) adds settings, e.g. '{"LMC_ROUTER_OVERLAP_LOOKUP": "false"}'.
            **json.loads(os.environ.get("BENCH_BREAKDOWN_ENV", "{}")),
        }
        with running_stack(tmp_path_factory.mktemp("breakdown"), redis_url=redis_stack, models_dir=models, env=env) as stack:
            url = f"{stack.base_url}/chat/completions"
            pairs = questions(REQUESTS)
            with httpx.Client(timeout=TIMEOUT) as http:
                for question, _ in pairs:
                    stored(http, url, chat(question))
                exact = traced(receiver, http, url, [chat(q) for q, _ in pairs], "exact")
                semantic = traced(receiver, http, url, [chat(r, cache={"skip_store": True}) for _, r in pairs], "semantic")
                swapped = exchanged(REQUESTS // 2)
                for question, _ in swapped:
                    stored(http, url, chat(question))
                refused = traced(receiver, http, url, [chat(s, cache={"skip_store": True}) for _, s in swapped], "miss")
            table("exact hits", exact)
            table("semantic hits", semantic)
            table("misses with a same-word candidate that verification refuses", refused)

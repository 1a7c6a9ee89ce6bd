"""Where a request's milliseconds go, from its traces: each span's share of a hit and of a miss.

Run: `.venv/bin/python -m pytest tests/bench/bench_breakdown.py -s -o python_files='bench_*.py'`
(part of `make bench`; about a minute and a half on 2 cores). It prints the table of docs/benchmarks.md
("Where the milliseconds go") and asserts only that each request got the answer kind it was sent
for and that its trace arrived, never time.

One `lmcluster up` with the product's defaults, every part exporting every span to an in-memory
OTLP receiver (tests/observability/otlp_receiver.py) in the benchmark's process; each measured
request brings a `traceparent` of its own, by which its trace is found. Sequential requests of
three kinds, one kind per phase: exact hits, semantic hits (a stored question's rewording with its
closing phrase in front, each request with a question of its own) and misses with a candidate (an
answer with the same words, the roles exchanged, is stored: verification refuses it). Then the
semantic hits again, one every 50 ms, beside bench_latency's load (16 clients, first askings and
repeats, misses generating) from a process of its own, each asked `LOADED_ROUNDS` times. For every
span name, the median and p90 of its duration over the phase's traces; the root is Envoy's ingress
span. Then the slowest semantic hits beside the load, span by span: where a request of the tail waited. Tracing itself costs a
little on every span (docs/benchmarks.md, "Tracing"): the shares are what count.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import httpx
import pytest

from tests.bench.bench_latency import LOAD_CLIENTS, fronted, load_payloads
from tests.bench.bench_stack import TIMEOUT, closed_loop, from_list, percentile, product_stack
from tests.fixtures.parts import REPO_ROOT
from tests.fixtures.stack import DEMO_MODEL_ID
from tests.observability.conftest import new_span_id, new_trace_id, traceparent
from tests.observability.otlp_receiver import OtlpReceiver, ReceivedSpan, running_otlp_receiver

REQUESTS = int(os.environ.get("BENCH_BREAKDOWN_REQUESTS", "60"))
# Beside the load, each semantic hit is asked this many times (the tail needs more than 60).
LOADED_ROUNDS = int(os.environ.get("BENCH_BREAKDOWN_LOADED_ROUNDS", "3"))
SLOWEST = 6
NO_STORE = {"skip_store": True}
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


def stored(http: httpx.Client, url: str, payload: dict, reworded: dict | None = None) -> None:
    """Asks `payload` until it is a hit; with `reworded` (asking for no store), until that is a
    semantic hit too: an answer is an exact hit once complete, found by similarity once its vector
    is attached."""
    assert http.post(url, json=payload).status_code == 200
    deadline = time.monotonic() + 30
    while http.post(url, json=payload).headers.get("x-lmc-cache") != "hit":
        assert time.monotonic() < deadline, "the answer was never stored"
        time.sleep(0.2)
    while reworded is not None and http.post(url, json=reworded).headers.get("x-lmc-cache-kind") != "semantic":
        assert time.monotonic() < deadline, "the stored answer's vector was never attached"
        time.sleep(0.2)


def traced(receiver: OtlpReceiver, http: httpx.Client, url: str, payloads: list[dict], expected: str,
           *, gap: float = 0.0, strict: bool = True) -> list[list[ReceivedSpan]]:  # fmt: skip
    """Sends each payload once with a `traceparent` of its own;
    returns the trace of each request answered as `expected` once all of it has arrived. Not
    `strict` (beside the load, where a lookup may run past the Router's budget), other answers are
    counted and left out."""
    trace_ids, other = [], 0
    for payload in payloads:
        trace_id = new_trace_id()
        reply = http.post(url, json=payload, headers={"traceparent": traceparent(trace_id, new_span_id())})
        assert reply.status_code == 200, reply.text
        got = reply.headers.get("x-lmc-cache-kind") or reply.headers.get("x-lmc-cache", "")
        assert got == expected or not strict, (payload, dict(reply.headers))
        if got == expected:
            trace_ids.append(trace_id)
        else:
            other += 1
        time.sleep(gap)
    if other:
        print(f"\n{other} of {len(payloads)} requests were not answered as {expected} hits and are left out")
    wanted = set(trace_ids)
    # Envoy flushes every 5 s, the services every OTEL_BSP_SCHEDULE_DELAY.
    spans = receiver.wait_for(
        lambda spans: {s.trace_id for s in spans if s.service == "lmcluster-envoy"} >= wanted, 30, "every request's trace"
    )
    time.sleep(1)
    by_trace = defaultdict(list)
    for span in receiver.spans():
        if span.trace_id in wanted:
            by_trace[span.trace_id].append(span)
    return [by_trace[trace_id] for trace_id in trace_ids]


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


def slowest(traces: list[list[ReceivedSpan]], count: int) -> None:
    """The `count` slowest traces span by span (start after Envoy's ingress span starts, duration):
    where a request of the tail waited."""
    by_length = sorted(traces, key=lambda trace: max(s.start_ns + s.duration_s * 1e9 for s in trace) - min(s.start_ns for s in trace))
    for rank, trace in enumerate(reversed(by_length[-count:]), 1):
        start = min(span.start_ns for span in trace)
        end = max(span.start_ns + span.duration_s * 1e9 for span in trace)
        print(f"\nslowest beside the load #{rank}: {(end - start) / 1e6:.1f} ms")
        for span in sorted(trace, key=lambda s: s.start_ns):
            print(f"  {(span.start_ns - start) / 1e6:7.2f} +{span.duration_s * 1000:6.2f}  {span.service}: {span.kind} {span.name}")


@pytest.mark.timeout(900)
def test_breakdown(tmp_path_factory: pytest.TempPathFactory, redis_stack: str, demo_model: Path) -> None:
    with running_otlp_receiver() as receiver:
        tracing = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
            "OTEL_TRACES_SAMPLER": "parentbased_always_on",
            "OTEL_BSP_SCHEDULE_DELAY": "500",
        }
        # BENCH_BREAKDOWN_ENV (a JSON object) adds settings, e.g. '{"LMC_EMBEDDING_BACKEND": "onnx-int8"}'.
        with product_stack(
            tmp_path_factory, "breakdown", demo_model, redis_url=redis_stack, env=tracing, env_variable="BENCH_BREAKDOWN_ENV"
        ) as stack:
            url = f"{stack.base_url}/chat/completions"
            pairs = questions(REQUESTS)
            swapped = exchanged(REQUESTS // 2)
            with httpx.Client(timeout=TIMEOUT) as http:
                for question, reworded in pairs:
                    stored(http, url, chat(question), chat(reworded, cache=NO_STORE))
                for question, _ in swapped:
                    stored(http, url, chat(question))
                phases = {
                    "exact hits": traced(receiver, http, url, [chat(q) for q, _ in pairs], "exact"),
                    "semantic hits": traced(receiver, http, url, [chat(r, cache=NO_STORE) for _, r in pairs], "semantic"),
                    "misses with a same-word candidate that verification refuses": traced(
                        receiver, http, url, [chat(s, cache=NO_STORE) for _, s in swapped], "miss"
                    ),
                }
                # Beside the load: the semantic hits again, one every 50 ms while 16 clients run.
                load = subprocess.Popen([sys.executable, "-m", "tests.bench.bench_breakdown", url], cwd=REPO_ROOT)
                try:
                    time.sleep(5)  # the load's first misses are generating
                    loaded = traced(
                        receiver, http, url, [chat(r, cache=NO_STORE) for _, r in pairs] * LOADED_ROUNDS, "semantic",
                        gap=0.05, strict=False,
                    )
                    assert load.poll() is None, "the load ended before the measured requests did"
                finally:
                    load.terminate()
                    load.wait(30)
                phases[f"semantic hits beside the load ({LOAD_CLIENTS} clients, misses generating)"] = loaded
            for name, traces in phases.items():
                table(name, traces)
            slowest(loaded, SLOWEST)


def run_load(url: str) -> None:
    """bench_latency's load (first askings and repeats about four documents, 16-token answers) on
    LOAD_CLIENTS clients, over and over until terminated."""
    round_ = 0
    while True:
        round_ += 1
        payloads = load_payloads(f"breakdown-{os.getpid()}-{round_}")
        asyncio.run(closed_loop(url, from_list(payloads), LOAD_CLIENTS, through_stack=True))


if __name__ == "__main__":
    run_load(sys.argv[1])

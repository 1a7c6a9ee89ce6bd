"""One REST request through the whole product is ONE trace, from Envoy to the llama-server call.

`lmcluster up` runs with OTEL_EXPORTER_OTLP_ENDPOINT pointing at the test's OTLP receiver (what
Jaeger's port 4317 would get). A chat completion is sent through Envoy with a client `traceparent`;
the trace must then hold, with the right parents:

    client span (the test's)
    └─ Envoy ingress (SERVER) ─ Envoy → Router (CLIENT)
       └─ Router RouterService/CreateChatCompletion (SERVER)
          ├─ cache lookup ─ Router → Redis HMGET, FT.SEARCH (CLIENT)  (the exact entry and the
          │                 entries with the question's words, read and verified by the Router)
          ├─ backend choice
          ├─ chat MODEL (GenAI attributes) ─ POST to llama-server (aiohttp CLIENT)
          ├─ Router → Cache Store (CLIENT) ─ Cache Store (SERVER) ─ Redis        (a miss only: the
          │                 answer, found by its exact key from then on)
          ├─ Router → Embedding Embed (CLIENT) ─ Embedding Embed (SERVER)       (the store's vector)
          └─ Router → Cache Store (CLIENT) ─ Cache Store (SERVER) ─ Redis        (the vector attached)

On the same request again (a hit) the trace ends at the Router's Redis read: no Cache call, no
generation, no llama-server call.
"""

from __future__ import annotations

import time

import httpx
import pytest

from tests.fixtures.stack import DEMO_MODEL_ID, Stack
from tests.observability.conftest import new_span_id, new_trace_id, traceparent
from tests.observability.otlp_receiver import OtlpReceiver, ReceivedSpan, ancestors, describe_tree

pytestmark = pytest.mark.slow

TRACE_WAIT = 30.0  # Envoy flushes its spans every 5 s
ROUTER = "/lmcluster.router.v1.RouterService/CreateChatCompletion"
EMBED = "/lmcluster.embedding.v1.EmbeddingService/Embed"
LOOKUP = "/lmcluster.cache.v1.CacheService/Lookup"
STORE = "/lmcluster.cache.v1.CacheService/Store"


def _one(spans: list[ReceivedSpan], what: str, match: object) -> ReceivedSpan:
    found = [span for span in spans if match(span)]  # type: ignore[operator]
    assert len(found) == 1, f"expected one {what}, found {len(found)} in:\n{describe_tree(spans)}"
    return found[0]


def _named(service: str, kind: str, name: str) -> object:
    return lambda s: s.service == service and s.kind == kind and s.name == name


def _ask(stack: Stack, trace_id: str, client_span: str, question: str) -> httpx.Response:
    body = {
        "model": DEMO_MODEL_ID,
        "messages": [{"role": "user", "content": question}],
        "max_tokens": 8,
        "temperature": 0,
    }
    headers = {"traceparent": traceparent(trace_id, client_span)}
    reply = httpx.post(f"{stack.base_url}/chat/completions", json=body, headers=headers, timeout=120)
    assert reply.status_code == 200, reply.text
    return reply


def _complete(spans: list[ReceivedSpan], trace_id: str, client_span: str) -> bool:
    """Every span of the trace has arrived with its parent (spans leave each process in batches)."""
    trace = [s for s in spans if s.trace_id == trace_id]
    ids = {s.span_id for s in trace} | {client_span}
    return bool(trace) and all(s.parent_span_id in ids for s in trace)


def _assert_one_tree(spans: list[ReceivedSpan], trace_id: str, client_span: str) -> ReceivedSpan:
    """Every span of the trace hangs from Envoy's ingress span, which hangs from the client's span."""
    tree = describe_tree(spans)
    assert all(s.trace_id == trace_id for s in spans)
    ingress = _one(spans, "Envoy ingress span", lambda s: s.parent_span_id == client_span)
    assert (ingress.service, ingress.kind) == ("lmcluster-envoy", "SERVER"), tree
    for span in spans:
        if span is not ingress:
            assert ingress in ancestors(span, spans), f"{span} is not beneath Envoy's span:\n{tree}"
    return ingress


def _assert_no_prompt(spans: list[ReceivedSpan], question: str) -> None:
    for span in spans:
        for key, value in span.attributes.items():
            assert question not in str(value), f"prompt text in {span} attribute {key}"


def test_a_miss_then_a_hit_are_each_one_trace_through_every_service(
    traced_stack: Stack, stack_receiver: OtlpReceiver, unique: str
) -> None:
    question = f"Is blue darker than red, {unique}?"
    # First an answer with the same words in another order: the Router finds it among the entries
    # with the question's words and verification refuses it (the roles are exchanged).
    seed = f"Is red darker than blue, {unique}?"
    for _ in range(100):
        if _ask(traced_stack, new_trace_id(), new_span_id(), seed).headers["x-lmc-cache"] == "hit":
            break
        time.sleep(0.3)
    else:
        raise AssertionError("the seed answer was never stored")

    # --- a miss -----------------------------------------------------------------------------------
    miss_trace, miss_client = new_trace_id(), new_span_id()
    reply = _ask(traced_stack, miss_trace, miss_client, question)
    assert reply.headers["x-lmc-cache"] == "miss"
    spans = stack_receiver.wait_for(
        lambda spans: {"lmcluster-envoy", "lmcluster-router", "lmcluster-embedding", "lmcluster-cache"}
        <= {s.service for s in spans if s.trace_id == miss_trace}
        and sum(s.trace_id == miss_trace and s.name == STORE and s.kind == "SERVER" for s in spans) == 2
        and _complete(spans, miss_trace, miss_client),
        TRACE_WAIT,
        "the miss's spans from Envoy, Router, Embedding and Cache (both Stores included)",
    )
    trace = [s for s in spans if s.trace_id == miss_trace]
    tree = describe_tree(trace)
    ingress = _assert_one_tree(trace, miss_trace, miss_client)

    router = _one(trace, "Router server span", _named("lmcluster-router", "SERVER", ROUTER))
    assert ingress in ancestors(router, trace)
    assert ancestors(router, trace)[0].service == "lmcluster-envoy", tree  # Envoy's call to the Router

    lookup = _one(trace, "cache lookup span", _named("lmcluster-router", "INTERNAL", "cache lookup"))
    assert lookup.parent_span_id == router.span_id, tree
    assert lookup.attributes["lmc.cache.status"] == "miss"
    assert len(lookup.attributes["lmc.cache.scope_hash"]) == 64

    # The Router read the exact entry (HMGET), then the entries with the question's words (FT.SEARCH),
    # and verified the one it found itself: refused, with no embedding and no Cache call on the path.
    reads = sorted((s for s in trace if s.kind == "CLIENT" and s.parent_span_id == lookup.span_id), key=lambda s: s.start_ns)
    assert [s.name for s in reads] == ["HMGET", "redis.search"], tree
    assert lookup.attributes["lmc.cache.rejected_candidates"] == 1
    assert lookup.attributes["lmc.cache.rejection_reasons"] == ["ORDER"]
    assert not [s for s in trace if s.name == LOOKUP], tree

    # The vector the store needs is computed after the answer, beneath the request, not its lookup.
    embed_client = _one(trace, "Router's Embed call", _named("lmcluster-router", "CLIENT", EMBED))
    embed_server = _one(trace, "Embedding's Embed span", _named("lmcluster-embedding", "SERVER", EMBED))
    assert embed_client.parent_span_id == router.span_id and embed_server.parent_span_id == embed_client.span_id, tree

    choice = _one(trace, "backend choice span", _named("lmcluster-router", "INTERNAL", "backend choice"))
    assert router in ancestors(choice, trace), tree
    assert choice.attributes["lmc.backend.model"] == DEMO_MODEL_ID
    assert choice.attributes["lmc.backend.variant"] == "Q4_1"
    assert choice.attributes["lmc.backend.endpoint"].startswith("http://127.0.0.1:")
    assert choice.attributes["lmc.queue.depth"] >= 0

    generation = _one(trace, "generation span", _named("lmcluster-router", "CLIENT", f"chat {DEMO_MODEL_ID}"))
    assert router in ancestors(generation, trace), tree
    attributes = generation.attributes
    assert attributes["gen_ai.operation.name"] == "chat"
    assert attributes["gen_ai.request.model"] == DEMO_MODEL_ID
    assert attributes["gen_ai.usage.input_tokens"] > 0
    assert 0 < attributes["gen_ai.usage.output_tokens"] <= 8
    assert 0 < attributes["gen_ai.response.time_to_first_chunk"] < generation.duration_s + 1e-3
    assert attributes["gen_ai.request.max_tokens"] == 8

    llama_call = _one(trace, "llama-server call", lambda s: s.kind == "CLIENT" and s.parent_span_id == generation.span_id)
    url = str(llama_call.attributes.get("url.full") or llama_call.attributes.get("http.url"))
    assert url == choice.attributes["lmc.backend.endpoint"] + "/v1/chat/completions", llama_call.attributes
    assert llama_call.name.startswith("POST"), tree

    # The answer is stored by its exact key before its vector is computed; the vector is attached after.
    stores = sorted((s for s in trace if _named("lmcluster-cache", "SERVER", STORE)(s)), key=lambda s: s.start_ns)
    assert len(stores) == 2 and all(router in ancestors(store, trace) for store in stores), tree
    assert stores[0].start_ns < embed_client.start_ns and stores[1].start_ns >= embed_client.end_ns, tree
    _assert_no_prompt(trace, question)

    # --- the same question again: a hit ---------------------------------------------------------
    hit_trace, hit_client = new_trace_id(), new_span_id()
    reply = _ask(traced_stack, hit_trace, hit_client, question)
    assert reply.headers["x-lmc-cache"] == "hit"
    spans = stack_receiver.wait_for(
        lambda spans: any(
            s.trace_id == hit_trace and s.name == "cache lookup" and s.service == "lmcluster-router" for s in spans
        )
        and _complete(spans, hit_trace, hit_client),
        TRACE_WAIT,
        "the hit's spans from Envoy and the Router",
    )
    trace = [s for s in spans if s.trace_id == hit_trace]
    tree = describe_tree(trace)
    _assert_one_tree(trace, hit_trace, hit_client)
    router = _one(trace, "Router server span", _named("lmcluster-router", "SERVER", ROUTER))
    lookup = _one(trace, "cache lookup span", _named("lmcluster-router", "INTERNAL", "cache lookup"))
    assert lookup.parent_span_id == router.span_id, tree
    assert lookup.attributes["lmc.cache.status"] == "hit"
    assert lookup.attributes["lmc.cache.kind"] == "exact"
    assert lookup.attributes["lmc.cache.similarity"] == pytest.approx(1.0)
    # The Router read the exact entry from Redis itself: one HMGET under its lookup, no Cache call.
    read = _one(trace, "the hit's Redis read", lambda s: s.kind == "CLIENT" and s.parent_span_id == lookup.span_id)
    assert read.name == "HMGET", tree
    assert not [s for s in trace if s.service == "lmcluster-cache"], tree
    assert not [s for s in trace if s.name in ("backend choice", f"chat {DEMO_MODEL_ID}", STORE)], tree
    assert not [s for s in trace if s.kind == "CLIENT" and s.name.startswith("POST")], tree
    _assert_no_prompt(trace, question)

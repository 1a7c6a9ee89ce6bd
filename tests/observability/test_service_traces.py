"""One service at a time, traced by itself from the OTEL_* variables: the Cache and the Embedding.

Each runs as its own process (`lmcluster serve NAME`) exporting to the test's OTLP receiver. The
test plays the caller: it sends a W3C `traceparent` as gRPC metadata, as the Router's instrumented
client does, and checks that the service continued that trace with the right parents and told the
story in its spans (the `cache.lookup` span: hit, kind, similarity, rejections, scope hash), that
health checks and background Redis work make no spans, and that no prompt text leaves in a span.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from lmcluster.cache.v1 import cache_pb2, cache_service_pb2, cache_service_pb2_grpc
from lmcluster.embedding.v1 import embedding_service_pb2, embedding_service_pb2_grpc
from lmcluster.router.v1 import openai_pb2

from tests.observability.conftest import TracedService, new_span_id, new_trace_id, traceparent, traced_service
from tests.observability.otlp_receiver import OtlpReceiver, ReceivedSpan, ancestors, describe_tree

CACHE_SERVICE = "lmcluster.cache.v1.CacheService"
TRACE_WAIT = 20.0


@pytest.fixture
def traced_cache(
    receiver: OtlpReceiver, redis_stack: str, tmp_path: Path, unique: str
) -> Iterator[TracedService]:
    prefix = f"lmc-trace-test:{unique}"
    env = {"REDIS_URL": redis_stack, "LMC_CACHE_INDEX_PREFIX": prefix, "LMC_CACHE_LOOKUP_TIMEOUT_MS": "2000"}
    with traced_service("cache", tmp_path, otlp_endpoint=receiver.endpoint, env=env) as service:
        yield service
    with redis.Redis.from_url(redis_stack) as client:
        for name in client.execute_command("FT._LIST"):
            if name.decode().startswith(prefix):
                client.execute_command("FT.DROPINDEX", name, "DD")


def _unit_vector(seed: int) -> list[float]:
    vector = np.random.default_rng(seed).standard_normal(384)
    return (vector / np.linalg.norm(vector)).astype(np.float32).tolist()


def _answer(text: str) -> bytes:
    response = openai_pb2.CreateChatCompletionResponse(id="chatcmpl-1", object="chat.completion", model="m")
    choice = response.choices.add(index=0, finish_reason="stop")
    choice.message.role = "assistant"
    choice.message.content = text
    return response.SerializeToString()


def _call(trace_id: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    """A caller span id and the metadata that carries it."""
    caller = new_span_id()
    return caller, (("traceparent", traceparent(trace_id, caller)),)


def _server_span(spans: list[ReceivedSpan], method: str, caller: str) -> ReceivedSpan:
    matches = [s for s in spans if s.kind == "SERVER" and s.name == f"/{CACHE_SERVICE}/{method}" and s.parent_span_id == caller]
    assert len(matches) == 1, f"one {method} server span under {caller}, got:\n{describe_tree(spans)}"
    return matches[0]


def _lookup_span(spans: list[ReceivedSpan], server: ReceivedSpan) -> ReceivedSpan:
    matches = [s for s in spans if s.name == "cache.lookup" and s.parent_span_id == server.span_id]
    assert len(matches) == 1, f"one cache.lookup span under the Lookup span, got:\n{describe_tree(spans)}"
    return matches[0]


def test_cache_continues_the_callers_trace_and_tells_the_lookup(
    traced_cache: TracedService, receiver: OtlpReceiver, unique: str
) -> None:
    trace_id = new_trace_id()
    scope = hashlib.sha256(f"scope {unique}".encode()).hexdigest()
    stored_prompt = f"What is 12 plus 7, asks {unique}?"
    other_prompt = f"What is 13 plus 7, asks {unique}?"
    vector = _unit_vector(1)
    with grpc.insecure_channel(traced_cache.address) as channel:
        stub = cache_service_pb2_grpc.CacheServiceStub(channel)
        # Health checks are plumbing: never a span.
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)

        miss_caller, metadata = _call(trace_id)
        miss = stub.Lookup(
            cache_service_pb2.LookupRequest(scope=scope, exact_key=f"k-{unique}", embedding=vector, prompt=stored_prompt),
            metadata=metadata, timeout=10,
        )  # fmt: skip
        assert not miss.hit

        store_caller, metadata = _call(trace_id)
        stored = stub.Store(
            cache_service_pb2.StoreRequest(
                scope=scope, exact_key=f"k-{unique}", embedding=vector, prompt=stored_prompt,
                response=_answer("19"), response_type="lmcluster.router.v1.CreateChatCompletionResponse", model="m",
            ),
            metadata=metadata, timeout=10,
        )  # fmt: skip
        assert stored.stored, stored.reason

        exact_caller, metadata = _call(trace_id)
        exact = stub.Lookup(cache_service_pb2.LookupRequest(scope=scope, exact_key=f"k-{unique}"), metadata=metadata, timeout=10)
        assert exact.hit and exact.kind == cache_pb2.HIT_KIND_EXACT

        semantic_caller, metadata = _call(trace_id)
        semantic = stub.Lookup(
            cache_service_pb2.LookupRequest(scope=scope, embedding=vector, prompt=stored_prompt), metadata=metadata, timeout=10
        )
        assert semantic.hit and semantic.kind == cache_pb2.HIT_KIND_SEMANTIC

        # The same vector, another number: verification refuses the candidate.
        refused_caller, metadata = _call(trace_id)
        refused = stub.Lookup(
            cache_service_pb2.LookupRequest(scope=scope, embedding=vector, prompt=other_prompt), metadata=metadata, timeout=10
        )
        assert not refused.hit and [c.reason for c in refused.rejected] == [cache_pb2.REJECTION_REASON_NUMBER]

    callers = [miss_caller, store_caller, exact_caller, semantic_caller, refused_caller]
    spans = receiver.wait_for(
        lambda spans: {s.parent_span_id for s in spans if s.kind == "SERVER"} >= set(callers)
        and sum(s.name == "cache.lookup" for s in spans) >= 4,
        TRACE_WAIT,
        "a server span for each call and a cache.lookup span for each Lookup",
    )
    # Everything received belongs to the caller's trace: no health-check spans, no spans of the
    # index keeper's background Redis calls.
    assert {s.trace_id for s in spans} == {trace_id}, describe_tree(spans)
    assert {s.service for s in spans} == {"lmcluster-cache"}

    expectations = {
        miss_caller: {"lmc.cache.hit": False, "lmc.cache.kind": "none", "lmc.cache.semantic": True},
        exact_caller: {"lmc.cache.hit": True, "lmc.cache.kind": "exact", "lmc.cache.similarity": 1.0},
        semantic_caller: {"lmc.cache.hit": True, "lmc.cache.kind": "semantic"},
        refused_caller: {
            "lmc.cache.hit": False, "lmc.cache.rejected_candidates": 1, "lmc.cache.rejection_reasons": ["NUMBER"],
        },
    }  # fmt: skip
    for caller, expected in expectations.items():
        server = _server_span(spans, "Lookup", caller)
        assert server.attributes.get("rpc.grpc.status_code") == 0
        lookup = _lookup_span(spans, server)
        assert {key: lookup.attributes.get(key) for key in expected} == expected, lookup.attributes
        assert lookup.attributes["lmc.cache.scope_hash"] == scope
        assert lookup.attributes["lmc.cache.threshold"] == pytest.approx(0.95)
        # Redis commands are CLIENT spans beneath the lookup, their arguments replaced by `?`.
        redis_spans = [s for s in spans if s.kind == "CLIENT" and lookup in ancestors(s, spans)]
        assert redis_spans, describe_tree(spans)
        for span in redis_spans:
            statement = str(span.attributes.get("db.statement") or span.attributes.get("db.query.text") or "")
            assert statement and all(word == "?" for word in statement.split()[1:]), statement
    semantic_lookup = _lookup_span(spans, _server_span(spans, "Lookup", semantic_caller))
    assert semantic_lookup.attributes["lmc.cache.similarity"] == pytest.approx(1.0, abs=1e-4)
    assert any(s.name == "redis.search" for s in ancestors_free(spans, semantic_lookup))

    store = _server_span(spans, "Store", store_caller)
    assert any(s.kind == "CLIENT" and store in ancestors(s, spans) for s in spans), describe_tree(spans)

    # No prompt text in any span (LMC_TRACE_PROMPTS is off).
    for span in spans:
        for value in span.attributes.values():
            assert unique not in str(value), f"prompt text in {span}: {span.attributes}"


def ancestors_free(spans: list[ReceivedSpan], root: ReceivedSpan) -> list[ReceivedSpan]:
    """Every span beneath `root`."""
    return [s for s in spans if root in ancestors(s, spans)]


def test_trace_prompts_setting_puts_the_prompt_in_the_lookup_span(
    receiver: OtlpReceiver, redis_stack: str, tmp_path: Path, unique: str
) -> None:
    env = {"REDIS_URL": redis_stack, "LMC_CACHE_INDEX_PREFIX": f"lmc-trace-test:{unique}", "LMC_TRACE_PROMPTS": "true"}
    trace_id = new_trace_id()
    prompt = f"Which prompt is this, {unique}?"
    with traced_service("cache", tmp_path, otlp_endpoint=receiver.endpoint, env=env) as service:
        with grpc.insecure_channel(service.address) as channel:
            caller, metadata = _call(trace_id)
            cache_service_pb2_grpc.CacheServiceStub(channel).Lookup(
                cache_service_pb2.LookupRequest(scope="a-scope", embedding=_unit_vector(2), prompt=prompt),
                metadata=metadata, timeout=10,
            )  # fmt: skip
        spans = receiver.wait_for(lambda spans: any(s.name == "cache.lookup" for s in spans), TRACE_WAIT)
    lookup = next(s for s in spans if s.name == "cache.lookup")
    assert lookup.attributes["lmc.cache.prompt"] == prompt
    # A scope that is not a SHA-256 already is shown only as its hash.
    assert lookup.attributes["lmc.cache.scope_hash"] == hashlib.sha256(b"a-scope").hexdigest()
    with redis.Redis.from_url(redis_stack) as client:
        for name in client.execute_command("FT._LIST"):
            if name.decode().startswith(f"lmc-trace-test:{unique}"):
                client.execute_command("FT.DROPINDEX", name, "DD")


@pytest.mark.slow
def test_embedding_continues_the_callers_trace(receiver: OtlpReceiver, tmp_path: Path, unique: str) -> None:
    trace_id = new_trace_id()
    with traced_service("embedding", tmp_path, otlp_endpoint=receiver.endpoint) as service:
        with grpc.insecure_channel(service.address) as channel:
            caller, metadata = _call(trace_id)
            reply = embedding_service_pb2_grpc.EmbeddingServiceStub(channel).Embed(
                embedding_service_pb2.EmbedRequest(texts=[f"first text {unique}", "second"]), metadata=metadata, timeout=30
            )
            assert len(reply.embeddings) == 2
        spans = receiver.wait_for(lambda spans: any(s.parent_span_id == caller for s in spans), TRACE_WAIT)
    embed = next(s for s in spans if s.parent_span_id == caller)
    assert (embed.trace_id, embed.kind, embed.service) == (trace_id, "SERVER", "lmcluster-embedding")
    assert embed.name == "/lmcluster.embedding.v1.EmbeddingService/Embed"
    assert embed.attributes["lmc.embedding.texts"] == 2
    assert embed.attributes["rpc.grpc.status_code"] == 0
    for span in spans:
        assert all(unique not in str(value) for value in span.attributes.values())

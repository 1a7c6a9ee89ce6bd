"""CacheService over real gRPC on a real Redis Stack, with real all-MiniLM-L6-v2 embeddings."""

from __future__ import annotations

import asyncio
import math
import time

import grpc
import pytest
import redis
from google.protobuf.duration_pb2 import Duration
from google.protobuf.json_format import ParseDict
from grpc_health.v1 import health_pb2, health_pb2_grpc
from lmcluster.cache.v1 import cache_pb2
from lmcluster.cache.v1 import cache_service_pb2 as pb
from lmcluster.cache.v1 import cache_service_pb2_grpc as pb_grpc
from lmcluster.router.v1 import openai_pb2

from services.cache.index import SCHEMA_VERSION, IndexLayout
from services.cache.server import RunningCache
from services.common.cache_scope import cache_scope
from tests.cache.conftest import Embedder, cache_settings, cache_with_stub

CHAT_TYPE = openai_pb2.CreateChatCompletionResponse.DESCRIPTOR.full_name
Cache = tuple[RunningCache, pb_grpc.CacheServiceStub]


def chat_answer(text: str, finish_reason: str | None = "stop") -> bytes:
    choice: dict[str, object] = {"index": 0, "message": {"role": "assistant", "content": text}}
    if finish_reason is not None:
        choice["finish_reason"] = finish_reason
    response = ParseDict(
        {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "demo", "choices": [choice],
         "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}},
        openai_pb2.CreateChatCompletionResponse(),
    )  # fmt: skip
    return response.SerializeToString()


def chat_request(
    question: str, system: str = "You are a helpful assistant.", **extra: object
) -> pb.StoreRequest:
    return ParseDict(
        {"model": "demo", "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}],
         **extra},
        openai_pb2.CreateChatCompletionRequest(),
    )  # fmt: skip


async def store(stub: pb_grpc.CacheServiceStub, embed: Embedder, scope: str, prompt: str, answer: str,
                *, exact_key: str = "", ttl: float | None = None) -> pb.StoreResponse:  # fmt: skip
    request = pb.StoreRequest(
        scope=scope, embedding=embed(prompt), exact_key=exact_key, prompt=prompt, response=chat_answer(answer),
        response_type=CHAT_TYPE, model="demo",
    )  # fmt: skip
    if ttl is not None:
        request.ttl.FromNanoseconds(int(ttl * 1e9))
    reply = await stub.Store(request)
    assert reply.stored, reply.reason
    return reply


async def lookup(stub: pb_grpc.CacheServiceStub, embed: Embedder, scope: str, prompt: str,
                 **extra: object) -> pb.LookupResponse:  # fmt: skip
    return await stub.Lookup(pb.LookupRequest(scope=scope, embedding=embed(prompt), prompt=prompt, **extra))


def answer_text(reply: pb.LookupResponse) -> str:
    response = openai_pb2.CreateChatCompletionResponse()
    response.ParseFromString(reply.entry.response)
    return response.choices[0].message.content


async def test_health_is_serving_once_the_index_exists(cache: Cache) -> None:
    running, _ = cache
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_store_then_exact_lookup_round_trip(cache: Cache, embed: Embedder) -> None:
    _, stub = cache
    scoped = cache_scope(chat_request("What is the capital of France?"))
    stored = await store(stub, embed, scoped.scope, scoped.prompt, "Paris.", exact_key=scoped.exact_key)

    reply = await lookup(stub, embed, scoped.scope, scoped.prompt, exact_key=scoped.exact_key)
    assert reply.hit and reply.kind == cache_pb2.HIT_KIND_EXACT
    assert reply.similarity == 1.0
    assert reply.entry.entry_id == stored.entry_id
    assert reply.entry.scope == scoped.scope and reply.entry.exact_key == scoped.exact_key
    assert reply.entry.prompt == scoped.prompt
    assert reply.entry.response_type == CHAT_TYPE and reply.entry.model == "demo"
    assert answer_text(reply) == "Paris."
    assert reply.entry.ttl.seconds == 3600
    assert abs(reply.entry.created_at.ToSeconds() - time.time()) < 60
    assert reply.age.ToNanoseconds() >= 0
    assert not reply.degraded and not reply.rejected


async def test_exact_path_needs_no_embedding(cache: Cache, embed: Embedder) -> None:
    _, stub = cache
    scoped = cache_scope(chat_request("List three primary colors."))
    await store(stub, embed, scoped.scope, scoped.prompt, "Red, yellow, blue.", exact_key=scoped.exact_key)
    reply = await stub.Lookup(pb.LookupRequest(scope=scoped.scope, exact_key=scoped.exact_key))
    assert reply.hit and reply.kind == cache_pb2.HIT_KIND_EXACT
    # The same words with other whitespace at the ends are the same exact key.
    padded = cache_scope(chat_request("  List three primary colors.\n"))
    assert padded.exact_key == scoped.exact_key


async def test_a_verified_paraphrase_is_a_semantic_hit_with_its_similarity(cache: Cache, embed: Embedder) -> None:
    _, stub = cache
    scope = cache_scope(chat_request("x")).scope
    stored = await store(stub, embed, scope, "How do I reverse a string in Python?", "Use s[::-1].")
    reply = await lookup(stub, embed, scope, "In Python, how can I reverse a string?", threshold=0.85)
    assert reply.hit and reply.kind == cache_pb2.HIT_KIND_SEMANTIC, reply
    assert reply.entry.entry_id == stored.entry_id
    assert 0.85 <= reply.similarity < 1.0
    assert answer_text(reply) == "Use s[::-1]."
    # Close in meaning to the embedding, another question to the verifier: refused.
    other = await lookup(stub, embed, scope, "How can I reverse a string using Python?", threshold=0.85)
    assert not other.hit and other.rejected[0].reason == cache_pb2.REJECTION_REASON_UNEXPLAINED


async def test_near_verbatim_hits_by_exact_key_without_an_embedding(cache: Cache, embed: Embedder) -> None:
    _, stub = cache
    asked = cache_scope(chat_request("Can you explain what a mutex is?"))
    await store(stub, embed, asked.scope, asked.prompt, "A lock.", exact_key=asked.exact_key)
    for wording in ("explain what a mutex is", "Hi! Please explain what a mutex is.", "EXPLAIN WHAT A MUTEX IS?"):
        again = cache_scope(chat_request(wording))
        reply = await stub.Lookup(pb.LookupRequest(scope=again.scope, exact_key=again.exact_key))
        assert reply.hit and reply.kind == cache_pb2.HIT_KIND_EXACT, wording
    other = cache_scope(chat_request("Explain what a semaphore is."))
    assert not (await stub.Lookup(pb.LookupRequest(scope=other.scope, exact_key=other.exact_key))).hit


async def test_near_duplicates_with_another_meaning_are_rejected_with_a_reason(
    cache: Cache, embed: Embedder
) -> None:
    _, stub = cache
    scope = cache_scope(chat_request("x")).scope
    cases = [
        ("Convert 100 USD to EUR.", "Convert 100 EUR to USD.", cache_pb2.REJECTION_REASON_ORDER),
        ("Is the ticket refundable?", "Is the ticket not refundable?", cache_pb2.REJECTION_REASON_NEGATION),
        ("When does the sale start?", "When does the sale end?", cache_pb2.REJECTION_REASON_UNEXPLAINED),
        ("How much is 100 USD in EUR?", "How much is 200 USD in EUR?", cache_pb2.REJECTION_REASON_NUMBER),
    ]
    for stored_prompt, _, _ in cases:
        await store(stub, embed, scope, stored_prompt, f"answer to {stored_prompt}")
    for _, asked, reason in cases:
        reply = await lookup(stub, embed, scope, asked, threshold=0.85)
        assert not reply.hit, (asked, answer_text(reply))
        refused = [r for r in reply.rejected if r.reason == reason]
        assert refused, (asked, reply.rejected)
        assert refused[0].similarity >= 0.85 and refused[0].detail and refused[0].entry_id
    stats = await stub.GetStats(pb.GetStatsRequest())
    assert stats.rejected_candidates >= 4
    assert {"ORDER", "NEGATION", "UNEXPLAINED", "NUMBER"} <= set(stats.rejected_by_reason)


async def test_scope_isolation_other_system_prompt_or_document_is_a_miss(
    cache: Cache, embed: Embedder
) -> None:
    _, stub = cache
    question = "Summarize the attached policy in one sentence."
    base = cache_scope(chat_request(question))
    await store(stub, embed, base.scope, base.prompt, "Summary A.", exact_key=base.exact_key)

    other_system = cache_scope(chat_request(question, system="You are a pirate."))
    with_document = cache_scope(
        ParseDict(
            {"model": "demo", "messages": [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "Policy: refunds within 30 days."},
                {"role": "assistant", "content": "Noted."},
                {"role": "user", "content": question}]},
            openai_pb2.CreateChatCompletionRequest(),
        )
    )  # fmt: skip
    other_temperature = cache_scope(chat_request(question, temperature=1.5))
    for other in (other_system, with_document, other_temperature):
        assert other.scope != base.scope
        reply = await lookup(stub, embed, other.scope, other.prompt, exact_key=other.exact_key)
        assert not reply.hit and not reply.rejected
    again = await lookup(stub, embed, base.scope, base.prompt, exact_key=base.exact_key)
    assert again.hit


async def test_ttl_expiry(cache: Cache, embed: Embedder) -> None:
    _, stub = cache
    scope = cache_scope(chat_request("x")).scope
    prompt = "What is the boiling point of water at sea level?"
    await store(stub, embed, scope, prompt, "100 °C.", exact_key="k-ttl", ttl=1)
    first = await lookup(stub, embed, scope, prompt, exact_key="k-ttl")
    assert first.hit and first.entry.ttl.seconds == 1
    deadline = time.monotonic() + 15
    while True:
        reply = await lookup(stub, embed, scope, prompt, exact_key="k-ttl")
        if not reply.hit:
            break
        assert time.monotonic() < deadline, "entry outlived its 1 s TTL"
        await asyncio.sleep(0.2)
    assert not reply.degraded


async def test_ttl_is_bounded_by_the_service(redis_stack: str, cache_prefix: str, embed: Embedder) -> None:
    settings = cache_settings(redis_stack, cache_prefix, ttl=30, max_ttl=60)
    async with cache_with_stub(settings) as (_, stub):
        prompt = "Name a prime number."
        await store(stub, embed, "s", prompt, "7", exact_key="k", ttl=10_000)
        reply = await lookup(stub, embed, "s", prompt, exact_key="k")
        assert reply.entry.ttl.seconds == 60


async def test_threshold_override_is_bounded(cache: Cache, embed: Embedder) -> None:
    running, stub = cache
    scope = "threshold"
    await store(stub, embed, scope, "How do I bake sourdough bread?", "Slowly.")
    # A far-fetched question with a tiny threshold: raised to min_threshold, so no hit.
    reply = await lookup(stub, embed, scope, "How do I fix a leaking faucet?", threshold=0.0)
    assert not reply.hit
    assert running.servicer.settings.min_threshold > 0.5


async def test_incomplete_answers_are_never_stored(cache: Cache, embed: Embedder) -> None:
    _, stub = cache
    prompt = "Write a long poem about the sea."
    base = {
        "scope": "s",
        "embedding": embed(prompt),
        "prompt": prompt,
        "exact_key": "k",
        "response_type": CHAT_TYPE,
    }
    cut_off = await stub.Store(pb.StoreRequest(**base, response=chat_answer("The sea", finish_reason=None)))
    assert not cut_off.stored and "cut off" in cut_off.reason
    errored = await stub.Store(
        pb.StoreRequest(**base, response=chat_answer("The sea", finish_reason="error"))
    )
    assert not errored.stored
    chunk = await stub.Store(
        pb.StoreRequest(**{**base, "response_type": openai_pb2.CreateChatCompletionStreamResponse.DESCRIPTOR.full_name},
                        response=b"\x0a\x01x")
    )  # fmt: skip
    assert not chunk.stored and "assembled" in chunk.reason
    reply = await lookup(stub, embed, "s", prompt, exact_key="k")
    assert not reply.hit
    stats = await stub.GetStats(pb.GetStatsRequest())
    assert stats.stores_dropped == 3 and stats.stores == 0


async def test_answer_that_hit_max_tokens_is_stored_and_opaque_types_pass(
    cache: Cache, embed: Embedder
) -> None:
    _, stub = cache
    prompt = "Count to one hundred."
    reply = await stub.Store(
        pb.StoreRequest(
            scope="s",
            embedding=embed(prompt),
            prompt=prompt,
            exact_key="k",
            response=chat_answer("1, 2, 3", "length"),
            response_type=CHAT_TYPE,
        )
    )
    assert reply.stored
    opaque = await stub.Store(
        pb.StoreRequest(scope="s", exact_key="k2", response=b"\x00\x01", response_type="example.v1.Opaque")
    )
    assert opaque.stored
    hit = await stub.Lookup(pb.LookupRequest(scope="s", exact_key="k2"))
    assert hit.hit and hit.entry.response == b"\x00\x01" and hit.entry.response_type == "example.v1.Opaque"


async def test_storing_the_same_request_again_replaces_the_entry(cache: Cache, embed: Embedder) -> None:
    _, stub = cache
    prompt = "What is the tallest mountain?"
    first = await store(stub, embed, "s", prompt, "Everest.", exact_key="k")
    second = await store(stub, embed, "s", prompt, "Mount Everest.", exact_key="k")
    assert first.entry_id == second.entry_id
    reply = await lookup(stub, embed, "s", prompt, exact_key="k")
    assert answer_text(reply) == "Mount Everest."
    assert (await stub.GetStats(pb.GetStatsRequest())).entries == 1


async def test_invalidate_by_entry_scope_and_all(cache: Cache, embed: Embedder) -> None:
    _, stub = cache
    prompts = ["Who wrote Hamlet?", "Who painted the Mona Lisa?", "Who discovered penicillin?"]
    ids = {}
    for scope in ("a", "b"):
        for i, prompt in enumerate(prompts):
            ids[(scope, i)] = (await store(stub, embed, scope, prompt, "someone", exact_key=f"k{i}")).entry_id
    assert (await stub.GetStats(pb.GetStatsRequest())).entries == 6

    assert (await stub.Invalidate(pb.InvalidateRequest(entry_id=ids[("a", 0)]))).removed == 1
    assert not (await lookup(stub, embed, "a", prompts[0], exact_key="k0")).hit
    assert (await lookup(stub, embed, "a", prompts[1], exact_key="k1")).hit

    assert (await stub.Invalidate(pb.InvalidateRequest(scope="a"))).removed == 2
    assert not (await lookup(stub, embed, "a", prompts[1])).hit
    assert (await lookup(stub, embed, "b", prompts[1])).hit

    assert (await stub.Invalidate(pb.InvalidateRequest(all=True))).removed == 3
    assert (await stub.GetStats(pb.GetStatsRequest())).entries == 0
    assert (await stub.Invalidate(pb.InvalidateRequest(entry_id=ids[("b", 0)]))).removed == 0


async def test_stats_count_hits_misses_and_report_the_index(cache: Cache, embed: Embedder) -> None:
    running, stub = cache
    await store(stub, embed, "s", "How do I boil an egg?", "Ten minutes.", exact_key="egg")
    await lookup(stub, embed, "s", "How do I boil an egg?", exact_key="egg")  # exact
    await lookup(stub, embed, "s", "How do I boil an egg")  # semantic (no exact key)
    await lookup(stub, embed, "s", "What is the GDP of Norway?")  # miss
    stats = await stub.GetStats(pb.GetStatsRequest())
    assert (stats.exact_hits, stats.semantic_hits, stats.misses) == (1, 1, 1)
    assert math.isclose(stats.hit_ratio, 2 / 3)
    assert stats.entries == 1 and stats.stores == 1 and stats.stores_dropped == 0
    assert stats.index_memory_bytes > 0
    assert stats.redis_available and stats.degraded_lookups == 0
    assert stats.index_name == running.store.layout.name and running.store.layout.name.endswith(f":v{SCHEMA_VERSION}:d384")
    assert stats.threshold == pytest.approx(0.95)


async def _invalid(call: object) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await call  # type: ignore[misc]
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT, failure.value.details()
    return failure.value.details() or ""


async def test_malformed_requests_are_invalid_argument(cache: Cache, embed: Embedder) -> None:
    running, stub = cache
    settings = running.servicer.settings
    good = embed("Hello there")
    ok = {"scope": "s", "embedding": good, "prompt": "Hello there", "response": chat_answer("hi"),
          "response_type": CHAT_TYPE}  # fmt: skip

    assert "dimensions" in await _invalid(
        stub.Lookup(pb.LookupRequest(scope="s", embedding=good[:100], prompt="x"))
    )
    assert "dimensions" in await _invalid(stub.Store(pb.StoreRequest(**{**ok, "embedding": [*good, 0.1]})))
    nan = list(good)
    nan[3] = float("nan")
    assert "NaN" in await _invalid(stub.Lookup(pb.LookupRequest(scope="s", embedding=nan, prompt="x")))
    assert "NaN" in await _invalid(stub.Store(pb.StoreRequest(**{**ok, "embedding": nan})))
    inf = list(good)
    inf[0] = float("inf")
    await _invalid(stub.Lookup(pb.LookupRequest(scope="s", embedding=inf, prompt="x")))
    await _invalid(stub.Lookup(pb.LookupRequest(scope="s", embedding=[0.0] * 384, prompt="x")))
    assert "scope" in await _invalid(stub.Lookup(pb.LookupRequest(scope="", embedding=good, prompt="x")))
    assert "scope" in await _invalid(stub.Store(pb.StoreRequest(**{**ok, "scope": "  "})))
    huge_prompt = "word " * (settings.max_prompt_chars // 5 + 10)
    assert "prompt" in await _invalid(
        stub.Lookup(pb.LookupRequest(scope="s", embedding=good, prompt=huge_prompt))
    )
    assert "prompt" in await _invalid(stub.Store(pb.StoreRequest(**{**ok, "prompt": huge_prompt})))
    huge_response = b"x" * (settings.max_response_bytes + 1)
    assert "response" in await _invalid(stub.Store(pb.StoreRequest(**{**ok, "response": huge_response})))
    await _invalid(stub.Store(pb.StoreRequest(**{**ok, "response": b""})))
    await _invalid(stub.Store(pb.StoreRequest(**{**ok, "response_type": ""})))
    await _invalid(stub.Lookup(pb.LookupRequest(scope="s")))  # neither embedding nor exact key
    await _invalid(stub.Lookup(pb.LookupRequest(scope="s", embedding=good)))  # nothing to verify against
    await _invalid(stub.Lookup(pb.LookupRequest(scope="s", embedding=good, prompt="x", threshold=1.5)))
    await _invalid(
        stub.Lookup(pb.LookupRequest(scope="s", embedding=good, prompt="x", threshold=float("nan")))
    )
    await _invalid(stub.Store(pb.StoreRequest(**ok, ttl=Duration(seconds=-5))))
    await _invalid(stub.Invalidate(pb.InvalidateRequest()))
    await _invalid(stub.Invalidate(pb.InvalidateRequest(all=False)))
    await _invalid(stub.Invalidate(pb.InvalidateRequest(entry_id="../etc")))
    await _invalid(stub.Invalidate(pb.InvalidateRequest(scope="")))

    stats = await stub.GetStats(pb.GetStatsRequest())
    assert stats.entries == 0 and stats.stores == 0


async def test_index_is_created_on_an_empty_redis_and_reused_on_restart(
    redis_stack: str, cache_prefix: str, embed: Embedder
) -> None:
    settings = cache_settings(redis_stack, cache_prefix)
    name = IndexLayout(cache_prefix, 384).name
    with redis.Redis.from_url(redis_stack) as client:
        assert name.encode() not in client.execute_command("FT._LIST")

    async with cache_with_stub(settings) as (running, stub):
        with redis.Redis.from_url(redis_stack) as client:
            assert name.encode() in client.execute_command("FT._LIST")
        await store(stub, embed, "s", "What is the speed of light?", "About 300,000 km/s.", exact_key="k")
        assert await running.store.ensure_index() is False  # exists: reused, not recreated

    async with cache_with_stub(settings) as (running, stub):
        assert await running.store.ensure_index() is False
        stats = await stub.GetStats(pb.GetStatsRequest())
        assert stats.entries == 1 and stats.index_name == name
        reply = await lookup(stub, embed, "s", "what's the speed of light")
        assert reply.hit and reply.kind == cache_pb2.HIT_KIND_SEMANTIC

    with redis.Redis.from_url(redis_stack) as client:
        client.execute_command("FT.DROPINDEX", name, "DD")


async def test_an_index_with_another_schema_stops_the_start(redis_stack: str, cache_prefix: str) -> None:
    from services.cache.index import IndexSchemaError, ensure_index

    layout = IndexLayout(cache_prefix, 384)
    with redis.Redis.from_url(redis_stack) as client:
        client.execute_command(
            "FT.CREATE", layout.name, "ON", "HASH", "PREFIX", "1", layout.key_prefix, "SCHEMA",
            "scope_tag", "TAG", "vec", "VECTOR", "FLAT", "6", "TYPE", "FLOAT32", "DIM", "384", "DISTANCE_METRIC", "L2",
        )  # fmt: skip
    try:
        from redis.asyncio import Redis

        async with Redis.from_url(redis_stack, protocol=3) as client:
            with pytest.raises(IndexSchemaError, match="L2"):
                await ensure_index(client, layout)
    finally:
        with redis.Redis.from_url(redis_stack) as client:
            client.execute_command("FT.DROPINDEX", layout.name)


async def test_exact_only_entries_are_found_by_key_and_counted(cache: Cache) -> None:
    _, stub = cache
    reply = await stub.Store(pb.StoreRequest(scope="s", exact_key="only", response=chat_answer("x"),
                                             response_type=CHAT_TYPE))  # fmt: skip
    assert reply.stored
    assert (await stub.Lookup(pb.LookupRequest(scope="s", exact_key="only"))).hit
    assert (await stub.GetStats(pb.GetStatsRequest())).entries == 1


async def test_a_vector_attached_later_makes_an_exact_only_entry_a_semantic_hit(cache: Cache, embed: Embedder) -> None:
    _, stub = cache
    prompt = "How many moons does Mars have?"
    base = dict(scope="s", exact_key="mars", prompt=prompt, response=chat_answer("Two."), response_type=CHAT_TYPE)
    first = await stub.Store(pb.StoreRequest(**base, ttl=Duration(seconds=600)))
    assert first.stored
    reworded = "how many moons does Mars have"
    assert (await stub.Lookup(pb.LookupRequest(scope="s", exact_key="mars"))).hit
    assert not (await lookup(stub, embed, "s", reworded, threshold=0.85)).hit  # no vector yet: only its key finds it

    attached = await stub.Store(pb.StoreRequest(**base, embedding=embed(prompt), attach_embedding=True))
    assert attached.stored and attached.entry_id == first.entry_id
    found = await lookup(stub, embed, "s", reworded, threshold=0.85)
    assert found.hit and found.entry.entry_id == first.entry_id and answer_text(found) == "Two."
    assert found.entry.ttl.seconds == 600  # attaching keeps the entry's time to live
    stats = await stub.GetStats(pb.GetStatsRequest())
    assert stats.entries == 1 and stats.stores == 1


async def test_attaching_a_vector_never_brings_back_or_changes_an_entry(cache: Cache, embed: Embedder) -> None:
    _, stub = cache
    prompt = "What is the boiling point of water at sea level?"
    base = dict(scope="s", exact_key="water", prompt=prompt, response_type=CHAT_TYPE)
    vector = embed(prompt)
    entry = (await stub.Store(pb.StoreRequest(**base, response=chat_answer("100 °C.")))).entry_id
    # Another answer stored since (the request generated again): the old answer's vector is refused.
    await stub.Store(pb.StoreRequest(**base, response=chat_answer("212 °F.")))
    late = pb.StoreRequest(**base, response=chat_answer("100 °C."), embedding=vector, attach_embedding=True)
    refused = await stub.Store(late)
    assert not refused.stored and "gone or holds another answer" in refused.reason
    reworded = "what is the boiling point of water at sea level"
    assert not (await lookup(stub, embed, "s", reworded, threshold=0.85)).hit
    # Invalidated (reported wrong) before its vector came: it stays gone.
    await stub.Invalidate(pb.InvalidateRequest(entry_id=entry))
    assert not (await stub.Store(late)).stored
    assert not (await stub.Lookup(pb.LookupRequest(scope="s", exact_key="water"))).hit
    assert (await stub.GetStats(pb.GetStatsRequest())).entries == 0
    # Attaching needs both the vector and the key it goes to.
    no_vector = pb.StoreRequest(**base, response=chat_answer("x"), attach_embedding=True)
    assert "attach_embedding" in await _invalid(stub.Store(no_vector))
    no_key = pb.StoreRequest(**{**base, "exact_key": ""}, response=chat_answer("x"), embedding=vector,
                             attach_embedding=True)  # fmt: skip
    assert "attach_embedding" in await _invalid(stub.Store(no_key))


async def test_cli_prints_stats_and_clears(cache: Cache, embed: Embedder) -> None:
    from rich.console import Console

    from services.cache.cli import clear_cache, print_cache_stats

    running, stub = cache
    address = f"127.0.0.1:{running.port}"
    for scope in ("a", "b"):
        await store(stub, embed, scope, "What is the speed of sound?", "343 m/s.", exact_key="k")
    await lookup(stub, embed, "a", "What is the speed of sound?", exact_key="k")

    console = Console(record=True, width=100)
    assert await asyncio.to_thread(print_cache_stats, address, console=console) == 0
    text = console.export_text()
    assert "entries" in text and "exact hits" in text and running.store.layout.name in text

    console = Console(record=True, width=100)
    assert await asyncio.to_thread(clear_cache, address, "a", console=console) == 0
    assert "removed 1 cache entries of scope a" in console.export_text()
    assert await asyncio.to_thread(clear_cache, address, None, console=console) == 0
    assert "removed 1 cache entries in all scopes" in console.export_text()

    console = Console(record=True, width=100)
    assert await asyncio.to_thread(print_cache_stats, "127.0.0.1:1", console=console) == 1
    assert "cannot reach the Cache" in console.export_text()


async def test_the_exact_lookup_before_a_semantic_one_counts_only_its_hits(cache: Cache, embed: Embedder) -> None:
    _, stub = cache
    known = cache_scope(chat_request("What is a B-tree?"))
    await store(stub, embed, known.scope, known.prompt, "A balanced tree.", exact_key=known.exact_key)
    # A hit on the first lookup: one request, one exact hit.
    first = await stub.Lookup(pb.LookupRequest(scope=known.scope, exact_key=known.exact_key, semantic_follows=True))
    assert first.hit
    # A miss on the first lookup, then the semantic one: one request, one miss.
    new = cache_scope(chat_request("What is a trie?"))
    probe = await stub.Lookup(pb.LookupRequest(scope=new.scope, exact_key=new.exact_key, semantic_follows=True))
    assert not probe.hit
    second = await lookup(stub, embed, new.scope, new.prompt, exact_key=new.exact_key)
    assert not second.hit
    stats = await stub.GetStats(pb.GetStatsRequest())
    assert (stats.exact_hits, stats.semantic_hits, stats.misses) == (1, 0, 1)
    assert stats.hit_ratio == pytest.approx(0.5)
    # A miss that no entry could match: no semantic lookup follows, so the first one counts it.
    other = cache_scope(chat_request("What is a binary heap?"))
    alone = await stub.Lookup(
        pb.LookupRequest(scope=other.scope, exact_key=other.exact_key, prompt=other.prompt, semantic_follows=True)
    )
    assert not alone.hit and alone.no_candidate
    stats = await stub.GetStats(pb.GetStatsRequest())
    assert (stats.exact_hits, stats.semantic_hits, stats.misses) == (1, 0, 2)


async def test_an_exact_miss_says_whether_any_entry_could_pass_verification(cache: Cache, embed: Embedder) -> None:
    """The semantic lookup (and its embedding) is skipped when no entry of the scope has the
    prompt's words: an empty scope (a new document), or only other questions in it. A question that
    only moves the words of a stored one still needs it."""
    _, stub = cache
    system = "Answer from this document only: the X100 warranty covers the battery and the screen."
    stored = cache_scope(chat_request("Does the warranty cover the screen and the battery?", system=system))
    moved = cache_scope(chat_request("Does the warranty cover the battery and the screen?", system=system))
    fronted = cache_scope(chat_request("In safe mode, how do I reset the X100?", system=system))
    other = cache_scope(chat_request("Does the warranty cover the screen and the keyboard?", system=system))
    elsewhere = cache_scope(chat_request("Does the warranty cover the screen and the battery?", system="Another."))

    def probe(scope, prompt=None):  # type: ignore[no-untyped-def]
        prompt = scope.prompt if prompt is None else prompt
        return stub.Lookup(
            pb.LookupRequest(scope=scope.scope, exact_key=scope.exact_key, prompt=prompt, semantic_follows=True)
        )

    assert (await probe(stored)).no_candidate  # nothing stored yet
    await store(stub, embed, stored.scope, stored.prompt, "Yes.", exact_key=stored.exact_key)
    assert not (await probe(moved)).no_candidate  # the same words exchanged around "and": a candidate
    assert (await probe(other)).no_candidate  # one word differs: verification would refuse any entry
    assert (await probe(elsewhere)).no_candidate  # another document's scope is still empty
    await store(stub, embed, fronted.scope, "How do I reset the X100 in safe mode?", "Hold the button.", exact_key="k-fronted")
    assert not (await probe(fronted)).no_candidate  # a fronted phrase moved to the end: a candidate
    # A caller that sends no prompt learns only whether the scope holds anything.
    assert not (await probe(other, prompt="")).no_candidate
    assert (await probe(elsewhere, prompt="")).no_candidate
    # Only the lookup that a semantic one follows asks; a plain exact lookup never says it.
    plain = await stub.Lookup(pb.LookupRequest(scope=elsewhere.scope, exact_key=elsewhere.exact_key))
    assert not plain.hit and not plain.no_candidate


async def test_an_entry_reported_wrong_is_removed_and_counted(cache: Cache, embed: Embedder) -> None:
    _, stub = cache
    asked = cache_scope(chat_request("Who wrote Dracula?"))
    stored = await store(stub, embed, asked.scope, asked.prompt, "Mary Shelley.", exact_key=asked.exact_key)
    reply = await stub.Invalidate(pb.InvalidateRequest(entry_id=stored.entry_id, reported_wrong=True))
    assert reply.removed == 1
    assert not (await stub.Lookup(pb.LookupRequest(scope=asked.scope, exact_key=asked.exact_key))).hit
    again = await stub.Invalidate(pb.InvalidateRequest(entry_id=stored.entry_id, reported_wrong=True))
    assert again.removed == 0
    assert (await stub.GetStats(pb.GetStatsRequest())).wrong_answers_reported == 1


async def test_a_request_given_up_on_is_counted_once_as_a_miss(cache: Cache, embed: Embedder) -> None:
    _, stub = cache
    asked = cache_scope(chat_request("What is a heap?"))
    # Something in the scope, so that a semantic lookup should follow (then given up on).
    await store(stub, embed, asked.scope, "Is a heap a tree?", "Yes.", exact_key="other")
    probe = await stub.Lookup(pb.LookupRequest(scope=asked.scope, exact_key=asked.exact_key, semantic_follows=True))
    assert not probe.hit and not probe.no_candidate
    recorded = await stub.Lookup(pb.LookupRequest(scope=asked.scope, record_miss=True))
    assert not recorded.hit and not recorded.degraded
    stats = await stub.GetStats(pb.GetStatsRequest())
    assert (stats.exact_hits, stats.semantic_hits, stats.misses) == (0, 0, 1)

"""The Router's own reads of the index (services/router/index_reader.py) and its judging of
same-word candidates (services/router/candidates.py), against a real Cache service on the real Redis
Stack with real all-MiniLM-L6-v2 vectors: what it finds, that it agrees with the Cache's KNN lookup,
and that what it decides is counted where operators read it."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator

import grpc
import pytest
from lmcluster.cache.v1 import cache_pb2
from lmcluster.cache.v1 import cache_service_pb2 as pb

from services.common.cache_scope import cache_scope
from services.common.prompt_text import canonical_tokens
from services.router import candidates as judging
from services.router.index_reader import LIMIT, IndexReader
from tests.cache.conftest import Embedder
from tests.cache.test_cache_service import Cache, chat_request, store


@pytest.fixture
async def reader(cache: Cache) -> AsyncIterator[IndexReader]:
    running, stub = cache
    index = IndexReader(running.store.settings, stub)
    yield index
    await index.close()


async def test_an_exact_miss_reads_the_entries_with_the_prompts_words_and_their_vectors(
    cache: Cache, reader: IndexReader, embed: Embedder
) -> None:
    _, stub = cache
    system = "Answer from this document only: the X100 warranty covers the battery and the screen."
    stored = cache_scope(chat_request("Does the warranty cover the screen and the battery?", system=system))
    moved = cache_scope(chat_request("Does the warranty cover the battery and the screen?", system=system))
    reversed_roles = cache_scope(chat_request("Does the screen cover the warranty and the battery?", system=system))
    other = cache_scope(chat_request("Does the warranty cover the screen and the keyboard?", system=system))
    elsewhere = cache_scope(chat_request("Does the warranty cover the battery and the screen?", system="Another."))
    assert (await reader.lookup(stored, 2.0)).reply.no_candidate  # nothing stored yet
    reply = await store(stub, embed, stored.scope, stored.prompt, "Yes.", exact_key=stored.exact_key)

    exact = await reader.lookup(stored, 2.0)
    assert exact.reply.hit and exact.reply.kind == cache_pb2.HIT_KIND_EXACT and exact.reply.entry.entry_id == reply.entry_id

    found = await reader.lookup(moved, 2.0)
    assert not found.reply.hit and not found.reply.no_candidate
    assert [c.entry_id for c in found.candidates or []] == [reply.entry_id]
    candidate = found.candidates[0]  # type: ignore[index]
    assert candidate.prompt == stored.prompt and candidate.scope == stored.scope
    assert judging.similarity(embed(stored.prompt), candidate.vector) == pytest.approx(1.0, abs=1e-5)

    # The same words is all a read needs; verification then decides.
    assert [j.entry_id for j in judging.judge(moved.prompt, found.candidates or []).accepted] == [reply.entry_id]
    refused = judging.judge(reversed_roles.prompt, (await reader.lookup(reversed_roles, 2.0)).candidates or [])
    assert not refused.accepted and refused.rejected_by_reason() == {"ORDER": 1}

    # One word other, or another document: nothing could pass verification.
    for scope in (other, elsewhere):
        read = await reader.lookup(scope, 2.0)
        assert read.reply.no_candidate and read.candidates == []


async def test_the_routers_similarity_is_the_knn_lookups(cache: Cache, reader: IndexReader, embed: Embedder) -> None:
    """The Router compares a prompt's vector with the stored one as the index's cosine KNN does, so
    a threshold means the same on both paths."""
    _, stub = cache
    stored = cache_scope(chat_request("How do I freeze the top row in Excel?"))
    fronted = cache_scope(chat_request("In Excel, how do I freeze the top row?"))
    await store(stub, embed, stored.scope, stored.prompt, "View, Freeze Panes.", exact_key=stored.exact_key)
    knn = await stub.Lookup(pb.LookupRequest(scope=fronted.scope, embedding=embed(fronted.prompt), prompt=fronted.prompt))
    assert knn.hit and knn.kind == cache_pb2.HIT_KIND_SEMANTIC
    read = await reader.lookup(fronted, 2.0)
    judged = judging.judge(fronted.prompt, read.candidates or [])
    best = judging.closest(embed(fronted.prompt), judged.accepted, 0.0)
    assert best is not None and best[0].entry_id == knn.entry.entry_id
    assert best[1] == pytest.approx(knn.similarity, abs=1e-4)
    # Above the pair's similarity, no candidate answers.
    assert judging.closest(embed(fronted.prompt), judged.accepted, min(1.0, knn.similarity + 0.01)) is None


async def test_past_the_read_limit_the_knn_lookup_decides(cache: Cache, reader: IndexReader, embed: Embedder) -> None:
    _, stub = cache
    words = ["which", "cable", "fits", "the", "blue", "port", "here"]
    orderings: dict[tuple[str, ...], str] = {}
    for order in itertools.permutations(words):
        text = " ".join(order).capitalize() + "?"
        orderings.setdefault(canonical_tokens(text), text)
        if len(orderings) == LIMIT + 2:
            break
    prompts = list(orderings.values())
    asked = cache_scope(chat_request(prompts[-1]))
    for prompt in prompts[:LIMIT]:
        await store(stub, embed, asked.scope, prompt, "The grey one.", exact_key=f"k-{prompt}")
    within = await reader.lookup(asked, 2.0)
    assert within.candidates is not None and len(within.candidates) == LIMIT
    await store(stub, embed, asked.scope, prompts[LIMIT], "The grey one.", exact_key=f"k-{prompts[LIMIT]}")
    past = await reader.lookup(asked, 2.0)
    assert past.candidates is None and not past.reply.hit and not past.reply.no_candidate


async def test_what_the_router_decided_is_counted_by_the_cache(cache: Cache, reader: IndexReader) -> None:
    _, stub = cache
    before = await stub.GetStats(pb.GetStatsRequest())
    reader.count(semantic_hits=2, misses=1, rejected=judging.Judged([], [
        cache_pb2.RejectedCandidate(reason=cache_pb2.REJECTION_REASON_ORDER),
        cache_pb2.RejectedCandidate(reason=cache_pb2.REJECTION_REASON_NUMBER),
        cache_pb2.RejectedCandidate(reason=cache_pb2.REJECTION_REASON_ORDER),
    ]).rejected_by_reason())  # fmt: skip
    reader.count(exact_hits=1)
    await reader.report()
    stats = await stub.GetStats(pb.GetStatsRequest())
    assert stats.semantic_hits - before.semantic_hits == 2
    assert stats.exact_hits - before.exact_hits == 1 and stats.misses - before.misses == 1
    assert stats.rejected_by_reason["ORDER"] - before.rejected_by_reason["ORDER"] == 2
    assert stats.rejected_by_reason["NUMBER"] - before.rejected_by_reason["NUMBER"] == 1
    assert stats.hit_ratio == pytest.approx(
        (stats.exact_hits + stats.semantic_hits) / (stats.exact_hits + stats.semantic_hits + stats.misses)
    )
    # A report naming a reason the Cache does not know is refused, and nothing of it is counted.
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.RecordLookups(pb.RecordLookupsRequest(semantic_hits=5, rejected_by_reason={"MADE_UP": 1}))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "MADE_UP" in (refused.value.details() or "")
    assert (await stub.GetStats(pb.GetStatsRequest())).semantic_hits == stats.semantic_hits


def test_a_candidate_stored_without_a_vector_never_answers_semantically() -> None:
    from services.cache.store import WordCandidate

    bare = WordCandidate(entry_id="e1", scope="s", prompt="How do I freeze the top row in Excel?", vector=b"")
    judged = judging.judge("In Excel, how do I freeze the top row?", [bare])
    assert judged.accepted == [] and judged.rejected == []
    assert judging.similarity([1.0, 0.0], b"\x00\x00\x80\x3f") == -1.0  # another dimension: never close

"""How a miss's lookup and its generation meet, through Envoy on the session's `lmcluster up`.

After an exact miss, the Router reads the entries of the scope that share the prompt's words (the
only ones verification could accept) and verifies them itself: none, or all refused, is a miss
that goes straight to the model with no embedding on its path; an accepted one is compared with the
prompt's vector and answers as a semantic hit with no generation started at all. Only when more
same-word entries than the Router reads (`index_reader.LIMIT`) are cached does the Cache's KNN lookup
decide: the Router then starts the generation on a free slot while the embedding and the KNN lookup
run. A semantic miss streams that generation's tokens (one generation, no second); a semantic hit
answers from the cache and cancels it, freeing the slot. The client never sees a token of a
generation the cache overruled.
"""

from __future__ import annotations

import itertools

import httpx
import pytest

from services.cache.verification import match_keys
from services.common.prompt_text import canonical_tokens
from services.router.index_reader import LIMIT

from tests.fixtures.stack import DEMO_MODEL_ID, Stack
from tests.router.end_to_end_support import (
    chat_body,
    chat_text_of_events,
    client,
    metric,
    post_until_stored,
    sse_payloads,
    system_prompt,
    until,
)

OVERLAPPED = "lmc_router_overlapped_generations_total"
REFUSED = "lmc_cache_rejected_candidates_total"
LOOKUPS = "lmc_cache_lookups_total"


def backend_busy(stack: Stack) -> float:
    """Requests llama-server is working on, over the demo model's READY backends."""
    return sum(
        metric(backend.metrics_url, "llamacpp:requests_processing") for backend in stack.ready_backends(DEMO_MODEL_ID)
    )


def test_a_miss_no_cached_answer_could_match_runs_no_semantic_lookup(stack: Stack) -> None:
    """A new system prompt holds no cached answer, and a question with other words matches none of
    its scope's: either miss goes straight to the model (nothing to overlap). The answer is still
    stored with its vector (a reordered question is a semantic hit)."""
    router = stack.metrics["router"]
    before = metric(router, OVERLAPPED)
    system = system_prompt()
    original = chat_body("How do I sort a dictionary by value in Python?", system=system, max_tokens=24)
    other = chat_body("How do I sort a list of tuples in Python?", system=system, max_tokens=24)
    paraphrase = chat_body("In Python, how can I sort a dictionary by value?", system=system, max_tokens=24)
    with client(stack) as http:
        first = http.post("/v1/chat/completions", json=original)
        assert first.status_code == 200 and first.headers["x-lmc-cache"] == "miss", first.text
        assert metric(router, OVERLAPPED) == before
        post_until_stored(stack, http, "/v1/chat/completions", original)
        until(lambda: backend_busy(stack) == 0, 60, "idle backends")
        second = http.post("/v1/chat/completions", json=other)
        assert second.status_code == 200 and second.headers["x-lmc-cache"] == "miss", second.text
        assert metric(router, OVERLAPPED) == before
        semantic = http.post("/v1/chat/completions", json=paraphrase)
    assert semantic.headers["x-lmc-cache"] == "hit" and semantic.headers["x-lmc-cache-kind"] == "semantic"


def streamed_miss(stack: Stack, body: dict) -> None:
    """Streams `body` through Envoy: a miss whose tokens all arrive."""
    with client(stack) as http, http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["x-lmc-cache"] == "miss"
        payloads = sse_payloads(response.iter_lines())
    assert payloads[-1] == "[DONE]" and chat_text_of_events(payloads)


def assert_one_generation(stack: Stack, body: dict, prompts_before: float) -> None:
    """One generation for the request: its prompt was sent to a backend once since `prompts_before`."""
    sent = metric(stack.metrics["router"], "lmc_router_prompt_tokens_total") - prompts_before
    with client(stack) as http:
        unary = http.post("/v1/chat/completions", json={**body, "stream": False, "cache": {"skip_lookup": True}})
    assert unary.status_code == 200, unary.text
    assert sent == unary.json()["usage"]["prompt_tokens"]


def interactive_embeddings(stack: Stack) -> float:
    """Prompts embedded for a lookup (lookups wait on those), by the Router's copy or the Embedding service."""
    return metric(stack.metrics["router"], "lmc_router_lookup_embeddings_total")


def test_a_refused_reordering_is_a_miss_with_no_embedding_on_its_path(stack: Stack) -> None:
    router, cache = stack.metrics["router"], stack.metrics["cache"]
    system = system_prompt()
    # One answer in the scope with the same words as the question, in another order: a candidate
    # verification refuses (the roles are exchanged).
    with client(stack) as http:
        stored = chat_body("Is the sun hotter than the moon?", system=system, max_tokens=12)
        post_until_stored(stack, http, "/v1/chat/completions", stored)
        until(lambda: backend_busy(stack) == 0, 60, "idle backends")
    overlapped, prompts = metric(router, OVERLAPPED), metric(router, "lmc_router_prompt_tokens_total")
    embedded, refused = interactive_embeddings(stack), metric(cache, REFUSED, reason="ORDER")
    body = chat_body("Is the moon hotter than the sun?", system=system, max_tokens=12, stream=True)
    streamed_miss(stack, body)
    # Refused before any embedding: nothing was embedded for the lookup, no generation overlapped it.
    assert interactive_embeddings(stack) == embedded
    assert metric(router, OVERLAPPED) == overlapped
    # The refusal is counted where operators read it (the Router reports it to the Cache).
    until(lambda: metric(cache, REFUSED, reason="ORDER") == refused + 1, 10, "the refusal counted")
    assert_one_generation(stack, body, prompts)


def test_a_semantic_hit_starts_no_generation(stack: Stack) -> None:
    router, cache = stack.metrics["router"], stack.metrics["cache"]
    system = system_prompt()
    original = chat_body("How do I reverse a list in Python?", system=system, max_tokens=24)
    paraphrase = chat_body("In Python, how can I reverse a list?", system=system, max_tokens=24)
    with client(stack) as http:
        first = http.post("/v1/chat/completions", json=original)
        assert first.headers["x-lmc-cache"] == "miss", first.text
        post_until_stored(stack, http, "/v1/chat/completions", original)
        until(lambda: backend_busy(stack) == 0, 60, "idle backends")
        overlapped, prompts = metric(router, OVERLAPPED), metric(router, "lmc_router_prompt_tokens_total")
        embedded, hits = interactive_embeddings(stack), metric(cache, LOOKUPS, result="semantic")
        semantic = http.post("/v1/chat/completions", json=paraphrase)
    assert semantic.status_code == 200, semantic.text
    assert semantic.headers["x-lmc-cache"] == "hit" and semantic.headers["x-lmc-cache-kind"] == "semantic"
    assert 0.8 <= float(semantic.headers["x-lmc-similarity"]) <= 1.0
    assert semantic.json()["choices"][0]["message"]["content"] == first.json()["choices"][0]["message"]["content"]
    assert interactive_embeddings(stack) == embedded + 1  # the paraphrase's own vector, compared with the entry's
    assert metric(router, OVERLAPPED) == overlapped
    assert metric(router, "lmc_router_prompt_tokens_total") == prompts
    until(lambda: metric(cache, LOOKUPS, result="semantic") == hits + 1, 10, "the semantic hit counted")


def many_orderings(words: list[str], count: int) -> list[str]:
    """`count` questions with exactly `words`, in orders whose canonical forms all differ."""
    seen: set[tuple[str, ...]] = set()
    questions = []
    for order in itertools.permutations(words):
        question = " ".join(order).capitalize() + "?"
        tokens = canonical_tokens(question)
        if tokens not in seen:
            seen.add(tokens)
            questions.append(question)
        if len(questions) == count:
            return questions
    raise AssertionError(f"only {len(questions)} orderings")


@pytest.fixture(scope="module")
def crowded_scope(stack: Stack) -> tuple[str, str]:
    """A system prompt whose scope holds more answers with one question's words than the Router
    reads itself (their orderings), and that question's own answer: the Cache's KNN lookup decides there."""
    system = system_prompt()
    original = "How do I sort a list in Python?"
    orderings = [q for q in many_orderings(["python", "sort", "list", "how", "do", "I", "a", "in"], LIMIT + 4)
                 if canonical_tokens(q) != canonical_tokens(original)][:LIMIT + 2]  # fmt: skip
    assert all(set(match_keys(q)) & set(match_keys("In Python, how do I sort a list?")) for q in orderings)
    with client(stack) as http:
        for question in [*orderings, original]:
            post_until_stored(stack, http, "/v1/chat/completions", chat_body(question, system=system, max_tokens=2))
        until(lambda: backend_busy(stack) == 0, 60, "idle backends")
    return system, original


def test_past_the_read_limit_a_semantic_miss_streams_the_generation_started_during_its_lookup(
    stack: Stack, crowded_scope: tuple[str, str]
) -> None:
    router = stack.metrics["router"]
    system, _ = crowded_scope
    used, prompts = metric(router, OVERLAPPED, outcome="used"), metric(router, "lmc_router_prompt_tokens_total")
    # The same words again in an order no entry has: the KNN lookup runs, and verification refuses all.
    body = chat_body("Python in a list sort: how do I?", system=system, max_tokens=2, stream=True)
    streamed_miss(stack, body)
    assert metric(router, OVERLAPPED, outcome="used") == used + 1
    assert_one_generation(stack, body, prompts)


def test_past_the_read_limit_a_semantic_hit_cancels_the_generation_started_during_its_lookup(
    stack: Stack, crowded_scope: tuple[str, str]
) -> None:
    router = stack.metrics["router"]
    system, original = crowded_scope
    with client(stack) as http:
        first = http.post("/v1/chat/completions", json=chat_body(original, system=system, max_tokens=2))
        assert first.headers["x-lmc-cache-kind"] == "exact", first.headers
        dropped = metric(router, OVERLAPPED, outcome="dropped")
        semantic = http.post("/v1/chat/completions", json=chat_body("In Python, how do I sort a list?", system=system, max_tokens=2))
    assert semantic.status_code == 200, semantic.text
    assert semantic.headers["x-lmc-cache"] == "hit" and semantic.headers["x-lmc-cache-kind"] == "semantic"
    assert semantic.json()["choices"][0]["message"]["content"] == first.json()["choices"][0]["message"]["content"]
    assert metric(router, OVERLAPPED, outcome="dropped") == dropped + 1
    # The cancelled generation does not run on for nobody: llama-server's slots come free.
    until(lambda: backend_busy(stack) == 0, 30, "the cancelled generation's slot freed")

"""A miss's generation overlaps its semantic lookup, through Envoy on the session's `lmcluster up`.

After an exact miss that a cached answer of its scope could match (one with the same words, in
another order), the Router starts the generation on a free slot while the embedding and the KNN
lookup run; a miss that none could match skips that lookup. A semantic miss then streams that
generation's tokens (one generation, no second);
a semantic hit answers from the cache and cancels it, freeing the slot. The client never sees a
token of a generation the cache overruled.
"""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.fixtures.stack import DEMO_MODEL_ID, Stack
from tests.router.end_to_end_support import (
    chat_body,
    chat_text_of_events,
    client,
    post_until_hit,
    sse_payloads,
    system_prompt,
    until,
)

OVERLAPPED = "lmc_router_overlapped_generations_total"


def metric(url: str, name: str, **labels: str) -> float:
    text = httpx.get(url, timeout=10.0).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


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
        post_until_hit(http, "/v1/chat/completions", original)  # stored
        until(lambda: backend_busy(stack) == 0, 60, "idle backends")
        second = http.post("/v1/chat/completions", json=other)
        assert second.status_code == 200 and second.headers["x-lmc-cache"] == "miss", second.text
        assert metric(router, OVERLAPPED) == before
        semantic = http.post("/v1/chat/completions", json=paraphrase)
    assert semantic.headers["x-lmc-cache"] == "hit" and semantic.headers["x-lmc-cache-kind"] == "semantic"


def test_a_semantic_miss_streams_the_generation_started_during_its_lookup(stack: Stack) -> None:
    router = stack.metrics["router"]
    system = system_prompt()
    # One answer in the scope with the same words as the question, in another order: a candidate
    # the semantic lookup finds and verification refuses (the roles are exchanged).
    with client(stack) as http:
        stored = chat_body("Is the sun hotter than the moon?", system=system, max_tokens=12)
        post_until_hit(http, "/v1/chat/completions", stored)
        until(lambda: backend_busy(stack) == 0, 60, "idle backends")
    used, prompts = metric(router, OVERLAPPED, outcome="used"), metric(router, "lmc_router_prompt_tokens_total")
    body = chat_body("Is the moon hotter than the sun?", system=system, max_tokens=12, stream=True)
    with client(stack) as http, http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["x-lmc-cache"] == "miss"
        payloads = sse_payloads(response.iter_lines())
    assert payloads[-1] == "[DONE]" and chat_text_of_events(payloads)
    assert metric(router, OVERLAPPED, outcome="used") == used + 1
    # One generation for the request: its prompt was sent to a backend once.
    sent = metric(router, "lmc_router_prompt_tokens_total") - prompts
    with client(stack) as http:
        unary = http.post("/v1/chat/completions", json={**body, "stream": False, "cache": {"skip_lookup": True}})
    assert unary.status_code == 200, unary.text
    assert sent == unary.json()["usage"]["prompt_tokens"]


def test_a_semantic_hit_cancels_the_generation_started_during_its_lookup(stack: Stack) -> None:
    router = stack.metrics["router"]
    system = system_prompt()
    original = chat_body("How do I reverse a list in Python?", system=system, max_tokens=24)
    paraphrase = chat_body("In Python, how can I reverse a list?", system=system, max_tokens=24)
    with client(stack) as http:
        first = http.post("/v1/chat/completions", json=original)
        assert first.headers["x-lmc-cache"] == "miss", first.text
        post_until_hit(http, "/v1/chat/completions", original)  # stored
        until(lambda: backend_busy(stack) == 0, 60, "idle backends")
        dropped = metric(router, OVERLAPPED, outcome="dropped")
        semantic = http.post("/v1/chat/completions", json=paraphrase)
    assert semantic.status_code == 200, semantic.text
    assert semantic.headers["x-lmc-cache"] == "hit" and semantic.headers["x-lmc-cache-kind"] == "semantic"
    assert semantic.json()["choices"][0]["message"]["content"] == first.json()["choices"][0]["message"]["content"]
    assert metric(router, OVERLAPPED, outcome="dropped") == dropped + 1
    # The cancelled generation does not run on for nobody: llama-server's slots come free.
    until(lambda: backend_busy(stack) == 0, 30, "the cancelled generation's slot freed")

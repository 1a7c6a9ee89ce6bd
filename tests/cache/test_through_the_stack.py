"""The cache through the whole product (Envoy, Router, Embedding, Cache, Redis Stack, llama-server):
counters that match what clients saw, reporting a wrong answer, tenants, and a model file swap."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from lmcluster.cache.v1 import cache_service_pb2, cache_service_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from tests.cache.test_quality import Pair, load_pairs
from tests.chaos.faults import part_pid, paused
from tests.fixtures.parts import REPO_ROOT
from tests.fixtures.stack import DEMO_FILE, DEMO_PUBLISHER, DEMO_REPO, Stack, running_stack
from tests.fixtures.threads import threads_under
from tests.router.end_to_end_support import (
    HTTP_TIMEOUT,
    assert_openai_error,
    chat_body,
    client,
    metric,
    post_until_hit,
    post_until_stored,
    system_prompt,
    until,
)

KEYS = ("sk-lmc-tenant-one", "sk-lmc-tenant-two")
STORES = "lmc_cache_stores_total"
LOOKUP_EMBEDDINGS = "lmc_router_lookup_embeddings_total"
SWAP_WAIT = 180.0


def cache_stats(stack: Stack) -> cache_service_pb2.GetStatsResponse:
    with grpc.insecure_channel(stack.cache) as channel:
        return cache_service_pb2_grpc.CacheServiceStub(channel).GetStats(cache_service_pb2.GetStatsRequest(), timeout=10)


def test_the_cache_counts_one_lookup_per_request_as_clients_saw_it(stack: Stack) -> None:
    system = system_prompt()
    seen: Counter[str] = Counter()

    def ask(http: httpx.Client, question: str, **extra: object) -> httpx.Response:
        response = http.post("/v1/chat/completions", json=chat_body(question, system=system, **extra))
        assert response.status_code == 200, response.text
        status = response.headers["x-lmc-cache"]
        seen[status if status != "hit" else response.headers["x-lmc-cache-kind"]] += 1
        return response

    before = cache_stats(stack)
    with client(stack) as http:
        ask(http, "What is the capital of Peru?")
        until(lambda: ask(http, "What is the capital of Peru?").headers["x-lmc-cache"] == "hit", 30, "stored answer")
        ask(http, "what is the capital of peru")
        ask(http, "Hi! What's the capital of Peru? Thanks.")
        ask(http, "What is the capital of Chile?")
        ask(http, "Who did Acme sue?")
        ask(http, "Who sued Acme?")
        ask(http, "What is the capital of Peru?", cache={"skip_lookup": True})
    assert seen["exact"] >= 3 and seen["miss"] >= 4 and seen["bypass"] == 1, seen

    def counted() -> tuple[int, int, int]:
        after = cache_stats(stack)
        return (
            after.exact_hits - before.exact_hits,
            after.semantic_hits - before.semantic_hits,
            after.misses - before.misses,
        )

    # The Router reports the lookups it answered from Redis itself once a second.
    until(lambda: counted() == (seen["exact"], seen["semantic"], seen["miss"]), 15, f"counts {seen}")


def cache_lookup_calls(stack: Stack) -> float:
    text = httpx.get(stack.metrics["cache"], timeout=10).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "lmc_grpc_server_handled_total" and sample.labels.get("grpc_method") == "Lookup"
    )


def test_exact_hits_and_misses_without_candidates_never_call_the_cache_service(stack: Stack) -> None:
    """The Router reads exact entries, and whether a miss has candidates, from Redis itself."""
    system = system_prompt()
    with client(stack) as http:
        post_until_hit(http, "/v1/chat/completions", chat_body("Name the longest river in Africa.", system=system))
        calls = cache_lookup_calls(stack)
        answers = [
            http.post("/v1/chat/completions", json=chat_body(question, system=system))
            for question in ("Name the longest river in Africa.", "name the longest river in africa", "Name a desert.")
        ]
    assert [(r.status_code, r.headers["x-lmc-cache"]) for r in answers] == [(200, "hit"), (200, "hit"), (200, "miss")]
    assert cache_lookup_calls(stack) == calls


def embedding_batches(stack: Stack, lane: str) -> float | None:
    """Model calls of one lane of the Embedding service; None before that lane exists."""
    text = httpx.get(stack.metrics["embedding"], timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "lmc_embedding_batch_size_count" and sample.labels.get("lane") == lane:
                return sample.value
    return None


def test_an_answer_is_stored_with_a_vector_from_the_background_lane_under_sched_idle(stack: Stack) -> None:
    """Nobody waits on a stored answer's vector: it is computed in the Embedding service's own
    SCHED_IDLE thread, never ahead of lookups or the model's generations."""
    until(lambda: embedding_batches(stack, "background") is not None, 120, "the background lane loaded")
    assert threads_under(part_pid(stack, "embedding"), os.SCHED_IDLE) == 1
    system = system_prompt()
    before = embedding_batches(stack, "background") or 0.0
    lookups = metric(stack.metrics["router"], LOOKUP_EMBEDDINGS)
    with client(stack) as http:
        post_until_hit(http, "/v1/chat/completions", chat_body("Name the largest ocean on Earth.", system=system))
    assert (embedding_batches(stack, "background") or 0.0) > before
    # A question with no cached candidate looks nothing up semantically: no interactive embedding.
    assert metric(stack.metrics["router"], LOOKUP_EMBEDDINGS) == lookups


def test_an_answer_is_an_exact_hit_at_once_while_its_vector_waits_for_the_embedding_service(stack: Stack) -> None:
    """A finished answer is stored by its exact key without waiting for its vector (under load the
    background lane waits for idle CPU; here the Embedding service hangs outright). The vector is
    attached once it comes, unless the entry was removed meanwhile."""
    system = system_prompt()
    kept = chat_body("How do I rename a branch in Git?", system=system)
    fronted = chat_body("In Git, how do I rename a branch?", system=system, cache={"skip_store": True})
    reported = chat_body("How do I set a static IP address on Debian?", system=system)
    gone_before = metric(stack.metrics["cache"], STORES, outcome="entry_gone")
    with client(stack) as http:
        with paused(part_pid(stack, "embedding")):
            answers = {}
            for body in (kept, reported):
                first = http.post("/v1/chat/completions", json=body)
                assert first.status_code == 200 and first.headers["x-lmc-cache"] == "miss", first.text
                again = post_until_hit(http, "/v1/chat/completions", body)
                assert again.headers["x-lmc-cache-kind"] == "exact"
                assert again.json()["choices"] == first.json()["choices"]
                answers[body["messages"][-1]["content"]] = again
            entry = answers[reported["messages"][-1]["content"]].headers["x-lmc-cache-entry"]
            assert http.delete(f"/v1/cache/entries/{entry}").status_code == 200
        # The Embedding service answers again: the kept answer's vector is attached, and a reworded
        # question finds it; the removed one's vector finds no entry and brings nothing back.
        def similar() -> httpx.Response | None:
            response = http.post("/v1/chat/completions", json=fronted)
            return response if response.headers["x-lmc-cache"] == "hit" else None

        hit = until(similar, 30, "a semantic hit on the attached vector")
        assert hit.headers["x-lmc-cache-kind"] == "semantic"
        assert hit.json()["choices"] == answers[kept["messages"][-1]["content"]].json()["choices"]
        until(lambda: metric(stack.metrics["cache"], STORES, outcome="entry_gone") > gone_before, 30, "the removed entry's vector refused")
        after = http.post("/v1/chat/completions", json={**reported, "cache": {"skip_store": True}})
        assert after.status_code == 200 and after.headers["x-lmc-cache"] == "miss"


def test_the_router_embeds_a_semantic_lookup_itself_even_while_the_embedding_service_hangs(stack: Stack) -> None:
    """The Router's copy of the model gives the service's vectors: a rewording is a semantic hit
    with no call to the Embedding service on its path."""
    router = stack.metrics["router"]
    until(lambda: metric(router, "lmc_router_lookup_embedding_in_router") == 1, 120, "the Router's copy in use")
    system = system_prompt()
    stored = chat_body("How do I undo the last commit in Git?", system=system)
    reworded = chat_body("In Git, how do I undo the last commit?", system=system, cache={"skip_store": True})
    with client(stack) as http:
        first = post_until_stored(stack, http, "/v1/chat/completions", stored)
        by_router = metric(router, LOOKUP_EMBEDDINGS, by="router")
        with paused(part_pid(stack, "embedding")):
            hits = [http.post("/v1/chat/completions", json=reworded) for _ in range(3)]
    assert [(r.status_code, r.headers.get("x-lmc-cache-kind")) for r in hits] == [(200, "semantic")] * 3
    assert all(r.json()["choices"] == first.json()["choices"] for r in hits)
    assert metric(router, LOOKUP_EMBEDDINGS, by="router") == by_router + 3


def test_exact_and_semantic_hits_are_served_while_the_cache_service_hangs(stack: Stack) -> None:
    system = system_prompt()
    body = chat_body("How long do updates last with the Solo licence?", system=system)
    fronted = chat_body("With the Solo licence, how long do updates last?", system=system, cache={"skip_store": True})
    with client(stack) as http:
        first = post_until_stored(stack, http, "/v1/chat/completions", body)
        with paused(part_pid(stack, "cache")):
            again = [http.post("/v1/chat/completions", json=payload) for payload in (body, fronted, body, fronted)]
    assert [(r.status_code, r.headers.get("x-lmc-cache-kind")) for r in again] == [
        (200, "exact"), (200, "semantic"), (200, "exact"), (200, "semantic")
    ]  # fmt: skip
    assert {r.json()["choices"][0]["message"]["content"] for r in again} == {first.json()["choices"][0]["message"]["content"]}


def test_a_wrong_answer_is_reported_and_gone(stack: Stack) -> None:
    body = chat_body("Name the largest moon of Saturn.", system=system_prompt())
    with client(stack) as http:
        http.post("/v1/chat/completions", json=body)
        hit = post_until_hit(http, "/v1/chat/completions", body)
        entry = hit.headers["x-lmc-cache-entry"]
        assert entry
        deleted = http.delete(f"/v1/cache/entries/{entry}")
        assert deleted.status_code == 200, deleted.text
        assert deleted.json()["id"] == entry and deleted.json()["deleted"] is True
        # Gone at once (asked without storing the new answer, which would take the same entry id).
        fresh = http.post("/v1/chat/completions", json={**body, "cache": {"skip_store": True}})
        assert fresh.headers["x-lmc-cache"] == "miss"
        assert_openai_error(http.delete(f"/v1/cache/entries/{entry}"), 404, "cache_entry_not_found")
        assert_openai_error(http.delete("/v1/cache/entries/not-an-entry"), 404, "cache_entry_not_found")
        # The CLI does the same, on the Cache's address.
        again = post_until_hit(http, "/v1/chat/completions", body).headers["x-lmc-cache-entry"]
    forget = [sys.executable, "-m", "services.cli.main", "cache", "forget", again, "--cache", stack.cache]
    done = subprocess.run(forget, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert subprocess.run(forget, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60).returncode == 1
    metrics = httpx.get(stack.metrics["cache"], timeout=10).text
    reported = [line for line in metrics.splitlines() if line.startswith("lmc_cache_wrong_answers_reported_total")]
    assert reported and float(reported[0].split()[-1]) >= 2
    assert cache_stats(stack).wrong_answers_reported >= 2


@pytest.fixture(scope="module")
def keyed_stack(tmp_path_factory: pytest.TempPathFactory, redis_stack: str, demo_model: Path) -> Iterator[Stack]:
    """A stack with two API keys, on a models folder of its own holding a copy of the demo model."""
    models = tmp_path_factory.mktemp("own-models")
    folder = models / DEMO_PUBLISHER / DEMO_REPO
    folder.mkdir(parents=True)
    shutil.copyfile(demo_model, folder / DEMO_FILE)
    with running_stack(
        tmp_path_factory.mktemp("keyed-cache-stack"), redis_url=redis_stack, models_dir=models,
        env={"LMC_API_KEYS": ",".join(KEYS)},
    ) as stack:  # fmt: skip
        yield stack


def keyed(stack: Stack, key: str) -> httpx.Client:
    return httpx.Client(base_url=stack.http_url, timeout=HTTP_TIMEOUT, headers={"authorization": f"Bearer {key}"})


def test_one_key_never_gets_another_keys_answer(keyed_stack: Stack) -> None:
    body = chat_body("What is the tallest tree species?", system=system_prompt())
    with keyed(keyed_stack, KEYS[0]) as first, keyed(keyed_stack, KEYS[1]) as second:
        first.post("/v1/chat/completions", json=body)
        mine = post_until_hit(first, "/v1/chat/completions", body)
        theirs = second.post("/v1/chat/completions", json=body)
        assert theirs.status_code == 200, theirs.text
        assert theirs.headers["x-lmc-cache"] == "miss"
        own = post_until_hit(second, "/v1/chat/completions", body)
        assert own.headers["x-lmc-cache-entry"] != mine.headers["x-lmc-cache-entry"]
        assert second.delete(f"/v1/cache/entries/{own.headers['x-lmc-cache-entry']}").status_code == 200
    with httpx.Client(base_url=keyed_stack.http_url, timeout=HTTP_TIMEOUT) as anonymous:
        assert_openai_error(anonymous.delete(f"/v1/cache/entries/{mine.headers['x-lmc-cache-entry']}"), 401)


def test_a_swapped_model_file_never_serves_the_old_answers(keyed_stack: Stack) -> None:
    body = chat_body("Describe a rainbow in five words.", system=system_prompt())
    model_file = keyed_stack.models_dir / DEMO_PUBLISHER / DEMO_REPO / DEMO_FILE
    with keyed(keyed_stack, KEYS[0]) as http:
        http.post("/v1/chat/completions", json=body)
        old_entry = post_until_hit(http, "/v1/chat/completions", body).headers["x-lmc-cache-entry"]
        before = {m.id: m.fingerprint for m in keyed_stack.models()}
        # A new file in place of the old one (same bytes, new file: the Registry's fingerprint changes).
        replacement = model_file.with_suffix(".partial")
        shutil.copyfile(model_file, replacement)
        os.replace(replacement, model_file)
        until(lambda: {m.id: m.fingerprint for m in keyed_stack.models()} != before, SWAP_WAIT, "new fingerprint")

        def answered_fresh() -> bool:
            response = http.post("/v1/chat/completions", json=body)
            assert response.status_code == 200, response.text
            return response.headers["x-lmc-cache"] == "miss"

        until(answered_fresh, SWAP_WAIT, "a miss once the new file is known", interval=1.0)
        for _ in range(5):
            response = http.post("/v1/chat/completions", json=body)
            assert response.status_code == 200, response.text
            assert response.headers.get("x-lmc-cache-entry") != old_entry


# The classes that plain cosine lets through most, and the repeats that must hit.
THROUGH_THE_API = {
    "role_swap", "quantifier", "modal", "verb", "lowercase_name", "french", "german", "spanish", "long",
    "near_verbatim", "long_repeat",
}  # fmt: skip


@pytest.mark.timeout(900)
def test_through_the_api_near_duplicates_miss_and_near_verbatim_repeats_hit(stack: Stack) -> None:
    """One labelled pair of each class, each in a scope of its own, at a threshold below the lowest accepted."""
    first_of_class: dict[str, Pair] = {}
    for pair in load_pairs():
        if pair.source == "cache_pairs" and pair.kind in THROUGH_THE_API:
            first_of_class.setdefault(pair.kind, pair)
    assert set(first_of_class) == THROUGH_THE_API
    wrong = []
    with client(stack) as http:
        for kind, pair in sorted(first_of_class.items()):
            system = system_prompt()
            stored = chat_body(pair.a, system=system, max_tokens=4)
            http.post("/v1/chat/completions", json=stored)
            post_until_stored(stack, http, "/v1/chat/completions", stored)
            asked = chat_body(pair.b, system=system, max_tokens=4, cache={"threshold": 0.5})
            response = http.post("/v1/chat/completions", json=asked)
            assert response.status_code == 200, response.text
            hit = response.headers["x-lmc-cache"] == "hit"
            if kind in ("near_verbatim", "long_repeat"):
                assert hit, (kind, pair.a, pair.b)
            elif hit and not pair.should_hit:
                wrong.append((kind, pair.a[-60:], pair.b[-60:]))
    assert not wrong


def test_through_the_api_a_requests_threshold_decides_its_semantic_hit(stack: Stack) -> None:
    """The Router compares a verified candidate's vector itself: a request's own threshold above the
    pair's similarity is a miss, the default threshold a hit that reports the similarity."""
    system = system_prompt()
    stored = chat_body("How do I freeze the top row in Excel?", system=system, max_tokens=4)
    fronted = "In Excel, how do I freeze the top row?"
    with client(stack) as http:
        post_until_stored(stack, http, "/v1/chat/completions", stored)
        strict = http.post("/v1/chat/completions", json=chat_body(fronted, system=system, max_tokens=4,
                                                                   cache={"threshold": 1.0, "skip_store": True}))  # fmt: skip
        default = http.post("/v1/chat/completions", json=chat_body(fronted, system=system, max_tokens=4,
                                                                    cache={"skip_store": True}))  # fmt: skip
    assert strict.status_code == 200 and strict.headers["x-lmc-cache"] == "miss", strict.headers
    assert default.status_code == 200 and default.headers["x-lmc-cache-kind"] == "semantic", default.headers
    similarity = float(default.headers["x-lmc-similarity"])
    assert 0.95 <= similarity < 1.0
    with client(stack) as http:
        just_below = http.post("/v1/chat/completions", json=chat_body(fronted, system=system, max_tokens=4,
                                                                       cache={"threshold": similarity - 1e-4, "skip_store": True}))  # fmt: skip
    assert just_below.headers["x-lmc-cache-kind"] == "semantic", just_below.headers

"""Quantization routing and the full queue, on a stack of its own (`lmcluster up`, real everything).

The models folder holds the demo model (Q4_1) and a Q8_0 variant of it made by `llama-quantize`,
side by side in one LM Studio repo folder, so the Registry lists them as variants of one base model
(Q8_0 first: more bits per weight). Each backend has one slot and the Router's queue holds nobody
(`LMC_ROUTER_QUEUE_LIMIT=0`), so what happens under load is decided by slots alone:

- the base model goes to Q8_0 while it has a free slot, and overflows to Q4_1 when it has none;
  the response's `model` names the variant that answered;
- with both slots busy, the next request is 429 `overloaded` with `Retry-After`;
- a full variant id (or its alias) pins that variant;
- when the load is gone, the base model goes back to Q8_0.

A slot is held by a stream whose answer cannot end by itself (`logit_bias` bans the end-of-text
tokens) until the test closes it; nothing depends on how fast tokens come.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from lmcluster.registry.v1 import registry_pb2

from services.common import binaries
from tests.fixtures.parts import require_part
from tests.fixtures.stack import DEMO_BASE_ID, DEMO_MODEL_ID, DEMO_PUBLISHER, DEMO_REPO, Stack, link_demo_model, running_stack
from tests.router.end_to_end_support import HTTP_TIMEOUT, assert_openai_error, nonce, system_prompt, until

Q8_MODEL_ID = f"{DEMO_PUBLISHER}/{DEMO_REPO}/SmolLM2-135M-Instruct.Q8_0"
Q8_ALIAS = "smollm2-135m-instruct-q8_0"
Q4_ALIAS = "smollm2-135m-instruct-q4_1"
NO_END = {"0": -100, "1": -100, "2": -100}
NO_CACHE = {"skip_lookup": True, "skip_store": True}


@pytest.fixture(scope="module")
def variants_stack(
    tmp_path_factory: pytest.TempPathFactory, redis_stack: str, demo_model: Path
) -> Iterator[Stack]:
    models = tmp_path_factory.mktemp("variant-models")
    link_demo_model(models, demo_model)
    quantize = require_part(lambda: binaries.llama_tool("llama-quantize"))
    q8 = models / DEMO_PUBLISHER / DEMO_REPO / "SmolLM2-135M-Instruct.Q8_0.gguf"
    result = subprocess.run(
        [str(quantize), "--allow-requantize", str(demo_model), str(q8), "Q8_0"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    if result.returncode != 0:
        pytest.fail(f"llama-quantize failed ({result.returncode}):\n{result.stderr[-2000:]}", pytrace=False)
    env = {
        "LMC_SUPERVISOR_PARALLEL": "1",
        "LMC_SUPERVISOR_CONTEXT_PER_SLOT": "1024",
        "LMC_ROUTER_QUEUE_LIMIT": "0",
        "LMC_ROUTER_RETRY_AFTER_SECONDS": "3",
    }
    with running_stack(tmp_path_factory.mktemp("variants-stack"), redis_url=redis_stack, models_dir=models, env=env) as stack:
        # The Q8_0 file is brand new: the Registry may still be waiting for it to settle when the
        # Supervisor preloads, so it may start cold, on its first request (through the Router).
        stack.wait_until(
            lambda: {m.id for m in stack.models() if m.state == registry_pb2.MODEL_STATE_READY} >= {Q8_MODEL_ID, DEMO_MODEL_ID},
            120, "both variants READY in the Registry",
        )  # fmt: skip
        warm = httpx.post(f"{stack.base_url}/chat/completions", json=body(Q8_ALIAS, "Say hi."), timeout=HTTP_TIMEOUT)
        assert warm.status_code == 200, warm.text
        stack.wait_until(
            lambda: {b.model_id for b in stack.ready_backends()} == {Q8_MODEL_ID, DEMO_MODEL_ID}, 120, "both backends READY"
        )
        yield stack


def body(model: str, question: str, **extra: object) -> dict:
    return {
        "model": model,
        "messages": [{"role": "system", "content": system_prompt()}, {"role": "user", "content": question}],
        "max_tokens": 8,
        "cache": NO_CACHE,
        **extra,
    }


@contextlib.contextmanager
def held_slot(http: httpx.Client, model: str) -> Iterator[str]:
    """A stream on `model` that holds its slot until the block ends; yields the variant that answers."""
    long = body(model, f"Tell a very long story ({nonce()}).", max_tokens=900, logit_bias=NO_END, stream=True)
    with http.stream("POST", "/v1/chat/completions", json=long) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line.startswith("data:"):
                yield json.loads(line[5:])["model"]
                return
        raise AssertionError("the stream ended before its first event")


def slots_free(stack: Stack) -> bool:
    for backend in stack.ready_backends():
        if any(slot["is_processing"] for slot in httpx.get(f"{backend.endpoint}/slots", timeout=10).json()):
            return False
    return True


def test_the_base_model_and_both_variants_are_listed(variants_stack: Stack) -> None:
    cards = {card["id"]: card for card in httpx.get(f"{variants_stack.base_url}/models", timeout=30).json()["data"]}
    assert {DEMO_BASE_ID, DEMO_MODEL_ID, Q8_MODEL_ID, Q4_ALIAS, Q8_ALIAS} <= set(cards)
    assert cards[DEMO_BASE_ID]["quantization"] == "auto"
    assert cards[DEMO_BASE_ID]["variants"] == [Q8_MODEL_ID, DEMO_MODEL_ID]  # best first
    assert {b.model_id for b in variants_stack.ready_backends()} == {Q8_MODEL_ID, DEMO_MODEL_ID}


def test_load_overflows_to_the_lighter_variant_then_429_then_back(variants_stack: Stack) -> None:
    with httpx.Client(base_url=variants_stack.http_url, timeout=HTTP_TIMEOUT) as http:
        idle = http.post("/v1/chat/completions", json=body(DEMO_BASE_ID, "Say one word."))
        assert idle.status_code == 200, idle.text
        assert idle.json()["model"] == Q8_MODEL_ID

        with held_slot(http, DEMO_BASE_ID) as first, held_slot(http, DEMO_BASE_ID) as second:
            # Two concurrent requests for the base model: the best variant, then the lighter one.
            assert first == Q8_MODEL_ID
            assert second == DEMO_MODEL_ID
            overloaded = http.post("/v1/chat/completions", json=body(DEMO_BASE_ID, "Say two words."))
            streamed = http.post("/v1/chat/completions", json=body(DEMO_BASE_ID, "Say three words.", stream=True))
        # Closing the streams cancelled both generations.
        until(lambda: slots_free(variants_stack), 60.0, "free slots after the streams closed")
        back = http.post("/v1/chat/completions", json=body(DEMO_BASE_ID, "Say four words."))

    for refused in (overloaded, streamed):
        error = assert_openai_error(refused, 429, "overloaded")
        assert error["type"] == "rate_limit_error"
        assert refused.headers["retry-after"] == "3"
    assert back.status_code == 200, back.text
    assert back.json()["model"] == Q8_MODEL_ID


def test_a_full_id_or_alias_pins_the_variant(variants_stack: Stack) -> None:
    until(lambda: slots_free(variants_stack), 60.0, "free slots")
    with httpx.Client(base_url=variants_stack.http_url, timeout=HTTP_TIMEOUT) as http:
        by_id = http.post("/v1/chat/completions", json=body(DEMO_MODEL_ID, "Say yes."))
        by_alias = http.post("/v1/chat/completions", json=body(Q4_ALIAS, "Say no."))
        best_by_alias = http.post("/v1/chat/completions", json=body(Q8_ALIAS, "Say maybe."))
        completion = http.post(
            "/v1/completions", json={"model": DEMO_MODEL_ID, "prompt": "Hello", "max_tokens": 4, "cache": NO_CACHE}
        )
        # A pinned variant does not overflow: with its one slot held, the next request is refused.
        with held_slot(http, DEMO_MODEL_ID) as held:
            assert held == DEMO_MODEL_ID
            refused = http.post("/v1/chat/completions", json=body(DEMO_MODEL_ID, "Say ok."))
            other = http.post("/v1/chat/completions", json=body(DEMO_BASE_ID, "Say fine."))
    assert by_id.json()["model"] == DEMO_MODEL_ID
    assert by_alias.json()["model"] == DEMO_MODEL_ID
    assert best_by_alias.json()["model"] == Q8_MODEL_ID
    assert completion.json()["model"] == DEMO_MODEL_ID
    assert_openai_error(refused, 429, "overloaded")
    assert other.status_code == 200 and other.json()["model"] == Q8_MODEL_ID

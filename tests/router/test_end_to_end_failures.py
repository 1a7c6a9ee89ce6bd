"""Failure semantics with the real llama-server behind the real Envoy and Router.

- A client that disconnects mid-stream cancels the llama-server request: the slot is free again
  (`/slots`), and the backend generated fewer tokens than it was asked for.
- A llama-server killed (SIGKILL) mid-stream ends the stream with an error event, then
  `data: [DONE]`, never a silent cut; the openai SDK raises; the Supervisor restarts the backend and
  later requests succeed. A backend killed between requests costs a client nothing: the Router
  waits for the restarted one.
- Identical concurrent misses share one generation.
- A native gRPC caller's deadline ends its stream with DEADLINE_EXCEEDED (a status, after the
  messages already sent) and the generation on the backend too.

Long generations: `logit_bias` bans the demo model's end-of-text tokens, so an answer runs until
`max_tokens` unless something cuts it; the tests never depend on how fast tokens come.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal

import grpc
import httpx
import openai
import pytest
from google.protobuf import struct_pb2
from lmcluster.router.v1 import openai_pb2 as oa
from lmcluster.router.v1 import router_service_pb2_grpc

from tests.fixtures.stack import DEMO_MODEL_ID, Stack
from tests.router.end_to_end_support import (
    HTTP_TIMEOUT,
    MODEL,
    chat_body,
    client,
    metric,
    nonce,
    post_until_hit,
    system_prompt,
    until,
)

# SmolLM2's <|endoftext|>, <|im_start|>, <|im_end|>: banned, the answer never ends by itself.
NO_END = {"0": -100, "1": -100, "2": -100}
STORES = "lmc_cache_stores_total"
STORE_STEPS = ("stored", "embedding_attached")
LONG_ANSWER_TOKENS = 800  # the session stack's slots hold 1024 tokens
RESTART_WAIT = 120.0


def backend(stack: Stack):  # type: ignore[no-untyped-def]
    backends = stack.ready_backends(DEMO_MODEL_ID)
    assert len(backends) == 1, backends
    return backends[0]


def slots(endpoint: str) -> list[dict]:
    return httpx.get(f"{endpoint}/slots", timeout=10.0).json()


def predicted_tokens(endpoint: str) -> float:
    for line in httpx.get(f"{endpoint}/metrics", timeout=10.0).text.splitlines():
        if line.startswith("llamacpp:tokens_predicted_total "):
            return float(line.split()[1])
    raise AssertionError("no llamacpp:tokens_predicted_total in the backend's /metrics")


def long_chat(question: str, **extra: object) -> dict:
    return chat_body(
        question, system=system_prompt(), max_tokens=LONG_ANSWER_TOKENS, logit_bias=NO_END, stream=True,
        cache={"skip_lookup": True, "skip_store": True}, **extra,
    )  # fmt: skip


def test_a_client_that_disconnects_mid_stream_frees_the_slot(stack: Stack) -> None:
    endpoint = backend(stack).endpoint
    before = predicted_tokens(endpoint)
    with client(stack) as http:
        with http.stream("POST", "/v1/chat/completions", json=long_chat("Tell me a very long story.")) as response:
            assert response.status_code == 200
            received = 0
            # Held in a variable: a line iterator dropped early closes the connection.
            lines = response.iter_lines()
            for line in lines:
                if line.startswith("data:"):
                    received += 1
                if received >= 5:
                    break
            until(lambda: any(slot["is_processing"] for slot in slots(endpoint)), 30.0, "a busy slot")
        # Leaving the block closed the connection mid-stream.
    until(lambda: not any(slot["is_processing"] for slot in slots(endpoint)), 60.0, "free slots after the disconnect")
    generated = predicted_tokens(endpoint) - before
    assert 0 < generated < LONG_ANSWER_TOKENS, generated


def test_identical_concurrent_misses_share_one_generation(stack: Stack) -> None:
    endpoint = backend(stack).endpoint
    # Long enough (the end of text is banned) that all four arrive while it runs.
    body = chat_body("Describe the sea.", system=system_prompt(), max_tokens=96, logit_bias=NO_END)

    async def ask_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=stack.http_url, timeout=HTTP_TIMEOUT) as http:
            return list(await asyncio.gather(*(http.post("/v1/chat/completions", json=body) for _ in range(4))))

    stores = {outcome: metric(stack.metrics["cache"], STORES, outcome=outcome) for outcome in STORE_STEPS}
    before = predicted_tokens(endpoint)
    responses = asyncio.run(ask_all())
    generated = predicted_tokens(endpoint) - before
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    answers = {r.json()["choices"][0]["message"]["content"] for r in responses}
    assert len(answers) == 1
    completion_tokens = responses[0].json()["usage"]["completion_tokens"]
    # One generation for four requests (a request that arrived after the store would be a hit).
    assert generated == completion_tokens, (generated, completion_tokens)
    # ... and one answer stored, by its key and then with its vector, not one per request.
    with client(stack) as http:
        post_until_hit(http, "/v1/chat/completions", body)
    def added() -> dict[str, float]:
        return {step: metric(stack.metrics["cache"], STORES, outcome=step) - stores[step] for step in STORE_STEPS}

    until(lambda: added()["embedding_attached"] > 0, 30, "the answer's vector attached")
    assert added() == dict.fromkeys(STORE_STEPS, 1.0), added()


def test_a_backend_killed_mid_stream_ends_the_stream_with_an_error_event(stack: Stack) -> None:
    victim = backend(stack)
    with client(stack) as http:
        with http.stream("POST", "/v1/chat/completions", json=long_chat("Tell me a very long story.")) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            payloads: list[str] = []
            for line in lines:
                if line.startswith("data:"):
                    payloads.append(line[5:].strip())
                if len(payloads) >= 3:
                    break
            os.kill(victim.pid, signal.SIGKILL)
            payloads += [line[5:].strip() for line in lines if line.startswith("data:")]
    assert payloads[-1] == "[DONE]"
    error_events = [json.loads(p) for p in payloads[:-1] if p.startswith('{"error"')]
    assert len(error_events) == 1, payloads[-5:]
    error = error_events[0]["error"]
    assert set(error) >= {"message", "type", "code"}
    assert error["type"] == "server_error"
    assert error["code"] == "stream_interrupted"
    # Every event before the error is a normal chunk.
    assert all(json.loads(p)["object"] == "chat.completion.chunk" for p in payloads[: -2])

    restarted = until(
        lambda: [b for b in stack.ready_backends(DEMO_MODEL_ID) if b.pid != victim.pid],
        RESTART_WAIT,
        "restarted backend",
    )
    assert restarted[0].restart_count >= 1
    with client(stack) as http:
        after = http.post("/v1/chat/completions", json=chat_body("Say hi.", system=system_prompt()))
    assert after.status_code == 200, after.text
    assert after.json()["choices"][0]["message"]["content"]


def test_the_openai_sdk_raises_when_the_backend_dies_mid_stream(stack: Stack) -> None:
    victim = backend(stack)
    api = openai.OpenAI(base_url=stack.base_url, api_key="unused", timeout=120.0, max_retries=0)
    body = long_chat("Write a long poem about rivers.")
    stream = api.chat.completions.create(
        model=MODEL, messages=body["messages"], max_tokens=LONG_ANSWER_TOKENS, stream=True,
        extra_body={"logit_bias": NO_END, "cache": body["cache"]},
    )  # fmt: skip
    received = 0
    with pytest.raises(openai.APIError) as raised:
        for _chunk in stream:
            received += 1
            if received == 3:
                os.kill(victim.pid, signal.SIGKILL)
    api.close()
    assert received >= 3
    assert "failed mid-answer" in str(raised.value.message)
    until(
        lambda: [b for b in stack.ready_backends(DEMO_MODEL_ID) if b.pid != victim.pid],
        RESTART_WAIT,
        "restarted backend",
    )


def test_a_backend_killed_between_requests_costs_the_next_request_nothing(stack: Stack) -> None:
    victim = backend(stack)
    os.kill(victim.pid, signal.SIGKILL)
    with client(stack) as http:
        response = http.post(
            "/v1/chat/completions", json=chat_body(f"Say the word {nonce()[:4]}.", system=system_prompt())
        )
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"]
    assert response.json()["model"] == DEMO_MODEL_ID


def test_a_grpc_deadline_ends_the_generation_and_frees_the_slot(stack: Stack) -> None:
    """The caller's deadline travels through Envoy to the Router, which cancels the backend request."""
    endpoint = backend(stack).endpoint
    before = predicted_tokens(endpoint)
    request = oa.CreateChatCompletionRequest(
        model=MODEL,
        messages=[
            oa.ChatMessage(role="system", content=struct_pb2.Value(string_value=system_prompt())),
            oa.ChatMessage(role="user", content=struct_pb2.Value(string_value="Tell me a very long story.")),
        ],
        max_tokens=LONG_ANSWER_TOKENS,
        cache=oa.CacheOptions(skip_lookup=True, skip_store=True),
    )
    request.logit_bias.update(NO_END)
    with grpc.insecure_channel(stack.grpc_target) as channel:
        call = router_service_pb2_grpc.RouterServiceStub(channel).StreamChatCompletion(request, timeout=1.5)
        received = 0
        with pytest.raises(grpc.RpcError) as ended:
            for _chunk in call:
                received += 1
    # The client's own deadline or the Router's (it knows the same deadline): a status either way.
    assert ended.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert received > 0
    until(lambda: not any(slot["is_processing"] for slot in slots(endpoint)), 60.0, "free slots after the deadline")
    assert predicted_tokens(endpoint) - before < LONG_ANSWER_TOKENS

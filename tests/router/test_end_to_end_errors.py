"""Bad requests through the real Envoy and Router: each the right 4xx in OpenAI's shape, never a 5xx."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.fixtures.stack import Stack
from tests.router.end_to_end_support import MODEL, assert_openai_error, chat_body, client, system_prompt

# The session stack's backends have 1024 tokens per slot (tests/fixtures/stack.py TEST_DEFAULTS).
OVER_CONTEXT = "The quick brown fox jumps over the lazy dog. " * 300


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b'{"model": "m", "messages": [', "application/json"),
        (b"not json at all", "application/json"),
        (b"\xff\xfe\x00garbage", "application/json"),
        (b"[1, 2, 3]", "application/json"),
    ],
    ids=["truncated", "text", "not-utf8", "not-an-object"],
)
def test_malformed_json_is_400(stack: Stack, body: bytes, content_type: str) -> None:
    with client(stack) as http:
        response = http.post("/v1/chat/completions", content=body, headers={"content-type": content_type})
    assert_openai_error(response, 400)


@pytest.mark.parametrize(
    "body",
    [
        {"model": MODEL, "messages": "hello"},
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": "many"},
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"},
        {"model": ["a"], "messages": [{"role": "user", "content": "hi"}]},
    ],
    ids=["messages-string", "max-tokens-string", "temperature-string", "model-list"],
)
def test_wrong_types_are_400(stack: Stack, body: dict) -> None:
    with client(stack) as http:
        response = http.post("/v1/chat/completions", json=body)
    assert_openai_error(response, 400)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": MODEL}, "messages"),
        ({"model": MODEL, "messages": []}, "messages"),
        ({"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
        ({"model": MODEL, "messages": [{"role": "user"}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "model"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": 7}, "temperature"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 3}, "n"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "cache": {"threshold": 1.5}}, "cache.threshold"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "cache": {"threshold": -0.1}}, "cache.threshold"),
    ],
    ids=["missing-messages", "empty-messages", "bad-role", "no-content", "no-model", "temperature-range", "n",
         "cache-threshold-above-one", "cache-threshold-negative"],  # fmt: skip
)
def test_invalid_fields_are_400_naming_the_field(stack: Stack, body: dict, param: str) -> None:
    with client(stack) as http:
        response = http.post("/v1/chat/completions", json=body)
        streamed = http.post("/v1/chat/completions", json={**body, "stream": True})
    for each in (response, streamed):
        error = assert_openai_error(each, 400)
        assert error["type"] == "invalid_request_error"
        assert error["param"] == param


def test_completion_without_prompt_is_400(stack: Stack) -> None:
    with client(stack) as http:
        response = http.post("/v1/completions", json={"model": MODEL, "max_tokens": 4})
    assert_openai_error(response, 400)


def test_ten_megabyte_body_is_413(stack: Stack) -> None:
    big = "x" * (10 * 1024 * 1024)
    with client(stack) as http:
        response = http.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": big}]})
    assert_openai_error(response, 413, "request_too_large")


def test_unknown_model_is_404(stack: Stack) -> None:
    with client(stack) as http:
        chat = http.post("/v1/chat/completions", json={**chat_body("hi"), "model": "nobody/no-such-model"})
        stream = http.post("/v1/chat/completions", json={**chat_body("hi"), "model": "no-such-model", "stream": True})
        completion = http.post("/v1/completions", json={"model": "no-such-model", "prompt": "hi"})
    for response in (chat, stream, completion):
        error = assert_openai_error(response, 404, "model_not_found")
        assert error["param"] == "model"


def test_prompt_over_the_slot_context_is_400_context_length_exceeded(stack: Stack) -> None:
    body = chat_body(OVER_CONTEXT, system=system_prompt(), max_tokens=8)
    with client(stack) as http:
        response = http.post("/v1/chat/completions", json=body)
        streamed = http.post("/v1/chat/completions", json={**body, "stream": True})
        completion = http.post("/v1/completions", json={"model": MODEL, "prompt": OVER_CONTEXT, "max_tokens": 8})
        # The backend is fine afterwards.
        after = http.post("/v1/chat/completions", json=chat_body("Say yes.", system=system_prompt()))
    for each in (response, streamed, completion):
        error = assert_openai_error(each, 400, "context_length_exceeded")
        assert error["type"] == "invalid_request_error"
        assert "context length" in error["message"]
    assert after.status_code == 200, after.text


def test_unknown_path_and_wrong_method(stack: Stack) -> None:
    with client(stack) as http:
        assert_openai_error(http.get("/v1/nothing-here"), 404)
        assert_openai_error(http.get("/v1/chat/completions"), 405)


def test_invalid_embedding_input_is_400(stack: Stack) -> None:
    with client(stack) as http:
        empty = http.post("/v1/embeddings", json={"input": [], "model": "all-MiniLM-L6-v2"})
        tokens = http.post("/v1/embeddings", json={"input": [1, 2, 3], "model": "all-MiniLM-L6-v2"})
    assert_openai_error(empty, 400)
    assert_openai_error(tokens, 400)


def test_error_body_is_json_even_for_form_encoded_requests(stack: Stack) -> None:
    # curl -d sends application/x-www-form-urlencoded.
    response = httpx.post(
        f"{stack.http_url}/v1/chat/completions",
        content=json.dumps({"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}),
        headers={"content-type": "application/x-www-form-urlencoded"},
        timeout=60,
    )
    assert_openai_error(response, 404, "model_not_found")

"""Logprobs through the real Envoy: chat and completions, unary and streamed, live and cached.

Chat answers carry OpenAI's `logprobs.content` (token, logprob, bytes, top_logprobs); completions
OpenAI's own shape (`tokens`, `token_logprobs`, `top_logprobs` as {token: logprob}, and in a whole
answer `text_offset`). `logprobs` and `top_logprobs` are part of the cache scope: a request that asks
for them only ever hits an answer stored with them, and a cached replay carries them.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai

from tests.fixtures.stack import Stack
from tests.router.end_to_end_support import MODEL, chat_body, client, nonce, post_until_hit, sse_payloads, system_prompt


def sdk(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.base_url, api_key="not-needed", max_retries=0, timeout=120)


def completion_body(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": f"Session {nonce()}. The sky is", "max_tokens": 4, "temperature": 0, **extra}


def events(http: httpx.Client, path: str, body: dict[str, Any]) -> tuple[httpx.Headers, list[dict[str, Any]]]:
    with http.stream("POST", path, json={**body, "stream": True}) as response:
        assert response.status_code == 200, response.read()
        payloads = sse_payloads(response.iter_lines())
    assert payloads[-1] == "[DONE]", payloads[-3:]
    return response.headers, [json.loads(payload) for payload in payloads[:-1]]


def assert_chat_logprobs(content: str, logprobs: dict[str, Any]) -> None:
    entries = logprobs["content"]
    assert entries, logprobs
    assert "".join(entry["token"] for entry in entries) == content, (content, entries)
    for entry in entries:
        assert isinstance(entry["logprob"], float | int) and entry["logprob"] <= 0, entry
        assert isinstance(entry["bytes"], list), entry
        assert len(entry["top_logprobs"]) == 2, entry
        assert all(top["logprob"] <= 0 and "token" in top for top in entry["top_logprobs"]), entry


def assert_completion_logprobs(text: str, logprobs: dict[str, Any], *, whole: bool) -> None:
    tokens = logprobs["tokens"]
    assert tokens and "".join(tokens) == text, (text, logprobs)
    assert len(logprobs["token_logprobs"]) == len(tokens) == len(logprobs["top_logprobs"]), logprobs
    assert all(value <= 0 for value in logprobs["token_logprobs"]), logprobs
    assert all(1 <= len(top) <= 2 and all(v <= 0 for v in top.values()) for top in logprobs["top_logprobs"]), logprobs
    if whole:
        offsets = [0]
        for token in tokens[:-1]:
            offsets.append(offsets[-1] + len(token))
        assert logprobs["text_offset"] == offsets, logprobs


def streamed_chat(chunks: list[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    text, entries = [], []
    for chunk in chunks:
        for choice in chunk["choices"]:
            text.append(choice["delta"].get("content") or "")
            entries += (choice.get("logprobs") or {}).get("content") or []
    return "".join(text), {"content": entries}


def streamed_completion(chunks: list[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    text: list[str] = []
    shaped: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": []}
    for chunk in chunks:
        for choice in chunk["choices"]:
            text.append(choice.get("text") or "")
            for key in shaped:
                shaped[key] += (choice.get("logprobs") or {}).get(key) or []
    return "".join(text), shaped


def test_chat_logprobs_with_the_sdk(stack: Stack) -> None:
    with sdk(stack) as openai_client:
        answer = openai_client.chat.completions.create(
            model=MODEL, temperature=0, max_tokens=6, logprobs=True, top_logprobs=2,
            messages=[{"role": "system", "content": system_prompt()}, {"role": "user", "content": "Say hello."}],
        )  # fmt: skip
        choice = answer.choices[0]
        assert choice.logprobs is not None and choice.logprobs.content, choice
        assert_chat_logprobs(choice.message.content or "", choice.logprobs.model_dump())

        stream = openai_client.chat.completions.create(
            model=MODEL, temperature=0, max_tokens=6, logprobs=True, top_logprobs=2, stream=True,
            messages=[{"role": "system", "content": system_prompt()}, {"role": "user", "content": "Say hello."}],
        )  # fmt: skip
        chunks = [chunk.model_dump() for chunk in stream]
    assert_chat_logprobs(*streamed_chat(chunks))


def test_completion_logprobs_with_the_sdk(stack: Stack) -> None:
    with sdk(stack) as openai_client:
        answer = openai_client.completions.create(**completion_body(logprobs=2))
        choice = answer.choices[0]
        assert choice.logprobs is not None, choice
        assert_completion_logprobs(choice.text, choice.logprobs.model_dump(), whole=True)

        chunks = [chunk.model_dump() for chunk in openai_client.completions.create(**completion_body(logprobs=2), stream=True)]
    assert_completion_logprobs(*streamed_completion(chunks), whole=False)


def test_cached_chat_replays_logprobs(stack: Stack) -> None:
    plain = chat_body("Name a colour.", system=system_prompt(), max_tokens=6)
    asking = {**plain, "logprobs": True, "top_logprobs": 2}
    with client(stack) as http:
        # An answer stored without logprobs never answers a request that asks for them.
        post_until_hit(http, "/v1/chat/completions", plain)
        first = http.post("/v1/chat/completions", json=asking)
        assert first.status_code == 200, first.text
        assert first.headers["x-lmc-cache"] == "miss", first.headers
        assert_chat_logprobs(first.json()["choices"][0]["message"]["content"], first.json()["choices"][0]["logprobs"])

        hit = post_until_hit(http, "/v1/chat/completions", asking)
        choice = hit.json()["choices"][0]
        assert_chat_logprobs(choice["message"]["content"], choice["logprobs"])
        assert choice["logprobs"] == first.json()["choices"][0]["logprobs"]

        headers, chunks = events(http, "/v1/chat/completions", asking)
    assert headers["x-lmc-cache"] == "hit", headers
    content, logprobs = streamed_chat(chunks)
    assert content == choice["message"]["content"]
    assert_chat_logprobs(content, logprobs)


def test_cached_completion_replays_logprobs(stack: Stack) -> None:
    asking = completion_body(logprobs=2)
    with client(stack) as http:
        hit = post_until_hit(http, "/v1/completions", asking)
        choice = hit.json()["choices"][0]
        assert_completion_logprobs(choice["text"], choice["logprobs"], whole=True)

        headers, chunks = events(http, "/v1/completions", asking)
    assert headers["x-lmc-cache"] == "hit", headers
    text, logprobs = streamed_completion(chunks)
    assert text == choice["text"]
    assert_completion_logprobs(text, logprobs, whole=False)

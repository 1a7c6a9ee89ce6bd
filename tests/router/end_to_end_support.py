"""Helpers of the end-to-end tests: requests through Envoy, SSE parsing, OpenAI error checks.

Every test that must start from a cache miss puts a nonce in its system prompt (or its cache scope):
the system prompt is part of the cache scope, so one test never sees another's answers, also when
the session's stack has served the same question before.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import redis
from prometheus_client.parser import text_string_to_metric_families

from tests.fixtures.stack import Stack

# The Registry's alias of the demo model (services/registry/layout.py `assign_aliases`).
MODEL = "smollm2-135m-instruct-q4_1"
EMBEDDING_DIMENSIONS = 384
# Generous: the machine has two cores, shared with other test runs.
HTTP_TIMEOUT = httpx.Timeout(120.0, connect=10.0)
STORE_WAIT = 30.0  # answers are stored after the client has them: poll for the hit up to this long


def nonce() -> str:
    return secrets.token_hex(6)


def system_prompt(tag: str = "") -> str:
    """A system prompt no other test uses (a scope of its own)."""
    return f"You are a concise assistant. Session {tag or nonce()}."


def chat_body(question: str, *, system: str | None = None, max_tokens: int = 16, **extra: Any) -> dict[str, Any]:
    messages = []
    if system is not None:
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": question})
    return {"model": MODEL, "messages": messages, "max_tokens": max_tokens, "temperature": 0, **extra}


def metric(url: str, name: str, **labels: str) -> float:
    """The sum of the samples of `name` with these labels on a Prometheus endpoint (0 without any)."""
    text = httpx.get(url, timeout=10.0).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


def client(stack: Stack) -> httpx.Client:
    return httpx.Client(base_url=stack.http_url, timeout=HTTP_TIMEOUT)


def sse_payloads(lines: Iterator[str]) -> list[str]:
    """The `data:` payloads of a server-sent event stream, in order (`[DONE]` included)."""
    return [line[len("data:") :].strip() for line in lines if line.startswith("data:")]


def chat_text_of_events(payloads: list[str]) -> str:
    text = []
    for payload in payloads:
        if payload == "[DONE]":
            continue
        event = json.loads(payload)
        for choice in event.get("choices", []):
            text.append((choice.get("delta") or {}).get("content") or "")
    return "".join(text)


def assert_openai_error(response: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    """The response is `status` with OpenAI's error body (and `code`, if given); returns the error."""
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    assert "code" in error, error
    if code is not None:
        assert error["code"] == code, error
    for header in ("grpc-status", "grpc-message", "x-lmc-error", "x-lmc-http-status"):
        assert header not in response.headers, (header, response.headers)
    return error


def until(probe: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    """Calls `probe` until it returns something truthy; fails naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"no {what} within {timeout:.0f} s (last: {last!r})")


def post_until_hit(http: httpx.Client, path: str, body: dict[str, Any]) -> httpx.Response:
    """Repeats a request until it is a cache hit (the first answer is stored in the background)."""

    def attempt() -> httpx.Response | None:
        response = http.post(path, json=body)
        assert response.status_code == 200, response.text
        return response if response.headers.get("x-lmc-cache") == "hit" else None

    return until(attempt, STORE_WAIT, f"cache hit for {body}", interval=0.3)


def post_until_stored(stack: Stack, http: httpx.Client, path: str, body: dict[str, Any]) -> httpx.Response:
    """`post_until_hit`, then waits until the entry's vector is attached too: an answer is an exact
    hit as soon as it is complete, and a reworded request finds it only once its vector follows."""
    hit = post_until_hit(http, path, body)
    entry = hit.headers["x-lmc-cache-entry"]
    with redis.Redis.from_url(stack.redis_url) as client:

        def attached() -> bool:
            return any(client.hexists(key, "vec") for key in client.scan_iter(match=f"*:entry:{entry}"))

        until(attached, STORE_WAIT, f"the vector of cache entry {entry}", interval=0.1)
    return hit

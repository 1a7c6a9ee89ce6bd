"""Errors through Envoy: the right HTTP status and OpenAI's error shape, for the raw API and the SDK."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest

from tests.gateway.conftest import Gateway, assert_openai_error, chat_body

# model -> (HTTP status, OpenAI type, code) that the fake Router's failure must become.
ROUTER_FAILURES = {
    "missing": (404, "invalid_request_error", "model_not_found"),
    "too-long": (400, "invalid_request_error", "context_length_exceeded"),
    "busy": (429, "rate_limit_error", "overloaded"),
    "unavailable": (503, "server_error", "model_unavailable"),
    "too-big": (413, "invalid_request_error", "request_too_large"),
    "crash": (500, "server_error", "unknown"),
    "late-error": (404, "invalid_request_error", "model_not_found"),
}


def sdk(gateway: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base_url, api_key="unused", max_retries=0)


@pytest.mark.parametrize("model", sorted(ROUTER_FAILURES))
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/embeddings"])
def test_router_failures_become_openai_errors(gateway: Gateway, model: str, path: str) -> None:
    status, error_type, code = ROUTER_FAILURES[model]
    body: dict[str, Any] = chat_body(model=model) if "chat" in path else {"model": model, "input": "hi"}
    response = httpx.post(f"{gateway.url}{path}", json=body, timeout=30.0)
    assert_openai_error(response, status, code=code, type=error_type)


@pytest.mark.parametrize("model", sorted(set(ROUTER_FAILURES) - {"late-error"}))
def test_stream_failing_before_its_first_chunk_is_an_http_error(gateway: Gateway, model: str) -> None:
    status, error_type, code = ROUTER_FAILURES[model]
    response = httpx.post(
        f"{gateway.url}/v1/chat/completions", json=chat_body(model=model, stream=True), timeout=30.0
    )
    assert_openai_error(response, status, code=code, type=error_type)


def test_router_error_details_pass_unchanged(gateway: Gateway) -> None:
    response = httpx.post(
        f"{gateway.url}/v1/chat/completions", json=chat_body(model="too-long"), timeout=30.0
    )
    error = assert_openai_error(response, 400, code="context_length_exceeded")
    assert error["param"] == "messages"
    # Non-ASCII text travels \u-escaped in the metadata and arrives intact.
    assert error["message"].endswith("(Größe).")


def test_retry_after_reaches_the_client(gateway: Gateway) -> None:
    busy = httpx.post(f"{gateway.url}/v1/chat/completions", json=chat_body(model="busy"), timeout=30.0)
    assert_openai_error(busy, 429)
    assert busy.headers["retry-after"] == "7"
    unavailable = httpx.post(
        f"{gateway.url}/v1/chat/completions", json=chat_body(model="unavailable"), timeout=30.0
    )
    assert_openai_error(unavailable, 503)
    assert unavailable.headers["retry-after"] == "5"


def test_initial_metadata_survives_a_late_error(gateway: Gateway) -> None:
    response = httpx.post(
        f"{gateway.url}/v1/chat/completions", json=chat_body(model="late-error"), timeout=30.0
    )
    assert_openai_error(response, 404, code="model_not_found")
    assert response.headers["x-lmc-cache"] == "miss"


def test_sdk_exception_classes(gateway: Gateway) -> None:
    client = sdk(gateway)
    messages: Any = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.BadRequestError) as bad_request:
        client.chat.completions.create(model="too-long", messages=messages)
    assert bad_request.value.status_code == 400
    assert bad_request.value.code == "context_length_exceeded"
    assert bad_request.value.param == "messages"
    assert bad_request.value.type == "invalid_request_error"

    with pytest.raises(openai.NotFoundError) as not_found:
        client.chat.completions.create(model="missing", messages=messages)
    assert not_found.value.code == "model_not_found"

    with pytest.raises(openai.RateLimitError) as rate_limited:
        client.chat.completions.create(model="busy", messages=messages)
    assert rate_limited.value.code == "overloaded"

    with pytest.raises(openai.InternalServerError) as unavailable:
        client.chat.completions.create(model="unavailable", messages=messages)
    assert unavailable.value.status_code == 503

    with pytest.raises(openai.InternalServerError) as crashed:
        client.chat.completions.create(model="crash", messages=messages)
    assert crashed.value.status_code == 500
    assert "crashed on purpose" in crashed.value.message

    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="missing", messages=messages, stream=True)


def test_sdk_sees_503_when_the_router_is_down(routerless_gateway: Gateway) -> None:
    client = sdk(routerless_gateway)
    with pytest.raises(openai.APIStatusError) as down:
        client.chat.completions.create(model="echo-model", messages=[{"role": "user", "content": "hi"}])
    assert down.value.status_code == 503
    assert down.value.type == "server_error"
    with pytest.raises(openai.APIStatusError) as down_stream:
        client.chat.completions.create(
            model="echo-model", messages=[{"role": "user", "content": "hi"}], stream=True
        )
    assert down_stream.value.status_code == 503
    response = httpx.get(f"{routerless_gateway.url}/v1/models", timeout=30.0)
    assert_openai_error(response, 503, type="server_error")


def test_healthz_is_envoy_and_readyz_is_the_router(gateway: Gateway, routerless_gateway: Gateway) -> None:
    assert httpx.get(f"{gateway.url}/healthz", timeout=10.0).status_code == 200
    assert httpx.get(f"{gateway.url}/readyz", timeout=10.0).status_code == 200
    assert httpx.get(f"{routerless_gateway.url}/healthz", timeout=10.0).status_code == 200
    assert_openai_error(
        httpx.get(f"{routerless_gateway.url}/readyz", timeout=10.0), 503, code="service_unavailable"
    )


MALFORMED_BODIES: dict[str, bytes] = {
    "truncated-json": b'{"model": "echo-model", "messages": [',
    "not-json": b"model=echo-model&stream=true",
    "array": b'[{"model": "echo-model"}]',
    "string": b'"hello"',
    "wrong-type-n": json.dumps(chat_body(n="two")).encode(),
    "wrong-type-messages": json.dumps({"model": "echo-model", "messages": "hi"}).encode(),
    "wrong-type-temperature": json.dumps(chat_body(temperature=[1])).encode(),
    "wrong-type-stream": json.dumps(chat_body(stream={"yes": True})).encode(),
    "huge-number": json.dumps(chat_body(max_tokens=10**30)).encode(),
    "not-utf8": b'{"model": "\xff\xfe", "messages": []}',
    "nul-bytes": b'{"model": "a\x00b"}',
}


# The transcoder reads what a method defines and drops the rest: a field of the wrong type that the
# method does not have is no error, and a raw NUL in a string reaches the Router (which decides).
ANSWERED_BODIES = {
    "/v1/chat/completions": {"nul-bytes"},
    "/v1/completions": {"nul-bytes", "wrong-type-messages"},
    "/v1/embeddings": {
        "nul-bytes", "wrong-type-n", "wrong-type-messages", "wrong-type-temperature", "wrong-type-stream",
        "huge-number",
    },
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(MALFORMED_BODIES))
@pytest.mark.parametrize("path", sorted(ANSWERED_BODIES))
def test_malformed_bodies_get_a_4xx_openai_error(gateway: Gateway, name: str, path: str) -> None:
    response = httpx.post(
        f"{gateway.url}{path}",
        content=MALFORMED_BODIES[name],
        headers={"content-type": "application/json"},
        timeout=30.0,
    )
    if name in ANSWERED_BODIES[path]:
        assert response.status_code == 200, response.text
        return
    assert_openai_error(response, 400, code="invalid_request_body", type="invalid_request_error")


def test_malformed_stream_body_is_a_400(gateway: Gateway) -> None:
    body = b'{"model": "echo-model", "stream": true, "n": "two"}'
    response = httpx.post(f"{gateway.url}/v1/chat/completions", content=body, timeout=30.0)
    assert_openai_error(response, 400, code="invalid_request_body")
    assert "n" in response.json()["error"]["message"]


def test_ten_megabyte_body_is_a_413(gateway: Gateway) -> None:
    body = json.dumps(chat_body(text="a" * (10 * 1024 * 1024))).encode()
    response = httpx.post(
        f"{gateway.url}/v1/chat/completions",
        content=body,
        headers={"content-type": "application/json"},
        timeout=60.0,
    )
    assert_openai_error(response, 413, code="request_too_large")


def test_a_body_just_under_the_default_limit_passes(gateway: Gateway) -> None:
    # Beyond Envoy's default 1 MiB buffers, within the template's 8 MiB.
    body = chat_body(text="b" * (3 * 1024 * 1024))
    response = httpx.post(f"{gateway.url}/v1/chat/completions", json=body, timeout=60.0)
    assert response.status_code == 200, response.text[:300]
    streamed = httpx.post(f"{gateway.url}/v1/chat/completions", json={**body, "stream": True}, timeout=60.0)
    assert streamed.status_code == 200, streamed.text[:300]
    assert streamed.headers["content-type"].startswith("text/event-stream")


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("POST", "/v1/nothing", 404, "unknown_url"),
        ("GET", "/", 404, "unknown_url"),
        ("POST", "/v1/chat/completion", 404, "unknown_url"),
        ("POST", "/v2/chat/completions", 404, "unknown_url"),
        ("GET", "/v1/chat/completions", 405, "method_not_allowed"),
        ("DELETE", "/v1/models", 405, "method_not_allowed"),
        ("POST", "/v1/models", 405, "method_not_allowed"),
    ],
)
def test_unknown_paths_and_methods(gateway: Gateway, method: str, path: str, status: int, code: str) -> None:
    response = httpx.request(
        method, f"{gateway.url}{path}", json={} if method == "POST" else None, timeout=30.0
    )
    assert_openai_error(response, status, code=code, type="invalid_request_error")

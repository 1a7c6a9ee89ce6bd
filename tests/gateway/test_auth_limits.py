"""API keys (401), the request body limit (413) and the local rate limit (429), REST and gRPC."""

from __future__ import annotations

import json
from collections.abc import Iterator

import grpc
import httpx
import openai
import pytest
from lmcluster.router.v1 import router_service_pb2 as pb
from lmcluster.router.v1 import router_service_pb2_grpc as pb_grpc

from tests.gateway.conftest import (
    KEYS,
    RATE_LIMIT_BURST,
    SMALL_BODY_LIMIT,
    Gateway,
    assert_openai_error,
    chat_body,
)
from tests.gateway.fake_router import FakeRouter


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def test_open_gateway_needs_no_key(gateway: Gateway) -> None:
    assert httpx.get(f"{gateway.url}/v1/models", timeout=30.0).status_code == 200


def test_missing_key_is_a_401(keyed_gateway: Gateway) -> None:
    response = httpx.get(f"{keyed_gateway.url}/v1/models", timeout=30.0)
    error = assert_openai_error(response, 401, code="invalid_api_key", type="invalid_request_error")
    assert "Authorization: Bearer" in error["message"]


@pytest.mark.parametrize(
    "authorization",
    [
        "Bearer wrong",
        f"Bearer {KEYS[0]}x",
        f"bearer{KEYS[0]}",
        f"Basic {KEYS[0]}",
        "Bearer",
        f"Bearer  {KEYS[0]}",
    ],
    ids=["wrong", "longer", "glued", "basic", "empty", "two-spaces"],
)
def test_wrong_key_is_a_401(keyed_gateway: Gateway, authorization: str) -> None:
    response = httpx.post(
        f"{keyed_gateway.url}/v1/chat/completions",
        json=chat_body(),
        headers={"authorization": authorization},
        timeout=30.0,
    )
    assert_openai_error(response, 401, code="invalid_api_key")


@pytest.mark.parametrize("key", KEYS)
def test_each_key_is_accepted_and_never_forwarded(
    keyed_gateway: Gateway, fake_router: FakeRouter, key: str
) -> None:
    response = httpx.post(
        f"{keyed_gateway.url}/v1/chat/completions",
        json=chat_body(text=key[-6:]),
        headers=bearer(key),
        timeout=30.0,
    )
    assert response.status_code == 200, response.text
    call = fake_router.calls[-1]
    assert call.method == "CreateChatCompletion"
    assert not [name for name, _ in call.metadata if name == "authorization"]
    assert not [value for _, value in call.metadata if key in value]


def test_bare_key_without_scheme_is_accepted(keyed_gateway: Gateway) -> None:
    # Envoy's api_key_auth strips a leading "Bearer " and also takes the key on its own.
    response = httpx.get(f"{keyed_gateway.url}/v1/models", headers={"authorization": KEYS[0]}, timeout=30.0)
    assert response.status_code == 200, response.text


def test_sdk_raises_authentication_error(keyed_gateway: Gateway) -> None:
    client = openai.OpenAI(base_url=keyed_gateway.base_url, api_key="sk-not-a-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as denied:
        client.models.list()
    assert denied.value.code == "invalid_api_key"
    good = openai.OpenAI(base_url=keyed_gateway.base_url, api_key=KEYS[1], max_retries=0)
    assert [model.id for model in good.models.list()] == ["fake-model"]
    stream = good.chat.completions.create(
        model="stream-error", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    with pytest.raises(openai.APIError):
        list(stream)


def test_health_endpoints_need_no_key(keyed_gateway: Gateway) -> None:
    assert httpx.get(f"{keyed_gateway.url}/healthz", timeout=10.0).status_code == 200
    assert httpx.get(f"{keyed_gateway.url}/readyz", timeout=10.0).status_code == 200


async def test_grpc_clients_need_the_key_too(keyed_gateway: Gateway) -> None:
    async with grpc.aio.insecure_channel(keyed_gateway.grpc_target) as channel:
        stub = pb_grpc.RouterServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await stub.ListModels(pb.ListModelsRequest())
        assert denied.value.code() == grpc.StatusCode.UNAUTHENTICATED
        reply = await stub.ListModels(pb.ListModelsRequest(), metadata=tuple(bearer(KEYS[0]).items()))
        assert reply.data[0].id == "fake-model"


def _chunks(data: bytes, size: int = 16 * 1024) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


def test_body_over_the_limit_is_a_413(keyed_gateway: Gateway) -> None:
    body = json.dumps(chat_body(text="c" * SMALL_BODY_LIMIT)).encode()
    headers = {**bearer(KEYS[0]), "content-type": "application/json"}
    with_length = httpx.post(
        f"{keyed_gateway.url}/v1/chat/completions", content=body, headers=headers, timeout=30.0
    )
    error = assert_openai_error(with_length, 413, code="request_too_large")
    assert str(SMALL_BODY_LIMIT) in error["message"]
    # Without Content-Length (chunked), the buffered body is measured.
    chunked = httpx.post(
        f"{keyed_gateway.url}/v1/chat/completions", content=_chunks(body), headers=headers, timeout=30.0
    )
    assert_openai_error(chunked, 413, code="request_too_large")
    streamed = httpx.post(
        f"{keyed_gateway.url}/v1/chat/completions",
        content=json.dumps(chat_body(text="c" * SMALL_BODY_LIMIT, stream=True)).encode(),
        headers=headers,
        timeout=30.0,
    )
    assert_openai_error(streamed, 413, code="request_too_large")


def test_body_under_the_limit_passes_also_chunked(keyed_gateway: Gateway) -> None:
    body = json.dumps(chat_body(text="d" * (SMALL_BODY_LIMIT - 1024))).encode()
    headers = {**bearer(KEYS[0]), "content-type": "application/json"}
    response = httpx.post(
        f"{keyed_gateway.url}/v1/chat/completions", content=_chunks(body), headers=headers, timeout=30.0
    )
    assert response.status_code == 200, response.text[:300]


def test_body_limit_is_checked_after_auth(keyed_gateway: Gateway) -> None:
    body = json.dumps(chat_body(text="e" * SMALL_BODY_LIMIT)).encode()
    response = httpx.post(f"{keyed_gateway.url}/v1/chat/completions", content=body, timeout=30.0)
    assert_openai_error(response, 401, code="invalid_api_key")


def test_rate_limit_is_a_429_with_retry_after(limited_gateway: Gateway) -> None:
    for _ in range(RATE_LIMIT_BURST):
        assert httpx.get(f"{limited_gateway.url}/v1/models", timeout=30.0).status_code == 200
    response = httpx.post(f"{limited_gateway.url}/v1/chat/completions", json=chat_body(), timeout=30.0)
    assert_openai_error(response, 429, code="rate_limit_exceeded", type="rate_limit_error")
    assert int(response.headers["retry-after"]) >= 1
    client = openai.OpenAI(base_url=limited_gateway.base_url, api_key="unused", max_retries=0)
    with pytest.raises(openai.RateLimitError):
        client.models.list()
    # Health checks are not requests against the API.
    assert httpx.get(f"{limited_gateway.url}/healthz", timeout=10.0).status_code == 200


async def test_rate_limit_answers_grpc_clients_with_resource_exhausted(limited_gateway: Gateway) -> None:
    async with grpc.aio.insecure_channel(limited_gateway.grpc_target) as channel:
        stub = pb_grpc.RouterServiceStub(channel)
        for _ in range(RATE_LIMIT_BURST):
            await stub.ListModels(pb.ListModelsRequest())
        with pytest.raises(grpc.aio.AioRpcError) as limited:
            await stub.ListModels(pb.ListModelsRequest())
        assert limited.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # gRPC clients get gRPC's answer, not OpenAI's JSON.
        assert not (limited.value.details() or "").startswith("{")

"""API keys end to end: `LMC_API_KEYS` given to `lmcluster up` reaches Envoy (a stack of its own)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import openai
import pytest
from lmcluster.router.v1 import router_service_pb2, router_service_pb2_grpc

from tests.fixtures.stack import Stack, running_stack
from tests.router.end_to_end_support import HTTP_TIMEOUT, MODEL, assert_openai_error, chat_body, system_prompt

KEYS = ("sk-lmc-first", "sk-lmc-second")


@pytest.fixture(scope="module")
def keyed_stack(tmp_path_factory: pytest.TempPathFactory, redis_stack: str, demo_models_dir: Path) -> Iterator[Stack]:
    with running_stack(
        tmp_path_factory.mktemp("keyed-stack"), redis_url=redis_stack, models_dir=demo_models_dir,
        env={"LMC_API_KEYS": ",".join(KEYS)},
    ) as stack:  # fmt: skip
        yield stack


def test_requests_without_a_valid_key_are_401(keyed_stack: Stack) -> None:
    body = chat_body("Hi", system=system_prompt())
    with httpx.Client(base_url=keyed_stack.http_url, timeout=HTTP_TIMEOUT) as http:
        missing = http.post("/v1/chat/completions", json=body)
        wrong = http.post("/v1/chat/completions", json=body, headers={"authorization": "Bearer sk-wrong"})
        models = http.get("/v1/models")
        health = http.get("/healthz")
        ready = http.get("/readyz")
    for response in (missing, wrong, models):
        assert_openai_error(response, 401, "invalid_api_key")
    assert health.status_code == ready.status_code == 200


def test_the_openai_sdk_with_a_key_works_and_without_raises(keyed_stack: Stack) -> None:
    with openai.OpenAI(base_url=keyed_stack.base_url, api_key=KEYS[1], max_retries=0, timeout=120) as api:
        answer = api.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Say yes."}], max_tokens=8
        )
    assert answer.choices[0].message.content
    with openai.OpenAI(base_url=keyed_stack.base_url, api_key="sk-not-a-key", max_retries=0, timeout=120) as api:
        with pytest.raises(openai.AuthenticationError):
            api.models.list()


def test_native_grpc_needs_the_key_too(keyed_stack: Stack) -> None:
    with grpc.insecure_channel(keyed_stack.grpc_target) as channel:
        stub = router_service_pb2_grpc.RouterServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.ListModels(router_service_pb2.ListModelsRequest(), timeout=30)
        models = stub.ListModels(
            router_service_pb2.ListModelsRequest(), timeout=30, metadata=(("authorization", f"Bearer {KEYS[0]}"),)
        )
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert MODEL in {card.id for card in models.data}

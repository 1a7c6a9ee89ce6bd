"""A Router lost between a unary answer's headers and its body costs the client nothing.

gRPC writes a unary answer's initial metadata (the Router's x-lmc-* headers) apart from the answer.
The Router below is killed right there, with REST and native gRPC calls of every unary generation
method waiting on it; Envoy must send each to the other Router, and each client gets one whole
answer. The same fault against the gateway without its `router` cluster filter shows the fault is
real: there, every one of those calls fails.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import httpx
import pytest
from google.protobuf import struct_pb2
from lmcluster.router.v1 import openai_pb2 as oa
from lmcluster.router.v1 import router_service_pb2_grpc as pb_grpc

from services.common import gateway as contract
from tests.fixtures.parts import ENVOY_TEMPLATE, RunningPart, free_port, running_part
from tests.gateway.conftest import Gateway, running_gateway, template_without_unary_hold
from tests.gateway.fake_router import EMBEDDING_DIMENSIONS, FakeRouter

# Sends before every kind has a call held by the dying Router (Envoy picks the Router with fewer
# requests in flight among two drawn at random, so most go to the answering one).
MAX_SENDS = 600
# A call is answered by the one Router or held by the other well within this.
CALL_TIMEOUT_S = 30.0

Answer = tuple[str, str]  # (x-lmc-cache, the answer's text)
Ask = Callable[[], Awaitable[Answer]]


def _askers(gateway: Gateway, http: httpx.AsyncClient, channel: grpc.aio.Channel) -> dict[str, Ask]:
    stub = pb_grpc.RouterServiceStub(channel)
    text = struct_pb2.Value(string_value="hello")

    async def rest(path: str, body: dict[str, object], read: Callable[[dict], str]) -> Answer:
        response = await http.post(f"{gateway.base_url}{path}", json=body)
        assert response.status_code == 200, response.text
        return response.headers[contract.CACHE_HEADER], read(response.json())

    async def native(call: grpc.aio.UnaryUnaryCall, read: Callable[[object], str]) -> Answer:
        reply = await call
        return dict(await call.initial_metadata())[contract.CACHE_HEADER], read(reply)

    return {
        "rest chat": lambda: rest(
            "/chat/completions",
            {"model": "echo-model", "messages": [{"role": "user", "content": "hello"}]},
            lambda body: body["choices"][0]["message"]["content"],
        ),
        "rest completion": lambda: rest(
            "/completions", {"model": "echo-model", "prompt": "hello"}, lambda body: body["choices"][0]["text"]
        ),
        "rest embedding": lambda: rest(
            "/embeddings",
            {"model": "echo-model", "input": "hello"},
            lambda body: f"{len(body['data'][0]['embedding'])} dimensions",
        ),
        "grpc chat": lambda: native(
            stub.CreateChatCompletion(
                oa.CreateChatCompletionRequest(model="echo-model", messages=[oa.ChatMessage(role="user", content=text)])
            ),
            lambda reply: reply.choices[0].message.content,  # type: ignore[attr-defined]
        ),
        "grpc completion": lambda: native(
            stub.CreateCompletion(oa.CreateCompletionRequest(model="echo-model", prompt=text)),
            lambda reply: reply.choices[0].text,  # type: ignore[attr-defined]
        ),
        "grpc embedding": lambda: native(
            stub.CreateEmbedding(oa.CreateEmbeddingRequest(model="echo-model", input=text)),
            lambda reply: f"{len(reply.data[0].embedding.list_value.values)} dimensions",  # type: ignore[attr-defined]
        ),
    }


def _headers_sent(dying: RunningPart) -> int:
    return dying.log_path.read_text().count("headers sent")


async def _hold_one_of_each(askers: dict[str, Ask], dying: RunningPart) -> dict[str, asyncio.Task[Answer]]:
    """Sends calls one at a time until the dying Router holds one of every kind. Each call either is
    answered (by the other Router) or shows up in the dying Router's log, whichever comes first."""
    held: dict[str, asyncio.Task[Answer]] = {}
    for sent in range(MAX_SENDS):
        kind = list(askers)[sent % len(askers)]
        if kind in held:
            continue
        task = asyncio.create_task(askers[kind]())
        deadline = time.monotonic() + CALL_TIMEOUT_S
        while not task.done() and _headers_sent(dying) == len(held):
            assert time.monotonic() < deadline, f"{kind}: neither answered nor held after {CALL_TIMEOUT_S} s"
            await asyncio.sleep(0.01)
        if _headers_sent(dying) > len(held):
            held[kind] = task
            if len(held) == len(askers):
                break
        else:
            task.result()  # answered by the other Router
    assert len(held) == len(askers), f"only {sorted(held)} reached the dying Router in {MAX_SENDS} sends"
    return held


@pytest.mark.parametrize("hold", [True, False], ids=["gateway", "control-without-the-filter"])
async def test_a_router_killed_after_a_unary_answers_headers_costs_no_call(
    fake_router: FakeRouter, tmp_path: Path, hold: bool
) -> None:
    dying_port = free_port()
    dying_argv = [sys.executable, "-m", "tests.gateway.dying_router", str(dying_port)]
    template = ENVOY_TEMPLATE if hold else template_without_unary_hold(tmp_path)
    routers = f"127.0.0.1:{dying_port},127.0.0.1:{fake_router.port}"
    with running_part("dying-router", dying_argv, tmp_path) as dying:
        dying.wait_until(lambda: "serving" in dying.log_path.read_text(), 30, "serving")
        with running_gateway(tmp_path / "envoy", routers, template=template) as gateway:
            async with (
                httpx.AsyncClient(timeout=60) as http,
                grpc.aio.insecure_channel(gateway.grpc_target) as channel,
            ):
                held = await _hold_one_of_each(_askers(gateway, http, channel), dying)
                await asyncio.sleep(1.0)  # the headers have crossed loopback into Envoy, even on a busy machine
                os.killpg(dying.process.pid, signal.SIGKILL)
                outcomes = dict(zip(held, await asyncio.gather(*held.values(), return_exceptions=True), strict=True))
    if hold:
        whole = {kind: f"{EMBEDDING_DIMENSIONS} dimensions" if "embedding" in kind else "echo: hello" for kind in held}
        expected = {kind: ("miss", text) for kind, text in whole.items()}
        assert outcomes == expected
    else:
        failed = {kind: outcome for kind, outcome in outcomes.items() if isinstance(outcome, BaseException)}
        assert failed.keys() == held.keys(), outcomes

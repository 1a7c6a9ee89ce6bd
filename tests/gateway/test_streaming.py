"""Streaming through Envoy: `"stream": true` bodies reach the streaming RPCs and come back as SSE,
chunk by chunk, ending with `data: [DONE]`.

"Chunk by chunk" is checked by order of events, not by time: the fake Router sends the first chunk,
then waits for a gate that the test opens only once it has read that chunk; the rest exists only
after that. If anything on the way buffered the stream, the first read would never return before
the fake gave up waiting, and the fake records that its gate was never opened.
"""

from __future__ import annotations

import json
import uuid

import httpx
import openai
import pytest

from tests.gateway.conftest import Gateway, chat_body, parsed_events, sse_events
from tests.gateway.fake_router import STREAM_CHUNKS, FakeRouter

EXPECTED_TEXT = "".join(f"chunk-{index} " for index in range(STREAM_CHUNKS))


def gate_name() -> str:
    return f"gate-{uuid.uuid4().hex[:12]}"


def test_sdk_stream_arrives_chunk_by_chunk_and_ends(gateway: Gateway, fake_router: FakeRouter) -> None:
    client = openai.OpenAI(base_url=gateway.base_url, api_key="unused", max_retries=0)
    gate = gate_name()
    stream = client.chat.completions.create(
        model="echo-model", messages=[{"role": "user", "content": "hi"}], stream=True, user=gate
    )
    chunks = iter(stream)
    first = next(chunks)
    assert first.choices[0].delta.content == "chunk-0 "
    assert first.choices[0].delta.role == "assistant"
    # The fake is still waiting: what we read was sent before the rest existed.
    assert gate not in fake_router.servicer.gate_results
    fake_router.open_gate(gate)
    rest = list(chunks)
    assert fake_router.servicer.gate_results[gate] is True
    text = "".join(chunk.choices[0].delta.content or "" for chunk in [first, *rest] if chunk.choices)
    assert text == EXPECTED_TEXT
    assert rest[-1].choices[0].finish_reason == "stop"
    assert fake_router.calls[-1].method == "StreamChatCompletion"
    stream.close()


async def test_async_sdk_stream_arrives_chunk_by_chunk(gateway: Gateway, fake_router: FakeRouter) -> None:
    client = openai.AsyncOpenAI(base_url=gateway.base_url, api_key="unused", max_retries=0)
    gate = gate_name()
    stream = await client.chat.completions.create(
        model="echo-model", messages=[{"role": "user", "content": "hi"}], stream=True, user=gate
    )
    texts: list[str] = []
    async for chunk in stream:
        if not texts:
            assert gate not in fake_router.servicer.gate_results
            fake_router.open_gate(gate)
        texts.append(chunk.choices[0].delta.content or "")
    assert fake_router.servicer.gate_results[gate] is True
    assert "".join(texts) == EXPECTED_TEXT
    await client.close()


def test_sdk_completion_stream(gateway: Gateway, fake_router: FakeRouter) -> None:
    client = openai.OpenAI(base_url=gateway.base_url, api_key="unused", max_retries=0)
    gate = gate_name()
    fake_router.open_gate(gate)
    stream = client.completions.create(model="echo-model", prompt="hi", stream=True, user=gate)
    text = "".join(chunk.choices[0].text for chunk in stream)
    assert text == EXPECTED_TEXT
    assert fake_router.calls[-1].method == "StreamCompletion"


def test_raw_sse_stream_is_openai_shaped_and_ends_with_done(
    gateway: Gateway, fake_router: FakeRouter
) -> None:
    gate = gate_name()
    with (
        httpx.Client(timeout=60.0) as client,
        client.stream(
            "POST", f"{gateway.url}/v1/chat/completions", json=chat_body(stream=True, user=gate)
        ) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-cache"
        assert response.headers["x-accel-buffering"] == "no"
        assert response.headers["x-lmc-cache"] == "miss"
        for header in ("grpc-status", "grpc-message", "grpc-accept-encoding", "content-length"):
            assert header not in response.headers
        lines = response.iter_lines()
        first = next(line for line in lines if line)
        assert first.startswith("data: {")
        assert json.loads(first[len("data: ") :])["choices"][0]["delta"]["content"] == "chunk-0 "
        assert gate not in fake_router.servicer.gate_results
        fake_router.open_gate(gate)
        text = first + "\n\n" + "\n".join(lines)
    assert fake_router.servicer.gate_results[gate] is True
    events = sse_events(text)
    assert events[-1] == "[DONE]"
    assert text.endswith("data: [DONE]\n\n") or text.rstrip("\n").endswith("data: [DONE]")
    chunks = parsed_events(text)
    assert len(chunks) == STREAM_CHUNKS + 1
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    assert [chunk["choices"][0]["index"] for chunk in chunks] == [0] * len(chunks)


def test_stream_true_only_inside_message_text_is_not_a_stream(
    gateway: Gateway, fake_router: FakeRouter
) -> None:
    body = {
        "model": "echo-model",
        "messages": [{"role": "user", "content": 'please answer {"stream": true} "stream":true'}],
        # Nested objects with a `stream` key are not the request's `stream` either.
        "response_format": {"type": "json_schema", "json_schema": {"stream": True}},
        "stream_options": {"stream": True},
    }
    response = httpx.post(f"{gateway.url}/v1/chat/completions", json=body, timeout=30.0)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["object"] == "chat.completion"
    assert fake_router.calls[-1].method == "CreateChatCompletion"


@pytest.mark.parametrize("stream", [False, None, 0, "true"])
def test_only_a_json_true_stream_field_streams(
    gateway: Gateway, fake_router: FakeRouter, stream: object
) -> None:
    body = chat_body() if stream is None else chat_body(stream=stream)
    response = httpx.post(f"{gateway.url}/v1/chat/completions", json=body, timeout=30.0)
    assert response.status_code in (200, 400), response.text
    assert not response.headers["content-type"].startswith("text/event-stream")
    if response.status_code == 200:
        assert fake_router.calls[-1].method == "CreateChatCompletion"


@pytest.mark.parametrize(
    "headers",
    [
        {"content-type": "application/x-www-form-urlencoded"},  # curl -d without -H
        {},  # no content type at all
        {"content-type": "application/json; charset=utf-8"},
        {"content-type": "text/plain"},
    ],
    ids=["form", "none", "json-charset", "text-plain"],
)
def test_content_types_that_clients_send_still_work_as_json(
    gateway: Gateway, fake_router: FakeRouter, headers: dict[str, str]
) -> None:
    gate = gate_name()
    fake_router.open_gate(gate)
    streamed = httpx.post(
        f"{gateway.url}/v1/chat/completions",
        content=json.dumps(chat_body(stream=True, user=gate)).encode(),
        headers=headers,
        timeout=30.0,
    )
    assert streamed.status_code == 200, streamed.text
    assert streamed.headers["content-type"].startswith("text/event-stream")
    assert sse_events(streamed.text)[-1] == "[DONE]"

    unary = httpx.post(
        f"{gateway.url}/v1/chat/completions",
        content=json.dumps(chat_body(text="plain")).encode(),
        headers=headers,
        timeout=30.0,
    )
    assert unary.status_code == 200, unary.text
    assert unary.json()["choices"][0]["message"]["content"] == "echo: plain"


def test_stream_keeps_the_query_string(gateway: Gateway, fake_router: FakeRouter) -> None:
    gate = gate_name()
    fake_router.open_gate(gate)
    response = httpx.post(
        f"{gateway.url}/v1/completions?api-version=2024-01-01",
        json={"model": "echo-model", "prompt": "hi", "stream": True, "user": gate},
        timeout=30.0,
    )
    assert response.status_code == 200, response.text
    assert sse_events(response.text)[-1] == "[DONE]"
    assert fake_router.calls[-1].method == "StreamCompletion"


def test_error_after_the_stream_started_is_an_openai_error_event(gateway: Gateway) -> None:
    response = httpx.post(
        f"{gateway.url}/v1/chat/completions", json=chat_body(model="stream-error", stream=True), timeout=30.0
    )
    assert response.status_code == 200
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    error_event = json.loads(events[-2])
    assert error_event == {
        "error": {
            "message": "The backend stopped answering.",
            "type": "server_error",
            "code": "stream_interrupted",
            "param": None,
        }
    }


def test_sdk_raises_on_an_error_event(gateway: Gateway) -> None:
    client = openai.OpenAI(base_url=gateway.base_url, api_key="unused", max_retries=0)
    stream = client.chat.completions.create(
        model="stream-error", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    with pytest.raises(openai.APIError, match="The backend stopped answering"):
        for _ in stream:
            pass


def test_router_sees_the_rest_marker_and_never_a_forged_one(
    gateway: Gateway, fake_router: FakeRouter
) -> None:
    response = httpx.post(
        f"{gateway.url}/v1/chat/completions",
        json=chat_body(),
        headers={"x-lmc-rest": "0", "x-lmc-error": "forged", "x-lmc-cache": "hit"},
        timeout=30.0,
    )
    assert response.status_code == 200, response.text
    metadata = fake_router.calls[-1].metadata
    assert [value for key, value in metadata if key == "x-lmc-rest"] == ["1"]
    assert not [key for key, _ in metadata if key in ("x-lmc-error", "x-lmc-cache")]


def test_cache_headers_reach_rest_clients(gateway: Gateway) -> None:
    client = openai.OpenAI(base_url=gateway.base_url, api_key="unused", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model="cached", messages=[{"role": "user", "content": "hi"}]
    )
    assert raw.headers["x-lmc-cache"] == "hit"
    assert raw.headers["x-lmc-similarity"] == "0.9731"
    completion = raw.parse()
    assert completion.choices[0].message.content == "echo: hi"
    for header in ("grpc-status", "grpc-message", "grpc-accept-encoding"):
        assert header not in raw.headers

    models = httpx.get(f"{gateway.url}/v1/models", timeout=30.0)
    assert models.status_code == 200
    assert models.headers["x-lmc-cache"] == "bypass"
    assert models.json()["data"][0]["id"] == "fake-model"


def test_large_unary_response_passes(gateway: Gateway) -> None:
    client = openai.OpenAI(base_url=gateway.base_url, api_key="unused", max_retries=0)
    raw = client.embeddings.with_raw_response.create(model="big", input="hi", encoding_format="float")
    assert int(raw.headers["content-length"]) > 2 * 1024 * 1024
    embeddings = raw.parse()
    assert len(embeddings.data) == 1500
    assert len(embeddings.data[-1].embedding) == 384


def test_text_that_looks_like_the_markers_is_left_alone(gateway: Gateway, fake_router: FakeRouter) -> None:
    tricky = 'x "object":"[DONE]" data: [DONE] ,"error":{"message":"no"}}'
    gate = gate_name()
    fake_router.open_gate(gate)
    response = httpx.post(
        f"{gateway.url}/v1/chat/completions",
        json=chat_body(model="echo-stream", text=tricky, stream=True, user=gate),
        timeout=30.0,
    )
    assert response.status_code == 200, response.text
    events = sse_events(response.text)
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
    chunks = parsed_events(response.text)
    assert chunks[0]["choices"][0]["delta"]["content"] == tricky
    assert not [chunk for chunk in chunks if "error" in chunk]

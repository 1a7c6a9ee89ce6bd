"""Every request field is understood or refused, through the real Envoy and the session's stack.

Envoy's transcoder drops body fields that the request message lacks; the gateway lists the body's
keys so that the Router refuses the unknown ones with a 400 naming them, as OpenAI does. llama.cpp's
sampling extras (grammar, json_schema, repeat_penalty, ...) reach llama-server and are part of the
cache scope. OpenAI fields no backend here can honour are refused; bookkeeping ones are accepted.
"""

from __future__ import annotations

import json

import grpc
import openai
import pytest
from google.protobuf import struct_pb2
from lmcluster.router.v1 import openai_pb2 as oa

from tests.fixtures.stack import Stack
from tests.router.end_to_end_support import (
    MODEL,
    assert_openai_error,
    chat_body,
    client,
    nonce,
    post_until_hit,
    system_prompt,
)


def sdk(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.base_url, api_key="not-needed", timeout=120.0, max_retries=0)


# --- unknown fields ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/v1/chat/completions", chat_body("Hi", repeat_penalti=1.2), "repeat_penalti"),
        ("/v1/chat/completions", chat_body("Hi", stream=True, grammer='root ::= "a"'), "grammer"),
        ("/v1/chat/completions", chat_body("Hi", stream_options={"include_usag": True}), "stream_options.include_usag"),
        ("/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 4, "top_kk": 3}, "top_kk"),
        ("/v1/embeddings", {"model": "all-MiniLM-L6-v2", "input": "Hi", "dimension": 8}, "dimension"),
    ],
)
def test_an_unknown_field_is_a_400_naming_it(stack: Stack, path: str, body: dict, field: str) -> None:
    with client(stack) as http:
        response = http.post(path, json=body)
    error = assert_openai_error(response, 400, "unknown_parameter")
    assert error["param"] == field
    assert field in error["message"], error


def test_an_unknown_field_inside_a_message_is_named(stack: Stack) -> None:
    body = chat_body("Hi")
    body["messages"][0]["weight"] = 2
    with client(stack) as http:
        response = http.post("/v1/chat/completions", json=body)
    assert assert_openai_error(response, 400, "unknown_parameter")["param"] == "messages.weight"


def test_free_form_objects_keep_their_own_keys(stack: Stack) -> None:
    # Keys inside content parts, JSON Schemas, logit_bias and metadata are the client's own.
    body = chat_body(f"[{nonce()}] Answer yes or no: is the sky blue?", max_tokens=8)
    body["messages"][-1]["content"] = [{"type": "text", "text": body["messages"][-1]["content"]}]
    body["response_format"] = {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": {"type": "object", "properties": {"yes": {"type": "boolean"}}}},
    }
    body["logit_bias"] = {"100": -1}
    body["metadata"] = {"ticket": "T-1"}
    with client(stack) as http:
        response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text


async def test_native_grpc_unknown_field_is_refused(stack: Stack) -> None:
    request = oa.CreateChatCompletionRequest(
        model=MODEL, messages=[oa.ChatMessage(role="user", content=struct_pb2.Value(string_value="Hi"))]
    )
    # Field 900 (varint 1): what a client built from a newer or foreign proto would send.
    payload = request.SerializeToString() + bytes([0xA0, 0x38, 0x01])
    async with grpc.aio.insecure_channel(stack.grpc_target) as channel:
        call = channel.unary_unary(
            "/lmcluster.router.v1.RouterService/CreateChatCompletion",
            request_serializer=lambda raw: raw,
            response_deserializer=oa.CreateChatCompletionResponse.FromString,
        )
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await call(payload, timeout=30)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "field number 900" in (raised.value.details() or "")


# --- llama.cpp's sampling extras ----------------------------------------------------------------------


def test_grammar_is_honoured_in_chat_and_completions(stack: Stack) -> None:
    grammar = 'root ::= "yes" | "no"'
    with sdk(stack) as api:
        chat = api.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"[{nonce()}] Is water wet?"}], max_tokens=8,
            extra_body={"grammar": grammar},
        )  # fmt: skip
        text = api.completions.create(
            model=MODEL, prompt=f"[{nonce()}] Is fire cold? Answer:", max_tokens=8, extra_body={"grammar": grammar}
        )
    assert chat.choices[0].message.content in ("yes", "no"), chat
    assert text.choices[0].text in ("yes", "no"), text


def test_json_schema_extra_gives_json_that_follows_it(stack: Stack) -> None:
    schema = {"type": "object", "properties": {"colour": {"type": "string", "enum": ["red", "blue"]}}, "required": ["colour"]}
    with sdk(stack) as api:
        answer = api.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"[{nonce()}] Pick a colour."}], max_tokens=24,
            extra_body={"json_schema": schema},
        )  # fmt: skip
    assert json.loads(answer.choices[0].message.content or "")["colour"] in ("red", "blue"), answer


def test_n_probs_returns_logprobs(stack: Stack) -> None:
    with client(stack) as http:
        response = http.post("/v1/chat/completions", json=chat_body(f"[{nonce()}] Say hi.", max_tokens=3, n_probs=2))
    assert response.status_code == 200, response.text
    logprobs = response.json()["choices"][0]["logprobs"]
    assert logprobs and logprobs["content"], response.text
    assert all(len(token["top_logprobs"]) == 2 for token in logprobs["content"]), logprobs


def test_sampling_extras_are_part_of_the_cache_scope(stack: Stack) -> None:
    body = chat_body("What is the capital of Italy?", system=system_prompt(), max_tokens=8, repeat_penalty=1.0, top_k=1)
    with client(stack) as http:
        post_until_hit(http, "/v1/chat/completions", body)
        for changed in ({"repeat_penalty": 1.3}, {"mirostat": 2}, {"grammar": 'root ::= "Rome"'}, {"samplers": ["top_k"]}):
            response = http.post("/v1/chat/completions", json={**body, **changed})
            assert response.status_code == 200, response.text
            assert response.headers["x-lmc-cache"] == "miss", (changed, response.headers)


def test_bad_extra_values_are_400s(stack: Stack) -> None:
    with client(stack) as http:
        mirostat = http.post("/v1/chat/completions", json=chat_body("Hi", mirostat=7))
        both = http.post("/v1/chat/completions", json=chat_body("Hi", grammar='root ::= "a"', json_schema={}))
        typical = http.post("/v1/chat/completions", json=chat_body("Hi", typical_p=3))
    assert assert_openai_error(mirostat, 400)["param"] == "mirostat"
    assert assert_openai_error(both, 400)["param"] == "grammar"
    assert assert_openai_error(typical, 400)["param"] == "typical_p"


# --- OpenAI's own fields ---------------------------------------------------------------------------------


def test_openai_bookkeeping_fields_are_accepted(stack: Stack) -> None:
    with sdk(stack) as api:
        answer = api.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"[{nonce()}] Say hi."}], max_completion_tokens=4,
            metadata={"ticket": "T-1"}, service_tier="auto", store=False, prompt_cache_key="k", safety_identifier="u1",
            modalities=["text"], reasoning_effort="low",
        )  # fmt: skip
    assert answer.choices[0].message.content is not None


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"store": True}, "store"),
        ({"audio": {"voice": "alloy", "format": "wav"}, "modalities": ["text", "audio"]}, "audio"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"web_search_options": {}}, "web_search_options"),
        ({"service_tier": "priority"}, "service_tier"),
        ({"functions": [{"name": "f", "parameters": {}}]}, "functions"),
    ],
)
def test_openai_fields_no_backend_honours_are_refused(stack: Stack, extra: dict, field: str) -> None:
    with client(stack) as http:
        response = http.post("/v1/chat/completions", json=chat_body("Hi", **extra))
    assert assert_openai_error(response, 400)["param"] == field


# --- one model, and what a model reads ---------------------------------------------------------------------


def test_sdk_retrieves_one_model_by_id_alias_and_base_id(stack: Stack) -> None:
    with sdk(stack) as api:
        listed = {card.id: card for card in api.models.list().data}
        for name in listed:
            model = api.models.retrieve(name)
            assert model.id == name and model.object == "model", model
        with pytest.raises(openai.NotFoundError) as missing:
            api.models.retrieve("nobody/no-such/model.gguf")
    assert any(name.count("/") == 2 for name in listed), listed  # full ids have slashes
    assert missing.value.code == "model_not_found"


def test_get_model_with_raw_slashes(stack: Stack) -> None:
    with client(stack) as http:
        listed = http.get("/v1/models").json()["data"]
        full = next(card["id"] for card in listed if card["id"].count("/") == 2)
        response = http.get(f"/v1/models/{full}")
    assert response.status_code == 200, response.text
    assert response.json()["id"] == full


def test_image_part_to_a_model_without_a_projector_is_a_400(stack: Stack) -> None:
    pixel = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
    body = chat_body("What is in the picture?")
    body["messages"][-1]["content"] = [
        {"type": "text", "text": "What is in the picture?"},
        {"type": "image_url", "image_url": {"url": pixel}},
    ]
    audio = chat_body("What is said?")
    audio["messages"][-1]["content"] = [{"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}}]
    with client(stack) as http:
        image_error = assert_openai_error(http.post("/v1/chat/completions", json=body), 400, "unsupported_content")
        stream_error = assert_openai_error(
            http.post("/v1/chat/completions", json={**body, "stream": True}), 400, "unsupported_content"
        )
        audio_error = assert_openai_error(http.post("/v1/chat/completions", json=audio), 400, "unsupported_content")
    assert "takes no images" in image_error["message"], image_error
    assert "takes no images" in stream_error["message"], stream_error
    assert "takes no audio" in audio_error["message"], audio_error


def test_no_empty_tool_calls_where_openai_omits_them(stack: Stack) -> None:
    body = chat_body(f"[{nonce()}] Say hello.", max_tokens=6)
    with client(stack) as http:
        unary = http.post("/v1/chat/completions", json=body)
        with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as streamed:
            events = [line for line in streamed.iter_lines() if line.startswith("data: {")]
    assert unary.status_code == 200, unary.text
    assert "tool_calls" not in unary.json()["choices"][0]["message"], unary.text
    assert events and all("tool_calls" not in json.loads(event[6:])["choices"][0]["delta"]
                          for event in events if json.loads(event[6:]).get("choices")), events  # fmt: skip

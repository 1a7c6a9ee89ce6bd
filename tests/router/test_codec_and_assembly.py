"""Request validation, the body llama-server gets, and chunks ↔ whole answers."""

from __future__ import annotations

import pytest
from google.protobuf import json_format
from lmcluster.router.v1 import openai_pb2 as pb

from services.router import assembly, codec
from services.router.errors import InvalidRequest


def chat(**fields) -> pb.CreateChatCompletionRequest:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    return json_format.ParseDict(body, pb.CreateChatCompletionRequest())


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"model": " "}, "model"),
        ({"messages": []}, "messages"),
        ({"temperature": 3.5}, "temperature"),
        ({"top_p": -0.1}, "top_p"),
        ({"n": 3}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": 5}, "stop"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user"}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": 42}]}, "messages[0]"),
    ],
)
def test_invalid_chat_requests_name_the_field(fields: dict, param: str) -> None:
    with pytest.raises(InvalidRequest) as error:
        codec.validate(chat(**fields))
    assert error.value.param == param


def test_backend_body_keeps_the_clients_fields_and_drops_ours() -> None:
    request = chat(temperature=0.2, seed=7, max_completion_tokens=5, cache={"skip_lookup": True}, user="u1",
                   messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}]}])
    body = codec.backend_body(request, backend_model="alias", stream=True)
    assert body["seed"] == 7 and body["max_tokens"] == 5 and body["model"] == "alias"
    assert body["messages"][0]["content"] == [{"type": "text", "text": "hi"}]
    assert body["stream_options"] == {"include_usage": True}
    assert "cache" not in body and "user" not in body


def test_completion_prompts() -> None:
    ok = json_format.ParseDict({"model": "m", "prompt": ["once"]}, pb.CreateCompletionRequest())
    codec.validate(ok)
    assert codec.backend_body(ok, backend_model="a", stream=False)["prompt"] == "once"
    many = json_format.ParseDict({"model": "m", "prompt": ["a", "b"]}, pb.CreateCompletionRequest())
    with pytest.raises(InvalidRequest):
        codec.validate(many)
    missing = json_format.ParseDict({"model": "m"}, pb.CreateCompletionRequest())
    with pytest.raises(InvalidRequest):
        codec.validate(missing)


def llama_chunks() -> list[dict]:
    base = {"id": "c1", "created": 1795558240, "object": "chat.completion.chunk", "model": "x"}
    return [
        {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": None}, "finish_reason": None}]},
        {**base, "choices": [{"index": 0, "delta": {"content": "Hello"}, "finish_reason": None}]},
        {**base, "choices": [{"index": 0, "delta": {"content": " world"}, "finish_reason": None}]},
        {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
        {**base, "choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}},
    ]


def test_chunks_assemble_into_a_chat_completion() -> None:
    assembler = assembly.ChatAssembler()
    for event in llama_chunks():
        assembler.add(event)
    response = assembler.response("model-id")
    assert assembler.finished and not assembler.truncated
    assert response.choices[0].message.content == "Hello world"
    assert response.choices[0].finish_reason == "stop"
    assert response.usage.total_tokens == 11 and response.model == "model-id"


def test_a_stored_answer_replays_as_the_same_text_with_usage() -> None:
    assembler = assembly.ChatAssembler()
    for event in llama_chunks():
        assembler.add(event)
    response = assembler.response("m")
    response.choices[0].message.content = "A longer answer that needs several chunks to replay."
    chunks = assembly.replay_chat(response, include_usage=True)
    text = "".join(c.choices[0].delta.content for c in chunks if c.choices)
    assert text == response.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert not chunks[-1].choices and chunks[-1].usage.total_tokens == 11


def test_tool_call_fragments_are_merged() -> None:
    assembler = assembly.ChatAssembler()
    base = {"id": "c", "created": 1, "object": "chat.completion.chunk"}
    assembler.add({**base, "choices": [{"index": 0, "delta": {"tool_calls": [
        {"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"ci"}}]}}]})
    assembler.add({**base, "choices": [{"index": 0, "delta": {"tool_calls": [
        {"index": 0, "function": {"arguments": "ty\": \"Oslo\"}"}}]}, "finish_reason": "tool_calls"}]})
    message = assembler.response("m").choices[0].message
    assert message.tool_calls[0].function.name == "get_weather"
    assert message.tool_calls[0].function.arguments == '{"city": "Oslo"}'
    assert not message.HasField("content")

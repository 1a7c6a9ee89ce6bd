"""The unknown-field check on its own (services/router/fields.py): pure logic on the real descriptors."""

from __future__ import annotations

import json

import pytest
from google.protobuf import struct_pb2
from lmcluster.router.v1 import openai_pb2 as oa

from services.router import fields

CHAT = oa.CreateChatCompletionRequest.DESCRIPTOR


def chat_request() -> oa.CreateChatCompletionRequest:
    request = oa.CreateChatCompletionRequest(model="m", grammar='root ::= "a"')
    request.messages.add(role="user").content.CopyFrom(struct_pb2.Value(string_value="hi"))
    request.tools.add(type="function").function.name = "f"
    return request


def test_a_complete_native_request_passes() -> None:
    fields.check_fields(chat_request(), ())


def test_an_unknown_field_number_inside_a_message_is_named() -> None:
    request = chat_request()
    message = oa.ChatMessage(role="user")
    raw = message.SerializeToString() + bytes([0xA0, 0x38, 0x01])  # field 900
    request.messages.add().MergeFromString(raw)
    assert fields.unknown_message_field(request) == "messages[1].field number 900"


@pytest.mark.parametrize(
    ("paths", "unknown"),
    [
        ([["model"], ["messages", "role"], ["messages", "tool_calls", "function", "name"]], None),
        ([["maxTokens"], ["stream_options", "include_usage"]], None),  # proto JSON names too
        ([["response_format", "json_schema", "schema", "x"], ["logit_bias", "42"], ["metadata", "k"]], None),
        ([["messages", "content", "image_url", "url"]], None),
        ([["grammer"]], "grammer"),
        ([["messages", "weight"]], "messages.weight"),
        ([["cache", "skip"]], "cache.skip"),
    ],
)
def test_body_key_paths(paths: list[list[str]], unknown: str | None) -> None:
    assert fields.unknown_body_field(CHAT, paths) == unknown
    metadata = ((fields.BODY_FIELDS_METADATA, json.dumps(paths)),)
    if unknown is None:
        fields.check_fields(oa.CreateChatCompletionRequest(), metadata)
    else:
        with pytest.raises(fields.UnknownField) as raised:
            fields.check_fields(oa.CreateChatCompletionRequest(), metadata)
        assert raised.value.param == unknown

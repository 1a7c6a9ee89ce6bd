"""services/common/gateway.py: the Router's helpers produce what Envoy's side expects."""

from __future__ import annotations

import json

from lmcluster.router.v1 import openai_pb2 as oa

from services.common import gateway


def test_error_json_is_ascii_and_openai_shaped() -> None:
    text = gateway.openai_error_json(
        'zu groß: "quoted"\n', "invalid_request_error", "context_length_exceeded", "messages"
    )
    assert text.isascii()
    assert json.loads(text) == {
        "error": {
            "message": 'zu groß: "quoted"\n',
            "type": "invalid_request_error",
            "param": "messages",
            "code": "context_length_exceeded",
        }
    }


def test_long_messages_are_clipped() -> None:
    text = gateway.openai_error_json("x" * 10_000, "server_error", None)
    message = json.loads(text)["error"]["message"]
    assert len(message) == gateway.MAX_ERROR_MESSAGE_CHARS
    assert message.endswith("...")


def test_stream_end_and_error_chunk() -> None:
    end = gateway.stream_end(oa.CreateCompletionStreamResponse)
    assert end.object == gateway.STREAM_END_OBJECT == "[DONE]"
    chunk = gateway.error_chunk(oa.CreateChatCompletionStreamResponse, "gone", type="server_error", code=None)
    assert chunk.HasField("error")
    assert (chunk.error.message, chunk.error.type, chunk.error.code, chunk.error.param) == (
        "gone",
        "server_error",
        "",
        "",
    )

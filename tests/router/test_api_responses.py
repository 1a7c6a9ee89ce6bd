"""OpenAI's Responses API (`POST /v1/responses`) through the real Envoy, with the openai SDK.

It is answered as a chat completion, so the same cache and routing apply; streams are OpenAI's
event sequence. What it cannot answer (tools, stored responses) is a 400 naming the field.
"""

from __future__ import annotations

import json

import openai
import pytest

from tests.fixtures.stack import DEMO_MODEL_ID, Stack
from tests.router.end_to_end_support import MODEL, assert_openai_error, client, nonce, until


def sdk(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.base_url, api_key="not-needed", timeout=120.0, max_retries=0)


def test_text_in_text_out_with_instructions_and_then_a_cache_hit(stack: Stack) -> None:
    request = {
        "model": MODEL, "instructions": f"You answer briefly. Session {nonce()}.",
        "input": "What is the capital of France?", "max_output_tokens": 12, "temperature": 0,
    }  # fmt: skip
    with sdk(stack) as api:
        first = api.responses.with_raw_response.create(**request)
        answer = first.parse()

        def hit() -> openai.types.responses.Response | None:
            again = api.responses.with_raw_response.create(**request)
            return again.parse() if again.headers.get("x-lmc-cache") == "hit" else None

        cached = until(hit, 30.0, "a cached response")
    assert first.headers["x-lmc-cache"] == "miss"
    assert answer.object == "response" and answer.id.startswith("resp_")
    assert answer.model == DEMO_MODEL_ID
    assert answer.status in ("completed", "incomplete")
    assert answer.output_text.strip()
    assert answer.output[0].type == "message" and answer.output[0].role == "assistant"
    assert answer.usage is not None and answer.usage.output_tokens > 0
    assert answer.usage.total_tokens == answer.usage.input_tokens + answer.usage.output_tokens
    assert answer.instructions == request["instructions"]
    assert cached.output_text == answer.output_text and cached.id != answer.id


def test_a_stream_is_openai_s_event_sequence(stack: Stack) -> None:
    with sdk(stack) as api:
        events = list(
            api.responses.create(model=MODEL, input=f"[{nonce()}] Name three colours.", max_output_tokens=16, stream=True)
        )
    kinds = [event.type for event in events]
    assert kinds[:3] == ["response.created", "response.output_item.added", "response.content_part.added"], kinds
    assert kinds[-4:-1] == ["response.output_text.done", "response.content_part.done", "response.output_item.done"], kinds
    assert kinds[-1] in ("response.completed", "response.incomplete"), kinds
    assert set(kinds[3:-4]) == {"response.output_text.delta"}, kinds
    assert [event.sequence_number for event in events] == list(range(len(events)))
    text = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert text.strip()
    assert events[-4].text == text
    final = events[-1].response
    assert final.output_text == text and final.usage is not None and final.usage.output_tokens > 0


def test_message_list_input_and_json_schema_text_format(stack: Stack) -> None:
    schema = {"type": "object", "properties": {"colour": {"type": "string", "enum": ["red", "blue"]}},
              "required": ["colour"], "additionalProperties": False}  # fmt: skip
    with sdk(stack) as api:
        answer = api.responses.create(
            model=MODEL, max_output_tokens=24,
            input=[
                {"role": "developer", "content": "Answer in JSON."},
                {"role": "user", "content": [{"type": "input_text", "text": f"[{nonce()}] Pick a colour."}]},
            ],
            text={"format": {"type": "json_schema", "name": "pick", "schema": schema, "strict": True}},
        )  # fmt: skip
    assert json.loads(answer.output_text)["colour"] in ("red", "blue"), answer


@pytest.mark.parametrize(
    ("extra", "field", "code"),
    [
        ({"tools": [{"type": "function", "name": "f", "parameters": {}}]}, "tools", "unsupported_parameter"),
        ({"previous_response_id": "resp_1"}, "previous_response_id", "unsupported_parameter"),
        ({"background": True}, "background", "unsupported_parameter"),
        ({"max_tool_calls": 2}, "max_tool_calls", "unknown_parameter"),
        ({"input": [{"type": "function_call_output", "call_id": "c", "output": "x"}]}, "input[0]", "unsupported_parameter"),
    ],
)
def test_what_a_chat_completion_cannot_answer_is_a_400(stack: Stack, extra: dict, field: str, code: str) -> None:
    body = {"model": MODEL, "input": "Hi", "max_output_tokens": 4, **extra}
    with client(stack) as http:
        unary = http.post("/v1/responses", json=body)
        streamed = http.post("/v1/responses", json={**body, "stream": True})
    assert assert_openai_error(unary, 400, code)["param"] == field
    assert assert_openai_error(streamed, 400, code)["param"] == field

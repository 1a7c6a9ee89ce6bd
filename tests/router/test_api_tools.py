"""Tool calling end to end: the openai SDK and raw SSE through the real Envoy, Router and llama-server.

llama-server parses tool calls only when the model's chat template describes tools. The demo
model's own template does not, so this module's stack gives it one through the Supervisor's
per-model arguments: `LMC_SUPERVISOR_MODEL_ARGS={"<alias>": ["--chat-template-file", PATH]}` with
tests/data/templates/chatml-tools.jinja (ChatML, calls as `<tool_call>{"name", "arguments"}</tool_call>`,
the Hermes / Qwen 2.5 style that llama-server's template analysis recognises).

The grammar llama-server builds for `tool_choice: "required"` still lets text come before the first
`<tool_call>`, and a 135M model left alone talks instead of calling. So the conversations here show
the model two earlier calls and their results first (few-shot), as a client's history would.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.fixtures.stack import Stack, running_stack
from tests.router.end_to_end_support import HTTP_TIMEOUT, MODEL, nonce, sse_payloads

TEMPLATE = Path(__file__).resolve().parents[1] / "data" / "templates" / "chatml-tools.jinja"

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


@pytest.fixture(scope="module")
def tools_stack(tmp_path_factory: pytest.TempPathFactory, redis_stack: str, demo_models_dir: Path) -> Iterator[Stack]:
    env = {"LMC_SUPERVISOR_MODEL_ARGS": json.dumps({MODEL: ["--chat-template-file", str(TEMPLATE)]})}
    with running_stack(tmp_path_factory.mktemp("tools-stack"), redis_url=redis_stack, models_dir=demo_models_dir, env=env) as stack:
        yield stack


@pytest.fixture(scope="module")
def sdk(tools_stack: Stack) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=tools_stack.base_url, api_key="not-needed", max_retries=0, timeout=120) as client:
        yield client


def _call(call_id: str, city: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}


def conversation(city: str = "Paris") -> list[dict[str, Any]]:
    """Two earlier questions answered with a call and its result, then the question of the test."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": f"You are a weather assistant. Session {nonce()}."}]
    for number, (earlier, weather) in enumerate((("London", "rainy"), ("Rome", "sunny")), start=1):
        messages += [
            {"role": "user", "content": f"What is the weather in {earlier}?"},
            {"role": "assistant", "content": None, "tool_calls": [_call(f"call_{number}", earlier)]},
            {"role": "tool", "tool_call_id": f"call_{number}", "content": weather},
            {"role": "assistant", "content": f"It is {weather} in {earlier}."},
        ]
    messages.append({"role": "user", "content": f"What is the weather in {city}?"})
    return messages


def assert_weather_calls(calls: list[Any], city: str = "Paris") -> None:
    assert calls, "no tool calls"
    for call in calls:
        assert call.type == "function", call
        assert call.id, call
        assert call.function.name == "get_weather", call
        assert json.loads(call.function.arguments)["city"] == city, call


@pytest.mark.parametrize("tool_choice", ["required", "auto"])
def test_unary_tool_call(sdk: openai.OpenAI, tool_choice: str) -> None:
    raw = sdk.chat.completions.with_raw_response.create(
        model=MODEL, messages=conversation(), tools=[WEATHER], tool_choice=tool_choice, temperature=0, max_tokens=48,
    )  # fmt: skip
    # Tool calls act on live data: never answered from the cache.
    assert raw.headers["x-lmc-cache"] == "bypass", raw.headers
    answer = raw.parse()
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert choice.message.role == "assistant"
    assert not choice.message.content, choice.message
    assert_weather_calls(choice.message.tool_calls or [])


@pytest.mark.parametrize("tool_choice", ["required", "auto"])
def test_streamed_tool_call(sdk: openai.OpenAI, tool_choice: str) -> None:
    stream = sdk.chat.completions.create(
        model=MODEL, messages=conversation("Berlin"), tools=[WEATHER], tool_choice=tool_choice, temperature=0,
        max_tokens=48, stream=True,
    )  # fmt: skip
    calls: dict[int, dict[str, Any]] = {}
    finish_reasons = []
    for chunk in stream:
        for choice in chunk.choices:
            for fragment in choice.delta.tool_calls or []:
                call = calls.setdefault(fragment.index, {"id": "", "type": "", "name": "", "arguments": ""})
                call["id"] = call["id"] or fragment.id or ""
                call["type"] = call["type"] or fragment.type or ""
                if fragment.function is not None:
                    call["name"] += fragment.function.name or ""
                    call["arguments"] += fragment.function.arguments or ""
            if choice.finish_reason:
                finish_reasons.append(choice.finish_reason)
    assert finish_reasons == ["tool_calls"], finish_reasons
    assert calls, "no tool call fragments"
    for call in calls.values():
        assert call["id"] and call["type"] == "function", call
        assert call["name"] == "get_weather", call
        assert json.loads(call["arguments"]) == {"city": "Berlin"}, call


def test_streamed_tool_call_events_are_openai_shaped(tools_stack: Stack) -> None:
    # Raw SSE: each call's first fragment names it (index, id, type, name); later fragments carry
    # only arguments; no `"tool_calls": []` in chunks without calls; [DONE] last.
    body = {
        "model": MODEL, "messages": conversation("Madrid"), "tools": [WEATHER], "tool_choice": "required",
        "temperature": 0, "max_tokens": 48, "stream": True,
    }  # fmt: skip
    with httpx.Client(base_url=tools_stack.http_url, timeout=HTTP_TIMEOUT) as http:
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            payloads = sse_payloads(response.iter_lines())
    assert payloads[-1] == "[DONE]", payloads[-3:]
    fragments = []
    for payload in payloads[:-1]:
        assert '"tool_calls":[]' not in payload.replace(" ", ""), payload
        for choice in json.loads(payload)["choices"]:
            fragments += choice.get("delta", {}).get("tool_calls", [])
    assert fragments, payloads
    first, rest = fragments[0], fragments[1:]
    assert first["index"] == 0 and first["id"] and first["type"] == "function", first
    assert first["function"]["name"] == "get_weather", first
    for fragment in rest:
        assert fragment["index"] == 0, fragment
        assert "id" not in fragment and "type" not in fragment, fragment
        assert not fragment["function"].get("name"), fragment
    arguments = "".join(fragment["function"].get("arguments", "") for fragment in fragments)
    assert json.loads(arguments) == {"city": "Madrid"}


def test_tool_result_turn_gets_a_plain_answer(sdk: openai.OpenAI, tools_stack: Stack) -> None:
    messages = conversation() + [
        {"role": "assistant", "content": None, "tool_calls": [_call("call_3", "Paris")]},
        {"role": "tool", "tool_call_id": "call_3", "content": "cloudy"},
    ]
    answer = sdk.chat.completions.create(
        model=MODEL, messages=messages, tools=[WEATHER], tool_choice="auto", temperature=0, max_tokens=24,  # type: ignore[arg-type]
    )
    choice = answer.choices[0]
    assert choice.finish_reason == "stop", choice
    assert choice.message.tool_calls is None, choice.message
    assert "cloudy" in (choice.message.content or "").lower(), choice.message
    # The raw answer has no `tool_calls` at all, as OpenAI's.
    with httpx.Client(base_url=tools_stack.http_url, timeout=HTTP_TIMEOUT) as http:
        raw = http.post("/v1/chat/completions", json={
            "model": MODEL, "messages": messages, "tools": [WEATHER], "tool_choice": "auto", "temperature": 0,
            "max_tokens": 24,
        })  # fmt: skip
    assert raw.status_code == 200, raw.text
    assert "tool_calls" not in raw.json()["choices"][0]["message"], raw.text


@pytest.mark.parametrize("parallel", [True, False])
def test_parallel_tool_calls_is_understood(sdk: openai.OpenAI, parallel: bool) -> None:
    answer = sdk.chat.completions.create(
        model=MODEL, messages=conversation(), tools=[WEATHER], tool_choice="required", parallel_tool_calls=parallel,  # type: ignore[arg-type]
        temperature=0, max_tokens=64,
    )  # fmt: skip
    calls = answer.choices[0].message.tool_calls or []
    assert_weather_calls(calls)
    if not parallel:
        assert len(calls) == 1, calls


def test_tool_choice_none_answers_in_text(sdk: openai.OpenAI) -> None:
    answer = sdk.chat.completions.create(
        model=MODEL, messages=conversation(), tools=[WEATHER], tool_choice="none", temperature=0, max_tokens=12,  # type: ignore[arg-type]
    )
    assert answer.choices[0].message.tool_calls is None
    assert answer.choices[0].message.content

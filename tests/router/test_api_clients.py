"""LangChain's ChatOpenAI against the gateway, unchanged: invoke, stream, structured output, tools.

Through the real Envoy of the session's stack (tests/fixtures/stack.py). Every field LangChain
sends must be one the API understands (an unknown one is a 400), so these also guard that list.
"""

from __future__ import annotations

from typing import Literal

from langchain_core.messages import AIMessage, AIMessageChunk
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field

from tests.fixtures.stack import DEMO_MODEL_ID, Stack
from tests.router.end_to_end_support import MODEL, nonce


def chat_model(stack: Stack, **options: object) -> ChatOpenAI:
    return ChatOpenAI(
        model=MODEL, base_url=stack.base_url, api_key="not-needed", temperature=0, max_retries=0, timeout=120,
        **options,  # type: ignore[arg-type]
    )  # fmt: skip


class Colour(BaseModel):
    """A colour the model picked."""

    # An enum: a 135M model left to name its own colour may ramble past any token limit.
    name: Literal["red", "green", "blue"] = Field(description="the colour's name")


@tool
def weather(city: str) -> str:
    """Today's weather in a city."""
    return f"sunny in {city}"


def test_invoke(stack: Stack) -> None:
    answer = chat_model(stack, max_tokens=12).invoke(f"[{nonce()}] Name a fruit.")
    assert isinstance(answer, AIMessage)
    assert isinstance(answer.content, str) and answer.content.strip()
    assert answer.response_metadata["model_name"] == DEMO_MODEL_ID
    assert answer.usage_metadata is not None and answer.usage_metadata["output_tokens"] > 0


def test_stream(stack: Stack) -> None:
    # stream_usage: LangChain asks for the usage chunk (stream_options) only when told to off OpenAI.
    chunks = list(chat_model(stack, max_tokens=12, stream_usage=True).stream(f"[{nonce()}] Count to three."))
    assert chunks and all(isinstance(chunk, AIMessageChunk) for chunk in chunks)
    whole = chunks[0]
    for chunk in chunks[1:]:
        whole += chunk
    assert isinstance(whole.content, str) and whole.content.strip()
    assert whole.usage_metadata is not None and whole.usage_metadata["output_tokens"] > 0


def test_with_structured_output_json_schema(stack: Stack) -> None:
    structured = chat_model(stack, max_tokens=48).with_structured_output(Colour, method="json_schema")
    colour = structured.invoke(f"[{nonce()}] Pick a colour and answer in JSON.")
    assert isinstance(colour, Colour)
    assert colour.name in ("red", "green", "blue")


def test_bind_tools_sends_a_request_the_api_accepts(stack: Stack) -> None:
    # The demo model's chat template has no tool support: the answer is text, but the request
    # LangChain builds (tools, tool_choice, parallel_tool_calls) must be understood.
    answer = chat_model(stack, max_tokens=16).bind_tools([weather], tool_choice="auto", parallel_tool_calls=False).invoke(
        f"[{nonce()}] What is the weather in Paris?"
    )
    assert isinstance(answer, AIMessage)
    assert answer.content or answer.tool_calls

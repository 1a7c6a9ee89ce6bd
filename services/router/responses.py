"""OpenAI's Responses API (text) as a chat completion, and the chat answer back as a response.

`POST /v1/responses` goes through the chat path unchanged (validation, cache, routing, backend), so
a response is cached, coalesced and routed like any chat completion. What cannot be said as one is
refused with a 400 naming the field: tools, `previous_response_id` (nothing is stored), `include`,
`background`, non-text input items.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from typing import Any

from google.protobuf import json_format, struct_pb2
from lmcluster.router.v1 import openai_pb2 as pb

from services.common import gateway
from services.router.errors import InvalidRequest
from services.router.fields import BODY_FIELDS_METADATA

_ROLES = {"system", "developer", "user", "assistant"}
_TEXT_PARTS = {"input_text", "output_text", "text"}
_REASONING_EFFORTS = {"none", "minimal", "low", "medium", "high"}


def _unsupported(field: str, why: str) -> InvalidRequest:
    return InvalidRequest(why, param=field, code="unsupported_parameter")


def _message_content(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for index, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") not in _TEXT_PARTS or not isinstance(part.get("text"), str):
                raise _unsupported(f"{where}.content[{index}]", "only text content parts (input_text) are supported")
            texts.append(part["text"])
        return "\n".join(texts)
    raise InvalidRequest(f"`{where}.content` must be a string or a list of input_text parts", param=f"{where}.content")


def _messages(request: pb.CreateResponseRequest) -> list[pb.ChatMessage]:
    messages: list[pb.ChatMessage] = []
    if request.instructions:
        messages.append(pb.ChatMessage(role="system", content=struct_pb2.Value(string_value=request.instructions)))
    value = json_format.MessageToDict(request.input) if request.HasField("input") else None
    if isinstance(value, str):
        value = [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise InvalidRequest("`input` must be a string or a non-empty list of messages", param="input")
    for index, item in enumerate(value):
        where = f"input[{index}]"
        if not isinstance(item, dict) or item.get("type", "message") != "message":
            kind = item.get("type") if isinstance(item, dict) else type(item).__name__
            raise _unsupported(where, f"input items of type {kind!r} are not supported; send messages")
        role = item.get("role")
        if role not in _ROLES:
            raise InvalidRequest(f"`{where}.role` must be one of {', '.join(sorted(_ROLES))}", param=f"{where}.role")
        text = _message_content(item.get("content"), where)
        messages.append(pb.ChatMessage(role=role, content=struct_pb2.Value(string_value=text)))
    return messages


def _response_format(text: dict[str, Any]) -> struct_pb2.Struct | None:
    fmt = text.get("format")
    if fmt is None or fmt.get("type") == "text":
        return None
    if fmt.get("type") == "json_object":
        return json_format.ParseDict({"type": "json_object"}, struct_pb2.Struct())
    if fmt.get("type") == "json_schema":
        schema = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
        return json_format.ParseDict({"type": "json_schema", "json_schema": schema}, struct_pb2.Struct())
    raise InvalidRequest("`text.format.type` must be text, json_object or json_schema", param="text.format.type")


def to_chat(request: pb.CreateResponseRequest) -> pb.CreateChatCompletionRequest:
    """The chat completion that answers a Responses API request; InvalidRequest for what cannot."""
    if request.previous_response_id:
        raise _unsupported("previous_response_id", "responses are not stored; send the whole conversation as `input`")
    if request.tools.values:
        raise _unsupported("tools", "tools are not supported on /v1/responses; use /v1/chat/completions")
    if request.include:
        raise _unsupported("include", "no extra output can be included")
    if request.HasField("background") and request.background:
        raise _unsupported("background", "background responses are not supported")
    if request.truncation not in ("", "disabled"):
        raise _unsupported("truncation", "only `truncation: disabled` is supported")
    choice = json_format.MessageToDict(request.tool_choice) if request.HasField("tool_choice") else None
    if choice not in (None, "none", "auto"):
        raise _unsupported("tool_choice", "there are no tools to choose on /v1/responses")
    chat = pb.CreateChatCompletionRequest(
        model=request.model, messages=_messages(request), user=request.user, service_tier=request.service_tier,
        prompt_cache_key=request.prompt_cache_key, safety_identifier=request.safety_identifier,
    )  # fmt: skip
    for source, target in (("max_output_tokens", "max_completion_tokens"), ("temperature", "temperature"), ("top_p", "top_p")):
        if request.HasField(source):
            setattr(chat, target, getattr(request, source))
    if request.HasField("text"):
        response_format = _response_format(json_format.MessageToDict(request.text))
        if response_format is not None:
            chat.response_format.CopyFrom(response_format)
    if request.HasField("reasoning"):
        effort = json_format.MessageToDict(request.reasoning).get("effort")
        if effort is not None:
            if effort not in _REASONING_EFFORTS:
                raise InvalidRequest(f"`reasoning.effort` must be one of {', '.join(sorted(_REASONING_EFFORTS))}",
                                     param="reasoning.effort")  # fmt: skip
            chat.reasoning_effort = effort
    if request.HasField("cache"):
        chat.cache.CopyFrom(request.cache)
    return chat


def _new_response(request: pb.CreateResponseRequest, model: str, status: str) -> pb.Response:
    response = pb.Response(
        id=f"resp_{secrets.token_hex(16)}", object="response", created_at=int(time.time()), status=status,
        model=model, instructions=request.instructions, tool_choice="auto", parallel_tool_calls=True,
    )  # fmt: skip
    response.tools.SetInParent()
    response.metadata.update(request.metadata)
    for field in ("temperature", "top_p", "max_output_tokens"):
        if request.HasField(field):
            setattr(response, field, getattr(request, field))
    return response


def _message(text: str, status: str, item_id: str) -> pb.ResponseOutputMessage:
    message = pb.ResponseOutputMessage(type="message", id=item_id, status=status, role="assistant")
    message.content.add(type="output_text", text=text)
    return message


def _finish(response: pb.Response, text: str, finish_reason: str, usage: pb.Usage, item_id: str) -> None:
    incomplete = finish_reason == "length"
    response.status = "incomplete" if incomplete else "completed"
    if incomplete:
        response.incomplete_details.reason = "max_output_tokens"
    del response.output[:]
    response.output.append(_message(text, response.status, item_id))
    response.usage.input_tokens = usage.prompt_tokens
    response.usage.output_tokens = usage.completion_tokens
    response.usage.total_tokens = usage.total_tokens


def from_chat(request: pb.CreateResponseRequest, chat: pb.CreateChatCompletionResponse) -> pb.Response:
    """The `response` object of a complete chat answer."""
    response = _new_response(request, chat.model, "completed")
    choice = chat.choices[0] if chat.choices else pb.ChatCompletionChoice()
    _finish(response, choice.message.content, choice.finish_reason, chat.usage, f"msg_{secrets.token_hex(16)}")
    return response


class ResponseStream:
    """Turns a chat completion's chunks into the Responses API's stream events, in OpenAI's order."""

    def __init__(self, request: pb.CreateResponseRequest) -> None:
        self._request = request
        self._response: pb.Response | None = None
        self._item_id = f"msg_{secrets.token_hex(16)}"
        self._text: list[str] = []
        self._finish_reason = ""
        self._sequence = 0

    def _event(self, type: str, **fields: Any) -> pb.ResponseStreamEvent:
        event = pb.ResponseStreamEvent(type=type, sequence_number=self._sequence, **fields)
        self._sequence += 1
        return event

    def events(self, chunk: pb.CreateChatCompletionStreamResponse) -> Iterator[pb.ResponseStreamEvent]:
        if chunk.object == gateway.STREAM_END_OBJECT:
            yield pb.ResponseStreamEvent(object=gateway.STREAM_END_OBJECT)
            return
        if chunk.HasField("error"):
            yield pb.ResponseStreamEvent(error=chunk.error)
            return
        if self._response is None:
            self._response = _new_response(self._request, chunk.model, "in_progress")
            yield self._event("response.created", response=self._response)
            yield self._event("response.output_item.added", output_index=0,
                              item=pb.ResponseOutputMessage(type="message", id=self._item_id, status="in_progress", role="assistant"))  # fmt: skip
            yield self._event("response.content_part.added", output_index=0, item_id=self._item_id, content_index=0,
                              part=pb.ResponseOutputText(type="output_text"))  # fmt: skip
        for choice in chunk.choices:
            if choice.delta.content:
                self._text.append(choice.delta.content)
                yield self._event("response.output_text.delta", output_index=0, item_id=self._item_id, content_index=0,
                                  delta=choice.delta.content)  # fmt: skip
            if choice.finish_reason:
                self._finish_reason = choice.finish_reason
        if chunk.HasField("usage") and not chunk.choices:
            yield from self._done(chunk.usage)

    def _done(self, usage: pb.Usage) -> Iterator[pb.ResponseStreamEvent]:
        assert self._response is not None
        text = "".join(self._text)
        _finish(self._response, text, self._finish_reason, usage, self._item_id)
        yield self._event("response.output_text.done", output_index=0, item_id=self._item_id, content_index=0, text=text)
        yield self._event("response.content_part.done", output_index=0, item_id=self._item_id, content_index=0,
                          part=pb.ResponseOutputText(type="output_text", text=text))  # fmt: skip
        yield self._event("response.output_item.done", output_index=0, item=self._response.output[0])
        kind = "response.incomplete" if self._response.status == "incomplete" else "response.completed"
        yield self._event(kind, response=self._response)


class ChatContext:
    """The RPC's context as the chat path sees it: the body's key paths were checked against the
    Responses request already, and would not match the chat request made from it."""

    def __init__(self, context: Any) -> None:
        self._context = context

    def invocation_metadata(self) -> tuple[tuple[str, Any], ...]:
        return tuple(item for item in self._context.invocation_metadata() or () if item[0] != BODY_FIELDS_METADATA)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

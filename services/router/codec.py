"""Translation between the API's protobuf messages and llama-server's OpenAI-style JSON.

llama-server speaks OpenAI's JSON already, so requests go out as the client's own fields (minus
lmcluster's extensions) and answers come back through `ParseDict`, ignoring llama-server's
additions such as `timings`. Validation happens here too, before any backend is touched.
"""

from __future__ import annotations

import math
from typing import Any

from google.protobuf import json_format
from lmcluster.router.v1 import openai_pb2 as pb

from services.router.errors import InvalidRequest

ChatRequest = pb.CreateChatCompletionRequest
CompletionRequest = pb.CreateCompletionRequest
GenerationRequest = ChatRequest | CompletionRequest

_ROLES = {"system", "developer", "user", "assistant", "tool", "function"}
# Fields that are lmcluster's or the router's business, never llama-server's.
_NOT_FORWARDED = {"cache", "model", "user", "stream", "stream_options", "n", "best_of"}
_RANGES = {
    "temperature": (0.0, 2.0),
    "top_p": (0.0, 1.0),
    "presence_penalty": (-2.0, 2.0),
    "frequency_penalty": (-2.0, 2.0),
    "min_p": (0.0, 1.0),
}
MAX_STOP_SEQUENCES = 4


def to_dict(message: Any) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def _drop_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


def validate(request: GenerationRequest) -> None:
    """Raises InvalidRequest naming the field for anything a backend must not see."""
    if not request.model.strip():
        raise InvalidRequest("`model` is required (see GET /v1/models)", param="model")
    for field, (low, high) in _RANGES.items():
        if request.HasField(field):
            value = getattr(request, field)
            if not math.isfinite(value) or not low <= value <= high:
                raise InvalidRequest(f"`{field}` must be between {low} and {high}, got {value}", param=field)
    if request.HasField("n") and request.n != 1:
        raise InvalidRequest("`n` other than 1 is not supported; send separate requests", param="n")
    for field in ("max_tokens", "max_completion_tokens", "top_k", "top_logprobs", "logprobs", "best_of"):
        if field in request.DESCRIPTOR.fields_by_name and request.HasField(field):
            value = getattr(request, field)
            if isinstance(value, int) and value < (1 if field.startswith("max_") else 0):
                raise InvalidRequest(f"`{field}` must be positive, got {value}", param=field)
    _validate_stop(request)
    if isinstance(request, ChatRequest):
        _validate_messages(request)
    else:
        _validate_prompt(request)


def _validate_stop(request: GenerationRequest) -> None:
    if not request.HasField("stop"):
        return
    kind = request.stop.WhichOneof("kind")
    if kind == "null_value" or kind == "string_value":
        return
    if kind == "list_value":
        items = request.stop.list_value.values
        if len(items) > MAX_STOP_SEQUENCES or any(v.WhichOneof("kind") != "string_value" for v in items):
            raise InvalidRequest(f"`stop` must be a string or a list of up to {MAX_STOP_SEQUENCES} strings", param="stop")
        return
    raise InvalidRequest("`stop` must be a string or a list of strings", param="stop")


def _validate_messages(request: ChatRequest) -> None:
    if not request.messages:
        raise InvalidRequest("`messages` must hold at least one message", param="messages")
    for index, message in enumerate(request.messages):
        where = f"messages[{index}]"
        if message.role not in _ROLES:
            raise InvalidRequest(
                f"`{where}.role` must be one of {', '.join(sorted(_ROLES))}, got {message.role!r}",
                param=f"{where}.role",
            )
        kind = message.content.WhichOneof("kind") if message.HasField("content") else None
        if kind in ("number_value", "bool_value", "struct_value"):
            raise InvalidRequest(f"`{where}.content` must be a string or a list of content parts", param=where)
        if kind is None or kind == "null_value":
            if message.role != "assistant" or not message.tool_calls:
                raise InvalidRequest(f"`{where}.content` is required", param=f"{where}.content")


def _validate_prompt(request: CompletionRequest) -> None:
    kind = request.prompt.WhichOneof("kind") if request.HasField("prompt") else None
    if kind == "string_value":
        return
    if kind == "list_value" and request.prompt.list_value.values:
        values = request.prompt.list_value.values
        if len(values) == 1 and values[0].WhichOneof("kind") == "string_value":
            return
        if all(v.WhichOneof("kind") == "number_value" for v in values):
            return
        raise InvalidRequest("a list of several prompts is not supported; send one request per prompt", param="prompt")
    raise InvalidRequest("`prompt` must be a string (or a list with one string, or token ids)", param="prompt")


def backend_body(request: GenerationRequest, *, backend_model: str, stream: bool, max_tokens_default: int = 0) -> dict[str, Any]:
    """The JSON llama-server gets: the client's fields, our model name, streaming with usage."""
    body = {k: v for k, v in to_dict(request).items() if k not in _NOT_FORWARDED}
    if "seed" in body:  # int64 prints as a string in proto JSON
        body["seed"] = int(body["seed"])
    if isinstance(request, ChatRequest) and "max_completion_tokens" in body:
        body["max_tokens"] = body.pop("max_completion_tokens")
    if isinstance(request, CompletionRequest):
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            body["prompt"] = prompt[0]
        elif isinstance(prompt, list):
            body["prompt"] = [int(token) for token in prompt]
    if max_tokens_default and "max_tokens" not in body:
        body["max_tokens"] = max_tokens_default
    body["model"] = backend_model
    body["stream"] = stream
    if stream:
        # Always ask for usage: the cache stores it, and a cached replay reports it.
        body["stream_options"] = {"include_usage": True}
    return body


def chat_response(data: dict[str, Any], model: str) -> pb.CreateChatCompletionResponse:
    response = json_format.ParseDict(_drop_nulls(data), pb.CreateChatCompletionResponse(), ignore_unknown_fields=True)
    response.model = model
    return response


def chat_chunk(data: dict[str, Any], model: str) -> pb.CreateChatCompletionStreamResponse:
    chunk = json_format.ParseDict(_drop_nulls(data), pb.CreateChatCompletionStreamResponse(), ignore_unknown_fields=True)
    chunk.model = model
    return chunk


def completion_response(data: dict[str, Any], model: str) -> pb.CreateCompletionResponse:
    response = json_format.ParseDict(_drop_nulls(data), pb.CreateCompletionResponse(), ignore_unknown_fields=True)
    response.model = model
    return response


def completion_chunk(data: dict[str, Any], model: str) -> pb.CreateCompletionStreamResponse:
    chunk = json_format.ParseDict(_drop_nulls(data), pb.CreateCompletionStreamResponse(), ignore_unknown_fields=True)
    chunk.model = model
    return chunk

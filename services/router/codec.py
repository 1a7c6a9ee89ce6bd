"""Translation between the API's protobuf messages and llama-server's OpenAI-style JSON.

llama-server speaks OpenAI's JSON already, so requests go out as the client's own fields (minus
lmcluster's extensions) and answers come back through `ParseDict`, ignoring llama-server's
additions such as `timings`. Validation happens here too, before any backend is touched.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from lmcluster.registry.v1 import registry_pb2
from lmcluster.router.v1 import openai_pb2 as pb

from services.router.assembly import completion_logprobs
from services.router.errors import InvalidRequest

ChatRequest = pb.CreateChatCompletionRequest
CompletionRequest = pb.CreateCompletionRequest
GenerationRequest = ChatRequest | CompletionRequest

_ROLES = {"system", "developer", "user", "assistant", "tool", "function"}
# Fields that are lmcluster's or the Router's business, or OpenAI's own bookkeeping (accepted, with
# nothing to do here), never llama-server's.
_NOT_FORWARDED = {
    "cache", "model", "user", "stream", "stream_options", "n", "best_of",
    "store", "metadata", "service_tier", "modalities", "prediction", "prompt_cache_key", "safety_identifier",
}  # fmt: skip
# OpenAI chat fields no backend here can honour: refused, never ignored.
_UNSUPPORTED = {
    "audio": "audio output is not supported; this API answers with text",
    "web_search_options": "web search is not supported",
    "verbosity": "`verbosity` is not supported by these models; bound the answer with `max_completion_tokens`",
    "functions": "`functions` is deprecated and not supported; send `tools`",
    "function_call": "`function_call` is deprecated and not supported; send `tool_choice`",
}
_SERVICE_TIERS = {"", "auto", "default"}
_RANGES = {
    "temperature": (0.0, 2.0),
    "top_p": (0.0, 1.0),
    "presence_penalty": (-2.0, 2.0),
    "frequency_penalty": (-2.0, 2.0),
    "min_p": (0.0, 1.0),
    "typical_p": (0.0, 1.0),
    "repeat_penalty": (0.0, math.inf),
    "xtc_probability": (0.0, 1.0),
    "xtc_threshold": (0.0, 1.0),
    "dry_multiplier": (0.0, math.inf),
    "mirostat_tau": (0.0, math.inf),
    "mirostat_eta": (0.0, math.inf),
}
# Integer fields that must not be negative (the max_* ones must be positive).
_COUNTS = ("max_tokens", "max_completion_tokens", "top_k", "top_logprobs", "logprobs", "best_of", "n_probs", "min_keep",
           "dry_allowed_length", "n_indent")  # fmt: skip
MAX_STOP_SEQUENCES = 4
# Content-part types that need a multimodal projector, and what a person calls them.
_MEDIA_PARTS = {"image_url": "images", "input_image": "images", "input_audio": "audio", "file": "files"}


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
    for field in request.DESCRIPTOR.fields:
        if field.type == FieldDescriptor.TYPE_DOUBLE and request.HasField(field.name):
            value = getattr(request, field.name)
            low, high = _RANGES.get(field.name, (-math.inf, math.inf))
            if not math.isfinite(value) or not low <= value <= high:
                raise InvalidRequest(f"`{field.name}` must be {_limits(low, high)}, got {value}", param=field.name)
    if request.HasField("cache") and request.cache.HasField("threshold"):
        threshold = request.cache.threshold
        if not math.isfinite(threshold) or not 0.0 <= threshold <= 1.0:
            raise InvalidRequest(f"`cache.threshold` must be between 0.0 and 1.0, got {threshold}", param="cache.threshold")
    if request.HasField("n") and request.n != 1:
        raise InvalidRequest("`n` other than 1 is not supported; send separate requests", param="n")
    for field in _COUNTS:
        if field in request.DESCRIPTOR.fields_by_name and request.HasField(field):
            value = getattr(request, field)
            if isinstance(value, int) and value < (1 if field.startswith("max_") else 0):
                raise InvalidRequest(f"`{field}` must be positive, got {value}", param=field)
    if request.HasField("mirostat") and request.mirostat not in (0, 1, 2):
        raise InvalidRequest(f"`mirostat` must be 0, 1 or 2, got {request.mirostat}", param="mirostat")
    if request.HasField("json_schema") and request.HasField("grammar"):
        raise InvalidRequest("send either `grammar` or `json_schema`, not both", param="grammar")
    _validate_stop(request)
    if isinstance(request, ChatRequest):
        _validate_chat_options(request)
        _validate_messages(request)
    else:
        _validate_prompt(request)


def _limits(low: float, high: float) -> str:
    if math.isfinite(high):
        return f"between {low} and {high}"
    return f"at least {low}" if math.isfinite(low) else "a finite number"


def _validate_chat_options(request: ChatRequest) -> None:
    for field, why in _UNSUPPORTED.items():
        present = request.HasField(field) if request.DESCRIPTOR.fields_by_name[field].message_type else bool(getattr(request, field))
        if present:
            raise InvalidRequest(why, param=field, code="unsupported_parameter")
    if request.HasField("store") and request.store:
        raise InvalidRequest("`store: true` is not supported: answers are not kept for later retrieval", param="store",
                             code="unsupported_parameter")  # fmt: skip
    if request.service_tier not in _SERVICE_TIERS:
        raise InvalidRequest(f"`service_tier` {request.service_tier!r} is not offered; use 'auto' or 'default'",
                             param="service_tier", code="unsupported_parameter")  # fmt: skip
    if any(modality != "text" for modality in request.modalities):
        raise InvalidRequest("only text output is supported: `modalities` must be [\"text\"]", param="modalities",
                             code="unsupported_parameter")  # fmt: skip


def media_kinds(request: GenerationRequest) -> list[str]:
    """What the request's content parts hold besides text: "images", "audio" or "files"."""
    if not isinstance(request, ChatRequest):
        return []
    kinds: list[str] = []
    for message in request.messages:
        if not message.HasField("content") or message.content.WhichOneof("kind") != "list_value":
            continue
        for part in message.content.list_value.values:
            if part.WhichOneof("kind") != "struct_value" or "type" not in part.struct_value.fields:
                continue
            kind = _MEDIA_PARTS.get(part.struct_value.fields["type"].string_value)
            if kind is not None and kind not in kinds:
                kinds.append(kind)
    return kinds


def check_modalities(request: GenerationRequest, models: Iterable[registry_pb2.Model | None]) -> None:
    """Raises InvalidRequest when the request holds images or audio and no model it may go to reads them.

    A GGUF model reads images or audio only with a multimodal projector (an `mmproj` file beside
    it, which the Registry attaches); the backend would fail the request, or answer blind.
    """
    kinds = media_kinds(request)
    if not kinds or any(model is not None and model.projectors for model in models):
        return
    raise InvalidRequest(
        f"The model `{request.model}` takes no {' or '.join(kinds)}: it has no multimodal projector (mmproj); "
        "send text only, or a model with a projector.",
        param="messages",
        code="unsupported_content",
    )


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


def _completion_logprobs(data: dict[str, Any], *, text_offset: int | None) -> dict[str, Any]:
    """llama-server answers completions' logprobs in chat's shape; OpenAI's completions have their own."""
    choices = data.get("choices")
    if not isinstance(choices, list) or not any(isinstance(c, dict) and isinstance(c.get("logprobs"), dict) for c in choices):
        return data
    shaped = []
    for choice in choices:
        logprobs = choice.get("logprobs") if isinstance(choice, dict) else None
        if isinstance(logprobs, dict) and isinstance(logprobs.get("content"), list):
            choice = {**choice, "logprobs": completion_logprobs(logprobs["content"], text_offset=text_offset)}
        shaped.append(choice)
    return {**data, "choices": shaped}


def completion_response(data: dict[str, Any], model: str) -> pb.CreateCompletionResponse:
    data = _completion_logprobs(data, text_offset=0)
    response = json_format.ParseDict(_drop_nulls(data), pb.CreateCompletionResponse(), ignore_unknown_fields=True)
    response.model = model
    return response


def completion_chunk(data: dict[str, Any], model: str) -> pb.CreateCompletionStreamResponse:
    # A chunk does not know where its tokens start in the whole text: no `text_offset`.
    data = _completion_logprobs(data, text_offset=None)
    chunk = json_format.ParseDict(_drop_nulls(data), pb.CreateCompletionStreamResponse(), ignore_unknown_fields=True)
    chunk.model = model
    return chunk

"""The cache scope of a request: what must match, besides the question, for an answer to be reused.

The Router calls `cache_scope(request)` for every chat or completion request. It returns:

- `scope`: SHA-256 (hex) of a canonical JSON document of everything that changes the right answer
  except the wording of the final user message:
  * the API ("chat" or "completion") and the model (the id the Router resolved, else request.model);
  * the weights: the fingerprints of the model files that may answer (`weights`), so that a file
    replaced with new weights never serves the old weights' answers;
  * the tenant (`tenant`): a hash of the API key's identity that Envoy forwards, so one customer's
    answers never reach another (unless the cache is shared across keys on purpose);
  * the explicit namespace `cache.scope`, if any (entries are shared only within one namespace);
  * chat: every message before the final user message (role, name, content, tool_calls,
    tool_call_id) in order, so the system / developer prompt, earlier turns, and documents pasted or
    retrieved into any message are all in; and the final user message's name and its non-text parts
    (images, audio, files);
  * completion: `suffix` and `echo`;
  * the parameters that change the output: temperature, top_p, top_k, min_p, the token limit
    (max_completion_tokens, else max_tokens), stop (as a sorted set), seed, presence_penalty,
    frequency_penalty, logit_bias, logprobs, top_logprobs, tools, tool_choice,
    parallel_tool_calls, response_format, and every other field sent to the backend as it is
    (llama.cpp's samplers such as repeat_penalty or mirostat, grammar, json_schema, n_probs,
    reasoning_effort, chat_template_kwargs, ...).
  Texts are hashed exactly as sent (Unicode NFC only): whitespace and case in a system prompt or a
  document can matter (code, poetry, formats), so two system prompts that differ by a space are two
  scopes. JSON objects (tools, response_format, logit_bias) are hashed with sorted keys, so key
  order does not matter. A parameter left unset is hashed as absent, not as its default: the
  backend's defaults are not the cache's to assume. Left out: `stream` and `stream_options` (a
  streamed request can replay a stored answer), `n` (only n = 1 is cacheable), `user`, and the other
  cache options.
- `exact_key`: SHA-256 of the scope and the final user message's canonical form
  (services/common/prompt_text.py): the same question up to case, spacing, punctuation outside
  code, politeness, contractions, articles and request framing has the same exact key, and hits
  without an embedding. Code keeps its case and spacing.
- `prompt`: the final user message's whole text (text parts joined by a newline; NFC, LF line ends,
  outer whitespace stripped); this is what is embedded and what verification compares, whole.
- `cacheable`, with `reason` when not. Policy: not cacheable are requests with n > 1 or
  best_of > 1 (they ask for several different samples), requests that offer tools the model may call
  (tool_choice other than "none": answers are actions on live data), chats whose last message is
  not a user message (assistant prefill, tool results), final messages with no text, and completions
  whose prompt is not one string (token ids, batches). Sampling temperature does not make a request
  uncacheable: a stored sampled answer is one valid answer, and the temperature is part of the
  scope. A client that wants a fresh sample sends `cache.skip_lookup`.
- `lookup` / `store`: cacheable and not `cache.skip_lookup` / `cache.skip_store`; `threshold` and
  `ttl_seconds` pass the request's cache options on.
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from lmcluster.registry.v1 import registry_pb2
from lmcluster.router.v1 import openai_pb2

from services.common.prompt_text import CANON_VERSION, canonical_text

SCOPE_VERSION = "lmc-scope-2"

ScopedRequest = openai_pb2.CreateChatCompletionRequest | openai_pb2.CreateCompletionRequest


@dataclass(frozen=True)
class CacheScope:
    """A request's scope, exact key, prompt, and whether and how the cache may be used for it."""

    scope: str
    exact_key: str
    prompt: str
    cacheable: bool
    reason: str = ""
    lookup: bool = False
    store: bool = False
    threshold: float | None = None
    ttl_seconds: int | None = None


def weights_identity(models: Iterable[registry_pb2.Model]) -> str:
    """What identifies the weights of these model files: id and fingerprint of each, in id order.

    The full content hash when the Registry computed one, else size, modification time and the
    hash of each part's first MiB: the Supervisor swaps a backend on exactly this change.
    """
    parts = []
    for model in sorted(models, key=lambda m: m.id):
        fingerprint = model.fingerprint
        digest = fingerprint.sha256 or f"{fingerprint.header_sha256}/{fingerprint.size_bytes}/{fingerprint.mtime_ns}"
        parts.append(f"{model.id}={digest}")
    return ",".join(parts)


def _nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


def normalize_prompt(text: str) -> str:
    """The final user message as the exact key sees it: NFC, LF line ends, outer whitespace stripped."""
    return _nfc(text).replace("\r\n", "\n").replace("\r", "\n").strip()


def _plain(message: Message) -> Any:
    return MessageToDict(message, preserving_proto_field_name=True)


def _canonical_json(document: Any) -> str:
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _digest(*parts: str) -> str:
    hasher = hashlib.sha256()
    for part in parts:
        hasher.update(part.encode("utf-8"))
        hasher.update(b"\x00")
    return hasher.hexdigest()


def _texts(value: Any) -> Any:
    """NFC-normalized strings throughout a JSON-like value."""
    if isinstance(value, str):
        return _nfc(value)
    if isinstance(value, list):
        return [_texts(v) for v in value]
    if isinstance(value, dict):
        return {k: _texts(v) for k, v in value.items()}
    return value


def _content(message: openai_pb2.ChatMessage) -> Any:
    if not message.HasField("content"):
        return None
    return _texts(_plain(message.content))


def _split_final(content: Any) -> tuple[str, list[Any]]:
    """The final message's text, and its non-text parts (which belong to the scope)."""
    if content is None:
        return "", []
    if isinstance(content, str):
        return content, []
    if isinstance(content, list):
        texts, others = [], []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif isinstance(part, str):
                texts.append(part)
            else:
                others.append(part)
        return "\n".join(texts), others
    return "", [content]


def _message_document(message: openai_pb2.ChatMessage) -> dict[str, Any]:
    document: dict[str, Any] = {"role": message.role, "content": _content(message)}
    if message.name:
        document["name"] = _nfc(message.name)
    if message.tool_calls:
        document["tool_calls"] = [_texts(_plain(call)) for call in message.tool_calls]
    if message.tool_call_id:
        document["tool_call_id"] = message.tool_call_id
    for name in ("reasoning_content", "refusal"):  # given back to the chat template
        if message.HasField(name):
            document[name] = _nfc(getattr(message, name))
    return document


def _stop(value: Any) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [_nfc(value)]
    if isinstance(value, list):
        return sorted({_nfc(str(v)) for v in value})
    return [_canonical_json(value)]


def _optional(request: Message, name: str) -> Any:
    return getattr(request, name) if request.HasField(name) else None


def _value(request: Message, name: str) -> Any:
    """A google.protobuf.Value / Struct field as plain JSON, None when unset."""
    if not request.HasField(name):
        return None
    return _texts(_plain(getattr(request, name)))


# Fields that are not generation parameters: the conversation (hashed above), the token limit
# (as `max_tokens`), delivery, the cache's own options and OpenAI bookkeeping no backend sees.
_NOT_SAMPLING = frozenset({
    "model", "messages", "prompt", "suffix", "echo", "max_completion_tokens", "n", "best_of", "stream",
    "stream_options", "user", "cache", "store", "metadata", "service_tier", "modalities", "prediction",
    "prompt_cache_key", "safety_identifier",
})  # fmt: skip


def _sampling(request: ScopedRequest) -> dict[str, Any]:
    sampling: dict[str, Any] = {
        name: _optional(request, name)
        for name in (
            "temperature",
            "top_p",
            "top_k",
            "min_p",
            "seed",
            "presence_penalty",
            "frequency_penalty",
        )
    }
    sampling["stop"] = _stop(_value(request, "stop"))
    sampling["logit_bias"] = _value(request, "logit_bias")
    if isinstance(request, openai_pb2.CreateChatCompletionRequest):
        limit = _optional(request, "max_completion_tokens")
        sampling["max_tokens"] = limit if limit is not None else _optional(request, "max_tokens")
        sampling["logprobs"] = _optional(request, "logprobs")
        sampling["top_logprobs"] = _optional(request, "top_logprobs")
        sampling["tools"] = [_texts(_plain(tool)) for tool in request.tools] or None
        sampling["tool_choice"] = _value(request, "tool_choice")
        sampling["parallel_tool_calls"] = _optional(request, "parallel_tool_calls")
        sampling["response_format"] = _value(request, "response_format")
    else:
        sampling["max_tokens"] = _optional(request, "max_tokens")
        sampling["logprobs"] = _optional(request, "logprobs")
    # Every other field the backend gets changes its answer too (llama.cpp's samplers, grammar,
    # json_schema, reasoning_effort, chat_template_kwargs, ...): in, as sent.
    plain = _plain(request)
    for field, _ in request.ListFields():
        if field.name not in sampling and field.name not in _NOT_SAMPLING:
            sampling[field.name] = _texts(plain[field.name])
    return {name: value for name, value in sampling.items() if value is not None}


def _not_cacheable(reason: str, request: ScopedRequest) -> CacheScope:
    return CacheScope(scope="", exact_key="", prompt="", cacheable=False, reason=reason,
                      threshold=_cache_threshold(request), ttl_seconds=_cache_ttl(request))  # fmt: skip


def _cache_threshold(request: ScopedRequest) -> float | None:
    return request.cache.threshold if request.cache.HasField("threshold") else None


def _cache_ttl(request: ScopedRequest) -> int | None:
    return request.cache.ttl_seconds if request.cache.HasField("ttl_seconds") else None


def _tools_offered(request: openai_pb2.CreateChatCompletionRequest) -> bool:
    if not request.tools:
        return False
    choice = _value(request, "tool_choice")
    return choice != "none"


def exact_key_for(scope: str, prompt: str) -> str:
    """The exact key of a prompt in a scope: equal for prompts equal up to harmless differences."""
    return _digest(SCOPE_VERSION, CANON_VERSION, scope, canonical_text(prompt))


def cache_scope(
    request: ScopedRequest, *, model: str | None = None, weights: str = "", tenant: str = ""
) -> CacheScope:
    """The scope, exact key and prompt of a chat or completion request (see the module's doc).

    `weights` identifies the model files that may answer (`weights_identity`); `tenant` the API
    key's identity as Envoy forwards it (never the key), empty when the cache is shared.
    """
    document: dict[str, Any] = {"v": SCOPE_VERSION, "model": model or request.model}
    if weights:
        document["weights"] = weights
    if tenant:
        document["tenant"] = hashlib.sha256(tenant.encode("utf-8")).hexdigest()
    if request.cache.scope:
        document["namespace"] = _nfc(request.cache.scope)
    if request.HasField("n") and request.n > 1:
        return _not_cacheable(f"n = {request.n} asks for several samples", request)

    if isinstance(request, openai_pb2.CreateChatCompletionRequest):
        document["api"] = "chat"
        if not request.messages:
            return _not_cacheable("no messages", request)
        final = request.messages[-1]
        if final.role != "user":
            return _not_cacheable(f"the last message is a {final.role or 'role-less'} message, not a user message",
                                  request)  # fmt: skip
        if _tools_offered(request):
            return _not_cacheable("tools are offered: answers may be tool calls on live data", request)
        prompt, attachments = _split_final(_content(final))
        document["history"] = [_message_document(message) for message in request.messages[:-1]]
        document["final"] = {"name": _nfc(final.name), "attachments": attachments}
    else:
        document["api"] = "completion"
        if request.HasField("best_of") and request.best_of > 1:
            return _not_cacheable(f"best_of = {request.best_of} samples several answers", request)
        value = _value(request, "prompt")
        if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
            value = value[0]
        if not isinstance(value, str):
            return _not_cacheable("the prompt is not one string (token ids or a batch)", request)
        prompt = value
        document["suffix"] = _nfc(request.suffix)
        document["echo"] = _optional(request, "echo")

    if not normalize_prompt(prompt):
        return _not_cacheable("the final user message has no text", request)
    document["sampling"] = _sampling(request)
    try:
        canonical = _canonical_json(document)
    except ValueError:
        return _not_cacheable("a parameter is NaN or infinite", request)
    scope = _digest(canonical)
    text = normalize_prompt(prompt)
    exact_key = exact_key_for(scope, text)
    return CacheScope(
        scope=scope,
        exact_key=exact_key,
        prompt=text,
        cacheable=True,
        lookup=not request.cache.skip_lookup,
        store=not request.cache.skip_store,
        threshold=_cache_threshold(request),
        ttl_seconds=_cache_ttl(request),
    )

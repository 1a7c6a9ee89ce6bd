"""Between streams and whole answers: assemble chunks into a response, replay a response as chunks.

A generation is always streamed from llama-server; a unary caller gets the assembled response,
and the cache stores it. A streaming caller served from the cache gets the stored response cut
back into chunks, ending with usage, exactly like a live stream.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from google.protobuf.json_format import MessageToDict
from lmcluster.router.v1 import openai_pb2 as pb

ChatResponse = pb.CreateChatCompletionResponse
CompletionResponse = pb.CreateCompletionResponse
REPLAY_CHUNK_CHARS = 16


@dataclass
class _ChoiceState:
    content: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    tool_calls: dict[int, dict[str, Any]] = field(default_factory=dict)
    finish_reason: str | None = None
    logprobs: list[Any] = field(default_factory=list)


class ChatAssembler:
    """Folds llama-server's chat chunks (dicts) into one chat.completion."""

    def __init__(self) -> None:
        self.id = ""
        self.created = 0
        self.system_fingerprint = ""
        self.usage: dict[str, int] | None = None
        self._choices: dict[int, _ChoiceState] = {}

    def add(self, event: dict[str, Any]) -> None:
        self.id = self.id or str(event.get("id", ""))
        self.created = self.created or int(event.get("created") or 0)
        self.system_fingerprint = self.system_fingerprint or str(event.get("system_fingerprint") or "")
        if event.get("usage"):
            self.usage = event["usage"]
        for choice in event.get("choices") or []:
            state = self._choices.setdefault(int(choice.get("index") or 0), _ChoiceState())
            delta = choice.get("delta") or {}
            if delta.get("content"):
                state.content.append(delta["content"])
            if delta.get("reasoning_content"):
                state.reasoning.append(delta["reasoning_content"])
            for call in delta.get("tool_calls") or []:
                merged = state.tool_calls.setdefault(
                    int(call.get("index") or 0), {"id": "", "type": "function", "function": {"name": "", "arguments": ""}}
                )
                merged["id"] = call.get("id") or merged["id"]
                function = call.get("function") or {}
                merged["function"]["name"] += function.get("name") or ""
                merged["function"]["arguments"] += function.get("arguments") or ""
            if choice.get("finish_reason"):
                state.finish_reason = choice["finish_reason"]
            logprobs = choice.get("logprobs") or {}
            if isinstance(logprobs, dict) and logprobs.get("content"):
                state.logprobs.extend(logprobs["content"])

    @property
    def finished(self) -> bool:
        return bool(self._choices) and all(c.finish_reason for c in self._choices.values())

    @property
    def truncated(self) -> bool:
        return any(c.finish_reason == "length" for c in self._choices.values())

    def response(self, model: str) -> ChatResponse:
        response = ChatResponse(
            id=self.id, object="chat.completion", created=self.created, model=model,
            system_fingerprint=self.system_fingerprint,
        )
        for index in sorted(self._choices):
            state = self._choices[index]
            choice = response.choices.add(index=index)
            choice.message.role = "assistant"
            if state.content or not state.tool_calls:
                choice.message.content = "".join(state.content)
            if state.reasoning:
                choice.message.reasoning_content = "".join(state.reasoning)
            for call_index in sorted(state.tool_calls):
                call = state.tool_calls[call_index]
                choice.message.tool_calls.add(
                    id=call["id"], type=call["type"],
                    function=pb.FunctionCall(name=call["function"]["name"], arguments=call["function"]["arguments"]),
                )
            if state.finish_reason:
                choice.finish_reason = state.finish_reason
            if state.logprobs:
                choice.logprobs.update({"content": state.logprobs})
        _fill_usage(response.usage, self.usage)
        return response


class CompletionAssembler:
    """Folds llama-server's completion chunks into one text_completion."""

    def __init__(self) -> None:
        self.id = ""
        self.created = 0
        self.system_fingerprint = ""
        self.usage: dict[str, int] | None = None
        self._text: dict[int, list[str]] = {}
        self._finish: dict[int, str] = {}
        self._logprobs: dict[int, list[Any]] = {}

    def add(self, event: dict[str, Any]) -> None:
        self.id = self.id or str(event.get("id", ""))
        self.created = self.created or int(event.get("created") or 0)
        self.system_fingerprint = self.system_fingerprint or str(event.get("system_fingerprint") or "")
        if event.get("usage"):
            self.usage = event["usage"]
        for choice in event.get("choices") or []:
            index = int(choice.get("index") or 0)
            self._text.setdefault(index, []).append(choice.get("text") or "")
            if choice.get("finish_reason"):
                self._finish[index] = choice["finish_reason"]
            logprobs = choice.get("logprobs") or {}
            if isinstance(logprobs, dict) and logprobs.get("content"):
                self._logprobs.setdefault(index, []).extend(logprobs["content"])

    @property
    def finished(self) -> bool:
        return bool(self._text) and all(i in self._finish for i in self._text)

    @property
    def truncated(self) -> bool:
        return any(reason == "length" for reason in self._finish.values())

    def response(self, model: str) -> CompletionResponse:
        response = CompletionResponse(
            id=self.id, object="text_completion", created=self.created, model=model,
            system_fingerprint=self.system_fingerprint,
        )
        for index in sorted(self._text):
            choice = response.choices.add(index=index, text="".join(self._text[index]))
            if index in self._finish:
                choice.finish_reason = self._finish[index]
            if self._logprobs.get(index):
                choice.logprobs.update(completion_logprobs(self._logprobs[index], text_offset=0))
        _fill_usage(response.usage, self.usage)
        return response


def _fill_usage(usage: pb.Usage, data: dict[str, Any] | None) -> None:
    if not data:
        return
    usage.prompt_tokens = int(data.get("prompt_tokens") or 0)
    usage.completion_tokens = int(data.get("completion_tokens") or 0)
    usage.total_tokens = int(data.get("total_tokens") or usage.prompt_tokens + usage.completion_tokens)


def completion_logprobs(entries: list[Any], *, text_offset: int | None = None) -> dict[str, Any]:
    """llama-server's per-token logprobs (chat's `content` list) in the completions API's shape.

    `tokens`, `token_logprobs`, `top_logprobs` (one {token: logprob} per position) and, when the
    offset of the first token is known (a whole answer), `text_offset`.
    """
    tokens = [str(entry.get("token", "")) for entry in entries]
    shaped: dict[str, Any] = {
        "tokens": tokens,
        "token_logprobs": [entry.get("logprob") for entry in entries],
        "top_logprobs": [
            {str(top.get("token", "")): top.get("logprob") for top in entry.get("top_logprobs") or []} for entry in entries
        ],
    }
    if text_offset is not None:
        offsets = []
        for token in tokens:
            offsets.append(text_offset)
            text_offset += len(token)
        shaped["text_offset"] = offsets
    return shaped


def _pieces(text: str) -> list[str]:
    return [text[i : i + REPLAY_CHUNK_CHARS] for i in range(0, len(text), REPLAY_CHUNK_CHARS)] or [""]


def _chat_pieces(text: str, logprobs: dict[str, Any]) -> list[tuple[str, dict[str, Any] | None]]:
    """A stored answer's text cut for replay, each piece with its chunk's logprobs (or None).

    With logprobs whose tokens spell the text, one piece per token, as the live stream sent it;
    otherwise pieces of REPLAY_CHUNK_CHARS, all logprobs in the first.
    """
    entries = logprobs.get("content") or []
    if entries and "".join(str(entry.get("token", "")) for entry in entries) == text:
        return [(str(entry.get("token", "")), {"content": [entry]}) for entry in entries]
    pieces = _pieces(text)
    return [(piece, {"content": entries} if entries and not position else None) for position, piece in enumerate(pieces)]


def _completion_pieces(text: str, logprobs: dict[str, Any]) -> list[tuple[str, dict[str, Any] | None]]:
    """As `_chat_pieces`, for a stored completion's logprobs (`tokens`, `token_logprobs`, `top_logprobs`)."""
    tokens = [str(token) for token in logprobs.get("tokens") or []]
    if tokens and "".join(tokens) == text:
        values, tops = logprobs.get("token_logprobs") or [], logprobs.get("top_logprobs") or []
        return [
            (token, {"tokens": [token], "token_logprobs": values[i : i + 1], "top_logprobs": tops[i : i + 1]})
            for i, token in enumerate(tokens)
        ]
    shaped = {key: value for key, value in logprobs.items() if key != "text_offset"}
    return [(piece, shaped if shaped and not position else None) for position, piece in enumerate(_pieces(text))]


def replay_chat(response: ChatResponse, *, include_usage: bool) -> list[pb.CreateChatCompletionStreamResponse]:
    """A stored chat.completion as the chunks a live stream would have sent."""
    base = dict(id=response.id, object="chat.completion.chunk", created=response.created, model=response.model,
                system_fingerprint=response.system_fingerprint)
    chunks = []
    for choice in response.choices:
        first = pb.CreateChatCompletionStreamResponse(**base)
        first.choices.add(index=choice.index, delta=pb.ChatCompletionDelta(role="assistant", content=""))
        chunks.append(first)
        if choice.message.HasField("content"):
            logprobs = MessageToDict(choice.logprobs) if choice.HasField("logprobs") else {}
            for piece, piece_logprobs in _chat_pieces(choice.message.content, logprobs):
                chunk = pb.CreateChatCompletionStreamResponse(**base)
                added = chunk.choices.add(index=choice.index, delta=pb.ChatCompletionDelta(content=piece))
                if piece_logprobs:
                    added.logprobs.update(piece_logprobs)
                chunks.append(chunk)
        if choice.message.tool_calls:
            chunk = pb.CreateChatCompletionStreamResponse(**base)
            delta = pb.ChatCompletionDelta()
            for position, call in enumerate(choice.message.tool_calls):
                copy = delta.tool_calls.add()
                copy.CopyFrom(call)
                copy.index = position
            chunk.choices.add(index=choice.index, delta=delta)
            chunks.append(chunk)
        last = pb.CreateChatCompletionStreamResponse(**base)
        last.choices.add(index=choice.index, delta=pb.ChatCompletionDelta(), finish_reason=choice.finish_reason or "stop")
        chunks.append(last)
    if include_usage:
        chunks.append(pb.CreateChatCompletionStreamResponse(**base, usage=response.usage))
    return chunks


def replay_completion(response: CompletionResponse, *, include_usage: bool) -> list[pb.CreateCompletionStreamResponse]:
    """A stored text_completion as the chunks a live stream would have sent."""
    base = dict(id=response.id, object="text_completion", created=response.created, model=response.model,
                system_fingerprint=response.system_fingerprint)
    chunks = []
    for choice in response.choices:
        logprobs = MessageToDict(choice.logprobs) if choice.HasField("logprobs") else {}
        for piece, piece_logprobs in _completion_pieces(choice.text, logprobs):
            chunk = pb.CreateCompletionStreamResponse(**base)
            added = chunk.choices.add(index=choice.index, text=piece)
            if piece_logprobs:
                added.logprobs.update(piece_logprobs)
            chunks.append(chunk)
        last = pb.CreateCompletionStreamResponse(**base)
        last.choices.add(index=choice.index, text="", finish_reason=choice.finish_reason or "stop")
        chunks.append(last)
    if include_usage:
        chunks.append(pb.CreateCompletionStreamResponse(**base, usage=response.usage))
    return chunks

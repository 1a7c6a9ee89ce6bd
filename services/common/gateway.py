"""The Router's side of the contract with Envoy, the REST gateway (envoy.yaml, docs/gateway.md).

Envoy transcodes OpenAI's REST API to RouterService and serves native gRPC clients on the same
port. What the Router must do so that REST clients get OpenAI's behaviour:

- Requests that came through REST carry the request metadata `x-lmc-rest: 1` (Envoy strips any
  `x-lmc-*` header a client sends, so the marker cannot be forged). `came_through_rest` reads it.
- Failures: `abort_with_openai_error` sets the trailing metadata `x-lmc-error` (the complete OpenAI
  error body), optionally `x-lmc-http-status` and `retry-after`, then aborts with the gRPC status.
  Envoy answers REST clients with that body and the HTTP status mapped from the gRPC code (or
  `x-lmc-http-status`); native gRPC clients get the status and metadata as they are.
- Streams: a failure before the first message is an abort as above (the client gets an HTTP error).
  After the first message, send `error_chunk(...)` instead; on the REST path, end every stream
  with `stream_end(...)`, which Envoy turns into `data: [DONE]`.
- Response headers: initial metadata `x-lmc-cache` (hit, miss or bypass) and `x-lmc-similarity`
  reach REST clients as HTTP headers.
"""

from __future__ import annotations

import json
from typing import NoReturn, TypeVar

import grpc
from lmcluster.router.v1 import openai_pb2

# Request metadata Envoy sets on transcoded (REST) requests.
REST_MARKER = "x-lmc-rest"
# Initial metadata the Router sends; Envoy passes it to REST clients as response headers.
CACHE_HEADER = "x-lmc-cache"
SIMILARITY_HEADER = "x-lmc-similarity"
# The id of the entry that answered a cache hit (DELETE /v1/cache/entries/{id} removes it).
CACHE_ENTRY_HEADER = "x-lmc-cache-entry"
# Trailing metadata of a failed RPC.
ERROR_METADATA = "x-lmc-error"
HTTP_STATUS_METADATA = "x-lmc-http-status"
RETRY_AFTER_METADATA = "retry-after"

# `object` of the message that ends a REST stream; Envoy rewrites its event to `data: [DONE]`.
STREAM_END_OBJECT = "[DONE]"

# Metadata values travel in HTTP/2 headers: keep error bodies well below header size limits.
MAX_ERROR_MESSAGE_CHARS = 2048

StreamChunk = TypeVar(
    "StreamChunk",
    openai_pb2.CreateChatCompletionStreamResponse,
    openai_pb2.CreateCompletionStreamResponse,
)


def _clip(message: str) -> str:
    if len(message) <= MAX_ERROR_MESSAGE_CHARS:
        return message
    return message[: MAX_ERROR_MESSAGE_CHARS - 3] + "..."


def openai_error_json(message: str, type: str, code: str | None, param: str | None = None) -> str:
    """OpenAI's error body, `{"error": {"message", "type", "param", "code"}}`, as ASCII-only JSON.

    ASCII because gRPC metadata values must be printable ASCII; non-ASCII text is `\\u` escaped.
    """
    body = {"error": {"message": _clip(message), "type": type, "param": param, "code": code}}
    return json.dumps(body, ensure_ascii=True, separators=(",", ":"))


async def abort_with_openai_error(
    context: grpc.aio.ServicerContext,
    grpc_code: grpc.StatusCode,
    message: str,
    *,
    type: str,
    code: str | None,
    param: str | None = None,
    http_status: int | None = None,
    retry_after: int | None = None,
) -> NoReturn:
    """Ends the RPC with `grpc_code` and the trailing metadata Envoy turns into an OpenAI error.

    `http_status` overrides the HTTP status Envoy derives from `grpc_code` (e.g. 413 for a body
    the Router finds too large). `retry_after` (seconds) reaches REST clients as `Retry-After`.
    Call it before the first message of a stream; later, send `error_chunk` instead.
    """
    trailing: list[tuple[str, str]] = [(ERROR_METADATA, openai_error_json(message, type, code, param))]
    if http_status is not None:
        trailing.append((HTTP_STATUS_METADATA, str(http_status)))
    if retry_after is not None:
        trailing.append((RETRY_AFTER_METADATA, str(max(0, int(retry_after)))))
    context.set_trailing_metadata(tuple(trailing))
    await context.abort(grpc_code, _clip(message))
    raise AssertionError("context.abort returned")  # abort always raises


def came_through_rest(context: grpc.aio.ServicerContext) -> bool:
    """Whether Envoy transcoded this call from REST (then streams end with `stream_end`)."""
    return any(key == REST_MARKER and value == "1" for key, value in context.invocation_metadata() or ())


def stream_end(chunk_type: type[StreamChunk]) -> StreamChunk:
    """The last message of a REST stream; Envoy sends `data: [DONE]` in its place."""
    return chunk_type(object=STREAM_END_OBJECT)


def error_chunk(
    chunk_type: type[StreamChunk], message: str, *, type: str, code: str | None, param: str | None = None
) -> StreamChunk:
    """A stream's error event after it started; REST clients see `data: {"error": {...}}`.

    Send `stream_end` after it on the REST path, and end the RPC with status OK: the HTTP status
    line went out with the first chunk.
    """
    detail = openai_pb2.ErrorDetail(message=_clip(message), type=type, code=code or "", param=param or "")
    return chunk_type(error=detail)

"""Streaming HTTP client for llama-server's OpenAI-style endpoints.

Every generation is streamed from llama-server, also for non-streaming API calls: tokens are
watched for silence, a client that goes away cancels the backend request at once (closing the
connection frees the slot), and one code path serves streams, unary calls, coalescing and caching.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx

from services.common import telemetry
from services.router.errors import (
    BackendTimeout,
    BackendUnavailable,
    ContextLengthExceeded,
    InvalidRequest,
    RouterError,
)

log = logging.getLogger(__name__)


class LlamaClient:
    def __init__(self, *, connect_timeout: float, first_token_timeout: float, token_timeout: float) -> None:
        self._first_token_timeout = first_token_timeout
        self._token_timeout = token_timeout
        self._client = httpx.AsyncClient(
            # Reads are bounded per event below (first token, then the gap between tokens).
            timeout=httpx.Timeout(connect=connect_timeout, read=None, write=30.0, pool=connect_timeout),
            # llama-server closes a keep-alive connection after 5 s idle; reusing one at that moment
            # fails the request ("Server disconnected without sending a response"). Drop them first.
            limits=httpx.Limits(max_connections=2048, max_keepalive_connections=256, keepalive_expiry=2.0),
        )
        # A CLIENT span per call to llama-server, carrying `traceparent`, while tracing is on.
        telemetry.instrument_httpx_client(self._client)

    async def aclose(self) -> None:
        await self._client.aclose()

    async def stream(self, endpoint: str, path: str, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Yields each SSE event of a streamed generation as a dict; raises RouterError subclasses.

        Errors before the first event are `retryable` where another backend could succeed.
        """
        url = endpoint.rstrip("/") + path
        try:
            async with self._client.stream("POST", url, json=body) as response:
                if response.status_code != 200:
                    raise await _error_from(response)
                lines = response.aiter_lines()
                wait = self._first_token_timeout
                while True:
                    # Not asyncio.wait_for: on Python 3.11 it loses a cancellation that arrives as
                    # the line does (it returns the line instead), and a cancelled generation
                    # (client gone, deadline passed) then streams on to max_tokens for nobody.
                    try:
                        async with asyncio.timeout(wait):
                            line = await anext(lines)
                    except StopAsyncIteration:
                        return
                    except TimeoutError:
                        raise BackendTimeout(
                            f"the model backend sent nothing for {wait:.0f} s", code="backend_timeout"
                        ) from None
                    event = _parse_event(line)
                    if event is _DONE:
                        return
                    if event is not None:
                        wait = self._token_timeout
                        yield event
        except httpx.TimeoutException as error:
            raise BackendTimeout(f"the model backend did not answer in time ({type(error).__name__})") from error
        except (httpx.TransportError, httpx.RemoteProtocolError) as error:
            raise BackendUnavailable(f"the model backend at {endpoint} is unreachable: {error!r}") from error

    async def get_json(self, endpoint: str, path: str) -> Any:
        response = await self._client.get(endpoint.rstrip("/") + path, timeout=5.0)
        response.raise_for_status()
        return response.json()


_DONE: dict[str, Any] = {}


def _parse_event(line: str) -> dict[str, Any] | None:
    """One SSE line: the event's JSON, _DONE for `[DONE]`, None for anything else."""
    if not line.startswith("data:"):
        return None
    payload = line[5:].strip()
    if payload == "[DONE]":
        return _DONE
    try:
        event = json.loads(payload)
    except json.JSONDecodeError:
        log.warning("skipping a malformed event from llama-server: %.200s", payload)
        return None
    if not isinstance(event, dict):
        return None
    if "error" in event and "choices" not in event:
        raise _error_from_body(500, event)
    return event


async def _error_from(response: httpx.Response) -> RouterError:
    raw = await response.aread()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        body = {"error": {"message": raw.decode(errors="replace")[:500]}}
    return _error_from_body(response.status_code, body)


def _error_from_body(status: int, body: dict[str, Any]) -> RouterError:
    error = body.get("error") if isinstance(body.get("error"), dict) else {}
    message = str(error.get("message") or f"llama-server answered HTTP {status}")
    kind = str(error.get("type") or "")
    if kind == "exceed_context_size_error":
        prompt_tokens, n_ctx = error.get("n_prompt_tokens"), error.get("n_ctx")
        return ContextLengthExceeded(
            f"This model's maximum context length is {n_ctx} tokens, but the request has "
            f"{prompt_tokens} prompt tokens. Shorten the messages or the prompt.",
            param="messages",
        )
    if status in (400, 422) or kind == "invalid_request_error":
        return InvalidRequest(message)
    if status == 501 or kind == "not_supported_error":
        return InvalidRequest(message, code="unsupported")
    # 503 (loading), 500 and anything else: the backend's fault; another one may do better.
    return BackendUnavailable(f"the model backend failed: {message}")

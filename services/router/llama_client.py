"""Streaming HTTP client for llama-server's OpenAI-style endpoints.

Every generation is streamed from llama-server, also for non-streaming API calls: tokens are
watched for silence, a client that goes away cancels the backend request at once (closing the
connection frees the slot), and one code path serves streams, unary calls, coalescing and caching.

The client is aiohttp's: its C HTTP parser costs about half the CPU of httpx's pure-Python stack
per generation, most of it per streamed token, on the same cores as the model
(tests/bench/bench_llama_client.py, docs/benchmarks.md "The Router's client to llama-server").
llama-server closes the connection after a streamed answer, so every generation opens its own.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from services.common import telemetry
from services.router.errors import (
    BackendTimeout,
    BackendUnavailable,
    ContextLengthExceeded,
    InvalidRequest,
    RouterError,
)

log = logging.getLogger(__name__)

# The longest SSE line read whole (aiohttp refuses lines over twice its read buffer): a token's
# event with many top logprobs is a few kB; llama-server's last event carries timings.
READ_BUFFER_BYTES = 1 << 20


class LlamaClient:
    def __init__(self, *, connect_timeout: float, first_token_timeout: float, token_timeout: float) -> None:
        self._first_token_timeout = first_token_timeout
        self._token_timeout = token_timeout
        self._session = aiohttp.ClientSession(
            # Reads are bounded per event below (first token, then the gap between tokens).
            timeout=aiohttp.ClientTimeout(total=None, connect=connect_timeout),
            # A connection per generation: llama-server closes it after a streamed answer, and
            # reusing one it is closing fails the request.
            connector=aiohttp.TCPConnector(force_close=True, limit=0),
            read_bufsize=READ_BUFFER_BYTES,
            # A CLIENT span per call to llama-server, carrying `traceparent`, while tracing is on.
            trace_configs=telemetry.aiohttp_trace_configs(),
        )

    async def aclose(self) -> None:
        await self._session.close()

    async def stream(self, endpoint: str, path: str, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Yields each SSE event of a streamed generation as a dict; raises RouterError subclasses.

        Errors before the first event are `retryable` where another backend could succeed.
        """
        url = endpoint.rstrip("/") + path
        try:
            async with self._session.post(url, json=body) as response:
                if response.status != 200:
                    raise await _error_from(response)
                wait = self._first_token_timeout
                while True:
                    # Not asyncio.wait_for: on Python 3.11 it loses a cancellation that arrives as
                    # the line does (it returns the line instead), and a cancelled generation
                    # (client gone, deadline passed) then streams on to max_tokens for nobody.
                    try:
                        async with asyncio.timeout(wait):
                            line = await response.content.readline()
                    except TimeoutError:
                        raise BackendTimeout(
                            f"the model backend sent nothing for {wait:.0f} s", code="backend_timeout"
                        ) from None
                    if not line:
                        return
                    event = _parse_event(line.decode("utf-8", errors="replace"))
                    if event is _DONE:
                        return
                    if event is not None:
                        wait = self._token_timeout
                        yield event
        except (aiohttp.ServerTimeoutError, aiohttp.ConnectionTimeoutError) as error:
            raise BackendTimeout(f"the model backend did not answer in time ({type(error).__name__})") from error
        except (aiohttp.ClientError, OSError) as error:
            raise BackendUnavailable(f"the model backend at {endpoint} is unreachable: {error!r}") from error
        except ValueError as error:  # a line past twice READ_BUFFER_BYTES
            raise BackendUnavailable(f"the model backend at {endpoint} sent an unreadable event: {error}") from error


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


async def _error_from(response: aiohttp.ClientResponse) -> RouterError:
    raw = await response.read()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        body = {"error": {"message": raw.decode(errors="replace")[:500]}}
    if not isinstance(body, dict):
        body = {"error": {"message": str(body)[:500]}}
    return _error_from_body(response.status, body)


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

"""Follows a server-streaming watch (WatchModels, WatchBackends) for as long as the Router runs.

A dropped stream is reopened with exponential backoff; every reopening starts with a snapshot, so
the local table is replaced, never patched across a gap.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential_jitter

log = logging.getLogger(__name__)


async def follow_watch(
    name: str,
    open_stream: Callable[[], AsyncIterator[Any]],
    on_message: Callable[[Any], None],
    on_disconnect: Callable[[], None] | None = None,
) -> None:
    """Runs until cancelled: reads `open_stream()`, calls `on_message` per message, reconnects."""
    async for attempt in AsyncRetrying(
        retry=retry_if_exception_type((grpc.aio.AioRpcError, ConnectionError, StreamEnded)),
        wait=wait_exponential_jitter(initial=0.2, max=5.0),
        reraise=True,
    ):
        with attempt:
            try:
                async for message in open_stream():
                    on_message(message)
            except grpc.aio.AioRpcError as error:
                if attempt.retry_state.attempt_number in (1, 10) or attempt.retry_state.attempt_number % 50 == 0:
                    log.warning("%s watch lost (%s); reconnecting", name, error.code().name)
                if on_disconnect is not None:
                    on_disconnect()
                raise
            raise StreamEnded(name)


class StreamEnded(Exception):
    """The server closed the watch (e.g. it is shutting down): reconnect."""


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    if task is None:
        return
    task.cancel()
    try:
        await task
    except (asyncio.CancelledError, Exception):
        pass

"""Live watching of the models folder (inotify through watchfiles, or polling on request).

Changes are batched for up to `debounce_ms` and handed over as a set of paths; the catalog decides
what each means. The watch survives the folder not existing yet, being deleted and coming back,
and watcher errors: it retries every `retry_seconds` and asks for a full rescan whenever it
(re)starts, since changes made while nobody watched would otherwise go unseen.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

from watchfiles import awatch

log = logging.getLogger(__name__)


async def watch_folder(
    root: Path,
    on_change: Callable[[set[Path]], Awaitable[None]],
    *,
    stop: asyncio.Event,
    debounce_ms: int = 300,
    force_polling: bool = False,
    retry_seconds: float = 2.0,
) -> None:
    """Calls `on_change` with the changed paths until `stop` is set (or the task is cancelled)."""
    unwatched = False  # whether changes may have gone unseen since the last full scan
    failures = 0
    while not stop.is_set():
        if not root.is_dir():
            unwatched = True
            await _sleep_unless(stop, retry_seconds)
            continue
        if unwatched:
            await _call(on_change, {root})  # the folder itself: a full rescan
        unwatched = True
        try:
            watcher = awatch(
                root,
                watch_filter=None,
                debounce=debounce_ms,
                step=50,
                stop_event=stop,
                force_polling=force_polling,
                poll_delay_ms=300,
                recursive=True,
                ignore_permission_denied=True,
            )
            async with contextlib.aclosing(watcher) as batches:
                async for batch in batches:
                    await _call(on_change, {Path(path) for _change, path in batch})
        except asyncio.CancelledError:
            raise
            failures = 0
        except Exception as exc:
            failures += 1
            log.warning(
                "watching %s failed (%s); retrying in %.0f s (periodic rescans continue; "
                "LMC_REGISTRY_WATCH_FORCE_POLLING=true polls instead)",
                root,
                exc,
                _backoff(retry_seconds, failures),
            )
        if not stop.is_set():
            await _sleep_unless(stop, _backoff(retry_seconds, failures))


def _backoff(retry_seconds: float, failures: int) -> float:
    """Retry delay: `retry_seconds`, doubling with each failure in a row, at most a minute."""
    return min(60.0, retry_seconds * 2 ** max(0, failures - 1))


async def _call(on_change: Callable[[set[Path]], Awaitable[None]], paths: set[Path]) -> None:
    try:
        await on_change(paths)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("handling changes under the models folder failed")


async def _sleep_unless(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)

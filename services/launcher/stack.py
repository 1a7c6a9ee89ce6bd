"""`lmcluster up`: every part of this host's role in the foreground, in dependency order.

Which parts a role runs is services/launcher/roles.py's to say; this module runs them.

Parts start one after the other, each only once the one before answers its readiness probe, and
stop in reverse order on Ctrl-C or SIGTERM. A part that exits on its own is restarted (backoff with
jitter, services/launcher/supervision.py) while the others keep serving; the stack stops by itself
only when a part crash-loops, naming it and why, so a broken part is never hidden behind a running
Envoy either. A part that fails its very first start stops the stack at once: that is a
configuration fault, not a crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Coroutine
from typing import Any

from rich.console import Console
from rich.markup import escape

from services.common.metrics import serve_metrics
from services.launcher.process import ManagedProcess
from services.launcher.roles import build_specs, endpoints_text, launcher_metrics_host
from services.launcher.settings import StackSettings
from services.launcher.supervision import CrashLoop, PartSupervisor, RestartPolicy

log = logging.getLogger(__name__)
console = Console(stderr=True)

_COLORS = ["\033[31m", "\033[32m", "\033[33m", "\033[34m", "\033[35m", "\033[36m", "\033[91m", "\033[92m"]


async def run_stack(settings: StackSettings) -> int:
    """Starts every part, keeps them running until a signal or a crash loop, stops everything; an exit code."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    running: list[ManagedProcess] = []
    exit_code = 0
    try:
        for index, spec in enumerate(build_specs(settings)):
            if stop.is_set():
                break
            part = ManagedProcess(spec, color=_COLORS[index % len(_COLORS)] if sys.stdout.isatty() else "")
            with console.status(f"starting {spec.name}"):
                await part.start()
                running.append(part)
                await _race(part.wait_ready(), stop)
            console.print(f"[green]✔[/] {spec.name} ready (pid {part.pid})")
        if not stop.is_set():
            _serve_launcher_metrics(settings)
            _print_endpoints(settings)
            exit_code = await _supervise(running, settings.restart_policy(), stop)
    except RuntimeError as error:
        console.print(f"[red]✘ {error}[/]")
        exit_code = 1
    finally:
        for part in reversed(running):
            console.print(f"stopping {part.spec.name}")
            await part.stop()
        console.print("all stopped")
    return exit_code


async def _race(work: Coroutine[Any, Any, None], stop: asyncio.Event) -> None:
    """Runs `work` but gives up as soon as a stop is requested."""
    task = asyncio.create_task(work)
    stopper = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    for pending in (task, stopper):
        if pending not in done:
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pending
    if task in done:
        task.result()


async def _supervise(running: list[ManagedProcess], policy: RestartPolicy, stop: asyncio.Event) -> int:
    """Restarts parts that exit until `stop` is set (0) or one crash-loops (1)."""
    def say(text: str) -> None:
        console.print(text, soft_wrap=True)

    supervisors = [PartSupervisor(part, policy, stop, say) for part in running]
    tasks = [asyncio.create_task(s.run(), name=f"supervise-{s.name}") for s in supervisors]
    try:
        for finished in asyncio.as_completed(tasks):
            try:
                await finished
            except CrashLoop as error:
                console.print(f"[red]✘ {escape(str(error))}; stopping the stack[/]", soft_wrap=True)
                return 1
        return 0
    finally:
        stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _serve_launcher_metrics(settings: StackSettings) -> None:
    """The launcher's own /metrics (restarts per part); a port in use is logged, not fatal."""
    try:
        serve_metrics(launcher_metrics_host(settings), settings.launcher_metrics_port)
    except OSError as error:
        log.warning("launcher metrics not served on port %d: %s", settings.launcher_metrics_port, error)


def _print_endpoints(settings: StackSettings) -> None:
    console.print(endpoints_text(settings), soft_wrap=True)

"""A child process the launcher owns: prefixed output, readiness, and a stop that leaves nothing.

Each child runs in its own process group (so its own children stop with it) and is told by the
kernel to die if the launcher dies, even by SIGKILL (PR_SET_PDEATHSIG), so `make up` never leaves
orphans holding ports or memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field

from services.common.children import OWN_PROCESS_GROUP, dies_with_parent

log = logging.getLogger(__name__)

Probe = Callable[[], Awaitable[bool]]


@dataclass
class ProcessSpec:
    """What to run, how to tell it is ready, and how to show its output."""

    name: str
    argv: Sequence[str]
    env: Mapping[str, str] = field(default_factory=dict)
    ready: Probe | None = None
    ready_timeout: float = 60.0
    stop_grace: float = 10.0


class ManagedProcess:
    def __init__(self, spec: ProcessSpec, *, color: str = "") -> None:
        self.spec = spec
        self._color = color
        self.process: asyncio.subprocess.Process | None = None
        self._pump: asyncio.Task[None] | None = None
        # The end of its output, to say why it failed.
        self._tail: deque[str] = deque(maxlen=5)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    async def start(self) -> None:
        """Starts the process (again, after it exited: the same spec, a fresh output relay)."""
        if self._pump is not None:
            await self._finish_pump()
        env = {**os.environ, **self.spec.env}
        self.process = await asyncio.create_subprocess_exec(
            *dies_with_parent(self.spec.argv),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=env,
            **OWN_PROCESS_GROUP,
        )
        self._pump = asyncio.create_task(self._relay_output(), name=f"{self.spec.name}-output")

    async def _relay_output(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        prefix = f"{self._color}{self.spec.name:>10} |\033[0m " if self._color else f"{self.spec.name:>10} | "
        async for raw in self.process.stdout:
            line = raw.decode(errors="replace").rstrip()
            self._tail.append(line)
            sys.stdout.write(prefix + line + "\n")
            sys.stdout.flush()

    def last_lines(self) -> str:
        return " / ".join(line.strip() for line in self._tail if line.strip())[-600:]

    async def wait_ready(self) -> None:
        """Waits for the readiness probe; raises if the process exits first or the timeout passes."""
        assert self.process is not None
        if self.spec.ready is None:
            return
        deadline = asyncio.get_running_loop().time() + self.spec.ready_timeout
        while True:
            if self.process.returncode is not None:
                raise RuntimeError(f"{self.spec.name} exited with code {self.process.returncode} while starting")
            with contextlib.suppress(Exception):
                if await self.spec.ready():
                    return
            if asyncio.get_running_loop().time() > deadline:
                raise RuntimeError(f"{self.spec.name} not ready after {self.spec.ready_timeout:.0f} s")
            await asyncio.sleep(0.2)

    async def wait(self) -> int:
        assert self.process is not None
        return await self.process.wait()

    async def stop(self) -> None:
        """SIGTERM to the process group, SIGKILL after the grace period; waits for the exit."""
        if self.process is None or self.process.returncode is not None:
            await self._finish_pump()
            return
        self._signal_group(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.process.wait(), self.spec.stop_grace)
        except TimeoutError:
            log.warning("%s did not stop within %.0f s; killing it", self.spec.name, self.spec.stop_grace)
            self._signal_group(signal.SIGKILL)
            await self.process.wait()
        # Whatever the child left in its group goes too.
        self._signal_group(signal.SIGKILL)
        await self._finish_pump()

    def _signal_group(self, sig: signal.Signals) -> None:
        assert self.process is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, sig)

    async def _finish_pump(self) -> None:
        if self._pump is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(self._pump, 2.0)

"""Keeping each part of `lmcluster up` running: restart with backoff, give up on a crash loop.

A part that exits on its own is started again after an exponential delay with jitter (so parts
that fail together do not come back in lockstep), and waits for its readiness probe again. The
delay grows with restarts that come close together and starts over once the part has run for a
while. More than `crash_loop_limit` exits within `crash_loop_window_seconds` is a crash loop: a
part that cannot stay up is a configuration or environment fault a restart will not fix, so the
launcher stops the stack and says which part and why.
"""

from __future__ import annotations

import asyncio
import logging
import random
import signal
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client import Counter, Gauge

from services.launcher.process import ManagedProcess

log = logging.getLogger(__name__)

RESTARTS = Counter("lmc_launcher_restarts_total", "Parts of the stack restarted after they exited, by part.", ["part"])
PART_UP = Gauge("lmc_launcher_part_up", "1 while a part of the stack runs and answered its readiness probe.", ["part"])


@dataclass(frozen=True)
class RestartPolicy:
    initial_delay: float = 0.5
    max_delay: float = 30.0
    crash_loop_limit: int = 5
    crash_loop_window: float = 120.0

    def delay(self, recent_exits: int, rng: random.Random) -> float:
        """Full delay doubles per recent exit; jitter takes it down to half at random."""
        full = min(self.max_delay, self.initial_delay * 2 ** max(0, recent_exits - 1))
        return full * rng.uniform(0.5, 1.0)


class CrashLoop(Exception):
    """A part exited too often too quickly; the stack stops."""


@dataclass
class PartHistory:
    """When a part exited lately: the input of both the backoff and the crash-loop verdict."""

    policy: RestartPolicy
    exits: deque[float] = field(default_factory=deque)
    restarts: int = 0

    def record_exit(self, now: float) -> int:
        self.exits.append(now)
        while self.exits and now - self.exits[0] > self.policy.crash_loop_window:
            self.exits.popleft()
        return len(self.exits)

    def crash_looping(self) -> bool:
        return len(self.exits) > self.policy.crash_loop_limit


class PartSupervisor:
    """Watches one started part; restarts it when it exits until `stop` is set or it crash-loops."""

    def __init__(
        self,
        part: ManagedProcess,
        policy: RestartPolicy,
        stop: asyncio.Event,
        say: Callable[[str], None],
        rng: random.Random | None = None,
    ) -> None:
        self.part = part
        self.history = PartHistory(policy)
        self._policy = policy
        self._stop = stop
        self._say = say
        self._rng = rng or random.Random()

    @property
    def name(self) -> str:
        return self.part.spec.name

    async def run(self) -> None:
        """Returns when the stack stops; raises CrashLoop when the part cannot stay up."""
        PART_UP.labels(self.name).set(1)
        while not self._stop.is_set():
            code = await self._exit_or_stop()
            if code is None:
                return
            PART_UP.labels(self.name).set(0)
            recent = self.history.record_exit(time.monotonic())
            why = f"exited with code {code}" + (f" ({_signal_name(code)})" if code < 0 else "")
            if self.history.crash_looping():
                tail = self.part.last_lines()
                raise CrashLoop(
                    f"{self.name} {why}: {recent} exits within {self._policy.crash_loop_window:.0f} s, "
                    f"more than the limit of {self._policy.crash_loop_limit}; it cannot stay up"
                    + (f". Its last output: {tail}" if tail else "")
                )
            delay = self._policy.delay(recent, self._rng)
            self.history.restarts += 1
            RESTARTS.labels(self.name).inc()
            self._say(f"[red]✘ {self.name} {why}[/]; restart {self.history.restarts} in {delay:.1f} s")
            if await self._stopped_within(delay):
                return
            await self._restart()

    async def _exit_or_stop(self) -> int | None:
        """The part's exit code, or None when the stack is stopping."""
        exited = asyncio.ensure_future(self.part.wait())
        stopping = asyncio.ensure_future(self._stop.wait())
        done, _ = await asyncio.wait({exited, stopping}, return_when=asyncio.FIRST_COMPLETED)
        for task in (exited, stopping):
            if task not in done:
                task.cancel()
        if exited in done and not self._stop.is_set():
            return exited.result()
        return None

    async def _stopped_within(self, seconds: float) -> bool:
        try:
            await asyncio.wait_for(self._stop.wait(), seconds)
        except TimeoutError:
            return False
        return True

    async def _restart(self) -> None:
        """Starts the part again; a start that fails counts as its next exit (the loop sees it exit)."""
        await self.part.start()
        try:
            await self.part.wait_ready()
        except RuntimeError as error:
            log.warning("%s did not come back: %s", self.name, error)
            if self.part.process is not None and self.part.process.returncode is None:
                await self.part.stop()
            return
        PART_UP.labels(self.name).set(1)
        self._say(f"[green]✔[/] {self.name} restarted and ready (pid {self.part.pid}, restart {self.history.restarts})")


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"

"""The launcher's restart policy on real child processes: restarts with growing delays, then a
crash-loop verdict that names the part and its last words."""

from __future__ import annotations

import asyncio
import random
import sys

import pytest

from services.launcher.process import ManagedProcess, ProcessSpec
from services.launcher.supervision import CrashLoop, PartHistory, PartSupervisor, RestartPolicy


def test_the_delay_doubles_per_recent_exit_within_jitter_and_a_ceiling() -> None:
    policy = RestartPolicy(initial_delay=0.5, max_delay=4.0)
    rng = random.Random(7)
    for exits, full in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (9, 4.0)]:
        delays = [policy.delay(exits, rng) for _ in range(200)]
        assert all(full / 2 <= d <= full for d in delays), (exits, min(delays), max(delays))
        assert max(delays) - min(delays) > full / 10, "no jitter"


def test_exits_outside_the_window_are_forgotten() -> None:
    history = PartHistory(RestartPolicy(crash_loop_limit=2, crash_loop_window=10.0))
    assert history.record_exit(0.0) == 1
    assert history.record_exit(5.0) == 2
    assert not history.crash_looping()
    assert history.record_exit(9.0) == 3
    assert history.crash_looping()
    assert history.record_exit(30.0) == 1
    assert not history.crash_looping()


async def test_a_part_that_keeps_dying_is_restarted_then_declared_crash_looping() -> None:
    spec = ProcessSpec("flaky", [sys.executable, "-c", "print('cannot open the socket'); raise SystemExit(3)"])
    part = ManagedProcess(spec)
    await part.start()
    said: list[str] = []
    supervisor = PartSupervisor(
        part, RestartPolicy(initial_delay=0.01, max_delay=0.05, crash_loop_limit=3), asyncio.Event(), said.append
    )
    with pytest.raises(CrashLoop) as raised:
        await asyncio.wait_for(supervisor.run(), 60)
    message = str(raised.value)
    assert message.startswith("flaky exited with code 3: 4 exits within")
    assert "cannot open the socket" in message
    assert supervisor.history.restarts == 3
    assert [line for line in said if "exited with code 3" in line] == [
        line for line in said if "; restart " in line
    ] and len([line for line in said if "; restart " in line]) == 3, said


async def test_a_part_that_dies_once_is_back_and_a_stop_ends_the_watch() -> None:
    spec = ProcessSpec("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"], stop_grace=2.0)
    part = ManagedProcess(spec)
    await part.start()
    stop = asyncio.Event()
    said: list[str] = []
    supervisor = PartSupervisor(part, RestartPolicy(initial_delay=0.01), stop, said.append)
    watching = asyncio.create_task(supervisor.run())
    first = part.pid
    assert first is not None
    part.process.kill()  # type: ignore[union-attr]
    for _ in range(200):
        if part.pid not in (None, first) and part.process and part.process.returncode is None:
            break
        await asyncio.sleep(0.05)
    assert part.pid != first
    assert supervisor.history.restarts == 1
    assert any("restart 1" in line for line in said)
    stop.set()
    await asyncio.wait_for(watching, 10)
    await part.stop()
    assert part.process is not None and part.process.returncode is not None

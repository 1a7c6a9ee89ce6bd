"""`lmcluster up` (what `make up` runs): the whole stack starts, and stopping it leaves no process.

Each test runs its own stack (tests/fixtures/stack.py) because each one ends it: Ctrl-C, SIGTERM, or
a SIGKILL of the launcher itself, which only the kernel's parent-death signal can clean up after.
"""

from __future__ import annotations

import os
import secrets
import signal
import time
from pathlib import Path

import httpx
import pytest

from tests.chaos.faults import part_pid
from tests.fixtures.parts import descendants, free_port, process_alive
from tests.fixtures.stack import DEMO_MODEL_ID, running_stack

STOP_TIMEOUT = 60.0


def wait_all_gone(pids: dict[int, str]) -> dict[int, str]:
    """Waits until none of `pids` runs; returns those still running after the timeout."""
    deadline = time.monotonic() + STOP_TIMEOUT
    while (left := {pid: name for pid, name in pids.items() if process_alive(pid)}) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=["ctrl-c", "sigterm", "sigkill"])
def test_stopping_the_launcher_leaves_no_process_behind(
    sig: signal.Signals, tmp_path: Path, redis_stack: str, demo_models_dir: Path
) -> None:
    with running_stack(tmp_path / "stack", redis_url=redis_stack, models_dir=demo_models_dir) as stack:
        launcher = stack.part.process
        family = descendants(launcher.pid)
        names = set(family.values())
        # Everything of the stack runs below the launcher: the five services, Envoy and the backend.
        assert "envoy" in names and any(name.startswith("llama-server") for name in names), family
        assert sum(1 for name in names if name.startswith("python")) >= 1, family
        assert len(family) >= 7, family

        os.kill(launcher.pid, sig)
        code = launcher.wait(STOP_TIMEOUT)
        left = wait_all_gone(family)
        assert not left, f"still running after {sig.name} to the launcher: {left}"
        if sig != signal.SIGKILL:
            assert code == 0, stack.log_tail()
            assert "all stopped" in stack.log_path.read_text()


def test_a_part_that_crash_loops_stops_the_stack_and_is_named(
    tmp_path: Path, redis_stack: str, demo_models_dir: Path
) -> None:
    """Below the limit a dead part is restarted; past it the stack stops, saying which part and why."""
    env = {"LMC_CRASH_LOOP_LIMIT": "1", "LMC_RESTART_BACKOFF_INITIAL_SECONDS": "0.1"}
    with running_stack(tmp_path / "stack", redis_url=redis_stack, models_dir=demo_models_dir, env=env) as stack:
        launcher = stack.part.process
        family = descendants(launcher.pid)
        first = part_pid(stack, "cache")
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + STOP_TIMEOUT
        while "cache restarted and ready" not in stack.log_path.read_text():
            assert time.monotonic() < deadline, stack.log_tail()
            time.sleep(0.2)
        os.kill(part_pid(stack, "cache"), signal.SIGKILL)
        code = launcher.wait(STOP_TIMEOUT)
        log = stack.log_path.read_text()
        assert code == 1, stack.log_tail()
        assert "cache exited with code -9 (SIGKILL): 2 exits within" in log, stack.log_tail()
        assert "it cannot stay up" in log and "; stopping the stack" in log, stack.log_tail()
        assert "all stopped" in log
        assert not wait_all_gone(family)


def test_the_cache_survives_a_restart_of_the_whole_stack(tmp_path: Path, demo_models_dir: Path) -> None:
    """The Redis `lmcluster up` starts keeps its data in the run folder: an answer cached before
    Ctrl-C is a hit after the next `lmcluster up` on the same folder."""
    redis_url = f"redis://127.0.0.1:{free_port()}"
    body = {
        "model": DEMO_MODEL_ID,
        "messages": [{"role": "user", "content": f"Name a desert. ({secrets.token_hex(4)})"}],
        "max_tokens": 6,
        "temperature": 0,
    }
    # The same cache namespace both times (the fixture picks a new one per stack by default).
    env = {"LMC_CACHE_INDEX_PREFIX": f"lmc:restart:{secrets.token_hex(4)}"}
    with running_stack(tmp_path / "stack", redis_url=redis_url, models_dir=demo_models_dir, env=env) as stack:
        with httpx.Client(base_url=stack.http_url, timeout=120.0) as http:
            first = http.post("/v1/chat/completions", json=body)
            assert first.status_code == 200, first.text
            deadline = time.monotonic() + 30
            while http.post("/v1/chat/completions", json=body).headers["x-lmc-cache"] != "hit":
                assert time.monotonic() < deadline, "the answer was never stored"
                time.sleep(0.3)
        time.sleep(1.5)  # the append-only file reaches the disk every second
        os.kill(stack.part.process.pid, signal.SIGINT)
        assert stack.part.process.wait(STOP_TIMEOUT) == 0
    with running_stack(tmp_path / "stack", redis_url=redis_url, models_dir=demo_models_dir, env=env) as stack:
        with httpx.Client(base_url=stack.http_url, timeout=120.0) as http:
            again = http.post("/v1/chat/completions", json=body)
    assert again.status_code == 200, again.text
    assert again.headers["x-lmc-cache"] == "hit", dict(again.headers)
    assert again.json()["choices"][0]["message"]["content"] == first.json()["choices"][0]["message"]["content"]

"""How long a waking gateway process waits beside busy SCHED_IDLE work, by where that work runs.

Run: `.venv/bin/python -m pytest tests/bench/bench_sessions.py -s -o python_files='bench_*.py'`
(part of `make bench`; under a minute). One busy process per core under SCHED_IDLE, as llama-server
generating, started either as the launcher and the Supervisor start their children
(`OWN_PROCESS_GROUP`: a process group of its own in this session) or in a session of its own (the
earlier way, `start_new_session`). With the kernel's autogroup scheduling each session is a group
weighed against the others before their threads are (docs/supervisor.md, "One session for the whole
stack"). The benchmark's own thread, at the request path's niceness where it may take it, sleeps
1 ms and does a little work, `WAKES` times; the run-queue wait of each wake-up comes from
/proc/self/task/TID/schedstat. The two layouts alternate `ROUNDS` times. It prints the table of
docs/benchmarks.md and the ratio of the p99s, and asserts only that each round measured every
wake-up.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from services.common.children import OWN_PROCESS_GROUP, idle_scheduled, permitted_niceness
from services.launcher.settings import StackSettings
from tests.bench.bench_stack import percentile

WAKES = int(os.environ.get("BENCH_SESSIONS_WAKES", "3000"))
ROUNDS = int(os.environ.get("BENCH_SESSIONS_ROUNDS", "2"))
BUSY = "while True: pass"
LAYOUTS: dict[str, dict[str, Any]] = {
    "a process group of its own in this session (OWN_PROCESS_GROUP)": OWN_PROCESS_GROUP,
    "a session of its own (start_new_session)": {"start_new_session": True},
}


def run_queue_ns() -> int:
    """Nanoseconds this thread has waited on a run queue (the second field of schedstat)."""
    return int(Path(f"/proc/self/task/{threading.get_native_id()}/schedstat").read_text().split()[1])


def wake_ups() -> list[float]:
    """The run-queue wait of each of `WAKES` wake-ups from a 1 ms sleep, in seconds."""
    waits = []
    for _ in range(WAKES):
        before = run_queue_ns()
        time.sleep(0.001)
        waits.append((run_queue_ns() - before) / 1e9)
        total = 0
        for number in range(5000):  # a request's sliver of work (about 0.3 ms) between two waits
            total += number
    return waits


def beside_busy(layout: dict[str, Any]) -> list[float]:
    busy = [
        subprocess.Popen(idle_scheduled([sys.executable, "-c", BUSY]), **layout) for _ in range(os.cpu_count() or 1)
    ]
    try:
        time.sleep(0.5)
        return wake_ups()
    finally:
        for process in busy:
            process.kill()
            process.wait()


@pytest.mark.timeout(600)
def test_wake_up_beside_idle_work() -> None:
    gateway = StackSettings.model_fields["gateway_niceness"].default
    niceness = permitted_niceness(gateway)
    os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), niceness)
    waits: dict[str, list[float]] = {name: [] for name in LAYOUTS}
    for _ in range(ROUNDS):
        for name, layout in LAYOUTS.items():
            measured = beside_busy(layout)
            assert len(measured) == WAKES
            waits[name] += measured
    print(f"\n| a thread at niceness {niceness} waking every ms beside {os.cpu_count()} busy SCHED_IDLE "
          f"processes in ... | wake-ups | run-queue wait p50 / p99 / max ms |")  # fmt: skip
    print("|---|---|---|")
    for name, found in waits.items():
        cells = " / ".join(f"{percentile(found, q) * 1000:.2f}" for q in (0.5, 0.99, 1.0))
        print(f"| {name} | {len(found)} | {cells} |")
    ours, theirs = (percentile(found, 0.99) for found in waits.values())
    print(f"p99 in sessions of their own / in this session: {theirs / max(ours, 1e-6):.1f}×")

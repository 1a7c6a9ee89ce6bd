"""Cache hits on a host that also runs other work: the request path at LMC_GATEWAY_NICENESS, and its
hit path under SCHED_RR (LMC_GATEWAY_REALTIME_PRIORITY), against the same processes at niceness 0.

Run: `.venv/bin/python -m pytest tests/bench/bench_priority.py -s -o python_files='bench_*.py'`
(part of `make bench`; about three minutes on 2 cores; needs CAP_SYS_NICE, as `lmcluster up` does
for a negative niceness). One `lmcluster up` with the product's defaults and a Redis of its own,
so that every process a hit passes through (Redis, Embedding, Cache, Router, Envoy) is the stack's.
A client in a process of its own (tests/bench/hit_probe.py) sends an exact hit over REST and over
native gRPC and a semantic hit over REST, each every 50 ms, for `PHASE_SECONDS` per phase:
- nothing else running;
- one busy process per core at niceness 0 (a batch job, a build, another service of the host)
  with the request path moved in place, every thread, to niceness 0;
- the same with the request path at LMC_GATEWAY_NICENESS (-5), every part under the normal policy;
- the product's default: the same, with the hit path (Redis, Router, Envoy) under SCHED_RR at
  LMC_GATEWAY_REALTIME_PRIORITY (1).
The three phases with busy processes alternate `ROUNDS` times, so that a drift of the machine's speed
shows in both. The probe itself runs at niceness 0, like any client of the host. It prints one
table (docs/benchmarks.md, "The request path before the rest of the host") and asserts only that
every reply was the expected hit.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import httpx
import pytest

from services.launcher.settings import StackSettings
from tests.bench.bench_breakdown import NO_STORE, chat, questions, stored
from tests.bench.bench_latency import ms, start_probe, stop_probe
from tests.bench.bench_stack import TIMEOUT, percentile, product_stack
from tests.chaos.faults import part_pid
from tests.fixtures.parts import free_port
from tests.fixtures.stack import Stack

PHASE_SECONDS = float(os.environ.get("BENCH_PRIORITY_PHASE_SECONDS", "12"))
ROUNDS = int(os.environ.get("BENCH_PRIORITY_ROUNDS", "2"))
REQUEST_PATH = ("redis", "embedding", "cache", "router", "envoy")
HIT_PATH = ("redis", "router", "envoy")
BUSY = "while True: pass"
# The probe's kinds of hit (tests/bench/hit_probe.py).
KINDS = ("exact, REST through Envoy", "exact, native gRPC through Envoy", "semantic, REST through Envoy")


def place(pids: dict[str, int], niceness: int, realtime: int) -> None:
    """Every thread of each part to `niceness`, and the hit path's under SCHED_RR at `realtime`
    (the normal policy where it is 0); a lower niceness and SCHED_RR need CAP_SYS_NICE."""
    for part, pid in pids.items():
        rr = realtime and part in HIT_PATH
        for task in os.listdir(f"/proc/{pid}/task"):
            policy = os.SCHED_RR if rr else os.SCHED_OTHER
            os.sched_setscheduler(int(task), policy, os.sched_param(realtime if rr else 0))
            os.setpriority(os.PRIO_PROCESS, int(task), niceness)


def probed(stack: Stack, exact: dict, semantic: dict) -> dict[str, list[float]]:
    probe = start_probe(stack, f"{stack.base_url}/chat/completions", exact, semantic)
    time.sleep(PHASE_SECONDS)
    times, problems = stop_probe(probe)
    assert not problems, problems
    return times


@pytest.mark.timeout(1200)
def test_request_path_priority(tmp_path_factory: pytest.TempPathFactory, demo_model: Path) -> None:
    gateway = StackSettings.model_fields["gateway_niceness"].default
    realtime = StackSettings.model_fields["gateway_realtime_priority"].default
    redis_url = f"redis://127.0.0.1:{free_port()}"  # started by the stack, so on the request path
    with product_stack(tmp_path_factory, "priority", demo_model, redis_url=redis_url) as stack:
        url = f"{stack.base_url}/chat/completions"
        question, reworded = questions(1)[0]
        # temperature 0, as the probe's native gRPC request asks: one cache scope for both clients.
        exact, semantic = chat(question, temperature=0), chat(reworded, temperature=0, cache=NO_STORE)
        with httpx.Client(timeout=TIMEOUT) as http:
            stored(http, url, exact, semantic)
        pids = {part: part_pid(stack, part) for part in REQUEST_PATH}
        assert {os.getpriority(os.PRIO_PROCESS, pid) for pid in pids.values()} == {gateway}, "the stack runs at its default"
        assert {os.sched_getscheduler(pids[part]) for part in HIT_PATH} == {os.SCHED_RR}, "the hit path runs under SCHED_RR"
        placements = {
            "request path at niceness 0": (0, 0),
            f"request path at niceness {gateway}": (gateway, 0),
            f"request path at niceness {gateway}, hit path under SCHED_RR {realtime} (the default)": (gateway, realtime),
        }

        phases: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        for kind, times in probed(stack, exact, semantic).items():
            phases["nothing else running"][kind] += times
        busy = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(os.cpu_count() or 1)]
        try:
            for _ in range(ROUNDS):
                for name, (niceness, priority) in placements.items():
                    place(pids, niceness, priority)
                    for kind, times in probed(stack, exact, semantic).items():
                        phases[f"{len(busy)} busy processes, {name}"][kind] += times
        finally:
            for process in busy:
                process.kill()
            place(pids, gateway, realtime)

    print(f"\n| {PHASE_SECONDS:.0f} s × {ROUNDS} per phase, a hit of each kind every 50 ms | "
          + " | ".join(f"{kind}: n, p50 / p99 ms" for kind in KINDS) + " |")  # fmt: skip
    print("|---|" + "---|" * len(KINDS))
    for phase, times in phases.items():
        cells = [
            f"{len(times[key])}, {ms(percentile(times[key], 0.5))} / {ms(percentile(times[key], 0.99))}"
            for key in KINDS
        ]
        print(f"| {phase} | " + " | ".join(cells) + " |")
    zero, niced, default = (phases[f"{os.cpu_count() or 1} busy processes, {name}"] for name in placements)
    for kind in KINDS:
        p99 = {name: percentile(times[kind], 0.99) for name, times in (("0", zero), ("niced", niced), ("rr", default))}
        print(
            f"{kind}: p99 at niceness 0 / at {gateway}: {p99['0'] / p99['niced']:.2f}×; "
            f"at {gateway} / under SCHED_RR {realtime}: {p99['niced'] / p99['rr']:.2f}×"
        )

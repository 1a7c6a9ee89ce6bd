"""Supervisor benchmark: cold start, restart after kill -9, and request latency around a swap.

Everything runs on the real llama-server and the demo model, with the same flags the Supervisor
tests use (one thread, two slots of 512 tokens), and the real Registry on a folder of its own.

- **Cold start**: `EnsureBackend` on a stopped model until it answers READY (process start, model
  load, `/health` polling, the WatchBackends event), against the baseline of starting the same
  llama-server command line by hand and polling `/health` until 200.
- **Restart after kill -9**: SIGKILL of a READY backend's process until the Supervisor reports it
  READY again (restart count + 1).
- **Latency around a swap**: three clients send short completions (8 tokens) to whichever backend
  the Supervisor lists READY, as the Router does; latency while steady against latency from the
  moment a new file replaces the model until the old backend is stopped. Failed requests are counted.

Run: `.venv/bin/python -m pytest tests/bench/bench_supervisor.py -s` (part of `make bench`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import statistics
import time
from pathlib import Path

import httpx
from lmcluster.registry.v1 import registry_pb2
from lmcluster.supervisor.v1 import supervisor_pb2
from lmcluster.supervisor.v1 import supervisor_service_pb2 as pb

from services.common import binaries
from services.registry.server import running_registry
from tests.supervisor.support import (
    DEMO_ALIAS,
    DEMO_RELATIVE,
    list_backends,
    place_model,
    registry_settings,
    started_supervisor,
    wait_until,
)
from tests.supervisor.test_swap import FollowingRouter, publish_new_release

READY = supervisor_pb2.BACKEND_STATE_READY
STOPPED = supervisor_pb2.BACKEND_STATE_STOPPED
COLD_STARTS = 5
RESTARTS = 3
STEADY_SECONDS = 10.0


def percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


async def baseline_start_seconds(argv: list[str], endpoint: str) -> float:
    """The Supervisor's own command line, started by hand, until /health answers 200."""
    started = time.perf_counter()
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )
    try:
        async with httpx.AsyncClient(timeout=1.0) as http:
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    if (await http.get(f"{endpoint}/health")).status_code == 200:
                        return time.perf_counter() - started
                await asyncio.sleep(0.02)
    finally:
        process.kill()
        await process.wait()


async def measure(models_dir: Path, demo_model: Path, scratch: Path) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {
        "cold": [], "baseline": [], "restart": [], "warmup": [], "steady": [], "swap": []
    }  # fmt: skip
    failures: list[str] = []
    async with running_registry(registry_settings(models_dir)) as registry:
        async with started_supervisor(registry.address, drain_settle_seconds=1.0, max_restarts=10) as (_, stub):

            def model_ready() -> bool:
                model = registry.catalog.lookup(DEMO_ALIAS)
                return model is not None and model.state == registry_pb2.MODEL_STATE_READY

            await wait_until(model_ready, 60, "the Registry to judge the copied model READY")
            for _ in range(COLD_STARTS):
                started = time.perf_counter()
                backend = (await stub.EnsureBackend(pb.EnsureBackendRequest(model=DEMO_ALIAS), timeout=120)).backend
                results["cold"].append(time.perf_counter() - started)
                await stub.StopBackend(pb.StopBackendRequest(backend_id=backend.id, force=True), timeout=60)
                # The same command line, by hand; the port is free again once the backend stopped.
                results["baseline"].append(await baseline_start_seconds(list(backend.command), backend.endpoint))

            backend = (await stub.EnsureBackend(pb.EnsureBackendRequest(model=DEMO_ALIAS), timeout=120)).backend
            for _ in range(RESTARTS):
                (current,) = [b for b in await list_backends(stub) if b.state == READY]
                started = time.perf_counter()
                os.kill(current.pid, signal.SIGKILL)

                async def restarted(before: supervisor_pb2.Backend = current) -> bool:
                    return any(
                        b.id == before.id and b.state == READY and b.restart_count == before.restart_count + 1
                        for b in await list_backends(stub)
                    )

                await wait_until(restarted, 120, "the restart after kill -9")
                results["restart"].append(time.perf_counter() - started)

            router = FollowingRouter()
            follower = asyncio.create_task(router.follow(stub))
            await wait_until(lambda: router.pick() is not None, 10, "the router to see the backend")
            # The first requests after the restarts warm the backend up; they are not counted.
            phase = "warmup"
            stop = asyncio.Event()

            async def client(number: int) -> None:
                async with httpx.AsyncClient(timeout=60) as http:
                    for n in itertools.count():
                        if stop.is_set():
                            return
                        chosen = router.pick()
                        if chosen is None:
                            failures.append("no READY backend")
                            await asyncio.sleep(0.05)
                            continue
                        label, started = phase, time.perf_counter()
                        try:
                            reply = await http.post(
                                f"{chosen.endpoint}/completion",
                                json={"prompt": f"Client {number}, request {n}: say hello.", "n_predict": 8},
                            )
                        except httpx.HTTPError as error:
                            failures.append(f"{type(error).__name__}: {error}")
                            continue
                        if reply.status_code != 200:
                            failures.append(f"HTTP {reply.status_code}")
                            continue
                        results[label].append(time.perf_counter() - started)

            clients = [asyncio.create_task(client(i)) for i in range(3)]
            await asyncio.sleep(3.0)
            phase = "steady"
            await asyncio.sleep(STEADY_SECONDS)
            old = next(b for b in router.table.values() if b.state == READY)
            phase = "swap"
            publish_new_release(models_dir, demo_model, scratch)
            await wait_until(
                lambda: any(e.backend.id == old.id and e.backend.state == STOPPED for e in router.events),
                120,
                "the old backend to stop after the swap",
            )
            stop.set()
            await asyncio.gather(*clients)
            follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await follower
    results["failures"] = [float(len(failures))]
    return results


def test_supervisor_benchmark(tmp_path: Path) -> None:
    demo_model = binaries.demo_model_path()
    models_dir = tmp_path / "models"
    place_model(models_dir, DEMO_RELATIVE, demo_model, copy=True)
    results = asyncio.run(measure(models_dir, demo_model, tmp_path))

    def row(label: str, values: list[float]) -> str:
        return (
            f"  {label:<44} n={len(values):<4} p50 {percentile(values, 50) * 1000:8.1f} ms"
            f"   p99 {percentile(values, 99) * 1000:8.1f} ms"
        )

    print("\nSupervisor benchmark (demo model, 1 thread, 2 slots of 512 tokens)")
    print(row("cold EnsureBackend to READY", results["cold"]))
    print(row("baseline: same command by hand to /health 200", results["baseline"]))
    print(row("restart after kill -9 to READY", results["restart"]))
    print(row("request latency, steady", results["steady"]))
    print(row("request latency, during the swap", results["swap"]))
    cold = statistics.median(results["cold"]) / statistics.median(results["baseline"])
    p50 = percentile(results["swap"], 50) / percentile(results["steady"], 50)
    p99 = percentile(results["swap"], 99) / percentile(results["steady"], 99)
    print(f"  cold start / baseline (median): {cold:.2f}x")
    print(f"  swap / steady latency: p50 {p50:.2f}x, p99 {p99:.2f}x;  failed requests: {int(results['failures'][0])}")
    assert results["failures"] == [0.0]

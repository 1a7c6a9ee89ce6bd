"""Zero-downtime model changes: a new file replaces a served one under a steady stream of requests."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from prometheus_client import REGISTRY
from lmcluster.registry.v1 import registry_pb2
from lmcluster.supervisor.v1 import supervisor_pb2
from lmcluster.supervisor.v1 import supervisor_service_pb2 as pb
from lmcluster.supervisor.v1 import supervisor_service_pb2_grpc as pb_grpc

from services.registry.server import RunningRegistry
from tests.chaos.faults import new_release
from tests.supervisor.support import (
    DEMO_ALIAS,
    DEMO_RELATIVE,
    list_backends,
    llama_server_children,
    started_supervisor,
    wait_until,
)

READY = supervisor_pb2.BACKEND_STATE_READY
DRAINING = supervisor_pb2.BACKEND_STATE_DRAINING
STOPPED = supervisor_pb2.BACKEND_STATE_STOPPED


def publish_new_release(models_dir: Path, demo_model: Path, scratch: Path) -> None:
    """What a finished download looks like: a different file of the same model renamed into place."""
    os.replace(new_release(demo_model, scratch / "download.gguf", context_length=4096), models_dir / DEMO_RELATIVE)


@dataclass
class FollowingRouter:
    """What the Router does with WatchBackends: sends to READY backends, never to DRAINING ones."""

    table: dict[str, supervisor_pb2.Backend] = field(default_factory=dict)
    events: list[pb.BackendEvent] = field(default_factory=list)
    _turn: itertools.count[int] = field(default_factory=itertools.count)

    async def follow(self, stub: pb_grpc.SupervisorServiceStub) -> None:
        async for message in stub.WatchBackends(pb.WatchBackendsRequest()):
            if message.WhichOneof("update") == "snapshot":
                self.table = {b.id: b for b in message.snapshot.backends}
                continue
            event = message.event
            self.events.append(event)
            if event.type == pb.BACKEND_EVENT_TYPE_REMOVED:
                self.table.pop(event.backend.id, None)
                continue
            self.table[event.backend.id] = event.backend
            if event.HasField("replaced"):
                self.table[event.replaced.id] = event.replaced

    def pick(self) -> supervisor_pb2.Backend | None:
        ready = sorted((b for b in self.table.values() if b.state == READY), key=lambda b: b.id)
        return ready[next(self._turn) % len(ready)] if ready else None


async def test_a_swap_under_load_loses_no_request(
    registry: RunningRegistry, models_dir: Path, demo_model: Path, tmp_path: Path
) -> None:
    async with started_supervisor(registry.address, drain_settle_seconds=1.0) as (_supervisor, stub):
        old = (await stub.EnsureBackend(pb.EnsureBackendRequest(model=DEMO_ALIAS), timeout=60)).backend
        router = FollowingRouter()
        follower = asyncio.create_task(router.follow(stub))
        await wait_until(lambda: router.pick() is not None, 10, "the router to see the backend")

        served: Counter[str] = Counter()
        failures: list[str] = []
        stop = asyncio.Event()

        async def client(client_number: int) -> None:
            async with httpx.AsyncClient(timeout=60) as http:
                for n in itertools.count():
                    if stop.is_set():
                        return
                    backend = router.pick()
                    if backend is None:
                        failures.append("no READY backend to send to")
                        await asyncio.sleep(0.05)
                        continue
                    try:
                        reply = await http.post(
                            f"{backend.endpoint}/completion",
                            json={"prompt": f"Client {client_number}, request {n}: say hello.", "n_predict": 8},
                        )
                        if reply.status_code == 200 and reply.json().get("content") is not None:
                            served[backend.id] += 1
                        else:
                            failures.append(f"{backend.id}: HTTP {reply.status_code} {reply.text[:200]}")
                    except httpx.HTTPError as error:
                        failures.append(f"{backend.id}: {type(error).__name__} {error}")

        clients = [asyncio.create_task(client(i)) for i in range(3)]
        await wait_until(lambda: sum(served.values()) >= 6, 30, "steady traffic")
        publish_new_release(models_dir, demo_model, tmp_path)

        def switched() -> pb.BackendEvent | None:
            return next((e for e in router.events if e.type == pb.BACKEND_EVENT_TYPE_SWITCHED), None)

        event = await wait_until(switched, 60, "the SWITCHED event")

        def old_stopped() -> bool:
            return any(e.backend.id == old.id and e.backend.state == STOPPED for e in router.events)

        await wait_until(old_stopped, 60, "the old backend to stop")
        new_served_before = served[event.backend.id]
        await wait_until(lambda: served[event.backend.id] >= new_served_before + 6, 30, "traffic on the new one")
        stop.set()
        await asyncio.gather(*clients)
        follower.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follower

        assert failures == []
        assert event.replaced.id == old.id and event.replaced.state == DRAINING
        assert event.backend.state == READY and event.backend.id != old.id
        assert event.backend.model_fingerprint != old.model_fingerprint
        assert served[old.id] > 0 and served[event.backend.id] > 0
        # The old process is gone; only the new one runs.
        backends = {b.id: b for b in await list_backends(stub)}
        assert backends[old.id].state == STOPPED and "replaced by a new file" in backends[old.id].state_reason
        assert backends[event.backend.id].state == READY
        assert llama_server_children() >= {backends[event.backend.id].pid}
        assert old.pid not in llama_server_children()
        # The new backend was READY before the switch; the old one's DRAINING came with the switch.
        new_ready = next(
            i for i, e in enumerate(router.events) if e.backend.id == event.backend.id and e.backend.state == READY
        )
        switch = router.events.index(event)
        assert new_ready < switch
        assert all(
            e.backend.state != DRAINING for e in router.events[:switch] if e.backend.id == old.id
        ), "no DRAINING of the old backend before the switch"


async def test_a_changed_file_that_is_invalid_keeps_the_running_backend(
    registry: RunningRegistry, models_dir: Path, tmp_path: Path
) -> None:
    async with started_supervisor(registry.address) as (supervisor, stub):
        backend = (await stub.EnsureBackend(pb.EnsureBackendRequest(model=DEMO_ALIAS), timeout=60)).backend
        broken = tmp_path / "broken.gguf"
        broken.write_bytes(b"GGUF" + b"\0" * 4096)
        os.replace(broken, models_dir / DEMO_RELATIVE)

        def registry_says_invalid() -> bool:
            model = next(m for m in supervisor.fleet.models.values() if m.alias == DEMO_ALIAS)
            return model.state == registry_pb2.MODEL_STATE_INVALID

        await wait_until(registry_says_invalid, 30, "the Registry to judge the new file")
        await asyncio.sleep(1.0)  # give a (wrong) swap the chance to start
        (now,) = await list_backends(stub)
        assert now.id == backend.id and now.state == READY and now.pid == backend.pid
        async with httpx.AsyncClient(timeout=30) as http:
            reply = await http.post(f"{now.endpoint}/completion", json={"prompt": "Hi", "n_predict": 4})
        assert reply.status_code == 200
        # It says why it keeps its file, in ListBackends and the metric, and still answers EnsureBackend.
        assert "INVALID" in now.file_notice and "serving the file loaded before" in now.file_notice, now
        ensured = (await stub.EnsureBackend(pb.EnsureBackendRequest(model=DEMO_ALIAS), timeout=10)).backend
        assert ensured.id == backend.id
        kept = REGISTRY.get_sample_value(
            "lmc_supervisor_model_file_kept_total", {"model": now.model_id, "reason": "invalid"}
        )
        assert kept is not None and kept >= 1

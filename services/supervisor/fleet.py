"""The Fleet: every backend the Supervisor runs, and every decision about them.

- `ensure`: a READY backend for a model, starting its replicas if needed; concurrent callers for
  the same model share one start.
- Capacity: each start is checked against the memory budget; idle backends of other models are
  stopped, least recently used first, to make room.
- Following the Registry: a READY model whose bytes changed (fingerprint) is swapped without
  downtime (new backend READY → SWITCHED event → old one drains → stopped); a removed model's
  backends drain and stop. Only READY models are ever started.
- Idle backends unload after the TTL; STOPPED entries leave the table after their retention.
- Every change is one event for `watch` (snapshot first), numbered by `revision`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import grpc
from lmcluster.registry.v1 import registry_pb2, registry_service_pb2, registry_service_pb2_grpc
from lmcluster.supervisor.v1 import supervisor_pb2, supervisor_service_pb2
from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential_jitter

from services.common.units import human_bytes
from services.supervisor import metrics
from services.supervisor.backend import (
    DRAINING,
    FAILED,
    READY,
    STARTING,
    STOPPED,
    Backend,
    BackendUnavailable,
    memory_estimate,
    state_name,
)
from services.supervisor.capacity import (
    DoesNotFit,
    Resident,
    default_budget,
    mem_total_bytes,
    plan_room,
)
from services.supervisor.ports import PortPool
from services.supervisor.settings import SupervisorSettings

log = logging.getLogger(__name__)

Event = supervisor_service_pb2.BackendEventType
ADDED = supervisor_service_pb2.BACKEND_EVENT_TYPE_ADDED
CHANGED = supervisor_service_pb2.BACKEND_EVENT_TYPE_CHANGED
REMOVED = supervisor_service_pb2.BACKEND_EVENT_TYPE_REMOVED
SWITCHED = supervisor_service_pb2.BACKEND_EVENT_TYPE_SWITCHED

_WATCH_QUEUE = 10_000
_SERVABLE_KINDS = (registry_pb2.MODEL_KIND_LLM, registry_pb2.MODEL_KIND_EMBEDDING, registry_pb2.MODEL_KIND_UNSPECIFIED)


class ModelNotFound(Exception):
    pass


class ModelNotServable(Exception):
    """The Registry knows the model but it may not be started (not READY, or a projector)."""


class RegistryUnavailable(Exception):
    pass


class WatchOverflow(Exception):
    """A watcher fell too far behind; it must watch again (and gets a fresh snapshot)."""


class _StreamEnded(Exception):
    pass


def model_state_name(state: int) -> str:
    return registry_pb2.ModelState.Name(state).removeprefix("MODEL_STATE_")


class Fleet:
    def __init__(self, settings: SupervisorSettings, binary: Path, *, budget: int | None = None) -> None:
        self.settings = settings
        self.binary = binary
        self.ports = PortPool(settings.backend_host, settings.port_range_start, settings.port_range_end)
        if budget is None:
            budget = (
                int(settings.memory_budget)
                if settings.memory_budget is not None
                else default_budget(mem_total_bytes(), settings.memory_fraction, int(settings.memory_reserve))
            )
        self.budget = budget
        self.backends: dict[str, Backend] = {}
        self.models: dict[str, registry_pb2.Model] = {}
        self.registry_synced = asyncio.Event()
        self.revision = 0
        self._watchers: set[asyncio.Queue[supervisor_service_pb2.WatchBackendsResponse | None]] = set()
        self._starts: dict[str, asyncio.Task[Backend]] = {}
        self._swaps: dict[str, asyncio.Task[None]] = {}
        self._capacity = asyncio.Lock()
        # Fingerprints of files whose swap failed to start, per model: not retried until it changes.
        self._broken_files: dict[str, registry_pb2.Fingerprint] = {}
        self._timers: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[object]] = set()
        self._closing = False
        metrics.publish([], self.budget, 0, settings.scrape_targets_file)

    # --- reading -------------------------------------------------------------------------------
    def listing(self, model: str = "") -> list[Backend]:
        backends = list(self.backends.values())
        if model:
            backends = [
                b for b in backends if model in (b.model.id, b.model.alias, b.model.base_id) or model == b.id
            ]
        return sorted(backends, key=lambda b: (b.model.id, b.replica, b.state_since))

    def backends_of(self, model_id: str) -> list[Backend]:
        return [b for b in self.backends.values() if b.model.id == model_id]

    @property
    def used_bytes(self) -> int:
        return sum(b.estimate.total for b in self.backends.values() if b.live)

    def memory(self) -> supervisor_pb2.MemoryBudget:
        return supervisor_pb2.MemoryBudget(budget_bytes=self.budget, used_bytes=self.used_bytes)

    # --- models --------------------------------------------------------------------------------
    def resolve(self, reference: str, variant: str = "") -> registry_pb2.Model:
        """A model by id, alias or base id (best READY variant), optionally another variant of it."""
        if not self.registry_synced.is_set() and not self.models:
            raise RegistryUnavailable(
                f"the Registry at {self.settings.registry_address} has not answered yet; retry shortly"
            )
        model = self.models.get(reference) or next(
            (m for m in self.models.values() if m.alias == reference), None
        )
        if model is None:
            family = sorted(
                (m for m in self.models.values() if m.base_id == reference),
                key=lambda m: [v.model_id for v in m.variants].index(m.id) if m.variants else 0,
            )
            model = next((m for m in family if m.state == registry_pb2.MODEL_STATE_READY), None) or next(
                iter(family), None
            )
        if model is None:
            known = sorted(m.alias or m.id for m in self.models.values())
            hint = f"; known: {', '.join(known[:12])}" + (" …" if len(known) > 12 else "") if known else ""
            raise ModelNotFound(f"no model {reference!r} in the Registry{hint}")
        if variant and variant.lower() != model.quantization.lower():
            chosen = next((v for v in model.variants if v.quantization.lower() == variant.lower()), None)
            if chosen is None or chosen.model_id not in self.models:
                offered = ", ".join(v.quantization for v in model.variants) or model.quantization
                raise ModelNotFound(f"model {reference!r} has no variant {variant!r}; variants: {offered}")
            model = self.models[chosen.model_id]
        return model

    @staticmethod
    def check_servable(model: registry_pb2.Model) -> None:
        if model.state != registry_pb2.MODEL_STATE_READY:
            raise ModelNotServable(
                f"model {model.id} is {model_state_name(model.state)} in the Registry"
                + (f": {model.reason}" if model.reason else "")
                + "; only READY models are started"
            )
        if model.kind not in _SERVABLE_KINDS:
            raise ModelNotServable(
                f"model {model.id} is a multimodal projector; it is loaded with its model, never alone"
            )

    def replicas_for(self, model: registry_pb2.Model) -> int:
        wanted = self.settings.replicas.get(model.id) or self.settings.replicas.get(model.alias) or 1
        return max(1, wanted)

    # --- ensure ---------------------------------------------------------------------------------
    async def ensure(self, reference: str, variant: str = "", *, pin: bool = False) -> Backend:
        """A READY backend of the model (least busy replica), started if none runs."""
        if not self.registry_synced.is_set() and not self.models:
            # Right after start: give the Registry's first snapshot a moment instead of failing.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.registry_synced.wait(), self.settings.registry_wait_seconds)
        model = self.resolve(reference, variant)
        if not any(b.state == READY for b in self.backends_of(model.id)):
            # A READY backend keeps serving while its file is re-checked or replaced by a bad one.
            self.check_servable(model)
        while True:
            backends = self.backends_of(model.id)
            ready = [b for b in backends if b.state == READY]
            if ready:
                chosen = min(ready, key=lambda b: (b.slots_busy, b.last_used_monotonic))
                chosen.mark_used()
                chosen.pinned |= pin
                return chosen
            starting = [b for b in backends if b.state == STARTING]
            if starting:
                chosen = await _first_ready(starting)
                chosen.pinned |= pin
                chosen.mark_used()
                return chosen
            failed = [
                b
                for b in backends
                if b.state == FAILED and time.monotonic() - b.state_since < self.settings.failed_retry_seconds
            ]
            if failed and not self._starts.get(model.id):
                newest = max(failed, key=lambda b: b.state_since)
                retry_in = self.settings.failed_retry_seconds - (time.monotonic() - newest.state_since)
                raise BackendUnavailable(
                    f"backend {newest.id} is FAILED: {newest.state_reason}; last error: {newest.last_error}. "
                    f"Next try in {retry_in:.0f} s, at once when the model file changes or after StopBackend"
                )
            task = self._starts.get(model.id)
            if task is None:
                task = asyncio.create_task(self._start_replicas(model, pin=pin), name=f"start-{model.id}")
                self._starts[model.id] = task
                task.add_done_callback(lambda _t, key=model.id: self._starts.pop(key, None))
            chosen = await asyncio.shield(task)
            if chosen.state == READY:
                chosen.pinned |= pin
                chosen.mark_used()
                return chosen
            # It went away between its start and now (e.g. evicted): look again.

    async def _start_replicas(self, model: registry_pb2.Model, *, pin: bool) -> Backend:
        async with self._capacity:
            live = [b for b in self.backends_of(model.id) if b.live and b.state != DRAINING]
            taken = {b.replica for b in live}
            count = max(1, self.replicas_for(model) - len(live))
            free_numbers = (n for n in range(len(taken) + count + 1) if n not in taken)
            replicas = [next(free_numbers) for _ in range(count)]
            started = await self._make_room_and_start(model, replicas, pin=pin)
        return await _first_ready(started)

    async def _make_room_and_start(
        self,
        model: registry_pb2.Model,
        replicas: list[int],
        *,
        pin: bool,
        keep: Iterable[Backend] = (),
    ) -> list[Backend]:
        """Stops what must go to fit `replicas` new backends of `model`, then starts them (lock held)."""
        estimate = memory_estimate(model, self.settings)
        needed = estimate.total * len(replicas)
        keep_ids = {b.id for b in keep}
        residents = [
            Resident(
                backend_id=b.id,
                estimate=b.estimate.total,
                evictable=b.idle and b.model.id != model.id and b.id not in keep_ids,
                last_used=b.last_used_monotonic,
            )
            for b in self.backends.values()
            if b.live
        ]
        what = f"{model.alias or model.id} ×{len(replicas)} ({estimate.describe()} each)"
        evict = plan_room(needed, self.budget, residents, what=what)
        if evict:
            log.info("making room for %s: stopping %s", model.id, ", ".join(evict))
            await asyncio.gather(
                *(
                    self.backends[backend_id].stop(f"evicted (least recently used) to make room for {model.id}")
                    for backend_id in evict
                )
            )
        started: list[Backend] = []
        for replica in replicas:
            # An old FAILED or STOPPED entry for the same replica gives way to the new one.
            for old in [b for b in self.backends_of(model.id) if b.replica == replica and not b.live]:
                self._remove(old)
            backend = self._new_backend(model, replica=replica, port=self.ports.acquire())
            backend.pinned = pin
            self.backends[backend.id] = backend
            self._publish(ADDED, backend)
            backend.start()
            started.append(backend)
        return started

    def _new_backend(self, model: registry_pb2.Model, *, replica: int, port: int) -> Backend:
        name = model.alias or model.id.rsplit("/", 1)[-1]
        return Backend(
            backend_id=f"{name}#{replica}@{port}",
            model=model,
            replica=replica,
            settings=self.settings,
            binary=self.binary,
            ports=self.ports,
            port=port,
            on_change=self._on_backend_change,
        )

    # --- stopping -------------------------------------------------------------------------------
    async def stop_backends(self, *, backend_id: str = "", model: str = "", force: bool = False) -> list[Backend]:
        if backend_id:
            if backend_id not in self.backends:
                raise ModelNotFound(f"no backend {backend_id!r}; ListBackends shows the ids")
            targets = [self.backends[backend_id]]
        else:
            targets = self.listing(model)
            if not targets:
                raise ModelNotFound(f"no backend of model {model!r}")
        await asyncio.gather(*(b.stop("stopped on request", drain=not force) for b in targets))
        return targets

    async def close(self) -> None:
        """Stops the follower, the timers and every backend (drains bounded by the shutdown drain)."""
        self._closing = True
        interrupted = [*self._timers, *self._swaps.values(), *self._starts.values()]
        for task in interrupted:
            task.cancel()
        for task in interrupted:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        backends = list(self.backends.values())
        reason = "the Supervisor is shutting down"
        stops = asyncio.gather(*(b.stop(reason) for b in backends))
        try:
            await asyncio.wait_for(asyncio.shield(stops), self.settings.shutdown_drain_seconds)
        except TimeoutError:
            # Whoever stops the Supervisor waits only so long: cut the drains still running.
            await asyncio.gather(*(b.stop(reason, drain=False) for b in backends))
            await stops
        for task in list(self._background):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for queue in list(self._watchers):
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(None)

    def _remove(self, backend: Backend) -> None:
        if self.backends.pop(backend.id, None) is not None:
            self._publish(REMOVED, backend)

    # --- events ---------------------------------------------------------------------------------
    def _on_backend_change(self, backend: Backend) -> None:
        if self.backends.get(backend.id) is backend:
            self._publish(CHANGED, backend)

    def _publish(self, kind: int, backend: Backend, replaced: Backend | None = None) -> None:
        self.revision += 1
        event = supervisor_service_pb2.BackendEvent(type=kind, backend=backend.to_proto())
        if replaced is not None:
            event.replaced.CopyFrom(replaced.to_proto())
        message = supervisor_service_pb2.WatchBackendsResponse(revision=self.revision, event=event)
        for queue in list(self._watchers):
            try:
                queue.put_nowait(message)
            except asyncio.QueueFull:
                self._watchers.discard(queue)
                queue.get_nowait()
                queue.put_nowait(None)
        metrics.publish(self.backends.values(), self.budget, self.used_bytes, self.settings.scrape_targets_file)

    async def watch(self) -> AsyncIterator[supervisor_service_pb2.WatchBackendsResponse]:
        """The snapshot, then every event; ends with WatchOverflow if the reader falls behind."""
        queue: asyncio.Queue[supervisor_service_pb2.WatchBackendsResponse | None] = asyncio.Queue(_WATCH_QUEUE)
        self._watchers.add(queue)
        try:
            yield supervisor_service_pb2.WatchBackendsResponse(
                revision=self.revision,
                snapshot=supervisor_service_pb2.BackendSnapshot(backends=[b.to_proto() for b in self.listing()]),
            )
            while True:
                message = await queue.get()
                if message is None:
                    if self._closing:
                        return
                    raise WatchOverflow(f"the watcher fell more than {_WATCH_QUEUE} events behind; watch again")
                yield message
        finally:
            self._watchers.discard(queue)

    # --- following the Registry -------------------------------------------------------------------
    def start_background(self) -> None:
        """The Registry follower and the idle/retention timer."""
        self._timers = [
            asyncio.create_task(self._follow_registry(), name="follow-registry"),
            asyncio.create_task(self._housekeeping(), name="housekeeping"),
        ]

    def _spawn(self, coroutine: object, name: str) -> asyncio.Task[object]:
        task: asyncio.Task[object] = asyncio.create_task(coroutine, name=name)  # type: ignore[arg-type]
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def _follow_registry(self) -> None:
        attempts = 0
        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type(Exception),
            wait=wait_exponential_jitter(multiplier=0.5, max=10.0, jitter=0.5),
        ):
            with attempt:
                try:
                    async with grpc.aio.insecure_channel(self.settings.registry_address) as channel:
                        stub = registry_service_pb2_grpc.RegistryServiceStub(channel)
                        async for message in stub.WatchModels(registry_service_pb2.WatchModelsRequest()):
                            if attempts:
                                log.info("following the Registry at %s again", self.settings.registry_address)
                            attempts = 0
                            self.apply_registry(message)
                    raise _StreamEnded("the Registry closed the watch")
                except Exception as error:
                    attempts += 1
                    if attempts in (1, 10) or attempts % 100 == 0:
                        log.warning(
                            "lost the Registry at %s (%s); backends keep running, reconnecting",
                            self.settings.registry_address,
                            error.code().name if isinstance(error, grpc.aio.AioRpcError) else error,
                        )
                    raise

    def apply_registry(self, message: registry_service_pb2.WatchModelsResponse) -> None:
        kind = message.WhichOneof("update")
        if kind == "snapshot":
            fresh = {model.id: model for model in message.snapshot.models}
            for model_id in set(self.models) - set(fresh):
                self._model_removed(self.models[model_id])
            for model in fresh.values():
                self._model_seen(model)
            self.models = fresh
            self.registry_synced.set()
        elif kind == "event":
            event = message.event
            if event.type == registry_service_pb2.MODEL_EVENT_TYPE_REMOVED:
                self.models.pop(event.model.id, None)
                self._model_removed(event.model)
            else:
                self.models[event.model.id] = event.model
                self._model_seen(event.model)

    def _model_seen(self, model: registry_pb2.Model) -> None:
        self.models[model.id] = model
        live = [b for b in self.backends_of(model.id) if b.live and b.state != DRAINING]
        if not live:
            return
        if all(b.model.fingerprint == model.fingerprint for b in live) and model.state == registry_pb2.MODEL_STATE_READY:
            for backend in live:
                backend.note_file("")
            return
        if self._broken_files.get(model.id) == model.fingerprint:
            return
        if model.state != registry_pb2.MODEL_STATE_READY:
            # Serving never waits for re-validation: the loaded weights stay until a READY file
            # replaces them, and an INVALID file never does.
            state = model_state_name(model.state)
            # A download's progress is in the Registry; the notice changes only with the verdict.
            why = f": {model.reason}" if model.reason and model.state == registry_pb2.MODEL_STATE_INVALID else ""
            notice = f"the file on disk is {state}{why}; serving the file loaded before"
            if any(b.file_notice != notice for b in live):
                log.warning("model %s changed on disk: %s", model.id, notice)
                metrics.KEPT_OLD_FILE.labels(model.id, state.lower()).inc()
            for backend in live:
                backend.note_file(notice)
            return
        if model.id not in self._swaps:
            task = asyncio.create_task(self._swap(model.id), name=f"swap-{model.id}")
            self._swaps[model.id] = task
            task.add_done_callback(lambda _t, key=model.id: self._swaps.pop(key, None))

    def _model_removed(self, model: registry_pb2.Model) -> None:
        for backend in self.backends_of(model.id):
            if backend.live:
                self._spawn(backend.stop("its model file was removed"), f"retire-{backend.id}")

    # --- swapping ---------------------------------------------------------------------------------
    async def _swap(self, model_id: str) -> None:
        """Replaces every backend of the model that runs an older file, one replica at a time."""
        while not self._closing:
            model = self.models.get(model_id)
            if model is None or model.state != registry_pb2.MODEL_STATE_READY:
                return
            stale = [
                b
                for b in self.backends_of(model_id)
                if b.live and b.state != DRAINING and b.model.fingerprint != model.fingerprint
            ]
            if not stale or self._broken_files.get(model_id) == model.fingerprint:
                return
            await self._replace(stale[0], model)

    async def _replace(self, old: Backend, model: registry_pb2.Model) -> None:
        why = f"replaced by a new file ({human_bytes(model.size_bytes)}, header {model.fingerprint.header_sha256[:12]})"
        log.info("model %s changed on disk: swapping %s", model.id, old.id)
        try:
            async with self._capacity:
                (new,) = await self._make_room_and_start(model, [old.replica], pin=old.pinned, keep=[old])
        except DoesNotFit as error:
            log.warning("no room to run both files of %s (%s); swapping with a gap", model.id, error)
            await old.stop(f"{why}; no memory to overlap")
            async with self._capacity:
                (new,) = await self._make_room_and_start(model, [old.replica], pin=old.pinned)
            with contextlib.suppress(BackendUnavailable):
                await new.wait_ready()
            return
        try:
            await new.wait_ready()
        except BackendUnavailable as error:
            log.error("the new file of %s did not start (%s); %s keeps serving the old one", model.id, error, old.id)
            # `old` keeps serving until the file changes again, instead of retrying a broken file forever.
            self._broken_files[model.id] = model.fingerprint
            metrics.KEPT_OLD_FILE.labels(model.id, "failed_to_start").inc()
            old.note_file(f"the new file did not start ({error}); serving the file loaded before")
            return
        if old.state not in (READY, STARTING):
            # The old one died meanwhile; nothing to switch from.
            await old.stop(why, drain=False)
            return
        old.mark_draining(why)
        self._publish(SWITCHED, new, replaced=old)
        # The old one finishes its answers in the background: a long generation must not hold
        # back the next replica's swap, or the swap to a file that changed again meanwhile.
        self._spawn(old.stop(why), f"retire-{old.id}")

    # --- timers ---------------------------------------------------------------------------------
    async def _housekeeping(self) -> None:
        ttl = self.settings.idle_ttl_seconds
        period = min(5.0, ttl / 4) if ttl > 0 else 5.0
        while True:
            await asyncio.sleep(max(0.2, period))
            now = time.monotonic()
            for backend in list(self.backends.values()):
                if (
                    ttl > 0
                    and backend.idle
                    and not backend.pinned
                    and now - backend.last_used_monotonic >= ttl
                    and backend.model.id not in self._swaps
                ):
                    self._spawn(backend.stop(f"idle for {ttl:.0f} s"), f"unload-{backend.id}")
                elif backend.state == STOPPED and now - backend.state_since >= self.settings.stopped_retention_seconds:
                    self._remove(backend)

    # --- preload ----------------------------------------------------------------------------------
    async def preload(self) -> None:
        """Starts what the settings name (or every READY model for 'all'); logs what cannot start."""
        if self.settings.preload_all:
            names = [
                m.id
                for m in self.models.values()
                if m.state == registry_pb2.MODEL_STATE_READY and m.kind in _SERVABLE_KINDS
            ]
        else:
            names = self.settings.preload_models
        results = await asyncio.gather(*(self.ensure(name, pin=True) for name in names), return_exceptions=True)
        for name, result in zip(names, results, strict=True):
            if isinstance(result, BaseException):
                log.error("preloading %s failed: %s", name, result)
            else:
                log.info("preloaded %s as %s at %s", name, result.id, result.endpoint)


async def _first_ready(backends: list[Backend]) -> Backend:
    """The first of `backends` to become READY; BackendUnavailable if none does."""

    async def ready(backend: Backend) -> Backend:
        await backend.wait_ready()
        return backend

    tasks = [asyncio.create_task(ready(b)) for b in backends]
    last_error: BaseException | None = None
    try:
        for next_done in asyncio.as_completed(tasks):
            try:
                return await next_done
            except BackendUnavailable as error:
                last_error = error
        raise last_error or BackendUnavailable("no backend started")
    finally:
        for task in tasks:
            task.cancel()


__all__ = ["Fleet", "ModelNotFound", "ModelNotServable", "RegistryUnavailable", "WatchOverflow", "state_name"]

"""One llama-server process for one model variant, from start to stop.

Life cycle::

    STARTING ──/health 200──► READY ──drain──► DRAINING ──idle or timeout──► STOPPED
       ▲  │                      │
       │  └─exit / timeout──┐    └─exit / liveness fails─┐
       └──── backoff + jitter ◄──────────────────────────┘ (too many in a row: FAILED)

The process runs in its own process group and gets SIGKILL from the kernel when the Supervisor
dies (services/common/children.py), so a killed Supervisor leaves no llama-server holding memory. A stop is
SIGTERM to the group, then SIGKILL after the grace period.

llama-server has no drain endpoint: draining waits until `/slots` shows no slot processing (twice
in a row, after routers have had `drain_settle_seconds` to see DRAINING), bounded by a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import re
import signal
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import httpx
from lmcluster.registry.v1 import registry_pb2
from lmcluster.supervisor.v1 import supervisor_pb2

from services.common.children import OWN_PROCESS_GROUP, dies_with_parent, idle_scheduled, niced
from services.supervisor import metrics
from services.supervisor.capacity import MemoryEstimate, estimate_memory
from services.supervisor.flags import LaunchPlan, build_command
from services.supervisor.ports import PortPool, advertised_host, host_port, local_host
from services.supervisor.settings import SupervisorSettings

log = logging.getLogger(__name__)

State = supervisor_pb2.BackendState
STARTING = supervisor_pb2.BACKEND_STATE_STARTING
READY = supervisor_pb2.BACKEND_STATE_READY
DRAINING = supervisor_pb2.BACKEND_STATE_DRAINING
FAILED = supervisor_pb2.BACKEND_STATE_FAILED
STOPPED = supervisor_pb2.BACKEND_STATE_STOPPED
LIVE_STATES = frozenset({STARTING, READY, DRAINING})

STDERR_LINES = 200
ERROR_TAIL_LINES = 6
_TIMESTAMP = re.compile(r"^\d+\.\d+\.\d+\.\d+\s+")
_ERROR_LINE = re.compile(
    r"^E\s|error|GGML_ASSERT|failed|out of memory|cannot|abort|segmentation fault|terminate called", re.I
)


def state_name(state: int) -> str:
    return supervisor_pb2.BackendState.Name(state).removeprefix("BACKEND_STATE_")


def restart_delay(failures: int, initial: float, maximum: float, rng: random.Random) -> float:
    """Exponential backoff with jitter: initial × 2^(failures-1), capped, scaled by 0.5–1.0 at random.

    The jitter keeps several crashing backends from restarting in lockstep.
    """
    base = min(maximum, initial * (2 ** max(0, failures - 1)))
    return base * rng.uniform(0.5, 1.0)


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with code {returncode}"


def error_tail(lines: list[str], limit: int = ERROR_TAIL_LINES) -> str:
    """The error lines of llama-server's stderr (its last lines when none look like errors)."""
    cleaned = [_TIMESTAMP.sub("", line).strip() for line in lines if line.strip()]
    errors = [line for line in cleaned if _ERROR_LINE.search(line)]
    chosen = errors[-limit:] if errors else cleaned[-3:]
    return "\n".join(line[:400] for line in chosen)


def parse_prometheus(text: str) -> dict[str, float]:
    """Unlabelled samples of a Prometheus text page (all llama-server publishes)."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.partition(" ")
        with contextlib.suppress(ValueError):
            values[name] = float(value.strip())
    return values


def kv_cache_usage(slots: list[dict[str, object]]) -> float:
    """Share of all slots' context that holds tokens: prompt plus generated tokens of each slot
    that has served a request (an idle slot keeps its tokens cached for the next prompt)."""
    capacity = used = 0
    for slot in slots:
        n_ctx = slot.get("n_ctx")
        if not isinstance(n_ctx, int) or n_ctx <= 0:
            continue
        capacity += n_ctx
        tokens = slot.get("n_prompt_tokens")
        decoded = 0
        for item in slot.get("next_token") or []:  # type: ignore[attr-defined]
            if isinstance(item, dict) and isinstance(item.get("n_decoded"), int):
                decoded = max(decoded, item["n_decoded"])
        if isinstance(tokens, int):
            used += min(n_ctx, tokens + decoded)
    return used / capacity if capacity else 0.0


def memory_estimate(model: registry_pb2.Model, settings: SupervisorSettings) -> MemoryEstimate:
    """What a backend of `model` started with `settings` is expected to use."""
    plan = build_command("llama-server", model, settings, 0)
    return estimate_memory(
        model,
        ctx_total=plan.ctx_size,
        cache_type_k=plan.cache_type_k,
        cache_type_v=plan.cache_type_v,
        prompt_cache_bytes=settings.prompt_cache_mib * 1024**2,
        overhead_bytes=int(settings.runtime_overhead),
    )


class BackendUnavailable(Exception):
    """The backend ended FAILED or STOPPED while someone waited for it to be READY."""


class Backend:
    """One llama-server process (and its restarts) serving one model file."""

    def __init__(
        self,
        *,
        backend_id: str,
        model: registry_pb2.Model,
        replica: int,
        settings: SupervisorSettings,
        binary: Path,
        ports: PortPool,
        port: int = 0,
        on_change: Callable[[Backend], None],
        rng: random.Random | None = None,
    ) -> None:
        self.id = backend_id
        self.model = model
        self.replica = replica
        self.settings = settings
        self.binary = binary
        self._ports = ports
        self._on_change = on_change
        self._rng = rng or random.Random()

        self.state: int = STARTING
        self.state_reason = "waiting to start"
        # Held in `ports` from creation; kept across restarts while it stays free.
        self.port = port
        self.process: asyncio.subprocess.Process | None = None
        self.restart_count = 0
        self.failures_in_row = 0
        self.last_error = ""
        self.slots_busy = 0
        self.slots_total = settings.parallel
        self.context_per_slot = 0
        # Share of the KV cache (all slots' context) holding tokens, from /slots (llama-server's
        # /metrics no longer has it).
        self.kv_cache_usage = 0.0
        self.plan: LaunchPlan | None = None
        self.started_at = 0.0
        self.ready_at = 0.0
        self.last_used_at = 0.0
        self.last_used_monotonic = time.monotonic()
        self.state_since = time.monotonic()
        # Preloaded backends are not unloaded when idle.
        self.pinned = False
        self.estimate: MemoryEstimate = memory_estimate(model, settings)
        # Set while the model's file on disk differs from the loaded one without replacing it.
        self.file_notice = ""

        self._stderr: deque[str] = deque(maxlen=STDERR_LINES)
        self._changed = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._stop_task: asyncio.Task[None] | None = None
        self._drain_cut = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None
        self._usage_counter = -1.0
        # No keep-alive: an idle kept connection would hold one of llama-server's few HTTP threads.
        self._http = httpx.AsyncClient(
            timeout=settings.health_timeout_seconds, limits=httpx.Limits(max_keepalive_connections=0)
        )

    # --- what others read ----------------------------------------------------------------------
    @property
    def address(self) -> str:
        """HOST:PORT other hosts reach llama-server at (the advertised host, not the bind host)."""
        if not self.port:
            return ""
        return host_port(advertised_host(self.settings.backend_host, self.settings.advertise_host), self.port)

    @property
    def endpoint(self) -> str:
        return f"http://{self.address}" if self.port else ""

    @property
    def _local_url(self) -> str:
        """Where the Supervisor itself checks llama-server: on this machine, whatever is advertised."""
        return f"http://{host_port(local_host(self.settings.backend_host), self.port)}"

    @property
    def pid(self) -> int:
        if self.process is not None and self.process.returncode is None:
            return self.process.pid
        return 0

    @property
    def live(self) -> bool:
        return self.state in LIVE_STATES

    @property
    def idle(self) -> bool:
        return self.state == READY and self.slots_busy == 0

    @property
    def stderr_lines(self) -> list[str]:
        return list(self._stderr)

    def describe(self) -> str:
        return f"{self.id} ({state_name(self.state)})"

    def to_proto(self) -> supervisor_pb2.Backend:
        message = supervisor_pb2.Backend(
            id=self.id,
            model_id=self.model.id,
            alias=self.model.alias,
            base_id=self.model.base_id,
            variant=self.model.quantization,
            replica=self.replica,
            endpoint=self.endpoint,
            metrics_url=f"{self.endpoint}/metrics" if self.port else "",
            state=self.state,
            state_reason=self.state_reason,
            pid=self.pid,
            restart_count=self.restart_count,
            last_error=self.last_error,
            slots=supervisor_pb2.Slots(
                total=self.slots_total,
                busy=self.slots_busy,
                context_per_slot=self.context_per_slot or (self.plan.context_per_slot if self.plan else 0),
            ),
            command=self.plan.argv if self.plan else [],
            memory_estimate_bytes=self.estimate.total,
            model_fingerprint=self.model.fingerprint.header_sha256,
            file_notice=self.file_notice,
        )
        for name, seconds in (
            ("started_at", self.started_at),
            ("ready_at", self.ready_at),
            ("last_used_at", self.last_used_at),
        ):
            if seconds:
                getattr(message, name).FromNanoseconds(int(seconds * 1e9))
        return message

    # --- changes -------------------------------------------------------------------------------
    def _set_state(self, state: int, reason: str, *, notify: bool = True) -> None:
        if state != self.state:
            log.info("backend %s: %s → %s (%s)", self.id, state_name(self.state), state_name(state), reason)
            self.state_since = time.monotonic()
        self.state = state
        self.state_reason = reason
        if notify:
            self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()
        self._on_change(self)

    def note_file(self, notice: str) -> None:
        """Says why the backend keeps its loaded file (empty: the file on disk is the loaded one)."""
        if notice != self.file_notice:
            self.file_notice = notice
            self._notify()

    def mark_used(self) -> None:
        self.last_used_at = time.time()
        self.last_used_monotonic = time.monotonic()

    def mark_draining(self, reason: str) -> None:
        """DRAINING without an event of its own: the Fleet announces it (SWITCHED) in the same step."""
        self._stopping = True
        self._set_state(DRAINING, reason, notify=False)
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_ready(self) -> None:
        """Returns once READY; raises BackendUnavailable if the backend fails or stops first."""
        while self.state != READY:
            if self.state in (FAILED, STOPPED, DRAINING):
                raise BackendUnavailable(
                    f"backend {self.id} is {state_name(self.state)}: {self.state_reason}"
                    + (f"; last error: {self.last_error}" if self.last_error else "")
                )
            await self._changed.wait()

    # --- running -------------------------------------------------------------------------------
    def start(self) -> None:
        """Starts supervising: spawn, wait for health, watch, restart; returns at once."""
        if self._task is None:
            self._task = asyncio.create_task(self._supervise(), name=f"backend-{self.id}")

    async def _supervise(self) -> None:
        while not self._stopping:
            outcome = await self._run_once()
            if self._stopping:
                return
            self.failures_in_row += 1
            self.last_error = outcome
            if self.failures_in_row > self.settings.max_restarts:
                self._set_state(
                    FAILED,
                    f"gave up after {self.failures_in_row} failures in a row (max_restarts="
                    f"{self.settings.max_restarts})",
                )
                self._release_port()
                return
            delay = restart_delay(
                self.failures_in_row,
                self.settings.restart_backoff_initial_seconds,
                self.settings.restart_backoff_max_seconds,
                self._rng,
            )
            self.restart_count += 1
            metrics.RESTARTS.labels(self.model.alias or self.model.id).inc()
            first_line = outcome.splitlines()[0] if outcome else "unknown"
            self._set_state(STARTING, f"restart {self.restart_count} in {delay:.1f} s after: {first_line}")
            log.warning("backend %s failed (%s); restarting in %.1f s", self.id, outcome, delay)
            await asyncio.sleep(delay)

    async def _run_once(self) -> str:
        """One process from spawn to exit; returns why it ended."""
        try:
            self.port = self._ports.acquire(prefer=self.port or None)
        except Exception as error:  # the range is exhausted
            return str(error)
        self.plan = build_command(self.binary, self.model, self.settings, self.port)
        self._stderr.clear()
        self.slots_busy = 0
        self.ready_at = 0.0
        log.info("backend %s: starting %s", self.id, " ".join(self.plan.argv))
        started = time.monotonic()
        try:
            self.process = await asyncio.create_subprocess_exec(
                *dies_with_parent(self._scheduled(self.plan.argv)),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                **OWN_PROCESS_GROUP,
            )
        except OSError as error:
            return f"cannot run {self.plan.argv[0]}: {error}"
        self.started_at = time.time()
        self._reader = asyncio.create_task(self._read_output(self.process), name=f"stderr-{self.id}")
        exited = asyncio.create_task(self.process.wait())
        try:
            self._set_state(STARTING, "loading the model")
            failure = await self._wait_healthy(exited)
            if failure is not None:
                return failure
            await self._refresh_slots()
            self.ready_at = time.time()
            self.mark_used()
            metrics.START_SECONDS.observe(time.monotonic() - started)
            self._set_state(READY, "healthy")
            return await self._watch(exited)
        finally:
            if self.process.returncode is None and not self._stopping:
                await self._terminate(grace=0)
            exited.cancel()

    async def _wait_healthy(self, exited: asyncio.Task[int]) -> str | None:
        """Polls /health until 200; returns why not when the process exits or the timeout passes."""
        deadline = time.monotonic() + self.settings.ready_timeout_seconds
        while True:
            if exited.done():
                await self._drain_reader()
                return self._failure(f"{describe_exit(exited.result())} while loading")
            try:
                reply = await self._http.get(f"{self._local_url}/health")
                if reply.status_code == 200:
                    return None
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                return self._failure(f"not healthy after {self.settings.ready_timeout_seconds:.0f} s")
            await asyncio.wait({exited}, timeout=0.1)

    async def _watch(self, exited: asyncio.Task[int]) -> str:
        """Liveness while READY or DRAINING; returns why the process must be replaced."""
        misses = 0
        while True:
            await asyncio.wait({exited}, timeout=self.settings.liveness_interval_seconds)
            if exited.done():
                await self._drain_reader()
                return self._failure(describe_exit(exited.result()))
            if await self._healthy():
                misses = 0
                await self._refresh_slots()
                await self._refresh_usage()
            else:
                misses += 1
                if misses >= self.settings.liveness_failures:
                    return self._failure(
                        f"/health did not answer {misses} times in a row "
                        f"({self.settings.liveness_interval_seconds:.0f} s apart)"
                    )
            if (
                self.failures_in_row
                and self.state == READY
                and time.time() - self.ready_at >= self.settings.stable_seconds
            ):
                self.failures_in_row = 0

    def _scheduled(self, argv: list[str]) -> list[str]:
        """llama-server's command under the configured CPU scheduling (the gateway's request work first)."""
        if self.settings.sched_policy == "idle":
            return idle_scheduled(argv)
        return niced(argv, self.settings.nice)

    def _failure(self, what: str) -> str:
        tail = error_tail(list(self._stderr))
        return f"{what}: {tail}" if tail else what

    async def _healthy(self) -> bool:
        try:
            return (await self._http.get(f"{self._local_url}/health")).status_code == 200
        except httpx.HTTPError:
            return False

    async def _refresh_slots(self) -> None:
        """Slot count, per-slot context and busy slots from /slots; notifies when busy changes."""
        try:
            reply = await self._http.get(f"{self._local_url}/slots")
            slots = reply.json() if reply.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            slots = None
        if not isinstance(slots, list) or not slots:
            return
        busy = sum(1 for slot in slots if slot.get("is_processing"))
        self.kv_cache_usage = kv_cache_usage(slots)
        metrics.KV_CACHE_USAGE.labels(self.id, self.model.id).set(self.kv_cache_usage)
        changed = busy != self.slots_busy or len(slots) != self.slots_total
        self.slots_total = len(slots)
        self.context_per_slot = int(slots[0].get("n_ctx", 0)) or self.context_per_slot
        self.slots_busy = busy
        if busy:
            self.mark_used()
        if changed and self.state in (READY, DRAINING):
            self._notify()

    async def _refresh_usage(self) -> None:
        """Infers use from /metrics: tokens processed since the last check mean someone used it."""
        try:
            reply = await self._http.get(f"{self._local_url}/metrics")
            values = parse_prometheus(reply.text) if reply.status_code == 200 else {}
        except httpx.HTTPError:
            return
        counter = values.get("llamacpp:prompt_tokens_total", 0.0) + values.get("llamacpp:tokens_predicted_total", 0.0)
        if values.get("llamacpp:requests_processing", 0.0) > 0 or (
            self._usage_counter >= 0 and counter != self._usage_counter
        ):
            self.mark_used()
        self._usage_counter = counter

    async def in_flight(self) -> int | None:
        """Requests processing or waiting for a slot right now; None when the backend does not answer."""
        try:
            slots_reply = await self._http.get(f"{self._local_url}/slots")
            metrics_reply = await self._http.get(f"{self._local_url}/metrics")
        except httpx.HTTPError:
            return None
        busy = 0
        if slots_reply.status_code == 200:
            with contextlib.suppress(ValueError):
                busy = sum(1 for slot in slots_reply.json() if slot.get("is_processing"))
        if metrics_reply.status_code == 200:
            values = parse_prometheus(metrics_reply.text)
            busy = max(busy, int(values.get("llamacpp:requests_processing", 0)))
            busy += int(values.get("llamacpp:requests_deferred", 0))
        return busy

    @property
    def log_path(self) -> Path | None:
        if self.settings.log_dir is None:
            return None
        return self.settings.log_dir / f"{re.sub(r'[^A-Za-z0-9._@#-]', '_', self.id)}.log"

    async def _read_output(self, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        log_file = None
        if self.log_path is not None:
            try:
                self.log_path.parent.mkdir(parents=True, exist_ok=True)
                log_file = self.log_path.open("a", encoding="utf-8")
                log_file.write(f"--- pid {process.pid}: {' '.join(self.plan.argv if self.plan else [])}\n")
            except OSError as error:
                log.warning("cannot write %s: %s", self.log_path, error)
        try:
            async for raw in process.stdout:
                line = raw.decode(errors="replace").rstrip()
                self._stderr.append(line)
                if log_file is not None:
                    log_file.write(line + "\n")
                    log_file.flush()
                log.debug("%s | %s", self.id, line)
        finally:
            if log_file is not None:
                log_file.close()

    async def _drain_reader(self) -> None:
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError, TimeoutError, Exception):
                await asyncio.wait_for(asyncio.shield(self._reader), 2.0)

    # --- stopping ------------------------------------------------------------------------------
    async def stop(self, reason: str, *, drain: bool = True) -> None:
        """Stops for good: drains first (unless `drain` is False), SIGTERM, SIGKILL after the grace.

        Concurrent calls share one stop; a call without drain cuts a drain in progress short. A
        cancelled caller does not interrupt the stop.
        """
        if not drain:
            self._drain_cut.set()
        if self._stop_task is None:
            self._stop_task = asyncio.create_task(self._stop(reason, drain), name=f"stop-{self.id}")
        await asyncio.shield(self._stop_task)

    async def _stop(self, reason: str, drain: bool) -> None:
        if self.state == STOPPED:
            return
        self._stopping = True
        if drain and self.state in (READY, DRAINING) and self.pid:
            if self.state != DRAINING:
                self._set_state(DRAINING, reason)
            await self.wait_until_idle()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        await self._terminate(grace=self.settings.stop_grace_seconds)
        self._release_port()
        self.slots_busy = 0
        self._set_state(STOPPED, reason)
        await self._http.aclose()

    async def wait_until_idle(self) -> bool:
        """Waits (bounded) until no request is in flight; False when the drain timeout passed."""
        deadline = time.monotonic() + self.settings.drain_timeout_seconds
        settle = min(self.settings.drain_settle_seconds, self.settings.drain_timeout_seconds)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._drain_cut.wait(), settle)
        idle_in_row = errors_in_row = 0
        while time.monotonic() < deadline and self.pid and not self._drain_cut.is_set():
            in_flight = await self.in_flight()
            if in_flight is None:
                errors_in_row += 1
                if errors_in_row >= 3:
                    log.warning("backend %s does not answer while draining; stopping it", self.id)
                    return False
            else:
                errors_in_row = 0
                idle_in_row = idle_in_row + 1 if in_flight == 0 else 0
                if idle_in_row >= 2:
                    return True
            await asyncio.sleep(0.25)
        if self._drain_cut.is_set():
            return False
        if self.pid:
            log.warning(
                "backend %s still busy after the %.0f s drain timeout; stopping it",
                self.id,
                self.settings.drain_timeout_seconds,
            )
            return False
        return True

    async def _terminate(self, grace: float) -> None:
        process = self.process
        if process is None:
            return
        if process.returncode is None:
            self._signal_group(process.pid, signal.SIGTERM if grace > 0 else signal.SIGKILL)
            try:
                await asyncio.wait_for(process.wait(), grace if grace > 0 else 10.0)
            except TimeoutError:
                log.warning("backend %s did not stop within %.0f s; killing it", self.id, grace)
                self._signal_group(process.pid, signal.SIGKILL)
                await process.wait()
        # Anything the process left in its group goes too.
        self._signal_group(process.pid, signal.SIGKILL)
        await self._drain_reader()

    @staticmethod
    def _signal_group(pid: int, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)

    def _release_port(self) -> None:
        if self.port:
            self._ports.release(self.port)
            self.port = 0

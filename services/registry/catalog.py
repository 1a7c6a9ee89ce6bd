"""The model table: what the models folder holds, kept current, and who is told when it changes.

All table changes happen on the event loop, one refresh at a time; file I/O (walking, stat,
validation, hashing) runs in threads so a slow or hostile file never blocks an RPC.

A file's life: found by a scan, a watch event or a settle recheck. A regular file is validated
once its size and mtime have been still for `settle_seconds` (judged by its mtime age, or, for an
mtime in the future, by how long we have seen it unchanged); until then it is DOWNLOADING and a
recheck is scheduled. A validation whose file changed while it was read is thrown away (the file
is DOWNLOADING again). Validation results are kept per file signature (device, inode, size, mtime,
ctime), so a rescan of an unchanged folder costs one stat per file.

After each refresh the models are rebuilt from the per-file states (model_table.py), compared with
the published ones, and every difference becomes one event with the next revision number.
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import logging
import os
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from google.protobuf.timestamp_pb2 import Timestamp
from lmcluster.registry.v1 import registry_pb2, registry_service_pb2

from services.common.units import human_bytes
from services.registry import metrics
from services.registry.discovery import (
    EntryKind,
    FileSignature,
    FoundFile,
    relative_model_path,
    scan_models_dir,
    stat_model_file,
)
from services.registry.fingerprint import full_sha256
from services.registry.folder_watch import watch_folder
from services.registry.gguf_validation import FileCheck, GgufProblem, ProblemClass, check_model_file
from services.registry.layout import ModelPath, is_hidden, parse_model_path
from services.registry.model_table import DOWNLOADING, INVALID, READY, FileState, build_models
from services.registry.settings import RegistrySettings
from services.registry.subscriptions import Subscription

log = logging.getLogger(__name__)

_KIND_PROBLEM = {
    EntryKind.NOT_REGULAR: ProblemClass.NOT_REGULAR,
    EntryKind.BROKEN_LINK: ProblemClass.BROKEN_LINK,
    EntryKind.UNREADABLE: ProblemClass.UNREADABLE,
}
_EVENT_VERB = {
    registry_service_pb2.MODEL_EVENT_TYPE_ADDED: "added",
    registry_service_pb2.MODEL_EVENT_TYPE_CHANGED: "changed",
    registry_service_pb2.MODEL_EVENT_TYPE_REMOVED: "removed",
}


@dataclass
class _FileRecord:
    found: FoundFile
    layout: ModelPath
    observed_at: float  # monotonic time the current signature was first seen
    checked: FileSignature | None = None
    check: FileCheck | None = None


class ModelCatalog:
    """The Registry's in-memory model table over one models folder."""

    def __init__(self, settings: RegistrySettings) -> None:
        self.settings = settings
        self.root = settings.models_dir.expanduser().absolute()
        self._limits = settings.limits
        self._architectures = settings.architectures
        self._files: dict[Path, _FileRecord] = {}
        self._models: dict[str, registry_pb2.Model] = {}
        self._by_alias: dict[str, str] = {}
        self._revision = 0
        self._subscriptions: set[Subscription] = set()
        self._due: dict[Path, float] = {}
        self._lock = asyncio.Lock()
        self._ready = asyncio.Event()
        self._settle_wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._executor = ThreadPoolExecutor(settings.scan_workers, thread_name_prefix="registry-scan")
        self._hash_slots = asyncio.Semaphore(settings.hash_concurrency)
        self._sha256_cache: dict[tuple[str, int, int, str], str] = {}

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Starts watching, runs the first full scan (returns when it is done), then keeps current."""
        if not self.root.is_dir():
            log.warning("models folder %s does not exist (yet); watching for it", self.root)
        if self.settings.watch:
            self._spawn(self._watch_loop(), "watch")
        await self.refresh()
        self._ready.set()
        self._spawn(self._settle_loop(), "settle")
        self._spawn(self._rescan_loop(), "rescan")
        counts: dict[str, int] = {}
        for model in self._models.values():
            state = registry_pb2.ModelState.Name(model.state).removeprefix("MODEL_STATE_")
            counts[state] = counts.get(state, 0) + 1
        log.info(
            "first scan of %s: %d models (%s)",
            self.root,
            len(self._models),
            ", ".join(f"{n} {state}" for state, n in sorted(counts.items())) or "none",
        )

    async def close(self) -> None:
        """Stops the background work and ends every watcher's stream."""
        self._stopping.set()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        for subscription in list(self._subscriptions):
            subscription.close()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _spawn(self, coro: object, name: str) -> None:
        self._tasks.append(asyncio.create_task(coro, name=f"registry-{name}"))  # type: ignore[arg-type]

    async def wait_ready(self) -> None:
        """Returns once the first full scan has finished."""
        await self._ready.wait()

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    # -- reading the table -----------------------------------------------------------------

    @property
    def revision(self) -> int:
        return self._revision

    def models(self) -> list[registry_pb2.Model]:
        """Every model, projectors included, in id order."""
        return list(self._models.values())

    def lookup(self, name: str) -> registry_pb2.Model | None:
        """A model by id or alias; also by case-insensitive id/alias, file path or path under the folder."""
        key = name.strip()
        model = self._models.get(key) or self._models.get(self._by_alias.get(key, ""))
        if model is not None:
            return model
        lowered = key.lower()
        for candidate in self._models.values():
            if candidate.id.lower() == lowered or candidate.alias == lowered:
                return candidate
        path = Path(key)
        absolute = path if path.is_absolute() else self.root / path
        for candidate in self._models.values():
            if any(Path(f.path) == absolute for f in candidate.files):
                return candidate
        return None

    def suggestions(self, name: str) -> list[str]:
        names = [*self._models, *self._by_alias]
        return difflib.get_close_matches(name.strip(), names, n=3, cutoff=0.6)

    def subscribe(self) -> tuple[Subscription, int, list[registry_pb2.Model]]:
        """A new watcher's buffer plus the snapshot it starts from (taken at the same instant)."""
        subscription = Subscription(self.settings.watch_queue_size)
        if self._stopping.is_set():
            subscription.close()
        self._subscriptions.add(subscription)
        metrics.WATCHERS.set(len(self._subscriptions))
        return subscription, self._revision, self.models()

    def unsubscribe(self, subscription: Subscription) -> None:
        subscription.close()
        self._subscriptions.discard(subscription)
        metrics.WATCHERS.set(len(self._subscriptions))

    async def sha256(self, model: registry_pb2.Model) -> str:
        """The full SHA-256 of the model's files (cached per fingerprint); reads every byte off the loop."""
        fingerprint = model.fingerprint
        key = (model.id, fingerprint.size_bytes, fingerprint.mtime_ns, fingerprint.header_sha256)
        cached = self._sha256_cache.get(key)
        if cached is not None:
            return cached
        async with self._hash_slots:
            paths = [Path(f.path) for f in model.files]
            digest = await asyncio.to_thread(full_sha256, paths)
        current = self._models.get(model.id)
        if current is not None and current.fingerprint == fingerprint:
            self._sha256_cache = {k: v for k, v in self._sha256_cache.items() if k[0] != model.id}
            self._sha256_cache[key] = digest
        return digest

    # -- keeping it current ----------------------------------------------------------------

    async def refresh(self, paths: Iterable[Path] | None = None, scope: str = "full") -> None:
        """Brings the table up to date: everything (paths None), or what changed at these paths."""
        async with self._lock:
            started = time.perf_counter()
            targets = None if paths is None else {Path(p) for p in paths}
            loop = asyncio.get_running_loop()
            known = set(self._files)
            found, gone = await loop.run_in_executor(self._executor, self._discover, targets, known)
            touched = self._apply_found(found, gone)
            todo = self._due_for_validation(found)
            if todo:
                await self._validate(todo)
            if touched or todo:
                self._publish_changes()
            metrics.SCAN_SECONDS.labels(scope).observe(time.perf_counter() - started)
            if self._due:
                self._settle_wake.set()

    def _discover(
        self, targets: set[Path] | None, known: set[Path]
    ) -> tuple[dict[Path, FoundFile], set[Path]]:
        """Runs in a thread: what exists now at the targets, and which known files are gone."""
        max_depth = self.settings.max_depth
        if targets is None or self.root in targets:
            everything = scan_models_dir(self.root, max_depth)
            return everything, known - set(everything)
        found: dict[Path, FoundFile] = {}
        gone: set[Path] = set()
        known_text = {str(path): path for path in known}
        for target in targets:
            rel = _relative(self.root, target)
            if rel is None or any(is_hidden(part) for part in rel.parts):
                continue
            prefix = str(target) + os.sep
            inside = [path for text, path in known_text.items() if text.startswith(prefix)]
            if target.is_dir():
                if len(rel.parts) <= max_depth:
                    subtree = scan_models_dir(self.root, max_depth, start=target)
                    found.update(subtree)
                    gone.update(path for path in inside if path not in subtree)
                continue
            for path in [target, *inside]:
                if relative_model_path(self.root, path) is None:
                    continue
                file = stat_model_file(self.root, path, max_depth)
                if file is not None:
                    found[path] = file
                elif path in known:
                    gone.add(path)
        return found, gone

    def _apply_found(self, found: dict[Path, FoundFile], gone: set[Path]) -> bool:
        """Updates the per-file records; returns whether anything changed."""
        touched = False
        now = time.monotonic()
        for path in gone:
            if self._files.pop(path, None) is not None:
                touched = True
            self._due.pop(path, None)
        for path, file in found.items():
            record = self._files.get(path)
            if (
                record is not None
                and record.found.signature == file.signature
                and record.found.kind == file.kind
            ):
                record.found = file
                continue
            try:
                layout = parse_model_path(file.rel)
            except ValueError:
                continue
            self._files[path] = _FileRecord(file, layout, observed_at=now)
            touched = True
        return touched

    def _due_for_validation(self, found: dict[Path, FoundFile]) -> list[_FileRecord]:
        """Records among `found` whose current signature is settled and not yet validated."""
        todo: list[_FileRecord] = []
        now_monotonic, now_wall_ns = time.monotonic(), time.time_ns()
        settle = self.settings.settle_seconds
        for path in found:
            record = self._files.get(path)
            if record is None or record.found.kind != EntryKind.REGULAR:
                continue
            if record.checked == record.found.signature:
                self._due.pop(path, None)
                continue
            age = (now_wall_ns - record.found.mtime_ns) / 1e9
            seen_for = now_monotonic - record.observed_at
            if age >= settle or seen_for >= settle:
                self._due.pop(path, None)
                todo.append(record)
            else:
                wait = settle - seen_for if age < 0 else min(settle - age, settle - seen_for)
                self._due[path] = now_monotonic + max(wait, 0.05)
        return todo

    async def _validate(self, records: list[_FileRecord]) -> None:
        loop = asyncio.get_running_loop()
        jobs = [
            loop.run_in_executor(self._executor, self._check_file, record.found, record.layout)
            for record in records
        ]
        results = await asyncio.gather(*jobs)
        now = time.monotonic()
        for record, (check, after) in zip(records, results, strict=True):
            path = record.found.path
            if self._files.get(path) is not record:
                continue  # replaced or removed while it was being read
            metrics.FILES_VALIDATED.inc()
            if after is None:
                continue  # gone; the watcher or the next scan removes it
            if after.signature != record.found.signature or after.kind != record.found.kind:
                # It changed while being read: a download still in progress. Judge it again later.
                self._files[path] = _FileRecord(after, record.layout, observed_at=now)
                self._due[path] = now + max(self.settings.settle_seconds, 0.05)
                continue
            # The facts are all the table needs; the parsed header (tensor table) is let go.
            record.checked, record.check = record.found.signature, replace(check, header=None)
            if check.problem is not None:
                metrics.VALIDATION_FAILURES.labels(check.problem.problem_class.value).inc()

    def _check_file(self, found: FoundFile, layout: ModelPath) -> tuple[FileCheck, FoundFile | None]:
        """Runs in a thread: validates one file, then stats it again to see whether it held still."""
        check = check_model_file(
            found.path,
            split_index=layout.split_index,
            split_count=layout.split_count,
            projector=layout.is_projector,
            limits=self._limits,
            architectures=self._architectures,
        )
        try:
            return check, stat_model_file(self.root, found.path, self.settings.max_depth)
        except Exception:
            log.exception("stat of %s failed", found.path)
            return check, None

    def _file_state(self, record: _FileRecord) -> FileState:
        found = record.found
        base = FileState(record.layout, found.path, found.size, found.mtime_ns, DOWNLOADING)
        if found.kind != EntryKind.REGULAR:
            return replace(base, state=INVALID, reason=found.detail, problem_class=_KIND_PROBLEM[found.kind])
        if record.checked != found.signature or record.check is None:
            # No clock in the reason: it changes only when the file does, and so do the events.
            reason = (
                f"still being written ({human_bytes(found.size)} so far); "
                f"validated once it has not changed for {self.settings.settle_seconds:g} s"
            )
            return replace(base, reason=reason)
        check = record.check
        if check.problem is not None:
            return replace(
                base,
                state=INVALID,
                reason=check.problem.message,
                problem_class=check.problem.problem_class.value,
                facts=check.facts,
                header_sha256=check.header_sha256,
            )
        return replace(base, state=READY, facts=check.facts, header_sha256=check.header_sha256)

    def _publish_changes(self) -> None:
        now_wall_ns = time.time_ns()
        fresh = build_models(self._file_state(record) for record in self._files.values())
        now = Timestamp()
        now.FromNanoseconds(now_wall_ns)
        events: list[tuple[int, registry_pb2.Model]] = []
        for model_id in sorted(set(self._models) | set(fresh)):
            old, new = self._models.get(model_id), fresh.get(model_id)
            if new is None:
                assert old is not None
                events.append((registry_service_pb2.MODEL_EVENT_TYPE_REMOVED, old))
                continue
            if old is None:
                new.discovered_at.CopyFrom(now)
                new.updated_at.CopyFrom(now)
                events.append((registry_service_pb2.MODEL_EVENT_TYPE_ADDED, new))
                continue
            new.discovered_at.CopyFrom(old.discovered_at)
            new.updated_at.CopyFrom(old.updated_at)
            if new == old:
                fresh[model_id] = old
                continue
            new.updated_at.CopyFrom(now)
            events.append((registry_service_pb2.MODEL_EVENT_TYPE_CHANGED, new))
        self._models = fresh
        self._by_alias = {model.alias: model.id for model in fresh.values()}
        for event_type, model in events:
            self._revision += 1
            response = registry_service_pb2.WatchModelsResponse(
                revision=self._revision, event=registry_service_pb2.ModelEvent(type=event_type, model=model)
            )
            for subscription in list(self._subscriptions):
                if not subscription.offer(response):
                    metrics.WATCH_RESYNCS.inc()
            if self._ready.is_set():
                _log_event(event_type, model)
        metrics.REVISION.set(self._revision)
        self._update_model_gauge()

    def _update_model_gauge(self) -> None:
        counts: dict[tuple[str, str], int] = {}
        for model in self._models.values():
            state = registry_pb2.ModelState.Name(model.state).removeprefix("MODEL_STATE_").lower()
            kind = registry_pb2.ModelKind.Name(model.kind).removeprefix("MODEL_KIND_").lower()
            counts[(state, kind)] = counts.get((state, kind), 0) + 1
        for state in ("ready", "downloading", "invalid"):
            for kind in ("llm", "embedding", "projector"):
                metrics.MODELS.labels(state, kind).set(counts.get((state, kind), 0))

    # -- background loops ------------------------------------------------------------------

    async def _watch_loop(self) -> None:
        async def on_change(paths: set[Path]) -> None:
            await self.refresh(paths, "watch")

        await watch_folder(
            self.root,
            on_change,
            stop=self._stopping,
            debounce_ms=self.settings.watch_debounce_ms,
            force_polling=self.settings.watch_force_polling,
            retry_seconds=min(2.0, self.settings.rescan_seconds),
        )

    async def _rescan_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.rescan_seconds)
            try:
                await self.refresh(None, "full")
            except Exception:
                log.exception("full rescan of %s failed", self.root)

    async def _settle_loop(self) -> None:
        while True:
            if not self._due:
                self._settle_wake.clear()
                await self._settle_wake.wait()
                continue
            delay = min(self._due.values()) - time.monotonic()
            if delay > 0:
                self._settle_wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._settle_wake.wait(), delay)
                continue
            now = time.monotonic()
            paths = {path for path, due in self._due.items() if due <= now}
            for path in paths:
                self._due.pop(path, None)
            try:
                await self.refresh(paths, "settle")
            except Exception:
                log.exception("recheck of %d settling files failed", len(paths))
                await asyncio.sleep(1.0)


def _relative(root: Path, path: Path) -> Path | None:
    try:
        return path.relative_to(root)
    except ValueError:
        return None


def _log_event(event_type: int, model: registry_pb2.Model) -> None:
    verb = _EVENT_VERB[event_type]
    state = registry_pb2.ModelState.Name(model.state).removeprefix("MODEL_STATE_")
    if model.state == INVALID and event_type != registry_service_pb2.MODEL_EVENT_TYPE_REMOVED:
        log.warning("model %s %s: INVALID: %s", model.id, verb, model.reason)
    else:
        log.info("model %s %s: %s", model.id, verb, state)


__all__ = ["GgufProblem", "ModelCatalog"]

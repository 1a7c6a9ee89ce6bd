"""Faults the chaos suite injects into a running `lmcluster up`, and how it tells the stack healed.

Processes are found below the launcher by their command line: `serve NAME` for a service,
`envoy`, `redis-server`; llama-server backends by the Supervisor's ListBackends. Model files are
changed the ways a user's tools change them: a finished download renamed over the old file, a
file rewritten in place, a download still growing, a copy that runs out of disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from gguf import GGUFReader

from services.launcher import probes
from tests.fixtures.parts import process_table
from tests.fixtures.stack import Stack

SERVICES = ("registry", "supervisor", "embedding", "cache", "router")
HEAL_TIMEOUT = 180.0


# --- processes -----------------------------------------------------------------------------------
def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").rstrip("\0").split("\0")
    except OSError:
        return []


def part_pid(stack: Stack, part: str) -> int:
    """The pid of one part of the stack: a service name, "envoy", "redis" or "llama-server"."""
    if part == "llama-server":
        ready = stack.ready_backends()
        assert ready, "no READY backend"
        return ready[0].pid
    launcher = stack.part.process.pid
    for pid, info in process_table().items():
        if info.ppid != launcher:
            continue
        argv = _cmdline(pid)
        if part in SERVICES and argv[-2:] == ["serve", part]:
            return pid
        if part == "envoy" and info.name == "envoy":
            return pid
        if part == "redis" and info.name.startswith("redis-server"):
            return pid
    raise AssertionError(f"no {part} process below the launcher {launcher}")


def part_healthy(stack: Stack, part: str) -> Callable[[], bool]:
    """True once the part answers again: the launcher's own readiness probe for it (Envoy's
    `/readyz`, which also needs a SERVING Router), or a READY backend for llama-server."""
    if part == "llama-server":
        return lambda: bool(stack.ready_backends())
    if part in SERVICES:
        probe = probes.grpc_serving(getattr(stack, part))
    elif part == "envoy":
        probe = probes.http_ok(f"{stack.http_url}/readyz")
    elif part == "redis":
        probe = probes.redis_ping(stack.redis_url)
    else:
        raise ValueError(part)
    return lambda: asyncio.run(probe())


def wait_for(probe: Callable[[], object], what: str, timeout: float = HEAL_TIMEOUT) -> float:
    """Polls `probe` (exceptions count as false) until it is true; returns the seconds it took."""
    started = time.monotonic()
    while True:
        with contextlib.suppress(Exception):
            if probe():
                return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise AssertionError(f"no {what} within {timeout:.0f} s")
        time.sleep(0.1)


@contextlib.contextmanager
def paused(pid: int) -> Iterator[None]:
    """SIGSTOP (a hung process: its sockets accept, nothing answers), SIGCONT at the end."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


# --- model files ---------------------------------------------------------------------------------
def new_release(source: Path, target: Path, context_length: int) -> Path:
    """A copy of `source` whose header differs (another trained context): a new release of the model."""
    shutil.copyfile(source, target)
    reader = GGUFReader(target, "r+")
    field = reader.get_field("llama.context_length")
    assert field is not None
    field.parts[field.data[0]][0] = context_length
    reader.data.flush()
    del reader, field
    return target


def rewrite_in_place(path: Path, source: Path, *, chunk: int = 4 << 20, pause: float = 0.02) -> None:
    """Writes `source`'s bytes over `path` (same inode: truncate, then write in chunks, slowly)."""
    with source.open("rb") as src, path.open("r+b") as dst:
        dst.truncate(0)
        while block := src.read(chunk):
            dst.write(block)
            dst.flush()
            time.sleep(pause)
        os.fsync(dst.fileno())


def grow_download(source: Path, target: Path, *, seconds: float) -> None:
    """Writes `source` to `target` bit by bit over about `seconds`, as a download in progress does."""
    size = source.stat().st_size
    steps = max(1, int(seconds / 0.1))
    chunk = max(1, size // steps + 1)
    with source.open("rb") as src, target.open("wb") as dst:
        while block := src.read(chunk):
            dst.write(block)
            dst.flush()
            time.sleep(0.1)


@contextlib.contextmanager
def small_disk(folder: Path, size_bytes: int) -> Iterator[str]:
    """`folder` on a disk of `size_bytes`: a tmpfs mount where mounting is allowed (root), else a
    copier limited by RLIMIT_FSIZE, which fails its writes at the same size the way a full disk does
    (the file left behind is the same truncated file). Yields which of the two it used."""
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(folder)], capture_output=True
    ).returncode == 0
    try:
        yield "tmpfs" if mounted else "rlimit"
    finally:
        if mounted:
            for _ in range(50):
                if subprocess.run(["umount", str(folder)], capture_output=True).returncode == 0:
                    break
                time.sleep(0.1)


def copy_until_full(source: Path, target: Path, limit_bytes: int, how: str) -> str:
    """Copies `source` to `target` with `cp` on a disk that fills up; returns cp's complaint."""
    limit = ["prlimit", f"--fsize={limit_bytes}"] if how == "rlimit" else []
    result = subprocess.run([*limit, "cp", str(source), str(target)], capture_output=True, text=True)
    assert result.returncode != 0, "the copy fitted on the small disk"
    return result.stderr.strip() or f"cp exited {result.returncode}"


def quantize(source: Path, target: Path, kind: str) -> Path:
    """Another quantization variant of `source` made with llama-quantize."""
    from services.common import binaries

    tool = binaries.llama_tool("llama-quantize")
    result = subprocess.run(
        [str(tool), "--allow-requantize", str(source), str(target), kind], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return target


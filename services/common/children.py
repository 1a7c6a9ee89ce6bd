"""Child processes that never outlive their parent.

Each child leads its own process group, so a stop reaches everything it started, and the kernel
sends it SIGKILL when its parent dies, even by SIGKILL (PR_SET_PDEATHSIG), so nothing keeps holding
ports, RAM or VRAM. The death signal is set by util-linux's `setpriv --pdeathsig KILL`, which then
execs the real program (same pid), rather than by a Python `preexec_fn`: Python code run between
fork and exec in a process with other threads (gRPC's, a progress spinner's) can deadlock or crash
the child.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from typing import Any

log = logging.getLogger(__name__)

_SETPRIV = shutil.which("setpriv")
_NICE = shutil.which("nice")
_CHRT = shutil.which("chrt")

# Keyword arguments for subprocess.Popen and asyncio.create_subprocess_exec: a process group of
# the child's own, created by the C code between fork and exec.
OWN_PROCESS_GROUP: dict[str, Any] = {"process_group": 0}


def dies_with_parent(argv: Sequence[str]) -> list[str]:
    """`argv` wrapped so that the kernel kills the program when the process that started it dies."""
    if _SETPRIV is None:
        log.warning("setpriv (util-linux) not found: %s may outlive its parent", argv[0] if argv else "?")
        return list(argv)
    return [_SETPRIV, "--pdeathsig", "KILL", "--", *argv]


def niced(argv: Sequence[str], niceness: int) -> list[str]:
    """`argv` run at `niceness` (coreutils' `nice`, which execs it: same pid, and every thread it
    starts inherits the weight). Raising one's own niceness needs no privilege."""
    if niceness <= 0:
        return list(argv)
    if _NICE is None:
        log.warning("nice (coreutils) not found: %s runs at normal priority", argv[0] if argv else "?")
        return list(argv)
    return [_NICE, "-n", str(niceness), "--", *argv]


def idle_scheduled(argv: Sequence[str]) -> list[str]:
    """`argv` under SCHED_IDLE (util-linux's `chrt --idle 0`, which execs it: same pid, and every
    thread inherits the policy): it runs only when no other process wants the core. Moving oneself
    to SCHED_IDLE needs no privilege."""
    if _CHRT is None:
        log.warning("chrt (util-linux) not found: %s runs at normal priority", argv[0] if argv else "?")
        return list(argv)
    return [_CHRT, "--idle", "0", *argv]

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
import os
import resource
import shutil
import threading
from collections.abc import Sequence
from typing import Any

log = logging.getLogger(__name__)

_SETPRIV = shutil.which("setpriv")
_NICE = shutil.which("nice")
_CHRT = shutil.which("chrt")

# Keyword arguments for subprocess.Popen and asyncio.create_subprocess_exec: a process group of the
# child's own (setpgid by the C code between fork and exec), in its parent's session. Not a session
# of its own: with the kernel's autogroup scheduling each session is a group that the fair scheduler
# weighs against the others before it looks at their threads, so a llama-server under SCHED_IDLE in a
# session of its own took turns with the gateway's processes (a waking Router waited up to a 4 ms
# tick for it) instead of giving way at once (docs/supervisor.md). uvloop's subprocesses do not take
# `process_group`: the two services that start processes, the launcher and the Supervisor, run on
# asyncio's loop.
OWN_PROCESS_GROUP: dict[str, Any] = {"process_group": 0}


def dies_with_parent(argv: Sequence[str]) -> list[str]:
    """`argv` wrapped so that the kernel kills the program when the process that started it dies."""
    if _SETPRIV is None:
        log.warning("setpriv (util-linux) not found: %s may outlive its parent", argv[0] if argv else "?")
        return list(argv)
    return [_SETPRIV, "--pdeathsig", "KILL", "--", *argv]


# CAP_SYS_NICE's bit in /proc/self/status's CapEff (linux/capability.h).
_CAP_SYS_NICE = 23


def permitted_niceness(niceness: int) -> int:
    """`niceness`, or the lowest this process may give its children when it asks for more: going
    below its own niceness needs CAP_SYS_NICE (root, `setcap cap_sys_nice`, a container's `cap_add`)
    or an RLIMIT_NICE that allows it (systemd's LimitNICE=, limits.conf's `nice`)."""
    current = os.getpriority(os.PRIO_PROCESS, 0)
    if niceness >= current or _has_cap_sys_nice():
        return niceness
    soft, _ = resource.getrlimit(resource.RLIMIT_NICE)
    floor = -20 if soft == resource.RLIM_INFINITY else 20 - soft
    return max(niceness, min(floor, current))


def _has_cap_sys_nice() -> bool:
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> _CAP_SYS_NICE & 1)
    except (OSError, ValueError):
        pass
    return os.geteuid() == 0


def niced(argv: Sequence[str], niceness: int) -> list[str]:
    """`argv` run at the absolute `niceness` (coreutils' `nice -n`, which execs it: same pid, and
    every thread it starts inherits the weight), clipped to `permitted_niceness`: a caller that asks
    for a higher priority checks it first and says what it gets (the launcher's request path)."""
    current = os.getpriority(os.PRIO_PROCESS, 0)
    permitted = permitted_niceness(niceness)
    if permitted == current:
        return list(argv)
    if _NICE is None:
        log.warning("nice (coreutils) not found: %s runs at this process's priority", argv[0] if argv else "?")
        return list(argv)
    return [_NICE, "-n", str(permitted - current), "--", *argv]


def realtime_permitted(priority: int) -> bool:
    """Whether this process may start children under SCHED_RR at `priority`: it needs CAP_SYS_NICE
    or an RLIMIT_RTPRIO that allows it, and, on a kernel with real-time group scheduling, real-time
    time in its cgroup (a container's cgroup has none unless it was granted some). Asked of the
    kernel on a thread that ends at once, as the children's threads will ask it."""
    if _CHRT is None:
        return False
    allowed: list[bool] = []

    def attempt() -> None:
        try:
            os.sched_setscheduler(0, os.SCHED_RR, os.sched_param(priority))
            allowed.append(True)
        except OSError:
            allowed.append(False)

    probe = threading.Thread(target=attempt, name="realtime-probe")
    probe.start()
    probe.join()
    return allowed == [True]


def round_robin(argv: Sequence[str], priority: int) -> list[str]:
    """`argv` under SCHED_RR at `priority` (util-linux's `chrt --rr`, which execs it: same pid, and
    every thread it starts inherits the policy): it runs as soon as it wakes, before every process
    under the normal policies, whatever their niceness. Check `realtime_permitted` first."""
    assert _CHRT is not None, "chrt (util-linux) not found"
    return [_CHRT, "--rr", str(priority), *argv]


def idle_scheduled(argv: Sequence[str]) -> list[str]:
    """`argv` under SCHED_IDLE (util-linux's `chrt --idle 0`, which execs it: same pid, and every
    thread inherits the policy): it runs only when no other process wants the core. Moving oneself
    to SCHED_IDLE needs no privilege."""
    if _CHRT is None:
        log.warning("chrt (util-linux) not found: %s runs at normal priority", argv[0] if argv else "?")
        return list(argv)
    return [_CHRT, "--idle", "0", *argv]

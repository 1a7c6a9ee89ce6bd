"""`lmcluster up` runs the request path before everything else on the host: Redis, Embedding, Cache,
the Routers and Envoy at LMC_GATEWAY_NICENESS (-5), and the hit path among them (Redis, the Routers,
Envoy) under SCHED_RR (LMC_GATEWAY_REALTIME_PRIORITY, 1) where the kernel allows it, the node's
parts at the launcher's own niceness,
llama-server under SCHED_IDLE, all of them in the launcher's session (one scheduling group, each
its own process group); without the privilege a higher priority needs, the stack still
starts and serves, at the launcher's niceness, and says so. Every service but the Supervisor runs
on uvloop unless LMC_EVENT_LOOP=asyncio; the Supervisor, which starts llama-servers, on asyncio's."""

from __future__ import annotations

import os
import secrets
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from services.common import children
from tests.chaos.faults import part_pid
from tests.fixtures.parts import free_port
from tests.fixtures.stack import DEMO_MODEL_ID, Stack, running_stack
from tests.fixtures.threads import threads_niceness, threads_policy, threads_scheduling

REQUEST_PATH = ("redis", "embedding", "cache", "router", "envoy")
HIT_PATH = ("redis", "router", "envoy")
NODE = ("registry", "supervisor")
# setpriv with CAP_SYS_NICE taken away from what the launcher (root in CI) can ever hold again.
WITHOUT_SYS_NICE = (str(shutil.which("setpriv")), "--inh-caps=-sys_nice", "--bounding-set=-sys_nice", "--")


def serves_concurrent_requests(stack: Stack) -> None:
    """Eight different questions at once through Envoy's REST port, each answered."""
    tag = secrets.token_hex(4)

    def ask(index: int) -> httpx.Response:
        body = {
            "model": DEMO_MODEL_ID,
            "messages": [{"role": "user", "content": f"Count to {index + 2}. ({tag})"}],
            "max_tokens": 6,
            "temperature": 0,
        }
        return httpx.post(f"{stack.http_url}/v1/chat/completions", json=body, timeout=120.0)

    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(ask, range(8)))
    for reply in replies:
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["message"]["content"], reply.text


def niceness_of(stack: Stack, parts: tuple[str, ...]) -> dict[str, set[int]]:
    return {part: threads_niceness(part_pid(stack, part)) for part in parts}


def scheduling_of(stack: Stack, parts: tuple[str, ...]) -> dict[str, set[tuple[int, int]]]:
    """Each part's (policy, real-time priority) over all its threads."""
    return {part: threads_scheduling(part_pid(stack, part)) for part in parts}


def test_the_request_path_runs_before_the_rest_of_the_host(tmp_path: Path, demo_models_dir: Path) -> None:
    if children.permitted_niceness(-5) != -5:
        pytest.fail("the test needs CAP_SYS_NICE (CI runs as root)")
    redis_url = f"redis://127.0.0.1:{free_port()}"  # a Redis of the stack's own, which it starts
    with running_stack(tmp_path / "stack", redis_url=redis_url, models_dir=demo_models_dir) as stack:
        serves_concurrent_requests(stack)
        assert niceness_of(stack, REQUEST_PATH) == dict.fromkeys(REQUEST_PATH, {-5})
        assert niceness_of(stack, NODE) == dict.fromkeys(NODE, {os.getpriority(os.PRIO_PROCESS, 0)})
        assert threads_policy(part_pid(stack, "llama-server")) == {os.SCHED_IDLE}
        said = stack.log_path.read_text()
        assert "the request path runs at niceness" not in said
        # The hit path under SCHED_RR 1 where this machine's kernel and cgroup allow it (they
        # always do as root in the root cgroup); else at -5 like the rest, and the launcher says so.
        normal = (os.SCHED_OTHER, 0)
        if children.realtime_permitted(1):
            assert scheduling_of(stack, HIT_PATH) == dict.fromkeys(HIT_PATH, {(os.SCHED_RR, 1)})
            assert "not under SCHED_RR" not in said
        else:
            assert scheduling_of(stack, HIT_PATH) == dict.fromkeys(HIT_PATH, {normal})
            assert "Redis, the Routers and Envoy run at niceness -5, not under SCHED_RR 1" in said, said[-2000:]
        # Embedding and Cache work after the answer: normal policy (the Embedding service's
        # background lane's thread puts itself under SCHED_IDLE).
        after_the_answer = scheduling_of(stack, ("embedding", "cache"))
        assert after_the_answer["cache"] == {normal}, after_the_answer
        assert normal in after_the_answer["embedding"] <= {normal, (os.SCHED_IDLE, 0)}, after_the_answer
        # One session, so one autogroup: the scheduler weighs llama-server's threads against the
        # request path's directly, and SCHED_IDLE gives way at once; each part still leads its own
        # process group, which a stop signals.
        parts = {part: part_pid(stack, part) for part in (*REQUEST_PATH, *NODE, "llama-server")}
        launcher = stack.part.process.pid
        assert {part: os.getsid(pid) for part, pid in parts.items()} == dict.fromkeys(parts, os.getsid(launcher))
        assert {part: os.getpgid(pid) for part, pid in parts.items()} == parts
        # The file is empty for a process in a cgroup other than the root one (a container), where
        # the kernel does not group by session at all.
        autogroups = {part: Path(f"/proc/{pid}/autogroup").read_text().split()[:1] for part, pid in parts.items()}
        assert len({tuple(group) for group in autogroups.values()}) == 1, autogroups
        # The services run on uvloop by default (LMC_EVENT_LOOP); the Supervisor, which starts
        # llama-servers, on asyncio's loop (its children are started with vfork, not fork).
        for service in ("embedding", "cache", "router", "registry"):
            assert "uvloop" in Path(f"/proc/{part_pid(stack, service)}/maps").read_text(), service
        assert "uvloop" not in Path(f"/proc/{part_pid(stack, 'supervisor')}/maps").read_text()


def test_without_the_privilege_the_stack_runs_at_the_launchers_niceness_and_says_so(
    tmp_path: Path, demo_models_dir: Path
) -> None:
    redis_url = f"redis://127.0.0.1:{free_port()}"
    with running_stack(
        tmp_path / "stack", redis_url=redis_url, models_dir=demo_models_dir, wrapper=WITHOUT_SYS_NICE
    ) as stack:
        serves_concurrent_requests(stack)
        launcher = threads_niceness(stack.part.process.pid)
        assert niceness_of(stack, REQUEST_PATH) == dict.fromkeys(REQUEST_PATH, launcher)
        assert threads_policy(part_pid(stack, "llama-server")) == {os.SCHED_IDLE}
        assert {part: threads_policy(part_pid(stack, part)) for part in HIT_PATH} == dict.fromkeys(HIT_PATH, {os.SCHED_OTHER})
        said = stack.log_path.read_text()
        assert f"the request path runs at niceness {min(launcher)}, not -5 (LMC_GATEWAY_NICENESS)" in said, said[-2000:]
        assert f"Redis, the Routers and Envoy run at niceness {min(launcher)}, not under SCHED_RR 1" in said, said[-2000:]


def test_a_lower_priority_needs_no_privilege_and_a_higher_one_is_clipped(monkeypatch: pytest.MonkeyPatch) -> None:
    current = os.getpriority(os.PRIO_PROCESS, 0)
    monkeypatch.setattr(children, "_has_cap_sys_nice", lambda: False)
    assert children.permitted_niceness(current + 3) == current + 3
    assert children.niced(["llama-server"], current + 3)[-4:] == ["-n", "3", "--", "llama-server"]
    assert children.niced(["redis-server"], current) == ["redis-server"]
    with monkeypatch.context() as limited:
        limited.setattr(children.resource, "getrlimit", lambda _: (0, 0))  # RLIMIT_NICE 0: no lower niceness
        assert children.permitted_niceness(current - 5) == current
        assert children.niced(["envoy"], current - 5) == ["envoy"]
    with monkeypatch.context() as allowed:
        allowed.setattr(children.resource, "getrlimit", lambda _: (25, 25))  # down to -5 (20 - 25)
        assert children.permitted_niceness(-10) == min(-5, current)
    monkeypatch.setattr(children, "_has_cap_sys_nice", lambda: True)
    assert children.permitted_niceness(-20) == -20


def test_the_hit_path_asks_for_sched_rr_only_where_it_is_permitted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from services.launcher import roles
    from services.launcher.settings import StackSettings

    def argv_of(**values: object) -> dict[str, list[str]]:
        settings = StackSettings(run_dir=tmp_path / "run", redis_url=f"redis://127.0.0.1:{free_port()}", **values)
        return {spec.name: spec.argv for spec in roles.build_specs(settings)}

    monkeypatch.setattr(roles, "realtime_permitted", lambda priority: True)
    granted = argv_of(routers=2, gateway_realtime_priority=3)
    for part in ("redis", "router", "router-2", "envoy"):
        assert granted[part][1:3] == ["--rr", "3"] and granted[part][0].endswith("chrt"), granted[part]
    for part in ("embedding", "cache", "registry", "supervisor"):
        assert "--rr" not in granted[part], granted[part]
    assert all("--rr" not in argv for argv in argv_of(gateway_realtime_priority=0).values())
    monkeypatch.setattr(roles, "realtime_permitted", lambda priority: False)
    assert all("--rr" not in argv for argv in argv_of().values())


def test_realtime_permission_is_what_the_kernel_says(monkeypatch: pytest.MonkeyPatch) -> None:
    refused = []

    def refuse(*args: object) -> None:
        refused.append(args)
        raise PermissionError(1, "Operation not permitted")

    with monkeypatch.context() as patched:
        patched.setattr(children.os, "sched_setscheduler", refuse)
        assert children.realtime_permitted(1) is False
    assert refused and refused[0][1] == os.SCHED_RR
    # The probe's thread ended: this process and its threads keep their policy.
    assert os.sched_getscheduler(0) == os.SCHED_OTHER


def test_the_event_loop_is_uvloops_unless_asyncio_is_asked_for() -> None:
    import asyncio

    import uvloop

    from services.common.server import loop_factory

    for name, expected in (("uvloop", uvloop.Loop), ("asyncio", asyncio.BaseEventLoop)):
        loop = loop_factory(name)()
        try:
            assert isinstance(loop, expected), (name, type(loop))
        finally:
            loop.close()

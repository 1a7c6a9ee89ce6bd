"""A node (`lmcluster up --role node`) whose llama-server is killed again and again while Routers'
gRPC calls keep the Supervisor busy: every restart loads the model and comes up.

The Supervisor starts llama-server from a process with gRPC threads at work. A child started by a
plain fork() of such a process runs gRPC's and Python's after-fork code before it execs; that child
crashed (SIGSEGV, SIGABRT) before it printed a line, and a crash loop of them left the model FAILED.
Here each kill must cost exactly one restart, and no start may fail while loading.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

import grpc
from lmcluster.supervisor.v1 import supervisor_pb2, supervisor_service_pb2, supervisor_service_pb2_grpc

from tests.fixtures.parts import REPO_ROOT, running_part
from tests.fixtures.stack import (
    STACK_START_TIMEOUT,
    STACK_STOP_GRACE,
    TEST_DEFAULTS,
    backend_port_range,
    link_demo_model,
)
from tests.launcher.test_node import free_port_on

NODE = "127.0.0.6"
KILLS = 12
CALLERS = 4
RESTART_WAIT = 60.0


def list_backends(stub: supervisor_service_pb2_grpc.SupervisorServiceStub) -> list[supervisor_pb2.Backend]:
    return list(stub.ListBackends(supervisor_service_pb2.ListBackendsRequest(), timeout=10.0).backends)


def test_a_backend_killed_again_and_again_under_grpc_traffic_restarts_every_time(
    tmp_path: Path, demo_model: Path
) -> None:
    models = tmp_path / "models"
    link_demo_model(models, demo_model)
    ports = {name: free_port_on(NODE) for name in ("registry", "supervisor", "registry_metrics", "supervisor_metrics")}
    first, last = backend_port_range()
    env = {
        **TEST_DEFAULTS,
        "LMC_REGISTRY_PORT": str(ports["registry"]),
        "LMC_SUPERVISOR_PORT": str(ports["supervisor"]),
        "LMC_REGISTRY_METRICS_PORT": str(ports["registry_metrics"]),
        "LMC_SUPERVISOR_METRICS_PORT": str(ports["supervisor_metrics"]),
        "LMC_LAUNCHER_METRICS_PORT": str(free_port_on(NODE)),
        "LMC_SUPERVISOR_PORT_RANGE_START": str(first),
        "LMC_SUPERVISOR_PORT_RANGE_END": str(last),
        "LMC_SUPERVISOR_LOG_DIR": str(tmp_path / "backends"),
        # Quick restarts, and room for every kill: a start that fails is what is looked for.
        "LMC_SUPERVISOR_RESTART_BACKOFF_INITIAL_SECONDS": "0.05",
        "LMC_SUPERVISOR_RESTART_BACKOFF_MAX_SECONDS": "0.2",
        "LMC_SUPERVISOR_MAX_RESTARTS": str(4 * KILLS),
        "LMC_MODELS_DIR": str(models),
        "LMC_RUN_DIR": str(tmp_path / "run"),
        "PYTHONUNBUFFERED": "1",
    }
    supervisor = f"{NODE}:{ports['supervisor']}"
    argv = [sys.executable, "-m", "services.cli.main", "up", "--role", "node", "--host", NODE]
    with (
        running_part("node", argv, tmp_path, env=env, cwd=REPO_ROOT, stop_grace=STACK_STOP_GRACE) as node,
        grpc.insecure_channel(supervisor) as channel,
    ):
        stub = supervisor_service_pb2_grpc.SupervisorServiceStub(channel)
        ready = lambda: [b for b in list_backends(stub) if b.state == supervisor_pb2.BACKEND_STATE_READY]  # noqa: E731
        node.wait_until(lambda: bool(ready()), STACK_START_TIMEOUT, "a READY backend")

        stop = threading.Event()
        calls = [0] * CALLERS

        def call_all_the_time(index: int) -> None:
            while not stop.is_set():
                list_backends(stub)
                calls[index] += 1

        callers = [threading.Thread(target=call_all_the_time, args=(i,), daemon=True) for i in range(CALLERS)]
        for caller in callers:
            caller.start()
        try:
            killed: set[int] = set()
            fresh: list[supervisor_pb2.Backend] = []

            def restarted() -> bool:
                fresh[:] = [b for b in ready() if b.pid not in killed]
                return bool(fresh)

            for _ in range(KILLS):
                node.wait_until(restarted, RESTART_WAIT, "a restarted backend")
                killed.add(fresh[0].pid)
                os.kill(fresh[0].pid, signal.SIGKILL)
            node.wait_until(restarted, RESTART_WAIT, "the last restart")
        finally:
            stop.set()
            for caller in callers:
                caller.join(15.0)

        (backend,) = fresh
        transitions = [line for line in node.log_path.read_text().splitlines() if "services.supervisor.backend" in line]
        assert not [line for line in transitions if "while loading" in line], transitions[-20:]
        assert backend.restart_count == KILLS, (backend.restart_count, backend.last_error, transitions[-20:])
        assert all(count > 0 for count in calls), calls

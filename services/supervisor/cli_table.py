"""`lmcluster backends`: what the Supervisor runs, as a table."""

from __future__ import annotations

import time

import grpc
from lmcluster.supervisor.v1 import supervisor_pb2
from lmcluster.supervisor.v1 import supervisor_service_pb2 as pb
from lmcluster.supervisor.v1 import supervisor_service_pb2_grpc as pb_grpc
from rich.console import Console
from rich.table import Table

from services.common.console import table_console
from services.common.units import human_bytes

_STATE_STYLE = {
    supervisor_pb2.BACKEND_STATE_STARTING: "yellow",
    supervisor_pb2.BACKEND_STATE_READY: "green",
    supervisor_pb2.BACKEND_STATE_DRAINING: "cyan",
    supervisor_pb2.BACKEND_STATE_FAILED: "bold red",
    supervisor_pb2.BACKEND_STATE_STOPPED: "dim",
}


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def backends_table(reply: pb.ListBackendsResponse, now: float | None = None) -> Table:
    now = time.time() if now is None else now
    memory = reply.memory
    table = Table(
        title="Backends",
        caption=f"memory: {human_bytes(memory.used_bytes)} of {human_bytes(memory.budget_bytes)} budget",
    )
    for column in ("model", "variant", "state", "endpoint", "pid", "restarts", "slots", "uptime", "last error"):
        # Model ids are long: fold them, and never let a narrow terminal squeeze them to nothing.
        wraps = column in ("model", "last error")
        table.add_column(column, no_wrap=not wraps, overflow="fold", min_width=24 if column == "model" else None)
    for backend in reply.backends:
        state = supervisor_pb2.BackendState.Name(backend.state).removeprefix("BACKEND_STATE_")
        live = backend.state in (
            supervisor_pb2.BACKEND_STATE_READY,
            supervisor_pb2.BACKEND_STATE_DRAINING,
        )
        ready_at = backend.ready_at.ToNanoseconds() / 1e9 if backend.HasField("ready_at") else 0.0
        error = backend.last_error.splitlines()[-1] if backend.last_error else ""
        # A backend that keeps an older file than the one on disk says why, before any old error.
        error = backend.file_notice or error
        table.add_row(
            backend.alias or backend.model_id,
            backend.variant,
            f"[{_STATE_STYLE.get(backend.state, '')}]{state}[/]",
            backend.endpoint or "-",
            str(backend.pid) if backend.pid else "-",
            str(backend.restart_count),
            f"{backend.slots.busy}/{backend.slots.total}",
            format_duration(now - ready_at) if live and ready_at else "-",
            error[:120],
        )
    return table


def print_backends(address: str, *, console: Console | None = None, timeout: float = 5.0) -> int:
    """Prints the Supervisor's backends; returns the exit code (1 when it cannot be reached)."""
    console = console or table_console()
    try:
        with grpc.insecure_channel(address) as channel:
            reply = pb_grpc.SupervisorServiceStub(channel).ListBackends(pb.ListBackendsRequest(), timeout=timeout)
    except grpc.RpcError as error:
        code = error.code() if isinstance(error, grpc.Call) else None
        detail = error.details() if isinstance(error, grpc.Call) else str(error)
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            console.print(
                f"[red]The Supervisor at {address} is not reachable[/] ({detail}). "
                "Start it with `lmcluster serve supervisor` or `make up`, or set LMC_SUPERVISOR_ADDRESS."
            )
        else:
            console.print(f"[red]The Supervisor at {address} answered {code.name if code else 'an error'}:[/] {detail}")
        return 1
    if not reply.backends:
        console.print(
            f"No backends (memory budget {human_bytes(reply.memory.budget_bytes)}). "
            "They start on the first request or with LMC_SUPERVISOR_PRELOAD."
        )
        return 0
    console.print(backends_table(reply))
    return 0

"""`lmcluster models`: what the Registry sees, as a table (id, quant, size, context, state, reason)."""

from __future__ import annotations

import grpc
from lmcluster.registry.v1 import registry_pb2, registry_service_pb2, registry_service_pb2_grpc
from rich.console import Console
from rich.table import Table

from services.common.console import table_console

_STATE_STYLE = {
    registry_pb2.MODEL_STATE_READY: ("READY", "green"),
    registry_pb2.MODEL_STATE_DOWNLOADING: ("DOWNLOADING", "yellow"),
    registry_pb2.MODEL_STATE_INVALID: ("INVALID", "red"),
}
_TIMEOUT_SECONDS = 15.0


def human_size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{n} B"


def fetch_models(address: str, *, include_invalid: bool = True) -> list[registry_pb2.Model]:
    """ListModels from the Registry at `address` (raises grpc.RpcError)."""
    states = [] if include_invalid else [registry_pb2.MODEL_STATE_READY, registry_pb2.MODEL_STATE_DOWNLOADING]
    with grpc.insecure_channel(address) as channel:
        stub = registry_service_pb2_grpc.RegistryServiceStub(channel)
        response = stub.ListModels(
            registry_service_pb2.ListModelsRequest(states=states),
            timeout=_TIMEOUT_SECONDS,
            wait_for_ready=False,
        )
    return list(response.models)


def models_table(models: list[registry_pb2.Model]) -> Table:
    table = Table(header_style="bold", expand=False)
    table.add_column("ID", overflow="fold")
    table.add_column("QUANT", no_wrap=True)
    table.add_column("SIZE", justify="right", no_wrap=True)
    table.add_column("CONTEXT", justify="right", no_wrap=True)
    table.add_column("STATE", no_wrap=True)
    table.add_column("REASON", overflow="fold")
    for model in models:
        state, style = _STATE_STYLE.get(model.state, ("?", "white"))
        table.add_row(
            model.id,
            model.quantization or "-",
            human_size(model.size_bytes),
            str(model.context_length) if model.context_length else "-",
            f"[{style}]{state}[/{style}]",
            model.reason,
        )
    return table


def print_models(address: str, *, include_invalid: bool = True, console: Console | None = None) -> int:
    """Prints the Registry's models as a table; returns the exit code (1 if it cannot be asked)."""
    errors = console or Console(stderr=True)
    console = console or table_console()
    try:
        models = fetch_models(address, include_invalid=include_invalid)
    except grpc.RpcError as error:
        code = error.code() if isinstance(error, grpc.Call) else None
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            errors.print(
                f"[red]cannot reach the Registry at {address}[/red]: is it running? "
                "(`lmcluster serve registry`, or `lmcluster up`)",
                highlight=False,
            )
        else:
            details = error.details() if isinstance(error, grpc.Call) else str(error)
            errors.print(f"[red]the Registry at {address} answered {code}[/red]: {details}", highlight=False)
        return 1
    if not models:
        console.print("no models: the Registry's models folder holds no .gguf files", highlight=False)
        return 0
    console.print(models_table(models))
    counts = {name: sum(1 for m in models if m.state == state) for state, (name, _) in _STATE_STYLE.items()}
    summary = ", ".join(f"{n} {name.lower()}" for name, n in counts.items() if n)
    console.print(f"{len(models)} models: {summary}", highlight=False)
    return 0

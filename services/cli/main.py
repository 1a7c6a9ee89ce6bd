"""The `lmcluster` command: run the stack or one service, and look at what runs."""

from __future__ import annotations

import asyncio
import importlib
from typing import Annotated

import typer

app = typer.Typer(
    name="lmcluster",
    help="A production data plane for local GGUF models.",
    no_args_is_help=True,
    add_completion=False,
)

# Each service's process entry: `main()` reads its settings and serves until SIGTERM/SIGINT.
SERVICE_ENTRYPOINTS = {
    "registry": "services.registry.server",
}


@app.command()
def up() -> None:
    """Run the whole stack in the foreground (what `make up` runs); Ctrl-C stops everything."""
    from services.common.logging import configure_logging
    from services.launcher.settings import StackSettings
    from services.launcher.stack import run_stack

    configure_logging("launcher")
    raise typer.Exit(asyncio.run(run_stack(StackSettings())))


@app.command()
def serve(
    service: Annotated[str, typer.Argument(help=f"One of: {', '.join(SERVICE_ENTRYPOINTS)}.")],
) -> None:
    """Run one service alone, on its configured (default) port."""
    module = SERVICE_ENTRYPOINTS.get(service)
    if module is None:
        typer.echo(f"unknown service {service!r}; choose one of: {', '.join(SERVICE_ENTRYPOINTS)}", err=True)
        raise typer.Exit(2)
    importlib.import_module(module).main()


@app.command()
def models(
    registry: Annotated[str, typer.Option(help="Registry address.", envvar="LMC_REGISTRY_ADDRESS")] = "127.0.0.1:50055",
) -> None:
    """List the models the Registry sees, with their state and why a file is invalid."""
    from services.registry.cli_table import print_models

    raise typer.Exit(print_models(registry))


if __name__ == "__main__":
    app()

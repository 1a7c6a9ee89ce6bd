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
    "supervisor": "services.supervisor.server",
    "embedding": "services.embedding.server",
    "cache": "services.cache.server",
    "router": "services.router.server",
}

cache_app = typer.Typer(help="Look at, clear and correct the semantic cache.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")


@app.command()
def up(
    # A plain string (the settings check it): the CLI module stays light for `lmcluster serve`.
    role: Annotated[
        str | None,
        typer.Option(
            metavar="all|node|gateway",
            help="all: everything on this host; node: Registry + Supervisor; gateway: the rest. [LMC_ROLE]",
        ),
    ] = None,
    host: Annotated[
        str | None, typer.Option(help="Address a node's parts bind (default 127.0.0.1). [LMC_NODE_HOST]")
    ] = None,
    advertise_host: Annotated[
        str | None,
        typer.Option(help="Where other hosts reach a node's backends (default: --host). [LMC_NODE_ADVERTISE_HOST]"),
    ] = None,
    nodes: Annotated[
        str | None, typer.Option(help="A gateway's nodes: addresses or DNS names, comma-separated. [LMC_NODES]")
    ] = None,
    routers: Annotated[
        int | None, typer.Option(min=1, help="Router processes behind Envoy (default 1). [LMC_ROUTERS]")
    ] = None,
) -> None:
    """Run this host's role in the foreground (all of it: what `make up` runs); Ctrl-C stops everything."""
    import pydantic

    from services.common.logging import configure_logging
    from services.launcher.settings import StackSettings
    from services.launcher.stack import run_stack

    flags = {"role": role, "node_host": host, "node_advertise_host": advertise_host, "nodes": nodes, "routers": routers}
    try:
        settings = StackSettings(**{name: value for name, value in flags.items() if value is not None})
    except pydantic.ValidationError as error:
        for problem in error.errors():
            # Our own checks name the flag; pydantic's name the setting.
            where = "" if problem["type"] == "value_error" else f"{'.'.join(map(str, problem['loc']))}: "
            typer.echo(f"lmcluster up: {where}{problem['msg'].removeprefix('Value error, ')}", err=True)
        raise typer.Exit(2) from None
    if settings.role != "node" and (host or advertise_host):
        typer.echo("lmcluster up: --host and --advertise-host are for --role node", err=True)
        raise typer.Exit(2)
    configure_logging("launcher")
    raise typer.Exit(asyncio.run(run_stack(settings)))


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


@app.command()
def backends(
    supervisor: Annotated[
        str, typer.Option(help="Supervisor address.", envvar="LMC_SUPERVISOR_ADDRESS")
    ] = "127.0.0.1:50054",
) -> None:
    """List the llama-server backends the Supervisor runs: state, endpoint, restarts, slots, last error."""
    from services.supervisor.cli_table import print_backends

    raise typer.Exit(print_backends(supervisor))


CacheAddress = Annotated[str, typer.Option("--cache", help="Cache address.", envvar="LMC_CACHE_ADDRESS")]


@cache_app.command("stats")
def cache_stats(cache: CacheAddress = "127.0.0.1:50053") -> None:
    """Entries, hits and misses by kind, rejected candidates, hit ratio and index memory."""
    from services.cache.cli import print_cache_stats

    raise typer.Exit(print_cache_stats(cache))


@cache_app.command("clear")
def cache_clear(
    scope: Annotated[str | None, typer.Option(help="Clear only this scope (a scope hash).")] = None,
    cache: CacheAddress = "127.0.0.1:50053",
) -> None:
    """Remove cached answers: every entry, or one scope's."""
    from services.cache.cli import clear_cache

    raise typer.Exit(clear_cache(cache, scope))


@cache_app.command("forget")
def cache_forget(
    entry: Annotated[str, typer.Argument(help="The entry id a cached response named in x-lmc-cache-entry.")],
    cache: CacheAddress = "127.0.0.1:50053",
) -> None:
    """Remove one cached answer reported wrong (counted in lmc_cache_wrong_answers_reported_total)."""
    from services.cache.cli import forget_entry

    raise typer.Exit(forget_entry(cache, entry))


@app.command()
def bench(
    url: Annotated[str, typer.Option(help="The API's base URL.", envvar="LMC_BENCH_URL")] = "http://127.0.0.1:8080/v1",
    model: Annotated[str, typer.Option(help="Model id or alias; default: the first the API lists.")] = "",
    users: Annotated[int, typer.Option(min=1, max=2000, help="Concurrent users.")] = 16,
    requests: Annotated[int, typer.Option(min=1, help="Requests in all.")] = 200,
    repeat_share: Annotated[float, typer.Option(min=0.0, max=1.0, help="Share of repeated or rephrased questions.")] = 0.6,
    max_tokens: Annotated[int, typer.Option(min=1, help="max_tokens of each request.")] = 32,
    api_key: Annotated[str | None, typer.Option(envvar="LMC_BENCH_API_KEY", help="Sent as a bearer token.")] = None,
) -> None:
    """Load a running stack with RAG-style chat traffic; print latency by cache outcome and the hit share."""
    import httpx

    from services.cli.bench import report, run_bench
    from services.common.console import table_console

    console = table_console()
    if not model:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        try:
            listed = httpx.get(f"{url.rstrip('/')}/models", headers=headers, timeout=10.0)
            listed.raise_for_status()
            model = listed.json()["data"][0]["id"]
        except (httpx.HTTPError, KeyError, IndexError, ValueError) as error:
            console.print(f"[red]cannot list the models at {url}[/]: {error}", highlight=False)
            raise typer.Exit(1) from error
    console.print(f"{requests} requests, {users} users, model {model}, {repeat_share:.0%} repeated", highlight=False)
    with console.status("running"):
        result = asyncio.run(
            run_bench(url.rstrip("/"), model=model, users=users, requests=requests, repeat_share=repeat_share,
                      max_tokens=max_tokens, api_key=api_key)
        )  # fmt: skip
    report(result, console)
    raise typer.Exit(1 if result.errors else 0)


if __name__ == "__main__":
    app()

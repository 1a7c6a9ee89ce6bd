"""`lmcluster cache stats`, `cache clear [--scope]` and `cache forget ENTRY`: counters and invalidation."""

from __future__ import annotations

import grpc
from lmcluster.cache.v1 import cache_service_pb2, cache_service_pb2_grpc
from rich.console import Console
from rich.table import Table

from services.common.console import table_console
from services.common.units import human_bytes

_TIMEOUT_SECONDS = 15.0


def _report_error(error: grpc.RpcError, address: str, errors: Console) -> int:
    code = error.code() if isinstance(error, grpc.Call) else None
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) and "Redis" not in str(
        error.details() if isinstance(error, grpc.Call) else ""
    ):
        errors.print(
            f"[red]cannot reach the Cache at {address}[/red]: is it running? "
            "(`lmcluster serve cache`, or `lmcluster up`)",
            highlight=False,
        )
    else:
        details = error.details() if isinstance(error, grpc.Call) else str(error)
        errors.print(f"[red]the Cache at {address} answered {code}[/red]: {details}", highlight=False)
    return 1


def stats_table(stats: cache_service_pb2.GetStatsResponse) -> Table:
    table = Table(header_style="bold", show_header=True, expand=False)
    table.add_column("WHAT")
    table.add_column("VALUE", justify="right")
    redis = "[green]available[/green]" if stats.redis_available else "[red]unavailable[/red]"
    lookups = stats.exact_hits + stats.semantic_hits + stats.misses
    rows = [
        ("Redis", redis),
        ("index", stats.index_name),
        ("entries", str(stats.entries)),
        ("index memory", human_bytes(stats.index_memory_bytes)),
        ("threshold", f"{stats.threshold:.3f}"),
        ("lookups", str(lookups)),
        ("  exact hits", str(stats.exact_hits)),
        ("  semantic hits", str(stats.semantic_hits)),
        ("  misses", str(stats.misses)),
        ("  degraded (Redis unavailable)", str(stats.degraded_lookups)),
        ("hit ratio", f"{stats.hit_ratio:.1%}"),
        ("rejected candidates", str(stats.rejected_candidates)),
    ]
    rows += [(f"  {reason.lower()}", str(n)) for reason, n in sorted(stats.rejected_by_reason.items())]
    rows += [("stores", str(stats.stores)), ("stores dropped", str(stats.stores_dropped))]
    rows += [("wrong answers reported", str(stats.wrong_answers_reported))]
    for what, value in rows:
        table.add_row(what, value)
    return table


def print_cache_stats(address: str, *, console: Console | None = None) -> int:
    """Prints the Cache's counters as a table; returns the exit code (1 if it cannot be asked)."""
    errors = console or Console(stderr=True)
    console = console or table_console()
    try:
        with grpc.insecure_channel(address) as channel:
            stats = cache_service_pb2_grpc.CacheServiceStub(channel).GetStats(
                cache_service_pb2.GetStatsRequest(), timeout=_TIMEOUT_SECONDS
            )
    except grpc.RpcError as error:
        return _report_error(error, address, errors)
    console.print(stats_table(stats))
    return 0


def clear_cache(address: str, scope: str | None, *, console: Console | None = None) -> int:
    """Removes every entry, or those of one scope; prints how many; returns the exit code."""
    errors = console or Console(stderr=True)
    console = console or table_console()
    request = (
        cache_service_pb2.InvalidateRequest(scope=scope)
        if scope
        else cache_service_pb2.InvalidateRequest(all=True)
    )
    try:
        with grpc.insecure_channel(address) as channel:
            reply = cache_service_pb2_grpc.CacheServiceStub(channel).Invalidate(
                request, timeout=_TIMEOUT_SECONDS
            )
    except grpc.RpcError as error:
        return _report_error(error, address, errors)
    what = f"of scope {scope}" if scope else "in all scopes"
    console.print(f"removed {reply.removed} cache entries {what}", highlight=False)
    return 0


def forget_entry(address: str, entry: str, *, console: Console | None = None) -> int:
    """Removes one entry reported wrong; exit code 0 if removed, 1 if unknown or unreachable."""
    errors = console or Console(stderr=True)
    console = console or table_console()
    request = cache_service_pb2.InvalidateRequest(entry_id=entry.strip().lower(), reported_wrong=True)
    try:
        with grpc.insecure_channel(address) as channel:
            reply = cache_service_pb2_grpc.CacheServiceStub(channel).Invalidate(request, timeout=_TIMEOUT_SECONDS)
    except grpc.RpcError as error:
        return _report_error(error, address, errors)
    if not reply.removed:
        errors.print(f"[red]no cache entry {entry}[/red] (it may have expired)", highlight=False)
        return 1
    console.print(f"forgot cache entry {request.entry_id}", highlight=False)
    return 0

"""The Supervisor's Prometheus metrics, and where each backend's own /metrics can be scraped."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from lmcluster.supervisor.v1 import supervisor_pb2
from prometheus_client import Counter, Gauge, Histogram

if TYPE_CHECKING:
    from services.supervisor.backend import Backend

log = logging.getLogger(__name__)

BACKENDS = Gauge("lmc_supervisor_backends", "Backends by state.", ["state"])
RESTARTS = Counter(
    "lmc_supervisor_backend_restarts_total", "Restarts after a crash or failed health check, by model.", ["model"]
)
KEPT_OLD_FILE = Counter(
    "lmc_supervisor_model_file_kept_total",
    "Changed model files not swapped in, the running backends keeping the file they loaded, by why.",
    ["model", "reason"],
)
START_SECONDS = Histogram(
    "lmc_supervisor_backend_start_seconds",
    "From spawning llama-server to its first healthy /health.",
    buckets=(0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300),
)
MEMORY_BUDGET = Gauge("lmc_supervisor_memory_budget_bytes", "Memory budget for all backends.")
MEMORY_USED = Gauge("lmc_supervisor_memory_used_bytes", "Sum of the estimates of live backends.")
SLOTS = Gauge(
    "lmc_supervisor_backend_slots",
    "Parallel slots of each live backend (llama-server --parallel).",
    ["backend", "model"],
)
SLOTS_BUSY = Gauge(
    "lmc_supervisor_backend_slots_busy",
    "Slots processing a request right now, per live backend.",
    ["backend", "model"],
)
KV_CACHE_USAGE = Gauge(
    "lmc_supervisor_backend_kv_cache_usage_ratio",
    "Share of a backend's KV cache (all slots' context) holding tokens, from llama-server's /slots.",
    ["backend", "model"],
)
BACKEND_INFO = Gauge(
    "lmc_supervisor_backend_info",
    "One series per live backend (value 1); metrics_url is its llama-server /metrics for scraping.",
    ["backend", "model", "alias", "variant", "endpoint", "metrics_url"],
)

_STATES = [
    name.removeprefix("BACKEND_STATE_")
    for name in supervisor_pb2.BackendState.keys()
    if name != "BACKEND_STATE_UNSPECIFIED"
]


_written: dict[Path, str] = {}


def publish(backends: Iterable[Backend], budget: int, used: int, targets_file: Path | None) -> None:
    """Refreshes the gauges (and the scrape targets file) from the current table."""
    backends = list(backends)
    counts = dict.fromkeys(_STATES, 0)
    for backend in backends:
        counts[supervisor_pb2.BackendState.Name(backend.state).removeprefix("BACKEND_STATE_")] += 1
    for state, count in counts.items():
        BACKENDS.labels(state).set(count)
    MEMORY_BUDGET.set(budget)
    MEMORY_USED.set(used)
    BACKEND_INFO.clear()
    SLOTS.clear()
    SLOTS_BUSY.clear()
    KV_CACHE_USAGE.clear()
    scrapable = [backend for backend in backends if backend.live and backend.port]
    for backend in scrapable:
        SLOTS.labels(backend.id, backend.model.id).set(backend.slots_total)
        SLOTS_BUSY.labels(backend.id, backend.model.id).set(backend.slots_busy)
        KV_CACHE_USAGE.labels(backend.id, backend.model.id).set(backend.kv_cache_usage)
        BACKEND_INFO.labels(
            backend.id,
            backend.model.id,
            backend.model.alias,
            backend.model.quantization,
            backend.endpoint,
            f"{backend.endpoint}/metrics",
        ).set(1)
    if targets_file is not None:
        write_scrape_targets(targets_file, scrapable)


def write_scrape_targets(path: Path, backends: Iterable[Backend]) -> None:
    """Prometheus `file_sd_configs` JSON: one target group per backend, labelled with its model."""
    groups = [
        {
            # The advertised address: Prometheus may run on another host.
            "targets": [backend.address],
            "labels": {
                "backend": backend.id,
                "model": backend.model.id,
                "alias": backend.model.alias,
                "variant": backend.model.quantization,
                "replica": str(backend.replica),
            },
        }
        for backend in backends
    ]
    content = json.dumps(groups, indent=2)
    if _written.get(path) == content:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(path.suffix + ".tmp")
        temporary.write_text(content)
        os.replace(temporary, path)
        _written[path] = content
    except OSError as error:
        log.warning("cannot write scrape targets to %s: %s", path, error)

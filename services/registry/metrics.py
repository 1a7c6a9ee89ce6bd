"""The Registry's Prometheus metrics (served on the service's /metrics port)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

MODELS = Gauge("lmc_registry_models", "Models the Registry publishes, by state and kind.", ["state", "kind"])
SCAN_SECONDS = Histogram(
    "lmc_registry_scan_seconds",
    "Time to bring the model table up to date, by scope (full rescan, watch event, settle recheck).",
    ["scope"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
FILES_VALIDATED = Counter("lmc_registry_files_validated_total", "GGUF files read and validated.")
VALIDATION_FAILURES = Counter(
    "lmc_registry_validation_failures_total",
    "Files found invalid, by reason class (truncated, not_gguf, architecture, ...).",
    ["reason_class"],
)
WATCHERS = Gauge("lmc_registry_watchers", "Open WatchModels streams.")
WATCH_RESYNCS = Counter(
    "lmc_registry_watch_resyncs_total", "WatchModels streams that fell behind and were sent a fresh snapshot."
)
REVISION = Gauge("lmc_registry_revision", "The model table's revision (one per change).")

"""Metric names: what a /metrics page really offers, and what a PromQL expression asks for.

`exposed_names(text)` reads Prometheus text exposition (HELP/TYPE lines and samples) into every name
a query can use: a histogram `x` offers `x_bucket`, `x_count` and `x_sum`, a counter `x_total`, even
before its first sample. `promql_metric_names(expr)` is the set of metric names an expression
selects: label matchers, ranges, strings, `by (...)` lists, functions and keywords left out.
"""

from __future__ import annotations

import re

_SUFFIXES = {
    "counter": ("", "_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
    "gaugehistogram": ("_bucket", "_gcount", "_gsum"),
    "info": ("", "_info"),
}
_NAME = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
# Names that are part of the language, not metrics.
_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and", "or",
    "unless", "atan2", "inf", "nan", "Inf", "NaN", "start", "end",
}  # fmt: skip
# Series Prometheus makes itself for every target.
PROMETHEUS_SERIES = {"up", "scrape_duration_seconds", "scrape_samples_scraped", "scrape_series_added"}


def exposed_names(text: str) -> set[str]:
    names: set[str] = set()
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        if line.startswith("# TYPE "):
            parts = line.split()
            if len(parts) >= 4:
                base, kind = parts[2], parts[3]
                stem = base.removesuffix("_total") if kind == "counter" else base
                names.update(stem + suffix for suffix in _SUFFIXES.get(kind, ("",)))
                names.add(base)
            continue
        if line.startswith("#"):
            continue
        match = _NAME.match(line)
        if match:
            names.add(match.group(0))
    return names


def promql_metric_names(expr: str) -> set[str]:
    text = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)
    text = re.sub(r"'(?:\\.|[^'\\])*'", "''", text)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\$\{?\w+\}?", " ", text)
    names = set()
    for match in _NAME.finditer(text):
        name = match.group(0)
        before = text[match.start() - 1] if match.start() else " "
        if before.isdigit() or before == ".":
            continue  # the exponent or unit of a number (1e3, 5m)
        if text[match.end():].lstrip().startswith("("):
            continue  # a function or an aggregation
        if name in _KEYWORDS:
            continue
        names.add(name)
    return names

"""Sizes as people read them, in log lines, errors and tables."""

from __future__ import annotations


def human_bytes(count: int | float) -> str:
    """Binary units, one decimal: `512 B`, `93.8 MiB`, `16.8 GiB`."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"

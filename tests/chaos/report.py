"""The chaos suite's table: one row per scenario, printed after the run and kept in build/.

`make chaos` (or any pytest run that includes tests/chaos) prints it at the end; docs/resilience.md
holds a copy of one run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tests.chaos.load import LoadResult, Outcome
from tests.fixtures.parts import REPO_ROOT

REPORT_PATH = REPO_ROOT / "build" / "chaos-report.md"


@dataclass(frozen=True)
class Row:
    scenario: str
    requests: int
    failed: int
    failed_streaming: int
    p99_ms: float
    heal_seconds: float
    note: str


ROWS: list[Row] = []


def record(
    scenario: str, result: LoadResult, heal_seconds: float, note: str = "", expected: list[Outcome] | None = None
) -> None:
    """One row; `expected` are answers the scenario calls for (a removed model's 404s), not failures."""
    failed = [o for o in result.failed if o not in (expected or [])]
    streaming = sum(1 for o in failed if o.streaming)
    requests = result.requests - len(expected or [])
    ROWS.append(Row(scenario, requests, len(failed), streaming, result.p99_ms(), heal_seconds, note))


def table() -> str:
    lines = [
        "| scenario | requests | failed | of them mid-stream | p99 (ms) | time to heal (s) | note |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for row in ROWS:
        lines.append(
            f"| {row.scenario} | {row.requests} | {row.failed} | {row.failed_streaming} | {row.p99_ms:.0f} "
            f"| {row.heal_seconds:.1f} | {row.note} |"
        )
    return "\n".join(lines)


def write() -> Path | None:
    if not ROWS:
        return None
    REPORT_PATH.parent.mkdir(parents=True, exist_ok=True)
    REPORT_PATH.write_text(table() + "\n")
    return REPORT_PATH

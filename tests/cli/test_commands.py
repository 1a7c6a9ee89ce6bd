"""The `lmcluster` command as an operator uses it, against the running stack and against nothing."""

from __future__ import annotations

import subprocess
import sys

from tests.fixtures.parts import REPO_ROOT, free_port
from tests.fixtures.stack import DEMO_MODEL_ID, Stack

TIMEOUT = 180


def lmcluster(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Runs `lmcluster ARGS` with its output captured (a pipe: tables must keep their columns)."""
    return subprocess.run(
        [sys.executable, "-m", "services.cli.main", *args],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=TIMEOUT, env=env,
    )  # fmt: skip


def test_models_backends_and_cache_stats_print_tables(stack: Stack) -> None:
    models = lmcluster("models", "--registry", stack.registry)
    assert models.returncode == 0, models.stderr
    assert DEMO_MODEL_ID in models.stdout and "READY" in models.stdout and "Q4_1" in models.stdout

    backends = lmcluster("backends", "--supervisor", stack.supervisor)
    assert backends.returncode == 0, backends.stderr
    (backend,) = stack.ready_backends(DEMO_MODEL_ID)
    row = next(line for line in backends.stdout.splitlines() if backend.endpoint in line)
    # Every column of the row is filled, the model's alias first, whatever the output's width.
    assert backend.alias in row and "READY" in row and str(backend.pid) in row, backends.stdout

    stats = lmcluster("cache", "stats", "--cache", stack.cache)
    assert stats.returncode == 0, stats.stderr
    assert "hit ratio" in stats.stdout and "available" in stats.stdout


def test_bench_loads_the_stack_and_reports_cache_hits(stack: Stack) -> None:
    args = ("bench", "--url", stack.base_url, "--users", "2", "--requests", "8", "--max-tokens", "8")
    first = lmcluster(*args, "--repeat-share", "1")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "8 answered" in first.stdout and "errors: 0" in first.stdout
    # The same run again (the workload is seeded): every question was answered before.
    again = lmcluster(*args, "--repeat-share", "1")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "8 answered" in again.stdout and "100% from the cache" in again.stdout, again.stdout


def test_cache_clear_by_scope_and_all(stack: Stack) -> None:
    scoped = lmcluster("cache", "clear", "--scope", "no-such-scope", "--cache", stack.cache)
    assert scoped.returncode == 0, scoped.stderr
    assert "removed 0 cache entries of scope no-such-scope" in scoped.stdout


def test_unknown_service_and_unreachable_parts_are_clear_errors() -> None:
    unknown = lmcluster("serve", "nope")
    assert unknown.returncode == 2
    assert "unknown service 'nope'" in unknown.stderr and "router" in unknown.stderr

    nowhere = f"127.0.0.1:{free_port()}"
    for args in (("backends", "--supervisor", nowhere), ("cache", "stats", "--cache", nowhere),
                 ("models", "--registry", nowhere)):  # fmt: skip
        result = lmcluster(*args)
        assert result.returncode == 1, (args, result.stdout, result.stderr)
        said = (result.stdout + result.stderr).lower()
        assert "not reachable" in said or "cannot reach" in said or "is it running" in said, (args, said)

    dead = lmcluster("bench", "--url", f"http://{nowhere}/v1")
    assert dead.returncode == 1
    assert "cannot list the models" in dead.stdout + dead.stderr


def test_bad_numbers_are_refused_before_anything_runs() -> None:
    result = lmcluster("bench", "--users", "0")
    assert result.returncode == 2
    assert "users" in result.stderr.lower()

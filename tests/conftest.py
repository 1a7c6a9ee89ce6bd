"""Test-suite wide set-up: offline model loading and the real-part fixtures (tests/fixtures/parts.py)."""

from __future__ import annotations

import os

# The suite never reaches the Hugging Face hub: every model is loaded from its installed folder.
# Set before anything imports huggingface_hub, which reads these once at import.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

pytest_plugins = ["tests.fixtures.parts", "tests.fixtures.stack"]

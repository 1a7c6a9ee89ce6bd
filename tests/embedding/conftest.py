"""Every embedding test module must end with no model thread of its own still running."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

# Thread names the embedding code and its tests give their worker threads.
_OWN_THREADS = ("embedding-model", "test-model")


@pytest.fixture(autouse=True, scope="module")
def no_model_thread_left_behind() -> Iterator[None]:
    yield
    left = [thread.name for thread in threading.enumerate() if thread.name.startswith(_OWN_THREADS)]
    assert not left, f"threads left running: {left}"

"""The models folder changed under load through Envoy, the ways users' tools change it.

A model's READY backends keep serving while its file is replaced, re-validated, or turns out
broken; a new file replaces them only once it is valid and its backend is READY. Every scenario
asserts the failed-request count (zero, but for a removed model's requests that arrive after it is
gone, which get 404).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest
from lmcluster.registry.v1 import registry_pb2
from lmcluster.supervisor.v1 import supervisor_pb2

from tests.chaos import report
from tests.chaos.faults import copy_until_full, grow_download, new_release, quantize, rewrite_in_place, small_disk, wait_for
from tests.chaos.load import Load, chat_body
from tests.fixtures.stack import DEMO_BASE_ID, DEMO_FILE, DEMO_MODEL_ID, DEMO_PUBLISHER, DEMO_REPO, Stack

# A scenario waits for a restart or a swap under load on a two-core machine: more than the default.
pytestmark = pytest.mark.timeout(900)

WARM_SUCCESSES = 6
AFTER_SUCCESSES = 8
READY_MODEL = registry_pb2.MODEL_STATE_READY
READY_BACKEND = supervisor_pb2.BACKEND_STATE_READY


def header_sha256(path: Path) -> str:
    with path.open("rb") as file:
        return hashlib.sha256(file.read(1 << 20)).hexdigest()


def demo_path(stack: Stack) -> Path:
    return stack.models_dir / DEMO_PUBLISHER / DEMO_REPO / DEMO_FILE


def model_by_path(stack: Stack, path: Path) -> registry_pb2.Model | None:
    return next((m for m in stack.models() if Path(m.path) == path), None)


def swapped_to(stack: Stack, header: str) -> bool:
    """New requests of the demo model go to the file whose header hash is `header`: a READY backend
    runs it and none runs another (one still draining its in-flight answers may)."""
    ready = [b for b in stack.backends(DEMO_MODEL_ID) if b.state == READY_BACKEND]
    return bool(ready) and all(b.model_fingerprint == header for b in ready)


# Tokens 0-2 (end of text and the chat template's markers) forbidden: the answer runs to max_tokens.
NO_END = {"0": -100, "1": -100, "2": -100}
LONG_ANSWER_TOKENS = 200


class LongStream(threading.Thread):
    """A long streamed answer started before a swap; it must run to its end on the old backend."""

    def __init__(self, stack: Stack) -> None:
        super().__init__(daemon=True)
        self.stack = stack
        self.tokens = 0
        self.finish_reason: str | None = None
        self.error = ""
        self.first_token = threading.Event()

    def run(self) -> None:
        body = {
            "model": DEMO_MODEL_ID,
            "messages": [{"role": "user", "content": f"Tell a very long story. ({secrets.token_hex(4)})"}],
            "max_tokens": LONG_ANSWER_TOKENS,
            "logit_bias": NO_END,
            "stream": True,
            "stream_options": {"include_usage": True},
            "cache": {"skip_lookup": True, "skip_store": True},
        }
        try:
            with httpx.Client(base_url=self.stack.http_url, timeout=300.0) as http, http.stream(
                "POST", "/v1/chat/completions", json=body
            ) as response:
                for line in response.iter_lines():
                    if not line.startswith("data:") or line.endswith("[DONE]"):
                        continue
                    event = json.loads(line[len("data:"):])
                    if "error" in event:
                        self.error = str(event["error"])
                    for choice in event.get("choices", []):
                        self.first_token.set()
                        self.finish_reason = choice.get("finish_reason") or self.finish_reason
                    if event.get("usage"):
                        self.tokens = event["usage"]["completion_tokens"]
        except Exception as exc:  # the thread's failure is the test's
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self.first_token.set()


def ask(http: httpx.Client, body: dict[str, object]) -> httpx.Response:
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    return response


def test_swap_by_rename_loses_no_request_and_serves_no_old_answer(chaos_stack: Stack, tmp_path: Path) -> None:
    """A download manager's finish: the whole new file written beside, then renamed over the old."""
    target = demo_path(chaos_stack)
    fresh = new_release(target, tmp_path / "download.gguf", context_length=4096)
    header = header_sha256(fresh)
    question = chat_body(DEMO_MODEL_ID, f"You are terse. Swap {secrets.token_hex(4)}.", "Name a mountain.")
    with httpx.Client(base_url=chaos_stack.http_url, timeout=120.0) as http, Load(chaos_stack, DEMO_MODEL_ID) as load:
        ask(http, question)
        wait_for(lambda: ask(http, question).headers["x-lmc-cache"] == "hit", "the old model's answer cached", 30)
        load.wait_for_successes(WARM_SUCCESSES, since=0.0)
        long_stream = LongStream(chaos_stack)
        long_stream.start()
        long_stream.first_token.wait(120)
        # The download lands on the same file system, then replaces the model in one rename.
        staged = target.with_name(".download.part")
        shutil.move(fresh, staged)
        os.replace(staged, target)
        heal = wait_for(lambda: swapped_to(chaos_stack, header), "the new file served")
        after_switch = ask(http, question)
        load.wait_for_successes(AFTER_SUCCESSES, since=time.monotonic())
        long_stream.join(300)
    result = load.result
    report.record("model swap: rename over", result, heal, "heal: new file serving")
    assert not result.failed, result.describe()
    assert after_switch.headers["x-lmc-cache"] != "hit", "an answer of the replaced weights was served"
    # The old backend drained: the long answer that started before the switch ran to its end.
    assert not long_stream.error, long_stream.error
    assert (long_stream.finish_reason, long_stream.tokens) == ("length", LONG_ANSWER_TOKENS)


def test_swap_by_rewriting_in_place_loses_no_request(chaos_stack: Stack, tmp_path: Path) -> None:
    """A tool that writes the new bytes into the same file (same inode), slowly: the running
    backend read its weights at start (no mmap), so the pages changing under it are not its own."""
    target = demo_path(chaos_stack)
    fresh = new_release(target, tmp_path / "next.gguf", context_length=2048)
    header = header_sha256(fresh)
    with Load(chaos_stack, DEMO_MODEL_ID) as load:
        load.wait_for_successes(WARM_SUCCESSES, since=0.0)
        inode = target.stat().st_ino
        started = time.monotonic()
        rewrite_in_place(target, fresh)
        assert target.stat().st_ino == inode
        wait_for(lambda: swapped_to(chaos_stack, header), "the rewritten file served")
        heal = time.monotonic() - started
        load.wait_for_successes(AFTER_SUCCESSES, since=time.monotonic())
    result = load.result
    report.record("model swap: rewrite in place", result, heal, "heal: from the first byte written to the new file serving")
    assert not result.failed, result.describe()


def test_a_new_quantization_variant_dropped_in_loses_no_request(chaos_stack: Stack, tmp_path: Path) -> None:
    """Requests name the base model; a Q8_0 variant appears beside the served Q4_1."""
    target = demo_path(chaos_stack)
    variant = quantize(target, tmp_path / "q8.gguf", "Q8_0")
    destination = target.with_name(DEMO_FILE.replace("Q4_1", "Q8_0"))
    with Load(chaos_stack, DEMO_BASE_ID) as load:
        load.wait_for_successes(WARM_SUCCESSES, since=0.0)
        shutil.move(variant, destination.with_name(".q8.part"))
        os.replace(destination.with_name(".q8.part"), destination)
        heal = wait_for(lambda: getattr(model_by_path(chaos_stack, destination), "state", 0) == READY_MODEL, "variant READY")
        load.wait_for_successes(AFTER_SUCCESSES, since=time.monotonic())
    result = load.result
    report.record("new quantization variant dropped in", result, heal, "heal: variant READY")
    assert not result.failed, result.describe()


def test_a_partial_download_growing_in_the_folder_loses_no_request(chaos_stack: Stack) -> None:
    """Another model's file grows for a few seconds (a download in progress) while the demo serves."""
    growing = chaos_stack.models_dir / "Downloads" / "Growing-GGUF" / "growing.Q4_1.gguf"
    growing.parent.mkdir(parents=True, exist_ok=True)
    with Load(chaos_stack, DEMO_MODEL_ID) as load:
        load.wait_for_successes(WARM_SUCCESSES, since=0.0)
        writer = threading.Thread(target=grow_download, args=(demo_path(chaos_stack), growing), kwargs={"seconds": 6.0})
        started = time.monotonic()
        writer.start()
        wait_for(
            lambda: getattr(model_by_path(chaos_stack, growing), "state", 0) == registry_pb2.MODEL_STATE_DOWNLOADING,
            "the growing file seen as DOWNLOADING",
        )
        writer.join()
        wait_for(lambda: getattr(model_by_path(chaos_stack, growing), "state", 0) == READY_MODEL, "READY")
        heal = time.monotonic() - started
        load.wait_for_successes(AFTER_SUCCESSES, since=time.monotonic())
    result = load.result
    report.record("partial download growing in the folder", result, heal, "heal: the finished file READY")
    assert not result.failed, result.describe()


def test_a_disk_that_fills_up_during_a_copy_loses_no_request(chaos_stack: Stack) -> None:
    """A model copied onto a disk too small for it: the truncated file is INVALID, nothing else changes."""
    folder = chaos_stack.models_dir / "Full" / "Disk-GGUF"
    limit = 24 << 20
    with small_disk(folder, limit) as how, Load(chaos_stack, DEMO_MODEL_ID) as load:
        load.wait_for_successes(WARM_SUCCESSES, since=0.0)
        truncated = folder / "full.Q4_1.gguf"
        complaint = copy_until_full(demo_path(chaos_stack), truncated, limit, how)
        heal = wait_for(
            lambda: getattr(model_by_path(chaos_stack, truncated), "state", 0) == registry_pb2.MODEL_STATE_INVALID,
            "the truncated file INVALID",
        )
        reason = model_by_path(chaos_stack, truncated).reason  # type: ignore[union-attr]
        load.wait_for_successes(AFTER_SUCCESSES, since=time.monotonic())
        truncated.unlink()
    result = load.result
    report.record(f"disk full during a copy ({how})", result, heal, "heal: from the failed copy to INVALID")
    assert complaint
    assert reason
    assert not result.failed, result.describe()


def test_a_removed_model_finishes_what_it_started_then_answers_404(chaos_stack: Stack) -> None:
    second = chaos_stack.models_dir / "Second" / "Model-GGUF" / "second.Q4_1.gguf"
    second.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(demo_path(chaos_stack), second)
    wait_for(lambda: getattr(model_by_path(chaos_stack, second), "state", 0) == READY_MODEL, "the second model READY")
    model_id = model_by_path(chaos_stack, second).id  # type: ignore[union-attr]
    with Load(chaos_stack, model_id) as load:
        load.wait_for_successes(WARM_SUCCESSES, since=0.0)
        removed_at = time.monotonic()
        second.unlink()
        heal = wait_for(lambda: model_by_path(chaos_stack, second) is None, "the model gone from the Registry")
        wait_for(lambda: not [b for b in chaos_stack.backends(model_id) if b.state == READY_BACKEND], "its backends stopped")
        time.sleep(2.0)
    result = load.result
    not_found = [o for o in result.failed if o.started >= removed_at and ("404" in o.error or "NOT_FOUND" in o.error)]
    report.record(
        "model removed", result, heal, f"requests sent after the removal got 404 ({len(not_found)}, not counted)",
        expected=not_found,
    )  # fmt: skip
    finished = [o for o in result.outcomes if o.started < removed_at]
    assert finished and all(o.ok for o in finished), result.describe()
    assert [o for o in result.failed if o not in not_found] == [], result.describe()

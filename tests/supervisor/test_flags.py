"""The command line comes from the model's metadata and the settings, never from llama-server's guesses."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pydantic
import pytest
from lmcluster.registry.v1 import registry_pb2

from services.supervisor.flags import build_command, slot_context, thread_count
from services.supervisor.settings import SupervisorSettings

DOCS = Path(__file__).resolve().parent.parent.parent / "docs" / "supervisor.md"


def model(**fields: Any) -> registry_pb2.Model:
    values: dict[str, Any] = {
        "id": "acme/Tiny-GGUF/Tiny.Q4_1",
        "alias": "tiny-q4_1",
        "path": "/models/acme/Tiny-GGUF/Tiny.Q4_1.gguf",
        "state": registry_pb2.MODEL_STATE_READY,
        "kind": registry_pb2.MODEL_KIND_LLM,
        "context_length": 8192,
        "block_count": 30,
        "embedding_length": 576,
        "head_count": 9,
        "head_count_kv": 3,
        "size_bytes": 98_362_432,
    }
    values.update(fields)
    return registry_pb2.Model(**values)


def settings(**overrides: Any) -> SupervisorSettings:
    return SupervisorSettings(**overrides)


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_ctx_size_is_per_slot_context_times_parallel() -> None:
    plan = build_command("llama-server", model(), settings(context_per_slot=2048, parallel=4), 8100)
    assert flag(plan.argv, "--ctx-size") == "8192"
    assert flag(plan.argv, "--parallel") == "4"
    assert plan.context_per_slot == 2048 and plan.ctx_size == 8192


def test_per_slot_context_never_exceeds_the_trained_context() -> None:
    plan = build_command("llama-server", model(context_length=2048), settings(context_per_slot=8192, parallel=3), 8100)
    assert plan.context_per_slot == 2048
    assert flag(plan.argv, "--ctx-size") == str(2048 * 3)
    assert "--no-kv-unified" in plan.argv  # a unified cache would let one slot use the whole ctx-size


def test_per_slot_context_stays_on_llama_cpps_256_cell_grid() -> None:
    assert slot_context(model(context_length=1000), settings(context_per_slot=4096)) == 768
    assert slot_context(model(context_length=0), settings(context_per_slot=1000)) == 768
    assert slot_context(model(context_length=0), settings(context_per_slot=4096)) == 4096


def test_quantized_kv_cache_turns_flash_attention_on() -> None:
    plan = build_command("llama-server", model(), settings(), 8100)
    assert flag(plan.argv, "--cache-type-k") == "q8_0"
    assert flag(plan.argv, "--cache-type-v") == "q4_0"
    assert flag(plan.argv, "--flash-attn") == "on"


def test_an_unquantized_cache_keeps_the_configured_flash_attention() -> None:
    plan = build_command("llama-server", model(), settings(cache_type_k="f16", cache_type_v="f16", flash_attn="off"), 8100)
    assert flag(plan.argv, "--cache-type-v") == "f16"
    assert flag(plan.argv, "--flash-attn") == "off"


def test_a_quantized_v_cache_without_flash_attention_is_refused_at_start() -> None:
    with pytest.raises(pydantic.ValidationError, match="flash"):
        settings(cache_type_v="q4_0", flash_attn="off")


def test_fixed_flags_metrics_slots_loopback_alias_port() -> None:
    plan = build_command("/opt/llama-server", model(), settings(), 8123)
    argv = plan.argv
    assert argv[0] == "/opt/llama-server"
    assert flag(argv, "--model") == "/models/acme/Tiny-GGUF/Tiny.Q4_1.gguf"
    assert flag(argv, "--host") == "127.0.0.1"
    assert flag(argv, "--port") == "8123"
    assert flag(argv, "--alias") == "tiny-q4_1"
    assert {"--metrics", "--slots", "--no-webui"} <= set(argv)
    assert flag(argv, "--cache-ram") == "256"


def test_gpu_layers_only_when_configured() -> None:
    assert "--n-gpu-layers" not in build_command("llama-server", model(), settings(), 8100).argv
    plan = build_command("llama-server", model(), settings(gpu_layers="all"), 8100)
    assert flag(plan.argv, "--n-gpu-layers") == "all"


def test_threads_default_to_every_core() -> None:
    assert thread_count(settings(), cpu_count=6) == 6
    assert thread_count(settings(threads=2), cpu_count=6) == 2
    assert flag(build_command("llama-server", model(), settings(threads=3), 8100).argv, "--threads") == "3"


def test_embedding_models_and_projectors() -> None:
    embedding = build_command("llama-server", model(kind=registry_pb2.MODEL_KIND_EMBEDDING), settings(), 8100)
    assert "--embeddings" in embedding.argv
    with_projector = model(projectors=[registry_pb2.ModelFile(path="/models/acme/mmproj.gguf", size_bytes=1)])
    assert flag(build_command("llama-server", with_projector, settings(), 8100).argv, "--mmproj") == "/models/acme/mmproj.gguf"


def test_extra_arguments_for_all_then_per_model() -> None:
    configured = settings(extra_args=["--mlock"], model_args={"tiny-q4_1": ["--jinja"], "other": ["--x"]})
    argv = build_command("llama-server", model(), configured, 8100).argv
    assert argv[-2:] == ["--mlock", "--jinja"] and "--x" not in argv


def test_the_same_inputs_give_the_same_command() -> None:
    first = build_command("llama-server", model(), settings(threads=2), 8100).argv
    assert first == build_command("llama-server", model(), settings(threads=2), 8100).argv


def test_every_flag_has_a_reason_and_is_explained_in_the_docs() -> None:
    plan = build_command(
        "llama-server",
        model(kind=registry_pb2.MODEL_KIND_EMBEDDING, projectors=[registry_pb2.ModelFile(path="/p.gguf")]),
        settings(gpu_layers="99"),
        8100,
    )
    flags_used = {arg for arg in plan.argv[1:] if arg.startswith("--")}
    explained = {name for flags, _why in plan.reasons for name in flags.split() if name.startswith("--")}
    assert flags_used == explained
    documented = set(re.findall(r"`(--[a-z-]+)", DOCS.read_text()))
    assert flags_used <= documented, f"not in docs/supervisor.md: {sorted(flags_used - documented)}"

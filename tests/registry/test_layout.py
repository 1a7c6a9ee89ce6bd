"""layout.py: ids, publisher/repo, split parts, base names and aliases from paths alone."""

from __future__ import annotations

import random

import pytest

from services.registry.layout import (
    assign_aliases,
    is_model_file_name,
    parse_model_path,
    quantization_from_name,
    split_part_name,
)


def test_lm_studio_layout() -> None:
    path = parse_model_path("HuggingFaceTB/SmolLM2-135M-Instruct-GGUF/SmolLM2-135M-Instruct.Q4_1.gguf")
    assert path.model_id == "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF/SmolLM2-135M-Instruct.Q4_1"
    assert (path.publisher, path.repo, path.folder) == (
        "HuggingFaceTB",
        "SmolLM2-135M-Instruct-GGUF",
        "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF",
    )
    assert path.quantization == "Q4_1"
    assert path.base_name == "SmolLM2-135M-Instruct"
    assert path.base_id == "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF/SmolLM2-135M-Instruct"
    assert not path.is_split and not path.is_projector


def test_shallower_and_deeper_folders() -> None:
    top = parse_model_path("tiny.gguf")
    assert (top.model_id, top.publisher, top.repo, top.base_id) == ("tiny", "", "", "tiny")
    one = parse_model_path("my-models/tiny-Q8_0.gguf")
    assert (one.model_id, one.publisher, one.repo, one.base_id) == (
        "my-models/tiny-Q8_0",
        "",
        "my-models",
        "my-models/tiny",
    )
    deep = parse_model_path("pub/repo/extra/deeper/m.Q5_K_M.gguf")
    assert (deep.publisher, deep.repo, deep.model_id) == ("pub", "repo", "pub/repo/extra/deeper/m.Q5_K_M")
    assert deep.base_id == "pub/repo/extra/deeper/m"


def test_quantization_folder_is_not_part_of_the_base_id() -> None:
    a = parse_model_path("pub/repo/Q4_K_M/Model-Q4_K_M-00001-of-00002.gguf")
    b = parse_model_path("pub/repo/Q8_0/Model-Q8_0.gguf")
    assert a.base_id == b.base_id == "pub/repo/Model"


def test_split_parts_share_the_id_without_the_suffix() -> None:
    first = parse_model_path("pub/repo/Big-Q4_K_M-00001-of-00003.gguf")
    third = parse_model_path("pub/repo/Big-Q4_K_M-00003-of-00003.gguf")
    assert first.model_id == third.model_id == "pub/repo/Big-Q4_K_M"
    assert (first.split_index, first.split_count, third.split_index) == (1, 3, 3)
    assert first.base_name == "Big" and first.quantization == "Q4_K_M"
    assert split_part_name(first.stem, 2, 3) == "Big-Q4_K_M-00002-of-00003.gguf"
    # A name that is only the suffix is not a split part.
    assert not parse_model_path("-00001-of-00002.gguf").is_split


@pytest.mark.parametrize(
    ("stem", "base", "quant"),
    [
        ("SmolLM2-135M-Instruct.Q4_1", "SmolLM2-135M-Instruct", "Q4_1"),
        ("SmolLM2-135M-Instruct-Q8_0", "SmolLM2-135M-Instruct", "Q8_0"),
        ("Llama-3.2-1B-Instruct-Q4_K_M", "Llama-3.2-1B-Instruct", "Q4_K_M"),
        ("Qwen3-8B-UD-Q4_K_XL", "Qwen3-8B", "Q4_K_XL"),
        ("Meta-Llama-3-8B.i1-IQ2_M", "Meta-Llama-3-8B", "IQ2_M"),
        ("gemma-3-4b-it-q4_0", "gemma-3-4b-it", "Q4_0"),
        ("phi-2.f16", "phi-2", "F16"),
        ("model-BF16", "model", "BF16"),
        ("gpt-oss-20b-mxfp4", "gpt-oss-20b", "MXFP4"),
        ("Mistral-7B-v0.1", "Mistral-7B-v0.1", ""),
        ("SmolLM2-135M", "SmolLM2-135M", ""),
    ],
)
def test_quantization_suffixes(stem: str, base: str, quant: str) -> None:
    path = parse_model_path(f"pub/repo/{stem}.gguf")
    assert (path.base_name, path.quantization) == (base, quant)
    assert quantization_from_name(stem) == quant


def test_projector_names() -> None:
    assert parse_model_path("pub/repo/mmproj-model-f16.gguf").is_projector
    assert parse_model_path("pub/repo/Model-MMPROJ.gguf").is_projector
    assert not parse_model_path("pub/repo/model-f16.gguf").is_projector


@pytest.mark.parametrize(
    ("name", "is_model"),
    [
        ("model.gguf", True),
        ("MODEL.GGUF", True),
        ("model.gguf.part", False),
        ("model.gguf.crdownload", False),
        ("model.gguf.download", False),
        ("model.gguf.incomplete", False),
        (".hidden.gguf", False),
        (".gguf", False),
        ("model.bin", False),
    ],
)
def test_model_file_names(name: str, is_model: bool) -> None:
    assert is_model_file_name(name) is is_model


def test_relative_paths_only() -> None:
    with pytest.raises(ValueError):
        parse_model_path("/abs/model.gguf")
    with pytest.raises(ValueError):
        parse_model_path("pub/repo/model.bin")


def test_aliases_are_short_lowercase_and_unique() -> None:
    aliases = assign_aliases(
        [
            "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF/SmolLM2-135M-Instruct.Q4_1",
            "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF/SmolLM2-135M-Instruct-Q8_0",
            "tiny",
        ]
    )
    assert aliases == {
        "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF/SmolLM2-135M-Instruct.Q4_1": "smollm2-135m-instruct-q4_1",
        "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF/SmolLM2-135M-Instruct-Q8_0": "smollm2-135m-instruct-q8_0",
        "tiny": "tiny",
    }


def test_alias_collisions_resolve_the_same_way_whatever_the_order() -> None:
    ids = [
        "bartowski/Model-GGUF/Model-Q4_K_M",
        "lmstudio-community/Model-GGUF/Model-Q4_K_M",
        "other/model-q4_k_m",
        "x/Model.Q4_K_M",
        "y/model-Q4_K_M",
        "solo/Unique-Q8_0",
    ]
    expected = assign_aliases(ids)
    for seed in range(5):
        shuffled = ids[:]
        random.Random(seed).shuffle(shuffled)
        assert assign_aliases(shuffled) == expected
    assert expected == {
        "bartowski/Model-GGUF/Model-Q4_K_M": "bartowski-model-gguf-model-q4_k_m",
        "lmstudio-community/Model-GGUF/Model-Q4_K_M": "lmstudio-community-model-gguf-model-q4_k_m",
        "other/model-q4_k_m": "other-model-q4_k_m",
        "x/Model.Q4_K_M": "x-model-q4_k_m",
        "y/model-Q4_K_M": "y-model-q4_k_m",
        "solo/Unique-Q8_0": "unique-q8_0",
    }


def test_aliases_of_ids_that_differ_only_in_case() -> None:
    aliases = assign_aliases(["a/Model", "a/model", "a/MODEL"])
    assert sorted(aliases.values()) == ["a-model", "a-model-2", "a-model-3"]
    assert aliases["a/MODEL"] == "a-model"  # "-2", "-3" follow id order

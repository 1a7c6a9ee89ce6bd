"""What a file's place in the models folder says about it: id, publisher, repo, split part, base model.

LM Studio keeps models as `<publisher>/<repo>/<file>.gguf`; people also drop files straight into the
folder, into one folder, or deeper. The rules, all pure functions of the relative path:

- Only names ending in `.gguf` (any case) are model files. Files still being downloaded under a
  temporary name (`*.gguf.part`, `*.crdownload`, `*.download`, `*.incomplete`, ...) are therefore not
  listed at all; the model appears once the download is renamed to its final `.gguf` name.
- Names starting with "." (files or folders) are hidden and ignored, like the tools that make them.
- id: the relative path without `.gguf` and without a split suffix, always with "/" separators.
- publisher / repo: the first two folders when the file is at least two folders deep; with one
  folder, that folder is the repo and the publisher is empty; with none, both are empty.
- A split part `<stem>-00002-of-00003.gguf` belongs to model `<stem>`.
- base name: the stem without its quantization suffix (`.Q4_1`, `-Q4_K_M`, `-UD-Q4_K_XL`, `.i1-IQ2_M`,
  `-f16`, ...); base_id = `<folder>/<base name>` groups the quantization variants of one model. A
  folder named after a quantization (`repo/Q4_K_M/<file>`) is left out of base_id too.
- projector: the file name contains "mmproj".
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath

GGUF_SUFFIX = ".gguf"
_SPLIT_SUFFIX = re.compile(r"-(\d{5})-of-(\d{5})$")
_QUANT_TOKEN = r"(?:i?q\d+(?:_[a-z0-9]+)*|bf16|fp16|fp32|f16|f32|mxfp4(?:_moe)?|nvfp4|tq\d_\d)"
_QUANT_SUFFIX = re.compile(rf"(?i)[._-](?:(?:ud|i1|imat)[._-])?(?P<quant>{_QUANT_TOKEN})$")
_QUANT_NAME = re.compile(rf"(?i)^{_QUANT_TOKEN}$")
_NOT_ALIAS_CHAR = re.compile(r"[^a-z0-9_]+")


def is_hidden(name: str) -> bool:
    return name.startswith(".")


def is_model_file_name(name: str) -> bool:
    """A visible file whose name ends in `.gguf`, in any case."""
    return not is_hidden(name) and name.lower().endswith(GGUF_SUFFIX) and len(name) > len(GGUF_SUFFIX)


def slug(text: str) -> str:
    """Lowercase, runs of anything but letters, digits and "_" become one "-"."""
    return _NOT_ALIAS_CHAR.sub("-", text.lower()).strip("-")


def quantization_from_name(stem: str) -> str:
    """The quantization a file name announces ("Q4_K_M"), upper case; empty when it names none."""
    match = _QUANT_SUFFIX.search(stem)
    return match.group("quant").upper() if match else ""


def split_part_name(stem: str, index: int, count: int) -> str:
    """File name of part `index` (1-based) of a model split into `count` parts, as llama.cpp names it."""
    return f"{stem}-{index:05d}-of-{count:05d}{GGUF_SUFFIX}"


@dataclass(frozen=True)
class ModelPath:
    """The identity a model file gets from where it sits under the models folder."""

    rel: PurePosixPath
    model_id: str
    publisher: str
    repo: str
    folder: str
    stem: str
    split_index: int
    split_count: int
    quantization: str
    base_name: str
    base_id: str
    is_projector: bool

    @property
    def is_split(self) -> bool:
        return self.split_count > 0

    @property
    def file_name(self) -> str:
        return self.rel.name


def parse_model_path(rel: PurePosixPath | str) -> ModelPath:
    """Describes the model file at `rel` (relative to the models folder, "/" separated)."""
    rel = PurePosixPath(rel)
    if rel.is_absolute() or not is_model_file_name(rel.name):
        raise ValueError(f"not a relative .gguf path: {rel}")
    folders = rel.parts[:-1]
    stem = rel.name[: -len(GGUF_SUFFIX)]
    split_index = split_count = 0
    split = _SPLIT_SUFFIX.search(stem)
    if split is not None and stem[: split.start()]:
        split_index, split_count = int(split.group(1)), int(split.group(2))
        stem = stem[: split.start()]
    folder = "/".join(folders)
    model_id = f"{folder}/{stem}" if folder else stem
    if len(folders) >= 2:
        publisher, repo = folders[0], folders[1]
    elif len(folders) == 1:
        publisher, repo = "", folders[0]
    else:
        publisher, repo = "", ""

    quant_match = _QUANT_SUFFIX.search(stem)
    quantization = quant_match.group("quant").upper() if quant_match else ""
    base_name = stem[: quant_match.start()] if quant_match and quant_match.start() > 0 else stem
    base_folders = list(folders)
    if base_folders and _QUANT_NAME.match(base_folders[-1]):
        quantization = quantization or base_folders[-1].upper()
        base_folders.pop()
    base_id = "/".join([*base_folders, base_name])
    return ModelPath(
        rel=rel,
        model_id=model_id,
        publisher=publisher,
        repo=repo,
        folder=folder,
        stem=stem,
        split_index=split_index,
        split_count=split_count,
        quantization=quantization,
        base_name=base_name,
        base_id=base_id,
        is_projector="mmproj" in rel.name.lower(),
    )


def assign_aliases(model_ids: Iterable[str]) -> Mapping[str, str]:
    """A short, lowercase, unique alias for every id, the same for the same set of ids.

    Every model starts with the slug of its file stem ("smollm2-135m-instruct-q4_1"). Models whose
    aliases collide all take one more folder in front ("smollm2-135m-instruct-gguf-...") until they
    differ, so no model keeps a bare alias that another could equally claim; ids that still collide
    (they differ only in case or punctuation) get "-2", "-3", ... in id order.
    """
    ids = sorted(set(model_ids))
    parts = {model_id: model_id.split("/") for model_id in ids}
    level = dict.fromkeys(ids, 1)
    while True:
        candidates = {model_id: _alias_at(parts[model_id], level[model_id]) for model_id in ids}
        by_alias: dict[str, list[str]] = {}
        for model_id, alias in candidates.items():
            by_alias.setdefault(alias, []).append(model_id)
        grown = False
        for members in by_alias.values():
            if len(members) > 1:
                for model_id in members:
                    if level[model_id] < len(parts[model_id]):
                        level[model_id] += 1
                        grown = True
        if not grown:
            break
    aliases: dict[str, str] = {}
    taken: set[str] = set()
    for model_id in ids:
        alias = candidates[model_id] or "model"
        unique, n = alias, 1
        while unique in taken:
            n += 1
            unique = f"{alias}-{n}"
        taken.add(unique)
        aliases[model_id] = unique
    return aliases


def _alias_at(parts: list[str], level: int) -> str:
    return slug("-".join(parts[-level:]))

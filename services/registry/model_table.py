"""Turns per-file states into the published models: split parts grouped, projectors attached,
quantization variants listed, aliases assigned. Pure: the same files give the same models.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from lmcluster.registry.v1 import registry_pb2

from services.registry.gguf_validation import ModelFacts, ProblemClass
from services.registry.layout import ModelPath, assign_aliases, split_part_name

READY = registry_pb2.MODEL_STATE_READY
DOWNLOADING = registry_pb2.MODEL_STATE_DOWNLOADING
INVALID = registry_pb2.MODEL_STATE_INVALID


@dataclass(frozen=True)
class FileState:
    """One file's own state, before it is grouped with the other parts of its model."""

    layout: ModelPath
    path: Path
    size: int
    mtime_ns: int
    state: int  # registry_pb2.ModelState
    reason: str = ""
    problem_class: str = ""
    facts: ModelFacts | None = None
    header_sha256: str = ""


@dataclass(frozen=True)
class _Verdict:
    state: int
    reason: str = ""
    problem_class: str = ""


def build_models(files: Iterable[FileState]) -> dict[str, registry_pb2.Model]:
    """Every model by id (timestamps left unset), projectors included with their own kind."""
    groups: dict[str, list[FileState]] = defaultdict(list)
    for file in files:
        groups[file.layout.model_id].append(file)
    models = {model_id: _assemble(model_id, members) for model_id, members in groups.items()}
    aliases = assign_aliases(models)
    for model_id, model in models.items():
        model.alias = aliases[model_id]
    _attach_projectors(models, groups)
    _list_variants(models)
    return dict(sorted(models.items()))


def problem_class_of(model_files: Sequence[FileState]) -> str:
    """The reason class of the first invalid file (for metrics)."""
    for file in model_files:
        if file.state == INVALID:
            return file.problem_class
    return ""


def _assemble(model_id: str, members: list[FileState]) -> registry_pb2.Model:
    members = sorted(members, key=lambda f: (f.layout.split_index, str(f.path)))
    first = members[0]
    if any(f.layout.is_split for f in members):
        verdict, parts = _split_verdict(members)
    else:
        verdict, parts = _single_verdict(members), members[:1]
    head = next((p for p in parts if p.layout.split_index <= 1), parts[0])
    facts = head.facts or ModelFacts()
    layout = head.layout
    kind = _kind(layout, facts)
    parameter_count = facts.parameter_count
    if len(parts) > 1:
        counts = [p.facts.parameter_count if p.facts else 0 for p in parts]
        parameter_count = sum(counts) if all(counts) else 0
    size = sum(p.size for p in parts)
    model = registry_pb2.Model(
        id=model_id,
        state=verdict.state,
        reason=verdict.reason,
        kind=kind,
        path=str(head.path),
        files=[registry_pb2.ModelFile(path=str(p.path), size_bytes=p.size) for p in parts],
        size_bytes=size,
        publisher=first.layout.publisher,
        repo=first.layout.repo,
        name=facts.name,
        architecture=facts.architecture,
        quantization=facts.quantization or layout.quantization,
        parameter_count=parameter_count,
        context_length=facts.context_length,
        embedding_length=facts.embedding_length,
        block_count=facts.block_count,
        head_count=facts.head_count,
        head_count_kv=facts.head_count_kv,
        key_length=facts.key_length,
        value_length=facts.value_length,
        has_chat_template=facts.has_chat_template,
        fingerprint=registry_pb2.Fingerprint(
            size_bytes=size,
            mtime_ns=max(p.mtime_ns for p in parts),
            header_sha256="".join(p.header_sha256 for p in parts),
        ),
        base_id=layout.base_id,
    )
    return model


def _single_verdict(members: list[FileState]) -> _Verdict:
    file = members[0]
    if len(members) > 1:
        names = ", ".join(sorted(m.layout.file_name for m in members))
        return _Verdict(
            INVALID, f"several files map to this id ({names}); rename all but one", ProblemClass.SPLIT
        )
    return _Verdict(file.state, file.reason, file.problem_class)


def _split_verdict(members: list[FileState]) -> tuple[_Verdict, list[FileState]]:
    singles = [m for m in members if not m.layout.is_split]
    parts = [m for m in members if m.layout.is_split]
    if singles:
        return (
            _Verdict(
                INVALID,
                f"both {singles[0].layout.file_name} and split parts of the same name exist; "
                "remove the parts or the merged file",
                ProblemClass.SPLIT,
            ),
            parts,
        )
    counts = sorted({p.layout.split_count for p in parts})
    if len(counts) > 1:
        return (
            _Verdict(
                INVALID,
                f"split parts disagree on the number of parts ({' vs '.join(map(str, counts))})",
                ProblemClass.SPLIT,
            ),
            parts,
        )
    count = counts[0]
    by_index: dict[int, list[FileState]] = defaultdict(list)
    for part in parts:
        by_index[part.layout.split_index].append(part)
    ordered = [by_index[i][0] for i in sorted(by_index)]
    stem = parts[0].layout.stem
    for index, claimants in sorted(by_index.items()):
        if len(claimants) > 1:
            names = ", ".join(c.layout.file_name for c in claimants)
            return _Verdict(
                INVALID, f"several files claim part {index}: {names}", ProblemClass.SPLIT
            ), ordered
        if not 1 <= index <= count:
            return (
                _Verdict(INVALID, f"part number {index} is outside 1..{count}", ProblemClass.SPLIT),
                ordered,
            )
    for part in ordered:
        if part.state == INVALID:
            where = f"part {part.layout.split_index} of {count} ({part.layout.file_name})"
            return _Verdict(INVALID, f"{where}: {part.reason}", part.problem_class), ordered
    downloading = [p for p in ordered if p.state == DOWNLOADING]
    if downloading:
        part = downloading[0]
        where = f"part {part.layout.split_index} of {count} ({part.layout.file_name})"
        return _Verdict(DOWNLOADING, f"{where}: {part.reason}"), ordered
    missing = [i for i in range(1, count + 1) if i not in by_index]
    if missing:
        names = ", ".join(split_part_name(stem, i, count) for i in missing[:3])
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        what = "part" if len(missing) == 1 else "parts"
        return (
            _Verdict(
                INVALID,
                f"missing {what} {', '.join(map(str, missing[:3]))}{more} of {count}: {names}{more}",
                ProblemClass.SPLIT,
            ),
            ordered,
        )
    head = ordered[0].facts
    if head is not None and head.split_tensor_count:
        total = sum(p.facts.tensor_count for p in ordered if p.facts)
        if total != head.split_tensor_count:
            return (
                _Verdict(
                    INVALID,
                    f"the parts hold {total} tensors but split.tensors.count says {head.split_tensor_count}",
                    ProblemClass.SPLIT,
                ),
                ordered,
            )
    return _Verdict(READY), ordered


def _kind(layout: ModelPath, facts: ModelFacts) -> int:
    if layout.is_projector or facts.is_projector:
        return registry_pb2.MODEL_KIND_PROJECTOR
    if facts.is_embedding:
        return registry_pb2.MODEL_KIND_EMBEDDING
    return registry_pb2.MODEL_KIND_LLM


def _attach_projectors(models: dict[str, registry_pb2.Model], groups: dict[str, list[FileState]]) -> None:
    """READY projectors are attached to every non-projector model in the same folder."""
    by_folder: dict[str, list[registry_pb2.ModelFile]] = defaultdict(list)
    for model_id, model in models.items():
        if model.kind == registry_pb2.MODEL_KIND_PROJECTOR and model.state == READY:
            folder = groups[model_id][0].layout.folder
            by_folder[folder].append(registry_pb2.ModelFile(path=model.path, size_bytes=model.size_bytes))
    if not by_folder:
        return
    for model_id, model in models.items():
        if model.kind != registry_pb2.MODEL_KIND_PROJECTOR:
            projectors = by_folder.get(groups[model_id][0].layout.folder, [])
            model.projectors.extend(sorted(projectors, key=lambda f: f.path))


def bits_per_weight(model: registry_pb2.Model) -> float:
    return model.size_bytes * 8 / model.parameter_count if model.parameter_count else 0.0


def _list_variants(models: dict[str, registry_pb2.Model]) -> None:
    """Every non-projector model lists the models sharing its base_id, most bits per weight first."""
    by_base: dict[str, list[registry_pb2.Model]] = defaultdict(list)
    for model in models.values():
        if model.kind != registry_pb2.MODEL_KIND_PROJECTOR:
            by_base[model.base_id].append(model)
    for members in by_base.values():
        ranked = sorted(members, key=lambda m: (-bits_per_weight(m), -m.size_bytes, m.id))
        variants = [
            registry_pb2.ModelVariant(
                model_id=m.id,
                quantization=m.quantization,
                size_bytes=m.size_bytes,
                bits_per_weight=round(bits_per_weight(m), 4),
                state=m.state,
            )
            for m in ranked
        ]
        for model in members:
            model.variants.extend(variants)

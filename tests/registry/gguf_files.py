"""GGUF files for the Registry's tests and benchmark: small real ones written with gguf.GGUFWriter,
hand-built hostile headers, and byte-exact derivatives of the real demo model.
"""

from __future__ import annotations

import os
import shutil
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path

import gguf
import numpy as np


def write_small_gguf(
    path: Path,
    *,
    arch: str = "llama",
    name: str = "tiny",
    context_length: int | None = 2048,
    embedding_length: int = 64,
    block_count: int = 1,
    head_count: int = 4,
    head_count_kv: int = 2,
    file_type: gguf.LlamaFileType | None = gguf.LlamaFileType.MOSTLY_F16,
    chat_template: str | None = "{{ messages }}",
    rows: int = 32,
    pooling: bool = False,
    extra: Mapping[str, object] | None = None,
) -> Path:
    """A small, structurally real GGUF (F16 weights), loadable metadata for `arch`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(path, arch=arch)
    writer.add_name(name)
    if arch != "clip":
        if context_length is not None:
            writer.add_context_length(context_length)
        writer.add_embedding_length(embedding_length)
        writer.add_block_count(block_count)
        writer.add_head_count(head_count)
        writer.add_head_count_kv(head_count_kv)
    if pooling:
        writer.add_pooling_type(gguf.PoolingType.MEAN)
    if file_type is not None:
        writer.add_file_type(file_type)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    for key, value in (extra or {}).items():
        if isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_uint32(key, int(value))  # type: ignore[call-overload]
    writer.add_tensor("token_embd.weight", np.ones((rows, embedding_length), dtype=np.float16))
    writer.add_tensor("output_norm.weight", np.ones((embedding_length,), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def gguf_string(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def raw_header(
    *,
    magic: bytes = b"GGUF",
    version: int = 3,
    tensor_count: int = 0,
    metadata_count: int | None = None,
    metadata: Sequence[bytes] = (),
    tensors: Sequence[bytes] = (),
    pad_to: int = 0,
) -> bytes:
    """A GGUF header assembled from raw pieces, with counts that may lie."""
    count = len(metadata) if metadata_count is None else metadata_count
    body = magic + struct.pack("<IQQ", version, tensor_count, count) + b"".join(metadata) + b"".join(tensors)
    return body + b"\0" * max(0, pad_to - len(body))


def kv_string(key: str, value: str | bytes) -> bytes:
    return gguf_string(key) + struct.pack("<I", gguf.GGUFValueType.STRING) + gguf_string(value)


def kv_uint32(key: str, value: int) -> bytes:
    return gguf_string(key) + struct.pack("<II", gguf.GGUFValueType.UINT32, value)


def tensor_info(name: str | bytes, shape: Sequence[int], ggml_type: int, offset: int) -> bytes:
    return (
        gguf_string(name)
        + struct.pack("<I", len(shape))
        + b"".join(struct.pack("<Q", d) for d in shape)
        + struct.pack("<IQ", ggml_type, offset)
    )


def derive(
    source: Path, target: Path, *, length: int | None = None, patches: Mapping[int, bytes] | None = None
) -> Path:
    """A byte-exact copy of `source` (its first `length` bytes), with bytes overwritten at offsets."""
    target.parent.mkdir(parents=True, exist_ok=True)
    size = source.stat().st_size if length is None else length
    with source.open("rb") as src, target.open("wb") as dst:
        copied = 0
        while copied < size:
            copied += os.copy_file_range(src.fileno(), dst.fileno(), size - copied, copied, copied) or _stop()
    if patches:
        with target.open("r+b") as dst:
            for offset, data in patches.items():
                dst.seek(offset)
                dst.write(data)
    shutil.copystat(source, target)
    return target


def _stop() -> int:
    raise OSError("source ended early")


def header_copy(source: Path, target: Path, header_bytes: int) -> Path:
    """The real header of `source` followed by a sparse hole up to its full size: valid, costs no disk."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with source.open("rb") as src:
        head = src.read(header_bytes)
    with target.open("wb") as dst:
        dst.write(head)
        dst.truncate(source.stat().st_size)
    return target

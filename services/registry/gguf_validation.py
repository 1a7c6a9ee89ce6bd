"""Reads and validates one GGUF file's header without trusting a byte of it.

`read_gguf_header` walks the GGUF header (magic, version, metadata, tensor table) with bounded reads
and explicit limits, then checks every tensor's data range against the file's size, the way
llama.cpp's own loader does: tensors stored in order, each at the aligned offset after the last one,
of a type llama.cpp still knows, with rows a whole number of blocks, ending inside the file.
`check_model_file` adds the metadata a loadable model needs (a known `general.architecture` and its
context length, embedding width and block count, typed as llama.cpp reads them) and the split-part
bookkeeping (`split.no`, `split.count`).

Why not `gguf.GGUFReader`: it memory-maps the file and builds a numpy array per metadata element;
on the 135M demo model that is ~2 s and ~350 MB per file, a hostile length makes it allocate or
loop without bound, and a file truncated while mapped can SIGBUS the process. This reader takes its
tables from the `gguf` package (magic, value types, ggml types and block sizes, file types,
architecture names), reads with `pread` (never mmap), never follows a length it has not bounded,
and never opens anything but a regular file. The tests check that it agrees with `gguf.GGUFReader`
on real files.

Every problem becomes a `GgufProblem` with a short class (for metrics) and a message a person can
act on; nothing a file contains can raise anything else out of `check_model_file`.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import struct
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import gguf

from services.common.units import human_bytes

GGUF_MAGIC_BYTES = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
GGML_MAX_DIMS = 4
GGML_MAX_NAME = 64  # llama.cpp rejects tensor names of this many bytes or more
HEADER_HASH_BYTES = 1024 * 1024
_MIN_HEADER_BYTES = 24  # magic, version, tensor count, metadata count
_READ_CHUNK = 1024 * 1024

# Architectures the bundled gguf package (and so this llama.cpp generation) knows how to load.
KNOWN_ARCHITECTURES: frozenset[str] = frozenset(gguf.MODEL_ARCH_NAMES.values())
PROJECTOR_ARCHITECTURES = frozenset({"clip"})
# Architectures that only embed text; llama-server serves them with `--embedding`.
EMBEDDING_ARCHITECTURES = frozenset(
    {
        "bert",
        "nomic-bert",
        "nomic-bert-moe",
        "jina-bert-v2",
        "jina-bert-v3",
        "modern-bert",
        "neo-bert",
        "eurobert",
        "gemma-embedding",
        "llama-embed",
        "t5encoder",
    }
)


class ProblemClass(StrEnum):
    """Coarse reason classes: metric labels, and what a person looks at first."""

    EMPTY = "empty"
    NOT_GGUF = "not_gguf"
    UNSUPPORTED_VERSION = "unsupported_version"
    TRUNCATED = "truncated"
    CORRUPT = "corrupt"
    LIMIT = "limit"
    METADATA = "metadata"
    ARCHITECTURE = "architecture"
    TENSOR = "tensor"
    SPLIT = "split"
    NOT_REGULAR = "not_regular"
    BROKEN_LINK = "broken_link"
    UNREADABLE = "unreadable"
    INTERNAL = "internal"


class GgufProblem(Exception):
    """Why a file may not be loaded."""

    def __init__(self, problem_class: ProblemClass, message: str) -> None:
        super().__init__(message)
        self.problem_class = problem_class
        self.message = message


@dataclass(frozen=True)
class ValidationLimits:
    """Upper bounds that keep a hostile header from costing unbounded time or memory."""

    max_header_bytes: int = 256 * 1024 * 1024
    max_metadata_count: int = 65_536
    max_tensor_count: int = 200_000
    max_array_length: int = 16_777_216
    max_string_bytes: int = 16 * 1024 * 1024


@dataclass(frozen=True)
class ArrayValue:
    """A metadata array: its element type and length, and its values when short and numeric."""

    item_type: gguf.GGUFValueType
    length: int
    values: tuple[Any, ...] | None = None


@dataclass(frozen=True)
class TensorInfo:
    name: str
    ggml_type: gguf.GGMLQuantizationType
    shape: tuple[int, ...]
    n_elements: int
    n_bytes: int
    data_offset: int  # absolute byte offset of the tensor's data in the file


@dataclass(frozen=True)
class GgufHeader:
    """What a structurally valid GGUF file says about itself."""

    file_size: int
    version: int
    alignment: int
    metadata: Mapping[str, Any]
    metadata_types: Mapping[str, gguf.GGUFValueType]
    tensors: tuple[TensorInfo, ...]
    tensor_info_offset: int  # where the tensor table starts (after the metadata)
    data_offset: int
    data_end: int
    header_sha256: str

    @property
    def parameter_count(self) -> int:
        return sum(t.n_elements for t in self.tensors)

    def weight_elements_by_type(self) -> Counter[str]:
        """Elements per ggml type over the 2-D (and larger) weight tensors."""
        counts: Counter[str] = Counter()
        for tensor in self.tensors:
            if len(tensor.shape) >= 2:
                counts[tensor.ggml_type.name] += tensor.n_elements
        return counts


@dataclass(frozen=True)
class ModelFacts:
    """The metadata the Registry publishes, taken from a validated header (0 / "" when absent)."""

    architecture: str = ""
    name: str = ""
    quantization: str = ""
    parameter_count: int = 0
    context_length: int = 0
    embedding_length: int = 0
    block_count: int = 0
    head_count: int = 0
    head_count_kv: int = 0
    key_length: int = 0
    value_length: int = 0
    has_chat_template: bool = False
    is_projector: bool = False
    is_embedding: bool = False
    split_no: int = -1  # `split.no` (0-based), -1 when the file is not a split part
    split_count: int = 0
    split_tensor_count: int = 0
    tensor_count: int = 0


@dataclass(frozen=True)
class FileCheck:
    """The outcome of checking one file: facts when it may be loaded, else a problem."""

    facts: ModelFacts | None
    problem: GgufProblem | None = None
    header_sha256: str = ""
    header: GgufHeader | None = field(default=None, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        return self.problem is None


_SCALAR_FORMATS: dict[gguf.GGUFValueType, struct.Struct] = {
    gguf.GGUFValueType.UINT8: struct.Struct("<B"),
    gguf.GGUFValueType.INT8: struct.Struct("<b"),
    gguf.GGUFValueType.UINT16: struct.Struct("<H"),
    gguf.GGUFValueType.INT16: struct.Struct("<h"),
    gguf.GGUFValueType.UINT32: struct.Struct("<I"),
    gguf.GGUFValueType.INT32: struct.Struct("<i"),
    gguf.GGUFValueType.FLOAT32: struct.Struct("<f"),
    gguf.GGUFValueType.BOOL: struct.Struct("<?"),
    gguf.GGUFValueType.UINT64: struct.Struct("<Q"),
    gguf.GGUFValueType.INT64: struct.Struct("<q"),
    gguf.GGUFValueType.FLOAT64: struct.Struct("<d"),
}
_INTEGER_TYPES = frozenset(
    {
        gguf.GGUFValueType.UINT8,
        gguf.GGUFValueType.INT8,
        gguf.GGUFValueType.UINT16,
        gguf.GGUFValueType.INT16,
        gguf.GGUFValueType.UINT32,
        gguf.GGUFValueType.INT32,
        gguf.GGUFValueType.UINT64,
        gguf.GGUFValueType.INT64,
    }
)
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_SHORT_ARRAY = 4096  # numeric arrays up to this length keep their values (per-layer head counts)
_KEEP_STRING_BYTES = 64 * 1024  # longer strings (big chat templates) are kept as their length only
_INT64_MAX = 2**63 - 1
_UINT32_MAX = 2**32 - 1


def _human(n: int) -> str:
    return f"{n} bytes" if n < 1024 else human_bytes(n)


class _Cursor:
    """Sequential, bounded reads of a file's header through `pread` into a sliding window."""

    def __init__(self, fd: int, file_size: int, limits: ValidationLimits) -> None:
        self._fd = fd
        self.file_size = file_size
        self._limit = limits.max_header_bytes
        self._window = b""
        self._start = 0
        self.pos = 0

    def _fill(self, n: int) -> int:
        """Makes bytes [pos, pos+n) readable; returns their index in the window."""
        index = self.pos - self._start
        if index >= 0 and index + n <= len(self._window):
            return index
        end = self.pos + n
        if end > self.file_size:
            raise self._past_end()
        if end > self._limit:
            raise GgufProblem(
                ProblemClass.LIMIT,
                f"header larger than the limit of {_human(self._limit)} (LMC_REGISTRY_MAX_HEADER_BYTES)",
            )
        size = min(max(n, _READ_CHUNK), self.file_size - self.pos)
        data = _pread_fully(self._fd, size, self.pos)
        if len(data) < n:
            raise GgufProblem(
                ProblemClass.TRUNCATED,
                f"truncated: the file ended at byte {self.pos + len(data)} while reading its header "
                "(it shrank while being read)",
            )
        self._window, self._start = data, self.pos
        return 0

    def _past_end(self) -> GgufProblem:
        # A partial download is far likelier than a lying length; the message names both.
        return GgufProblem(
            ProblemClass.TRUNCATED,
            f"truncated: the header runs past the end of the file ({self.file_size} bytes) "
            f"at byte {self.pos}; "
            "the download is incomplete (or the header is corrupt)",
        )

    def bytes(self, n: int) -> bytes:
        index = self._fill(n)
        self.pos += n
        return self._window[index : index + n]

    def unpack(self, fmt: struct.Struct) -> Any:
        index = self._fill(fmt.size)
        self.pos += fmt.size
        return fmt.unpack_from(self._window, index)[0]

    def skip(self, n: int) -> None:
        if self.pos + n > self.file_size:
            raise self._past_end()
        if self.pos + n > self._limit:
            raise GgufProblem(
                ProblemClass.LIMIT,
                f"header larger than the limit of {_human(self._limit)} (LMC_REGISTRY_MAX_HEADER_BYTES)",
            )
        self.pos += n

    def skip_strings(self, count: int, max_string: int) -> None:
        """Skips `count` length-prefixed strings; the hot loop of tokenizer vocabularies."""
        unpack = _U64.unpack_from
        remaining = count
        while remaining:
            index = self._fill(8)
            window, end = self._window, len(self._window)
            while remaining and index + 8 <= end:
                length = unpack(window, index)[0]
                if length > max_string:
                    raise _string_too_long(self._start + index, length, max_string)
                if index + 8 + length > end:
                    break
                index += 8 + length
                remaining -= 1
            self.pos = self._start + index
            if remaining and index + 8 <= end:
                # The next string spans the window's end: read its length and step over it.
                length = self.unpack(_U64)
                if length > max_string:
                    raise _string_too_long(self.pos - 8, length, max_string)
                self.skip(length)
                remaining -= 1


def _string_too_long(offset: int, length: int, limit: int) -> GgufProblem:
    return GgufProblem(
        ProblemClass.LIMIT if length <= 2**40 else ProblemClass.CORRUPT,
        f"corrupt header: a string at byte {offset} claims {length} bytes (limit {_human(limit)})",
    )


def _pread_fully(fd: int, size: int, offset: int) -> bytes:
    chunks: list[bytes] = []
    got = 0
    while got < size:
        chunk = os.pread(fd, size - got, offset + got)
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _read_string(cursor: _Cursor, limits: ValidationLimits, what: str) -> bytes:
    length = cursor.unpack(_U64)
    if length > limits.max_string_bytes:
        raise _string_too_long(cursor.pos - 8, length, limits.max_string_bytes)
    return cursor.bytes(length)


def _decode(raw: bytes, what: str, offset: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise GgufProblem(
            ProblemClass.CORRUPT, f"corrupt header: {what} at byte {offset} is not valid UTF-8"
        ) from None


def _value_type(raw: int, key: str) -> gguf.GGUFValueType:
    try:
        return gguf.GGUFValueType(raw)
    except ValueError:
        raise GgufProblem(
            ProblemClass.CORRUPT, f"corrupt header: metadata '{key}' has unknown value type {raw}"
        ) from None


def _read_value(cursor: _Cursor, value_type: gguf.GGUFValueType, key: str, limits: ValidationLimits) -> Any:
    scalar = _SCALAR_FORMATS.get(value_type)
    if scalar is not None:
        return cursor.unpack(scalar)
    if value_type == gguf.GGUFValueType.STRING:
        offset = cursor.pos
        length = cursor.unpack(_U64)
        if length > limits.max_string_bytes:
            raise _string_too_long(offset, length, limits.max_string_bytes)
        if length > _KEEP_STRING_BYTES:
            cursor.skip(length)
            return _LongString(length)
        return cursor.bytes(length).decode("utf-8", errors="replace")
    if value_type == gguf.GGUFValueType.ARRAY:
        offset = cursor.pos
        item_type = _value_type(cursor.unpack(_U32), key)
        length = cursor.unpack(_U64)
        if item_type == gguf.GGUFValueType.ARRAY:
            raise GgufProblem(
                ProblemClass.CORRUPT, f"corrupt header: metadata '{key}' is an array of arrays (unsupported)"
            )
        if length > limits.max_array_length:
            raise GgufProblem(
                ProblemClass.LIMIT if length <= 2**40 else ProblemClass.CORRUPT,
                f"corrupt header: metadata '{key}' at byte {offset} claims {length} elements "
                f"(limit {limits.max_array_length}, LMC_REGISTRY_MAX_ARRAY_LENGTH)",
            )
        if item_type == gguf.GGUFValueType.STRING:
            if cursor.pos + length * 8 > cursor.file_size:
                cursor.skip(length * 8)  # raises: not even the lengths fit in the file
            cursor.skip_strings(length, limits.max_string_bytes)
            return ArrayValue(item_type, length)
        item = _SCALAR_FORMATS[item_type]
        if length <= _SHORT_ARRAY:
            raw = cursor.bytes(item.size * length)
            values = tuple(v[0] for v in item.iter_unpack(raw)) if length else ()
            return ArrayValue(item_type, length, values)
        cursor.skip(item.size * length)
        return ArrayValue(item_type, length)
    raise GgufProblem(ProblemClass.CORRUPT, f"corrupt header: metadata '{key}' has unknown value type")


@dataclass(frozen=True)
class _LongString:
    length: int

    def __bool__(self) -> bool:
        return self.length > 0


def _not_gguf_reason(head: bytes) -> str:
    text = head.lstrip().lower()
    if text.startswith((b"<!doctype html", b"<html")):
        return "not a GGUF file: it is an HTML page (a failed or redirected download?)"
    if text.startswith(b"version https://git-lfs"):
        return "not a GGUF file: it is a Git LFS pointer; fetch the real file (git lfs pull)"
    if text.startswith((b"{", b"[")):
        return "not a GGUF file: it looks like JSON (an error response saved as the model?)"
    if head.startswith(b"ggml") or head.startswith(b"ggjt") or head.startswith(b"lmgg"):
        return "not a GGUF file: an old GGML/GGJT model; convert it to GGUF"
    if head.startswith(b"FUGG"):
        return "not a GGUF file: magic is byte-swapped (b'FUGG'); the file is corrupt"
    return f"not a GGUF file: it starts with {head[:8]!r} instead of b'GGUF'"


def open_regular_file(path: Path) -> tuple[int, os.stat_result]:
    """Opens `path` for reading only if it is a regular file; never blocks on a FIFO or device."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        if os.path.islink(path):
            raise GgufProblem(
                ProblemClass.BROKEN_LINK,
                f"broken symbolic link: its target {os.readlink(path)!r} does not exist",
            ) from None
        raise GgufProblem(ProblemClass.UNREADABLE, "unreadable: the file disappeared") from None
    except PermissionError:
        raise GgufProblem(
            ProblemClass.UNREADABLE,
            f"unreadable: permission denied for the Registry's user (uid {os.geteuid()}); "
            "fix the file's mode",
        ) from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise GgufProblem(ProblemClass.BROKEN_LINK, "broken symbolic link: it points in a loop") from None
        raise GgufProblem(ProblemClass.UNREADABLE, f"unreadable: {exc.strerror or exc}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise GgufProblem(
                ProblemClass.NOT_REGULAR, f"not a regular file ({describe_file_type(info.st_mode)})"
            )
    except BaseException:
        os.close(fd)
        raise
    return fd, info


def describe_file_type(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a named pipe"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    return "not a regular file"


def read_gguf_header(path: Path, limits: ValidationLimits = ValidationLimits()) -> GgufHeader:
    """Reads and structurally validates the GGUF file at `path`; raises GgufProblem."""
    fd, info = open_regular_file(path)
    try:
        head = _read_head(fd, info.st_size)
        return _read_header(fd, info.st_size, head, limits)
    finally:
        os.close(fd)


def _read_head(fd: int, file_size: int) -> bytes:
    """The first MiB, which the fingerprint hashes and the header usually fits in."""
    try:
        return _pread_fully(fd, min(file_size, HEADER_HASH_BYTES), 0)
    except OSError as exc:
        raise GgufProblem(ProblemClass.UNREADABLE, f"unreadable: {exc.strerror or exc}") from None


def _read_header(fd: int, file_size: int, head: bytes, limits: ValidationLimits) -> GgufHeader:
    try:
        return _parse_header(fd, file_size, head, limits)
    except OSError as exc:
        raise GgufProblem(ProblemClass.UNREADABLE, f"unreadable: {exc.strerror or exc}") from None


def _parse_header(fd: int, file_size: int, head: bytes, limits: ValidationLimits) -> GgufHeader:
    header_sha256 = hashlib.sha256(head).hexdigest()
    if file_size == 0:
        raise GgufProblem(ProblemClass.EMPTY, "empty file (0 bytes); the download did not start or failed")
    if not head.startswith(GGUF_MAGIC_BYTES):
        if len(head) < 4 and GGUF_MAGIC_BYTES.startswith(head):
            raise GgufProblem(ProblemClass.TRUNCATED, f"truncated: only {len(head)} bytes of a GGUF header")
        raise GgufProblem(ProblemClass.NOT_GGUF, _not_gguf_reason(head))
    if file_size < _MIN_HEADER_BYTES:
        raise GgufProblem(
            ProblemClass.TRUNCATED, f"truncated: {file_size} bytes is shorter than a GGUF header (24 bytes)"
        )
    cursor = _Cursor(fd, file_size, limits)
    cursor.skip(4)
    version = cursor.unpack(_U32)
    if version & 0xFFFF == 0 and version:
        raise GgufProblem(
            ProblemClass.UNSUPPORTED_VERSION,
            "big-endian GGUF (made for the opposite byte order); llama.cpp here reads little-endian files",
        )
    if version == 1:
        raise GgufProblem(
            ProblemClass.UNSUPPORTED_VERSION,
            "GGUF version 1 is no longer supported by llama.cpp; reconvert the model",
        )
    if version not in SUPPORTED_VERSIONS:
        raise GgufProblem(
            ProblemClass.UNSUPPORTED_VERSION,
            f"unsupported GGUF version {version} (supported: {', '.join(map(str, SUPPORTED_VERSIONS))})",
        )
    tensor_count = cursor.unpack(_U64)
    metadata_count = cursor.unpack(_U64)
    if tensor_count > limits.max_tensor_count:
        raise GgufProblem(
            ProblemClass.CORRUPT if tensor_count > 2**32 else ProblemClass.LIMIT,
            f"corrupt header: it claims {tensor_count} tensors "
            f"(limit {limits.max_tensor_count}, LMC_REGISTRY_MAX_TENSOR_COUNT)",
        )
    if metadata_count > limits.max_metadata_count:
        raise GgufProblem(
            ProblemClass.CORRUPT if metadata_count > 2**32 else ProblemClass.LIMIT,
            f"corrupt header: it claims {metadata_count} metadata entries "
            f"(limit {limits.max_metadata_count}, LMC_REGISTRY_MAX_METADATA_COUNT)",
        )
    if cursor.pos + tensor_count * 24 + metadata_count * 13 > file_size:
        cursor.skip(tensor_count * 24 + metadata_count * 13)  # raises: the tables cannot fit in the file

    metadata: dict[str, Any] = {}
    metadata_types: dict[str, gguf.GGUFValueType] = {}
    for _ in range(metadata_count):
        key_offset = cursor.pos
        key = _decode(_read_string(cursor, limits, "a metadata key"), "a metadata key", key_offset)
        if key in metadata:
            raise GgufProblem(ProblemClass.CORRUPT, f"corrupt header: duplicate metadata key '{key}'")
        value_type = _value_type(cursor.unpack(_U32), key)
        metadata[key] = _read_value(cursor, value_type, key, limits)
        metadata_types[key] = value_type

    alignment = gguf.GGUF_DEFAULT_ALIGNMENT
    if "general.alignment" in metadata:
        alignment = metadata["general.alignment"]
        if metadata_types["general.alignment"] != gguf.GGUFValueType.UINT32:
            raise GgufProblem(ProblemClass.CORRUPT, "corrupt header: general.alignment is not a UINT32")
        if alignment == 0 or alignment & (alignment - 1):
            raise GgufProblem(
                ProblemClass.CORRUPT, f"corrupt header: general.alignment {alignment} is not a power of two"
            )

    tensor_info_offset = cursor.pos
    raw_tensors: list[tuple[str, int, tuple[int, ...], int]] = []
    names: set[str] = set()
    for index in range(tensor_count):
        name_offset = cursor.pos
        raw_name = _read_string(cursor, limits, "a tensor name")
        if len(raw_name) >= GGML_MAX_NAME:
            raise GgufProblem(
                ProblemClass.TENSOR,
                f"tensor #{index} has a name of {len(raw_name)} bytes; "
                f"llama.cpp allows at most {GGML_MAX_NAME - 1}",
            )
        name = _decode(raw_name, "a tensor name", name_offset)
        if name in names:
            raise GgufProblem(ProblemClass.CORRUPT, f"corrupt header: duplicate tensor '{name}'")
        names.add(name)
        n_dims = cursor.unpack(_U32)
        if n_dims > GGML_MAX_DIMS:
            raise GgufProblem(
                ProblemClass.TENSOR,
                f"tensor '{name}' has {n_dims} dimensions; llama.cpp allows {GGML_MAX_DIMS}",
            )
        shape = tuple(cursor.unpack(_U64) for _ in range(n_dims))
        raw_type = cursor.unpack(_U32)
        offset = cursor.unpack(_U64)
        raw_tensors.append((name, raw_type, shape, offset))
    padding = cursor.pos % alignment
    data_offset = cursor.pos + (alignment - padding if padding else 0)

    tensors: list[TensorInfo] = []
    expected = 0
    for name, raw_type, shape, offset in raw_tensors:
        ggml_type = _tensor_type(name, raw_type)
        block_size, type_size = gguf.GGML_QUANT_SIZES[ggml_type]
        n_elements = 1
        for dim in shape:
            if dim > _INT64_MAX:
                raise GgufProblem(ProblemClass.TENSOR, f"tensor '{name}' has an impossible dimension {dim}")
            n_elements *= dim
        if n_elements > _INT64_MAX:
            raise GgufProblem(ProblemClass.TENSOR, f"tensor '{name}' has an impossible shape {list(shape)}")
        if shape and shape[0] % block_size:
            raise GgufProblem(
                ProblemClass.TENSOR,
                f"tensor '{name}' of type {ggml_type.name} has rows of {shape[0]} elements, "
                f"not a multiple of its block size {block_size}",
            )
        n_bytes = n_elements * type_size // block_size
        if offset != expected:
            raise GgufProblem(
                ProblemClass.TENSOR,
                f"tensor '{name}' starts at data offset {offset}, expected {expected} "
                "(llama.cpp needs tensors stored in order, each padded to the alignment)",
            )
        start = data_offset + offset
        end = start + n_bytes
        if end > file_size:
            percent = 100.0 * file_size / _planned_size(data_offset, raw_tensors, alignment)
            raise GgufProblem(
                ProblemClass.TRUNCATED,
                f"truncated: tensor '{name}' ends at byte {end} but the file has {file_size} bytes "
                f"(about {min(percent, 99.9):.1f}% present; the download is incomplete)",
            )
        tensors.append(TensorInfo(name, ggml_type, shape, n_elements, n_bytes, start))
        expected = offset + n_bytes + (-n_bytes % alignment)
    data_end = tensors[-1].data_offset + tensors[-1].n_bytes if tensors else data_offset
    return GgufHeader(
        file_size=file_size,
        version=version,
        alignment=alignment,
        metadata=metadata,
        metadata_types=metadata_types,
        tensors=tuple(tensors),
        tensor_info_offset=tensor_info_offset,
        data_offset=data_offset,
        data_end=data_end,
        header_sha256=header_sha256,
    )


def _tensor_type(name: str, raw_type: int) -> gguf.GGMLQuantizationType:
    try:
        ggml_type = gguf.GGMLQuantizationType(raw_type)
    except ValueError:
        raise GgufProblem(
            ProblemClass.TENSOR,
            f"tensor '{name}' has ggml type {raw_type}, which this llama.cpp does not know "
            "(removed or newer); requantize the model",
        ) from None
    if ggml_type not in gguf.GGML_QUANT_SIZES:
        raise GgufProblem(
            ProblemClass.TENSOR, f"tensor '{name}' has ggml type {ggml_type.name} without a size"
        )
    return ggml_type


def _planned_size(
    data_offset: int, raw_tensors: list[tuple[str, int, tuple[int, ...], int]], alignment: int
) -> int:
    """The size the file would have if complete (for the "% present" hint); best effort."""
    try:
        _name, raw_type, shape, offset = raw_tensors[-1]
        block_size, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(raw_type)]
        n_elements = 1
        for dim in shape:
            n_elements *= dim
        return max(1, data_offset + offset + n_elements * type_size // block_size)
    except (ValueError, KeyError, IndexError):
        return max(1, data_offset)


def _integer(header: GgufHeader, key: str) -> int:
    """An integer metadata value (the largest element of an integer array), 0 when absent or not one."""
    value = header.metadata.get(key)
    value_type = header.metadata_types.get(key)
    if value_type in _INTEGER_TYPES and isinstance(value, int):
        return value if 0 <= value <= _UINT32_MAX else 0
    if isinstance(value, ArrayValue) and value.item_type in _INTEGER_TYPES and value.values:
        largest = max(value.values)
        return largest if 0 <= largest <= _UINT32_MAX else 0
    return 0


def _string(header: GgufHeader, key: str) -> str:
    value = header.metadata.get(key)
    return value if isinstance(value, str) else ""


def quantization_name(header: GgufHeader) -> str:
    """GGUF file type name ("Q4_1"), else the ggml type holding most 2-D weight elements."""
    file_type = header.metadata.get("general.file_type")
    if isinstance(file_type, int) and header.metadata_types.get("general.file_type") in _INTEGER_TYPES:
        try:
            name = gguf.LlamaFileType(file_type).name
        except ValueError:
            name = ""
        if name and name != "GUESSED":
            return name.removeprefix("MOSTLY_").removeprefix("ALL_")
    weights = header.weight_elements_by_type()
    return weights.most_common(1)[0][0] if weights else ""


def model_facts(header: GgufHeader) -> ModelFacts:
    """The metadata the Registry publishes about one file."""
    arch = _string(header, "general.architecture")
    head_count = _integer(header, f"{arch}.attention.head_count")
    chat_template = header.metadata.get("tokenizer.chat_template")
    split_no = header.metadata.get("split.no")
    return ModelFacts(
        architecture=arch,
        name=_string(header, "general.name"),
        quantization=quantization_name(header),
        parameter_count=min(header.parameter_count, _INT64_MAX),
        context_length=_integer(header, f"{arch}.context_length"),
        embedding_length=_integer(header, f"{arch}.embedding_length"),
        block_count=_integer(header, f"{arch}.block_count"),
        head_count=head_count,
        head_count_kv=_integer(header, f"{arch}.attention.head_count_kv") or head_count,
        key_length=_integer(header, f"{arch}.attention.key_length"),
        value_length=_integer(header, f"{arch}.attention.value_length"),
        has_chat_template=isinstance(chat_template, (str, _LongString)) and bool(chat_template),
        is_projector=arch in PROJECTOR_ARCHITECTURES,
        is_embedding=arch in EMBEDDING_ARCHITECTURES or f"{arch}.pooling_type" in header.metadata,
        split_no=split_no if isinstance(split_no, int) and "split.count" in header.metadata else -1,
        split_count=_integer(header, "split.count"),
        split_tensor_count=_integer(header, "split.tensors.count"),
        tensor_count=len(header.tensors),
    )


def _require_uint32(header: GgufHeader, key: str) -> None:
    if key not in header.metadata:
        raise GgufProblem(
            ProblemClass.METADATA, f"metadata '{key}' is missing; llama.cpp needs it to load the model"
        )
    value_type = header.metadata_types[key]
    if value_type != gguf.GGUFValueType.UINT32:
        raise GgufProblem(
            ProblemClass.METADATA,
            f"metadata '{key}' has type {value_type.name}; llama.cpp reads it as UINT32",
        )
    if header.metadata[key] == 0:
        raise GgufProblem(ProblemClass.METADATA, f"metadata '{key}' is 0")


def check_model_metadata(
    header: GgufHeader, architectures: Iterable[str] = KNOWN_ARCHITECTURES, *, projector: bool = False
) -> None:
    """Checks what a loadable first (or only) file must carry; raises GgufProblem."""
    if "general.architecture" not in header.metadata:
        raise GgufProblem(ProblemClass.METADATA, "metadata 'general.architecture' is missing")
    arch = header.metadata["general.architecture"]
    if header.metadata_types["general.architecture"] != gguf.GGUFValueType.STRING or not isinstance(
        arch, str
    ):
        raise GgufProblem(ProblemClass.METADATA, "metadata 'general.architecture' is not a string")
    if arch not in architectures and arch not in PROJECTOR_ARCHITECTURES:
        raise GgufProblem(
            ProblemClass.ARCHITECTURE,
            f"unknown architecture '{arch}': this llama.cpp cannot load it "
            "(LMC_REGISTRY_EXTRA_ARCHITECTURES adds names a newer llama-server knows)",
        )
    if projector or arch in PROJECTOR_ARCHITECTURES:
        return
    for key in ("context_length", "embedding_length", "block_count"):
        _require_uint32(header, f"{arch}.{key}")
    if not header.tensors:
        raise GgufProblem(ProblemClass.TENSOR, "the file holds no tensors")


def check_split_metadata(header: GgufHeader, split_index: int, split_count: int) -> None:
    """Checks `split.no` / `split.count` against the file name's `-0000I-of-0000N`; raises GgufProblem."""
    has_split = "split.count" in header.metadata
    if split_count == 0:
        if has_split and _integer(header, "split.count") > 1:
            raise GgufProblem(
                ProblemClass.SPLIT,
                f"the file is part of a {_integer(header, 'split.count')}-part split model "
                "but its name lacks "
                "the -0000I-of-0000N suffix llama.cpp uses to find the other parts",
            )
        return
    if not has_split:
        raise GgufProblem(
            ProblemClass.SPLIT,
            f"named as part {split_index} of {split_count} but the file has no split.count metadata",
        )
    count = header.metadata.get("split.count")
    number = header.metadata.get("split.no")
    if count != split_count:
        raise GgufProblem(
            ProblemClass.SPLIT, f"named as one of {split_count} parts but its split.count says {count}"
        )
    if number != split_index - 1:
        raise GgufProblem(
            ProblemClass.SPLIT,
            f"named as part {split_index} but its split.no says part "
            f"{number + 1 if isinstance(number, int) else number}",
        )


def check_model_file(
    path: Path,
    *,
    split_index: int = 0,
    split_count: int = 0,
    projector: bool = False,
    limits: ValidationLimits = ValidationLimits(),
    architectures: Iterable[str] = KNOWN_ARCHITECTURES,
) -> FileCheck:
    """Validates one file: structure, tensor ranges, and, for a first or only part, model metadata.

    `split_index`/`split_count` come from the file name (0 when not split). Never raises.
    """
    header: GgufHeader | None = None
    header_sha256 = ""
    try:
        fd, info = open_regular_file(path)
        try:
            head = _read_head(fd, info.st_size)
            header_sha256 = hashlib.sha256(head).hexdigest()
            header = _read_header(fd, info.st_size, head, limits)
        finally:
            os.close(fd)
        check_split_metadata(header, split_index, split_count)
        if split_index <= 1:
            check_model_metadata(header, architectures, projector=projector)
        return FileCheck(model_facts(header), None, header_sha256, header)
    except GgufProblem as problem:
        return FileCheck(_facts_or_none(header), problem, header_sha256, header)
    except MemoryError:
        memory = GgufProblem(ProblemClass.LIMIT, "the header needs more memory than is available")
        return FileCheck(None, memory, header_sha256)
    except Exception as exc:  # a bug here must not take the Registry down with it
        internal = GgufProblem(ProblemClass.INTERNAL, f"internal error while reading: {exc!r}")
        return FileCheck(None, internal, header_sha256)


def _facts_or_none(header: GgufHeader | None) -> ModelFacts | None:
    if header is None:
        return None
    try:
        return model_facts(header)
    except Exception:
        return None

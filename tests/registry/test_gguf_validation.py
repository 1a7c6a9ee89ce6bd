"""gguf_validation.py on the real demo model, files llama.cpp's tools made from it, and hostile files."""

from __future__ import annotations

import os
import random
import stat
import struct
import tempfile
from pathlib import Path

import gguf
import pytest

from services.registry.gguf_validation import (
    KNOWN_ARCHITECTURES,
    FileCheck,
    ProblemClass,
    ValidationLimits,
    check_model_file,
    read_gguf_header,
)
from tests.registry.gguf_files import (
    derive,
    gguf_string,
    kv_string,
    kv_uint32,
    raw_header,
    tensor_info,
    write_small_gguf,
)


def _invalid(check: FileCheck, problem_class: ProblemClass, *fragments: str) -> str:
    assert check.problem is not None, "expected the file to be INVALID"
    assert check.problem.problem_class == problem_class, check.problem.message
    for fragment in fragments:
        assert fragment in check.problem.message
    return check.problem.message


def test_demo_model_is_valid_with_its_metadata(demo_model: Path) -> None:
    check = check_model_file(demo_model)
    assert check.ok, check.problem
    facts = check.facts
    assert facts is not None
    assert facts.architecture == "llama"
    assert facts.quantization == "Q4_1"
    assert facts.name == "Smollm2 135M 8k Lc100K Mix1 Ep2"
    assert facts.parameter_count == 134_515_008
    assert (facts.context_length, facts.embedding_length, facts.block_count) == (8192, 576, 30)
    assert (facts.head_count, facts.head_count_kv) == (9, 3)
    assert facts.has_chat_template
    assert not facts.is_projector and not facts.is_embedding
    assert facts.tensor_count == 272 and facts.split_no == -1
    assert len(check.header_sha256) == 64


def test_agrees_with_the_gguf_packages_reader(demo_model: Path) -> None:
    ours = read_gguf_header(demo_model)
    reference = gguf.GGUFReader(demo_model)
    assert ours.data_offset == reference.data_offset
    assert ours.alignment == reference.alignment
    assert [(t.name, t.ggml_type, t.data_offset, t.n_bytes, t.n_elements) for t in ours.tensors] == [
        (t.name, t.tensor_type, t.data_offset, t.n_bytes, t.n_elements) for t in reference.tensors
    ]
    assert [tuple(t.shape) for t in ours.tensors] == [
        tuple(int(d) for d in t.shape) for t in reference.tensors
    ]
    assert set(ours.metadata) == set(reference.fields) - {
        "GGUF.version",
        "GGUF.tensor_count",
        "GGUF.kv_count",
    }
    for key, field in reference.fields.items():
        if key.startswith("GGUF.") or field.types[0] == gguf.GGUFValueType.ARRAY:
            continue
        assert ours.metadata[key] == pytest.approx(field.contents()), key
    tokens = ours.metadata["tokenizer.ggml.tokens"]
    assert tokens.length == len(reference.fields["tokenizer.ggml.tokens"].data) == 49152


def test_split_parts_from_llama_gguf_split(split_parts: list[Path], demo_model: Path) -> None:
    first = check_model_file(split_parts[0], split_index=1, split_count=2)
    second = check_model_file(split_parts[1], split_index=2, split_count=2)
    assert first.ok and second.ok, (first.problem, second.problem)
    assert first.facts and second.facts
    assert (first.facts.split_no, first.facts.split_count, first.facts.split_tensor_count) == (0, 2, 272)
    assert (second.facts.split_no, second.facts.split_count) == (1, 2)
    assert first.facts.tensor_count + second.facts.tensor_count == 272
    assert first.facts.architecture == "llama" and second.facts.architecture == ""
    total = first.facts.parameter_count + second.facts.parameter_count
    assert total == check_model_file(demo_model).facts.parameter_count  # type: ignore[union-attr]
    for part in split_parts:  # the reference reader agrees on every part's tensor table
        ours, reference = read_gguf_header(part), gguf.GGUFReader(part)
        assert [(t.name, t.data_offset, t.n_bytes) for t in ours.tensors] == [
            (t.name, t.data_offset, t.n_bytes) for t in reference.tensors
        ]


def test_split_part_names_must_match_split_metadata(split_parts: list[Path], tmp_path: Path) -> None:
    renamed = tmp_path / "whole.gguf"
    os.link(split_parts[0], renamed)
    _invalid(check_model_file(renamed), ProblemClass.SPLIT, "2-part split model", "-0000I-of-0000N")
    _invalid(
        check_model_file(split_parts[1], split_index=1, split_count=2),
        ProblemClass.SPLIT,
        "named as part 1 but its split.no says part 2",
    )
    _invalid(
        check_model_file(split_parts[0], split_index=1, split_count=3),
        ProblemClass.SPLIT,
        "named as one of 3 parts but its split.count says 2",
    )


def test_quantized_variant_from_llama_quantize(q8_model: Path) -> None:
    check = check_model_file(q8_model)
    assert check.ok, check.problem
    assert check.facts is not None
    assert check.facts.quantization == "Q8_0"
    assert check.facts.parameter_count == 134_515_008
    assert check.facts.context_length == 8192


def test_truncated_download(demo_model: Path, demo_data_offset: int, tmp_path: Path) -> None:
    size = demo_model.stat().st_size
    cut = size * 6 // 10
    message = _invalid(
        check_model_file(derive(demo_model, tmp_path / "cut.gguf", length=cut)),
        ProblemClass.TRUNCATED,
        f"but the file has {cut} bytes",
        "the download is incomplete",
    )
    assert message.startswith("truncated: tensor '")
    ends_at = int(message.split("ends at byte ")[1].split()[0])
    assert ends_at > cut
    # Missing only the last byte still fails; cut inside the header too.
    _invalid(
        check_model_file(derive(demo_model, tmp_path / "last.gguf", length=size - 1)), ProblemClass.TRUNCATED
    )
    _invalid(
        check_model_file(derive(demo_model, tmp_path / "head.gguf", length=demo_data_offset // 2)),
        ProblemClass.TRUNCATED,
        "the header runs past the end of the file",
    )
    _invalid(check_model_file(derive(demo_model, tmp_path / "tiny.gguf", length=3)), ProblemClass.TRUNCATED)


def test_bad_magic_and_version(demo_model: Path, tmp_path: Path) -> None:
    _invalid(
        check_model_file(derive(demo_model, tmp_path / "magic.gguf", patches={0: b"GGML"})),
        ProblemClass.NOT_GGUF,
        "instead of b'GGUF'",
    )
    for version, fragment in [
        (1, "version 1 is no longer supported"),
        (4, "unsupported GGUF version 4"),
        (0x03000000, "big-endian"),
    ]:
        patched = derive(demo_model, tmp_path / f"v{version}.gguf", patches={4: struct.pack("<I", version)})
        _invalid(check_model_file(patched), ProblemClass.UNSUPPORTED_VERSION, fragment)


def test_files_that_are_not_models(tmp_path: Path) -> None:
    empty = tmp_path / "empty.gguf"
    empty.touch()
    _invalid(check_model_file(empty), ProblemClass.EMPTY, "empty file (0 bytes)")
    text = tmp_path / "notes.gguf"
    text.write_text("these are my notes about the model\n" * 20)
    _invalid(check_model_file(text), ProblemClass.NOT_GGUF, "not a GGUF file")
    html = tmp_path / "page.gguf"
    html.write_text("<!DOCTYPE html><html><body>Sign in to download</body></html>")
    _invalid(check_model_file(html), ProblemClass.NOT_GGUF, "HTML page")
    lfs = tmp_path / "pointer.gguf"
    lfs.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 12345\n")
    _invalid(check_model_file(lfs), ProblemClass.NOT_GGUF, "Git LFS pointer")


def test_non_regular_files_are_never_opened(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.gguf"
    os.mkfifo(fifo)  # opening it for reading without O_NONBLOCK would wait for a writer forever
    _invalid(check_model_file(fifo), ProblemClass.NOT_REGULAR, "named pipe")
    folder = tmp_path / "folder.gguf"
    folder.mkdir()
    _invalid(check_model_file(folder), ProblemClass.NOT_REGULAR, "directory")
    _invalid(check_model_file(Path("/dev/zero")), ProblemClass.NOT_REGULAR, "character device")
    dangling = tmp_path / "dangling.gguf"
    dangling.symlink_to(tmp_path / "nowhere.gguf")
    _invalid(check_model_file(dangling), ProblemClass.BROKEN_LINK, "does not exist")
    loop_a, loop_b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    loop_a.symlink_to(loop_b)
    loop_b.symlink_to(loop_a)
    _invalid(check_model_file(loop_a), ProblemClass.BROKEN_LINK, "loop")


def _check_as_nobody(paths: list[Path]) -> list[tuple[str, str]]:
    """Runs check_model_file in a forked child that has dropped root for the `nobody` user."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        status = 1
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            lines = []
            for path in paths:
                check = check_model_file(path)
                problem = check.problem
                lines.append(
                    f"{problem.problem_class if problem else 'ok'}|{problem.message if problem else ''}"
                )
            os.write(write_end, "\n".join(lines).encode())
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        output = pipe.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, output
    return [tuple(line.split("|", 1)) for line in output.splitlines()]  # type: ignore[misc]


def test_unreadable_file(demo_model: Path, tmp_path: Path) -> None:
    """A file whose mode forbids reading. Root reads any file, so under root the check runs in a
    forked child that drops to the `nobody` user; a readable copy beside it proves the child can
    read files there at all."""
    folder = Path(tempfile.mkdtemp(prefix="lmc-unreadable-"))
    try:
        folder.chmod(0o755)
        locked = derive(demo_model, folder / "locked.gguf", length=4096)
        readable = derive(demo_model, folder / "readable.gguf", length=4096)
        locked.chmod(0)
        readable.chmod(0o644)
        if os.geteuid() == 0:
            (locked_class, locked_reason), (readable_class, _) = _check_as_nobody([locked, readable])
            assert locked_class == ProblemClass.UNREADABLE and "permission denied" in locked_reason
            assert readable_class == ProblemClass.TRUNCATED  # read, and found to be a 4 KiB stub
        else:
            _invalid(check_model_file(locked), ProblemClass.UNREADABLE, "permission denied")
            _invalid(check_model_file(readable), ProblemClass.TRUNCATED)
    finally:
        for child in folder.iterdir():
            child.chmod(0o644)
            child.unlink()
        folder.rmdir()


def test_small_written_models(tmp_path: Path) -> None:
    check = check_model_file(write_small_gguf(tmp_path / "tiny-F16.gguf"))
    assert check.ok, check.problem
    assert check.facts is not None and check.facts.quantization == "F16"
    no_type = check_model_file(write_small_gguf(tmp_path / "guess.gguf", file_type=None))
    assert no_type.facts is not None and no_type.facts.quantization == "F16"  # from the 2-D weights
    embed = check_model_file(write_small_gguf(tmp_path / "embed.gguf", arch="bert", chat_template=None))
    assert (
        embed.ok
        and embed.facts is not None
        and embed.facts.is_embedding
        and not embed.facts.has_chat_template
    )
    pooled = check_model_file(write_small_gguf(tmp_path / "pooled.gguf", arch="qwen3", pooling=True))
    assert pooled.ok and pooled.facts is not None and pooled.facts.is_embedding
    projector = check_model_file(write_small_gguf(tmp_path / "mmproj.gguf", arch="clip"), projector=True)
    assert projector.ok and projector.facts is not None and projector.facts.is_projector


def test_architecture_must_be_known(tmp_path: Path) -> None:
    path = write_small_gguf(tmp_path / "future.gguf", arch="llama99")
    _invalid(check_model_file(path), ProblemClass.ARCHITECTURE, "unknown architecture 'llama99'")
    assert check_model_file(path, architectures=KNOWN_ARCHITECTURES | {"llama99"}).ok


def test_required_metadata(tmp_path: Path) -> None:
    path = write_small_gguf(tmp_path / "noctx.gguf", context_length=None)
    _invalid(check_model_file(path), ProblemClass.METADATA, "'llama.context_length' is missing")
    no_arch = tmp_path / "noarch.gguf"
    no_arch.write_bytes(raw_header(metadata=[kv_string("general.name", "x")], pad_to=64))
    _invalid(check_model_file(no_arch), ProblemClass.METADATA, "general.architecture")


_BIG = 64 * 1024 * 1024  # sparse size: huge claims are checked against a real, large file
_ARCH = kv_string("general.architecture", "llama")


def _key(raw_type_and_value: bytes) -> list[bytes]:
    """Metadata with one entry "k" whose type and value bytes are given raw."""
    return [gguf_string("k") + raw_type_and_value]


def _one_tensor(name: str, shape: list[int], ggml_type: int, offset: int) -> bytes:
    return raw_header(tensor_count=1, metadata=[_ARCH], tensors=[tensor_info(name, shape, ggml_type, offset)],
                      pad_to=256)  # fmt: skip


_HOSTILE_HEADERS = [
    ("huge-string", raw_header(metadata=_key(struct.pack("<IQ", 8, 2**62))), _BIG,
     ProblemClass.CORRUPT, "claims 4611686018427387904 bytes"),
    ("string-past-end", raw_header(metadata=_key(struct.pack("<IQ", 8, 5000))), None,
     ProblemClass.TRUNCATED, "runs past the end of the file"),
    ("huge-array", raw_header(metadata=_key(struct.pack("<IIQ", 9, 8, 2**60))), _BIG,
     ProblemClass.CORRUPT, "elements"),
    ("many-strings", raw_header(metadata=_key(struct.pack("<IIQ", 9, 8, 10_000_000))), _BIG,
     ProblemClass.TRUNCATED, "runs past the end of the file"),
    ("some-tensors", raw_header(tensor_count=100_000), 4096, ProblemClass.TRUNCATED, "runs past the end"),
    ("nested-array", raw_header(metadata=_key(struct.pack("<IIQ", 9, 9, 1)), pad_to=64), None,
     ProblemClass.CORRUPT, "array of arrays"),
    ("bad-type", raw_header(metadata=_key(struct.pack("<I", 77)), pad_to=64), None,
     ProblemClass.CORRUPT, "unknown value type 77"),
    ("many-tensors", raw_header(tensor_count=2**40), _BIG, ProblemClass.CORRUPT, "tensors"),
    ("many-kv", raw_header(metadata_count=2**40), _BIG, ProblemClass.CORRUPT, "metadata entries"),
    ("duplicate-key", raw_header(metadata=[_ARCH, _ARCH], pad_to=128), None,
     ProblemClass.CORRUPT, "duplicate"),
    ("bad-utf8-key", raw_header(metadata=[gguf_string(b"\xff\xfe") + struct.pack("<IB", 0, 1)], pad_to=64),
     None, ProblemClass.CORRUPT, "UTF-8"),
    ("bad-alignment", raw_header(metadata=[_ARCH, kv_uint32("general.alignment", 48)], pad_to=128), None,
     ProblemClass.CORRUPT, "power of two"),
    ("five-dims", _one_tensor("t", [1] * 5, 0, 0), None, ProblemClass.TENSOR, "5 dimensions"),
    ("absurd-dims", _one_tensor("t", [2**40, 2**40], 0, 0), _BIG, ProblemClass.TENSOR, "impossible shape"),
    ("huge-dim", _one_tensor("t", [2**63 + 5], 0, 0), _BIG, ProblemClass.TENSOR, "impossible dimension"),
    ("unknown-type", _one_tensor("t", [32], 31, 0), None, ProblemClass.TENSOR, "ggml type 31"),
    ("partial-block", _one_tensor("t", [33], 2, 0), None,
     ProblemClass.TENSOR, "not a multiple of its block size"),
    ("long-name", _one_tensor("n" * 64, [4], 0, 0), None, ProblemClass.TENSOR, "at most 63"),
    ("misplaced", _one_tensor("t", [4], 0, 64), None, ProblemClass.TENSOR, "expected 0"),
    ("data-past-end", _one_tensor("t", [1024], 0, 0), None, ProblemClass.TRUNCATED, "ends at byte"),
    ("duplicate-tensor", raw_header(tensor_count=2, metadata=[_ARCH],
                                    tensors=[tensor_info("t", [8], 0, 0), tensor_info("t", [8], 0, 32)],
                                    pad_to=512), None, ProblemClass.CORRUPT, "duplicate tensor"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("data", "size", "problem_class", "fragment"),
    [case[1:] for case in _HOSTILE_HEADERS],
    ids=[case[0] for case in _HOSTILE_HEADERS],
)
def test_hostile_headers(
    tmp_path: Path, data: bytes, size: int | None, problem_class: ProblemClass, fragment: str
) -> None:
    path = tmp_path / "hostile.gguf"
    with path.open("wb") as out:
        out.write(data)
        if size is not None:
            out.truncate(size)
    _invalid(check_model_file(path), problem_class, fragment)


def test_limits_bound_the_work(demo_model: Path) -> None:
    tight = ValidationLimits(max_array_length=1000)
    check = check_model_file(demo_model, limits=tight)
    assert check.problem is not None and check.problem.problem_class == ProblemClass.LIMIT
    assert "tokenizer.ggml.tokens" in check.problem.message
    small_header = ValidationLimits(max_header_bytes=64 * 1024)
    check = check_model_file(demo_model, limits=small_header)
    assert check.problem is not None and "LMC_REGISTRY_MAX_HEADER_BYTES" in check.problem.message


def test_corrupted_headers_never_pass_as_valid_with_wrong_data(demo_model: Path, tmp_path: Path) -> None:
    """Random bytes of the real model's header structure are overwritten, one at a time, a few
    hundred times. Every outcome must be a clean verdict; a file still judged valid must have a
    tensor table that fits the file and that gguf's own reader reads the same way."""
    pristine = read_gguf_header(demo_model)
    subject = derive(demo_model, tmp_path / "fuzz.gguf")
    size = subject.stat().st_size
    structural = [
        *range(0, 4096),  # magic, version, counts, and the scalar metadata before the vocabulary
        *range(pristine.tensor_info_offset, pristine.data_offset),  # the tensor table
    ]
    rng = random.Random(20251124)
    outcomes = {"valid": 0, "invalid": 0}
    cross_checked = 0
    with subject.open("r+b") as handle:
        for _ in range(400):
            offset = rng.choice(structural)
            handle.seek(offset)
            original = handle.read(1)
            handle.seek(offset)
            handle.write(bytes([rng.randrange(256)]))
            handle.flush()
            check = check_model_file(subject)
            if check.problem is None:
                outcomes["valid"] += 1
                header = check.header
                assert header is not None and check.facts is not None
                assert check.facts.architecture in KNOWN_ARCHITECTURES
                end = header.data_offset
                for tensor in header.tensors:
                    assert tensor.data_offset >= end and tensor.data_offset + tensor.n_bytes <= size
                    end = tensor.data_offset + tensor.n_bytes
                if (
                    cross_checked < 3
                    and offset >= pristine.tensor_info_offset
                    and original != _byte_at(handle, offset)
                ):
                    reference = gguf.GGUFReader(subject)
                    assert [(t.name, t.data_offset, t.n_bytes) for t in header.tensors] == [
                        (t.name, t.data_offset, t.n_bytes) for t in reference.tensors
                    ]
                    cross_checked += 1
            else:
                outcomes["invalid"] += 1
                assert check.problem.message and check.problem.problem_class != ProblemClass.INTERNAL, (
                    offset,
                    check.problem.message,
                )
            handle.seek(offset)
            handle.write(original)
            handle.flush()
    assert outcomes["invalid"] > 50 and outcomes["valid"] > 0, outcomes
    assert cross_checked == 3  # gguf's reader confirmed three changed tensor tables judged valid
    assert check_model_file(subject).ok  # restored byte for byte
    for length in sorted(rng.sample(range(1, size), 40), reverse=True):  # every truncation is caught
        os.truncate(subject, length)
        check = check_model_file(subject)
        assert check.problem is not None and check.problem.problem_class == ProblemClass.TRUNCATED, length


def _byte_at(handle: object, offset: int) -> bytes:
    handle.seek(offset)  # type: ignore[attr-defined]
    return handle.read(1)  # type: ignore[attr-defined]


def test_file_modes_are_left_alone(demo_model: Path) -> None:
    before = demo_model.stat()
    check_model_file(demo_model)
    after = demo_model.stat()
    assert stat.S_IMODE(before.st_mode) == stat.S_IMODE(after.st_mode)
    assert before.st_mtime_ns == after.st_mtime_ns

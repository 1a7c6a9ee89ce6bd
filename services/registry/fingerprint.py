"""The full SHA-256 of a model's bytes, computed on request (it reads every byte)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

from services.registry.gguf_validation import open_regular_file

_CHUNK = 8 * 1024 * 1024


class FilesChangedError(Exception):
    """A file changed while it was being hashed, so the digest describes no real state of it."""


def full_sha256(paths: Sequence[Path]) -> str:
    """SHA-256 (hex) of the files' contents, concatenated in order.

    Raises GgufProblem (not a regular file, unreadable) or FilesChangedError.
    """
    digest = hashlib.sha256()
    for path in paths:
        fd, before = open_regular_file(path)
        try:
            offset = 0
            while chunk := os.pread(fd, _CHUNK, offset):
                digest.update(chunk)
                offset += len(chunk)
            after = os.fstat(fd)
        finally:
            os.close(fd)
        if (offset, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
            raise FilesChangedError(f"{path} changed while it was being hashed")
    return digest.hexdigest()

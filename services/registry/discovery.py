"""Finds the model files under the models folder and stats them, without opening any of them.

Rules (explicit because users make every kind of folder by hand):
- Visible `*.gguf` names only (see layout.py); hidden files and folders are skipped.
- Symbolic links are followed: a link to a file is a model under the link's own path; a link to a
  folder is walked once (folders are remembered by device and inode, so link loops end); a dangling
  or looping link named `*.gguf` is reported (and listed as INVALID), not silently dropped.
- A `*.gguf` that is not a regular file (named pipe, socket, device) is reported too; it is never
  opened, so a named pipe cannot block the scan. A folder named `*.gguf` is just a folder.
- Folders deeper than `max_depth` below the models folder are not walked.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path, PurePosixPath

from services.registry.gguf_validation import describe_file_type
from services.registry.layout import is_hidden, is_model_file_name

log = logging.getLogger(__name__)


class EntryKind(StrEnum):
    REGULAR = "regular"
    NOT_REGULAR = "not_regular"
    BROKEN_LINK = "broken_link"
    UNREADABLE = "unreadable"


@dataclass(frozen=True)
class FileSignature:
    """What changes when a file's bytes may have changed; equal signatures mean no re-validation."""

    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, info: os.stat_result) -> FileSignature:
        return cls(info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)


@dataclass(frozen=True)
class FoundFile:
    """One `*.gguf` entry under the models folder, as seen by stat (links followed)."""

    path: Path  # absolute, under the models folder, links not resolved
    rel: PurePosixPath
    kind: EntryKind
    signature: FileSignature | None  # None unless the entry could be stat'ed
    detail: str = ""  # why it is not a regular file

    @property
    def size(self) -> int:
        return self.signature.size if self.signature else 0

    @property
    def mtime_ns(self) -> int:
        return self.signature.mtime_ns if self.signature else 0


def relative_model_path(root: Path, path: Path) -> PurePosixPath | None:
    """`path` relative to `root` if it names a visible `*.gguf` inside it, else None."""
    try:
        rel = path.relative_to(root)
    except ValueError:
        return None
    parts = rel.parts
    if not parts or any(is_hidden(part) or not _is_utf8(part) for part in parts):
        return None
    if not is_model_file_name(parts[-1]):
        return None
    return PurePosixPath(*parts)


def stat_model_file(root: Path, path: Path, max_depth: int) -> FoundFile | None:
    """Stats one candidate file; None when it is gone or not a model file name."""
    rel = relative_model_path(root, path)
    if rel is None or len(rel.parts) - 1 > max_depth:
        return None
    try:
        info = os.stat(path)
    except FileNotFoundError:
        if not os.path.islink(path):
            return None
        return FoundFile(path, rel, EntryKind.BROKEN_LINK, None, _dangling_detail(path))
    except OSError as exc:
        return _stat_error(path, rel, exc)
    return _found(path, rel, info)


def scan_models_dir(root: Path, max_depth: int, start: Path | None = None) -> dict[Path, FoundFile]:
    """Every model file under `start` (default: the whole folder), keyed by absolute path."""
    start = root if start is None else start
    found: dict[Path, FoundFile] = {}
    try:
        rel_start = start.relative_to(root)
    except ValueError:
        return found
    if any(is_hidden(part) for part in rel_start.parts):
        return found
    visited: set[tuple[int, int]] = set()
    stack: list[tuple[Path, int]] = [(start, len(rel_start.parts))]
    while stack:
        folder, depth = stack.pop()
        try:
            info = os.stat(folder)
        except OSError:
            continue
        if (info.st_dev, info.st_ino) in visited:
            continue
        visited.add((info.st_dev, info.st_ino))
        try:
            with os.scandir(folder) as entries:
                listing = list(entries)
        except (PermissionError, NotADirectoryError, FileNotFoundError) as exc:
            if folder == root:
                log.warning("cannot list the models folder %s: %s", folder, exc)
            else:
                log.warning("skipping folder %s: %s", folder, exc)
            continue
        except OSError as exc:
            log.warning("skipping folder %s: %s", folder, exc)
            continue
        for entry in listing:
            name = entry.name
            if is_hidden(name):
                continue
            if not _is_utf8(name):
                log.warning("skipping %r under %s: its name is not valid UTF-8", name, folder)
                continue
            path = Path(entry.path)
            if _is_dir(entry):
                if depth < max_depth:
                    stack.append((path, depth + 1))
                continue
            if not is_model_file_name(name):
                continue
            rel = PurePosixPath(*path.relative_to(root).parts)
            try:
                file_info = entry.stat(follow_symlinks=True)
            except FileNotFoundError:
                found[path] = FoundFile(path, rel, EntryKind.BROKEN_LINK, None, _dangling_detail(path))
                continue
            except OSError as exc:
                found[path] = _stat_error(path, rel, exc)
                continue
            found[path] = _found(path, rel, file_info)
    return found


def _is_utf8(name: str) -> bool:
    """False for names that held undecodable bytes (Python keeps them as lone surrogates)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _is_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir(follow_symlinks=True)
    except OSError:
        return False


def _found(path: Path, rel: PurePosixPath, info: os.stat_result) -> FoundFile:
    signature = FileSignature.of(info)
    if stat.S_ISREG(info.st_mode):
        return FoundFile(path, rel, EntryKind.REGULAR, signature)
    return FoundFile(
        path,
        rel,
        EntryKind.NOT_REGULAR,
        signature,
        f"not a regular file ({describe_file_type(info.st_mode)})",
    )


def _dangling_detail(path: Path) -> str:
    try:
        target = os.readlink(path)
    except OSError:
        target = "?"
    return f"broken symbolic link: its target {target!r} does not exist"


def _stat_error(path: Path, rel: PurePosixPath, exc: OSError) -> FoundFile:
    if exc.errno == errno.ELOOP:
        return FoundFile(path, rel, EntryKind.BROKEN_LINK, None, "broken symbolic link: it points in a loop")
    if isinstance(exc, PermissionError):
        return FoundFile(path, rel, EntryKind.UNREADABLE, None, "unreadable: permission denied")
    return FoundFile(path, rel, EntryKind.UNREADABLE, None, f"unreadable: {exc.strerror or exc}")

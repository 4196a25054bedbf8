"""Atomic file writes (a temp file in the target folder, fsync, then rename) and safetensors headers.

A crash, Ctrl-C or full disk mid-write leaves the old file (or none), never a torn one.
Every file the project writes (LoRAs, state, caches, configs, images) goes through here.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from .errors import OutputError, ZTurboError


class DiskFullError(ZTurboError):
    """No space left while writing; the previous file is untouched."""


@functools.cache
def umask() -> int:
    """The process umask, read once: Linux shows it in /proc; elsewhere one set-and-restore at first use
    (os.umask has no read-only form and is process-wide, so it is swapped once, not per file)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def as_created(path: Path) -> Path:
    """Give a mkstemp/mkdtemp path (owner-only) the mode open()/mkdir() would have given it under the umask,
    so files and folders we rename into place are readable by whoever the user's umask lets read them."""
    try:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask())
    except PermissionError:  # file systems without Unix modes (FAT, some network mounts): keep what they give
        pass
    return path


def temp_dir(prefix: str, parent: Path) -> Path:
    """A new temp folder in `parent` (created if needed) with the umask's mode, for building an output to rename."""
    parent.mkdir(parents=True, exist_ok=True)
    return as_created(Path(tempfile.mkdtemp(prefix=prefix, dir=parent)))


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success it replaces `path` atomically, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        as_created(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno == errno.ENOSPC:
            raise DiskFullError(
                f"disk full while writing {path}; free space on {path.parent} and run again "
                f"(the previous {path.name}, if any, is intact)"
            ) from None
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_with(path: str | Path, writer: Callable[[Path], Any]) -> Path:
    """Atomically write `path` by calling `writer(temp_path)`."""
    with atomic_path(path) as tmp:
        writer(tmp)
    return Path(path)


def write_bytes(path: str | Path, data: bytes) -> Path:
    return write_with(path, lambda tmp: tmp.write_bytes(data))


def write_text(path: str | Path, text: str) -> Path:
    return write_with(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: str | Path, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def save_safetensors(path: str | Path, tensors: dict, metadata: dict[str, str] | None = None) -> Path:
    """Atomically write a safetensors file (tensors made contiguous, metadata as strings)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    meta = {k: str(v) for k, v in (metadata or {}).items()}
    return write_with(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def append_line(path: str | Path, line: str) -> None:
    """Append one line (metrics.jsonl); a torn last line is the worst a crash can do, and readers skip it."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(line.rstrip("\n") + "\n")
        handle.flush()


def safetensors_header(path: str | Path) -> tuple[int, dict[str, Any]]:
    """(header length in bytes, header JSON) of a safetensors file: the 8-byte length, then the JSON; no tensor read.

    safe_open gives tensors and metadata but not shapes without reading, nor the header size."""
    with open(path, "rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        return size, json.loads(handle.read(size))


def header_entries(files: Iterable[Path]) -> dict[str, tuple[tuple[int, ...], str]]:
    """{tensor name: (shape, dtype)} from safetensors headers alone: no tensor is read."""
    entries = {}
    for path in files:
        for key, value in safetensors_header(path)[1].items():
            if key != "__metadata__":
                entries[key] = (tuple(value["shape"]), value["dtype"])
    return entries


def safetensors_data_bytes(path: Path) -> int:
    """Bytes of tensor data in a safetensors file (its size minus the header): what an index's total_size sums."""
    return path.stat().st_size - 8 - safetensors_header(path)[0]


def check_writable(path: Path, what: str) -> None:
    """Refuse an output location this process cannot write, before any work: one line naming the path.

    The test is a real write (a temp file made and removed in the folder, or in the nearest
    existing folder above it, where it would be created): permission bits, read-only mounts,
    ACLs and root all answer as they will for the real files. Nothing is left behind.
    """
    path = Path(path).expanduser()
    existing = path
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        where = "it is a file" if existing == path else f"{existing} is a file, not a folder"
        raise OutputError(f"{what} {path} cannot be a folder: {where}; choose another path")
    try:
        handle, probe = tempfile.mkstemp(prefix=".zturbo-write-test-", dir=existing)
    except OSError as exc:
        where = "" if existing == path else f" (it would be created in {existing})"
        raise OutputError(
            f"{what} {path} is not writable{where}: {exc.strerror or exc}; choose a folder you can "
            f"write to, or fix its permissions"
        ) from None
    os.close(handle)
    os.unlink(probe)

"""`zturbo download`: Z-Image Turbo and the training adapter from the Hub, resumable and verified.

Where things go (the loader and the adapter loader look there):
  <ZTURBO_HOME>/models/<owner>--<name>/   the model (`loader.download_dir`; `--dir` picks another folder)
  <ZTURBO_HOME>/models/ostris--zimage_turbo_training_adapter/zimage_turbo_training_adapter_v2.safetensors
  <folder>/zturbo.json                     what was fetched: repo, commit, per-file hash and size, bf16
  <folder>/.zturbo/partial/                partial files of an interrupted run, resumed by the next one

Why not `snapshot_download`: in huggingface_hub 2.x an interrupted file is written to a
process-unique temp file that is deleted on failure, so a dropped 10 GB shard starts over.
Here every file goes through huggingface_hub's own pieces (model_info, get_hf_file_metadata,
http_get, its auth headers, endpoint and offline switch) into a partial file named by the
file's hash, so the next run resumes it with an HTTP Range request and a changed file never
resumes wrong bytes. Bytes are hashed as they arrive and checked against the size and hash
(sha256 for LFS files, git blob sha1 otherwise) the Hub lists before the file is moved into
place. model_index.json is moved in last, so the loader never takes a half-written folder
for a model. The token is only handed to huggingface_hub; it is never printed or written.
"""

from __future__ import annotations

import errno
import hashlib
import inspect
import json
import os
import re
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Protocol
from urllib.parse import urlparse

from . import __version__
from .config import ADAPTER_ALIASES, ADAPTER_REPO, TURBO_REPO
from .errors import AdapterError, DownloadError
from .fileio import atomic_path, write_json
from .loader import PIPELINE_CLASSES, download_dir

MANIFEST = "zturbo.json"
STAGING = ".zturbo"
MODEL_INDEX = "model_index.json"
BF16_PARTS = ("transformer",)  # parts `--bf16` rewrites; the text encoder ships as bf16 already
WEIGHT_SUFFIX = ".safetensors"
CONFIG_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken")
# diffusers weight variants (fp16 copies and the like) duplicate the main weights: never fetched.
VARIANT = re.compile(r"\.(fp16|bf16|fp32|fp8\w*|int8|int4|nf4)[.-]")
TO_BF16 = {"F64", "F32", "F16"}
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
               "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
LOGIN_HINT = ("log in with `hf auth login` (older huggingface_hub: `huggingface-cli login`), set HF_TOKEN "
              "or pass --token")
_NETWORK_ERRORS = {"ConnectError", "ConnectTimeout", "ReadTimeout", "WriteTimeout", "PoolTimeout",
                   "TimeoutException", "RemoteProtocolError", "ReadError", "NetworkError",
                   "ConnectionError", "Timeout", "ProxyError"}


# ---------------------------------------------------------------- results and progress


@dataclass(frozen=True)
class RemoteFile:
    """One file as the Hub lists it: size and hash (sha256 for LFS files, git blob sha1 otherwise)."""

    path: str
    size: int | None
    oid: str | None


@dataclass
class FileResult:
    """What happened to one file: fetched, resumed, present, converted (to bf16) or adopted (hashed in place)."""

    path: str
    size: int
    action: str


@dataclass
class DownloadResult:
    """One repo's outcome, for the summary table and for scripts."""

    what: str
    repo: str
    folder: Path
    commit: str | None
    files: list[FileResult] = field(default_factory=list)
    fetched_bytes: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def changed(self) -> bool:
        """False when the run found everything in place and wrote nothing."""
        return any(f.action != "present" for f in self.files)


class Reporter(Protocol):
    """Progress sink: one current item (a file or a conversion) plus the bytes fetched overall."""

    def begin(self, label: str, total: int | None, done: int = 0) -> None: ...
    def update(self, done: int) -> None: ...
    def end(self) -> None: ...
    def grow_overall(self, total: int) -> None: ...


class _NoReporter:
    def begin(self, label: str, total: int | None, done: int = 0) -> None: ...
    def update(self, done: int) -> None: ...
    def end(self) -> None: ...
    def grow_overall(self, total: int) -> None: ...


class RichReporter:
    """rich progress bars with sizes, speed and ETA: the current file and the total fetched."""

    def __init__(self, progress: Any) -> None:
        self.progress = progress
        self.overall = progress.add_task("total", total=0, visible=False)
        self.task: Any = None
        self.counts_overall = False
        self.last = 0

    def grow_overall(self, total: int) -> None:
        task = self.progress.tasks[self.overall]
        self.progress.update(self.overall, total=(task.total or 0) + total, visible=True)

    def begin(self, label: str, total: int | None, done: int = 0) -> None:
        self.task = self.progress.add_task(label, total=total, completed=done)
        self.counts_overall = not label.startswith("bf16 ")
        self.last = done

    def update(self, done: int) -> None:
        if self.task is None:
            return
        self.progress.update(self.task, completed=done)
        if self.counts_overall:
            self.progress.advance(self.overall, done - self.last)
        self.last = done

    def end(self) -> None:
        if self.task is not None:
            self.progress.remove_task(self.task)
        self.task = None


@contextmanager
def rich_reporter(console: Any, enabled: bool = True) -> Iterator[Reporter]:
    """A Reporter drawing on `console` (stderr in the CLI); a silent one when not enabled."""
    if not enabled:
        yield _NoReporter()
        return
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                               TransferSpeedColumn)

    columns = (TextColumn("{task.description}", markup=False), BarColumn(), DownloadColumn(),
               TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        yield RichReporter(progress)


# ---------------------------------------------------------------- the Hub, through huggingface_hub


def hub_endpoint() -> str:
    """HF_ENDPOINT read now (so a mirror set after import still counts), else huggingface_hub's default."""
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def offline() -> bool:
    """huggingface_hub's offline switch (HF_HUB_OFFLINE), which also blocks its requests."""
    from huggingface_hub import constants

    return bool(constants.is_offline_mode())


@dataclass
class Hub:
    """One repo on one endpoint; `token=None` lets huggingface_hub use HF_TOKEN or the saved login."""

    repo: str
    endpoint: str
    token: str | None = None

    def listing(self, revision: str | None) -> tuple[str, list[RemoteFile]]:
        """The commit a revision points at and every file with its size and hash."""
        from huggingface_hub import HfApi

        api = HfApi(endpoint=self.endpoint, token=self.token, library_name="zturbo-train",
                    library_version=__version__)
        try:
            info = api.model_info(self.repo, revision=revision, files_metadata=True)
        except Exception as exc:  # noqa: BLE001 - every failure becomes one DownloadError
            raise self.error(exc, revision) from None
        files = [RemoteFile(s.rfilename, s.lfs.size if s.lfs else s.size, s.lfs.sha256 if s.lfs else s.blob_id)
                 for s in info.siblings or []]
        if not info.sha:
            raise DownloadError(f"{self.endpoint} listed {self.repo} without a commit hash; it does not behave like "
                                f"the Hugging Face Hub, check HF_ENDPOINT")
        return info.sha, files

    def fetch(self, remote: RemoteFile, commit: str, part: Path, reporter: Reporter) -> tuple[int, int]:
        """Stream a file into `part`, resuming what it holds; verify it. Returns (bytes transferred, size)."""
        from huggingface_hub import get_hf_file_metadata, hf_hub_url
        from huggingface_hub.file_download import http_get
        from huggingface_hub.utils import build_hf_headers

        url = hf_hub_url(self.repo, remote.path, revision=commit, endpoint=self.endpoint)
        try:
            meta = get_hf_file_metadata(url, token=self.token, endpoint=self.endpoint,
                                        library_name="zturbo-train", library_version=__version__)
        except Exception as exc:  # noqa: BLE001
            raise self.error(exc, commit, remote.path) from None
        oid, size = remote.oid or meta.etag, remote.size if remote.size is not None else meta.size
        if remote.oid and meta.etag and meta.etag != remote.oid:
            raise DownloadError(f"the Hub lists {remote.path} of {self.repo} with hash {remote.oid[:12]} but serves "
                                f"{meta.etag[:12]}; run again (the repo may have changed during the download)")
        headers = build_hf_headers(token=self.token, library_name="zturbo-train", library_version=__version__)
        if urlparse(meta.location).netloc != urlparse(url).netloc:
            headers.pop("authorization", None)  # a CDN gets a signed URL, never the token
        have = _partial_size(part, size)
        reporter.begin(remote.path, size, have)
        try:
            with open(part, "r+b" if have else "wb") as handle:
                handle.seek(have)
                writer = HashingWriter(handle, oid, size, reporter)
                http_get(meta.location, writer, resume_size=have, headers=headers, expected_size=size,
                         displayed_filename=remote.path, **_silent_bar(http_get))
                handle.flush()
                os.fsync(handle.fileno())
                digest = writer.hexdigest(part)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise DownloadError(f"disk full while downloading {remote.path} into {part.parent}; free some space "
                                    f"and run again (the {part.stat().st_size} bytes so far are kept and resumed)") from None
            raise self.error(exc, commit, remote.path) from None
        except Exception as exc:  # noqa: BLE001
            raise self.error(exc, commit, remote.path) from None
        finally:
            reporter.end()
        _verify(part, remote.path, oid, size, digest)
        return part.stat().st_size - have, part.stat().st_size

    def error(self, exc: Exception, revision: str | None, path: str | None = None) -> DownloadError:
        """One line for a failed Hub call: what, why, and what to do next (never the token)."""
        from huggingface_hub.errors import OfflineModeIsEnabled

        error = DownloadError(_scrub(_describe_hub_error(exc, self.repo, self.endpoint, revision, path), self.token))
        error.unreachable = isinstance(exc, OfflineModeIsEnabled) or _is_network_error(exc)  # type: ignore[attr-defined]
        return error


def _describe_hub_error(exc: Exception, repo: str, endpoint: str, revision: str | None, path: str | None) -> str:
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, HFValidationError, OfflineModeIsEnabled,
                                        RemoteEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError)

    page = f"{endpoint}/{repo}"
    status = getattr(getattr(exc, "response", None), "status_code", None)
    what = f"{repo}/{path}" if path else repo
    if isinstance(exc, HFValidationError):
        return f"{repo!r} is not a Hub repo id; use owner/name, e.g. {TURBO_REPO}"
    if isinstance(exc, OfflineModeIsEnabled):
        return f"offline mode is on (HF_HUB_OFFLINE=1), so {what} cannot be fetched; unset HF_HUB_OFFLINE to download"
    if isinstance(exc, GatedRepoError):
        return (f"{repo} is gated and this account has no access to {what} yet ({status} unauthorised): accept the "
                f"licence on {page} while logged in, then {LOGIN_HINT}")
    if status in (401, 403):
        return (f"not authorised to download {what} ({status} from {endpoint}): the repo is private or gated, does "
                f"not exist, or the token is missing or invalid; check the id, accept the licence on {page} while "
                f"logged in, then {LOGIN_HINT}")
    if isinstance(exc, RevisionNotFoundError):
        return f"revision {revision!r} does not exist in {repo}; pass --revision with a branch, tag or commit of {page}"
    if isinstance(exc, RemoteEntryNotFoundError):
        return f"{path} is not in {repo} at {revision}; check the file name on {page}"
    if isinstance(exc, RepositoryNotFoundError) or status == 404:
        return (f"repository {repo} was not found on {endpoint} (404); check the id (the model is {TURBO_REPO}), "
                f"or if it is private, {LOGIN_HINT}")
    if _is_network_error(exc):
        return (f"cannot reach the Hub at {endpoint} ({type(exc).__name__}: {_first_line(exc)}); check the network, "
                f"proxy or HF_ENDPOINT and run again: finished files are kept and partial ones resume")
    if isinstance(exc, HfHubHTTPError) and status is not None:
        return (f"the Hub answered {status} for {what}; try again later: finished files are kept and partial ones "
                f"resume")
    return f"downloading {what} failed: {type(exc).__name__}: {_first_line(exc)}"


def _is_network_error(exc: BaseException) -> bool:
    """Connection refused, DNS, timeouts, dropped streams: by class name, across httpx / requests versions."""
    return any(cls.__name__ in _NETWORK_ERRORS for cls in type(exc).__mro__)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:200]


def _scrub(text: str, token: str | None) -> str:
    """Belt and braces: no message of ours may carry the token, whichever way it came in."""
    from huggingface_hub import get_token

    try:
        implicit = get_token()
    except Exception:  # noqa: BLE001 - a broken login must not hide the real error
        implicit = None
    for secret in {token, implicit}:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return text


class _SilentBar:
    """huggingface_hub's own bar is replaced by ours (the HashingWriter reports the bytes)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None: ...
    def __enter__(self) -> "_SilentBar": return self
    def __exit__(self, *exc: Any) -> None: ...
    def update(self, n: Any = 1) -> None: ...
    def close(self) -> None: ...


def _silent_bar(http_get: Any) -> dict[str, Any]:
    """Pass our silent bar where this huggingface_hub's http_get takes one."""
    return {"tqdm_class": _SilentBar} if "tqdm_class" in inspect.signature(http_get).parameters else {}


# ---------------------------------------------------------------- hashing and verification


class HashingWriter:
    """A file wrapper for http_get: hashes and reports bytes as they arrive, so verifying needs no second read.

    A resumed file first hashes the bytes it already holds. If http_get rewinds (a server that
    ignored the Range request), the digest is recomputed from disk at the end instead.
    """

    def __init__(self, handle: BinaryIO, oid: str | None, size: int | None, reporter: Reporter) -> None:
        self.handle, self.reporter = handle, reporter
        self.hasher = _hasher(oid, size)
        self.rewound = self.hasher is None
        start = handle.tell()
        if self.hasher is not None and start:
            handle.seek(0)
            _hash_stream(handle, self.hasher, start)
            handle.seek(start)

    def write(self, data: bytes) -> int:
        written = self.handle.write(data)
        if self.hasher is not None:
            self.hasher.update(data)
        self.reporter.update(self.handle.tell())
        return written

    def tell(self) -> int:
        return self.handle.tell()

    def seek(self, offset: int, whence: int = 0) -> int:
        self.rewound = True
        return self.handle.seek(offset, whence)

    def truncate(self, size: int | None = None) -> int:
        self.rewound = True
        return self.handle.truncate(size)

    def flush(self) -> None:
        self.handle.flush()

    def hexdigest(self, path: Path) -> str | None:
        if self.rewound or self.hasher is None:
            return None  # recomputed from disk by _verify
        return self.hasher.hexdigest()


def _hasher(oid: str | None, size: int | None) -> Any:
    """sha256 for LFS files (64 hex digits); git's blob sha1 (40) needs the size up front."""
    if oid and len(oid) == 64:
        return hashlib.sha256()
    if oid and len(oid) == 40 and size is not None:
        h = hashlib.sha1()
        h.update(b"blob %d\0" % size)
        return h
    return None


def _hash_stream(handle: BinaryIO, hasher: Any, limit: int | None = None) -> None:
    left = limit
    while left is None or left > 0:
        block = handle.read(8 << 20 if left is None else min(8 << 20, left))
        if not block:
            break
        hasher.update(block)
        if left is not None:
            left -= len(block)


def file_oid(path: Path, like: str) -> str | None:
    """The hash of a local file in the same kind the Hub uses for `like` (sha256 or git blob sha1)."""
    hasher = _hasher(like, path.stat().st_size)
    if hasher is None:
        return None
    with open(path, "rb") as handle:
        _hash_stream(handle, hasher)
    return hasher.hexdigest()


def _verify(part: Path, name: str, oid: str | None, size: int | None, digest: str | None) -> None:
    """Size and hash must be what the Hub lists; a bad file is removed so the next run fetches it fresh."""
    actual = part.stat().st_size
    if size is not None and actual != size:
        part.unlink(missing_ok=True)
        raise DownloadError(f"{name} arrived with {actual} bytes, the Hub lists {size}; the partial file was removed, "
                            f"run again to fetch it fresh")
    if oid is None:
        return
    digest = digest or file_oid(part, oid)
    if digest is not None and digest != oid:
        part.unlink(missing_ok=True)
        raise DownloadError(f"{name} failed its hash check (got {digest[:12]}, the Hub lists {oid[:12]}); the file "
                            f"was removed, run again to fetch it fresh")


def _partial_size(part: Path, size: int | None) -> int:
    """Bytes an earlier run left in `part` (0 if none or more than the file can hold)."""
    part.parent.mkdir(parents=True, exist_ok=True)
    have = part.stat().st_size if part.is_file() else 0
    if size is not None and have > size:
        part.unlink()
        return 0
    return have


# ---------------------------------------------------------------- the folder and its manifest


def read_manifest(folder: str | Path) -> dict[str, Any] | None:
    """The zturbo.json a download wrote into `folder` (None when there is none)."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise DownloadError(f"{path} is not valid JSON; delete it and run `zturbo download` again "
                            f"(files are re-checked by hash, not fetched again)") from None
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        raise DownloadError(f"{path} is not a zturbo download record; delete it or pick another folder with --dir")
    return data


def stored_dtype(folder: str | Path, part: str) -> str | None:
    """The dtype a download rewrote `part` to (e.g. "bf16" after --bf16), or None if stored as published."""
    manifest = read_manifest(folder) or {}
    return (manifest.get("dtype") or {}).get(part)


def _new_manifest(repo: str) -> dict[str, Any]:
    return {"format": 1, "repo": repo, "tool": f"zturbo-train {__version__}", "files": {}, "dtype": {}}


def _save(folder: Path, manifest: dict[str, Any]) -> None:
    manifest["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    write_json(folder / MANIFEST, manifest)


def _record(folder: Path, manifest: dict[str, Any], remote: RemoteFile, dtype: str | None = None) -> None:
    """Remember a verified file by the Hub's hash and our size and mtime, so later runs skip it without hashing."""
    stat = (folder / remote.path).stat()
    entry = {"oid": remote.oid, "size": remote.size, "local_size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    if dtype:
        entry["dtype"] = dtype
    manifest["files"][remote.path] = entry
    _save(folder, manifest)


def _present(folder: Path, manifest: dict[str, Any], remote: RemoteFile) -> bool:
    """A file is in place when it matches what we recorded for the Hub's current hash."""
    entry = manifest["files"].get(remote.path)
    local = folder / remote.path
    if entry is None or entry.get("oid") != remote.oid or not local.is_file():
        return False
    stat = local.stat()
    return stat.st_size == entry.get("local_size") and stat.st_mtime_ns == entry.get("mtime_ns")


def _adoptable(folder: Path, remote: RemoteFile) -> bool:
    """A file we did not record (another tool's download, a lost zturbo.json) counts if its hash matches."""
    local = folder / remote.path
    if not local.is_file() or remote.oid is None or (remote.size is not None and local.stat().st_size != remote.size):
        return False
    return file_oid(local, remote.oid) == remote.oid


def open_folder(folder: Path, repo: str) -> dict[str, Any] | None:
    """Refuse a path that is a file or a folder holding another repo's download."""
    if folder.exists() and not folder.is_dir():
        raise DownloadError(f"{folder} is a file, not a folder; pass --dir with a folder for the download")
    manifest = read_manifest(folder) if folder.is_dir() else None
    if manifest is not None and manifest.get("repo") != repo:
        raise DownloadError(f"{folder} holds a download of {manifest.get('repo')}, not {repo}; "
                            f"pick another folder with --dir or delete that one")
    return manifest


def check_foreign(folder: Path, repo: str, remote: list[RemoteFile]) -> None:
    """Without our zturbo.json, a non-empty folder may only hold names from the repo itself."""
    if not folder.is_dir() or (folder / MANIFEST).is_file():
        return
    allowed = {f.path.split("/")[0] for f in remote} | {MANIFEST, STAGING, ".cache"}
    foreign = sorted(p.name for p in folder.iterdir() if p.name not in allowed)
    if foreign:
        raise DownloadError(f"{folder} already holds other files ({', '.join(foreign[:3])}) and is not a download of "
                            f"{repo}; choose an empty or new folder with --dir, or empty that one")


def _partial_path(folder: Path, remote: RemoteFile) -> Path:
    """Named by the file's hash, so a file changed on the Hub never resumes from stale bytes."""
    tag = (remote.oid or "nohash")[:16]
    return folder / STAGING / "partial" / f"{remote.path}.{tag}.part"


def _commit(part: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(part, dest)


def _free_space(folder: Path) -> int:
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def check_disk(folder: Path, steps: list[tuple[int, int, int]], bf16_hint: bool) -> None:
    """Refuse to start when the peak of the writes ahead exceeds the free space, from the Hub's sizes.

    Each step is (bytes added, temporary bytes while it runs, bytes freed after): a fetch adds
    the missing part of a file; a bf16 conversion needs half the shard while it writes and
    frees half once the fp32 shard is replaced.
    """
    running = peak = 0
    for added, temporary, freed in steps:
        running += added
        peak = max(peak, running + temporary)
        running -= freed
    free = _free_space(folder)
    if peak > free:
        from rich.filesize import decimal

        hint = "; or pass --bf16 to store the transformer at half the size" if bf16_hint else ""
        raise DownloadError(f"not enough disk space for the download into {folder}: it needs {decimal(peak)} more "
                            f"but only {decimal(free)} is free; free some space or pick another disk with --dir{hint}")


# ---------------------------------------------------------------- bf16 shards, bounded memory


def convert_to_bf16(path: Path, reporter: Reporter | None = None) -> int:
    """Rewrite one safetensors file in place with its float tensors as bf16; returns the new size.

    Streams one tensor at a time (read through safe_open's memory map, written straight into
    the new file), so memory stays at the largest tensor, not the shard. The new file replaces
    the old one atomically only once it is complete and re-opens as safetensors.
    """
    import torch
    from safetensors import safe_open

    reporter = reporter or _NoReporter()
    with safe_open(str(path), framework="pt") as src:
        keys = sorted(src.keys())
        header, total = _bf16_header(src, keys, path)
        blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
        blob += b" " * (-len(blob) % 8)
        reporter.begin(f"bf16 {path.parent.name}/{path.name}", total)
        try:
            with atomic_path(path) as tmp, open(tmp, "wb") as out:
                out.write(len(blob).to_bytes(8, "little"))
                out.write(blob)
                for key in keys:
                    tensor = src.get_tensor(key)
                    if header[key]["dtype"] == "BF16":
                        tensor = tensor.to(torch.bfloat16)
                    out.write(_raw_bytes(tensor))
                    reporter.update(header[key]["data_offsets"][1])
                out.flush()
                _check_safetensors(tmp, header)
        finally:
            reporter.end()
    return path.stat().st_size


def _bf16_header(src: Any, keys: list[str], path: Path) -> tuple[dict[str, Any], int]:
    """The safetensors header of the converted file, from shapes and dtypes alone (nothing loaded)."""
    header: dict[str, Any] = {}
    offset = 0
    for key in keys:
        piece = src.get_slice(key)
        dtype = "BF16" if piece.get_dtype() in TO_BF16 else piece.get_dtype()
        if dtype not in DTYPE_BYTES:
            raise DownloadError(f"cannot convert {path} to bf16: tensor {key} has dtype {dtype}; "
                                f"download without --bf16")
        shape = list(piece.get_shape())
        count = 1
        for dim in shape:
            count *= dim
        header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + count * DTYPE_BYTES[dtype]]}
        offset += count * DTYPE_BYTES[dtype]
    metadata = src.metadata()
    if metadata:
        header["__metadata__"] = metadata
    return header, offset


def _raw_bytes(tensor: Any) -> memoryview:
    """A tensor's little-endian bytes as safetensors stores them."""
    import torch

    flat = tensor.detach().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def _check_safetensors(path: Path, header: dict[str, Any]) -> None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as check:
        keys = set(check.keys())
    if keys != {k for k in header if k != "__metadata__"}:
        raise DownloadError(f"the bf16 copy of {path.name} came out wrong; run `zturbo download --bf16` again")


def safetensors_data_bytes(path: Path) -> int:
    """Bytes of tensor data in a safetensors file (file size minus its header): an index's total_size."""
    with open(path, "rb") as handle:
        header_len = int.from_bytes(handle.read(8), "little")
    return path.stat().st_size - 8 - header_len


def _rewrite_index(folder: Path, index: str, shards: list[str]) -> None:
    """After --bf16 the shard names stay; the index's total_size follows the new data size."""
    path = folder / index
    data = json.loads(path.read_text(encoding="utf-8"))
    data.setdefault("metadata", {})["total_size"] = sum(safetensors_data_bytes(folder / s) for s in shards)
    write_json(path, data)


# ---------------------------------------------------------------- which files


def wanted(path: str, parts: set[str] | None = None) -> bool:
    """Files the trainer loads: model_index.json, and per part its configs, tokenizer files and safetensors.

    Skipped: READMEs, images, .bin/.pth/.ckpt/.onnx/.gguf, weight variants (fp16 copies),
    indexes of other formats, nested folders and parts model_index.json does not name.
    """
    if path == MODEL_INDEX:
        return True
    pieces = path.split("/")
    if len(pieces) != 2 or pieces[0].startswith(".") or (parts is not None and pieces[0] not in parts):
        return False
    name = pieces[1]
    if VARIANT.search(name):
        return False
    if name.endswith(".index.json"):
        return name.endswith(WEIGHT_SUFFIX + ".index.json")
    return name.endswith(WEIGHT_SUFFIX) or name.endswith(CONFIG_SUFFIXES)


def pipeline_parts(index: dict[str, Any]) -> set[str]:
    """Parts model_index.json names with a class (entries like `"vae": ["diffusers", "AutoencoderKL"]`)."""
    return {k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v and v[0] is not None}


def prune_shards(folder: Path, files: list[RemoteFile]) -> list[RemoteFile]:
    """Where a part has a safetensors index, keep only the shards it lists (no consolidated duplicate)."""
    listed: dict[str, set[str]] = {}
    for f in files:
        if f.path.endswith(WEIGHT_SUFFIX + ".index.json"):
            part = f.path.split("/")[0]
            weight_map = json.loads((folder / f.path).read_text(encoding="utf-8")).get("weight_map", {})
            listed.setdefault(part, set()).update(f"{part}/{name}" for name in weight_map.values())
    names = {f.path for f in files}
    for part, shards in listed.items():
        missing = sorted(shards - names)
        if missing:
            raise DownloadError(f"{part}'s index lists {missing[0]}, which the repo does not hold; the repo is "
                                f"incomplete at this revision, try another --revision")
    return [f for f in files if not f.path.endswith(WEIGHT_SUFFIX) or f.path.split("/")[0] not in listed
            or f.path in listed[f.path.split("/")[0]]]


# ---------------------------------------------------------------- one job: a repo into a folder


@dataclass
class _Job:
    """Fetching a set of files of one repo commit into one folder, recording each as it lands."""

    hub: Hub
    folder: Path
    commit: str
    manifest: dict[str, Any]
    reporter: Reporter
    result: DownloadResult

    def ensure(self, remote: RemoteFile, counted: bool = False) -> None:
        """Make `remote` present: already recorded, adopted by hash, or fetched (resuming) and verified."""
        if _present(self.folder, self.manifest, remote):
            self._done(remote, "present")
            return
        if _adoptable(self.folder, remote):
            _record(self.folder, self.manifest, remote)
            self._done(remote, "present")
            return
        self.unpublish()
        resumed = self.fetch_to(remote, self.folder / remote.path, counted)
        _record(self.folder, self.manifest, remote)
        self._done(remote, "resumed" if resumed else "fetched")

    def fetch_to(self, remote: RemoteFile, dest: Path, counted: bool = False) -> bool:
        """Fetch `remote` through its partial file into `dest`; True when it resumed an earlier partial."""
        part = _partial_path(self.folder, remote)
        resumed = part.is_file() and part.stat().st_size > 0
        if not counted:
            self.reporter.grow_overall(self.missing_bytes(remote))
        self.result.fetched_bytes += self.hub.fetch(remote, self.commit, part, self.reporter)[0]
        _commit(part, dest)
        return resumed

    def unpublish(self) -> None:
        """Before the folder changes, take model_index.json out, so the loader never sees a half-updated model."""
        index = self.folder / MODEL_INDEX
        if index.is_file():
            staged = self.folder / STAGING / MODEL_INDEX
            staged.parent.mkdir(parents=True, exist_ok=True)
            os.replace(index, staged)
        if self.manifest.get("complete") is not False:
            self.manifest["complete"] = False
            _save(self.folder, self.manifest)

    def _done(self, remote: RemoteFile, action: str) -> None:
        self.result.files.append(FileResult(remote.path, (self.folder / remote.path).stat().st_size, action))

    def mark_converted(self, path: str) -> None:
        for item in self.result.files:
            if item.path == path:
                item.action = "converted" if item.action == "present" else f"{item.action}+bf16"
                item.size = (self.folder / path).stat().st_size

    def missing_bytes(self, remote: RemoteFile) -> int:
        """What a fetch of `remote` still has to transfer (its size minus a resumable partial)."""
        part = _partial_path(self.folder, remote)
        have = part.stat().st_size if part.is_file() else 0
        return max((remote.size or 0) - have, 0)


def _listing_or_fallback(hub: Hub, folder: Path, manifest: dict[str, Any] | None, revision: str | None,
                         what: str, needed: list[str] | None = None) -> tuple[str, list[RemoteFile]] | DownloadResult:
    """The Hub's listing; offline or unreachable, an earlier complete download is kept instead (with a note)."""
    try:
        if offline():
            from huggingface_hub.errors import OfflineModeIsEnabled

            raise hub.error(OfflineModeIsEnabled("HF_HUB_OFFLINE is set"), revision)
        return hub.listing(revision)
    except DownloadError as exc:
        usable = manifest is not None and (manifest.get("complete") is True if needed is None
                                           else all(p in manifest["files"] and (folder / p).is_file() for p in needed))
        same_revision = manifest is not None and revision in (None, manifest.get("revision"), manifest.get("commit"))
        if not getattr(exc, "unreachable", False) or not usable or not same_revision:
            raise
        assert manifest is not None
        result = DownloadResult(what, hub.repo, folder, manifest.get("commit"))
        for path, entry in sorted(manifest["files"].items()):
            if needed is None or path in needed:
                result.files.append(FileResult(path, entry.get("local_size", 0), "present"))
        result.notes.append(f"{exc} (kept the complete download already in {folder})")
        return result


_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def download_model(repo: str = TURBO_REPO, folder: str | Path | None = None, *, revision: str | None = None,
                   token: str | None = None, bf16: bool = False, reporter: Reporter | None = None) -> DownloadResult:
    """Fetch the files of a Z-Image diffusers repo the trainer needs into `folder` (default: where the loader looks)."""
    if not _REPO_ID.fullmatch(repo) or ".." in repo:
        raise DownloadError(f"--model {repo!r} is not a Hub repo id; use owner/name, e.g. {TURBO_REPO}")
    folder = Path(folder).expanduser().resolve() if folder else download_dir(repo)
    manifest = open_folder(folder, repo)
    hub = Hub(repo, hub_endpoint(), token)
    listed = _listing_or_fallback(hub, folder, manifest, revision, "model")
    if isinstance(listed, DownloadResult):
        return listed
    commit, remote = listed
    check_foreign(folder, repo, remote)
    by_path = {f.path: f for f in remote}
    if MODEL_INDEX not in by_path:
        raise DownloadError(f"{repo} has no {MODEL_INDEX}, so it is not a diffusers pipeline; pass --model "
                            f"{TURBO_REPO} or another Z-Image diffusers repo")
    folder.mkdir(parents=True, exist_ok=True)
    manifest = manifest or {**_new_manifest(repo), "complete": False}
    manifest.update(revision=revision or "main", commit=commit)
    job = _Job(hub, folder, commit, manifest, reporter or _NoReporter(), DownloadResult("model", repo, folder, commit))
    parts = pipeline_parts(_model_index(job, by_path[MODEL_INDEX]))
    files = [f for f in remote if f.path != MODEL_INDEX and wanted(f.path, parts)]
    small = [f for f in files if not f.path.endswith(WEIGHT_SUFFIX)]
    for remote_file in small:
        job.ensure(remote_file)
    weights = [f for f in prune_shards(folder, files) if f.path.endswith(WEIGHT_SUFFIX)]
    _check_parts(repo, parts, small + weights)
    to_bf16 = bf16 or any(e.get("dtype") == "bf16" for e in manifest["files"].values())
    if to_bf16 and not bf16:
        job.result.notes.append(f"{folder} was converted to bf16 by an earlier --bf16 run, so the transformer stays "
                                f"bf16; delete the folder to fetch the published fp32 weights again")
    _fetch_weights(job, weights, to_bf16, bf16_hint=not to_bf16)
    if to_bf16:
        _finish_bf16(job, small, weights)
    _remove_stale(job, {f.path for f in small + weights} | {MODEL_INDEX})
    _publish(job, by_path[MODEL_INDEX])
    job.result.files.sort(key=lambda f: f.path)
    return job.result


def _model_index(job: _Job, remote: RemoteFile) -> dict[str, Any]:
    """Read model_index.json (fetched into staging when new: it is published last) and check it is Z-Image."""
    folder, staged = job.folder, job.folder / STAGING / MODEL_INDEX
    if _present(folder, job.manifest, remote) or _adoptable(folder, remote):
        path, action = folder / MODEL_INDEX, "present"
    else:
        job.unpublish()
        job.fetch_to(remote, staged)
        path, action = staged, "fetched"
    job.result.files.append(FileResult(MODEL_INDEX, path.stat().st_size, action))
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise DownloadError(f"{job.hub.repo}'s {MODEL_INDEX} is not valid JSON; it is not a usable diffusers repo") from None
    name = index.get("_class_name") if isinstance(index, dict) else None
    if name not in PIPELINE_CLASSES:
        raise DownloadError(f"{job.hub.repo} holds a {name} model, not Z-Image ({', '.join(sorted(PIPELINE_CLASSES))}); "
                            f"pass --model {TURBO_REPO}")
    return index


def _publish(job: _Job, remote: RemoteFile) -> None:
    """Move model_index.json into the folder last and mark the download complete."""
    staged = job.folder / STAGING / MODEL_INDEX
    if staged.is_file():
        _commit(staged, job.folder / MODEL_INDEX)
    _record(job.folder, job.manifest, remote)
    job.manifest["complete"] = True
    _save(job.folder, job.manifest)


def _check_parts(repo: str, parts: set[str], files: list[RemoteFile]) -> None:
    have = {f.path.split("/")[0] for f in files}
    missing = sorted(parts - have)
    if missing:
        raise DownloadError(f"{repo} names the part {missing[0]}/ in {MODEL_INDEX} but holds no usable files for it "
                            f"(safetensors and configs); it cannot be loaded, try another --revision")


def _fetch_weights(job: _Job, weights: list[RemoteFile], to_bf16: bool, bf16_hint: bool) -> None:
    """Check the disk for the whole plan first, then fetch each weight file and convert transformer shards."""
    plan: dict[str, tuple[bool, bool]] = {}
    for remote in weights:
        convert = to_bf16 and remote.path.split("/")[0] in BF16_PARTS
        present = _present(job.folder, job.manifest, remote)
        if not present or (convert and job.manifest["files"][remote.path].get("dtype") != "bf16"):
            plan[remote.path] = (present, convert)
    steps = []
    for remote in weights:
        if remote.path in plan:
            present, convert = plan[remote.path]
            half = (remote.size or 0) // 2 if convert else 0
            steps.append((0 if present else job.missing_bytes(remote), half, half))
    check_disk(job.folder, steps, bf16_hint and any(p.split("/")[0] in BF16_PARTS for p in plan))
    job.reporter.grow_overall(sum(step[0] for step in steps))
    for remote in weights:
        job.ensure(remote, counted=True)
        if plan.get(remote.path, (False, False))[1] and job.manifest["files"][remote.path].get("dtype") != "bf16":
            job.unpublish()
            convert_to_bf16(job.folder / remote.path, job.reporter)
            _record(job.folder, job.manifest, remote, dtype="bf16")
            job.mark_converted(remote.path)


def _finish_bf16(job: _Job, small: list[RemoteFile], weights: list[RemoteFile]) -> None:
    """Point each converted part's index at the bf16 data size and mark the part bf16 in zturbo.json."""
    for part in BF16_PARTS:
        shards = [f.path for f in weights if f.path.startswith(part + "/")]
        if not shards:
            continue
        for index in (f for f in small if f.path.startswith(part + "/") and f.path.endswith(".index.json")):
            if job.manifest["files"][index.path].get("dtype") != "bf16":
                job.unpublish()
                _rewrite_index(job.folder, index.path, shards)
                _record(job.folder, job.manifest, index, dtype="bf16")
                job.mark_converted(index.path)
        job.manifest["dtype"][part] = "bf16"
    _save(job.folder, job.manifest)


def _remove_stale(job: _Job, keep: set[str]) -> None:
    """Delete files an earlier commit left (only ones we recorded) and partial files nobody will resume."""
    stale = sorted(set(job.manifest["files"]) - keep)
    if stale:
        job.unpublish()
    for path in stale:
        (job.folder / path).unlink(missing_ok=True)
        del job.manifest["files"][path]
    shutil.rmtree(job.folder / STAGING / "partial", ignore_errors=True)
    _save(job.folder, job.manifest)


# ---------------------------------------------------------------- the training adapter


def adapter_ref(ref: str) -> tuple[str, str]:
    """`v1` / `v2` / `owner/repo/file.safetensors` as (repo, file)."""
    full = ADAPTER_ALIASES.get(ref, ref)
    pieces = full.split("/")
    if len(pieces) != 3 or not full.endswith(WEIGHT_SUFFIX) or not all(pieces):
        raise AdapterError(f"adapter {ref!r} is not one of {', '.join(ADAPTER_ALIASES)} or owner/repo/file.safetensors; "
                           f"use --adapter v2 (the usual choice), v1 or none")
    return f"{pieces[0]}/{pieces[1]}", pieces[2]


def adapter_dir(repo: str = ADAPTER_REPO) -> Path:
    """Where `zturbo download --adapter` puts adapter files (and where resolve_adapter_file looks first)."""
    return download_dir(repo)


def download_adapter(ref: str = "v2", *, token: str | None = None, reporter: Reporter | None = None) -> DownloadResult:
    """Fetch one training adapter file into adapter_dir() (resumable, verified, kept beside other versions)."""
    repo, filename = adapter_ref(ref)
    folder = adapter_dir(repo)
    manifest = open_folder(folder, repo)
    hub = Hub(repo, hub_endpoint(), token)
    listed = _listing_or_fallback(hub, folder, manifest, None, "adapter", needed=[filename])
    if isinstance(listed, DownloadResult):
        return listed
    commit, remote = listed
    check_foreign(folder, repo, remote)
    match = next((f for f in remote if f.path == filename), None)
    if match is None:
        raise DownloadError(f"{repo} has no {filename}; the adapters there are "
                            f"{', '.join(sorted(f.path for f in remote if f.path.endswith(WEIGHT_SUFFIX))) or 'none'}")
    folder.mkdir(parents=True, exist_ok=True)
    manifest = manifest or _new_manifest(repo)
    manifest.update(revision="main", commit=commit)
    job = _Job(hub, folder, commit, manifest, reporter or _NoReporter(), DownloadResult("adapter", repo, folder, commit))
    if not _present(folder, manifest, match):
        check_disk(folder, [(job.missing_bytes(match), 0, 0)], False)
    job.ensure(match)
    _save(folder, manifest)
    return job.result


def resolve_adapter_file(ref: str) -> Path:
    """The local file of a training adapter: `v1`, `v2`, `owner/repo/file.safetensors`, a path or builtin:tiny-adapter.

    Looks where `zturbo download --adapter` writes (adapter_dir()), then in the Hugging Face
    cache; raises AdapterError naming the command that fetches it when it is in neither.
    """
    if ref == "builtin:tiny-adapter":
        from .tiny import tiny_adapter_file

        return tiny_adapter_file()
    local = Path(ref).expanduser()
    if local.suffix == WEIGHT_SUFFIX and local.is_file():
        return local
    repo, filename = adapter_ref(ref)
    ours = adapter_dir(repo) / filename
    if ours.is_file():
        return ours
    cached = _hf_cached(repo, filename)
    if cached is not None:
        return cached
    arg = ref if ref in ADAPTER_ALIASES else f"{repo}/{filename}"
    raise AdapterError(f"training adapter {ref} ({repo}/{filename}) is not downloaded; run "
                       f"`zturbo download --adapter {arg}` (it goes to {ours})")


def _hf_cached(repo: str, filename: str) -> Path | None:
    """A copy in the Hugging Face cache (HF_HOME), e.g. from `hf download`; no network."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo, filename)
    except Exception:  # noqa: BLE001 - any failure means "not cached"
        return None
    return Path(found) if isinstance(found, str) and Path(found).is_file() else None


# ---------------------------------------------------------------- the command and its summary


def download_all(model: str = TURBO_REPO, adapter: str = "v2", folder: str | Path | None = None, *,
                 revision: str | None = None, token: str | None = None, bf16: bool = False,
                 reporter: Reporter | None = None) -> list[DownloadResult]:
    """`zturbo download`: the model (unless `none`), then the adapter (unless `none`)."""
    if model == "none" and adapter == "none":
        raise DownloadError("--model none and --adapter none leave nothing to download; drop one of them")
    if adapter != "none":
        adapter_ref(adapter)  # a bad --adapter fails before gigabytes of model
    results = []
    if model != "none":
        results.append(download_model(model, folder, revision=revision, token=token, bf16=bf16, reporter=reporter))
    if adapter != "none":
        results.append(download_adapter(adapter, token=token, reporter=reporter))
    return results


def summary_table(results: list[DownloadResult]) -> Any:
    """A rich table: per repo what, where, how many files, size and what happened; then one row per part."""
    from rich.filesize import decimal
    from rich.table import Table

    table = Table(title="zturbo download", title_justify="left")
    for column in ("what", "where", "files", "size", "status"):
        table.add_column(column, justify="right" if column in ("files", "size") else "left", overflow="fold")
    for result in results:
        table.add_row(f"{result.what} {result.repo}", str(result.folder), str(len(result.files)),
                      decimal(result.size), _status(result.files), style="bold")
        groups: dict[str, list[FileResult]] = {}
        for item in result.files:
            groups.setdefault(item.path.split("/")[0] + ("/" if "/" in item.path else ""), []).append(item)
        for head, items in groups.items():
            table.add_row(f"  {head}", "", str(len(items)), decimal(sum(i.size for i in items)), _status(items))
    return table


def _status(items: list[FileResult]) -> str:
    counts: dict[str, int] = {}
    for item in items:
        counts[item.action] = counts.get(item.action, 0) + 1
    if list(counts) == ["present"]:
        return "already present"
    return ", ".join(f"{n} {action}" for action, n in counts.items())


def summary_lines(results: list[DownloadResult], custom_dir: bool) -> list[str]:
    """The lines under the table: notes, what was fetched (or that nothing was), and how to train on it."""
    from rich.filesize import decimal

    lines = [f"note: {note}" for result in results for note in result.notes]
    fetched = sum(r.fetched_bytes for r in results)
    if not any(r.changed for r in results):
        lines.append("Everything is in place and verified; nothing was downloaded.")
    else:
        lines.append(f"Downloaded {decimal(fetched)}; every file matches the size and hash the Hub lists.")
    for result in results:
        if result.what == "model":
            path = str(result.folder) if custom_dir else result.repo
            lines.append(f'Train on it with [model] path = "{path}" in your config (the files are in {result.folder}).')
    return lines

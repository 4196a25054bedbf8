"""`zturbo download`: Z-Image Turbo and the training adapter, resumable, verified, optionally bf16.

Where things go (the loader and the adapter loader look there):
  <ZTURBO_HOME>/models/<owner>--<name>/   the model (`paths.download_dir`; `--dir` picks another folder)
  <ZTURBO_HOME>/models/ostris--zimage_turbo_training_adapter/zimage_turbo_training_adapter_v2.safetensors
  <folder>/zturbo.json                     the record: repo, commit, each file's Hub hash and our size, bf16
  <folder>/.zturbo/partial/                partial files of an interrupted run, resumed by the next one

Each file goes through fetch.py (huggingface_hub's public API, resumable, hash-checked) or,
when the Hugging Face cache already holds it, is hard-linked from there and re-verified. A file
recorded in zturbo.json with the Hub's current hash and an unchanged size and mtime is taken as
present without hashing it again, so a second run is one API call. model_index.json is put in
place last, and taken out while a folder is being changed, so the loader never takes a
half-written folder for a model.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .. import __version__
from ..errors import AdapterError, AdapterNotDownloadedError, DownloadError
from ..fileio import check_writable, write_json
from ..models import PIPELINE_CLASSES
from ..paths import download_dir
from ..refs import WEIGHT_SUFFIX, hub_file, is_repo_id
from ..testing.tiny import tiny_adapter_file
from ..zimage import ADAPTER_ALIASES, ADAPTER_REPO, TURBO_REPO
from .bf16 import convert_to_bf16, rewrite_index_total
from .fetch import Hub, NullReporter, RemoteFile, Reporter, copy_from_cache, file_oid, hf_cached, hub_endpoint

MANIFEST = "zturbo.json"
STAGING = ".zturbo"
MODEL_INDEX = "model_index.json"
BF16_PARTS = ("transformer",)  # parts `--bf16` rewrites; the text encoder ships as bf16 already
CONFIG_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken")
# diffusers weight variants (fp16 copies and the like) duplicate the main weights: never fetched.
VARIANT = re.compile(r"\.(fp16|bf16|fp32|fp8\w*|int8|int4|nf4)[.-]")


# ---------------------------------------------------------------- results and progress


@dataclass
class FileResult:
    """What happened to one file: fetched, resumed, from HF cache, present, converted, or fetched+bf16."""

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


class RichReporter:
    """rich progress bars with sizes, speed and ETA: the current item and the total fetched."""

    def __init__(self, progress: Any) -> None:
        self.progress = progress
        self.overall = progress.add_task("total", total=0, visible=False)
        self.task: Any = None
        self.counts = False
        self.last = 0

    def grow_overall(self, total: int) -> None:
        if total:
            task = self.progress.tasks[self.overall]
            self.progress.update(self.overall, total=(task.total or 0) + total, visible=True)

    def begin(self, label: str, total: int | None, done: int = 0) -> None:
        self.task = self.progress.add_task(label, total=total, completed=done)
        self.counts = not label.startswith(("bf16 ", "copy "))  # only network bytes count toward the total
        self.last = done

    def update(self, done: int) -> None:
        if self.task is None:
            return
        self.progress.update(self.task, completed=done)
        if self.counts:
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
        yield NullReporter()
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    columns = (
        TextColumn("{task.description}", markup=False),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    # not drawn where stderr is not a terminal: a transient bar shows nothing there but an empty line
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as progress:
        yield RichReporter(progress)


# ---------------------------------------------------------------- the folder and its record


def read_manifest(folder: str | Path) -> dict[str, Any] | None:
    """The zturbo.json a download wrote into `folder` (None when there is none)."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise DownloadError(
            f"{path} is not valid JSON; delete it and run `zturbo download` again "
            f"(files already there are re-checked by hash, not fetched again)"
        ) from None
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        raise DownloadError(f"{path} is not a zturbo download record; delete it or pick another folder with --dir")
    return data


def stored_dtype(folder: str | Path, part: str) -> str | None:
    """The dtype a download rewrote `part` to ("bf16" after --bf16), or None when stored as published."""
    manifest = read_manifest(folder) or {}
    return (manifest.get("dtype") or {}).get(part)


def _new_manifest(repo: str) -> dict[str, Any]:
    return {
        "format": 1,
        "repo": repo,
        "tool": f"zturbo-train {__version__}",
        "complete": False,
        "files": {},
        "dtype": {},
    }


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
    """Refuse a path that is a file, or a folder holding another repo's download; return its record."""
    if folder.exists() and not folder.is_dir():
        raise DownloadError(f"{folder} is a file, not a folder; pass --dir with a folder for the download")
    manifest = read_manifest(folder) if folder.is_dir() else None
    if manifest is not None and manifest.get("repo") != repo:
        raise DownloadError(
            f"{folder} holds a download of {manifest.get('repo')}, not {repo}; "
            f"pick another folder with --dir or delete that one"
        )
    return manifest


def check_foreign(folder: Path, repo: str, remote: list[RemoteFile]) -> None:
    """Without our zturbo.json, a non-empty folder may only hold names from the repo itself."""
    if not folder.is_dir() or (folder / MANIFEST).is_file():
        return
    allowed = {f.path.split("/")[0] for f in remote} | {MANIFEST, STAGING, ".cache"}
    foreign = sorted(p.name for p in folder.iterdir() if p.name not in allowed)
    if foreign:
        raise DownloadError(
            f"{folder} already holds other files ({', '.join(foreign[:3])}) and is not a download of "
            f"{repo}; choose an empty or new folder with --dir, or empty that one"
        )


@contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """One download per folder at a time (an OS lock, released even when the process dies)."""
    from filelock import FileLock, Timeout

    (folder / STAGING).mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(folder / STAGING / "lock"), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise DownloadError(
            f"another `zturbo download` is writing into {folder}; wait for it to finish (or stop it) and run again"
        ) from None
    try:
        yield
    finally:
        lock.release()


def _partial_path(folder: Path, remote: RemoteFile) -> Path:
    """Named by the file's hash, so a file changed on the Hub never resumes from stale bytes."""
    return folder / STAGING / "partial" / f"{remote.path}.{(remote.oid or 'nohash')[:16]}.part"


def _commit(part: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(part, dest)


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
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if peak > free:
        from rich.filesize import decimal

        hint = "; or pass --bf16 to store the transformer at half the size" if bf16_hint else ""
        raise DownloadError(
            f"not enough disk space for the download into {folder}: it needs {decimal(peak)} more "
            f"but only {decimal(free)} is free; free some space or pick another disk with --dir{hint}"
        )


# ---------------------------------------------------------------- which files


def wanted(path: str, parts: set[str] | None = None) -> bool:
    """Files the trainer loads: model_index.json, and per part its configs, tokenizer files and safetensors.

    Skipped: READMEs, images, .bin/.pth/.ckpt/.onnx/.gguf/.msgpack, weight variants (fp16
    copies), indexes of other formats, nested folders, parts model_index.json does not name.
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
            raise DownloadError(
                f"{part}'s index lists {missing[0]}, which the repo does not hold; the repo is "
                f"incomplete at this revision, try another --revision"
            )
    return [
        f
        for f in files
        if not f.path.endswith(WEIGHT_SUFFIX)
        or f.path.split("/")[0] not in listed
        or f.path in listed[f.path.split("/")[0]]
    ]


# ---------------------------------------------------------------- one job: files of a repo into a folder


@dataclass
class _Job:
    """Fetching files of one repo commit into one folder, recording each as it lands."""

    hub: Hub
    folder: Path
    commit: str
    manifest: dict[str, Any]
    reporter: Reporter
    result: DownloadResult

    def ensure(self, remote: RemoteFile, counted: bool = False) -> None:
        """Make `remote` present: recorded already, adopted by hash, or fetched (resuming) and verified."""
        if _present(self.folder, self.manifest, remote):
            self._done(remote, "present")
            return
        if _adoptable(self.folder, remote):
            _record(self.folder, self.manifest, remote)
            self._done(remote, "present")
            return
        self.unpublish()
        action = self.fetch_to(remote, self.folder / remote.path, counted)
        _record(self.folder, self.manifest, remote)
        self._done(remote, action)

    def fetch_to(self, remote: RemoteFile, dest: Path, counted: bool = False) -> str:
        """Put a verified `remote` at `dest`: linked from the HF cache, or fetched through its partial file."""
        part = _partial_path(self.folder, remote)
        cached = hf_cached(self.hub.repo, remote.path, self.commit)
        if cached is not None:
            try:
                copy_from_cache(cached, part, remote, self.reporter)
                _commit(part, dest)
                return "from HF cache"
            except DownloadError:  # a damaged cached copy: fetch the file instead
                counted = False
        action = "resumed" if part.is_file() and part.stat().st_size > 0 else "fetched"
        if not counted:
            self.reporter.grow_overall(self.missing_bytes(remote))
        self.result.fetched_bytes += self.hub.fetch(remote, self.commit, part, self.reporter)
        _commit(part, dest)
        return action

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
        """What getting `remote` still adds to the disk: 0 from the HF cache (a link), else size minus a partial."""
        if hf_cached(self.hub.repo, remote.path, self.commit) is not None:
            return 0
        part = _partial_path(self.folder, remote)
        have = part.stat().st_size if part.is_file() else 0
        return max((remote.size or 0) - have, 0)


def _listing_or_fallback(
    hub: Hub,
    folder: Path,
    manifest: dict[str, Any] | None,
    revision: str | None,
    what: str,
    needed: list[str] | None = None,
) -> tuple[str, list[RemoteFile]] | DownloadResult:
    """The Hub's listing; offline or unreachable, an earlier complete download is kept instead (with a note)."""
    try:
        return hub.listing(revision)
    except DownloadError as exc:
        usable = manifest is not None and (
            manifest.get("complete") is True
            if needed is None
            else all(p in manifest["files"] and (folder / p).is_file() for p in needed)
        )
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


# ---------------------------------------------------------------- the model


def check_repo_id(repo: str) -> None:
    if not is_repo_id(repo):
        raise DownloadError(f"--model {repo!r} is not a Hub repo id; use owner/name, e.g. {TURBO_REPO}")


def download_model(
    repo: str = TURBO_REPO,
    folder: str | Path | None = None,
    *,
    revision: str | None = None,
    token: str | None = None,
    bf16: bool = False,
    reporter: Reporter | None = None,
) -> DownloadResult:
    """Fetch the files of a Z-Image diffusers repo the trainer needs into `folder` (default: where the loader looks)."""
    check_repo_id(repo)
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
        raise DownloadError(
            f"{repo} has no {MODEL_INDEX}, so it is not a diffusers pipeline; pass --model "
            f"{TURBO_REPO} or another Z-Image diffusers repo"
        )
    folder.mkdir(parents=True, exist_ok=True)
    with folder_lock(folder):
        manifest = read_manifest(folder) or _new_manifest(repo)
        manifest.update(revision=revision or "main", commit=commit)
        job = _Job(
            hub, folder, commit, manifest, reporter or NullReporter(), DownloadResult("model", repo, folder, commit)
        )
        _sync_model(job, by_path, remote, bf16)
    job.result.files.sort(key=lambda f: f.path)
    return job.result


def _sync_model(job: _Job, by_path: dict[str, RemoteFile], remote: list[RemoteFile], bf16: bool) -> None:
    """model_index.json, configs and tokenizer, then the weights (checked against the disk first), then publish."""
    folder, manifest = job.folder, job.manifest
    parts = pipeline_parts(_model_index(job, by_path[MODEL_INDEX]))
    files = [f for f in remote if f.path != MODEL_INDEX and wanted(f.path, parts)]
    small = [f for f in files if not f.path.endswith(WEIGHT_SUFFIX)]
    for remote_file in small:
        job.ensure(remote_file)
    weights = [f for f in prune_shards(folder, files) if f.path.endswith(WEIGHT_SUFFIX)]
    _check_parts(job.hub.repo, parts, small + weights)
    to_bf16 = bf16 or any(e.get("dtype") == "bf16" for e in manifest["files"].values())
    if to_bf16 and not bf16:
        job.result.notes.append(
            f"{folder} was converted to bf16 by an earlier --bf16 run, so the transformer stays "
            f"bf16; delete the folder to fetch the published fp32 weights again"
        )
    _fetch_weights(job, weights, to_bf16)
    if to_bf16:
        _finish_bf16(job, small, weights)
    _remove_stale(job, {f.path for f in small + weights} | {MODEL_INDEX})
    _publish(job, by_path[MODEL_INDEX])


def _model_index(job: _Job, remote: RemoteFile) -> dict[str, Any]:
    """Read model_index.json (a new one waits in the staging folder: it is published last); check it is Z-Image."""
    folder = job.folder
    if _present(folder, job.manifest, remote) or _adoptable(folder, remote):
        path, action = folder / MODEL_INDEX, "present"
    else:
        job.unpublish()
        path = folder / STAGING / MODEL_INDEX
        action = job.fetch_to(remote, path)
    job.result.files.append(FileResult(MODEL_INDEX, path.stat().st_size, action))
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise DownloadError(
            f"{job.hub.repo}'s {MODEL_INDEX} is not valid JSON; it is not a usable diffusers repo"
        ) from None
    name = index.get("_class_name") if isinstance(index, dict) else None
    if name not in PIPELINE_CLASSES:
        raise DownloadError(
            f"{job.hub.repo} holds a {name} model, not Z-Image ({', '.join(sorted(PIPELINE_CLASSES))}); "
            f"pass --model {TURBO_REPO}"
        )
    return index


def _check_parts(repo: str, parts: set[str], files: list[RemoteFile]) -> None:
    missing = sorted(parts - {f.path.split("/")[0] for f in files})
    if missing:
        raise DownloadError(
            f"{repo} names the part {missing[0]}/ in {MODEL_INDEX} but holds no usable files for it "
            f"(safetensors and configs); it cannot be loaded, try another --revision"
        )


def _fetch_weights(job: _Job, weights: list[RemoteFile], to_bf16: bool) -> None:
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
    hint = not to_bf16 and any(p.split("/")[0] in BF16_PARTS for p in plan)
    check_disk(job.folder, steps, bf16_hint=hint)
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
        shards = [job.folder / f.path for f in weights if f.path.startswith(part + "/")]
        if not shards:
            continue
        for index in (f for f in small if f.path.startswith(part + "/") and f.path.endswith(".index.json")):
            if job.manifest["files"][index.path].get("dtype") != "bf16":
                job.unpublish()
                rewrite_index_total(job.folder / index.path, shards)
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


def _publish(job: _Job, remote: RemoteFile) -> None:
    """Put model_index.json in place last and mark the download complete."""
    staged = job.folder / STAGING / MODEL_INDEX
    if staged.is_file():
        _commit(staged, job.folder / MODEL_INDEX)
    _record(job.folder, job.manifest, remote)
    job.manifest["complete"] = True
    _save(job.folder, job.manifest)


# ---------------------------------------------------------------- the training adapter


def adapter_ref(ref: str) -> tuple[str, str]:
    """`v1` / `v2` / `owner/repo/file.safetensors` as (repo, file)."""
    parsed = hub_file(ref)
    if parsed is None:
        raise AdapterError(
            f"adapter {ref!r} is not one of {', '.join(ADAPTER_ALIASES)} or owner/repo/file.safetensors; "
            f"use --adapter v2 (the usual choice), v1 or none"
        )
    return parsed


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
        found = sorted(f.path for f in remote if f.path.endswith(WEIGHT_SUFFIX))
        raise DownloadError(f"{repo} has no {filename}; the safetensors files there are {', '.join(found) or 'none'}")
    folder.mkdir(parents=True, exist_ok=True)
    with folder_lock(folder):
        manifest = read_manifest(folder) or _new_manifest(repo)
        manifest.update(revision="main", commit=commit)
        job = _Job(
            hub, folder, commit, manifest, reporter or NullReporter(), DownloadResult("adapter", repo, folder, commit)
        )
        if not _present(folder, manifest, match):
            check_disk(folder, [(job.missing_bytes(match), 0, 0)], bf16_hint=False)
        job.ensure(match)
        manifest["complete"] = True
        _save(folder, manifest)
    return job.result


def resolve_adapter_file(ref: str) -> Path:
    """The local file of a training adapter: `v1`, `v2`, `owner/repo/file.safetensors`, a path or builtin:tiny-adapter.

    Looks where `zturbo download --adapter` writes (adapter_dir()), then in the Hugging Face
    cache; raises AdapterError naming the command that fetches it when it is in neither.
    Nothing is fetched here.
    """
    if ref == "builtin:tiny-adapter":
        return tiny_adapter_file()
    local = Path(ref).expanduser()
    if ref not in ADAPTER_ALIASES and local.suffix == WEIGHT_SUFFIX and local.is_file():
        return local
    repo, filename = adapter_ref(ref)
    ours = adapter_dir(repo) / filename
    if ours.is_file():
        return ours
    cached = hf_cached(repo, filename)
    if cached is not None:
        return cached
    arg = ref if ref in ADAPTER_ALIASES else f"{repo}/{filename}"
    raise AdapterNotDownloadedError(
        f"training adapter {ref} ({repo}/{filename}) is not downloaded; run "
        f"`zturbo download --adapter {arg}` (it goes to {ours})"
    )


# ---------------------------------------------------------------- the command and its summary


def download_all(
    model: str = TURBO_REPO,
    adapter: str = "v2",
    folder: str | Path | None = None,
    *,
    revision: str | None = None,
    token: str | None = None,
    bf16: bool = False,
    reporter: Reporter | None = None,
) -> list[DownloadResult]:
    """`zturbo download`: the model (unless `none`), then the adapter (unless `none`)."""
    if model == "none" and adapter == "none":
        raise DownloadError("--model none and --adapter none leave nothing to download; drop one of them")
    if model != "none":
        check_repo_id(model)
        target = Path(folder).expanduser() if folder else download_dir(model)
        check_writable(target, "--dir" if folder else "the model folder")
    if adapter != "none":
        check_writable(adapter_dir(adapter_ref(adapter)[0]), "the adapter folder")  # a bad --adapter fails first
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
        table.add_row(
            f"{result.what} {result.repo}",
            str(result.folder),
            str(len(result.files)),
            decimal(result.size),
            _status(result.files),
            style="bold",
        )
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
    if not any(r.changed for r in results):
        lines.append("Everything is in place and verified; nothing was downloaded.")
    else:
        fetched = sum(r.fetched_bytes for r in results)
        lines.append(f"Downloaded {decimal(fetched)}; every file matches the size and hash the Hub lists.")
    for result in results:
        if result.what == "model":
            path = str(result.folder) if custom_dir else result.repo
            lines.append(f'Train on it with [model] path = "{path}" in your config (the files are in {result.folder}).')
    return lines

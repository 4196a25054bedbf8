"""One file of a Hub repo into a partial file, through huggingface_hub's public API: resumable and verified.

Why not `hf_hub_download`: in huggingface_hub 2.x it downloads into a process-unique
`<etag>.<random>.incomplete` file opened fresh and deleted on failure
(`file_download._download_to_tmp_and_move`), so a 10 GB shard interrupted in one run starts
over in the next. tests/hub/test_download.py (test_hf_hub_download_starts_over_after_an_interrupted_run)
pins that: when it fails, the hub resumes across runs and this loop can go. Until then the
loop here is built on public functions only
(model_info, hf_hub_url, get_hf_file_metadata, build_hf_headers, get_session,
hf_raise_for_status: the hub's endpoint, token lookup, offline switch, HTTP client and error
classes) and writes into a partial file the caller keeps, which the next run resumes with an
HTTP Range request; a dropped connection is resumed within the run too. Bytes are hashed as
they arrive and checked against the size and hash the Hub lists (sha256 for LFS files, the git
blob sha1 otherwise). The token only ever goes to huggingface_hub: never into a message.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol
from urllib.parse import urlparse

from .. import __version__
from ..errors import DownloadError
from ..zimage import TURBO_REPO

LIBRARY = {"library_name": "zturbo-train", "library_version": __version__}
LOGIN_HINT = (
    "log in with `hf auth login` (older huggingface_hub: `huggingface-cli login`), set HF_TOKEN or pass --token"
)
RETRIES = 5  # reconnections in a row without a new byte before a run gives up (the next run resumes)
_NETWORK_ERRORS = {
    "ConnectError",
    "ConnectTimeout",
    "ReadTimeout",
    "WriteTimeout",
    "PoolTimeout",
    "TimeoutException",
    "RemoteProtocolError",
    "ReadError",
    "NetworkError",
    "ConnectionError",
    "Timeout",
    "ProxyError",
}


@dataclass(frozen=True)
class RemoteFile:
    """One file as the Hub lists it: size and hash (sha256 for LFS files, git blob sha1 otherwise)."""

    path: str
    size: int | None
    oid: str | None


class Reporter(Protocol):
    """Progress sink: one current item (a file or a conversion) plus the bytes fetched overall."""

    def begin(self, label: str, total: int | None, done: int = 0) -> None: ...
    def update(self, done: int) -> None: ...
    def end(self) -> None: ...
    def grow_overall(self, total: int) -> None: ...


class NullReporter:
    """Progress that goes nowhere (library use, --quiet)."""

    def begin(self, label: str, total: int | None, done: int = 0) -> None: ...
    def update(self, done: int) -> None: ...
    def end(self) -> None: ...
    def grow_overall(self, total: int) -> None: ...


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
    token: str | None = field(default=None, repr=False)

    def listing(self, revision: str | None) -> tuple[str, list[RemoteFile]]:
        """The commit a revision points at and every file with its size and hash (one API call)."""
        from huggingface_hub import HfApi

        try:
            if offline():
                from huggingface_hub.errors import OfflineModeIsEnabled

                raise OfflineModeIsEnabled("HF_HUB_OFFLINE is set")
            info = HfApi(endpoint=self.endpoint, token=self.token, **LIBRARY).model_info(
                self.repo, revision=revision, files_metadata=True
            )
        except Exception as exc:  # noqa: BLE001 - every failure becomes one DownloadError
            raise self.error(exc, revision) from None
        if not info.sha:
            raise DownloadError(
                f"{self.endpoint} listed {self.repo} without a commit hash; it does not behave like "
                f"the Hugging Face Hub, check HF_ENDPOINT"
            )
        files = [
            RemoteFile(s.rfilename, s.lfs.size if s.lfs else s.size, s.lfs.sha256 if s.lfs else s.blob_id)
            for s in info.siblings or []
        ]
        return info.sha, files

    def fetch(self, remote: RemoteFile, commit: str, part: Path, reporter: Reporter) -> int:
        """Stream a file into `part`, resuming the bytes it holds, then verify it; returns the bytes transferred."""
        from huggingface_hub import get_hf_file_metadata, hf_hub_url
        from huggingface_hub.utils import build_hf_headers

        url = hf_hub_url(self.repo, remote.path, revision=commit, endpoint=self.endpoint)
        try:
            meta = get_hf_file_metadata(url, token=self.token, endpoint=self.endpoint, **LIBRARY)
        except Exception as exc:  # noqa: BLE001
            raise self.error(exc, commit, remote.path) from None
        if remote.oid and meta.etag and meta.etag != remote.oid:
            raise DownloadError(
                f"the Hub lists {remote.path} of {self.repo} with hash {remote.oid[:12]} but serves "
                f"{meta.etag[:12]}; run again (the repo may have changed during the download)"
            )
        oid, size = remote.oid or meta.etag, remote.size if remote.size is not None else meta.size
        headers = build_hf_headers(token=self.token, **LIBRARY)
        elsewhere = urlparse(meta.location).netloc != urlparse(url).netloc
        if elsewhere:
            headers.pop("authorization", None)  # a CDN gets a signed URL, never the token
        have = partial_size(part, size)
        reporter.begin(remote.path, size, have)
        try:
            with open(part, "r+b" if have else "wb") as handle:
                handle.seek(have)
                writer = HashingWriter(handle, oid, size, reporter)
                if size is None or have < size:
                    stream_into(writer, meta.location, headers)
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise DownloadError(
                    f"disk full while downloading {remote.path} into {part.parent}; free some space "
                    f"and run again (the bytes so far are kept and resumed)"
                ) from None
            raise self.error(exc, commit, remote.path, cdn=elsewhere) from None
        except Exception as exc:  # noqa: BLE001
            raise self.error(exc, commit, remote.path, cdn=elsewhere) from None
        finally:
            reporter.end()
        verify(part, remote.path, oid, size, writer.hexdigest())
        return writer.received  # not size - have: a server that ignored the Range sent the whole file again

    def error(self, exc: Exception, revision: str | None, path: str | None = None, cdn: bool = False) -> DownloadError:
        """One line for a failed Hub call: what, why, and what to do next (never the token)."""
        from huggingface_hub.errors import OfflineModeIsEnabled

        text = describe_hub_error(exc, self.repo, self.endpoint, revision, path, cdn)
        error = DownloadError(scrub(text, self.token))
        error.unreachable = isinstance(exc, OfflineModeIsEnabled) or is_network_error(exc)  # type: ignore[attr-defined]
        return error


def describe_hub_error(
    exc: Exception, repo: str, endpoint: str, revision: str | None, path: str | None = None, cdn: bool = False
) -> str:
    """The message for each kind of failure, most specific first (a gated repo is also 'not found')."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    page = f"{endpoint}/{repo}"
    status = getattr(getattr(exc, "response", None), "status_code", None)
    what = f"{repo}/{path}" if path else repo
    resume = "run again: finished files are kept and partial ones resume"
    if isinstance(exc, HFValidationError):
        return f"{repo!r} is not a Hub repo id; use owner/name, e.g. {TURBO_REPO}"
    if isinstance(exc, OfflineModeIsEnabled):
        return f"offline mode is on (HF_HUB_OFFLINE=1), so {what} cannot be fetched; unset HF_HUB_OFFLINE to download"
    if isinstance(exc, GatedRepoError):
        return (
            f"{repo} is gated and this account has no access to it yet ({status} unauthorised): accept the "
            f"licence on {page} while logged in, then {LOGIN_HINT}"
        )
    if cdn and status in (401, 403):
        return f"the Hub's download link for {what} stopped working ({status}, it may have expired); {resume}"
    if status in (401, 403):
        return (
            f"not authorised to download {what} ({status} from {endpoint}): the repo is private or gated, does "
            f"not exist, or the token is missing or invalid; check the id, accept the licence on {page} while "
            f"logged in, then {LOGIN_HINT}"
        )
    if isinstance(exc, RevisionNotFoundError):
        return f"revision {revision!r} does not exist in {repo}; pass --revision with a branch, tag or commit of {page}"
    if isinstance(exc, RemoteEntryNotFoundError):
        return f"{path} is not in {repo} at {revision}; check the file name on {page}"
    if isinstance(exc, RepositoryNotFoundError) or status == 404:
        return (
            f"repository {repo} was not found on {endpoint} (404); check the id (the model is {TURBO_REPO}), "
            f"or if it is private, {LOGIN_HINT}"
        )
    if is_network_error(exc):
        return (
            f"cannot reach the Hub at {endpoint} ({type(exc).__name__}: {_first_line(exc)}); check the network, "
            f"proxy or HF_ENDPOINT and {resume}"
        )
    if isinstance(exc, HfHubHTTPError) and status is not None:
        return f"the Hub answered {status} for {what}; try again later and {resume}"
    return f"downloading {what} failed: {type(exc).__name__}: {_first_line(exc)}"


def is_network_error(exc: BaseException) -> bool:
    """Connection refused, DNS, timeouts, dropped streams: by class name, across httpx / requests versions."""
    return any(cls.__name__ in _NETWORK_ERRORS for cls in type(exc).__mro__)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:200]


def scrub(text: str, token: str | None) -> str:
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


def stream_into(writer: "HashingWriter", url: str, headers: dict[str, str]) -> None:
    """GET `url` into `writer` from its current end (a Range request when it holds bytes already).

    A dropped connection reconnects from the bytes received, up to RETRIES times in a row with
    no progress; an HTTP error is raised at once (hf_raise_for_status), as is a network error
    after the last retry. A server that ignores the Range (200 instead of 206) starts the file over.
    """
    from huggingface_hub import constants, get_session, hf_raise_for_status

    tries = RETRIES
    while True:
        start = writer.tell()
        ranged = {**headers, "Range": f"bytes={start}-"} if start else headers
        try:
            with get_session().stream(
                "GET", url, headers=ranged, timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT, follow_redirects=True
            ) as response:
                hf_raise_for_status(response)
                if start and response.status_code == 200:
                    writer.seek(0)
                    writer.truncate(0)
                for chunk in response.iter_bytes(chunk_size=constants.DOWNLOAD_CHUNK_SIZE):
                    writer.write(chunk)
            return
        except Exception as exc:
            if not is_network_error(exc) or tries <= 0:
                raise
            tries = RETRIES if writer.tell() > start else tries - 1
            time.sleep(1)


def hf_cached(repo: str, filename: str, revision: str | None = None) -> Path | None:
    """A copy in the Hugging Face cache (HF_HOME / HF_HUB_CACHE), e.g. from `hf download`; no network."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo, filename, revision=revision)
    except Exception:  # noqa: BLE001 - any failure means "not cached"
        return None
    return Path(found).resolve() if isinstance(found, str) and Path(found).is_file() else None


def copy_from_cache(cached: Path, part: Path, remote: RemoteFile, reporter: Reporter) -> None:
    """Put a cached file at `part`: a hard link (no space, no time) or else a copy; then verify it."""
    part.parent.mkdir(parents=True, exist_ok=True)
    part.unlink(missing_ok=True)
    try:
        os.link(cached, part)
    except OSError:
        reporter.begin(f"copy {remote.path}", remote.size)
        try:
            shutil.copyfile(cached, part)
        except OSError as exc:
            part.unlink(missing_ok=True)
            if exc.errno == errno.ENOSPC:
                raise DownloadError(
                    f"disk full while copying {remote.path} from the Hugging Face cache into "
                    f"{part.parent}; free some space and run again"
                ) from None
            raise
        finally:
            reporter.end()
    verify(part, remote.path, remote.oid, remote.size, None)


# ---------------------------------------------------------------- hashing and verification


class HashingWriter:
    """A file wrapper for stream_into: hashes and reports bytes as they arrive, so verifying needs no second read.

    A resumed file first hashes the bytes it already holds. If the stream rewinds (a server that
    ignored the Range request), the digest is recomputed from disk at the end instead.
    """

    def __init__(self, handle: BinaryIO, oid: str | None, size: int | None, reporter: Reporter) -> None:
        self.handle, self.reporter = handle, reporter
        self.hasher = _hasher(oid, size)
        self.rewound = False
        self.received = 0  # bytes this transfer wrote, re-sent ones included
        start = handle.tell()
        if self.hasher is not None and start:
            handle.seek(0)
            _hash_stream(handle, self.hasher, start)
            handle.seek(start)

    def write(self, data: bytes) -> int:
        written = self.handle.write(data)
        self.received += written
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

    def hexdigest(self) -> str | None:
        """The digest, or None when it must be recomputed from disk."""
        return None if self.rewound or self.hasher is None else self.hasher.hexdigest()


def _hasher(oid: str | None, size: int | None) -> Any:
    """sha256 for LFS files (64 hex digits); git's blob sha1 (40) needs the size up front."""
    if oid and len(oid) == 64:
        return hashlib.sha256()
    if oid and len(oid) == 40 and size is not None:
        hasher = hashlib.sha1()
        hasher.update(b"blob %d\0" % size)
        return hasher
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


def verify(part: Path, name: str, oid: str | None, size: int | None, digest: str | None) -> None:
    """Size and hash must be what the Hub lists; a bad file is removed so the next run fetches it fresh."""
    actual = part.stat().st_size
    if size is not None and actual != size:
        part.unlink(missing_ok=True)
        raise DownloadError(
            f"{name} arrived with {actual} bytes, the Hub lists {size}; the partial file was removed, "
            f"run again to fetch it fresh"
        )
    if oid is None:
        return
    digest = digest or file_oid(part, oid)
    if digest is not None and digest != oid:
        part.unlink(missing_ok=True)
        raise DownloadError(
            f"{name} failed its hash check (got {digest[:12]}, the Hub lists {oid[:12]}); the file "
            f"was removed, run again to fetch it fresh"
        )


def partial_size(part: Path, size: int | None) -> int:
    """Bytes an earlier run left in `part` (0 if none, or more than the file can hold)."""
    part.parent.mkdir(parents=True, exist_ok=True)
    have = part.stat().st_size if part.is_file() else 0
    if size is not None and have > size:
        part.unlink()
        return 0
    return have

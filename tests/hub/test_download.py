"""`zturbo download` against a fake Hub on 127.0.0.1: the real huggingface_hub code, no internet.

The fake Hub serves the endpoints huggingface_hub 2.x calls: `GET /api/models/<repo>[/revision/<rev>]`
(model_info with `blobs=True`: sizes, git blob ids, LFS sha256) and `HEAD`/`GET
/<repo>/resolve/<rev>/<path>` with X-Repo-Commit, ETag, X-Linked-Etag, X-Linked-Size,
Content-Length and Range (206 + Content-Range). It logs every request, can drop a connection
mid-file, and answers 401/404 with the X-Error-Code headers the real Hub sends.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import threading
from collections import namedtuple
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save
from typer.testing import CliRunner

from zturbo_train.cli import app
from zturbo_train.errors import AdapterError, DownloadError, ModelError
from zturbo_train.fileio import safetensors_data_bytes
from zturbo_train.hub.download import (
    MANIFEST,
    STAGING,
    adapter_dir,
    download_adapter,
    download_all,
    download_model,
    read_manifest,
    resolve_adapter_file,
    stored_dtype,
    wanted,
)
from zturbo_train.models import build_pipeline, load_parts, resolve_model_dir
from zturbo_train.paths import download_dir
from zturbo_train.zimage import ADAPTER_ALIASES, ADAPTER_REPO

REPO = "test-org/z-image-tiny"
SHARD = "transformer/diffusion_pytorch_model-00001-of-00003.safetensors"
SECRET = "hf_zTuRbOsEcReTtOkEn0123456789"
JUNK = [
    "README.md",
    ".gitattributes",
    "assets/sample.png",
    "z_image_turbo-Q4_K.gguf",
    "transformer/diffusion_pytorch_model.bin",
    "transformer/diffusion_pytorch_model.fp16.safetensors",
    "transformer/diffusion_pytorch_model.safetensors",
    "text_encoder/model.onnx",
    "vae/diffusion_pytorch_model.pth",
    "transformer/old/config.json",
]
# bf16 keeps 8 significant bits (relative rounding error <= 2**-9 per weight). Through the tiny
# random model, 2 sampling steps and the VAE this moved pixels (0..1) by at most 0.001 when
# measured; the bound is 0.01 (2.5 of 255 levels), and the weights themselves are checked exactly.
BF16_PIXEL_ATOL = 0.01
runner = CliRunner()


# ---------------------------------------------------------------- the fake Hub


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    """Repos in memory, a request log, and switchable faults."""

    def __init__(self) -> None:
        self.repos: dict[str, dict] = {}
        self.log: list[dict] = []
        self.drop: dict[str, int] = {}  # "repo/path" -> offset where the next GET drops the connection
        self.fail_after_drop: set[str] = set()  # "repo/path" whose GETs answer 500 after their drop
        self.dropped: set[str] = set()
        self.corrupt: set[str] = set()  # "repo/path" served with one byte flipped (same size, wrong hash)
        self.ignore_range: set[str] = set()  # "repo/path" whose GETs answer 200 and the whole file to a Range
        self.lock = threading.Lock()
        self.servers = [ThreadingHTTPServer(("127.0.0.1", 0), _Handler) for _ in range(2)]
        for server in self.servers:
            server.hub = self  # type: ignore[attr-defined]
            threading.Thread(target=server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.servers[0].server_address[1]}"
        # Like the real Hub, LFS files redirect to a CDN on another host (here: another port).
        self.cdn_url = f"http://127.0.0.1:{self.servers[1].server_address[1]}"

    def add_repo(
        self, repo: str, files: dict[str, bytes], gated: bool = False, private: bool = False, token: str | None = None
    ) -> str:
        commit = hashlib.sha1(
            repr(sorted((k, hashlib.sha256(v).hexdigest()) for k, v in files.items())).encode()
        ).hexdigest()
        self.repos[repo] = {"files": files, "commit": commit, "gated": gated, "private": private, "token": token}
        return commit

    def gets(self, suffix: str = "") -> list[dict]:
        """File transfers (GETs on /resolve/ or the CDN), optionally of one path."""
        return [
            e
            for e in self.log
            if e["method"] == "GET"
            and ("/resolve/" in e["path"] or e["path"].startswith("/cdn/"))
            and e["path"].endswith(suffix)
        ]

    def close(self) -> None:
        for server in self.servers:
            server.shutdown()
            server.server_close()


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:  # quiet
        pass

    def do_HEAD(self) -> None:
        self._answer(head=True)

    def do_GET(self) -> None:
        self._answer(head=False)

    def _answer(self, head: bool) -> None:
        hub: FakeHub = self.server.hub  # type: ignore[attr-defined]
        path = unquote(urlsplit(self.path).path)
        entry = {
            "method": self.command,
            "path": path,
            "range": self.headers.get("Range"),
            "auth": self.headers.get("Authorization"),
            "sent": 0,
        }
        with hub.lock:
            hub.log.append(entry)
        cdn = re.fullmatch(r"/cdn/([^/]+/[^/]+)/(.+)", path)
        if cdn and cdn.group(1) in hub.repos:  # a signed CDN URL: no auth, no redirect
            return self._file(hub, cdn.group(1), hub.repos[cdn.group(1)], cdn.group(2), head, entry, redirect=False)
        api = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/(.+))?", path)
        resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        match = api or resolve
        if match is None:
            return self._error(404, None, "not an endpoint of this fake Hub")
        repo = hub.repos.get(match.group(1))
        if repo is None:
            return self._error(404, "RepoNotFound", "Repository not found")
        authorised = repo["token"] is None or self.headers.get("Authorization") == f"Bearer {repo['token']}"
        if repo["private"] and not authorised:
            return self._error(401, "RepoNotFound", "Invalid username or password.")
        revision = match.group(2) or "main"
        if revision not in ("main", repo["commit"]):
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        if api:
            return self._json(self._info(match.group(1), repo))
        if repo["gated"] and not authorised:
            return self._error(
                401,
                "GatedRepo",
                f"Access to model {match.group(1)} is restricted. You must have "
                "access to it and be authenticated to access it. Please log in.",
            )
        self._file(hub, match.group(1), repo, match.group(3), head, entry)

    def _info(self, name: str, repo: dict) -> dict:
        siblings = []
        for rel, data in sorted(repo["files"].items()):
            sibling = {"rfilename": rel, "size": len(data), "blobId": git_blob_sha1(data)}
            if rel.endswith((".safetensors", ".bin", ".gguf", ".onnx", ".pth", ".png")):
                sibling["lfs"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "pointerSize": 134}
            siblings.append(sibling)
        return {
            "_id": "0",
            "id": name,
            "modelId": name,
            "sha": repo["commit"],
            "private": repo["private"],
            "gated": "manual" if repo["gated"] else False,
            "disabled": False,
            "library_name": "diffusers",
            "tags": [],
            "siblings": siblings,
        }

    def _file(
        self, hub: FakeHub, name: str, repo: dict, rel: str, head: bool, entry: dict, redirect: bool = True
    ) -> None:
        data = repo["files"].get(rel)
        if data is None:
            return self._error(404, "EntryNotFound", f"{rel} does not exist")
        key = f"{name}/{rel}"
        if not head and key in hub.dropped and key in hub.fail_after_drop:
            return self._error(500, None, "Internal Error")
        lfs = rel.endswith(".safetensors")
        oid = hashlib.sha256(data).hexdigest() if lfs else git_blob_sha1(data)
        if lfs and redirect:
            self.send_response(302)
            self.send_header("Location", f"{hub.cdn_url}/cdn/{name}/{rel}")
            self.send_header("X-Repo-Commit", repo["commit"])
            self.send_header("ETag", f'"{oid}"')
            self.send_header("X-Linked-Etag", f'"{oid}"')
            self.send_header("X-Linked-Size", str(len(data)))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        start = 0
        ranged = self.headers.get("Range")
        if ranged and not head and key not in hub.ignore_range:
            start = int(re.fullmatch(r"bytes=(\d+)-", ranged).group(1))
        self.send_response(206 if start else 200)
        self.send_header("X-Repo-Commit", repo["commit"])
        self.send_header("ETag", f'"{oid}"')
        if lfs:
            self.send_header("X-Linked-Etag", f'"{oid}"')
            self.send_header("X-Linked-Size", str(len(data)))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(len(data) - start))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if head:
            return
        cut = hub.drop.pop(key, None) if key not in hub.dropped else None
        body = data[start:cut] if cut is not None else data[start:]
        if key in hub.corrupt:
            body = bytes([body[0] ^ 0xFF]) + body[1:]
        self.wfile.write(body)
        entry["sent"] = len(body)
        if cut is not None:  # the network drops mid-file
            hub.dropped.add(key)
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True

    def _error(self, status: int, code: str | None, message: str) -> None:
        body = json.dumps({"error": message}).encode()
        self.send_response(status)
        if code:
            self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj: dict) -> None:
        body = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def model_files(tiny_dir) -> dict[str, bytes]:
    """builtin:tiny as a Hub repo: the transformer in 3 shards + index, plus files a download must skip."""
    files = {str(p.relative_to(tiny_dir)): p.read_bytes() for p in sorted(tiny_dir.rglob("*")) if p.is_file()}
    state = load_file(tiny_dir / "transformer" / "diffusion_pytorch_model.safetensors")
    keys = sorted(state)
    weight_map = {}
    for i in range(3):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-00003.safetensors"
        chunk = {k: state[k] for k in keys[i::3]}
        files[f"transformer/{name}"] = save(chunk, metadata={"format": "pt"})
        weight_map.update({k: name for k in chunk})
    total = sum(t.numel() * t.element_size() for t in state.values())
    files["transformer/diffusion_pytorch_model.safetensors.index.json"] = json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2
    ).encode()
    for junk in JUNK:
        files.setdefault(junk, b"never fetched " + junk.encode())
    return files


@pytest.fixture(scope="session")
def adapter_files(tiny_adapter) -> dict[str, bytes]:
    from zturbo_train.testing.tiny import build_tiny_adapter

    return {
        ADAPTER_ALIASES["v1"].split("/")[-1]: tiny_adapter.read_bytes(),
        ADAPTER_ALIASES["v2"].split("/")[-1]: save(build_tiny_adapter(seed=2)),
        "README.md": b"# adapter",
    }


@pytest.fixture
def hub(monkeypatch, tmp_path, model_files, adapter_files):
    """A fake Hub serving the tiny model and adapter, with huggingface_hub pointed at it and online."""
    from huggingface_hub import constants

    fake = FakeHub()
    fake.add_repo(REPO, model_files)
    fake.add_repo(ADAPTER_REPO, adapter_files)
    monkeypatch.setenv("HF_ENDPOINT", fake.url)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 256)  # small chunks: a drop mid-file keeps bytes
    for name in (
        "HF_TOKEN",
        "HUGGING_FACE_HUB_TOKEN",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("ZTURBO_HOME", str(tmp_path / "home"))
    yield fake
    fake.close()


def _sample(parts) -> torch.Tensor:
    pipe = build_pipeline(parts)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        "a red cube on a blue floor",
        height=64,
        width=64,
        num_inference_steps=2,
        guidance_scale=0.0,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    )
    return out.images[0].float()


# ---------------------------------------------------------------- tests


def test_full_download_loads_and_samples_like_the_source(hub, model_files, tiny_parts):
    result = download_model(REPO)
    folder = download_dir(REPO)
    assert result.folder == folder and result.fetched_bytes > 0
    got = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and STAGING not in p.parts}
    expected = {p for p in model_files if wanted(p)} - {"transformer/diffusion_pytorch_model.safetensors"}
    assert got == expected | {MANIFEST}
    assert not any(junk in got for junk in JUNK)
    for rel in expected:
        assert (folder / rel).read_bytes() == model_files[rel], rel
    manifest = read_manifest(folder)
    assert manifest["complete"] is True and manifest["repo"] == REPO and manifest["commit"] == hub.repos[REPO]["commit"]
    assert resolve_model_dir(REPO) == folder  # the loader finds it by repo id
    parts = load_parts(REPO, dtype="fp32")
    assert torch.equal(_sample(parts), _sample(tiny_parts))


def test_second_run_fetches_nothing_and_says_so(hub):
    download_model(REPO)
    hub.log.clear()
    again = download_model(REPO)
    assert not again.changed and again.fetched_bytes == 0
    assert {f.action for f in again.files} == {"present"}
    assert hub.gets() == [] and [e["method"] for e in hub.log] == ["GET"]  # one listing call, no file request
    result = runner.invoke(app, ["download", "--model", REPO, "--adapter", "none"])
    assert result.exit_code == 0, result.output
    assert "nothing was downloaded" in result.output


def test_dropped_connection_resumes_within_the_run(hub, model_files):
    hub.drop[f"{REPO}/{SHARD}"] = 1024
    download_model(REPO)
    gets = hub.gets(SHARD)
    assert len(gets) == 2 and gets[0]["range"] is None
    resumed_at = int(gets[1]["range"].removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_at <= 1024 and gets[1]["sent"] == len(model_files[SHARD]) - resumed_at
    assert (download_dir(REPO) / SHARD).read_bytes() == model_files[SHARD]


def test_interrupted_run_resumes_in_the_next_run(hub, model_files):
    key = f"{REPO}/{SHARD}"
    hub.drop[key] = 1024
    hub.fail_after_drop.add(key)
    with pytest.raises(DownloadError, match="answered 500.*partial ones resume"):
        download_model(REPO)
    folder = download_dir(REPO)
    partial = list((folder / STAGING / "partial").rglob("*.part"))
    assert len(partial) == 1 and 0 < partial[0].stat().st_size <= 1024
    have = partial[0].stat().st_size
    assert not (folder / "model_index.json").exists()  # a half download is never taken for a model
    with pytest.raises(ModelError, match="not downloaded yet"):
        resolve_model_dir(REPO)
    hub.fail_after_drop.clear()
    hub.log.clear()
    result = download_model(REPO)
    (last,) = hub.gets(SHARD)
    assert last["range"] == f"bytes={have}-" and last["sent"] == len(model_files[SHARD]) - have
    assert next(f.action for f in result.files if f.path == SHARD) == "resumed"
    assert (folder / SHARD).read_bytes() == model_files[SHARD]
    assert not (folder / STAGING / "partial").exists()


def test_server_that_ignores_range_still_gives_the_right_file(hub, model_files):
    """A CDN may answer a Range request with 200 and the whole file: the partial bytes must be replaced,
    not prepended, and the hash checked on what is on disk. Both in the next run and within one run."""
    key = f"{REPO}/{SHARD}"
    hub.drop[key] = 1024
    hub.fail_after_drop.add(key)
    with pytest.raises(DownloadError, match="partial ones resume"):
        download_model(REPO)
    hub.fail_after_drop.clear()
    hub.ignore_range.add(key)
    hub.log.clear()
    result = download_model(REPO)
    (last,) = hub.gets(SHARD)
    assert last["range"] is not None and last["sent"] == len(model_files[SHARD])  # asked to resume, got it all
    folder = download_dir(REPO)
    assert (folder / SHARD).read_bytes() == model_files[SHARD]
    assert result.fetched_bytes == sum(e["sent"] for e in hub.gets())  # counts the re-sent bytes too
    assert next(f.action for f in result.files if f.path == SHARD) == "resumed"
    assert not (folder / STAGING / "partial").exists()
    shutil.rmtree(folder)
    hub.dropped.clear()
    hub.drop[key] = 1024  # a drop within the run, retried with a Range the server ignores
    hub.log.clear()
    download_model(REPO)
    assert [g["range"] is not None for g in hub.gets(SHARD)] == [False, True]
    assert (folder / SHARD).read_bytes() == model_files[SHARD]


def test_hf_hub_download_starts_over_after_an_interrupted_run(hub, model_files, tmp_path):
    """Why hub/fetch.py has its own loop: huggingface_hub's hf_hub_download drops the bytes of an interrupted
    run and fetches the whole file again in the next. If this fails, the hub resumes now: use hf_hub_download."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError

    key = f"{REPO}/{SHARD}"
    hub.drop[key] = 1024
    hub.fail_after_drop.add(key)
    with pytest.raises(HfHubHTTPError):
        hf_hub_download(REPO, SHARD, cache_dir=tmp_path / "hf", endpoint=hub.url)
    hub.fail_after_drop.clear()
    hub.log.clear()
    path = hf_hub_download(REPO, SHARD, cache_dir=tmp_path / "hf", endpoint=hub.url)
    (again,) = hub.gets(SHARD)
    assert again["range"] is None and again["sent"] == len(model_files[SHARD])  # from byte 0: nothing kept
    assert Path(path).read_bytes() == model_files[SHARD]


def test_repo_not_found_404(hub):
    with pytest.raises(DownloadError) as info:
        download_model("nobody/missing")
    message = str(info.value)
    assert "nobody/missing was not found" in message and "(404)" in message
    assert not download_dir("nobody/missing").exists()


def test_gated_repo_401_says_how_to_log_in_and_accept(hub, model_files):
    hub.add_repo("gated/z-image", model_files, gated=True, token=SECRET)
    with pytest.raises(DownloadError) as info:
        download_model("gated/z-image")
    message = str(info.value)
    assert "gated" in message and "401" in message and f"{hub.url}/gated/z-image" in message
    for hint in ("accept the licence", "hf auth login", "huggingface-cli login", "HF_TOKEN"):
        assert hint in message
    assert "\n" not in message
    assert download_model("gated/z-image", token=SECRET).fetched_bytes > 0


def test_private_repo_401_on_listing(hub, model_files):
    hub.add_repo("private/z-image", model_files, private=True, token=SECRET)
    with pytest.raises(DownloadError, match=r"not authorised to download private/z-image \(401.*HF_TOKEN"):
        download_model("private/z-image", token="hf_wrong")


def test_token_never_printed_logged_or_written(hub, model_files, tmp_path, monkeypatch, caplog):
    hub.add_repo("gated/z-image", model_files, gated=True, token=SECRET)
    caplog.set_level("DEBUG")
    ok = runner.invoke(app, ["download", "--model", "gated/z-image", "--adapter", "none", "--token", SECRET])
    assert ok.exit_code == 0, ok.output
    assert any(e["auth"] == f"Bearer {SECRET}" for e in hub.log if "/resolve/" in e["path"])  # the token was used...
    cdn = [e for e in hub.log if e["path"].startswith("/cdn/")]
    assert cdn and all(e["auth"] is None for e in cdn)  # ...but never sent to the CDN...
    bad = runner.invoke(
        app,
        [
            "download",
            "--model",
            "gated/z-image",
            "--adapter",
            "none",
            "--token",
            SECRET[:-1] + "X",
            "--dir",
            str(tmp_path / "other"),
        ],
    )
    assert bad.exit_code == 1 and "error:" in bad.output
    monkeypatch.setenv("HF_TOKEN", SECRET)  # ...and HF_TOKEN is respected
    env = runner.invoke(
        app, ["download", "--model", "gated/z-image", "--adapter", "none", "--dir", str(tmp_path / "env")]
    )
    assert env.exit_code == 0, env.output
    for text in (ok.output, bad.output, env.output, caplog.text):  # ...but never shown
        assert SECRET not in text and SECRET[:-1] not in text
    roots = {tmp_path, Path(os.environ["HF_HOME"]), Path(os.environ["ZTURBO_HOME"])}
    for root in roots:
        for path in root.rglob("*"):
            if path.is_file():
                assert SECRET[:-1].encode() not in path.read_bytes(), path


def test_bf16_folder_matches_fp32_within_tolerance(hub, model_files, tmp_path):
    fp32_dir, bf16_dir = tmp_path / "fp32", tmp_path / "bf16"
    download_model(REPO, fp32_dir)
    result = download_model(REPO, bf16_dir, bf16=True)
    assert {f.action for f in result.files if f.path.startswith("transformer/")} >= {"fetched+bf16"}
    shards = sorted((bf16_dir / "transformer").glob("*.safetensors"))
    assert len(shards) == 3
    for shard in shards:
        with safe_open(str(shard), "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
        assert shard.stat().st_size < 0.6 * (fp32_dir / "transformer" / shard.name).stat().st_size
    index = json.loads((bf16_dir / "transformer" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(safetensors_data_bytes(s) for s in shards)
    assert stored_dtype(bf16_dir, "transformer") == "bf16" and stored_dtype(fp32_dir, "transformer") is None
    # Exact: every bf16 weight is the fp32 weight rounded to bf16.
    full = load_parts(str(fp32_dir), parts=["transformer"], dtype="fp32").transformer.state_dict()
    half = load_parts(str(bf16_dir), parts=["transformer"], dtype="fp32").transformer.state_dict()
    for key, value in full.items():
        assert torch.equal(half[key], value.to(torch.bfloat16).float()), key
    # And the pipeline's images stay within bf16 tolerance.
    image32 = _sample(load_parts(str(fp32_dir), dtype="fp32"))
    image16 = _sample(load_parts(str(bf16_dir), dtype="fp32"))
    diff = (image32 - image16).abs()
    assert diff.max() < BF16_PIXEL_ATOL and diff.max() > 0


def test_bf16_reruns_and_converting_an_existing_folder(hub, tmp_path):
    folder = tmp_path / "model"
    download_model(REPO, folder)
    hub.log.clear()
    converted = download_model(REPO, folder, bf16=True)  # converts in place, fetches nothing
    assert hub.gets() == [] and converted.fetched_bytes == 0
    assert sorted(f.path for f in converted.files if f.action == "converted") == [
        f"transformer/diffusion_pytorch_model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)
    ] + ["transformer/diffusion_pytorch_model.safetensors.index.json"]
    again = download_model(REPO, folder, bf16=True)
    assert not again.changed
    plain = download_model(REPO, folder)  # without --bf16 the folder stays bf16, and says so
    assert not plain.changed and any("stays bf16" in note for note in plain.notes)
    assert stored_dtype(folder, "transformer") == "bf16"


def test_disk_full_is_refused_up_front(hub, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 10**12 - 1000, 1000))
    with pytest.raises(DownloadError, match=r"not enough disk space .* needs .* but only 1.0 kB is free.*--bf16"):
        download_model(REPO)
    assert not any(e["path"].endswith(".safetensors") for e in hub.gets())
    assert not (download_dir(REPO) / "model_index.json").exists()


def test_folder_holding_something_else_is_refused(hub, tmp_path):
    other = tmp_path / "photos"
    other.mkdir()
    (other / "holiday.jpg").write_bytes(b"jpeg")
    with pytest.raises(DownloadError, match=r"already holds other files \(holiday.jpg\)"):
        download_model(REPO, other)
    assert sorted(p.name for p in other.iterdir()) == ["holiday.jpg"]
    mine = tmp_path / "mine"
    download_model(REPO, mine)
    with pytest.raises(DownloadError, match=f"holds a download of {REPO}, not someone/else"):
        download_model("someone/else", mine)
    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(DownloadError, match="is a file, not a folder"):
        download_model(REPO, afile)


def test_no_network_and_offline_mode(hub, monkeypatch):
    from huggingface_hub import constants

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed}")
    with pytest.raises(DownloadError, match="cannot reach the Hub at http://127.0.0.1.*run again"):
        download_model(REPO)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DownloadError, match="offline mode is on.*unset HF_HUB_OFFLINE"):
        download_model(REPO)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    download_model(REPO)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # complete already: kept, with a note
    kept = download_model(REPO)
    assert not kept.changed and "offline mode is on" in kept.notes[0]


def test_adapter_download_and_resolve(hub, adapter_files, tiny_adapter, tmp_path):
    with pytest.raises(AdapterError, match=r"not downloaded; run `zturbo download --adapter v2`"):
        resolve_adapter_file("v2")
    result = download_adapter("v2")
    v2 = ADAPTER_ALIASES["v2"].split("/")[-1]
    assert result.folder == adapter_dir() == download_dir(ADAPTER_REPO)
    assert resolve_adapter_file("v2") == adapter_dir() / v2
    assert resolve_adapter_file(ADAPTER_ALIASES["v2"]) == adapter_dir() / v2
    assert (adapter_dir() / v2).read_bytes() == adapter_files[v2]
    with pytest.raises(AdapterError, match="--adapter v1"):
        resolve_adapter_file("v1")
    download_adapter("v1")
    assert resolve_adapter_file("v1").read_bytes() == adapter_files[ADAPTER_ALIASES["v1"].split("/")[-1]]
    assert sorted(read_manifest(adapter_dir())["files"]) == sorted(
        n for n in adapter_files if n.endswith(".safetensors")
    )
    hub.log.clear()
    assert not download_adapter("v2").changed and hub.gets() == []
    assert resolve_adapter_file("builtin:tiny-adapter").read_bytes() == tiny_adapter.read_bytes()
    assert resolve_adapter_file(str(tiny_adapter)) == tiny_adapter
    with pytest.raises(AdapterError, match="not one of v1, v2"):
        resolve_adapter_file("v3")


def test_download_all_validates_before_fetching(hub):
    with pytest.raises(AdapterError):
        download_all(REPO, adapter="v9")
    with pytest.raises(DownloadError, match="nothing to download"):
        download_all("none", adapter="none")
    assert hub.log == []


def test_cli_download_model_and_adapter(hub):
    result = runner.invoke(app, ["download", "--model", REPO, "--adapter", "v2"])
    assert result.exit_code == 0, result.output
    for text in ("zturbo download", "transformer/", "adapter", "fetched", str(download_dir(REPO))):
        assert text in result.output
    assert resolve_adapter_file("v2").is_file() and resolve_model_dir(REPO) == download_dir(REPO)
    again = runner.invoke(app, ["download", "--model", REPO, "--adapter", "v2"])
    assert again.exit_code == 0 and "nothing was downloaded" in again.output and "already present" in again.output
    quiet = runner.invoke(app, ["download", "--model", REPO, "--adapter", "v2", "--quiet"])
    assert quiet.exit_code == 0 and quiet.output.strip() == ""


def test_cli_errors_are_one_line(hub):
    result = runner.invoke(app, ["download", "--model", "nobody/missing", "--adapter", "none"])
    assert result.exit_code == 1
    assert "error: repository nobody/missing was not found" in result.output
    assert "Traceback" not in result.output


def test_cli_help_has_examples():
    result = runner.invoke(app, ["download", "--help"])
    assert result.exit_code == 0
    assert "zturbo download --bf16" in result.output and "--revision" in result.output


def test_only_needed_files_are_selected():
    real = [
        "model_index.json",
        "README.md",
        ".gitattributes",
        "assets/showcase.jpg",
        "scheduler/scheduler_config.json",
        "text_encoder/config.json",
        "text_encoder/generation_config.json",
        "text_encoder/model-00001-of-00003.safetensors",
        "text_encoder/model.safetensors.index.json",
        "text_encoder/pytorch_model.bin",
        "text_encoder/pytorch_model.bin.index.json",
        "tokenizer/merges.txt",
        "tokenizer/vocab.json",
        "tokenizer/tokenizer.json",
        "tokenizer/tokenizer_config.json",
        "transformer/config.json",
        "transformer/diffusion_pytorch_model-00001-of-00003.safetensors",
        "transformer/diffusion_pytorch_model.safetensors.index.json",
        "transformer/diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
        "transformer/diffusion_pytorch_model.safetensors.index.fp16.json",
        "transformer/model.gguf",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.bin",
        "vae/diffusion_flax_model.msgpack",
        "text_encoder/model.onnx",
        "unet/config.json",
    ]
    parts = {"scheduler", "text_encoder", "tokenizer", "transformer", "vae"}
    assert [p for p in real if wanted(p, parts)] == [
        "model_index.json",
        "scheduler/scheduler_config.json",
        "text_encoder/config.json",
        "text_encoder/generation_config.json",
        "text_encoder/model-00001-of-00003.safetensors",
        "text_encoder/model.safetensors.index.json",
        "tokenizer/merges.txt",
        "tokenizer/vocab.json",
        "tokenizer/tokenizer.json",
        "tokenizer/tokenizer_config.json",
        "transformer/config.json",
        "transformer/diffusion_pytorch_model-00001-of-00003.safetensors",
        "transformer/diffusion_pytorch_model.safetensors.index.json",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
    ]


def test_corrupt_transfer_fails_its_hash_check_and_is_not_kept(hub, model_files):
    hub.corrupt.add(f"{REPO}/{SHARD}")
    with pytest.raises(DownloadError, match=f"{SHARD} failed its hash check.*run again"):
        download_model(REPO)
    folder = download_dir(REPO)
    assert not (folder / SHARD).exists() and not list((folder / STAGING / "partial").rglob("*.part"))
    hub.corrupt.clear()
    download_model(REPO)
    assert (folder / SHARD).read_bytes() == model_files[SHARD]


def test_a_new_commit_fetches_only_what_changed(hub, model_files):
    download_model(REPO)
    changed = dict(model_files)
    changed["scheduler/scheduler_config.json"] = model_files["scheduler/scheduler_config.json"] + b"\n"
    hub.add_repo(REPO, changed)
    hub.log.clear()
    result = download_model(REPO)
    assert [e["path"].split("/resolve/")[1].split("/", 1)[1] for e in hub.gets()] == ["scheduler/scheduler_config.json"]
    assert {f.path for f in result.files if f.action != "present"} == {"scheduler/scheduler_config.json"}
    assert read_manifest(download_dir(REPO))["commit"] == hub.repos[REPO]["commit"]


def test_files_in_the_hugging_face_cache_are_linked_not_fetched(hub, model_files, adapter_files, tmp_path, monkeypatch):
    from huggingface_hub import constants, hf_hub_download

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    vae = "vae/diffusion_pytorch_model.safetensors"
    cached = Path(hf_hub_download(REPO, vae, endpoint=hub.url)).resolve()
    v1 = ADAPTER_ALIASES["v1"].split("/")[-1]
    cached_v1 = Path(hf_hub_download(ADAPTER_REPO, v1, endpoint=hub.url)).resolve()
    assert resolve_adapter_file("v1") == cached_v1  # the adapter loader finds an `hf download` copy too
    hub.log.clear()
    result = download_model(REPO)
    assert hub.gets(vae) == [] and next(f.action for f in result.files if f.path == vae) == "from HF cache"
    local = download_dir(REPO) / vae
    assert local.read_bytes() == model_files[vae] and local.stat().st_ino == cached.stat().st_ino
    # A damaged cached copy is not trusted: the file is fetched instead.
    other = tmp_path / "other"
    text_encoder = "text_encoder/model.safetensors"
    damaged = Path(hf_hub_download(REPO, text_encoder, endpoint=hub.url)).resolve()
    damaged.write_bytes(b"x" * damaged.stat().st_size)
    result = download_model(REPO, other)
    assert next(f.action for f in result.files if f.path == text_encoder) == "fetched"
    assert (other / text_encoder).read_bytes() == model_files[text_encoder]


def test_one_download_per_folder_at_a_time(hub, tmp_path):
    from filelock import FileLock

    folder = tmp_path / "model"
    (folder / STAGING).mkdir(parents=True)
    with FileLock(str(folder / STAGING / "lock")):
        with pytest.raises(DownloadError, match="another `zturbo download` is writing into"):
            download_model(REPO, folder)
    download_model(REPO, folder)


def test_revision_is_resolved_and_checked(hub):
    commit = hub.repos[REPO]["commit"]
    result = download_model(REPO, revision=commit)
    assert result.commit == commit and read_manifest(download_dir(REPO))["revision"] == commit
    with pytest.raises(DownloadError, match="revision 'v9' does not exist in test-org/z-image-tiny; pass --revision"):
        download_model(REPO, revision="v9")


def test_bf16_conversion_holds_one_tensor_at_a_time(tmp_path, monkeypatch):
    import weakref

    import zturbo_train.hub.bf16 as bf16

    path = tmp_path / "shard.safetensors"
    tensors = {f"w{i}": torch.randn(64, 64) for i in range(6)} | {"step": torch.tensor([3], dtype=torch.int64)}
    path.write_bytes(save(tensors))
    seen: list[weakref.ref] = []
    real = bf16.raw_bytes

    def watching(tensor):
        assert all(ref() is None for ref in seen), "an earlier tensor is still alive"
        seen.append(weakref.ref(tensor))
        return real(tensor)

    monkeypatch.setattr(bf16, "raw_bytes", watching)
    bf16.convert_to_bf16(path)
    assert len(seen) == len(tensors)
    out = load_file(path)
    assert out["step"].dtype == torch.int64 and torch.equal(out["step"], tensors["step"])
    for key in (k for k in tensors if k != "step"):
        assert out[key].dtype == torch.bfloat16 and torch.equal(out[key], tensors[key].to(torch.bfloat16))

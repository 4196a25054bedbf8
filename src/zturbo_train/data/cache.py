"""Disk caches of VAE latents and text embeddings, so a training step never runs either encoder.

Layout (default root: `$ZTURBO_HOME/cache`, i.e. ~/.cache/zturbo/cache, shared by runs):

    latents/<vae id>/<k[:2]>/<k>.safetensors   k = hash(image bytes, bucket, flip)
    text/<text encoder id>/<k[:2]>/<k>.safetensors   k = hash(caption)

Entries are content-addressed, so a changed image, a new bucket or another VAE re-encodes
only the entries it touches, runs with the same images share them, and nothing is ever
stale. An encoder's id hashes its folder (configs in full, weights sampled), the dtype it
runs in and a format version: computed without loading the model, which is what lets a
run with a complete cache skip the 8 GB text encoder entirely.

Latents are stored in the transformer's space, already normalised:
`mean = (mu - shift_factor) * scaling_factor`, `std = sigma * scaling_factor`, so
`mean + std * randn` is distributed exactly as
`(vae.encode(x).latent_dist.sample() - shift_factor) * scaling_factor`. They are stored
as float16: its rounding (2^-11 relative) is finer than the bf16 the transformer trains in
and halves disk and I/O. Text embeddings are stored unpadded in the encoder's dtype,
exactly as `ZImagePipeline.encode_prompt` returns them.

Every entry is written atomically (fileio), one batch at a time, so an interrupted run
keeps what it wrote and the next one encodes only the rest. An entry that cannot be read
(truncated, garbage, wrong shape) counts as missing: it is encoded again.
"""

from __future__ import annotations

import gc
import hashlib
import json
import weakref
from collections import defaultdict
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TypeVar

from ..errors import DataError, ModelError
from ..fileio import save_safetensors
from ..models import load_parts
from .buckets import Bucket, resize_crop
from .dataset import load_rgb
from .progress import progress

CACHE_VERSION = "1"  # bump when preprocessing or the file format changes
LATENT_DTYPE = "float16"
_FULL_HASH_BYTES = 4 << 20
_SAMPLE_CHUNKS, _CHUNK = 64, 64 << 10
T = TypeVar("T")


# ---------------------------------------------------------------------- encoder identity


def folder_fingerprint(folder: Path) -> str:
    """A hash of a model part folder: small files in full, large weight files by size and 64 sampled chunks.

    Sampling keeps an 8 GB text encoder at a millisecond read; two different weight
    files of the same size still differ in essentially every chunk.
    """
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        size = path.stat().st_size
        digest.update(f"{path.relative_to(folder).as_posix()}:{size}\n".encode())
        with open(path, "rb") as handle:
            if size <= _FULL_HASH_BYTES:
                digest.update(handle.read())
                continue
            for i in range(_SAMPLE_CHUNKS):
                handle.seek((size - _CHUNK) * i // (_SAMPLE_CHUNKS - 1))
                digest.update(handle.read(_CHUNK))
    return digest.hexdigest()


def _short(*parts: Any) -> str:
    return hashlib.sha256("|".join(str(p) for p in parts).encode()).hexdigest()[:20]


@dataclass
class Encoders:
    """Where the VAE and text encoder come from and how they run: keys the caches without loading them.

    `loads` records each part actually loaded, so callers (and tests) can see that a run
    with complete caches loaded nothing.
    """

    model_dir: Path
    device: Any = "cpu"
    vae_dtype: str = "fp32"
    text_dtype: str = "bf16"
    max_length: int = 512
    loads: list[str] = field(default_factory=list)

    @cached_property
    def vae_id(self) -> str:
        return _short(CACHE_VERSION, "vae", self.vae_dtype, folder_fingerprint(self._part("vae")))

    @cached_property
    def text_id(self) -> str:
        return _short(
            CACHE_VERSION,
            "text",
            self.text_dtype,
            self.max_length,
            folder_fingerprint(self._part("text_encoder")),
            folder_fingerprint(self._part("tokenizer")),
        )

    def part_config(self, part: str) -> dict:
        try:
            return json.loads((self._part(part) / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ModelError(
                f"{self._part(part)}/config.json cannot be read ({exc}); download the model again"
            ) from None

    def load_vae(self):
        self.loads.append("vae")
        return load_parts(self.model_dir, ["vae"], dtype=self.vae_dtype, device=str(self.device)).vae

    def load_text(self):
        """(tokenizer, text_encoder)."""
        self.loads.append("text_encoder")
        parts = load_parts(
            self.model_dir, ["tokenizer", "text_encoder"], dtype=self.text_dtype, device=str(self.device)
        )
        return parts.tokenizer, parts.text_encoder

    def _part(self, part: str) -> Path:
        folder = Path(self.model_dir) / part
        if not folder.is_dir():
            raise ModelError(
                f"{self.model_dir} has no {part}/ folder; the download is incomplete, run `zturbo download` again"
            )
        return folder


# ---------------------------------------------------------------------- encoding


def encode_prompts(tokenizer, text_encoder, prompts: Sequence[str], device, max_length: int = 512) -> list:
    """Text embeddings exactly as `ZImagePipeline.encode_prompt`: chat template, pad to max_length,
    second-to-last hidden state, padding removed. One unpadded (L_i, D) tensor per prompt."""
    import torch

    if not prompts:
        return []
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True, enable_thinking=True
        )
        for p in prompts
    ]
    inputs = tokenizer(texts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    ids = inputs.input_ids.to(device)
    mask = inputs.attention_mask.to(device).bool()
    with torch.no_grad():
        hidden = text_encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-2]
    return [hidden[i][mask[i]] for i in range(len(texts))]


def encode_latents(vae, pixels) -> tuple:
    """(mean, std) of the latent distribution of a batch of [-1, 1] images, normalised for the transformer."""
    import torch

    cfg = vae.config
    with torch.no_grad():
        dist = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist
    mean = (dist.mean.float() - cfg.shift_factor) * cfg.scaling_factor
    std = dist.std.float() * cfg.scaling_factor
    if not (torch.isfinite(mean).all() and torch.isfinite(std).all()):
        raise ModelError("the VAE produced NaN/inf latents; encode with vae_dtype fp32 (fp16 overflows the FLUX VAE)")
    return mean, std


def image_tensor(image):
    """PIL RGB image to a (3, H, W) float tensor in [-1, 1], the VAE's input range."""
    import numpy as np
    import torch

    array = np.asarray(image, dtype=np.uint8).copy()
    return torch.from_numpy(array).permute(2, 0, 1).float() / 127.5 - 1.0


def bucket_pixels(path: Path, bucket: Bucket, flip: bool, content_hash: str | None = None):
    """The exact pixels an entry encodes: decode, resize and centre-crop to the bucket, mirror if flipped."""
    data = path.read_bytes()
    if content_hash is not None and hashlib.sha256(data).hexdigest() != content_hash:
        raise DataError(f"{path} changed while the cache was being filled; run again to pick up the new version")
    pixels = image_tensor(resize_crop(load_rgb(data), bucket))
    return pixels.flip(-1) if flip else pixels


# ---------------------------------------------------------------------- files


def entry_path(root: Path, key: str) -> Path:
    return root / key[:2] / f"{key}.safetensors"


def latent_key(content_hash: str, bucket: Bucket, flip: bool) -> str:
    return hashlib.sha256(f"{content_hash}|{bucket[0]}x{bucket[1]}|{int(flip)}".encode()).hexdigest()[:32]


def text_key(caption: str) -> str:
    return hashlib.sha256(caption.encode("utf-8")).hexdigest()[:32]


def latent_entry_ok(path: Path, bucket: Bucket) -> bool:
    """True if `path` is a readable latent entry of the bucket's shape (reads the header only)."""
    shape = _shapes(path, ("mean", "std"))
    want = [bucket[1] // 8, bucket[0] // 8]
    return bool(shape) and shape["mean"] == shape["std"] and len(shape["mean"]) == 3 and shape["mean"][1:] == want


def text_entry_ok(path: Path, hidden_size: int | None = None) -> bool:
    """True if `path` is a readable (L, D) embedding entry (reads the header only)."""
    shape = _shapes(path, ("embedding",))
    if not shape or len(shape["embedding"]) != 2 or shape["embedding"][0] < 1:
        return False
    return hidden_size is None or shape["embedding"][1] == hidden_size


def _shapes(path: Path, names: Sequence[str]) -> dict[str, list[int]]:
    """Tensor shapes from a safetensors header; {} when the file is missing, torn or lacks a name."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            if set(handle.keys()) != set(names):
                return {}
            return {name: list(handle.get_slice(name).get_shape()) for name in names}
    except Exception:  # noqa: BLE001 - any failure to parse means "not a valid entry"
        return {}


def read_entry(path: Path) -> dict:
    """Load a cache entry; a corrupt one is removed and reported so the next run re-encodes it."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # noqa: BLE001
        path.unlink(missing_ok=True)
        raise DataError(f"cache file {path} is corrupt ({exc}); it was removed, run again to re-encode it") from None


# ---------------------------------------------------------------------- filling


@dataclass(frozen=True)
class LatentJob:
    """One latent entry to have: which image, bucket and flip, and where it goes."""

    image: Path
    content_hash: str
    bucket: Bucket
    flip: bool
    path: Path


@dataclass
class CacheStats:
    """What a cache pass did: counted so reuse and invalidation can be checked and reported."""

    latents_encoded: int = 0
    latents_reused: int = 0
    texts_encoded: int = 0
    texts_reused: int = 0
    corrupt: list[Path] = field(default_factory=list)


def missing_entries(
    items: Sequence[T], path_of: Callable[[T], Path], ok: Callable[[T], bool], stats: CacheStats
) -> list[T]:
    """The items to encode: entry absent, or present but unreadable (those are noted as corrupt)."""
    todo = []
    for item in items:
        if ok(item):
            continue
        if path_of(item).exists():
            stats.corrupt.append(path_of(item))
        todo.append(item)
    return todo


def fill_latents(
    jobs: Sequence[LatentJob], encoders: Encoders, stats: CacheStats, console=None, batch_size: int = 4
) -> None:
    """Encode every job whose entry is missing or corrupt, batched per bucket; loads the VAE only if needed."""
    unique = list({job.path: job for job in jobs}.values())
    todo = missing_entries(unique, lambda j: j.path, lambda j: latent_entry_ok(j.path, j.bucket), stats)
    stats.latents_reused += len(unique) - len(todo)
    if not todo:
        return
    vae = encoders.load_vae()
    alive = weakref.ref(vae)
    try:
        with progress(console, "caching latents", len(todo)) as advance:
            for batch in _bucket_batches(todo, batch_size):
                _encode_latent_batch(vae, batch, encoders.vae_id)
                stats.latents_encoded += len(batch)
                advance(len(batch))
    finally:
        del vae
        free_memory(encoders.device, alive)


def _bucket_batches(jobs: Sequence[LatentJob], batch_size: int) -> Iterator[list[LatentJob]]:
    groups: dict[Bucket, list[LatentJob]] = defaultdict(list)
    for job in jobs:
        groups[job.bucket].append(job)
    for bucket in sorted(groups):
        group = groups[bucket]
        for start in range(0, len(group), batch_size):
            yield group[start : start + batch_size]


def _encode_latent_batch(vae, batch: Sequence[LatentJob], vae_id: str) -> None:
    import torch

    pixels = torch.stack([bucket_pixels(j.image, j.bucket, j.flip, j.content_hash) for j in batch])
    mean, std = encode_latents(vae, pixels)
    for i, job in enumerate(batch):
        save_safetensors(
            job.path,
            {"mean": mean[i].to(getattr(torch, LATENT_DTYPE)), "std": std[i].to(getattr(torch, LATENT_DTYPE))},
            {
                "image": job.image,
                "bucket": f"{job.bucket[0]}x{job.bucket[1]}",
                "flip": job.flip,
                "vae": vae_id,
                "version": CACHE_VERSION,
            },
        )


def fill_texts(
    captions: dict[str, Path], encoders: Encoders, stats: CacheStats, console=None, batch_size: int = 8
) -> None:
    """Encode every caption whose entry is missing or corrupt; loads the text encoder only if needed."""
    hidden = encoders.part_config("text_encoder").get("hidden_size")
    items = list(captions.items())
    todo = missing_entries(items, lambda item: item[1], lambda item: text_entry_ok(item[1], hidden), stats)
    stats.texts_reused += len(items) - len(todo)
    if not todo:
        return
    tokenizer, text_encoder = encoders.load_text()
    alive = weakref.ref(text_encoder)
    try:
        with progress(console, "caching captions", len(todo)) as advance:
            for start in range(0, len(todo), batch_size):
                chunk = todo[start : start + batch_size]
                embeds = encode_prompts(
                    tokenizer, text_encoder, [c for c, _ in chunk], encoders.device, encoders.max_length
                )
                for (caption, path), embed in zip(chunk, embeds):
                    save_safetensors(path, {"embedding": embed.cpu()}, {"caption": caption, "version": CACHE_VERSION})
                stats.texts_encoded += len(chunk)
                advance(len(chunk))
    finally:
        del tokenizer, text_encoder
        free_memory(encoders.device, alive)


def free_memory(device: Any, alive: Callable[[], Any] | None = None) -> None:
    """Give an encoder's memory back: a full gc only if references cycles kept it alive, then CUDA's cache."""
    import torch

    if alive is None or alive() is not None:
        gc.collect()
    if str(device).startswith("cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()

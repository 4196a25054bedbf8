"""Sampling: ZImagePipeline's denoising loop over prompt embeddings, and `zturbo sample`.

Two layers:
- `generate_latents` / `decode_latents` / `generate_images` work from prompt embeddings,
  so training previews need no text encoder. They reproduce `ZImagePipeline.__call__`
  step for step (same sigmas, mu, model time, negated output, fp32 latents, scheduler
  step, CFG, per-seed CPU generators), so a seed gives the image diffusers gives for
  `generator=torch.Generator().manual_seed(seed)`; tests/test_sample.py pins that.
- `sample(settings)` is the command: load the model, attach LoRAs, encode prompts once,
  generate in batches, write PNGs with their settings in the metadata, never overwrite.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

import torch
from torch import Tensor

from ..errors import ConfigError, ModelError
from ..lora.formats import LoraDict, read_lora_file
from ..preflight import (  # noqa: F401  (parse_lora_spec, read_prompts_file: imported from here by callers)
    SIZE_MULTIPLE,
    LoraSpec,
    SampleSettings,
    check_lora_files,
    check_sample,
    check_size,
    parse_lora_spec,
    read_prompts_file,
)

if TYPE_CHECKING:  # pragma: no cover
    from PIL.Image import Image

    from ..lora.network import LoraNetwork

Log = Callable[[str], None]
LATENT_CHANNELS = 16
NAME_PATTERN = re.compile(r"^(\d{5,})-")
OFFLOAD_MARGIN_BYTES = 3 * 2**30  # activations, VAE and LoRAs beside the transformer on the GPU


def _quiet(message: str) -> None:
    """Default log: say nothing (the CLI passes its console)."""


# ------------------------------------------------------------------ LoRA arguments


@dataclass
class LoadedLora:
    """A LoRA file read and hashed, ready to attach or merge."""

    spec: LoraSpec
    weights: LoraDict
    metadata: dict[str, str]
    sha256: str

    def describe(self) -> dict[str, object]:
        """What goes into image and model metadata: enough to find the exact file again."""
        return {"name": self.spec.path.name, "path": str(self.spec.path), "strength": self.spec.strength,
                "sha256": self.sha256}


def file_sha256(path: Path) -> str:
    """sha256 of a file, streamed (LoRAs can be hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_loras(specs: Iterable[LoraSpec]) -> list[LoadedLora]:
    """Read every LoRA before any model loads, so a bad file fails in a second, not after minutes."""
    loaded = []
    for spec in specs:
        check_lora_files([spec])
        weights, metadata = read_lora_file(spec.path)
        loaded.append(LoadedLora(spec, weights, metadata, file_sha256(spec.path)))
    return loaded


def attach_loras(transformer: torch.nn.Module, loras: Sequence[LoadedLora], log: Log = _quiet) -> list["LoraNetwork"]:
    """Hook each LoRA on at its strength; another model's LoRA is refused, a partial match warned about."""
    from ..lora.network import load_lora

    networks = []
    for item in loras:
        network = load_lora(transformer, item.weights, multiplier=item.spec.strength, what=str(item.spec.path))
        if network.unmatched:
            log(f"warning: {item.spec.path.name}: {len(network.unmatched)} of {len(item.weights)} modules are not in "
                f"this model and were skipped (e.g. {', '.join(network.unmatched[:3])})")
        networks.append(network)
    return networks


# ------------------------------------------------------------------ the denoising loop


def sampling_sigmas(steps: int) -> list[float]:
    """ZImagePipeline's default schedule before the scheduler's shift: linspace(1, 1/steps, steps)."""
    return torch.linspace(1.0, 1 / steps, steps).tolist()


def set_schedule(scheduler, steps: int, latent_height: int, latent_width: int, device: torch.device) -> Tensor:
    """Set the timesteps exactly as the pipeline does (mu from the image sequence length) and return them."""
    from diffusers.pipelines.z_image.pipeline_z_image import calculate_shift

    config = scheduler.config
    mu = calculate_shift((latent_height // 2) * (latent_width // 2), config.get("base_image_seq_len", 256),
                         config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                         config.get("max_shift", 1.15))
    scheduler.set_timesteps(sigmas=sampling_sigmas(steps), device=device, mu=mu)
    scheduler.set_begin_index(0)
    return scheduler.timesteps


def initial_latents(seeds: Sequence[int], height: int, width: int, device: torch.device,
                    channels: int = LATENT_CHANNELS) -> Tensor:
    """Noise drawn per seed on a CPU generator, fp32, as the pipeline's `randn_tensor` does for
    `generator=torch.Generator().manual_seed(seed)` (one per image), then moved to `device`."""
    shape = (1, channels, 2 * (height // SIZE_MULTIPLE), 2 * (width // SIZE_MULTIPLE))
    draws = [torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(s)), dtype=torch.float32)
             for s in seeds]
    return torch.cat(draws).to(device)


def _velocity(transformer, latents: Tensor, t: Tensor, cond: list[Tensor], uncond: list[Tensor] | None,
              scale: float, dtype: torch.dtype) -> Tensor:
    """The pipeline's step input: the network output (CFG-combined when `uncond`), negated, in fp32."""
    from ..flow import predict

    batch = latents.shape[0]
    timestep = (1000 - t.expand(batch)) / 1000
    x = latents.to(dtype)
    if uncond is None:
        out = predict(transformer, x, timestep, cond).float()
    else:
        both = predict(transformer, x.repeat(2, 1, 1, 1), timestep.repeat(2), cond + uncond).float()
        pos, neg = both[:batch], both[batch:]
        out = pos + scale * (pos - neg)
    return -out


@torch.no_grad()
def generate_latents(transformer, scheduler, prompt_embeds: Sequence[Tensor], *, width: int, height: int,
                     seeds: Sequence[int], steps: int = 8, guidance: float = 0.0,
                     negative_embeds: Sequence[Tensor] | None = None, device: torch.device | str | None = None,
                     dtype: torch.dtype | None = None, cfg_truncation: float = 1.0) -> Tensor:
    """Denoise one image per (embedding, seed) as ZImagePipeline does; returns fp32 latents (B, 16, H/8, W/8).

    `prompt_embeds`: one unpadded (L_i, cap_dim) tensor per image (the text encoder's
    second-to-last layer, as `ZImagePipeline.encode_prompt` returns them). CFG runs when
    `guidance` > 0 and then needs `negative_embeds` (the encoded negative prompt, "" for
    none). The caller's scheduler is not touched: a fresh copy holds the loop's state.
    `device` is where the loop runs (the execution device under CPU offload).
    """
    check_size(width, height)
    if steps < 1:
        raise ConfigError(f"steps {steps} must be at least 1; Turbo uses 8")
    if len(seeds) != len(prompt_embeds):
        raise ValueError(f"{len(prompt_embeds)} prompt embeddings but {len(seeds)} seeds; give one seed per image")
    use_cfg = guidance > 0
    if use_cfg and (negative_embeds is None or len(negative_embeds) != len(prompt_embeds)):
        raise ConfigError(f"guidance {guidance} needs one negative embedding per image (encode \"\" for none), "
                          "or set guidance to 0 (Turbo's default)")
    device = torch.device(device) if device is not None else next(transformer.parameters()).device
    dtype = dtype or transformer.dtype
    schedule = type(scheduler).from_config(scheduler.config)
    latents = initial_latents(seeds, height, width, device, transformer.config.in_channels)
    timesteps = set_schedule(schedule, steps, latents.shape[2], latents.shape[3], device)
    cond = [e.to(device, dtype) for e in prompt_embeds]
    uncond = [e.to(device, dtype) for e in negative_embeds] if use_cfg else None
    t_norms = ((1000 - timesteps.float()) / 1000).tolist()
    for i, t in enumerate(timesteps):
        scale = guidance if use_cfg and t_norms[i] <= cfg_truncation else 0.0
        velocity = _velocity(transformer, latents, t, cond, uncond if scale > 0 else None, scale, dtype)
        latents = schedule.step(velocity, t, latents, return_dict=False)[0]
    return latents


@torch.no_grad()
def decode_latents(vae, latents: Tensor) -> list["Image"]:
    """Latents -> PIL images: `vae.decode(z / scaling_factor + shift_factor)`, postprocessed as the pipeline does."""
    from diffusers.image_processor import VaeImageProcessor

    z = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
    pixels = vae.decode(z, return_dict=False)[0]
    processor = VaeImageProcessor(vae_scale_factor=2 ** (len(vae.config.block_out_channels) - 1) * 2)
    return processor.postprocess(pixels, output_type="pil")


def generate_images(transformer, scheduler, vae, prompt_embeds: Sequence[Tensor], *, width: int, height: int,
                    seeds: Sequence[int], steps: int = 8, guidance: float = 0.0,
                    negative_embeds: Sequence[Tensor] | None = None, device: torch.device | str | None = None,
                    dtype: torch.dtype | None = None) -> list["Image"]:
    """`generate_latents` then `decode_latents`: what a training preview calls."""
    latents = generate_latents(transformer, scheduler, prompt_embeds, width=width, height=height, seeds=seeds,
                               steps=steps, guidance=guidance, negative_embeds=negative_embeds, device=device,
                               dtype=dtype)
    return decode_latents(vae, latents)


def encode_texts(tokenizer, text_encoder, texts: Sequence[str], device: torch.device,
                 batch_size: int = 8) -> list[Tensor]:
    """Prompt embeddings as `ZImagePipeline.encode_prompt` makes them, a few prompts at a time."""
    from ..data.cache import encode_prompts

    out: list[Tensor] = []
    for start in range(0, len(texts), batch_size):
        out += encode_prompts(tokenizer, text_encoder, list(texts[start:start + batch_size]), device)
    return out


# ------------------------------------------------------------------ writing images


def png_text(info: dict[str, object]) -> dict[str, str]:
    """PNG text chunks: `zturbo` (JSON of every setting) and `parameters` (the line other tools show)."""
    loras = ", ".join(f"{l['name']}:{l['strength']:g} ({str(l['sha256'])[:12]})" for l in info.get("loras", []))
    line = (f"{info['prompt']}\nNegative prompt: {info.get('negative', '')}\nSteps: {info['steps']}, "
            f"Sampler: flow-match Euler, CFG scale: {info['guidance']}, Seed: {info['seed']}, "
            f"Size: {info['width']}x{info['height']}, Model: {info['model']}" + (f", LoRAs: {loras}" if loras else ""))
    return {"parameters": line, "zturbo": json.dumps(info, sort_keys=True)}


def next_index(out_dir: Path) -> int:
    """1 + the highest `NNNNN-` number in the folder, so new images sort after earlier ones."""
    numbers = [int(m.group(1)) for p in out_dir.iterdir() if (m := NAME_PATTERN.match(p.name))]
    return max(numbers, default=0) + 1


def _slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit].strip("-") or "image"


def save_png(image: "Image", out_dir: Path, label: str, text: dict[str, str] | None = None) -> Path:
    """Write `NNNNN-label.png` atomically and never over an existing file (a hard link claims the name)."""
    from PIL.PngImagePlugin import PngInfo

    from ..fileio import atomic_path

    out_dir.mkdir(parents=True, exist_ok=True)
    info = PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, value)
    holder = Path(tempfile.mkdtemp(prefix=".png-", dir=out_dir))
    try:
        with atomic_path(holder / "image.png") as tmp:
            image.save(tmp, format="PNG", pnginfo=info)
        return _claim_name(holder / "image.png", out_dir, _slug(label))
    finally:
        for leftover in holder.iterdir():
            leftover.unlink()
        holder.rmdir()


def _claim_name(source: Path, out_dir: Path, stem: str) -> Path:
    """Link `source` to the next free `NNNNN-stem.png`; an existing name (another process) moves on to the next."""
    while True:
        target = out_dir / f"{next_index(out_dir):05d}-{stem}.png"
        try:
            os.link(source, target)
            return target
        except FileExistsError:
            continue
        except OSError:  # no hard links on this file system: check, then rename
            if target.exists():
                continue
            os.replace(source, target)
            return target


def make_grid(rows: Sequence[Sequence["Image"]], labels: Sequence[str]) -> "Image":
    """Rows of equal-size images, each row with a text label above it (for `--compare`)."""
    from PIL import Image as PILImage
    from PIL import ImageDraw

    width, height = rows[0][0].size
    band = 14
    columns = max(len(r) for r in rows)
    grid = PILImage.new("RGB", (columns * width, len(rows) * (height + band)), "white")
    draw = ImageDraw.Draw(grid)
    for r, (row, label) in enumerate(zip(rows, labels)):
        top = r * (height + band)
        draw.text((2, top + 1), label[: max(8, columns * width // 6)], fill="black")
        for c, image in enumerate(row):
            grid.paste(image, (c * width, top + band))
    return grid


# ------------------------------------------------------------------ devices and memory


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA, then Apple MPS, then CPU; an unavailable device is an error, not a silent fallback."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r} is not a device; use auto, cpu, cuda, cuda:1 or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name} asked for CUDA but torch sees no CUDA GPU; use --device cpu or auto")
    return device


def choose_offload(device_type: str, low_mem: bool, gpu_bytes: int, transformer_bytes: int) -> str:
    """`none`, `model` (one whole model on the GPU at a time) or `sequential` (layer by layer, slowest).

    Offload only exists for CUDA; elsewhere `--low-mem` is accepted and changes nothing.
    Model offload needs the transformer plus working room on the GPU; below that, sequential.
    """
    if not low_mem or device_type != "cuda":
        return "none"
    return "model" if gpu_bytes >= transformer_bytes + OFFLOAD_MARGIN_BYTES else "sequential"


def transformer_bytes(model_dir: Path, dtype: torch.dtype) -> int:
    """Size of the transformer in `dtype`, read from the safetensors headers (nothing loaded)."""
    from .merge import header_entries, transformer_files

    numel = sum(math.prod(shape) for shape, _ in header_entries(transformer_files(model_dir)).values())
    return numel * torch.empty((), dtype=dtype).element_size()


def apply_offload(mode: str, parts, networks: Sequence["LoraNetwork"], device: torch.device) -> None:
    """Put the transformer and VAE on the GPU (mode none) or behind diffusers' CPU offload hooks.

    LoRA branches are small and always live on the GPU: the hooks call them with GPU inputs.
    """
    if mode == "none":
        parts.transformer.to(device)
        parts.vae.to(device)
    else:
        from diffusers import ZImagePipeline

        pipe = ZImagePipeline(scheduler=parts.scheduler, vae=parts.vae, text_encoder=None, tokenizer=None,
                              transformer=parts.transformer)
        try:
            if mode == "model":
                pipe.enable_model_cpu_offload(device=device)
            else:
                pipe.enable_sequential_cpu_offload(device=device)
        except ImportError as exc:
            raise ModelError(f"--low-mem needs the accelerate package ({exc}); run `pip install accelerate`") from None
    for network in networks:
        network.to(device)


# ------------------------------------------------------------------ the command


@dataclass
class Job:
    """One image to make: which prompt, which seed."""

    prompt_index: int
    prompt: str
    seed: int


def check_settings(s: SampleSettings) -> None:
    """Refuse bad options before anything heavy loads (the CLI runs it before importing this module)."""
    check_sample(s)


def make_jobs(prompts: Sequence[str], count: int, seed: int) -> list[Job]:
    """Each prompt `count` times with seeds seed, seed+1, ...: the same seeds for every prompt, to compare them."""
    return [Job(i, prompt, seed + k) for i, prompt in enumerate(prompts) for k in range(count)]


def encode_prompts_once(s: SampleSettings, device: torch.device, mode: str) -> dict[str, Tensor]:
    """Encode every distinct text once (prompts, and the negative when CFG is on), then free the text encoder.

    Every prompt is known up front, so the encoder is never needed again: it is gone before
    the transformer loads, and peak memory is the larger of the two, not their sum.
    """
    import weakref

    from ..data.cache import free_memory
    from ..models import load_parts

    texts = list(dict.fromkeys([*s.prompts, *([s.negative] if s.guidance > 0 else [])]))
    parts = load_parts(s.model, parts=["tokenizer", "text_encoder"], dtype=s.dtype,
                       device="cpu" if mode == "sequential" else str(device))
    if mode == "sequential":
        from accelerate import cpu_offload

        cpu_offload(parts.text_encoder, execution_device=device)
    embeds = encode_texts(parts.tokenizer, parts.text_encoder, texts, device)
    alive = weakref.ref(parts.text_encoder)
    del parts
    free_memory(device, alive)
    return dict(zip(texts, embeds))


def sample(s: SampleSettings, log: Log = _quiet) -> list[Path]:
    """`zturbo sample`: images for every prompt and seed, with and without LoRAs under `compare`."""
    from ..models import load_parts, resolve_model_dir, torch_dtype

    check_settings(s)
    loras = read_loras(s.loras)
    device = resolve_device(s.device)
    dtype = torch_dtype(s.dtype)
    model_dir = resolve_model_dir(s.model)
    mode = _offload_mode(s, device, model_dir, dtype, log)
    seed = s.seed if s.seed is not None else secrets.randbelow(2**31)
    embeds = encode_prompts_once(s, device, mode)
    parts = load_parts(s.model, parts=["transformer", "vae", "scheduler"], dtype=s.dtype, device="cpu")
    networks = attach_loras(parts.transformer, loras, log)
    apply_offload(mode, parts, networks, device)
    jobs = make_jobs(s.prompts, s.count, seed)
    info = _base_info(s, loras, dtype)
    paths, pairs = [], []
    for start in range(0, len(jobs), s.batch_size):
        batch = jobs[start:start + s.batch_size]
        images = _render(parts, batch, embeds, s, device, dtype)
        if s.compare:
            pairs += zip(_render(parts, batch, embeds, s, device, dtype, networks), images)
        for job, image in zip(batch, images):
            path = save_png(image, s.out_dir, f"{job.seed}-{job.prompt}", png_text({**info, "prompt": job.prompt,
                                                                                      "seed": job.seed}))
            log(f"wrote {path}")
            paths.append(path)
    if s.compare:
        paths.append(_write_compare(pairs, jobs, s, info, log))
    return paths


def _offload_mode(s: SampleSettings, device: torch.device, model_dir: Path, dtype: torch.dtype, log: Log) -> str:
    if s.low_mem and device.type != "cuda":
        log(f"note: --low-mem offloads to CPU RAM from a CUDA GPU; on {device.type} it changes nothing")
    if not s.low_mem or device.type != "cuda":
        return "none"
    total = torch.cuda.get_device_properties(device).total_memory
    mode = choose_offload(device.type, True, total, transformer_bytes(model_dir, dtype))
    log(f"low memory: {mode} CPU offload ({total / 2**30:.1f} GiB GPU)")
    return mode


def _render(parts, batch: Sequence[Job], embeds: dict[str, Tensor], s: SampleSettings, device: torch.device,
            dtype: torch.dtype, disabled: Sequence["LoraNetwork"] = ()) -> list["Image"]:
    """One batch of images; `disabled` LoRAs are switched off for it (the `--compare` base row)."""
    for network in disabled:
        network.enabled = False
    try:
        negative = [embeds[s.negative]] * len(batch) if s.guidance > 0 else None
        return generate_images(parts.transformer, parts.scheduler, parts.vae, [embeds[j.prompt] for j in batch],
                               width=s.width, height=s.height, seeds=[j.seed for j in batch], steps=s.steps,
                               guidance=s.guidance, negative_embeds=negative, device=device, dtype=dtype)
    finally:
        for network in disabled:
            network.enabled = True


def _base_info(s: SampleSettings, loras: Sequence[LoadedLora], dtype: torch.dtype) -> dict[str, object]:
    from .. import __version__

    return {"negative": s.negative if s.guidance > 0 else "", "steps": s.steps, "guidance": s.guidance,
            "width": s.width, "height": s.height, "model": s.model, "dtype": str(dtype).removeprefix("torch."),
            "loras": [l.describe() for l in loras], "sampler": f"zturbo-train {__version__}"}


def _write_compare(pairs: list[tuple["Image", "Image"]], jobs: Sequence[Job], s: SampleSettings,
                   info: dict[str, object], log: Log) -> Path:
    """Grid: per prompt a row without LoRAs above a row with them, one column per seed."""
    rows, labels = [], []
    lora_names = " + ".join(f"{l.path.name}:{l.strength:g}" for l in s.loras)
    for index, prompt in enumerate(s.prompts):
        mine = [pair for pair, job in zip(pairs, jobs) if job.prompt_index == index]
        rows += [[base for base, _ in mine], [with_lora for _, with_lora in mine]]
        labels += [f"without LoRA: {prompt}", f"with {lora_names}"]
    text = png_text({**info, "prompt": " | ".join(s.prompts), "seed": sorted({j.seed for j in jobs})})
    path = save_png(make_grid(rows, labels), s.out_dir, "compare", text)
    log(f"wrote {path} (top: without LoRAs, bottom: with)")
    return path

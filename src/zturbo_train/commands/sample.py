"""`zturbo sample`: load the model, attach LoRAs, encode prompts once, generate in batches,
write PNGs with their settings in the metadata, never overwrite.

The denoising loop is sampling.py (shared with training previews); LoRA arguments are
lora/files.py; PNG names and metadata are images.py; `--low-mem` offload is memory/offload.py.
"""

from __future__ import annotations

import secrets
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import torch
from torch import Tensor

from .. import __version__
from ..data.cache import free_memory
from ..drift import DriftProbe
from ..images import make_grid, png_text, save_png
from ..lora.files import LoadedLora, attach_loras, read_loras
from ..memory.offload import apply_offload, choose_offload, transformer_bytes
from ..models import load_parts, resolve_device, resolve_model_dir, torch_dtype
from ..preflight import SampleSettings, check_sample, read_prompts_file  # noqa: F401  (read_prompts_file: re-exported)
from ..sampling import encode_texts, generate_images

if TYPE_CHECKING:  # pragma: no cover
    from PIL.Image import Image

    from ..lora.network import LoraNetwork

Log = Callable[[str], None]


def _quiet(message: str) -> None:
    """Default log: say nothing (the CLI passes its console)."""


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
    texts = list(dict.fromkeys([*s.prompts, *([s.negative] if s.guidance > 0 else [])]))
    parts = load_parts(
        s.model,
        parts=["tokenizer", "text_encoder"],
        dtype=s.dtype,
        device="cpu" if mode == "sequential" else str(device),
    )
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
    check_settings(s)
    loras = read_loras(s.loras)
    device = resolve_device(s.device, mps=True)
    dtype = torch_dtype(s.dtype)
    model_dir = resolve_model_dir(s.model)
    mode = _offload_mode(s, device, model_dir, dtype, log)
    seed = s.seed if s.seed is not None else secrets.randbelow(2**31)
    embeds = encode_prompts_once(s, device, mode)
    parts = load_parts(s.model, parts=["transformer", "vae", "scheduler"], dtype=s.dtype, device="cpu")
    networks = attach_loras(parts.transformer, loras, log, allow_partial=s.allow_partial)
    apply_offload(mode, parts, networks, device)
    jobs = make_jobs(s.prompts, s.count, seed)
    info = _base_info(s, loras, dtype)
    paths, pairs = [], []
    for start in range(0, len(jobs), s.batch_size):
        batch = jobs[start : start + s.batch_size]
        drifts = _drift_probes(s, networks)
        images = _render(parts, batch, embeds, s, device, dtype, probe=drifts[0])
        if s.compare or drifts[1] is not None:
            base = _render(parts, batch, embeds, s, device, dtype, networks, probe=drifts[1])
            pairs += zip(base, images) if s.compare else []
        extra = _report_drift(drifts, batch, log)
        for job, image, more in zip(batch, images, extra):
            path = save_png(
                image,
                s.out_dir,
                f"{job.seed}-{job.prompt}",
                png_text({**info, "prompt": job.prompt, "seed": job.seed, **more}),
            )
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


Probes = tuple[DriftProbe | None, DriftProbe | None]


def _drift_probes(s: SampleSettings, networks: Sequence["LoraNetwork"]) -> Probes:
    """(probe with the LoRAs, probe without them) under --drift: the second is the base the LoRAs are judged by."""
    if not s.drift:
        return None, None
    return DriftProbe(), DriftProbe() if networks else None


def _report_drift(probes: Probes, batch: Sequence[Job], log: Log) -> list[dict[str, float]]:
    """One line per image (turbo_drift with LoRAs, and without), and the values for the PNG metadata."""
    with_loras, without = probes
    if with_loras is None:
        return [{} for _ in batch]
    values = with_loras.per_image()
    bases = without.per_image() if without is not None else [None] * len(batch)
    out = []
    for job, value, base in zip(batch, values, bases):
        more = {"turbo_drift": value} | ({"turbo_drift_without_loras": base} if base is not None else {})
        versus = f" (without LoRAs {base:.3f}: {value / base:.2f}x)" if base else ""
        log(f"turbo_drift {value:.3f}{versus} seed {job.seed}: {job.prompt}")
        out.append(more)
    return out


def _render(
    parts,
    batch: Sequence[Job],
    embeds: dict[str, Tensor],
    s: SampleSettings,
    device: torch.device,
    dtype: torch.dtype,
    disabled: Sequence["LoraNetwork"] = (),
    probe: DriftProbe | None = None,
) -> list["Image"]:
    """One batch of images; `disabled` LoRAs are switched off for it (the `--compare` base row)."""
    for network in disabled:
        network.enabled = False
    try:
        negative = [embeds[s.negative]] * len(batch) if s.guidance > 0 else None
        return generate_images(
            parts.transformer,
            parts.scheduler,
            parts.vae,
            [embeds[j.prompt] for j in batch],
            width=s.width,
            height=s.height,
            seeds=[j.seed for j in batch],
            steps=s.steps,
            guidance=s.guidance,
            negative_embeds=negative,
            device=device,
            dtype=dtype,
            observe=probe.observe if probe is not None else None,
        )
    finally:
        for network in disabled:
            network.enabled = True


def _base_info(s: SampleSettings, loras: Sequence[LoadedLora], dtype: torch.dtype) -> dict[str, object]:
    return {
        "negative": s.negative if s.guidance > 0 else "",
        "steps": s.steps,
        "guidance": s.guidance,
        "width": s.width,
        "height": s.height,
        "model": s.model,
        "dtype": str(dtype).removeprefix("torch."),
        "loras": [l.describe() for l in loras],
        "sampler": f"zturbo-train {__version__}",
    }


def _write_compare(
    pairs: list[tuple["Image", "Image"]], jobs: Sequence[Job], s: SampleSettings, info: dict[str, object], log: Log
) -> Path:
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

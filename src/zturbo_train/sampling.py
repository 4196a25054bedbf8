"""The denoising loop shared by training previews and `zturbo sample`.

`generate_latents` / `decode_latents` / `generate_images` work from prompt embeddings, so
training previews need no text encoder. They reproduce `ZImagePipeline.__call__` step for
step (same sigmas, mu, model time, negated output, fp32 latents, scheduler step, CFG,
per-seed CPU generators), so a seed gives the image diffusers gives for
`generator=torch.Generator().manual_seed(seed)`; tests/commands/test_sample.py pins that.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

import torch
from torch import Tensor

from .data.cache import encode_prompts
from .errors import ConfigError
from .flow import predict
from .preflight import check_size  # noqa: F401  (re-exported: the loop's size rule)
from .zimage import LATENT_CHANNELS, SIZE_MULTIPLE

if TYPE_CHECKING:  # pragma: no cover
    from PIL.Image import Image


def sampling_sigmas(steps: int) -> list[float]:
    """ZImagePipeline's default schedule before the scheduler's shift: linspace(1, 1/steps, steps)."""
    return torch.linspace(1.0, 1 / steps, steps).tolist()


def set_schedule(scheduler, steps: int, latent_height: int, latent_width: int, device: torch.device) -> Tensor:
    """Set the timesteps exactly as the pipeline does (mu from the image sequence length) and return them."""
    from diffusers.pipelines.z_image.pipeline_z_image import calculate_shift

    config = scheduler.config
    mu = calculate_shift(
        (latent_height // 2) * (latent_width // 2),
        config.get("base_image_seq_len", 256),
        config.get("max_image_seq_len", 4096),
        config.get("base_shift", 0.5),
        config.get("max_shift", 1.15),
    )
    scheduler.set_timesteps(sigmas=sampling_sigmas(steps), device=device, mu=mu)
    scheduler.set_begin_index(0)
    return scheduler.timesteps


def initial_latents(
    seeds: Sequence[int], height: int, width: int, device: torch.device, channels: int = LATENT_CHANNELS
) -> Tensor:
    """Noise drawn per seed on a CPU generator, fp32, as the pipeline's `randn_tensor` does for
    `generator=torch.Generator().manual_seed(seed)` (one per image), then moved to `device`."""
    shape = (1, channels, 2 * (height // SIZE_MULTIPLE), 2 * (width // SIZE_MULTIPLE))
    draws = [
        torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(s)), dtype=torch.float32) for s in seeds
    ]
    return torch.cat(draws).to(device)


def _velocity(
    transformer,
    latents: Tensor,
    t: Tensor,
    cond: list[Tensor],
    uncond: list[Tensor] | None,
    scale: float,
    dtype: torch.dtype,
) -> Tensor:
    """The pipeline's step input: the network output (CFG-combined when `uncond`), negated, in fp32."""
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
def generate_latents(
    transformer,
    scheduler,
    prompt_embeds: Sequence[Tensor],
    *,
    width: int,
    height: int,
    seeds: Sequence[int],
    steps: int = 8,
    guidance: float = 0.0,
    negative_embeds: Sequence[Tensor] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    cfg_truncation: float = 1.0,
    observe: Callable[[int, Tensor], None] | None = None,
) -> Tensor:
    """Denoise one image per (embedding, seed) as ZImagePipeline does; returns fp32 latents (B, 16, H/8, W/8).

    `prompt_embeds`: one unpadded (L_i, cap_dim) tensor per image (the text encoder's
    second-to-last layer, as `ZImagePipeline.encode_prompt` returns them). CFG runs when
    `guidance` > 0 and then needs `negative_embeds` (the encoded negative prompt, "" for
    none). The caller's scheduler is not touched: a fresh copy holds the loop's state.
    `device` is where the loop runs (the execution device under CPU offload).
    `observe(i, x0)`, when given, sees each step's prediction of the clean latents
    (`x_t - sigma * velocity`, fp32); drift.py turns them into `turbo_drift`. Off, it costs nothing.
    """
    check_size(width, height)
    if steps < 1:
        raise ConfigError(f"steps {steps} must be at least 1; Turbo uses 8")
    if len(seeds) != len(prompt_embeds):
        raise ValueError(f"{len(prompt_embeds)} prompt embeddings but {len(seeds)} seeds; give one seed per image")
    use_cfg = guidance > 0
    if use_cfg and (negative_embeds is None or len(negative_embeds) != len(prompt_embeds)):
        raise ConfigError(
            f'guidance {guidance} needs one negative embedding per image (encode "" for none), '
            "or set guidance to 0 (Turbo's default)"
        )
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
        if observe is not None:
            observe(i, latents - schedule.sigmas[i].to(latents.device) * velocity)
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


def generate_images(
    transformer,
    scheduler,
    vae,
    prompt_embeds: Sequence[Tensor],
    *,
    width: int,
    height: int,
    seeds: Sequence[int],
    steps: int = 8,
    guidance: float = 0.0,
    negative_embeds: Sequence[Tensor] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    observe: Callable[[int, Tensor], None] | None = None,
) -> list["Image"]:
    """`generate_latents` then `decode_latents`: what a training preview calls."""
    latents = generate_latents(
        transformer,
        scheduler,
        prompt_embeds,
        width=width,
        height=height,
        seeds=seeds,
        steps=steps,
        guidance=guidance,
        negative_embeds=negative_embeds,
        device=device,
        dtype=dtype,
        observe=observe,
    )
    return decode_latents(vae, latents)


def encode_texts(
    tokenizer, text_encoder, texts: Sequence[str], device: torch.device, batch_size: int = 8
) -> list[Tensor]:
    """Prompt embeddings as `ZImagePipeline.encode_prompt` makes them, a few prompts at a time."""
    out: list[Tensor] = []
    for start in range(0, len(texts), batch_size):
        out += encode_prompts(tokenizer, text_encoder, list(texts[start : start + batch_size]), device)
    return out

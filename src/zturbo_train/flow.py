"""Flow matching for Z-Image: timestep sampling, noising, model time, target, loss.

Conventions, each pinned against diffusers' `ZImagePipeline` in tests/test_flow.py:
- `x_t = (1 - sigma) * x0 + sigma * noise`, sigma in (0, 1); sigma = 1 is pure noise.
- The transformer is given `t = 1 - sigma` (0 is pure noise, 1 is clean).
- The raw network output is regressed on `x0 - noise`: the pipeline negates it to get the
  velocity `noise - x0` that its Euler step integrates, so a perfect output walks x_t
  along the straight line the noising above assumes.

Everything here is pure tensor code with no host syncs (`.item()`, `.cpu()`,
`bool(tensor)`), so a training step built on it never waits on the GPU and can be
compiled whole.

Default timestep sampling: `weighted` (see `config.TrainConfig.timestep_sampling`).
Sigmas are drawn uniformly and the loss is weighted by a bell over sigma that peaks at
0.5 and averages 1. This is what ai-toolkit, the adapter author's trainer, ships in its
Z-Image Turbo example (`timestep_type: weighted`: uniform timesteps, no shift), so runs
compare like for like with the setup the de-distillation adapter is used with. Uniform
draws keep every sigma in training, including the high-noise end where Turbo's shift-3
8-step schedule spends 6 of its 8 evaluations (sigma >= 0.64). The bell keeps the
gradient dominated by mid-range sigmas, where the loss is most informative. Turbo's
`shift=3` is a sampling schedule, not a training density. Shift 3 in training would put
2/3 of uniform draws (3/4 of logit-normal(0, 1) draws) above sigma 0.6 and cut the share
below 0.3 from 30% to 12.5%, thinning the low-noise steps that carry fine detail. Set
`timestep_shift = 3` to try it anyway.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .errors import ConfigError

METHODS = ("uniform", "logit_normal", "weighted")
# Sigmas stay this far from 0 and 1: sigma = 1 makes x_t independent of x0, and sigma = 0
# makes the target unlearnable (x_t = x0, yet the target still depends on the noise).
SIGMA_EPS = 1e-5
# The `weighted` bell, as in ai-toolkit: exp(-2 (sigma - 1/2)^2) minus its value at the
# ends, so the weight is 0 at sigma 0 and 1. It is scaled so its mean over uniform sigma
# in (0, 1) is exactly 1 (the closed-form integral below), which leaves the loss scale
# and the learning rate comparable with the other methods. Peak weight: ~1.58 at 0.5.
_BELL_FLOOR = math.exp(-0.5)
_BELL_SCALE = 1.0 / (math.sqrt(math.pi / 2) * math.erf(math.sqrt(0.5)) - _BELL_FLOOR)

Draw = Callable[..., Tensor]  # (batch, generator, device, mean, std) -> (batch,) in [0, 1]


def _uniform(
    batch: int, generator: torch.Generator | None, device: torch.device | str, mean: float, std: float
) -> Tensor:
    return torch.rand(batch, generator=generator, device=device, dtype=torch.float32)


def _logit_normal(
    batch: int, generator: torch.Generator | None, device: torch.device | str, mean: float, std: float
) -> Tensor:
    normal = torch.randn(batch, generator=generator, device=device, dtype=torch.float32)
    return torch.sigmoid(normal * std + mean)


_DRAWS: dict[str, Draw] = {"uniform": _uniform, "logit_normal": _logit_normal, "weighted": _uniform}


def sample_sigmas(
    batch: int,
    generator: torch.Generator | None,
    device: torch.device | str,
    method: str = "weighted",
    mean: float = 0.0,
    std: float = 1.0,
    shift: float = 1.0,
) -> Tensor:
    """Draw one sigma per sample, shape (batch,), fp32, strictly inside (0, 1).

    `method`: uniform; logit_normal (sigmoid of N(mean, std), SD3-style, favours mid
    sigmas by sampling them more often); weighted (uniform draws, the loss carries the
    mid-range preference, see `loss_weights`). `shift` > 1 then moves every draw toward
    noise with the static schedule shift `shift*s / (1 + (shift-1)*s)`, the same map the
    scheduler applies at inference. The generator must live on `device`.
    """
    draw = _DRAWS.get(method)
    if draw is None:
        raise ConfigError(f"`train.timestep_sampling` = {method!r} is not one of {list(METHODS)}; pick one of them")
    sigmas = draw(batch, generator, device, mean, std)
    if shift != 1.0:
        sigmas = shift_sigmas(sigmas, shift)
    return sigmas.clamp(SIGMA_EPS, 1.0 - SIGMA_EPS)


def shift_sigmas(sigmas: Tensor, shift: float) -> Tensor:
    """Static shift of FlowMatchEulerDiscreteScheduler: adds log(shift) to logit(sigma)."""
    return shift * sigmas / (1.0 + (shift - 1.0) * sigmas)


def bell_weights(sigmas: Tensor) -> Tensor:
    """The `weighted` loss weight per sigma: 0 at the ends, ~1.58 at 0.5, mean 1 over uniform sigma."""
    return (torch.exp(-2.0 * (sigmas.float() - 0.5).square()) - _BELL_FLOOR) * _BELL_SCALE


def loss_weights(sigmas: Tensor, method: str) -> Tensor:
    """Per-sample loss weights (fp32): the bell for `weighted`, ones for the sampling methods.

    The sampling methods already put their preference into which sigmas are drawn, so
    weighting them again would count it twice.
    """
    if method == "weighted":
        return bell_weights(sigmas)
    return torch.ones_like(sigmas, dtype=torch.float32)


def _per_sample(sigmas: Tensor, like: Tensor) -> Tensor:
    """(B,) -> (B, 1, 1, ...) so a per-sample scalar broadcasts over a latent batch."""
    return sigmas.reshape(-1, *([1] * (like.ndim - 1)))


def noisy_latents(x0: Tensor, noise: Tensor, sigmas: Tensor) -> Tensor:
    """x_t = (1 - sigma) x0 + sigma noise, per sample.

    Computed in the promoted dtype (fp32 with fp32 sigmas), so bf16 latents do not lose
    the mixing precision. Cast the result to the model's dtype when calling it.
    """
    s = _per_sample(sigmas, x0)
    return (1.0 - s) * x0 + s * noise


def model_time(sigmas: Tensor) -> Tensor:
    """The transformer's `t` for a sigma: 1 - sigma (0 is pure noise, 1 is clean)."""
    return 1.0 - sigmas


def flow_target(x0: Tensor, noise: Tensor) -> Tensor:
    """Target of the raw network output: x0 - noise (the pipeline negates it to noise - x0)."""
    return x0 - noise


def flow_loss(pred: Tensor, target: Tensor, weights: Tensor | None = None) -> Tensor:
    """MSE in fp32: mean over each sample, then the (weighted) mean over the batch.

    Weights multiply and are not renormalised by their batch sum: at batch size 1 that
    would cancel them. They average 1 over the sigma distribution instead (see `bell_weights`).
    """
    if pred.shape != target.shape:
        raise ValueError(
            f"prediction shape {tuple(pred.shape)} differs from target shape {tuple(target.shape)}; "
            "both must be (B, 16, H, W)"
        )
    per_sample = (pred.float() - target.float()).square().flatten(1).mean(1)
    if weights is None:
        return per_sample.mean()
    return (per_sample * weights.float()).mean()


def predict(transformer: torch.nn.Module, latents: Tensor, t: Tensor, cap_feats: Sequence[Tensor]) -> Tensor:
    """Run the Z-Image transformer on a latent batch as ZImagePipeline does; returns the raw output.

    `latents` (B, 16, H, W) in the model's dtype, `t` (B,) = 1 - sigma, `cap_feats` one
    unpadded (L_i, cap_dim) tensor per sample. The transformer wants a list of
    (16, 1, H, W) tensors with a frame axis and returns the same. The frame axis is added
    and removed here. Arguments after `cap_feats` go by keyword because their order
    changed between diffusers releases. Output (B, 16, H, W) in the model's dtype:
    `x0 - noise` when the model is right.
    """
    x = list(latents.unsqueeze(2).unbind(0))
    out = transformer(x, t, list(cap_feats), return_dict=False)[0]
    return torch.stack(out).squeeze(2)

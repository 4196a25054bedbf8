"""The training step: tensors in, loss out. Shared by `zturbo train` and `zturbo bench`.

This is the hot path. Nothing here syncs with the host (no `.item()`, no Python branch
on a tensor): the loss and gradient norm stay on the device and are read by the loop
only when it logs. Per-step Python work is limited to what cannot be hoisted.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from . import flow
from .config import TrainConfig


@dataclass(frozen=True)
class StepSettings:
    """What a step needs from the config, resolved once."""

    timestep_sampling: str = "weighted"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    timestep_shift: float = 1.0
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    autocast_dtype: torch.dtype | None = None

    @classmethod
    def from_config(cls, train: TrainConfig, base_dtype: torch.dtype, device: torch.device) -> "StepSettings":
        # Autocast runs the frozen bf16/fp16 base and the fp32 LoRA in one low-precision dtype.
        autocast = base_dtype if base_dtype != torch.float32 else None
        return cls(train.timestep_sampling, train.logit_mean, train.logit_std, train.timestep_shift,
                   train.grad_accum, train.max_grad_norm, autocast)


class TrainStep:
    """Forward + backward of micro-batches, and the optimizer update."""

    def __init__(self, transformer: torch.nn.Module, params: Sequence[torch.nn.Parameter],
                 optimizer: torch.optim.Optimizer, settings: StepSettings, generator: torch.Generator,
                 model_forward=None):
        self.transformer = transformer
        self.params = list(params)
        self.optimizer = optimizer
        self.settings = settings
        self.generator = generator
        self.forward = model_forward or flow.predict
        self.device = generator.device
        self._keyed = torch.Generator(device=self.device)  # reseeded per sample when a batch brings seeds
        self.model_dtype = next(transformer.parameters()).dtype

    def _autocast(self):
        if self.settings.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.settings.autocast_dtype)

    def loss(self, latents: Tensor, embeds: Sequence[Tensor], seeds: Sequence[int] | None = None,
             weights: Sequence[float] | None = None) -> Tensor:
        """The flow-matching loss of one micro-batch (fp32 scalar on the device).

        `seeds` (one per sample) key each sample's noise and sigma, so a sample gets the same
        draw in whichever batch, micro-batch or rank it lands; `weights` scale per-sample losses
        (data-parallel slices of a batch's last, uneven part). Without them: the step's generator.
        """
        s = self.settings
        noise, sigmas = self._draw(latents, seeds)
        x0 = latents.float()
        noisy = flow.noisy_latents(x0, noise, sigmas).to(self.model_dtype)
        with self._autocast():
            pred = self.forward(self.transformer, noisy, flow.model_time(sigmas).to(self.model_dtype), embeds)
        loss_weights = flow.loss_weights(sigmas, s.timestep_sampling)
        if weights is not None:
            loss_weights = loss_weights * to_device(weights, loss_weights.device)
        return flow.flow_loss(pred, flow.flow_target(x0, noise), loss_weights)

    def _draw(self, latents: Tensor, seeds: Sequence[int] | None) -> tuple[Tensor, Tensor]:
        """(noise, sigmas): from the step's generator, or one generator seeding per sample from `seeds`."""
        s = self.settings
        if seeds is None:
            noise = torch.randn(latents.shape, generator=self.generator, device=latents.device, dtype=torch.float32)
            return noise, flow.sample_sigmas(latents.shape[0], self.generator, latents.device, s.timestep_sampling,
                                             s.logit_mean, s.logit_std, s.timestep_shift)
        noises, sigmas = [], []
        for seed in seeds:
            self._keyed.manual_seed(seed)
            noises.append(torch.randn(latents.shape[1:], generator=self._keyed, device=latents.device,
                                      dtype=torch.float32))
            sigmas.append(flow.sample_sigmas(1, self._keyed, latents.device, s.timestep_sampling, s.logit_mean,
                                             s.logit_std, s.timestep_shift))
        return torch.stack(noises), torch.cat(sigmas)

    def backward(self, latents: Tensor, embeds: Sequence[Tensor], seeds: Sequence[int] | None = None,
                 weights: Sequence[float] | None = None) -> Tensor:
        """Loss and backward of one micro-batch, scaled for accumulation; returns the detached loss."""
        loss = self.loss(latents, embeds, seeds, weights)
        (loss / self.settings.grad_accum).backward()
        return loss.detach()

    def update(self, lr: float) -> Tensor:
        """Clip, step and clear gradients; returns the pre-clip gradient norm (on the device)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.settings.max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.settings.max_grad_norm, foreach=True)
        else:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in self.params
                                                         if p.grad is not None]))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm.detach()


def to_device(values: Sequence[float], device: torch.device) -> Tensor:
    """A few host floats as an fp32 tensor on `device` without a host sync: a copy from pageable
    memory waits for the GPU queue, one from pinned memory is queued like any kernel."""
    tensor = torch.tensor(values, dtype=torch.float32)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def build_optimizer(params: Sequence[torch.nn.Parameter], train: TrainConfig, device: torch.device):
    """adamw (torch; fused on CUDA) or adamw8bit (bitsandbytes)."""
    if train.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=train.lr, weight_decay=train.weight_decay)
    return torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay, fused=device.type == "cuda")


def lr_at(step: int, train: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warm-up, then constant/linear/cosine."""
    if train.warmup_steps and step < train.warmup_steps:
        return train.lr * (step + 1) / train.warmup_steps
    if train.lr_scheduler == "constant":
        return train.lr
    span = max(1, train.steps - train.warmup_steps)
    progress = min(1.0, (step - train.warmup_steps) / span)
    if train.lr_scheduler == "linear":
        return train.lr * (1.0 - progress)
    return train.lr * 0.5 * (1.0 + math.cos(math.pi * progress))

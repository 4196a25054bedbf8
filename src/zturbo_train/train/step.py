"""The training step: tensors in, loss out. Shared by `zturbo train` and `zturbo bench`.

This is the hot path. Nothing here syncs with the host (no `.item()`, no Python branch
on a tensor): the loss and gradient norm stay on the device and are read by the loop
only when it logs. Per-step Python work is limited to what cannot be hoisted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import NamedTuple, Sequence

import torch
from torch import Tensor

from .. import flow
from ..config import TrainConfig
from ..errors import ConfigError
from ..models import autocast
from .preservation import Preservation


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
        check_training_dtype(base_dtype)
        # Autocast runs the frozen bf16/fp16 base and the fp32 LoRA in one low-precision dtype.
        autocast = base_dtype if base_dtype != torch.float32 else None
        return cls(
            train.timestep_sampling,
            train.logit_mean,
            train.logit_std,
            train.timestep_shift,
            train.grad_accum,
            train.max_grad_norm,
            autocast,
        )


def check_training_dtype(dtype: torch.dtype) -> None:
    """fp16 training is refused rather than patched with a gradient scaler.

    Z-Image's weights are trained and used in bf16, whose range is fp32's. fp16 tops out at
    65504, and large DiTs' activations are known to pass it (Z-Image's not measured here). A
    GradScaler only rescues gradients that underflow: it cannot fix a forward that overflows,
    and would hide it by skipping those steps. Every GPU with the memory and speed to train
    this 6B model (Ampere and later) has bf16, and fp32 is left for one that does not.
    """
    if dtype == torch.float16:
        raise ConfigError(
            'model.dtype = "fp16" cannot train: fp16 overflows where Z-Image\'s bf16 weights do not, '
            'and there is no gradient scaler; set model.dtype = "bf16" (or "fp32" on a GPU without bf16)'
        )


class _Inputs(NamedTuple):
    """What the model and the loss take for one micro-batch, made once (DOP reuses all of it)."""

    x0: Tensor  # fp32
    noise: Tensor
    noisy: Tensor  # in the model's dtype
    t: Tensor  # fp32, 1 - sigma
    weights: Tensor  # per-sample loss weights, fp32


class TrainStep:
    """Forward + backward of micro-batches, and the optimizer update."""

    def __init__(
        self,
        transformer: torch.nn.Module,
        params: Sequence[torch.nn.Parameter],
        optimizer: torch.optim.Optimizer,
        settings: StepSettings,
        generator: torch.Generator,
        model_forward=None,
        preservation: Preservation | None = None,
    ):
        self.transformer = transformer
        self.params = list(params)
        self.optimizer = optimizer
        self.settings = settings
        self.generator = generator
        self.forward = model_forward or flow.predict
        self.device = generator.device
        self.model_dtype = next(transformer.parameters()).dtype
        self.preservation = preservation  # train.preservation = "dop" (train/preservation.py)

    @property
    def grad_forwards(self) -> int:
        """Forwards with gradient per micro-batch: DOP runs a second one (DDP all-reduces after the last)."""
        return 1 if self.preservation is None else 2

    def loss(
        self,
        latents: Tensor,
        embeds: Sequence[Tensor],
        weights: Sequence[float] | None = None,
        noise: Tensor | None = None,
        sigmas: Tensor | None = None,
    ) -> Tensor:
        """The flow-matching loss of one micro-batch (fp32 scalar on the device).

        `noise` and `sigmas` come drawn with the batch (the loader's reader thread calls
        `draw_noise`, keyed per sample, so a sample gets the same noise in whichever batch,
        micro-batch or rank it lands); without them (the bench) the step's own generator draws
        them. `weights` scale per-sample losses (data-parallel slices of a batch's last, uneven part).
        """
        if noise is None:
            noise, sigmas = self._draw(latents)
        return self._loss(self._inputs(latents, noise, sigmas, weights), embeds)

    def _inputs(self, latents: Tensor, noise: Tensor, sigmas: Tensor, weights: Sequence[float] | None) -> _Inputs:
        x0 = latents.float()
        noisy = flow.noisy_latents(x0, noise, sigmas).to(self.model_dtype)
        loss_weights = flow.loss_weights(sigmas, self.settings.timestep_sampling)
        if weights is not None:
            loss_weights = loss_weights * to_device(weights, loss_weights.device)
        return _Inputs(x0, noise, noisy, flow.model_time(sigmas), loss_weights)

    def _loss(self, inputs: _Inputs, embeds: Sequence[Tensor]) -> Tensor:
        with autocast(self.device, self.settings.autocast_dtype):  # t stays fp32, as ZImagePipeline passes it
            pred = self.forward(self.transformer, inputs.noisy, inputs.t, embeds)
        return flow.flow_loss(pred, flow.flow_target(inputs.x0, inputs.noise), inputs.weights)

    def _draw(self, latents: Tensor) -> tuple[Tensor, Tensor]:
        """(noise, sigmas) from the step's generator, for callers whose batches carry none (the bench)."""
        s = self.settings
        noise = torch.randn(latents.shape, generator=self.generator, device=latents.device, dtype=torch.float32)
        return noise, flow.sample_sigmas(
            latents.shape[0],
            self.generator,
            latents.device,
            s.timestep_sampling,
            s.logit_mean,
            s.logit_std,
            s.timestep_shift,
        )

    def backward(
        self,
        latents: Tensor,
        embeds: Sequence[Tensor],
        weights: Sequence[float] | None = None,
        noise: Tensor | None = None,
        sigmas: Tensor | None = None,
    ) -> Tensor:
        """Loss and backward of one micro-batch, scaled for accumulation; returns the detached loss."""
        loss = self.loss(latents, embeds, weights, noise, sigmas)
        (loss / self.settings.grad_accum).backward()
        return loss.detach()

    def backward_preserving(
        self,
        latents: Tensor,
        embeds: Sequence[Tensor],
        class_embeds: Sequence[Tensor],
        weights: Sequence[float] | None = None,
        noise: Tensor | None = None,
        sigmas: Tensor | None = None,
        preserve: Sequence[float] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """`backward`, then DOP's loss and backward on the class captions at the same noise and sigmas (why in
        train/preservation.py); returns both losses detached, DOP's before its weight.

        `preserve`: 0 for a sample whose caption has no trigger to replace (None: every sample counts)."""
        if noise is None:
            noise, sigmas = self._draw(latents)
        inputs = self._inputs(latents, noise, sigmas, weights)
        loss = self._loss(inputs, embeds)
        (loss / self.settings.grad_accum).backward()
        dop_weights = inputs.weights if preserve is None else inputs.weights * to_device(preserve, self.device)
        with autocast(self.device, self.settings.autocast_dtype):
            dop = self.preservation.loss(
                self.forward, self.transformer, inputs.noisy, inputs.t, class_embeds, dop_weights
            )
        (dop * (self.preservation.weight / self.settings.grad_accum)).backward()
        return loss.detach(), dop.detach()

    def backward_batch(self, batch) -> tuple[Tensor, Tensor | None]:
        """One micro-batch from the loader: its losses (DOP's None when train.preservation is off)."""
        if self.preservation is None:
            return self.backward(batch.latents, batch.text, batch.weights, batch.noise, batch.sigmas), None
        return self.backward_preserving(
            batch.latents, batch.text, batch.class_text, batch.weights, batch.noise, batch.sigmas, batch.preserve
        )

    def draw_for(self, batch):
        """The loader's `draw` hook: a batch with its keyed noise and sigmas (runs on the reader thread)."""
        noise, sigmas = draw_noise(batch.noise_seeds, tuple(batch.latents.shape[1:]), self.settings)
        return replace(batch, noise=noise, sigmas=sigmas)

    def update(self, lr: float) -> Tensor:
        """Clip, step and clear gradients; returns the pre-clip gradient norm (on the device)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # LoRA+: the up matrices' group runs at lr x ratio
        if self.settings.max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.settings.max_grad_norm, foreach=True)
        else:
            norm = torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(p.grad) for p in self.params if p.grad is not None])
            )
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm.detach()


def draw_noise(seeds: Sequence[int], shape: tuple[int, ...], settings: StepSettings) -> tuple[Tensor, Tensor]:
    """Per-sample noise and sigma on the CPU, each from a generator seeded by its sample's key.

    A sample's draw depends only on its key, never on the batch, rank or device it lands in,
    so data-parallel runs equal one process and a run repeats on any hardware. Drawn on the
    loader's reader thread, it costs the training step nothing.
    """
    generator = torch.Generator()
    noises, sigmas = [], []
    for seed in seeds:
        generator.manual_seed(seed)
        noises.append(torch.randn(shape, generator=generator, dtype=torch.float32))
        sigmas.append(
            flow.sample_sigmas(
                1,
                generator,
                "cpu",
                settings.timestep_sampling,
                settings.logit_mean,
                settings.logit_std,
                settings.timestep_shift,
            )
        )
    return torch.stack(noises), torch.cat(sigmas)


def to_device(values: Sequence[float], device: torch.device) -> Tensor:
    """A few host floats as an fp32 tensor on `device` without a host sync: a copy from pageable
    memory waits for the GPU queue, one from pinned memory is queued like any kernel."""
    tensor = torch.tensor(values, dtype=torch.float32)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


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

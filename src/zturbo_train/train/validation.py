"""Validation loss on held-out images (train.val_dir, train.val_fraction): fixed noise and sigmas, no gradient.

Each held-out view gets its noise and sigma from a generator seeded by its key (content, bucket, flip)
and the run's seed, drawn once, so `val_loss` depends only on the LoRA: two evaluations of the same
weights agree bit for bit, and a resumed run logs what the uninterrupted one would. The latents (the
cached distribution's mean) and caption embeddings come from the caches and stay on the device; the
LoRA is evaluated as it trains (adapter applied, dropout off), its loss weighted as in training.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .. import flow
from ..data.batches import TrainDataset, derive_seed
from ..models import autocast
from .step import StepSettings, draw_noise


@dataclass
class Validation:
    latents: list[Tensor]
    embeds: list[Tensor]
    noise: list[Tensor]
    sigmas: list[Tensor]
    settings: StepSettings
    every: int

    @classmethod
    def build(
        cls, dataset: TrainDataset, seed: int, every: int, settings: StepSettings, device: torch.device
    ) -> "Validation | None":
        """The held-out views on `device` with their keyed draws; None without a held-out set."""
        views = dataset.heldout_views()
        if not views:
            return None
        latents, embeds, noise, sigmas = [], [], [], []
        for latent, embed, key in views:  # the training step's keyed draw, keyed by the view instead
            drawn_noise, drawn_sigma = draw_noise([derive_seed("validation", seed, key)], latent.shape[1:], settings)
            noise.append(drawn_noise.to(device))
            sigmas.append(drawn_sigma.to(device))
            latents.append(latent.to(device))
            embeds.append(embed.to(device))
        return cls(latents, embeds, noise, sigmas, settings, every)

    def due(self, step: int, last: int) -> bool:
        return step % self.every == 0 or step == last

    @torch.no_grad()
    def loss(self, transformer: torch.nn.Module, network: Any, device: torch.device) -> Tensor:
        """Mean weighted flow loss over the held-out views (an fp32 scalar on the device; no host sync)."""
        dtype = next(transformer.parameters()).dtype
        was_training = network.training
        network.eval()
        try:
            total = torch.zeros((), device=device)
            for x0, embed, noise, sigma in zip(self.latents, self.embeds, self.noise, self.sigmas):
                noisy = flow.noisy_latents(x0, noise, sigma).to(dtype)
                with autocast(device, self.settings.autocast_dtype):
                    pred = flow.predict(transformer, noisy, flow.model_time(sigma), [embed])
                weights = flow.loss_weights(sigma, self.settings.timestep_sampling)
                total += flow.flow_loss(pred, flow.flow_target(x0, noise), weights)
        finally:
            network.train(was_training)
        return total / len(self.latents)

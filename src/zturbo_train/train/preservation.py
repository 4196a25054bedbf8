"""Differential output preservation (`train.preservation = "dop"`, ai-toolkit's DOP): the class stays the base's.

A character LoRA trained on "sks, a man on a beach" also moves what "a man" draws: the subject leaks
into its whole class. DOP adds a second loss to each micro-batch. The caption with the trigger word
replaced by the class word ("person, a man on a beach", made and cached with the captions:
data/prepare.py) is run twice on the batch's own noisy latents and sigmas: once with the LoRA switched
off and no gradient, which is the target (the base model, with the training adapter as in training,
merged or live), and once with the LoRA, the prediction. Their MSE, weighted per sample as the training
loss is, times `train.preservation_weight`, is trained beside the training loss.

- The batch's own noise and sigmas: DOP draws nothing, so resume and data-parallel runs stay exact, and it
  holds the class in place at the noise levels where the LoRA is moved at that step.
- Two backward passes (the training loss's, then DOP's), not one over their sum: the first graph is freed
  before DOP's forward, so the peak memory stays one forward and backward (memory/estimate.py), and DDP
  sees one backward per forward (train/distributed.py counts two per micro-batch).
- The LoRA is switched off by its `enabled` flag, a Python bool its hooks read: no kernel, no host sync;
  under torch.compile the flag is guarded, so the two states are two cached graphs (checked by hand on the
  CPU: 3 compiled DOP steps equal eager within 2.3e-6; not in the suite, whose compile test is 100 s alone).
- Cost: one no-grad forward and one forward + backward more per micro-batch (BENCHMARKS.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import flow
from ..config import TrainConfig
from ..lora.network import LoraNetwork

Forward = Callable[[torch.nn.Module, Tensor, Tensor, Sequence[Tensor]], Tensor]


@dataclass(frozen=True)
class Preservation:
    network: LoraNetwork  # the trained LoRA (the training adapter is not this network and stays on)
    weight: float

    @classmethod
    def from_config(cls, train: TrainConfig, network: LoraNetwork) -> "Preservation | None":
        return cls(network, train.preservation_weight) if train.preservation == "dop" else None

    def loss(
        self,
        forward: Forward,
        transformer: torch.nn.Module,
        noisy: Tensor,
        t: Tensor,
        class_embeds: Sequence[Tensor],
        weights: Tensor,
    ) -> Tensor:
        """DOP's loss of one micro-batch (fp32 scalar, before `weight`): the LoRA's prediction on the class
        captions against the base's, per-sample `weights` as the training loss's (0 drops a sample)."""
        target = self.base_prediction(forward, transformer, noisy, t, class_embeds)
        return flow.flow_loss(forward(transformer, noisy, t, class_embeds), target, weights)

    @torch.no_grad()
    def base_prediction(
        self, forward: Forward, transformer: torch.nn.Module, noisy: Tensor, t: Tensor, class_embeds: Sequence[Tensor]
    ) -> Tensor:
        with self.lora_off():
            return forward(transformer, noisy, t, class_embeds)

    @contextmanager
    def lora_off(self) -> Iterator[None]:
        """The trained LoRA switched off (not detached: its hooks stay, they return the base output)."""
        self.network.enabled = False
        try:
            yield
        finally:
            self.network.enabled = True

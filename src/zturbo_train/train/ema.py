"""EMA of the LoRA weights (train.ema): an fp32 copy on the LoRA's device, updated after each optimizer step.

Up to `ema_start` the average is the weights themselves; after it, ema <- ema + (1 - decay)(w - ema), one
fused lerp over all tensors with no host sync. Saving and previews swap the average in and put the
trained weights back exactly (`swapped_in`); the average rides in the training state, so a resume
continues it bit for bit.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import Tensor

PREFIX = "ema."  # keys of the average in state.safetensors, by parameter index


class LoraEma:
    def __init__(self, params: Sequence[torch.nn.Parameter], decay: float, start: int):
        self.params = list(params)
        self.decay, self.start = decay, start
        self.average = [p.detach().float().clone() for p in self.params]
        # views of the weights, made once (the LoRA trains in fp32, so no per-step cast or copy is needed)
        self._fp32 = all(p.dtype == torch.float32 for p in self.params)
        self._weights = [p.detach() for p in self.params]

    @torch.no_grad()
    def update(self, step: int) -> None:
        """After optimizer step `step` (1-based)."""
        weights = self._weights if self._fp32 else [w.float() for w in self._weights]
        if step <= self.start:
            torch._foreach_copy_(self.average, weights)
        else:
            torch._foreach_lerp_(self.average, weights, 1.0 - self.decay)

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The LoRA holds the average inside; the trained weights are put back after."""
        kept = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for param, average in zip(self.params, self.average):
                param.copy_(average)
        try:
            yield
        finally:
            with torch.no_grad():
                for param, value in zip(self.params, kept):
                    param.copy_(value)

    def state_tensors(self) -> dict[str, Tensor]:
        return {f"{PREFIX}{i}": t for i, t in enumerate(self.average)}

    def load(self, tensors: dict[str, Tensor]) -> None:
        """From a saved state; a state saved without EMA (turned on at resume) starts it from the weights."""
        if f"{PREFIX}0" not in tensors:
            self.average = [p.detach().float().clone() for p in self.params]
            return
        self.average = [tensors[f"{PREFIX}{i}"].to(p.device, torch.float32) for i, p in enumerate(self.params)]

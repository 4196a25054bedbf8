"""EMA of the LoRA weights (train.ema): an fp32 copy, updated after every `ema_every`-th optimizer step.

Up to `ema_start` the average is the weights themselves; after it, ema <- ema + (1 - decay^every)(w - ema),
one fused lerp over all tensors. On the LoRA's device (`ema_device = "gpu"`) that is no host sync; on the
host (`"cpu"`, for a GPU too small to hold the copy) each update first copies the weights to host
buffers made once, which waits for the GPU: one sync per update, so updates are spaced by `ema_every`
(decay^every keeps the average's span in steps the same). Saving and previews swap the average in and put the
trained weights back exactly (`swapped_in`); the average rides in the training state, so a resume
continues it bit for bit. With `every` > 1, what is swapped in at a step that is not a multiple of it (the
last step of a run of 1003 steps at every 10, a stop, a checkpoint) takes the steps since the last update in
too, with decay^(steps since): the file holds the average as of its own step, while the stored average, and so
the run's course, do not depend on when files were written.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import Tensor

PREFIX = "ema."  # keys of the average in state.safetensors, by parameter index


class LoraEma:
    def __init__(
        self, params: Sequence[torch.nn.Parameter], decay: float, start: int, device: str = "gpu", every: int = 1
    ):
        self.params = list(params)
        self.decay, self.start, self.every = decay, start, every
        self.host = device == "cpu"
        self.average = [self._home(p) for p in self.params]
        # views of the weights, made once (the LoRA trains in fp32, so no per-step cast or copy is needed)
        self._fp32 = all(p.dtype == torch.float32 for p in self.params)
        self._weights = [p.detach() for p in self.params]
        # ema_device = "cpu": host buffers the weights are copied into before the lerp, made once
        self._staging = [torch.empty_like(a) for a in self.average] if self.host else None
        self.seen = self.updated = 0  # the last step update() was called for, the last that updated the average

    def _home(self, tensor: Tensor) -> Tensor:
        """An fp32 copy of `tensor` where the average lives."""
        return tensor.detach().to("cpu" if self.host else tensor.device, torch.float32, copy=True)

    @torch.no_grad()
    def update(self, step: int) -> None:
        """After optimizer step `step` (1-based); only every `every`-th step does anything."""
        self.seen = step
        if step % self.every:
            return
        self.updated = step
        weights = self._weights if self._fp32 else [w.float() for w in self._weights]
        if self._staging is not None:
            torch._foreach_copy_(self._staging, weights)
            weights = self._staging
        if step <= self.start:
            torch._foreach_copy_(self.average, weights)
        else:
            torch._foreach_lerp_(self.average, weights, 1.0 - self.decay**self.every)

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The LoRA holds the average inside; the trained weights are put back after."""
        kept = [p.detach().clone() for p in self.params]
        since = self.seen - self.updated  # steps not yet in the average (every > 1)
        with torch.no_grad():
            for param, average in zip(self.params, self.average):
                param.copy_(average)
            if since and self.seen <= self.start:  # it follows the weights until ema_start
                torch._foreach_copy_(self._weights, kept)
            elif since:
                torch._foreach_lerp_(self._weights, kept, 1.0 - self.decay**since)
        try:
            yield
        finally:
            with torch.no_grad():
                for param, value in zip(self.params, kept):
                    param.copy_(value)

    def state_tensors(self) -> dict[str, Tensor]:
        return {f"{PREFIX}{i}": t for i, t in enumerate(self.average)}

    def load(self, tensors: dict[str, Tensor], step: int) -> None:
        """From a state saved at `step`; a state saved without EMA (turned on at resume) starts it from the weights."""
        self.seen, self.updated = step, step - step % self.every
        if f"{PREFIX}0" not in tensors:
            self.average = [self._home(p) for p in self.params]
            return
        self.average = [self._home(tensors[f"{PREFIX}{i}"].to(p.device)) for i, p in enumerate(self.params)]

"""The exact flow-matching field of the lab's concepts: what a perfectly trained teacher would sample.

For data that is exactly K points m_k (a lab concept's modes), the flow-matching optimum is known
in closed form: at noise level s, E[x0 | x_t] = sum_k softmax_k(-|x_t - (1 - s) m_k|^2 / (2 s^2)) m_k.
Sampling it with the real sampler tells how blurry a *perfect* teacher is at each step count,
so a trained teacher's few-step blur splits into what the task forces (the modes' separation in
noise units: far-apart modes are told apart by the noise itself as soon as s < 1, so a perfect
teacher is sharp from 2 steps on) and what is fitting error. TURBO.md's verdict rests on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace

import torch
from torch import Tensor

from .measure import EVAL_SEED, sample_latents
from .metric import score


class IdealField(torch.nn.Module):
    """Called as `predict` calls ZImageTransformer2DModel; returns the exact flow target x0 - noise.

    `concepts` pairs each caption embedding with its modes; a batch's captions are matched to them
    by value, so it samples several concepts in one batch as the lab's measurement does.
    """

    def __init__(self, concepts: Sequence[tuple[Tensor, Tensor]]):
        super().__init__()
        self.concepts = [(embed, modes.flatten(1).double()) for embed, modes in concepts]
        self.config = SimpleNamespace(in_channels=concepts[0][1].shape[1])
        self.dtype = torch.float32

    def _modes(self, caption: Tensor) -> Tensor:
        for embed, modes in self.concepts:
            if embed.shape == caption.shape and torch.equal(embed, caption):
                return modes
        raise ValueError("a caption the ideal field was not given modes for")

    def forward(self, xs: list[Tensor], t: Tensor, captions: list[Tensor], return_dict: bool = False):
        out = []
        for x, time, caption in zip(xs, t.tolist(), captions):
            modes, s = self._modes(caption), max(1.0 - time, 1e-6)
            flat = x.flatten().double()
            logits = -(flat - (1.0 - s) * modes).square().sum(1) / (2 * s * s)
            x0 = torch.softmax(logits, 0) @ modes
            out.append(((x0 - flat) / s).view_as(x).to(x.dtype))  # (x0 - x_t) / s = x0 - noise
        return (out,)


def ideal_curve(
    embeds: dict[str, Tensor], modes: dict[str, Tensor], captions: Sequence[str], steps_list: Sequence[int], n: int
) -> dict[str, dict[str, float]]:
    """{steps: scores averaged over `captions`} of the exact field, sampled like every lab model."""
    from .metric import mean_scores

    field = IdealField([(embeds[c], modes[c]) for c in captions])
    scheduler = _scheduler()
    batch = [embeds[c] for c in captions for _ in range(n)]
    seeds = [EVAL_SEED + i for _ in captions for i in range(n)]
    out = {}
    for steps in steps_list:
        latents = sample_latents(field, scheduler, batch, seeds, steps)
        span = torch.cat(list(modes.values()))
        out[str(steps)] = mean_scores(
            [score(latents[i * n : (i + 1) * n], modes[c], span) for i, c in enumerate(captions)]
        )
    return out


def _scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    from ..zimage import SCHEDULER

    return FlowMatchEulerDiscreteScheduler(**SCHEDULER)

"""Sample concepts through the project's own sampler and score them against their modes.

Sampling is `sampling.generate_latents`, the loop training previews and `zturbo sample`
use (the real shift-3 schedule, per-seed CPU noise), at the lab's SIZE (32x32 pixels). Evaluation seeds
start at EVAL_SEED, far from the seeds the build draws its training pairs from.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .concepts import SIZE
from .metric import mean_scores, score

SIDE = SIZE
EVAL_SEED = 100_000


def sample_latents(
    transformer, scheduler, embeds: Sequence[Tensor], seeds: Sequence[int], steps: int, observe=None, chunk: int = 128
) -> Tensor:
    """fp32 latents (N, 16, SIZE / 8, SIZE / 8), one per (embedding, seed), in chunks to bound memory."""
    from ..sampling import generate_latents

    out = []
    for start in range(0, len(seeds), chunk):
        kwargs = {"observe": observe} if observe is not None else {}
        out.append(
            generate_latents(
                transformer,
                scheduler,
                embeds[start : start + chunk],
                width=SIDE,
                height=SIDE,
                seeds=seeds[start : start + chunk],
                steps=steps,
                device="cpu",
                dtype=torch.float32,
                **kwargs,
            )
        )
    return torch.cat(out)


def measure(
    transformer,
    scheduler,
    embeds: dict[str, Tensor],
    modes: dict[str, Tensor],
    captions: Sequence[str],
    steps_list: Sequence[int],
    n: int = 32,
    seed: int = EVAL_SEED,
) -> dict[str, dict[str, dict[str, float]]]:
    """{steps: {caption: scores}} for every caption, all captions sampled in one batch per step count."""
    seeds = [seed + i for _ in captions for i in range(n)]
    batch = [embeds[c] for c in captions for _ in range(n)]
    span = torch.cat(list(modes.values()))  # the colour plane every concept's modes lie on
    out: dict[str, dict[str, dict[str, float]]] = {}
    for steps in steps_list:
        latents = sample_latents(transformer, scheduler, batch, seeds, steps)
        out[str(steps)] = {c: score(latents[i * n : (i + 1) * n], modes[c], span) for i, c in enumerate(captions)}
    return out


def averaged(result: dict[str, dict[str, dict[str, float]]], captions: Sequence[str]) -> dict[str, dict[str, float]]:
    """{steps: mean scores over `captions`}."""
    return {steps: mean_scores([per[c] for c in captions]) for steps, per in result.items()}

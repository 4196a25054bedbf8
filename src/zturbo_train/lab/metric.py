"""How well sampled latents land on a concept's modes: blur, precision, coverage.

Measured in latent space against the exact latents of the concept's images (the VAE
encoder's mean, the same latents `zturbo train` caches), so it is cheap, exact and
independent of how well the tiny VAE decodes. Distances are RMS over the latent's
elements, divided by the smallest distance between two modes of the concept, so 0 is a
mode hit exactly and the average of two modes scores 0.5:
- blur: the mean of that relative distance to the nearest mode (lower is better);
- precision: the share of samples within HIT of a mode (on a mode, not between modes);
- coverage: the share of modes that at least one such sample lands on.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

HIT = 0.25  # a quarter of the way to the nearest other mode: unmistakably that mode


def mode_scale(modes: Tensor) -> float:
    """Smallest RMS distance between two modes of a concept."""
    flat = modes.flatten(1).float()
    d = torch.cdist(flat, flat) / flat.shape[1] ** 0.5
    return float(d[~torch.eye(len(flat), dtype=torch.bool)].min())


def relative_distances(latents: Tensor, modes: Tensor) -> tuple[Tensor, Tensor]:
    """(distance to the nearest mode relative to the mode spacing, index of that mode), one per sample."""
    flat = modes.flatten(1).float()
    d = torch.cdist(latents.flatten(1).float(), flat) / flat.shape[1] ** 0.5
    nearest, index = d.min(1)
    return nearest / mode_scale(modes), index


def score(latents: Tensor, modes: Tensor) -> dict[str, float]:
    """blur, precision and coverage of samples `latents` (N, 16, h, w) against `modes` (K, 16, h, w)."""
    rel, index = relative_distances(latents, modes)
    hits = rel < HIT
    covered = len(set(index[hits].tolist()))
    return {"blur": float(rel.mean()), "precision": float(hits.float().mean()), "coverage": covered / len(modes)}


def mean_scores(scores: Sequence[dict[str, float]]) -> dict[str, float]:
    """The average of several concepts' scores, key by key."""
    return {k: sum(s[k] for s in scores) / len(scores) for k in scores[0]}
